//! The audit trail end to end: every connection is recorded in the hash-chained store
//! before a byte is forwarded, the chain verifies after normal operation and after kill -9,
//! and tampering is detected at the right place.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failure is a test failure"
)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use portcullis_e2e::{e2e_enabled, Agent, EchoServer, Fixture, Probe, Slot, Target, TestCgroup};
use serde_json::Value;

fn canonical(a: &str) -> String {
    let a: SocketAddr = a.parse().unwrap();
    SocketAddr::new(a.ip().to_canonical(), a.port()).to_string()
}

#[test]
fn the_chain_verifies_after_traffic_and_names_where_it_was_tampered_with() {
    if !e2e_enabled() {
        return;
    }
    let Fixture {
        slot,
        cg,
        server: _server,
        mut agent,
    } = Fixture::new("audit-tamper", 50);
    let probe = Probe {
        cgroup: &cg,
        uid: 47001,
        netns: None,
    };
    let results = probe.run(&["connect", &slot.v4(1).to_string(), "--count", "20"]);
    assert!(results.iter().all(|r| r["via_proxy"] == true));
    agent.wait_events("connection.closed", 20);
    let out = agent.verify_audit();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact"));

    // Stop the agent (its writer flushes), then edit one recorded uid.
    let mut child = agent.sigterm();
    child.wait().unwrap();
    let audit = agent.dir.path().join("state/audit");
    let segment = std::fs::read_dir(&audit)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("segment-")
        })
        .min()
        .unwrap();
    let text = std::fs::read_to_string(&segment).unwrap();
    let (line_no, _) = text
        .lines()
        .enumerate()
        .find(|(_, l)| l.contains("\"uid\":47001"))
        .unwrap();
    let tampered: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(i, l)| {
            if i == line_no {
                l.replacen("\"uid\":47001", "\"uid\":47009", 1)
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&segment, tampered.join("\n") + "\n").unwrap();
    let out = agent.verify_audit();
    assert!(!out.status.success());
    let report = String::from_utf8_lossy(&out.stdout);
    let name = segment.file_name().unwrap().to_str().unwrap();
    assert!(
        report.contains("BROKEN") && report.contains(name),
        "{report}"
    );
    assert!(
        report.contains(&format!("line {}", line_no + 1)),
        "{report}"
    );
}

#[test]
fn kill9_under_load_loses_no_event_of_a_forwarded_connection() {
    if !e2e_enabled() {
        return;
    }
    let Fixture {
        slot,
        cg,
        server: _server,
        mut agent,
    } = Fixture::new("audit-kill", 51);
    let target = slot.v4(1).to_string();
    let cgroup = cg.path.clone();
    // Connections forwarded so far: the kill comes once some have been, however slowly a
    // loaded machine starts the clients.
    let forwarded_so_far = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    // Bounded load: 8 clients, each up to 40 rounds of 10 connections.
    let load: Vec<_> = (0..8u32)
        .map(|i| {
            let cgroup = cgroup.clone();
            let target = target.clone();
            let forwarded_so_far = std::sync::Arc::clone(&forwarded_so_far);
            std::thread::spawn(move || {
                let mut lines = Vec::new();
                for _ in 0..40 {
                    let out = Command::new(portcullis_e2e::probe_bin())
                        .arg("--cgroup")
                        .arg(&cgroup)
                        .args([
                            "--uid",
                            &(47100 + i).to_string(),
                            "--gid",
                            &(47100 + i).to_string(),
                        ])
                        .args(["connect", &target, "--count", "10"])
                        .output()
                        .unwrap();
                    let text = String::from_utf8_lossy(&out.stdout).into_owned();
                    let ok = text.lines().filter(|l| l.contains("\"ok\":true")).count();
                    forwarded_so_far.fetch_add(ok, std::sync::atomic::Ordering::SeqCst);
                    lines.extend(
                        text.lines()
                            .map(|l| serde_json::from_str::<Value>(l).unwrap()),
                    );
                    if ok == 0 {
                        break; // the agent is gone
                    }
                }
                lines
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while forwarded_so_far.load(std::sync::atomic::Ordering::SeqCst) < 20
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The kill lands while the load is still running.
    std::thread::sleep(Duration::from_millis(200));
    agent.kill9();
    let results: Vec<Value> = load.into_iter().flat_map(|h| h.join().unwrap()).collect();
    let forwarded: Vec<String> = results
        .iter()
        .filter(|r| r["ok"] == true && r["via_proxy"] == true)
        .map(|r| r["local"].as_str().unwrap().to_string())
        .collect();
    assert!(
        !forwarded.is_empty(),
        "some connections went through before the kill"
    );

    // A restarted agent repairs a torn tail if there is one; the chain verifies.
    agent.spawn();
    let out = agent.verify_audit();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let recorded: HashSet<String> = agent
        .events_of("connection.opened")
        .iter()
        .map(|e| canonical(e["client"].as_str().unwrap()))
        .collect();
    let missing: Vec<&String> = forwarded
        .iter()
        .filter(|l| !recorded.contains(*l))
        .collect();
    assert!(
        missing.is_empty(),
        "{} forwarded connections have no opened event: {missing:?}",
        missing.len()
    );
}

#[test]
fn search_and_sessions_read_the_trail_back() {
    if !e2e_enabled() {
        return;
    }
    let Fixture {
        slot,
        cg,
        server: _server,
        agent,
    } = Fixture::new("audit-search", 52);
    let probe = Probe {
        cgroup: &cg,
        uid: 47201,
        netns: None,
    };
    probe.run(&["connect", &slot.v4(1).to_string(), "--count", "3"]);
    let other = Probe {
        cgroup: &cg,
        uid: 47202,
        netns: None,
    };
    other.connect(slot.proxy_v4(), &[]);
    agent.wait_events("connection.closed", 3);
    agent.wait_events("connection.refused", 1);

    let cli = |args: &[&str]| -> Vec<Value> {
        let out = Command::new(portcullis_e2e::agent_bin())
            .args(args)
            .arg("--config")
            .arg(&agent.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let opened = cli(&[
        "audit",
        "search",
        "--user",
        "47201",
        "--type",
        "connection.opened",
        "--json",
    ]);
    assert_eq!(opened.len(), 3);
    assert!(opened.iter().all(|e| e["decision"] == "allow"));
    assert_eq!(
        cli(&[
            "audit",
            "search",
            "--type",
            "connection",
            "--user",
            "47201",
            "--json"
        ])
        .len(),
        6
    );
    assert_eq!(
        cli(&["audit", "search", "--type", "connection.refused", "--json"]).len(),
        1
    );
    assert_eq!(
        cli(&["audit", "search", "--since", "10m", "--target", "db", "--json"]).len(),
        6
    );
    assert!(cli(&["audit", "search", "--until", "1970-01-02", "--json"]).is_empty());

    let sessions = cli(&["sessions", "list", "--json"]);
    assert_eq!(sessions.len(), 3);
    assert!(
        sessions.iter().all(|s| s["closed"]["reason"].is_string()),
        "{sessions:?}"
    );
    // A page at a time, newest last; the older page is where the first one says.
    let paged = Command::new(portcullis_e2e::agent_bin())
        .args(["sessions", "list", "--limit", "2", "--json", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let newest: Vec<Value> = String::from_utf8_lossy(&paged.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(newest, sessions[1..], "the two newest, newest last");
    let hint = String::from_utf8_lossy(&paged.stderr).to_string();
    let before = hint
        .split("--before ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no --before in {hint:?}"));
    let oldest = cli(&[
        "sessions", "list", "--limit", "2", "--before", before, "--json",
    ]);
    assert_eq!(oldest, sessions[..1]);
    let id = sessions[0]["opened"]["connection_id"]
        .as_u64()
        .unwrap()
        .to_string();
    let timeline = cli(&["sessions", "show", &id, "--json"]);
    let kinds: Vec<&str> = timeline
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["connection.opened", "connection.closed"]);
    // In text, each event is followed by what it was about, and the session by its end.
    let text = Command::new(portcullis_e2e::agent_bin())
        .args(["sessions", "show", &id, "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("    bytes: ") && text.contains("\nend: ") && text.contains("ms, sent "),
        "{text}"
    );
}

#[test]
fn retention_deletes_old_segments_and_the_chain_still_verifies() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(53);
    let cg = TestCgroup::new("audit-retention");
    let _server = EchoServer::start(&[slot.v4(1)]);
    let v4 = slot.v4(1).ip().to_string();
    // Plain segments: the sizes below are what retention counts, not shrunk by compression.
    let extra = "[insecure]\nunix_identity_only = true\n[audit]\nmax_segment_bytes = 4096\nretention_max_bytes = 16384\ncompress_sealed_segments = false\n";
    let mut agent = Agent::start_with(
        "audit-retention",
        slot,
        &cg,
        &[Target {
            name: "db",
            address: &v4,
            port: slot.server_port,
            upstream: None,
        }],
        Some(extra),
        &[],
    );
    let probe = Probe {
        cgroup: &cg,
        uid: 47301,
        netns: None,
    };
    probe.run(&["connect", &slot.v4(1).to_string(), "--count", "60"]);
    agent.wait_events("connection.closed", 60);
    let audit = agent.dir.path().join("state/audit");
    // A segment listed here may be pruned before its size is read: it then counts as gone.
    let size = || -> u64 {
        std::fs::read_dir(&audit)
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_str().unwrap().starts_with("segment-"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    // The writer prunes when it is idle, at most once a minute: a restart makes it due.
    agent.kill9();
    agent.spawn();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while size() > 16384 + 4096 {
        assert!(
            std::time::Instant::now() < deadline,
            "nothing was pruned: {} bytes",
            size()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = agent.verify_audit();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn sealed_segments_are_signed_and_verify_only_with_the_right_key() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(54);
    let cg = TestCgroup::new("audit-signed");
    let _server = EchoServer::start(&[slot.v4(1)]);
    let v4 = slot.v4(1).ip().to_string();
    let keys = tempfile::tempdir().unwrap();
    let seed = [7u8; 32];
    let key_file = keys.path().join("audit.key");
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    std::fs::write(&key_file, hex(&seed)).unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let public = portcullis_audit_store::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    let other = portcullis_audit_store::SigningKey::from_bytes(&[8u8; 32])
        .verifying_key()
        .to_bytes();
    let extra = format!(
        "[insecure]\nunix_identity_only = true\n[audit]\nmax_segment_bytes = 4096\nsigning_key_file = \"{}\"\n",
        key_file.display()
    );
    let agent = Agent::start_with(
        "audit-signed",
        slot,
        &cg,
        &[Target {
            name: "db",
            address: &v4,
            port: slot.server_port,
            upstream: None,
        }],
        Some(&extra),
        &[],
    );
    let probe = Probe {
        cgroup: &cg,
        uid: 47401,
        netns: None,
    };
    probe.run(&["connect", &slot.v4(1).to_string(), "--count", "20"]);
    agent.wait_events("connection.closed", 20);
    let verify = |key: &[u8]| {
        Command::new(portcullis_e2e::agent_bin())
            .args(["audit", "verify", "--config"])
            .arg(&agent.config)
            .args(["--public-key", &hex(key)])
            .output()
            .unwrap()
    };
    let out = verify(&public);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("seals signed"));
    let out = verify(&other);
    assert!(
        !out.status.success(),
        "another key must not verify the seals"
    );
}

/// Sealed segments are compressed within seconds of their seal, and every reader still sees
/// whole events: statements run with psql through the real redirect are found by `audit
/// search`, printed by `audit export` and verified by `audit verify` while the sealed segments
/// on disk are zstd files.
#[test]
fn sealed_segments_are_compressed_and_search_export_and_verify_read_them_whole() {
    use portcullis_e2e::postgres as pg;
    if !e2e_enabled() || !portcullis_e2e::prerequisites_met(pg::missing_prerequisite()) {
        return;
    }
    let files = tempfile::tempdir().unwrap();
    let (postgres, creds) = pg::app_server(files.path());
    let cg = TestCgroup::new("audit-zstd");
    let config = format!(
        "[insecure]\nunix_identity_only = true\nallow_plaintext_loopback = true\n\
         [audit]\nmax_segment_bytes = 16384\n\
         [[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1\"\nport = {port}\n\
         [target.postgres]\nca_file = \"{ca}\"\ncredentials_file = \"{creds}\"\n",
        port = postgres.port(),
        ca = postgres.ca_pem_path().display(),
        creds = creds.display(),
    );
    let mut agent = Agent::prepare("audit-zstd", Slot::new(33), &cg, &[], Some(&config), &[]);
    std::fs::write(
        agent.dir.path().join("policies/e2e.cedar"),
        "@id(\"allow-all\")\npermit (principal, action, resource);\n",
    )
    .unwrap();
    agent.spawn();

    const STATEMENTS: usize = 300;
    let script: String = (0..STATEMENTS)
        .map(|i| format!("SELECT 'marker-{i}' AS n;\n"))
        .collect();
    let out = pg::psql_app_script(&postgres, &cg.path, 47331, &script)
        .wait_with_output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("marker-299"));
    agent.wait_events("statement.executed", STATEMENTS);

    // Every segment but the open one becomes a zstd file, and no plain copy stays beside it.
    let audit = agent.dir.path().join("state/audit");
    let names = || -> Vec<String> {
        let mut n: Vec<String> = std::fs::read_dir(&audit)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().into_string().unwrap())
            .filter(|n| n.starts_with("segment-"))
            .collect();
        n.sort();
        n
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let all = names();
        let plain = all.iter().filter(|n| n.ends_with(".jsonl")).count();
        let compressed = all.iter().filter(|n| n.ends_with(".jsonl.zst")).count();
        if plain == 1 && compressed >= 3 && all.len() == plain + compressed {
            assert!(all.last().unwrap().ends_with(".jsonl"), "{all:?}");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sealed segments not compressed: {all:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut plain_bytes = 0;
    let mut disk_bytes = 0;
    for name in names() {
        let bytes = std::fs::read(audit.join(&name)).unwrap();
        disk_bytes += bytes.len();
        if name.ends_with(".zst") {
            assert_eq!(bytes[..4], [0x28, 0xb5, 0x2f, 0xfd], "{name}: a zstd frame");
            plain_bytes += portcullis_audit_store::read_segment_file(&audit.join(&name))
                .unwrap()
                .len();
        } else {
            plain_bytes += bytes.len();
        }
    }
    assert!(
        disk_bytes * 2 < plain_bytes,
        "{disk_bytes} bytes on disk for {plain_bytes} of lines"
    );

    let cli = |args: &[&str]| -> Vec<Value> {
        let out = Command::new(portcullis_e2e::agent_bin())
            .args(args)
            .arg("--config")
            .arg(&agent.config)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let statements = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["event"] == "statement.executed")
            .map(|e| {
                assert_eq!(e["target"], "db", "{e}");
                assert_eq!(e["origin"]["uid"], 47331, "{e}");
                e["statement"].as_str().unwrap().to_string()
            })
            .collect()
    };
    let expected: Vec<String> = (0..STATEMENTS)
        .map(|i| format!("SELECT 'marker-{i}' AS n"))
        .collect();
    let found = cli(&["audit", "search", "--type", "statement.executed", "--json"]);
    assert_eq!(statements(&found), expected);
    let exported = cli(&["audit", "export"]);
    assert_eq!(statements(&exported), expected);
    let verified = agent.verify_audit();
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stdout)
    );
}

/// The audit trail's size on disk per statement event under `pgbench -S -c16` through the
/// agent (goal: at most 150 bytes), and the statement events per second the writer took.
/// Prints `BENCH-ROW` lines for `cargo xtask bench`'s table; asserts nothing about either
/// figure. `PORTCULLIS_VOLUME_SECS` (default 60) is the run's length.
#[test]
#[ignore = "a measurement: run with --ignored (root, real eBPF, PostgreSQL)"]
fn bench_audit_bytes_per_statement_event_under_pgbench() {
    use portcullis_e2e::postgres as pg;
    if !e2e_enabled() || !portcullis_e2e::prerequisites_met(pg::missing_prerequisite()) {
        return;
    }
    let secs: u64 = std::env::var("PORTCULLIS_VOLUME_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let files = tempfile::tempdir().unwrap();
    let (postgres, creds) = pg::app_server(files.path());
    let cg = TestCgroup::new("audit-volume");
    // Everything at its default but the target: segment size, age, compression.
    let config = format!(
        "[insecure]\nunix_identity_only = true\nallow_plaintext_loopback = true\n\
         [limits]\nmax_open_per_uid = 100000\nmax_startup_per_uid = 100000\n\
         [[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1\"\nport = {port}\n\
         [target.postgres]\nca_file = \"{ca}\"\ncredentials_file = \"{creds}\"\n",
        port = postgres.port(),
        ca = postgres.ca_pem_path().display(),
        creds = creds.display(),
    );
    let mut agent = Agent::prepare("audit-volume", Slot::new(34), &cg, &[], Some(&config), &[]);
    std::fs::write(
        agent.dir.path().join("policies/e2e.cedar"),
        "@id(\"allow-all\")\npermit (principal, action, resource);\n",
    )
    .unwrap();
    agent.spawn();
    let port = postgres.port().to_string();
    // The data set is loaded straight into the server: only the benchmark goes through.
    let init = pg::run_client(
        "pgbench",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "app",
            "-i",
            "-s",
            "1",
            "app",
        ],
        &[("PGPASSWORD", "app-secret"), ("PGSSLMODE", "require")],
        pg::RunAs {
            uid: None,
            cgroup: None,
        },
    );
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );
    let duration = secs.to_string();
    let run = pg::run_client(
        "pgbench",
        &[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "app",
            "-S",
            "-c",
            "16",
            "-j",
            "2",
            "-T",
            &duration,
            "app",
        ],
        &[("PGSSLMODE", "disable")],
        pg::RunAs {
            uid: Some(47341),
            cgroup: Some(&cg.path),
        },
    );
    let text = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(
        run.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    println!("{text}");

    // Everything written, every sealed segment compressed.
    let audit = agent.dir.path().join("state/audit");
    let segment_names = || -> Vec<String> {
        std::fs::read_dir(&audit)
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.file_name().into_string().unwrap())
            .filter(|n| n.starts_with("segment-"))
            .collect()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while segment_names()
        .iter()
        .filter(|n| n.ends_with(".jsonl"))
        .count()
        > 1
    {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            segment_names()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // -S is one statement per transaction; the release agent verifies the whole chain (and
    // says how long it is) faster than a debug test binary could read it.
    let statements: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split('/').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no transaction count in {text}"));
    let verified = Command::new(portcullis_e2e::agent_bin())
        .args(["audit", "verify", "--json", "--config"])
        .arg(&agent.config)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&verified.stdout).unwrap();
    assert_eq!(report["ok"], true, "{report}");
    let last_seq = report["last_seq"].as_u64().unwrap();
    let events = last_seq;
    let (mut sealed_bytes, mut open_bytes, mut open_name) = (0u64, 0u64, String::new());
    for name in segment_names() {
        let len = std::fs::metadata(audit.join(&name)).unwrap().len();
        if name.ends_with(".zst") {
            sealed_bytes += len;
        } else {
            open_bytes = len;
            open_name = name;
        }
    }
    // The open segment's events, to give the sealed ones' figure on its own.
    let open_first = portcullis_audit_store::parse_segment_file_name(&open_name).unwrap_or(1);
    let sealed_events = open_first.saturating_sub(1).max(1);
    let total = (sealed_bytes + open_bytes) as f64 / statements.max(1) as f64;
    let sealed = sealed_bytes as f64 / sealed_events as f64;
    let rate = statements as f64 / secs as f64;
    println!(
        "audit volume: {statements} statement events of {events} (seq 1..={last_seq}) in {secs} s; \
         {sealed_bytes} bytes sealed (compressed) + {open_bytes} bytes in the open segment = \
         {total:.1} bytes per statement event; sealed alone {sealed:.1} bytes per event"
    );
    for (key, name, value, unit) in [
        (
            "audit.bytes_per_statement",
            "audit trail on disk per statement event, pgbench -S -c16 (goal <= 150)",
            total,
            "B",
        ),
        (
            "audit.bytes_per_event_sealed",
            "audit trail per event in sealed (compressed) segments",
            sealed,
            "B",
        ),
        (
            "audit.statement_events_sustained",
            "statement events written, pgbench -S -c16",
            rate,
            "events/s",
        ),
    ] {
        println!(
            "BENCH-ROW {{\"key\":\"{key}\",\"name\":\"{name}\",\"value\":{value:.1},\"unit\":\"{unit}\",\"rounds\":1}}"
        );
    }
}
