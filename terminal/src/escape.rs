//! Escape sequences in a terminal byte stream, after ECMA-48 section 5 (control functions) and
//! the VT500 parser's shapes: CSI (`ESC [` parameters, intermediates, a final byte), the string
//! controls OSC, DCS, SOS, PM and APC (`ESC ]`, `ESC P`, `ESC X`, `ESC ^`, `ESC _`, ended by
//! BEL or `ESC \`), and the short `ESC` intermediates final forms (`ESC ( B`, `ESC 7`).
//!
//! A sequence that does not end within its bound, or that an unexpected byte interrupts, is
//! not an escape sequence: its bytes are handed back as text, so a stray `ESC` cannot make the
//! output that follows it bypass masking.

/// The longest control sequence (CSI or short form) taken as one: real ones are a few bytes.
const MAX_CONTROL: usize = 64;
/// The longest string control (an OSC 52 clipboard write of a few kilobytes, a title).
pub(crate) const MAX_STRING: usize = 8192;

const ESC: u8 = 0x1b;
const BEL: u8 = 0x07;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Ground,
    /// After `ESC`.
    Escape,
    /// After `ESC` and intermediates (0x20-0x2F).
    EscapeIntermediate,
    /// After `ESC [`.
    Csi,
    /// Inside a string control; `escape` after an `ESC` that may start the terminator.
    String {
        escape: bool,
    },
}

/// What one byte turned out to be.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Scanned {
    /// A byte of text (printable, a control such as `\n`, or part of a UTF-8 character).
    Text(u8),
    /// The byte continues a sequence that is not complete yet.
    Pending,
    /// The byte completed a sequence: these are all of its bytes.
    Sequence(Vec<u8>),
    /// The sequence was abandoned: these bytes (the byte just pushed included) are text.
    NotASequence(Vec<u8>),
}

#[derive(Debug)]
pub(crate) struct EscapeScanner {
    state: State,
    held: Vec<u8>,
}

impl Default for EscapeScanner {
    fn default() -> Self {
        EscapeScanner {
            state: State::Ground,
            held: Vec::new(),
        }
    }
}

impl EscapeScanner {
    /// The bytes of an unfinished sequence, which from now on count as text (end of stream).
    pub(crate) fn abandon(&mut self) -> Vec<u8> {
        self.state = State::Ground;
        std::mem::take(&mut self.held)
    }

    pub(crate) fn push(&mut self, byte: u8) -> Scanned {
        match self.state {
            State::Ground => {
                if byte == ESC {
                    self.state = State::Escape;
                    self.held.push(byte);
                    Scanned::Pending
                } else {
                    Scanned::Text(byte)
                }
            }
            State::Escape => match byte {
                b'[' => self.hold(byte, State::Csi),
                b']' | b'P' | b'X' | b'^' | b'_' => {
                    self.hold(byte, State::String { escape: false })
                }
                0x20..=0x2f => self.hold(byte, State::EscapeIntermediate),
                0x30..=0x7e => self.complete(byte),
                _ => self.not_a_sequence(byte),
            },
            State::EscapeIntermediate => match byte {
                0x20..=0x2f => self.hold_bounded(byte, State::EscapeIntermediate, MAX_CONTROL),
                0x30..=0x7e => self.complete(byte),
                _ => self.not_a_sequence(byte),
            },
            State::Csi => match byte {
                0x20..=0x3f => self.hold_bounded(byte, State::Csi, MAX_CONTROL),
                0x40..=0x7e => self.complete(byte),
                _ => self.not_a_sequence(byte),
            },
            State::String { escape } => {
                if byte == BEL || (escape && byte == b'\\') {
                    self.complete(byte)
                } else if escape && byte != ESC {
                    // `ESC` inside a string control that is not `ESC \`: not a terminal's
                    // string, so not passed through unmasked.
                    self.not_a_sequence(byte)
                } else {
                    self.hold_bounded(
                        byte,
                        State::String {
                            escape: byte == ESC,
                        },
                        MAX_STRING,
                    )
                }
            }
        }
    }

    fn hold(&mut self, byte: u8, next: State) -> Scanned {
        self.held.push(byte);
        self.state = next;
        Scanned::Pending
    }

    fn hold_bounded(&mut self, byte: u8, next: State, bound: usize) -> Scanned {
        if self.held.len() >= bound {
            return self.not_a_sequence(byte);
        }
        self.hold(byte, next)
    }

    fn complete(&mut self, byte: u8) -> Scanned {
        self.held.push(byte);
        self.state = State::Ground;
        Scanned::Sequence(std::mem::take(&mut self.held))
    }

    fn not_a_sequence(&mut self, byte: u8) -> Scanned {
        self.held.push(byte);
        self.state = State::Ground;
        Scanned::NotASequence(std::mem::take(&mut self.held))
    }
}

/// The text of `bytes` with its escape sequences left out (an unfinished one at the end counts
/// as text): what the masker's detectors look at.
pub fn visible_text(bytes: &[u8]) -> Vec<u8> {
    let mut scanner = EscapeScanner::default();
    let mut out = Vec::with_capacity(bytes.len());
    for &byte in bytes {
        match scanner.push(byte) {
            Scanned::Text(b) => out.push(b),
            Scanned::Pending | Scanned::Sequence(_) => {}
            Scanned::NotASequence(text) => out.extend_from_slice(&text),
        }
    }
    out.extend_from_slice(&scanner.abandon());
    out
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

    #[test]
    fn sequences_are_left_out_of_the_visible_text() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"a\x1b[31mb\x1b[0m", b"ab"),
            (b"a\x1b]0;title\x07b", b"ab"),
            (b"a\x1b]8;;http://x\x1b\\b", b"ab"),
            (b"a\x1b(Bb\x1b7c", b"abc"),
            (b"a\x1b[?1049hb", b"ab"),
            // Interrupted or unfinished: text.
            (b"a\x1b[3\nb", b"a\x1b[3\nb"),
            (b"a\x1b]0;x\x1bqb", b"a\x1b]0;x\x1bqb"),
            (b"a\x1b[12", b"a\x1b[12"),
            (b"\x1b\x1b[m", b"\x1b\x1b[m"),
        ];
        for (input, visible) in cases {
            assert_eq!(
                visible_text(input),
                visible.to_vec(),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn an_overlong_control_sequence_is_text() {
        let mut input = b"\x1b[".to_vec();
        input.extend(std::iter::repeat_n(b'1', MAX_CONTROL + 10));
        input.push(b'm');
        assert_eq!(visible_text(&input), input);
    }
}
