//! `portcullis agent`: start-up checks, enforcement, proxy, control socket, and the
//! drain on SIGTERM. Start-up order is what makes it fail closed: listeners are bound
//! before the programs redirect anything, and READY=1 is sent only once they are attached.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;

use crate::audit::{AuditEvent, AuditLog, EventKind};
use crate::config::Config;
use crate::control::{self, ControlState};
use crate::ebpf::{self, Enforcement};
use crate::identity::IdentityService;
use crate::proxy::{self, Proxy};

pub fn run(
    config: Config,
    targets: Vec<crate::config::ProtectedTarget>,
    source: &Path,
) -> anyhow::Result<()> {
    let cgroup_root = ebpf::preflight(&config)?;
    let cgroup = ebpf::attach_cgroup(&config, &cgroup_root)?;

    // Event loops of one thread each: a connection's wake-ups stay on its thread (a
    // work-stealing pool spent more CPU waking its own workers than proxying, see
    // docs/postgres.md). This thread runs the first; `proxy.threads` - 1 more are started.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let _enter = runtime.enter();
    let loops = EventLoops::start(config.proxy.proxy_threads())?;

    // Bound before anything is redirected to them.
    let listeners = proxy::bind_listeners(&config)?;
    let host_netns = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").context("probe socket")?;
        crate::sys::netns_cookie(std::os::fd::AsFd::as_fd(&probe)).context(
            "reading the host network namespace cookie (SO_NETNS_COOKIE needs Linux 5.14)",
        )?
    };
    let (audit, repairs) = AuditLog::open(
        &config.audit,
        &config.audit_dir(),
        config.audit_progress_paths(),
    )?;
    let audit = Arc::new(audit);
    for note in repairs {
        tracing::warn!(%note, "the audit store was repaired at start");
        audit.record(AuditEvent::new(EventKind::AuditIntegrity).reason(note));
    }
    // Everything that can be wrong with the configuration is found before the programs are
    // attached, so a bad start leaves the previous enforcement (or none) as it was.
    let policies = crate::policy::Policies::load(&config.policy.dir, Arc::clone(&audit))
        .map_err(anyhow::Error::msg)?;
    let postgres = crate::protocol::postgres::Shared::new(&config, &targets)
        .context("preparing the PostgreSQL targets")?
        .map(Arc::new);
    let postgres_pools = postgres.clone();
    let ssh = crate::protocol::ssh::Shared::new(&config, &targets, Arc::clone(&audit))
        .context("preparing the SSH targets")?
        .map(Arc::new);
    // A target's host is resolved before anything is attached: a name that resolves to
    // nothing would protect nothing.
    let resolved = Arc::new(crate::dns::ResolvedHosts::default());
    let dns = if targets.iter().any(|t| t.host.is_some()) {
        let resolver = crate::dns::HostResolver::new(&config.dns)?;
        let schedule = runtime.block_on(crate::dns::resolve_all(&resolver, &targets, &resolved))?;
        Some((resolver, schedule))
    } else {
        None
    };
    crate::listeners::warn_about_unprotected_listeners(&targets, &resolved);
    let (enforcement, logger) = Enforcement::attach(
        &config,
        &targets,
        Arc::clone(&resolved),
        &cgroup,
        host_netns,
    )?;
    tracing::info!(
        config = %source.display(),
        cgroup = %cgroup.display(),
        pins = %enforcement.pin_dir.display(),
        targets = targets.len(),
        "enforcement attached"
    );

    let registry = Arc::new(crate::admission::Registry::default());
    let limiter = crate::limits::Limiter::new(config.limits.clone());
    let identity = IdentityService::new(
        &config,
        &cgroup_root,
        Arc::clone(&audit),
        Arc::clone(&registry) as Arc<dyn crate::identity::SessionEndListener>,
        Arc::clone(&limiter),
    )?;
    if config.identity.issuer.is_none()
        && config.identity.trusted_issuers.is_empty()
        && !config.insecure.unix_identity_only
    {
        tracing::warn!(
            "no identity provider is configured: every protected connection will be refused"
        );
    }
    // At every start, so a lab setting left on a bastion shows in its log (and in `status`).
    if config.insecure.unix_identity_only {
        tracing::warn!(
            setting = "insecure.unix_identity_only",
            "INSECURE: connections are attributed to the Unix account alone, without any login; never set this on a bastion"
        );
    }
    if config.insecure.allow_plaintext_loopback {
        tracing::warn!(
            setting = "insecure.allow_plaintext_loopback",
            "INSECURE: the issuer and audit shipping may use plaintext on loopback, where a local user who binds the port first can pose as them"
        );
    }
    let (notifier, notifications) = crate::approvals::notify::Notifier::start(
        &config.approvals,
        config.insecure.allow_plaintext_loopback,
        &audit,
        crate::approvals::notify::Backoff::default(),
    )?;
    if let Some(group) = config.approvals.break_glass() {
        tracing::info!(group, "break-glass is on: members of the group may approve their own requests, with a reason, alerted and audited");
    }
    let (fleet, fleet_runner) = match &config.audit.central {
        Some(central) => {
            let (fleet, runner) = crate::approvals::fleet::Fleet::new(
                central,
                crate::audit::central::own_mark(&config),
            );
            (Some(fleet), Some(runner))
        }
        None => (None, None),
    };
    let approvals = crate::approvals::ApprovalStore::open(
        &config.state_dir.join("approvals"),
        Arc::clone(&audit),
        Arc::clone(&registry) as Arc<dyn crate::approvals::GrantEndListener>,
        crate::approvals::StoreOptions {
            break_glass_group: config.approvals.break_glass().map(str::to_owned),
            notifier: Some(notifier),
            fleet,
        },
    )?;
    let targets = Arc::new(targets);
    let console = crate::console::Console::prepare(
        &config,
        Arc::clone(&audit),
        Arc::clone(&approvals),
        Arc::clone(&registry),
        Arc::clone(&policies),
        Arc::clone(&targets),
        None,
    )?;
    let config = Arc::new(config);
    let close_all = CancellationToken::new();
    let gate = Arc::new(crate::admission::Gate::new(
        Arc::clone(&config),
        Arc::clone(&audit),
        Arc::clone(&identity),
        Arc::clone(&policies),
        registry,
        Arc::clone(&approvals),
        close_all.clone(),
    ));
    let proxy = Proxy::new(
        Arc::clone(&config),
        Arc::clone(&targets),
        Arc::new(enforcement),
        gate,
        close_all,
        postgres,
        ssh,
        loops.handles(runtime.handle()),
        limiter,
    );
    let shutdown = CancellationToken::new();
    // What start-up parsed and dropped (kernel BTF, the eBPF object) stays resident otherwise.
    crate::sys::release_free_heap();

    runtime.block_on(async {
        if let Some(logger) = logger {
            match crate::sys::async_kernel_log(logger) {
                Ok(fd) => {
                    proxy
                        .tasks
                        .spawn(pump_kernel_logs(fd, proxy.close_all.clone()));
                }
                Err(e) => tracing::warn!(error = %e, "kernel program logs are unavailable"),
            }
        }
        for listener in listeners {
            proxy.tasks.spawn(Arc::clone(&proxy).serve(listener));
        }
        proxy
            .tasks
            .spawn(Arc::clone(&identity).maintain(proxy.close_all.clone()));
        proxy.tasks.spawn(Arc::clone(&proxy).summarize_refusals());
        if let Some(pg) = &postgres_pools {
            proxy
                .tasks
                .spawn(Arc::clone(pg).maintain_pools(proxy.close_all.clone()));
        }
        proxy
            .tasks
            .spawn(Arc::clone(&approvals).maintain(proxy.close_all.clone()));
        if let Some(runner) = fleet_runner {
            proxy
                .tasks
                .spawn(runner.run(Arc::clone(&approvals), proxy.close_all.clone()));
        }
        // Stopped by `close_all`, after the drain, like the audit shippers.
        for delivery in notifications {
            tracing::info!(webhook = delivery.name(), "approval notifications on");
            proxy.tasks.spawn(delivery.run(proxy.close_all.clone()));
        }
        proxy
            .tasks
            .spawn(Arc::clone(&policies).watch(proxy.close_all.clone()));
        // Stopped by `close_all`, after the drain, so the drain's events still get shipped.
        crate::audit::central::start(&config, &audit, &proxy.tasks, proxy.close_all.clone());
        crate::audit::siem::start(&config, &audit, &proxy.tasks, proxy.close_all.clone());
        if let Some((resolver, schedule)) = dns {
            let enforcing = Arc::clone(&proxy);
            let audit = Arc::clone(&audit);
            proxy.tasks.spawn(crate::dns::maintain(
                resolver,
                targets,
                resolved,
                schedule,
                move |target, change, after| {
                    enforcing
                        .enforcement()
                        .apply_address_change(target, change)?;
                    let reason = format!(
                        "host {} of target {} now resolves to {} (added: {}; removed: {})",
                        target.host.as_deref().unwrap_or_default(),
                        target.name,
                        crate::dns::join(after),
                        crate::dns::join(&change.added.iter().copied().collect()),
                        crate::dns::join(&change.removed.iter().copied().collect()),
                    );
                    tracing::info!(target = %target.name, %reason, "protected addresses changed");
                    let mut ev = AuditEvent::new(EventKind::TargetAddressesChanged).reason(reason);
                    ev.target = Some(target.name.as_str().into());
                    audit.record(ev);
                    Ok(())
                },
                proxy.close_all.clone(),
            ));
        }
    });

    let control_listener = control::bind(&config.control.socket)?;
    let state = Arc::new(ControlState {
        proxy: Arc::clone(&proxy),
        identity: Arc::clone(&identity),
        policies: Arc::clone(&policies),
        approvals: Arc::clone(&approvals),
        data_plane: runtime.handle().clone(),
        started_ms: crate::audit::now_ms(),
        shutdown: shutdown.clone(),
    });
    let control_thread = std::thread::Builder::new()
        .name("portcullis-control".into())
        .spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let listener = tokio::net::UnixListener::from_std(control_listener)?;
                control::serve(listener, state).await;
                anyhow::Ok(())
            })
        })
        .context("starting the control thread")?;
    // Its own thread and runtime, like the control socket: browsers cannot slow the data
    // plane, nor the data plane the console.
    let console_thread = match console {
        Some(console) => {
            tracing::info!(url = console.url(), "web console on");
            let stop = shutdown.clone();
            Some(
                std::thread::Builder::new()
                    .name("portcullis-console".into())
                    .spawn(move || -> anyhow::Result<()> {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()?;
                        rt.block_on(console.serve(stop))?;
                        Ok(())
                    })
                    .context("starting the console thread")?,
            )
        }
        None => None,
    };

    audit.record(AuditEvent::new(EventKind::AgentStarted).reason(format!(
        "pid {}, cgroup {}, pins {}",
        std::process::id(),
        proxy.enforcement().cgroup.display(),
        proxy.enforcement().pin_dir.display()
    )));
    notify_systemd("READY=1");
    tracing::info!(socket = %config.control.socket.display(), "agent ready");

    let drain = Duration::from_secs(config.proxy.drain_timeout_secs);
    runtime.block_on(async {
        wait_for_stop(&shutdown).await;
        notify_systemd("STOPPING=1");
        shutdown.cancel();
        proxy.stop_accepting.cancel();
        let open = proxy.registry().len();
        tracing::info!(
            open,
            drain_secs = drain.as_secs(),
            "draining: no new connections"
        );
        // The log pump is tracked too; it ends with `close_all`.
        if tokio::time::timeout(drain, wait_for_connections(&proxy))
            .await
            .is_err()
        {
            tracing::warn!(
                open = proxy.registry().len(),
                "drain timeout: closing what is still open"
            );
        }
        identity.cancel_pending();
        proxy.close_all.cancel();
        proxy.tasks.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), proxy.tasks.wait()).await;
        identity.wait_for_logins(Duration::from_secs(5)).await;
    });
    loops.stop();
    let still_enforcing = proxy.enforcement().pin_dir.exists();
    let outcome = if still_enforcing {
        "enforcement stays attached: protected connections are refused until the agent runs again"
    } else {
        "enforcement was detached"
    };
    audit.record(AuditEvent::new(EventKind::AgentStopped).reason(outcome));
    audit.flush();
    if let Some(Ok(Err(e))) = console_thread.map(std::thread::JoinHandle::join) {
        tracing::warn!(error = %e, "console thread ended with an error");
    }
    if let Ok(Err(e)) = control_thread.join() {
        tracing::warn!(error = %e, "control thread ended with an error");
    }
    let _ = std::fs::remove_file(&config.control.socket);
    tracing::info!("agent stopped; {outcome}");
    Ok(())
}

/// The event loops beyond the main thread's, each a single-threaded runtime on its own
/// thread, running until `stop`.
struct EventLoops {
    handles: Vec<tokio::runtime::Handle>,
    threads: Vec<std::thread::JoinHandle<()>>,
    stop: CancellationToken,
}

impl EventLoops {
    /// `total` loops in all: the main thread's and `total - 1` started here.
    fn start(total: usize) -> anyhow::Result<Self> {
        let stop = CancellationToken::new();
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for i in 1..total {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("starting an event loop")?;
            handles.push(runtime.handle().clone());
            let stop = stop.clone();
            let thread = std::thread::Builder::new()
                .name(format!("portcullis-io-{i}"))
                .spawn(move || runtime.block_on(stop.cancelled()))
                .context("starting an event loop thread")?;
            threads.push(thread);
        }
        Ok(Self {
            handles,
            threads,
            stop,
        })
    }

    /// Every loop connections may run on, the main thread's first.
    fn handles(&self, main: &tokio::runtime::Handle) -> Vec<tokio::runtime::Handle> {
        std::iter::once(main.clone())
            .chain(self.handles.iter().cloned())
            .collect()
    }

    /// Ends the loops once their connections are closed (after the drain).
    fn stop(mut self) {
        self.stop.cancel();
        for thread in std::mem::take(&mut self.threads) {
            let _ = thread.join();
        }
    }
}

impl Drop for EventLoops {
    /// A start that fails half-way does not leave loops waiting forever.
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn wait_for_connections(proxy: &Proxy) {
    while proxy.registry().len() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_stop(shutdown: &CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
                () = shutdown.cancelled() => {}
            }
        }
        _ => {
            tracing::error!(
                "cannot install signal handlers; only a control request stops the agent"
            );
            shutdown.cancelled().await;
        }
    }
}

async fn pump_kernel_logs(mut fd: AsyncFd<crate::sys::KernelLogger>, stop: CancellationToken) {
    loop {
        let guard = tokio::select! {
            () = stop.cancelled() => return,
            g = fd.readable_mut() => g,
        };
        match guard {
            Ok(mut guard) => {
                guard.get_inner_mut().flush();
                guard.clear_ready();
            }
            Err(e) => {
                tracing::warn!(error = %e, "kernel log reader failed");
                return;
            }
        }
    }
}

/// Tells systemd about our state when it started us with Type=notify.
fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let path = path.to_string_lossy().into_owned();
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(&path),
    };
    let sent = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        tracing::warn!(error = %e, socket = %path, "cannot notify systemd");
    }
}
