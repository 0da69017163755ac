//! `cargo xtask package`: the .deb (cargo-deb) and the .rpm (cargo-generate-rpm) of the agent,
//! with the tools installed at pinned versions into `.tools/`, the release binary (kernel
//! programs embedded), and the man pages and completions generated from the binary's own
//! clap definitions. The packaging metadata lives in agent/Cargo.toml, the maintainer scripts
//! in packaging/debian and packaging/rpm.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{root, run, step};

const CARGO_DEB_VERSION: &str = "3.8.0";
const CARGO_GENERATE_RPM_VERSION: &str = "0.21.1";

/// Where the packages are written unless `--out` says otherwise; the package tests read them
/// here.
pub fn default_out_dir() -> PathBuf {
    root().join("target/packages")
}

pub struct Options {
    /// The package revision (Debian revision, RPM release): the upgrade test builds a second
    /// one from the same binary.
    pub revision: u32,
    /// Package the release binary already built.
    pub no_build: bool,
    /// Faster compression, larger files (xz's fast preset, gzip for the rpm): the same
    /// contents, for packages that are only tested.
    pub fast: bool,
    /// Package the debug build instead of the release build: for the package tests, which
    /// check the packaging and not the optimiser, so a cold `cargo xtask test` builds the
    /// agent once, not twice. Never for packages anyone installs.
    pub debug: bool,
    pub out: PathBuf,
}

impl Options {
    pub fn parse(args: &[String]) -> Result<Self> {
        let mut options = Options {
            revision: 1,
            no_build: false,
            fast: false,
            debug: false,
            out: default_out_dir(),
        };
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match arg.as_str() {
                "--no-build" => options.no_build = true,
                "--fast" => options.fast = true,
                "--debug" => options.debug = true,
                "--revision" => {
                    let value = args.next().context("--revision needs a number")?;
                    options.revision =
                        value.parse().ok().filter(|r| *r > 0).with_context(|| {
                            format!("--revision {value}: not a positive number")
                        })?;
                }
                "--out" => {
                    options.out = PathBuf::from(args.next().context("--out needs a directory")?);
                }
                other => bail!("package: unknown argument `{other}`"),
            }
        }
        Ok(options)
    }
}

pub fn run_package(options: &Options) -> Result<()> {
    let cargo_deb = cargo_tool("cargo-deb", CARGO_DEB_VERSION)?;
    let cargo_generate_rpm = cargo_tool("cargo-generate-rpm", CARGO_GENERATE_RPM_VERSION)?;
    let profile = if options.debug { "debug" } else { "release" };
    if !options.no_build {
        crate::setup::ebpf_toolchain()?;
        crate::build_ebpf()?;
        step(&format!("building the agent ({profile})"));
        let mut args = vec!["build", "-p", "portcullis-agent"];
        if !options.debug {
            args.push("--release");
        }
        crate::cargo(&args)?;
    }
    let bin = root().join("target").join(profile).join("portcullis");
    if !bin.is_file() {
        bail!(
            "{} is missing: run `cargo xtask package` without --no-build",
            bin.display()
        );
    }
    generate_docs(&bin)?;
    std::fs::create_dir_all(&options.out)
        .with_context(|| format!("creating {}", options.out.display()))?;
    let revision = options.revision.to_string();

    step(&format!(
        "building the .deb (cargo-deb {CARGO_DEB_VERSION}, revision {revision})"
    ));
    let mut deb = Command::new(&cargo_deb);
    deb.args(["deb", "-p", "portcullis-agent", "--no-build"]);
    if options.fast {
        deb.arg("--fast");
    }
    run(deb
        .args(["--deb-revision", &revision])
        .arg("--output")
        .arg(&options.out)
        .current_dir(root()))?;

    step(&format!(
        "building the .rpm (cargo-generate-rpm {CARGO_GENERATE_RPM_VERSION}, release {revision})"
    ));
    let mut rpm = Command::new(&cargo_generate_rpm);
    rpm.args(["generate-rpm", "-p", "agent"]);
    if options.fast {
        rpm.args(["--payload-compress", "gzip"]);
    }
    run(rpm
        .arg(format!("--set-metadata=release = \"{revision}\""))
        .arg("--output")
        .arg(&options.out)
        .current_dir(root()))?;
    println!("packages in {}", options.out.display());
    Ok(())
}

/// The stripped binary, its man pages (gzipped, as Debian policy and lintian want them) and
/// completions, into target/packages/generated (the assets in agent/Cargo.toml).
fn generate_docs(bin: &Path) -> Result<()> {
    let dir = root().join("target/packages/generated");
    step(&format!(
        "stripping the binary, generating man pages and completions into {}",
        dir.display()
    ));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))?;
    }
    std::fs::create_dir_all(dir.join("bin"))?;
    // The release profile keeps line tables (200 MB); the packages ship the code alone. The
    // kernel programs are data inside it and stay.
    run(Command::new("strip")
        .args(["--strip-all", "-o"])
        .arg(dir.join("bin/portcullis"))
        .arg(bin))?;
    run(Command::new(bin).arg("generate-docs").arg(&dir))?;
    let man = dir.join("man");
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man)
        .with_context(|| format!("reading {}", man.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "1"))
        .collect();
    pages.sort();
    if pages.is_empty() {
        bail!(
            "`portcullis generate-docs` wrote no man page into {}",
            man.display()
        );
    }
    // -n: no name or time stamp inside, so the same page gives the same bytes.
    run(Command::new("gzip").args(["-9", "-n", "-f"]).args(&pages))?;
    // Debian's name for the upstream changelog, compressed as its policy wants.
    let changelog = dir.join("changelog");
    std::fs::copy(root().join("CHANGELOG.md"), &changelog).context("copying CHANGELOG.md")?;
    run(Command::new("gzip")
        .args(["-9", "-n", "-f"])
        .arg(&changelog))
}

/// `.tools/<name>/bin/<name>` at `version`, built from crates.io with its own lock file;
/// rebuilt only when missing or another version.
fn cargo_tool(name: &str, version: &str) -> Result<PathBuf> {
    let dir = root().join(".tools").join(name);
    let bin = dir.join("bin").join(name);
    let installed = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    // `cargo-deb 3.8.0`, `cargo-generate-rpm 0.21.1`
    if installed
        .as_deref()
        .is_some_and(|v| v.split_whitespace().any(|w| w == version))
    {
        println!("==> {name} {version}: present in {}", dir.display());
        return Ok(bin);
    }
    step(&format!(
        "building {name} {version} into {} (a few minutes, once)",
        dir.display()
    ));
    run(crate::setup::quick_tool_profile(&mut Command::new("cargo"))
        .args(["install", "--locked", "--force"])
        .arg(format!("{name}@{version}"))
        .arg("--root")
        .arg(&dir)
        .current_dir(root())
        .env_remove("CARGO_TARGET_DIR")
        .env_remove("RUSTFLAGS"))?;
    Ok(bin)
}
