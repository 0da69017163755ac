//! CancelRequest: each client gets its own BackendKeyData from the agent, never the server's.
//! A cancel arrives on a new (redirected) connection; it is forwarded upstream only when the
//! key is known and the cancelling process runs as the same uid as the session's client.
//! Anything else is dropped silently, as PostgreSQL itself answers nothing to a cancel.
//!
//! Protocol: PostgreSQL docs, "Message Flow" → "Canceling Requests in Progress".

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use bytes::Bytes;

/// Where a client's cancel goes.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub uid: u32,
    pub target_id: u32,
    pub upstream: SocketAddr,
    pub process_id: u32,
    pub secret_key: Bytes,
}

#[derive(Default)]
pub struct CancelMap {
    by_key: Mutex<HashMap<(u32, [u8; 4]), CancelTarget>>,
}

impl CancelMap {
    /// Registers a session and returns the key the client gets; the guard unregisters it.
    /// Fails only when the system has no randomness: a guessable key is never handed out.
    pub fn register(
        &self,
        target: CancelTarget,
    ) -> Result<CancelKey<'_>, ring::error::Unspecified> {
        let rng = ring::rand::SystemRandom::new();
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let mut raw = [0u8; 8];
            ring::rand::SecureRandom::fill(&rng, &mut raw)?;
            let [a, b, c, d, e, f, g, h] = raw;
            // Process ids are positive int32 on the wire.
            let pid = u32::from_le_bytes([a, b, c, d & 0x7f]);
            let key = (pid, [e, f, g, h]);
            if pid != 0 && !map.contains_key(&key) {
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
        }
    }

    #[test]
    fn a_cancel_reaches_its_session_only_from_the_same_uid_and_key() {
        let map = CancelMap::default();
        let key = map.register(target(1000)).unwrap();
        let (pid, secret) = (key.process_id(), key.secret_key());
        assert_eq!(map.lookup(1000, pid, &secret).unwrap().process_id, 42);
        assert!(map.lookup(1001, pid, &secret).is_none(), "another uid");
        let mut wrong = secret;
        wrong[0] ^= 1;
        assert!(map.lookup(1000, pid, &wrong).is_none(), "wrong secret");
        assert!(map.lookup(1000, pid, &[1, 2, 3]).is_none(), "short secret");
        drop(key);
        assert!(map.lookup(1000, pid, &secret).is_none(), "session ended");
        assert_eq!(map.len(), 0);
    }
}
