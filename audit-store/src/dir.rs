//! The directory layout: which files are segments, in what order, the prune anchor, and the
//! fsyncs that make a create, rename or delete survive a crash.

use crate::error::StoreError;
use crate::format::{encode_seal_line, parse_line, Line, Seal};
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Modes of what the store creates, whatever the umask: the trail holds statements and
/// identities, so only the owner reads it.
pub(crate) const DIR_MODE: u32 = 0o700;
pub(crate) const FILE_MODE: u32 = 0o600;

const SEGMENT_PREFIX: &str = "segment-";
const SEGMENT_SUFFIX: &str = ".jsonl";
/// A sealed segment once compressed: the same lines, in one zstd frame, then the seal again in
/// a skippable frame so that opening the store reads it without decompressing (`compress.rs`).
const COMPRESSED_SUFFIX: &str = ".jsonl.zst";
/// Twenty digits hold any u64, so names sort in sequence order as plain strings too.
const SEQ_DIGITS: usize = 20;
pub(crate) const ANCHOR_FILE: &str = "anchor.jsonl";
const ANCHOR_TMP_FILE: &str = "anchor.jsonl.tmp";
pub(crate) const LOCK_FILE: &str = "lock";
/// A seal line is under 400 bytes; this window always holds the whole of it.
const SEAL_TAIL_WINDOW: u64 = 1024;

pub fn segment_file_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:0SEQ_DIGITS$}{SEGMENT_SUFFIX}")
}

/// The name of a sealed segment once compressed.
pub fn compressed_segment_file_name(first_seq: u64) -> String {
    format!("{SEGMENT_PREFIX}{first_seq:0SEQ_DIGITS$}{COMPRESSED_SUFFIX}")
}

/// The first sequence number a segment file name declares, if the name is one of ours, plain
/// or compressed.
pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    parse_segment_name(name).map(|(seq, _)| seq)
}

/// The first seq and whether the file is compressed.
fn parse_segment_name(name: &str) -> Option<(u64, bool)> {
    let rest = name.strip_prefix(SEGMENT_PREFIX)?;
    let (digits, compressed) = match rest.strip_suffix(COMPRESSED_SUFFIX) {
        Some(digits) => (digits, true),
        None => (rest.strip_suffix(SEGMENT_SUFFIX)?, false),
    };
    if digits.len() != SEQ_DIGITS || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((digits.parse().ok()?, compressed))
}

#[derive(Debug, Clone)]
pub(crate) struct SegmentFile {
    pub first_seq: u64,
    pub path: PathBuf,
    pub name: String,
    pub compressed: bool,
}

/// The segments, oldest first. A segment present both plain and compressed (a crash between
/// the compressed file's rename and the plain one's removal) is listed once, plain: the plain
/// file is the one the chain was written to, and the compressor redoes the rest.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<SegmentFile>, StoreError> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(StoreError::io(dir, "list directory"))? {
        let entry = entry.map_err(StoreError::io(dir, "list directory"))?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if let Some((first_seq, compressed)) = parse_segment_name(&name) {
            out.push(SegmentFile {
                first_seq,
                path: entry.path(),
                name,
                compressed,
            });
        }
    }
    out.sort_by_key(|s| (s.first_seq, s.compressed));
    out.dedup_by_key(|s| s.first_seq);
    Ok(out)
}

/// The lines of a segment, decompressed when it is compressed. A plain segment compressed
/// since it was listed is read from its compressed file (the returned `SegmentFile` says
/// which was opened).
pub(crate) fn open_segment(
    segment: &SegmentFile,
) -> Result<(Box<dyn BufRead + Send>, SegmentFile), StoreError> {
    let mut segment = segment.clone();
    let file = match File::open(&segment.path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !segment.compressed => {
            let name = compressed_segment_file_name(segment.first_seq);
            let path = segment.path.with_file_name(&name);
            let file =
                File::open(&path).map_err(|_| StoreError::io(&segment.path, "open segment")(e))?;
            segment = SegmentFile {
                first_seq: segment.first_seq,
                path,
                name,
                compressed: true,
            };
            file
        }
        Err(e) => return Err(StoreError::io(&segment.path, "open segment")(e)),
    };
    if !segment.compressed {
        return Ok((Box::new(BufReader::new(file)), segment));
    }
    let decoder = zstd::stream::read::Decoder::new(file)
        .map_err(StoreError::io(&segment.path, "start decompressing segment"))?;
    Ok((Box::new(BufReader::new(decoder)), segment))
}

/// The lines of one segment file, plain or compressed (by its name), for tools that read
/// segments as they are; the store's own readers check the chain as they go instead.
pub fn read_segment_file(path: &Path) -> Result<Vec<u8>, StoreError> {
    let compressed = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_segment_name)
        .is_some_and(|(_, compressed)| compressed);
    let bytes = fs::read(path).map_err(StoreError::io(path, "read segment"))?;
    if !compressed {
        return Ok(bytes);
    }
    zstd::stream::decode_all(&bytes[..]).map_err(|e| StoreError::Corrupt {
        segment: path.to_path_buf(),
        line: None,
        reason: format!("the compressed segment does not decompress ({e}): it was altered or cut"),
    })
}

/// A read error in a segment: for a compressed one, the file does not decompress (its
/// checksum fails, it was cut or edited), which is damage to the trail, not an I/O fault.
pub(crate) fn read_error(segment: &SegmentFile, e: std::io::Error) -> StoreError {
    if segment.compressed {
        return StoreError::Corrupt {
            segment: segment.path.clone(),
            line: None,
            reason: format!(
                "the compressed segment does not decompress ({e}): it was altered or cut"
            ),
        };
    }
    StoreError::io(&segment.path, "read segment")(e)
}

/// Makes creates, renames and deletes in `dir` durable; fsync of a file covers only its data.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(StoreError::io(dir, "fsync directory"))
}

/// The seal of the last segment pruned away: where the oldest kept segment must chain from.
pub(crate) fn read_anchor(dir: &Path) -> Result<Option<Seal>, StoreError> {
    let path = dir.join(ANCHOR_FILE);
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(StoreError::Io {
                path,
                op: "read anchor",
                source: e,
            })
        }
    };
    let corrupt = |reason: String| StoreError::Corrupt {
        segment: path.clone(),
        line: Some(1),
        reason,
    };
    let line = bytes
        .strip_suffix(b"\n")
        .ok_or_else(|| corrupt("anchor is not one complete line".into()))?;
    match parse_line(line) {
        Ok(Line::Seal(seal)) => Ok(Some(seal)),
        Ok(Line::Record(_)) => Err(corrupt("anchor holds a record, not a seal".into())),
        Err(e) => Err(corrupt(e.to_string())),
    }
}

/// Replaces the anchor atomically: a crash leaves the old one or the new one, never half.
pub(crate) fn write_anchor(dir: &Path, seal: &Seal) -> Result<(), StoreError> {
    let tmp = dir.join(ANCHOR_TMP_FILE);
    let mut line = Vec::new();
    encode_seal_line(&mut line, seal);
    // A temporary file left by a crash is replaced, not reused with whatever mode it has.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(StoreError::io(&tmp, "remove stale anchor")(e))
        }
        _ => {}
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(&tmp)
        .map_err(StoreError::io(&tmp, "create anchor"))?;
    file.write_all(&line)
        .and_then(|()| file.sync_all())
        .map_err(StoreError::io(&tmp, "write anchor"))?;
    let path = dir.join(ANCHOR_FILE);
    fs::rename(&tmp, &path).map_err(StoreError::io(&path, "rename anchor"))?;
    sync_dir(dir)
}

/// The seal at the end of a segment, if its last line is one (for a compressed segment: the
/// copy in its trailer). Reads only the tail.
pub(crate) fn read_tail_seal(segment: &SegmentFile) -> Result<Option<Seal>, StoreError> {
    let path = &segment.path;
    let (tail, start) = match read_tail(path) {
        // Compressed since it was listed: the compressor runs beside the store and readers.
        Err(StoreError::Io { source, .. })
            if !segment.compressed && source.kind() == std::io::ErrorKind::NotFound =>
        {
            let compressed = path.with_file_name(compressed_segment_file_name(segment.first_seq));
            let (tail, _) = read_tail(&compressed)?;
            return Ok(crate::format::trailer_seal(&tail));
        }
        other => other?,
    };
    if segment.compressed {
        return Ok(crate::format::trailer_seal(&tail));
    }
    let Some(body) = tail.strip_suffix(b"\n") else {
        return Ok(None);
    };
    let last_line = match body.iter().rposition(|b| *b == b'\n') {
        Some(nl) => body.get(nl.saturating_add(1)..).unwrap_or_default(),
        // The whole window is one line: only a seal if the window reached the file start.
        None if start == 0 => body,
        None => return Ok(None),
    };
    match parse_line(last_line) {
        Ok(Line::Seal(seal)) => Ok(Some(seal)),
        _ => Ok(None),
    }
}

/// The last `SEAL_TAIL_WINDOW` bytes of a file, and where they start.
fn read_tail(path: &Path) -> Result<(Vec<u8>, u64), StoreError> {
    let mut file = File::open(path).map_err(StoreError::io(path, "open segment"))?;
    let len = file
        .metadata()
        .map_err(StoreError::io(path, "stat segment"))?
        .len();
    let start = len.saturating_sub(SEAL_TAIL_WINDOW);
    file.seek(SeekFrom::Start(start))
        .map_err(StoreError::io(path, "seek segment"))?;
    let mut tail = Vec::new();
    file.take(SEAL_TAIL_WINDOW)
        .read_to_end(&mut tail)
        .map_err(StoreError::io(path, "read segment"))?;
    Ok((tail, start))
}

/// The segments still in the chain once those the prune anchor already covers are left out
/// (they exist only when a crash interrupted a prune).
pub(crate) fn skip_pruned<'a>(
    segments: &'a [SegmentFile],
    anchor: Option<&Seal>,
) -> &'a [SegmentFile] {
    let Some(anchor) = anchor else {
        return segments;
    };
    let boundary = anchor.last_seq.saturating_add(1);
    // Segment i ends where segment i+1 begins, so it is covered when i+1 starts at or before
    // the first seq after the anchor.
    let covered = segments
        .iter()
        .skip(1)
        .take_while(|next| next.first_seq <= boundary)
        .count();
    segments.get(covered..).unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn a_seal_is_read_from_the_compressed_file_when_the_listed_plain_one_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) =
            crate::Store::open(dir.path(), crate::StoreOptions::default()).unwrap();
        store.append(b"{\"n\":1}").unwrap();
        let seal = store.seal_current().unwrap().unwrap();
        store.append(b"{\"n\":2}").unwrap();
        let listed = list_segments(dir.path()).unwrap();
        let first = listed.first().unwrap().clone();
        assert!(!first.compressed);
        assert_eq!(crate::compress_sealed(dir.path()).unwrap().len(), 1);
        assert!(!first.path.exists());
        assert_eq!(read_tail_seal(&first).unwrap(), Some(seal));
        let (_, opened) = open_segment(&first).unwrap();
        assert!(opened.compressed, "read from {}", opened.name);
    }

    #[test]
    fn segment_names_round_trip_and_sort_by_seq() {
        assert_eq!(segment_file_name(17), "segment-00000000000000000017.jsonl");
        for seq in [0, 1, 17, u64::MAX] {
            assert_eq!(parse_segment_file_name(&segment_file_name(seq)), Some(seq));
        }
        assert!(segment_file_name(9) < segment_file_name(10));
        for bad in [
            "segment-17.jsonl",
            "segment-0000000000000000001a.jsonl",
            "segment-00000000000000000017.jsonl.bak",
            "torn-00000000000000000017.bin",
            "segment-+0000000000000000017.jsonl",
        ] {
            assert_eq!(parse_segment_file_name(bad), None, "{bad}");
        }
        assert_eq!(
            parse_segment_file_name("segment-99999999999999999999.jsonl"),
            None
        );
    }
}
