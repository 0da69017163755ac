//! CancelRequest: the client's BackendKeyData carries the server's real process id (the one
//! `pg_backend_pid()`, NOTIFY and `pg_stat_activity` show, which clients compare with their
//! own) and a secret key of the agent's own, never the server's. A cancel arrives on a new
//! (redirected) connection; it is forwarded upstream, with the server's own key, only when
//! the process id and the agent's secret name a live session and the cancelling process
//! runs as the same uid as the session's client. Anything else is dropped silently, as
//! PostgreSQL itself answers nothing to a cancel.
//!
//! Two servers (two targets) can hand out the same process id, so the map is keyed by the
//! pair (process id, agent secret); a secret that would make a pair already in use is drawn
//! again.
//!
//! Protocol: PostgreSQL docs, "Message Flow" → "Canceling Requests in Progress".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Where a client's cancel goes.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub uid: u32,
    pub target_id: u32,
    pub upstream: SocketAddr,
    pub process_id: u32,
    pub secret_key: Bytes,
    /// Woken by a cancel of this session: a statement waiting for approval (not yet sent,
    /// so the server has nothing to cancel) stops waiting.
    pub interrupt: Arc<tokio::sync::Notify>,
    /// Cloned, under the map's lock, by every lookup that forwards a cancel and held until
    /// the server has taken it: a pooled server session is not lent again while a cancel
    /// of its departed client can still land on it (`pool::cancels_finished`).
    #[allow(dead_code, reason = "held for its reference count, never read")]
    pub in_flight: Arc<()>,
}

#[derive(Default)]
pub struct CancelMap {
    by_key: Mutex<HashMap<(u32, [u8; 4]), CancelTarget>>,
}

impl CancelMap {
    /// Registers a session under the server's process id and a fresh secret and returns the
    /// key the client gets; the guard unregisters it. Fails only when the system has no
    /// randomness: a guessable secret is never handed out.
    pub fn register(
        &self,
        target: CancelTarget,
    ) -> Result<CancelKey<'_>, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let mut secret = [0u8; 4];
            ring::rand::SecureRandom::fill(&rng, &mut secret)?;
            let key = (target.process_id, secret);
            // The server's own secret is never the client's, even by chance: a client that
            // learnt it elsewhere must not be able to use it here.
            if !map.contains_key(&key) && target.secret_key.as_ref() != secret {
                map.insert(key, target);
                return Ok(CancelKey { map: self, key });
            }
        }
    }

    /// The session a cancel from `uid` may cancel, if any.
    pub fn lookup(&self, uid: u32, process_id: u32, secret_key: &[u8]) -> Option<CancelTarget> {
        let secret: [u8; 4] = secret_key.try_into().ok()?;
        let map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        map.get(&(process_id, secret))
            .filter(|t| t.uid == uid)
            .cloned()
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.by_key.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

/// The client's key; unregistered on drop.
pub struct CancelKey<'a> {
    map: &'a CancelMap,
    key: (u32, [u8; 4]),
}

impl CancelKey<'_> {
    pub fn process_id(&self) -> u32 {
        self.key.0
    }
    pub fn secret_key(&self) -> [u8; 4] {
        self.key.1
    }
}

impl Drop for CancelKey<'_> {
    fn drop(&mut self) {
        self.map
            .by_key
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    fn target(uid: u32) -> CancelTarget {
        CancelTarget {
            uid,
            target_id: 0,
            upstream: "127.0.0.1:5432".parse().unwrap(),
            process_id: 42,
            secret_key: Bytes::from_static(&[1, 2, 3, 4]),
            interrupt: Arc::default(),
            in_flight: Arc::default(),
        }
    }

    #[test]
    fn the_client_gets_the_servers_pid_and_a_secret_of_the_agents_own() {
        let map = CancelMap::default();
        let key = map.register(target(1000)).unwrap();
        assert_eq!(key.process_id(), 42);
        assert_ne!(key.secret_key(), [1, 2, 3, 4]);
        assert!(
            map.lookup(1000, 42, &[1, 2, 3, 4]).is_none(),
            "the server's own secret cancels nothing"
        );
        let found = map.lookup(1000, 42, &key.secret_key()).unwrap();
        assert_eq!(
            found.secret_key.as_ref(),
            &[1, 2, 3, 4],
            "forwarded with the server's key"
        );
    }

    #[test]
    fn one_pid_from_two_servers_keeps_two_sessions_apart() {
        let map = CancelMap::default();
        let mut other = target(1000);
        other.target_id = 1;
        other.upstream = "127.0.0.2:5432".parse().unwrap();
        other.secret_key = Bytes::from_static(&[9, 9, 9, 9]);
        // Many sessions under one pid: every pair is distinct, each finds its own session.
        let keys: Vec<_> = (0..200)
            .map(|i| {
                let t = if i % 2 == 0 {
                    target(1000)
                } else {
                    other.clone()
                };
                map.register(t).unwrap()
            })
            .collect();
        assert_eq!(map.len(), 200);
        for (i, key) in keys.iter().enumerate() {
            assert_eq!(key.process_id(), 42);
            let found = map.lookup(1000, 42, &key.secret_key()).unwrap();
            assert_eq!(found.target_id, u32::from(i % 2 == 1), "session {i}");
        }
        drop(keys);
        assert_eq!(map.len(), 0);
    }

    #[test]
    fn a_cancel_reaches_its_session_only_from_the_same_uid_and_key() {
        let map = CancelMap::default();
        let key = map.register(target(1000)).unwrap();
        let (pid, secret) = (key.process_id(), key.secret_key());
        assert_eq!(map.lookup(1000, pid, &secret).unwrap().process_id, 42);
        assert!(map.lookup(1000, pid + 1, &secret).is_none(), "another pid");
        assert!(map.lookup(1001, pid, &secret).is_none(), "another uid");
        let mut wrong = secret;
        wrong[0] ^= 1;
        assert!(map.lookup(1000, pid, &wrong).is_none(), "wrong secret");
        assert!(map.lookup(1000, pid, &[1, 2, 3]).is_none(), "short secret");
        drop(key);
        assert!(map.lookup(1000, pid, &secret).is_none(), "session ended");
        assert_eq!(map.len(), 0);
    }

    #[test]
    fn a_cancel_on_its_way_is_counted_until_it_is_done() {
        let map = CancelMap::default();
        let t = target(1000);
        let in_flight = Arc::clone(&t.in_flight);
        let key = map.register(t).unwrap();
        let forwarding = map
            .lookup(1000, key.process_id(), &key.secret_key())
            .unwrap();
        drop(key);
        assert_eq!(
            Arc::strong_count(&in_flight),
            2,
            "the session's and the forward's"
        );
        drop(forwarding);
        assert_eq!(Arc::strong_count(&in_flight), 1);
    }
}
