//! The connections that are open now: what `portcullis status` lists, and what ends when
//! a uid's session does (the registry listens for identity's announcement).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::approvals::GrantEndListener;
use crate::audit::Encoded;
use crate::config::Protocol;
use crate::identity::{Identity, SessionEndListener};
use portcullis_core::{ByteCounters, Origin};

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
    /// The grant that let this connection through, when its policy asks for approval; the
    /// connection ends with the grant.
    pub grant: Option<Arc<str>>,
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
    /// The grant the connection runs under, if its policy asks for approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
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
            grant: self.grant.as_deref().map(str::to_owned),
        }
    }
}

/// Open connections, for status and for closing a user's connections later.
#[derive(Default)]
pub struct Registry {
    open: Mutex<BTreeMap<u64, Arc<Connection>>>,
}

impl Registry {
    pub(super) fn insert(&self, c: Arc<Connection>) {
        self.lock().insert(c.id, c);
    }

    pub(super) fn remove(&self, id: u64) {
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

    /// Closes the one open connection `id` (an admin ended it); what it was, if it was open.
    pub fn close_one(&self, id: u64, reason: &str) -> Option<ConnectionView> {
        let open = self.lock();
        let c = open.get(&id)?;
        *c.close_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_string());
        c.cancel.cancel();
        Some(c.view())
    }

    /// Closes every open connection a grant let through; returns how many.
    pub fn close_grant(&self, grant_id: &str, reason: &str) -> usize {
        let open = self.lock();
        let mut n = 0;
        for c in open
            .values()
            .filter(|c| c.grant.as_deref() == Some(grant_id))
        {
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

impl GrantEndListener for Registry {
    fn grant_ended(&self, grant_id: &str, reason: &str) -> usize {
        self.close_grant(grant_id, reason)
    }
}

impl SessionEndListener for Registry {
    fn session_ended(&self, uid: u32, reason: &str) -> usize {
        self.close_uid(uid, reason)
    }
}
