//! The fleet console (`portcullis console`, issue 20): a bastion ships its audit trail and
//! its approval requests to the central PostgreSQL store, and the console, on a host of its
//! own (no agent, no redirect), shows every bastion's sessions, timelines, searches and
//! health from that store, and decides the bastion's approvals through the fleet's log.
//!
//! Slot 63 is the bastion's; the console listens on slot 64's server port.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failure is a test failure"
)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_e2e::console::{Http, CONSOLE_CLIENT, STATEMENT_POLICIES};
use portcullis_e2e::oidc::{self, OidcOptions, OidcProvider, OidcUser};
use portcullis_e2e::postgres::{self as pg, PgOptions, Postgres};
use portcullis_e2e::{agent_bin, e2e_enabled, Agent, Slot, TestCgroup};
use reqwest::StatusCode;
use serde_json::{json, Value};

const FLEET_DB: &str = "portcullis";

fn enabled() -> bool {
    e2e_enabled() && oidc::oidc_enabled()
}

fn private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

/// `portcullis console` as a process of its own, killed when dropped.
struct FleetConsole {
    child: Child,
    dir: tempfile::TempDir,
    url: String,
}

impl FleetConsole {
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("console.log")).unwrap_or_default()
    }

    fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("state/ca/ca.pem")
    }
}

impl Drop for FleetConsole {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The console's configuration: its own state, the provider, `[console]` on `port`, and
/// the central store as `role`.
fn console_config(dir: &Path, issuer: &str, port: u16, central: &Postgres, role: &str) -> String {
    let secret = dir.join("central-pw");
    private(&secret, &format!("{role}-secret"));
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    std::fs::write(dir.join("policies/e2e.cedar"), STATEMENT_POLICIES).unwrap();
    format!(
        "state_dir = \"{state}\"\n[policy]\ndir = \"{policies}\"\n\
         [identity]\nissuer = \"{issuer}\"\nleeway_secs = 5\n[insecure]\nallow_plaintext_loopback = true\n\
         [console]\nlisten = \"127.0.0.1:{port}\"\nclient_id = \"{CONSOLE_CLIENT}\"\n\
         auditor_groups = [\"audit\"]\napprover_groups = [\"dba-leads\"]\nadmin_groups = [\"platform\"]\n\
         [audit.central]\nurl = \"postgres://{role}@127.0.0.1:{central}/{FLEET_DB}\"\n\
         password_file = \"{secret}\"\ntls = \"disable\"\nhost_name = \"fleet-console\"\n",
        state = dir.join("state").display(),
        policies = dir.join("policies").display(),
        central = central.port(),
        secret = secret.display(),
    )
}

fn spawn_console(dir: tempfile::TempDir, config: &str, port: u16) -> FleetConsole {
    let path = dir.path().join("console.toml");
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.path().join("console.log")).unwrap();
    let child = Command::new(agent_bin())
        .args(["console", "--config"])
        .arg(&path)
        .env("PORTCULLIS_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    FleetConsole {
        child,
        dir,
        url: format!("https://127.0.0.1:{port}"),
    }
}

/// Waits until the console accepts connections; panics with its log if it exits.
fn wait_listening(console: &mut FleetConsole, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(status) = console.child.try_wait().unwrap() {
            panic!("the fleet console exited with {status}:\n{}", console.log());
        }
        assert!(
            Instant::now() < deadline,
            "not listening:\n{}",
            console.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// GETs `path` until its body holds `needle` (the bastions ship every second).
fn wait_page(http: &Http, path: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let page = http.get(path);
        if page.status == StatusCode::OK && page.body.contains(needle) {
            return page.body;
        }
        assert!(
            Instant::now() < deadline,
            "{path}: no {needle:?} in {} {}",
            page.status,
            page.body
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn the_fleet_console_shows_a_bastions_sessions_from_the_central_store_and_decides_its_approvals() {
    if !enabled() || !portcullis_e2e::prerequisites_met(pg::missing_prerequisite()) {
        return;
    }
    let console_port = Slot::new(64).server_port;
    let url = format!("https://127.0.0.1:{console_port}");
    let provider = OidcProvider::start(OidcOptions {
        users: vec![
            OidcUser::new("alice", &["engineering", "dba-leads"]),
            OidcUser::new("bob", &["dba-leads"]),
            OidcUser::new("carol", &["audit"]),
            OidcUser::new("pat", &["platform"]),
        ],
        extra_clients: vec![json!({
            "client_id": CONSOLE_CLIENT,
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
            "redirect_uris": [format!("{url}/auth/callback")],
        })],
        ..OidcOptions::default()
    });
    let files = tempfile::tempdir().unwrap();
    let (postgres, creds) = pg::app_server(files.path());
    let central = Postgres::start_with(PgOptions::default());
    central.create_database(FLEET_DB, None);
    central.psql(
        FLEET_DB,
        "CREATE ROLE portcullis_writer NOLOGIN; CREATE ROLE portcullis_reader NOLOGIN; \
         CREATE ROLE bastion_a LOGIN PASSWORD 'bastion_a-secret' IN ROLE portcullis_writer; \
         CREATE ROLE writer_only LOGIN PASSWORD 'writer_only-secret' IN ROLE portcullis_writer; \
         CREATE ROLE fleet LOGIN PASSWORD 'fleet-secret' IN ROLE portcullis_writer, portcullis_reader",
    );

    // The bastion: its trail and its approvals go to the central store (it migrates it).
    let secret = files.path().join("bastion-pw");
    private(&secret, "bastion_a-secret");
    let admin = files.path().join("admin-pw");
    private(&admin, pg::SUPERUSER_PASSWORD);
    let cg = TestCgroup::new("fleet-console-a");
    let config = format!(
        "[identity]\nissuer = \"{iss}\"\nleeway_secs = 5\n[insecure]\nallow_plaintext_loopback = true\n\
         [audit.central]\nurl = \"postgres://bastion_a@127.0.0.1:{central}/{FLEET_DB}\"\n\
         password_file = \"{secret}\"\ntls = \"disable\"\nhost_name = \"bastion-a\"\n\
         migrate_url = \"postgres://postgres@127.0.0.1:{central}/{FLEET_DB}\"\n\
         migrate_password_file = \"{admin}\"\n\
         [[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1\"\nport = {port}\n\
         [target.postgres]\nca_file = \"{ca}\"\ncredentials_file = \"{creds}\"\n",
        iss = provider.issuer(),
        port = postgres.port(),
        central = central.port(),
        secret = secret.display(),
        admin = admin.display(),
        ca = postgres.ca_pem_path().display(),
        creds = creds.display(),
    );
    let mut bastion = Agent::prepare(
        "fleet-console-a",
        Slot::new(63),
        &cg,
        &[],
        Some(&config),
        &[],
    );
    std::fs::write(
        bastion.dir.path().join("policies").join("e2e.cedar"),
        STATEMENT_POLICIES,
    )
    .unwrap();
    bastion.spawn();
    // The bastion has migrated the store before it reads the fleet's approval log.
    let deadline = Instant::now() + Duration::from_secs(60);
    let migrated = || {
        central
            .psql(
                FLEET_DB,
                "SELECT to_regclass('portcullis_schema_version') IS NOT NULL",
            )
            .contains('t')
            && central
                .psql(
                    FLEET_DB,
                    "SELECT max(version) FROM portcullis_schema_version",
                )
                .contains('3')
    };
    while !migrated() {
        assert!(Instant::now() < deadline, "{}", bastion.log());
        std::thread::sleep(Duration::from_millis(200));
    }

    // A role that may only write is refused at start, naming what it lacks.
    let dir = tempfile::tempdir().unwrap();
    let text = console_config(
        dir.path(),
        provider.issuer(),
        console_port,
        &central,
        "writer_only",
    );
    let mut refused = spawn_console(dir, &text, console_port);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = refused.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "{}", refused.log());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    assert!(
        refused.log().contains("grant it portcullis_reader"),
        "{}",
        refused.log()
    );
    drop(refused);

    let dir = tempfile::tempdir().unwrap();
    let text = console_config(
        dir.path(),
        provider.issuer(),
        console_port,
        &central,
        "fleet",
    );
    let mut console = spawn_console(dir, &text, console_port);
    wait_listening(&mut console, console_port);
    assert_eq!(console.url, url);

    // On the bastion, alice reads, then her DDL waits for an approver.
    let alice = 48631;
    provider.login(&bastion, alice, "alice");
    let psql = pg::psql_app_script(
        &postgres,
        &cg.path,
        alice,
        "SELECT 'listed-on-a';\n\
         CREATE TABLE fleet_console_t (id int);\n\
         SELECT 'created', count(*) FROM pg_tables WHERE tablename = 'fleet_console_t';\n",
    );

    // carol audits: the session, its timeline and a search, all from the central store.
    let carol = Http::new(&console.url, &console.ca());
    carol.sign_in(&provider, "carol");
    let list = wait_page(&carol, "/sessions?user=alice", "host=bastion-a");
    let link = list
        .split("href=\"")
        .filter_map(|s| s.split('"').next())
        .find(|h| h.starts_with("/sessions/") && h.contains("host=bastion-a"))
        .unwrap()
        .replace("&amp;", "&");
    let timeline = wait_page(&carol, &link, "listed-on-a");
    assert!(timeline.contains("statement.executed"), "{timeline}");
    // The `event` column is only how SQL finds rows: a row whose column was made to say
    // something else is still shown as its hashed text says (fails when pages read the
    // column).
    central.psql(
        FLEET_DB,
        "UPDATE portcullis_audit_events SET event = jsonb_set(event, '{statement}', '\"SELECT forged\"') \
         WHERE host = 'bastion-a' AND event->>'statement' LIKE '%listed-on-a%'",
    );
    let timeline = carol.get(&link).body;
    assert!(
        timeline.contains("listed-on-a") && !timeline.contains("forged"),
        "{timeline}"
    );
    // A fleet's session is named by its host too.
    let bare = link.split('?').next().unwrap();
    let page = carol.get(bare);
    assert_eq!(page.status, StatusCode::BAD_REQUEST, "{}", page.body);
    // Its host filter keeps that host's sessions only.
    let page = carol.get("/sessions?host=bastion-z");
    assert_eq!(page.status, StatusCode::OK);
    assert!(
        page.body.contains("0 sessions of the fleet"),
        "{}",
        page.body
    );
    // Replays stay on the bastion, and the page says so.
    let page = carol.get(&link.replacen('?', "/replay?", 1));
    assert_eq!(page.status, StatusCode::NOT_FOUND, "{}", page.body);
    assert!(
        page.body.contains("Recordings stay on the bastion"),
        "{}",
        page.body
    );
    // The export is the full events, each named by its bastion and its seq there.
    let export = carol.get("/audit.ndjson?kind=statement&host=bastion-a");
    assert_eq!(export.status, StatusCode::OK, "{}", export.body);
    let lines: Vec<Value> = export
        .body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(
        lines
            .iter()
            .any(|l| l["event"]["event"] == "statement.executed"
                && l["event"]["statement"]
                    .as_str()
                    .is_some_and(|s| s.contains("listed-on-a"))
                && l["seq"].as_u64().is_some()),
        "{}",
        export.body
    );
    assert!(
        lines.iter().all(|l| l["host"] == "bastion-a"),
        "{}",
        export.body
    );
    let page = carol.get("/audit?kind=statement.executed&host=bastion-a");
    assert!(page.body.contains("bastion-a #"), "{}", page.body);
    // An auditor decides nothing.
    assert_eq!(carol.get("/approvals").status, StatusCode::FORBIDDEN);

    // The request made on the bastion waits on the console's approvals page.
    let bob = Http::new(&console.url, &console.ca());
    bob.sign_in(&provider, "bob");
    let request = bob.next_pending(&[]);
    // alice may approve others' requests, never her own: the store's rule, here too.
    let alice_http = Http::new(&console.url, &console.ca());
    alice_http.sign_in(&provider, "alice");
    // Her page offers her no form for it; her own token on a form she builds is refused.
    assert!(alice_http.decision_form(&request).is_none());
    let page = alice_http.decide_unoffered(&request, "approve", "mine");
    assert_eq!(page.status, StatusCode::FORBIDDEN, "{}", page.body);
    assert!(page.body.contains("yourself"), "{}", page.body);
    let page = bob.decide(&request, "approve", "reviewed in the fleet console");
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    let out = psql.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("created|1"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The console's own trail (its verdict) is shipped under its own host name, and the
    // verdict row in the fleet's log names the console's role.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let hosts = central.psql(
            FLEET_DB,
            "SELECT host FROM portcullis_audit_events WHERE event->>'event' = 'approval.approved'",
        );
        if hosts.contains("fleet-console") {
            break;
        }
        assert!(Instant::now() < deadline, "{hosts}\n{}", console.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    let writers = central.psql(
        FLEET_DB,
        "SELECT host || ' ' || written_by FROM portcullis_approval_log WHERE change->>'change' = 'verdict'",
    );
    assert!(writers.contains("fleet-console fleet"), "{writers}");

    // pat sees every host with its last event.
    let pat = Http::new(&console.url, &console.ca());
    pat.sign_in(&provider, "pat");
    let health = wait_page(&pat, "/health", "fleet-console");
    assert!(health.contains("bastion-a"), "{health}");
    // The access review of the fleet: every bastion's chain verified, each figure's
    // evidence named by bastion and seq, from the CLI and from the console alike.
    let today = chrono_day();
    let cli = Command::new(agent_bin())
        .args([
            "review",
            "report",
            "--central",
            "--from",
            &today,
            "--to",
            &today,
        ])
        .arg("--config")
        .arg(console.dir.path().join("console.toml"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&cli.stdout);
    assert!(
        cli.status.success(),
        "{report}\n{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    assert!(
        report.contains("of 2 bastions: bastion-a seq 1.."),
        "{report}"
    );
    assert!(report.contains("bastion-a#"), "{report}");
    assert!(report.contains("user:alice@example.test"), "{report}");
    assert!(!report.contains("forged"), "{report}");
    let download = carol.get(&format!("/review/report?from={today}&to={today}&format=md"));
    assert_eq!(download.status, StatusCode::OK, "{}", download.body);
    assert_eq!(
        download.headers["x-portcullis-verified"], "yes",
        "{}",
        download.body
    );
    assert!(download.body.contains("bastion-a#"), "{}", download.body);
    let live = pat.get("/live");
    assert!(
        live.body.contains("This is the fleet console"),
        "{}",
        live.body
    );
}

/// Today (UTC) as `YYYY-MM-DD`, the period of the review.
fn chrono_day() -> String {
    let out = Command::new("date")
        .args(["-u", "+%Y-%m-%d"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}
