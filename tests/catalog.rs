//! The catalog's side connections end to end: the agent names a result column's table column
//! (so a name rule still masks an aliased column) by asking the server, over a connection of
//! its own logged in as the session's role. Those connections are kept and reused per
//! address, database and role; the server's own log counts their logins.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed expectation should stop the test loudly"
)]

use std::process::Output;
use std::time::{Duration, Instant};

use portcullis_e2e::postgres::{run_client, PasswordAuth, PgOptions, Postgres, RunAs};
use portcullis_e2e::{e2e_enabled, Agent, Slot, TestCgroup};

const CLIENT: u32 = 4242;

/// Every statement allowed, every result through the `secrets` profile.
const POLICIES: &str = r#"
@id("connect")
permit (principal, action == Portcullis::Action::"connect", resource);

@id("query-masked")
@mask("secrets")
permit (principal, action == Portcullis::Action::"query", resource);
"#;

/// A rule on a column's name: the agent looks the result's table columns up in the catalog to
/// apply it, whatever the column is called in the result.
const MASKING: &str = r#"
[profiles.secrets]
description = "The secret column, whatever a query calls it"

[[profiles.secrets.rules]]
column = "secret"
mask = "redact"
replacement = "[hidden]"
"#;

/// Tables t1..t8, each with one row whose `secret` is `plain-<n>`; readable by `app` (their
/// owner) and `other`.
const TABLES: usize = 8;

struct CatalogFixture {
    pg: Postgres,
    cg: TestCgroup,
    _agent: Agent,
    _files: tempfile::TempDir,
}

impl CatalogFixture {
    fn new(name: &str, slot: u8) -> Self {
        let pg = Postgres::start_with(PgOptions {
            tls: true,
            ..PgOptions::default()
        });
        pg.create_role("app", "app-secret", PasswordAuth::Scram);
        pg.create_role("other", "other-secret", PasswordAuth::Scram);
        pg.create_database("app", Some("app"));
        let mut sql = String::from("SET ROLE app;");
        for n in 1..=TABLES {
            sql.push_str(&format!(
                "CREATE TABLE t{n} (id int, secret text); INSERT INTO t{n} VALUES (1, 'plain-{n}'); GRANT SELECT ON t{n} TO other;"
            ));
        }
        pg.psql("app", &sql);
        let files = tempfile::tempdir().unwrap();
        let creds = portcullis_e2e::postgres::write_credentials(
            files.path(),
            &[("app", "app-secret"), ("other", "other-secret")],
        );
        let cg = TestCgroup::new(name);
        let extra = format!(
            "[insecure]\nunix_identity_only = true\n{}",
            pg.agent_target(&creds, "")
        );
        let mut agent = Agent::prepare(name, Slot::new(slot), &cg, &[], Some(&extra), &[]);
        let policies = agent.dir.path().join("policies");
        std::fs::write(policies.join("pg.cedar"), POLICIES).unwrap();
        std::fs::write(policies.join("masking.toml"), MASKING).unwrap();
        agent.spawn();
        Self {
            pg,
            cg,
            _agent: agent,
            _files: files,
        }
    }

    /// One psql session through the redirect as `user`, reading the secret of each table in
    /// `tables` under an alias; returns what psql printed, after checking every value was
    /// masked (so each lookup was answered).
    fn read_secrets(&self, user: &str, tables: &[usize]) -> String {
        let conninfo = format!(
            "host=127.0.0.1 port={} user={user} dbname=app sslmode=disable",
            self.pg.port()
        );
        let mut args = vec!["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &conninfo];
        let statements: Vec<String> = tables
            .iter()
            .map(|n| format!("SELECT secret AS s FROM t{n}"))
            .collect();
        for s in &statements {
            args.extend(["-c", s.as_str()]);
        }
        let out: Output = run_client(
            "psql",
            &args,
            &[("PGCONNECT_TIMEOUT", "10")],
            RunAs {
                uid: Some(CLIENT),
                cgroup: Some(&self.cg.path),
            },
        );
        let printed = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "psql as {user}: {printed}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            printed.lines().collect::<Vec<_>>(),
            vec!["[hidden]"; tables.len()],
            "every secret masked, none in clear"
        );
        printed
    }

    /// How many times the agent's catalog lookups logged in to the server as `role`.
    fn side_logins(&self, role: &str) -> usize {
        self.pg
            .server_log()
            .matches(&format!(
                "connection authorized: user={role} database=app application_name=portcullis-catalog"
            ))
            .count()
    }

    /// The server processes of the agent's side connections, now.
    fn side_backends(&self) -> Vec<String> {
        self.pg
            .psql(
                "postgres",
                "SELECT pid FROM pg_stat_activity WHERE application_name = 'portcullis-catalog'",
            )
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn wait_side_backends(&self, count: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let backends = self.side_backends();
            if backends.len() == count {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "side connections: {backends:?}, expected {count}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn repeated_catalog_lookups_reuse_one_side_connection_per_role() {
    if !e2e_enabled() {
        return;
    }
    let f = CatalogFixture::new("catalog-reuse", 170);
    // Six lookups (each table is new to the cache) in three client sessions, one at a time.
    f.read_secrets("app", &[1, 2]);
    f.read_secrets("app", &[3, 4]);
    f.read_secrets("app", &[5, 6]);
    assert_eq!(
        f.side_logins("app"),
        1,
        "six lookups, one login:\n{}",
        f.pg.server_log()
    );
    // Another role's session never borrows app's connection: its lookups log in as itself.
    f.read_secrets("other", &[7]);
    f.read_secrets("other", &[8]);
    assert_eq!(f.side_logins("other"), 1);
    assert_eq!(f.side_logins("app"), 1);
    f.wait_side_backends(2, Duration::from_secs(5));
}

#[test]
fn a_terminated_side_connection_is_replaced_transparently() {
    if !e2e_enabled() {
        return;
    }
    let f = CatalogFixture::new("catalog-replace", 171);
    f.read_secrets("app", &[1]);
    assert_eq!(f.side_logins("app"), 1);
    let killed = f.pg.psql(
        "postgres",
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'portcullis-catalog'",
    );
    assert_eq!(killed.trim(), "t", "one kept connection to terminate");
    f.wait_side_backends(0, Duration::from_secs(5));
    // The next lookup opens a new connection instead of failing the session on the dead one,
    // and the one after reuses the new one.
    f.read_secrets("app", &[2]);
    assert_eq!(f.side_logins("app"), 2);
    f.read_secrets("app", &[3]);
    assert_eq!(f.side_logins("app"), 2);
}

#[test]
fn an_idle_side_connection_is_closed_after_thirty_seconds() {
    if !e2e_enabled() {
        return;
    }
    let f = CatalogFixture::new("catalog-idle", 172);
    f.read_secrets("app", &[1]);
    f.wait_side_backends(1, Duration::from_secs(5));
    // Still kept well inside the idle time, then closed by the agent (not the server) soon
    // after it.
    std::thread::sleep(Duration::from_secs(20));
    assert_eq!(f.side_backends().len(), 1, "kept while recently used");
    f.wait_side_backends(0, Duration::from_secs(20));
    // Closed with a Terminate, as a client says goodbye: no broken connection in the log.
    let log = f.pg.server_log();
    assert!(
        !log.contains("unexpected EOF") && !log.contains("could not receive data"),
        "{log}"
    );
    f.read_secrets("app", &[2]);
    assert_eq!(f.side_logins("app"), 2);
}
