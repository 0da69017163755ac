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
    let extra = "[insecure]\nunix_identity_only = true\n[audit]\nmax_segment_bytes = 4096\nretention_max_bytes = 16384\n";
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
