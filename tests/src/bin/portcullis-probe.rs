//! A test client: joins a cgroup (and optionally a network namespace) as root, drops to
//! an unprivileged uid, then connects the way a real client or an attacker would, and
//! prints one JSON line per connection with what it observed.
//!
//! The echo server in the harness answers `peer=<address it saw>`: when that differs
//! from the probe's own local address, the connection went through the proxy.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test client: a failure is a test failure"
)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use serde_json::json;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

struct Args {
    cgroup: Option<String>,
    netns: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
    scenario: String,
    target: String,
    bind: Option<SocketAddr>,
    nonblocking: bool,
    fastopen: bool,
    /// How else the connect is made: `io-uring` (IORING_OP_CONNECT), `sendmsg-fastopen`
    /// (sendmsg(2) with MSG_FASTOPEN), `fastopen-connect` (TCP_FASTOPEN_CONNECT, then
    /// connect), `unspec-first` (a connect elsewhere dissolved by connect(AF_UNSPEC) first).
    via: Option<String>,
    /// SO_BINDTODEVICE before the connect.
    device: Option<String>,
    count: usize,
    hold_ms: u64,
}

fn parse() -> Args {
    let mut a = Args {
        cgroup: None,
        netns: None,
        uid: None,
        gid: None,
        scenario: String::new(),
        target: String::new(),
        bind: None,
        nonblocking: false,
        fastopen: false,
        via: None,
        device: None,
        count: 1,
        hold_ms: 0,
    };
    let mut it = std::env::args().skip(1);
    let mut positional = Vec::new();
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--cgroup" => a.cgroup = it.next(),
            "--netns" => a.netns = it.next(),
            "--uid" => a.uid = it.next().map(|v| v.parse().unwrap()),
            "--gid" => a.gid = it.next().map(|v| v.parse().unwrap()),
            "--bind" => a.bind = it.next().map(|v| v.parse().unwrap()),
            "--nonblocking" => a.nonblocking = true,
            "--fastopen" => a.fastopen = true,
            "--via" => a.via = it.next(),
            "--bind-device" => a.device = it.next(),
            "--count" => a.count = it.next().unwrap().parse().unwrap(),
            "--hold-ms" => a.hold_ms = it.next().unwrap().parse().unwrap(),
            _ => positional.push(arg),
        }
    }
    a.scenario = positional.first().cloned().unwrap_or_default();
    a.target = positional.get(1).cloned().unwrap_or_default();
    a
}

fn main() {
    let args = parse();
    if let Some(cg) = &args.cgroup {
        std::fs::write(format!("{cg}/cgroup.procs"), std::process::id().to_string())
            .expect("joining the cgroup");
    }
    if let Some(ns) = &args.netns {
        let f = std::fs::File::open(format!("/run/netns/{ns}")).expect("opening the netns");
        nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
    }
    if let (Some(uid), Some(gid)) = (args.uid, args.gid) {
        // Groups and gid before uid: once the uid is dropped they cannot change.
        use nix::unistd::{setgid, setgroups, setuid, Gid, Uid};
        setgroups(&[]).expect("setgroups");
        setgid(Gid::from_raw(gid)).expect("setgid");
        setuid(Uid::from_raw(uid)).expect("setuid");
    }
    match args.scenario.as_str() {
        "connect" => connect_many(&args),
        "setmark" => {
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            let r = s.set_mark(0x5043_4c53);
            println!(
                "{}",
                json!({"ok": r.is_ok(), "errno": r.err().and_then(|e| e.raw_os_error())})
            );
        }
        "transparent" => {
            // IP_TRANSPARENT would let the socket use any source address; it needs
            // CAP_NET_ADMIN (or CAP_NET_RAW).
            let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
            let r = s.set_ip_transparent_v4(true);
            println!(
                "{}",
                json!({"ok": r.is_ok(), "errno": r.err().and_then(|e| e.raw_os_error())})
            );
        }
        "session" => session(&args),
        "churn" => churn(&args),
        "move-cgroup" => {
            let r = std::fs::write(
                format!("{}/cgroup.procs", args.target),
                std::process::id().to_string(),
            );
            println!(
                "{}",
                json!({"ok": r.is_ok(), "errno": r.err().and_then(|e| e.raw_os_error())})
            );
        }
        other => panic!("unknown scenario `{other}`"),
    }
}

fn connect_many(args: &Args) {
    let target: SocketAddr = args.target.parse().expect("target address");
    // Open every connection first, so `count` of them are held at once.
    let mut streams = Vec::with_capacity(args.count);
    for _ in 0..args.count {
        streams.push(open(args, target));
    }
    for s in streams.iter_mut() {
        let line = match s {
            Ok((stream, sent_already)) => exchange(stream, *sent_already),
            Err(e) => json!({"ok": false, "errno": e.raw_os_error(), "error": e.to_string()}),
        };
        println!("{line}");
    }
    std::io::stdout().flush().unwrap();
    if args.hold_ms > 0 {
        std::thread::sleep(Duration::from_millis(args.hold_ms));
    }
}

/// Connects as asked. Returns the stream and whether the greeting went out with the SYN.
fn open(args: &Args, target: SocketAddr) -> std::io::Result<(TcpStream, bool)> {
    let s = Socket::new(
        Domain::for_address(target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    if let Some(b) = args.bind {
        s.bind(&b.into())?;
    }
    if let Some(device) = &args.device {
        s.bind_device(Some(device.as_bytes()))?;
    }
    let addr = SockAddr::from(target);
    match args.via.as_deref() {
        None => {}
        Some("io-uring") => {
            io_uring_connect(&s, &addr)?;
            return Ok((s.into(), false));
        }
        Some("sendmsg-fastopen") => {
            const MSG_FASTOPEN: libc::c_int = 0x2000_0000;
            let greeting = [std::io::IoSlice::new(b"hello\n")];
            s.send_to_vectored_with_flags(&greeting, &addr, MSG_FASTOPEN)?;
            return Ok((s.into(), true));
        }
        Some("fastopen-connect") => {
            fastopen_connect(&s)?;
        }
        Some("unspec-first") => {
            // A non-blocking connect to a closed port of an address nobody protects, then
            // connect(AF_UNSPEC), which dissolves it and leaves the socket free to connect.
            s.set_nonblocking(true)?;
            let elsewhere: SocketAddr = if target.is_ipv4() {
                "127.0.0.2:9".parse().unwrap()
            } else {
                "[::1]:9".parse().unwrap()
            };
            let _ = s.connect(&elsewhere.into());
            unspec_connect(&s)?;
            s.set_nonblocking(false)?;
        }
        Some(other) => panic!("unknown --via `{other}`"),
    }
    if args.fastopen {
        const MSG_FASTOPEN: libc::c_int = 0x2000_0000;
        s.send_to_with_flags(b"hello\n", &addr, MSG_FASTOPEN)?;
        return Ok((s.into(), true));
    }
    if args.nonblocking {
        s.set_nonblocking(true)?;
        match s.connect(&addr) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {
                wait_writable(&s)?;
                if let Some(e) = s.take_error()? {
                    return Err(e);
                }
            }
            Err(e) => return Err(e),
        }
        s.set_nonblocking(false)?;
    } else {
        s.connect(&addr)?;
    }
    Ok((s.into(), false))
}

#[allow(
    unsafe_code,
    reason = "connect(2) with an AF_UNSPEC address, which socket2 cannot build"
)]
fn unspec_connect(s: &Socket) -> std::io::Result<()> {
    // SAFETY: a zeroed sockaddr is a valid AF_UNSPEC (0) address of its own length.
    let unspec: libc::sockaddr = unsafe { std::mem::zeroed() };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr>()).unwrap();
    // SAFETY: unspec lives across the call; len is its size.
    let rc = unsafe { libc::connect(s.as_raw_fd(), &unspec, len) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[allow(
    unsafe_code,
    reason = "setsockopt(2) of TCP_FASTOPEN_CONNECT, which socket2 does not offer"
)]
fn fastopen_connect(s: &Socket) -> std::io::Result<()> {
    const TCP_FASTOPEN_CONNECT: libc::c_int = 30;
    let on: libc::c_int = 1;
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap();
    // SAFETY: `on` lives across the call; len is its size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            TCP_FASTOPEN_CONNECT,
            std::ptr::from_ref(&on).cast(),
            len,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// One IORING_OP_CONNECT through a ring of its own (no liburing: setup, mmap, enter), the
/// way an attacker would hope to get past hooks that watch connect(2). Blocks until done.
#[allow(
    unsafe_code,
    reason = "io_uring_setup(2), mmap(2) and io_uring_enter(2) through libc: std has no io_uring"
)]
fn io_uring_connect(s: &Socket, addr: &SockAddr) -> std::io::Result<()> {
    const IORING_OP_CONNECT: u8 = 16;
    const IORING_OFF_CQ_RING: libc::off_t = 0x800_0000;
    const IORING_OFF_SQES: libc::off_t = 0x1000_0000;
    const IORING_ENTER_GETEVENTS: libc::c_uint = 1;
    // struct io_uring_params: 10 words, then the SQ ring's offsets (head, tail, ring_mask,
    // ring_entries, flags, dropped, array, resv1, user_addr) and the CQ ring's (head, tail,
    // ring_mask, ring_entries, overflow, cqes, flags, resv1, user_addr), 120 bytes.
    let mut params = [0u32; 30];
    // SAFETY: params is the 120 writable bytes io_uring_setup fills in.
    let fd = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4u32, params.as_mut_ptr()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).unwrap();
    let word = |i: usize| params[i] as usize;
    let (sq_entries, cq_entries) = (word(0), word(1));
    let (sq_tail, sq_mask, sq_array) = (word(11), word(12), word(16));
    let (cq_head, cq_mask, cq_cqes) = (word(20), word(22), word(25));
    let map = |len: usize, offset: libc::off_t| -> std::io::Result<*mut u8> {
        // SAFETY: a fresh shared mapping of the ring fd at an offset the ABI defines.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd,
                offset,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(p.cast())
    };
    let sq = map(sq_array + sq_entries * 4, 0)?;
    let cq = map(cq_cqes + cq_entries * 16, IORING_OFF_CQ_RING)?;
    let sqes = map(sq_entries * 64, IORING_OFF_SQES)?;
    // The SQE: opcode, fd, addrlen in `off`, the address in `addr`, user_data.
    let mut sqe = [0u8; 64];
    sqe[0] = IORING_OP_CONNECT;
    sqe[4..8].copy_from_slice(&s.as_raw_fd().to_ne_bytes());
    sqe[8..16].copy_from_slice(&u64::from(addr.len()).to_ne_bytes());
    sqe[16..24].copy_from_slice(&(addr.as_ptr() as u64).to_ne_bytes());
    sqe[32..40].copy_from_slice(&7u64.to_ne_bytes());
    // SAFETY: the offsets are the kernel's for these mappings, each inside its length; the
    // ring is this thread's alone, and io_uring_enter orders the writes before the kernel
    // reads them.
    let res = unsafe {
        std::ptr::copy_nonoverlapping(sqe.as_ptr(), sqes, 64);
        let tail = std::ptr::read_volatile(sq.add(sq_tail).cast::<u32>());
        let mask = std::ptr::read_volatile(sq.add(sq_mask).cast::<u32>());
        let slot = sq.add(sq_array + (tail & mask) as usize * 4).cast::<u32>();
        std::ptr::write_volatile(slot, 0);
        std::ptr::write_volatile(sq.add(sq_tail).cast::<u32>(), tail.wrapping_add(1));
        let rc = libc::syscall(
            libc::SYS_io_uring_enter,
            fd,
            1u32,
            1u32,
            IORING_ENTER_GETEVENTS,
            std::ptr::null::<libc::sigset_t>(),
            0usize,
        );
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            libc::close(fd);
            return Err(e);
        }
        let head = std::ptr::read_volatile(cq.add(cq_head).cast::<u32>());
        let mask = std::ptr::read_volatile(cq.add(cq_mask).cast::<u32>());
        // struct io_uring_cqe: user_data (u64), res (i32), flags (u32).
        let cqe = cq.add(cq_cqes + (head & mask) as usize * 16);
        let res = std::ptr::read_volatile(cqe.add(8).cast::<i32>());
        libc::close(fd);
        res
    };
    if res < 0 {
        return Err(std::io::Error::from_raw_os_error(-res));
    }
    Ok(())
}

#[allow(
    unsafe_code,
    reason = "poll(2) on a socket2 socket, which has no safe wait for writability"
)]
fn wait_writable(s: &Socket) -> std::io::Result<()> {
    let mut pfd = libc::pollfd {
        fd: s.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: pfd is a valid pollfd for one entry.
    let rc = unsafe { libc::poll(&mut pfd, 1, 10_000) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn exchange(stream: &mut TcpStream, sent_already: bool) -> serde_json::Value {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port()).to_string();
    let peer = stream.peer_addr().map(|a| a.to_string()).ok();
    let local = stream.local_addr().map(canonical).ok();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    if !sent_already {
        if let Err(e) = stream.write_all(b"hello\n") {
            return json!({"ok": false, "errno": e.raw_os_error(), "error": e.to_string(), "peer": peer, "local": local});
        }
    }
    let mut reply = String::new();
    match BufReader::new(&*stream).read_line(&mut reply) {
        Ok(0) => {
            json!({"ok": false, "error": "closed without a reply", "peer": peer, "local": local})
        }
        Ok(_) => {
            let seen = reply
                .trim()
                .strip_prefix("peer=")
                .and_then(|a| a.parse::<SocketAddr>().ok())
                .map(canonical);
            // The kernel's own record of the socket's remote end (the getpeername hook does
            // not touch /proc/net/tcp): the proxy's listener when redirected, the server when
            // direct. Comparing the server's view of the peer with our local address instead
            // is ambiguous: the proxy's upstream socket may get the same ephemeral port.
            let real = kernel_peer(stream).map(canonical);
            let via_proxy = match (&real, &peer) {
                (Some(real), Some(dialled)) => {
                    dialled.parse::<SocketAddr>().ok().map(canonical).as_deref() != Some(real)
                }
                _ => seen.as_deref() != local.as_deref(),
            };
            let mut out = json!({"ok": true, "peer": peer, "local": local, "server_saw": seen, "real_peer": real, "via_proxy": via_proxy, "pid": std::process::id()});
            if !via_proxy {
                // Which cgroup the probe was in explains a connection that went direct.
                out["cgroup"] =
                    json!(std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default());
            }
            out
        }
        Err(e) => {
            json!({"ok": false, "errno": e.raw_os_error(), "error": e.to_string(), "peer": peer, "local": local})
        }
    }
}

/// One connection driven from stdin: each line is sent, each reply printed as JSON.
fn session(args: &Args) {
    let target: SocketAddr = args.target.parse().expect("target address");
    let (mut stream, _) = match open(args, target) {
        Ok(s) => s,
        Err(e) => {
            println!(
                "{}",
                json!({"ok": false, "errno": e.raw_os_error(), "error": e.to_string()})
            );
            return;
        }
    };
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    println!(
        "{}",
        json!({"ok": true, "greeting": greeting.trim(), "pid": std::process::id()})
    );
    std::io::stdout().flush().unwrap();
    for line in std::io::stdin().lines() {
        let line = line.unwrap();
        let sent = stream.write_all(format!("{line}\n").as_bytes());
        let mut reply = String::new();
        let got = sent.and_then(|()| reader.read_line(&mut reply));
        let out = match got {
            Ok(n) if n > 0 => json!({"ok": true, "reply": reply.trim()}),
            Ok(_) => json!({"ok": false, "error": "closed"}),
            Err(e) => json!({"ok": false, "errno": e.raw_os_error(), "error": e.to_string()}),
        };
        println!("{out}");
        std::io::stdout().flush().unwrap();
    }
}

/// Opens and closes `count` connections one after another; counts the outcomes.
fn churn(args: &Args) {
    let target: SocketAddr = args.target.parse().expect("target address");
    let (mut ok, mut failed) = (0u64, 0u64);
    for _ in 0..args.count {
        match open(args, target) {
            Ok(_) => ok += 1,
            Err(_) => failed += 1,
        }
    }
    println!("{}", json!({"ok": ok, "failed": failed}));
}

/// The remote address of `stream` as /proc/net/tcp{,6} lists it, found by the socket's inode.
fn kernel_peer(stream: &TcpStream) -> Option<SocketAddr> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(format!("/proc/self/fd/{}", stream.as_raw_fd()))
        .ok()?
        .ino()
        .to_string();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(9) != Some(&inode.as_str()) {
                continue;
            }
            return fields.get(2).and_then(|a| parse_proc_addr(a));
        }
    }
    None
}

/// `0100007F:0050` (IPv4) or 32 hex digits `:port` (IPv6); each 32-bit word in host order.
fn parse_proc_addr(text: &str) -> Option<SocketAddr> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..addr.len() / 8)
        .map(|i| {
            addr.get(i * 8..i * 8 + 8)
                .and_then(|w| u32::from_str_radix(w, 16).ok())
        })
        .collect::<Option<_>>()?;
    let ip = match words.as_slice() {
        [w] => std::net::IpAddr::V4(std::net::Ipv4Addr::from(w.swap_bytes())),
        [a, b, c, d] => {
            let mut bytes = [0u8; 16];
            for (i, w) in [a, b, c, d].into_iter().enumerate() {
                bytes[i * 4..i * 4 + 4].copy_from_slice(&w.swap_bytes().to_be_bytes());
            }
            std::net::IpAddr::V6(std::net::Ipv6Addr::from(bytes))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}
