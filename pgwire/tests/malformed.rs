//! A table of malformed inputs, one row per way a peer can lie: bad length fields, counts that
//! exceed the body or are "negative", missing NUL terminators, trailing garbage, bad enum bytes,
//! invalid UTF-8, unknown tags. Each must be a specific error, never a panic.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod common;

use bytes::BytesMut;
use common::*;
use portcullis_pgwire::{
    decode_frame, decode_startup, parse_backend, parse_frontend, DecodeError, Side,
    DEFAULT_MAX_MESSAGE_LEN,
};

fn invalid(what: &'static str) -> DecodeError {
    DecodeError::Invalid {
        what,
        detail: String::new(),
    }
}

fn truncated(message: &'static str, field: &'static str) -> DecodeError {
    DecodeError::Truncated { message, field }
}

fn no_nul(message: &'static str, field: &'static str) -> DecodeError {
    DecodeError::MissingTerminator { message, field }
}

fn trailing(message: &'static str, extra: usize) -> DecodeError {
    DecodeError::TrailingBytes { message, extra }
}

fn negative(message: &'static str, field: &'static str, value: i32) -> DecodeError {
    DecodeError::NegativeLength {
        message,
        field,
        value,
    }
}

fn frontend_cases() -> Vec<(&'static str, Vec<u8>, DecodeError)> {
    vec![
        (
            "Query without NUL",
            framed(b'Q', b"abcd"),
            no_nul("Query", "query string"),
        ),
        (
            "Query with trailing bytes",
            framed(b'Q', b"a\0b"),
            trailing("Query", 1),
        ),
        (
            "Query not UTF-8",
            framed(b'Q', b"\xff\xfe\0"),
            DecodeError::InvalidUtf8 {
                message: "Query",
                field: "query string",
            },
        ),
        (
            "Query with empty body",
            framed(b'Q', b""),
            no_nul("Query", "query string"),
        ),
        (
            "Parse count exceeds the body",
            framed(b'P', b"s\0q\0\x00\x05\x00\x00\x00\x17"),
            invalid("Parse"),
        ),
        (
            "Parse negative (0xffff) count",
            framed(b'P', b"s\0q\0\xff\xff"),
            invalid("Parse"),
        ),
        (
            "Parse without its count",
            framed(b'P', b"s\0q\0\x00"),
            truncated("Parse", "parameter type count"),
        ),
        (
            "Parse without query NUL",
            framed(b'P', b"s\0q"),
            no_nul("Parse", "query string"),
        ),
        (
            "Parse with trailing bytes",
            framed(b'P', b"s\0q\0\x00\x00!"),
            trailing("Parse", 1),
        ),
        (
            "Bind value length -2",
            framed(b'B', b"\0\0\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),
            negative("Bind", "parameter value", -2),
        ),
        (
            "Bind value longer than the body",
            framed(b'B', b"\0\0\x00\x00\x00\x01\x00\x00\x00\x09ab\x00\x00"),
            truncated("Bind", "parameter value"),
        ),
        (
            "Bind value length i32::MAX",
            framed(b'B', b"\0\0\x00\x00\x00\x01\x7f\xff\xff\xffab"),
            truncated("Bind", "parameter value"),
        ),
        (
            "Bind negative (0x8000) parameter count",
            framed(b'B', b"\0\0\x00\x00\x80\x00\x00\x00"),
            invalid("Bind"),
        ),
        (
            "Bind with two formats for one parameter",
            framed(
                b'B',
                b"\0\0\x00\x02\x00\x00\x00\x01\x00\x01\xff\xff\xff\xff\x00\x00",
            ),
            invalid("Bind"),
        ),
        (
            "Bind without result formats",
            framed(b'B', b"\0\0\x00\x00\x00\x00"),
            truncated("Bind", "result format count"),
        ),
        (
            "Bind with a result format cut short",
            framed(b'B', b"\0\0\x00\x00\x00\x00\x00\x01\x00"),
            invalid("Bind"),
        ),
        (
            "Bind without portal NUL",
            framed(b'B', b"portal"),
            no_nul("Bind", "portal name"),
        ),
        (
            "Describe target 'X'",
            framed(b'D', b"Xs\0"),
            invalid("Describe"),
        ),
        (
            "Describe empty",
            framed(b'D', b""),
            truncated("Describe", "target type"),
        ),
        ("Close target 's'", framed(b'C', b"ss\0"), invalid("Close")),
        (
            "Close without NUL",
            framed(b'C', b"Ss"),
            no_nul("Close", "name"),
        ),
        (
            "Execute row count cut short",
            framed(b'E', b"\0\x00\x00"),
            truncated("Execute", "maximum row count"),
        ),
        (
            "Execute with trailing bytes",
            framed(b'E', b"\0\x00\x00\x00\x00\x00"),
            trailing("Execute", 1),
        ),
        ("Sync with a body", framed(b'S', b"x"), trailing("Sync", 1)),
        (
            "Flush with a body",
            framed(b'H', b"xy"),
            trailing("Flush", 2),
        ),
        (
            "Terminate with a body",
            framed(b'X', b"x"),
            trailing("Terminate", 1),
        ),
        (
            "CopyDone with a body",
            framed(b'c', b"x"),
            trailing("CopyDone", 1),
        ),
        (
            "CopyFail without NUL",
            framed(b'f', b"oops"),
            no_nul("CopyFail", "error message"),
        ),
        (
            "FunctionCall without result format",
            framed(b'F', b"\x00\x00\x06\x3e\x00\x00\x00\x00"),
            truncated("FunctionCall", "result format"),
        ),
        (
            "FunctionCall argument length -7",
            framed(
                b'F',
                b"\x00\x00\x06\x3e\x00\x00\x00\x01\xff\xff\xff\xf9\x00\x00",
            ),
            negative("FunctionCall", "argument value", -7),
        ),
        (
            "FunctionCall with three formats for one argument",
            framed(
                b'F',
                b"\x00\x00\x06\x3e\x00\x03\x00\x00\x00\x00\x00\x00\x00\x01\xff\xff\xff\xff\x00\x00",
            ),
            invalid("FunctionCall"),
        ),
        (
            "unknown tag 'Z' from a client",
            framed(b'Z', b"I"),
            DecodeError::UnknownTag {
                tag: b'Z',
                side: Side::Frontend,
            },
        ),
        (
            "tag 0x00",
            framed(0, b""),
            DecodeError::UnknownTag {
                tag: 0,
                side: Side::Frontend,
            },
        ),
    ]
}

fn backend_cases() -> Vec<(&'static str, Vec<u8>, DecodeError)> {
    vec![
        ("Authentication empty", framed(b'R', b""), truncated("Authentication", "request code")),
        ("Authentication code cut short", framed(b'R', b"\x00\x00"), truncated("Authentication", "request code")),
        ("AuthenticationOk with trailing bytes", framed(b'R', b"\x00\x00\x00\x00!"), trailing("Authentication", 1)),
        ("AuthenticationCleartextPassword with trailing bytes", framed(b'R', b"\x00\x00\x00\x03!!"), trailing("Authentication", 2)),
        ("AuthenticationMD5Password salt cut short", framed(b'R', b"\x00\x00\x00\x05\x01\x02\x03"), truncated("Authentication", "MD5 salt")),
        ("AuthenticationMD5Password with trailing bytes", framed(b'R', b"\x00\x00\x00\x05\x01\x02\x03\x04\x05"), trailing("Authentication", 1)),
        (
            "AuthenticationSASL without list terminator",
            framed(b'R', b"\x00\x00\x00\x0aSCRAM-SHA-256\x00"),
            no_nul("Authentication", "SASL mechanism name"),
        ),
        (
            "AuthenticationSASL with trailing bytes",
            framed(b'R', b"\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00!"),
            trailing("Authentication", 1),
        ),
        (
            "AuthenticationSASL name not UTF-8",
            framed(b'R', b"\x00\x00\x00\x0a\xc3\x28\x00\x00"),
            DecodeError::InvalidUtf8 {
                message: "Authentication",
                field: "SASL mechanism name",
            },
        ),
        ("BackendKeyData 3-byte key", framed(b'K', b"\x00\x00\x04\xd2abc"), invalid("BackendKeyData")),
        ("BackendKeyData 257-byte key", framed(b'K', &cat(&[b"\x00\x00\x04\xd2", &[7; 257]])), invalid("BackendKeyData")),
        ("BackendKeyData without process ID", framed(b'K', b"\x00\x00"), truncated("BackendKeyData", "process ID")),
        ("ParameterStatus without value", framed(b'S', b"a\0"), no_nul("ParameterStatus", "parameter value")),
        ("ParameterStatus with trailing bytes", framed(b'S', b"a\0b\0c"), trailing("ParameterStatus", 1)),
        ("ReadyForQuery status 'X'", framed(b'Z', b"X"), invalid("ReadyForQuery")),
        ("ReadyForQuery empty", framed(b'Z', b""), truncated("ReadyForQuery", "transaction status")),
        ("ReadyForQuery with trailing bytes", framed(b'Z', b"II"), trailing("ReadyForQuery", 1)),
        (
            "RowDescription count exceeds the body",
            framed(b'T', b"\x00\x02id\x00\x00\x00\x40\x00\x00\x01\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00"),
            invalid("RowDescription"),
        ),
        (
            "RowDescription field cut short",
            framed(b'T', b"\x00\x01idxxxxxxxxxxxxxxxxxxxxxx\x00\x00\x00"),
            truncated("RowDescription", "table OID"),
        ),
        (
            "RowDescription name without NUL",
            framed(b'T', b"\x00\x01idididididididididididid"),
            no_nul("RowDescription", "field name"),
        ),
        ("DataRow negative (0xffff) count", framed(b'D', b"\xff\xff"), invalid("DataRow")),
        ("DataRow count 0x8000 with 4 bytes", framed(b'D', b"\x80\x00\xff\xff\xff\xff"), invalid("DataRow")),
        ("DataRow value length -5", framed(b'D', b"\x00\x01\xff\xff\xff\xfb"), negative("DataRow", "column value", -5)),
        ("DataRow value length i32::MIN", framed(b'D', b"\x00\x01\x80\x00\x00\x00"), negative("DataRow", "column value", i32::MIN)),
        ("DataRow value longer than the body", framed(b'D', b"\x00\x01\x00\x00\x00\x0542"), truncated("DataRow", "column value")),
        ("DataRow with trailing bytes", framed(b'D', b"\x00\x01\xff\xff\xff\xff\x00"), trailing("DataRow", 1)),
        ("DataRow without count", framed(b'D', b"\x00"), truncated("DataRow", "column count")),
        ("CommandComplete without NUL", framed(b'C', b"SELECT 1"), no_nul("CommandComplete", "command tag")),
        ("ErrorResponse without final zero", framed(b'E', b"SERROR\0"), truncated("ErrorResponse", "field type")),
        ("ErrorResponse empty", framed(b'E', b""), truncated("ErrorResponse", "field type")),
        ("ErrorResponse value without NUL", framed(b'E', b"SERROR"), no_nul("ErrorResponse", "field value")),
        ("ErrorResponse with trailing bytes", framed(b'E', b"SERROR\0\0x"), trailing("ErrorResponse", 1)),
        ("NoticeResponse without final zero", framed(b'N', b"MNOTE\0"), truncated("NoticeResponse", "field type")),
        ("ParseComplete with a body", framed(b'1', b"x"), trailing("ParseComplete", 1)),
        ("BindComplete with a body", framed(b'2', b"x"), trailing("BindComplete", 1)),
        ("CloseComplete with a body", framed(b'3', b"x"), trailing("CloseComplete", 1)),
        ("NoData with a body", framed(b'n', b"x"), trailing("NoData", 1)),
        ("PortalSuspended with a body", framed(b's', b"x"), trailing("PortalSuspended", 1)),
        ("EmptyQueryResponse with a body", framed(b'I', b"x"), trailing("EmptyQueryResponse", 1)),
        ("ParameterDescription count exceeds the body", framed(b't', b"\x00\x02\x00\x00\x00\x17"), invalid("ParameterDescription")),
        ("ParameterDescription with trailing bytes", framed(b't', b"\x00\x01\x00\x00\x00\x17\x00"), trailing("ParameterDescription", 1)),
        ("CopyInResponse count exceeds the body", framed(b'G', b"\x00\x00\x03\x00\x00"), invalid("CopyInResponse")),
        ("CopyOutResponse without count", framed(b'H', b"\x00"), truncated("CopyOutResponse", "column count")),
        ("CopyBothResponse with trailing bytes", framed(b'W', b"\x00\x00\x00\x01"), trailing("CopyBothResponse", 1)),
        ("NotificationResponse without payload", framed(b'A', b"\x00\x00\x00\x01ch\0"), no_nul("NotificationResponse", "payload")),
        ("FunctionCallResponse length -2", framed(b'V', b"\xff\xff\xff\xfe"), negative("FunctionCallResponse", "result value", -2)),
        ("FunctionCallResponse with trailing bytes", framed(b'V', b"\x00\x00\x00\x01ab"), trailing("FunctionCallResponse", 1)),
        (
            "NegotiateProtocolVersion count -1",
            framed(b'v', b"\x00\x00\x00\x00\xff\xff\xff\xff"),
            negative("NegotiateProtocolVersion", "unrecognized option count", -1),
        ),
        (
            "NegotiateProtocolVersion count exceeds the body",
            framed(b'v', b"\x00\x00\x00\x00\x00\x00\x03\xe8a\0"),
            invalid("NegotiateProtocolVersion"),
        ),
        (
            "NegotiateProtocolVersion option without NUL",
            framed(b'v', b"\x00\x00\x00\x00\x00\x00\x00\x01ab"),
            no_nul("NegotiateProtocolVersion", "option name"),
        ),
        (
            "unknown tag 'Q' from a server",
            framed(b'Q', b"x\0"),
            DecodeError::UnknownTag {
                tag: b'Q',
                side: Side::Backend,
            },
        ),
    ]
}

/// An untagged startup-phase packet: big-endian length (counting itself), then the pieces.
fn packet(parts: &[&[u8]]) -> Vec<u8> {
    let body = parts.concat();
    cat(&[&u32::try_from(body.len() + 4).unwrap().to_be_bytes(), &body])
}

fn startup_cases() -> Vec<(&'static str, Vec<u8>, DecodeError)> {
    vec![
        (
            "protocol 2.0",
            b"\x00\x00\x00\x09\x00\x02\x00\x00\x00".to_vec(),
            DecodeError::UnsupportedProtocol { major: 2, minor: 0 },
        ),
        (
            "unknown special code 1234.5681",
            b"\x00\x00\x00\x08\x04\xd2\x16\x31".to_vec(),
            DecodeError::UnsupportedProtocol {
                major: 1234,
                minor: 5681,
            },
        ),
        (
            "startup without list terminator",
            packet(&[b"\x00\x03\x00\x00", b"user\0bob\0"]),
            no_nul("StartupMessage", "parameter name"),
        ),
        (
            "startup value without NUL",
            packet(&[b"\x00\x03\x00\x00", b"user\0bob"]),
            no_nul("StartupMessage", "parameter value"),
        ),
        (
            "startup name without value",
            packet(&[b"\x00\x03\x00\x00", b"user\0"]),
            no_nul("StartupMessage", "parameter value"),
        ),
        (
            "startup with trailing garbage",
            packet(&[b"\x00\x03\x00\x00", b"user\0bob\0\0junk"]),
            trailing("StartupMessage", 4),
        ),
        (
            "startup value not UTF-8",
            packet(&[b"\x00\x03\x00\x00", b"user\0\xff\0\0"]),
            DecodeError::InvalidUtf8 {
                message: "StartupMessage",
                field: "parameter value",
            },
        ),
        (
            "SSLRequest with a body",
            b"\x00\x00\x00\x0c\x04\xd2\x16\x2fxxxx".to_vec(),
            trailing("SSLRequest", 4),
        ),
        (
            "GSSENCRequest with a body",
            b"\x00\x00\x00\x09\x04\xd2\x16\x30x".to_vec(),
            trailing("GSSENCRequest", 1),
        ),
        (
            "CancelRequest with a 2-byte key",
            b"\x00\x00\x00\x0e\x04\xd2\x16\x2e\x00\x00\x00\x01ab".to_vec(),
            invalid("CancelRequest"),
        ),
        (
            "CancelRequest without process ID",
            b"\x00\x00\x00\x0a\x04\xd2\x16\x2e\x00\x00".to_vec(),
            truncated("CancelRequest", "process ID"),
        ),
        (
            "CancelRequest with a 257-byte key",
            cat(&[
                b"\x00\x00\x01\x0d",
                b"\x04\xd2\x16\x2e",
                b"\x00\x00\x00\x01",
                &[1; 257],
            ]),
            invalid("CancelRequest"),
        ),
    ]
}

fn frame(bytes: &[u8]) -> portcullis_pgwire::RawMessage {
    let mut buf = BytesMut::from(bytes);
    decode_frame(&mut buf, DEFAULT_MAX_MESSAGE_LEN)
        .unwrap()
        .unwrap()
}

#[test]
fn malformed_client_messages_are_specific_errors() {
    for (name, bytes, want) in frontend_cases() {
        let got = parse_frontend(&frame(&bytes)).unwrap_err();
        assert!(
            same_error(&got, &want),
            "{name}: got {got:?}, want {want:?}"
        );
        assert!(!got.to_string().is_empty());
    }
}

#[test]
fn malformed_server_messages_are_specific_errors() {
    for (name, bytes, want) in backend_cases() {
        let got = parse_backend(&frame(&bytes)).unwrap_err();
        assert!(
            same_error(&got, &want),
            "{name}: got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn malformed_startup_packets_are_specific_errors() {
    for (name, bytes, want) in startup_cases() {
        let mut buf = BytesMut::from(&bytes[..]);
        let got = match decode_startup(&mut buf) {
            Err(e) => e,
            Ok(other) => panic!("{name}: got {other:?}"),
        };
        assert!(
            same_error(&got, &want),
            "{name}: got {got:?}, want {want:?}"
        );
    }
}

#[test]
fn frame_length_below_four_is_rejected_from_the_header_alone() {
    for len in [0u32, 1, 2, 3] {
        let mut buf = BytesMut::from(&cat(&[b"Q", &len.to_be_bytes()])[..]);
        assert_eq!(
            decode_frame(&mut buf, DEFAULT_MAX_MESSAGE_LEN),
            Err(DecodeError::LengthTooSmall { tag: b'Q', len })
        );
    }
}

#[test]
fn frame_length_above_the_maximum_is_rejected_from_the_header_alone() {
    let mut buf = BytesMut::from(&b"D\x00\x00\x04\x01"[..]);
    assert_eq!(
        decode_frame(&mut buf, 1024),
        Err(DecodeError::TooLong {
            tag: b'D',
            len: 1025,
            max: 1024
        })
    );
    let mut buf = BytesMut::from(&b"D\xff\xff\xff\xff"[..]);
    assert_eq!(
        decode_frame(&mut buf, DEFAULT_MAX_MESSAGE_LEN),
        Err(DecodeError::TooLong {
            tag: b'D',
            len: u32::MAX as usize,
            max: DEFAULT_MAX_MESSAGE_LEN
        })
    );
    // Exactly the maximum is fine.
    let mut buf = BytesMut::from(&b"D\x00\x00\x04\x00"[..]);
    assert_eq!(decode_frame(&mut buf, 1024), Ok(None));
}

#[test]
fn waiting_for_a_large_body_reserves_nothing() {
    let mut buf = BytesMut::with_capacity(16);
    buf.extend_from_slice(b"d\x03\xff\xff\xff");
    let capacity = buf.capacity();
    assert_eq!(decode_frame(&mut buf, DEFAULT_MAX_MESSAGE_LEN), Ok(None));
    assert_eq!(buf.capacity(), capacity);
    assert_eq!(buf.len(), 5);
}

#[test]
fn errors_name_the_message_and_what_to_do() {
    let err = DecodeError::TooLong {
        tag: b'D',
        len: 100,
        max: 10,
    };
    assert_eq!(
        err.to_string(),
        "message type 'D' (0x44) declares length 100 bytes, above the configured maximum of 10: \
         raise the maximum message length if legitimate traffic needs bigger messages"
    );
    let err = DecodeError::UnknownTag {
        tag: 0x01,
        side: Side::Frontend,
    };
    assert_eq!(
        err.to_string(),
        "unknown message type 0x01 from the client: not a PostgreSQL protocol v3 message"
    );
}
