//! The browser driver the console's tests use (`portcullis_e2e::browser`), proved against a
//! site of its own: a small HTTPS server on 127.0.0.1 (rustls, the harness's test CA)
//! serving a form, a page it posts to, a page whose inline script the CSP refuses, one
//! whose script throws, and a long page. Debian's headless Chromium trusts the test CA for
//! its session only, so a certificate of another CA, for another name or expired is
//! refused. No agent, no eBPF, no root needed; screenshots are kept in
//! `target/test-artifacts/browser/`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test: a failure is a test failure"
)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use portcullis_e2e::browser::{self, Browser, Page, VIEWPORT};
use portcullis_e2e::postgres::{make_test_certificates, BadCertificate};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Chromium, certutil and openssl, or false when the test may skip (never under
/// `cargo xtask test` or CI).
fn prerequisites() -> bool {
    let problem = browser::missing_prerequisite().or_else(|| {
        which("openssl")
            .is_none()
            .then(|| "openssl is missing (the test CA is made with it)".to_string())
    });
    portcullis_e2e::prerequisites_met(problem)
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

/// Every response's policy: nothing inline, nothing from elsewhere, forms post here only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

const FORM: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in</title></head>
<body><main><h1>Sign in</h1>
<form method="post" action="/next">
<label for="name">Name</label> <input id="name" name="name" type="text" autocomplete="off">
<button id="go" type="submit">Continue</button>
</form></main></body></html>
"#;

const INLINE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Inline</title></head>
<body><p>An inline script the policy refuses.</p>
<script>document.title = 'the inline script ran';</script>
</body></html>
"#;

/// A button under a full-window overlay, and one not displayed.
const COVERED: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Covered</title>
<link rel="stylesheet" href="/covered.css"></head>
<body><button id="under" type="button">Under</button><button id="hidden" type="button">Hidden</button>
<div id="cover"></div></body></html>
"#;

const THROWS: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Throws</title></head>
<body><p>A script that throws.</p><script src="/throws.js"></script></body></html>
"#;

/// A request the site answered: method, path and body.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    body: String,
}

/// The test's HTTPS site on 127.0.0.1, one thread per connection, each answer closing it.
struct Site {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Site {
    fn start(cert: &Path, key: &Path) -> Self {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_file(key).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        // Lives as long as the test process; each test binds its own port.
        std::thread::spawn(move || {
            for tcp in listener.incoming().flatten() {
                let config = Arc::clone(&config);
                let log = Arc::clone(&log);
                std::thread::spawn(move || {
                    let _ = serve(config, tcp, &log);
                });
            }
        });
        Self { addr, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.addr.port())
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

fn serve(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    log: &Mutex<Vec<Seen>>,
) -> std::io::Result<()> {
    // Chromium opens connections it may never use; they must not hold a thread for long.
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    let conn = rustls::ServerConnection::new(config).map_err(std::io::Error::other)?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = tls.read(&mut chunk)?;
        if n == 0 || buf.len() > 64 << 10 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let mut lines = head.lines();
    let mut request = lines.next().unwrap_or_default().split(' ');
    let method = request.next().unwrap_or_default().to_string();
    let path = request.next().unwrap_or_default().to_string();
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0)
        .min(64 << 10);
    while buf.len() < head_end + length {
        let n = tls.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let body = String::from_utf8_lossy(&buf[head_end..]).to_string();
    log.lock().unwrap().push(Seen {
        method: method.clone(),
        path: path.clone(),
        body: body.clone(),
    });
    let html = "text/html; charset=utf-8";
    let (status, content_type, extra, content): (&str, &str, &[&str], String) =
        match (method.as_str(), path.as_str()) {
            ("GET", "/") => (
                "200 OK",
                html,
                &[
                    "Set-Cookie: session=s3cr3t; Path=/; Secure; HttpOnly; SameSite=Strict",
                    "Set-Cookie: theme=dark; Path=/; Max-Age=3600; SameSite=Lax",
                ],
                FORM.to_string(),
            ),
            ("POST", "/next") => {
                let name = form_value(&body, "name").unwrap_or_default();
                (
                    "200 OK",
                    html,
                    &[],
                    format!(
                        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
                         <title>Welcome</title></head><body><main><h1>Hello, {}</h1>\
                         <p>You are signed in.</p></main></body></html>\n",
                        escape(&name)
                    ),
                )
            }
            ("GET", "/inline") => ("200 OK", html, &[], INLINE.to_string()),
            ("GET", "/covered") => ("200 OK", html, &[], COVERED.to_string()),
            ("GET", "/covered.css") => (
                "200 OK",
                "text/css",
                &[],
                "#cover { position: fixed; inset: 0; background: rgba(0, 0, 0, 0.5); }\n\
                 #hidden { display: none; }\n"
                    .to_string(),
            ),
            ("GET", "/throws") => ("200 OK", html, &[], THROWS.to_string()),
            ("GET", "/throws.js") => (
                "200 OK",
                "text/javascript",
                &[],
                "throw new Error('portcullis-browser-test: thrown by throws.js');\n".to_string(),
            ),
            ("GET", "/tall") => {
                let rows: String = (1..=150).map(|i| format!("<p>Row {i}</p>\n")).collect();
                (
                    "200 OK",
                    html,
                    &[],
                    format!(
                        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
                         <title>Tall</title></head><body>{rows}</body></html>\n"
                    ),
                )
            }
            // Chromium asks for it on every page, and reports a 404 as a page error.
            ("GET", "/favicon.ico") => ("204 No Content", "image/x-icon", &[], String::new()),
            _ => ("404 Not Found", "text/plain", &[], "not here\n".to_string()),
        };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Content-Security-Policy: {CSP}\r\nCache-Control: no-store\r\nConnection: close\r\n",
        content.len()
    );
    for h in extra {
        response.push_str(h);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    response.push_str(&content);
    tls.write_all(response.as_bytes())?;
    tls.flush()?;
    tls.conn.send_close_notify();
    let _ = tls.flush();
    Ok(())
}

/// One field of an `application/x-www-form-urlencoded` body.
fn form_value(body: &str, key: &str) -> Option<String> {
    body.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == key).then(|| {
            let v = v.replace('+', " ");
            let mut out = Vec::new();
            let mut bytes = v.bytes();
            while let Some(b) = bytes.next() {
                if b == b'%' {
                    let hex: String = bytes.by_ref().take(2).map(char::from).collect();
                    out.push(u8::from_str_radix(&hex, 16).unwrap_or(b'?'));
                } else {
                    out.push(b);
                }
            }
            String::from_utf8_lossy(&out).to_string()
        })
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// The test CA and its certificates, and the site serving the good one.
struct Fixture {
    certs: tempfile::TempDir,
    site: Site,
}

impl Fixture {
    fn new() -> Self {
        let certs = tempfile::tempdir().unwrap();
        make_test_certificates(certs.path());
        let site = Site::start(
            &certs.path().join("server.crt"),
            &certs.path().join("server.key"),
        );
        Self { certs, site }
    }

    fn ca(&self) -> std::path::PathBuf {
        self.certs.path().join("ca.pem")
    }

    fn browser(&self) -> Browser {
        Browser::launch_trusting(&self.ca()).unwrap()
    }
}

/// Width and height from the PNG's IHDR, after checking the signature and the chunk type.
fn png_dimensions(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&png[12..16], b"IHDR", "the first chunk is not IHDR");
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (be(&png[16..20]), be(&png[20..24]))
}

fn artifact(name: &str) -> std::path::PathBuf {
    browser::artifacts_dir("browser").unwrap().join(name)
}

fn wait_for_path(page: &Page<'_>, path: &str) {
    page.wait_for(
        &format!(
            "location.pathname === {} && document.readyState === 'complete'",
            serde_json::to_string(path).unwrap()
        ),
        Duration::from_secs(15),
    )
    .unwrap();
}

#[test]
fn a_filled_form_submits_and_the_next_page_shows_what_was_typed() {
    if !prerequisites() {
        return;
    }
    let f = Fixture::new();
    let browser = f.browser();
    let page = browser.page().unwrap();
    page.goto(&f.site.url("/")).unwrap();
    assert_eq!(page.eval("document.title").unwrap(), "Sign in");
    page.screenshot(&artifact("form.png")).unwrap();
    page.fill("#name", "Ada <b>&</b> Lovelace").unwrap();
    page.click("#go").unwrap();
    wait_for_path(&page, "/next");
    page.screenshot(&artifact("next.png")).unwrap();
    let text = page.text().unwrap();
    assert!(
        text.contains("Hello, Ada <b>&</b> Lovelace"),
        "the next page says {text:?}"
    );
    assert_eq!(page.url().unwrap(), f.site.url("/next"));
    let post = f
        .site
        .seen()
        .into_iter()
        .find(|s| s.method == "POST")
        .expect("the form was never posted");
    assert_eq!(post.path, "/next");
    assert_eq!(
        form_value(&post.body, "name").as_deref(),
        Some("Ada <b>&</b> Lovelace")
    );
    // Typing replaces what a field held.
    page.goto(&f.site.url("/")).unwrap();
    page.fill("#name", "first").unwrap();
    page.fill("#name", "second").unwrap();
    assert_eq!(
        page.eval("document.querySelector('#name').value").unwrap(),
        "second"
    );
    let missing = page.click("#nowhere").unwrap_err();
    assert!(
        format!("{missing:#}").contains("no element matches `#nowhere`"),
        "{missing:#}"
    );
}

#[test]
fn tab_reaches_the_field_then_the_submit_button_and_enter_submits() {
    if !prerequisites() {
        return;
    }
    let f = Fixture::new();
    let browser = f.browser();
    let page = browser.page().unwrap();
    page.goto(&f.site.url("/")).unwrap();
    let active = "document.activeElement && document.activeElement.id";
    assert_ne!(page.eval(active).unwrap(), "name");
    page.press_key("Tab").unwrap();
    assert_eq!(page.eval(active).unwrap(), "name");
    page.type_text("Grace").unwrap();
    page.press_key("Tab").unwrap();
    assert_eq!(page.eval(active).unwrap(), "go");
    page.press_key("Shift+Tab").unwrap();
    assert_eq!(page.eval(active).unwrap(), "name");
    page.press_key("Tab").unwrap();
    page.screenshot(&artifact("keyboard-focus.png")).unwrap();
    page.press_key("Enter").unwrap();
    wait_for_path(&page, "/next");
    assert!(page.text().unwrap().contains("Hello, Grace"));
    let unknown = page.press_key("F13").unwrap_err();
    assert!(
        format!("{unknown:#}").contains("not \"F13\""),
        "{unknown:#}"
    );
}

#[test]
fn a_covered_or_hidden_element_cannot_be_clicked() {
    if !prerequisites() {
        return;
    }
    let f = Fixture::new();
    let browser = f.browser();
    let page = browser.page().unwrap();
    page.goto(&f.site.url("/covered")).unwrap();
    page.wait_for(
        "getComputedStyle(document.querySelector('#cover')).position === 'fixed'",
        Duration::from_secs(5),
    )
    .unwrap();
    let covered = format!("{:#}", page.click("#under").unwrap_err());
    assert!(
        covered.contains("`#under` is covered at its centre by") && covered.contains("cover"),
        "{covered}"
    );
    let hidden = format!("{:#}", page.click("#hidden").unwrap_err());
    assert!(hidden.contains("`#hidden` has no size"), "{hidden}");
    page.click("#cover").unwrap();
    assert_eq!(page.console_errors().unwrap(), vec![]);
}

#[test]
fn two_pages_of_one_browser_each_behave_as_the_focused_one() {
    if !prerequisites() {
        return;
    }
    let f = Fixture::new();
    let browser = f.browser();
    let first = browser.page().unwrap();
    first.goto(&f.site.url("/")).unwrap();
    let second = browser.page().unwrap();
    second.goto(&f.site.url("/")).unwrap();
    for page in [&first, &second] {
        assert_eq!(page.eval("document.hasFocus()").unwrap(), true);
        page.press_key("Tab").unwrap();
        assert_eq!(
            page.eval("document.activeElement && document.activeElement.id")
                .unwrap(),
            "name"
        );
    }
}

#[test]
fn an_inline_script_the_csp_refuses_is_reported_and_does_not_run() {
    if !prerequisites() {
        return;
    }
    let f = Fixture::new();
    let browser = f.browser();
    let page = browser.page().unwrap();
    page.goto(&f.site.url("/")).unwrap();
    // The form page breaks no rule: nothing is reported for it.
    assert_eq!(page.console_errors().unwrap(), vec![]);
    page.goto(&f.site.url("/inline")).unwrap();
    let violation = page
        .wait_for_console_error("Content Security Policy", Duration::from_secs(10))
        .unwrap();
    assert!(violation.text.contains("inline script"), "{violation}");
    assert_eq!(page.eval("document.title").unwrap(), "Inline");
    page.screenshot(&artifact("csp-inline.png")).unwrap();
}

#[test]
fn an_exception_thrown_by_a_pages_script_is_reported_with_its_message() {
    if !prerequisites() {
        return;
    }
    let f = Fixture::new();
    let browser = f.browser();
    let page = browser.page().unwrap();
    page.goto(&f.site.url("/throws")).unwrap();
    let error = page
        .wait_for_console_error("thrown by throws.js", Duration::from_secs(10))
        .unwrap();
    assert_eq!(error.source, "exception", "{error}");
    assert_eq!(error.url, f.site.url("/throws.js"), "{error}");
    // The driver's own evaluation errors are its caller's, not the page's.
    assert!(page.eval("undefinedName.x").is_err());
    let errors = page.console_errors().unwrap();
    assert_eq!(errors.len(), 1, "{errors:?}");
}

#[test]
fn cookie_flags_read_back_as_the_server_set_them() {
    if !prerequisites() {
        return;
    }
    let f = Fixture::new();
    let browser = f.browser();
    let page = browser.page().unwrap();
    page.goto(&f.site.url("/")).unwrap();
    let mut cookies = page.cookies().unwrap();
    cookies.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(cookies.len(), 2, "{cookies:?}");
    let (session, theme) = (&cookies[0], &cookies[1]);
    assert_eq!(session.name, "session");
    assert_eq!(session.value, "s3cr3t");
    assert_eq!(session.domain, "127.0.0.1");
    assert_eq!(session.path, "/");
    assert!(
        session.secure && session.http_only && session.session,
        "{session:?}"
    );
    assert_eq!(session.same_site.as_deref(), Some("Strict"));
    assert_eq!(theme.name, "theme");
    assert!(
        !theme.secure && !theme.http_only && !theme.session,
        "{theme:?}"
    );
    assert_eq!(theme.same_site.as_deref(), Some("Lax"));
    // HttpOnly is the browser's doing: the page's script sees the theme only.
    assert_eq!(page.eval("document.cookie").unwrap(), "theme=dark");
}

#[test]
fn a_screenshot_is_a_png_of_the_viewport_or_of_the_whole_longer_page() {
    if !prerequisites() {
        return;
    }
    let f = Fixture::new();
    let browser = f.browser();
    let page = browser.page().unwrap();
    page.goto(&f.site.url("/")).unwrap();
    let short = artifact("viewport.png");
    let _ = std::fs::remove_file(&short);
    page.screenshot(&short).unwrap();
    let png = std::fs::read(&short).unwrap();
    assert_eq!(png_dimensions(&png), VIEWPORT);
    page.goto(&f.site.url("/tall")).unwrap();
    let height = page
        .eval("document.documentElement.scrollHeight")
        .unwrap()
        .as_u64()
        .unwrap();
    assert!(height > u64::from(VIEWPORT.1) * 2, "{height}");
    let tall = artifact("full-page.png");
    page.screenshot(&tall).unwrap();
    let png = std::fs::read(&tall).unwrap();
    assert_eq!(
        png_dimensions(&png),
        (VIEWPORT.0, u32::try_from(height).unwrap())
    );
}

#[test]
fn certificates_of_another_ca_for_another_name_or_expired_are_refused() {
    if !prerequisites() {
        return;
    }
    let f = Fixture::new();
    let browser = f.browser();
    let page = browser.page().unwrap();
    // The good certificate passes: the CA is trusted for this browser.
    page.goto(&f.site.url("/")).unwrap();
    for (bad, reason) in [
        (BadCertificate::WrongCa, "net::ERR_CERT_AUTHORITY_INVALID"),
        (
            BadCertificate::WrongName,
            "net::ERR_CERT_COMMON_NAME_INVALID",
        ),
        (BadCertificate::Expired, "net::ERR_CERT_DATE_INVALID"),
    ] {
        let (cert, key) = bad.files(f.certs.path());
        let site = Site::start(&cert, &key);
        let refused = page.goto(&site.url("/")).unwrap_err();
        assert!(
            format!("{refused:#}").contains(reason),
            "{bad:?}: {refused:#}"
        );
        assert!(site.seen().is_empty(), "{bad:?}: a request got through");
    }
    // A browser that was not told to trust the CA refuses even the good certificate.
    let untrusting = Browser::launch().unwrap();
    let page = untrusting.page().unwrap();
    let refused = page.goto(&f.site.url("/")).unwrap_err();
    assert!(
        format!("{refused:#}").contains("net::ERR_CERT_AUTHORITY_INVALID"),
        "{refused:#}"
    );
}

/// The live (not zombie) processes of process group `pgid`.
fn group_members(pgid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // After "(comm)": state, ppid, pgrp.
            let fields: Vec<&str> = stat
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            fields.len() > 2 && fields[0] != "Z" && fields[2] == pgid.to_string()
        })
        .collect()
}

#[test]
fn dropping_the_browser_kills_its_whole_process_group() {
    if !prerequisites() {
        return;
    }
    let browser = Browser::launch().unwrap();
    let page = browser.page().unwrap();
    page.goto("about:blank").unwrap();
    let pgid = browser.process_group();
    let members = group_members(pgid);
    // The browser, its zygotes and a renderer at least.
    assert!(members.len() >= 3, "{members:?}");
    drop(page);
    drop(browser);
    // SIGKILL to the group takes effect at once; the bound only allows for a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(2);
    let mut left = group_members(pgid);
    while !left.is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        left = group_members(pgid);
    }
    assert_eq!(left, Vec::<u32>::new(), "still running after the drop");
}

#[test]
fn a_condition_that_never_holds_fails_within_its_timeout_and_says_so() {
    if !prerequisites() {
        return;
    }
    let browser = Browser::launch().unwrap();
    let page = browser.page().unwrap();
    let start = Instant::now();
    let err = page
        .wait_for("window.neverSet === true", Duration::from_millis(500))
        .unwrap_err();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(3), "{took:?}");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("`window.neverSet === true` did not hold within 500ms on about:blank"),
        "{msg}"
    );
}

#[test]
fn a_page_that_never_answers_fails_goto_within_the_timeout_and_the_page_stays_usable() {
    if !prerequisites() {
        return;
    }
    // Accepts connections and never answers them.
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        let mut open = Vec::new();
        for tcp in silent.incoming().flatten().take(8) {
            open.push(tcp);
        }
        open
    });
    let browser = Browser::launch().unwrap();
    let mut page = browser.page().unwrap();
    page.set_timeout(Duration::from_secs(2));
    let start = Instant::now();
    let err = page.goto(&format!("http://127.0.0.1:{port}/")).unwrap_err();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(format!("{err:#}").contains("timed out"), "{err:#}");
    // The late reply is dropped when it comes; the connection still answers in order.
    assert_eq!(page.eval("6 * 7").unwrap(), 42);
    drop(page);
    drop(browser);
    drop(held);
}

#[test]
fn names_and_addresses_off_loopback_are_unreachable() {
    if !prerequisites() {
        return;
    }
    let browser = Browser::launch().unwrap();
    let page = browser.page().unwrap();
    // A name and an address off loopback (TEST-NET-1, never routed) both go to the closed
    // proxy port on 127.0.0.1: nothing is resolved or sent beyond the machine.
    for url in ["https://portcullis.example.com/", "http://192.0.2.1/"] {
        let err = format!("{:#}", page.goto(url).unwrap_err());
        assert!(
            err.contains("net::ERR_PROXY_CONNECTION_FAILED"),
            "{url}: {err}"
        );
    }
}
