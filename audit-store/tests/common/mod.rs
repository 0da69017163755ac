//! Shared fixtures: a hand-driven clock, a standard store layout and line-level file edits.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "test fixtures fail loudly; not every test file uses every helper"
)]

use portcullis_audit_store::{segment_file_name, SigningKey, Store, StoreOptions, VerifyingKey};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const START_MS: u64 = 1_700_000_000_000;

#[derive(Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    pub fn new(ms: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(ms)))
    }
    pub fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
    pub fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

pub fn signing_key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

pub fn verifying_key() -> VerifyingKey {
    signing_key().verifying_key()
}

pub fn options(clock: &ManualClock, signed: bool) -> StoreOptions {
    let clock = clock.clone();
    StoreOptions {
        signing_key: signed.then(signing_key),
        clock: Arc::new(move || clock.now()),
        ..StoreOptions::default()
    }
}

pub fn event(n: u64) -> Vec<u8> {
    format!(r#"{{"n":{n},"msg":"hello {n}","user":"alice"}}"#).into_bytes()
}

pub fn seg(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(segment_file_name(first_seq))
}

pub fn seg_name(first_seq: u64) -> String {
    segment_file_name(first_seq)
}

/// The standard layout: segments 1..=5, 6..=10 and 11..=15 sealed (at 1 s, 2 s and 3 s after
/// `START_MS`), and 16..=18 open. Record n is appended at `START_MS + n`.
pub fn standard_store(dir: &Path, signed: bool) -> ManualClock {
    standard_store_with(dir, signed.then(signing_key), event)
}

/// The standard layout with any key and events (a forger's copy, say).
pub fn standard_store_with(
    dir: &Path,
    key: Option<SigningKey>,
    event: impl Fn(u64) -> Vec<u8>,
) -> ManualClock {
    let clock = ManualClock::new(START_MS);
    let mut opts = options(&clock, false);
    opts.signing_key = key;
    let (mut store, notes) = Store::open(dir, opts).unwrap();
    assert!(notes.is_empty());
    for n in 1..=18u64 {
        clock.set(START_MS + n);
        let rec = store.append(&event(n)).unwrap();
        assert_eq!(rec.seq, n);
        if n % 5 == 0 && n < 16 {
            clock.set(START_MS + 1000 * (n / 5));
            store.seal_current().unwrap().unwrap();
        }
    }
    clock
}

pub fn lines(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().map(str::to_owned).collect()
}

pub fn write_lines(path: &Path, lines: &[String]) {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

/// Replaces line `line_no` (1-based) of the segment starting at `first_seq`.
pub fn edit_line(dir: &Path, first_seq: u64, line_no: usize, edit: impl FnOnce(&str) -> String) {
    let path = seg(dir, first_seq);
    let mut all = lines(&path);
    let edited = edit(&all[line_no - 1]);
    assert_ne!(edited, all[line_no - 1], "edit changed nothing");
    all[line_no - 1] = edited;
    write_lines(&path, &all);
}

/// The value of a `"field":"<hex>"` in a line.
pub fn hex_field<'a>(line: &'a str, field: &str) -> &'a str {
    let key = format!("\"{field}\":\"");
    let start = line.find(&key).unwrap() + key.len();
    &line[start..start + line[start..].find('"').unwrap()]
}

/// Flips the first hex digit of a field.
pub fn flip_hex_field(line: &str, field: &str) -> String {
    let value = hex_field(line, field);
    let first = if value.starts_with('0') { "1" } else { "0" };
    let flipped = format!("{first}{}", &value[1..]);
    line.replacen(value, &flipped, 1)
}
