//! The packages `cargo xtask package` builds (target/packages, revisions 1 and 2), as an
//! administrator meets them: lintian and rpmlint find nothing beyond the documented
//! overrides; the .deb installs into a Debian chroot (made by mmdebstrap, cached in
//! .tools/chroot) with the files, owners, modes, conffiles, trust store entry, man pages and
//! completions it promises, keeps an edited config through an upgrade, and leaves nothing
//! behind when purged; the .rpm installs the same files with `rpm --root` and its scriptlets
//! run; and the installed binary, run from the chroot against the real kernel, lets no
//! connection go direct while the package is upgraded and the agent restarted.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test: a failure is a test failure"
)]

use std::collections::BTreeSet;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use portcullis_e2e::{exec_in_cgroup_as, EchoServer, Slot, TestCgroup, ECONNREFUSED};
use serde_json::Value;

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn deb(revision: u32) -> PathBuf {
    workspace().join(format!(
        "target/packages/portcullis_{VERSION}-{revision}_amd64.deb"
    ))
}

fn rpm(revision: u32) -> PathBuf {
    workspace().join(format!(
        "target/packages/portcullis-{VERSION}-{revision}.x86_64.rpm"
    ))
}

/// Whether this suite can run: root (dpkg and rpm install as root, chroot), the tools, and
/// the packages. Under `cargo xtask test` a missing one fails the test.
fn prerequisites() -> bool {
    let tool = |t: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {t}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let problem = if !portcullis_e2e::is_root() {
        Some("the package tests need root (chroot, dpkg and rpm installs)".to_string())
    } else if let Some(t) = ["mmdebstrap", "lintian", "rpm", "rpmlint"]
        .into_iter()
        .find(|t| !tool(t))
    {
        Some(format!("{t} is missing; `cargo xtask setup` installs it"))
    } else {
        [deb(1), deb(2), rpm(1), rpm(2)]
            .into_iter()
            .find(|p| !p.is_file())
            .map(|p| {
                format!(
                    "{} is missing; `cargo xtask package` and `cargo xtask package --no-build --revision 2` build it (`cargo xtask test` does)",
                    p.display()
                )
            })
    };
    portcullis_e2e::prerequisites_met(problem)
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed with {}:\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(cmd: &mut Command) -> String {
    String::from_utf8(run(cmd).stdout).unwrap()
}

/// The Debian mirror apt uses on this machine (the first `URIs:` of debian.sources, or the
/// first `deb` line), so the chroot comes from the same place.
fn debian_mirror() -> String {
    let deb822 =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    let legacy = std::fs::read_to_string("/etc/apt/sources.list").unwrap_or_default();
    deb822
        .lines()
        .find_map(|l| l.strip_prefix("URIs:"))
        .and_then(|u| u.split_whitespace().next())
        .or_else(|| {
            legacy
                .lines()
                .find_map(|l| l.strip_prefix("deb "))
                .and_then(|l| l.split_whitespace().find(|w| w.starts_with("http")))
        })
        .unwrap_or("http://deb.debian.org/debian")
        .to_string()
}

/// Debian's minimal system plus the package's one dependency outside it, made once and kept
/// in .tools/chroot (a tarball of about 180 MB) so later runs need no mirror.
fn chroot_tarball() -> PathBuf {
    static MADE: Mutex<()> = Mutex::new(());
    let _once = MADE.lock().unwrap_or_else(|p| p.into_inner());
    let dir = workspace().join(".tools/chroot");
    let tarball = dir.join("bookworm-minbase-ca-certificates.tar");
    if tarball.is_file() {
        return tarball;
    }
    std::fs::create_dir_all(&dir).unwrap();
    let partial = dir.join("bookworm-minbase-ca-certificates.tar.partial");
    run(Command::new("mmdebstrap")
        .args([
            "--quiet",
            "--variant=minbase",
            // The name ends in .partial until it is complete; the format cannot come from it.
            "--format=tar",
            "--include=ca-certificates",
            "bookworm",
        ])
        .arg(&partial)
        .arg(debian_mirror()));
    std::fs::rename(&partial, &tarball).unwrap();
    tarball
}

/// A fresh Debian root for one test, removed at drop unless something is still mounted in it
/// (then it is left: deleting through a bind mount of /sys would unpin the host's programs).
struct Chroot {
    root: PathBuf,
    mounts: Vec<PathBuf>,
}

impl Chroot {
    fn new(name: &str) -> Self {
        let root = workspace().join(format!("target/packages-test/{name}"));
        if root.exists() {
            assert!(
                !mounted_below(&root),
                "{} has mounts left from an earlier run; unmount them first",
                root.display()
            );
            std::fs::remove_dir_all(&root).unwrap();
        }
        std::fs::create_dir_all(&root).unwrap();
        run(Command::new("tar")
            .args(["--extract", "--numeric-owner", "--file"])
            .arg(chroot_tarball())
            .arg("--directory")
            .arg(&root));
        Self {
            root,
            mounts: Vec::new(),
        }
    }

    fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("chroot");
        c.arg(&self.root)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C");
        c
    }

    fn sh(&self, script: &str) -> String {
        stdout(&mut self.cmd(&["sh", "-c", script]))
    }

    /// Copies a package into the root's /tmp and returns its path inside.
    fn put(&self, package: &Path) -> String {
        let name = package.file_name().unwrap().to_str().unwrap();
        std::fs::copy(package, self.path("/tmp").join(name)).unwrap();
        format!("/tmp/{name}")
    }

    /// What the agent needs of the host: /proc, /sys (bpffs, cgroupfs, BTF) and /dev.
    fn mount_kernel(&mut self) {
        run(Command::new("mount")
            .args(["-t", "proc", "proc"])
            .arg(self.path("/proc")));
        self.mounts.push(self.path("/proc"));
        for dir in ["/sys", "/dev"] {
            run(Command::new("mount")
                .arg("--rbind")
                .arg(dir)
                .arg(self.path(dir)));
            self.mounts.push(self.path(dir));
            // Unmounting ours must not unmount the host's.
            run(Command::new("mount")
                .arg("--make-rslave")
                .arg(self.path(dir)));
        }
    }

    /// Every path in the root (relative), without the parts that dpkg, apt and the test
    /// itself change as a matter of course.
    fn files(&self) -> BTreeSet<String> {
        let out = stdout(
            Command::new("find")
                .arg(&self.root)
                .arg("-mindepth")
                .arg("1"),
        );
        out.lines()
            .map(|l| {
                l.strip_prefix(self.root.to_str().unwrap())
                    .unwrap()
                    .to_string()
            })
            .filter(|p| {
                !["/var/lib/dpkg/", "/var/log/", "/var/cache/", "/tmp/"]
                    .iter()
                    .any(|skip| p.starts_with(skip))
            })
            .collect()
    }
}

impl Drop for Chroot {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-R").arg(m).status();
        }
        if mounted_below(&self.root) {
            for m in self.mounts.iter().rev() {
                let _ = Command::new("umount").arg("-R").arg("-l").arg(m).status();
            }
        }
        if !mounted_below(&self.root) {
            let _ = std::fs::remove_dir_all(&self.root);
        } else {
            eprintln!("{} still has mounts; left in place", self.root.display());
        }
    }
}

fn mounted_below(root: &Path) -> bool {
    let root = root.to_str().unwrap();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .any(|m| m == root || m.starts_with(&format!("{root}/")))
}

fn mode_owner(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.permissions().mode() & 0o7777, m.uid(), m.gid())
}

fn deb_files(package: &Path) -> BTreeSet<String> {
    stdout(Command::new("dpkg-deb").arg("--contents").arg(package))
        .lines()
        .filter(|l| l.starts_with('-'))
        .map(|l| {
            l.split_whitespace()
                .last()
                .unwrap()
                .trim_start_matches('.')
                .to_string()
        })
        .collect()
}

fn rpm_files(package: &Path) -> BTreeSet<String> {
    stdout(Command::new("rpm").args(["-qp", "--list"]).arg(package))
        .lines()
        .map(str::to_string)
        .collect()
}

fn man_pages_and_completions_are_installed(root: &Chroot, zsh_dir: &str) {
    let page = root.path("/usr/share/man/man1/portcullis-agent.1.gz");
    let text = stdout(Command::new("gzip").arg("-dc").arg(&page));
    assert!(text.contains(".TH portcullis-agent 1"), "{text}");
    assert!(
        text.contains("\\-\\-detach"),
        "the page documents the flags: {text}"
    );
    for sub in [
        "status",
        "login",
        "ca-init",
        "audit-verify",
        "policy-explain",
    ] {
        assert!(
            root.path(&format!("/usr/share/man/man1/portcullis-{sub}.1.gz"))
                .is_file(),
            "man page of portcullis {sub}"
        );
    }
    for (path, needle) in [
        (
            "/usr/share/bash-completion/completions/portcullis",
            "_portcullis()",
        ),
        (
            &format!("{zsh_dir}/_portcullis") as &str,
            "#compdef portcullis",
        ),
        (
            "/usr/share/fish/vendor_completions.d/portcullis.fish",
            "complete -c portcullis",
        ),
    ] {
        let text = std::fs::read_to_string(root.path(path)).unwrap();
        assert!(text.contains(needle), "{path}: {text}");
        assert!(text.contains("status"), "{path} completes the subcommands");
    }
}

#[test]
fn both_packages_lint_clean_with_only_the_documented_overrides() {
    if !prerequisites() {
        return;
    }
    // The overrides ship inside the .deb (usr/share/lintian/overrides); --pedantic and every
    // severity: a new finding fails here until it is fixed or overridden with a reason.
    let out = Command::new("lintian")
        .args(["--pedantic", "--fail-on", "error,warning,info,pedantic"])
        .arg(deb(1))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let findings: Vec<&str> = text
        .lines()
        .filter(|l| l.len() > 2 && l.as_bytes()[1] == b':')
        .collect();
    assert!(
        out.status.success() && findings.is_empty(),
        "lintian: {findings:#?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let config = workspace().join("packaging/rpm/rpmlint.toml");
    let out = Command::new("rpmlint")
        .arg("-c")
        .arg(&config)
        .arg(rpm(1))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success() && text.contains("0 errors, 0 warnings"),
        "rpmlint: {text}"
    );
}

#[test]
fn the_deb_installs_upgrades_keeping_the_edited_config_and_purges_to_nothing() {
    if !prerequisites() {
        return;
    }
    let root = Chroot::new("deb");
    // An operator's own line in OpenSSH's system-wide known_hosts, with no final newline:
    // the package adds its line beside it and takes only its own out again.
    let ssh_known_hosts = root.path("/etc/ssh/ssh_known_hosts");
    let operator_line = "bastion.example ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOperatorsOwnKeyLine";
    std::fs::create_dir_all(ssh_known_hosts.parent().unwrap()).unwrap();
    std::fs::write(&ssh_known_hosts, operator_line).unwrap();
    let pristine = root.files();
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    let pristine_bundle = std::fs::read(root.path(bundle)).unwrap();

    let rev1 = root.put(&deb(1));
    run(&mut root.cmd(&["dpkg", "--install", &rev1]));

    // Files, owners and modes.
    assert_eq!(mode_owner(&root.path("/usr/bin/portcullis")), (0o755, 0, 0));
    assert_eq!(
        mode_owner(&root.path("/lib/systemd/system/portcullis.service")),
        (0o644, 0, 0)
    );
    assert_eq!(
        mode_owner(&root.path("/etc/portcullis/portcullis.toml")),
        (0o644, 0, 0)
    );
    assert_eq!(mode_owner(&root.path("/var/log/portcullis")), (0o700, 0, 0));
    assert_eq!(mode_owner(&root.path("/run/portcullis")), (0o755, 0, 0));
    assert_eq!(
        mode_owner(&root.path("/etc/portcullis/policies")),
        (0o755, 0, 0)
    );
    assert!(root
        .path("/etc/portcullis/examples/analysts/masking.toml")
        .is_file());
    // Every example set of the repository is shipped (the .rpm test compares its file list
    // with this one's).
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policy/examples");
    for set in std::fs::read_dir(&examples).unwrap() {
        let set = set.unwrap();
        for file in std::fs::read_dir(set.path()).unwrap() {
            let file = file.unwrap().file_name();
            let shipped = Path::new("/etc/portcullis/examples")
                .join(set.file_name())
                .join(&file);
            assert!(
                root.path(shipped.to_str().unwrap()).is_file(),
                "{} is not in the package",
                shipped.display()
            );
        }
    }
    assert!(root.path("/usr/share/doc/portcullis/copyright").is_file());
    assert!(root
        .path("/usr/share/doc/portcullis/changelog.gz")
        .is_file());
    assert!(root
        .path("/usr/share/doc/portcullis/changelog.Debian.gz")
        .is_file());
    assert!(root
        .path("/usr/share/doc/portcullis/docs/install.md")
        .is_file());
    // The state directory is the agent's: traversable by all (to reach the CA certificate),
    // listable by root alone; the CA key is root's.
    let (state_mode, 0, 0) = mode_owner(&root.path("/var/lib/portcullis")) else {
        panic!("/var/lib/portcullis is not root's");
    };
    assert_eq!(state_mode & 0o704, 0o700, "mode {state_mode:o}");
    assert_eq!(
        mode_owner(&root.path("/var/lib/portcullis/ca/ca.key")),
        (0o600, 0, 0)
    );
    // The SSH host and user CAs are made at install too: keys root's, public halves readable.
    for ca in ["host_ca", "user_ca"] {
        assert_eq!(
            mode_owner(&root.path(&format!("/var/lib/portcullis/ssh/{ca}"))),
            (0o600, 0, 0),
            "{ca}"
        );
        assert_eq!(
            mode_owner(&root.path(&format!("/var/lib/portcullis/ssh/{ca}.pub"))).0,
            0o644,
            "{ca}.pub"
        );
    }
    let ssh_host_ca =
        std::fs::read_to_string(root.path("/var/lib/portcullis/ssh/host_ca.pub")).unwrap();
    // The `@cert-authority` line for the host CA is in ssh_known_hosts, once, readable by all.
    let ca_line = root
        .sh("portcullis ssh known-hosts --config /etc/portcullis/portcullis.toml")
        .trim()
        .to_string();
    assert!(
        ca_line.starts_with("@cert-authority * ") && ca_line.contains(ssh_host_ca.trim()),
        "{ca_line}"
    );
    assert_eq!(
        std::fs::read_to_string(&ssh_known_hosts).unwrap(),
        format!("{operator_line}\n{ca_line}\n")
    );
    assert_eq!(mode_owner(&ssh_known_hosts), (0o644, 0, 0));

    // Every shipped file under /etc is a conffile.
    let conffiles = root.sh("dpkg-query --showformat='${Conffiles}' --show portcullis");
    let conffiles: BTreeSet<&str> = conffiles
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let shipped_etc: BTreeSet<String> = deb_files(&deb(1))
        .into_iter()
        .filter(|f| f.starts_with("/etc/"))
        .collect();
    assert_eq!(
        conffiles,
        shipped_etc.iter().map(String::as_str).collect(),
        "conffiles"
    );
    assert!(conffiles.contains("/etc/portcullis/portcullis.toml"));

    // The CA is in the system trust store, world-readable, and the same as the agent's.
    let ca = std::fs::read_to_string(root.path("/var/lib/portcullis/ca/ca.pem")).unwrap();
    let trusted = root.path("/usr/share/ca-certificates/portcullis/portcullis-local-ca.crt");
    assert_eq!(std::fs::read_to_string(&trusted).unwrap(), ca);
    assert_eq!(mode_owner(&trusted).0, 0o644);
    let bundle_text = std::fs::read_to_string(root.path(bundle)).unwrap();
    assert!(
        bundle_text.contains(ca.trim()),
        "{bundle} does not hold the local CA"
    );
    assert!(root
        .path("/etc/ssl/certs/portcullis-local-ca.pem")
        .symlink_metadata()
        .is_ok());
    // Enabled for the next boot (no systemd runs in the chroot, so nothing was started).
    assert!(root
        .path("/etc/systemd/system/multi-user.target.wants/portcullis.service")
        .symlink_metadata()
        .is_ok());
    man_pages_and_completions_are_installed(&root, "/usr/share/zsh/vendor-completions");

    // An operator's edit survives an upgrade; the CA is not replaced.
    let config = root.path("/etc/portcullis/portcullis.toml");
    let edited = format!(
        "{}\n# edited by the operator\n",
        std::fs::read_to_string(&config).unwrap()
    );
    std::fs::write(&config, &edited).unwrap();
    let rev2 = root.put(&deb(2));
    run(&mut root.cmd(&["dpkg", "--force-confold", "--install", &rev2]));
    assert_eq!(
        root.sh("dpkg-query --showformat='${Version}' --show portcullis"),
        format!("{VERSION}-2")
    );
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert!(!root
        .path("/etc/portcullis/portcullis.toml.dpkg-dist")
        .exists());
    assert_eq!(
        std::fs::read_to_string(root.path("/var/lib/portcullis/ca/ca.pem")).unwrap(),
        ca,
        "an upgrade keeps the CA"
    );
    assert_eq!(
        std::fs::read_to_string(root.path("/var/lib/portcullis/ssh/host_ca.pub")).unwrap(),
        ssh_host_ca,
        "an upgrade keeps the SSH host CA"
    );
    assert_eq!(
        std::fs::read_to_string(&ssh_known_hosts).unwrap(),
        format!("{operator_line}\n{ca_line}\n"),
        "an upgrade leaves one line of the package"
    );
    // A new host CA (the old key removed, then `dpkg-reconfigure`): its line replaces the old.
    for f in ["host_ca", "host_ca.pub"] {
        std::fs::remove_file(root.path(&format!("/var/lib/portcullis/ssh/{f}"))).unwrap();
    }
    run(&mut root.cmd(&["dpkg-reconfigure", "portcullis"]));
    let new_line = root
        .sh("portcullis ssh known-hosts --config /etc/portcullis/portcullis.toml")
        .trim()
        .to_string();
    assert_ne!(new_line, ca_line, "a new host CA");
    assert_eq!(
        std::fs::read_to_string(&ssh_known_hosts).unwrap(),
        format!("{operator_line}\n{new_line}\n"),
        "the new CA's line replaces the old one"
    );

    // Remove: the program and the trust store entry go, the configuration stays.
    std::fs::create_dir_all(root.path("/var/lib/portcullis/audit")).unwrap();
    std::fs::write(root.path("/var/lib/portcullis/audit/evidence"), "kept").unwrap();
    run(&mut root.cmd(&["dpkg", "--remove", "portcullis"]));
    assert!(!root.path("/usr/bin/portcullis").exists());
    assert!(!trusted.exists());
    assert_eq!(
        std::fs::read(root.path(bundle)).unwrap(),
        pristine_bundle,
        "the trust store is as before"
    );
    assert!(root
        .path("/etc/ssl/certs/portcullis-local-ca.pem")
        .symlink_metadata()
        .is_err());
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert_eq!(
        std::fs::read_to_string(&ssh_known_hosts).unwrap(),
        format!("{operator_line}\n"),
        "remove takes the package's known_hosts line out, and only it"
    );

    // Purge: everything but the audit trail, which is evidence.
    run(&mut root.cmd(&["dpkg", "--purge", "portcullis"]));
    let left: BTreeSet<String> = root.files().difference(&pristine).cloned().collect();
    assert_eq!(
        left,
        [
            "/var/lib/portcullis",
            "/var/lib/portcullis/audit",
            "/var/lib/portcullis/audit/evidence",
        ]
        .into_iter()
        .map(str::to_string)
        .collect(),
        "left after purge"
    );

    // With the confirmation, the audit trail goes too: nothing is left, nothing is missing.
    run(&mut root.cmd(&["dpkg", "--install", &rev2]));
    run(root
        .cmd(&["dpkg", "--purge", "portcullis"])
        .env("PORTCULLIS_PURGE_AUDIT", "yes"));
    let now = root.files();
    assert_eq!(
        now.difference(&pristine).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "left after purge with PORTCULLIS_PURGE_AUDIT=yes"
    );
    assert_eq!(
        pristine.difference(&now).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "removed by the package that it did not create"
    );
    assert_eq!(std::fs::read(root.path(bundle)).unwrap(), pristine_bundle);
}

#[test]
fn the_rpm_installs_the_same_files_and_its_scriptlets_run() {
    if !prerequisites() {
        return;
    }
    // The .deb and the .rpm ship the same files, but for where each family keeps them.
    let from_deb: BTreeSet<String> = deb_files(&deb(1))
        .into_iter()
        .filter(|f| {
            !f.starts_with("/usr/share/lintian/")
                && ![
                    "/usr/share/doc/portcullis/copyright",
                    "/usr/share/doc/portcullis/changelog.gz",
                    "/usr/share/doc/portcullis/changelog.Debian.gz",
                ]
                .contains(&f.as_str())
        })
        .map(|f| {
            f.replace("/lib/systemd/", "/usr/lib/systemd/")
                .replace("/zsh/vendor-completions/", "/zsh/site-functions/")
        })
        .collect();
    let from_rpm: BTreeSet<String> = rpm_files(&rpm(1))
        .into_iter()
        .filter(|f| {
            ![
                "/usr/share/licenses/portcullis/LICENSE",
                "/usr/share/doc/portcullis/CHANGELOG.md",
            ]
            .contains(&f.as_str())
        })
        .collect();
    assert_eq!(from_rpm, from_deb);

    // Config files are %config(noreplace): rpm keeps an edited one and writes .rpmnew.
    let flags = stdout(
        Command::new("rpm")
            .args([
                "-qp",
                "--queryformat",
                "[%{FILEFLAGS:fflags} %{FILENAMES}\n]",
            ])
            .arg(rpm(1)),
    );
    for line in flags.lines().filter(|l| l.contains(" /etc/")) {
        assert!(line.starts_with("cn "), "not %config(noreplace): {line}");
    }

    // A Debian root has the shell and tools the scriptlets need; rpm knows none of its
    // packages, so --nodeps (libc and ca-certificates are there, installed by dpkg).
    let root = Chroot::new("rpm");
    let pristine = root.files();
    // rpm reads the package from the host; only the scriptlets run inside the root.
    let package = rpm(1).to_str().unwrap().to_string();
    let rpm_root = |args: &[&str]| {
        let mut c = Command::new("rpm");
        c.arg("--root").arg(&root.root).args(args);
        c
    };
    run(&mut rpm_root(&["--initdb"]));
    run(&mut rpm_root(&["--install", "--nodeps", &package]));
    assert_eq!(mode_owner(&root.path("/usr/bin/portcullis")), (0o755, 0, 0));
    assert_eq!(mode_owner(&root.path("/var/log/portcullis")), (0o700, 0, 0));
    assert_eq!(
        mode_owner(&root.path("/var/lib/portcullis/ca/ca.key")),
        (0o600, 0, 0)
    );
    let ca = std::fs::read_to_string(root.path("/var/lib/portcullis/ca/ca.pem")).unwrap();
    let anchor = root.path("/usr/share/pki/ca-trust-source/anchors/portcullis-local-ca.pem");
    assert_eq!(std::fs::read_to_string(&anchor).unwrap(), ca);
    assert_eq!(mode_owner(&anchor).0, 0o644);
    // OpenSSH trusts the agent's host CA through the line %post adds.
    let ssh_known_hosts = root.path("/etc/ssh/ssh_known_hosts");
    let known = std::fs::read_to_string(&ssh_known_hosts).unwrap();
    let host_ca =
        std::fs::read_to_string(root.path("/var/lib/portcullis/ssh/host_ca.pub")).unwrap();
    assert_eq!(known.lines().count(), 1, "{known}");
    assert!(
        known.starts_with("@cert-authority * ") && known.contains(host_ca.trim()),
        "{known}"
    );
    man_pages_and_completions_are_installed(&root, "/usr/share/zsh/site-functions");

    // An upgrade keeps the edited config and the CA.
    let config = root.path("/etc/portcullis/portcullis.toml");
    let edited = format!(
        "{}\n# edited by the operator\n",
        std::fs::read_to_string(&config).unwrap()
    );
    std::fs::write(&config, &edited).unwrap();
    let package2 = rpm(2).to_str().unwrap().to_string();
    run(&mut rpm_root(&["--upgrade", "--nodeps", &package2]));
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert_eq!(
        std::fs::read_to_string(root.path("/var/lib/portcullis/ca/ca.pem")).unwrap(),
        ca
    );
    assert_eq!(
        stdout(&mut rpm_root(&[
            "-q",
            "--queryformat",
            "%{RELEASE}",
            "portcullis"
        ])),
        "2"
    );

    // Erase: the program and the trust anchor go; rpm has no purge, so the state and the
    // edited config (as .rpmsave) stay, as docs/install.md says.
    run(&mut rpm_root(&["--erase", "portcullis"]));
    assert!(!root.path("/usr/bin/portcullis").exists());
    assert!(!anchor.exists());
    assert!(
        !ssh_known_hosts.exists(),
        "the known_hosts line goes with the package"
    );
    assert!(!root.path("/run/portcullis").exists());
    let left: BTreeSet<String> = root
        .files()
        .difference(&pristine)
        // Debian's rpm keeps its database in ~/.rpmdb.
        .filter(|p| !p.starts_with("/root/.rpmdb"))
        .cloned()
        .collect();
    let allowed = |p: &str| {
        p.starts_with("/var/lib/portcullis")
            || p == "/var/log/portcullis"
            || p == "/etc/portcullis"
            || p == "/etc/portcullis/portcullis.toml.rpmsave"
            // The anchors directory, and the completion and licence directories of every
            // package: the filesystem package owns them on rpm systems, and this root has none.
            || [
                "/usr/share/pki",
                "/usr/share/pki/ca-trust-source",
                "/usr/share/pki/ca-trust-source/anchors",
                "/usr/share/zsh",
                "/usr/share/zsh/site-functions",
                "/usr/share/fish",
                "/usr/share/fish/vendor_completions.d",
                "/usr/share/licenses",
            ]
            .contains(&p)
    };
    let unexpected: Vec<&String> = left.iter().filter(|p| !allowed(p)).collect();
    assert!(unexpected.is_empty(), "left after erase: {unexpected:?}");
    assert!(root
        .path("/etc/portcullis/portcullis.toml.rpmsave")
        .is_file());
}

/// The agent as installed by the package, run from the chroot the way the unit runs it,
/// protecting a loopback echo server; a probe connects in a loop while the package is
/// upgraded and the agent restarted. Slot 190.
#[test]
fn an_upgrade_with_a_restart_lets_no_connection_go_direct() {
    if !prerequisites() || !portcullis_e2e::e2e_enabled() {
        return;
    }
    let slot = Slot::new(190);
    let cg = TestCgroup::new("package-upgrade");
    let _server = EchoServer::start(&[slot.v4(1)]);
    let mut root = Chroot::new("upgrade");
    let rev1 = root.put(&deb(1));
    run(&mut root.cmd(&["dpkg", "--install", &rev1]));
    root.mount_kernel();

    let pin_dir = "/sys/fs/bpf/portcullis-e2e-package-upgrade";
    let _ = std::fs::remove_dir_all(pin_dir);
    std::fs::write(
        root.path("/etc/portcullis/policies/e2e.cedar"),
        portcullis_e2e::ALLOW_CONNECT_POLICY,
    )
    .unwrap();
    // The state, the control socket and the policies in the chroot's own places.
    std::fs::write(
        root.path("/etc/portcullis/e2e.toml"),
        format!(
            "[proxy]\nport = {port}\ndrain_timeout_secs = 2\n\
             [bpf]\ncgroup = \"{cg}\"\npin_dir = \"{pin_dir}\"\n\
             [insecure]\nunix_identity_only = true\n\
             [[target]]\nname = \"db\"\nprotocol = \"tcp\"\naddress = \"{addr}\"\nport = {server_port}\n",
            port = slot.proxy_port,
            cg = cg.path.display(),
            addr = slot.v4(1).ip(),
            server_port = slot.server_port,
        ),
    )
    .unwrap();
    let socket = root.path("/run/portcullis/control.sock");
    let log_path = root.path("/var/log/portcullis/agent.log");
    let start = || {
        let _ = std::fs::remove_file(&socket);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap();
        let mut c = root.cmd(&[
            "portcullis",
            "agent",
            "--config",
            "/etc/portcullis/e2e.toml",
        ]);
        c.env("PORTCULLIS_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        exec_in_cgroup_as(&mut c, Some(&cg.path), None);
        let mut child = c.spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = Command::new(portcullis_e2e::agent_bin())
                .args(["status", "--socket"])
                .arg(&socket)
                .output()
                .is_ok_and(|o| o.status.success());
            if ready {
                return child;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "the installed agent exited with {status}:\n{}",
                    std::fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the installed agent was not ready in 30 s:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let stop = |mut child: std::process::Child| {
        // As systemd stops it: SIGTERM, then wait (the pins stay).
        run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
        child.wait().unwrap();
    };
    let agent = start();

    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let done = std::sync::Arc::clone(&done);
        let cgroup = cg.path.clone();
        let target = slot.v4(1).to_string();
        std::thread::spawn(move || {
            let mut lines = Vec::new();
            // Bounded: at most 400 rounds of 10 connections.
            for _ in 0..400 {
                if done.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                let out = Command::new(portcullis_e2e::probe_bin())
                    .arg("--cgroup")
                    .arg(&cgroup)
                    .args([
                        "--uid", "41190", "--gid", "41190", "connect", &target, "--count", "10",
                    ])
                    .output()
                    .unwrap();
                for l in String::from_utf8_lossy(&out.stdout).lines() {
                    lines.push(serde_json::from_str::<Value>(l).unwrap());
                }
            }
            lines
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let rev2 = root.put(&deb(2));
    run(&mut root.cmd(&["dpkg", "--install", &rev2]));
    stop(agent);
    // While no agent runs, the pinned programs redirect to its empty port: a connect is
    // refused. The new agent starts only once a connect has seen that (bounded), so a loaded
    // machine whose load rounds miss a short window cannot fail the test.
    let probe = portcullis_e2e::Probe {
        cgroup: &cg,
        uid: 41190,
        netns: None,
    };
    let mut refused_while_down = Vec::new();
    for _ in 0..50 {
        let r = probe.connect(slot.v4(1), &[]);
        let refused = r["errno"] == ECONNREFUSED;
        refused_while_down.push(r);
        if refused {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let agent = start();
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut lines = load.join().unwrap();
    lines.extend(refused_while_down);
    stop(agent);
    let _ = std::fs::remove_dir_all(pin_dir);

    assert_eq!(
        root.sh("dpkg-query --showformat='${Version}' --show portcullis"),
        format!("{VERSION}-2")
    );
    let direct: Vec<&Value> = lines
        .iter()
        .filter(|l| l["ok"] == true && l["via_proxy"] != true)
        .collect();
    assert!(
        direct.is_empty(),
        "connections went direct during the upgrade: {direct:?}"
    );
    // A failure is a refusal (no agent listened) or a connection the stopping agent
    // accepted and then closed: the echo server always answers, so neither reached it.
    let other: Vec<&Value> = lines
        .iter()
        .filter(|l| {
            l["ok"] != true
                && l["errno"] != ECONNREFUSED
                && l["errno"] != libc::ECONNRESET
                && l["error"] != "closed without a reply"
        })
        .collect();
    assert!(other.is_empty(), "neither proxied nor refused: {other:?}");
    assert!(
        lines.iter().any(|l| l["ok"] == true),
        "connections were proxied"
    );
    assert!(
        lines.iter().any(|l| l["errno"] == ECONNREFUSED),
        "some were refused while no agent ran"
    );
}
