//! The local control socket the CLI talks to: one JSON request line, one JSON answer.
//!
//! Who is asking comes from the kernel (`SO_PEERCRED`), never from the request. A normal
//! user sees only their own connections; only root may detach. The server runs on its
//! own thread and runtime so a busy data plane cannot starve it.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditEvent, EventKind};
use crate::ebpf::{AttachedProgram, Counters};
use crate::identity::{IdentityService, LoginStarted, SessionView};
use crate::proxy::{ConnectionView, Proxy};

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
    Error {
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub agent_pid: u32,
    pub version: String,
    pub started_ms: u64,
    /// The uid the kernel reported for this request; connections are filtered by it unless 0.
    pub viewer_uid: u32,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub programs: Vec<ProgramView>,
    pub counters: CountersView,
    pub pending_origins: usize,
    pub targets: Vec<TargetView>,
    pub open_connections: usize,
    pub connections: Vec<ConnectionView>,
    pub policy: crate::policy::PolicyStatus,
    /// Whether the audit trail is being written, and what the agent does while it is not.
    #[serde(default)]
    pub audit: AuditWriteStatus,
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
    pub upstream: Option<String>,
}

/// Everything the control server answers from.
pub struct ControlState {
    pub proxy: Arc<Proxy>,
    pub identity: Arc<IdentityService>,
    pub policies: Arc<crate::policy::Policies>,
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
        std::fs::create_dir_all(dir).map_err(err)?;
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
    loop {
        let stream = tokio::select! {
            () = state.shutdown.cancelled() => return,
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
        tokio::spawn(async move {
            if let Err(e) = answer(stream, &state).await {
                tracing::debug!(error = %e, "control request failed");
            }
        });
    }
}

async fn answer(stream: UnixStream, state: &ControlState) -> std::io::Result<()> {
    let uid = stream.peer_cred()?.uid();
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
                    r = respond(req, uid, state) => r,
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
            Err(message) => Response::Error { message },
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
            Err(message) => Response::Error { message },
        },
        // Dropping `login_wait` cancels the login.
        _ = tokio::io::AsyncReadExt::read(read, &mut probe) => return Ok(()),
    };
    send(&mut write, &result).await?;
    write.shutdown().await
}

async fn respond(req: Request, uid: u32, state: &ControlState) -> Response {
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
                    Err(message) => Response::Error { message },
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
        Request::Status => Response::Status(Box::new(status(uid, state))),
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

fn status(uid: u32, state: &ControlState) -> StatusReport {
    let proxy = &state.proxy;
    let enforcement = proxy.enforcement();
    let filter = if uid == 0 { None } else { Some(uid) };
    StatusReport {
        agent_pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        started_ms: state.started_ms,
        viewer_uid: uid,
        cgroup: enforcement.cgroup.clone(),
        pin_dir: enforcement.pin_dir.clone(),
        programs: enforcement.programs.iter().map(ProgramView::from).collect(),
        counters: enforcement.counters().into(),
        pending_origins: enforcement.pending_len(),
        targets: proxy
            .targets()
            .iter()
            .map(|t| TargetView {
                name: t.name.clone(),
                protocol: t.protocol.to_string(),
                address: t.address.to_string(),
                port: t.port,
                upstream: t.upstream.map(|u| u.to_string()),
            })
            .collect(),
        open_connections: proxy.registry.len(),
        connections: proxy.registry.views(filter),
        policy: state.policies.status(),
        audit: {
            let audit = proxy.audit();
            let failure = audit.write_failure();
            AuditWriteStatus {
                writable: failure.is_none(),
                on_write_failure: match audit.on_write_failure() {
                    crate::config::OnWriteFailure::Refuse => "refuse",
                    crate::config::OnWriteFailure::KeepEnforcing => "keep_enforcing",
                }
                .to_string(),
                failure: failure.filter(|_| uid == 0),
            }
        },
    }
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
