//! What the benches share: starting the agent under test, reading its memory, quoting its log.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Starts `bin agent --config config` inside the cgroup it protects (like a unit's cgroup in
/// production: its own upstream connects meet the hooks and must be exempted), logging to
/// `dir/agent.log`; returns once `status` answers on `dir/control.sock` and `ready` holds.
/// Leftovers of an interrupted run (programs still attached, pins in `pin_dir`) are detached
/// first so they never enforce.
pub fn spawn_agent_in_cgroup(
    bin: &Path,
    config: &Path,
    dir: &Path,
    cgroup: &Path,
    pin_dir: &str,
    ready: impl Fn() -> bool,
) -> Result<Child> {
    let _ = Command::new(bin)
        .args(["agent", "--detach", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    let _ = std::fs::remove_dir_all(pin_dir);
    let log = std::fs::File::create(dir.join("agent.log"))?;
    let mut cmd = Command::new(bin);
    cmd.args(["agent", "--config"])
        .arg(config)
        .env("PORTCULLIS_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    portcullis_e2e::exec_in_cgroup_as(&mut cmd, Some(cgroup), None);
    let mut child = cmd.spawn().context("starting the agent")?;
    let socket = dir.join("control.sock");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answers = Command::new(bin)
            .args(["status", "--json", "--socket"])
            .arg(&socket)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if answers && ready() {
            return Ok(child);
        }
        let failure = if let Some(status) = child.try_wait()? {
            format!("the agent exited with {status}")
        } else if Instant::now() > deadline {
            "the agent did not answer `status` in 30 s".to_string()
        } else {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let _ = child.kill();
        let _ = child.wait();
        bail!("{failure}: {}", log_tail(&dir.join("agent.log")));
    }
}

/// The last lines of a log, for an error message.
pub fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines
        .get(lines.len().saturating_sub(5)..)
        .unwrap_or_default();
    if tail.is_empty() {
        format!("(nothing in {})", path.display())
    } else {
        format!("{} (see {})", tail.join(" / "), path.display())
    }
}

pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")
}

/// The agent `cargo xtask bench` just built: `PORTCULLIS_BIN`, else release/portcullis in
/// `CARGO_TARGET_DIR` (or `target/`).
pub(crate) fn agent_bin() -> std::path::PathBuf {
    if let Some(bin) = std::env::var_os("PORTCULLIS_BIN") {
        return std::path::PathBuf::from(bin);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                crate::root().join(t)
            }
        })
        .unwrap_or_else(|| crate::root().join("target"));
    target.join("release/portcullis")
}
