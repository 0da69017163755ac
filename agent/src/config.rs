//! The agent's configuration: one typed tree, every default in one place, and errors
//! that name the file, the line and the key.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use toml::Spanned;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/portcullis/portcullis.toml";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/portcullis/control.sock";

/// Embedded configuration for `cargo xtask demo` and `portcullis agent --demo`.
pub const DEMO_CONFIG: &str = include_str!("../../packaging/demo.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The agent's own state: the local CA, the masking key, logins, the audit store and
    /// the shippers' progress. Root's, 0700 (0711 once the CA's certificate is published).
    #[serde(default = "defaults::state_dir")]
    pub state_dir: PathBuf,
    /// The control socket the CLI talks to.
    #[serde(default)]
    pub control: ControlConfig,
    /// The proxy that redirected connections arrive at.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Where the kernel programs attach and are pinned.
    #[serde(default)]
    pub bpf: BpfConfig,
    /// The protected targets (`[[target]]`, one table per service).
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetConfig>,
    /// Who users and services are: the OpenID Provider and the identities it vouches for.
    #[serde(default)]
    pub identity: IdentityConfig,
    /// Where the Cedar policies live.
    #[serde(default)]
    pub policy: PolicyConfig,
    /// The hash-chained audit store and where it is shipped.
    #[serde(default)]
    pub audit: AuditConfig,
    /// What one local user may hold of the agent (`[limits]`).
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Settings that weaken security, for labs and tests; the name says so.
    #[serde(default)]
    pub insecure: InsecureConfig,
    /// How targets' `host` names are resolved.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Just-in-time approvals on this host: break-glass and the notification webhooks
    /// (`docs/approvals.md`; who must approve is the policy's, `approvals.toml`).
    #[serde(default)]
    pub approvals: ApprovalsConfig,
    /// The web console on this host (`[console]`, docs/console.md): off unless `listen` is set.
    #[serde(default)]
    pub console: ConsoleConfig,
}

/// `[approvals]`: what the policy's approvals (`@approval`, `approvals.toml`) do on this host
/// beyond the requests themselves.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ApprovalsConfig {
    /// The emergency group: a person whose login's token names it may approve their own
    /// request, with a reason (`portcullis approvals approve <id> --break-glass --reason
    /// "…"`), which fills the whole requirement, loudly (an `approval.break_glass` event,
    /// every notification webhook alerted, the grant shown by `portcullis status`). Unset
    /// or empty: nobody can break the glass.
    #[serde(default)]
    pub break_glass_group: Option<String>,
    /// Webhooks told of every request, decision, expiry, revocation and break-glass
    /// (`[[approvals.notify]]`, at most 8).
    #[serde(default)]
    pub notify: Vec<NotifyConfig>,
}

impl ApprovalsConfig {
    /// The break-glass group, if break-glass is on.
    pub fn break_glass(&self) -> Option<&str> {
        self.break_glass_group.as_deref().filter(|g| !g.is_empty())
    }
}

/// `[console]`: the web console, served by the agent over TLS only, for people who sign in
/// with the identity issuer (authorization code with PKCE) and hold one of its roles.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    /// `ip:port` the console listens on (HTTPS only). Unset: no console.
    #[serde(default)]
    #[schemars(with = "Option<String>", extend("x-sighup" = "restart to change"))]
    pub listen: Option<Spanned<String>>,
    /// The address browsers open, `https://host[:port]`; the issuer must allow
    /// `<url>/auth/callback` as a redirect URI of `client_id`. Default: `https://<listen>`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub url: Option<Spanned<String>>,
    /// The console's client at the issuer (a client allowed the authorization code grant
    /// with the redirect URI above); default: `identity.client_id`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Root-only (0600) file with the client's secret, for a confidential client; unset: a
    /// public client (PKCE alone). Never logged.
    #[serde(default)]
    #[schemars(extend("x-sighup" = "read at start"))]
    pub client_secret_file: Option<PathBuf>,
    /// PEM certificate chain the console presents; with `tls_key`. Unset: a certificate
    /// from the agent's local CA (`<state_dir>/ca/ca.pem`) for the `url`'s host and the
    /// `listen` address.
    #[serde(default)]
    #[schemars(with = "Option<PathBuf>", extend("x-sighup" = "read at start"))]
    pub tls_cert: Option<Spanned<PathBuf>>,
    /// Root-only (0600) PEM private key of `tls_cert`.
    #[serde(default)]
    #[schemars(with = "Option<PathBuf>", extend("x-sighup" = "read at start"))]
    pub tls_key: Option<Spanned<PathBuf>>,
    /// A console session ends this long after sign-in (then the person signs in again, with
    /// the groups their token has then); 60 to 86400.
    #[serde(default = "defaults::console_session_timeout_secs")]
    #[schemars(with = "u64")]
    pub session_timeout_secs: Spanned<u64>,
    /// Groups (of the token's `identity.groups_claim`) whose members read sessions and
    /// their timelines.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub auditor_groups: Vec<Spanned<String>>,
    /// Groups whose members see pending approvals and grants and decide them in the
    /// console; whose approval counts is still approvals.toml's and segregation of duties'.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub approver_groups: Vec<Spanned<String>>,
    /// Groups whose members see the agent's health.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub admin_groups: Vec<Spanned<String>>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            listen: None,
            url: None,
            client_id: None,
            client_secret_file: None,
            tls_cert: None,
            tls_key: None,
            session_timeout_secs: defaults::console_session_timeout_secs(),
            auditor_groups: Vec::new(),
            approver_groups: Vec::new(),
            admin_groups: Vec::new(),
        }
    }
}

/// The console, validated: what the server needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleSettings {
    pub listen: SocketAddr,
    /// `https://host[:port]`, no trailing slash.
    pub url: String,
    pub client_id: String,
    pub client_secret_file: Option<PathBuf>,
    /// Both or neither (validated).
    pub tls: Option<(PathBuf, PathBuf)>,
    pub session_timeout_secs: u64,
    pub auditor_groups: Vec<String>,
    pub approver_groups: Vec<String>,
    pub admin_groups: Vec<String>,
}

impl Config {
    /// The console's settings, `None` when it is off. Valid once `parse` accepted the file.
    pub fn console(&self) -> Option<ConsoleSettings> {
        self.validate_console().ok().flatten()
    }

    fn validate_console(
        &self,
    ) -> Result<Option<ConsoleSettings>, (std::ops::Range<usize>, String)> {
        let c = &self.console;
        let Some(listen) = &c.listen else {
            return Ok(None);
        };
        let listen_at: SocketAddr = listen.get_ref().parse().map_err(|_| {
            (
                listen.span(),
                format!("console.listen: `{}` is not `ip:port`", listen.get_ref()),
            )
        })?;
        if listen_at.port() == 0 {
            return Err((
                listen.span(),
                "console.listen: the port must be 1-65535".into(),
            ));
        }
        if self.identity.issuer.is_none() {
            return Err((
                listen.span(),
                "console.listen: the console signs people in with identity.issuer; set it".into(),
            ));
        }
        let url = match &c.url {
            Some(u) => {
                let text = u.get_ref().trim_end_matches('/');
                check_console_url(text).map_err(|m| (u.span(), format!("console.url: {m}")))?;
                text.to_string()
            }
            None => format!("https://{listen_at}"),
        };
        let tls = match (&c.tls_cert, &c.tls_key) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some((cert.get_ref().clone(), key.get_ref().clone())),
            (Some(one), None) | (None, Some(one)) => {
                return Err((
                    one.span(),
                    "console.tls_cert, console.tls_key: set both, or neither for a certificate from the agent's CA".into(),
                ))
            }
        };
        let timeout = *c.session_timeout_secs.get_ref();
        if !(60..=86_400).contains(&timeout) {
            return Err((
                c.session_timeout_secs.span(),
                format!("console.session_timeout_secs: {timeout} is outside 60 to 86400"),
            ));
        }
        let groups = |key: &str, list: &[Spanned<String>]| {
            list.iter()
                .map(|g| {
                    let name = g.get_ref();
                    if name.is_empty() || name.trim() != name || name.chars().any(char::is_control)
                    {
                        Err((
                            g.span(),
                            format!("console.{key}: `{name}` is empty, has spaces around it or control characters"),
                        ))
                    } else {
                        Ok(name.clone())
                    }
                })
                .collect::<Result<Vec<String>, _>>()
        };
        let auditor_groups = groups("auditor_groups", &c.auditor_groups)?;
        let approver_groups = groups("approver_groups", &c.approver_groups)?;
        let admin_groups = groups("admin_groups", &c.admin_groups)?;
        if auditor_groups.is_empty() && approver_groups.is_empty() && admin_groups.is_empty() {
            return Err((
                listen.span(),
                "console: name at least one group in auditor_groups, approver_groups or admin_groups; \
                 nobody else may sign in"
                    .into(),
            ));
        }
        Ok(Some(ConsoleSettings {
            listen: listen_at,
            url,
            client_id: c
                .client_id
                .clone()
                .unwrap_or_else(|| self.identity.client_id.clone()),
            client_secret_file: c.client_secret_file.clone(),
            tls,
            session_timeout_secs: timeout,
            auditor_groups,
            approver_groups,
            admin_groups,
        }))
    }
}

/// `https://host[:port]` and nothing more: the redirect URI is built from it, and a path,
/// query or credentials would change where the issuer sends the code.
fn check_console_url(url: &str) -> Result<(), String> {
    let Some(rest) = url.strip_prefix("https://") else {
        return Err(format!(
            "`{url}` must start with https:// (the console speaks TLS only)"
        ));
    };
    if rest.is_empty()
        || rest.chars().any(|c| {
            matches!(c, '/' | '?' | '#' | '@' | '\\') || c.is_whitespace() || c.is_control()
        })
    {
        return Err(format!(
            "`{url}` must be https://host or https://host:port, without path, query or user"
        ));
    }
    Ok(())
}

/// `[[approvals.notify]]`: one webhook that receives a POST per approval event, retried
/// with backoff (1 to 16 s, 6 attempts) and then dropped with an
/// `approval.notification_dropped` event; the request goes on either way.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifyConfig {
    /// What logs and events call this webhook (its URL is never shown); default `notify[<index>]`.
    #[serde(default)]
    pub name: Option<String>,
    /// `json`: one object per event; `slack`: a Slack-compatible message (`text` and `blocks`).
    #[serde(default)]
    pub format: NotifyFormat,
    /// https, or plain http on a loopback host only (with `insecure.allow_plaintext_loopback`).
    /// Exactly one of `url` and `url_file`; a URL that is itself a secret (Slack's) goes in
    /// `url_file`.
    #[serde(default)]
    pub url: Option<String>,
    /// Root-only (0600) file holding the URL, for a URL that is itself a credential (a Slack
    /// incoming webhook's); never logged.
    #[serde(default)]
    #[schemars(extend("x-sighup" = "read at start"))]
    pub url_file: Option<PathBuf>,
    /// Root-only (0600) file with a bearer token; never logged.
    #[serde(default)]
    #[schemars(extend("x-sighup" = "read at start"))]
    pub token_file: Option<PathBuf>,
    /// An attempt without a response after this long has failed; 1 to 60.
    #[serde(default = "defaults::webhook_timeout_secs")]
    pub timeout_secs: u64,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum NotifyFormat {
    /// One JSON object per event (docs/approvals.md shows its fields).
    #[default]
    Json,
    /// `{"text": …, "blocks": […]}`, what a Slack incoming webhook (and compatible chat
    /// tools) read.
    Slack,
}

/// `[dns]`: the resolver for targets' `host` names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers (`ip:port`) to ask; empty: those of /etc/resolv.conf.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// A record is asked again no sooner than this, whatever its TTL says.
    #[serde(default = "defaults::dns_min_ttl_secs")]
    pub min_ttl_secs: u64,
    /// ...and no later than this, so a long TTL cannot hide a change for a day.
    #[serde(default = "defaults::dns_max_ttl_secs")]
    pub max_ttl_secs: u64,
}

impl Default for DnsConfig {
    fn default() -> Self {
        Self {
            nameservers: Vec::new(),
            min_ttl_secs: defaults::dns_min_ttl_secs(),
            max_ttl_secs: defaults::dns_max_ttl_secs(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The OpenID Provider users log in with (`portcullis login`). https, or http on loopback.
    #[serde(default)]
    pub issuer: Option<String>,
    /// The agent's client at the issuer: a public client allowed the device grant.
    #[serde(default = "defaults::client_id")]
    pub client_id: String,
    /// Expected `aud` of ID tokens; default: the client id.
    #[serde(default)]
    pub audience: Option<String>,
    /// Scopes the device flow asks for; the issuer must allow every one to this client
    /// (Keycloak: a client scope named `groups`; `offline_access` for refresh tokens).
    #[serde(default = "defaults::scopes")]
    pub scopes: Vec<String>,
    /// Signature algorithms accepted; asymmetric only (no `none`, no HMAC).
    #[serde(default = "defaults::algorithms")]
    pub algorithms: Vec<String>,
    /// Clock skew tolerated when checking a token's `exp`, `nbf` and `iat`.
    #[serde(default = "defaults::leeway_secs")]
    pub leeway_secs: u64,
    /// The ID-token claim that lists the user's groups (what policies test as `groups`).
    #[serde(default = "defaults::groups_claim")]
    pub groups_claim: String,
    /// Refresh a session this long before it expires.
    #[serde(default = "defaults::refresh_before_secs")]
    pub refresh_before_secs: u64,
    /// What happens to a user's open connections when their session ends.
    #[serde(default)]
    pub on_session_end: OnSessionEnd,
    /// Service identities (`[[identity.service]]`).
    #[serde(default, rename = "service")]
    pub services: Vec<ServiceIdentityConfig>,
    /// Issuers of workload tokens (`[[identity.trusted_issuer]]`).
    #[serde(default, rename = "trusted_issuer")]
    pub trusted_issuers: Vec<TrustedIssuerConfig>,
}

/// `[limits]`: per-uid bounds, so one local user cannot exhaust the agent for everybody.
/// The defaults are far above what a person or an application pool opens and well within
/// what a flood reaches in a second. Past a limit a connection is refused (PostgreSQL
/// clients read 53300 too_many_connections) and the refusals of each uid are summarized:
/// the first of each `summary_interval_secs` is recorded in full, the rest as one
/// `connection.refused` event with a `count`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Connections one uid may have open at once (start-up included).
    #[serde(default = "defaults::max_open_per_uid")]
    pub max_open_per_uid: usize,
    /// PostgreSQL connections one uid may have in start-up: a client that has not finished
    /// authenticating may hold one for 30 s. (Plain TCP has no start-up of the client's.)
    #[serde(default = "defaults::max_startup_per_uid")]
    pub max_startup_per_uid: usize,
    /// `portcullis login` device flows one uid may have waiting at once.
    #[serde(default = "defaults::max_pending_logins_per_uid")]
    pub max_pending_logins_per_uid: usize,
    /// New connections a second one uid may open, sustained...
    #[serde(default = "defaults::new_connections_per_sec")]
    pub new_connections_per_sec: u32,
    /// ...and at once, after a pause (a pool opening its connections).
    #[serde(default = "defaults::new_connections_burst")]
    pub new_connections_burst: u32,
    /// How often the count of refusals not recorded one by one is written.
    /// Every limit in this section must be at least 1.
    #[serde(default = "defaults::summary_interval_secs")]
    pub summary_interval_secs: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_open_per_uid: defaults::max_open_per_uid(),
            max_startup_per_uid: defaults::max_startup_per_uid(),
            max_pending_logins_per_uid: defaults::max_pending_logins_per_uid(),
            new_connections_per_sec: defaults::new_connections_per_sec(),
            new_connections_burst: defaults::new_connections_burst(),
            summary_interval_secs: defaults::summary_interval_secs(),
        }
    }
}

impl LimitsConfig {
    /// A limit of 0 would refuse every connection (or login) of every user: a typo, not a
    /// policy; `policy` is where connections are denied.
    fn validate(&self) -> Result<(), String> {
        let zero = [
            ("max_open_per_uid", self.max_open_per_uid == 0),
            ("max_startup_per_uid", self.max_startup_per_uid == 0),
            (
                "max_pending_logins_per_uid",
                self.max_pending_logins_per_uid == 0,
            ),
            ("new_connections_burst", self.new_connections_burst == 0),
            ("summary_interval_secs", self.summary_interval_secs == 0),
        ];
        match zero.iter().find(|(_, z)| *z) {
            Some((key, _)) => Err(format!("limits.{key} must be at least 1")),
            None => Ok(()),
        }
    }
}

/// `audit.on_write_failure`: what the agent does while the audit store cannot be written
/// (disk full, I/O error).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OnWriteFailure {
    /// Fail closed: new connections are refused and open PostgreSQL sessions end at their
    /// next message, until a write succeeds again.
    #[default]
    Refuse,
    /// Keep deciding and masking without a trail: connections open and statements run
    /// although their events are lost (and counted).
    KeepEnforcing,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// Fail closed (`refuse`, the default) or keep serving (`keep_enforcing`) while the
    /// store cannot be written.
    #[serde(default)]
    pub on_write_failure: OnWriteFailure,
    /// The hash-chained store; default `<state_dir>/audit`.
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// The open segment is sealed (and signed) once it holds this many bytes...
    #[serde(default = "defaults::max_segment_bytes")]
    pub max_segment_bytes: u64,
    /// ...or is this old.
    #[serde(default = "defaults::max_segment_age_secs")]
    pub max_segment_age_secs: u64,
    /// Compress each sealed segment (zstd, `segment-N.jsonl.zst`) within seconds of its seal.
    /// The chain covers the decompressed lines: `audit verify`, search, export and the
    /// shippers read either form. Off: sealed segments stay plain JSON lines.
    #[serde(default = "defaults::compress_sealed_segments")]
    pub compress_sealed_segments: bool,
    /// Root-only file with an Ed25519 seed (64 hex characters): signs each sealed segment.
    #[serde(default)]
    pub signing_key_file: Option<PathBuf>,
    /// Delete sealed segments older than this many days (never what is not shipped yet).
    /// Unset: nothing is deleted by age.
    #[serde(default)]
    pub retention_days: Option<u64>,
    /// Delete the oldest sealed segments while the store is larger than this (bytes).
    /// Unset: nothing is deleted by size.
    #[serde(default)]
    pub retention_max_bytes: Option<u64>,
    /// Optional central PostgreSQL the local store is shipped to (`docs/audit-central.md`).
    #[serde(default)]
    pub central: Option<CentralConfig>,
    /// Optional RFC 5424 syslog stream to a SIEM (`docs/audit-siem.md`).
    #[serde(default)]
    pub syslog: Option<SyslogConfig>,
    /// Optional HTTP(S) webhook receiving NDJSON batches (`docs/audit-siem.md`).
    #[serde(default)]
    pub webhook: Option<WebhookConfig>,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self {
            on_write_failure: OnWriteFailure::Refuse,
            dir: None,
            max_segment_bytes: defaults::max_segment_bytes(),
            max_segment_age_secs: defaults::max_segment_age_secs(),
            compress_sealed_segments: defaults::compress_sealed_segments(),
            signing_key_file: None,
            retention_days: None,
            retention_max_bytes: None,
            central: None,
            syslog: None,
            webhook: None,
        }
    }
}

/// `[audit.central]`: where the fleet's audit trail is collected. The local store is the
/// spool, so an outage delays shipping but loses nothing.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CentralConfig {
    /// `postgres://user@host:port/db`, without a password (use `password_file`).
    pub url: String,
    /// Root-only file holding the role's password.
    #[serde(default)]
    #[schemars(extend("x-sighup" = "restart to change the path; the file is read again at each reconnect"))]
    pub password_file: Option<PathBuf>,
    /// TLS to the central server.
    #[serde(default)]
    pub tls: CentralTls,
    /// PEM CA bundle that signs the server's certificate; default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Records per transaction, 1 to 10000.
    #[serde(default = "defaults::central_batch_size")]
    pub batch_size: usize,
    /// Unshipped records the local store may hold before `on_spool_full` applies.
    #[serde(default = "defaults::spool_max_bytes")]
    pub spool_max_bytes: u64,
    /// What happens once the unshipped backlog passes `spool_max_bytes`.
    #[serde(default)]
    pub on_spool_full: OnSpoolFull,
    /// This bastion's name in the central table; default: the kernel hostname.
    #[serde(default)]
    pub host_name: Option<String>,
    /// A role allowed to run DDL: when set, the agent creates or migrates the schema at start.
    /// Without it an administrator runs the migration (`docs/audit-central.md`).
    #[serde(default)]
    pub migrate_url: Option<String>,
    /// Root-only file holding the password of `migrate_url`'s role.
    #[serde(default)]
    pub migrate_password_file: Option<PathBuf>,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum CentralTls {
    /// TLS with the certificate and the host name verified (libpq's `verify-full`).
    #[default]
    Require,
    /// Plain TCP or a Unix socket; accepted for loopback hosts only.
    Disable,
}

/// `[audit.syslog]`: RFC 5424 over TCP (octet-counting framing), TLS by default. The local
/// store is the spool, as for `[audit.central]`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyslogConfig {
    /// `host:port` (`[v6]:port` for an IPv6 literal).
    pub address: String,
    /// TLS to the receiver.
    #[serde(default)]
    pub tls: SyslogTls,
    /// PEM CA bundle that signs the receiver's certificate; default: the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The name the certificate must carry; default: the host part of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// RFC 5424 facility name: `kern`, `user`, `mail`, `daemon`, `auth`, `syslog`, `lpr`,
    /// `news`, `uucp`, `cron`, `authpriv`, `ftp`, `local0`..`local7`.
    #[serde(default = "defaults::syslog_facility")]
    pub facility: String,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SyslogTls {
    /// RFC 5425: TLS with the certificate and the host name verified.
    #[default]
    Require,
    /// Plain TCP; accepted for loopback addresses only.
    Disable,
}

/// `[audit.webhook]`: NDJSON batches POSTed to a SIEM's HTTP collector.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// https, or plain http on a loopback host only.
    pub url: String,
    /// Root-only (0600) file with a bearer token; never logged.
    #[schemars(extend("x-sighup" = "restart to change the path; the file is read again at each reconnect"))]
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Records per request, 1 to 10000.
    #[serde(default = "defaults::webhook_batch_size")]
    pub batch_size: usize,
    /// Body bytes per request, at least 1024 (a single larger record is still sent, alone).
    #[serde(default = "defaults::webhook_max_batch_bytes")]
    pub max_batch_bytes: usize,
    /// A request without a response after this long is retried; 1 to 300.
    #[serde(default = "defaults::webhook_timeout_secs")]
    pub timeout_secs: u64,
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum OnSpoolFull {
    /// Keep proxying and recording locally; alert once per episode (`audit.spool_full`).
    #[default]
    KeepEnforcing,
    /// Fail closed: refuse new connections until the backlog is under the bound again.
    RefuseConnections,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Cedar policies (`*.cedar`) plus `masking.toml` and `approvals.toml`. Reloaded on
    /// SIGHUP and when the files change; a missing or empty directory denies everything.
    #[serde(default = "defaults::policy_dir")]
    #[schemars(extend("x-sighup" = "restart to change the directory; its files are re-read on SIGHUP and when they change"))]
    pub dir: PathBuf,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            dir: defaults::policy_dir(),
        }
    }
}

#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum OnSessionEnd {
    /// The user's proxied connections are closed when the login expires.
    #[default]
    Close,
    /// Open connections stay; new ones need a new login.
    Keep,
}

/// A non-human identity: processes of `uid`, or of systemd unit `unit`, act as this
/// OIDC client (client-credentials grant at the main issuer).
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceIdentityConfig {
    /// The name policies and the audit trail know the service by.
    pub name: String,
    /// Processes of this uid act as the service (exactly one of `uid` and `unit`).
    #[serde(default)]
    pub uid: Option<u32>,
    /// Processes of this systemd unit (`billing.service`) act as the service.
    #[serde(default)]
    pub unit: Option<String>,
    /// Its confidential client at the issuer (client-credentials grant).
    pub client_id: String,
    /// Root-only file holding the client secret.
    pub client_secret_file: PathBuf,
    /// Scopes asked for with the client-credentials grant.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// An issuer of workload tokens (CI pipelines) accepted by `portcullis login --token-file`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TrustedIssuerConfig {
    /// The token issuer (`iss`), https (plain http on loopback only with
    /// `insecure.allow_plaintext_loopback`).
    pub issuer: String,
    /// The `aud` the token must carry.
    pub audience: String,
    /// Claims that must equal these values (e.g. `repository = "acme/infra"`); at least one.
    #[serde(default)]
    pub required_claims: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InsecureConfig {
    /// Attribute connections to the Unix account alone, without an OIDC login. Refused
    /// together with an issuer: it would let in, silently, every uid that has no login.
    #[serde(default)]
    pub unix_identity_only: bool,
    /// Accept plain `http://` issuers, syslog, webhook and central store without TLS on
    /// loopback. Off by default: a local user who binds that port before the real service
    /// could mint tokens or read the audit trail.
    #[serde(default)]
    pub allow_plaintext_loopback: bool,
}

impl InsecureConfig {
    /// The settings that are on, by their key, for the start-up warning and `status`.
    pub fn enabled(&self) -> Vec<&'static str> {
        let mut on = Vec::new();
        if self.unix_identity_only {
            on.push("insecure.unix_identity_only");
        }
        if self.allow_plaintext_loopback {
            on.push("insecure.allow_plaintext_loopback");
        }
        on
    }
}

impl Default for IdentityConfig {
    fn default() -> Self {
        Self {
            issuer: None,
            client_id: defaults::client_id(),
            audience: None,
            scopes: defaults::scopes(),
            algorithms: defaults::algorithms(),
            leeway_secs: defaults::leeway_secs(),
            groups_claim: defaults::groups_claim(),
            refresh_before_secs: defaults::refresh_before_secs(),
            on_session_end: OnSessionEnd::Close,
            services: Vec::new(),
            trusted_issuers: Vec::new(),
        }
    }
}

/// Accepts https, and plain http only on loopback where nothing crosses a network.
pub fn check_issuer_url(url: &str) -> Result<(), String> {
    if url.starts_with("https://") {
        return Ok(());
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!("issuer `{url}` must be an https URL"));
    };
    let host = rest.split('/').next().unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((h, port)) if port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(format!(
            "issuer `{url}` must use https (plain http is accepted on loopback only)"
        ))
    }
}

pub fn parse_algorithm(name: &str) -> Result<jsonwebtoken::Algorithm, String> {
    use jsonwebtoken::Algorithm::*;
    let alg = match name {
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        "HS256" | "HS384" | "HS512" => {
            return Err(format!(
            "`{name}` is an HMAC algorithm; ID tokens must be signed with the issuer's private key"
        ))
        }
        other => return Err(format!("unknown signature algorithm `{other}`")),
    };
    Ok(alg)
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// The Unix socket the CLI (`portcullis status`, `login`, ...) talks to.
    #[serde(default = "defaults::control_socket")]
    pub socket: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// IPv4 listener for redirected connections. Loopback: only this host's clients reach it.
    #[serde(default = "defaults::listen_ipv4")]
    pub listen_ipv4: Ipv4Addr,
    /// IPv6 listener; native IPv6 destinations are redirected here.
    #[serde(default = "defaults::listen_ipv6")]
    pub listen_ipv6: Ipv6Addr,
    /// A privileged port (below 1024) by default: while the agent is down, a normal user
    /// cannot bind it to catch the redirected connections of others.
    #[serde(default = "defaults::port")]
    pub port: u16,
    /// `SO_MARK` on the agent's own upstream sockets, which the kernel programs exempt.
    /// Not 0.
    #[serde(default = "defaults::upstream_mark")]
    pub upstream_mark: u32,
    /// Connecting to the upstream gives up after this long.
    #[serde(default = "defaults::connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// A connection with no traffic in either direction for this long is closed.
    #[serde(default = "defaults::idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// On SIGTERM, open connections get this long to finish.
    #[serde(default = "defaults::drain_timeout_secs")]
    pub drain_timeout_secs: u64,
    /// Upper bound on concurrently proxied connections; beyond it new ones are refused.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Threads that run proxied connections, each with its own event loop; connections are
    /// handed to them in turn. 0 (the default): half the CPUs, at least one, since a bastion's
    /// clients run on the same machine and need the other half. At most 256.
    #[serde(default)]
    #[schemars(with = "Option<usize>")]
    pub threads: Option<Spanned<usize>>,
}

impl ProxyConfig {
    /// The most `threads` may say: more event loops than that only add wake-ups.
    pub const MAX_THREADS: usize = 256;

    /// `threads`, with 0 resolved against this machine's CPUs.
    pub fn proxy_threads(&self) -> usize {
        match self.threads.as_ref().map_or(0, |t| *t.get_ref()) {
            0 => std::thread::available_parallelism()
                .map_or(1, |n| n.get() / 2)
                .max(1),
            n => n,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BpfConfig {
    /// cgroup v2 directory to attach to; default: the root of the cgroup2 mount,
    /// so every process on the host is covered.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for pins; the layout version is appended (`…/v1`).
    #[serde(default = "defaults::pin_dir")]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Bytes relayed as they are; connect is decided, nothing inside.
    Tcp,
    /// PostgreSQL: TLS to the client, credentials injected, every statement decided.
    Postgres,
    /// SSH: terminated with the agent's host certificate, a short-lived user certificate
    /// upstream, every channel decided.
    Ssh,
}

impl Protocol {
    /// The name audit events carry, shared rather than allocated per event.
    pub fn name(self) -> std::sync::Arc<str> {
        static TCP: std::sync::OnceLock<std::sync::Arc<str>> = std::sync::OnceLock::new();
        static POSTGRES: std::sync::OnceLock<std::sync::Arc<str>> = std::sync::OnceLock::new();
        static SSH: std::sync::OnceLock<std::sync::Arc<str>> = std::sync::OnceLock::new();
        let (cell, name) = match self {
            Protocol::Tcp => (&TCP, "tcp"),
            Protocol::Postgres => (&POSTGRES, "postgres"),
            Protocol::Ssh => (&SSH, "ssh"),
        };
        std::sync::Arc::clone(cell.get_or_init(|| std::sync::Arc::from(name)))
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("tcp"),
            Protocol::Postgres => f.write_str("postgres"),
            Protocol::Ssh => f.write_str("ssh"),
        }
    }
}

/// How the agent protects its connection to a PostgreSQL server. Anything other than
/// `verify-full` is named `insecure-…` on purpose: it belongs in a lab, not in production.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
pub enum UpstreamTls {
    /// TLS, the server's certificate verified against `ca_file` (or the system roots) and
    /// its name (`server_name`, or the upstream IP address).
    #[default]
    #[serde(rename = "verify-full")]
    VerifyFull,
    /// TLS without verifying the certificate: encrypted, but anyone on the path can pose
    /// as the server and learn the injected credential (SCRAM excepted).
    #[serde(rename = "insecure-skip-verify")]
    InsecureSkipVerify,
    /// No TLS at all: the credential exchange and every row cross the network in clear.
    #[serde(rename = "insecure-plaintext")]
    InsecurePlaintext,
}

/// `[target.postgres]`: how the agent terminates PostgreSQL clients and reaches the server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PostgresTargetConfig {
    /// Host names clients use for this target; they go into the certificate the agent's
    /// local CA issues, so `sslmode=verify-full` works with `psql -h <name>`.
    #[serde(default)]
    pub server_names: Vec<String>,
    /// How the agent's own connection to the server is protected.
    #[serde(default)]
    pub tls: UpstreamTls,
    /// CA certificates (PEM) that sign the server's certificate; default: the system roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The name the server's certificate must carry; default: the upstream IP address.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Root-only TOML file with the upstream passwords: `[roles.<role>] password = "…"`.
    /// An absolute path.
    #[schemars(with = "PathBuf", extend("x-sighup" = "restart to change the path; the file is read at every connection, so a changed password applies to the next one"))]
    pub credentials_file: Spanned<PathBuf>,
    /// Largest protocol message accepted from either side, at least 1024; a larger one ends
    /// the session.
    #[serde(default = "defaults::max_message_bytes")]
    pub max_message_bytes: usize,
    /// Keep the server sessions of ended client sessions, authenticated and reset with
    /// `DISCARD ALL`, for the next client of the same database, role and start-up settings
    /// (docs/postgres.md "Upstream pool"). Off when absent: every client gets a server
    /// session of its own.
    #[serde(default)]
    #[schemars(with = "Option<PoolConfig>")]
    pub pool: Option<Spanned<PoolConfig>>,
}

/// `pool = { size = 20, idle_timeout_secs = 300 }` in `[target.postgres]`: one pool per
/// (database, role, start-up settings) of the target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// Most server sessions one pool holds, lent and idle together (1 to 10000).
    pub size: u32,
    /// An idle server session is closed (with a Terminate) after this many seconds (1 to
    /// 86400).
    #[serde(default = "defaults::pool_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// How long a client waits for a server session when the pool's `size` are all lent,
    /// before it is refused with SQLSTATE 53300 (0 to 600; 0: refused at once).
    #[serde(default = "defaults::pool_wait_secs")]
    pub wait_secs: u64,
}

/// `[target.ssh]`: how the agent terminates SSH clients and logs in upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SshTargetConfig {
    /// Names clients type for this target (`ssh prod-web-3`); with the target's addresses
    /// and its DNS `host` they are the principals of the host certificate the agent presents.
    #[serde(default)]
    pub host_names: Vec<String>,
    /// The upstream server's host keys in OpenSSH's known_hosts format, read as OpenSSH
    /// reads it (a line applies when its hosts match the target's names or addresses:
    /// patterns, `!` negation, `[host]:port` for a port other than 22, `ssh-keygen -H` hashed
    /// names; `@cert-authority` lines; `@revoked` keys refused whatever their hosts); a key it
    /// does not list refuses the connection. An absolute path.
    #[schemars(with = "PathBuf")]
    pub known_hosts_file: Spanned<PathBuf>,
    /// Instead of a user certificate from the agent's SSH user CA: a root-only private key
    /// (OpenSSH format) the agent logs in with. An absolute path.
    #[serde(default)]
    #[schemars(with = "Option<PathBuf>")]
    pub private_key_file: Option<Spanned<PathBuf>>,
    /// How long a per-connection user certificate is valid, in minutes (1 to 1440).
    #[serde(default = "defaults::ssh_certificate_minutes")]
    pub certificate_minutes: u32,
    /// Seconds between keepalives on both legs (0: none); three unanswered end the session.
    #[serde(default = "defaults::ssh_keepalive_secs")]
    pub keepalive_secs: u64,
    /// Record what the user types (`i` events) in shell recordings, besides what the
    /// terminal shows. Off by default: typed input holds passwords given at prompts.
    #[serde(default)]
    pub record_input: bool,
    /// Guarded shell: every line typed at an interactive shell is decided by policy
    /// (`ssh_exec` with `context.guarded_line`) before its Enter reaches the target; a
    /// denied line is cleared. A guardrail, not a sandbox (docs/ssh.md).
    #[serde(default)]
    pub guarded_shell: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    /// Unique; letters, digits, `-`, `_` and `.`. Policies and the audit trail use it.
    #[schemars(with = "String")]
    pub name: Spanned<String>,
    /// What the proxy speaks with clients of this target.
    pub protocol: Protocol,
    /// An IP address, a CIDR, or `any`.
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub address: Option<Spanned<String>>,
    /// More addresses or CIDRs of the same service (its other interfaces, IPv6 beside
    /// IPv4): a host reachable under an address that is not listed is not protected there.
    #[serde(default)]
    #[schemars(with = "Vec<String>")]
    pub addresses: Vec<Spanned<String>>,
    /// A DNS name: every A and AAAA record is protected, resolved at start, again when the
    /// records' TTL runs out, and on SIGHUP.
    #[serde(default)]
    #[schemars(with = "Option<String>", extend("x-sighup" = "restart to change the name; its records are resolved again on SIGHUP"))]
    pub host: Option<Spanned<String>>,
    /// The destination port, 1 to 65535 (not the proxy's own listener).
    #[schemars(with = "u16")]
    pub port: Spanned<u16>,
    /// Where to connect instead of the original destination (`ip:port`).
    #[serde(default)]
    #[schemars(with = "Option<String>")]
    pub upstream: Option<Spanned<String>>,
    /// Labels policies can test (`environment = "production"`).
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
    /// Required for `protocol = "postgres"`, refused for others.
    #[serde(default)]
    pub postgres: Option<PostgresTargetConfig>,
    /// Required for `protocol = "ssh"`, refused for others.
    #[serde(default)]
    pub ssh: Option<SshTargetConfig>,
    /// What a recorded session (SSH shells) does when its recording cannot be written:
    /// `close` ends it (the default), `continue` lets it go on unrecorded, with a
    /// `recording.failed` event saying so.
    #[serde(default)]
    pub recording_failure: RecordingFailure,
    /// What a connection does when a policy asks for approval to open it and no grant
    /// covers it: `false` (the default) refuses it, naming the approval request made for
    /// it (connect again once approved); `true` holds it open, unanswered, until the
    /// request is decided or expires (approvals.toml `timeout_seconds`), then goes on or is
    /// refused. A PostgreSQL client is told which request it waits for (a NOTICE); a plain
    /// TCP client hears nothing. Refused on an SSH target: its connections are refused with
    /// the request named (its commands and shells wait by themselves).
    #[serde(default)]
    pub wait_for_approval: bool,
}

/// `recording_failure` of a target: fail closed or keep the session without a recording.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum RecordingFailure {
    /// Fail closed: the session ends once a chunk or its audit event cannot be written.
    #[default]
    Close,
    /// The session goes on unrecorded; the audit trail records the failure.
    Continue,
}

/// What a `[[target]]` protects, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAddress {
    Any,
    Net(IpNet),
}

impl TargetAddress {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("any") || s == "*" {
            return Ok(Self::Any);
        }
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Self::Net(net.trunc()));
        }
        match s.parse::<IpAddr>() {
            Ok(ip) => Ok(Self::Net(IpNet::from(ip))),
            Err(_) => Err(format!(
                "`{s}` is not an IP address, a CIDR (10.0.0.0/24) or `any`"
            )),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        match self {
            Self::Any => true,
            Self::Net(net) => net.contains(&ip),
        }
    }
}

impl fmt::Display for TargetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::Net(n) if n.prefix_len() == n.max_prefix_len() => write!(f, "{}", n.addr()),
            Self::Net(n) => write!(f, "{n}"),
        }
    }
}

/// A validated target, as the rest of the agent uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedTarget {
    pub id: u32,
    pub name: String,
    pub protocol: Protocol,
    /// The configured addresses and CIDRs (`address` and `addresses`); a `host`'s
    /// addresses change at run time and live in the resolver's `ResolvedHosts`.
    pub addresses: Vec<TargetAddress>,
    /// The DNS name whose A and AAAA records are protected too.
    pub host: Option<String>,
    pub port: u16,
    pub upstream: Option<SocketAddr>,
    pub labels: std::collections::BTreeMap<String, String>,
    /// Set exactly when `protocol` is `Postgres`.
    pub postgres: Option<std::sync::Arc<PostgresTargetConfig>>,
    /// Set exactly when `protocol` is `Ssh`.
    pub ssh: Option<std::sync::Arc<SshTargetConfig>>,
    /// Whether a recorded session ends when its recording cannot be written.
    pub recording_failure: RecordingFailure,
    /// Whether a connection that needs approval waits for it instead of being refused.
    pub wait_for_approval: bool,
}

/// Addresses (configured, and resolved from `host`) one target may protect; the kernel's
/// trie holds `MAX_TARGETS` entries in all.
pub const MAX_ADDRESSES_PER_TARGET: usize = 64;

impl ProtectedTarget {
    /// Whether a configured address or CIDR of this target covers `ip` (a `host`'s
    /// resolved addresses are asked of the resolver's `ResolvedHosts`).
    pub fn covers(&self, ip: IpAddr) -> bool {
        self.addresses.iter().any(|a| a.contains(ip))
    }

    /// The configured addresses and the host name, for status and logs.
    pub fn describe_addresses(&self) -> String {
        let mut parts: Vec<String> = self.addresses.iter().map(ToString::to_string).collect();
        if let Some(host) = &self.host {
            parts.push(format!("host {host}"));
        }
        parts.join(", ")
    }
}

/// Checks a `host` value and returns it in the form that is looked up: lower case, no
/// trailing dot. Only names: an address belongs in `address`/`addresses`.
pub fn validate_host_name(name: &str) -> Result<String, String> {
    let lower = name.trim().trim_end_matches('.').to_ascii_lowercase();
    if lower.parse::<IpAddr>().is_ok() {
        return Err(format!(
            "`{name}` is an address; list it in `address` or `addresses`"
        ));
    }
    if lower.is_empty() || lower.len() > 253 {
        return Err(format!("`{name}` is not a DNS name (1 to 253 characters)"));
    }
    let labels: Vec<&str> = lower.split('.').collect();
    for label in &labels {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !ok {
            return Err(format!(
                "`{name}` is not a DNS name (labels of letters, digits and inner `-`, 1 to 63 characters)"
            ));
        }
    }
    if labels
        .last()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "`{name}` is not a DNS name (all-numeric last label)"
        ));
    }
    Ok(lower)
}

pub use portcullis_core::canonical_ip;

mod defaults {
    use super::*;
    pub fn state_dir() -> PathBuf {
        PathBuf::from("/var/lib/portcullis")
    }
    pub fn control_socket() -> PathBuf {
        PathBuf::from(DEFAULT_CONTROL_SOCKET)
    }
    pub fn listen_ipv4() -> Ipv4Addr {
        Ipv4Addr::LOCALHOST
    }
    pub fn listen_ipv6() -> Ipv6Addr {
        Ipv6Addr::LOCALHOST
    }
    pub fn port() -> u16 {
        940
    }
    pub fn upstream_mark() -> u32 {
        0x5043_4c53
    }
    pub fn dns_min_ttl_secs() -> u64 {
        5
    }
    pub fn dns_max_ttl_secs() -> u64 {
        300
    }
    pub fn connect_timeout_secs() -> u64 {
        10
    }
    pub fn idle_timeout_secs() -> u64 {
        3600
    }
    pub fn drain_timeout_secs() -> u64 {
        30
    }
    pub fn max_connections() -> usize {
        20_000
    }
    pub fn max_open_per_uid() -> usize {
        1_000
    }
    pub fn max_startup_per_uid() -> usize {
        64
    }
    pub fn max_pending_logins_per_uid() -> usize {
        4
    }
    pub fn new_connections_per_sec() -> u32 {
        200
    }
    pub fn new_connections_burst() -> u32 {
        400
    }
    pub fn summary_interval_secs() -> u64 {
        10
    }
    pub fn pin_dir() -> PathBuf {
        PathBuf::from("/sys/fs/bpf/portcullis")
    }
    pub fn max_message_bytes() -> usize {
        64 * 1024 * 1024
    }
    pub fn pool_idle_timeout_secs() -> u64 {
        300
    }
    pub fn pool_wait_secs() -> u64 {
        5
    }
    pub fn ssh_certificate_minutes() -> u32 {
        5
    }
    pub fn ssh_keepalive_secs() -> u64 {
        15
    }
    pub fn max_segment_bytes() -> u64 {
        64 * 1024 * 1024
    }
    pub fn max_segment_age_secs() -> u64 {
        3600
    }
    pub fn compress_sealed_segments() -> bool {
        true
    }
    pub fn policy_dir() -> PathBuf {
        PathBuf::from("/etc/portcullis/policies")
    }
    pub fn client_id() -> String {
        "portcullis".into()
    }
    pub fn scopes() -> Vec<String> {
        ["openid", "email", "profile", "groups", "offline_access"]
            .map(String::from)
            .to_vec()
    }
    pub fn algorithms() -> Vec<String> {
        ["RS256", "PS256", "ES256", "EdDSA"]
            .map(String::from)
            .to_vec()
    }
    pub fn leeway_secs() -> u64 {
        60
    }
    pub fn groups_claim() -> String {
        "groups".into()
    }
    pub fn refresh_before_secs() -> u64 {
        120
    }
    pub fn central_batch_size() -> usize {
        500
    }
    pub fn spool_max_bytes() -> u64 {
        1024 * 1024 * 1024
    }
    pub fn syslog_facility() -> String {
        "authpriv".into()
    }
    pub fn webhook_batch_size() -> usize {
        100
    }
    pub fn webhook_max_batch_bytes() -> usize {
        1024 * 1024
    }
    pub fn webhook_timeout_secs() -> u64 {
        10
    }
    pub fn console_session_timeout_secs() -> Spanned<u64> {
        Spanned::new(0..0, 3600)
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            socket: defaults::control_socket(),
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen_ipv4: defaults::listen_ipv4(),
            listen_ipv6: defaults::listen_ipv6(),
            port: defaults::port(),
            upstream_mark: defaults::upstream_mark(),
            connect_timeout_secs: defaults::connect_timeout_secs(),
            idle_timeout_secs: defaults::idle_timeout_secs(),
            drain_timeout_secs: defaults::drain_timeout_secs(),
            max_connections: defaults::max_connections(),
            threads: None,
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<(Config, Vec<ProtectedTarget>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates; `path` only names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<(Config, Vec<ProtectedTarget>), ConfigError> {
        let at = |span: Option<std::ops::Range<usize>>, message: String| {
            let (line, column) = line_col(text, span.map_or(0, |s| s.start));
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                column,
                message,
            }
        };
        let config: Config =
            toml::from_str(text).map_err(|e| at(e.span(), e.message().to_string()))?;
        let targets = config
            .validate()
            .map_err(|(span, message)| at(Some(span), message))?;
        let spans: KeySpans =
            toml::from_str(text).map_err(|e| at(e.span(), e.message().to_string()))?;
        config
            .validate_trust(&spans)
            .map_err(|(span, message)| at(Some(span), message))?;
        Ok((config, targets))
    }

    /// What the agent trusts without proof: plaintext on loopback, issuers whose tokens
    /// anyone can get, and the Unix account in place of a login.
    fn validate_trust(&self, spans: &KeySpans) -> Result<(), (std::ops::Range<usize>, String)> {
        let id = &self.identity;
        let plaintext_ok = self.insecure.allow_plaintext_loopback;
        let plain = |span: Option<std::ops::Range<usize>>, key: &str, what: &str, risk: &str| {
            (
                span.unwrap_or(0..0),
                format!(
                    "{key}: {what} on loopback is accepted only with `insecure.allow_plaintext_loopback = true` \
                     (a local user who binds that port before the real service {risk}); use TLS"
                ),
            )
        };
        let mint = "answers as the issuer and can mint tokens";
        let read = "receives the audit trail";
        if let Some(issuer) = &id.issuer {
            if issuer.starts_with("http://") && !plaintext_ok {
                return Err(plain(
                    spans.identity.issuer.as_ref().map(Spanned::span),
                    "identity.issuer",
                    &format!("plain http (`{issuer}`)"),
                    mint,
                ));
            }
        }
        for (i, t) in id.trusted_issuers.iter().enumerate() {
            let span = spans
                .identity
                .trusted_issuer
                .get(i)
                .and_then(|s| s.issuer.as_ref())
                .map(Spanned::span);
            if t.issuer.starts_with("http://") && !plaintext_ok {
                return Err(plain(
                    span,
                    &format!("identity.trusted_issuer[{i}].issuer"),
                    &format!("plain http (`{}`)", t.issuer),
                    mint,
                ));
            }
            // A public CI issuer (GitHub Actions, GitLab) signs a token for any pipeline
            // that asks; only the claims say whose pipeline it is.
            if t.required_claims.is_empty() {
                return Err((
                    span.unwrap_or(0..0),
                    format!(
                        "identity.trusted_issuer[{i}] (`{}`): set at least one entry in `required_claims` \
                         (e.g. `repository = \"acme/infra\"`): the issuer signs tokens for anyone who asks",
                        t.issuer
                    ),
                ));
            }
        }
        if let Some(syslog) = &self.audit.syslog {
            if syslog.tls == SyslogTls::Disable && !plaintext_ok {
                return Err(plain(
                    spans.audit.syslog.tls.as_ref().map(Spanned::span),
                    "audit.syslog.tls",
                    "\"disable\"",
                    read,
                ));
            }
        }
        if let Some(webhook) = &self.audit.webhook {
            if webhook.url.starts_with("http://") && !plaintext_ok {
                return Err(plain(
                    spans.audit.webhook.url.as_ref().map(Spanned::span),
                    "audit.webhook.url",
                    "plain http",
                    read,
                ));
            }
        }
        for (i, n) in self.approvals.notify.iter().enumerate() {
            if n.url.as_deref().is_some_and(|u| u.starts_with("http://")) && !plaintext_ok {
                return Err(plain(
                    spans
                        .approvals
                        .notify
                        .get(i)
                        .and_then(|s| s.url.as_ref())
                        .map(Spanned::span),
                    &format!("approvals.notify[{i}].url"),
                    "plain http",
                    "receives every approval request",
                ));
            }
        }
        if let Some(central) = &self.audit.central {
            if central.tls == CentralTls::Disable && !plaintext_ok {
                return Err(plain(
                    spans.audit.central.tls.as_ref().map(Spanned::span),
                    "audit.central.tls",
                    "\"disable\" (TCP or a Unix socket)",
                    read,
                ));
            }
        }
        if self.insecure.unix_identity_only
            && (id.issuer.is_some() || !id.trusted_issuers.is_empty())
        {
            return Err((
                spans
                    .insecure
                    .unix_identity_only
                    .as_ref()
                    .map_or(0..0, Spanned::span),
                "insecure.unix_identity_only: cannot be combined with identity.issuer or identity.trusted_issuer: \
                 every uid without a login would be let in, silently, as its Unix account; remove one"
                    .into(),
            ));
        }
        Ok(())
    }

    fn validate(&self) -> Result<Vec<ProtectedTarget>, (std::ops::Range<usize>, String)> {
        self.limits.validate().map_err(|m| (0..0, m))?;
        let mut out: Vec<ProtectedTarget> = Vec::with_capacity(self.targets.len());
        if self.targets.len() > portcullis_common::MAX_TARGETS as usize {
            return Err((
                0..0,
                format!(
                    "{} targets configured; at most {} are supported",
                    self.targets.len(),
                    portcullis_common::MAX_TARGETS
                ),
            ));
        }
        for (i, t) in self.targets.iter().enumerate() {
            let name = t.name.get_ref().trim();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err((
                    t.name.span(),
                    format!("target[{i}].name: `{name}` must be non-empty and use only letters, digits, `-`, `_` and `.`"),
                ));
            }
            if out.iter().any(|o| o.name == name) {
                return Err((
                    t.name.span(),
                    format!("target[{i}].name: `{name}` is used twice"),
                ));
            }
            let port = *t.port.get_ref();
            if port == 0 {
                return Err((t.port.span(), format!("target[{i}].port: must be 1-65535")));
            }
            let mut addresses = Vec::with_capacity(1 + t.addresses.len());
            let listed = t
                .address
                .iter()
                .map(|a| (a, "address"))
                .chain(t.addresses.iter().map(|a| (a, "addresses")));
            for (a, key) in listed {
                let address = TargetAddress::parse(a.get_ref())
                    .map_err(|m| (a.span(), format!("target[{i}].{key}: {m}")))?;
                if port == self.proxy.port
                    && (address.contains(IpAddr::V4(self.proxy.listen_ipv4))
                        || address.contains(IpAddr::V6(self.proxy.listen_ipv6)))
                {
                    return Err((
                        a.span(),
                        format!(
                            "target[{i}] covers the proxy's own listener (port {port}); that would redirect the proxy into itself"
                        ),
                    ));
                }
                if !addresses.contains(&address) {
                    addresses.push(address);
                }
            }
            let host = match &t.host {
                None => None,
                Some(h) => Some(
                    validate_host_name(h.get_ref())
                        .map_err(|m| (h.span(), format!("target[{i}].host: {m}")))?,
                ),
            };
            if addresses.is_empty() && host.is_none() {
                return Err((
                    t.name.span(),
                    format!("target[{i}] `{name}`: give `address`, `addresses` or `host`"),
                ));
            }
            if addresses.len() + usize::from(host.is_some()) > MAX_ADDRESSES_PER_TARGET {
                return Err((
                    t.name.span(),
                    format!(
                        "target[{i}] `{name}`: at most {MAX_ADDRESSES_PER_TARGET} addresses per target"
                    ),
                ));
            }
            let upstream = match &t.upstream {
                None => None,
                Some(u) => Some(u.get_ref().parse::<SocketAddr>().map_err(|_| {
                    (
                        u.span(),
                        format!("target[{i}].upstream: `{}` is not `ip:port`", u.get_ref()),
                    )
                })?),
            };
            let id =
                u32::try_from(i).map_err(|_| (t.name.span(), "too many targets".to_string()))?;
            let postgres = match (t.protocol, &t.postgres) {
                (Protocol::Postgres, Some(pg)) => {
                    validate_postgres_target(pg)
                        .map_err(|(span, m)| (span, format!("target[{i}].postgres.{m}")))?;
                    Some(std::sync::Arc::new(pg.clone()))
                }
                (Protocol::Postgres, None) => {
                    return Err((
                        t.name.span(),
                        format!("target[{i}] `{name}`: protocol = \"postgres\" needs a [target.postgres] section with credentials_file"),
                    ))
                }
                (_, Some(_)) => {
                    return Err((
                        t.name.span(),
                        format!("target[{i}] `{name}`: [target.postgres] is only for protocol = \"postgres\""),
                    ))
                }
                (_, None) => None,
            };
            let ssh = match (t.protocol, &t.ssh) {
                (Protocol::Ssh, Some(_)) if t.wait_for_approval => {
                    // Admission happens while the client authenticates, when nothing can be
                    // shown to it; held silently it would look hung. Refused instead of
                    // ignored, so nobody expects a wait that never comes.
                    return Err((
                        t.name.span(),
                        format!("target[{i}] `{name}`: wait_for_approval is for postgres and tcp targets; an SSH connection that needs approval is refused naming the request (connect again once approved), and its commands and shells wait for approval by themselves"),
                    ));
                }
                (Protocol::Ssh, Some(s)) => {
                    validate_ssh_target(s)
                        .map_err(|(span, m)| (span.unwrap_or_else(|| t.name.span()), format!("target[{i}].ssh.{m}")))?;
                    Some(std::sync::Arc::new(s.clone()))
                }
                (Protocol::Ssh, None) => {
                    return Err((
                        t.name.span(),
                        format!("target[{i}] `{name}`: protocol = \"ssh\" needs a [target.ssh] section with known_hosts_file"),
                    ))
                }
                (_, Some(_)) => {
                    return Err((
                        t.name.span(),
                        format!("target[{i}] `{name}`: [target.ssh] is only for protocol = \"ssh\""),
                    ))
                }
                (_, None) => None,
            };
            out.push(ProtectedTarget {
                id,
                name: name.to_string(),
                protocol: t.protocol,
                addresses,
                host,
                port,
                upstream,
                labels: t.labels.clone(),
                postgres,
                ssh,
                recording_failure: t.recording_failure,
                wait_for_approval: t.wait_for_approval,
            });
        }
        self.validate_identity()?;
        if let Some(central) = &self.audit.central {
            validate_central(central).map_err(|m| (0..0, format!("audit.central.{m}")))?;
        }
        if let Some(syslog) = &self.audit.syslog {
            validate_syslog(syslog).map_err(|m| (0..0, format!("audit.syslog.{m}")))?;
        }
        if let Some(webhook) = &self.audit.webhook {
            validate_webhook(webhook).map_err(|m| (0..0, format!("audit.webhook.{m}")))?;
        }
        validate_approvals(&self.approvals).map_err(|m| (0..0, format!("approvals.{m}")))?;
        self.validate_console()?;
        if let Some(threads) = &self.proxy.threads {
            if *threads.get_ref() > ProxyConfig::MAX_THREADS {
                return Err((
                    threads.span(),
                    format!(
                        "proxy.threads: {} is more than {}; 0 picks half the CPUs",
                        threads.get_ref(),
                        ProxyConfig::MAX_THREADS
                    ),
                ));
            }
        }
        if self.proxy.upstream_mark == 0 {
            return Err((0..0, "proxy.upstream_mark must not be 0".to_string()));
        }
        Ok(out)
    }

    fn validate_identity(&self) -> Result<(), (std::ops::Range<usize>, String)> {
        let id = &self.identity;
        let whole = 0..0;
        if let Some(issuer) = &id.issuer {
            check_issuer_url(issuer)
                .map_err(|m| (whole.clone(), format!("identity.issuer: {m}")))?;
        }
        for alg in &id.algorithms {
            parse_algorithm(alg)
                .map_err(|m| (whole.clone(), format!("identity.algorithms: {m}")))?;
        }
        for (i, svc) in id.services.iter().enumerate() {
            if svc.uid.is_none() == svc.unit.is_none() {
                return Err((
                    whole.clone(),
                    format!(
                        "identity.service[{i}] (`{}`): set exactly one of `uid` or `unit`",
                        svc.name
                    ),
                ));
            }
            if id.issuer.is_none() {
                return Err((
                    whole.clone(),
                    format!("identity.service[{i}]: service identities need identity.issuer"),
                ));
            }
        }
        for (i, t) in id.trusted_issuers.iter().enumerate() {
            check_issuer_url(&t.issuer)
                .map_err(|m| (whole.clone(), format!("identity.trusted_issuer[{i}]: {m}")))?;
        }
        Ok(())
    }

    /// The directory where this layout version's pins live.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpf
            .pin_dir
            .join(format!("v{}", portcullis_common::PIN_LAYOUT_VERSION))
    }

    /// How far the central shipper got (the last seq the central store committed).
    pub fn audit_shipped_path(&self) -> PathBuf {
        self.state_dir.join("audit-shipped")
    }

    /// How far the syslog forwarder got (the last seq written and flushed to the receiver).
    pub fn audit_syslog_shipped_path(&self) -> PathBuf {
        self.state_dir.join("audit-syslog-shipped")
    }

    /// How far the webhook forwarder got (the last seq of a batch answered with 2xx).
    pub fn audit_webhook_shipped_path(&self) -> PathBuf {
        self.state_dir.join("audit-webhook-shipped")
    }

    /// The progress file of every configured shipper: retention keeps what any has not sent.
    pub fn audit_progress_paths(&self) -> Vec<PathBuf> {
        let mut paths = Vec::new();
        if self.audit.central.is_some() {
            paths.push(self.audit_shipped_path());
        }
        if self.audit.syslog.is_some() {
            paths.push(self.audit_syslog_shipped_path());
        }
        if self.audit.webhook.is_some() {
            paths.push(self.audit_webhook_shipped_path());
        }
        paths
    }

    pub fn audit_dir(&self) -> PathBuf {
        self.audit
            .dir
            .clone()
            .unwrap_or_else(|| self.state_dir.join("audit"))
    }
}

/// Errors start with the key they are about (the caller prefixes `audit.central.`).
fn validate_ssh_target(
    s: &SshTargetConfig,
) -> Result<(), (Option<std::ops::Range<usize>>, String)> {
    for (i, n) in s.host_names.iter().enumerate() {
        validate_host_name(n).map_err(|m| (None, format!("host_names[{i}]: {m}")))?;
    }
    let absolute = |key: &str, p: &Spanned<PathBuf>| {
        if p.get_ref().is_absolute() {
            Ok(())
        } else {
            Err((
                Some(p.span()),
                format!("{key}: `{}` is not an absolute path", p.get_ref().display()),
            ))
        }
    };
    absolute("known_hosts_file", &s.known_hosts_file)?;
    if let Some(k) = &s.private_key_file {
        absolute("private_key_file", k)?;
    }
    if !(1..=1440).contains(&s.certificate_minutes) {
        return Err((
            None,
            format!(
                "certificate_minutes: {} is not between 1 and 1440",
                s.certificate_minutes
            ),
        ));
    }
    Ok(())
}

fn validate_postgres_target(
    pg: &PostgresTargetConfig,
) -> Result<(), (std::ops::Range<usize>, String)> {
    if !pg.credentials_file.get_ref().is_absolute() {
        return Err((
            pg.credentials_file.span(),
            "credentials_file: must be an absolute path".into(),
        ));
    }
    for name in &pg.server_names {
        if name.is_empty() || name.parse::<IpAddr>().is_ok() || name.contains(char::is_whitespace) {
            return Err((
                pg.credentials_file.span(),
                format!("server_names: `{name}` is not a DNS name (IP addresses of the target are added on their own)"),
            ));
        }
    }
    if pg.max_message_bytes < 1024 {
        return Err((0..0, "max_message_bytes: must be at least 1024".into()));
    }
    if let Some(pool) = &pg.pool {
        let p = pool.get_ref();
        let at = |m: String| Err((pool.span(), format!("pool.{m}")));
        if !(1..=10_000).contains(&p.size) {
            return at(format!("size: {} is not between 1 and 10000", p.size));
        }
        if !(1..=86_400).contains(&p.idle_timeout_secs) {
            return at(format!(
                "idle_timeout_secs: {} is not between 1 and 86400",
                p.idle_timeout_secs
            ));
        }
        if p.wait_secs > 600 {
            return at(format!("wait_secs: {} is above 600", p.wait_secs));
        }
    }
    Ok(())
}

fn validate_central(c: &CentralConfig) -> Result<(), String> {
    check_central_url(&c.url, c.tls).map_err(|m| format!("url: {m}"))?;
    if let Some(url) = &c.migrate_url {
        check_central_url(url, c.tls).map_err(|m| format!("migrate_url: {m}"))?;
    }
    if c.batch_size == 0 || c.batch_size > 10_000 {
        return Err(format!("batch_size: {} must be 1-10000", c.batch_size));
    }
    if c.spool_max_bytes == 0 {
        return Err("spool_max_bytes: must be above 0".into());
    }
    if let Some(name) = &c.host_name {
        if name.trim().is_empty() || name.len() > 255 {
            return Err("host_name: must be 1-255 characters".into());
        }
    }
    Ok(())
}

fn is_loopback_host(host: &str) -> bool {
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Splits `host:port` (`[v6]:port`); the host comes back without brackets.
pub fn split_host_port(address: &str) -> Result<(String, u16), String> {
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| format!("`{address}` is not `host:port`"))?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if host.is_empty() || host.contains(':') && host.parse::<IpAddr>().is_err() {
        return Err(format!(
            "`{address}` is not `host:port` (write an IPv6 address as `[v6]:port`)"
        ));
    }
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("`{address}`: the port must be 1-65535"))?;
    Ok((host.to_string(), port))
}

/// RFC 5424 §6.2.1 facility names and codes.
pub const SYSLOG_FACILITIES: &[(&str, u8)] = &[
    ("kern", 0),
    ("user", 1),
    ("mail", 2),
    ("daemon", 3),
    ("auth", 4),
    ("syslog", 5),
    ("lpr", 6),
    ("news", 7),
    ("uucp", 8),
    ("cron", 9),
    ("authpriv", 10),
    ("ftp", 11),
    ("local0", 16),
    ("local1", 17),
    ("local2", 18),
    ("local3", 19),
    ("local4", 20),
    ("local5", 21),
    ("local6", 22),
    ("local7", 23),
];

pub fn syslog_facility_code(name: &str) -> Option<u8> {
    SYSLOG_FACILITIES
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, c)| *c)
}

/// Errors start with the key they are about (the caller prefixes `audit.syslog.`).
fn validate_syslog(c: &SyslogConfig) -> Result<(), String> {
    let (host, _) = split_host_port(&c.address).map_err(|m| format!("address: {m}"))?;
    if c.tls == SyslogTls::Disable && !is_loopback_host(&host) {
        return Err(format!(
            "tls: \"disable\" is accepted for loopback addresses only (`{host}` is not); use tls = \"require\""
        ));
    }
    if syslog_facility_code(&c.facility).is_none() {
        let names: Vec<&str> = SYSLOG_FACILITIES.iter().map(|(n, _)| *n).collect();
        return Err(format!(
            "facility: `{}` is not one of {}",
            c.facility,
            names.join(", ")
        ));
    }
    if let Some(name) = &c.server_name {
        if name.trim().is_empty() {
            return Err("server_name: must not be empty".into());
        }
    }
    Ok(())
}

/// Errors start with the key they are about (the caller prefixes `audit.webhook.`).
fn validate_webhook(c: &WebhookConfig) -> Result<(), String> {
    check_webhook_url(&c.url).map_err(|m| format!("url: {m}"))?;
    if c.batch_size == 0 || c.batch_size > 10_000 {
        return Err(format!("batch_size: {} must be 1-10000", c.batch_size));
    }
    if c.max_batch_bytes < 1024 {
        return Err(format!(
            "max_batch_bytes: {} is below the minimum of 1024",
            c.max_batch_bytes
        ));
    }
    if c.timeout_secs == 0 || c.timeout_secs > 300 {
        return Err(format!("timeout_secs: {} must be 1-300", c.timeout_secs));
    }
    Ok(())
}

/// Errors start with the key they are about (the caller prefixes `approvals.`).
fn validate_approvals(c: &ApprovalsConfig) -> Result<(), String> {
    if let Some(g) = &c.break_glass_group {
        if g.trim() != g || g.chars().any(char::is_control) {
            return Err(format!(
                "break_glass_group: `{g}` has spaces around it or control characters"
            ));
        }
    }
    if c.notify.len() > 8 {
        return Err(format!("notify: {} webhooks; at most 8", c.notify.len()));
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, n) in c.notify.iter().enumerate() {
        let at = |m: String| format!("notify[{i}].{m}");
        let name = n.name.clone().unwrap_or_else(|| format!("notify[{i}]"));
        if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
            return Err(at("name: 1 to 64 printable characters".into()));
        }
        if !names.insert(name.clone()) {
            return Err(at(format!("name: `{name}` is used twice")));
        }
        match (&n.url, &n.url_file) {
            (Some(_), Some(_)) => return Err(at("url: set `url` or `url_file`, not both".into())),
            (None, None) => return Err(at("url: set `url` or `url_file`".into())),
            (Some(url), None) => {
                check_webhook_url(url).map_err(|m| at(format!("url: {m}")))?;
                if n.format == NotifyFormat::Slack {
                    return Err(at(
                        "url: a Slack webhook URL is a credential: put it in `url_file` (root-only, 0600)"
                            .into(),
                    ));
                }
            }
            (None, Some(_)) => {}
        }
        if n.timeout_secs == 0 || n.timeout_secs > 60 {
            return Err(at(format!("timeout_secs: {} must be 1-60", n.timeout_secs)));
        }
    }
    Ok(())
}

/// https, or plain http only where nothing crosses a network; no credentials in the URL.
pub fn check_webhook_url(url: &str) -> Result<(), String> {
    // The parser's own message may quote the URL, credentials included: never repeat it.
    let parsed = reqwest::Url::parse(url).map_err(|_| "not a valid http(s) URL".to_string())?;
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(
            "holds credentials; put a bearer token in `token_file` (root-only) instead".into(),
        );
    }
    let host = parsed
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| "names no host".to_string())?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let loopback = is_loopback_host(host);
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err("must use https (plain http is accepted on loopback only)".into()),
        other => Err(format!("scheme `{other}` is not http or https")),
    }
}

/// A PostgreSQL URL without an inline password, and plain text only where nothing crosses
/// a network.
pub fn check_central_url(url: &str, tls: CentralTls) -> Result<(), String> {
    use tokio_postgres::config::Host;
    // The parser's own message may quote the URL, password included: never repeat it.
    let parsed: tokio_postgres::Config = url
        .parse()
        .map_err(|_| "not a valid postgres:// URL".to_string())?;
    if parsed.get_password().is_some() {
        return Err("holds a password; put it in `password_file` (root-only) instead".into());
    }
    if parsed.get_user().is_none() {
        return Err("names no user (postgres://USER@host/db)".into());
    }
    if parsed.get_hosts().is_empty() {
        return Err("names no host".into());
    }
    if tls == CentralTls::Disable {
        let all_local = parsed.get_hosts().iter().all(|h| match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
            }
        }) && parsed.get_hostaddrs().iter().all(IpAddr::is_loopback);
        if !all_local {
            return Err(
                "tls = \"disable\" is accepted for loopback hosts only; use tls = \"require\""
                    .into(),
            );
        }
    }
    Ok(())
}

/// Where the keys `validate_trust` judges sit in the file, so its errors name their line.
/// Read from the same text as `Config`; everything else is ignored here.
#[derive(Default, Deserialize)]
struct KeySpans {
    #[serde(default)]
    identity: IdentitySpans,
    #[serde(default)]
    audit: AuditSpans,
    #[serde(default)]
    insecure: InsecureSpans,
    #[serde(default)]
    approvals: ApprovalsSpans,
}

#[derive(Default, Deserialize)]
struct ApprovalsSpans {
    #[serde(default)]
    notify: Vec<TransportSpans>,
}

type KeySpan = Option<Spanned<toml::Value>>;

#[derive(Default, Deserialize)]
struct IdentitySpans {
    issuer: KeySpan,
    #[serde(default)]
    trusted_issuer: Vec<IssuerSpans>,
}

#[derive(Default, Deserialize)]
struct IssuerSpans {
    issuer: KeySpan,
}

#[derive(Default, Deserialize)]
struct AuditSpans {
    #[serde(default)]
    central: TransportSpans,
    #[serde(default)]
    syslog: TransportSpans,
    #[serde(default)]
    webhook: TransportSpans,
}

#[derive(Default, Deserialize)]
struct TransportSpans {
    url: KeySpan,
    tls: KeySpan,
}

#[derive(Default, Deserialize)]
struct InsecureSpans {
    unix_identity_only: KeySpan,
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
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

    fn parse(text: &str) -> Result<Vec<ProtectedTarget>, String> {
        Config::parse(Path::new("/etc/portcullis/portcullis.toml"), text)
            .map(|(_, t)| t)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn a_postgres_pool_is_off_by_default_and_its_errors_name_the_line() {
        let target = "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"10.0.0.5\"\nport = 5432\n[target.postgres]\ncredentials_file = \"/etc/c\"\n";
        let off = parse(target).unwrap();
        assert_eq!(off[0].postgres.as_deref().unwrap().pool, None);
        let on = parse(&format!("{target}pool = {{ size = 20 }}\n")).unwrap();
        let pool = on[0].postgres.as_deref().unwrap().pool.clone().unwrap();
        assert_eq!(
            (
                pool.get_ref().size,
                pool.get_ref().idle_timeout_secs,
                pool.get_ref().wait_secs
            ),
            (20, 300, 5)
        );
        for (pool, expected) in [
            ("{ size = 0 }", "pool.size: 0 is not between 1 and 10000"),
            (
                "{ size = 2, idle_timeout_secs = 0 }",
                "pool.idle_timeout_secs: 0",
            ),
            (
                "{ size = 2, wait_secs = 601 }",
                "pool.wait_secs: 601 is above 600",
            ),
            (
                "{ size = 2, mode = \"transaction\" }",
                "unknown field `mode`",
            ),
        ] {
            let err = parse(&format!("{target}pool = {pool}\n")).unwrap_err();
            assert!(err.contains(expected), "{pool}: {err}");
            assert!(err.contains("portcullis.toml:8:"), "{pool}: {err}");
        }
    }

    #[test]
    fn ssh_targets_need_their_section_with_absolute_paths() {
        let target =
            "[[target]]\nname = \"web\"\nprotocol = \"ssh\"\naddress = \"10.0.0.5\"\nport = 22\n";
        let ok = parse(&format!(
            "{target}[target.ssh]\nhost_names = [\"Web-3\"]\nknown_hosts_file = \"/etc/k\"\n"
        ))
        .unwrap();
        let ssh = ok[0].ssh.as_deref().unwrap();
        assert_eq!(ssh.host_names, ["Web-3"]);
        assert_eq!((ssh.certificate_minutes, ssh.keepalive_secs), (5, 15));
        for (extra, expected) in [
            ("", "needs a [target.ssh] section"),
            (
                "[target.ssh]\nknown_hosts_file = \"k\"\n",
                "not an absolute path",
            ),
            (
                "[target.ssh]\nknown_hosts_file = \"/k\"\nprivate_key_file = \"key\"\n",
                "not an absolute path",
            ),
            (
                "[target.ssh]\nknown_hosts_file = \"/k\"\ncertificate_minutes = 0\n",
                "between 1 and 1440",
            ),
            (
                "[target.ssh]\nknown_hosts_file = \"/k\"\nhost_names = [\"10.0.0.5\"]\n",
                "is an address",
            ),
            (
                "[target.ssh]\nknown_hosts_file = \"/k\"\nagent_forwarding = true\n",
                "unknown field",
            ),
            (
                "wait_for_approval = true\n[target.ssh]\nknown_hosts_file = \"/k\"\n",
                "wait_for_approval is for postgres and tcp targets",
            ),
        ] {
            let err = parse(&format!("{target}{extra}")).unwrap_err();
            assert!(err.contains(expected), "{extra}: {err}");
        }
        let tcp =
            "[[target]]\nname = \"t\"\nprotocol = \"tcp\"\naddress = \"10.0.0.6\"\nport = 80\n\
                   [target.ssh]\nknown_hosts_file = \"/k\"\n";
        assert!(parse(tcp)
            .unwrap_err()
            .contains("only for protocol = \"ssh\""));
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("state_dir = \"/tmp\"\n[proxy]\nport = 940\nlisten = \"x\"\n").unwrap_err();
        assert!(
            err.starts_with("/etc/portcullis/portcullis.toml:4:"),
            "{err}"
        );
        assert!(err.contains("unknown field `listen`"), "{err}");
    }

    #[test]
    fn bad_target_address_names_its_line() {
        let err = parse(
            "[[target]]\nname = \"a\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1\"\nport = 80\n\n[[target]]\nname = \"b\"\nprotocol = \"tcp\"\naddress = \"10.0.0.300\"\nport = 80\n",
        )
        .unwrap_err();
        assert!(err.contains(":10:"), "{err}");
        assert!(err.contains("target[1].address"), "{err}");
    }

    #[test]
    fn proxy_threads_default_to_half_the_cpus_and_are_bounded() {
        let (config, _) =
            Config::parse(Path::new("/etc/portcullis/portcullis.toml"), "[proxy]\n").unwrap();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(config.proxy.proxy_threads(), (cpus / 2).max(1));
        let (config, _) = Config::parse(
            Path::new("/etc/portcullis/portcullis.toml"),
            "[proxy]\nthreads = 3\n",
        )
        .unwrap();
        assert_eq!(config.proxy.proxy_threads(), 3);
        let err = parse("[proxy]\nport = 940\nthreads = 1000\n").unwrap_err();
        assert!(
            err.starts_with("/etc/portcullis/portcullis.toml:3:"),
            "{err}"
        );
        assert!(
            err.contains("proxy.threads: 1000 is more than 256"),
            "{err}"
        );
    }

    #[test]
    fn target_covering_the_proxy_listener_is_rejected() {
        let err = parse("[[target]]\nname = \"loop\"\nprotocol = \"tcp\"\naddress = \"127.0.0.0/8\"\nport = 940\n")
            .unwrap_err();
        assert!(err.contains("proxy's own listener"), "{err}");
    }

    #[test]
    fn targets_parse_exact_cidr_any_and_v6() {
        let t = parse(
            "[[target]]\nname=\"a\"\nprotocol=\"tcp\"\naddress=\"127.0.0.9\"\nport=80\n\
             [[target]]\nname=\"b\"\nprotocol=\"tcp\"\naddress=\"127.1.0.0/16\"\nport=81\n\
             [[target]]\nname=\"c\"\nprotocol=\"tcp\"\naddress=\"any\"\nport=82\n\
             [[target]]\nname=\"d\"\nprotocol=\"tcp\"\naddress=\"::1\"\nport=83\nupstream=\"[::1]:9000\"\n",
        )
        .unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t[1].addresses[0].to_string(), "127.1.0.0/16");
        assert_eq!(t[2].addresses, vec![TargetAddress::Any]);
        assert!(t[1].covers("::ffff:127.1.2.3".parse().unwrap()));
        assert_eq!(t[3].upstream, Some("[::1]:9000".parse().unwrap()));
    }

    #[test]
    fn a_target_lists_several_addresses_and_a_host() {
        let t = parse(
            "[[target]]\nname=\"db\"\nprotocol=\"tcp\"\naddress=\"127.0.0.9\"\n\
             addresses=[\"127.0.0.10\", \"::1\", \"127.0.0.9\"]\nhost=\"DB1.Internal.\"\nport=80\n",
        )
        .unwrap();
        assert_eq!(t[0].addresses.len(), 3, "the duplicate is kept once");
        assert!(t[0].covers("::1".parse().unwrap()));
        assert!(t[0].covers("127.0.0.10".parse().unwrap()));
        assert!(!t[0].covers("127.0.0.11".parse().unwrap()));
        assert_eq!(t[0].host.as_deref(), Some("db1.internal"));
        let only_host =
            parse("[[target]]\nname=\"db\"\nprotocol=\"tcp\"\nhost=\"db1.internal\"\nport=80\n")
                .unwrap();
        assert!(only_host[0].addresses.is_empty());
    }

    #[test]
    fn bad_target_addresses_and_hosts_name_their_line() {
        let err = parse(
            "[[target]]\nname=\"db\"\nprotocol=\"tcp\"\nport=80\naddresses=[\"127.0.0.1\",\n  \"10.0.0.300\"]\n",
        )
        .unwrap_err();
        assert!(err.contains("target[0].addresses"), "{err}");
        assert!(err.contains("portcullis.toml:6:3"), "{err}");
        for host in ["db_1.internal", "-db.internal", "a..b", "127.0.0.1", ""] {
            let err = parse(&format!(
                "[[target]]\nname=\"db\"\nprotocol=\"tcp\"\nport=80\nhost=\"{host}\"\n"
            ))
            .unwrap_err();
            assert!(err.contains("target[0].host"), "{host}: {err}");
        }
        let err = parse("[[target]]\nname=\"db\"\nprotocol=\"tcp\"\nport=80\n").unwrap_err();
        assert!(err.contains("`address`, `addresses` or `host`"), "{err}");
    }

    #[test]
    fn duplicate_target_names_are_rejected() {
        let err = parse(
            "[[target]]\nname=\"a\"\nprotocol=\"tcp\"\naddress=\"127.0.0.9\"\nport=80\n\
             [[target]]\nname=\"a\"\nprotocol=\"tcp\"\naddress=\"127.0.0.8\"\nport=80\n",
        )
        .unwrap_err();
        assert!(err.contains("used twice"), "{err}");
    }

    #[test]
    fn shipped_default_config_is_valid() {
        let text = include_str!("../../packaging/portcullis.toml");
        Config::parse(Path::new("portcullis.toml"), text).unwrap();
    }

    #[test]
    fn hmac_algorithms_and_plain_http_issuers_are_refused() {
        let err = parse("[identity]\nissuer = \"http://idp.example\"\n").unwrap_err();
        assert!(err.contains("must use https"), "{err}");
        assert!(parse(
            "[identity]\nissuer = \"http://127.0.0.1:8080\"\n[insecure]\nallow_plaintext_loopback = true\n"
        )
        .is_ok());
        let err = parse("[identity]\nalgorithms = [\"HS256\"]\n").unwrap_err();
        assert!(err.contains("HMAC"), "{err}");
    }

    #[test]
    fn plaintext_on_loopback_needs_allow_plaintext_loopback_and_names_the_line() {
        const FLAG: &str = "\n[insecure]\nallow_plaintext_loopback = true\n";
        let ci = "required_claims = { repository = \"acme/infra\" }\n";
        // (config, the key and line the refusal must name)
        let cases = [
            (
                "[identity]\nclient_id = \"x\"\nissuer = \"http://127.0.0.1:8080\"\n".to_string(),
                ":3:",
                "identity.issuer: plain http (`http://127.0.0.1:8080`) on loopback",
            ),
            (
                "[identity]\nissuer = \"http://localhost:8080/realms/x\"\n".to_string(),
                ":2:",
                "identity.issuer: plain http",
            ),
            (
                format!(
                    "[[identity.trusted_issuer]]\nissuer = \"https://ci.example\"\naudience = \"a\"\n{ci}\
                     [[identity.trusted_issuer]]\naudience = \"a\"\nissuer = \"http://[::1]:9000\"\n{ci}"
                ),
                ":7:",
                "identity.trusted_issuer[1].issuer: plain http",
            ),
            (
                "[audit.syslog]\naddress = \"127.0.0.1:514\"\ntls = \"disable\"\n".to_string(),
                ":3:",
                "audit.syslog.tls: \"disable\" on loopback",
            ),
            (
                "[audit.webhook]\n\nurl = \"http://127.0.0.1:8080/in\"\n".to_string(),
                ":3:",
                "audit.webhook.url: plain http on loopback",
            ),
            (
                "[audit.central]\nurl = \"postgres://a@127.0.0.1/x\"\ntls = \"disable\"\n".to_string(),
                ":3:",
                "audit.central.tls: \"disable\" (TCP or a Unix socket) on loopback",
            ),
            (
                "[audit.central]\nurl = \"postgres://a@%2Frun%2Fpostgresql/x\"\ntls = \"disable\"\n"
                    .to_string(),
                ":3:",
                "audit.central.tls",
            ),
        ];
        for (text, line, key) in &cases {
            let err = parse(text).unwrap_err();
            assert!(
                err.starts_with(&format!("/etc/portcullis/portcullis.toml{line}")),
                "{text}: {err}"
            );
            assert!(err.contains(key), "{text}: {err}");
            assert!(
                err.contains("only with `insecure.allow_plaintext_loopback = true`"),
                "{err}"
            );
            parse(&format!("{text}{FLAG}")).unwrap();
        }
        // The flag never opens a non-loopback address to plaintext.
        let err = parse(&format!("[identity]\nissuer = \"http://10.0.0.5\"\n{FLAG}")).unwrap_err();
        assert!(
            err.contains("plain http is accepted on loopback only"),
            "{err}"
        );
        // TLS needs no flag.
        parse("[identity]\nissuer = \"https://127.0.0.1:8443\"\n").unwrap();
    }

    #[test]
    fn console_config_validation_table() {
        let issuer = "[identity]\nissuer = \"https://idp.example\"\n";
        // (config after the issuer, the line and words of the refusal; None: accepted)
        let cases: [(&str, Option<(&str, &str)>); 10] = [
            ("[console]\nlisten = \"127.0.0.1:9443\"\nauditor_groups = [\"audit\"]\n", None),
            (
                "[console]\nlisten = \"127.0.0.1:9443\"\nurl = \"https://bastion.example:9443/\"\n\
                 approver_groups = [\"leads\"]\ntls_cert = \"/c.pem\"\ntls_key = \"/c.key\"\n",
                None,
            ),
            ("[console]\nlisten = \"localhost:9443\"\nauditor_groups = [\"a\"]\n", Some((":4:", "console.listen: `localhost:9443` is not `ip:port`"))),
            ("[console]\nlisten = \"127.0.0.1:9443\"\n", Some((":4:", "name at least one group"))),
            ("[console]\nlisten = \"127.0.0.1:9443\"\nadmin_groups = [\"ok\", \" spaced\"]\n", Some((":5:", "console.admin_groups: ` spaced`"))),
            ("[console]\nlisten = \"127.0.0.1:9443\"\nauditor_groups = [\"a\"]\nurl = \"http://bastion.example\"\n", Some((":6:", "console.url: `http://bastion.example` must start with https://"))),
            ("[console]\nlisten = \"127.0.0.1:9443\"\nauditor_groups = [\"a\"]\nurl = \"https://bastion.example/console\"\n", Some((":6:", "without path, query or user"))),
            ("[console]\nlisten = \"127.0.0.1:9443\"\nauditor_groups = [\"a\"]\ntls_key = \"/c.key\"\n", Some((":6:", "console.tls_cert, console.tls_key: set both"))),
            ("[console]\nlisten = \"127.0.0.1:9443\"\nauditor_groups = [\"a\"]\nsession_timeout_secs = 5\n", Some((":6:", "console.session_timeout_secs: 5 is outside 60 to 86400"))),
            // Off unless it listens, whatever else is set.
            ("[console]\nauditor_groups = []\nsession_timeout_secs = 5\n", None),
        ];
        for (text, expect) in cases {
            let text = format!("{issuer}{text}");
            match (parse(&text), expect) {
                (Ok(_), None) => {}
                (Err(err), Some((line, words))) => {
                    assert!(
                        err.starts_with(&format!("/etc/portcullis/portcullis.toml{line}")),
                        "{text}: {err}"
                    );
                    assert!(err.contains(words), "{text}: {err}");
                }
                (got, _) => panic!("{text}: {got:?}"),
            }
        }
        // Without an issuer nobody could sign in.
        let err = parse("[console]\nlisten = \"127.0.0.1:9443\"\nauditor_groups = [\"a\"]\n")
            .unwrap_err();
        assert!(
            err.contains("console.listen: the console signs people in with identity.issuer"),
            "{err}"
        );
        let (config, _) = Config::parse(
            Path::new("/x.toml"),
            &format!(
                "{issuer}[console]\nlisten = \"127.0.0.1:9443\"\napprover_groups = [\"leads\"]\n"
            ),
        )
        .unwrap();
        let console = config.console().unwrap();
        assert_eq!(console.url, "https://127.0.0.1:9443");
        assert_eq!(console.client_id, "portcullis");
        assert_eq!(console.session_timeout_secs, 3600);
        assert_eq!(console.approver_groups, ["leads"]);
    }

    #[test]
    fn a_trusted_issuer_without_required_claims_is_refused() {
        let err = parse(
            "[identity]\n\n[[identity.trusted_issuer]]\nissuer = \"https://token.actions.githubusercontent.com\"\naudience = \"portcullis\"\n",
        )
        .unwrap_err();
        assert!(
            err.starts_with("/etc/portcullis/portcullis.toml:4:"),
            "{err}"
        );
        assert!(
            err.contains("identity.trusted_issuer[0] (`https://token.actions.githubusercontent.com`): set at least one entry in `required_claims`"),
            "{err}"
        );
        let err = parse(
            "[[identity.trusted_issuer]]\nissuer = \"https://ci.example\"\naudience = \"p\"\nrequired_claims = {}\n",
        )
        .unwrap_err();
        assert!(err.contains("required_claims"), "{err}");
        parse(
            "[[identity.trusted_issuer]]\nissuer = \"https://ci.example\"\naudience = \"p\"\nrequired_claims = { repository = \"acme/infra\" }\n",
        )
        .unwrap();
    }

    #[test]
    fn unix_identity_only_beside_an_issuer_is_refused() {
        for identity in [
            "[identity]\nissuer = \"https://idp.example\"\n",
            "[[identity.trusted_issuer]]\nissuer = \"https://ci.example\"\naudience = \"p\"\nrequired_claims = { repository = \"acme/infra\" }\n",
        ] {
            let text = format!("{identity}[insecure]\nunix_identity_only = true\n");
            let err = parse(&text).unwrap_err();
            let line = text.lines().count();
            assert!(
                err.starts_with(&format!("/etc/portcullis/portcullis.toml:{line}:")),
                "{err}"
            );
            assert!(
                err.contains("insecure.unix_identity_only: cannot be combined with identity.issuer"),
                "{err}"
            );
            parse(identity).unwrap();
        }
        parse("[insecure]\nunix_identity_only = true\n").unwrap();
    }

    #[test]
    fn embedded_demo_config_is_valid() {
        let (_, targets) = Config::parse(Path::new("demo.toml"), DEMO_CONFIG).unwrap();
        assert!(!targets.is_empty());
    }
}
