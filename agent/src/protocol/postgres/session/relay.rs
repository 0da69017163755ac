//! The async glue around the session machine: owns both sockets, the idle timer, the
//! connection's cancel and its byte counters, reads the clock and the live policy set for
//! each input, runs the catalog lookups the machine waits for, hands its events to the audit
//! log and writes what it says to send. No protocol rule lives here.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use portcullis_pgwire::encode_error_response;
use tokio::io::AsyncWriteExt;

use super::super::catalog::{Catalog, ColumnName, Lookup, Routine};
use super::super::error::PgError;
use super::super::pool::{is_terminate, may_keep, SessionEnd};
use super::super::stream::{fill, release_if_drained, write_out, Stream};
use super::super::upstream::Upstream;
use super::super::Shared;
use super::{
    ApprovalAsk, CatalogLookup, CatalogView, Now, Output, Recorded, Services, Session,
    SessionContext,
};
use crate::admission::{Connection, Gate};
use crate::config::ProtectedTarget;
use crate::identity::Identity;

impl CatalogView for Catalog {
    fn column(&self, target_id: u32, db: &str, table_oid: u32, attnum: i16) -> Option<ColumnName> {
        Catalog::column(self, target_id, db, table_oid, attnum)
    }

    fn view_sources(
        &self,
        target_id: u32,
        db: &str,
        table_oid: u32,
    ) -> Option<Option<Arc<portcullis_sql::ResultSources>>> {
        Catalog::view_sources(self, target_id, db, table_oid)
    }

    fn function_names(&self, target_id: u32, db: &str, oid: u32) -> Option<Arc<[String]>> {
        Catalog::function_names(self, target_id, db, oid)
    }

    fn routines(
        &self,
        target_id: u32,
        db: &str,
        name: &str,
        max_age: Duration,
    ) -> Option<Arc<[Routine]>> {
        Catalog::routines(self, target_id, db, name, max_age)
    }

    fn is_fresh(&self, target_id: u32, db: &str, table_oid: u32) -> bool {
        Catalog::is_fresh(self, target_id, db, table_oid)
    }
}

fn now() -> Now {
    Now {
        unix_ms: crate::audit::now_ms(),
        monotonic: Instant::now(),
    }
}

/// The session's fixed context, from what start-up established.
pub struct Established<'a> {
    pub gate: &'a Gate,
    pub shared: &'a Shared,
    pub conn: &'a Connection,
    pub identity: &'a Identity,
    pub target: &'a ProtectedTarget,
    pub db_user: &'a str,
    pub db_name: &'a str,
    pub max_len: usize,
    pub replication: bool,
    /// Woken by the client's CancelRequest: a statement waiting for approval stops waiting.
    pub interrupt: &'a tokio::sync::Notify,
    /// The target pools server sessions: one the client left cleanly is handed back here,
    /// unclosed, with how the session ended (`pool::may_keep` decides).
    pub keep_server: Option<&'a std::sync::Mutex<Option<KeptServer>>>,
}

/// A server session the relay did not close, for the pool to reset and keep.
pub struct KeptServer {
    pub stream: Stream,
    pub buf: BytesMut,
    pub end: SessionEnd,
}

/// The end reason of a client that closed its side of the connection.
const CLIENT_CLOSED: &str = "client closed the connection";

/// Relays until either side ends; returns why, for `connection.closed`.
pub async fn run(
    est: Established<'_>,
    mut client: Stream,
    mut cbuf: BytesMut,
    upstream: Upstream,
) -> String {
    let Established {
        gate, shared, conn, ..
    } = est;
    let ctx = SessionContext {
        connection_id: conn.id,
        protocol: conn.protocol.name(),
        target_id: est.target.id,
        target_name: Arc::clone(&conn.target),
        target: crate::policy::target(est.target),
        principal: crate::policy::principal(est.identity),
        origin: Arc::clone(&conn.origin),
        identity: Arc::clone(&conn.identity),
        client_addr: conn.client.to_string().into(),
        upstream_addr: conn.upstream.to_string().into(),
        db_user: est.db_user.into(),
        db_name: est.db_name.into(),
        max_len: est.max_len,
        replication: est.replication,
    };
    let services = Services {
        classifier: &shared.classifier,
        catalog: &shared.catalog,
        maskers: &shared.maskers,
    };
    let mut machine = Session::new(services, ctx, gate.policies().current(), now());
    let Upstream {
        stream: mut server,
        buf: mut sbuf,
        ..
    } = upstream;
    let idle = Duration::from_secs(gate.config().proxy.idle_timeout_secs.max(1));
    let cancel = conn.cancel.clone();
    // Made once, not per message: a fresh cancellation future registers a waiter and a
    // fresh timer goes through the timer wheel, on every turn of a loop that runs twice
    // per statement. Traffic only moves `last_traffic`; the timer is re-armed from it
    // when it fires.
    let cancelled = cancel.cancelled();
    tokio::pin!(cancelled);
    let idle_timer = tokio::time::sleep(RELEASE_AFTER);
    tokio::pin!(idle_timer);
    let mut last_traffic = tokio::time::Instant::now();
    // Whether the buffers were given back since the last traffic (`RELEASE_AFTER`).
    let mut released = false;
    // Bytes that arrived with the start-up packet belong to the session.
    if !cbuf.is_empty() {
        machine.on_client(&mut cbuf, now(), &gate.policies().current());
    }
    let why = loop {
        // What the machine waits for from the catalog, before anything more is read.
        while let Some(lookup) = machine.output().lookup.take() {
            // Boxed, like the approval wait below: a side connection's log-in is a large
            // future, and inline it would make every session's task that large for its
            // whole life, idle or not.
            let answer = Box::pin(catalog_lookup(&est, &lookup)).await;
            machine.catalog_answer(answer, now());
            if !machine.is_paused() {
                machine.on_client(&mut cbuf, now(), &gate.policies().current());
                machine.on_server(&mut sbuf, now());
            }
        }
        let out = machine.output();
        record(gate, shared, out);
        if let Some(why) = out.end.take() {
            break why;
        }
        if !out.to_server.is_empty() {
            if let Err(e) = write_out(&mut server, &out.to_server).await {
                return format!("server write failed: {e}");
            }
            count(&conn.bytes.client_to_upstream, out.to_server.len());
            out.to_server.clear();
        }
        if !out.to_client.is_empty() {
            if let Err(e) = write_out(&mut client, &out.to_client).await {
                return format!("client write failed: {e}");
            }
            count(&conn.bytes.upstream_to_client, out.to_client.len());
            out.to_client.clear();
        }
        // A query string held for approval: the client is told (a NoticeResponse), the
        // statement waits unsent, and the session's loop serves nothing else meanwhile (every
        // other session goes on).
        if let Some(ask) = machine.output().approval.take() {
            let answer = tokio::select! {
                () = &mut cancelled => {
                    encode_error_response(
                        &PgError::ClosedByAgent.to_fields(),
                        &mut machine.output().to_client,
                    );
                    break "closed by the agent".into();
                }
                a = Box::pin(wait_for_approval(&est, ask, &mut client, &mut cbuf)) => a,
            };
            let answer = match answer {
                Ok(a) => a,
                Err(why) => break why,
            };
            last_traffic = tokio::time::Instant::now();
            machine.approval_answer(answer, now());
            if !machine.is_paused() {
                machine.on_client(&mut cbuf, now(), &gate.policies().current());
                machine.on_server(&mut sbuf, now());
            }
            continue;
        }
        tokio::select! {
            () = &mut cancelled => {
                encode_error_response(
                    &PgError::ClosedByAgent.to_fields(),
                    &mut machine.output().to_client,
                );
                break "closed by the agent".into();
            }
            () = &mut idle_timer => {
                // Idle means no traffic and nothing the server is still working on: a
                // long query is not an idle session.
                let now = tokio::time::Instant::now();
                if now < last_traffic + RELEASE_AFTER {
                    idle_timer.as_mut().reset(last_traffic + RELEASE_AFTER);
                    continue;
                }
                if !released {
                    release_buffers(&mut cbuf, &mut sbuf, machine.output());
                    released = true;
                }
                if now < last_traffic + idle {
                    idle_timer.as_mut().reset(last_traffic + idle);
                } else if machine.awaits_nothing() {
                    break "idle timeout".into();
                } else {
                    idle_timer.as_mut().reset(now + idle);
                }
            }
            // While the audit writer is behind, this session reads nothing more from its
            // client (what it would send queues more events); the event loop keeps
            // serving every other session meanwhile.
            r = async {
                gate.audit().room().await;
                fill(&mut client, &mut cbuf).await
            } => {
                last_traffic = tokio::time::Instant::now();
                if std::mem::take(&mut released) {
                    idle_timer.as_mut().reset(last_traffic + RELEASE_AFTER);
                }
                match r {
                    Err(e) => break format!("client read failed: {e}"),
                    Ok(0) => break CLIENT_CLOSED.into(),
                    Ok(_) => {
                        // Nothing more runs unaudited: the statement event of what the
                        // client sends now could not be written (`on_write_failure`).
                        if let Some(why) = gate.audit().write_refusal() {
                            encode_error_response(
                                &PgError::AuditUnwritable(why.clone()).to_fields(),
                                &mut machine.output().to_client,
                            );
                            break why;
                        }
                        machine.on_client(&mut cbuf, now(), &gate.policies().current());
                    }
                }
            }
            r = fill(&mut server, &mut sbuf) => {
                last_traffic = tokio::time::Instant::now();
                if std::mem::take(&mut released) {
                    idle_timer.as_mut().reset(last_traffic + RELEASE_AFTER);
                }
                match r {
                    Err(e) => break format!("server read failed: {e}"),
                    Ok(0) => break "the server closed the connection".into(),
                    Ok(_) => {
                        machine.on_server(&mut sbuf, now());
                    }
                }
            }
        }
    };
    record(gate, shared, machine.output());
    let kept = est
        .keep_server
        .and_then(|slot| Some(slot).zip(poolable_end(&mut machine, &why, &sbuf)));
    let out = machine.output();
    if kept.is_none() {
        if !out.to_server.is_empty() {
            let _ = write_out(&mut server, &out.to_server).await;
        }
        let _ = server.shutdown().await;
    }
    if !out.to_client.is_empty() {
        let _ = write_out(&mut client, &out.to_client).await;
    }
    let _ = client.shutdown().await;
    record(gate, shared, machine.end(&why, now()));
    if let Some((slot, end)) = kept {
        *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(KeptServer {
            stream: server,
            buf: sbuf,
            end,
        });
    }
    why
}

/// How the session ended, when its server session may be reset and kept; its Terminate,
/// the one message left for the server, is then not sent.
fn poolable_end(machine: &mut Session<'_>, why: &str, sbuf: &BytesMut) -> Option<SessionEnd> {
    let to_server = &mut machine.output().to_server;
    let end = SessionEnd {
        client_left: why == CLIENT_CLOSED || why == super::CLIENT_TERMINATED,
        drained: sbuf.is_empty() && (to_server.is_empty() || is_terminate(to_server)),
        transaction: machine.transaction_status(),
        awaits_nothing: machine.awaits_nothing() && !machine.is_paused(),
    };
    if let Err(why) = may_keep(&end) {
        tracing::info!(reason = why, "server session closed, not kept in the pool");
        return None;
    }
    machine.output().to_server.clear();
    Some(end)
}

/// A session quiet this long gives its buffers back: one that waits (for hours, maybe, and
/// 10,000 of them) holds none, what its next read brings is allocated then, and a busy
/// session keeps its own, so its statements allocate no buffer each.
const RELEASE_AFTER: Duration = Duration::from_secs(1);

fn release_buffers(cbuf: &mut BytesMut, sbuf: &mut BytesMut, out: &mut Output) {
    release_if_drained(cbuf);
    release_if_drained(sbuf);
    release_if_drained(&mut out.to_server);
    release_if_drained(&mut out.to_client);
}

fn count(counter: &std::sync::atomic::AtomicU64, n: usize) {
    counter.fetch_add(n as u64, Ordering::Relaxed);
}

/// Hands the machine's events to the audit log, in order, and forgets function bodies when
/// it says a change to them ended.
fn record(gate: &Gate, shared: &Shared, out: &mut Output) {
    for event in out.events.drain(..) {
        match event {
            Recorded::Event(e) => gate.audit().record(*e),
            Recorded::Encoded(line) => gate.audit().record_encoded(line),
        }
    }
    if std::mem::take(&mut out.forget_routines) {
        shared.catalog.forget_routines();
    }
}

/// Reads what `lookup` asks from the catalog, over a side connection as the session's role
/// (an idle one of the pool, else a new one), into the shared cache.
async fn catalog_lookup(est: &Established<'_>, lookup: &CatalogLookup) -> Result<(), String> {
    let lookup = match lookup {
        CatalogLookup::Tables(oids) => Lookup::Tables(oids),
        CatalogLookup::Functions(oids) => Lookup::Functions(oids),
        CatalogLookup::Routines(names) => Lookup::Routines(names),
    };
    let pg = est
        .target
        .postgres
        .as_deref()
        .ok_or_else(|| "no PostgreSQL settings".to_string())?;
    let password = super::super::upstream::credential(pg.credentials_file.get_ref(), est.db_user)
        .map_err(|e| e.to_string())?;
    est.shared
        .catalog
        .fetch_connecting(
            est.gate.connect_upstream(est.conn.upstream),
            est.conn.upstream,
            est.target.id,
            pg,
            est.shared.upstream_tls(est.target.id),
            est.db_name,
            est.db_user,
            &password,
            lookup,
        )
        .await
}

/// Makes the approval request for a query string held for approval, tells the client which
/// and how to follow it, and waits until it is approved (`Ok(Ok(request id))`), or denied or
/// expired (`Ok(Err(why))`). `Err(why the session ends)` when the client goes away or cannot
/// be written to. What the client sends meanwhile stays in `cbuf`, unread by the machine (up
/// to one message's worth; then nothing more is read until the answer).
async fn wait_for_approval(
    est: &Established<'_>,
    ask: ApprovalAsk,
    client: &mut Stream,
    cbuf: &mut BytesMut,
) -> Result<Result<String, String>, String> {
    use crate::approvals::{Ask, Asked};
    let store = est.gate.approvals();
    let timeout = est.gate.policies().current().approval_settings().timeout;
    let requirement = ask.requirement.to_string();
    let made = store.ask(Ask {
        requester: est.identity.clone(),
        asked: Asked::Statement {
            connection_id: est.conn.id,
            target: est.target.name.clone(),
            statement: ask.statement,
            parameters: ask.parameters,
        },
        reason: format!(
            "a statement of {} in a session as {} on {}",
            est.conn.origin.comm, est.db_user, est.target.name
        ),
        requirement: ask.requirement,
        policy_ids: ask.policy_ids,
        timeout,
    });
    let request = match made {
        Ok(r) => r,
        Err(e) => {
            return Ok(Err(format!(
                "approval required, and no request could be made: {e} ({})",
                ask.reason
            )));
        }
    };
    let id = request.id.clone();
    let mut notice = BytesMut::new();
    super::super::error::encode_approval_notice(
        format!(
            "this statement waits for approval: request {id} asks for {requirement}; it has not been sent to the server and waits at most {} s",
            timeout.as_secs()
        ),
        &id,
        &mut notice,
    );
    write_out(client, &notice)
        .await
        .map_err(|e| format!("client write failed: {e}"))?;
    // However this wait ends without a verdict, the request must not outlive it: withdrawn
    // when the agent ends the session (revocation, logout, shutdown) as much as when the
    // client goes (`approval_verdict` withdraws it when dropped).
    let verdict = est
        .gate
        .approval_verdict(&id, "the session ended while the statement waited");
    tokio::pin!(verdict);
    loop {
        let room = cbuf.len() < est.max_len;
        tokio::select! {
            answer = &mut verdict => return Ok(answer.map(|()| id.clone())),
            read = fill(client, cbuf), if room => match read {
                Ok(0) => {
                    store.withdraw(&id, "the client closed the connection while the statement waited");
                    return Err("client closed the connection while a statement waited for approval".into());
                }
                Err(e) => {
                    store.withdraw(&id, "the client's connection failed while the statement waited");
                    return Err(format!("client read failed: {e}"));
                }
                Ok(_) => {}
            },
            () = est.interrupt.notified() => {
                store.withdraw(&id, "the client canceled the statement while it waited");
                return Ok(Err(format!(
                    "canceled by the client while waiting for approval request {id}; the request is withdrawn"
                )));
            }
        }
    }
}
