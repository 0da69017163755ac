//! `cargo xtask demo`: the main job on embedded defaults. A small web server listens on
//! 127.0.0.80:8080 and a PostgreSQL on a loopback port; the agent protects both, and an
//! unchanged `curl` and `psql` run as the unprivileged user `nobody` are redirected through
//! the proxy without knowing it: psql is never given a password, its statements are decided
//! one by one, and card numbers are masked in its results. Then `ssh` to a local sshd: the
//! user holds no key for it, the agent logs in with a certificate it signs, the command is
//! decided by policy, and the shell session is recorded and replayed (`portcullis replay`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::step;

const DEMO_CONFIG: &str = include_str!("../../packaging/demo.toml");
const DEMO_POLICY: &str = r#"@id("engineers-reach-demo")
@description("Engineers may connect to the demo targets")
permit (
    principal in Portcullis::Group::"engineering",
    action == Portcullis::Action::"connect",
    resource
)
when { resource.hasTag("environment") && resource.getTag("environment") == "demo" };

@id("engineers-query-demo-masked")
@description("Engineers may run statements on the demo database; card numbers are masked")
@mask("cards")
permit (
    principal in Portcullis::Group::"engineering",
    action == Portcullis::Action::"query",
    resource
)
when { resource.hasTag("environment") && resource.getTag("environment") == "demo" };

@id("no-drop-database")
@description("Nobody drops a database through the bastion")
forbid (principal, action == Portcullis::Action::"query", resource)
when { context.command == "DROP DATABASE" };

@id("engineers-ssh-demo")
@description("Engineers may run commands and shells on the demo host")
permit (
    principal in Portcullis::Group::"engineering",
    action in [Portcullis::Action::"ssh_exec", Portcullis::Action::"ssh_shell"],
    resource
)
when { resource.hasTag("environment") && resource.getTag("environment") == "demo" };
"#;

const DEMO_MASKING: &str = r#"[profiles.cards]
description = "Card numbers wherever they appear"
[[profiles.cards.rules]]
detector = "card_number"
mask = "partial"
keep_last = 4
"#;

/// The demo database's role; its password lives only in the agent's credentials file.
const DB_PASSWORD: &str = "demo-app-password";

/// In /run, where only root creates entries: a user cannot have made it first and planted
/// policies, credentials or a state directory of their own (as in /tmp).
const DEMO_DIR: &str = "/run/portcullis-demo";
const SOCKET: &str = "/run/portcullis-demo/control.sock";
const SERVER: &str = "127.0.0.80:8080";
const CGROUP: &str = "portcullis-demo";
/// The demo's sshd (Debian's, with its own config) and the account the agent logs in as.
const SSHD_PORT: u16 = 2291;
const SSH_USER: &str = "pcdemo";

pub fn run(bin: &Path) -> Result<()> {
    if !crate::setup::is_root() {
        bail!("the demo attaches eBPF programs and needs root");
    }
    let cgroup = crate::cgroup2_root()?.join(CGROUP);
    fresh_demo_dir(Path::new(DEMO_DIR))?;

    step(&format!(
        "starting a small web server on {SERVER} (the protected destination)"
    ));
    let listener = TcpListener::bind(SERVER).with_context(|| format!("binding {SERVER}"))?;
    std::thread::spawn(move || serve_http(listener));

    step("starting a local PostgreSQL 15 (TLS, SCRAM) with a `customers` table");
    let pg = portcullis_e2e::postgres::Postgres::start_with(portcullis_e2e::postgres::PgOptions {
        tls: true,
        ..Default::default()
    });
    pg.create_role(
        "app",
        DB_PASSWORD,
        portcullis_e2e::postgres::PasswordAuth::Scram,
    );
    pg.create_database("app", Some("app"));
    pg.psql(
        "app",
        "SET ROLE app; CREATE TABLE customers (id int PRIMARY KEY, name text, card text);
         INSERT INTO customers VALUES (1, 'Ada', '4111 1111 1111 1111'), (2, 'Bob', '5500-0000-0000-0004');",
    );
    println!("PostgreSQL on 127.0.0.1:{}", pg.port());
    let credentials = PathBuf::from(DEMO_DIR).join("credentials.toml");
    std::fs::write(
        &credentials,
        format!("[roles.app]\npassword = \"{DB_PASSWORD}\"\n"),
    )?;
    std::fs::set_permissions(
        &credentials,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;

    let ssh_dir = PathBuf::from(DEMO_DIR).join("sshd");
    let upstream_known_hosts = prepare_sshd(&ssh_dir)?;

    step("starting a local OpenID Provider (oidc-provider under Node.js; users alice and bob)");
    let provider =
        portcullis_e2e::oidc::OidcProvider::start(portcullis_e2e::oidc::OidcOptions::default());
    println!("issuer: {}", provider.issuer());

    step("starting the agent with the demo config, the local provider as its issuer");
    // The embedded demo config, with the provider's address instead of Unix-only identity.
    let demo = DEMO_CONFIG
        .split("[insecure]")
        .next()
        .unwrap_or(DEMO_CONFIG);
    let policies = PathBuf::from(DEMO_DIR).join("policies");
    std::fs::create_dir_all(&policies)?;
    std::fs::write(policies.join("demo.cedar"), DEMO_POLICY)?;
    std::fs::write(policies.join("masking.toml"), DEMO_MASKING)?;
    println!(
        "policy ({}):\n{DEMO_POLICY}",
        policies.join("demo.cedar").display()
    );
    let config_path = PathBuf::from(DEMO_DIR).join("portcullis.toml");
    std::fs::write(
        &config_path,
        format!(
            "{demo}\n[[target]]\nname = \"demo-db\"\nprotocol = \"postgres\"\naddress = \"127.0.0.1\"\nport = {}\nlabels = {{ environment = \"demo\" }}\n\
             [target.postgres]\nca_file = \"{}\"\ncredentials_file = \"{}\"\n\
             [[target]]\nname = \"demo-ssh\"\nprotocol = \"ssh\"\naddress = \"127.0.0.1\"\nport = {SSHD_PORT}\n\
             labels = {{ environment = \"demo\" }}\n\
             [target.ssh]\nhost_names = [\"demo-ssh\"]\nknown_hosts_file = \"{}\"\n\
             [identity]\nissuer = \"{}\"\n\
             # The demo's provider serves plain http on loopback.\n\
             [insecure]\nallow_plaintext_loopback = true\n",
            pg.port(),
            pg.ca_pem_path().display(),
            credentials.display(),
            upstream_known_hosts.display(),
            provider.issuer()
        ),
    )?;
    let log_path = PathBuf::from(DEMO_DIR).join("agent.log");
    let log = std::fs::File::create(&log_path)?;
    let mut agent = Command::new(bin)
        .args(["agent", "--config"])
        .arg(&config_path)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the agent")?;
    let result = demo_steps(bin, &cgroup, &mut agent, &log_path, &provider, pg.port());

    step("cleaning up: stopping the agent and detaching enforcement");
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
    let _ = Command::new(bin)
        .args(["agent", "--demo", "--detach"])
        .status();
    let _ = std::fs::remove_dir(&cgroup);
    result
}

#[allow(
    clippy::indexing_slicing,
    reason = "serde_json::Value indexing yields Null, it never panics"
)]
fn demo_steps(
    bin: &Path,
    cgroup: &Path,
    agent: &mut Child,
    log_path: &Path,
    provider: &portcullis_e2e::oidc::OidcProvider,
    pg_port: u16,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !Path::new(SOCKET).exists() {
        if let Some(status) = agent.try_wait()? {
            let log = std::fs::read_to_string(log_path).unwrap_or_default();
            bail!("the agent exited with {status}:\n{log}");
        }
        if Instant::now() > deadline {
            bail!(
                "the agent did not become ready in 20 s; see {}",
                log_path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    step(&format!(
        "as user `nobody`, not logged in yet: curl http://{SERVER}/hello"
    ));
    let out = as_nobody_in(
        cgroup,
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            &format!("http://{SERVER}/hello"),
        ],
    )
    .output()
    .context("running curl")?;
    print!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        bail!("a connection without a login went through");
    }
    let events = export_events(bin);
    if let Some(reason) = events
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "connection.refused")
        .find_map(|v| v["reason"].as_str().map(str::to_string))
    {
        println!("the agent refused it: {reason}");
    }

    step("`nobody` runs `portcullis login` (OAuth device flow), exactly what a user sees:");
    let bin_str = bin.to_string_lossy().into_owned();
    let mut login = as_nobody_in(cgroup, &[&bin_str, "login", "--socket", SOCKET])
        .stdout(Stdio::piped())
        .spawn()
        .context("running portcullis login")?;
    let mut lines = BufReader::new(login.stdout.take().context("login output")?).lines();
    for line in lines.by_ref() {
        let line = line?;
        println!("  | {line}");
        if let Some(url) = line
            .trim()
            .strip_prefix("(or open ")
            .map(|r| r.trim_end_matches(" directly)").to_string())
        {
            println!(
                "  (the demo now plays the browser: it opens that page and signs in as alice)"
            );
            provider.complete_device_flow(&url, "alice")?;
            break;
        }
    }
    for line in lines {
        println!("  | {}", line?);
    }
    if !login.wait()?.success() {
        bail!("portcullis login failed");
    }

    step(&format!(
        "as user `nobody`, logged in, unchanged: curl http://{SERVER}/hello"
    ));
    let out = as_nobody_in(
        cgroup,
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-w",
            "curl (getpeername) says it is connected to %{remote_ip}:%{remote_port}\n",
            &format!("http://{SERVER}/hello"),
        ],
    )
    .output()
    .context("running curl")?;
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    if !out.status.success() {
        bail!("curl failed with {}", out.status);
    }

    step("a slower download stays open while we ask the agent what it sees (`portcullis status`)");
    let mut slow = as_nobody_in(
        cgroup,
        &[
            "curl",
            "-sS",
            "--max-time",
            "10",
            "-o",
            "/dev/null",
            &format!("http://{SERVER}/slow"),
        ],
    )
    .spawn()
    .context("running curl")?;
    std::thread::sleep(Duration::from_millis(1200));
    crate::run(Command::new(bin).args(["status", "--socket", SOCKET]))?;
    let _ = slow.wait();

    step(&format!(
        "as `nobody`, unchanged: psql -h 127.0.0.1 -p {pg_port} -U app app (no password given)"
    ));
    let ca = format!("{DEMO_DIR}/state/ca/ca.pem");
    // nobody must be able to read the CA certificate a verifying client needs.
    let public_ca = format!("{DEMO_DIR}/agent-ca.pem");
    std::fs::copy(&ca, &public_ca)?;
    std::fs::set_permissions(
        &public_ca,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    let psql = portcullis_e2e::postgres::bin_dir().join("psql");
    let psql = psql.to_string_lossy().into_owned();
    let conninfo = format!(
        "host=127.0.0.1 port={pg_port} user=app dbname=app sslmode=verify-full sslrootcert={public_ca}"
    );
    // One session, three statements (-e echoes each): the denial does not end the session.
    let transcript_path = PathBuf::from(DEMO_DIR).join("psql.out");
    let transcript = std::fs::File::create(&transcript_path)?;
    let out = as_nobody_in(
        cgroup,
        &[
            &psql,
            "-X",
            "-e",
            "-d",
            &conninfo,
            "-c",
            "SELECT current_user, name, card FROM customers ORDER BY id",
            "-c",
            "DROP DATABASE app",
            "-c",
            "SELECT 'the same session is still usable' AS after_the_denial",
        ],
    )
    .env("HOME", "/nonexistent")
    // Both streams into one file, so the error shows where psql met it.
    .stdout(transcript.try_clone()?)
    .stderr(transcript)
    .status()
    .context("running psql")?;
    print!("{}", std::fs::read_to_string(&transcript_path)?);
    if !out.success() {
        bail!("psql failed with {out}");
    }
    println!("(psql verified the agent's certificate for 127.0.0.1 with verify-full; the card numbers were masked in the stream)");

    step("what the agent recorded (connection events in the state directory)");
    // A connection's closed event is written once both directions have finished.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut events = String::new();
    while Instant::now() < deadline {
        events = export_events(bin);
        if events.matches("connection.opened").count()
            == events.matches("connection.closed").count()
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for line in events.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let kind = v["event"].as_str().unwrap_or("?");
        if kind.starts_with("statement.") {
            println!(
                "  {:<18} user {} as {} (uid {}) comm {:<6} [{}] {} `{}` -> {} {}",
                kind,
                v["identity"]["user"].as_str().unwrap_or("-"),
                v["identity"]["email"].as_str().unwrap_or("-"),
                v["origin"]["uid"],
                v["origin"]["comm"].as_str().unwrap_or("?"),
                v["target"].as_str().unwrap_or("?"),
                v["statement_class"].as_str().unwrap_or("?"),
                v["statement"].as_str().unwrap_or("?"),
                v["command_tag"]
                    .as_str()
                    .or(v["sqlstate"].as_str())
                    .unwrap_or(""),
                v["policy_ids"],
            );
            continue;
        }
        if !kind.starts_with("connection.") {
            continue;
        }
        println!(
            "  {:<18} user {} as {} (uid {}) pid {} comm {:<6} -> {} [{}] sent {} received {} {}",
            kind,
            v["identity"]["user"].as_str().unwrap_or("-"),
            v["identity"]["email"].as_str().unwrap_or("-"),
            v["origin"]["uid"],
            v["origin"]["pid"],
            v["origin"]["comm"].as_str().unwrap_or("?"),
            v["origin"]["destination"].as_str().unwrap_or("?"),
            v["target"].as_str().unwrap_or("?"),
            v["bytes_client_to_upstream"]
                .as_u64()
                .map_or("-".into(), |b| b.to_string()),
            v["bytes_upstream_to_client"]
                .as_u64()
                .map_or("-".into(), |b| b.to_string()),
            v["reason"].as_str().unwrap_or(""),
        );
    }
    step("the audit trail is hash-chained: `portcullis audit verify`");
    crate::run(Command::new(bin).args([
        "audit",
        "verify",
        "--dir",
        &format!("{DEMO_DIR}/state/audit"),
    ]))?;

    step("`portcullis whoami`, as nobody");
    crate::run(&mut as_nobody_in(
        cgroup,
        &[&bin_str, "whoami", "--socket", SOCKET],
    ))?;
    ssh_steps(bin, cgroup)?;
    println!("\nThe client never knew: it dialled {SERVER}, and its getpeername() still says so.");
    Ok(())
}

/// The sshd's account (password field `*`: sshd refuses a locked account even with a valid
/// certificate), its host key, and the known_hosts file the agent checks that key against.
fn prepare_sshd(dir: &Path) -> Result<PathBuf> {
    if !Path::new("/usr/sbin/sshd").exists() {
        bail!("Debian's openssh-server is missing (cargo xtask setup installs it)");
    }
    if !Command::new("id")
        .args(["-u", SSH_USER])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?
        .success()
    {
        crate::run(Command::new("useradd").args(["-m", "-s", "/bin/bash", SSH_USER]))?;
    }
    crate::run(Command::new("usermod").args(["-p", "*", SSH_USER]))?;
    std::fs::create_dir(dir)?;
    std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o711))?;
    crate::run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join("host_key")),
    )?;
    let host_pub = std::fs::read_to_string(dir.join("host_key.pub"))?;
    let known = dir.join("upstream_known_hosts");
    std::fs::write(&known, format!("[127.0.0.1]:{SSHD_PORT} {host_pub}"))?;
    Ok(known)
}

/// `ssh` as `nobody` (logged in as alice) to the demo's sshd through the agent: one command,
/// then a short shell whose recording is replayed.
#[allow(
    clippy::indexing_slicing,
    reason = "serde_json::Value indexing yields Null, it never panics"
)]
fn ssh_steps(bin: &Path, cgroup: &Path) -> Result<()> {
    let dir = PathBuf::from(DEMO_DIR).join("sshd");
    let config = format!("{DEMO_DIR}/portcullis.toml");
    step(&format!(
        "starting Debian's sshd on 127.0.0.1:{SSHD_PORT}: it trusts only the agent's user CA (TrustedUserCAKeys)"
    ));
    let sshd_config = dir.join("sshd_config");
    std::fs::write(
        &sshd_config,
        format!(
            "Port {SSHD_PORT}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\nPidFile none\n\
             TrustedUserCAKeys {DEMO_DIR}/state/ssh/user_ca.pub\nAuthorizedKeysFile none\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
             PermitRootLogin no\nAllowUsers {SSH_USER}\nLogLevel VERBOSE\n",
            dir = dir.display()
        ),
    )?;
    std::fs::create_dir_all("/run/sshd")?;
    let log_path = dir.join("sshd.log");
    let mut sshd = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&sshd_config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log_path)?)
        .spawn()
        .context("starting sshd")?;
    let result = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", SSHD_PORT)).is_err() {
            if sshd.try_wait()?.is_some() || Instant::now() > deadline {
                bail!(
                    "sshd did not listen: {}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // The client's only trust: the line the packages put in /etc/ssh/ssh_known_hosts.
        let line = Command::new(bin)
            .args(["ssh", "known-hosts", "--config", &config])
            .output()?;
        if !line.status.success() {
            bail!(
                "portcullis ssh known-hosts: {}",
                String::from_utf8_lossy(&line.stderr)
            );
        }
        let line = String::from_utf8(line.stdout)?;
        println!("portcullis ssh known-hosts:\n  {}", line.trim());
        let known = dir.join("known_hosts");
        std::fs::write(&known, &line)?;
        let client_config = dir.join("ssh_config");
        std::fs::write(
            &client_config,
            format!(
                "Host *\n  Port {SSHD_PORT}\n  User {SSH_USER}\n  UserKnownHostsFile {known}\n\
                 GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  BatchMode yes\n\
                 PubkeyAuthentication no\n  LogLevel ERROR\n",
                known = known.display()
            ),
        )?;
        for f in [&known, &client_config] {
            std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o644))?;
        }
        let ssh_config = client_config.to_string_lossy().into_owned();

        step(&format!(
            "as `nobody` (alice), no key anywhere: ssh {SSH_USER}@127.0.0.1 'hostname; id -un'"
        ));
        let out = as_nobody_in(
            cgroup,
            &["ssh", "-F", &ssh_config, "127.0.0.1", "hostname; id -un"],
        )
        .env("HOME", "/nonexistent")
        .output()
        .context("running ssh")?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        eprint!("{}", String::from_utf8_lossy(&out.stderr));
        if !out.status.success() {
            bail!(
                "ssh failed with {}; sshd said: {}",
                out.status,
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
        }
        let sshd_log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if let Some(accepted) = sshd_log
            .lines()
            .find(|l| l.contains("Accepted certificate ID"))
        {
            println!("the target's sshd logged: {accepted}");
        }

        step("as `nobody` (alice): a short interactive shell (ssh -tt), recorded by the agent");
        let mut shell = as_nobody_in(cgroup, &["ssh", "-tt", "-F", &ssh_config, "127.0.0.1"])
            .env("HOME", "/nonexistent")
            .env("TERM", "xterm")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("running ssh -tt")?;
        if let Some(mut stdin) = shell.stdin.take() {
            stdin.write_all(b"echo a recorded shell on $(hostname); uptime\n")?;
            std::thread::sleep(Duration::from_millis(500));
            stdin.write_all(b"exit\n")?;
        }
        let out = shell.wait_with_output()?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
        if !out.status.success() {
            bail!(
                "the shell failed with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }

        step("what the agent recorded for SSH (events of the one audit schema)");
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut shell_id = None;
        let mut recorded = None;
        while Instant::now() < deadline && recorded.is_none() {
            let events = export_events(bin);
            for v in events
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            {
                let kind = v["event"].as_str().unwrap_or("");
                if kind == "ssh.shell" {
                    shell_id = v["connection_id"].as_u64();
                }
                if kind == "recording.closed" && v["connection_id"].as_u64() == shell_id {
                    recorded = shell_id;
                }
            }
            if recorded.is_none() {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        for v in export_events(bin)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        {
            let kind = v["event"].as_str().unwrap_or("");
            if kind == "recording.closed" {
                println!(
                    "  {:<18} session {} recorded: {} bytes in {} chunks, SHA-256 {}",
                    kind,
                    v["connection_id"],
                    v["recording_bytes"],
                    v["recording_chunk"],
                    v["recording_sha256"].as_str().unwrap_or("?"),
                );
            } else if kind.starts_with("ssh.") {
                println!(
                    "  {:<18} {} as {} -> {} [{}] {} {}",
                    kind,
                    v["identity"]["email"].as_str().unwrap_or("-"),
                    v["ssh_user"].as_str().unwrap_or("-"),
                    v["target"].as_str().unwrap_or("?"),
                    v["channel"].as_str().unwrap_or(""),
                    v["command_line"].as_str().unwrap_or(""),
                    v["policy_ids"],
                );
            }
        }

        // Replayed from the audit store by session id, checked against the chain's chunk
        // hashes first; a build that records no shells says so instead of failing.
        match recorded {
            Some(id) => {
                step(&format!(
                    "portcullis replay {id} --speed 2 --idle-limit 0.5 (the recorded shell)"
                ));
                crate::run(Command::new(bin).args([
                    "replay",
                    &id.to_string(),
                    "--config",
                    &config,
                    "--speed",
                    "2",
                    "--idle-limit",
                    "0.5",
                ]))?;
                println!(
                    "\n(`asciinema play` plays the same file, in {DEMO_DIR}/state/audit/recordings/)"
                );
            }
            None => println!("no recording of the shell in the audit store: nothing to replay"),
        }
        Ok(())
    })();
    let _ = sshd.kill();
    let _ = sshd.wait();
    result
}

/// Empties (or creates) the demo's directory: root's own, 0711 so that `nobody` reaches the
/// control socket and the CA copy by name but lists and writes nothing. A directory that is
/// not root's, or a symlink, is refused rather than reused or removed: its owner may have
/// put policies or a state directory of their own in it.
fn fresh_demo_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.file_type().is_symlink() || !meta.is_dir() => {
            bail!("refusing to use {}: it is not a directory", dir.display())
        }
        Ok(meta) if meta.uid() != 0 => bail!(
            "refusing to use {}: it is owned by uid {}, not root, who may have put policies in it; remove it yourself",
            dir.display(),
            meta.uid()
        ),
        Ok(_) => std::fs::remove_dir_all(dir)
            .with_context(|| format!("emptying {}", dir.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", dir.display())),
    }
    // Not recursive: the parent must already exist, and is not ours to create.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))?;
    Ok(())
}

/// The agent's audit trail as NDJSON (`portcullis audit export`).
fn export_events(bin: &Path) -> String {
    Command::new(bin)
        .args([
            "audit",
            "export",
            "--dir",
            &format!("{DEMO_DIR}/state/audit"),
        ])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A command that joins the demo cgroup and drops to `nobody` before exec'ing the client.
fn as_nobody_in(cgroup: &Path, argv: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg("echo $$ > \"$0/cgroup.procs\" && exec setpriv --reuid=65534 --regid=65534 --clear-groups -- \"$@\"")
        .arg(cgroup)
        .args(argv)
        .stdin(Stdio::null());
    c
}

fn serve_http(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = answer(stream);
        });
    }
}

fn answer(mut stream: TcpStream) -> std::io::Result<()> {
    let peer = stream.peer_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut line = String::new();
    while reader.read_line(&mut line)? > 2 {
        line.clear();
    }
    if request_line.contains("/slow") {
        stream
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3000\r\nConnection: close\r\n\r\n")?;
        for _ in 0..3 {
            stream.write_all(&[b'.'; 1000])?;
            std::thread::sleep(Duration::from_millis(800));
        }
        return Ok(());
    }
    let body = format!(
        "hello from the protected server; it sees the connection coming from {peer} (the agent)\n"
    );
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn the_demo_directory_is_roots_own_and_a_planted_one_is_refused() {
        let base = std::env::temp_dir().join(format!("portcullis-demo-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir(&base).unwrap();
        let dir = base.join("demo");

        // Planted by someone else, with their own policies.
        std::fs::create_dir(&dir).unwrap();
        std::fs::write(
            dir.join("planted.cedar"),
            "permit (principal, action, resource);",
        )
        .unwrap();
        let root = std::fs::metadata(&base).unwrap().uid() == 0;
        if root {
            std::os::unix::fs::chown(&dir, Some(65534), Some(65534)).unwrap();
        }
        if !root || std::fs::metadata(&dir).unwrap().uid() != 0 {
            let err = fresh_demo_dir(&dir).unwrap_err().to_string();
            assert!(err.contains("not root"), "{err}");
            assert!(
                dir.join("planted.cedar").exists(),
                "a refused directory is left alone"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();

        // A symlink to somewhere else.
        std::os::unix::fs::symlink(&base, &dir).unwrap();
        let err = fresh_demo_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
        std::fs::remove_file(&dir).unwrap();

        if root {
            // Root's own: emptied and recreated 0711.
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("old"), "").unwrap();
            fresh_demo_dir(&dir).unwrap();
            let meta = std::fs::metadata(&dir).unwrap();
            assert_eq!((meta.uid(), meta.permissions().mode() & 0o777), (0, 0o711));
            assert!(!dir.join("old").exists());
        }
        std::fs::remove_dir_all(&base).unwrap();
    }
}
