//! What a connection has carried so far, readable while it runs.

use std::sync::atomic::AtomicU64;

/// Live byte counters of one connection, shared with `portcullis status`.
#[derive(Debug, Default)]
pub struct ByteCounters {
    pub client_to_upstream: AtomicU64,
    pub upstream_to_client: AtomicU64,
}
