//! The agent's local certificate authority. Protocol handlers that terminate TLS for an
//! unchanged client (PostgreSQL today) present a certificate for the destination the client
//! dialled, issued here. Packaging adds `ca.pem` to the system trust store, so
//! `sslmode=verify-full` (and every other verifying client) trusts the proxy and nothing else
//! changes for the client.
//!
//! The CA key never leaves `<state_dir>/ca/ca.key` (root, 0600); its certificate `ca.pem` is
//! readable by every user. Leaf certificates live only in memory, one per (names, addresses)
//! set, valid for a limited time and re-issued by the next agent start.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("local CA in {dir}: {what}: {source}")]
    Io {
        dir: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("local CA in {dir}: {what}: {message}")]
    Invalid {
        dir: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("cannot issue a certificate for {names}: {message}")]
    Issue { names: String, message: String },
}

/// Leaf certificates are short-lived; an agent running longer re-issues on demand.
const LEAF_VALIDITY_DAYS: i64 = 30;
const CA_VALIDITY_DAYS: i64 = 10 * 365;

pub struct LocalCa {
    issuer: Issuer<'static, KeyPair>,
    /// Server configurations by their sorted subject alternative names.
    issued: Mutex<HashMap<Vec<String>, Issued>>,
}

struct Issued {
    config: Arc<rustls::ServerConfig>,
    not_after: time::OffsetDateTime,
}

impl LocalCa {
    /// Opens the CA in `dir`, creating a new key and self-signed certificate on first use.
    pub fn open_or_create(dir: &Path) -> Result<Self, CaError> {
        let io = |what: &'static str| {
            let dir = dir.to_path_buf();
            move |source| CaError::Io { dir, what, source }
        };
        let invalid = |what: &'static str, message: String| CaError::Invalid {
            dir: dir.to_path_buf(),
            what,
            message,
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create directory"))?;
        let key_path = dir.join("ca.key");
        let cert_path = dir.join("ca.pem");
        if !key_path.exists() {
            let (key, cert_pem) = new_ca().map_err(|m| invalid("create", m))?;
            write_new(&key_path, key.serialize_pem().as_bytes(), 0o600)
                .map_err(io("write ca.key"))?;
            write_new(&cert_path, cert_pem.as_bytes(), 0o644).map_err(io("write ca.pem"))?;
            tracing::info!(cert = %cert_path.display(), "created the local CA; add ca.pem to the clients' trust store");
        }
        publish_certificate(dir, &cert_path).map_err(io("make ca.pem readable by everyone"))?;
        let mode = fs::metadata(&key_path)
            .map_err(io("read ca.key"))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(invalid(
                "ca.key",
                format!(
                    "mode {:o} lets others read the CA key; it must be 0600",
                    mode & 0o777
                ),
            ));
        }
        let key_pem = fs::read_to_string(&key_path).map_err(io("read ca.key"))?;
        let cert_pem = fs::read_to_string(&cert_path).map_err(io("read ca.pem"))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| invalid("ca.key", e.to_string()))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| invalid("ca.pem", e.to_string()))?;
        Ok(Self {
            issuer,
            issued: Mutex::new(HashMap::new()),
        })
    }

    /// A TLS server configuration whose certificate names `names` and `addresses`; issued
    /// once and cached until it nears expiry.
    pub fn server_config(
        &self,
        names: &[String],
        addresses: &[IpAddr],
    ) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let mut key: Vec<String> = names.iter().map(|n| n.to_ascii_lowercase()).collect();
        key.extend(addresses.iter().map(IpAddr::to_string));
        key.sort();
        key.dedup();
        let now = time::OffsetDateTime::now_utc();
        let mut issued = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = issued.get(&key) {
            if i.not_after - time::Duration::days(1) > now {
                return Ok(Arc::clone(&i.config));
            }
        }
        let (config, not_after) =
            self.issue(names, addresses)
                .map_err(|message| CaError::Issue {
                    names: key.join(", "),
                    message,
                })?;
        // A bound on what a client can make us cache: destinations are configured targets,
        // but `address = "any"` targets take their addresses from the connection.
        if issued.len() > 4096 {
            issued.clear();
        }
        issued.insert(
            key,
            Issued {
                config: Arc::clone(&config),
                not_after,
            },
        );
        Ok(config)
    }

    fn issue(
        &self,
        names: &[String],
        addresses: &[IpAddr],
    ) -> Result<(Arc<rustls::ServerConfig>, time::OffsetDateTime), String> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        for name in names {
            params.subject_alt_names.push(SanType::DnsName(
                name.clone()
                    .try_into()
                    .map_err(|e| format!("{name}: {e}"))?,
            ));
        }
        for ip in addresses {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        let mut dn = DistinguishedName::new();
        let common_name = names
            .first()
            .cloned()
            .or_else(|| addresses.first().map(IpAddr::to_string))
            .unwrap_or_else(|| "portcullis".into());
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Portcullis");
        params.distinguished_name = dn;
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::hours(1);
        params.not_after = now + time::Duration::days(LEAF_VALIDITY_DAYS);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| e.to_string())?;
        let chain = vec![CertificateDer::from(cert.der().to_vec())];
        let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| e.to_string())?;
        Ok((Arc::new(config), params.not_after))
    }
}

fn new_ca() -> Result<(KeyPair, String), String> {
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    let host = portcullis_core::hostname();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Portcullis local CA ({host})"));
    dn.push(DnType::OrganizationName, "Portcullis");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    Ok((key, cert.pem()))
}

/// Every user needs the certificate for `sslmode=verify-full` (libpq up to 15 reads
/// `~/.postgresql/root.crt`, which they copy from it), but the state directory is private
/// and a umask of 0077 (the unit's) would make a new `ca.pem` 0600. The certificate becomes
/// 0644, its directory 0755 (the key keeps its own 0600, checked above) and the state
/// directory above it 0711: others may open a path they know there, never list it, and every
/// other file in it has a mode of its own (0600 files, 0700 directories).
fn publish_certificate(dir: &Path, cert_path: &Path) -> std::io::Result<()> {
    fs::set_permissions(cert_path, fs::Permissions::from_mode(0o644))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755))?;
    if let Some(state_dir) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        let mode = fs::metadata(state_dir)?.permissions().mode();
        if mode & 0o011 != 0o011 {
            fs::set_permissions(
                state_dir,
                fs::Permissions::from_mode((mode & 0o7777) | 0o011),
            )?;
        }
    }
    Ok(())
}

/// Creates `path` exclusively with `mode`: an existing file (or a planted symlink) is an
/// error rather than something to overwrite. Also used for the other state files the agent
/// creates once (the masking key).
pub(crate) fn write_new(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

/// Reads a 32-byte secret, creating it (root, 0600, exclusively) on first use: the masking
/// key, which PostgreSQL and SSH masking share so a keyed hash is the same in both.
pub(crate) fn read_or_create_secret(path: &std::path::Path) -> std::io::Result<Vec<u8>> {
    match std::fs::read(path) {
        Ok(key) if key.len() >= 32 => return Ok(key),
        Ok(_) => {
            return Err(std::io::Error::other(format!(
                "{} is shorter than 32 bytes",
                path.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let mut key = vec![0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
        .map_err(|_| std::io::Error::other("no randomness"))?;
    write_new(path, &key, 0o600)?;
    Ok(key)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn issues_a_certificate_the_ca_verifies_and_keeps_the_key_private() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let ca = LocalCa::open_or_create(&ca_dir).unwrap();
        let mode = fs::metadata(ca_dir.join("ca.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let config = ca
            .server_config(&["db1.example".into()], &["127.0.0.1".parse().unwrap()])
            .unwrap();
        let again = ca
            .server_config(&["DB1.example".into()], &["127.0.0.1".parse().unwrap()])
            .unwrap();
        assert!(Arc::ptr_eq(&config, &again), "cached by names");
        // A reopened CA signs with the same key: certificates chain to the same ca.pem.
        let pem = fs::read_to_string(ca_dir.join("ca.pem")).unwrap();
        drop(LocalCa::open_or_create(&ca_dir).unwrap());
        assert_eq!(fs::read_to_string(ca_dir.join("ca.pem")).unwrap(), pem);
    }

    #[test]
    fn the_certificate_is_readable_by_everyone_and_the_key_and_state_stay_private() {
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o7777;
        let state = tempfile::tempdir().unwrap();
        fs::set_permissions(state.path(), fs::Permissions::from_mode(0o700)).unwrap();
        let ca_dir = state.path().join("ca");
        drop(LocalCa::open_or_create(&ca_dir).unwrap());
        // As an older agent, or one under umask 0077, left them: fixed at the next start.
        fs::set_permissions(ca_dir.join("ca.pem"), fs::Permissions::from_mode(0o600)).unwrap();
        fs::set_permissions(&ca_dir, fs::Permissions::from_mode(0o700)).unwrap();
        fs::set_permissions(state.path(), fs::Permissions::from_mode(0o700)).unwrap();
        drop(LocalCa::open_or_create(&ca_dir).unwrap());
        assert_eq!(mode(&ca_dir.join("ca.pem")), 0o644);
        assert_eq!(mode(&ca_dir), 0o755);
        assert_eq!(mode(&ca_dir.join("ca.key")), 0o600);
        assert_eq!(mode(state.path()), 0o711, "traversable, never listable");
    }

    #[test]
    fn refuses_a_world_readable_key() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        drop(LocalCa::open_or_create(&ca_dir).unwrap());
        fs::set_permissions(ca_dir.join("ca.key"), fs::Permissions::from_mode(0o644)).unwrap();
        let err = LocalCa::open_or_create(&ca_dir).err().unwrap().to_string();
        assert!(err.contains("must be 0600"), "{err}");
    }
}
