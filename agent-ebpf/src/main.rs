//! Portcullis kernel programs.
//!
//! `connect4`/`connect6` (cgroup sock_addr hooks) decide whether a TCP connect goes to a
//! protected destination; if so they store an [`OriginRecord`] in the socket's own
//! local storage and rewrite the destination to the agent's proxy listener.
//! `sock_ops` publishes that record under the client's 4-tuple once the handshake
//! completes, so the proxy finds it for the socket it accepts, and removes it again
//! when the socket closes. `getpeername4`/`getpeername6` show the client the peer it
//! dialled instead of the proxy.
//!
//! Fail closed: when no agent listens, redirected connects meet an empty port and get
//! ECONNREFUSED; anything the programs cannot record is refused (EPERM), never let through.
#![no_std]
#![no_main]

use aya_ebpf::{
    btf_maps::{lpm_trie::Key, LpmTrie, LruHashMap, PerCpuArray, SkStorage},
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_uid_gid,
        generated::{
            bpf_get_current_cgroup_id, bpf_get_netns_cookie, bpf_get_socket_cookie,
            bpf_sk_storage_delete, bpf_sk_storage_get,
        },
    },
    macros::{btf_map, cgroup_sock_addr, sock_ops},
    programs::{SockAddrContext, SockOpsContext},
    EbpfContext,
};
use aya_log_ebpf::warn;
use portcullis_common::{
    counter, effective_v4_destination, effective_v6_destination, target_key_data, v4_mapped,
    OriginRecord, RedirectConfig, TargetValue, TupleKey, AF_INET, AF_INET6, CONFIG_ENABLED,
    MAX_PENDING_ORIGINS, MAX_TARGETS, TARGET_KEY_LEN,
};

/// A cgroup sock_addr program allows the operation with 1 and refuses it (EPERM) with 0.
const ALLOW: i32 = 1;
const REFUSE: i32 = 0;

const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB: u32 = 4;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: u32 = 4;
const BPF_TCP_CLOSE: u32 = 7;
const FULL_PREFIX: u32 = (TARGET_KEY_LEN as u32) * 8;

#[btf_map]
static PORTCULLIS_TARGETS: LpmTrie<[u8; TARGET_KEY_LEN], TargetValue, { MAX_TARGETS as usize }> =
    LpmTrie::new();

#[btf_map]
static PORTCULLIS_CONFIG: aya_ebpf::btf_maps::Array<RedirectConfig, 1> =
    aya_ebpf::btf_maps::Array::new();

#[btf_map]
static PORTCULLIS_SOCKET_ORIGINS: SkStorage<OriginRecord> = SkStorage::new();

#[btf_map]
static PORTCULLIS_PENDING_ORIGINS: LruHashMap<
    TupleKey,
    OriginRecord,
    { MAX_PENDING_ORIGINS as usize },
> = LruHashMap::new();

#[btf_map]
static PORTCULLIS_COUNTERS: PerCpuArray<u64, { counter::COUNT as usize }> = PerCpuArray::new();

#[inline(always)]
fn count(index: u32) {
    if let Some(slot) = PORTCULLIS_COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only touched by programs on this CPU, which do not preempt each other.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn config() -> Option<&'static RedirectConfig> {
    PORTCULLIS_CONFIG
        .get(0)
        .filter(|c| c.flags & CONFIG_ENABLED != 0)
}

/// Reads the ctx's socket pointer (the sock_addr ctx carries the socket it acts on).
#[inline(always)]
fn sock_of(ctx: &SockAddrContext) -> *mut aya_ebpf::bindings::bpf_sock {
    // SAFETY: the verifier guarantees ctx points at a valid bpf_sock_addr.
    unsafe { (*ctx.sock_addr).__bindgen_anon_1.sk }
}

fn storage_map() -> *mut core::ffi::c_void {
    core::ptr::from_ref(&PORTCULLIS_SOCKET_ORIGINS)
        .cast_mut()
        .cast()
}

/// Forgets an earlier redirect of this socket (a failed connect retried elsewhere), so
/// getpeername and sock_ops never act on a stale record.
#[inline(always)]
fn forget_origin(ctx: &SockAddrContext) {
    let sk = sock_of(ctx);
    // SAFETY: sk comes from the ctx; the helper checks it.
    unsafe {
        if !bpf_sk_storage_get(storage_map(), sk.cast(), core::ptr::null_mut(), 0).is_null() {
            bpf_sk_storage_delete(storage_map(), sk.cast());
        }
    }
}

enum Verdict {
    /// Not ours: leave the connect alone.
    Untouched,
    /// Protected: redirect, recording this target.
    Redirect(u32),
    /// Protected but cannot be redirected safely: refuse.
    Refuse,
}

#[inline(always)]
fn classify(ctx: &SockAddrContext, cfg: &RedirectConfig, addr: &[u8; 16], port: u16) -> Verdict {
    // SAFETY: the verifier guarantees ctx points at a valid bpf_sock_addr.
    let sa = unsafe { &*ctx.sock_addr };
    if sa.type_ != SOCK_STREAM {
        return Verdict::Untouched;
    }
    let key = Key::new(FULL_PREFIX, target_key_data(port, addr));
    let Some(target) = PORTCULLIS_TARGETS.get(&key) else {
        return Verdict::Untouched;
    };
    // SAFETY: helper valid for cgroup sock_addr programs.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    if netns != cfg.host_netns_cookie {
        // The proxy's listener lives in the host namespace; a socket of another
        // namespace (a container) cannot reach it, and must not reach the target.
        // Checked before the exemption: whoever holds CAP_NET_ADMIN in their own
        // namespace can set any mark there, so a mark proves nothing outside ours.
        count(counter::DENIED_FOREIGN_NETNS);
        warn!(
            ctx,
            "refused connect to a protected target from network namespace {}", netns
        );
        return Verdict::Refuse;
    }
    let sk = sock_of(ctx);
    // SAFETY: sk is the ctx's socket, valid for this program run.
    let mark = unsafe { (*sk).mark };
    if cfg.exempt_mark != 0 && mark == cfg.exempt_mark {
        count(counter::EXEMPT_AGENT);
        return Verdict::Untouched;
    }
    if sa.protocol != IPPROTO_TCP {
        // MPTCP and other stream protocols would go around the TCP hooks: refuse.
        count(counter::DENIED_PROTOCOL);
        warn!(ctx, "refused non-TCP stream connect to a protected target");
        return Verdict::Refuse;
    }
    Verdict::Redirect(target.target_id)
}

/// Stores who is connecting and where to, in the socket's own storage.
#[inline(always)]
fn record_origin(
    ctx: &SockAddrContext,
    addr: [u8; 16],
    port: u16,
    family: u16,
    target_id: u32,
) -> bool {
    let pid_tgid = bpf_get_current_pid_tgid();
    let uid_gid = bpf_get_current_uid_gid();
    let mut origin = OriginRecord {
        orig_addr: addr,
        orig_port: port,
        orig_family: family,
        target_id,
        tgid: (pid_tgid >> 32) as u32,
        pid: pid_tgid as u32,
        uid: uid_gid as u32,
        gid: (uid_gid >> 32) as u32,
        // SAFETY: helpers valid for cgroup sock_addr programs.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        // SAFETY: as above.
        netns_cookie: unsafe { bpf_get_netns_cookie(ctx.as_ptr()) },
        // SAFETY: as above.
        socket_cookie: unsafe { bpf_get_socket_cookie(ctx.as_ptr()) },
        comm: bpf_get_current_comm().unwrap_or([0u8; 16]),
    };
    // SAFETY: the storage pointer belongs to this socket and lives as long as it.
    unsafe {
        let slot = PORTCULLIS_SOCKET_ORIGINS.get_or_insert_ptr_mut(ctx, Some(&mut origin));
        if slot.is_null() {
            count(counter::DENIED_NO_STORAGE);
            return false;
        }
        // An existing slot (a retried connect) keeps its old contents otherwise.
        *slot = origin;
    }
    true
}

#[cgroup_sock_addr(connect4)]
pub fn portcullis_connect4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    // SAFETY: the verifier guarantees ctx points at a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    // Decide on where the connection will really go: the kernel routes 0.0.0.0 to the
    // socket's bound address (or loopback) only after this hook has run.
    // SAFETY: sk is the ctx's socket, valid for this program run.
    let bound = unsafe { (*sock_of(&ctx)).src_ip4 }.to_ne_bytes();
    let ip = effective_v4_destination(sa.user_ip4.to_ne_bytes(), bound);
    let port = u16::from_be(sa.user_port as u16);
    if ip == cfg.proxy_ip4 && port == cfg.proxy_port {
        // Straight to the proxy: never a redirect target, so no loop.
        forget_origin(&ctx);
        return ALLOW;
    }
    let addr = v4_mapped(ip);
    match classify(&ctx, cfg, &addr, port) {
        Verdict::Untouched => {
            forget_origin(&ctx);
            ALLOW
        }
        Verdict::Refuse => REFUSE,
        Verdict::Redirect(target_id) => {
            if !record_origin(&ctx, addr, port, AF_INET, target_id) {
                return REFUSE;
            }
            sa.user_ip4 = u32::from_ne_bytes(cfg.proxy_ip4);
            sa.user_port = u32::from(cfg.proxy_port.to_be());
            count(counter::REDIRECTED);
            ALLOW
        }
    }
}

#[cgroup_sock_addr(connect6)]
pub fn portcullis_connect6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    // SAFETY: the verifier guarantees ctx points at a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    // `::` and `::ffff:0.0.0.0` are routed to loopback or the bound address after this
    // hook has run: decide on that address, not the one typed.
    // SAFETY: sk is the ctx's socket, valid for this program run.
    let bound = words_to_bytes(unsafe { (*sock_of(&ctx)).src_ip6 });
    let addr = effective_v6_destination(words_to_bytes(sa.user_ip6), bound);
    let port = u16::from_be(sa.user_port as u16);
    let mapped_v4 = portcullis_common::as_v4(&addr);
    let is_proxy = match mapped_v4 {
        Some(v4) => v4 == cfg.proxy_ip4,
        None => addr == cfg.proxy_ip6,
    };
    if is_proxy && port == cfg.proxy_port {
        forget_origin(&ctx);
        return ALLOW;
    }
    match classify(&ctx, cfg, &addr, port) {
        Verdict::Untouched => {
            forget_origin(&ctx);
            ALLOW
        }
        Verdict::Refuse => REFUSE,
        Verdict::Redirect(target_id) => {
            let family = if mapped_v4.is_some() {
                AF_INET
            } else {
                AF_INET6
            };
            if !record_origin(&ctx, addr, port, family, target_id) {
                return REFUSE;
            }
            // A v4-mapped destination must stay v4-mapped: the socket may be dual-stack
            // only, and the proxy's IPv4 listener accepts it.
            let proxy = match mapped_v4 {
                Some(_) => v4_mapped(cfg.proxy_ip4),
                None => cfg.proxy_ip6,
            };
            sa.user_ip6 = bytes_to_words(proxy);
            sa.user_port = u32::from(cfg.proxy_port.to_be());
            count(counter::REDIRECTED);
            ALLOW
        }
    }
}

/// The origin stored for the ctx's socket, when the socket was redirected.
#[inline(always)]
fn stored_origin(ctx: &SockAddrContext) -> Option<OriginRecord> {
    // SAFETY: lookup without create; a null result means "not redirected".
    let p = unsafe { PORTCULLIS_SOCKET_ORIGINS.get_ptr_mut(ctx) };
    // SAFETY: non-null storage pointers are valid while the socket lives.
    unsafe { p.as_ref().copied() }
}

#[cgroup_sock_addr(getpeername4)]
pub fn portcullis_getpeername4(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    let Some(origin) = stored_origin(&ctx) else {
        return ALLOW;
    };
    // SAFETY: the verifier guarantees ctx points at a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let peer_is_proxy = sa.user_ip4.to_ne_bytes() == cfg.proxy_ip4
        && u16::from_be(sa.user_port as u16) == cfg.proxy_port;
    if let (true, Some(v4)) = (peer_is_proxy, portcullis_common::as_v4(&origin.orig_addr)) {
        sa.user_ip4 = u32::from_ne_bytes(v4);
        sa.user_port = u32::from(origin.orig_port.to_be());
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn portcullis_getpeername6(ctx: SockAddrContext) -> i32 {
    let Some(cfg) = config() else {
        return ALLOW;
    };
    let Some(origin) = stored_origin(&ctx) else {
        return ALLOW;
    };
    // SAFETY: the verifier guarantees ctx points at a valid bpf_sock_addr.
    let sa = unsafe { &mut *ctx.sock_addr };
    let peer = words_to_bytes(sa.user_ip6);
    let peer_is_proxy = (peer == cfg.proxy_ip6 || peer == v4_mapped(cfg.proxy_ip4))
        && u16::from_be(sa.user_port as u16) == cfg.proxy_port;
    if peer_is_proxy {
        sa.user_ip6 = bytes_to_words(origin.orig_addr);
        sa.user_port = u32::from(origin.orig_port.to_be());
    }
    ALLOW
}

#[sock_ops]
pub fn portcullis_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => publish_origin(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == BPF_TCP_CLOSE => {
            // The client socket is gone: whatever the proxy has not consumed is stale.
            let _ = PORTCULLIS_PENDING_ORIGINS.remove(tuple_of(&ctx));
        }
        _ => {}
    }
    0
}

#[inline(always)]
fn publish_origin(ctx: &SockOpsContext) {
    // SAFETY: `sk` is valid in sock_ops callbacks for a full socket; the storage
    // helper accepts it and returns null when the socket was never redirected.
    let origin = unsafe {
        let sk = (*ctx.ops).__bindgen_anon_2.sk;
        if sk.is_null() {
            return;
        }
        let p = bpf_sk_storage_get(storage_map(), sk.cast(), core::ptr::null_mut(), 0)
            .cast::<OriginRecord>();
        match p.as_ref() {
            Some(o) => *o,
            None => return,
        }
    };
    if PORTCULLIS_PENDING_ORIGINS
        .insert(tuple_of(ctx), origin, 0)
        .is_err()
    {
        count(counter::PUBLISH_FAILED);
        return;
    }
    count(counter::PUBLISHED);
    // Ask for state callbacks so the entry is dropped when the socket closes.
    let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
}

#[inline(always)]
fn tuple_of(ctx: &SockOpsContext) -> TupleKey {
    // Every field is read with a volatile load before any branch: otherwise LLVM may
    // select between field offsets and dereference a computed ctx pointer, which the
    // verifier rejects.
    // SAFETY: ctx.ops is the verifier-checked sock_ops context.
    let (family, l4, r4, l6, r6, lport, rport) = unsafe {
        let ops = ctx.ops;
        (
            core::ptr::read_volatile(&raw const (*ops).family),
            core::ptr::read_volatile(&raw const (*ops).local_ip4),
            core::ptr::read_volatile(&raw const (*ops).remote_ip4),
            [
                core::ptr::read_volatile(&raw const (*ops).local_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).local_ip6[3]),
            ],
            [
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[0]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[1]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[2]),
                core::ptr::read_volatile(&raw const (*ops).remote_ip6[3]),
            ],
            core::ptr::read_volatile(&raw const (*ops).local_port),
            core::ptr::read_volatile(&raw const (*ops).remote_port),
        )
    };
    let (client_addr, proxy_addr) = if family == u32::from(AF_INET) {
        (v4_mapped(l4.to_ne_bytes()), v4_mapped(r4.to_ne_bytes()))
    } else {
        (words_to_bytes(l6), words_to_bytes(r6))
    };
    TupleKey {
        client_addr,
        proxy_addr,
        client_port: lport as u16,
        // sock_ops stores the remote port in network order in the upper half.
        proxy_port: u16::from_be((rport >> 16) as u16),
    }
}

#[inline(always)]
fn words_to_bytes(w: [u32; 4]) -> [u8; 16] {
    let a = w[0].to_ne_bytes();
    let b = w[1].to_ne_bytes();
    let c = w[2].to_ne_bytes();
    let d = w[3].to_ne_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3], c[0], c[1], c[2], c[3], d[0], d[1], d[2],
        d[3],
    ]
}

#[inline(always)]
fn bytes_to_words(b: [u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
