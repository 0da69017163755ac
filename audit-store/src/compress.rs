//! Compressing sealed segments. A sealed segment never changes again, so it can be stored as
//! one zstd frame of exactly its lines: the chain covers the decompressed bytes, so `verify`,
//! the reader and recovery see the same lines as before, and an edit of the compressed file
//! fails zstd's content checksum (or the chain, if someone recompresses edited lines).
//!
//! Layout of `segment-<first seq>.jsonl.zst` (RFC 8878): one zstd frame with a content checksum
//! holding the plain segment byte for byte, then a skippable frame (magic `0x184D2A5E`) whose
//! payload is the seal line again, so that opening the store reads a segment's seal from its
//! last bytes without decompressing it. Decoders skip skippable frames; `verify` checks that
//! this copy equals the seal inside.
//!
//! The steps are ordered so that a crash at any point loses nothing: the compressed file is
//! written beside under a temporary name, fsynced, decompressed again and compared with the
//! plain file's SHA-256, renamed into place, the directory fsynced, and only then is the plain
//! file removed. A crash leaves a stale temporary file (ignored, replaced next time) or both
//! files, of which readers take the plain one until the next pass removes it.

use crate::dir::{
    compressed_segment_file_name, list_segments, read_tail_seal, sync_dir, FILE_MODE,
};
use crate::error::StoreError;
use crate::format::{encode_trailer, Seal};
use sha2::{Digest, Sha256};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// zstd's fastest regular level. Audit lines repeat so much (the same connection, identity
/// and statement in line after line) that level 1 compresses them as well as the default
/// level 3, at twice its speed: `zstd -b1 -e3` over 200,000 statement events shaped like the
/// agent's, 1,397 MB/s and 18.9× at level 1 against 703 MB/s and 16.7× at level 3. The
/// compressor runs in the agent's process, so its CPU is the agent's CPU per statement.
const LEVEL: i32 = 1;

/// One segment compressed by [`compress_sealed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompressedSegment {
    /// The compressed file now holding the segment.
    pub path: PathBuf,
    pub plain_bytes: u64,
    pub compressed_bytes: u64,
}

/// Compresses every sealed segment of `dir` still stored plain, oldest first. Never the newest
/// segment (it may be open), nor one whose last line is not a seal. Safe to run beside the
/// [`crate::Store`] writing the directory, and beside readers: a sealed segment is never written
/// again, and a reader that opened the plain file keeps reading it after its removal.
pub fn compress_sealed(dir: &Path) -> Result<Vec<CompressedSegment>, StoreError> {
    let segments = list_segments(dir)?;
    let mut done = Vec::new();
    for segment in segments
        .iter()
        .take(segments.len().saturating_sub(1))
        .filter(|s| !s.compressed)
    {
        let Some(seal) = read_tail_seal(segment)? else {
            continue;
        };
        done.push(compress_segment(dir, &segment.path, &seal)?);
    }
    Ok(done)
}

fn compress_segment(
    dir: &Path,
    plain: &Path,
    seal: &Seal,
) -> Result<CompressedSegment, StoreError> {
    let name = compressed_segment_file_name(seal.first_seq);
    let path = dir.join(&name);
    let tmp = dir.join(format!("{name}.tmp"));
    // A temporary file left by a crash is replaced, never appended to or trusted.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(StoreError::io(&tmp, "remove stale compressed segment")(e))
        }
        _ => {}
    }
    let written = write_compressed(plain, &tmp, seal);
    let (plain_digest, plain_bytes) = match written {
        Ok(done) => done,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    // The plain file goes only once its replacement is known to give back the same bytes.
    let (digest, _) = match File::open(&tmp).and_then(|f| {
        let decoder = zstd::stream::read::Decoder::new(f)?;
        digest_of(decoder)
    }) {
        Ok(read_back) => read_back,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::io(&tmp, "read back compressed segment")(e));
        }
    };
    if digest != plain_digest {
        let _ = fs::remove_file(&tmp);
        return Err(StoreError::Corrupt {
            segment: tmp,
            line: None,
            reason: "the compressed segment does not decompress to the plain one; the plain file is kept".into(),
        });
    }
    fs::rename(&tmp, &path).map_err(StoreError::io(&path, "rename compressed segment"))?;
    sync_dir(dir)?;
    match fs::remove_file(plain) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(StoreError::io(plain, "remove compressed plain segment")(e))
        }
        _ => {}
    }
    sync_dir(dir)?;
    let compressed_bytes = fs::metadata(&path)
        .map_err(StoreError::io(&path, "stat compressed segment"))?
        .len();
    Ok(CompressedSegment {
        path,
        plain_bytes,
        compressed_bytes,
    })
}

/// Writes and fsyncs `tmp`; returns the SHA-256 and length of the plain bytes compressed.
fn write_compressed(plain: &Path, tmp: &Path, seal: &Seal) -> Result<([u8; 32], u64), StoreError> {
    let source = File::open(plain).map_err(StoreError::io(plain, "open sealed segment"))?;
    let out = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(tmp)
        .map_err(StoreError::io(tmp, "create compressed segment"))?;
    let write_err = StoreError::io(tmp, "write compressed segment");
    let mut encoder = match zstd::stream::write::Encoder::new(out, LEVEL) {
        Ok(encoder) => encoder,
        Err(e) => return Err(write_err(e)),
    };
    let mut hashing = Hashing {
        inner: source,
        hasher: Sha256::new(),
        len: 0,
    };
    let copied = encoder
        .include_checksum(true)
        .and_then(|()| io::copy(&mut hashing, &mut encoder))
        .and_then(|_| encoder.finish());
    let mut out = match copied {
        Ok(out) => out,
        Err(e) => return Err(write_err(e)),
    };
    let mut trailer = Vec::with_capacity(512);
    encode_trailer(&mut trailer, seal);
    match out.write_all(&trailer).and_then(|()| out.sync_all()) {
        Ok(()) => Ok((hashing.hasher.finalize().into(), hashing.len)),
        Err(e) => Err(write_err(e)),
    }
}

fn digest_of(mut reader: impl Read) -> io::Result<([u8; 32], u64)> {
    let mut hashing = Hashing {
        inner: &mut reader,
        hasher: Sha256::new(),
        len: 0,
    };
    io::copy(&mut hashing, &mut io::sink())?;
    Ok((hashing.hasher.finalize().into(), hashing.len))
}

/// Hashes what passes through, so the plain file is read once.
struct Hashing<R> {
    inner: R,
    hasher: Sha256,
    len: u64,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let read = buf.get(..n).unwrap_or_default();
        self.hasher.update(read);
        self.len = self
            .len
            .saturating_add(u64::try_from(n).unwrap_or(u64::MAX));
        Ok(n)
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    reason = "tests fail loudly"
)]
mod tests {
    use super::*;
    use crate::format::{encode_seal_line, trailer_seal, ChainHash};

    fn seal() -> Seal {
        Seal {
            first_seq: 3,
            last_seq: 9,
            count: 7,
            time_ms: 1_700_000_000_000,
            final_hash: ChainHash([0x5a; 32]),
            sig: Some([7; 64]),
        }
    }

    #[test]
    fn the_trailer_is_a_skippable_frame_holding_the_seal_line() {
        let mut out = b"zstd frame bytes".to_vec();
        encode_trailer(&mut out, &seal());
        let mut line = Vec::new();
        encode_seal_line(&mut line, &seal());
        let trailer = out.get(16..).unwrap();
        assert_eq!(trailer.get(..4).unwrap(), &[0x5e, 0x2a, 0x4d, 0x18]);
        assert_eq!(
            trailer.get(4..8).unwrap(),
            &u32::try_from(line.len()).unwrap().to_le_bytes()
        );
        assert_eq!(trailer.get(8..).unwrap(), &line[..]);
        assert_eq!(trailer_seal(&out), Some(seal()));
    }

    #[test]
    fn a_trailer_cut_or_extended_gives_no_seal() {
        let mut out = b"zstd".to_vec();
        encode_trailer(&mut out, &seal());
        for cut in 0..out.len() {
            assert_eq!(trailer_seal(out.get(..cut).unwrap()), None, "cut at {cut}");
        }
        let mut longer = out.clone();
        longer.push(b'x');
        assert_eq!(trailer_seal(&longer), None);
        let mut edited = out.clone();
        let at = edited.len() - 10;
        edited[at] = b'A';
        assert_eq!(
            trailer_seal(&edited),
            None,
            "upper-case hex is not canonical"
        );
    }

    #[test]
    fn zstd_readers_skip_the_trailer() {
        let plain = b"{\"seq\":1}\n{\"seal\":{}}\n".repeat(50);
        let mut out = zstd::stream::encode_all(&plain[..], LEVEL).unwrap();
        encode_trailer(&mut out, &seal());
        let back = zstd::stream::decode_all(&out[..]).unwrap();
        assert_eq!(back, plain);
    }
}
