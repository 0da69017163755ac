//! The web console in a real browser: Debian's headless Chromium (`portcullis_e2e::browser`)
//! trusting the agent's CA, signing in at the real OpenID Provider's own login form with the
//! authorization code flow and PKCE, reading the sessions list and a psql session's
//! timeline, and deciding a statement a psql client waits on through the real kernel
//! redirect. The pages are also checked for the basics of accessibility (language, title,
//! labels, keyboard order, contrast) and for any console error, CSP violations included.
//! Screenshots are kept in `target/test-artifacts/console/`. Slots 16 and 17.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failure is a test failure"
)]

use std::process::Child;
use std::time::{Duration, Instant};

use portcullis_e2e::browser::{self, Browser, ConsoleError, Page};
use portcullis_e2e::console::{self as console_world, World};
use portcullis_e2e::oidc::{self, OidcUser};
use portcullis_e2e::postgres::{self as pg};
use portcullis_e2e::{e2e_enabled, Agent};
use serde_json::{json, Value};

/// Root, eBPF, node, PostgreSQL, Chromium and certutil, or false when the test may skip
/// (never under `cargo xtask test` or CI, where a missing one fails the test).
fn enabled() -> bool {
    e2e_enabled()
        && oidc::oidc_enabled()
        && portcullis_e2e::prerequisites_met(pg::missing_prerequisite())
        && portcullis_e2e::prerequisites_met(browser::missing_prerequisite())
}

/// The people at the provider (roles: `audit` audits, `dba-leads` approves, `platform`
/// administers).
fn people() -> Vec<OidcUser> {
    vec![
        OidcUser::new("alice", &["engineering", "dba-leads"]),
        OidcUser::new("bob", &["dba-leads", "audit"]),
        OidcUser::new("carol", &["audit"]),
        OidcUser::new("dave", &["platform"]),
    ]
}

fn world(name: &str, slot: u8) -> World {
    console_world::world(name, slot, people())
}

fn psql_script(w: &World, uid: u32, script: &str) -> Child {
    w.psql_script(uid, script)
}

/// `portcullis login` as `uid`, the device flow finished as `user`.
fn login(w: &World, uid: u32, user: &str) {
    w.provider.login(&w.agent, uid, user);
}

fn wait_event(agent: &Agent, kind: &str, pick: impl Fn(&Value) -> bool) -> Value {
    agent.wait_event(kind, pick)
}

fn shot(page: &Page<'_>, name: &str) {
    let path = browser::artifacts_dir("console").unwrap().join(name);
    page.screenshot(&path).unwrap();
}

fn js_str(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

/// Waits until the page is at `path` of the console and has finished loading.
fn wait_at(page: &Page<'_>, w: &World, path: &str) {
    page.wait_for(
        &format!(
            "location.origin === {} && location.pathname === {} && document.readyState === 'complete'",
            js_str(&w.console),
            js_str(path)
        ),
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", page.text().unwrap_or_default()));
}

/// A browser of its own (its own cookies) signed in as `user`: from the console's sign-in
/// link to the provider's login form, typed into and submitted, its consent form if it asks,
/// and back at the console's home page. The provider's pages are not ours: only what the
/// console's own pages reported during the sign-in is held to "no errors".
fn signed_in(w: &World, user: &str) -> Browser {
    let browser = Browser::launch_trusting(&w.ca()).unwrap();
    {
        let page = browser.page().unwrap();
        page.goto(&format!("{}/signin", w.console)).unwrap();
        page.wait_for(
            "document.querySelector('input[name=login]')",
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", w.provider.log()));
        assert!(
            page.url().unwrap().starts_with(w.provider.issuer()),
            "the login form is not the provider's: {}",
            page.url().unwrap()
        );
        page.fill("input[name=login]", user).unwrap();
        page.fill("input[name=password]", "any password").unwrap();
        page.click("button[type=submit]").unwrap();
        // The provider asks for consent once per client; after it, the callback's page moves
        // the browser on to the console's home.
        let home = format!(
            "location.origin === {} && location.pathname === '/'",
            js_str(&w.console)
        );
        page.wait_for(
            &format!("({home}) || document.querySelector('input[name=prompt][value=consent]')"),
            Duration::from_secs(20),
        )
        .unwrap_or_else(|e| panic!("{e:#}\n{}", w.provider.log()));
        if page.eval(&home).unwrap() != Value::Bool(true) {
            page.click("button[type=submit]").unwrap();
        }
        wait_at(&page, w, "/");
        let text = page.text().unwrap();
        assert!(
            text.contains(&format!("Signed in as {user}@example.test")),
            "{text}"
        );
        let session = page
            .cookies()
            .unwrap()
            .into_iter()
            .find(|c| c.name == "__Host-portcullis-console")
            .expect("no session cookie");
        assert!(session.secure && session.http_only, "{session:?}");
        assert_eq!(session.same_site.as_deref(), Some("Strict"), "{session:?}");
        let ours: Vec<ConsoleError> = page
            .console_errors()
            .unwrap()
            .into_iter()
            .filter(|e| e.url.starts_with(&w.console))
            .collect();
        assert!(ours.is_empty(), "the console's sign-in pages: {ours:?}");
    }
    browser
}

/// Opens `path` of the console in a new tab of `browser`.
fn open<'b>(browser: &'b Browser, w: &World, path: &str) -> Page<'b> {
    let page = browser.page().unwrap();
    page.goto(&format!("{}{path}", w.console)).unwrap();
    page
}

/// What the keyboard reaches: each element Tab focuses from the top of a freshly loaded
/// page, described by its label or text.
fn tab_stops(page: &Page<'_>, presses: usize) -> Vec<String> {
    let mut stops = Vec::new();
    for _ in 0..presses {
        page.press_key("Tab").unwrap();
        let stop = page
            .eval(
                "(() => { const e = document.activeElement; if (!e || e === document.body) return ''; \
                 const label = e.labels && e.labels.length ? e.labels[0].innerText : ''; \
                 return e.tagName.toLowerCase() + ':' + (label || e.innerText || e.value || '').trim(); })()",
            )
            .unwrap();
        stops.push(stop.as_str().unwrap_or_default().to_string());
    }
    stops
}

/// Asserts that `expected` appear in `stops` in that order (other stops may come between).
fn assert_in_order(stops: &[String], expected: &[&str], what: &str) {
    let mut at = 0;
    for want in expected {
        match stops[at..].iter().position(|s| s == want) {
            Some(i) => at += i + 1,
            None => panic!("{what}: Tab does not reach {want:?} after {expected:?}'s earlier ones; it went {stops:?}"),
        }
    }
}

/// The basics every console page must have: a language, a title, a label for every field,
/// text that contrasts with its background (WCAG AA, 4.5:1), and no error reported by the
/// browser, CSP violations included. `allowed` names errors the page is expected to cause
/// (the network error of a 403 answer).
fn assert_accessible(page: &Page<'_>, what: &str, allowed: &[&str]) {
    let facts = page
        .eval(
            r#"(() => {
  const lum = c => { const v = c.match(/[\d.]+/g).slice(0, 3).map(Number).map(x => { x /= 255;
      return x <= 0.03928 ? x / 12.92 : Math.pow((x + 0.055) / 1.055, 2.4); });
      return 0.2126 * v[0] + 0.7152 * v[1] + 0.0722 * v[2]; };
  const background = e => { for (let n = e; n; n = n.parentElement) {
      const c = getComputedStyle(n).backgroundColor; const m = c.match(/[\d.]+/g);
      if (m && (m.length < 4 || Number(m[3]) > 0)) return c; } return 'rgb(255, 255, 255)'; };
  const lowContrast = [];
  for (const e of document.body.querySelectorAll('*')) {
    if (![...e.childNodes].some(n => n.nodeType === 3 && n.textContent.trim())) continue;
    const a = lum(getComputedStyle(e).color), b = lum(background(e));
    const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
    if (ratio < 4.5) lowContrast.push(e.tagName + ' ' + ratio.toFixed(2) + ': ' + e.textContent.trim().slice(0, 40));
  }
  const unlabelled = [...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
    .filter(e => e.labels.length === 0 && !e.getAttribute('aria-label') && !e.getAttribute('aria-labelledby'))
    .map(e => e.outerHTML);
  const landmarks = { banner: document.querySelectorAll('body > header').length,
      main: document.querySelectorAll('main').length,
      navigation: [...document.querySelectorAll('header nav')].map(n => n.getAttribute('aria-label')) };
  return { lang: document.documentElement.lang, title: document.title,
           h1: document.querySelectorAll('h1').length, unlabelled, lowContrast, landmarks };
})()"#,
        )
        .unwrap();
    assert_eq!(facts["lang"], "en", "{what}: {facts}");
    assert!(
        facts["title"]
            .as_str()
            .is_some_and(|t| t.ends_with("· Portcullis") && t.len() > "· Portcullis".len()),
        "{what}: {facts}"
    );
    assert_eq!(facts["h1"], 1, "{what}: {facts}");
    // Landmarks: one banner, one main, and the console's navigation named as such.
    assert_eq!(
        facts["landmarks"],
        json!({"banner": 1, "main": 1, "navigation": ["Console"]}),
        "{what}: landmarks"
    );
    assert_eq!(
        facts["unlabelled"],
        json!([]),
        "{what}: fields without a label"
    );
    assert_eq!(facts["lowContrast"], json!([]), "{what}: text below 4.5:1");
    let errors: Vec<String> = page
        .console_errors()
        .unwrap()
        .iter()
        .filter(|e| !allowed.iter().any(|a| e.text.contains(a)))
        .map(ToString::to_string)
        .collect();
    assert!(errors.is_empty(), "{what}: the browser reported {errors:?}");
}

/// Reloads the approvals page until a request not in `seen` is on it; its id.
fn next_pending(page: &Page<'_>, w: &World, seen: &[String]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        page.goto(&format!("{}/approvals", w.console)).unwrap();
        let ids = page
            .eval(
                "[...document.querySelectorAll('form[action^=\"/approvals/\"]')]\
                 .map(f => f.getAttribute('action').slice('/approvals/'.length))",
            )
            .unwrap();
        let found = ids
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .find(|id| !seen.iter().any(|s| s == id))
            .map(str::to_string);
        if let Some(id) = found {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "no pending request: {}",
            page.text().unwrap()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Decides `request` on the approvals page as a person does: the reason typed into its
/// field, then the button clicked; the form carries the CSRF token the page holds.
fn decide_in_page(page: &Page<'_>, w: &World, request: &str, decision: &str, reason: &str) {
    page.fill(&format!("#reason-{request}"), reason).unwrap();
    page.click(&format!(
        "form[action=\"/approvals/{request}\"] button[value={decision}]"
    ))
    .unwrap();
    wait_at(page, w, &format!("/approvals/{request}"));
}

/// A form the page did not offer, built and submitted from the page's own context (so the
/// browser sends the page's cookies and Origin): what a script injected into the console,
/// or a person pasting into the devtools, could send. Returns the answer's text.
fn forge(page: &Page<'_>, w: &World, action: &str, fields: &[(&str, &str)]) -> String {
    let fields: serde_json::Map<String, Value> = fields
        .iter()
        .map(|(k, v)| ((*k).into(), json!(v)))
        .collect();
    page.eval(&format!(
        "(() => {{ const f = document.createElement('form'); f.method = 'post'; f.action = {action}; \
         for (const [k, v] of Object.entries({fields})) {{ const i = document.createElement('input'); \
         i.type = 'hidden'; i.name = k; i.value = v; f.appendChild(i); }} \
         document.body.appendChild(f); f.submit(); return true; }})()",
        action = js_str(action),
        fields = Value::Object(fields),
    ))
    .unwrap();
    wait_at(page, w, action);
    page.text().unwrap()
}

#[test]
fn an_approver_signs_in_reads_a_psql_timeline_and_approves_a_waiting_statement_in_the_browser() {
    if !enabled() {
        return;
    }
    let w = world("console-browser-approve", 16);
    let alice = 48016;
    login(&w, alice, "alice");
    // A session for the list and the timeline: one statement allowed, one denied.
    let o = psql_script(
        &w,
        alice,
        "SELECT 'listed';\nINSERT INTO nowhere VALUES (1);\n",
    )
    .wait_with_output()
    .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(stdout.contains("listed"), "{stdout}\n{stderr}");
    assert!(stderr.contains("ERROR:  42501"), "{stderr}");
    let opened = wait_event(&w.agent, "connection.opened", |e| {
        e["identity"]["subject"] == "alice"
    });
    let id = opened["connection_id"].as_u64().unwrap();
    wait_event(&w.agent, "connection.closed", |e| e["connection_id"] == id);

    let bob = signed_in(&w, "bob");
    let home = open(&bob, &w, "/");
    assert_accessible(&home, "home", &[]);
    drop(home);

    let sessions = open(&bob, &w, "/sessions");
    assert_accessible(&sessions, "sessions", &[]);
    let link = format!("a[href^=\"/sessions/{id}?\"]");
    assert_eq!(
        sessions
            .eval(&format!("!!document.querySelector({})", js_str(&link)))
            .unwrap(),
        Value::Bool(true),
        "session {id} is not listed: {}",
        sessions.text().unwrap()
    );
    shot(&sessions, "browser-sessions.png");
    // The keyboard reaches the navigation, the filters in reading order, then the sessions.
    let stops = tab_stops(&sessions, 16);
    assert_in_order(
        &stops,
        &[
            "a:Sessions",
            "a:Approvals",
            "button:Sign out",
            "input:User",
            "input:Target",
            "select:Protocol",
            "input:Since",
            "input:Until",
            "select:Decision",
            "button:Filter",
            &format!("a:{id}"),
        ],
        "sessions",
    );

    // The timeline, opened by clicking the session's link.
    sessions.click(&link).unwrap();
    wait_at(&sessions, &w, &format!("/sessions/{id}"));
    let timeline = sessions.text().unwrap();
    for needle in [
        "connection.opened".to_string(),
        "sql: SELECT 'listed'".into(),
        "statement.denied".into(),
        "sql: INSERT INTO nowhere VALUES (1)".into(),
        "connection.closed".into(),
    ] {
        assert!(timeline.contains(&needle), "{needle}: {timeline}");
    }
    let decided = |kind: &str, decision: &str| {
        timeline
            .lines()
            .any(|l| l.contains(kind) && l.split_whitespace().any(|word| word == decision))
    };
    assert!(decided("statement.executed", "allow"), "{timeline}");
    assert!(decided("statement.denied", "deny"), "{timeline}");
    assert_accessible(&sessions, "timeline", &[]);
    shot(&sessions, "browser-timeline.png");
    drop(sessions);

    // psql waits on DDL; bob approves it in the page.
    let psql = psql_script(
        &w,
        alice,
        "CREATE TABLE browser_t (id int);\n\
         SELECT 'created', count(*) FROM pg_tables WHERE tablename = 'browser_t';\n",
    );
    let approvals = bob.page().unwrap();
    let request = next_pending(&approvals, &w, &[]);
    let text = approvals.text().unwrap();
    assert!(text.contains("CREATE TABLE browser_t (id int)"), "{text}");
    assert!(text.contains("alice@example.test asks for"), "{text}");
    assert!(
        !w.postgres
            .psql("app", "SELECT tablename FROM pg_tables")
            .contains("browser_t"),
        "the waiting statement ran"
    );
    assert_accessible(&approvals, "approvals", &[]);
    shot(&approvals, "browser-approvals-pending.png");
    // A fresh load, so Tab starts from the top: the reason, then Approve, then Deny.
    approvals.goto(&format!("{}/approvals", w.console)).unwrap();
    let stops = tab_stops(&approvals, 10);
    assert_in_order(
        &stops,
        &[
            "a:Approvals",
            "button:Sign out",
            "input:Your reason",
            "button:Approve",
            "button:Deny",
        ],
        "approvals",
    );
    decide_in_page(&approvals, &w, &request, "approve", "looks right");
    let text = approvals.text().unwrap();
    assert!(
        text.contains(&format!("Request {request} is now approved.")),
        "{text}"
    );
    assert!(
        text.contains("No pending requests that you may see."),
        "{text}"
    );
    assert_accessible(&approvals, "approvals after approving", &[]);
    shot(&approvals, "browser-approvals-approved.png");

    let out = psql.wait_with_output().unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(stdout.contains("created|1"), "{stdout}\n{stderr}");
    let approved = wait_event(&w.agent, "approval.approved", |e| {
        e["request_id"] == request.as_str()
    });
    assert_eq!(approved["identity"]["subject"], "bob", "{approved}");

    // The other pages meet the same basics: bob's as an auditor and approver, dave's as an
    // admin.
    for path in ["/audit", "/grants", "/review", "/explain"] {
        let page = open(&bob, &w, path);
        assert_accessible(&page, path, &[]);
        shot(&page, &format!("{}.png", path.trim_start_matches('/')));
    }
    let dave = signed_in(&w, "dave");
    for path in ["/live", "/health"] {
        let page = open(&dave, &w, path);
        assert_accessible(&page, path, &[]);
        shot(&page, &format!("{}.png", path.trim_start_matches('/')));
    }
}

#[test]
fn the_requester_cannot_approve_herself_and_a_reader_or_a_forged_form_decides_nothing() {
    if !enabled() {
        return;
    }
    let w = world("console-browser-refuse", 17);
    let alice = 48017;
    login(&w, alice, "alice");
    let psql = psql_script(
        &w,
        alice,
        "CREATE TABLE refused_t (id int);\nSELECT 'after', 1;\n",
    );

    // alice is an approver, but this request is hers: her page offers her no decision on
    // it, and a form she builds in it with her own token is refused by the server, saying
    // why.
    let request = {
        let bob = signed_in(&w, "bob");
        let page = bob.page().unwrap();
        next_pending(&page, &w, &[])
    };
    let alice_browser = signed_in(&w, "alice");
    let page = open(&alice_browser, &w, "/approvals");
    let text = page.text().unwrap();
    assert!(
        text.contains("This is your own request: another approver decides it."),
        "{text}"
    );
    let own_csrf = page
        .eval("document.querySelector('form[action=\"/signout\"] input[name=csrf]').value")
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    let text = forge(
        &page,
        &w,
        &format!("/approvals/{request}"),
        &[
            ("csrf", &own_csrf),
            ("decision", "approve"),
            ("reason", "it is mine"),
        ],
    );
    assert!(
        text.contains("you asked for this yourself; someone else must approve it"),
        "{text}"
    );
    // Said as an alert, so a screen reader announces it.
    let alert = page
        .eval("document.querySelector('[role=alert]').innerText")
        .unwrap();
    assert!(alert.as_str().unwrap().contains("yourself"), "{alert}");
    assert_accessible(&page, "self-approval refused", &["status of 403"]);
    shot(&page, "browser-self-approval-refused.png");
    drop(page);
    wait_event(&w.agent, "console.denied", |e| {
        e["identity"]["subject"] == "alice"
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("you asked for this yourself"))
    });

    // carol reads: no approvals in her navigation, none of their pages, no decision button
    // anywhere she goes.
    let carol = signed_in(&w, "carol");
    let page = open(&carol, &w, "/sessions");
    assert_accessible(&page, "sessions as an auditor", &[]);
    assert_eq!(
        page.eval(
            "!!document.querySelector('a[href=\"/approvals\"], button[value=approve], button[value=deny]')"
        )
        .unwrap(),
        Value::Bool(false)
    );
    page.goto(&format!("{}/approvals", w.console)).unwrap();
    let text = page.text().unwrap();
    assert!(
        text.contains("Your roles (auditor) do not allow seeing approvals."),
        "{text}"
    );
    assert!(!text.contains("CREATE TABLE refused_t"), "{text}");
    assert_eq!(
        page.eval("!!document.querySelector('button[value=approve]')")
            .unwrap(),
        Value::Bool(false)
    );

    // A script in the page cannot even send one: the CSP (no connect-src, so `'none'`)
    // stops a fetch in the browser, and the console hears nothing of it.
    let denied_before = w.agent.events_of("console.denied").len();
    let scripted = open(&carol, &w, "/sessions");
    let fetched = scripted
        .eval(&format!(
            "fetch('/approvals/{request}', {{method: 'POST', body: new URLSearchParams(\
             {{decision: 'approve', reason: 'scripted'}})}}).then(r => 'sent: ' + r.status, e => 'refused: ' + e)"
        ))
        .unwrap();
    assert_eq!(fetched, "refused: TypeError: Failed to fetch");
    scripted
        .wait_for_console_error(
            "violates the following Content Security Policy directive",
            Duration::from_secs(5),
        )
        .unwrap();
    drop(scripted);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        w.agent.events_of("console.denied").len(),
        denied_before,
        "the fetch reached the console"
    );

    // Forms the page never offered, sent from its context with carol's cookies: without a
    // CSRF token, with a wrong one, and with her own (then her role refuses it).
    page.goto(&format!("{}/sessions", w.console)).unwrap();
    let action = format!("/approvals/{request}");
    let csrf = page
        .eval("document.querySelector('form[action=\"/signout\"] input[name=csrf]').value")
        .unwrap()
        .as_str()
        .unwrap()
        .to_string();
    assert!(csrf.len() >= 32, "{csrf}");
    let wrong = "0".repeat(csrf.len());
    for (fields, refusal) in [
        (
            vec![("decision", "approve"), ("reason", "forged")],
            "This form does not carry your session's token",
        ),
        (
            vec![
                ("csrf", wrong.as_str()),
                ("decision", "approve"),
                ("reason", "forged"),
            ],
            "This form does not carry your session's token",
        ),
        (
            vec![
                ("csrf", csrf.as_str()),
                ("decision", "approve"),
                ("reason", "forged"),
            ],
            "Your roles (auditor) do not allow deciding approvals.",
        ),
    ] {
        let text = forge(&page, &w, &action, &fields);
        assert!(text.contains(refusal), "{fields:?}: {text}");
        page.goto(&format!("{}/sessions", w.console)).unwrap();
    }
    assert_accessible(&page, "forged forms", &["status of 403"]);

    // The same for an approver: a forged form with a wrong token decides nothing either.
    let bob = signed_in(&w, "bob");
    let page = open(&bob, &w, "/approvals");
    let text = forge(
        &page,
        &w,
        &action,
        &[
            ("csrf", &wrong),
            ("decision", "approve"),
            ("reason", "forged"),
        ],
    );
    assert!(
        text.contains("This form does not carry your session's token"),
        "{text}"
    );
    assert!(
        !w.postgres
            .psql("app", "SELECT tablename FROM pg_tables")
            .contains("refused_t"),
        "the waiting statement ran"
    );
    assert!(w.agent.events_of("approval.approved").is_empty());
    let denials: Vec<Value> = w
        .agent
        .events_of("console.denied")
        .into_iter()
        .filter(|e| e["reason"].as_str().is_some_and(|r| r.contains("CSRF")))
        .collect();
    assert_eq!(denials.len(), 3, "{denials:?}");

    // Still pending: bob's real form denies it, and psql hears so.
    let again = next_pending(&page, &w, &[]);
    assert_eq!(again, request);
    decide_in_page(&page, &w, &request, "deny", "not today");
    assert!(
        page.text()
            .unwrap()
            .contains(&format!("Request {request} is now denied.")),
        "{}",
        page.text().unwrap()
    );
    let out = psql.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ERROR:  42501"), "{stderr}");
    assert!(stderr.contains("not today"), "{stderr}");
}
