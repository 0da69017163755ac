//! The untagged first message of a connection (StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest) as byte vectors from the spec: decode, encode, every prefix incomplete, and the
//! length bounds checked before any waiting.

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
    decode_startup, encode_cancel, encode_gssenc_request, encode_ssl_request, encode_startup,
    encode_startup_request, DecodeError, StartupMessage, StartupRequest, MAX_STARTUP_LEN,
};

fn startup(params: &[(&str, &str)]) -> StartupMessage {
    StartupMessage::new(
        params
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect(),
    )
}

fn vectors() -> Vec<(&'static str, Vec<u8>, StartupRequest)> {
    vec![
        (
            "StartupMessage",
            cat(&[
                b"\x00\x00\x00\x21",
                b"\x00\x03\x00\x00",
                b"user\x00alice\x00",
                b"database\x00db1\x00",
                b"\x00",
            ]),
            StartupRequest::Startup(startup(&[("user", "alice"), ("database", "db1")])),
        ),
        (
            "StartupMessage protocol 3.2 with an empty value",
            cat(&[
                b"\x00\x00\x00\x24",
                b"\x00\x03\x00\x02",
                b"user\x00bob\x00",
                b"options\x00\x00",
                b"_pq_.x\x00y\x00",
                b"\x00",
            ]),
            StartupRequest::Startup(StartupMessage {
                major: 3,
                minor: 2,
                params: vec![
                    ("user".into(), "bob".into()),
                    ("options".into(), String::new()),
                    ("_pq_.x".into(), "y".into()),
                ],
            }),
        ),
        (
            "StartupMessage without parameters",
            b"\x00\x00\x00\x09\x00\x03\x00\x00\x00".to_vec(),
            StartupRequest::Startup(startup(&[])),
        ),
        (
            "SSLRequest",
            b"\x00\x00\x00\x08\x04\xd2\x16\x2f".to_vec(),
            StartupRequest::SslRequest,
        ),
        (
            "GSSENCRequest",
            b"\x00\x00\x00\x08\x04\xd2\x16\x30".to_vec(),
            StartupRequest::GssEncRequest,
        ),
        (
            "CancelRequest protocol 3.0",
            b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x04\xd2\xde\xad\xbe\xef".to_vec(),
            StartupRequest::Cancel {
                process_id: 1234,
                secret_key: Bytes::from_static(b"\xde\xad\xbe\xef"),
            },
        ),
        (
            "CancelRequest protocol 3.2 with a 256-byte key",
            cat(&[
                b"\x00\x00\x01\x0c",
                b"\x04\xd2\x16\x2e",
                b"\x00\x00\x04\xd2",
                &[0xab; 256],
            ]),
            StartupRequest::Cancel {
                process_id: 1234,
                secret_key: Bytes::from(vec![0xab; 256]),
            },
        ),
    ]
}

fn decode_all(bytes: &[u8]) -> Result<Option<StartupRequest>, DecodeError> {
    let mut buf = BytesMut::from(bytes);
    let got = decode_startup(&mut buf);
    if let Ok(Some(_)) = got {
        assert!(buf.is_empty(), "decode_startup left {} bytes", buf.len());
    }
    got
}

#[test]
fn every_startup_vector_decodes_to_its_request() {
    for (name, bytes, want) in vectors() {
        assert_eq!(decode_all(&bytes), Ok(Some(want)), "{name}");
    }
}

#[test]
fn every_startup_request_encodes_to_its_vector() {
    for (name, bytes, msg) in vectors() {
        let mut out = BytesMut::new();
        encode_startup_request(&msg, &mut out);
        assert_eq!(out.as_ref(), &bytes[..], "{name}");
    }
}

#[test]
fn the_single_purpose_encoders_match_the_vectors() {
    let v = vectors();
    let mut out = BytesMut::new();
    encode_ssl_request(&mut out);
    assert_eq!(out.as_ref(), &v[3].1[..]);
    let mut out = BytesMut::new();
    encode_gssenc_request(&mut out);
    assert_eq!(out.as_ref(), &v[4].1[..]);
    let mut out = BytesMut::new();
    encode_cancel(1234, b"\xde\xad\xbe\xef", &mut out);
    assert_eq!(out.as_ref(), &v[5].1[..]);
    let mut out = BytesMut::new();
    let StartupRequest::Startup(msg) = &v[0].2 else {
        panic!("not a startup message")
    };
    encode_startup(msg, &mut out);
    assert_eq!(out.as_ref(), &v[0].1[..]);
}

#[test]
fn every_prefix_of_every_startup_vector_is_incomplete() {
    for (name, bytes, _) in vectors() {
        for n in 0..bytes.len() {
            let mut buf = BytesMut::from(&bytes[..n]);
            assert_eq!(decode_startup(&mut buf), Ok(None), "{name}: prefix {n}");
            assert_eq!(buf.len(), n, "{name}: prefix {n} consumed");
        }
    }
}

#[test]
fn only_the_first_message_is_taken_from_the_buffer() {
    let mut bytes = vectors()[3].1.clone();
    bytes.extend_from_slice(b"\x16\x03\x01");
    let mut buf = BytesMut::from(&bytes[..]);
    assert_eq!(
        decode_startup(&mut buf),
        Ok(Some(StartupRequest::SslRequest))
    );
    assert_eq!(buf.as_ref(), b"\x16\x03\x01");
}

#[test]
fn length_bounds_are_checked_before_waiting_for_the_body() {
    for (len, want) in [
        (0u32, DecodeError::StartupTooShort { len: 0 }),
        (7, DecodeError::StartupTooShort { len: 7 }),
        (10_001, DecodeError::StartupTooLong { len: 10_001 }),
        (
            u32::MAX,
            DecodeError::StartupTooLong {
                len: u32::MAX as usize,
            },
        ),
    ] {
        let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
        assert_eq!(decode_startup(&mut buf), Err(want), "length {len}");
    }
    // Exactly the maximum is accepted (and waited for).
    let mut buf = BytesMut::from(&(MAX_STARTUP_LEN as u32).to_be_bytes()[..]);
    assert_eq!(decode_startup(&mut buf), Ok(None));
}

#[test]
fn a_startup_packet_of_exactly_the_maximum_length_decodes() {
    let value = "v".repeat(MAX_STARTUP_LEN - 8 - "user\0".len() - 2);
    let msg = startup(&[("user", &value)]);
    let mut out = BytesMut::new();
    encode_startup(&msg, &mut out);
    assert_eq!(out.len(), MAX_STARTUP_LEN);
    assert_eq!(decode_all(&out), Ok(Some(StartupRequest::Startup(msg))));
}

#[test]
fn startup_helpers_read_parameters_as_postgres_does() {
    let msg = startup(&[("user", "alice"), ("database", "db1"), ("user", "bob")]);
    assert_eq!(msg.user(), Some("bob"), "the last value wins");
    assert_eq!(msg.database(), Some("db1"));
    assert_eq!(msg.param("application_name"), None);
    assert_eq!(startup(&[("user", "alice")]).database(), Some("alice"));
    assert_eq!(
        startup(&[("user", "alice"), ("database", "")]).database(),
        Some("alice")
    );
    assert_eq!(startup(&[]).user(), None);
    assert_eq!(startup(&[]).database(), None);
}

#[test]
fn replication_is_detected_unless_postgres_reads_the_value_as_false() {
    for (value, replication) in [
        ("true", true),
        ("on", true),
        ("yes", true),
        ("1", true),
        ("database", true),
        ("t", true),
        ("", true),
        ("o", true),
        (" off", true),
        ("false", false),
        ("FALSE", false),
        ("f", false),
        ("fal", false),
        ("off", false),
        ("of", false),
        ("no", false),
        ("n", false),
        ("0", false),
    ] {
        let msg = startup(&[("user", "a"), ("replication", value)]);
        assert_eq!(msg.is_replication(), replication, "replication={value:?}");
    }
    assert!(!startup(&[("user", "a")]).is_replication());
}

#[test]
fn names_and_values_with_a_nul_are_cut_and_empty_names_skipped() {
    let msg = startup(&[("user", "al\0ice"), ("", "x"), ("\0db", "y")]);
    let mut out = BytesMut::new();
    encode_startup(&msg, &mut out);
    assert_eq!(
        decode_all(&out),
        Ok(Some(StartupRequest::Startup(startup(&[("user", "al")]))))
    );
}
