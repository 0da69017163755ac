//! SSH through the agent, end to end: Debian's sshd on a loopback port with its own config
//! (the agent's user CA in `TrustedUserCAKeys`, a test user whose password field is `*`),
//! the real kernel redirect, and the unchanged OpenSSH clients (`ssh`, `scp`, `sftp`),
//! `rsync` and `git`, run as an unprivileged local user whose only trust is the
//! `@cert-authority` line `portcullis ssh known-hosts` prints. Slots 200–239, and 186–189
//! for commands and shells that wait for approval (with the real OpenID Provider).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests: a failure is a test failure"
)]

use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use portcullis_e2e::{e2e_enabled, exec_in_cgroup_as, Agent, Slot, TestCgroup};
use serde_json::Value;

/// The account the agent logs in as upstream (a certificate principal).
const REMOTE_USER: &str = "pcssh";
/// The local account that runs the clients (OpenSSH needs a passwd entry for its uid).
const LOCAL_USER: &str = "pcsshc";

/// Shells, commands, sftp and scp, but no command that says "forbidden"; no forwarding.
const SSH_POLICY: &str = r#"
@id("ssh-work")
permit (
    principal,
    action in [
        Portcullis::Action::"ssh_shell",
        Portcullis::Action::"ssh_exec",
        Portcullis::Action::"ssh_sftp",
        Portcullis::Action::"ssh_scp"
    ],
    resource
)
when { resource.protocol == "ssh" };

@id("no-forbidden-commands")
forbid (principal, action == Portcullis::Action::"ssh_exec", resource)
when { context.command_line like "*forbidden*" };
"#;

fn sshd_available() -> bool {
    let problem = (!Path::new("/usr/sbin/sshd").exists())
        .then(|| "Debian's openssh-server is not installed (cargo xtask setup)".to_string());
    portcullis_e2e::prerequisites_met(problem)
}

fn enabled() -> bool {
    e2e_enabled() && sshd_available()
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Creates the two test accounts once (useradd holds a lock; tests run in parallel).
fn ensure_users() -> (u32, u32) {
    static ONCE: Mutex<Option<(u32, u32)>> = Mutex::new(None);
    let mut done = ONCE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(ids) = *done {
        return ids;
    }
    let uid = |name: &str| {
        let id = Command::new("id").args(["-u", name]).output().unwrap();
        if !id.status.success() {
            run(Command::new("useradd").args(["-m", "-s", "/bin/bash", name]));
        }
        // sshd refuses a locked account ("!") even with a valid certificate.
        run(Command::new("usermod").args(["-p", "*", name]));
        let id = run(Command::new("id").args(["-u", name]));
        String::from_utf8_lossy(&id.stdout)
            .trim()
            .parse::<u32>()
            .unwrap()
    };
    let ids = (uid(REMOTE_USER), uid(LOCAL_USER));
    *done = Some(ids);
    ids
}

fn keygen(path: &Path) -> String {
    let _ = std::fs::remove_file(path);
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path));
    std::fs::read_to_string(path.with_extension("pub")).unwrap()
}

/// Debian's sshd on 127.0.0.1:`port`, logging to a file.
struct Sshd {
    child: Child,
    log: PathBuf,
}

impl Sshd {
    fn start(dir: &Path, port: u16, user_ca: &Path) -> Self {
        std::fs::create_dir_all("/run/sshd").unwrap();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {key}\nPidFile none\n\
                 TrustedUserCAKeys {ca}\nAuthorizedKeysFile none\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPermitRootLogin no\n\
                 AllowUsers {REMOTE_USER}\nSubsystem sftp internal-sftp\n\
                 AcceptEnv LANG LC_* GIT_PROTOCOL\nAllowTcpForwarding yes\nLogLevel VERBOSE\n",
                key = dir.join("host_key").display(),
                ca = user_ca.display(),
            ),
        )
        .unwrap();
        let log = dir.join("sshd.log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "sshd did not listen: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's world. Fields drop in order: the agent (and its pins) first.
struct World {
    agent: Agent,
    sshd: Sshd,
    cg: TestCgroup,
    /// Readable by the client account: its ssh config, known_hosts and test files.
    files: tempfile::TempDir,
    port: u16,
    client_uid: u32,
}

struct Options<'a> {
    /// The agent's identity settings.
    identity: &'a str,
    /// The upstream host key the agent expects; None: the sshd's own.
    wrong_host_key: bool,
    /// More policies beside [`SSH_POLICY`].
    policy: &'a str,
    /// Policies instead of [`SSH_POLICY`].
    base_policy: &'a str,
    /// More `[target.ssh]` settings (guarded_shell, record_input).
    target_ssh: &'a str,
    /// The policy directory's masking.toml, if any.
    masking: &'a str,
    /// The policy directory's approvals.toml, if any.
    approvals: &'a str,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Self {
            identity: "[insecure]\nunix_identity_only = true\n",
            wrong_host_key: false,
            policy: "",
            base_policy: SSH_POLICY,
            target_ssh: "",
            masking: "",
            approvals: "",
        }
    }
}

impl World {
    fn new(name: &str, n: u8) -> Self {
        Self::with(name, n, Options::default())
    }

    fn with(name: &str, n: u8, o: Options<'_>) -> Self {
        assert!(
            (200..=239).contains(&n) || (186..=189).contains(&n),
            "the SSH suite owns slots 200-239 and, for approvals, 186-189"
        );
        let (_, client_uid) = ensure_users();
        let slot = Slot::new(n);
        let port = slot.server_port;
        let cg = TestCgroup::new(name);
        let files = tempfile::tempdir().unwrap();
        std::fs::set_permissions(files.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let sshd_dir = files.path().join("sshd");
        std::fs::create_dir(&sshd_dir).unwrap();
        std::fs::set_permissions(&sshd_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        let host_pub = keygen(&sshd_dir.join("host_key"));
        let expected = if o.wrong_host_key {
            keygen(&sshd_dir.join("other_key"))
        } else {
            host_pub
        };
        let upstream_known = sshd_dir.join("upstream_known_hosts");
        std::fs::write(&upstream_known, format!("[127.0.0.1]:{port} {expected}")).unwrap();
        let extra = format!(
            "{identity}[[target]]\nname = \"web\"\nprotocol = \"ssh\"\naddress = \"127.0.0.1\"\nport = {port}\n\
             [target.ssh]\nhost_names = [\"web.example\"]\nknown_hosts_file = \"{known}\"\n{target_ssh}",
            identity = o.identity,
            known = upstream_known.display(),
            target_ssh = o.target_ssh,
        );
        let mut agent = Agent::prepare(name, slot, &cg, &[], Some(&extra), &[]);
        std::fs::write(agent.dir.path().join("policies/ssh.cedar"), o.base_policy).unwrap();
        std::fs::write(agent.dir.path().join("policies/extra.cedar"), o.policy).unwrap();
        if !o.masking.is_empty() {
            std::fs::write(agent.dir.path().join("policies/masking.toml"), o.masking).unwrap();
        }
        if !o.approvals.is_empty() {
            std::fs::write(
                agent.dir.path().join("policies/approvals.toml"),
                o.approvals,
            )
            .unwrap();
        }
        agent.spawn();
        let user_ca = agent.dir.path().join("state/ssh/user_ca.pub");
        let sshd = Sshd::start(&sshd_dir, port, &user_ca);
        // The only trust the client has: the line the packages install.
        let line = run(Command::new(portcullis_e2e::agent_bin())
            .args(["ssh", "known-hosts", "--config"])
            .arg(&agent.config));
        let line = String::from_utf8(line.stdout).unwrap();
        assert!(line.starts_with("@cert-authority * ssh-ed25519 "), "{line}");
        std::fs::write(files.path().join("known_hosts"), &line).unwrap();
        std::fs::write(
            files.path().join("ssh_config"),
            format!(
                "Host *\n  Port {port}\n  User {REMOTE_USER}\n  UserKnownHostsFile {known}\n\
                 GlobalKnownHostsFile /dev/null\n  StrictHostKeyChecking yes\n  BatchMode yes\n\
                 PubkeyAuthentication no\n  PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n  GSSAPIAuthentication no\n  ControlMaster no\n",
                known = files.path().join("known_hosts").display(),
            ),
        )
        .unwrap();
        World {
            agent,
            sshd,
            cg,
            files,
            port,
            client_uid,
        }
    }

    fn config(&self) -> String {
        self.files.path().join("ssh_config").display().to_string()
    }

    /// `program` run as the client account inside the test cgroup (through the redirect).
    fn client(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        exec_in_cgroup_as(&mut c, Some(&self.cg.path), Some(self.client_uid));
        c.env("HOME", format!("/home/{LOCAL_USER}"))
            .current_dir(self.files.path())
            .stdin(Stdio::null());
        c
    }

    fn ssh(&self, args: &[&str]) -> Command {
        let mut c = self.client("ssh");
        c.args(["-F", &self.config()]).args(args);
        c
    }

    /// A directory the client account may write.
    fn client_dir(&self, name: &str) -> PathBuf {
        let d = self.files.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::os::unix::fs::chown(&d, Some(self.client_uid), Some(self.client_uid)).unwrap();
        d
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        self.agent.events_of(kind)
    }

    fn wait_event(&self, kind: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(e) = self.events(kind).into_iter().find(|e| pred(e)) {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no matching {kind} event: {:#?}\nagent log:\n{}",
                self.agent.events(),
                self.agent.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Runs `cmd` to its end, or kills it and fails the test after `limit`.
fn output_within(cmd: &mut Command, limit: Duration) -> Output {
    let out_file = tempfile::tempfile().unwrap();
    let err_file = tempfile::tempfile().unwrap();
    let mut child = cmd
        .stdout(out_file.try_clone().unwrap())
        .stderr(err_file.try_clone().unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |mut f: std::fs::File| {
        use std::io::{Read, Seek};
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    };
    Output {
        status,
        stdout: read(out_file),
        stderr: read(err_file),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn exec_exit_codes_and_stderr_pass_through_and_are_audited() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-exec", 200);
    let ok = w.ssh(&["127.0.0.1", "true"]).output().unwrap();
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}\n{}",
        text(&ok.stderr),
        w.agent.log()
    );
    let three = w.ssh(&["127.0.0.1", "exit 3"]).output().unwrap();
    assert_eq!(three.status.code(), Some(3), "{}", text(&three.stderr));
    let both = w
        .ssh(&["127.0.0.1", "echo out; echo err >&2; exit 0"])
        .output()
        .unwrap();
    assert_eq!(text(&both.stdout), "out\n");
    assert!(
        text(&both.stderr).contains("err\n"),
        "{}",
        text(&both.stderr)
    );
    // A command killed by a signal: the server's exit-signal reaches the client (ssh -v
    // logs each channel request it receives), and ssh exits 255 as it does direct.
    let killed = w.ssh(&["-v", "127.0.0.1", "kill -9 $$"]).output().unwrap();
    assert_eq!(killed.status.code(), Some(255));
    assert!(
        text(&killed.stderr).contains("rtype exit-signal"),
        "{}",
        text(&killed.stderr)
    );

    let exec = w.wait_event("ssh.exec", |e| e["command_line"] == "exit 3");
    assert_eq!(exec["ssh_user"], REMOTE_USER);
    assert_eq!(exec["protocol"], "ssh");
    assert_eq!(exec["decision"], "allow");
    let opened = w.wait_event("connection.opened", |_| true);
    // The target's own log names the person and the session: the certificate's key id.
    let id = opened["connection_id"].as_u64().unwrap();
    let log = w.sshd.log();
    assert!(
        log.contains(&format!("/{id}\"")) && log.contains("Accepted certificate ID"),
        "{log}"
    );
}

#[test]
fn exec_pipes_20_mb_both_ways_intact() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-pipe", 201);
    let input = w.files.path().join("input.bin");
    let mut data = vec![0u8; 20 << 20];
    // Not compressible, not periodic: a byte lost or reordered changes the result.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for b in &mut data {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    std::fs::write(&input, &data).unwrap();
    let started = Instant::now();
    let mut cmd = w.ssh(&["127.0.0.1", "cat"]);
    cmd.stdin(std::fs::File::open(&input).unwrap());
    // Both directions full at once is where a relay that lets one leg's loop wait on the
    // other deadlocks: bounded, so that shows as a failure rather than a hung suite.
    let out = output_within(&mut cmd, Duration::from_secs(90));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(out.stdout.len(), data.len());
    assert!(out.stdout == data, "the bytes came back changed");
    eprintln!("20 MB each way in {:?}", started.elapsed());
}

#[test]
fn interactive_shell_gets_a_pty_and_its_exit_status() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-shell", 202);
    let mut c = w.ssh(&["-tt", "127.0.0.1"]);
    let child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.as_ref().unwrap();
    std::io::Write::write_all(&mut stdin, b"tty; echo shell-$((6*7)); exit 7\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{stdout}\n{}",
        text(&out.stderr)
    );
    assert!(stdout.contains("shell-42"), "{stdout}");
    assert!(stdout.contains("/dev/pts/"), "no pty upstream: {stdout}");
    w.wait_event("ssh.shell", |e| e["ssh_user"] == REMOTE_USER);
}

#[test]
fn controlmaster_channels_share_one_connection_and_are_decided_each() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-mux", 212);
    let control = w.client_dir("mux").join("%C");
    let control = control.display().to_string();
    let mux = |cmd: &str| {
        w.ssh(&[
            "-o",
            "ControlMaster=auto",
            "-o",
            &format!("ControlPath={control}"),
            "-o",
            "ControlPersist=30",
            "127.0.0.1",
            cmd,
        ])
        .output()
        .unwrap()
    };
    assert_eq!(text(&mux("echo first").stdout), "first\n");
    assert_eq!(text(&mux("echo second").stdout), "second\n");
    let denied = mux("echo forbidden");
    assert_eq!(denied.status.code(), Some(1), "{}", text(&denied.stderr));
    assert_eq!(text(&mux("echo third").stdout), "third\n");
    w.wait_event("ssh.exec", |e| e["command_line"] == "echo third");
    let opened = w.events("connection.opened");
    assert_eq!(
        opened.len(),
        1,
        "one connection for every channel: {opened:#?}"
    );
    let id = &opened[0]["connection_id"];
    let execs = w.events("ssh.exec");
    assert_eq!(execs.len(), 3, "{execs:#?}");
    assert!(execs.iter().all(|e| &e["connection_id"] == id));
    w.wait_event("ssh.channel_denied", |e| {
        e["command_line"] == "echo forbidden"
    });
    // The background master ends with the agent's connection.
    let _ = w
        .ssh(&[
            "-o",
            &format!("ControlPath={control}"),
            "-O",
            "exit",
            "127.0.0.1",
        ])
        .output();
}

#[test]
fn host_certificate_is_trusted_for_its_names_only() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-hostcert", 203);
    let alias = w
        .ssh(&["-o", "HostKeyAlias=web.example", "127.0.0.1", "true"])
        .output()
        .unwrap();
    assert!(alias.status.success(), "{}", text(&alias.stderr));
    let other = w
        .ssh(&["-o", "HostKeyAlias=other.example", "127.0.0.1", "true"])
        .output()
        .unwrap();
    assert_eq!(other.status.code(), Some(255));
    assert!(
        text(&other.stderr).contains("Host key verification failed"),
        "{}",
        text(&other.stderr)
    );
}

#[test]
fn a_uid_without_login_is_told_to_run_portcullis_login() {
    if !enabled() {
        return;
    }
    // No identity provider and no lab mode: nobody has an identity.
    let w = World::with(
        "ssh-nologin",
        204,
        Options {
            identity: "",
            ..Options::default()
        },
    );
    let out = w.ssh(&["127.0.0.1", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(255));
    let err = text(&out.stderr);
    assert!(err.contains("run `portcullis login`"), "{err}");
    let refused = w.wait_event("connection.refused", |e| e["protocol"] == "ssh");
    assert!(
        refused["reason"]
            .as_str()
            .unwrap()
            .contains("portcullis login"),
        "{refused}"
    );
    assert!(!w.sshd.log().contains("Accepted"), "{}", w.sshd.log());
}

#[test]
fn an_unknown_upstream_host_key_is_refused_naming_both_keys() {
    if !enabled() {
        return;
    }
    let w = World::with(
        "ssh-hostkey",
        205,
        Options {
            wrong_host_key: true,
            ..Options::default()
        },
    );
    let out = w.ssh(&["127.0.0.1", "true"]).output().unwrap();
    assert_eq!(out.status.code(), Some(255), "{}", text(&out.stderr));
    let fingerprint = |pub_file: &str| {
        let o = run(Command::new("ssh-keygen")
            .arg("-lf")
            .arg(w.files.path().join("sshd").join(pub_file)));
        text(&o.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    let refused = w.wait_event("connection.refused", |e| e["protocol"] == "ssh");
    let reason = refused["reason"].as_str().unwrap();
    assert!(reason.contains(&fingerprint("host_key.pub")), "{reason}");
    assert!(reason.contains(&fingerprint("other_key.pub")), "{reason}");
    assert!(w.events("connection.opened").is_empty());
}

#[test]
fn a_denied_exec_exits_1_with_its_reason_and_never_runs() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-deny", 206);
    let marker = format!("/tmp/portcullis-ssh-deny-{}", std::process::id());
    let _ = std::fs::remove_file(&marker);
    let cmd = format!("touch {marker}; echo forbidden");
    let out = w.ssh(&["127.0.0.1", &cmd]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains("denied by policy") && err.contains("no-forbidden-commands"),
        "{err}"
    );
    assert!(out.stdout.is_empty());
    assert!(!Path::new(&marker).exists(), "the denied command ran");
    let denied = w.wait_event("ssh.channel_denied", |e| e["command_line"] == cmd.as_str());
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["policy_ids"][0], "no-forbidden-commands");
    // The connection is still usable for what is allowed.
    let ok = w.ssh(&["127.0.0.1", "echo fine"]).output().unwrap();
    assert_eq!(text(&ok.stdout), "fine\n");
}

#[test]
fn a_policy_allowing_one_simple_command_refuses_it_with_shell_syntax() {
    if !enabled() {
        return;
    }
    let w = World::with(
        "ssh-simple",
        211,
        Options {
            base_policy: r#"
@id("echo-only")
permit (principal, action == Portcullis::Action::"ssh_exec", resource)
when { context.simple_command && context has command_name && context.command_name == "echo" };
"#,
            ..Options::default()
        },
    );
    let ok = w.ssh(&["127.0.0.1", "echo 'one two'"]).output().unwrap();
    assert_eq!(text(&ok.stdout), "one two\n", "{}", text(&ok.stderr));
    let marker = format!("/tmp/portcullis-ssh-simple-{}", std::process::id());
    let _ = std::fs::remove_file(&marker);
    // Starts with echo, but the shell would run more: refused before it runs.
    for line in [
        format!("echo hi; touch {marker}"),
        format!("echo $(touch {marker})"),
    ] {
        let out = w.ssh(&["127.0.0.1", &line]).output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{line}: {}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("exec denied by policy"),
            "{}",
            text(&out.stderr)
        );
    }
    let other = w.ssh(&["127.0.0.1", "uptime"]).output().unwrap();
    assert_eq!(other.status.code(), Some(1));
    assert!(!Path::new(&marker).exists(), "a refused command ran");
}

#[test]
fn port_forwarding_is_refused() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-forward", 207);
    // -W asks for a direct-tcpip channel, as -L does for each forwarded connection.
    let out = w
        .ssh(&["-W", &format!("127.0.0.1:{}", w.port), "127.0.0.1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(255));
    assert!(
        text(&out.stderr).contains("administratively prohibited"),
        "{}",
        text(&out.stderr)
    );
    w.wait_event("ssh.channel_denied", |e| e["channel"] == "direct-tcpip");
    // -R: the forward request itself is refused.
    let remote = w
        .ssh(&[
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("127.0.0.1:{}:127.0.0.1:9", w.port + 1000),
            "127.0.0.1",
            "true",
        ])
        .output()
        .unwrap();
    assert_eq!(remote.status.code(), Some(255));
    assert!(
        text(&remote.stderr).contains("remote port forwarding failed"),
        "{}",
        text(&remote.stderr)
    );
    w.wait_event("ssh.channel_denied", |e| e["channel"] == "tcpip-forward");
}

#[test]
fn remote_forwarding_is_allowed_by_a_policy_and_comes_back_to_the_client() {
    if !enabled() {
        return;
    }
    let w = World::with(
        "ssh-rforward-ok",
        213,
        Options {
            policy: r#"@id("forward") permit (principal, action == Portcullis::Action::"ssh_forward_remote", resource);"#,
            ..Options::default()
        },
    );
    let slot = Slot::new(213);
    let echo = portcullis_e2e::EchoServer::start(&[slot.v4(1)]);
    let remote_port = w.port + 1000;
    // On the target, a connection to the forwarded port comes back through the agent to
    // the client's side, which connects to the echo server.
    let script = format!("exec 3<>/dev/tcp/127.0.0.1/{remote_port}; echo ping >&3; head -2 <&3");
    let out = output_within(
        &mut w.ssh(&[
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("127.0.0.1:{remote_port}:{}", slot.v4(1)),
            "127.0.0.1",
            &script,
        ]),
        Duration::from_secs(30),
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(
        stdout.starts_with("peer=") && stdout.ends_with("ping\n"),
        "{stdout}"
    );
    assert_eq!(echo.accepted(), 1);
    w.wait_event("ssh.forward", |e| e["channel"] == "tcpip-forward");
}

#[test]
fn port_forwarding_is_allowed_by_a_policy_and_reaches_its_destination() {
    if !enabled() {
        return;
    }
    let w = World::with(
        "ssh-forward-ok",
        210,
        Options {
            policy: r#"@id("forward") permit (principal, action == Portcullis::Action::"ssh_forward_local", resource);"#,
            ..Options::default()
        },
    );
    let slot = Slot::new(210);
    let echo = portcullis_e2e::EchoServer::start(&[slot.v4(1)]);
    let mut c = w.ssh(&["-W", &slot.v4(1).to_string(), "127.0.0.1"]);
    let child = c
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut child.stdin.as_ref().unwrap(), b"through the tunnel\n").unwrap();
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    // The destination was reached from the target's side (sshd's connect), and echoed.
    assert!(stdout.starts_with("peer=127."), "{stdout}");
    assert!(stdout.ends_with("through the tunnel\n"), "{stdout}");
    assert_eq!(echo.accepted(), 1);
    let ev = w.wait_event("ssh.forward", |e| e["channel"] == "direct-tcpip");
    assert_eq!(ev["policy_ids"][0], "forward");
    assert!(
        ev["reason"]
            .as_str()
            .unwrap()
            .contains(&slot.v4(1).to_string()),
        "{ev}"
    );
}

#[test]
fn scp_both_protocols_and_sftp_batch_move_files_intact() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-scp", 208);
    let work = w.client_dir("work");
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let src = work.join("payload.bin");
    std::fs::write(&src, &payload).unwrap();
    std::os::unix::fs::chown(&src, Some(w.client_uid), None).unwrap();
    let remote_home = format!("/home/{REMOTE_USER}");
    for (legacy, name) in [(true, "legacy"), (false, "sftp")] {
        let remote = format!("127.0.0.1:{remote_home}/scp-{name}.bin");
        let back = work.join(format!("back-{name}.bin"));
        let mut up = w.client("scp");
        up.args(["-F", &w.config()]);
        if legacy {
            up.arg("-O");
        }
        run(up.arg(&src).arg(&remote));
        let mut down = w.client("scp");
        down.args(["-F", &w.config()]);
        if legacy {
            down.arg("-O");
        }
        run(down.arg(&remote).arg(&back));
        assert!(
            std::fs::read(&back).unwrap() == payload,
            "scp {name} changed the file"
        );
    }
    // scp -O is an exec of `scp -t`; the other goes through the sftp subsystem.
    w.wait_event("ssh.exec", |e| {
        e["command_line"]
            .as_str()
            .unwrap_or("")
            .starts_with("scp -t")
    });
    w.wait_event("ssh.subsystem", |e| e["channel"] == "subsystem:sftp");

    let batch = work.join("batch");
    std::fs::write(
        &batch,
        format!("put payload.bin {remote_home}/sftp.bin\nget {remote_home}/sftp.bin sftp-back.bin\nls {remote_home}\n"),
    )
    .unwrap();
    let out = run(w
        .client("sftp")
        .args(["-F", &w.config(), "-b"])
        .arg(&batch)
        .arg("127.0.0.1")
        .current_dir(&work));
    assert!(
        text(&out.stdout).contains("sftp.bin"),
        "{}",
        text(&out.stdout)
    );
    assert!(std::fs::read(work.join("sftp-back.bin")).unwrap() == payload);
}

#[test]
fn rsync_and_git_work_over_ssh() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-rsync-git", 209);
    let work = w.client_dir("work");
    let ssh_cmd = format!("ssh -F {}", w.config());
    // rsync: a small tree up and back.
    let tree = work.join("tree");
    std::fs::create_dir_all(tree.join("sub")).unwrap();
    std::fs::write(tree.join("a.txt"), "alpha\n").unwrap();
    std::fs::write(tree.join("sub/b.bin"), vec![7u8; 300_000]).unwrap();
    run(Command::new("chown")
        .args(["-R", &format!("{}:{}", w.client_uid, w.client_uid)])
        .arg(&tree));
    let remote = format!("127.0.0.1:/home/{REMOTE_USER}/rsync-{}/", w.port);
    run(w
        .client("rsync")
        .args(["-a", "-e", &ssh_cmd])
        .arg(format!("{}/", tree.display()))
        .arg(&remote));
    run(w
        .client("rsync")
        .args(["-a", "-e", &ssh_cmd])
        .arg(&remote)
        .arg(work.join("tree-back")));
    assert_eq!(
        std::fs::read(work.join("tree-back/sub/b.bin")).unwrap(),
        vec![7u8; 300_000]
    );
    assert_eq!(
        std::fs::read_to_string(work.join("tree-back/a.txt")).unwrap(),
        "alpha\n"
    );

    // git: clone a bare repository on the target, commit, push, and see the commit there.
    let repo = format!("/home/{REMOTE_USER}/repo-{}.git", w.port);
    let _ = std::fs::remove_dir_all(&repo);
    run(Command::new("git").args(["init", "-q", "--bare", "-b", "main", &repo]));
    run(Command::new("chown").args(["-R", &format!("{REMOTE_USER}:{REMOTE_USER}"), &repo]));
    let git = |args: &[&str], dir: &Path| {
        let mut c = w.client("git");
        c.env("GIT_SSH_COMMAND", &ssh_cmd)
            .args(["-c", "user.name=E2E", "-c", "user.email=e2e@example.com"])
            .args(args)
            .current_dir(dir);
        run(&mut c)
    };
    git(
        &["clone", "-q", &format!("127.0.0.1:{repo}"), "clone"],
        &work,
    );
    let clone = work.join("clone");
    std::fs::write(clone.join("README"), "through the agent\n").unwrap();
    run(Command::new("chown")
        .args([&format!("{}:{}", w.client_uid, w.client_uid)])
        .arg(clone.join("README")));
    git(&["add", "README"], &clone);
    git(&["commit", "-q", "-m", "first"], &clone);
    git(&["push", "-q", "origin", "HEAD:main"], &clone);
    let log = run(Command::new("git").args([
        "-c",
        "safe.directory=*",
        "--git-dir",
        &repo,
        "log",
        "--format=%s",
        "main",
    ]));
    assert_eq!(text(&log.stdout), "first\n");
    w.wait_event("ssh.exec", |e| {
        e["command_line"]
            .as_str()
            .unwrap_or("")
            .starts_with("git-receive-pack")
    });
    let _ = std::fs::remove_dir_all(&repo);
}

// ---- Part S: SFTP operations as events and policy, legacy scp decided (slots 220–224) ----

/// A fresh directory in the remote account's home, owned by it.
fn remote_dir(name: &str) -> PathBuf {
    let (remote_uid, _) = ensure_users();
    let dir = PathBuf::from(format!("/home/{REMOTE_USER}/{name}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    std::os::unix::fs::chown(&dir, Some(remote_uid), Some(remote_uid)).unwrap();
    dir
}

/// A file the client account owns in `dir`.
fn client_file(w: &World, dir: &Path, name: &str, content: &[u8]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    std::os::unix::fs::chown(&path, Some(w.client_uid), Some(w.client_uid)).unwrap();
    path
}

/// The SHA-256 coreutils computes, so the agent's hash is checked against another program.
fn sha256sum(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn sftp_batch(w: &World, work: &Path, batch: &str) -> Output {
    let file = client_file(w, work, "batch", batch.as_bytes());
    output_within(
        w.client("sftp")
            .args(["-F", &w.config(), "-b"])
            .arg(&file)
            .arg("127.0.0.1")
            .current_dir(work),
        Duration::from_secs(60),
    )
}

#[test]
fn sftp_operations_are_audited_with_sizes_and_hashes() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-sftp-audit", 220);
    let work = w.client_dir("work");
    let payload: Vec<u8> = (0..1_500_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let up = client_file(&w, &work, "up.bin", &payload);
    let hash = sha256sum(&up);
    let home = remote_dir("sftp-audit");
    let dir = format!("{}/d", home.display());
    let (a, b) = (format!("{dir}/a.bin"), format!("{dir}/b.bin"));
    let out = sftp_batch(
        &w,
        &work,
        &format!(
            "mkdir {dir}\nput up.bin {a}\nget {a} down.bin\nrename {a} {b}\nrm {b}\nrmdir {dir}\n"
        ),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(std::fs::read(work.join("down.bin")).unwrap() == payload);
    assert!(!Path::new(&dir).exists());

    let op = |e: &Value, name: &str, path: &str| {
        e["sftp_operation"] == name && e["path"] == path && e["decision"] == "allow"
    };
    w.wait_event("ssh.sftp", |e| {
        op(e, "mkdir", &dir) && e["sftp_status"] == "ok"
    });
    let open = w.wait_event("ssh.sftp", |e| {
        op(e, "open", &a) && e["open_flags"].as_str().unwrap_or("").contains("write")
    });
    assert_eq!(open["sftp_status"], "ok", "{open:#}");
    assert_eq!(open["channel"], "subsystem:sftp");
    assert!(open["identity"]["uid"] == w.client_uid, "{open:#}");
    let written = w.wait_event("ssh.sftp", |e| {
        op(e, "close", &a) && e["bytes_written"].is_u64()
    });
    assert_eq!(
        written["bytes_written"],
        payload.len() as u64,
        "{written:#}"
    );
    assert_eq!(written["write_sha256"], hash.as_str(), "{written:#}");
    let read = w.wait_event("ssh.sftp", |e| {
        op(e, "close", &a) && e["bytes_read"].is_u64()
    });
    assert_eq!(read["bytes_read"], payload.len() as u64, "{read:#}");
    assert_eq!(read["read_sha256"], hash.as_str(), "{read:#}");
    let renamed = w.wait_event("ssh.sftp", |e| op(e, "rename", &a));
    assert_eq!(renamed["new_path"], b.as_str());
    assert_eq!(renamed["sftp_status"], "ok");
    w.wait_event("ssh.sftp", |e| {
        op(e, "remove", &b) && e["sftp_status"] == "ok"
    });
    w.wait_event("ssh.sftp", |e| {
        op(e, "rmdir", &dir) && e["sftp_status"] == "ok"
    });
    // The server's own answer is written down, a failure too.
    let out = sftp_batch(&w, &work, &format!("-rm {dir}/never-there\n"));
    assert!(out.status.success(), "{}", text(&out.stderr));
    w.wait_event("ssh.sftp", |e| {
        op(e, "remove", &format!("{dir}/never-there")) && e["sftp_status"] == "no such file"
    });
}

#[test]
fn a_policy_denying_reads_under_a_directory_fails_sftp_get_and_the_session_goes_on() {
    if !enabled() {
        return;
    }
    let secret = format!("/home/{REMOTE_USER}/secret-221");
    let policy = format!(
        r#"
@id("no-secret-reads")
forbid (principal, action == Portcullis::Action::"ssh_sftp", resource)
when {{ context.sftp_operation == "read" && context.path like "{secret}/*" }};
"#
    );
    let w = World::with(
        "ssh-sftp-deny",
        221,
        Options {
            policy: &policy,
            ..Options::default()
        },
    );
    let (remote_uid, _) = ensure_users();
    let secret_dir = remote_dir("secret-221");
    let public_dir = remote_dir("public-221");
    for (dir, content) in [(&secret_dir, "the secret\n"), (&public_dir, "public\n")] {
        let f = dir.join("f.txt");
        std::fs::write(&f, content).unwrap();
        std::os::unix::fs::chown(&f, Some(remote_uid), Some(remote_uid)).unwrap();
    }
    let work = w.client_dir("work");
    // `-` lets the batch go on after a failed command; one connection, one sftp session.
    // The second name reaches the secret through `..`: policy sees the resolved path.
    let out = sftp_batch(
        &w,
        &work,
        &format!(
            "-get {secret}/f.txt s1.txt\n-get {}/../secret-221/f.txt s2.txt\nget {}/f.txt p.txt\nput p.txt {secret}/written.txt\n",
            public_dir.display(),
            public_dir.display()
        ),
    );
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert_eq!(err.matches("Permission denied").count(), 2, "{err}");
    assert!(!work.join("s1.txt").exists() && !work.join("s2.txt").exists());
    assert_eq!(
        std::fs::read_to_string(work.join("p.txt")).unwrap(),
        "public\n"
    );
    // Writing there is not reading: allowed, and it happened.
    assert_eq!(
        std::fs::read_to_string(secret_dir.join("written.txt")).unwrap(),
        "public\n"
    );
    let target = format!("{secret}/f.txt");
    let denied = w.wait_event("ssh.sftp", |e| {
        e["decision"] == "deny" && e["path"] == target.as_str()
    });
    assert_eq!(denied["sftp_operation"], "open");
    assert_eq!(denied["policy_ids"][0], "no-secret-reads");
    assert!(
        denied["reason"]
            .as_str()
            .unwrap()
            .contains("read of `/home/pcssh/secret-221/f.txt` denied by policy"),
        "{denied:#}"
    );
    w.wait_event("ssh.sftp", |e| {
        e["decision"] == "deny" && e["path"].as_str().unwrap_or("").contains("/../secret-221/")
    });
    // The server never opened it: no open was answered for the secret.
    assert!(
        !w.events("ssh.sftp").iter().any(|e| {
            e["sftp_operation"] == "open"
                && e["decision"] == "allow"
                && e["path"]
                    .as_str()
                    .unwrap_or("")
                    .ends_with("secret-221/f.txt")
        }),
        "{:#?}",
        w.events("ssh.sftp")
    );
    w.wait_event("ssh.sftp", |e| {
        e["sftp_operation"] == "close"
            && e["path"] == format!("{}/f.txt", public_dir.display()).as_str()
            && e["bytes_read"] == 7
    });
}

#[test]
fn legacy_scp_is_decided_as_ssh_scp_and_a_denied_path_is_refused() {
    if !enabled() {
        return;
    }
    let locked = format!("/home/{REMOTE_USER}/locked-222");
    // No ssh_exec at all: legacy scp is decided as what it does, not as a command.
    let base = format!(
        r#"
@id("scp-only")
permit (principal, action == Portcullis::Action::"ssh_scp", resource);

@id("no-locked-uploads")
forbid (principal, action == Portcullis::Action::"ssh_scp", resource)
when {{ context.direction == "upload" && context.path like "{locked}*" }};
"#
    );
    let w = World::with(
        "ssh-scp-decide",
        222,
        Options {
            base_policy: &base,
            ..Options::default()
        },
    );
    let work = w.client_dir("work");
    let src = client_file(&w, &work, "f.txt", b"scp payload\n");
    let open_dir = remote_dir("open-222");
    let locked_dir = remote_dir("locked-222");
    let scp = |from: &str, to: &str| {
        output_within(
            w.client("scp")
                .args(["-F", &w.config(), "-O", from, to])
                .current_dir(&work),
            Duration::from_secs(60),
        )
    };
    let ok = scp(
        &src.display().to_string(),
        &format!("127.0.0.1:{}/f.txt", open_dir.display()),
    );
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    assert_eq!(
        std::fs::read(open_dir.join("f.txt")).unwrap(),
        b"scp payload\n"
    );
    let back = scp(
        &format!("127.0.0.1:{}/f.txt", open_dir.display()),
        &work.join("back.txt").display().to_string(),
    );
    assert!(back.status.success(), "{}", text(&back.stderr));

    let refused = scp(
        &src.display().to_string(),
        &format!("127.0.0.1:{locked}/f.txt"),
    );
    assert!(!refused.status.success());
    let err = text(&refused.stderr);
    assert!(
        err.contains("scp upload of") && err.contains("no-locked-uploads"),
        "{err}"
    );
    assert!(!locked_dir.join("f.txt").exists(), "the refused upload ran");
    let denied = w.wait_event("ssh.channel_denied", |e| {
        e["command_line"]
            .as_str()
            .unwrap_or("")
            .starts_with("scp -t")
    });
    assert_eq!(denied["policy_ids"][0], "no-locked-uploads");
    assert_eq!(denied["decision"], "deny");
    // An ordinary command is still not allowed: scp-only means scp only.
    let cmd = w.ssh(&["127.0.0.1", "true"]).output().unwrap();
    assert_eq!(cmd.status.code(), Some(1));
}

#[test]
fn a_malformed_or_oversized_sftp_packet_closes_its_channel_and_the_agent_keeps_serving() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-sftp-bad", 223);
    let work = w.client_dir("work");
    let init: &[u8] = &[0, 0, 0, 5, 1, 0, 0, 0, 3];
    // A length of 16 MiB (over the 256 KiB limit): refused before anything is buffered.
    let mut oversized = init.to_vec();
    oversized.extend_from_slice(&[0x01, 0, 0, 0, 3, 0, 0, 0, 1]);
    oversized.extend_from_slice(&[0x41; 64]);
    // A REMOVE whose path claims 4 GiB inside a 13-byte packet.
    let mut truncated = init.to_vec();
    truncated.extend_from_slice(&[
        0, 0, 0, 13, 13, 0, 0, 0, 7, 0xff, 0xff, 0xff, 0xff, b'/', b'e', b't', b'c',
    ]);
    for (name, bytes, says) in [
        ("oversized", oversized, "over the limit"),
        ("truncated", truncated, "ends inside"),
    ] {
        let input = client_file(&w, &work, name, &bytes);
        let mut c = w.ssh(&["-s", "127.0.0.1", "sftp"]);
        c.stdin(std::fs::File::open(&input).unwrap());
        let out = output_within(&mut c, Duration::from_secs(30));
        let err = text(&out.stderr);
        assert!(err.contains("SFTP stream is broken"), "{name}: {err}");
        let ev = w.wait_event("ssh.sftp", |e| {
            e["sftp_operation"] == "protocol_error"
                && e["reason"].as_str().unwrap_or("").contains(says)
        });
        assert_eq!(ev["decision"], "error");
    }
    // The agent goes on serving, sftp included.
    let ok = w.ssh(&["127.0.0.1", "echo still here"]).output().unwrap();
    assert_eq!(text(&ok.stdout), "still here\n", "{}", text(&ok.stderr));
    let out = sftp_batch(&w, &work, "ls /\n");
    assert!(out.status.success(), "{}", text(&out.stderr));
}

// ---------------------------------------------------------------------------------------
// Part C: forwarding decided on its destination, agent forwarding, the target's known_hosts,
// refusals the client can read, and one channel that cannot stall the others. Slots 225–229.
// ---------------------------------------------------------------------------------------

/// `-W destination` with `input` on stdin, as the client: its output, bounded.
fn stdio_forward(w: &World, destination: &str, input: &[u8]) -> Output {
    let data = w
        .files
        .path()
        .join(format!("forward-input-{}", input.len()));
    std::fs::write(&data, input).unwrap();
    let mut c = w.ssh(&["-W", destination, "127.0.0.1"]);
    c.stdin(std::fs::File::open(&data).unwrap());
    output_within(&mut c, Duration::from_secs(30))
}

#[test]
fn forwards_reach_only_the_addresses_a_policy_names_and_each_connection_is_audited_with_its_bytes()
{
    if !enabled() {
        return;
    }
    let slot = Slot::new(225);
    let dest = slot.v4(1);
    let echo = portcullis_e2e::EchoServer::start(&[dest]);
    let remote_port = slot.server_port + 1000;
    let policy = format!(
        r#"@id("tunnel") permit (principal, action == Portcullis::Action::"ssh_forward_local", resource)
        when {{ context.destination_host == "{}" && context.destination_port == {} }};
        @id("listen") permit (principal, action == Portcullis::Action::"ssh_forward_remote", resource)
        when {{ context.bind_address == "127.0.0.1" && context.bind_port == {remote_port} }};"#,
        dest.ip(),
        dest.port()
    );
    let w = World::with(
        "ssh-fwd-one",
        225,
        Options {
            policy: &policy,
            ..Options::default()
        },
    );
    let input = b"through the tunnel\n";
    let out = stdio_forward(&w, &dest.to_string(), input);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.ends_with("through the tunnel\n"), "{stdout}");
    assert_eq!(echo.accepted(), 1);
    // Another port of the same host, and another host on the same port: refused, and the
    // client prints why.
    for other in [
        format!("{}:{}", dest.ip(), dest.port() + 1),
        format!("127.0.0.1:{}", dest.port()),
    ] {
        let refused = stdio_forward(&w, &other, input);
        assert_eq!(refused.status.code(), Some(255));
        let err = text(&refused.stderr);
        assert!(
            err.contains(&format!(
                "administratively prohibited: portcullis: forwarding to {other} denied by policy"
            )),
            "{err}"
        );
        let denied = w.wait_event("ssh.channel_denied", |e| e["forward"] == other.as_str());
        assert_eq!(denied["channel"], "direct-tcpip");
        assert_eq!(denied["decision"], "deny");
    }
    assert_eq!(echo.accepted(), 1, "a refused forward reached the server");
    let opened = w.wait_event("ssh.forward", |e| e["forward"] == dest.to_string().as_str());
    assert_eq!(opened["policy_ids"][0], "tunnel");
    assert!(opened["originator"].is_string(), "{opened}");
    // At its end: the bytes each way, as the client sent and received them.
    let closed = w.wait_event("ssh.forward_closed", |e| {
        e["forward"] == dest.to_string().as_str()
    });
    assert_eq!(closed["channel"], "direct-tcpip");
    assert_eq!(closed["bytes_client_to_upstream"], input.len() as u64);
    assert_eq!(closed["bytes_upstream_to_client"], out.stdout.len() as u64);

    // -R on the port the policy names: a connection on the target to it comes back to the
    // client's side and is audited at its end with what it moved.
    let script = format!("exec 3<>/dev/tcp/127.0.0.1/{remote_port}; echo ping >&3; head -2 <&3");
    let remote = |port: u16, script: &str| {
        output_within(
            &mut w.ssh(&[
                "-o",
                "ExitOnForwardFailure=yes",
                "-R",
                &format!("127.0.0.1:{port}:{dest}"),
                "127.0.0.1",
                script,
            ]),
            Duration::from_secs(30),
        )
    };
    let out = remote(remote_port, &script);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.ends_with("ping\n"), "{stdout}");
    let listen = format!("127.0.0.1:{remote_port}");
    w.wait_event("ssh.forward", |e| e["forward"] == listen.as_str());
    let closed = w.wait_event("ssh.forward_closed", |e| e["channel"] == "forwarded-tcpip");
    assert_eq!(closed["forward"], listen.as_str());
    assert_eq!(closed["bytes_upstream_to_client"], "ping\n".len() as u64);
    assert!(
        closed["bytes_client_to_upstream"].as_u64().unwrap() >= out.stdout.len() as u64,
        "{closed}"
    );
    // Another port: the forward is refused and never asked of the target.
    let other = remote_port + 1;
    let refused = remote(other, "true");
    assert_eq!(refused.status.code(), Some(255));
    assert!(
        text(&refused.stderr).contains("remote port forwarding failed"),
        "{}",
        text(&refused.stderr)
    );
    let denied = w.wait_event("ssh.channel_denied", |e| {
        e["forward"] == format!("127.0.0.1:{other}").as_str()
    });
    assert_eq!(denied["channel"], "tcpip-forward");
}

/// An ssh-agent of the client account holding one new key, as a user's laptop would.
struct TestAgent {
    child: Child,
    socket: PathBuf,
    fingerprint: String,
}

impl TestAgent {
    fn start(w: &World) -> Self {
        let dir = w.client_dir("agent");
        let socket = dir.join("agent.sock");
        let _ = std::fs::remove_file(&socket);
        let child = w
            .client("ssh-agent")
            .args(["-D", "-a"])
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "ssh-agent did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let key = dir.join("id_ed25519");
        keygen(&key);
        for f in [key.clone(), key.with_extension("pub")] {
            std::os::unix::fs::chown(&f, Some(w.client_uid), Some(w.client_uid)).unwrap();
        }
        run(w.client("ssh-add").env("SSH_AUTH_SOCK", &socket).arg(&key));
        let listed = run(Command::new("ssh-keygen")
            .arg("-lf")
            .arg(key.with_extension("pub")));
        let fingerprint = text(&listed.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string();
        Self {
            child,
            socket,
            fingerprint,
        }
    }

    /// `ssh -A` to the target running `ssh-add -l` there.
    fn list_on_target(&self, w: &World) -> Output {
        let mut c = w.ssh(&["-A", "127.0.0.1", "ssh-add -l"]);
        c.env("SSH_AUTH_SOCK", &self.socket);
        output_within(&mut c, Duration::from_secs(30))
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn agent_forwarding_allowed_by_a_policy_lists_the_clients_key_on_the_target() {
    if !enabled() {
        return;
    }
    let w = World::with(
        "ssh-agent-ok",
        226,
        Options {
            policy: r#"@id("agent") permit (principal, action == Portcullis::Action::"ssh_agent_forward", resource);"#,
            ..Options::default()
        },
    );
    let agent = TestAgent::start(&w);
    let out = agent.list_on_target(&w);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    assert!(stdout.contains(&agent.fingerprint), "{stdout}");
    let req = w.wait_event("ssh.agent_channel", |e| e["channel"] == "auth-agent-req");
    assert_eq!(req["policy_ids"][0], "agent");
    let relayed = w.wait_event("ssh.agent_channel", |e| {
        e["channel"] == "auth-agent@openssh.com"
    });
    assert_eq!(relayed["decision"], "allow");
}

#[test]
fn every_refusal_reaches_the_client_as_a_line_it_prints() {
    if !enabled() {
        return;
    }
    let w = World::with(
        "ssh-refusals",
        227,
        Options {
            policy: r#"@id("no-root") forbid (principal, action == Portcullis::Action::"connect", resource)
                when { context has ssh_user && context.ssh_user == "root" };"#,
            ..Options::default()
        },
    );
    let err_of = |args: &[&str]| {
        let out = output_within(&mut w.ssh(args), Duration::from_secs(30));
        (out.status.code(), text(&out.stderr))
    };
    // The connect, denied by policy: the disconnect's text.
    let (code, err) = err_of(&["root@127.0.0.1", "true"]);
    assert_eq!(code, Some(255));
    assert!(
        err.contains("portcullis: denied by policy") && err.contains("no-root"),
        "{err}"
    );
    // The target's sshd refuses the agent's login (AllowUsers): said, not "Permission denied".
    let (code, err) = err_of(&[&format!("{LOCAL_USER}@127.0.0.1"), "true"]);
    assert_eq!(code, Some(255));
    assert!(
        err.contains(&format!("refused the agent's login as `{LOCAL_USER}`")),
        "{err}"
    );
    // A command: its reason on stderr, exit status 1.
    let (code, err) = err_of(&["127.0.0.1", "echo forbidden"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("exec denied by policy"), "{err}");
    // A forward: the reason after OpenSSH's "open failed".
    let (code, err) = err_of(&["-W", "127.0.0.1:9", "127.0.0.1"]);
    assert_eq!(code, Some(255));
    assert!(
        err.contains("open failed: administratively prohibited: portcullis: forwarding to 127.0.0.1:9 denied by policy"),
        "{err}"
    );
    // Agent forwarding without a policy: the target sees no agent, and it is evented.
    let agent = TestAgent::start(&w);
    let out = agent.list_on_target(&w);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("Could not open a connection to your authentication agent"),
        "{}",
        text(&out.stderr)
    );
    assert!(!text(&out.stdout).contains(&agent.fingerprint));
    let denied = w.wait_event("ssh.channel_denied", |e| e["channel"] == "auth-agent-req");
    assert!(
        denied["reason"]
            .as_str()
            .unwrap()
            .contains("agent forwarding denied by policy"),
        "{denied}"
    );
    assert!(w.events("ssh.agent_channel").is_empty());
}

#[test]
fn hashed_known_hosts_are_matched_and_a_revoked_or_changed_key_is_refused_with_its_reason() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-knownhosts", 228);
    let sshd = w.files.path().join("sshd");
    let known = sshd.join("upstream_known_hosts");
    // OpenSSH's own hashing of the `[127.0.0.1]:port` line.
    run(Command::new("ssh-keygen").arg("-H").arg("-f").arg(&known));
    let hashed = std::fs::read_to_string(&known).unwrap();
    assert!(hashed.starts_with("|1|"), "{hashed}");
    let ok = output_within(
        &mut w.ssh(&["127.0.0.1", "echo ok"]),
        Duration::from_secs(30),
    );
    assert_eq!(text(&ok.stdout), "ok\n", "{}", text(&ok.stderr));

    let fingerprint = |pub_file: &Path| {
        let o = run(Command::new("ssh-keygen").arg("-lf").arg(pub_file));
        text(&o.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap()
            .to_string()
    };
    let host_key = std::fs::read_to_string(sshd.join("host_key.pub")).unwrap();
    let host_fp = fingerprint(&sshd.join("host_key.pub"));
    // Revoked, even though a line lists it for this host.
    std::fs::write(&known, format!("{hashed}@revoked * {host_key}")).unwrap();
    let out = output_within(&mut w.ssh(&["127.0.0.1", "true"]), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(255));
    let err = text(&out.stderr);
    assert!(
        err.contains("marked @revoked") && err.contains(&host_fp),
        "{err}"
    );
    w.wait_event("connection.refused", |e| {
        e["reason"].as_str().unwrap_or("").contains("@revoked")
    });
    // Changed: another key under the hashed name; the client reads both keys.
    let other = keygen(&sshd.join("other_key"));
    let other_fp = fingerprint(&sshd.join("other_key.pub"));
    let line = hashed.split_whitespace().next().unwrap();
    std::fs::write(&known, format!("{line} {other}")).unwrap();
    let out = output_within(&mut w.ssh(&["127.0.0.1", "true"]), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(255));
    let err = text(&out.stderr);
    assert!(
        err.contains("is not the one expected")
            && err.contains(&host_fp)
            && err.contains(&other_fp),
        "{err}"
    );
    assert!(w.events("connection.opened").len() == 1);
}

#[test]
fn a_channel_whose_server_does_not_read_leaves_the_other_channels_of_a_controlmaster_connection_moving(
) {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-backpressure", 229);
    let dir = w.client_dir("mux");
    let control = dir.join("cm");
    let control = control.to_str().unwrap();
    let mut master = w
        .ssh(&["-M", "-S", control, "-N", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !w
        .ssh(&["-S", control, "-O", "check", "127.0.0.1"])
        .output()
        .unwrap()
        .status
        .success()
    {
        assert!(Instant::now() < deadline, "the ControlMaster did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    // 5 MiB into a command that never reads stdin: past the target's 2 MiB window and its
    // pipe, so the rest waits in the agent.
    let big = w.files.path().join("big.bin");
    std::fs::write(&big, vec![b'x'; 5 << 20]).unwrap();
    let mut stuck = w
        .ssh(&["-S", control, "127.0.0.1", "sleep 60"])
        .stdin(std::fs::File::open(&big).unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Let the write reach the agent (no assertion depends on this).
    std::thread::sleep(Duration::from_secs(3));
    let other = output_within(
        &mut w.ssh(&["-S", control, "127.0.0.1", "echo still moving"]),
        Duration::from_secs(30),
    );
    let _ = stuck.kill();
    let _ = stuck.wait();
    let _ = w.ssh(&["-S", control, "-O", "exit", "127.0.0.1"]).output();
    let _ = master.kill();
    let _ = master.wait();
    assert_eq!(
        text(&other.stdout),
        "still moving\n",
        "{}",
        text(&other.stderr)
    );
}

// ---- Part T: bulk exec, Ansible (slots 230–239) ----

/// `cmd` feeding `len` bytes that are neither compressible nor periodic, from a file.
fn noise_file(path: &Path, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for chunk in data.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    std::fs::write(path, &data).unwrap();
    data
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

#[test]
fn exec_pipes_200_mb_both_ways_with_checksums() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-pipe-200", 230);
    let input = w.files.path().join("input-200.bin");
    let data = noise_file(&input, 200 << 20);
    let sent = sha256_hex(&data);
    // Both directions full at once: what `cat` on the target echoes comes back whole.
    let started = Instant::now();
    let mut cmd = w.ssh(&["127.0.0.1", "cat"]);
    cmd.stdin(std::fs::File::open(&input).unwrap());
    let out = output_within(&mut cmd, Duration::from_secs(240));
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        w.agent.log()
    );
    assert_eq!(out.stdout.len(), data.len());
    assert_eq!(sha256_hex(&out.stdout), sent, "the bytes came back changed");
    eprintln!("200 MB each way in {:?}", started.elapsed());
    // The target's own checksum of what reached it, and of what it sends.
    let mut up = w.ssh(&["127.0.0.1", "sha256sum"]);
    up.stdin(std::fs::File::open(&input).unwrap());
    let up = output_within(&mut up, Duration::from_secs(240));
    assert_eq!(
        text(&up.stdout),
        format!("{sent}  -\n"),
        "the target received other bytes: {}",
        text(&up.stderr)
    );
    // The target is this machine: the input file is readable there too.
    let down = output_within(
        &mut w.ssh(&["127.0.0.1", &format!("cat {}", input.display())]),
        Duration::from_secs(240),
    );
    assert_eq!(down.stdout.len(), data.len(), "{}", text(&down.stderr));
    assert_eq!(sha256_hex(&down.stdout), sent, "the download changed");
}

#[test]
fn a_command_reading_and_writing_at_once_in_small_pieces_moves_200_mb_both_ways() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-tee-200", 234);
    let input = w.files.path().join("input-tee.bin");
    let data = noise_file(&input, 200 << 20);
    let sent = sha256_hex(&data);
    // tee writes what it reads in pipe-sized pieces to stdout and to a checksum on stderr:
    // both directions busy at once in small packets, the case that knotted the two legs'
    // flow control together.
    let mut cmd = w.ssh(&["127.0.0.1", "bash -c 'tee >(sha256sum >&2)'"]);
    cmd.stdin(std::fs::File::open(&input).unwrap());
    let out = output_within(&mut cmd, Duration::from_secs(300));
    assert!(
        out.status.success(),
        "{}\n{}",
        text(&out.stderr),
        w.agent.log()
    );
    assert_eq!(out.stdout.len(), data.len(), "{}", text(&out.stderr));
    assert_eq!(sha256_hex(&out.stdout), sent, "the echoed bytes changed");
    assert!(
        text(&out.stderr).contains(&sent),
        "the target read other bytes: {}",
        text(&out.stderr)
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_client_that_sends_without_reading_the_echo_is_ended_with_the_reason_and_memory_stays_bounded()
{
    if !enabled() {
        return;
    }
    let w = World::new("ssh-no-read", 235);
    let input = w.files.path().join("flood.bin");
    noise_file(&input, 300 << 20);
    let before = rss_kib(w.agent.pid());
    // The client sends 300 MB to `cat` and never reads what comes back: its stdout is a
    // pipe nobody empties. Direct, sshd would hold it back by its window; russh refills the
    // window on arrival, so the agent must bound what it holds and say why it stopped.
    let mut child = w
        .ssh(&["127.0.0.1", "cat"])
        .stdin(std::fs::File::open(&input).unwrap())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let unread = child.stdout.take();
    let mut stderr = child.stderr.take().unwrap();
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut peak = before;
    let status = loop {
        peak = peak.max(rss_kib(w.agent.pid()));
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the client was neither served nor ended\n{}", w.agent.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    drop(unread);
    let mut err = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
    assert!(!status.success());
    assert!(
        err.contains("sending input without reading it"),
        "the client was not told why: {err}"
    );
    let closed = w.wait_event("connection.closed", |e| {
        e["reason"]
            .as_str()
            .is_some_and(|r| r.contains("without reading it"))
    });
    assert_eq!(closed["protocol"], "ssh", "{closed}");
    // What the agent held stayed near its allowance (64 MiB past the 16 MiB budget, plus
    // russh's own buffers), far below the 300 MB the client sent.
    let grew_mib = peak.saturating_sub(before) / 1024;
    assert!(grew_mib < 200, "the agent grew by {grew_mib} MiB");
    // The agent goes on serving.
    let ok = output_within(
        &mut w.ssh(&["127.0.0.1", "echo still-serving"]),
        Duration::from_secs(60),
    );
    assert_eq!(text(&ok.stdout), "still-serving\n", "{}", text(&ok.stderr));
}

fn ansible_available() -> bool {
    let problem = (!Path::new("/usr/bin/ansible").exists())
        .then(|| "Debian's ansible-core is not installed (cargo xtask setup)".to_string());
    portcullis_e2e::prerequisites_met(problem)
}

#[test]
fn ansible_ping_and_copy_with_controlpersist_and_pipelining() {
    if !enabled() || !ansible_available() {
        return;
    }
    let w = World::new("ssh-ansible", 231);
    let work = w.client_dir("ansible");
    let control = w.client_dir("ansible-cp");
    // The inventory names the target; Ansible's ssh multiplexes its tasks over one
    // connection (ControlMaster/ControlPersist) and feeds modules on stdin (pipelining),
    // the case a relay that lets client data overtake the exec reply breaks.
    std::fs::write(
        work.join("inventory"),
        format!(
            "[targets]\nweb ansible_host=127.0.0.1 ansible_user={REMOTE_USER} \
             ansible_python_interpreter=/usr/bin/python3 \
             ansible_ssh_common_args='-F {config} -o ControlMaster=auto -o ControlPersist=60s \
             -o ControlPath={cp}/%C'\n",
            config = w.config(),
            cp = control.display(),
        ),
    )
    .unwrap();
    std::fs::write(
        work.join("ansible.cfg"),
        "[defaults]\ninventory = inventory\nhost_key_checking = True\nretry_files_enabled = False\n\
         [ssh_connection]\npipelining = True\n",
    )
    .unwrap();
    let payload = noise_file(&work.join("payload.bin"), 2_000_000);
    std::os::unix::fs::chown(work.join("payload.bin"), Some(w.client_uid), None).unwrap();
    let dest = format!("/home/{REMOTE_USER}/ansible-{}.bin", w.port);
    let _ = std::fs::remove_file(&dest);
    let ansible = |args: &[&str]| {
        let mut c = w.client("ansible");
        c.env("ANSIBLE_CONFIG", work.join("ansible.cfg"))
            .env("ANSIBLE_NOCOLOR", "1")
            .args(args)
            .current_dir(&work);
        let out = output_within(&mut c, Duration::from_secs(120));
        assert!(
            out.status.success(),
            "ansible {args:?}:\n{}\n{}\nagent log:\n{}",
            text(&out.stdout),
            text(&out.stderr),
            w.agent.log()
        );
        text(&out.stdout)
    };
    let ping = ansible(&["web", "-m", "ping"]);
    assert!(ping.contains("\"ping\": \"pong\""), "{ping}");
    let copy = ansible(&[
        "web",
        "-m",
        "copy",
        "-a",
        &format!("src=payload.bin dest={dest} mode=0600"),
    ]);
    assert!(copy.contains("CHANGED"), "{copy}");
    // The file on the target is the one sent, and Ansible agrees on its checksum.
    assert_eq!(
        sha256_hex(&std::fs::read(&dest).unwrap()),
        sha256_hex(&payload)
    );
    let stat = ansible(&[
        "web",
        "-m",
        "stat",
        "-a",
        &format!("path={dest} checksum_algorithm=sha256"),
    ]);
    assert!(stat.contains(&sha256_hex(&payload)), "{stat}");

    // Every task rode the one multiplexed connection, and each module ran as an exec the
    // policy decided, its code piped to python3 on stdin.
    let opened = w.events("connection.opened");
    assert_eq!(opened.len(), 1, "one connection for all tasks: {opened:#?}");
    let execs = w.events("ssh.exec");
    assert!(
        execs.len() >= 3
            && execs
                .iter()
                .all(|e| e["decision"] == "allow"
                    && e["connection_id"] == opened[0]["connection_id"]),
        "{execs:#?}"
    );
    assert!(
        execs.iter().any(|e| e["command_line"]
            .as_str()
            .unwrap_or("")
            .contains("/usr/bin/python3 && sleep 0")),
        "no pipelined module run: {execs:#?}"
    );
    let _ = w
        .ssh(&[
            "-o",
            &format!("ControlPath={}/%C", control.display()),
            "-O",
            "exit",
            "127.0.0.1",
        ])
        .output();
    let _ = std::fs::remove_file(&dest);
}

#[test]
fn exit_status_sent_after_the_servers_eof_reaches_a_controlmaster_client() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-late-status", 232);
    let control = w.client_dir("late-mux").join("%C").display().to_string();
    // The command's output ends a second before it exits: sshd sends EOF, then the status.
    // A ControlMaster client whose input is done closes the channel at that EOF; it must
    // still get the status, as it does direct. The first run opens the master, the second
    // rides it.
    for round in ["opens the master", "through the master"] {
        let out = output_within(
            &mut w.ssh(&[
                "-o",
                "ControlMaster=auto",
                "-o",
                &format!("ControlPath={control}"),
                "-o",
                "ControlPersist=30",
                "127.0.0.1",
                "exec >&- 2>&-; sleep 1; exit 5",
            ]),
            Duration::from_secs(30),
        );
        assert_eq!(out.status.code(), Some(5), "{round}: {}", text(&out.stderr));
    }
    let _ = w
        .ssh(&[
            "-o",
            &format!("ControlPath={control}"),
            "-O",
            "exit",
            "127.0.0.1",
        ])
        .output();
}

// ---- Part R: recording, masking and guarded lines of shells and execs (slots 214–219) ----

/// Card numbers masked in shells and commands (`@mask("pii")` on the permit).
const MASK_POLICY: &str = r#"
@id("mask-terminals")
@mask("pii")
permit (
    principal,
    action in [Portcullis::Action::"ssh_shell", Portcullis::Action::"ssh_exec"],
    resource
);
"#;

const MASKING_TOML: &str = r#"
[profiles.pii]
description = "card numbers"

[[profiles.pii.rules]]
detector = "card_number"
mask = "partial"
keep_last = 4
"#;

/// A Luhn-valid test card number (Visa's documented test PAN).
const PAN: &str = "4111 1111 1111 1111";

/// A file in the remote account's home.
fn remote_file(name: &str, content: &[u8]) -> PathBuf {
    let (remote_uid, _) = ensure_users();
    let home = PathBuf::from(format!("/home/{REMOTE_USER}"));
    if !home.exists() {
        std::fs::create_dir_all(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(remote_uid), Some(remote_uid)).unwrap();
    }
    let path = home.join(name);
    std::fs::write(&path, content).unwrap();
    std::os::unix::fs::chown(&path, Some(remote_uid), Some(remote_uid)).unwrap();
    path
}

/// An interactive `ssh -tt` that types `script` (its lines one after another, with a pause
/// so each is read as typed) and runs to its end.
fn typed_shell(w: &World, script: &[&str]) -> Output {
    let mut c = w.ssh(&["-tt", "127.0.0.1"]);
    let out_file = tempfile::tempfile().unwrap();
    let err_file = tempfile::tempfile().unwrap();
    let mut child = c
        .stdin(Stdio::piped())
        .stdout(out_file.try_clone().unwrap())
        .stderr(err_file.try_clone().unwrap())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for line in script {
            std::thread::sleep(Duration::from_millis(400));
            if std::io::Write::write_all(&mut stdin, line.as_bytes()).is_err() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(400));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let read = |mut f: std::fs::File| {
        use std::io::{Read, Seek};
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    };
    Output {
        status,
        stdout: read(out_file),
        stderr: read(err_file),
    }
}

/// The connection id of the session whose shell started.
fn shell_connection(w: &World) -> u64 {
    w.wait_event("ssh.shell", |_| true)["connection_id"]
        .as_u64()
        .unwrap()
}

/// A session's recording as `portcullis replay <id>` plays it (read back from the audit
/// store after its chunk hashes were checked), fast.
fn replayed(w: &World, id: u64) -> String {
    w.wait_event("recording.closed", |e| e["connection_id"] == id);
    let out = run(Command::new(portcullis_e2e::agent_bin())
        .args(["replay", &id.to_string(), "--speed", "1000", "--config"])
        .arg(&w.agent.config));
    text(&out.stdout)
}

fn recording_file(w: &World, id: u64) -> PathBuf {
    recording_file_n(w, id, 0)
}

/// Recording `n` of connection `id` (one per terminal; 0 keeps the name of before they were
/// numbered).
fn recording_file_n(w: &World, id: u64, n: u64) -> PathBuf {
    let name = match n {
        0 => format!("{id:020}.cast"),
        n => format!("{id:020}.{n}.cast"),
    };
    w.agent.dir.path().join("state/audit/recordings").join(name)
}

#[test]
fn a_card_number_printed_by_cat_is_masked_on_screen_and_in_the_recording() {
    if !enabled() {
        return;
    }
    let w = World::with(
        "ssh-mask",
        214,
        Options {
            policy: MASK_POLICY,
            masking: MASKING_TOML,
            ..Options::default()
        },
    );
    remote_file("card.txt", format!("paid with {PAN} today\n").as_bytes());

    let shell = typed_shell(&w, &["cat card.txt\n", "exit\n"]);
    let screen = text(&shell.stdout);
    assert!(
        screen.contains("**** **** **** 1111"),
        "{screen}\n{}",
        w.agent.log()
    );
    assert!(
        !screen.contains(PAN),
        "the card number reached the screen: {screen}"
    );
    let id = shell_connection(&w);
    let played = replayed(&w, id);
    assert!(played.contains("**** **** **** 1111"), "{played}");
    assert!(!played.contains(PAN), "{played}");
    let file = std::fs::read_to_string(recording_file(&w, id)).unwrap();
    assert!(file.starts_with("{\"version\":2"), "{file}");
    assert!(
        !file.contains(PAN) && !file.contains("4111111111111111"),
        "{file}"
    );
    // Input is recorded only when the target says so (record_input, off by default).
    assert!(!file.contains("\"i\", "), "{file}");

    // A command without a terminal: masked too, stdout and stderr.
    let exec = w
        .ssh(&["127.0.0.1", "cat card.txt; cat card.txt >&2"])
        .output()
        .unwrap();
    assert!(exec.status.success(), "{}", text(&exec.stderr));
    assert_eq!(text(&exec.stdout), "paid with **** **** **** 1111 today\n");
    assert_eq!(text(&exec.stderr), "paid with **** **** **** 1111 today\n");
}

#[test]
fn a_guarded_line_denied_by_policy_never_runs_and_is_marked_in_the_recording() {
    if !enabled() {
        return;
    }
    let w = World::with(
        "ssh-guard",
        215,
        Options {
            target_ssh: "guarded_shell = true\n",
            ..Options::default()
        },
    );
    let home = PathBuf::from(format!("/home/{REMOTE_USER}"));
    let denied = home.join("guard-forbidden-marker");
    let allowed = home.join("guard-allowed-marker");
    let _ = std::fs::remove_file(&denied);
    let _ = std::fs::remove_file(&allowed);
    // SSH_POLICY forbids exec lines with "forbidden"; typed at a guarded shell they are
    // decided the same way.
    let shell = typed_shell(
        &w,
        &[
            "touch guard-forbidden-marker\n",
            "touch guard-allowed-marker\n",
            "echo done-$((1+1))\n",
            "exit\n",
        ],
    );
    let screen = text(&shell.stdout);
    assert!(allowed.exists(), "an allowed line did not run: {screen}");
    assert!(!denied.exists(), "the denied line ran: {screen}");
    assert!(
        screen.contains("portcullis: line refused: denied by policy"),
        "{screen}"
    );
    assert!(
        screen.contains("done-2"),
        "the shell was unusable after a refusal: {screen}"
    );

    let id = shell_connection(&w);
    let refused = w.wait_event("ssh.shell_line", |e| e["decision"] == "deny");
    assert_eq!(refused["command_line"], "touch guard-forbidden-marker");
    assert_eq!(refused["connection_id"], id);
    assert!(refused["policy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p == "no-forbidden-commands"));
    w.wait_event("ssh.shell_line", |e| {
        e["decision"] == "allow" && e["command_line"] == "touch guard-allowed-marker"
    });
    w.wait_event("recording.closed", |e| e["connection_id"] == id);
    let cast = std::fs::read_to_string(recording_file(&w, id)).unwrap();
    assert!(
        cast.contains("\"m\", \"line refused: touch guard-forbidden-marker"),
        "{cast}"
    );
    // The player starts at that marker.
    let out = run(Command::new(portcullis_e2e::agent_bin())
        .args([
            "replay",
            &id.to_string(),
            "--speed",
            "1000",
            "--marker",
            "2",
            "--config",
        ])
        .arg(&w.agent.config));
    assert!(
        text(&out.stdout).contains("done-2"),
        "{}",
        text(&out.stdout)
    );
    // `sessions show` lists the session's commands, the refused one too.
    let show = run(Command::new(portcullis_e2e::agent_bin())
        .args(["sessions", "show", &id.to_string(), "--config"])
        .arg(&w.agent.config));
    let show = text(&show.stdout);
    assert!(
        show.contains("line deny   touch guard-forbidden-marker")
            && show.contains("line allow  touch guard-allowed-marker"),
        "{show}"
    );
}

/// A tmpfs mounted over a directory for one test; unmounted when dropped.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir));
        Self(dir.to_path_buf())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[test]
fn a_recording_that_cannot_be_written_ends_the_session() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-rec-full", 216);
    // The recordings area on a disk with room for the header and little else.
    let _disk = SmallDisk::mount(&w.agent.dir.path().join("state/audit/recordings"), "64k");
    let started = Instant::now();
    let out = output_within(
        &mut w.ssh(&[
            "-tt",
            "127.0.0.1",
            "head -c 3000000 /dev/zero | tr '\\0' a; sleep 20; echo still-here",
        ]),
        Duration::from_secs(30),
    );
    let stderr = text(&out.stderr);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the session outlived its recording"
    );
    assert!(!text(&out.stdout).contains("still-here"));
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr
            .contains("portcullis: the session is ended: the session recording cannot be written"),
        "{stderr}"
    );
    let failed = w.wait_event("recording.failed", |_| true);
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("recording_failure = \"close\""),
        "{failed}"
    );
}

#[test]
fn a_tmux_shell_with_a_resize_is_recorded_and_plays_in_asciinema() {
    if !enabled() {
        return;
    }
    let w = World::with(
        "ssh-tmux",
        217,
        Options {
            target_ssh: "record_input = true\n",
            ..Options::default()
        },
    );
    let socket = w.client_dir("tmux").join("socket");
    let tmux = |args: &[&str]| {
        let mut c = w.client("tmux");
        c.arg("-S").arg(&socket).args(args);
        run(&mut c)
    };
    let ssh = format!("ssh -F {} -tt 127.0.0.1", w.config());
    tmux(&[
        "new-session",
        "-d",
        "-s",
        "rec",
        "-x",
        "80",
        "-y",
        "24",
        &ssh,
    ]);
    let id = shell_connection(&w);
    std::thread::sleep(Duration::from_millis(800));
    tmux(&["send-keys", "-t", "rec", "echo hello-$((20+22))", "Enter"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux(&["resize-window", "-t", "rec", "-x", "100", "-y", "30"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux(&["send-keys", "-t", "rec", "stty size", "Enter"]);
    std::thread::sleep(Duration::from_millis(500));
    tmux(&["send-keys", "-t", "rec", "exit", "Enter"]);
    w.wait_event("recording.closed", |e| e["connection_id"] == id);
    let _ = Command::new("tmux")
        .arg("-S")
        .arg(&socket)
        .arg("kill-server")
        .stderr(Stdio::null())
        .status();

    let file = recording_file(&w, id);
    let cast = std::fs::read_to_string(&file).unwrap();
    let header: Value = serde_json::from_str(cast.lines().next().unwrap()).unwrap();
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(80), Some(24))
    );
    assert!(
        cast.contains("\"r\", \"100x30\""),
        "no resize event: {cast}"
    );
    // record_input: what was typed is there as `i` events.
    assert!(cast.contains("\"i\", \"e"), "no input event: {cast}");
    assert!(
        cast.contains("30 100"),
        "the shell did not see the new size: {cast}"
    );
    // asciinema's own player reads the file (cat writes its output without the timing);
    // it reads keys from /dev/tty even to cat, so `script` gives it a terminal.
    let home = tempfile::tempdir().unwrap();
    let played = output_within(
        Command::new("script")
            .args(["-q", "-e", "-c"])
            .arg(format!("asciinema cat {}", file.display()))
            .arg("/dev/null")
            .env("HOME", home.path())
            .stdin(Stdio::null()),
        Duration::from_secs(20),
    );
    assert!(played.status.success(), "{}", text(&played.stderr));
    assert!(
        text(&played.stdout).contains("hello-42"),
        "{}",
        text(&played.stdout)
    );
}

/// ControlMaster multiplexes terminals on one connection: each one gets its own recording
/// (`<id>.0`, `<id>.1` in the order they started), each replayable, each checked by
/// `audit verify` against its own chunk events.
#[test]
fn two_terminals_on_one_controlmaster_connection_are_each_recorded() {
    if !enabled() {
        return;
    }
    let w = World::new("ssh-rec-mux", 218);
    let control = w.client_dir("mux").join("%C").display().to_string();
    let mux = |args: &[&str]| {
        let mut all = vec!["-o", "ControlMaster=auto", "-o", "ControlPersist=30", "-o"];
        let path = format!("ControlPath={control}");
        all.push(&path);
        all.extend_from_slice(args);
        output_within(&mut w.ssh(&all), Duration::from_secs(30))
    };
    let first = mux(&["-tt", "127.0.0.1", "echo first-terminal"]);
    assert!(
        text(&first.stdout).contains("first-terminal"),
        "{}",
        text(&first.stderr)
    );
    let second = mux(&["-tt", "127.0.0.1", "echo second-terminal"]);
    assert_eq!(second.status.code(), Some(0), "{}", text(&second.stderr));
    assert!(text(&second.stdout).contains("second-terminal"));
    // Commands without a terminal are not recorded.
    let plain = mux(&["127.0.0.1", "echo plain"]);
    assert_eq!(text(&plain.stdout), "plain\n");
    let opened = w.events("connection.opened");
    assert_eq!(opened.len(), 1, "one connection: {opened:#?}");
    let id = opened[0]["connection_id"].as_u64().unwrap();
    for n in [0, 1] {
        w.wait_event("recording.closed", |e| {
            e["connection_id"] == id && e["recording"] == n
        });
    }
    assert!(w
        .events("recording.chunk")
        .iter()
        .all(|e| e["recording"] == 0 || e["recording"] == 1));
    assert!(w.events("ssh.channel_denied").is_empty());
    let cli = |args: &[&str]| {
        run(Command::new(portcullis_e2e::agent_bin())
            .args(args)
            .arg("--config")
            .arg(&w.agent.config))
    };
    // Each file holds its own terminal.
    for (n, command) in [(0, "echo first-terminal"), (1, "echo second-terminal")] {
        let cast = std::fs::read_to_string(recording_file_n(&w, id, n)).unwrap();
        let header: Value = serde_json::from_str(cast.lines().next().unwrap()).unwrap();
        assert_eq!(header["command"], command);
        let name = format!("{id}.{n}");
        let played = text(&cli(&["replay", &name, "--speed", "1000"]).stdout);
        let word = command.trim_start_matches("echo ");
        assert!(played.contains(word), "{name}: {played}");
    }
    // A bare session id plays the first and lists both.
    let out = cli(&["replay", &id.to_string(), "--speed", "1000"]);
    assert!(text(&out.stdout).contains("first-terminal"));
    assert!(!text(&out.stdout).contains("second-terminal"));
    let listed = text(&out.stderr);
    assert!(
        listed.contains("recorded 2 terminals")
            && listed.contains(&format!("{id}.0: "))
            && listed.contains(&format!("{id}.1: ")),
        "{listed}"
    );
    let show = text(&cli(&["sessions", "show", &id.to_string()]).stdout);
    for n in [0, 1] {
        assert!(
            show.contains(&format!("recording {id}.{n}: "))
                && show.contains(&format!("{}", recording_file_n(&w, id, n).display())),
            "{show}"
        );
    }
    assert_eq!(show.matches("matches the audit trail").count(), 2, "{show}");
    // Both are checked against their own chunk events, and damage to the second is named.
    let verify = cli(&["audit", "verify", "--json"]);
    let report: Value = serde_json::from_str(text(&verify.stdout).trim()).unwrap();
    assert_eq!(report["recordings"]["checked"], 2, "{report}");
    assert_eq!(report["recordings"]["ok"], true, "{report}");
    let path = recording_file_n(&w, id, 1);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() - 3;
    bytes[at] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let verify = Command::new(portcullis_e2e::agent_bin())
        .args(["audit", "verify", "--json", "--config"])
        .arg(&w.agent.config)
        .output()
        .unwrap();
    assert!(!verify.status.success(), "{}", text(&verify.stdout));
    let report: Value = serde_json::from_str(text(&verify.stdout).trim()).unwrap();
    let breaks = report["recordings"]["breaks"].as_array().unwrap();
    assert_eq!(breaks.len(), 1, "{report}");
    assert!(
        breaks[0]
            .as_str()
            .unwrap()
            .starts_with(&format!("recording {id}.1 ")),
        "{report}"
    );
    assert!(
        text(&cli(&["replay", &format!("{id}.0"), "--speed", "1000"]).stdout)
            .contains("first-terminal")
    );
    let _ = w
        .ssh(&[
            "-o",
            &format!("ControlPath={control}"),
            "-O",
            "exit",
            "127.0.0.1",
        ])
        .output();
}

/// What a Python SSH client (asyncssh, Debian's) reports for each command: exit status
/// and the exit-signal's fields, which OpenSSH's `ssh` does not print.
const EXIT_REPORT: &str = r#"
import asyncio, json, sys
import asyncssh

async def main():
    port, known, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    keys = [key] if key else None
    async with asyncssh.connect("127.0.0.1", port=port, username="pcssh", known_hosts=known,
                                client_keys=keys, agent_path=None, password=None) as conn:
        for cmd in ["kill -9 $$", "kill -SEGV $$", "exit 3"]:
            r = await conn.run(cmd)
            print(json.dumps([cmd, r.exit_status, r.exit_signal]))

asyncio.run(main())
"#;

#[test]
fn exit_signal_reaches_the_client_exactly_as_direct() {
    if !enabled() {
        return;
    }
    let problem = (!Path::new("/usr/lib/python3/dist-packages/asyncssh").exists())
        .then(|| "Debian's python3-asyncssh is not installed (cargo xtask setup)".to_string());
    if !portcullis_e2e::prerequisites_met(problem) {
        return;
    }
    let w = World::new("ssh-exit-signal", 233);
    let script = w.files.path().join("exit_report.py");
    std::fs::write(&script, EXIT_REPORT).unwrap();
    let known = w.files.path().join("known_hosts").display().to_string();
    let through = output_within(
        w.client("/usr/bin/python3")
            .arg(&script)
            .args([&w.port.to_string(), &known, ""]),
        Duration::from_secs(60),
    );
    assert!(through.status.success(), "{}", text(&through.stderr));
    // Direct to the same sshd, outside the cgroup, with a certificate from the same user CA.
    let dir = w.client_dir("direct-key");
    let key = dir.join("id");
    keygen(&key);
    run(Command::new("ssh-keygen")
        .args(["-q", "-s"])
        .arg(w.agent.dir.path().join("state/ssh/user_ca"))
        .args(["-I", "direct", "-n", REMOTE_USER])
        .arg(key.with_extension("pub")));
    let direct_known = dir.join("known");
    let host_pub = std::fs::read_to_string(w.files.path().join("sshd/host_key.pub")).unwrap();
    std::fs::write(&direct_known, format!("[127.0.0.1]:{} {host_pub}", w.port)).unwrap();
    run(Command::new("chown")
        .args(["-R", &format!("{}:{}", w.client_uid, w.client_uid)])
        .arg(&dir));
    let mut direct_cmd = Command::new("/usr/bin/python3");
    exec_in_cgroup_as(&mut direct_cmd, None, Some(w.client_uid));
    direct_cmd
        .env("HOME", format!("/home/{LOCAL_USER}"))
        .stdin(Stdio::null())
        .arg(&script)
        .args([
            &w.port.to_string(),
            &direct_known.display().to_string(),
            &key.display().to_string(),
        ]);
    let direct = output_within(&mut direct_cmd, Duration::from_secs(60));
    assert!(direct.status.success(), "{}", text(&direct.stderr));
    let through = text(&through.stdout);
    eprintln!("through the agent:\n{through}");
    assert_eq!(through, text(&direct.stdout));
    assert!(
        through.starts_with("[\"kill -9 $$\", -1, [\"KILL\", false, \"\", \"\"]]\n"),
        "{through}"
    );
}

// Commands and shells that wait for approval: alice (the client account's login, in
// dba-leads herself) runs them, bob (dba-leads) decides with his own login through
// `portcullis approvals`. Slots 186-189.

/// Every command and shell is allowed, but one that says `approve-me` waits for dba-leads.
const APPROVAL_POLICY: &str = r#"
@id("ssh-work")
permit (
    principal,
    action in [Portcullis::Action::"ssh_shell", Portcullis::Action::"ssh_exec"],
    resource
)
when { resource.protocol == "ssh" };

@id("changes-need-approval")
@approval("dba-leads")
permit (principal, action == Portcullis::Action::"ssh_exec", resource)
when { context.command_line like "*approve-me*" };
"#;

/// bob's uid for `portcullis approvals` (no account needed: the login is the uid's).
const BOB: u32 = 48186;

fn approvals_enabled() -> bool {
    enabled() && portcullis_e2e::oidc::oidc_enabled()
}

/// An SSH world whose identities come from the real provider; alice (the client account)
/// and bob are logged in.
fn approval_world(
    name: &str,
    n: u8,
    policy: &str,
    approvals: &str,
) -> (World, portcullis_e2e::oidc::OidcProvider) {
    use portcullis_e2e::oidc::{OidcOptions, OidcProvider, OidcUser};
    let provider = OidcProvider::start(OidcOptions {
        users: vec![
            OidcUser::new("alice", &["engineering", "dba-leads"]),
            OidcUser::new("bob", &["dba-leads"]),
        ],
        ..OidcOptions::default()
    });
    let identity = format!(
        "[identity]\nissuer = \"{}\"\nleeway_secs = 5\n[insecure]\nallow_plaintext_loopback = true\n",
        provider.issuer()
    );
    let w = World::with(
        name,
        n,
        Options {
            identity: &identity,
            base_policy: APPROVAL_POLICY,
            policy,
            approvals,
            ..Options::default()
        },
    );
    oidc_login(&w.agent, &provider, w.client_uid, "alice");
    oidc_login(&w.agent, &provider, BOB, "bob");
    (w, provider)
}

/// `portcullis login` as `uid`, the device flow finished in "the browser" as `user`.
fn oidc_login(agent: &Agent, provider: &portcullis_e2e::oidc::OidcProvider, uid: u32, user: &str) {
    provider.login(agent, uid, user);
}

/// `portcullis approvals …` as `uid`.
fn approvals_cli(w: &World, uid: u32, args: &[&str]) -> Output {
    let mut full = vec!["approvals"];
    full.extend_from_slice(args);
    w.agent.cli_as(uid, &full).output().unwrap()
}

fn show_request(w: &World, uid: u32, id: &str) -> Value {
    let o = approvals_cli(w, uid, &["show", id, "--json"]);
    assert!(o.status.success(), "show {id}: {}", text(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

/// A client whose stderr is read line by line as it comes, so the test sees the notice
/// while the command still waits.
struct Waiting {
    child: Child,
    stderr: std::sync::mpsc::Receiver<String>,
    seen: String,
}

impl Waiting {
    fn spawn(mut cmd: Command, input: &[u8]) -> Self {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        std::io::Write::write_all(&mut stdin, input).unwrap();
        // Closing it sends EOF: that too waits with the command.
        drop(stdin);
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            stderr: rx,
            seen: String::new(),
        }
    }

    /// The request id of the notice on stderr (`… needs approval: request r-… asks for …`).
    fn notice(&mut self) -> (String, String) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if let Some(at) = line.find("needs approval: request r-") {
                        let at = at + "needs approval: request ".len();
                        return (line[at..at + 12].to_string(), line);
                    }
                }
                Err(_) => panic!("no approval notice on stderr; it said: {}", self.seen),
            }
        }
    }

    /// Waits for the client's end: its exit code, stdout, and the rest of its stderr.
    fn finish(mut self, limit: Duration) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "the client did not finish in {limit:?}; stderr: {}",
                    self.seen
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut stdout = String::new();
        std::io::Read::read_to_string(&mut self.child.stdout.take().unwrap(), &mut stdout).unwrap();
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(2)) {
            self.seen.push_str(&line);
            self.seen.push('\n');
        }
        (status.code(), stdout, self.seen)
    }
}

/// A file the remote account's command creates, to tell whether it ran.
fn remote_marker(name: &str) -> PathBuf {
    let path = PathBuf::from(format!("/home/{REMOTE_USER}/{name}"));
    let _ = std::fs::remove_file(&path);
    path
}

#[test]
fn an_ssh_command_waits_for_approval_then_runs_with_the_input_sent_meanwhile() {
    if !approvals_enabled() {
        return;
    }
    let (w, _provider) = approval_world("ssh-appr-run", 186, "", "");
    let marker = remote_marker("approved-186");
    let command = format!("touch {}; echo approve-me; cat", marker.display());
    let mut waiting = Waiting::spawn(w.ssh(&["127.0.0.1", &command]), b"typed while it waited\n");
    let (id, notice) = waiting.notice();
    assert!(
        notice.starts_with(&format!("portcullis: `{command}` needs approval: request {id} asks for 1 approval from group `dba-leads`; follow it with `portcullis approvals show {id}`")),
        "{notice}"
    );
    let r = show_request(&w, BOB, &id);
    assert_eq!(r["state"], "pending", "{r}");
    assert_eq!(r["asked"]["kind"], "command", "{r}");
    assert_eq!(r["asked"]["command"], command.as_str(), "{r}");
    assert_eq!(r["asked"]["ssh_user"], REMOTE_USER, "{r}");
    assert_eq!(r["requester"]["subject"], "alice", "{r}");
    // Nothing reached the server while it waited: not the command, not its input.
    std::thread::sleep(Duration::from_millis(500));
    assert!(!marker.exists(), "the waiting command ran");

    // alice is in dba-leads, but it is her own request.
    let own = approvals_cli(&w, w.client_uid, &["approve", &id, "--reason", "mine"]);
    assert!(!own.status.success());
    assert!(
        text(&own.stderr).contains("segregation of duties"),
        "{}",
        text(&own.stderr)
    );
    assert_eq!(show_request(&w, BOB, &id)["state"], "pending");
    assert!(!marker.exists(), "the waiting command ran");

    let o = approvals_cli(&w, BOB, &["approve", &id, "--reason", "looks right"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (code, stdout, stderr) = waiting.finish(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{stderr}\n{}", w.agent.log());
    assert_eq!(stdout, "approve-me\ntyped while it waited\n", "{stderr}");
    assert!(marker.exists());

    let exec = w.wait_event("ssh.exec", |e| e["command_line"] == command.as_str());
    assert_eq!(exec["decision"], "allow", "{exec}");
    let ids: Vec<&str> = exec["policy_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(ids.contains(&"changes-need-approval"), "{exec}");
    assert!(ids.contains(&format!("approval:{id}").as_str()), "{exec}");
    let requested = w.wait_event("approval.requested", |e| e["request_id"] == id.as_str());
    assert_eq!(requested["asked"], "command", "{requested}");
    assert_eq!(
        requested["approval_statement"],
        command.as_str(),
        "{requested}"
    );
    assert_eq!(
        requested["connection_id"], exec["connection_id"],
        "{requested}"
    );
    w.wait_event("approval.approved", |e| e["request_id"] == id.as_str());
    let _ = std::fs::remove_file(&marker);
}

#[test]
fn a_denied_ssh_command_exits_1_with_the_reason_and_its_controlmaster_connection_goes_on() {
    if !approvals_enabled() {
        return;
    }
    let (w, _provider) = approval_world("ssh-appr-deny", 187, "", "");
    let control = w.client_dir("mux").join("%C").display().to_string();
    let mux = |cmd: &str| {
        let mut c = w.ssh(&[
            "-o",
            "ControlMaster=auto",
            "-o",
            &format!("ControlPath={control}"),
            "-o",
            "ControlPersist=30",
            "127.0.0.1",
            cmd,
        ]);
        c.stdin(Stdio::null());
        c
    };
    assert_eq!(
        text(&mux("echo before").output().unwrap().stdout),
        "before\n"
    );
    let marker = remote_marker("denied-187");
    let command = format!("touch {}; echo approve-me", marker.display());
    let mut waiting = Waiting::spawn(mux(&command), b"");
    let (id, _) = waiting.notice();
    // The connection's other channels go on while one waits.
    assert_eq!(
        text(&mux("echo meanwhile").output().unwrap().stdout),
        "meanwhile\n"
    );
    let o = approvals_cli(&w, BOB, &["deny", &id, "--reason", "not during the freeze"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (code, stdout, stderr) = waiting.finish(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "portcullis: approval request {id} was denied by bob@example.test: not during the freeze"
        )),
        "{stderr}"
    );
    assert!(stdout.is_empty(), "{stdout}");
    assert!(!marker.exists(), "the denied command ran");
    assert_eq!(text(&mux("echo after").output().unwrap().stdout), "after\n");

    let opened = w.events("connection.opened");
    assert_eq!(
        opened.len(),
        1,
        "one connection for every channel: {opened:#?}"
    );
    let denied = w.wait_event("ssh.channel_denied", |e| {
        e["command_line"] == command.as_str()
    });
    assert_eq!(denied["decision"], "approval", "{denied}");
    assert!(
        denied["policy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == &Value::from(format!("approval:{id}"))),
        "{denied}"
    );
    assert!(
        denied["reason"]
            .as_str()
            .unwrap()
            .contains("not during the freeze"),
        "{denied}"
    );
    w.wait_event("ssh.exec", |e| e["command_line"] == "echo after");

    // Approved, it is decided again: a forbid added while it waited still refuses it.
    let frozen = remote_marker("frozen-187");
    let command = format!("touch {}; echo approve-me again", frozen.display());
    let mut waiting = Waiting::spawn(mux(&command), b"");
    let (again, _) = waiting.notice();
    let reloads = w.events("policy.reloaded").len();
    std::fs::write(
        w.agent.dir.path().join("policies/freeze.cedar"),
        "@id(\"change-freeze\")\nforbid (principal, action == Portcullis::Action::\"ssh_exec\", resource)\n\
         when { context.command_line like \"*approve-me again*\" };\n",
    )
    .unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &w.agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.events("policy.reloaded").len() == reloads {
        assert!(Instant::now() < deadline, "no reload: {}", w.agent.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let o = approvals_cli(
        &w,
        BOB,
        &["approve", &again, "--reason", "before the freeze"],
    );
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (code, _, stderr) = waiting.finish(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "approval request {again} was approved, but the exec is now denied by policy"
        )) && stderr.contains("change-freeze"),
        "{stderr}"
    );
    assert!(!frozen.exists(), "a command forbidden while it waited ran");
    let _ = w
        .ssh(&[
            "-o",
            &format!("ControlPath={control}"),
            "-O",
            "exit",
            "127.0.0.1",
        ])
        .output();
}

#[test]
fn a_waiting_ssh_command_whose_client_goes_is_withdrawn_and_one_not_approved_in_time_exits_1() {
    if !approvals_enabled() {
        return;
    }
    let (w, _provider) = approval_world("ssh-appr-gone", 188, "", "timeout_seconds = 4\n");
    let marker = remote_marker("withdrawn-188");
    let control = w.client_dir("mux").join("%C").display().to_string();
    let mux_args = [
        "-o".to_string(),
        "ControlMaster=auto".to_string(),
        "-o".to_string(),
        format!("ControlPath={control}"),
        "-o".to_string(),
        "ControlPersist=30".to_string(),
        "127.0.0.1".to_string(),
    ];
    let mux = |cmd: &str| {
        let mut args: Vec<&str> = mux_args.iter().map(String::as_str).collect();
        args.push(cmd);
        w.ssh(&args)
    };
    assert_eq!(text(&mux("echo up").output().unwrap().stdout), "up\n");

    // A ControlMaster client killed while its command waits: the master closes that
    // channel, and the connection stays.
    let command = format!("touch {}; echo approve-me", marker.display());
    let mut waiting = Waiting::spawn(mux(&command), b"");
    let (first, _) = waiting.notice();
    waiting.child.kill().unwrap();
    let _ = waiting.child.wait();
    let expired = w.wait_event("approval.expired", |e| e["request_id"] == first.as_str());
    assert_eq!(expired["approval_state"], "withdrawn", "{expired}");
    assert!(
        expired["reason"]
            .as_str()
            .unwrap()
            .contains("the client closed the channel"),
        "{expired}"
    );
    // An approval now would start a command nobody waits for.
    let late = approvals_cli(&w, BOB, &["approve", &first, "--reason", "late"]);
    assert!(!late.status.success());
    assert!(
        text(&late.stderr).contains("withdrawn"),
        "{}",
        text(&late.stderr)
    );
    assert_eq!(
        text(&mux("echo still up").output().unwrap().stdout),
        "still up\n"
    );
    let _ = w
        .ssh(&[
            "-o",
            &format!("ControlPath={control}"),
            "-O",
            "exit",
            "127.0.0.1",
        ])
        .output();

    // A plain client killed while its command waits: its connection ends.
    let mut waiting = Waiting::spawn(w.ssh(&["127.0.0.1", &command]), b"");
    let (second, _) = waiting.notice();
    assert_ne!(first, second);
    waiting.child.kill().unwrap();
    let _ = waiting.child.wait();
    let expired = w.wait_event("approval.expired", |e| e["request_id"] == second.as_str());
    assert_eq!(expired["approval_state"], "withdrawn", "{expired}");
    assert!(
        expired["reason"]
            .as_str()
            .unwrap()
            .contains("the SSH connection ended"),
        "{expired}"
    );
    assert_eq!(show_request(&w, BOB, &second)["state"], "withdrawn");

    // Nobody decides: at the timeout the client is told and exits 1.
    let started = Instant::now();
    let mut waiting = Waiting::spawn(w.ssh(&["127.0.0.1", &command]), b"");
    let (third, notice) = waiting.notice();
    assert!(notice.contains("waits at most 4 s"), "{notice}");
    let (code, stdout, stderr) = waiting.finish(Duration::from_secs(30));
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
    assert!(
        stderr.contains(&format!(
            "portcullis: approval request {third} expired: not approved within 4 s"
        )),
        "{stderr}"
    );
    assert!(started.elapsed() >= Duration::from_secs(4));
    let expired = w.wait_event("approval.expired", |e| e["request_id"] == third.as_str());
    assert_eq!(expired["approval_state"], "expired", "{expired}");
    w.wait_event("ssh.channel_denied", |e| {
        e["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&format!("{third} expired")))
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(!marker.exists(), "a withdrawn or expired command ran");
}

#[test]
fn an_interactive_shell_waits_for_approval_and_is_recorded_once_approved() {
    if !approvals_enabled() {
        return;
    }
    let shells = r#"
@id("shells-need-approval")
@approval("dba-leads")
permit (principal, action == Portcullis::Action::"ssh_shell", resource)
when { resource.protocol == "ssh" };
"#;
    let (w, _provider) = approval_world("ssh-appr-shell", 189, shells, "");
    let mut waiting = Waiting::spawn(
        w.ssh(&["-tt", "127.0.0.1"]),
        b"echo shell-$((6*7)); exit 7\n",
    );
    let (id, notice) = waiting.notice();
    assert!(
        notice.starts_with(&format!(
            "portcullis: this shell needs approval: request {id}"
        )),
        "{notice}"
    );
    let r = show_request(&w, BOB, &id);
    assert_eq!(r["asked"]["kind"], "command", "{r}");
    assert!(r["asked"]["command"].is_null(), "{r}");
    // Its recording starts with the shell, once approved.
    let recordings = w.agent.dir.path().join("state/audit/recordings");
    let started = std::fs::read_dir(&recordings).map_or(0, |d| d.count());
    assert_eq!(
        started, 0,
        "a recording began before the shell was approved"
    );
    let o = approvals_cli(&w, BOB, &["approve", &id, "--reason", "on call"]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let (code, stdout, stderr) = waiting.finish(Duration::from_secs(30));
    assert_eq!(code, Some(7), "{stdout}\n{stderr}");
    assert!(stdout.contains("shell-42"), "{stdout}");
    let shell = w.wait_event("ssh.shell", |_| true);
    assert!(
        shell["policy_ids"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p == &Value::from(format!("approval:{id}"))),
        "{shell}"
    );
    let id = shell["connection_id"].clone();
    w.wait_event("recording.closed", |e| e["connection_id"] == id);
    // The connection's user certificate allowed a pty for the shell that might wait, and
    // finding that out asked nobody for anything: the shell's is the only request.
    let all = w
        .agent
        .cli_as(0, &["approvals", "list", "--all", "--json"])
        .output()
        .unwrap();
    let all: Value = serde_json::from_slice(&all.stdout).unwrap();
    assert_eq!(all.as_array().unwrap().len(), 1, "{all:#}");
}

// ---- The console replays an SSH recording in a real browser (slots 236 and 237) ----

/// An SSH shell typed through the redirect is recorded; an auditor signed in to the console
/// in headless Chromium (at the real provider's login form) opens the session's timeline,
/// its replay shows the command's output, and Play steps through the recording by itself
/// (a meta refresh, no script) until the output is on screen. Screenshots are kept in
/// `target/test-artifacts/console/`. The world is slot 236's; the console listens on slot
/// 237's server port.
#[test]
fn the_console_replays_an_ssh_recording_in_the_browser_and_plays_it_by_itself() {
    use portcullis_e2e::browser::{self, Browser};
    use portcullis_e2e::oidc::{OidcOptions, OidcProvider, OidcUser};
    if !approvals_enabled() || !portcullis_e2e::prerequisites_met(browser::missing_prerequisite()) {
        return;
    }
    let console_port = Slot::new(237).server_port;
    let console = format!("https://127.0.0.1:{console_port}");
    let provider = OidcProvider::start(OidcOptions {
        users: vec![OidcUser::new("alice", &["engineering", "audit"])],
        extra_clients: vec![serde_json::json!({
            "client_id": "portcullis-console",
            "token_endpoint_auth_method": "none",
            "grant_types": ["authorization_code"],
            "response_types": ["code"],
            "redirect_uris": [format!("{console}/auth/callback")],
        })],
        ..OidcOptions::default()
    });
    let identity = format!(
        "[identity]\nissuer = \"{}\"\nleeway_secs = 5\n[insecure]\nallow_plaintext_loopback = true\n\
         [console]\nlisten = \"127.0.0.1:{console_port}\"\nclient_id = \"portcullis-console\"\n\
         auditor_groups = [\"audit\"]\n",
        provider.issuer()
    );
    let w = World::with(
        "ssh-console-replay",
        236,
        Options {
            identity: &identity,
            ..Options::default()
        },
    );
    oidc_login(&w.agent, &provider, w.client_uid, "alice");
    let shell = typed_shell(&w, &["echo replayed-$((6*7))\n", "exit\n"]);
    assert!(
        text(&shell.stdout).contains("replayed-42"),
        "{}\n{}",
        text(&shell.stderr),
        w.agent.log()
    );
    let id = shell_connection(&w);
    w.wait_event("recording.closed", |e| e["connection_id"] == id);

    let js = |s: &str| serde_json::to_string(s).unwrap();
    let browser = Browser::launch_trusting(&w.agent.dir.path().join("state/ca/ca.pem")).unwrap();
    let page = browser.page().unwrap();
    page.goto(&format!("{console}/signin")).unwrap();
    page.wait_for(
        "document.querySelector('input[name=login]')",
        Duration::from_secs(15),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", provider.log()));
    page.fill("input[name=login]", "alice").unwrap();
    page.fill("input[name=password]", "any password").unwrap();
    page.click("button[type=submit]").unwrap();
    let home = format!(
        "location.origin === {} && location.pathname === '/'",
        js(&console)
    );
    page.wait_for(
        &format!("({home}) || document.querySelector('input[name=prompt][value=consent]')"),
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", provider.log()));
    if page.eval(&home).unwrap() != Value::Bool(true) {
        page.click("button[type=submit]").unwrap();
    }
    page.wait_for(
        &format!("({home}) && document.readyState === 'complete'"),
        Duration::from_secs(20),
    )
    .unwrap();
    let shot = |name: &str| {
        page.screenshot(&browser::artifacts_dir("console").unwrap().join(name))
            .unwrap();
    };

    // The timeline, found from the id alone, links to the replay.
    page.goto(&format!("{console}/sessions/{id}")).unwrap();
    page.wait_for(
        "document.querySelector('a[href$=\"/replay\"]')",
        Duration::from_secs(20),
    )
    .unwrap_or_else(|e| panic!("{e:#}: {}", page.text().unwrap_or_default()));
    page.click("a[href$=\"/replay\"]").unwrap();
    page.wait_for(
        "document.querySelector('pre.screen') && document.readyState === 'complete'",
        Duration::from_secs(20),
    )
    .unwrap();
    shot("replay-ssh.png");
    let screen = page
        .eval("document.querySelector('pre.screen').innerText")
        .unwrap();
    assert!(
        screen.as_str().unwrap().contains("replayed-42"),
        "the replay's last screen: {screen}\n{}\n{}",
        page.text().unwrap_or_default(),
        std::fs::read_to_string(recording_file(&w, id)).unwrap_or_default()
    );

    // From the start, Play at 8× reaches the output by itself.
    page.goto(&format!("{console}/sessions/{id}/replay?t=0"))
        .unwrap();
    page.wait_for(
        "document.readyState === 'complete'",
        Duration::from_secs(20),
    )
    .unwrap();
    let start = page
        .eval("document.querySelector('pre.screen').innerText")
        .unwrap();
    assert!(!start.as_str().unwrap().contains("replayed-42"), "{start}");
    page.click("a[href$=\"&play=8\"]").unwrap();
    page.wait_for(
        "location.search.includes('play=8') && document.querySelector('pre.screen') \
         && document.querySelector('pre.screen').innerText.includes('replayed-42')",
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e:#}: {}", page.text().unwrap_or_default()));
    shot("replay-ssh-playing.png");
    let errors: Vec<String> = page
        .console_errors()
        .unwrap()
        .iter()
        .filter(|e| e.url.starts_with(&console))
        .map(ToString::to_string)
        .collect();
    assert!(errors.is_empty(), "the browser reported {errors:?}");
}
