//! The client-facing SSH server (RFC 4252 user auth, RFC 4254 connection protocol) and the
//! relay of session channels to the upstream connection.
//!
//! Ordering rules, each one a bug seen in other SSH proxies:
//! - a channel request is answered inside its callback, once the server answered it (a
//!   later request would overwrite russh's pending-reply flag);
//! - client data is forwarded from the `data` callback, so it cannot overtake the channel
//!   open or the exec reply that came before it on the wire;
//! - the server's side of a channel is read by one task per channel into the client's
//!   window, which keeps exit-status, EOF and close in the server's order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use russh::client;
use russh::keys::ssh_key::HashAlg;
use russh::server::{self, Auth, Msg, Session};
use russh::{Channel, ChannelId, ChannelMsg, ChannelWriteHalf, Disconnect, Pty, Sig};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::approval::{self, HeldInput, Pushed, SharedHold};
use super::forward::ForwardLog;
use super::reader::Reader;
use super::terminal::{self, LineVerdict, MaskPlan, PtyInfo, RecordingPlan, TerminalPlan};
use super::upstream::{KnownHosts, UpstreamHandler};
use super::writer::{ConnectionBudget, UpstreamWriter};
use super::{ChannelKind, ChannelTap, Shared};
use crate::admission::{Gate, Incoming, OpenError, OpenSession, Opening, Refusal};
use crate::audit::{AuditEvent, Decision, EventKind};
use crate::ssh_ca::UserGrant;
use portcullis_core::{Identity, SshFields};
use portcullis_policy::{Action, Forward, Obligation, Request};

/// How long a channel request waits for the server's answer before it fails.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// Messages of one upstream channel russh buffers before its session loop waits for the
/// channel's reader (each at most one 32 KiB packet); the reader (`reader.rs`) decides how
/// far ahead of the client it reads.
const UPSTREAM_CHANNEL_BUFFER: usize = 1024;
/// Environment variables passed upstream; everything else is refused (an allowlist: a
/// variable such as LD_PRELOAD must never reach a server whose AcceptEnv is too wide).
fn env_allowed(name: &str) -> bool {
    matches!(name, "LANG" | "TERM" | "GIT_PROTOCOL" | "COLORTERM")
        || name.strip_prefix("LC_").is_some_and(|rest| {
            !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
        })
}

pub(super) async fn serve(
    gate: Arc<Gate>,
    shared: Arc<Shared>,
    incoming: Incoming,
    client: TcpStream,
) {
    if let Err(e) = client.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY on the client socket");
    }
    let identity = gate.resolve(&incoming.origin).map_err(|e| e.to_string());
    let principals = super::host_principals(&incoming.target, incoming.origin.destination.ip());
    let host = match shared.ca.host_identity(&principals) {
        Ok(h) => h,
        Err(e) => {
            gate.record_refusal(Refusal::of(
                &incoming,
                identity.as_ref().ok(),
                e.to_string(),
            ));
            return;
        }
    };
    let keepalive = incoming.target.ssh.as_ref().map_or(0, |s| s.keepalive_secs);
    let config = server::Config {
        server_id: russh::SshId::Standard("SSH-2.0-portcullis".into()),
        methods: russh::MethodSet::from(&[russh::MethodKind::None][..]),
        auth_rejection_time: Duration::from_millis(10),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host.key],
        certificates: vec![host.certificate],
        // OpenSSH's sshd has no inactivity timeout by default; keepalives find dead peers.
        inactivity_timeout: None,
        keepalive_interval: (keepalive > 0).then(|| Duration::from_secs(keepalive)),
        keepalive_max: 3,
        nodelay: true,
        ..server::Config::default()
    };
    let (opened_tx, mut opened_rx) = tokio::sync::oneshot::channel();
    let own_handle = Arc::new(Mutex::new(None));
    let handler = ClientHandler {
        gate: Arc::clone(&gate),
        shared,
        incoming,
        identity,
        ssh_user: None,
        refused: None,
        open: None,
        channels: HashMap::new(),
        pumps: JoinSet::new(),
        opened: Some(opened_tx),
        own_handle: Arc::clone(&own_handle),
        recordings_started: Arc::new(AtomicU64::new(0)),
    };
    let mut running = match server::run_stream(Arc::new(config), client, handler).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "SSH start-up with the client failed");
            return;
        }
    };
    let handle = running.handle();
    *own_handle.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle.clone());
    // The open connection's cancel token (logout, session end, agent drain) arrives once
    // the connection opened; until then only the session itself can end.
    let ended = tokio::select! {
        r = &mut running => Some(r),
        token = &mut opened_rx => match token {
            Ok(token) => tokio::select! {
                r = &mut running => Some(r),
                () = token.cancelled() => None,
            },
            Err(_) => Some((&mut running).await),
        },
    };
    match ended {
        Some(Ok(())) => {}
        Some(Err(e)) => tracing::debug!(error = %e, "SSH session ended with an error"),
        None => {
            let _ = handle
                .disconnect(
                    Disconnect::ByApplication,
                    "portcullis: the connection was closed (logout, session end or agent shutdown)"
                        .into(),
                    String::new(),
                )
                .await;
            let _ = tokio::time::timeout(Duration::from_secs(5), running).await;
        }
    }
}

struct ChannelState {
    /// The client's side of the channel on its way to the server, queued per channel.
    upstream: UpstreamWriter,
    /// The server's answers to this channel's requests, in order.
    replies: mpsc::Receiver<bool>,
    pump: tokio::task::AbortHandle,
    tap: ChannelTap,
    /// The client's pty request, for the recording's header.
    pty: Option<PtyInfo>,
    /// The client's input while the channel's shell or exec waits for approval.
    hold: Option<SharedHold>,
    /// The task that waits for that approval, and the request it waits for.
    waiter: Option<(tokio::task::AbortHandle, String)>,
}

/// What a shell or exec request may do, once decided.
enum ChannelDecision {
    Allowed {
        policy_ids: Vec<String>,
        mask: Option<MaskPlan>,
    },
    /// The policy asks for approval: the channel waits for it.
    NeedsApproval {
        refusal: crate::policy::PolicyRefusal,
        mask: Option<MaskPlan>,
        /// Decided again once approved.
        request: Box<Request>,
    },
}

struct Upstream {
    handle: client::Handle<UpstreamHandler>,
    session: OpenSession,
    /// Whether a remote forward a policy allowed is in place (see `UpstreamHandler`).
    remote_forwards: Arc<std::sync::atomic::AtomicBool>,
    /// Whether agent forwarding a policy allowed was asked of the server.
    agent_forwarding: Arc<std::sync::atomic::AtomicBool>,
    /// What the client's channels may have waiting for the server, together.
    budget: ConnectionBudget,
}

struct ClientHandler {
    gate: Arc<Gate>,
    shared: Arc<Shared>,
    incoming: Incoming,
    identity: Result<Identity, String>,
    ssh_user: Option<String>,
    /// Why the connection was refused, once it was: every later auth attempt fails too.
    refused: Option<String>,
    open: Option<Upstream>,
    channels: HashMap<ChannelId, ChannelState>,
    /// One task per channel reads the server's side; ends with the handler.
    pumps: JoinSet<()>,
    /// Tells `serve` the connection opened, with its cancel token.
    opened: Option<tokio::sync::oneshot::Sender<tokio_util::sync::CancellationToken>>,
    /// This session's own handle: remote forwards open their channels to the client with it.
    own_handle: Arc<Mutex<Option<server::Handle>>>,
    /// The terminals of this connection that started a recording (or tried to): the next
    /// one's number. A number is never used twice, even after a start that failed, as its
    /// file may exist. Shared with the tasks that start channels once approved.
    recordings_started: Arc<AtomicU64>,
}

/// A refusal of the connection: the audit decision and why.
struct Refused {
    decision: Decision,
    policy_ids: Vec<String>,
    reason: String,
}

impl Refused {
    fn error(reason: String) -> Self {
        Self {
            decision: Decision::Error,
            policy_ids: Vec::new(),
            reason,
        }
    }
}

impl ClientHandler {
    fn request(&self, identity: &Identity, action: Action) -> Request {
        let mut r =
            crate::policy::connect_request(identity, &self.incoming.target, &self.incoming.origin);
        r.action = action;
        r.context.ssh_user = self.ssh_user.clone();
        r
    }

    fn event(&self, kind: EventKind, channel: &str) -> AuditEvent {
        let mut ev = AuditEvent::new(kind);
        ev.connection_id = Some(self.incoming.id);
        ev.protocol = Some(self.incoming.target.protocol.name());
        ev.target = Some(self.incoming.target.name.as_str().into());
        ev.identity = self.identity.as_ref().ok().cloned().map(Into::into);
        ev.origin = Some(self.incoming.origin.clone().into());
        ev.client = Some(self.incoming.peer.to_string().into());
        ev.ssh = Some(Box::new(SshFields {
            ssh_user: self.ssh_user.as_deref().map(Into::into),
            channel: Some(channel.to_string()),
            ..SshFields::default()
        }));
        ev
    }

    /// Admits the connection for `user`: policy, upstream connect, host key, login, and the
    /// durable `connection.opened`.
    async fn admit(&mut self, user: &str) -> Result<Upstream, Refused> {
        let identity = self.identity.clone().map_err(Refused::error)?;
        if let Some(reason) = self.gate.refusal_reason() {
            return Err(Refused::error(reason));
        }
        self.ssh_user = Some(user.to_string());
        let request = self.request(&identity, Action::Connect);
        let allowed = self.gate.decide_connect(&request).map_err(|r| Refused {
            reason: match r.decision {
                Decision::Deny => format!("denied by policy: {}", r.reason),
                _ => r.reason,
            },
            decision: r.decision,
            policy_ids: r.policy_ids,
        })?;
        if let Some(full) = self.gate.at_capacity() {
            return Err(Refused::error(full.to_string()));
        }
        let target = &self.incoming.target;
        let ssh = target
            .ssh
            .as_ref()
            .ok_or_else(|| Refused::error("an SSH target without [target.ssh]".into()))?;
        let addr = self
            .gate
            .upstream_addr(target, &self.incoming.origin)
            .map_err(|e| Refused::error(e.to_string()))?;
        let stream = self
            .gate
            .connect_upstream(addr)
            .await
            .map_err(|e| Refused::error(format!("upstream {addr} unreachable: {e}")))?;
        let source = stream
            .local_addr()
            .map_err(|e| Refused::error(format!("upstream socket: {e}")))?
            .ip();
        let known_hosts = KnownHosts::read(ssh.known_hosts_file.get_ref())
            .map_err(|e| Refused::error(format!("known_hosts_file {e}")))?;
        let mut names = super::host_principals(target, addr.ip());
        names.push(crate::config::canonical_ip(addr.ip()).to_string());
        let refusal = Arc::new(Mutex::new(None));
        let remote_forwards = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let agent_forwarding = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let budget = ConnectionBudget::new();
        let handler = UpstreamHandler {
            known_hosts: Arc::new(known_hosts),
            names,
            port: addr.port(),
            refusal: Arc::clone(&refusal),
            client: Arc::clone(&self.own_handle),
            remote_forwards: Arc::clone(&remote_forwards),
            agent_forwarding: Arc::clone(&agent_forwarding),
            relays: JoinSet::new(),
            gate: Arc::clone(&self.gate),
            event: self.event(EventKind::SshForward, ""),
            budget: budget.clone(),
        };
        let keepalive = ssh.keepalive_secs;
        // Offer host certificates, so a known_hosts with only @cert-authority works.
        let preferred = russh::Preferred {
            host_key_certificates: std::borrow::Cow::Borrowed(&[
                russh::keys::Algorithm::Ed25519,
                russh::keys::Algorithm::Ecdsa {
                    curve: russh::keys::EcdsaCurve::NistP256,
                },
                russh::keys::Algorithm::Rsa {
                    hash: Some(HashAlg::Sha512),
                },
            ]),
            // The agent is the client on this leg, so its order chooses. AES-GCM first:
            // with AES-NI it costs a fraction of ChaCha20-Poly1305 per byte (which was most
            // of the agent's CPU moving a file), and every OpenSSH since 6.2 offers it; the
            // others stay for servers that do not.
            cipher: std::borrow::Cow::Borrowed(&[
                russh::cipher::AES_128_GCM,
                russh::cipher::AES_256_GCM,
                russh::cipher::CHACHA20_POLY1305,
                russh::cipher::AES_256_CTR,
                russh::cipher::AES_192_CTR,
                russh::cipher::AES_128_CTR,
            ]),
            ..russh::Preferred::default()
        };
        let config = client::Config {
            client_id: russh::SshId::Standard("SSH-2.0-portcullis".into()),
            inactivity_timeout: None,
            keepalive_interval: (keepalive > 0).then(|| Duration::from_secs(keepalive)),
            keepalive_max: 3,
            channel_buffer_size: UPSTREAM_CHANNEL_BUFFER,
            preferred,
            nodelay: true,
            ..client::Config::default()
        };
        let mut handle = match client::connect_stream(Arc::new(config), stream, handler).await {
            Ok(h) => h,
            Err(e) => {
                let why = refusal.lock().unwrap_or_else(|p| p.into_inner()).take();
                return Err(Refused::error(match why {
                    Some(why) => format!("upstream {addr} refused: {why}"),
                    None => format!("SSH with upstream {addr} failed: {e}"),
                }));
            }
        };
        let login = match self.shared.private_key(target.id) {
            Some(key) => {
                let hash = handle
                    .best_supported_rsa_hash()
                    .await
                    .ok()
                    .flatten()
                    .flatten();
                handle
                    .authenticate_publickey(
                        user,
                        russh::keys::PrivateKeyWithHashAlg::new(key, hash),
                    )
                    .await
            }
            None => {
                // A shell that waits for approval needs its pty once approved. Decided on
                // the policies alone: asking admission would make an approval request for
                // a shell nobody has asked for yet.
                let shell = matches!(
                    self.gate
                        .policies()
                        .decide(&self.request(&identity, Action::SshShell))
                        .effect,
                    portcullis_policy::Effect::Allow
                        | portcullis_policy::Effect::RequireApproval(_)
                );
                // Forwards are decided one by one on their destination, which is not known
                // yet: the certificate lets sshd forward when some policy could allow one.
                let could = |action| {
                    self.gate
                        .policies()
                        .current()
                        .could_permit(&self.request(&identity, action))
                };
                let forward = could(Action::SshForwardLocal) || could(Action::SshForwardRemote);
                let agent = could(Action::SshAgentForward);
                let grant = UserGrant {
                    principals: vec![user.to_string()],
                    key_id: format!("{}/{}", identity_label(&identity), self.incoming.id),
                    validity: Duration::from_secs(u64::from(ssh.certificate_minutes) * 60),
                    source_address: Some(source.to_string()),
                    permit_pty: shell,
                    permit_port_forwarding: forward,
                    permit_agent_forwarding: agent,
                };
                let credential = self
                    .shared
                    .ca
                    .user_credential(&grant)
                    .map_err(|e| Refused::error(e.to_string()))?;
                handle
                    .authenticate_openssh_cert(user, credential.key, credential.certificate)
                    .await
            }
        };
        match login {
            Ok(r) if r.success() => {}
            Ok(_) => {
                return Err(Refused::error(format!(
                    "upstream {addr} refused the agent's login as `{user}` (is the agent's user CA in its TrustedUserCAKeys, and may `{user}` log in?)"
                )))
            }
            Err(e) => return Err(Refused::error(format!("upstream {addr} login: {e}"))),
        }
        let opening = Opening {
            incoming: &self.incoming,
            identity: &identity,
            upstream: addr,
            policy_ids: allowed.policy_ids,
            db_user: None,
            db_name: None,
        };
        let session = match self.gate.open(opening).await {
            Ok(s) => s,
            Err(OpenError::Unrecorded(e)) => {
                // Not recorded, so not opened; `open` logged why.
                return Err(Refused {
                    decision: Decision::Error,
                    policy_ids: Vec::new(),
                    reason: format!("the audit store cannot record the connection: {e}"),
                });
            }
            Err(e) => return Err(Refused::error(e.to_string())),
        };
        Ok(Upstream {
            handle,
            session,
            remote_forwards,
            agent_forwarding,
            budget,
        })
    }

    fn record_refusal(&self, refused: &Refused) {
        self.gate.record_refusal(Refusal {
            decision: refused.decision,
            policy_ids: refused.policy_ids.clone(),
            ..Refusal::of(
                &self.incoming,
                self.identity.as_ref().ok(),
                refused.reason.clone(),
            )
        });
    }

    /// Waits for the server's answer to the request just sent on `channel`.
    async fn upstream_reply(&mut self, channel: ChannelId) -> bool {
        let Some(state) = self.channels.get_mut(&channel) else {
            return false;
        };
        matches!(
            tokio::time::timeout(REPLY_TIMEOUT, state.replies.recv()).await,
            Ok(Some(true))
        )
    }

    fn answer(session: &mut Session, channel: ChannelId, ok: bool) -> Result<(), russh::Error> {
        if ok {
            session.channel_success(channel)
        } else {
            session.channel_failure(channel)
        }
    }

    /// Decides a shell, exec or subsystem; a refusal is answered on the channel itself (the
    /// reason on stderr, exit status 1), as if the command had failed.
    fn decide_channel(
        &mut self,
        action: Action,
        command_line: Option<String>,
        label: &str,
        what: &str,
    ) -> Result<Vec<String>, String> {
        self.decide_masked(action, command_line, label, what)
            .map(|(ids, _)| ids)
    }

    /// [`Self::decide_channel`], with the content detectors of the masking profile the
    /// allowing policies name (`@mask`), for a channel whose output is masked.
    fn decide_masked(
        &mut self,
        action: Action,
        command_line: Option<String>,
        label: &str,
        what: &str,
    ) -> Result<(Vec<String>, Option<MaskPlan>), String> {
        match self.decide_request(action, command_line, label, what, false)? {
            ChannelDecision::Allowed { policy_ids, mask } => Ok((policy_ids, mask)),
            // Not asked for: without `may_wait` an approval is a refusal, recorded there.
            ChannelDecision::NeedsApproval { refusal, .. } => Err(refusal.reason),
        }
    }

    /// [`Self::decide_masked`]; with `may_wait`, a policy that asks for approval gives
    /// [`ChannelDecision::NeedsApproval`] (with the profile the channel is masked with
    /// once approved) instead of a refusal.
    fn decide_request(
        &mut self,
        action: Action,
        command_line: Option<String>,
        label: &str,
        what: &str,
        may_wait: bool,
    ) -> Result<ChannelDecision, String> {
        let Ok(identity) = self.identity.clone() else {
            return Err("no identity".into());
        };
        let mut request = self.request(&identity, action);
        if let Some(line) = &command_line {
            // What the login shell will make of the line: its words when it is a simple
            // command, a flag when it is not (the policy decides what to do with that).
            let parsed = portcullis_terminal::exec::classify(line.as_bytes());
            request.context.simple_command = parsed.shell_syntax.is_none() && parsed.argv.is_some();
            request.context.command_name = parsed.first_word;
            request.context.command_args = parsed
                .argv
                .map(|argv| argv.into_iter().skip(1).collect())
                .unwrap_or_default();
        }
        request.context.command_line = command_line.clone();
        // One set for the decision and the profile it names.
        let set = self.gate.policies().current();
        let decision = set.decide(&request);
        let mask_of = |obligations: &[Obligation]| {
            obligations.iter().find_map(|o| match o {
                Obligation::Mask { profile } => set
                    .masking_profile(profile)
                    .and_then(|p| MaskPlan::new(p, &self.shared.mask_key)),
            })
        };
        let obligations = decision.obligations.clone();
        match crate::policy::outcome(decision) {
            Ok(allowed) => Ok(ChannelDecision::Allowed {
                mask: mask_of(&allowed.obligations),
                policy_ids: allowed.policy_ids,
            }),
            Err(refusal) if may_wait && refusal.approval.is_some() => {
                Ok(ChannelDecision::NeedsApproval {
                    mask: mask_of(&obligations),
                    refusal,
                    request: Box::new(request),
                })
            }
            Err(refused) => {
                let mut ev = self.event(EventKind::SshChannelDenied, label);
                ev.decision = Some(refused.decision);
                ev.policy_ids = refused.policy_ids.clone().into();
                if let Some(fields) = ev.ssh.as_mut() {
                    fields.command_line = command_line;
                }
                let reason = match refused.decision {
                    Decision::Deny => format!("{what} denied by policy: {}", refused.reason),
                    _ => format!("{what} refused: {}", refused.reason),
                };
                ev.reason = Some(reason.clone());
                tracing::info!(%reason, "SSH channel request refused");
                self.gate.audit().record(ev);
                Err(reason)
            }
        }
    }

    /// A shell (`command` None) or exec whose policy asks for approval: the request is made
    /// (or the pending one for the same command on this connection found), the client told
    /// on stderr and answered with success, and a task of the connection waits for the
    /// verdict (`approval`), so this callback returns at once: the notice reaches the
    /// client, and the connection's other channels go on meanwhile.
    async fn wait_for_approval(
        &mut self,
        channel: ChannelId,
        command: Option<String>,
        refusal: crate::policy::PolicyRefusal,
        policy_request: Request,
        mask: Option<MaskPlan>,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let label = if command.is_some() { "exec" } else { "shell" };
        let mut refused = self.event(EventKind::SshChannelDenied, label);
        refused.decision = Some(refusal.decision);
        if let Some(fields) = refused.ssh.as_mut() {
            fields.command_line = command.clone();
        }
        let gate = Arc::clone(&self.gate);
        let template = refused.clone();
        let refuse = |reason: String, policy_ids: Vec<String>| {
            let mut ev = template.clone();
            ev.policy_ids = policy_ids.into();
            ev.reason = Some(reason.clone());
            tracing::info!(%reason, "SSH channel request refused");
            gate.audit().record(ev);
            reason
        };
        let (Ok(identity), Some(requirement), Some(up)) =
            (self.identity.clone(), refusal.approval.clone(), &self.open)
        else {
            let reason = refuse(refusal.reason.clone(), refusal.policy_ids.clone());
            return self.refuse_on_channel(channel, &reason, session).await;
        };
        let conn = Arc::clone(&up.session.conn);
        let upstream_addr = up.session.conn.upstream.to_string();
        if command
            .as_ref()
            .is_some_and(|c| c.len() > approval::MAX_WAITING_COMMAND)
        {
            let reason = refuse(
                format!(
                    "{label} refused: {}; a command over {} KiB cannot wait for approval",
                    refusal.reason,
                    approval::MAX_WAITING_COMMAND / 1024
                ),
                refusal.policy_ids.clone(),
            );
            return self.refuse_on_channel(channel, &reason, session).await;
        }
        let plan = match self.terminal_plan(channel, command.as_deref(), mask) {
            Ok(plan) => plan,
            Err(reason) => {
                self.record_refused_channel(label, &reason);
                return self.refuse_on_channel(channel, &reason, session).await;
            }
        };
        let ssh_user = self.ssh_user.clone().unwrap_or_default();
        let timeout = self.gate.policies().current().approval_settings().timeout;
        let asked = self.gate.approvals().ask(crate::approvals::Ask {
            requester: identity,
            asked: crate::approvals::Asked::Command {
                connection_id: self.incoming.id,
                target: self.incoming.target.name.clone(),
                ssh_user: ssh_user.clone(),
                command: command.clone(),
            },
            reason: format!(
                "an SSH {label} of {} as {ssh_user} on {}",
                self.incoming.origin.comm, self.incoming.target.name
            ),
            requirement: requirement.clone(),
            policy_ids: refusal.policy_ids.clone(),
            timeout,
        });
        let request = match asked {
            Ok(r) => r,
            Err(e) => {
                let refusal = crate::policy::approval_unavailable(refusal, &e.to_string());
                let reason = refuse(
                    format!("{label} refused: {}", refusal.reason),
                    refusal.policy_ids,
                );
                return self.refuse_on_channel(channel, &reason, session).await;
            }
        };
        let id = request.id;
        let mut policy_ids = refusal.policy_ids.clone();
        policy_ids.push(format!("approval:{id}"));
        // The same command asked again on this connection finds the same pending request;
        // one approval starts one command, so a second channel may not wait on it too.
        if self
            .channels
            .values()
            .any(|c| c.waiter.as_ref().is_some_and(|(_, w)| *w == id))
        {
            let reason = refuse(
                format!("{label} refused: the same {label} already waits for approval request {id} on this connection"),
                policy_ids,
            );
            return self.refuse_on_channel(channel, &reason, session).await;
        }
        let mut started = self.event(
            if command.is_some() {
                EventKind::SshExec
            } else {
                EventKind::SshShell
            },
            label,
        );
        started.decision = Some(Decision::Allow);
        started.policy_ids = policy_ids.clone().into();
        started.upstream = Some(upstream_addr.into());
        if let Some(fields) = started.ssh.as_mut() {
            fields.command_line = command.clone();
        }
        refused.policy_ids = policy_ids.into();
        let Some(state) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        state.tap.kind = if command.is_some() {
            ChannelKind::Exec
        } else {
            ChannelKind::Shell
        };
        let hold = SharedHold::default();
        // The task takes the server's answers to this channel's requests: the next one is
        // its exec or shell.
        let (_, none) = mpsc::channel(1);
        let replies = std::mem::replace(&mut state.replies, none);
        let waiter = approval::Waiter {
            gate: Arc::clone(&self.gate),
            request_id: id.clone(),
            hold: Arc::clone(&hold),
            upstream: state.upstream.clone(),
            replies,
            reply_timeout: REPLY_TIMEOUT,
            client: session.handle(),
            channel,
            pump: state.pump.clone(),
            start: match &command {
                Some(c) => approval::Start::Exec(c.as_bytes().to_vec()),
                None => approval::Start::Shell,
            },
            terminal: plan,
            decide_again: policy_request,
            started,
            refused,
            conn,
        };
        let task = self.pumps.spawn(approval::wait_then_start(waiter));
        state.hold = Some(hold);
        state.waiter = Some((task, id.clone()));
        tracing::info!(request = %id, channel = label, "SSH channel waits for approval");
        session.channel_success(channel)?;
        session.extended_data(
            channel,
            1,
            Bytes::from(approval::waiting_notice(
                command.as_deref(),
                &id,
                &requirement.to_string(),
                timeout,
            )),
        )?;
        Ok(())
    }

    /// Ends a channel that waits for approval before its command ran: the request is
    /// withdrawn (`why`), the reason on stderr, exit status 1 (its success was answered).
    async fn end_waiting_channel(
        &mut self,
        channel: ChannelId,
        why: &str,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(state) = self.channels.remove(&channel) else {
            return Ok(());
        };
        if let Some((task, id)) = &state.waiter {
            self.gate.approvals().withdraw(id, why);
            task.abort();
        }
        state.pump.abort();
        let _ = state.upstream.close().await;
        self.record_refused_channel(
            if state.tap.kind == ChannelKind::Shell {
                "shell"
            } else {
                "exec"
            },
            why,
        );
        session.extended_data(channel, 1, Bytes::from(format!("portcullis: {why}\r\n")))?;
        session.exit_status_request(channel, 1)?;
        session.eof(channel)?;
        session.close(channel)?;
        Ok(())
    }

    /// Keeps `input` while the channel's command waits for approval; true when it was kept
    /// (or dropped, for a channel refused meanwhile), false when it passes as usual.
    async fn held(
        &mut self,
        channel: ChannelId,
        input: HeldInput,
        session: &mut Session,
    ) -> Result<bool, russh::Error> {
        let Some(hold) = self.channels.get(&channel).and_then(|s| s.hold.clone()) else {
            return Ok(false);
        };
        let pushed = approval::lock(&hold).push(input);
        match pushed {
            Pushed::Pass => Ok(false),
            Pushed::Held | Pushed::Dropped => Ok(true),
            Pushed::Overflow => {
                let why = format!(
                    "more than {} KiB of input arrived while the command waited for approval; the request is withdrawn",
                    approval::MAX_HELD_BYTES / 1024
                );
                self.end_waiting_channel(channel, &why, session).await?;
                Ok(true)
            }
        }
    }

    /// Ends a channel the agent refused: the reason on stderr, exit status 1, EOF, close.
    async fn refuse_on_channel(
        &mut self,
        channel: ChannelId,
        reason: &str,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        if let Some(state) = self.channels.remove(&channel) {
            state.pump.abort();
            let _ = state.upstream.close().await;
        }
        session.channel_success(channel)?;
        session.extended_data(channel, 1, Bytes::from(format!("portcullis: {reason}\r\n")))?;
        session.exit_status_request(channel, 1)?;
        session.eof(channel)?;
        session.close(channel)?;
        Ok(())
    }

    fn record_started(
        &self,
        kind: EventKind,
        label: &str,
        command_line: Option<String>,
        policy_ids: Vec<String>,
    ) {
        let mut ev = self.event(kind, label);
        ev.decision = Some(Decision::Allow);
        ev.policy_ids = policy_ids.into();
        if let Some(fields) = ev.ssh.as_mut() {
            fields.command_line = command_line;
        }
        if let Some(up) = &self.open {
            ev.upstream = Some(up.session.conn.upstream.to_string().into());
        }
        self.gate.audit().record(ev);
    }

    /// Starts relaying a channel the server accepted: a task reads the server's side, the
    /// `data` callback writes the client's.
    fn relay_channel(
        &mut self,
        channel: Channel<Msg>,
        upstream: Channel<client::Msg>,
        kind: ChannelKind,
        session: &mut Session,
    ) {
        let Some(up) = &self.open else { return };
        let conn = Arc::clone(&up.session.conn);
        let id = channel.id();
        let (up_read, up_write) = upstream.split();
        let up_read = Reader::spawn(up_read, &up.budget, session.handle());
        let (up_write, drain) = UpstreamWriter::new(up_write, &up.budget, None);
        self.pumps.spawn(drain);
        // The client's data arrives through the `data` callback; the read half is dropped so
        // the session loop never waits on it.
        let (_, down_write) = channel.split();
        let (replies_tx, replies) = mpsc::channel(8);
        let terminal = Arc::new(std::sync::OnceLock::new());
        let sftp = Arc::new(std::sync::OnceLock::new());
        let tap = |kind| ChannelTap {
            kind,
            connection_id: self.incoming.id,
            terminal: Arc::clone(&terminal),
            sftp: Arc::clone(&sftp),
        };
        let pump = self.pumps.spawn(pump(
            up_read,
            down_write,
            session.handle(),
            replies_tx,
            conn,
            tap(kind),
        ));
        self.channels.insert(
            id,
            ChannelState {
                upstream: up_write,
                replies,
                pump,
                tap: tap(kind),
                pty: None,
                hold: None,
                waiter: None,
            },
        );
    }

    /// Who decides this connection's file operations (sftp, legacy scp), and the
    /// `ssh.sftp` event they start from; `None` without an identity.
    fn file_policy(&self) -> Option<super::sftp::FilePolicy> {
        let identity = self.identity.clone().ok()?;
        let mut event = self.event(EventKind::SshSftp, "subsystem:sftp");
        if let Some(up) = &self.open {
            event.upstream = Some(up.session.conn.upstream.to_string().into());
        }
        Some(super::sftp::FilePolicy {
            gate: Arc::clone(&self.gate),
            identity,
            target: self.incoming.target.clone(),
            origin: self.incoming.origin.clone(),
            ssh_user: self.ssh_user.clone(),
            event,
        })
    }

    /// Decides a forward on where it goes (or listens); a refusal is an
    /// `ssh.channel_denied` event naming it, and its reason for the client.
    fn decide_forward(
        &mut self,
        action: Action,
        forward: Forward,
        label: &str,
        what: &str,
    ) -> Result<Vec<String>, String> {
        let Ok(identity) = self.identity.clone() else {
            return Err("no identity".into());
        };
        let mut request = self.request(&identity, action);
        let address = format!("{}:{}", forward.host, forward.port);
        let originator = forward
            .originator
            .as_ref()
            .map(|(host, port)| format!("{host}:{port}"));
        request.context.forward = Some(forward);
        match crate::policy::outcome(self.gate.policies().decide(&request)) {
            Ok(allowed) => Ok(allowed.policy_ids),
            Err(refused) => {
                let reason = match refused.decision {
                    Decision::Deny => format!("{what} denied by policy: {}", refused.reason),
                    _ => format!("{what} refused: {}", refused.reason),
                };
                let mut ev = self.event(EventKind::SshChannelDenied, label);
                ev.decision = Some(refused.decision);
                ev.policy_ids = refused.policy_ids.into();
                ev.reason = Some(reason.clone());
                if let Some(fields) = ev.ssh.as_mut() {
                    fields.forward = Some(address);
                    fields.originator = originator;
                }
                tracing::info!(%reason, "SSH forward refused");
                self.gate.audit().record(ev);
                Err(reason)
            }
        }
    }

    fn count_input(&self, n: u64) {
        if let Some(up) = &self.open {
            up.session
                .conn
                .bytes
                .client_to_upstream
                .fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Gives a shell or exec channel its terminal before the server starts it: masked when
    /// the allowing policy names a profile, recorded when interactive (a shell, or a command
    /// with a pty), guarded when the target guards shells. An error refuses the channel:
    /// a session that cannot be recorded does not start (unless `recording_failure =
    /// "continue"`).
    async fn attach_terminal(
        &mut self,
        channel: ChannelId,
        command: Option<&str>,
        mask: Option<MaskPlan>,
    ) -> Result<(), String> {
        self.terminal_plan(channel, command, mask)?.attach().await
    }

    /// What [`Self::attach_terminal`] attaches, settled now: a channel that waits for
    /// approval attaches it once approved, so its recording starts with the command.
    fn terminal_plan(
        &self,
        channel: ChannelId,
        command: Option<&str>,
        mut mask: Option<MaskPlan>,
    ) -> Result<TerminalPlan, String> {
        let Some(state) = self.channels.get(&channel) else {
            return Err("no such channel".into());
        };
        let pty = state.pty.clone();
        let ssh = self.incoming.target.ssh.clone();
        let guarded = command.is_none() && ssh.as_ref().is_some_and(|s| s.guarded_shell);
        if guarded && pty.is_none() {
            return Err(
                "this target guards shell lines, which needs a terminal (ssh -t): input piped to a shell cannot be decided line by line".into(),
            );
        }
        if let (Some(line), None) = (command, &pty) {
            // File transfers carry file contents in their own framing, which masking would
            // corrupt (SFTP is not masked either; policy decides what may be read).
            if !matches!(
                portcullis_terminal::exec::classify(line.as_bytes()).kind,
                portcullis_terminal::exec::ExecKind::Command
                    | portcullis_terminal::exec::ExecKind::Empty
            ) {
                mask = None;
            }
        }
        let interactive = command.is_none() || pty.is_some();
        let recording = interactive.then(|| RecordingPlan {
            shared: Arc::clone(&self.shared),
            numbers: Arc::clone(&self.recordings_started),
            connection_id: self.incoming.id,
            pty,
            command: command.map(str::to_owned),
            on_failure: self.incoming.target.recording_failure,
        });
        let record_input = ssh.as_ref().is_some_and(|s| s.record_input);
        Ok(TerminalPlan::new(
            Arc::clone(&state.tap.terminal),
            recording,
            record_input,
            mask,
            guarded,
        ))
    }

    /// A line typed at a guarded shell, at its Enter: decided as `ssh_exec` with
    /// `context.guarded_line`, recorded as `ssh.shell_line` either way. A line the guard
    /// could not follow (history, completion lists) is refused: its text is not known. A
    /// line typed without echo (`echoed` false: a password at a prompt, or `stty -echo`) is
    /// decided too, but its text is not written down. Keys of a full-screen program (an
    /// editor) are not shell lines: they pass.
    fn decide_line(
        &self,
        line: &portcullis_terminal::line::TypedLine,
        echoed: bool,
    ) -> LineVerdict {
        let mut ev = self.event(EventKind::SshShellLine, "shell");
        if line.full_screen {
            ev.decision = Some(Decision::Allow);
            ev.reason = Some("keys of a full-screen program, not a shell line".into());
            self.gate.audit().record(ev);
            return LineVerdict {
                allowed: true,
                reason: String::new(),
            };
        }
        if echoed {
            if let Some(fields) = ev.ssh.as_mut() {
                fields.command_line = Some(line.text.clone());
            }
        } else {
            ev.reason =
                Some("typed without echo (a password?): the line is not written down".into());
        }
        let verdict = match (&self.identity, line.certain) {
            (Err(why), _) => Err((Decision::Error, Vec::new(), why.clone())),
            (Ok(_), false) => Err((
                Decision::Deny,
                Vec::new(),
                "the line was edited with keys only the shell understands (history, completion); type it out".to_string(),
            )),
            (Ok(identity), true) => {
                let mut request = self.request(identity, Action::SshExec);
                let parsed = portcullis_terminal::exec::classify(line.text.as_bytes());
                request.context.simple_command =
                    parsed.shell_syntax.is_none() && parsed.argv.is_some();
                request.context.command_name = parsed.first_word;
                request.context.command_args = parsed
                    .argv
                    .map(|argv| argv.into_iter().skip(1).collect())
                    .unwrap_or_default();
                request.context.command_line = Some(line.text.clone());
                request.context.guarded_line = true;
                match crate::policy::outcome(self.gate.policies().decide(&request)) {
                    Ok(allowed) => Ok(allowed.policy_ids),
                    Err(refused) => Err((refused.decision, refused.policy_ids, refused.reason)),
                }
            }
        };
        match verdict {
            Ok(policy_ids) => {
                ev.decision = Some(Decision::Allow);
                ev.policy_ids = policy_ids.into();
                self.gate.audit().record(ev);
                LineVerdict {
                    allowed: true,
                    reason: String::new(),
                }
            }
            Err((decision, policy_ids, reason)) => {
                let reason = match decision {
                    Decision::Deny => format!("denied by policy: {reason}"),
                    _ => reason,
                };
                tracing::info!(%reason, "guarded shell line refused");
                ev.decision = Some(decision);
                ev.policy_ids = policy_ids.into();
                ev.reason = Some(reason.clone());
                self.gate.audit().record(ev);
                LineVerdict {
                    allowed: false,
                    reason,
                }
            }
        }
    }

    fn record_refused_channel(&self, label: &str, reason: &str) {
        let mut ev = self.event(EventKind::SshChannelDenied, label);
        ev.decision = Some(Decision::Deny);
        ev.reason = Some(reason.to_string());
        tracing::info!(channel = label, reason, "SSH channel refused");
        self.gate.audit().record(ev);
    }
}

/// A channel open failure with the reason OpenSSH prints after "open failed:" (RFC 4254
/// §5.1: code 1 administratively prohibited, 2 connect failed).
fn open_failure(code: u32, reason: &str) -> russh::ChannelOpenFailure {
    russh::ChannelOpenFailure::Other {
        code,
        reason: format!("portcullis: {reason}"),
    }
}

fn identity_label(identity: &Identity) -> String {
    identity
        .email
        .clone()
        .or_else(|| identity.subject.clone())
        .or_else(|| identity.user.clone())
        .unwrap_or_else(|| format!("uid {}", identity.uid))
}

/// Reads the server's side of one channel and relays it to the client in the server's
/// order; answers to channel requests go to the handler waiting for them. Output the masker
/// holds back is released once the server has been quiet for `terminal::QUIET_FLUSH`, and
/// the channel ends early when its recording fails under `recording_failure = "close"`.
async fn pump(
    mut from: Reader,
    to: ChannelWriteHalf<Msg>,
    client: server::Handle,
    replies: mpsc::Sender<bool>,
    conn: Arc<crate::admission::Connection>,
    mut tap: ChannelTap,
) {
    let id = to.id();
    // The server's EOF waits for its exit status (or the close). A client whose input is
    // done closes the channel on the EOF (OpenSSH's ControlMaster does) and russh answers a
    // close at once, so a status sshd sends after its EOF, as it does when output ends
    // before the process, would never reach the client; sshd direct keeps the channel
    // for it.
    let mut eof_held = false;
    let mut failure: Option<std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>>> = None;
    loop {
        if failure.is_none() {
            if let Some(t) = tap.terminal() {
                failure = t.lock().await.failure().map(|f| Box::pin(f) as _);
            }
        }
        let holds = match tap.terminal() {
            Some(t) => t.lock().await.holds(),
            None => false,
        };
        let msg = tokio::select! {
            msg = from.wait() => msg,
            () = tokio::time::sleep(terminal::QUIET_FLUSH), if holds => {
                if !release_held(&tap, &to, false).await {
                    return;
                }
                continue;
            }
            error = async { match failure.as_mut() { Some(f) => f.await, None => std::future::pending().await } } => {
                return end_unrecorded(&to, &terminal::Ended(error)).await;
            }
        };
        let Some(msg) = msg else { break };
        let sent = match msg {
            ChannelMsg::Data { data } => {
                let n = data.len() as u64;
                let data = match tap.sftp.get().map(|s| s.server_bytes(&data)) {
                    None => data,
                    Some(Ok(out)) => Bytes::from(out),
                    Some(Err(why)) => return super::sftp::end_channel(&to, &why).await,
                };
                let out = match super::output_to_client(&mut tap, false, data).await {
                    Ok(out) => out,
                    Err(ended) => return end_unrecorded(&to, &ended).await,
                };
                let r = if out.is_empty() {
                    Ok(())
                } else {
                    to.data_bytes(out).await
                };
                conn.bytes
                    .upstream_to_client
                    .fetch_add(n, Ordering::Relaxed);
                r
            }
            ChannelMsg::ExtendedData { data, ext } => {
                let n = data.len() as u64;
                let out = match super::output_to_client(&mut tap, ext == 1, data).await {
                    Ok(out) => out,
                    Err(ended) => return end_unrecorded(&to, &ended).await,
                };
                let r = if out.is_empty() {
                    Ok(())
                } else {
                    to.extended_data_bytes(ext, out).await
                };
                conn.bytes
                    .upstream_to_client
                    .fetch_add(n, Ordering::Relaxed);
                r
            }
            ChannelMsg::Eof => {
                // Nothing follows: what the masker held goes out before the EOF.
                if !release_held(&tap, &to, true).await {
                    return;
                }
                eof_held = true;
                Ok(())
            }
            ChannelMsg::ExitStatus { exit_status } => match to.exit_status(exit_status).await {
                Ok(()) if std::mem::take(&mut eof_held) => to.eof().await,
                r => r,
            },
            ChannelMsg::ExitSignal {
                signal_name,
                core_dumped,
                error_message,
                lang_tag,
            } => match client
                .exit_signal_request(id, signal_name, core_dumped, error_message, lang_tag)
                .await
            {
                Ok(()) if std::mem::take(&mut eof_held) => to.eof().await,
                Ok(()) => Ok(()),
                Err(()) => Err(russh::Error::SendError),
            },
            ChannelMsg::Success => {
                let _ = replies.send(true).await;
                Ok(())
            }
            ChannelMsg::Failure => {
                let _ = replies.send(false).await;
                Ok(())
            }
            ChannelMsg::Close => break,
            _ => Ok(()),
        };
        if sent.is_err() {
            // The client's side is gone; the session's end closes the upstream channel.
            finish_terminal(&tap, None).await;
            return;
        }
    }
    finish_terminal(&tap, Some(&to)).await;
    if eof_held {
        let _ = to.eof().await;
    }
    let _ = to.close().await;
}

/// What the masker held, released to the client (all of it at the EOF, else what a quiet
/// period lets go). False when the pump must stop: the client is gone, or the recording
/// failed and the channel was ended.
async fn release_held(tap: &ChannelTap, to: &ChannelWriteHalf<Msg>, at_eof: bool) -> bool {
    let Some(t) = tap.terminal() else {
        return true;
    };
    let released = t.lock().await.release(at_eof).await;
    match released {
        Ok((out, err)) => send_output(to, &out, &err).await.is_ok(),
        Err(ended) => {
            end_unrecorded(to, &ended).await;
            false
        }
    }
}

/// Output released by the masker, stdout then stderr.
async fn send_output(
    to: &ChannelWriteHalf<Msg>,
    out: &[u8],
    err: &[u8],
) -> Result<(), russh::Error> {
    if !out.is_empty() {
        to.data_bytes(Bytes::copy_from_slice(out)).await?;
    }
    if !err.is_empty() {
        to.extended_data_bytes(1, Bytes::copy_from_slice(err))
            .await?;
    }
    Ok(())
}

/// The channel's end: what the masker still held (to the client when it is still there),
/// then the recording closed and durable.
async fn finish_terminal(tap: &ChannelTap, to: Option<&ChannelWriteHalf<Msg>>) {
    let Some(t) = tap.terminal() else { return };
    let (out, err, recording) = t.lock().await.finish().await;
    if let Some(to) = to {
        let _ = send_output(to, &out, &err).await;
    }
    if let Some(recording) = recording {
        if let Err(e) = recording.finish().await {
            tracing::warn!(connection_id = tap.connection_id, error = %e, "the session recording did not close cleanly");
        }
    }
}

/// The recording failed and the target says to close: the client reads why on stderr,
/// then the channel closes (the recording's failure is already in the audit trail).
async fn end_unrecorded(to: &ChannelWriteHalf<Msg>, ended: &terminal::Ended) {
    let _ = to.extended_data_bytes(1, Bytes::from(ended.notice())).await;
    let _ = to.eof().await;
    let _ = to.close().await;
}

impl server::Handler for ClientHandler {
    type Error = russh::Error;

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        // Without a login nothing can be decided: say so before the client gives up.
        Ok(self
            .identity
            .as_ref()
            .err()
            .map(|why| format!("portcullis: {why}\r\n")))
    }

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        if self.open.is_some() {
            return Ok(Auth::Accept);
        }
        if self.refused.is_some() {
            return Ok(Auth::reject());
        }
        match self.admit(user).await {
            Ok(up) => {
                if let Some(tx) = self.opened.take() {
                    let _ = tx.send(up.session.conn.cancel.clone());
                }
                self.open = Some(up);
                Ok(Auth::Accept)
            }
            Err(refused) => {
                self.record_refusal(&refused);
                self.refused = Some(refused.reason.clone());
                // Accepted only to say why: a rejected `none` leaves OpenSSH printing
                // "Permission denied" before it reads any later message, while after
                // success it prints a disconnect's text. Nothing is open upstream and every
                // channel is refused without `open`; `auth_succeeded` disconnects at once.
                Ok(Auth::Accept)
            }
        }
    }

    async fn auth_succeeded(&mut self, session: &mut Session) -> Result<(), Self::Error> {
        if let Some(reason) = &self.refused {
            // OpenSSH prints it: "Received disconnect from …: portcullis: <reason>".
            session.disconnect(
                Disconnect::ByApplication,
                &format!("portcullis: {reason}"),
                "",
            )?;
        }
        Ok(())
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(up) = &self.open else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let upstream = match up.handle.channel_open_session().await {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(error = %e, "the upstream server refused a session channel");
                reply
                    .reject(open_failure(
                        2,
                        &format!("the target's sshd refused a session channel: {e}"),
                    ))
                    .await;
                return Ok(());
            }
        };
        self.relay_channel(channel, upstream, ChannelKind::Pending, session);
        reply.accept().await;
        Ok(())
    }

    /// `ssh -L` and `ssh -W`: decided as `ssh_forward_local` on its destination, then
    /// opened by the target's sshd (which the user certificate lets forward only when some
    /// policy could allow it) and relayed by its own task; audited when it opens and, with
    /// the bytes it moved, when it closes.
    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host_to_connect: &str,
        port_to_connect: u32,
        originator_address: &str,
        originator_port: u32,
        reply: server::ChannelOpenHandle,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let destination = format!("{host_to_connect}:{port_to_connect}");
        if self.open.is_none() {
            reply
                .reject(open_failure(1, "the connection is not open"))
                .await;
            return Ok(());
        }
        let forward = Forward {
            host: host_to_connect.to_string(),
            port: port_to_connect,
            originator: Some((originator_address.to_string(), originator_port)),
        };
        let policy_ids = match self.decide_forward(
            Action::SshForwardLocal,
            forward,
            "direct-tcpip",
            &format!("forwarding to {destination}"),
        ) {
            Ok(ids) => ids,
            Err(reason) => {
                reply.reject(open_failure(1, &reason)).await;
                return Ok(());
            }
        };
        let Some(up) = &self.open else {
            reply
                .reject(open_failure(1, "the connection is not open"))
                .await;
            return Ok(());
        };
        let upstream = match up
            .handle
            .channel_open_direct_tcpip(
                host_to_connect,
                port_to_connect,
                originator_address,
                originator_port,
            )
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(error = %e, %destination, "the upstream server refused a forward");
                reply
                    .reject(open_failure(
                        2,
                        &format!("the target's sshd could not forward to {destination}: {e}"),
                    ))
                    .await;
                return Ok(());
            }
        };
        let originator = format!("{originator_address}:{originator_port}");
        let mut ev = self.event(EventKind::SshForward, "direct-tcpip");
        ev.decision = Some(Decision::Allow);
        ev.policy_ids = policy_ids.into();
        ev.reason = Some(format!("local forward to {destination}"));
        if let Some(fields) = ev.ssh.as_mut() {
            fields.forward = Some(destination.clone());
            fields.originator = Some(originator.clone());
        }
        self.gate.audit().record(ev);
        let mut closed = self.event(EventKind::SshForwardClosed, "direct-tcpip");
        if let Some(fields) = closed.ssh.as_mut() {
            fields.forward = Some(destination);
            fields.originator = Some(originator);
        }
        let log = ForwardLog::new(Arc::clone(&self.gate), closed);
        let budget = up.budget.clone();
        self.pumps.spawn(super::forward::relay(
            upstream,
            channel,
            budget,
            session.handle(),
            Some(log),
        ));
        reply.accept().await;
        Ok(())
    }

    async fn channel_open_x11(
        &mut self,
        _channel: Channel<Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let reason = "X11 forwarding is not relayed";
        self.record_refused_channel("x11", reason);
        reply.reject(open_failure(1, reason)).await;
        Ok(())
    }

    /// `ssh -R`: decided as `ssh_forward_remote` on the address the target would listen on,
    /// then asked of the target's sshd; its connections come back through `UpstreamHandler`.
    /// A refusal can only fail the request (a global request's failure carries no text):
    /// OpenSSH prints "remote port forwarding failed"; the reason is in the audit trail.
    async fn tcpip_forward(
        &mut self,
        address: &str,
        port: &mut u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let listen = format!("{address}:{port}");
        let forward = Forward {
            host: address.to_string(),
            port: *port,
            originator: None,
        };
        if self.open.is_none()
            || self
                .decide_forward(
                    Action::SshForwardRemote,
                    forward,
                    "tcpip-forward",
                    &format!("remote forwarding from {listen}"),
                )
                .is_err()
        {
            return Ok(false);
        }
        let Some(up) = &self.open else {
            return Ok(false);
        };
        match up.handle.tcpip_forward(address, *port).await {
            Ok(bound) => {
                if *port == 0 {
                    *port = bound;
                }
                up.remote_forwards
                    .store(true, std::sync::atomic::Ordering::SeqCst);
                let mut ev = self.event(EventKind::SshForward, "tcpip-forward");
                ev.decision = Some(Decision::Allow);
                ev.reason = Some(format!("remote forward from {listen} on the target"));
                if let Some(fields) = ev.ssh.as_mut() {
                    fields.forward = Some(format!("{address}:{port}"));
                }
                self.gate.audit().record(ev);
                Ok(true)
            }
            Err(e) => {
                tracing::info!(error = %e, %listen, "the upstream server refused a remote forward");
                Ok(false)
            }
        }
    }

    /// `ssh -A`: decided as `ssh_agent_forward`; allowed, the request goes to the target's
    /// sshd and the agent channels it then opens are relayed to the client
    /// (`UpstreamHandler`). OpenSSH asks without wanting a reply and goes on without an
    /// agent when refused.
    async fn agent_request(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if !self
            .channels
            .get(&channel)
            .is_some_and(|s| s.tap.kind == ChannelKind::Pending)
        {
            return Ok(false);
        }
        let allowed = match self.identity.clone() {
            Ok(identity) => {
                let request = self.request(&identity, Action::SshAgentForward);
                crate::policy::outcome(self.gate.policies().decide(&request))
            }
            Err(why) => {
                self.record_refused_channel("auth-agent-req", &why);
                return Ok(false);
            }
        };
        let policy_ids = match allowed {
            Ok(allowed) => allowed.policy_ids,
            Err(refused) => {
                let mut ev = self.event(EventKind::SshChannelDenied, "auth-agent-req");
                ev.decision = Some(refused.decision);
                ev.policy_ids = refused.policy_ids.into();
                ev.reason = Some(format!(
                    "agent forwarding denied by policy: {}",
                    refused.reason
                ));
                tracing::info!("SSH agent forwarding refused");
                self.gate.audit().record(ev);
                return Ok(false);
            }
        };
        let Some(state) = self.channels.get(&channel) else {
            return Ok(false);
        };
        let sent = state.upstream.agent_forward(true).await;
        let ok = sent.is_ok() && self.upstream_reply(channel).await;
        if ok {
            if let Some(up) = &self.open {
                up.agent_forwarding
                    .store(true, std::sync::atomic::Ordering::SeqCst);
            }
            self.record_started(
                EventKind::SshAgentChannel,
                "auth-agent-req",
                None,
                policy_ids,
            );
        } else {
            self.record_refused_channel(
                "auth-agent-req",
                "the target's sshd refused agent forwarding (AllowAgentForwarding?)",
            );
        }
        Ok(ok)
    }

    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.record_refused_channel("x11-req", "X11 forwarding is not allowed");
        session.channel_failure(channel)
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        modes: &[(Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(state) = self.channels.get(&channel) else {
            return session.channel_failure(channel);
        };
        let sent = state
            .upstream
            .request_pty(
                true, term, col_width, row_height, pix_width, pix_height, modes,
            )
            .await;
        let ok = sent.is_ok() && self.upstream_reply(channel).await;
        if ok {
            if let Some(state) = self.channels.get_mut(&channel) {
                state.pty = Some(PtyInfo {
                    term: term.to_string(),
                    columns: terminal::size(col_width),
                    rows: terminal::size(row_height),
                });
            }
        }
        Self::answer(session, channel, ok)
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        variable_name: &str,
        variable_value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(state) = self.channels.get(&channel) else {
            return session.channel_failure(channel);
        };
        if !env_allowed(variable_name) {
            tracing::debug!(
                variable = variable_name,
                "environment variable not passed upstream"
            );
            return session.channel_failure(channel);
        }
        // Clients send env without wanting a reply; the server's AcceptEnv decides quietly.
        let ok = state
            .upstream
            .set_env(false, variable_name, variable_value)
            .await
            .is_ok();
        Self::answer(session, channel, ok)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self
            .channels
            .get(&channel)
            .is_some_and(|s| s.tap.kind == ChannelKind::Pending)
        {
            return session.channel_failure(channel);
        }
        let (policy_ids, mask) =
            match self.decide_request(Action::SshShell, None, "shell", "shell", true) {
                Ok(ChannelDecision::Allowed { policy_ids, mask }) => (policy_ids, mask),
                Ok(ChannelDecision::NeedsApproval {
                    refusal,
                    mask,
                    request,
                }) => {
                    return self
                        .wait_for_approval(channel, None, refusal, *request, mask, session)
                        .await
                }
                Err(reason) => return self.refuse_on_channel(channel, &reason, session).await,
            };
        if let Err(reason) = self.attach_terminal(channel, None, mask).await {
            self.record_refused_channel("shell", &reason);
            return self.refuse_on_channel(channel, &reason, session).await;
        }
        let Some(state) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        state.tap.kind = ChannelKind::Shell;
        let sent = state.upstream.request_shell(true).await;
        let ok = sent.is_ok() && self.upstream_reply(channel).await;
        if ok {
            self.record_started(EventKind::SshShell, "shell", None, policy_ids);
        }
        Self::answer(session, channel, ok)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self
            .channels
            .get(&channel)
            .is_some_and(|s| s.tap.kind == ChannelKind::Pending)
        {
            return session.channel_failure(channel);
        }
        let Ok(command) = std::str::from_utf8(data) else {
            let reason = "a command that is not UTF-8 cannot be decided";
            self.record_refused_channel("exec", reason);
            return self.refuse_on_channel(channel, reason, session).await;
        };
        let command = command.to_string();
        // Legacy scp is decided as what it does (`ssh_scp`, each path), not as a command.
        let decided = match portcullis_terminal::exec::classify(data).kind {
            portcullis_terminal::exec::ExecKind::Scp {
                upload,
                recursive,
                paths,
            } => match self.file_policy() {
                Some(policy) => super::sftp::decide_scp(
                    &policy, &command, upload, recursive, &paths,
                )
                .map(|policy_ids| ChannelDecision::Allowed {
                    policy_ids,
                    mask: None,
                }),
                None => Err("no identity".to_string()),
            },
            _ => self.decide_request(Action::SshExec, Some(command.clone()), "exec", "exec", true),
        };
        let (policy_ids, mask) = match decided {
            Ok(ChannelDecision::Allowed { policy_ids, mask }) => (policy_ids, mask),
            Ok(ChannelDecision::NeedsApproval {
                refusal,
                mask,
                request,
            }) => {
                return self
                    .wait_for_approval(channel, Some(command), refusal, *request, mask, session)
                    .await
            }
            Err(reason) => return self.refuse_on_channel(channel, &reason, session).await,
        };
        if let Err(reason) = self.attach_terminal(channel, Some(&command), mask).await {
            self.record_refused_channel("exec", &reason);
            return self.refuse_on_channel(channel, &reason, session).await;
        }
        let Some(state) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        state.tap.kind = ChannelKind::Exec;
        let sent = state.upstream.exec(true, data).await;
        let ok = sent.is_ok() && self.upstream_reply(channel).await;
        if ok {
            self.record_started(EventKind::SshExec, "exec", Some(command), policy_ids);
        }
        Self::answer(session, channel, ok)
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if !self
            .channels
            .get(&channel)
            .is_some_and(|s| s.tap.kind == ChannelKind::Pending)
        {
            return session.channel_failure(channel);
        }
        let label = format!("subsystem:{name}");
        if name != "sftp" {
            let reason = format!("subsystem `{name}` is not relayed");
            self.record_refused_channel(&label, &reason);
            return self.refuse_on_channel(channel, &reason, session).await;
        }
        let policy_ids = match self.decide_channel(Action::SshSftp, None, &label, &label) {
            Ok(ids) => ids,
            Err(reason) => return self.refuse_on_channel(channel, &reason, session).await,
        };
        let Some(policy) = self.file_policy() else {
            return session.channel_failure(channel);
        };
        let Some(state) = self.channels.get_mut(&channel) else {
            return session.channel_failure(channel);
        };
        state.tap.kind = ChannelKind::Subsystem;
        let _ = state
            .tap
            .sftp
            .set(Arc::new(super::sftp::SftpRelay::new(policy)));
        let sent = state.upstream.request_subsystem(true, name).await;
        let ok = sent.is_ok() && self.upstream_reply(channel).await;
        if ok {
            self.record_started(EventKind::SshSubsystem, &label, None, policy_ids);
        }
        Self::answer(session, channel, ok)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.channels.contains_key(&channel) {
            let input = HeldInput::WindowChange(col_width, row_height, pix_width, pix_height);
            if self.held(channel, input, session).await? {
                return Ok(());
            }
        }
        if let Some(state) = self.channels.get(&channel) {
            if let Some(t) = state.tap.terminal() {
                // A failed recording ends the channel from its pump.
                let _ = t.lock().await.resize(col_width, row_height).await;
            }
            let _ = state
                .upstream
                .window_change(col_width, row_height, pix_width, pix_height)
                .await;
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(state) = self.channels.get(&channel) {
            // A signal for a command that has not started yet has nothing to reach.
            if state
                .hold
                .as_ref()
                .is_some_and(|h| approval::lock(h).is_waiting())
            {
                return Ok(());
            }
            let _ = state.upstream.signal(signal).await;
        }
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self
            .held(
                channel,
                HeldInput::Data(Bytes::copy_from_slice(data)),
                session,
            )
            .await?
        {
            return Ok(());
        }
        let Some(state) = self.channels.get_mut(&channel) else {
            return Ok(());
        };
        if state.tap.kind == ChannelKind::Pending {
            // Nothing runs yet to read it: RFC 4254 lets us drop it, and a server would too.
            return Ok(());
        }
        if let Some(sftp) = state.tap.sftp.get().cloned() {
            match sftp.client_bytes(data) {
                Ok(out) if out.is_empty() => {}
                Ok(out) => {
                    let n = out.len() as u64;
                    if state.upstream.data_bytes(Bytes::from(out)).await.is_ok() {
                        self.count_input(n);
                    }
                }
                Err(why) => {
                    // This channel only: the connection and its other channels go on.
                    if let Some(state) = self.channels.remove(&channel) {
                        state.pump.abort();
                        let _ = state.upstream.close().await;
                    }
                    session.extended_data(
                        channel,
                        1,
                        Bytes::from(format!("portcullis: {why}\r\n")),
                    )?;
                    session.eof(channel)?;
                    session.close(channel)?;
                }
            }
            return Ok(());
        }
        let Some(terminal) = state.tap.terminal().cloned() else {
            let n = data.len() as u64;
            if state
                .upstream
                .data_bytes(Bytes::copy_from_slice(data))
                .await
                .is_ok()
            {
                self.count_input(n);
            }
            return Ok(());
        };
        // A failed recording ends the channel from its pump; the input goes nowhere.
        let Ok(mut step) = terminal.lock().await.input(data).await else {
            return Ok(());
        };
        loop {
            if !step.to_client.is_empty() {
                session.data(channel, Bytes::from(std::mem::take(&mut step.to_client)))?;
            }
            let Some(state) = self.channels.get(&channel) else {
                return Ok(());
            };
            let mut n = 0;
            for bytes in std::mem::take(&mut step.to_upstream) {
                n += bytes.len() as u64;
                if state.upstream.data_bytes(Bytes::from(bytes)).await.is_err() {
                    break;
                }
            }
            self.count_input(n);
            let Some(line) = step.line.take() else {
                return Ok(());
            };
            // Its keys are on their way; their echo tells a typed line from one typed
            // without echo (a password), so wait for it a moment before deciding.
            let deadline = tokio::time::Instant::now() + terminal::ECHO_WAIT;
            let mut echoed = terminal.lock().await.echo_seen();
            while !echoed && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
                echoed = terminal.lock().await.echo_seen();
            }
            let verdict = self.decide_line(&line, echoed);
            let shown = if echoed {
                line.text.as_str()
            } else {
                "(typed without echo)"
            };
            match terminal.lock().await.decided(shown, &verdict).await {
                Ok(next) => step = next,
                Err(_) => return Ok(()),
            }
        }
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if self.held(channel, HeldInput::Eof, session).await? {
            return Ok(());
        }
        if let Some(state) = self.channels.get(&channel) {
            let _ = state.upstream.eof().await;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(state) = self.channels.remove(&channel) {
            if let (Some((task, id)), Some(hold)) = (&state.waiter, &state.hold) {
                let waiting = approval::lock(hold).is_waiting();
                approval::lock(hold).end();
                if waiting {
                    self.gate
                        .approvals()
                        .withdraw(id, "the client closed the channel while its command waited");
                }
                task.abort();
            }
            let _ = state.upstream.close().await;
        }
        Ok(())
    }
}

impl Drop for ClientHandler {
    fn drop(&mut self) {
        if let Some(up) = &mut self.open {
            let reason = up.budget.ended().unwrap_or_else(|| "closed".into());
            up.session.set_end(reason);
        }
        if let Some(reason) = &self.refused {
            tracing::debug!(%reason, "SSH connection refused");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::env_allowed;

    #[test]
    fn only_allowlisted_environment_variables_pass() {
        for ok in [
            "LANG",
            "LC_ALL",
            "LC_CTYPE",
            "TERM",
            "GIT_PROTOCOL",
            "COLORTERM",
        ] {
            assert!(env_allowed(ok), "{ok}");
        }
        for no in [
            "LD_PRELOAD",
            "PATH",
            "LC_",
            "lc_all",
            "BASH_ENV",
            "LANGUAGE_X",
            "LC_A=B",
        ] {
            assert!(!env_allowed(no), "{no}");
        }
    }
}
