//! Reading the audit trail back: filters for `portcullis audit search` and the session
//! timelines of `portcullis sessions`. Pure functions over parsed events; the CLI reads the
//! store with `portcullis_audit_store::Reader`.

use serde_json::Value;

/// What `audit search` keeps. Every set field must match.
#[derive(Debug, Default, Clone)]
pub struct Filter {
    pub since_ms: Option<u64>,
    pub until_ms: Option<u64>,
    /// Unix account name, uid, OIDC subject or email.
    pub user: Option<String>,
    pub target: Option<String>,
    /// An event type (`connection.refused`) or its family (`connection`).
    pub kind: Option<String>,
    pub decision: Option<String>,
    /// A substring of the event as stored.
    pub text: Option<String>,
    pub connection_id: Option<u64>,
}

impl Filter {
    pub fn matches(&self, event: &Value, raw: &str) -> bool {
        let time = event.get("time_ms").and_then(Value::as_u64).unwrap_or(0);
        if self.since_ms.is_some_and(|s| time < s) || self.until_ms.is_some_and(|u| time > u) {
            return false;
        }
        let field =
            |path: &[&str]| -> Option<&Value> { path.iter().try_fold(event, |v, k| v.get(*k)) };
        let str_at = |path: &[&str]| field(path).and_then(Value::as_str);
        if let Some(user) = &self.user {
            let uid = field(&["identity", "uid"])
                .or_else(|| field(&["origin", "uid"]))
                .and_then(Value::as_u64);
            let hit = [
                ["identity", "user"],
                ["identity", "subject"],
                ["identity", "email"],
            ]
            .iter()
            .any(|p| str_at(p) == Some(user.as_str()))
                || user.parse::<u64>().ok().is_some_and(|u| Some(u) == uid);
            if !hit {
                return false;
            }
        }
        if let Some(t) = &self.target {
            if str_at(&["target"]) != Some(t.as_str()) {
                return false;
            }
        }
        if let Some(k) = &self.kind {
            let kind = str_at(&["event"]).unwrap_or("");
            if kind != k && !kind.starts_with(&format!("{k}.")) {
                return false;
            }
        }
        if let Some(d) = &self.decision {
            if str_at(&["decision"]) != Some(d.as_str()) {
                return false;
            }
        }
        if let Some(id) = self.connection_id {
            if field(&["connection_id"]).and_then(Value::as_u64) != Some(id) {
                return false;
            }
        }
        if let Some(text) = &self.text {
            if !raw.contains(text.as_str()) {
                return false;
            }
        }
        true
    }
}

/// Parses a point in time: `30m`, `2h`, `7d` ago; Unix seconds; or a UTC date
/// `YYYY-MM-DD` / `YYYY-MM-DDTHH:MM[:SS]`. Returns Unix milliseconds.
pub fn parse_time(s: &str, now_ms: u64) -> Result<u64, String> {
    let s = s.trim();
    let bad = || {
        format!("`{s}` is not a time: use 30m, 2h, 7d, Unix seconds, or 2026-11-23T10:00:00 (UTC)")
    };
    if let Some(unit) = s.chars().last().filter(|c| "smhd".contains(*c)) {
        if let Ok(n) = s.get(..s.len() - 1).unwrap_or("").parse::<u64>() {
            let secs = match unit {
                's' => n,
                'm' => n.saturating_mul(60),
                'h' => n.saturating_mul(3600),
                _ => n.saturating_mul(86_400),
            };
            return Ok(now_ms.saturating_sub(secs.saturating_mul(1000)));
        }
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(secs.saturating_mul(1000));
    }
    let (date, time) = s.split_once(['T', ' ']).unwrap_or((s, "00:00:00"));
    let mut d = date.split('-').map(str::parse::<i64>);
    let (Some(Ok(y)), Some(Ok(m)), Some(Ok(day)), None) = (d.next(), d.next(), d.next(), d.next())
    else {
        return Err(bad());
    };
    let mut t = time.split(':').map(str::parse::<i64>);
    let (hh, mm, ss) = match (t.next(), t.next(), t.next()) {
        (Some(Ok(h)), Some(Ok(m)), None) => (h, m, 0),
        (Some(Ok(h)), Some(Ok(m)), Some(Ok(s))) => (h, m, s),
        _ => return Err(bad()),
    };
    if !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || !(0..24).contains(&hh)
        || !(0..60).contains(&mm)
        || !(0..61).contains(&ss)
    {
        return Err(bad());
    }
    let days = days_from_civil(y, m, day);
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs).map(|s| s * 1000).map_err(|_| bad())
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `YYYY-MM-DD HH:MM:SS` (UTC) for Unix milliseconds.
pub fn format_time(ms: u64) -> String {
    let secs = i64::try_from(ms / 1000).unwrap_or(0);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// One line of `audit search`: time, type, who, target, decision, reason.
pub fn summary(event: &Value) -> String {
    let s = |path: &[&str]| -> String {
        path.iter()
            .try_fold(event, |v, k| v.get(*k))
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .unwrap_or_else(|| "-".into())
    };
    let who = match (s(&["identity", "email"]), s(&["identity", "subject"])) {
        (e, _) if e != "-" => e,
        (_, sub) => sub,
    };
    let user = match s(&["identity", "user"]) {
        u if u != "-" => u,
        _ => s(&["origin", "uid"]),
    };
    format!(
        "{}  {:<20} {:<12} {:<24} {:<16} {:<8} {}",
        format_time(event.get("time_ms").and_then(Value::as_u64).unwrap_or(0)),
        s(&["event"]),
        user,
        who,
        s(&["target"]),
        s(&["decision"]),
        s(&["reason"]),
    )
}

/// Longest statement text or command line one line of a timeline shows; the event itself
/// (`--json`) keeps all of it.
const SHOWN_TEXT: usize = 500;

fn shortened(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match one_line.char_indices().nth(SHOWN_TEXT) {
        Some((at, _)) => format!("{}…", &one_line[..at]),
        None => one_line,
    }
}

/// What an event was about, for a session's timeline under its [`summary`] line: the
/// statement or command and what was decided of it, each as an indented line. Empty for an
/// event that says nothing beyond its summary.
pub fn details(event: &Value) -> Vec<String> {
    let str_at = |key: &str| event.get(key).and_then(Value::as_str);
    let num_at = |key: &str| event.get(key).and_then(Value::as_u64);
    let mut lines = Vec::new();
    if let Some(text) = str_at("statement") {
        lines.push(format!("    sql: {}", shortened(text)));
        let params = event
            .get("parameters")
            .and_then(Value::as_array)
            .filter(|p| !p.is_empty());
        if let Some(params) = params {
            let shown: Vec<String> = params
                .iter()
                .map(|p| {
                    p.as_str()
                        .map_or_else(|| "NULL".into(), |v| format!("'{v}'"))
                })
                .collect();
            lines.push(format!("    parameters: {}", shortened(&shown.join(", "))));
        }
        let mut facts = Vec::new();
        if let Some(class) = str_at("statement_class") {
            facts.push(format!("class {class}"));
        }
        if let Some(tag) = str_at("command_tag") {
            facts.push(format!("tag {tag}"));
        }
        if let Some(rows) = num_at("rows") {
            facts.push(format!("{rows} rows"));
        }
        if let Some(state) = str_at("sqlstate") {
            facts.push(format!("sqlstate {state}"));
        }
        if let Some(us) = num_at("duration_us") {
            facts.push(format!("{us} µs"));
        }
        if let Some(profile) = str_at("masking_profile") {
            facts.push(format!("masked by profile {profile}"));
        }
        if !facts.is_empty() {
            lines.push(format!("    {}", facts.join(", ")));
        }
    }
    if let Some(command) = str_at("command_line") {
        lines.push(format!("    command: {}", shortened(command)));
    }
    if let Some(op) = str_at("sftp_operation") {
        let mut line = format!("    sftp {op}");
        if let Some(path) = str_at("path") {
            line.push_str(&format!(" {path}"));
        }
        if let Some(to) = str_at("new_path") {
            line.push_str(&format!(" -> {to}"));
        }
        if let Some(n) = num_at("bytes_read") {
            line.push_str(&format!(", {n} bytes read"));
        }
        if let Some(n) = num_at("bytes_written") {
            line.push_str(&format!(", {n} bytes written"));
        }
        lines.push(line);
    }
    if let Some(forward) = str_at("forward") {
        lines.push(format!("    forward to {forward}"));
    }
    if let Some(id) = str_at("request_id") {
        let mut line = format!("    approval request {id}");
        if let Some(asked) = str_at("asked") {
            line.push_str(&format!(" ({asked})"));
        }
        let approvers: Vec<&str> = event
            .get("approvers")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        if !approvers.is_empty() {
            line.push_str(&format!(", approved by {}", approvers.join(", ")));
        }
        lines.push(line);
    }
    if let (Some(up), Some(down)) = (
        num_at("bytes_client_to_upstream"),
        num_at("bytes_upstream_to_client"),
    ) {
        lines.push(format!("    bytes: {up} sent, {down} received"));
    }
    let ids: Vec<&str> = event
        .get("policy_ids")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !ids.is_empty() {
        lines.push(format!("    policies: {}", ids.join(", ")));
    }
    lines
}

/// How a session ended, for `sessions list` and `sessions show`: its `connection.closed`,
/// or, without one, whether the agent started again after it opened (an agent that was
/// killed or lost its host records no close; its next start tells).
pub fn session_end(opened_ms: u64, closed: Option<&Value>, agent_starts_ms: &[u64]) -> String {
    if let Some(c) = closed {
        return format!(
            "{} ms, sent {}, received {}, {}",
            c["duration_ms"],
            c["bytes_client_to_upstream"],
            c["bytes_upstream_to_client"],
            c["reason"].as_str().unwrap_or("")
        );
    }
    match agent_starts_ms
        .iter()
        .copied()
        .filter(|t| *t >= opened_ms)
        .min()
    {
        Some(restart) => format!(
            "ended when the agent stopped without recording it (the agent started again at {})",
            format_time(restart)
        ),
        None => "open (no close recorded, and the agent has not started again since)".into(),
    }
}

/// What the sessions list keeps (`portcullis sessions list`, the console's sessions page).
#[derive(Debug, Default, Clone)]
pub struct SessionFilter {
    /// Unix account name, uid, OIDC subject or email, as [`Filter::user`].
    pub user: Option<String>,
    pub target: Option<String>,
    /// `postgres`, `tcp`, `ssh`.
    pub protocol: Option<String>,
    /// Opened at or after (Unix ms).
    pub since_ms: Option<u64>,
    /// Opened at or before (Unix ms).
    pub until_ms: Option<u64>,
    /// Sessions with at least one event of this decision (`deny`, `approval`, `allow`)
    /// among the records scanned.
    pub decision: Option<String>,
}

/// One session of a page: its `connection.opened` (and the seq it is stored at) and how it
/// ended, if the scan reached its close.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub seq: u64,
    pub opened: Value,
    /// Its `connection.closed`, when the page read it.
    pub closed: Option<Value>,
    pub end: String,
    /// On a fleet: the bastion's name in the central store (`audit.central.host_name`).
    pub host: Option<String>,
}

/// A page of sessions, newest first, and where the next (older) page starts.
#[derive(Debug, Clone)]
pub struct SessionsPage {
    pub rows: Vec<SessionRow>,
    /// The records read: `first..=last`.
    pub scanned: (u64, u64),
    /// `before` for the next page; `None` when the oldest stored record was reached.
    pub older: Option<u64>,
}

/// Records one page reads at most before `before`, and again after it for the closes and
/// decisions of its sessions: a page costs the same with a million events stored as with
/// a thousand (issue 20).
pub const PAGE_SCAN_RECORDS: u64 = 20_000;

/// The seq of the newest record in `dir` (0 when it holds none), read from the tail of the
/// newest segment: a few kB whatever the segment's size. The newest segment is always
/// plain (only sealed ones are compressed); when its tail holds no whole line we can read
/// (a record over the window, or the file was sealed and compressed meanwhile), the
/// segment is read from its first record as before. Only the position is taken from the
/// tail, never the content: a reader of events checks the chain.
pub fn last_seq(dir: &std::path::Path) -> Result<u64, portcullis_audit_store::StoreError> {
    let newest = std::fs::read_dir(dir)
        .map_err(|source| portcullis_audit_store::StoreError::Io {
            path: dir.to_path_buf(),
            op: "list the audit store",
            source,
        })?
        .filter_map(Result::ok)
        .filter_map(|e| {
            portcullis_audit_store::parse_segment_file_name(&e.file_name().to_string_lossy())
        })
        .max();
    let Some(first) = newest else {
        return Ok(0);
    };
    let path = dir.join(portcullis_audit_store::segment_file_name(first));
    if let Ok(Some(seq)) = tail_seq(&path) {
        return Ok(seq.max(first.saturating_sub(1)));
    }
    let mut last = first.saturating_sub(1);
    for record in portcullis_audit_store::Reader::from_seq(dir, first)? {
        last = record?.seq;
    }
    Ok(last)
}

/// The first read of a segment's tail; it grows fourfold while no whole line is in it.
const TAIL_WINDOW: u64 = 16 * 1024;

/// The seq of the last whole record (or seal) line of a segment file; `None` when it has
/// none or the last one does not parse.
fn tail_seq(path: &std::path::Path) -> std::io::Result<Option<u64>> {
    use portcullis_audit_store::format::{parse_line, Line};
    use std::io::{Read, Seek, SeekFrom};
    let mut file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(None);
    }
    let mut window = TAIL_WINDOW;
    loop {
        let start = len.saturating_sub(window);
        file.seek(SeekFrom::Start(start))?;
        let mut buf = Vec::new();
        file.by_ref().take(len - start).read_to_end(&mut buf)?;
        // What follows the last newline is a line being written; what precedes the first
        // one is cut by the window (unless the window starts the file).
        let whole = buf
            .iter()
            .rposition(|b| *b == b'\n')
            .and_then(|end| buf.get(..end))
            .unwrap_or_default();
        let mut lines = whole.split(|b| *b == b'\n');
        if start > 0 {
            lines.next();
        }
        if let Some(line) = lines.next_back() {
            return Ok(match parse_line(line) {
                Ok(Line::Record(r)) => Some(r.seq),
                Ok(Line::Seal(seal)) => Some(seal.last_seq),
                Err(_) => None,
            });
        }
        if start == 0 {
            return Ok(None);
        }
        window = window.saturating_mul(4);
    }
}

/// Sessions opened before seq `before` (`None`: the newest), scanning at most
/// [`PAGE_SCAN_RECORDS`] records back from it and as many after it; at most `limit` rows.
pub fn sessions_page(
    dir: &std::path::Path,
    last_seq: u64,
    before: Option<u64>,
    filter: &SessionFilter,
    limit: usize,
) -> Result<SessionsPage, portcullis_audit_store::StoreError> {
    sessions_page_within(dir, last_seq, before, filter, limit, PAGE_SCAN_RECORDS)
}

fn sessions_page_within(
    dir: &std::path::Path,
    last_seq: u64,
    before: Option<u64>,
    filter: &SessionFilter,
    limit: usize,
    window: u64,
) -> Result<SessionsPage, portcullis_audit_store::StoreError> {
    let before = before
        .unwrap_or(last_seq.saturating_add(1))
        .min(last_seq.saturating_add(1));
    let start = before.saturating_sub(window).max(1);
    let end = before.saturating_add(window).min(last_seq);
    let reader = match portcullis_audit_store::Reader::from_seq(dir, start) {
        Err(portcullis_audit_store::StoreError::Pruned {
            first_available, ..
        }) => portcullis_audit_store::Reader::from_seq(dir, first_available)?,
        other => other?,
    };
    let opened_filter = Filter {
        user: filter.user.clone(),
        target: filter.target.clone(),
        kind: Some("connection.opened".into()),
        since_ms: filter.since_ms,
        until_ms: filter.until_ms,
        ..Filter::default()
    };
    let mut opened: Vec<(u64, Value)> = Vec::new();
    let mut closed: std::collections::HashMap<u64, Value> = std::collections::HashMap::new();
    let mut decided: std::collections::HashSet<u64> = std::collections::HashSet::new();
    let mut starts: Vec<u64> = Vec::new();
    let mut first_read = None;
    let mut last_read = start;
    for record in reader {
        let record = record?;
        if record.seq > end {
            break;
        }
        first_read.get_or_insert(record.seq);
        last_read = record.seq;
        let Ok(event) = serde_json::from_str::<Value>(&record.event) else {
            continue;
        };
        let kind = event.get("event").and_then(Value::as_str).unwrap_or("");
        let connection = event.get("connection_id").and_then(Value::as_u64);
        if kind == "agent.started" {
            starts.extend(event.get("time_ms").and_then(Value::as_u64));
        }
        if let (Some(id), Some(d)) = (connection, &filter.decision) {
            if event.get("decision").and_then(Value::as_str) == Some(d.as_str()) {
                decided.insert(id);
            }
        }
        if kind == "connection.closed" {
            if let Some(id) = connection {
                closed.insert(id, event);
            }
            continue;
        }
        if record.seq < before
            && opened_filter.matches(&event, &record.event)
            && filter
                .protocol
                .as_deref()
                .is_none_or(|p| event.get("protocol").and_then(Value::as_str) == Some(p))
        {
            opened.push((record.seq, event));
        }
    }
    if filter.decision.is_some() {
        opened.retain(|(_, o)| {
            o.get("connection_id")
                .and_then(Value::as_u64)
                .is_some_and(|id| decided.contains(&id))
        });
    }
    opened.reverse();
    let first = first_read.unwrap_or(start);
    let older = if opened.len() > limit {
        opened.truncate(limit);
        opened.last().map(|(seq, _)| *seq)
    } else if first > 1 {
        Some(first)
    } else {
        None
    };
    let rows = opened
        .into_iter()
        .map(|(seq, o)| {
            let id = o.get("connection_id").and_then(Value::as_u64);
            let c = id.and_then(|id| closed.remove(&id));
            let time = o.get("time_ms").and_then(Value::as_u64).unwrap_or(0);
            let end = if c.is_none() && last_read < last_seq {
                "not closed in the records this page read; open its timeline".to_string()
            } else {
                session_end(time, c.as_ref(), &starts)
            };
            SessionRow {
                seq,
                opened: o,
                closed: c,
                end,
                host: None,
            }
        })
        .collect();
    Ok(SessionsPage {
        rows,
        scanned: (first, last_read),
        older,
    })
}

/// Events an audit search found, newest first, with the seq each is stored at and its
/// text as stored; and where the next (older) page starts.
#[derive(Debug, Clone)]
pub struct EventsPage {
    pub events: Vec<(u64, Value, String)>,
    /// The records read: `first..=last`.
    pub scanned: (u64, u64),
    /// `before` for the next page; `None` when the oldest stored record was reached.
    pub older: Option<u64>,
    /// On a fleet: each event's bastion in the central store, in the order of `events`
    /// (empty on one host).
    pub hosts: Vec<String>,
}

/// Events `filter` keeps among at most `window` records before seq `before` (`None`: the
/// newest); at most `limit` of them, the newest.
pub fn events_page(
    dir: &std::path::Path,
    last_seq: u64,
    before: Option<u64>,
    filter: &Filter,
    limit: usize,
    window: u64,
) -> Result<EventsPage, portcullis_audit_store::StoreError> {
    let before = before
        .unwrap_or(last_seq.saturating_add(1))
        .min(last_seq.saturating_add(1));
    let start = before.saturating_sub(window).max(1);
    let reader = match portcullis_audit_store::Reader::from_seq(dir, start) {
        Err(portcullis_audit_store::StoreError::Pruned {
            first_available, ..
        }) => portcullis_audit_store::Reader::from_seq(dir, first_available)?,
        other => other?,
    };
    let mut found = Vec::new();
    let mut first_read = None;
    let mut last_read = start;
    for record in reader {
        let record = record?;
        if record.seq >= before {
            break;
        }
        first_read.get_or_insert(record.seq);
        last_read = record.seq;
        let Ok(event) = serde_json::from_str::<Value>(&record.event) else {
            continue;
        };
        if filter.matches(&event, &record.event) {
            found.push((record.seq, event, record.event));
        }
    }
    found.reverse();
    let first = first_read.unwrap_or(start);
    let older = if found.len() > limit {
        found.truncate(limit);
        found.last().map(|(seq, _, _)| *seq)
    } else if first > 1 {
        Some(first)
    } else {
        None
    };
    Ok(EventsPage {
        events: found,
        scanned: (first, last_read),
        older,
        hosts: Vec::new(),
    })
}

/// One SFTP operation of a session (scp of OpenSSH 9 and later speaks SFTP too), from its
/// `ssh.sftp` event: a row of the console's file table and a line of `sessions show`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOperation {
    pub time_ms: u64,
    pub operation: String,
    /// The path, and `-> the second path` of a rename or link.
    pub path: String,
    /// `open`'s flags as words.
    pub flags: Option<String>,
    /// The server's answer (and its message), or that the agent refused it.
    pub status: String,
    /// `close`: bytes read and written through the handle, each with its SHA-256.
    pub read: Option<(u64, Option<String>)>,
    pub written: Option<(u64, Option<String>)>,
    /// Why a hash is missing.
    pub note: Option<String>,
}

/// The session's file operations, in order, from its events.
pub fn file_operations(events: &[Value]) -> Vec<FileOperation> {
    let text = |e: &Value, key: &str| e.get(key).and_then(Value::as_str).map(str::to_owned);
    events
        .iter()
        .filter(|e| e.get("event").and_then(Value::as_str) == Some("ssh.sftp"))
        .filter_map(|e| {
            let operation = text(e, "sftp_operation")?;
            let mut path = text(e, "path").unwrap_or_else(|| "-".into());
            if let Some(to) = text(e, "new_path") {
                path.push_str(" -> ");
                path.push_str(&to);
            }
            let status = match (text(e, "sftp_status"), text(e, "sftp_message")) {
                (Some(s), Some(m)) if !m.is_empty() && m != s => format!("{s} ({m})"),
                (Some(s), _) => s,
                (None, _) if e.get("decision").and_then(Value::as_str) == Some("deny") => {
                    "refused by policy".into()
                }
                (None, _) => "no answer from the server".into(),
            };
            let sized = |bytes: &str, hash: &str| {
                e.get(bytes)
                    .and_then(Value::as_u64)
                    .map(|n| (n, text(e, hash)))
            };
            Some(FileOperation {
                time_ms: e.get("time_ms").and_then(Value::as_u64).unwrap_or(0),
                operation,
                path,
                flags: text(e, "open_flags"),
                status,
                read: sized("bytes_read", "read_sha256"),
                written: sized("bytes_written", "write_sha256"),
                note: text(e, "hash_note"),
            })
        })
        .collect()
}

impl FileOperation {
    /// `sessions show`'s line for it.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{} {} {}",
            format_time(self.time_ms),
            self.operation,
            shortened(&self.path)
        );
        if let Some(f) = &self.flags {
            line.push_str(&format!(" [{f}]"));
        }
        line.push_str(&format!(": {}", self.status));
        for (what, sized) in [("read", &self.read), ("written", &self.written)] {
            if let Some((n, hash)) = sized {
                line.push_str(&format!(
                    ", {n} bytes {what} (sha256 {})",
                    hash.as_deref().unwrap_or("none")
                ));
            }
        }
        if let Some(n) = &self.note {
            line.push_str(&format!(" ({n})"));
        }
        line
    }
}

/// How far past a session's `connection.closed` its timeline still looks for its events.
const AFTER_CLOSE_RECORDS: u64 = 1_000;

/// Where to read a session's events from when only its id is known: the first seq of the
/// segment before the last one whose first `connection.opened` has an id at or below it.
/// Connection ids grow with time (the agent's start second, then a counter: proxy.rs), so
/// the segments are searched by halves, a few first records each, not read from seq 1; the
/// segment before is a margin for connections opened in another order than their ids were
/// given. A clock set back between two runs of the agent could hide a session from this:
/// `from = 1` (the console's link, `sessions show --from 1`) reads the whole trail.
pub fn session_start_seq(
    dir: &std::path::Path,
    connection_id: u64,
) -> Result<u64, portcullis_audit_store::StoreError> {
    let mut firsts: Vec<u64> = std::fs::read_dir(dir)
        .map_err(|source| portcullis_audit_store::StoreError::Io {
            path: dir.to_path_buf(),
            op: "list the audit store",
            source,
        })?
        .filter_map(Result::ok)
        .filter_map(|e| {
            portcullis_audit_store::parse_segment_file_name(&e.file_name().to_string_lossy())
        })
        .collect();
    firsts.sort_unstable();
    firsts.dedup();
    // Whether the segment at `i` opens no session with a greater id first.
    let at_or_before = |i: usize| -> Result<bool, portcullis_audit_store::StoreError> {
        let Some(&first) = firsts.get(i) else {
            return Ok(false);
        };
        let next = firsts.get(i + 1).copied().unwrap_or(u64::MAX);
        let reader = match portcullis_audit_store::Reader::from_seq(dir, first) {
            // Pruned away: older than anything kept.
            Err(portcullis_audit_store::StoreError::Pruned { .. }) => return Ok(true),
            other => other?,
        };
        for record in reader {
            let record = record?;
            if record.seq >= next {
                break;
            }
            if !record.event.contains("\"connection.opened\"") {
                continue;
            }
            let Ok(event) = serde_json::from_str::<Value>(&record.event) else {
                continue;
            };
            if event.get("event").and_then(Value::as_str) == Some("connection.opened") {
                if let Some(id) = event.get("connection_id").and_then(Value::as_u64) {
                    return Ok(id <= connection_id);
                }
            }
        }
        Ok(true)
    };
    // The first segment whose first opened id is past `connection_id`, by halves.
    let (mut low, mut high) = (0, firsts.len());
    while low < high {
        let mid = low + (high - low) / 2;
        if at_or_before(mid)? {
            low = mid + 1;
        } else {
            high = mid;
        }
    }
    Ok(firsts
        .get(low.saturating_sub(2))
        .copied()
        .unwrap_or(1)
        .max(1))
}

/// One session's events in order (what `sessions show` prints), read from seq `from` (its
/// `connection.opened`, which the sessions list links with, or [`session_start_seq`]) to
/// its `connection.closed`, and the times the agent started after it opened.
pub fn session_events(
    dir: &std::path::Path,
    connection_id: u64,
    from: u64,
) -> Result<(Vec<Value>, Vec<u64>), portcullis_audit_store::StoreError> {
    let (records, starts) = session_records(dir, connection_id, from)?;
    Ok((records.into_iter().map(|(e, _)| e).collect(), starts))
}

/// A session's events, each with its text as stored, and the times the agent started.
pub type SessionRecords = (Vec<(Value, String)>, Vec<u64>);

/// [`session_events`] with each event's text as stored (`sessions show --json`).
pub fn session_records(
    dir: &std::path::Path,
    connection_id: u64,
    from: u64,
) -> Result<SessionRecords, portcullis_audit_store::StoreError> {
    let reader = match portcullis_audit_store::Reader::from_seq(dir, from.max(1)) {
        Err(portcullis_audit_store::StoreError::Pruned {
            first_available, ..
        }) => portcullis_audit_store::Reader::from_seq(dir, first_available)?,
        other => other?,
    };
    let filter = Filter {
        connection_id: Some(connection_id),
        ..Filter::default()
    };
    let mut events = Vec::new();
    let mut starts = Vec::new();
    // Parsing is most of a record's cost: only a record whose text holds the id's digits
    // (every encoding of the number does) or an agent start can matter.
    let digits = connection_id.to_string();
    // Records read after the close: events written as the connection wound down (a
    // recording's close, a statement's late event) may follow it closely, nothing later.
    let mut after_close: Option<u64> = None;
    for record in reader {
        let record = record?;
        if after_close.is_some_and(|n| n >= AFTER_CLOSE_RECORDS) {
            break;
        }
        if let Some(n) = &mut after_close {
            *n += 1;
        }
        if !record.event.contains(&digits) && !record.event.contains("agent.started") {
            continue;
        }
        let Ok(event) = serde_json::from_str::<Value>(&record.event) else {
            continue;
        };
        if filter.matches(&event, &record.event) {
            if event.get("event").and_then(Value::as_str) == Some("connection.closed") {
                after_close = Some(0);
            }
            events.push((event, record.event));
        } else if event.get("event").and_then(Value::as_str) == Some("agent.started") {
            starts.extend(event.get("time_ms").and_then(Value::as_u64));
        }
    }
    Ok((events, starts))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;
    use serde_json::json;

    /// 60 sessions of three records each (opened, a statement, closed), alice's even and
    /// bob's odd, every third over SSH, every tenth with a denied statement; session 25's
    /// close comes last of all. Returns the last seq.
    fn sixty_sessions(dir: &std::path::Path) -> u64 {
        let (mut store, _) = portcullis_audit_store::Store::open(
            dir,
            portcullis_audit_store::StoreOptions {
                max_segment_bytes: 4096,
                ..Default::default()
            },
        )
        .unwrap();
        let closed = |i: u64| {
            json!({"event": "connection.closed", "time_ms": 1_000 * i + 500, "connection_id": i,
                   "duration_ms": 5, "bytes_client_to_upstream": 1, "bytes_upstream_to_client": 2,
                   "reason": format!("client {i} closed")})
        };
        let mut last = 0;
        for i in 1..=60u64 {
            let user = if i % 2 == 0 { "alice" } else { "bob" };
            let protocol = if i % 3 == 0 { "ssh" } else { "postgres" };
            let decision = if i % 10 == 0 { "deny" } else { "allow" };
            let events = [
                json!({"event": "connection.opened", "time_ms": 1_000 * i, "connection_id": i,
                       "protocol": protocol, "target": "db",
                       "identity": {"user": user, "subject": user, "uid": 1000 + i % 2}}),
                json!({"event": "statement.executed", "time_ms": 1_000 * i + 1, "connection_id": i,
                       "decision": decision}),
                if i == 25 {
                    json!({"event": "agent.reloaded", "time_ms": 1_000 * i + 2})
                } else {
                    closed(i)
                },
            ];
            for e in events {
                last = store.append(e.to_string().as_bytes()).unwrap().seq;
            }
        }
        store
            .append(closed(25).to_string().as_bytes())
            .unwrap()
            .seq
            .max(last)
    }

    #[test]
    fn the_last_seq_is_read_from_the_newest_segment_alone() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(last_seq(dir.path()).unwrap(), 0, "an empty store");
        let last = sixty_sessions(dir.path());
        // Small segments: several of them, and the answer is the store's last record.
        let segments = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| {
                portcullis_audit_store::parse_segment_file_name(
                    &e.as_ref().unwrap().file_name().to_string_lossy(),
                )
                .is_some()
            })
            .count();
        assert!(segments > 3, "{segments}");
        assert_eq!(last_seq(dir.path()).unwrap(), last);
    }

    #[test]
    fn the_last_seq_is_read_from_the_newest_segments_tail() {
        let dir = tempfile::tempdir().unwrap();
        sixty_sessions(dir.path());
        let (mut store, _) = portcullis_audit_store::Store::open(
            dir.path(),
            portcullis_audit_store::StoreOptions {
                max_segment_bytes: 1 << 20,
                ..Default::default()
            },
        )
        .unwrap();
        let mut last = 0;
        for i in 0..3 {
            last = store
                .append(json!({"event": "x", "i": i}).to_string().as_bytes())
                .unwrap()
                .seq;
        }
        drop(store);
        let newest = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| {
                let name = e.unwrap().file_name().to_string_lossy().into_owned();
                portcullis_audit_store::parse_segment_file_name(&name).map(|s| (s, name))
            })
            .max()
            .unwrap();
        let path = dir.path().join(&newest.1);
        // A line being written at the end is not a record yet.
        let mut bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, [&bytes[..], b"{\"seq\":999,\"time"].concat()).unwrap();
        assert_eq!(last_seq(dir.path()).unwrap(), last);
        // Only the tail is read: a damaged first line of the segment does not matter to it
        // (reading the segment from its start stops there; verify is what finds it).
        bytes[2] = b'X';
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(last_seq(dir.path()).unwrap(), last);
        // A last record longer than the first window is found by a wider one.
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = portcullis_audit_store::Store::open(
            dir.path(),
            portcullis_audit_store::StoreOptions::default(),
        )
        .unwrap();
        for n in [10, 3 * TAIL_WINDOW as usize, 20 * TAIL_WINDOW as usize] {
            let seq = store
                .append(
                    json!({"event": "x", "pad": "p".repeat(n)})
                        .to_string()
                        .as_bytes(),
                )
                .unwrap()
                .seq;
            assert_eq!(last_seq(dir.path()).unwrap(), seq, "{n}");
        }
    }

    #[test]
    fn a_sessions_events_are_read_from_where_its_id_says_it_began_not_from_the_first_record() {
        let dir = tempfile::tempdir().unwrap();
        let last = sixty_sessions(dir.path());
        let opened_at = |id: u64| {
            portcullis_audit_store::Reader::all(dir.path())
                .unwrap()
                .map(Result::unwrap)
                .find(|r| {
                    r.event.contains("connection.opened")
                        && r.event.contains(&format!("\"connection_id\":{id},"))
                })
                .unwrap()
                .seq
        };
        for id in 1..=60 {
            let start = session_start_seq(dir.path(), id).unwrap();
            assert!(start <= opened_at(id), "session {id} starts at {start}");
            assert_eq!(
                session_events(dir.path(), id, start).unwrap(),
                session_events(dir.path(), id, 1).unwrap(),
                "session {id}"
            );
        }
        // Bounded: a late session is read from near its opening, a segment or two early.
        let start = session_start_seq(dir.path(), 58).unwrap();
        assert!(start > last / 2, "{start} of {last}");
        assert!(opened_at(58) - start < 60, "{start} for {}", opened_at(58));
        // An id past every session: nothing, read from near the end.
        assert!(session_start_seq(dir.path(), 1_000).unwrap() > last / 2);
        assert!(session_events(
            dir.path(),
            1_000,
            session_start_seq(dir.path(), 1_000).unwrap()
        )
        .unwrap()
        .0
        .is_empty());
        // An empty store: from the first record.
        let empty = tempfile::tempdir().unwrap();
        assert_eq!(session_start_seq(empty.path(), 5).unwrap(), 1);
    }

    fn ids(page: &SessionsPage) -> Vec<u64> {
        page.rows
            .iter()
            .map(|r| r.opened["connection_id"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn a_sessions_page_reads_a_bounded_window_newest_first_and_pages_back() {
        let dir = tempfile::tempdir().unwrap();
        let last = sixty_sessions(dir.path());
        assert_eq!(last, 181);
        let all = SessionFilter::default();
        // 30 records back from the end: sessions 52 to 60 only, however many are stored.
        let first = sessions_page_within(dir.path(), last, None, &all, 50, 30).unwrap();
        assert_eq!(ids(&first), (52..=60).rev().collect::<Vec<_>>());
        assert_eq!(first.scanned, (152, 181));
        assert!(
            first.rows[0].end.contains("client 60 closed"),
            "{:?}",
            first.rows[0]
        );
        // The next page starts where this one's reading stopped.
        let second = sessions_page_within(dir.path(), last, first.older, &all, 50, 30).unwrap();
        assert_eq!(ids(&second), (42..=51).rev().collect::<Vec<_>>());
        // A full page stops at its last row, so the next one neither skips nor repeats.
        let short = sessions_page_within(dir.path(), last, None, &all, 4, 30).unwrap();
        assert_eq!(ids(&short), [60, 59, 58, 57]);
        let next = sessions_page_within(dir.path(), last, short.older, &all, 4, 30).unwrap();
        assert_eq!(ids(&next), [56, 55, 54, 53]);
        // Session 25's close lies beyond what its page reads: the row says so.
        let middle = sessions_page_within(dir.path(), last, Some(79), &all, 50, 10).unwrap();
        assert_eq!(ids(&middle), [26, 25, 24]);
        assert!(
            middle.rows[1]
                .end
                .starts_with("not closed in the records this page read"),
            "{:?}",
            middle.rows[1]
        );
        assert!(
            middle.rows[0].end.contains("client 26 closed"),
            "{:?}",
            middle.rows[0]
        );
        // The oldest page has nothing older.
        let oldest = sessions_page_within(dir.path(), last, Some(10), &all, 50, 30).unwrap();
        assert_eq!(ids(&oldest), [3, 2, 1]);
        assert_eq!(oldest.older, None);
    }

    #[test]
    fn an_audit_search_reads_a_bounded_window_newest_first() {
        let dir = tempfile::tempdir().unwrap();
        let last = sixty_sessions(dir.path());
        let denied = Filter {
            decision: Some("deny".into()),
            ..Filter::default()
        };
        let seqs = |p: &EventsPage| p.events.iter().map(|(s, _, _)| *s).collect::<Vec<_>>();
        // Within the last 30 records only session 60's denied statement (seq 179).
        let page = events_page(dir.path(), last, None, &denied, 10, 30).unwrap();
        assert_eq!(seqs(&page), [179]);
        assert_eq!(page.scanned, (152, 181));
        assert_eq!(page.older, Some(152));
        let all = events_page(dir.path(), last, None, &denied, 10, 1_000).unwrap();
        assert_eq!(seqs(&all), [179, 149, 119, 89, 59, 29]);
        assert_eq!(all.older, None);
        let two = events_page(dir.path(), last, None, &denied, 2, 1_000).unwrap();
        assert_eq!(seqs(&two), [179, 149]);
        let rest = events_page(dir.path(), last, two.older, &denied, 10, 1_000).unwrap();
        assert_eq!(seqs(&rest), [119, 89, 59, 29]);
        assert_eq!(rest.events[0].2, rest.events[0].1.to_string());
    }

    #[test]
    fn a_timeline_reads_from_its_opening_to_just_past_its_close() {
        let dir = tempfile::tempdir().unwrap();
        let last = sixty_sessions(dir.path());
        let kinds = |events: &[Value]| {
            events
                .iter()
                .map(|e| e["event"].as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        };
        let (events, _) = session_events(dir.path(), 7, 19).unwrap();
        assert_eq!(
            kinds(&events),
            [
                "connection.opened",
                "statement.executed",
                "connection.closed"
            ]
        );
        // Session 25 closes in the last record of all, and is read that far.
        let (events, _) = session_events(dir.path(), 25, 73).unwrap();
        assert_eq!(events.len(), 3, "{events:?}");
        assert_eq!(events[2]["time_ms"], 25_500);
        assert_eq!(last, 181);
        // A recording's close written after the connection's still belongs to it.
        let other = tempfile::tempdir().unwrap();
        let (mut store, _) =
            portcullis_audit_store::Store::open(other.path(), Default::default()).unwrap();
        for e in [
            json!({"event": "connection.opened", "connection_id": 9, "time_ms": 1}),
            json!({"event": "connection.closed", "connection_id": 9, "time_ms": 2}),
            json!({"event": "recording.closed", "connection_id": 9, "time_ms": 3}),
        ] {
            store.append(e.to_string().as_bytes()).unwrap();
        }
        let (events, _) = session_events(other.path(), 9, 1).unwrap();
        assert_eq!(
            kinds(&events),
            ["connection.opened", "connection.closed", "recording.closed"]
        );
    }

    #[test]
    fn sessions_are_filtered_by_user_protocol_decision_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let last = sixty_sessions(dir.path());
        let page = |f: SessionFilter| ids(&sessions_page(dir.path(), last, None, &f, 50).unwrap());
        let alice = page(SessionFilter {
            user: Some("alice".into()),
            ..Default::default()
        });
        assert_eq!(alice, (1..=30).rev().map(|i| 2 * i).collect::<Vec<_>>());
        assert_eq!(
            page(SessionFilter {
                user: Some("1001".into()),
                ..Default::default()
            })
            .len(),
            30
        );
        let ssh = page(SessionFilter {
            protocol: Some("ssh".into()),
            ..Default::default()
        });
        assert_eq!(ssh, (1..=20).rev().map(|i| 3 * i).collect::<Vec<_>>());
        let denied = page(SessionFilter {
            decision: Some("deny".into()),
            ..Default::default()
        });
        assert_eq!(denied, [60, 50, 40, 30, 20, 10]);
        let window = page(SessionFilter {
            since_ms: Some(10_000),
            until_ms: Some(12_000),
            ..Default::default()
        });
        assert_eq!(window, [12, 11, 10]);
        assert!(page(SessionFilter {
            target: Some("other".into()),
            ..Default::default()
        })
        .is_empty());
    }

    #[test]
    fn times_parse_and_format_in_utc() {
        let now = 1_795_429_800_000; // 2026-11-23 10:30:00 UTC
        assert_eq!(format_time(now), "2026-11-23 10:30:00");
        assert_eq!(parse_time("2026-11-23T10:30:00", now).unwrap(), now);
        assert_eq!(parse_time("2026-11-23 10:30", now).unwrap(), now);
        assert_eq!(parse_time("2026-11-23", now).unwrap(), now - 37_800_000);
        assert_eq!(parse_time("30m", now).unwrap(), now - 1_800_000);
        assert_eq!(parse_time("1795429800", now).unwrap(), now);
        assert_eq!(format_time(0), "1970-01-01 00:00:00");
        assert_eq!(format_time(951_782_400_000), "2000-02-29 00:00:00");
        for bad in ["yesterday", "2026-13-01", "2026-11-23T25:00", "5x", ""] {
            assert!(parse_time(bad, now).is_err(), "{bad}");
        }
    }

    #[test]
    fn each_filter_field_narrows_the_search() {
        let ev = json!({
            "time_ms": 1000, "event": "connection.refused", "target": "billing-db", "decision": "deny",
            "connection_id": 7,
            "identity": {"uid": 1001, "user": "alice", "subject": "alice-id", "email": "alice@example.com"},
        });
        let raw = ev.to_string();
        let table: Vec<(Filter, bool)> = vec![
            (Filter::default(), true),
            (
                Filter {
                    user: Some("alice".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    user: Some("alice@example.com".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    user: Some("1001".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    user: Some("bob".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    target: Some("billing-db".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    target: Some("other".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    kind: Some("connection".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    kind: Some("connection.refused".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    kind: Some("conn".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    decision: Some("deny".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    decision: Some("allow".into()),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    since_ms: Some(1001),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    until_ms: Some(999),
                    ..Default::default()
                },
                false,
            ),
            (
                Filter {
                    text: Some("billing".into()),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    connection_id: Some(7),
                    ..Default::default()
                },
                true,
            ),
            (
                Filter {
                    connection_id: Some(8),
                    ..Default::default()
                },
                false,
            ),
        ];
        for (i, (f, want)) in table.iter().enumerate() {
            assert_eq!(f.matches(&ev, &raw), *want, "row {i}: {f:?}");
        }
    }

    #[test]
    fn a_statement_event_shows_its_text_parameters_and_what_was_decided() {
        let ev = json!({
            "time_ms": 1000, "event": "query.statement", "decision": "allow",
            "statement": "SELECT  card\n FROM customers WHERE id = $1",
            "parameters": ["42", null], "statement_class": "read", "command_tag": "SELECT 1",
            "rows": 1, "masking_profile": "pci", "policy_ids": ["read-billing"],
        });
        assert_eq!(
            details(&ev),
            [
                "    sql: SELECT card FROM customers WHERE id = $1",
                "    parameters: '42', NULL",
                "    class read, tag SELECT 1, 1 rows, masked by profile pci",
                "    policies: read-billing",
            ]
        );
        let long = json!({"statement": "x".repeat(600)});
        assert_eq!(
            details(&long).first().map(|l| l.chars().count()),
            Some("    sql: ".len() + SHOWN_TEXT + 1)
        );
        assert!(details(&json!({"event": "agent.started"})).is_empty());
    }

    #[test]
    fn ssh_and_approval_events_show_their_substance() {
        let exec = json!({"command_line": "systemctl restart app", "policy_ids": ["ci"]});
        assert_eq!(
            details(&exec),
            ["    command: systemctl restart app", "    policies: ci"]
        );
        let sftp = json!({"sftp_operation": "rename", "path": "/a", "new_path": "/b"});
        assert_eq!(details(&sftp), ["    sftp rename /a -> /b"]);
        let approved =
            json!({"request_id": "r-1", "asked": "statement", "approvers": ["bob", "carol"]});
        assert_eq!(
            details(&approved),
            ["    approval request r-1 (statement), approved by bob, carol"]
        );
    }

    #[test]
    fn a_session_without_a_close_says_whether_the_agent_started_again() {
        let closed = json!({"duration_ms": 5, "bytes_client_to_upstream": 1,
            "bytes_upstream_to_client": 2, "reason": "client closed"});
        assert_eq!(
            session_end(100, Some(&closed), &[50, 200]),
            "5 ms, sent 1, received 2, client closed"
        );
        assert!(session_end(100, None, &[50]).starts_with("open"));
        assert_eq!(
            session_end(100, None, &[50, 300, 200]),
            "ended when the agent stopped without recording it (the agent started again at 1970-01-01 00:00:00)"
        );
    }

    /// The body of `cargo xtask bench console` (ignored as a test): the console's sessions
    /// page and `sessions list` over a store of 1,000,000 events (250,000 sessions of an
    /// opened, two statements and a closed), newest page and pages deep in the past, with
    /// and without a filter; prints `BENCH-ROW` lines of p50 and p99 in ms.
    #[test]
    #[ignore = "a benchmark: cargo xtask bench console"]
    fn bench_sessions_page_over_a_million_events() {
        use portcullis_audit_store::{Store, StoreOptions};
        let dir = tempfile::tempdir().unwrap();
        let (mut store, _) = Store::open(dir.path(), StoreOptions::default()).unwrap();
        let mut batch: Vec<String> = Vec::with_capacity(4_000);
        for i in 1..=250_000u64 {
            let user = ["alice", "bob", "carol", "dave"][(i % 4) as usize];
            let t = 1_000 * i;
            batch.push(
                json!({"event": "connection.opened", "time_ms": t, "connection_id": i,
                       "protocol": if i % 3 == 0 { "ssh" } else { "postgres" }, "target": "db",
                       "identity": {"user": user, "subject": user, "uid": 1000 + i % 4}})
                .to_string(),
            );
            for k in 1..=2 {
                batch.push(
                    json!({"event": "statement.executed", "time_ms": t + k, "connection_id": i,
                           "decision": if i % 50 == 0 && k == 2 { "deny" } else { "allow" },
                           "statement": "SELECT * FROM accounts WHERE id = $1"})
                    .to_string(),
                );
            }
            batch.push(
                json!({"event": "connection.closed", "time_ms": t + 9, "connection_id": i,
                       "duration_ms": 9, "bytes_client_to_upstream": 100,
                       "bytes_upstream_to_client": 2000, "reason": "closed"})
                .to_string(),
            );
            if batch.len() >= 4_000 {
                let refs: Vec<&[u8]> = batch.iter().map(String::as_bytes).collect();
                store.append_batch_buffered(&refs).unwrap();
                batch.clear();
            }
        }
        let refs: Vec<&[u8]> = batch.iter().map(String::as_bytes).collect();
        store.append_batch_buffered(&refs).unwrap();
        store.sync().unwrap();
        drop(store);
        let last = last_seq(dir.path()).unwrap();
        assert_eq!(last, 1_000_000);
        let cases: [(&str, &str, SessionFilter, Option<u64>); 5] = [
            ("newest", "newest page", SessionFilter::default(), None),
            (
                "deep",
                "a page 900,000 records back",
                SessionFilter::default(),
                Some(100_000),
            ),
            (
                "filtered",
                "newest page, one user's sessions with a denial",
                SessionFilter {
                    user: Some("bob".into()),
                    decision: Some("deny".into()),
                    ..SessionFilter::default()
                },
                None,
            ),
            (
                "last_seq",
                "the store's last seq (sessions list's first step)",
                SessionFilter::default(),
                None,
            ),
            (
                "timeline",
                "one session's timeline 900,000 records back, from its id alone",
                SessionFilter::default(),
                None,
            ),
        ];
        for (key, name, filter, before) in cases {
            let mut ms: Vec<f64> = Vec::new();
            for _ in 0..41 {
                let started = std::time::Instant::now();
                if key == "last_seq" {
                    assert_eq!(last_seq(dir.path()).unwrap(), last);
                } else if key == "timeline" {
                    let start = session_start_seq(dir.path(), 25_000).unwrap();
                    let (events, _) = session_events(dir.path(), 25_000, start).unwrap();
                    assert_eq!(events.len(), 4);
                } else {
                    let page = sessions_page(dir.path(), last, before, &filter, 100).unwrap();
                    assert!(!page.rows.is_empty() || key == "filtered", "{key}");
                }
                ms.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            crate::audit::print_latency_rows(
                &format!("console.sessions_page_{key}"),
                &format!("sessions page over 1,000,000 events: {name}"),
                ms,
            );
        }
    }
}
