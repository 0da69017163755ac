//! The web console for one host (docs/console.md, issue 20): sessions and their timelines
//! for auditors, pending approvals and grants for approvers, health for admins, behind a
//! sign-in with the agent's own issuer (authorization code with PKCE).
//!
//! Served over TLS only (a certificate from the agent's CA, or a configured one), on its
//! own thread and runtime like the control socket, so the data plane cannot starve it.
//! Everything it shows or changes goes through the code the CLI uses: the audit trail is
//! read with `audit::query`, approvals are decided by `ApprovalStore::decide` (segregation
//! of duties is the store's, never the page's). `auth` owns sign-in, sessions and CSRF;
//! `pages` renders HTML, escaping every value; `routes` ties requests to both.

mod auth;
pub mod fleet;
mod pages;
mod routes;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::approvals::ApprovalStore;
use crate::audit::AuditLog;
use crate::config::{Config, ConsoleSettings};

/// Connections served at once; past it new ones wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's head must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Keep-alive connections end after this, whatever they do.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("console.listen {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("console TLS: {0}")]
    Tls(String),
    #[error("console.client_secret_file {path}: {message}")]
    Secret { path: String, message: String },
    #[error("console: {0}")]
    Identity(String),
}

/// A bound, configured console, ready to serve.
pub struct Console {
    listener: std::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    state: Arc<routes::State>,
}

impl Console {
    /// Everything that can fail at start: the listener, the certificate, the client secret.
    /// `None` when `[console] listen` is unset.
    pub fn prepare(
        config: &Config,
        audit: Arc<AuditLog>,
        approvals: Arc<ApprovalStore>,
        registry: Arc<crate::admission::Registry>,
        policies: Arc<crate::policy::Policies>,
        targets: Arc<Vec<crate::config::ProtectedTarget>>,
        central: Option<Arc<crate::audit::central_read::CentralTrail>>,
    ) -> Result<Option<Self>, ConsoleError> {
        let Some(settings) = config.console() else {
            return Ok(None);
        };
        let tls = server_tls(config, &settings)?;
        let client_secret = settings
            .client_secret_file
            .as_deref()
            .map(read_secret)
            .transpose()?;
        let auth = auth::Auth::new(config, &settings, client_secret)?;
        let signing_key = config
            .audit
            .signing_key_file
            .as_deref()
            .map(crate::audit::read_signing_key)
            .transpose()
            .map_err(|e| ConsoleError::Identity(e.to_string()))?;
        let listener =
            std::net::TcpListener::bind(settings.listen).map_err(|source| ConsoleError::Bind {
                addr: settings.listen,
                source,
            })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| ConsoleError::Bind {
                addr: settings.listen,
                source,
            })?;
        let state = Arc::new(routes::State {
            settings,
            auth,
            audit,
            approvals,
            registry,
            policies,
            targets,
            shipped_path: config
                .audit
                .central
                .as_ref()
                .map(|_| config.audit_shipped_path()),
            signing_key,
            central,
        });
        Ok(Some(Self {
            listener,
            tls,
            state,
        }))
    }

    pub fn url(&self) -> &str {
        &self.state.settings.url
    }

    /// Serves until `stop`; open connections are closed then.
    pub async fn serve(self, stop: CancellationToken) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::from_std(self.listener)?;
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls);
        let app = routes::router(Arc::clone(&self.state));
        let mut connections = JoinSet::new();
        let sweeper = Arc::clone(&self.state);
        let mut sweep = tokio::time::interval(Duration::from_secs(30));
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = sweep.tick() => sweeper.auth.sweep(),
                Some(_) = connections.join_next(), if !connections.is_empty() => {}
                accepted = listener.accept(), if connections.len() < MAX_CONNECTIONS => {
                    let (stream, _) = match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "console: accept failed");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let acceptor = acceptor.clone();
                    let app = app.clone();
                    connections.spawn(async move {
                        let Ok(Ok(tls)) =
                            tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await
                        else {
                            return;
                        };
                        let service = hyper_util::service::TowerToHyperService::new(app);
                        let conn = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(HEADER_TIMEOUT)
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), service);
                        let _ = tokio::time::timeout(CONNECTION_LIFETIME, conn).await;
                    });
                }
            }
        }
        connections.shutdown().await;
        Ok(())
    }
}

/// The configured certificate, or one from the agent's CA naming the `url`'s host and the
/// listen address.
fn server_tls(
    config: &Config,
    settings: &ConsoleSettings,
) -> Result<Arc<rustls::ServerConfig>, ConsoleError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    if let Some((cert, key)) = &settings.tls {
        private_file(key).map_err(ConsoleError::Tls)?;
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| ConsoleError::Tls(format!("tls_cert {}: {e}", cert.display())))?;
        if chain.is_empty() {
            return Err(ConsoleError::Tls(format!(
                "tls_cert {}: no certificate in it",
                cert.display()
            )));
        }
        let private = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| ConsoleError::Tls(format!("tls_key {}: {e}", key.display())))?;
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| ConsoleError::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| ConsoleError::Tls(format!("tls_cert and tls_key: {e}")))?;
        return Ok(Arc::new(server));
    }
    let ca = crate::ca::LocalCa::open_or_create(&config.state_dir.join("ca"))
        .map_err(|e| ConsoleError::Tls(e.to_string()))?;
    let host = auth::url_host(&settings.url);
    let mut names = Vec::new();
    let mut addresses = Vec::new();
    match host.trim_start_matches('[').trim_end_matches(']').parse() {
        Ok(ip) => addresses.push(ip),
        Err(_) => names.push(host.to_string()),
    }
    if !settings.listen.ip().is_unspecified() && !addresses.contains(&settings.listen.ip()) {
        addresses.push(settings.listen.ip());
    }
    ca.server_config(&names, &addresses)
        .map_err(|e| ConsoleError::Tls(e.to_string()))
}

/// A key or secret file must be root's own and readable by nobody else.
fn private_file(path: &Path) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} has mode {:o}; it must be 0600 (it is a secret)",
            path.display(),
            meta.mode() & 0o777
        ));
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        return Err(format!(
            "{} belongs to uid {}, not to the agent",
            path.display(),
            meta.uid()
        ));
    }
    Ok(())
}

fn read_secret(path: &Path) -> Result<crate::identity::Secret, ConsoleError> {
    let fail = |message: String| ConsoleError::Secret {
        path: path.display().to_string(),
        message,
    };
    private_file(path).map_err(fail)?;
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let secret = text.trim();
    if secret.is_empty() {
        return Err(fail("it is empty".into()));
    }
    Ok(crate::identity::Secret::new(secret.to_string()))
}
