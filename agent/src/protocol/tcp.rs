//! Plain TCP: forward bytes both ways with backpressure (a write completes before the
//! next read), pass half-closes through, and close on idle or on shutdown.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::admission::{Gate, Incoming, OpenError, Opening, Refusal};
use crate::audit::Decision;
use portcullis_core::ByteCounters;

const BUFFER: usize = 64 * 1024;

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
    let upstream = match gate.connect_upstream(upstream_addr).await {
        Ok(s) => s,
        Err(e) => {
            refuse(format!("upstream {upstream_addr} unreachable: {e}"));
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
    let mut open = match gate.open(opening).await {
        Ok(open) => open,
        // Not recorded, so not forwarded; `open` logged why (nothing can be recorded).
        Err(OpenError::Unrecorded(_)) => return,
        Err(e) => {
            refuse(e.to_string());
            return;
        }
    };
    let idle = Duration::from_secs(gate.config().proxy.idle_timeout_secs);
    let conn = std::sync::Arc::clone(&open.conn);
    let end = forward(client, upstream, &conn.bytes, idle, conn.cancel.clone()).await;
    open.set_end(end.to_string());
}

/// Forwards bytes both ways until both sides close, the connection idles, or `shutdown`.
pub async fn forward(
    client: TcpStream,
    upstream: TcpStream,
    bytes: &ByteCounters,
    idle: Duration,
    shutdown: CancellationToken,
) -> End {
    let started = Instant::now();
    let last_activity = AtomicU64::new(0);
    let (mut cr, mut cw) = client.into_split();
    let (mut ur, mut uw) = upstream.into_split();
    let both = async {
        tokio::try_join!(
            pump(
                &mut cr,
                &mut uw,
                &bytes.client_to_upstream,
                &last_activity,
                started
            ),
            pump(
                &mut ur,
                &mut cw,
                &bytes.upstream_to_client,
                &last_activity,
                started
            ),
        )
    };
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

/// Copies one direction until EOF, then half-closes the other side's write half.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    counter: &AtomicU64,
    last_activity: &AtomicU64,
    started: Instant,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            // Pass the half-close on: the peer may still answer.
            to.shutdown().await?;
            return Ok(());
        }
        let chunk = buf.get(..n).unwrap_or_default();
        to.write_all(chunk).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
        let now = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        last_activity.store(now, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        (a, b)
    }

    #[tokio::test]
    async fn forwards_both_ways_and_passes_half_close() {
        let (mut client, proxy_client_side) = pair().await;
        let (proxy_upstream_side, mut server) = pair().await;
        let bytes = ByteCounters::default();
        let token = CancellationToken::new();
        let fwd = forward(
            proxy_client_side,
            proxy_upstream_side,
            &bytes,
            Duration::from_secs(30),
            token,
        );
        let io = async {
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
        };
        let (end, ()) = tokio::join!(fwd, io);
        assert!(matches!(end, End::Closed), "{end}");
        assert_eq!(bytes.client_to_upstream.load(Ordering::Relaxed), 5);
        assert_eq!(bytes.upstream_to_client.load(Ordering::Relaxed), 6);
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
