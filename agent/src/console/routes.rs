//! The console's requests: who may see each page and do each action, checked here on the
//! server for every request (a page that hides a button protects nothing).
//!
//! A GET without a session goes to sign-in. A POST must carry the session's CSRF token
//! (compared in constant time) and, when the browser sends one, the console's own Origin;
//! then the person's role is checked, and the action runs the code the CLI runs.

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Form, Path, Query, State as Extract};
use axum::http::header::{self, HeaderMap, HeaderValue};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;

use super::auth::{self, Auth, Callback, Roles, SignedIn, FLOW_COOKIE, SESSION_COOKIE};
use super::pages::{self, AuditQuery, ExplainQuery, ReviewQuery, SessionsQuery};
use crate::approvals::{ApprovalError, ApprovalStore, Viewer};
use crate::audit::{AuditEvent, AuditLog, EventKind};
use crate::config::ConsoleSettings;

/// Sessions a page lists at most.
const PAGE_ROWS: usize = 50;

/// The CSP: nothing but the console's own stylesheet; no script at all, inline or not; no
/// framing; forms post only here.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; style-src 'self'; img-src 'self'; \
     form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

pub struct State {
    pub settings: ConsoleSettings,
    pub auth: Auth,
    pub audit: Arc<AuditLog>,
    pub approvals: Arc<ApprovalStore>,
    /// The connections open now: the live page lists them and an admin may end one.
    pub registry: Arc<crate::admission::Registry>,
    /// The policies in force and the configured targets, for the explain form.
    pub policies: Arc<crate::policy::Policies>,
    pub targets: Arc<Vec<crate::config::ProtectedTarget>>,
    /// Where the central shipper keeps its progress, when `[audit.central]` is configured.
    pub shipped_path: Option<std::path::PathBuf>,
    /// The audit signing key, which signs review reports as `portcullis review report` does.
    pub signing_key: Option<portcullis_audit_store::SigningKey>,
    /// On the fleet console (`portcullis console`): the fleet's trail in the central store,
    /// which the sessions, audit and health pages read instead of this host's.
    pub central: Option<Arc<crate::audit::central_read::CentralTrail>>,
}

type Shared = Extract<Arc<State>>;

pub fn router(state: Arc<State>) -> Router {
    Router::new()
        .route("/", get(home))
        .route("/console.css", get(stylesheet))
        .route("/favicon.ico", get(favicon))
        .route("/signin", get(sign_in))
        .route("/auth/callback", get(callback))
        .route("/signout", post(sign_out))
        .route("/sessions", get(sessions))
        .route("/sessions/{id}", get(session))
        .route("/sessions/{id}/replay", get(replay))
        .route("/audit", get(audit))
        .route("/audit.ndjson", get(audit_export))
        .route("/approvals", get(approvals))
        .route("/approvals/{id}", post(decide))
        .route("/grants", get(grants))
        .route("/grants/{id}/revoke", post(revoke))
        .route("/health", get(health))
        .route("/live", get(live))
        .route("/explain", get(explain))
        .route("/review", get(review_form))
        .route("/review/report", get(review_report))
        .route("/live/{id}/end", post(end_connection))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(16 * 1024))
        .layer(axum::middleware::map_response(security_headers))
        .with_state(state)
}

async fn security_headers(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // The callback's URL carries the code; no page's address goes anywhere else. Not
    // `no-referrer`: under it a browser sends `Origin: null` with every form post, and the
    // Origin check below would refuse each one a person makes.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::STRICT_TRANSPORT_SECURITY,
        HeaderValue::from_static("max-age=31536000"),
    );
    response
}

/// A cookie's value from the request's `Cookie` headers.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn html(status: StatusCode, body: String) -> Response {
    (status, Html(body)).into_response()
}

fn see_other(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

impl State {
    fn session(&self, headers: &HeaderMap) -> Option<SignedIn> {
        self.auth.session(
            cookie(headers, SESSION_COOKIE).as_deref(),
            crate::audit::now_ms(),
        )
    }

    fn denied(&self, who: Option<&SignedIn>, reason: String) {
        let mut ev = AuditEvent::new(EventKind::ConsoleDenied).reason(reason);
        ev.identity = who.map(|s| s.identity.clone().into());
        self.audit.record(ev);
    }

    /// The session of a page's reader, or where they go instead: sign-in without a
    /// session, a 403 page (recorded) without the role.
    #[allow(
        clippy::result_large_err,
        reason = "the refusal is the answer, returned once per request"
    )]
    fn reader(
        &self,
        headers: &HeaderMap,
        role: fn(Roles) -> bool,
        what: &str,
    ) -> Result<SignedIn, Response> {
        let Some(who) = self.session(headers) else {
            return Err(see_other("/signin"));
        };
        if !role(who.roles) {
            self.denied(
                Some(&who),
                format!("{what}: not allowed to {}", who.roles.names()),
            );
            return Err(html(
                StatusCode::FORBIDDEN,
                pages::refusal(
                    "Not allowed",
                    Some(&who),
                    &format!("Your roles ({}) do not allow {what}.", who.roles.names()),
                ),
            ));
        }
        Ok(who)
    }

    /// The session behind a form, once its origin, CSRF token and role are checked.
    #[allow(
        clippy::result_large_err,
        reason = "the refusal is the answer, returned once per request"
    )]
    fn poster(
        &self,
        headers: &HeaderMap,
        form: &[(String, String)],
        role: fn(Roles) -> bool,
        what: &str,
    ) -> Result<SignedIn, Response> {
        let who = self.session(headers);
        let refuse = |reason: String, message: &str| {
            self.denied(who.as_ref(), format!("{what}: {reason}"));
            html(
                StatusCode::FORBIDDEN,
                pages::refusal("Refused", who.as_ref(), message),
            )
        };
        if let Some(origin) = headers.get(header::ORIGIN) {
            if origin.as_bytes() != self.settings.url.as_bytes() {
                return Err(refuse(
                    format!(
                        "a form from another origin ({})",
                        String::from_utf8_lossy(origin.as_bytes())
                    ),
                    "This form was not sent from the console.",
                ));
            }
        }
        let Some(s) = who.as_ref() else {
            return Err(refuse(
                "no session".into(),
                "You are not signed in (or your session ended); sign in again.",
            ));
        };
        let token = form
            .iter()
            .find(|(k, _)| k == "csrf")
            .map_or("", |(_, v)| v.as_str());
        if !auth::equal(token, &s.csrf) {
            return Err(refuse(
                "a form without this session's CSRF token".into(),
                "This form does not carry your session's token; reload the page and try again.",
            ));
        }
        if !role(s.roles) {
            return Err(refuse(
                format!("not allowed to {}", s.roles.names()),
                &format!("Your roles ({}) do not allow {what}.", s.roles.names()),
            ));
        }
        Ok(s.clone())
    }
}

fn field<'a>(form: &'a [(String, String)], name: &str) -> &'a str {
    form.iter()
        .find(|(k, _)| k == name)
        .map_or("", |(_, v)| v.as_str())
}

fn viewer(who: &SignedIn) -> Viewer {
    Viewer {
        uid: auth::NO_UID,
        identity: Some(who.identity.clone()),
    }
}

async fn home(Extract(state): Shared, headers: HeaderMap) -> Response {
    match state.reader(&headers, |_| true, "the console") {
        Ok(who) => html(StatusCode::OK, pages::home(&who)),
        Err(r) => r,
    }
}

async fn stylesheet() -> Response {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        pages::STYLESHEET,
    )
        .into_response()
}

/// Browsers ask for it beside every page, and log a 404 as an error on each; the console
/// has no icon to give, which a 204 says without an error.
async fn favicon() -> StatusCode {
    StatusCode::NO_CONTENT
}

async fn not_found(Extract(state): Shared, headers: HeaderMap) -> Response {
    let who = state.session(&headers);
    html(
        StatusCode::NOT_FOUND,
        pages::refusal("Not found", who.as_ref(), "There is no such page."),
    )
}

async fn sign_in(Extract(state): Shared, headers: HeaderMap) -> Response {
    if state.session(&headers).is_some() {
        return see_other("/");
    }
    match state.auth.start(crate::audit::now_ms()).await {
        Ok((url, flow)) => {
            let mut r = see_other(&url);
            // Lax, not Strict: it must come back with the issuer's redirect, a top-level
            // navigation from another site.
            if let Ok(v) = HeaderValue::from_str(&format!(
                "{FLOW_COOKIE}={flow}; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=600"
            )) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => {
            tracing::warn!(error = %e, "console: cannot start a sign-in");
            html(
                StatusCode::SERVICE_UNAVAILABLE,
                pages::refusal("Sign-in unavailable", None, &e.to_string()),
            )
        }
    }
}

async fn callback(
    Extract(state): Shared,
    headers: HeaderMap,
    Query(answer): Query<Callback>,
) -> Response {
    let flow = cookie(&headers, FLOW_COOKIE);
    let now = crate::audit::now_ms();
    let outcome = state.auth.finish(flow.as_deref(), &answer, now).await;
    let mut response = match outcome {
        Ok((id, who)) => {
            let mut ev = AuditEvent::new(EventKind::ConsoleSignin)
                .reason(format!("signed in to the console as {}", who.roles.names()));
            ev.identity = Some(who.identity.clone().into());
            state.audit.record(ev);
            let mut r = html(StatusCode::OK, pages::signed_in(&who));
            if let Ok(v) = HeaderValue::from_str(&format!(
                "{SESSION_COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
                state.settings.session_timeout_secs
            )) {
                r.headers_mut().append(header::SET_COOKIE, v);
            }
            r
        }
        Err((e, identity)) => {
            let mut ev =
                AuditEvent::new(EventKind::ConsoleDenied).reason(format!("sign-in refused: {e}"));
            ev.identity = identity.map(Into::into);
            state.audit.record(ev);
            html(
                StatusCode::FORBIDDEN,
                pages::refusal("Sign-in refused", None, &e.to_string()),
            )
        }
    };
    response.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "__Host-portcullis-signin=; Path=/; Secure; HttpOnly; SameSite=Lax; Max-Age=0",
        ),
    );
    response
}

async fn sign_out(
    Extract(state): Shared,
    headers: HeaderMap,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    if let Err(r) = state.poster(&headers, &form, |_| true, "signing out") {
        return r;
    }
    state
        .auth
        .sign_out(cookie(&headers, SESSION_COOKIE).as_deref());
    let mut r = html(
        StatusCode::OK,
        pages::page(
            "Signed out",
            None,
            r#"<p><a href="/signin">Sign in again</a></p>"#,
        ),
    );
    r.headers_mut().append(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "__Host-portcullis-console=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    r
}

async fn sessions(
    Extract(state): Shared,
    headers: HeaderMap,
    Query(mut q): Query<SessionsQuery>,
) -> Response {
    let who = match state.reader(&headers, |r| r.auditor, "reading sessions") {
        Ok(w) => w,
        Err(r) => return r,
    };
    q.fleet = state.central.is_some();
    let result = match q.filter(crate::audit::now_ms()) {
        Err(e) => Err(e),
        Ok(filter) if q.fleet => match &state.central {
            Some(c) => {
                super::fleet::sessions(c, &filter, given(&q.host), q.before, PAGE_ROWS).await
            }
            None => Err("no central store".into()),
        },
        Ok(filter) => {
            let dir = state.audit.dir().to_path_buf();
            let last = state.audit.last_seq();
            let before = q.before;
            tokio::task::spawn_blocking(move || {
                crate::audit::query::sessions_page(&dir, last, before, &filter, PAGE_ROWS)
                    .map_err(|e| format!("the audit trail cannot be read: {e}"))
            })
            .await
            .unwrap_or_else(|e| Err(format!("reading the audit trail failed: {e}")))
        }
    };
    html(StatusCode::OK, pages::sessions(&who, &q, result))
}

/// Records one audit page reads back from its start at most, and one export.
const AUDIT_PAGE_RECORDS: u64 = 20_000;
const AUDIT_EXPORT_RECORDS: u64 = 200_000;
/// Events one audit page shows at most, and one export holds.
const AUDIT_PAGE_ROWS: usize = 100;
const AUDIT_EXPORT_ROWS: usize = 100_000;

async fn search(
    state: &State,
    q: &AuditQuery,
    limit: usize,
    window: u64,
) -> Result<crate::audit::query::EventsPage, String> {
    let filter = q.filter(crate::audit::now_ms())?;
    if let Some(central) = &state.central {
        return super::fleet::search(central, &filter, given(&q.host), q.before, limit).await;
    }
    let dir = state.audit.dir().to_path_buf();
    let last = state.audit.last_seq();
    let before = q.before;
    tokio::task::spawn_blocking(move || {
        crate::audit::query::events_page(&dir, last, before, &filter, limit, window)
            .map_err(|e| format!("the audit trail cannot be read: {e}"))
    })
    .await
    .unwrap_or_else(|e| Err(format!("reading the audit trail failed: {e}")))
}

async fn audit(
    Extract(state): Shared,
    headers: HeaderMap,
    Query(mut q): Query<AuditQuery>,
) -> Response {
    let who = match state.reader(&headers, |r| r.auditor, "searching the audit trail") {
        Ok(w) => w,
        Err(r) => return r,
    };
    q.fleet = state.central.is_some();
    let result = search(&state, &q, AUDIT_PAGE_ROWS, AUDIT_PAGE_RECORDS).await;
    html(StatusCode::OK, pages::audit(&who, &q, result))
}

/// The events of a search as stored, one per line, oldest first (what `portcullis audit
/// search --json` prints); `X-Portcullis-Older` names the `before` of the export that
/// continues it.
async fn audit_export(
    Extract(state): Shared,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Response {
    let who = match state.reader(&headers, |r| r.auditor, "exporting the audit trail") {
        Ok(w) => w,
        Err(r) => return r,
    };
    match search(&state, &q, AUDIT_EXPORT_ROWS, AUDIT_EXPORT_RECORDS).await {
        Ok(found) => {
            let mut body = String::new();
            for (_, _, raw) in found.events.iter().rev() {
                body.push_str(raw);
                body.push('\n');
            }
            let mut r = (
                [
                    (header::CONTENT_TYPE, "application/x-ndjson"),
                    (
                        header::CONTENT_DISPOSITION,
                        "attachment; filename=\"portcullis-audit.ndjson\"",
                    ),
                ],
                body,
            )
                .into_response();
            if let Some(older) = found.older {
                r.headers_mut()
                    .insert("x-portcullis-older", HeaderValue::from(older));
            }
            r
        }
        Err(e) => html(
            StatusCode::BAD_REQUEST,
            pages::refusal("Export refused", Some(&who), &e),
        ),
    }
}

#[derive(serde::Deserialize)]
struct From {
    from: Option<u64>,
    /// On the fleet console: the bastion the session ran on.
    host: Option<String>,
}

/// A form or link field, `None` when empty.
fn given(s: &str) -> Option<&str> {
    Some(s.trim()).filter(|s| !s.is_empty())
}

/// Where in a recording the replay page stands: which of the session's recordings (`n`),
/// and the second of it shown (`t`).
#[derive(Debug, Default, serde::Deserialize)]
pub struct ReplayAt {
    #[serde(default)]
    pub n: usize,
    #[serde(default)]
    pub t: Option<f64>,
    /// Playing at this speed (1, 2, 4 or 8 seconds of recording a second); absent: paused.
    #[serde(default)]
    pub play: Option<u32>,
}

/// A session's terminal as it was at second `t` of its recording: the screen rebuilt on the
/// server (no script in the page), with steps back and forth and the recording's markers.
/// Read back from the audit store and verified against its chunk events, as `portcullis
/// replay` reads it; a recording that does not match them is refused.
async fn replay(
    Extract(state): Shared,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Query(at): Query<ReplayAt>,
) -> Response {
    let who = match state.reader(&headers, |r| r.auditor, "replaying sessions") {
        Ok(w) => w,
        Err(r) => return r,
    };
    if state.central.is_some() {
        return html(
            StatusCode::NOT_FOUND,
            pages::refusal(
                "Replay on the bastion",
                Some(&who),
                "Recordings stay on the bastion that made them; the central store holds their \
                 chunk hashes only. Replay this session in that bastion's console, or with \
                 `portcullis replay` there.",
            ),
        );
    }
    let dir = state.audit.dir().to_path_buf();
    let read =
        tokio::task::spawn_blocking(move || crate::audit::recording::read_back_session(&dir, id))
            .await;
    let recordings = match read {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            return html(
                StatusCode::NOT_FOUND,
                pages::refusal("No recording", Some(&who), &e.to_string()),
            )
        }
        Err(e) => {
            return html(
                StatusCode::INTERNAL_SERVER_ERROR,
                pages::refusal("Unreadable", Some(&who), &e.to_string()),
            )
        }
    };
    let names: Vec<String> = recordings.iter().map(|(rid, _)| rid.to_string()).collect();
    let Some((rid, chosen)) = recordings.into_iter().nth(at.n) else {
        return html(
            StatusCode::NOT_FOUND,
            pages::refusal(
                "No recording",
                Some(&who),
                &format!("session {id} has no recording {}", at.n),
            ),
        );
    };
    let session = match chosen {
        Ok(s) => s,
        Err(broken) => {
            return html(
                StatusCode::CONFLICT,
                pages::refusal(
                    "Recording refused",
                    Some(&who),
                    &format!("recording {rid} does not match its audit events: {broken}"),
                ),
            )
        }
    };
    let recording = match String::from_utf8(session.bytes)
        .map_err(|e| e.to_string())
        .and_then(|t| portcullis_terminal::Recording::parse(&t).map_err(|e| e.to_string()))
    {
        Ok(r) => r,
        Err(e) => {
            return html(
                StatusCode::CONFLICT,
                pages::refusal(
                    "Recording unreadable",
                    Some(&who),
                    &format!("recording {rid}: {e}"),
                ),
            )
        }
    };
    html(
        StatusCode::OK,
        pages::replay(
            &who,
            &pages::Replay {
                session: id,
                number: at.n,
                recordings: &names,
                recording: &recording,
                closed: session.closed,
                at: at.t,
                play: at.play,
            },
        ),
    )
}

async fn session(
    Extract(state): Shared,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Query(from): Query<From>,
) -> Response {
    let who = match state.reader(&headers, |r| r.auditor, "reading sessions") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let start = from.from.unwrap_or(1);
    if let Some(central) = &state.central {
        let Some(host) = from.host.as_deref().and_then(given) else {
            return html(
                StatusCode::BAD_REQUEST,
                pages::refusal(
                    "Which bastion?",
                    Some(&who),
                    "On the fleet console a session is named by its host too: open it from \
                     the sessions list or an audit search.",
                ),
            );
        };
        return match super::fleet::session(central, host, id, start).await {
            Ok((events, starts)) => {
                html(StatusCode::OK, pages::timeline(&who, id, &events, &starts))
            }
            Err(e) => html(
                StatusCode::SERVICE_UNAVAILABLE,
                pages::refusal("Unreadable", Some(&who), &e),
            ),
        };
    }
    let dir = state.audit.dir().to_path_buf();
    let asked = from.from.is_some();
    let read = tokio::task::spawn_blocking(move || {
        // Without a record to start from (a typed address, an older link), the session's id
        // says where its events begin: never a read from record 1 unless asked.
        let start = if asked {
            start
        } else {
            crate::audit::query::session_start_seq(&dir, id)?
        };
        crate::audit::query::session_events(&dir, id, start)
    })
    .await;
    match read {
        Ok(Ok((events, starts))) => {
            html(StatusCode::OK, pages::timeline(&who, id, &events, &starts))
        }
        Ok(Err(e)) => html(
            StatusCode::INTERNAL_SERVER_ERROR,
            pages::refusal(
                "Unreadable",
                Some(&who),
                &format!("the audit trail cannot be read: {e}"),
            ),
        ),
        Err(e) => html(
            StatusCode::INTERNAL_SERVER_ERROR,
            pages::refusal("Unreadable", Some(&who), &e.to_string()),
        ),
    }
}

async fn approvals(Extract(state): Shared, headers: HeaderMap) -> Response {
    let who = match state.reader(&headers, |r| r.approver, "seeing approvals") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let requests = state.approvals.requests(&viewer(&who), false);
    html(
        StatusCode::OK,
        pages::approvals(&who, &requests, state.approvals.break_glass_group(), None),
    )
}

async fn decide(
    Extract(state): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let who = match state.poster(&headers, &form, |r| r.approver, "deciding approvals") {
        Ok(w) => w,
        Err(r) => return r,
    };
    // `break_glass` is the CLI's `approve --break-glass`: the requester approving their own
    // request as a member of the emergency group, with a reason; whether they may is the
    // store's decision, as for the CLI.
    let (approve, break_glass) = match field(&form, "decision") {
        "approve" => (true, false),
        "deny" => (false, false),
        "break_glass" => (true, true),
        _ => {
            return html(
                StatusCode::BAD_REQUEST,
                pages::refusal("Refused", Some(&who), "Choose Approve or Deny."),
            )
        }
    };
    let reason = field(&form, "reason").to_string();
    // The CLI's own decision: segregation of duties, groups and quorum are the store's.
    match state
        .approvals
        .decide(&id, &who.identity, approve, reason, break_glass)
        .await
    {
        Ok(r) => {
            let notice = format!("Request {} is now {}.", r.id, r.state.as_str());
            let requests = state.approvals.requests(&viewer(&who), false);
            html(
                StatusCode::OK,
                pages::approvals(
                    &who,
                    &requests,
                    state.approvals.break_glass_group(),
                    Some(&notice),
                ),
            )
        }
        Err(e) => {
            let status = approval_status(&e);
            if status == StatusCode::FORBIDDEN {
                state.denied(Some(&who), format!("deciding request {id}: {e}"));
            }
            html(
                status,
                pages::refusal("Refused", Some(&who), &e.to_string()),
            )
        }
    }
}

fn approval_status(e: &ApprovalError) -> StatusCode {
    match e {
        ApprovalError::Ineligible(_) | ApprovalError::AlreadyVoted(_) => StatusCode::FORBIDDEN,
        ApprovalError::UnknownRequest(_) | ApprovalError::UnknownGrant(_) => StatusCode::NOT_FOUND,
        ApprovalError::AlreadyDecided { .. } | ApprovalError::GrantEnded(_) => StatusCode::CONFLICT,
        ApprovalError::Io { .. } | ApprovalError::Ownership { .. } | ApprovalError::Full => {
            StatusCode::SERVICE_UNAVAILABLE
        }
        _ => StatusCode::BAD_REQUEST,
    }
}

async fn grants(Extract(state): Shared, headers: HeaderMap) -> Response {
    let who = match state.reader(&headers, |r| r.approver, "seeing grants") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let list = state.approvals.grants(&viewer(&who), false);
    html(
        StatusCode::OK,
        pages::grants(&who, &list, crate::audit::now_ms(), None),
    )
}

async fn revoke(
    Extract(state): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let who = match state.poster(&headers, &form, |r| r.approver, "revoking grants") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let reason = field(&form, "reason").to_string();
    match state.approvals.revoke(&id, &viewer(&who), reason) {
        Ok((grant, closed)) => {
            let notice = format!(
                "Grant {} revoked; {closed} open connection(s) closed.",
                grant.id
            );
            let list = state.approvals.grants(&viewer(&who), false);
            html(
                StatusCode::OK,
                pages::grants(&who, &list, crate::audit::now_ms(), Some(&notice)),
            )
        }
        Err(e) => html(
            approval_status(&e),
            pages::refusal("Refused", Some(&who), &e.to_string()),
        ),
    }
}

/// `policy explain` in the page: the decision the policies in force give a request, the
/// policies that matched and why (the same function as the CLI's). Changes nothing.
async fn explain(
    Extract(state): Shared,
    headers: HeaderMap,
    Query(q): Query<ExplainQuery>,
) -> Response {
    let who = match state.reader(&headers, |r| r.auditor || r.admin, "explaining policy") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let names: Vec<String> = state.targets.iter().map(|t| t.name.clone()).collect();
    let result = (!q.target.is_empty()).then(|| explain_text(&state, &q));
    html(StatusCode::OK, pages::explain(&who, &q, &names, result))
}

async fn review_form(Extract(state): Shared, headers: HeaderMap) -> Response {
    let who = match state.reader(&headers, |r| r.auditor, "running access reviews") {
        Ok(w) => w,
        Err(r) => return r,
    };
    html(
        StatusCode::OK,
        pages::review(&who, &ReviewQuery::default(), None),
    )
}

/// `portcullis review report` from the page: computed by the same `review::run` over this
/// host's trail and the policies in force, sealed the same way, and sent as a download (the
/// HTML report is a page of its own, with its own CSP, not one of the console's).
/// `X-Portcullis-Verified` says whether the chain verified (an UNVERIFIED report says so
/// inside too and is not signed).
async fn review_report(
    Extract(state): Shared,
    headers: HeaderMap,
    Query(q): Query<ReviewQuery>,
) -> Response {
    let who = match state.reader(&headers, |r| r.auditor, "running access reviews") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let asked = q.clone();
    let form_error = |message: String| {
        html(
            StatusCode::BAD_REQUEST,
            pages::review(&who, &asked, Some(&message)),
        )
    };
    let period = match crate::review::period(&q.from, &q.to) {
        Ok(p) => p,
        Err(e) => return form_error(e),
    };
    let format: crate::review::Format = match q.format.as_str() {
        "" => crate::review::Format::Html,
        f => match f.parse() {
            Ok(f) => f,
            Err(e) => return form_error(e),
        },
    };
    let target = Some(q.target.trim().to_owned()).filter(|t| !t.is_empty());
    // On the fleet console: every bastion's chain from the central store, read first (the
    // computing is the same, off the async threads).
    let fleet = match &state.central {
        Some(central) => match crate::review::read_fleet(central).await {
            Ok(f) => Some(f),
            Err(e) => {
                return html(
                    StatusCode::SERVICE_UNAVAILABLE,
                    pages::refusal("Unreadable", Some(&who), &e.to_string()),
                )
            }
        },
        None => None,
    };
    let worker = Arc::clone(&state);
    let made = tokio::task::spawn_blocking(move || {
        let policies = worker.policies.current();
        let targets: Vec<portcullis_policy::Target> =
            worker.targets.iter().map(crate::policy::target).collect();
        let view = crate::review::PolicyView {
            policies: Some(&policies),
            targets: &targets,
        };
        let options = crate::review::Options {
            period,
            target: target.as_deref(),
            stale_days: 30,
            format,
        };
        match fleet {
            Some(fleet) => {
                crate::review::run_fleet(fleet, &view, &options, worker.signing_key.as_ref())
            }
            None => crate::review::run(
                worker.audit.dir(),
                &view,
                &options,
                worker.signing_key.as_ref(),
            ),
        }
    })
    .await;
    let rendered = match made {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => return form_error(e.to_string()),
        Err(e) => return form_error(e.to_string()),
    };
    let (kind, extension) = match format {
        crate::review::Format::Html => ("text/html; charset=utf-8", "html"),
        crate::review::Format::Markdown => ("text/markdown; charset=utf-8", "md"),
        crate::review::Format::Csv => ("text/csv; charset=utf-8", "csv"),
        crate::review::Format::Json => ("application/json", "json"),
    };
    let name = format!(
        "attachment; filename=\"portcullis-review-{}-{}.{extension}\"",
        q.from.trim(),
        q.to.trim()
    );
    let mut response = (StatusCode::OK, rendered.text).into_response();
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    if let Ok(v) = HeaderValue::from_str(&name) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    h.insert(
        "x-portcullis-verified",
        HeaderValue::from_static(if rendered.verified { "yes" } else { "no" }),
    );
    response
}

/// Longest SQL the explain form classifies.
const EXPLAIN_MAX_SQL: usize = 64 * 1024;

fn explain_text(state: &State, q: &ExplainQuery) -> Result<String, String> {
    if q.sql.len() > EXPLAIN_MAX_SQL {
        return Err(format!("the SQL is over {EXPLAIN_MAX_SQL} bytes"));
    }
    let target = state
        .targets
        .iter()
        .find(|t| t.name == q.target)
        .ok_or_else(|| format!("no target named `{}`", q.target))?;
    let subject = q.subject.trim();
    if subject.is_empty() {
        return Err("name the principal: a user's subject or a service's name".into());
    }
    let groups: Vec<String> = q
        .groups
        .split(',')
        .map(str::trim)
        .filter(|g| !g.is_empty())
        .map(str::to_owned)
        .collect();
    let principal = if q.kind == "service" {
        portcullis_policy::Principal {
            kind: portcullis_policy::PrincipalKind::Service,
            id: subject.to_owned(),
            email: None,
            name: Some(subject.to_owned()),
            groups,
        }
    } else {
        portcullis_policy::Principal {
            kind: portcullis_policy::PrincipalKind::User,
            id: subject.to_owned(),
            email: Some(q.email.trim().to_owned()).filter(|e| !e.is_empty()),
            name: None,
            groups,
        }
    };
    let uid = match q.uid.trim() {
        "" => 1000,
        u => u
            .parse()
            .map_err(|_| format!("uid `{u}` is not a number"))?,
    };
    let now = i64::try_from(crate::audit::now_ms() / 1000).unwrap_or(0);
    crate::policy::explain(
        &state.policies.current(),
        target,
        crate::policy::ExplainInput {
            principal: Some(principal),
            action: if q.action.is_empty() {
                "connect".into()
            } else {
                q.action.clone()
            },
            comm: if q.comm.trim().is_empty() {
                "psql".into()
            } else {
                q.comm.trim().to_owned()
            },
            uid,
            time: now,
            sql: Some(q.sql.clone()).filter(|s| !s.trim().is_empty()),
            ..Default::default()
        },
    )
}

async fn live(Extract(state): Shared, headers: HeaderMap) -> Response {
    let who = match state.reader(&headers, |r| r.admin, "seeing open connections") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let mut open = state.registry.views(None);
    open.sort_by_key(|c| c.started_ms);
    let notice = state.central.is_some().then_some(
        "This is the fleet console: it proxies nothing, so nothing is open here. Sessions still \
         open on the bastions show as open in Sessions; an admin ends one in its bastion's console.",
    );
    html(StatusCode::OK, pages::live(&who, &open, notice))
}

/// An admin ends one open connection, with a reason: the connection closes with
/// `connection.closed` naming them, and `console.session_ended` records the act.
async fn end_connection(
    Extract(state): Shared,
    headers: HeaderMap,
    Path(id): Path<String>,
    Form(form): Form<Vec<(String, String)>>,
) -> Response {
    let who = match state.poster(&headers, &form, |r| r.admin, "ending a connection") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let reason = field(&form, "reason").trim().to_string();
    let refused =
        |status, message: &str| html(status, pages::refusal("Refused", Some(&who), message));
    if reason.is_empty() {
        return refused(
            StatusCode::BAD_REQUEST,
            "A reason is required to end a connection.",
        );
    }
    if reason.len() > 1000 {
        return refused(StatusCode::BAD_REQUEST, "A reason is at most 1000 bytes.");
    }
    let Ok(conn_id) = id.parse::<u64>() else {
        return refused(StatusCode::NOT_FOUND, "No such open connection.");
    };
    let admin = crate::approvals::who(&who.identity);
    let Some(ended) = state.registry.close_one(
        conn_id,
        &format!("ended by {admin} from the console: {reason}"),
    ) else {
        return refused(
            StatusCode::NOT_FOUND,
            "No such open connection (it may have ended already).",
        );
    };
    let mut ev = AuditEvent::new(EventKind::ConsoleSessionEnded).reason(reason);
    ev.identity = Some(who.identity.clone().into());
    ev.connection_id = Some(ended.id);
    ev.target = Some(ended.target.as_str().into());
    ev.protocol = Some(ended.protocol.as_str().into());
    state.audit.record(ev);
    let notice = format!(
        "Connection {} of {} to {} ended.",
        ended.id,
        ended.subject.as_deref().unwrap_or("uid"),
        ended.target
    );
    let mut open = state.registry.views(None);
    open.retain(|c| c.id != ended.id);
    open.sort_by_key(|c| c.started_ms);
    html(StatusCode::OK, pages::live(&who, &open, Some(&notice)))
}

async fn health(Extract(state): Shared, headers: HeaderMap) -> Response {
    let who = match state.reader(&headers, |r| r.admin, "seeing health") {
        Ok(w) => w,
        Err(r) => return r,
    };
    let everyone = Viewer {
        uid: 0,
        identity: None,
    };
    let h = pages::Health {
        last_seq: state.audit.last_seq(),
        audit_failure: state
            .audit
            .write_failure()
            .map(|f| format!("{} ({} events lost)", f.error, f.lost_events)),
        pending_requests: state.approvals.requests(&everyone, false).len(),
        signed_in: state.auth.signed_in(),
        policies: state.policies.status(),
        central: state.shipped_path.as_deref().map(|path| {
            let last = state.audit.last_seq();
            let spool = state.audit.spool();
            match crate::audit::central::read_progress(path) {
                Ok(shipped) => pages::CentralHealth {
                    shipped_upto: Some(shipped),
                    behind: last.saturating_sub(shipped),
                    over_bound: spool.over_bound(),
                    refusing: spool.refusing(),
                    error: None,
                },
                Err(e) => pages::CentralHealth {
                    shipped_upto: None,
                    behind: 0,
                    over_bound: spool.over_bound(),
                    refusing: spool.refusing(),
                    error: Some(e.to_string()),
                },
            }
        }),
        fleet: match &state.central {
            Some(c) => Some(c.hosts().await.map_err(|e| {
                format!(
                    "the central audit store cannot be read: {}",
                    crate::audit::with_sources(&e)
                )
            })),
            None => None,
        },
    };
    html(StatusCode::OK, pages::health(&who, &h))
}
