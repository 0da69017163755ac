//! What the server sends on one channel, on its way to the client, read ahead of the client
//! when it must be.
//!
//! A channel's relay normally reads the server only as fast as the client takes the bytes:
//! past a small allowance ([`AHEAD`]) it stops, russh's buffer between the upstream session
//! loop and the relay fills, and that loop waits, which holds the server back. But the
//! upstream loop is also the one that reads the server's window adjusts, which let the
//! client's queued data leave (see [`super::writer`]); and the client's session loop, waiting
//! for room for that data, is the one that reads the client's window adjusts the relay waits
//! for. A command that reads and writes at once (`tee`, `cat`) ties the two waits into a knot
//! that never comes undone. So while client data of the connection waits for room, the
//! readers go on reading their servers into memory past the allowance, until that data
//! moves. The knot runs through the session loops, which serve every channel of the
//! connection, so one channel's waiting input releases every channel's reader.
//!
//! Memory stays bounded: a connection holds at most [`OVERFLOW_LIMIT`] read ahead. Only a
//! client that keeps sending input while not reading what comes back (the server echoes it
//! and nobody takes it) gets there; the connection is ended with the reason, in the
//! disconnect the client prints and in `connection.closed`.

use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use russh::{server, ChannelMsg, ChannelReadHalf, Disconnect};
use tokio::sync::{mpsc, Notify};

use super::writer::ConnectionBudget;

/// Bytes one channel reads ahead of its client while nothing of the connection waits.
pub const AHEAD: u64 = 256 << 10;
/// Bytes one connection may hold read ahead, all channels together.
pub const OVERFLOW_LIMIT: u64 = 64 << 20;

/// Why a connection that reached [`OVERFLOW_LIMIT`] was ended.
pub fn overflow_reason() -> String {
    format!(
        "the server's output waiting for this client passed {} MiB while the client kept \
         sending input without reading it; the connection was ended to bound the agent's memory",
        OVERFLOW_LIMIT >> 20
    )
}

/// Ends the connection a reader belongs to, when it holds too much.
async fn end(client: &server::Handle, budget: &ConnectionBudget) {
    let why = overflow_reason();
    tracing::warn!("SSH connection ended: {why}");
    // `connection.closed` takes its reason from the budget (see `session.rs`).
    budget.set_ended(why.clone());
    let _ = client
        .disconnect(
            Disconnect::ByApplication,
            format!("portcullis: {why}"),
            String::new(),
        )
        .await;
}

/// One message read from the server and the bytes it counts for.
struct Item(ChannelMsg, u64);

/// What one channel holds read ahead.
struct Ahead {
    bytes: AtomicU64,
    /// Woken when the relay takes a message.
    taken: Notify,
}

/// The server's side of one channel, as the relay reads it: messages in the server's order.
pub struct Reader {
    items: mpsc::UnboundedReceiver<Item>,
    ahead: Arc<Ahead>,
    budget: ConnectionBudget,
    task: tokio::task::AbortHandle,
}

impl Reader {
    /// Starts reading `from`; `client` is the connection's client-facing session, ended if
    /// the connection holds too much.
    pub fn spawn(from: ChannelReadHalf, budget: &ConnectionBudget, client: server::Handle) -> Self {
        let (tx, items) = mpsc::unbounded_channel();
        let ahead = Arc::new(Ahead {
            bytes: AtomicU64::new(0),
            taken: Notify::new(),
        });
        let task =
            tokio::spawn(read(from, tx, Arc::clone(&ahead), budget.clone(), client)).abort_handle();
        Self {
            items,
            ahead,
            budget: budget.clone(),
            task,
        }
    }

    /// The next message of the server, or `None` once its side of the channel ended (or
    /// the connection was ended for holding too much).
    pub async fn wait(&mut self) -> Option<ChannelMsg> {
        let Item(msg, n) = self.items.recv().await?;
        self.give_back(n);
        self.ahead.taken.notify_waiters();
        Some(msg)
    }

    fn give_back(&self, n: u64) {
        self.ahead.bytes.fetch_sub(n, Ordering::SeqCst);
        self.budget.remove_read_ahead(n);
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.task.abort();
        self.items.close();
        while let Ok(Item(_, n)) = self.items.try_recv() {
            self.give_back(n);
        }
    }
}

async fn read(
    mut from: ChannelReadHalf,
    tx: mpsc::UnboundedSender<Item>,
    ahead: Arc<Ahead>,
    budget: ConnectionBudget,
    client: server::Handle,
) {
    loop {
        // Read on while under the allowance, or while client data waits for room.
        loop {
            let mut taken = pin!(ahead.taken.notified());
            taken.as_mut().enable();
            if ahead.bytes.load(Ordering::SeqCst) < AHEAD || budget.waiting() {
                break;
            }
            tokio::select! {
                () = taken => {}
                () = budget.began_waiting() => {}
            }
        }
        let Some(msg) = from.wait().await else { return };
        let n = match &msg {
            ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => data.len() as u64,
            _ => 0,
        };
        ahead.bytes.fetch_add(n, Ordering::SeqCst);
        let total = budget.add_read_ahead(n);
        let give_back = || {
            ahead.bytes.fetch_sub(n, Ordering::SeqCst);
            budget.remove_read_ahead(n);
        };
        if total > OVERFLOW_LIMIT {
            give_back();
            // Dropping `tx` ends the relay's side once it took what was read before.
            return end(&client, &budget).await;
        }
        if tx.send(Item(msg, n)).is_err() {
            give_back();
            return;
        }
    }
}
