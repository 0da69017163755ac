//! The local audit store of a Portcullis agent: append-only, hash-chained, tamper-evident.
//!
//! Events are JSON lines in segment files; each record carries the hash of the one before, so
//! editing, deleting, reordering or truncating anything breaks the chain at a place
//! [`verify`] names. Segments rotate by size and age and are closed by a seal line carrying the
//! final hash, signed with Ed25519 when a key is configured. `append` returns only once the
//! record is fsynced; `append_batch` group-commits. After a crash, [`Store::open`] cuts a torn
//! tail and reports it. Retention never deletes what the central store has not acknowledged.
//!
//! Sealed segments can be compressed ([`compress_sealed`], zstd) without changing what the
//! chain covers: readers, `verify` and recovery decompress.
//!
//! Beside the chain, the recording area ([`recording`]) keeps session recordings whose chunks'
//! hashes the caller records as events, so the chain vouches for them too.
//!
//! Pure and synchronous (std, no async runtime): the agent wraps it on a blocking thread.
//! `README.md` describes the on-disk format and the guarantees.

mod compress;
mod dir;
mod encoded;
mod error;
pub mod format;
mod lines;
mod reader;
pub mod recording;
mod store;
mod verify;

pub use compress::{compress_sealed, CompressedSegment};
pub use dir::{
    compressed_segment_file_name, parse_segment_file_name, read_segment_file, segment_file_name,
};
pub use ed25519_dalek::{SigningKey, VerifyingKey};
pub use encoded::{EncodedEvent, EventBytes, Fields, Key, ObjectWriter};
pub use error::StoreError;
pub use format::{encode_trailer, trailer_seal};
pub use format::{ChainHash, Seal};
pub use reader::{Reader, Record};
pub use store::{
    Clock, IntegrityNote, PruneReport, RecordRef, Retention, Store, StoreOptions, SystemClock,
};
pub use verify::{
    check_segment_bytes, verify, BreakKind, ChainBreak, SegmentSummary, VerifyReport,
};
