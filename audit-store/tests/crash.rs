//! kill -9 in the middle of appending loses no acknowledged event and leaves a store that
//! verifies once reopened. The writer is this test binary itself, re-run as a child process.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

mod common;

use common::*;
use portcullis_audit_store::{verify, Reader, Store, StoreOptions, SystemClock};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

const CHILD_DIR_ENV: &str = "PORTCULLIS_AUDIT_CRASH_CHILD_DIR";
const CHILD_ROUND_ENV: &str = "PORTCULLIS_AUDIT_CRASH_CHILD_ROUND";
const ACK: &str = "ACK ";
/// Marks a complete acknowledgement line: the child may die in the middle of printing one.
const END: &str = " END";

fn child_options() -> StoreOptions {
    StoreOptions {
        // Small segments, so the kill also lands in rotations and seals.
        max_segment_bytes: 4096,
        signing_key: Some(signing_key()),
        clock: Arc::new(SystemClock),
        ..StoreOptions::default()
    }
}

fn child_event(round: u64, i: u64, j: u64) -> String {
    format!(r#"{{"round":{round},"i":{i},"j":{j},"msg":"query {i}/{j} by alice"}}"#)
}

/// The child's side: appends until killed, printing each seq once `append` has returned.
/// Does nothing when run as an ordinary test.
#[test]
fn crash_child_appends_until_killed() {
    let Ok(dir) = std::env::var(CHILD_DIR_ENV) else {
        return;
    };
    let round: u64 = std::env::var(CHILD_ROUND_ENV).unwrap().parse().unwrap();
    let (mut store, _) = Store::open(Path::new(&dir), child_options()).unwrap();
    for i in 0u64.. {
        let events: Vec<String> = if i % 4 == 3 {
            (0..8).map(|j| child_event(round, i, j)).collect()
        } else {
            vec![child_event(round, i, 0)]
        };
        let refs = if events.len() == 1 {
            vec![store.append(events[0].as_bytes()).unwrap()]
        } else {
            let batch: Vec<&[u8]> = events.iter().map(|e| e.as_bytes()).collect();
            store.append_batch(&batch).unwrap()
        };
        for (r, e) in refs.iter().zip(&events) {
            println!("{ACK}{} {e}{END}", r.seq);
        }
    }
}

#[test]
fn kill_9_loses_no_acknowledged_event_and_the_store_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut acked: BTreeMap<u64, String> = BTreeMap::new();
    for round in 0..4u64 {
        let mut child = Command::new(&exe)
            .args([
                "crash_child_appends_until_killed",
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_DIR_ENV, dir.path())
            .env(CHILD_ROUND_ENV, round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let kill_after = 120 + 53 * round;
        let mut seen_this_round = 0u64;
        let mut killed = false;
        let mut line = String::new();
        loop {
            line.clear();
            if stdout.read_line(&mut line).unwrap() == 0 {
                break;
            }
            // Lines still in the pipe after the kill were printed after `append` returned:
            // they are acknowledged too and must survive.
            let Some(ack) = line
                .strip_suffix('\n')
                .and_then(|l| l.strip_prefix(ACK))
                .and_then(|l| l.strip_suffix(END))
            else {
                continue;
            };
            let (seq, event) = ack.split_once(' ').unwrap();
            let seq: u64 = seq.parse().unwrap();
            assert!(
                acked.insert(seq, event.to_owned()).is_none(),
                "seq {seq} acknowledged twice"
            );
            seen_this_round += 1;
            if seen_this_round >= kill_after && !killed {
                // std's kill is SIGKILL on Unix.
                child.kill().unwrap();
                killed = true;
            }
        }
        child.wait().unwrap();
        assert!(
            killed,
            "round {round}: the child stopped on its own after {seen_this_round} acks"
        );

        // Reopening repairs whatever the kill left; then every acknowledged event is there.
        let (store, notes) = Store::open(dir.path(), child_options()).unwrap();
        for note in &notes {
            eprintln!("round {round}: {note}");
        }
        drop(store);
        let report = verify(dir.path(), Some(&verifying_key()));
        assert!(report.ok, "round {round}: {}", report.first_break.unwrap());
        let stored: BTreeMap<u64, String> = Reader::all(dir.path())
            .unwrap()
            .map(|r| {
                let r = r.unwrap();
                (r.seq, r.event)
            })
            .collect();
        for (seq, event) in &acked {
            assert_eq!(
                stored.get(seq),
                Some(event),
                "round {round}: acknowledged seq {seq}"
            );
        }
        // Records may exist past the last acknowledgement (written, not yet reported), never gaps.
        assert_eq!(
            stored.keys().copied().collect::<Vec<_>>(),
            (1..=*stored.keys().last().unwrap()).collect::<Vec<_>>()
        );
        assert!(report.segments > 1, "rotations happened");
        eprintln!(
            "round {round}: {} acknowledged, {} stored, {} segments",
            acked.len(),
            stored.len(),
            report.segments
        );
    }
}
