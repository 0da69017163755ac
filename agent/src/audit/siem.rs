//! Streaming the local audit store to a SIEM: RFC 5424 syslog over TCP or TLS, and an
//! HTTP(S) webhook that receives NDJSON batches.
//!
//! Specs: RFC 5424 §6 (message format, §6.3.3 for SD-PARAM escapes), RFC 6587 §3.4.1
//! (octet-counting framing over TCP), RFC 5425 (syslog over TLS).
//!
//! As for the central shipper (`central.rs`), the local hash-chained store is the spool: each
//! forwarder reads the records after its own progress file (`<state_dir>/audit-syslog-shipped`,
//! `<state_dir>/audit-webhook-shipped`) and advances it only once the receiver took them, so an
//! outage delays delivery and skips nothing. Every message carries the host and the record's
//! seq, so a receiver de-duplicates what is re-sent after a crash. See `docs/audit-siem.md`.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use portcullis_audit_store::{Reader, Record, StoreError};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::AuditLog;
use crate::config::{Config, SyslogConfig, SyslogTls, WebhookConfig};
use portcullis_core::Secret;

const POLL: Duration = Duration::from_secs(1);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A batch the receiver does not take within this long is treated as an outage (a
/// black-holed network would otherwise hang the forwarder forever).
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Records per write for syslog: one flush (and one progress update) covers them all.
const SYSLOG_BATCH: usize = 200;

/// The SD-ID of our structured data. 32473 is the Private Enterprise Number RFC 5612 reserves
/// for documentation: an operator with a registered PEN is expected to filter on the name.
pub const SD_ID: &str = "portcullis@32473";
pub const APP_NAME: &str = "portcullis";

const SEVERITY_WARNING: u8 = 4;
const SEVERITY_INFO: u8 = 6;

#[derive(Debug, thiserror::Error)]
pub enum SiemError {
    #[error("{0}")]
    Config(String),
    #[error("webhook token file {path}: {reason}")]
    Token { path: PathBuf, reason: String },
    #[error("syslog TLS: {0}")]
    Tls(String),
    #[error("syslog TLS: {0}")]
    TlsConfig(#[from] crate::tls::TlsConfigError),
    #[error("syslog receiver {address}: {reason}")]
    Syslog { address: String, reason: String },
    #[error("the syslog receiver {0} closed the connection; reconnecting")]
    Closed(String),
    #[error("the receiver did not take a batch within {0:?}; retrying")]
    Timeout(Duration),
    /// With the causes reqwest keeps out of its own message (a refused certificate's reason).
    #[error("webhook request failed: {}", super::with_sources(.0))]
    Http(#[from] reqwest::Error),
    #[error("the webhook answered HTTP {0}; retrying the same batch")]
    Status(u16),
    #[error("reading the local audit store: {0}")]
    Local(#[from] StoreError),
    #[error("progress file {path}: {source}")]
    Progress {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Starts a forwarder on `tasks` for each of `[audit.syslog]` and `[audit.webhook]` that is
/// configured; they stop with `stop`.
pub fn start(config: &Config, audit: &Arc<AuditLog>, tasks: &TaskTracker, stop: CancellationToken) {
    let host = config
        .audit
        .central
        .as_ref()
        .and_then(|c| c.host_name.clone())
        .unwrap_or_else(|| super::hostname().to_string());
    if let Some(syslog) = &config.audit.syslog {
        let sink = Sink::Syslog(SyslogSink::new(syslog.clone(), host.clone()));
        let forwarder = Forwarder::new(
            sink,
            config.audit_syslog_shipped_path(),
            audit,
            SYSLOG_BATCH,
        );
        tasks.spawn(forwarder.run(stop.clone()));
    }
    if let Some(webhook) = &config.audit.webhook {
        let batch = webhook.batch_size;
        let sink = Sink::Webhook(WebhookSink::new(webhook.clone(), host));
        let forwarder = Forwarder::new(sink, config.audit_webhook_shipped_path(), audit, batch);
        tasks.spawn(forwarder.run(stop));
    }
}

/// One receiver, reached the way its protocol wants.
enum Sink {
    Syslog(SyslogSink),
    Webhook(WebhookSink),
}

impl Sink {
    fn name(&self) -> &'static str {
        match self {
            Sink::Syslog(_) => "syslog",
            Sink::Webhook(_) => "webhook",
        }
    }

    /// Returns once the receiver acknowledged the whole of `batch` (see the module doc for
    /// what that means per protocol).
    async fn deliver(&mut self, batch: &[Record]) -> Result<(), SiemError> {
        match self {
            Sink::Syslog(s) => s.deliver(batch).await,
            Sink::Webhook(w) => w.deliver(batch).await,
        }
    }

    /// After an error: the next delivery starts from a fresh connection.
    fn reset(&mut self) {
        match self {
            Sink::Syslog(s) => s.conn = None,
            Sink::Webhook(w) => w.client = None,
        }
    }

    /// How the records read in one go are split into acknowledged units.
    fn chunks<'r>(&self, batch: &'r [Record]) -> Vec<&'r [Record]> {
        match self {
            Sink::Syslog(_) => vec![batch],
            Sink::Webhook(w) => split_by_bytes(batch, w.config.max_batch_bytes, |r| {
                ndjson_line(&w.host, r).len()
            }),
        }
    }
}

struct Forwarder {
    sink: Sink,
    dir: PathBuf,
    progress: PathBuf,
    audit: Arc<AuditLog>,
    batch_size: usize,
    shipped_upto: u64,
}

impl Forwarder {
    fn new(sink: Sink, progress: PathBuf, audit: &Arc<AuditLog>, batch_size: usize) -> Self {
        Self {
            sink,
            dir: audit.dir().to_path_buf(),
            progress,
            audit: Arc::clone(audit),
            batch_size: batch_size.max(1),
            shipped_upto: 0,
        }
    }

    async fn run(mut self, stop: CancellationToken) {
        let name = self.sink.name();
        match super::central::read_progress(&self.progress) {
            Ok(seq) => self.shipped_upto = seq,
            Err(e) => {
                // Starting over only re-sends: receivers de-duplicate by (host, seq).
                tracing::warn!(sink = name, error = %e, "audit forwarding progress unreadable; re-sending from the oldest local record");
            }
        }
        tracing::info!(
            sink = name,
            shipped_upto = self.shipped_upto,
            "audit forwarder started"
        );
        let mut backoff = BACKOFF_MIN;
        loop {
            if self.audit.last_seq() > self.shipped_upto {
                let outcome = tokio::select! {
                    () = stop.cancelled() => return,
                    r = self.forward_available(&stop) => r,
                };
                match outcome {
                    Ok(()) => backoff = BACKOFF_MIN,
                    Err(e) => {
                        tracing::warn!(sink = name, error = %e, retry_secs = backoff.as_secs(), shipped_upto = self.shipped_upto, "audit forwarding failed; the local store keeps every record");
                        self.sink.reset();
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = backoff.saturating_mul(2).min(BACKOFF_MAX);
                        continue;
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }

    async fn forward_available(&mut self, stop: &CancellationToken) -> Result<(), SiemError> {
        // One reader per round: it re-verifies its segment from the start, so reopening it
        // for every batch would make catching up quadratic.
        let Some(mut reader) = self.open_reader().await? else {
            return Ok(());
        };
        loop {
            let take = self.batch_size;
            let (back, batch) = tokio::task::spawn_blocking(move || {
                let batch: Result<Vec<Record>, StoreError> = reader.by_ref().take(take).collect();
                (reader, batch)
            })
            .await
            .map_err(|e| SiemError::Config(format!("reader task failed: {e}")))?;
            reader = back;
            let batch = batch?;
            if batch.is_empty() {
                return Ok(());
            }
            let expected = self.shipped_upto.saturating_add(1);
            if batch.first().map(|r| r.seq) != Some(expected) {
                return Err(SiemError::Local(StoreError::Corrupt {
                    segment: self.dir.clone(),
                    line: None,
                    reason: format!("expected seq {expected} next, the reader gave another"),
                }));
            }
            for chunk in self.sink.chunks(&batch) {
                let Some(last) = chunk.last().map(|r| r.seq) else {
                    continue;
                };
                tokio::time::timeout(WRITE_TIMEOUT, self.sink.deliver(chunk))
                    .await
                    .map_err(|_| SiemError::Timeout(WRITE_TIMEOUT))??;
                let path = self.progress.clone();
                tokio::task::spawn_blocking(move || super::spool::write_progress(&path, last))
                    .await
                    .map_err(|e| SiemError::Config(format!("progress task failed: {e}")))?
                    .map_err(|source| SiemError::Progress {
                        path: self.progress.clone(),
                        source,
                    })?;
                self.shipped_upto = last;
            }
            if stop.is_cancelled() {
                return Ok(());
            }
        }
    }

    async fn open_reader(&mut self) -> Result<Option<Reader>, SiemError> {
        Ok(super::spool::open_reader(&self.dir, &mut self.shipped_upto, self.sink.name()).await?)
    }
}

/// Greedy split: each chunk holds at most `max_bytes` (by `size`), and at least one record,
/// so a single oversized record is still delivered (alone) rather than blocking the stream.
fn split_by_bytes(
    batch: &[Record],
    max_bytes: usize,
    size: impl Fn(&Record) -> usize,
) -> Vec<&[Record]> {
    let mut chunks = Vec::new();
    let mut rest = batch;
    while !rest.is_empty() {
        let mut total = 0usize;
        let mut n = 0usize;
        for r in rest {
            let s = size(r);
            if n > 0 && total.saturating_add(s) > max_bytes {
                break;
            }
            total = total.saturating_add(s);
            n += 1;
        }
        let (chunk, tail) = rest.split_at(n.min(rest.len()));
        chunks.push(chunk);
        rest = tail;
    }
    chunks
}

// ---------------------------------------------------------------------------------------
// Syslog

trait Connection: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Connection for T {}

struct SyslogSink {
    config: SyslogConfig,
    host: String,
    facility: u8,
    pid: u32,
    conn: Option<Box<dyn Connection>>,
}

impl SyslogSink {
    fn new(config: SyslogConfig, host: String) -> Self {
        // Validated at load; authpriv is the default the docs promise.
        let facility = crate::config::syslog_facility_code(&config.facility).unwrap_or(10);
        Self {
            config,
            host,
            facility,
            pid: std::process::id(),
            conn: None,
        }
    }

    async fn deliver(&mut self, batch: &[Record]) -> Result<(), SiemError> {
        let mut frames = Vec::new();
        for record in batch {
            let message = SyslogMessage::from_record(record, &self.host, self.facility, self.pid);
            encode_frame(&message, &mut frames);
        }
        let mut conn = match self.conn.take() {
            Some(mut c) => {
                // TCP syslog has no acknowledgement: a write to a receiver that already went
                // away succeeds locally and is lost. Its FIN is seen here, before writing.
                if peer_closed(&mut c) {
                    return Err(SiemError::Closed(self.config.address.clone()));
                }
                c
            }
            None => self.connect().await?,
        };
        let io_err = |e: std::io::Error| SiemError::Syslog {
            address: self.config.address.clone(),
            reason: e.to_string(),
        };
        conn.write_all(&frames).await.map_err(io_err)?;
        conn.flush().await.map_err(io_err)?;
        self.conn = Some(conn);
        Ok(())
    }

    async fn connect(&self) -> Result<Box<dyn Connection>, SiemError> {
        let address = self.config.address.clone();
        let err = |reason: String| SiemError::Syslog {
            address: address.clone(),
            reason,
        };
        let (host, port) =
            crate::config::split_host_port(&self.config.address).map_err(SiemError::Config)?;
        let mut addrs: Vec<SocketAddr> = tokio::time::timeout(
            CONNECT_TIMEOUT,
            tokio::net::lookup_host((host.as_str(), port)),
        )
        .await
        .map_err(|_| err("name resolution timed out".into()))?
        .map_err(|e| err(format!("resolving: {e}")))?
        .collect();
        if self.config.tls == SyslogTls::Disable {
            // Plain text must not leave the host, whatever the name resolves to.
            addrs.retain(|a| a.ip().is_loopback());
        }
        if addrs.is_empty() {
            return Err(err(
                "resolves to no usable address (tls = \"disable\" needs a loopback address)".into(),
            ));
        }
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(&*addrs))
            .await
            .map_err(|_| err("connecting timed out".into()))?
            .map_err(|e| err(format!("connecting: {e}")))?;
        let _ = tcp.set_nodelay(true);
        match self.config.tls {
            SyslogTls::Disable => Ok(Box::new(tcp)),
            SyslogTls::Require => {
                let connector = tls_connector(self.config.ca_file.as_deref())?;
                let name = self.config.server_name.clone().unwrap_or(host);
                let server_name = rustls::pki_types::ServerName::try_from(name.clone())
                    .map_err(|_| SiemError::Tls(format!("`{name}` is not a valid server name")))?;
                let tls =
                    tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(server_name, tcp))
                        .await
                        .map_err(|_| err("TLS handshake timed out".into()))?
                        .map_err(|e| SiemError::Tls(format!("handshake with {address}: {e}")))?;
                Ok(Box::new(tls))
            }
        }
    }
}

/// Whether the receiver closed its side. Receivers never send application data, so anything
/// readable is either EOF, an error, or TLS housekeeping (session tickets), which reading
/// here consumes. Never waits.
fn peer_closed(conn: &mut Box<dyn Connection>) -> bool {
    let mut scratch = [0u8; 1024];
    let mut cx = Context::from_waker(std::task::Waker::noop());
    for _ in 0..16 {
        let mut buf = ReadBuf::new(&mut scratch);
        match Pin::new(&mut **conn).poll_read(&mut cx, &mut buf) {
            Poll::Pending => return false,
            Poll::Ready(Ok(())) if buf.filled().is_empty() => return true,
            Poll::Ready(Ok(())) => {}
            Poll::Ready(Err(_)) => return true,
        }
    }
    false
}

fn tls_connector(ca_file: Option<&Path>) -> Result<tokio_rustls::TlsConnector, SiemError> {
    let config = crate::tls::client_config(ca_file, "audit.syslog.ca_file")?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// One RFC 5424 message for one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogMessage<'a> {
    pub facility: u8,
    pub severity: u8,
    pub time_ms: u64,
    /// HOSTNAME and the `host` SD-PARAM: the same name the central store and webhook use.
    pub host: &'a str,
    pub pid: u32,
    /// MSGID: the event type (`connection.opened`, ...).
    pub event_type: String,
    pub seq: u64,
    pub hash: String,
    /// MSG: the event JSON exactly as stored.
    pub event: &'a str,
}

/// The two fields of an event that choose its severity.
#[derive(Deserialize)]
struct EventHead {
    #[serde(default)]
    event: String,
    #[serde(default)]
    decision: Option<String>,
}

impl<'a> SyslogMessage<'a> {
    pub fn from_record(record: &'a Record, host: &'a str, facility: u8, pid: u32) -> Self {
        let head: Option<EventHead> = serde_json::from_str(&record.event).ok();
        let (event_type, decision) = head.map_or((String::new(), None), |h| (h.event, h.decision));
        Self {
            facility,
            severity: severity(&event_type, decision.as_deref()),
            time_ms: record.time_ms,
            host,
            pid,
            event_type,
            seq: record.seq,
            hash: record.hash.to_hex(),
            event: &record.event,
        }
    }
}

/// Refusals, denials and alerts about the audit trail itself are warnings; the rest is the
/// normal record of activity.
pub fn severity(event_type: &str, decision: Option<&str>) -> u8 {
    let alert = matches!(
        event_type,
        "connection.refused"
            | "login.failed"
            | "login.refresh_failed"
            | "login.revoked"
            | "policy.reload_failed"
            | "audit.integrity"
            | "audit.spool_full"
            | "approval.break_glass"
            | "approval.notification_dropped"
    );
    if alert || decision == Some(super::Decision::Deny.as_str()) {
        SEVERITY_WARNING
    } else {
        SEVERITY_INFO
    }
}

/// Appends `MSG-LEN SP SYSLOG-MSG` (RFC 6587 §3.4.1).
pub fn encode_frame(m: &SyslogMessage<'_>, out: &mut Vec<u8>) {
    let mut msg = String::with_capacity(m.event.len().saturating_add(256));
    let pri = u16::from(m.facility) * 8 + u16::from(m.severity);
    let _ = write!(
        msg,
        "<{pri}>1 {} {} {APP_NAME} {} {} [{SD_ID} seq=\"{}\" host=\"{}\" hash=\"{}\"] \u{feff}{}",
        rfc3339_ms(m.time_ms),
        header_field(m.host, 255),
        m.pid,
        header_field(&m.event_type, 32),
        m.seq,
        sd_escape(m.host),
        sd_escape(&m.hash),
        m.event,
    );
    let _ = write!(PushBytes(out), "{} ", msg.len());
    out.extend_from_slice(msg.as_bytes());
}

struct PushBytes<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for PushBytes<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

/// Header fields are 1*N PRINTUSASCII (no spaces); `-` is the nil value.
fn header_field(value: &str, max: usize) -> String {
    let field: String = value
        .chars()
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .take(max)
        .collect();
    if field.is_empty() {
        "-".into()
    } else {
        field
    }
}

/// RFC 5424 §6.3.3: `"`, `\` and `]` are escaped with a backslash inside PARAM-VALUE.
pub fn sd_escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '"' | '\\' | ']') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// `2026-01-02T03:04:05.678Z` (RFC 3339, UTC, milliseconds), as RFC 5424 §6.2.3 allows.
pub fn rfc3339_ms(time_ms: u64) -> String {
    let secs = time_ms / 1000;
    let ms = time_ms % 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{ms:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

// ---------------------------------------------------------------------------------------
// Webhook

struct WebhookSink {
    config: WebhookConfig,
    host: String,
    client: Option<(reqwest::Client, Option<Secret>)>,
}

impl WebhookSink {
    fn new(config: WebhookConfig, host: String) -> Self {
        Self {
            config,
            host,
            client: None,
        }
    }

    async fn deliver(&mut self, batch: &[Record]) -> Result<(), SiemError> {
        let (Some(first), Some(last)) = (batch.first(), batch.last()) else {
            return Ok(());
        };
        let (client, token) = match self.client.take() {
            Some(c) => c,
            None => {
                // Read at each (re)connect, so a rotated token is picked up after an error.
                let token = match &self.config.token_file {
                    Some(path) => Some(read_token(path)?),
                    None => None,
                };
                let client = reqwest::Client::builder()
                    .use_rustls_tls()
                    .timeout(Duration::from_secs(self.config.timeout_secs))
                    .connect_timeout(CONNECT_TIMEOUT)
                    // A redirect would carry the bearer token to a place nobody configured.
                    .redirect(reqwest::redirect::Policy::none())
                    .build()?;
                (client, token)
            }
        };
        let mut body = String::new();
        for record in batch {
            body.push_str(&ndjson_line(&self.host, record));
        }
        let mut request = client
            .post(&self.config.url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-ndjson")
            .header("X-Portcullis-Host", &self.host)
            .header("X-Portcullis-First-Seq", first.seq)
            .header("X-Portcullis-Last-Seq", last.seq)
            .body(body);
        if let Some(token) = &token {
            request = request.bearer_auth(token.expose());
        }
        let response = request.send().await;
        self.client = Some((client, token));
        let status = response?.status();
        if !status.is_success() {
            return Err(SiemError::Status(status.as_u16()));
        }
        Ok(())
    }
}

/// One NDJSON line: the record's place in the chain and the event exactly as stored, so a
/// receiver can de-duplicate by (host, seq) and re-check the hash chain.
pub fn ndjson_line(host: &str, record: &Record) -> String {
    let host = serde_json::to_string(host).unwrap_or_else(|_| "\"\"".into());
    format!(
        "{{\"host\":{host},\"seq\":{},\"time_ms\":{},\"prev\":\"{}\",\"hash\":\"{}\",\"event\":{}}}\n",
        record.seq,
        record.time_ms,
        record.prev.to_hex(),
        record.hash.to_hex(),
        record.event
    )
}

/// A bearer token in a root-only file; the token never appears in an error.
fn read_token(path: &Path) -> Result<Secret, SiemError> {
    use std::os::unix::fs::MetadataExt;
    let err = |reason: String| SiemError::Token {
        path: path.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(err(format!(
            "readable by others (mode {:o}); make it 0600",
            meta.mode() & 0o777
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err("empty".into()));
    }
    if !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(err(
            "holds characters an HTTP header cannot carry (spaces or non-ASCII)".into(),
        ));
    }
    Ok(Secret::new(token.to_string()))
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
    use portcullis_audit_store::ChainHash;

    fn parse(extra: &str) -> Result<Config, String> {
        Config::parse(Path::new("/etc/portcullis/portcullis.toml"), extra)
            .map(|(c, _)| c)
            .map_err(|e| e.to_string())
    }

    fn record(seq: u64, event: &str) -> Record {
        Record {
            seq,
            time_ms: 1_767_323_045_678,
            prev: ChainHash::GENESIS,
            hash: ChainHash::GENESIS,
            event: event.to_string(),
        }
    }

    #[test]
    fn siem_section_defaults() {
        let c = parse(
            "[audit.syslog]\naddress = \"siem.example:6514\"\n\
             [audit.webhook]\nurl = \"https://siem.example/ingest\"\n",
        )
        .unwrap();
        let s = c.audit.syslog.unwrap();
        assert_eq!(s.tls, SyslogTls::Require);
        assert_eq!(s.facility, "authpriv");
        let w = c.audit.webhook.unwrap();
        assert_eq!(w.batch_size, 100);
        assert_eq!(w.max_batch_bytes, 1 << 20);
        assert_eq!(w.timeout_secs, 10);
    }

    #[test]
    fn siem_config_validation_table() {
        let cases: &[(&str, Option<&str>)] = &[
            (
                "[audit.syslog]\naddress = \"127.0.0.1:514\"\ntls = \"disable\"\n[insecure]\nallow_plaintext_loopback = true\n",
                None,
            ),
            (
                "[audit.syslog]\naddress = \"[::1]:514\"\ntls = \"disable\"\n[insecure]\nallow_plaintext_loopback = true\n",
                None,
            ),
            (
                "[audit.syslog]\naddress = \"localhost:514\"\ntls = \"disable\"\n[insecure]\nallow_plaintext_loopback = true\n",
                None,
            ),
            (
                "[audit.syslog]\naddress = \"10.0.0.5:514\"\ntls = \"disable\"\n",
                Some("audit.syslog.tls: \"disable\" is accepted for loopback addresses only"),
            ),
            (
                "[audit.syslog]\naddress = \"siem.example\"\n",
                Some("audit.syslog.address: `siem.example` is not `host:port`"),
            ),
            (
                "[audit.syslog]\naddress = \"siem.example:0\"\n",
                Some("the port must be 1-65535"),
            ),
            (
                "[audit.syslog]\naddress = \"siem.example:6514\"\nfacility = \"local9\"\n",
                Some("audit.syslog.facility: `local9` is not one of"),
            ),
            (
                "[audit.syslog]\naddress = \"siem.example:6514\"\nport = 1\n",
                Some("unknown field `port`"),
            ),
            (
                "[audit.webhook]\nurl = \"http://127.0.0.1:8080/x\"\n[insecure]\nallow_plaintext_loopback = true\n",
                None,
            ),
            (
                "[audit.webhook]\nurl = \"http://[::1]:8080/x\"\n[insecure]\nallow_plaintext_loopback = true\n",
                None,
            ),
            (
                "[audit.webhook]\nurl = \"http://127.0.0.1:8080/x\"\n",
                Some("audit.webhook.url: plain http on loopback is accepted only with `insecure.allow_plaintext_loopback = true`"),
            ),
            (
                "[audit.syslog]\naddress = \"127.0.0.1:514\"\ntls = \"disable\"\n",
                Some("audit.syslog.tls: \"disable\" on loopback is accepted only with `insecure.allow_plaintext_loopback = true`"),
            ),
            (
                "[audit.webhook]\nurl = \"http://siem.example/ingest\"\n",
                Some("audit.webhook.url: must use https (plain http is accepted on loopback only)"),
            ),
            (
                "[audit.webhook]\nurl = \"https://user:hunter2@siem.example/\"\n",
                Some("audit.webhook.url: holds credentials"),
            ),
            (
                "[audit.webhook]\nurl = \"ftp://siem.example/\"\n",
                Some("scheme `ftp` is not http or https"),
            ),
            (
                "[audit.webhook]\nurl = \"https://siem.example/\"\nbatch_size = 0\n",
                Some("audit.webhook.batch_size: 0 must be 1-10000"),
            ),
            (
                "[audit.webhook]\nurl = \"https://siem.example/\"\nmax_batch_bytes = 10\n",
                Some("audit.webhook.max_batch_bytes"),
            ),
            (
                "[audit.webhook]\nurl = \"https://siem.example/\"\ntimeout_secs = 0\n",
                Some("audit.webhook.timeout_secs"),
            ),
        ];
        for (text, want) in cases {
            match (parse(text), want) {
                (Ok(_), None) => {}
                (Err(e), Some(w)) => assert!(e.contains(w), "{text}: {e}"),
                (Ok(_), Some(w)) => panic!("{text}: accepted, wanted {w}"),
                (Err(e), None) => panic!("{text}: {e}"),
            }
        }
        let e =
            parse("[audit.webhook]\nurl = \"https://user:hunter2@siem.example/\"\n").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn progress_paths_cover_every_configured_shipper() {
        let c = parse(
            "state_dir = \"/s\"\n[audit.syslog]\naddress = \"siem.example:6514\"\n\
             [audit.webhook]\nurl = \"https://siem.example/ingest\"\n",
        )
        .unwrap();
        assert_eq!(
            c.audit_progress_paths(),
            vec![
                PathBuf::from("/s/audit-syslog-shipped"),
                PathBuf::from("/s/audit-webhook-shipped")
            ]
        );
    }

    #[test]
    fn token_file_must_be_private_and_is_never_printed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("token");
        std::fs::write(&path, "s3cret-token\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_token(&path).unwrap_err().to_string();
        assert!(e.contains("make it 0600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let token = read_token(&path).unwrap();
        assert_eq!(token.expose(), "s3cret-token");
        assert!(!format!("{token:?}").contains("s3cret"));
        std::fs::write(&path, "two words").unwrap();
        let e = read_token(&path).unwrap_err().to_string();
        assert!(!e.contains("words"), "{e}");
    }

    #[test]
    fn sd_param_values_are_escaped() {
        assert_eq!(sd_escape(r#"a"b\c]d"#), r#"a\"b\\c\]d"#);
        assert_eq!(sd_escape("plain"), "plain");
    }

    #[test]
    fn timestamps_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(951_782_400_001), "2000-02-29T00:00:00.001Z");
        assert_eq!(rfc3339_ms(1_767_323_045_678), "2026-01-02T03:04:05.678Z");
    }

    #[test]
    fn severity_follows_the_event_type() {
        assert_eq!(severity("connection.opened", Some("allow")), SEVERITY_INFO);
        assert_eq!(severity("connection.refused", None), SEVERITY_WARNING);
        assert_eq!(
            severity("connection.closed", Some("deny")),
            SEVERITY_WARNING
        );
        assert_eq!(severity("audit.integrity", None), SEVERITY_WARNING);
        assert_eq!(severity("audit.spool_full", None), SEVERITY_WARNING);
        assert_eq!(severity("approval.break_glass", None), SEVERITY_WARNING);
        assert_eq!(
            severity("approval.notification_dropped", None),
            SEVERITY_WARNING
        );
        assert_eq!(severity("agent.started", None), SEVERITY_INFO);
    }

    #[test]
    fn syslog_frame_is_octet_counted_rfc5424() {
        let event = r#"{"schema":1,"event":"connection.refused","reason":"x"}"#;
        let r = record(42, event);
        let m = SyslogMessage::from_record(&r, "bastion \"1\"", 10, 777);
        let mut out = Vec::new();
        encode_frame(&m, &mut out);
        encode_frame(&m, &mut out);
        let text = String::from_utf8(out).unwrap();
        let (len, rest) = text.split_once(' ').unwrap();
        let len: usize = len.parse().unwrap();
        let (msg, next) = rest.split_at(len);
        assert!(next.starts_with(&format!("{len} ")), "second frame follows");
        // authpriv (10) * 8 + warning (4) = 84.
        let want = format!(
            "<84>1 2026-01-02T03:04:05.678Z bastion_\"1\" portcullis 777 connection.refused \
             [portcullis@32473 seq=\"42\" host=\"bastion \\\"1\\\"\" hash=\"{}\"] \u{feff}{event}",
            ChainHash::GENESIS.to_hex()
        );
        assert_eq!(msg, want);
    }

    #[test]
    fn batches_split_by_bytes_keep_every_record_once() {
        let records: Vec<Record> = (1..=7).map(|s| record(s, "{}")).collect();
        let chunks = split_by_bytes(&records, 25, |r| if r.seq == 4 { 100 } else { 10 });
        let sizes: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        assert_eq!(sizes, vec![2, 1, 1, 2, 1]);
        let seqs: Vec<u64> = chunks
            .iter()
            .flat_map(|c| c.iter().map(|r| r.seq))
            .collect();
        assert_eq!(seqs, (1..=7).collect::<Vec<_>>());
    }

    #[test]
    fn ndjson_line_embeds_the_stored_event() {
        let r = record(3, r#"{"event":"logout"}"#);
        let line = ndjson_line("web1", &r);
        assert!(line.ends_with('\n'));
        let v: serde_json::Value = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(v["host"], "web1");
        assert_eq!(v["seq"], 3);
        assert_eq!(v["event"]["event"], "logout");
    }
}
