//! The shipped unit, `systemd/portcullis.service`, as systemd reads it: `systemd-analyze
//! verify` accepts it and `systemd-analyze security` scores it no worse than the exposure
//! docs/install.md records and justifies. No root and no running systemd needed.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test: a failure is a test failure"
)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The score recorded in docs/install.md ("The systemd unit"); lower it when the unit
/// gets tighter, never raise it without a reason there.
const MAX_EXPOSURE: f64 = 2.2;

/// Exactly these, each one justified in the unit.
const CAPABILITIES: [&str; 4] = [
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_NET_ADMIN",
    "CAP_NET_BIND_SERVICE",
];

fn unit_text() -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../systemd/portcullis.service");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// systemd-analyze, or None when the test may skip (outside `cargo xtask test`/CI).
fn systemd_analyze() -> Option<PathBuf> {
    let required = std::env::var_os("PORTCULLIS_E2E").is_some() || std::env::var_os("CI").is_some();
    let found = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file());
    match found {
        Some(p) => Some(p),
        None if required => {
            panic!("systemd-analyze is missing; `cargo xtask setup` installs Debian's systemd")
        }
        None => {
            eprintln!("skipping: systemd-analyze is missing (Debian package systemd)");
            None
        }
    }
}

/// A copy of the unit whose ExecStart names a binary that exists here (verify checks it).
fn unit_copy(dir: &Path) -> PathBuf {
    let bin = portcullis_e2e::agent_bin();
    assert!(
        bin.is_file(),
        "{} is missing: build it first (cargo build -p portcullis-agent)",
        bin.display()
    );
    let text = unit_text();
    let exec = "ExecStart=/usr/bin/portcullis ";
    assert_eq!(
        text.matches(exec).count(),
        1,
        "one ExecStart of /usr/bin/portcullis"
    );
    let text = text.replace(exec, &format!("ExecStart={} ", bin.display()));
    let path = dir.join("portcullis.service");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn systemd_analyze_verify_accepts_the_unit() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&unit)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Unknown or misspelt settings are warnings, not failures: none is accepted.
    assert!(
        out.status.success() && stderr.trim().is_empty(),
        "systemd-analyze verify: {}\n{stderr}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn the_units_security_exposure_is_at_most_the_recorded_score() {
    let Some(analyze) = systemd_analyze() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    let out = Command::new(analyze)
        .args(["security", "--offline=true", "--no-pager"])
        .arg(&unit)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let score: f64 = stdout
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for portcullis.service:"))
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in systemd-analyze security's output ({}):\n{stdout}{}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE} (docs/install.md):\n{stdout}"
    );
}

#[test]
fn the_unit_grants_only_the_capabilities_the_agent_needs() {
    let text = unit_text();
    let settings = |key: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.strip_prefix(key))
            .map(str::to_string)
            .collect()
    };
    let bounding = settings("CapabilityBoundingSet=");
    assert_eq!(bounding.len(), 1, "one CapabilityBoundingSet line");
    let mut granted: Vec<&str> = bounding[0].split_whitespace().collect();
    granted.sort_unstable();
    let mut wanted = CAPABILITIES.to_vec();
    wanted.sort_unstable();
    assert_eq!(granted, wanted);
    // The agent runs as root, which receives the bounding set at exec.
    assert!(settings("AmbientCapabilities=").is_empty());
    assert!(settings("User=").is_empty() && settings("DynamicUser=").is_empty());
    for (key, value) in [
        ("Type=", "notify"),
        ("Restart=", "on-failure"),
        ("ExecReload=", "/bin/kill -HUP $MAINPID"),
        ("NoNewPrivileges=", "yes"),
        ("ProtectSystem=", "strict"),
        ("UMask=", "0077"),
    ] {
        assert_eq!(settings(key), [value], "{key}");
    }
}
