//! `cargo xtask fuzz [--seconds N]`: every cargo-fuzz target of the project, built with
//! nightly and libFuzzer's coverage instrumentation (what `cargo fuzz build` does, without
//! needing cargo-fuzz installed), each run for N seconds from a fixed seed and an empty
//! corpus. `cargo xtask test` runs it briefly, so the targets build and run in CI; longer runs
//! are for finding bugs (`--seconds 600`, or `cargo +nightly fuzz run <target>` in the
//! crate's `fuzz/` directory).

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{root, run, step};

/// The fuzz crates and their targets.
const TARGETS: &[(&str, &[&str])] = &[
    (
        "pgwire/fuzz",
        &["frontend", "backend", "startup", "copy_binary"],
    ),
    ("audit-store/fuzz", &["segment_reader"]),
    ("sql/fuzz", &["classify"]),
    (
        "terminal/fuzz",
        &[
            "stream_mask",
            "guarded_line",
            "exec_classify",
            "sftp_packets",
            "screen",
        ],
    ),
];

/// The instrumentation `cargo fuzz build` passes (libFuzzer's inline 8-bit counters with
/// comparison tracing), debug assertions and overflow checks on, `cfg(fuzzing)` set.
const RUSTFLAGS: &str = "-Cpasses=sancov-module \
    -Cllvm-args=-sanitizer-coverage-level=3 \
    -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
    -Cllvm-args=-sanitizer-coverage-pc-table \
    -Cllvm-args=-sanitizer-coverage-trace-compares \
    --cfg fuzzing -Cdebug-assertions -Coverflow-checks";

/// The host triple: naming it keeps the instrumentation off build scripts.
const TRIPLE: &str = "x86_64-unknown-linux-gnu";

pub fn parse_seconds(args: &[String]) -> Result<u64> {
    let mut seconds = 60;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--seconds" => {
                seconds = it
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|v| *v > 0)
                    .context("--seconds needs a positive number")?;
            }
            other => bail!("unknown option `{other}` for fuzz (--seconds N)"),
        }
    }
    Ok(seconds)
}

/// How the targets are compiled.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// Optimised like `cargo fuzz build`: for runs long enough to find something.
    Full,
    /// At opt-level 1, in their own target directory: `cargo xtask test` runs each target for
    /// seconds to prove it builds and runs, and a cold CI run should not spend minutes
    /// optimising the policy engine for that.
    Smoke,
}

pub fn run_all(seconds: u64, build: Build) -> Result<()> {
    let (target_dir, opt_level) = match build {
        Build::Full => (root().join("target/fuzz"), "3"),
        Build::Smoke => (root().join("target/fuzz-smoke"), "1"),
    };
    for (dir, targets) in TARGETS {
        step(&format!(
            "fuzz: building {dir} (nightly, libFuzzer coverage, opt-level {opt_level})"
        ));
        run(Command::new("cargo")
            .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", opt_level)
            .args([
                "+nightly",
                "build",
                "--release",
                "--locked",
                "--target",
                TRIPLE,
            ])
            .args(targets.iter().flat_map(|t| ["--bin", t]))
            .current_dir(root().join(dir))
            .env("CARGO_TARGET_DIR", &target_dir)
            .env("RUSTFLAGS", RUSTFLAGS)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTC")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTC_WORKSPACE_WRAPPER")
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO"))?;
        for target in *targets {
            fuzz_one(
                &target_dir,
                &root().join(dir).join("seeds"),
                target,
                seconds,
            )?;
        }
    }
    Ok(())
}

/// `seeds/<target>/` in the fuzz crate, if there is one, starts the corpus (a few valid
/// inputs the mutations work from; the classifier's grammar is too large to find by chance).
fn fuzz_one(target_dir: &Path, seeds: &Path, target: &str, seconds: u64) -> Result<()> {
    let bin = target_dir.join(TRIPLE).join("release").join(target);
    // A fresh corpus each time: what one run finds does not make the next differ.
    let corpus = target_dir.join("corpus").join(target);
    let _ = std::fs::remove_dir_all(&corpus);
    std::fs::create_dir_all(&corpus)?;
    if let Ok(entries) = std::fs::read_dir(seeds.join(target)) {
        for entry in entries {
            let entry = entry?;
            std::fs::copy(entry.path(), corpus.join(entry.file_name()))?;
        }
    }
    let artifacts = target_dir.join("artifacts").join(target);
    std::fs::create_dir_all(&artifacts)?;
    println!("  {target}: {seconds} s");
    let out = Command::new(&bin)
        .arg(format!("-max_total_time={seconds}"))
        .arg("-seed=1")
        .arg("-rss_limit_mb=2048")
        .arg("-print_final_stats=1")
        .arg(format!("-artifact_prefix={}/", artifacts.display()))
        .arg(&corpus)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    let log = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "fuzz target `{target}` failed ({}); the input is in {}:\n{}",
            out.status,
            artifacts.display(),
            tail.join("\n")
        );
    }
    let runs = log
        .lines()
        .find_map(|l| l.strip_prefix("stat::number_of_executed_units:"))
        .map(str::trim)
        .unwrap_or("?");
    println!("  {target}: {runs} inputs, no failure");
    Ok(())
}
