//! Client-to-server messages as byte vectors written from the "Message Formats" section of the
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
    decode_frame, encode_frontend, encode_password, encode_sasl_initial_response,
    encode_sasl_response, parse_frontend, parse_password, parse_sasl_initial_response,
    DescribeTarget, FrontendMessage, SaslInitialResponse, DEFAULT_MAX_MESSAGE_LEN,
};

fn vectors() -> Vec<(&'static str, Vec<u8>, FrontendMessage)> {
    vec![
        (
            "Query",
            b"Q\x00\x00\x00\x0dSELECT 1\x00".to_vec(),
            FrontendMessage::Query {
                sql: "SELECT 1".into(),
            },
        ),
        (
            "Query empty",
            b"Q\x00\x00\x00\x05\x00".to_vec(),
            FrontendMessage::Query { sql: String::new() },
        ),
        (
            "Parse named with one parameter type",
            cat(&[
                b"P\x00\x00\x00\x17",
                b"s1\x00",
                b"SELECT $1\x00",
                b"\x00\x01",
                b"\x00\x00\x00\x17",
            ]),
            FrontendMessage::Parse {
                statement: "s1".into(),
                sql: "SELECT $1".into(),
                param_types: vec![23],
            },
        ),
        (
            "Parse unnamed without types",
            cat(&[b"P\x00\x00\x00\x10", b"\x00", b"SELECT 1\x00", b"\x00\x00"]),
            FrontendMessage::Parse {
                statement: String::new(),
                sql: "SELECT 1".into(),
                param_types: vec![],
            },
        ),
        (
            "Bind with a value, a NULL and two result formats",
            cat(&[
                b"B\x00\x00\x00\x20",
                b"\x00",
                b"s1\x00",
                b"\x00\x01\x00\x01",
                b"\x00\x02",
                b"\x00\x00\x00\x04\x00\x00\x00\x2a",
                b"\xff\xff\xff\xff",
                b"\x00\x02\x00\x00\x00\x01",
            ]),
            FrontendMessage::Bind {
                portal: String::new(),
                statement: "s1".into(),
                param_formats: vec![1],
                params: vec![Some(Bytes::from_static(b"\x00\x00\x00\x2a")), None],
                result_formats: vec![0, 1],
            },
        ),
        (
            "Bind with an empty (non-NULL) value",
            cat(&[
                b"B\x00\x00\x00\x11",
                b"p\x00",
                b"\x00",
                b"\x00\x00",
                b"\x00\x01",
                b"\x00\x00\x00\x00",
                b"\x00\x00",
            ]),
            FrontendMessage::Bind {
                portal: "p".into(),
                statement: String::new(),
                param_formats: vec![],
                params: vec![Some(Bytes::new())],
                result_formats: vec![],
            },
        ),
        (
            "Describe statement",
            b"D\x00\x00\x00\x08Ss1\x00".to_vec(),
            FrontendMessage::Describe {
                target: DescribeTarget::Statement,
                name: "s1".into(),
            },
        ),
        (
            "Describe unnamed portal",
            b"D\x00\x00\x00\x06P\x00".to_vec(),
            FrontendMessage::Describe {
                target: DescribeTarget::Portal,
                name: String::new(),
            },
        ),
        (
            "Execute",
            b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00".to_vec(),
            FrontendMessage::Execute {
                portal: String::new(),
                max_rows: 0,
            },
        ),
        (
            "Execute with a row limit",
            b"E\x00\x00\x00\x0bp1\x00\x00\x00\x00\x64".to_vec(),
            FrontendMessage::Execute {
                portal: "p1".into(),
                max_rows: 100,
            },
        ),
        (
            "Close portal",
            b"C\x00\x00\x00\x08Pp1\x00".to_vec(),
            FrontendMessage::Close {
                target: DescribeTarget::Portal,
                name: "p1".into(),
            },
        ),
        (
            "Close statement",
            b"C\x00\x00\x00\x08Ss1\x00".to_vec(),
            FrontendMessage::Close {
                target: DescribeTarget::Statement,
                name: "s1".into(),
            },
        ),
        ("Sync", b"S\x00\x00\x00\x04".to_vec(), FrontendMessage::Sync),
        (
            "Flush",
            b"H\x00\x00\x00\x04".to_vec(),
            FrontendMessage::Flush,
        ),
        (
            "Terminate",
            b"X\x00\x00\x00\x04".to_vec(),
            FrontendMessage::Terminate,
        ),
        (
            "CopyDone",
            b"c\x00\x00\x00\x04".to_vec(),
            FrontendMessage::CopyDone,
        ),
        (
            "CopyData",
            b"d\x00\x00\x00\x0a1\tfoo\n".to_vec(),
            FrontendMessage::CopyData(Bytes::from_static(b"1\tfoo\n")),
        ),
        (
            "CopyData empty",
            b"d\x00\x00\x00\x04".to_vec(),
            FrontendMessage::CopyData(Bytes::new()),
        ),
        (
            "CopyFail",
            b"f\x00\x00\x00\x0caborted\x00".to_vec(),
            FrontendMessage::CopyFail {
                message: "aborted".into(),
            },
        ),
        (
            "FunctionCall",
            cat(&[
                b"F\x00\x00\x00\x18",
                b"\x00\x00\x06\x3e",
                b"\x00\x00",
                b"\x00\x02",
                b"\x00\x00\x00\x02ab",
                b"\xff\xff\xff\xff",
                b"\x00\x01",
            ]),
            FrontendMessage::FunctionCall {
                function_oid: 1598,
                arg_formats: vec![],
                args: vec![Some(Bytes::from_static(b"ab")), None],
                result_format: 1,
            },
        ),
        (
            "PasswordMessage",
            b"p\x00\x00\x00\x0bsecret\x00".to_vec(),
            FrontendMessage::PasswordLike(Bytes::from_static(b"secret\x00")),
        ),
        (
            "Query with multi-byte UTF-8",
            cat(&[b"Q\x00\x00\x00\x13", "SELECT 'é€'".as_bytes(), b"\x00"]),
            FrontendMessage::Query {
                sql: "SELECT 'é€'".into(),
            },
        ),
    ]
}

#[test]
fn every_frontend_vector_decodes_to_its_message() {
    for (name, bytes, want) in vectors() {
        let raw = frame_one(&bytes);
        assert_eq!(raw.tag, bytes[0], "{name}");
        assert_eq!(
            raw.frame.as_ref(),
            &bytes[..],
            "{name}: frame kept verbatim"
        );
        assert_eq!(raw.body(), &bytes[5..], "{name}: body");
        assert_eq!(parse_frontend(&raw).unwrap(), want, "{name}");
    }
}

#[test]
fn every_frontend_message_encodes_to_its_vector() {
    for (name, bytes, msg) in vectors() {
        let mut out = BytesMut::new();
        encode_frontend(&msg, &mut out);
        assert_eq!(out.as_ref(), &bytes[..], "{name}");
    }
}

#[test]
fn every_frontend_message_round_trips() {
    for (name, _, msg) in vectors() {
        let mut out = BytesMut::new();
        encode_frontend(&msg, &mut out);
        let raw = decode_frame(&mut out, DEFAULT_MAX_MESSAGE_LEN)
            .unwrap()
            .unwrap();
        assert!(out.is_empty(), "{name}");
        assert_eq!(parse_frontend(&raw).unwrap(), msg, "{name}");
    }
}

#[test]
fn every_prefix_of_every_frontend_vector_is_incomplete() {
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
            got.push(parse_frontend(&raw).unwrap());
        }
    }
    let want: Vec<_> = vectors.into_iter().map(|(_, _, m)| m).collect();
    assert_eq!(got, want);
    assert!(buf.is_empty());
}

#[test]
fn data_values_are_slices_of_the_frame_not_copies() {
    let raw = frame_one(&vectors()[4].1);
    let FrontendMessage::Bind { params, .. } = parse_frontend(&raw).unwrap() else {
        panic!("not a Bind");
    };
    let value = params[0].as_ref().unwrap();
    let frame_range = raw.frame.as_ptr() as usize..raw.frame.as_ptr() as usize + raw.frame.len();
    assert!(frame_range.contains(&(value.as_ptr() as usize)));
}

#[test]
fn sasl_initial_response_is_built_and_parsed() {
    let mut out = BytesMut::new();
    encode_sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc", &mut out);
    let want = cat(&[
        b"p\x00\x00\x00\x21",
        b"SCRAM-SHA-256\x00",
        b"\x00\x00\x00\x0b",
        b"n,,n=,r=abc",
    ]);
    assert_eq!(out.as_ref(), &want[..]);
    let raw = frame_one(&want);
    let FrontendMessage::PasswordLike(body) = parse_frontend(&raw).unwrap() else {
        panic!("not a p message");
    };
    assert_eq!(
        parse_sasl_initial_response(&body).unwrap(),
        SaslInitialResponse {
            mechanism: "SCRAM-SHA-256".into(),
            data: Some(Bytes::from_static(b"n,,n=,r=abc")),
        }
    );
}

#[test]
fn sasl_initial_response_without_data_is_length_minus_one() {
    let body = Bytes::from_static(b"SCRAM-SHA-256\x00\xff\xff\xff\xff");
    let parsed = parse_sasl_initial_response(&body).unwrap();
    assert_eq!(parsed.data, None);
}

#[test]
fn sasl_response_carries_data_verbatim() {
    let mut out = BytesMut::new();
    encode_sasl_response(b"c=biws,r=abc,p=xyz", &mut out);
    assert_eq!(out.as_ref(), b"p\x00\x00\x00\x16c=biws,r=abc,p=xyz");
}

#[test]
fn password_is_nul_terminated_and_cut_at_an_embedded_nul() {
    let mut out = BytesMut::new();
    encode_password(b"secret", &mut out);
    assert_eq!(out.as_ref(), b"p\x00\x00\x00\x0bsecret\x00");
    assert_eq!(parse_password(&out[5..]).unwrap(), b"secret");

    let mut out = BytesMut::new();
    encode_password(b"sec\x00ret", &mut out);
    assert_eq!(out.as_ref(), b"p\x00\x00\x00\x08sec\x00");
}

#[test]
fn password_without_terminator_or_with_trailing_bytes_is_rejected() {
    assert!(parse_password(b"secret").is_err());
    assert!(parse_password(b"").is_err());
    assert!(parse_password(b"sec\x00ret\x00").is_err());
}

#[test]
fn strings_with_a_nul_are_cut_there_when_encoding() {
    let mut out = BytesMut::new();
    encode_frontend(
        &FrontendMessage::Query {
            sql: "SELECT 1\0; DROP TABLE t".into(),
        },
        &mut out,
    );
    assert_eq!(out.as_ref(), b"Q\x00\x00\x00\x0dSELECT 1\x00");
}

#[test]
fn a_bind_with_more_than_65535_parameters_is_not_written() {
    let mut out = BytesMut::from(&b"prefix"[..]);
    encode_frontend(
        &FrontendMessage::Bind {
            portal: String::new(),
            statement: String::new(),
            param_formats: vec![],
            params: vec![None; 65_536],
            result_formats: vec![],
        },
        &mut out,
    );
    assert_eq!(out.as_ref(), b"prefix");
}

#[test]
fn a_bind_with_65535_parameters_round_trips() {
    // Counts are unsigned on the wire, as PostgreSQL and libpq read them.
    let msg = FrontendMessage::Bind {
        portal: String::new(),
        statement: String::new(),
        param_formats: vec![],
        params: vec![None; 65_535],
        result_formats: vec![],
    };
    let mut out = BytesMut::new();
    encode_frontend(&msg, &mut out);
    assert_eq!(&out[7..9], b"\x00\x00");
    assert_eq!(&out[9..11], b"\xff\xff");
    let raw = decode_frame(&mut out, DEFAULT_MAX_MESSAGE_LEN)
        .unwrap()
        .unwrap();
    assert_eq!(parse_frontend(&raw).unwrap(), msg);
}
