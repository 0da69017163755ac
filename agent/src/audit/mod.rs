//! Audit events: one event type for every protocol and every decision.
//!
//! Events are stored in the tamper-evident, hash-chained store of `portcullis-audit-store`
//! under `<state_dir>/audit` (see `audit-store/README.md`); `portcullis audit verify` checks
//! it and `portcullis audit export` prints it as NDJSON.

pub mod central;
pub mod query;
mod queue;
pub mod siem;
pub(crate) mod spool;

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::identity::Identity;
use crate::proxy::Origin;

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

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub enum EventKind {
    #[serde(rename = "agent.started")]
    AgentStarted,
    #[serde(rename = "agent.stopped")]
    AgentStopped,
    #[serde(rename = "agent.detached")]
    AgentDetached,
    #[serde(rename = "connection.opened")]
    ConnectionOpened,
    #[serde(rename = "connection.closed")]
    ConnectionClosed,
    #[serde(rename = "connection.refused")]
    ConnectionRefused,
    #[serde(rename = "login.succeeded")]
    LoginSucceeded,
    #[serde(rename = "login.failed")]
    LoginFailed,
    #[serde(rename = "login.refresh_failed")]
    LoginRefreshFailed,
    #[serde(rename = "login.expired")]
    LoginExpired,
    #[serde(rename = "logout")]
    Logout,
    #[serde(rename = "login.revoked")]
    LoginRevoked,
    #[serde(rename = "policy.reloaded")]
    PolicyReloaded,
    #[serde(rename = "policy.reload_failed")]
    PolicyReloadFailed,
    /// A target's DNS host resolved to other addresses; the kernel protects the new set.
    #[serde(rename = "target.addresses_changed")]
    TargetAddressesChanged,
    /// The store was repaired at start (a torn tail from a crash was cut and kept aside).
    #[serde(rename = "audit.integrity")]
    AuditIntegrity,
    /// The records not yet in the central store passed `audit.central.spool_max_bytes`.
    #[serde(rename = "audit.spool_full")]
    AuditSpoolFull,
    /// The backlog is under the bound again.
    #[serde(rename = "audit.spool_drained")]
    AuditSpoolDrained,
    /// A database statement ran (or failed in the server); one per statement.
    #[serde(rename = "statement.executed")]
    StatementExecuted,
    /// A database statement was refused before it reached the server.
    #[serde(rename = "statement.denied")]
    StatementDenied,
}

/// One audit event. Flat, so SIEMs index it well; optional parts are omitted when empty.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    pub schema: u32,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    pub host: Arc<str>,
    pub event: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<Arc<Encoded<Identity>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<Arc<Encoded<Origin>>>,
    /// The client's own address (its side of the redirected connection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_client_to_upstream: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_upstream_to_client: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The policy decision behind this event: allow, deny or approval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<Cow<'static, str>>,
    /// Shared with the verdict it came from: a statement event copies no list.
    #[serde(skip_serializing_if = "is_empty")]
    pub policy_ids: Arc<[String]>,
    /// The database role the session acts as upstream (PostgreSQL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_user: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_name: Option<Arc<str>>,
    /// How many occurrences this one event stands for, when more than one: the summary of
    /// the refusals of one uid (or of connections without an origin) in one interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Statement events only; flattened so every field stays top-level.
    #[serde(flatten)]
    pub statement: Option<Box<StatementFields>>,
}

/// What a statement event says about the statement itself. What stays the same from one
/// execution of a statement to the next (its text, classification, bound parameters) is
/// shared with the session's own record of it, not copied: a prepared statement executed
/// many thousand times a second must not allocate a dozen strings per execution.
#[derive(Debug, Clone, Default, Serialize)]
pub struct StatementFields {
    /// The statement's text as the client sent it (one statement of a multi-statement string).
    pub statement: Arc<str>,
    /// Bound parameters in text form, masked per the session's profile; binary values are
    /// shown as `\\x` hex.
    #[serde(skip_serializing_if = "is_empty")]
    pub parameters: Arc<[Option<String>]>,
    /// read, write, ddl, dcl, transaction, utility, admin, call or do; absent when the
    /// statement did not parse.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement_class: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<Arc<str>>,
    #[serde(skip_serializing_if = "is_empty")]
    pub tables: Arc<[String]>,
    #[serde(skip_serializing_if = "is_empty")]
    pub functions: Arc<[String]>,
    /// Rows returned or affected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    /// The server's CommandComplete tag (`INSERT 0 3`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_tag: Option<String>,
    /// The SQLSTATE of the error that ended the statement (ours for a denial: 42501).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sqlstate: Option<String>,
    /// Microseconds from forwarding the statement to its completion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_us: Option<u64>,
    /// The masking profile applied to the results, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masking_profile: Option<Arc<str>>,
}

/// The parts of a statement event that one session's statement events all share, encoded
/// once: the host; the connection (id, protocol, target, identity, origin, client and
/// upstream addresses); the database role and name. A statement event is then written field
/// by field around them ([`StatementEventParts::encode`]), the same bytes serde writes for
/// the [`AuditEvent`] with these fields: at tens of thousands of statements a second,
/// building that event and serializing it key by key cost more than hashing and writing it.
pub struct StatementEventParts {
    host: portcullis_audit_store::Fields,
    connection: portcullis_audit_store::Fields,
    database: portcullis_audit_store::Fields,
}

/// The decision an event records (its `decision` field). The words are the audit schema's:
/// searches (`audit search --decision`) and the SIEM's severity match them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny,
    /// The policy asks for an approval the agent cannot obtain yet.
    Approval,
    /// Refused before or without a policy decision (no identity, a limit, a failure).
    Error,
    /// A statement of a batch that never ran because one before it failed.
    NotRun,
}

impl Decision {
    pub const fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Deny => "deny",
            Decision::Approval => "approval",
            Decision::Error => "error",
            Decision::NotRun => "not_run",
        }
    }
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<Decision> for Cow<'static, str> {
    fn from(d: Decision) -> Self {
        Cow::Borrowed(d.as_str())
    }
}

/// What one statement event says about its statement. `statement` and `classification` are
/// encoded once per statement the session knows ([`StatementEventParts::statement_fields`]),
/// so a prepared statement executed again escapes its text again never.
pub struct StatementRecord<'a> {
    pub kind: EventKind,
    pub time_ms: u64,
    pub reason: Option<&'a str>,
    pub decision: &'a str,
    pub policy_ids: &'a [String],
    pub statement: &'a StatementEncoded,
    pub parameters: &'a [Option<String>],
    pub rows: Option<u64>,
    pub command_tag: Option<&'a str>,
    pub sqlstate: Option<&'a str>,
    pub duration_us: Option<u64>,
    pub masking_profile: Option<&'a str>,
}

/// A statement's text and its classification (class, command, tables, functions), encoded.
#[derive(Debug, Default, Clone)]
pub struct StatementEncoded {
    text: portcullis_audit_store::Fields,
    classification: portcullis_audit_store::Fields,
}

/// The keys of the fields statement events write themselves, in [`AuditEvent`]'s order.
mod key {
    use portcullis_audit_store::Key;
    pub const SCHEMA: Key = Key::new("schema");
    pub const TIME_MS: Key = Key::new("time_ms");
    pub const HOST: Key = Key::new("host");
    pub const EVENT: Key = Key::new("event");
    pub const CONNECTION_ID: Key = Key::new("connection_id");
    pub const PROTOCOL: Key = Key::new("protocol");
    pub const TARGET: Key = Key::new("target");
    pub const IDENTITY: Key = Key::new("identity");
    pub const ORIGIN: Key = Key::new("origin");
    pub const CLIENT: Key = Key::new("client");
    pub const UPSTREAM: Key = Key::new("upstream");
    pub const REASON: Key = Key::new("reason");
    pub const DECISION: Key = Key::new("decision");
    pub const POLICY_IDS: Key = Key::new("policy_ids");
    pub const DB_USER: Key = Key::new("db_user");
    pub const DB_NAME: Key = Key::new("db_name");
    pub const STATEMENT: Key = Key::new("statement");
    pub const PARAMETERS: Key = Key::new("parameters");
    pub const STATEMENT_CLASS: Key = Key::new("statement_class");
    pub const COMMAND: Key = Key::new("command");
    pub const TABLES: Key = Key::new("tables");
    pub const FUNCTIONS: Key = Key::new("functions");
    pub const ROWS: Key = Key::new("rows");
    pub const COMMAND_TAG: Key = Key::new("command_tag");
    pub const SQLSTATE: Key = Key::new("sqlstate");
    pub const DURATION_US: Key = Key::new("duration_us");
    pub const MASKING_PROFILE: Key = Key::new("masking_profile");
}

impl StatementEventParts {
    #[allow(
        clippy::too_many_arguments,
        reason = "the fields a session's statement events share"
    )]
    pub fn new(
        connection_id: u64,
        protocol: &str,
        target: &str,
        identity: &Encoded<Identity>,
        origin: &Encoded<Origin>,
        client: &str,
        upstream: &str,
        db_user: &str,
        db_name: &str,
    ) -> Result<Self, String> {
        use portcullis_audit_store::Fields;
        Ok(Self {
            host: Fields::encode(|w| w.field(key::HOST, &*hostname()))?,
            connection: Fields::encode(|w| {
                w.field(key::CONNECTION_ID, &connection_id);
                w.field(key::PROTOCOL, protocol);
                w.field(key::TARGET, target);
                w.field(key::IDENTITY, identity);
                w.field(key::ORIGIN, origin);
                w.field(key::CLIENT, client);
                w.field(key::UPSTREAM, upstream);
            })?,
            database: Fields::encode(|w| {
                w.field(key::DB_USER, db_user);
                w.field(key::DB_NAME, db_name);
            })?,
        })
    }

    /// A statement's text and classification, encoded for its events; `class` and `command`
    /// absent and the lists empty for a statement that did not parse.
    pub fn statement_fields(
        text: &str,
        class: Option<&str>,
        command: Option<&str>,
        tables: &[String],
        functions: &[String],
    ) -> Result<StatementEncoded, String> {
        use portcullis_audit_store::Fields;
        Ok(StatementEncoded {
            text: Fields::encode(|w| w.field(key::STATEMENT, text))?,
            classification: Fields::encode(|w| {
                if let Some(class) = class {
                    w.field(key::STATEMENT_CLASS, class);
                }
                if let Some(command) = command {
                    w.field(key::COMMAND, command);
                }
                if !tables.is_empty() {
                    w.field(key::TABLES, tables);
                }
                if !functions.is_empty() {
                    w.field(key::FUNCTIONS, functions);
                }
            })?,
        })
    }

    pub fn encode(
        &self,
        r: &StatementRecord<'_>,
    ) -> Result<portcullis_audit_store::EncodedEvent, String> {
        let mut w = portcullis_audit_store::ObjectWriter::with_capacity(1024);
        w.field(key::SCHEMA, &SCHEMA_VERSION);
        w.field(key::TIME_MS, &r.time_ms);
        w.fields(&self.host);
        w.field(key::EVENT, &r.kind);
        w.fields(&self.connection);
        if let Some(reason) = r.reason {
            w.field(key::REASON, reason);
        }
        w.field(key::DECISION, r.decision);
        if !r.policy_ids.is_empty() {
            w.field(key::POLICY_IDS, r.policy_ids);
        }
        w.fields(&self.database);
        w.fields(&r.statement.text);
        if !r.parameters.is_empty() {
            w.field(key::PARAMETERS, r.parameters);
        }
        w.fields(&r.statement.classification);
        if let Some(rows) = r.rows {
            w.field(key::ROWS, &rows);
        }
        if let Some(tag) = r.command_tag {
            w.field(key::COMMAND_TAG, tag);
        }
        if let Some(sqlstate) = r.sqlstate {
            w.field(key::SQLSTATE, sqlstate);
        }
        if let Some(us) = r.duration_us {
            w.field(key::DURATION_US, &us);
        }
        if let Some(profile) = r.masking_profile {
            w.field(key::MASKING_PROFILE, profile);
        }
        w.finish()
    }
}

/// A value serialized once, for every event that carries it: a connection's identity and
/// origin are the same in each of its (possibly many thousand) statement events, and writing
/// them out field by field, strings escaped and addresses formatted, cost the audit writer
/// more than anything else it does per event. Reads go through to the value.
///
/// The JSON is serde_json's own compact output for the value, so it is valid and contains no
/// newline; the values kept this way (an identity, an origin) nest two levels deep at most,
/// far below what a record line allows.
#[derive(Debug)]
pub struct Encoded<T> {
    value: T,
    json: Box<serde_json::value::RawValue>,
}

impl<T: Serialize> Encoded<T> {
    pub fn new(value: T) -> Self {
        let json = serde_json::value::to_raw_value(&value).unwrap_or_else(|e| {
            // Not reachable for the types kept this way (strings, numbers, addresses); if
            // it were, the event would say so instead of claiming an empty value.
            tracing::error!(error = %e, "cannot serialize a value for the audit trail");
            serde_json::value::to_raw_value("unserializable").unwrap_or_default()
        });
        Self { value, json }
    }
}

impl<T> std::ops::Deref for Encoded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> Serialize for Encoded<T> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(serializer)
    }
}

impl From<Identity> for Arc<Encoded<Identity>> {
    fn from(value: Identity) -> Self {
        Arc::new(Encoded::new(value))
    }
}

impl From<Origin> for Arc<Encoded<Origin>> {
    fn from(value: Origin) -> Self {
        Arc::new(Encoded::new(value))
    }
}

fn is_empty<T>(list: &Arc<[T]>) -> bool {
    list.is_empty()
}

impl AuditEvent {
    pub fn new(event: EventKind) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            time_ms: now_ms(),
            host: hostname(),
            event,
            connection_id: None,
            protocol: None,
            target: None,
            identity: None,
            origin: None,
            client: None,
            upstream: None,
            bytes_client_to_upstream: None,
            bytes_upstream_to_client: None,
            duration_ms: None,
            reason: None,
            decision: None,
            policy_ids: Arc::from([]),
            db_user: None,
            db_name: None,
            count: None,
            statement: None,
        }
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

pub fn hostname() -> Arc<str> {
    static HOST: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().into())
            .unwrap_or_else(|_| "".into())
    })
    .clone()
}

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
        Ok((
            Self {
                dir: dir.to_path_buf(),
                queue,
                last_seq,
                spool: central::SpoolState::default(),
                health,
                on_write_failure: config.on_write_failure,
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

/// An Ed25519 seed as 64 hex characters in a root-only file.
fn read_signing_key(path: &Path) -> Result<portcullis_audit_store::SigningKey, AuditError> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;
    use crate::identity::IdentityKind;

    /// The schema's decision words; searches and the SIEM's severity match them.
    #[test]
    fn decisions_record_the_schemas_words() {
        let words: Vec<Cow<'static, str>> = [
            Decision::Allow,
            Decision::Deny,
            Decision::Approval,
            Decision::Error,
            Decision::NotRun,
        ]
        .into_iter()
        .map(Into::into)
        .collect();
        assert_eq!(words, ["allow", "deny", "approval", "error", "not_run"]);
    }

    fn identity() -> Identity {
        Identity {
            kind: IdentityKind::User,
            uid: 1000,
            gid: 1000,
            user: Some("alice".into()),
            subject: Some("sub-\"1\"\n".into()),
            email: Some("alice@example.com".into()),
            name: Some("Alice \u{e9}\u{1f600}\\".into()),
            groups: vec!["dba".into(), "tab\there".into()],
            issuer: Some("http://127.0.0.1:1/".into()),
        }
    }

    fn origin() -> Origin {
        Origin {
            pid: 42,
            tid: 43,
            uid: 1000,
            gid: 1000,
            comm: "psql\u{1}".into(),
            cgroup_id: u64::MAX,
            netns_cookie: 7,
            socket_cookie: 8,
            destination: "[::1]:5432".parse().unwrap(),
            target_id: 3,
        }
    }

    /// An event carrying pre-encoded parts is the same JSON as one serialized field by field,
    /// and still a valid record for the store.
    #[test]
    fn encoded_parts_serialize_as_the_value_itself() {
        let mut ev = AuditEvent::new(EventKind::StatementExecuted);
        ev.identity = Some(identity().into());
        ev.origin = Some(origin().into());
        ev.policy_ids = Arc::from(["p1".to_string()]);
        ev.statement = Some(Box::new(StatementFields {
            statement: "SELECT $1".into(),
            parameters: Arc::from([Some("x".to_string()), None]),
            statement_class: Some("read"),
            ..StatementFields::default()
        }));
        let got: serde_json::Value = serde_json::to_value(&ev).unwrap();
        assert_eq!(got["identity"], serde_json::to_value(identity()).unwrap());
        assert_eq!(got["origin"], serde_json::to_value(origin()).unwrap());
        assert_eq!(got["policy_ids"], serde_json::json!(["p1"]));
        assert_eq!(got["parameters"], serde_json::json!(["x", null]));
        assert_eq!(got["statement_class"], "read");
        assert!(got.get("tables").is_none(), "empty lists are left out");
        let line = portcullis_audit_store::EncodedEvent::encode(&ev).unwrap();
        let reparsed: serde_json::Value = serde_json::from_slice(line.as_bytes()).unwrap();
        assert_eq!(reparsed, got);
        assert!(!line.as_bytes().contains(&b'\n'));
    }

    /// A statement event written around its pre-encoded parts is, byte for byte, the
    /// `AuditEvent` with the same fields as serde writes it: every optional field present and
    /// absent, strings that need escaping everywhere.
    #[test]
    fn statement_events_written_from_parts_are_the_event_serde_writes() {
        let identity: Arc<Encoded<Identity>> = identity().into();
        let origin: Arc<Encoded<Origin>> = origin().into();
        let parts = StatementEventParts::new(
            u64::MAX - 1,
            "postgres",
            "db \"1\"",
            &identity,
            &origin,
            "127.0.0.1:40000",
            "[::1]:5432",
            "app\u{1}",
            "n\u{e9}\\",
        )
        .unwrap();
        let tables: Arc<[String]> = Arc::from(["s.\"t\"".to_string(), "u".to_string()]);
        let functions: Arc<[String]> = Arc::from(["f\n".to_string()]);
        let parameters: Arc<[Option<String>]> =
            Arc::from([Some("x\"\u{2028}".to_string()), None, Some(String::new())]);
        let policy_ids: Arc<[String]> = Arc::from(["p\t1".to_string(), "p2".to_string()]);
        for variant in 0..4 {
            let full = variant % 2 == 0;
            let parsed = variant < 2;
            let text = "SELECT '\u{0}\\' -- \u{1f600}\r\n";
            let mut ev = AuditEvent::new(if full {
                EventKind::StatementExecuted
            } else {
                EventKind::StatementDenied
            });
            ev.time_ms = 1_795_431_950_112 + variant;
            ev.connection_id = Some(u64::MAX - 1);
            ev.protocol = Some("postgres".into());
            ev.target = Some("db \"1\"".into());
            ev.identity = Some(Arc::clone(&identity));
            ev.origin = Some(Arc::clone(&origin));
            ev.client = Some("127.0.0.1:40000".into());
            ev.upstream = Some("[::1]:5432".into());
            ev.reason = (!full).then(|| "not run: \"why\"".to_string());
            ev.decision = Some(if full { "allow" } else { "not_run" }.into());
            ev.policy_ids = if full {
                Arc::clone(&policy_ids)
            } else {
                Arc::from([])
            };
            ev.db_user = Some("app\u{1}".into());
            ev.db_name = Some("n\u{e9}\\".into());
            ev.statement = Some(Box::new(StatementFields {
                statement: text.into(),
                parameters: if full {
                    Arc::clone(&parameters)
                } else {
                    Arc::from([])
                },
                statement_class: parsed.then_some("read"),
                command: parsed.then(|| "SELECT".into()),
                tables: if parsed {
                    Arc::clone(&tables)
                } else {
                    Arc::from([])
                },
                functions: if parsed {
                    Arc::clone(&functions)
                } else {
                    Arc::from([])
                },
                rows: full.then_some(u64::MAX),
                command_tag: full.then(|| "SELECT 1".to_string()),
                sqlstate: (!full).then(|| "42501".to_string()),
                duration_us: full.then_some(0),
                masking_profile: full.then(|| "pii \"x\"".into()),
            }));
            let expected = portcullis_audit_store::EncodedEvent::encode(&ev).unwrap();
            let statement = if parsed {
                StatementEventParts::statement_fields(
                    text,
                    Some("read"),
                    Some("SELECT"),
                    &tables,
                    &functions,
                )
            } else {
                StatementEventParts::statement_fields(text, None, None, &[], &[])
            }
            .unwrap();
            let st = ev.statement.as_deref().unwrap();
            let written = parts
                .encode(&StatementRecord {
                    kind: ev.event,
                    time_ms: ev.time_ms,
                    reason: ev.reason.as_deref(),
                    decision: ev.decision.as_deref().unwrap(),
                    policy_ids: &ev.policy_ids,
                    statement: &statement,
                    parameters: &st.parameters,
                    rows: st.rows,
                    command_tag: st.command_tag.as_deref(),
                    sqlstate: st.sqlstate.as_deref(),
                    duration_us: st.duration_us,
                    masking_profile: st.masking_profile.as_deref(),
                })
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(written.as_bytes()),
                String::from_utf8_lossy(expected.as_bytes()),
                "variant {variant}"
            );
        }
    }
}
