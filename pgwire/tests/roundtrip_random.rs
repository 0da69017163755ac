//! Property tests with a deterministic generator: random messages of every type encode and decode
//! back to themselves, byte streams of many messages split correctly at any chunking, and random
//! mutations of valid frames never panic a decoder; whatever a decoder accepts re-encodes to the
//! exact bytes it came from (so forwarding parsed traffic cannot change it). The fuzz targets in
//! `fuzz/` explore the same properties without a seed.

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
use portcullis_pgwire::startup::{CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, SSL_REQUEST_CODE};
use portcullis_pgwire::{
    decode_frame, decode_startup, encode_backend, encode_frontend, encode_startup_request,
    parse_backend, parse_frontend, Authentication, BackendMessage, CopyResponse, DataRow,
    DescribeTarget, ErrorFields, FieldDescription, FrontendMessage, StartupMessage, StartupRequest,
    TransactionStatus, DEFAULT_MAX_MESSAGE_LEN,
};

const ITERATIONS: usize = 3_000;

fn values(rng: &mut Rng, max: usize) -> Vec<Option<Bytes>> {
    (0..rng.below(max + 1))
        .map(|_| rng.bool().then(|| Bytes::from(rng.bytes(12))))
        .collect()
}

fn formats(rng: &mut Rng, max: usize) -> Vec<i16> {
    (0..rng.below(max + 1)).map(|_| rng.u16() as i16).collect()
}

/// Zero, one, or one format per value: the combinations the protocol allows.
fn formats_for(rng: &mut Rng, values: usize) -> Vec<i16> {
    match rng.below(3) {
        0 => vec![],
        1 => vec![rng.below(2) as i16],
        _ => (0..values).map(|_| rng.below(2) as i16).collect(),
    }
}

fn target(rng: &mut Rng) -> DescribeTarget {
    if rng.bool() {
        DescribeTarget::Statement
    } else {
        DescribeTarget::Portal
    }
}

fn frontend(rng: &mut Rng) -> FrontendMessage {
    use FrontendMessage as F;
    match rng.below(15) {
        0 => F::Query {
            sql: rng.string(40),
        },
        1 => F::Parse {
            statement: rng.string(8),
            sql: rng.string(40),
            param_types: (0..rng.below(5)).map(|_| rng.u32()).collect(),
        },
        2 => {
            let params = values(rng, 6);
            F::Bind {
                portal: rng.string(8),
                statement: rng.string(8),
                param_formats: formats_for(rng, params.len()),
                params,
                result_formats: formats(rng, 4),
            }
        }
        3 => F::Describe {
            target: target(rng),
            name: rng.string(8),
        },
        4 => F::Execute {
            portal: rng.string(8),
            max_rows: rng.u32() as i32,
        },
        5 => F::Close {
            target: target(rng),
            name: rng.string(8),
        },
        6 => F::Sync,
        7 => F::Flush,
        8 => F::CopyData(Bytes::from(rng.bytes(30))),
        9 => F::CopyDone,
        10 => F::CopyFail {
            message: rng.string(20),
        },
        11 => {
            let args = values(rng, 4);
            F::FunctionCall {
                function_oid: rng.u32(),
                arg_formats: formats_for(rng, args.len()),
                args,
                result_format: rng.below(2) as i16,
            }
        }
        12 => F::Terminate,
        _ => F::PasswordLike(Bytes::from(rng.bytes(30))),
    }
}

fn error_fields(rng: &mut Rng) -> ErrorFields {
    const CODES: &[u8] = b"SVCMDHPpqWstcdnFLR";
    ErrorFields {
        fields: (0..rng.below(6))
            .map(|_| (*rng.pick(CODES), rng.string(20)))
            .collect(),
    }
}

fn copy_response(rng: &mut Rng) -> CopyResponse {
    CopyResponse {
        format: rng.below(2) as i8,
        column_formats: formats(rng, 5),
    }
}

fn backend(rng: &mut Rng) -> BackendMessage {
    use BackendMessage as B;
    match rng.below(24) {
        0 => B::Authentication(match rng.below(7) {
            0 => Authentication::Ok,
            1 => Authentication::CleartextPassword,
            2 => Authentication::Md5Password {
                salt: rng.u32().to_be_bytes(),
            },
            3 => Authentication::Sasl {
                mechanisms: (0..rng.below(3))
                    .map(|_| rng.non_empty_string(15))
                    .collect(),
            },
            4 => Authentication::SaslContinue(Bytes::from(rng.bytes(40))),
            5 => Authentication::SaslFinal(Bytes::from(rng.bytes(40))),
            _ => Authentication::Unsupported(*rng.pick(&[2, 7, 8, 9, 99, u32::MAX])),
        }),
        1 => B::BackendKeyData {
            process_id: rng.u32(),
            secret_key: Bytes::from(
                (0..4 + rng.below(253))
                    .map(|_| rng.u8())
                    .collect::<Vec<_>>(),
            ),
        },
        2 => B::ParameterStatus {
            name: rng.string(10),
            value: rng.string(10),
        },
        3 => B::ReadyForQuery {
            status: *rng.pick(&[
                TransactionStatus::Idle,
                TransactionStatus::InBlock,
                TransactionStatus::Failed,
            ]),
        },
        4 => B::RowDescription(
            (0..rng.below(4))
                .map(|_| FieldDescription {
                    name: rng.string(10),
                    table_oid: rng.u32(),
                    column_attr: rng.u16() as i16,
                    type_oid: rng.u32(),
                    type_size: rng.u16() as i16,
                    type_modifier: rng.u32() as i32,
                    format: rng.below(2) as i16,
                })
                .collect(),
        ),
        5 => B::DataRow(DataRow {
            values: values(rng, 8),
        }),
        6 => B::CommandComplete {
            tag: rng.string(12),
        },
        7 => B::EmptyQueryResponse,
        8 => B::ErrorResponse(error_fields(rng)),
        9 => B::NoticeResponse(error_fields(rng)),
        10 => B::ParseComplete,
        11 => B::BindComplete,
        12 => B::CloseComplete,
        13 => B::NoData,
        14 => B::PortalSuspended,
        15 => B::ParameterDescription((0..rng.below(5)).map(|_| rng.u32()).collect()),
        16 => B::CopyInResponse(copy_response(rng)),
        17 => B::CopyOutResponse(copy_response(rng)),
        18 => B::CopyBothResponse(copy_response(rng)),
        19 => B::CopyData(Bytes::from(rng.bytes(30))),
        20 => B::CopyDone,
        21 => B::NotificationResponse {
            process_id: rng.u32(),
            channel: rng.string(10),
            payload: rng.string(30),
        },
        22 => B::FunctionCallResponse(rng.bool().then(|| Bytes::from(rng.bytes(10)))),
        _ => B::NegotiateProtocolVersion {
            newest_minor: rng.u32(),
            unrecognized: (0..rng.below(3)).map(|_| rng.string(12)).collect(),
        },
    }
}

fn startup_request(rng: &mut Rng) -> StartupRequest {
    match rng.below(4) {
        0 => StartupRequest::SslRequest,
        1 => StartupRequest::GssEncRequest,
        2 => StartupRequest::Cancel {
            process_id: rng.u32(),
            secret_key: Bytes::from(
                (0..4 + rng.below(253))
                    .map(|_| rng.u8())
                    .collect::<Vec<_>>(),
            ),
        },
        _ => StartupRequest::Startup(StartupMessage {
            major: 3,
            minor: rng.u16(),
            params: (0..rng.below(5))
                .map(|_| (rng.non_empty_string(10), rng.string(20)))
                .collect(),
        }),
    }
}

#[test]
fn random_frontend_messages_round_trip() {
    let mut rng = Rng::new(0x5eed_0001);
    for i in 0..ITERATIONS {
        let msg = frontend(&mut rng);
        let mut out = BytesMut::new();
        encode_frontend(&msg, &mut out);
        let raw = decode_frame(&mut out, DEFAULT_MAX_MESSAGE_LEN)
            .unwrap()
            .unwrap();
        assert!(out.is_empty(), "iteration {i}: {msg:?}");
        assert_eq!(parse_frontend(&raw).unwrap(), msg, "iteration {i}");
    }
}

#[test]
fn random_backend_messages_round_trip() {
    let mut rng = Rng::new(0x5eed_0002);
    for i in 0..ITERATIONS {
        let msg = backend(&mut rng);
        let mut out = BytesMut::new();
        encode_backend(&msg, &mut out);
        let raw = decode_frame(&mut out, DEFAULT_MAX_MESSAGE_LEN)
            .unwrap()
            .unwrap();
        assert!(out.is_empty(), "iteration {i}: {msg:?}");
        assert_eq!(parse_backend(&raw).unwrap(), msg, "iteration {i}");
    }
}

#[test]
fn random_startup_requests_round_trip() {
    let mut rng = Rng::new(0x5eed_0003);
    for i in 0..ITERATIONS {
        let msg = startup_request(&mut rng);
        let mut out = BytesMut::new();
        encode_startup_request(&msg, &mut out);
        assert_eq!(decode_startup(&mut out), Ok(Some(msg)), "iteration {i}");
        assert!(out.is_empty());
    }
}

#[test]
fn a_random_stream_split_into_random_chunks_yields_every_message() {
    let mut rng = Rng::new(0x5eed_0004);
    for _ in 0..50 {
        let msgs: Vec<_> = (0..40).map(|_| backend(&mut rng)).collect();
        let mut stream = BytesMut::new();
        for msg in &msgs {
            encode_backend(msg, &mut stream);
        }
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        let mut rest = &stream[..];
        while !rest.is_empty() {
            let n = (1 + rng.below(40)).min(rest.len());
            buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            while let Some(raw) = decode_frame(&mut buf, DEFAULT_MAX_MESSAGE_LEN).unwrap() {
                got.push(parse_backend(&raw).unwrap());
            }
        }
        assert_eq!(got, msgs);
    }
}

/// Flips, inserts, deletes or overwrites a few bytes (often in the length and count fields).
fn mutate(rng: &mut Rng, bytes: &mut Vec<u8>) {
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(bytes.len() + 1);
        match rng.below(5) {
            0 if at < bytes.len() => bytes[at] ^= 1 << rng.below(8),
            1 => bytes.insert(at, rng.u8()),
            2 if at < bytes.len() => {
                bytes.remove(at);
            }
            3 if at < bytes.len() => bytes[at] = *rng.pick(&[0, 0xff, 0x7f, 0x80, 1]),
            _ => bytes.truncate(at),
        }
    }
}

/// Whether re-encoding may legitimately differ from the received frame: only the auth requests
/// whose data is deliberately not kept.
fn lossy(msg: &BackendMessage) -> bool {
    matches!(
        msg,
        BackendMessage::Authentication(Authentication::Unsupported(_))
    )
}

#[test]
fn mutated_frames_never_panic_and_accepted_ones_re_encode_identically() {
    let mut rng = Rng::new(0x5eed_0005);
    let mut accepted = [0usize; 2];
    for _ in 0..20_000 {
        let backend_side = rng.bool();
        let mut bytes = BytesMut::new();
        if backend_side {
            encode_backend(&backend(&mut rng), &mut bytes);
        } else {
            encode_frontend(&frontend(&mut rng), &mut bytes);
        }
        let mut bytes = bytes.to_vec();
        mutate(&mut rng, &mut bytes);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(raw)) = decode_frame(&mut buf, 4096) {
            let mut again = BytesMut::new();
            if backend_side {
                let Ok(msg) = parse_backend(&raw) else {
                    continue;
                };
                accepted[1] += 1;
                encode_backend(&msg, &mut again);
                if !lossy(&msg) {
                    assert_eq!(again.as_ref(), raw.frame.as_ref(), "{msg:?}");
                }
            } else {
                let Ok(msg) = parse_frontend(&raw) else {
                    continue;
                };
                accepted[0] += 1;
                encode_frontend(&msg, &mut again);
                assert_eq!(again.as_ref(), raw.frame.as_ref(), "{msg:?}");
            }
        }
    }
    // The mutations must leave enough valid messages for the identity check to mean something.
    assert!(accepted.iter().all(|n| *n > 1_000), "{accepted:?}");
}

#[test]
fn mutated_startup_packets_never_panic_and_accepted_ones_re_encode_identically() {
    let mut rng = Rng::new(0x5eed_0006);
    let mut accepted = 0usize;
    for _ in 0..20_000 {
        let mut bytes = BytesMut::new();
        encode_startup_request(&startup_request(&mut rng), &mut bytes);
        let mut bytes = bytes.to_vec();
        mutate(&mut rng, &mut bytes);
        let mut buf = BytesMut::from(&bytes[..]);
        if let Ok(Some(msg)) = decode_startup(&mut buf) {
            accepted += 1;
            let mut again = BytesMut::new();
            encode_startup_request(&msg, &mut again);
            assert_eq!(again.as_ref(), &bytes[..bytes.len() - buf.len()], "{msg:?}");
        }
    }
    assert!(accepted > 1_000, "{accepted}");
}

#[test]
fn random_bytes_never_panic_any_decoder() {
    let mut rng = Rng::new(0x5eed_0007);
    for _ in 0..20_000 {
        let mut bytes = rng.bytes(64);
        // Plausible headers make the body parsers run more often than pure noise would.
        if rng.bool() && bytes.len() >= 5 {
            let len = (bytes.len() - 1) as u32;
            bytes[1..5].copy_from_slice(&len.to_be_bytes());
            bytes[0] = *rng.pick(b"RKSZTDCIEN123ntGHWdcAVvQPBDEHFpfSX");
        }
        let mut buf = BytesMut::from(&bytes[..]);
        if let Ok(Some(raw)) = decode_frame(&mut buf, 1 << 20) {
            let _ = parse_frontend(&raw);
            let _ = parse_backend(&raw);
        }
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = decode_startup(&mut buf);
        if bytes.len() >= 8 {
            let code = *rng.pick(&[
                CANCEL_REQUEST_CODE,
                SSL_REQUEST_CODE,
                GSSENC_REQUEST_CODE,
                3 << 16,
            ]);
            let len = bytes.len() as u32;
            bytes[0..4].copy_from_slice(&len.to_be_bytes());
            bytes[4..8].copy_from_slice(&code.to_be_bytes());
            let _ = decode_startup(&mut BytesMut::from(&bytes[..]));
        }
    }
}
