//! The reader walks records in order across segments from any seq, with the exact event bytes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod common;

use common::*;
use portcullis_audit_store::{Reader, StoreError};
use std::fs::OpenOptions;
use std::io::Write;

#[test]
fn reads_from_every_seq_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    standard_store(dir.path(), true);
    for from in 0..=20u64 {
        let records: Vec<_> = Reader::from_seq(dir.path(), from)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let expected: Vec<u64> = (from.max(1)..=18).collect();
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            expected,
            "from {from}"
        );
        for record in &records {
            assert_eq!(record.event.as_bytes(), event(record.seq).as_slice());
            assert_eq!(record.time_ms, START_MS + record.seq);
        }
        for pair in records.windows(2) {
            assert_eq!(pair[1].prev, pair[0].hash);
        }
    }
}

#[test]
fn an_empty_directory_reads_nothing() {
    let dir = tempfile::tempdir().unwrap();
    assert_eq!(Reader::all(dir.path()).unwrap().count(), 0);
    assert_eq!(Reader::from_seq(dir.path(), 5).unwrap().count(), 0);
}

#[test]
fn a_partial_line_being_written_ends_the_read_quietly() {
    let dir = tempfile::tempdir().unwrap();
    standard_store(dir.path(), true);
    let mut file = OpenOptions::new()
        .append(true)
        .open(seg(dir.path(), 16))
        .unwrap();
    file.write_all(b"{\"seq\":19,\"ti").unwrap();
    let seqs: Vec<u64> = Reader::from_seq(dir.path(), 15)
        .unwrap()
        .map(|r| r.unwrap().seq)
        .collect();
    assert_eq!(seqs, [15, 16, 17, 18]);
}

#[test]
fn a_tampered_record_stops_the_read_with_its_place() {
    let dir = tempfile::tempdir().unwrap();
    standard_store(dir.path(), true);
    edit_line(dir.path(), 6, 3, |l| l.replacen("hello 8", "hellp 8", 1));
    let results: Vec<_> = Reader::from_seq(dir.path(), 4).unwrap().collect();
    assert_eq!(results.len(), 5, "4, 5, 6, 7 then the error");
    assert_eq!(results[3].as_ref().unwrap().seq, 7);
    match &results[4] {
        Err(StoreError::Corrupt { segment, line, .. }) => {
            assert_eq!(*segment, seg(dir.path(), 6));
            assert_eq!(*line, Some(3));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_missing_segment_stops_the_read() {
    let dir = tempfile::tempdir().unwrap();
    standard_store(dir.path(), true);
    std::fs::remove_file(seg(dir.path(), 6)).unwrap();
    let results: Vec<_> = Reader::from_seq(dir.path(), 1).unwrap().collect();
    assert_eq!(results.len(), 6);
    assert!(matches!(results[5], Err(StoreError::Corrupt { .. })));
}
