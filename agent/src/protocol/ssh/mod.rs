//! SSH through the agent (RFC 4251–4254, OpenSSH PROTOCOL and PROTOCOL.certkeys). The
//! agent terminates SSH towards the unchanged client with a host certificate from its host
//! CA, takes the identity from the socket (never from SSH authentication), decides the
//! connect with the login name the client asked for, logs in upstream with a short-lived
//! user certificate (`ssh_ca`), and relays session channels one request at a time, each
//! decided before it reaches the server.
//!
//! `session` holds the client-facing handler and the channel relay; `upstream` the
//! server-facing client, with its host key check. `terminal` masks, records and guards a
//! shell's or command's bytes: output passes [`output_to_client`], input the `data`
//! callback, the one place each direction's bytes pass.

mod approval;
mod forward;
mod reader;
mod session;
mod sftp;
mod terminal;
mod upstream;
mod writer;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use russh::keys::ssh_key::PrivateKey;
use tokio::net::TcpStream;

use crate::admission::{Gate, Incoming};
use crate::audit::recording::Recordings;
use crate::audit::AuditLog;
use crate::config::{Config, ProtectedTarget, Protocol, TargetAddress};
use crate::ssh_ca::{SshCa, SshCaError};

/// State every SSH connection of this agent shares.
pub struct Shared {
    pub ca: SshCa,
    /// The targets configured with a private key instead of a user certificate.
    private_keys: HashMap<u32, Arc<PrivateKey>>,
    /// The agent's one recordings area: every shell (and exec with a pty) is recorded.
    recordings: Recordings,
    /// The masking key PostgreSQL masking uses too, so a keyed hash is the same in both.
    mask_key: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Ca(#[from] SshCaError),
    #[error("target `{target}`: {reason}")]
    Target { target: String, reason: String },
    /// The masking key cannot be read or created in the state directory.
    #[error("masking key: {0}")]
    MaskingKey(#[source] std::io::Error),
}

impl Shared {
    /// Built at start when any target speaks SSH; errors stop the agent before it attaches
    /// anything.
    pub fn new(
        config: &Config,
        targets: &[ProtectedTarget],
        audit: Arc<AuditLog>,
    ) -> Result<Option<Self>, SetupError> {
        if !targets.iter().any(|t| t.protocol == Protocol::Ssh) {
            return Ok(None);
        }
        let ca = SshCa::open_or_create(&config.state_dir.join("ssh"))?;
        let mut private_keys = HashMap::new();
        for t in targets {
            let Some(ssh) = &t.ssh else { continue };
            let bad = |reason: String| SetupError::Target {
                target: t.name.clone(),
                reason,
            };
            // Checked at start so a typo is not found by the first user.
            upstream::KnownHosts::read(ssh.known_hosts_file.get_ref())
                .map_err(|e| bad(format!("ssh.known_hosts_file {e}")))?;
            if let Some(path) = &ssh.private_key_file {
                let key = read_private_key(path.get_ref())
                    .map_err(|e| bad(format!("ssh.private_key_file {e}")))?;
                private_keys.insert(t.id, Arc::new(key));
            }
        }
        let mask_key = crate::ca::read_or_create_secret(&config.state_dir.join("masking.key"))
            .map_err(SetupError::MaskingKey)?;
        Ok(Some(Self {
            ca,
            private_keys,
            recordings: Recordings::new(audit),
            mask_key,
        }))
    }

    pub fn recordings(&self) -> &Recordings {
        &self.recordings
    }

    fn private_key(&self, target_id: u32) -> Option<Arc<PrivateKey>> {
        self.private_keys.get(&target_id).cloned()
    }
}

/// A private key file the agent logs in with: root-only, like the PostgreSQL credentials.
fn read_private_key(path: &Path) -> Result<PrivateKey, String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.mode() & 0o077 != 0 || meta.uid() != 0 {
        return Err(format!(
            "{}: must be owned by root with mode 0600 (it is uid {} mode {:o})",
            path.display(),
            meta.uid(),
            meta.mode() & 0o777
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    PrivateKey::from_openssh(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// The names and addresses a client may have typed to reach `target` through `dialled`:
/// the principals of the host certificate the agent presents.
fn host_principals(target: &ProtectedTarget, dialled: IpAddr) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    if let Some(ssh) = &target.ssh {
        names.extend(ssh.host_names.iter().map(|n| n.to_ascii_lowercase()));
    }
    names.extend(target.host.iter().cloned());
    for a in &target.addresses {
        if let TargetAddress::Net(net) = a {
            if net.prefix_len() == net.max_prefix_len() {
                names.push(net.addr().to_string());
            }
        }
    }
    names.push(crate::config::canonical_ip(dialled).to_string());
    names.sort();
    names.dedup();
    names
}

/// What kind of work a session channel does, once its shell, exec or subsystem started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    /// Not started yet (pty and env requests only).
    Pending,
    Shell,
    Exec,
    Subsystem,
}

/// A channel's terminal (masking, recording, guard), shared by its two directions; set
/// once, when its shell or exec starts.
pub type SharedTerminal = Arc<tokio::sync::Mutex<terminal::Terminal>>;

/// Per-channel state the recording and masking seam sees; both directions of a channel
/// hold a tap on the same terminal.
#[derive(Debug)]
pub struct ChannelTap {
    pub kind: ChannelKind,
    /// Links a recording to its session (`connection.opened`'s id).
    pub connection_id: u64,
    pub terminal: Arc<std::sync::OnceLock<SharedTerminal>>,
    /// Set when the channel's sftp subsystem starts: its operations are read, decided and
    /// written down (`sftp`), never masked.
    pub sftp: sftp::SharedSftp,
}

impl ChannelTap {
    fn terminal(&self) -> Option<&SharedTerminal> {
        self.terminal.get()
    }
}

/// Every byte of a session channel's output (stdout; `stderr` true for its stderr) on its
/// way to the client passes here: masked and recorded when the channel's terminal says so.
/// An error ends the channel (its recording failed and the target says to close).
pub async fn output_to_client(
    tap: &mut ChannelTap,
    stderr: bool,
    data: Bytes,
) -> Result<Bytes, terminal::Ended> {
    match tap.terminal() {
        Some(t) => t.lock().await.output(stderr, &data).await.map(Bytes::from),
        None => Ok(data),
    }
}

/// Serves one redirected SSH connection to its end.
pub async fn serve(gate: Arc<Gate>, shared: Arc<Shared>, incoming: Incoming, client: TcpStream) {
    session::serve(gate, shared, incoming, client).await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn principals_are_names_host_single_addresses_and_the_dialled_address() {
        let target = ProtectedTarget {
            id: 0,
            name: "web".into(),
            protocol: Protocol::Ssh,
            addresses: vec![
                TargetAddress::parse("10.0.0.5").unwrap(),
                TargetAddress::parse("10.1.0.0/16").unwrap(),
            ],
            host: Some("web.internal".into()),
            port: 22,
            upstream: None,
            labels: Default::default(),
            postgres: None,
            recording_failure: Default::default(),
            wait_for_approval: false,
            ssh: Some(Arc::new(crate::config::SshTargetConfig {
                host_names: vec!["Prod-Web-3".into()],
                known_hosts_file: toml::Spanned::new(0..0, "/k".into()),
                private_key_file: None,
                certificate_minutes: 5,
                keepalive_secs: 15,
                record_input: false,
                guarded_shell: false,
            })),
        };
        let p = host_principals(&target, "::ffff:10.1.2.3".parse().unwrap());
        assert_eq!(p, ["10.0.0.5", "10.1.2.3", "prod-web-3", "web.internal"]);
    }
}
