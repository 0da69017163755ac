//! Reading records in order across segments, for search and export. Each record's hash and its
//! link to the one before are checked on the way; a full check of seals and signatures is
//! `verify`'s job.

use crate::dir::skip_pruned;
use crate::dir::{list_segments, open_segment, read_anchor, read_error, SegmentFile};
use crate::error::StoreError;
use crate::format::{ChainHash, Line, MAX_LINE_BYTES};
use crate::lines::{LineReader, RawLine};
use crate::verify::{ChainState, SegmentChecker};
use std::io::BufRead;
use std::path::Path;

/// One record as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub time_ms: u64,
    pub prev: ChainHash,
    pub hash: ChainHash,
    /// The event exactly as it was appended.
    pub event: String,
}

struct CurrentSegment {
    segment: SegmentFile,
    is_newest: bool,
    lines: LineReader<Box<dyn BufRead + Send>>,
    checker: SegmentChecker<'static>,
}

/// An iterator over the records of a store directory from a given seq, oldest first. It stops
/// after the first error. A partial line at the end of the newest segment is taken as the end
/// (the writer may be in the middle of it), not as an error.
pub struct Reader {
    from_seq: u64,
    segments: std::vec::IntoIter<SegmentFile>,
    current: Option<CurrentSegment>,
    chain: Option<ChainState>,
    done: bool,
}

impl Reader {
    /// Starts at `seq`. Fails with `StoreError::Pruned` when records from `seq` on were already
    /// pruned locally; a `seq` past the end gives an empty iterator.
    pub fn from_seq(dir: &Path, seq: u64) -> Result<Reader, StoreError> {
        let anchor = read_anchor(dir)?;
        let all = list_segments(dir)?;
        let kept = skip_pruned(&all, anchor.as_ref());
        let first_available = kept
            .first()
            .map(|s| s.first_seq)
            .or_else(|| anchor.as_ref().map(|a| a.last_seq.saturating_add(1)))
            .unwrap_or(1);
        if seq < first_available && first_available > 1 {
            return Err(StoreError::Pruned {
                requested: seq,
                first_available,
            });
        }
        let start = kept
            .partition_point(|s| s.first_seq <= seq)
            .saturating_sub(1);
        let segments: Vec<SegmentFile> = kept.get(start..).unwrap_or_default().to_vec();
        Ok(Reader {
            from_seq: seq,
            segments: segments.into_iter(),
            current: None,
            chain: None,
            done: false,
        })
    }

    /// Starts at the oldest record still stored locally.
    pub fn all(dir: &Path) -> Result<Reader, StoreError> {
        let anchor = read_anchor(dir)?;
        let all = list_segments(dir)?;
        let first = skip_pruned(&all, anchor.as_ref())
            .first()
            .map(|s| s.first_seq)
            .unwrap_or(1);
        Reader::from_seq(dir, first)
    }

    fn advance(&mut self) -> Result<Option<Record>, StoreError> {
        loop {
            let current = match &mut self.current {
                Some(current) => current,
                None => {
                    let Some(segment) = self.segments.next() else {
                        return Ok(None);
                    };
                    if let Some(chain) = self.chain.filter(|c| c.next_seq != segment.first_seq) {
                        return Err(StoreError::Corrupt {
                            segment: segment.path,
                            line: None,
                            reason: format!(
                                "segment should start at seq {} (a segment is missing or misnamed)",
                                chain.next_seq
                            ),
                        });
                    }
                    let (lines, segment) = open_segment(&segment)?;
                    self.current.insert(CurrentSegment {
                        is_newest: self.segments.len() == 0,
                        lines: LineReader::new(lines, MAX_LINE_BYTES),
                        checker: SegmentChecker::new(Some(segment.first_seq), self.chain, None),
                        segment,
                    })
                }
            };
            let corrupt = |line: Option<u64>, reason: String| StoreError::Corrupt {
                segment: current.segment.path.clone(),
                line,
                reason,
            };
            let line = current
                .lines
                .next_line()
                .map_err(|e| read_error(&current.segment, e))?;
            // A compressed segment is sealed: it is never the one being written.
            let writing = current.is_newest && !current.segment.compressed;
            match line {
                None => {
                    current
                        .checker
                        .finish(writing)
                        .map_err(|r| corrupt(None, r.message))?;
                    self.chain = current.checker.state().or(self.chain);
                    self.current = None;
                }
                Some(RawLine::TooLong { number, .. }) => {
                    return Err(corrupt(Some(number), "line over the length limit".into()))
                }
                Some(RawLine::Line {
                    terminated: false,
                    number,
                    ..
                }) => {
                    if writing {
                        return Ok(None);
                    }
                    return Err(corrupt(Some(number), "segment ends mid-line".into()));
                }
                Some(RawLine::Line { bytes, number, .. }) => match current.checker.accept(bytes) {
                    Err(rejected) => return Err(corrupt(Some(number), rejected.message)),
                    Ok(Line::Seal(_)) => {}
                    Ok(Line::Record(record)) if record.seq >= self.from_seq => {
                        let event = String::from_utf8(record.event.to_vec())
                            .map_err(|_| corrupt(Some(number), "event is not UTF-8".into()))?;
                        return Ok(Some(Record {
                            seq: record.seq,
                            time_ms: record.time_ms,
                            prev: record.prev,
                            hash: record.hash,
                            event,
                        }));
                    }
                    Ok(Line::Record(_)) => {}
                },
            }
        }
    }
}

impl Iterator for Reader {
    type Item = Result<Record, StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.advance() {
            Ok(Some(record)) => Some(Ok(record)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
