//! `cargo xtask bench`: ratios against the direct path, measured in one run.
//!
//! `redirect`: this process joins a bench cgroup, so its own connects go through the
//! kernel programs; a server on loopback answers both on a protected address (through
//! the agent) and an unprotected one (direct). Loops are bounded in count and time.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{root, step};

const PROTECTED: &str = "127.0.0.90:9001";
const DIRECT: &str = "127.0.0.91:9001";
/// Closes every connection as soon as it is accepted, so TIME_WAIT stays on the server
/// side and the client's connect rate measures the connect path, not port reuse.
const CLOSER: &str = "127.0.0.91:9002";
const BENCH_DIR: &str = "/tmp/portcullis-bench";
const CONFIG: &str = r#"
state_dir = "/tmp/portcullis-bench/state"
[control]
socket = "/tmp/portcullis-bench/control.sock"
[proxy]
port = 943
[bpf]
cgroup = "portcullis-bench"
pin_dir = "/sys/fs/bpf/portcullis-bench"
# The data path is measured here, not the login: attribute to the Unix account.
[insecure]
unix_identity_only = true
# One uid opens thousands of connections a second here to find the agent's own ceiling;
# per-uid limits would only measure themselves.
[limits]
max_open_per_uid = 100000
max_startup_per_uid = 100000
new_connections_per_sec = 1000000
new_connections_burst = 1000000
[policy]
dir = "/tmp/portcullis-bench/policies"
[[target]]
name = "bench"
protocol = "tcp"
address = "127.0.0.90"
port = 9001
"#;

/// `args`: the benchmark's name (default `all`), then its options (`postgres` takes
/// `--quick`, `--seconds N`, `--rounds N`; `all` passes them on to it; `ssh` takes `--quick`
/// and `--rounds N` and runs on its own: its 1 GB transfers and 200 sessions are long).
pub fn run(args: &[String]) -> Result<()> {
    let (which, options) = match args.split_first() {
        Some((first, rest)) if !first.starts_with("--") => (first.as_str(), rest),
        _ => ("all", args),
    };
    match which {
        "redirect" => in_bench_cgroup(&[measure]),
        "tcp-bulk" => in_bench_cgroup(&[measure_bulk]),
        "policy" => policy(),
        "audit" => audit(),
        "review" => review(),
        "postgres" => crate::bench_postgres::run(&crate::bench_postgres::Options::parse(options)?),
        "ssh" => crate::bench_ssh::run(&crate::bench_ssh::Options::parse(options)?),
        "all" => {
            let postgres = crate::bench_postgres::Options::parse(options)?;
            in_bench_cgroup(&[measure])?;
            policy()?;
            audit()?;
            crate::bench_postgres::run(&postgres)
        }
        other => bail!(
            "unknown benchmark `{other}` (redirect, tcp-bulk, policy, audit, review, postgres, ssh, all)"
        ),
    }
}

fn policy() -> Result<()> {
    step("policy decision latency and throughput (10, 100, 1,000 policies)");
    crate::cargo(&["bench", "-p", "portcullis-policy", "--bench", "decide"])
}

fn audit() -> Result<()> {
    step("audit store: events/s with an fsync per event and per batch (group commit)");
    crate::cargo(&["bench", "-p", "portcullis-audit-store", "--bench", "append"])?;
    in_bench_cgroup(&[measure_gated, measure_central])
}

/// `portcullis review report` over a generated trail of a million events (the tested quarter
/// renamed round after round): the time of each format and of each phase. The agent is a
/// binary crate, so the measure is one of its ignored tests, built for release.
fn review() -> Result<()> {
    step("review report over 1,000,000 events (md, csv, json; verify, read, compute)");
    crate::cargo(&[
        "test",
        "--release",
        "-p",
        "portcullis-agent",
        "--bin",
        "portcullis",
        "review::tests::bench_report_over_a_million_events",
        "--",
        "--ignored",
        "--exact",
        "--nocapture",
    ])
}

/// Catch-up rate to the central store: events written while PostgreSQL is down are
/// shipped when it returns; the time until the central copy holds them all gives events/s.
fn measure_central(bin: &Path, config: &Path) -> Result<()> {
    use portcullis_e2e::postgres::{Postgres, SUPERUSER_PASSWORD};
    const DB: &str = "portcullis";
    let pg = Postgres::start(DB);
    let pw = PathBuf::from(BENCH_DIR).join("central.pw");
    std::fs::write(&pw, SUPERUSER_PASSWORD)?;
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let url = format!("postgres://postgres@127.0.0.1:{}/{DB}", pg.port);
    let central = PathBuf::from(BENCH_DIR).join("central.toml");
    let base = std::fs::read_to_string(config)?;
    // The bench's config ends with its target; the central section goes before it.
    let (head, tail) = base
        .split_once("[[target]]")
        .context("bench config has no target")?;
    // The bench's PostgreSQL listens on loopback without TLS, which the agent refuses unless
    // the config allows plaintext on loopback.
    let head = head.replacen(
        "unix_identity_only = true\n",
        "unix_identity_only = true\nallow_plaintext_loopback = true\n",
        1,
    );
    std::fs::write(
        &central,
        format!(
            "{head}[audit.central]\nurl = \"{url}\"\npassword_file = \"{pw}\"\ntls = \"disable\"\n\
             migrate_url = \"{url}\"\nmigrate_password_file = \"{pw}\"\nhost_name = \"bench\"\n\n[[target]]{tail}",
            pw = pw.display()
        ),
    )?;
    let mut agent = start_agent(bin, &central)?;
    let outcome = (|| -> Result<()> {
        let count = || -> u64 {
            pg.psql(DB, "SELECT count(*) FROM portcullis_audit_events")
                .trim()
                .parse()
                .unwrap_or(0)
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while count() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        step("central store: 5,000 connections (10,000 events) while PostgreSQL is down, then catch-up");
        let before = count();
        pg.stop_server();
        let protected: SocketAddr = PROTECTED.parse()?;
        new_connection_rate(protected, 5_000, Duration::from_secs(60))?;
        let report = Command::new(bin)
            .args(["audit", "verify", "--json", "--config"])
            .arg(&central)
            .output()?;
        let last = serde_json::from_slice::<serde_json::Value>(&report.stdout)?
            .get("last_seq")
            .and_then(serde_json::Value::as_u64)
            .unwrap_or(0);
        let start = Instant::now();
        pg.start_server();
        let deadline = Instant::now() + Duration::from_secs(300);
        let mut now = count();
        while now < last && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            now = count();
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "\ncentral catch-up: {} events in {secs:.2} s = {:.0} events/s (backoff delay included)",
            now.saturating_sub(before),
            now.saturating_sub(before) as f64 / secs
        );
        Ok(())
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
    outcome
}

/// Every proxied connection waits for its `connection.opened` event to be on disk: the
/// latency it adds shows in connection setup, measured here against the direct path.
fn measure_gated(bin: &Path, config: &Path) -> Result<()> {
    let unprotected: SocketAddr = DIRECT.parse()?;
    let protected: SocketAddr = PROTECTED.parse()?;
    let mut agent = start_agent(bin, config)?;
    let outcome = (|| -> Result<()> {
        step("connection setup with one round trip: through the proxy (audited) and direct");
        let (p50, p99, rate) = setup_latency(protected, 3_000, Duration::from_secs(30))?;
        let (d50, d99, _) = setup_latency(unprotected, 3_000, Duration::from_secs(30))?;
        println!(
            "\n{:<52} {:>10} {:>10}",
            "connection setup (µs)", "p50", "p99"
        );
        println!(
            "{:<52} {p50:>10.0} {p99:>10.0}",
            "through the proxy (opened event durable first)"
        );
        println!("{:<52} {d50:>10.0} {d99:>10.0}", "direct");
        println!(
            "{:<52} {:>10.0} {:>10.0}",
            "added by the proxy, identity, policy and audit",
            p50 - d50,
            p99 - d99
        );
        println!(
            "audited events sustained: {:.0}/s (2 per connection at {rate:.0} connections/s)",
            rate * 2.0
        );
        Ok(())
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
    outcome
}

/// p50 and p99 in µs of connect + one 8-byte round trip + close, and the rate achieved.
fn setup_latency(addr: SocketAddr, count: u32, limit: Duration) -> Result<(f64, f64, f64)> {
    let mut samples = Vec::with_capacity(count as usize);
    let start = Instant::now();
    let mut back = [0u8; 8];
    while samples.len() < count as usize && start.elapsed() < limit {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.write_all(b"N12345678")?;
        s.read_exact(&mut back)?;
        samples.push(t.elapsed().as_secs_f64() * 1e6);
        let mut rest = [0u8; 1];
        let _ = s.read(&mut rest);
    }
    let rate = samples.len() as f64 / start.elapsed().as_secs_f64();
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| {
        samples
            .get(((samples.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    Ok((at(0.5), at(0.99), rate))
}

/// Runs `f` with an agent config for the bench, this process in the bench cgroup (so its
/// own connects pass the programs) and the bench servers listening; cleans up after.
fn in_bench_cgroup(measures: &[fn(&Path, &Path) -> Result<()>]) -> Result<()> {
    if !crate::setup::is_root() {
        bail!("the redirect benchmark attaches eBPF programs and needs root");
    }
    let bin = root().join("target/release/portcullis");
    let _ = std::fs::remove_dir_all(BENCH_DIR);
    std::fs::create_dir_all(BENCH_DIR)?;
    let config = PathBuf::from(BENCH_DIR).join("portcullis.toml");
    std::fs::write(&config, CONFIG)?;
    std::fs::create_dir_all(PathBuf::from(BENCH_DIR).join("policies"))?;
    std::fs::write(
        PathBuf::from(BENCH_DIR).join("policies/bench.cedar"),
        "@id(\"bench-connect\")\npermit (principal, action == Portcullis::Action::\"connect\", resource);\n",
    )?;
    let cgroup = crate::cgroup2_root()?.join("portcullis-bench");
    std::fs::create_dir_all(&cgroup)?;
    // Leftovers of an interrupted run must not enforce: start from nothing attached.
    let _ = Command::new(&bin)
        .args(["agent", "--detach", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .status();

    for addr in [PROTECTED, DIRECT] {
        let l = TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        std::thread::spawn(move || serve(l));
    }
    let closer = TcpListener::bind(CLOSER).with_context(|| format!("binding {CLOSER}"))?;
    std::thread::spawn(move || {
        for s in closer.incoming() {
            drop(s);
        }
    });
    // From here on this process's connects pass through the bench cgroup's programs.
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .context("joining the bench cgroup")?;
    let result = measures.iter().try_for_each(|m| m(&bin, &config));
    let _ = Command::new(&bin)
        .args(["agent", "--detach", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .status();
    // Leave the cgroup so it can be removed.
    if let Some(parent) = cgroup.parent() {
        let _ = std::fs::write(parent.join("cgroup.procs"), std::process::id().to_string());
    }
    let _ = std::fs::remove_dir(&cgroup);
    result
}

fn measure(bin: &Path, config: &Path) -> Result<()> {
    let unprotected: SocketAddr = DIRECT.parse()?;
    let protected: SocketAddr = PROTECTED.parse()?;
    let closer: SocketAddr = CLOSER.parse()?;

    step("connect+close to an unprotected port, programs detached");
    let detached = connect_rate(closer, 20_000, Duration::from_secs(20))?;

    let mut agent = start_agent(bin, config)?;
    let outcome = (|| -> Result<Vec<(String, f64, f64, &'static str)>> {
        step("connect+close to an unprotected port, programs attached");
        let attached = connect_rate(closer, 20_000, Duration::from_secs(20))?;
        step("request/response round trips (64 bytes), through the proxy and direct");
        let rr_proxy = round_trips(protected, 20_000, Duration::from_secs(20))?;
        let rr_direct = round_trips(unprotected, 20_000, Duration::from_secs(20))?;
        let bulk = bulk_rounds(agent.id(), protected, unprotected, BULK_ROUNDS)?;
        step("new protected connections per second (connect, one round trip, close)");
        let new_proxy = new_connection_rate(protected, 5_000, Duration::from_secs(20))?;
        let new_direct = new_connection_rate(unprotected, 5_000, Duration::from_secs(20))?;
        step("the same with 16 clients at once");
        let new16_proxy =
            concurrent_connection_rate(protected, 16, 1_000, Duration::from_secs(20))?;
        let new16_direct =
            concurrent_connection_rate(unprotected, 16, 1_000, Duration::from_secs(20))?;
        step("agent memory, idle and with 1,000 open proxied connections");
        let rss_idle = crate::bench_common::rss_kib(agent.id())?;
        // Each one proven through the proxy to the server (an echo), so the agent holds all
        // of them when it is measured, not only those it had accepted by then.
        let held: Vec<TcpStream> = (0..1000)
            .map(|_| -> Result<TcpStream> {
                let mut s = TcpStream::connect(protected)?;
                s.write_all(b"Eheld1234")?;
                let mut back = [0u8; 8];
                s.read_exact(&mut back)?;
                Ok(s)
            })
            .collect::<Result<_>>()?;
        std::thread::sleep(Duration::from_millis(500));
        let rss_busy = crate::bench_common::rss_kib(agent.id())?;
        drop(held);
        Ok(vec![
            (
                "connect+close, unprotected port (per s)".into(),
                attached,
                detached,
                "attached / detached",
            ),
            (
                "round trips, 64 B (per s)".into(),
                rr_proxy,
                rr_direct,
                "proxy / direct",
            ),
            (
                "bulk throughput (MiB/s, median of rounds)".into(),
                bulk.proxy,
                bulk.direct,
                "proxy / direct",
            ),
            (
                "agent CPU per GiB forwarded (ms)".into(),
                bulk.agent_ms_per_gib,
                0.0,
                "-",
            ),
            (
                "new connections with 1 round trip (per s)".into(),
                new_proxy,
                new_direct,
                "proxy / direct",
            ),
            (
                "the same, 16 clients at once (per s)".into(),
                new16_proxy,
                new16_direct,
                "proxy / direct",
            ),
            (
                "agent RSS (KiB): 1,000 open vs idle".into(),
                rss_busy as f64,
                rss_idle as f64,
                "busy / idle",
            ),
            (
                "agent RSS per open connection (bytes)".into(),
                (rss_busy.saturating_sub(rss_idle) as f64) * 1024.0 / 1000.0,
                0.0,
                "-",
            ),
        ])
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
    let rows = outcome?;
    println!(
        "\n{:<46} {:>14} {:>14} {:>8}  ratio of",
        "measure", "value", "baseline", "ratio"
    );
    for (name, value, base, what) in rows {
        let ratio = if base > 0.0 { value / base } else { 0.0 };
        println!("{name:<46} {value:>14.1} {base:>14.1} {ratio:>8.3}  {what}");
    }
    Ok(())
}

/// Only the bulk rounds of `redirect`, for work on the forwarding path.
fn measure_bulk(bin: &Path, config: &Path) -> Result<()> {
    let mut agent = start_agent(bin, config)?;
    let bulk = bulk_rounds(agent.id(), PROTECTED.parse()?, DIRECT.parse()?, BULK_ROUNDS);
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
    let bulk = bulk?;
    println!(
        "bulk MiB/s (median of {BULK_ROUNDS}): proxy {:.1}, direct {:.1}, ratio {:.3}; agent CPU {:.0} ms per GiB",
        bulk.proxy,
        bulk.direct,
        bulk.proxy / bulk.direct,
        bulk.agent_ms_per_gib
    );
    Ok(())
}

fn start_agent(bin: &Path, config: &Path) -> Result<Child> {
    let log = std::fs::File::create(PathBuf::from(BENCH_DIR).join("agent.log"))?;
    let mut child = Command::new(bin)
        .args(["agent", "--config"])
        .arg(config)
        .env("PORTCULLIS_LOG", "warn")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    let socket = Path::new(BENCH_DIR).join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if child.try_wait()?.is_some() || Instant::now() > deadline {
            bail!("the agent did not start; see {BENCH_DIR}/agent.log");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(child)
}

fn connect_rate(addr: SocketAddr, count: u32, limit: Duration) -> Result<f64> {
    let start = Instant::now();
    let mut done = 0u32;
    let mut eof = [0u8; 1];
    while done < count && start.elapsed() < limit {
        // The server closes at once; waiting for its FIN keeps TIME_WAIT off our ports.
        let mut s = TcpStream::connect(addr)?;
        let _ = s.read(&mut eof);
        done += 1;
    }
    Ok(f64::from(done) / start.elapsed().as_secs_f64())
}

fn round_trips(addr: SocketAddr, count: u32, limit: Duration) -> Result<f64> {
    let mut s = TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    s.write_all(b"E")?;
    let msg = [7u8; 64];
    let mut back = [0u8; 64];
    let start = Instant::now();
    let mut done = 0u32;
    while done < count && start.elapsed() < limit {
        s.write_all(&msg)?;
        s.read_exact(&mut back)?;
        done += 1;
    }
    Ok(f64::from(done) / start.elapsed().as_secs_f64())
}

fn new_connection_rate(addr: SocketAddr, count: u32, limit: Duration) -> Result<f64> {
    let start = Instant::now();
    let mut done = 0u32;
    let mut back = [0u8; 8];
    while done < count && start.elapsed() < limit {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.write_all(b"N12345678")?;
        s.read_exact(&mut back)?;
        // The server closes first; waiting for its FIN keeps TIME_WAIT off our ports.
        let mut rest = [0u8; 1];
        let _ = s.read(&mut rest);
        done += 1;
    }
    Ok(f64::from(done) / start.elapsed().as_secs_f64())
}

/// [`new_connection_rate`] from `clients` threads at once, each making at most `each`
/// connections within `limit`: what a bastion with many users sees, where the durable
/// `connection.opened` of one connection can share its fsync with others.
fn concurrent_connection_rate(
    addr: SocketAddr,
    clients: u32,
    each: u32,
    limit: Duration,
) -> Result<f64> {
    // The clients run side by side for about as long: their rates add up.
    let threads: Vec<_> = (0..clients)
        .map(|_| std::thread::spawn(move || new_connection_rate(addr, each, limit)))
        .collect();
    let mut total = 0.0;
    for t in threads {
        total += t
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
    }
    Ok(total)
}

/// Rounds of the bulk transfer, interleaved (proxy, direct, proxy, …): one-shot figures on
/// these machines swing by a third.
const BULK_ROUNDS: usize = 5;
const BULK_BYTES: usize = 256 << 20;

struct Bulk {
    /// Median MiB/s of the rounds through the proxy, and direct.
    proxy: f64,
    direct: f64,
    /// The agent's CPU time (user + system, all threads) per GiB moved through it.
    agent_ms_per_gib: f64,
}

fn bulk_rounds(
    agent: u32,
    protected: SocketAddr,
    unprotected: SocketAddr,
    rounds: usize,
) -> Result<Bulk> {
    use crate::bench_postgres::{clock_ticks_per_second, median, process_cpu_ticks};
    step(&format!(
        "bulk transfer ({} MiB), through the proxy and direct, {rounds} interleaved rounds",
        BULK_BYTES >> 20
    ));
    let (mut proxy, mut direct, mut ticks) = (Vec::new(), Vec::new(), 0u64);
    for _ in 0..rounds {
        let before = process_cpu_ticks(agent)?;
        proxy.push(bulk(protected, BULK_BYTES)?);
        ticks += process_cpu_ticks(agent)?.saturating_sub(before);
        direct.push(bulk(unprotected, BULK_BYTES)?);
    }
    let gib = (BULK_BYTES * rounds) as f64 / f64::from(1u32 << 30);
    let ms = ticks as f64 * 1000.0 / clock_ticks_per_second();
    Ok(Bulk {
        proxy: median(&proxy).unwrap_or(0.0),
        direct: median(&direct).unwrap_or(0.0),
        agent_ms_per_gib: ms / gib,
    })
}

fn bulk(addr: SocketAddr, bytes: usize) -> Result<f64> {
    let mut s = TcpStream::connect(addr)?;
    s.write_all(b"S")?;
    let chunk = vec![0x5au8; 256 * 1024];
    let start = Instant::now();
    let mut sent = 0usize;
    while sent < bytes {
        s.write_all(&chunk)?;
        sent += chunk.len();
    }
    s.shutdown(Shutdown::Write)?;
    let mut ack = Vec::new();
    s.read_to_end(&mut ack)?;
    let secs = start.elapsed().as_secs_f64();
    let counted: usize = String::from_utf8_lossy(&ack).trim().parse().unwrap_or(0);
    if counted != sent {
        bail!("the server counted {counted} bytes of {sent}");
    }
    Ok(sent as f64 / (1024.0 * 1024.0) / secs)
}

/// `E`: echo everything back. `S`: swallow until EOF, then answer the byte count.
/// `N`: answer the next 8 bytes, then close.
fn serve(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let _ = handle(stream);
        });
    }
}

fn handle(mut s: TcpStream) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    let mut mode = [0u8; 1];
    if s.read(&mut mode)? == 0 {
        return Ok(());
    }
    if mode == *b"N" {
        let mut eight = [0u8; 8];
        s.read_exact(&mut eight)?;
        return s.write_all(&eight);
    }
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0usize;
    loop {
        let n = s.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n;
        if mode == *b"E" {
            s.write_all(buf.get(..n).unwrap_or_default())?;
        }
    }
    if mode == *b"S" {
        s.write_all(total.to_string().as_bytes())?;
    }
    Ok(())
}
