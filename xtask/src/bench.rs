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

use crate::bench_table::{Failure, Row};
use crate::step;

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

/// `args`: the benchmark's name (default `all`), then its options: `redirect` and `audit` take
/// `--rounds N` and `--quick`; `postgres` takes `--quick`, `--seconds N`, `--rounds N`,
/// `--case TEXT`, `--perf`; `ssh` takes `--quick`, `--rounds N`, `--perf`; `all` takes
/// `--quick`, `--rounds N` and `--seconds N` and passes each suite the ones it knows.
/// Every suite prints the one table of its rows and writes it under `target/bench/`.
pub fn run(args: &[String]) -> Result<()> {
    let (which, options) = match args.split_first() {
        Some((first, rest)) if !first.starts_with("--") => (first.as_str(), rest),
        _ => ("all", args),
    };
    let results: Vec<SuiteResult> = match which {
        "redirect" => {
            let o = Options::parse(options)?;
            vec![("redirect", in_bench_cgroup(|bin, config| measure(bin, config, &o)))]
        }
        "tcp-bulk" => {
            let o = Options::parse(options)?;
            vec![(
                "redirect",
                in_bench_cgroup(|bin, config| measure_bulk(bin, config, &o)),
            )]
        }
        "tcp-connect" => {
            let o = Options::parse(options)?;
            vec![(
                "redirect",
                in_bench_cgroup(|bin, config| measure_connects(bin, config, &o)),
            )]
        }
        "policy" => vec![("policy", policy())],
        "audit" => vec![("audit", audit(&Options::parse(options)?))],
        "review" => vec![("review", review())],
        "console" => vec![("console", console())],
        "postgres" => {
            let o = crate::bench_postgres::Options::parse(options)?;
            vec![("postgres", crate::bench_postgres::run(&o))]
        }
        "ssh" => {
            let o = crate::bench_ssh::Options::parse(options)?;
            vec![("ssh", crate::bench_ssh::run(&o))]
        }
        "all" => all(options)?,
        other => bail!(
            "unknown benchmark `{other}` (redirect, tcp-bulk, tcp-connect, policy, audit, review, console, postgres, ssh, all)"
        ),
    };
    let stem = if which == "all" { "bench" } else { which };
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    for (suite, result) in results {
        match result {
            Ok(r) => rows.extend(r),
            Err(e) => failures.push(Failure {
                suite: suite.to_string(),
                error: format!("{e:#}"),
            }),
        }
    }
    crate::bench_table::report(stem, &rows, &failures)?;
    if !failures.is_empty() {
        let names: Vec<&str> = failures.iter().map(|f| f.suite.as_str()).collect();
        bail!("not measured: {}", names.join(", "));
    }
    Ok(())
}

/// A suite's name and its rows, or why it has none.
type SuiteResult = (&'static str, Result<Vec<Row>>);

/// Every suite, one after the other; one that fails stays in the table as a failure and
/// the others still run (a bench of an hour must not be lost to its last suite).
fn all(options: &[String]) -> Result<Vec<SuiteResult>> {
    let mut quick = Vec::new();
    let mut rounds = Vec::new();
    let mut seconds = Vec::new();
    let mut it = options.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => quick.push(a.clone()),
            "--rounds" | "--seconds" => {
                let v = it
                    .next()
                    .cloned()
                    .with_context(|| format!("{a} needs a number"))?;
                let into = if a == "--rounds" {
                    &mut rounds
                } else {
                    &mut seconds
                };
                into.extend([a.clone(), v]);
            }
            other => bail!(
                "unknown option `{other}` for all the benches (--quick, --rounds N, --seconds N); \
                 run one suite for its own options"
            ),
        }
    }
    let common: Vec<String> = quick.iter().chain(&rounds).cloned().collect();
    let with_seconds: Vec<String> = common.iter().chain(&seconds).cloned().collect();
    // Every option is checked before the first suite starts.
    let redirect = Options::parse(&common)?;
    let postgres = crate::bench_postgres::Options::parse(&with_seconds)?;
    let ssh = crate::bench_ssh::Options::parse(&common)?;
    Ok(vec![
        (
            "redirect",
            in_bench_cgroup(|bin, config| measure(bin, config, &redirect)),
        ),
        ("policy", policy()),
        ("audit", audit(&redirect)),
        ("postgres", crate::bench_postgres::run(&postgres)),
        ("ssh", crate::bench_ssh::run(&ssh)),
        ("review", review()),
        ("console", console()),
    ])
}

/// Options of the suites this file runs (`redirect`, `tcp-bulk`, `audit`).
pub struct Options {
    /// Interleaved rounds; every figure is their median.
    rounds: usize,
    /// Fewer connections and bytes per round, three rounds unless `--rounds` says otherwise.
    quick: bool,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut rounds = None;
        let mut quick = false;
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => quick = true,
                "--rounds" => {
                    rounds = Some(
                        it.next()
                            .and_then(|v| v.parse::<usize>().ok())
                            .filter(|v| (1..=20).contains(v))
                            .context("--rounds needs a number from 1 to 20")?,
                    )
                }
                other => bail!("unknown option `{other}` for this bench (--quick, --rounds N)"),
            }
        }
        Ok(Options {
            rounds: rounds.unwrap_or(if quick { 3 } else { 5 }),
            quick,
        })
    }

    /// Each loop's count in one round: the total a one-shot run made, shared by the rounds
    /// (halved by `--quick`), never below `floor`.
    fn per_round(&self, total: u32, floor: u32) -> u32 {
        let total = if self.quick { total / 2 } else { total };
        (total / u32::try_from(self.rounds).unwrap_or(1).max(1)).max(floor)
    }

    /// Each loop's time limit in one round, so a slow machine still ends.
    fn limit(&self) -> Duration {
        Duration::from_secs(if self.quick { 5 } else { 10 })
    }

    fn bulk_bytes(&self) -> usize {
        if self.quick {
            64 << 20
        } else {
            BULK_BYTES
        }
    }
}

/// Runs the paths of one measure in turn, the order swapped every other round so that
/// neither always goes first (warm caches, the previous step's TIME_WAITs).
fn interleaved<T>(
    round: usize,
    first: impl FnOnce() -> Result<T>,
    second: impl FnOnce() -> Result<T>,
) -> Result<(T, T)> {
    if round.is_multiple_of(2) {
        let a = first()?;
        Ok((a, second()?))
    } else {
        let b = second()?;
        Ok((first()?, b))
    }
}

fn med(samples: &[f64]) -> f64 {
    crate::bench_postgres::median(samples).unwrap_or(0.0)
}

fn policy() -> Result<Vec<Row>> {
    step("policy decision latency and throughput (10, 100, 1,000 policies)");
    crate::bench_table::cargo_bench_rows("policy", "portcullis-policy", "decide")
}

fn audit(o: &Options) -> Result<Vec<Row>> {
    step("audit store: events/s with an fsync per event and per batch (group commit)");
    let mut rows =
        crate::bench_table::cargo_bench_rows("audit", "portcullis-audit-store", "append")?;
    rows.extend(in_bench_cgroup(|bin, config| {
        let mut rows = measure_gated(bin, config, o)?;
        rows.extend(measure_central(bin, config, o)?);
        Ok(rows)
    })?);
    rows.extend(measure_volume()?);
    Ok(rows)
}

/// Bytes of audit trail on disk per statement event after 60 s of `pgbench -S -c16` through
/// the agent with its default audit settings, and the statement events written per second:
/// an ignored end-to-end test (tests/audit.rs, slot 34) run against the bench's agent binary,
/// its `BENCH-ROW` lines read back.
fn measure_volume() -> Result<Vec<Row>> {
    step("audit volume: pgbench -S -c16 for 60 s through the agent, bytes on disk per statement event");
    let bin = crate::bench_common::agent_bin();
    let mut test = crate::cargo_cmd(&[
        "test",
        "-p",
        "portcullis-e2e",
        "--test",
        "audit",
        "bench_audit_bytes_per_statement_event_under_pgbench",
        "--",
        "--ignored",
        "--exact",
        "--nocapture",
    ]);
    test.env("PORTCULLIS_E2E", "required")
        .env("PORTCULLIS_BIN", &bin);
    let out = crate::bench_table::run_capturing(&mut test)?;
    let rows = crate::bench_table::parse_rows("audit", &out)?;
    if rows.is_empty() {
        bail!("the audit volume bench printed no BENCH-ROW line");
    }
    Ok(rows)
}

/// Runs one ignored test of the agent (a bench body: the agent is a binary crate), built for
/// release; its output.
fn agent_bench_test(name: &str, env: &[(&str, String)]) -> Result<String> {
    let mut cmd = crate::cargo_cmd(&[
        "test",
        "--release",
        "-p",
        "portcullis-agent",
        "--bin",
        "portcullis",
        name,
        "--",
        "--ignored",
        "--exact",
        "--nocapture",
    ]);
    cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    crate::bench_table::run_capturing(&mut cmd)
}

/// `portcullis review report` over a generated trail of a million events (the tested quarter
/// renamed round after round): the time of each format and of each phase. The agent is a
/// binary crate, so the measure is one of its ignored tests, built for release; its lines
/// `review report over N events (Format): … events/s` become the rows.
fn review() -> Result<Vec<Row>> {
    step("review report over 1,000,000 events (md, csv, json; verify, read, compute)");
    let out = agent_bench_test("review::tests::bench_report_over_a_million_events", &[])?;
    let rows = crate::bench_table::parse_review_lines(&out);
    if rows.is_empty() {
        bail!("the review bench printed no `review report over N events (…): … events/s` line");
    }
    Ok(rows)
}

/// The console's sessions page (and `portcullis sessions list`) over 1,000,000 events: p50
/// and p99 of the newest page, a page deep in the past, a filtered page, and the store's
/// last seq. Like `review`, the body is an ignored test of the agent, built for release.
fn console() -> Result<Vec<Row>> {
    step("sessions page over 1,000,000 events (newest, deep, filtered; p50 and p99)");
    let out = agent_bench_test(
        "audit::query::tests::bench_sessions_page_over_a_million_events",
        &[],
    )?;
    let mut rows = crate::bench_table::parse_rows("console", &out)?;
    if rows.is_empty() {
        bail!("the sessions page bench printed no BENCH-ROW line");
    }
    // The fleet console's pages over a central store of the same size: the body migrates
    // and fills this PostgreSQL as its superuser, then reads it as a reader role.
    step("fleet console over 1,000,000 central events (newest, deep, filtered, timeline, hosts)");
    use portcullis_e2e::postgres::{Postgres, SUPERUSER_PASSWORD};
    const DB: &str = "portcullis";
    let pg = Postgres::start(DB);
    std::fs::create_dir_all(BENCH_DIR)?;
    let pw = PathBuf::from(BENCH_DIR).join("central-admin.pw");
    std::fs::write(&pw, SUPERUSER_PASSWORD)?;
    std::fs::set_permissions(&pw, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let out = agent_bench_test(
        "audit::central_read::tests::bench_fleet_pages_over_a_million_events",
        &[
            (
                "PORTCULLIS_BENCH_CENTRAL_ADMIN_URL",
                format!("postgres://postgres@127.0.0.1:{}/{DB}", pg.port),
            ),
            (
                "PORTCULLIS_BENCH_CENTRAL_ADMIN_PASSWORD_FILE",
                pw.display().to_string(),
            ),
        ],
    )?;
    let fleet = crate::bench_table::parse_rows("console", &out)?;
    if fleet.is_empty() {
        bail!("the fleet console bench printed no BENCH-ROW line");
    }
    rows.extend(fleet);
    Ok(rows)
}

/// Catch-up rate to the central store: events written while PostgreSQL is down are
/// shipped when it returns; the time until the central copy holds them all gives events/s.
/// One outage per round (at most three: each is 5,000 connections and a restart).
fn measure_central(bin: &Path, config: &Path, o: &Options) -> Result<Vec<Row>> {
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
    let rounds = o.rounds.min(3);
    let outcome = (|| -> Result<Vec<f64>> {
        // The agent creates the table when it first reaches the store: until then, none.
        let count = || -> u64 {
            let exists = pg.psql(
                DB,
                "SELECT to_regclass('portcullis_audit_events') IS NOT NULL",
            );
            if exists.trim() != "t" {
                return 0;
            }
            pg.psql(DB, "SELECT count(*) FROM portcullis_audit_events")
                .trim()
                .parse()
                .unwrap_or(0)
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while count() == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
        let mut rates = Vec::new();
        for round in 1..=rounds {
            step(&format!(
                "central store, round {round}/{rounds}: 5,000 connections (10,000 events) while PostgreSQL is down, then catch-up"
            ));
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
            if now < last {
                bail!("the central store holds {now} of {last} events after 300 s");
            }
            let rate = now.saturating_sub(before) as f64 / secs;
            println!(
                "central catch-up: {} events in {secs:.2} s = {rate:.0} events/s (backoff delay included)",
                now.saturating_sub(before)
            );
            rates.push(rate);
        }
        Ok(rates)
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
    let rates = outcome?;
    Ok(vec![Row::new(
        "audit",
        "audit.central_catchup",
        "central store catch-up after an outage (backoff included)",
        med(&rates),
        "events/s",
        rates.len(),
    )])
}

/// Every proxied connection waits for its `connection.opened` event to be on disk: the
/// latency it adds shows in connection setup, measured here against the direct path in
/// interleaved rounds.
fn measure_gated(bin: &Path, config: &Path, o: &Options) -> Result<Vec<Row>> {
    let unprotected: SocketAddr = DIRECT.parse()?;
    let protected: SocketAddr = PROTECTED.parse()?;
    let mut agent = start_agent(bin, config)?;
    let count = o.per_round(3_000, 200);
    let outcome = (|| -> Result<Vec<Row>> {
        step(&format!(
            "connection setup with one round trip: through the proxy (audited) and direct, {} interleaved rounds of {count}",
            o.rounds
        ));
        let (mut p50, mut p99, mut d50, mut d99, mut rate) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for round in 0..o.rounds {
            let (p, d) = interleaved(
                round,
                || setup_latency(protected, count, o.limit()),
                || setup_latency(unprotected, count, o.limit()),
            )?;
            p50.push(p.0);
            p99.push(p.1);
            rate.push(p.2);
            d50.push(d.0);
            d99.push(d.1);
        }
        let n = o.rounds;
        Ok(vec![
            Row::new(
                "audit",
                "audit.setup_p50",
                "connection setup p50 (opened event durable first)",
                med(&p50),
                "µs",
                n,
            )
            .against(med(&d50), "proxy / direct"),
            Row::new(
                "audit",
                "audit.setup_p99",
                "connection setup p99 (opened event durable first)",
                med(&p99),
                "µs",
                n,
            )
            .against(med(&d99), "proxy / direct"),
            Row::new(
                "audit",
                "audit.events_sustained",
                "audited events sustained, one client (2 per connection)",
                med(&rate) * 2.0,
                "events/s",
                n,
            ),
        ])
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
fn in_bench_cgroup<T>(f: impl FnOnce(&Path, &Path) -> Result<T>) -> Result<T> {
    if !crate::setup::is_root() {
        bail!("the redirect benchmark attaches eBPF programs and needs root");
    }
    let bin = crate::bench_common::agent_bin();
    if !bin.is_file() {
        bail!(
            "{} is missing (`cargo xtask bench` builds it)",
            bin.display()
        );
    }
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

    // The servers outlive one suite (`all` enters the cgroup more than once): bound once.
    static SERVERS: std::sync::OnceLock<std::result::Result<(), String>> =
        std::sync::OnceLock::new();
    SERVERS
        .get_or_init(|| {
            for addr in [PROTECTED, DIRECT] {
                let l = TcpListener::bind(addr).map_err(|e| format!("binding {addr}: {e}"))?;
                std::thread::spawn(move || serve(l));
            }
            let closer = TcpListener::bind(CLOSER).map_err(|e| format!("binding {CLOSER}: {e}"))?;
            std::thread::spawn(move || {
                for s in closer.incoming() {
                    drop(s);
                }
            });
            Ok(())
        })
        .clone()
        .map_err(anyhow::Error::msg)?;
    // From here on this process's connects pass through the bench cgroup's programs.
    std::fs::write(cgroup.join("cgroup.procs"), std::process::id().to_string())
        .context("joining the bench cgroup")?;
    let result = f(&bin, &config);
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

/// The redirect suite. Each round: connect+close to an unprotected port with the programs
/// detached, then with them attached and the agent running, then every proxy/direct pair
/// (round trips, bulk, new connections from one and from 16 clients), then the agent's
/// memory idle and with 1,000 open connections. The agent is restarted every round (its
/// programs stay attached when it stops: fail closed; each round detaches them first), and
/// the figures are the medians of the rounds.
fn measure(bin: &Path, config: &Path, o: &Options) -> Result<Vec<Row>> {
    let unprotected: SocketAddr = DIRECT.parse()?;
    let protected: SocketAddr = PROTECTED.parse()?;
    let closer: SocketAddr = CLOSER.parse()?;
    let connects = o.per_round(20_000, 500);
    let trips = o.per_round(20_000, 500);
    let news = o.per_round(5_000, 200);
    let news16 = o.per_round(1_000, 50);
    let limit = o.limit();
    let bulk_bytes = o.bulk_bytes();
    let mut s = RedirectSamples::default();
    let mut agent_ticks = 0u64;
    for round in 0..o.rounds {
        step(&format!(
            "redirect round {}/{}: connect+close detached and attached ({connects}), round trips ({trips}), \
             bulk ({} MiB), new connections ({news}; 16 x {news16}), memory",
            round + 1,
            o.rounds,
            bulk_bytes >> 20
        ));
        // Detached goes first in even rounds and last in odd ones (after the agent stopped),
        // so neither side of the pair always meets the machine in the same state.
        let detached_first = round.is_multiple_of(2);
        if detached_first {
            detach(bin, config);
            s.detached.push(connect_rate(closer, connects, limit)?);
        }
        let mut agent = start_agent(bin, config)?;
        let pid = agent.id();
        let outcome = (|| -> Result<u64> {
            s.attached.push(connect_rate(closer, connects, limit)?);
            let (p, d) = interleaved(
                round,
                || round_trips(protected, trips, limit),
                || round_trips(unprotected, trips, limit),
            )?;
            s.rr.push(p, d);
            let before = crate::bench_postgres::process_cpu_ticks(pid)?;
            let (p, d) = interleaved(
                round,
                || bulk(protected, bulk_bytes),
                || bulk(unprotected, bulk_bytes),
            )?;
            let ticks = crate::bench_postgres::process_cpu_ticks(pid)?.saturating_sub(before);
            s.bulk.push(p, d);
            let (p, d) = interleaved(
                round,
                || new_connection_rate(protected, news, limit),
                || new_connection_rate(unprotected, news, limit),
            )?;
            s.new1.push(p, d);
            let (p, d) = interleaved(
                round,
                || concurrent_connection_rate(protected, 16, news16, limit),
                || concurrent_connection_rate(unprotected, 16, news16, limit),
            )?;
            s.new16.push(p, d);
            let rss_idle = crate::bench_common::rss_kib(pid)?;
            // Each one proven through the proxy to the server (an echo), so the agent holds all
            // of them when it is measured, not only those it had accepted by then.
            let held: Vec<TcpStream> = (0..HELD)
                .map(|_| -> Result<TcpStream> {
                    let mut s = TcpStream::connect(protected)?;
                    s.write_all(b"Eheld1234")?;
                    let mut back = [0u8; 8];
                    s.read_exact(&mut back)?;
                    Ok(s)
                })
                .collect::<Result<_>>()?;
            std::thread::sleep(Duration::from_millis(500));
            let rss_busy = crate::bench_common::rss_kib(pid)?;
            drop(held);
            s.rss_idle_kib.push(rss_idle as f64);
            s.rss_busy_kib.push(rss_busy as f64);
            Ok(ticks)
        })();
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let _ = agent.wait();
        agent_ticks += outcome?;
        if !detached_first {
            detach(bin, config);
            s.detached.push(connect_rate(closer, connects, limit)?);
        }
        s.print_round(round);
    }
    let n = o.rounds;
    let gib = (bulk_bytes * n) as f64 / f64::from(1u32 << 30);
    let cpu_ms = agent_ticks as f64 * 1000.0 / crate::bench_postgres::clock_ticks_per_second();
    let (idle, busy) = (med(&s.rss_idle_kib), med(&s.rss_busy_kib));
    // VmRSS is in KiB; the goals are in MB and kB.
    let per_connection_kb = (busy - idle).max(0.0) * 1024.0 / f64::from(HELD) / 1000.0;
    Ok(vec![
        Row::new(
            "redirect",
            "redirect.connect_unprotected",
            "connect+close, unprotected port",
            med(&s.attached),
            "per s",
            n,
        )
        .against(med(&s.detached), "attached / detached"),
        s.rr.row("redirect.round_trips", "round trips, 64 B", "per s", n),
        s.bulk.row("redirect.bulk", "bulk throughput", "MiB/s", n),
        Row::new(
            "redirect",
            "redirect.cpu_per_gib",
            "agent CPU per GiB forwarded",
            cpu_ms / gib.max(f64::MIN_POSITIVE),
            "ms",
            n,
        ),
        s.new1.row(
            "redirect.new_connections",
            "new connections with 1 round trip, 1 client",
            "per s",
            n,
        ),
        s.new16.row(
            "redirect.new_connections_16",
            "new connections with 1 round trip, 16 clients",
            "per s",
            n,
        ),
        Row::new(
            "redirect",
            "redirect.rss_idle",
            "agent RSS, idle",
            idle * 1024.0 / 1e6,
            "MB",
            n,
        ),
        Row::new(
            "redirect",
            "redirect.rss_held",
            "agent RSS, 1,000 open tcp connections",
            busy * 1024.0 / 1e6,
            "MB",
            n,
        )
        .against(idle * 1024.0 / 1e6, "1,000 open / idle"),
        Row::new(
            "redirect",
            "redirect.rss_per_connection",
            "agent RSS per open tcp connection",
            per_connection_kb,
            "kB",
            n,
        ),
    ])
}

/// Connections held open for the memory figure.
const HELD: u32 = 1000;

/// One measure's samples on both paths, a pair per round.
#[derive(Default)]
struct Pair {
    proxy: Vec<f64>,
    direct: Vec<f64>,
}

impl Pair {
    fn push(&mut self, proxy: f64, direct: f64) {
        self.proxy.push(proxy);
        self.direct.push(direct);
    }

    fn row(&self, key: &str, name: &str, unit: &str, rounds: usize) -> Row {
        Row::new("redirect", key, name, med(&self.proxy), unit, rounds)
            .against(med(&self.direct), "proxy / direct")
    }
}

#[derive(Default)]
struct RedirectSamples {
    detached: Vec<f64>,
    attached: Vec<f64>,
    rr: Pair,
    bulk: Pair,
    new1: Pair,
    new16: Pair,
    rss_idle_kib: Vec<f64>,
    rss_busy_kib: Vec<f64>,
}

impl RedirectSamples {
    /// Each round's figures as they come: the spread behind the medians.
    fn print_round(&self, round: usize) {
        let at = |v: &[f64]| v.get(round).copied().unwrap_or(0.0);
        let pair = |p: &Pair| format!("{:.0}/{:.0}", at(&p.proxy), at(&p.direct));
        println!(
            "  round {}: connect attached/detached {:.0}/{:.0} per s, round trips {} per s, \
             bulk {} MiB/s, new {} per s, new x16 {} per s, RSS idle/held {:.0}/{:.0} KiB",
            round + 1,
            at(&self.attached),
            at(&self.detached),
            pair(&self.rr),
            pair(&self.bulk),
            pair(&self.new1),
            pair(&self.new16),
            at(&self.rss_idle_kib),
            at(&self.rss_busy_kib),
        );
    }
}

/// Programs a stopped agent left attached (fail closed) are detached, so the next connect
/// meets none.
fn detach(bin: &Path, config: &Path) {
    let _ = Command::new(bin)
        .args(["agent", "--detach", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .status();
}

/// Only the bulk rounds of `redirect`, for work on the forwarding path.
fn measure_bulk(bin: &Path, config: &Path, o: &Options) -> Result<Vec<Row>> {
    let mut agent = start_agent(bin, config)?;
    let bulk = bulk_rounds(
        agent.id(),
        PROTECTED.parse()?,
        DIRECT.parse()?,
        o.rounds,
        o.bulk_bytes(),
    );
    let _ = Command::new("kill")
        .args(["-TERM", &agent.id().to_string()])
        .status();
    let _ = agent.wait();
    let bulk = bulk?;
    Ok(vec![
        Row::new(
            "redirect",
            "redirect.bulk",
            "bulk throughput",
            bulk.proxy,
            "MiB/s",
            o.rounds,
        )
        .against(bulk.direct, "proxy / direct"),
        Row::new(
            "redirect",
            "redirect.cpu_per_gib",
            "agent CPU per GiB forwarded",
            bulk.agent_ms_per_gib,
            "ms",
            o.rounds,
        ),
    ])
}

/// Only the 16-client new-connection rounds of `redirect`, with the agent's CPU per
/// connection, for work on the admission path.
fn measure_connects(bin: &Path, config: &Path, o: &Options) -> Result<Vec<Row>> {
    let mut agent = start_agent(bin, config)?;
    let pid = agent.id();
    let each = o.per_round(1_000, 50);
    let measured = (|| -> Result<(Pair, f64)> {
        let mut pair = Pair::default();
        let (mut ticks, mut made) = (0u64, 0.0);
        for round in 0..o.rounds {
            let (p, d) = interleaved(
                round,
                || {
                    let before = crate::bench_postgres::process_cpu_ticks(pid)?;
                    let started = Instant::now();
                    let rate = concurrent_connection_rate(PROTECTED.parse()?, 16, each, o.limit())?;
                    made += rate * started.elapsed().as_secs_f64();
                    ticks += crate::bench_postgres::process_cpu_ticks(pid)?.saturating_sub(before);
                    Ok(rate)
                },
                || concurrent_connection_rate(DIRECT.parse()?, 16, each, o.limit()),
            )?;
            println!("  round {}: new x16 {p:.0}/{d:.0} per s", round + 1);
            pair.push(p, d);
        }
        let cpu_us = ticks as f64 * 1e6 / crate::bench_postgres::clock_ticks_per_second();
        Ok((pair, cpu_us / made.max(1.0)))
    })();
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = agent.wait();
    let (pair, cpu_per_connection) = measured?;
    Ok(vec![
        pair.row(
            "redirect.new_connections_16",
            "new connections with 1 round trip, 16 clients",
            "per s",
            o.rounds,
        ),
        Row::new(
            "redirect",
            "redirect.cpu_per_connection",
            "agent CPU per new connection, 16 clients",
            cpu_per_connection,
            "µs",
            o.rounds,
        ),
    ])
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

/// Bytes of one bulk transfer (a quarter of it with `--quick`).
const BULK_BYTES: usize = 256 << 20;

struct Bulk {
    /// Median MiB/s of the rounds through the proxy, and direct.
    proxy: f64,
    direct: f64,
    /// The agent's CPU time (user + system, all threads) per GiB moved through it.
    agent_ms_per_gib: f64,
}

/// Rounds of the bulk transfer, interleaved (proxy, direct, direct, proxy, …): one-shot
/// figures on these machines swing by a third.
fn bulk_rounds(
    agent: u32,
    protected: SocketAddr,
    unprotected: SocketAddr,
    rounds: usize,
    bytes: usize,
) -> Result<Bulk> {
    use crate::bench_postgres::{clock_ticks_per_second, process_cpu_ticks};
    step(&format!(
        "bulk transfer ({} MiB), through the proxy and direct, {rounds} interleaved rounds",
        bytes >> 20
    ));
    let (mut proxy, mut direct, mut ticks) = (Vec::new(), Vec::new(), 0u64);
    for round in 0..rounds {
        let (p, d) = interleaved(
            round,
            || {
                let before = process_cpu_ticks(agent)?;
                let rate = bulk(protected, bytes)?;
                Ok((rate, process_cpu_ticks(agent)?.saturating_sub(before)))
            },
            || Ok((bulk(unprotected, bytes)?, 0)),
        )?;
        ticks += p.1;
        proxy.push(p.0);
        direct.push(d.0);
    }
    let gib = (bytes * rounds) as f64 / f64::from(1u32 << 30);
    let ms = ticks as f64 * 1000.0 / clock_ticks_per_second();
    Ok(Bulk {
        proxy: med(&proxy),
        direct: med(&direct),
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
