//! The agent's own SSH connection to the target (RFC 4253 transport, RFC 4252 user auth,
//! OpenSSH PROTOCOL.certkeys): the server's host key is checked against the target's
//! known_hosts file, and the agent logs in with a user certificate from its user CA (or the
//! target's own private key file). The server may not open channels towards the agent:
//! agent forwarding, X11 and forwarded-tcpip opens are refused.

use std::path::Path;
use std::sync::{Arc, Mutex};

use russh::client;
use russh::keys::ssh_key::{Certificate, HashAlg, PublicKey};
use russh::keys::PublicKeyOrCertificate;
use russh::Channel;

/// The keys a target's known_hosts file accepts for its server. Host patterns are not
/// matched: the file belongs to one target, so every key it lists is that target's.
#[derive(Debug, Default)]
pub struct KnownHosts {
    keys: Vec<PublicKey>,
    authorities: Vec<PublicKey>,
    revoked: Vec<PublicKey>,
}

impl KnownHosts {
    /// Parses OpenSSH's known_hosts format (sshd(8) "SSH_KNOWN_HOSTS FILE FORMAT"):
    /// `[@cert-authority|@revoked] patterns keytype base64 [comment]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let first = words.next().unwrap_or_default();
            let marker = first.strip_prefix('@');
            if marker.is_some() {
                // The host patterns after the marker.
                words.next();
            }
            let key_text: Vec<&str> = words.collect();
            let key = PublicKey::from_openssh(&key_text.join(" "))
                .map_err(|e| format!("line {}: not a public key: {e}", n + 1))?;
            match marker {
                None => out.keys.push(key),
                Some("cert-authority") => out.authorities.push(key),
                Some("revoked") => out.revoked.push(key),
                Some(other) => return Err(format!("line {}: unknown marker @{other}", n + 1)),
            }
        }
        if out.keys.is_empty() && out.authorities.is_empty() {
            return Err("lists no host key and no @cert-authority".into());
        }
        Ok(out)
    }

    pub fn read(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Whether the server's key (or host certificate, for `names`) is one this file
    /// accepts; the refusal names the key presented and the keys expected.
    pub fn check(
        &self,
        presented: &PublicKeyOrCertificate,
        names: &[String],
    ) -> Result<(), String> {
        match presented {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                if self.is_revoked(key) {
                    return Err(format!("the host key {} is marked @revoked", describe(key)));
                }
                if self.keys.iter().any(|k| k.key_data() == key.key_data()) {
                    return Ok(());
                }
                Err(format!(
                    "the server's host key {} is not the one expected ({})",
                    describe(key),
                    self.expected()
                ))
            }
            PublicKeyOrCertificate::Certificate(cert) => self.check_certificate(cert, names),
        }
    }

    fn check_certificate(&self, cert: &Certificate, names: &[String]) -> Result<(), String> {
        let key = PublicKey::new(cert.public_key().clone(), "");
        if self.is_revoked(&key) {
            return Err(format!(
                "the host key {} is marked @revoked",
                describe(&key)
            ));
        }
        // A plain entry for the certified key itself is enough, as in OpenSSH.
        if self.keys.iter().any(|k| k.key_data() == key.key_data()) {
            return Ok(());
        }
        let authorities: Vec<_> = self
            .authorities
            .iter()
            .map(|a| a.fingerprint(HashAlg::Sha256))
            .collect();
        let signer = PublicKey::new(cert.signature_key().clone(), "");
        if cert.cert_type() != russh::keys::ssh_key::certificate::CertType::Host {
            return Err(format!(
                "the server presented a user certificate ({}) as its host key",
                describe(&key)
            ));
        }
        if let Err(e) = cert.validate(authorities.iter()) {
            return Err(format!(
                "the server's host certificate for {} (signed by {}) is not accepted: {e} ({})",
                describe(&key),
                describe(&signer),
                self.expected()
            ));
        }
        let principals = cert.valid_principals();
        let named = principals.is_empty()
            || principals
                .iter()
                .any(|p| names.iter().any(|n| n.eq_ignore_ascii_case(p)));
        if !named {
            return Err(format!(
                "the server's host certificate names {} but the target is {}",
                principals.join(", "),
                names.join(", ")
            ));
        }
        Ok(())
    }

    fn is_revoked(&self, key: &PublicKey) -> bool {
        self.revoked.iter().any(|r| r.key_data() == key.key_data())
    }

    fn expected(&self) -> String {
        let mut parts: Vec<String> = self.keys.iter().map(describe).collect();
        parts.extend(
            self.authorities
                .iter()
                .map(|a| format!("host certificates signed by {}", describe(a))),
        );
        format!("known_hosts lists {}", parts.join(", "))
    }
}

fn describe(key: &PublicKey) -> String {
    format!(
        "{} {}",
        key.algorithm().as_str(),
        key.fingerprint(HashAlg::Sha256)
    )
}

/// The russh client callbacks of the upstream leg.
pub struct UpstreamHandler {
    pub known_hosts: Arc<KnownHosts>,
    /// The names the server's host certificate may carry (address, host, host names).
    pub names: Vec<String>,
    /// Why the host key was refused, for the connection's refusal event.
    pub refusal: Arc<Mutex<Option<String>>>,
    /// The client-facing session, once it runs: where a remote forward's connections go.
    pub client: Arc<Mutex<Option<russh::server::Handle>>>,
    /// Set when a remote forward (`ssh -R`) a policy allowed is in place; until then the
    /// server may not open forwarded-tcpip channels.
    pub remote_forwards: Arc<std::sync::atomic::AtomicBool>,
    /// The relays of forwarded connections; they end with the connection.
    pub relays: tokio::task::JoinSet<()>,
}

impl client::Handler for UpstreamHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match self.known_hosts.check(server_public_key, &self.names) {
            Ok(()) => Ok(true),
            Err(why) => {
                *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                Ok(false)
            }
        }
    }

    // The server may not reach back into the bastion: russh accepts these by default.
    async fn server_channel_open_agent_forward(
        &mut self,
        _channel: Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        tracing::warn!("the upstream server tried to open an agent channel; refused");
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    async fn server_channel_open_x11(
        &mut self,
        _channel: Channel<client::Msg>,
        _originator_address: &str,
        _originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        reply
            .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
            .await;
        Ok(())
    }

    /// A connection to a remote forward (`ssh -R`): opened towards the client, then relayed
    /// both ways. Only while a forward a policy allowed is in place. The client is asked in
    /// a task, so this session's loop never waits on the client's.
    async fn server_channel_open_forwarded_tcpip(
        &mut self,
        channel: Channel<client::Msg>,
        connected_address: &str,
        connected_port: u32,
        originator_address: &str,
        originator_port: u32,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let client = self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let (true, Some(client)) = (
            self.remote_forwards
                .load(std::sync::atomic::Ordering::SeqCst),
            client,
        ) else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let (connected, originator) = (
            connected_address.to_string(),
            originator_address.to_string(),
        );
        self.relays.spawn(async move {
            let down = match client
                .channel_open_forwarded_tcpip(
                    connected,
                    connected_port,
                    originator,
                    originator_port,
                )
                .await
            {
                Ok(c) => c,
                Err(_) => {
                    reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
                    return;
                }
            };
            reply.accept().await;
            relay_both_ways(channel, down).await;
        });
        Ok(())
    }
}

/// Moves bytes both ways between two channels until both sides closed.
async fn relay_both_ways(up: Channel<client::Msg>, down: Channel<russh::server::Msg>) {
    let (mut up_read, up_write) = up.split();
    let (mut down_read, down_write) = down.split();
    let upward = async {
        while let Some(msg) = down_read.wait().await {
            let sent = match msg {
                russh::ChannelMsg::Data { data } => up_write.data_bytes(data).await,
                russh::ChannelMsg::Eof => up_write.eof().await,
                russh::ChannelMsg::Close => break,
                _ => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = up_write.close().await;
    };
    let downward = async {
        while let Some(msg) = up_read.wait().await {
            let sent = match msg {
                russh::ChannelMsg::Data { data } => down_write.data_bytes(data).await,
                russh::ChannelMsg::Eof => down_write.eof().await,
                russh::ChannelMsg::Close => break,
                _ => Ok(()),
            };
            if sent.is_err() {
                break;
            }
        }
        let _ = down_write.close().await;
    };
    tokio::join!(upward, downward);
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use russh::keys::ssh_key::private::{Ed25519Keypair, PrivateKey};

    fn key(seed: u8) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
    }

    fn plain(k: &PrivateKey) -> PublicKeyOrCertificate {
        PublicKeyOrCertificate::PublicKey {
            key: k.public_key().clone(),
            hash_alg: None,
        }
    }

    #[test]
    fn a_listed_key_is_accepted_and_another_is_refused_naming_both() {
        let known = key(1);
        let other = key(2);
        let file = format!(
            "# comment\n[127.0.0.1]:22 {}\n",
            known.public_key().to_openssh().unwrap()
        );
        let hosts = KnownHosts::parse(&file).unwrap();
        hosts.check(&plain(&known), &[]).unwrap();
        let err = hosts.check(&plain(&other), &[]).unwrap_err();
        assert!(
            err.contains(&other.public_key().fingerprint(HashAlg::Sha256).to_string()),
            "{err}"
        );
        assert!(
            err.contains(&known.public_key().fingerprint(HashAlg::Sha256).to_string()),
            "{err}"
        );
    }

    #[test]
    fn revoked_wins_and_empty_or_unknown_markers_are_errors() {
        let k = key(3);
        let line = k.public_key().to_openssh().unwrap();
        let hosts = KnownHosts::parse(&format!("h {line}\n@revoked * {line}\n")).unwrap();
        assert!(hosts
            .check(&plain(&k), &[])
            .unwrap_err()
            .contains("@revoked"));
        assert!(KnownHosts::parse("# nothing\n").is_err());
        assert!(KnownHosts::parse(&format!("@trusted * {line}\n")).is_err());
        assert!(KnownHosts::parse("h ssh-ed25519 notbase64\n").is_err());
    }
}
