//! The segment parser never panics and never accepts a changed segment: every prefix of a valid
//! segment and a few thousand deterministic pseudo-random mutations of it. The fuzz target
//! (`fuzz/fuzz_targets/segment_reader.rs`) explores the same property without a seed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod common;

use common::*;
use portcullis_audit_store::format::parse_line;
use portcullis_audit_store::{check_segment_bytes, BreakKind, Store};

/// xorshift64*: deterministic, std-only.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// A sealed, signed segment with varied events (escapes, unicode, nesting, numbers).
fn valid_segment() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (mut store, _) = Store::open(dir.path(), options(&clock, true)).unwrap();
    let events: [&[u8]; 6] = [
        br#"{"kind":"connection.opened","user":"alice","port":5432}"#,
        br#"{"sql":"SELECT 1; -- \"quoted\" \\ \u00e9","rows":[1,2.5,-3e2,null,true]}"#,
        "{\"user\":\"bj\u{f6}rn\",\"nested\":{\"a\":{\"b\":[[],{}]}}}".as_bytes(),
        b"[]",
        b"\"just a string\"",
        b"42",
    ];
    for e in events {
        clock.advance(1);
        store.append(e).unwrap();
    }
    store.seal_current().unwrap().unwrap();
    drop(store);
    std::fs::read(seg(dir.path(), 1)).unwrap()
}

#[test]
fn every_prefix_is_rejected_cleanly_unless_it_ends_on_a_line() {
    let segment = valid_segment();
    let key = verifying_key();
    let summary = check_segment_bytes(&segment, Some(&key)).unwrap();
    assert_eq!(summary.records, 6);
    assert!(summary.seal.is_some());
    for cut in 0..segment.len() {
        let prefix = &segment[..cut];
        let result = check_segment_bytes(prefix, Some(&key));
        let on_line_boundary = cut == 0 || segment[cut - 1] == b'\n';
        if on_line_boundary {
            let summary = result.unwrap();
            assert!(summary.seal.is_none(), "prefix {cut} still holds the seal");
        } else {
            assert_eq!(
                result.unwrap_err().kind,
                BreakKind::Truncated,
                "prefix {cut}"
            );
        }
        for line in prefix.split(|b| *b == b'\n') {
            let _ = parse_line(line);
        }
    }
}

#[test]
fn random_mutations_never_panic_and_are_never_accepted() {
    let segment = valid_segment();
    let key = verifying_key();
    let interesting: &[u8] = b"{}[]\":,\\\n0123456789abcdefABCDEF -e.\x00\xff\xc3";
    let mut rng = Rng(0x5eed_cafe_f00d_d00d);
    let mut rejected_by_kind = std::collections::BTreeMap::new();
    for round in 0..4000 {
        let mut mutated = segment.clone();
        for _ in 0..=rng.below(3) {
            let at = rng.below(mutated.len() + 1);
            let byte = if rng.below(2) == 0 {
                interesting[rng.below(interesting.len())]
            } else {
                rng.next() as u8
            };
            match rng.below(4) {
                0 if at < mutated.len() => mutated[at] = byte,
                1 if at < mutated.len() => {
                    mutated.remove(at);
                }
                2 => mutated.insert(at, byte),
                _ if at < mutated.len() => mutated[at] ^= 1 << rng.below(8),
                _ => mutated.push(byte),
            }
        }
        if mutated == segment {
            continue;
        }
        for line in mutated.split(|b| *b == b'\n') {
            let _ = parse_line(line);
        }
        let _ = check_segment_bytes(&mutated, None);
        match check_segment_bytes(&mutated, Some(&key)) {
            Ok(summary) => panic!(
                "round {round}: mutated segment accepted ({summary:?}):\n{}",
                String::from_utf8_lossy(&mutated)
            ),
            Err(b) => *rejected_by_kind.entry(format!("{:?}", b.kind)).or_insert(0) += 1,
        }
    }
    eprintln!("rejections by kind: {rejected_by_kind:?}");
}

#[test]
fn arbitrary_bytes_as_a_segment_never_panic() {
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    for _ in 0..2000 {
        let len = rng.below(300);
        let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        assert!(check_segment_bytes(&bytes, None).is_err() || bytes.is_empty());
    }
}
