//! What a terminal shows after some output: a grid of characters, rebuilt from the bytes a
//! recording holds, for replaying a session in a page without a script (the console renders
//! the screen at a moment of the recording as text). Deliberately small: text, carriage
//! return, line feed with scrolling, backspace, tab, and the cursor moves and erasures of
//! ECMA-48 that shells and line editors use (CUU/CUD/CUF/CUB, CUP/HVP, CHA, VPA, ED, EL).
//! Everything else (colours, modes, titles, the alternate screen) is left out: the screen
//! may differ from a real terminal's for full-screen programs, never in which characters
//! were written.

use crate::escape::{EscapeScanner, Scanned};

/// Largest screen rebuilt; a recording's header may claim anything.
const MAX_COLUMNS: u16 = 500;
const MAX_ROWS: u16 = 200;

pub struct Screen {
    columns: usize,
    rows: usize,
    cells: Vec<Vec<char>>,
    row: usize,
    column: usize,
    scanner: EscapeScanner,
    /// Bytes of a UTF-8 character not complete yet.
    partial: Vec<u8>,
}

impl Screen {
    pub fn new(columns: u16, rows: u16) -> Screen {
        let columns = usize::from(columns.clamp(1, MAX_COLUMNS));
        let rows = usize::from(rows.clamp(1, MAX_ROWS));
        Screen {
            columns,
            rows,
            cells: vec![vec![' '; columns]; rows],
            row: 0,
            column: 0,
            scanner: EscapeScanner::default(),
            partial: Vec::new(),
        }
    }

    /// Takes output bytes, as the terminal would.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            match self.scanner.push(byte) {
                Scanned::Text(b) => self.byte(b),
                Scanned::Pending => {}
                Scanned::Sequence(seq) => self.sequence(&seq),
                Scanned::NotASequence(text) => text.into_iter().for_each(|b| self.byte(b)),
            }
        }
    }

    /// The screen's lines, trailing spaces trimmed, trailing empty lines dropped.
    pub fn text(&self) -> String {
        let mut lines: Vec<String> = self
            .cells
            .iter()
            .map(|r| r.iter().collect::<String>().trim_end().to_string())
            .collect();
        while lines.last().is_some_and(String::is_empty) {
            lines.pop();
        }
        lines.join("\n")
    }

    fn byte(&mut self, b: u8) {
        if !self.partial.is_empty() || b >= 0x80 {
            self.partial.push(b);
            match std::str::from_utf8(&self.partial) {
                Ok(s) => {
                    let c = s.chars().next().unwrap_or('\u{fffd}');
                    self.partial.clear();
                    self.put(c);
                }
                // The held bytes are no character: one replacement for them, and what came
                // after them (ASCII that ended a broken sequence) is taken again as itself.
                Err(e) => match e.error_len() {
                    Some(len) => {
                        let rest = self
                            .partial
                            .split_off((e.valid_up_to() + len).min(self.partial.len()));
                        self.partial.clear();
                        self.put('\u{fffd}');
                        rest.into_iter().for_each(|b| self.byte(b));
                    }
                    None if self.partial.len() >= 4 => {
                        self.partial.clear();
                        self.put('\u{fffd}');
                    }
                    None => {}
                },
            }
            return;
        }
        match b {
            b'\r' => self.column = 0,
            b'\n' | 0x0b | 0x0c => self.line_feed(),
            0x08 => self.column = self.column.saturating_sub(1),
            b'\t' => {
                self.column = ((self.column / 8) + 1)
                    .saturating_mul(8)
                    .min(self.columns - 1)
            }
            0x20..=0x7e => self.put(char::from(b)),
            // BEL and the other C0 controls draw nothing.
            _ => {}
        }
    }

    fn put(&mut self, c: char) {
        if self.column >= self.columns {
            self.column = 0;
            self.line_feed();
        }
        if let Some(cell) = self
            .cells
            .get_mut(self.row)
            .and_then(|r| r.get_mut(self.column))
        {
            *cell = if c.is_control() { '\u{fffd}' } else { c };
        }
        self.column += 1;
    }

    fn line_feed(&mut self) {
        if self.row + 1 < self.rows {
            self.row += 1;
        } else {
            self.cells.remove(0);
            self.cells.push(vec![' '; self.columns]);
        }
    }

    fn sequence(&mut self, seq: &[u8]) {
        // `ESC c`: reset.
        if seq == b"\x1bc" {
            *self = Screen::new(self.columns as u16, self.rows as u16);
            return;
        }
        let Some(body) = seq.strip_prefix(b"\x1b[") else {
            return;
        };
        let Some((&last, params)) = body.split_last() else {
            return;
        };
        // Private modes (`?25h`) and the like change no character.
        if params
            .first()
            .is_some_and(|p| !p.is_ascii_digit() && *p != b';')
        {
            return;
        }
        let numbers: Vec<usize> = params
            .split(|b| *b == b';')
            // Digits only, saturating: a number larger than any screen means "to the edge".
            .map(|p| {
                p.iter()
                    .filter(|b| b.is_ascii_digit())
                    .fold(0usize, |n, b| {
                        n.saturating_mul(10).saturating_add(usize::from(b - b'0'))
                    })
            })
            .collect();
        let n = |i: usize, default: usize| {
            numbers
                .get(i)
                .copied()
                .filter(|v| *v != 0)
                .unwrap_or(default)
        };
        let (rows, columns) = (self.rows, self.columns);
        match last {
            b'A' => self.row = self.row.saturating_sub(n(0, 1)),
            b'B' => self.row = self.row.saturating_add(n(0, 1)).min(rows - 1),
            b'C' => self.column = self.column.saturating_add(n(0, 1)).min(columns - 1),
            b'D' => self.column = self.column.saturating_sub(n(0, 1)),
            b'H' | b'f' => {
                self.row = (n(0, 1) - 1).min(rows - 1);
                self.column = (n(1, 1) - 1).min(columns - 1);
            }
            b'G' => self.column = (n(0, 1) - 1).min(columns - 1),
            b'd' => self.row = (n(0, 1) - 1).min(rows - 1),
            b'J' => match numbers.first().copied().unwrap_or(0) {
                0 => {
                    self.erase_line(self.column, columns);
                    for r in self.row + 1..rows {
                        self.blank(r, 0, columns);
                    }
                }
                1 => {
                    for r in 0..self.row {
                        self.blank(r, 0, columns);
                    }
                    self.erase_line(0, self.column + 1);
                }
                _ => (0..rows).for_each(|r| self.blank(r, 0, columns)),
            },
            b'K' => match numbers.first().copied().unwrap_or(0) {
                0 => self.erase_line(self.column, columns),
                1 => self.erase_line(0, self.column + 1),
                _ => self.erase_line(0, columns),
            },
            _ => {}
        }
    }

    fn erase_line(&mut self, from: usize, to: usize) {
        self.blank(self.row, from, to);
    }

    fn blank(&mut self, row: usize, from: usize, to: usize) {
        if let Some(r) = self.cells.get_mut(row) {
            for cell in r.iter_mut().take(to).skip(from) {
                *cell = ' ';
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;

    fn shown(columns: u16, rows: u16, bytes: &[u8]) -> String {
        let mut s = Screen::new(columns, rows);
        s.feed(bytes);
        s.text()
    }

    #[test]
    fn a_shell_session_reads_as_the_terminal_showed_it() {
        let cases: &[(&[u8], &str)] = &[
            (b"$ ls\r\nfile\r\n$ ", "$ ls\nfile\n$"),
            // Colours draw nothing; a title is not text.
            (b"\x1b[31mred\x1b[0m \x1b]0;title\x07ok", "red ok"),
            // A line editor redraws: carriage return, erase to the end, the new text.
            (b"$ lss\x08 \x08\r\x1b[K$ ls", "$ ls"),
            // Clear the screen and write at the top left.
            (b"old\r\nlines\x1b[2J\x1b[Hnew", "new"),
            // Moves by more than any screen (or than a usize) stop at its edge.
            (
                b"a\x1b[99999999999999999999999Bb\x1b[18446744073709551615Cc",
                "a\n\n\n\n b                 c",
            ),
            // Cursor positioning (row 2, column 3) and moves.
            (b"\x1b[2;3Hx\x1b[Ay", "   y\n  x"),
            // UTF-8 split across feeds is still one character; an invalid byte is shown as such.
            ("héllo".as_bytes(), "héllo"),
            (b"a\xffb", "a\u{fffd}b"),
            // A broken sequence does not swallow the letter that broke it.
            (b"\xe6A", "\u{fffd}A"),
            // Private modes change no character.
            (b"\x1b[?25lhidden cursor\x1b[?25h", "hidden cursor"),
        ];
        for (bytes, want) in cases {
            assert_eq!(
                shown(20, 5, bytes),
                *want,
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }

    #[test]
    fn long_output_wraps_and_scrolls_within_the_screen() {
        assert_eq!(shown(4, 2, b"abcdefgh"), "abcd\nefgh");
        assert_eq!(shown(10, 2, b"1\r\n2\r\n3\r\n4"), "3\n4");
        // A header claiming a huge screen is bounded.
        let mut s = Screen::new(u16::MAX, u16::MAX);
        s.feed(b"x");
        assert_eq!(s.text(), "x");
        // Cursor moves past the edges stay on the screen.
        assert_eq!(shown(3, 2, b"\x1b[99;99Hz\x1b[99D\x1b[99Aw"), "w\n  z");
    }

    #[test]
    fn a_character_split_across_two_feeds_is_one_character() {
        let mut s = Screen::new(10, 2);
        let bytes = "é".as_bytes();
        s.feed(&bytes[..1]);
        s.feed(&bytes[1..]);
        assert_eq!(s.text(), "é");
    }
}
