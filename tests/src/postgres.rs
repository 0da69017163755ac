//! A throwaway PostgreSQL 15 configured like a production server: Debian's binaries, run as
//! the unprivileged `postgres` user (PostgreSQL refuses root) in a temp dir that user owns,
//! listening on loopback only (127.0.0.1, and ::1 when the host has it), stopped on Drop.
//!
//! With `PgOptions::tls` it serves TLS with a server certificate for 127.0.0.1, ::1 and
//! `localhost` signed by a test CA (`ca_pem_path`), so clients can use `sslmode=verify-full`.
//! Roles can be created with SCRAM, md5 or cleartext `password` authentication, each with its
//! own pg_hba.conf line, because the agent's upstream login is tested against all three.
//!
//! Client programs (psql, pgbench, pg_dump, pg_restore) run with `run_client` as any uid and,
//! optionally, inside a test cgroup so that their connects meet the agent's kernel hooks.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The superuser's password (TCP connections use scram-sha-256).
pub const SUPERUSER_PASSWORD: &str = "e2e-superuser";

/// How a server is set up. `Default` is what `Postgres::start` uses: no TLS.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `ssl = on` with a test CA's server certificate for 127.0.0.1, ::1 and localhost.
    pub tls: bool,
    /// Only `hostssl` lines in pg_hba.conf: a plaintext TCP login is refused. Needs `tls`.
    pub require_tls: bool,
    /// Enough for 1,000 idle clients through the agent plus a pgbench -c16 and a pooler.
    pub max_connections: u32,
    pub shared_buffers: &'static str,
    /// `log_connections`: which pg_hba line and method authenticated each login. Benches turn
    /// it off so the log does not grow with every pgbench -C connection.
    pub log_connections: bool,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            tls: false,
            require_tls: false,
            max_connections: 1100,
            // The pgbench -s 10 data set (about 160 MB) fits, so benches measure the
            // protocol path rather than buffer replacement.
            shared_buffers: "256MB",
            log_connections: true,
        }
    }
}

/// How a role's password is stored and checked (its pg_hba.conf method).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PasswordAuth {
    /// `scram-sha-256`, the password stored as a SCRAM secret.
    Scram,
    /// `md5`, the password stored as an md5 hash (with a SCRAM secret the server would
    /// silently upgrade the exchange to SCRAM).
    Md5,
    /// `password`: the client sends the password in clear; stored as a SCRAM secret.
    Cleartext,
}

impl PasswordAuth {
    fn hba_method(self) -> &'static str {
        match self {
            PasswordAuth::Scram => "scram-sha-256",
            PasswordAuth::Md5 => "md5",
            PasswordAuth::Cleartext => "password",
        }
    }

    fn password_encryption(self) -> &'static str {
        match self {
            PasswordAuth::Md5 => "md5",
            PasswordAuth::Scram | PasswordAuth::Cleartext => "scram-sha-256",
        }
    }
}

pub struct Postgres {
    pub dir: tempfile::TempDir,
    pub port: u16,
    data: PathBuf,
    socket_dir: PathBuf,
    options: PgOptions,
    ipv6: bool,
    /// pg_hba.conf lines of the roles made by `create_role`, before the generic lines.
    role_hba_lines: Mutex<Vec<String>>,
}

pub fn bin_dir() -> PathBuf {
    std::env::var_os("PORTCULLIS_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}

/// What is missing for this harness, if anything (for `crate::prerequisites_met`).
pub fn missing_prerequisite() -> Option<String> {
    if !crate::is_root() {
        return Some("the PostgreSQL harness needs root (it runs the server as `postgres`)".into());
    }
    if !bin_dir().join("initdb").is_file() {
        return Some(format!(
            "{} has no initdb: run `cargo xtask setup` (installs postgresql)",
            bin_dir().display()
        ));
    }
    if postgres_ids_opt().is_none() {
        return Some("no `postgres` user: run `cargo xtask setup` (installs postgresql)".into());
    }
    if Command::new("openssl").arg("version").output().is_err() {
        return Some("no `openssl` CLI: run `cargo xtask setup`".into());
    }
    None
}

fn postgres_ids_opt() -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:"))?;
    let f: Vec<&str> = line.split(':').collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

/// The uid and gid of the `postgres` account.
pub fn postgres_ids() -> (u32, u32) {
    postgres_ids_opt().expect("no `postgres` user: run `cargo xtask setup` (installs postgresql)")
}

fn as_postgres(program: &Path) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(program);
    c
}

/// A port free on 127.0.0.1 (and on ::1 when `v6`), for a server that binds both.
pub fn free_loopback_port(v6: bool) -> u16 {
    for _ in 0..50 {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !v6 || TcpListener::bind(("::1", port)).is_ok() {
            return port;
        }
    }
    panic!("no port free on both 127.0.0.1 and ::1 after 50 tries");
}

fn ipv6_loopback() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
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

fn chown(path: &Path, (uid, gid): (u32, u32)) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// A test CA and a server certificate it signs for 127.0.0.1, ::1 and localhost, made with
/// the openssl CLI into `dir`: ca.pem, ca.key, server.crt, server.key.
fn make_server_certificate(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the PostgreSQL TLS harness needs the openssl CLI");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
    ];
    run(&[
        &["req", "-x509"][..],
        &ec,
        &[
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=portcullis-e2e-postgres-ca",
        ],
    ]
    .concat());
    run(&[
        &["req"][..],
        &ec,
        &[
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    ]
    .concat());
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "server.ext",
        "-out",
        "server.crt",
    ]);
}

/// A server certificate that a client verifying against the test CA for 127.0.0.1 must
/// refuse, each for one reason.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BadCertificate {
    /// The right names, signed by another CA (`other-ca.pem`).
    WrongCa,
    /// Signed by the test CA for `db.invalid` and 127.0.0.2 only.
    WrongName,
    /// Signed by the test CA for the right names, expired a day ago.
    Expired,
}

impl BadCertificate {
    pub const ALL: [Self; 3] = [Self::WrongCa, Self::WrongName, Self::Expired];

    /// Its certificate and key under a `make_test_certificates` directory.
    pub fn files(self, dir: &Path) -> (PathBuf, PathBuf) {
        (
            dir.join(format!("{}.crt", self.stem())),
            dir.join(format!("{}.key", self.stem())),
        )
    }

    fn stem(self) -> &'static str {
        match self {
            Self::WrongCa => "wrong-ca",
            Self::WrongName => "wrong-name",
            Self::Expired => "expired",
        }
    }
}

/// The harness's certificates for a TLS receiver other than PostgreSQL (syslog, webhook):
/// `ca.pem`, `server.crt`/`server.key` for 127.0.0.1, ::1 and localhost, and for each
/// `BadCertificate` its `<stem>.crt`/`<stem>.key` (`BadCertificate::files`).
pub fn make_test_certificates(dir: &Path) {
    make_server_certificate(dir);
    make_bad_certificates(dir);
}

/// Next to the good certificate in `dir`: another CA and, for each `BadCertificate`, a
/// `<stem>.crt` and `<stem>.key`.
fn make_bad_certificates(dir: &Path) {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("the PostgreSQL TLS harness needs the openssl CLI");
        assert!(out.status.success(), "openssl {args:?}: {out:?}");
    };
    let ec = "ec_paramgen_curve:P-256";
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        ec,
        "-nodes",
        "-keyout",
        "other-ca.key",
        "-out",
        "other-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=portcullis-e2e-other-ca",
    ]);
    let good_names = "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost";
    // (stem, signing CA, names, days): -days -1 puts notAfter a day in the past.
    let certs = [
        ("wrong-ca", "other-ca", good_names, "2"),
        (
            "wrong-name",
            "ca",
            "subjectAltName=DNS:db.invalid,IP:127.0.0.2",
            "2",
        ),
        ("expired", "ca", good_names, "-1"),
    ];
    for (stem, ca, names, days) in certs {
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            ec,
            "-nodes",
            "-keyout",
            &format!("{stem}.key"),
            "-out",
            &format!("{stem}.csr"),
            "-subj",
            "/CN=portcullis-e2e-bad",
        ]);
        std::fs::write(
            dir.join(format!("{stem}.ext")),
            format!(
                "{names}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
                 extendedKeyUsage=serverAuth\n"
            ),
        )
        .unwrap();
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{stem}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-days",
            days,
            "-extfile",
            &format!("{stem}.ext"),
            "-out",
            &format!("{stem}.crt"),
        ]);
    }
}

impl Postgres {
    /// initdb and start without TLS; `database` is created.
    pub fn start(database: &str) -> Self {
        let pg = Self::start_with(PgOptions::default());
        pg.create_database(database, None);
        pg
    }

    /// initdb and start with `options`. Only the superuser's `postgres` database exists.
    pub fn start_with(options: PgOptions) -> Self {
        assert!(
            options.tls || !options.require_tls,
            "require_tls needs tls = true"
        );
        let ids = postgres_ids();
        let dir = tempfile::Builder::new()
            .prefix("portcullis-pg-")
            .tempdir()
            .unwrap();
        chown(dir.path(), ids);
        // Clients run as other uids read the CA below; the data dir stays 0700.
        chmod(dir.path(), 0o711);
        let data = dir.path().join("data");
        let socket_dir = dir.path().join("sock");
        std::fs::create_dir(&socket_dir).unwrap();
        chown(&socket_dir, ids);
        let pwfile = dir.path().join("pw");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).unwrap();
        chown(&pwfile, ids);
        chmod(&pwfile, 0o600);
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
        let _ = std::fs::remove_file(&pwfile);
        let ipv6 = ipv6_loopback();
        let pg = Self {
            port: free_loopback_port(ipv6),
            dir,
            data,
            socket_dir,
            options,
            ipv6,
            role_hba_lines: Mutex::new(Vec::new()),
        };
        pg.write_config();
        pg.write_hba();
        pg.start_server();
        pg
    }

    fn tls_dir(&self) -> PathBuf {
        self.dir.path().join("tls")
    }

    /// Appends this harness's settings to postgresql.conf, so `start_server` after a
    /// `stop_server` keeps them.
    fn write_config(&self) {
        let listen = if self.ipv6 {
            "127.0.0.1,::1"
        } else {
            "127.0.0.1"
        };
        let o = &self.options;
        let mut conf = format!(
            "\n# portcullis e2e harness\n\
             listen_addresses = '{listen}'\n\
             port = {port}\n\
             unix_socket_directories = '{sock}'\n\
             max_connections = {max}\n\
             shared_buffers = {shared}\n\
             fsync = off\n\
             full_page_writes = off\n\
             log_connections = {log}\n\
             log_line_prefix = '%m [%p] %u@%d '\n",
            port = self.port,
            sock = self.socket_dir.display(),
            max = o.max_connections,
            shared = o.shared_buffers,
            log = if o.log_connections { "on" } else { "off" },
        );
        if o.tls {
            let tls = self.tls_dir();
            std::fs::create_dir(&tls).unwrap();
            chmod(&tls, 0o755);
            make_server_certificate(&tls);
            let ids = postgres_ids();
            for name in ["server.crt", "server.key"] {
                chown(&tls.join(name), ids);
            }
            chmod(&tls.join("server.key"), 0o600);
            chmod(&tls.join("ca.key"), 0o600);
            chmod(&tls.join("ca.pem"), 0o644);
            chmod(&tls.join("server.crt"), 0o644);
            conf.push_str(&format!(
                "ssl = on\nssl_cert_file = '{}'\nssl_key_file = '{}'\n",
                tls.join("server.crt").display(),
                tls.join("server.key").display()
            ));
        }
        let path = self.data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(&conf);
        std::fs::write(&path, text).unwrap();
    }

    /// pg_hba.conf: local trust for the superuser only; per-role lines; then scram-sha-256
    /// for everyone over TCP on loopback (`hostssl` only under `require_tls`).
    fn write_hba(&self) {
        let kind = if self.options.require_tls {
            "hostssl"
        } else {
            "host"
        };
        let mut text = String::from(
            "# portcullis e2e harness\n\
             # TYPE   DATABASE USER     ADDRESS        METHOD\n\
             local    all      postgres                trust\n",
        );
        for line in self.role_hba_lines.lock().unwrap().iter() {
            text.push_str(line);
            text.push('\n');
        }
        for net in self.networks() {
            text.push_str(&format!(
                "{kind:<8} all      all      {net:<14} scram-sha-256\n"
            ));
        }
        let path = self.data.join("pg_hba.conf");
        std::fs::write(&path, text).unwrap();
        chown(&path, postgres_ids());
    }

    fn networks(&self) -> Vec<&'static str> {
        if self.ipv6 {
            vec!["127.0.0.1/32", "::1/128"]
        } else {
            vec!["127.0.0.1/32"]
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server also listens on [::1]:port.
    pub fn listens_on_v6(&self) -> bool {
        self.ipv6
    }

    /// The test CA that signed the server certificate (readable by every uid).
    pub fn ca_pem_path(&self) -> PathBuf {
        assert!(self.options.tls, "this server was started without TLS");
        self.tls_dir().join("ca.pem")
    }

    /// Serves `bad` in place of the good certificate (made on first use), from the next
    /// connection on; `serve_good_certificate` puts the good one back.
    pub fn serve_bad_certificate(&self, bad: BadCertificate) {
        let tls = self.tls_dir();
        if !tls.join("good.crt").exists() {
            make_bad_certificates(&tls);
            std::fs::copy(tls.join("server.crt"), tls.join("good.crt")).unwrap();
            std::fs::copy(tls.join("server.key"), tls.join("good.key")).unwrap();
        }
        self.swap_certificate(bad.stem());
    }

    /// A second certificate the test CA signs for 127.0.0.1, ::1 and localhost, with its
    /// own key (for a relay that terminates TLS in the server's place): (certificate, key),
    /// both readable by every uid.
    pub fn issue_impostor_certificate(&self) -> (PathBuf, PathBuf) {
        let tls = self.tls_dir();
        let run = |args: &[&str]| {
            let out = Command::new("openssl")
                .args(args)
                .current_dir(&tls)
                .output()
                .expect("the PostgreSQL TLS harness needs the openssl CLI");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "impostor.key",
            "-out",
            "impostor.csr",
            "-subj",
            "/CN=localhost",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "impostor.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "server.ext",
            "-out",
            "impostor.crt",
        ]);
        let (crt, key) = (tls.join("impostor.crt"), tls.join("impostor.key"));
        chmod(&crt, 0o644);
        chmod(&key, 0o644);
        (crt, key)
    }

    pub fn serve_good_certificate(&self) {
        self.swap_certificate("good");
    }

    /// PostgreSQL rereads its certificate and key on reload (SIGHUP).
    fn swap_certificate(&self, stem: &str) {
        let tls = self.tls_dir();
        let ids = postgres_ids();
        for (from, to) in [("crt", "server.crt"), ("key", "server.key")] {
            std::fs::copy(tls.join(format!("{stem}.{from}")), tls.join(to)).unwrap();
            chown(&tls.join(to), ids);
        }
        chmod(&tls.join("server.key"), 0o600);
        self.reload();
    }

    /// `postgres://user:password@127.0.0.1:port/database` (for tokio-postgres and psycopg;
    /// the harness's names and passwords need no percent-encoding).
    pub fn url(&self, user: &str, password: &str, database: &str) -> String {
        format!(
            "postgres://{user}:{password}@127.0.0.1:{}/{database}",
            self.port
        )
    }

    /// The superuser over TCP with its password, database `postgres`.
    pub fn superuser_url(&self) -> String {
        self.url("postgres", SUPERUSER_PASSWORD, "postgres")
    }

    /// A libpq keyword/value string for 127.0.0.1 without a password; append
    /// `sslmode=…` and the like as needed.
    pub fn conninfo(&self, user: &str, database: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user={user} dbname={database}",
            self.port
        )
    }

    /// `conninfo` that verifies the server certificate and its name against the test CA.
    pub fn conninfo_verify_full(&self, user: &str, database: &str) -> String {
        format!(
            "{} sslmode=verify-full sslrootcert={}",
            self.conninfo(user, database),
            self.ca_pem_path().display()
        )
    }

    pub fn create_database(&self, name: &str, owner: Option<&str>) {
        check_identifier(name);
        let sql = match owner {
            Some(owner) => {
                check_identifier(owner);
                format!("CREATE DATABASE {name} OWNER {owner}")
            }
            None => format!("CREATE DATABASE {name}"),
        };
        self.psql("postgres", &sql);
    }

    /// A login role whose password is stored and checked as `auth` says; its own pg_hba.conf
    /// lines go before the generic ones, and the server has reloaded them when this returns.
    pub fn create_role(&self, name: &str, password: &str, auth: PasswordAuth) {
        check_identifier(name);
        self.psql(
            "postgres",
            &format!(
                "SET password_encryption = '{}'; CREATE ROLE {name} LOGIN PASSWORD '{}'",
                auth.password_encryption(),
                password.replace('\'', "''")
            ),
        );
        let kind = if self.options.require_tls {
            "hostssl"
        } else {
            "host"
        };
        {
            let mut lines = self.role_hba_lines.lock().unwrap();
            for net in self.networks() {
                lines.push(format!(
                    "{kind:<8} all      {name:<8} {net:<14} {}",
                    auth.hba_method()
                ));
            }
        }
        self.write_hba();
        self.reload();
    }

    /// `pg_reload_conf()`, then waits until new backends see the reloaded files (the
    /// postmaster rereads them when it handles the signal, not when the call returns).
    pub fn reload(&self) {
        let load_time = || self.psql("postgres", "SELECT pg_conf_load_time()");
        let before = load_time();
        self.psql("postgres", "SELECT pg_reload_conf()");
        let deadline = Instant::now() + Duration::from_secs(10);
        while load_time() == before {
            assert!(
                Instant::now() < deadline,
                "the server did not reload its configuration in 10 s:\n{}",
                self.server_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let errors = self.psql(
            "postgres",
            "SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL",
        );
        assert_eq!(errors.trim(), "0", "pg_hba.conf has errors");
    }

    pub fn start_server(&self) {
        check(
            "pg_ctl start",
            as_postgres(&bin_dir().join("pg_ctl"))
                .arg("-D")
                .arg(&self.data)
                .arg("-l")
                .arg(self.dir.path().join("server.log"))
                .args(["-w", "-t", "30", "start"])
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

    pub fn server_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    pub fn log(&self) -> String {
        self.server_log()
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

/// Names go into SQL and pg_hba.conf unquoted.
fn check_identifier(name: &str) {
    assert!(
        !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
        "`{name}`: the harness takes only lower-case identifiers ([a-z0-9_])"
    );
}

/// Who runs a client program and where.
#[derive(Clone, Copy, Debug, Default)]
pub struct RunAs<'a> {
    /// None: the caller (root). Some(uid): uid and gid `uid`, no supplementary groups.
    pub uid: Option<u32>,
    /// Join this cgroup before exec, so the program's connects meet the agent's hooks.
    pub cgroup: Option<&'a Path>,
}

/// A client program from `bin_dir()` (psql, pgbench, pg_dump, pg_restore, …) set up to run as
/// `run_as` says, stdin closed. The caller adds arguments and environment.
pub fn client_command(program: &str, run_as: RunAs<'_>) -> Command {
    let mut c = Command::new(bin_dir().join(program));
    crate::exec_in_cgroup_as(&mut c, run_as.cgroup, run_as.uid);
    c.stdin(Stdio::null());
    c
}

/// Writes the agent's credentials file (0600) for `roles` (role, password) into `dir`.
#[allow(
    clippy::unwrap_used,
    reason = "a fixture that cannot be made fails the test"
)]
pub fn write_credentials(dir: &Path, roles: &[(&str, &str)]) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let text: String = roles
        .iter()
        .map(|(role, password)| format!("[roles.{role}]\npassword = \"{password}\"\n"))
        .collect();
    let path = dir.join("credentials.toml");
    std::fs::write(&path, text).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

impl Postgres {
    /// The agent's config for a `postgres` target named `db` on this server (verified with
    /// its CA, logging in with `credentials`), `more` lines added to its `[target.postgres]`.
    pub fn agent_target(&self, credentials: &Path, more: &str) -> String {
        format!(
            "[[target]]\nname = \"db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1\"\nport = {port}\n\
             [target.postgres]\nca_file = \"{ca}\"\ncredentials_file = \"{creds}\"\n{more}",
            port = self.port,
            ca = self.ca_pem_path().display(),
            creds = credentials.display(),
        )
    }
}

/// A PostgreSQL with TLS and the role and database `app` (password `app-secret`), and the
/// agent's credentials file for that role (0600) in `dir`: the target most approval and
/// console tests put behind the agent.
#[allow(
    clippy::unwrap_used,
    reason = "a fixture that cannot be made fails the test"
)]
pub fn app_server(dir: &Path) -> (Postgres, PathBuf) {
    let postgres = Postgres::start_with(PgOptions {
        tls: true,
        ..PgOptions::default()
    });
    postgres.create_role("app", "app-secret", PasswordAuth::Scram);
    postgres.create_database("app", Some("app"));
    let creds = write_credentials(dir, &[("app", "app-secret")]);
    (postgres, creds)
}

/// psql as `uid` from `cgroup` (through the agent's redirect) to `postgres`'s database `app`
/// as the role `app`, in plaintext (the agent adds TLS upstream), reading `script` from stdin
/// (closed after it), with `VERBOSITY=verbose` so SQLSTATEs show; its stdout and stderr piped.
#[allow(
    clippy::unwrap_used,
    reason = "a psql that cannot start fails the test"
)]
pub fn psql_app_script(
    postgres: &Postgres,
    cgroup: &Path,
    uid: u32,
    script: &str,
) -> std::process::Child {
    use std::io::Write;
    let conninfo = format!(
        "host=127.0.0.1 port={} user=app dbname=app sslmode=disable",
        postgres.port()
    );
    let mut psql = client_command(
        "psql",
        RunAs {
            uid: Some(uid),
            cgroup: Some(cgroup),
        },
    )
    .args(["-X", "-A", "-t", "-v", "VERBOSITY=verbose", "-d", &conninfo])
    .env("PGCONNECT_TIMEOUT", "10")
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    psql.stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    psql
}

/// Runs a client program to completion; `env` comes on top of this process's environment
/// (`PGPASSWORD`, `PGSSLMODE`, …).
pub fn run_client(program: &str, args: &[&str], env: &[(&str, &str)], run_as: RunAs<'_>) -> Output {
    client_command(program, run_as)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"))
}

/// The venv's Python with psycopg (made by `cargo xtask setup`), if it is there.
pub fn python_if_installed() -> Option<PathBuf> {
    let p = crate::workspace().join(".tools/venv/bin/python");
    p.exists().then_some(p)
}

/// `<repo>/.tools/venv/bin/python`, which has psycopg.
pub fn python() -> PathBuf {
    python_if_installed().unwrap_or_else(|| {
        panic!(
            "{} is missing: run `cargo xtask setup` (it creates the venv with psycopg)",
            crate::workspace().join(".tools/venv/bin/python").display()
        )
    })
}

/// Python for a raw protocol client: `message()` returns the next backend message of the
/// socket `s` as (type, body), and calls the script's own `closed()` when the server (or
/// the agent) closes first. Scripts define `s` and `closed` and put this after their imports.
pub const PY_MESSAGE_READER: &str = r#"
buf = b''
def message():
    global buf
    while True:
        if len(buf) >= 5:
            n = struct.unpack('!I', buf[1:5])[0]
            if len(buf) >= n + 1:
                m, buf = buf[:n + 1], buf[n + 1:]
                return m[:1], m[5:]
        data = s.recv(65536)
        if not data:
            closed()
        buf += data
"#;

/// A raw protocol session (python3, no driver) on 127.0.0.1:`port` as user and database
/// `app`: it prints its BackendKeyData as JSON, then runs each stdin line as a simple query,
/// printing `sent` and then `ok <first column>` or `error <sqlstate>`. `quit` (or the end
/// of stdin) sends a Terminate and prints `bye`.
const RAW_SESSION: &str = r#"
import json, socket, struct, sys
s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=60)
body = b'user\0app\0database\0app\0\0'
s.sendall(struct.pack('!II', 8 + len(body), 196608) + body)
def closed():
    raise SystemExit('closed')
{PY_MESSAGE_READER}
while True:
    t, b = message()
    if t == b'K':
        print(json.dumps({'pid': struct.unpack('!I', b[:4])[0], 'secret': b[4:].hex()}), flush=True)
    if t == b'Z':
        break
for line in sys.stdin:
    if line.strip() == 'quit':
        break
    q = line.strip().encode() + b'\0'
    s.sendall(b'Q' + struct.pack('!I', 4 + len(q)) + q)
    print('sent', flush=True)
    outcome = 'ok'
    while True:
        t, b = message()
        if t == b'E':
            outcome = 'error ' + [f[1:].decode() for f in b.split(b'\0') if f[:1] == b'C'][0]
        if t == b'D':
            outcome = 'ok ' + b[6:].decode()
        if t == b'Z':
            break
    print(outcome, flush=True)
s.sendall(b'X\0\0\0\4')
s.close()
print('bye', flush=True)
"#;

/// A CancelRequest with `argv[2]` (pid) and `argv[3]` (secret, hex) to 127.0.0.1:`argv[1]`;
/// it waits for the server (or the agent) to close.
const RAW_CANCEL: &str = r#"
import socket, struct, sys
c = socket.create_connection(('127.0.0.1', int(sys.argv[1])), timeout=10)
c.sendall(struct.pack('!III', 16, 80877102, int(sys.argv[2])) + bytes.fromhex(sys.argv[3]))
c.recv(1)
"#;

/// [`RAW_SESSION`] run as `uid` in `cgroup`, so its connect meets the agent's kernel hooks.
pub struct RawSession {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::io::Lines<std::io::BufReader<std::process::ChildStdout>>,
    /// The BackendKeyData the session was given: `{"pid": …, "secret": "<hex>"}`.
    pub key: serde_json::Value,
}

impl RawSession {
    pub fn start(port: u16, cgroup: Option<&Path>, uid: Option<u32>) -> Self {
        let mut command = Command::new(python());
        crate::exec_in_cgroup_as(&mut command, cgroup, uid);
        let mut child = command
            .args([
                "-c",
                &RAW_SESSION.replace("{PY_MESSAGE_READER}", PY_MESSAGE_READER),
                &port.to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting the raw protocol session: {e}"));
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            panic!("the raw protocol session has no pipes");
        };
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stdout));
        let first = lines.next().and_then(Result::ok).unwrap_or_default();
        let key = serde_json::from_str(&first)
            .unwrap_or_else(|e| panic!("the session's first line is not its key ({e}): {first:?}"));
        Self {
            child,
            stdin,
            lines,
            key,
        }
    }

    /// The backend pid of the key.
    pub fn pid(&self) -> u64 {
        self.key["pid"].as_u64().unwrap_or_default()
    }

    /// The secret of the key, hex.
    pub fn secret(&self) -> String {
        self.key["secret"].as_str().unwrap_or_default().to_string()
    }

    /// Sends one line: a query, or `quit`.
    pub fn send(&mut self, line: &str) {
        use std::io::Write;
        writeln!(self.stdin, "{line}")
            .and_then(|()| self.stdin.flush())
            .unwrap_or_else(|e| panic!("writing to the raw protocol session: {e}"));
    }

    /// The next line it printed.
    pub fn line(&mut self) -> String {
        match self.lines.next() {
            Some(Ok(line)) => line,
            other => panic!("the raw protocol session ended: {other:?}"),
        }
    }

    /// Ends the session with a Terminate and waits for the process.
    pub fn quit(mut self) {
        self.send("quit");
        assert_eq!(self.line(), "bye");
        let _ = self.child.wait();
    }
}

/// Sends a CancelRequest for `pid` with `secret` (hex) as `uid` in `cgroup`.
pub fn raw_cancel(port: u16, cgroup: Option<&Path>, uid: Option<u32>, pid: u64, secret: &str) {
    let mut command = Command::new(python());
    crate::exec_in_cgroup_as(&mut command, cgroup, uid);
    let out = command
        .args([
            "-c",
            RAW_CANCEL,
            &port.to_string(),
            &pid.to_string(),
            secret,
        ])
        .output()
        .unwrap_or_else(|e| panic!("running the cancel request: {e}"));
    assert!(
        out.status.success(),
        "the cancel request failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
