//! Arbitrary output through the replay screen: never a panic; the text has at most the
//! screen's rows, each at most its columns; and where the output is split between two feeds
//! does not change what is shown (a recording's chunks can end anywhere).
//!
//! Run: `cd terminal/fuzz && cargo +nightly fuzz run screen`

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_terminal::screen::Screen;

fuzz_target!(|data: &[u8]| {
    let Some((&size, rest)) = data.split_first() else {
        return;
    };
    let (columns, rows) = (u16::from(size % 40) + 1, u16::from(size / 40) + 1);
    let mut whole = Screen::new(columns, rows);
    whole.feed(rest);
    let text = whole.text();
    assert!(text.lines().count() <= usize::from(rows), "{text:?}");
    assert!(
        text.lines()
            .all(|l| l.chars().count() <= usize::from(columns)),
        "{text:?}"
    );
    let cut = rest.len() / 2;
    let mut split = Screen::new(columns, rows);
    split.feed(rest.get(..cut).unwrap_or_default());
    split.feed(rest.get(cut..).unwrap_or_default());
    assert_eq!(split.text(), text);
});
