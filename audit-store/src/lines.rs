//! Splitting a segment into lines without trusting it: a line longer than the format allows is
//! reported instead of being buffered whole, so a hostile file cannot make a reader allocate
//! without bound.

use std::io::{self, BufRead, Read};

pub(crate) struct LineReader<R> {
    inner: R,
    max: usize,
    buf: Vec<u8>,
    offset: u64,
    number: u64,
}

pub(crate) enum RawLine<'a> {
    /// A line, without its `\n`. `terminated` is false only for the last bytes of the input.
    Line {
        bytes: &'a [u8],
        terminated: bool,
        offset: u64,
        number: u64,
    },
    /// More than `max` bytes without a newline; the reader is left mid-line and must be dropped.
    TooLong { offset: u64, number: u64 },
}

impl<R: BufRead> LineReader<R> {
    pub(crate) fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            max,
            buf: Vec::new(),
            offset: 0,
            number: 0,
        }
    }

    pub(crate) fn next_line(&mut self) -> io::Result<Option<RawLine<'_>>> {
        self.buf.clear();
        let limit = u64::try_from(self.max)
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        let read = (&mut self.inner)
            .take(limit)
            .read_until(b'\n', &mut self.buf)?;
        if read == 0 {
            return Ok(None);
        }
        let offset = self.offset;
        self.offset = self
            .offset
            .saturating_add(u64::try_from(read).unwrap_or(u64::MAX));
        self.number = self.number.saturating_add(1);
        let terminated = self.buf.last() == Some(&b'\n');
        if terminated {
            self.buf.pop();
        } else if self.buf.len() > self.max {
            return Ok(Some(RawLine::TooLong {
                offset,
                number: self.number,
            }));
        }
        Ok(Some(RawLine::Line {
            bytes: &self.buf,
            terminated,
            offset,
            number: self.number,
        }))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic, reason = "tests fail loudly")]
mod tests {
    use super::*;

    fn collect(input: &[u8], max: usize) -> Vec<String> {
        let mut reader = LineReader::new(input, max);
        let mut out = Vec::new();
        while let Some(line) = reader.next_line().unwrap() {
            match line {
                RawLine::Line {
                    bytes,
                    terminated,
                    offset,
                    number,
                } => out.push(format!(
                    "{number}@{offset}:{}{}",
                    String::from_utf8_lossy(bytes),
                    if terminated { "" } else { "(torn)" }
                )),
                RawLine::TooLong { offset, number } => {
                    out.push(format!("{number}@{offset}:too long"));
                    break;
                }
            }
        }
        out
    }

    #[test]
    fn splits_lines_and_flags_the_unterminated_tail() {
        assert_eq!(
            collect(b"ab\ncd\nef", 4),
            ["1@0:ab", "2@3:cd", "3@6:ef(torn)"]
        );
        assert_eq!(collect(b"", 4), Vec::<String>::new());
        assert_eq!(collect(b"\n", 4), ["1@0:"]);
    }

    #[test]
    fn a_line_over_the_limit_is_reported_not_buffered() {
        assert_eq!(collect(b"abcd\nabcde\n", 4), ["1@0:abcd", "2@5:too long"]);
        assert_eq!(collect(b"abcde", 4), ["1@0:too long"]);
    }
}
