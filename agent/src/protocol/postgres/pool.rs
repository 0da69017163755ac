//! The upstream pool: server sessions the agent already authenticated, kept after their
//! client left and lent to the next client whose start-up would have asked the server for
//! exactly the same session (same target, database, role and start-up settings: the key is
//! the start-up packet the agent would send). Off unless the target sets `pool`.
//!
//! A server session goes back to its pool only when the client left it cleanly (Terminate
//! or end of stream), with nothing owed by either side and outside any transaction; it is
//! then reset with `DISCARD ALL` and kept only if the server answers exactly
//! CommandComplete `DISCARD ALL` and ReadyForQuery `I`, reporting no setting different
//! from what it reported at start-up. Anything else (a transaction, a COPY, an error, a
//! reply the agent did not expect, a setting that stayed changed, a slow answer) closes it.
//! What `DISCARD ALL` does not undo is listed in docs/postgres.md "Upstream pool".
//!
//! Identity, policy, masking, recording and cancel stay per client session: the pool only
//! lends the socket. A client's cancel key is its own (`cancel`), unregistered before the
//! server session is reset, and a cancel already on its way when the client left is
//! waited for (`CancelTarget::in_flight`) so it can never reach the next client's query.
//!
//! A full pool (all `size` lent) makes a client wait up to `wait_secs`, then refuses it
//! with 53300: the bound is what the server was promised, so the agent never dials past it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use bytes::BytesMut;
use portcullis_pgwire::{
    decode_frame, encode_frontend, parse_backend, BackendMessage, FrontendMessage,
    TransactionStatus,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use super::stream::{fill, write_out};
use super::upstream::Upstream;
use crate::config::PoolConfig;

/// How long the server may take to answer `DISCARD ALL`, or a cancel on its way to finish,
/// before the server session is closed instead of kept.
const RESET_TIMEOUT: Duration = Duration::from_secs(5);

/// A server session's identity as its start-up made it: what the agent sent the server.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub target_id: u32,
    /// The server's address: a target that protects a network reaches the address each
    /// client asked for.
    pub upstream: std::net::SocketAddr,
    /// The start-up packet's parameters, in the order sent (user, database, settings).
    pub startup: Vec<(String, String)>,
}

/// Every pool of the agent, one per key, made on first use.
#[derive(Default)]
pub struct Pools {
    inner: Mutex<PoolsInner>,
}

#[derive(Default)]
struct PoolsInner {
    by_key: HashMap<PoolKey, Arc<Pool>>,
    /// After shutdown began nothing more is kept.
    closed: bool,
}

/// One key's pool.
pub struct Pool {
    /// What the pool's sessions were started with; its role and database bound how many
    /// sessions stay idle across start-up variants.
    key: PoolKey,
    config: PoolConfig,
    /// One permit per server session, lent or idle: `size` of them.
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Idle>>,
    /// A server session came back: a waiting client may take it.
    returned: Notify,
}

struct Idle {
    conn: Upstream,
    since: Instant,
    slot: OwnedSemaphorePermit,
}

/// A server session lent to one client, or the right to dial one (`conn` still `None`).
pub struct Lent {
    pool: Arc<Pool>,
    slot: OwnedSemaphorePermit,
    /// The session came from the pool (it served an earlier client).
    pub reused: Option<Upstream>,
}

/// A slot taken for a server session the client's start-up dials itself.
pub struct Slot {
    pool: Arc<Pool>,
    slot: OwnedSemaphorePermit,
}

/// Why a client gets no server session from the pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("the upstream pool for this database and role has all its {size} server sessions in use; waited {waited} s (raise [target.postgres] pool.size, or the server's max_connections with it)")]
    Full { size: u32, waited: u64 },
}

/// How a client session ended, as the relay saw it: what decides whether its server
/// session may be reset and kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionEnd {
    /// The client sent Terminate or closed its side; not an error, a timeout, an
    /// administrator's close or a failed write.
    pub client_left: bool,
    /// The last ReadyForQuery's status.
    pub transaction: TransactionStatus,
    /// No reply owed by the server (no query, COPY or extended-protocol batch under way).
    pub awaits_nothing: bool,
    /// No byte from the server left unread, none for it left unsent (but a Terminate).
    pub drained: bool,
}

/// Whether a server session may be reset and kept, and if not why (for the log).
pub fn may_keep(end: &SessionEnd) -> Result<(), &'static str> {
    if !end.client_left {
        return Err("the session did not end with the client leaving");
    }
    if !end.awaits_nothing {
        return Err("the server still owed replies (a query, COPY or batch under way)");
    }
    match end.transaction {
        TransactionStatus::Idle => {}
        TransactionStatus::InBlock => return Err("inside a transaction block"),
        TransactionStatus::Failed => return Err("inside a failed transaction block"),
    }
    if !end.drained {
        return Err("bytes were left unread or unsent");
    }
    Ok(())
}

/// What one server message means while `DISCARD ALL` is answered.
#[derive(Debug, PartialEq, Eq)]
pub enum ResetStep {
    /// Expected so far; read on.
    More,
    /// ReadyForQuery `I` after CommandComplete `DISCARD ALL`: the session is clean.
    Clean,
    /// Close the session instead, for this reason.
    Close(String),
}

/// The answer to `DISCARD ALL`, read one message at a time.
#[derive(Debug, Default)]
pub struct Reset {
    completed: bool,
}

impl Reset {
    /// `started`: what the server reported at start-up, which a new client is told again;
    /// the reset must leave every reported setting as it was then.
    pub fn on_message(&mut self, msg: &BackendMessage, started: &[(String, String)]) -> ResetStep {
        match msg {
            BackendMessage::CommandComplete { tag } if !self.completed && tag == "DISCARD ALL" => {
                self.completed = true;
                ResetStep::More
            }
            BackendMessage::ReadyForQuery { status } if self.completed => match status {
                TransactionStatus::Idle => ResetStep::Clean,
                other => ResetStep::Close(format!("status {other:?} after DISCARD ALL")),
            },
            BackendMessage::ParameterStatus { name, value } => {
                let was = started.iter().rev().find(|(n, _)| n == name);
                match was {
                    Some((_, v)) if v == value => ResetStep::More,
                    Some((_, v)) => ResetStep::Close(format!(
                        "after DISCARD ALL the server reports {name} = {value}, not {v} as at start-up"
                    )),
                    None => ResetStep::Close(format!(
                        "after DISCARD ALL the server reports {name}, which it did not report at start-up"
                    )),
                }
            }
            // A notification sent before UNLISTEN took effect belongs to the client that
            // left; nobody else may read it.
            BackendMessage::NoticeResponse(_) | BackendMessage::NotificationResponse { .. } => {
                ResetStep::More
            }
            BackendMessage::ErrorResponse(fields) => ResetStep::Close(format!(
                "DISCARD ALL failed: {}",
                fields.message().unwrap_or("no message")
            )),
            other => ResetStep::Close(format!("unexpected {} after DISCARD ALL", other.name())),
        }
    }
}

impl Pools {
    /// The pool for `key`, made on first use with `config`.
    fn pool(&self, key: &PoolKey, config: &PoolConfig) -> Arc<Pool> {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(inner.by_key.entry(key.clone()).or_insert_with(|| {
            Arc::new(Pool {
                key: key.clone(),
                config: config.clone(),
                slots: Arc::new(Semaphore::new(
                    usize::try_from(config.size).unwrap_or(usize::MAX),
                )),
                idle: Mutex::new(Vec::new()),
                returned: Notify::new(),
            })
        }))
    }

    /// An idle server session of `key`'s pool, or a slot to dial one; waits up to
    /// `wait_secs` when all `size` are lent.
    pub async fn borrow(&self, key: &PoolKey, config: &PoolConfig) -> Result<Lent, PoolError> {
        let pool = self.pool(key, config);
        let wait = Duration::from_secs(config.wait_secs);
        let taken = tokio::time::timeout(wait, async {
            loop {
                // Registered before looking, so a return between the look and the wait
                // still wakes this client.
                let returned = pool.returned.notified();
                tokio::pin!(returned);
                returned.as_mut().enable();
                if let Some(idle) = pool.take_idle() {
                    return Lent {
                        pool: Arc::clone(&pool),
                        slot: idle.slot,
                        reused: Some(idle.conn),
                    };
                }
                tokio::select! {
                    slot = Arc::clone(&pool.slots).acquire_owned() => {
                        if let Ok(slot) = slot {
                            return Lent { pool: Arc::clone(&pool), slot, reused: None };
                        }
                    }
                    () = &mut returned => {}
                }
            }
        })
        .await;
        taken.map_err(|_| PoolError::Full {
            size: config.size,
            waited: config.wait_secs,
        })
    }

    /// Resets a server session its client left and keeps it, or closes it. `cancel_done`
    /// resolves once no cancel of the departed client can still reach the server.
    pub async fn give_back(
        &self,
        slot: Slot,
        mut conn: Upstream,
        end: SessionEnd,
        cancel_done: impl std::future::Future<Output = bool>,
    ) {
        let closed = self.inner.lock().unwrap_or_else(|p| p.into_inner()).closed;
        let kept = if closed {
            Err("the agent is shutting down".to_string())
        } else {
            match may_keep(&end) {
                Err(why) => Err(why.to_string()),
                Ok(()) if !cancel_done.await => {
                    Err("a cancel of the departed client did not finish in time".into())
                }
                Ok(()) => reset(&mut conn).await,
            }
        };
        match kept {
            Ok(()) => match self.keep_within_target(slot, conn) {
                None => tracing::debug!("server session reset and kept in the pool"),
                Some(conn) => {
                    tracing::info!(
                        pid = conn.process_id,
                        "server session closed: its target already keeps pool.size idle sessions"
                    );
                    terminate(conn).await;
                }
            },
            Err(why) => {
                tracing::info!(pid = conn.process_id, reason = %why, "server session closed, not kept in the pool");
                terminate(conn).await;
            }
        }
    }

    /// Keeps `conn` idle in its pool unless its target already keeps `size` idle server
    /// sessions for the same server, role and database across all start-up variants: a
    /// client that varies a setting (`application_name`, say) would otherwise leave `size`
    /// idle backends per variant on the server. Counted and kept under one lock, so two
    /// returns cannot both pass the bound. The session back when it is not kept.
    fn keep_within_target(&self, slot: Slot, conn: Upstream) -> Option<Upstream> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let idle: usize = inner
            .by_key
            .iter()
            .filter(|(k, _)| same_role(k, &slot.pool.key))
            .map(|(_, p)| p.idle.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum();
        if idle >= usize::try_from(slot.pool.config.size).unwrap_or(usize::MAX) {
            return Some(conn);
        }
        slot.pool.keep(conn, slot.slot);
        None
    }

    /// Closes the idle server sessions idle longer than their pool's `idle_timeout_secs`
    /// (all of them with `all`), each with a Terminate; forgets pools left empty.
    pub async fn sweep(&self, now: Instant, all: bool) {
        let mut expired = Vec::new();
        {
            let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            if all {
                inner.closed = true;
            }
            inner.by_key.retain(|_, pool| {
                let timeout = Duration::from_secs(pool.config.idle_timeout_secs);
                let mut idle = pool.idle.lock().unwrap_or_else(|p| p.into_inner());
                let (old, fresh): (Vec<Idle>, Vec<Idle>) = std::mem::take(&mut *idle)
                    .into_iter()
                    .partition(|i| all || now.saturating_duration_since(i.since) >= timeout);
                *idle = fresh;
                expired.extend(old);
                // A pool with nothing idle and nothing lent is made again when needed.
                let size = usize::try_from(pool.config.size).unwrap_or(usize::MAX);
                !(idle.is_empty() && pool.slots.available_permits() == size)
            });
        }
        for idle in expired {
            tracing::debug!(
                pid = idle.conn.process_id,
                "idle pooled server session closed"
            );
            terminate(idle.conn).await;
        }
    }

    /// Idle server sessions of a target.
    #[cfg(test)]
    pub fn idle_count(&self, target_id: u32) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner
            .by_key
            .values()
            .filter(|p| p.key.target_id == target_id)
            .map(|p| p.idle.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }
}

impl Lent {
    /// The slot, once the session is lent to the client (its own or a reused one).
    pub fn into_slot(self) -> (Slot, Option<Upstream>) {
        (
            Slot {
                pool: self.pool,
                slot: self.slot,
            },
            self.reused,
        )
    }
}

impl Pool {
    /// The most recently used idle session (warm caches), skipping any the server closed
    /// or wrote to meanwhile.
    fn take_idle(&self) -> Option<Idle> {
        loop {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop()?;
            if is_quiet(&mut idle.conn) {
                return Some(idle);
            }
            tracing::info!(
                pid = idle.conn.process_id,
                "an idle pooled server session was closed or spoke unasked; dropped"
            );
        }
    }

    fn keep(&self, conn: Upstream, slot: OwnedSemaphorePermit) {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Idle {
                conn,
                since: Instant::now(),
                slot,
            });
        self.returned.notify_one();
    }
}

/// Two start-ups for the same server, role and database (other settings may differ).
fn same_role(a: &PoolKey, b: &PoolKey) -> bool {
    let named = |k: &PoolKey, name: &str| {
        k.startup
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    a.target_id == b.target_id
        && a.upstream == b.upstream
        && named(a, "user") == named(b, "user")
        && named(a, "database") == named(b, "database")
}

/// An idle server session has nothing to say: anything readable (end of stream, a FATAL
/// from an administrator's `pg_terminate_backend`, a notice) means it is not usable as is.
fn is_quiet(conn: &mut Upstream) -> bool {
    if !conn.buf.is_empty() {
        return false;
    }
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let mut read = std::pin::pin!(fill(&mut conn.stream, &mut conn.buf));
    read.as_mut().poll(&mut cx).is_pending()
}

use std::future::Future;

/// Sends `DISCARD ALL` and reads its answer (bounded in time); `Ok` when the server session
/// is back to what its start-up made it.
async fn reset(conn: &mut Upstream) -> Result<(), String> {
    let mut out = BytesMut::new();
    encode_frontend(
        &FrontendMessage::Query {
            sql: "DISCARD ALL".into(),
        },
        &mut out,
    );
    let answer = async {
        write_out(&mut conn.stream, &out)
            .await
            .map_err(|e| format!("server write failed: {e}"))?;
        let mut state = Reset::default();
        loop {
            let msg = loop {
                match decode_frame(&mut conn.buf, usize::MAX) {
                    Ok(Some(m)) => break m,
                    Ok(None) => match fill(&mut conn.stream, &mut conn.buf).await {
                        Ok(0) => return Err("the server closed the connection".to_string()),
                        Ok(_) => {}
                        Err(e) => return Err(format!("server read failed: {e}")),
                    },
                    Err(e) => return Err(format!("malformed reply: {e}")),
                }
            };
            let parsed = parse_backend(&msg).map_err(|e| format!("malformed reply: {e}"))?;
            match state.on_message(&parsed, &conn.parameters) {
                ResetStep::More => {}
                ResetStep::Clean if conn.buf.is_empty() => return Ok(()),
                ResetStep::Clean => return Err("bytes after ReadyForQuery".into()),
                ResetStep::Close(why) => return Err(why),
            }
        }
    };
    tokio::time::timeout(RESET_TIMEOUT, answer)
        .await
        .unwrap_or_else(|_| Err("no answer to DISCARD ALL in time".into()))
}

/// Ends a server session the way a client does: Terminate, then close.
async fn terminate(mut conn: Upstream) {
    let mut out = BytesMut::new();
    encode_frontend(&FrontendMessage::Terminate, &mut out);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = write_out(&mut conn.stream, &out).await;
        let _ = conn.stream.shutdown().await;
    })
    .await;
}

/// Waits until the clones of a departed session's `in_flight` token (held by cancels being
/// forwarded) are gone; `false` after [`RESET_TIMEOUT`].
pub async fn cancels_finished(in_flight: Arc<()>) -> bool {
    let deadline = Instant::now() + RESET_TIMEOUT;
    while Arc::strong_count(&in_flight) > 1 {
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    true
}

/// What a Terminate looks like on the wire: the one message a departing client's session
/// may leave unsent when its server session is kept.
pub fn is_terminate(bytes: &[u8]) -> bool {
    bytes == [b'X', 0, 0, 0, 4]
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "tests"
)]
mod tests;
