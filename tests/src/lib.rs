//! Harness for the end-to-end suites: a test cgroup, a real agent process attached to
//! it, a loopback echo server, and the probe client run as unprivileged users.
//!
//! Isolation: each test gets its own child cgroup, bpffs pin directory, proxy port and
//! loopback addresses, so tests run in parallel without seeing each other. Every
//! destination is on loopback.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test harness: a failure is a test failure"
)]

pub mod browser;
pub mod console;
pub mod idle_tls;
pub mod oidc;
pub mod pgbouncer;
pub mod postgres;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Whether the end-to-end suite can run here. Under `cargo xtask test` (and in CI) it
/// must: a missing prerequisite is a failure, never a silent skip.
pub fn e2e_enabled() -> bool {
    let required = std::env::var_os("PORTCULLIS_E2E").is_some() || std::env::var_os("CI").is_some();
    let problem = if !is_root() {
        Some("the end-to-end tests need root (they attach eBPF programs)")
    } else if cgroup2_root().is_none() {
        Some("no cgroup2 hierarchy is mounted")
    } else if !agent_bin().is_file() {
        Some("the agent binary is missing; run `cargo xtask test` (it builds it)")
    } else {
        None
    };
    match problem {
        None => true,
        Some(p) if required => panic!("end-to-end prerequisites missing: {p}"),
        Some(p) => {
            eprintln!(
                "skipping end-to-end test: {p} (set PORTCULLIS_E2E=required to make this an error)"
            );
            false
        }
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn agent_bin() -> PathBuf {
    std::env::var_os("PORTCULLIS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/debug/portcullis"))
}

pub fn probe_bin() -> PathBuf {
    // Built next to the agent by `cargo xtask test`; cargo also builds it for this crate's tests.
    option_env!("CARGO_BIN_EXE_portcullis-probe")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/debug/portcullis-probe"))
}

pub fn cgroup2_root() -> Option<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// A child cgroup for one test. Removing it kills whatever is left inside.
pub struct TestCgroup {
    pub path: PathBuf,
}

impl TestCgroup {
    pub fn new(name: &str) -> Self {
        let path = cgroup2_root().unwrap().join("portcullis-e2e").join(name);
        if path.exists() {
            kill_cgroup(&path);
        }
        std::fs::create_dir_all(&path).unwrap();
        Self { path }
    }
}

fn kill_cgroup(path: &Path) {
    let kill = path.join("cgroup.kill");
    if kill.exists() {
        let _ = std::fs::write(&kill, "1");
    } else if let Ok(procs) = std::fs::read_to_string(path.join("cgroup.procs")) {
        for pid in procs.split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status();
        }
    }
    for _ in 0..100 {
        if std::fs::remove_dir(path).is_ok() || !path.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        kill_cgroup(&self.path);
    }
}

/// The loopback addresses and ports one test owns.
#[derive(Clone, Copy, Debug)]
pub struct Slot {
    /// Second octet of the test's 127.x.0.0/16 block (see [`Slot::new`]).
    pub net: u8,
    pub proxy_port: u16,
    pub server_port: u16,
}

/// The slots' server ports (47000–47254) lie in the kernel's ephemeral range: a busy run's
/// outgoing connection may take one as its local port, and a test server (sshd) then cannot
/// bind it ("Address already in use"). Reserved ports are never handed out as ephemeral ones;
/// the reservation is added to whatever the host reserves already (root only, as the e2e
/// suites run; elsewhere it is left alone and nothing listens on them anyway).
fn reserve_server_ports() {
    static DONE: std::sync::Once = std::sync::Once::new();
    DONE.call_once(|| {
        const FILE: &str = "/proc/sys/net/ipv4/ip_local_reserved_ports";
        const SERVERS: &str = "47000-47254";
        let Ok(current) = std::fs::read_to_string(FILE) else {
            return;
        };
        let current = current.trim();
        if current.split(',').any(|r| r == SERVERS) {
            return;
        }
        let wanted = if current.is_empty() {
            SERVERS.to_string()
        } else {
            format!("{current},{SERVERS}")
        };
        let _ = std::fs::write(FILE, wanted);
    });
}

impl Slot {
    /// Slots 0–155 own 127.(100+n).0.0/16; 156–254 own 127.(n−155).0.0/16, below every
    /// other slot's block and above 127.0.0.0/16, where the test servers listen.
    pub fn new(n: u8) -> Self {
        assert!(n < 255, "slot {n}: 255 would share slot 0's block");
        reserve_server_ports();
        Self {
            net: 100u8.checked_add(n).unwrap_or_else(|| n - 155),
            proxy_port: 900 + u16::from(n),
            server_port: 47000 + u16::from(n),
        }
    }

    pub fn v4(&self, host: u8) -> SocketAddr {
        format!("127.{}.0.{host}:{}", self.net, self.server_port)
            .parse()
            .unwrap()
    }

    pub fn v4_in(&self, third: u8, host: u8) -> SocketAddr {
        format!("127.{}.{third}.{host}:{}", self.net, self.server_port)
            .parse()
            .unwrap()
    }

    pub fn mapped(&self, host: u8) -> SocketAddr {
        format!("[::ffff:127.{}.0.{host}]:{}", self.net, self.server_port)
            .parse()
            .unwrap()
    }

    pub fn v6_loopback(&self) -> SocketAddr {
        format!("[::1]:{}", self.server_port).parse().unwrap()
    }

    pub fn proxy_v4(&self) -> SocketAddr {
        format!("127.0.0.1:{}", self.proxy_port).parse().unwrap()
    }
}

/// An echo server that answers `peer=<address it saw>\n` and then echoes; it counts
/// what it accepted, so a test can prove that nothing reached it.
pub struct EchoServer {
    pub accepted: Arc<AtomicUsize>,
    pub peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl EchoServer {
    pub fn start(addrs: &[SocketAddr]) -> Self {
        Self::serve(addrs.iter().map(|a| bind_listener(*a)).collect())
    }

    /// An echo server whose sockets live in the named network namespace (`ip netns add`):
    /// a thread joins it only to bind them, as a socket stays in the namespace it was
    /// created in.
    pub fn start_in_netns(ns: &str, addrs: &[SocketAddr]) -> Self {
        let path = format!("/run/netns/{ns}");
        let addrs = addrs.to_vec();
        let listeners = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            // setns changes only this short-lived thread.
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            addrs.iter().map(|a| bind_listener(*a)).collect()
        })
        .join()
        .unwrap();
        Self::serve(listeners)
    }

    fn serve(listeners: Vec<TcpListener>) -> Self {
        let accepted = Arc::new(AtomicUsize::new(0));
        let peers = Arc::new(Mutex::new(Vec::new()));
        for listener in listeners {
            let accepted = Arc::clone(&accepted);
            let peers = Arc::clone(&peers);
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let peer = stream.peer_addr().unwrap();
                    peers.lock().unwrap().push(peer);
                    std::thread::spawn(move || {
                        let _ = writeln!(stream, "peer={peer}");
                        let mut reader = BufReader::new(stream.try_clone().unwrap());
                        let mut line = String::new();
                        while reader.read_line(&mut line).map(|n| n > 0).unwrap_or(false) {
                            let _ = stream.write_all(line.as_bytes());
                            line.clear();
                        }
                    });
                }
            });
        }
        Self { accepted, peers }
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn bind_listener(addr: SocketAddr) -> TcpListener {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    if addr.is_ipv6() {
        s.set_only_v6(true).unwrap();
    }
    s.set_reuse_address(true).unwrap();
    s.bind(&addr.into())
        .unwrap_or_else(|e| panic!("binding {addr}: {e}"));
    s.listen(4096).unwrap();
    s.into()
}

/// The lines of each segment of an audit store, oldest first, decompressed. Sealed segments
/// are compressed beside the plain file, which goes after: each segment is read once, from
/// the plain file while both exist, from the compressed one once it is gone (even between
/// the listing and the read).
pub fn segment_texts(dir: &Path) -> Vec<String> {
    let mut seqs: Vec<u64> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter_map(|e| {
                    portcullis_audit_store::parse_segment_file_name(e.file_name().to_str()?)
                })
                .collect()
        })
        .unwrap_or_default();
    seqs.sort_unstable();
    seqs.dedup();
    seqs.into_iter()
        .map(|seq| {
            let plain = dir.join(portcullis_audit_store::segment_file_name(seq));
            let compressed = dir.join(portcullis_audit_store::compressed_segment_file_name(seq));
            let bytes = portcullis_audit_store::read_segment_file(&plain)
                .or_else(|_| portcullis_audit_store::read_segment_file(&compressed))
                .unwrap_or_default();
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .collect()
}

/// A running `portcullis agent`, started inside the test cgroup so that its own
/// upstream connections pass the kernel hooks (and must be exempted by the mark).
pub struct Agent {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
    cgroup: PathBuf,
    env: Vec<(String, String)>,
}

pub struct Target<'a> {
    pub name: &'a str,
    pub address: &'a str,
    pub port: u16,
    pub upstream: Option<SocketAddr>,
}

impl Agent {
    /// The `portcullis` CLI against this agent's control socket, run as `uid` (gid `uid`).
    pub fn cli_as(&self, uid: u32, args: &[&str]) -> Command {
        use std::os::unix::process::CommandExt;
        let mut c = Command::new(agent_bin());
        c.args(args)
            .arg("--socket")
            .arg(&self.socket)
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::null());
        c
    }

    /// A config for one test. Without identity settings the agent attributes
    /// connections to the Unix account alone.
    pub fn config_text(
        dir: &Path,
        name: &str,
        slot: Slot,
        cgroup: &Path,
        targets: &[Target<'_>],
    ) -> String {
        Self::config_text_with(
            dir,
            name,
            slot,
            cgroup,
            targets,
            "[insecure]\nunix_identity_only = true\n",
        )
    }

    /// `extra` is appended as is (identity settings).
    pub fn config_text_with(
        dir: &Path,
        name: &str,
        slot: Slot,
        cgroup: &Path,
        targets: &[Target<'_>],
        extra: &str,
    ) -> String {
        let mut text = format!(
            "state_dir = \"{state}\"\n[control]\nsocket = \"{sock}\"\n[proxy]\nport = {port}\ndrain_timeout_secs = 5\n\
             [bpf]\ncgroup = \"{cg}\"\npin_dir = \"/sys/fs/bpf/portcullis-e2e-{name}\"\n\
             [policy]\ndir = \"{policies}\"\n{extra}",
            state = dir.join("state").display(),
            sock = dir.join("control.sock").display(),
            port = slot.proxy_port,
            cg = cgroup.display(),
            extra = extra,
            policies = dir.join("policies").display(),
        );
        for t in targets {
            text.push_str(&format!(
                "[[target]]\nname = \"{}\"\nprotocol = \"tcp\"\naddress = \"{}\"\nport = {}\n",
                t.name, t.address, t.port
            ));
            if let Some(u) = t.upstream {
                text.push_str(&format!("upstream = \"{u}\"\n"));
            }
        }
        text
    }

    pub fn start(name: &str, slot: Slot, cgroup: &TestCgroup, targets: &[Target<'_>]) -> Self {
        Self::start_with_env(name, slot, cgroup, targets, &[])
    }

    pub fn start_with_env(
        name: &str,
        slot: Slot,
        cgroup: &TestCgroup,
        targets: &[Target<'_>],
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_with(name, slot, cgroup, targets, None, env)
    }

    /// `extra`: config appended to the generated one (None: Unix identity only).
    pub fn start_with(
        name: &str,
        slot: Slot,
        cgroup: &TestCgroup,
        targets: &[Target<'_>],
        extra: Option<&str>,
        env: &[(&str, &str)],
    ) -> Self {
        let mut agent = Self::prepare(name, slot, cgroup, targets, extra, env);
        agent.spawn();
        agent
    }

    /// Writes the config and the allow-connect policy without starting the agent, so a
    /// test can add files (policies, credentials) first; `spawn` starts it.
    pub fn prepare(
        name: &str,
        slot: Slot,
        cgroup: &TestCgroup,
        targets: &[Target<'_>],
        extra: Option<&str>,
        env: &[(&str, &str)],
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("portcullis.toml");
        std::fs::create_dir_all(dir.path().join("policies")).unwrap();
        std::fs::write(
            dir.path().join("policies").join("e2e.cedar"),
            ALLOW_CONNECT_POLICY,
        )
        .unwrap();
        let text = match extra {
            Some(extra) => {
                Self::config_text_with(dir.path(), name, slot, &cgroup.path, targets, extra)
            }
            None => Self::config_text(dir.path(), name, slot, &cgroup.path, targets),
        };
        std::fs::write(&config, text).unwrap();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/portcullis-e2e-{name}"));
        // A crashed earlier run must not leave enforcement behind.
        let _ = std::fs::remove_dir_all(&pin_dir);
        Self {
            child: None,
            socket: dir.path().join("control.sock"),
            dir,
            config,
            pin_dir,
            cgroup: cgroup.path.clone(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
                .collect(),
        }
    }

    /// Starts (or restarts) the agent process and waits until it answers `status`.
    #[allow(
        unsafe_code,
        reason = "pre_exec is unsafe: the agent joins its cgroup between fork and exec"
    )]
    pub fn spawn(&mut self) {
        let _ = std::fs::remove_file(&self.socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .unwrap();
        let procs = self.cgroup.join("cgroup.procs");
        let mut cmd = Command::new(agent_bin());
        cmd.args(["agent", "--config"])
            .arg(&self.config)
            .env("PORTCULLIS_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // The agent joins the test cgroup before exec, like a unit's cgroup in production.
        use std::os::unix::process::CommandExt;
        // SAFETY: the closure only writes a file; it allocates nothing shared with the parent.
        unsafe {
            cmd.pre_exec(move || std::fs::write(&procs, std::process::id().to_string()));
        }
        let child = cmd.spawn().unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.try_status().is_some() {
                return;
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("agent exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready in 30 s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn try_status(&self) -> Option<Value> {
        let out = Command::new(agent_bin())
            .args(["status", "--json", "--socket"])
            .arg(&self.socket)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        serde_json::from_slice(&out.stdout).ok()
    }

    pub fn status(&self) -> Value {
        self.try_status()
            .unwrap_or_else(|| panic!("status failed:\n{}", self.log()))
    }

    /// `portcullis status --json` run as another uid.
    pub fn status_as(&self, uid: u32) -> Value {
        use std::os::unix::process::CommandExt;
        let out = Command::new(agent_bin())
            .args(["status", "--json", "--socket"])
            .arg(&self.socket)
            .uid(uid)
            .gid(uid)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "status as uid {uid}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    pub fn sigterm(&mut self) -> Child {
        let c = self.child.take().unwrap();
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        c
    }

    pub fn detach(&self) -> Output {
        Command::new(agent_bin())
            .args(["agent", "--detach", "--config"])
            .arg(&self.config)
            .output()
            .unwrap()
    }

    /// Every event in the agent's audit store, oldest first (read straight from the
    /// segments; a line still being written is skipped).
    pub fn events(&self) -> Vec<Value> {
        let mut out = Vec::new();
        for text in segment_texts(&self.dir.path().join("state/audit")) {
            for line in text.lines() {
                if let Ok(v) = serde_json::from_str::<Value>(line) {
                    if let Some(e) = v.get("event") {
                        out.push(e.clone());
                    }
                }
            }
        }
        out
    }

    /// `portcullis audit verify` on this agent's store.
    pub fn verify_audit(&self) -> Output {
        Command::new(agent_bin())
            .args(["audit", "verify", "--config"])
            .arg(&self.config)
            .output()
            .unwrap()
    }

    pub fn events_of(&self, kind: &str) -> Vec<Value> {
        self.events()
            .into_iter()
            .filter(|e| e["event"] == kind)
            .collect()
    }

    /// The `connection.refused` events whose origin is `uid`, oldest first.
    pub fn refusals_of(&self, uid: u32) -> Vec<Value> {
        self.events_of("connection.refused")
            .into_iter()
            .filter(|e| e["origin"]["uid"] == uid)
            .collect()
    }

    /// Connects as `probe`, which must fail, and returns the `connection.refused` event
    /// the agent wrote for it, whose reason must contain `reason`. A connect that fails
    /// because the agent crashed, hung or never saw it writes no event and fails here.
    pub fn expect_refusal(&self, probe: &Probe<'_>, target: SocketAddr, reason: &str) -> Value {
        let before = self.refusals_of(probe.uid).len();
        let r = probe.connect(target, &[]);
        assert_eq!(r["ok"], false, "uid {} must be refused: {r}", probe.uid);
        let deadline = Instant::now() + Duration::from_secs(30);
        let event = loop {
            if let Some(e) = self.refusals_of(probe.uid).get(before) {
                break e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no connection.refused event for uid {} ({r}); agent log:\n{}",
                probe.uid,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            event["reason"]
                .as_str()
                .is_some_and(|why| why.contains(reason)),
            "uid {}: expected a refusal naming {reason:?}, got {event}",
            probe.uid
        );
        assert_eq!(
            event["origin"]["destination"],
            target.to_string(),
            "{event}"
        );
        event
    }

    /// Waits until `n` events of `kind` are written (events are written when connections end).
    /// Waits (15 s) for an event of `kind` that `pick` chooses (events are written when the
    /// writer's next batch goes out); a test failure when none comes.
    pub fn wait_event(&self, kind: &str, pick: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let all = self.events_of(kind);
            if let Some(e) = all.iter().find(|e| pick(e)) {
                return e.clone();
            }
            assert!(Instant::now() < deadline, "no such {kind}: {all:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn wait_events(&self, kind: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ev = self.events_of(kind);
            if ev.len() >= n || Instant::now() > deadline {
                return ev;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// The policy every test agent starts with; policy tests replace it.
pub const ALLOW_CONNECT_POLICY: &str = "@id(\"e2e-allow-connect\")\npermit (principal, action == Portcullis::Action::\"connect\", resource);\n";

/// The shape most tests share: their own cgroup, an echo server on `slot.v4(1)`, and an
/// agent protecting that address as target `db`. Fields drop in order: the agent (and its
/// pins) before the cgroup.
pub struct Fixture {
    pub slot: Slot,
    pub agent: Agent,
    pub server: EchoServer,
    pub cg: TestCgroup,
}

impl Fixture {
    pub fn new(name: &str, n: u8) -> Self {
        let slot = Slot::new(n);
        let cg = TestCgroup::new(name);
        let server = EchoServer::start(&[slot.v4(1)]);
        let v4 = slot.v4(1).ip().to_string();
        let agent = Agent::start(
            name,
            slot,
            &cg,
            &[Target {
                name: "db",
                address: &v4,
                port: slot.server_port,
                upstream: None,
            }],
        );
        Self {
            slot,
            agent,
            server,
            cg,
        }
    }
}

/// How the probe runs.
pub struct Probe<'a> {
    pub cgroup: &'a TestCgroup,
    pub uid: u32,
    pub netns: Option<&'a str>,
}

impl Probe<'_> {
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(probe_bin());
        c.arg("--cgroup").arg(&self.cgroup.path);
        c.args([
            "--uid",
            &self.uid.to_string(),
            "--gid",
            &self.uid.to_string(),
        ]);
        if let Some(ns) = self.netns {
            c.args(["--netns", ns]);
        }
        c.args(args).stdin(Stdio::null());
        c
    }

    /// Runs a scenario and returns its JSON lines.
    pub fn run(&self, args: &[&str]) -> Vec<Value> {
        let out = self.command(args).output().unwrap();
        assert!(
            out.status.success(),
            "probe {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    pub fn connect(&self, target: SocketAddr, extra: &[&str]) -> Value {
        let t = target.to_string();
        let mut args = vec!["connect", t.as_str()];
        args.extend_from_slice(extra);
        self.run(&args).into_iter().next().unwrap()
    }
}

/// A probe holding one connection open (`probe session`); `exchange` proves it still works.
pub struct Held {
    child: Child,
    input: std::process::ChildStdin,
    output: BufReader<std::process::ChildStdout>,
}

impl Held {
    pub fn open(probe: &Probe<'_>, target: SocketAddr) -> Self {
        let mut child = probe
            .command(&["session", &target.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let input = child.stdin.take().unwrap();
        let mut output = BufReader::new(child.stdout.take().unwrap());
        let mut l = String::new();
        output.read_line(&mut l).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&l).unwrap()["ok"],
            true,
            "{l}"
        );
        Self {
            child,
            input,
            output,
        }
    }

    /// One line to the peer and its answer; `ok: false` once the connection or probe ended.
    pub fn exchange(&mut self, msg: &str) -> Value {
        if writeln!(self.input, "{msg}").is_err() {
            return serde_json::json!({"ok": false, "error": "stdin closed"});
        }
        let mut l = String::new();
        match self.output.read_line(&mut l) {
            Ok(n) if n > 0 => serde_json::from_str(&l).unwrap(),
            _ => serde_json::json!({"ok": false, "error": "probe ended"}),
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub const ECONNREFUSED: i64 = libc::ECONNREFUSED as i64;
pub const EPERM: i64 = libc::EPERM as i64;

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Like `e2e_enabled`, for suites that need no agent: `problem` names the first missing
/// prerequisite. Under `PORTCULLIS_E2E` or `CI` a missing one fails the test; elsewhere the
/// test is skipped with a message.
pub fn prerequisites_met(problem: Option<String>) -> bool {
    let required = std::env::var_os("PORTCULLIS_E2E").is_some() || std::env::var_os("CI").is_some();
    match problem {
        None => true,
        Some(p) if required => panic!("test prerequisites missing: {p}"),
        Some(p) => {
            eprintln!("skipping test: {p} (set PORTCULLIS_E2E=required to make this an error)");
            false
        }
    }
}

/// Makes `cmd` join `cgroup` (so its connects meet the programs attached there) and then
/// become `uid` (gid `uid`, no supplementary groups), in that order: an unprivileged uid
/// could not move itself into the cgroup. `Command::uid` would switch before `pre_exec` runs.
#[allow(
    unsafe_code,
    reason = "pre_exec is unsafe: the child joins its cgroup and drops to its uid between fork and exec"
)]
pub fn exec_in_cgroup_as(cmd: &mut Command, cgroup: Option<&Path>, uid: Option<u32>) {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    let procs = cgroup
        .map(|cg| std::ffi::CString::new(cg.join("cgroup.procs").as_os_str().as_bytes()).unwrap());
    if procs.is_none() && uid.is_none() {
        return;
    }
    if uid.is_some() {
        // Root's HOME would make libpq fail on ~/.postgresql (permission denied); the
        // caller can still set another one.
        cmd.env("HOME", "/nonexistent");
    }
    // SAFETY: between fork and exec the closure only makes async-signal-safe system calls
    // (open, write, close, setgroups, setgid, setuid) on memory prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // "0" moves the writing process itself.
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written != 1 {
                    return Err(error);
                }
            }
            if let Some(uid) = uid {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(uid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}
