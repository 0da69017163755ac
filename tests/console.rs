//! The web console end to end: the real agent serving it over TLS with a certificate from
//! its CA, people signing in against the real OpenID Provider (oidc-provider under Node.js)
//! with the authorization code flow and PKCE, driven by an HTTP client with a cookie jar
//! that fills the provider's forms as a browser would, and a psql client waiting on a
//! statement through the real kernel redirect while an approver decides it in the console;
//! and the same in Debian's headless Chromium (`portcullis_e2e::browser`), whose
//! screenshots of each page are kept in `target/test-artifacts/console/`; an admin ending an
//! open psql session from the live page. Slots 196–199.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failure is a test failure"
)]

use std::io::Write;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use portcullis_e2e::browser::{self, Browser as Chromium, Page as Tab};
use portcullis_e2e::console::{self as console_world, Http as Browser, HttpPage as Page, World};
use portcullis_e2e::oidc::{self, html, OidcUser};
use portcullis_e2e::postgres::{self as pg, client_command, RunAs};
use portcullis_e2e::{e2e_enabled, Agent, Slot};
use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::{json, Value};

fn enabled() -> bool {
    e2e_enabled() && oidc::oidc_enabled()
}

/// The people at the provider (roles: `audit` audits, `dba-leads` approves, `platform`
/// administers).
fn people() -> Vec<OidcUser> {
    vec![
        OidcUser::new("alice", &["engineering", "dba-leads"]),
        OidcUser::new("bob", &["dba-leads"]),
        OidcUser::new("carol", &["audit"]),
        OidcUser::new("erin", &["engineering"]),
        OidcUser::new("pat", &["platform"]),
    ]
}

fn world(name: &str, slot: u8) -> World {
    console_world::world(name, slot, people())
}

/// A visitor of the world's console, trusting its CA alone.
fn visitor(w: &World) -> Browser {
    Browser::new(&w.console, &w.ca())
}

fn psql_script(w: &World, uid: u32, script: &str) -> Child {
    w.psql_script(uid, script)
}

/// Runs `portcullis login` as `uid` and finishes the device flow as `user`.
fn login(w: &World, uid: u32, user: &str) {
    w.provider.login(&w.agent, uid, user);
}

fn wait_event(agent: &Agent, kind: &str, pick: impl Fn(&Value) -> bool) -> Value {
    agent.wait_event(kind, pick)
}

fn set_cookies(page: &Page) -> Vec<String> {
    page.headers
        .get_all(reqwest::header::SET_COOKIE)
        .iter()
        .map(|v| v.to_str().unwrap().to_string())
        .collect()
}

#[test]
fn signing_in_with_the_issuer_reaches_the_sessions_page_and_nobody_else_gets_in() {
    if !enabled() || !portcullis_e2e::prerequisites_met(pg::missing_prerequisite()) {
        return;
    }
    let w = world("console-signin", 196);
    // A session to list: alice reads through the redirect.
    let alice = 48196;
    login(&w, alice, "alice");
    let o = psql_script(&w, alice, "SELECT 'listed';\n")
        .wait_with_output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("listed"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    // Without a session every page sends the browser to sign in.
    let browser = visitor(&w);
    let direct = Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .add_root_certificate(
            reqwest::Certificate::from_pem(
                &std::fs::read(w.agent.dir.path().join("state/ca/ca.pem")).unwrap(),
            )
            .unwrap(),
        )
        .build()
        .unwrap();
    let r = direct
        .get(format!("{}/sessions", w.console))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::SEE_OTHER);
    assert_eq!(r.headers()["location"], "/signin");
    let csp = r.headers()["content-security-policy"].to_str().unwrap();
    assert!(csp.starts_with("default-src 'none'"), "{csp}");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert_eq!(r.headers()["cache-control"], "no-store");
    // TLS only: the same port refuses plain HTTP.
    assert!(reqwest::blocking::get(format!(
        "http://127.0.0.1:{}/sessions",
        Slot::new(196).server_port
    ))
    .is_err());

    // carol audits: the callback sets the session cookie, Secure, HttpOnly, SameSite=Strict.
    let signed = browser.sign_in(&w.provider, "carol");
    assert_eq!(signed.status, StatusCode::OK, "{}", signed.body);
    assert!(
        signed.body.contains("carol@example.test"),
        "{}",
        signed.body
    );
    let cookies = set_cookies(&signed);
    let session = cookies
        .iter()
        .find(|c| c.starts_with("__Host-portcullis-console="))
        .unwrap_or_else(|| panic!("{cookies:?}"));
    for flag in ["Secure", "HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(session.split("; ").any(|a| a == flag), "{flag}: {session}");
    }
    // The callback's code and state answer one sign-in, once.
    let replay = browser.get(&format!("/auth/callback?{}", signed.url.query().unwrap()));
    assert_eq!(replay.status, StatusCode::FORBIDDEN, "{}", replay.body);
    let sessions = browser.get("/sessions");
    assert_eq!(sessions.status, StatusCode::OK, "{}", sessions.body);
    let opened = wait_event(&w.agent, "connection.opened", |e| {
        e["identity"]["subject"] == "alice"
    });
    let id = opened["connection_id"].as_u64().unwrap();
    assert!(
        sessions.body.contains(&format!(">{id}</a>")),
        "session {id} is not listed: {}",
        sessions.body
    );
    // Filters: a user that opened nothing lists nothing.
    let none = browser.get("/sessions?user=nobody");
    assert!(!none.body.contains(&format!(">{id}</a>")), "{}", none.body);
    let signin = wait_event(&w.agent, "console.signin", |e| {
        e["identity"]["subject"] == "carol"
    });
    assert!(
        signin["reason"].as_str().unwrap().contains("auditor"),
        "{signin}"
    );
    // An auditor sees no approvals.
    assert_eq!(browser.get("/approvals").status, StatusCode::FORBIDDEN);

    // erin is nobody the console knows: refused at the callback, no session, recorded.
    let stranger = visitor(&w);
    let refused = stranger.sign_in(&w.provider, "erin");
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);
    assert!(
        refused
            .body
            .contains("erin@example.test holds no console role"),
        "{}",
        refused.body
    );
    assert!(!set_cookies(&refused)
        .iter()
        .any(|c| c.starts_with("__Host-portcullis-console=") && !c.contains("Max-Age=0")));
    let again = stranger.get("/sessions");
    assert_ne!(again.url.path(), "/sessions", "{}", again.body);
    assert_ne!(again.status, StatusCode::OK, "{}", again.body);
    wait_event(&w.agent, "console.denied", |e| {
        e["identity"]["subject"] == "erin"
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("sign-in refused"))
    });
}

#[test]
fn an_approver_decides_a_waiting_statement_in_the_console_and_psql_gets_its_answer() {
    if !enabled() || !portcullis_e2e::prerequisites_met(pg::missing_prerequisite()) {
        return;
    }
    let w = world("console-approve", 197);
    let alice = 48197;
    login(&w, alice, "alice");
    let bob = visitor(&w);
    assert_eq!(bob.sign_in(&w.provider, "bob").status, StatusCode::OK);
    // alice may approve for dba-leads, but not her own request.
    let alice_browser = visitor(&w);
    assert_eq!(
        alice_browser.sign_in(&w.provider, "alice").status,
        StatusCode::OK
    );

    let psql = psql_script(
        &w,
        alice,
        "CREATE TABLE console_t (id int);\n\
         SELECT 'created', count(*) FROM pg_tables WHERE tablename = 'console_t';\n\
         DROP TABLE console_t;\n\
         SELECT 'still here', count(*) FROM pg_tables WHERE tablename = 'console_t';\n",
    );
    let create = bob.next_pending(&[]);
    let page = bob.get("/approvals");
    assert!(
        page.body.contains("CREATE TABLE console_t (id int)"),
        "{}",
        page.body
    );
    assert!(
        !w.postgres
            .psql("app", "SELECT tablename FROM pg_tables")
            .contains("console_t"),
        "the waiting statement ran"
    );
    // The requester's page offers her no decision on her own request, and one she posts
    // with her own token is refused by the store, as on the command line.
    assert!(alice_browser.decision_form(&create).is_none());
    let own = alice_browser.decide_unoffered(&create, "approve", "it is mine");
    assert_eq!(own.status, StatusCode::FORBIDDEN, "{}", own.body);
    assert!(
        own.body
            .contains("you asked for this yourself; someone else must approve it"),
        "{}",
        own.body
    );
    let done = bob.decide(&create, "approve", "looks right");
    assert_eq!(done.status, StatusCode::OK, "{}", done.body);
    assert!(
        done.body
            .contains(&format!("Request {create} is now approved.")),
        "{}",
        done.body
    );

    let drop = bob.next_pending(std::slice::from_ref(&create));
    let denied = bob.decide(&drop, "deny", "keep the table");
    assert_eq!(denied.status, StatusCode::OK, "{}", denied.body);

    let out = psql.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(stdout.contains("created|1"), "{stdout}\n{stderr}");
    assert!(stderr.contains("ERROR:  42501"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "approval request {drop} was denied by bob@example.test: keep the table"
        )),
        "{stderr}"
    );
    assert!(stdout.contains("still here|1"), "{stdout}\n{stderr}");

    let approved = wait_event(&w.agent, "approval.approved", |e| {
        e["request_id"] == create.as_str()
    });
    assert_eq!(approved["identity"]["subject"], "bob", "{approved}");
    let refusal = wait_event(&w.agent, "console.denied", |e| {
        e["identity"]["subject"] == "alice"
    });
    assert!(
        refusal["reason"]
            .as_str()
            .unwrap()
            .contains("you asked for this yourself"),
        "{refusal}"
    );
    wait_event(&w.agent, "statement.executed", |e| {
        e["statement"]
            .as_str()
            .is_some_and(|t| t.starts_with("CREATE TABLE console_t"))
            && e["policy_ids"]
                .as_array()
                .unwrap()
                .contains(&json!(format!("approval:{create}")))
    });
}

/// A Chromium page signed in to the console as `user`: the console's address sends it to
/// the provider, whose login and consent forms it fills and submits as a person would;
/// back at the console it lands on the home page.
fn chromium_sign_in<'b>(browser: &'b Chromium, w: &World, user: &str) -> Tab<'b> {
    let page = browser.page().unwrap();
    page.goto(&format!("{}/approvals", w.console)).unwrap();
    page.wait_for(
        "document.querySelector('input[name=login]')",
        Duration::from_secs(15),
    )
    .unwrap();
    page.fill("input[name=login]", user).unwrap();
    page.fill("input[name=password]", "any password").unwrap();
    page.click("button[type=submit]").unwrap();
    // The consent page, then the console's callback, whose page moves on to `/`.
    page.wait_for(
        "document.querySelector('input[name=prompt][value=consent]') || location.pathname === '/'",
        Duration::from_secs(15),
    )
    .unwrap();
    if page.url().unwrap().starts_with(w.provider.issuer()) {
        page.click("button[type=submit]").unwrap();
    }
    page.wait_for(
        &format!(
            "location.href === {} && document.readyState === 'complete' && document.title.startsWith('Console')",
            serde_json::to_string(&format!("{}/", w.console)).unwrap()
        ),
        Duration::from_secs(15),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}\n{}", page.text().unwrap_or_default(), w.provider.log()));
    page
}

fn shot(page: &Tab<'_>, name: &str) {
    let path = browser::artifacts_dir("console").unwrap().join(name);
    page.screenshot(&path).unwrap();
    assert!(
        std::fs::metadata(&path).unwrap().len() > 1000,
        "{}",
        path.display()
    );
}

fn wait_for_text(page: &Tab<'_>, text: &str) {
    page.wait_for(
        &format!(
            "document.readyState === 'complete' && document.body.innerText.includes({})",
            serde_json::to_string(text).unwrap()
        ),
        Duration::from_secs(15),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", page.text().unwrap_or_default()));
}

#[test]
fn in_chromium_an_approver_approves_a_waiting_statement_and_the_requester_is_refused() {
    if !enabled()
        || !portcullis_e2e::prerequisites_met(pg::missing_prerequisite())
        || !portcullis_e2e::prerequisites_met(browser::missing_prerequisite())
    {
        return;
    }
    let w = world("console-chromium", 198);
    let alice = 48198;
    login(&w, alice, "alice");
    let ca = w.agent.dir.path().join("state/ca/ca.pem");

    let bob_browser = Chromium::launch_trusting(&ca).unwrap();
    let bob = chromium_sign_in(&bob_browser, &w, "bob");
    // The session cookie as Chromium keeps it.
    let cookies = bob.cookies().unwrap();
    let session = cookies
        .iter()
        .find(|c| c.name == "__Host-portcullis-console")
        .unwrap_or_else(|| panic!("{cookies:?}"));
    assert!(session.secure && session.http_only, "{session:?}");
    assert_eq!(session.same_site.as_deref(), Some("Strict"), "{session:?}");
    shot(&bob, "home.png");

    let psql = psql_script(
        &w,
        alice,
        "CREATE TABLE chromium_t (id int);\n\
         SELECT 'created', count(*) FROM pg_tables WHERE tablename = 'chromium_t';\n",
    );
    // The pending request shows on bob's approvals page (reloaded until it is there).
    let deadline = Instant::now() + Duration::from_secs(30);
    let request = loop {
        bob.goto(&format!("{}/approvals", w.console)).unwrap();
        let found = bob
            .eval("(() => { const f = document.querySelector('form[action^=\"/approvals/\"]'); return f ? f.getAttribute('action').slice(11) : null; })()")
            .unwrap();
        if let Some(id) = found.as_str() {
            break id.to_string();
        }
        assert!(Instant::now() < deadline, "{}", bob.text().unwrap());
        std::thread::sleep(Duration::from_millis(300));
    };
    wait_for_text(&bob, "CREATE TABLE chromium_t (id int)");
    shot(&bob, "approvals.png");

    // alice, an approver herself, is refused her own request by the store.
    let alice_browser = Chromium::launch_trusting(&ca).unwrap();
    let own = chromium_sign_in(&alice_browser, &w, "alice");
    own.goto(&format!("{}/approvals", w.console)).unwrap();
    wait_for_text(
        &own,
        "This is your own request: another approver decides it.",
    );
    // The page offers her nothing to click; a form she builds in it with her own token is
    // the store's to refuse.
    own.eval(&format!(
        "(() => {{ const f = document.createElement('form'); f.method = 'post'; \
         f.action = '/approvals/{request}'; \
         const csrf = document.querySelector('form[action=\"/signout\"] input[name=csrf]').value; \
         for (const [k, v] of [['csrf', csrf], ['decision', 'approve'], ['reason', 'it is mine']]) {{ \
         const i = document.createElement('input'); i.type = 'hidden'; i.name = k; i.value = v; \
         f.appendChild(i); }} document.body.appendChild(f); f.submit(); return true; }})()"
    ))
    .unwrap();
    wait_for_text(
        &own,
        "you asked for this yourself; someone else must approve it",
    );
    shot(&own, "requester-refused.png");

    bob.fill(&format!("#reason-{request}"), "looks right")
        .unwrap();
    bob.click(&format!(
        "form[action=\"/approvals/{request}\"] button[value=approve]"
    ))
    .unwrap();
    wait_for_text(&bob, &format!("Request {request} is now approved."));
    shot(&bob, "approved.png");
    let out = psql.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        stdout.contains("created|1"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // carol audits: the sessions list and the session's timeline with the statement.
    let carol_browser = Chromium::launch_trusting(&ca).unwrap();
    let carol = chromium_sign_in(&carol_browser, &w, "carol");
    let opened = wait_event(&w.agent, "connection.opened", |e| {
        e["identity"]["subject"] == "alice"
    });
    let id = opened["connection_id"].as_u64().unwrap();
    carol.goto(&format!("{}/sessions", w.console)).unwrap();
    shot(&carol, "sessions.png");
    carol
        .click(&format!("a[href^=\"/sessions/{id}?\"]"))
        .unwrap();
    wait_for_text(&carol, "CREATE TABLE chromium_t (id int)");
    assert!(carol
        .text()
        .unwrap()
        .contains(&format!("approval:{request}")));
    shot(&carol, "timeline.png");

    // No console page broke the CSP, threw or failed a load (the provider's own pages
    // ask for web fonts, which Chromium kept off the network, and have no favicon).
    // alice's refusal is a 403 page, which Chromium logs as a failed load.
    let refusal = format!("{}/approvals/{request}", w.console);
    for page in [&bob, &own, &carol] {
        let ours: Vec<_> = page
            .console_errors()
            .unwrap()
            .into_iter()
            .filter(|e| e.url.is_empty() || e.url.starts_with(&w.console))
            .filter(|e| !(e.url == refusal && e.text.contains("status of 403")))
            .collect();
        assert_eq!(ours, vec![], "{}", page.url().unwrap());
    }
}

#[test]
fn an_admin_ends_an_open_psql_session_from_the_live_page_and_an_approver_cannot() {
    if !enabled() || !portcullis_e2e::prerequisites_met(pg::missing_prerequisite()) {
        return;
    }
    let w = world("console-live", 199);
    let alice = 48431;
    login(&w, alice, "alice");
    let conninfo = format!(
        "host=127.0.0.1 port={} user=app dbname=app sslmode=disable",
        w.postgres.port()
    );
    let mut psql = client_command(
        "psql",
        RunAs {
            uid: Some(alice),
            cgroup: Some(&w.cg.path),
        },
    )
    .args(["-X", "-A", "-t", "-d", &conninfo])
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut stdin = psql.stdin.take().unwrap();
    stdin.write_all(b"SELECT 'before';\n").unwrap();
    stdin.flush().unwrap();
    let opened = wait_event(&w.agent, "connection.opened", |e| {
        e["identity"]["subject"] == "alice"
    });
    let id = opened["connection_id"].as_u64().unwrap();

    // An approver sees no live page, and a form for it is refused.
    let bob = visitor(&w);
    bob.sign_in(&w.provider, "bob");
    assert_eq!(bob.get("/live").status, StatusCode::FORBIDDEN);
    let bobs_csrf = bob
        .get("/grants")
        .body
        .split("name=\"csrf\" value=\"")
        .nth(1)
        .map(|rest| rest.split('"').next().unwrap().to_string())
        .unwrap();
    let action = format!("{}/live/{id}/end", w.console);
    let refused = bob.post(
        &action,
        &[
            ("csrf".into(), bobs_csrf),
            ("reason".into(), "not mine to end".into()),
        ],
    );
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.body);

    // The admin sees it, with its program, and ends it with a reason.
    let pat = visitor(&w);
    pat.sign_in(&w.provider, "pat");
    let live = pat.get("/live");
    assert_eq!(live.status, StatusCode::OK, "{}", live.body);
    assert!(live.body.contains("psql"), "{}", live.body);
    let form = html::forms(&live.body)
        .into_iter()
        .find(|f| f.action == format!("/live/{id}/end"))
        .unwrap_or_else(|| panic!("no end form for {id}: {}", live.body));
    let csrf = form.inputs.iter().find(|i| i.name == "csrf").unwrap();
    // Without a reason, nothing ends.
    let no_reason = pat.post(
        &action,
        &[
            ("csrf".into(), csrf.value.clone()),
            ("reason".into(), " ".into()),
        ],
    );
    assert_eq!(
        no_reason.status,
        StatusCode::BAD_REQUEST,
        "{}",
        no_reason.body
    );
    let ended = pat.post(
        &action,
        &[
            ("csrf".into(), csrf.value.clone()),
            ("reason".into(), "INC-77: runaway session".into()),
        ],
    );
    assert_eq!(ended.status, StatusCode::OK, "{}", ended.body);
    assert!(
        ended.body.contains(&format!("Connection {id}")),
        "{}",
        ended.body
    );

    let closed = wait_event(&w.agent, "connection.closed", |e| {
        e["connection_id"].as_u64() == Some(id)
    });
    let reason = closed["reason"].as_str().unwrap();
    assert!(
        reason.contains("ended by pat")
            && reason.contains("from the console: INC-77: runaway session"),
        "{closed}"
    );
    let act = wait_event(&w.agent, "console.session_ended", |e| {
        e["connection_id"].as_u64() == Some(id)
    });
    assert_eq!(act["identity"]["subject"], "pat", "{act}");
    assert_eq!(act["reason"], "INC-77: runaway session", "{act}");
    assert_eq!(act["target"], "db", "{act}");
    // Refused attempts ended nothing and recorded no act.
    assert_eq!(w.agent.events_of("console.session_ended").len(), 1);

    // The client's next statement finds its connection gone.
    stdin.write_all(b"SELECT 'after';\n").unwrap();
    drop(stdin);
    let out = psql.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("before"), "{stdout}");
    assert!(!stdout.contains("after"), "{stdout}");
}
