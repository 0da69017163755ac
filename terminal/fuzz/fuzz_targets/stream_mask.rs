//! Terminal output in arbitrary chunks through the streaming masker: never a panic, output
//! bounded by the input, and the text it shows (escape sequences left out) is exactly what the
//! policy's masker makes of the whole input's text at once, so no chunking and no escape
//! sequence can let a value through that the whole-input masker would mask. A second pass
//! flushes between chunks (the relay does when the target is quiet) and must not panic.
//!
//! The masks are `***` and partial masks of digits: a replacement made of bytes that cannot end
//! an escape sequence, so the output's text can be read back with the same scanner.
//!
//! Run: `cd terminal/fuzz && cargo +nightly fuzz run stream_mask`

#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use portcullis_policy::{
    ColumnPlan, Detector, MaskKind, MaskRule, Masker, MaskingProfile, Selector, FORMAT_TEXT,
};
use portcullis_terminal::mask::{visible_text, StreamMasker};

fn profile() -> &'static (MaskingProfile, Arc<Masker>) {
    static PROFILE: OnceLock<(MaskingProfile, Arc<Masker>)> = OnceLock::new();
    PROFILE.get_or_init(|| {
        let redact = || MaskKind::Redact {
            replacement: "***".into(),
        };
        let rule = |detector, mask| MaskRule {
            selector: Selector::Content(detector),
            mask,
        };
        let profile = MaskingProfile {
            name: "fuzz".into(),
            description: None,
            rules: vec![
                rule(
                    Detector::CardNumber,
                    MaskKind::Partial {
                        keep_first: 0,
                        keep_last: 4,
                    },
                ),
                rule(Detector::Email, redact()),
                rule(
                    Detector::NationalId,
                    MaskKind::Partial {
                        keep_first: 0,
                        keep_last: 4,
                    },
                ),
                rule(Detector::Iban, redact()),
                rule(
                    Detector::Phone,
                    MaskKind::Partial {
                        keep_first: 0,
                        keep_last: 2,
                    },
                ),
            ],
            allow_sql_text_functions: Vec::new(),
        };
        let masker = Arc::new(Masker::new(&profile, b"fuzz"));
        (profile, masker)
    })
}

/// Chunk lengths from the first bytes of the input.
fn chunks(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let (sizes, rest) = data.split_at(data.len().min(4));
    (
        sizes.iter().map(|&s| usize::from(s % 17) + 1).collect(),
        rest,
    )
}

/// The input pushed in chunks of `sizes` (cycled; all at once when empty), flushed after every
/// other chunk if `flush`, then finished.
fn run(input: &[u8], sizes: &[usize], flush: bool) -> Vec<u8> {
    let (profile, masker) = profile();
    let mut stream = StreamMasker::new(Arc::clone(masker), profile);
    let mut out = Vec::new();
    let mut rest = input;
    let mut k = 0;
    while !rest.is_empty() {
        let size = match sizes.len() {
            0 => rest.len(),
            n => sizes.get(k % n).copied().unwrap_or(1),
        };
        let (chunk, tail) = rest.split_at(size.min(rest.len()));
        out.extend(stream.push(chunk));
        if flush && k % 2 == 1 {
            out.extend(stream.flush());
        }
        rest = tail;
        k += 1;
    }
    out.extend(stream.finish());
    // A mask is never more than a few bytes longer than what it replaces.
    assert!(
        out.len() <= input.len() * 3 + 16,
        "output grew: {} -> {}",
        input.len(),
        out.len()
    );
    out
}

fuzz_target!(|data: &[u8]| {
    let (_, masker) = profile();
    let (sizes, input) = chunks(data);
    let out = run(input, &sizes, false);
    // However the input is cut, the output is the same as for one chunk.
    assert_eq!(out, run(input, &[], false));
    let visible = visible_text(input);
    // Within the hold limit and the longest escape sequence nothing is released early, so the
    // text shown is the whole text masked at once. (Only where no `ESC` stands in the text: an
    // abandoned sequence's `ESC` followed by a mask would read back as a sequence.)
    if input.len() < 4096 && !visible.contains(&0x1b) {
        let whole = masker
            .mask_value(&ColumnPlan::ContentOnly, FORMAT_TEXT, 25, &visible)
            .expect("text can always be masked")
            .unwrap_or(visible);
        assert_eq!(
            visible_text(&out),
            whole,
            "input {:?}",
            String::from_utf8_lossy(input)
        );
    }
    run(input, &sizes, true);
});
