//! The listeners that receive redirected connections, the origin lookup that says who
//! made each one and where it was going, and the dispatch to a protocol handler.
//!
//! A connection without a published origin is refused: it did not come through the
//! kernel redirect (someone dialled the listener directly), so nothing about it can be
//! trusted. The proxy never makes a decision from anything the client says about itself.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::audit::{now_ms, AuditEvent, AuditLog, Decision, Encoded, EventKind};
use crate::config::{canonical_ip, Config, ProtectedTarget, Protocol};
use crate::ebpf::Enforcement;
use crate::identity::{Identity, IdentityService};
use crate::limits::{Admission, Limiter, Note, RefusalKey, RefusalSummaries};
pub use portcullis_core::{ByteCounters, Origin};

/// One open proxied connection.
#[derive(Debug)]
pub struct Connection {
    pub id: u64,
    pub started_ms: u64,
    pub protocol: Protocol,
    /// Shared with every event of the connection (one statement event per statement).
    pub target: Arc<str>,
    pub origin: Arc<Encoded<Origin>>,
    pub identity: Arc<Encoded<Identity>>,
    pub client: SocketAddr,
    pub upstream: SocketAddr,
    pub bytes: ByteCounters,
    /// Cancelled to close this one connection (logout, session end, shutdown).
    pub cancel: CancellationToken,
    pub close_reason: Mutex<Option<String>>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct ConnectionView {
    pub id: u64,
    pub started_ms: u64,
    pub protocol: String,
    pub target: String,
    pub pid: u32,
    pub uid: u32,
    pub user: Option<String>,
    /// The OIDC subject (or service name) the connection acts as.
    pub subject: Option<String>,
    pub comm: String,
    pub destination: SocketAddr,
    pub client: SocketAddr,
    /// Where the agent connected; shown to root only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<SocketAddr>,
    pub bytes_client_to_upstream: u64,
    pub bytes_upstream_to_client: u64,
}

impl Connection {
    pub fn view(&self) -> ConnectionView {
        ConnectionView {
            id: self.id,
            started_ms: self.started_ms,
            protocol: self.protocol.to_string(),
            target: self.target.to_string(),
            pid: self.origin.pid,
            uid: self.origin.uid,
            user: self.identity.user.clone(),
            subject: self
                .identity
                .email
                .clone()
                .or_else(|| self.identity.subject.clone()),
            comm: self.origin.comm.clone(),
            destination: self.origin.destination,
            client: self.client,
            upstream: Some(self.upstream),
            bytes_client_to_upstream: self.bytes.client_to_upstream.load(Ordering::Relaxed),
            bytes_upstream_to_client: self.bytes.upstream_to_client.load(Ordering::Relaxed),
        }
    }
}

/// Open connections, for status and for closing a user's connections later.
#[derive(Default)]
pub struct Registry {
    open: Mutex<BTreeMap<u64, Arc<Connection>>>,
}

impl Registry {
    fn insert(&self, c: Arc<Connection>) {
        self.lock().insert(c.id, c);
    }

    fn remove(&self, id: u64) {
        self.lock().remove(&id);
    }

    pub fn views(&self, uid_filter: Option<u32>) -> Vec<ConnectionView> {
        self.lock()
            .values()
            .filter(|c| uid_filter.is_none_or(|uid| c.origin.uid == uid))
            .map(|c| c.view())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Closes every open connection of `uid`; returns how many.
    pub fn close_uid(&self, uid: u32, reason: &str) -> usize {
        let open = self.lock();
        let mut n = 0;
        for c in open.values().filter(|c| c.origin.uid == uid) {
            *c.close_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
            c.cancel.cancel();
            n += 1;
        }
        n
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<Connection>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

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
    /// The connection's place under its uid's limits; [`Proxy::open`] ends its start-up.
    pub admission: Admission,
}

/// What a refused connection's event says; every protocol's refusals go through
/// [`Proxy::record_refusal`].
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

/// Why [`Proxy::open`] refused a connection it was asked to open.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// `proxy.max_connections` connections are open.
    #[error("connection limit of {0} reached")]
    AtCapacity(usize),
    /// `connection.opened` could not be made durable, and the audit settings fail closed.
    #[error("the audit store cannot record the connection: {0}")]
    Unrecorded(crate::audit::AuditError),
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

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub struct Proxy {
    config: Arc<Config>,
    targets: Arc<Vec<ProtectedTarget>>,
    enforcement: Arc<Enforcement>,
    audit: Arc<AuditLog>,
    identity: Arc<IdentityService>,
    policies: Arc<crate::policy::Policies>,
    postgres: Option<Arc<crate::protocol::postgres::Shared>>,
    pub registry: Arc<Registry>,
    next_id: AtomicU64,
    limit: Arc<Semaphore>,
    /// Cancelled on shutdown: stop accepting.
    pub stop_accepting: CancellationToken,
    /// Cancelled when draining is over: close what is still open.
    pub close_all: CancellationToken,
    pub tasks: TaskTracker,
    /// The event loops connections run on, handed out in turn (`proxy.threads`).
    loops: Vec<tokio::runtime::Handle>,
    next_loop: std::sync::atomic::AtomicUsize,
    /// Per-uid limits, consulted once per accepted connection (`[limits]`).
    limiter: Arc<Limiter>,
    /// Refusals the limits and the origin check count instead of recording one by one.
    summaries: RefusalSummaries<RefusedDetail>,
    /// The monotonic clock the limits run on.
    epoch: Instant,
}

/// What a summary keeps of the last refusal it counted.
#[derive(Debug, Clone)]
pub struct RefusedDetail {
    peer: SocketAddr,
    origin: Option<Origin>,
}

/// Binds the proxy listeners. IPv4 is required; IPv6 is used when the host has it
/// (without it, IPv6 redirects meet a closed port: refused, never let through).
pub fn bind_listeners(config: &Config) -> Result<Vec<TcpListener>, ProxyError> {
    let v4 = SocketAddr::new(IpAddr::V4(config.proxy.listen_ipv4), config.proxy.port);
    let v6 = SocketAddr::new(IpAddr::V6(config.proxy.listen_ipv6), config.proxy.port);
    let mut out = vec![listen(v4).map_err(|source| ProxyError::Listen { addr: v4, source })?];
    match listen(v6) {
        Ok(l) => out.push(l),
        Err(e) => {
            tracing::warn!(addr = %v6, error = %e, "no IPv6 listener; IPv6 redirects will be refused")
        }
    }
    Ok(out)
}

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

impl Proxy {
    #[allow(
        clippy::too_many_arguments,
        reason = "the agent's parts, wired once at start"
    )]
    pub fn new(
        config: Arc<Config>,
        targets: Arc<Vec<ProtectedTarget>>,
        enforcement: Arc<Enforcement>,
        audit: Arc<AuditLog>,
        identity: Arc<IdentityService>,
        policies: Arc<crate::policy::Policies>,
        postgres: Option<Arc<crate::protocol::postgres::Shared>>,
        registry: Arc<Registry>,
        loops: Vec<tokio::runtime::Handle>,
        limiter: Arc<Limiter>,
    ) -> Arc<Self> {
        let limit = Arc::new(Semaphore::new(config.proxy.max_connections));
        let summaries =
            RefusalSummaries::new(config.limits.summary_interval_secs.saturating_mul(1000));
        Arc::new(Self {
            config,
            targets,
            enforcement,
            audit,
            identity,
            policies,
            postgres,
            registry,
            // Connection ids stay unique across restarts (they name sessions in the audit
            // trail): the start time in seconds, shifted past any plausible per-run count.
            next_id: AtomicU64::new((now_ms() / 1000) << 24),
            limit,
            stop_accepting: CancellationToken::new(),
            close_all: CancellationToken::new(),
            tasks: TaskTracker::new(),
            loops,
            next_loop: std::sync::atomic::AtomicUsize::new(0),
            limiter,
            summaries,
            epoch: Instant::now(),
        })
    }

    fn clock_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Writes the summaries of refusals not recorded one by one, once per interval, and
    /// forgets idle uids; at the end (after the drain) writes what is still counted.
    pub async fn summarize_refusals(self: Arc<Self>) {
        let every = Duration::from_millis((self.summaries.interval_ms() / 2).max(50));
        loop {
            tokio::select! {
                () = self.close_all.cancelled() => break,
                () = tokio::time::sleep(every) => {}
            }
            let now = self.clock_ms();
            for s in self.summaries.due(now) {
                self.record_summary(s);
            }
            self.limiter.sweep(now);
        }
        for s in self.summaries.drain(self.clock_ms()) {
            self.record_summary(s);
        }
    }

    fn record_summary(&self, s: crate::limits::Summary<RefusedDetail>) {
        let who = match s.key {
            RefusalKey::Uid(uid) => format!("uid {uid}"),
            RefusalKey::NoOrigin => "connections without an origin record".to_string(),
        };
        let mut ev = AuditEvent::new(EventKind::ConnectionRefused).reason(format!(
            "{}: {} more refusal(s) of {who} in {} ms, not recorded one by one",
            s.reason, s.count, s.interval_ms
        ));
        ev.decision = Some(Decision::Error);
        ev.count = Some(s.count);
        ev.client = Some(s.last.peer.to_string().into());
        ev.origin = s.last.origin.map(Into::into);
        tracing::warn!(%who, count = s.count, "refusals summarized");
        self.audit.record(ev);
    }

    /// Notes a refusal the summaries cover; true when it is the first of its interval and
    /// must be recorded in full.
    fn first_of_interval(&self, key: RefusalKey, reason: &str, detail: RefusedDetail) -> bool {
        self.summaries.note(key, reason, detail, self.clock_ms()) == Note::RecordNow
    }

    /// Refuses a connection over its uid's limits: closed at once, with a PostgreSQL
    /// client told 53300 (what the server says when it has no slot). Writing the error is
    /// a non-blocking attempt: a flood must not hold a task per refusal.
    fn refuse_limited(
        &self,
        id: u64,
        client: TcpStream,
        peer: SocketAddr,
        origin: Origin,
        why: String,
    ) {
        let target = self.target_for(&origin);
        if target.is_some_and(|t| t.protocol == Protocol::Postgres) {
            // Whatever the client sent first (SSLRequest, StartupMessage) is read, so the
            // close is a FIN after the error, not a reset that could discard it.
            let mut sink = [0u8; 1024];
            let _ = client.try_read(&mut sink);
            let out = crate::protocol::postgres::capacity_refusal(&why);
            let _ = client.try_write(&out);
        }
        let detail = RefusedDetail {
            peer,
            origin: Some(origin.clone()),
        };
        if self.first_of_interval(RefusalKey::Uid(origin.uid), &why, detail) {
            self.record_refusal(Refusal {
                id,
                peer,
                origin: &origin,
                target,
                identity: None,
                reason: why,
                decision: Decision::Error,
                policy_ids: Vec::new(),
                db_user: None,
                db_name: None,
            });
        } else {
            tracing::debug!(%peer, uid = origin.uid, "refused over a per-uid limit");
        }
    }

    /// Accepts until `stop_accepting` is cancelled. Each connection runs as a tracked task.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        loop {
            let accepted = tokio::select! {
                () = self.stop_accepting.cancelled() => return,
                r = listener.accept() => r,
            };
            let (stream, peer) = match accepted {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let this = Arc::clone(&self);
            if self.loops.len() <= 1 {
                self.tasks
                    .spawn(async move { this.handle(stream, peer).await });
                continue;
            }
            // A socket belongs to the event loop it was registered with: it leaves this
            // one and joins the loop that runs its connection.
            let n = self.next_loop.fetch_add(1, Ordering::Relaxed) % self.loops.len();
            let stream = match stream.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "could not hand an accepted socket over");
                    continue;
                }
            };
            let Some(event_loop) = self.loops.get(n) else {
                continue;
            };
            self.tasks.spawn_on(
                async move {
                    match TcpStream::from_std(stream) {
                        Ok(stream) => this.handle(stream, peer).await,
                        Err(e) => {
                            tracing::warn!(%peer, error = %e, "could not take an accepted socket over")
                        }
                    }
                },
                event_loop,
            );
        }
    }

    async fn handle(self: Arc<Self>, client: TcpStream, peer: SocketAddr) {
        let local = match client.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "accepted socket has no local address");
                return;
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let Some(record) = self.enforcement.take_origin(peer, local) else {
            // Anyone can dial the port, as often as they like, and nothing names them (no
            // SO_PEERCRED for TCP): the refusals share one summary, so the trail grows by
            // two events an interval however fast they come. The socket closes on return,
            // after the refusal is counted.
            let reason =
                "no origin record: the connection did not come through the kernel redirect";
            let detail = RefusedDetail { peer, origin: None };
            if self.first_of_interval(RefusalKey::NoOrigin, reason, detail) {
                let mut ev = AuditEvent::new(EventKind::ConnectionRefused).reason(reason);
                ev.connection_id = Some(id);
                ev.client = Some(peer.to_string().into());
                self.audit.record(ev);
                tracing::warn!(%peer, "refused a connection without an origin record");
            }
            return;
        };
        let origin = Origin::from_record(&record);
        let span = tracing::info_span!("conn", id, uid = origin.uid, pid = origin.pid, comm = %origin.comm, dst = %origin.destination);
        // The one place the per-uid limits are enforced: before identity, policy or any
        // protocol work, so a refused connection costs the agent an accept and a lookup.
        let admission = match self.limiter.admit(origin.uid, self.clock_ms()) {
            Ok(a) => a,
            Err(limited) => {
                let _enter = span.enter();
                self.refuse_limited(id, client, peer, origin, limited.to_string());
                return;
            }
        };
        if !self
            .target_for(&origin)
            .is_some_and(|t| t.protocol == Protocol::Postgres)
        {
            // Plain TCP has no start-up of the client's to stall: what remains before the
            // connection opens is the agent's own upstream connect, bounded by its timeout.
            admission.end_startup();
        }
        if let Some(target) = self.target_for(&origin) {
            if target.protocol == Protocol::Postgres {
                // PostgreSQL answers every refusal in its own protocol, so it takes the
                // connection before the identity is known to be missing.
                let identity = self.identity.resolve(&origin);
                let incoming = Incoming {
                    id,
                    peer,
                    origin,
                    target: target.clone(),
                    admission,
                };
                crate::protocol::postgres::serve(Arc::clone(&self), incoming, client, identity)
                    .instrument(span)
                    .await;
                return;
            }
        }
        let identity = match self.identity.resolve(&origin) {
            Ok(i) => i,
            Err(reason) => {
                let _enter = span.enter();
                // Plain TCP has no way to say why; protocol handlers send their own errors.
                self.record_refusal(Refusal {
                    id,
                    peer,
                    origin: &origin,
                    target: self.target_for(&origin),
                    identity: None,
                    reason: reason.to_string(),
                    decision: Decision::Error,
                    policy_ids: Vec::new(),
                    db_user: None,
                    db_name: None,
                });
                return;
            }
        };
        self.handle_origin(id, client, peer, origin, identity, admission)
            .instrument(span)
            .await;
    }

    async fn handle_origin(
        self: Arc<Self>,
        id: u64,
        client: TcpStream,
        peer: SocketAddr,
        origin: Origin,
        identity: Identity,
        admission: Admission,
    ) {
        let refuse_with = |reason: String,
                           decision: Decision,
                           policy_ids: &[String],
                           target: Option<&ProtectedTarget>| {
            self.record_refusal(Refusal {
                id,
                peer,
                origin: &origin,
                target,
                identity: Some(&identity),
                reason,
                decision,
                policy_ids: policy_ids.to_vec(),
                db_user: None,
                db_name: None,
            });
        };
        let refuse = |reason: String, target: Option<&ProtectedTarget>| {
            refuse_with(reason, Decision::Error, &[], target)
        };
        let target = match self.target_for(&origin) {
            Some(t) => t,
            None => {
                refuse(
                    format!(
                        "destination {} matches no configured target",
                        origin.destination
                    ),
                    None,
                );
                return;
            }
        };
        if let Some(reason) = self.audit.refusal_reason() {
            refuse(reason, Some(target));
            return;
        }
        let decision = self
            .policies
            .decide(&crate::policy::connect_request(&identity, target, &origin));
        let policy_ids = crate::policy::policy_ids(&decision);
        match &decision.effect {
            portcullis_policy::Effect::Allow => {}
            portcullis_policy::Effect::Deny => {
                refuse_with(
                    format!("denied by policy: {}", decision.reason),
                    Decision::Deny,
                    &policy_ids,
                    Some(target),
                );
                return;
            }
            portcullis_policy::Effect::RequireApproval {
                approver_group,
                approvals,
            } => {
                // Approvals arrive with the approval workflow; until then waiting means no.
                refuse_with(
                    format!(
                        "requires {approvals} approval(s) from `{approver_group}`, and approvals are not available yet: {}",
                        decision.reason
                    ),
                    Decision::Approval,
                    &policy_ids,
                    Some(target),
                );
                return;
            }
        }
        let Ok(permit) = Arc::clone(&self.limit).try_acquire_owned() else {
            refuse(
                format!(
                    "connection limit of {} reached",
                    self.config.proxy.max_connections
                ),
                Some(target),
            );
            return;
        };
        let upstream_addr = target.upstream.unwrap_or(origin.destination);
        if upstream_addr.port() == self.config.proxy.port
            && self.is_own_listener(upstream_addr.ip())
        {
            refuse(UpstreamIsProxy.to_string(), Some(target));
            return;
        }
        let upstream = match self.connect_upstream(upstream_addr).await {
            Ok(s) => s,
            Err(e) => {
                refuse(
                    format!("upstream {upstream_addr} unreachable: {e}"),
                    Some(target),
                );
                return;
            }
        };
        if let Err(e) = client.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY on the client socket");
        }
        let conn = Arc::new(Connection {
            id,
            started_ms: now_ms(),
            protocol: target.protocol,
            target: target.name.as_str().into(),
            origin: origin.into(),
            identity: identity.into(),
            client: peer,
            upstream: upstream_addr,
            bytes: ByteCounters::default(),
            cancel: self.close_all.child_token(),
            close_reason: Mutex::new(None),
        });
        let mut opened = connection_event(EventKind::ConnectionOpened, &conn);
        opened.decision = Some(Decision::Allow);
        opened.policy_ids = policy_ids.into();
        // The opened event gates the connection: nothing is forwarded that is not on disk,
        // unless the operator chose availability over the trail (`keep_enforcing`).
        if let Err(e) = self.audit.record_durable(&opened).await {
            if !self.audit.keeps_enforcing_unaudited() {
                tracing::error!(error = %e, "cannot record the connection; refusing it");
                return;
            }
            tracing::error!(error = %e, "cannot record the connection; opening it unaudited (audit.on_write_failure = \"keep_enforcing\")");
        }
        admission.end_startup();
        self.registry.insert(Arc::clone(&conn));
        tracing::info!(target = %conn.target, upstream = %upstream_addr, "connection opened");
        let mut guard = OpenGuard {
            conn: Arc::clone(&conn),
            registry: Arc::clone(&self.registry),
            audit: Arc::clone(&self.audit),
            started: Instant::now(),
            reason: "agent shutdown".into(),
            db_user: None,
            db_name: None,
        };
        let idle = Duration::from_secs(self.config.proxy.idle_timeout_secs);
        let end = match target.protocol {
            Protocol::Tcp => {
                crate::protocol::tcp::forward(
                    client,
                    upstream,
                    &conn.bytes,
                    idle,
                    conn.cancel.clone(),
                )
                .await
            }
            // Dispatched in `handle` before this point.
            Protocol::Postgres => crate::protocol::tcp::End::Shutdown,
        };
        let closed_by = conn
            .close_reason
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        guard.reason = match (&end, closed_by) {
            (crate::protocol::tcp::End::Shutdown, Some(why)) => why,
            _ => end.to_string(),
        };
        drop(guard);
        drop(permit);
        drop(admission);
    }

    /// The configured target the kernel matched, if the destination still fits it.
    fn target_for(&self, origin: &Origin) -> Option<&ProtectedTarget> {
        self.targets.iter().find(|t| {
            t.id == origin.target_id
                && t.port == origin.destination.port()
                && self.enforcement.protects(t, origin.destination.ip())
        })
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

    /// Why the audit trail forbids new connections now (the central backlog over its
    /// bound, or the store failing to write), as a refusal reason.
    pub fn over_audit_bound(&self) -> Option<String> {
        self.audit.refusal_reason()
    }

    pub fn postgres(&self) -> Option<&crate::protocol::postgres::Shared> {
        self.postgres.as_deref()
    }

    pub fn policies(&self) -> &crate::policy::Policies {
        &self.policies
    }

    /// Admits a connection a protocol handler has authorized: takes a slot under the
    /// connection limit and records `connection.opened` durably before any byte is forwarded.
    pub async fn open(&self, o: Opening<'_>) -> Result<OpenSession, OpenError> {
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
        });
        let mut opened = connection_event(EventKind::ConnectionOpened, &conn);
        opened.decision = Some(Decision::Allow);
        opened.policy_ids = o.policy_ids.into();
        opened.db_user = o.db_user.as_deref().map(Into::into);
        opened.db_name = o.db_name.as_deref().map(Into::into);
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

    pub fn config(&self) -> &Config {
        &self.config
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

    pub fn targets(&self) -> &[ProtectedTarget] {
        &self.targets
    }

    pub fn enforcement(&self) -> &Enforcement {
        &self.enforcement
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }
}
