//! The listeners that receive redirected connections, the origin lookup that says who
//! made each one and where it was going, and the dispatch to a protocol handler.
//!
//! A connection without a published origin is refused: it did not come through the
//! kernel redirect (someone dialled the listener directly), so nothing about it can be
//! trusted. The proxy never makes a decision from anything the client says about itself.
//! It enforces the per-uid limits, then hands the connection to its protocol, which takes
//! it through [`crate::admission`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::admission::{Gate, Incoming, Refusal, Registry};
use crate::audit::{now_ms, AuditEvent, AuditLog, Decision, EventKind};
use crate::config::{Config, ProtectedTarget, Protocol};
use crate::ebpf::Enforcement;
use crate::limits::{Limiter, Note, RefusalKey, RefusalSummaries};
pub use portcullis_core::Origin;

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
    /// Admission, shared with every protocol.
    gate: Arc<Gate>,
    postgres: Option<Arc<crate::protocol::postgres::Shared>>,
    ssh: Option<Arc<crate::protocol::ssh::Shared>>,
    next_id: AtomicU64,
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
        gate: Arc<Gate>,
        close_all: CancellationToken,
        postgres: Option<Arc<crate::protocol::postgres::Shared>>,
        ssh: Option<Arc<crate::protocol::ssh::Shared>>,
        loops: Vec<tokio::runtime::Handle>,
        limiter: Arc<Limiter>,
    ) -> Arc<Self> {
        let summaries =
            RefusalSummaries::new(config.limits.summary_interval_secs.saturating_mul(1000));
        Arc::new(Self {
            config,
            targets,
            enforcement,
            gate,
            postgres,
            ssh,
            // Connection ids stay unique across restarts (they name sessions in the audit
            // trail): the start time in seconds, shifted past any plausible per-run count.
            next_id: AtomicU64::new((now_ms() / 1000) << 24),
            stop_accepting: CancellationToken::new(),
            close_all,
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
        self.gate.audit().record(ev);
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
            self.gate.record_refusal(Refusal {
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
                self.gate.audit().record(ev);
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
        let Some(target) = self.target_for(&origin).cloned() else {
            let _enter = span.enter();
            let reason = format!(
                "destination {} matches no configured target",
                origin.destination
            );
            self.gate.record_refusal(Refusal {
                id,
                peer,
                origin: &origin,
                target: None,
                identity: None,
                reason,
                decision: Decision::Error,
                policy_ids: Vec::new(),
                db_user: None,
                db_name: None,
            });
            return;
        };
        let incoming = Incoming {
            id,
            peer,
            origin,
            target,
            admission,
        };
        match incoming.target.protocol {
            Protocol::Postgres => {
                // PostgreSQL answers every refusal in its own protocol, so it takes the
                // connection before the identity is known to be missing.
                let Some(shared) = self.postgres.as_deref() else {
                    tracing::error!("a PostgreSQL target without PostgreSQL state; refusing");
                    return;
                };
                let identity = self.gate.resolve(&incoming.origin);
                crate::protocol::postgres::serve(&self.gate, shared, incoming, client, identity)
                    .instrument(span)
                    .await;
            }
            Protocol::Ssh => {
                // SSH says why it refuses in its own protocol (a banner, a failed login), so
                // it takes the connection before the identity is known to be missing.
                let Some(shared) = self.ssh.clone() else {
                    tracing::error!("an SSH target without SSH state; refusing");
                    return;
                };
                crate::protocol::ssh::serve(Arc::clone(&self.gate), shared, incoming, client)
                    .instrument(span)
                    .await;
            }
            Protocol::Tcp => {
                // Plain TCP has no start-up of the client's to stall: what remains before the
                // connection opens is the agent's own upstream connect, bounded by its timeout.
                incoming.admission.end_startup();
                crate::protocol::tcp::serve(&self.gate, incoming, client)
                    .instrument(span)
                    .await;
            }
        }
    }

    /// The configured target the kernel matched, if the destination still fits it.
    fn target_for(&self, origin: &Origin) -> Option<&ProtectedTarget> {
        self.targets.iter().find(|t| {
            t.id == origin.target_id
                && t.port == origin.destination.port()
                && self.enforcement.protects(t, origin.destination.ip())
        })
    }

    pub fn registry(&self) -> &Registry {
        self.gate.registry()
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn targets(&self) -> &[ProtectedTarget] {
        &self.targets
    }

    pub fn enforcement(&self) -> &Enforcement {
        &self.enforcement
    }

    pub fn audit(&self) -> &AuditLog {
        self.gate.audit()
    }
}
