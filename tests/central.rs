//! The central audit store end to end: a real agent ships its hash-chained store into a real
//! PostgreSQL (run as user `postgres` on 127.0.0.1). Every event arrives exactly once and in
//! order, through a one-minute outage and a kill -9; the agent's role can only insert; the
//! chain verifies from the central copy and an admin's edit is found; the spool bound does
//! what `on_spool_full` says.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failure is a test failure"
)]

use std::path::Path;
use std::time::{Duration, Instant};

use portcullis_audit_store::{format::record_hash, ChainHash};
use portcullis_e2e::postgres::{BadCertificate, PgOptions, Postgres, SUPERUSER_PASSWORD};
use portcullis_e2e::{e2e_enabled, Agent, EchoServer, Probe, Slot, Target, TestCgroup};

const DB: &str = "portcullis";
const AGENT_PASSWORD: &str = "e2e-bastion";

/// A PostgreSQL with the agent's login role (a member of the insert-only group role the
/// migration grants to), and the config section pointing at it.
struct Central {
    pg: Postgres,
    host: String,
    secrets: tempfile::TempDir,
}

impl Central {
    fn start(host: &str) -> Self {
        Self::start_with(host, false)
    }

    /// `tls`: the server also offers TLS with the harness's test CA.
    fn start_with(host: &str, tls: bool) -> Self {
        let pg = Postgres::start_with(PgOptions {
            tls,
            ..PgOptions::default()
        });
        pg.create_database(DB, None);
        pg.psql(
            DB,
            &format!(
                "CREATE ROLE portcullis_writer NOLOGIN; \
                 CREATE ROLE bastion LOGIN PASSWORD '{AGENT_PASSWORD}' IN ROLE portcullis_writer"
            ),
        );
        let secrets = tempfile::tempdir().unwrap();
        for (file, pw) in [
            ("agent-pw", AGENT_PASSWORD),
            ("admin-pw", SUPERUSER_PASSWORD),
        ] {
            let path = secrets.path().join(file);
            std::fs::write(&path, pw).unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        Self {
            pg,
            host: host.to_string(),
            secrets,
        }
    }

    fn config(&self, extra: &str) -> String {
        format!(
            "[insecure]\nunix_identity_only = true\nallow_plaintext_loopback = true\n[audit.central]\n\
             url = \"postgres://bastion@127.0.0.1:{port}/{DB}\"\n\
             password_file = \"{agent_pw}\"\ntls = \"disable\"\nhost_name = \"{host}\"\n\
             migrate_url = \"postgres://postgres@127.0.0.1:{port}/{DB}\"\n\
             migrate_password_file = \"{admin_pw}\"\nbatch_size = 50\n{extra}\n",
            port = self.pg.port,
            agent_pw = self.secrets.path().join("agent-pw").display(),
            admin_pw = self.secrets.path().join("admin-pw").display(),
            host = self.host,
        )
    }

    /// (seq, event text) in seq order, as the central store holds them.
    fn rows(&self) -> Vec<(u64, String)> {
        let out = self.pg.try_psql(
            DB,
            &format!(
                "SELECT seq || ' ' || event_text FROM portcullis_audit_events \
                 WHERE host = '{}' ORDER BY seq",
                self.host
            ),
        );
        if !out.status.success() {
            return Vec::new(); // the schema is not there yet
        }
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (seq, text) = l.split_once(' ').unwrap();
                (seq.parse().unwrap(), text.to_string())
            })
            .collect()
    }

    /// Waits until the central copy equals the local store, then proves it holds every
    /// record exactly once and in order.
    fn assert_matches_local(&self, agent: &Agent) -> usize {
        let deadline = Instant::now() + Duration::from_secs(90);
        let (local, central) = loop {
            let local = local_records(agent);
            let central = self.rows();
            if (!local.is_empty() && local == central) || Instant::now() > deadline {
                break (local, central);
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        assert_eq!(
            central.len(),
            local.len(),
            "central holds {} records, local {}:\n{}",
            central.len(),
            local.len(),
            agent.log()
        );
        assert_eq!(central, local, "central differs from the local store");
        let seqs: Vec<u64> = central.iter().map(|(s, _)| *s).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "gap or reorder"
        );
        let counts = self.pg.psql(
            DB,
            &format!(
                "SELECT count(*) || ' ' || count(DISTINCT seq) FROM portcullis_audit_events WHERE host = '{}'",
                self.host
            ),
        );
        let n = central.len();
        assert_eq!(
            counts.trim(),
            format!("{n} {n}"),
            "duplicates in the central store"
        );
        n
    }

    /// Recomputes the chain from the central copy (the same hash as the local store):
    /// Ok(records) or Err(first broken seq).
    fn verify_chain(&self) -> Result<usize, u64> {
        let out = self.pg.psql(
            DB,
            &format!(
                "SELECT seq, time_ms, encode(prev, 'hex'), encode(hash, 'hex'), event_text \
                 FROM portcullis_audit_events WHERE host = '{}' ORDER BY seq",
                self.host
            ),
        );
        let mut last: Option<(u64, ChainHash)> = None;
        let mut n = 0;
        for line in out.lines().filter(|l| !l.is_empty()) {
            let f: Vec<&str> = line.splitn(5, '|').collect();
            let seq: u64 = f[0].parse().unwrap();
            let time_ms: u64 = f[1].parse().unwrap();
            let prev = ChainHash::from_hex(f[2]).unwrap();
            let hash = ChainHash::from_hex(f[3]).unwrap();
            let linked = match last {
                None => seq != 1 || prev == ChainHash::GENESIS,
                Some((s, h)) => seq == s + 1 && prev == h,
            };
            if !linked || record_hash(&prev, seq, time_ms, f[4].as_bytes()) != hash {
                return Err(seq);
            }
            last = Some((seq, hash));
            n += 1;
        }
        Ok(n)
    }
}

/// (seq, exact event text) of every record in the agent's local store.
fn local_records(agent: &Agent) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    for text in portcullis_e2e::segment_texts(&agent.dir.path().join("state/audit")) {
        for line in text.lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let Some(seq) = v["seq"].as_u64() else {
                continue;
            };
            let start = line.find(",\"event\":").unwrap() + ",\"event\":".len();
            out.push((seq, line[start..line.len() - 1].to_string()));
        }
    }
    out
}

struct Setup {
    central: Central,
    agent: Agent,
    cg: TestCgroup,
    slot: Slot,
    _server: EchoServer,
}

fn setup(name: &str, n: u8, extra: &str) -> Setup {
    let slot = Slot::new(n);
    let cg = TestCgroup::new(name);
    let server = EchoServer::start(&[slot.v4(1)]);
    let central = Central::start(name);
    let v4 = slot.v4(1).ip().to_string();
    let agent = Agent::start_with(
        name,
        slot,
        &cg,
        &[Target {
            name: "db",
            address: &v4,
            port: slot.server_port,
            upstream: None,
        }],
        Some(&central.config(extra)),
        &[],
    );
    Setup {
        central,
        agent,
        cg,
        slot,
        _server: server,
    }
}

impl Setup {
    fn probe(&self) -> Probe<'_> {
        Probe {
            cgroup: &self.cg,
            uid: 47001,
            netns: None,
        }
    }

    fn connect_ok(&self, count: usize) {
        let results = self.probe().run(&[
            "connect",
            &self.slot.v4(1).to_string(),
            "--count",
            &count.to_string(),
        ]);
        assert_eq!(results.len(), count);
        if !results
            .iter()
            .all(|r| r["via_proxy"] == true && r["ok"] == true)
        {
            // A protected connect that went direct is a security failure: keep everything
            // that can explain it.
            let attached = std::process::Command::new("bpftool")
                .args(["cgroup", "show"])
                .arg(&self.cg.path)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let procs =
                std::fs::read_to_string(self.cg.path.join("cgroup.procs")).unwrap_or_default();
            panic!(
                "{results:?}\nprograms attached to {}:\n{attached}\ncgroup.procs: {procs}\nagent log:\n{}",
                self.cg.path.display(),
                self.agent.log()
            );
        }
    }

    fn wait_event(&self, kind: &str, n: usize, secs: u64) -> usize {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            let got = self.agent.events_of(kind).len();
            if got >= n || Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn permission_denied(out: &std::process::Output) -> bool {
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("permission denied")
}

#[test]
fn shipped_once_in_order_insert_only_and_verifiable_centrally() {
    if !e2e_enabled() {
        return;
    }
    let s = setup("central-basic", 60, "");
    s.connect_ok(20);
    s.agent.wait_events("connection.closed", 20);
    let n = s.central.assert_matches_local(&s.agent);
    assert!(n >= 41, "agent.started plus 20 opened and 20 closed: {n}");
    assert_eq!(s.central.verify_chain(), Ok(n));
    let cli_verify = || {
        let pw = s.central.secrets.path().join("admin.pw");
        std::fs::write(&pw, portcullis_e2e::postgres::SUPERUSER_PASSWORD).unwrap();
        std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        std::process::Command::new(portcullis_e2e::agent_bin())
            .args(["audit", "central-verify", "--config"])
            .arg(&s.agent.config)
            .arg("--url")
            .arg(format!(
                "postgres://postgres@127.0.0.1:{}/{DB}",
                s.central.pg.port
            ))
            .arg("--password-file")
            .arg(&pw)
            .args(["--host", "central-basic"])
            .output()
            .unwrap()
    };
    let out = cli_verify();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("intact"));

    // The agent's role: insert, nothing else.
    let pg = &s.central.pg;
    for sql in [
        "UPDATE portcullis_audit_events SET time_ms = 0",
        "DELETE FROM portcullis_audit_events",
        "TRUNCATE portcullis_audit_events",
        "SELECT event_text FROM portcullis_audit_events",
        "DROP TABLE portcullis_audit_events",
    ] {
        let out = pg.psql_tcp("bastion", AGENT_PASSWORD, DB, sql);
        assert!(
            permission_denied(&out)
                || String::from_utf8_lossy(&out.stderr).contains("must be owner"),
            "{sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // An administrator edits one shipped event: the central chain names the row.
    let target = 5;
    pg.psql(
        DB,
        &format!(
            "UPDATE portcullis_audit_events SET event_text = replace(event_text, '47001', '47009') \
             WHERE host = 'central-basic' AND seq = {target}"
        ),
    );
    assert_eq!(s.central.verify_chain(), Err(target));
    let out = cli_verify();
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("BROKEN at seq {target}")), "{text}");
}

#[test]
fn outage_and_kill9_lose_nothing_and_duplicate_nothing() {
    if !e2e_enabled() {
        return;
    }
    let mut s = setup("central-outage", 61, "");
    s.connect_ok(10);
    s.agent.wait_events("connection.closed", 10);
    s.central.assert_matches_local(&s.agent);

    // A one-minute outage with connections flowing the whole time (bounded: 5 every half
    // second).
    s.central.pg.stop_server();
    let outage = Instant::now();
    let mut during = 0;
    while outage.elapsed() < Duration::from_secs(60) {
        s.connect_ok(5);
        during += 5;
        std::thread::sleep(Duration::from_millis(500));
    }
    s.central.pg.start_server();
    s.agent.wait_events("connection.closed", 10 + during);
    s.central.assert_matches_local(&s.agent);
    assert_eq!(s.agent.events_of("audit.spool_full").len(), 0);

    // kill -9, and lose the progress file as if the crash came between a commit and its
    // write: the restart re-sends everything and the unique key absorbs it.
    s.connect_ok(5);
    s.agent.kill9();
    let progress = s.agent.dir.path().join("state/audit-shipped");
    assert!(Path::new(&progress).exists());
    std::fs::write(&progress, "1\n").unwrap();
    s.agent.spawn();
    s.connect_ok(5);
    s.agent.wait_events("connection.closed", 20 + during);
    s.central.assert_matches_local(&s.agent);
    assert_eq!(s.central.verify_chain().map(|_| ()), Ok(()));
    assert!(
        !s.agent.log().contains("different hash"),
        "{}",
        s.agent.log()
    );
}

/// Stops the central store and makes traffic until the spool is over its (small) bound.
fn fill_spool(s: &Setup) {
    s.connect_ok(1);
    s.agent.wait_events("connection.closed", 1);
    s.central.assert_matches_local(&s.agent);
    assert_eq!(s.agent.events_of("audit.spool_full").len(), 0);
    s.central.pg.stop_server();
    s.connect_ok(40);
    assert_eq!(
        s.wait_event("audit.spool_full", 1, 20),
        1,
        "{}",
        s.agent.log()
    );
}

#[test]
fn spool_full_keep_enforcing_alerts_once_and_keeps_proxying() {
    if !e2e_enabled() {
        return;
    }
    let s = setup("central-keep", 62, "spool_max_bytes = 16384\n");
    fill_spool(&s);
    s.connect_ok(20);
    std::thread::sleep(Duration::from_secs(2));
    let spool: Vec<_> = s
        .agent
        .events()
        .into_iter()
        .filter(|e| e["event"].as_str().unwrap_or("").starts_with("audit.spool"))
        .collect();
    assert_eq!(
        s.agent.events_of("audit.spool_full").len(),
        1,
        "once per episode: {spool:?}\n{}",
        s.agent.log()
    );
    s.central.pg.start_server();
    assert_eq!(
        s.wait_event("audit.spool_drained", 1, 90),
        1,
        "{}",
        s.agent.log()
    );
    s.central.assert_matches_local(&s.agent);
}

#[test]
fn spool_full_refuse_connections_fails_closed_until_drained() {
    if !e2e_enabled() {
        return;
    }
    let s = setup(
        "central-refuse",
        63,
        "spool_max_bytes = 16384\non_spool_full = \"refuse_connections\"\n",
    );
    fill_spool(&s);
    let refused = s.probe().connect(s.slot.v4(1), &[]);
    assert_eq!(refused["ok"], false, "{refused}");
    let events = s.agent.wait_events("connection.refused", 1);
    assert!(
        events.iter().any(|e| e["reason"]
            .as_str()
            .unwrap_or("")
            .contains("spool_max_bytes")),
        "{events:?}"
    );
    s.central.pg.start_server();
    assert_eq!(
        s.wait_event("audit.spool_drained", 1, 90),
        1,
        "{}",
        s.agent.log()
    );
    s.connect_ok(2);
    s.central.assert_matches_local(&s.agent);
}

/// Waits until the agent's log holds `needle` more often than `before` times.
fn wait_log(agent: &Agent, needle: &str, before: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent.log().matches(needle).count() <= before {
        assert!(
            Instant::now() < deadline,
            "no `{needle}` in the agent's log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn shipping_over_tls_refuses_a_wrong_ca_name_or_expired_certificate() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(118);
    let cg = TestCgroup::new("central-tls");
    let server = EchoServer::start(&[slot.v4(1)]);
    let central = Central::start_with("central-tls", true);
    // The first certificate the agent meets is already a bad one.
    central.pg.serve_bad_certificate(BadCertificate::WrongCa);
    let config = central.config("").replace(
        "tls = \"disable\"",
        &format!(
            "tls = \"require\"\nca_file = \"{}\"",
            central.pg.ca_pem_path().display()
        ),
    );
    let v4 = slot.v4(1).ip().to_string();
    let agent = Agent::start_with(
        "central-tls",
        slot,
        &cg,
        &[Target {
            name: "db",
            address: &v4,
            port: slot.server_port,
            upstream: None,
        }],
        Some(&config),
        &[],
    );
    let s = Setup {
        central,
        agent,
        cg,
        slot,
        _server: server,
    };
    s.connect_ok(3);
    // What rustls names for each, in the shipper's warning; the agent retries with backoff,
    // so each certificate is served until the agent has met it.
    let cases = [
        (BadCertificate::WrongCa, "UnknownIssuer"),
        (BadCertificate::WrongName, "not valid for name"),
        (BadCertificate::Expired, "Expired"),
    ];
    for (bad, needle) in cases {
        s.central.pg.serve_bad_certificate(bad);
        let before = s.agent.log().matches(needle).count();
        wait_log(&s.agent, needle, before);
        assert!(
            s.agent.log().contains("central audit shipping failed"),
            "{bad:?}"
        );
        assert!(s.central.rows().is_empty(), "{bad:?}: nothing shipped");
    }
    // With the right certificate the same agent ships everything: the refusals above were
    // the certificates', not a broken TLS setup.
    s.central.pg.serve_good_certificate();
    let n = s.central.assert_matches_local(&s.agent);
    assert!(n >= 7, "agent.started plus 3 opened and 3 closed: {n}");
}
