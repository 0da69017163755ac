//! The recordings the writer produces are what asciinema itself reads: `asciinema cat` (the
//! Debian package asciinema, installed by `cargo xtask setup`) prints exactly the output the
//! recorder was given, multi-byte characters split between reads and markers included (run
//! under `script` for the terminal asciinema insists on). Skipped
//! when asciinema is not installed, unless PORTCULLIS_E2E=required (then it fails).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]

use std::process::Command;
use std::time::Duration;

use portcullis_terminal::asciicast::{Header, Recorder};

fn asciinema_installed() -> bool {
    let found = Command::new("asciinema").arg("--version").output().is_ok();
    if !found && std::env::var("PORTCULLIS_E2E").as_deref() == Ok("required") {
        panic!("asciinema is not installed (cargo xtask setup installs it) and PORTCULLIS_E2E=required");
    }
    found
}

#[test]
fn asciinema_cat_plays_what_the_recorder_wrote() {
    if !asciinema_installed() {
        eprintln!("skipped: asciinema is not installed");
        return;
    }
    let mut recorder = Recorder::new(&Header {
        width: 80,
        height: 24,
        timestamp: Some(1_700_000_000),
        command: Some("ssh prod-web-3".into()),
        title: None,
        term: Some("xterm-256color".into()),
        shell: Some("/bin/bash".into()),
    });
    let euro = "€".as_bytes();
    let mut file = recorder.take_chunk();
    recorder.output(Duration::from_millis(10), b"\x1b[32m$\x1b[0m ");
    recorder.input(Duration::from_millis(20), b"echo caf\xc3");
    recorder.output(
        Duration::from_millis(30),
        &[b"price: 5 ", &euro[..1]].concat(),
    );
    file.extend(recorder.take_chunk());
    recorder.output(
        Duration::from_millis(40),
        &[&euro[1..], &b"\r\n"[..]].concat(),
    );
    recorder.resize(Duration::from_millis(50), 120, 40);
    recorder.marker(Duration::from_millis(60), "denied: rm -rf /");
    recorder.output(Duration::from_millis(70), b"bad \xff byte\r\n");
    file.extend(recorder.finish(Duration::from_millis(80)));

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("session.cast");
    std::fs::write(&path, &file).unwrap();
    // asciinema reads keys from /dev/tty even to cat: `script` (util-linux) gives it one.
    let out = Command::new("script")
        .args(["-q", "-e", "-c"])
        .arg(format!("asciinema cat {}", path.display()))
        .arg("/dev/null")
        .env("HOME", dir.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "asciinema cat failed: {}\nfile:\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&file)
    );
    assert_eq!(
        String::from_utf8(out.stdout).unwrap(),
        "\x1b[32m$\x1b[0m price: 5 €\r\nbad \u{fffd} byte\r\n"
    );
}
