//! Arbitrary text through the classifier: never a panic, and whatever the caches answer (the
//! exact text, or the shape of a string seen before) is exactly what a fresh parse answers.
//! Each input is classified twice more with its digits changed, so a shape seen a moment ago
//! is looked up with other constants. The one-pass shape reader must answer every input as
//! the scanner does, or leave it to the scanner.
//!
//! Run: `cd sql/fuzz && cargo +nightly fuzz run classify`

#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use portcullis_sql::{classify, shape_reader_agrees_with_scanner, Classifier};

static CLASSIFIER: OnceLock<Classifier> = OnceLock::new();

fn same_as_fresh(classifier: &Classifier, sql: &str) {
    assert!(shape_reader_agrees_with_scanner(sql), "{sql:?}");
    match (classifier.classify(sql), classify(sql)) {
        (Ok(cached), Ok(fresh)) => assert_eq!(&cached[..], &fresh[..], "{sql:?}"),
        (Err(_), Err(_)) => {}
        (cached, fresh) => panic!("{sql:?}: cached {cached:?}, fresh {fresh:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(sql) = std::str::from_utf8(data) else {
        return;
    };
    let classifier = CLASSIFIER.get_or_init(|| Classifier::new(4096));
    same_as_fresh(classifier, sql);
    for shift in [1u8, 7] {
        let other: String = sql
            .chars()
            .map(|c| match c {
                '0'..='9' => char::from(b'0' + (c as u8 - b'0' + shift) % 10),
                _ => c,
            })
            .collect();
        same_as_fresh(classifier, &other);
    }
});
