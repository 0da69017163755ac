//! Admission: the one way every protocol takes from an accepted, redirected socket to an
//! allowed and recorded connection. The proxy has found the origin (who, from where, to which
//! target) and the uid's place under the limits; a protocol handler then asks, in order:
//!
//! 1. [`Gate::resolve`]: who is behind the uid (identity);
//! 2. [`Gate::decide_connect`]: may they connect (policy; a refusal worded once, approvals
//!    included, in [`crate::policy::outcome`]);
//! 3. [`Gate::upstream_addr`] and [`Gate::connect_upstream`]: where to, over a socket the
//!    kernel programs leave alone;
//! 4. [`Gate::open`]: a slot under `proxy.max_connections`, and `connection.opened` made
//!    durable before any byte is forwarded; the returned [`OpenSession`] registers the
//!    connection and records `connection.closed` however it ends. [`Gate::open_connected`]
//!    does the connect of step 3 and this at once, handing the upstream over only with
//!    the session.
//!
//! A refusal at any step goes through [`Gate::record_refusal`]; the protocol answers it in
//! its own wire format. Protocols use this module and never the proxy above them.

mod registry;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis_policy::Request;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::approvals::{ApprovalStore, Ask, Asked};
use crate::audit::{AuditEvent, AuditLog, Decision, EventKind};
use crate::config::{canonical_ip, Config, ProtectedTarget};
use crate::identity::{IdentityService, ResolveError};
use crate::limits::Admission;
use crate::policy::{Policies, PolicyRefusal};
use portcullis_core::{now_ms, ByteCounters, Identity, Origin};

pub use registry::{Connection, ConnectionView, Registry};

/// Removes the connection from the registry and writes its `connection.closed` event
/// however the handler ends: returned, failed, or cancelled at shutdown.
struct OpenGuard {
    conn: Arc<Connection>,
    registry: Arc<Registry>,
    audit: Arc<AuditLog>,
    started: Instant,
    reason: String,
    db_user: Option<String>,
    db_name: Option<String>,
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.registry.remove(self.conn.id);
        let mut ev = connection_event(EventKind::ConnectionClosed, &self.conn);
        ev.bytes_client_to_upstream =
            Some(self.conn.bytes.client_to_upstream.load(Ordering::Relaxed));
        ev.bytes_upstream_to_client =
            Some(self.conn.bytes.upstream_to_client.load(Ordering::Relaxed));
        ev.duration_ms =
            Some(u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX));
        ev.reason = Some(std::mem::take(&mut self.reason));
        ev.db_user = self.db_user.take().map(Into::into);
        ev.db_name = self.db_name.take().map(Into::into);
        tracing::info!(
            up = ev.bytes_client_to_upstream,
            down = ev.bytes_upstream_to_client,
            reason = ev.reason.as_deref().unwrap_or(""),
            "connection closed"
        );
        self.audit.record(ev);
    }
}

fn connection_event(kind: EventKind, c: &Connection) -> AuditEvent {
    let mut ev = AuditEvent::new(kind);
    ev.connection_id = Some(c.id);
    ev.protocol = Some(c.protocol.name());
    ev.target = Some(Arc::clone(&c.target));
    ev.identity = Some(Arc::clone(&c.identity));
    ev.origin = Some(Arc::clone(&c.origin));
    ev.client = Some(c.client.to_string().into());
    ev.upstream = Some(c.upstream.to_string().into());
    ev
}

/// A redirected connection whose origin and target are known, before anything is decided.
pub struct Incoming {
    pub id: u64,
    pub peer: SocketAddr,
    pub origin: Origin,
    pub target: ProtectedTarget,
    /// The connection's place under its uid's limits; [`Gate::open`] ends its start-up.
    pub admission: Admission,
}

/// What a refused connection's event says; every protocol's refusals go through
/// [`Gate::record_refusal`].
pub struct Refusal<'a> {
    pub id: u64,
    pub peer: SocketAddr,
    pub origin: &'a Origin,
    /// None when the destination matches no configured target.
    pub target: Option<&'a ProtectedTarget>,
    pub identity: Option<&'a Identity>,
    pub reason: String,
    /// allow, deny, approval or error.
    pub decision: Decision,
    pub policy_ids: Vec<String>,
    pub db_user: Option<&'a str>,
    pub db_name: Option<&'a str>,
}

impl<'a> Refusal<'a> {
    /// A refusal of `incoming` before any policy decision (`decision: error`).
    pub fn of(incoming: &'a Incoming, identity: Option<&'a Identity>, reason: String) -> Self {
        Self {
            id: incoming.id,
            peer: incoming.peer,
            origin: &incoming.origin,
            target: Some(&incoming.target),
            identity,
            reason,
            decision: Decision::Error,
            policy_ids: Vec::new(),
            db_user: None,
            db_name: None,
        }
    }
}

/// A connection a protocol handler is about to open.
pub struct Opening<'a> {
    pub incoming: &'a Incoming,
    pub identity: &'a Identity,
    pub upstream: SocketAddr,
    pub policy_ids: Vec<String>,
    pub db_user: Option<String>,
    pub db_name: Option<String>,
}

/// Why [`Gate::open`] refused a connection it was asked to open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `proxy.max_connections` connections are open.
    #[error("connection limit of {0} reached")]
    AtCapacity(usize),
    /// `connection.opened` could not be made durable, and the audit settings fail closed.
    #[error("the audit store cannot record the connection: {0}")]
    Unrecorded(crate::audit::AuditError),
}

/// Why [`Gate::open_connected`] hands over no connection.
#[derive(Debug, thiserror::Error)]
pub enum ConnectedError {
    /// Not opened: nothing recorded as opened, the upstream (if reached) closed unused.
    #[error(transparent)]
    Open(OpenError),
    /// Opened and recorded, then the upstream could not be reached: the session has ended
    /// (its `connection.closed` carries this reason).
    #[error("upstream {addr} unreachable: {source}")]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A target whose upstream is the proxy's own listener: following it would loop.
#[derive(Debug, thiserror::Error)]
#[error("the upstream is the proxy itself")]
pub struct UpstreamIsProxy;

/// An open, registered connection; dropping it records `connection.closed`.
pub struct OpenSession {
    pub conn: Arc<Connection>,
    guard: OpenGuard,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl OpenSession {
    /// How the session ended, for `connection.closed`; a close requested from outside
    /// (logout, session end) wins over the handler's own reason.
    pub fn set_end(&mut self, reason: String) {
        let closed_by = self
            .conn
            .close_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.guard.reason = closed_by.unwrap_or(reason);
    }
}

/// How a grant that let a connection through is named among its policy ids (in
/// `connection.opened`, and for [`Gate::open`] to tie the connection to the grant).
pub const GRANT_POLICY_PREFIX: &str = "grant:";

/// How long a grant asked for by a refused connection lasts once approved (`portcullis
/// request --for` asks for another).
pub const CONNECT_GRANT: Duration = Duration::from_secs(60 * 60);

/// What every protocol admits connections through; shared by all of them.
pub struct Gate {
    config: Arc<Config>,
    audit: Arc<AuditLog>,
    identity: Arc<IdentityService>,
    policies: Arc<Policies>,
    registry: Arc<Registry>,
    approvals: Arc<ApprovalStore>,
    /// `proxy.max_connections` open connections at most.
    limit: Arc<Semaphore>,
    /// Cancelled when the agent's drain is over: every connection opened here ends.
    close_all: CancellationToken,
}

impl Gate {
    pub fn new(
        config: Arc<Config>,
        audit: Arc<AuditLog>,
        identity: Arc<IdentityService>,
        policies: Arc<Policies>,
        registry: Arc<Registry>,
        approvals: Arc<ApprovalStore>,
        close_all: CancellationToken,
    ) -> Self {
        let limit = Arc::new(Semaphore::new(config.proxy.max_connections));
        Self {
            config,
            audit,
            identity,
            policies,
            registry,
            approvals,
            limit,
            close_all,
        }
    }

    /// The identity behind a connection's uid (the one identity lookup).
    pub fn resolve(&self, origin: &Origin) -> Result<Identity, ResolveError> {
        self.identity.resolve(origin)
    }

    /// Whether a connection may open: the policies that allow it, or the refusal. The
    /// request is [`crate::policy::connect_request`]'s, with what the protocol learned at
    /// start-up (a database role and name) and its action (`replicate` on top of `connect`).
    ///
    /// When the policy asks for approval, an active grant of the requester for this target
    /// and action lets it through (its id joins the policy ids as `grant:<id>`, and the
    /// connection ends with the grant); without one, the refusal names the approval request
    /// made for it (or the one already pending).
    pub fn decide_connect(
        &self,
        request: &Request,
    ) -> Result<crate::policy::Allowed, PolicyRefusal> {
        let decision = self.policies.decide(request);
        let action = request.action.cedar_name();
        if matches!(
            decision.effect,
            portcullis_policy::Effect::RequireApproval(_)
        ) {
            if let Some(grant) =
                self.approvals
                    .active_grant(&request.principal.id, &request.target.name, action)
            {
                let mut policy_ids = crate::policy::policy_ids(&decision);
                policy_ids.push(format!("{GRANT_POLICY_PREFIX}{}", grant.id));
                let mut ev = AuditEvent::new(EventKind::GrantUsed);
                ev.target = Some(request.target.name.as_str().into());
                ev.protocol = Some(request.target.protocol.as_str().into());
                ev.identity = Some(
                    crate::approvals::requester_of(&request.principal, request.context.source_uid)
                        .into(),
                );
                ev.policy_ids = policy_ids.clone().into();
                ev.db_user = request.context.db_user.as_deref().map(Into::into);
                ev.db_name = request.context.db_name.as_deref().map(Into::into);
                self.approvals.record_use(
                    &grant,
                    ev,
                    format!(
                        "{action} on {} by {}",
                        request.target.name, request.context.source_comm
                    ),
                );
                return Ok(crate::policy::Allowed {
                    policy_ids,
                    obligations: decision.obligations,
                });
            }
        }
        let refusal = match crate::policy::outcome(decision) {
            Ok(allowed) => return Ok(allowed),
            Err(refusal) => refusal,
        };
        let Some(requirement) = refusal.approval.clone() else {
            return Err(refusal);
        };
        let ask = Ask {
            requester: crate::approvals::requester_of(
                &request.principal,
                request.context.source_uid,
            ),
            asked: Asked::Grant {
                target: request.target.name.clone(),
                actions: vec![action.to_owned()],
                duration_secs: CONNECT_GRANT.as_secs(),
            },
            reason: format!(
                "asked by a connection of {} (uid {})",
                request.context.source_comm, request.context.source_uid
            ),
            requirement,
            policy_ids: refusal.policy_ids.clone(),
            timeout: self.policies.current().approval_settings().timeout,
        };
        Err(match self.approvals.ask(ask) {
            Ok(asked) => crate::policy::approval_requested(refusal, &asked.id),
            Err(e) => crate::policy::approval_unavailable(refusal, &e.to_string()),
        })
    }

    /// Why the audit trail forbids new connections now (the central backlog over its
    /// bound, or the store failing to write), as a refusal reason.
    pub fn refusal_reason(&self) -> Option<String> {
        self.audit.refusal_reason()
    }

    /// No slot is free under `proxy.max_connections`: checked before the upstream connect,
    /// which a refusal would waste ([`Gate::open`] takes the slot).
    pub fn at_capacity(&self) -> Option<OpenError> {
        (self.limit.available_permits() == 0)
            .then(|| OpenError::AtCapacity(self.config.proxy.max_connections))
    }

    /// Records a refused connection of a protocol handler that answers in its own protocol.
    pub fn record_refusal(&self, r: Refusal<'_>) {
        let mut ev = AuditEvent::new(EventKind::ConnectionRefused).reason(r.reason);
        ev.decision = Some(r.decision);
        ev.policy_ids = r.policy_ids.into();
        ev.connection_id = Some(r.id);
        ev.client = Some(r.peer.to_string().into());
        ev.identity = r.identity.cloned().map(Into::into);
        ev.origin = Some(r.origin.clone().into());
        ev.target = r.target.map(|t| t.name.as_str().into());
        ev.protocol = r.target.map(|t| t.protocol.to_string().into());
        ev.db_user = r.db_user.map(Into::into);
        ev.db_name = r.db_name.map(Into::into);
        tracing::warn!(
            reason = ev.reason.as_deref().unwrap_or(""),
            "connection refused"
        );
        self.audit.record(ev);
    }

    /// Admits a connection a protocol handler has authorized: takes a slot under the
    /// connection limit and records `connection.opened` durably before any byte is forwarded.
    pub async fn open(&self, o: Opening<'_>) -> Result<OpenSession, OpenError> {
        self.open_upstream(o, None).await
    }

    /// [`Gate::open`] for a PostgreSQL session on a target with an upstream pool: its
    /// `connection.opened` says whether the server session was lent from the pool (and
    /// its process id) or dialed.
    pub async fn open_upstream(
        &self,
        o: Opening<'_>,
        pooled: Option<(bool, Option<u32>)>,
    ) -> Result<OpenSession, OpenError> {
        let Ok(permit) = Arc::clone(&self.limit).try_acquire_owned() else {
            return Err(OpenError::AtCapacity(self.config.proxy.max_connections));
        };
        let conn = Arc::new(Connection {
            id: o.incoming.id,
            started_ms: now_ms(),
            protocol: o.incoming.target.protocol,
            target: o.incoming.target.name.as_str().into(),
            origin: o.incoming.origin.clone().into(),
            identity: o.identity.clone().into(),
            client: o.incoming.peer,
            upstream: o.upstream,
            bytes: ByteCounters::default(),
            cancel: self.close_all.child_token(),
            close_reason: Mutex::new(None),
            // `decide_connect` puts the grant last, after the policies' own ids.
            grant: o
                .policy_ids
                .last()
                .and_then(|p| p.strip_prefix(GRANT_POLICY_PREFIX))
                .map(Into::into),
        });
        let mut opened = connection_event(EventKind::ConnectionOpened, &conn);
        opened.decision = Some(Decision::Allow);
        opened.policy_ids = o.policy_ids.into();
        opened.db_user = o.db_user.as_deref().map(Into::into);
        opened.db_name = o.db_name.as_deref().map(Into::into);
        if let Some((reused, pid)) = pooled {
            opened.upstream_pooled = Some(reused);
            opened.backend_pid = pid;
        }
        if let Err(e) = self.audit.record_durable(&opened).await {
            if !self.audit.keeps_enforcing_unaudited() {
                tracing::error!(error = %e, "cannot record the connection; refusing it");
                return Err(OpenError::Unrecorded(e));
            }
            tracing::error!(error = %e, "cannot record the connection; opening it unaudited (audit.on_write_failure = \"keep_enforcing\")");
        }
        o.incoming.admission.end_startup();
        self.registry.insert(Arc::clone(&conn));
        tracing::info!(target = %conn.target, upstream = %o.upstream, "connection opened");
        let guard = OpenGuard {
            conn: Arc::clone(&conn),
            registry: Arc::clone(&self.registry),
            audit: Arc::clone(&self.audit),
            started: Instant::now(),
            reason: "agent shutdown".into(),
            db_user: o.db_user,
            db_name: o.db_name,
        };
        Ok(OpenSession {
            conn,
            guard,
            _permit: permit,
        })
    }

    fn is_own_listener(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        ip == IpAddr::V4(self.config.proxy.listen_ipv4)
            || ip == IpAddr::V6(self.config.proxy.listen_ipv6)
            || ip.is_unspecified()
    }

    /// Where a target's connections go: its configured upstream or the original destination;
    /// refused when that is the proxy's own listener.
    pub fn upstream_addr(
        &self,
        target: &ProtectedTarget,
        origin: &Origin,
    ) -> Result<SocketAddr, UpstreamIsProxy> {
        let addr = target.upstream.unwrap_or(origin.destination);
        if addr.port() == self.config.proxy.port && self.is_own_listener(addr.ip()) {
            return Err(UpstreamIsProxy);
        }
        Ok(addr)
    }

    /// Connects with the exempt mark, so the kernel programs leave this socket alone.
    pub async fn connect_upstream(&self, addr: SocketAddr) -> std::io::Result<TcpStream> {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        socket2::SockRef::from(&socket).set_mark(self.config.proxy.upstream_mark)?;
        socket.set_nodelay(true)?;
        let timeout = Duration::from_secs(self.config.proxy.connect_timeout_secs);
        match tokio::time::timeout(timeout, socket.connect(addr)).await {
            Ok(r) => r,
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "connect timed out",
            )),
        }
    }

    /// [`Gate::connect_upstream`] and [`Gate::open`] at once: the upstream's handshake runs
    /// while `connection.opened` is made durable, so a new connection waits for the longer
    /// of the two instead of their sum. Still fail closed: the upstream socket is handed over
    /// only with the open session, so when the event cannot be recorded the socket is closed
    /// here, before any byte has moved either way. An upstream that cannot be reached after
    /// the event is durable ends the session at once: its `connection.closed` says why.
    pub async fn open_connected(
        &self,
        o: Opening<'_>,
    ) -> Result<(OpenSession, TcpStream), ConnectedError> {
        let addr = o.upstream;
        let connecting = self.connect_upstream(addr);
        let opening = self.open(o);
        tokio::pin!(connecting, opening);
        let mut connected = None;
        let opened = loop {
            tokio::select! {
                // The SYN goes out first; the event is encoded and queued while it travels.
                biased;
                c = &mut connecting, if connected.is_none() => connected = Some(c),
                // Polled to its end even when the connect failed: once queued, the event
                // is written, and the session it returns records how the connection ended.
                o = &mut opening => break o,
            }
        };
        // Refused: a connect still under way is dropped, one made is closed, unused.
        let mut session = opened.map_err(ConnectedError::Open)?;
        let connected = match connected {
            Some(c) => c,
            None => connecting.await,
        };
        match connected {
            Ok(upstream) => Ok((session, upstream)),
            Err(source) => {
                let e = ConnectedError::Unreachable { addr, source };
                session.set_end(e.to_string());
                Err(e)
            }
        }
    }

    /// The approvals store: a statement held for approval makes its request there and waits.
    pub fn approvals(&self) -> &ApprovalStore {
        &self.approvals
    }

    /// Waits for the verdict on approval request `id`: `Ok` once approved, `Err(why)` once
    /// denied (naming who and why), expired, withdrawn or gone. A wait that ends without a
    /// verdict (the future dropped: the client went, the session or the agent ended)
    /// withdraws the request with `ended`, so a later approval approves nothing; withdrawing
    /// one already decided does nothing. The one wait of every protocol, for connections and
    /// statements alike.
    pub async fn approval_verdict(&self, id: &str, ended: &str) -> Result<(), String> {
        use crate::approvals::RequestState;
        let _unanswered = WithdrawOnDrop {
            store: &self.approvals,
            id,
            why: ended,
        };
        let mut changes = self.approvals.watch();
        loop {
            let Some(r) = self.approvals.state_of(id) else {
                return Err(format!("approval request {id} is gone"));
            };
            match r.state {
                RequestState::Approved => return Ok(()),
                RequestState::Denied => {
                    let by = r
                        .verdicts
                        .iter()
                        .find(|v| !v.approve)
                        .map(|v| format!("{}: {}", crate::approvals::who(&v.by), v.reason))
                        .unwrap_or_default();
                    return Err(format!("approval request {id} was denied by {by}"));
                }
                RequestState::Expired => {
                    let secs = r.expires_ms.saturating_sub(r.created_ms) / 1000;
                    return Err(format!(
                        "approval request {id} expired: not approved within {secs} s"
                    ));
                }
                RequestState::Withdrawn => {
                    return Err(format!("approval request {id} was withdrawn"))
                }
                RequestState::Pending => {}
            }
            let left = r.expires_ms.saturating_sub(crate::audit::now_ms());
            tokio::select! {
                changed = changes.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                // The sweep marks it expired; look again a moment after it is due.
                () = tokio::time::sleep(Duration::from_millis(left.saturating_add(50))) => {}
            }
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    pub fn policies(&self) -> &Policies {
        &self.policies
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }
}

/// Withdraws a pending approval request when what waits for it no longer does, whatever
/// ended the wait.
struct WithdrawOnDrop<'a> {
    store: &'a ApprovalStore,
    id: &'a str,
    why: &'a str,
}

impl Drop for WithdrawOnDrop<'_> {
    fn drop(&mut self) {
        self.store.withdraw(self.id, self.why);
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests"
)]
mod tests {
    use super::*;

    /// A gate as the agent wires it, over a real audit store in `dir`: the Unix identity, a
    /// policy that lets everyone connect, one `tcp` target.
    fn gate(dir: &std::path::Path) -> (Gate, ProtectedTarget) {
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        std::fs::write(
            policies.join("connect.cedar"),
            "@id(\"connect\")\npermit (principal, action == Portcullis::Action::\"connect\", resource);\n",
        )
        .unwrap();
        let text = format!(
            "state_dir = \"{}\"\n[insecure]\nunix_identity_only = true\n[policy]\ndir = \"{}\"\n\
             [[target]]\nname = \"db\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1\"\nport = 9\n",
            dir.join("state").display(),
            policies.display()
        );
        let (config, targets) = Config::parse(&dir.join("portcullis.toml"), &text).unwrap();
        let (audit, _) = AuditLog::open(&config.audit, &config.audit_dir(), Vec::new()).unwrap();
        let audit = Arc::new(audit);
        let policies = Policies::load(&config.policy.dir, Arc::clone(&audit)).unwrap();
        let registry = Arc::new(Registry::default());
        let identity = IdentityService::new(
            &config,
            dir,
            Arc::clone(&audit),
            Arc::clone(&registry) as Arc<dyn crate::identity::SessionEndListener>,
            crate::limits::Limiter::new(config.limits.clone()),
        )
        .unwrap();
        let approvals = ApprovalStore::open(
            &dir.join("approvals"),
            Arc::clone(&audit),
            Arc::clone(&registry) as Arc<dyn crate::approvals::GrantEndListener>,
            Default::default(),
        )
        .unwrap();
        let gate = Gate::new(
            Arc::new(config),
            audit,
            identity,
            policies,
            registry,
            approvals,
            CancellationToken::new(),
        );
        (gate, targets.into_iter().next().unwrap())
    }

    fn incoming(gate: &Gate, target: ProtectedTarget, id: u64) -> Incoming {
        let limiter = crate::limits::Limiter::new(gate.config().limits.clone());
        Incoming {
            id,
            peer: "127.0.0.1:40000".parse().unwrap(),
            origin: Origin {
                pid: 1,
                tid: 1,
                uid: 0,
                gid: 0,
                comm: "test".into(),
                cgroup_id: 0,
                netns_cookie: 0,
                socket_cookie: 0,
                destination: "127.0.0.1:9".parse().unwrap(),
                target_id: target.id,
            },
            target,
            admission: limiter.admit(0, now_ms()).unwrap(),
        }
    }

    /// Every event line the store holds so far.
    fn trail(gate: &Gate) -> String {
        gate.audit().flush();
        let mut text = String::new();
        for entry in std::fs::read_dir(gate.config().audit_dir()).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "jsonl") {
                text.push_str(&std::fs::read_to_string(path).unwrap_or_default());
            }
        }
        text
    }

    /// Both done: the session and the connected upstream come back together, the opening
    /// on disk; an upstream that refuses after the event is written ends the session, and
    /// its `connection.closed` names the upstream.
    #[tokio::test]
    async fn open_connected_hands_over_both_or_ends_the_session_saying_why() {
        let dir = tempfile::tempdir().unwrap();
        let (gate, target) = gate(dir.path());
        let identity = gate
            .resolve(&incoming(&gate, target.clone(), 1).origin)
            .unwrap();

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let up = listener.local_addr().unwrap();
        let first = incoming(&gate, target.clone(), 1);
        let opening = Opening {
            incoming: &first,
            identity: &identity,
            upstream: up,
            policy_ids: Vec::new(),
            db_user: None,
            db_name: None,
        };
        let (session, upstream) = gate.open_connected(opening).await.unwrap();
        let (_, from) = listener.accept().await.unwrap();
        assert_eq!(from, upstream.local_addr().unwrap());
        assert_eq!(gate.registry().len(), 1);
        assert!(trail(&gate).contains("\"event\":\"connection.opened\""));
        drop(session);

        drop(listener);
        let second = incoming(&gate, target, 2);
        let opening = Opening {
            incoming: &second,
            identity: &identity,
            upstream: up,
            policy_ids: Vec::new(),
            db_user: None,
            db_name: None,
        };
        let Err(e) = gate.open_connected(opening).await else {
            panic!("connected to a closed port");
        };
        assert!(
            matches!(e, ConnectedError::Unreachable { addr, .. } if addr == up),
            "{e}"
        );
        assert_eq!(gate.registry().len(), 0);
        let closed = trail(&gate)
            .lines()
            .filter(|l| l.contains("\"event\":\"connection.closed\""))
            .map(str::to_owned)
            .collect::<Vec<_>>();
        assert_eq!(closed.len(), 2, "{closed:?}");
        assert!(
            closed[1].contains(&format!("upstream {up} unreachable")),
            "{}",
            closed[1]
        );
    }
}
