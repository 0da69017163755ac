//! A real pgbouncer (Debian's 1.18, `/usr/sbin/pgbouncer`) in front of a harness
//! `Postgres`: the peer the PostgreSQL bench compares the agent with. It runs as the
//! `postgres` user (pgbouncer refuses root) in a temp dir, on a free 127.0.0.1 port, talks
//! plaintext to the server (the bench compares plaintext paths), and is killed on Drop.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::postgres::{free_loopback_port, postgres_ids, Postgres};

pub fn pgbouncer_bin() -> PathBuf {
    std::env::var_os("PORTCULLIS_PGBOUNCER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/pgbouncer"))
}

/// What is missing for this harness, if anything (for `crate::prerequisites_met`).
pub fn missing_prerequisite() -> Option<String> {
    crate::postgres::missing_prerequisite().or_else(|| {
        (!pgbouncer_bin().is_file()).then(|| {
            format!(
                "{} is missing: run `cargo xtask setup` (installs pgbouncer)",
                pgbouncer_bin().display()
            )
        })
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PoolMode {
    /// A server connection per client for the client's whole session.
    Session,
    /// A server connection per transaction.
    Transaction,
}

impl PoolMode {
    fn as_str(self) -> &'static str {
        match self {
            PoolMode::Session => "session",
            PoolMode::Transaction => "transaction",
        }
    }
}

/// How clients authenticate to pgbouncer (`auth_type`), and so how pgbouncer logs in to
/// the server: SCRAM pass-through with the role's SCRAM secret, or the plain password.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BouncerAuth {
    Scram,
    /// `plain`: the client sends the password in clear.
    Plain,
}

pub struct Pgbouncer {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

impl Pgbouncer {
    /// Session or transaction pooling for one `user`, who logs in to pgbouncer with SCRAM.
    pub fn start(pg: &Postgres, pool_mode: PoolMode, user: &str, password: &str) -> Self {
        Self::start_with(pg, pool_mode, BouncerAuth::Scram, user, password)
    }

    pub fn start_with(
        pg: &Postgres,
        pool_mode: PoolMode,
        auth: BouncerAuth,
        user: &str,
        password: &str,
    ) -> Self {
        let (uid, gid) = postgres_ids();
        let dir = tempfile::Builder::new()
            .prefix("portcullis-pgbouncer-")
            .tempdir()
            .unwrap();
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        let port = free_loopback_port(false);
        let userlist = dir.path().join("userlist.txt");
        // With SCRAM, the server's own secret, as production setups copy it (or fetch it with
        // auth_query): pgbouncer then verifies the client without deriving a key per login
        // and logs in to the server with the client's proof. `plain` needs the password.
        let secret = match auth {
            BouncerAuth::Scram => {
                let stored = pg.psql(
                    "postgres",
                    &format!(
                        "SELECT rolpassword FROM pg_authid WHERE rolname = '{}'",
                        user.replace('\'', "''")
                    ),
                );
                let stored = stored.trim().to_string();
                if stored.starts_with("SCRAM-SHA-256$") {
                    stored
                } else {
                    password.to_string()
                }
            }
            BouncerAuth::Plain => password.to_string(),
        };
        std::fs::write(
            &userlist,
            format!(
                "\"{}\" \"{}\"\n",
                user.replace('"', "\"\""),
                secret.replace('"', "\"\"")
            ),
        )
        .unwrap();
        let ini = dir.path().join("pgbouncer.ini");
        std::fs::write(
            &ini,
            format!(
                "[databases]\n\
                 * = host=127.0.0.1 port={pg_port}\n\
                 [pgbouncer]\n\
                 listen_addr = 127.0.0.1\n\
                 listen_port = {port}\n\
                 unix_socket_dir =\n\
                 auth_type = {auth}\n\
                 auth_file = {userlist}\n\
                 pool_mode = {mode}\n\
                 max_client_conn = 1100\n\
                 default_pool_size = 20\n\
                 server_tls_sslmode = disable\n\
                 client_tls_sslmode = disable\n\
                 ignore_startup_parameters = extra_float_digits,options\n\
                 logfile = {log}\n\
                 pidfile = {pid}\n\
                 log_connections = 0\n\
                 log_disconnections = 0\n",
                pg_port = pg.port,
                auth = match auth {
                    BouncerAuth::Scram => "scram-sha-256",
                    BouncerAuth::Plain => "plain",
                },
                userlist = userlist.display(),
                mode = pool_mode.as_str(),
                log = dir.path().join("pgbouncer.log").display(),
                pid = dir.path().join("pgbouncer.pid").display(),
            ),
        )
        .unwrap();
        for f in [&userlist, &ini] {
            std::os::unix::fs::chown(f, Some(uid), Some(gid)).unwrap();
            std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .unwrap();
        }
        use std::os::unix::process::CommandExt;
        // Started directly as `postgres` (not through runuser) so Drop kills pgbouncer itself.
        let child = Command::new(pgbouncer_bin())
            .arg(&ini)
            .uid(uid)
            .gid(gid)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .current_dir(dir.path())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", pgbouncer_bin().display()));
        let mut bouncer = Self { dir, port, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = bouncer.child.try_wait().unwrap() {
                panic!("pgbouncer exited with {status}:\n{}", bouncer.log());
            }
            assert!(
                Instant::now() < deadline,
                "pgbouncer not listening in 10 s:\n{}",
                bouncer.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        bouncer
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `postgres://user:password@127.0.0.1:port/database` through pgbouncer.
    pub fn url(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("pgbouncer.log")).unwrap_or_default()
    }
}

impl Drop for Pgbouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
