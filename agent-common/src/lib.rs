//! The binary layout shared by the Portcullis kernel programs and the agent.
//!
//! Every type here crosses the kernel/userspace boundary through a BPF map, so its
//! layout is part of the pinned-state contract: changing a field means bumping
//! [`PIN_LAYOUT_VERSION`], which moves the pins to a new bpffs directory.
//! The size and offset tests at the bottom keep both sides honest.
#![no_std]

/// Bumped whenever a map's key or value layout changes; the agent pins under
/// `…/v{PIN_LAYOUT_VERSION}` so an upgrade never reads maps of another layout.
pub const PIN_LAYOUT_VERSION: u32 = 1;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Length of the LPM trie key data: port (2), padding (2), address (16).
pub const TARGET_KEY_LEN: usize = 20;
/// Prefix bits that cover the port and the padding: a target on "any address"
/// has exactly this prefix length.
pub const TARGET_PREFIX_PORT_BITS: u32 = 32;
/// Bits of a v4-mapped IPv6 address that precede the IPv4 address.
pub const V4_MAPPED_PREFIX_BITS: u32 = 96;

/// Capacity of the protected-target trie.
pub const MAX_TARGETS: u32 = 4096;
/// Capacity of the map in which established redirected sockets wait to be
/// accepted by the proxy. Entries live for microseconds (from the client's
/// handshake to the proxy's `accept`), so this bounds a burst, not a total.
pub const MAX_PENDING_ORIGINS: u32 = 65536;

/// `RedirectConfig::flags`: redirection is on.
pub const CONFIG_ENABLED: u32 = 1;

/// Indexes into the per-CPU counter array.
pub mod counter {
    pub const REDIRECTED: u32 = 0;
    pub const PUBLISHED: u32 = 1;
    pub const DENIED_FOREIGN_NETNS: u32 = 2;
    pub const DENIED_PROTOCOL: u32 = 3;
    pub const DENIED_NO_STORAGE: u32 = 4;
    pub const EXEMPT_AGENT: u32 = 5;
    pub const PUBLISH_FAILED: u32 = 6;
    pub const COUNT: u32 = 8;
}

/// Map names as they appear in the object file and under the pin directory.
pub mod names {
    pub const TARGETS: &str = "PORTCULLIS_TARGETS";
    pub const CONFIG: &str = "PORTCULLIS_CONFIG";
    pub const SOCKET_ORIGINS: &str = "PORTCULLIS_SOCKET_ORIGINS";
    pub const PENDING_ORIGINS: &str = "PORTCULLIS_PENDING_ORIGINS";
    pub const COUNTERS: &str = "PORTCULLIS_COUNTERS";
}

/// Program names (the functions in agent-ebpf).
pub mod programs {
    pub const CONNECT4: &str = "portcullis_connect4";
    pub const CONNECT6: &str = "portcullis_connect6";
    pub const GETPEERNAME4: &str = "portcullis_getpeername4";
    pub const GETPEERNAME6: &str = "portcullis_getpeername6";
    pub const SOCK_OPS: &str = "portcullis_sock_ops";
}

/// Value of the protected-target trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetValue {
    /// Index of the `[[target]]` in the agent's config (stable for a config generation).
    pub target_id: u32,
    pub flags: u32,
}

/// Single-entry array: what the kernel programs need to know about the agent.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedirectConfig {
    /// Proxy listener IPv4 address as the kernel stores `user_ip4` (network order bytes).
    pub proxy_ip4: [u8; 4],
    /// Proxy listener IPv6 address (network order bytes).
    pub proxy_ip6: [u8; 16],
    /// Proxy listener port, host order.
    pub proxy_port: u16,
    pub _pad: u16,
    /// `SO_MARK` carried by the agent's own upstream sockets. Setting a mark needs
    /// CAP_NET_ADMIN in the socket's network namespace, which a normal user lacks
    /// in the host namespace, so it cannot be forged to skip the redirect.
    pub exempt_mark: u32,
    pub flags: u32,
    /// Cookie of the network namespace the agent's listener lives in; sockets of
    /// other namespaces cannot reach that listener and are refused instead.
    pub host_netns_cookie: u64,
}

/// Who opened a redirected socket and where it wanted to go.
/// Stored per socket at connect time, published under the 4-tuple once established.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OriginRecord {
    /// Original destination; IPv4 as v4-mapped IPv6, network order bytes.
    pub orig_addr: [u8; 16],
    /// Original destination port, host order.
    pub orig_port: u16,
    /// Address family of the original `connect` (`AF_INET` or `AF_INET6`).
    pub orig_family: u16,
    pub target_id: u32,
    /// Process id (thread group id) in the initial pid namespace.
    pub tgid: u32,
    /// Thread id in the initial pid namespace.
    pub pid: u32,
    pub uid: u32,
    pub gid: u32,
    pub cgroup_id: u64,
    pub netns_cookie: u64,
    pub socket_cookie: u64,
    /// Task command name, NUL padded.
    pub comm: [u8; 16],
}

/// Key of the pending-origin map: the client's side of the connection as both the
/// client (`sock_ops`) and the proxy (`accept`) see it. Addresses are v4-mapped
/// IPv6 for IPv4, network order; ports host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct TupleKey {
    pub client_addr: [u8; 16],
    pub proxy_addr: [u8; 16],
    pub client_port: u16,
    pub proxy_port: u16,
}

#[allow(
    clippy::indexing_slicing,
    reason = "constant bounds: i < 16 and the arrays are 16 and 20 long"
)]
/// Builds the LPM trie key data: port, padding, address (v4-mapped for IPv4).
pub const fn target_key_data(port: u16, addr: &[u8; 16]) -> [u8; TARGET_KEY_LEN] {
    let p = port.to_be_bytes();
    let mut out = [0u8; TARGET_KEY_LEN];
    out[0] = p[0];
    out[1] = p[1];
    let mut i = 0;
    while i < 16 {
        out[4 + i] = addr[i];
        i += 1;
    }
    out
}

/// IPv4 address bytes as a v4-mapped IPv6 address (`::ffff:a.b.c.d`).
pub const fn v4_mapped(v4: [u8; 4]) -> [u8; 16] {
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ]
}

#[allow(
    clippy::indexing_slicing,
    reason = "constant bounds within a 16-byte array"
)]
/// The IPv4 address inside a v4-mapped IPv6 address, if it is one.
pub const fn as_v4(addr: &[u8; 16]) -> Option<[u8; 4]> {
    let mut i = 0;
    while i < 10 {
        if addr[i] != 0 {
            return None;
        }
        i += 1;
    }
    if addr[10] == 0xff && addr[11] == 0xff {
        Some([addr[12], addr[13], addr[14], addr[15]])
    } else {
        None
    }
}

/// `127.0.0.1`, network order.
pub const LOOPBACK_V4: [u8; 4] = [127, 0, 0, 1];
/// `::1`, network order.
pub const LOOPBACK_V6: [u8; 16] = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Where an IPv4 `connect` really goes. The cgroup hook sees the address as typed, but the
/// kernel routes a connect to `0.0.0.0` to the socket's bound source address, or, for an
/// unbound socket, to `127.0.0.1` (`ip_route_output_key_hash_rcu`). Deciding on the typed
/// address let `connect(0.0.0.0:5544)` from a socket bound to a protected address reach
/// the target directly. `bound` is the socket's bound source (`0.0.0.0` when unbound).
pub const fn effective_v4_destination(dest: [u8; 4], bound: [u8; 4]) -> [u8; 4] {
    if !is_unspecified_v4(dest) {
        dest
    } else if !is_unspecified_v4(bound) {
        bound
    } else {
        LOOPBACK_V4
    }
}

/// Where an IPv6 `connect` really goes (`tcp_v6_connect`): `::` means loopback (`::1`, or
/// `::ffff:127.0.0.1` for a socket bound to a v4-mapped address), and a v4-mapped
/// `::ffff:0.0.0.0` takes the IPv4 path, where it means the bound IPv4 source or
/// `127.0.0.1`. `bound` is the socket's bound source (`::` when unbound).
pub const fn effective_v6_destination(dest: [u8; 16], bound: [u8; 16]) -> [u8; 16] {
    if is_unspecified_v6(&dest) {
        return match as_v4(&bound) {
            Some(_) => v4_mapped(LOOPBACK_V4),
            None => LOOPBACK_V6,
        };
    }
    match as_v4(&dest) {
        Some(v4) if is_unspecified_v4(v4) => {
            let source = match as_v4(&bound) {
                Some(b) => b,
                None => [0; 4],
            };
            v4_mapped(effective_v4_destination(v4, source))
        }
        _ => dest,
    }
}

const fn is_unspecified_v4(a: [u8; 4]) -> bool {
    a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == 0
}

#[allow(
    clippy::indexing_slicing,
    reason = "constant bounds within a 16-byte array"
)]
const fn is_unspecified_v6(a: &[u8; 16]) -> bool {
    let mut i = 0;
    while i < 16 {
        if a[i] != 0 {
            return false;
        }
        i += 1;
    }
    true
}

#[cfg(feature = "user")]
#[allow(
    unsafe_code,
    reason = "aya reads map values as raw bytes only for types that promise, by an unsafe impl, that any bytes are valid"
)]
mod user {
    // SAFETY: all four are `#[repr(C)]`, `Copy`, contain only integers and byte
    // arrays, and have no implicit padding (checked by the layout tests), so any
    // bit pattern the kernel writes is a valid value.
    unsafe impl aya::Pod for super::TargetValue {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::RedirectConfig {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::OriginRecord {}
    // SAFETY: see above.
    unsafe impl aya::Pod for super::TupleKey {}
}

#[cfg(test)]
#[allow(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    reason = "tests index fixed arrays and parse constant addresses"
)]
mod tests {
    use super::*;
    use core::mem::{offset_of, size_of};

    #[test]
    fn origin_record_layout_is_stable_and_unpadded() {
        assert_eq!(size_of::<OriginRecord>(), 80);
        assert_eq!(offset_of!(OriginRecord, orig_addr), 0);
        assert_eq!(offset_of!(OriginRecord, orig_port), 16);
        assert_eq!(offset_of!(OriginRecord, orig_family), 18);
        assert_eq!(offset_of!(OriginRecord, target_id), 20);
        assert_eq!(offset_of!(OriginRecord, tgid), 24);
        assert_eq!(offset_of!(OriginRecord, pid), 28);
        assert_eq!(offset_of!(OriginRecord, uid), 32);
        assert_eq!(offset_of!(OriginRecord, gid), 36);
        assert_eq!(offset_of!(OriginRecord, cgroup_id), 40);
        assert_eq!(offset_of!(OriginRecord, netns_cookie), 48);
        assert_eq!(offset_of!(OriginRecord, socket_cookie), 56);
        assert_eq!(offset_of!(OriginRecord, comm), 64);
    }

    #[test]
    fn tuple_key_layout_is_stable_and_unpadded() {
        assert_eq!(size_of::<TupleKey>(), 36);
        assert_eq!(offset_of!(TupleKey, client_addr), 0);
        assert_eq!(offset_of!(TupleKey, proxy_addr), 16);
        assert_eq!(offset_of!(TupleKey, client_port), 32);
        assert_eq!(offset_of!(TupleKey, proxy_port), 34);
    }

    #[test]
    fn redirect_config_layout_is_stable_and_unpadded() {
        assert_eq!(size_of::<RedirectConfig>(), 40);
        assert_eq!(offset_of!(RedirectConfig, proxy_ip4), 0);
        assert_eq!(offset_of!(RedirectConfig, proxy_ip6), 4);
        assert_eq!(offset_of!(RedirectConfig, proxy_port), 20);
        assert_eq!(offset_of!(RedirectConfig, exempt_mark), 24);
        assert_eq!(offset_of!(RedirectConfig, flags), 28);
        assert_eq!(offset_of!(RedirectConfig, host_netns_cookie), 32);
    }

    #[test]
    fn target_value_layout_fits_the_trie_alignment_rule() {
        assert_eq!(size_of::<TargetValue>(), 8);
        // The kernel stores the value right after the key data.
        assert_eq!(TARGET_KEY_LEN % core::mem::align_of::<TargetValue>(), 0);
    }

    #[test]
    fn target_key_puts_port_first_then_padding_then_address() {
        let addr = v4_mapped([127, 0, 0, 9]);
        let key = target_key_data(5432, &addr);
        assert_eq!(&key[..4], &[0x15, 0x38, 0, 0]);
        assert_eq!(&key[4..], &addr);
    }

    #[test]
    fn v4_mapping_round_trips_and_rejects_native_v6() {
        let m = v4_mapped([10, 1, 2, 3]);
        assert_eq!(as_v4(&m), Some([10, 1, 2, 3]));
        let mut loopback6 = [0u8; 16];
        loopback6[15] = 1;
        assert_eq!(as_v4(&loopback6), None);
    }

    #[test]
    fn unspecified_destinations_resolve_as_the_kernel_routes_them() {
        let protected = [127, 0, 0, 66];
        let v6 = |s: &str| -> [u8; 16] {
            let mut out = [0u8; 16];
            let ip: core::net::Ipv6Addr = s.parse().unwrap();
            out.copy_from_slice(&ip.octets());
            out
        };
        // (destination as typed, bound source, where the kernel connects)
        let v4_cases = [
            ([0, 0, 0, 0], [0, 0, 0, 0], LOOPBACK_V4),
            ([0, 0, 0, 0], protected, protected),
            ([127, 0, 0, 9], protected, [127, 0, 0, 9]),
            ([10, 1, 2, 3], [0, 0, 0, 0], [10, 1, 2, 3]),
        ];
        for (dest, bound, want) in v4_cases {
            assert_eq!(
                effective_v4_destination(dest, bound),
                want,
                "{dest:?} bound {bound:?}"
            );
        }
        let v6_cases = [
            ("::", "::", "::1"),
            ("::", "::1", "::1"),
            ("::", "fe80::1", "::1"),
            ("::", "::ffff:127.0.0.66", "::ffff:127.0.0.1"),
            ("::ffff:0.0.0.0", "::", "::ffff:127.0.0.1"),
            ("::ffff:0.0.0.0", "::ffff:127.0.0.66", "::ffff:127.0.0.66"),
            ("::ffff:0.0.0.0", "::ffff:0.0.0.0", "::ffff:127.0.0.1"),
            ("::1", "::ffff:127.0.0.66", "::1"),
            ("::ffff:127.0.0.9", "::", "::ffff:127.0.0.9"),
        ];
        for (dest, bound, want) in v6_cases {
            assert_eq!(
                effective_v6_destination(v6(dest), v6(bound)),
                v6(want),
                "{dest} bound {bound}"
            );
        }
    }
}
