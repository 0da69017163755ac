//! Server-to-client messages as byte vectors written from the "Message Formats" section of the
//! protocol chapter: each decodes to the expected value, encodes back to the same bytes, and every
//! strict prefix of it is reported as incomplete.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use portcullis_pgwire::{
    decode_frame, encode_backend, encode_data_row, encode_error_response, encode_notice_response,
    encode_ready_for_query, parse_backend, Authentication, BackendMessage, CopyResponse, DataRow,
    ErrorFields, FieldDescription, TransactionStatus, DEFAULT_MAX_MESSAGE_LEN,
};

fn scram_key() -> Vec<u8> {
    (0u8..32).collect()
}

fn vectors() -> Vec<(&'static str, Vec<u8>, BackendMessage)> {
    use BackendMessage as B;
    vec![
        (
            "AuthenticationOk",
            b"R\x00\x00\x00\x08\x00\x00\x00\x00".to_vec(),
            B::Authentication(Authentication::Ok),
        ),
        (
            "AuthenticationCleartextPassword",
            b"R\x00\x00\x00\x08\x00\x00\x00\x03".to_vec(),
            B::Authentication(Authentication::CleartextPassword),
        ),
        (
            "AuthenticationMD5Password",
            b"R\x00\x00\x00\x0c\x00\x00\x00\x05\x01\x02\x03\x04".to_vec(),
            B::Authentication(Authentication::Md5Password { salt: [1, 2, 3, 4] }),
        ),
        (
            "AuthenticationSASL",
            cat(&[
                b"R\x00\x00\x00\x2a",
                b"\x00\x00\x00\x0a",
                b"SCRAM-SHA-256-PLUS\x00",
                b"SCRAM-SHA-256\x00",
                b"\x00",
            ]),
            B::Authentication(Authentication::Sasl {
                mechanisms: vec!["SCRAM-SHA-256-PLUS".into(), "SCRAM-SHA-256".into()],
            }),
        ),
        (
            "AuthenticationSASLContinue",
            b"R\x00\x00\x00\x0d\x00\x00\x00\x0br=abc".to_vec(),
            B::Authentication(Authentication::SaslContinue(Bytes::from_static(b"r=abc"))),
        ),
        (
            "AuthenticationSASLFinal",
            b"R\x00\x00\x00\x0d\x00\x00\x00\x0cv=xyz".to_vec(),
            B::Authentication(Authentication::SaslFinal(Bytes::from_static(b"v=xyz"))),
        ),
        (
            "AuthenticationGSS",
            b"R\x00\x00\x00\x08\x00\x00\x00\x07".to_vec(),
            B::Authentication(Authentication::Unsupported(7)),
        ),
        (
            "AuthenticationSSPI",
            b"R\x00\x00\x00\x08\x00\x00\x00\x09".to_vec(),
            B::Authentication(Authentication::Unsupported(9)),
        ),
        (
            "AuthenticationKerberosV5",
            b"R\x00\x00\x00\x08\x00\x00\x00\x02".to_vec(),
            B::Authentication(Authentication::Unsupported(2)),
        ),
        (
            "BackendKeyData protocol 3.0",
            b"K\x00\x00\x00\x0c\x00\x00\x04\xd2\xde\xad\xbe\xef".to_vec(),
            B::BackendKeyData {
                process_id: 1234,
                secret_key: Bytes::from_static(b"\xde\xad\xbe\xef"),
            },
        ),
        (
            "BackendKeyData protocol 3.2 with a 32-byte key",
            cat(&[b"K\x00\x00\x00\x28", b"\x00\x00\x04\xd2", &scram_key()]),
            B::BackendKeyData {
                process_id: 1234,
                secret_key: Bytes::from(scram_key()),
            },
        ),
        (
            "ParameterStatus",
            b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00".to_vec(),
            B::ParameterStatus {
                name: "client_encoding".into(),
                value: "UTF8".into(),
            },
        ),
        (
            "ReadyForQuery idle",
            b"Z\x00\x00\x00\x05I".to_vec(),
            B::ReadyForQuery {
                status: TransactionStatus::Idle,
            },
        ),
        (
            "ReadyForQuery in transaction",
            b"Z\x00\x00\x00\x05T".to_vec(),
            B::ReadyForQuery {
                status: TransactionStatus::InBlock,
            },
        ),
        (
            "ReadyForQuery failed transaction",
            b"Z\x00\x00\x00\x05E".to_vec(),
            B::ReadyForQuery {
                status: TransactionStatus::Failed,
            },
        ),
        (
            "RowDescription",
            cat(&[
                b"T\x00\x00\x00\x1b",
                b"\x00\x01",
                b"id\x00",
                b"\x00\x00\x40\x00",
                b"\x00\x01",
                b"\x00\x00\x00\x17",
                b"\x00\x04",
                b"\xff\xff\xff\xff",
                b"\x00\x00",
            ]),
            B::RowDescription(vec![FieldDescription {
                name: "id".into(),
                table_oid: 16384,
                column_attr: 1,
                type_oid: 23,
                type_size: 4,
                type_modifier: -1,
                format: 0,
            }]),
        ),
        (
            "RowDescription with no columns",
            b"T\x00\x00\x00\x06\x00\x00".to_vec(),
            B::RowDescription(vec![]),
        ),
        (
            "DataRow with a value, a NULL and an empty string",
            cat(&[
                b"D\x00\x00\x00\x14",
                b"\x00\x03",
                b"\x00\x00\x00\x0242",
                b"\xff\xff\xff\xff",
                b"\x00\x00\x00\x00",
            ]),
            B::DataRow(DataRow {
                values: vec![Some(Bytes::from_static(b"42")), None, Some(Bytes::new())],
            }),
        ),
        (
            "CommandComplete",
            b"C\x00\x00\x00\x0dSELECT 1\x00".to_vec(),
            B::CommandComplete {
                tag: "SELECT 1".into(),
            },
        ),
        (
            "EmptyQueryResponse",
            b"I\x00\x00\x00\x04".to_vec(),
            B::EmptyQueryResponse,
        ),
        (
            "ErrorResponse",
            cat(&[
                b"E\x00\x00\x00\x2d",
                b"SERROR\x00",
                b"VERROR\x00",
                b"C42501\x00",
                b"Mpermission denied\x00",
                b"\x00",
            ]),
            B::ErrorResponse(ErrorFields::new("ERROR", "42501", "permission denied")),
        ),
        (
            "NoticeResponse",
            b"N\x00\x00\x00\x11SNOTICE\x00Mhi\x00\x00".to_vec(),
            B::NoticeResponse(ErrorFields {
                fields: vec![(b'S', "NOTICE".into()), (b'M', "hi".into())],
            }),
        ),
        (
            "ParseComplete",
            b"1\x00\x00\x00\x04".to_vec(),
            B::ParseComplete,
        ),
        (
            "BindComplete",
            b"2\x00\x00\x00\x04".to_vec(),
            B::BindComplete,
        ),
        (
            "CloseComplete",
            b"3\x00\x00\x00\x04".to_vec(),
            B::CloseComplete,
        ),
        ("NoData", b"n\x00\x00\x00\x04".to_vec(), B::NoData),
        (
            "PortalSuspended",
            b"s\x00\x00\x00\x04".to_vec(),
            B::PortalSuspended,
        ),
        ("CopyDone", b"c\x00\x00\x00\x04".to_vec(), B::CopyDone),
        (
            "ParameterDescription",
            b"t\x00\x00\x00\x0e\x00\x02\x00\x00\x00\x17\x00\x00\x00\x19".to_vec(),
            B::ParameterDescription(vec![23, 25]),
        ),
        (
            "CopyInResponse text with two columns",
            b"G\x00\x00\x00\x0b\x00\x00\x02\x00\x00\x00\x00".to_vec(),
            B::CopyInResponse(CopyResponse {
                format: 0,
                column_formats: vec![0, 0],
            }),
        ),
        (
            "CopyOutResponse binary with one column",
            b"H\x00\x00\x00\x09\x01\x00\x01\x00\x01".to_vec(),
            B::CopyOutResponse(CopyResponse {
                format: 1,
                column_formats: vec![1],
            }),
        ),
        (
            "CopyBothResponse",
            b"W\x00\x00\x00\x07\x00\x00\x00".to_vec(),
            B::CopyBothResponse(CopyResponse {
                format: 0,
                column_formats: vec![],
            }),
        ),
        (
            "CopyData",
            b"d\x00\x00\x00\x0a1\tfoo\n".to_vec(),
            B::CopyData(Bytes::from_static(b"1\tfoo\n")),
        ),
        (
            "NotificationResponse",
            b"A\x00\x00\x00\x11\x00\x00\x00\x4dch\x00hello\x00".to_vec(),
            B::NotificationResponse {
                process_id: 77,
                channel: "ch".into(),
                payload: "hello".into(),
            },
        ),
        (
            "FunctionCallResponse",
            b"V\x00\x00\x00\x0a\x00\x00\x00\x02ab".to_vec(),
            B::FunctionCallResponse(Some(Bytes::from_static(b"ab"))),
        ),
        (
            "FunctionCallResponse NULL",
            b"V\x00\x00\x00\x08\xff\xff\xff\xff".to_vec(),
            B::FunctionCallResponse(None),
        ),
        (
            "NegotiateProtocolVersion",
            b"v\x00\x00\x00\x15\x00\x00\x00\x00\x00\x00\x00\x01_pq_.foo\x00".to_vec(),
            B::NegotiateProtocolVersion {
                newest_minor: 0,
                unrecognized: vec!["_pq_.foo".into()],
            },
        ),
    ]
}

#[test]
fn every_backend_vector_decodes_to_its_message() {
    for (name, bytes, want) in vectors() {
        let raw = frame_one(&bytes);
        assert_eq!(
            raw.frame.as_ref(),
            &bytes[..],
            "{name}: frame kept verbatim"
        );
        assert_eq!(parse_backend(&raw).unwrap(), want, "{name}");
    }
}

#[test]
fn every_backend_message_encodes_to_its_vector() {
    for (name, bytes, msg) in vectors() {
        let mut out = BytesMut::new();
        encode_backend(&msg, &mut out);
        assert_eq!(out.as_ref(), &bytes[..], "{name}");
    }
}

#[test]
fn every_backend_message_round_trips() {
    for (name, _, msg) in vectors() {
        let mut out = BytesMut::new();
        encode_backend(&msg, &mut out);
        let raw = decode_frame(&mut out, DEFAULT_MAX_MESSAGE_LEN)
            .unwrap()
            .unwrap();
        assert!(out.is_empty(), "{name}");
        assert_eq!(parse_backend(&raw).unwrap(), msg, "{name}");
    }
}

#[test]
fn every_prefix_of_every_backend_vector_is_incomplete() {
    for (_, bytes, _) in vectors() {
        assert_every_prefix_incomplete(&bytes);
    }
}

#[test]
fn a_stream_fed_one_byte_at_a_time_yields_every_message_in_order() {
    let vectors = vectors();
    let stream: Vec<u8> = vectors.iter().flat_map(|(_, b, _)| b.clone()).collect();
    let mut buf = BytesMut::new();
    let mut got = Vec::new();
    for byte in stream {
        buf.extend_from_slice(&[byte]);
        while let Some(raw) = decode_frame(&mut buf, DEFAULT_MAX_MESSAGE_LEN).unwrap() {
            got.push(parse_backend(&raw).unwrap());
        }
    }
    let want: Vec<_> = vectors.into_iter().map(|(_, _, m)| m).collect();
    assert_eq!(got, want);
}

#[test]
fn gss_continue_data_is_accepted_but_not_kept() {
    let raw = frame_one(b"R\x00\x00\x00\x0b\x00\x00\x00\x08tok");
    assert_eq!(
        parse_backend(&raw).unwrap(),
        BackendMessage::Authentication(Authentication::Unsupported(8))
    );
}

#[test]
fn data_row_values_are_slices_of_the_frame() {
    let raw = frame_one(&cat(&[
        b"D\x00\x00\x00\x0c",
        b"\x00\x01",
        b"\x00\x00\x00\x0242",
    ]));
    let BackendMessage::DataRow(row) = parse_backend(&raw).unwrap() else {
        panic!("not a DataRow");
    };
    let value = row.values[0].as_ref().unwrap();
    assert_eq!(value.as_ptr(), raw.frame[11..].as_ptr());
}

#[test]
fn encode_data_row_writes_masked_values_and_nulls() {
    let mut out = BytesMut::new();
    encode_data_row(&[Some(b"42"), None, Some(b"")], &mut out);
    assert_eq!(
        out.as_ref(),
        &cat(&[
            b"D\x00\x00\x00\x14",
            b"\x00\x03",
            b"\x00\x00\x00\x0242",
            b"\xff\xff\xff\xff",
            b"\x00\x00\x00\x00",
        ])[..]
    );
}

#[test]
fn encode_ready_for_query_writes_the_status_byte() {
    let mut out = BytesMut::new();
    encode_ready_for_query(TransactionStatus::InBlock, &mut out);
    assert_eq!(out.as_ref(), b"Z\x00\x00\x00\x05T");
}

#[test]
fn error_fields_are_built_as_the_server_builds_them() {
    let err = ErrorFields::new("FATAL", "28000", "no pg_hba.conf entry")
        .with_detail("denied by policy rule 3")
        .with_hint("ask for access");
    assert_eq!(err.severity(), Some("FATAL"));
    assert_eq!(err.get(b'V'), Some("FATAL"));
    assert_eq!(err.sqlstate(), Some("28000"));
    assert_eq!(err.message(), Some("no pg_hba.conf entry"));
    assert_eq!(err.detail(), Some("denied by policy rule 3"));
    assert_eq!(err.hint(), Some("ask for access"));
    let mut out = BytesMut::new();
    encode_error_response(&err, &mut out);
    let want = framed(
        b'E',
        b"SFATAL\x00VFATAL\x00C28000\x00Mno pg_hba.conf entry\x00Ddenied by policy rule 3\x00\
          Hask for access\x00\x00",
    );
    assert_eq!(out.as_ref(), &want[..]);
}

#[test]
fn error_fields_set_replaces_the_first_and_drops_repeats() {
    let mut err = ErrorFields {
        fields: vec![
            (b'M', "one".into()),
            (b'C', "XX000".into()),
            (b'M', "two".into()),
        ],
    };
    err.set(b'M', "three".into());
    assert_eq!(
        err.fields,
        vec![(b'M', "three".into()), (b'C', "XX000".into())]
    );
    err.set(b'D', "detail".into());
    assert_eq!(err.fields.last(), Some(&(b'D', "detail".into())));
}

#[test]
fn a_nul_in_error_text_becomes_a_space() {
    let err = ErrorFields::new("ERROR", "42501", "table \"a\0b\" is protected");
    let mut out = BytesMut::new();
    encode_error_response(&err, &mut out);
    let raw = frame_one(&out);
    let BackendMessage::ErrorResponse(parsed) = parse_backend(&raw).unwrap() else {
        panic!("not an ErrorResponse");
    };
    assert_eq!(parsed.message(), Some("table \"a b\" is protected"));
    assert_eq!(parsed.sqlstate(), Some("42501"));
}

#[test]
fn an_error_field_with_type_zero_is_skipped() {
    let err = ErrorFields {
        fields: vec![(0, "lost".into()), (b'M', "kept".into())],
    };
    let mut out = BytesMut::new();
    encode_notice_response(&err, &mut out);
    assert_eq!(out.as_ref(), &framed(b'N', b"Mkept\x00\x00")[..]);
}

#[test]
fn other_strings_with_a_nul_are_cut_there() {
    let mut out = BytesMut::new();
    encode_backend(
        &BackendMessage::CommandComplete {
            tag: "SELECT 1\0junk".into(),
        },
        &mut out,
    );
    assert_eq!(out.as_ref(), b"C\x00\x00\x00\x0dSELECT 1\x00");
}

#[test]
fn empty_sasl_mechanism_names_are_skipped() {
    let mut out = BytesMut::new();
    encode_backend(
        &BackendMessage::Authentication(Authentication::Sasl {
            mechanisms: vec![String::new(), "SCRAM-SHA-256".into(), "\0x".into()],
        }),
        &mut out,
    );
    assert_eq!(
        out.as_ref(),
        &framed(b'R', b"\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00")[..]
    );
}
