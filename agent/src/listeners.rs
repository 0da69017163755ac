//! A start-up check of what the redirect cannot see: a protected service that also listens
//! on a local address no target lists (a listener on `0.0.0.0:5432` while only
//! `127.0.0.1:5432` is protected) is reachable directly through that address. The agent
//! reads the kernel's socket tables (`/proc/net/tcp`, `/proc/net/tcp6`) and warns.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::{ProtectedTarget, TargetAddress};
use crate::dns::ResolvedHosts;

/// `st` of a listening socket in /proc/net/tcp.
const TCP_LISTEN: &str = "0A";

/// Logs a warning for each local listener that serves a protected port on an address its
/// target does not cover.
pub fn warn_about_unprotected_listeners(targets: &[ProtectedTarget], resolved: &ResolvedHosts) {
    let mut listening = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        match std::fs::read_to_string(table) {
            Ok(text) => listening.extend(parse_listeners(&text)),
            Err(e) => tracing::debug!(table, error = %e, "cannot read the socket table"),
        }
    }
    for target in targets {
        let covers = |ip: IpAddr| target.covers(ip) || resolved.covers(target.id, ip);
        for exposed in uncovered_listeners(&listening, target, covers) {
            tracing::warn!(
                target = %target.name,
                listener = %exposed,
                protected = %target.describe_addresses(),
                "a local service on a protected port listens on an address the target does not list: \
                 connections to that address go to it directly; add the address to the target \
                 (`addresses`), or bind the service to the protected address only"
            );
        }
    }
}

/// The listening sockets of one /proc/net/tcp{,6} table.
pub fn parse_listeners(table: &str) -> Vec<SocketAddr> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let local = fields.nth(1)?;
            let state = fields.nth(1)?;
            (state == TCP_LISTEN).then(|| parse_socket(local)).flatten()
        })
        .collect()
}

/// `0100007F:1538` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit word of the
/// address is printed in the host's byte order, the port in hex.
fn parse_socket(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..addr.len() / 8)
        .map(|i| {
            addr.get(i * 8..i * 8 + 8)
                .and_then(|w| u32::from_str_radix(w, 16).ok())
        })
        .collect::<Option<_>>()?;
    let ip = match words.as_slice() {
        [w] => IpAddr::V4(Ipv4Addr::from(w.to_ne_bytes())),
        [a, b, c, d] => {
            let mut octets = [0u8; 16];
            for (chunk, w) in octets.chunks_exact_mut(4).zip([a, b, c, d]) {
                chunk.copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(octets))
        }
        _ => return None,
    };
    Some(SocketAddr::new(crate::config::canonical_ip(ip), port))
}

/// Listeners on `target`'s port that it does not cover, when the target protects a
/// service of this host at all (it covers one of the port's listeners, or loopback while
/// a wildcard listener serves it). A wildcard listener is covered only by a target that
/// covers every address of its family.
pub fn uncovered_listeners(
    listening: &[SocketAddr],
    target: &ProtectedTarget,
    covers: impl Fn(IpAddr) -> bool,
) -> Vec<SocketAddr> {
    let on_port: Vec<&SocketAddr> = listening
        .iter()
        .filter(|l| l.port() == target.port)
        .collect();
    let covers_everything = |ip: IpAddr| {
        target.addresses.iter().any(|a| match a {
            TargetAddress::Any => true,
            TargetAddress::Net(n) => n.prefix_len() == 0 && n.contains(&ip),
        })
    };
    let wildcard = |ip: IpAddr| ip.is_unspecified();
    let serves_here = on_port.iter().any(|l| {
        if wildcard(l.ip()) {
            covers(IpAddr::V4(Ipv4Addr::LOCALHOST)) || covers(IpAddr::V6(Ipv6Addr::LOCALHOST))
        } else {
            covers(l.ip())
        }
    });
    if !serves_here {
        return Vec::new();
    }
    let mut out: Vec<SocketAddr> = on_port
        .into_iter()
        .filter(|l| {
            if wildcard(l.ip()) {
                !covers_everything(l.ip())
            } else {
                !covers(l.ip())
            }
        })
        .copied()
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;

    /// Lines as Linux 6.18 prints them on x86_64 (little-endian words).
    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:15B8 00000000:0000 0A 00000000:00000000 00:00000000 00000000   113        0 2301 1 0000000000000000 100 0 0 10 0
   1: 4200007F:15B8 00000000:0000 0A 00000000:00000000 00:00000000 00000000   113        0 2302 1 0000000000000000 100 0 0 10 0
   2: 0100007F:AC3A 0100007F:15B8 01 00000000:00000000 00:00000000 00000000  1000        0 2303 1 0000000000000000 20 4 30 10 -1
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:15B8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000   113        0 2401 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2402 1 0000000000000000 100 0 0 10 0
";

    #[test]
    fn socket_tables_parse_to_their_listeners() {
        assert_eq!(
            parse_listeners(TCP),
            vec![
                "0.0.0.0:5560".parse().unwrap(),
                "127.0.0.66:5560".parse().unwrap()
            ],
            "the established socket is not a listener"
        );
        assert_eq!(
            parse_listeners(TCP6),
            vec!["[::1]:5560".parse().unwrap(), "[::]:22".parse().unwrap()]
        );
        assert!(parse_listeners("header\n   0: zz:15B8 0 0A\n   1: 0100007F 0 0A\n").is_empty());
    }

    fn target(addresses: &[&str], port: u16) -> ProtectedTarget {
        let text = format!(
            "[[target]]\nname=\"db\"\nprotocol=\"tcp\"\naddresses=[{}]\nport={port}\n",
            addresses
                .iter()
                .map(|a| format!("\"{a}\""))
                .collect::<Vec<_>>()
                .join(",")
        );
        crate::config::Config::parse(std::path::Path::new("t.toml"), &text)
            .unwrap()
            .1
            .remove(0)
    }

    #[test]
    fn listeners_the_target_does_not_cover_are_named() {
        let mut listening = parse_listeners(TCP);
        listening.extend(parse_listeners(TCP6));
        let check = |addresses: &[&str], port| {
            let t = target(addresses, port);
            uncovered_listeners(&listening, &t, |ip| t.covers(ip))
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        };
        // Only the 127.0.0.66 listener is listed: the wildcard and ::1 serve it too.
        assert_eq!(
            check(&["127.0.0.66"], 5560),
            vec!["0.0.0.0:5560", "[::1]:5560"]
        );
        // The wildcard serves loopback: a target on 127.0.0.1 alone misses the rest.
        assert_eq!(
            check(&["127.0.0.1"], 5560),
            vec!["0.0.0.0:5560", "127.0.0.66:5560", "[::1]:5560"]
        );
        assert_eq!(check(&["any"], 5560), Vec::<String>::new());
        // A remote target on the same port is about another host: nothing to say.
        assert_eq!(check(&["192.0.2.10"], 5560), Vec::<String>::new());
        assert_eq!(check(&["127.0.0.66"], 5561), Vec::<String>::new());
    }
}
