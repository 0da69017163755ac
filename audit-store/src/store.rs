//! The writer: appending with fsync, rotation and sealing, recovery of a torn tail on open, and
//! retention. One `Store` per directory, enforced by a lock file.

use crate::dir::{
    compressed_segment_file_name, list_segments, read_anchor, read_tail_seal, segment_file_name,
    skip_pruned, sync_dir, write_anchor, SegmentFile, DIR_MODE, FILE_MODE, LOCK_FILE,
};
use crate::encoded::{EventBytes, MAX_EVENT_DEPTH};
use crate::error::StoreError;
use crate::format::{
    encode_record_line, encode_seal_line, record_hash, ChainHash, Line, RecordView, Seal,
    MAX_EVENT_BYTES, MAX_LINE_BYTES, RECORD_LINE_OVERHEAD,
};
use crate::lines::{LineReader, RawLine};
use crate::verify::{BreakKind, ChainState, SegmentChecker};
use ed25519_dalek::SigningKey;
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch. Injected so that rotation by age can be tested.
pub trait Clock: Send + Sync {
    fn now_ms(&self) -> u64;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

impl<F: Fn() -> u64 + Send + Sync> Clock for F {
    fn now_ms(&self) -> u64 {
        self()
    }
}

/// How the store writes. `Default` documents the defaults.
pub struct StoreOptions {
    /// A segment is sealed before a record would take it past this size (a record larger than
    /// this gets a segment of its own). Default 64 MiB.
    pub max_segment_bytes: u64,
    /// A segment is sealed once its first record is this old. Default one hour.
    pub max_segment_age_ms: u64,
    /// Largest event accepted by `append`. Default 1 MiB, at most 16 MiB.
    pub max_event_bytes: usize,
    /// Signs each seal when set; `verify` then needs the matching public key.
    pub signing_key: Option<SigningKey>,
    pub clock: Arc<dyn Clock>,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_segment_bytes: 64 * 1024 * 1024,
            max_segment_age_ms: 60 * 60 * 1000,
            max_event_bytes: 1024 * 1024,
            signing_key: None,
            clock: Arc::new(SystemClock),
        }
    }
}

impl fmt::Debug for StoreOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreOptions")
            .field("max_segment_bytes", &self.max_segment_bytes)
            .field("max_segment_age_ms", &self.max_segment_age_ms)
            .field("max_event_bytes", &self.max_event_bytes)
            .field(
                "signing_key",
                &self.signing_key.as_ref().map(|_| "<redacted>"),
            )
            .finish_non_exhaustive()
    }
}

impl StoreOptions {
    fn validate(&self) -> Result<(), StoreError> {
        if self.max_event_bytes == 0 || self.max_event_bytes > MAX_EVENT_BYTES {
            return Err(StoreError::BadOptions {
                option: "max_event_bytes",
                reason: format!("{} is outside 1..={MAX_EVENT_BYTES}", self.max_event_bytes),
            });
        }
        if self.max_segment_bytes == 0 {
            return Err(StoreError::BadOptions {
                option: "max_segment_bytes",
                reason: "must be above zero".into(),
            });
        }
        Ok(())
    }
}

/// What `append` acknowledges: the record is on disk under this seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef {
    pub seq: u64,
    pub hash: ChainHash,
}

/// Something `open` found and repaired; the caller records each as an audit event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IntegrityNote {
    /// The newest segment ended in bytes that do not extend its chain (a torn write after a
    /// crash, usually) and was cut back to its last good line. When the cut bytes held complete
    /// lines they were first copied to `quarantined`, since that is not what a torn write
    /// leaves and may be evidence.
    Recovered {
        segment: PathBuf,
        line: u64,
        truncated_bytes: u64,
        quarantined: Option<PathBuf>,
        reason: String,
    },
    /// The newest segment held no complete record (crash right after it was created).
    RemovedEmptySegment { segment: PathBuf },
    /// A prune interrupted by a crash was finished.
    PruneCompleted { segment: PathBuf },
}

impl fmt::Display for IntegrityNote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntegrityNote::Recovered {
                segment,
                line,
                truncated_bytes,
                quarantined,
                reason,
            } => {
                write!(
                    f,
                    "{} line {line}: cut {truncated_bytes} bytes of torn tail ({reason})",
                    segment.display()
                )?;
                if let Some(q) = quarantined {
                    write!(f, "; the cut bytes are kept in {}", q.display())?;
                }
                Ok(())
            }
            IntegrityNote::RemovedEmptySegment { segment } => {
                write!(
                    f,
                    "{}: removed, it held no complete record",
                    segment.display()
                )
            }
            IntegrityNote::PruneCompleted { segment } => {
                write!(
                    f,
                    "{}: removed, finishing an interrupted prune",
                    segment.display()
                )
            }
        }
    }
}

/// When old segments may go. Either limit alone or both; `None` means no limit of that kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Retention {
    /// Delete sealed segments sealed longer ago than this.
    pub max_age_ms: Option<u64>,
    /// Delete the oldest sealed segments while the store is larger than this.
    pub max_total_bytes: Option<u64>,
}

/// What `prune` did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PruneReport {
    pub deleted: Vec<PathBuf>,
    pub freed_bytes: u64,
    pub kept_bytes: u64,
    /// Retention wanted to delete more but the next segment holds records not yet shipped:
    /// the store grows until shipping catches up, which the caller should alert on.
    pub blocked_by_unshipped: bool,
}

#[derive(Debug)]
struct SegmentMeta {
    first_seq: u64,
    /// The plain file's path; once sealed, the segment may be compressed beside it.
    path: PathBuf,
    bytes: u64,
    seal: Option<Seal>,
}

#[derive(Debug)]
struct OpenSegment {
    file: File,
    path: PathBuf,
    first_seq: u64,
    first_time_ms: u64,
    records: u64,
    bytes: u64,
    /// Bytes written since the last fsync (by [`Store::append_batch_buffered`]).
    unsynced: bool,
}

/// The writer of one audit directory.
pub struct Store {
    dir: PathBuf,
    opts: StoreOptions,
    /// Held for its lock: two writers on one chain would fork it.
    _lock: File,
    chain: ChainState,
    /// Oldest first; while a segment is open it is the last one.
    segments: Vec<SegmentMeta>,
    open: Option<OpenSegment>,
    /// Set when a write or fsync failed: the page cache may no longer match the disk (the
    /// PostgreSQL fsync lesson), so only a reopen, which re-reads the disk, may continue.
    poisoned: bool,
    /// Whether the append in progress fsyncs (false for buffered appends).
    sync_writes: bool,
}

impl fmt::Debug for Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.dir)
            .field("next_seq", &self.chain.next_seq)
            .field("segments", &self.segments.len())
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

enum Newest {
    Removed,
    Sealed(SegmentMeta),
    Open(SegmentMeta, OpenSegment, ChainState),
}

impl Store {
    /// Opens (creating if needed) the store in `dir`, repairing a torn tail left by a crash.
    /// The notes say what was repaired; the caller should record each as an audit event.
    pub fn open(dir: &Path, opts: StoreOptions) -> Result<(Store, Vec<IntegrityNote>), StoreError> {
        opts.validate()?;
        // The trail is for root (and whoever root lets read it), never for the umask to decide.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(dir)
            .map_err(StoreError::io(dir, "create directory"))?;
        let lock_path = dir.join(LOCK_FILE);
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(FILE_MODE)
            .open(&lock_path)
            .map_err(StoreError::io(&lock_path, "open lock file"))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(StoreError::Locked { path: lock_path }),
            Err(TryLockError::Error(e)) => {
                return Err(StoreError::Io {
                    path: lock_path,
                    op: "lock",
                    source: e,
                })
            }
        }

        let mut notes = Vec::new();
        let anchor = read_anchor(dir)?;
        let all = list_segments(dir)?;
        let kept = skip_pruned(&all, anchor.as_ref());
        let pruned = all.len().saturating_sub(kept.len());
        for segment in all.iter().take(pruned) {
            remove_segment_files(dir, segment.first_seq)?;
            notes.push(IntegrityNote::PruneCompleted {
                segment: segment.path.clone(),
            });
        }
        if pruned > 0 {
            sync_dir(dir)?;
        }

        let mut chain = match &anchor {
            Some(anchor) => ChainState::after(anchor).ok_or(StoreError::SequenceExhausted)?,
            None => ChainState::START,
        };
        let (older, newest) = match kept.split_last() {
            Some((newest, older)) => (older, Some(newest)),
            None => (kept, None),
        };
        let mut segments = Vec::with_capacity(kept.len().saturating_add(1));
        for segment in older {
            let meta = sealed_meta(dir, segment)?;
            if let Some(seal) = &meta.seal {
                chain = ChainState::after(seal).ok_or(StoreError::SequenceExhausted)?;
            }
            segments.push(meta);
        }
        let mut open = None;
        if let Some(newest) = newest.filter(|n| n.compressed) {
            // Compressed means sealed; its records are not cut, whatever they hold.
            let meta = sealed_meta(dir, newest)?;
            if let Some(seal) = &meta.seal {
                chain = ChainState::after(seal).ok_or(StoreError::SequenceExhausted)?;
            }
            segments.push(meta);
        } else if let Some(newest) = newest {
            match recover_newest(dir, newest, opts.clock.now_ms(), &mut notes)? {
                Newest::Removed => {}
                Newest::Sealed(meta) => {
                    if let Some(seal) = &meta.seal {
                        chain = ChainState::after(seal).ok_or(StoreError::SequenceExhausted)?;
                    }
                    segments.push(meta);
                }
                Newest::Open(meta, segment, state) => {
                    chain = state;
                    segments.push(meta);
                    open = Some(segment);
                }
            }
        }
        let store = Store {
            dir: dir.to_path_buf(),
            opts,
            _lock: lock,
            chain,
            segments,
            open,
            poisoned: false,
            sync_writes: true,
        };
        Ok((store, notes))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The seq the next appended event will get.
    pub fn next_seq(&self) -> u64 {
        self.chain.next_seq
    }

    /// The hash of the last record written (`ChainHash::GENESIS` for an empty store).
    pub fn last_hash(&self) -> ChainHash {
        self.chain.prev
    }

    /// The segment new records go to, if one is open.
    pub fn open_segment(&self) -> Option<&Path> {
        self.open.as_ref().map(|o| o.path.as_path())
    }

    /// Appends one event (serialized JSON, stored byte for byte) and returns once it is on disk.
    pub fn append(&mut self, event_json: &[u8]) -> Result<RecordRef, StoreError> {
        let mut refs = self.append_batch(&[event_json])?;
        // One event in, one ref out; an empty result would be a bug, reported, not panicked on.
        refs.pop().ok_or(StoreError::Poisoned)
    }

    /// Appends events in order with one fsync for the whole batch (group commit). Either every
    /// event is rejected before anything is written, or all are on disk when this returns.
    pub fn append_batch<E: EventBytes>(
        &mut self,
        events: &[E],
    ) -> Result<Vec<RecordRef>, StoreError> {
        self.append_events(events, true)
    }

    /// Appends like [`Store::append_batch`] but leaves the fsync to a later [`Store::sync`] (or
    /// the next synced append or seal): the records are in the file, so they survive a crash of
    /// the process, not yet a power loss. For events that gate nothing, at high rates.
    pub fn append_batch_buffered<E: EventBytes>(
        &mut self,
        events: &[E],
    ) -> Result<Vec<RecordRef>, StoreError> {
        self.append_events(events, false)
    }

    /// Makes everything appended so far durable.
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        if let Some(open) = self.open.as_mut().filter(|o| o.unsynced) {
            if let Err(e) = open.file.sync_data() {
                self.poisoned = true;
                return Err(StoreError::io(&open.path, "fsync segment")(e));
            }
            open.unsynced = false;
        }
        Ok(())
    }

    /// Whether appended records wait for an fsync.
    pub fn has_unsynced(&self) -> bool {
        self.open.as_ref().is_some_and(|o| o.unsynced)
    }

    fn append_events<E: EventBytes>(
        &mut self,
        events: &[E],
        sync: bool,
    ) -> Result<Vec<RecordRef>, StoreError> {
        self.sync_writes = sync;
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        for (index, event) in events.iter().enumerate() {
            check_event(event.bytes(), event.encoded(), self.opts.max_event_bytes)
                .map_err(|reason| StoreError::EventRejected { index, reason })?;
        }
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let now = self.opts.clock.now_ms();
        let written = self.write_batch(events, now);
        if written.is_err() {
            self.poisoned = true;
        }
        written
    }

    /// Seals the open segment if it is over its size or age limit. Call it from a timer so an
    /// idle segment is sealed (and signed) on time even when no event arrives.
    pub fn rotate_if_due(&mut self, now_ms: u64) -> Result<Option<Seal>, StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let due = self.open.as_ref().is_some_and(|open| {
            open.records > 0
                && (open.bytes >= self.opts.max_segment_bytes
                    || now_ms.saturating_sub(open.first_time_ms) >= self.opts.max_segment_age_ms)
        });
        if !due {
            return Ok(None);
        }
        self.seal_at(now_ms)
    }

    /// Seals the open segment now (e.g. on clean shutdown or before shipping it whole).
    /// Returns `None` when no segment is open.
    pub fn seal_current(&mut self) -> Result<Option<Seal>, StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let now = self.opts.clock.now_ms();
        self.seal_at(now)
    }

    /// Deletes the oldest sealed segments that retention allows, oldest first, but never one
    /// holding a record above `shipped_upto` (the highest seq the central store has), never the
    /// newest segment, and never out of order, so what is kept is always one unbroken chain.
    pub fn prune(
        &mut self,
        policy: &Retention,
        shipped_upto: u64,
        now_ms: u64,
    ) -> Result<PruneReport, StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let mut report = PruneReport::default();
        // Sealed segments shrink when compressed behind the store's back: retention by size
        // counts what is on disk now.
        let mut total = 0u64;
        for segment in &mut self.segments {
            if segment.seal.is_some() {
                segment.bytes = segment_len(&self.dir, segment.first_seq)?;
            }
            total = total.saturating_add(segment.bytes);
        }
        report.kept_bytes = total;
        let mut doomed = 0usize;
        let mut last_doomed_seal = None;
        for segment in self
            .segments
            .iter()
            .take(self.segments.len().saturating_sub(1))
        {
            let Some(seal) = &segment.seal else {
                break;
            };
            let too_old = policy
                .max_age_ms
                .is_some_and(|max| now_ms.saturating_sub(seal.time_ms) > max);
            let too_big = policy
                .max_total_bytes
                .is_some_and(|max| report.kept_bytes > max);
            if !too_old && !too_big {
                break;
            }
            if seal.last_seq > shipped_upto {
                report.blocked_by_unshipped = true;
                break;
            }
            doomed = doomed.saturating_add(1);
            report.kept_bytes = report.kept_bytes.saturating_sub(segment.bytes);
            report.freed_bytes = report.freed_bytes.saturating_add(segment.bytes);
            last_doomed_seal = Some(seal.clone());
        }
        let Some(anchor) = last_doomed_seal else {
            return Ok(report);
        };
        // The anchor goes first: a crash part-way leaves segments the anchor already covers,
        // which `open` deletes and `verify` skips, never a chain with its start missing.
        write_anchor(&self.dir, &anchor)?;
        for segment in self.segments.drain(..doomed) {
            remove_segment_files(&self.dir, segment.first_seq)?;
            report.deleted.push(segment.path);
        }
        sync_dir(&self.dir)?;
        Ok(report)
    }

    fn seal_at(&mut self, now_ms: u64) -> Result<Option<Seal>, StoreError> {
        let sealed = self.write_out(Vec::new(), 0, Some(now_ms));
        if sealed.is_err() {
            self.poisoned = true;
        }
        sealed
    }

    fn write_batch<E: EventBytes>(
        &mut self,
        events: &[E],
        now: u64,
    ) -> Result<Vec<RecordRef>, StoreError> {
        let mut refs = Vec::with_capacity(events.len());
        // Each line is built in place, in the buffer the batch is written from.
        let mut pending = Vec::with_capacity(
            events
                .iter()
                .map(|e| e.bytes().len().saturating_add(RECORD_LINE_OVERHEAD))
                .fold(0usize, usize::saturating_add),
        );
        let mut pending_records = 0u64;
        for event in events {
            let event = event.bytes();
            let seq = self.chain.next_seq;
            let hash = record_hash(&self.chain.prev, seq, now, event);
            let start = pending.len();
            encode_record_line(
                &mut pending,
                &RecordView {
                    seq,
                    time_ms: now,
                    prev: self.chain.prev,
                    hash,
                    event,
                },
            );
            if let Some(open) = &self.open {
                let records = open.records.saturating_add(pending_records);
                let size = open.bytes.saturating_add(len_u64(&pending));
                let full = size > self.opts.max_segment_bytes;
                let old = now.saturating_sub(open.first_time_ms) >= self.opts.max_segment_age_ms;
                if records > 0 && (full || old) {
                    // The lines before this one close the segment; this one opens the next.
                    let line = pending.split_off(start);
                    self.write_out(
                        std::mem::replace(&mut pending, line),
                        pending_records,
                        Some(now),
                    )?;
                    pending_records = 0;
                }
            }
            if self.open.is_none() {
                self.create_segment(seq, now)?;
            }
            pending_records = pending_records.saturating_add(1);
            self.chain = ChainState {
                next_seq: seq.checked_add(1).ok_or(StoreError::SequenceExhausted)?,
                prev: hash,
            };
            refs.push(RecordRef { seq, hash });
        }
        self.write_out(pending, pending_records, None)?;
        Ok(refs)
    }

    /// Writes `bytes` (holding `records` records) to the open segment, adds a seal when
    /// `seal_time` is given, and fsyncs once.
    fn write_out(
        &mut self,
        mut bytes: Vec<u8>,
        records: u64,
        seal_time: Option<u64>,
    ) -> Result<Option<Seal>, StoreError> {
        let Some(open) = self.open.as_mut() else {
            return Ok(None);
        };
        let total_records = open.records.saturating_add(records);
        let seal = match seal_time {
            Some(time_ms) if total_records > 0 => {
                let mut seal = Seal {
                    first_seq: open.first_seq,
                    last_seq: self.chain.next_seq.saturating_sub(1),
                    count: total_records,
                    time_ms,
                    final_hash: self.chain.prev,
                    sig: None,
                };
                if let Some(key) = &self.opts.signing_key {
                    seal.sign(key);
                }
                encode_seal_line(&mut bytes, &seal);
                Some(seal)
            }
            _ => None,
        };
        if bytes.is_empty() {
            return Ok(None);
        }
        open.file
            .write_all(&bytes)
            .map_err(StoreError::io(&open.path, "write segment"))?;
        if self.sync_writes || seal.is_some() {
            open.file
                .sync_data()
                .map_err(StoreError::io(&open.path, "fsync segment"))?;
            open.unsynced = false;
        } else {
            open.unsynced = true;
        }
        open.records = total_records;
        open.bytes = open.bytes.saturating_add(len_u64(&bytes));
        if let Some(meta) = self.segments.last_mut() {
            meta.bytes = open.bytes;
            if seal.is_some() {
                meta.seal.clone_from(&seal);
            }
        }
        if seal.is_some() {
            self.open = None;
        }
        Ok(seal)
    }

    fn create_segment(&mut self, first_seq: u64, now: u64) -> Result<(), StoreError> {
        let path = self.dir.join(segment_file_name(first_seq));
        let file = OpenOptions::new()
            .append(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(StoreError::io(&path, "create segment"))?;
        // The new name must be durable before any record in it is acknowledged.
        sync_dir(&self.dir)?;
        self.segments.push(SegmentMeta {
            first_seq,
            path: path.clone(),
            bytes: 0,
            seal: None,
        });
        self.open = Some(OpenSegment {
            file,
            path,
            first_seq,
            first_time_ms: now,
            records: 0,
            bytes: 0,
            unsynced: false,
        });
        Ok(())
    }
}

/// Rejects what could not be read back byte for byte, before anything is written. An
/// [`crate::EncodedEvent`] (`encoded`) is valid compact JSON by construction: only its size
/// is checked.
fn check_event(event: &[u8], encoded: bool, max: usize) -> Result<(), String> {
    if event.is_empty() {
        return Err("event is empty".into());
    }
    if event.len() > max {
        return Err(format!(
            "event is {} bytes, over the {max}-byte limit",
            event.len()
        ));
    }
    if encoded {
        return Ok(());
    }
    if event.contains(&b'\n') || event.contains(&b'\r') {
        return Err("event contains a line break; serialize it as compact JSON".into());
    }
    if event.first().is_some_and(u8::is_ascii_whitespace)
        || event.last().is_some_and(u8::is_ascii_whitespace)
    {
        return Err("event starts or ends with whitespace".into());
    }
    serde_json::from_slice::<&serde_json::value::RawValue>(event)
        .map_err(|e| format!("event is not valid JSON: {e}"))?;
    // The record line nests the event one level deeper than this parse saw; the reader's
    // parser has a depth limit, so an event must leave room for it.
    if json_depth(event) > MAX_EVENT_DEPTH {
        return Err(format!("event nests deeper than {MAX_EVENT_DEPTH} levels"));
    }
    Ok(())
}

/// The deepest nesting of objects and arrays in valid JSON, strings skipped.
fn json_depth(json: &[u8]) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for &b in json {
        if in_string {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Scans the newest segment and cuts it back to the last line that extends its chain.
fn recover_newest(
    dir: &Path,
    segment: &SegmentFile,
    now_ms: u64,
    notes: &mut Vec<IntegrityNote>,
) -> Result<Newest, StoreError> {
    let path = &segment.path;
    let file = File::open(path).map_err(StoreError::io(path, "open segment"))?;
    let len = file
        .metadata()
        .map_err(StoreError::io(path, "stat segment"))?
        .len();
    // Only what a crash can do is judged here: the segment's own lines. The link to the
    // previous segment and seal signatures are `verify`'s business (a store that has just been
    // given a key must not have its older, unsigned seal cut off).
    let mut checker = SegmentChecker::new(Some(segment.first_seq), None, None);
    let mut lines = LineReader::new(BufReader::new(file), MAX_LINE_BYTES);
    let mut first_time_ms = None;
    let mut bad = None;
    while let Some(line) = lines
        .next_line()
        .map_err(StoreError::io(path, "read segment"))?
    {
        match line {
            RawLine::TooLong { offset, number } => {
                bad = Some((offset, number, "line over the length limit".to_owned()));
                break;
            }
            RawLine::Line {
                terminated: false,
                offset,
                number,
                bytes,
            } => {
                bad = Some((
                    offset,
                    number,
                    format!("partial line of {} bytes without newline", bytes.len()),
                ));
                break;
            }
            RawLine::Line {
                bytes,
                offset,
                number,
                ..
            } => match checker.accept(bytes) {
                Ok(Line::Record(record)) => {
                    first_time_ms.get_or_insert(record.time_ms);
                }
                Ok(Line::Seal(_)) => {}
                Err(rejected) if rejected.kind == BreakKind::SegmentOutOfPlace => {
                    // Not what a crash leaves: refuse rather than cut away someone's evidence.
                    return Err(StoreError::Corrupt {
                        segment: path.clone(),
                        line: Some(number),
                        reason: rejected.message,
                    });
                }
                Err(rejected) => {
                    bad = Some((offset, number, rejected.message));
                    break;
                }
            },
        }
    }
    drop(lines);

    let mut kept_len = len;
    if let Some((offset, line, reason)) = bad {
        let quarantined = quarantine_tail(dir, path, segment.first_seq, offset, now_ms)?;
        let file = OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(StoreError::io(path, "open segment for repair"))?;
        file.set_len(offset)
            .and_then(|()| file.sync_all())
            .map_err(StoreError::io(path, "truncate torn tail"))?;
        notes.push(IntegrityNote::Recovered {
            segment: path.clone(),
            line,
            truncated_bytes: len.saturating_sub(offset),
            quarantined,
            reason,
        });
        kept_len = offset;
    }

    let state = checker.state();
    let (Some(state), Some(first_time_ms)) = (state, first_time_ms) else {
        remove_if_present(path)?;
        sync_dir(dir)?;
        notes.push(IntegrityNote::RemovedEmptySegment {
            segment: path.clone(),
        });
        return Ok(Newest::Removed);
    };
    let meta = SegmentMeta {
        first_seq: segment.first_seq,
        path: path.clone(),
        bytes: kept_len,
        seal: checker.seal().cloned(),
    };
    if meta.seal.is_some() {
        return Ok(Newest::Sealed(meta));
    }
    let file = OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(StoreError::io(path, "open segment for append"))?;
    let open = OpenSegment {
        file,
        path: path.clone(),
        first_seq: segment.first_seq,
        first_time_ms,
        records: checker.records(),
        bytes: kept_len,
        unsynced: false,
    };
    Ok(Newest::Open(meta, open, state))
}

/// Copies the bytes about to be cut to a side file when they hold a complete line: a torn
/// write leaves at most one partial line, so anything more is kept for an investigator.
fn quarantine_tail(
    dir: &Path,
    path: &Path,
    first_seq: u64,
    offset: u64,
    now_ms: u64,
) -> Result<Option<PathBuf>, StoreError> {
    let mut file = File::open(path).map_err(StoreError::io(path, "open segment"))?;
    file.seek(SeekFrom::Start(offset))
        .map_err(StoreError::io(path, "seek segment"))?;
    let mut tail = Vec::new();
    file.read_to_end(&mut tail)
        .map_err(StoreError::io(path, "read torn tail"))?;
    if !tail.contains(&b'\n') {
        return Ok(None);
    }
    let side = dir.join(format!("torn-{first_seq:020}-{offset}-{now_ms}.bin"));
    let mut out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&side)
        .map_err(StoreError::io(&side, "create quarantine file"))?;
    out.write_all(&tail)
        .and_then(|()| out.sync_all())
        .map_err(StoreError::io(&side, "write quarantine file"))?;
    sync_dir(dir)?;
    Ok(Some(side))
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::Io {
            path: path.to_path_buf(),
            op: "remove segment",
            source: e,
        }),
    }
}

/// A segment that is not the newest (or is compressed): its seal, from its tail.
fn sealed_meta(dir: &Path, segment: &SegmentFile) -> Result<SegmentMeta, StoreError> {
    let seal = read_tail_seal(segment)?.ok_or_else(|| StoreError::Corrupt {
        segment: segment.path.clone(),
        line: None,
        reason: if segment.compressed {
            "compressed segment does not end with its seal trailer".into()
        } else {
            "segment is not the newest but does not end with a seal".into()
        },
    })?;
    Ok(SegmentMeta {
        first_seq: segment.first_seq,
        path: dir.join(segment_file_name(segment.first_seq)),
        bytes: segment_len(dir, segment.first_seq)?,
        seal: Some(seal),
    })
}

/// The size of a segment on disk, plain or compressed (the plain file while both exist).
fn segment_len(dir: &Path, first_seq: u64) -> Result<u64, StoreError> {
    let plain = dir.join(segment_file_name(first_seq));
    match fs::metadata(&plain) {
        Ok(m) => return Ok(m.len()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(StoreError::io(&plain, "stat segment")(e)),
    }
    let compressed = dir.join(compressed_segment_file_name(first_seq));
    fs::metadata(&compressed)
        .map(|m| m.len())
        .map_err(StoreError::io(&compressed, "stat segment"))
}

/// Removes a segment in whichever forms it exists (plain, compressed, a compression's
/// leftover temporary file).
fn remove_segment_files(dir: &Path, first_seq: u64) -> Result<(), StoreError> {
    let compressed = compressed_segment_file_name(first_seq);
    remove_if_present(&dir.join(segment_file_name(first_seq)))?;
    remove_if_present(&dir.join(&compressed))?;
    remove_if_present(&dir.join(format!("{compressed}.tmp")))
}

fn len_u64(bytes: &[u8]) -> u64 {
    u64::try_from(bytes.len()).unwrap_or(u64::MAX)
}
