//! The client's start-up: SSLRequest answered `S` with a certificate from the local CA,
//! GSSENCRequest answered `N`, CancelRequest routed, then the StartupMessage. The client is
//! never asked for a password: once the identity and the connect policy allow the session,
//! the agent authenticates upstream with the target's credential and answers AuthenticationOk.
//!
//! Protocol: PostgreSQL docs, "Message Flow" → "Start-up", "SSL Session Encryption",
//! "Protocol versions" (NegotiateProtocolVersion).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use portcullis_pgwire::{
    decode_startup, encode_backend, encode_cancel, encode_error_response, BackendMessage,
    StartupMessage, StartupRequest, TransactionStatus,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::cancel::CancelTarget;
use super::error::PgError;
use super::params;
use super::pool;
use super::session;
use super::stream::{fill, write_out, Stream};
use super::upstream::{credential, establish};
use super::Shared;
use crate::admission::{Gate, Incoming, Opening, Refusal};
use crate::audit::Decision;
use crate::identity::Identity;

/// A client that has not finished its start-up by then is dropped.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

pub async fn run(
    gate: &Arc<Gate>,
    shared: &Shared,
    incoming: Incoming,
    client: TcpStream,
    identity: Result<Identity, crate::identity::ResolveError>,
) {
    if let Err(e) = client.set_nodelay(true) {
        tracing::debug!(error = %e, "TCP_NODELAY on the client socket");
    }
    let mut buf = BytesMut::new();
    let started = tokio::time::timeout(
        STARTUP_TIMEOUT,
        // Start-up and admission are boxed: their TLS handshakes and log-in are the largest
        // futures of a connection, and inline they would size its task for the whole session.
        Box::pin(client_startup(
            gate,
            shared,
            &incoming,
            Stream::Plain(client),
            &mut buf,
        )),
    )
    .await;
    let (mut client, startup) = match started {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::info!(error = %e, "PostgreSQL start-up failed");
            record(
                gate,
                &incoming,
                None,
                None,
                format!("start-up failed: {e}"),
                Decision::Error,
                Vec::new(),
            );
            return;
        }
        Err(_) => {
            record(
                gate,
                &incoming,
                None,
                None,
                "start-up timed out".into(),
                Decision::Error,
                Vec::new(),
            );
            return;
        }
    };
    let db_user = startup.user().unwrap_or_default().to_string();
    let db_name = startup.database().unwrap_or_default().to_string();
    let result = Box::pin(admit(
        gate,
        shared,
        &incoming,
        &mut client,
        &startup,
        identity,
    ))
    .await;
    let mut admitted = match result {
        Ok(a) => a,
        Err((e, _, None, _)) => {
            send_error(&mut client, &e).await;
            return;
        }
        Err((e, identity, Some(decision), policy_ids)) => {
            record(
                gate,
                &incoming,
                identity.as_ref(),
                Some((&db_user, &db_name)),
                e.to_string(),
                decision,
                policy_ids,
            );
            send_error(&mut client, &e).await;
            return;
        }
    };
    let Some(pg) = incoming.target.postgres.as_deref() else {
        return;
    };
    let kept = std::sync::Mutex::new(None);
    let pooled = admitted.pooled.take();
    let established = session::Established {
        gate,
        shared,
        conn: &admitted.open.conn,
        identity: &admitted.identity,
        target: &incoming.target,
        db_user: &db_user,
        db_name: &db_name,
        max_len: pg.max_message_bytes,
        replication: startup.is_replication(),
        interrupt: &admitted.interrupt,
        keep_server: pooled.as_ref().map(|_| &kept),
    };
    let end = session::run(established, client, buf, admitted.upstream).await;
    admitted.open.set_end(end);
    // The client's cancel key goes before its server session can be lent again.
    drop(admitted.cancel_key);
    drop(admitted.open);
    let kept = kept.into_inner().unwrap_or_else(|p| p.into_inner());
    if let (Some(p), Some(k)) = (pooled, kept) {
        let conn = super::upstream::Upstream {
            stream: k.stream,
            buf: k.buf,
            parameters: p.parameters,
            process_id: p.process_id,
            secret_key: p.secret_key,
        };
        let cancels = pool::cancels_finished(p.in_flight);
        shared.pools.give_back(p.slot, conn, k.end, cancels).await;
    }
}

/// What a session on a pooled target keeps to give its server session back.
struct PooledSession {
    slot: pool::Slot,
    parameters: Vec<(String, String)>,
    process_id: u32,
    secret_key: bytes::Bytes,
    /// The cancel map's token of this session (see `CancelTarget::in_flight`).
    in_flight: std::sync::Arc<()>,
}

/// The start of the client's side of a session: the protocol version agreed, and
/// AuthenticationOk (the agent authenticated the client by its identity, never a password).
fn auth_ok(startup: &StartupMessage, settings: &params::Checked, out: &mut BytesMut) {
    let unrecognized = settings.protocol_extensions.clone();
    if startup.minor > 0 || !unrecognized.is_empty() {
        encode_backend(
            &BackendMessage::NegotiateProtocolVersion {
                newest_minor: 0,
                unrecognized,
            },
            out,
        );
    }
    encode_backend(
        &BackendMessage::Authentication(portcullis_pgwire::Authentication::Ok),
        out,
    );
}

/// A connection a policy holds for approval, on a target that waits for it
/// (`wait_for_approval`): the client is told which request it waits for, then the
/// connection waits until the request is decided or expires. `Err(why)` when it is not
/// approved, or the client went meanwhile (the request is then withdrawn).
///
/// libpq accepts a NoticeResponse only once it was authenticated, so `prelude`
/// (AuthenticationOk, see [`auth_ok`]) goes first: it says the client is who it is, which
/// the agent knows from its identity; nothing reaches a server before the approval (there
/// is no server connection yet), and a refusal after it is a FATAL error libpq reports as
/// the connection's failure.
async fn wait_for_grant(
    gate: &Gate,
    client: &mut Stream,
    id: &str,
    refusal: &crate::policy::PolicyRefusal,
    prelude: BytesMut,
) -> Result<(), String> {
    let who = refusal
        .approval
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    let timeout = gate.policies().current().approval_settings().timeout;
    let mut notice = prelude;
    super::error::encode_approval_notice(
        format!(
            "this connection waits for approval: request {id} asks for {who}; it waits at most {} s",
            timeout.as_secs()
        ),
        id,
        &mut notice,
    );
    write_out(client, &notice)
        .await
        .map_err(|e| format!("client write failed: {e}"))?;
    let verdict = gate.approval_verdict(id, "the agent ended the connection while it waited");
    tokio::pin!(verdict);
    // A client in its start-up sends nothing until it is answered: whatever it does now
    // (closing, most likely) ends the wait.
    let mut byte = BytesMut::with_capacity(64);
    let read = tokio::select! {
        answer = &mut verdict => return answer,
        read = fill(client, &mut byte) => read,
    };
    let why = match read {
        Ok(0) => "the client closed the connection while it waited for approval".to_string(),
        Ok(_) => "the client sent a message while its connection waited for approval".into(),
        Err(e) => format!("client read failed while the connection waited for approval: {e}"),
    };
    gate.approvals().withdraw(id, &why);
    Err(why)
}

/// A session the server has accepted and the client has been told about.
struct Admitted<'s> {
    identity: Identity,
    open: crate::admission::OpenSession,
    upstream: super::upstream::Upstream,
    cancel_key: super::cancel::CancelKey<'s>,
    /// What a cancel of this session wakes (a statement waiting for approval).
    interrupt: std::sync::Arc<tokio::sync::Notify>,
    /// On a target with an upstream pool (and not a replication connection).
    pooled: Option<PooledSession>,
}

/// The error, the identity, the decision for the refusal event and the deciding policies.
/// No decision: a failure after `connection.opened` was written, whose
/// `connection.closed` tells the end.
type Refused = (PgError, Option<Identity>, Option<Decision>, Vec<String>);

/// Everything after the start-up packet: identity, policy, credential, upstream session,
/// the opened event and the client's AuthenticationOk.
async fn admit<'s>(
    gate: &Arc<Gate>,
    shared: &'s Shared,
    incoming: &Incoming,
    client: &mut Stream,
    startup: &StartupMessage,
    identity: Result<Identity, crate::identity::ResolveError>,
) -> Result<Admitted<'s>, Refused> {
    let identity = identity.map_err(|e| {
        (
            PgError::NoIdentity(e),
            None,
            Some(Decision::Error),
            Vec::new(),
        )
    })?;
    let fail = |e: PgError| (e, Some(identity.clone()), Some(Decision::Error), Vec::new());
    let (Some(db_user), Some(db_name)) = (startup.user(), startup.database()) else {
        return Err(fail(PgError::Protocol(
            "the start-up packet names no user".into(),
        )));
    };
    // Before policy and before the server: a setting off the list never reaches either.
    let settings = params::check(&startup.params).map_err(|e| {
        (
            e.into(),
            Some(identity.clone()),
            Some(Decision::Deny),
            Vec::new(),
        )
    })?;
    if let Some(reason) = gate.refusal_reason() {
        return Err(fail(PgError::Capacity(reason)));
    }
    let target = &incoming.target;
    let Some(pg) = target.postgres.as_deref() else {
        return Err(fail(PgError::Internal(
            "target without [target.postgres]".into(),
        )));
    };
    let mut request = crate::policy::connect_request(&identity, target, &incoming.origin);
    request.context.db_user = Some(db_user.to_string());
    request.context.db_name = Some(db_name.to_string());
    let refused = |r: crate::policy::PolicyRefusal| {
        (
            PgError::ConnectDenied {
                reason: r.reason,
                policy_ids: r.policy_ids.clone(),
            },
            Some(identity.clone()),
            Some(r.decision),
            r.policy_ids,
        )
    };
    // Whether the client already heard AuthenticationOk (a connection that waited).
    let mut told_ok = false;
    let policy_ids = match gate.decide_connect(&request) {
        Ok(allowed) => allowed.policy_ids,
        Err(r) => match r.request_id.clone() {
            Some(id) if target.wait_for_approval => {
                let mut prelude = BytesMut::new();
                auth_ok(startup, &settings, &mut prelude);
                told_ok = true;
                wait_for_grant(gate, client, &id, &r, prelude)
                    .await
                    .map_err(|why| refused(crate::policy::PolicyRefusal { reason: why, ..r }))?;
                // Approved: the grant it made now lets the connection through (decided
                // again, so a `forbid` added meanwhile still refuses it).
                gate.decide_connect(&request).map_err(refused)?.policy_ids
            }
            _ => return Err(refused(r)),
        },
    };
    if startup.is_replication() {
        // Decided on top of connect: permitting connect does not permit replication.
        request.action = portcullis_policy::Action::Replicate;
        gate.decide_connect(&request).map_err(|r| {
            refused(crate::policy::PolicyRefusal {
                decision: Decision::Deny,
                reason: format!(
                    "replication connections need a policy that permits action `replicate`: {}",
                    r.reason
                ),
                ..r
            })
        })?;
    }
    let password = credential(pg.credentials_file.get_ref(), db_user)
        .map_err(|e| fail(PgError::Upstream(e)))?;
    let upstream_addr = gate
        .upstream_addr(target, &incoming.origin)
        .map_err(|e| fail(PgError::Internal(e.to_string())))?;
    // The opened event's fsync and the server's start-up (TCP, TLS, SCRAM) overlap: both must
    // be done before the client hears AuthenticationOk, so nothing is forwarded unrecorded.
    let upstream_startup = upstream_startup(startup, &settings);
    // A replication connection's walsender cannot be reset: never pooled.
    let pool_config = pg
        .pool
        .as_ref()
        .filter(|_| !startup.is_replication())
        .map(|p| p.get_ref());
    let mut lent = None;
    let mut reused = None;
    if let Some(config) = pool_config {
        let key = pool::PoolKey {
            target_id: target.id,
            upstream: upstream_addr,
            startup: upstream_startup.params.clone(),
        };
        let borrowed = shared
            .pools
            .borrow(&key, config)
            .await
            .map_err(|e| fail(PgError::Capacity(e.to_string())))?;
        let (slot, conn) = borrowed.into_slot();
        lent = Some(slot);
        reused = conn;
    }
    let pooled_note = lent
        .as_ref()
        .map(|_| (reused.is_some(), reused.as_ref().map(|u| u.process_id)));
    let server = async {
        if let Some(conn) = reused {
            return Ok(conn);
        }
        let tcp = gate.connect_upstream(upstream_addr).await.map_err(|e| {
            super::upstream::UpstreamError::Io(std::io::Error::new(
                e.kind(),
                format!("upstream {upstream_addr} unreachable: {e}"),
            ))
        })?;
        establish(
            tcp,
            upstream_addr,
            pg,
            shared.upstream_tls(target.id),
            &upstream_startup,
            &password,
            pg.max_message_bytes,
        )
        .await
    };
    let opening = gate.open_upstream(
        Opening {
            incoming,
            identity: &identity,
            upstream: upstream_addr,
            policy_ids,
            db_user: Some(db_user.to_string()),
            db_name: Some(db_name.to_string()),
        },
        pooled_note,
    );
    let (open, upstream) = tokio::join!(opening, server);
    drop(password);
    let mut open = open.map_err(|e| fail(PgError::Open(e)))?;
    let upstream = match upstream {
        Ok(u) => u,
        Err(e) => {
            // Already recorded as opened: its closed event says why, instead of a refusal.
            let e = PgError::Upstream(e);
            open.set_end(e.to_string());
            return Err((e, Some(identity.clone()), None, Vec::new()));
        }
    };
    let interrupt = std::sync::Arc::new(tokio::sync::Notify::new());
    let in_flight = std::sync::Arc::new(());
    let cancel_key = match shared.cancels.register(CancelTarget {
        uid: incoming.origin.uid,
        target_id: target.id,
        upstream: upstream_addr,
        process_id: upstream.process_id,
        secret_key: upstream.secret_key.clone(),
        interrupt: std::sync::Arc::clone(&interrupt),
        in_flight: std::sync::Arc::clone(&in_flight),
    }) {
        Ok(k) => k,
        Err(_) => {
            let e = PgError::Internal("no randomness for the cancel key".into());
            open.set_end(e.to_string());
            return Err((e, Some(identity.clone()), None, Vec::new()));
        }
    };
    // The client's side of the start-up, now that the server has accepted the session.
    let mut out = BytesMut::new();
    if !told_ok {
        auth_ok(startup, &settings, &mut out);
    }
    for (name, value) in &upstream.parameters {
        encode_backend(
            &BackendMessage::ParameterStatus {
                name: name.clone(),
                value: value.clone(),
            },
            &mut out,
        );
    }
    encode_backend(
        &BackendMessage::BackendKeyData {
            process_id: cancel_key.process_id(),
            secret_key: bytes::Bytes::copy_from_slice(&cancel_key.secret_key()),
        },
        &mut out,
    );
    portcullis_pgwire::encode_ready_for_query(TransactionStatus::Idle, &mut out);
    if let Err(e) = write_out(client, &out).await {
        // The session loop sees the dead client at once and records how it ended.
        open.set_end(format!("client gone during start-up: {e}"));
    }
    let pooled = lent.map(|slot| PooledSession {
        slot,
        parameters: upstream.parameters.clone(),
        process_id: upstream.process_id,
        secret_key: upstream.secret_key.clone(),
        in_flight,
    });
    Ok(Admitted {
        identity,
        open,
        upstream,
        cancel_key,
        interrupt,
        pooled,
    })
}

/// What the agent sends the server, protocol 3.0: the same user and database, `replication`
/// once policy allowed it, and the checked settings, each as a parameter of its own (never
/// the client's `options` string, which the server would parse again).
fn upstream_startup(client: &StartupMessage, checked: &params::Checked) -> StartupMessage {
    let protocol = client
        .params
        .iter()
        .filter(|(k, _)| matches!(k.as_str(), "user" | "database" | "replication"))
        .cloned();
    let settings = checked
        .settings
        .iter()
        .map(|(name, value)| (name.to_string(), value.clone()));
    StartupMessage::new(protocol.chain(settings).collect())
}

/// Reads start-up requests until the StartupMessage; `None` when the connection was a
/// cancel or the client went away.
async fn client_startup(
    gate: &Gate,
    shared: &Shared,
    incoming: &Incoming,
    mut stream: Stream,
    buf: &mut BytesMut,
) -> Result<Option<(Stream, StartupMessage)>, PgError> {
    loop {
        let request = loop {
            match decode_startup(buf).map_err(|e| PgError::Protocol(e.to_string()))? {
                Some(r) => break r,
                None => {
                    let n = fill(&mut stream, buf)
                        .await
                        .map_err(|e| PgError::Protocol(e.to_string()))?;
                    if n == 0 {
                        return Ok(None);
                    }
                }
            }
        };
        match request {
            StartupRequest::SslRequest => {
                let Stream::Plain(mut tcp) = stream else {
                    return Err(PgError::Protocol("SSLRequest inside TLS".into()));
                };
                if !buf.is_empty() {
                    // Bytes sent after the SSLRequest before the answer would be outside
                    // the TLS session: a known injection vector (CVE-2021-23222), refused.
                    return Err(PgError::Protocol(
                        "data after SSLRequest before the answer".into(),
                    ));
                }
                let names = incoming
                    .target
                    .postgres
                    .as_ref()
                    .map(|p| p.server_names.clone())
                    .unwrap_or_default();
                let config = shared
                    .ca
                    .server_config(&names, &[incoming.origin.destination.ip()])
                    .map_err(|e| PgError::Internal(e.to_string()))?;
                tcp.write_all(b"S")
                    .await
                    .map_err(|e| PgError::Protocol(e.to_string()))?;
                let tls = tokio_rustls::TlsAcceptor::from(config)
                    .accept(tcp)
                    .await
                    .map_err(|e| PgError::Protocol(format!("TLS handshake: {e}")))?;
                stream = Stream::ServerTls(Box::new(tls));
            }
            StartupRequest::GssEncRequest => {
                stream
                    .write_all(b"N")
                    .await
                    .map_err(|e| PgError::Protocol(e.to_string()))?;
            }
            StartupRequest::Cancel {
                process_id,
                secret_key,
            } => {
                forward_cancel(gate, shared, incoming, process_id, &secret_key).await;
                return Ok(None);
            }
            StartupRequest::Startup(startup) => return Ok(Some((stream, startup))),
        }
    }
}

/// Sends the cancel upstream on a fresh connection when the key belongs to a session of the
/// same uid; otherwise drops it. Either way the client hears nothing, as from PostgreSQL.
async fn forward_cancel(
    gate: &Gate,
    shared: &Shared,
    incoming: &Incoming,
    process_id: u32,
    secret_key: &[u8],
) {
    let Some(t) = shared
        .cancels
        .lookup(incoming.origin.uid, process_id, secret_key)
    else {
        tracing::info!(
            uid = incoming.origin.uid,
            "dropped a cancel request with an unknown key or from another uid"
        );
        return;
    };
    if t.target_id != incoming.target.id {
        tracing::info!("dropped a cancel request aimed at another target");
        return;
    }
    // Only a wait in progress is woken (no permit is kept for a later one); the server gets
    // the cancel as well, for whatever it runs.
    t.interrupt.notify_waiters();
    match gate.connect_upstream(t.upstream).await {
        Ok(mut tcp) => {
            let mut out = BytesMut::new();
            encode_cancel(t.process_id, &t.secret_key, &mut out);
            if let Err(e) = tcp.write_all(&out).await {
                tracing::warn!(error = %e, "forwarding a cancel request");
            } else {
                tracing::info!(upstream = %t.upstream, "forwarded a cancel request");
                // The server closes the connection once it has signalled the backend; until
                // then `t` (its `in_flight` token) keeps a pooled backend from being lent.
                let mut sink = [0u8; 16];
                let _ = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Ok(n) = tokio::io::AsyncReadExt::read(&mut tcp, &mut sink).await {
                        if n == 0 {
                            break;
                        }
                    }
                })
                .await;
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, upstream = %t.upstream, "cannot forward a cancel request")
        }
    }
}

fn record(
    gate: &Gate,
    incoming: &Incoming,
    identity: Option<&Identity>,
    db: Option<(&str, &str)>,
    reason: String,
    decision: Decision,
    policy_ids: Vec<String>,
) {
    gate.record_refusal(Refusal {
        decision,
        policy_ids,
        db_user: db.map(|d| d.0),
        db_name: db.map(|d| d.1),
        ..Refusal::of(incoming, identity, reason)
    });
}

async fn send_error(client: &mut Stream, e: &PgError) {
    let mut out = BytesMut::new();
    encode_error_response(&e.to_fields(), &mut out);
    // Best effort: the client may already be gone.
    let _ = write_out(client, &out).await;
    let _ = client.shutdown().await;
}
