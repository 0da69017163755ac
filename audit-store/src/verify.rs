//! Checking the chain: the per-segment rules (sans-IO, shared by `verify`, the reader, recovery
//! on open and the fuzz target) and the walk over a whole directory.

use crate::dir::{list_segments, open_segment, read_anchor, read_tail_seal};
use crate::format::{parse_line, ChainHash, Line, Seal, MAX_LINE_BYTES};
use crate::lines::{LineReader, RawLine};
use ed25519_dalek::VerifyingKey;
use std::fmt;
use std::io::BufRead;
use std::path::Path;

/// What kind of damage `verify` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakKind {
    /// A file could not be listed or read.
    Io,
    /// A line is not a well-formed, canonical record or seal line.
    Malformed,
    /// The file ends inside a line (cut mid-record, or a torn write not yet recovered).
    Truncated,
    /// A record's hash does not match its contents: its event, time, seq or hash was edited.
    RecordAltered,
    /// A record does not chain to the one before it: that one was rewritten, or this one's prev.
    ChainBroken,
    /// Sequence numbers jump forward and the missing record is not further on: it was deleted.
    RecordMissing,
    /// Sequence numbers jump forward but the missing record is further on: records were moved.
    RecordsReordered,
    /// A sequence number already seen appears again.
    RecordRepeated,
    /// A whole segment between two others (or before the first) is gone.
    SegmentMissing,
    /// A segment file's contents do not start where its name says: swapped or renamed files.
    SegmentOutOfPlace,
    /// A segment that is not the newest has no seal line at its end.
    SealMissing,
    /// A seal's counts or final hash disagree with the records it closes.
    SealMismatch,
    /// A key was given but a seal carries no signature.
    SealUnsigned,
    /// A seal's signature does not verify with the given key.
    SealSignatureInvalid,
    /// Lines follow a segment's seal.
    DataAfterSeal,
    /// The prune anchor is unreadable or its signature is bad.
    AnchorInvalid,
    /// A compressed segment does not decompress (its checksum fails, it was cut or edited),
    /// or the seal copied into its trailer differs from the seal inside.
    CompressedCorrupt,
}

/// Where and how the chain first breaks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainBreak {
    pub kind: BreakKind,
    /// File name of the segment (or the anchor) in which the break was found.
    pub segment: Option<String>,
    /// 1-based line within that file.
    pub line: Option<u64>,
    /// The sequence number the break concerns (the expected one when a record is missing).
    pub seq: Option<u64>,
    /// A sentence an operator can act on.
    pub message: String,
}

impl fmt::Display for ChainBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(segment) = &self.segment {
            write!(f, "{segment}")?;
            if let Some(line) = self.line {
                write!(f, " line {line}")?;
            }
            if let Some(seq) = self.seq {
                write!(f, " (seq {seq})")?;
            }
            write!(f, ": ")?;
        }
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

/// The outcome of `verify`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VerifyReport {
    pub ok: bool,
    pub segments: usize,
    pub sealed_segments: usize,
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// Records up to this seq were pruned (the anchor), if any were.
    pub pruned_upto: Option<u64>,
    /// True when a key was given, so every seal's signature was checked.
    pub signatures_checked: bool,
    pub first_break: Option<ChainBreak>,
}

/// Where the next record must continue the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ChainState {
    pub next_seq: u64,
    pub prev: ChainHash,
}

impl ChainState {
    pub(crate) const START: ChainState = ChainState {
        next_seq: 1,
        prev: ChainHash::GENESIS,
    };

    pub(crate) fn after(seal: &Seal) -> Option<ChainState> {
        Some(ChainState {
            next_seq: seal.last_seq.checked_add(1)?,
            prev: seal.final_hash,
        })
    }
}

/// A rule broken by one line, before the caller adds the file and line number.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejected {
    pub kind: BreakKind,
    pub seq: Option<u64>,
    pub message: String,
}

impl Rejected {
    fn new(kind: BreakKind, seq: Option<u64>, message: impl Into<String>) -> Self {
        Rejected {
            kind,
            seq,
            message: message.into(),
        }
    }

    pub(crate) fn at(self, segment: &str, line: Option<u64>) -> ChainBreak {
        ChainBreak {
            kind: self.kind,
            segment: Some(segment.to_owned()),
            line,
            seq: self.seq,
            message: self.message,
        }
    }
}

/// The rules for the lines of one segment, fed one line at a time.
pub(crate) struct SegmentChecker<'k> {
    /// The first seq the file name declares; `None` when checking bare bytes.
    name_seq: Option<u64>,
    /// `None` until known: then the first record is taken at its word and checked only inside.
    expect: Option<ChainState>,
    key: Option<&'k VerifyingKey>,
    first_seq: Option<u64>,
    records: u64,
    seal: Option<Seal>,
}

impl<'k> SegmentChecker<'k> {
    pub(crate) fn new(
        name_seq: Option<u64>,
        expect: Option<ChainState>,
        key: Option<&'k VerifyingKey>,
    ) -> Self {
        SegmentChecker {
            name_seq,
            expect,
            key,
            first_seq: None,
            records: 0,
            seal: None,
        }
    }

    pub(crate) fn records(&self) -> u64 {
        self.records
    }

    pub(crate) fn seal(&self) -> Option<&Seal> {
        self.seal.as_ref()
    }

    pub(crate) fn state(&self) -> Option<ChainState> {
        self.expect
    }

    pub(crate) fn first_seq(&self) -> Option<u64> {
        self.first_seq
    }

    fn expected_seq(&self) -> Option<u64> {
        self.expect.map(|e| e.next_seq)
    }

    pub(crate) fn accept<'a>(&mut self, line: &'a [u8]) -> Result<Line<'a>, Rejected> {
        let parsed = parse_line(line)
            .map_err(|e| Rejected::new(BreakKind::Malformed, self.expected_seq(), e.to_string()))?;
        if let Some(seal) = &self.seal {
            return Err(Rejected::new(
                BreakKind::DataAfterSeal,
                None,
                format!(
                    "a line follows the seal of records {}..={}; nothing may be added to a sealed segment",
                    seal.first_seq, seal.last_seq
                ),
            ));
        }
        match &parsed {
            Line::Record(record) => self.accept_record(record)?,
            Line::Seal(seal) => self.accept_seal(seal)?,
        }
        Ok(parsed)
    }

    fn accept_record(&mut self, record: &crate::format::RecordView<'_>) -> Result<(), Rejected> {
        let seq = record.seq;
        if self.records == 0 {
            if let Some(name_seq) = self.name_seq.filter(|n| *n != seq) {
                return Err(Rejected::new(
                    BreakKind::SegmentOutOfPlace,
                    Some(seq),
                    format!(
                        "the file name says the segment starts at seq {name_seq} but its first record is seq {seq}: segment files were swapped or renamed"
                    ),
                ));
            }
        }
        if let Some(expect) = self.expect {
            if seq > expect.next_seq {
                return Err(Rejected::new(
                    BreakKind::RecordMissing,
                    Some(expect.next_seq),
                    format!(
                        "expected seq {} but found seq {seq}: record(s) {}..={} were deleted",
                        expect.next_seq,
                        expect.next_seq,
                        seq.saturating_sub(1)
                    ),
                ));
            }
            if seq < expect.next_seq {
                return Err(Rejected::new(
                    BreakKind::RecordRepeated,
                    Some(seq),
                    format!(
                        "expected seq {} but found seq {seq} again: a record was duplicated or replayed",
                        expect.next_seq
                    ),
                ));
            }
            if record.prev != expect.prev {
                return Err(Rejected::new(
                    BreakKind::ChainBroken,
                    Some(seq),
                    format!(
                        "prev hash {} is not the hash {} of seq {}: that record was rewritten, or this record's prev was edited",
                        record.prev,
                        expect.prev,
                        seq.saturating_sub(1)
                    ),
                ));
            }
        }
        let computed = record.computed_hash();
        if computed != record.hash {
            return Err(Rejected::new(
                BreakKind::RecordAltered,
                Some(seq),
                format!(
                    "stored hash {} does not match the record's contents (hash {computed}): its event, time, seq or hash was edited",
                    record.hash
                ),
            ));
        }
        let next_seq = seq.checked_add(1).ok_or_else(|| {
            Rejected::new(
                BreakKind::Malformed,
                Some(seq),
                "sequence number at its maximum",
            )
        })?;
        self.expect = Some(ChainState {
            next_seq,
            prev: record.hash,
        });
        self.first_seq.get_or_insert(seq);
        self.records = self.records.saturating_add(1);
        Ok(())
    }

    fn accept_seal(&mut self, seal: &Seal) -> Result<(), Rejected> {
        let (Some(first_seq), Some(expect)) = (self.first_seq, self.expect) else {
            return Err(Rejected::new(
                BreakKind::SealMismatch,
                None,
                "seal before any record: the sealed records were deleted",
            ));
        };
        let last_seq = expect.next_seq.saturating_sub(1);
        let mismatch = if seal.first_seq != first_seq || seal.last_seq != last_seq {
            Some(format!(
                "seal covers seq {}..={} but the segment holds seq {first_seq}..={last_seq}",
                seal.first_seq, seal.last_seq
            ))
        } else if seal.count != self.records {
            Some(format!(
                "seal counts {} records but the segment holds {}",
                seal.count, self.records
            ))
        } else if seal.final_hash != expect.prev {
            Some(format!(
                "seal final hash {} is not the hash {} of the last record",
                seal.final_hash, expect.prev
            ))
        } else {
            None
        };
        if let Some(message) = mismatch {
            return Err(Rejected::new(
                BreakKind::SealMismatch,
                Some(seal.last_seq),
                message,
            ));
        }
        if let Some(key) = self.key {
            if seal.sig.is_none() {
                return Err(Rejected::new(
                    BreakKind::SealUnsigned,
                    Some(seal.last_seq),
                    "seal has no signature but a verifying key was given: it was written without the key, or the signature was stripped",
                ));
            }
            if !seal.signature_is_valid(key) {
                return Err(Rejected::new(
                    BreakKind::SealSignatureInvalid,
                    Some(seal.last_seq),
                    "seal signature does not verify with the given key: the seal was forged or the segment re-sealed by someone else",
                ));
            }
        }
        self.seal = Some(seal.clone());
        Ok(())
    }

    /// The end-of-file rule: every segment but the newest is sealed.
    pub(crate) fn finish(&self, is_newest: bool) -> Result<(), Rejected> {
        if is_newest || self.seal.is_some() {
            return Ok(());
        }
        Err(Rejected::new(
            BreakKind::SealMissing,
            self.expected_seq(),
            "segment is not the newest but has no seal line: it was truncated or its seal removed",
        ))
    }
}

/// A summary of one segment's bytes that passed `check_segment_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentSummary {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub seal: Option<Seal>,
}

/// Checks the bytes of one segment on their own (the first record is taken as the start).
/// Never panics, whatever the input; the fuzz target drives this.
pub fn check_segment_bytes(
    bytes: &[u8],
    key: Option<&VerifyingKey>,
) -> Result<SegmentSummary, ChainBreak> {
    let mut checker = SegmentChecker::new(None, None, key);
    check_lines(
        &mut checker,
        LineReader::new(bytes, MAX_LINE_BYTES),
        "<bytes>",
        BreakKind::Io,
    )?;
    Ok(SegmentSummary {
        records: checker.records(),
        first_seq: checker.first_seq(),
        seal: checker.seal().cloned(),
    })
}

/// Feeds every line to `checker`; the first rule broken is returned with its place.
/// `read_kind`: what a read error means (for a compressed segment, that it does not
/// decompress).
fn check_lines<R: BufRead>(
    checker: &mut SegmentChecker<'_>,
    mut lines: LineReader<R>,
    segment: &str,
    read_kind: BreakKind,
) -> Result<(), ChainBreak> {
    loop {
        let line = lines.next_line().map_err(|e| ChainBreak {
            kind: read_kind,
            segment: Some(segment.to_owned()),
            line: None,
            seq: checker.expected_seq(),
            message: if read_kind == BreakKind::CompressedCorrupt {
                format!("the compressed segment does not decompress ({e}): it was altered or cut")
            } else {
                format!("read failed: {e}")
            },
        })?;
        let (bytes, terminated, number) = match line {
            None => return Ok(()),
            Some(RawLine::TooLong { number, .. }) => {
                return Err(Rejected::new(
                    BreakKind::Malformed,
                    checker.expected_seq(),
                    format!("line is longer than the {MAX_LINE_BYTES}-byte limit"),
                )
                .at(segment, Some(number)))
            }
            Some(RawLine::Line {
                bytes,
                terminated,
                number,
                ..
            }) => (bytes, terminated, number),
        };
        if !terminated {
            return Err(Rejected::new(
                BreakKind::Truncated,
                checker.expected_seq(),
                format!(
                    "file ends {} bytes into a line with no newline: cut mid-record, or a torn write that opening the store would recover",
                    bytes.len()
                ),
            )
            .at(segment, Some(number)));
        }
        if let Err(rejected) = checker.accept(bytes) {
            let rejected = if rejected.kind == BreakKind::RecordMissing {
                classify_jump(rejected, &mut lines)
            } else {
                rejected
            };
            return Err(rejected.at(segment, Some(number)));
        }
    }
}

/// A forward jump in seq means deleted records unless the skipped one turns up later in the
/// same segment, which means they were moved. Only called once the chain is already broken.
fn classify_jump<R: BufRead>(rejected: Rejected, lines: &mut LineReader<R>) -> Rejected {
    let Some(wanted) = rejected.seq else {
        return rejected;
    };
    while let Ok(Some(RawLine::Line { bytes, .. })) = lines.next_line() {
        if let Ok(Line::Record(record)) = parse_line(bytes) {
            if record.seq == wanted {
                return Rejected::new(
                    BreakKind::RecordsReordered,
                    Some(wanted),
                    format!(
                        "expected seq {wanted} here but it appears later in the segment: records were reordered"
                    ),
                );
            }
        }
    }
    rejected
}

/// Checks the whole directory: every segment, every record, every seal, and that segments
/// follow each other without a gap from the start of the store (or the prune anchor).
pub fn verify(dir: &Path, public_key: Option<&VerifyingKey>) -> VerifyReport {
    let mut report = VerifyReport {
        signatures_checked: public_key.is_some(),
        ..VerifyReport::default()
    };
    match verify_into(dir, public_key, &mut report) {
        Ok(()) => report.ok = true,
        Err(chain_break) => report.first_break = Some(chain_break),
    }
    report
}

fn verify_into(
    dir: &Path,
    key: Option<&VerifyingKey>,
    report: &mut VerifyReport,
) -> Result<(), ChainBreak> {
    let io_break = |e: crate::StoreError| ChainBreak {
        kind: BreakKind::Io,
        segment: None,
        line: None,
        seq: None,
        message: e.to_string(),
    };
    let anchor_break = |message: String| ChainBreak {
        kind: BreakKind::AnchorInvalid,
        segment: Some(crate::dir::ANCHOR_FILE.to_owned()),
        line: Some(1),
        seq: None,
        message,
    };
    let segments = list_segments(dir).map_err(io_break)?;
    let anchor = read_anchor(dir).map_err(|e| anchor_break(e.to_string()))?;
    let mut expect = ChainState::START;
    if let Some(anchor) = &anchor {
        if let Some(key) = key {
            if !anchor.signature_is_valid(key) {
                return Err(anchor_break(
                    "the prune anchor's seal signature is missing or does not verify: it was forged".into(),
                ));
            }
        }
        expect = ChainState::after(anchor)
            .ok_or_else(|| anchor_break("anchor seq at its maximum".into()))?;
        report.pruned_upto = Some(anchor.last_seq);
    }
    let kept = crate::dir::skip_pruned(&segments, anchor.as_ref());
    let count = kept.len();
    for (index, segment) in kept.iter().enumerate() {
        let is_newest = index.saturating_add(1) == count;
        if segment.first_seq > expect.next_seq {
            return Err(ChainBreak {
                kind: BreakKind::SegmentMissing,
                segment: Some(segment.name.clone()),
                line: None,
                seq: Some(expect.next_seq),
                message: format!(
                    "records {}..={} are missing: the segment holding them was removed",
                    expect.next_seq,
                    segment.first_seq.saturating_sub(1)
                ),
            });
        }
        if segment.first_seq < expect.next_seq {
            return Err(ChainBreak {
                kind: BreakKind::SegmentOutOfPlace,
                segment: Some(segment.name.clone()),
                line: None,
                seq: Some(segment.first_seq),
                message: format!(
                    "the file name says the segment starts at seq {} but the previous segment already reached seq {}: a segment was renamed or copied",
                    segment.first_seq,
                    expect.next_seq.saturating_sub(1)
                ),
            });
        }
        let (lines, segment) = open_segment(segment).map_err(|e| ChainBreak {
            kind: BreakKind::Io,
            segment: Some(segment.name.clone()),
            line: None,
            seq: None,
            message: format!("open failed: {e}"),
        })?;
        let mut checker = SegmentChecker::new(Some(segment.first_seq), Some(expect), key);
        let read_kind = if segment.compressed {
            BreakKind::CompressedCorrupt
        } else {
            BreakKind::Io
        };
        check_lines(
            &mut checker,
            LineReader::new(lines, MAX_LINE_BYTES),
            &segment.name,
            read_kind,
        )?;
        // Only a sealed segment is ever compressed, so one is never the segment being written.
        checker
            .finish(is_newest && !segment.compressed)
            .map_err(|r| r.at(&segment.name, None))?;
        if segment.compressed {
            check_trailer(&segment, checker.seal())?;
        }
        report.segments = report.segments.saturating_add(1);
        report.records = report.records.saturating_add(checker.records());
        if checker.seal().is_some() {
            report.sealed_segments = report.sealed_segments.saturating_add(1);
        }
        if let Some(first) = checker.first_seq() {
            report.first_seq.get_or_insert(first);
        }
        if let Some(state) = checker.state() {
            expect = state;
        }
        if checker.records() > 0 {
            report.last_seq = Some(expect.next_seq.saturating_sub(1));
        }
    }
    Ok(())
}

/// The seal copied into a compressed segment's trailer (what opening the store trusts
/// without decompressing) must be the seal inside.
fn check_trailer(
    segment: &crate::dir::SegmentFile,
    inner: Option<&Seal>,
) -> Result<(), ChainBreak> {
    let trailer = read_tail_seal(segment).map_err(|e| ChainBreak {
        kind: BreakKind::Io,
        segment: Some(segment.name.clone()),
        line: None,
        seq: None,
        message: format!("reading the trailer failed: {e}"),
    })?;
    if trailer.as_ref() == inner {
        return Ok(());
    }
    Err(ChainBreak {
        kind: BreakKind::CompressedCorrupt,
        segment: Some(segment.name.clone()),
        line: None,
        seq: inner.map(|s| s.last_seq),
        message: match trailer {
            None => "the compressed segment has no seal trailer after its data: it was cut or edited".into(),
            Some(_) => "the seal in the compressed segment's trailer differs from the seal inside: the trailer was edited".into(),
        },
    })
}
