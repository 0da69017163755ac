//! The guarded shell: rebuild the line a user is typing from the bytes their terminal sends
//! (and the echo the target sends back), and hand it over at Enter so a policy can decide it
//! before the shell sees the Enter. The caller withholds the Enter until it has decided; on a
//! denial it sends [`CLEAR_LINE`] upstream instead, so the shell discards the line, and shows
//! the user why ([`denial_notice`]).
//!
//! The editing model is readline's default (emacs) keys, which bash, zsh's line editor and
//! most REPLs share: printable characters insert at the cursor; backspace and DEL delete
//! before it; ctrl-U, ctrl-W and ctrl-K kill to the start, the previous word and the end;
//! ctrl-A/ctrl-E, ctrl-B/ctrl-F and the arrow, Home, End and Delete keys move and delete;
//! ctrl-C abandons the line; bracketed paste inserts its text as typed, newlines included.
//!
//! Its limits, said plainly: this is a guardrail against mistakes, not a sandbox.
//! - What runs is what the shell makes of the line: aliases, functions, scripts, `eval`,
//!   history expansion (`!!`, `!$`), variables and here-documents are the shell's, and a
//!   policy sees only the text typed. Deny a word and a user can type a script that says it.
//! - Keys whose effect only the shell knows (history with up/down or ctrl-R, completion
//!   lists, vi mode, Alt-key bindings, yank) make the line uncertain: [`TypedLine::certain`]
//!   is false and the caller should treat it as it treats undecidable lines. A single Tab
//!   completion is followed through its echo.
//! - Multi-line constructs (`for … do` on several lines, a quote left open) arrive one line
//!   at a time; each line is decided alone.
//! - Full-screen programs (an editor, `less`, `top`) get keys, not lines: the target
//!   switching to the alternate screen is reported as [`TypedLine::full_screen`].
//! - A line typed without echo (a password prompt) is reported with `echoed: false`: its
//!   text is likely a secret and must not be written to the audit trail.

use crate::escape::{EscapeScanner, Scanned};

/// Bytes that make the shell discard the line being edited: ctrl-E (end of line), then ctrl-U
/// (kill to the start of the line).
pub const CLEAR_LINE: &[u8] = b"\x05\x15";

/// The most input held while a line waits for its decision (the relay stops reading from the
/// client while [`LineGuard::waiting`], so this is only what was already read).
pub const MAX_QUEUED: usize = 64 * 1024;

/// The longest line followed; longer lines are reported uncertain.
pub const MAX_LINE: usize = 16 * 1024;

/// What the guard makes of input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guarded {
    /// Send these bytes upstream.
    Forward(Vec<u8>),
    /// A line ended: decide it, then call [`LineGuard::decided`]. Its Enter is withheld.
    Line(TypedLine),
}

/// A line typed at Enter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypedLine {
    pub text: String,
    /// Every key that edited it was followed; false after keys only the shell understands.
    pub certain: bool,
    /// The target echoed what was typed (false at a password prompt).
    pub echoed: bool,
    /// The target was showing a full-screen program (alternate screen).
    pub full_screen: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    #[error("more than {MAX_QUEUED} bytes of input arrived while a line waited for its decision")]
    QueueFull,
    #[error("no line is waiting for a decision")]
    NotWaiting,
}

/// One interactive channel's line reconstruction.
#[derive(Debug, Default)]
pub struct LineGuard {
    line: Vec<char>,
    cursor: usize,
    certain: bool,
    edited: bool,
    /// Visible output bytes since the first key of this line.
    echo: usize,
    /// The target is in the alternate screen.
    full_screen: bool,
    /// Inside a bracketed paste.
    pasting: bool,
    /// After a Tab: printable echo is the completion, inserted at the cursor.
    completing: bool,
    /// Printable bytes typed whose echo has not come back yet.
    unechoed: usize,
    /// The Enter of the line being decided.
    enter: Option<Vec<u8>>,
    queued: Vec<u8>,
    input_escape: Vec<u8>,
    utf8: Vec<u8>,
    output_escapes: EscapeScanner,
}

impl LineGuard {
    pub fn new() -> LineGuard {
        LineGuard {
            certain: true,
            ..LineGuard::default()
        }
    }

    /// Whether a line waits for [`LineGuard::decided`] (stop reading client input meanwhile).
    pub fn waiting(&self) -> bool {
        self.enter.is_some()
    }

    /// Whether the target has echoed any of the line's keys yet. A line typed ahead (pasted
    /// with its Enter, piped) reaches its Enter before its echo: the caller forwards its
    /// keys, waits a moment for the echo, and only then knows [`TypedLine::echoed`].
    pub fn echo_seen(&self) -> bool {
        self.echo > 0
    }

    /// Bytes the client sent. Stops at the first Enter that ends a non-empty line (the last
    /// item is then that [`Guarded::Line`]); later bytes wait for the decision.
    pub fn input(&mut self, bytes: &[u8]) -> Result<Vec<Guarded>, GuardError> {
        if self.waiting() {
            if self.queued.len().saturating_add(bytes.len()) > MAX_QUEUED {
                return Err(GuardError::QueueFull);
            }
            self.queued.extend_from_slice(bytes);
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut forward = Vec::new();
        for (index, &byte) in bytes.iter().enumerate() {
            if let Some(line) = self.key(byte, &mut forward) {
                if !forward.is_empty() {
                    out.push(Guarded::Forward(std::mem::take(&mut forward)));
                }
                out.push(Guarded::Line(line));
                self.queued
                    .extend_from_slice(bytes.get(index.saturating_add(1)..).unwrap_or_default());
                return Ok(out);
            }
        }
        if !forward.is_empty() {
            out.push(Guarded::Forward(forward));
        }
        Ok(out)
    }

    /// The decision on the waiting line: its Enter (allowed) or [`CLEAR_LINE`] (denied) to
    /// send upstream, then what the input queued meanwhile gives.
    pub fn decided(&mut self, allowed: bool) -> Result<Vec<Guarded>, GuardError> {
        let enter = self.enter.take().ok_or(GuardError::NotWaiting)?;
        let mut out = vec![Guarded::Forward(if allowed {
            enter
        } else {
            CLEAR_LINE.to_vec()
        })];
        self.reset();
        let queued = std::mem::take(&mut self.queued);
        out.extend(self.input(&queued)?);
        Ok(out)
    }

    /// Bytes the target sent to the terminal: the echo of what was typed, and the switches to
    /// and from the alternate screen.
    pub fn output(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            match self.output_escapes.push(byte) {
                Scanned::Text(b) => self.echoed(b),
                Scanned::Pending => {}
                Scanned::Sequence(sequence) => {
                    if self.completing {
                        // A completion drawn with escape sequences: not followed.
                        self.completing = false;
                        self.certain = false;
                    }
                    match sequence.as_slice() {
                        b"\x1b[?1049h" | b"\x1b[?1047h" | b"\x1b[?47h" => self.full_screen = true,
                        b"\x1b[?1049l" | b"\x1b[?1047l" | b"\x1b[?47l" => self.full_screen = false,
                        _ => {}
                    }
                }
                Scanned::NotASequence(text) => {
                    for b in text {
                        self.echoed(b);
                    }
                }
            }
        }
    }

    fn echoed(&mut self, byte: u8) {
        let printable = byte >= 0x20 && byte != 0x7f;
        if self.edited && printable {
            self.echo = self.echo.saturating_add(1);
        }
        if printable && self.unechoed > 0 {
            // The echo of a key typed before the Tab, not part of the completion.
            self.unechoed -= 1;
            return;
        }
        if !self.completing {
            return;
        }
        match byte {
            0x07 => {}
            0x20..=0x7e => self.insert(char::from(byte)),
            // Anything else (a list of completions, a redraw): the line is the shell's now.
            _ => {
                self.completing = false;
                self.certain = false;
            }
        }
    }

    fn reset(&mut self) {
        self.line.clear();
        self.cursor = 0;
        self.certain = true;
        self.edited = false;
        self.echo = 0;
        self.completing = false;
        self.unechoed = 0;
        self.pasting = false;
        self.utf8.clear();
        self.input_escape.clear();
    }

    /// One byte of input; the line when it is an Enter that ends a line worth deciding.
    fn key(&mut self, byte: u8, forward: &mut Vec<u8>) -> Option<TypedLine> {
        if byte != b'\t' {
            self.completing = false;
        }
        if !self.input_escape.is_empty() && !(0x20..0x7f).contains(&byte) {
            // An ESC that starts no sequence (Alt-key, vi mode): the shell's to interpret.
            // The control after it is still a key of its own, so an Enter is still withheld.
            forward.append(&mut self.input_escape);
            self.certain = false;
        }
        if byte >= 0x20 && byte != 0x7f && self.input_escape.is_empty() && byte != 0x1b {
            self.unechoed = self.unechoed.saturating_add(1);
        }
        if !self.input_escape.is_empty() || byte == 0x1b {
            self.input_escape.push(byte);
            if let Some(done) = self.escape_done() {
                let sequence = std::mem::take(&mut self.input_escape);
                forward.extend_from_slice(&sequence);
                if done {
                    self.escape(&sequence);
                } else {
                    self.certain = false;
                }
            }
            return None;
        }
        if byte >= 0x80 || !self.utf8.is_empty() {
            self.utf8.push(byte);
            forward.push(byte);
            match std::str::from_utf8(&self.utf8) {
                Ok(text) => {
                    let chars: Vec<char> = text.chars().collect();
                    self.utf8.clear();
                    for c in chars {
                        self.insert(c);
                    }
                }
                Err(e) if e.error_len().is_some() || self.utf8.len() >= 4 => {
                    self.utf8.clear();
                    self.insert(char::REPLACEMENT_CHARACTER);
                }
                Err(_) => {}
            }
            return None;
        }
        if self.pasting {
            forward.push(byte);
            match byte {
                b'\r' | b'\n' => self.insert('\n'),
                b'\t' => self.insert('\t'),
                0x20..=0x7e => self.insert(char::from(byte)),
                _ => self.certain = false,
            }
            return None;
        }
        match byte {
            b'\r' | b'\n' => {
                if self.line.iter().all(|c| c.is_whitespace()) && self.certain {
                    forward.push(byte);
                    self.reset();
                    return None;
                }
                self.enter = Some(vec![byte]);
                return Some(TypedLine {
                    text: self.line.iter().collect(),
                    certain: self.certain,
                    echoed: self.echo > 0,
                    full_screen: self.full_screen,
                });
            }
            0x20..=0x7e => self.insert(char::from(byte)),
            0x7f | 0x08 => {
                if self.cursor > 0 {
                    self.cursor -= 1;
                    self.line.remove(self.cursor);
                }
            }
            0x15 => {
                self.line.drain(..self.cursor);
                self.cursor = 0;
            }
            0x0b => self.line.truncate(self.cursor),
            0x17 => {
                let mut start = self.cursor;
                while start > 0 && self.line.get(start - 1).is_some_and(|c| c.is_whitespace()) {
                    start -= 1;
                }
                while start > 0 && self.line.get(start - 1).is_some_and(|c| !c.is_whitespace()) {
                    start -= 1;
                }
                self.line.drain(start..self.cursor);
                self.cursor = start;
            }
            0x01 => self.cursor = 0,
            0x05 => self.cursor = self.line.len(),
            0x02 => self.cursor = self.cursor.saturating_sub(1),
            0x06 => self.cursor = (self.cursor + 1).min(self.line.len()),
            0x04 => {
                if self.cursor < self.line.len() {
                    self.line.remove(self.cursor);
                }
            }
            0x03 => {
                // ctrl-C: the shell abandons the line.
                forward.push(byte);
                self.reset();
                return None;
            }
            b'\t' => {
                self.completing = true;
            }
            0x0c => {} // ctrl-L redraws the screen, the line stays.
            _ => self.certain = false,
        }
        self.edited = true;
        forward.push(byte);
        None
    }

    /// Whether the input escape sequence is complete: `Some(true)` understood as one,
    /// `Some(false)` ended but not one, `None` not yet.
    fn escape_done(&self) -> Option<bool> {
        let seq = self.input_escape.as_slice();
        match seq {
            [0x1b] => None,
            [0x1b, b'[' | b'O'] => None,
            [0x1b, b'[', rest @ ..] => {
                let last = *rest.last()?;
                match last {
                    0x40..=0x7e => Some(true),
                    0x20..=0x3f if seq.len() < 16 => None,
                    _ => Some(false),
                }
            }
            [0x1b, b'O', _] => Some(true),
            // Alt-key or an ESC of its own: only the shell knows what it does.
            _ => Some(false),
        }
    }

    fn escape(&mut self, sequence: &[u8]) {
        self.edited = true;
        match sequence {
            b"\x1b[200~" => self.pasting = true,
            b"\x1b[201~" => self.pasting = false,
            b"\x1b[D" | b"\x1bOD" => self.cursor = self.cursor.saturating_sub(1),
            b"\x1b[C" | b"\x1bOC" => self.cursor = (self.cursor + 1).min(self.line.len()),
            b"\x1b[H" | b"\x1bOH" | b"\x1b[1~" | b"\x1b[7~" => self.cursor = 0,
            b"\x1b[F" | b"\x1bOF" | b"\x1b[4~" | b"\x1b[8~" => self.cursor = self.line.len(),
            b"\x1b[3~" => {
                if self.cursor < self.line.len() {
                    self.line.remove(self.cursor);
                }
            }
            // Up/down (history) and anything else: the shell decides.
            _ => self.certain = false,
        }
    }

    fn insert(&mut self, c: char) {
        if self.line.len() >= MAX_LINE {
            self.certain = false;
            return;
        }
        self.line.insert(self.cursor.min(self.line.len()), c);
        self.cursor = (self.cursor + 1).min(self.line.len());
        self.edited = true;
    }
}

/// A one-line notice for the user's terminal: `reason` with control characters replaced, so a
/// policy's text cannot move the cursor or change the terminal.
pub fn denial_notice(reason: &str) -> Vec<u8> {
    let clean: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    format!("\r\nportcullis: line refused: {clean}\r\n").into_bytes()
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

    /// Type `input` (no output); the line reported at the first Enter.
    fn typed(input: &[u8]) -> TypedLine {
        let mut guard = LineGuard::new();
        guard.output(b"$ ");
        let events = guard.input(input).unwrap();
        match events.last() {
            Some(Guarded::Line(line)) => line.clone(),
            other => panic!("no line for {input:?}: {other:?}"),
        }
    }

    fn text(input: &[u8]) -> String {
        let line = typed(input);
        assert!(line.certain, "{input:?}");
        line.text
    }

    #[test]
    fn editing_keys_rebuild_the_line() {
        let cases: &[(&[u8], &str)] = &[
            (b"ls -l\r", "ls -l"),
            (b"lss\x7f -l\r", "ls -l"),
            (b"lss\x08\r", "ls"),
            (b"rm -rf /\x15ls\r", "ls"),
            (b"echo one two\x17three\r", "echo one three"),
            (b"echo one two  \x17\r", "echo one "),
            (b"cho\x01e\x05 x\r", "echo x"),
            (b"eco\x1b[Dh\x1b[C\x7fo\r", "echo"),
            (b"eco\x1bODh\x1bOF o\r", "echo o"),
            (b"xecho\x1b[H\x1b[3~\r", "echo"),
            (b"echo abc\x02\x02\x0b\r", "echo a"),
            (b"xls\x01\x04\r", "ls"),
            (b"echo caf\xc3\xa9\r", "echo café"),
            (b"\x1b[200~rm -rf /\rx\x1b[201~\r", "rm -rf /\nx"),
        ];
        for (input, expected) in cases {
            assert_eq!(text(input), *expected, "{input:?}");
        }
    }

    #[test]
    fn keys_only_the_shell_understands_make_the_line_uncertain() {
        for input in [
            &b"\x1b[A\r"[..],
            b"\x12rm\r",
            b"x\x1bb\r",
            b"\x1b[1;5D x\r",
            b"rm -rf /\x1b\r",
        ] {
            assert!(!typed(input).certain, "{input:?}");
        }
    }

    #[test]
    fn enter_is_withheld_until_decided_and_later_input_waits() {
        let mut guard = LineGuard::new();
        let events = guard.input(b"rm -rf /\rls\r").unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0], Guarded::Forward(b"rm -rf /".to_vec()));
        assert!(matches!(&events[1], Guarded::Line(l) if l.text == "rm -rf /"));
        assert!(guard.waiting());
        assert_eq!(guard.input(b"x").unwrap(), vec![]);
        // Denied: the line is cleared upstream, then the queued `ls\r` and `x` follow.
        let events = guard.decided(false).unwrap();
        assert_eq!(events[0], Guarded::Forward(CLEAR_LINE.to_vec()));
        assert_eq!(events[1], Guarded::Forward(b"ls".to_vec()));
        assert!(matches!(&events[2], Guarded::Line(l) if l.text == "ls"));
        let events = guard.decided(true).unwrap();
        assert_eq!(
            events,
            vec![
                Guarded::Forward(b"\r".to_vec()),
                Guarded::Forward(b"x".to_vec())
            ]
        );
        assert_eq!(guard.decided(true), Err(GuardError::NotWaiting));
    }

    #[test]
    fn empty_lines_and_ctrl_c_pass_without_a_decision() {
        let mut guard = LineGuard::new();
        assert_eq!(
            guard.input(b"\r  \rrm\x03\r").unwrap(),
            vec![Guarded::Forward(b"\r  \rrm\x03\r".to_vec())]
        );
        assert!(!guard.waiting());
    }

    #[test]
    fn a_full_queue_is_an_error_not_growth() {
        let mut guard = LineGuard::new();
        guard.input(b"x\r").unwrap();
        assert!(guard.input(&vec![b'a'; MAX_QUEUED]).is_ok());
        assert_eq!(guard.input(b"a"), Err(GuardError::QueueFull));
    }

    #[test]
    fn echo_tells_a_password_prompt_and_completes_a_tab() {
        // Typed and echoed.
        let mut guard = LineGuard::new();
        guard.input(b"l").unwrap();
        guard.output(b"l");
        let events = guard.input(b"s\r").unwrap();
        assert!(matches!(&events[1], Guarded::Line(l) if l.echoed && l.text == "ls"));
        // At a password prompt nothing comes back.
        let mut guard = LineGuard::new();
        guard.output(b"Password: ");
        let events = guard.input(b"hunter2\r").unwrap();
        assert!(matches!(&events[1], Guarded::Line(l) if !l.echoed));
        // Tab: the completion echoed is part of the line, the echo of the keys before it not.
        let mut guard = LineGuard::new();
        guard.input(b"systemctl rest\t").unwrap();
        guard.output(b"systemctl rest");
        guard.output(b"art ");
        let events = guard.input(b"app\r").unwrap();
        assert!(
            matches!(&events[1], Guarded::Line(l) if l.certain && l.text == "systemctl restart app")
        );
        // A list of completions: the shell's line now.
        let mut guard = LineGuard::new();
        guard.input(b"ls /e\t\t").unwrap();
        guard.output(b"\r\nenv etc\r\n$ ls /e");
        let events = guard.input(b"tc\r").unwrap();
        assert!(matches!(&events[1], Guarded::Line(l) if !l.certain));
    }

    #[test]
    fn the_alternate_screen_is_reported() {
        let mut guard = LineGuard::new();
        guard.output(b"\x1b[?1049h");
        let events = guard.input(b":q\r").unwrap();
        assert!(matches!(&events[1], Guarded::Line(l) if l.full_screen));
        guard.output(b"\x1b[?1049l");
        guard.decided(true).unwrap();
        let events = guard.input(b"ls\r").unwrap();
        assert!(matches!(&events[1], Guarded::Line(l) if !l.full_screen));
    }

    #[test]
    fn the_notice_cannot_drive_the_terminal() {
        assert_eq!(
            denial_notice("no\x1b[2J rm"),
            b"\r\nportcullis: line refused: no [2J rm\r\n"
        );
    }
}
