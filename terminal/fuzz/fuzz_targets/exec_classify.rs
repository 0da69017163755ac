//! Arbitrary exec command lines through the classifier: never a panic; a line with argv has no
//! shell-syntax flag and its first word is argv's first; and argv round-trips: the words quoted
//! again with single quotes classify to the same argv, so quote removal loses nothing.
//!
//! Run: `cd terminal/fuzz && cargo +nightly fuzz run exec_classify`

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis_terminal::exec::{classify, ExecKind};

fn quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', "'\\''"))
}

fuzz_target!(|data: &[u8]| {
    let command = classify(data);
    let Some(argv) = command.argv else {
        assert!(command.shell_syntax.is_some());
        return;
    };
    assert!(command.shell_syntax.is_none());
    assert_eq!(command.first_word.as_ref(), argv.first());
    assert_eq!(command.kind == ExecKind::Empty, argv.is_empty());
    let quoted: Vec<String> = argv.iter().map(|w| quote(w)).collect();
    let again = classify(quoted.join(" ").as_bytes());
    assert_eq!(
        again.argv.as_ref(),
        Some(&argv),
        "{:?}",
        String::from_utf8_lossy(data)
    );
});
