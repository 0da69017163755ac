//! The recording area: what is appended reads back as the chain recorded it, and every kind of
//! tampering with a recording is named, with its chunk.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

use portcullis_audit_store::recording::{
    mark_closed, prune_recordings, read_verified, recording_path, recordings_dir,
    verify_recordings, Claims, RecordingBreakKind, RecordingClaims, RecordingFile, RecordingId,
};
use portcullis_audit_store::{Retention, Store, StoreError, StoreOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

const HEADER: &[u8] = b"{\"version\":2,\"width\":80,\"height\":24}\n";
const OUTPUT: [&[u8]; 3] = [
    b"[0.1,\"o\",\"$ \"]\n",
    b"[0.5,\"o\",\"ls\\r\\n\"]\n",
    b"[0.9,\"o\",\"caf\xc3\xa9\\r\\n\"]\n",
];

/// One closed recording (id 7) and one still open (id 8), and the claims their events make.
fn two_recordings(dir: &Path) -> RecordingClaims {
    let mut claims = RecordingClaims::default();
    for (id, close) in [(7u64, true), (8, false)] {
        let mut rec = RecordingFile::create(dir, id).unwrap();
        for bytes in std::iter::once(HEADER).chain(OUTPUT) {
            claims.chunk(id, rec.append(bytes).unwrap());
        }
        if close {
            claims.closed(id, rec.summary());
        }
    }
    claims
}

fn whole() -> Vec<u8> {
    std::iter::once(HEADER)
        .chain(OUTPUT)
        .flatten()
        .copied()
        .collect()
}

#[test]
fn appended_chunks_verify_and_read_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let claims = two_recordings(dir.path());
    let report = verify_recordings(dir.path(), &claims);
    assert!(report.ok(), "{:?}", report.breaks);
    assert_eq!((report.checked, report.closed), (2, 1));
    assert!(report.notes.is_empty(), "{:?}", report.notes);
    for id in [7, 8] {
        let bytes =
            read_verified(dir.path(), id, &claims.recordings[&RecordingId::from(id)]).unwrap();
        assert_eq!(bytes, whole());
    }
    let c = &claims.recordings[&RecordingId::from(7)];
    assert_eq!(c.chunks.len(), 4);
    assert_eq!(c.chunks[1].offset, HEADER.len() as u64);
    let closed = c.closed.unwrap();
    assert_eq!(closed.length, whole().len() as u64);
    let want: [u8; 32] = sha2_of(&whole());
    assert_eq!(closed.sha256, want);
}

fn sha2_of(bytes: &[u8]) -> [u8; 32] {
    // The whole-file hash is plain SHA-256 of the file, so `sha256sum` checks it too.
    let out = std::process::Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(bytes)?;
            child.wait_with_output()
        })
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    hex::decode(&text[..64]).unwrap().try_into().unwrap()
}

#[test]
fn files_and_area_are_private_and_a_recording_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    two_recordings(dir.path());
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&recordings_dir(dir.path())), 0o700);
    assert_eq!(mode(&recording_path(dir.path(), 7)), 0o600);
    // A second recording under the same id never overwrites the first.
    let err = RecordingFile::create(dir.path(), 7).unwrap_err();
    assert!(err.to_string().contains("create recording"), "{err}");
    assert_eq!(
        std::fs::read(recording_path(dir.path(), 7)).unwrap(),
        whole()
    );
}

/// Each way of tampering with a recording is named, with the chunk it concerns.
#[test]
fn tampering_with_a_recording_is_named() {
    type Tamper = fn(&Path, &mut RecordingClaims);
    let rows: Vec<(&str, Tamper, u64, RecordingBreakKind, Option<u64>)> = vec![
        (
            "closed recording deleted",
            |d, _| std::fs::remove_file(recording_path(d, 7)).unwrap(),
            7,
            RecordingBreakKind::Missing,
            None,
        ),
        (
            "open recording deleted",
            |d, _| std::fs::remove_file(recording_path(d, 8)).unwrap(),
            8,
            RecordingBreakKind::Missing,
            None,
        ),
        (
            "closed recording cut inside its last chunk",
            |d, _| set_len(&recording_path(d, 7), -3),
            7,
            RecordingBreakKind::Truncated,
            Some(3),
        ),
        (
            "open recording cut at a chunk boundary",
            |d, _| {
                let len = (HEADER.len() + OUTPUT[0].len()) as i64;
                set_len(&recording_path(d, 8), len - whole().len() as i64)
            },
            8,
            RecordingBreakKind::Truncated,
            Some(2),
        ),
        (
            "a byte of the output edited",
            |d, _| flip(&recording_path(d, 7), HEADER.len() + OUTPUT[0].len() + 8),
            7,
            RecordingBreakKind::ChunkAltered,
            Some(2),
        ),
        (
            "the header edited in an open recording",
            |d, _| flip(&recording_path(d, 8), 20),
            8,
            RecordingBreakKind::ChunkAltered,
            Some(0),
        ),
        (
            "bytes added after the close",
            |d, _| append(&recording_path(d, 7), b"[1.0,\"o\",\"x\"]\n"),
            7,
            RecordingBreakKind::BytesAdded,
            None,
        ),
        (
            "two chunks swapped in the file (same length, other order)",
            |d, _| {
                let p = recording_path(d, 7);
                let mut bytes = std::fs::read(&p).unwrap();
                let a = HEADER.len();
                bytes[a..].rotate_left(OUTPUT[0].len());
                std::fs::write(&p, bytes).unwrap();
            },
            7,
            RecordingBreakKind::ChunkAltered,
            Some(1),
        ),
        (
            "the file rewritten with the chunk events rewritten too, but not the closed event",
            |d, claims| {
                let p = recording_path(d, 7);
                std::fs::remove_file(&p).unwrap();
                let mut rec = RecordingFile::create(d, 7).unwrap();
                let c = claims.recordings.get_mut(&RecordingId::from(7)).unwrap();
                c.chunks.clear();
                for bytes in [
                    HEADER,
                    OUTPUT[0],
                    OUTPUT[1],
                    b"[0.9,\"o\",\"cafe\\r\\n\"]\n",
                ] {
                    c.chunks.push(rec.append(bytes).unwrap());
                }
            },
            7,
            RecordingBreakKind::ClosedMismatch,
            None,
        ),
        (
            "a chunk event left out of the claims",
            |_, claims| {
                claims
                    .recordings
                    .get_mut(&RecordingId::from(8))
                    .unwrap()
                    .chunks
                    .remove(1);
            },
            8,
            RecordingBreakKind::ChunksOutOfOrder,
            Some(2),
        ),
    ];
    for (name, tamper, id, kind, chunk) in rows {
        let dir = tempfile::tempdir().unwrap();
        let mut claims = two_recordings(dir.path());
        tamper(dir.path(), &mut claims);
        let report = verify_recordings(dir.path(), &claims);
        assert_eq!(report.breaks.len(), 1, "{name}: {:?}", report.breaks);
        let b = &report.breaks[0];
        assert_eq!(
            (b.connection_id, b.kind, b.chunk),
            (id, kind, chunk),
            "{name}: {b}"
        );
        assert!(!b.message.is_empty());
        // Reading it back refuses it the same way.
        let err =
            read_verified(dir.path(), id, &claims.recordings[&RecordingId::from(id)]).unwrap_err();
        assert_eq!(err.kind, kind, "{name}");
        // The untouched one still verifies and reads back.
        let other = if id == 7 { 8 } else { 7 };
        assert_eq!(
            read_verified(
                dir.path(),
                other,
                &claims.recordings[&RecordingId::from(other)]
            )
            .unwrap(),
            whole(),
            "{name}"
        );
    }
}

#[test]
fn bytes_not_yet_in_the_trail_and_files_without_events_are_noted_not_trusted() {
    let dir = tempfile::tempdir().unwrap();
    let claims = two_recordings(dir.path());
    // A write in progress: bytes on disk whose chunk event is not written yet.
    append(&recording_path(dir.path(), 8), b"[1.2,\"o\",\"more\"]\n");
    // A file the trail does not know.
    std::fs::write(recording_path(dir.path(), 9), whole()).unwrap();
    let report = verify_recordings(dir.path(), &claims);
    assert!(report.ok(), "{:?}", report.breaks);
    assert_eq!(report.notes.len(), 2, "{:?}", report.notes);
    assert!(
        report.notes[0].contains("recording 8.0: 17 bytes"),
        "{:?}",
        report.notes
    );
    assert!(
        report.notes[1].contains("recording 9.0: no chunk events"),
        "{:?}",
        report.notes
    );
    // Reading back gives only what the trail vouches for.
    assert_eq!(
        read_verified(dir.path(), 8, &claims.recordings[&RecordingId::from(8)]).unwrap(),
        whole()
    );
    // A recording the trail does not know has no claims to read it by.
    assert!(read_verified(dir.path(), 9, &Claims::default())
        .unwrap()
        .is_empty());
}

/// The area cannot be created (a file stands where the directory goes; modes would not stop
/// root): the recording does not start.
#[test]
fn an_area_that_cannot_be_created_fails_the_recording() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(recordings_dir(dir.path()), b"not a directory").unwrap();
    let err = RecordingFile::create(dir.path(), 1).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Io {
                op: "create recordings directory",
                ..
            }
        ),
        "{err}"
    );
}

/// A disk that is full when a chunk is written: the append fails, and every later one too.
#[test]
fn a_full_disk_fails_the_append_and_every_later_one() {
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mut rec = RecordingFile::over_open_file(full, "/dev/full".into());
    let err = rec.append(OUTPUT[0]).unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Io {
                op: "write recording",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("No space left"), "{err}");
    assert!(matches!(rec.append(OUTPUT[1]), Err(StoreError::Poisoned)));
    assert_eq!(rec.summary().length, 0, "nothing was acknowledged");
}

/// Retention deletes a closed recording once the segment holding its closed event is pruned,
/// and keeps recordings whose events are still stored or that were never closed.
#[test]
fn retention_deletes_a_recording_with_the_segment_of_its_closed_event() {
    let dir = tempfile::tempdir().unwrap();
    let clock_ms = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1_000_000));
    let c = std::sync::Arc::clone(&clock_ms);
    let opts = StoreOptions {
        clock: std::sync::Arc::new(move || c.load(std::sync::atomic::Ordering::SeqCst)),
        ..Default::default()
    };
    let (mut store, _) = Store::open(dir.path(), opts).unwrap();
    two_recordings(dir.path());
    let seq7 = store
        .append(br#"{"event":"recording.closed","id":7}"#)
        .unwrap()
        .seq;
    mark_closed(dir.path(), 7, seq7).unwrap();
    store.seal_current().unwrap();
    // Recording 9 closes in the newest segment, which is never pruned.
    RecordingFile::create(dir.path(), 9).unwrap();
    let seq9 = store
        .append(br#"{"event":"recording.closed","id":9}"#)
        .unwrap()
        .seq;
    mark_closed(dir.path(), 9, seq9).unwrap();
    // Nothing pruned yet: nothing deleted.
    assert!(prune_recordings(dir.path()).unwrap().is_empty());
    clock_ms.fetch_add(10_000, std::sync::atomic::Ordering::SeqCst);
    let retention = Retention {
        max_age_ms: Some(1),
        max_total_bytes: None,
    };
    let pruned = store.prune(&retention, u64::MAX, 1_020_000).unwrap();
    assert_eq!(pruned.deleted.len(), 1);
    let deleted = prune_recordings(dir.path()).unwrap();
    assert_eq!(deleted, vec![recording_path(dir.path(), 7)]);
    assert!(!recording_path(dir.path(), 7).exists());
    assert!(recording_path(dir.path(), 8).exists(), "never closed: kept");
    assert!(
        recording_path(dir.path(), 9).exists(),
        "its event is still stored"
    );
}

/// Two terminals on one connection (ControlMaster): two files, each checked against its own
/// chunk events, so damage to the second names recording 1 and leaves recording 0 readable;
/// each is deleted with the segment of its own closed event.
#[test]
fn two_recordings_of_one_connection_are_kept_and_checked_apart() {
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (RecordingId::new(7, 0), RecordingId::new(7, 1));
    let mut claims = RecordingClaims::default();
    for (id, extra) in [(first, &b"[1.0,\"o\",\"one\"]\n"[..]), (second, b"")] {
        let mut rec = RecordingFile::create(dir.path(), id).unwrap();
        for bytes in std::iter::once(HEADER).chain(OUTPUT).chain([extra]) {
            if !bytes.is_empty() {
                claims.chunk(id, rec.append(bytes).unwrap());
            }
        }
        claims.closed(id, rec.summary());
    }
    // A second create of either is refused: a recording is never reused.
    assert!(RecordingFile::create(dir.path(), second).is_err());
    assert_eq!(
        recording_path(dir.path(), second),
        recordings_dir(dir.path()).join("00000000000000000007.1.cast")
    );
    let report = verify_recordings(dir.path(), &claims);
    assert!(report.ok(), "{:?}", report.breaks);
    assert_eq!((report.checked, report.closed), (2, 2));
    assert!(report.notes.is_empty(), "{:?}", report.notes);
    let mut want_first = whole();
    want_first.extend_from_slice(b"[1.0,\"o\",\"one\"]\n");
    assert_eq!(
        read_verified(dir.path(), first, &claims.recordings[&first]).unwrap(),
        want_first
    );
    assert_eq!(
        read_verified(dir.path(), second, &claims.recordings[&second]).unwrap(),
        whole()
    );
    // The claims of one are not the other's: recording 0's against file 1 do not match.
    assert!(read_verified(dir.path(), second, &claims.recordings[&first]).is_err());

    flip(&recording_path(dir.path(), second), HEADER.len() + 2);
    let report = verify_recordings(dir.path(), &claims);
    assert_eq!(report.breaks.len(), 1, "{:?}", report.breaks);
    let b = &report.breaks[0];
    assert_eq!(
        (b.connection_id, b.recording, b.kind, b.chunk),
        (7, 1, RecordingBreakKind::ChunkAltered, Some(1)),
        "{b}"
    );
    assert!(b.to_string().starts_with("recording 7.1 chunk 1"), "{b}");
    assert_eq!(
        read_verified(dir.path(), first, &claims.recordings[&first]).unwrap(),
        want_first
    );

    // Retention: recording 1 closed in a pruned segment goes, recording 0 (closed in the
    // newest segment) stays.
    let (mut store, _) = Store::open(dir.path(), StoreOptions::default()).unwrap();
    let seq1 = store
        .append(br#"{"event":"recording.closed"}"#)
        .unwrap()
        .seq;
    mark_closed(dir.path(), second, seq1).unwrap();
    store.seal_current().unwrap();
    let seq0 = store
        .append(br#"{"event":"recording.closed"}"#)
        .unwrap()
        .seq;
    mark_closed(dir.path(), first, seq0).unwrap();
    let retention = Retention {
        max_age_ms: None,
        max_total_bytes: Some(1),
    };
    let pruned = store.prune(&retention, u64::MAX, u64::MAX).unwrap();
    assert_eq!(pruned.deleted.len(), 1);
    assert_eq!(
        prune_recordings(dir.path()).unwrap(),
        vec![recording_path(dir.path(), second)]
    );
    assert!(recording_path(dir.path(), first).exists());
}

fn set_len(path: &Path, delta: i64) {
    let len = std::fs::metadata(path).unwrap().len() as i64 + delta;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(len as u64).unwrap();
}

fn flip(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

fn append(path: &Path, extra: &[u8]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(extra).unwrap();
}
