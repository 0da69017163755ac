//! A real browser for the suites that test web pages (the console): Debian's headless
//! Chromium, driven over the Chrome DevTools Protocol
//! (<https://chromedevtools.github.io/devtools-protocol/>) by the small synchronous client
//! below, one WebSocket to `ws://127.0.0.1` per browser.
//!
//! What a test gets is what a user gets: clicks are mouse events at the element's centre
//! (hit-tested, so a covered button cannot be clicked), typing is text input, keys are key
//! events, and TLS is verified by Chromium itself. To trust a test's CA, `Browser::launch_trusting`
//! adds it to an NSS database in the throwaway home directory Chromium runs with (Chromium on
//! Linux trusts the user's NSS roots): the certificate is still checked for its name, dates and
//! chain, so a page served with a wrong or expired certificate fails as it would for a user.
//! Chromium's switches that ignore certificate errors (`--ignore-certificate-errors`,
//! `Security.setIgnoreCertificateErrors`) would hide exactly those failures, and are not used.
//!
//! Chromium is kept on loopback: every host name but `localhost` (and every address but
//! 127.0.0.1) resolves to nothing, any request off loopback goes to a closed proxy port, and
//! its background services (updates, safe browsing, metrics, sync) are off. Pages under test
//! are served on 127.0.0.1 or `localhost`. It runs in a process group of its own,
//! killed whole when the `Browser` drops, and every wait below is bounded.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use base64::Engine;
use serde_json::{json, Value};
use tungstenite::protocol::WebSocketConfig;
use tungstenite::{Message, WebSocket};

/// Debian's package, installed by `cargo xtask setup`.
pub const CHROMIUM: &str = "/usr/bin/chromium";
/// NSS's `certutil` (Debian's libnss3-tools), which writes the throwaway trust store.
pub const CERTUTIL: &str = "/usr/bin/certutil";

/// The viewport every page gets, so screenshots have a known size.
pub const VIEWPORT: (u32, u32) = (1280, 800);

/// How long a call waits unless the page was given another timeout (`Page::set_timeout`).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long Chromium has to start and say which port it listens on.
const LAUNCH_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `wait_for` asks again.
const POLL: Duration = Duration::from_millis(50);
/// The largest message read from Chromium: a full-page screenshot of a long page, in base64.
const MAX_MESSAGE: usize = 256 << 20;

/// Why the browser cannot run here, or `None` when it can: for a suite's prerequisites
/// (see `crate::prerequisites_met`).
pub fn missing_prerequisite() -> Option<String> {
    if !Path::new(CHROMIUM).is_file() {
        Some(format!(
            "{CHROMIUM} is missing; `cargo xtask setup` installs Debian's chromium"
        ))
    } else if !Path::new(CERTUTIL).is_file() {
        Some(format!(
            "{CERTUTIL} is missing; `cargo xtask setup` installs Debian's libnss3-tools"
        ))
    } else {
        None
    }
}

/// `target/test-artifacts/<suite>/`, created: where a suite keeps its screenshots.
pub fn artifacts_dir(suite: &str) -> Result<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .map(|w| w.join("target"))
                .unwrap_or_else(|| PathBuf::from("target"))
        });
    let dir = target.join("test-artifacts").join(suite);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// A headless Chromium of its own: a fresh profile and home directory, killed with its
/// children on drop.
pub struct Browser {
    child: Child,
    devtools: Mutex<DevTools>,
    /// The profile, the home directory (with the NSS database) and Chromium's log; removed
    /// after the process group is dead.
    scratch: tempfile::TempDir,
}

impl Browser {
    /// Chromium trusting only its own root store (no test CA).
    pub fn launch() -> Result<Self> {
        Self::launch_with(None)
    }

    /// Chromium that also trusts the CA certificate in `ca_pem` (PEM) as a root, for this
    /// browser only.
    pub fn launch_trusting(ca_pem: &Path) -> Result<Self> {
        Self::launch_with(Some(ca_pem))
    }

    fn launch_with(ca_pem: Option<&Path>) -> Result<Self> {
        if let Some(problem) = missing_prerequisite() {
            bail!("{problem}");
        }
        let scratch = tempfile::Builder::new()
            .prefix("portcullis-browser-")
            .tempdir()
            .context("creating the browser's scratch directory")?;
        let home = scratch.path().join("home");
        let profile = scratch.path().join("profile");
        std::fs::create_dir_all(&home).context("creating the browser's home")?;
        std::fs::create_dir_all(&profile).context("creating the browser's profile")?;
        if let Some(ca) = ca_pem {
            trust_ca(&home, ca)?;
        }
        let log_path = scratch.path().join("chromium.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        let mut cmd = Command::new(CHROMIUM);
        cmd.args([
            "--headless",
            "--remote-debugging-port=0",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-sync",
            "--disable-domain-reliability",
            "--disable-breakpad",
            "--disable-client-side-phishing-detection",
            "--safebrowsing-disable-auto-update",
            "--metrics-recording-only",
            "--password-store=basic",
            "--use-mock-keychain",
            "--hide-scrollbars",
            "--mute-audio",
            // Host names other than localhost resolve to nothing; loopback addresses bypass
            // the proxy (Chromium's implicit rule), everything else meets a closed port.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1",
            "--proxy-server=127.0.0.1:9",
        ]);
        if crate::is_root() {
            // Chromium's sandbox refuses to run as root; as any other user it stays on.
            cmd.arg("--no-sandbox");
        }
        cmd.arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            // NSS reads $HOME/.pki/nssdb; caches and crash reports stay in the scratch too.
            .env("HOME", &home)
            .env("XDG_CONFIG_HOME", home.join(".config"))
            .env("XDG_CACHE_HOME", home.join(".cache"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("duplicating the log handle")?)
            .stderr(log)
            // A group of its own, so the renderers and helpers die with it.
            .process_group(0);
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {CHROMIUM}"))?;
        let port_file = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + LAUNCH_TIMEOUT;
        let (port, path) = loop {
            if let Some(found) = read_active_port(&port_file) {
                break found;
            }
            let exited = child.try_wait().context("waiting for chromium")?;
            if exited.is_some() || Instant::now() > deadline {
                kill_group(&mut child);
                let why = match exited {
                    Some(status) => format!("exited with {status}"),
                    None => format!("wrote no DevToolsActivePort in {LAUNCH_TIMEOUT:?}"),
                };
                bail!("chromium {why}:\n{}", log_tail(&log_path));
            }
            std::thread::sleep(POLL);
        };
        let devtools = match DevTools::connect(port, &path) {
            Ok(d) => d,
            Err(e) => {
                kill_group(&mut child);
                return Err(e.context(format!(
                    "connecting to chromium's DevTools on 127.0.0.1:{port}:\n{}",
                    log_tail(&log_path)
                )));
            }
        };
        Ok(Self {
            child,
            devtools: Mutex::new(devtools),
            scratch,
        })
    }

    /// The id of Chromium's process group (its main process's pid).
    pub fn process_group(&self) -> u32 {
        self.child.id()
    }

    /// A new tab with the `VIEWPORT`, collecting its console errors from the start.
    pub fn page(&self) -> Result<Page<'_>> {
        let target = self.call(
            "Target.createTarget",
            json!({"url": "about:blank"}),
            None,
            DEFAULT_TIMEOUT,
        )?;
        let target_id = str_field(&target, "targetId")?;
        let attached = self.call(
            "Target.attachToTarget",
            json!({"targetId": target_id, "flatten": true}),
            None,
            DEFAULT_TIMEOUT,
        )?;
        let page = Page {
            browser: self,
            target: target_id,
            session: str_field(&attached, "sessionId")?,
            timeout: DEFAULT_TIMEOUT,
            errors: Mutex::new(Vec::new()),
        };
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            page.call(domain, json!({}))?;
        }
        // Only the newest tab would have the focus: with emulation each page behaves as the
        // one in front (`document.hasFocus()`, focus events), so a test can hold two users'
        // pages at once.
        page.call(
            "Emulation.setFocusEmulationEnabled",
            json!({"enabled": true}),
        )?;
        page.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": VIEWPORT.0, "height": VIEWPORT.1,
                   "deviceScaleFactor": 1, "mobile": false}),
        )?;
        Ok(page)
    }

    fn call(
        &self,
        method: &str,
        params: Value,
        session: Option<&str>,
        timeout: Duration,
    ) -> Result<Value> {
        self.devtools
            .lock()
            .map_err(|_| anyhow!("the DevTools connection was poisoned by a panic"))?
            .call(method, params, session, timeout)
    }

    fn take_events(&self, session: &str) -> Result<Vec<Event>> {
        Ok(self
            .devtools
            .lock()
            .map_err(|_| anyhow!("the DevTools connection was poisoned by a panic"))?
            .take_events(session))
    }

    /// Chromium's stderr so far (its last lines), for a failing test's message.
    pub fn log(&self) -> String {
        log_tail(&self.scratch.path().join("chromium.log"))
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// SIGKILL to the whole group, then reap the leader; the group's other members are
/// children of the leader, reparented and reaped by init once it is gone.
fn kill_group(child: &mut Child) {
    if let Ok(pgid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pgid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// An NSS database in `home/.pki/nssdb` holding `ca_pem` as a trusted TLS root ("C,,").
fn trust_ca(home: &Path, ca_pem: &Path) -> Result<()> {
    let db = home.join(".pki/nssdb");
    std::fs::create_dir_all(&db).with_context(|| format!("creating {}", db.display()))?;
    let db_arg = format!("sql:{}", db.display());
    let runs: [&[&std::ffi::OsStr]; 2] = [
        &[
            "-N".as_ref(),
            "-d".as_ref(),
            db_arg.as_ref(),
            "--empty-password".as_ref(),
        ],
        &[
            "-A".as_ref(),
            "-d".as_ref(),
            db_arg.as_ref(),
            "-t".as_ref(),
            "C,,".as_ref(),
            "-n".as_ref(),
            "portcullis-test-ca".as_ref(),
            "-i".as_ref(),
            ca_pem.as_os_str(),
        ],
    ];
    for args in runs {
        let out = Command::new(CERTUTIL)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {CERTUTIL}"))?;
        if !out.status.success() {
            bail!(
                "certutil {:?} (trusting {}): {}{}",
                args,
                ca_pem.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// The port and browser path Chromium writes once it listens: "9222\n/devtools/browser/<id>".
fn read_active_port(file: &Path) -> Option<(u16, String)> {
    let text = std::fs::read_to_string(file).ok()?;
    let mut lines = text.lines();
    let port = lines.next()?.trim().parse().ok()?;
    let path = lines.next()?.trim();
    path.starts_with("/devtools/browser/")
        .then(|| (port, path.to_string()))
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let skip = lines.len().saturating_sub(40);
    lines.into_iter().skip(skip).collect::<Vec<_>>().join("\n")
}

fn str_field(v: &Value, key: &str) -> Result<String> {
    v.get(key)
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no {key} in {v}"))
}

/// One event Chromium sent that a page keeps (loads, console and log entries, exceptions).
#[derive(Debug, Clone)]
struct Event {
    method: String,
    params: Value,
}

/// The browser-wide DevTools connection; pages talk over it with their session ids
/// ("flat" sessions), so one socket carries everything and replies come back in order.
struct DevTools {
    socket: WebSocket<TcpStream>,
    next_id: u64,
    /// Events per session, kept until their page asks for them.
    events: HashMap<String, VecDeque<Event>>,
}

/// The events a page reads; the others (there are many) are dropped as they arrive.
const KEPT_EVENTS: [&str; 6] = [
    "Page.loadEventFired",
    "Page.frameNavigated",
    "Runtime.exceptionThrown",
    "Runtime.consoleAPICalled",
    "Log.entryAdded",
    "Inspector.targetCrashed",
];

/// At most this many events are kept per page, oldest dropped first.
const MAX_EVENTS: usize = 10_000;

impl DevTools {
    fn connect(port: u16, path: &str) -> Result<Self> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let stream = TcpStream::connect_timeout(&addr, DEFAULT_TIMEOUT)
            .with_context(|| format!("connecting to {addr}"))?;
        stream.set_read_timeout(Some(DEFAULT_TIMEOUT))?;
        stream.set_write_timeout(Some(DEFAULT_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_MESSAGE))
            .max_frame_size(Some(MAX_MESSAGE));
        let url = format!("ws://{addr}{path}");
        let (socket, _) =
            tungstenite::client::client_with_config(url.as_str(), stream, Some(config))
                .map_err(|e| anyhow!("WebSocket handshake with {url}: {e}"))?;
        Ok(Self {
            socket,
            next_id: 0,
            events: HashMap::new(),
        })
    }

    /// Sends one command and reads until its reply, keeping the events that come first.
    fn call(
        &mut self,
        method: &str,
        params: Value,
        session: Option<&str>,
        timeout: Duration,
    ) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let deadline = Instant::now() + timeout;
        self.socket
            .send(Message::text(msg.to_string()))
            .with_context(|| format!("sending {method}"))?;
        loop {
            let reply = self
                .read(deadline)
                .with_context(|| format!("waiting for the reply to {method}"))?;
            if reply.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(error) = reply.get("error") {
                    bail!("{method}: {}", error);
                }
                return Ok(reply.get("result").cloned().unwrap_or(Value::Null));
            }
            self.keep(reply);
        }
    }

    /// One JSON message from Chromium, or an error once `deadline` passes.
    fn read(&mut self, deadline: Instant) -> Result<Value> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("timed out");
            }
            self.socket.get_mut().set_read_timeout(Some(left))?;
            match self.socket.read() {
                Ok(Message::Text(text)) => {
                    return serde_json::from_str(text.as_str())
                        .with_context(|| format!("a message that is not JSON: {text}"))
                }
                Ok(Message::Close(frame)) => bail!("chromium closed DevTools: {frame:?}"),
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) => return Err(e).context("reading from DevTools"),
            }
        }
    }

    fn keep(&mut self, msg: Value) {
        let (Some(method), Some(session)) = (
            msg.get("method").and_then(Value::as_str),
            msg.get("sessionId").and_then(Value::as_str),
        ) else {
            return;
        };
        if !KEPT_EVENTS.contains(&method) {
            return;
        }
        let queue = self.events.entry(session.to_string()).or_default();
        if queue.len() >= MAX_EVENTS {
            queue.pop_front();
        }
        queue.push_back(Event {
            method: method.to_string(),
            params: msg.get("params").cloned().unwrap_or(Value::Null),
        });
    }

    fn take_events(&mut self, session: &str) -> Vec<Event> {
        self.events
            .get_mut(session)
            .map(|q| q.drain(..).collect())
            .unwrap_or_default()
    }
}

/// What the page reported as an error: an uncaught exception, `console.error`, or a
/// browser log entry at level error (a Content-Security-Policy violation, a failed load).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsoleError {
    /// `exception`, `console`, or the log entry's source (`security` for CSP, `network`, …).
    pub source: String,
    pub text: String,
    /// The URL of the document or script it came from, when Chromium says.
    pub url: String,
}

impl fmt::Display for ConsoleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{}] {} ({})", self.source, self.text, self.url)
    }
}

/// A cookie as the browser stores it for the page's URL.
#[derive(Debug, Clone, PartialEq)]
pub struct Cookie {
    pub name: String,
    pub value: String,
    pub domain: String,
    pub path: String,
    pub secure: bool,
    pub http_only: bool,
    /// `Strict`, `Lax` or `None` as the server set it; `None` (the Rust one) when it set no
    /// SameSite attribute.
    pub same_site: Option<String>,
    /// A session cookie (no Expires or Max-Age).
    pub session: bool,
}

/// A key `Page::press_key` can press: (name, code, Windows virtual key code, text typed).
const KEYS: [(&str, &str, u32, &str); 9] = [
    ("Tab", "Tab", 9, ""),
    ("Enter", "Enter", 13, "\r"),
    ("Escape", "Escape", 27, ""),
    (" ", "Space", 32, " "),
    ("ArrowUp", "ArrowUp", 38, ""),
    ("ArrowDown", "ArrowDown", 40, ""),
    ("ArrowLeft", "ArrowLeft", 37, ""),
    ("ArrowRight", "ArrowRight", 39, ""),
    ("Backspace", "Backspace", 8, ""),
];

/// One tab. Every call waits at most the page's timeout (15 s unless set).
pub struct Page<'b> {
    browser: &'b Browser,
    target: String,
    session: String,
    timeout: Duration,
    /// Errors read from the event stream so far, oldest first.
    errors: Mutex<Vec<ConsoleError>>,
}

impl Page<'_> {
    /// The longest any later call on this page waits.
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn call(&self, method: &str, params: Value) -> Result<Value> {
        self.call_within(method, params, self.timeout)
    }

    fn call_within(&self, method: &str, params: Value, timeout: Duration) -> Result<Value> {
        self.browser
            .call(method, params, Some(&self.session), timeout)
    }

    /// Takes the events that arrived so far: errors are kept, and whether a load ended.
    fn drain(&self) -> Result<bool> {
        let mut loaded = false;
        let events = self.browser.take_events(&self.session)?;
        let mut errors = self
            .errors
            .lock()
            .map_err(|_| anyhow!("the page's error list was poisoned by a panic"))?;
        for e in events {
            match e.method.as_str() {
                "Page.loadEventFired" => loaded = true,
                "Inspector.targetCrashed" => bail!("the page crashed"),
                _ => errors.extend(console_error(&e)),
            }
        }
        Ok(loaded)
    }

    /// Navigates to `url` and returns once its load event fired; a page that cannot be
    /// reached (a refused certificate, a closed port) is an error naming Chromium's reason.
    pub fn goto(&self, url: &str) -> Result<()> {
        let deadline = Instant::now() + self.timeout;
        // A load event of the page before must not count as this one's.
        self.drain()?;
        let nav = match self.call("Page.navigate", json!({"url": url})) {
            Ok(nav) => nav,
            Err(e) => {
                // A navigation still waiting for its server holds the page's later commands
                // until it is stopped.
                let _ = self.call_within("Page.stopLoading", json!({}), Duration::from_secs(2));
                return Err(e.context(format!("navigating to {url}")));
            }
        };
        if let Some(error) = nav.get("errorText").and_then(Value::as_str) {
            bail!("navigating to {url}: {error}");
        }
        if nav.get("loaderId").is_none() {
            // A move within the document (a new #fragment) loads nothing.
            return Ok(());
        }
        loop {
            if self.drain()? {
                return Ok(());
            }
            if Instant::now() > deadline {
                // Until the load is stopped, DevTools holds the page's later commands.
                let _ = self.call_within("Page.stopLoading", json!({}), Duration::from_secs(2));
                bail!("{url} did not finish loading in {:?}", self.timeout);
            }
            // A cheap round trip: events sent before its reply are read on the way.
            let _ = self.call_within("Runtime.evaluate", json!({"expression": "0"}), POLL * 4);
            std::thread::sleep(POLL);
        }
    }

    /// Runs `js` as an expression in the page (awaiting it if it is a promise) and returns
    /// its value as JSON (`null` for `undefined`); a thrown exception is an error.
    pub fn eval(&self, js: &str) -> Result<Value> {
        let r = self
            .call(
                "Runtime.evaluate",
                json!({"expression": js, "returnByValue": true, "awaitPromise": true,
                       "userGesture": false}),
            )
            .with_context(|| format!("evaluating `{js}`"))?;
        if let Some(ex) = r.get("exceptionDetails") {
            let what = ex
                .pointer("/exception/description")
                .and_then(Value::as_str)
                .or_else(|| ex.get("text").and_then(Value::as_str))
                .unwrap_or("an exception");
            bail!("`{js}` threw: {what}");
        }
        Ok(r.pointer("/result/value").cloned().unwrap_or(Value::Null))
    }

    /// Waits until the expression `condition` is truthy, asking every 50 ms (errors, as
    /// while a new page loads, count as not yet); at `timeout` it fails with the last answer.
    pub fn wait_for(&self, condition: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let js = format!("!!({condition})");
        loop {
            let last = match self.eval(&js) {
                Ok(Value::Bool(true)) => return Ok(()),
                Ok(v) => v.to_string(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                let url = self.url().unwrap_or_else(|e| format!("unknown ({e:#})"));
                bail!("`{condition}` did not hold within {timeout:?} on {url}: last {last}");
            }
            std::thread::sleep(POLL);
        }
    }

    /// The first element `selector` matches, scrolled into view, as a JS expression prefix.
    fn element(&self, selector: &str) -> Result<String> {
        let sel = serde_json::to_string(selector)?;
        let found = self.eval(&format!(
            "(() => {{ const e = document.querySelector({sel}); if (!e) return false; \
             e.scrollIntoView({{block: 'center', inline: 'center'}}); return true; }})()"
        ))?;
        if found != Value::Bool(true) {
            bail!(
                "no element matches `{selector}` on {}",
                self.url().unwrap_or_default()
            );
        }
        Ok(format!("document.querySelector({sel})"))
    }

    /// Focuses the field `selector` matches, selects what it holds, and types `text` over
    /// it as keyboard input (the page sees input events, as from a user).
    pub fn fill(&self, selector: &str, text: &str) -> Result<()> {
        let e = self.element(selector)?;
        let focused = self.eval(&format!(
            "(() => {{ const e = {e}; e.focus(); if (e.select) e.select(); \
             return document.activeElement === e; }})()"
        ))?;
        if focused != Value::Bool(true) {
            bail!("`{selector}` cannot take the focus (disabled or not a field?)");
        }
        self.type_text(text)
    }

    /// Types `text` into whatever has the focus.
    pub fn type_text(&self, text: &str) -> Result<()> {
        self.call("Input.insertText", json!({"text": text}))
            .map(drop)
    }

    /// A left click at the centre of the element `selector` matches, as mouse events; fails
    /// when another element covers that point (the user could not click it either).
    pub fn click(&self, selector: &str) -> Result<()> {
        let e = self.element(selector)?;
        let at = self.eval(&format!(
            "(() => {{ const e = {e}; const r = e.getBoundingClientRect(); \
             const x = r.left + r.width / 2, y = r.top + r.height / 2; \
             const hit = document.elementFromPoint(x, y); \
             return {{x, y, w: r.width, h: r.height, reachable: !!hit && (hit === e || e.contains(hit)), \
                      hit: hit ? hit.outerHTML.slice(0, 120) : null}}; }})()"
        ))?;
        let (Some(x), Some(y)) = (
            at.get("x").and_then(Value::as_f64),
            at.get("y").and_then(Value::as_f64),
        ) else {
            bail!("no position for `{selector}`: {at}");
        };
        if at.get("w").and_then(Value::as_f64) == Some(0.0)
            || at.get("h").and_then(Value::as_f64) == Some(0.0)
        {
            bail!("`{selector}` has no size (hidden?): {at}");
        }
        if at.get("reachable") != Some(&Value::Bool(true)) {
            bail!("`{selector}` is covered at its centre by {}", at["hit"]);
        }
        for kind in ["mouseMoved", "mousePressed", "mouseReleased"] {
            self.call(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left",
                       "buttons": if kind == "mousePressed" { 1 } else { 0 },
                       "clickCount": if kind == "mouseMoved" { 0 } else { 1 }}),
            )
            .with_context(|| format!("clicking `{selector}`"))?;
        }
        Ok(())
    }

    /// Presses and releases one key: `Tab`, `Shift+Tab`, `Enter`, `Escape`, `" "` (space),
    /// the arrows or `Backspace`; any other name is an error.
    pub fn press_key(&self, key: &str) -> Result<()> {
        let (shift, name) = match key.strip_prefix("Shift+") {
            Some(rest) => (true, rest),
            None => (false, key),
        };
        let Some(&(key_name, code, vk, text)) = KEYS.iter().find(|k| k.0 == name) else {
            bail!(
                "press_key knows {:?} (optionally with Shift+), not {key:?}",
                KEYS.map(|k| k.0)
            );
        };
        let modifiers = if shift { 8 } else { 0 };
        let mut down = json!({"type": if text.is_empty() { "rawKeyDown" } else { "keyDown" },
            "key": key_name, "code": code, "windowsVirtualKeyCode": vk,
            "nativeVirtualKeyCode": vk, "modifiers": modifiers});
        if !text.is_empty() {
            down["text"] = json!(text);
            down["unmodifiedText"] = json!(text);
        }
        self.call("Input.dispatchKeyEvent", down)
            .with_context(|| format!("pressing {key}"))?;
        self.call(
            "Input.dispatchKeyEvent",
            json!({"type": "keyUp", "key": key_name, "code": code, "windowsVirtualKeyCode": vk,
                   "nativeVirtualKeyCode": vk, "modifiers": modifiers}),
        )
        .with_context(|| format!("releasing {key}"))?;
        Ok(())
    }

    /// The page's current URL.
    pub fn url(&self) -> Result<String> {
        match self.eval("location.href")? {
            Value::String(s) => Ok(s),
            other => bail!("location.href is {other}"),
        }
    }

    /// The text of the page as rendered (`document.body.innerText`).
    pub fn text(&self) -> Result<String> {
        match self.eval("document.body ? document.body.innerText : ''")? {
            Value::String(s) => Ok(s),
            other => bail!("innerText is {other}"),
        }
    }

    /// The cookies the browser would send to the page's current URL, with their flags.
    pub fn cookies(&self) -> Result<Vec<Cookie>> {
        let url = self.url()?;
        let r = self.call("Network.getCookies", json!({"urls": [url]}))?;
        let list = r
            .get("cookies")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("Network.getCookies gave no list: {r}"))?;
        list.iter()
            .map(|c| {
                Ok(Cookie {
                    name: str_field(c, "name")?,
                    value: str_field(c, "value")?,
                    domain: str_field(c, "domain")?,
                    path: str_field(c, "path")?,
                    secure: c.get("secure") == Some(&Value::Bool(true)),
                    http_only: c.get("httpOnly") == Some(&Value::Bool(true)),
                    same_site: c
                        .get("sameSite")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                    session: c.get("session") == Some(&Value::Bool(true)),
                })
            })
            .collect()
    }

    /// A PNG of the whole page (not only what the viewport shows) written to `path`; at
    /// least the viewport's size.
    pub fn screenshot(&self, path: &Path) -> Result<()> {
        let metrics = self.call("Page.getLayoutMetrics", json!({}))?;
        let size = |key: &str, least: u32| {
            metrics
                .pointer(&format!("/cssContentSize/{key}"))
                .and_then(Value::as_f64)
                .map_or(f64::from(least), |v| v.ceil().max(f64::from(least)))
        };
        let (width, height) = (size("width", VIEWPORT.0), size("height", VIEWPORT.1));
        let shot = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true,
                   "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1}}),
        )?;
        let data = shot
            .get("data")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("Page.captureScreenshot gave no data"))?;
        let png = base64::engine::general_purpose::STANDARD
            .decode(data)
            .context("the screenshot is not base64")?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::fs::write(path, png).with_context(|| format!("writing {}", path.display()))
    }

    /// Every error the page reported since it opened (uncaught exceptions, `console.error`,
    /// Content-Security-Policy violations and other browser errors), oldest first. Chromium
    /// reports asynchronously; `wait_for_console_error` waits for one.
    pub fn console_errors(&self) -> Result<Vec<ConsoleError>> {
        // The round trip reads whatever Chromium sent before it.
        self.eval("0")?;
        self.drain()?;
        Ok(self
            .errors
            .lock()
            .map_err(|_| anyhow!("the page's error list was poisoned by a panic"))?
            .clone())
    }

    /// Waits until an error whose text contains `needle` has been reported.
    pub fn wait_for_console_error(&self, needle: &str, timeout: Duration) -> Result<ConsoleError> {
        let deadline = Instant::now() + timeout;
        loop {
            let errors = self.console_errors()?;
            if let Some(e) = errors.iter().find(|e| e.text.contains(needle)) {
                return Ok(e.clone());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no error containing {needle:?} within {timeout:?}; reported: {:?}",
                    errors.iter().map(ToString::to_string).collect::<Vec<_>>()
                );
            }
            std::thread::sleep(POLL);
        }
    }
}

impl Drop for Page<'_> {
    fn drop(&mut self) {
        // Frees the tab's renderer; the browser's drop kills everything anyway, so a failure
        // here changes nothing.
        let _ = self.browser.call(
            "Target.closeTarget",
            json!({"targetId": self.target}),
            None,
            Duration::from_secs(2),
        );
        if let Ok(mut devtools) = self.browser.devtools.lock() {
            devtools.events.remove(&self.session);
        }
    }
}

/// The error an event carries, if it is one.
fn console_error(e: &Event) -> Option<ConsoleError> {
    let p = &e.params;
    let s = |v: Option<&Value>| v.and_then(Value::as_str).unwrap_or_default().to_string();
    match e.method.as_str() {
        "Runtime.exceptionThrown" => {
            let d = p.get("exceptionDetails")?;
            let text = d
                .pointer("/exception/description")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| s(d.get("text")));
            Some(ConsoleError {
                source: "exception".into(),
                text,
                url: s(d.get("url")),
            })
        }
        "Runtime.consoleAPICalled" if p.get("type").and_then(Value::as_str) == Some("error") => {
            let text = p
                .get("args")
                .and_then(Value::as_array)
                .map(|args| {
                    args.iter()
                        .map(|a| {
                            a.get("value")
                                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                                .unwrap_or_else(|| s(a.get("description")))
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_default();
            let url = s(p.pointer("/stackTrace/callFrames/0/url"));
            Some(ConsoleError {
                source: "console".into(),
                text,
                url,
            })
        }
        "Log.entryAdded" => {
            let entry = p.get("entry")?;
            (entry.get("level").and_then(Value::as_str) == Some("error")).then(|| ConsoleError {
                source: s(entry.get("source")),
                text: s(entry.get("text")),
                url: s(entry.get("url")),
            })
        }
        _ => None,
    }
}
