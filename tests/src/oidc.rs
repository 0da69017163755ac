//! A real OpenID Provider for the tests: `tests/oidc/provider.mjs` (the `oidc-provider`
//! package under Node.js) on a loopback port, with signing keys this harness generates, so
//! tests can rotate them and craft tokens of their own. `complete_device_flow` does what
//! a user's browser does on the provider's pages (RFC 8628 section 3.3).
//!
//! Only 127.0.0.1 is ever contacted: the provider listens there, and the browser refuses
//! any other host, redirects included.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey};
use reqwest::blocking::{Client, Response};
use reqwest::Url;
use serde_json::{json, Value};

/// The public client the agent logs humans in with (device flow, refresh tokens).
pub const CLIENT_ID: &str = "portcullis";
/// A second public client: its tokens carry the wrong audience for the agent.
pub const OTHER_CLIENT_ID: &str = "portcullis-other";
/// A confidential client for service identities (client credentials, `client_secret_basic`).
pub const SERVICE_CLIENT_ID: &str = "backup-cron";
pub const SERVICE_CLIENT_SECRET: &str = "backup-cron-test-secret";
pub const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
/// What the agent asks for when a human logs in.
pub const HUMAN_SCOPE: &str = "openid email profile groups offline_access";
/// The dev login form takes any password; this is what the browser types.
const ANY_PASSWORD: &str = "correct horse battery staple";

const LOOPBACK: &str = "127.0.0.1";
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const PORT_ATTEMPTS: usize = 5;

/// Whether the provider can run here. Under `PORTCULLIS_E2E` or `CI` a missing Node.js or
/// an uninstalled `tests/oidc` is a failure, never a silent skip.
pub fn oidc_enabled() -> bool {
    let required = std::env::var_os("PORTCULLIS_E2E").is_some() || std::env::var_os("CI").is_some();
    let node_works = Command::new("node")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let problem = if !node_works {
        Some("`node` is not installed (the test OpenID Provider runs under Node.js)")
    } else if !oidc_dir()
        .join("node_modules/oidc-provider/package.json")
        .is_file()
    {
        Some("tests/oidc/node_modules is missing; run `cargo xtask setup`")
    } else {
        None
    };
    match problem {
        None => true,
        Some(p) if required => panic!("OpenID Provider prerequisites missing: {p}"),
        Some(p) => {
            eprintln!("skipping OpenID Provider test: {p} (set PORTCULLIS_E2E=required to make this an error)");
            false
        }
    }
}

fn oidc_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc")
}

#[derive(Clone, Debug)]
pub struct OidcUser {
    /// The login name typed into the sign-in form; also the `sub` claim.
    pub id: String,
    pub email: String,
    pub name: String,
    pub groups: Vec<String>,
}

impl OidcUser {
    pub fn new(id: &str, groups: &[&str]) -> Self {
        let mut name = id.to_string();
        if let Some(first) = name.get_mut(0..1) {
            first.make_ascii_uppercase();
        }
        Self {
            id: id.to_string(),
            email: format!("{id}@example.test"),
            name,
            groups: groups.iter().map(|g| (*g).to_string()).collect(),
        }
    }
}

/// Token lifetimes, whole seconds (what oidc-provider takes).
#[derive(Clone, Debug)]
pub struct Ttls {
    pub access_token: Duration,
    pub id_token: Duration,
    pub refresh_token: Duration,
    pub device_code: Duration,
    pub client_credentials: Duration,
}

impl Default for Ttls {
    fn default() -> Self {
        Self {
            access_token: Duration::from_secs(3600),
            id_token: Duration::from_secs(3600),
            refresh_token: Duration::from_secs(14 * 24 * 3600),
            device_code: Duration::from_secs(600),
            client_credentials: Duration::from_secs(600),
        }
    }
}

#[derive(Clone, Debug)]
pub struct OidcOptions {
    pub users: Vec<OidcUser>,
    pub ttl: Ttls,
    /// `None` keeps oidc-provider's rule: public clients get a new refresh token on every
    /// refresh and the old one stops working.
    pub rotate_refresh_tokens: Option<bool>,
    /// More clients, as oidc-provider client metadata.
    pub extra_clients: Vec<Value>,
}

impl Default for OidcOptions {
    fn default() -> Self {
        Self {
            users: vec![
                OidcUser::new("alice", &["engineering", "dba"]),
                OidcUser::new("bob", &["analysts"]),
            ],
            ttl: Ttls::default(),
            rotate_refresh_tokens: None,
            extra_clients: Vec::new(),
        }
    }
}

/// An RSA key pair the provider signs with, PEM encoded (PKCS#8 private, SPKI public).
#[derive(Clone, Debug)]
pub struct SigningKey {
    pub kid: String,
    pub private_pem: String,
    pub public_pem: String,
}

impl SigningKey {
    /// Shells out to `openssl`: an RSA key generated by unoptimised test code takes seconds.
    pub fn generate() -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let out = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
            ])
            .stderr(Stdio::piped())
            .output()
            .unwrap_or_else(|e| panic!("running openssl genpkey: {e}"));
        assert!(
            out.status.success(),
            "openssl genpkey failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let private_pem = String::from_utf8(out.stdout).unwrap();
        let public_pem = openssl_public_pem(&private_pem);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let kid = format!(
            "test-{}-{}-{nanos:x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        Self {
            kid,
            private_pem,
            public_pem,
        }
    }
}

fn openssl_public_pem(private_pem: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["pkey", "-pubout"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running openssl pkey: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(private_pem.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "openssl pkey -pubout failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// What `rotate_keys` does with the key that signed until now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldKey {
    /// Still in the JWKS: tokens it signed still verify (a graceful rotation).
    StillPublished,
    /// Gone from the JWKS: tokens it signed no longer verify (a compromised key).
    Withdrawn,
}

/// How `craft_jwt` signs.
#[derive(Clone, Copy, Debug)]
pub enum Signing<'a> {
    /// RS256 with this private key (PKCS#1 or PKCS#8 PEM).
    Rs256 { private_pem: &'a str },
    /// HS256 with this secret, e.g. the RSA public key's bytes for an algorithm-confusion test.
    Hs256 { secret: &'a [u8] },
    /// No signature at all: the third segment is empty, whatever `alg` the header says.
    Unsigned,
}

/// Builds `base64url(header).base64url(claims).signature` from exactly the JSON given, so
/// tests can forge any header (`alg`, `kid`) and any claims.
pub fn craft_jwt(header: &Value, claims: &Value, signing: Signing<'_>) -> String {
    let message = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).unwrap()),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap())
    );
    let signature = match signing {
        Signing::Rs256 { private_pem } => jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_rsa_pem(private_pem.as_bytes()).unwrap(),
            Algorithm::RS256,
        )
        .unwrap(),
        Signing::Hs256 { secret } => jsonwebtoken::crypto::sign(
            message.as_bytes(),
            &EncodingKey::from_secret(secret),
            Algorithm::HS256,
        )
        .unwrap(),
        Signing::Unsigned => String::new(),
    };
    format!("{message}.{signature}")
}

/// The header and the claims of a compact JWT, unverified.
pub fn decode_jwt_unverified(token: &str) -> Result<(Value, Value)> {
    let mut parts = token.split('.');
    let mut segment = |what: &str| -> Result<Value> {
        let part = parts
            .next()
            .with_context(|| format!("JWT has no {what} segment"))?;
        let bytes = URL_SAFE_NO_PAD
            .decode(part)
            .with_context(|| format!("JWT {what} is not base64url"))?;
        serde_json::from_slice(&bytes).with_context(|| format!("JWT {what} is not JSON"))
    };
    let header = segment("header")?;
    let claims = segment("claims")?;
    Ok((header, claims))
}

/// A running `tests/oidc/provider.mjs`; the process is stopped on drop.
pub struct OidcProvider {
    dir: tempfile::TempDir,
    port: u16,
    issuer: String,
    /// The first key signs; all are published.
    keys: Vec<SigningKey>,
    opts: OidcOptions,
    cookie_key: String,
    child: Option<Child>,
    stdout_log: Arc<Mutex<String>>,
}

impl OidcProvider {
    /// Starts a provider on a free loopback port with a freshly generated signing key.
    pub fn start(opts: OidcOptions) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut provider = Self {
            cookie_key: random_token(),
            dir,
            port: 0,
            issuer: String::new(),
            keys: vec![SigningKey::generate()],
            opts,
            child: None,
            stdout_log: Arc::new(Mutex::new(String::new())),
        };
        let mut last_error = None;
        for _ in 0..PORT_ATTEMPTS {
            provider.port = free_loopback_port();
            provider.issuer = format!("http://{LOOPBACK}:{}", provider.port);
            // Another test may grab the port between probing and node's bind.
            match provider.spawn() {
                Ok(()) => return provider,
                Err(e) => last_error = Some(e),
            }
        }
        panic!(
            "the OpenID Provider did not start: {:#}\n{}",
            last_error.unwrap_or_else(|| anyhow!("no attempt")),
            provider.log()
        );
    }

    /// `http://127.0.0.1:<port>`, with no trailing slash, exactly as the `iss` claim says.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The key id new tokens carry.
    pub fn kid(&self) -> &str {
        &self.current_key().kid
    }

    pub fn signing_key_pem(&self) -> &str {
        &self.current_key().private_pem
    }

    pub fn public_key_pem(&self) -> &str {
        &self.current_key().public_pem
    }

    /// Every key the JWKS publishes, the signing one first.
    pub fn keys(&self) -> &[SigningKey] {
        &self.keys
    }

    fn current_key(&self) -> &SigningKey {
        self.keys.first().unwrap()
    }

    pub fn endpoint(&self, path: &str) -> String {
        format!("{}{path}", self.issuer)
    }

    /// The provider's own output: stdout (READY lines) then stderr (warnings, errors).
    pub fn log(&self) -> String {
        let stderr =
            std::fs::read_to_string(self.dir.path().join("provider.stderr")).unwrap_or_default();
        format!(
            "--- provider stdout ---\n{}--- provider stderr ---\n{stderr}",
            self.stdout_log.lock().unwrap()
        )
    }

    /// SIGTERM, then SIGKILL if it has not gone within five seconds. Idempotent.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // std only sends SIGKILL; the provider gets SIGTERM first. The pid is ours and not
        // reaped yet, so it names no other process.
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for _ in 0..50 {
            if matches!(child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Stops and starts the provider on the same port with the same keys. Sessions, grants
    /// and refresh tokens survive (they are kept in a state file), as with a real provider.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn_or_panic();
    }

    /// Changes `user`'s groups at the provider, as an administrator would, and restarts it
    /// (same port, keys and sessions): tokens issued from now on, refreshed ones included,
    /// carry the new groups.
    pub fn set_groups(&mut self, user: &str, groups: &[&str]) {
        let u = self
            .opts
            .users
            .iter_mut()
            .find(|u| u.id == user)
            .unwrap_or_else(|| panic!("no user {user} at the provider"));
        u.groups = groups.iter().map(|g| (*g).to_string()).collect();
        self.restart();
    }

    /// Restarts with a new signing key listed first, so new tokens carry a new kid.
    pub fn rotate_keys(&mut self, old: OldKey) {
        let new = SigningKey::generate();
        if old == OldKey::Withdrawn {
            self.keys.clear();
        }
        self.keys.insert(0, new);
        self.restart();
    }

    fn spawn_or_panic(&mut self) {
        let mut last_error = None;
        // The port was ours a moment ago; a retry covers a slow release of the old socket.
        for _ in 0..PORT_ATTEMPTS {
            match self.spawn() {
                Ok(()) => return,
                Err(e) => last_error = Some(e),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "the OpenID Provider did not restart on port {}: {:#}\n{}",
            self.port,
            last_error.unwrap_or_else(|| anyhow!("no attempt")),
            self.log()
        );
    }

    fn config(&self) -> Value {
        let ttl = &self.opts.ttl;
        let public_client = |id: &str| {
            json!({
                "client_id": id,
                "application_type": "native",
                "token_endpoint_auth_method": "none",
                "grant_types": [DEVICE_CODE_GRANT, "refresh_token"],
                "response_types": [],
                "redirect_uris": [],
            })
        };
        let mut clients = vec![
            public_client(CLIENT_ID),
            public_client(OTHER_CLIENT_ID),
            json!({
                "client_id": SERVICE_CLIENT_ID,
                "client_secret": SERVICE_CLIENT_SECRET,
                "token_endpoint_auth_method": "client_secret_basic",
                "grant_types": ["client_credentials"],
                "response_types": [],
                "redirect_uris": [],
            }),
        ];
        clients.extend(self.opts.extra_clients.iter().cloned());
        json!({
            "port": self.port,
            "keys": self.keys.iter().map(|k| json!({ "kid": k.kid, "pem": k.private_pem })).collect::<Vec<_>>(),
            "ttl": {
                "AccessToken": ttl.access_token.as_secs(),
                "IdToken": ttl.id_token.as_secs(),
                "RefreshToken": ttl.refresh_token.as_secs(),
                "DeviceCode": ttl.device_code.as_secs(),
                "ClientCredentials": ttl.client_credentials.as_secs(),
            },
            "users": self.opts.users.iter().map(|u| json!({
                "id": u.id, "email": u.email, "name": u.name, "groups": u.groups,
            })).collect::<Vec<_>>(),
            "clients": clients,
            "cookie_keys": [self.cookie_key],
            "rotate_refresh_tokens": self.opts.rotate_refresh_tokens,
            "state_file": self.dir.path().join("state.json"),
        })
    }

    fn spawn(&mut self) -> Result<()> {
        let config_path = self.dir.path().join("provider.json");
        std::fs::write(&config_path, serde_json::to_vec_pretty(&self.config())?)?;
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("provider.stderr"))?;
        let mut child = Command::new("node")
            .arg(oidc_dir().join("provider.mjs"))
            .arg(&config_path)
            .current_dir(oidc_dir())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .context("spawning node")?;
        let stdout = child.stdout.take().context("node has no stdout")?;
        let (ready_tx, ready_rx) = mpsc::channel();
        let log = Arc::clone(&self.stdout_log);
        // Keeps draining stdout after READY so the pipe never fills and blocks node.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(issuer) = line.strip_prefix("READY ") {
                    let _ = ready_tx.send(issuer.to_string());
                }
                log.lock().unwrap().push_str(&format!("{line}\n"));
            }
        });
        match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(issuer) if issuer == self.issuer => {
                self.child = Some(child);
                Ok(())
            }
            outcome => {
                let _ = child.kill();
                let status = child.wait().ok();
                match outcome {
                    Ok(other) => bail!(
                        "provider announced issuer {other}, expected {}",
                        self.issuer
                    ),
                    Err(_) => bail!("provider exited ({status:?}) or timed out before READY"),
                }
            }
        }
    }

    /// Approves the login on the provider's pages as `user` would in a browser, starting
    /// from the `verification_uri_complete` the device authorization response gave.
    /// Returns once the provider shows its device sign-in success page.
    /// Runs `portcullis login` as `uid` against `agent` and finishes its device flow in "the
    /// browser" as `user`; panics (a test failure) when the login does not succeed.
    #[allow(
        clippy::unwrap_used,
        clippy::panic,
        reason = "a failed login fails the test"
    )]
    pub fn login(&self, agent: &crate::Agent, uid: u32, user: &str) {
        let mut child = agent
            .cli_as(uid, &["login"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let url = loop {
            let mut line = String::new();
            assert!(out.read_line(&mut line).unwrap() > 0, "login ended early");
            if let Some(url) = line
                .trim()
                .strip_prefix("(or open ")
                .map(|rest| rest.trim_end_matches(" directly)").to_string())
            {
                break url;
            }
        };
        self.complete_device_flow(&url, user).unwrap();
        let mut rest = String::new();
        std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "login of {user} as uid {uid}: {rest}");
    }

    pub fn complete_device_flow(&self, verification_uri_complete: &str, user: &str) -> Result<()> {
        self.browse_device_flow(verification_uri_complete, user, Answer::Approve)
            .with_context(|| format!("device flow as {user}\n{}", self.log()))
    }

    /// Like `complete_device_flow`, but the user presses Abort on the confirmation page, so
    /// the device's polling gets `access_denied`.
    pub fn deny_device_flow(&self, verification_uri_complete: &str) -> Result<()> {
        self.browse_device_flow(verification_uri_complete, "", Answer::Deny)
            .with_context(|| format!("denying the device flow\n{}", self.log()))
    }

    fn browse_device_flow(&self, start: &str, user: &str, answer: Answer) -> Result<()> {
        let browser = Browser::new()?;
        let mut page = browser.get(start)?;
        let mut done: Vec<Step> = Vec::new();
        // Code, confirm, login, consent, and one spare for a provider that asks again.
        for _ in 0..6 {
            if page.body.contains("<title>Sign-in Success</title>") {
                return Ok(());
            }
            if answer == Answer::Deny
                && done.contains(&Step::Confirm)
                && page.body.contains("request was interrupted")
            {
                return Ok(());
            }
            if !page.status.is_success() {
                bail!("HTTP {} from {}: {}", page.status, page.url, page.text());
            }
            let form = html::forms(&page.body)
                .into_iter()
                .next()
                .with_context(|| format!("no form on {}: {}", page.url, page.text()))?;
            let step = Step::of(&form);
            if done.contains(&step) {
                bail!(
                    "the provider showed the {step:?} page again, so it did not accept the login; {}: {}",
                    page.url,
                    page.text()
                );
            }
            let mut fields: Vec<(String, String)> = Vec::new();
            for input in &form.inputs {
                let value = match (input.kind.as_str(), input.name.as_str()) {
                    (_, "login") => user.to_string(),
                    ("password", _) => ANY_PASSWORD.to_string(),
                    (_, "confirm") if answer == Answer::Deny => {
                        fields.push(("abort".into(), "yes".into()));
                        continue;
                    }
                    _ => input.value.clone(),
                };
                fields.push((input.name.clone(), value));
            }
            if step == Step::UserCode
                && !fields
                    .iter()
                    .any(|(k, v)| k == "user_code" && !v.is_empty())
            {
                bail!(
                    "the provider asks for the user code at {}: {}",
                    page.url,
                    page.text()
                );
            }
            let action = page
                .url
                .join(&form.action)
                .with_context(|| format!("form action {:?} on {}", form.action, page.url))?;
            page = browser.post(action.as_str(), &fields)?;
            done.push(step);
        }
        bail!(
            "no success page after {done:?}; last page {}: {}",
            page.url,
            page.text()
        )
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.stop();
    }
}

fn random_token() -> String {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .unwrap();
    URL_SAFE_NO_PAD.encode(bytes)
}

fn free_loopback_port() -> u16 {
    std::net::TcpListener::bind((LOOPBACK, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    Approve,
    Deny,
}

/// The pages of oidc-provider's device flow, told apart by their form fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// The user code, posted by the page's script (or typed by the user).
    UserCode,
    /// "Confirm Device": the code shown matches the terminal's.
    Confirm,
    Login,
    Consent,
    Unknown,
}

impl Step {
    fn of(form: &html::Form) -> Self {
        let has = |name: &str| form.inputs.iter().any(|i| i.name == name);
        let value_of = |name: &str| {
            form.inputs
                .iter()
                .find(|i| i.name == name)
                .map(|i| i.value.as_str())
        };
        if has("confirm") {
            Self::Confirm
        } else if has("login") {
            Self::Login
        } else if value_of("prompt") == Some("consent") {
            Self::Consent
        } else if has("user_code") {
            Self::UserCode
        } else {
            Self::Unknown
        }
    }
}

struct Page {
    url: Url,
    status: reqwest::StatusCode,
    body: String,
}

impl Page {
    /// The page's words without markup, for error messages.
    fn text(&self) -> String {
        let body = self
            .body
            .find("<body")
            .and_then(|i| self.body.get(i..))
            .unwrap_or(&self.body);
        let mut text = String::new();
        let mut in_tag = false;
        for c in body.chars() {
            match c {
                '<' => in_tag = true,
                '>' => {
                    in_tag = false;
                    text.push(' ');
                }
                _ if !in_tag => text.push(c),
                _ => {}
            }
        }
        let text = text.split_whitespace().collect::<Vec<_>>().join(" ");
        text.chars().take(600).collect()
    }
}

/// A cookie-keeping HTTP client that only ever talks to 127.0.0.1.
struct Browser {
    client: Client,
}

impl Browser {
    fn new() -> Result<Self> {
        let policy = reqwest::redirect::Policy::custom(|attempt| {
            if attempt.previous().len() > 10 {
                attempt.error("too many redirects")
            } else if attempt.url().host_str() != Some(LOOPBACK) {
                attempt.error("redirect away from 127.0.0.1")
            } else {
                attempt.follow()
            }
        });
        let client = Client::builder()
            .cookie_store(true)
            .redirect(policy)
            .timeout(Duration::from_secs(10))
            .user_agent("portcullis-e2e-browser")
            .build()?;
        Ok(Self { client })
    }

    fn get(&self, url: &str) -> Result<Page> {
        Self::check_loopback(url)?;
        Self::page(self.client.get(url).send()?)
    }

    fn post(&self, url: &str, form: &[(String, String)]) -> Result<Page> {
        Self::check_loopback(url)?;
        Self::page(self.client.post(url).form(form).send()?)
    }

    fn check_loopback(url: &str) -> Result<()> {
        let parsed = Url::parse(url).with_context(|| format!("bad URL {url:?}"))?;
        if parsed.host_str() != Some(LOOPBACK) {
            bail!("refusing to browse {url}: only {LOOPBACK} is allowed");
        }
        Ok(())
    }

    fn page(response: Response) -> Result<Page> {
        let url = response.url().clone();
        let status = response.status();
        let body = response.text()?;
        Ok(Page { url, status, body })
    }
}

/// Just enough HTML to read the provider's own forms: `<form action>` and its `<input>`s.
pub mod html {
    pub struct Form {
        pub action: String,
        pub inputs: Vec<Input>,
    }

    pub struct Input {
        pub kind: String,
        pub name: String,
        pub value: String,
    }

    pub fn forms(html: &str) -> Vec<Form> {
        let mut forms = Vec::new();
        let mut rest = html;
        while let Some((attrs, after)) = next_tag(rest, "form") {
            let end = after.find("</form>").unwrap_or(after.len());
            let (inner, tail) = after.split_at(end);
            let mut inputs = Vec::new();
            let mut scan = inner;
            while let Some((input_attrs, next)) = next_tag(scan, "input") {
                let get = |k: &str| {
                    input_attrs
                        .iter()
                        .find(|(name, _)| name == k)
                        .map(|(_, v)| v.clone())
                };
                if let Some(name) = get("name") {
                    inputs.push(Input {
                        kind: get("type").unwrap_or_else(|| "text".into()),
                        name,
                        value: get("value").unwrap_or_default(),
                    });
                }
                scan = next;
            }
            let action = attrs
                .iter()
                .find(|(k, _)| k == "action")
                .map(|(_, v)| v.clone())
                .unwrap_or_default();
            forms.push(Form { action, inputs });
            rest = tail;
        }
        forms
    }

    /// Finds the next `<name ...>` and returns its attributes and the text after it.
    fn next_tag<'a>(html: &'a str, name: &str) -> Option<(Vec<(String, String)>, &'a str)> {
        let open = format!("<{name}");
        let mut from = 0;
        loop {
            let start = from + html.get(from..)?.find(&open)? + open.len();
            let after_name = html.get(start..)?;
            // `<input` must not match `<inputs`.
            if after_name.starts_with(|c: char| c.is_ascii_whitespace() || c == '>' || c == '/') {
                let (attrs, consumed) = attributes(after_name);
                return Some((attrs, after_name.get(consumed..).unwrap_or("")));
            }
            from = start;
        }
    }

    /// Parses `a="x" b='y' c=z d` up to the closing `>`; returns the pairs and the bytes used.
    fn attributes(s: &str) -> (Vec<(String, String)>, usize) {
        let mut attrs = Vec::new();
        let mut chars = s.char_indices().peekable();
        loop {
            while chars
                .next_if(|(_, c)| c.is_ascii_whitespace() || *c == '/')
                .is_some()
            {}
            let Some(&(i, c)) = chars.peek() else {
                return (attrs, s.len());
            };
            if c == '>' {
                return (attrs, i + 1);
            }
            let mut name = String::new();
            while let Some((_, c)) =
                chars.next_if(|(_, c)| !c.is_ascii_whitespace() && !matches!(c, '=' | '>' | '/'))
            {
                name.push(c.to_ascii_lowercase());
            }
            let mut value = String::new();
            if chars.next_if(|(_, c)| *c == '=').is_some() {
                match chars.peek().map(|&(_, c)| c) {
                    Some(q @ ('"' | '\'')) => {
                        chars.next();
                        for (_, c) in chars.by_ref() {
                            if c == q {
                                break;
                            }
                            value.push(c);
                        }
                    }
                    _ => {
                        while let Some((_, c)) =
                            chars.next_if(|(_, c)| !c.is_ascii_whitespace() && *c != '>')
                        {
                            value.push(c);
                        }
                    }
                }
            }
            if name.is_empty() {
                // An unexpected character; skip it rather than loop forever.
                chars.next();
                continue;
            }
            attrs.push((name, unescape(&value)));
        }
    }

    fn unescape(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        let mut rest = s;
        while let Some(amp) = rest.find('&') {
            out.push_str(rest.get(..amp).unwrap_or(""));
            let tail = rest.get(amp..).unwrap_or("");
            let entity_end = tail.find(';').filter(|&e| e <= 10);
            let decoded = entity_end.and_then(|e| {
                let entity = tail.get(1..e)?;
                let c = match entity {
                    "amp" => '&',
                    "lt" => '<',
                    "gt" => '>',
                    "quot" => '"',
                    "apos" => '\'',
                    _ => {
                        let code = if let Some(hex) = entity
                            .strip_prefix("#x")
                            .or_else(|| entity.strip_prefix("#X"))
                        {
                            u32::from_str_radix(hex, 16).ok()?
                        } else {
                            entity.strip_prefix('#')?.parse().ok()?
                        };
                        char::from_u32(code)?
                    }
                };
                Some((c, e + 1))
            });
            match decoded {
                Some((c, used)) => {
                    out.push(c);
                    rest = tail.get(used..).unwrap_or("");
                }
                None => {
                    out.push('&');
                    rest = tail.get(1..).unwrap_or("");
                }
            }
        }
        out.push_str(rest);
        out
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn reads_inputs_of_each_form_with_entities_decoded() {
            let page = r#"<form id="a" method="post" action="http://127.0.0.1:1/device?x=1&amp;y=2">
                <input type="hidden" name="xsrf" value="a&#39;b&quot;"/>
                <input required type=text name=login autofocus="on">
                <inputs name="not-an-input">
              </form>
              <button form="a" name="abort" value="yes">
              <form action='/second'><input name="confirm" value='yes'></form>"#;
            let forms = forms(page);
            assert_eq!(forms.len(), 2);
            assert_eq!(forms[0].action, "http://127.0.0.1:1/device?x=1&y=2");
            let inputs: Vec<_> = forms[0]
                .inputs
                .iter()
                .map(|i| (i.kind.as_str(), i.name.as_str(), i.value.as_str()))
                .collect();
            assert_eq!(inputs, [("hidden", "xsrf", "a'b\""), ("text", "login", "")]);
            assert_eq!(forms[1].action, "/second");
            assert_eq!(forms[1].inputs[0].value, "yes");
        }
    }
}
