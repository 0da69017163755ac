//! The console's HTML, rendered on the server. Every value that comes from outside the
//! code (identities, statements, reasons, target names, URLs of filters) goes through
//! [`esc`]: people choose their names and statements, and a page is read by approvers.
//! No inline script or style: the CSP forbids both, and the stylesheet is `/console.css`.

use std::fmt::Write as _;

use serde_json::Value;

use super::auth::{Roles, SignedIn};
use crate::approvals::{ApprovalRequest, Asked, Grant};
use crate::audit::query::{self, EventsPage, Filter, SessionFilter, SessionsPage};

pub const STYLESHEET: &str = "\
body{font-family:system-ui,sans-serif;margin:0;color:#111;background:#fff}\
header{background:#1d2b3a;color:#fff;padding:.6rem 1rem;display:flex;gap:1rem;align-items:center}\
header a{color:#fff}header nav{display:flex;gap:1rem}header form{margin-left:auto}\
main{padding:1rem}table{border-collapse:collapse;width:100%}\
th,td{border-bottom:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}\
pre{white-space:pre-wrap;word-break:break-word;background:#f4f4f4;padding:.5rem}\
.error{color:#8b0000;font-weight:bold}label{margin-right:.6rem}\
button{padding:.3rem .8rem}:focus{outline:3px solid #1a5fb4}\
";

/// HTML-escapes text for element content and quoted attribute values, with control and
/// bidi characters shown as `[U+XXXX]` so a hostile name cannot reorder the page around it:
/// the access review's escaping, one function for every page the agent writes.
pub fn esc(text: &str) -> String {
    crate::review::html::escape(text)
}

/// Percent-encodes a query parameter's value (RFC 3986 unreserved characters pass).
pub fn query_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// A whole page: the navigation the person's roles allow, a sign-out form, the body.
pub fn page(title: &str, who: Option<&SignedIn>, body: &str) -> String {
    let mut nav = String::new();
    if let Some(s) = who {
        let Roles {
            auditor,
            approver,
            admin,
        } = s.roles;
        if auditor {
            nav.push_str(r#"<a href="/sessions">Sessions</a><a href="/audit">Audit</a>"#);
        }
        if approver {
            nav.push_str(r#"<a href="/approvals">Approvals</a><a href="/grants">Grants</a>"#);
        }
        if auditor {
            nav.push_str(r#"<a href="/review">Review</a>"#);
        }
        if auditor || admin {
            nav.push_str(r#"<a href="/explain">Explain</a>"#);
        }
        if admin {
            nav.push_str(r#"<a href="/live">Live</a><a href="/health">Health</a>"#);
        }
        // A landmark of its own, so a screen reader lists the console's sections apart
        // from the page's content.
        if !nav.is_empty() {
            nav = format!(r#"<nav aria-label="Console">{nav}</nav>"#);
        }
        let _ = write!(
            nav,
            r#"<form method="post" action="/signout"><input type="hidden" name="csrf" value="{}"><span>{} ({})</span> <button type="submit">Sign out</button></form>"#,
            esc(&s.csrf),
            esc(&crate::approvals::who(&s.identity)),
            esc(&s.roles.names()),
        );
    }
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title} · Portcullis</title><link rel=\"stylesheet\" href=\"/console.css\"></head>\
         <body><header><strong>Portcullis</strong>{nav}</header><main><h1>{title}</h1>{body}</main></body></html>\n",
        title = esc(title),
    )
}

/// A page that says why something was refused, and nothing else.
pub fn refusal(title: &str, who: Option<&SignedIn>, message: &str) -> String {
    page(
        title,
        who,
        &format!(r#"<p class="error" role="alert">{}</p>"#, esc(message)),
    )
}

pub fn home(who: &SignedIn) -> String {
    page(
        "Console",
        Some(who),
        &format!(
            "<p>Signed in as {} with the roles {}. Your session ends at {} UTC.</p>",
            esc(&crate::approvals::who(&who.identity)),
            esc(&who.roles.names()),
            esc(&query::format_time(who.expires_ms)),
        ),
    )
}

/// The filters as the form shows them and as links carry them.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct SessionsQuery {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub protocol: String,
    #[serde(default)]
    pub since: String,
    #[serde(default)]
    pub until: String,
    #[serde(default)]
    pub decision: String,
    /// A fleet console's host filter (the bastion's `audit.central.host_name`).
    #[serde(default)]
    pub host: String,
    /// Where the page's records are: record seqs on one host, Unix ms on a fleet.
    pub before: Option<u64>,
    /// Set by the fleet console: the form offers the host filter and links carry it.
    #[serde(skip)]
    pub fleet: bool,
}

/// A form field as a filter: `None` when left empty.
fn given(s: &str) -> Option<String> {
    Some(s.trim().to_string()).filter(|s| !s.is_empty())
}

/// A time field (`2026-12-05`, `2h`, …) as Unix ms, or which field cannot be read.
fn given_time(name: &str, s: &str, now_ms: u64) -> Result<Option<u64>, String> {
    given(s)
        .map(|t| query::parse_time(&t, now_ms).map_err(|e| format!("{name}: {e}")))
        .transpose()
}

impl SessionsQuery {
    /// The audit filter, or which field cannot be read.
    pub fn filter(&self, now_ms: u64) -> Result<SessionFilter, String> {
        let text = given;
        let time = |name: &str, s: &str| given_time(name, s, now_ms);
        let protocol = text(&self.protocol);
        if protocol
            .as_deref()
            .is_some_and(|p| !matches!(p, "postgres" | "tcp" | "ssh"))
        {
            return Err("protocol: postgres, tcp or ssh".into());
        }
        let decision = text(&self.decision);
        if decision
            .as_deref()
            .is_some_and(|d| !matches!(d, "allow" | "deny" | "approval"))
        {
            return Err("decision: allow, deny or approval".into());
        }
        Ok(SessionFilter {
            user: text(&self.user),
            target: text(&self.target),
            protocol,
            since_ms: time("since", &self.since)?,
            until_ms: time("until", &self.until)?,
            decision,
        })
    }

    fn link(&self, before: u64) -> String {
        format!(
            "/sessions?user={}&target={}&protocol={}&since={}&until={}&decision={}&host={}&before={before}",
            query_value(&self.user),
            query_value(&self.target),
            query_value(&self.protocol),
            query_value(&self.since),
            query_value(&self.until),
            query_value(&self.decision),
            query_value(&self.host),
        )
    }
}

fn select(name: &str, label: &str, current: &str, options: &[&str]) -> String {
    let mut out = format!(
        r#"<label for="{name}">{label}</label><select id="{name}" name="{name}"><option value="">any</option>"#
    );
    for o in options {
        let selected = if *o == current { " selected" } else { "" };
        let _ = write!(out, r#"<option value="{o}"{selected}>{o}</option>"#);
    }
    out.push_str("</select>");
    out
}

fn text_input(name: &str, label: &str, value: &str, hint: &str) -> String {
    format!(
        r#"<label for="{name}">{label}</label><input id="{name}" name="{name}" value="{}" placeholder="{hint}">"#,
        esc(value)
    )
}

pub fn sessions(who: &SignedIn, q: &SessionsQuery, result: Result<SessionsPage, String>) -> String {
    let mut body = String::from(r#"<form method="get" action="/sessions" role="search">"#);
    body.push_str(&text_input(
        "user",
        "User",
        &q.user,
        "name, uid, subject or email",
    ));
    body.push_str(&text_input("target", "Target", &q.target, "target name"));
    body.push_str(&select(
        "protocol",
        "Protocol",
        &q.protocol,
        &["postgres", "tcp", "ssh"],
    ));
    body.push_str(&text_input(
        "since",
        "Since",
        &q.since,
        "2h, 7d, 2026-01-31",
    ));
    body.push_str(&text_input(
        "until",
        "Until",
        &q.until,
        "30m, 2026-02-01T12:00",
    ));
    body.push_str(&select(
        "decision",
        "Decision",
        &q.decision,
        &["allow", "deny", "approval"],
    ));
    if q.fleet {
        body.push_str(&text_input("host", "Host", &q.host, "bastion name"));
    }
    body.push_str(r#" <button type="submit">Filter</button></form>"#);
    let page_of = match result {
        Ok(p) => p,
        Err(e) => {
            let _ = write!(body, r#"<p class="error" role="alert">{}</p>"#, esc(&e));
            return page("Sessions", Some(who), &body);
        }
    };
    if q.fleet {
        let _ = write!(
            body,
            "<p>{} sessions of the fleet's central audit store, newest first.</p>",
            page_of.rows.len(),
        );
    } else {
        let _ = write!(
            body,
            "<p>{} sessions opened in records {} to {} of the audit trail.</p>",
            page_of.rows.len(),
            page_of.scanned.0,
            page_of.scanned.1
        );
    }
    body.push_str(
        "<table><thead><tr><th scope=\"col\">Session</th><th scope=\"col\">Opened (UTC)</th>\
         <th scope=\"col\">User</th><th scope=\"col\">Identity</th><th scope=\"col\">Process</th>\
         <th scope=\"col\">Target</th><th scope=\"col\">Protocol</th><th scope=\"col\">End</th></tr></thead><tbody>",
    );
    for row in &page_of.rows {
        let o = &row.opened;
        let s = |path: &str| {
            o.pointer(path)
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                .unwrap_or_else(|| "-".into())
        };
        let id = o.get("connection_id").and_then(Value::as_u64).unwrap_or(0);
        let who = match s("/identity/email") {
            e if e != "-" => e,
            _ => s("/identity/subject"),
        };
        let on_host = esc(&host_param(row.host.as_deref()));
        let _ = write!(
            body,
            r#"<tr><td><a href="/sessions/{id}?from={seq}{on_host}">{id}</a></td><td>{time}</td><td>{user}</td><td>{who}</td><td>{comm} (pid {pid})</td><td>{target}</td><td>{protocol}</td><td>{end}</td></tr>"#,
            seq = row.seq,
            time = esc(&query::format_time(
                o.get("time_ms").and_then(Value::as_u64).unwrap_or(0)
            )),
            user = esc(&s("/identity/user")),
            who = esc(&who),
            comm = esc(&s("/origin/comm")),
            pid = esc(&s("/origin/pid")),
            target = esc(&s("/target")),
            protocol = esc(&s("/protocol")),
            end = esc(&row.end),
        );
    }
    body.push_str("</tbody></table>");
    if let Some(before) = page_of.older {
        let _ = write!(
            body,
            r#"<p><a href="{}" rel="next">Older sessions</a></p>"#,
            esc(&q.link(before))
        );
    }
    page("Sessions", Some(who), &body)
}

/// On a fleet, a session is named by its bastion too: the link's `&host=` parameter.
fn host_param(host: Option<&str>) -> String {
    host.map(|h| format!("&host={}", query_value(h)))
        .unwrap_or_default()
}

/// One session's timeline: what `portcullis sessions show` prints, line for line.
pub fn timeline(who: &SignedIn, id: u64, events: &[Value], starts: &[u64]) -> String {
    let mut text = String::new();
    let mut opened = None;
    let mut closed = None;
    for e in events {
        match e.get("event").and_then(Value::as_str) {
            Some("connection.opened") => opened = e.get("time_ms").and_then(Value::as_u64),
            Some("connection.closed") => closed = Some(e),
            _ => {}
        }
        text.push_str(&query::summary(e));
        text.push('\n');
        for line in query::details(e) {
            text.push_str(&line);
            text.push('\n');
        }
    }
    if let Some(opened) = opened {
        let _ = writeln!(text, "end: {}", query::session_end(opened, closed, starts));
    }
    let recorded = events.iter().any(|e| {
        e.get("event")
            .and_then(Value::as_str)
            .is_some_and(|k| k.starts_with("recording."))
    });
    let mut body = if events.is_empty() {
        format!(
            r#"<p class="error" role="alert">No events of session {id} from that point of the audit trail.</p><p><a href="/sessions/{id}?from=1">Read the whole trail for it</a> (slow on a long trail).</p>"#
        )
    } else if recorded {
        format!(
            r#"<p><a href="/sessions/{id}/replay">Replay its terminal</a></p><pre>{}</pre>"#,
            esc(&text)
        )
    } else {
        format!("<pre>{}</pre>", esc(&text))
    };
    body.push_str(&file_operations(&query::file_operations(events)));
    page(&format!("Session {id}"), Some(who), &body)
}

/// A session's SFTP (and scp) operations as a table of their own: what was read or written
/// where, the server's answer, and the SHA-256 of the bytes that went through.
fn file_operations(ops: &[query::FileOperation]) -> String {
    if ops.is_empty() {
        return String::new();
    }
    let mut out = String::from(
        "<section aria-labelledby=\"files\"><h2 id=\"files\">File operations</h2><table><thead><tr>\
         <th scope=\"col\">Time (UTC)</th><th scope=\"col\">Operation</th><th scope=\"col\">Path</th>\
         <th scope=\"col\">Result</th><th scope=\"col\">Read</th><th scope=\"col\">Written</th></tr></thead><tbody>",
    );
    let sized = |s: &Option<(u64, Option<String>)>| match s {
        Some((n, Some(h))) => format!("{n} bytes<br><code>sha256 {}</code>", esc(h)),
        Some((n, None)) => format!("{n} bytes"),
        None => "-".into(),
    };
    for op in ops {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}{}</td><td>{}</td><td>{}{}</td><td>{}</td><td>{}</td></tr>",
            esc(&query::format_time(op.time_ms)),
            esc(&op.operation),
            op.flags
                .as_deref()
                .map(|f| format!(" ({})", esc(f)))
                .unwrap_or_default(),
            esc(&op.path),
            esc(&op.status),
            op.note
                .as_deref()
                .map(|n| format!("; {}", esc(n)))
                .unwrap_or_default(),
            sized(&op.read),
            sized(&op.written),
        );
    }
    out.push_str("</tbody></table></section>");
    out
}

/// What the replay page shows.
pub struct Replay<'a> {
    pub session: u64,
    /// Which of the session's recordings, and all of their names (`42.0`, `42.1`).
    pub number: usize,
    pub recordings: &'a [String],
    pub recording: &'a portcullis_terminal::Recording,
    pub closed: bool,
    /// The second shown; `None`: the end.
    pub at: Option<f64>,
    /// Playing at this speed; anything but [`REPLAY_SPEEDS`] is paused.
    pub play: Option<u32>,
}

/// The speeds a replay plays at: seconds of recording per second.
pub const REPLAY_SPEEDS: [u32; 4] = [1, 2, 4, 8];

/// The terminal at a second of its recording, rebuilt on the server, with links to step
/// through it: the page needs no script, so the console's CSP stays `script-src` none.
pub fn replay(who: &SignedIn, r: &Replay<'_>) -> String {
    use portcullis_terminal::asciicast::EventKind as Cast;
    let rec = r.recording;
    let end = rec.events.last().map_or(0.0, |e| e.time);
    let at =
        r.at.filter(|t| t.is_finite())
            .unwrap_or(end)
            .clamp(0.0, end);
    // A client that sent no window size (`ssh -tt` with no terminal) gives 0×0: shown at
    // the size a terminal assumes then, not in a one-cell screen.
    let sized = |columns: u16, rows: u16| {
        (
            if columns == 0 { 80 } else { columns },
            if rows == 0 { 24 } else { rows },
        )
    };
    let (width, height) = sized(rec.header.width, rec.header.height);
    let mut screen = portcullis_terminal::screen::Screen::new(width, height);
    for e in rec.events.iter().take_while(|e| e.time <= at) {
        match &e.kind {
            Cast::Output(text) => screen.feed(text.as_bytes()),
            Cast::Resize { columns, rows } => {
                // Rebuilt at the new size from what it showed: the text is what matters.
                let shown = screen.text();
                let (columns, rows) = sized(*columns, *rows);
                screen = portcullis_terminal::screen::Screen::new(columns, rows);
                screen.feed(shown.replace('\n', "\r\n").as_bytes());
            }
            _ => {}
        }
    }
    // A second in a link: tenths, but the end exactly (shortest form that reads back
    // equal), or a link to the end would stop short of its last output and a replay
    // playing to it would never arrive.
    let second = |t: f64| {
        let t = t.clamp(0.0, end);
        if t >= end {
            format!("{end}")
        } else {
            format!("{t:.1}")
        }
    };
    let link = |t: f64, label: &str| {
        format!(
            r#"<a href="/sessions/{}/replay?n={}&amp;t={}">{label}</a>"#,
            r.session,
            r.number,
            second(t)
        )
    };
    let mut body = String::new();
    if r.recordings.len() > 1 {
        body.push_str("<p>Recordings of this session: ");
        for (i, name) in r.recordings.iter().enumerate() {
            let _ = write!(
                body,
                r#"<a href="/sessions/{}/replay?n={i}">{}</a> "#,
                r.session,
                esc(name)
            );
        }
        body.push_str("</p>");
    }
    let what = match (&rec.header.command, &rec.header.title) {
        (Some(c), _) => format!("command <code>{}</code>", esc(c)),
        (None, Some(t)) => format!("shell, {}", esc(t)),
        (None, None) => "login shell".into(),
    };
    let _ = write!(
        body,
        r#"<p>Recording {} of session <a href="/sessions/{}">{}</a> ({what}, {}×{}): at {at:.1} s of {end:.1} s{}.</p>"#,
        esc(r.recordings.get(r.number).map_or("?", String::as_str)),
        r.session,
        r.session,
        width,
        height,
        if r.closed {
            ""
        } else {
            "; still running, or the agent stopped before it ended"
        },
    );
    // Playing is the page asking the browser to load the next second of it (a meta refresh,
    // no script): the CSP stays without script, and Pause is a plain link to this frame.
    let speed = r.play.filter(|s| REPLAY_SPEEDS.contains(s));
    let playing = speed.filter(|_| at < end);
    let mut controls = String::new();
    if playing.is_some() {
        let _ = write!(
            controls,
            r#"<a href="/sessions/{}/replay?n={}&amp;t={at:.1}">Pause</a>"#,
            r.session, r.number
        );
    }
    for s in REPLAY_SPEEDS {
        if playing == Some(s) {
            let _ = write!(controls, " <strong>playing at {s}×</strong>");
        } else {
            let from = if at < end { at } else { 0.0 };
            let _ = write!(
                controls,
                r#" <a href="/sessions/{}/replay?n={}&amp;t={from:.1}&amp;play={s}">Play at {s}×</a>"#,
                r.session, r.number
            );
        }
    }
    let _ = write!(
        body,
        r#"<nav aria-label="Play">{controls}</nav><nav aria-label="Replay">{} {} {} {} {} {}</nav>"#,
        link(0.0, "Start"),
        link(at - 10.0, "−10 s"),
        link(at - 1.0, "−1 s"),
        link(at + 1.0, "+1 s"),
        link(at + 10.0, "+10 s"),
        link(end, "End"),
    );
    let _ = write!(
        body,
        r#"<pre class="screen" aria-label="The terminal at {at:.1} s">{}</pre>"#,
        esc(&screen.text())
    );
    let markers: Vec<(f64, &str)> = rec.markers().collect();
    if !markers.is_empty() {
        body.push_str("<h2>Markers</h2><ul>");
        for (t, label) in markers {
            let _ = write!(
                body,
                "<li>{} {}</li>",
                link(t, &format!("{t:.1} s")),
                esc(label)
            );
        }
        body.push_str("</ul>");
    }
    let html = page(
        &format!("Replay of session {}", r.session),
        Some(who),
        &body,
    );
    match playing {
        Some(s) => html.replacen(
            "<meta charset=\"utf-8\">",
            &format!(
                "<meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"1; url=/sessions/{}/replay?n={}&amp;t={}&amp;play={s}\">",
                r.session,
                r.number,
                second(at + f64::from(s))
            ),
            1,
        ),
        None => html,
    }
}

fn asked(r: &ApprovalRequest) -> String {
    match &r.asked {
        Asked::Statement {
            target,
            statement,
            parameters,
            connection_id,
        } => {
            let mut out = format!(
                "statement on <strong>{}</strong> (session {connection_id}):<pre>{}</pre>",
                esc(target),
                esc(statement)
            );
            if !parameters.is_empty() {
                let shown: Vec<String> = parameters
                    .iter()
                    .map(|p| {
                        p.as_deref()
                            .map_or_else(|| "NULL".into(), |v| format!("'{v}'"))
                    })
                    .collect();
                let _ = write!(out, "parameters: <pre>{}</pre>", esc(&shown.join(", ")));
            }
            out
        }
        Asked::Command {
            target,
            ssh_user,
            command,
            connection_id,
        } => format!(
            "{} on <strong>{}</strong> as {} (session {connection_id})",
            match command {
                Some(c) => format!("the command<pre>{}</pre>", esc(c)),
                None => "a shell".into(),
            },
            esc(target),
            esc(ssh_user),
        ),
        Asked::Grant { .. } => esc(&r.asked.describe()),
    }
}

/// What the person may do with a request: approve or deny it with a reason; on their own
/// request, break the glass when they are in the emergency group (`break_glass_group`),
/// else nothing. The page only offers: `decide` checks each of these again.
fn decision_form(who: &SignedIn, r: &ApprovalRequest, break_glass_group: Option<&str>) -> String {
    use crate::approvals::duties::person;
    let id = esc(&r.id);
    let csrf = esc(&who.csrf);
    let own = person(&r.requester).is_some() && person(&r.requester) == person(&who.identity);
    if !own {
        return format!(
            r#"<form method="post" action="/approvals/{id}"><input type="hidden" name="csrf" value="{csrf}">
<label for="reason-{id}">Your reason</label><input id="reason-{id}" name="reason" required maxlength="1000">
<button type="submit" name="decision" value="approve">Approve</button>
<button type="submit" name="decision" value="deny">Deny</button></form>"#
        );
    }
    match break_glass_group {
        Some(group) if who.identity.groups.iter().any(|g| g == group) => format!(
            r#"<p>This is your own request: another approver decides it, or, in an emergency, you break the glass as a member of {group}. Breaking the glass approves it at once, alerts and is audited (<code>approval.break_glass</code>).</p>
<form method="post" action="/approvals/{id}"><input type="hidden" name="csrf" value="{csrf}">
<label for="reason-{id}">Why it cannot wait</label><input id="reason-{id}" name="reason" required maxlength="1000">
<button type="submit" name="decision" value="break_glass">Break the glass</button></form>"#,
            group = esc(group),
        ),
        _ => "<p>This is your own request: another approver decides it.</p>".into(),
    }
}

/// Pending requests the person may see, each with what they may do with it.
pub fn approvals(
    who: &SignedIn,
    requests: &[ApprovalRequest],
    break_glass_group: Option<&str>,
    notice: Option<&str>,
) -> String {
    let mut body = String::new();
    if let Some(n) = notice {
        let _ = write!(body, r#"<p role="status">{}</p>"#, esc(n));
    }
    if requests.is_empty() {
        body.push_str("<p>No pending requests that you may see.</p>");
    }
    for r in requests {
        let required: Vec<String> = r
            .required
            .iter()
            .map(|q| format!("{} of {}", q.approvals, q.group))
            .collect();
        let _ = write!(
            body,
            r#"<section aria-labelledby="r-{id}"><h2 id="r-{id}">Request {id}</h2>
<p>{requester} asks for {asked}</p><p>Reason: {reason}</p>
<p>Needs: {required}; approved so far by: {counted}. Expires {expires} UTC.</p>
{form}</section>"#,
            id = esc(&r.id),
            requester = esc(&crate::approvals::who(&r.requester)),
            asked = asked(r),
            reason = esc(&r.reason),
            required = esc(&required.join(" and ")),
            counted = esc(&{
                let c = r.counted();
                if c.is_empty() {
                    "nobody".to_string()
                } else {
                    c.join(", ")
                }
            }),
            expires = esc(&query::format_time(r.expires_ms)),
            form = decision_form(who, r, break_glass_group),
        );
    }
    page("Pending approvals", Some(who), &body)
}

pub fn grants(who: &SignedIn, grants: &[Grant], now_ms: u64, notice: Option<&str>) -> String {
    let mut body = String::new();
    if let Some(n) = notice {
        let _ = write!(body, r#"<p role="status">{}</p>"#, esc(n));
    }
    if grants.is_empty() {
        body.push_str("<p>No active grants that you may see.</p>");
    }
    body.push_str(
        "<table><thead><tr><th scope=\"col\">Grant</th><th scope=\"col\">Holder</th>\
         <th scope=\"col\">Target</th><th scope=\"col\">Actions</th><th scope=\"col\">Approved by</th>\
         <th scope=\"col\">Expires (UTC)</th><th scope=\"col\">Revoke</th></tr></thead><tbody>",
    );
    for g in grants {
        let revoke = if g.is_active(now_ms) {
            format!(
                r#"<form method="post" action="/grants/{id}/revoke"><input type="hidden" name="csrf" value="{csrf}"><label for="why-{id}">Reason</label><input id="why-{id}" name="reason" required maxlength="1000"> <button type="submit">Revoke</button></form>"#,
                id = esc(&g.id),
                csrf = esc(&who.csrf)
            )
        } else {
            "ended".into()
        };
        let _ = write!(
            body,
            "<tr><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{revoke}</td></tr>",
            esc(&g.id),
            if g.break_glass { " (break-glass)" } else { "" },
            esc(&crate::approvals::who(&g.requester)),
            esc(&g.target),
            esc(&g.actions.join(", ")),
            esc(&g.approvers.join(", ")),
            esc(&query::format_time(g.expires_ms)),
        );
    }
    body.push_str("</tbody></table>");
    page("Grants", Some(who), &body)
}

/// The access review form's fields (`portcullis review report`'s).
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct ReviewQuery {
    #[serde(default)]
    pub from: String,
    #[serde(default)]
    pub to: String,
    #[serde(default)]
    pub target: String,
    /// html (default), md, csv or json.
    #[serde(default)]
    pub format: String,
}

/// The access review form: the report is a download (docs/access-reviews.md).
pub fn review(who: &SignedIn, q: &ReviewQuery, error: Option<&str>) -> String {
    let mut body = String::new();
    if let Some(e) = error {
        let _ = write!(body, r#"<p class="error" role="alert">{}</p>"#, esc(e));
    }
    body.push_str(
        "<p>The report of <code>portcullis review report</code> over this host's audit trail \
         and the policies in force: who reached what, what they ran, approvals, masked reads, \
         replayable sessions and least-privilege findings, each figure with its evidence, \
         sealed to the verified chain.</p>",
    );
    body.push_str(r#"<form method="get" action="/review/report">"#);
    body.push_str(&text_input("from", "From", &q.from, "2026-10-01"));
    body.push_str(&text_input("to", "To", &q.to, "2026-12-31"));
    body.push_str(&text_input("target", "Target", &q.target, "all"));
    body.push_str(r#"<label for="format">Format</label><select id="format" name="format">"#);
    for (value, label) in [
        ("html", "HTML"),
        ("md", "Markdown"),
        ("csv", "CSV"),
        ("json", "JSON"),
    ] {
        let selected = if q.format == value { " selected" } else { "" };
        let _ = write!(
            body,
            r#"<option value="{value}"{selected}>{label}</option>"#
        );
    }
    body.push_str(r#"</select> <button type="submit">Download the report</button></form>"#);
    page("Access review", Some(who), &body)
}

/// The explain form's fields (`portcullis policy explain`'s, the common ones).
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct ExplainQuery {
    #[serde(default)]
    pub target: String,
    /// `user` (default) or `service`.
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub subject: String,
    #[serde(default)]
    pub email: String,
    /// Comma-separated.
    #[serde(default)]
    pub groups: String,
    #[serde(default)]
    pub action: String,
    #[serde(default)]
    pub comm: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub sql: String,
}

/// The explain form, and the explanation when one was asked for.
pub fn explain(
    who: &SignedIn,
    q: &ExplainQuery,
    targets: &[String],
    result: Option<Result<String, String>>,
) -> String {
    let mut body = String::from(r#"<form method="get" action="/explain">"#);
    body.push_str(r#"<label for="target">Target</label><select id="target" name="target">"#);
    for t in targets {
        let selected = if *t == q.target { " selected" } else { "" };
        let _ = write!(
            body,
            r#"<option value="{v}"{selected}>{v}</option>"#,
            v = esc(t)
        );
    }
    body.push_str("</select>");
    body.push_str(r#"<label for="kind">Principal</label><select id="kind" name="kind">"#);
    for (value, label) in [("user", "user"), ("service", "service")] {
        let selected = if q.kind == value { " selected" } else { "" };
        let _ = write!(
            body,
            r#"<option value="{value}"{selected}>{label}</option>"#
        );
    }
    body.push_str("</select>");
    body.push_str(&text_input(
        "subject",
        "Subject",
        &q.subject,
        "OIDC subject or service name",
    ));
    body.push_str(&text_input("email", "Email", &q.email, "optional"));
    body.push_str(&text_input(
        "groups",
        "Groups",
        &q.groups,
        "dba-leads, security",
    ));
    body.push_str(r#"<label for="action">Action</label><select id="action" name="action">"#);
    for a in portcullis_policy::Action::ALL {
        let name = a.cedar_name();
        let selected = if q.action == name { " selected" } else { "" };
        let _ = write!(body, r#"<option value="{name}"{selected}>{name}</option>"#);
    }
    body.push_str("</select>");
    body.push_str(&text_input("comm", "Program", &q.comm, "psql"));
    body.push_str(&text_input("uid", "Unix uid", &q.uid, "1000"));
    let _ = write!(
        body,
        r#"<label for="sql">SQL (classified as the proxy does; implies query)</label><textarea id="sql" name="sql" rows="4" cols="80">{}</textarea>"#,
        esc(&q.sql)
    );
    body.push_str(r#" <button type="submit">Explain</button></form>"#);
    match result {
        None => {}
        Some(Ok(text)) => {
            let _ = write!(body, "<h2>Decision</h2><pre>{}</pre>", esc(&text));
        }
        Some(Err(e)) => {
            let _ = write!(body, r#"<p class="error" role="alert">{}</p>"#, esc(&e));
        }
    }
    page("Explain", Some(who), &body)
}

/// The connections open now (what `portcullis status` lists for root), each with a form to
/// end it.
pub fn live(
    who: &SignedIn,
    open: &[crate::admission::ConnectionView],
    notice: Option<&str>,
) -> String {
    let mut body = String::new();
    if let Some(n) = notice {
        let _ = write!(body, r#"<p role="status">{}</p>"#, esc(n));
    }
    if open.is_empty() {
        body.push_str("<p>No connection is open.</p>");
    }
    body.push_str(
        "<table><thead><tr><th scope=\"col\">Connection</th><th scope=\"col\">Since (UTC)</th>\
         <th scope=\"col\">Who</th><th scope=\"col\">Program</th><th scope=\"col\">Target</th>\
         <th scope=\"col\">Bytes in / out</th><th scope=\"col\">End</th></tr></thead><tbody>",
    );
    for c in open {
        let _ = write!(
            body,
            r#"<tr><td>{id}</td><td>{since}</td><td>{who_}</td><td>{comm} (pid {pid}, uid {uid})</td><td>{target} ({protocol})</td><td>{up} / {down}</td><td><form method="post" action="/live/{id}/end"><input type="hidden" name="csrf" value="{csrf}"><label for="end-{id}">Reason</label><input id="end-{id}" name="reason" required maxlength="1000"> <button type="submit">End</button></form></td></tr>"#,
            id = c.id,
            since = esc(&query::format_time(c.started_ms)),
            who_ = esc(c.subject.as_deref().or(c.user.as_deref()).unwrap_or("-")),
            comm = esc(&c.comm),
            pid = c.pid,
            uid = c.uid,
            target = esc(&c.target),
            protocol = esc(&c.protocol),
            up = c.bytes_client_to_upstream,
            down = c.bytes_upstream_to_client,
            csrf = esc(&who.csrf),
        );
    }
    body.push_str("</tbody></table>");
    page("Live", Some(who), &body)
}

/// What an admin sees of the agent's health.
pub struct Health {
    pub last_seq: u64,
    pub audit_failure: Option<String>,
    pub pending_requests: usize,
    pub signed_in: usize,
    pub policies: crate::policy::PolicyStatus,
    /// `None` without `[audit.central]`.
    pub central: Option<CentralHealth>,
    /// On a fleet console: the last event each bastion shipped, or why it cannot be read.
    pub fleet: Option<Result<Vec<crate::audit::central_read::HostLast>, String>>,
}

/// How far the central audit store is behind this host's trail.
pub struct CentralHealth {
    /// The last seq the central store committed (`None`: the progress could not be read).
    pub shipped_upto: Option<u64>,
    /// Records written here and not shipped yet.
    pub behind: u64,
    /// The unshipped backlog is over `spool_max_bytes`.
    pub over_bound: bool,
    /// New connections are refused until it drains (`on_spool_full = "refuse_connections"`).
    pub refusing: bool,
    pub error: Option<String>,
}

pub fn health(who: &SignedIn, h: &Health) -> String {
    let audit = match &h.audit_failure {
        Some(f) => format!(r#"<span class="error">failing: {}</span>"#, esc(f)),
        None => "writing".into(),
    };
    let body = format!(
        "<table><tbody><tr><th scope=\"row\">Host</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Audit store</th><td>{audit}; last record {}</td></tr>\
         <tr><th scope=\"row\">Pending approval requests</th><td>{}</td></tr>\
         <tr><th scope=\"row\">People signed in to the console</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Policies</th><td>{}</td></tr>\
         <tr><th scope=\"row\">Central audit store</th><td>{}</td></tr></tbody></table>",
        esc(&portcullis_core::hostname()),
        h.last_seq,
        h.pending_requests,
        h.signed_in,
        policies_health(&h.policies),
        central_health(h.central.as_ref()),
    );
    let body = match &h.fleet {
        None => body,
        Some(fleet) => format!("{body}{}", fleet_health(fleet, crate::audit::now_ms())),
    };
    page("Health", Some(who), &body)
}

fn policies_health(p: &crate::policy::PolicyStatus) -> String {
    let mut out = format!(
        "generation {}: {} policies from {}, loaded {}",
        p.generation,
        p.policies,
        esc(&p.dir.display().to_string()),
        esc(&query::format_time(p.loaded_at_ms)),
    );
    if let Some(e) = &p.last_error {
        let _ = write!(
            out,
            r#"; <span class="error">the last reload was refused: {}</span>"#,
            esc(e)
        );
    }
    out
}

/// Every bastion of the fleet with the last event it shipped: a host whose newest event is
/// old has stopped shipping (or stopped), which is what an admin looks for first.
fn fleet_health(
    fleet: &Result<Vec<crate::audit::central_read::HostLast>, String>,
    now_ms: u64,
) -> String {
    let hosts = match fleet {
        Ok(h) => h,
        Err(e) => {
            return format!(
                r#"<h2>Fleet</h2><p class="error" role="alert">{}</p>"#,
                esc(e)
            )
        }
    };
    let mut out = format!(
        "<h2>Fleet</h2><p>{} bastions have shipped events to the central store.</p>\
         <table><thead><tr><th scope=\"col\">Host</th><th scope=\"col\">Last record</th>\
         <th scope=\"col\">Recorded (UTC)</th><th scope=\"col\">Received (UTC)</th>\
         <th scope=\"col\">Since the last event</th></tr></thead><tbody>",
        hosts.len()
    );
    for h in hosts {
        let _ = write!(
            out,
            r#"<tr><td><a href="/sessions?host={q}">{host}</a></td><td>{seq}</td><td>{time}</td><td>{received}</td><td>{ago} s</td></tr>"#,
            q = esc(&query_value(&h.host)),
            host = esc(&h.host),
            seq = h.seq,
            time = esc(&query::format_time(h.time_ms)),
            received = esc(&query::format_time(h.received_ms)),
            ago = now_ms.saturating_sub(h.time_ms) / 1000,
        );
    }
    out.push_str("</tbody></table>");
    out
}

fn central_health(c: Option<&CentralHealth>) -> String {
    let Some(c) = c else {
        return "not configured".into();
    };
    let mut out = match (c.shipped_upto, &c.error) {
        (Some(seq), _) => format!("shipped up to record {seq}; {} record(s) behind", c.behind),
        (None, Some(e)) => format!(r#"<span class="error">progress unknown: {}</span>"#, esc(e)),
        (None, None) => "progress unknown".into(),
    };
    if c.refusing {
        out.push_str(r#"; <span class="error">backlog over its bound: new connections are refused until it drains</span>"#);
    } else if c.over_bound {
        out.push_str(r#"; <span class="error">backlog over its bound (connections go on: keep_enforcing)</span>"#);
    }
    out
}

/// After sign-in: a page of the console's own origin moves the browser on, so the
/// SameSite=Strict session cookie is sent (a redirect chain that began at the issuer is
/// cross-site, and the browser would withhold it). A meta refresh needs no script.
pub fn signed_in(who: &SignedIn) -> String {
    let body = format!(
        r#"<p>Signed in as {} ({}). <a href="/">Continue</a></p>"#,
        esc(&crate::approvals::who(&who.identity)),
        esc(&who.roles.names())
    );
    page("Signed in", Some(who), &body).replacen(
        "<meta charset=\"utf-8\">",
        "<meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"0; url=/\">",
        1,
    )
}

/// The audit search's filters as the form shows them and as links carry them.
#[derive(Debug, Default, Clone, serde::Deserialize)]
pub struct AuditQuery {
    #[serde(default)]
    pub user: String,
    #[serde(default)]
    pub target: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub decision: String,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub since: String,
    #[serde(default)]
    pub until: String,
    /// A fleet console's host filter.
    #[serde(default)]
    pub host: String,
    /// Where the page's records are: record seqs on one host, Unix ms on a fleet.
    pub before: Option<u64>,
    /// Set by the fleet console: the form offers the host filter and links carry it.
    #[serde(skip)]
    pub fleet: bool,
}

impl AuditQuery {
    /// The filter of `portcullis audit search`, or which field cannot be read.
    pub fn filter(&self, now_ms: u64) -> Result<Filter, String> {
        let text = given;
        let time = |name: &str, s: &str| given_time(name, s, now_ms);
        Ok(Filter {
            since_ms: time("since", &self.since)?,
            until_ms: time("until", &self.until)?,
            user: text(&self.user),
            target: text(&self.target),
            kind: text(&self.kind),
            decision: text(&self.decision),
            text: text(&self.text),
            connection_id: None,
        })
    }

    /// The query string of these filters (without `before`).
    pub fn query(&self) -> String {
        format!(
            "user={}&target={}&kind={}&decision={}&text={}&since={}&until={}&host={}",
            query_value(&self.user),
            query_value(&self.target),
            query_value(&self.kind),
            query_value(&self.decision),
            query_value(&self.text),
            query_value(&self.since),
            query_value(&self.until),
            query_value(&self.host),
        )
    }
}

pub fn audit(who: &SignedIn, q: &AuditQuery, result: Result<EventsPage, String>) -> String {
    let mut body = String::from(r#"<form method="get" action="/audit" role="search">"#);
    body.push_str(&text_input(
        "user",
        "User",
        &q.user,
        "name, uid, subject or email",
    ));
    body.push_str(&text_input("target", "Target", &q.target, "target name"));
    body.push_str(&text_input(
        "kind",
        "Event",
        &q.kind,
        "approval, statement.denied",
    ));
    body.push_str(&select(
        "decision",
        "Decision",
        &q.decision,
        &["allow", "deny", "approval"],
    ));
    body.push_str(&text_input(
        "text",
        "Text",
        &q.text,
        "any text of the event",
    ));
    body.push_str(&text_input(
        "since",
        "Since",
        &q.since,
        "2h, 7d, 2026-01-31",
    ));
    body.push_str(&text_input(
        "until",
        "Until",
        &q.until,
        "30m, 2026-02-01T12:00",
    ));
    if q.fleet {
        body.push_str(&text_input("host", "Host", &q.host, "bastion name"));
    }
    body.push_str(r#" <button type="submit">Search</button></form>"#);
    let found = match result {
        Ok(p) => p,
        Err(e) => {
            let _ = write!(body, r#"<p class="error" role="alert">{}</p>"#, esc(&e));
            return page("Audit", Some(who), &body);
        }
    };
    let before = q.before.map(|b| format!("&before={b}")).unwrap_or_default();
    let read = if q.fleet {
        "of the fleet's central audit store, newest first".to_string()
    } else {
        format!("in records {} to {}", found.scanned.0, found.scanned.1)
    };
    let _ = write!(
        body,
        r#"<p>{} events {read}. <a href="{}" download>Export them as NDJSON</a></p>"#,
        found.events.len(),
        esc(&format!("/audit.ndjson?{}{before}", q.query())),
    );
    body.push_str(
        "<table><thead><tr><th scope=\"col\">Record</th><th scope=\"col\">Time (UTC)</th>\
         <th scope=\"col\">Event</th><th scope=\"col\">Identity</th><th scope=\"col\">Target</th>\
         <th scope=\"col\">Decision</th><th scope=\"col\">Reason</th></tr></thead><tbody>",
    );
    for (i, (seq, e, _)) in found.events.iter().enumerate() {
        let s = |path: &str| {
            e.pointer(path)
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                .unwrap_or_else(|| "-".into())
        };
        let who = match s("/identity/email") {
            w if w != "-" => w,
            _ => s("/identity/subject"),
        };
        let kind = match e.get("connection_id").and_then(Value::as_u64) {
            // No `from`: the timeline finds where the session began from its id.
            Some(id) => format!(
                r#"<a href="/sessions/{id}?{}">{}</a>"#,
                esc(host_param(found.hosts.get(i).map(String::as_str)).trim_start_matches('&')),
                esc(&s("/event"))
            ),
            None => esc(&s("/event")),
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{kind}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            match found.hosts.get(i) {
                Some(h) => format!("{} #{seq}", esc(h)),
                None => seq.to_string(),
            },
            esc(&query::format_time(e.get("time_ms").and_then(Value::as_u64).unwrap_or(0))),
            esc(&who),
            esc(&s("/target")),
            esc(&s("/decision")),
            esc(&s("/reason")),
        );
    }
    body.push_str("</tbody></table>");
    if let Some(older) = found.older {
        let _ = write!(
            body,
            r#"<p><a href="{}" rel="next">Older events</a></p>"#,
            esc(&format!("/audit?{}&before={older}", q.query()))
        );
    }
    page("Audit", Some(who), &body)
}
