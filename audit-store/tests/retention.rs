//! Retention deletes old segments oldest first, but never anything unshipped, never the newest
//! segment, and never so that the kept chain stops verifying.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod common;

use common::*;
use portcullis_audit_store::{
    verify, BreakKind, IntegrityNote, Reader, Retention, Store, StoreError,
};

struct Row {
    name: &'static str,
    retention: Retention,
    shipped_upto: u64,
    /// Milliseconds after `START_MS`; the standard store seals at 1000, 2000 and 3000.
    now: u64,
    deleted: &'static [u64],
    blocked: bool,
}

const ALL_BY_SIZE: Retention = Retention {
    max_age_ms: None,
    max_total_bytes: Some(0),
};

const BY_AGE: Retention = Retention {
    max_age_ms: Some(1500),
    max_total_bytes: None,
};

fn rows() -> Vec<Row> {
    vec![
        Row {
            name: "nothing shipped: nothing deleted however full",
            retention: ALL_BY_SIZE,
            shipped_upto: 0,
            now: 10_000,
            deleted: &[],
            blocked: true,
        },
        Row {
            name: "shipped into the middle of a segment: that segment stays",
            retention: ALL_BY_SIZE,
            shipped_upto: 7,
            now: 10_000,
            deleted: &[1],
            blocked: true,
        },
        Row {
            name: "shipped to a segment boundary",
            retention: ALL_BY_SIZE,
            shipped_upto: 10,
            now: 10_000,
            deleted: &[1, 6],
            blocked: true,
        },
        Row {
            name: "everything shipped: the open segment still stays",
            retention: ALL_BY_SIZE,
            shipped_upto: u64::MAX,
            now: 10_000,
            deleted: &[1, 6, 11],
            blocked: false,
        },
        Row {
            name: "by age: only segments sealed long enough ago",
            retention: BY_AGE,
            shipped_upto: u64::MAX,
            now: 3600,
            deleted: &[1, 6],
            blocked: false,
        },
        Row {
            name: "by age but unshipped",
            retention: BY_AGE,
            shipped_upto: 5,
            now: 3600,
            deleted: &[1],
            blocked: true,
        },
        Row {
            name: "nothing old enough",
            retention: BY_AGE,
            shipped_upto: u64::MAX,
            now: 2000,
            deleted: &[],
            blocked: false,
        },
        Row {
            name: "no limits",
            retention: Retention::default(),
            shipped_upto: u64::MAX,
            now: 10_000,
            deleted: &[],
            blocked: false,
        },
        Row {
            name: "under the size limit",
            retention: Retention {
                max_age_ms: None,
                max_total_bytes: Some(1 << 30),
            },
            shipped_upto: u64::MAX,
            now: 10_000,
            deleted: &[],
            blocked: false,
        },
    ]
}

#[test]
fn retention_never_deletes_unshipped_records_or_the_newest_segment() {
    for row in rows() {
        let dir = tempfile::tempdir().unwrap();
        let clock = standard_store(dir.path(), true);
        let (mut store, _) = Store::open(dir.path(), options(&clock, true)).unwrap();
        let report = store
            .prune(&row.retention, row.shipped_upto, START_MS + row.now)
            .unwrap();
        let expected: Vec<_> = row.deleted.iter().map(|s| seg(dir.path(), *s)).collect();
        assert_eq!(report.deleted, expected, "{}", row.name);
        assert_eq!(report.blocked_by_unshipped, row.blocked, "{}", row.name);
        for first in [1, 6, 11, 16] {
            assert_eq!(
                seg(dir.path(), first).exists(),
                !row.deleted.contains(&first),
                "{}: segment {first}",
                row.name
            );
        }

        // What is kept still verifies, reads from its first record, and takes new records.
        let report = verify(dir.path(), Some(&verifying_key()));
        assert!(report.ok, "{}: {}", row.name, report.first_break.unwrap());
        let first_kept = [1, 6, 11, 16]
            .into_iter()
            .find(|s| !row.deleted.contains(s))
            .unwrap();
        assert_eq!(report.first_seq, Some(first_kept), "{}", row.name);
        assert_eq!(
            report.pruned_upto,
            (first_kept > 1).then(|| first_kept - 1),
            "{}",
            row.name
        );
        store.append(&event(19)).unwrap();
        drop(store);
        let (_store, notes) = Store::open(dir.path(), options(&clock, true)).unwrap();
        assert_eq!(notes, vec![], "{}", row.name);
        let seqs: Vec<u64> = Reader::all(dir.path())
            .unwrap()
            .map(|r| r.unwrap().seq)
            .collect();
        assert_eq!(seqs, (first_kept..=19).collect::<Vec<_>>(), "{}", row.name);
    }
}

#[test]
fn a_sealed_newest_segment_is_kept_too() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    let (mut store, _) = Store::open(dir.path(), options(&clock, true)).unwrap();
    store.seal_current().unwrap().unwrap();
    let report = store.prune(&ALL_BY_SIZE, u64::MAX, START_MS).unwrap();
    assert_eq!(report.deleted.len(), 3);
    assert!(seg(dir.path(), 16).exists());
    assert!(report.kept_bytes > 0);
    drop(store);
    let (mut store, _) = Store::open(dir.path(), options(&clock, true)).unwrap();
    assert_eq!(store.append(&event(19)).unwrap().seq, 19);
    assert!(verify(dir.path(), Some(&verifying_key())).ok);
}

#[test]
fn removing_the_oldest_kept_segment_after_a_prune_is_still_detected() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    let (mut store, _) = Store::open(dir.path(), options(&clock, true)).unwrap();
    store.prune(&ALL_BY_SIZE, 5, START_MS).unwrap();
    drop(store);
    std::fs::remove_file(seg(dir.path(), 6)).unwrap();
    let b = verify(dir.path(), Some(&verifying_key()))
        .first_break
        .unwrap();
    assert_eq!(b.kind, BreakKind::SegmentMissing);
    assert_eq!(b.segment, Some(seg_name(11)));
    assert_eq!(b.seq, Some(6));
}

#[test]
fn a_forged_anchor_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    let (mut store, _) = Store::open(dir.path(), options(&clock, true)).unwrap();
    store.prune(&ALL_BY_SIZE, 5, START_MS).unwrap();
    drop(store);
    let anchor = dir.path().join("anchor.jsonl");
    let text = std::fs::read_to_string(&anchor).unwrap();
    std::fs::write(&anchor, flip_hex_field(&text, "sig")).unwrap();
    let b = verify(dir.path(), Some(&verifying_key()))
        .first_break
        .unwrap();
    assert_eq!(b.kind, BreakKind::AnchorInvalid);
}

#[test]
fn an_interrupted_prune_is_finished_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    let oldest = std::fs::read(seg(dir.path(), 1)).unwrap();
    let (mut store, _) = Store::open(dir.path(), options(&clock, true)).unwrap();
    store.prune(&ALL_BY_SIZE, 10, START_MS).unwrap();
    drop(store);
    // As if the crash came after the anchor was written but before this file was removed.
    std::fs::write(seg(dir.path(), 1), oldest).unwrap();
    assert!(verify(dir.path(), Some(&verifying_key())).ok);

    let (_store, notes) = Store::open(dir.path(), options(&clock, true)).unwrap();
    assert_eq!(
        notes,
        vec![IntegrityNote::PruneCompleted {
            segment: seg(dir.path(), 1)
        }]
    );
    assert!(!seg(dir.path(), 1).exists());
}

#[test]
fn reading_from_a_pruned_seq_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    let (mut store, _) = Store::open(dir.path(), options(&clock, true)).unwrap();
    store.prune(&ALL_BY_SIZE, 10, START_MS).unwrap();
    drop(store);
    let err = Reader::from_seq(dir.path(), 3).err().unwrap();
    assert!(
        matches!(
            err,
            StoreError::Pruned {
                requested: 3,
                first_available: 11
            }
        ),
        "{err}"
    );
    assert_eq!(
        Reader::from_seq(dir.path(), 11)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .seq,
        11
    );
}
