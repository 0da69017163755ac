//! The PostgreSQL upstream pool end to end: a real PostgreSQL 15 (TLS, SCRAM) on loopback, the
//! agent with `pool = { … }` on the target, unchanged clients (psql, pgbench, a raw Python
//! client for cancel keys) run inside the test cgroup through the real eBPF redirect. Each
//! test proves on the backend itself (same `pg_backend_pid()`, checked) what a client can
//! and cannot leave behind for the next one.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed expectation should stop the test loudly"
)]

use std::process::Output;
use std::time::{Duration, Instant};

use portcullis_e2e::postgres::{run_client, PasswordAuth, PgOptions, Postgres, RawSession, RunAs};
use portcullis_e2e::{e2e_enabled, Agent, Slot, TestCgroup};
use serde_json::Value;

const APP_PASSWORD: &str = "app-secret-never-shown";
const BOSS_PASSWORD: &str = "boss-secret-never-shown";
const CLIENT: u32 = 4242;

const POLICIES: &str = r#"
@id("connect")
permit (principal, action == Portcullis::Action::"connect", resource);
@id("query")
permit (principal, action == Portcullis::Action::"query", resource);
"#;

struct PoolFixture {
    pg: Postgres,
    cg: TestCgroup,
    agent: Agent,
    _files: tempfile::TempDir,
}

impl PoolFixture {
    /// `pool`: the target's `pool = { … }` value.
    fn new(name: &str, slot: u8, pool: &str) -> Self {
        let pg = Postgres::start_with(PgOptions {
            tls: true,
            ..PgOptions::default()
        });
        pg.create_role("app", APP_PASSWORD, PasswordAuth::Scram);
        pg.create_role("boss", BOSS_PASSWORD, PasswordAuth::Scram);
        pg.create_database("app", Some("app"));
        pg.psql(
            "app",
            "ALTER ROLE boss SUPERUSER; CREATE ROLE helper NOLOGIN; GRANT helper TO app;",
        );
        let files = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            files.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let creds = portcullis_e2e::postgres::write_credentials(
            files.path(),
            &[("app", APP_PASSWORD), ("boss", BOSS_PASSWORD)],
        );
        let cg = TestCgroup::new(name);
        let extra = format!(
            "[insecure]\nunix_identity_only = true\n{}",
            pg.agent_target(&creds, &format!("pool = {pool}\n"))
        );
        let mut agent = Agent::prepare(name, Slot::new(slot), &cg, &[], Some(&extra), &[]);
        std::fs::write(agent.dir.path().join("policies").join("pg.cedar"), POLICIES).unwrap();
        agent.spawn();
        Self {
            pg,
            cg,
            agent,
            _files: files,
        }
    }

    fn run_as(&self) -> RunAs<'_> {
        RunAs {
            uid: Some(CLIENT),
            cgroup: Some(&self.cg.path),
        }
    }

    /// psql through the redirect as `user`, each `sql` a `-c` of its own; stdout lines.
    fn psql(&self, user: &str, extra_conninfo: &str, sql: &[&str]) -> Vec<String> {
        let conninfo = format!(
            "host=127.0.0.1 port={} user={user} dbname=app sslmode=disable {extra_conninfo}",
            self.pg.port()
        );
        let mut args = vec!["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &conninfo];
        for s in sql {
            args.extend_from_slice(&["-c", s]);
        }
        let out = run_client("psql", &args, &[("PGCONNECT_TIMEOUT", "10")], self.run_as());
        assert!(out.status.success(), "{sql:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The `connection.opened` events of the target, oldest first.
    fn opened(&self) -> Vec<Value> {
        self.agent.events_of("connection.opened")
    }

    /// Backends of `user` for clients named `application` (the agent's catalog lookups
    /// have their own), seen from a direct superuser session.
    fn backends_of(&self, user: &str, application: &str) -> Vec<String> {
        self.pg
            .psql(
                "postgres",
                &format!(
                    "SELECT pid FROM pg_stat_activity WHERE usename = '{user}' \
                     AND application_name = '{application}' ORDER BY pid"
                ),
            )
            .lines()
            .map(str::to_owned)
            .filter(|l| !l.is_empty())
            .collect()
    }
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Waits until the server session the last client left is back in the pool (or closed):
/// the reset runs after the client's connection has closed.
fn settle() {
    std::thread::sleep(Duration::from_millis(300));
}

#[test]
fn state_a_client_leaves_is_gone_for_the_next_client_on_the_same_backend() {
    if !e2e_enabled() {
        return;
    }
    let f = PoolFixture::new("pg-pool-state", 35, "{ size = 1, idle_timeout_secs = 300 }");
    // What a fresh session of each role sees, before any client left anything.
    let fresh = [
        "SELECT pg_backend_pid()",
        "SHOW work_mem",
        "SHOW statement_timeout",
        "SHOW search_path",
        "SELECT current_user || ' ' || session_user",
        "SELECT count(*) FROM pg_class WHERE relpersistence = 't'",
        "SELECT count(*) FROM pg_prepared_statements",
        "SELECT count(*) FROM pg_listening_channels()",
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()",
        "SELECT count(*) FROM pg_cursors",
        "SELECT current_setting('myapp.tenant', true) IS NULL OR current_setting('myapp.tenant', true) = ''",
    ];
    let before = f.psql("app", "", &fresh);
    assert_eq!(
        before[1..],
        [
            "4MB",
            "0",
            "\"$user\", public",
            "app app",
            "0",
            "0",
            "0",
            "0",
            "0",
            "t"
        ],
        "{before:?}"
    );
    let pid = before[0].clone();
    settle();
    // Client A leaves every kind of session state behind it.
    let left = f.psql(
        "app",
        "",
        &[
            "SELECT pg_backend_pid()",
            "SET work_mem = '77MB'",
            "SELECT set_config('statement_timeout', '12345', false)",
            "SET search_path = pg_catalog, pg_temp",
            "SET myapp.tenant = 'acme'",
            "SET ROLE helper",
            "CREATE TEMP TABLE left_behind (x int)",
            "PREPARE leftover AS SELECT 1",
            "LISTEN leaked_channel",
            "SELECT pg_advisory_lock(4242)",
            "BEGIN; DECLARE held CURSOR WITH HOLD FOR SELECT 1; COMMIT",
            "SELECT current_user",
        ],
    );
    assert_eq!(left[0], pid, "client A had the pooled backend: {left:?}");
    assert_eq!(left.last().map(String::as_str), Some("helper"), "{left:?}");
    settle();
    // Client B, on the same backend, sees none of it.
    let after = f.psql("app", "", &fresh);
    assert_eq!(after[0], pid, "client B has the same backend: {after:?}");
    assert_eq!(after, before, "nothing of client A survives");
    // The advisory lock is free for anyone.
    assert_eq!(
        f.pg.psql("app", "SELECT pg_try_advisory_lock(4242)").trim(),
        "t"
    );

    // A superuser role's SET SESSION AUTHORIZATION is reset as well.
    let boss = f.psql(
        "boss",
        "",
        &["SELECT pg_backend_pid()", "SELECT session_user"],
    );
    assert_eq!(boss[1], "boss");
    settle();
    let became = f.psql(
        "boss",
        "",
        &[
            "SELECT pg_backend_pid()",
            "SET SESSION AUTHORIZATION app",
            "SELECT session_user || ' ' || current_user",
        ],
    );
    assert_eq!(became, [boss[0].as_str(), "SET", "app app"]);
    settle();
    let again = f.psql(
        "boss",
        "",
        &[
            "SELECT pg_backend_pid()",
            "SELECT session_user || ' ' || current_user",
        ],
    );
    assert_eq!(again, [boss[0].clone(), "boss boss".to_string()]);

    // A client whose start-up settings differ never gets a backend set up for another.
    let other = f.psql(
        "app",
        "options='-c search_path=pg_catalog'",
        &["SELECT pg_backend_pid()", "SHOW search_path"],
    );
    assert_ne!(
        other[0], pid,
        "another start-up, another backend: {other:?}"
    );
    assert_eq!(other[1], "pg_catalog");
    settle();
    let back = f.psql("app", "", &["SELECT pg_backend_pid()", "SHOW search_path"]);
    assert_eq!(
        back,
        [pid.as_str(), "\"$user\", public"],
        "and back to the first"
    );

    // The opened events say which sessions were lent from the pool, and which backend.
    let opened = f.opened();
    let lent: Vec<&Value> = opened
        .iter()
        .filter(|e| e["upstream_pooled"] == true)
        .collect();
    assert!(
        lent.iter()
            .any(|e| e["backend_pid"] == pid.parse::<u64>().unwrap() && e["db_user"] == "app"),
        "{opened:#?}"
    );
    assert_eq!(opened[0]["upstream_pooled"], false, "the first was dialed");
    assert!(opened[0].get("backend_pid").is_none());
}

#[test]
fn a_backend_left_in_a_transaction_or_failed_one_is_closed_not_lent() {
    if !e2e_enabled() {
        return;
    }
    let f = PoolFixture::new("pg-pool-txn", 36, "{ size = 1 }");
    for (case, left) in [
        (
            "open transaction",
            &["BEGIN", "SELECT pg_backend_pid()"][..],
        ),
        (
            "failed transaction",
            &["BEGIN", "SELECT pg_backend_pid()", "SELECT 1/0"][..],
        ),
    ] {
        let first = f.psql("app", "", &["SELECT pg_backend_pid()"]);
        settle();
        // psql runs each -c in one session and exits (Terminate) inside the block.
        let conninfo = format!(
            "host=127.0.0.1 port={} user=app dbname=app sslmode=disable",
            f.pg.port()
        );
        let mut args = vec!["-X", "-A", "-t", "-d", &conninfo];
        for c in left {
            args.extend_from_slice(&["-c", c]);
        }
        let out = run_client("psql", &args, &[], f.run_as());
        assert!(
            text(&out).contains(&first[0]),
            "{case}: the pooled backend: {}",
            text(&out)
        );
        settle();
        let next = f.psql("app", "", &["SELECT pg_backend_pid()"]);
        assert_ne!(next[0], first[0], "{case}: not lent again");
        assert!(
            !f.backends_of("app", "psql").contains(&first[0]),
            "{case}: closed: {:?}",
            f.backends_of("app", "psql")
        );
        settle();
    }
    let log = f.agent.log();
    let not_kept: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("not kept in the pool"))
        .collect();
    assert!(
        not_kept
            .iter()
            .any(|l| l.contains("inside a transaction block"))
            && not_kept
                .iter()
                .any(|l| l.contains("inside a failed transaction block")),
        "{not_kept:#?}"
    );
}

/// A raw protocol session as the client uid through the redirect
/// ([`portcullis_e2e::postgres::RawSession`]).
fn raw(f: &PoolFixture) -> RawSession {
    RawSession::start(f.pg.port(), Some(&f.cg.path), Some(CLIENT))
}

/// A CancelRequest with `key` as the client uid through the redirect.
fn cancel_with(f: &PoolFixture, key: &Value) {
    portcullis_e2e::postgres::raw_cancel(
        f.pg.port(),
        Some(&f.cg.path),
        Some(CLIENT),
        key["pid"].as_u64().unwrap(),
        key["secret"].as_str().unwrap(),
    );
}

#[test]
fn a_cancel_with_a_departed_clients_key_never_cancels_the_next_clients_query() {
    if !e2e_enabled() {
        return;
    }
    let f = PoolFixture::new("pg-pool-cancel", 37, "{ size = 1 }");
    let a = raw(&f);
    let a_key = a.key.clone();
    a.quit();
    settle();
    let mut b = raw(&f);
    assert_eq!(b.key["pid"], a_key["pid"], "B has A's pooled backend");
    assert_ne!(b.key["secret"], a_key["secret"], "with a key of its own");
    // A's key, from the same uid, while B's query runs: dropped.
    b.send("SELECT pg_sleep(2)");
    assert_eq!(b.line(), "sent");
    std::thread::sleep(Duration::from_millis(300));
    cancel_with(&f, &a_key);
    assert_eq!(b.line(), "ok ", "B's query ran to its end");
    // B's own key cancels B's query on the pooled backend.
    b.send("SELECT pg_sleep(30)");
    assert_eq!(b.line(), "sent");
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    cancel_with(&f, &b.key);
    assert_eq!(b.line(), "error 57014");
    assert!(started.elapsed() < Duration::from_secs(20));
    b.quit();
}

#[test]
fn pgbench_with_a_connection_per_transaction_reuses_backends_that_expire_when_idle() {
    if !e2e_enabled() {
        return;
    }
    let f = PoolFixture::new("pg-pool-pgbench", 38, "{ size = 4, idle_timeout_secs = 3 }");
    let conninfo = format!(
        "host=127.0.0.1 port={} user=app dbname=app sslmode=disable",
        f.pg.port()
    );
    let init = run_client("pgbench", &["-i", "-s", "1", &conninfo], &[], f.run_as());
    assert!(init.status.success(), "{}", text(&init));
    let out = run_client(
        "pgbench",
        &["-C", "-S", "-c4", "-t", "50", "-n", &conninfo],
        &[],
        f.run_as(),
    );
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("number of transactions actually processed: 200/200"),
        "{}",
        text(&out)
    );
    let opened = f.opened();
    let pooled: Vec<&Value> = opened
        .iter()
        .filter(|e| e["upstream_pooled"] == true)
        .collect();
    assert!(
        pooled.len() >= 150,
        "most of the 200 connections were lent from the pool: {}",
        pooled.len()
    );
    let pids: std::collections::BTreeSet<String> = pooled
        .iter()
        .map(|e| e["backend_pid"].to_string())
        .collect();
    assert!(pids.len() <= 4, "no more than the pool's size: {pids:?}");
    assert!(
        f.backends_of("app", "pgbench").len() <= 4,
        "{:?}",
        f.backends_of("app", "pgbench")
    );
    // Idle past idle_timeout_secs: each closed (with a Terminate, as the server log's
    // disconnections show), none left on the server.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f.backends_of("app", "pgbench").is_empty() {
        assert!(
            Instant::now() < deadline,
            "idle pooled backends still open: {:?}",
            f.backends_of("app", "pgbench")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
