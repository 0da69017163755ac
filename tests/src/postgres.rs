//! A throwaway PostgreSQL server for the central audit store tests: Debian's binaries,
//! run as the unprivileged `postgres` user (PostgreSQL refuses root) in a temp dir that user
//! owns, listening on 127.0.0.1 only, stopped on Drop.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The superuser's password (TCP connections use scram-sha-256).
pub const SUPERUSER_PASSWORD: &str = "e2e-superuser";

pub struct Postgres {
    pub dir: tempfile::TempDir,
    pub port: u16,
    data: PathBuf,
    socket_dir: PathBuf,
}

pub fn bin_dir() -> PathBuf {
    std::env::var_os("PORTCULLIS_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

fn postgres_ids() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = passwd
        .lines()
        .find(|l| l.starts_with("postgres:"))
        .expect("no `postgres` user: run `cargo xtask setup` (installs postgresql)");
    let f: Vec<&str> = line.split(':').collect();
    (f[2].parse().unwrap(), f[3].parse().unwrap())
}

fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn check(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Postgres {
    /// initdb and start; `database` is created.
    pub fn start(database: &str) -> Self {
        let (uid, gid) = postgres_ids();
        let dir = tempfile::Builder::new()
            .prefix("portcullis-pg-")
            .tempdir()
            .unwrap();
        std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&socket_dir).unwrap();
        std::os::unix::fs::chown(&socket_dir, Some(uid), Some(gid)).unwrap();
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).unwrap();
        std::os::unix::fs::chown(&pwfile, Some(uid), Some(gid)).unwrap();
        check(
            "initdb",
            as_postgres(&bin_dir().join("initdb"))
                .arg("-D")
                .arg(&data)
                .args([
                    "-U",
                    "postgres",
                    "--auth-local=trust",
                    "--auth-host=scram-sha-256",
                    "--no-sync",
                ])
                .arg(format!("--pwfile={}", pwfile.display()))
                .output()
                .unwrap(),
        );
        let pg = Self {
            dir,
            port: free_port(),
            data,
            socket_dir,
        };
        pg.start_server();
        pg.psql("postgres", &format!("CREATE DATABASE {database}"));
        pg
    }

    pub fn start_server(&self) {
        let opts = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off",
            self.port,
            self.socket_dir.display()
        );
        check(
            "pg_ctl start",
            as_postgres(&bin_dir().join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.dir.path().join("server.log"))
                .args(["-w", "-t", "30", "-o", &opts, "start"])
                .output()
                .unwrap(),
        );
    }

    pub fn stop_server(&self) {
        check(
            "pg_ctl stop",
            as_postgres(&bin_dir().join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .args(["-w", "-t", "30", "-m", "fast", "stop"])
                .output()
                .unwrap(),
        );
    }

    /// Runs SQL as the superuser over the Unix socket; returns unaligned tuples.
    pub fn psql(&self, database: &str, sql: &str) -> String {
        check(&format!("psql {sql}"), self.try_psql(database, sql))
    }

    pub fn try_psql(&self, database: &str, sql: &str) -> Output {
        as_postgres(&bin_dir().join("psql"))
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(&self.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                sql,
            ])
            .output()
            .unwrap()
    }

    /// Runs SQL as `user` over TCP to 127.0.0.1 with a password, as an agent would connect.
    pub fn psql_tcp(&self, user: &str, password: &str, database: &str, sql: &str) -> Output {
        Command::new(bin_dir().join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                user,
                "-d",
                database,
                "-c",
                sql,
            ])
            .env("PGPASSWORD", password)
            .output()
            .unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = as_postgres(&bin_dir().join("pg_ctl"))
            .arg("-D")
            .arg(&self.data)
            .args(["-w", "-t", "10", "-m", "immediate", "stop"])
            .output();
    }
}
