//! Forwarded connections (RFC 4254 §7): `ssh -L`/`-W` (direct-tcpip), connections to an
//! `ssh -R` port (forwarded-tcpip) and agent channels (`ssh -A`) are bytes relayed between a
//! client channel and a server channel, with no terminal between them. Each is audited when
//! it ends, with what it moved each way: forwards tunnel around recording, so the trail must
//! at least say where they went and how much passed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use russh::{client, server, Channel, ChannelMsg};

use super::reader::Reader;
use super::writer::{ConnectionBudget, UpstreamWriter};
use crate::admission::Gate;
use crate::audit::{AuditEvent, Decision};

/// The `ssh.forward_closed` event of one forwarded connection, recorded when it drops, so
/// no way a relay ends forgets it.
pub struct ForwardLog {
    gate: Arc<Gate>,
    event: AuditEvent,
    from_client: Arc<AtomicU64>,
    to_client: AtomicU64,
}

impl ForwardLog {
    /// `event` is the connection's event for this channel (kind `ssh.forward_closed`,
    /// `forward` and `originator` filled in).
    pub fn new(gate: Arc<Gate>, event: AuditEvent) -> Self {
        Self {
            gate,
            event,
            from_client: Arc::new(AtomicU64::new(0)),
            to_client: AtomicU64::new(0),
        }
    }
}

impl Drop for ForwardLog {
    fn drop(&mut self) {
        let mut ev = self.event.clone();
        ev.time_ms = crate::audit::now_ms();
        ev.decision = Some(Decision::Allow);
        ev.bytes_client_to_upstream = Some(self.from_client.load(Ordering::Relaxed));
        ev.bytes_upstream_to_client = Some(self.to_client.load(Ordering::Relaxed));
        self.gate.audit().record(ev);
    }
}

/// Moves bytes both ways between the client's channel and the server's until both sides
/// closed. The client's bytes go through a bounded [`UpstreamWriter`], so a destination that
/// stops reading holds back this channel only; the server's through a [`Reader`].
/// `client` is the client-facing session, ended if the connection holds too much.
pub async fn relay(
    up: Channel<client::Msg>,
    down: Channel<server::Msg>,
    budget: ConnectionBudget,
    client: server::Handle,
    log: Option<ForwardLog>,
) {
    let (up_read, up_write) = up.split();
    let mut up_read = Reader::spawn(up_read, &budget, client);
    let (mut down_read, down_write) = down.split();
    let sent = log.as_ref().map(|l| Arc::clone(&l.from_client));
    let (writer, drain) = UpstreamWriter::new(up_write, &budget, sent);
    let upward = async move {
        while let Some(msg) = down_read.wait().await {
            let sent = match msg {
                ChannelMsg::Data { data } => writer.data_bytes(data).await,
                ChannelMsg::Eof => writer.eof().await,
                ChannelMsg::Close => break,
                _ => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = writer.close().await;
    };
    let downward = async {
        while let Some(msg) = up_read.wait().await {
            let sent = match msg {
                ChannelMsg::Data { data } => {
                    let n = data.len() as u64;
                    let r = down_write.data_bytes(data).await;
                    if let Some(log) = &log {
                        log.to_client.fetch_add(n, Ordering::Relaxed);
                    }
                    r
                }
                ChannelMsg::Eof => down_write.eof().await,
                ChannelMsg::Close => break,
                _ => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = down_write.close().await;
    };
    tokio::join!(upward, downward, drain);
    drop(log);
}
