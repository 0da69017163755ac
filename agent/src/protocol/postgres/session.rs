//! One PostgreSQL session after start-up: relays messages both ways, classifies and decides
//! every statement before the server sees it, masks result values, and records one audit
//! event per statement.
//!
//! The session keeps a queue of the replies it still expects from the server (one entry per
//! Parse, Bind, Describe, Execute, Close, Sync, Query), so each reply is matched to the
//! statement it belongs to, also when the client pipelines.
//!
//! A denied statement is never sent. In its place the agent sends the server a message that
//! fails at the same position (a Query or Parse of an invalid statement, a Bind of a statement
//! that does not exist), then replaces the server's error with its own 42501. The server thus
//! does what it would do for any error, in every protocol state: it skips to the next Sync,
//! and inside a transaction block it fails the transaction. Client and server agree on the
//! transaction state without the agent having to imitate it.
//!
//! Protocol: PostgreSQL docs, "Message Flow" → "Simple Query", "Extended Query",
//! "Pipelining", "COPY Operations", "Function Call", "Asynchronous Operations".

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use portcullis_pgwire::{
    decode_frame, encode_data_row, encode_error_response, encode_frontend, parse_backend,
    parse_frontend, BackendMessage, ErrorFields, FieldDescription, FrontendMessage, RawMessage,
    TransactionStatus,
};
use portcullis_policy::{Action, ColumnPlan, Effect, Masker, Obligation, PolicySet, Request};
use tokio::io::AsyncWriteExt;

use super::error::{sqlstate, PgError};
use super::stream::{fill, write_out, Stream};
use super::upstream::Upstream;
use super::Shared;
use crate::audit::Decision;
use crate::audit::{
    AuditEvent, EventKind, StatementEncoded, StatementEventParts, StatementFields, StatementRecord,
};
use crate::config::ProtectedTarget;
use crate::identity::Identity;
use crate::proxy::{Connection, Proxy};

/// The injected statement text that fails in the server's parser; the name says why.
const DENIED_MARKER: &str = "PORTCULLIS_DENIED_STATEMENT";

/// What the policy said about one statement, kept with prepared statements so Bind can
/// re-check it.
#[derive(Clone)]
struct Verdict {
    policy_ids: Arc<[String]>,
    masker: Option<(Arc<str>, Arc<Masker>)>,
}

/// One statement as the audit trail sees it.
#[derive(Clone)]
struct StatementInfo {
    text: Arc<str>,
    class: Option<&'static str>,
    command: Option<Arc<str>>,
    tables: Arc<[String]>,
    functions: Arc<[String]>,
    /// For `COPY ... TO STDOUT`: what it reads and how its rows are spelled.
    copy: Option<Arc<portcullis_sql::CopyOut>>,
    /// What each result column may be computed from (a query, a RETURNING list).
    sources: Option<Arc<portcullis_sql::ResultSources>>,
    /// DECLARE CURSOR, PREPARE, FETCH, EXECUTE: the name of the query kept or run.
    named: Option<portcullis_sql::NamedQuery>,
    /// For a DO block: the statements its body runs, each decided as its own request before
    /// the block itself (`portcullis_sql::Statement::inner`).
    inner: Arc<[portcullis_sql::Statement]>,
    /// For a DO block: it runs SQL that cannot be read before it runs (`context.dynamic_sql`).
    dynamic_sql: bool,
    /// The hash of the shape (class, command, tables, functions), once computed: a prepared
    /// statement is decided again at every Bind.
    shape_hash: std::sync::OnceLock<u64>,
    /// Its text and classification as its audit events write them, once encoded.
    encoded: std::sync::OnceLock<Result<StatementEncoded, String>>,
}

impl StatementInfo {
    fn from_parsed(s: &portcullis_sql::Statement) -> Self {
        Self {
            text: Arc::clone(&s.text),
            class: Some(s.class.as_str()),
            command: Some(Arc::clone(&s.command)),
            tables: Arc::clone(&s.tables),
            functions: Arc::clone(&s.functions),
            copy: s.copy_out.clone().map(Arc::new),
            sources: s.result_sources.clone(),
            named: s.named_query.clone(),
            inner: Arc::clone(&s.inner),
            dynamic_sql: s.dynamic_sql,
            shape_hash: std::sync::OnceLock::new(),
            encoded: std::sync::OnceLock::new(),
        }
    }
}

/// A statement the client prepared with Parse.
struct Prepared {
    /// The whole text with the first statement's classification, as Execute records it.
    whole: Arc<StatementInfo>,
    statements: Vec<StatementInfo>,
    verdict: Verdict,
}

/// How much the agent keeps for one session's prepared statements, and for its portals: a
/// client that prepares or binds without end would otherwise grow the agent, which serves
/// everybody, where the server grows only its own backend. Past either limit Parse (or Bind)
/// is refused with 54000 until the client closes some; the session goes on. A single
/// statement is checked against the budget before it is added, so one statement as large as
/// a message always fits.
const MAX_KEPT_NAMES: usize = 10_000;
const MAX_KEPT_BYTES: usize = 64 * 1024 * 1024;

/// About what a kept entry costs beyond its strings (map slot, allocations, classification).
const KEPT_OVERHEAD: usize = 256;

impl Prepared {
    fn kept_bytes(&self) -> usize {
        let strings = |s: &StatementInfo| {
            s.text.len()
                + s.tables.iter().map(String::len).sum::<usize>()
                + s.functions.iter().map(String::len).sum::<usize>()
                + KEPT_OVERHEAD
        };
        strings(&self.whole) + self.statements.iter().map(strings).sum::<usize>()
    }
}

/// The statements the client prepared with Parse, and what they cost.
#[derive(Default)]
struct PreparedStatements {
    named: HashMap<String, Arc<Prepared>>,
    bytes: usize,
}

impl PreparedStatements {
    fn get(&self, name: &str) -> Option<&Arc<Prepared>> {
        self.named.get(name)
    }

    fn contains(&self, name: &str) -> bool {
        self.named.contains_key(name)
    }

    /// Whether one more statement (replacing `name`'s if it has one) stays within the budget.
    fn has_room_for(&self, name: &str) -> bool {
        self.contains(name) || (self.named.len() < MAX_KEPT_NAMES && self.bytes < MAX_KEPT_BYTES)
    }

    fn insert(&mut self, name: String, prepared: Arc<Prepared>) {
        self.bytes += prepared.kept_bytes();
        if let Some(old) = self.named.insert(name, prepared) {
            self.bytes -= old.kept_bytes();
        }
    }

    fn remove(&mut self, name: &str) {
        if let Some(old) = self.named.remove(name) {
            self.bytes -= old.kept_bytes();
        }
    }

    fn clear(&mut self) {
        self.named.clear();
        self.bytes = 0;
    }
}

struct Portal {
    prepared: Arc<Prepared>,
    /// The verdict at Bind, which may differ from Parse's (a reload, the time).
    verdict: Verdict,
    parameters: Arc<[Option<String>]>,
}

impl Portal {
    fn kept_bytes(&self) -> usize {
        // The statement is counted with the prepared statements, where it stays or not.
        self.parameters
            .iter()
            .map(|p| p.as_ref().map_or(0, String::len) + std::mem::size_of::<Option<String>>())
            .sum::<usize>()
            + KEPT_OVERHEAD
    }
}

/// The portals the client bound, for as long as the server keeps them: a named portal until
/// it is closed or its transaction ends, the unnamed one until the next Bind to it or the end
/// of its transaction. The agent learns that a transaction ended from the status in
/// ReadyForQuery, which answers a Sync or a simple query; the client may already have sent
/// Binds for the next transaction behind it, so each portal keeps how many messages answered
/// by ReadyForQuery went before its Bind. Without this, named portals the server had dropped
/// at commit stayed in the agent for the whole session, one more per transaction.
struct Portals<P> {
    /// Each portal with how many ReadyForQuery-answered messages went before its Bind, and
    /// what it costs the agent.
    live: HashMap<String, (u64, usize, P)>,
    /// What the live portals cost in all.
    bytes: usize,
    /// Messages forwarded that the server answers with ReadyForQuery.
    ready_sent: u64,
    /// ReadyForQuery replies received.
    ready_received: u64,
}

impl<P> Portals<P> {
    fn new() -> Self {
        Self {
            live: HashMap::new(),
            bytes: 0,
            ready_sent: 0,
            ready_received: 0,
        }
    }

    /// `cost`: about what keeping the portal costs the agent, in bytes.
    fn bind(&mut self, name: String, portal: P, cost: usize) {
        self.bytes += cost;
        if let Some((_, old, _)) = self.live.insert(name, (self.ready_sent, cost, portal)) {
            self.bytes -= old;
        }
    }

    fn get(&self, name: &str) -> Option<&P> {
        self.live.get(name).map(|(_, _, p)| p)
    }

    /// Whether one more portal (replacing `name`'s if it has one) stays within the budget.
    fn has_room_for(&self, name: &str) -> bool {
        self.live.contains_key(name)
            || (self.live.len() < MAX_KEPT_NAMES && self.bytes < MAX_KEPT_BYTES)
    }

    fn close(&mut self, name: &str) {
        if let Some((_, old, _)) = self.live.remove(name) {
            self.bytes -= old;
        }
    }

    /// Whether the server certainly still has this portal: bound since the last message that
    /// could end its transaction, or every such message answered without ending it. (Bound
    /// before a Sync still unanswered, it may be gone or not.)
    fn certainly_live(&self, name: &str) -> bool {
        self.live.get(name).is_some_and(|(before, _, _)| {
            *before == self.ready_sent || self.ready_received == self.ready_sent
        })
    }

    fn close_all(&mut self) {
        self.live.clear();
        self.bytes = 0;
    }

    /// A Sync, simple query or function call was forwarded.
    fn ready_sent(&mut self) {
        self.ready_sent += 1;
    }

    /// The server answered the oldest of them with ReadyForQuery; `idle`: no transaction is
    /// open, so every portal bound before that message is gone.
    fn ready_received(&mut self, idle: bool) {
        self.ready_received += 1;
        if idle && !self.live.is_empty() {
            let answered = self.ready_received;
            let mut freed = 0;
            self.live.retain(|_, (before, cost, _)| {
                let keep = *before >= answered;
                if !keep {
                    freed += *cost;
                }
                keep
            });
            self.bytes -= freed;
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.live.len()
    }
}

/// A statement the server is executing, until its completion.
struct Running {
    info: Arc<StatementInfo>,
    parameters: Arc<[Option<String>]>,
    verdict: Verdict,
    /// How each result column is masked; `None` until a RowDescription (or our own
    /// Describe) says what the columns are.
    plan: Option<RowPlan>,
    /// For a `COPY table TO STDOUT` masked by column: the columns it sends, as the agent's own
    /// catalog query in the session found them (an error says why not).
    copy_columns: Option<Result<Vec<CopyColumn>, String>>,
    started: Instant,
}

/// One column a `COPY table TO STDOUT` sends.
struct CopyColumn {
    name: String,
    /// `schema.table.column`, as table-column masking rules name it.
    qualified: String,
    type_oid: u32,
}

/// The agent's own catalog query, sent on the session before a simple-query COPY whose rows
/// it must mask by column: its answer never reaches the client.
struct ColumnLookup {
    /// Which statement of the query string that follows it is for.
    statement: usize,
    /// The COPY's column list; empty for all columns in table order.
    wanted: Vec<String>,
    rows: Vec<CopyColumn>,
    error: Option<String>,
}

/// What a result's computed columns may come from.
enum Derived {
    Known(Arc<portcullis_sql::ResultSources>),
    /// FETCH or EXECUTE of a query the agent did not see defined: anything.
    Unknown,
    /// Not a query (SHOW, EXPLAIN): its computed columns go by their names.
    NotAQuery,
}

/// How many cursor and prepared-statement names a session remembers the sources of.
const MAX_NAMED_QUERIES: usize = 1024;

/// How the rows of a COPY TO STDOUT in progress are masked.
enum CopyMask {
    /// Content detectors over each whole row (text or CSV): no column rules apply.
    Lines(Arc<Masker>),
    /// Value by value, per column.
    Fields {
        masker: Arc<Masker>,
        columns: Vec<(ColumnPlan, u32)>,
        format: CopyRowFormat,
        /// The next payload starts with a header: column names in text and CSV (passed as
        /// they are), the file header in binary.
        header_pending: bool,
    },
}

#[derive(Clone, Copy)]
enum CopyRowFormat {
    Text { delimiter: u8 },
    Csv { delimiter: u8, quote: u8 },
    Binary,
}

struct RowPlan {
    columns: Vec<(ColumnPlan, i16, u32)>,
    /// Computed columns a rule selects whose type cannot carry a mask: sent as NULL.
    nulled: Vec<bool>,
    masks_anything: bool,
}

struct SimpleQuery {
    statements: VecDeque<Running>,
    failed: bool,
}

/// A reply the session still expects from the server.
enum Expect {
    ParseComplete,
    BindComplete,
    CloseComplete,
    /// The client's own Describe: its answer goes to the client.
    Describe,
    /// The agent's Describe of a portal about to run with masking: answer kept, not sent.
    InternalDescribe,
    /// The agent's own catalog query before a masked COPY: every reply kept, not sent.
    ColumnLookup(Box<ColumnLookup>),
    Execute(Box<Running>),
    /// ReadyForQuery after Sync, or after a denied simple Query / FunctionCall.
    Sync,
    Query(Box<SimpleQuery>),
    /// A fast-path function call: its result is masked with the masker of the verdict that
    /// allowed it, in the result format the call asked for.
    FunctionCall {
        masker: Option<Arc<Masker>>,
        format: i16,
    },
    /// The failing message sent in place of a denied one; its error is replaced by this.
    Denied(Box<PgError>),
}

pub struct Session<'a> {
    proxy: &'a Proxy,
    shared: &'a Shared,
    conn: &'a Connection,
    identity: &'a Identity,
    target: &'a ProtectedTarget,
    db_user: Arc<str>,
    db_name: Arc<str>,
    max_len: usize,
    expect: VecDeque<Expect>,
    prepared: PreparedStatements,
    portals: Portals<Portal>,
    /// After a denial in the extended protocol, client messages up to Sync are dropped, as
    /// the server drops them after an error.
    skip_to_sync: bool,
    copy_out: Option<CopyMask>,
    /// The last profile any statement of this session was masked with; it also masks
    /// notifications, which belong to no statement.
    session_masker: Option<Arc<Masker>>,
    txn: TransactionStatus,
    /// A replication connection (policy permitted `replicate`): its walsender commands are
    /// not SQL and are decided as `admin` statements named by their command.
    replication: bool,
    decisions: DecisionCache,
    /// The result sources of the queries the session keeps under a name (SQL cursors and
    /// prepared statements), for masking what FETCH and EXECUTE return.
    named_sources: HashMap<(bool, String), Option<Arc<portcullis_sql::ResultSources>>>,
    /// Formatted once: every statement event carries them.
    client_addr: Arc<str>,
    upstream_addr: Arc<str>,
    /// What every statement event of the session says about it, encoded once.
    event_parts: Result<StatementEventParts, String>,
    /// Why the last lookup of fast-path functions' names failed.
    function_lookup_error: Option<String>,
    /// A statement of the current transaction (or the last one, until ReadyForQuery says it
    /// ended) read what a column rule of this profile could select: the settings the server
    /// reports and the notifications it delivers at commit may carry those values.
    read_selected_in_transaction: Option<Arc<str>>,
    /// A statement decided since the session was last idle with nothing pending may change
    /// what a function runs (`CREATE OR REPLACE FUNCTION`, see `may_change_routines`). The
    /// agent reads function bodies over its own connection, which sees only what is
    /// committed: until the change is, every call by name is opaque (`dynamic_sql`). When it
    /// ends, the bodies every session read are forgotten.
    routines_changed: bool,
}

/// How deep calls inside function bodies are followed: a statement calls `f` (depth 1), whose
/// body calls `g` (2), and so on. A body deeper than this is refused, not run unread.
const MAX_ROUTINE_DEPTH: usize = 4;
/// A function's body read longer ago than this is read again before a statement that calls
/// it is decided; one a little older still serves a decision (the read just before it may
/// have come from a lookup that started a moment earlier).
const ROUTINE_REREAD: Duration = Duration::from_secs(60);
const ROUTINE_MAX_AGE: Duration = Duration::from_secs(75);

/// What the functions and procedures a statement calls run, as far as the agent can read.
#[derive(Default)]
struct Calls {
    /// Each statement their bodies run, with the function whose body holds it.
    statements: Vec<(String, portcullis_sql::Statement)>,
    /// Some function called cannot be read before it runs (see `Session::read_calls`).
    dynamic: bool,
}

/// Statement shape: class, command, tables, functions, dynamic SQL.
type ShapeKey = (
    Option<&'static str>,
    Option<Arc<str>>,
    Arc<[String]>,
    Arc<[String]>,
    bool,
);

const DECISION_CACHE_ENTRIES: usize = 256;

#[derive(Default)]
struct DecisionCache {
    set: std::sync::Weak<PolicySet>,
    second: i64,
    /// By the hash of the shape; a hit is compared field by field, so a collision is a miss
    /// (and replaces the entry), never another statement's verdict. Looking up builds no key.
    allowed: HashMap<u64, (ShapeKey, Verdict)>,
}

impl StatementInfo {
    fn shape_hash(&self) -> u64 {
        *self.shape_hash.get_or_init(|| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            (
                &self.class,
                &self.command,
                &self.tables,
                &self.functions,
                self.dynamic_sql,
            )
                .hash(&mut h);
            h.finish()
        })
    }

    /// The key of a cached verdict is made of this statement's own parts when a prepared
    /// statement runs again: those compare by address.
    fn has_shape(&self, key: &ShapeKey) -> bool {
        fn same<T: ?Sized + PartialEq>(a: &Arc<T>, b: &Arc<T>) -> bool {
            Arc::ptr_eq(a, b) || a == b
        }
        self.class == key.0
            && match (&self.command, &key.1) {
                (Some(a), Some(b)) => same(a, b),
                (a, b) => a == b,
            }
            && same(&self.tables, &key.2)
            && same(&self.functions, &key.3)
            && self.dynamic_sql == key.4
    }

    fn shape(&self) -> ShapeKey {
        (
            self.class,
            self.command.clone(),
            self.tables.clone(),
            self.functions.clone(),
            self.dynamic_sql,
        )
    }
}

enum Flow {
    Continue,
    End(String),
}

/// The fields of a fast-path FunctionCall message the session uses.
struct FunctionCall<'m> {
    oid: u32,
    arg_formats: &'m [i16],
    args: &'m [Option<Bytes>],
    result_format: i16,
}

impl<'a> Session<'a> {
    #[allow(
        clippy::too_many_arguments,
        reason = "the session's fixed context, passed once"
    )]
    pub fn new(
        proxy: &'a Proxy,
        shared: &'a Shared,
        conn: &'a Connection,
        identity: &'a Identity,
        target: &'a ProtectedTarget,
        db_user: &str,
        db_name: &str,
        max_len: usize,
        replication: bool,
    ) -> Self {
        let client_addr: Arc<str> = conn.client.to_string().into();
        let upstream_addr: Arc<str> = conn.upstream.to_string().into();
        Self {
            proxy,
            shared,
            conn,
            identity,
            target,
            db_user: db_user.into(),
            db_name: db_name.into(),
            max_len,
            expect: VecDeque::new(),
            prepared: PreparedStatements::default(),
            portals: Portals::new(),
            skip_to_sync: false,
            copy_out: None,
            session_masker: None,
            txn: TransactionStatus::Idle,
            replication,
            decisions: DecisionCache::default(),
            named_sources: HashMap::new(),
            event_parts: StatementEventParts::new(
                conn.id,
                &conn.protocol.name(),
                &conn.target,
                &conn.identity,
                &conn.origin,
                &client_addr,
                &upstream_addr,
                db_user,
                db_name,
            ),
            client_addr,
            upstream_addr,
            function_lookup_error: None,
            read_selected_in_transaction: None,
            routines_changed: false,
        }
    }

    /// Relays until either side ends; returns why, for `connection.closed`.
    pub async fn run(
        mut self,
        mut client: Stream,
        mut cbuf: BytesMut,
        upstream: Upstream,
    ) -> String {
        let Upstream {
            stream: mut server,
            buf: mut sbuf,
            ..
        } = upstream;
        let idle = Duration::from_secs(self.proxy.config().proxy.idle_timeout_secs.max(1));
        let cancel = self.conn.cancel.clone();
        // Made once, not per message: a fresh cancellation future registers a waiter and a
        // fresh timer goes through the timer wheel, on every turn of a loop that runs twice
        // per statement. Traffic only moves `last_traffic`; the timer is re-armed from it
        // when it fires.
        let cancelled = cancel.cancelled();
        tokio::pin!(cancelled);
        let idle_timer = tokio::time::sleep(idle);
        tokio::pin!(idle_timer);
        let mut last_traffic = tokio::time::Instant::now();
        let mut to_server = BytesMut::new();
        let mut to_client = BytesMut::new();
        // Bytes that arrived with the start-up packet belong to the session.
        if !cbuf.is_empty() {
            self.resolve_function_names(&cbuf).await;
            self.resolve_routines(&cbuf).await;
            if let Flow::End(why) = self.on_client_bytes(&mut cbuf, &mut to_server, &mut to_client)
            {
                return self.finish(&mut client, &to_client, why).await;
            }
        }
        loop {
            if !to_server.is_empty() {
                if let Err(e) = write_out(&mut server, &to_server).await {
                    return format!("server write failed: {e}");
                }
                self.count_up(to_server.len());
                to_server.clear();
            }
            if !to_client.is_empty() {
                if let Err(e) = write_out(&mut client, &to_client).await {
                    return format!("client write failed: {e}");
                }
                self.count_down(to_client.len());
                to_client.clear();
            }
            let flow = tokio::select! {
                () = &mut cancelled => {
                    let mut out = BytesMut::new();
                    encode_error_response(&PgError::ClosedByAgent.to_fields(), &mut out);
                    let _ = write_out(&mut client, &out).await;
                    Flow::End("closed by the agent".into())
                }
                () = &mut idle_timer => {
                    // Idle means no traffic and nothing the server is still working on: a
                    // long query is not an idle session.
                    let now = tokio::time::Instant::now();
                    if now < last_traffic + idle {
                        idle_timer.as_mut().reset(last_traffic + idle);
                        Flow::Continue
                    } else if self.expect.is_empty() {
                        Flow::End("idle timeout".into())
                    } else {
                        idle_timer.as_mut().reset(now + idle);
                        Flow::Continue
                    }
                }
                // While the audit writer is behind, this session reads nothing more from its
                // client (what it would send queues more events); the event loop keeps
                // serving every other session meanwhile.
                r = async {
                    self.proxy.audit().room().await;
                    fill(&mut client, &mut cbuf).await
                } => {
                    last_traffic = tokio::time::Instant::now();
                    match r {
                        Err(e) => Flow::End(format!("client read failed: {e}")),
                        Ok(0) => Flow::End("client closed the connection".into()),
                        // Nothing more runs unaudited: the statement event of what the
                        // client sends now could not be written (`on_write_failure`).
                        Ok(_) if self.proxy.audit().write_refusal().is_some() => {
                            let why = self.proxy.audit().write_refusal().unwrap_or_default();
                            encode_error_response(
                                &PgError::AuditUnwritable(why.clone()).to_fields(),
                                &mut to_client,
                            );
                            Flow::End(why)
                        }
                        Ok(_) => {
                            self.resolve_function_names(&cbuf).await;
                            self.resolve_routines(&cbuf).await;
                            self.on_client_bytes(&mut cbuf, &mut to_server, &mut to_client)
                        }
                    }
                }
                r = fill(&mut server, &mut sbuf) => {
                    last_traffic = tokio::time::Instant::now();
                    match r {
                        Err(e) => Flow::End(format!("server read failed: {e}")),
                        Ok(0) => Flow::End("the server closed the connection".into()),
                        Ok(_) => match self.resolve_table_columns(&sbuf).await {
                            Ok(()) => self.on_server_bytes(&mut sbuf, &mut to_client),
                            Err(e) => self.fatal(e, &mut to_client),
                        },
                    }
                }
            };
            if let Flow::End(why) = flow {
                if !to_server.is_empty() {
                    let _ = write_out(&mut server, &to_server).await;
                }
                let _ = server.shutdown().await;
                return self.finish(&mut client, &to_client, why).await;
            }
        }
    }

    async fn finish(&mut self, client: &mut Stream, pending: &[u8], why: String) -> String {
        if !pending.is_empty() {
            let _ = write_out(client, pending).await;
        }
        let _ = client.shutdown().await;
        self.abandon_running(&why);
        if self.routines_changed {
            // A change may have been committed without the agent seeing the server say so.
            self.shared.catalog.forget_routines();
        }
        why
    }

    fn count_up(&self, n: usize) {
        self.conn
            .bytes
            .client_to_upstream
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    fn count_down(&self, n: usize) {
        self.conn
            .bytes
            .upstream_to_client
            .fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Ends the session with a fatal error to the client (and an audit trail through the
    /// connection's closing reason).
    fn fatal(&mut self, e: PgError, to_client: &mut BytesMut) -> Flow {
        encode_error_response(&e.to_fields(), to_client);
        tracing::warn!(error = %e, "PostgreSQL session ended");
        Flow::End(e.to_string())
    }

    // ----- client → server -------------------------------------------------------------

    fn on_client_bytes(
        &mut self,
        buf: &mut BytesMut,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) -> Flow {
        loop {
            let msg = match decode_frame(buf, self.max_len) {
                Ok(Some(m)) => m,
                Ok(None) => return Flow::Continue,
                Err(e) => {
                    return self.fatal(
                        PgError::Protocol(format!("from the client: {e}")),
                        to_client,
                    )
                }
            };
            if let Flow::End(why) = self.on_client_message(msg, to_server, to_client) {
                return Flow::End(why);
            }
        }
    }

    fn on_client_message(
        &mut self,
        msg: RawMessage,
        to_server: &mut BytesMut,
        to_client: &mut BytesMut,
    ) -> Flow {
        // COPY data is the bulk of a COPY FROM: forwarded without parsing.
        if matches!(msg.tag, b'd' | b'c' | b'f') {
            to_server.extend_from_slice(&msg.frame);
            return Flow::Continue;
        }
        let parsed = match parse_frontend(&msg) {
            Ok(m) => m,
            Err(e) => {
                return self.fatal(
                    PgError::Protocol(format!("from the client: {e}")),
                    to_client,
                )
            }
        };
        if self.skip_to_sync
            && !matches!(parsed, FrontendMessage::Sync | FrontendMessage::Terminate)
        {
            return Flow::Continue;
        }
        match parsed {
            FrontendMessage::Query { sql } => {
                self.on_query(&msg, &sql, to_server);
            }
            FrontendMessage::Parse { statement, sql, .. } => {
                self.on_parse(&msg, statement, sql, to_server);
            }
            FrontendMessage::Bind {
                portal,
                statement,
                param_formats,
                params,
                ..
            } => self.on_bind(&msg, portal, &statement, &param_formats, &params, to_server),
            FrontendMessage::Describe { .. } => {
                self.expect.push_back(Expect::Describe);
                to_server.extend_from_slice(&msg.frame);
            }
            FrontendMessage::Execute { portal, .. } => self.on_execute(&msg, &portal, to_server),
            FrontendMessage::Close { target, name } => {
                // SQL and the protocol share the server's names: what a SQL PREPARE or
                // DECLARE of this name computed its columns from no longer applies either.
                let cursor = matches!(target, portcullis_pgwire::DescribeTarget::Portal);
                self.forget_names(cursor, Some(&name));
                self.expect.push_back(Expect::CloseComplete);
                to_server.extend_from_slice(&msg.frame);
            }
            FrontendMessage::Sync => {
                self.skip_to_sync = false;
                self.expect_ready(Expect::Sync);
                to_server.extend_from_slice(&msg.frame);
            }
            FrontendMessage::Flush => to_server.extend_from_slice(&msg.frame),
            FrontendMessage::FunctionCall {
                function_oid,
                arg_formats,
                args,
                result_format,
            } => {
                let call = FunctionCall {
                    oid: function_oid,
                    arg_formats: &arg_formats,
                    args: &args,
                    result_format,
                };
                self.on_function_call(&msg, &call, to_server);
            }
            FrontendMessage::Terminate => {
                to_server.extend_from_slice(&msg.frame);
                return Flow::End("the client ended the session".into());
            }
            FrontendMessage::CopyData(_)
            | FrontendMessage::CopyDone
            | FrontendMessage::CopyFail { .. } => {
                to_server.extend_from_slice(&msg.frame);
            }
            FrontendMessage::PasswordLike(_) => {
                return self.fatal(
                    PgError::Protocol("a password message after authentication".into()),
                    to_client,
                )
            }
        }
        Flow::Continue
    }

    fn on_query(&mut self, msg: &RawMessage, sql: &str, to_server: &mut BytesMut) {
        let parsed = match self.shared.classifier.classify(sql) {
            Ok(p) => p,
            Err(_) if self.replication && replication_command(sql).is_some() => {
                let command = replication_command(sql).unwrap_or_default();
                let info = StatementInfo {
                    text: sql.trim().into(),
                    class: Some("admin"),
                    command: Some(command.into()),
                    tables: Arc::from([]),
                    functions: Arc::from([]),
                    copy: None,
                    sources: None,
                    named: None,
                    inner: Arc::from([]),
                    dynamic_sql: false,
                    shape_hash: std::sync::OnceLock::new(),
                    encoded: std::sync::OnceLock::new(),
                };
                let set = self.proxy.policies().current();
                match self.decide(&set, &info) {
                    Ok(verdict) => {
                        let mut statements = VecDeque::new();
                        statements.push_back(Running {
                            info: Arc::new(info),
                            parameters: Arc::from(Vec::new()),
                            verdict,
                            plan: None,
                            copy_columns: None,
                            started: Instant::now(),
                        });
                        self.expect_ready(Expect::Query(Box::new(SimpleQuery {
                            statements,
                            failed: false,
                        })));
                        to_server.extend_from_slice(&msg.frame);
                    }
                    Err((e, decision, ids)) => {
                        self.record_denied(&info, decision, &ids, &e.to_string(), e.sqlstate());
                        self.inject_denied_query(e, to_server);
                    }
                }
                return;
            }
            Err(e) => {
                let (e, decision) = refusal(e);
                self.record_denied(&unparsed(sql), decision, &[], &e.to_string(), e.sqlstate());
                self.inject_denied_query(e, to_server);
                return;
            }
        };
        let set = self.proxy.policies().current();
        let mut running = VecDeque::with_capacity(parsed.len());
        for statement in parsed.iter() {
            let info = StatementInfo::from_parsed(statement);
            match self.decide(&set, &info) {
                Ok(verdict) => running.push_back(Running {
                    info: Arc::new(info),
                    parameters: Arc::from(Vec::new()),
                    verdict,
                    plan: None,
                    copy_columns: None,
                    started: Instant::now(),
                }),
                Err((e, decision, ids)) => {
                    // One denied statement refuses the whole string: PostgreSQL runs it as
                    // one implicit transaction, so nothing of it may run.
                    self.record_denied(&info, decision, &ids, &e.to_string(), e.sqlstate());
                    for other in parsed.iter().filter(|o| !std::ptr::eq(*o, statement)) {
                        self.record_denied(
                            &StatementInfo::from_parsed(other),
                            Decision::NotRun,
                            &[],
                            "another statement of the same query string was denied",
                            sqlstate::INSUFFICIENT_PRIVILEGE,
                        );
                    }
                    self.inject_denied_query(e, to_server);
                    return;
                }
            }
        }
        for r in running.iter().filter(|r| r.info.named.is_some()) {
            let info = Arc::clone(&r.info);
            self.remember_named(&info);
        }
        // A COPY of a table whose rows are masked by column (or in binary, where even content
        // detectors need each value's type) needs its columns in output order: the agent asks
        // the server first, in this session (same search_path, same transaction), and keeps
        // the answer to itself.
        for (statement, r) in running.iter().enumerate() {
            if let Some((sql, wanted)) = copy_columns_query(r) {
                encode_frontend(&FrontendMessage::Query { sql }, to_server);
                self.expect
                    .push_back(Expect::ColumnLookup(Box::new(ColumnLookup {
                        statement,
                        wanted,
                        rows: Vec::new(),
                        error: None,
                    })));
            }
        }
        self.expect_ready(Expect::Query(Box::new(SimpleQuery {
            statements: running,
            failed: false,
        })));
        to_server.extend_from_slice(&msg.frame);
    }

    fn inject_denied_query(&mut self, e: PgError, to_server: &mut BytesMut) {
        encode_frontend(
            &FrontendMessage::Query {
                sql: DENIED_MARKER.to_string(),
            },
            to_server,
        );
        self.expect.push_back(Expect::Denied(Box::new(e)));
        self.expect_ready(Expect::Sync);
    }

    /// Expects the reply to a message the server ends with ReadyForQuery.
    fn expect_ready(&mut self, e: Expect) {
        self.portals.ready_sent();
        self.expect.push_back(e);
    }

    fn on_parse(&mut self, msg: &RawMessage, name: String, sql: String, to_server: &mut BytesMut) {
        if !name.is_empty() && self.prepared.contains(&name) {
            // The server refuses to redefine a named statement that was not closed, and keeps
            // the one it has: the agent must not take the new text for it, or a Bind would be
            // decided and recorded for a statement other than the one that runs.
            let e = PgError::NameRefused {
                sqlstate: sqlstate::DUPLICATE_PREPARED_STATEMENT,
                message: format!(
                    "Parse of statement {name:?}, which already exists in this session, is refused (close it first)"
                ),
            };
            self.record_denied(
                &unparsed(&sql),
                Decision::Error,
                &[],
                &e.to_string(),
                e.sqlstate(),
            );
            self.send_failing_parse(&name, e, to_server);
            return;
        }
        if !self.prepared.has_room_for(&name) {
            let e = PgError::Limit(format!(
                "Parse refused: this session keeps {} prepared statements ({} bytes), the most the agent keeps for one session (close some first)",
                self.prepared.named.len(),
                self.prepared.bytes
            ));
            self.record_denied(
                &unparsed(&sql),
                Decision::Error,
                &[],
                &e.to_string(),
                e.sqlstate(),
            );
            self.send_failing_parse(&name, e, to_server);
            return;
        }
        let parsed = match self.shared.classifier.classify(&sql) {
            Ok(p) => p,
            Err(e) => {
                let (e, decision) = refusal(e);
                self.record_denied(&unparsed(&sql), decision, &[], &e.to_string(), e.sqlstate());
                self.inject_denied_parse(&name, e, to_server);
                return;
            }
        };
        let set = self.proxy.policies().current();
        let statements: Vec<StatementInfo> =
            parsed.iter().map(StatementInfo::from_parsed).collect();
        let mut policy_ids: Vec<String> = Vec::new();
        let mut masker = None;
        for info in &statements {
            match self.decide(&set, info) {
                Ok(v) => {
                    policy_ids.extend(v.policy_ids.iter().cloned());
                    if v.masker.is_some() {
                        masker = v.masker;
                    }
                }
                Err((e, decision, ids)) => {
                    self.record_denied(info, decision, &ids, &e.to_string(), e.sqlstate());
                    self.inject_denied_parse(&name, e, to_server);
                    return;
                }
            }
        }
        policy_ids.sort();
        policy_ids.dedup();
        for info in &statements {
            self.remember_named(info);
        }
        let whole = Arc::new(StatementInfo {
            text: sql.into(),
            ..statements.first().cloned().unwrap_or_else(|| unparsed(""))
        });
        if !self.named_sources.is_empty() {
            self.named_sources.remove(&(false, name.clone()));
        }
        self.prepared.insert(
            name,
            Arc::new(Prepared {
                whole,
                statements,
                verdict: Verdict {
                    policy_ids: Arc::from(policy_ids),
                    masker,
                },
            }),
        );
        self.expect.push_back(Expect::ParseComplete);
        to_server.extend_from_slice(&msg.frame);
    }

    fn inject_denied_parse(&mut self, name: &str, e: PgError, to_server: &mut BytesMut) {
        self.prepared.remove(name);
        self.send_failing_parse(name, e, to_server);
    }

    /// A Parse that fails in the server's parser in place of the client's, under the client's
    /// statement name, so the server's state of that name is what a real failed Parse leaves:
    /// undefined if it was, the statement it had if it had one.
    fn send_failing_parse(&mut self, name: &str, e: PgError, to_server: &mut BytesMut) {
        encode_frontend(
            &FrontendMessage::Parse {
                statement: name.to_string(),
                sql: DENIED_MARKER.to_string(),
                param_types: Vec::new(),
            },
            to_server,
        );
        self.expect.push_back(Expect::Denied(Box::new(e)));
        self.skip_to_sync = true;
    }

    /// A Bind of a statement that does not exist in place of the client's: the server fails
    /// it and skips to Sync, leaving the portal's name as it was; its error is replaced by
    /// `e`.
    fn send_failing_bind(&mut self, portal: String, e: PgError, to_server: &mut BytesMut) {
        encode_frontend(
            &FrontendMessage::Bind {
                portal,
                statement: DENIED_MARKER.to_string(),
                param_formats: Vec::new(),
                params: Vec::new(),
                result_formats: Vec::new(),
            },
            to_server,
        );
        self.expect.push_back(Expect::Denied(Box::new(e)));
        self.skip_to_sync = true;
    }

    #[allow(clippy::too_many_arguments, reason = "the fields of one Bind message")]
    fn on_bind(
        &mut self,
        msg: &RawMessage,
        portal: String,
        statement: &str,
        param_formats: &[i16],
        params: &[Option<Bytes>],
        to_server: &mut BytesMut,
    ) {
        if !portal.is_empty() && self.portals.get(&portal).is_some() {
            // The server refuses a second portal of a name and keeps the first: the agent
            // must not take the new statement for it. Bound behind a Sync not answered yet,
            // the first may be gone or not (a transaction block, where a savepoint can make
            // it usable again after the refusal): the agent cannot tell, so it refuses too.
            let message = if self.portals.certainly_live(&portal) {
                format!("Bind of portal {portal:?}, which already exists in this session, is refused (close it first)")
            } else {
                format!("Bind of portal {portal:?}, which may still exist until the server answers the Sync before it, is refused (wait for the answer, or close it first)")
            };
            let e = PgError::NameRefused {
                sqlstate: sqlstate::DUPLICATE_CURSOR,
                message,
            };
            let info = unparsed(&format!("-- Bind of portal {portal:?}"));
            self.record_denied(&info, Decision::Error, &[], &e.to_string(), e.sqlstate());
            self.send_failing_bind(portal, e, to_server);
            return;
        }
        if !self.portals.has_room_for(&portal) {
            let e = PgError::Limit(format!(
                "Bind refused: this session keeps {} portals ({} bytes), the most the agent keeps for one session (close some or end the transaction first)",
                self.portals.live.len(),
                self.portals.bytes
            ));
            let info = unparsed(&format!("-- Bind of portal {portal:?}"));
            self.record_denied(&info, Decision::Error, &[], &e.to_string(), e.sqlstate());
            self.send_failing_bind(portal, e, to_server);
            return;
        }
        let Some(prepared) = self.prepared.get(statement).cloned() else {
            // A statement this session did not Parse: one made with SQL PREPARE (the two
            // share the server's names), or none at all. Its portal would run without the
            // decision and masking of its query: refused whatever the policy, as the server
            // refuses a statement that does not exist. EXECUTE runs a PREPAREd statement,
            // checked and masked.
            let e = PgError::NameRefused {
                sqlstate: sqlstate::INVALID_SQL_STATEMENT_NAME,
                message: format!(
                    "Bind of statement {statement:?}, which this session did not create with Parse, is refused (run a PREPAREd statement with EXECUTE)"
                ),
            };
            let info = unparsed(&format!("-- Bind of statement {statement:?}"));
            self.record_denied(&info, Decision::Error, &[], &e.to_string(), e.sqlstate());
            self.send_failing_bind(portal, e, to_server);
            return;
        };
        // Policies may have changed since Parse (a reload, the hour): decide again.
        let set = self.proxy.policies().current();
        let mut verdict = prepared.verdict.clone();
        for info in &prepared.statements {
            match self.decide(&set, info) {
                Ok(v) => {
                    if v.masker.is_some() {
                        verdict.masker = v.masker;
                    }
                }
                Err((e, decision, ids)) => {
                    self.record_denied(info, decision, &ids, &e.to_string(), e.sqlstate());
                    self.send_failing_bind(portal, e, to_server);
                    return;
                }
            }
        }
        let masker = verdict.masker.as_ref().map(|(_, m)| Arc::clone(m));
        let parameters = audit_parameters(params, param_formats, masker.as_deref());
        if !self.named_sources.is_empty() {
            self.named_sources.remove(&(true, portal.clone()));
        }
        let portal_record = Portal {
            prepared,
            verdict,
            parameters,
        };
        let cost = portal_record.kept_bytes();
        self.portals.bind(portal, portal_record, cost);
        self.expect.push_back(Expect::BindComplete);
        to_server.extend_from_slice(&msg.frame);
    }

    fn on_execute(&mut self, msg: &RawMessage, portal: &str, to_server: &mut BytesMut) {
        let Some(p) = self.portals.get(portal) else {
            // A portal this session did not bind: a SQL cursor (DECLARE makes a portal of
            // that name, and Execute runs it as FETCH would), or none at all. Its rows would
            // pass without the masking its query was decided with, and the audit trail would
            // not know its statement: refused whatever the policy, as the server refuses a
            // portal that does not exist. FETCH reads a cursor, checked and masked.
            let e = PgError::NameRefused {
                sqlstate: sqlstate::INVALID_CURSOR_NAME,
                message: format!(
                    "Execute of portal {portal:?}, which this session did not create with Bind, is refused (read a cursor with FETCH)"
                ),
            };
            let info = unparsed(&format!("-- Execute of portal {portal:?}"));
            self.record_denied(&info, Decision::Error, &[], &e.to_string(), e.sqlstate());
            encode_frontend(
                &FrontendMessage::Execute {
                    portal: DENIED_MARKER.to_string(),
                    max_rows: 0,
                },
                to_server,
            );
            self.expect.push_back(Expect::Denied(Box::new(e)));
            self.skip_to_sync = true;
            return;
        };
        let running = Running {
            info: Arc::clone(&p.prepared.whole),
            parameters: Arc::clone(&p.parameters),
            verdict: p.verdict.clone(),
            plan: None,
            copy_columns: None,
            started: Instant::now(),
        };
        if running.verdict.masker.is_some() {
            // The agent must know the result columns before the first row: its own
            // Describe of the portal, answered to the agent only.
            encode_frontend(
                &FrontendMessage::Describe {
                    target: portcullis_pgwire::DescribeTarget::Portal,
                    name: portal.to_string(),
                },
                to_server,
            );
            self.expect.push_back(Expect::InternalDescribe);
        }
        self.expect.push_back(Expect::Execute(Box::new(running)));
        to_server.extend_from_slice(&msg.frame);
    }

    /// A fast-path function's result, masked by the content detectors of the profile its
    /// call was allowed with. Its type is not known here: in text format the detectors mask
    /// what they find; in binary format a value in which they find anything cannot be masked
    /// without corrupting it, so the session ends instead of passing it.
    fn on_function_result(
        &mut self,
        msg: &RawMessage,
        value: Option<Bytes>,
        to_client: &mut BytesMut,
    ) -> Flow {
        let (masker, format) = match self.expect.front() {
            Some(Expect::FunctionCall {
                masker: Some(m),
                format,
            }) => (Arc::clone(m), *format),
            _ => {
                to_client.extend_from_slice(&msg.frame);
                return Flow::Continue;
            }
        };
        let Some(value) = value else {
            to_client.extend_from_slice(&msg.frame);
            return Flow::Continue;
        };
        const UNKNOWN_TYPE: u32 = 0;
        match masker.mask_value(&ColumnPlan::ContentOnly, format, UNKNOWN_TYPE, &value) {
            Ok(None) => to_client.extend_from_slice(&msg.frame),
            Ok(Some(masked)) => portcullis_pgwire::encode_backend(
                &BackendMessage::FunctionCallResponse(Some(masked.into())),
                to_client,
            ),
            Err(e) => {
                return self.fatal(
                    PgError::Unmaskable(format!(
                        "the function call's result cannot be masked ({e}); the session is closed so no unmasked value leaves"
                    )),
                    to_client,
                )
            }
        }
        Flow::Continue
    }

    fn on_function_call(
        &mut self,
        msg: &RawMessage,
        call: &FunctionCall<'_>,
        to_server: &mut BytesMut,
    ) {
        let oid = call.oid;
        // The fast-path function call runs a function by OID, bypassing SQL: decided as a
        // `call` statement naming the function by its names from the catalog (as SQL would
        // name it, bare and schema-qualified) and by its OID. Without its names a policy
        // that forbids the function by name could not apply: refused.
        let Some(names) = self
            .shared
            .catalog
            .function_names(self.target.id, &self.db_name, oid)
        else {
            let why = self
                .function_lookup_error
                .clone()
                .unwrap_or_else(|| "not looked up".into());
            let info = unparsed(&format!("-- function call by OID {oid}"));
            let e = PgError::StatementDenied {
                reason: format!(
                    "the name of the function with OID {oid} could not be read from the catalog ({why}), so no policy can be applied to it"
                ),
                policy_ids: Vec::new(),
            };
            self.record_denied(&info, Decision::Deny, &[], &e.to_string(), e.sqlstate());
            self.inject_denied_query(e, to_server);
            return;
        };
        let functions: Vec<String> = names
            .iter()
            .cloned()
            .chain(std::iter::once(format!("oid:{oid}")))
            .collect();
        let text = match names.first() {
            Some(name) => format!("-- function call by OID {oid} ({name})"),
            None => format!("-- function call by OID {oid}"),
        };
        let info = StatementInfo {
            text: text.into(),
            class: Some("call"),
            command: Some("FUNCTION CALL".into()),
            tables: Arc::from([]),
            functions: functions.into(),
            copy: None,
            sources: None,
            named: None,
            inner: Arc::from([]),
            dynamic_sql: false,
            shape_hash: std::sync::OnceLock::new(),
            encoded: std::sync::OnceLock::new(),
        };
        let set = self.proxy.policies().current();
        let decided = self.decide(&set, &info).and_then(|verdict| {
            fast_path_sql_text(&verdict, &names, call)
                .map(|()| verdict)
                .map_err(|(e, ids)| (e, Decision::Deny, ids))
        });
        match decided {
            Ok(verdict) => {
                let (profile, masker) = match verdict.masker {
                    Some((profile, masker)) => (Some(profile), Some(masker)),
                    None => (None, None),
                };
                // Its arguments are recorded as a Bind's parameters are.
                let arguments = audit_parameters(call.args, call.arg_formats, masker.as_deref());
                self.record_statement(
                    &info,
                    &arguments,
                    profile,
                    Decision::Allow,
                    &verdict.policy_ids,
                    None,
                    Some("FUNCTION CALL".into()),
                    None,
                    None,
                );
                // Its result is a computed value like any function's in SQL: the content
                // detectors of the verdict's profile apply to it.
                if let Some(m) = &masker {
                    self.session_masker = Some(Arc::clone(m));
                }
                self.expect_ready(Expect::FunctionCall {
                    masker,
                    format: call.result_format,
                });
                to_server.extend_from_slice(&msg.frame);
            }
            Err((e, decision, ids)) => {
                self.record_denied(&info, decision, &ids, &e.to_string(), e.sqlstate());
                self.inject_denied_query(e, to_server);
            }
        }
    }

    /// The policy decision for one statement; `Err` carries the wire error, the decision
    /// word for the audit event and the deciding policies.
    ///
    /// A DO block is decided as a multi-statement string is: every statement its body runs
    /// is its own request (same shape as a top-level statement's, so `context.command ==
    /// "DROP TABLE"` sees one inside a DO), then the block itself; one denial refuses the
    /// block, and the denied inner statement gets its own `statement.denied` event. Inner
    /// statements are decided before the block's cached verdict is looked up: two blocks with
    /// the same tables may run different commands.
    ///
    /// The statements in the bodies of the functions and procedures it calls (`read_calls`)
    /// are decided the same way, after the block's; a function that cannot be read makes the
    /// statement's own request `dynamic_sql`.
    fn decide(
        &mut self,
        set: &Arc<PolicySet>,
        info: &StatementInfo,
    ) -> Result<Verdict, (PgError, Decision, Vec<String>)> {
        let calls = self
            .read_calls(info)
            .map_err(|e| (e, Decision::Deny, Vec::new()))?;
        let mut inner_ids: Vec<String> = Vec::new();
        let mut inner_masker = None;
        let inside = info
            .inner
            .iter()
            .map(|s| (None, s))
            .chain(calls.statements.iter().map(|(f, s)| (Some(f.as_str()), s)));
        for (function, statement) in inside {
            let inner = StatementInfo::from_parsed(statement);
            match self.decide_one(set, &inner) {
                Ok(v) => {
                    inner_ids.extend(v.policy_ids.iter().cloned());
                    inner_masker = inner_masker.or(v.masker);
                }
                Err((e, decision, ids)) => {
                    self.record_denied(&inner, decision, &ids, &e.to_string(), e.sqlstate());
                    let place = match function {
                        None => "the DO block".to_owned(),
                        Some(f) => format!("function `{f}`, which the statement calls"),
                    };
                    let e = match e {
                        PgError::StatementDenied { reason, policy_ids } => {
                            PgError::StatementDenied {
                                reason: format!(
                                    "{reason} (statement inside {place}: {})",
                                    truncate(inner.text.to_string(), 200)
                                ),
                                policy_ids,
                            }
                        }
                        other => other,
                    };
                    return Err((e, decision, ids));
                }
            }
        }
        let verdict = if calls.dynamic && !info.dynamic_sql {
            let opaque = StatementInfo {
                dynamic_sql: true,
                shape_hash: std::sync::OnceLock::new(),
                encoded: std::sync::OnceLock::new(),
                ..info.clone()
            };
            self.decide_one(set, &opaque)?
        } else {
            self.decide_one(set, info)?
        };
        let changes_routines = may_change_routines(info.command.as_deref(), info.dynamic_sql)
            || calls.dynamic
            || info
                .inner
                .iter()
                .chain(calls.statements.iter().map(|(_, s)| s))
                .any(|s| may_change_routines(Some(&s.command), s.dynamic_sql));
        if changes_routines {
            self.routines_changed = true;
        }
        if inner_ids.is_empty() && inner_masker.is_none() {
            return Ok(verdict);
        }
        // The block's notices and errors carry what its statements read: a profile one of
        // them was given applies to the block when the block itself has none.
        inner_ids.extend(verdict.policy_ids.iter().cloned());
        inner_ids.sort();
        inner_ids.dedup();
        Ok(Verdict {
            policy_ids: Arc::from(inner_ids),
            masker: verdict.masker.or(inner_masker),
        })
    }

    /// What the functions and procedures `info` calls by name run, from the bodies
    /// `resolve_routines` read, following the calls inside them up to [`MAX_ROUTINE_DEPTH`]
    /// deep (each name once, so recursion ends). `dynamic` when one cannot be read before it
    /// runs: a body in another language or with dynamic SQL, a name whose functions were not
    /// read (the lookup failed), or any name while a change to functions is not committed.
    /// Refused: a body deeper than the limit, or one that runs what may never run.
    fn read_calls(&self, info: &StatementInfo) -> Result<Calls, PgError> {
        let mut calls = Calls::default();
        if info.functions.is_empty() {
            return Ok(calls);
        }
        let catalog = &self.shared.catalog;
        let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut queue: VecDeque<(String, usize)> =
            info.functions.iter().map(|f| (f.clone(), 1)).collect();
        while let Some((called, depth)) = queue.pop_front() {
            for name in routine_candidates(&called) {
                if !seen.insert(name.to_owned()) {
                    continue;
                }
                if self.routines_changed {
                    calls.dynamic = true;
                    continue;
                }
                let read = catalog.routines(self.target.id, &self.db_name, name, ROUTINE_MAX_AGE);
                let too_deep = || {
                    PgError::Unsafe(format!(
                        "`{called}` is called through more than {MAX_ROUTINE_DEPTH} levels of functions; the agent does not follow calls deeper and refuses what it cannot read"
                    ))
                };
                let Some(routines) = read else {
                    if depth > MAX_ROUTINE_DEPTH {
                        return Err(too_deep());
                    }
                    calls.dynamic = true;
                    continue;
                };
                if routines.is_empty() {
                    continue;
                }
                if depth > MAX_ROUTINE_DEPTH {
                    return Err(too_deep());
                }
                for routine in routines.iter() {
                    let body = routine.body.as_ref().map_err(|why| {
                        PgError::Unsafe(format!(
                            "function `{}`, which the statement calls, {why}",
                            routine.name
                        ))
                    })?;
                    calls.dynamic |= body.dynamic_sql;
                    for statement in &body.statements {
                        queue.extend(statement.functions.iter().map(|f| (f.clone(), depth + 1)));
                        calls
                            .statements
                            .push((routine.name.clone(), statement.clone()));
                    }
                }
            }
        }
        Ok(calls)
    }

    /// Reads, before the messages in `buf` are decided, what the functions and procedures
    /// their statements call by name run (`Catalog::routines`), and what those call, level by
    /// level down to one past [`MAX_ROUTINE_DEPTH`] (to tell PostgreSQL's own functions from
    /// a body too deep). Only a statement with a `(` can call a function by name (the
    /// functions the grammar calls for `AT TIME ZONE`, `SIMILAR TO` and the like are named in
    /// `pg_catalog`): pgbench's statements need no read. A name not read here is opaque
    /// when decided, never unchecked.
    async fn resolve_routines(&mut self, buf: &[u8]) {
        if self.routines_changed {
            return;
        }
        let mut called: Vec<String> = Vec::new();
        let mut rest = buf;
        while let (Some(&tag), Some(&[a, b, c, d])) = (rest.first(), rest.get(1..5)) {
            let len = u32::from_be_bytes([a, b, c, d]) as usize;
            let Some(body) = rest.get(5..len.saturating_add(1)) else {
                break;
            };
            match tag {
                b'Q' => self.called_in(cstring(body).map(|(sql, _)| sql), &mut called),
                b'P' => self.called_in(
                    cstring(body)
                        .and_then(|(_, r)| cstring(r))
                        .map(|(sql, _)| sql),
                    &mut called,
                ),
                b'B' => {
                    let statement = cstring(body).and_then(|(_, r)| cstring(r));
                    if let Some(prepared) = statement.and_then(|(name, _)| self.prepared.get(name))
                    {
                        called.extend(
                            prepared
                                .statements
                                .iter()
                                .flat_map(|s| s.functions.iter().cloned()),
                        );
                    }
                }
                b'F' => {
                    if let Some(&[o1, o2, o3, o4]) = body.get(..4) {
                        let oid = u32::from_be_bytes([o1, o2, o3, o4]);
                        if let Some(names) =
                            self.shared
                                .catalog
                                .function_names(self.target.id, &self.db_name, oid)
                        {
                            called.extend(names.iter().cloned());
                        }
                    }
                }
                _ => {}
            }
            rest = rest.get(len.saturating_add(1)..).unwrap_or_default();
        }
        let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
        let mut level: Vec<String> = called
            .iter()
            .flat_map(|f| routine_candidates(f))
            .filter(|name| seen.insert((*name).to_owned()))
            .map(str::to_owned)
            .collect();
        let catalog = &self.shared.catalog;
        let (target, db) = (self.target.id, &*self.db_name);
        for depth in 1..=MAX_ROUTINE_DEPTH + 1 {
            if level.is_empty() {
                break;
            }
            let missing: Vec<String> = level
                .iter()
                .filter(|name| catalog.routines(target, db, name, ROUTINE_REREAD).is_none())
                .cloned()
                .collect();
            if !missing.is_empty() {
                if let Err(e) = self
                    .catalog_lookup(super::catalog::Lookup::Routines(&missing))
                    .await
                {
                    // Decided as opaque (`read_calls`): a policy on `dynamic_sql` applies.
                    tracing::warn!(error = %e, "reading the functions a statement calls");
                    return;
                }
            }
            if depth > MAX_ROUTINE_DEPTH {
                break;
            }
            let mut next = Vec::new();
            for name in &level {
                let Some(routines) = catalog.routines(target, db, name, ROUTINE_MAX_AGE) else {
                    continue;
                };
                for body in routines.iter().filter_map(|r| r.body.as_ref().ok()) {
                    for f in body.statements.iter().flat_map(|s| s.functions.iter()) {
                        next.extend(
                            routine_candidates(f)
                                .into_iter()
                                .filter(|name| seen.insert((*name).to_owned()))
                                .map(str::to_owned),
                        );
                    }
                }
            }
            level = next;
        }
    }

    /// The functions the statements of `sql` call, if it may call any by name.
    fn called_in(&self, sql: Option<&str>, called: &mut Vec<String>) {
        let Some(sql) = sql.filter(|sql| sql.contains('(')) else {
            return;
        };
        // Cached: deciding the same text reads it from the cache.
        if let Ok(statements) = self.shared.classifier.classify(sql) {
            called.extend(statements.iter().flat_map(|s| s.functions.iter().cloned()));
        }
    }

    /// [`Self::decide`] of one request.
    fn decide_one(
        &mut self,
        set: &Arc<PolicySet>,
        info: &StatementInfo,
    ) -> Result<Verdict, (PgError, Decision, Vec<String>)> {
        let now = i64::try_from(crate::audit::now_ms() / 1000).unwrap_or(0);
        // Within one second, under one policy set, the request for a statement of the same
        // shape is the same request (principal, target, client and database are the
        // session's): its allow is reused. Denials are always decided afresh.
        let hash = info.shape_hash();
        let cache = &mut self.decisions;
        if !std::ptr::eq(cache.set.as_ptr(), Arc::as_ptr(set)) || cache.second != now {
            cache.set = Arc::downgrade(set);
            cache.second = now;
            cache.allowed.clear();
        }
        if let Some((_, v)) = cache.allowed.get(&hash).filter(|(k, _)| info.has_shape(k)) {
            return Ok(v.clone());
        }
        let request = self.query_request(info, now);
        let decision = set.decide(&request);
        let ids = crate::policy::policy_ids(&decision);
        match decision.effect {
            Effect::Allow => {
                let masker = decision.obligations.iter().find_map(|o| match o {
                    Obligation::Mask { profile } => self
                        .shared
                        .masker(set, profile)
                        .map(|m| (Arc::from(profile.as_str()), m)),
                });
                // What a function running SQL text reads cannot be followed to its columns,
                // so no column rule could apply to its result. A fast-path call gives its
                // query as a value, which `fast_path_sql_text` reads instead.
                let fast_path = info.command.as_deref() == Some("FUNCTION CALL");
                if let Some((profile, m)) = masker.as_ref().filter(|_| !fast_path) {
                    let functions = info.functions.iter().map(String::as_str);
                    if let Some(function) = m.refused_sql_text_function(functions) {
                        return Err((
                            PgError::StatementDenied {
                                reason: format!(
                                    "`{function}` runs SQL given as text, which masking profile `{profile}` cannot follow to the columns it reads; the profile may allow it with `allow_sql_text_functions`"
                                ),
                                policy_ids: ids.clone(),
                            },
                            Decision::Deny,
                            ids,
                        ));
                    }
                }
                let verdict = Verdict {
                    policy_ids: Arc::from(ids),
                    masker,
                };
                if self.decisions.allowed.len() >= DECISION_CACHE_ENTRIES {
                    self.decisions.allowed.clear();
                }
                self.decisions
                    .allowed
                    .insert(hash, (info.shape(), verdict.clone()));
                Ok(verdict)
            }
            Effect::Deny => Err((
                PgError::StatementDenied {
                    reason: decision.reason,
                    policy_ids: ids.clone(),
                },
                Decision::Deny,
                ids,
            )),
            Effect::RequireApproval {
                approver_group,
                approvals,
            } => Err((
                PgError::StatementDenied {
                    reason: format!(
                        "requires {approvals} approval(s) from `{approver_group}`, and approvals are not available yet"
                    ),
                    policy_ids: ids.clone(),
                },
                Decision::Approval,
                ids,
            )),
        }
    }

    fn query_request(&self, info: &StatementInfo, now: i64) -> Request {
        let origin = &self.conn.origin;
        let mut context = crate::policy::base_context(&origin.comm, origin.uid, now);
        context.statement_class = info.class.map(str::to_string);
        context.command = info.command.as_deref().map(str::to_string);
        context.tables = info.tables.to_vec();
        context.functions = info.functions.to_vec();
        context.dynamic_sql = info.dynamic_sql;
        context.db_user = Some(self.db_user.to_string());
        context.db_name = Some(self.db_name.to_string());
        Request {
            principal: crate::policy::principal(self.identity),
            action: Action::Query,
            target: crate::policy::target(self.target),
            context,
        }
    }

    // ----- server → client -------------------------------------------------------------

    /// Before rows are masked by `table_column` rules, the tables of the result columns
    /// described in `buf` must be in the catalog cache; fetched here, outside the
    /// synchronous message handling.
    async fn resolve_table_columns(&self, buf: &[u8]) -> Result<(), PgError> {
        let needed = self.expect.iter().any(|e| {
            let masker = match e {
                Expect::Execute(r) => r.verdict.masker.as_ref(),
                Expect::Query(q) => q.statements.iter().find_map(|r| r.verdict.masker.as_ref()),
                _ => None,
            };
            masker.is_some_and(|(_, m)| m.needs_column_origins())
        });
        if !needed {
            return Ok(());
        }
        let mut oids: Vec<u32> = Vec::new();
        let mut rest = buf;
        while let (Some(&tag), Some(&[a, b, c, d])) = (rest.first(), rest.get(1..5)) {
            let len = u32::from_be_bytes([a, b, c, d]) as usize;
            let Some(frame) = rest.get(..len + 1) else {
                break;
            };
            if tag == b'T' {
                let msg = RawMessage {
                    tag,
                    frame: Bytes::copy_from_slice(frame),
                };
                if let Ok(BackendMessage::RowDescription(fields)) = parse_backend(&msg) {
                    oids.extend(fields.iter().map(|f| f.table_oid).filter(|&o| {
                        o != 0
                            && !self
                                .shared
                                .catalog
                                .is_fresh(self.target.id, &self.db_name, o)
                    }));
                }
            }
            rest = rest.get(len + 1..).unwrap_or_default();
        }
        oids.sort_unstable();
        oids.dedup();
        if oids.is_empty() {
            return Ok(());
        }
        let unresolved = |why: String| {
            PgError::Unmaskable(format!(
                "the masking profile selects columns by table, and the result's tables could not be looked up ({why}); the session is closed so no unmasked value leaves"
            ))
        };
        self.catalog_lookup(super::catalog::Lookup::Tables(&oids))
            .await
            .map_err(unresolved)
    }

    /// Reads what `lookup` asks from the catalog, over a connection of its own as the
    /// session's role, into the shared cache.
    async fn catalog_lookup(&self, lookup: super::catalog::Lookup<'_>) -> Result<(), String> {
        let pg = self
            .target
            .postgres
            .as_deref()
            .ok_or_else(|| "no PostgreSQL settings".to_string())?;
        let password = super::upstream::credential(pg.credentials_file.get_ref(), &self.db_user)
            .map_err(|e| e.to_string())?;
        let socket = self
            .proxy
            .connect_upstream(self.conn.upstream)
            .await
            .map_err(|e| e.to_string())?;
        self.shared
            .catalog
            .fetch(
                socket,
                self.conn.upstream,
                self.target.id,
                pg,
                self.shared.upstream_tls(self.target.id),
                &self.db_name,
                &self.db_user,
                &password,
                lookup,
            )
            .await
    }

    /// Looks up the names of the functions the fast-path calls in `buf` run (by OID), so the
    /// policy decides them by name as it does the same call in SQL. What could not be looked
    /// up is kept for `on_function_call`, which refuses those calls.
    async fn resolve_function_names(&mut self, buf: &[u8]) {
        let mut oids: Vec<u32> = Vec::new();
        let mut rest = buf;
        while let (Some(&tag), Some(&[a, b, c, d])) = (rest.first(), rest.get(1..5)) {
            let len = u32::from_be_bytes([a, b, c, d]) as usize;
            if rest.len() < len.saturating_add(1) {
                break;
            }
            if let (b'F', Some(&[o1, o2, o3, o4])) = (tag, rest.get(5..9)) {
                let oid = u32::from_be_bytes([o1, o2, o3, o4]);
                let cached = self
                    .shared
                    .catalog
                    .function_names(self.target.id, &self.db_name, oid)
                    .is_some();
                if !cached {
                    oids.push(oid);
                }
            }
            rest = rest.get(len + 1..).unwrap_or_default();
        }
        if oids.is_empty() {
            return;
        }
        oids.sort_unstable();
        oids.dedup();
        self.function_lookup_error = self
            .catalog_lookup(super::catalog::Lookup::Functions(&oids))
            .await
            .err();
    }

    fn on_server_bytes(&mut self, buf: &mut BytesMut, to_client: &mut BytesMut) -> Flow {
        loop {
            let msg = match decode_frame(buf, self.max_len) {
                Ok(Some(m)) => m,
                Ok(None) => return Flow::Continue,
                Err(e) => {
                    return self.fatal(
                        PgError::Protocol(format!("from the server: {e}")),
                        to_client,
                    )
                }
            };
            if let Flow::End(why) = self.on_server_message(msg, to_client) {
                return Flow::End(why);
            }
        }
    }

    fn on_server_message(&mut self, msg: RawMessage, to_client: &mut BytesMut) -> Flow {
        if let Some(Expect::ColumnLookup(_)) = self.expect.front() {
            return self.on_lookup_message(msg, to_client);
        }
        match msg.tag {
            // Rows: the hot path. Unmasked rows are forwarded as they came.
            b'D' => return self.on_data_row(msg, to_client),
            b'd' if self.copy_out.is_some() => return self.on_copy_out_data(msg, to_client),
            b'd' | b'c' => {
                if msg.tag == b'c' {
                    self.copy_out = None;
                }
                to_client.extend_from_slice(&msg.frame);
                return Flow::Continue;
            }
            _ => {}
        }
        let parsed = match parse_backend(&msg) {
            Ok(m) => m,
            Err(e) => {
                return self.fatal(
                    PgError::Protocol(format!("from the server: {e}")),
                    to_client,
                )
            }
        };
        match parsed {
            BackendMessage::ReadyForQuery { status } => {
                self.txn = status;
                if status == TransactionStatus::Idle {
                    self.read_selected_in_transaction = None;
                }
                match self.expect.pop_front() {
                    Some(Expect::Sync | Expect::Query(_) | Expect::FunctionCall { .. }) => self
                        .portals
                        .ready_received(status == TransactionStatus::Idle),
                    other => self.unexpected("ReadyForQuery", other),
                }
                // Out of any transaction with nothing decided still to run: a change to a
                // function is committed (or gone), and everybody reads bodies afresh.
                if self.routines_changed
                    && status == TransactionStatus::Idle
                    && self.expect.is_empty()
                {
                    self.routines_changed = false;
                    self.shared.catalog.forget_routines();
                }
                to_client.extend_from_slice(&msg.frame);
            }
            BackendMessage::ParseComplete => {
                self.pop_simple(Expect::ParseComplete, &msg, to_client)
            }
            BackendMessage::BindComplete => self.pop_simple(Expect::BindComplete, &msg, to_client),
            BackendMessage::CloseComplete => {
                self.pop_simple(Expect::CloseComplete, &msg, to_client)
            }
            BackendMessage::ParameterDescription(_) => to_client.extend_from_slice(&msg.frame),
            BackendMessage::RowDescription(fields) => {
                return self.on_row_description(&msg, &fields, to_client)
            }
            BackendMessage::NoData => match self.expect.front() {
                Some(Expect::InternalDescribe) => {
                    self.expect.pop_front();
                    if let Some(Expect::Execute(r)) = self.expect.front_mut() {
                        r.plan = Some(RowPlan {
                            columns: Vec::new(),
                            nulled: Vec::new(),
                            masks_anything: false,
                        });
                    }
                }
                _ => {
                    if matches!(self.expect.front(), Some(Expect::Describe)) {
                        self.expect.pop_front();
                    }
                    to_client.extend_from_slice(&msg.frame);
                }
            },
            BackendMessage::CommandComplete { tag } => {
                self.on_complete(Some(tag), None);
                to_client.extend_from_slice(&msg.frame);
            }
            BackendMessage::EmptyQueryResponse => {
                self.on_complete(None, None);
                to_client.extend_from_slice(&msg.frame);
            }
            BackendMessage::PortalSuspended => {
                self.on_complete(Some("(portal suspended)".into()), None);
                to_client.extend_from_slice(&msg.frame);
            }
            BackendMessage::ErrorResponse(fields) => return self.on_error(fields, to_client),
            BackendMessage::NoticeResponse(fields) => match self.screen_error(&fields, true) {
                Some(masked) => portcullis_pgwire::encode_notice_response(&masked, to_client),
                None => to_client.extend_from_slice(&msg.frame),
            },
            BackendMessage::NotificationResponse {
                process_id,
                channel,
                payload,
            } => match self.screen_notification(&payload) {
                Some(masked) => portcullis_pgwire::encode_backend(
                    &BackendMessage::NotificationResponse {
                        process_id,
                        channel,
                        payload: masked,
                    },
                    to_client,
                ),
                None => to_client.extend_from_slice(&msg.frame),
            },
            BackendMessage::CopyOutResponse(ref r) | BackendMessage::CopyBothResponse(ref r) => {
                if let Some(m) = self.current_masker() {
                    match self.copy_mask(m, r) {
                        Ok(mask) => self.copy_out = Some(mask),
                        Err(e) => return self.fatal(e, to_client),
                    }
                }
                to_client.extend_from_slice(&msg.frame);
            }
            BackendMessage::CopyInResponse(_) => to_client.extend_from_slice(&msg.frame),
            BackendMessage::FunctionCallResponse(value) => {
                return self.on_function_result(&msg, value, to_client);
            }
            BackendMessage::BackendKeyData { .. } => {
                // The server's key is never the client's business; the client has the agent's.
            }
            BackendMessage::Authentication(_) | BackendMessage::NegotiateProtocolVersion { .. } => {
                return self.fatal(
                    PgError::Protocol(
                        "the server restarted authentication inside a session".into(),
                    ),
                    to_client,
                )
            }
            BackendMessage::ParameterStatus { name, value } => {
                if let Some(e) = string_syntax_changed(&name, &value) {
                    return self.fatal(e, to_client);
                }
                match self.screen_parameter(&name, &value) {
                    Some(value) => portcullis_pgwire::encode_backend(
                        &BackendMessage::ParameterStatus { name, value },
                        to_client,
                    ),
                    None => to_client.extend_from_slice(&msg.frame),
                }
            }
            BackendMessage::DataRow(_) | BackendMessage::CopyData(_) | BackendMessage::CopyDone => {
                to_client.extend_from_slice(&msg.frame);
            }
        }
        Flow::Continue
    }

    fn unexpected(&self, what: &str, front: Option<Expect>) {
        let front = match front {
            None => "nothing",
            Some(Expect::ParseComplete) => "ParseComplete",
            Some(Expect::BindComplete) => "BindComplete",
            Some(Expect::CloseComplete) => "CloseComplete",
            Some(Expect::Describe | Expect::InternalDescribe) => "a Describe answer",
            Some(Expect::ColumnLookup(_)) => "the column lookup",
            Some(Expect::Execute(_)) => "Execute results",
            Some(Expect::Sync) => "ReadyForQuery",
            Some(Expect::Query(_)) => "Query results",
            Some(Expect::FunctionCall { .. }) => "a function result",
            Some(Expect::Denied(_)) => "a denial",
        };
        tracing::warn!(
            what,
            expected = front,
            "the server's reply does not match the agent's queue"
        );
    }

    fn pop_simple(&mut self, kind: Expect, msg: &RawMessage, to_client: &mut BytesMut) {
        let matches = matches!(
            (&kind, self.expect.front()),
            (Expect::ParseComplete, Some(Expect::ParseComplete))
                | (Expect::BindComplete, Some(Expect::BindComplete))
                | (Expect::CloseComplete, Some(Expect::CloseComplete))
        );
        if matches {
            self.expect.pop_front();
        } else {
            let front = self.expect.pop_front();
            self.unexpected("a completion", front);
        }
        to_client.extend_from_slice(&msg.frame);
    }

    /// The masker of the statement whose results are arriving.
    fn current_masker(&self) -> Option<Arc<Masker>> {
        match self.expect.front() {
            Some(Expect::Execute(r)) => r.verdict.masker.as_ref().map(|(_, m)| Arc::clone(m)),
            Some(Expect::Query(q)) => q
                .statements
                .front()
                .and_then(|r| r.verdict.masker.as_ref().map(|(_, m)| Arc::clone(m))),
            _ => self.session_masker.clone(),
        }
    }

    fn current_running(&mut self) -> Option<&mut Running> {
        match self.expect.front_mut() {
            Some(Expect::Execute(r)) => Some(r),
            Some(Expect::Query(q)) => q.statements.front_mut(),
            _ => None,
        }
    }

    fn on_row_description(
        &mut self,
        msg: &RawMessage,
        fields: &[FieldDescription],
        to_client: &mut BytesMut,
    ) -> Flow {
        let internal = matches!(self.expect.front(), Some(Expect::InternalDescribe));
        if internal || matches!(self.expect.front(), Some(Expect::Describe)) {
            self.expect.pop_front();
        }
        // A description reaches a running statement from a simple Query or from a Describe
        // of the portal about to execute (the agent's own when masking): both report the
        // real result formats.
        let (masker, info) = match self.current_running() {
            Some(r) => (
                r.verdict.masker.as_ref().map(|(_, m)| Arc::clone(m)),
                Arc::clone(&r.info),
            ),
            None => {
                if !internal {
                    to_client.extend_from_slice(&msg.frame);
                }
                return Flow::Continue;
            }
        };
        let plan = match masker {
            None => None,
            Some(masker) => {
                let derived = self.derived_sources(&info);
                let catalog = &self.shared.catalog;
                let (target_id, db) = (self.target.id, &*self.db_name);
                let qualify = |oid: u32, attnum: i16| catalog.column(target_id, db, oid, attnum);
                let view = |oid: u32| catalog.view_sources(target_id, db, oid);
                match plan_rows(&masker, fields, qualify, view, &derived) {
                    Ok(p) => Some(p),
                    Err(e) => return self.fatal(e, to_client),
                }
            }
        };
        if let Some(r) = self.current_running() {
            r.plan = plan;
        }
        if !internal {
            to_client.extend_from_slice(&msg.frame);
        }
        Flow::Continue
    }

    /// What the computed columns of `info`'s result may come from: its own query, or for
    /// FETCH and EXECUTE the query kept under that name (anything, if the agent did not see
    /// it kept).
    fn derived_sources(&self, info: &StatementInfo) -> Derived {
        use portcullis_sql::NamedQuery;
        if let Some(sources) = &info.sources {
            return Derived::Known(Arc::clone(sources));
        }
        let key = match &info.named {
            Some(NamedQuery::FetchesFrom(name)) => (true, name.clone()),
            Some(NamedQuery::Executes(name)) => (false, name.clone()),
            _ => return Derived::NotAQuery,
        };
        match self.named_sources.get(&key) {
            Some(Some(sources)) => Derived::Known(Arc::clone(sources)),
            _ => Derived::Unknown,
        }
    }

    /// Keeps the result sources of a cursor or SQL prepared statement being defined.
    fn remember_named(&mut self, info: &StatementInfo) {
        use portcullis_sql::NamedQuery;
        // SQL and the protocol share the server's names, and a name can be freed where the
        // agent does not see it (dynamic SQL in a function): a name SQL takes is forgotten
        // as the protocol's (if the server refuses it as taken, a later Bind or Execute of
        // it is refused too, the safe side), and the other way round in Parse and Bind.
        let key = match &info.named {
            Some(NamedQuery::DeclaresCursor(name)) => {
                self.portals.close(name);
                (true, name.clone())
            }
            Some(NamedQuery::Prepares(name)) => {
                self.prepared.remove(name);
                (false, name.clone())
            }
            // Once these run, a SQL PREPARE may take the name of a statement the client made
            // with Parse, a DECLARE the name of a portal it made with Bind: the agent forgets
            // the names now (before the server, the safe side: a Bind or Execute of them in
            // between is refused).
            Some(NamedQuery::Deallocates(name)) => {
                return self.forget_names(false, name.as_deref())
            }
            Some(NamedQuery::Closes(name)) => return self.forget_names(true, name.as_deref()),
            _ => return,
        };
        if self.named_sources.len() >= MAX_NAMED_QUERIES && !self.named_sources.contains_key(&key) {
            // Forgotten names mask as "anything", which is safe.
            self.named_sources.clear();
        }
        self.named_sources.insert(key, info.sources.clone());
    }

    /// Forgets a portal (`cursor`) or prepared statement name, or all of them (`None`), and
    /// what a SQL cursor or statement of that name computed its columns from.
    fn forget_names(&mut self, cursor: bool, name: Option<&str>) {
        match name {
            Some(name) => {
                if cursor {
                    self.portals.close(name);
                } else {
                    self.prepared.remove(name);
                }
                self.named_sources.remove(&(cursor, name.to_string()));
            }
            None => {
                if cursor {
                    self.portals.close_all();
                } else {
                    self.prepared.clear();
                }
                self.named_sources.retain(|(kind, _), _| *kind != cursor);
            }
        }
    }

    fn on_data_row(&mut self, msg: RawMessage, to_client: &mut BytesMut) -> Flow {
        let Some(running) = self.current_running() else {
            to_client.extend_from_slice(&msg.frame);
            return Flow::Continue;
        };
        let Some((_, masker)) = &running.verdict.masker else {
            to_client.extend_from_slice(&msg.frame);
            return Flow::Continue;
        };
        let masker = Arc::clone(masker);
        let Some(plan) = &running.plan else {
            // Rows before a description: nothing says which values are selected. Fail closed.
            return self.fatal(
                PgError::Unmaskable("result rows arrived without a row description; the session is closed so no unmasked value leaves".into()),
                to_client,
            );
        };
        if !plan.masks_anything {
            to_client.extend_from_slice(&msg.frame);
            return Flow::Continue;
        }
        let row = match parse_backend(&msg) {
            Ok(BackendMessage::DataRow(row)) => row,
            Ok(_) | Err(_) => {
                return self.fatal(
                    PgError::Protocol("a malformed DataRow from the server".into()),
                    to_client,
                )
            }
        };
        let mut changed: Vec<Option<Vec<u8>>> = Vec::with_capacity(row.values.len());
        let mut any = false;
        for (i, value) in row.values.iter().enumerate() {
            if plan.nulled.get(i).copied().unwrap_or(false) {
                // Marked by an empty replacement, written as NULL below.
                any |= value.is_some();
                changed.push(value.as_ref().map(|_| Vec::new()));
                continue;
            }
            let masked = match (value, plan.columns.get(i)) {
                (Some(v), Some((column, format, type_oid))) => {
                    match masker.mask_value(column, *format, *type_oid, v) {
                        Ok(m) => m,
                        Err(e) => {
                            return self.fatal(
                                PgError::Unmaskable(format!(
                                    "column {} cannot be masked ({e}); the session is closed so no unmasked value leaves",
                                    i + 1
                                )),
                                to_client,
                            )
                        }
                    }
                }
                _ => None,
            };
            any |= masked.is_some();
            changed.push(masked);
        }
        if !any {
            to_client.extend_from_slice(&msg.frame);
            return Flow::Continue;
        }
        let values: Vec<Option<&[u8]>> = row
            .values
            .iter()
            .zip(&changed)
            .enumerate()
            .map(|(i, (orig, new))| match new {
                _ if plan.nulled.get(i).copied().unwrap_or(false) => None,
                Some(n) => Some(n.as_slice()),
                None => orig.as_deref(),
            })
            .collect();
        encode_data_row(&values, to_client);
        Flow::Continue
    }

    /// How the rows of the COPY TO STDOUT that starts now are masked. Content detectors alone
    /// scan text and CSV rows whole; column rules, and binary rows, go value by value with the
    /// columns the agent looked up before the COPY. What cannot be masked ends the session
    /// before a row leaves.
    fn copy_mask(
        &mut self,
        masker: Arc<Masker>,
        response: &portcullis_pgwire::CopyResponse,
    ) -> Result<CopyMask, PgError> {
        use portcullis_sql::{CopyFormat, CopySource};
        let binary = response.format != 0;
        if !binary && !masker.has_column_rules() {
            return Ok(CopyMask::Lines(masker));
        }
        let refuse = |why: String| {
            PgError::Unmaskable(format!(
                "{why}; the session is closed so no unmasked value leaves"
            ))
        };
        let running = self.current_running();
        let copy = running.as_ref().and_then(|r| r.info.copy.clone());
        let Some(copy) = copy else {
            return Err(refuse(
                "this COPY output cannot be masked by column or in binary".into(),
            ));
        };
        if copy.source == CopySource::Query {
            return Err(refuse("the rows of COPY (query) TO STDOUT cannot be masked by column or in binary: their columns are not a table's; COPY the table, or SELECT".into()));
        }
        if !copy.unsupported.is_empty() {
            return Err(refuse(format!(
                "COPY option(s) {} cannot be kept when a masked row is written anew; leave them out",
                copy.unsupported.join(", ")
            )));
        }
        let looked_up = running.and_then(|r| r.copy_columns.take());
        let columns = match looked_up {
            Some(Ok(columns)) => columns,
            Some(Err(e)) => {
                return Err(refuse(format!(
                    "the columns of the COPY could not be looked up ({e})"
                )))
            }
            None => return Err(refuse("COPY sent with the extended protocol cannot be masked by column or in binary (the agent looks the columns up before a simple-query COPY, as psql, pg_dump and psycopg send it)".into())),
        };
        if columns.len() != response.column_formats.len() {
            return Err(refuse(format!(
                "the server sends {} columns where the catalog lists {}",
                response.column_formats.len(),
                columns.len()
            )));
        }
        let format = match copy.format {
            CopyFormat::Text => CopyRowFormat::Text {
                delimiter: copy
                    .delimiter
                    .unwrap_or(portcullis_pgwire::copy::TEXT_DEFAULT_DELIMITER),
            },
            CopyFormat::Csv => CopyRowFormat::Csv {
                delimiter: copy
                    .delimiter
                    .unwrap_or(portcullis_pgwire::copy::CSV_DEFAULT_DELIMITER),
                quote: copy
                    .quote
                    .unwrap_or(portcullis_pgwire::copy::CSV_DEFAULT_QUOTE),
            },
            CopyFormat::Binary => CopyRowFormat::Binary,
        };
        if binary != matches!(format, CopyRowFormat::Binary) {
            return Err(refuse(
                "the server's COPY format is not the one the statement asked for".into(),
            ));
        }
        let columns = columns
            .iter()
            .map(|c| {
                let origin = portcullis_policy::ColumnOrigin {
                    qualified: &c.qualified,
                    column: &c.name,
                };
                (masker.plan_column(&c.name, Some(origin)), c.type_oid)
            })
            .collect();
        Ok(CopyMask::Fields {
            masker,
            columns,
            format,
            header_pending: binary || copy.header,
        })
    }

    /// One CopyData of COPY TO output while a mask applies.
    fn on_copy_out_data(&mut self, msg: RawMessage, to_client: &mut BytesMut) -> Flow {
        let masked = match &mut self.copy_out {
            None => Ok(None),
            Some(CopyMask::Lines(masker)) => match std::str::from_utf8(msg.body()) {
                Ok(line) => Ok(masker.mask_text(line).map(String::into_bytes)),
                Err(_) => Err("COPY output that is not UTF-8 cannot be masked".to_string()),
            },
            Some(CopyMask::Fields {
                masker,
                columns,
                format,
                header_pending,
            }) => {
                let header = std::mem::take(header_pending);
                mask_copy_payload(masker, columns, *format, header, msg.body())
            }
        };
        match masked {
            Ok(None) => to_client.extend_from_slice(&msg.frame),
            Ok(Some(body)) => portcullis_pgwire::encode_backend(
                &BackendMessage::CopyData(Bytes::from(body)),
                to_client,
            ),
            Err(why) => {
                return self.fatal(
                    PgError::Unmaskable(format!(
                        "{why}; the session is closed so no unmasked value leaves"
                    )),
                    to_client,
                )
            }
        }
        Flow::Continue
    }

    /// A reply to the agent's own column lookup: kept, except what the server may send at
    /// any time (notifications, parameter changes), which is the client's.
    fn on_lookup_message(&mut self, msg: RawMessage, to_client: &mut BytesMut) -> Flow {
        if msg.tag == b'S' {
            // Checked as anywhere else (standard_conforming_strings).
            let changed = match parse_backend(&msg) {
                Ok(BackendMessage::ParameterStatus { name, value }) => {
                    string_syntax_changed(&name, &value)
                }
                Ok(_) | Err(_) => Some(PgError::Protocol(
                    "from the server: a malformed ParameterStatus".into(),
                )),
            };
            if let Some(e) = changed {
                return self.fatal(e, to_client);
            }
            to_client.extend_from_slice(&msg.frame);
            return Flow::Continue;
        }
        let Some(Expect::ColumnLookup(lookup)) = self.expect.front_mut() else {
            return Flow::Continue;
        };
        match msg.tag {
            b'A' => to_client.extend_from_slice(&msg.frame),
            b'T' | b'C' | b'N' => {}
            b'D' => match parse_backend(&msg) {
                Ok(BackendMessage::DataRow(row)) => {
                    let text = |i: usize| {
                        row.values
                            .get(i)
                            .and_then(|v| v.as_deref())
                            .and_then(|v| std::str::from_utf8(v).ok())
                    };
                    match (text(0), text(1), text(2), text(3), text(4)) {
                        (
                            Some(schema),
                            Some(table),
                            Some(column),
                            Some(type_oid),
                            Some(generated),
                        ) => {
                            // Without a column list COPY leaves generated columns out.
                            if !(lookup.wanted.is_empty() && generated == "t") {
                                lookup.rows.push(CopyColumn {
                                    name: column.to_string(),
                                    qualified: format!("{schema}.{table}.{column}"),
                                    type_oid: type_oid.parse().unwrap_or(0),
                                });
                            }
                        }
                        _ => lookup.error = Some("a malformed catalog row".into()),
                    }
                }
                _ => lookup.error = Some("a malformed catalog row".into()),
            },
            b'E' => {
                let why = match parse_backend(&msg) {
                    Ok(BackendMessage::ErrorResponse(fields)) => {
                        fields.message().unwrap_or("an error").to_string()
                    }
                    _ => "an error".to_string(),
                };
                lookup.error = Some(why);
            }
            b'Z' => {
                let Some(Expect::ColumnLookup(lookup)) = self.expect.pop_front() else {
                    return Flow::Continue;
                };
                let ColumnLookup {
                    statement,
                    wanted,
                    rows,
                    error,
                } = *lookup;
                let result = match error {
                    Some(e) => Err(e),
                    None if rows.is_empty() => Err("the table was not found".to_string()),
                    None if wanted.is_empty() => Ok(rows),
                    None => {
                        let mut rows = rows;
                        wanted
                            .iter()
                            .map(|name| {
                                rows.iter()
                                    .position(|r| &r.name == name)
                                    .map(|i| rows.swap_remove(i))
                                    .ok_or_else(|| format!("column `{name}` was not found"))
                            })
                            .collect()
                    }
                };
                let query = self.expect.iter_mut().find_map(|e| match e {
                    Expect::Query(q) => Some(q),
                    _ => None,
                });
                if let Some(r) = query.and_then(|q| q.statements.get_mut(statement)) {
                    r.copy_columns = Some(result);
                }
            }
            other => {
                return self.fatal(
                    PgError::Protocol(format!(
                        "the server answered the agent's column lookup with message `{}`",
                        char::from(other)
                    )),
                    to_client,
                )
            }
        }
        Flow::Continue
    }

    fn on_complete(&mut self, tag: Option<String>, sqlstate: Option<String>) {
        let running = match self.expect.front_mut() {
            Some(Expect::Execute(_)) => match self.expect.pop_front() {
                Some(Expect::Execute(r)) => Some(*r),
                _ => None,
            },
            Some(Expect::Query(q)) => q.statements.pop_front(),
            _ => None,
        };
        if let Some(r) = running {
            self.finish_statement(r, tag, sqlstate);
        }
    }

    fn finish_statement(&mut self, r: Running, tag: Option<String>, sqlstate: Option<String>) {
        if let Some((_, m)) = &r.verdict.masker {
            self.session_masker = Some(Arc::clone(m));
            if let Some(profile) = reads_selected_columns(&r) {
                self.read_selected_in_transaction = Some(profile);
            }
        }
        let rows = tag
            .as_deref()
            .and_then(|t| t.rsplit(' ').next())
            .and_then(|n| n.parse().ok());
        let duration = u64::try_from(r.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.record_inner(&r.info, &r.verdict.policy_ids, sqlstate.as_deref());
        self.record_statement(
            &r.info,
            &r.parameters,
            r.verdict.masker.as_ref().map(|(p, _)| Arc::clone(p)),
            Decision::Allow,
            &r.verdict.policy_ids,
            rows,
            tag,
            sqlstate,
            Some(duration),
        );
    }

    /// One `statement.executed` event for each statement of a DO block that ran, before the
    /// block's own: what the trail says ran is what policy was asked about. The server does
    /// not report which of them the block reached (a branch not taken, an exception), so each
    /// says so and carries the block's SQLSTATE.
    fn record_inner(
        &self,
        block: &StatementInfo,
        policy_ids: &Arc<[String]>,
        sqlstate: Option<&str>,
    ) {
        for statement in block.inner.iter() {
            let info = StatementInfo::from_parsed(statement);
            let mut ev = self.statement_event(EventKind::StatementExecuted, &info, &Arc::from([]));
            ev.decision = Some(Decision::Allow);
            ev.policy_ids = Arc::clone(policy_ids);
            ev.reason = Some(format!(
                "inside the DO block `{}`, decided with it; ran if the block reached it",
                truncate(block.text.to_string(), 200)
            ));
            if let Some(s) = ev.statement.as_mut() {
                s.sqlstate = sqlstate.map(str::to_string);
            }
            self.proxy.audit().record(ev);
        }
    }

    /// What the client is shown of a server error or notice while a masking profile applies;
    /// `None`: as it is. Every error and notice is withheld whole, SQLSTATE kept, when the
    /// statement reads a column a rule of the profile selects, or one before it in the
    /// transaction did: rules select by column, not content, so nothing in the text could be
    /// told apart. No class of SQLSTATE is safe to pass: a failed cast quotes its input (22),
    /// a key its value (23, also at COMMIT for a deferred constraint, from a row an earlier
    /// statement wrote), a name looked up at run time its text (`current_setting(email)`,
    /// `nextval(email)`: 42704, 3F000), and `RAISE ... USING ERRCODE` chooses any SQLSTATE
    /// and puts a value in the message or in the schema, table, column, datatype and
    /// constraint fields. Otherwise the content detectors mask its free-text fields.
    fn screen_error(&mut self, fields: &ErrorFields, notice: bool) -> Option<ErrorFields> {
        let profile = self
            .reads_selected_columns()
            .or_else(|| self.read_selected_in_transaction.clone());
        if let Some(profile) = profile {
            let sqlstate = fields.sqlstate().unwrap_or_default();
            return Some(ErrorFields::new(
                fields.severity().unwrap_or("ERROR"),
                sqlstate,
                format!(
                    "Portcullis: the server's {what} {sqlstate} is withheld: the statement reads columns that masking profile `{profile}` selects (or one before it in the transaction did), and its text may quote their values",
                    what = if notice { "notice" } else { "error" }
                ),
            ));
        }
        self.current_masker()
            .and_then(|m| mask_error_text(&m, fields))
    }

    /// [`reads_selected_columns`] of the statement running.
    fn reads_selected_columns(&mut self) -> Option<Arc<str>> {
        reads_selected_columns(self.current_running()?)
    }

    /// A reported parameter's value as the client is shown it while a masking profile
    /// applies; `None`: as it is. `SELECT set_config('application_name', email, false) FROM
    /// customers` would report the value in a ParameterStatus, outside the result: free-text
    /// settings go through the detectors, and are withheld in a transaction that read what a
    /// column rule could select (the server reports changes just before ReadyForQuery, when
    /// that statement is complete). Other reported settings take only constrained values.
    fn screen_parameter(&self, name: &str, value: &str) -> Option<String> {
        if !matches!(name, "application_name" | "search_path") {
            return None;
        }
        if let Some(profile) = &self.read_selected_in_transaction {
            return Some(withheld_value(profile));
        }
        self.current_masker().and_then(|m| m.mask_text(value))
    }

    /// A notification's payload as the client is shown it: through the detectors of the
    /// session's profile, and withheld while the transaction that may have sent it read what
    /// a column rule could select (`SELECT pg_notify('c', email) FROM customers` in a session
    /// that listens on `c` gets the notification at commit).
    fn screen_notification(&self, payload: &str) -> Option<String> {
        if let Some(profile) = &self.read_selected_in_transaction {
            return Some(withheld_value(profile));
        }
        self.session_masker
            .as_ref()
            .and_then(|m| m.mask_text(payload))
    }

    fn on_error(&mut self, fields: ErrorFields, to_client: &mut BytesMut) -> Flow {
        if let Some(Expect::Denied(_)) = self.expect.front() {
            let Some(Expect::Denied(e)) = self.expect.pop_front() else {
                return Flow::Continue;
            };
            if !fields.message().is_some_and(|m| m.contains(DENIED_MARKER))
                && fields.sqlstate() != Some("26000")
            {
                tracing::warn!(
                    server = fields.message().unwrap_or(""),
                    "the server's answer to a denied statement was not the expected error"
                );
            }
            encode_error_response(&e.to_fields(), to_client);
            self.drop_until_sync();
            return Flow::Continue;
        }
        let code = fields.sqlstate().map(str::to_string);
        if fields.severity() == Some("FATAL") || fields.severity() == Some("PANIC") {
            let masked = self.screen_error(&fields, false);
            let shown = masked.as_ref().unwrap_or(&fields);
            encode_error_response(shown, to_client);
            // The audit trail gets the message as the client saw it, masked.
            return Flow::End(format!(
                "the server ended the session: {}",
                shown.message().unwrap_or("")
            ));
        }
        let masked = self.screen_error(&fields, false);
        encode_error_response(masked.as_ref().unwrap_or(&fields), to_client);
        self.copy_out = None;
        match self.expect.front_mut() {
            Some(Expect::Query(q)) => {
                q.failed = true;
                if let Some(r) = q.statements.pop_front() {
                    let rest: Vec<Running> = q.statements.drain(..).collect();
                    self.finish_statement(r, None, code);
                    for other in rest {
                        self.record_statement(
                            &other.info,
                            &Arc::from([]),
                            None,
                            Decision::NotRun,
                            &other.verdict.policy_ids,
                            None,
                            None,
                            None,
                            None,
                        );
                    }
                }
            }
            Some(Expect::FunctionCall { .. }) => {}
            _ => {
                if let Some(Expect::Execute(_)) = self.expect.front() {
                    if let Some(Expect::Execute(r)) = self.expect.pop_front() {
                        self.finish_statement(*r, None, code);
                    }
                }
                self.drop_until_sync();
            }
        }
        Flow::Continue
    }

    /// After an error the server skips everything up to Sync; so do the expected replies.
    fn drop_until_sync(&mut self) {
        while let Some(front) = self.expect.front() {
            match front {
                Expect::Sync | Expect::Query(_) | Expect::FunctionCall { .. } => break,
                Expect::Execute(_) => {
                    if let Some(Expect::Execute(r)) = self.expect.pop_front() {
                        self.record_statement(
                            &r.info,
                            &r.parameters,
                            None,
                            Decision::NotRun,
                            &r.verdict.policy_ids,
                            None,
                            None,
                            None,
                            None,
                        );
                    }
                }
                _ => {
                    self.expect.pop_front();
                }
            }
        }
    }

    /// Statements the server never finished because the session ended.
    fn abandon_running(&mut self, why: &str) {
        while let Some(e) = self.expect.pop_front() {
            let running: Vec<Running> = match e {
                Expect::Execute(r) => vec![*r],
                Expect::Query(q) => q.statements.into_iter().collect(),
                _ => Vec::new(),
            };
            for r in running {
                let mut ev =
                    self.statement_event(EventKind::StatementExecuted, &r.info, &r.parameters);
                ev.decision = Some(Decision::Allow);
                ev.policy_ids = Arc::clone(&r.verdict.policy_ids);
                ev.reason = Some(format!("unfinished: {why}"));
                self.proxy.audit().record(ev);
            }
        }
    }

    fn statement_event(
        &self,
        kind: EventKind,
        info: &StatementInfo,
        parameters: &Arc<[Option<String>]>,
    ) -> AuditEvent {
        let c = self.conn;
        let mut ev = AuditEvent::new(kind);
        ev.connection_id = Some(c.id);
        ev.protocol = Some(c.protocol.name());
        ev.target = Some(Arc::clone(&c.target));
        ev.identity = Some(Arc::clone(&c.identity));
        ev.origin = Some(Arc::clone(&c.origin));
        ev.client = Some(Arc::clone(&self.client_addr));
        ev.upstream = Some(Arc::clone(&self.upstream_addr));
        ev.db_user = Some(Arc::clone(&self.db_user));
        ev.db_name = Some(Arc::clone(&self.db_name));
        ev.statement = Some(Box::new(StatementFields {
            statement: Arc::clone(&info.text),
            parameters: Arc::clone(parameters),
            statement_class: info.class,
            command: info.command.clone(),
            tables: Arc::clone(&info.tables),
            functions: Arc::clone(&info.functions),
            ..StatementFields::default()
        }));
        ev
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "the fields of one statement event"
    )]
    fn record_statement(
        &self,
        info: &StatementInfo,
        parameters: &Arc<[Option<String>]>,
        masking_profile: Option<Arc<str>>,
        decision: Decision,
        policy_ids: &Arc<[String]>,
        rows: Option<u64>,
        tag: Option<String>,
        sqlstate: Option<String>,
        duration_us: Option<u64>,
    ) {
        let reason = (decision == Decision::NotRun)
            .then_some("not run: an earlier statement or message failed");
        let statement = || {
            info.encoded.get_or_init(|| {
                StatementEventParts::statement_fields(
                    &info.text,
                    info.class,
                    info.command.as_deref(),
                    &info.tables,
                    &info.functions,
                )
            })
        };
        let encoded = match (&self.event_parts, statement()) {
            (Ok(parts), Ok(statement)) => parts.encode(&StatementRecord {
                kind: EventKind::StatementExecuted,
                time_ms: crate::audit::now_ms(),
                reason,
                decision,
                policy_ids,
                statement,
                parameters,
                rows,
                command_tag: tag.as_deref(),
                sqlstate: sqlstate.as_deref(),
                duration_us,
                masking_profile: masking_profile.as_deref(),
            }),
            (Err(e), _) | (_, Err(e)) => Err(e.clone()),
        };
        match encoded {
            Ok(line) => return self.proxy.audit().record_encoded(line),
            // Not reachable for strings and numbers; if it were, the event goes the general
            // way, which logs why it cannot be written.
            Err(e) => tracing::error!(error = %e, "cannot write a statement event from its parts"),
        }
        let mut ev = self.statement_event(EventKind::StatementExecuted, info, parameters);
        ev.decision = Some(decision);
        ev.policy_ids = Arc::clone(policy_ids);
        ev.reason = reason.map(Into::into);
        if let Some(s) = ev.statement.as_mut() {
            s.rows = rows;
            s.command_tag = tag;
            s.sqlstate = sqlstate;
            s.duration_us = duration_us;
            s.masking_profile = masking_profile;
        }
        self.proxy.audit().record(ev);
    }

    fn record_denied(
        &self,
        info: &StatementInfo,
        decision: Decision,
        policy_ids: &[String],
        reason: &str,
        sqlstate: &str,
    ) {
        let mut ev = self.statement_event(EventKind::StatementDenied, info, &Arc::from([]));
        ev.decision = Some(decision);
        ev.policy_ids = policy_ids.into();
        ev.reason = Some(reason.to_string());
        if let Some(s) = ev.statement.as_mut() {
            s.sqlstate = Some(sqlstate.to_string());
        }
        tracing::info!(statement = %info.text, %decision, reason, "statement refused");
        self.proxy.audit().record(ev);
    }
}

/// A ParameterStatus saying `standard_conforming_strings` is now off, or `client_encoding` is
/// now one whose characters can hide a quote (SJIS, BIG5, …): changed where the agent cannot
/// see it (a function's body), so the statements that follow would be read other than as
/// checked. The session ends.
fn string_syntax_changed(name: &str, value: &str) -> Option<PgError> {
    let read_as = match name {
        "standard_conforming_strings" if value != "on" => "string literals with",
        "client_encoding" if !portcullis_sql::is_ascii_safe_encoding(value) => "statements in",
        _ => return None,
    };
    Some(PgError::Refused(format!(
        "the server now reads {read_as} {name} = {value}; the session is closed because its statements could run other than as checked"
    )))
}

/// What the client is told, and the decision recorded, for SQL the classifier would not
/// pass: a syntax error (or anything it cannot read) is an `error`; a statement refused
/// whatever the policy is a `deny` with SQLSTATE 42501.
fn refusal(e: portcullis_sql::ClassifyError) -> (PgError, Decision) {
    match e {
        portcullis_sql::ClassifyError::Refused { message } => {
            (PgError::Unsafe(message), Decision::Deny)
        }
        other => (PgError::Unparsable(other.to_string()), Decision::Error),
    }
}

/// The walsender command a replication connection sends (PostgreSQL docs, "Streaming
/// Replication Protocol"), if `sql` is one.
fn replication_command(sql: &str) -> Option<&'static str> {
    const COMMANDS: [&str; 8] = [
        "IDENTIFY_SYSTEM",
        "TIMELINE_HISTORY",
        "CREATE_REPLICATION_SLOT",
        "READ_REPLICATION_SLOT",
        "DROP_REPLICATION_SLOT",
        "ALTER_REPLICATION_SLOT",
        "START_REPLICATION",
        "BASE_BACKUP",
    ];
    let first = sql.split_whitespace().next()?.trim_end_matches(';');
    COMMANDS.into_iter().find(|c| c.eq_ignore_ascii_case(first))
}

/// The names (`pg_proc.proname`) a called function's name as the classifier lists it may
/// stand for: the classifier joins a qualified name's parts with `.`, and a quoted part may
/// hold a `.` itself, so every suffix is one (`a.b.c`: `a.b.c`, `b.c`, `c`), except the
/// name after exactly `pg_catalog.`: one of PostgreSQL's own, which only a superuser changes.
fn routine_candidates(called: &str) -> Vec<&str> {
    let mut names = vec![called];
    for (at, _) in called.match_indices('.') {
        if let (Some(schema), Some(name)) = (called.get(..at), called.get(at + 1..)) {
            if schema != "pg_catalog" && !name.is_empty() {
                names.push(name);
            }
        }
    }
    names
}

/// Whether a statement may change what a function or procedure runs, or which one a name
/// finds: creating, replacing, altering or dropping one (or an extension or language, which
/// bring their own), or SQL the agent could not read.
fn may_change_routines(command: Option<&str>, dynamic_sql: bool) -> bool {
    if dynamic_sql {
        return true;
    }
    let Some((verb, object)) = command.and_then(|c| c.split_once(' ')) else {
        return false;
    };
    matches!(verb, "CREATE" | "ALTER" | "DROP")
        && [
            "FUNCTION",
            "PROCEDURE",
            "ROUTINE",
            "EXTENSION",
            "LANGUAGE",
            "AGGREGATE",
        ]
        .iter()
        .any(|kind| object.contains(kind))
}

/// A NUL-terminated string at the start of a message body, and what follows it.
fn cstring(bytes: &[u8]) -> Option<(&str, &[u8])> {
    let end = bytes.iter().position(|&b| b == 0)?;
    let text = std::str::from_utf8(bytes.get(..end)?).ok()?;
    Some((text, bytes.get(end + 1..)?))
}

fn unparsed(sql: &str) -> StatementInfo {
    StatementInfo {
        text: sql.into(),
        class: None,
        command: None,
        tables: Arc::from([]),
        functions: Arc::from([]),
        copy: None,
        sources: None,
        named: None,
        inner: Arc::from([]),
        dynamic_sql: false,
        shape_hash: std::sync::OnceLock::new(),
        encoded: std::sync::OnceLock::new(),
    }
}

/// A fast-path call of a function that runs SQL given as text (`names`: the function's), under
/// a profile with column rules that does not allow it: let through only when the function's
/// first argument is its query, sent as text, and that query reads nothing a column rule
/// could select (read like a statement, whose every column reference counts). Its result
/// then goes through the detectors, as a computed value's does. `Err`: the refusal and the
/// policies that had allowed the call.
fn fast_path_sql_text(
    verdict: &Verdict,
    names: &[String],
    call: &FunctionCall<'_>,
) -> Result<(), (PgError, Vec<String>)> {
    let Some((profile, masker)) = &verdict.masker else {
        return Ok(());
    };
    let Some(function) = masker.refused_sql_text_function(names.iter().map(String::as_str)) else {
        return Ok(());
    };
    let text_format = match call.arg_formats {
        [] => true,
        [one, ..] => *one == 0,
    };
    let query = call
        .args
        .first()
        .and_then(Option::as_ref)
        .filter(|_| text_format && portcullis_policy::takes_query_text(function))
        .and_then(|q| std::str::from_utf8(q).ok());
    let readable = query
        .and_then(|q| portcullis_sql::classify(q).ok())
        .is_some_and(|statements| {
            !statements.is_empty()
                && statements.iter().all(|st| {
                    st.result_sources.as_ref().is_some_and(|s| {
                        let plan = masker.plan_derived(
                            "",
                            s.all
                                .iter()
                                .map(|r| (r.table.as_deref(), r.column.as_deref())),
                        );
                        !matches!(plan, ColumnPlan::Whole { .. })
                    })
                })
        });
    if readable {
        return Ok(());
    }
    let ids = verdict.policy_ids.to_vec();
    Err((
        PgError::StatementDenied {
            reason: format!(
                "`{function}` runs SQL given as text, and its query reads what masking profile `{profile}` selects by column (or cannot be read); the profile may allow it with `allow_sql_text_functions`"
            ),
            policy_ids: ids.clone(),
        },
        ids,
    ))
}

/// How each column of a result is masked; `qualify` names the table column a result column
/// is read from, from the catalog cache.
fn plan_rows(
    masker: &Masker,
    fields: &[FieldDescription],
    qualify: impl Fn(u32, i16) -> Option<super::catalog::ColumnName>,
    view: impl Fn(u32) -> Option<Option<Arc<portcullis_sql::ResultSources>>>,
    derived: &Derived,
) -> Result<RowPlan, PgError> {
    let mut columns = Vec::with_capacity(fields.len());
    let mut nulled = Vec::with_capacity(fields.len());
    let mut masks_anything = false;
    let column_rules = masker.has_column_rules();
    // A computed value a rule selects, of a type that cannot carry the mask's text.
    let null_if_typed = |plan: &ColumnPlan, type_oid: u32| {
        matches!(plan, ColumnPlan::Whole { .. }) && !Masker::holds_text(type_oid)
    };
    for (i, f) in fields.iter().enumerate() {
        if (f.table_oid == 0 || f.column_attr == 0) && column_rules {
            // Computed by the query, or a whole row (`SELECT c FROM t c`, attribute 0):
            // masked by what it is computed from.
            let plan = match derived {
                Derived::Known(sources) => {
                    plan_from_sources(masker, &f.name, Some(sources), i, Some(fields.len()))
                }
                Derived::Unknown => plan_from_sources(masker, &f.name, None, i, None),
                Derived::NotAQuery => masker.plan_column(&f.name, None),
            };
            masks_anything |= !matches!(plan, ColumnPlan::Untouched);
            nulled.push(null_if_typed(&plan, f.type_oid));
            columns.push((plan, f.format, f.type_oid));
            continue;
        }
        let origin = if masker.needs_column_origins() && f.table_oid != 0 {
            // Resolved before this message was handled; a miss means the catalog did not
            // know the column (dropped meanwhile): refuse rather than guess.
            Some(qualify(f.table_oid, f.column_attr).ok_or_else(|| {
                PgError::Unmaskable(format!(
                    "the table of result column `{}` could not be resolved for masking; the session is closed so no unmasked value leaves",
                    f.name
                ))
            })?)
        } else {
            None
        };
        // By its label and by the column it is read from: an alias does not unmask it.
        let mut plan = masker.plan_column(&f.name, origin.as_ref().map(|o| o.origin()));
        let mut derived_plan = false;
        if !matches!(plan, ColumnPlan::Whole { .. }) && masker.needs_column_origins() {
            // A view's column comes from what its definition computes it from.
            if let Some(sources) = view(f.table_oid) {
                // Attribute numbers of a view's columns start at 1.
                let index = usize::try_from(f.column_attr - 1).unwrap_or(usize::MAX);
                plan = plan_from_sources(masker, &f.name, sources.as_deref(), index, None);
                derived_plan = true;
            }
        }
        if !matches!(plan, ColumnPlan::Whole { .. }) && column_rules {
            // A column a write of this statement stored a value in shows that value under
            // the column's own name (RETURNING, or a query reading a data-modifying WITH).
            if let Derived::Known(sources) = derived {
                let column = origin
                    .as_ref()
                    .map_or(f.name.as_str(), |o| o.column.as_str());
                let stored = sources
                    .assigned
                    .iter()
                    .filter(|a| a.column.as_deref().is_none_or(|c| c == column))
                    .flat_map(|a| a.from.iter())
                    .map(|r| (r.table.as_deref(), r.column.as_deref()));
                let by_stored = masker.plan_derived(&f.name, stored);
                if matches!(by_stored, ColumnPlan::Whole { .. }) {
                    plan = by_stored;
                    derived_plan = true;
                }
            }
        }
        masks_anything |= !matches!(plan, ColumnPlan::Untouched);
        nulled.push(derived_plan && null_if_typed(&plan, f.type_oid));
        columns.push((plan, f.format, f.type_oid));
    }
    Ok(RowPlan {
        columns,
        nulled,
        masks_anything,
    })
}

/// How a value computed from `sources` (column `index` of a result `width` wide; `None`
/// sources: computed from anything) is masked.
fn plan_from_sources(
    masker: &Masker,
    name: &str,
    sources: Option<&portcullis_sql::ResultSources>,
    index: usize,
    width: Option<usize>,
) -> ColumnPlan {
    match sources {
        Some(s) => masker.plan_derived(
            name,
            s.of_column(index, width)
                .iter()
                .map(|r| (r.table.as_deref(), r.column.as_deref())),
        ),
        None => masker.plan_derived(name, [(None, None)]),
    }
}

/// The values of a Bind or a function call as the audit trail shows them; `formats` as the
/// protocol gives them (none: all text, one: for all, else one per value).
fn audit_parameters(
    values: &[Option<Bytes>],
    formats: &[i16],
    masker: Option<&Masker>,
) -> Arc<[Option<String>]> {
    values
        .iter()
        .enumerate()
        .map(|(i, p)| {
            p.as_ref().map(|v| {
                let format = match formats {
                    [] => 0,
                    [one] => *one,
                    many => many.get(i).copied().unwrap_or(0),
                };
                audit_parameter(v, format, masker)
            })
        })
        .collect()
}

/// The masking profile of a statement, if it has column rules and the statement reads
/// anything one of them could select: a column its parse tree references, else any column of
/// a table it touches (a write without RETURNING), else anything at all (a `DO` block or a
/// procedure, whose bodies the agent does not see).
fn reads_selected_columns(r: &Running) -> Option<Arc<str>> {
    let (profile, masker) = r.verdict.masker.as_ref()?;
    if !masker.has_column_rules() {
        return None;
    }
    let plan = match (&r.info.sources, r.info.class) {
        (Some(s), _) => masker.plan_derived(
            "",
            s.all
                .iter()
                .map(|r| (r.table.as_deref(), r.column.as_deref())),
        ),
        (None, Some("do" | "call")) => masker.plan_derived("", [(None, None)]),
        (None, _) => {
            masker.plan_derived("", r.info.tables.iter().map(|t| (Some(t.as_str()), None)))
        }
    };
    matches!(plan, ColumnPlan::Whole { .. }).then(|| Arc::clone(profile))
}

/// What the client gets in place of a value outside the rows that may carry what a column
/// rule selects.
fn withheld_value(profile: &str) -> String {
    format!(
        "[withheld by Portcullis: a statement read columns that masking profile {profile} selects]"
    )
}

/// A bound parameter as the audit trail shows it: text as text (content detectors of the
/// session's profile applied), binary as hex.
fn audit_parameter(value: &[u8], format: i16, masker: Option<&Masker>) -> String {
    const MAX: usize = 4096;
    if format == 0 {
        if let Ok(text) = std::str::from_utf8(value) {
            let text = masker
                .and_then(|m| m.mask_text(text))
                .unwrap_or_else(|| text.to_string());
            return truncate(text, MAX);
        }
    }
    if masker.is_some() {
        return "[binary value withheld: masking is active]".into();
    }
    let mut s = String::from("\\x");
    s.push_str(&hex::encode(value.get(..MAX / 2).unwrap_or(value)));
    s
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

/// The fields of an error or notice that carry free text, where a value can leave instead of
/// in a row (a cast's error quotes the value it could not read; RAISE puts anything in any of
/// them): message, detail, hint, context, and the internal query.
const TEXT_FIELDS: [u8; 5] = [b'M', b'D', b'H', b'W', b'q'];

/// An error or notice with the content detectors applied to its free-text fields; `None` if
/// they found nothing.
fn mask_error_text(masker: &Masker, fields: &ErrorFields) -> Option<ErrorFields> {
    let mut out: Option<ErrorFields> = None;
    for code in TEXT_FIELDS {
        let Some(masked) = fields.get(code).and_then(|text| masker.mask_text(text)) else {
            continue;
        };
        out.get_or_insert_with(|| fields.clone()).set(code, masked);
    }
    out
}

/// The agent's catalog query for a simple-query `COPY table TO STDOUT` whose rows it masks by
/// column or in binary, and the COPY's column list; `None` when the statement needs none.
/// The table name goes through `to_regclass`, so it resolves with the session's own
/// search_path, exactly as the COPY will.
fn copy_columns_query(r: &Running) -> Option<(String, Vec<String>)> {
    use portcullis_sql::{CopyFormat, CopySource};
    let copy = r.info.copy.as_ref()?;
    let (_, masker) = r.verdict.masker.as_ref()?;
    let CopySource::Table {
        schema,
        table,
        columns,
    } = &copy.source
    else {
        return None;
    };
    if !masker.has_column_rules() && copy.format != CopyFormat::Binary {
        return None;
    }
    let ident = |name: &str| format!("\"{}\"", name.replace('"', "\"\""));
    let name = match schema {
        Some(schema) => format!("{}.{}", ident(schema), ident(table)),
        None => ident(table),
    };
    let literal = name.replace('\\', "\\\\").replace('\'', "''");
    let sql = format!(
        "SELECT n.nspname, c.relname, a.attname, a.atttypid::pg_catalog.int8, a.attgenerated <> '' \
         FROM pg_catalog.pg_attribute a \
         JOIN pg_catalog.pg_class c ON c.oid = a.attrelid \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE a.attrelid = pg_catalog.to_regclass(E'{literal}') AND a.attnum > 0 AND NOT a.attisdropped \
         ORDER BY a.attnum /* portcullis: columns of a masked COPY */"
    );
    Some((sql, columns.clone()))
}

/// A row's values after masking (`None` is NULL).
type MaskedRow = Vec<Option<Vec<u8>>>;

/// Masks one CopyData payload of a COPY masked value by value: `Ok(None)` forwards it
/// unchanged, `Ok(Some)` replaces it, `Err` says why it cannot be sent.
fn mask_copy_payload(
    masker: &Masker,
    columns: &[(ColumnPlan, u32)],
    format: CopyRowFormat,
    header: bool,
    body: &[u8],
) -> Result<Option<Vec<u8>>, String> {
    use portcullis_pgwire::BinaryPart;
    let mask = |values: &mut dyn Iterator<Item = Option<&[u8]>>,
                format_code: i16|
     -> Result<(MaskedRow, bool), String> {
        let mut out = Vec::with_capacity(columns.len());
        let mut changed = false;
        let mut count = 0;
        for (i, value) in values.enumerate() {
            count += 1;
            let Some((plan, type_oid)) = columns.get(i) else {
                return Err(format!(
                    "a COPY row has more than the {} columns looked up",
                    columns.len()
                ));
            };
            let masked = match value {
                None => None,
                Some(v) => masker
                    .mask_value(plan, format_code, *type_oid, v)
                    .map_err(|e| format!("COPY column {} cannot be masked ({e})", i + 1))?,
            };
            changed |= masked.is_some();
            out.push(masked.or_else(|| value.map(<[u8]>::to_vec)));
        }
        if count != columns.len() {
            return Err(format!(
                "a COPY row has {count} columns where {} were looked up",
                columns.len()
            ));
        }
        Ok((out, changed))
    };
    match format {
        CopyRowFormat::Text { .. } | CopyRowFormat::Csv { .. } if header => Ok(None),
        CopyRowFormat::Text { delimiter } => {
            let fields = portcullis_pgwire::split_text_row(body, delimiter)
                .map_err(|e| format!("a COPY row does not split: {e}"))?;
            let (values, changed) = mask(&mut fields.iter().map(|f| f.as_deref()), 0)?;
            if !changed {
                return Ok(None);
            }
            let mut out = Vec::with_capacity(body.len());
            portcullis_pgwire::join_text_row(&values, delimiter, &mut out);
            Ok(Some(out))
        }
        CopyRowFormat::Csv { delimiter, quote } => {
            let fields = portcullis_pgwire::split_csv_row(body, delimiter, quote)
                .map_err(|e| format!("a COPY row does not split: {e}"))?;
            let (values, changed) = mask(&mut fields.iter().map(|f| f.as_deref()), 0)?;
            if !changed {
                return Ok(None);
            }
            let mut out = Vec::with_capacity(body.len());
            portcullis_pgwire::join_csv_row(&values, delimiter, quote, &mut out);
            Ok(Some(out))
        }
        CopyRowFormat::Binary => {
            let parts = portcullis_pgwire::split_binary(body, header)
                .map_err(|e| format!("binary COPY data does not split: {e}"))?;
            let mut out = Vec::with_capacity(body.len());
            let mut any = false;
            for part in parts {
                match part {
                    BinaryPart::Header(h) => out.extend_from_slice(h),
                    BinaryPart::Trailer => {
                        out.extend_from_slice(&portcullis_pgwire::BINARY_TRAILER)
                    }
                    BinaryPart::Tuple(values) => {
                        let (values, changed) = mask(&mut values.into_iter(), 1)?;
                        any |= changed;
                        let refs: Vec<Option<&[u8]>> =
                            values.iter().map(|v| v.as_deref()).collect();
                        portcullis_pgwire::join_binary_tuple(&refs, &mut out)
                            .map_err(|e| e.to_string())?;
                    }
                }
            }
            Ok(any.then_some(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Portals, MAX_KEPT_BYTES, MAX_KEPT_NAMES};

    /// What the portals cost follows every way one ends, so the budget frees as they go; past
    /// the budget a new name has no room, while a name already kept may be bound again.
    #[test]
    fn portal_budget_follows_binds_closes_and_transaction_ends() {
        let mut portals = Portals::new();
        portals.bind("a".to_string(), 10, 10);
        portals.bind("b".to_string(), 20, 20);
        portals.bind("a".to_string(), 5, 5);
        assert_eq!(portals.bytes, 25, "rebinding replaces the cost");
        portals.close("b");
        assert_eq!(portals.bytes, 5);
        portals.ready_sent();
        portals.bind("c".to_string(), 7, 7);
        portals.ready_received(true);
        assert_eq!(
            portals.bytes, 7,
            "a ended with its transaction, c was bound after"
        );
        portals.close_all();
        assert_eq!((portals.bytes, portals.len()), (0, 0));

        portals.bind("big".to_string(), MAX_KEPT_BYTES, MAX_KEPT_BYTES);
        assert!(!portals.has_room_for("other"), "the bytes are spent");
        assert!(portals.has_room_for("big"), "its own name replaces it");
        portals.close("big");
        for i in 0..MAX_KEPT_NAMES {
            portals.bind(format!("p{i}"), 1, 1);
        }
        assert!(!portals.has_room_for("one more"), "the names are spent");
        portals.close("p0");
        assert!(portals.has_room_for("one more"));
    }

    /// A portal lives until its transaction ends, as in the server, also when the client
    /// pipelines the next transaction's Bind before the last one's ReadyForQuery arrived; a
    /// session binding a new named portal in each of many transactions keeps only the live one.
    #[test]
    fn portals_end_with_their_transaction_even_when_pipelined() {
        let mut portals = Portals::new();
        // Implicit transaction: Bind, Execute, Sync, and the next Bind before the answer.
        portals.bind("p1".to_string(), 1, 0);
        portals.ready_sent();
        portals.bind("p2".to_string(), 2, 0);
        portals.ready_received(true);
        assert_eq!(portals.get("p1"), None, "ended with its Sync");
        assert_eq!(
            portals.get("p2"),
            Some(&2),
            "bound after that Sync: still live"
        );
        portals.ready_sent();
        portals.ready_received(true);
        assert_eq!(portals.len(), 0);

        // Explicit transaction: BEGIN, Bind + Sync inside, then COMMIT.
        portals.ready_sent(); // BEGIN
        portals.ready_received(false);
        portals.bind("c1".to_string(), 3, 0);
        portals.ready_sent(); // Sync
        portals.ready_received(false);
        assert_eq!(portals.get("c1"), Some(&3), "the transaction is still open");
        portals.ready_sent(); // COMMIT
        portals.bind(String::new(), 4, 0); // pipelined behind the COMMIT
        portals.ready_received(true);
        assert_eq!(portals.get("c1"), None, "ended at COMMIT");
        assert_eq!(portals.get(""), Some(&4));
        portals.close("");
        assert_eq!(portals.len(), 0);

        // Whether the server still has a portal is certain only when no message that could
        // end its transaction is unanswered since its Bind.
        portals.ready_sent(); // BEGIN
        portals.ready_received(false);
        portals.bind("k".to_string(), 5, 0);
        assert!(portals.certainly_live("k"), "bound in this segment");
        portals.ready_sent(); // Sync, unanswered
        assert!(!portals.certainly_live("k"), "may have ended with the Sync");
        portals.ready_received(false);
        assert!(
            portals.certainly_live("k"),
            "the Sync left the transaction open"
        );
        assert!(!portals.certainly_live("other"));
        portals.ready_sent(); // COMMIT
        portals.ready_received(true);
        assert!(!portals.certainly_live("k"));

        for i in 0..10_000 {
            portals.bind(format!("cursor_{i}"), i, 0);
            portals.ready_sent();
            portals.ready_received(true);
        }
        assert_eq!(portals.len(), 0, "no portal outlives its transaction");
    }

    /// Every `pg_proc` name a called name may stand for: a quoted part may hold a `.`, so
    /// every suffix is looked up, except the name after exactly `pg_catalog.`.
    #[test]
    fn a_called_name_is_looked_up_under_every_name_it_may_stand_for() {
        use super::routine_candidates;
        let rows: &[(&str, &[&str])] = &[
            ("purge", &["purge"]),
            ("app.purge", &["app.purge", "purge"]),
            ("db.app.purge", &["db.app.purge", "app.purge", "purge"]),
            // PostgreSQL's own, or a function named "pg_catalog.now" in another schema.
            ("pg_catalog.now", &["pg_catalog.now"]),
            // A schema named "x.pg_catalog" is not pg_catalog.
            (
                "x.pg_catalog.now",
                &["x.pg_catalog.now", "pg_catalog.now", "now"],
            ),
            ("oid:1234", &["oid:1234"]),
        ];
        for &(called, want) in rows {
            assert_eq!(routine_candidates(called), want, "{called}");
        }
    }

    /// The statements after which a call's body read over the agent's own connection may not
    /// be the one the call runs, until the transaction ends.
    #[test]
    fn statements_that_may_change_a_function_are_known() {
        use super::may_change_routines;
        let rows: &[(Option<&str>, bool, bool)] = &[
            (Some("CREATE FUNCTION"), false, true),
            (Some("CREATE PROCEDURE"), false, true),
            (Some("ALTER FUNCTION"), false, true),
            (Some("ALTER ROUTINE"), false, true),
            (Some("DROP PROCEDURE"), false, true),
            (Some("CREATE EXTENSION"), false, true),
            (Some("ALTER EXTENSION"), false, true),
            (Some("CREATE LANGUAGE"), false, true),
            (Some("CREATE AGGREGATE"), false, true),
            (Some("DO"), true, true),
            (Some("SELECT"), true, true),
            (Some("DO"), false, false),
            (Some("SELECT"), false, false),
            (Some("CREATE TABLE"), false, false),
            (Some("DROP TABLE"), false, false),
            (Some("CALL"), false, false),
            (None, false, false),
        ];
        for &(command, dynamic, want) in rows {
            assert_eq!(
                may_change_routines(command, dynamic),
                want,
                "{command:?} dynamic {dynamic}"
            );
        }
    }
}
