//! Where a redirected connection came from: the kernel's origin record, as events and
//! `portcullis status` show it.

use std::net::{IpAddr, SocketAddr};

use portcullis_common::OriginRecord;
use serde::Serialize;

/// The origin record, as events and `portcullis status` show it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Origin {
    /// Process id (thread group id) in the host's pid namespace.
    pub pid: u32,
    pub tid: u32,
    pub uid: u32,
    pub gid: u32,
    pub comm: String,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub socket_cookie: u64,
    /// Where the client was going.
    pub destination: SocketAddr,
    pub target_id: u32,
}

impl Origin {
    pub fn from_record(r: &OriginRecord) -> Self {
        let ip = std::net::Ipv6Addr::from(r.orig_addr);
        let ip = canonical_ip(IpAddr::V6(ip));
        let end = r.comm.iter().position(|&b| b == 0).unwrap_or(r.comm.len());
        let comm = String::from_utf8_lossy(r.comm.get(..end).unwrap_or_default()).into_owned();
        Self {
            pid: r.tgid,
            tid: r.pid,
            uid: r.uid,
            gid: r.gid,
            comm,
            cgroup_id: r.cgroup_id,
            netns_cookie: r.netns_cookie,
            socket_cookie: r.socket_cookie,
            destination: SocketAddr::new(ip, r.orig_port),
            target_id: r.target_id,
        }
    }
}

/// An IPv4-mapped IPv6 address as the IPv4 address it stands for; any other unchanged. The
/// kernel reports both families as IPv6, and configuration and events speak IPv4 where it is.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}
