//! Audit events: one event type for every protocol and every decision.
//!
//! Events are stored in the tamper-evident, hash-chained store of `portcullis-audit-store`
//! under `<state_dir>/audit` (see `audit-store/README.md`); `portcullis audit verify` checks
//! it and `portcullis audit export` prints it as NDJSON.

pub mod central;
pub mod central_read;
pub mod query;
mod queue;
pub mod recording;
pub mod siem;
pub(crate) mod spool;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;

/// `error: cause: cause…` for the shippers' warnings: HTTP and PostgreSQL clients keep the
/// reason (a refused certificate's) out of their own message. Each cause appears once, as a
/// layer often repeats the one below it.
pub(crate) fn with_sources(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

pub use portcullis_core::event::{
    AuditEvent, Decision, Encoded, EventKind, StatementEncoded, StatementEventParts,
    StatementFields, StatementRecord,
};
pub use portcullis_core::{hostname, now_ms};

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit store {path}: {source}")]
    Store {
        path: PathBuf,
        source: portcullis_audit_store::StoreError,
    },
    #[error("audit signing key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("the audit writer has stopped")]
    WriterGone,
    #[error("the audit store refused the event: {0}")]
    Write(String),
}

/// How many events one fsync may cover: bounds the latency a waiting caller sees.
const BATCH: usize = 256;
/// Events waiting for the writer before new connections and statements wait for room
/// (asynchronous backpressure; recording itself never waits: see `queue`).
const QUEUE: usize = 65_536;

/// Work for the writer. Events arrive serialized: the thread that records an event encodes
/// it, so encoding runs on every event loop at once and the one writer keeps only what must
/// be serial (the hash chain and the file); an event handed over as a structure would also
/// be freed on the writer's thread, far from where it was allocated, and every reference
/// count it shares with its connection would bounce between the two.
enum Job {
    Event {
        line: portcullis_audit_store::EncodedEvent,
        done: Option<tokio::sync::oneshot::Sender<Result<u64, String>>>,
    },
    Flush(std::sync::mpsc::Sender<()>),
}

/// The audit trail: events go to the hash-chained store (`portcullis-audit-store`) through
/// one writer thread that group-commits: every event waiting when a batch starts shares one
/// fsync. `record_durable` returns only once its event is on disk; gating events (a
/// connection about to be forwarded) use it, so nothing is forwarded that was not recorded.
pub struct AuditLog {
    dir: PathBuf,
    queue: std::sync::Arc<queue::Queue<Job>>,
    /// The highest seq written; the central shipper measures its backlog against it.
    last_seq: std::sync::Arc<std::sync::atomic::AtomicU64>,
    spool: central::SpoolState,
    /// Set by the writer while the store cannot be written.
    health: Arc<WriteHealth>,
    on_write_failure: crate::config::OnWriteFailure,
    /// Dropping it stops the compressor thread.
    _compressor: std::sync::mpsc::Sender<()>,
}

/// Why the store cannot be written, since when, and what was lost meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct WriteFailure {
    pub since_ms: u64,
    pub error: String,
    /// Events that could not be written since `since_ms`.
    pub lost_events: u64,
}

/// The writer's health, shared with everything that must act on it. The flag is read on
/// every admission and every PostgreSQL message: an atomic, not the lock.
#[derive(Debug, Default)]
pub struct WriteHealth {
    failing: std::sync::atomic::AtomicBool,
    failure: std::sync::Mutex<Option<WriteFailure>>,
}

impl WriteHealth {
    pub fn failing(&self) -> bool {
        self.failing.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn failure(&self) -> Option<WriteFailure> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<WriteFailure>> {
        self.failure.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a failed write of `lost` events; returns true when the store was healthy
    /// until now.
    fn failed(&self, error: &str, lost: u64) -> bool {
        let mut f = self.lock();
        let first = f.is_none();
        let entry = f.get_or_insert_with(|| WriteFailure {
            since_ms: now_ms(),
            error: error.to_string(),
            lost_events: 0,
        });
        entry.error = error.to_string();
        entry.lost_events = entry.lost_events.saturating_add(lost);
        self.failing
            .store(true, std::sync::atomic::Ordering::Release);
        first
    }

    fn recovered(&self) -> Option<WriteFailure> {
        let mut f = self.lock();
        self.failing
            .store(false, std::sync::atomic::Ordering::Release);
        f.take()
    }
}

impl AuditLog {
    /// Opens (and if needed repairs) the store. Repairs are returned for the caller to
    /// record as integrity events.
    /// `shipped_progress`: where each shipper (central, syslog, webhook) records how far it
    /// got; retention never deletes past the least advanced. Empty when nothing ships
    /// (retention then deletes by age and size).
    pub fn open(
        config: &crate::config::AuditConfig,
        dir: &Path,
        shipped_progress: Vec<PathBuf>,
    ) -> Result<(Self, Vec<String>), AuditError> {
        let store_err = |source| AuditError::Store {
            path: dir.to_path_buf(),
            source,
        };
        let signing_key = match &config.signing_key_file {
            Some(path) => Some(read_signing_key(path)?),
            None => None,
        };
        let (max_segment_bytes, max_segment_age_ms) = (
            config.max_segment_bytes,
            config.max_segment_age_secs.saturating_mul(1000),
        );
        let options = move || portcullis_audit_store::StoreOptions {
            max_segment_bytes,
            max_segment_age_ms,
            signing_key: signing_key.clone(),
            ..Default::default()
        };
        let opts = options();
        // 0700 whatever the umask, and so is every missing parent (the state directory).
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(dir)
            .map_err(|e| {
                store_err(portcullis_audit_store::StoreError::Io {
                    path: dir.to_path_buf(),
                    op: "creating the directory",
                    source: e,
                })
            })?;
        let (store, notes) = portcullis_audit_store::Store::open(dir, opts).map_err(store_err)?;
        let notes = notes.iter().map(ToString::to_string).collect();
        let queue = std::sync::Arc::new(queue::Queue::new(QUEUE, BATCH));
        let rx = std::sync::Arc::clone(&queue);
        let path = dir.to_path_buf();
        let last_seq = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(
            store.next_seq().saturating_sub(1),
        ));
        let written = std::sync::Arc::clone(&last_seq);
        let mut pruning = Pruning {
            retention: portcullis_audit_store::Retention {
                max_age_ms: config.retention_days.map(|d| d.saturating_mul(86_400_000)),
                max_total_bytes: config.retention_max_bytes,
            },
            shipped_progress,
            last: None,
        };
        let health = Arc::new(WriteHealth::default());
        let mut writer = Writer {
            store: Some(store),
            reopen: Box::new(move |dir: &Path| {
                portcullis_audit_store::Store::open(dir, options()).map(|(store, _)| store)
            }),
            health: Arc::clone(&health),
            last_reopen: None,
        };
        std::thread::Builder::new()
            .name("portcullis-audit".into())
            .spawn(move || write_loop(&mut writer, &rx, &path, &written, &mut pruning))
            .map_err(|e| AuditError::Write(format!("starting the audit writer: {e}")))?;
        let (compressor, stop) = std::sync::mpsc::channel();
        if config.compress_sealed_segments {
            let path = dir.to_path_buf();
            std::thread::Builder::new()
                .name("portcullis-audit-zstd".into())
                .spawn(move || compress_loop(&path, &stop))
                .map_err(|e| AuditError::Write(format!("starting the audit compressor: {e}")))?;
        }
        Ok((
            Self {
                dir: dir.to_path_buf(),
                queue,
                last_seq,
                spool: central::SpoolState::default(),
                health,
                on_write_failure: config.on_write_failure,
                _compressor: compressor,
            },
            notes,
        ))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The highest seq on disk (0 for an empty store).
    pub fn last_seq(&self) -> u64 {
        self.last_seq.load(std::sync::atomic::Ordering::Acquire)
    }

    pub fn spool(&self) -> &central::SpoolState {
        &self.spool
    }

    /// Why nothing may start now for want of an audit trail: the central backlog over its
    /// bound (`on_spool_full = "refuse_connections"`), or the store failing to write
    /// (`on_write_failure = "refuse"`). None while connections may open.
    pub fn refusal_reason(&self) -> Option<String> {
        if self.spool.refusing() {
            return Some("the central audit backlog is over audit.central.spool_max_bytes (on_spool_full = \"refuse_connections\")".into());
        }
        self.write_refusal()
    }

    /// The write failure as a refusal reason, when `on_write_failure = "refuse"`: what ends
    /// open sessions at their next message.
    pub fn write_refusal(&self) -> Option<String> {
        if self.on_write_failure != crate::config::OnWriteFailure::Refuse || !self.health.failing()
        {
            return None;
        }
        let error = self
            .health
            .failure()
            .map_or_else(|| "unknown error".to_string(), |f| f.error);
        Some(format!(
            "the audit trail cannot be written ({error}); nothing is allowed until it can (audit.on_write_failure = \"refuse\")"
        ))
    }

    /// Whether a connection may open although its `connection.opened` event was not
    /// written (`on_write_failure = "keep_enforcing"` and the store failing).
    pub fn keeps_enforcing_unaudited(&self) -> bool {
        self.on_write_failure == crate::config::OnWriteFailure::KeepEnforcing
            && self.health.failing()
    }

    pub fn write_failure(&self) -> Option<WriteFailure> {
        self.health.failure()
    }

    pub fn on_write_failure(&self) -> crate::config::OnWriteFailure {
        self.on_write_failure
    }

    fn line(event: &AuditEvent) -> Option<portcullis_audit_store::EncodedEvent> {
        match portcullis_audit_store::EncodedEvent::encode(event) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize an audit event");
                None
            }
        }
    }

    /// Waits, without blocking the thread, until the audit queue is below its capacity: what
    /// produces events on the data plane calls it before producing more (backpressure), so a
    /// writer that falls behind slows new work down instead of losing events or freezing the
    /// event loop.
    pub async fn room(&self) {
        self.queue.room().await;
    }

    /// Queues an event; it is on disk with the next batch (milliseconds). Never waits, also
    /// when the queue is full (see [`room`] for the backpressure). An event that cannot be
    /// serialized is logged and left out.
    ///
    /// [`room`]: AuditLog::room
    pub fn record(&self, event: AuditEvent) {
        let Some(line) = Self::line(&event) else {
            return;
        };
        drop(event);
        self.record_encoded(line);
    }

    /// Queues an event encoded by its protocol ([`StatementEventParts`]), like [`record`].
    ///
    /// [`record`]: AuditLog::record
    pub fn record_encoded(&self, line: portcullis_audit_store::EncodedEvent) {
        if !self.queue.push(Job::Event { line, done: None }, false) {
            tracing::error!(dir = %self.dir.display(), "the audit writer has stopped; an event was not recorded");
        }
    }

    /// Records an event and waits until it is durable. An error means it is not recorded:
    /// the caller must not perform what the event gates.
    pub async fn record_durable(&self, event: &AuditEvent) -> Result<u64, AuditError> {
        let line =
            Self::line(event).ok_or_else(|| AuditError::Write("unserializable event".into()))?;
        let (done, wait) = tokio::sync::oneshot::channel();
        let job = Job::Event {
            line,
            done: Some(done),
        };
        // A new connection (what this gates) waits while the writer is behind.
        self.queue.room().await;
        if !self.queue.push(job, true) {
            return Err(AuditError::WriterGone);
        }
        wait.await
            .map_err(|_| AuditError::WriterGone)?
            .map_err(AuditError::Write)
    }

    /// Waits until everything queued so far is on disk (shutdown).
    pub fn flush(&self) {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.queue.push(Job::Flush(tx), true) {
            let _ = rx.recv_timeout(std::time::Duration::from_secs(10));
        }
    }
}

impl Drop for AuditLog {
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// How often sealed segments are looked for to compress.
const COMPRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Compresses sealed segments (zstd) on a thread of its own, so the writer never waits for
/// it: a sealed segment is never written again, and readers (search, export, the shippers)
/// read either form. Stops when its `AuditLog` is dropped.
fn compress_loop(dir: &Path, stop: &std::sync::mpsc::Receiver<()>) {
    while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(COMPRESS_EVERY) {
        match portcullis_audit_store::compress_sealed(dir) {
            Ok(done) => {
                for segment in done {
                    tracing::debug!(
                        segment = %segment.path.display(),
                        plain = segment.plain_bytes,
                        compressed = segment.compressed_bytes,
                        "audit segment compressed"
                    );
                }
            }
            // Nothing is lost: the plain segment stays and is tried again on the next pass.
            Err(e) => {
                tracing::error!(dir = %dir.display(), error = %e, "compressing a sealed audit segment failed");
            }
        }
    }
}

/// Retention, applied by the writer (the only one who may delete) once a minute.
struct Pruning {
    retention: portcullis_audit_store::Retention,
    shipped_progress: Vec<PathBuf>,
    last: Option<std::time::Instant>,
}

impl Pruning {
    fn run_if_due(&mut self, store: &mut portcullis_audit_store::Store, dir: &Path) {
        if self.retention.max_age_ms.is_none() && self.retention.max_total_bytes.is_none() {
            return;
        }
        if self
            .last
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(60))
        {
            return;
        }
        self.last = Some(std::time::Instant::now());
        let mut shipped_upto = u64::MAX;
        for path in &self.shipped_progress {
            match central::read_progress(path) {
                Ok(seq) => shipped_upto = shipped_upto.min(seq),
                Err(e) => {
                    tracing::error!(error = %e, "cannot read a shipping progress file; nothing is pruned");
                    return;
                }
            }
        }
        match store.prune(&self.retention, shipped_upto, now_ms()) {
            Ok(report) => {
                if !report.deleted.is_empty() {
                    tracing::info!(
                        segments = report.deleted.len(),
                        freed = report.freed_bytes,
                        "audit retention pruned old segments"
                    );
                }
                // A closed recording goes with the segment holding its closed event (its
                // last), so never before every shipper has that event.
                if !report.deleted.is_empty() {
                    match portcullis_audit_store::recording::prune_recordings(dir) {
                        Ok(gone) if !gone.is_empty() => {
                            tracing::info!(
                                recordings = gone.len(),
                                "audit retention deleted the recordings of pruned segments"
                            );
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::error!(dir = %dir.display(), error = %e, "audit retention could not delete recordings");
                        }
                    }
                }
                if report.blocked_by_unshipped {
                    tracing::warn!(dir = %dir.display(), "audit retention is waiting for a shipper (central, syslog or webhook): unshipped records are kept");
                }
            }
            Err(e) => tracing::error!(dir = %dir.display(), error = %e, "audit retention failed"),
        }
    }
}

/// How often the writer looks for events while they flow (nobody wakes it for each one).
const TICK: std::time::Duration = std::time::Duration::from_millis(5);
/// The longest an event nobody waits for stays written but not fsynced.
const SYNC_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// While the store cannot be written, how often the writer reopens it to try again.
const RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

type Reopen = Box<
    dyn Fn(&Path) -> Result<portcullis_audit_store::Store, portcullis_audit_store::StoreError>
        + Send,
>;

/// The writer's store. A failed write or fsync poisons a store (its page cache may no
/// longer match the disk), so the writer drops it and reopens the directory, which
/// re-reads the disk and cuts a torn tail, at most once every `RETRY_EVERY`; what arrives
/// in between is lost and counted, and the health flag makes the agent refuse what it
/// cannot record (`audit.on_write_failure`).
struct Writer {
    store: Option<portcullis_audit_store::Store>,
    reopen: Reopen,
    health: Arc<WriteHealth>,
    last_reopen: Option<std::time::Instant>,
}

impl Writer {
    fn failed(&mut self, dir: &Path, error: &dyn std::fmt::Display, lost: u64) {
        if self.health.failed(&error.to_string(), lost) {
            tracing::error!(dir = %dir.display(), error = %error, "the audit store cannot be written; see audit.on_write_failure");
        }
    }

    /// The store to write to, reopened first after a failure; None while it stays broken.
    /// After a reopen, the first write is an `audit.integrity` event saying what was lost:
    /// that write is the proof the store works again.
    fn store(&mut self, dir: &Path) -> Option<&mut portcullis_audit_store::Store> {
        if !self.health.failing() {
            return self.store.as_mut();
        }
        if self.last_reopen.is_some_and(|t| t.elapsed() < RETRY_EVERY) {
            return None;
        }
        self.last_reopen = Some(std::time::Instant::now());
        // The old store holds the directory's lock: it goes first.
        self.store = None;
        match (self.reopen)(dir) {
            Ok(store) => self.store = Some(store),
            Err(e) => {
                self.failed(dir, &e, 0);
                return None;
            }
        }
        let failure = self.health.failure()?;
        let mut ev = AuditEvent::new(EventKind::AuditIntegrity).reason(format!(
            "the audit store could not be written from {} ms until now ({}); {} event(s) were lost",
            failure.since_ms, failure.error, failure.lost_events
        ));
        ev.count = Some(failure.lost_events);
        let line = portcullis_audit_store::EncodedEvent::encode(&ev).ok()?;
        let store = self.store.as_mut()?;
        match store.append_batch(&[&line]) {
            Ok(_) => {
                self.health.recovered();
                tracing::warn!(dir = %dir.display(), lost = failure.lost_events, "the audit store can be written again");
                self.store.as_mut()
            }
            Err(e) => {
                self.failed(dir, &e, 0);
                None
            }
        }
    }
}

fn write_loop(
    writer: &mut Writer,
    queue: &queue::Queue<Job>,
    dir: &Path,
    written: &std::sync::atomic::AtomicU64,
    pruning: &mut Pruning,
) {
    let mut last_sync = std::time::Instant::now();
    let mut active = false;
    loop {
        let unsynced = writer.store.as_ref().is_some_and(|s| s.has_unsynced());
        // Records nobody waits for are written within a tick and made durable within
        // SYNC_EVERY: one fsync (or one wake-up) per statement would cost more than the
        // statement. A broken store is retried while idle, so `status` sees it recover.
        let tick = if active {
            Some(TICK)
        } else if writer.health.failing() {
            Some(RETRY_EVERY)
        } else if unsynced {
            Some(SYNC_EVERY.saturating_sub(last_sync.elapsed()))
        } else {
            None
        };
        let (jobs, closing) = match queue.pop_batch(tick) {
            queue::Popped::Jobs(jobs) => (jobs, false),
            queue::Popped::Closed(jobs) => (jobs, true),
        };
        active = !jobs.is_empty();
        if jobs.is_empty() {
            let Some(store) = writer.store(dir) else {
                if closing {
                    return;
                }
                continue;
            };
            if store.has_unsynced() && (closing || last_sync.elapsed() >= SYNC_EVERY) {
                let synced = store.sync();
                last_sync = std::time::Instant::now();
                if let Err(e) = synced {
                    writer.failed(dir, &e, 0);
                }
            }
            if closing {
                return;
            }
            let Some(store) = writer.store(dir) else {
                continue;
            };
            if let Err(e) = store.rotate_if_due(now_ms()) {
                writer.failed(dir, &e, 0);
                continue;
            }
            pruning.run_if_due(store, dir);
            continue;
        }
        let mut lines: Vec<&portcullis_audit_store::EncodedEvent> = Vec::with_capacity(jobs.len());
        for job in &jobs {
            if let Job::Event { line, .. } = job {
                lines.push(line);
            }
        }
        // Someone waits for durability: an event that gates an action, or a flush.
        let durable = jobs
            .iter()
            .any(|j| matches!(j, Job::Event { done: Some(_), .. } | Job::Flush(_)));
        let result = match writer.store(dir) {
            None => {
                let error = writer.health.failure().map_or_else(
                    || "the audit store cannot be written".to_string(),
                    |f| f.error,
                );
                writer
                    .health
                    .failed(&error, u64::try_from(lines.len()).unwrap_or(u64::MAX));
                Err(error)
            }
            Some(store) => {
                let r = if lines.is_empty() {
                    if durable {
                        store.sync().map(|()| Vec::new())
                    } else {
                        Ok(Vec::new())
                    }
                } else if durable || closing || last_sync.elapsed() >= SYNC_EVERY {
                    store.append_batch(&lines)
                } else {
                    store.append_batch_buffered(&lines)
                };
                if !store.has_unsynced() {
                    last_sync = std::time::Instant::now();
                }
                match r {
                    Ok(refs) => Ok(refs),
                    Err(e) => {
                        let lost = u64::try_from(lines.len()).unwrap_or(u64::MAX);
                        writer.failed(dir, &e, lost);
                        Err(e.to_string())
                    }
                }
            }
        };
        if let Ok(refs) = &result {
            if let Some(last) = refs.last() {
                written.store(last.seq, std::sync::atomic::Ordering::Release);
            }
        }
        let mut refs = result.as_ref().ok().map(|r| r.iter());
        for job in jobs {
            match job {
                Job::Event { done, .. } => {
                    let outcome = match refs.as_mut().and_then(Iterator::next) {
                        Some(r) => Ok(r.seq),
                        None => Err(result
                            .as_ref()
                            .err()
                            .cloned()
                            .unwrap_or_else(|| "not written".to_string())),
                    };
                    if let Some(done) = done {
                        let _ = done.send(outcome);
                    }
                }
                Job::Flush(ack) => {
                    let _ = ack.send(());
                }
            }
        }
        if let Some(store) = writer.store.as_mut().filter(|_| !writer.health.failing()) {
            if let Err(e) = store.rotate_if_due(now_ms()) {
                writer.failed(dir, &e, 0);
            }
        }
    }
}

/// The public half of `audit.signing_key_file`, as `portcullis audit verify --public-key`
/// takes it (64 hex characters): whoever verifies a copy of the trail elsewhere needs it,
/// and never the seed.
pub(crate) fn public_key_hex(path: &Path) -> Result<String, AuditError> {
    Ok(hex::encode(
        read_signing_key(path)?.verifying_key().to_bytes(),
    ))
}

/// An Ed25519 seed as 64 hex characters in a root-only file.
pub(crate) fn read_signing_key(
    path: &Path,
) -> Result<portcullis_audit_store::SigningKey, AuditError> {
    use std::os::unix::fs::MetadataExt;
    let err = |reason: String| AuditError::Key {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(err(format!(
            "readable by others (mode {:o}); make it 0600",
            meta.mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let bytes = hex::decode(text.trim()).map_err(|e| err(format!("not hex: {e}")))?;
    let seed: [u8; 32] = bytes
        .try_into()
        .map_err(|_| err("expected 32 bytes (64 hex characters)".into()))?;
    Ok(portcullis_audit_store::SigningKey::from_bytes(&seed))
}

/// Prints the p50 and p99 of `ms` (one sample per run, milliseconds) as the `BENCH-ROW`
/// lines `cargo xtask bench` reads from a bench body run as an ignored test: keys
/// `<key>_p50` and `<key>_p99`, names `<name>, p50` and `<name>, p99`.
#[cfg(test)]
pub(crate) fn print_latency_rows(key: &str, name: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let last = ms.len().saturating_sub(1) as f64;
        ms.get((last * q).round() as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    for (stat, v) in [("p50", at(0.5)), ("p99", at(0.99))] {
        println!(
            "BENCH-ROW {}",
            serde_json::json!({"key": format!("{key}_{stat}"),
                   "name": format!("{name}, {stat}"),
                   "value": v, "unit": "ms", "rounds": ms.len()})
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod public_key_tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn the_printed_public_key_verifies_the_seals_its_seed_signed() {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("audit.key");
        std::fs::write(&seed, format!("{}\n", "7f".repeat(32))).unwrap();
        std::fs::set_permissions(&seed, std::fs::Permissions::from_mode(0o600)).unwrap();
        let store_dir = dir.path().join("audit");
        let options = portcullis_audit_store::StoreOptions {
            signing_key: Some(read_signing_key(&seed).unwrap()),
            ..Default::default()
        };
        let (mut store, _) = portcullis_audit_store::Store::open(&store_dir, options).unwrap();
        store.append(br#"{"n":1}"#).unwrap();
        store.seal_current().unwrap();
        drop(store);

        let printed = public_key_hex(&seed).unwrap();
        assert_eq!(printed.len(), 64);
        let key = |hex_key: &str| {
            let bytes: [u8; 32] = hex::decode(hex_key).unwrap().try_into().unwrap();
            portcullis_audit_store::VerifyingKey::from_bytes(&bytes).unwrap()
        };
        let report = portcullis_audit_store::verify(&store_dir, Some(&key(&printed)));
        assert!(
            report.ok && report.signatures_checked,
            "{:?}",
            report.first_break
        );
        // Another key does not verify them: the check is real.
        let other = hex::encode(
            portcullis_audit_store::SigningKey::from_bytes(&[8; 32])
                .verifying_key()
                .to_bytes(),
        );
        assert!(!portcullis_audit_store::verify(&store_dir, Some(&key(&other))).ok);
        // A seed others can read is refused, not printed from.
        std::fs::set_permissions(&seed, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = public_key_hex(&seed).unwrap_err().to_string();
        assert!(err.contains("make it 0600"), "{err}");
    }
}
