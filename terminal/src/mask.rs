//! Masking of terminal output as it streams: the content detectors of a masking profile
//! ([`portcullis_policy::Masker`], the ones PostgreSQL results go through: card numbers with
//! Luhn, emails, national ids, IBANs, phone numbers, operator regexes) applied to what the
//! terminal shows, whatever the chunking of the stream and wherever escape sequences fall.
//!
//! How: the stream is cut into runs at bytes no detector match can contain (controls such as
//! `\r` and `\n`, non-ASCII, and ASCII punctuation outside every built-in detector's alphabet;
//! for a profile with a `regex` detector only line ends, so an operator pattern sees a whole
//! line). A run is held until it ends, then its visible text (escape sequences left out, so
//! `4111 \e[1m1111…` is one card number) is masked as a whole and written out with its escape
//! sequences in place; one inside a masked value follows the value's mask.
//!
//! Held output is bounded and released: by [`StreamMasker::flush`], which the relay calls when
//! the target has been quiet for a moment (a shell prompt or the echo of a keystroke is a run
//! that has not ended), and when a run reaches the hold limit. Released text stays as context
//! for the rest of its run: a value that turns out to have started in released text has the
//! rest of it hidden (`*` for every byte), so a split cannot reveal what a whole would hide.
//!
//! Limits, said plainly: a program that draws a value in pieces with cursor movement, or
//! prints it inside an escape sequence (a window title, an OSC 52 clipboard write), is not
//! masked; what the user's own commands print is theirs to obfuscate. This masks accidental
//! exposure on screen and in the recording; it does not stop a user set on exfiltrating data.

use std::sync::Arc;

use portcullis_policy::{Detector, Masker, MaskingProfile, Selector};

use crate::escape::{EscapeScanner, Scanned};

pub use crate::escape::visible_text;

/// The default hold limit (bytes of one run, its escape sequences included): longer than any
/// line a detector looks at, small enough to bound a session's memory.
pub const DEFAULT_HOLD_LIMIT: usize = 16 * 1024;

/// How much released text of a run is kept as context for the rest of it: more than the
/// longest built-in match (an email of 64 + 1 + 253 bytes).
const CONTEXT: usize = 512;

/// The bytes (with their visibility) of the run being held.
#[derive(Debug, Default)]
struct Run {
    /// As they will be written: visible text and escape sequences interleaved.
    bytes: Vec<u8>,
    /// For each byte of `bytes`, whether it is visible text.
    visible: Vec<bool>,
}

impl Run {
    fn push_text(&mut self, byte: u8) {
        self.bytes.push(byte);
        self.visible.push(true);
    }

    fn push_sequence(&mut self, sequence: &[u8]) {
        self.bytes.extend_from_slice(sequence);
        self.visible
            .extend(std::iter::repeat_n(false, sequence.len()));
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.visible.clear();
    }
}

/// One session's output masker: feed it what the target sends, write what it returns to the
/// client and to the recording. Not `Sync`; one per channel.
#[derive(Debug)]
pub struct StreamMasker {
    masker: Arc<Masker>,
    /// Runs end at line ends only (the profile has an operator regex).
    lines_only: bool,
    hold_limit: usize,
    escapes: EscapeScanner,
    run: Run,
    /// The visible text of this run that was already released (at most `CONTEXT` bytes).
    released: Vec<u8>,
}

impl StreamMasker {
    /// A masker for the content detectors of `profile`, compiled into `masker`
    /// (`Masker::new(profile, key)`: the same key makes the same hashes as PostgreSQL's).
    pub fn new(masker: Arc<Masker>, profile: &MaskingProfile) -> StreamMasker {
        let lines_only = profile
            .rules
            .iter()
            .any(|rule| matches!(rule.selector, Selector::Content(Detector::Regex(_))));
        StreamMasker {
            masker,
            lines_only,
            hold_limit: DEFAULT_HOLD_LIMIT,
            escapes: EscapeScanner::default(),
            run: Run::default(),
            released: Vec::new(),
        }
    }

    /// Hold at most `limit` bytes of a run (at least 1 KiB) before releasing them.
    pub fn with_hold_limit(mut self, limit: usize) -> StreamMasker {
        self.hold_limit = limit.max(1024);
        self
    }

    /// Whether bytes are held back (the relay should call [`StreamMasker::flush`] once the
    /// target has been quiet for a moment).
    pub fn holds(&self) -> bool {
        !self.run.is_empty()
    }

    /// Take the next bytes of output; returns what can be shown now, masked.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<u8> {
        if !self.masker.has_detectors() {
            // Nothing can be masked: nothing is held, so a session without masking sees no delay.
            return bytes.to_vec();
        }
        let mut out = Vec::with_capacity(bytes.len());
        for &byte in bytes {
            match self.escapes.push(byte) {
                Scanned::Text(b) => self.text(b, &mut out),
                Scanned::Pending => {}
                Scanned::Sequence(sequence) => {
                    if self.run.is_empty() {
                        out.extend_from_slice(&sequence);
                    } else {
                        self.run.push_sequence(&sequence);
                        // Sequences count towards the bound too: text between endless colour
                        // changes must not grow the run without limit.
                        if self.run.bytes.len() >= self.hold_limit {
                            self.release(&mut out, false);
                        }
                    }
                }
                Scanned::NotASequence(text) => {
                    for b in text {
                        self.text(b, &mut out);
                    }
                }
            }
        }
        out
    }

    /// Release the run being held, masked as it stands (the target went quiet). Its visible
    /// text stays as context, so a value completed by later output is still hidden. An
    /// unfinished escape sequence stays held.
    pub fn flush(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        self.release(&mut out, false);
        out
    }

    /// The end of the stream: everything held, masked; an unfinished escape sequence is text.
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        for b in self.escapes.abandon() {
            self.text(b, &mut out);
        }
        self.release(&mut out, true);
        out
    }

    fn text(&mut self, byte: u8, out: &mut Vec<u8>) {
        if self.ends_runs(byte) {
            self.release(out, true);
            out.push(byte);
            return;
        }
        self.run.push_text(byte);
        if self.run.bytes.len() >= self.hold_limit {
            self.release(out, false);
        }
    }

    /// Whether no detector match can contain `byte`, so runs can be masked on their own.
    fn ends_runs(&self, byte: u8) -> bool {
        if self.lines_only {
            return matches!(byte, b'\n' | b'\r');
        }
        // The built-in detectors' alphabet: letters and digits, the separators of card,
        // phone, IBAN and id numbers (space, `-`, `.`, `(`, `)`, `+`), and the characters of
        // email addresses (RFC 5322 atext, `.` and `@`). Everything else ends a run.
        !(byte.is_ascii_alphanumeric() || b" -.()+@!#$%&'*/=?^_`{|}~".contains(&byte))
    }

    /// Mask the held run (with the released text before it as context) and write it out;
    /// `ended` when the run is over, else its text becomes context for what follows.
    fn release(&mut self, out: &mut Vec<u8>, ended: bool) {
        if self.run.is_empty() {
            if ended {
                self.released.clear();
            }
            return;
        }
        let context = self.released.len();
        let mut text = std::mem::take(&mut self.released);
        text.extend(
            self.run
                .bytes
                .iter()
                .zip(&self.run.visible)
                .filter(|(_, &visible)| visible)
                .map(|(&b, _)| b),
        );
        let matches = self.masker.content_matches(&text);
        let mut matches = matches.iter().filter(|m| m.range.end > context).peekable();
        // Position in `text` of the next visible byte of the run.
        let mut position = context;
        for (&byte, &visible) in self.run.bytes.iter().zip(&self.run.visible) {
            if !visible {
                out.push(byte);
                continue;
            }
            while matches.peek().is_some_and(|m| m.range.end <= position) {
                matches.next();
            }
            match matches.peek() {
                Some(m) if m.range.start < context => {
                    // Began in text already shown: hide the rest of it entirely.
                    if m.range.contains(&position) {
                        out.push(b'*');
                    } else {
                        out.push(byte);
                    }
                }
                Some(m) if m.range.start == position => {
                    out.extend_from_slice(&m.replacement);
                }
                Some(m) if m.range.contains(&position) => {}
                _ => out.push(byte),
            }
            position += 1;
        }
        self.run.clear();
        if !ended {
            let keep = text.len().saturating_sub(CONTEXT);
            text.drain(..keep);
            self.released = text;
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests fail loudly"
)]
mod tests {
    use super::*;
    use portcullis_policy::{MaskKind, MaskRule};

    const CARD: &str = "4111 1111 1111 1111";

    fn profile(detectors: Vec<(Detector, MaskKind)>) -> MaskingProfile {
        MaskingProfile {
            name: "terminal".into(),
            description: None,
            rules: detectors
                .into_iter()
                .map(|(detector, mask)| MaskRule {
                    selector: Selector::Content(detector),
                    mask,
                })
                .collect(),
            allow_sql_text_functions: Vec::new(),
        }
    }

    fn redact() -> MaskKind {
        MaskKind::Redact {
            replacement: "[card]".into(),
        }
    }

    fn masker(profile: &MaskingProfile) -> StreamMasker {
        StreamMasker::new(Arc::new(Masker::new(profile, b"key")), profile)
    }

    fn cards() -> StreamMasker {
        masker(&profile(vec![(Detector::CardNumber, redact())]))
    }

    /// Push `input` in the given chunks, then finish; the concatenated output.
    fn stream(masker: &mut StreamMasker, chunks: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for chunk in chunks {
            out.extend(masker.push(chunk));
        }
        out.extend(masker.finish());
        out
    }

    #[test]
    fn a_card_split_at_every_byte_is_masked() {
        let input = format!("pay {CARD} now\r\n");
        for split in 0..=input.len() {
            let (a, b) = input.as_bytes().split_at(split);
            let out = stream(&mut cards(), &[a, b]);
            assert_eq!(out, b"pay [card] now\r\n", "split at {split}");
        }
    }

    #[test]
    fn a_card_fed_byte_by_byte_is_masked() {
        let input = format!("{CARD}\n");
        let chunks: Vec<&[u8]> = input.as_bytes().chunks(1).collect();
        assert_eq!(stream(&mut cards(), &chunks), b"[card]\n");
    }

    #[test]
    fn escape_sequences_pass_through_and_do_not_split_a_value() {
        let input = b"\x1b[32m4111 1111\x1b[1m 1111 1111\x1b[0m\r\n";
        let out = stream(&mut cards(), &[input]);
        assert_eq!(out, b"\x1b[32m[card]\x1b[1m\x1b[0m\r\n");
        // Colours outside a value keep their places.
        let out = stream(&mut cards(), &[b"\x1b[1mtotal:\x1b[0m 12\n"]);
        assert_eq!(out, b"\x1b[1mtotal:\x1b[0m 12\n");
        // A sequence split between chunks is still one sequence.
        let out = stream(&mut cards(), &[b"4111 1111 \x1b[3", b"1m1111 1111\n"]);
        assert_eq!(out, b"[card]\x1b[31m\n");
    }

    #[test]
    fn a_run_is_released_at_a_byte_no_value_contains() {
        let mut masker = cards();
        assert_eq!(masker.push(b"id: 42"), b"id:");
        assert!(masker.holds());
        assert_eq!(masker.push(b"\n"), b" 42\n");
        assert!(!masker.holds());
    }

    #[test]
    fn flush_releases_a_prompt_and_hides_the_rest_of_a_value_it_split() {
        let mut masker = cards();
        let mut out = masker.push(b"$ 4111 1111");
        out.extend(masker.flush());
        assert_eq!(out, b"$ 4111 1111");
        out.extend(masker.push(b" 1111 1111 ok\n"));
        // The first half was already on screen; the second half is hidden.
        assert_eq!(out, b"$ 4111 1111********** ok\n");
        // Text released by a flush and not part of a value is not repeated or changed.
        let mut masker = cards();
        let mut out = masker.push(b"user@host ~$ ");
        out.extend(masker.flush());
        out.extend(masker.push(b"ls\r\n"));
        assert_eq!(out, b"user@host ~$ ls\r\n");
    }

    #[test]
    fn the_hold_limit_releases_a_long_run_and_keeps_context() {
        let mut masker = cards().with_hold_limit(1024);
        let mut input = vec![b'x'; 1020];
        input.extend_from_slice(b" 4111 1111 1111 1111\n");
        let out = stream(&mut masker, &[&input]);
        let mut expected = vec![b'x'; 1020];
        // Released at the limit after ` 411`; the rest of the card is hidden.
        expected.extend_from_slice(b" 411****************\n");
        assert!(out == expected, "{}", String::from_utf8_lossy(&out));
    }

    #[test]
    fn escape_sequences_count_towards_the_hold_limit() {
        let mut masker = cards().with_hold_limit(1024);
        let mut out = masker.push(b"4111");
        for _ in 0..10_000 {
            out.extend(masker.push(b"\x1b[1m"));
        }
        assert!(masker.run.bytes.len() < 1024);
        out.extend(masker.push(b" 1111 1111 1111\n"));
        // The card began in released text: its rest is hidden.
        let shown = visible_text(&out);
        assert_eq!(shown, b"4111***************\n");
    }

    #[test]
    fn a_profile_without_detectors_holds_nothing() {
        let p = profile(Vec::new());
        let mut masker = masker(&p);
        assert_eq!(masker.push(b"user@host:~$ "), b"user@host:~$ ");
        assert!(!masker.holds());
    }

    #[test]
    fn emails_and_partial_masks_are_the_policy_masks() {
        let p = profile(vec![
            (
                Detector::Email,
                MaskKind::Redact {
                    replacement: "[email]".into(),
                },
            ),
            (
                Detector::CardNumber,
                MaskKind::Partial {
                    keep_first: 0,
                    keep_last: 4,
                },
            ),
        ]);
        let out = stream(
            &mut masker(&p),
            &[b"ann@example.com,4111-1111-", b"1111-1111\n"],
        );
        assert_eq!(out, b"[email],****-****-****-1111\n");
    }

    #[test]
    fn a_regex_profile_masks_whole_lines() {
        let p = profile(vec![(
            Detector::Regex(regex_detector("secret=[a-z]+")),
            MaskKind::Redact {
                replacement: "***".into(),
            },
        )]);
        let out = stream(&mut masker(&p), &[b"a, secret=", b"abc; b\n"]);
        assert_eq!(out, b"a, ***; b\n");
    }

    fn regex_detector(pattern: &str) -> regex::Regex {
        regex::Regex::new(pattern).unwrap()
    }

    #[test]
    fn output_without_values_is_unchanged_whatever_the_chunks() {
        let input: &[u8] =
            b"\x1b[?2004hroot@web:~# ls -l\r\ntotal 8\r\n\xe2\x94\x80 caf\xc3\xa9 1 2 3\r\n";
        for size in 1..8 {
            let chunks: Vec<&[u8]> = input.chunks(size).collect();
            assert_eq!(stream(&mut cards(), &chunks), input, "chunks of {size}");
        }
    }
}
