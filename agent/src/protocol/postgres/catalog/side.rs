//! The catalog's side connections: the agent's own PostgreSQL connections, logged in as a
//! session's role, kept for the next lookup of the same target address, database and role
//! instead of one login per lookup.
//!
//! Bounded: at most [`IDLE_PER_KEY`] idle connections per key and [`IDLE_TOTAL`] in all (a
//! lookup that finds none idle opens its own, as before, and gives it back if there is room);
//! closed after [`IDLE_FOR`] unused. A connection that saw any error is dropped, never given
//! back, so a lookup never runs on a connection in an unknown state. The key holds the role, so
//! a connection only ever answers lookups of sessions that log in as that same role: a lookup
//! still learns nothing its session could not read.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio_util::task::AbortOnDropHandle;

/// Two covers a session's lookups one after another and a second session's beside them.
pub(super) const IDLE_PER_KEY: usize = 2;
/// Past this, a connection given back is closed instead of kept.
pub(super) const IDLE_TOTAL: usize = 64;
/// Unused this long, a connection is closed: the server's slot goes back to its clients.
pub(super) const IDLE_FOR: Duration = Duration::from_secs(30);

/// Whose lookups a connection may answer: the same server address, database and role.
#[derive(Clone, PartialEq, Eq, Hash)]
pub(super) struct SideKey {
    pub target_id: u32,
    pub addr: SocketAddr,
    pub db: String,
    pub role: String,
}

/// One logged-in connection and its driver, which it owns: dropping it aborts the driver.
pub(super) struct SideConnection {
    pub client: tokio_postgres::Client,
    driver: AbortOnDropHandle<Result<(), tokio_postgres::Error>>,
    idle_since: Instant,
}

impl SideConnection {
    /// Logs in over `socket` and starts the driver.
    pub async fn open<T>(
        config: &tokio_postgres::Config,
        socket: tokio::net::TcpStream,
        tls: T,
    ) -> Result<Self, String>
    where
        T: tokio_postgres::tls::TlsConnect<tokio::net::TcpStream>,
        T::Stream: Send + 'static,
    {
        let (client, connection) = config
            .connect_raw(socket, tls)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            client,
            driver: AbortOnDropHandle::new(tokio::spawn(connection)),
            idle_since: Instant::now(),
        })
    }

    /// Whether the server (or the network) has ended it.
    fn is_dead(&self) -> bool {
        self.client.is_closed() || self.driver.is_finished()
    }

    /// Says goodbye to the server (dropping the client makes the driver send Terminate) and
    /// waits a moment for the driver to finish, logging how it ended.
    pub async fn close(self) {
        let Self { client, driver, .. } = self;
        drop(client);
        match tokio::time::timeout(Duration::from_secs(1), driver).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => {
                tracing::debug!(error = %e, "a catalog side connection ended with an error");
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "a catalog side connection's driver failed"),
            // Dropped here, the handle aborts the driver.
            Err(_) => tracing::debug!("a catalog side connection did not close in time"),
        }
    }
}

#[derive(Default)]
struct Idle {
    by_key: HashMap<SideKey, Vec<SideConnection>>,
    count: usize,
    /// Closes what has been idle too long; runs while anything is idle.
    reaper: Option<AbortOnDropHandle<()>>,
    reaping: bool,
}

/// The idle side connections of every session of the agent.
#[derive(Default)]
pub(super) struct SideConnections {
    idle: Arc<Mutex<Idle>>,
}

impl SideConnections {
    /// An idle connection for `key`, most recently used first; dead or stale ones met on the
    /// way are dropped.
    pub fn take(&self, key: &SideKey) -> Option<SideConnection> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let Idle { by_key, count, .. } = &mut *idle;
        let list = by_key.get_mut(key)?;
        let mut found = None;
        while let Some(conn) = list.pop() {
            *count = count.saturating_sub(1);
            if !conn.is_dead() && conn.idle_since.elapsed() < IDLE_FOR {
                found = Some(conn);
                break;
            }
        }
        if list.is_empty() {
            by_key.remove(key);
        }
        found
    }

    /// Keeps `conn` for the next lookup of `key` if there is room; otherwise closes it. Only
    /// a connection whose last lookup succeeded is given back.
    pub async fn give_back(&self, key: SideKey, mut conn: SideConnection) {
        if conn.is_dead() {
            return;
        }
        let refused = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let room =
                idle.count < IDLE_TOTAL && idle.by_key.get(&key).map_or(0, Vec::len) < IDLE_PER_KEY;
            if room {
                conn.idle_since = Instant::now();
                idle.by_key.entry(key).or_default().push(conn);
                idle.count += 1;
                if !idle.reaping {
                    idle.reaping = true;
                    let weak = Arc::downgrade(&self.idle);
                    idle.reaper = Some(AbortOnDropHandle::new(tokio::spawn(reap(weak))));
                }
                None
            } else {
                Some(conn)
            }
        };
        if let Some(conn) = refused {
            conn.close().await;
        }
    }
}

/// Closes idle connections once they pass [`IDLE_FOR`]; ends when none is left (the next
/// one given back starts another) or when the pool is gone.
async fn reap(idle: Weak<Mutex<Idle>>) {
    loop {
        let (stale, next) = {
            let Some(idle) = idle.upgrade() else {
                return;
            };
            let mut idle = idle.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            let mut stale = Vec::new();
            let mut next: Option<Instant> = None;
            let Idle { by_key, count, .. } = &mut *idle;
            by_key.retain(|_, list| {
                let (old, fresh): (Vec<_>, Vec<_>) = std::mem::take(list)
                    .into_iter()
                    .partition(|c| c.is_dead() || now.duration_since(c.idle_since) >= IDLE_FOR);
                *count = count.saturating_sub(old.len());
                stale.extend(old);
                for c in &fresh {
                    let due = c.idle_since.checked_add(IDLE_FOR).unwrap_or(now);
                    next = Some(next.map_or(due, |n| n.min(due)));
                }
                *list = fresh;
                !list.is_empty()
            });
            if next.is_none() {
                // Under the lock: whoever gives a connection back next starts a new reaper.
                idle.reaping = false;
            }
            (stale, next)
        };
        for conn in stale {
            conn.close().await;
        }
        match next {
            Some(at) => tokio::time::sleep_until(at.into()).await,
            None => return,
        }
    }
}
