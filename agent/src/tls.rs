//! The one TLS client configuration the agent uses for its own outbound connections
//! (central audit store, syslog; later the protocol upstreams): rustls with the ring
//! provider, safe protocol versions, and the roots of a CA file or of the system.

use std::path::Path;

use rustls::pki_types::{pem::PemObject, CertificateDer};

/// `setting` names the config key in errors (`audit.central.ca_file`).
pub fn client_config(
    ca_file: Option<&Path>,
    setting: &str,
) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let ca_err = |e: &dyn std::fmt::Display| format!("{setting} {}: {e}", path.display());
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| ca_err(&e))? {
                roots
                    .add(cert.map_err(|e| ca_err(&e))?)
                    .map_err(|e| ca_err(&e))?;
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                // One unusable system root must not disable all the others.
                let _ = roots.add(cert);
            }
        }
    }
    if roots.is_empty() {
        return Err(format!("no CA certificates: set {setting}"));
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}
