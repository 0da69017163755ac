//! Installs what the project needs, idempotently: Debian packages, the nightly's
//! rust-src, bpf-linker built against the nightly's own libLLVM in `.tools/`, cargo-deny in
//! `.tools/cargo-deny`, the test OpenID Provider's npm packages, and a Python venv with
//! psycopg in `.tools/venv`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{root, run, step};

/// Debian packages the build, the tests and the demo use.
const PACKAGES: &[&str] = &[
    "iproute2",   // ip netns: the foreign-namespace test
    "curl",       // the demo's unchanged client
    "procps",     // kill/ps for the demo and tests
    "openssl",    // test keys for the OpenID Provider and the syslog TLS receiver
    "bpftool",    // the tests read pinned maps with it while no agent runs
    "postgresql", // a real PostgreSQL (as user postgres) for the central store and proxy tests;
    // its postgresql-15 pulls postgresql-client-15: psql, pg_dump, pg_restore for the tests
    "libclang-dev", // bindgen, for the pg_query crate (the agent parses SQL with PostgreSQL's parser)
    "pgbouncer",    // the PostgreSQL bench's peer: the agent is measured against it
    "python3-venv", // .tools/venv with psycopg, a second real client for the proxy tests
    "tmux",         // the interactive psql test drives a real terminal
    "asciinema",    // plays the SSH session recordings back (terminal/tests/asciinema.rs)
    "systemd",      // systemd-analyze verify/security check the shipped unit (not run as PID 1)
    "mmdebstrap",   // the package tests install the .deb into a Debian chroot it makes
    "lintian",      // ...and lint the .deb
    "rpm",          // ...install the .rpm into a scratch root (rpm --root)
    "rpmlint",      // ...and lint the .rpm
    "openssh-server", // the SSH suite's upstream: Debian's sshd with its own config per test
    "openssh-client", // ...and the unchanged clients it drives: ssh, scp, sftp, ssh-keygen
    "rsync",        // rsync -e ssh through the agent
    "ansible-core", // Ansible ad-hoc ping and copy over SSH through the agent (ControlPersist, pipelining)
    "python3-asyncssh", // an SSH client that reports exit-signal's fields (the SSH suite)
    "chromium",     // headless: the HTML access review (tests/review.rs), the browser driver
    "libnss3-tools", // certutil: the browser driver trusts a test CA in a throwaway NSS database
];

/// psycopg in `.tools/venv`, for the proxy tests' Python client (psycopg[binary] bundles libpq).
const PSYCOPG_VERSION: &str = "3.3.9";

const BPF_LINKER_VERSION: &str = "0.13.0";

/// cargo-deny for `cargo xtask test`'s dependency check (deny.toml); this version builds with
/// the workspace's pinned stable (it needs 1.88).
const CARGO_DENY_VERSION: &str = "0.20.2";

pub fn all() -> Result<()> {
    debian_packages(PACKAGES)?;
    ebpf_toolchain()?;
    cargo_deny()?;
    oidc_provider()?;
    python_venv()
}

/// `.tools/venv` with psycopg[binary] at `PSYCOPG_VERSION`, made with Debian's Python (that
/// is what python3-venv serves); rebuilt only when missing or holding another version.
pub fn python_venv() -> Result<()> {
    let venv = root().join(".tools/venv");
    let python = venv.join("bin/python");
    let installed = |python: &std::path::Path| {
        output(Command::new(python).args([
            "-c",
            "import importlib.metadata as m; print(m.version('psycopg'), m.version('psycopg-binary'))",
        ]))
        .ok()
        .map(|v| v.trim().to_string())
    };
    let wanted = format!("{PSYCOPG_VERSION} {PSYCOPG_VERSION}");
    if installed(&python).as_deref() == Some(wanted.as_str()) {
        println!(
            "==> psycopg {PSYCOPG_VERSION}: present in {}",
            venv.display()
        );
        return Ok(());
    }
    if !python.exists() {
        step(&format!("creating a Python venv in {}", venv.display()));
        run(Command::new("/usr/bin/python3")
            .args(["-m", "venv"])
            .arg(&venv))?;
    }
    step(&format!(
        "installing psycopg[binary]=={PSYCOPG_VERSION} into {} (from PyPI)",
        venv.display()
    ));
    run(Command::new(&python).args([
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--only-binary",
        ":all:",
        &format!("psycopg[binary]=={PSYCOPG_VERSION}"),
    ]))?;
    match installed(&python) {
        Some(v) if v == wanted => Ok(()),
        other => bail!(
            "after pip install, {} has psycopg {other:?}, not {PSYCOPG_VERSION}",
            venv.display()
        ),
    }
}

/// The test OpenID Provider (tests/oidc): `npm ci` from the committed lock, again only
/// when the installed oidc-provider is not the locked version.
pub fn oidc_provider() -> Result<()> {
    let dir = root().join("tests/oidc");
    let lock_path = dir.join("package-lock.json");
    let lock: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&lock_path)
            .with_context(|| format!("reading {}", lock_path.display()))?,
    )
    .with_context(|| format!("parsing {}", lock_path.display()))?;
    let locked = lock
        .pointer("/packages/node_modules~1oidc-provider/version")
        .and_then(serde_json::Value::as_str)
        .with_context(|| format!("{} does not lock oidc-provider", lock_path.display()))?
        .to_string();
    let installed = std::fs::read_to_string(dir.join("node_modules/oidc-provider/package.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|package| package.get("version")?.as_str().map(str::to_string));
    if installed.as_deref() == Some(locked.as_str()) {
        println!(
            "==> oidc-provider {locked}: present in {}",
            dir.join("node_modules").display()
        );
        return Ok(());
    }
    if Command::new("node").arg("--version").output().is_err() {
        bail!("`node` is missing; the test OpenID Provider needs Node.js 20 or later and npm");
    }
    step(&format!(
        "installing oidc-provider {locked} for the test OpenID Provider (npm ci in {})",
        dir.display()
    ));
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(&dir))
}

pub fn ebpf_toolchain() -> Result<()> {
    nightly_rust_src()?;
    bpf_linker()
}

fn output(c: &mut Command) -> Result<String> {
    let out = c.output().with_context(|| format!("running {c:?}"))?;
    if !out.status.success() {
        bail!(
            "{c:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn debian_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            Command::new("dpkg-query")
                .args(["-W", "-f=${db:Status-Abbrev}", p])
                .output()
                .map(|o| !String::from_utf8_lossy(&o.stdout).starts_with("ii"))
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        println!("==> Debian packages: all present ({})", packages.join(", "));
        return Ok(());
    }
    step(&format!(
        "installing Debian packages: {}",
        missing.join(", ")
    ));
    if !is_root() {
        bail!(
            "packages {} are missing and installing them needs root",
            missing.join(", ")
        );
    }
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null()))
}

fn nightly_rust_src() -> Result<()> {
    let toolchains = output(Command::new("rustup").args(["toolchain", "list"]))?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        bail!(
            "no nightly toolchain is installed; the kernel programs need one \
             (`rustup toolchain install nightly --component rust-src`)"
        );
    }
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        println!("==> nightly rust-src: present");
        return Ok(());
    }
    step("installing rust-src for the nightly toolchain");
    run(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

fn tools_dir() -> PathBuf {
    root().join(".tools/bpf-linker")
}

pub fn bpf_linker_bin_dir() -> PathBuf {
    tools_dir().join("bin")
}

/// bpf-linker must use the same LLVM as the nightly rustc; it links against the
/// nightly's own libLLVM. The stamp records what it was built against.
fn bpf_linker() -> Result<()> {
    let version = output(Command::new("rustc").args(["+nightly", "-vV"]))?;
    let llvm_major = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .and_then(|v| v.split('.').next())
        .context("rustc +nightly -vV printed no LLVM version")?
        .to_string();
    let commit = version
        .lines()
        .find_map(|l| l.strip_prefix("commit-hash: "))
        .unwrap_or("unknown")
        .to_string();
    let stamp_text = format!("bpf-linker {BPF_LINKER_VERSION} llvm-{llvm_major} rustc {commit}\n");
    let dir = tools_dir();
    let stamp = dir.join("stamp");
    let bin = bpf_linker_bin_dir().join("bpf-linker");
    if bin.is_file() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(stamp_text.as_str())
    {
        println!(
            "==> bpf-linker {BPF_LINKER_VERSION} (LLVM {llvm_major}): present in {}",
            dir.display()
        );
        return Ok(());
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against the nightly's LLVM {llvm_major} into {} (about a minute)",
        dir.display()
    ));
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let nightly_lib = PathBuf::from(sysroot.trim()).join("lib");
    let libllvm = std::fs::read_dir(&nightly_lib)
        .with_context(|| format!("reading {}", nightly_lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so"))
        })
        .with_context(|| {
            format!(
                "the nightly toolchain ships no libLLVM in {}",
                nightly_lib.display()
            )
        })?;
    let lib_dir = dir.join("lib");
    std::fs::create_dir_all(&lib_dir)?;
    let link = lib_dir.join("libLLVM.so");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&libllvm, &link)
        .with_context(|| format!("linking {}", link.display()))?;
    run(quick_tool_profile(&mut Command::new("cargo"))
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{llvm_major}"),
        ])
        .arg("--root")
        .arg(&dir)
        .env("LLVM_PREFIX", &dir)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO"))?;
    std::fs::write(&stamp, stamp_text)?;
    Ok(())
}

pub fn cargo_deny_bin() -> PathBuf {
    root().join(".tools/cargo-deny/bin/cargo-deny")
}

/// cargo-deny at `CARGO_DENY_VERSION` in `.tools/cargo-deny`, built from crates.io with its
/// own lock file; rebuilt only when missing or another version.
fn cargo_deny() -> Result<()> {
    let dir = root().join(".tools/cargo-deny");
    let bin = cargo_deny_bin();
    let wanted = format!("cargo-deny {CARGO_DENY_VERSION}");
    let installed = output(Command::new(&bin).arg("--version"))
        .ok()
        .map(|v| v.trim().to_string());
    if installed.as_deref() == Some(wanted.as_str()) {
        println!(
            "==> cargo-deny {CARGO_DENY_VERSION}: present in {}",
            dir.display()
        );
        return Ok(());
    }
    step(&format!(
        "building cargo-deny {CARGO_DENY_VERSION} into {} (a minute or two, once)",
        dir.display()
    ));
    run(quick_tool_profile(&mut Command::new("cargo"))
        .args(["install", "--locked", "--force"])
        .arg(format!("cargo-deny@{CARGO_DENY_VERSION}"))
        .arg("--root")
        .arg(&dir)
        .current_dir(root())
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS"))
}

/// The release profile the tools we build from crates.io (bpf-linker, cargo-deny, cargo-deb,
/// cargo-generate-rpm) are compiled with: their own profiles ask for fat LTO, one codegen unit
/// or full debug info, which cost a cold CI run minutes for programs that run for seconds.
/// Settings from the environment take precedence over a package's manifest.
pub fn quick_tool_profile(c: &mut Command) -> &mut Command {
    c.env("CARGO_PROFILE_RELEASE_LTO", "false")
        .env("CARGO_PROFILE_RELEASE_CODEGEN_UNITS", "16")
        .env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "1")
        .env("CARGO_PROFILE_RELEASE_DEBUG", "false")
        .env("CARGO_PROFILE_RELEASE_INCREMENTAL", "false")
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}
