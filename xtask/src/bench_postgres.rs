//! `cargo xtask bench postgres`: what the agent's PostgreSQL proxy costs, measured in one
//! run against the direct path and against pgbouncer (session pooling), on one PostgreSQL 15
//! started for the run (`pgbench -i -s 10`, plaintext everywhere, loopback only).
//!
//! Three paths to the same server, interleaved within each case so they share the noise:
//! - direct: pgbench to 127.0.0.1:<pg port> with the password;
//! - pgbouncer: pgbench to pgbouncer's port with the password;
//! - agent: pgbench inside the agent's cgroup to the server's own address with no password;
//!   the kernel redirects the connect to the agent, which logs in upstream with the
//!   credential from its root-only credentials file.
//! - agent tcp: the same redirect to a plain `tcp` target (the server's `::1` address, with
//!   the password): the agent only forwards bytes. It is the floor under the agent's
//!   PostgreSQL path, the cost of the extra hop alone.
//!
//! Then connection setup latency (psycopg: connect, login, `SELECT 1`, close) per path and
//! the agent's RSS with 1,000 idle sessions. Every loop is bounded in count and time.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use portcullis_e2e::pgbouncer::{Pgbouncer, PoolMode};
use portcullis_e2e::postgres::{client_command, PasswordAuth, PgOptions, Postgres, RunAs};
use portcullis_e2e::TestCgroup;

use crate::bench_table::Row;
use crate::step;

const ROLE: &str = "bench";
const PASSWORD: &str = "bench-postgres-password";
const DATABASE: &str = "bench";
const SCALE: &str = "10";
/// pgbench runs as this uid on every path (it needs no account).
const CLIENT_UID: u32 = 42_990;
/// Where the agent path keeps its config, credentials, state and log.
const AGENT_DIR: &str = "/tmp/portcullis-bench-postgres";
const AGENT_PIN_DIR: &str = "/sys/fs/bpf/portcullis-bench-postgres";
/// The redirect bench uses 943.
const AGENT_PROXY_PORT: u16 = 944;
const LATENCY_SAMPLES: usize = 200;
const IDLE_SESSIONS: usize = 1_000;
/// `--case idle10k`: only the idle TLS sessions measurement ([`idle_tls_sessions`]).
const IDLE_TLS_CASE: &str = "idle10k";
/// The agent's redirect needs two descriptors per session (client and server side) plus
/// its own files, sockets and BPF maps.
const AGENT_SPARE_FDS: u64 = 512;
/// A PostgreSQL backend, the agent's session and the client's, per idle session (measured:
/// 1.4 MB proportional set size per backend).
const BACKEND_KIB: u64 = 1_600;
const MEMORY_SPARE_KIB: u64 = 4 << 20;

pub struct Options {
    /// pgbench `-T` for every run.
    seconds: u32,
    /// Runs of every case and path; the table shows the median.
    rounds: usize,
    /// `--case TEXT`: only the cases whose name contains it, and nothing after the table.
    case: Option<String>,
    /// `--perf`: `perf record -a -g` during every run, into
    /// `/tmp/portcullis-bench-perf/<case>.<path>.data`, to see where the CPU goes.
    perf: bool,
    /// `--sessions N`: idle TLS sessions the `idle10k` case holds (default 10,000).
    sessions: usize,
}

impl Options {
    /// `--quick` (-T 3), `--seconds N`, `--rounds N` (default 3: every figure is a
    /// median of interleaved rounds).
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut rounds = None;
        let mut o = Options {
            seconds: 10,
            rounds: 3,
            case: None,
            perf: false,
            sessions: 10_000,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| -> Result<u64> {
                it.next()
                    .and_then(|v| v.parse().ok())
                    .filter(|v| *v > 0)
                    .with_context(|| format!("{name} needs a positive number"))
            };
            match a.as_str() {
                "--quick" => o.seconds = 3,
                "--seconds" => o.seconds = u32::try_from(value("--seconds")?.min(600))?,
                "--rounds" => rounds = Some(usize::try_from(value("--rounds")?.min(9))?),
                "--case" => {
                    o.case = Some(it.next().cloned().context("--case needs part of a case name")?)
                }
                "--perf" => o.perf = true,
                "--sessions" => o.sessions = usize::try_from(value("--sessions")?.min(100_000))?,
                other => bail!(
                    "unknown option `{other}` for the postgres bench (--quick, --seconds N, --rounds N, --case TEXT, --perf, --sessions N)"
                ),
            }
        }
        o.rounds = rounds.unwrap_or(o.rounds);
        Ok(o)
    }
}

/// One pgbench workload.
struct Case {
    name: &'static str,
    args: &'static [&'static str],
}

const CASES: &[Case] = &[
    Case {
        name: "-S -M simple -c1",
        args: &["-S", "-M", "simple", "-c", "1", "-j", "1"],
    },
    Case {
        name: "-S -M simple -c16 -j2",
        args: &["-S", "-M", "simple", "-c", "16", "-j", "2"],
    },
    Case {
        name: "-S -M prepared -c1",
        args: &["-S", "-M", "prepared", "-c", "1", "-j", "1"],
    },
    Case {
        name: "-S -M prepared -c16 -j2",
        args: &["-S", "-M", "prepared", "-c", "16", "-j", "2"],
    },
    Case {
        name: "TPC-B -M simple -c1",
        args: &["-M", "simple", "-c", "1", "-j", "1"],
    },
    Case {
        name: "TPC-B -M simple -c16 -j2",
        args: &["-M", "simple", "-c", "16", "-j", "2"],
    },
    Case {
        name: "TPC-B -M prepared -c1",
        args: &["-M", "prepared", "-c", "1", "-j", "1"],
    },
    Case {
        name: "TPC-B -M prepared -c16 -j2",
        args: &["-M", "prepared", "-c", "16", "-j", "2"],
    },
    Case {
        name: "-C -S -c4 -j2 (new connection per transaction)",
        args: &["-C", "-S", "-M", "simple", "-c", "4", "-j", "2"],
    },
];

/// How a client reaches the server on one path.
struct Endpoint {
    name: &'static str,
    host: &'static str,
    port: u16,
    /// None: the client sends no password (the agent injects its own upstream).
    password: Option<&'static str>,
    /// The client runs inside this cgroup (the agent's), so its connects are redirected.
    cgroup: Option<PathBuf>,
    /// The process in the middle (pgbouncer, the agent), whose CPU time per transaction the
    /// bench reports.
    proxy: Option<u32>,
}

/// One pgbench run: its throughput and what it cost in CPU time.
struct Run {
    tps: f64,
    /// CPU time of the process in the middle per transaction, in microseconds.
    proxy_us: Option<f64>,
    /// CPU time of the whole machine (every process, kernel included) per transaction.
    machine_us: f64,
}

pub fn run(options: &Options) -> Result<Vec<Row>> {
    if !crate::setup::is_root() {
        bail!("the PostgreSQL bench runs the server as `postgres` and attaches eBPF programs: it needs root");
    }
    if options.case.as_deref() == Some(IDLE_TLS_CASE) {
        return idle_tls_sessions(options.sessions);
    }
    let scratch = tempdir()?;

    step(&format!(
        "PostgreSQL 15 for the bench (initdb, pgbench -i -s {SCALE}) and pgbouncer in session mode"
    ));
    let pg = Postgres::start_with(PgOptions {
        log_connections: false,
        ..PgOptions::default()
    });
    pg.create_role(ROLE, PASSWORD, PasswordAuth::Scram);
    pg.create_database(DATABASE, Some(ROLE));
    let direct = Endpoint {
        name: "direct",
        host: "127.0.0.1",
        port: pg.port,
        password: Some(PASSWORD),
        cgroup: None,
        proxy: None,
    };
    let init = pgbench(
        &direct,
        &["-i", "-q", "-s", SCALE],
        &scratch,
        Duration::from_secs(300),
    )?;
    if !init.status.success() {
        bail!(
            "pgbench -i failed: {}",
            String::from_utf8_lossy(&init.stderr)
        );
    }
    let bouncer = Pgbouncer::start(&pg, PoolMode::Session, ROLE, PASSWORD);
    let pooled = Endpoint {
        name: "pgbouncer",
        host: "127.0.0.1",
        port: bouncer.port,
        password: Some(PASSWORD),
        cgroup: None,
        proxy: Some(bouncer.pid()),
    };

    step("the agent path: portcullis with a postgres target on the server's own address");
    let agent = AgentPath::start(&crate::bench_common::agent_bin(), &pg, None);
    let agent_endpoint = match &agent {
        Ok(a) => Ok(a.endpoint(&pg)),
        Err(e) => {
            println!("agent path unavailable, its column is left out: {e:#}");
            Err(format!("{e:#}"))
        }
    };
    let forward_endpoint = match &agent {
        Ok(a) => a.forward_endpoint(&pg),
        Err(e) => Err(format!("{e:#}")),
    };

    step(&format!(
        "pgbench -T {} x {} round(s): direct, pgbouncer, agent and agent tcp interleaved per case",
        options.seconds, options.rounds
    ));
    let mut rows = Vec::new();
    let selected = CASES.iter().filter(|c| {
        options
            .case
            .as_deref()
            .is_none_or(|part| c.name.contains(part))
    });
    for case in selected {
        let _ = pg.try_psql(DATABASE, "CHECKPOINT");
        let mut runs: [Vec<Run>; 4] = Default::default();
        for _ in 0..options.rounds {
            let endpoints: [Result<&Endpoint, &String>; 4] = [
                Ok(&direct),
                Ok(&pooled),
                agent_endpoint.as_ref(),
                forward_endpoint.as_ref(),
            ];
            for (endpoint, samples) in endpoints.iter().zip(runs.iter_mut()) {
                let Ok(endpoint) = endpoint else { continue };
                let perf = match options.perf {
                    true => Some(PerfRecord::start(case.name, endpoint.name)?),
                    false => None,
                };
                let run = pgbench_run(endpoint, case.args, options.seconds, &scratch);
                if let Some(perf) = perf {
                    perf.stop();
                }
                match run {
                    Ok(run) => {
                        println!(
                            "  {:<48} {:<10} {:>10.0} tps {:>8} us CPU/txn in the middle {:>6.1} us CPU/txn in all",
                            case.name,
                            endpoint.name,
                            run.tps,
                            run.proxy_us.map_or("-".to_string(), |us| format!("{us:.1}")),
                            run.machine_us
                        );
                        samples.push(run);
                    }
                    Err(e) => println!("  {:<48} {:<10} error: {e:#}", case.name, endpoint.name),
                }
            }
        }
        rows.push((case.name, runs));
    }

    println!(
        "\n| case | direct TPS | pgbouncer TPS | agent TPS | agent tcp TPS | agent/direct | agent/pgbouncer | agent/agent tcp | agent tcp/direct |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (name, runs) in &rows {
        let [d, b, a, f] = runs
            .each_ref()
            .map(|r| median(&r.iter().map(|r| r.tps).collect::<Vec<_>>()));
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(d),
            cell(b),
            cell(a),
            cell(f),
            ratio(a, d),
            ratio(a, b),
            ratio(a, f),
            ratio(f, d)
        );
    }
    println!(
        "\nCPU time per transaction (microseconds, median of the rounds): the process in the middle, and the whole machine\n\n\
         | case | pgbouncer | agent | agent tcp | machine: direct | machine: pgbouncer | machine: agent | machine: agent tcp |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|"
    );
    for (name, runs) in &rows {
        let proxy = runs
            .each_ref()
            .map(|r| median(&r.iter().filter_map(|r| r.proxy_us).collect::<Vec<_>>()));
        let machine = runs
            .each_ref()
            .map(|r| median(&r.iter().map(|r| r.machine_us).collect::<Vec<_>>()));
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} |",
            micros(proxy[1]),
            micros(proxy[2]),
            micros(proxy[3]),
            micros(machine[0]),
            micros(machine[1]),
            micros(machine[2]),
            micros(machine[3]),
        );
    }
    if let Err(e) = &agent_endpoint {
        println!("\nagent column: not measured: {e}");
    }
    if let Err(e) = &forward_endpoint {
        println!("\nagent tcp column: not measured: {e}");
    }
    let mut table = case_rows(&rows, options.rounds);
    if options.case.is_some() {
        let _ = std::fs::remove_dir_all(&scratch);
        return Ok(table);
    }

    let per_round = LATENCY_SAMPLES.div_ceil(options.rounds);
    step(&format!(
        "connection setup: {} x {per_round} sequential connect + login + SELECT 1 + close (psycopg), paths interleaved",
        options.rounds
    ));
    let paths = [Ok(&direct), Ok(&pooled), agent_endpoint.as_ref()];
    let mut latency: [Vec<f64>; 3] = Default::default();
    for _ in 0..options.rounds {
        for (endpoint, samples) in paths.iter().zip(latency.iter_mut()) {
            let Ok(endpoint) = endpoint else { continue };
            match connect_latency(endpoint, per_round, Duration::from_secs(60), &scratch) {
                Ok(mut l) => samples.append(&mut l),
                Err(e) => println!("  {}: error: {e:#}", endpoint.name),
            }
        }
    }
    println!("\n| path | p50 ms | p99 ms | connections |\n|---|---:|---:|---:|");
    for (endpoint, samples) in paths.iter().zip(&latency) {
        let name = endpoint.map_or("agent", |e| e.name);
        match (percentile(samples, 0.5), percentile(samples, 0.99)) {
            (Some(p50), Some(p99)) => {
                println!("| {name} | {p50:.2} | {p99:.2} | {} |", samples.len())
            }
            _ => println!("| {name} | – | – | not measured |"),
        }
    }
    let [d, b, a] = latency.each_ref().map(|s| percentile(s, 0.5));
    if let (Some(a), Some(d)) = (a, d) {
        table.push(
            Row::new(
                "postgres",
                "postgres.connect_p50",
                "connection setup p50 (psycopg: connect, login, SELECT 1), agent / direct",
                a,
                "ms",
                options.rounds,
            )
            .against(d, "agent / direct"),
        );
    }
    if let (Some(a), Some(b)) = (a, b) {
        table.push(
            Row::new(
                "postgres",
                "postgres.connect_p50_vs_pgbouncer",
                "connection setup p50 (psycopg: connect, login, SELECT 1), agent / pgbouncer",
                a,
                "ms",
                options.rounds,
            )
            .against(b, "agent / pgbouncer"),
        );
    }

    step(&format!(
        "agent memory with {IDLE_SESSIONS} idle sessions through the agent"
    ));
    match (&agent, &agent_endpoint) {
        (Ok(agent), Ok(endpoint)) => match agent.idle_sessions_rss(endpoint, &scratch) {
            Ok(m) => {
                let per_session_kib =
                    (m.after_kib as f64 - m.before_kib as f64) / m.sessions.max(1) as f64;
                println!(
                    "agent VmRSS: {} KiB idle, {} KiB with {} open sessions: {per_session_kib:.1} KiB per session",
                    m.before_kib, m.after_kib, m.sessions,
                );
                table.push(Row::new(
                    "postgres",
                    "postgres.rss_per_session",
                    &format!(
                        "agent RSS per idle session, plaintext ({} held)",
                        m.sessions
                    ),
                    per_session_kib * 1024.0 / 1000.0,
                    "kB",
                    1,
                ));
            }
            Err(e) => println!("agent VmRSS: not measured: {e:#}"),
        },
        (_, Err(e)) => println!("agent VmRSS: not measured: {e}"),
        (Err(e), Ok(_)) => println!("agent VmRSS: not measured: {e:#}"),
    }

    drop(agent);
    drop(bouncer);
    drop(pg);
    let _ = std::fs::remove_dir_all(&scratch);

    match idle_tls_sessions(options.sessions) {
        Ok(rows) => table.extend(rows),
        Err(e) => println!("idle TLS sessions: not measured: {e:#}"),
    }

    // In-process, in release: the proxy applies the same Masker to every selected value.
    step("masking throughput (policy/benches/mask.rs)");
    table.extend(crate::bench_table::cargo_bench_rows(
        "masking",
        "portcullis-policy",
        "mask",
    )?);
    Ok(table)
}

/// The table's rows of every pgbench case: the agent's TPS against direct and against
/// pgbouncer, its CPU per transaction against pgbouncer's, and the plain forwarder's TPS
/// against direct; medians of the rounds (a row is left out when a path has no sample).
fn case_rows(cases: &[(&str, [Vec<Run>; 4])], rounds: usize) -> Vec<Row> {
    let mut table = Vec::new();
    for (name, runs) in cases {
        let [d, b, a, f] = runs
            .each_ref()
            .map(|r| median(&r.iter().map(|r| r.tps).collect::<Vec<_>>()));
        let [_, cpu_b, cpu_a, _] = runs
            .each_ref()
            .map(|r| median(&r.iter().filter_map(|r| r.proxy_us).collect::<Vec<_>>()));
        let tps = |key: &str, value: Option<f64>, base: Option<f64>, of: &str| {
            value.zip(base).map(|(v, base)| {
                Row::new(
                    "postgres",
                    &format!("{key}/{name}"),
                    &format!("{name}: TPS {of}"),
                    v,
                    "TPS",
                    rounds,
                )
                .against(base, of)
            })
        };
        table.extend(tps("postgres.tps_vs_pgbouncer", a, b, "agent / pgbouncer"));
        table.extend(cpu_a.zip(cpu_b).map(|(v, base)| {
            Row::new(
                "postgres",
                &format!("postgres.cpu_per_txn/{name}"),
                &format!("{name}: CPU per transaction, agent / pgbouncer"),
                v,
                "µs",
                rounds,
            )
            .against(base, "agent / pgbouncer")
        }));
        table.extend(tps("postgres.tps_vs_direct", a, d, "agent / direct"));
        table.extend(tps("postgres.tcp_vs_direct", f, d, "agent tcp / direct"));
    }
    table
}

/// The `q` quantile of unsorted samples (None without any).
fn percentile(samples: &[f64], q: f64) -> Option<f64> {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(((s.len() as f64 - 1.0) * q).round() as usize)
        .copied()
}

/// `perf record -a -g` for the length of one run (`--perf`).
struct PerfRecord {
    child: Child,
    path: PathBuf,
}

impl PerfRecord {
    fn start(case: &str, path: &str) -> Result<Self> {
        let dir = Path::new("/tmp/portcullis-bench-perf");
        std::fs::create_dir_all(dir)?;
        let file: String = case
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let path = dir.join(format!("{file}.{}.data", path.replace(' ', "-")));
        let child = Command::new("perf")
            .args(["record", "-q", "-a", "-g", "-F", "999", "-o"])
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf (Debian's linux-perf)")?;
        Ok(Self { child, path })
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = wait_bounded(&mut self.child, Duration::from_secs(60));
        println!("  perf data: {}", self.path.display());
    }
}

fn tempdir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("portcullis-bench-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

fn cell(v: Option<f64>) -> String {
    v.map_or_else(|| "error".to_string(), |v| format!("{v:.0}"))
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "–".to_string(),
    }
}

pub(crate) fn median(samples: &[f64]) -> Option<f64> {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied()
}

/// pgbench with its output in files (a failing run can print a line per transaction),
/// killed if it outlives `limit`.
fn pgbench(endpoint: &Endpoint, args: &[&str], scratch: &Path, limit: Duration) -> Result<Output> {
    let out_path = scratch.join("pgbench.out");
    let err_path = scratch.join("pgbench.err");
    let port = endpoint.port.to_string();
    let mut cmd = client_command(
        "pgbench",
        RunAs {
            uid: Some(CLIENT_UID),
            cgroup: endpoint.cgroup.as_deref(),
        },
    );
    cmd.args(["-h", endpoint.host, "-p", &port, "-U", ROLE])
        .args(args)
        .arg(DATABASE)
        .env("PGSSLMODE", "disable")
        .env_remove("PGPASSWORD")
        .stdout(File::create(&out_path)?)
        .stderr(File::create(&err_path)?)
        .current_dir("/");
    if let Some(password) = endpoint.password {
        cmd.env("PGPASSWORD", password);
    }
    let mut child = cmd.spawn().context("starting pgbench")?;
    let status = wait_bounded(&mut child, limit)?;
    Ok(Output {
        status,
        stdout: std::fs::read(&out_path)?,
        stderr: std::fs::read(&err_path)?,
    })
}

fn wait_bounded(child: &mut Child, limit: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("still running after {} s, killed", limit.as_secs());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn micros(v: Option<f64>) -> String {
    v.map_or("–".to_string(), |v| format!("{v:.1}"))
}

/// One pgbench run with the CPU time it cost: the process in the middle's (utime + stime of
/// all its threads) and the machine's (every non-idle tick of /proc/stat).
fn pgbench_run(endpoint: &Endpoint, case: &[&str], seconds: u32, scratch: &Path) -> Result<Run> {
    let proxy_before = endpoint.proxy.map(process_cpu_ticks).transpose()?;
    let machine_before = machine_busy_ticks()?;
    let (tps, transactions) = pgbench_tps(endpoint, case, seconds, scratch)?;
    let machine_after = machine_busy_ticks()?;
    let proxy_after = endpoint.proxy.map(process_cpu_ticks).transpose()?;
    let per_txn =
        |ticks: u64| ticks as f64 * 1e6 / clock_ticks_per_second() / transactions.max(1) as f64;
    Ok(Run {
        tps,
        proxy_us: proxy_before
            .zip(proxy_after)
            .map(|(b, a)| per_txn(a.saturating_sub(b))),
        machine_us: per_txn(machine_after.saturating_sub(machine_before)),
    })
}

/// utime + stime of a process and all its threads, in clock ticks (/proc/PID/stat).
pub(crate) fn process_cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count from after its closing parenthesis,
    // where field 3 starts; utime and stime are fields 14 and 15.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("no `)` in /proc/PID/stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("field {n} of /proc/{pid}/stat"))
    };
    Ok(field(14)? + field(15)?)
}

/// Non-idle clock ticks of all CPUs since boot (/proc/stat `cpu`: everything but idle and
/// iowait).
fn machine_busy_ticks() -> Result<u64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no `cpu` line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already)
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    Ok(at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

pub(crate) fn clock_ticks_per_second() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// pgbench's `tps = ` and `number of transactions actually processed: `.
fn pgbench_tps(
    endpoint: &Endpoint,
    case: &[&str],
    seconds: u32,
    scratch: &Path,
) -> Result<(f64, u64)> {
    let t = seconds.to_string();
    let args: Vec<&str> = ["-n", "-T", t.as_str()]
        .iter()
        .chain(case)
        .copied()
        .collect();
    let out = pgbench(
        endpoint,
        &args,
        scratch,
        Duration::from_secs(u64::from(seconds) + 30),
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first_error = || {
        stderr
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("no message")
            .to_string()
    };
    if !out.status.success() {
        bail!("pgbench exited with {}: {}", out.status, first_error());
    }
    if let Some(failed) = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of failed transactions: "))
        .filter(|f| !f.starts_with('0'))
    {
        bail!("{failed} transactions failed: {}", first_error());
    }
    let tps = stdout
        .lines()
        .find_map(|l| l.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no `tps = ` line in pgbench's output:\n{stdout}"))?;
    let transactions = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|v| v.parse().ok())
        .with_context(|| {
            format!("no `number of transactions actually processed` line in pgbench's output:\n{stdout}")
        })?;
    Ok((tps, transactions))
}

/// Sequential connect + login + `SELECT 1` + close, timed by the client. psycopg (libpq,
/// built optimized) rather than tokio-postgres in this debug-built xtask, whose SCRAM key
/// derivation alone takes tens of milliseconds.
const LATENCY_SCRIPT: &str = r#"
import sys, time, psycopg
conninfo, count, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
samples = []
start = time.monotonic()
while len(samples) < count and time.monotonic() - start < limit:
    t = time.perf_counter()
    conn = psycopg.connect(conninfo, connect_timeout=10, autocommit=True)
    conn.execute("SELECT 1").fetchone()
    conn.close()
    samples.append((time.perf_counter() - t) * 1000.0)
print(" ".join("%.4f" % s for s in samples))
"#;

/// Opens `count` sessions (each answers one query), prints how many, holds them until a line
/// arrives on stdin (or EOF), then closes them.
const IDLE_SESSIONS_SCRIPT: &str = r#"
import sys, time, psycopg
conninfo, count, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
conns = []
start = time.monotonic()
while len(conns) < count:
    if time.monotonic() - start > limit:
        sys.exit("only %d sessions open after %d s" % (len(conns), limit))
    conn = psycopg.connect(conninfo, connect_timeout=10, autocommit=True)
    conn.execute("SELECT 1").fetchone()
    conns.append(conn)
print(len(conns), flush=True)
sys.stdin.readline()
for conn in conns:
    conn.close()
"#;

/// The endpoint as a libpq connection string (the password, if any, goes in the environment).
fn conninfo(endpoint: &Endpoint) -> String {
    format!(
        "host={} port={} user={ROLE} dbname={DATABASE} sslmode=disable",
        endpoint.host, endpoint.port
    )
}

/// The venv's Python, run like pgbench: as `CLIENT_UID`, inside the endpoint's cgroup.
fn python(endpoint: &Endpoint, script: &str, args: &[String]) -> Result<Command> {
    let python = portcullis_e2e::postgres::python_if_installed()
        .context("no .tools/venv with psycopg: run `cargo xtask setup`")?;
    let mut cmd = Command::new(python);
    portcullis_e2e::exec_in_cgroup_as(&mut cmd, endpoint.cgroup.as_deref(), Some(CLIENT_UID));
    cmd.args(["-c", script])
        .arg(conninfo(endpoint))
        .args(args)
        .env_remove("PGPASSWORD")
        .current_dir("/");
    if let Some(password) = endpoint.password {
        cmd.env("PGPASSWORD", password);
    }
    Ok(cmd)
}

fn last_line(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("no message")
        .to_string()
}

fn connect_latency(
    endpoint: &Endpoint,
    count: usize,
    limit: Duration,
    scratch: &Path,
) -> Result<Vec<f64>> {
    let out_path = scratch.join("latency.out");
    let err_path = scratch.join("latency.err");
    let mut child = python(
        endpoint,
        LATENCY_SCRIPT,
        &[count.to_string(), limit.as_secs().to_string()],
    )?
    .stdin(Stdio::null())
    .stdout(File::create(&out_path)?)
    .stderr(File::create(&err_path)?)
    .spawn()
    .context("starting the latency client")?;
    let status = wait_bounded(&mut child, limit + Duration::from_secs(30))?;
    if !status.success() {
        bail!("{status}: {}", last_line(&std::fs::read(&err_path)?));
    }
    let samples: Vec<f64> = std::fs::read_to_string(&out_path)?
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    if samples.is_empty() {
        bail!("no sample: {}", last_line(&std::fs::read(&err_path)?));
    }
    Ok(samples)
}

struct IdleMemory {
    before_kib: u64,
    after_kib: u64,
    sessions: usize,
}

/// The agent as the third path: its own cgroup, a `postgres` target on the server's own
/// address and port, an allow-all policy and a root-only credentials file for `bench`.
/// Everything agent-specific is here, so the path can change without touching the rest.
struct AgentPath {
    child: Child,
    bin: PathBuf,
    config: PathBuf,
    cgroup: TestCgroup,
}

impl AgentPath {
    /// `upstream_ca`: TLS to the server, verified against this CA; None: plaintext, like
    /// pgbouncer in this bench.
    fn start(bin: &Path, pg: &Postgres, upstream_ca: Option<&Path>) -> Result<Self> {
        if !bin.is_file() {
            bail!(
                "{} is missing (`cargo xtask bench` builds it)",
                bin.display()
            );
        }
        if crate::cgroup2_root().is_err() {
            bail!("no cgroup2 hierarchy is mounted");
        }
        let dir = Path::new(AGENT_DIR);
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir.join("policies"))?;
        std::fs::write(
            dir.join("policies/bench.cedar"),
            "// The bench measures the data path: every connection and every query is allowed.\n\
             @id(\"bench-allow-all\")\npermit (principal, action, resource);\n",
        )?;
        let credentials = dir.join("credentials.toml");
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&credentials)?;
            writeln!(f, "[roles.{ROLE}]\npassword = \"{PASSWORD}\"")?;
        }
        let cgroup = TestCgroup::new("bench-postgres");
        let config = dir.join("portcullis.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{state}\"\n\
                 [control]\nsocket = \"{socket}\"\n\
                 # Held idle sessions must outlast the bench's hold.\n\
                 [proxy]\nport = {AGENT_PROXY_PORT}\ndrain_timeout_secs = 5\nidle_timeout_secs = 3600\n\
                 [bpf]\ncgroup = \"{cgroup}\"\npin_dir = \"{AGENT_PIN_DIR}\"\n\
                 [policy]\ndir = \"{policies}\"\n\
                 # The data path is measured here, not the login: attribute to the Unix account.\n\
                 [insecure]\nunix_identity_only = true\n\n\
                 # One uid (pgbench -C) opens connections as fast as it can: per-uid limits\n\
                 # would only measure themselves.\n\
                 [limits]\nmax_open_per_uid = 100000\nmax_startup_per_uid = 100000\n\
                 new_connections_per_sec = 1000000\nnew_connections_burst = 1000000\n\
                 [[target]]\nname = \"benchdb\"\nprotocol = \"postgres\"\n\
                 # The server's own address: the kernel redirects connects to it.\n\
                 address = \"127.0.0.1\"\nport = {port}\n\
                 [target.postgres]\n{tls}\
                 credentials_file = \"{credentials}\"\n{pool}{forward}",
                // PORTCULLIS_BENCH_PG_POOL="{ size = 20 }": the agent path pools its server
                // sessions (docs/postgres.md "Upstream pool"), for the `-C` case against
                // pgbouncer's session pooling.
                pool = std::env::var("PORTCULLIS_BENCH_PG_POOL")
                    .map(|p| format!("pool = {p}\n"))
                    .unwrap_or_default(),
                tls = match upstream_ca {
                    Some(ca) => format!("tls = \"verify-full\"\nca_file = \"{}\"\n", ca.display()),
                    None => "# Plaintext to the server, like pgbouncer in this bench.\n\
                             tls = \"insecure-plaintext\"\n"
                        .to_string(),
                },
                state = dir.join("state").display(),
                socket = dir.join("control.sock").display(),
                cgroup = cgroup.path.display(),
                policies = dir.join("policies").display(),
                port = pg.port,
                credentials = credentials.display(),
                forward = if pg.listens_on_v6() {
                    format!(
                        "\n# The floor: bytes forwarded, nothing parsed (pgbench logs in itself).\n\
                         [[target]]\nname = \"benchdb-tcp\"\nprotocol = \"tcp\"\n\
                         address = \"::1\"\nport = {port}\n",
                        port = pg.port
                    )
                } else {
                    String::new()
                },
            ),
        )?;
        let child = crate::bench_common::spawn_agent_in_cgroup(
            bin,
            &config,
            dir,
            &cgroup.path,
            AGENT_PIN_DIR,
            || true,
        )?;
        Ok(Self {
            child,
            bin: bin.to_path_buf(),
            config,
            cgroup,
        })
    }

    /// pgbench and the latency client connect to the real server address from inside the
    /// agent's cgroup, with no password: the agent supplies the credential upstream.
    fn endpoint(&self, pg: &Postgres) -> Endpoint {
        Endpoint {
            name: "agent",
            host: "127.0.0.1",
            port: pg.port,
            password: None,
            cgroup: Some(self.cgroup.path.clone()),
            proxy: Some(self.child.id()),
        }
    }

    /// The same redirect to the plain `tcp` target on the server's `::1` address: pgbench
    /// logs in itself, the agent forwards bytes.
    fn forward_endpoint(&self, pg: &Postgres) -> Result<Endpoint, String> {
        if !pg.listens_on_v6() {
            return Err("the server does not listen on ::1 (no IPv6 loopback)".into());
        }
        Ok(Endpoint {
            name: "agent tcp",
            host: "::1",
            port: pg.port,
            password: Some(PASSWORD),
            cgroup: Some(self.cgroup.path.clone()),
            proxy: Some(self.child.id()),
        })
    }

    /// VmRSS before and after `IDLE_SESSIONS` logged-in sessions are open through the agent
    /// (a psycopg client in the agent's cgroup; 10 s per login, 180 s in all).
    fn idle_sessions_rss(&self, endpoint: &Endpoint, scratch: &Path) -> Result<IdleMemory> {
        use std::io::{BufRead, Write};
        let pid = self.child.id();
        let before_kib = crate::bench_common::rss_kib(pid)?;
        let err_path = scratch.join("idle.err");
        let mut client = python(
            endpoint,
            IDLE_SESSIONS_SCRIPT,
            &[IDLE_SESSIONS.to_string(), "150".to_string()],
        )?
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(File::create(&err_path)?)
        .spawn()
        .context("starting the idle-session client")?;
        // The script gives up by itself after 150 s, so this read ends.
        let mut line = String::new();
        if let Some(stdout) = client.stdout.take() {
            std::io::BufReader::new(stdout).read_line(&mut line)?;
        }
        let sessions: Option<usize> = line.trim().parse().ok();
        let after_kib = crate::bench_common::rss_kib(pid);
        if let Some(mut stdin) = client.stdin.take() {
            let _ = stdin.write_all(b"done\n");
        }
        let status = wait_bounded(&mut client, Duration::from_secs(30))?;
        let Some(sessions) = sessions else {
            bail!("{status}: {}", last_line(&std::fs::read(&err_path)?));
        };
        Ok(IdleMemory {
            before_kib,
            after_kib: after_kib?,
            sessions,
        })
    }
}

impl Drop for AgentPath {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        }
        if wait_bounded(&mut self.child, Duration::from_secs(10)).is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = Command::new(&self.bin)
            .args(["agent", "--detach", "--config"])
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(AGENT_PIN_DIR);
        // `cgroup` drops next: it kills what is left inside and removes the group.
    }
}

/// `--case idle10k`: `sessions` idle PostgreSQL sessions through the agent with TLS on both
/// sides (the client verifies the agent's local CA, the agent verifies the server's), held
/// by `xtask idle-client` in the agent's cgroup; the agent's RSS and CPU before, with them
/// open, and after 10 s of holding them; then every one must still answer `SELECT 1`.
/// The server is one of its own: `max_connections` sized for the run.
fn idle_tls_sessions(requested: usize) -> Result<Vec<Row>> {
    use std::io::{BufRead, Write};
    let hard = portcullis_e2e::idle_tls::raise_fd_limit()?;
    // The agent inherits this limit; the unit's LimitNOFILE (131072) is far above it.
    let fit = usize::try_from(hard.saturating_sub(AGENT_SPARE_FDS) / 2)?;
    let mut sessions = requested.min(fit);
    if sessions < requested {
        println!(
            "open-file hard limit {hard} here: the agent can hold at most {sessions} sessions (two descriptors each), not {requested}"
        );
    }
    // Each session is also a PostgreSQL backend (about 1.4 MB of its own): on a shared
    // machine the bench holds no more than what leaves others room.
    let available = mem_available_kib()?;
    let fit = usize::try_from(available.saturating_sub(MEMORY_SPARE_KIB) / BACKEND_KIB)?;
    if fit < sessions {
        println!(
            "{} MiB available: at most {fit} sessions leave {} MiB to the rest of the machine, not {sessions}",
            available / 1024,
            MEMORY_SPARE_KIB / 1024
        );
        sessions = fit;
    }
    step(&format!(
        "{sessions} idle sessions through the agent, TLS on both sides (PostgreSQL with max_connections = {})",
        sessions + 20
    ));
    let scratch = tempdir()?;
    let pg = Postgres::start_with(PgOptions {
        tls: true,
        require_tls: true,
        max_connections: u32::try_from(sessions + 20)?,
        shared_buffers: "128MB",
        log_connections: false,
    });
    pg.create_role(ROLE, PASSWORD, PasswordAuth::Scram);
    pg.create_database(DATABASE, Some(ROLE));
    let agent = AgentPath::start(
        &crate::bench_common::agent_bin(),
        &pg,
        Some(&pg.ca_pem_path()),
    )?;
    let pid = agent.child.id();
    // The client runs as CLIENT_UID: it gets its own copy of the agent's CA certificate.
    let ca = scratch.join("agent-ca.pem");
    std::fs::copy(Path::new(AGENT_DIR).join("state/ca/ca.pem"), &ca)
        .context("the agent's local CA certificate")?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&scratch, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&ca, std::fs::Permissions::from_mode(0o644))?;
    }
    let limit = Duration::from_secs(600);
    let mut cmd = Command::new(std::env::current_exe()?);
    portcullis_e2e::exec_in_cgroup_as(&mut cmd, Some(&agent.cgroup.path), Some(CLIENT_UID));
    let err_path = scratch.join("idle-tls.err");
    let mut client = cmd
        .arg("idle-client")
        .arg(format!("127.0.0.1:{}", pg.port))
        .args([ROLE, DATABASE])
        .arg(&ca)
        .arg(sessions.to_string())
        .arg(limit.as_secs().to_string())
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(File::create(&err_path)?)
        .spawn()
        .context("starting the idle TLS client")?;
    let (Some(mut stdin), Some(stdout)) = (client.stdin.take(), client.stdout.take()) else {
        bail!("the idle TLS client has no stdin/stdout");
    };
    let mut stdout = std::io::BufReader::new(stdout);
    let mut line = String::new();
    let rss_before = crate::bench_common::rss_kib(pid)?;
    let cpu_before = process_cpu_ticks(pid)?;
    let started = Instant::now();
    // The client gives up by itself after `limit`, so this read ends.
    stdout.read_line(&mut line)?;
    let open: Option<usize> = line
        .trim()
        .strip_prefix("open ")
        .and_then(|n| n.parse().ok());
    let opening = started.elapsed();
    let rss_open = crate::bench_common::rss_kib(pid)?;
    let cpu_open = process_cpu_ticks(pid)?;
    let hold = Duration::from_secs(10);
    std::thread::sleep(hold);
    let rss_held = crate::bench_common::rss_kib(pid)?;
    let cpu_held = process_cpu_ticks(pid)?;
    writeln!(stdin, "query")?;
    line.clear();
    stdout.read_line(&mut line)?;
    let answered: Option<usize> = line
        .trim()
        .strip_prefix("answered ")
        .and_then(|n| n.parse().ok());
    let _ = writeln!(stdin, "close");
    drop(stdin);
    let status = wait_bounded(&mut client, Duration::from_secs(60))?;
    let errors = std::fs::read_to_string(&err_path).unwrap_or_default();
    drop(agent);
    drop(pg);
    let _ = std::fs::remove_dir_all(&scratch);
    let Some(open) = open.filter(|n| *n > 0) else {
        bail!(
            "{status}: no session opened: {}",
            last_line(errors.as_bytes())
        );
    };
    if !errors.trim().is_empty() {
        println!("idle TLS client: {}", errors.trim());
    }
    let hz = clock_ticks_per_second();
    let per_session_kb = (rss_held as f64 - rss_before as f64) * 1024.0 / 1000.0 / open as f64;
    let setup_ms = (cpu_open - cpu_before) as f64 * 1000.0 / hz / open as f64;
    let idle_cpu = (cpu_held - cpu_open) as f64 / hz / hold.as_secs_f64() * 100.0;
    let answered = answered.unwrap_or(0);
    println!(
        "agent VmRSS: {rss_before} KiB before, {rss_open} KiB with {open} TLS sessions open ({:.0} s to open), {rss_held} KiB after holding them {} s: {per_session_kb:.1} kB per session\n\
         agent CPU: {setup_ms:.2} ms per session opened, {idle_cpu:.1} % of a core while they were idle; {answered} of {open} answered SELECT 1 afterwards",
        opening.as_secs_f64(),
        hold.as_secs()
    );
    let label = |what: &str| format!("{what} ({open} idle TLS sessions held)");
    Ok(vec![
        Row::new(
            "postgres",
            "postgres.rss_per_tls_session",
            &label("agent RSS per idle session, TLS on both sides"),
            per_session_kb,
            "kB",
            1,
        ),
        Row::new(
            "postgres",
            "postgres.rss_tls_sessions",
            &label("agent RSS"),
            rss_held as f64 * 1024.0 / 1e6,
            "MB",
            1,
        )
        .against(rss_before as f64 * 1024.0 / 1e6, "held / idle"),
        Row::new(
            "postgres",
            "postgres.cpu_per_tls_session_setup",
            &label("agent CPU per session opened (TLS handshake both sides, SCRAM upstream)"),
            setup_ms,
            "ms",
            1,
        ),
        Row::new(
            "postgres",
            "postgres.cpu_tls_sessions_idle",
            &label("agent CPU while the sessions are idle, % of a core"),
            idle_cpu,
            "%",
            1,
        ),
        Row::new(
            "postgres",
            "postgres.tls_sessions_answering",
            &label("held sessions that answer SELECT 1 afterwards"),
            answered as f64,
            "sessions",
            1,
        )
        .against(open as f64, "answered / held"),
    ])
}

fn mem_available_kib() -> Result<u64> {
    std::fs::read_to_string("/proc/meminfo")?
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no MemAvailable in /proc/meminfo")
}
