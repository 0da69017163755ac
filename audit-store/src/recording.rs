//! The recording area: one file per recorded terminal (an asciicast v2 file for SSH), under
//! `<audit dir>/recordings/`, named by its [`RecordingId`] (the connection and the terminal's
//! number within it), written in chunks whose SHA-256 the caller puts into the hash
//! chain as events. The chain then vouches for the file: [`verify_recordings`] re-reads every
//! chunk and names a recording that is missing, truncated, altered or extended.
//!
//! The store does not read its events' schema: the caller turns its chunk and closed events
//! into [`RecordingClaims`] and hands them over, as it stores its events byte for byte.
//! Synchronous like the rest of the crate; the agent runs it on a blocking thread.

use crate::dir::{read_anchor, sync_dir, DIR_MODE, FILE_MODE};
use crate::error::StoreError;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The recording area's name inside the audit directory.
pub const RECORDINGS_DIR: &str = "recordings";
const RECORDING_SUFFIX: &str = ".cast";
/// Beside a closed recording: the seq of its closed event, so retention can delete the file
/// once the segment holding that event (its last) has been pruned.
const CLOSED_SUFFIX: &str = ".closed";
/// Twenty digits hold any u64, so names sort by connection id.
const ID_DIGITS: usize = 20;

/// One recording: the connection (session) it belongs to and its number within it, 0, 1,
/// 2 … in the order the connection's terminals started (several on one ControlMaster
/// connection). A bare connection id is its recording 0, which is also every recording
/// written before recordings were numbered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordingId {
    pub connection: u64,
    pub number: u64,
}

impl RecordingId {
    pub fn new(connection: u64, number: u64) -> Self {
        Self { connection, number }
    }
}

impl From<u64> for RecordingId {
    fn from(connection: u64) -> Self {
        Self::new(connection, 0)
    }
}

/// `<connection>.<number>`, what `portcullis replay` takes.
impl fmt::Display for RecordingId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.connection, self.number)
    }
}

/// A file's name without its suffix: recording 0 keeps the name recordings had before they
/// were numbered (`<connection, 20 digits>`), a later one adds `.<number>`.
fn stem(id: RecordingId) -> String {
    match id.number {
        0 => format!("{:0ID_DIGITS$}", id.connection),
        n => format!("{:0ID_DIGITS$}.{n}", id.connection),
    }
}

pub fn recordings_dir(audit_dir: &Path) -> PathBuf {
    audit_dir.join(RECORDINGS_DIR)
}

/// Where recording `id` is kept (a bare connection id: its recording 0).
pub fn recording_path(audit_dir: &Path, id: impl Into<RecordingId>) -> PathBuf {
    recordings_dir(audit_dir).join(format!("{}{RECORDING_SUFFIX}", stem(id.into())))
}

fn closed_marker_path(audit_dir: &Path, id: RecordingId) -> PathBuf {
    recordings_dir(audit_dir).join(format!("{}{CLOSED_SUFFIX}", stem(id)))
}

/// The recording a file name of the recording area declares, if it is a recording.
pub fn parse_recording_file_name(name: &str) -> Option<RecordingId> {
    parse_id(name, RECORDING_SUFFIX)
}

fn parse_id(name: &str, suffix: &str) -> Option<RecordingId> {
    let stem = name.strip_suffix(suffix)?;
    let (digits, number) = match stem.split_once('.') {
        None => (stem, 0),
        Some((digits, number)) => {
            // One spelling per recording: no `.0`, no leading zeros, digits only.
            if number.is_empty()
                || number.starts_with('0')
                || !number.bytes().all(|b| b.is_ascii_digit())
            {
                return None;
            }
            (digits, number.parse().ok()?)
        }
    };
    if digits.len() != ID_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(RecordingId::new(digits.parse().ok()?, number))
}

/// One chunk as its event records it: bytes `offset..offset + length` of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub index: u64,
    pub offset: u64,
    pub length: u64,
    pub sha256: [u8; 32],
}

/// The whole file as its closed event records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordingSummary {
    pub chunks: u64,
    pub length: u64,
    pub sha256: [u8; 32],
}

/// The writer of one recording. Every [`RecordingFile::append`] is written and fsynced before
/// its [`ChunkRef`] is returned, so a chunk the chain names is on disk.
pub struct RecordingFile {
    file: File,
    path: PathBuf,
    next_index: u64,
    length: u64,
    whole: Sha256,
    /// Set when a write or fsync failed: what is on disk past `length` is unknown.
    poisoned: bool,
}

impl fmt::Debug for RecordingFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordingFile")
            .field("path", &self.path)
            .field("chunks", &self.next_index)
            .field("length", &self.length)
            .field("poisoned", &self.poisoned)
            .finish_non_exhaustive()
    }
}

impl RecordingFile {
    /// Creates recording `id` (and the area, 0700, whatever the umask). An existing file is
    /// never reused or overwritten: its chunks are in the chain already.
    pub fn create(
        audit_dir: &Path,
        id: impl Into<RecordingId>,
    ) -> Result<RecordingFile, StoreError> {
        let dir = recordings_dir(audit_dir);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(DIR_MODE)
            .create(&dir)
            .map_err(StoreError::io(&dir, "create recordings directory"))?;
        let path = recording_path(audit_dir, id);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(FILE_MODE)
            .open(&path)
            .map_err(StoreError::io(&path, "create recording"))?;
        // The name must survive a crash as the chunks will: the chain is going to point at it.
        sync_dir(&dir)?;
        Ok(RecordingFile {
            file,
            path,
            next_index: 0,
            length: 0,
            whole: Sha256::new(),
            poisoned: false,
        })
    }

    /// A recording written to a file already open: tests point it at `/dev/full` to see a
    /// disk that fails mid-session, which root (who ignores modes) cannot get otherwise.
    #[doc(hidden)]
    pub fn over_open_file(file: File, path: PathBuf) -> RecordingFile {
        RecordingFile {
            file,
            path,
            next_index: 0,
            length: 0,
            whole: Sha256::new(),
            poisoned: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `bytes` as the next chunk and returns once they are on disk. After an error the
    /// file refuses every further write (`Poisoned`) and is cut back to the last chunk
    /// acknowledged, where that is still possible.
    pub fn append(&mut self, bytes: &[u8]) -> Result<ChunkRef, StoreError> {
        if self.poisoned {
            return Err(StoreError::Poisoned);
        }
        let written = self
            .file
            .write_all(bytes)
            .map_err(StoreError::io(&self.path, "write recording"))
            .and_then(|()| {
                self.file
                    .sync_data()
                    .map_err(StoreError::io(&self.path, "fsync recording"))
            });
        if let Err(e) = written {
            self.poisoned = true;
            // Best effort: a partial chunk no event vouches for would read as bytes added.
            let _ = self
                .file
                .set_len(self.length)
                .and_then(|()| self.file.sync_all());
            return Err(e);
        }
        let chunk = ChunkRef {
            index: self.next_index,
            offset: self.length,
            length: len_u64(bytes),
            sha256: Sha256::digest(bytes).into(),
        };
        self.whole.update(bytes);
        self.next_index = self.next_index.saturating_add(1);
        self.length = self.length.saturating_add(chunk.length);
        Ok(chunk)
    }

    /// What the closed event records: the chunks written and the hash of the whole file.
    pub fn summary(&self) -> RecordingSummary {
        RecordingSummary {
            chunks: self.next_index,
            length: self.length,
            sha256: self.whole.clone().finalize().into(),
        }
    }
}

/// Notes, once the closed event of recording `id` is durable under `seq`, that the recording
/// may go when retention prunes that seq. Without the note a recording is kept.
pub fn mark_closed(
    audit_dir: &Path,
    id: impl Into<RecordingId>,
    seq: u64,
) -> Result<(), StoreError> {
    let path = closed_marker_path(audit_dir, id.into());
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(&path)
        .map_err(StoreError::io(&path, "create recording marker"))?;
    file.write_all(format!("{seq}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(StoreError::io(&path, "write recording marker"))?;
    sync_dir(&recordings_dir(audit_dir))
}

/// Deletes the recordings whose closed event lies in segments retention already pruned (at
/// or below the prune anchor): their events are gone from the local chain, which pruned them
/// only once every shipper had them. A recording without a closed marker is kept.
pub fn prune_recordings(audit_dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let Some(anchor) = read_anchor(audit_dir)? else {
        return Ok(Vec::new());
    };
    let dir = recordings_dir(audit_dir);
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(StoreError::io(&dir, "list recordings")(e)),
    };
    let mut deleted = Vec::new();
    for entry in entries {
        let entry = entry.map_err(StoreError::io(&dir, "list recordings"))?;
        let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(|n| parse_id(n, CLOSED_SUFFIX))
        else {
            continue;
        };
        let marker = entry.path();
        let text = fs::read_to_string(&marker).map_err(StoreError::io(&marker, "read marker"))?;
        // A marker that does not parse keeps its recording: deleting is the irreversible side.
        let Ok(seq) = text.trim().parse::<u64>() else {
            continue;
        };
        if seq > anchor.last_seq {
            continue;
        }
        let recording = recording_path(audit_dir, id);
        match fs::remove_file(&recording) {
            Ok(()) => deleted.push(recording),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(StoreError::io(&recording, "remove recording")(e)),
        }
        fs::remove_file(&marker).map_err(StoreError::io(&marker, "remove marker"))?;
    }
    if !deleted.is_empty() {
        sync_dir(&dir)?;
    }
    Ok(deleted)
}

/// What the chain says about one recording: its chunk events in the order they were
/// recorded, and its closed event if it was closed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Claims {
    pub chunks: Vec<ChunkRef>,
    pub closed: Option<RecordingSummary>,
}

/// What the chain says about every recording, by connection and number.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordingClaims {
    pub recordings: BTreeMap<RecordingId, Claims>,
}

impl RecordingClaims {
    pub fn chunk(&mut self, id: impl Into<RecordingId>, chunk: ChunkRef) {
        self.recordings
            .entry(id.into())
            .or_default()
            .chunks
            .push(chunk);
    }

    pub fn closed(&mut self, id: impl Into<RecordingId>, summary: RecordingSummary) {
        self.recordings.entry(id.into()).or_default().closed = Some(summary);
    }
}

/// What kind of damage [`verify_recordings`] found in a recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordingBreakKind {
    /// The file could not be read.
    Io,
    /// The chain names chunks of a recording whose file is gone.
    Missing,
    /// The file ends before a chunk the chain names.
    Truncated,
    /// A chunk's bytes do not have the hash its event records.
    ChunkAltered,
    /// The chunk events do not follow each other (an index or offset skipped or repeated).
    ChunksOutOfOrder,
    /// A closed recording holds bytes past what its closed event covers.
    BytesAdded,
    /// The closed event's length, chunk count or whole-file hash disagree with the chunks.
    ClosedMismatch,
}

/// One recording that does not match the chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordingBreak {
    pub kind: RecordingBreakKind,
    pub connection_id: u64,
    /// The recording's number within its connection.
    pub recording: u64,
    /// The chunk concerned, if one is.
    pub chunk: Option<u64>,
    /// A sentence an operator can act on.
    pub message: String,
}

impl fmt::Display for RecordingBreak {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "recording {}",
            RecordingId::new(self.connection_id, self.recording)
        )?;
        if let Some(chunk) = self.chunk {
            write!(f, " chunk {chunk}")?;
        }
        write!(f, ": {:?}: {}", self.kind, self.message)
    }
}

/// The outcome of [`verify_recordings`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordingsReport {
    /// Recordings the chain names and whose files were checked.
    pub checked: usize,
    /// Of those, closed ones.
    pub closed: usize,
    pub breaks: Vec<RecordingBreak>,
    /// What is not a break but cannot be vouched for: a file without events (its events
    /// pruned, or a session that has just begun), bytes past the last chunk of a recording
    /// still open (a write in progress, or an agent that stopped mid-session).
    pub notes: Vec<String>,
}

impl RecordingsReport {
    pub fn ok(&self) -> bool {
        self.breaks.is_empty()
    }
}

/// Checks every recording the claims name against its file, and lists the files they do not
/// name. Reads each file once, chunk by chunk.
pub fn verify_recordings(audit_dir: &Path, claims: &RecordingClaims) -> RecordingsReport {
    let mut report = RecordingsReport::default();
    for (id, claim) in &claims.recordings {
        report.checked = report.checked.saturating_add(1);
        if claim.closed.is_some() {
            report.closed = report.closed.saturating_add(1);
        }
        match check_recording(audit_dir, *id, claim) {
            Ok(Checked { tail_bytes: 0, .. }) => {}
            Ok(Checked { tail_bytes, .. }) => report.notes.push(format!(
                "recording {id}: {tail_bytes} bytes after its last chunk are not in the trail yet (a session in progress, or one the agent did not close)"
            )),
            Err(b) => report.breaks.push(b),
        }
    }
    let dir = recordings_dir(audit_dir);
    match fs::read_dir(&dir) {
        Ok(entries) => {
            for entry in entries.flatten() {
                let name = entry.file_name();
                let Some(id) = name.to_str().and_then(parse_recording_file_name) else {
                    continue;
                };
                if !claims.recordings.contains_key(&id) {
                    report.notes.push(format!(
                        "recording {id}: no chunk events in the trail (pruned, or the session has just begun); it cannot be vouched for"
                    ));
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => report.breaks.push(RecordingBreak {
            kind: RecordingBreakKind::Io,
            connection_id: 0,
            recording: 0,
            chunk: None,
            message: format!("{}: cannot list the recordings: {e}", dir.display()),
        }),
    }
    report
}

/// A recording that matched its claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// Bytes the chunk events cover.
    pub length: u64,
    /// Bytes after the last chunk (only in a recording not closed).
    pub tail_bytes: u64,
}

/// Reads recording `id` back, checked against its claims: every chunk's hash, and for a
/// closed recording its length and whole-file hash. Returns only the bytes the chain vouches
/// for (a tail not yet in the trail is left out).
pub fn read_verified(
    audit_dir: &Path,
    id: impl Into<RecordingId>,
    claims: &Claims,
) -> Result<Vec<u8>, RecordingBreak> {
    let mut out = Vec::new();
    check_and_copy(audit_dir, id.into(), claims, Some(&mut out))?;
    Ok(out)
}

/// Checks recording `id` against its claims without keeping its bytes.
pub fn check_recording(
    audit_dir: &Path,
    id: impl Into<RecordingId>,
    claims: &Claims,
) -> Result<Checked, RecordingBreak> {
    check_and_copy(audit_dir, id.into(), claims, None)
}

fn check_and_copy(
    audit_dir: &Path,
    id: RecordingId,
    claims: &Claims,
    mut copy: Option<&mut Vec<u8>>,
) -> Result<Checked, RecordingBreak> {
    let broken = |kind, chunk: Option<u64>, message: String| RecordingBreak {
        kind,
        connection_id: id.connection,
        recording: id.number,
        chunk,
        message,
    };
    let path = recording_path(audit_dir, id);
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(broken(
                RecordingBreakKind::Missing,
                None,
                format!(
                    "{} is gone but the trail records {} chunk(s) of it",
                    path.display(),
                    claims.chunks.len()
                ),
            ))
        }
        Err(e) => {
            return Err(broken(
                RecordingBreakKind::Io,
                None,
                format!("{}: {e}", path.display()),
            ))
        }
    };
    let file_len = file
        .metadata()
        .map_err(|e| {
            broken(
                RecordingBreakKind::Io,
                None,
                format!("{}: {e}", path.display()),
            )
        })?
        .len();
    let mut reader = BufReader::with_capacity(64 * 1024, file);
    let mut whole = Sha256::new();
    let mut offset = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    for (n, chunk) in claims.chunks.iter().enumerate() {
        let expected_index = u64::try_from(n).unwrap_or(u64::MAX);
        if chunk.index != expected_index || chunk.offset != offset {
            return Err(broken(
                RecordingBreakKind::ChunksOutOfOrder,
                Some(chunk.index),
                format!(
                    "the trail records chunk {} at byte {} where chunk {expected_index} at byte {offset} was due",
                    chunk.index, chunk.offset
                ),
            ));
        }
        let end = offset.saturating_add(chunk.length);
        if end > file_len {
            return Err(broken(
                RecordingBreakKind::Truncated,
                Some(chunk.index),
                format!(
                    "the file ends at byte {file_len} but chunk {} covers bytes {offset}..{end}: it was cut",
                    chunk.index
                ),
            ));
        }
        let mut hasher = Sha256::new();
        let mut left = chunk.length;
        while left > 0 {
            let want = usize::try_from(left.min(len_u64(&buf))).unwrap_or(buf.len());
            let Some(part) = buf.get_mut(..want) else {
                break;
            };
            reader.read_exact(part).map_err(|e| {
                broken(
                    RecordingBreakKind::Io,
                    Some(chunk.index),
                    format!("{}: {e}", path.display()),
                )
            })?;
            hasher.update(&*part);
            whole.update(&*part);
            if let Some(out) = copy.as_deref_mut() {
                out.extend_from_slice(part);
            }
            left = left.saturating_sub(len_u64(part));
        }
        let got: [u8; 32] = hasher.finalize().into();
        if got != chunk.sha256 {
            return Err(broken(
                RecordingBreakKind::ChunkAltered,
                Some(chunk.index),
                format!(
                    "bytes {offset}..{end} hash to {} but the trail records {}: the recording was edited there",
                    hex::encode(got),
                    hex::encode(chunk.sha256)
                ),
            ));
        }
        offset = end;
    }
    let tail_bytes = file_len.saturating_sub(offset);
    let Some(closed) = &claims.closed else {
        return Ok(Checked {
            length: offset,
            tail_bytes,
        });
    };
    let chunks = len_u64_usize(claims.chunks.len());
    let whole: [u8; 32] = whole.finalize().into();
    if closed.chunks != chunks || closed.length != offset || closed.sha256 != whole {
        return Err(broken(
            RecordingBreakKind::ClosedMismatch,
            None,
            format!(
                "the closed event records {} chunk(s), {} bytes, hash {} but the chunk events cover {chunks} chunk(s), {offset} bytes, hash {}",
                closed.chunks,
                closed.length,
                hex::encode(closed.sha256),
                hex::encode(whole)
            ),
        ));
    }
    if tail_bytes > 0 {
        return Err(broken(
            RecordingBreakKind::BytesAdded,
            None,
            format!(
                "{tail_bytes} bytes follow byte {offset}, where the recording was closed: they were added later"
            ),
        ));
    }
    Ok(Checked {
        length: offset,
        tail_bytes: 0,
    })
}

fn len_u64(bytes: &[u8]) -> u64 {
    len_u64_usize(bytes.len())
}

fn len_u64_usize(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    /// Recording 0 keeps the name a connection's one recording had before recordings were
    /// numbered, so a file written then is found as recording 0; later ones add `.<n>`.
    #[test]
    fn recording_names_round_trip_and_nothing_else_is_one() {
        let dir = Path::new("/a");
        for (id, want) in [
            (RecordingId::from(17), "00000000000000000017.cast"),
            (RecordingId::new(17, 0), "00000000000000000017.cast"),
            (RecordingId::new(17, 1), "00000000000000000017.1.cast"),
            (RecordingId::new(17, 12), "00000000000000000017.12.cast"),
        ] {
            let path = recording_path(dir, id);
            assert_eq!(path, Path::new("/a/recordings").join(want));
            let name = path.file_name().unwrap().to_str().unwrap();
            assert_eq!(parse_recording_file_name(name), Some(id));
        }
        assert_eq!(
            closed_marker_path(dir, RecordingId::new(17, 2)),
            Path::new("/a/recordings/00000000000000000017.2.closed")
        );
        for bad in [
            "17.cast",
            "00000000000000000017.closed",
            "0000000000000000001a.cast",
            "00000000000000000017.cast.tmp",
            "00000000000000000017.0.cast",
            "00000000000000000017.01.cast",
            "00000000000000000017..cast",
            "00000000000000000017.x.cast",
            "00000000000000000017.1.2.cast",
        ] {
            assert_eq!(parse_recording_file_name(bad), None, "{bad}");
        }
    }
}
