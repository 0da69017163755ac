//! The one TLS client configuration the agent uses for its own outbound connections
//! (the PostgreSQL upstreams, the central audit store, syslog): rustls with the ring
//! provider, safe protocol versions, and the roots of a CA file or of the system.

use std::path::Path;

use rustls::pki_types::{pem::PemObject, CertificateDer};

/// Why a TLS client configuration cannot be built; each names the setting to fix.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    /// The CA file cannot be read, or holds something that is not a usable certificate.
    #[error("{setting} {}: {reason}", path.display())]
    CaFile {
        setting: String,
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("no CA certificates: set {setting}")]
    NoRoots { setting: String },
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
}

/// `setting` names the config key in errors (`audit.central.ca_file`).
pub fn client_config(
    ca_file: Option<&Path>,
    setting: &str,
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let ca_err = |e: &dyn std::fmt::Display| TlsConfigError::CaFile {
                setting: setting.to_string(),
                path: path.to_path_buf(),
                reason: e.to_string(),
            };
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
        return Err(TlsConfigError::NoRoots {
            setting: setting.to_string(),
        });
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth(),
    )
}

/// Configurations that weaken TLS, for targets an operator explicitly marked `insecure-…`.
pub mod danger {
    use std::sync::Arc;

    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    use rustls::{DigitallySignedStruct, SignatureScheme};

    /// Encrypts but accepts any certificate: whoever sits on the path can pose as the server.
    pub fn unverified_client_config() -> Result<rustls::ClientConfig, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Ok(
            rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnyCertificate(provider)))
                .with_no_client_auth(),
        )
    }

    #[derive(Debug)]
    struct AcceptAnyCertificate(Arc<rustls::crypto::CryptoProvider>);

    impl ServerCertVerifier for AcceptAnyCertificate {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        // Signatures are still checked: the handshake proves the server holds the key of the
        // certificate it showed, which channel binding then ties the SCRAM exchange to.
        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}
