//! The HTML access review as a browser renders it: the real `portcullis review report
//! --format html` over the quarter the unit tests use (agent/src/review/fixture.rs, written
//! by the real store writer), with hostile text in an identity and a statement, loaded by
//! Debian's headless Chromium from a file. Its DOM must hold every section, a known figure
//! and the hostile text as text only; its screenshot is kept in
//! `target/test-artifacts/review/`. No eBPF, no agent process; root, because the review
//! reads root's store. Chromium never reaches the network: background services are off,
//! every host name resolves to nothing, every request goes to a closed loopback port, and
//! the page's own Content-Security-Policy forbids fetches anyway.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test: a failure is a test failure"
)]

#[path = "../agent/src/review/fixture.rs"]
mod fixture;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use portcullis_audit_store::{Store, StoreOptions};
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";

const SECTIONS: [&str; 12] = [
    "seal",
    "identity",
    "unmasked_reads",
    "privileged_without_approval",
    "privileged_with_approval",
    "sessions",
    "production_reach",
    "unused_permits",
    "unused_access",
    "stale_services",
    "single_approver",
    "groups_unseen",
];

/// Root and Chromium, or false when the test may skip (never under `cargo xtask test`/CI).
fn prerequisites() -> bool {
    let problem = if !portcullis_e2e::is_root() {
        Some("`portcullis review report` runs as root only".to_string())
    } else if !Path::new(CHROMIUM).is_file() {
        Some(format!(
            "{CHROMIUM} is missing; `cargo xtask setup` installs Debian's chromium"
        ))
    } else if !portcullis_e2e::agent_bin().is_file() {
        Some(format!(
            "{} is missing; build it (cargo build -p portcullis-agent)",
            portcullis_e2e::agent_bin().display()
        ))
    } else {
        None
    };
    portcullis_e2e::prerequisites_met(problem)
}

/// `target/test-artifacts/review/`, next to cargo's own `target/tmp`.
fn artifacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .unwrap()
        .join("test-artifacts/review");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The quarter, then Mallory: markup, quotes and `&` in the identity a token gave, and in
/// a statement.
fn write_trail(dir: &Path) {
    let mut t = fixture::quarter();
    let mallory = json!({"kind": "user", "uid": 1666, "gid": 1666, "subject": "mallory",
        "email": "<script>document.title='pwned'</script>\"&'@evil.example",
        "groups": ["compliance"]});
    t.at(
        30,
        0,
        "connection.opened",
        json!({"connection_id": 666, "target": "prod-db", "identity": mallory,
        "decision": "allow", "policy_ids": ["compliance-connect"]}),
    );
    t.at(
        30,
        1,
        "statement.executed",
        json!({"connection_id": 666, "target": "prod-db", "identity": mallory,
        "decision": "allow", "policy_ids": ["compliance-read"],
        "statement": "SELECT '<img src=x onerror=alert(1)>' AS \"a&b\" FROM billing.customers",
        "statement_class": "read", "tables": ["billing.customers"]}),
    );
    let (mut store, _) = Store::open(
        dir,
        StoreOptions {
            max_segment_bytes: 4096,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    for e in &t.events {
        store.append(e.to_string().as_bytes()).unwrap();
    }
    store.sync().unwrap();
}

/// A bastion's config and policies: the fixture's policy set, two production targets.
fn write_config(dir: &Path) -> PathBuf {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("review.cedar"), fixture::POLICIES).unwrap();
    std::fs::write(policies.join("masking.toml"), fixture::MASKING).unwrap();
    std::fs::write(policies.join("approvals.toml"), fixture::APPROVALS).unwrap();
    let credentials = dir.join("credentials.toml");
    std::fs::write(&credentials, "[roles.app]\npassword = \"unused\"\n").unwrap();
    // The agent refuses a credentials file others can read.
    std::fs::set_permissions(
        &credentials,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let known_hosts = dir.join("known_hosts");
    std::fs::write(&known_hosts, "").unwrap();
    let config = dir.join("portcullis.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{state}\"\n[policy]\ndir = \"{policies}\"\n\
             [[target]]\nname = \"prod-db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1\"\nport = 5432\n\
             labels = {{ environment = \"production\" }}\n\
             [target.postgres]\ncredentials_file = \"{credentials}\"\n\
             [[target]]\nname = \"web-1\"\nprotocol = \"ssh\"\naddress = \"127.0.0.2\"\nport = 22\n\
             labels = {{ environment = \"production\" }}\n\
             [target.ssh]\nknown_hosts_file = \"{known_hosts}\"\n",
            state = dir.join("state").display(),
            policies = policies.display(),
            credentials = credentials.display(),
            known_hosts = known_hosts.display(),
        ),
    )
    .unwrap();
    config
}

fn review_html(config: &Path, store: &Path) -> Output {
    Command::new(portcullis_e2e::agent_bin())
        .args([
            "review",
            "report",
            "--from",
            "2026-10-01",
            "--to",
            "2026-12-31",
            "--format",
            "html",
        ])
        .arg("--config")
        .arg(config)
        .arg("--dir")
        .arg(store)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Headless Chromium on `page` with `mode` (`--dump-dom`, `--screenshot=…`), in a fresh
/// profile under `scratch`, kept off the network; killed if it takes over a minute.
fn chromium(scratch: &Path, page: &Path, mode: &[String]) -> Output {
    let profile = tempfile::tempdir_in(scratch).unwrap();
    let child = Command::new(CHROMIUM)
        .args([
            "--headless",
            "--no-sandbox",
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
            "--metrics-recording-only",
            // Nothing resolves, and whatever is fetched goes to a closed loopback port.
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--proxy-server=127.0.0.1:9",
            "--hide-scrollbars",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(mode)
        .arg(format!("file://{}", page.display()))
        // Its caches and crash reports land in the scratch profile, not root's home.
        .env("HOME", profile.path())
        .env("XDG_CONFIG_HOME", profile.path())
        .env("XDG_CACHE_HOME", profile.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = child.id();
    let deadline = Instant::now() + Duration::from_secs(60);
    let waiter = std::thread::spawn(move || child.wait_with_output().unwrap());
    while !waiter.is_finished() {
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(i32::try_from(id).unwrap()),
                nix::sys::signal::Signal::SIGKILL,
            );
            panic!("chromium did not finish {mode:?} within a minute");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = waiter.join().unwrap();
    assert!(
        out.status.success(),
        "chromium {mode:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Width and height from the PNG's IHDR, after checking the signature and the chunk type.
fn png_dimensions(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    assert_eq!(&png[12..16], b"IHDR", "the first chunk is not IHDR");
    let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
    (be(&png[16..20]), be(&png[20..24]))
}

#[test]
fn the_html_report_renders_in_headless_chromium_with_its_sections_and_hostile_text_inert() {
    if !prerequisites() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let store = scratch.path().join("audit");
    write_trail(&store);
    let config = write_config(scratch.path());
    let out = review_html(&config, &store);
    assert!(
        out.status.success(),
        "review report: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let artifacts = artifacts();
    let page = artifacts.join("report.html");
    std::fs::write(&page, &out.stdout).unwrap();

    let dom =
        String::from_utf8(chromium(scratch.path(), &page, &["--dump-dom".to_string()]).stdout)
            .unwrap();
    std::fs::write(artifacts.join("report.dom.html"), &dom).unwrap();
    for id in SECTIONS.iter().chain(&["signature"]) {
        assert!(
            dom.contains(&format!("<section id=\"{id}\"")),
            "no section {id} in the rendered DOM"
        );
    }
    // A known figure of the quarter: Alice's two connections to prod-db.
    assert!(
        dom.contains(
            "<td>user:alice@example.com</td><td>prod-db</td><td>connections</td><td>2</td>"
        ),
        "{dom}"
    );
    assert!(dom.contains("no member seen in the period; named by contractors-staging (permit)"));
    assert!(dom.contains("verified intact"));
    // Mallory's markup is text in the DOM: no element came of it, the title is the report's.
    assert!(!dom.contains("<script"), "{dom}");
    assert!(!dom.contains("<img"), "{dom}");
    assert!(dom.contains("<title>Access review 2026-10-01 to 2026-12-31"));
    assert!(dom
        .contains("user:&lt;script&gt;document.title='pwned'&lt;/script&gt;\"&amp;'@evil.example"));
    assert!(dom.contains("SELECT '&lt;img src=x onerror=alert(1)&gt;' AS \"a&amp;b\""));

    let png_path = artifacts.join("report.png");
    let _ = std::fs::remove_file(&png_path);
    chromium(
        scratch.path(),
        &page,
        &[
            format!("--screenshot={}", png_path.display()),
            "--window-size=1280,2000".to_string(),
        ],
    );
    let png = std::fs::read(&png_path).unwrap();
    assert_eq!(png_dimensions(&png), (1280, 2000));
    // A page with one heading is about 16 KB at this size; the report's tables are far more.
    assert!(
        png.len() > 60_000,
        "{} is {} bytes: the page rendered next to nothing",
        png_path.display(),
        png.len()
    );
}

#[test]
fn a_tampered_trail_gives_an_unverified_html_report_and_exit_1() {
    if !prerequisites() {
        return;
    }
    let scratch = tempfile::tempdir().unwrap();
    let store = scratch.path().join("audit");
    write_trail(&store);
    let config = write_config(scratch.path());
    let segment = std::fs::read_dir(&store)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("segment-"))
        .min()
        .unwrap();
    let text = std::fs::read_to_string(&segment).unwrap();
    assert!(text.contains("\"rows\":3"));
    std::fs::write(&segment, text.replacen("\"rows\":3", "\"rows\":1", 1)).unwrap();
    let out = review_html(&config, &store);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let page = artifacts().join("report-unverified.html");
    std::fs::write(&page, &out.stdout).unwrap();
    let dom =
        String::from_utf8(chromium(scratch.path(), &page, &["--dump-dom".to_string()]).stdout)
            .unwrap();
    assert!(
        dom.contains("role=\"alert\">UNVERIFIED: computed from a chain that does not verify"),
        "{dom}"
    );
    assert!(dom.contains("BROKEN"));
    assert!(!dom.contains("SHA-256 of the signed message"));
}
