//! What the client sends on one channel, on its way to the server (RFC 4254 §5.2 flow
//! control): each channel has its own queue and its own task that waits for the server's
//! window, so one channel whose server does not read (a command that never reads stdin, a
//! forward whose destination stalls) cannot stall the others of a connection — with
//! ControlMaster that is every `ssh` the user runs.
//!
//! russh's server refills a channel's window as soon as a packet arrives, not when it was
//! consumed, so the client's window does not bound what waits here. The bound is ours: at
//! most [`CHANNEL_BUFFER`] bytes per channel and [`CONNECTION_BUFFER`] per connection wait
//! for a server. Past that the session loop waits for room, which holds the client back.
//! While it waits, the connection's budget says so ([`ConnectionBudget::waiting`]): the
//! relays of the other direction then read the server's output ahead (see
//! [`super::reader`]), since that loop is also the one that would read the client's window
//! adjusts they may be waiting for.
//!
//! Order is kept: data, EOF, window changes, signals and close leave in the order the client
//! sent them, and a channel request (pty, env, shell, exec, subsystem, agent forwarding)
//! leaves only once everything queued before it has.

use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use russh::client;
use russh::{ChannelWriteHalf, Pty, Sig};
use tokio::sync::{mpsc, oneshot, Notify, OwnedSemaphorePermit, Semaphore};

/// Bytes of one channel that may wait for the server's window: twice russh's default window,
/// so a channel stalls only after the client sent a whole window more than the server read.
pub const CHANNEL_BUFFER: u32 = 4 << 20;
/// Bytes of all channels of one connection that may wait.
pub const CONNECTION_BUFFER: u32 = 16 << 20;
/// Non-data messages (EOF, window changes, signals) a channel may have queued; each is a few
/// bytes, the count bounds them.
const QUEUE_DEPTH: usize = 4096;

/// The byte budget all channels of one connection share, and what the two directions of
/// the connection tell each other.
#[derive(Clone)]
pub struct ConnectionBudget(Arc<Budget>);

struct Budget {
    bytes: Arc<Semaphore>,
    /// Channels whose client data now waits for room.
    waiting: AtomicUsize,
    /// Woken when one starts waiting.
    began_waiting: Notify,
    /// Bytes the readers of this connection read ahead of the client (see `reader`).
    read_ahead: AtomicU64,
    /// Why the connection was ended for what it held, when it was.
    ended: std::sync::Mutex<Option<String>>,
}

impl ConnectionBudget {
    pub fn new() -> Self {
        Self(Arc::new(Budget {
            bytes: Arc::new(Semaphore::new(CONNECTION_BUFFER as usize)),
            waiting: AtomicUsize::new(0),
            began_waiting: Notify::new(),
            read_ahead: AtomicU64::new(0),
            ended: std::sync::Mutex::new(None),
        }))
    }

    /// Whether client data of this connection waits for room right now, which holds the
    /// session loop that reads the client.
    pub fn waiting(&self) -> bool {
        self.0.waiting.load(Ordering::SeqCst) > 0
    }

    /// Returns once client data of this connection waits for room.
    pub async fn began_waiting(&self) {
        loop {
            let mut notified = pin!(self.0.began_waiting.notified());
            notified.as_mut().enable();
            if self.waiting() {
                return;
            }
            notified.await;
        }
    }

    /// Counts bytes read ahead for the whole connection; returns the new total.
    pub fn add_read_ahead(&self, n: u64) -> u64 {
        self.0.read_ahead.fetch_add(n, Ordering::SeqCst) + n
    }

    pub fn remove_read_ahead(&self, n: u64) {
        self.0.read_ahead.fetch_sub(n, Ordering::SeqCst);
    }

    pub fn set_ended(&self, why: String) {
        *self.0.ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Why the connection was ended for what it held, if it was.
    pub fn ended(&self) -> Option<String> {
        self.0
            .ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits for `n` bytes of the connection's room, marking the connection as waiting
    /// while it does (a guard, so a wait that is cancelled unmarks it too).
    async fn room(&self, n: u32) -> Result<OwnedSemaphorePermit, tokio::sync::AcquireError> {
        if let Ok(p) = Arc::clone(&self.0.bytes).try_acquire_many_owned(n) {
            return Ok(p);
        }
        let _waiting = Waiting::new(&self.0);
        Arc::clone(&self.0.bytes).acquire_many_owned(n).await
    }
}

/// Marks a connection's client data as waiting for room while it lives.
struct Waiting<'a>(&'a Budget);

impl<'a> Waiting<'a> {
    fn new(budget: &'a Budget) -> Self {
        budget.waiting.fetch_add(1, Ordering::SeqCst);
        budget.began_waiting.notify_waiters();
        Self(budget)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::SeqCst);
    }
}

enum Upward {
    /// The permits are returned when the server has taken the bytes.
    Data(Bytes, [OwnedSemaphorePermit; 2]),
    Eof,
    WindowChange(u32, u32, u32, u32),
    Signal(Sig),
    Close,
    /// Answered once everything queued before it has left.
    Drained(oneshot::Sender<()>),
}

/// The client-to-server half of one relayed channel. Methods mirror russh's
/// `ChannelWriteHalf`; what they send leaves in call order. A clone feeds the same queue
/// (a channel waiting for approval is started by its own task).
#[derive(Clone)]
pub struct UpstreamWriter {
    half: Arc<ChannelWriteHalf<client::Msg>>,
    queue: mpsc::Sender<Upward>,
    channel_budget: Arc<Semaphore>,
    connection: ConnectionBudget,
}

/// The task that empties one channel's queue into the server's window: run it (spawned or
/// joined) for as long as the channel lives; it ends when the writer is dropped and its queue
/// is empty, or when the server's side is gone.
pub type Drain = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

impl UpstreamWriter {
    /// `sent` counts the bytes the server took, when the caller wants them per channel.
    pub fn new(
        half: ChannelWriteHalf<client::Msg>,
        budget: &ConnectionBudget,
        sent: Option<Arc<AtomicU64>>,
    ) -> (Self, Drain) {
        let half = Arc::new(half);
        let (queue, rx) = mpsc::channel(QUEUE_DEPTH);
        let drain = Box::pin(drain(Arc::clone(&half), rx, sent));
        (
            Self {
                half,
                queue,
                channel_budget: Arc::new(Semaphore::new(CHANNEL_BUFFER as usize)),
                connection: budget.clone(),
            },
            drain,
        )
    }

    /// Queues client data; waits only while this channel's (or the connection's) budget is
    /// spent. An error means the server's side of the channel is gone.
    pub async fn data_bytes(&self, data: impl Into<Bytes>) -> Result<(), russh::Error> {
        let data: Bytes = data.into();
        if data.is_empty() {
            return Ok(());
        }
        // A packet is at most the maximum packet size russh accepts (far below 4 MiB);
        // clamp anyway, so an oversized one waits for the whole budget instead of forever.
        let n = u32::try_from(data.len())
            .unwrap_or(u32::MAX)
            .min(CHANNEL_BUFFER);
        let gone = |_| russh::Error::SendError;
        let channel = match Arc::clone(&self.channel_budget).try_acquire_many_owned(n) {
            Ok(p) => p,
            Err(_) => {
                let _waiting = Waiting::new(&self.connection.0);
                Arc::clone(&self.channel_budget)
                    .acquire_many_owned(n)
                    .await
                    .map_err(gone)?
            }
        };
        let connection = self
            .connection
            .room(n.min(CONNECTION_BUFFER))
            .await
            .map_err(gone)?;
        self.send(Upward::Data(data, [channel, connection])).await
    }

    pub async fn eof(&self) -> Result<(), russh::Error> {
        self.send(Upward::Eof).await
    }

    pub async fn close(&self) -> Result<(), russh::Error> {
        self.send(Upward::Close).await
    }

    pub async fn window_change(
        &self,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
    ) -> Result<(), russh::Error> {
        self.send(Upward::WindowChange(
            col_width, row_height, pix_width, pix_height,
        ))
        .await
    }

    pub async fn signal(&self, signal: Sig) -> Result<(), russh::Error> {
        self.send(Upward::Signal(signal)).await
    }

    #[allow(
        clippy::too_many_arguments,
        reason = "mirrors russh's request_pty, one argument per field of the request"
    )]
    pub async fn request_pty(
        &self,
        want_reply: bool,
        term: &str,
        col_width: u32,
        row_height: u32,
        pix_width: u32,
        pix_height: u32,
        terminal_modes: &[(Pty, u32)],
    ) -> Result<(), russh::Error> {
        self.drained().await?;
        self.half
            .request_pty(
                want_reply,
                term,
                col_width,
                row_height,
                pix_width,
                pix_height,
                terminal_modes,
            )
            .await
    }

    pub async fn set_env(
        &self,
        want_reply: bool,
        name: &str,
        value: &str,
    ) -> Result<(), russh::Error> {
        self.drained().await?;
        self.half.set_env(want_reply, name, value).await
    }

    pub async fn request_shell(&self, want_reply: bool) -> Result<(), russh::Error> {
        self.drained().await?;
        self.half.request_shell(want_reply).await
    }

    pub async fn exec(&self, want_reply: bool, command: &[u8]) -> Result<(), russh::Error> {
        self.drained().await?;
        self.half.exec(want_reply, command).await
    }

    pub async fn request_subsystem(
        &self,
        want_reply: bool,
        name: &str,
    ) -> Result<(), russh::Error> {
        self.drained().await?;
        self.half.request_subsystem(want_reply, name).await
    }

    pub async fn agent_forward(&self, want_reply: bool) -> Result<(), russh::Error> {
        self.drained().await?;
        self.half.agent_forward(want_reply).await
    }

    async fn send(&self, msg: Upward) -> Result<(), russh::Error> {
        self.queue
            .send(msg)
            .await
            .map_err(|_| russh::Error::SendError)
    }

    /// Waits until everything queued so far has left.
    async fn drained(&self) -> Result<(), russh::Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Upward::Drained(tx)).await?;
        rx.await.map_err(|_| russh::Error::SendError)
    }
}

async fn drain(
    half: Arc<ChannelWriteHalf<client::Msg>>,
    mut queue: mpsc::Receiver<Upward>,
    sent: Option<Arc<AtomicU64>>,
) {
    while let Some(msg) = queue.recv().await {
        let result = match msg {
            Upward::Data(data, permits) => {
                let n = data.len() as u64;
                let r = half.data_bytes(data).await;
                drop(permits);
                if let (Ok(()), Some(sent)) = (&r, &sent) {
                    sent.fetch_add(n, Ordering::Relaxed);
                }
                r
            }
            Upward::Eof => half.eof().await,
            Upward::WindowChange(c, r, pw, ph) => half.window_change(c, r, pw, ph).await,
            Upward::Signal(signal) => half.signal(signal).await,
            Upward::Close => {
                let _ = half.close().await;
                return;
            }
            Upward::Drained(done) => {
                let _ = done.send(());
                Ok(())
            }
        };
        if result.is_err() {
            // The server's side is gone: what is still queued has nowhere to go.
            return;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, reason = "tests")]
mod tests {
    use std::time::Duration;

    use super::{ConnectionBudget, CONNECTION_BUFFER};

    #[tokio::test]
    async fn room_taken_at_once_never_marks_the_connection_waiting() {
        let budget = ConnectionBudget::new();
        let _all = budget.room(CONNECTION_BUFFER).await.unwrap();
        assert!(!budget.waiting());
        let seen = tokio::time::timeout(Duration::from_millis(50), budget.began_waiting()).await;
        assert!(seen.is_err(), "a wait that did not happen was announced");
    }

    #[tokio::test]
    async fn waiting_for_room_is_announced_until_the_room_comes() {
        let budget = ConnectionBudget::new();
        let all = budget.room(CONNECTION_BUFFER).await.unwrap();
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.room(1).await.map(drop) })
        };
        // A reader that started watching before the wait began learns of it.
        tokio::time::timeout(Duration::from_secs(5), budget.began_waiting())
            .await
            .expect("the wait for room was not announced");
        assert!(budget.waiting());
        drop(all);
        waiter.await.unwrap().unwrap();
        assert!(
            !budget.waiting(),
            "the connection stayed marked after the room came"
        );
    }

    #[tokio::test]
    async fn a_cancelled_wait_does_not_leave_the_connection_marked() {
        let budget = ConnectionBudget::new();
        let _all = budget.room(CONNECTION_BUFFER).await.unwrap();
        let gave_up = tokio::time::timeout(Duration::from_millis(20), budget.room(1)).await;
        assert!(gave_up.is_err());
        assert!(!budget.waiting());
    }
}
