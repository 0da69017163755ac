use std::io;
use std::path::PathBuf;

/// Everything the store, the reader and the directory helpers can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("audit store {}: {op} failed: {source}", path.display())]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("audit store {} is in use by another process (lock file held)", path.display())]
    Locked { path: PathBuf },
    #[error("audit store: an earlier write failed, so what is on disk is unknown; reopen the store to recover")]
    Poisoned,
    #[error("audit event #{index} in the batch rejected: {reason}")]
    EventRejected { index: usize, reason: String },
    #[error("audit store option `{option}`: {reason}")]
    BadOptions {
        option: &'static str,
        reason: String,
    },
    #[error("audit store {}{}: {reason}; run `verify` on the directory", segment.display(), line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Corrupt {
        segment: PathBuf,
        line: Option<u64>,
        reason: String,
    },
    #[error("audit records from seq {requested} are no longer stored locally (first kept: {first_available}); fetch them from the central store")]
    Pruned {
        requested: u64,
        first_available: u64,
    },
    #[error("audit store: sequence numbers exhausted")]
    SequenceExhausted,
}

impl StoreError {
    pub(crate) fn io(path: impl Into<PathBuf>, op: &'static str) -> impl FnOnce(io::Error) -> Self {
        let path = path.into();
        move |source| StoreError::Io { path, op, source }
    }
}
