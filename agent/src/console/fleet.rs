//! `portcullis console`: the console for a fleet, on a host of its own. It reads every
//! bastion's trail from the central store (`audit::central_read`) and decides approvals
//! through the fleet's approval log, with the same pages, sign-in and checks as the console
//! an agent serves for its own host.
//!
//! It proxies nothing and attaches nothing: its own trail (sign-ins, refusals, verdicts) is
//! written to its state directory and shipped to the central store like a bastion's, under
//! its own `audit.central.host_name`. Recordings stay on the bastion that made them, and an
//! open connection is ended on its bastion's console.

use std::sync::Arc;

use anyhow::Context;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::audit::central_read::{CentralTrail, FleetPage};
use crate::audit::query::{EventsPage, Filter, SessionFilter, SessionsPage};
use crate::audit::{AuditEvent, AuditLog, EventKind};
use crate::config::{Config, ProtectedTarget};

fn unreadable(e: &tokio_postgres::Error) -> String {
    format!(
        "the central audit store cannot be read: {}",
        crate::audit::with_sources(e)
    )
}

/// A sessions page of the fleet, in the local page's shape (its `seq` is the host's).
pub async fn sessions(
    trail: &CentralTrail,
    filter: &SessionFilter,
    host: Option<&str>,
    before: Option<u64>,
    limit: usize,
) -> Result<SessionsPage, String> {
    let (rows, page) = trail
        .sessions_page(filter, host, before, limit)
        .await
        .map_err(|e| unreadable(&e))?;
    Ok(SessionsPage {
        rows,
        scanned: (0, u64::try_from(page.scanned).unwrap_or(u64::MAX)),
        older: page.older,
    })
}

/// An audit search of the fleet, in the local page's shape. An export line is
/// `{"host": <bastion>, "seq": <its seq there>, "event": <the full event>}`: the event as the
/// bastion recorded it, named by the record it is.
pub async fn search(
    trail: &CentralTrail,
    filter: &Filter,
    host: Option<&str>,
    before: Option<u64>,
    limit: usize,
) -> Result<EventsPage, String> {
    let FleetPage {
        events,
        scanned,
        older,
    } = trail
        .events_page(filter, host, before, limit)
        .await
        .map_err(|e| unreadable(&e))?;
    let hosts = events.iter().map(|e| e.host.clone()).collect();
    Ok(EventsPage {
        events: events
            .into_iter()
            .map(|e| {
                let raw =
                    serde_json::json!({"host": e.host, "seq": e.seq, "event": e.event}).to_string();
                (e.seq, e.event, raw)
            })
            .collect(),
        scanned: (0, u64::try_from(scanned).unwrap_or(u64::MAX)),
        older,
        hosts,
    })
}

/// One session's timeline on `host`.
pub async fn session(
    trail: &CentralTrail,
    host: &str,
    id: u64,
    from: u64,
) -> Result<(Vec<serde_json::Value>, Vec<u64>), String> {
    trail
        .session_events(host, id, from)
        .await
        .map_err(|e| unreadable(&e))
}

/// Runs the fleet console until SIGTERM or SIGINT.
pub fn run(config: Config, targets: Vec<ProtectedTarget>) -> anyhow::Result<()> {
    let Some(central) = config.audit.central.clone() else {
        anyhow::bail!(
            "`portcullis console` reads the fleet's central audit store: configure [audit.central] \
             (its role needs portcullis_writer and portcullis_reader, docs/console.md)"
        );
    };
    if config.console().is_none() {
        anyhow::bail!(
            "`portcullis console` serves [console]: set its `listen`, `url` and `client_id`"
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let _enter = runtime.enter();
    let mark = crate::audit::central::own_mark(&config);
    let trail = runtime
        .block_on(CentralTrail::connect(&central, mark))
        .context("the fleet console's central audit store")?;
    let (audit, repairs) = AuditLog::open(
        &config.audit,
        &config.audit_dir(),
        config.audit_progress_paths(),
    )?;
    let audit = Arc::new(audit);
    for note in repairs {
        audit.record(AuditEvent::new(EventKind::AuditIntegrity).reason(note));
    }
    let policies = crate::policy::Policies::load(&config.policy.dir, Arc::clone(&audit))
        .map_err(anyhow::Error::msg)?;
    // No connection is proxied here: nothing for a grant's end to close.
    let registry = Arc::new(crate::admission::Registry::default());
    let (fleet, runner) = crate::approvals::fleet::Fleet::new(&central, mark);
    let approvals = crate::approvals::ApprovalStore::open(
        &config.state_dir.join("approvals"),
        Arc::clone(&audit),
        Arc::clone(&registry) as Arc<dyn crate::approvals::GrantEndListener>,
        crate::approvals::StoreOptions {
            break_glass_group: config.approvals.break_glass().map(str::to_owned),
            // The bastion a request was made on notifies; the console only decides.
            notifier: None,
            fleet: Some(fleet),
        },
    )?;
    let console = super::Console::prepare(
        &config,
        Arc::clone(&audit),
        Arc::clone(&approvals),
        registry,
        Arc::clone(&policies),
        Arc::new(targets),
        Some(Arc::new(trail)),
    )?
    .context("[console] is not configured")?;
    tracing::info!(url = console.url(), "fleet console on");
    let tasks = TaskTracker::new();
    let stop = CancellationToken::new();
    runtime.block_on(async {
        tasks.spawn(runner.run(Arc::clone(&approvals), stop.clone()));
        tasks.spawn(Arc::clone(&policies).watch(stop.clone()));
        crate::audit::central::start(&config, &audit, &tasks, stop.clone());
        let serving = tokio::spawn(console.serve(stop.clone()));
        wait_for_signal().await;
        stop.cancel();
        let _ = serving.await;
        tasks.close();
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tasks.wait()).await;
    });
    audit.flush();
    tracing::info!("fleet console stopped");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::error!("cannot install signal handlers; stopping");
        }
    }
}
