//! The local control socket the CLI talks to: one JSON request line, one JSON answer.
//!
//! Who is asking comes from the kernel (`SO_PEERCRED`), never from the request. A normal
//! user sees only the targets policy lets them use and their own connections; only root
//! may detach. The server runs on its own thread and runtime so a busy data plane cannot
//! starve it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::admission::ConnectionView;
use crate::approvals::{ApprovalRequest, ApprovalStore, Ask, Asked, Grant, Viewer};
use crate::audit::{AuditEvent, EventKind};
use crate::ebpf::{AttachedProgram, Counters};
use crate::identity::{IdentityService, LoginStarted, SessionView};
use crate::proxy::Proxy;

const MAX_REQUEST: u64 = 64 * 1024;

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Remove enforcement and stop the agent (root only).
    Detach,
    /// Start a device-grant login for the caller's uid. The agent answers `LoginStarted`
    /// at once and, with `wait`, the result on a second line; the client closing the
    /// connection before that (Ctrl-C) cancels the login.
    Login {
        wait: bool,
    },
    /// Log in with a workload token from a trusted issuer.
    LoginToken {
        token: String,
    },
    Whoami,
    Logout,
    /// All sessions (root only).
    LoginsList,
    /// End the sessions of a uid or subject (root only).
    LoginsRevoke {
        selector: String,
    },
    /// Ask for a grant: the caller's identity may do `actions` on `target` for a while,
    /// once approved.
    GrantAsk {
        target: String,
        actions: Vec<String>,
        duration_secs: u64,
        reason: String,
    },
    /// Requests the caller may see (their own, and those their groups are asked to
    /// approve); pending ones only unless `all`.
    ApprovalsList {
        all: bool,
    },
    ApprovalsShow {
        id: String,
    },
    /// Approve or deny a request, as the caller's own login; `break_glass`: approve one's
    /// own request as a member of the emergency group.
    ApprovalsDecide {
        id: String,
        approve: bool,
        reason: String,
        #[serde(default)]
        break_glass: bool,
    },
    GrantsList {
        all: bool,
    },
    GrantsRevoke {
        id: String,
        reason: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Status(Box<StatusReport>),
    Detached {
        pin_dir: PathBuf,
    },
    LoginStarted(LoginStarted),
    LoggedIn(SessionView),
    Whoami {
        session: Option<SessionView>,
    },
    LoggedOut {
        revoked: bool,
        closed_connections: usize,
    },
    Logins {
        sessions: Vec<SessionView>,
    },
    Revoked {
        uids: Vec<u32>,
        closed_connections: usize,
    },
    ApprovalRequest(Box<ApprovalRequest>),
    ApprovalRequests {
        requests: Vec<ApprovalRequest>,
    },
    Grants {
        grants: Vec<Grant>,
    },
    GrantRevoked {
        grant: Box<Grant>,
        closed_connections: usize,
    },
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub agent_pid: u32,
    pub version: String,
    pub started_ms: u64,
    /// The uid the kernel reported for this request. Root sees everything; anyone else
    /// sees only the targets policy lets them connect to and their own connections.
    pub viewer_uid: u32,
    /// The `insecure.*` settings in force, shown to everyone: they change what a login means.
    #[serde(default)]
    pub insecure: Vec<String>,
    /// Why a non-root viewer has no identity (no login), so no target is listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin_dir: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub programs: Vec<ProgramView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub counters: Option<CountersView>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_origins: Option<usize>,
    pub targets: Vec<TargetView>,
    /// Root: every open connection; anyone else: their own.
    pub open_connections: usize,
    pub connections: Vec<ConnectionView>,
    /// Root only: the directory, and a refused reload's errors, say how policy is written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<crate::policy::PolicyStatus>,
    /// Whether the audit trail is being written, and what the agent does while it is not.
    #[serde(default)]
    pub audit: AuditWriteStatus,
    /// Active grants made by breaking the glass (root: all; anyone else: those they may see).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub break_glass_grants: Vec<BreakGlassGrantView>,
}

/// An open break-glass grant, as `status` shows it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BreakGlassGrantView {
    pub id: String,
    pub request_id: String,
    /// Who broke the glass (the requester).
    pub who: String,
    pub target: String,
    pub actions: Vec<String>,
    pub expires_ms: u64,
    /// The reason given with `--break-glass`.
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AuditWriteStatus {
    pub writable: bool,
    /// `refuse` or `keep_enforcing` (`audit.on_write_failure`).
    pub on_write_failure: String,
    /// Since when, why (root only: the error names paths), and how many events were lost.
    pub failure: Option<crate::audit::WriteFailure>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProgramView {
    pub name: String,
    pub hook: String,
    pub pin: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CountersView {
    pub redirected: u64,
    pub published: u64,
    pub denied_foreign_netns: u64,
    pub denied_protocol: u64,
    pub denied_no_storage: u64,
    pub exempt_agent: u64,
    pub publish_failed: u64,
}

impl From<Counters> for CountersView {
    fn from(c: Counters) -> Self {
        Self {
            redirected: c.redirected,
            published: c.published,
            denied_foreign_netns: c.denied_foreign_netns,
            denied_protocol: c.denied_protocol,
            denied_no_storage: c.denied_no_storage,
            exempt_agent: c.exempt_agent,
            publish_failed: c.publish_failed,
        }
    }
}

impl From<&AttachedProgram> for ProgramView {
    fn from(p: &AttachedProgram) -> Self {
        Self {
            name: p.name.to_string(),
            hook: p.hook.to_string(),
            pin: p.pin.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetView {
    pub name: String,
    pub protocol: String,
    pub address: String,
    pub port: u16,
    /// Root only; `None` for root means the original destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
}

/// Everything the control server answers from.
pub struct ControlState {
    pub proxy: Arc<Proxy>,
    pub identity: Arc<IdentityService>,
    pub policies: Arc<crate::policy::Policies>,
    pub approvals: Arc<ApprovalStore>,
    /// The data plane's runtime: identity work (HTTP to the issuer) runs there.
    pub data_plane: tokio::runtime::Handle,
    pub started_ms: u64,
    /// Cancelled to make the agent drain and exit.
    pub shutdown: CancellationToken,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("control socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Binds the socket; anyone may connect (answers depend on the peer's uid).
pub fn bind(path: &Path) -> Result<std::os::unix::net::UnixListener, ControlError> {
    let err = |source| ControlError::Bind {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        // Readable by all (everyone may talk to the agent), writable by root only: in a
        // directory others could write, a user could replace the socket with their own.
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(err)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

pub async fn serve(listener: UnixListener, state: Arc<ControlState>) {
    // Each request is this loop's own task: shutdown waits for the ones in flight (bounded by
    // their read timeout and the wait below) instead of dropping them mid-answer.
    let requests = tokio_util::task::TaskTracker::new();
    loop {
        let stream = tokio::select! {
            () = state.shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    tracing::warn!(error = %e, "control accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let state = Arc::clone(&state);
        requests.spawn(async move {
            if let Err(e) = answer(stream, &state).await {
                tracing::debug!(error = %e, "control request failed");
            }
        });
    }
    requests.close();
    if tokio::time::timeout(Duration::from_secs(5), requests.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            left = requests.len(),
            "control requests still running at shutdown"
        );
    }
}

async fn answer(stream: UnixStream, state: &ControlState) -> std::io::Result<()> {
    let cred = stream.peer_cred()?;
    let uid = cred.uid();
    let peer = Peer {
        uid,
        gid: cred.gid(),
        pid: cred.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
    };
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut limited = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST));
    let read = tokio::time::timeout(Duration::from_secs(10), limited.read_line(&mut line)).await;
    let response = match read {
        Err(_) => Response::Error {
            message: "request timed out".into(),
        },
        Ok(Err(e)) => Response::Error {
            message: format!("cannot read request: {e}"),
        },
        Ok(Ok(_)) => match serde_json::from_str::<Request>(line.trim()) {
            Ok(Request::Login { wait }) => {
                return login(wait, uid, state, &mut limited, write).await
            }
            Ok(req) => {
                // The client sends nothing after its request: a read that ends means it went
                // away (Ctrl-C), and dropping `respond` then cancels what it was waiting for.
                let mut probe = [0u8; 1];
                tokio::select! {
                    r = respond(req, peer, state) => r,
                    _ = tokio::io::AsyncReadExt::read(&mut limited, &mut probe) => return Ok(()),
                }
            }
            Err(e) => Response::Error {
                message: format!("malformed request: {e}"),
            },
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

async fn send(
    write: &mut tokio::net::unix::OwnedWriteHalf,
    response: &Response,
) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(response).map_err(std::io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await
}

/// The device login, as one conversation: the code and address at once, then (if the
/// client waits) the result. The client going away at any point cancels the login.
async fn login<R>(
    wait: bool,
    uid: u32,
    state: &ControlState,
    read: &mut R,
    mut write: tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let identity = Arc::clone(&state.identity);
    let started = on_data_plane(&state.data_plane, async move {
        match identity.login_start(uid).await {
            Ok(s) => Response::LoginStarted(s),
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        }
    })
    .await;
    let login_id = match &started {
        Response::LoginStarted(s) => s.login_id,
        _ => return send(&mut write, &started).await,
    };
    if let Err(e) = send(&mut write, &started).await {
        state.identity.cancel_login(login_id);
        return Err(e);
    }
    if !wait {
        return write.shutdown().await;
    }
    let mut probe = [0u8; 1];
    let result = tokio::select! {
        r = state.identity.login_wait(uid, login_id) => match r {
            Ok(s) => Response::LoggedIn(s),
            Err(e) => Response::Error {
                message: e.to_string(),
            },
        },
        // Dropping `login_wait` cancels the login.
        _ = tokio::io::AsyncReadExt::read(read, &mut probe) => return Ok(()),
    };
    send(&mut write, &result).await?;
    write.shutdown().await
}

/// Who is asking, as the kernel reported it (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy)]
struct Peer {
    uid: u32,
    gid: u32,
    pid: u32,
}

async fn respond(req: Request, peer: Peer, state: &ControlState) -> Response {
    let uid = peer.uid;
    let identity = Arc::clone(&state.identity);
    let root_only = || Response::Error {
        message: "only root may do this".into(),
    };
    match req {
        Request::Login { .. } => Response::Error {
            message: "internal error: a login is a conversation".into(),
        },
        Request::LoginToken { token } => {
            on_data_plane(&state.data_plane, async move {
                match identity.login_token(uid, &token).await {
                    Ok(s) => Response::LoggedIn(s),
                    Err(e) => Response::Error {
                        message: e.to_string(),
                    },
                }
            })
            .await
        }
        Request::Whoami => Response::Whoami {
            session: identity.whoami(uid),
        },
        Request::Logout => {
            on_data_plane(&state.data_plane, async move {
                match identity
                    .end_session(uid, EventKind::Logout, "logged out")
                    .await
                {
                    Some((revoked, closed_connections)) => Response::LoggedOut {
                        revoked,
                        closed_connections,
                    },
                    None => Response::Error {
                        message: "you are not logged in".into(),
                    },
                }
            })
            .await
        }
        Request::LoginsList if uid == 0 => Response::Logins {
            sessions: identity.list(),
        },
        Request::LoginsRevoke { selector } if uid == 0 => {
            on_data_plane(&state.data_plane, async move {
                let uids = identity.select(&selector);
                if uids.is_empty() {
                    return Response::Error {
                        message: format!("no session matches `{selector}`"),
                    };
                }
                let mut closed = 0;
                for u in &uids {
                    if let Some((_, c)) = identity
                        .end_session(*u, EventKind::LoginRevoked, "revoked by root")
                        .await
                    {
                        closed += c;
                    }
                }
                Response::Revoked {
                    uids,
                    closed_connections: closed,
                }
            })
            .await
        }
        Request::LoginsList | Request::LoginsRevoke { .. } => root_only(),
        Request::GrantAsk {
            target,
            actions,
            duration_secs,
            reason,
        } => request_grant(peer, state, &target, actions, duration_secs, reason),
        Request::ApprovalsList { all } => Response::ApprovalRequests {
            requests: state.approvals.requests(&viewer(peer, state), all),
        },
        Request::ApprovalsShow { id } => match state.approvals.request(&id, &viewer(peer, state)) {
            Ok(r) => Response::ApprovalRequest(Box::new(r)),
            Err(e) => error(e),
        },
        Request::ApprovalsDecide {
            id,
            approve,
            reason,
            break_glass,
        } => {
            // The approver's groups are those of their login's token now.
            let approver = match state.identity.resolve(&peer_origin(peer)) {
                Ok(i) => i,
                Err(e) => return error(e),
            };
            match state
                .approvals
                .decide(&id, &approver, approve, reason, break_glass)
                .await
            {
                Ok(r) => Response::ApprovalRequest(Box::new(r)),
                Err(e) => error(e),
            }
        }
        Request::GrantsList { all } => Response::Grants {
            grants: state.approvals.grants(&viewer(peer, state), all),
        },
        Request::GrantsRevoke { id, reason } => {
            match state.approvals.revoke(&id, &viewer(peer, state), reason) {
                Ok((grant, closed_connections)) => Response::GrantRevoked {
                    grant: Box::new(grant),
                    closed_connections,
                },
                Err(e) => error(e),
            }
        }
        Request::Status if uid == 0 => Response::Status(Box::new(status(state))),
        Request::Status => Response::Status(Box::new(user_status(peer, state))),
        Request::Detach => {
            if uid != 0 {
                return Response::Error {
                    message: "only root may detach enforcement".into(),
                };
            }
            let pin_dir = state.proxy.enforcement().pin_dir.clone();
            if let Err(e) = crate::ebpf::detach(&pin_dir) {
                return Response::Error {
                    message: e.to_string(),
                };
            }
            tracing::warn!(pin_dir = %pin_dir.display(), "enforcement detached by root; stopping");
            state
                .proxy
                .audit()
                .record(AuditEvent::new(EventKind::AgentDetached).reason(format!(
                    "detached by uid 0; pins removed from {}",
                    pin_dir.display()
                )));
            state.shutdown.cancel();
            Response::Detached { pin_dir }
        }
    }
}

fn error(e: impl std::fmt::Display) -> Response {
    Response::Error {
        message: e.to_string(),
    }
}

/// The process behind a control request, as a connection's origin would name it.
fn peer_origin(peer: Peer) -> crate::proxy::Origin {
    crate::proxy::Origin {
        pid: peer.pid,
        tid: peer.pid,
        uid: peer.uid,
        gid: peer.gid,
        comm: std::fs::read_to_string(format!("/proc/{}/comm", peer.pid))
            .map(|c| c.trim_end().to_string())
            .unwrap_or_default(),
        cgroup_id: 0,
        netns_cookie: 0,
        socket_cookie: 0,
        destination: std::net::SocketAddr::from(([0, 0, 0, 0], 0)),
        target_id: 0,
    }
}

fn viewer(peer: Peer, state: &ControlState) -> Viewer {
    Viewer {
        uid: peer.uid,
        identity: state.identity.resolve(&peer_origin(peer)).ok(),
    }
}

/// `portcullis request`: decided as a connection of the caller would be, for each action;
/// a request is made only when the policy asks for approval (not when it permits or denies).
fn request_grant(
    peer: Peer,
    state: &ControlState,
    target: &str,
    actions: Vec<String>,
    duration_secs: u64,
    reason: String,
) -> Response {
    let origin = peer_origin(peer);
    let identity = match state.identity.resolve(&origin) {
        Ok(i) => i,
        Err(e) => return error(e),
    };
    if reason.trim().is_empty() {
        return error("a reason is required (--reason \"INC-4711: …\")");
    }
    let Some(t) = state.proxy.targets().iter().find(|t| t.name == target) else {
        return error(format!("no target `{target}`"));
    };
    let actions = if actions.is_empty() {
        vec!["connect".to_owned()]
    } else {
        actions
    };
    let mut quorums: std::collections::BTreeMap<String, u32> = std::collections::BTreeMap::new();
    let mut policy_ids = Vec::new();
    for name in &actions {
        let Some(action) = portcullis_policy::Action::ALL
            .into_iter()
            .find(|a| a.cedar_name() == name)
        else {
            let known: Vec<&str> = portcullis_policy::Action::ALL
                .iter()
                .map(|a| a.cedar_name())
                .collect();
            return error(format!(
                "unknown action `{name}`; known: {}",
                known.join(", ")
            ));
        };
        let mut request = crate::policy::connect_request(&identity, t, &origin);
        request.action = action;
        match crate::policy::outcome(state.policies.decide(&request)) {
            Ok(_) => {
                return error(format!(
                    "no approval needed: policy already permits {name} on {target} for you"
                ))
            }
            Err(refusal) => match refusal.approval {
                None => return error(format!("denied by policy: {}", refusal.reason)),
                Some(requirement) => {
                    // Several actions need every one's approvers: each group at its largest count.
                    for q in requirement.quorums {
                        let n = quorums.entry(q.group).or_default();
                        *n = (*n).max(q.approvals);
                    }
                    policy_ids.extend(refusal.policy_ids);
                }
            },
        }
    }
    policy_ids.sort();
    policy_ids.dedup();
    let ask = Ask {
        requester: identity,
        asked: Asked::Grant {
            target: target.to_owned(),
            actions,
            duration_secs,
        },
        reason,
        requirement: portcullis_policy::ApprovalRequirement {
            quorums: quorums
                .into_iter()
                .map(|(group, approvals)| portcullis_policy::Quorum { group, approvals })
                .collect(),
        },
        policy_ids,
        timeout: state.policies.current().approval_settings().timeout,
    };
    match state.approvals.ask(ask) {
        Ok(r) => Response::ApprovalRequest(Box::new(r)),
        Err(e) => error(e),
    }
}

/// Runs identity work on the data plane's runtime, where the HTTP client lives.
async fn on_data_plane<F>(handle: &tokio::runtime::Handle, fut: F) -> Response
where
    F: std::future::Future<Output = Response> + Send + 'static,
{
    match handle.spawn(fut).await {
        Ok(r) => r,
        Err(e) => Response::Error {
            message: format!("internal error: {e}"),
        },
    }
}

/// Root's view: the whole host.
fn status(state: &ControlState) -> StatusReport {
    let proxy = &state.proxy;
    let enforcement = proxy.enforcement();
    StatusReport {
        agent_pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_ms: state.started_ms,
        viewer_uid: 0,
        insecure: insecure_settings(proxy),
        identity_error: None,
        cgroup: Some(enforcement.cgroup.clone()),
        pin_dir: Some(enforcement.pin_dir.clone()),
        programs: enforcement.programs.iter().map(ProgramView::from).collect(),
        counters: Some(enforcement.counters().into()),
        pending_origins: Some(enforcement.pending_len()),
        targets: proxy
            .targets()
            .iter()
            .map(|t| TargetView {
                name: t.name.clone(),
                protocol: t.protocol.to_string(),
                address: enforcement.describe_addresses(t),
                port: t.port,
                upstream: t.upstream.map(|u| u.to_string()),
            })
            .collect(),
        open_connections: proxy.registry().len(),
        connections: proxy.registry().views(None),
        policy: Some(state.policies.status()),
        audit: audit_write_status(proxy, true),
        break_glass_grants: break_glass_grants(
            state,
            &Viewer {
                uid: 0,
                identity: None,
            },
        ),
    }
}

/// The active grants made by breaking the glass that `viewer` may see.
fn break_glass_grants(state: &ControlState, viewer: &Viewer) -> Vec<BreakGlassGrantView> {
    state
        .approvals
        .grants(viewer, false)
        .into_iter()
        .filter(|g| g.break_glass)
        .map(|g| {
            let reason = state
                .approvals
                .state_of(&g.request_id)
                .and_then(|r| r.verdicts.into_iter().find(|v| v.break_glass.is_some()))
                .map(|v| v.reason)
                .unwrap_or_default();
            BreakGlassGrantView {
                who: crate::approvals::who(&g.requester),
                id: g.id,
                request_id: g.request_id,
                target: g.target,
                actions: g.actions,
                expires_ms: g.expires_ms,
                reason,
            }
        })
        .collect()
}

/// Anyone else's view: what they may use and what they have open. The targets are those
/// the connect policy permits (or would after approval) for the identity their uid has
/// now, asked as this very process; upstream addresses, the host's enforcement details and
/// how policy is written stay with root.
fn user_status(peer: Peer, state: &ControlState) -> StatusReport {
    let proxy = &state.proxy;
    let origin = peer_origin(peer);
    let resolved = state.identity.resolve(&origin);
    let viewer = Viewer {
        uid: peer.uid,
        identity: resolved.as_ref().ok().cloned(),
    };
    let (targets, identity_error) = match resolved {
        Ok(identity) => {
            let permitted = proxy
                .targets()
                .iter()
                .filter(|t| {
                    let decision = state
                        .policies
                        .decide(&crate::policy::connect_request(&identity, t, &origin));
                    !matches!(decision.effect, portcullis_policy::Effect::Deny)
                })
                .map(|t| TargetView {
                    name: t.name.clone(),
                    protocol: t.protocol.to_string(),
                    address: t.describe_addresses(),
                    port: t.port,
                    upstream: None,
                })
                .collect();
            (permitted, None)
        }
        Err(why) => (Vec::new(), Some(why.to_string())),
    };
    let mut connections = proxy.registry().views(Some(peer.uid));
    for c in &mut connections {
        c.upstream = None;
    }
    StatusReport {
        agent_pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_ms: state.started_ms,
        viewer_uid: peer.uid,
        insecure: insecure_settings(proxy),
        identity_error,
        cgroup: None,
        pin_dir: None,
        programs: Vec::new(),
        counters: None,
        pending_origins: None,
        targets,
        open_connections: connections.len(),
        connections,
        policy: None,
        audit: audit_write_status(proxy, false),
        break_glass_grants: break_glass_grants(state, &viewer),
    }
}

/// Everyone learns whether the trail is written (it decides whether their connections are
/// refused); only root gets the error, which names paths.
fn audit_write_status(proxy: &Proxy, root: bool) -> AuditWriteStatus {
    let audit = proxy.audit();
    let failure = audit.write_failure();
    AuditWriteStatus {
        writable: failure.is_none(),
        on_write_failure: match audit.on_write_failure() {
            crate::config::OnWriteFailure::Refuse => "refuse",
            crate::config::OnWriteFailure::KeepEnforcing => "keep_enforcing",
        }
        .to_string(),
        failure: failure.filter(|_| root),
    }
}

fn insecure_settings(proxy: &Proxy) -> Vec<String> {
    proxy
        .config()
        .insecure
        .enabled()
        .into_iter()
        .map(String::from)
        .collect()
}

/// Client side: sends one request and reads the answer.
pub fn request(socket: &Path, req: &Request) -> Result<Response, String> {
    let mut answers = conversation(socket, req)?;
    answers
        .next()
        .unwrap_or_else(|| Err("the agent closed the connection without an answer".into()))
}

/// Client side: sends one request and yields each answer line as it arrives.
pub fn conversation(
    socket: &Path,
    req: &Request,
) -> Result<impl Iterator<Item = Result<Response, String>>, String> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).map_err(|e| {
        format!(
            "cannot reach the agent at {}: {e} (is `portcullis agent` running?)",
            socket.display()
        )
    })?;
    // Waiting for a login lasts as long as the user takes in the browser.
    let timeout = match req {
        Request::Login { wait: true } => None,
        _ => Some(Duration::from_secs(30)),
    };
    stream
        .set_read_timeout(timeout)
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| format!("sending the request: {e}"))?;
    let lines = std::io::BufReader::new(stream).lines();
    Ok(lines.map(|l| {
        let l = l.map_err(|e| format!("reading the agent's answer: {e}"))?;
        serde_json::from_str(l.trim()).map_err(|e| format!("malformed answer from the agent: {e}"))
    }))
}
