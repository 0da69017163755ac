//! One PostgreSQL session after start-up, as a machine without I/O: it takes the client's
//! and the server's bytes, the time, the policy set and the catalog's answers, and gives
//! back what to send each side, the audit events to record, the catalog lookup it waits for
//! and why the session ends. It classifies and decides every statement before the server
//! sees it, masks result values, and builds one audit event per statement. The relay
//! (`relay`) owns the sockets, timers, cancel and audit queue and runs what it gives back.
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
//! One job per file: `names` (prepared statements, portals and their budget), `expect` (the
//! reply queue), `client` and `server` (each side's messages), `decide` (policy decisions and
//! their cache), `lookup` (what a message needs from the catalog before it is handled),
//! `masking`, `record` (audit events), `relay` (the async glue).
//!
//! Protocol: PostgreSQL docs, "Message Flow" → "Simple Query", "Extended Query",
//! "Pipelining", "COPY Operations", "Function Call", "Asynchronous Operations".

mod client;
mod decide;
mod expect;
mod lookup;
mod masking;
mod names;
mod record;
mod relay;
mod server;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use portcullis_pgwire::{
    decode_frame, encode_data_row, encode_error_response, encode_frontend, parse_backend,
    parse_frontend, BackendMessage, ErrorFields, FieldDescription, FrontendMessage, RawMessage,
    TransactionStatus,
};
use portcullis_policy::{Action, ColumnPlan, Masker, Obligation, PolicySet, Request};

use super::catalog::{ColumnName, Routine};
use super::error::{sqlstate, PgError};
use crate::audit::Decision;
use crate::audit::{
    AuditEvent, EventKind, StatementEncoded, StatementEventParts, StatementFields, StatementRecord,
};

use decide::*;
use expect::*;
use lookup::*;
use masking::*;
use names::*;
use record::*;

pub use relay::{run, Established};

/// The time, read by the relay once per input: the machine never reads a clock.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    /// Wall-clock milliseconds since the Unix epoch: events' times, policies' hours.
    pub unix_ms: u64,
    /// For statements' durations.
    pub monotonic: Instant,
}

/// What the session's catalog lookups have read (`catalog::Catalog`, shared by every session
/// of the agent): the machine reads it and asks for a lookup (`Output::lookup`) when what a
/// message needs is not there or not fresh.
pub trait CatalogView {
    /// The table column a result column is read from, if known and fresh.
    fn column(&self, target_id: u32, db: &str, table_oid: u32, attnum: i16) -> Option<ColumnName>;
    /// For a known, fresh view: what its columns are computed from (`Some(None)`: unknown).
    fn view_sources(
        &self,
        target_id: u32,
        db: &str,
        table_oid: u32,
    ) -> Option<Option<Arc<portcullis_sql::ResultSources>>>;
    /// A function's names (`name` and `schema.name`) if known and fresh.
    fn function_names(&self, target_id: u32, db: &str, oid: u32) -> Option<Arc<[String]>>;
    /// The functions and procedures named `name`, if read less than `max_age` ago.
    fn routines(
        &self,
        target_id: u32,
        db: &str,
        name: &str,
        max_age: Duration,
    ) -> Option<Arc<[Routine]>>;
    fn is_fresh(&self, target_id: u32, db: &str, table_oid: u32) -> bool;
}

/// The compiled maskers of the profiles of one policy set, shared by every session; built
/// with the agent's masking key, so keyed-hash masks stay joinable across restarts.
pub struct Maskers {
    key: Vec<u8>,
    cache: Mutex<MaskerCache>,
}

#[derive(Default)]
struct MaskerCache {
    set: Weak<PolicySet>,
    by_profile: HashMap<String, Arc<Masker>>,
}

impl Maskers {
    pub fn new(key: Vec<u8>) -> Self {
        Self {
            key,
            cache: Mutex::new(MaskerCache::default()),
        }
    }

    /// The compiled masker of a profile in the policy set that made the decision.
    fn masker(&self, set: &Arc<PolicySet>, profile: &str) -> Option<Arc<Masker>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if !std::ptr::eq(cache.set.as_ptr(), Arc::as_ptr(set)) {
            cache.set = Arc::downgrade(set);
            cache.by_profile.clear();
        }
        if let Some(m) = cache.by_profile.get(profile) {
            return Some(Arc::clone(m));
        }
        let masker = Arc::new(Masker::new(set.masking_profile(profile)?, &self.key));
        cache
            .by_profile
            .insert(profile.to_string(), Arc::clone(&masker));
        Some(masker)
    }
}

/// What the session reads but never changes: the classifier's cache, the catalog's, the
/// maskers.
#[derive(Clone, Copy)]
pub struct Services<'a> {
    pub classifier: &'a portcullis_sql::Classifier,
    pub catalog: &'a (dyn CatalogView + Sync),
    pub maskers: &'a Maskers,
}

/// Who and what the session is, fixed for its life: every decision's request and every
/// statement event carry it.
pub struct SessionContext {
    pub connection_id: u64,
    pub protocol: Arc<str>,
    pub target_id: u32,
    /// The target's name, as events carry it.
    pub target_name: Arc<str>,
    pub target: portcullis_policy::Target,
    pub principal: portcullis_policy::Principal,
    pub origin: Arc<portcullis_core::Encoded<portcullis_core::Origin>>,
    pub identity: Arc<portcullis_core::Encoded<portcullis_core::Identity>>,
    pub client_addr: Arc<str>,
    pub upstream_addr: Arc<str>,
    pub db_user: Arc<str>,
    pub db_name: Arc<str>,
    /// The largest message either side may send.
    pub max_len: usize,
    /// A replication connection (policy permitted `replicate`): its walsender commands are
    /// not SQL and are decided as `admin` statements named by their command.
    pub replication: bool,
}

/// One event the relay hands to the audit log.
pub enum Recorded {
    Event(Box<AuditEvent>),
    /// A statement event already written out (the hot path's encoding).
    Encoded(portcullis_audit_store::EncodedEvent),
}

/// What the session waits for from the catalog: the columns of tables, the names of
/// functions called by OID, or what the functions and procedures of some names run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogLookup {
    Tables(Vec<u32>),
    Functions(Vec<u32>),
    Routines(Vec<String>),
}

/// What the relay does after an input: send, record, look up, end. Its buffers are kept
/// between inputs (the relay clears them after writing), so the hot path allocates nothing
/// for them.
#[derive(Default)]
pub struct Output {
    pub to_client: BytesMut,
    pub to_server: BytesMut,
    /// In the order they happened; recorded before the bytes are sent.
    pub events: Vec<Recorded>,
    /// The machine waits for it: input is left unread until `catalog_answer`.
    pub lookup: Option<CatalogLookup>,
    /// The machine waits for an approval of this query string or Bind: input is left unread
    /// until `approval_answer`.
    pub approval: Option<ApprovalAsk>,
    /// A change to functions ended: every session reads their bodies afresh.
    pub forget_routines: bool,
    /// The session is over, for this reason (`connection.closed`).
    pub end: Option<String>,
}

/// A statement a policy holds for approval (a simple query string, or the Bind of a
/// prepared statement): the exact text and parameters asked for, who must approve, and the
/// policies that asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalAsk {
    pub statement: String,
    /// The Bind's parameters as the audit trail shows them (binary as hex); none for a
    /// simple query, whose values are in its text.
    pub parameters: Vec<Option<String>>,
    pub requirement: portcullis_policy::ApprovalRequirement,
    pub policy_ids: Vec<String>,
    pub reason: String,
}

/// A message waiting for the catalog, or for an approval.
enum Paused {
    /// A simple query or a Bind held for approval; handled again with the answer.
    Approval {
        msg: RawMessage,
    },
    Client {
        msg: RawMessage,
        progress: LookupProgress,
    },
    Server {
        msg: RawMessage,
    },
}
/// The end reason of a session the client ended with Terminate.
pub(super) const CLIENT_TERMINATED: &str = "the client ended the session";

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

/// The session machine. Feed it with [`Session::on_client`], [`Session::on_server`] and
/// [`Session::catalog_answer`]; each returns the [`Output`] to run.
pub struct Session<'a> {
    services: Services<'a>,
    ctx: SessionContext,
    /// The policy set of the latest input: statements are decided with it.
    policies: Arc<PolicySet>,
    /// The time of the latest input.
    now: Now,
    out: Output,
    /// A message waiting for the catalog; nothing more is read meanwhile.
    paused: Option<Paused>,
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
    decisions: DecisionCache,
    /// The result sources of the queries the session keeps under a name (SQL cursors and
    /// prepared statements), for masking what FETCH and EXECUTE return.
    named_sources: HashMap<(bool, String), Option<Arc<portcullis_sql::ResultSources>>>,
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
    /// While a query string held for approval is handled again: the request that approved
    /// it (`Ok`), or why it was not (`Err`). Applies to that message only.
    approval: Option<Result<String, String>>,
}

impl<'a> Session<'a> {
    pub fn new(
        services: Services<'a>,
        ctx: SessionContext,
        policies: Arc<PolicySet>,
        now: Now,
    ) -> Self {
        let event_parts = StatementEventParts::new(
            ctx.connection_id,
            &ctx.protocol,
            &ctx.target_name,
            &ctx.identity,
            &ctx.origin,
            &ctx.client_addr,
            &ctx.upstream_addr,
            &ctx.db_user,
            &ctx.db_name,
        );
        Self {
            services,
            ctx,
            policies,
            now,
            out: Output::default(),
            paused: None,
            expect: VecDeque::new(),
            prepared: PreparedStatements::default(),
            portals: Portals::new(),
            skip_to_sync: false,
            copy_out: None,
            session_masker: None,
            txn: TransactionStatus::Idle,
            decisions: DecisionCache::default(),
            named_sources: HashMap::new(),
            event_parts,
            function_lookup_error: None,
            read_selected_in_transaction: None,
            routines_changed: false,
            approval: None,
        }
    }

    /// Bytes from the client: every whole message in `buf` is taken and handled, until one
    /// waits for the catalog (the rest stays in `buf`) or the session ends.
    pub fn on_client(
        &mut self,
        buf: &mut BytesMut,
        now: Now,
        policies: &Arc<PolicySet>,
    ) -> &mut Output {
        self.now = now;
        if !Arc::ptr_eq(&self.policies, policies) {
            self.policies = Arc::clone(policies);
        }
        if self.paused.is_none() && self.out.end.is_none() {
            self.client_bytes(buf);
        }
        &mut self.out
    }

    /// Bytes from the server, as [`Session::on_client`].
    pub fn on_server(&mut self, buf: &mut BytesMut, now: Now) -> &mut Output {
        self.now = now;
        if self.paused.is_none() && self.out.end.is_none() {
            self.server_bytes(buf);
        }
        &mut self.out
    }

    /// The catalog lookup asked for in `Output::lookup` is done (its answer is in the
    /// catalog), or failed: the message that waited for it is handled (or waits for the next
    /// lookup). The bytes left unread are the caller's to feed again.
    pub fn catalog_answer(&mut self, answer: Result<(), String>, now: Now) -> &mut Output {
        self.now = now;
        let mut to_server = std::mem::take(&mut self.out.to_server);
        let mut to_client = std::mem::take(&mut self.out.to_client);
        let flow = match self.paused.take() {
            None => Flow::Continue,
            Some(Paused::Client { msg, mut progress }) => {
                self.lookup_answered(&mut progress, answer);
                self.on_client_message(msg, &mut progress, &mut to_server, &mut to_client)
            }
            Some(Paused::Server { msg }) => match answer {
                Ok(()) => self.on_server_message(msg, &mut to_client),
                Err(why) => self.fatal(unresolved_tables(why), &mut to_client),
            },
            Some(paused @ Paused::Approval { .. }) => {
                self.paused = Some(paused);
                Flow::Continue
            }
        };
        if self.paused.is_none() {
            self.approval = None;
        }
        if let Flow::End(why) = flow {
            self.out.end = Some(why);
        }
        self.out.to_server = to_server;
        self.out.to_client = to_client;
        &mut self.out
    }

    /// The approval asked for in `Output::approval` was given (`Ok`: the request's id) or
    /// not (`Err`: denied or expired, and why): the query string that waited is handled
    /// again, and runs, or is refused with 42501 while the session goes on. The bytes left
    /// unread are the caller's to feed again.
    pub fn approval_answer(&mut self, answer: Result<String, String>, now: Now) -> &mut Output {
        self.now = now;
        let Some(Paused::Approval { msg }) = self.paused.take() else {
            return &mut self.out;
        };
        let mut to_server = std::mem::take(&mut self.out.to_server);
        let mut to_client = std::mem::take(&mut self.out.to_client);
        self.approval = Some(answer);
        let mut progress = LookupProgress::default();
        let flow = self.on_client_message(msg, &mut progress, &mut to_server, &mut to_client);
        if self.paused.is_none() {
            self.approval = None;
        }
        if let Flow::End(why) = flow {
            self.out.end = Some(why);
        }
        self.out.to_server = to_server;
        self.out.to_client = to_client;
        &mut self.out
    }

    /// The session ends (`why`: for the events of statements left unfinished).
    pub fn end(&mut self, why: &str, now: Now) -> &mut Output {
        self.now = now;
        self.abandon_running(why);
        if self.routines_changed {
            // A change may have been committed without the agent seeing the server say so.
            self.out.forget_routines = true;
        }
        &mut self.out
    }

    /// Whether the server owes no reply: an idle session, not one running a long query.
    pub fn awaits_nothing(&self) -> bool {
        self.expect.is_empty()
    }

    /// The transaction status of the last ReadyForQuery.
    pub fn transaction_status(&self) -> TransactionStatus {
        self.txn
    }

    /// Whether a message waits for the catalog.
    pub fn is_paused(&self) -> bool {
        self.paused.is_some()
    }

    /// Ends the session with a fatal error to the client (and an audit trail through the
    /// connection's closing reason).
    fn fatal(&mut self, e: PgError, to_client: &mut BytesMut) -> Flow {
        encode_error_response(&e.to_fields(), to_client);
        tracing::warn!(error = %e, "PostgreSQL session ended");
        Flow::End(e.to_string())
    }

    fn client_bytes(&mut self, buf: &mut BytesMut) {
        let mut to_server = std::mem::take(&mut self.out.to_server);
        let mut to_client = std::mem::take(&mut self.out.to_client);
        let flow = loop {
            let msg = match decode_frame(buf, self.ctx.max_len) {
                Ok(Some(m)) => m,
                Ok(None) => break Flow::Continue,
                Err(e) => {
                    break self.fatal(
                        PgError::Protocol(format!("from the client: {e}")),
                        &mut to_client,
                    )
                }
            };
            let flow = self.on_client_message(
                msg,
                &mut LookupProgress::default(),
                &mut to_server,
                &mut to_client,
            );
            if matches!(flow, Flow::End(_)) || self.paused.is_some() {
                break flow;
            }
        };
        if let Flow::End(why) = flow {
            self.out.end = Some(why);
        }
        self.out.to_server = to_server;
        self.out.to_client = to_client;
    }

    fn server_bytes(&mut self, buf: &mut BytesMut) {
        let mut to_client = std::mem::take(&mut self.out.to_client);
        let flow = loop {
            let msg = match decode_frame(buf, self.ctx.max_len) {
                Ok(Some(m)) => m,
                Ok(None) => break Flow::Continue,
                Err(e) => {
                    break self.fatal(
                        PgError::Protocol(format!("from the server: {e}")),
                        &mut to_client,
                    )
                }
            };
            if let Some(lookup) = self.server_lookup(&msg) {
                self.out.lookup = Some(lookup);
                self.paused = Some(Paused::Server { msg });
                break Flow::Continue;
            }
            if let Flow::End(why) = self.on_server_message(msg, &mut to_client) {
                break Flow::End(why);
            }
        };
        if let Flow::End(why) = flow {
            self.out.end = Some(why);
        }
        self.out.to_client = to_client;
    }
}

enum Flow {
    Continue,
    End(String),
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

impl<'a> Session<'a> {
    /// What the latest inputs gave back, for the relay to run and clear.
    pub fn output(&mut self) -> &mut Output {
        &mut self.out
    }
}
