//! The agent's SSH certificate authorities (OpenSSH PROTOCOL.certkeys), one per direction:
//!
//! - the **host CA** signs the host certificate the agent presents to unchanged `ssh`
//!   clients for each SSH target; `portcullis ssh known-hosts` prints the `@cert-authority`
//!   line that makes OpenSSH trust it without a prompt;
//! - the **user CA** signs a short-lived user certificate per connection, which the agent
//!   presents upstream; the target's sshd trusts it with `TrustedUserCAKeys`.
//!
//! Both keys are ed25519 and live in `<state_dir>/ssh/` (root, 0600); their public halves
//! (`host_ca.pub`, `user_ca.pub`) are readable by every user. Host and user certificates
//! live only in memory: host certificates are re-issued before they expire, user
//! certificates are minted per connection with a key pair that never touches the disk.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use russh::keys::ssh_key::certificate::{Builder, CertType, Certificate};
use russh::keys::ssh_key::private::{Ed25519Keypair, PrivateKey};
use russh::keys::ssh_key::{LineEnding, PublicKey};

#[derive(Debug, thiserror::Error)]
pub enum SshCaError {
    #[error("SSH CA in {dir}: {what}: {source}")]
    Io {
        dir: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("SSH CA in {dir}: {what}: {message}")]
    Invalid {
        dir: PathBuf,
        what: &'static str,
        message: String,
    },
    #[error("cannot issue an SSH certificate for {principals}: {message}")]
    Issue { principals: String, message: String },
}

/// Host certificates are re-issued when less than this is left of their validity.
const HOST_CERT_VALIDITY: Duration = Duration::from_secs(24 * 3600);
const HOST_CERT_RENEW_BEFORE: Duration = Duration::from_secs(3600);
/// A clock a little behind the agent's must still accept a certificate minted just now.
const BACKDATE: Duration = Duration::from_secs(60);

/// A host key and the certificate the host CA signed for it.
#[derive(Clone)]
pub struct HostIdentity {
    pub key: PrivateKey,
    pub certificate: Certificate,
}

/// What a per-connection user certificate allows; nothing is granted by default.
#[derive(Debug, Clone, Default)]
pub struct UserGrant {
    /// The login names the certificate is valid for (at least one).
    pub principals: Vec<String>,
    /// `<identity>/<connection id>`: the target's sshd logs it (`Accepted certificate ID`).
    pub key_id: String,
    pub validity: Duration,
    /// The agent's own upstream address, so the certificate is useless from anywhere else.
    pub source_address: Option<String>,
    pub permit_pty: bool,
    pub permit_port_forwarding: bool,
    pub permit_agent_forwarding: bool,
}

/// A user key pair, created for one connection, and its certificate.
pub struct UserCredential {
    pub key: Arc<PrivateKey>,
    pub certificate: Certificate,
}

pub struct SshCa {
    host_ca: PrivateKey,
    user_ca: PrivateKey,
    /// Host identities by their sorted principals.
    hosts: Mutex<HashMap<Vec<String>, (HostIdentity, SystemTime)>>,
}

impl SshCa {
    /// Opens the CAs in `dir`, creating each key on first use.
    pub fn open_or_create(dir: &Path) -> Result<Self, SshCaError> {
        let io = |what: &'static str| {
            let dir = dir.to_path_buf();
            move |source| SshCaError::Io { dir, what, source }
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("create directory"))?;
        // The public halves are for every user (the known_hosts line, sshd's
        // TrustedUserCAKeys), so the directory is searchable; the keys stay 0600.
        fs::set_permissions(dir, fs::Permissions::from_mode(0o755))
            .map_err(io("make the directory searchable"))?;
        let host_ca = open_key(dir, "host_ca", "portcullis SSH host CA")?;
        let user_ca = open_key(dir, "user_ca", "portcullis SSH user CA")?;
        Ok(Self {
            host_ca,
            user_ca,
            hosts: Mutex::new(HashMap::new()),
        })
    }

    /// The line for `/etc/ssh/ssh_known_hosts` that makes OpenSSH trust every host
    /// certificate of this agent, for any host name (the certificate's principals decide).
    pub fn known_hosts_line(&self) -> Result<String, SshCaError> {
        let public = openssh_public(self.host_ca.public_key())?;
        Ok(format!("@cert-authority * {public}"))
    }

    /// The user CA's public key, for the target's sshd `TrustedUserCAKeys`.
    pub fn user_ca_public(&self) -> Result<String, SshCaError> {
        openssh_public(self.user_ca.public_key())
    }

    #[cfg(test)]
    pub fn host_ca_public_key(&self) -> &PublicKey {
        self.host_ca.public_key()
    }

    /// The host key and certificate to present for a target reached under `principals`
    /// (its configured names, addresses and resolved names); issued once and re-issued
    /// before it expires.
    pub fn host_identity(&self, principals: &[String]) -> Result<HostIdentity, SshCaError> {
        let mut key: Vec<String> = principals.iter().map(|p| p.to_ascii_lowercase()).collect();
        key.sort();
        key.dedup();
        let now = SystemTime::now();
        let mut hosts = self.hosts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((identity, not_after)) = hosts.get(&key) {
            if now + HOST_CERT_RENEW_BEFORE < *not_after {
                return Ok(identity.clone());
            }
        }
        let issue = |message: String| SshCaError::Issue {
            principals: key.join(", "),
            message,
        };
        if key.is_empty() {
            return Err(issue(
                "a host certificate needs at least one principal".into(),
            ));
        }
        let host_key = new_ed25519("portcullis host key").map_err(issue)?;
        let not_after = now + HOST_CERT_VALIDITY;
        let mut builder = builder(host_key.public_key(), now, not_after).map_err(issue)?;
        builder
            .cert_type(CertType::Host)
            .and_then(|b| b.key_id("portcullis host"))
            .map_err(|e| issue(e.to_string()))?;
        for p in &key {
            builder
                .valid_principal(p.as_str())
                .map_err(|e| issue(e.to_string()))?;
        }
        let certificate = builder
            .sign(&self.host_ca)
            .map_err(|e| issue(e.to_string()))?;
        let identity = HostIdentity {
            key: host_key,
            certificate,
        };
        // Keys are configured targets and their resolved names: a bound against a DNS
        // host whose records churn.
        if hosts.len() > 1024 {
            hosts.clear();
        }
        hosts.insert(key, (identity.clone(), not_after));
        Ok(identity)
    }

    /// A fresh key pair and a user certificate for it, signed by the user CA.
    pub fn user_credential(&self, grant: &UserGrant) -> Result<UserCredential, SshCaError> {
        let issue = |message: String| SshCaError::Issue {
            principals: grant.principals.join(", "),
            message,
        };
        if grant.principals.is_empty() {
            return Err(issue(
                "a user certificate needs at least one principal".into(),
            ));
        }
        let key = new_ed25519("portcullis session key").map_err(issue)?;
        let now = SystemTime::now();
        let mut builder = builder(key.public_key(), now, now + grant.validity).map_err(issue)?;
        let e = |e: russh::keys::ssh_key::Error| issue(e.to_string());
        builder.cert_type(CertType::User).map_err(e)?;
        builder.key_id(grant.key_id.as_str()).map_err(e)?;
        for p in &grant.principals {
            builder.valid_principal(p.as_str()).map_err(e)?;
        }
        if let Some(source) = &grant.source_address {
            builder
                .critical_option("source-address", source.as_str())
                .map_err(e)?;
        }
        for (granted, extension) in [
            (grant.permit_pty, "permit-pty"),
            (grant.permit_port_forwarding, "permit-port-forwarding"),
            (grant.permit_agent_forwarding, "permit-agent-forwarding"),
        ] {
            if granted {
                builder.extension(extension, "").map_err(e)?;
            }
        }
        let certificate = builder.sign(&self.user_ca).map_err(e)?;
        Ok(UserCredential {
            key: Arc::new(key),
            certificate,
        })
    }
}

fn openssh_public(key: &PublicKey) -> Result<String, SshCaError> {
    key.to_openssh().map_err(|e| SshCaError::Issue {
        principals: String::new(),
        message: e.to_string(),
    })
}

fn builder(public: &PublicKey, now: SystemTime, not_after: SystemTime) -> Result<Builder, String> {
    let secs = |t: SystemTime| {
        t.duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .map_err(|e| e.to_string())
    };
    let mut nonce = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce)
        .map_err(|_| "the system random source failed".to_string())?;
    let mut serial = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut serial)
        .map_err(|_| "the system random source failed".to_string())?;
    let mut b = Builder::new(
        nonce.to_vec(),
        public.key_data().clone(),
        secs(now)?.saturating_sub(BACKDATE.as_secs()),
        secs(not_after)?,
    )
    .map_err(|e| e.to_string())?;
    b.serial(u64::from_be_bytes(serial))
        .map_err(|e| e.to_string())?;
    Ok(b)
}

fn new_ed25519(comment: &str) -> Result<PrivateKey, String> {
    let mut seed = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed)
        .map_err(|_| "the system random source failed".to_string())?;
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment);
    Ok(key)
}

/// Reads `<dir>/<name>` (creating it and `<name>.pub` on first use) and refuses a key file
/// others can read.
fn open_key(dir: &Path, name: &'static str, comment: &str) -> Result<PrivateKey, SshCaError> {
    let io = |what: &'static str| {
        let dir = dir.to_path_buf();
        move |source| SshCaError::Io { dir, what, source }
    };
    let invalid = |message: String| SshCaError::Invalid {
        dir: dir.to_path_buf(),
        what: name,
        message,
    };
    let key_path = dir.join(name);
    let pub_path = dir.join(format!("{name}.pub"));
    if !key_path.exists() {
        let key = new_ed25519(comment).map_err(invalid)?;
        let pem = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| invalid(e.to_string()))?;
        write_new(&key_path, pem.as_bytes(), 0o600).map_err(io("write the key"))?;
        tracing::info!(key = %key_path.display(), "created an SSH CA key");
    }
    let mode = fs::metadata(&key_path)
        .map_err(io("read the key"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(invalid(format!(
            "mode {:o} lets others read the CA key; it must be 0600",
            mode & 0o777
        )));
    }
    let text = fs::read_to_string(&key_path).map_err(io("read the key"))?;
    let key = PrivateKey::from_openssh(&text).map_err(|e| invalid(e.to_string()))?;
    // The public half is derived from the key each start, so it cannot drift from it.
    let public = format!("{}\n", openssh_public(key.public_key())?);
    if fs::read_to_string(&pub_path).ok().as_deref() != Some(public.as_str()) {
        let tmp = dir.join(format!("{name}.pub.tmp"));
        let _ = fs::remove_file(&tmp);
        write_new(&tmp, public.as_bytes(), 0o644).map_err(io("write the public key"))?;
        fs::rename(&tmp, &pub_path).map_err(io("write the public key"))?;
    }
    // The agent runs under umask 0077; the public half is for every user (sshd's
    // TrustedUserCAKeys, the known_hosts line), whatever mode it was left with.
    fs::set_permissions(&pub_path, fs::Permissions::from_mode(0o644))
        .map_err(io("make the public key readable"))?;
    Ok(key)
}

/// Creates `path` with `mode` (never over an existing file) and syncs it.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;
    use russh::keys::ssh_key::certificate::CertType;

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn keys_are_private_public_halves_readable_and_stable_across_opens() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("ssh");
        let ca = SshCa::open_or_create(&dir).unwrap();
        let line = ca.known_hosts_line().unwrap();
        assert!(line.starts_with("@cert-authority * ssh-ed25519 "), "{line}");
        assert_eq!(mode(&dir.join("host_ca")), 0o600);
        assert_eq!(mode(&dir.join("user_ca")), 0o600);
        assert_eq!(mode(&dir.join("host_ca.pub")), 0o644);
        assert_eq!(mode(&dir.join("user_ca.pub")), 0o644);
        // A public half left unreadable (a umask of 0077 at creation) is made readable.
        fs::set_permissions(dir.join("host_ca.pub"), fs::Permissions::from_mode(0o600)).unwrap();
        let again = SshCa::open_or_create(&dir).unwrap();
        assert_eq!(mode(&dir.join("host_ca.pub")), 0o644);
        assert_eq!(again.known_hosts_line().unwrap(), line);
        assert_eq!(
            fs::read_to_string(dir.join("user_ca.pub")).unwrap().trim(),
            ca.user_ca_public().unwrap()
        );
    }

    #[test]
    fn refuses_a_readable_ca_key() {
        let state = tempfile::tempdir().unwrap();
        let dir = state.path().join("ssh");
        drop(SshCa::open_or_create(&dir).unwrap());
        fs::set_permissions(dir.join("user_ca"), fs::Permissions::from_mode(0o644)).unwrap();
        let err = SshCa::open_or_create(&dir).err().unwrap();
        assert!(err.to_string().contains("must be 0600"), "{err}");
    }

    #[test]
    fn host_certificate_names_the_principals_and_verifies_with_the_host_ca() {
        let state = tempfile::tempdir().unwrap();
        let ca = SshCa::open_or_create(&state.path().join("ssh")).unwrap();
        let names = vec!["Web-1".to_string(), "127.0.0.1".to_string()];
        let host = ca.host_identity(&names).unwrap();
        let cert = &host.certificate;
        assert_eq!(cert.cert_type(), CertType::Host);
        assert_eq!(cert.valid_principals(), ["127.0.0.1", "web-1"]);
        assert_eq!(cert.public_key(), host.key.public_key().key_data());
        let fp = ca.host_ca_public_key().fingerprint(Default::default());
        cert.validate([&fp]).unwrap();
        // Cached: the same key until renewal.
        let again = ca.host_identity(&names).unwrap();
        assert_eq!(again.key.public_key(), host.key.public_key());
        assert!(ca.host_identity(&[]).is_err());
    }

    #[test]
    fn user_certificate_carries_only_what_was_granted() {
        let state = tempfile::tempdir().unwrap();
        let ca = SshCa::open_or_create(&state.path().join("ssh")).unwrap();
        let grant = UserGrant {
            principals: vec!["deploy".into()],
            key_id: "alice@example.com/42".into(),
            validity: Duration::from_secs(300),
            source_address: Some("127.0.0.1".into()),
            permit_pty: true,
            ..UserGrant::default()
        };
        let cred = ca.user_credential(&grant).unwrap();
        let cert = &cred.certificate;
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(cert.key_id(), "alice@example.com/42");
        assert_eq!(cert.valid_principals(), ["deploy"]);
        assert_eq!(
            cert.critical_options()
                .get("source-address")
                .map(String::as_str),
            Some("127.0.0.1")
        );
        let extensions: Vec<&str> = cert.extensions().keys().map(String::as_str).collect();
        assert_eq!(extensions, ["permit-pty"]);
        assert!(cert.valid_before() - cert.valid_after() <= 300 + 60);
        let fp = ca.user_ca.public_key().fingerprint(Default::default());
        cert.validate([&fp]).unwrap();

        let bare = ca
            .user_credential(&UserGrant {
                principals: vec!["deploy".into()],
                key_id: "x/1".into(),
                validity: Duration::from_secs(60),
                ..UserGrant::default()
            })
            .unwrap();
        assert!(bare.certificate.extensions().is_empty());
        assert!(bare.certificate.critical_options().is_empty());
        assert!(ca
            .user_credential(&UserGrant {
                key_id: "x/2".into(),
                ..UserGrant::default()
            })
            .is_err());
    }
}
