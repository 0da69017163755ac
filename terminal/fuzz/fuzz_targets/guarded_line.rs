//! Arbitrary keystrokes and target output, interleaved, through the guarded-line reader: never
//! a panic, lines bounded, and with every line allowed the bytes forwarded upstream are exactly
//! the bytes the client sent (nothing lost, nothing duplicated, nothing reordered), however the
//! input is cut.
//!
//! Run: `cd terminal/fuzz && cargo +nightly fuzz run guarded_line`

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_terminal::line::{Guarded, LineGuard, MAX_LINE};

fn collect(events: Vec<Guarded>, forwarded: &mut Vec<u8>, lines: &mut usize) {
    for event in events {
        match event {
            Guarded::Forward(bytes) => forwarded.extend(bytes),
            Guarded::Line(line) => {
                assert!(line.text.chars().count() <= MAX_LINE);
                *lines += 1;
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // Records: a control byte (low bit: input or output, the rest: length), then the bytes.
    let mut guard = LineGuard::new();
    let mut sent = Vec::new();
    let mut forwarded = Vec::new();
    let mut lines = 0;
    let mut rest = data;
    while let Some((&control, tail)) = rest.split_first() {
        let len = usize::from(control >> 1).min(tail.len());
        let (bytes, tail) = tail.split_at(len);
        rest = tail;
        if control & 1 == 0 {
            guard.output(bytes);
            continue;
        }
        sent.extend_from_slice(bytes);
        match guard.input(bytes) {
            Ok(events) => collect(events, &mut forwarded, &mut lines),
            Err(_) => return,
        }
        while guard.waiting() {
            match guard.decided(true) {
                Ok(events) => collect(events, &mut forwarded, &mut lines),
                Err(_) => return,
            }
        }
    }
    // An escape sequence or UTF-8 character still open at the end is held, not lost.
    assert!(
        sent.starts_with(&forwarded),
        "forwarded {forwarded:?} is not a prefix of sent {sent:?}"
    );
    assert!(
        sent.len() - forwarded.len() <= 16,
        "{sent:?} vs {forwarded:?}"
    );
    let _ = lines;
});
