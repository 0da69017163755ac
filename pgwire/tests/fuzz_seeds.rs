//! The fuzz targets' seed corpora (`fuzz/seeds/<target>/`, recorded from real clients and a
//! real server by `tests/scripts/make_fuzz_seeds.py`) are what the decoders accept: a seed
//! that stopped parsing would start the fuzzer from noise without anyone noticing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::path::PathBuf;

use bytes::BytesMut;
use portcullis_pgwire::{
    decode_frame, decode_startup, parse_backend, parse_frontend, split_binary,
};

/// (file name, contents) of every seed of `target`; at least one must exist.
fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    assert!(out.len() <= 50, "{target}: keep the corpus small");
    for (name, data) in &out {
        assert!(data.len() <= 4096, "{target}/{name}: {} bytes", data.len());
    }
    out
}

/// Every complete message of a seed; a trailing partial message is allowed (cut seeds).
fn frames(data: &[u8]) -> Vec<portcullis_pgwire::RawMessage> {
    let mut buf = BytesMut::from(data);
    let mut out = Vec::new();
    while let Some(raw) = decode_frame(&mut buf, 1 << 16).unwrap() {
        out.push(raw);
    }
    out
}

#[test]
fn frontend_seeds_are_client_messages_the_parser_accepts() {
    for (name, data) in seeds("frontend") {
        let msgs = frames(&data);
        assert!(!msgs.is_empty(), "{name}");
        for raw in &msgs {
            parse_frontend(raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

#[test]
fn backend_seeds_are_server_messages_the_parser_accepts() {
    for (name, data) in seeds("backend") {
        let msgs = frames(&data);
        assert!(!msgs.is_empty(), "{name}");
        for raw in &msgs {
            parse_backend(raw).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
}

#[test]
fn startup_seeds_are_whole_first_messages() {
    for (name, data) in seeds("startup") {
        let mut buf = BytesMut::from(&data[..]);
        assert!(
            decode_startup(&mut buf).unwrap().is_some(),
            "{name}: incomplete"
        );
        assert!(buf.is_empty(), "{name}: one message per seed");
    }
}

#[test]
fn copy_binary_seeds_split_with_their_header() {
    for (name, data) in seeds("copy_binary") {
        split_binary(&data, true).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
}
