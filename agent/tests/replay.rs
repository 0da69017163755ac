//! `portcullis replay` plays a recording the terminal crate's recorder wrote: all of its output
//! in order, at the speed asked, from a marker when asked; a damaged file is an error that
//! names its line and plays nothing.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::process::Command;
use std::time::{Duration, Instant};

use portcullis_terminal::asciicast::{Header, Recorder};

fn replay(args: &[&str], file: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("replay")
        .args(args)
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn replay_plays_a_recording_at_speed_and_from_a_marker() {
    let mut recorder = Recorder::new(&Header {
        width: 80,
        height: 24,
        ..Header::default()
    });
    recorder.output(Duration::from_millis(100), b"$ rm -rf /");
    recorder.marker(Duration::from_millis(1000), "denied: rm -rf /");
    recorder.output(Duration::from_millis(1100), b"\r\nrefused\r\n");
    recorder.output(Duration::from_millis(2100), b"$ ");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("session.cast");
    std::fs::write(&file, recorder.finish(Duration::from_millis(2200))).unwrap();

    // Two seconds recorded, at speed 4: about half a second.
    let started = Instant::now();
    let out = replay(&["--speed", "4"], &file);
    let took = started.elapsed();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"$ rm -rf /\r\nrefused\r\n$ ");
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(1800),
        "{took:?}"
    );

    // From the marker: the first output at once, then 0.1 s and 1 s, with idle time cut to 0.2 s.
    let started = Instant::now();
    let out = replay(&["--marker", "1", "--idle-limit", "0.2"], &file);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(out.stdout, b"$ rm -rf /\r\nrefused\r\n$ ");
    assert!(started.elapsed() < Duration::from_millis(1000));

    let out = replay(&["--marker", "2"], &file);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("there is no marker 2"));
}

#[test]
fn replay_refuses_a_damaged_recording_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.cast");
    std::fs::write(
        &file,
        "{\"version\":2,\"width\":80,\"height\":24}\n[0.1, \"o\", \"shown?\"]\n[0.2, \"o\"\n",
    )
    .unwrap();
    let out = replay(&[], &file);
    assert!(!out.status.success());
    assert!(
        out.stdout.is_empty(),
        "nothing is played from a damaged file"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("line 3"), "{stderr}");
}
