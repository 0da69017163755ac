//! The agent's side of the policy engine: reading the policy directory, building the one
//! request shape every protocol uses, deciding, and reloading (SIGHUP and file changes).
//! A policy set that fails to load never replaces the one in force.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use portcullis_policy::{
    Action, Context, Decision, Effect, LivePolicySet, Obligation, PolicySet, Principal,
    PrincipalKind, Request, Target,
};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditEvent, AuditLog, EventKind};
use crate::config::ProtectedTarget;
use portcullis_core::Origin;
use portcullis_core::{Identity, IdentityKind};

/// Why a policy directory did not load; the set in force (if any) stays.
#[derive(Debug, thiserror::Error)]
pub enum PolicyLoadError {
    #[error("cannot read policy directory {}: {source}", dir.display())]
    ReadDir {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("reading {}: {source}", dir.display())]
    ReadEntry {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The files parse or validate with these problems, one a line, each naming its file.
    #[error("{}", problems.join("\n"))]
    Invalid { problems: Vec<String> },
    /// The set at start-up did not load: the agent does not start.
    #[error("the policy set in {} is invalid:\n{cause}", dir.display())]
    AtStart {
        dir: PathBuf,
        cause: Box<PolicyLoadError>,
    },
}

impl From<portcullis_policy::LoadError> for PolicyLoadError {
    fn from(e: portcullis_policy::LoadError) -> Self {
        PolicyLoadError::Invalid {
            problems: e.problems().iter().map(|p| p.to_string()).collect(),
        }
    }
}

/// Reads every file of the policy directory the engine wants (`*.cedar`, `*.toml`).
/// A missing directory is an empty policy set: everything is denied.
pub fn read_dir(dir: &Path) -> Result<Vec<(PathBuf, String)>, PolicyLoadError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(PolicyLoadError::ReadDir {
                dir: dir.to_path_buf(),
                source,
            })
        }
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|source| PolicyLoadError::ReadEntry {
                dir: dir.to_path_buf(),
                source,
            })?
            .path();
        if path.is_file() && portcullis_policy::is_policy_set_file(&path) {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(source) => return Err(PolicyLoadError::ReadFile { path, source }),
            };
            files.push((path, text));
        }
    }
    files.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(files)
}

/// Loads a directory offline (`portcullis policy check`, start-up).
pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyLoadError> {
    let files = read_dir(dir)?;
    Ok(PolicySet::load(files)?)
}

/// Names, sizes and modification times: changes when a file is edited, added or removed.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<SystemTime>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .filter_map(|e| {
                    let m = e.metadata().ok()?;
                    Some((e.path(), m.len(), m.modified().ok()))
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PolicyStatus {
    pub dir: PathBuf,
    pub policies: usize,
    pub generation: u64,
    pub loaded_at_ms: u64,
    /// Why the last reload was refused; the set in force is the previous one.
    pub last_error: Option<String>,
}

pub struct Policies {
    dir: PathBuf,
    live: LivePolicySet,
    status: Mutex<PolicyStatus>,
    seen: Mutex<Vec<(PathBuf, u64, Option<SystemTime>)>>,
    audit: Arc<AuditLog>,
}

impl Policies {
    pub fn load(dir: &Path, audit: Arc<AuditLog>) -> Result<Arc<Self>, PolicyLoadError> {
        let seen = fingerprint(dir);
        let set = load_dir(dir).map_err(|e| PolicyLoadError::AtStart {
            dir: dir.to_path_buf(),
            cause: Box::new(e),
        })?;
        if set.is_empty() {
            tracing::warn!(dir = %dir.display(), "no policies: every protected connection is denied");
        }
        for w in set.warnings() {
            tracing::warn!(warning = %w, "policy");
        }
        let status = PolicyStatus {
            dir: dir.to_path_buf(),
            policies: set.len(),
            generation: 1,
            loaded_at_ms: portcullis_core::now_ms(),
            last_error: None,
        };
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            live: LivePolicySet::new(set),
            status: Mutex::new(status),
            seen: Mutex::new(seen),
            audit,
        }))
    }

    /// The set in force now; one statement's decision and its masking profile come from
    /// the same set even if a reload lands in between.
    pub fn current(&self) -> Arc<portcullis_policy::PolicySet> {
        self.live.current()
    }

    pub fn decide(&self, request: &Request) -> Decision {
        self.live.decide(request)
    }

    pub fn status(&self) -> PolicyStatus {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Reloads the directory; on any error the set in force stays and the error is kept
    /// for `portcullis status`.
    pub fn reload(&self, why: &str) -> Result<usize, PolicyLoadError> {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = fingerprint(&self.dir);
        let result = read_dir(&self.dir).and_then(|files| {
            self.live
                .reload(files)
                .map(|set| set.len())
                .map_err(PolicyLoadError::from)
        });
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match &result {
            Ok(n) => {
                status.policies = *n;
                status.generation += 1;
                status.loaded_at_ms = portcullis_core::now_ms();
                status.last_error = None;
                tracing::info!(policies = n, generation = status.generation, %why, "policy set reloaded");
                self.audit
                    .record(AuditEvent::new(EventKind::PolicyReloaded).reason(format!(
                        "{why}: {n} policies, generation {}",
                        status.generation
                    )));
            }
            Err(e) => {
                status.last_error = Some(e.to_string());
                tracing::error!(error = %e, %why, "policy reload refused; the previous set stays in force");
                self.audit.record(
                    AuditEvent::new(EventKind::PolicyReloadFailed).reason(format!(
                        "{why}: {e}; generation {} stays in force",
                        status.generation
                    )),
                );
            }
        }
        result
    }

    /// Reloads on SIGHUP and when the directory's files change.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "no SIGHUP handler; policy files are still watched");
                None
            }
        };
        loop {
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = hangup => {
                    let _ = self.reload("SIGHUP");
                }
                () = tokio::time::sleep(Duration::from_secs(1)) => {
                    let changed = *self.seen.lock().unwrap_or_else(|p| p.into_inner()) != fingerprint(&self.dir);
                    if changed {
                        let _ = self.reload("policy files changed");
                    }
                }
            }
        }
    }
}

/// What a request the policy allowed carries on: the policies that allowed it and what they
/// oblige (a masking profile).
#[derive(Debug, Clone)]
pub struct Allowed {
    pub policy_ids: Vec<String>,
    pub obligations: Vec<Obligation>,
}

/// A request the policy refused, as every protocol reports it (its wire error, its
/// `connection.refused` or `statement.denied` event): the audit decision, the reason, and
/// the policies that decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRefusal {
    /// `Deny`, or `Approval` while the policy asks for an approval not (yet) given.
    pub decision: portcullis_core::Decision,
    pub reason: String,
    pub policy_ids: Vec<String>,
    /// Who must approve, when the policy asks for approval.
    pub approval: Option<portcullis_policy::ApprovalRequirement>,
    /// The approval request made (or already pending) for it, when one was.
    pub request_id: Option<String>,
}

/// What a decision means for its request: the one place a refusal is worded, approvals
/// included, for connections and statements of every protocol alike.
pub fn outcome(decision: Decision) -> Result<Allowed, PolicyRefusal> {
    let policy_ids = policy_ids(&decision);
    match decision.effect {
        Effect::Allow => Ok(Allowed {
            policy_ids,
            obligations: decision.obligations,
        }),
        Effect::Deny => Err(PolicyRefusal {
            decision: portcullis_core::Decision::Deny,
            reason: decision.reason,
            policy_ids,
            approval: None,
            request_id: None,
        }),
        Effect::RequireApproval(requirement) => Err(PolicyRefusal {
            decision: portcullis_core::Decision::Approval,
            reason: format!("requires {requirement}: {}", decision.reason),
            policy_ids,
            approval: Some(requirement),
            request_id: None,
        }),
    }
}

/// A refusal for approval, once a request was made for it: what the client is told, naming
/// the request and how to follow it.
pub fn approval_requested(refusal: PolicyRefusal, request_id: &str) -> PolicyRefusal {
    let who = refusal
        .approval
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    PolicyRefusal {
        reason: format!(
            "approval required: request {request_id} asks for {who}; follow it with `portcullis approvals show {request_id}`, an approver runs `portcullis approvals approve {request_id}`; connect again once it is approved ({})",
            refusal.reason
        ),
        request_id: Some(request_id.to_owned()),
        ..refusal
    }
}

/// A refusal for approval when no request could be made (the store refused it).
pub fn approval_unavailable(refusal: PolicyRefusal, why: &str) -> PolicyRefusal {
    PolicyRefusal {
        reason: format!(
            "approval required, and no request could be made: {why} ({})",
            refusal.reason
        ),
        ..refusal
    }
}

/// The ids of the policies that decided, as events and wire errors name them.
pub fn policy_ids(decision: &Decision) -> Vec<String> {
    decision
        .matched
        .iter()
        .map(|p| p.as_str().to_string())
        .collect()
}

/// The principal a policy sees for an identity. A Unix-only identity (lab mode) is the
/// user `unix:<uid>`.
pub fn principal(identity: &Identity) -> Principal {
    match identity.kind {
        IdentityKind::Service => Principal {
            kind: PrincipalKind::Service,
            id: identity
                .name
                .clone()
                .or_else(|| identity.subject.clone())
                .unwrap_or_default(),
            email: None,
            name: identity.name.clone(),
            groups: identity.groups.clone(),
        },
        IdentityKind::User | IdentityKind::Workload => Principal {
            kind: PrincipalKind::User,
            id: identity.subject.clone().unwrap_or_default(),
            email: identity.email.clone(),
            name: identity.name.clone(),
            groups: identity.groups.clone(),
        },
        IdentityKind::Unix => Principal {
            kind: PrincipalKind::User,
            id: format!("unix:{}", identity.uid),
            email: None,
            name: identity.user.clone(),
            groups: Vec::new(),
        },
    }
}

pub fn target(t: &ProtectedTarget) -> Target {
    Target {
        name: t.name.clone(),
        protocol: t.protocol.to_string(),
        labels: t.labels.clone(),
    }
}

/// Context fields every action has: the time (UTC) and the client process.
pub fn base_context(comm: &str, uid: u32, unix_time: i64) -> Context {
    let days = unix_time.div_euclid(86_400);
    let secs = unix_time.rem_euclid(86_400);
    // 1970-01-01 was a Thursday (ISO weekday 4).
    let weekday = u8::try_from((days + 3).rem_euclid(7) + 1).unwrap_or(1);
    Context {
        unix_time,
        hour: u8::try_from(secs / 3600).unwrap_or(0),
        weekday,
        source_comm: comm.to_string(),
        source_uid: uid,
        statement_class: None,
        command: None,
        tables: Vec::new(),
        functions: Vec::new(),
        dynamic_sql: false,
        command_line: None,
        simple_command: false,
        guarded_line: false,
        command_name: None,
        command_args: Vec::new(),
        ssh_user: None,
        forward: None,
        file: None,
        db_user: None,
        db_name: None,
    }
}

pub fn connect_request(identity: &Identity, t: &ProtectedTarget, origin: &Origin) -> Request {
    let now = i64::try_from(portcullis_core::now_ms() / 1000).unwrap_or(0);
    Request {
        principal: principal(identity),
        action: Action::Connect,
        target: target(t),
        context: base_context(&origin.comm, origin.uid, now),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn utc_hour_and_iso_weekday() {
        // 2026-11-23 10:30:00 UTC is a Monday.
        let c = base_context("psql", 1000, 1_795_429_800);
        assert_eq!((c.hour, c.weekday), (10, 1));
        // 1970-01-01 00:00 was a Thursday.
        assert_eq!(base_context("x", 0, 0).weekday, 4);
        // 1970-01-04 was a Sunday (7).
        assert_eq!(base_context("x", 0, 3 * 86_400).weekday, 7);
    }

    #[test]
    fn a_missing_policy_directory_is_an_empty_set() {
        let set = load_dir(Path::new("/nonexistent/portcullis/policies")).unwrap();
        assert!(set.is_empty());
    }

    #[test]
    fn a_broken_directory_reports_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("bad.cedar"),
            "@id(\"x\")\npermit(principal, action, resource)\nwhen { nope };\n",
        )
        .unwrap();
        let err = load_dir(dir.path()).unwrap_err();
        assert!(
            matches!(&err, PolicyLoadError::Invalid { problems } if problems.len() == 1),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains("bad.cedar"), "{text}");
        assert!(text.contains("line 3"), "{text}");
        // Start-up says which directory, then the same problems, as before.
        let at_start = PolicyLoadError::AtStart {
            dir: dir.path().to_path_buf(),
            cause: Box::new(err),
        };
        assert_eq!(
            at_start.to_string(),
            format!(
                "the policy set in {} is invalid:\n{text}",
                dir.path().display()
            )
        );
    }
}

/// What `portcullis policy explain` and the console's explain form ask about.
#[derive(Debug, Default, Clone)]
pub struct ExplainInput {
    pub principal: Option<portcullis_policy::Principal>,
    /// A Cedar action name (`connect`, `query`, `ssh_exec`, …); ignored with `sql`.
    pub action: String,
    pub comm: String,
    pub uid: u32,
    /// Unix time of the request.
    pub time: i64,
    pub statement_class: Option<String>,
    pub command: Option<String>,
    pub tables: Vec<String>,
    pub db_user: Option<String>,
    pub db_name: Option<String>,
    pub command_line: Option<String>,
    /// A SQL string, classified as the proxy does, one explanation per statement (and per
    /// statement inside a DO block, decided first as the proxy decides them).
    pub sql: Option<String>,
}

/// The decision for `input` on `target` under `set`, the policies that matched and why, as
/// text: one code path for the CLI and the console.
pub fn explain(
    set: &portcullis_policy::PolicySet,
    target: &ProtectedTarget,
    input: ExplainInput,
) -> Result<String, String> {
    use std::fmt::Write as _;
    let action = if input.sql.is_some() {
        portcullis_policy::Action::Query
    } else {
        portcullis_policy::Action::ALL
            .into_iter()
            .find(|a| a.cedar_name() == input.action)
            .ok_or_else(|| format!("unknown action `{}`", input.action))?
    };
    let principal = input
        .principal
        .ok_or_else(|| "name the principal (a user's subject or a service)".to_string())?;
    let mut context = base_context(&input.comm, input.uid, input.time);
    context.statement_class = input.statement_class;
    context.command = input.command;
    context.tables = input.tables;
    context.db_user = input.db_user;
    context.db_name = input.db_name;
    context.command_line = input.command_line;
    let mut request = portcullis_policy::Request {
        principal,
        action,
        target: self::target(target),
        context,
    };
    let Some(sql) = input.sql else {
        return Ok(set.explain(&request).to_string());
    };
    let statements = portcullis_sql::classify(&sql)
        .map_err(|e| format!("the SQL does not parse, so the proxy refuses it: {e}"))?;
    let mut out = String::new();
    for (i, statement) in statements.iter().enumerate() {
        if statements.len() > 1 {
            let _ = writeln!(out, "-- statement {}: {}", i + 1, statement.text);
        }
        // A DO block's statements are decided first, each on its own, as the proxy does.
        for inner in statement.inner.iter() {
            let _ = writeln!(out, "-- inside the DO block: {}", inner.text);
            request.context.statement_class = Some(inner.class.as_str().to_string());
            request.context.command = Some(inner.command.to_string());
            request.context.tables = inner.tables.to_vec();
            request.context.functions = inner.functions.to_vec();
            request.context.dynamic_sql = false;
            let _ = write!(out, "{}", set.explain(&request));
        }
        if !statement.inner.is_empty() {
            let _ = writeln!(out, "-- the DO block itself: {}", statement.text);
        }
        request.context.statement_class = Some(statement.class.as_str().to_string());
        request.context.command = Some(statement.command.to_string());
        request.context.tables = statement.tables.to_vec();
        request.context.functions = statement.functions.to_vec();
        request.context.dynamic_sql = statement.dynamic_sql;
        let _ = write!(out, "{}", set.explain(&request));
    }
    Ok(out)
}
