//! What the agent asks: who wants to do what, where, and under which circumstances.
//!
//! The agent builds one [`Request`] per decision, for every protocol, from facts it established
//! itself (the kernel's origin record, the OIDC session, the protocol handler's parse of the
//! client's message). Nothing here is read from the client unverified.

use std::collections::BTreeMap;
use std::fmt;

/// Whether the principal is a person or automation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PrincipalKind {
    /// A person signed in through OIDC (`Portcullis::User` in policies).
    User,
    /// A non-human identity from the agent config (`Portcullis::ServiceIdentity`).
    Service,
}

/// The identity a connection is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub kind: PrincipalKind,
    /// The OIDC subject for a user, the configured name for a service identity. Policies name
    /// principals by this id, so it must be the claim that never changes, not the email.
    pub id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    /// Group names; each becomes a `Portcullis::Group` the principal is `in`.
    pub groups: Vec<String>,
}

/// A protected destination as configured in the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub name: String,
    /// `tcp`, `postgres` or `ssh`.
    pub protocol: String,
    /// Free-form labels such as `environment = "production"`; Cedar tags on the target.
    pub labels: BTreeMap<String, String>,
}

/// What the principal is trying to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Open a connection to the target at all.
    Connect,
    /// Open a PostgreSQL replication connection (streaming WAL or logical changes); asked in
    /// addition to `connect`, so a policy that permits `connect` does not permit it.
    Replicate,
    /// Run one PostgreSQL statement; its class is `Context::statement_class`, its command
    /// `Context::command`.
    Query,
    /// An interactive SSH shell.
    SshShell,
    /// An SSH exec request; the command is `Context::command_line`.
    SshExec,
    /// The SSH `sftp` subsystem (scp in its modern form uses it too): once when the subsystem
    /// starts, then once for every file operation, with `Context::file`.
    SshSftp,
    /// Legacy scp (`scp -O`, every scp before OpenSSH 9): its `scp -t`/`scp -f` exec, decided
    /// once for every path it names, with `Context::file`.
    SshScp,
    /// An SSH local forward (`ssh -L`, `ssh -W`: a direct-tcpip channel); where to is
    /// `Context::forward`.
    SshForwardLocal,
    /// An SSH remote forward (`ssh -R`: a tcpip-forward request); where the target listens is
    /// `Context::forward`.
    SshForwardRemote,
    /// SSH agent forwarding.
    SshAgentForward,
}

impl Action {
    /// Every action, in the order the engine indexes them.
    pub const ALL: [Action; 10] = [
        Action::Connect,
        Action::Query,
        Action::SshShell,
        Action::SshExec,
        Action::SshSftp,
        Action::SshForwardLocal,
        Action::SshAgentForward,
        Action::Replicate,
        Action::SshForwardRemote,
        Action::SshScp,
    ];

    /// The action's id in the Cedar schema: `Portcullis::Action::"<cedar_name>"`.
    pub fn cedar_name(self) -> &'static str {
        match self {
            Action::Connect => "connect",
            Action::Replicate => "replicate",
            Action::Query => "query",
            Action::SshShell => "ssh_shell",
            Action::SshExec => "ssh_exec",
            Action::SshSftp => "ssh_sftp",
            Action::SshScp => "ssh_scp",
            Action::SshForwardLocal => "ssh_forward_local",
            Action::SshForwardRemote => "ssh_forward_remote",
            Action::SshAgentForward => "ssh_agent_forward",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Action::Connect => 0,
            Action::Query => 1,
            Action::SshShell => 2,
            Action::SshExec => 3,
            Action::SshSftp => 4,
            Action::SshForwardLocal => 5,
            Action::SshAgentForward => 6,
            Action::Replicate => 7,
            Action::SshForwardRemote => 8,
            Action::SshScp => 9,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cedar_name())
    }
}

/// The statement classes the PostgreSQL classifier (`portcullis-sql`) produces, as policies
/// spell them in `context.statement_class`. The schema file documents what falls into each;
/// `context.command` singles out one statement (`"DROP DATABASE"`, `"TRUNCATE"`).
pub const STATEMENT_CLASSES: [&str; 9] = [
    "read",
    "write",
    "ddl",
    "dcl",
    "transaction",
    "utility",
    "admin",
    "call",
    "do",
];

/// The circumstances of a request. Which fields an action uses is fixed by the schema: `query`
/// needs `statement_class`, `command`, `db_user` and `db_name`; `ssh_exec` needs `command_line`.
/// A field an action does not use is ignored; a field it needs but is `None` makes the request
/// unevaluable, and so denied.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Context {
    /// Seconds since the Unix epoch. The engine never reads a clock: the agent passes the time
    /// so a decision can be replayed and tested.
    pub unix_time: i64,
    /// 0..=23, in the agent's policy time zone.
    pub hour: u8,
    /// 1..=7, ISO 8601 (1 = Monday, 7 = Sunday), in the same time zone.
    pub weekday: u8,
    /// The client process name from the kernel (`comm`).
    pub source_comm: String,
    /// The Unix uid of the client process.
    pub source_uid: u32,
    /// One of [`STATEMENT_CLASSES`].
    pub statement_class: Option<String>,
    /// The SQL command, upper case like PostgreSQL's command tags: `SELECT`, `DROP DATABASE`,
    /// `TRUNCATE`, `CREATE TABLE` (`portcullis_sql::Statement::command`).
    pub command: Option<String>,
    pub tables: Vec<String>,
    pub functions: Vec<String>,
    /// For `query`: the statement runs SQL the classifier cannot read before it runs, so the
    /// other fields do not describe all of what it does: a `DO` block with `EXECUTE` of
    /// anything but one string constant, in a language other than PL/pgSQL, or whose body
    /// does not compile (`portcullis_sql::Statement::dynamic_sql`).
    pub dynamic_sql: bool,
    pub command_line: Option<String>,
    /// For `ssh_exec`: whether the whole command line is a simple command (words and quoting
    /// only, no shell syntax), so `command_name` and `command_args` describe all it runs.
    pub simple_command: bool,
    /// For `ssh_exec`: the first word, when the line starts with a plain word (even when the
    /// rest is not simple: `rm -rf / ; x` starts with `rm`).
    pub command_name: Option<String>,
    /// For `ssh_exec` of a simple command: the words after the first, quotes removed.
    pub command_args: Vec<String>,
    /// For `ssh_exec`: the line was typed at a guarded interactive shell (rebuilt from keys
    /// and echo), not sent as an exec request.
    pub guarded_line: bool,
    /// For `connect` to an SSH target: the login name the client asked for (`ssh user@host`).
    pub ssh_user: Option<String>,
    /// For `ssh_forward_local` and `ssh_forward_remote`: the forward's address.
    pub forward: Option<Forward>,
    /// For `ssh_sftp` (absent when the subsystem starts) and `ssh_scp`: the file operation.
    pub file: Option<FileAccess>,
    pub db_user: Option<String>,
    pub db_name: Option<String>,
}

/// Where an SSH forward goes (`ssh_forward_local`) or listens (`ssh_forward_remote`), as the
/// client asked for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Local: the host the target's sshd connects to (`destination_host` in policies).
    /// Remote: the address the target's sshd listens on (`bind_address`).
    pub host: String,
    /// `destination_port` or `bind_port`.
    pub port: u32,
    /// Local only: where the client says the connection came from (`originator_host`,
    /// `originator_port`). The client chooses it freely: worth logging, not trusting.
    pub originator: Option<(String, u32)>,
}

/// One file operation of SFTP or legacy scp, on one path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileAccess {
    /// `ssh_sftp`: `read`, `write`, `list`, `stat`, `remove`, `rename`, `mkdir`, `rmdir`,
    /// `setstat`, `symlink` or `link` (`sftp_operation` in policies). `ssh_scp`: `upload` or
    /// `download` (`direction`).
    pub operation: String,
    /// The path as the client named it, with `.`, `..` and repeated `/` resolved by name (the
    /// agent cannot see the server's symbolic links).
    pub path: String,
    /// `ssh_scp`: `scp -r`.
    pub recursive: bool,
}

/// One question to the policy engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub principal: Principal,
    pub action: Action,
    pub target: Target,
    pub context: Context,
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.principal.kind {
            PrincipalKind::User => "user",
            PrincipalKind::Service => "service",
        };
        write!(f, "{kind} `{}`", self.principal.id)?;
        if let Some(email) = &self.principal.email {
            write!(f, " <{email}>")?;
        }
        if !self.principal.groups.is_empty() {
            write!(f, " (groups: {})", self.principal.groups.join(", "))?;
        }
        write!(
            f,
            " wants {} on target `{}` ({}",
            self.action, self.target.name, self.target.protocol
        )?;
        for (key, value) in &self.target.labels {
            write!(f, ", {key}={value}")?;
        }
        f.write_str(")")?;
        let c = &self.context;
        if let Some(class) = &c.statement_class {
            write!(f, ", statement class `{class}`")?;
        }
        if let Some(command) = &c.command {
            write!(f, ", SQL command `{command}`")?;
        }
        if !c.tables.is_empty() {
            write!(f, ", tables {}", c.tables.join(", "))?;
        }
        if c.dynamic_sql {
            f.write_str(", dynamic SQL")?;
        }
        if let Some(command) = &c.command_line {
            write!(f, ", command `{command}`")?;
        }
        if let Some(user) = &c.ssh_user {
            write!(f, ", SSH login `{user}`")?;
        }
        if let Some(forward) = &c.forward {
            write!(f, ", forward `{}:{}`", forward.host, forward.port)?;
        }
        if let Some(file) = &c.file {
            write!(f, ", {} `{}`", file.operation, file.path)?;
        }
        write!(
            f,
            ", from `{}` uid {} at hour {} weekday {}",
            c.source_comm, c.source_uid, c.hour, c.weekday
        )
    }
}
