//! What the client sends on one channel, on its way to the server (RFC 4254 §5.2 flow
//! control): each channel has its own queue and its own task that waits for the server's
//! window, so one channel whose server does not read (a command that never reads stdin, a
//! forward whose destination stalls) cannot stall the others of a connection — with
//! ControlMaster that is every `ssh` the user runs.
//!
//! russh's server refills a channel's window as soon as a packet arrives, not when it was
//! consumed, so the client's window does not bound what waits here. The bound is ours: at
//! most [`CHANNEL_BUFFER`] bytes per channel and [`CONNECTION_BUFFER`] per connection wait
//! for a server. Past that the session loop waits for room, which holds the client back
//! through its window as it did before this queue existed; memory stays bounded either way.
//!
//! Order is kept: data, EOF, window changes, signals and close leave in the order the client
//! sent them, and a channel request (pty, env, shell, exec, subsystem, agent forwarding)
//! leaves only once everything queued before it has.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use russh::client;
use russh::{ChannelWriteHalf, Pty, Sig};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

/// Bytes of one channel that may wait for the server's window: twice russh's default window,
/// so a channel stalls only after the client sent a whole window more than the server read.
pub const CHANNEL_BUFFER: u32 = 4 << 20;
/// Bytes of all channels of one connection that may wait.
pub const CONNECTION_BUFFER: u32 = 16 << 20;
/// Non-data messages (EOF, window changes, signals) a channel may have queued; each is a few
/// bytes, the count bounds them.
const QUEUE_DEPTH: usize = 4096;

/// The byte budget all channels of one connection share.
#[derive(Clone)]
pub struct ConnectionBudget(Arc<Semaphore>);

impl ConnectionBudget {
    pub fn new() -> Self {
        Self(Arc::new(Semaphore::new(CONNECTION_BUFFER as usize)))
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
/// `ChannelWriteHalf`; what they send leaves in call order.
pub struct UpstreamWriter {
    half: Arc<ChannelWriteHalf<client::Msg>>,
    queue: mpsc::Sender<Upward>,
    channel_budget: Arc<Semaphore>,
    connection_budget: Arc<Semaphore>,
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
                connection_budget: Arc::clone(&budget.0),
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
        let channel = Arc::clone(&self.channel_budget)
            .acquire_many_owned(n)
            .await
            .map_err(gone)?;
        let connection = Arc::clone(&self.connection_budget)
            .acquire_many_owned(n.min(CONNECTION_BUFFER))
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
