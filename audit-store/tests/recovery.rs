//! After a crash, `open` cuts a torn tail, says so, and the chain continues and verifies.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod common;

use common::*;
use portcullis_audit_store::{verify, BreakKind, IntegrityNote, Reader, Store, StoreError};
use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

fn append_raw(path: &Path, bytes: &[u8]) {
    let mut file = OpenOptions::new().append(true).open(path).unwrap();
    file.write_all(bytes).unwrap();
}

fn assert_verifies(dir: &Path) {
    let report = verify(dir, Some(&verifying_key()));
    assert!(report.ok, "{}", report.first_break.unwrap());
}

/// Reopens, appends one more event and checks it lands at `expected_seq` and verifies.
fn continue_chain(dir: &Path, clock: &ManualClock, expected_seq: u64) {
    let (mut store, notes) = Store::open(dir, options(clock, true)).unwrap();
    assert_eq!(notes, vec![], "a second open finds nothing more to repair");
    assert_eq!(
        store.append(&event(expected_seq)).unwrap().seq,
        expected_seq
    );
    assert_verifies(dir);
    let seqs: Vec<u64> = Reader::all(dir).unwrap().map(|r| r.unwrap().seq).collect();
    assert_eq!(seqs, (1..=expected_seq).collect::<Vec<_>>());
}

#[test]
fn torn_partial_line_is_cut_on_open_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    let torn = b"{\"seq\":19,\"time_ms\":17000";
    append_raw(&seg(dir.path(), 16), torn);
    let before = verify(dir.path(), Some(&verifying_key()));
    assert_eq!(before.first_break.unwrap().kind, BreakKind::Truncated);

    let (store, notes) = Store::open(dir.path(), options(&clock, true)).unwrap();
    assert_eq!(
        notes,
        vec![IntegrityNote::Recovered {
            segment: seg(dir.path(), 16),
            line: 4,
            truncated_bytes: torn.len() as u64,
            quarantined: None,
            reason: format!("partial line of {} bytes without newline", torn.len()),
        }]
    );
    assert_eq!(store.next_seq(), 19);
    drop(store);
    assert_verifies(dir.path());
    continue_chain(dir.path(), &clock, 19);
}

#[test]
fn complete_bad_line_at_the_tail_is_cut_and_quarantined() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    let path = seg(dir.path(), 16);
    let last = lines(&path).pop().unwrap();
    let bad = format!("{}\n", flip_hex_field(&last, "hash"));
    append_raw(&path, bad.as_bytes());

    let (_store, notes) = Store::open(dir.path(), options(&clock, true)).unwrap();
    let [IntegrityNote::Recovered {
        line,
        truncated_bytes,
        quarantined: Some(quarantine),
        ..
    }] = notes.as_slice()
    else {
        panic!("{notes:?}");
    };
    assert_eq!((*line, *truncated_bytes), (4, bad.len() as u64));
    assert_eq!(std::fs::read(quarantine).unwrap(), bad.as_bytes());
    drop(_store);
    continue_chain(dir.path(), &clock, 19);
}

#[test]
fn damage_inside_the_open_segment_cuts_from_there_and_keeps_the_rest_aside() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    edit_line(dir.path(), 16, 2, |l| l.replacen("hello 17", "hellp 17", 1));
    let path = seg(dir.path(), 16);
    let original_tail: String = lines(&path)[1..].iter().map(|l| format!("{l}\n")).collect();

    let (store, notes) = Store::open(dir.path(), options(&clock, true)).unwrap();
    let [IntegrityNote::Recovered {
        line: 2,
        quarantined: Some(quarantine),
        ..
    }] = notes.as_slice()
    else {
        panic!("{notes:?}");
    };
    assert_eq!(std::fs::read_to_string(quarantine).unwrap(), original_tail);
    assert_eq!(store.next_seq(), 17);
    drop(store);
    continue_chain(dir.path(), &clock, 17);
}

#[test]
fn torn_first_record_of_a_new_segment_removes_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    {
        let (mut store, _) = Store::open(dir.path(), options(&clock, true)).unwrap();
        store.seal_current().unwrap().unwrap();
    }
    let path = seg(dir.path(), 19);
    std::fs::write(&path, b"{\"seq\":19,\"ti").unwrap();

    let (store, notes) = Store::open(dir.path(), options(&clock, true)).unwrap();
    assert!(
        matches!(
            notes.as_slice(),
            [
                IntegrityNote::Recovered { line: 1, truncated_bytes: 13, .. },
                IntegrityNote::RemovedEmptySegment { segment },
            ] if *segment == path
        ),
        "{notes:?}"
    );
    assert!(!path.exists());
    assert_eq!(store.next_seq(), 19);
    drop(store);
    continue_chain(dir.path(), &clock, 19);
}

#[test]
fn empty_newest_segment_file_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    {
        let (mut store, _) = Store::open(dir.path(), options(&clock, true)).unwrap();
        store.seal_current().unwrap().unwrap();
    }
    std::fs::write(seg(dir.path(), 19), b"").unwrap();
    let (_store, notes) = Store::open(dir.path(), options(&clock, true)).unwrap();
    assert_eq!(
        notes,
        vec![IntegrityNote::RemovedEmptySegment {
            segment: seg(dir.path(), 19)
        }]
    );
    drop(_store);
    continue_chain(dir.path(), &clock, 19);
}

#[test]
fn torn_seal_line_reopens_the_segment() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    let path = seg(dir.path(), 16);
    let intact = std::fs::read(&path).unwrap();
    {
        let (mut store, _) = Store::open(dir.path(), options(&clock, true)).unwrap();
        store.seal_current().unwrap().unwrap();
    }
    let sealed = std::fs::read(&path).unwrap();
    std::fs::write(&path, &sealed[..intact.len() + 30]).unwrap();

    let (store, notes) = Store::open(dir.path(), options(&clock, true)).unwrap();
    assert!(
        matches!(
            notes.as_slice(),
            [IntegrityNote::Recovered {
                line: 4,
                truncated_bytes: 30,
                ..
            }]
        ),
        "{notes:?}"
    );
    assert_eq!(store.open_segment(), Some(path.as_path()));
    drop(store);
    assert_eq!(std::fs::read(&path).unwrap(), intact);
    continue_chain(dir.path(), &clock, 19);
}

#[test]
fn a_misplaced_newest_segment_is_refused_not_cut() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    std::fs::rename(seg(dir.path(), 16), seg(dir.path(), 17)).unwrap();
    let opened = Store::open(dir.path(), options(&clock, true));
    assert!(
        matches!(opened, Err(StoreError::Corrupt { line: Some(1), .. })),
        "{opened:?}"
    );
    assert!(seg(dir.path(), 17).exists());
}

#[test]
fn an_unsealed_older_segment_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    let path = seg(dir.path(), 6);
    let mut all = lines(&path);
    all.pop();
    write_lines(&path, &all);
    let opened = Store::open(dir.path(), options(&clock, true));
    assert!(
        matches!(opened, Err(StoreError::Corrupt { .. })),
        "{opened:?}"
    );
}

#[test]
fn enabling_a_key_does_not_cut_an_older_unsigned_seal() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), false);
    {
        let (mut store, _) = Store::open(dir.path(), options(&clock, false)).unwrap();
        store.seal_current().unwrap().unwrap();
    }
    let before = std::fs::read(seg(dir.path(), 16)).unwrap();
    let (mut store, notes) = Store::open(dir.path(), options(&clock, true)).unwrap();
    assert_eq!(notes, vec![]);
    assert_eq!(std::fs::read(seg(dir.path(), 16)).unwrap(), before);
    assert_eq!(store.append(&event(19)).unwrap().seq, 19);
    store.seal_current().unwrap().unwrap();
    // Without a key the whole chain verifies; with one, the old unsigned seals are named.
    assert!(verify(dir.path(), None).ok);
    let b = verify(dir.path(), Some(&verifying_key()))
        .first_break
        .unwrap();
    assert_eq!(
        (b.kind, b.segment),
        (BreakKind::SealUnsigned, Some(seg_name(1)))
    );
}
