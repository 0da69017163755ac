//! Audit events: one event type for every protocol and every decision.
//!
//! Until the tamper-evident store lands, events are JSON lines appended to
//! `<state_dir>/events.jsonl`, each written with one `write(2)` under a lock and flushed,
//! so a reader never sees half a line and a crash loses at most the event being written.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::identity::Identity;
use crate::proxy::Origin;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub enum EventKind {
    #[serde(rename = "agent.started")]
    AgentStarted,
    #[serde(rename = "agent.stopped")]
    AgentStopped,
    #[serde(rename = "agent.detached")]
    AgentDetached,
    #[serde(rename = "connection.opened")]
    ConnectionOpened,
    #[serde(rename = "connection.closed")]
    ConnectionClosed,
    #[serde(rename = "connection.refused")]
    ConnectionRefused,
    #[serde(rename = "login.succeeded")]
    LoginSucceeded,
    #[serde(rename = "login.failed")]
    LoginFailed,
    #[serde(rename = "login.refresh_failed")]
    LoginRefreshFailed,
    #[serde(rename = "login.expired")]
    LoginExpired,
    #[serde(rename = "logout")]
    Logout,
    #[serde(rename = "login.revoked")]
    LoginRevoked,
    #[serde(rename = "policy.reloaded")]
    PolicyReloaded,
    #[serde(rename = "policy.reload_failed")]
    PolicyReloadFailed,
}

/// One audit event. Flat, so SIEMs index it well; optional parts are omitted when empty.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEvent {
    pub schema: u32,
    /// Unix time in milliseconds.
    pub time_ms: u64,
    pub host: String,
    pub event: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connection_id: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub identity: Option<Identity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<Origin>,
    /// The client's own address (its side of the redirected connection).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_client_to_upstream: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_upstream_to_client: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The policy decision behind this event: allow, deny or approval.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub policy_ids: Vec<String>,
}

impl AuditEvent {
    pub fn new(event: EventKind) -> Self {
        Self {
            schema: SCHEMA_VERSION,
            time_ms: now_ms(),
            host: hostname(),
            event,
            connection_id: None,
            protocol: None,
            target: None,
            identity: None,
            origin: None,
            client: None,
            upstream: None,
            bytes_client_to_upstream: None,
            bytes_upstream_to_client: None,
            duration_ms: None,
            reason: None,
            decision: None,
            policy_ids: Vec::new(),
        }
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn hostname() -> String {
    static HOST: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HOST.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    })
    .clone()
}

#[derive(Debug, thiserror::Error)]
#[error("audit log {path}: {source}")]
pub struct AuditError {
    path: PathBuf,
    source: std::io::Error,
}

/// Append-only JSON-lines sink.
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<Self, AuditError> {
        let err = |source| AuditError {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(err)?;
        Ok(Self {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    /// Records one event. A failure is logged, never silently dropped.
    pub fn record(&self, event: &AuditEvent) {
        let mut line = match serde_json::to_vec(event) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot serialize an audit event");
                return;
            }
        };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = file.write_all(&line) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write an audit event");
        }
    }
}
