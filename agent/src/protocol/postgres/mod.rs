//! PostgreSQL: the agent terminates the unchanged client's protocol (TLS from the local CA,
//! no password asked: the identity comes from the kernel and the OIDC session), opens its own
//! session to the server with the target's credential, and then relays messages, deciding
//! every statement with the policy engine, masking result values and recording each
//! statement as an audit event.
//!
//! Protocol: PostgreSQL docs, chapter "Frontend/Backend Protocol" (55 in PostgreSQL 17).
//! The codec is `portcullis-pgwire` (sans-IO); this module is the async glue and the session
//! rules. Every refusal reaches the client as an ErrorResponse built in [`error`], the one
//! place that turns a failure into a wire error.

mod cancel;
mod catalog;
mod error;
mod params;
mod pool;
mod session;
mod startup;
mod stream;
mod upstream;

use std::collections::HashMap;
use std::sync::Arc;

use crate::admission::{Gate, Incoming};
use crate::ca::LocalCa;
use crate::config::{Config, ProtectedTarget, Protocol};
use crate::identity::Identity;

pub use cancel::CancelMap;

/// The ErrorResponse for a connection refused over its uid's limits (53300, what the
/// server says when it has no slot), for the proxy that refuses before any session exists.
pub fn capacity_refusal(why: &str) -> bytes::BytesMut {
    let mut out = bytes::BytesMut::new();
    portcullis_pgwire::encode_error_response(
        &error::PgError::Capacity(why.to_owned()).to_fields(),
        &mut out,
    );
    out
}

/// State every PostgreSQL session of this agent shares.
pub struct Shared {
    pub ca: LocalCa,
    pub classifier: portcullis_sql::Classifier,
    pub cancels: CancelMap,
    pub catalog: catalog::Catalog,
    /// Server sessions kept for the next client (targets with `pool`).
    pools: pool::Pools,
    /// Upstream TLS per target id (`None`: plaintext, by explicit configuration).
    tls: HashMap<u32, Option<Arc<rustls::ClientConfig>>>,
    /// Keyed with the masking key, stable across restarts so hashed values stay joinable.
    maskers: session::Maskers,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    /// A target's upstream TLS settings (its CA file) cannot be used.
    #[error("target `{target}`: {source}")]
    UpstreamTls {
        target: String,
        source: crate::tls::TlsConfigError,
    },
    /// The masking key cannot be read or created in the state directory.
    #[error("masking key: {0}")]
    MaskingKey(#[source] std::io::Error),
}

impl Shared {
    /// Built at start when any target speaks PostgreSQL; errors stop the agent before it
    /// attaches anything.
    pub fn new(config: &Config, targets: &[ProtectedTarget]) -> Result<Option<Self>, SetupError> {
        if !targets.iter().any(|t| t.protocol == Protocol::Postgres) {
            return Ok(None);
        }
        let ca = LocalCa::open_or_create(&config.state_dir.join("ca"))?;
        let mut tls = HashMap::new();
        for t in targets {
            if let Some(pg) = &t.postgres {
                let setting = format!("target `{}` postgres.ca_file", t.name);
                let config = upstream::tls_config(pg, &setting).map_err(|source| {
                    SetupError::UpstreamTls {
                        target: t.name.clone(),
                        source,
                    }
                })?;
                tls.insert(t.id, config);
            }
        }
        let mask_key = crate::ca::read_or_create_secret(&config.state_dir.join("masking.key"))
            .map_err(SetupError::MaskingKey)?;
        Ok(Some(Self {
            ca,
            classifier: portcullis_sql::Classifier::new(16_384),
            cancels: CancelMap::default(),
            catalog: catalog::Catalog::default(),
            pools: pool::Pools::default(),
            tls,
            maskers: session::Maskers::new(mask_key),
        }))
    }

    /// Closes idle pooled server sessions past their idle timeout, each second, and all of
    /// them once `stop` is cancelled (after the drain: sessions still open then are closed
    /// rather than kept).
    pub async fn maintain_pools(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => self.pools.sweep(tokio::time::Instant::now(), false).await,
            }
        }
        self.pools.sweep(tokio::time::Instant::now(), true).await;
    }

    fn upstream_tls(&self, target_id: u32) -> Option<&Arc<rustls::ClientConfig>> {
        self.tls.get(&target_id).and_then(Option::as_ref)
    }
}

/// Serves one redirected PostgreSQL connection to its end.
pub async fn serve(
    gate: &Arc<Gate>,
    shared: &Shared,
    incoming: Incoming,
    client: tokio::net::TcpStream,
    identity: Result<Identity, crate::identity::ResolveError>,
) {
    startup::run(gate, shared, incoming, client, identity).await;
}
