//! Smoke tests of the PostgreSQL harness, with no agent: the TLS server verifies with the
//! test CA, each password method logs in, pgbouncer answers, psycopg from the venv connects,
//! and client programs run as an unprivileged uid inside a test cgroup.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failure is a test failure"
)]

use std::process::{Command, Output};

use portcullis_e2e::pgbouncer::{self, BouncerAuth, Pgbouncer, PoolMode};
use portcullis_e2e::postgres::{
    self, run_client, PasswordAuth, PgOptions, Postgres, RunAs, SUPERUSER_PASSWORD,
};
use portcullis_e2e::{cgroup2_root, prerequisites_met, TestCgroup};

/// uids with no account, as the agent identity tests use.
const CLIENT_UID: u32 = 42_101;

fn stdout(what: &str, out: &Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn psql_args(conninfo: &str, sql: &str) -> Vec<String> {
    [
        "-X",
        "-q",
        "-A",
        "-t",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        conninfo,
        "-c",
        sql,
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect()
}

fn psql(conninfo: &str, sql: &str, env: &[(&str, &str)], run_as: RunAs<'_>) -> Output {
    let args = psql_args(conninfo, sql);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run_client("psql", &args, env, run_as)
}

const AS_CLIENT: RunAs<'static> = RunAs {
    uid: Some(CLIENT_UID),
    cgroup: None,
};

#[test]
fn tls_server_verifies_with_the_test_ca_and_refuses_plaintext() {
    if !prerequisites_met(postgres::missing_prerequisite()) {
        return;
    }
    let pg = Postgres::start_with(PgOptions {
        tls: true,
        require_tls: true,
        ..PgOptions::default()
    });
    pg.create_role("alice", "alice-pw", PasswordAuth::Scram);
    let env = [("PGPASSWORD", "alice-pw")];
    let sql = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

    let by_ip = psql(
        &pg.conninfo_verify_full("alice", "postgres"),
        sql,
        &env,
        AS_CLIENT,
    );
    assert_eq!(stdout("verify-full to 127.0.0.1", &by_ip), "t");

    let by_name = format!(
        "host=localhost port={} user=alice dbname=postgres sslmode=verify-full sslrootcert={}",
        pg.port,
        pg.ca_pem_path().display()
    );
    let by_name = psql(&by_name, sql, &env, AS_CLIENT);
    assert_eq!(stdout("verify-full to localhost", &by_name), "t");

    if pg.listens_on_v6() {
        let v6 = format!(
            "host=::1 port={} user=alice dbname=postgres sslmode=verify-full sslrootcert={}",
            pg.port,
            pg.ca_pem_path().display()
        );
        assert_eq!(
            stdout("verify-full to ::1", &psql(&v6, sql, &env, AS_CLIENT)),
            "t"
        );
    }

    // A CA that did not sign the server's certificate fails verification.
    let other = tempfile::tempdir().unwrap();
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-keyout",
            "k.pem",
            "-out",
            "ca.pem",
            "-subj",
            "/CN=other",
            "-days",
            "1",
        ])
        .current_dir(other.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let wrong_ca = format!(
        "{} sslmode=verify-full sslrootcert={}",
        pg.conninfo("alice", "postgres"),
        other.path().join("ca.pem").display()
    );
    let refused = psql(&wrong_ca, "SELECT 1", &env, RunAs::default());
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("certificate verify failed"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );

    // require_tls: no pg_hba line admits a plaintext login.
    let plain = format!("{} sslmode=disable", pg.conninfo("alice", "postgres"));
    let refused = psql(&plain, "SELECT 1", &env, AS_CLIENT);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("no encryption"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}

#[test]
fn scram_md5_and_cleartext_roles_log_in_with_their_own_method() {
    if !prerequisites_met(postgres::missing_prerequisite()) {
        return;
    }
    let pg = Postgres::start_with(PgOptions {
        tls: true,
        ..PgOptions::default()
    });
    let roles = [
        (
            "r_scram",
            PasswordAuth::Scram,
            "scram-sha-256",
            "SCRAM-SHA-256$",
        ),
        ("r_md5", PasswordAuth::Md5, "md5", "md5"),
        (
            "r_clear",
            PasswordAuth::Cleartext,
            "password",
            "SCRAM-SHA-256$",
        ),
    ];
    for (name, auth, _, _) in roles {
        pg.create_role(name, &format!("{name}-pw"), auth);
    }
    for (name, _, method, stored) in roles {
        let password = format!("{name}-pw");
        for sslmode in ["disable", "verify-full"] {
            let conninfo = if sslmode == "disable" {
                format!("{} sslmode=disable", pg.conninfo(name, "postgres"))
            } else {
                pg.conninfo_verify_full(name, "postgres")
            };
            let ok = psql(
                &conninfo,
                "SELECT current_user",
                &[("PGPASSWORD", &password)],
                AS_CLIENT,
            );
            assert_eq!(stdout(&format!("{name} {sslmode}"), &ok), name);
            let wrong = psql(&conninfo, "SELECT 1", &[("PGPASSWORD", "wrong")], AS_CLIENT);
            assert!(
                !wrong.status.success(),
                "{name} logged in with a wrong password"
            );
            assert!(
                String::from_utf8_lossy(&wrong.stderr).contains(&format!(
                    "password authentication failed for user \"{name}\""
                )),
                "{}",
                String::from_utf8_lossy(&wrong.stderr)
            );
        }
        // The server authenticated with the role's own pg_hba line and method.
        let log = pg.server_log();
        assert!(
            log.contains(&format!(
                "connection authenticated: identity=\"{name}\" method={method} "
            )),
            "no {method} login of {name} in the server log:\n{log}"
        );
        let secret = pg.psql(
            "postgres",
            &format!("SELECT rolpassword FROM pg_authid WHERE rolname = '{name}'"),
        );
        assert!(secret.trim().starts_with(stored), "{name}: {secret}");
    }
    // The superuser logs in over TCP with its password, as `superuser_url` says.
    let out = psql(
        &pg.superuser_url(),
        "SELECT current_user",
        &[],
        RunAs::default(),
    );
    assert_eq!(stdout("superuser_url", &out), "postgres");
    assert!(pg.superuser_url().contains(SUPERUSER_PASSWORD));
}

#[test]
fn pgbouncer_session_mode_answers_select_1() {
    if !prerequisites_met(pgbouncer::missing_prerequisite()) {
        return;
    }
    let pg = Postgres::start_with(PgOptions::default());
    pg.create_role("bench", "bench-pw", PasswordAuth::Scram);
    pg.create_database("bench", Some("bench"));
    let bouncer = Pgbouncer::start(&pg, PoolMode::Session, "bench", "bench-pw");
    let conninfo = format!(
        "host=127.0.0.1 port={} user=bench dbname=bench sslmode=disable",
        bouncer.port
    );
    let out = psql(
        &conninfo,
        "SELECT 1",
        &[("PGPASSWORD", "bench-pw")],
        AS_CLIENT,
    );
    assert_eq!(
        stdout("SELECT 1 through pgbouncer", &out),
        "1",
        "{}",
        bouncer.log()
    );
    let wrong = psql(&conninfo, "SELECT 1", &[("PGPASSWORD", "nope")], AS_CLIENT);
    assert!(!wrong.status.success(), "pgbouncer took a wrong password");
    // The server saw pgbouncer's own connection, not the client's.
    let backends = pg.psql(
        "postgres",
        "SELECT count(*) FROM pg_stat_activity WHERE usename = 'bench'",
    );
    assert_eq!(backends.trim(), "1", "{}", bouncer.log());

    // auth_type plain, the password itself in the auth file.
    let plain = Pgbouncer::start_with(
        &pg,
        PoolMode::Transaction,
        BouncerAuth::Plain,
        "bench",
        "bench-pw",
    );
    let conninfo = format!(
        "host=127.0.0.1 port={} user=bench dbname=bench sslmode=disable",
        plain.port
    );
    let out = psql(
        &conninfo,
        "SELECT 1",
        &[("PGPASSWORD", "bench-pw")],
        AS_CLIENT,
    );
    assert_eq!(
        stdout("SELECT 1 through pgbouncer (plain)", &out),
        "1",
        "{}",
        plain.log()
    );
}

#[test]
fn psycopg_from_the_venv_runs_select_1() {
    let problem = postgres::missing_prerequisite().or_else(|| {
        postgres::python_if_installed()
            .is_none()
            .then(|| "no .tools/venv: run `cargo xtask setup` (creates it with psycopg)".into())
    });
    if !prerequisites_met(problem) {
        return;
    }
    let pg = Postgres::start_with(PgOptions::default());
    pg.create_role("py", "py-pw", PasswordAuth::Scram);
    let script = "import sys, psycopg\n\
                  with psycopg.connect(sys.argv[1]) as conn:\n\
                  \x20   print(psycopg.__version__, conn.execute('SELECT 1').fetchone()[0])\n";
    let mut cmd = Command::new(postgres::python());
    portcullis_e2e::exec_in_cgroup_as(&mut cmd, None, Some(CLIENT_UID));
    let out = cmd
        .args(["-c", script])
        .arg(format!("{} sslmode=disable", pg.conninfo("py", "postgres")))
        .env("PGPASSWORD", "py-pw")
        .output()
        .unwrap();
    let text = stdout("psycopg SELECT 1", &out);
    let (version, one) = text.split_once(' ').unwrap();
    assert!(version.starts_with('3'), "{text}");
    assert_eq!(one, "1");
}

#[test]
fn clients_run_as_a_test_uid_inside_a_test_cgroup() {
    let problem = postgres::missing_prerequisite().or_else(|| {
        cgroup2_root()
            .is_none()
            .then(|| "no cgroup2 hierarchy is mounted".to_string())
    });
    if !prerequisites_met(problem) {
        return;
    }
    let cg = TestCgroup::new("pg-harness-clients");
    let run_as = RunAs {
        uid: Some(CLIENT_UID),
        cgroup: Some(&cg.path),
    };
    // Where the child runs and as whom.
    let mut sh = Command::new("sh");
    portcullis_e2e::exec_in_cgroup_as(&mut sh, run_as.cgroup, run_as.uid);
    let out = sh
        .args(["-c", "cat /proc/self/cgroup; id -u; id -G"])
        .output()
        .unwrap();
    let text = stdout("sh in the cgroup", &out);
    let root = cgroup2_root().unwrap();
    let relative = cg.path.strip_prefix(&root).unwrap();
    assert!(
        text.contains(&format!("0::/{}", relative.display())),
        "{text}"
    );
    assert!(
        text.ends_with(&format!("{CLIENT_UID}\n{CLIENT_UID}")),
        "{text}"
    );

    // pgbench and pg_dump/pg_restore work from there, as that uid.
    let pg = Postgres::start_with(PgOptions::default());
    pg.create_role("tool", "tool-pw", PasswordAuth::Scram);
    pg.create_database("tooldb", Some("tool"));
    pg.create_database("restored", Some("tool"));
    let env = [("PGPASSWORD", "tool-pw"), ("PGSSLMODE", "disable")];
    let port = pg.port.to_string();
    let conn = ["-h", "127.0.0.1", "-p", &port, "-U", "tool"];
    let init = run_client(
        "pgbench",
        &[&conn[..], &["-i", "-q", "-s", "1", "tooldb"]].concat(),
        &env,
        run_as,
    );
    stdout("pgbench -i", &init);
    let run = run_client(
        "pgbench",
        &[&conn[..], &["-n", "-S", "-t", "50", "tooldb"]].concat(),
        &env,
        run_as,
    );
    let report = stdout("pgbench -S", &run);
    assert!(
        report.contains("number of failed transactions: 0"),
        "{report}"
    );
    let dump_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dump_dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let dump = dump_dir.path().join("tooldb.dump");
    let dump_arg = dump.display().to_string();
    let out = run_client(
        "pg_dump",
        &[&conn[..], &["-Fc", "-f", &dump_arg, "tooldb"]].concat(),
        &env,
        run_as,
    );
    stdout("pg_dump", &out);
    let out = run_client(
        "pg_restore",
        &[&conn[..], &["--no-owner", "-d", "restored", &dump_arg]].concat(),
        &env,
        run_as,
    );
    stdout("pg_restore", &out);
    let rows = pg.psql("restored", "SELECT count(*) FROM pgbench_accounts");
    assert_eq!(rows.trim(), "100000");
}
