//! What one local user can take from everybody else, end to end with the real agent: the
//! audit trail (a flood of direct connects to the proxy port), the agent's connections (a
//! uid over its open-connection limit), and the trail's disk (a full filesystem under the
//! audit store, and retention while a shipper is stalled). Slots 120-124.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed expectation should stop the test loudly"
)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use portcullis_e2e::postgres::{PasswordAuth, PgOptions, Postgres};
use portcullis_e2e::{e2e_enabled, Agent, EchoServer, Probe, Slot, Target, TestCgroup};
use serde_json::Value;

/// How many connections one event stands for.
fn count_of(ev: &Value) -> u64 {
    ev["count"].as_u64().unwrap_or(1)
}

/// The `connection.refused` events whose origin is `uid`.
fn refusals_of(agent: &Agent, uid: u32) -> Vec<Value> {
    agent
        .events_of("connection.refused")
        .into_iter()
        .filter(|e| e["origin"]["uid"] == uid)
        .collect()
}

fn refusals_naming(agent: &Agent, needle: &str) -> Vec<Value> {
    agent
        .events_of("connection.refused")
        .into_iter()
        .filter(|e| e["reason"].as_str().is_some_and(|r| r.contains(needle)))
        .collect()
}

/// Polls `f` until it returns Some, for at most 30 s (never a timing assertion: only how
/// long to wait before giving up).
fn wait_for<T>(what: &str, agent: &Agent, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for {what}; agent log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_flood_of_direct_connects_is_summarized_not_recorded_one_by_one() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(120);
    let cg = TestCgroup::new("limits-flood");
    // One interval for the whole test: the count is written when the agent stops, so the
    // number of events does not depend on how fast the machine is.
    let agent = Agent::start_with(
        "limits-flood",
        slot,
        &cg,
        &[],
        Some("[insecure]\nunix_identity_only = true\n[limits]\nsummary_interval_secs = 3600\n"),
        &[],
    );
    let mut agent = agent;
    let proxy = slot.proxy_v4();
    let before = agent.events().len();
    // Four clients at once, 750 connects each, every one dialled straight at the proxy
    // port (no origin record). Each waits for the agent to close it, so when they are done
    // the agent has handled all 3,000.
    let clients: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..750 {
                    let mut s = TcpStream::connect(proxy).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest);
                    assert!(
                        rest.is_empty(),
                        "the agent sends nothing to a direct connect"
                    );
                }
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let during = agent.events().len() - before;
    assert!(
        during <= 2,
        "3,000 refusals wrote {during} events while the interval was open"
    );
    let status = agent.sigterm().wait().unwrap();
    assert!(status.success(), "agent stop: {status}\n{}", agent.log());
    let refused = refusals_naming(&agent, "no origin record");
    assert_eq!(
        refused.len(),
        2,
        "one event in full and one summary: {refused:#?}"
    );
    assert!(refused[0].get("count").is_none(), "{}", refused[0]);
    assert_eq!(refused[1]["count"], 2999, "{}", refused[1]);
    assert!(
        refused[1]["reason"]
            .as_str()
            .unwrap()
            .contains("2999 more refusal(s) of connections without an origin record"),
        "{}",
        refused[1]
    );
    assert_eq!(refused.iter().map(count_of).sum::<u64>(), 3000);
    let verify = agent.verify_audit();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
fn a_uid_over_its_open_connection_limit_is_refused_while_others_connect() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(121);
    let cg = TestCgroup::new("limits-open");
    let _server = EchoServer::start(&[slot.v4(1)]);
    let v4 = slot.v4(1).ip().to_string();
    let agent = Agent::start_with(
        "limits-open",
        slot,
        &cg,
        &[Target {
            name: "db",
            address: &v4,
            port: slot.server_port,
            upstream: None,
        }],
        Some(
            "[insecure]\nunix_identity_only = true\n\
             [limits]\nmax_open_per_uid = 3\nsummary_interval_secs = 1\n",
        ),
        &[],
    );
    let target = slot.v4(1).to_string();
    let (greedy, other) = (43001u32, 43002u32);
    let greedy_probe = Probe {
        cgroup: &cg,
        uid: greedy,
        netns: None,
    };
    // Five connections at once, held until the probe is killed.
    let mut held = greedy_probe
        .command(&["connect", &target, "--count", "5", "--hold-ms", "120000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(held.stdout.take().unwrap()).lines();
    let results: Vec<Value> = (0..5)
        .map(|_| serde_json::from_str(&lines.next().unwrap().unwrap()).unwrap())
        .collect();
    let ok = results.iter().filter(|r| r["ok"] == true).count();
    assert_eq!(
        ok, 3,
        "three of five echo, the rest are closed: {results:#?}"
    );
    // Another uid is not affected by the greedy one's limit.
    let r = Probe {
        cgroup: &cg,
        uid: other,
        netns: None,
    }
    .connect(slot.v4(1), &[]);
    assert_eq!(r["ok"], true, "uid {other} must still connect: {r}");
    // The greedy uid is refused again while it holds three.
    let r = greedy_probe.connect(slot.v4(1), &[]);
    assert_eq!(r["ok"], false, "{r}");
    // Three refusals: the first in full at once, the others in one summary an interval later.
    let limited = wait_for("the summary of uid 43001's refusals", &agent, || {
        let ev: Vec<Value> = refusals_of(&agent, greedy)
            .into_iter()
            .filter(|e| {
                e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("limits.max_open_per_uid"))
            })
            .collect();
        (ev.iter().map(count_of).sum::<u64>() == 3).then_some(ev)
    });
    assert!(limited.len() <= 3, "{limited:#?}");
    assert!(limited[0].get("count").is_none(), "{}", limited[0]);
    assert_eq!(limited[0]["origin"]["destination"], target);
    assert!(refusals_of(&agent, other).is_empty());
    // Closing frees the uid's slots.
    held.kill().unwrap();
    held.wait().unwrap();
    wait_for("the held connections to close", &agent, || {
        (agent
            .events_of("connection.closed")
            .iter()
            .filter(|e| e["origin"]["uid"] == greedy)
            .count()
            == 3)
            .then_some(())
    });
    let r = greedy_probe.connect(slot.v4(1), &[]);
    assert_eq!(
        r["ok"], true,
        "uid {greedy} connects again once it holds less: {r}"
    );
}

const APP_PASSWORD: &str = "app-secret-limits";
const QUERY_POLICY: &str =
    "@id(\"query\")\npermit (principal, action == Portcullis::Action::\"query\", resource);\n";

/// A size-limited tmpfs the test mounts, unmounted when dropped (before the agent's
/// directory is removed).
struct SmallFilesystem {
    dir: PathBuf,
}

impl SmallFilesystem {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// Writes zeros until the filesystem refuses; returns the file.
    fn fill(&self) -> PathBuf {
        let path = self.dir.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let block = vec![0u8; 4096];
        loop {
            match f.write(&block) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
                    break;
                }
            }
        }
        let _ = f.sync_all();
        path
    }
}

impl Drop for SmallFilesystem {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// A psycopg session driven line by line: each line of stdin is one statement, each answer
/// one JSON line.
struct PySession {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<BufReader<std::process::ChildStdout>>,
}

impl PySession {
    fn start(conninfo: &str, uid: u32, cg: &TestCgroup) -> Self {
        let script = format!(
            "import json, sys, psycopg\n\
             try:\n    conn = psycopg.connect({conninfo:?}, autocommit=True)\n\
             except Exception as e:\n    print(json.dumps({{'connect_error': str(e), 'sqlstate': getattr(getattr(e, 'diag', None), 'sqlstate', None)}}), flush=True)\n    sys.exit(0)\n\
             print(json.dumps({{'connected': True}}), flush=True)\n\
             for line in sys.stdin:\n\
             \x20   try:\n\
             \x20       rows = conn.execute(line).fetchall()\n\
             \x20       print(json.dumps({{'rows': [list(map(str, r)) for r in rows]}}), flush=True)\n\
             \x20   except Exception as e:\n\
             \x20       print(json.dumps({{'error': str(e), 'sqlstate': getattr(e, 'sqlstate', None)}}), flush=True)\n"
        );
        let mut cmd = Command::new(portcullis_e2e::postgres::python());
        portcullis_e2e::exec_in_cgroup_as(&mut cmd, Some(&cg.path), Some(uid));
        let mut child = cmd
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Self {
            child,
            stdin,
            lines,
        }
    }

    fn next(&mut self) -> Value {
        serde_json::from_str(&self.lines.next().unwrap().unwrap()).unwrap()
    }

    fn run(&mut self, sql: &str) -> Value {
        writeln!(self.stdin, "{sql}").unwrap();
        self.stdin.flush().unwrap();
        self.next()
    }
}

impl Drop for PySession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A PostgreSQL server (role and database `app`) and an agent, not yet started, protecting
/// it with the query policy; `limits` is appended to the agent's config.
struct PgSetup {
    pg: Postgres,
    cg: TestCgroup,
    agent: Agent,
    _files: tempfile::TempDir,
}

impl PgSetup {
    fn prepare(name: &str, slot: u8, limits: &str) -> Self {
        let pg = Postgres::start_with(PgOptions {
            tls: true,
            ..PgOptions::default()
        });
        pg.create_role("app", APP_PASSWORD, PasswordAuth::Scram);
        pg.create_database("app", Some("app"));
        let files = tempfile::tempdir().unwrap();
        let creds =
            portcullis_e2e::postgres::write_credentials(files.path(), &[("app", APP_PASSWORD)]);
        let cg = TestCgroup::new(name);
        let extra = format!(
            "[insecure]\nunix_identity_only = true\n{limits}{}",
            pg.agent_target(&creds, "")
        );
        let agent = Agent::prepare(name, Slot::new(slot), &cg, &[], Some(&extra), &[]);
        std::fs::write(
            agent.dir.path().join("policies").join("query.cedar"),
            QUERY_POLICY,
        )
        .unwrap();
        Self {
            pg,
            cg,
            agent,
            _files: files,
        }
    }
}

fn conninfo(pg: &Postgres) -> String {
    format!(
        "host=127.0.0.1 port={} user=app dbname=app sslmode=disable connect_timeout=10",
        pg.port()
    )
}

/// A client that connects (through the redirect, as `uid`) and sends nothing: a
/// PostgreSQL connection that stays in start-up until the agent's 30 s run out.
fn silent_client(port: u16, uid: u32, cg: &TestCgroup) -> std::process::Child {
    let script = format!(
        "import socket, sys, time\n\
         s = socket.create_connection(('127.0.0.1', {port}))\n\
         print('connected', flush=True)\n\
         sys.stdin.read()\n"
    );
    let mut cmd = Command::new(portcullis_e2e::postgres::python());
    portcullis_e2e::exec_in_cgroup_as(&mut cmd, Some(&cg.path), Some(uid));
    let mut child = cmd
        .args(["-c", &script])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "connected");
    child
}

#[test]
fn postgres_connections_in_start_up_are_limited_per_uid_with_53300() {
    if !e2e_enabled() {
        return;
    }
    let PgSetup {
        pg,
        cg,
        mut agent,
        _files,
    } = PgSetup::prepare(
        "limits-startup",
        124,
        "[limits]\nmax_startup_per_uid = 2\nsummary_interval_secs = 1\n",
    );
    agent.spawn();
    let (stalling, other) = (4848u32, 4949u32);
    // Two connections that never send a start-up packet hold the uid's two slots...
    let mut held: Vec<_> = (0..2)
        .map(|_| silent_client(pg.port(), stalling, &cg))
        .collect();
    wait_for("both silent connections to be admitted", &agent, || {
        let n = agent.status()["pending_origins"]
            .as_u64()
            .unwrap_or(u64::MAX);
        (n == 0).then_some(())
    });
    // ...so a real client of that uid is refused with PostgreSQL's own 53300...
    // (tokio-postgres reads the ErrorResponse's code field.)
    let mut pgclient = Command::new(env!("CARGO_BIN_EXE_portcullis-pgclient"));
    portcullis_e2e::exec_in_cgroup_as(&mut pgclient, Some(&cg.path), Some(stalling));
    let out = pgclient
        .args([conninfo(&pg).as_str(), "SELECT 1"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let r: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(r["code"], "53300", "{r}");
    assert!(r["connect_error"].is_string(), "{r}");
    // ...while another uid logs in and runs statements.
    let mut ok = PySession::start(&conninfo(&pg), other, &cg);
    assert_eq!(ok.next()["connected"], true);
    assert_eq!(ok.run("SELECT 'other uid'")["rows"][0][0], "other uid");
    let event = wait_for("the refusal event", &agent, || {
        refusals_of(&agent, stalling).into_iter().find(|e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("limits.max_startup_per_uid"))
        })
    });
    assert_eq!(event["target"], "db", "{event}");
    // When the stalled connections go, the uid's slots are free again.
    for c in &mut held {
        let _ = c.kill();
        let _ = c.wait();
    }
    let mut again = wait_for("a new login of the uid", &agent, || {
        let mut s = PySession::start(&conninfo(&pg), stalling, &cg);
        (s.next()["connected"] == true).then_some(s)
    });
    assert_eq!(again.run("SELECT 'again'")["rows"][0][0], "again");
}

#[test]
fn a_full_audit_disk_refuses_connections_ends_sessions_and_recovers() {
    if !e2e_enabled() {
        return;
    }
    let PgSetup {
        pg,
        cg,
        mut agent,
        _files,
    } = PgSetup::prepare("limits-disk", 122, "");
    pg.psql("app", "SET ROLE app; CREATE TABLE marks (m text)");
    let disk = SmallFilesystem::mount(&agent.dir.path().join("state/audit"), "2m");
    agent.spawn();
    let conninfo = conninfo(&pg);
    let uid = 4747;
    let mut session = PySession::start(&conninfo, uid, &cg);
    assert_eq!(session.next()["connected"], true);
    assert_eq!(session.run("SELECT 'before'")["rows"][0][0], "before");
    let status = agent.status();
    assert_eq!(status["audit"]["writable"], true, "{status}");
    assert_eq!(status["audit"]["on_write_failure"], "refuse");

    let filler = disk.fill();
    // A new connection must record its opening durably. The segment's last page may still
    // hold an event or two (tmpfs allocates whole pages), so connections come until one
    // is refused; the agent then knows the store cannot be written.
    let refused_after = (0..20).find(|_| {
        let mut s = PySession::start(&conninfo, uid + 1, &cg);
        s.next()["connect_error"].is_string()
    });
    assert!(
        refused_after.is_some(),
        "no connection was refused on a full disk:\n{}",
        agent.log()
    );
    let status = wait_for("status to show the audit failure", &agent, || {
        let s = agent.status();
        (s["audit"]["writable"] == false).then_some(s)
    });
    let failure = &status["audit"]["failure"];
    assert!(
        failure["error"]
            .as_str()
            .is_some_and(|e| e.contains("No space left")),
        "{status}"
    );
    // An unprivileged viewer learns that it is failing, not the paths in the error.
    let as_user = agent.status_as(65534);
    assert_eq!(as_user["audit"]["writable"], false);
    assert!(as_user["audit"]["failure"].is_null(), "{as_user}");
    // While it fails, a new connection is refused with the reason...
    let mut refused = PySession::start(&conninfo, uid + 1, &cg);
    let r = refused.next();
    assert!(
        r["connect_error"]
            .as_str()
            .is_some_and(|e| e.contains("audit trail cannot be written")),
        "{r}"
    );
    // ...and the open session ends at its next statement, which never reaches the server.
    let r = session.run("INSERT INTO marks VALUES ('while full') RETURNING m");
    assert!(
        r["error"]
            .as_str()
            .is_some_and(|e| e.contains("audit trail cannot be written")),
        "{r}"
    );

    // Space again: the writer reopens the store and says what was lost.
    std::fs::remove_file(filler).unwrap();
    wait_for(
        "status to show the audit store writable again",
        &agent,
        || (agent.status()["audit"]["writable"] == true).then_some(()),
    );
    let integrity = agent.events_of("audit.integrity");
    let lost = integrity
        .iter()
        .find(|e| {
            e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("could not be written"))
        })
        .unwrap_or_else(|| panic!("no recovery event: {integrity:#?}"));
    assert!(lost["count"].as_u64().is_some(), "{lost}");
    let mut again = PySession::start(&conninfo, uid, &cg);
    assert_eq!(again.next()["connected"], true);
    assert_eq!(
        again.run("SELECT count(*) FROM marks")["rows"][0][0],
        "0",
        "the statement refused while the trail could not be written never ran"
    );
    let verify = agent.verify_audit();
    assert!(
        verify.status.success(),
        "the chain survives the failure: {}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    drop(again);
    drop(session);
    drop(refused);

    // The other choice, keep_enforcing: on the same full disk, connections open and
    // statements run (still decided), their events lost and counted, and status says so.
    agent.kill9();
    let mut config = std::fs::read_to_string(&agent.config).unwrap();
    config.push_str("[audit]\non_write_failure = \"keep_enforcing\"\n");
    std::fs::write(&agent.config, config).unwrap();
    agent.spawn();
    let filler = disk.fill();
    let mut kept = PySession::start(&conninfo, uid, &cg);
    assert_eq!(kept.next()["connected"], true);
    let status = wait_for("status to show the audit failure", &agent, || {
        // Statements go on until one's event fails to be written.
        let r = kept.run("INSERT INTO marks VALUES ('unaudited') RETURNING m");
        assert_eq!(r["rows"][0][0], "unaudited", "{r}");
        let s = agent.status();
        (s["audit"]["writable"] == false).then_some(s)
    });
    assert_eq!(status["audit"]["on_write_failure"], "keep_enforcing");
    assert!(
        status["audit"]["failure"]["lost_events"].as_u64().unwrap() > 0,
        "{status}"
    );
    let mut another = PySession::start(&conninfo, uid + 1, &cg);
    assert_eq!(
        another.next()["connected"],
        true,
        "new connections open too"
    );
    assert_eq!(another.run("SELECT 'still'")["rows"][0][0], "still");
    std::fs::remove_file(filler).unwrap();
    drop(kept);
    drop(another);
    agent.kill9();
    drop(disk);
}

/// Every record's seq in the store, oldest first (read from the segments' record lines).
fn stored_seqs(agent: &Agent) -> Vec<u64> {
    let mut seqs = Vec::new();
    for text in portcullis_e2e::segment_texts(&agent.dir.path().join("state/audit")) {
        for line in text.lines() {
            if let Some(seq) = serde_json::from_str::<Value>(line)
                .ok()
                .and_then(|v| v["seq"].as_u64())
            {
                seqs.push(seq);
            }
        }
    }
    seqs
}

/// A webhook receiver on `port` that acknowledges every POST (HTTP/1.1, keep-alive).
fn acknowledging_receiver(port: u16) {
    let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut writer = stream;
                loop {
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let line = line.trim_end();
                        if line.is_empty() {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':') {
                            if name.eq_ignore_ascii_case("content-length") {
                                length = value.trim().parse().unwrap();
                            }
                        }
                    }
                    let mut body = vec![0u8; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let ok = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
                    if writer.write_all(ok).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

#[test]
fn retention_keeps_what_a_stalled_shipper_has_not_acknowledged_through_a_flood() {
    if !e2e_enabled() {
        return;
    }
    let slot = Slot::new(123);
    let cg = TestCgroup::new("limits-retention");
    let _server = EchoServer::start(&[slot.v4(1)]);
    let v4 = slot.v4(1).ip().to_string();
    // The webhook points at a loopback port nobody listens on: the shipper is stalled.
    let port = portcullis_e2e::postgres::free_loopback_port(false);
    // Plain segments: the store's size on disk is compared with retention_max_bytes below.
    let extra = format!(
        "[insecure]\nunix_identity_only = true\nallow_plaintext_loopback = true\n\
         [limits]\nsummary_interval_secs = 1\n\
         [audit]\nmax_segment_bytes = 4096\nretention_max_bytes = 16384\n\
         compress_sealed_segments = false\n\
         [audit.webhook]\nurl = \"http://127.0.0.1:{port}/\"\n"
    );
    let mut agent = Agent::start_with(
        "limits-retention",
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
    // Real sessions, whose events are what retention must keep...
    Probe {
        cgroup: &cg,
        uid: 43101,
        netns: None,
    }
    .run(&["connect", &slot.v4(1).to_string(), "--count", "60"]);
    agent.wait_events("connection.closed", 60);
    // ...and a flood of 3,000 direct connects, which must not push them out.
    let proxy = slot.proxy_v4();
    for _ in 0..3000 {
        let mut s = TcpStream::connect(proxy).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let _ = s.read_to_end(&mut Vec::new());
    }
    wait_for("the flood's summaries", &agent, || {
        let n: u64 = refusals_naming(&agent, "no origin record")
            .iter()
            .map(count_of)
            .sum();
        (n == 3000).then_some(())
    });
    let flood_events = refusals_naming(&agent, "no origin record").len();
    assert!(
        flood_events <= 20,
        "3,000 direct connects wrote {flood_events} events"
    );
    let written = stored_seqs(&agent);
    assert!(
        written.len() > 120,
        "the sessions alone are 120 events: {}",
        written.len()
    );
    let size = || -> u64 {
        std::fs::read_dir(agent.dir.path().join("state/audit"))
            .unwrap()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_str().unwrap().starts_with("segment-"))
            .filter_map(|e| e.metadata().ok())
            .map(|m| m.len())
            .sum()
    };
    assert!(
        size() > 16384 * 2,
        "the store is well over retention_max_bytes"
    );
    // Retention runs when the writer is idle, at most once a minute: a restart makes it due.
    // It must find everything unshipped and delete nothing.
    let waiting = |agent: &Agent| {
        agent
            .log()
            .matches("audit retention is waiting for a shipper")
            .count()
    };
    let before = waiting(&agent);
    agent.kill9();
    agent.spawn();
    // Retention has run when it says it waits for the shipper, or when it deleted something.
    wait_for("retention to run", &agent, || {
        (waiting(&agent) > before || stored_seqs(&agent).first() != Some(&1)).then_some(())
    });
    let kept = stored_seqs(&agent);
    assert_eq!(
        kept.first(),
        Some(&1),
        "nothing unshipped is pruned, however large the store"
    );
    assert_eq!(kept.get(..written.len()), Some(written.as_slice()));
    // The same retention deletes once the shipper has acknowledged: a receiver appears, the
    // backlog ships, and the next run (after a restart) prunes.
    acknowledging_receiver(port);
    let progress = agent.dir.path().join("state/audit-webhook-shipped");
    let last = *kept.last().unwrap();
    wait_for("the webhook to acknowledge the backlog", &agent, || {
        std::fs::read_to_string(&progress)
            .ok()
            .and_then(|t| t.trim().parse::<u64>().ok())
            .filter(|&n| n >= last)
    });
    agent.kill9();
    agent.spawn();
    wait_for("retention to prune what was shipped", &agent, || {
        stored_seqs(&agent).first().filter(|&&s| s > 1).copied()
    });
    let out = agent.verify_audit();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}
