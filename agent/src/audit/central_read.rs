//! Reading a fleet's audit trail back from the central store: the fleet console's sessions,
//! timelines, searches and health, and fleet access reviews.
//!
//! What a page shows is parsed from `event_text`, the bytes each row's hash covers; the
//! `event` column (jsonb) only helps SQL find rows. The same filters as the local store's
//! (`query::Filter`, `query::SessionFilter`) then decide what a page keeps, so a page means
//! the same on one host and on a fleet. SQL narrows the rows first (event type, time, host, target) and
//! walks indexes of schema version 3 newest first; every page reads at most
//! [`PAGE_SCAN_ROWS`] rows, so it costs the same with a million events as with a thousand.
//!
//! Pages are keyed by time: a page ends after all rows of its last millisecond, and the
//! next one starts before that millisecond, so no row is shown twice or skipped.

use serde_json::Value;
use tokio_postgres::Client;
use tokio_util::task::TaskTracker;

use super::central::{self, CentralError};
use super::query::{Filter, SessionFilter, SessionRow};
use crate::config::CentralConfig;

/// Rows one page reads at most before it stops (and says where the next one starts).
pub const PAGE_SCAN_ROWS: usize = 20_000;
/// Rows one query fetches while a page walks back.
const BATCH: i64 = 500;
/// Events one timeline holds at most.
const TIMELINE_ROWS: i64 = 20_000;

/// One event of the fleet's trail: the host that recorded it, its seq there, and the full
/// event (with its `host` member, as every event carries).
#[derive(Debug, Clone)]
pub struct FleetEvent {
    pub host: String,
    pub seq: u64,
    pub time_ms: u64,
    pub event: Value,
}

/// A page of events newest first, and where the next (older) page starts.
#[derive(Debug, Clone)]
pub struct FleetPage {
    pub events: Vec<FleetEvent>,
    /// Rows read for this page.
    pub scanned: usize,
    /// `before` (Unix ms) for the next page; `None` when the oldest row was reached.
    pub older: Option<u64>,
}

/// The last event each host shipped.
#[derive(Debug, Clone)]
pub struct HostLast {
    pub host: String,
    pub seq: u64,
    pub time_ms: u64,
    /// When the central store received it (Unix ms).
    pub received_ms: u64,
}

/// The fleet's trail as the central store holds it, read through one connection.
pub struct CentralTrail {
    client: Client,
    _tasks: TaskTracker,
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn to_u64(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

/// What SQL narrows a walk by, before the filter decides each row.
#[derive(Debug, Default)]
struct Narrow<'a> {
    /// An event type (`connection.opened`) or its family (`connection`), as
    /// `Filter::kind`; `connection.opened` alone is served by its partial index.
    kind: Option<&'a str>,
    host: Option<&'a str>,
    target: Option<&'a str>,
    since_ms: Option<u64>,
    until_ms: Option<u64>,
}

impl CentralTrail {
    /// Connects as `[audit.central]`'s role, which must also hold `portcullis_reader`.
    pub async fn connect(central: &CentralConfig, mark: Option<u32>) -> Result<Self, CentralError> {
        let tasks = TaskTracker::new();
        let client = central::connect_reader(central, &tasks, mark).await?;
        // Refused here, at start, rather than on the first page an auditor opens. The
        // agents' role may read `host`, `seq` and `hash`: the events are what it lacks.
        client
            .query(
                "SELECT event, event_text FROM portcullis_audit_events LIMIT 1",
                &[],
            )
            .await
            .map_err(|e| {
                CentralError::Config(format!(
                    "the role cannot read portcullis_audit_events ({}); grant it portcullis_reader",
                    super::with_sources(&e)
                ))
            })?;
        Ok(Self {
            client,
            _tasks: tasks,
        })
    }

    /// Rows newest first, at most `BATCH`, strictly older than `(time_ms, host, seq)`.
    async fn batch(
        &self,
        narrow: &Narrow<'_>,
        after: (i64, &str, i64),
    ) -> Result<Vec<FleetEvent>, tokio_postgres::Error> {
        // One statement for every combination: a NULL parameter leaves its condition out.
        // `event->>'event' = $1` matches the partial index's predicate only when written
        // as a literal, so the sessions walk has a statement of its own.
        let sql_opened = "SELECT host, seq, time_ms, event_text FROM portcullis_audit_events
             WHERE event->>'event' = 'connection.opened'
               AND (time_ms, host, seq) < ($1, $2, $3)
               AND ($4::text IS NULL OR host = $4)
               AND ($5::text IS NULL OR event->>'target' = $5)
               AND ($6::bigint IS NULL OR time_ms >= $6)
               AND ($7::bigint IS NULL OR time_ms <= $7)
             ORDER BY time_ms DESC, host DESC, seq DESC LIMIT $8";
        let sql_any = "SELECT host, seq, time_ms, event_text FROM portcullis_audit_events
             WHERE event IS NOT NULL
               AND (time_ms, host, seq) < ($1, $2, $3)
               AND ($4::text IS NULL OR host = $4)
               AND ($5::text IS NULL OR event->>'target' = $5)
               AND ($6::bigint IS NULL OR time_ms >= $6)
               AND ($7::bigint IS NULL OR time_ms <= $7)
               AND ($9::text IS NULL OR event->>'event' = $9
                    OR starts_with(event->>'event', $9 || '.'))
             ORDER BY time_ms DESC, host DESC, seq DESC LIMIT $8";
        let since = narrow.since_ms.map(to_i64);
        let until = narrow.until_ms.map(to_i64);
        let rows = if narrow.kind == Some("connection.opened") {
            self.client
                .query(
                    sql_opened,
                    &[
                        &after.0,
                        &after.1,
                        &after.2,
                        &narrow.host,
                        &narrow.target,
                        &since,
                        &until,
                        &BATCH,
                    ],
                )
                .await?
        } else {
            self.client
                .query(
                    sql_any,
                    &[
                        &after.0,
                        &after.1,
                        &after.2,
                        &narrow.host,
                        &narrow.target,
                        &since,
                        &until,
                        &BATCH,
                        &narrow.kind,
                    ],
                )
                .await?
        };
        let mut events = Vec::with_capacity(rows.len());
        for r in rows {
            events.extend(row_event(&r)?);
        }
        Ok(events)
    }

    /// Walks back from `before` (Unix ms; `None`: the newest), keeping what `keep` keeps,
    /// until `limit` are kept or [`PAGE_SCAN_ROWS`] are read; then to the end of the last
    /// millisecond read, so the next page can start before it.
    async fn walk(
        &self,
        narrow: &Narrow<'_>,
        before: Option<u64>,
        limit: usize,
        mut keep: impl FnMut(&FleetEvent) -> bool,
    ) -> Result<FleetPage, tokio_postgres::Error> {
        let mut at = (before.map_or(i64::MAX, to_i64), String::new(), 0i64);
        let mut events = Vec::new();
        let mut scanned = 0usize;
        let mut stop_after: Option<u64> = None;
        loop {
            let batch = self.batch(narrow, (at.0, &at.1, at.2)).await?;
            let ended = batch.len() < usize::try_from(BATCH).unwrap_or(usize::MAX);
            for e in batch {
                if stop_after.is_some_and(|t| e.time_ms != t) {
                    return Ok(FleetPage {
                        events,
                        scanned,
                        older: stop_after,
                    });
                }
                scanned += 1;
                at = (to_i64(e.time_ms), e.host.clone(), to_i64(e.seq));
                let time = e.time_ms;
                if keep(&e) {
                    events.push(e);
                }
                if stop_after.is_none() && (events.len() >= limit || scanned >= PAGE_SCAN_ROWS) {
                    stop_after = Some(time);
                }
            }
            if ended {
                return Ok(FleetPage {
                    events,
                    scanned,
                    older: None,
                });
            }
        }
    }

    /// The events `filter` keeps (and on `host`, when given), newest first.
    pub async fn events_page(
        &self,
        filter: &Filter,
        host: Option<&str>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<FleetPage, tokio_postgres::Error> {
        let narrow = Narrow {
            kind: filter.kind.as_deref(),
            host,
            target: filter.target.as_deref(),
            since_ms: filter.since_ms,
            until_ms: filter.until_ms,
        };
        self.walk(&narrow, before, limit, |e| {
            filter.matches(&e.event, &e.event.to_string())
        })
        .await
    }

    /// Sessions `filter` keeps (and on `host`, when given), newest first, each with its
    /// close when the store holds one.
    pub async fn sessions_page(
        &self,
        filter: &SessionFilter,
        host: Option<&str>,
        before: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<SessionRow>, FleetPage), tokio_postgres::Error> {
        let opened = Filter {
            user: filter.user.clone(),
            target: filter.target.clone(),
            kind: Some("connection.opened".into()),
            since_ms: filter.since_ms,
            until_ms: filter.until_ms,
            ..Filter::default()
        };
        let narrow = Narrow {
            kind: Some("connection.opened"),
            host,
            target: filter.target.as_deref(),
            since_ms: filter.since_ms,
            until_ms: filter.until_ms,
        };
        let mut page = self
            .walk(&narrow, before, limit, |e| {
                opened.matches(&e.event, "")
                    && filter
                        .protocol
                        .as_deref()
                        .is_none_or(|p| e.event.get("protocol").and_then(Value::as_str) == Some(p))
            })
            .await?;
        let mut sessions = Vec::with_capacity(page.events.len());
        for o in std::mem::take(&mut page.events) {
            let id = o
                .event
                .get("connection_id")
                .and_then(Value::as_u64)
                .unwrap_or(0)
                .to_string();
            if let Some(decision) = &filter.decision {
                let decided = self
                    .client
                    .query_opt(
                        "SELECT 1 FROM portcullis_audit_events
                         WHERE host = $1 AND event->>'connection_id' = $2 AND seq >= $3
                           AND event->>'decision' = $4 LIMIT 1",
                        &[&o.host, &id, &to_i64(o.seq), decision],
                    )
                    .await?;
                if decided.is_none() {
                    continue;
                }
            }
            let closed = self
                .client
                .query_opt(
                    "SELECT event_text FROM portcullis_audit_events
                     WHERE host = $1 AND event->>'connection_id' = $2 AND seq > $3
                       AND event->>'event' = 'connection.closed'
                     ORDER BY seq LIMIT 1",
                    &[&o.host, &id, &to_i64(o.seq)],
                )
                .await?
                .map(|r| r.try_get::<_, String>(0))
                .transpose()?
                .and_then(|text| serde_json::from_str(&text).ok());
            let restarted_ms: Vec<u64> = match closed {
                Some(_) => Vec::new(),
                None => self
                    .client
                    .query_opt(
                        "SELECT time_ms FROM portcullis_audit_events
                         WHERE host = $1 AND seq > $2 AND event->>'event' = 'agent.started'
                         ORDER BY seq LIMIT 1",
                        &[&o.host, &to_i64(o.seq)],
                    )
                    .await?
                    .map(|r| r.try_get::<_, i64>(0).map(to_u64))
                    .transpose()?
                    .into_iter()
                    .collect(),
            };
            let end = super::query::session_end(o.time_ms, closed.as_ref(), &restarted_ms);
            sessions.push(SessionRow {
                seq: o.seq,
                opened: o.event,
                closed,
                end,
                host: Some(o.host),
            });
        }
        Ok((sessions, page))
    }

    /// One session's events in order (what `sessions show` prints), from its
    /// `connection.opened` at `from` on `host`, and the times that host's agent started after.
    pub async fn session_events(
        &self,
        host: &str,
        connection_id: u64,
        from: u64,
    ) -> Result<(Vec<Value>, Vec<u64>), tokio_postgres::Error> {
        let rows = self
            .client
            .query(
                "SELECT event_text FROM portcullis_audit_events
                 WHERE host = $1 AND event->>'connection_id' = $2 AND seq >= $3
                 ORDER BY seq LIMIT $4",
                &[
                    &host,
                    &connection_id.to_string(),
                    &to_i64(from.max(1)),
                    &TIMELINE_ROWS,
                ],
            )
            .await?;
        let mut events = Vec::with_capacity(rows.len());
        for r in &rows {
            events.extend(serde_json::from_str::<Value>(&r.try_get::<_, String>(0)?).ok());
        }
        let starts = self
            .client
            .query(
                "SELECT time_ms FROM portcullis_audit_events
                 WHERE host = $1 AND seq > $2 AND event->>'event' = 'agent.started'
                 ORDER BY seq LIMIT 16",
                &[&host, &to_i64(from)],
            )
            .await?
            .iter()
            .map(|r| r.try_get::<_, i64>(0).map(to_u64))
            .collect::<Result<Vec<_>, _>>()?;
        Ok((events, starts))
    }

    /// The last event of every host, by host name: one index probe per host, not a scan.
    pub async fn hosts(&self) -> Result<Vec<HostLast>, tokio_postgres::Error> {
        let rows = self
            .client
            .query(
                "WITH RECURSIVE h(host) AS (
                     (SELECT host FROM portcullis_audit_events ORDER BY host LIMIT 1)
                     UNION ALL
                     SELECT (SELECT e.host FROM portcullis_audit_events e
                             WHERE e.host > h.host ORDER BY e.host LIMIT 1)
                     FROM h WHERE h.host IS NOT NULL
                 )
                 SELECT h.host, l.seq, l.time_ms,
                        (extract(epoch FROM l.received_at) * 1000)::bigint
                 FROM h CROSS JOIN LATERAL (
                     SELECT seq, time_ms, received_at FROM portcullis_audit_events e
                     WHERE e.host = h.host ORDER BY seq DESC LIMIT 1
                 ) l
                 WHERE h.host IS NOT NULL ORDER BY h.host",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(HostLast {
                    host: r.try_get(0)?,
                    seq: to_u64(r.try_get(1)?),
                    time_ms: to_u64(r.try_get(2)?),
                    received_ms: to_u64(r.try_get(3)?),
                })
            })
            .collect()
    }

    /// Every row `host` shipped, in seq order, as chain verification reads it; `each` sees
    /// them one at a time, so a host's trail is never all in memory as rows.
    pub async fn for_each_host_row(
        &self,
        host: &str,
        mut each: impl FnMut(central::CentralRow),
    ) -> Result<(), tokio_postgres::Error> {
        const PAGE: i64 = 5_000;
        let mut after: i64 = 0;
        loop {
            let rows = self
                .client
                .query(
                    "SELECT seq, time_ms, prev, hash, event_text FROM portcullis_audit_events
                     WHERE host = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    &[&host, &after, &PAGE],
                )
                .await?;
            let n = rows.len();
            for row in rows {
                let seq: i64 = row.try_get(0)?;
                after = seq;
                each(central::CentralRow {
                    seq: to_u64(seq),
                    time_ms: to_u64(row.try_get(1)?),
                    prev: row.try_get(2)?,
                    hash: row.try_get(3)?,
                    event_text: row.try_get(4)?,
                });
            }
            if n < usize::try_from(PAGE).unwrap_or(usize::MAX) {
                return Ok(());
            }
        }
    }
}

/// A row as an event, parsed from `event_text`: the bytes its hash covers, which a
/// bastion cannot make say something else than its chain does (the `event` column is only
/// how SQL finds rows). `None` for a row whose text is not JSON.
fn row_event(r: &tokio_postgres::Row) -> Result<Option<FleetEvent>, tokio_postgres::Error> {
    let text: String = r.try_get(3)?;
    Ok(serde_json::from_str(&text).ok().map(|event| FleetEvent {
        host: r.try_get(0).unwrap_or_default(),
        seq: to_u64(r.try_get(1).unwrap_or(0)),
        time_ms: to_u64(r.try_get(2).unwrap_or(0)),
        event,
    }))
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "a bench body: a failure is the bench failing"
)]
mod tests {
    use super::*;

    /// The fleet console's pages over a central store of 1,000,000 events (250,000 sessions
    /// of four events on four bastions; every tenth session has a denial): p50 and p99 of
    /// the newest sessions page, a page deep in the past, a filtered page, a timeline and
    /// the health page's hosts. `cargo xtask bench console` starts the PostgreSQL and names
    /// its superuser in `PORTCULLIS_BENCH_CENTRAL_ADMIN_URL` (password in
    /// `PORTCULLIS_BENCH_CENTRAL_ADMIN_PASSWORD_FILE`); this migrates it, fills it, and
    /// reads it as a role with `portcullis_reader` only.
    #[test]
    #[ignore = "a bench: cargo xtask bench console"]
    fn bench_fleet_pages_over_a_million_events() {
        let admin_url = std::env::var("PORTCULLIS_BENCH_CENTRAL_ADMIN_URL").unwrap();
        let admin_pw = std::env::var("PORTCULLIS_BENCH_CENTRAL_ADMIN_PASSWORD_FILE").unwrap();
        let files = tempfile::tempdir().unwrap();
        let reader_pw = files.path().join("reader.pw");
        std::fs::write(&reader_pw, "bench-reader-secret").unwrap();
        std::fs::set_permissions(
            &reader_pw,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        let reader_url = admin_url.replacen("postgres://postgres@", "postgres://bench_reader@", 1);
        let central: CentralConfig = toml::from_str(&format!(
            "url = \"{reader_url}\"\npassword_file = \"{}\"\ntls = \"disable\"\n",
            reader_pw.display()
        ))
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            central::migrate(&central, &admin_url, Some(std::path::Path::new(&admin_pw)))
                .await
                .unwrap();
            let mut config: tokio_postgres::Config = admin_url.parse().unwrap();
            config.password(std::fs::read_to_string(&admin_pw).unwrap().trim());
            let (admin, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(connection);
            let filled = std::time::Instant::now();
            admin
                .batch_execute(
                    "DO $$ BEGIN
                         IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'bench_reader') THEN
                             CREATE ROLE bench_reader LOGIN PASSWORD 'bench-reader-secret'
                                 IN ROLE portcullis_reader;
                         END IF;
                     END $$;
                     TRUNCATE portcullis_audit_events;
                     INSERT INTO portcullis_audit_events (host, seq, time_ms, prev, hash, event_text, event)
                     SELECT 'bastion-' || (i % 4), (i / 4) * 4 + k + 1, t, z, z, e::text, e
                     FROM generate_series(1, 250000) AS i, generate_series(0, 3) AS k,
                          LATERAL (SELECT 1790812800000::bigint + (i * 4 + k)::bigint * 1000 AS t,
                                          decode(repeat('00', 32), 'hex') AS z) AS c,
                          LATERAL (SELECT CASE k
                              WHEN 0 THEN jsonb_build_object('event', 'connection.opened', 'time_ms', t,
                                  'connection_id', i, 'protocol', 'postgres', 'target', 'db', 'host', 'vm',
                                  'identity', jsonb_build_object('user', 'user-' || (i % 50),
                                      'subject', 'user-' || (i % 50), 'uid', 1000 + i % 50))
                              WHEN 1 THEN jsonb_build_object('event', 'statement.executed', 'time_ms', t,
                                  'connection_id', i, 'decision', 'allow', 'statement', 'SELECT 1')
                              WHEN 2 THEN jsonb_build_object('event',
                                  CASE WHEN i % 10 = 0 THEN 'statement.denied' ELSE 'statement.executed' END,
                                  'time_ms', t, 'connection_id', i,
                                  'decision', CASE WHEN i % 10 = 0 THEN 'deny' ELSE 'allow' END,
                                  'statement', 'DELETE FROM t')
                              ELSE jsonb_build_object('event', 'connection.closed', 'time_ms', t,
                                  'connection_id', i, 'duration_ms', 3, 'bytes_client_to_upstream', 10,
                                  'bytes_upstream_to_client', 20, 'reason', 'client closed')
                          END AS e) AS ev;
                     ANALYZE portcullis_audit_events;",
                )
                .await
                .unwrap();
            println!(
                "filled 1,000,000 central events in {:.1} s",
                filled.elapsed().as_secs_f64()
            );
            let trail = CentralTrail::connect(&central, None).await.unwrap();
            let newest = trail.hosts().await.unwrap();
            assert_eq!(newest.len(), 4, "{newest:?}");
            let deep_ms = newest[0].time_ms.saturating_sub(900_000 * 1_000);
            let cases: [(&str, &str, SessionFilter, Option<u64>); 3] = [
                ("newest", "newest page", SessionFilter::default(), None),
                ("deep", "a page 900,000 events back", SessionFilter::default(), Some(deep_ms)),
                (
                    "filtered",
                    "one user's sessions with a denial",
                    SessionFilter {
                        user: Some("user-10".into()),
                        decision: Some("deny".into()),
                        ..SessionFilter::default()
                    },
                    None,
                ),
            ];
            let mut results: Vec<(String, String, Vec<f64>)> = Vec::new();
            for (key, name, filter, before) in cases {
                let mut ms = Vec::new();
                for _ in 0..41 {
                    let started = std::time::Instant::now();
                    let (rows, _) = trail.sessions_page(&filter, None, before, 50).await.unwrap();
                    assert!(!rows.is_empty(), "{key}");
                    ms.push(started.elapsed().as_secs_f64() * 1000.0);
                }
                results.push((key.into(), name.into(), ms));
            }
            let mut ms = Vec::new();
            for _ in 0..41 {
                let started = std::time::Instant::now();
                let (events, _) = trail.session_events("bastion-2", 125_002, 1).await.unwrap();
                assert_eq!(events.len(), 4, "{events:?}");
                ms.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            results.push(("timeline".into(), "one session's timeline".into(), ms));
            let mut ms = Vec::new();
            for _ in 0..41 {
                let started = std::time::Instant::now();
                assert_eq!(trail.hosts().await.unwrap().len(), 4);
                ms.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            results.push(("hosts".into(), "health: last event per host".into(), ms));
            for (key, name, ms) in results {
                crate::audit::print_latency_rows(
                    &format!("console.fleet_{key}"),
                    &format!("fleet console over 1,000,000 central events: {name}"),
                    ms,
                );
            }
        });
    }
}
