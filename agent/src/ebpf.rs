//! Loading, attaching and pinning the kernel programs, and reading their maps.
//!
//! Fail closed: every link is pinned in bpffs and the agent drops its own link file
//! descriptors, so the programs stay attached when the agent stops or crashes (a
//! protected connect then meets an empty proxy port and gets ECONNREFUSED). A new agent
//! attaches its programs next to the pinned ones and then renames its pins over the old
//! ones, which releases them: at no moment is a protected connect let through.
//! Only [`detach`] (`portcullis agent --detach`) removes enforcement.

use std::fs::File;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap, MapData, PerCpuArray};
use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr, SockOps};
use aya::Ebpf;
use portcullis_common::{
    counter, names, programs, target_key_data, v4_mapped, OriginRecord, RedirectConfig,
    TargetValue, TupleKey, CONFIG_ENABLED, TARGET_KEY_LEN, TARGET_PREFIX_PORT_BITS,
    V4_MAPPED_PREFIX_BITS,
};
use serde::Serialize;

use crate::config::{Config, ProtectedTarget, TargetAddress};

/// Reads what the kernel programs log (aya-log) into our tracing output.
pub use crate::sys::KernelLogger;

static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PORTCULLIS_EBPF_OBJECT_PATH"));

/// Oldest kernel with everything used here (cgroup bpf links, socket-local storage
/// from sock_addr programs, netns cookies, SO_NETNS_COOKIE).
const MIN_KERNEL: (u32, u32) = (5, 15);

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("this host cannot run the agent: {0}")]
    Preflight(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("loading the kernel programs failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("kernel program `{name}`: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("kernel map `{name}`: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning {path}: {source}")]
    Pin {
        path: PathBuf,
        source: aya::pin::PinError,
    },
    #[error("the kernel object lacks `{0}`: it was built from another version")]
    Missing(&'static str),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> EbpfError {
    let what = what.into();
    move |source| EbpfError::Io { what, source }
}

/// What the host must offer; checked before anything is loaded so the operator gets
/// one clear sentence instead of a verifier log.
pub fn preflight(config: &Config) -> Result<PathBuf, EbpfError> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(io_err("reading /proc/sys/kernel/osrelease"))?;
    let version = parse_kernel_version(&release).ok_or_else(|| {
        EbpfError::Preflight(format!(
            "cannot parse the kernel release `{}`",
            release.trim()
        ))
    })?;
    if version < MIN_KERNEL {
        return Err(EbpfError::Preflight(format!(
            "kernel {} is too old; Portcullis needs Linux {}.{} or newer",
            release.trim(),
            MIN_KERNEL.0,
            MIN_KERNEL.1
        )));
    }
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(EbpfError::Preflight(
            "the kernel exposes no BTF (/sys/kernel/btf/vmlinux is missing); build it with CONFIG_DEBUG_INFO_BTF=y".into(),
        ));
    }
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(io_err("reading /proc/self/mountinfo"))?;
    let bpffs = bpffs_action(&mountinfo, &config.bpf.pin_dir).map_err(EbpfError::Preflight)?;
    let missing = missing_capabilities(effective_capabilities()?, &bpffs);
    if !missing.is_empty() {
        let (noun, pronoun) = match missing.len() {
            1 => ("capability", "it"),
            _ => ("capabilities", "them"),
        };
        return Err(EbpfError::Preflight(format!(
            "missing {noun} {}; run the agent as root or grant {pronoun} in the systemd unit",
            missing.join(", ")
        )));
    }
    let cgroup_root = cgroup2_mount(&mountinfo).ok_or_else(|| {
        EbpfError::Preflight(
            "no cgroup v2 hierarchy is mounted (looked in /proc/self/mountinfo)".into(),
        )
    })?;
    ensure_bpffs(bpffs)?;
    Ok(cgroup_root)
}

// Bits of the capability sets (linux/capability.h).
const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// What the agent needs, as the kernel checks it (CAP_SYS_ADMIN stands in for CAP_BPF and
/// CAP_PERFMON, as bpf_capable() and perfmon_capable() allow). Found by running the agent
/// with each one dropped from its bounding set (docs/install.md, "The systemd unit"):
/// CAP_BPF loads programs and maps; CAP_PERFMON lets the verifier accept the programs'
/// pointer arithmetic on map values; CAP_NET_ADMIN loads cgroup network programs and sets
/// SO_MARK on upstream sockets; CAP_SYS_ADMIN only mounts bpffs when the boot did not.
fn missing_capabilities(effective: u64, bpffs: &BpffsAction) -> Vec<&'static str> {
    let has = |bit: u32| effective & (1u64 << bit) != 0;
    let sys_admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !has(CAP_BPF) && !sys_admin {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !sys_admin {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if matches!(bpffs, BpffsAction::Mount(_)) && !sys_admin {
        missing.push("CAP_SYS_ADMIN (to mount bpffs at /sys/fs/bpf, which is not mounted)");
    }
    missing
}

fn parse_kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.trim().split(['.', '-']);
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

fn effective_capabilities() -> Result<u64, EbpfError> {
    let status = std::fs::read_to_string("/proc/self/status")
        .map_err(io_err("reading /proc/self/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| EbpfError::Preflight("cannot read CapEff from /proc/self/status".into()))
}

/// The mount point of the cgroup2 hierarchy (hybrid systems mount it below /sys/fs/cgroup).
pub fn cgroup2_mount(mountinfo: &str) -> Option<PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let fstype = right.split_whitespace().next()?;
        if fstype != "cgroup2" {
            return None;
        }
        left.split_whitespace().nth(4).map(PathBuf::from)
    })
}

/// The default bpffs mount point, which the agent mounts when the boot did not.
const BPFFS_DEFAULT: &str = "/sys/fs/bpf";

/// What to do so that `pin_dir` is on bpffs.
#[derive(Debug, PartialEq, Eq)]
enum BpffsAction {
    Ready,
    Mount(PathBuf),
}

/// Decides from mountinfo: the pin directory's closest mount must be bpffs; the only
/// thing we mount ourselves is bpffs at its standard place, never over anything else.
fn bpffs_action(mountinfo: &str, pin_dir: &Path) -> Result<BpffsAction, String> {
    if !pin_dir.is_absolute() {
        return Err(format!(
            "bpf.pin_dir `{}` must be an absolute path",
            pin_dir.display()
        ));
    }
    let closest = mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let point = PathBuf::from(left.split_whitespace().nth(4)?);
            let fstype = right.split_whitespace().next()?.to_string();
            pin_dir.starts_with(&point).then_some((point, fstype))
        })
        .max_by_key(|(point, _)| point.components().count());
    match closest {
        Some((_, fstype)) if fstype == "bpf" => Ok(BpffsAction::Ready),
        _ if pin_dir.starts_with(BPFFS_DEFAULT) => {
            Ok(BpffsAction::Mount(PathBuf::from(BPFFS_DEFAULT)))
        }
        _ => Err(format!(
            "bpf.pin_dir `{}` is not on a bpf filesystem; use a directory below {BPFFS_DEFAULT}",
            pin_dir.display()
        )),
    }
}

fn ensure_bpffs(action: BpffsAction) -> Result<(), EbpfError> {
    match action {
        BpffsAction::Ready => Ok(()),
        BpffsAction::Mount(root) => {
            std::fs::create_dir_all(&root)
                .map_err(io_err(format!("creating {}", root.display())))?;
            tracing::info!(path = %root.display(), "bpffs is not mounted; mounting it");
            nix::mount::mount(
                Some("bpf"),
                &root,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|errno| io_err(format!("mounting bpffs at {}", root.display()))(errno.into()))
        }
    }
}

/// The cgroup the programs attach to: the configured one (relative paths are below the
/// cgroup2 mount and are created), or the whole host.
pub fn attach_cgroup(config: &Config, cgroup_root: &Path) -> Result<PathBuf, EbpfError> {
    let path = match &config.bpf.cgroup {
        None => cgroup_root.to_path_buf(),
        Some(p) if p.is_absolute() => p.clone(),
        Some(p) => cgroup_root.join(p),
    };
    if !path.exists() {
        std::fs::create_dir_all(&path)
            .map_err(io_err(format!("creating cgroup {}", path.display())))?;
    }
    Ok(path)
}

#[derive(Debug, Clone, Serialize)]
pub struct AttachedProgram {
    pub name: &'static str,
    pub hook: &'static str,
    pub pin: PathBuf,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Counters {
    pub redirected: u64,
    pub published: u64,
    pub denied_foreign_netns: u64,
    pub denied_protocol: u64,
    pub denied_no_storage: u64,
    pub exempt_agent: u64,
    pub publish_failed: u64,
}

/// The loaded, attached and pinned kernel side, and the maps the proxy reads.
pub struct Enforcement {
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub programs: Vec<AttachedProgram>,
    pending: Mutex<HashMap<MapData, TupleKey, OriginRecord>>,
    counters: PerCpuArray<MapData, u64>,
    /// The protected-target trie, changed at run time when a target's host resolves anew.
    trie: Mutex<TargetTrie>,
    /// The addresses targets' hosts resolve to, as the trie holds them.
    resolved: std::sync::Arc<crate::dns::ResolvedHosts>,
    // Held so the programs and remaining maps stay loaded for the agent's lifetime.
    _ebpf: Ebpf,
}

struct ProgramSpec {
    name: &'static str,
    hook: &'static str,
    kind: Hook,
}

enum Hook {
    SockAddr,
    SockOps,
}

/// Order matters on a first attach: the programs that publish and disguise redirected
/// sockets go in before the ones that redirect, so no redirected socket misses them.
const PROGRAMS: [ProgramSpec; 5] = [
    ProgramSpec {
        name: programs::SOCK_OPS,
        hook: "sock_ops",
        kind: Hook::SockOps,
    },
    ProgramSpec {
        name: programs::GETPEERNAME4,
        hook: "cgroup/getpeername4",
        kind: Hook::SockAddr,
    },
    ProgramSpec {
        name: programs::GETPEERNAME6,
        hook: "cgroup/getpeername6",
        kind: Hook::SockAddr,
    },
    ProgramSpec {
        name: programs::CONNECT4,
        hook: "cgroup/connect4",
        kind: Hook::SockAddr,
    },
    ProgramSpec {
        name: programs::CONNECT6,
        hook: "cgroup/connect6",
        kind: Hook::SockAddr,
    },
];

impl Enforcement {
    /// Loads the programs, fills the maps, attaches to `cgroup` and pins under the
    /// versioned pin directory, replacing any pins a previous agent left.
    pub fn attach(
        config: &Config,
        targets: &[ProtectedTarget],
        resolved: std::sync::Arc<crate::dns::ResolvedHosts>,
        cgroup: &Path,
        host_netns_cookie: u64,
    ) -> Result<(Self, Option<KernelLogger>), EbpfError> {
        let pin_dir = config.pin_dir();
        // Root only, whatever the umask: whoever may unlink a pinned link detaches it once
        // the agent is gone.
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&pin_dir)
            .map_err(io_err(format!("creating {}", pin_dir.display())))?;
        let readopting = pin_dir.join(programs::CONNECT4).exists();
        if readopting {
            tracing::info!(pin_dir = %pin_dir.display(), "pinned enforcement from an earlier run found; replacing it without a gap");
        }

        let mut ebpf = Ebpf::load(EBPF_OBJECT)?;
        // The logger owns the log ring buffer; it must outlive the programs.
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            Ok(l) => Some(l),
            Err(e) => {
                tracing::warn!(error = %e, "kernel program logs are unavailable");
                None
            }
        };

        {
            let map = ebpf
                .map_mut(names::CONFIG)
                .ok_or(EbpfError::Missing(names::CONFIG))?;
            let mut cfg_map: Array<&mut MapData, RedirectConfig> =
                Array::try_from(map).map_err(|source| EbpfError::Map {
                    name: names::CONFIG,
                    source,
                })?;
            let value = RedirectConfig {
                proxy_ip4: config.proxy.listen_ipv4.octets(),
                proxy_ip6: config.proxy.listen_ipv6.octets(),
                proxy_port: config.proxy.port,
                _pad: 0,
                exempt_mark: config.proxy.upstream_mark,
                flags: CONFIG_ENABLED,
                host_netns_cookie,
            };
            cfg_map.set(0, value, 0).map_err(|source| EbpfError::Map {
                name: names::CONFIG,
                source,
            })?;
        }
        // Maps are pinned for inspection (bpftool, tests); the programs hold them either way.
        let maps_dir = pin_dir.join("maps");
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(&maps_dir)
            .map_err(io_err(format!("creating {}", maps_dir.display())))?;
        let mut trie: TargetTrie = {
            let map = ebpf
                .take_map(names::TARGETS)
                .ok_or(EbpfError::Missing(names::TARGETS))?;
            pin_map(&map, &maps_dir, names::TARGETS)?;
            LpmTrie::try_from(map).map_err(|source| EbpfError::Map {
                name: names::TARGETS,
                source,
            })?
        };
        for t in targets {
            let resolved_addresses = resolved.addresses(t.id);
            let entries = t
                .addresses
                .iter()
                .map(trie_prefix)
                .chain(resolved_addresses.iter().map(|ip| exact_prefix(*ip)));
            for (prefix, addr) in entries {
                let key = Key::new(prefix, target_key_data(t.port, &addr));
                trie.insert(
                    &key,
                    TargetValue {
                        target_id: t.id,
                        flags: 0,
                    },
                    0,
                )
                .map_err(|source| EbpfError::Map {
                    name: names::TARGETS,
                    source,
                })?;
            }
        }

        // Cgroup bpf links always run alongside other programs on the cgroup (the kernel
        // wants no attach flags for them), which is what lets a new agent attach next to
        // the pinned programs of the previous one before replacing them.
        let cgroup_file =
            File::open(cgroup).map_err(io_err(format!("opening cgroup {}", cgroup.display())))?;
        let mut attached = Vec::with_capacity(PROGRAMS.len());
        for spec in &PROGRAMS {
            let program = ebpf
                .program_mut(spec.name)
                .ok_or(EbpfError::Missing(spec.name))?;
            let perr = |source| EbpfError::Program {
                name: spec.name,
                source,
            };
            let link: FdLink = match spec.kind {
                Hook::SockAddr => {
                    let p: &mut CgroupSockAddr = program.try_into().map_err(perr)?;
                    p.load().map_err(perr)?;
                    let id = p
                        .attach(&cgroup_file, CgroupAttachMode::Single)
                        .map_err(perr)?;
                    let link = p.take_link(id).map_err(perr)?;
                    link.try_into()
                        .map_err(|e: aya::programs::links::LinkError| {
                            EbpfError::Preflight(format!(
                                "{}: the kernel gave no bpf link: {e}",
                                spec.name
                            ))
                        })?
                }
                Hook::SockOps => {
                    let p: &mut SockOps = program.try_into().map_err(perr)?;
                    p.load().map_err(perr)?;
                    let id = p
                        .attach(&cgroup_file, CgroupAttachMode::Single)
                        .map_err(perr)?;
                    let link = p.take_link(id).map_err(perr)?;
                    link.try_into()
                        .map_err(|e: aya::programs::links::LinkError| {
                            EbpfError::Preflight(format!(
                                "{}: the kernel gave no bpf link: {e}",
                                spec.name
                            ))
                        })?
                }
            };
            let pin = pin_dir.join(spec.name);
            let staging = pin_dir.join(format!("{}_staged", spec.name));
            let _ = std::fs::remove_file(&staging);
            // Dropping the pinned handle closes our fd; the pin keeps the link attached.
            drop(link.pin(&staging).map_err(|source| EbpfError::Pin {
                path: staging.clone(),
                source,
            })?);
            // rename(2) over the previous pin releases the previous agent's link atomically.
            std::fs::rename(&staging, &pin)
                .map_err(io_err(format!("renaming pin {}", staging.display())))?;
            attached.push(AttachedProgram {
                name: spec.name,
                hook: spec.hook,
                pin,
            });
        }

        for name in [names::CONFIG, names::PENDING_ORIGINS, names::COUNTERS] {
            let map = ebpf.map(name).ok_or(EbpfError::Missing(name))?;
            pin_map(map, &maps_dir, name)?;
        }

        let pending = ebpf
            .take_map(names::PENDING_ORIGINS)
            .ok_or(EbpfError::Missing(names::PENDING_ORIGINS))?;
        let pending = HashMap::try_from(pending).map_err(|source| EbpfError::Map {
            name: names::PENDING_ORIGINS,
            source,
        })?;
        let counters = ebpf
            .take_map(names::COUNTERS)
            .ok_or(EbpfError::Missing(names::COUNTERS))?;
        let counters = PerCpuArray::try_from(counters).map_err(|source| EbpfError::Map {
            name: names::COUNTERS,
            source,
        })?;

        Ok((
            Self {
                cgroup: cgroup.to_path_buf(),
                pin_dir,
                programs: attached,
                pending: Mutex::new(pending),
                counters,
                trie: Mutex::new(trie),
                resolved,
                _ebpf: ebpf,
            },
            logger,
        ))
    }

    /// Takes (reads and deletes) the origin the kernel published for an accepted socket.
    pub fn take_origin(&self, client: SocketAddr, proxy: SocketAddr) -> Option<OriginRecord> {
        let key = tuple_key(client, proxy);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let origin = pending.get(&key, 0).ok()?;
        if let Err(e) = pending.remove(&key) {
            tracing::warn!(error = %e, "could not delete a consumed origin record");
        }
        Some(origin)
    }

    /// The target's configured addresses, and what its host resolves to now.
    pub fn describe_addresses(&self, target: &ProtectedTarget) -> String {
        let described = target.describe_addresses();
        match &target.host {
            Some(_) => format!(
                "{described} ({})",
                crate::dns::join(&self.resolved.addresses(target.id))
            ),
            None => described,
        }
    }

    /// Whether `target` protects `ip`: a configured address, or one its host resolves to.
    pub fn protects(&self, target: &ProtectedTarget, ip: IpAddr) -> bool {
        target.covers(ip) || self.resolved.covers(target.id, ip)
    }

    /// Puts a change of a target's resolved addresses into force: new addresses first, so
    /// no moment protects fewer than both the old and the new set. An entry that another
    /// target owns (a configured address equal to a resolved one) is left to it.
    pub fn apply_address_change(
        &self,
        target: &ProtectedTarget,
        change: &crate::dns::AddressChange,
    ) -> Result<(), String> {
        let mut trie = self.trie.lock().unwrap_or_else(|p| p.into_inner());
        let key_of = |ip: IpAddr| {
            let (prefix, addr) = exact_prefix(ip);
            Key::new(prefix, target_key_data(target.port, &addr))
        };
        let value = TargetValue {
            target_id: target.id,
            flags: 0,
        };
        for ip in &change.added {
            let key = key_of(*ip);
            if let Ok(other) = trie.get(&key, 0) {
                if other.target_id != target.id {
                    tracing::warn!(target = %target.name, address = %ip, "the address is already protected by another target; left to it");
                    continue;
                }
            }
            trie.insert(&key, value, 0)
                .map_err(|e| format!("protecting {ip}: {e}"))?;
        }
        for ip in &change.removed {
            if target.covers(*ip) {
                continue;
            }
            let key = key_of(*ip);
            match trie.get(&key, 0) {
                Ok(v) if v.target_id == target.id => {
                    trie.remove(&key)
                        .map_err(|e| format!("removing {ip}: {e}"))?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Entries waiting in the pending-origin map (idle: 0).
    pub fn pending_len(&self) -> usize {
        let pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        pending.keys().filter(Result::is_ok).count()
    }

    pub fn counters(&self) -> Counters {
        let sum = |i: u32| -> u64 {
            self.counters
                .get(&i, 0)
                .map(|v| v.iter().copied().fold(0u64, u64::wrapping_add))
                .unwrap_or(0)
        };
        Counters {
            redirected: sum(counter::REDIRECTED),
            published: sum(counter::PUBLISHED),
            denied_foreign_netns: sum(counter::DENIED_FOREIGN_NETNS),
            denied_protocol: sum(counter::DENIED_PROTOCOL),
            denied_no_storage: sum(counter::DENIED_NO_STORAGE),
            exempt_agent: sum(counter::EXEMPT_AGENT),
            publish_failed: sum(counter::PUBLISH_FAILED),
        }
    }
}

/// Removes every pin, which detaches the programs (the agent holds no link fds).
pub fn detach(pin_dir: &Path) -> Result<bool, EbpfError> {
    if !pin_dir.exists() {
        return Ok(false);
    }
    std::fs::remove_dir_all(pin_dir).map_err(io_err(format!("removing {}", pin_dir.display())))?;
    Ok(true)
}

type TargetTrie = LpmTrie<MapData, [u8; TARGET_KEY_LEN], TargetValue>;

/// Pins a map under `maps_dir`, replacing an earlier agent's pin with one rename.
fn pin_map(map: &aya::maps::Map, maps_dir: &Path, name: &'static str) -> Result<(), EbpfError> {
    let pin = maps_dir.join(name);
    let staging = maps_dir.join(format!("{name}_staged"));
    let _ = std::fs::remove_file(&staging);
    map.pin(&staging).map_err(|source| EbpfError::Pin {
        path: staging.clone(),
        source,
    })?;
    std::fs::rename(&staging, &pin).map_err(io_err(format!("renaming pin {}", staging.display())))
}

/// The trie prefix of one exact address.
fn exact_prefix(ip: IpAddr) -> (u32, [u8; 16]) {
    let ip = crate::config::canonical_ip(ip);
    trie_prefix(&TargetAddress::Net(ipnet::IpNet::from(ip)))
}

/// The trie prefix and address of a target address: port bits, padding bits, then address bits.
fn trie_prefix(address: &TargetAddress) -> (u32, [u8; 16]) {
    match *address {
        TargetAddress::Any => (TARGET_PREFIX_PORT_BITS, [0u8; 16]),
        TargetAddress::Net(ipnet::IpNet::V4(n)) => (
            TARGET_PREFIX_PORT_BITS + V4_MAPPED_PREFIX_BITS + u32::from(n.prefix_len()),
            v4_mapped(n.network().octets()),
        ),
        TargetAddress::Net(ipnet::IpNet::V6(n)) => (
            TARGET_PREFIX_PORT_BITS + u32::from(n.prefix_len()),
            n.network().octets(),
        ),
    }
}

pub fn mapped_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4_mapped(v4.octets()),
        IpAddr::V6(v6) => v6.octets(),
    }
}

pub fn tuple_key(client: SocketAddr, proxy: SocketAddr) -> TupleKey {
    TupleKey {
        client_addr: mapped_octets(client.ip()),
        proxy_addr: mapped_octets(proxy.ip()),
        client_port: client.port(),
        proxy_port: proxy.port(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_hybrid_mountinfo() {
        let mi = "25 1 0:23 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro\n\
                  41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            cgroup2_mount(mi),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            cgroup2_mount("25 1 0:23 / /sys/fs/cgroup ro - tmpfs tmpfs ro\n"),
            None
        );
    }

    #[test]
    fn bpffs_is_mounted_only_at_its_standard_place() {
        let without = "22 1 0:21 / /sys rw - sysfs sysfs rw\n23 1 0:22 / / rw - ext4 /dev/vda rw\n";
        let with = format!("{without}50 22 0:40 / /sys/fs/bpf rw - bpf bpf rw\n");
        let pins = Path::new("/sys/fs/bpf/portcullis");
        assert_eq!(bpffs_action(&with, pins), Ok(BpffsAction::Ready));
        assert_eq!(
            bpffs_action(without, pins),
            Ok(BpffsAction::Mount(PathBuf::from("/sys/fs/bpf")))
        );
        assert!(bpffs_action(without, Path::new("/tmp/pins"))
            .unwrap_err()
            .contains("not on a bpf filesystem"));
        assert!(bpffs_action(&with, Path::new("relative")).is_err());
    }

    #[test]
    fn capabilities_are_the_ones_the_kernel_checks() {
        let bit = |b: u32| 1u64 << b;
        let unit = bit(CAP_BPF) | bit(CAP_PERFMON) | bit(CAP_NET_ADMIN) | bit(10);
        let ready = BpffsAction::Ready;
        let mount = BpffsAction::Mount(PathBuf::from("/sys/fs/bpf"));
        assert!(missing_capabilities(unit, &ready).is_empty());
        assert!(missing_capabilities(u64::MAX, &mount).is_empty());
        // CAP_SYS_ADMIN covers CAP_BPF and CAP_PERFMON (older units grant only it).
        assert!(missing_capabilities(bit(CAP_SYS_ADMIN) | bit(CAP_NET_ADMIN), &mount).is_empty());
        assert_eq!(
            missing_capabilities(unit & !bit(CAP_PERFMON), &ready),
            ["CAP_PERFMON"]
        );
        assert_eq!(
            missing_capabilities(unit & !bit(CAP_BPF), &ready),
            ["CAP_BPF"]
        );
        assert_eq!(
            missing_capabilities(unit & !bit(CAP_NET_ADMIN) | bit(CAP_SYS_ADMIN), &ready),
            ["CAP_NET_ADMIN"]
        );
        let missing = missing_capabilities(unit, &mount);
        assert_eq!(missing.len(), 1);
        assert!(missing
            .iter()
            .all(|m| m.starts_with("CAP_SYS_ADMIN (to mount bpffs")));
        assert_eq!(
            missing_capabilities(0, &ready),
            ["CAP_BPF", "CAP_PERFMON", "CAP_NET_ADMIN"]
        );
    }

    #[test]
    fn kernel_release_parses() {
        assert_eq!(parse_kernel_version("6.18.44-fc-v669\n"), Some((6, 18)));
        assert_eq!(parse_kernel_version("5.4.0"), Some((5, 4)));
        assert_eq!(parse_kernel_version("garbage"), None);
    }

    fn address(address: &str) -> TargetAddress {
        TargetAddress::parse(address).unwrap()
    }

    #[test]
    fn trie_prefixes_cover_port_then_address() {
        assert_eq!(trie_prefix(&address("any")).0, 32);
        assert_eq!(trie_prefix(&address("127.0.0.9")).0, 32 + 96 + 32);
        assert_eq!(
            trie_prefix(&address("10.0.0.0/8")),
            (32 + 96 + 8, v4_mapped([10, 0, 0, 0]))
        );
        assert_eq!(trie_prefix(&address("::1")).0, 32 + 128);
        assert_eq!(
            exact_prefix("::ffff:127.0.0.9".parse().unwrap()),
            trie_prefix(&address("127.0.0.9"))
        );
    }

    #[test]
    fn tuple_keys_treat_v4_and_v4_mapped_alike() {
        let a = tuple_key(
            "127.0.0.1:4000".parse().unwrap(),
            "127.0.0.1:940".parse().unwrap(),
        );
        let b = tuple_key(
            "[::ffff:127.0.0.1]:4000".parse().unwrap(),
            "[::ffff:127.0.0.1]:940".parse().unwrap(),
        );
        assert_eq!(a, b);
    }
}
