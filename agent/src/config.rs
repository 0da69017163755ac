//! The agent's configuration: one typed tree, every default in one place, and errors
//! that name the file, the line and the key.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use toml::Spanned;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/portcullis/portcullis.toml";
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/portcullis/control.sock";

/// Embedded configuration for `cargo xtask demo` and `portcullis agent --demo`.
pub const DEMO_CONFIG: &str = include_str!("../../packaging/demo.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where connection events and (later) sessions and the audit store live.
    #[serde(default = "defaults::state_dir")]
    pub state_dir: PathBuf,
    #[serde(default)]
    pub control: ControlConfig,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub bpf: BpfConfig,
    #[serde(default, rename = "target")]
    pub targets: Vec<TargetConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    #[serde(default = "defaults::control_socket")]
    pub socket: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// IPv4 listener for redirected connections. Loopback: only this host's clients reach it.
    #[serde(default = "defaults::listen_ipv4")]
    pub listen_ipv4: Ipv4Addr,
    /// IPv6 listener; native IPv6 destinations are redirected here.
    #[serde(default = "defaults::listen_ipv6")]
    pub listen_ipv6: Ipv6Addr,
    /// A privileged port (below 1024) by default: while the agent is down, a normal user
    /// cannot bind it to catch the redirected connections of others.
    #[serde(default = "defaults::port")]
    pub port: u16,
    /// `SO_MARK` on the agent's own upstream sockets, which the kernel programs exempt.
    #[serde(default = "defaults::upstream_mark")]
    pub upstream_mark: u32,
    #[serde(default = "defaults::connect_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// A connection with no traffic in either direction for this long is closed.
    #[serde(default = "defaults::idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// On SIGTERM, open connections get this long to finish.
    #[serde(default = "defaults::drain_timeout_secs")]
    pub drain_timeout_secs: u64,
    /// Upper bound on concurrently proxied connections; beyond it new ones are refused.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BpfConfig {
    /// cgroup v2 directory to attach to; default: the root of the cgroup2 mount,
    /// so every process on the host is covered.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// bpffs directory for pins; the layout version is appended (`…/v1`).
    #[serde(default = "defaults::pin_dir")]
    pub pin_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Protocol::Tcp => f.write_str("tcp"),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub name: Spanned<String>,
    pub protocol: Protocol,
    /// An IP address, a CIDR, or `any`.
    pub address: Spanned<String>,
    pub port: Spanned<u16>,
    /// Where to connect instead of the original destination (`ip:port`).
    #[serde(default)]
    pub upstream: Option<Spanned<String>>,
}

/// What a `[[target]]` protects, parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetAddress {
    Any,
    Net(IpNet),
}

impl TargetAddress {
    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("any") || s == "*" {
            return Ok(Self::Any);
        }
        if let Ok(net) = s.parse::<IpNet>() {
            return Ok(Self::Net(net.trunc()));
        }
        match s.parse::<IpAddr>() {
            Ok(ip) => Ok(Self::Net(IpNet::from(ip))),
            Err(_) => Err(format!(
                "`{s}` is not an IP address, a CIDR (10.0.0.0/24) or `any`"
            )),
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        match self {
            Self::Any => true,
            Self::Net(net) => net.contains(&ip),
        }
    }
}

impl fmt::Display for TargetAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Any => f.write_str("any"),
            Self::Net(n) if n.prefix_len() == n.max_prefix_len() => write!(f, "{}", n.addr()),
            Self::Net(n) => write!(f, "{n}"),
        }
    }
}

/// A validated target, as the rest of the agent uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtectedTarget {
    pub id: u32,
    pub name: String,
    pub protocol: Protocol,
    pub address: TargetAddress,
    pub port: u16,
    pub upstream: Option<SocketAddr>,
}

/// IPv4-mapped IPv6 addresses are IPv4 addresses for every decision we make.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

mod defaults {
    use super::*;
    pub fn state_dir() -> PathBuf {
        PathBuf::from("/var/lib/portcullis")
    }
    pub fn control_socket() -> PathBuf {
        PathBuf::from(DEFAULT_CONTROL_SOCKET)
    }
    pub fn listen_ipv4() -> Ipv4Addr {
        Ipv4Addr::LOCALHOST
    }
    pub fn listen_ipv6() -> Ipv6Addr {
        Ipv6Addr::LOCALHOST
    }
    pub fn port() -> u16 {
        940
    }
    pub fn upstream_mark() -> u32 {
        0x5043_4c53
    }
    pub fn connect_timeout_secs() -> u64 {
        10
    }
    pub fn idle_timeout_secs() -> u64 {
        3600
    }
    pub fn drain_timeout_secs() -> u64 {
        30
    }
    pub fn max_connections() -> usize {
        20_000
    }
    pub fn pin_dir() -> PathBuf {
        PathBuf::from("/sys/fs/bpf/portcullis")
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            socket: defaults::control_socket(),
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen_ipv4: defaults::listen_ipv4(),
            listen_ipv6: defaults::listen_ipv6(),
            port: defaults::port(),
            upstream_mark: defaults::upstream_mark(),
            connect_timeout_secs: defaults::connect_timeout_secs(),
            idle_timeout_secs: defaults::idle_timeout_secs(),
            drain_timeout_secs: defaults::drain_timeout_secs(),
            max_connections: defaults::max_connections(),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<(Config, Vec<ProtectedTarget>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates; `path` only names the source in errors.
    pub fn parse(path: &Path, text: &str) -> Result<(Config, Vec<ProtectedTarget>), ConfigError> {
        let at = |span: Option<std::ops::Range<usize>>, message: String| {
            let (line, column) = line_col(text, span.map_or(0, |s| s.start));
            ConfigError::Invalid {
                path: path.to_path_buf(),
                line,
                column,
                message,
            }
        };
        let config: Config =
            toml::from_str(text).map_err(|e| at(e.span(), e.message().to_string()))?;
        let targets = config
            .validate()
            .map_err(|(span, message)| at(Some(span), message))?;
        Ok((config, targets))
    }

    fn validate(&self) -> Result<Vec<ProtectedTarget>, (std::ops::Range<usize>, String)> {
        let mut out: Vec<ProtectedTarget> = Vec::with_capacity(self.targets.len());
        if self.targets.len() > portcullis_common::MAX_TARGETS as usize {
            return Err((
                0..0,
                format!(
                    "{} targets configured; at most {} are supported",
                    self.targets.len(),
                    portcullis_common::MAX_TARGETS
                ),
            ));
        }
        for (i, t) in self.targets.iter().enumerate() {
            let name = t.name.get_ref().trim();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err((
                    t.name.span(),
                    format!("target[{i}].name: `{name}` must be non-empty and use only letters, digits, `-`, `_` and `.`"),
                ));
            }
            if out.iter().any(|o| o.name == name) {
                return Err((
                    t.name.span(),
                    format!("target[{i}].name: `{name}` is used twice"),
                ));
            }
            let address = TargetAddress::parse(t.address.get_ref())
                .map_err(|m| (t.address.span(), format!("target[{i}].address: {m}")))?;
            let port = *t.port.get_ref();
            if port == 0 {
                return Err((t.port.span(), format!("target[{i}].port: must be 1-65535")));
            }
            if port == self.proxy.port
                && (address.contains(IpAddr::V4(self.proxy.listen_ipv4))
                    || address.contains(IpAddr::V6(self.proxy.listen_ipv6)))
            {
                return Err((
                    t.address.span(),
                    format!(
                        "target[{i}] covers the proxy's own listener (port {port}); that would redirect the proxy into itself"
                    ),
                ));
            }
            let upstream = match &t.upstream {
                None => None,
                Some(u) => Some(u.get_ref().parse::<SocketAddr>().map_err(|_| {
                    (
                        u.span(),
                        format!("target[{i}].upstream: `{}` is not `ip:port`", u.get_ref()),
                    )
                })?),
            };
            let id =
                u32::try_from(i).map_err(|_| (t.name.span(), "too many targets".to_string()))?;
            out.push(ProtectedTarget {
                id,
                name: name.to_string(),
                protocol: t.protocol,
                address,
                port,
                upstream,
            });
        }
        if self.proxy.upstream_mark == 0 {
            return Err((0..0, "proxy.upstream_mark must not be 0".to_string()));
        }
        Ok(out)
    }

    /// The directory where this layout version's pins live.
    pub fn pin_dir(&self) -> PathBuf {
        self.bpf
            .pin_dir
            .join(format!("v{}", portcullis_common::PIN_LAYOUT_VERSION))
    }

    pub fn events_path(&self) -> PathBuf {
        self.state_dir.join("events.jsonl")
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "tests"
)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<ProtectedTarget>, String> {
        Config::parse(Path::new("/etc/portcullis/portcullis.toml"), text)
            .map(|(_, t)| t)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = parse("state_dir = \"/tmp\"\n[proxy]\nport = 940\nlisten = \"x\"\n").unwrap_err();
        assert!(
            err.starts_with("/etc/portcullis/portcullis.toml:4:"),
            "{err}"
        );
        assert!(err.contains("unknown field `listen`"), "{err}");
    }

    #[test]
    fn bad_target_address_names_its_line() {
        let err = parse(
            "[[target]]\nname = \"a\"\nprotocol = \"tcp\"\naddress = \"127.0.0.1\"\nport = 80\n\n[[target]]\nname = \"b\"\nprotocol = \"tcp\"\naddress = \"10.0.0.300\"\nport = 80\n",
        )
        .unwrap_err();
        assert!(err.contains(":10:"), "{err}");
        assert!(err.contains("target[1].address"), "{err}");
    }

    #[test]
    fn target_covering_the_proxy_listener_is_rejected() {
        let err = parse("[[target]]\nname = \"loop\"\nprotocol = \"tcp\"\naddress = \"127.0.0.0/8\"\nport = 940\n")
            .unwrap_err();
        assert!(err.contains("proxy's own listener"), "{err}");
    }

    #[test]
    fn targets_parse_exact_cidr_any_and_v6() {
        let t = parse(
            "[[target]]\nname=\"a\"\nprotocol=\"tcp\"\naddress=\"127.0.0.9\"\nport=80\n\
             [[target]]\nname=\"b\"\nprotocol=\"tcp\"\naddress=\"127.1.0.0/16\"\nport=81\n\
             [[target]]\nname=\"c\"\nprotocol=\"tcp\"\naddress=\"any\"\nport=82\n\
             [[target]]\nname=\"d\"\nprotocol=\"tcp\"\naddress=\"::1\"\nport=83\nupstream=\"[::1]:9000\"\n",
        )
        .unwrap();
        assert_eq!(t.len(), 4);
        assert_eq!(t[1].address.to_string(), "127.1.0.0/16");
        assert_eq!(t[2].address, TargetAddress::Any);
        assert!(t[1].address.contains("::ffff:127.1.2.3".parse().unwrap()));
        assert_eq!(t[3].upstream, Some("[::1]:9000".parse().unwrap()));
    }

    #[test]
    fn duplicate_target_names_are_rejected() {
        let err = parse(
            "[[target]]\nname=\"a\"\nprotocol=\"tcp\"\naddress=\"127.0.0.9\"\nport=80\n\
             [[target]]\nname=\"a\"\nprotocol=\"tcp\"\naddress=\"127.0.0.8\"\nport=80\n",
        )
        .unwrap_err();
        assert!(err.contains("used twice"), "{err}");
    }

    #[test]
    fn embedded_demo_config_is_valid() {
        let (_, targets) = Config::parse(Path::new("demo.toml"), DEMO_CONFIG).unwrap();
        assert!(!targets.is_empty());
    }
}
