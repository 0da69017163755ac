//! The chain verifies after normal operation, and every kind of tampering is named at the
//! place it happened.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod common;

use common::*;
use portcullis_audit_store::format::{encode_record_line, parse_line, Line, RecordView};
use portcullis_audit_store::{
    verify, BreakKind, EncodedEvent, SigningKey, Store, StoreError, StoreOptions, VerifyReport,
};
use std::path::Path;

fn assert_ok(report: &VerifyReport) {
    assert!(
        report.ok,
        "verify failed: {}",
        report.first_break.as_ref().unwrap()
    );
}

#[test]
fn standard_store_verifies_with_and_without_key() {
    for signed in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        standard_store(dir.path(), signed);
        let report = verify(dir.path(), signed.then(verifying_key).as_ref());
        assert_ok(&report);
        assert_eq!(report.segments, 4);
        assert_eq!(report.sealed_segments, 3);
        assert_eq!(report.records, 18);
        assert_eq!((report.first_seq, report.last_seq), (Some(1), Some(18)));
        assert_eq!(report.signatures_checked, signed);
        // Without the key the signatures are simply not checked.
        assert_ok(&verify(dir.path(), None));
    }
}

#[test]
fn unsigned_store_fails_verification_with_a_key() {
    let dir = tempfile::tempdir().unwrap();
    standard_store(dir.path(), false);
    let report = verify(dir.path(), Some(&verifying_key()));
    let b = report.first_break.unwrap();
    assert_eq!(b.kind, BreakKind::SealUnsigned);
    assert_eq!(b.segment.as_deref(), Some(seg_name(1).as_str()));
    assert_eq!(b.line, Some(6));
}

#[test]
fn empty_and_fresh_directories_verify() {
    let dir = tempfile::tempdir().unwrap();
    assert_ok(&verify(dir.path(), None));
    let clock = ManualClock::new(START_MS);
    let (store, _) = Store::open(dir.path(), options(&clock, true)).unwrap();
    assert_eq!(store.next_seq(), 1);
    let report = verify(dir.path(), Some(&verifying_key()));
    assert_ok(&report);
    assert_eq!(report.records, 0);
}

#[test]
fn size_rotation_keeps_segments_under_the_limit_and_the_chain_whole() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let opts = StoreOptions {
        max_segment_bytes: 1024,
        ..options(&clock, true)
    };
    let (mut store, _) = Store::open(dir.path(), opts).unwrap();
    for n in 1..=60 {
        store.append(&event(n)).unwrap();
    }
    // A batch that crosses several segment boundaries is split between them.
    let batch: Vec<Vec<u8>> = (61..=100).map(event).collect();
    let refs = store
        .append_batch(&batch.iter().map(Vec::as_slice).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(
        refs.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (61..=100).collect::<Vec<_>>()
    );
    let report = verify(dir.path(), Some(&verifying_key()));
    assert_ok(&report);
    assert_eq!(report.records, 100);
    assert!(report.segments > 10, "{} segments", report.segments);
    assert_eq!(report.sealed_segments + 1, report.segments);
    for entry in std::fs::read_dir(dir.path()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_name().to_string_lossy().starts_with("segment-") {
            assert!(entry.metadata().unwrap().len() <= 1024 + 512);
        }
    }
}

#[test]
fn age_rotation_on_append_and_on_timer() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let opts = StoreOptions {
        max_segment_age_ms: 60_000,
        ..options(&clock, true)
    };
    let (mut store, _) = Store::open(dir.path(), opts).unwrap();
    store.append(&event(1)).unwrap();
    clock.advance(59_999);
    store.append(&event(2)).unwrap();
    assert_eq!(store.open_segment(), Some(seg(dir.path(), 1).as_path()));
    clock.advance(1);
    store.append(&event(3)).unwrap();
    assert_eq!(store.open_segment(), Some(seg(dir.path(), 3).as_path()));

    // An idle segment is sealed by the timer, not left open until the next event.
    assert_eq!(store.rotate_if_due(clock.now() + 59_999).unwrap(), None);
    let seal = store.rotate_if_due(clock.now() + 60_000).unwrap().unwrap();
    assert_eq!((seal.first_seq, seal.last_seq, seal.count), (3, 3, 1));
    assert_eq!(store.open_segment(), None);
    assert_eq!(store.rotate_if_due(clock.now() + 120_000).unwrap(), None);
    store.append(&event(4)).unwrap();
    assert_eq!(store.open_segment(), Some(seg(dir.path(), 4).as_path()));

    let report = verify(dir.path(), Some(&verifying_key()));
    assert_ok(&report);
    assert_eq!((report.segments, report.records), (3, 4));
}

#[test]
fn reopening_continues_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    let (mut store, notes) = Store::open(dir.path(), options(&clock, true)).unwrap();
    assert_eq!(notes, vec![]);
    assert_eq!(store.next_seq(), 19);
    assert_eq!(store.append(&event(19)).unwrap().seq, 19);
    store.seal_current().unwrap().unwrap();
    drop(store);
    // Newest segment sealed: the next append starts a new one.
    let (mut store, _) = Store::open(dir.path(), options(&clock, true)).unwrap();
    assert_eq!(store.open_segment(), None);
    assert_eq!(store.append(&event(20)).unwrap().seq, 20);
    assert_eq!(store.open_segment(), Some(seg(dir.path(), 20).as_path()));
    let report = verify(dir.path(), Some(&verifying_key()));
    assert_ok(&report);
    assert_eq!(report.records, 20);
}

#[test]
fn a_second_writer_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (_store, _) = Store::open(dir.path(), options(&clock, false)).unwrap();
    let second = Store::open(dir.path(), options(&clock, false));
    assert!(
        matches!(second, Err(StoreError::Locked { .. })),
        "{second:?}"
    );
}

#[test]
fn events_that_would_not_read_back_are_rejected_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let opts = StoreOptions {
        max_event_bytes: 64,
        ..options(&clock, false)
    };
    let (mut store, _) = Store::open(dir.path(), opts).unwrap();
    let cases: &[(&str, &[u8])] = &[
        ("empty", b""),
        ("newline", b"{\"a\":\n1}"),
        ("carriage return", b"{\"a\":\r1}"),
        ("leading space", b" {}"),
        ("trailing space", b"{} "),
        ("not JSON", b"{nope}"),
        ("two values", b"{} {}"),
        ("not UTF-8", b"\"\xff\""),
        ("too large", &[b'1'; 65]),
    ];
    for (name, bad) in cases {
        let batch: Vec<&[u8]> = vec![b"{\"ok\":1}", bad];
        match store.append_batch(&batch) {
            Err(StoreError::EventRejected { index: 1, .. }) => {}
            other => panic!("{name}: {other:?}"),
        }
    }
    // Nothing was written, and the store is still usable.
    assert_eq!(store.next_seq(), 1);
    assert_eq!(store.append(b"{\"ok\":1}").unwrap().seq, 1);
    assert_eq!(store.append(b"[1, 2,\t3]").unwrap().seq, 2);
    assert_ok(&verify(dir.path(), None));
}

#[test]
fn encoded_events_are_stored_byte_for_byte_and_still_size_checked() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let opts = StoreOptions {
        max_event_bytes: 96,
        ..options(&clock, false)
    };
    let (mut store, _) = Store::open(dir.path(), opts).unwrap();
    let events: Vec<EncodedEvent> = [
        serde_json::json!({"event": "statement.executed", "statement": "SELECT 1;\n-- two lines"}),
        serde_json::json!({"nested": [[{"a": null}]], "quote": "\"", "unicode": "é✓"}),
    ]
    .iter()
    .map(|v| EncodedEvent::encode(v).unwrap())
    .collect();
    store.append_batch_buffered(&events).unwrap();
    store.sync().unwrap();
    let too_large = EncodedEvent::encode(&serde_json::json!({"x": "y".repeat(100)})).unwrap();
    match store.append_batch(&[&events[0], &too_large]) {
        Err(StoreError::EventRejected { index: 1, reason }) => {
            assert!(reason.contains("limit"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_ok(&verify(dir.path(), None));
    let read: Vec<Vec<u8>> = portcullis_audit_store::Reader::all(dir.path())
        .unwrap()
        .map(|r| r.unwrap().event.into_bytes())
        .collect();
    let written: Vec<Vec<u8>> = events.iter().map(|e| e.as_bytes().to_vec()).collect();
    assert_eq!(read, written);
}

#[test]
fn deeply_nested_events_are_either_rejected_or_read_back() {
    let dir = tempfile::tempdir().unwrap();
    let clock = ManualClock::new(START_MS);
    let (mut store, _) = Store::open(dir.path(), options(&clock, false)).unwrap();
    let mut accepted = 0;
    for depth in [1, 126, 127, 128, 129, 1000] {
        let nested = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
        match store.append(nested.as_bytes()) {
            Ok(_) => accepted += 1,
            Err(StoreError::EventRejected { .. }) => {}
            Err(e) => panic!("depth {depth}: {e}"),
        }
    }
    assert!(accepted >= 1);
    assert_ok(&verify(dir.path(), None));
    let read = portcullis_audit_store::Reader::all(dir.path())
        .unwrap()
        .count();
    assert_eq!(read, accepted);
}

/// How a tampering row changes the standard store.
type Tamper = fn(&Path);

struct Row {
    name: &'static str,
    tamper: Tamper,
    /// Only meaningful on a signed store (verified with the key).
    signed_only: bool,
    kind: BreakKind,
    segment: u64,
    line: Option<u64>,
    seq: Option<u64>,
}

fn rehash_with_event(line: &str, new_event: &[u8]) -> String {
    let Line::Record(record) = parse_line(line.as_bytes()).unwrap() else {
        panic!("not a record line");
    };
    let view = RecordView {
        event: new_event,
        hash: portcullis_audit_store::format::record_hash(
            &record.prev,
            record.seq,
            record.time_ms,
            new_event,
        ),
        ..record
    };
    let mut out = Vec::new();
    encode_record_line(&mut out, &view);
    String::from_utf8(out).unwrap().trim_end().to_owned()
}

fn forge_signature(line: &str) -> String {
    let Line::Seal(mut seal) = parse_line(line.as_bytes()).unwrap() else {
        panic!("not a seal line");
    };
    seal.sign(&SigningKey::from_bytes(&[9; 32]));
    let mut out = Vec::new();
    portcullis_audit_store::format::encode_seal_line(&mut out, &seal);
    String::from_utf8(out).unwrap().trim_end().to_owned()
}

fn tamper_rows() -> Vec<Row> {
    vec![
        Row {
            name: "edit one event byte",
            tamper: |d| edit_line(d, 6, 2, |l| l.replacen("hello 7", "hellp 7", 1)),
            signed_only: false,
            kind: BreakKind::RecordAltered,
            segment: 6,
            line: Some(2),
            seq: Some(7),
        },
        Row {
            name: "edit a record's time",
            tamper: |d| {
                edit_line(d, 6, 2, |l| {
                    l.replacen("\"time_ms\":1700000000007", "\"time_ms\":1600000000007", 1)
                })
            },
            signed_only: false,
            kind: BreakKind::RecordAltered,
            segment: 6,
            line: Some(2),
            seq: Some(7),
        },
        Row {
            name: "edit a record's hash",
            tamper: |d| edit_line(d, 6, 2, |l| flip_hex_field(l, "hash")),
            signed_only: false,
            kind: BreakKind::RecordAltered,
            segment: 6,
            line: Some(2),
            seq: Some(7),
        },
        Row {
            name: "edit a record's prev",
            tamper: |d| edit_line(d, 6, 2, |l| flip_hex_field(l, "prev")),
            signed_only: false,
            kind: BreakKind::ChainBroken,
            segment: 6,
            line: Some(2),
            seq: Some(7),
        },
        Row {
            name: "rewrite a record and recompute its own hash",
            tamper: |d| {
                edit_line(d, 6, 2, |l| {
                    rehash_with_event(l, br#"{"n":7,"msg":"nothing to see","user":"alice"}"#)
                })
            },
            signed_only: false,
            kind: BreakKind::ChainBroken,
            segment: 6,
            line: Some(3),
            seq: Some(8),
        },
        Row {
            name: "delete a middle record",
            tamper: |d| {
                let path = seg(d, 6);
                let mut all = lines(&path);
                all.remove(2);
                write_lines(&path, &all);
            },
            signed_only: false,
            kind: BreakKind::RecordMissing,
            segment: 6,
            line: Some(3),
            seq: Some(8),
        },
        Row {
            name: "swap two records",
            tamper: |d| {
                let path = seg(d, 6);
                let mut all = lines(&path);
                all.swap(1, 2);
                write_lines(&path, &all);
            },
            signed_only: false,
            kind: BreakKind::RecordsReordered,
            segment: 6,
            line: Some(2),
            seq: Some(7),
        },
        Row {
            name: "duplicate a record",
            tamper: |d| {
                let path = seg(d, 6);
                let mut all = lines(&path);
                let copy = all[1].clone();
                all.insert(2, copy);
                write_lines(&path, &all);
            },
            signed_only: false,
            kind: BreakKind::RecordRepeated,
            segment: 6,
            line: Some(3),
            seq: Some(7),
        },
        Row {
            name: "truncate a sealed segment mid-record",
            tamper: |d| {
                let path = seg(d, 6);
                let all = lines(&path);
                let keep: usize = all[..3].iter().map(|l| l.len() + 1).sum::<usize>() + 40;
                let bytes = std::fs::read(&path).unwrap();
                std::fs::write(&path, &bytes[..keep]).unwrap();
            },
            signed_only: false,
            kind: BreakKind::Truncated,
            segment: 6,
            line: Some(4),
            seq: Some(9),
        },
        Row {
            name: "truncate the open segment mid-record",
            tamper: |d| {
                let path = seg(d, 16);
                let bytes = std::fs::read(&path).unwrap();
                std::fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
            },
            signed_only: false,
            kind: BreakKind::Truncated,
            segment: 16,
            line: Some(3),
            seq: Some(18),
        },
        Row {
            name: "delete a whole middle segment",
            tamper: |d| std::fs::remove_file(seg(d, 6)).unwrap(),
            signed_only: false,
            kind: BreakKind::SegmentMissing,
            segment: 11,
            line: None,
            seq: Some(6),
        },
        Row {
            name: "delete the oldest segment without a prune",
            tamper: |d| std::fs::remove_file(seg(d, 1)).unwrap(),
            signed_only: false,
            kind: BreakKind::SegmentMissing,
            segment: 6,
            line: None,
            seq: Some(1),
        },
        Row {
            name: "swap the contents of two segments",
            tamper: |d| {
                let a = std::fs::read(seg(d, 1)).unwrap();
                let b = std::fs::read(seg(d, 6)).unwrap();
                std::fs::write(seg(d, 1), b).unwrap();
                std::fs::write(seg(d, 6), a).unwrap();
            },
            signed_only: false,
            kind: BreakKind::SegmentOutOfPlace,
            segment: 1,
            line: Some(1),
            seq: Some(6),
        },
        Row {
            name: "rename a later segment into a removed one's place",
            tamper: |d| {
                std::fs::remove_file(seg(d, 6)).unwrap();
                std::fs::rename(seg(d, 11), seg(d, 6)).unwrap();
            },
            signed_only: false,
            kind: BreakKind::SegmentOutOfPlace,
            segment: 6,
            line: Some(1),
            seq: Some(11),
        },
        Row {
            name: "remove a seal",
            tamper: |d| {
                let path = seg(d, 6);
                let mut all = lines(&path);
                all.pop();
                write_lines(&path, &all);
            },
            signed_only: false,
            kind: BreakKind::SealMissing,
            segment: 6,
            line: None,
            seq: Some(11),
        },
        Row {
            name: "remove a seal and the records before it",
            tamper: |d| {
                let path = seg(d, 6);
                let mut all = lines(&path);
                all.truncate(3);
                write_lines(&path, &all);
            },
            signed_only: false,
            kind: BreakKind::SealMissing,
            segment: 6,
            line: None,
            seq: Some(9),
        },
        Row {
            name: "edit a seal's final hash",
            tamper: |d| edit_line(d, 6, 6, |l| flip_hex_field(l, "final_hash")),
            signed_only: false,
            kind: BreakKind::SealMismatch,
            segment: 6,
            line: Some(6),
            seq: Some(10),
        },
        Row {
            name: "add a record after a seal",
            tamper: |d| {
                let path = seg(d, 6);
                let mut all = lines(&path);
                let extra = all[0].clone();
                all.push(extra);
                write_lines(&path, &all);
            },
            signed_only: false,
            kind: BreakKind::DataAfterSeal,
            segment: 6,
            line: Some(7),
            seq: None,
        },
        Row {
            name: "reformat a record's JSON",
            tamper: |d| edit_line(d, 11, 1, |l| l.replacen("\"seq\":11", "\"seq\": 11", 1)),
            signed_only: false,
            kind: BreakKind::Malformed,
            segment: 11,
            line: Some(1),
            seq: Some(11),
        },
        Row {
            name: "forge a seal signature with another key",
            tamper: |d| edit_line(d, 6, 6, forge_signature),
            signed_only: true,
            kind: BreakKind::SealSignatureInvalid,
            segment: 6,
            line: Some(6),
            seq: Some(10),
        },
        Row {
            name: "flip a byte of a seal signature",
            tamper: |d| edit_line(d, 6, 6, |l| flip_hex_field(l, "sig")),
            signed_only: true,
            kind: BreakKind::SealSignatureInvalid,
            segment: 6,
            line: Some(6),
            seq: Some(10),
        },
        Row {
            name: "strip a seal signature",
            tamper: |d| {
                edit_line(d, 6, 6, |l| {
                    let sig = hex_field(l, "sig");
                    l.replacen(&format!(",\"sig\":\"{sig}\""), "", 1)
                })
            },
            signed_only: true,
            kind: BreakKind::SealUnsigned,
            segment: 6,
            line: Some(6),
            seq: Some(10),
        },
        Row {
            name: "rewrite the newest segments consistently without the key",
            tamper: |d| {
                let forger = tempfile::tempdir().unwrap();
                standard_store_with(forger.path(), Some(SigningKey::from_bytes(&[9; 32])), |n| {
                    if n > 10 {
                        format!(r#"{{"n":{n},"msg":"forged"}}"#).into_bytes()
                    } else {
                        event(n)
                    }
                });
                for first in [11, 16] {
                    std::fs::copy(seg(forger.path(), first), seg(d, first)).unwrap();
                }
            },
            signed_only: true,
            kind: BreakKind::SealSignatureInvalid,
            segment: 11,
            line: Some(6),
            seq: Some(15),
        },
    ]
}

#[test]
fn every_kind_of_tampering_is_named_where_it_happened() {
    for row in tamper_rows() {
        let modes: &[bool] = if row.signed_only {
            &[true]
        } else {
            &[false, true]
        };
        for &signed in modes {
            let dir = tempfile::tempdir().unwrap();
            standard_store(dir.path(), signed);
            assert_ok(&verify(dir.path(), signed.then(verifying_key).as_ref()));
            (row.tamper)(dir.path());
            let report = verify(dir.path(), signed.then(verifying_key).as_ref());
            let Some(b) = report.first_break.clone() else {
                panic!("{} (signed: {signed}): not detected", row.name);
            };
            let context = format!("{} (signed: {signed}): {b}", row.name);
            assert!(!report.ok, "{context}");
            assert_eq!(b.kind, row.kind, "{context}");
            assert_eq!(b.segment, Some(seg_name(row.segment)), "{context}");
            assert_eq!(b.line, row.line, "{context}");
            assert_eq!(b.seq, row.seq, "{context}");
            assert!(!b.message.is_empty());
        }
    }
}
