//! Plain TCP: forward bytes both ways with backpressure (what one side sends is read only
//! as fast as the other side takes it), pass half-closes through, and close on idle or on
//! shutdown.
//!
//! A direction copies while what arrives comes in small pieces (a request, its answer) and
//! moves to splice(2) for good once a read fills its small buffer: from then on bytes go
//! through a pipe of its own, socket to pipe, pipe to socket, inside the kernel, never
//! copied into this process. Most connections never make a pipe (three system calls to
//! make, two descriptors held, two to close); bulk ones move up to a pipe's worth per
//! system call. A direction reads from its socket only once what it read has gone out, so
//! at most one buffer's or pipe's worth waits in the agent. Where a pipe cannot be made
//! (the process is out of descriptors) or splice is refused, the direction copies through
//! a buffer instead, with the same rules.

use std::fmt;
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::admission::{ConnectedError, Gate, Incoming, OpenError, Opening, Refusal};
use crate::audit::Decision;
use portcullis_core::ByteCounters;

/// The copy buffer of a direction that cannot splice.
const BUFFER: usize = 64 * 1024;
/// A read that fills this much moves its direction to splice: what is smaller is copied.
const SMALL: usize = 16 * 1024;
/// What one direction's pipe holds: the most that waits in the agent per direction. (A
/// megabyte measured no better in `cargo xtask bench tcp-bulk`.)
const PIPE: usize = 256 * 1024;

thread_local! {
    /// The buffer small pieces pass through on this thread, one read and one write at a
    /// time (never held across an await).
    static SCRATCH: std::cell::RefCell<Box<[u8]>> =
        std::cell::RefCell::new(vec![0u8; SMALL].into_boxed_slice());
}

/// What one read-and-write of a small piece did.
enum Step {
    /// Nothing to read after all.
    Again,
    Eof,
    /// A piece was read and written on: `full` when it filled the buffer, `rest` what the
    /// peer did not take yet.
    Passed {
        full: bool,
        rest: Option<Vec<u8>>,
    },
}

/// Reads what `stream` holds into `buf`. A TCP read copies until the buffer or the socket's
/// receive queue runs out, so one shorter than `buf` emptied the queue: the socket's
/// readiness is cleared then (as tokio's own `poll_read` does), and the next read waits for
/// the next arrival instead of asking the kernel once more only to hear it has nothing. That
/// is one system call less for every message forwarded. A close or data arriving after the
/// read raises readiness anew (epoll is edge-triggered; a clear never drops a newer event).
fn read_draining(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use std::io::Read;
    let mut short = None;
    let read = stream.try_io(Interest::READABLE, || {
        let n = (&*socket2::SockRef::from(stream)).read(buf)?;
        if n > 0 && n < buf.len() {
            short = Some(n);
            // Tells tokio the socket is drained; `short` carries what was read.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match short {
        Some(n) => Ok(n),
        None => read,
    }
}

/// How a forwarded connection ended.
#[derive(Debug)]
pub enum End {
    /// Both sides closed their sending half.
    Closed,
    Idle(Duration),
    Shutdown,
    Error(std::io::Error),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Closed => f.write_str("closed"),
            End::Idle(d) => write!(f, "idle for {}s", d.as_secs()),
            End::Shutdown => f.write_str("agent shutdown"),
            End::Error(e) => write!(f, "error: {e}"),
        }
    }
}

/// A connection a policy holds for approval, on a target that waits for it
/// (`wait_for_approval`): held, unanswered (plain TCP has no way to say why), until the
/// request is decided or expires. What the client sends meanwhile stays in its socket for
/// when the connection goes on. `Err(why)` when it is not approved, or the client closed
/// meanwhile (the request is then withdrawn).
async fn wait_for_grant(gate: &Gate, client: &TcpStream, id: &str) -> Result<(), String> {
    let verdict = gate.approval_verdict(id, "the agent ended the connection while it waited");
    tokio::pin!(verdict);
    let mut watching = true;
    let mut byte = [0u8; 1];
    loop {
        tokio::select! {
            answer = &mut verdict => return answer,
            peeked = client.peek(&mut byte), if watching => {
                let why = match peeked {
                    Ok(0) => "the client closed the connection while it waited for approval".to_string(),
                    // The client speaks first: its bytes wait for the upstream.
                    Ok(_) => {
                        watching = false;
                        continue;
                    }
                    Err(e) => format!("the client's connection failed while it waited for approval: {e}"),
                };
                gate.approvals().withdraw(id, &why);
                return Err(why);
            }
        }
    }
}

/// Serves one redirected plain-TCP connection through admission (identity, policy, the
/// upstream, the durable opened event), then forwards bytes both ways until it ends. Plain
/// TCP has no way to tell its client why it was refused: the reason is in the audit trail,
/// and the socket closes.
pub async fn serve(gate: &Gate, incoming: Incoming, client: TcpStream) {
    let identity = match gate.resolve(&incoming.origin) {
        Ok(i) => i,
        Err(e) => {
            gate.record_refusal(Refusal::of(&incoming, None, e.to_string()));
            return;
        }
    };
    let refuse =
        |reason: String| gate.record_refusal(Refusal::of(&incoming, Some(&identity), reason));
    if let Some(reason) = gate.refusal_reason() {
        refuse(reason);
        return;
    }
    let request = crate::policy::connect_request(&identity, &incoming.target, &incoming.origin);
    let decided = match gate.decide_connect(&request) {
        Err(refused) if incoming.target.wait_for_approval && refused.request_id.is_some() => {
            let id = refused.request_id.clone().unwrap_or_default();
            match wait_for_grant(gate, &client, &id).await {
                // Decided again: the grant the approval made lets it through (a `forbid`
                // added meanwhile still refuses it).
                Ok(()) => gate.decide_connect(&request),
                Err(why) => Err(crate::policy::PolicyRefusal {
                    reason: why,
                    ..refused
                }),
            }
        }
        other => other,
    };
    let allowed = match decided {
        Ok(allowed) => allowed,
        Err(refused) => {
            let reason = match refused.decision {
                Decision::Deny => format!("denied by policy: {}", refused.reason),
                _ => refused.reason,
            };
            gate.record_refusal(Refusal {
                decision: refused.decision,
                policy_ids: refused.policy_ids,
                ..Refusal::of(&incoming, Some(&identity), reason)
            });
            return;
        }
    };
    if let Some(full) = gate.at_capacity() {
        refuse(full.to_string());
        return;
    }
    let upstream_addr = match gate.upstream_addr(&incoming.target, &incoming.origin) {
        Ok(a) => a,
        Err(e) => {
            refuse(e.to_string());
            return;
        }
    };
    if let Err(e) = client.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY on the client socket");
    }
    let opening = Opening {
        incoming: &incoming,
        identity: &identity,
        upstream: upstream_addr,
        policy_ids: allowed.policy_ids,
        db_user: None,
        db_name: None,
    };
    let (mut open, upstream) = match gate.open_connected(opening).await {
        Ok(both) => both,
        // Not recorded, so not forwarded; `open` logged why (nothing can be recorded).
        Err(ConnectedError::Open(OpenError::Unrecorded(_))) => return,
        Err(ConnectedError::Open(e)) => {
            refuse(e.to_string());
            return;
        }
        // Opened and recorded; the session's `connection.closed` says the upstream failed.
        Err(e @ ConnectedError::Unreachable { .. }) => {
            tracing::warn!(error = %e, "connection ended");
            return;
        }
    };
    let idle = Duration::from_secs(gate.config().proxy.idle_timeout_secs);
    let conn = std::sync::Arc::clone(&open.conn);
    let end = forward(client, upstream, &conn.bytes, idle, conn.cancel.clone()).await;
    open.set_end(end.to_string());
}

/// How a direction moves its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mover {
    Splice,
    #[cfg_attr(not(test), allow(dead_code, reason = "the tests force the copy path"))]
    Copy,
}

/// Forwards bytes both ways until both sides close, the connection idles, or `shutdown`.
pub async fn forward(
    client: TcpStream,
    upstream: TcpStream,
    bytes: &ByteCounters,
    idle: Duration,
    shutdown: CancellationToken,
) -> End {
    forward_with(client, upstream, bytes, idle, shutdown, Mover::Splice).await
}

async fn forward_with(
    client: TcpStream,
    upstream: TcpStream,
    bytes: &ByteCounters,
    idle: Duration,
    shutdown: CancellationToken,
    mover: Mover,
) -> End {
    let started = Instant::now();
    let last_activity = AtomicU64::new(0);
    let up = Direction {
        from: &client,
        to: &upstream,
        counter: &bytes.client_to_upstream,
        last_activity: &last_activity,
        started,
    };
    let down = Direction {
        from: &upstream,
        to: &client,
        counter: &bytes.upstream_to_client,
        last_activity: &last_activity,
        started,
    };
    let both = async { tokio::try_join!(up.run(mover), down.run(mover)) };
    let watchdog = async {
        let tick = (idle / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            tokio::time::sleep(tick).await;
            let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            if started.elapsed().saturating_sub(last) >= idle {
                return;
            }
        }
    };
    tokio::select! {
        r = both => match r {
            Ok(_) => End::Closed,
            Err(e) => End::Error(e),
        },
        () = watchdog => End::Idle(idle),
        () = shutdown.cancelled() => End::Shutdown,
    }
}

/// One direction of a forwarded connection.
struct Direction<'a> {
    from: &'a TcpStream,
    to: &'a TcpStream,
    counter: &'a AtomicU64,
    last_activity: &'a AtomicU64,
    started: Instant,
}

impl Direction<'_> {
    /// Moves bytes until `from` closes its sending half, then passes the half-close on
    /// (the peer may still answer).
    async fn run(&self, mover: Mover) -> io::Result<()> {
        let spliced = match mover {
            Mover::Splice => self.small_then_splice().await?,
            Mover::Copy => Spliced::Refused,
        };
        if spliced == Spliced::Refused {
            self.copy().await?;
        }
        socket2::SockRef::from(self.to).shutdown(std::net::Shutdown::Write)
    }

    /// Copies what arrives while it arrives in small pieces, and moves to splice once a
    /// read fills the small buffer: a pipe costs three system calls to make and two to
    /// close, more than the few bytes of a request and its answer are worth. A piece is
    /// read into the thread's scratch buffer and written on at once; only what the peer
    /// cannot take yet is copied out to wait, so an idle connection holds no buffer and a
    /// busy one allocates nothing per piece.
    async fn small_then_splice(&self) -> io::Result<Spliced> {
        loop {
            self.from.readable().await?;
            let step = SCRATCH.with_borrow_mut(|buf| self.read_and_pass_on(buf))?;
            match step {
                Step::Again => continue,
                Step::Eof => return Ok(Spliced::Copied),
                Step::Passed { full, rest } => {
                    if let Some(rest) = rest {
                        self.write_all(&rest).await?;
                    }
                    if full {
                        break;
                    }
                }
            }
        }
        match Pipe::new() {
            Ok(pipe) => self.splice(&pipe).await,
            // Out of descriptors: the caller copies the rest.
            Err(_) => Ok(Spliced::Refused),
        }
    }

    /// One read from `from` into `buf` and one write of it to `to`, without waiting: what
    /// `to` does not take now comes back to be written once it can.
    fn read_and_pass_on(&self, buf: &mut [u8]) -> io::Result<Step> {
        let n = match read_draining(self.from, buf) {
            Ok(0) => return Ok(Step::Eof),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Again),
            Err(e) => return Err(e),
        };
        let piece = buf.get(..n).unwrap_or_default();
        let written = match self.to.try_write(piece) {
            Ok(w) => w,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if written > 0 {
            self.moved(written);
        }
        let rest = piece.get(written..).filter(|r| !r.is_empty());
        Ok(Step::Passed {
            full: n == buf.len(),
            rest: rest.map(<[u8]>::to_vec),
        })
    }

    /// Writes all of `chunk` to `to`, counting what went.
    async fn write_all(&self, mut chunk: &[u8]) -> io::Result<()> {
        while !chunk.is_empty() {
            self.to.writable().await?;
            match self.to.try_write(chunk) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => {
                    chunk = chunk.get(w..).unwrap_or_default();
                    self.moved(w);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Moves `n` bytes' worth of progress into the counters.
    fn moved(&self, n: usize) {
        self.counter.fetch_add(n as u64, Ordering::Relaxed);
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_activity.store(now, Ordering::Relaxed);
    }

    /// Socket to pipe, pipe to socket, until EOF. `Refused` when the kernel refuses to
    /// splice these sockets before a byte moved (the caller copies instead).
    async fn splice(&self, pipe: &Pipe) -> io::Result<Spliced> {
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        let mut any = false;
        loop {
            // The pipe is empty here: a would-block is the socket's, never the pipe's.
            self.from.readable().await?;
            let read = self.from.try_io(Interest::READABLE, || {
                splice(self.from, None, &pipe.write, None, pipe.size, flags)
                    .map_err(io::Error::from)
            });
            let mut held = match read {
                Ok(0) => return Ok(Spliced::Done),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) if !any && e.raw_os_error() == Some(libc::EINVAL) => {
                    return Ok(Spliced::Refused)
                }
                Err(e) => return Err(e),
            };
            any = true;
            while held > 0 {
                self.to.writable().await?;
                let written = self.to.try_io(Interest::WRITABLE, || {
                    splice(&pipe.read, None, self.to, None, held, flags).map_err(io::Error::from)
                });
                match written {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        held -= n;
                        self.moved(n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        }
    }

    /// Through a buffer, until EOF: what a direction does when it cannot splice.
    async fn copy(&self) -> io::Result<()> {
        let mut buf = vec![0u8; BUFFER];
        loop {
            self.from.readable().await?;
            let n = match read_draining(self.from, &mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            };
            self.write_all(buf.get(..n).unwrap_or_default()).await?;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spliced {
    /// Ended while every piece was small: no pipe was made.
    Copied,
    /// Ended, through the pipe.
    Done,
    /// The kernel refused to splice before a byte went through the pipe: copy the rest.
    Refused,
}

/// One direction's pipe.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
    /// What it holds: the most one splice into it takes.
    size: usize,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let (read, write) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        // A larger pipe moves more per system call; the default (64 KiB) is kept if the
        // system's limit refuses it (`fs.pipe-max-size` for an agent without
        // CAP_SYS_RESOURCE).
        let size = i32::try_from(PIPE).unwrap_or(i32::MAX);
        let size = fcntl(&write, FcntlArg::F_SETPIPE_SZ(size))
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            // Refused: a pipe keeps the kernel's default, 64 KiB.
            .unwrap_or(64 * 1024);
        Ok(Self { read, write, size })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn forwards_both_ways_and_passes_half_close() {
        for mover in [Mover::Splice, Mover::Copy] {
            half_close_passes(mover).await;
        }
    }

    async fn half_close_passes(mover: Mover) {
        let (end, (), up, down) = forwarded(mover, |mut client, mut server| async move {
            client.write_all(b"hello").await.unwrap();
            client.shutdown().await.unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            assert_eq!(got, b"hello");
            // The server can still answer after the client's half-close.
            server.write_all(b"world!").await.unwrap();
            server.shutdown().await.unwrap();
            let mut back = Vec::new();
            client.read_to_end(&mut back).await.unwrap();
            assert_eq!(back, b"world!");
        })
        .await;
        assert!(matches!(end, End::Closed), "{mover:?}: {end}");
        assert_eq!((up, down), (5, 6));
    }

    /// Forwards between a client and a server (`forward_with`, `mover`) while `talk` drives
    /// them: how the forwarding ended, what `talk` returned, and the bytes counted up and
    /// down.
    async fn forwarded<R, F: std::future::Future<Output = R>>(
        mover: Mover,
        talk: impl FnOnce(TcpStream, TcpStream) -> F,
    ) -> (End, R, u64, u64) {
        let (client, proxy_client_side) = pair().await;
        let (proxy_upstream_side, server) = pair().await;
        let bytes = ByteCounters::default();
        let fwd = forward_with(
            proxy_client_side,
            proxy_upstream_side,
            &bytes,
            Duration::from_secs(30),
            CancellationToken::new(),
            mover,
        );
        let (end, r) = tokio::join!(fwd, talk(client, server));
        (
            end,
            r,
            bytes.client_to_upstream.load(Ordering::Relaxed),
            bytes.upstream_to_client.load(Ordering::Relaxed),
        )
    }

    /// A direction's counters, for a test to build the direction on and read afterwards.
    #[derive(Default)]
    struct Progress {
        counter: AtomicU64,
        last_activity: AtomicU64,
    }

    impl Progress {
        fn direction<'a>(&'a self, from: &'a TcpStream, to: &'a TcpStream) -> Direction<'a> {
            Direction {
                from,
                to,
                counter: &self.counter,
                last_activity: &self.last_activity,
                started: Instant::now(),
            }
        }
    }

    /// TCP sockets splice on this kernel: the splice path is the one taken, not its
    /// fallback.
    #[tokio::test]
    async fn tcp_sockets_splice_here() {
        let (mut client, from) = pair().await;
        let (to, mut server) = pair().await;
        let progress = Progress::default();
        let direction = progress.direction(&from, &to);
        client.write_all(b"spliced").await.unwrap();
        client.shutdown().await.unwrap();
        let pipe = Pipe::new().unwrap();
        assert_eq!(direction.splice(&pipe).await.unwrap(), Spliced::Done);
        drop(to);
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"spliced");
        assert_eq!(progress.counter.load(Ordering::Relaxed), 7);
    }

    /// A request and its answer in small pieces are copied without a pipe; a read that
    /// fills the small buffer moves its direction to splice, and every byte still arrives
    /// once, in order, across the switch.
    #[tokio::test]
    async fn small_pieces_are_copied_and_a_full_read_moves_to_splice() {
        for (sent, path) in [
            (b"a request".to_vec(), Spliced::Copied),
            (
                (0..SMALL * 5 + 7).map(|i| (i % 253) as u8).collect(),
                Spliced::Done,
            ),
        ] {
            // All of it waits in the socket before the direction reads: the first read of
            // the large one fills the small buffer.
            let (r, got, counted) = through_one_direction(&sent).await;
            assert_eq!(r, path, "{} bytes", sent.len());
            assert!(got == sent, "{} bytes arrived otherwise", sent.len());
            assert_eq!(counted, sent.len() as u64);
        }
    }

    /// Writes `sent` and a half-close into a direction's `from` before it reads, then runs
    /// its small-pieces loop (splice after a full read) to the end: how it ended, what
    /// arrived at the far side, and what it counted.
    async fn through_one_direction(sent: &[u8]) -> (Spliced, Vec<u8>, u64) {
        let (mut client, from) = pair().await;
        let (to, mut server) = pair().await;
        let progress = Progress::default();
        let direction = progress.direction(&from, &to);
        client.write_all(sent).await.unwrap();
        client.shutdown().await.unwrap();
        let reading = async {
            let mut got = Vec::new();
            server.read_to_end(&mut got).await.unwrap();
            got
        };
        let moving = async {
            let r = direction.small_then_splice().await.unwrap();
            socket2::SockRef::from(&to)
                .shutdown(std::net::Shutdown::Write)
                .unwrap();
            r
        };
        let (r, got) = tokio::join!(moving, reading);
        (r, got, progress.counter.load(Ordering::Relaxed))
    }

    /// A request answered, many times over on one connection, then closes both ways: each
    /// short read clears the socket's readiness, and every later piece and the close still
    /// wake the direction (a lost wake-up would hang here until the bound fails the test).
    #[tokio::test]
    async fn many_small_round_trips_each_arrive_after_a_drained_read() {
        for mover in [Mover::Splice, Mover::Copy] {
            let talk = |mut client: TcpStream, mut server: TcpStream| async move {
                let mut got = [0u8; 5];
                for i in 0..2_000u32 {
                    let ask = format!("q{:04}", i % 10_000);
                    client.write_all(ask.as_bytes()).await.unwrap();
                    server.read_exact(&mut got).await.unwrap();
                    assert_eq!(&got, ask.as_bytes());
                    server.write_all(b"a").await.unwrap();
                    client.read_exact(&mut got[..1]).await.unwrap();
                }
                client.shutdown().await.unwrap();
                assert_eq!(server.read(&mut got).await.unwrap(), 0);
                server.shutdown().await.unwrap();
                assert_eq!(client.read(&mut got).await.unwrap(), 0);
            };
            let bounded = tokio::time::timeout(Duration::from_secs(60), forwarded(mover, talk));
            let ended = bounded.await;
            assert!(
                ended.is_ok(),
                "{mover:?}: a piece or the close was never forwarded"
            );
            let (end, (), up, down) = ended.unwrap();
            assert!(matches!(end, End::Closed), "{mover:?}: {end}");
            assert_eq!((up, down), (10_000, 2_000));
        }
    }

    /// Connections share the thread's scratch buffer: a short piece on one connection after
    /// a long one on another forwards only its own bytes, never what the buffer held before.
    #[tokio::test]
    async fn a_piece_never_carries_another_connections_bytes_from_the_scratch_buffer() {
        let secret = vec![b'S'; SMALL - 1];
        let (r, got, _) = through_one_direction(&secret).await;
        assert_eq!((r, got), (Spliced::Copied, secret));
        let (r, got, _) = through_one_direction(b"hi").await;
        assert_eq!((r, got), (Spliced::Copied, b"hi".to_vec()));
    }

    /// Megabytes both ways at once, each direction in writes of odd sizes: every byte
    /// arrives, in order, and is counted once.
    #[tokio::test]
    async fn bulk_both_ways_arrives_whole_and_counted() {
        for mover in [Mover::Splice, Mover::Copy] {
            let up: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
            let down: Vec<u8> = (0..3_000_000u32).map(|i| (i % 241) as u8).collect();
            let send_and_read = |mut s: TcpStream, out: Vec<u8>| async move {
                let (mut r, mut w) = s.split();
                let writing = async {
                    for piece in out.chunks(7_919) {
                        w.write_all(piece).await.unwrap();
                    }
                    w.shutdown().await.unwrap();
                };
                let mut got = Vec::new();
                let reading = r.read_to_end(&mut got);
                let ((), n) = tokio::join!(writing, reading);
                n.unwrap();
                got
            };
            let (to_send_up, to_send_down) = (up.clone(), down.clone());
            let (end, (at_server, at_client), counted_up, counted_down) =
                forwarded(mover, |client, server| async move {
                    tokio::join!(
                        send_and_read(server, to_send_down),
                        send_and_read(client, to_send_up),
                    )
                })
                .await;
            assert!(matches!(end, End::Closed), "{mover:?}: {end}");
            assert!(at_server == up, "{mover:?}: the upstream got other bytes");
            assert!(at_client == down, "{mover:?}: the client got other bytes");
            assert_eq!((counted_up, counted_down), (5_000_000, 3_000_000));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn idle_connection_is_closed() {
        let (_client, a) = pair().await;
        let (b, _server) = pair().await;
        let bytes = ByteCounters::default();
        let end = forward(
            a,
            b,
            &bytes,
            Duration::from_secs(2),
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(end, End::Idle(_)), "{end}");
    }

    #[tokio::test]
    async fn shutdown_token_closes_the_connection() {
        let (_client, a) = pair().await;
        let (b, _server) = pair().await;
        let bytes = ByteCounters::default();
        let token = CancellationToken::new();
        token.cancel();
        let end = forward(a, b, &bytes, Duration::from_secs(60), token).await;
        assert!(matches!(end, End::Shutdown), "{end}");
    }
}
