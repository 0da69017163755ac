//! `cargo xtask …`: everything a fresh machine needs, from installing the toolchain
//! parts to running the end-to-end suite. Every step is idempotent and says what it does.

mod bench;
mod bench_common;
mod bench_postgres;
mod bench_ssh;
mod bench_table;
mod demo;
mod fuzz;
mod package;
mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: cargo xtask <command>

commands:
  setup        install what the build and the tests need (Debian packages, nightly rust-src,
               bpf-linker and cargo-deny in .tools/), idempotently
  build-ebpf   build the kernel programs (nightly, bpfel-unknown-none)
  build        build-ebpf, then the agent (release)
  test         setup, build, fmt check, clippy (warnings denied), cargo deny (licences, bans,
               sources), every fuzz target briefly, both packages (revisions 1 and 2), unit,
               end-to-end and package tests
  fuzz [--seconds N]
               build every cargo-fuzz target (nightly, libFuzzer coverage) and run each for
               N seconds (default 60) from a fixed seed
  package [--revision N] [--no-build] [--fast] [--debug] [--out DIR]
               build the .deb and the .rpm (cargo-deb and cargo-generate-rpm in .tools/) with
               the release binary, man pages and completions, into target/packages; --revision
               sets the package revision (default 1), --no-build packages the binary already
               built, --fast compresses faster into larger files, --debug packages the debug
               build (`test` builds --fast --debug packages: never ship those)
  demo [--no-build]
               build everything and show the redirect, the proxy, `portcullis status`, psql
               through the agent and ssh to a local sshd with its shell replayed; --no-build
               runs the agent already built (PORTCULLIS_BIN, else target/release/portcullis)
  bench [redirect|tcp-bulk|tcp-connect|policy|audit|review|console|postgres|ssh|all] [--no-build] [--quick]
        [--seconds N] [--rounds N] [--case TEXT] [--perf] [--sessions N]
               measure against the direct path (and pgbouncer for postgres) and print one
               table (suite, measure, value, baseline, ratio, goal, met?), every figure a
               median of interleaved rounds; writes target/bench/<suite>.json, .svg and .md
               (`all`: bench.json, bench.svg, bench.md, with the machine's facts); `all` runs
               redirect, policy, audit, postgres (masking included), ssh, review and console, and
               takes --quick, --rounds and --seconds; --no-build measures the binaries
               already built. redirect, tcp-bulk, tcp-connect, audit: --rounds N (default 5, --quick:
               3 with fewer connections and 64 MiB bulk transfers). postgres: --quick and
               --seconds set pgbench -T (3 s, default 10), --rounds (default 3), --case runs
               only the cases whose name contains TEXT, --perf records `perf record -a -g`
               during each run (Debian's linux-perf); --case idle10k runs only the idle
               TLS sessions measure (--sessions N held, default 10,000). ssh: --quick moves
               256 MiB instead of 1 GiB in one round (default 3) with 20 latency samples instead of 50, --perf
               records the agent during its first `cat`. review times `review report` over a
               million generated events (one run); console times the sessions page (and
               `sessions list`) over a million events: p50 and p99 of 41 runs";

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(cmd) = args.first() else {
        println!("{USAGE}");
        return Ok(());
    };
    let rest = args.get(1..).unwrap_or_default();
    match cmd.as_str() {
        "setup" => setup::all(),
        "build-ebpf" => {
            setup::ebpf_toolchain()?;
            build_ebpf()
        }
        "build" => {
            setup::ebpf_toolchain()?;
            build_ebpf()?;
            cargo(&["build", "--release", "-p", "portcullis-agent"])
        }
        "test" => test(),
        "package" => package::run_package(&package::Options::parse(rest)?),
        "fuzz" => fuzz::run_all(fuzz::parse_seconds(rest)?, fuzz::Build::Full),
        "demo" => {
            if rest.iter().any(|a| a == "--no-build") {
                return demo::run(&bench_common::agent_bin());
            }
            setup::all()?;
            build_ebpf()?;
            cargo(&["build", "--release", "-p", "portcullis-agent"])?;
            demo::run(&root().join("target/release/portcullis"))
        }
        "bench" => {
            let no_build = rest.iter().any(|a| a == "--no-build");
            let args: Vec<String> = rest
                .iter()
                .filter(|a| *a != "--no-build")
                .cloned()
                .collect();
            if !no_build {
                setup::all()?;
                build_ebpf()?;
                cargo(&[
                    "build",
                    "--release",
                    "-p",
                    "portcullis-agent",
                    "-p",
                    "portcullis-e2e",
                ])?;
            }
            bench::run(&args)
        }
        // Run by `bench postgres` inside the agent's cgroup, not by hand.
        "idle-client" => portcullis_e2e::idle_tls::run(rest),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command `{other}`\n\n{USAGE}"),
    }
}

/// How long `cargo xtask test` runs each fuzz target.
const FUZZ_SMOKE_SECONDS: u64 = 8;

fn test() -> Result<()> {
    setup::all()?;
    build_ebpf()?;
    step("formatting (cargo fmt --check)");
    cargo(&["fmt", "--all", "--check"])?;
    run(Command::new("rustfmt")
        .args(["--check", "--edition", "2021"])
        .arg(root().join("agent-ebpf/src/main.rs")))?;
    step("clippy, warnings denied");
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    // The advisories check is off: its database cannot be fetched on these machines.
    step("dependency licences, bans and sources (cargo deny, deny.toml)");
    run(Command::new(setup::cargo_deny_bin())
        .args(["--all-features", "check", "licenses", "bans", "sources"])
        .current_dir(root()))?;
    // Every fuzz target builds and runs a little, from a fixed seed.
    fuzz::run_all(FUZZ_SMOKE_SECONDS, fuzz::Build::Smoke)?;
    step("building the agent and the test clients");
    cargo(&["build", "-p", "portcullis-agent", "-p", "portcullis-e2e"])?;
    // The package suite (tests/packages.rs) installs these: revision 2 is the upgrade. They
    // hold the debug build just made: a release build would double a cold run's compile time.
    for revision in ["1", "2"] {
        package::run_package(&package::Options::parse(&[
            "--fast".into(),
            "--debug".into(),
            "--no-build".into(),
            "--revision".into(),
            revision.into(),
        ])?)?;
    }
    step("unit, integration and end-to-end tests");
    let bin = root().join("target/debug/portcullis");
    let mut c = cargo_cmd(&["test", "--workspace"]);
    // The end-to-end suite must run here, never skip: it fails if it cannot.
    c.env("PORTCULLIS_E2E", "required")
        .env("PORTCULLIS_BIN", &bin);
    run(&mut c)
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

pub fn step(what: &str) {
    println!("\n==> {what}");
}

pub fn cargo_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.args(args).current_dir(root());
    c
}

pub fn cargo(args: &[&str]) -> Result<()> {
    run(&mut cargo_cmd(args))
}

pub fn run(c: &mut Command) -> Result<()> {
    let status = c.status().with_context(|| format!("running {c:?}"))?;
    if !status.success() {
        bail!("{c:?} failed with {status}");
    }
    Ok(())
}

/// Builds agent-ebpf with nightly for bpfel-unknown-none, with BTF (needed by the
/// BTF-defined maps), into target/ebpf; agent/build.rs embeds the result.
fn build_ebpf() -> Result<()> {
    step("building the kernel programs (nightly, bpfel-unknown-none)");
    let root = root();
    let linker_dir = setup::bpf_linker_bin_dir();
    let path = match std::env::var_os("PATH") {
        Some(p) => {
            let mut dirs = vec![linker_dir];
            dirs.extend(std::env::split_paths(&p));
            std::env::join_paths(dirs).context("PATH")?
        }
        None => linker_dir.into_os_string(),
    };
    let flags = [
        "--cfg=bpf_target_arch=\"x86_64\"",
        "-Cdebuginfo=2",
        "-Clink-arg=--btf",
    ]
    .join("\u{1f}");
    let mut c = Command::new("cargo");
    c.args([
        "+nightly",
        "build",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
    ])
    .current_dir(root.join("agent-ebpf"))
    .env("PATH", path)
    .env("CARGO_TARGET_DIR", root.join("target/ebpf"))
    .env("CARGO_ENCODED_RUSTFLAGS", flags)
    .env_remove("RUSTFLAGS")
    .env_remove("RUSTC")
    .env_remove("RUSTC_WRAPPER")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .env_remove("RUSTUP_TOOLCHAIN")
    .env_remove("CARGO");
    run(&mut c)
}

/// The cgroup2 mount point (hybrid systems mount it below /sys/fs/cgroup).
pub fn cgroup2_root() -> Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            if right.split_whitespace().next()? != "cgroup2" {
                return None;
            }
            left.split_whitespace().nth(4).map(PathBuf::from)
        })
        .context("no cgroup2 hierarchy is mounted")
}
