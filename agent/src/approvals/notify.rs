//! Approval notifications: each request, decision, expiry, revocation and break-glass is
//! POSTed to the webhooks of `[[approvals.notify]]`, as one generic JSON object or as a
//! Slack-compatible message (docs/approvals.md, "Notifications").
//!
//! A notification says what its audit event says ([`Notice::of`] reads the event), so the
//! two cannot disagree. The store only queues it ([`Notifier::notify`] never waits: a
//! bounded queue per webhook, filled under the store's lock); one task per webhook sends
//! them in order, retrying with backoff as the SIEM webhook does. A notification that cannot
//! be delivered is dropped with a warning and an `approval.notification_dropped` event; the
//! request it was about goes on as if it had been sent. URLs and tokens are secrets: read
//! from root-only files where they are, never in a log line, an event or an error.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use portcullis_core::{ApprovalFields, Secret};
use serde::Serialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditEvent, AuditLog, EventKind};
use crate::config::{ApprovalsConfig, NotifyConfig, NotifyFormat};

/// Notifications one webhook may have waiting; past it, new ones are dropped (and say so)
/// rather than holding anything up.
pub const QUEUE: usize = 256;
/// Attempts per notification before it is dropped: the backoff between them doubles from
/// [`Backoff::first`] to [`Backoff::max`] (1, 2, 4, 8, 16 s: half a minute of outage).
const ATTEMPTS: u32 = 6;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest statement text a Slack message shows (the JSON payload carries it whole).
const SLACK_STATEMENT: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum NotifyError {
    #[error("approvals.notify[{index}] (`{name}`): {what} {}: {reason}", path.display())]
    File {
        index: usize,
        name: String,
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("approvals.notify[{index}] (`{name}`): {reason}")]
    Endpoint {
        index: usize,
        name: String,
        reason: String,
    },
}

/// What one notification says: the fields of its audit event, and how to follow it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notice {
    /// The event type (`approval.requested`, `approval.break_glass`, `grant.revoked`, …).
    pub kind: &'static str,
    pub time_ms: u64,
    pub host: String,
    pub request_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grant_id: Option<String>,
    pub requester: String,
    /// Who acted: the requester, an approver, the revoker; none for an expiry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    pub target: String,
    /// `grant` (its `actions` for `duration_secs`) or `statement` (its exact text).
    pub asked: &'static str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub actions: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub statement: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub parameters: Vec<Option<String>>,
    pub required: String,
    /// The subjects whose approvals count so far.
    pub approvers: Vec<String>,
    /// Where the request stands now: pending, approved, denied, expired, withdrawn, revoked.
    pub decision: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the request expires (while pending) or the grant ends (once approved), Unix ms.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_ms: Option<u64>,
    pub break_glass: bool,
    /// The command that shows the request.
    pub follow: String,
}

/// The event types that notify; a grant's use notifies only when the glass was broken.
fn notified(kind: EventKind, break_glass: bool) -> Option<&'static str> {
    Some(match kind {
        EventKind::ApprovalRequested => "approval.requested",
        EventKind::ApprovalApproved => "approval.approved",
        EventKind::ApprovalDenied => "approval.denied",
        EventKind::ApprovalExpired => "approval.expired",
        EventKind::ApprovalBreakGlass => "approval.break_glass",
        EventKind::GrantRevoked => "grant.revoked",
        EventKind::GrantExpired => "grant.expired",
        EventKind::GrantUsed if break_glass => "grant.used",
        _ => return None,
    })
}

impl Notice {
    /// The notification `ev` makes, if its type notifies; `request_expires_ms` is when a
    /// pending request expires (the event carries only a grant's end).
    pub fn of(ev: &AuditEvent, request_expires_ms: Option<u64>) -> Option<Notice> {
        let fields: &ApprovalFields = ev.approval.as_deref()?;
        let kind = notified(ev.event, fields.break_glass)?;
        let expires_ms = if fields.approval_state == "pending" {
            request_expires_ms
        } else {
            fields.grant_expires_ms
        };
        Some(Notice {
            kind,
            time_ms: ev.time_ms,
            host: ev.host.to_string(),
            request_id: fields.request_id.clone(),
            grant_id: fields.grant_id.clone(),
            requester: fields.requester.clone(),
            actor: ev
                .identity
                .as_ref()
                .filter(|_| {
                    !matches!(
                        ev.event,
                        EventKind::GrantExpired | EventKind::ApprovalExpired
                    )
                })
                .map(|i| super::who(i)),
            target: ev.target.as_deref().unwrap_or_default().to_owned(),
            asked: fields.asked,
            actions: fields.grant_actions.clone(),
            duration_secs: fields.grant_duration_secs,
            statement: fields.approval_statement.clone(),
            parameters: fields.approval_parameters.clone(),
            required: fields.required.clone(),
            approvers: fields.approvers.clone(),
            decision: fields.approval_state,
            reason: ev.reason.clone().filter(|r| !r.is_empty()),
            expires_ms,
            break_glass: fields.break_glass,
            follow: format!("portcullis approvals show {}", fields.request_id),
        })
    }

    fn scope(&self) -> String {
        match (self.asked, &self.statement) {
            // An SSH command line is carried in the statement's place.
            ("command", Some(_)) => format!("a command on {}", self.target),
            ("command", None) => format!("an interactive shell on {}", self.target),
            (_, Some(_)) => format!("a statement on {}", self.target),
            (_, None) => format!(
                "{} on {}{}",
                self.actions.join(", "),
                self.target,
                self.duration_secs
                    .map(|d| format!(" for {}", super::human_duration(d)))
                    .unwrap_or_default()
            ),
        }
    }

    /// One line: what happened, to which request.
    fn headline(&self) -> String {
        let who = self.actor.as_deref().unwrap_or(&self.requester);
        let what = match self.kind {
            "approval.requested" => format!("{who} asks for {}", self.scope()),
            "approval.approved" if self.decision == "approved" => {
                format!(
                    "{who} approved {}: approved, {}",
                    self.request_id,
                    self.scope()
                )
            }
            "approval.approved" => format!(
                "{who} approved {} ({} counted; needs {}): still {}",
                self.request_id,
                self.approvers.len(),
                self.required,
                self.decision
            ),
            "approval.denied" => format!("{who} denied {}", self.scope()),
            "approval.expired" if self.decision == "withdrawn" => {
                format!("request {} withdrawn", self.request_id)
            }
            "approval.expired" => format!("request {} expired undecided", self.request_id),
            "approval.break_glass" => format!(
                "BREAK-GLASS: {who} approved their own request for {}",
                self.scope()
            ),
            "grant.used" => format!(
                "BREAK-GLASS grant {} used: {}",
                self.grant_id.as_deref().unwrap_or_default(),
                self.scope()
            ),
            "grant.revoked" => format!(
                "grant {} revoked",
                self.grant_id.as_deref().unwrap_or_default()
            ),
            "grant.expired" => format!(
                "grant {} expired",
                self.grant_id.as_deref().unwrap_or_default()
            ),
            other => other.to_owned(),
        };
        let glass = if self.break_glass && self.kind != "approval.break_glass" {
            " [break-glass]"
        } else {
            ""
        };
        format!("Portcullis on {}: {what}{glass}", self.host)
    }
}

/// The generic JSON payload: the notice as one object, with `source` and a readable `text`.
pub fn json_payload(n: &Notice) -> Value {
    let mut v = serde_json::to_value(n).unwrap_or_else(|_| json!({}));
    if let Some(o) = v.as_object_mut() {
        o.insert("source".into(), json!("portcullis"));
        o.insert("text".into(), json!(n.headline()));
        if let Some(ms) = n.expires_ms {
            o.insert("expires".into(), json!(crate::audit::siem::rfc3339_ms(ms)));
        }
    }
    v
}

/// Slack's `mrkdwn` reads `&`, `<` and `>` as markup (`<!channel>`, `<url|label>`): a reason
/// or statement must not mention people or hide a link.
fn slack_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// Text inside a Slack code span/block: escaped, and with no backtick left to close it early.
fn slack_code(s: &str, max: usize) -> String {
    let mut shown: String = s.chars().take(max).collect();
    if shown.len() < s.len() {
        shown.push('…');
    }
    slack_escape(&shown.replace('`', "'"))
}

/// The Slack-compatible payload (an incoming webhook, or anything that reads `text`):
/// `text` for notifications and clients without blocks, `blocks` for the rest. Statement
/// parameters are left out (the JSON payload and `portcullis approvals show` have them).
pub fn slack_payload(n: &Notice) -> Value {
    let headline = slack_escape(&n.headline());
    let title = if n.kind == "approval.break_glass" || (n.break_glass && n.kind == "grant.used") {
        format!(":rotating_light: *{headline}*")
    } else {
        format!("*{headline}*")
    };
    let mut fields = vec![
        format!("*Request*\n`{}`", slack_code(&n.request_id, 64)),
        format!("*Requester*\n{}", slack_escape(&n.requester)),
        format!("*Target*\n{}", slack_escape(&n.target)),
        format!("*State*\n{}", n.decision),
        format!("*Needs*\n{}", slack_escape(&n.required.replace('`', ""))),
        format!(
            "*Approvers so far*\n{}",
            if n.approvers.is_empty() {
                "none".to_owned()
            } else {
                slack_escape(&n.approvers.join(", "))
            }
        ),
    ];
    if let Some(ms) = n.expires_ms {
        let what = if n.decision == "pending" {
            "Expires"
        } else {
            "Grant ends"
        };
        fields.push(format!("*{what}*\n{}", crate::audit::siem::rfc3339_ms(ms)));
    }
    if let Some(g) = &n.grant_id {
        fields.push(format!("*Grant*\n`{}`", slack_code(g, 64)));
    }
    let fields: Vec<Value> = fields
        .into_iter()
        .map(|t| json!({"type": "mrkdwn", "text": t}))
        .collect();
    let mut blocks = vec![
        json!({"type": "section", "text": {"type": "mrkdwn", "text": title}}),
        json!({"type": "section", "fields": fields}),
    ];
    let scope = match (n.asked, &n.statement) {
        ("command", Some(text)) => {
            format!("*Command*\n```{}```", slack_code(text, SLACK_STATEMENT))
        }
        (_, Some(text)) => format!(
            "*Statement* ({} parameter(s))\n```{}```",
            n.parameters.len(),
            slack_code(text, SLACK_STATEMENT)
        ),
        (_, None) => format!("*Asks*\n{}", slack_escape(&n.scope())),
    };
    blocks.push(json!({"type": "section", "text": {"type": "mrkdwn", "text": scope}}));
    if let Some(reason) = &n.reason {
        blocks.push(json!({"type": "section", "text": {"type": "mrkdwn",
            "text": format!("*Reason*\n{}", slack_code(reason, 2_000))}}));
    }
    blocks.push(json!({"type": "context", "elements": [{"type": "mrkdwn",
        "text": format!("Follow it: `{}`", slack_code(&n.follow, 100))}]}));
    let text = if n.break_glass {
        format!(":rotating_light: {headline}")
    } else {
        headline
    };
    json!({"text": text, "blocks": blocks})
}

/// How long to wait between attempts.
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
    pub attempts: u32,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            first: Duration::from_secs(1),
            max: Duration::from_secs(16),
            attempts: ATTEMPTS,
        }
    }
}

/// Where one webhook is, as read from the config and its files.
struct Endpoint {
    name: String,
    format: NotifyFormat,
    url: Secret,
    token: Option<Secret>,
    timeout: Duration,
}

/// The queues of the configured webhooks. With none configured, [`Notifier::notify`] does
/// nothing.
pub struct Notifier {
    queues: Vec<(String, mpsc::Sender<Arc<Notice>>)>,
    audit: Option<Arc<AuditLog>>,
}

/// One webhook's sender task, to be run on the data plane ([`Delivery::run`]).
pub struct Delivery {
    endpoint: Endpoint,
    client: reqwest::Client,
    queue: mpsc::Receiver<Arc<Notice>>,
    audit: Arc<AuditLog>,
    backoff: Backoff,
}

impl Notifier {
    /// No webhook: nothing is sent.
    pub fn none() -> Arc<Self> {
        Arc::new(Self {
            queues: Vec::new(),
            audit: None,
        })
    }

    /// Reads each webhook's files (URL, token) and builds its client; a file that is
    /// missing, readable by others, or holds a URL the config would refuse stops the agent
    /// here, naming the webhook and the file, never their contents.
    pub fn start(
        config: &ApprovalsConfig,
        allow_plaintext_loopback: bool,
        audit: &Arc<AuditLog>,
        backoff: Backoff,
    ) -> Result<(Arc<Self>, Vec<Delivery>), NotifyError> {
        let mut queues = Vec::new();
        let mut deliveries = Vec::new();
        for (index, c) in config.notify.iter().enumerate() {
            let endpoint = Endpoint::load(index, c, allow_plaintext_loopback)?;
            let client = reqwest::Client::builder()
                .use_rustls_tls()
                .timeout(endpoint.timeout)
                .connect_timeout(CONNECT_TIMEOUT)
                // A redirect would carry the token (and the notice) somewhere nobody configured.
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| NotifyError::Endpoint {
                    index,
                    name: endpoint.name.clone(),
                    reason: describe(&e),
                })?;
            let (tx, rx) = mpsc::channel(QUEUE);
            queues.push((endpoint.name.clone(), tx));
            deliveries.push(Delivery {
                endpoint,
                client,
                queue: rx,
                audit: Arc::clone(audit),
                backoff,
            });
        }
        Ok((
            Arc::new(Self {
                queues,
                audit: Some(Arc::clone(audit)),
            }),
            deliveries,
        ))
    }

    /// Queues `ev`'s notification (if its type notifies) for every webhook. Never waits: a
    /// full queue drops this notification, with a warning and an event.
    pub fn notify(&self, ev: &AuditEvent, request_expires_ms: Option<u64>) {
        if self.queues.is_empty() {
            return;
        }
        let Some(notice) = Notice::of(ev, request_expires_ms) else {
            return;
        };
        let notice = Arc::new(notice);
        for (name, tx) in &self.queues {
            match tx.try_send(Arc::clone(&notice)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(n)) => {
                    let why = format!("its queue is full ({QUEUE} waiting)");
                    if let Some(audit) = &self.audit {
                        dropped(audit, name, &n, &why);
                    }
                }
                // The agent is stopping: its sender tasks are gone.
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    tracing::debug!(webhook = %name, kind = notice.kind, "notification not queued: stopping");
                }
            }
        }
    }
}

/// The warning and the event for a notification that will not arrive.
fn dropped(audit: &AuditLog, webhook: &str, n: &Notice, why: &str) {
    tracing::warn!(webhook, kind = n.kind, request = %n.request_id, %why, "approval notification dropped; the request goes on");
    let mut ev = AuditEvent::new(EventKind::ApprovalNotificationDropped).reason(format!(
        "notification `{webhook}` of {} for request {} not delivered: {why}",
        n.kind, n.request_id
    ));
    ev.target = Some(n.target.as_str().into());
    ev.approval = Some(Box::new(ApprovalFields {
        request_id: n.request_id.clone(),
        grant_id: n.grant_id.clone(),
        requester: n.requester.clone(),
        required: n.required.clone(),
        approval_state: n.decision,
        asked: n.asked,
        break_glass: n.break_glass,
        ..ApprovalFields::default()
    }));
    audit.record(ev);
}

impl Endpoint {
    fn load(index: usize, c: &NotifyConfig, plaintext_ok: bool) -> Result<Self, NotifyError> {
        let name = c.name.clone().unwrap_or_else(|| format!("notify[{index}]"));
        let file_err = |what: &'static str, path: &Path, reason: String| NotifyError::File {
            index,
            name: name.clone(),
            what,
            path: path.to_path_buf(),
            reason,
        };
        let url = match (&c.url, &c.url_file) {
            (Some(url), _) => Secret::new(url.clone()),
            (None, Some(path)) => {
                let url = read_secret_file(path).map_err(|r| file_err("url_file", path, r))?;
                // The same rules as a URL in the config, checked on what the file holds;
                // the messages never quote it.
                crate::config::check_webhook_url(url.expose())
                    .map_err(|r| file_err("url_file", path, r))?;
                if url.expose().starts_with("http://") && !plaintext_ok {
                    return Err(file_err(
                        "url_file",
                        path,
                        "plain http on loopback is accepted only with `insecure.allow_plaintext_loopback = true`; use https".into(),
                    ));
                }
                url
            }
            (None, None) => {
                return Err(NotifyError::Endpoint {
                    index,
                    name,
                    reason: "set `url` or `url_file`".into(),
                })
            }
        };
        let token = match &c.token_file {
            Some(path) => {
                Some(read_secret_file(path).map_err(|r| file_err("token_file", path, r))?)
            }
            None => None,
        };
        Ok(Self {
            name,
            format: c.format,
            url,
            token,
            timeout: Duration::from_secs(c.timeout_secs),
        })
    }
}

/// One line from a root-only file: a token or a URL. The error never holds the content.
fn read_secret_file(path: &Path) -> Result<Secret, String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "readable by others (mode {:o}); make it 0600",
            meta.mode() & 0o777
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let value = text.trim();
    if value.is_empty() {
        return Err("empty".into());
    }
    if !value.chars().all(|c| c.is_ascii_graphic()) {
        return Err("holds spaces or characters outside printable ASCII".into());
    }
    Ok(Secret::new(value.to_owned()))
}

/// A failed request in words that never hold the URL (reqwest's own message names it).
fn describe(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else if e.is_builder() {
        "cannot build the request"
    } else {
        "request failed"
    };
    let mut out = kind.to_owned();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        // Sources describe sockets and TLS; a URL would only come back through reqwest.
        if !text.contains("://") {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

impl Delivery {
    pub fn name(&self) -> &str {
        &self.endpoint.name
    }

    /// Sends what is queued, in order, until `stop`. What is still queued then is not sent
    /// (the audit trail has every event).
    pub async fn run(mut self, stop: CancellationToken) {
        loop {
            let notice = tokio::select! {
                () = stop.cancelled() => return,
                n = self.queue.recv() => match n {
                    Some(n) => n,
                    None => return,
                },
            };
            let body = match self.endpoint.format {
                NotifyFormat::Json => json_payload(&notice),
                NotifyFormat::Slack => slack_payload(&notice),
            };
            let mut wait = self.backoff.first;
            let mut attempt = 1;
            loop {
                match self.send(&body).await {
                    Ok(()) => {
                        tracing::debug!(webhook = %self.endpoint.name, kind = notice.kind, request = %notice.request_id, attempt, "approval notification sent");
                        break;
                    }
                    Err(why) if attempt >= self.backoff.attempts => {
                        dropped(
                            &self.audit,
                            &self.endpoint.name,
                            &notice,
                            &format!("{attempt} attempts failed, the last: {why}"),
                        );
                        break;
                    }
                    Err(why) => {
                        tracing::warn!(webhook = %self.endpoint.name, kind = notice.kind, request = %notice.request_id, attempt, retry_ms = wait.as_millis() as u64, error = %why, "approval notification failed; retrying");
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(wait) => {}
                        }
                        wait = wait.saturating_mul(2).min(self.backoff.max);
                        attempt += 1;
                    }
                }
            }
        }
    }

    async fn send(&self, body: &Value) -> Result<(), String> {
        let mut request = self
            .client
            .post(self.endpoint.url.expose())
            .header("X-Portcullis-Notification", "approval")
            .json(body);
        if let Some(token) = &self.endpoint.token {
            request = request.bearer_auth(token.expose());
        }
        let response = request.send().await.map_err(|e| describe(&e))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("the webhook answered HTTP {}", status.as_u16()))
        }
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests"
)]
mod tests {
    use super::*;
    use portcullis_core::Identity;

    fn identity(subject: &str) -> Identity {
        Identity {
            kind: portcullis_core::IdentityKind::User,
            uid: 1001,
            gid: 1001,
            user: None,
            subject: Some(subject.into()),
            email: Some(format!("{subject}@example.com")),
            name: None,
            groups: vec![],
            issuer: None,
        }
    }

    fn event(kind: EventKind, state: &'static str, glass: bool) -> AuditEvent {
        let mut ev =
            AuditEvent::new(kind).reason("INC-4711: <!channel> see <https://evil|here> & `x`");
        ev.target = Some("billing-db".into());
        ev.identity = Some(identity("bob").into());
        ev.approval = Some(Box::new(ApprovalFields {
            request_id: "r-0123456789".into(),
            grant_id: (state == "approved").then(|| "g-0123456789".into()),
            requester: "alice@example.com".into(),
            approvers: if state == "approved" {
                vec!["bob".into()]
            } else {
                vec![]
            },
            required: "1 approval from group `dba-leads`".into(),
            approval_state: state,
            asked: "grant",
            grant_actions: vec!["connect".into()],
            grant_duration_secs: Some(7200),
            grant_expires_ms: (state == "approved").then_some(1_795_439_260_000),
            break_glass: glass,
            ..ApprovalFields::default()
        }));
        ev
    }

    #[test]
    fn the_kinds_that_notify_are_the_listed_ones() {
        for (kind, glass, want) in [
            (EventKind::ApprovalRequested, false, true),
            (EventKind::ApprovalApproved, false, true),
            (EventKind::ApprovalDenied, false, true),
            (EventKind::ApprovalExpired, false, true),
            (EventKind::ApprovalBreakGlass, true, true),
            (EventKind::GrantRevoked, false, true),
            (EventKind::GrantExpired, false, true),
            (EventKind::GrantUsed, false, false),
            (EventKind::GrantUsed, true, true),
            (EventKind::ApprovalNotificationDropped, false, false),
            (EventKind::ConnectionOpened, false, false),
        ] {
            let ev = event(kind, "pending", glass);
            assert_eq!(
                Notice::of(&ev, None).is_some(),
                want,
                "{kind:?} glass {glass}"
            );
        }
        // An event without approval fields notifies nothing, whatever its kind.
        assert!(Notice::of(&AuditEvent::new(EventKind::ApprovalRequested), None).is_none());
    }

    #[test]
    fn the_json_payload_carries_every_field_and_the_command_to_follow() {
        let n = Notice::of(
            &event(EventKind::ApprovalRequested, "pending", false),
            Some(1_795_432_900_000),
        )
        .unwrap();
        let v = json_payload(&n);
        assert_eq!(v["source"], "portcullis");
        assert_eq!(v["kind"], "approval.requested");
        assert_eq!(v["request_id"], "r-0123456789");
        assert_eq!(v["requester"], "alice@example.com");
        assert_eq!(v["actor"], "bob@example.com");
        assert_eq!(v["target"], "billing-db");
        assert_eq!(v["asked"], "grant");
        assert_eq!(v["actions"], json!(["connect"]));
        assert_eq!(v["duration_secs"], 7200);
        assert_eq!(v["required"], "1 approval from group `dba-leads`");
        assert_eq!(v["approvers"], json!([]));
        assert_eq!(v["decision"], "pending");
        assert_eq!(v["expires_ms"], 1_795_432_900_000_u64);
        assert_eq!(v["expires"], "2026-11-23T11:21:40.000Z");
        assert_eq!(v["break_glass"], false);
        assert_eq!(v["follow"], "portcullis approvals show r-0123456789");
        assert!(v["reason"].as_str().unwrap().starts_with("INC-4711"));
        assert!(
            v["text"]
                .as_str()
                .unwrap()
                .contains("asks for connect on billing-db for 2h"),
            "{v}"
        );

        // Approved: the grant's end is the expiry, the approvers are listed.
        let n = Notice::of(
            &event(EventKind::ApprovalApproved, "approved", false),
            Some(1),
        )
        .unwrap();
        let v = json_payload(&n);
        assert_eq!(v["decision"], "approved");
        assert_eq!(v["grant_id"], "g-0123456789");
        assert_eq!(v["approvers"], json!(["bob"]));
        assert_eq!(v["expires_ms"], 1_795_439_260_000_u64);

        // A statement is carried whole, with its parameters.
        let mut ev = event(EventKind::ApprovalRequested, "pending", false);
        let fields = ev.approval.as_mut().unwrap();
        fields.asked = "statement";
        fields.grant_actions.clear();
        fields.grant_duration_secs = None;
        fields.approval_statement = Some("ALTER TABLE t ADD c int".into());
        fields.approval_parameters = vec![Some("1".into()), None];
        let v = json_payload(&Notice::of(&ev, None).unwrap());
        assert_eq!(v["statement"], "ALTER TABLE t ADD c int");
        assert_eq!(v["parameters"], json!(["1", null]));
        assert!(v.get("actions").is_none(), "{v}");
    }

    #[test]
    fn an_ssh_command_and_a_shell_are_named_as_what_they_are() {
        let mut ev = event(EventKind::ApprovalRequested, "pending", false);
        let fields = ev.approval.as_mut().unwrap();
        fields.asked = "command";
        fields.grant_actions.clear();
        fields.grant_duration_secs = None;
        fields.approval_statement = Some("sudo systemctl restart app ```<!here>```".into());
        let n = Notice::of(&ev, None).unwrap();
        assert_eq!(
            json_payload(&n)["statement"],
            "sudo systemctl restart app ```<!here>```"
        );
        let v = slack_payload(&n);
        let text = v["text"].as_str().unwrap();
        assert!(text.contains("a command on billing-db"), "{text}");
        let block = v["blocks"][2]["text"]["text"].as_str().unwrap();
        assert!(
            block.starts_with("*Command*\n```sudo systemctl restart app"),
            "{block}"
        );
        assert_eq!(block.matches("```").count(), 2, "{block}");
        assert!(
            !block.contains("Statement") && !block.contains("parameter"),
            "{block}"
        );

        ev.approval.as_mut().unwrap().approval_statement = None;
        let v = slack_payload(&Notice::of(&ev, None).unwrap());
        let text = v["text"].as_str().unwrap();
        assert!(
            text.contains("an interactive shell on billing-db"),
            "{text}"
        );
        assert!(!text.contains(" on billing-db for"), "{text}");
    }

    #[test]
    fn the_slack_payload_escapes_what_people_typed_and_marks_break_glass() {
        let n = Notice::of(&event(EventKind::ApprovalRequested, "pending", false), None).unwrap();
        let v = slack_payload(&n);
        let all = v.to_string();
        assert!(
            v["text"]
                .as_str()
                .unwrap()
                .contains("asks for connect on billing-db"),
            "{v}"
        );
        assert!(
            !all.contains("<!channel>"),
            "a reason must not mention the channel: {all}"
        );
        assert!(!all.contains("<https://evil"), "nor hide a link: {all}");
        assert!(all.contains("&lt;!channel&gt;"), "{all}");
        assert!(
            all.contains("portcullis approvals show r-0123456789"),
            "{all}"
        );
        assert!(!all.contains("BREAK-GLASS"), "{all}");
        assert_eq!(v["blocks"][0]["type"], "section");

        let n = Notice::of(
            &event(EventKind::ApprovalBreakGlass, "approved", true),
            None,
        )
        .unwrap();
        let v = slack_payload(&n);
        let text = v["text"].as_str().unwrap();
        assert!(text.starts_with(":rotating_light:"), "{text}");
        assert!(
            text.contains("BREAK-GLASS: bob@example.com approved their own request"),
            "{text}"
        );
        assert_eq!(json_payload(&n)["break_glass"], true);

        // A statement cannot close its code block early, and is cut to a readable length.
        let mut ev = event(EventKind::ApprovalRequested, "pending", false);
        let fields = ev.approval.as_mut().unwrap();
        fields.approval_statement = Some(format!("SELECT 1 ```<!here>``` {}", "x".repeat(5000)));
        fields.approval_parameters = vec![Some("secret".into())];
        let v = slack_payload(&Notice::of(&ev, None).unwrap());
        let statement = v["blocks"][2]["text"]["text"].as_str().unwrap();
        assert_eq!(statement.matches("```").count(), 2, "{statement}");
        assert!(statement.len() < 1_200, "{}", statement.len());
        assert!(
            !v.to_string().contains("secret"),
            "parameters stay out of Slack"
        );
    }

    #[test]
    fn notify_config_validation_table() {
        let parse = |text: &str| {
            crate::config::Config::parse(Path::new("/etc/portcullis/portcullis.toml"), text)
                .map(|(c, _)| c)
                .map_err(|e| e.to_string())
        };
        let cases: &[(&str, Option<&str>)] = &[
            ("[approvals]\nbreak_glass_group = \"oncall-emergency\"\n", None),
            ("[approvals]\nbreak_glass_group = \"\"\n", None),
            (
                "[approvals]\nbreak_glass_group = \" oncall\"\n",
                Some("approvals.break_glass_group: ` oncall` has spaces"),
            ),
            (
                "[[approvals.notify]]\nurl = \"https://hooks.example/a\"\n",
                None,
            ),
            (
                "[[approvals.notify]]\nformat = \"slack\"\nurl_file = \"/etc/portcullis/slack.url\"\n",
                None,
            ),
            (
                "[[approvals.notify]]\nformat = \"slack\"\nurl = \"https://hooks.slack.com/services/T/B/XXXXsecret\"\n",
                Some("approvals.notify[0].url: a Slack webhook URL is a credential"),
            ),
            (
                "[[approvals.notify]]\nformat = \"teams\"\nurl = \"https://hooks.example/a\"\n",
                Some("unknown variant `teams`"),
            ),
            (
                "[[approvals.notify]]\nname = \"x\"\n",
                Some("approvals.notify[0].url: set `url` or `url_file`"),
            ),
            (
                "[[approvals.notify]]\nurl = \"https://a.example/\"\nurl_file = \"/f\"\n",
                Some("not both"),
            ),
            (
                "[[approvals.notify]]\nurl = \"http://hooks.example/a\"\n",
                Some("approvals.notify[0].url: must use https"),
            ),
            (
                "[[approvals.notify]]\nurl = \"http://127.0.0.1:8080/a\"\n",
                Some("approvals.notify[0].url: plain http on loopback is accepted only with `insecure.allow_plaintext_loopback = true`"),
            ),
            (
                "[[approvals.notify]]\nurl = \"http://127.0.0.1:8080/a\"\n[insecure]\nallow_plaintext_loopback = true\n",
                None,
            ),
            (
                "[[approvals.notify]]\nurl = \"https://u:XXXXsecret@a.example/\"\n",
                Some("approvals.notify[0].url: holds credentials"),
            ),
            (
                "[[approvals.notify]]\nname = \"a\"\nurl = \"https://a.example/\"\n[[approvals.notify]]\nname = \"a\"\nurl = \"https://b.example/\"\n",
                Some("approvals.notify[1].name: `a` is used twice"),
            ),
            (
                "[[approvals.notify]]\nurl = \"https://a.example/\"\ntimeout_secs = 0\n",
                Some("approvals.notify[0].timeout_secs: 0 must be 1-60"),
            ),
        ];
        for (text, want) in cases {
            match (parse(text), want) {
                (Ok(_), None) => {}
                (Err(e), Some(w)) => {
                    assert!(e.contains(w), "{text}: {e}");
                    assert!(!e.contains("XXXXsecret"), "{e}");
                }
                (Ok(_), Some(w)) => panic!("{text}: accepted, wanted {w}"),
                (Err(e), None) => panic!("{text}: {e}"),
            }
        }
        let c = parse("[approvals]\nbreak_glass_group = \"\"\n").unwrap();
        assert_eq!(
            c.approvals.break_glass(),
            None,
            "empty means no break-glass"
        );
    }

    #[test]
    fn secret_files_must_be_private_and_their_contents_never_show_in_errors() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("url");
        std::fs::write(&path, "http://hooks.example/T000/B000/XXXXsecret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = NotifyConfig {
            name: Some("oncall".into()),
            format: NotifyFormat::Slack,
            url: None,
            url_file: Some(path.clone()),
            token_file: None,
            timeout_secs: 5,
        };
        let e = Endpoint::load(0, &config, false).err().unwrap().to_string();
        assert!(e.contains("make it 0600") && e.contains("oncall"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = Endpoint::load(0, &config, false).err().unwrap().to_string();
        assert!(e.contains("must use https"), "{e}");
        assert!(!e.contains("XXXXsecret"), "{e}");
        std::fs::write(&path, "http://127.0.0.1:9/T000/XXXXsecret\n").unwrap();
        let e = Endpoint::load(0, &config, false).err().unwrap().to_string();
        assert!(
            e.contains("allow_plaintext_loopback") && !e.contains("XXXXsecret"),
            "{e}"
        );
        let endpoint = Endpoint::load(0, &config, true).unwrap();
        assert!(!format!("{:?}", endpoint.url).contains("XXXXsecret"));
    }

    /// Nothing sends (the webhook's task is not running): the queue fills, and the one
    /// notification past it is dropped at once, recorded, without `notify` ever waiting.
    #[tokio::test]
    async fn a_full_queue_drops_the_new_notification_and_records_it_without_waiting() {
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(
            &crate::config::AuditConfig::default(),
            &dir.path().join("audit"),
            Vec::new(),
        )
        .unwrap();
        let audit = Arc::new(log);
        let config = ApprovalsConfig {
            break_glass_group: None,
            notify: vec![NotifyConfig {
                name: Some("stuck".into()),
                format: NotifyFormat::Slack,
                url: Some("https://hooks.example/XXXXsecret".into()),
                url_file: None,
                token_file: None,
                timeout_secs: 5,
            }],
        };
        let (notifier, _deliveries) =
            Notifier::start(&config, false, &audit, Backoff::default()).unwrap();
        let ev = event(EventKind::ApprovalDenied, "denied", false);
        let started = std::time::Instant::now();
        for _ in 0..=QUEUE {
            notifier.notify(&ev, None);
        }
        assert!(started.elapsed() < Duration::from_secs(1));
        audit.flush();
        let dropped: Vec<Value> = portcullis_audit_store::Reader::all(audit.dir())
            .unwrap()
            .map(|r| serde_json::from_str(&r.unwrap().event).unwrap())
            .filter(|e: &Value| e["event"] == "approval.notification_dropped")
            .collect();
        assert_eq!(dropped.len(), 1, "{dropped:?}");
        let reason = dropped[0]["reason"].as_str().unwrap();
        assert!(
            reason.contains("`stuck` of approval.denied") && reason.contains("queue is full"),
            "{reason}"
        );
        assert!(!dropped[0].to_string().contains("XXXXsecret"));
    }

    /// A real HTTP receiver on loopback that answers 503 to everything: the notification is
    /// tried `attempts` times, then dropped with an event that names the webhook and never
    /// its URL.
    #[tokio::test]
    async fn a_receiver_that_stays_down_gets_every_attempt_then_the_drop_is_recorded() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = Arc::clone(&hits);
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { return };
                let mut buf = vec![0u8; 65536];
                let mut got = Vec::new();
                // Headers, then the body its Content-Length announces.
                loop {
                    let n = s.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&got).to_string();
                    if let Some(end) = text.find("\r\n\r\n") {
                        let len = text
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse::<usize>().unwrap())
                            })
                            .unwrap_or(0);
                        if got.len() >= end + 4 + len {
                            break;
                        }
                    }
                }
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = s.write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let (log, _) = AuditLog::open(
            &crate::config::AuditConfig::default(),
            &dir.path().join("audit"),
            Vec::new(),
        )
        .unwrap();
        let audit = Arc::new(log);
        let config = ApprovalsConfig {
            break_glass_group: None,
            notify: vec![NotifyConfig {
                name: Some("oncall".into()),
                format: NotifyFormat::Json,
                url: Some(format!("http://127.0.0.1:{port}/hook/XXXXsecret")),
                url_file: None,
                token_file: None,
                timeout_secs: 5,
            }],
        };
        let backoff = Backoff {
            first: Duration::from_millis(20),
            max: Duration::from_millis(40),
            attempts: 3,
        };
        let (notifier, deliveries) = Notifier::start(&config, true, &audit, backoff).unwrap();
        let stop = CancellationToken::new();
        let tasks: Vec<_> = deliveries
            .into_iter()
            .map(|d| tokio::spawn(d.run(stop.clone())))
            .collect();
        notifier.notify(&event(EventKind::ApprovalRequested, "pending", false), None);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let dropped = loop {
            audit.flush();
            let events: Vec<Value> = portcullis_audit_store::Reader::all(audit.dir())
                .unwrap()
                .map(|r| serde_json::from_str(&r.unwrap().event).unwrap())
                .filter(|e: &Value| e["event"] == "approval.notification_dropped")
                .collect();
            if let Some(e) = events.first() {
                break e.clone();
            }
            assert!(std::time::Instant::now() < deadline, "no drop recorded");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 3);
        let reason = dropped["reason"].as_str().unwrap();
        assert!(
            reason.contains("notification `oncall` of approval.requested for request r-0123456789"),
            "{reason}"
        );
        assert!(
            reason.contains("3 attempts failed, the last: the webhook answered HTTP 503"),
            "{reason}"
        );
        assert!(!dropped.to_string().contains("XXXXsecret"), "{dropped}");
        assert_eq!(dropped["request_id"], "r-0123456789");
        stop.cancel();
        for t in tasks {
            t.await.unwrap();
        }
    }
}
