//! Sealed segments compressed with zstd: read, verified and reopened like plain ones, tampering
//! with the compressed bytes named as such, and a crash between any two compression steps
//! losing nothing.

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
    compress_sealed, compressed_segment_file_name, verify, BreakKind, Reader, Retention, Store,
    VerifyReport,
};
use std::path::{Path, PathBuf};

fn zst(dir: &Path, first_seq: u64) -> PathBuf {
    dir.join(compressed_segment_file_name(first_seq))
}

fn all_events(dir: &Path) -> Vec<(u64, String)> {
    Reader::all(dir)
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            (r.seq, r.event)
        })
        .collect()
}

fn assert_ok(report: &VerifyReport, records: u64) {
    assert!(report.ok, "{:?}", report.first_break);
    assert_eq!(report.records, records);
    assert_eq!(report.last_seq, Some(records));
}

/// The standard store (sealed 1..=5, 6..=10, 11..=15, open 16..=18) with its sealed segments
/// compressed; returns the events as they read before compression.
fn compressed_store(dir: &Path) -> (ManualClock, Vec<(u64, String)>) {
    let clock = standard_store(dir, true);
    let before = all_events(dir);
    let done = compress_sealed(dir).unwrap();
    let paths: Vec<PathBuf> = done.iter().map(|c| c.path.clone()).collect();
    assert_eq!(paths, [zst(dir, 1), zst(dir, 6), zst(dir, 11)]);
    (clock, before)
}

#[test]
fn compressed_segments_read_verify_and_reopen_like_plain_ones() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, before) = compressed_store(dir.path());
    for first in [1, 6, 11] {
        assert!(!seg(dir.path(), first).exists(), "plain {first} removed");
        assert!(zst(dir.path(), first).exists());
    }
    assert!(seg(dir.path(), 16).exists(), "the open segment stays plain");
    assert!(
        compress_sealed(dir.path()).unwrap().is_empty(),
        "nothing left to do"
    );

    assert_eq!(all_events(dir.path()), before);
    let from_seven: Vec<u64> = Reader::from_seq(dir.path(), 7)
        .unwrap()
        .map(|r| r.unwrap().seq)
        .collect();
    assert_eq!(from_seven, (7..=18).collect::<Vec<_>>());
    assert_ok(&verify(dir.path(), Some(&verifying_key())), 18);

    // Reopening reads each compressed segment's seal from its trailer and continues the chain.
    let (mut store, notes) = Store::open(dir.path(), options(&clock, true)).unwrap();
    assert!(notes.is_empty(), "{notes:?}");
    assert_eq!(store.next_seq(), 19);
    store.append(&event(19)).unwrap();
    store.seal_current().unwrap().unwrap();
    store.append(&event(20)).unwrap();
    drop(store);
    assert_eq!(compress_sealed(dir.path()).unwrap().len(), 1, "16..=19");
    assert_ok(&verify(dir.path(), Some(&verifying_key())), 20);
    assert_eq!(all_events(dir.path()).len(), 20);
}

#[test]
fn a_compressed_newest_segment_is_sealed_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), false);
    let (mut store, _) = Store::open(dir.path(), options(&clock, false)).unwrap();
    store.seal_current().unwrap().unwrap();
    drop(store);
    // A crash right after the next segment was created leaves it empty: 16..=18 is then not
    // the newest, so it is compressed, and the empty one is removed on open.
    std::fs::write(seg(dir.path(), 19), b"").unwrap();
    assert_eq!(compress_sealed(dir.path()).unwrap().len(), 4);
    let (mut store, notes) = Store::open(dir.path(), options(&clock, false)).unwrap();
    assert_eq!(notes.len(), 1, "{notes:?}");
    assert_eq!(store.next_seq(), 19);
    store.append(&event(19)).unwrap();
    drop(store);
    assert_ok(&verify(dir.path(), None), 19);
}

/// Decompressed lines of a compressed segment and its trailer, to forge a recompressed copy.
fn recompress(path: &Path, edit: impl FnOnce(Vec<u8>) -> Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let plain = zstd::stream::decode_all(&bytes[..]).unwrap();
    let frame_len = bytes.len() - trailer_len(&bytes);
    let trailer = bytes[frame_len..].to_vec();
    let mut out = zstd::stream::encode_all(&edit(plain)[..], 3).unwrap();
    out.extend_from_slice(&trailer);
    std::fs::write(path, out).unwrap();
}

/// The length of the skippable frame at the end: 8 header bytes and the seal line.
fn trailer_len(bytes: &[u8]) -> usize {
    let at = bytes
        .windows(4)
        .rposition(|w| w == [0x5e, 0x2a, 0x4d, 0x18])
        .unwrap();
    bytes.len() - at
}

struct Row {
    name: &'static str,
    tamper: fn(&Path),
    kind: BreakKind,
    /// The trailer is only what `open` reads instead of decompressing: a reader reads the
    /// lines, which are intact when only the trailer was touched.
    lines_damaged: bool,
}

fn rows() -> Vec<Row> {
    vec![
        Row {
            name: "a byte of the compressed data flipped",
            tamper: |p| {
                let mut b = std::fs::read(p).unwrap();
                let at = (b.len() - trailer_len(&b)) / 2;
                b[at] ^= 0x01;
                std::fs::write(p, b).unwrap();
            },
            lines_damaged: true,
            kind: BreakKind::CompressedCorrupt,
        },
        Row {
            name: "cut inside the compressed data",
            tamper: |p| {
                let b = std::fs::read(p).unwrap();
                std::fs::write(p, &b[..(b.len() - trailer_len(&b)) / 2]).unwrap();
            },
            lines_damaged: true,
            kind: BreakKind::CompressedCorrupt,
        },
        Row {
            name: "the seal trailer cut off",
            tamper: |p| {
                let b = std::fs::read(p).unwrap();
                std::fs::write(p, &b[..b.len() - trailer_len(&b)]).unwrap();
            },
            lines_damaged: false,
            kind: BreakKind::CompressedCorrupt,
        },
        Row {
            name: "the seal trailer's final hash edited",
            tamper: |p| {
                let b = std::fs::read(p).unwrap();
                let text_at = b.len() - trailer_len(&b) + 8;
                let line = String::from_utf8(b[text_at..].to_vec()).unwrap();
                let edited = flip_hex_field(&line, "final_hash");
                let mut out = b[..text_at].to_vec();
                out.extend_from_slice(edited.as_bytes());
                std::fs::write(p, out).unwrap();
            },
            lines_damaged: false,
            kind: BreakKind::CompressedCorrupt,
        },
        Row {
            name: "garbage appended",
            tamper: |p| {
                let mut b = std::fs::read(p).unwrap();
                b.extend_from_slice(b"garbage");
                std::fs::write(p, b).unwrap();
            },
            lines_damaged: true,
            kind: BreakKind::CompressedCorrupt,
        },
        Row {
            name: "an event edited and the segment recompressed",
            tamper: |p| {
                recompress(p, |plain| {
                    String::from_utf8(plain)
                        .unwrap()
                        .replacen("hello 7", "hello 8", 1)
                        .into_bytes()
                })
            },
            lines_damaged: true,
            kind: BreakKind::RecordAltered,
        },
        Row {
            name: "a record removed and the segment recompressed",
            tamper: |p| {
                recompress(p, |plain| {
                    let text = String::from_utf8(plain).unwrap();
                    let kept: Vec<&str> = text.lines().filter(|l| !l.contains("hello 8")).collect();
                    (kept.join("\n") + "\n").into_bytes()
                })
            },
            lines_damaged: true,
            kind: BreakKind::RecordMissing,
        },
        Row {
            name: "not zstd at all",
            tamper: |p| std::fs::write(p, b"{\"seq\":6}\n").unwrap(),
            lines_damaged: true,
            kind: BreakKind::CompressedCorrupt,
        },
    ]
}

#[test]
fn tampering_with_a_compressed_segment_is_named_not_a_crash() {
    for row in rows() {
        let dir = tempfile::tempdir().unwrap();
        compressed_store(dir.path());
        (row.tamper)(&zst(dir.path(), 6));
        let report = verify(dir.path(), Some(&verifying_key()));
        let found = report
            .first_break
            .unwrap_or_else(|| panic!("{}: not detected", row.name));
        assert_eq!(found.kind, row.kind, "{}: {found}", row.name);
        assert_eq!(
            found.segment.as_deref(),
            Some(compressed_segment_file_name(6).as_str()),
            "{}",
            row.name
        );
        // The reader stops with an error at the same segment, never panics or reads past it.
        let read: Vec<_> = Reader::all(dir.path()).unwrap().collect();
        if row.lines_damaged {
            assert!(
                read.last().unwrap().is_err(),
                "{}: the reader did not fail",
                row.name
            );
            assert!(read.len() <= 11, "{}: read past the damage", row.name);
        } else {
            assert!(read.iter().all(Result::is_ok), "{}", row.name);
        }
    }
}

#[test]
fn a_crash_between_compression_steps_loses_nothing() {
    // Each state a crash can leave, built by hand from a finished compression.
    let dir = tempfile::tempdir().unwrap();
    let clock = standard_store(dir.path(), true);
    let plain6 = std::fs::read(seg(dir.path(), 6)).unwrap();
    let before = all_events(dir.path());
    compress_sealed(dir.path()).unwrap();
    let zst6 = std::fs::read(zst(dir.path(), 6)).unwrap();
    let tmp6 = dir
        .path()
        .join(format!("{}.tmp", compressed_segment_file_name(6)));

    type State = (&'static str, fn(&Path, &[u8], &[u8], &Path));
    let states: [State; 4] = [
        (
            "crash while writing the temporary file",
            |d, plain, zst, tmp| {
                std::fs::remove_file(zst_path(d)).unwrap();
                std::fs::write(seg(d, 6), plain).unwrap();
                std::fs::write(tmp, &zst[..zst.len() / 3]).unwrap();
            },
        ),
        (
            "crash after the fsync, before the rename",
            |d, plain, zst, tmp| {
                std::fs::remove_file(zst_path(d)).unwrap();
                std::fs::write(seg(d, 6), plain).unwrap();
                std::fs::write(tmp, zst).unwrap();
            },
        ),
        (
            "crash after the rename, before the plain file's removal",
            |d, plain, _, _| {
                std::fs::write(seg(d, 6), plain).unwrap();
            },
        ),
        (
            "both files, the compressed one damaged",
            |d, plain, zst, _| {
                std::fs::write(seg(d, 6), plain).unwrap();
                std::fs::write(zst_path(d), &zst[..zst.len() / 2]).unwrap();
            },
        ),
    ];
    fn zst_path(d: &Path) -> PathBuf {
        d.join(compressed_segment_file_name(6))
    }
    for (name, crash) in states {
        crash(dir.path(), &plain6, &zst6, &tmp6);
        assert_ok(&verify(dir.path(), Some(&verifying_key())), 18);
        assert_eq!(all_events(dir.path()), before, "{name}");
        let (store, notes) = Store::open(dir.path(), options(&clock, true)).unwrap();
        assert!(notes.is_empty(), "{name}: {notes:?}");
        assert_eq!(store.next_seq(), 19, "{name}");
        drop(store);
        // The next pass finishes the job.
        let done = compress_sealed(dir.path()).unwrap();
        assert_eq!(done.len(), 1, "{name}");
        assert!(!seg(dir.path(), 6).exists(), "{name}");
        assert!(!tmp6.exists(), "{name}");
        assert_eq!(std::fs::read(zst(dir.path(), 6)).unwrap(), zst6, "{name}");
        assert_ok(&verify(dir.path(), Some(&verifying_key())), 18);
        assert_eq!(all_events(dir.path()), before, "{name}");
    }
}

#[test]
fn retention_counts_and_deletes_compressed_segments() {
    let dir = tempfile::tempdir().unwrap();
    let (clock, _) = compressed_store(dir.path());
    let on_disk = |first: u64| std::fs::metadata(zst(dir.path(), first)).unwrap().len();
    let compressed_total = on_disk(1) + on_disk(6) + on_disk(11);
    let open_len = std::fs::metadata(seg(dir.path(), 16)).unwrap().len();
    let (mut store, _) = Store::open(dir.path(), options(&clock, true)).unwrap();
    // Under the limit counted compressed: nothing goes.
    let limit = Retention {
        max_age_ms: None,
        max_total_bytes: Some(compressed_total + open_len),
    };
    let report = store.prune(&limit, u64::MAX, clock.now()).unwrap();
    assert!(report.deleted.is_empty(), "{report:?}");
    assert_eq!(report.kept_bytes, compressed_total + open_len);
    let first_len = on_disk(1);
    let by_age = Retention {
        max_age_ms: Some(1500),
        max_total_bytes: None,
    };
    let report = store.prune(&by_age, u64::MAX, START_MS + 3000).unwrap();
    assert_eq!(report.deleted.len(), 1);
    assert_eq!(
        report.freed_bytes, first_len,
        "the compressed size is freed"
    );
    assert!(!zst(dir.path(), 1).exists());
    drop(store);
    let report = verify(dir.path(), Some(&verifying_key()));
    assert!(report.ok, "{:?}", report.first_break);
    assert_eq!((report.pruned_upto, report.last_seq), (Some(5), Some(18)));
    assert_eq!(all_events(dir.path()).first().unwrap().0, 6);
}
