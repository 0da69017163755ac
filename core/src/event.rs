//! The one audit event schema: every protocol, every decision and every part of the agent
//! writes [`AuditEvent`]s (statement events go through [`StatementEventParts`], which writes
//! the same bytes faster). Its words are the audit trail's: searches, the SIEM and the central
//! store read them.

use std::sync::Arc;

use serde::Serialize;

use crate::clock::{hostname, now_ms};
use crate::identity::Identity;
use crate::origin::Origin;

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
    /// A chunk of a session recording was written (and fsynced) to the recording area: its
    /// place in the file and its SHA-256, so the chain vouches for the recording.
    #[serde(rename = "recording.chunk")]
    RecordingChunk,
    /// A session recording ended: its chunk count, length and the SHA-256 of the whole file.
    #[serde(rename = "recording.closed")]
    RecordingClosed,
    /// A session recording could not be written; `reason` says why and whether the session
    /// was ended (`recording_failure = "close"`) or went on unrecorded (`"continue"`).
    #[serde(rename = "recording.failed")]
    RecordingFailed,
    /// An SSH session channel started a shell (`ssh host`).
    #[serde(rename = "ssh.shell")]
    SshShell,
    /// An SSH session channel ran a command (`ssh host cmd`, scp -O, rsync, git); the
    /// command line is in `command_line`.
    #[serde(rename = "ssh.exec")]
    SshExec,
    /// An SSH session channel started a subsystem (sftp, and scp of OpenSSH 9 and later).
    #[serde(rename = "ssh.subsystem")]
    SshSubsystem,
    /// An SSH channel or channel request was refused (by policy or because the agent does
    /// not forward it: port and agent forwarding, X11, an unknown subsystem).
    #[serde(rename = "ssh.channel_denied")]
    SshChannelDenied,
    /// A forwarded TCP connection a policy allowed (`ssh -L`, `ssh -W`); `reason` names its
    /// destination.
    #[serde(rename = "ssh.forward")]
    SshForward,
    /// One SFTP operation on an `sftp` subsystem channel (`sftp_operation`, `path`, the
    /// server's `sftp_status`), or one a policy refused before the server saw it
    /// (`decision: deny`); `close` carries what the handle moved.
    #[serde(rename = "ssh.sftp")]
    SshSftp,
    /// A forwarded connection ended (`ssh -L`/`-W` to `forward`, or a connection to an
    /// `ssh -R` port on the target): the bytes it moved each way, client side first.
    #[serde(rename = "ssh.forward_closed")]
    SshForwardClosed,
    /// An SSH agent channel (`ssh -A`) the target's sshd opened: relayed to the client
    /// when policy allowed agent forwarding, refused otherwise.
    #[serde(rename = "ssh.agent_channel")]
    SshAgentChannel,
    /// A line typed at a guarded shell (`guarded_shell`), decided before its Enter reached
    /// the target: `decision` allow or deny, the line in `command_line` (left out for a line
    /// typed without echo, such as a password).
    #[serde(rename = "ssh.shell_line")]
    SshShellLine,
    /// Someone asked for an approval (a grant, or one exact statement); `approval` has the
    /// request id, the requester, what is asked and who must approve.
    #[serde(rename = "approval.requested")]
    ApprovalRequested,
    /// One approver approved; `approval_state` says whether the request is now approved.
    #[serde(rename = "approval.approved")]
    ApprovalApproved,
    /// An approver denied the request: it is over.
    #[serde(rename = "approval.denied")]
    ApprovalDenied,
    /// The request was not decided within approvals.toml's `timeout_seconds`.
    #[serde(rename = "approval.expired")]
    ApprovalExpired,
    /// An active grant let a connection (or a channel's action) through.
    #[serde(rename = "grant.used")]
    GrantUsed,
    /// A grant was revoked before its end; its open connections are closed.
    #[serde(rename = "grant.revoked")]
    GrantRevoked,
    /// A grant reached its end; its open connections are closed.
    #[serde(rename = "grant.expired")]
    GrantExpired,
    /// A member of the configured break-glass group approved their own request, with a
    /// reason: the whole requirement is filled at once (`approval.break_glass` instead of
    /// `approval.approved`), and the notification webhooks are alerted.
    #[serde(rename = "approval.break_glass")]
    ApprovalBreakGlass,
    /// An approval notification was not delivered (its webhook kept failing, or its queue
    /// was full); `reason` says which webhook, by name, and why. The request goes on.
    #[serde(rename = "approval.notification_dropped")]
    ApprovalNotificationDropped,
    /// A person signed in to the web console (docs/console.md); `identity` is their login,
    /// `reason` names the roles their groups gave them.
    #[serde(rename = "console.signin")]
    ConsoleSignin,
    /// The web console refused someone: a sign-in without a console role or that failed its
    /// checks (state, nonce, token), a page or action their roles do not allow, a form
    /// without its CSRF token or from another origin. `reason` says which.
    #[serde(rename = "console.denied")]
    ConsoleDenied,
    /// An admin ended an open connection from the console's live page; `identity` is the
    /// admin, `connection_id` and `target` the connection, `reason` theirs. The connection's
    /// own `connection.closed` names the admin too.
    #[serde(rename = "console.session_ended")]
    ConsoleSessionEnded,
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
    pub decision: Option<Decision>,
    /// Shared with the verdict it came from: a statement event copies no list.
    #[serde(skip_serializing_if = "is_empty")]
    pub policy_ids: Arc<[String]>,
    /// The database role the session acts as upstream (PostgreSQL).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_user: Option<Arc<str>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub db_name: Option<Arc<str>>,
    /// `connection.opened` of a PostgreSQL target with an upstream pool: whether the server
    /// session was lent from the pool (it served an earlier client) or dialed for this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_pooled: Option<bool>,
    /// The server's process id of a server session lent from the pool.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backend_pid: Option<u32>,
    /// How many occurrences this one event stands for, when more than one: the summary of
    /// the refusals of one uid (or of connections without an origin) in one interval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// Recording events only: which of the connection's terminal recordings (0, 1, 2 … in
    /// the order its terminals started; ControlMaster multiplexes several terminals on one
    /// connection). An event written before recordings were numbered means 0.
    #[serde(rename = "recording", skip_serializing_if = "Option::is_none")]
    pub recording_number: Option<u64>,
    /// Statement events only; flattened so every field stays top-level.
    #[serde(flatten)]
    pub statement: Option<Box<StatementFields>>,
    /// Recording events only; flattened like `statement`.
    #[serde(flatten)]
    pub recording: Option<Box<RecordingFields>>,
    /// SSH events only (and an SSH connection's refusal); flattened like `statement`.
    #[serde(flatten)]
    pub ssh: Option<Box<SshFields>>,
    /// Approval and grant events only; flattened like `statement`.
    #[serde(flatten)]
    pub approval: Option<Box<ApprovalFields>>,
}

/// What an approval or grant event says: which request, who asked, who decided, what is
/// asked (the grant's scope or the exact statement) and who must approve.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ApprovalFields {
    pub request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// The requester's OIDC subject (or service name); the event's `identity` is whoever
    /// acted (the requester, an approver, the revoker).
    pub requester: String,
    /// The subjects whose approvals count so far (or counted, for a grant).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub approvers: Vec<String>,
    /// Who must approve (`1 approval from group `dba-leads` and 1 approval from group `security``).
    pub required: String,
    /// pending, approved, denied, expired, revoked.
    pub approval_state: &'static str,
    /// `grant`: the target and actions for a duration; `statement`: one exact statement;
    /// `command`: one exact SSH command line (or an interactive shell) on one connection.
    pub asked: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub grant_actions: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_duration_secs: Option<u64>,
    /// When the grant ends (Unix ms), once approved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_expires_ms: Option<u64>,
    /// The exact statement (or SSH command line) asked for, and a statement's parameters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub approval_statement: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub approval_parameters: Vec<Option<String>>,
    /// The request was approved, or the grant made, by breaking the glass.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub break_glass: bool,
}

/// Where a recording chunk lies in its file and what it hashes to (`recording.chunk`), or
/// the whole file (`recording.closed`: `recording_chunk` is then the number of chunks, the
/// offset 0). The file is `<audit dir>/recordings/<connection_id>.cast`.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RecordingFields {
    /// The chunk's index from 0 (the header); in a closed event, the number of chunks.
    pub recording_chunk: u64,
    /// The chunk's first byte in the file.
    pub recording_offset: u64,
    /// The chunk's length; in a closed event, the file's.
    pub recording_bytes: u64,
    /// SHA-256 (lower-case hex) of the chunk; in a closed event, of the whole file.
    pub recording_sha256: String,
}

/// What an SSH event says about the session and the channel it concerns.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SshFields {
    /// The login name the client asked for (`ssh deploy@web-1`); the principal of the
    /// agent's user certificate upstream.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ssh_user: Option<Arc<str>>,
    /// `session`, `direct-tcpip`, `forwarded-tcpip`, `x11`, `auth-agent`, or a request on a
    /// session channel: `shell`, `exec`, `subsystem:sftp`, `tcpip-forward`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// The command of an exec request, exactly as the client sent it (lossy UTF-8).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command_line: Option<String>,
    /// A forward's `host:port`: where a local forward goes (as the client named it; the
    /// target resolves a name), or where a remote forward listens on the target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub forward: Option<String>,
    /// Where a forwarded connection says it came from (`host:port`): the client's claim
    /// for a local forward, the target's sshd's for a connection to a remote forward.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub originator: Option<String>,
    /// `ssh.sftp` events only; flattened like the rest.
    #[serde(flatten)]
    pub sftp: Option<Box<SftpFields>>,
}

/// One SFTP operation (`ssh.sftp`).
#[derive(Debug, Clone, Default, Serialize)]
pub struct SftpFields {
    /// `open`, `close`, `opendir`, `remove`, `rename`, `mkdir`, `rmdir`, `setstat`,
    /// `symlink`, `link`, or a refused operation's name (`stat`, `extension:<name>`, ...).
    pub sftp_operation: String,
    /// The path as the client sent it (lossy UTF-8); for `close`, the path it was opened as.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The second path of `rename`, `symlink` (wire order: OpenSSH sends the link's target
    /// first) and `link`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_path: Option<String>,
    /// `open`: its flags as words (`read`, `write,creat,trunc`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub open_flags: Option<String>,
    /// The server's answer: `ok`, `no such file`, `permission denied`, ... (`handle` for a
    /// successful open); absent for an operation the agent refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sftp_status: Option<String>,
    /// The server's status message, when it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sftp_message: Option<String>,
    /// `close`: bytes the handle read and their SHA-256 (hex) in file order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_read: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_sha256: Option<String>,
    /// `close`: bytes written through the handle and their SHA-256 in file order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_written: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_sha256: Option<String>,
    /// `close`: why a hash is missing (pieces out of order or overlapping, failed writes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_note: Option<String>,
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

impl Serialize for Decision {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// What one statement event says about its statement. `statement` and `classification` are
/// encoded once per statement the session knows ([`StatementEventParts::statement_fields`]),
/// so a prepared statement executed again escapes its text again never.
pub struct StatementRecord<'a> {
    pub kind: EventKind,
    pub time_ms: u64,
    pub reason: Option<&'a str>,
    pub decision: Decision,
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
        w.field(key::DECISION, r.decision.as_str());
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
            upstream_pooled: None,
            backend_pid: None,
            count: None,
            recording_number: None,
            statement: None,
            recording: None,
            ssh: None,
            approval: None,
        }
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;
    use crate::identity::IdentityKind;
    use std::sync::Arc;

    /// The schema's decision words; searches and the SIEM's severity match them.
    #[test]
    fn decisions_record_the_schemas_words() {
        let words: Vec<serde_json::Value> = [
            Decision::Allow,
            Decision::Deny,
            Decision::Approval,
            Decision::Error,
            Decision::NotRun,
        ]
        .iter()
        .map(|d| serde_json::to_value(d).unwrap())
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
            ev.decision = Some(if full {
                Decision::Allow
            } else {
                Decision::NotRun
            });
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
                    decision: ev.decision.unwrap(),
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
