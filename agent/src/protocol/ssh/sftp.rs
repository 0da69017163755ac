//! File transfers through the agent: the operations of an `sftp` subsystem channel, each
//! decided (`ssh_sftp` with `context.sftp_operation` and `context.path`) before the server
//! sees it and written down as an `ssh.sftp` event with the server's answer, and legacy
//! scp's `scp -t`/`scp -f` exec decided as `ssh_scp`, path by path.
//!
//! The SFTP stream is read with `portcullis_terminal::sftp` (version 3, OpenSSH's). Both
//! directions of a channel share one [`SftpRelay`]: the client's requests are remembered by
//! id so each reply is matched to what it answers (a handle to its path, data to its offset).
//! A refused request never reaches the server: a REALPATH of `/` with the same id goes in its
//! place, and the server's answer to it is replaced by the agent's SSH_FX_PERMISSION_DENIED
//! with the reason, so the refusal takes its turn among the replies and the session goes on.
//! File contents are not masked: they are counted and hashed, and policy decides which paths
//! may be read or written.
//!
//! A stream that is not SFTP (a packet over 256 KiB, a field past its packet's end, a type
//! that is not one, a request id reused while pending) ends that channel with an event; the
//! connection and its other channels go on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use portcullis_core::{AuditEvent, Decision, Identity, Origin, SftpFields};
use portcullis_policy::{Action, FileAccess, Request};
use portcullis_terminal::sftp::{
    self as wire, ClientPacket, Framer, Op, ServerPacket, Transfer, FX_OK, FX_OP_UNSUPPORTED,
    FX_PERMISSION_DENIED,
};

use crate::admission::Gate;
use crate::config::ProtectedTarget;

/// Requests awaiting their reply on one channel: OpenSSH's client keeps at most 64 in flight;
/// more is a client flooding the agent's memory.
const MAX_PENDING: usize = 4096;
/// Handles open at once on one channel (each is a file descriptor of the server's).
const MAX_HANDLES: usize = 4096;

/// Extensions the agent relays (OpenSSH PROTOCOL section 4): each either names its paths in
/// a way the agent reads and decides, or works on a handle whose open was decided. Others
/// are taken out of the server's VERSION and refused if sent anyway: `copy-data` would move
/// file contents past the read and write accounting.
const RELAYED_EXTENSIONS: [&[u8]; 10] = [
    b"posix-rename@openssh.com",
    b"hardlink@openssh.com",
    b"lsetstat@openssh.com",
    b"statvfs@openssh.com",
    b"fstatvfs@openssh.com",
    b"fsync@openssh.com",
    b"limits@openssh.com",
    b"expand-path@openssh.com",
    b"home-directory",
    b"users-groups-by-id@openssh.com",
];

/// Who asks and where, for every file decision of one channel, and the event every one of
/// its `ssh.sftp` events starts from.
pub(super) struct FilePolicy {
    pub gate: Arc<Gate>,
    pub identity: Identity,
    pub target: ProtectedTarget,
    pub origin: Origin,
    pub ssh_user: Option<String>,
    /// `ssh.sftp` with the connection's fields filled in.
    pub event: AuditEvent,
}

/// A refusal: the audit decision, the policies behind it and the reason the client reads.
pub(super) struct Refused {
    decision: Decision,
    policy_ids: Vec<String>,
    reason: String,
}

/// What a channel's file operations are decided by and written to: the agent's policy and
/// audit trail ([`FilePolicy`]), or a test's policy set and list.
pub(super) trait FileDecisions: Send + Sync {
    /// One decision of `action` on one path.
    fn decide(
        &self,
        action: Action,
        operation: &str,
        path: &str,
        recursive: bool,
    ) -> Result<Vec<String>, Refused>;

    /// One `ssh.sftp` event.
    fn record(
        &self,
        fields: SftpFields,
        decision: Decision,
        policy_ids: &[String],
        reason: Option<String>,
    );
}

/// The refusal the client reads and the trail keeps, in the words of `outcome`.
fn refused(operation: &str, path: &str, refused: crate::policy::PolicyRefusal) -> Refused {
    Refused {
        reason: match refused.decision {
            Decision::Deny => format!(
                "{operation} of `{path}` denied by policy: {}",
                refused.reason
            ),
            _ => format!("{operation} of `{path}` refused: {}", refused.reason),
        },
        decision: refused.decision,
        policy_ids: refused.policy_ids,
    }
}

impl FileDecisions for FilePolicy {
    /// Asked fresh each time: the time of day matters.
    fn decide(
        &self,
        action: Action,
        operation: &str,
        path: &str,
        recursive: bool,
    ) -> Result<Vec<String>, Refused> {
        let mut request: Request =
            crate::policy::connect_request(&self.identity, &self.target, &self.origin);
        request.action = action;
        request.context.ssh_user = self.ssh_user.clone();
        request.context.file = Some(FileAccess {
            operation: operation.to_string(),
            path: path.to_string(),
            recursive,
        });
        crate::policy::outcome(self.gate.policies().decide(&request))
            .map(|allowed| allowed.policy_ids)
            .map_err(|r| refused(operation, path, r))
    }

    fn record(
        &self,
        fields: SftpFields,
        decision: Decision,
        policy_ids: &[String],
        reason: Option<String>,
    ) {
        let mut ev = self.event.clone();
        ev.time_ms = portcullis_core::now_ms();
        ev.decision = Some(decision);
        ev.policy_ids = policy_ids.to_vec().into();
        ev.reason = reason;
        if let Some(ssh) = ev.ssh.as_mut() {
            ssh.sftp = Some(Box::new(fields));
        }
        self.gate.audit().record(ev);
    }
}

/// Legacy scp's exec (`scp -t` receives, `scp -f` sends), decided as `ssh_scp` once for every
/// path it names; all must be allowed. A refusal is written down as `ssh.channel_denied`
/// with the command; the caller answers the channel.
pub(super) fn decide_scp(
    policy: &FilePolicy,
    command: &str,
    upload: bool,
    recursive: bool,
    paths: &[String],
) -> Result<Vec<String>, String> {
    let direction = if upload { "upload" } else { "download" };
    let mut ids = Vec::new();
    for path in paths {
        match policy.decide(Action::SshScp, direction, &normalize(path), recursive) {
            Ok(more) => ids.extend(more),
            Err(refused) => {
                let mut ev = policy.event.clone();
                ev.event = portcullis_core::EventKind::SshChannelDenied;
                ev.time_ms = portcullis_core::now_ms();
                ev.decision = Some(refused.decision);
                ev.policy_ids = refused.policy_ids.into();
                let reason = format!("scp {}", refused.reason);
                ev.reason = Some(reason.clone());
                if let Some(ssh) = ev.ssh.as_mut() {
                    ssh.channel = Some("exec".into());
                    ssh.command_line = Some(command.to_string());
                }
                tracing::info!(%reason, "scp refused");
                policy.gate.audit().record(ev);
                return Err(reason);
            }
        }
    }
    ids.sort();
    ids.dedup();
    Ok(ids)
}

/// A path as policies see it: `.`, `..` and repeated `/` resolved by name, so
/// `/etc//secret/../secret/key` is `/etc/secret/key`. `..` never climbs above `/`; a
/// relative path stays relative (the server resolves it from the login's home).
pub(super) fn normalize(path: &str) -> String {
    let absolute = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !absolute {
                    parts.push("..");
                }
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    match (absolute, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

/// What a request waits for in the server's reply.
enum Pending {
    /// Refused by the agent: its answer replaces the server's.
    Refused {
        code: u32,
        message: String,
    },
    Open {
        path: String,
        pflags: u32,
        policy_ids: Vec<String>,
    },
    Read {
        handle: Vec<u8>,
        offset: u64,
    },
    Write {
        handle: Vec<u8>,
    },
    Close {
        handle: Vec<u8>,
    },
    /// An operation written down with the server's status.
    Logged {
        operation: &'static str,
        path: String,
        new_path: Option<String>,
        policy_ids: Vec<String>,
    },
    /// Read-only questions (stat, realpath, readdir): decided, not written down.
    Quiet,
}

struct OpenHandle {
    path: String,
    read: Transfer,
    write: Transfer,
    failed_writes: u64,
}

#[derive(Default)]
struct State {
    from_client: Framer,
    from_server: Framer,
    pending: HashMap<u32, Pending>,
    handles: HashMap<Vec<u8>, OpenHandle>,
    /// Set once the stream broke: every later byte is dropped.
    broken: bool,
}

/// One `sftp` subsystem channel, shared by its two directions.
pub struct SftpRelay {
    policy: Box<dyn FileDecisions>,
    state: Mutex<State>,
}

impl std::fmt::Debug for SftpRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SftpRelay")
    }
}

/// Set once, when a channel's sftp subsystem starts.
pub type SharedSftp = Arc<std::sync::OnceLock<Arc<SftpRelay>>>;

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl SftpRelay {
    pub(super) fn new(policy: impl FileDecisions + 'static) -> Self {
        Self {
            policy: Box::new(policy),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The client's bytes: what goes upstream (whole requests, refused ones replaced), or
    /// why the channel must end.
    pub fn client_bytes(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        let mut state = self.lock();
        if state.broken {
            return Err("the SFTP stream already broke".into());
        }
        state.from_client.push(data);
        let mut out = Vec::new();
        loop {
            let packet = match state.from_client.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(out),
                Err(e) => return Err(self.broke(&mut state, "client", &e.to_string())),
            };
            match ClientPacket::decode(&packet) {
                Ok(ClientPacket::Init { .. }) => out.extend_from_slice(&packet),
                Ok(ClientPacket::Request { id, op }) => {
                    if state.pending.contains_key(&id) {
                        let why = format!("request id {id} reused while its reply is pending");
                        return Err(self.broke(&mut state, "client", &why));
                    }
                    if state.pending.len() >= MAX_PENDING {
                        let why = format!("more than {MAX_PENDING} requests in flight");
                        return Err(self.broke(&mut state, "client", &why));
                    }
                    let pending = self.request(&mut state, &op);
                    let refused = matches!(pending, Pending::Refused { .. });
                    state.pending.insert(id, pending);
                    if refused {
                        out.extend_from_slice(&wire::realpath(id, b"/"));
                    } else {
                        out.extend_from_slice(&packet);
                    }
                }
                Err(e) => return Err(self.broke(&mut state, "client", &e.to_string())),
            }
        }
    }

    /// The server's bytes: what goes to the client (whole replies, the agent's answers in
    /// place of refused requests'), or why the channel must end.
    pub fn server_bytes(&self, data: &[u8]) -> Result<Vec<u8>, String> {
        let mut state = self.lock();
        if state.broken {
            return Err("the SFTP stream already broke".into());
        }
        state.from_server.push(data);
        let mut out = Vec::new();
        loop {
            let packet = match state.from_server.next_packet() {
                Ok(Some(p)) => p,
                Ok(None) => return Ok(out),
                Err(e) => return Err(self.broke(&mut state, "server", &e.to_string())),
            };
            match ServerPacket::decode(&packet) {
                Ok(ServerPacket::Version {
                    version,
                    extensions,
                }) => {
                    let kept: Vec<(&[u8], &[u8])> = extensions
                        .into_iter()
                        .filter(|(name, _)| RELAYED_EXTENSIONS.contains(name))
                        .collect();
                    out.extend_from_slice(&wire::version(version, &kept));
                }
                Ok(reply) => {
                    let replaced = self.reply(&mut state, &reply);
                    out.extend_from_slice(replaced.as_deref().unwrap_or(&packet));
                }
                Err(e) => return Err(self.broke(&mut state, "server", &e.to_string())),
            }
        }
    }

    fn broke(&self, state: &mut State, side: &str, why: &str) -> String {
        state.broken = true;
        let reason = format!("the {side}'s SFTP stream is broken ({why}): the channel is closed");
        tracing::info!(%reason, "SFTP channel ended");
        self.policy.record(
            SftpFields {
                sftp_operation: "protocol_error".into(),
                ..SftpFields::default()
            },
            Decision::Error,
            &[],
            Some(reason.clone()),
        );
        reason
    }

    /// Decides `operation` on each path (all must be allowed); a refusal is written down.
    fn decide_paths(
        &self,
        event_operation: &str,
        operation: &str,
        paths: &[&[u8]],
    ) -> Result<Vec<String>, Pending> {
        let mut ids = Vec::new();
        for raw in paths {
            let refused = match std::str::from_utf8(raw) {
                Err(_) => Refused {
                    decision: Decision::Deny,
                    policy_ids: Vec::new(),
                    reason: format!("{operation} of a path that is not UTF-8 cannot be decided"),
                },
                Ok(path) => {
                    match self
                        .policy
                        .decide(Action::SshSftp, operation, &normalize(path), false)
                    {
                        Ok(more) => {
                            ids.extend(more);
                            continue;
                        }
                        Err(r) => r,
                    }
                }
            };
            let fields = SftpFields {
                sftp_operation: event_operation.to_string(),
                path: paths.first().map(|p| text(p)),
                new_path: paths.get(1).map(|p| text(p)),
                ..SftpFields::default()
            };
            tracing::info!(reason = %refused.reason, "SFTP operation refused");
            self.policy.record(
                fields,
                refused.decision,
                &refused.policy_ids,
                Some(refused.reason.clone()),
            );
            return Err(Pending::Refused {
                code: FX_PERMISSION_DENIED,
                message: format!("portcullis: {}", refused.reason),
            });
        }
        ids.sort();
        ids.dedup();
        Ok(ids)
    }

    fn logged(&self, operation: &'static str, decided_as: &str, paths: &[&[u8]]) -> Pending {
        match self.decide_paths(operation, decided_as, paths) {
            Ok(policy_ids) => Pending::Logged {
                operation,
                path: paths.first().map(|p| text(p)).unwrap_or_default(),
                new_path: paths.get(1).map(|p| text(p)),
                policy_ids,
            },
            Err(refused) => refused,
        }
    }

    fn quiet(&self, operation: &'static str, decided_as: &str, path: &[u8]) -> Pending {
        match self.decide_paths(operation, decided_as, &[path]) {
            Ok(_) => Pending::Quiet,
            Err(refused) => refused,
        }
    }

    /// What a request is, decided.
    fn request(&self, state: &mut State, op: &Op<'_>) -> Pending {
        match *op {
            Op::Open { path, pflags } => {
                let reads = pflags & wire::FXF_READ != 0;
                let writes = pflags
                    & (wire::FXF_WRITE | wire::FXF_APPEND | wire::FXF_CREAT | wire::FXF_TRUNC)
                    != 0;
                let mut ids = Vec::new();
                // An open for both is decided as both; one for neither reads at most.
                for (asked, operation) in [(reads || !writes, "read"), (writes, "write")] {
                    if !asked {
                        continue;
                    }
                    match self.decide_paths("open", operation, &[path]) {
                        Ok(more) => ids.extend(more),
                        Err(refused) => return refused,
                    }
                }
                if state.handles.len() >= MAX_HANDLES {
                    return Pending::Refused {
                        code: wire::FX_FAILURE,
                        message: format!("portcullis: more than {MAX_HANDLES} open handles"),
                    };
                }
                ids.sort();
                ids.dedup();
                Pending::Open {
                    path: text(path),
                    pflags,
                    policy_ids: ids,
                }
            }
            Op::Close { handle } => Pending::Close {
                handle: handle.to_vec(),
            },
            Op::Read { handle, offset, .. } => Pending::Read {
                handle: handle.to_vec(),
                offset,
            },
            Op::Write {
                handle,
                offset,
                data,
            } => {
                if let Some(h) = state.handles.get_mut(handle) {
                    h.write.add(offset, data);
                }
                Pending::Write {
                    handle: handle.to_vec(),
                }
            }
            Op::Fstat { .. } | Op::Readdir { .. } => Pending::Quiet,
            Op::Fsetstat { handle } => match state.handles.get(handle).map(|h| h.path.clone()) {
                Some(path) => self.logged("setstat", "setstat", &[path.as_bytes()]),
                None => Pending::Quiet,
            },
            Op::Lstat { path }
            | Op::Stat { path }
            | Op::Realpath { path }
            | Op::Readlink { path } => self.quiet("stat", "stat", path),
            Op::Setstat { path } => self.logged("setstat", "setstat", &[path]),
            Op::Opendir { path } => self.logged("opendir", "list", &[path]),
            Op::Remove { path } => self.logged("remove", "remove", &[path]),
            Op::Mkdir { path } => self.logged("mkdir", "mkdir", &[path]),
            Op::Rmdir { path } => self.logged("rmdir", "rmdir", &[path]),
            Op::Rename { from, to } => self.logged("rename", "rename", &[from, to]),
            Op::Symlink { first, second } => self.logged("symlink", "symlink", &[first, second]),
            Op::Extended { name, data } => self.extension(name, data),
        }
    }

    fn extension(&self, name: &[u8], data: &[u8]) -> Pending {
        let strings = |n| wire::extension_strings(data, n).unwrap_or_default();
        let malformed = || Pending::Refused {
            code: wire::FX_BAD_MESSAGE,
            message: format!("portcullis: malformed {} request", text(name)),
        };
        match name {
            b"posix-rename@openssh.com" | b"hardlink@openssh.com" => {
                let (operation, decided_as) = if name == b"hardlink@openssh.com" {
                    ("link", "link")
                } else {
                    ("rename", "rename")
                };
                match strings(2).as_slice() {
                    [from, to] => self.logged(operation, decided_as, &[from, to]),
                    _ => malformed(),
                }
            }
            b"lsetstat@openssh.com" => match strings(1).as_slice() {
                [path] => self.logged("setstat", "setstat", &[path]),
                _ => malformed(),
            },
            b"statvfs@openssh.com" | b"expand-path@openssh.com" => match strings(1).as_slice() {
                [path] => self.quiet("stat", "stat", path),
                _ => malformed(),
            },
            _ if RELAYED_EXTENSIONS.contains(&name) => Pending::Quiet,
            _ => {
                let operation = format!("extension:{}", text(name));
                let reason = format!("SFTP extension `{}` is not relayed", text(name));
                self.policy.record(
                    SftpFields {
                        sftp_operation: operation,
                        ..SftpFields::default()
                    },
                    Decision::Deny,
                    &[],
                    Some(reason.clone()),
                );
                Pending::Refused {
                    code: FX_OP_UNSUPPORTED,
                    message: format!("portcullis: {reason}"),
                }
            }
        }
    }

    /// Accounts for one reply; returns the agent's own packet when it replaces the server's.
    fn reply(&self, state: &mut State, reply: &ServerPacket<'_>) -> Option<Vec<u8>> {
        let id = match *reply {
            ServerPacket::Status { id, .. }
            | ServerPacket::Handle { id, .. }
            | ServerPacket::Data { id, .. }
            | ServerPacket::Other { id } => id,
            ServerPacket::Version { .. } => return None,
        };
        let pending = state.pending.remove(&id)?;
        let (code, message) = match *reply {
            ServerPacket::Status { code, message, .. } => (Some(code), text(message)),
            _ => (None, String::new()),
        };
        let status = || match code {
            Some(c) => wire::status_name(c),
            None => "ok".into(),
        };
        let message = (!message.is_empty()).then_some(message);
        match pending {
            Pending::Refused { code, message } => return Some(wire::status(id, code, &message)),
            Pending::Open {
                path,
                pflags,
                policy_ids,
            } => {
                if let ServerPacket::Handle { handle, .. } = *reply {
                    state.handles.insert(
                        handle.to_vec(),
                        OpenHandle {
                            path: path.clone(),
                            read: Transfer::default(),
                            write: Transfer::default(),
                            failed_writes: 0,
                        },
                    );
                }
                self.policy.record(
                    SftpFields {
                        sftp_operation: "open".into(),
                        path: Some(path),
                        open_flags: Some(wire::open_flags(pflags)),
                        sftp_status: Some(status()),
                        sftp_message: message,
                        ..SftpFields::default()
                    },
                    Decision::Allow,
                    &policy_ids,
                    None,
                );
            }
            Pending::Read { handle, offset } => {
                if let (ServerPacket::Data { data, .. }, Some(h)) =
                    (reply, state.handles.get_mut(&handle))
                {
                    h.read.add(offset, data);
                }
            }
            Pending::Write { handle } => {
                if code != Some(FX_OK) {
                    if let Some(h) = state.handles.get_mut(&handle) {
                        h.failed_writes += 1;
                    }
                }
            }
            Pending::Close { handle } => {
                if let Some(h) = state.handles.remove(&handle) {
                    self.record_close(h, Some(status()), message);
                }
            }
            Pending::Logged {
                operation,
                path,
                new_path,
                policy_ids,
            } => self.policy.record(
                SftpFields {
                    sftp_operation: operation.into(),
                    path: Some(path),
                    new_path,
                    sftp_status: Some(status()),
                    sftp_message: message,
                    ..SftpFields::default()
                },
                Decision::Allow,
                &policy_ids,
                None,
            ),
            Pending::Quiet => {}
        }
        None
    }

    fn record_close(&self, h: OpenHandle, status: Option<String>, message: Option<String>) {
        let read = h.read.summary();
        let write = h.write.summary();
        let mut notes = Vec::new();
        if let Some(n) = &read.not_sequential {
            notes.push(format!("reads: {n}"));
        }
        if let Some(n) = &write.not_sequential {
            notes.push(format!("writes: {n}"));
        }
        if h.failed_writes > 0 {
            notes.push(format!(
                "{} writes failed in the server; the write hash covers what was sent",
                h.failed_writes
            ));
        }
        if status.is_none() {
            notes.push("the channel ended with the handle open".into());
        }
        let moved = |t: &wire::TransferSummary| (t.bytes > 0).then_some(t.bytes);
        self.policy.record(
            SftpFields {
                sftp_operation: "close".into(),
                path: Some(h.path),
                sftp_status: status,
                sftp_message: message,
                bytes_read: moved(&read),
                read_sha256: read.sha256.filter(|_| read.bytes > 0),
                bytes_written: moved(&write),
                write_sha256: write.sha256.filter(|_| write.bytes > 0),
                hash_note: (!notes.is_empty()).then(|| notes.join("; ")),
                ..SftpFields::default()
            },
            Decision::Allow,
            &[],
            None,
        );
    }
}

impl Drop for SftpRelay {
    /// Handles the client never closed still moved bytes: write them down.
    fn drop(&mut self) {
        let handles: Vec<OpenHandle> = self.lock().handles.drain().map(|(_, h)| h).collect();
        for h in handles {
            self.record_close(h, None, None);
        }
    }
}

/// Ends a channel whose server side broke the SFTP stream: the reason on stderr, EOF, close.
pub(super) async fn end_channel(to: &russh::ChannelWriteHalf<russh::server::Msg>, why: &str) {
    let _ = to
        .extended_data_bytes(1, bytes::Bytes::from(format!("portcullis: {why}\r\n")))
        .await;
    let _ = to.eof().await;
    let _ = to.close().await;
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests: a failure is a test failure"
)]
mod tests {
    use super::*;
    use portcullis_policy::{Context, PolicySet, Principal, PrincipalKind, Target};

    type Events = Arc<Mutex<Vec<(SftpFields, Decision, Option<String>)>>>;

    /// A policy set parsed from Cedar text decides; events go to a list.
    struct Recorded {
        set: PolicySet,
        events: Events,
    }

    impl FileDecisions for Recorded {
        fn decide(
            &self,
            action: Action,
            operation: &str,
            path: &str,
            recursive: bool,
        ) -> Result<Vec<String>, Refused> {
            let request = Request {
                principal: Principal {
                    kind: PrincipalKind::User,
                    id: "alice".into(),
                    email: None,
                    name: None,
                    groups: Vec::new(),
                },
                action,
                target: Target {
                    name: "web".into(),
                    protocol: "ssh".into(),
                    labels: Default::default(),
                },
                context: Context {
                    hour: 10,
                    weekday: 3,
                    file: Some(FileAccess {
                        operation: operation.into(),
                        path: path.into(),
                        recursive,
                    }),
                    ..Context::default()
                },
            };
            crate::policy::outcome(self.set.decide(&request))
                .map(|a| a.policy_ids)
                .map_err(|r| refused(operation, path, r))
        }

        fn record(&self, f: SftpFields, d: Decision, _: &[String], reason: Option<String>) {
            self.events.lock().unwrap().push((f, d, reason));
        }
    }

    fn relay() -> (SftpRelay, Events) {
        let set = PolicySet::load(vec![(
            "files.cedar".to_string(),
            r#"@id("sftp") permit (principal, action == Portcullis::Action::"ssh_sftp", resource);
               @id("no-secret-reads") forbid (principal, action == Portcullis::Action::"ssh_sftp", resource)
               when { context.sftp_operation == "read" && context.path like "/etc/secret/*" };"#
                .to_string(),
        )])
        .unwrap();
        let events = Events::default();
        let relay = SftpRelay::new(Recorded {
            set,
            events: Arc::clone(&events),
        });
        (relay, events)
    }

    fn packet(kind: u8, parts: &[&[u8]]) -> Vec<u8> {
        let body: Vec<u8> = parts.concat();
        let mut out = ((body.len() + 1) as u32).to_be_bytes().to_vec();
        out.push(kind);
        out.extend(body);
        out
    }

    fn s(b: &[u8]) -> Vec<u8> {
        let mut out = (b.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(b);
        out
    }

    fn n(v: u32) -> Vec<u8> {
        v.to_be_bytes().to_vec()
    }

    fn open(id: u32, path: &[u8], pflags: u32) -> Vec<u8> {
        packet(3, &[&n(id), &s(path), &n(pflags), &n(0)])
    }

    fn handle(id: u32, h: &[u8]) -> Vec<u8> {
        packet(102, &[&n(id), &s(h)])
    }

    fn ok(id: u32) -> Vec<u8> {
        wire::status(id, FX_OK, "")
    }

    #[test]
    fn a_refused_request_never_goes_upstream_and_its_answer_takes_its_turn() {
        let (relay, events) = relay();
        let init = packet(1, &[&n(3)]);
        let secret = open(1, b"/etc//secret/./db.key", wire::FXF_READ);
        let other = open(2, b"/tmp/y", wire::FXF_READ);
        // Split mid-packet: nothing is forwarded until a request is whole.
        let all = [init.clone(), secret, other.clone()].concat();
        let (a, b) = all.split_at(init.len() + 7);
        let mut up = relay.client_bytes(a).unwrap();
        up.extend(relay.client_bytes(b).unwrap());
        assert_eq!(up, [init, wire::realpath(1, b"/"), other].concat());

        // The server's VERSION loses copy-data; its answer to the stand-in becomes the refusal.
        let version = wire::version(
            3,
            &[(b"posix-rename@openssh.com", b"1"), (b"copy-data", b"1")],
        );
        let name = packet(104, &[&n(1), &n(1), &s(b"/"), &s(b"/"), &n(0)]);
        let down = relay
            .server_bytes(&[version, name, handle(2, b"h2")].concat())
            .unwrap();
        let mut framer = Framer::default();
        framer.push(&down);
        let mut replies = Vec::new();
        while let Some(p) = framer.next_packet().unwrap() {
            replies.push(p);
        }
        assert_eq!(
            replies[0],
            wire::version(3, &[(b"posix-rename@openssh.com", b"1")])
        );
        let ServerPacket::Status {
            id: 1,
            code,
            message,
        } = ServerPacket::decode(&replies[1]).unwrap()
        else {
            panic!("not a status")
        };
        assert_eq!(code, FX_PERMISSION_DENIED);
        let message = String::from_utf8_lossy(message);
        assert!(
            message.contains("read of `/etc/secret/db.key` denied by policy"),
            "{message}"
        );
        assert_eq!(replies[2], handle(2, b"h2"));

        let events = events.lock().unwrap();
        let (denied, decision, reason) = &events[0];
        assert_eq!(*decision, Decision::Deny);
        assert_eq!(denied.sftp_operation, "open");
        assert!(reason.as_deref().unwrap().contains("no-secret-reads"));
        let (opened, decision, _) = &events[1];
        assert_eq!(*decision, Decision::Allow);
        assert_eq!(opened.path.as_deref(), Some("/tmp/y"));
        assert_eq!(opened.sftp_status.as_deref(), Some("ok"));
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn a_handle_closes_with_its_bytes_and_hash_or_says_why_there_is_none() {
        let (relay, events) = relay();
        let write = |id: u32, h: &[u8], offset: u64, data: &[u8]| {
            packet(6, &[&n(id), &s(h), &offset.to_be_bytes(), &s(data)])
        };
        let read = |id: u32, h: &[u8], offset: u64| {
            packet(5, &[&n(id), &s(h), &offset.to_be_bytes(), &n(100)])
        };
        let data = |id: u32, d: &[u8]| packet(103, &[&n(id), &s(d)]);
        let close = |id: u32, h: &[u8]| packet(4, &[&n(id), &s(h)]);
        let flags = wire::FXF_WRITE | wire::FXF_CREAT | wire::FXF_TRUNC;
        relay.client_bytes(&open(1, b"/tmp/w", flags)).unwrap();
        relay.server_bytes(&handle(1, b"hw")).unwrap();
        relay
            .client_bytes(&[write(2, b"hw", 0, b"hello "), write(3, b"hw", 6, b"world")].concat())
            .unwrap();
        relay.server_bytes(&[ok(2), ok(3)].concat()).unwrap();
        relay.client_bytes(&close(4, b"hw")).unwrap();
        relay.server_bytes(&ok(4)).unwrap();

        // Reads answered out of file order: counted, not hashed.
        relay
            .client_bytes(&open(5, b"/tmp/r", wire::FXF_READ))
            .unwrap();
        relay.server_bytes(&handle(5, b"hr")).unwrap();
        relay
            .client_bytes(&[read(6, b"hr", 5), read(7, b"hr", 0)].concat())
            .unwrap();
        relay
            .server_bytes(&[data(6, b"world"), data(7, b"hello")].concat())
            .unwrap();
        relay.client_bytes(&close(8, b"hr")).unwrap();
        relay.server_bytes(&ok(8)).unwrap();

        let events = events.lock().unwrap();
        let closes: Vec<&SftpFields> = events
            .iter()
            .map(|(f, _, _)| f)
            .filter(|f| f.sftp_operation == "close")
            .collect();
        assert_eq!(closes[0].path.as_deref(), Some("/tmp/w"));
        assert_eq!(closes[0].bytes_written, Some(11));
        assert_eq!(
            closes[0].write_sha256.as_deref(),
            Some("b94d27b9934d3e08a52e52d7da7dabfac484efe37a5380ee9088f7ace2efcde9")
        );
        assert_eq!(closes[0].hash_note, None);
        assert_eq!(closes[1].bytes_read, Some(10));
        assert_eq!(closes[1].read_sha256, None);
        assert!(closes[1].hash_note.as_deref().unwrap().contains("offset 0"));
    }

    #[test]
    fn unrelayed_extensions_are_refused_and_a_reused_id_breaks_the_stream() {
        let (relay, events) = relay();
        let copy = packet(200, &[&n(1), &s(b"copy-data"), &s(b"h"), &[0; 8], &[0; 8]]);
        assert_eq!(relay.client_bytes(&copy).unwrap(), wire::realpath(1, b"/"));
        let name = packet(104, &[&n(1), &n(1), &s(b"/"), &s(b"/"), &n(0)]);
        let answer = relay.server_bytes(&name).unwrap();
        let ServerPacket::Status { code, .. } = ServerPacket::decode(&answer).unwrap() else {
            panic!("not a status")
        };
        assert_eq!(code, FX_OP_UNSUPPORTED);
        let stat = packet(17, &[&n(2), &s(b"/tmp")]);
        relay.client_bytes(&stat).unwrap();
        let why = relay.client_bytes(&stat).unwrap_err();
        assert!(why.contains("request id 2 reused"), "{why}");
        // Broken for good, whichever side speaks next.
        assert!(relay.server_bytes(&ok(2)).is_err());
        let events = events.lock().unwrap();
        assert_eq!(events[0].0.sftp_operation, "extension:copy-data");
        assert_eq!(events.last().unwrap().0.sftp_operation, "protocol_error");
        assert_eq!(events.last().unwrap().1, Decision::Error);
    }

    #[test]
    fn an_oversized_reply_breaks_the_stream_without_buffering_it() {
        let (relay, _events) = relay();
        let mut huge = n(u32::MAX);
        huge.push(103);
        let why = relay.server_bytes(&huge).unwrap_err();
        assert!(why.contains("over the limit"), "{why}");
    }

    #[test]
    fn paths_are_resolved_by_name_before_policy_sees_them() {
        for (given, seen) in [
            ("/etc/secret/key", "/etc/secret/key"),
            ("/etc//secret/./key", "/etc/secret/key"),
            ("/tmp/../etc/secret/key", "/etc/secret/key"),
            ("/../../etc/secret", "/etc/secret"),
            ("/", "/"),
            ("", "."),
            (".", "."),
            ("a/../../b", "../b"),
            ("docs/./x/", "docs/x"),
        ] {
            assert_eq!(normalize(given), seen, "{given}");
        }
    }
}
