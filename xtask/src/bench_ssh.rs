//! `cargo xtask bench ssh`: what SSH through the agent costs, as ratios against direct
//! OpenSSH to the same sshd, measured in one run (loopback only, bounded in count and time).
//!
//! One Debian sshd on 127.0.0.1 with its own config trusts two ways in:
//! - direct: `ssh` with a key listed in the sshd's `AuthorizedKeysFile`, outside any cgroup;
//! - agent: `ssh` inside the agent's cgroup with no key at all: the kernel redirects the
//!   connect to the agent, which presents its host certificate, takes the identity from the
//!   socket and logs in upstream with a user certificate its CA signs (`TrustedUserCAKeys`).
//!
//! Rounds interleave the paths so they share the machine's noise; the table shows medians:
//! `cat` and `scp` (SFTP) of one file on the target, `ssh host true` latency p50/p99, the
//! agent's CPU per GB moved (/proc/<pid>/stat utime+stime) and its RSS with idle sessions.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use portcullis_e2e::TestCgroup;

use crate::bench_common::agent_bin;
use crate::bench_postgres::{clock_ticks_per_second, median, process_cpu_ticks};
use crate::bench_table::Row;
use crate::step;

/// The account the agent logs in as upstream, and the account that runs the clients
/// (OpenSSH needs a passwd entry for its uid).
const REMOTE_USER: &str = "pcbench";
const CLIENT_USER: &str = "pcbenchc";
/// Below the ephemeral range, away from the e2e slots' servers (47000–47254).
const SSHD_PORT: u16 = 2290;
const DIR: &str = "/tmp/portcullis-bench-ssh";
const PIN_DIR: &str = "/sys/fs/bpf/portcullis-bench-ssh";
/// The redirect bench uses 943, the PostgreSQL bench 944.
const PROXY_PORT: u16 = 945;

pub struct Options {
    /// Size of the file `cat` and `scp` move.
    bytes: u64,
    rounds: usize,
    /// `ssh host true` samples per path and round.
    latency_samples: usize,
    idle_sessions: usize,
    /// `--perf`: `perf record -g` of the agent during its first `cat`, into
    /// `/tmp/portcullis-bench-ssh/perf.data`, to see where its CPU goes.
    perf: bool,
}

impl Options {
    /// `--quick` (256 MiB, one round, 20 latency samples; still 200 idle sessions), `--rounds N`.
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut o = Options {
            bytes: 1 << 30,
            rounds: 3,
            latency_samples: 50,
            idle_sessions: 200,
            perf: false,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => {
                    o.bytes = 256 << 20;
                    o.rounds = 1;
                    o.latency_samples = 20;
                }
                "--rounds" => {
                    o.rounds = it
                        .next()
                        .and_then(|v| v.parse::<usize>().ok())
                        .filter(|v| (1..=9).contains(v))
                        .context("--rounds needs a number from 1 to 9")?
                }
                "--perf" => o.perf = true,
                other => bail!(
                    "unknown option `{other}` for the ssh bench (--quick, --rounds N, --perf)"
                ),
            }
        }
        Ok(o)
    }
}

/// One path's measurements, a sample per round (per run for `setup`).
#[derive(Default)]
struct Samples {
    /// MiB/s.
    cat: Vec<f64>,
    scp: Vec<f64>,
    /// ms.
    setup: Vec<f64>,
}

/// How one path's clients are started.
struct ClientPath {
    name: &'static str,
    /// The `ssh -F` file.
    config: PathBuf,
    cgroup: Option<PathBuf>,
}

pub fn run(options: &Options) -> Result<Vec<Row>> {
    if !crate::setup::is_root() {
        bail!("the SSH bench starts sshd, adds its accounts and attaches eBPF programs: it needs root");
    }
    if !Path::new("/usr/sbin/sshd").exists() {
        bail!("Debian's openssh-server is missing (cargo xtask setup)");
    }
    let bin = agent_bin();
    if !bin.is_file() {
        bail!(
            "{} is missing (`cargo xtask bench` builds it)",
            bin.display()
        );
    }
    let client_uid = ensure_account(CLIENT_USER)?;
    ensure_account(REMOTE_USER)?;
    let dir = Path::new(DIR);
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("policies"))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    let sshd_dir = dir.join("sshd");
    std::fs::create_dir(&sshd_dir)?;
    std::fs::set_permissions(&sshd_dir, std::fs::Permissions::from_mode(0o700))?;
    let client_dir = dir.join("client");
    std::fs::create_dir(&client_dir)?;

    step("keys: the sshd's host key, the direct client's key");
    let host_pub = keygen(&sshd_dir.join("host_key"))?;
    let client_pub = keygen(&client_dir.join("id"))?;
    // sshd reads it as the target account: outside its own root-only directory.
    std::fs::write(dir.join("authorized_keys"), &client_pub)?;
    let upstream_known = sshd_dir.join("upstream_known_hosts");
    std::fs::write(
        &upstream_known,
        format!("[127.0.0.1]:{SSHD_PORT} {host_pub}"),
    )?;
    std::fs::write(
        client_dir.join("direct_known_hosts"),
        format!("[127.0.0.1]:{SSHD_PORT} {host_pub}"),
    )?;

    step("the agent: an ssh target on the sshd's own address, allow-all policy");
    let agent = Agent::start(&bin, &upstream_known)?;
    let sshd = Sshd::start(&sshd_dir, &agent.dir.join("state/ssh/user_ca.pub"))?;
    let ca_line = Command::new(&bin)
        .args(["ssh", "known-hosts", "--config"])
        .arg(&agent.config)
        .output()?;
    if !ca_line.status.success() {
        bail!(
            "portcullis ssh known-hosts: {}",
            String::from_utf8_lossy(&ca_line.stderr)
        );
    }
    std::fs::write(client_dir.join("agent_known_hosts"), &ca_line.stdout)?;
    let common = format!(
        "Host *\n  Port {SSHD_PORT}\n  User {REMOTE_USER}\n  GlobalKnownHostsFile /dev/null\n\
         StrictHostKeyChecking yes\n  BatchMode yes\n  PasswordAuthentication no\n\
         KbdInteractiveAuthentication no\n  GSSAPIAuthentication no\n  ControlMaster no\n"
    );
    let direct_config = client_dir.join("direct_config");
    std::fs::write(
        &direct_config,
        format!(
            "{common}  UserKnownHostsFile {d}/direct_known_hosts\n  IdentityFile {d}/id\n\
             IdentitiesOnly yes\n",
            d = client_dir.display()
        ),
    )?;
    let agent_config = client_dir.join("agent_config");
    std::fs::write(
        &agent_config,
        format!(
            "{common}  UserKnownHostsFile {d}/agent_known_hosts\n  PubkeyAuthentication no\n",
            d = client_dir.display()
        ),
    )?;
    chown_tree(&client_dir, client_uid)?;
    let paths = [
        ClientPath {
            name: "direct",
            config: direct_config,
            cgroup: None,
        },
        ClientPath {
            name: "agent",
            config: agent_config,
            cgroup: Some(agent.cgroup.path.clone()),
        },
    ];
    for p in &paths {
        let out = ssh(p, client_uid, &["127.0.0.1", "true"])
            .stdout(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "{}: `ssh 127.0.0.1 true` failed: {}\nsshd: {}\nagent: {}",
                p.name,
                String::from_utf8_lossy(&out.stderr),
                crate::bench_common::log_tail(&sshd.log),
                crate::bench_common::log_tail(&agent.dir.join("agent.log"))
            );
        }
    }

    let remote_file = format!("/home/{REMOTE_USER}/bench-{}.bin", options.bytes);
    step(&format!(
        "{} MiB of random bytes in {remote_file} on the target",
        options.bytes >> 20
    ));
    let made = Command::new("head")
        .args(["-c", &options.bytes.to_string(), "/dev/urandom"])
        .stdout(File::create(&remote_file)?)
        .status()?;
    if !made.success() {
        bail!("could not write {remote_file}");
    }
    std::fs::set_permissions(&remote_file, std::fs::Permissions::from_mode(0o644))?;

    let mib = options.bytes as f64 / f64::from(1 << 20);
    let mut samples: [Samples; 2] = Default::default();
    let mut agent_ticks = 0u64;
    let mut agent_bytes = 0u64;
    step(&format!(
        "{} round(s), direct and agent interleaved: cat and scp of {mib:.0} MiB, {} x `ssh host true`",
        options.rounds, options.latency_samples
    ));
    for round in 0..options.rounds {
        for (p, got) in paths.iter().zip(samples.iter_mut()) {
            let perf = (options.perf && round == 0 && p.cgroup.is_some())
                .then(|| perf_record(agent.child.id()))
                .transpose()?;
            let before = process_cpu_ticks(agent.child.id())?;
            let secs = timed(
                ssh(p, client_uid, &["127.0.0.1", &format!("cat {remote_file}")])
                    .stdout(Stdio::null()),
                Duration::from_secs(600),
            )?;
            let mid = process_cpu_ticks(agent.child.id())?;
            if let Some(perf) = perf {
                stop_perf(perf);
            }
            let scp_secs = timed(
                client(p, client_uid, "scp")
                    .args(["-q", "-F"])
                    .arg(&p.config)
                    .arg(format!("127.0.0.1:{remote_file}"))
                    .arg("/dev/null"),
                Duration::from_secs(600),
            )?;
            let after = process_cpu_ticks(agent.child.id())?;
            if p.cgroup.is_some() {
                agent_ticks += after.saturating_sub(before);
                agent_bytes += 2 * options.bytes;
            }
            println!(
                "  round {} {:<7} cat {:>8.1} MiB/s  scp {:>8.1} MiB/s  (agent CPU {:.2} s + {:.2} s)",
                round + 1,
                p.name,
                mib / secs,
                mib / scp_secs,
                mid.saturating_sub(before) as f64 / clock_ticks_per_second(),
                after.saturating_sub(mid) as f64 / clock_ticks_per_second(),
            );
            got.cat.push(mib / secs);
            got.scp.push(mib / scp_secs);
        }
        for _ in 0..options.latency_samples {
            for (p, got) in paths.iter().zip(samples.iter_mut()) {
                let ms = timed(
                    ssh(p, client_uid, &["127.0.0.1", "true"]).stdout(Stdio::null()),
                    Duration::from_secs(30),
                )? * 1000.0;
                got.setup.push(ms);
            }
        }
    }
    let _ = std::fs::remove_file(&remote_file);

    step(&format!(
        "agent RSS with {} idle sessions (ControlMaster off, one ssh running `sleep` each)",
        options.idle_sessions
    ));
    let rss_before = crate::bench_common::rss_kib(agent.child.id())?;
    let [direct, through] = &samples;
    let [_, agent_path] = &paths;
    let (rss_held, held) = idle_sessions(agent_path, client_uid, options.idle_sessions, &agent)?;

    let cpu_per_gb = if agent_bytes > 0 {
        agent_ticks as f64 / clock_ticks_per_second() / (agent_bytes as f64 / 1e9)
    } else {
        0.0
    };
    let pct = |s: &[f64], q: f64| {
        let mut s = s.to_vec();
        s.sort_by(f64::total_cmp);
        s.get(((s.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0.0)
    };
    let m = |s: &[f64]| median(s).unwrap_or(0.0);
    let n = options.rounds;
    let rss_per_session_kb =
        rss_held.saturating_sub(rss_before) as f64 * 1024.0 / held.max(1) as f64 / 1000.0;
    let rows = vec![
        Row::new(
            "ssh",
            "ssh.cat",
            &format!("cat of {mib:.0} MiB"),
            m(&through.cat),
            "MiB/s",
            n,
        )
        .against(m(&direct.cat), "agent / direct"),
        Row::new(
            "ssh",
            "ssh.scp",
            &format!("scp (SFTP) of {mib:.0} MiB"),
            m(&through.scp),
            "MiB/s",
            n,
        )
        .against(m(&direct.scp), "agent / direct"),
        // The latency samples of every round are pooled: a percentile of them all.
        Row::new(
            "ssh",
            "ssh.setup_p50",
            "`ssh host true` p50",
            pct(&through.setup, 0.5),
            "ms",
            n,
        )
        .against(pct(&direct.setup, 0.5), "agent / direct"),
        Row::new(
            "ssh",
            "ssh.setup_p99",
            "`ssh host true` p99",
            pct(&through.setup, 0.99),
            "ms",
            n,
        )
        .against(pct(&direct.setup, 0.99), "agent / direct"),
        Row::new(
            "ssh",
            "ssh.cpu_per_gb",
            "agent CPU per GB moved (cat and scp)",
            cpu_per_gb,
            "s",
            n,
        ),
        Row::new(
            "ssh",
            "ssh.rss_per_session",
            &format!("agent RSS per idle session ({held} held)"),
            rss_per_session_kb,
            "kB",
            1,
        ),
    ];
    drop(sshd);
    drop(agent);
    Ok(rows)
}

/// `perf record -g` of the agent's threads until [`stop_perf`].
fn perf_record(pid: u32) -> Result<Child> {
    let child = Command::new("perf")
        .args([
            "record",
            "-g",
            "-q",
            "-o",
            &format!("{DIR}/perf.data"),
            "-p",
        ])
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting perf (Debian's linux-perf)")?;
    // perf needs a moment to attach before the work starts.
    std::thread::sleep(Duration::from_millis(500));
    Ok(child)
}

fn stop_perf(mut perf: Child) {
    let _ = Command::new("kill")
        .args(["-INT", &perf.id().to_string()])
        .status();
    let _ = perf.wait();
    println!("  perf data: {DIR}/perf.data (perf report -i {DIR}/perf.data --no-children)");
}

/// Starts `count` sessions through the agent that sit in `sleep`, waits until the target's
/// sshd has all of them logged in, reads the agent's RSS, then ends them.
fn idle_sessions(path: &ClientPath, uid: u32, count: usize, agent: &Agent) -> Result<(u64, usize)> {
    // A duration no other process sleeps: this run's sessions are counted, and their
    // `sleep`s (which outlive a killed client: no pty, no hangup) ended, by it alone.
    let command = format!("sleep 300.{}", std::process::id());
    let mut children: Vec<Child> = Vec::with_capacity(count);
    let result = (|| -> Result<(u64, usize)> {
        for _ in 0..count {
            children.push(
                ssh(path, uid, &["127.0.0.1", &command])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            );
            // Gentle on sshd's MaxStartups and the agent's per-uid startup limit.
            std::thread::sleep(Duration::from_millis(20));
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut running = 0;
        while Instant::now() < deadline {
            running = sleeping_sessions(&command)?.len();
            if running >= count {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        if running < count {
            println!("  only {running} of {count} sessions reached `sleep` within 60 s");
        }
        std::thread::sleep(Duration::from_secs(1));
        Ok((crate::bench_common::rss_kib(agent.child.id())?, running))
    })();
    for c in &mut children {
        let _ = c.kill();
        let _ = c.wait();
    }
    for pid in sleeping_sessions(&command).unwrap_or_default() {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    result
}

/// The pids of the remote account's processes running exactly `command`: one per session
/// that got through.
fn sleeping_sessions(command: &str) -> Result<Vec<u32>> {
    let out = Command::new("pgrep")
        .args(["-u", REMOTE_USER, "-x", "-f", command])
        .output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect())
}

fn client(path: &ClientPath, uid: u32, program: &str) -> Command {
    let mut c = Command::new(program);
    portcullis_e2e::exec_in_cgroup_as(&mut c, path.cgroup.as_deref(), Some(uid));
    c.env("HOME", format!("/home/{CLIENT_USER}"))
        .current_dir(DIR)
        .stdin(Stdio::null());
    c
}

fn ssh(path: &ClientPath, uid: u32, args: &[&str]) -> Command {
    let mut c = client(path, uid, "ssh");
    c.arg("-F").arg(&path.config).args(args);
    c
}

/// Seconds `cmd` took; an error if it failed or outlived `limit`.
fn timed(cmd: &mut Command, limit: Duration) -> Result<f64> {
    let start = Instant::now();
    let mut child = cmd.stderr(Stdio::piped()).spawn()?;
    loop {
        if let Some(status) = child.try_wait()? {
            let secs = start.elapsed().as_secs_f64();
            if !status.success() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!("{cmd:?} failed with {status}: {err}");
            }
            return Ok(secs);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{cmd:?} did not finish in {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Adds `name` if it is missing; sshd refuses a locked account (`!`) even with a valid
/// certificate, so the password field is `*`.
fn ensure_account(name: &str) -> Result<u32> {
    let id = || Command::new("id").args(["-u", name]).output();
    if !id()?.status.success() {
        let made = Command::new("useradd")
            .args(["-m", "-s", "/bin/bash", name])
            .status()?;
        if !made.success() {
            bail!("useradd {name} failed");
        }
    }
    if !Command::new("usermod")
        .args(["-p", "*", name])
        .status()?
        .success()
    {
        bail!("usermod -p '*' {name} failed");
    }
    String::from_utf8_lossy(&id()?.stdout)
        .trim()
        .parse()
        .with_context(|| format!("the uid of {name}"))
}

fn keygen(path: &Path) -> Result<String> {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .status()?;
    if !ok.success() {
        bail!("ssh-keygen {} failed", path.display());
    }
    Ok(std::fs::read_to_string(path.with_extension("pub"))?)
}

fn chown_tree(dir: &Path, uid: u32) -> Result<()> {
    let ok = Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}")])
        .arg(dir)
        .status()?;
    if !ok.success() {
        bail!("chown {}", dir.display());
    }
    Ok(())
}

/// Debian's sshd on 127.0.0.1:[`SSHD_PORT`], trusting the agent's user CA and the direct
/// client's key, with room for every idle session.
struct Sshd {
    child: Child,
    log: PathBuf,
}

impl Sshd {
    fn start(dir: &Path, user_ca: &Path) -> Result<Self> {
        std::fs::create_dir_all("/run/sshd")?;
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port {SSHD_PORT}\nListenAddress 127.0.0.1\nHostKey {dir}/host_key\nPidFile none\n\
                 TrustedUserCAKeys {ca}\nAuthorizedKeysFile {DIR}/authorized_keys\n\
                 PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
                 StrictModes no\nPermitRootLogin no\nAllowUsers {REMOTE_USER}\n\
                 Subsystem sftp internal-sftp\nMaxStartups 400\nLogLevel ERROR\n",
                dir = dir.display(),
                ca = user_ca.display(),
            ),
        )?;
        let log = dir.join("sshd.log");
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log)?)
            .spawn()
            .context("starting sshd")?;
        let mut sshd = Self { child, log };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", SSHD_PORT)).is_err() {
            if sshd.child.try_wait()?.is_some() || Instant::now() > deadline {
                bail!(
                    "sshd did not listen: {}",
                    crate::bench_common::log_tail(&sshd.log)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(sshd)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent with one ssh target on the sshd's address, in a cgroup of its own that the
/// agent-path clients join.
struct Agent {
    child: Child,
    dir: PathBuf,
    config: PathBuf,
    cgroup: TestCgroup,
}

impl Agent {
    fn start(bin: &Path, upstream_known: &Path) -> Result<Self> {
        if crate::cgroup2_root().is_err() {
            bail!("no cgroup2 hierarchy is mounted");
        }
        let dir = Path::new(DIR).join("agent");
        std::fs::create_dir_all(dir.join("policies"))?;
        std::fs::write(
            dir.join("policies/bench.cedar"),
            "// The bench measures the data path: every connection and channel is allowed.\n\
             @id(\"bench-allow-all\")\npermit (principal, action, resource);\n",
        )?;
        let cgroup = TestCgroup::new("bench-ssh");
        let config = dir.join("portcullis.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{state}\"\n\
                 [control]\nsocket = \"{socket}\"\n\
                 [proxy]\nport = {PROXY_PORT}\ndrain_timeout_secs = 5\n\
                 [bpf]\ncgroup = \"{cgroup}\"\npin_dir = \"{PIN_DIR}\"\n\
                 [policy]\ndir = \"{policies}\"\n\
                 # The data path is measured here, not the login: attribute to the Unix account.\n\
                 [insecure]\nunix_identity_only = true\n\n\
                 # Hundreds of sessions of one uid: per-uid limits would only measure themselves.\n\
                 [limits]\nmax_open_per_uid = 100000\nmax_startup_per_uid = 100000\n\
                 new_connections_per_sec = 1000000\nnew_connections_burst = 1000000\n\
                 [[target]]\nname = \"bench-ssh\"\nprotocol = \"ssh\"\n\
                 address = \"127.0.0.1\"\nport = {SSHD_PORT}\n\
                 [target.ssh]\nhost_names = [\"bench-ssh\"]\nknown_hosts_file = \"{known}\"\n",
                state = dir.join("state").display(),
                socket = dir.join("control.sock").display(),
                cgroup = cgroup.path.display(),
                policies = dir.join("policies").display(),
                known = upstream_known.display(),
            ),
        )?;
        let state = dir.join("state/ssh/user_ca.pub");
        let child = crate::bench_common::spawn_agent_in_cgroup(
            bin,
            &config,
            &dir,
            &cgroup.path,
            PIN_DIR,
            || state.exists(),
        )?;
        Ok(Self {
            child,
            dir,
            config,
            cgroup,
        })
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}
