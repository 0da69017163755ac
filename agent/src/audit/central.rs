//! Shipping the local audit store to a central PostgreSQL shared by a fleet of bastions.
//!
//! The local hash-chained store is the spool: the shipper reads records after the last seq
//! the central store acknowledged (`<state_dir>/audit-shipped`) and inserts them in order,
//! one transaction per batch, keyed by `(host, seq)` so that a batch sent twice (a crash
//! between the commit and the progress file) is harmless. An outage only delays shipping;
//! nothing is skipped. The agent's role may only insert, so a compromised bastion cannot
//! rewrite what was already shipped. See `docs/audit-central.md`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use portcullis_audit_store::{format::record_hash, ChainHash, Reader, Record, StoreError};
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, NoTls};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{AuditEvent, AuditLog, EventKind};
use crate::config::{CentralConfig, CentralTls, Config, OnSpoolFull};
use portcullis_core::Secret;

/// The schema this agent writes; each entry is applied once, in order, by `migrate`.
/// Later migrations must keep the columns the agent inserts, so older agents keep working.
const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r"
CREATE TABLE IF NOT EXISTS portcullis_audit_events (
    host        text    NOT NULL CHECK (host <> ''),
    seq         bigint  NOT NULL CHECK (seq > 0),
    time_ms     bigint  NOT NULL,
    prev        bytea   NOT NULL CHECK (octet_length(prev) = 32),
    hash        bytea   NOT NULL CHECK (octet_length(hash) = 32),
    event_text  text    NOT NULL,
    event       jsonb,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (host, seq)
);
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'portcullis_writer') THEN
        CREATE ROLE portcullis_writer NOLOGIN;
    END IF;
END $$;
REVOKE ALL ON portcullis_audit_events FROM PUBLIC;
REVOKE ALL ON portcullis_schema_version FROM PUBLIC;
GRANT INSERT ON portcullis_audit_events TO portcullis_writer;
GRANT SELECT (host, seq, hash) ON portcullis_audit_events TO portcullis_writer;
GRANT SELECT ON portcullis_schema_version TO portcullis_writer;
",
    ),
    (
        2,
        // The fleet's approvals: an append-only log of changes (requests, verdicts,
        // revocations, ends) every agent applies in `id` order. Writers serialize on an
        // advisory lock so ids commit in order; the trigger stamps who wrote a row (the
        // database role, which an agent cannot choose) and when (the database's clock), and
        // tells listening agents. The agent's role may add rows and read them, never change one.
        r"
CREATE TABLE IF NOT EXISTS portcullis_approval_log (
    id         bigserial   PRIMARY KEY,
    host       text        NOT NULL CHECK (host <> ''),
    written_by name        NOT NULL DEFAULT session_user,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    change     jsonb       NOT NULL
);
CREATE INDEX IF NOT EXISTS portcullis_approval_log_at ON portcullis_approval_log (at);
CREATE OR REPLACE FUNCTION portcullis_approval_logged() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.written_by := session_user;
    NEW.at := clock_timestamp();
    PERFORM pg_notify('portcullis_approvals', NEW.id::text);
    RETURN NEW;
END $$;
DROP TRIGGER IF EXISTS portcullis_approval_logged ON portcullis_approval_log;
CREATE TRIGGER portcullis_approval_logged BEFORE INSERT ON portcullis_approval_log
    FOR EACH ROW EXECUTE FUNCTION portcullis_approval_logged();
REVOKE ALL ON portcullis_approval_log FROM PUBLIC;
REVOKE ALL ON SEQUENCE portcullis_approval_log_id_seq FROM PUBLIC;
GRANT INSERT, SELECT ON portcullis_approval_log TO portcullis_writer;
GRANT USAGE ON SEQUENCE portcullis_approval_log_id_seq TO portcullis_writer;
",
    ),
    (
        3,
        // The fleet console and fleet reviews read the store: a role that may read every
        // column (and nothing else), and the indexes their pages walk, so a page costs the
        // same with a million events as with a thousand: newest first over time, one host's
        // connection by its id, and one host's agent starts.
        r"
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'portcullis_reader') THEN
        CREATE ROLE portcullis_reader NOLOGIN;
    END IF;
END $$;
GRANT SELECT ON portcullis_audit_events, portcullis_approval_log, portcullis_schema_version
    TO portcullis_reader;
CREATE INDEX IF NOT EXISTS portcullis_audit_events_time
    ON portcullis_audit_events (time_ms, host, seq);
CREATE INDEX IF NOT EXISTS portcullis_audit_events_opened
    ON portcullis_audit_events (time_ms, host, seq)
    WHERE event->>'event' = 'connection.opened';
CREATE INDEX IF NOT EXISTS portcullis_audit_events_connection
    ON portcullis_audit_events (host, (event->>'connection_id'), seq);
CREATE INDEX IF NOT EXISTS portcullis_audit_events_starts
    ON portcullis_audit_events (host, seq)
    WHERE event->>'event' = 'agent.started';
",
    ),
];

/// The schema the fleet console and fleet reviews need (the reader role and its indexes).
pub const CENTRAL_READER_SCHEMA_VERSION: i32 = 3;

/// The schema version this agent needs.
pub const CENTRAL_SCHEMA_VERSION: i32 = 2;

const POLL: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A batch that takes longer than this is treated as an outage (a black-holed network
/// would otherwise hang the shipper forever).
const BATCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Fraction (in tenths) of the bound the backlog must fall under to end an episode, so a
/// backlog hovering at the bound does not flap between refusing and accepting.
const DRAINED_TENTHS: u64 = 9;

#[derive(Debug, thiserror::Error)]
pub enum CentralError {
    #[error("audit.central: {0}")]
    Config(String),
    #[error("central audit password file {path}: {reason}")]
    Password { path: PathBuf, reason: String },
    #[error("central audit TLS: {0}")]
    TlsConfig(#[from] crate::tls::TlsConfigError),
    #[error("central audit store: {}", super::with_sources(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("central audit store: a batch took over {0:?}; retrying")]
    Timeout(Duration),
    #[error("central schema is version {found}, this agent needs {CENTRAL_SCHEMA_VERSION}: run `portcullis audit central-migrate` as the schema owner (docs/audit-central.md)")]
    SchemaTooOld { found: i32 },
    #[error("the central store already holds seq {seq} for host `{host}` with a different hash: this host's local store was reset or the central row was altered; investigate, or give this store a new `audit.central.host_name`")]
    Diverged { host: String, seq: u64 },
    #[error("reading the local audit store: {0}")]
    Local(#[from] StoreError),
    #[error("progress file {path}: {source}")]
    Progress {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Backpressure shared with the proxy: cheap to read on every connection.
#[derive(Debug, Default)]
pub struct SpoolState {
    over: AtomicBool,
    refusing: AtomicBool,
}

impl SpoolState {
    /// Whether new connections must be refused (fail-closed mode, backlog over the bound).
    pub fn refusing(&self) -> bool {
        self.refusing.load(Ordering::Relaxed)
    }

    pub fn over_bound(&self) -> bool {
        self.over.load(Ordering::Relaxed)
    }
}

/// Starts the shipper on `tasks` when `[audit.central]` is configured; it stops with `stop`.
pub fn start(config: &Config, audit: &Arc<AuditLog>, tasks: &TaskTracker, stop: CancellationToken) {
    let Some(central) = config.audit.central.clone() else {
        return;
    };
    let shipper = Shipper {
        host: host_name(&central),
        progress: config.audit_shipped_path(),
        dir: audit.dir().to_path_buf(),
        audit: Arc::clone(audit),
        tasks: tasks.clone(),
        shipped_upto: 0,
        migrated: central.migrate_url.is_none(),
        mark: own_mark(config),
        central,
    };
    tasks.spawn(shipper.run(stop));
}

/// The mark the agent's own connections to the central server carry (its upstream mark), so
/// the redirect never takes them into the agent itself.
pub(crate) fn own_mark(config: &Config) -> Option<u32> {
    Some(config.proxy.upstream_mark).filter(|m| *m != 0)
}

pub(crate) fn host_name(central: &CentralConfig) -> String {
    central
        .host_name
        .clone()
        .unwrap_or_else(|| super::hostname().to_string())
}

struct Shipper {
    central: CentralConfig,
    host: String,
    dir: PathBuf,
    progress: PathBuf,
    audit: Arc<AuditLog>,
    tasks: TaskTracker,
    shipped_upto: u64,
    migrated: bool,
    /// See [`own_mark`].
    mark: Option<u32>,
}

impl Shipper {
    async fn run(mut self, stop: CancellationToken) {
        match read_progress(&self.progress) {
            Ok(seq) => self.shipped_upto = seq,
            Err(e) => {
                // Starting over is safe (inserts are idempotent), only slower.
                tracing::warn!(error = %e, "central audit progress unreadable; re-sending from the oldest local record");
            }
        }
        tracing::info!(host = %self.host, shipped_upto = self.shipped_upto, "central audit shipper started");
        let mut backoff = BACKOFF_MIN;
        let mut client: Option<Client> = None;
        loop {
            self.update_spool();
            if self.audit.last_seq() > self.shipped_upto {
                let outcome = tokio::select! {
                    () = stop.cancelled() => return,
                    r = self.ship_available(&mut client, &stop) => r,
                };
                match outcome {
                    Ok(()) => backoff = BACKOFF_MIN,
                    Err(e) => {
                        tracing::warn!(error = %e, retry_secs = backoff.as_secs(), shipped_upto = self.shipped_upto, "central audit shipping failed; the local store keeps every record");
                        client = None;
                        if self.pause(backoff, &stop).await {
                            return;
                        }
                        backoff = backoff.saturating_mul(2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
            if self.pause(POLL, &stop).await {
                return;
            }
        }
    }

    /// Sleeps in steps that keep the spool gauge current; true when stopping.
    async fn pause(&mut self, total: Duration, stop: &CancellationToken) -> bool {
        let mut left = total;
        while !left.is_zero() {
            let step = left.min(POLL);
            tokio::select! {
                () = stop.cancelled() => return true,
                () = tokio::time::sleep(step) => {}
            }
            left = left.saturating_sub(step);
            self.update_spool();
        }
        false
    }

    async fn ship_available(
        &mut self,
        client: &mut Option<Client>,
        stop: &CancellationToken,
    ) -> Result<(), CentralError> {
        if !self.migrated {
            let url = self.central.migrate_url.clone().unwrap_or_default();
            let version = migrate_with(
                &self.central,
                &url,
                self.central.migrate_password_file.as_deref(),
                &self.tasks,
                self.mark,
            )
            .await?;
            tracing::info!(version, "central audit schema is current");
            self.migrated = true;
        }
        let connected = match client.take() {
            Some(c) if !c.is_closed() => c,
            _ => {
                let c = connect(
                    &self.central,
                    &self.central.url,
                    self.central.password_file.as_deref(),
                    &self.tasks,
                    self.mark,
                )
                .await?;
                check_schema(&c).await?;
                c
            }
        };
        let c = client.insert(connected);
        // One reader per round: it re-verifies its segment from the start, so reopening it
        // for every batch would make catching up quadratic.
        let mut reader = match self.open_reader().await? {
            Some(r) => r,
            None => return Ok(()),
        };
        loop {
            let batch_size = self.central.batch_size;
            let (back, batch) = tokio::task::spawn_blocking(move || {
                let batch: Result<Vec<Record>, StoreError> =
                    reader.by_ref().take(batch_size).collect();
                (reader, batch)
            })
            .await
            .map_err(|e| CentralError::Config(format!("reader task failed: {e}")))?;
            reader = back;
            let batch = batch?;
            let Some(last) = batch.last().map(|r| r.seq) else {
                return Ok(());
            };
            if batch.first().map(|r| r.seq) != Some(self.shipped_upto.saturating_add(1)) {
                return Err(CentralError::Local(StoreError::Corrupt {
                    segment: self.dir.clone(),
                    line: None,
                    reason: format!(
                        "expected seq {} next, the reader gave another",
                        self.shipped_upto.saturating_add(1)
                    ),
                }));
            }
            tokio::time::timeout(BATCH_TIMEOUT, insert_batch(c, &self.host, &batch))
                .await
                .map_err(|_| CentralError::Timeout(BATCH_TIMEOUT))??;
            let path = self.progress.clone();
            tokio::task::spawn_blocking(move || super::spool::write_progress(&path, last))
                .await
                .map_err(|e| CentralError::Config(format!("progress task failed: {e}")))?
                .map_err(|source| CentralError::Progress {
                    path: self.progress.clone(),
                    source,
                })?;
            self.shipped_upto = last;
            self.update_spool();
            if stop.is_cancelled() {
                return Ok(());
            }
        }
    }

    async fn open_reader(&mut self) -> Result<Option<Reader>, CentralError> {
        Ok(super::spool::open_reader(&self.dir, &mut self.shipped_upto, "central").await?)
    }

    fn update_spool(&self) {
        let max = self.central.spool_max_bytes;
        let backlog = backlog_bytes(&self.dir, self.shipped_upto, self.audit.last_seq());
        let spool = self.audit.spool();
        let was_over = spool.over_bound();
        let over = if was_over {
            backlog.saturating_mul(10) > max.saturating_mul(DRAINED_TENTHS)
        } else {
            backlog > max
        };
        if over == was_over {
            return;
        }
        spool.over.store(over, Ordering::Relaxed);
        let refuse = over && self.central.on_spool_full == OnSpoolFull::RefuseConnections;
        spool.refusing.store(refuse, Ordering::Relaxed);
        let mode = match self.central.on_spool_full {
            OnSpoolFull::KeepEnforcing => {
                "keep_enforcing: connections continue and are recorded locally"
            }
            OnSpoolFull::RefuseConnections => {
                "refuse_connections: new connections are refused until it drains"
            }
        };
        if over {
            tracing::error!(
                backlog,
                max,
                "unshipped audit records are over audit.central.spool_max_bytes; {mode}"
            );
            self.audit.record(AuditEvent::new(EventKind::AuditSpoolFull).reason(format!(
                "about {backlog} bytes not yet in the central store (bound {max}, last shipped seq {}); {mode}",
                self.shipped_upto
            )));
        } else {
            tracing::info!(
                backlog,
                max,
                "the central audit backlog is under its bound again"
            );
            self.audit.record(
                AuditEvent::new(EventKind::AuditSpoolDrained).reason(format!(
                    "about {backlog} bytes not yet in the central store (bound {max})"
                )),
            );
        }
    }
}

/// Bytes of the local store holding records after `shipped_upto`, from segment sizes: whole
/// segments count fully, the one holding the oldest unshipped record in proportion to its
/// unshipped records. Cheap (a directory listing), exact at zero and at segment boundaries.
fn backlog_bytes(dir: &Path, shipped_upto: u64, last_seq: u64) -> u64 {
    if last_seq <= shipped_upto {
        return 0;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut segments: Vec<(u64, u64)> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let first = portcullis_audit_store::parse_segment_file_name(e.file_name().to_str()?)?;
            Some((first, e.metadata().ok()?.len()))
        })
        .collect();
    segments.sort_unstable();
    let mut total = 0u64;
    let mut iter = segments.iter().peekable();
    while let Some(&(first, bytes)) = iter.next() {
        let end = iter
            .peek()
            .map_or(last_seq, |&&(next, _)| next.saturating_sub(1));
        if end <= shipped_upto || end < first {
            continue;
        }
        if first > shipped_upto {
            total = total.saturating_add(bytes);
        } else {
            let records = end - first + 1;
            let unshipped = end - shipped_upto;
            let part = u128::from(bytes) * u128::from(unshipped) / u128::from(records);
            total = total.saturating_add(u64::try_from(part).unwrap_or(u64::MAX));
        }
    }
    total
}

pub(crate) fn read_progress(path: &Path) -> Result<u64, CentralError> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.trim().parse().map_err(|_| CentralError::Progress {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a seq"),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(source) => Err(CentralError::Progress {
            path: path.to_path_buf(),
            source,
        }),
    }
}

const INSERT: &str = r"
INSERT INTO portcullis_audit_events (host, seq, time_ms, prev, hash, event_text, event)
SELECT $1, u.seq, u.time_ms, u.prev, u.hash, u.event_text,
       -- jsonb cannot hold U+0000; the exact text column still does.
       CASE WHEN strpos(u.event_text, '\u0000') > 0 THEN NULL ELSE u.event_text::jsonb END
FROM unnest($2::int8[], $3::int8[], $4::bytea[], $5::bytea[], $6::text[])
     AS u(seq, time_ms, prev, hash, event_text)
ON CONFLICT (host, seq) DO NOTHING
RETURNING seq";

async fn insert_batch(
    client: &mut Client,
    host: &str,
    batch: &[Record],
) -> Result<(), CentralError> {
    let to_i64 = |v: u64| {
        i64::try_from(v).map_err(|_| CentralError::Config(format!("value {v} exceeds bigint")))
    };
    let seqs = batch
        .iter()
        .map(|r| to_i64(r.seq))
        .collect::<Result<Vec<_>, _>>()?;
    let times = batch
        .iter()
        .map(|r| to_i64(r.time_ms))
        .collect::<Result<Vec<_>, _>>()?;
    let prevs: Vec<&[u8]> = batch.iter().map(|r| r.prev.0.as_slice()).collect();
    let hashes: Vec<&[u8]> = batch.iter().map(|r| r.hash.0.as_slice()).collect();
    let events: Vec<&str> = batch.iter().map(|r| r.event.as_str()).collect();
    let tx = client.transaction().await?;
    let inserted = tx
        .query(INSERT, &[&host, &seqs, &times, &prevs, &hashes, &events])
        .await?;
    if inserted.len() != batch.len() {
        // Already there from an earlier attempt: harmless only if it is the same record.
        let rows = tx
            .query(
                "SELECT seq, hash FROM portcullis_audit_events WHERE host = $1 AND seq = ANY($2)",
                &[&host, &seqs],
            )
            .await?;
        for row in rows {
            let seq: i64 = row.try_get(0)?;
            let hash: Vec<u8> = row.try_get(1)?;
            let ours = batch
                .iter()
                .find(|r| i64::try_from(r.seq).ok() == Some(seq))
                .map(|r| r.hash.0.as_slice());
            if ours != Some(hash.as_slice()) {
                return Err(CentralError::Diverged {
                    host: host.to_string(),
                    seq: u64::try_from(seq).unwrap_or(0),
                });
            }
        }
    }
    tx.commit().await?;
    Ok(())
}

pub(crate) async fn check_schema(client: &Client) -> Result<(), CentralError> {
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM portcullis_schema_version",
            &[],
        )
        .await?;
    let found: i32 = row.try_get(0)?;
    if found < CENTRAL_SCHEMA_VERSION {
        return Err(CentralError::SchemaTooOld { found });
    }
    Ok(())
}

/// Creates or upgrades the central schema as the role behind `url` (the schema owner, not
/// the agent's insert-only role). Idempotent, and safe when several agents run it at once.
/// Returns the version now in place.
pub async fn migrate_with(
    central: &CentralConfig,
    url: &str,
    password_file: Option<&Path>,
    tasks: &TaskTracker,
    mark: Option<u32>,
) -> Result<i32, CentralError> {
    let mut client = connect(central, url, password_file, tasks, mark).await?;
    let tx = client.transaction().await?;
    // Serializes concurrent migrations (a fleet starting at once); released at commit.
    tx.execute("SELECT pg_advisory_xact_lock(7135680541)", &[])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS portcullis_schema_version (
             version    integer PRIMARY KEY,
             applied_at timestamptz NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let row = tx
        .query_one(
            "SELECT coalesce(max(version), 0) FROM portcullis_schema_version",
            &[],
        )
        .await?;
    let mut current: i32 = row.try_get(0)?;
    for (version, sql) in MIGRATIONS {
        if *version <= current {
            continue;
        }
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO portcullis_schema_version (version) VALUES ($1)",
            &[version],
        )
        .await?;
        current = *version;
    }
    tx.commit().await?;
    Ok(current)
}

/// `portcullis audit central-migrate`: the one-shot form of `migrate_with`.
pub async fn migrate(
    central: &CentralConfig,
    url: &str,
    password_file: Option<&Path>,
) -> Result<i32, CentralError> {
    let tasks = TaskTracker::new();
    // Run by an administrator, not the agent: an ordinary connection.
    let result = migrate_with(central, url, password_file, &tasks, None).await;
    tasks.close();
    tasks.wait().await;
    result
}

/// A connection for reading the store (the fleet console, fleet reviews): `[audit.central]`'s
/// URL and password, whose role must also hold `portcullis_reader`, at schema version
/// [`CENTRAL_READER_SCHEMA_VERSION`] or later.
pub(crate) async fn connect_reader(
    central: &CentralConfig,
    tasks: &TaskTracker,
    mark: Option<u32>,
) -> Result<Client, CentralError> {
    let client = connect(
        central,
        &central.url,
        central.password_file.as_deref(),
        tasks,
        mark,
    )
    .await?;
    let row = client
        .query_one(
            "SELECT coalesce(max(version), 0) FROM portcullis_schema_version",
            &[],
        )
        .await?;
    let found: i32 = row.try_get(0)?;
    if found < CENTRAL_READER_SCHEMA_VERSION {
        return Err(CentralError::Config(format!(
            "the central schema is version {found}; reading it for a fleet needs version \
             {CENTRAL_READER_SCHEMA_VERSION}: run `portcullis audit central-migrate` as the schema owner"
        )));
    }
    Ok(client)
}

async fn connect(
    central: &CentralConfig,
    url: &str,
    password_file: Option<&Path>,
    tasks: &TaskTracker,
    mark: Option<u32>,
) -> Result<Client, CentralError> {
    connect_with(central, url, password_file, tasks, None, mark).await
}

/// A connection as the agent's role whose notifications (`LISTEN`) arrive on the returned
/// channel, as their payloads.
pub(crate) async fn connect_listening(
    central: &CentralConfig,
    tasks: &TaskTracker,
    mark: Option<u32>,
) -> Result<(Client, tokio::sync::mpsc::UnboundedReceiver<String>), CentralError> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let client = connect_with(
        central,
        &central.url,
        central.password_file.as_deref(),
        tasks,
        Some(tx),
        mark,
    )
    .await?;
    Ok((client, rx))
}

async fn connect_with(
    central: &CentralConfig,
    url: &str,
    password_file: Option<&Path>,
    tasks: &TaskTracker,
    notifications: Option<tokio::sync::mpsc::UnboundedSender<String>>,
    mark: Option<u32>,
) -> Result<Client, CentralError> {
    crate::config::check_central_url(url, central.tls).map_err(CentralError::Config)?;
    let mut config: tokio_postgres::Config = url
        .parse()
        .map_err(|_| CentralError::Config("not a valid postgres:// URL".into()))?;
    config
        .application_name("portcullis-agent")
        .connect_timeout(Duration::from_secs(10));
    if let Some(path) = password_file {
        let password = read_password(path)?;
        config.password(password.expose());
    }
    // The agent's own connection carries the exempt mark, so the kernel programs leave it
    // alone even when the central server's address is also a protected target.
    let own = match mark {
        Some(mark) => dial_marked(&config, mark).await?,
        None => None,
    };
    let client = match central.tls {
        CentralTls::Require => {
            config.ssl_mode(SslMode::Require);
            let mut tls = tls_connector(central.ca_file.as_deref())?;
            if let Some((stream, host)) = own {
                let tls =
                    tokio_postgres::tls::MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(
                        &mut tls, &host,
                    )
                    .map_err(|e| CentralError::Config(format!("TLS for {host}: {e}")))?;
                let (client, connection) = config.connect_raw(stream, tls).await?;
                match notifications {
                    Some(tx) => tasks.spawn(drive_listening(connection, tx)),
                    None => tasks.spawn(drive(connection)),
                };
                return Ok(client);
            }
            let (client, connection) = config.connect(tls).await?;
            match notifications {
                Some(tx) => tasks.spawn(drive_listening(connection, tx)),
                None => tasks.spawn(drive(connection)),
            };
            client
        }
        CentralTls::Disable => {
            config.ssl_mode(SslMode::Disable);
            if let Some((stream, _)) = own {
                let (client, connection) = config.connect_raw(stream, NoTls).await?;
                match notifications {
                    Some(tx) => tasks.spawn(drive_listening(connection, tx)),
                    None => tasks.spawn(drive(connection)),
                };
                return Ok(client);
            }
            let (client, connection) = config.connect(NoTls).await?;
            match notifications {
                Some(tx) => tasks.spawn(drive_listening(connection, tx)),
                None => tasks.spawn(drive(connection)),
            };
            client
        }
    };
    Ok(client)
}

/// Runs a connection until its client is dropped or it fails; the error reaches the
/// shipper through the client's next call too, so here it is only logged.
async fn drive<F>(connection: F)
where
    F: std::future::Future<Output = Result<(), tokio_postgres::Error>>,
{
    if let Err(e) = connection.await {
        tracing::debug!(error = %e, "central audit connection ended");
    }
}

/// Connects to the first TCP address of `config`'s hosts that answers, from a socket with
/// `mark`; `None` when a host is a Unix socket (never redirected: the normal connect serves).
async fn dial_marked(
    config: &tokio_postgres::Config,
    mark: u32,
) -> Result<Option<(tokio::net::TcpStream, String)>, CentralError> {
    use tokio_postgres::config::Host;
    let ports = config.get_ports();
    let mut last = String::from("no host to connect to");
    for (i, host) in config.get_hosts().iter().enumerate() {
        let name = match host {
            Host::Tcp(name) => name,
            Host::Unix(_) => return Ok(None),
        };
        let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
        let addrs = match tokio::net::lookup_host((name.as_str(), port)).await {
            Ok(a) => a,
            Err(e) => {
                last = format!("{name}: {e}");
                continue;
            }
        };
        for addr in addrs {
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()
            } else {
                tokio::net::TcpSocket::new_v6()
            };
            let attempt = async {
                let socket = socket?;
                socket2::SockRef::from(&socket).set_mark(mark)?;
                socket.connect(addr).await
            };
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Ok(stream)) => return Ok(Some((stream, name.clone()))),
                Ok(Err(e)) => last = format!("{addr}: {e}"),
                Err(_) => last = format!("{addr}: connect timed out"),
            }
        }
    }
    Err(CentralError::Config(format!(
        "cannot reach the central server: {last}"
    )))
}

/// [`drive`], passing each notification's payload on; the channel closing (its reader
/// gone) ends nothing: the connection ends with its client.
async fn drive_listening<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    tx: tokio::sync::mpsc::UnboundedSender<String>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            Some(Ok(tokio_postgres::AsyncMessage::Notification(n))) => {
                let _ = tx.send(n.payload().to_owned());
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                tracing::debug!(error = %e, "central approvals connection ended");
                return;
            }
            None => return,
        }
    }
}

fn tls_connector(
    ca_file: Option<&Path>,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, CentralError> {
    let config = crate::tls::client_config(ca_file, "audit.central.ca_file")?;
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

fn read_password(path: &Path) -> Result<Secret, CentralError> {
    use std::os::unix::fs::MetadataExt;
    let err = |reason: String| CentralError::Password {
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
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(err("empty".into()));
    }
    Ok(Secret::new(password.to_string()))
}

/// One row of the central table, as verification reads it.
#[derive(Debug, Clone)]
pub struct CentralRow {
    pub seq: u64,
    pub time_ms: u64,
    pub prev: Vec<u8>,
    pub hash: Vec<u8>,
    pub event_text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CentralBreak {
    pub seq: u64,
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CentralVerifyReport {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub first_break: Option<CentralBreak>,
}

impl CentralVerifyReport {
    pub fn ok(&self) -> bool {
        self.first_break.is_none()
    }
}

/// Re-checks one host's chain as the central store holds it, with the local store's own hash
/// function: every hash recomputed, every link and every seq in place. A chain that starts
/// after seq 1 (shipping enabled on a store already pruned) is taken from its first row.
#[derive(Debug, Default)]
pub struct CentralVerifier {
    report: CentralVerifyReport,
    last_hash: Option<ChainHash>,
}

impl CentralVerifier {
    pub fn accept(&mut self, row: &CentralRow) {
        if self.report.first_break.is_some() {
            return;
        }
        let broke = |reason: String| {
            Some(CentralBreak {
                seq: row.seq,
                reason,
            })
        };
        let (Ok(prev), Ok(hash)) = (
            <[u8; 32]>::try_from(row.prev.as_slice()),
            <[u8; 32]>::try_from(row.hash.as_slice()),
        ) else {
            self.report.first_break = broke("prev or hash is not 32 bytes".into());
            return;
        };
        let (prev, hash) = (ChainHash(prev), ChainHash(hash));
        match (self.report.last_seq, self.last_hash) {
            (None, _) if row.seq == 1 && prev != ChainHash::GENESIS => {
                self.report.first_break =
                    broke("seq 1 does not start from the genesis hash".into());
                return;
            }
            (Some(last), Some(last_hash)) => {
                if row.seq != last.saturating_add(1) {
                    self.report.first_break = broke(format!(
                        "records {}..{} are missing",
                        last.saturating_add(1),
                        row.seq.saturating_sub(1)
                    ));
                    return;
                }
                if prev != last_hash {
                    self.report.first_break = broke(format!(
                        "prev does not match the hash of seq {last} (chain broken)"
                    ));
                    return;
                }
            }
            _ => {}
        }
        if record_hash(&prev, row.seq, row.time_ms, row.event_text.as_bytes()) != hash {
            self.report.first_break =
                broke("hash does not match the record (event, time or hash altered)".into());
            return;
        }
        self.report.records = self.report.records.saturating_add(1);
        self.report.first_seq.get_or_insert(row.seq);
        self.report.last_seq = Some(row.seq);
        self.last_hash = Some(hash);
    }

    /// Whether a row so far broke the chain (what follows it is not evidence).
    pub fn broken(&self) -> bool {
        self.report.first_break.is_some()
    }

    /// The hash of the last row that verified: the head of the chain read so far.
    pub fn head(&self) -> Option<ChainHash> {
        self.last_hash
    }

    pub fn finish(self) -> CentralVerifyReport {
        self.report
    }
}

/// `portcullis audit central-verify`: reads `host`'s rows in seq order through `url` (a role
/// that may read every column, not the agent's) and verifies them.
pub async fn verify_central(
    central: &CentralConfig,
    url: &str,
    password_file: Option<&Path>,
    host: &str,
) -> Result<CentralVerifyReport, CentralError> {
    const PAGE: i64 = 5_000;
    let tasks = TaskTracker::new();
    let result = async {
        let client = connect(central, url, password_file, &tasks, None).await?;
        let mut verifier = CentralVerifier::default();
        let mut after: i64 = 0;
        loop {
            let rows = client
                .query(
                    "SELECT seq, time_ms, prev, hash, event_text FROM portcullis_audit_events
                     WHERE host = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &[&host, &after, &PAGE],
                )
                .await?;
            let n = rows.len();
            for row in rows {
                let seq: i64 = row.try_get(0)?;
                let time_ms: i64 = row.try_get(1)?;
                verifier.accept(&CentralRow {
                    seq: u64::try_from(seq).unwrap_or(0),
                    time_ms: u64::try_from(time_ms).unwrap_or(0),
                    prev: row.try_get(2)?,
                    hash: row.try_get(3)?,
                    event_text: row.try_get(4)?,
                });
                after = seq;
            }
            if i64::try_from(n).unwrap_or(0) < PAGE {
                break;
            }
        }
        Ok(verifier.finish())
    }
    .await;
    tasks.close();
    tasks.wait().await;
    result
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests"
)]
mod tests {
    use super::*;

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(Path::new("/etc/portcullis/portcullis.toml"), extra)
            .map(|(c, _)| c)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn central_section_defaults() {
        let c = parse("[audit.central]\nurl = \"postgres://bastion@audit.example/portcullis\"\n")
            .unwrap();
        let central = c.audit.central.unwrap();
        assert_eq!(central.tls, CentralTls::Require);
        assert_eq!(central.on_spool_full, OnSpoolFull::KeepEnforcing);
        assert_eq!(central.batch_size, 500);
        assert_eq!(central.spool_max_bytes, 1 << 30);
    }

    #[test]
    fn central_config_validation_table() {
        let cases: &[(&str, Option<&str>)] = &[
            ("url = \"postgres://a@db.example/x\"", None),
            (
                "url = \"postgres://a@127.0.0.1:5432/x\"\ntls = \"disable\"\n[insecure]\nallow_plaintext_loopback = true",
                None,
            ),
            (
                "url = \"postgres://a@localhost/x\"\ntls = \"disable\"\n[insecure]\nallow_plaintext_loopback = true",
                None,
            ),
            (
                "url = \"postgres://a@%2Frun%2Fpostgresql/x\"\ntls = \"disable\"\n[insecure]\nallow_plaintext_loopback = true",
                None,
            ),
            (
                "url = \"postgres://a@127.0.0.1:5432/x\"\ntls = \"disable\"",
                Some("audit.central.tls: \"disable\" (TCP or a Unix socket) on loopback is accepted only with `insecure.allow_plaintext_loopback = true`"),
            ),
            (
                "url = \"postgres://a@db.example/x\"\ntls = \"disable\"",
                Some("audit.central.url: tls = \"disable\" is accepted for loopback hosts only"),
            ),
            (
                "url = \"postgres://a:hunter2@db.example/x\"",
                Some("audit.central.url: holds a password"),
            ),
            ("url = \"postgres://db.example/x\"", Some("names no user")),
            ("url = \"mysql://x\"", Some("not a valid postgres:// URL")),
            (
                "url = \"postgres://a@db.example/x\"\nbatch_size = 0",
                Some("audit.central.batch_size"),
            ),
            (
                "url = \"postgres://a@db.example/x\"\nspool_max_bytes = 0",
                Some("audit.central.spool_max_bytes"),
            ),
            (
                "url = \"postgres://a@127.0.0.1/x\"\nmigrate_url = \"postgres://o@10.0.0.1/x\"\ntls = \"disable\"",
                Some("audit.central.migrate_url"),
            ),
            (
                "url = \"postgres://a@db.example/x\"\non_spool_full = \"drop_events\"",
                Some("unknown variant `drop_events`"),
            ),
            ("url = \"postgres://a@db.example/x\"\nurl_typo = 1", Some("unknown field `url_typo`")),
            (
                "url = \"postgres://a@db.example/x\"\non_spool_full = \"refuse_connections\"",
                None,
            ),
        ];
        for (body, want) in cases {
            let result = parse(&format!("[audit.central]\n{body}\n"));
            match (want, &result) {
                (None, Ok(_)) => {}
                (Some(w), Err(e)) => assert!(e.contains(w), "{body}: {e}"),
                _ => panic!("{body}: {result:?}"),
            }
            if let Err(e) = &result {
                assert!(
                    !e.contains("hunter2"),
                    "a password leaked into an error: {e}"
                );
            }
        }
    }

    #[test]
    fn password_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = read_password(&path).unwrap_err().to_string();
        assert!(
            err.contains("make it 0600") && !err.contains("s3cret"),
            "{err}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let secret = read_password(&path).unwrap();
        assert_eq!(secret.expose(), "s3cret");
        assert_eq!(format!("{secret:?}"), "[redacted]");
    }

    #[test]
    fn progress_survives_rewrites_and_starts_at_zero() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit-shipped");
        assert_eq!(read_progress(&path).unwrap(), 0);
        crate::audit::spool::write_progress(&path, 41).unwrap();
        crate::audit::spool::write_progress(&path, 42).unwrap();
        assert_eq!(read_progress(&path).unwrap(), 42);
        assert!(!path.with_extension("tmp").exists());
    }

    fn chain(n: u64) -> Vec<CentralRow> {
        let mut prev = ChainHash::GENESIS;
        (1..=n)
            .map(|seq| {
                let event_text = format!("{{\"event\":\"connection.opened\",\"n\":{seq}}}");
                let hash = record_hash(&prev, seq, 1_000 + seq, event_text.as_bytes());
                let row = CentralRow {
                    seq,
                    time_ms: 1_000 + seq,
                    prev: prev.0.to_vec(),
                    hash: hash.0.to_vec(),
                    event_text,
                };
                prev = hash;
                row
            })
            .collect()
    }

    fn verify(rows: &[CentralRow]) -> CentralVerifyReport {
        let mut v = CentralVerifier::default();
        for r in rows {
            v.accept(r);
        }
        v.finish()
    }

    #[test]
    fn central_verification_table() {
        let ok = verify(&chain(5));
        assert!(ok.ok());
        assert_eq!(
            (ok.records, ok.first_seq, ok.last_seq),
            (5, Some(1), Some(5))
        );
        let tail = verify(&chain(5)[2..]);
        assert!(
            tail.ok(),
            "a chain shipped from a pruned store starts later"
        );

        type Tamper = fn(&mut Vec<CentralRow>);
        let cases: &[(&str, Tamper, u64, &str)] = &[
            (
                "event edited",
                |r| r[2].event_text = r[2].event_text.replace("3", "9"),
                3,
                "altered",
            ),
            ("time back-dated", |r| r[1].time_ms -= 1, 2, "altered"),
            (
                "row deleted",
                |r| {
                    r.remove(2);
                },
                4,
                "missing",
            ),
            ("rows swapped", |r| r.swap(1, 2), 3, "missing"),
            (
                "row rewritten with its hash recomputed",
                |r| {
                    let prev = ChainHash(r[2].prev.clone().try_into().unwrap());
                    r[2].event_text = "{}".into();
                    r[2].hash = record_hash(&prev, 3, r[2].time_ms, b"{}").0.to_vec();
                },
                4,
                "chain broken",
            ),
            ("genesis forged", |r| r[0].prev = vec![1; 32], 1, "genesis"),
            ("hash truncated", |r| r[0].hash.truncate(31), 1, "32 bytes"),
        ];
        for (name, tamper, seq, reason) in cases {
            let mut rows = chain(5);
            tamper(&mut rows);
            let report = verify(&rows);
            let b = report
                .first_break
                .unwrap_or_else(|| panic!("{name}: not detected"));
            assert_eq!(b.seq, *seq, "{name}: {b:?}");
            assert!(b.reason.contains(reason), "{name}: {b:?}");
        }
    }

    #[test]
    fn backlog_is_estimated_from_segment_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let seg = |first: u64, bytes: usize| {
            std::fs::write(
                dir.path()
                    .join(portcullis_audit_store::segment_file_name(first)),
                vec![b'x'; bytes],
            )
            .unwrap();
        };
        seg(1, 1000); // seqs 1..=10
        seg(11, 500); // seqs 11..=15 (open)
        assert_eq!(backlog_bytes(dir.path(), 15, 15), 0);
        assert_eq!(backlog_bytes(dir.path(), 0, 15), 1500);
        assert_eq!(backlog_bytes(dir.path(), 10, 15), 500);
        assert_eq!(backlog_bytes(dir.path(), 5, 15), 1000);
        assert_eq!(backlog_bytes(dir.path(), 13, 15), 200);
    }
}
