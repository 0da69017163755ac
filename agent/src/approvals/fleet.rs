//! Approvals across a fleet: with `[audit.central]` configured, requests, verdicts,
//! revocations and ends are rows of one append-only log in the central PostgreSQL
//! (`portcullis_approval_log`, schema version 2), and every agent applies the log's rows in
//! order ([`ApprovalStore::apply_logged`]) so an approver on any bastion decides a request
//! made on another. Agents learn of new rows by `LISTEN portcullis_approvals` (the insert
//! trigger notifies), and read again every few seconds in case a notification was lost.
//!
//! Fail closed: a verdict counts only once the log has it, so with the central store
//! unreachable nothing is approved and pending requests stay pending (they expire on time).
//! A request and a revocation take effect here at once and wait in a queue, retried in
//! order, until the log takes them.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{ApprovalStore, Change};
use crate::audit::central::{self, CentralError};
use crate::config::CentralConfig;

/// How often the log is read again without a notification.
const POLL: Duration = Duration::from_secs(5);
/// One write or read of the log that takes longer is treated as an outage.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a decider waits for the log: a write and a read back, within the 30 s the CLI
/// waits for the agent's answer, so the approver hears this agent's words, not a timeout.
const SUBMIT_TIMEOUT: Duration = Duration::from_secs(25);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// How far back a starting agent reads the log: longer than any request or grant lives
/// (grants last at most a day; decided requests are kept a week).
const HISTORY: &str = "8 days";
/// Rows read per query while catching up.
const PAGE: i64 = 1_000;
/// Serializes writers so that ids commit in order and a reader that saw id N never later
/// finds a smaller one.
const WRITE_LOCK: i64 = 7_135_680_542;

struct Queued {
    change: Change,
    /// A verdict's decider waits for the log's answer; other changes are retried until
    /// written.
    reply: Option<oneshot::Sender<Result<(), String>>>,
}

/// This agent's handle on the fleet's log.
pub struct Fleet {
    host: String,
    queue: mpsc::UnboundedSender<Queued>,
    /// Request ends already queued, so the sweep asks once.
    ending: Mutex<HashSet<String>>,
}

/// The task that writes the queue to the log and applies the log here.
pub struct FleetRunner {
    host: String,
    /// The exempt mark of the agent's own connections (`central::own_mark`).
    mark: Option<u32>,
    central: CentralConfig,
    queue: mpsc::UnboundedReceiver<Queued>,
}

impl Fleet {
    pub fn new(central: &CentralConfig, mark: Option<u32>) -> (Arc<Self>, FleetRunner) {
        let host = central::host_name(central);
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Arc::new(Self {
                host: host.clone(),
                queue: tx,
                ending: Mutex::new(HashSet::new()),
            }),
            FleetRunner {
                host,
                mark,
                central: central.clone(),
                queue: rx,
            },
        )
    }

    /// This bastion's name in the log (`[audit.central] host_name`, or the hostname).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Queues `change` for the log, retried in order until written.
    pub(super) fn enqueue(&self, change: Change) {
        let _ = self.queue.send(Queued {
            change,
            reply: None,
        });
    }

    /// Queues a request's end once per request.
    pub(super) fn end_once(&self, change: Change) {
        if let Change::End { request_id, .. } = &change {
            let mut ending = self.ending.lock().unwrap_or_else(|p| p.into_inner());
            if !ending.insert(request_id.clone()) {
                return;
            }
            // Bounded by the requests a book may hold; ids are random, so old ones can go.
            if ending.len() > 2 * super::MAX_RECORDS {
                ending.clear();
                ending.insert(request_id.clone());
            }
        }
        self.enqueue(change);
    }

    /// Writes `change` to the log and returns once this agent has applied the log up to it,
    /// or says why it could not be written. Only a write whose outcome is unknown (the store
    /// stopped answering mid-write) may still have been taken: the message says so.
    pub(super) async fn submit(&self, change: Change) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.queue
            .send(Queued {
                change,
                reply: Some(tx),
            })
            .map_err(|_| "the agent is stopping; nothing was decided".to_string())?;
        match tokio::time::timeout(SUBMIT_TIMEOUT, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err("the agent is stopping; nothing was decided".into()),
            Err(_) => Err(
                "the central approvals store did not answer in time; the decision may not have been recorded: check with `portcullis approvals show`"
                    .into(),
            ),
        }
    }
}

impl FleetRunner {
    /// Runs until `stop`: connects, catches up with the log, then writes what is queued and
    /// applies what others write, reconnecting with backoff after any failure.
    pub async fn run(mut self, store: Arc<ApprovalStore>, stop: CancellationToken) {
        let mut backlog: VecDeque<Change> = VecDeque::new();
        let mut last_id: i64 = 0;
        let mut caught_up = false;
        let mut backoff = BACKOFF_MIN;
        loop {
            let tasks = TaskTracker::new();
            let outcome = tokio::select! {
                () = stop.cancelled() => return,
                r = self.session(&store, &mut backlog, (&mut last_id, &mut caught_up), &tasks, &stop) => r,
            };
            tasks.close();
            let Err(e) = outcome else { return };
            tracing::warn!(error = %e, "central approvals store unreachable: verdicts wait, nothing is approved; retrying");
            // While away: deciders are told at once, other changes wait their turn.
            let sleep = tokio::time::sleep(backoff);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = &mut sleep => break,
                    q = self.queue.recv() => match q {
                        None => return,
                        Some(Queued { change, reply: Some(reply) }) => {
                            drop(change);
                            let _ = reply.send(Err(format!(
                                "the central approvals store is unreachable ({e}); nothing was decided"
                            )));
                        }
                        Some(Queued { change, reply: None }) => backlog.push_back(change),
                    },
                }
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// One connection's life; returns `Ok` only when the queue closed (the agent stops).
    async fn session(
        &mut self,
        store: &ApprovalStore,
        backlog: &mut VecDeque<Change>,
        (last_id, caught_up): (&mut i64, &mut bool),
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Result<(), CentralError> {
        let (mut client, mut notes) =
            timed(central::connect_listening(&self.central, tasks, self.mark)).await??;
        timed(central::check_schema(&client)).await??;
        timed(client.batch_execute("LISTEN portcullis_approvals")).await??;
        timed(pull(&client, store, last_id, *caught_up)).await??;
        if !*caught_up {
            store.caught_up();
            *caught_up = true;
        }
        tracing::info!(host = %self.host, upto = *last_id, "central approvals store: in step with the fleet");
        loop {
            while let Some(change) = backlog.front() {
                timed(insert(&mut client, &self.host, change)).await??;
                backlog.pop_front();
            }
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                q = self.queue.recv() => {
                    let Some(Queued { change, reply }) = q else { return Ok(()) };
                    let written = match timed(insert(&mut client, &self.host, &change)).await {
                        Ok(r) => r,
                        Err(e) => Err(e),
                    };
                    match written {
                        Ok(()) => {
                            let pulled = timed(pull(&client, store, last_id, true)).await;
                            if let Some(reply) = reply {
                                let _ = reply.send(match &pulled {
                                    Ok(Ok(())) => Ok(()),
                                    _ => Err("written to the central approvals store, but not read back yet: check with `portcullis approvals show`".into()),
                                });
                            }
                            pulled??;
                        }
                        Err(e) => {
                            match reply {
                                Some(reply) => {
                                    let _ = reply.send(Err(format!(
                                        "the central approvals store failed ({e}); the decision may not have been recorded: check with `portcullis approvals show`"
                                    )));
                                }
                                None => backlog.push_front(change),
                            }
                            return Err(e);
                        }
                    }
                }
                n = notes.recv() => {
                    if n.is_none() {
                        return Err(CentralError::Config("the listening connection ended".into()));
                    }
                    // Several notifications arrive for a burst; one read takes them all.
                    while notes.try_recv().is_ok() {}
                    timed(pull(&client, store, last_id, true)).await??;
                }
                () = tokio::time::sleep(POLL) => {
                    timed(pull(&client, store, last_id, true)).await??;
                }
            }
        }
    }
}

async fn timed<F: std::future::Future>(f: F) -> Result<F::Output, CentralError> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| CentralError::Timeout(CALL_TIMEOUT))
}

async fn insert(client: &mut Client, host: &str, change: &Change) -> Result<(), CentralError> {
    let text = serde_json::to_string(change)
        .map_err(|e| CentralError::Config(format!("an approval change did not serialize: {e}")))?;
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
        .await?;
    tx.execute(
        "INSERT INTO portcullis_approval_log (host, change) VALUES ($1, $2::text::jsonb)",
        &[&host, &text],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Applies every row after `last_id`, in order (`live`: see
/// [`ApprovalStore::apply_logged`]). A row this agent cannot read grants nothing: it is
/// logged and skipped.
async fn pull(
    client: &Client,
    store: &ApprovalStore,
    last_id: &mut i64,
    live: bool,
) -> Result<(), CentralError> {
    loop {
        let rows = client
            .query(
                &format!(
                    "SELECT id, change::text FROM portcullis_approval_log \
                     WHERE id > $1 AND at > now() - interval '{HISTORY}' ORDER BY id LIMIT $2"
                ),
                &[&*last_id, &PAGE],
            )
            .await?;
        let n = rows.len();
        for row in rows {
            let id: i64 = row.try_get(0)?;
            let text: String = row.try_get(1)?;
            match serde_json::from_str::<Change>(&text) {
                Ok(change) => store.apply_logged(change, live),
                Err(e) => {
                    tracing::error!(id, error = %e, "a row of the central approvals log cannot be read; it is skipped and grants nothing");
                }
            }
            *last_id = id;
        }
        if i64::try_from(n).unwrap_or(i64::MAX) < PAGE {
            return Ok(());
        }
    }
}
