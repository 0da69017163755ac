//! Just-in-time approvals on one host: requests (a time-boxed grant of a target's actions, or
//! one exact statement), the decisions of approvers, and the grants they make, kept in
//! `<state_dir>/approvals/approvals.json` (directory 0700, file 0600, replaced atomically and
//! fsynced at every change) so a request survives an agent restart.
//!
//! Whose approval counts is decided in [`duties`] alone. Every step is an audit event of the
//! one schema (`approval.*`, `grant.*`). A grant that ends (expiry, revocation) is announced
//! to a [`GrantEndListener`] (the connection registry, a layer above), which closes the
//! connections it let through; this module knows nothing of connections.

pub mod duties;
pub mod fleet;
pub mod notify;

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_core::{now_ms, ApprovalFields, Identity, IdentityKind};
use portcullis_policy::{ApprovalRequirement, Quorum};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditEvent, AuditLog, EventKind};

/// A grant lasts at most this long; longer access is asked for again.
pub const MAX_GRANT: Duration = Duration::from_secs(24 * 60 * 60);
/// Open requests one requester may have at once: a client retrying a refused connect
/// reuses its pending request, and nobody can fill the disk with requests.
const MAX_PENDING_PER_REQUESTER: usize = 16;
/// Requests and grants kept in all; decided ones older than [`KEEP_DECIDED`] are dropped
/// from the file (the audit trail keeps them).
const MAX_RECORDS: usize = 10_000;
const KEEP_DECIDED: Duration = Duration::from_secs(7 * 24 * 60 * 60);
/// Longest reason kept; a reason is shown to approvers and written to the trail.
const MAX_REASON: usize = 1_000;
/// Longest statement text an approval request keeps.
const MAX_STATEMENT: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("approvals store {}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a directory owned by uid {owner} (the agent); it holds every approval, so remove it and let the agent create it", path.display())]
    Ownership { path: PathBuf, owner: u32 },
    #[error("no approval request `{0}` that you may see")]
    UnknownRequest(String),
    #[error("no grant `{0}` that you may see")]
    UnknownGrant(String),
    #[error("request {id} is already {state}")]
    AlreadyDecided { id: String, state: &'static str },
    #[error("you already decided request {0}; each person counts once")]
    AlreadyVoted(String),
    #[error(transparent)]
    Ineligible(#[from] duties::Ineligible),
    #[error("grant {0} has already ended")]
    GrantEnded(String),
    #[error("you have {0} pending requests; wait for them to be decided or expire")]
    TooManyPending(usize),
    #[error("the approvals store is full ({MAX_RECORDS} records)")]
    Full,
    #[error("a reason is required")]
    NoReason,
    #[error("a reason is at most {MAX_REASON} bytes")]
    ReasonTooLong,
    #[error("a grant lasts from 1 second to {} hours", MAX_GRANT.as_secs() / 3600)]
    BadDuration,
    #[error("break-glass approves; it never denies (deny without --break-glass)")]
    BreakGlassDenial,
    /// The fleet's central log could not take a decision: nothing is approved by default.
    #[error("{0}")]
    Fleet(String),
}

/// What is asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Asked {
    /// Use of a target's actions for a while ("alice may connect to billing-db for 2 hours").
    Grant {
        target: String,
        actions: Vec<String>,
        duration_secs: u64,
    },
    /// One exact statement, with its parameters, in one connection: approving it approves
    /// that text and those parameters only.
    Statement {
        connection_id: u64,
        target: String,
        statement: String,
        parameters: Vec<Option<String>>,
    },
    /// One exact SSH command line as one login on one connection (`command` None: an
    /// interactive shell): approving it starts that once, on that connection only.
    Command {
        connection_id: u64,
        target: String,
        ssh_user: String,
        command: Option<String>,
    },
}

impl Asked {
    fn kind(&self) -> &'static str {
        match self {
            Asked::Grant { .. } => "grant",
            Asked::Statement { .. } => "statement",
            Asked::Command { .. } => "command",
        }
    }

    pub fn target(&self) -> &str {
        match self {
            Asked::Grant { target, .. }
            | Asked::Statement { target, .. }
            | Asked::Command { target, .. } => target,
        }
    }

    /// One line for lists and messages.
    pub fn describe(&self) -> String {
        match self {
            Asked::Grant {
                target,
                actions,
                duration_secs,
            } => format!(
                "{} on {target} for {}",
                actions.join(", "),
                human_duration(*duration_secs)
            ),
            Asked::Statement {
                target, statement, ..
            } => format!("on {target}: {statement}"),
            Asked::Command {
                target,
                ssh_user,
                command,
                ..
            } => match command {
                Some(command) => format!("on {target} as {ssh_user}: {command}"),
                None => format!("on {target} as {ssh_user}: an interactive shell"),
            },
        }
    }
}

/// `2h`, `90m`, `45s`: how a duration reads in a list.
pub fn human_duration(secs: u64) -> String {
    if secs.is_multiple_of(3600) {
        format!("{}h", secs / 3600)
    } else if secs.is_multiple_of(60) {
        format!("{}m", secs / 60)
    } else {
        format!("{secs}s")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestState {
    Pending,
    Approved,
    Denied,
    Expired,
    /// The waiting client canceled its statement or went away.
    Withdrawn,
}

impl RequestState {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestState::Pending => "pending",
            RequestState::Approved => "approved",
            RequestState::Denied => "denied",
            RequestState::Expired => "expired",
            RequestState::Withdrawn => "withdrawn",
        }
    }
}

/// One group's share, as stored (the policy crate's [`Quorum`] is not serialized).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumRecord {
    pub group: String,
    pub approvals: u32,
}

/// One approver's decision, with their identity as their token was when they decided.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub by: Identity,
    pub approve: bool,
    pub reason: String,
    pub at_ms: u64,
    /// A break-glass approval: the emergency group it was given as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub break_glass: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApprovalRequest {
    pub id: String,
    pub requester: Identity,
    pub asked: Asked,
    pub reason: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    /// Every quorum must be met (an AND of groups).
    pub required: Vec<QuorumRecord>,
    /// The policies that asked for approval.
    pub policy_ids: Vec<String>,
    pub verdicts: Vec<Verdict>,
    pub state: RequestState,
    /// The grant an approved grant request made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    /// When it was approved, denied or expired.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_ms: Option<u64>,
    /// The bastion it was made on, when a fleet shares the central store: that agent alone
    /// records its expiry (and its grant's), so the fleet's trail has each event once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl ApprovalRequest {
    pub fn requirement(&self) -> ApprovalRequirement {
        ApprovalRequirement {
            quorums: self
                .required
                .iter()
                .map(|q| Quorum {
                    group: q.group.clone(),
                    approvals: q.approvals,
                })
                .collect(),
        }
    }

    fn tally(&self) -> duties::Tally {
        let votes: Vec<duties::Vote<'_>> = self
            .verdicts
            .iter()
            .filter(|v| v.approve)
            .map(|v| duties::Vote {
                by: &v.by,
                break_glass: v.break_glass.as_deref(),
            })
            .collect();
        duties::tally(&self.requirement(), &self.requester, &votes)
    }

    /// Whether the glass was broken for it.
    pub fn break_glass(&self) -> bool {
        self.verdicts.iter().any(|v| v.break_glass.is_some())
    }

    /// The subjects whose approvals count.
    pub fn counted(&self) -> Vec<String> {
        self.tally().counted
    }

    fn involves(&self, viewer: &Viewer) -> bool {
        viewer.uid == 0
            || viewer.subject().is_some_and(|s| {
                duties::person(&self.requester) == Some(s)
                    || self.required.iter().any(|q| viewer.in_group(&q.group))
            })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Revocation {
    pub by: String,
    pub reason: String,
    pub at_ms: u64,
}

/// A time-boxed permission an approved request made: `requester` may do `actions` on
/// `target` until `expires_ms`, unless revoked.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grant {
    pub id: String,
    pub request_id: String,
    pub requester: Identity,
    pub target: String,
    pub actions: Vec<String>,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub approvers: Vec<String>,
    pub required: Vec<QuorumRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Revocation>,
    /// Set once `grant.expired` was recorded.
    #[serde(default)]
    pub ended: bool,
    /// Made by breaking the glass: `portcullis status` lists it while it is active.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub break_glass: bool,
    /// The bastion its request was made on (see [`ApprovalRequest::host`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl Grant {
    pub fn is_active(&self, now_ms: u64) -> bool {
        self.revoked.is_none() && !self.ended && now_ms < self.expires_ms
    }

    fn involves(&self, viewer: &Viewer) -> bool {
        viewer.uid == 0
            || viewer.subject().is_some_and(|s| {
                duties::person(&self.requester) == Some(s)
                    || self.required.iter().any(|q| viewer.in_group(&q.group))
            })
    }
}

/// Who looks: the uid the kernel reported, and the identity of its login now (if any).
pub struct Viewer {
    pub uid: u32,
    pub identity: Option<Identity>,
}

impl Viewer {
    fn subject(&self) -> Option<&str> {
        self.identity.as_ref().and_then(duties::person)
    }

    fn in_group(&self, group: &str) -> bool {
        self.identity
            .as_ref()
            .is_some_and(|i| i.groups.iter().any(|g| g == group))
    }
}

/// What a request is made of before it has an id.
pub struct Ask {
    pub requester: Identity,
    pub asked: Asked,
    pub reason: String,
    pub requirement: ApprovalRequirement,
    pub policy_ids: Vec<String>,
    /// approvals.toml `timeout_seconds`.
    pub timeout: Duration,
}

/// Hears that a grant ended (expired, revoked) and closes what it let through; answers how
/// many connections that closed.
pub trait GrantEndListener: Send + Sync {
    fn grant_ended(&self, grant_id: &str, reason: &str) -> usize;
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Book {
    requests: BTreeMap<String, ApprovalRequest>,
    grants: BTreeMap<String, Grant>,
}

/// What the agent's config adds to the policy's approvals (`[approvals]`).
#[derive(Default)]
pub struct StoreOptions {
    /// `approvals.break_glass_group`; `None` (or empty): no break-glass.
    pub break_glass_group: Option<String>,
    /// The webhooks every approval event is told to; `None`: none.
    pub notifier: Option<Arc<notify::Notifier>>,
    /// The fleet's central log, when `[audit.central]` is configured: requests, verdicts and
    /// grants live there instead of in the local file.
    pub fleet: Option<Arc<fleet::Fleet>>,
}

pub struct ApprovalStore {
    dir: PathBuf,
    book: Mutex<Book>,
    audit: Arc<AuditLog>,
    grant_ends: Arc<dyn GrantEndListener>,
    break_glass_group: Option<String>,
    notifier: Arc<notify::Notifier>,
    /// Bumped at every change; a statement waiting for its request watches it.
    changes: tokio::sync::watch::Sender<u64>,
    fleet: Option<Arc<fleet::Fleet>>,
}

const FILE: &str = "approvals.json";

impl ApprovalStore {
    /// Opens (creating) `<state_dir>/approvals`. A file that cannot be read is moved aside,
    /// never trusted: no grant comes from it, and the move is in the log and the trail.
    pub fn open(
        dir: &Path,
        audit: Arc<AuditLog>,
        grant_ends: Arc<dyn GrantEndListener>,
        options: StoreOptions,
    ) -> Result<Arc<Self>, ApprovalError> {
        let io = |source| ApprovalError::Io {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io)?;
        let meta = std::fs::symlink_metadata(dir).map_err(io)?;
        let agent = nix::unistd::geteuid().as_raw();
        if !meta.is_dir() || meta.uid() != agent {
            return Err(ApprovalError::Ownership {
                path: dir.to_path_buf(),
                owner: agent,
            });
        }
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        let path = dir.join(FILE);
        let book = if options.fleet.is_some() {
            // The fleet's log is the store; the book is rebuilt from it (fleet.rs).
            Err(std::io::ErrorKind::NotFound.into())
        } else {
            std::fs::read(&path)
        };
        let book = match book {
            Ok(bytes) => match serde_json::from_slice::<Book>(&bytes) {
                Ok(b) => b,
                Err(e) => {
                    let aside = dir.join(format!("{FILE}.unreadable-{}", now_ms()));
                    std::fs::rename(&path, &aside).map_err(io)?;
                    let note = format!(
                        "{} could not be read ({e}); moved to {}; no request or grant of it is in force",
                        path.display(),
                        aside.display()
                    );
                    tracing::error!(%note, "approvals store");
                    audit.record(AuditEvent::new(EventKind::AuditIntegrity).reason(note));
                    Book::default()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Book::default(),
            Err(e) => return Err(io(e)),
        };
        let (changes, _) = tokio::sync::watch::channel(0);
        Ok(Arc::new(Self {
            dir: dir.to_path_buf(),
            book: Mutex::new(book),
            audit,
            grant_ends,
            break_glass_group: options.break_glass_group.filter(|g| !g.is_empty()),
            notifier: options.notifier.unwrap_or_else(notify::Notifier::none),
            changes,
            fleet: options.fleet,
        }))
    }

    /// Records an approval or grant event and queues its notification (which never waits:
    /// see [`notify`]). `request_expires_ms` is when a pending request expires.
    fn record(&self, ev: AuditEvent, request_expires_ms: Option<u64>) {
        self.notifier.notify(&ev, request_expires_ms);
        self.audit.record(ev);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes the whole book (small: bounded by [`MAX_RECORDS`]) to a new file, fsyncs it
    /// and renames it over the old one, then fsyncs the directory.
    fn save(&self, book: &Book) -> Result<(), ApprovalError> {
        if self.fleet.is_some() {
            // The fleet's log holds what counts; the book is its image in memory.
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
            return Ok(());
        }
        let io = |source| ApprovalError::Io {
            path: self.dir.join(FILE),
            source,
        };
        let data = serde_json::to_vec(book).map_err(|e| io(std::io::Error::other(e)))?;
        let tmp = self.dir.join(format!(".{FILE}.tmp"));
        match std::fs::remove_file(&tmp) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(e)),
            _ => {}
        }
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&data).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, self.dir.join(FILE)).map_err(io)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io)?;
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        Ok(())
    }

    /// Makes a request, or, for a requester who already waits for the very same thing,
    /// answers that pending request (a client retrying a refused connect makes one request).
    pub fn ask(&self, ask: Ask) -> Result<ApprovalRequest, ApprovalError> {
        check_reason(&ask.reason, false)?;
        if let Asked::Grant { duration_secs, .. } = &ask.asked {
            if *duration_secs == 0 || *duration_secs > MAX_GRANT.as_secs() {
                return Err(ApprovalError::BadDuration);
            }
        }
        let mut asked = ask.asked;
        if let Asked::Statement { statement, .. } = &mut asked {
            truncate(statement, MAX_STATEMENT);
        }
        let now = now_ms();
        let mut book = self.lock();
        let mine: Vec<&ApprovalRequest> = book
            .requests
            .values()
            .filter(|r| {
                r.state == RequestState::Pending
                    && now < r.expires_ms
                    && r.requester.subject == ask.requester.subject
                    && r.requester.kind == ask.requester.kind
            })
            .collect();
        if let Some(same) = mine.iter().find(|r| r.asked == asked) {
            return Ok((*same).clone());
        }
        if mine.len() >= MAX_PENDING_PER_REQUESTER {
            return Err(ApprovalError::TooManyPending(mine.len()));
        }
        prune(&mut book, now);
        if book.requests.len() + book.grants.len() >= MAX_RECORDS {
            return Err(ApprovalError::Full);
        }
        let id = loop {
            let id = new_id("r-");
            if !book.requests.contains_key(&id) {
                break id;
            }
        };
        let timeout = u64::try_from(ask.timeout.as_millis()).unwrap_or(u64::MAX);
        let request = ApprovalRequest {
            id: id.clone(),
            requester: ask.requester,
            asked,
            reason: ask.reason,
            created_ms: now,
            expires_ms: now.saturating_add(timeout),
            required: ask
                .requirement
                .quorums
                .iter()
                .map(|q| QuorumRecord {
                    group: q.group.clone(),
                    approvals: q.approvals,
                })
                .collect(),
            policy_ids: ask.policy_ids,
            verdicts: Vec::new(),
            state: RequestState::Pending,
            grant_id: None,
            decided_ms: None,
            host: self.fleet.as_ref().map(|f| f.host().to_owned()),
        };
        book.requests.insert(id.clone(), request.clone());
        if let Err(e) = self.save(&book) {
            book.requests.remove(&id);
            return Err(e);
        }
        drop(book);
        if let Some(fleet) = &self.fleet {
            fleet.enqueue(Change::Ask {
                request: Box::new(request.clone()),
            });
        }
        tracing::info!(request = %request.id, asked = %request.asked.describe(), "approval requested");
        self.record(
            self.request_event(
                EventKind::ApprovalRequested,
                &request,
                &request.requester,
                request.reason.clone(),
            ),
            Some(request.expires_ms),
        );
        Ok(request)
    }

    /// An approver's decision. Refused (and so never stored) when they may not decide it
    /// ([`duties::eligible`]) or already did; a denial ends the request, approvals that meet
    /// the requirement approve it (and make its grant). With `break_glass`, the requester
    /// approves their own request as a member of the emergency group: a reason is
    /// required, and the requirement is filled whole (`approval.break_glass`).
    pub async fn decide(
        &self,
        id: &str,
        approver: &Identity,
        approve: bool,
        reason: String,
        break_glass: bool,
    ) -> Result<ApprovalRequest, ApprovalError> {
        if break_glass && !approve {
            return Err(ApprovalError::BreakGlassDenial);
        }
        if break_glass && reason.trim().is_empty() {
            return Err(duties::Ineligible::BreakGlassWithoutReason.into());
        }
        check_reason(&reason, !approve)?;
        let now = now_ms();
        let how = if break_glass {
            duties::Approving::BreakGlass {
                group: self.break_glass_group.as_deref(),
                reason: &reason,
            }
        } else {
            duties::Approving::Ordinary {
                break_glass_group: self.break_glass_group.as_deref(),
            }
        };
        let verdict = Verdict {
            by: approver.clone(),
            approve,
            reason: reason.clone(),
            at_ms: now,
            break_glass: if break_glass {
                self.break_glass_group.clone()
            } else {
                None
            },
        };
        let (request, grant) = match &self.fleet {
            None => {
                let mut book = self.lock();
                self.expire_requests(&mut book, now);
                decidable(&book, id, approver, how, now)?;
                let before = book.requests.get(id).cloned();
                let (request, grant) =
                    apply_verdict(&mut book, id, verdict, self.break_glass_group.as_deref())
                        .map_err(|u| u.into_error(id))?;
                if let Err(e) = self.save(&book) {
                    if let Some(before) = before {
                        book.requests.insert(id.to_owned(), before);
                    }
                    if let Some(g) = &grant {
                        book.grants.remove(&g.id);
                    }
                    return Err(e);
                }
                (request, grant)
            }
            Some(fleet) => {
                {
                    let mut book = self.lock();
                    self.expire_requests(&mut book, now);
                    decidable(&book, id, approver, how, now)?;
                }
                // Nothing counts until it is in the fleet's log: the verdict is applied
                // here as every agent applies it, from the log, in the log's order.
                fleet
                    .submit(Change::Verdict {
                        request_id: id.to_owned(),
                        verdict: verdict.clone(),
                    })
                    .await
                    .map_err(ApprovalError::Fleet)?;
                let book = self.lock();
                let request = book
                    .requests
                    .get(id)
                    .cloned()
                    .ok_or_else(|| ApprovalError::UnknownRequest(id.to_owned()))?;
                let ours = |v: &Verdict| {
                    v.at_ms == verdict.at_ms && duties::person(&v.by) == duties::person(approver)
                };
                if !request.verdicts.iter().any(ours) {
                    // Another bastion's decision (or the request's end) came first in the log.
                    return Err(ApprovalError::AlreadyDecided {
                        id: id.to_owned(),
                        state: request.state.as_str(),
                    });
                }
                let made_it = request.state == RequestState::Approved
                    && request.verdicts.last().is_some_and(ours);
                let grant = request
                    .grant_id
                    .as_ref()
                    .filter(|_| made_it)
                    .and_then(|g| book.grants.get(g))
                    .cloned();
                (request, grant)
            }
        };
        let kind = match (approve, break_glass) {
            (true, true) => EventKind::ApprovalBreakGlass,
            (true, false) => EventKind::ApprovalApproved,
            (false, _) => EventKind::ApprovalDenied,
        };
        let reason = if break_glass {
            // The trail says, in words, what the glass did.
            tracing::warn!(request = %request.id, requester = %who(&request.requester), asked = %request.asked.describe(), "BREAK-GLASS: a requester approved their own request");
            format!(
                "break-glass by {} as a member of `{}`, filling {}: {reason}",
                who(approver),
                self.break_glass_group.as_deref().unwrap_or_default(),
                request.requirement()
            )
        } else {
            tracing::info!(request = %request.id, state = request.state.as_str(), approve, "approval decided");
            reason
        };
        let mut ev = self.request_event(kind, &request, approver, reason);
        if let (Some(fields), Some(g)) = (ev.approval.as_mut(), &grant) {
            fields.grant_id = Some(g.id.clone());
            fields.grant_expires_ms = Some(g.expires_ms);
        }
        self.record(ev, Some(request.expires_ms));
        Ok(request)
    }

    /// The requester's grant that lets `action` on `target` through now, if any.
    pub fn active_grant(&self, requester: &str, target: &str, action: &str) -> Option<Grant> {
        let now = now_ms();
        self.lock()
            .grants
            .values()
            .find(|g| {
                g.is_active(now)
                    && duties::person(&g.requester) == Some(requester)
                    && g.target == target
                    && g.actions.iter().any(|a| a == action)
            })
            .cloned()
    }

    /// Records that `grant` let something through (`grant.used`); `event` carries the
    /// connection's own fields.
    pub fn record_use(&self, grant: &Grant, mut event: AuditEvent, what: String) {
        let request = self.lock().requests.get(&grant.request_id).cloned();
        event.event = EventKind::GrantUsed;
        event.reason = Some(what);
        event.approval = Some(Box::new(grant_fields(grant, request.as_ref(), "approved")));
        self.record(event, None);
    }

    /// Ends a grant before its time; its open connections are closed. The holder, anyone
    /// in a group that approves it, and root may revoke (revoking never widens access).
    pub fn revoke(
        &self,
        grant_id: &str,
        by: &Viewer,
        reason: String,
    ) -> Result<(Grant, usize), ApprovalError> {
        check_reason(&reason, true)?;
        let now = now_ms();
        let mut book = self.lock();
        let Some(grant) = book.grants.get(grant_id).filter(|g| g.involves(by)) else {
            return Err(ApprovalError::UnknownGrant(grant_id.to_owned()));
        };
        if !grant.is_active(now) {
            return Err(ApprovalError::GrantEnded(grant_id.to_owned()));
        }
        let who = by
            .identity
            .as_ref()
            .and_then(|i| i.email.clone().or_else(|| i.subject.clone()))
            .unwrap_or_else(|| format!("uid {}", by.uid));
        let before = grant.clone();
        let mut grant = grant.clone();
        grant.revoked = Some(Revocation {
            by: who.clone(),
            reason: reason.clone(),
            at_ms: now,
        });
        book.grants.insert(grant.id.clone(), grant.clone());
        if let Err(e) = self.save(&book) {
            book.grants.insert(grant.id.clone(), before);
            return Err(e);
        }
        let request = book.requests.get(&grant.request_id).cloned();
        drop(book);
        if let Some(fleet) = &self.fleet {
            // In force here at once; the other bastions close theirs when it reaches them.
            fleet.enqueue(Change::Revoke {
                grant_id: grant.id.clone(),
                revocation: Revocation {
                    by: who.clone(),
                    reason: reason.clone(),
                    at_ms: now,
                },
            });
        }
        let closed = self.grant_ends.grant_ended(
            &grant.id,
            &format!("grant {} revoked by {who}: {reason}", grant.id),
        );
        let mut ev = AuditEvent::new(EventKind::GrantRevoked).reason(format!(
            "revoked by {who}: {reason}; {closed} open connection(s) closed"
        ));
        ev.target = Some(grant.target.as_str().into());
        if let Some(i) = &by.identity {
            ev.identity = Some(i.clone().into());
        }
        ev.approval = Some(Box::new(grant_fields(&grant, request.as_ref(), "revoked")));
        self.record(ev, None);
        Ok((grant, closed))
    }

    /// Expires requests past their timeout and grants past their end (closing the latter's
    /// connections), each with its event.
    pub fn sweep(&self) {
        let now = now_ms();
        let mut book = self.lock();
        self.expire_requests(&mut book, now);
        let mut ended = Vec::new();
        for g in book.grants.values_mut() {
            if !g.ended && g.revoked.is_none() && now >= g.expires_ms {
                g.ended = true;
                ended.push(g.clone());
            }
        }
        let before = book.requests.len() + book.grants.len();
        prune(&mut book, now);
        let pruned = before != book.requests.len() + book.grants.len();
        if ended.is_empty() && !pruned {
            return;
        }
        if let Err(e) = self.save(&book) {
            // The change stays in memory (a grant that ended stays ended); the next change
            // writes it again.
            tracing::error!(error = %e, "cannot write the approvals store");
        }
        let requests: Vec<Option<ApprovalRequest>> = ended
            .iter()
            .map(|g| book.requests.get(&g.request_id).cloned())
            .collect();
        drop(book);
        for (g, request) in ended.iter().zip(requests) {
            let closed = self
                .grant_ends
                .grant_ended(&g.id, &format!("grant {} expired", g.id));
            if !self.is_mine(g.host.as_deref()) {
                continue;
            }
            let mut ev = AuditEvent::new(EventKind::GrantExpired)
                .reason(format!("{closed} open connection(s) closed"));
            ev.target = Some(g.target.as_str().into());
            ev.identity = Some(g.requester.clone().into());
            ev.approval = Some(Box::new(grant_fields(g, request.as_ref(), "expired")));
            self.record(ev, None);
        }
    }

    /// Ends the pending requests past their timeout, wherever it is noticed first (the
    /// sweep, a list, a waiting statement): each is written and recorded once, here.
    fn expire_requests(&self, book: &mut Book, now: u64) -> usize {
        if let Some(fleet) = &self.fleet {
            // Ended through the log, by the bastion the request was made on; until then
            // every view shows it expired ([`seen`]) and no verdict of a later time counts.
            for r in book.requests.values() {
                if r.state == RequestState::Pending
                    && now >= r.expires_ms
                    && self.is_mine(r.host.as_deref())
                {
                    fleet.end_once(Change::End {
                        request_id: r.id.clone(),
                        state: RequestState::Expired,
                        at_ms: now,
                        why: format!(
                            "not decided within the approval timeout; approvals that counted: {}",
                            r.counted().len()
                        ),
                    });
                }
            }
            return 0;
        }
        let mut expired = Vec::new();
        for r in book.requests.values_mut() {
            if r.state == RequestState::Pending && now >= r.expires_ms {
                r.state = RequestState::Expired;
                r.decided_ms = Some(now);
                expired.push(r.clone());
            }
        }
        if expired.is_empty() {
            return 0;
        }
        if let Err(e) = self.save(book) {
            // Expired in memory all the same: nothing approves it now. The next change
            // writes it again.
            tracing::error!(error = %e, "cannot write the approvals store");
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        for r in &expired {
            let ev = self.request_event(
                EventKind::ApprovalExpired,
                r,
                &r.requester,
                format!(
                    "not decided within the approval timeout; approvals that counted: {}",
                    r.counted().len()
                ),
            );
            self.record(ev, None);
        }
        expired.len()
    }

    /// Ends a pending request nobody waits for any more (its statement was canceled, its
    /// client went away): approving it later would approve nothing. Recorded as
    /// `approval.expired` with `approval_state: withdrawn`.
    pub fn withdraw(&self, id: &str, why: &str) {
        let now = now_ms();
        if let Some(fleet) = &self.fleet {
            let book = self.lock();
            if book
                .requests
                .get(id)
                .is_some_and(|r| r.state == RequestState::Pending && now < r.expires_ms)
            {
                fleet.end_once(Change::End {
                    request_id: id.to_owned(),
                    state: RequestState::Withdrawn,
                    at_ms: now,
                    why: format!("withdrawn: {why}"),
                });
            }
            return;
        }
        let mut book = self.lock();
        let Some(r) = book
            .requests
            .get_mut(id)
            .filter(|r| r.state == RequestState::Pending)
        else {
            return;
        };
        r.state = RequestState::Withdrawn;
        r.decided_ms = Some(now);
        let r = r.clone();
        if let Err(e) = self.save(&book) {
            tracing::error!(error = %e, "cannot write the approvals store");
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        drop(book);
        let ev = self.request_event(
            EventKind::ApprovalExpired,
            &r,
            &r.requester,
            format!("withdrawn: {why}"),
        );
        self.record(ev, None);
    }

    /// Whether this agent records the end of what was made on `host`: with no fleet, all;
    /// in a fleet, what was made here.
    fn is_mine(&self, host: Option<&str>) -> bool {
        match &self.fleet {
            None => true,
            Some(fleet) => host.is_none_or(|h| h == fleet.host()),
        }
    }

    /// Applies one change read from the fleet's log (in the log's order), and tells what it
    /// changed: waiters look again, a revoked grant's connections here are closed, and the
    /// bastion a request was made on records its end. A change that no longer applies (a
    /// verdict after another ended the request, the request this agent made itself) changes
    /// nothing, the same on every agent.
    ///
    /// `live` is false while a starting agent catches up with the log: what it reads then
    /// happened before, and was recorded then (by the agent running at the time).
    pub fn apply_logged(&self, change: Change, live: bool) {
        let mut revoked = None;
        let mut ended = None;
        let mut book = self.lock();
        let changed = match change {
            Change::Ask { request } => {
                if book.requests.contains_key(&request.id) {
                    false
                } else {
                    book.requests.insert(request.id.clone(), *request);
                    true
                }
            }
            Change::Verdict {
                request_id,
                verdict,
            } => apply_verdict(
                &mut book,
                &request_id,
                verdict,
                self.break_glass_group.as_deref(),
            )
            .is_ok(),
            Change::Revoke {
                grant_id,
                revocation,
            } => match book.grants.get_mut(&grant_id) {
                Some(g) if g.revoked.is_none() && !g.ended => {
                    g.revoked = Some(revocation);
                    revoked = Some(g.clone());
                    true
                }
                _ => false,
            },
            Change::End {
                request_id,
                state,
                at_ms,
                why,
            } => match book.requests.get_mut(&request_id) {
                Some(r) if r.state == RequestState::Pending => {
                    r.state = state;
                    r.decided_ms = Some(at_ms);
                    ended = Some((r.clone(), why));
                    true
                }
                _ => false,
            },
        };
        drop(book);
        if changed {
            self.changes.send_modify(|n| *n = n.wrapping_add(1));
        }
        if let Some(g) = revoked.filter(|_| live) {
            let (by, reason) = g
                .revoked
                .as_ref()
                .map(|r| (r.by.clone(), r.reason.clone()))
                .unwrap_or_default();
            let closed = self.grant_ends.grant_ended(
                &g.id,
                &format!(
                    "grant {} revoked by {by} on another bastion: {reason}",
                    g.id
                ),
            );
            tracing::info!(grant = %g.id, closed, "a grant revoked on another bastion");
        }
        if let Some((r, why)) = ended.filter(|_| live) {
            if self.is_mine(r.host.as_deref()) {
                let ev = self.request_event(EventKind::ApprovalExpired, &r, &r.requester, why);
                self.record(ev, None);
            }
        }
    }

    /// A starting agent has read the log: grants that ended while it was not running are
    /// marked ended without an event (their end was recorded by the agent running then, and
    /// this one has no connection of theirs to close).
    pub fn caught_up(&self) {
        let now = now_ms();
        for g in self.lock().grants.values_mut() {
            if now >= g.expires_ms {
                g.ended = true;
            }
        }
    }

    /// Sweeps every second until `stop`.
    pub async fn maintain(self: Arc<Self>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(Duration::from_secs(1)) => self.sweep(),
            }
        }
    }

    /// The requests `viewer` may see: root all; anyone else their own and those a group of
    /// theirs is asked to approve. Newest first.
    /// The emergency group (`approvals.break_glass_group`), `None` when break-glass is off:
    /// the console offers its form only to a requester in it (the decision checks again).
    pub fn break_glass_group(&self) -> Option<&str> {
        self.break_glass_group.as_deref()
    }

    pub fn requests(&self, viewer: &Viewer, all: bool) -> Vec<ApprovalRequest> {
        let now = now_ms();
        let mut book = self.lock();
        self.expire_requests(&mut book, now);
        let mut out: Vec<ApprovalRequest> = book
            .requests
            .values()
            .map(|r| seen(r, now))
            .filter(|r| r.involves(viewer) && (all || r.state == RequestState::Pending))
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.created_ms));
        out
    }

    pub fn request(&self, id: &str, viewer: &Viewer) -> Result<ApprovalRequest, ApprovalError> {
        let now = now_ms();
        let mut book = self.lock();
        self.expire_requests(&mut book, now);
        book.requests
            .get(id)
            .filter(|r| r.involves(viewer))
            .map(|r| seen(r, now))
            .ok_or_else(|| ApprovalError::UnknownRequest(id.to_owned()))
    }

    /// A request as it stands now, whoever asks (for the statement waiting on it).
    pub fn state_of(&self, id: &str) -> Option<ApprovalRequest> {
        let now = now_ms();
        let mut book = self.lock();
        self.expire_requests(&mut book, now);
        book.requests.get(id).map(|r| seen(r, now))
    }

    /// Changes as they happen: a waiter reads its request again at each.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Grants `viewer` may see (as [`Self::requests`]); active ones only unless `all`.
    pub fn grants(&self, viewer: &Viewer, all: bool) -> Vec<Grant> {
        let now = now_ms();
        let mut out: Vec<Grant> = self
            .lock()
            .grants
            .values()
            .filter(|g| g.involves(viewer) && (all || g.is_active(now)))
            .cloned()
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.created_ms));
        out
    }

    fn request_event(
        &self,
        kind: EventKind,
        r: &ApprovalRequest,
        actor: &Identity,
        reason: String,
    ) -> AuditEvent {
        let mut ev = AuditEvent::new(kind).reason(reason);
        ev.target = Some(r.asked.target().into());
        ev.identity = Some(actor.clone().into());
        ev.policy_ids = r.policy_ids.clone().into();
        let mut fields = ApprovalFields {
            request_id: r.id.clone(),
            grant_id: r.grant_id.clone(),
            requester: who(&r.requester),
            approvers: r.counted(),
            required: r.requirement().to_string(),
            approval_state: r.state.as_str(),
            asked: r.asked.kind(),
            break_glass: r.break_glass(),
            ..ApprovalFields::default()
        };
        match &r.asked {
            Asked::Grant {
                actions,
                duration_secs,
                ..
            } => {
                fields.grant_actions = actions.clone();
                fields.grant_duration_secs = Some(*duration_secs);
            }
            Asked::Statement {
                connection_id,
                statement,
                parameters,
                ..
            } => {
                ev.connection_id = Some(*connection_id);
                fields.approval_statement = Some(statement.clone());
                fields.approval_parameters = parameters.clone();
            }
            Asked::Command {
                connection_id,
                command,
                ..
            } => {
                ev.connection_id = Some(*connection_id);
                fields.approval_statement = command.clone();
            }
        }
        ev.approval = Some(Box::new(fields));
        ev
    }
}

/// How an identity is named in events and lists: the email if any, else the subject; a CI
/// workload with the pipeline run it was issued to ("repo:acme/infra:… (acme/infra run 9876)").
pub fn who(i: &Identity) -> String {
    if let (IdentityKind::Workload, Some(subject), Some(run)) = (i.kind, &i.subject, &i.name) {
        return format!("{subject} ({run})");
    }
    i.email
        .clone()
        .or_else(|| i.subject.clone())
        .or_else(|| i.name.clone())
        .unwrap_or_else(|| format!("uid {}", i.uid))
}

fn grant_fields(
    g: &Grant,
    request: Option<&ApprovalRequest>,
    state: &'static str,
) -> ApprovalFields {
    let required = ApprovalRequirement {
        quorums: g
            .required
            .iter()
            .map(|q| Quorum {
                group: q.group.clone(),
                approvals: q.approvals,
            })
            .collect(),
    };
    ApprovalFields {
        request_id: g.request_id.clone(),
        grant_id: Some(g.id.clone()),
        requester: who(&g.requester),
        approvers: g.approvers.clone(),
        required: required.to_string(),
        approval_state: state,
        asked: "grant",
        grant_actions: g.actions.clone(),
        grant_duration_secs: request.and_then(|r| match &r.asked {
            Asked::Grant { duration_secs, .. } => Some(*duration_secs),
            Asked::Statement { .. } | Asked::Command { .. } => None,
        }),
        grant_expires_ms: Some(g.expires_ms),
        approval_statement: None,
        approval_parameters: Vec::new(),
        break_glass: g.break_glass,
    }
}

/// Drops what is long over (decided or ended more than [`KEEP_DECIDED`] ago); the trail
/// keeps their history.
fn prune(book: &mut Book, now: u64) {
    let keep = u64::try_from(KEEP_DECIDED.as_millis()).unwrap_or(u64::MAX);
    book.requests.retain(|_, r| {
        r.state == RequestState::Pending
            || r.decided_ms.is_none_or(|d| now.saturating_sub(d) < keep)
    });
    book.grants.retain(|_, g| {
        let end = g.revoked.as_ref().map_or(g.expires_ms, |r| r.at_ms);
        now.saturating_sub(end) < keep || g.is_active(now)
    });
}

/// A request as it stands at `now`: one still pending past its deadline is expired, whether
/// or not its end is written yet (a fleet writes it through the central log).
fn seen(r: &ApprovalRequest, now: u64) -> ApprovalRequest {
    let mut r = r.clone();
    if r.state == RequestState::Pending && now >= r.expires_ms {
        r.state = RequestState::Expired;
    }
    r
}

/// Whether `approver` may decide request `id` now ([`duties::eligible`], once per person),
/// with the error to tell them when not.
fn decidable(
    book: &Book,
    id: &str,
    approver: &Identity,
    how: duties::Approving<'_>,
    now: u64,
) -> Result<(), ApprovalError> {
    let viewer = Viewer {
        uid: approver.uid,
        identity: Some(approver.clone()),
    };
    let Some(request) = book.requests.get(id).filter(|r| r.involves(&viewer)) else {
        return Err(ApprovalError::UnknownRequest(id.to_owned()));
    };
    let state = seen(request, now).state;
    if state != RequestState::Pending {
        return Err(ApprovalError::AlreadyDecided {
            id: id.to_owned(),
            state: state.as_str(),
        });
    }
    duties::eligible(&request.requirement(), &request.requester, approver, how)?;
    let subject = duties::person(approver);
    if request
        .verdicts
        .iter()
        .any(|v| duties::person(&v.by) == subject)
    {
        return Err(ApprovalError::AlreadyVoted(id.to_owned()));
    }
    Ok(())
}

/// Why a verdict changed nothing.
#[derive(Debug)]
enum Unapplied {
    Unknown,
    Ended(RequestState),
    Late,
    Voted,
    Ineligible(duties::Ineligible),
}

impl Unapplied {
    fn into_error(self, id: &str) -> ApprovalError {
        match self {
            Unapplied::Unknown => ApprovalError::UnknownRequest(id.to_owned()),
            Unapplied::Ended(state) => ApprovalError::AlreadyDecided {
                id: id.to_owned(),
                state: state.as_str(),
            },
            Unapplied::Late => ApprovalError::AlreadyDecided {
                id: id.to_owned(),
                state: RequestState::Expired.as_str(),
            },
            Unapplied::Voted => ApprovalError::AlreadyVoted(id.to_owned()),
            Unapplied::Ineligible(e) => ApprovalError::Ineligible(e),
        }
    }
}

/// One approver's verdict on a pending request: a denial ends it, approvals that meet its
/// requirement approve it and make its grant (from the verdict's time). Everything is
/// checked again here, whoever checked before: the agents of a fleet apply the central log's
/// verdicts with this, in the log's order, so they all come to the same state.
fn apply_verdict(
    book: &mut Book,
    request_id: &str,
    verdict: Verdict,
    break_glass_group: Option<&str>,
) -> Result<(ApprovalRequest, Option<Grant>), Unapplied> {
    let Some(request) = book.requests.get(request_id) else {
        return Err(Unapplied::Unknown);
    };
    if request.state != RequestState::Pending {
        return Err(Unapplied::Ended(request.state));
    }
    if verdict.at_ms >= request.expires_ms {
        return Err(Unapplied::Late);
    }
    let how = match verdict.break_glass.as_deref() {
        Some(group) => duties::Approving::BreakGlass {
            group: Some(group),
            reason: &verdict.reason,
        },
        None => duties::Approving::Ordinary { break_glass_group },
    };
    duties::eligible(&request.requirement(), &request.requester, &verdict.by, how)
        .map_err(Unapplied::Ineligible)?;
    let person = duties::person(&verdict.by);
    if request
        .verdicts
        .iter()
        .any(|v| duties::person(&v.by) == person)
    {
        return Err(Unapplied::Voted);
    }
    let mut request = request.clone();
    let (at, approve) = (verdict.at_ms, verdict.approve);
    request.verdicts.push(verdict);
    let mut grant = None;
    if !approve {
        request.state = RequestState::Denied;
        request.decided_ms = Some(at);
    } else {
        let tally = request.tally();
        if tally.met {
            request.state = RequestState::Approved;
            request.decided_ms = Some(at);
            if let Asked::Grant {
                target,
                actions,
                duration_secs,
            } = &request.asked
            {
                let g = Grant {
                    id: format!("g-{}", request.id.trim_start_matches("r-")),
                    request_id: request.id.clone(),
                    requester: request.requester.clone(),
                    target: target.clone(),
                    actions: actions.clone(),
                    created_ms: at,
                    expires_ms: at.saturating_add(duration_secs.saturating_mul(1000)),
                    approvers: tally.counted.clone(),
                    required: request.required.clone(),
                    revoked: None,
                    ended: false,
                    break_glass: tally.break_glass.is_some(),
                    host: request.host.clone(),
                };
                request.grant_id = Some(g.id.clone());
                grant = Some(g);
            }
        }
    }
    book.requests.insert(request_id.to_owned(), request.clone());
    if let Some(g) = &grant {
        book.grants.insert(g.id.clone(), g.clone());
    }
    Ok((request, grant))
}

/// One change of the book, as a fleet's central log holds it. Every agent applies the log's
/// changes in its order ([`ApprovalStore::apply_logged`]) and so holds the same requests,
/// verdicts and grants. Verdicts and request ends count only once in the log; a request and
/// a revocation take effect on their own agent at once (a request approves nothing, a
/// revocation only narrows access) and reach the others through the log.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    Ask {
        request: Box<ApprovalRequest>,
    },
    Verdict {
        request_id: String,
        verdict: Verdict,
    },
    Revoke {
        grant_id: String,
        revocation: Revocation,
    },
    /// A pending request ends without a verdict: expired, or withdrawn.
    End {
        request_id: String,
        state: RequestState,
        at_ms: u64,
        why: String,
    },
}

fn check_reason(reason: &str, required: bool) -> Result<(), ApprovalError> {
    if required && reason.trim().is_empty() {
        return Err(ApprovalError::NoReason);
    }
    if reason.len() > MAX_REASON {
        return Err(ApprovalError::ReasonTooLong);
    }
    Ok(())
}

fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
}

/// `r-` and 10 random hex digits: short enough to type, random so ids say nothing.
fn new_id(prefix: &str) -> String {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 5];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // The system's randomness failing is not a reason to refuse a request; the time
        // still gives a unique id (checked against the book by the caller).
        let t = now_ms().to_be_bytes();
        bytes.copy_from_slice(t.get(3..8).unwrap_or(&[0; 5]));
    }
    format!("{prefix}{}", hex::encode(bytes))
}

/// The requester of a connect or statement decision, as the policy saw it: the agent keeps
/// the principal, not the whole identity, on that path.
pub fn requester_of(principal: &portcullis_policy::Principal, uid: u32) -> Identity {
    Identity {
        kind: match principal.kind {
            portcullis_policy::PrincipalKind::User => IdentityKind::User,
            portcullis_policy::PrincipalKind::Service => IdentityKind::Service,
        },
        uid,
        gid: 0,
        user: None,
        subject: Some(principal.id.clone()),
        email: principal.email.clone(),
        name: principal.name.clone(),
        groups: principal.groups.clone(),
        issuer: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use std::future::Future;

    impl ApprovalStore {
        /// [`ApprovalStore::decide`] without a fleet, which never waits (tests run inside
        /// a runtime, so it is polled once rather than blocked on).
        fn decide_now(
            &self,
            id: &str,
            approver: &Identity,
            approve: bool,
            reason: String,
            break_glass: bool,
        ) -> Result<ApprovalRequest, ApprovalError> {
            let fut = std::pin::pin!(self.decide(id, approver, approve, reason, break_glass));
            match fut.poll(&mut std::task::Context::from_waker(std::task::Waker::noop())) {
                std::task::Poll::Ready(r) => r,
                std::task::Poll::Pending => {
                    Err(ApprovalError::Fleet("decide without a fleet waited".into()))
                }
            }
        }
    }

    struct Closed(Mutex<Vec<String>>);
    impl GrantEndListener for Closed {
        fn grant_ended(&self, grant_id: &str, _reason: &str) -> usize {
            self.0.lock().unwrap().push(grant_id.to_owned());
            1
        }
    }

    fn user(uid: u32, subject: &str, groups: &[&str]) -> Identity {
        Identity {
            kind: IdentityKind::User,
            uid,
            gid: uid,
            user: None,
            subject: Some(subject.to_owned()),
            email: Some(format!("{subject}@example.com")),
            name: None,
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            issuer: None,
        }
    }

    fn audit(dir: &Path) -> Arc<AuditLog> {
        let config = crate::config::AuditConfig::default();
        let (log, _) = AuditLog::open(&config, &dir.join("audit"), Vec::new()).unwrap();
        Arc::new(log)
    }

    fn ask(requester: Identity, groups: &[(&str, u32)]) -> Ask {
        Ask {
            requester,
            asked: Asked::Grant {
                target: "billing-db".into(),
                actions: vec!["connect".into()],
                duration_secs: 7200,
            },
            reason: "INC-4711".into(),
            requirement: ApprovalRequirement {
                quorums: groups
                    .iter()
                    .map(|(g, n)| Quorum {
                        group: (*g).to_owned(),
                        approvals: *n,
                    })
                    .collect(),
            },
            policy_ids: vec!["prod-connect".into()],
            timeout: Duration::from_secs(900),
        }
    }

    #[tokio::test]
    async fn a_request_and_its_grant_survive_a_restart_and_revocation_closes_it() {
        let dir = tempfile::tempdir().unwrap();
        let closed = Arc::new(Closed(Mutex::new(Vec::new())));
        let audit = audit(dir.path());
        let state = dir.path().join("approvals");
        let store = ApprovalStore::open(
            &state,
            Arc::clone(&audit),
            closed.clone(),
            StoreOptions::default(),
        )
        .unwrap();
        let alice = user(1001, "alice", &["dba-leads"]);
        let bob = user(1002, "bob", &["dba-leads"]);
        let r = store.ask(ask(alice.clone(), &[("dba-leads", 1)])).unwrap();
        // The same ask again is the same request.
        assert_eq!(
            store
                .ask(ask(alice.clone(), &[("dba-leads", 1)]))
                .unwrap()
                .id,
            r.id
        );
        let err = store
            .decide_now(&r.id, &alice, true, String::new(), false)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ApprovalError::Ineligible(duties::Ineligible::Requester)
            ),
            "{err}"
        );
        drop(store);

        let store = ApprovalStore::open(
            &state,
            Arc::clone(&audit),
            closed.clone(),
            StoreOptions::default(),
        )
        .unwrap();
        let pending = store
            .request(
                &r.id,
                &Viewer {
                    uid: 1002,
                    identity: Some(bob.clone()),
                },
            )
            .unwrap();
        assert_eq!(pending.state, RequestState::Pending);
        assert_eq!(pending.reason, "INC-4711");
        let approved = store
            .decide_now(&r.id, &bob, true, "ok".into(), false)
            .unwrap();
        assert_eq!(approved.state, RequestState::Approved);
        let grant = store
            .active_grant("alice", "billing-db", "connect")
            .unwrap();
        assert!(store
            .active_grant("alice", "billing-db", "replicate")
            .is_none());
        assert!(store.active_grant("bob", "billing-db", "connect").is_none());
        assert!(store.active_grant("alice", "other-db", "connect").is_none());
        drop(store);

        let store =
            ApprovalStore::open(&state, audit, closed.clone(), StoreOptions::default()).unwrap();
        assert!(store
            .active_grant("alice", "billing-db", "connect")
            .is_some());
        let mallory = Viewer {
            uid: 1003,
            identity: Some(user(1003, "mallory", &["dev"])),
        };
        assert!(matches!(
            store.revoke(&grant.id, &mallory, "no".into()),
            Err(ApprovalError::UnknownGrant(_))
        ));
        store
            .revoke(
                &grant.id,
                &Viewer {
                    uid: 1002,
                    identity: Some(bob),
                },
                "done".into(),
            )
            .unwrap();
        assert!(store
            .active_grant("alice", "billing-db", "connect")
            .is_none());
        assert_eq!(*closed.0.lock().unwrap(), vec![grant.id.clone()]);
        let mode = std::fs::metadata(state.join(FILE)).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mode = std::fs::metadata(&state).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[tokio::test]
    async fn a_denial_ends_the_request_and_one_person_on_two_uids_counts_once() {
        let dir = tempfile::tempdir().unwrap();
        let closed = Arc::new(Closed(Mutex::new(Vec::new())));
        let store = ApprovalStore::open(
            &dir.path().join("approvals"),
            audit(dir.path()),
            closed,
            StoreOptions::default(),
        )
        .unwrap();
        let alice = user(1001, "alice", &[]);
        let bob = user(1002, "bob", &["dba-leads"]);
        let bob_again = user(1012, "bob", &["dba-leads"]);
        let carol = user(1003, "carol", &["dba-leads"]);
        let r = store.ask(ask(alice.clone(), &[("dba-leads", 2)])).unwrap();
        store
            .decide_now(&r.id, &bob, true, String::new(), false)
            .unwrap();
        let err = store
            .decide_now(&r.id, &bob_again, true, String::new(), false)
            .unwrap_err();
        assert!(matches!(err, ApprovalError::AlreadyVoted(_)), "{err}");
        assert!(matches!(
            store.decide_now(&r.id, &carol, false, String::new(), false),
            Err(ApprovalError::NoReason)
        ));
        let denied = store
            .decide_now(&r.id, &carol, false, "not now".into(), false)
            .unwrap();
        assert_eq!(denied.state, RequestState::Denied);
        assert!(store
            .active_grant("alice", "billing-db", "connect")
            .is_none());
    }

    #[tokio::test]
    async fn break_glass_needs_the_configured_group_a_reason_and_the_flag_and_marks_the_grant() {
        let dir = tempfile::tempdir().unwrap();
        let closed = Arc::new(Closed(Mutex::new(Vec::new())));
        let audit = audit(dir.path());
        let open = |group: Option<&str>| {
            ApprovalStore::open(
                &dir.path().join("approvals"),
                Arc::clone(&audit),
                closed.clone(),
                StoreOptions {
                    break_glass_group: group.map(str::to_owned),
                    ..StoreOptions::default()
                },
            )
            .unwrap()
        };
        let erin = user(1005, "erin", &["oncall-emergency"]);
        // Without a configured group, the flag does nothing but refuse.
        let store = open(None);
        let r = store
            .ask(ask(erin.clone(), &[("dba-leads", 1), ("security", 1)]))
            .unwrap();
        let err = store
            .decide_now(&r.id, &erin, true, "INC-9".into(), true)
            .unwrap_err();
        assert!(
            matches!(
                err,
                ApprovalError::Ineligible(duties::Ineligible::NoBreakGlass)
            ),
            "{err}"
        );
        drop(store);
        let store = open(Some("oncall-emergency"));
        for (reason, approve) in [(" ", true), ("INC-9", false)] {
            let err = store
                .decide_now(&r.id, &erin, approve, reason.into(), true)
                .unwrap_err();
            assert!(
                matches!(
                    err,
                    ApprovalError::Ineligible(duties::Ineligible::BreakGlassWithoutReason)
                        | ApprovalError::BreakGlassDenial
                ),
                "{err}"
            );
        }
        let err = store
            .decide_now(&r.id, &erin, true, "INC-9".into(), false)
            .unwrap_err();
        assert!(err.to_string().contains("--break-glass"), "{err}");
        assert_eq!(
            store.state_of(&r.id).unwrap().state,
            RequestState::Pending,
            "refusals store nothing"
        );
        let approved = store
            .decide_now(&r.id, &erin, true, "INC-9: primary down".into(), true)
            .unwrap();
        assert_eq!(approved.state, RequestState::Approved);
        assert!(approved.break_glass());
        assert_eq!(approved.counted(), vec!["erin".to_owned()]);
        let grant = store.active_grant("erin", "billing-db", "connect").unwrap();
        assert!(grant.break_glass);
        assert_eq!(grant.approvers, vec!["erin".to_owned()]);
        // Read back after a restart, it is still the glass that approved it.
        drop(store);
        let store = open(Some("oncall-emergency"));
        assert!(store.state_of(&r.id).unwrap().break_glass());
        assert!(
            store
                .active_grant("erin", "billing-db", "connect")
                .unwrap()
                .break_glass
        );
    }

    #[tokio::test]
    async fn a_withdrawn_request_cannot_be_approved_afterwards() {
        let dir = tempfile::tempdir().unwrap();
        let closed = Arc::new(Closed(Mutex::new(Vec::new())));
        let store = ApprovalStore::open(
            &dir.path().join("approvals"),
            audit(dir.path()),
            closed,
            StoreOptions::default(),
        )
        .unwrap();
        let r = store
            .ask(ask(user(1001, "alice", &[]), &[("dba-leads", 1)]))
            .unwrap();
        store.withdraw(&r.id, "the client canceled the statement while it waited");
        let err = store
            .decide_now(
                &r.id,
                &user(1002, "bob", &["dba-leads"]),
                true,
                String::new(),
                false,
            )
            .unwrap_err();
        assert!(
            matches!(
                err,
                ApprovalError::AlreadyDecided {
                    state: "withdrawn",
                    ..
                }
            ),
            "{err}"
        );
        assert!(store
            .active_grant("alice", "billing-db", "connect")
            .is_none());
    }

    /// A store of a fleet whose log is fed by hand (`apply_logged`), as the runner feeds it.
    fn fleet_store(dir: &Path, host: &str, closed: Arc<Closed>) -> Arc<ApprovalStore> {
        let central: crate::config::CentralConfig = toml::from_str(&format!(
            "url = \"postgres://bastion@127.0.0.1/portcullis\"\nhost_name = \"{host}\"\n"
        ))
        .unwrap();
        let (fleet, _runner) = fleet::Fleet::new(&central, None);
        ApprovalStore::open(
            &dir.join(host),
            audit(&dir.join(host)),
            closed,
            StoreOptions {
                fleet: Some(fleet),
                ..StoreOptions::default()
            },
        )
        .unwrap()
    }

    fn verdict(by: &Identity, approve: bool, at_ms: u64) -> Verdict {
        Verdict {
            by: by.clone(),
            approve,
            reason: "ok".into(),
            at_ms,
            break_glass: None,
        }
    }

    #[test]
    fn two_bastions_applying_one_log_hold_the_same_requests_and_grants() {
        let dir = tempfile::tempdir().unwrap();
        let closed_a = Arc::new(Closed(Mutex::new(Vec::new())));
        let closed_b = Arc::new(Closed(Mutex::new(Vec::new())));
        let a = fleet_store(dir.path(), "bastion-a", closed_a.clone());
        let b = fleet_store(dir.path(), "bastion-b", closed_b.clone());
        let alice = user(1001, "alice", &["dba-leads"]);
        let bob = user(1002, "bob", &["dba-leads"]);
        let bob_again = user(2002, "bob", &["dba-leads"]);
        let carol = user(1003, "carol", &["dba-leads"]);
        // Made on a: in force there at once, with a's name on it.
        let r = a.ask(ask(alice.clone(), &[("dba-leads", 2)])).unwrap();
        assert_eq!(r.host.as_deref(), Some("bastion-a"));
        let at = r.created_ms + 1;
        let log = vec![
            Change::Ask {
                request: Box::new(r.clone()),
            },
            // The requester's own verdict (whatever groups they hold) changes nothing.
            Change::Verdict {
                request_id: r.id.clone(),
                verdict: verdict(&alice, true, at),
            },
            Change::Verdict {
                request_id: r.id.clone(),
                verdict: verdict(&bob, true, at + 1),
            },
            // The same person from another uid counts once.
            Change::Verdict {
                request_id: r.id.clone(),
                verdict: verdict(&bob_again, true, at + 2),
            },
            Change::Verdict {
                request_id: r.id.clone(),
                verdict: verdict(&carol, true, at + 3),
            },
            // After the request is decided, an end changes nothing.
            Change::End {
                request_id: r.id.clone(),
                state: RequestState::Expired,
                at_ms: at + 4,
                why: "late".into(),
            },
        ];
        for change in &log {
            a.apply_logged(change.clone(), true);
            b.apply_logged(change.clone(), true);
        }
        let on_a = a.state_of(&r.id).unwrap();
        let on_b = b.state_of(&r.id).unwrap();
        for r in [&on_a, &on_b] {
            assert_eq!(r.state, RequestState::Approved);
            assert_eq!(r.counted(), vec!["bob".to_string(), "carol".to_string()]);
            assert_eq!(
                r.verdicts.len(),
                2,
                "alice's and bob's second verdicts were not kept"
            );
        }
        let grant_a = a.active_grant("alice", "billing-db", "connect").unwrap();
        let grant_b = b.active_grant("alice", "billing-db", "connect").unwrap();
        assert_eq!(grant_a.id, grant_b.id);
        assert_eq!(
            grant_a.expires_ms,
            at + 3 + 7_200_000,
            "from the verdict's time"
        );
        assert_eq!(grant_b.expires_ms, grant_a.expires_ms);
        assert_eq!(grant_b.host.as_deref(), Some("bastion-a"));

        // Revoked on b: in force there at once; a closes its connections when the log
        // brings the revocation, and only then.
        let viewer = Viewer {
            uid: 0,
            identity: None,
        };
        b.revoke(&grant_b.id, &viewer, "done".into()).unwrap();
        assert_eq!(
            closed_b.0.lock().unwrap().as_slice(),
            std::slice::from_ref(&grant_b.id)
        );
        assert!(a.active_grant("alice", "billing-db", "connect").is_some());
        let revocation = b
            .grants(&viewer, true)
            .first()
            .unwrap()
            .revoked
            .clone()
            .unwrap();
        let change = Change::Revoke {
            grant_id: grant_b.id.clone(),
            revocation,
        };
        a.apply_logged(change.clone(), true);
        b.apply_logged(change, true);
        assert!(a.active_grant("alice", "billing-db", "connect").is_none());
        assert_eq!(
            closed_a.0.lock().unwrap().as_slice(),
            std::slice::from_ref(&grant_a.id)
        );
        assert_eq!(closed_b.0.lock().unwrap().len(), 1, "b closed once");
    }

    #[test]
    fn in_a_fleet_a_verdict_counts_only_from_the_log_and_never_after_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let closed = Arc::new(Closed(Mutex::new(Vec::new())));
        let a = fleet_store(dir.path(), "bastion-a", closed.clone());
        let b = fleet_store(dir.path(), "bastion-b", closed);
        let alice = user(1001, "alice", &[]);
        let bob = user(1002, "bob", &["dba-leads"]);
        let r = a.ask(ask(alice, &[("dba-leads", 1)])).unwrap();
        for s in [&a, &b] {
            s.apply_logged(
                Change::Ask {
                    request: Box::new(r.clone()),
                },
                true,
            );
        }
        // Withdrawn on a: queued for the log, not ended here until the log has it.
        a.withdraw(&r.id, "the client went away");
        assert_eq!(a.state_of(&r.id).unwrap().state, RequestState::Pending);
        let end = Change::End {
            request_id: r.id.clone(),
            state: RequestState::Withdrawn,
            at_ms: r.created_ms + 10,
            why: "withdrawn: the client went away".into(),
        };
        let late = Change::Verdict {
            request_id: r.id.clone(),
            verdict: verdict(&bob, true, r.created_ms + 20),
        };
        for s in [&a, &b] {
            s.apply_logged(end.clone(), true);
            s.apply_logged(late.clone(), true);
            let seen = s.state_of(&r.id).unwrap();
            assert_eq!(seen.state, RequestState::Withdrawn);
            assert!(seen.verdicts.is_empty());
        }
        // A verdict stamped at or after the deadline never counts, whatever the order.
        let mut other = ask(user(1001, "alice", &[]), &[("dba-leads", 1)]);
        if let Asked::Grant { duration_secs, .. } = &mut other.asked {
            *duration_secs = 60; // another thing asked: a new request
        }
        let r2 = a.ask(other).unwrap();
        for s in [&a, &b] {
            s.apply_logged(
                Change::Ask {
                    request: Box::new(r2.clone()),
                },
                true,
            );
            s.apply_logged(
                Change::Verdict {
                    request_id: r2.id.clone(),
                    verdict: verdict(&bob, true, r2.expires_ms),
                },
                true,
            );
            assert_eq!(s.state_of(&r2.id).unwrap().verdicts.len(), 0);
            assert!(s.active_grant("alice", "billing-db", "connect").is_none());
        }
    }

    #[test]
    fn a_starting_agent_reads_the_log_without_closing_or_recording_again() {
        let dir = tempfile::tempdir().unwrap();
        let earlier = fleet_store(
            dir.path(),
            "bastion-a",
            Arc::new(Closed(Mutex::new(Vec::new()))),
        );
        let alice = user(1001, "alice", &[]);
        let bob = user(1002, "bob", &["dba-leads"]);
        let mut short = ask(alice.clone(), &[("dba-leads", 1)]);
        if let Asked::Grant { duration_secs, .. } = &mut short.asked {
            *duration_secs = 1;
        }
        let over = earlier.ask(short).unwrap();
        let current = earlier.ask(ask(alice, &[("dba-leads", 1)])).unwrap();
        let now = now_ms();
        let log = [
            Change::Ask {
                request: Box::new(over.clone()),
            },
            // Approved ten seconds ago for one second: its grant is over.
            Change::Verdict {
                request_id: over.id.clone(),
                verdict: verdict(&bob, true, now - 10_000),
            },
            Change::Ask {
                request: Box::new(current.clone()),
            },
            Change::Verdict {
                request_id: current.id.clone(),
                verdict: verdict(&bob, true, now),
            },
            Change::Revoke {
                grant_id: format!("g-{}", current.id.trim_start_matches("r-")),
                revocation: Revocation {
                    by: "bob".into(),
                    reason: "done".into(),
                    at_ms: now,
                },
            },
        ];
        // The same bastion restarted, with an empty book.
        let again = tempfile::tempdir().unwrap();
        let closed = Arc::new(Closed(Mutex::new(Vec::new())));
        let restarted = fleet_store(again.path(), "bastion-a", closed.clone());
        for change in log {
            restarted.apply_logged(change, false);
        }
        restarted.caught_up();
        restarted.sweep();
        assert!(
            closed.0.lock().unwrap().is_empty(),
            "closed again on replay: {:?}",
            closed.0.lock().unwrap()
        );
        let viewer = Viewer {
            uid: 0,
            identity: None,
        };
        let grants = restarted.grants(&viewer, true);
        assert_eq!(grants.len(), 2);
        assert!(grants.iter().all(|g| !g.is_active(now_ms())));
        assert!(restarted
            .active_grant("alice", "billing-db", "connect")
            .is_none());
    }
}
