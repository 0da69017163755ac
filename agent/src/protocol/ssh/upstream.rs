//! The agent's own SSH connection to the target (RFC 4253 transport, RFC 4252 user auth,
//! OpenSSH PROTOCOL.certkeys): the server's host key is checked against the target's
//! known_hosts file, and the agent logs in with a user certificate from its user CA (or the
//! target's own private key file). The server may open channels towards the agent only
//! for what a policy allowed on this connection: connections to an allowed remote forward,
//! and agent channels once agent forwarding was allowed; X11 never.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use russh::client;
use russh::keys::ssh_key::{Certificate, HashAlg, PublicKey};
use russh::keys::PublicKeyOrCertificate;
use russh::Channel;

use super::forward::{self, ForwardLog};
use super::writer::ConnectionBudget;
use crate::admission::Gate;
use crate::audit::{AuditEvent, Decision, EventKind};

/// A target's known_hosts file, read as OpenSSH reads its own (sshd(8) "SSH_KNOWN_HOSTS
/// FILE FORMAT"): a line applies to the target when its host field matches one of the
/// target's names or addresses, written `[host]:port` for a port other than 22.
#[derive(Debug, Default)]
pub struct KnownHosts {
    keys: Vec<Entry>,
    authorities: Vec<Entry>,
    /// Refused whatever host they name: stricter than OpenSSH, which applies `@revoked` to
    /// the hosts of its line only (a key revoked for one host is not one to trust for another).
    revoked: Vec<PublicKey>,
}

#[derive(Debug)]
struct Entry {
    hosts: Hosts,
    key: PublicKey,
}

#[derive(Debug)]
enum Hosts {
    /// Comma-separated patterns with `*` and `?`; a `!pattern` that matches excludes the
    /// host whatever else matches.
    Patterns(Vec<(bool, String)>),
    /// `|1|salt|hash`: HMAC-SHA1 of the host, keyed with the salt (ssh-keygen -H).
    Hashed { salt: Vec<u8>, hash: Vec<u8> },
}

impl Hosts {
    fn parse(field: &str) -> Result<Self, String> {
        if let Some(rest) = field.strip_prefix("|1|") {
            use base64::Engine as _;
            let b64 = base64::engine::general_purpose::STANDARD;
            let (salt, hash) = rest
                .split_once('|')
                .ok_or("a hashed host name is |1|salt|hash")?;
            let salt = b64
                .decode(salt)
                .map_err(|e| format!("hashed host name salt: {e}"))?;
            let hash = b64
                .decode(hash)
                .map_err(|e| format!("hashed host name hash: {e}"))?;
            if salt.len() != 20 || hash.len() != 20 {
                return Err("a hashed host name's salt and hash are 20 bytes each (SHA-1)".into());
            }
            return Ok(Self::Hashed { salt, hash });
        }
        if field.starts_with('|') {
            return Err(format!(
                "unknown hashed host name format `{field}` (only |1| exists)"
            ));
        }
        let patterns: Vec<(bool, String)> = field
            .split(',')
            .filter(|p| !p.is_empty())
            .map(|p| match p.strip_prefix('!') {
                Some(negated) => (true, negated.to_ascii_lowercase()),
                None => (false, p.to_ascii_lowercase()),
            })
            .collect();
        if patterns.is_empty() {
            return Err("no host pattern".into());
        }
        Ok(Self::Patterns(patterns))
    }

    /// Whether the line applies to `host` (already `[name]:port` for a port other than 22).
    fn matches(&self, host: &str) -> bool {
        match self {
            Self::Hashed { salt, hash } => {
                let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY, salt);
                ring::hmac::verify(&key, host.as_bytes(), hash).is_ok()
            }
            Self::Patterns(patterns) => {
                let host = host.to_ascii_lowercase();
                let mut matched = false;
                for (negated, pattern) in patterns {
                    if wildcard_match(pattern.as_bytes(), host.as_bytes()) {
                        if *negated {
                            return false;
                        }
                        matched = true;
                    }
                }
                matched
            }
        }
    }
}

/// `*` matches any run of characters, `?` any one, everything else itself (OpenSSH's
/// match_pattern). Iterative with one backtrack point, so a pattern of many stars stays
/// linear rather than exponential.
fn wildcard_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || Some(&c) == text.get(t) => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern
        .get(p..)
        .is_some_and(|rest| rest.iter().all(|&c| c == b'*'))
}

/// How OpenSSH names a host in known_hosts: the bare name on port 22, `[name]:port` elsewhere.
fn lookup_name(name: &str, port: u16) -> String {
    if port == 22 {
        name.to_string()
    } else {
        format!("[{name}]:{port}")
    }
}

impl KnownHosts {
    /// Parses OpenSSH's known_hosts format (sshd(8) "SSH_KNOWN_HOSTS FILE FORMAT"):
    /// `[@cert-authority|@revoked] hosts keytype base64 [comment]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut out = Self::default();
        for (n, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}", n + 1);
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let mut first = words.next().unwrap_or_default();
            let marker = first.strip_prefix('@');
            if marker.is_some() {
                first = words
                    .next()
                    .ok_or_else(|| at("a marker without hosts".into()))?;
            }
            let hosts = Hosts::parse(first).map_err(at)?;
            let key_text: Vec<&str> = words.collect();
            let key = PublicKey::from_openssh(&key_text.join(" "))
                .map_err(|e| at(format!("not a public key: {e}")))?;
            match marker {
                None => out.keys.push(Entry { hosts, key }),
                Some("cert-authority") => out.authorities.push(Entry { hosts, key }),
                Some("revoked") => out.revoked.push(key),
                Some(other) => return Err(at(format!("unknown marker @{other}"))),
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

    /// The entries of `list` whose hosts match one of the target's `names` on `port`.
    fn for_target<'a>(
        list: &'a [Entry],
        names: &'a [String],
        port: u16,
    ) -> impl Iterator<Item = &'a PublicKey> + 'a {
        let lookups: Vec<String> = names.iter().map(|n| lookup_name(n, port)).collect();
        list.iter()
            .filter(move |e| lookups.iter().any(|l| e.hosts.matches(l)))
            .map(|e| &e.key)
    }

    /// Whether the server's key (or host certificate) is one this file accepts for the
    /// target known as `names` on `port`; the refusal names the key presented and the keys
    /// expected.
    pub fn check(
        &self,
        presented: &PublicKeyOrCertificate,
        names: &[String],
        port: u16,
    ) -> Result<(), String> {
        match presented {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                if self.is_revoked(key) {
                    return Err(format!("the host key {} is marked @revoked", describe(key)));
                }
                if Self::for_target(&self.keys, names, port).any(|k| k.key_data() == key.key_data())
                {
                    return Ok(());
                }
                Err(format!(
                    "the server's host key {} is not the one expected ({})",
                    describe(key),
                    self.expected(names, port)
                ))
            }
            PublicKeyOrCertificate::Certificate(cert) => self.check_certificate(cert, names, port),
        }
    }

    fn check_certificate(
        &self,
        cert: &Certificate,
        names: &[String],
        port: u16,
    ) -> Result<(), String> {
        let key = PublicKey::new(cert.public_key().clone(), "");
        if self.is_revoked(&key) {
            return Err(format!(
                "the host key {} is marked @revoked",
                describe(&key)
            ));
        }
        // A plain entry for the certified key itself is enough, as in OpenSSH.
        if Self::for_target(&self.keys, names, port).any(|k| k.key_data() == key.key_data()) {
            return Ok(());
        }
        let signer = PublicKey::new(cert.signature_key().clone(), "");
        if self.is_revoked(&signer) {
            return Err(format!(
                "the host certificate for {} is signed by {}, which is marked @revoked",
                describe(&key),
                describe(&signer)
            ));
        }
        let authorities: Vec<_> = Self::for_target(&self.authorities, names, port)
            .map(|a| a.fingerprint(HashAlg::Sha256))
            .collect();
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
                self.expected(names, port)
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

    fn expected(&self, names: &[String], port: u16) -> String {
        let mut parts: Vec<String> = Self::for_target(&self.keys, names, port)
            .map(describe)
            .collect();
        parts.extend(
            Self::for_target(&self.authorities, names, port)
                .map(|a| format!("host certificates signed by {}", describe(a))),
        );
        if parts.is_empty() {
            let wanted: Vec<String> = names.iter().map(|n| lookup_name(n, port)).collect();
            return format!("known_hosts has no line for {}", wanted.join(", "));
        }
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
    /// The names the server's host certificate may carry (address, host, host names); the
    /// names its known_hosts lines are matched against.
    pub names: Vec<String>,
    /// The server's port, for `[host]:port` lines.
    pub port: u16,
    /// Why the host key was refused, for the connection's refusal event.
    pub refusal: Arc<Mutex<Option<String>>>,
    /// The client-facing session, once it runs: where a remote forward's connections go.
    pub client: Arc<Mutex<Option<russh::server::Handle>>>,
    /// Set when a remote forward (`ssh -R`) a policy allowed is in place; until then the
    /// server may not open forwarded-tcpip channels.
    pub remote_forwards: Arc<AtomicBool>,
    /// Set when a policy allowed agent forwarding (`ssh -A`) and the agent asked the server
    /// for it; until then the server may not open agent channels.
    pub agent_forwarding: Arc<AtomicBool>,
    /// The relays of forwarded connections; they end with the connection.
    pub relays: tokio::task::JoinSet<()>,
    /// Where this connection's events go, and what they all say (target, identity, login).
    pub gate: Arc<Gate>,
    pub event: AuditEvent,
    pub budget: ConnectionBudget,
}

impl UpstreamHandler {
    fn event(&self, kind: EventKind, channel: &str) -> AuditEvent {
        let mut ev = self.event.clone();
        ev.event = kind;
        ev.time_ms = crate::audit::now_ms();
        if let Some(fields) = ev.ssh.as_mut() {
            fields.channel = Some(channel.to_string());
        }
        ev
    }

    fn client(&self) -> Option<russh::server::Handle> {
        self.client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl client::Handler for UpstreamHandler {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_public_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        match self
            .known_hosts
            .check(server_public_key, &self.names, self.port)
        {
            Ok(()) => Ok(true),
            Err(why) => {
                *self.refusal.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
                Ok(false)
            }
        }
    }

    /// The server opens an agent channel when something on the target uses the forwarded
    /// agent (`ssh-add -l`, a hop on with `ssh`). russh accepts these by default: refused
    /// here unless a policy allowed `ssh_agent_forward` on this connection, and relayed to
    /// the client's agent (which OpenSSH opened to the agent only with `-A`) when it did.
    async fn server_channel_open_agent_forward(
        &mut self,
        channel: Channel<client::Msg>,
        reply: client::ChannelOpenHandle,
        _session: &mut client::Session,
    ) -> Result<(), Self::Error> {
        let label = "auth-agent@openssh.com";
        let client = self.client();
        let (true, Some(client)) = (self.agent_forwarding.load(Ordering::SeqCst), client) else {
            let mut ev = self.event(EventKind::SshAgentChannel, label);
            ev.decision = Some(Decision::Deny);
            ev.reason = Some(
                "the target's sshd opened an agent channel, but agent forwarding was not allowed on this connection"
                    .into(),
            );
            tracing::warn!("the upstream server tried to open an agent channel; refused");
            self.gate.audit().record(ev);
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let mut ev = self.event(EventKind::SshAgentChannel, label);
        ev.decision = Some(Decision::Allow);
        ev.reason = Some("relayed to the client's forwarded agent".into());
        self.gate.audit().record(ev);
        let budget = self.budget.clone();
        self.relays.spawn(async move {
            let down = match client.channel_open_agent().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::info!(error = %e, "the client refused an agent channel");
                    reply.reject(russh::ChannelOpenFailure::ConnectFailed).await;
                    return;
                }
            };
            reply.accept().await;
            forward::relay(channel, down, budget, client, None).await;
        });
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
        let client = self.client();
        let (true, Some(client)) = (self.remote_forwards.load(Ordering::SeqCst), client) else {
            reply
                .reject(russh::ChannelOpenFailure::AdministrativelyProhibited)
                .await;
            return Ok(());
        };
        let mut closed = self.event(EventKind::SshForwardClosed, "forwarded-tcpip");
        if let Some(fields) = closed.ssh.as_mut() {
            fields.forward = Some(format!("{connected_address}:{connected_port}"));
            fields.originator = Some(format!("{originator_address}:{originator_port}"));
        }
        let log = ForwardLog::new(Arc::clone(&self.gate), closed);
        let (connected, originator) = (
            connected_address.to_string(),
            originator_address.to_string(),
        );
        let budget = self.budget.clone();
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
            forward::relay(channel, down, budget, client, Some(log)).await;
        });
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;
    use russh::keys::ssh_key::certificate::{Builder, CertType};
    use russh::keys::ssh_key::private::{Ed25519Keypair, PrivateKey};

    fn key(seed: u8) -> PrivateKey {
        PrivateKey::from(Ed25519Keypair::from_seed(&[seed; 32]))
    }

    fn line(k: &PrivateKey) -> String {
        k.public_key().to_openssh().unwrap()
    }

    fn plain(k: &PrivateKey) -> PublicKeyOrCertificate {
        PublicKeyOrCertificate::PublicKey {
            key: k.public_key().clone(),
            hash_alg: None,
        }
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|n| n.to_string()).collect()
    }

    fn fingerprint(k: &PrivateKey) -> String {
        k.public_key().fingerprint(HashAlg::Sha256).to_string()
    }

    /// A host certificate for `principals`, signed by `ca`.
    fn host_cert(
        host: &PrivateKey,
        ca: &PrivateKey,
        principals: &[&str],
    ) -> PublicKeyOrCertificate {
        let mut b = Builder::new(
            [7; 16],
            host.public_key().key_data().clone(),
            0,
            u64::MAX - 1,
        )
        .unwrap();
        b.cert_type(CertType::Host).unwrap();
        for p in principals {
            b.valid_principal(*p).unwrap();
        }
        PublicKeyOrCertificate::Certificate(b.sign(ca).unwrap())
    }

    #[test]
    fn a_listed_key_is_accepted_and_another_is_refused_naming_both() {
        let known = key(1);
        let other = key(2);
        let hosts = KnownHosts::parse(&format!("# comment\n127.0.0.1 {}\n", line(&known))).unwrap();
        let at = names(&["127.0.0.1"]);
        hosts.check(&plain(&known), &at, 22).unwrap();
        let err = hosts.check(&plain(&other), &at, 22).unwrap_err();
        assert!(err.contains(&fingerprint(&other)), "{err}");
        assert!(err.contains(&fingerprint(&known)), "{err}");
    }

    #[test]
    fn a_port_other_than_22_is_written_in_brackets() {
        let k = key(4);
        let hosts = KnownHosts::parse(&format!("[127.0.0.1]:2222 {}\n", line(&k))).unwrap();
        let at = names(&["web.internal", "127.0.0.1"]);
        hosts.check(&plain(&k), &at, 2222).unwrap();
        // The same host on another port is another host to OpenSSH.
        let err = hosts.check(&plain(&k), &at, 22).unwrap_err();
        assert!(err.contains("no line for web.internal, 127.0.0.1"), "{err}");
        let err = hosts.check(&plain(&k), &at, 2200).unwrap_err();
        assert!(err.contains("[127.0.0.1]:2200"), "{err}");
        // And a bare name never matches a non-standard port.
        let bare = KnownHosts::parse(&format!("127.0.0.1 {}\n", line(&k))).unwrap();
        assert!(bare.check(&plain(&k), &at, 2222).is_err());
    }

    #[test]
    fn patterns_wildcards_and_negation() {
        let k = key(5);
        let file = format!(
            "*.example.com,!bad.example.com,web?.internal {}\n",
            line(&k)
        );
        let hosts = KnownHosts::parse(&file).unwrap();
        for ok in ["web.example.com", "A.B.EXAMPLE.COM", "web1.internal"] {
            hosts.check(&plain(&k), &names(&[ok]), 22).unwrap();
        }
        for no in [
            "bad.example.com",
            "example.com",
            "web10.internal",
            "web.internal",
            "x.example.com.evil",
        ] {
            assert!(hosts.check(&plain(&k), &names(&[no]), 22).is_err(), "{no}");
        }
        // Negation only: matches nothing.
        let only_not = KnownHosts::parse(&format!("!bad {}\n", line(&k))).unwrap();
        assert!(only_not.check(&plain(&k), &names(&["good"]), 22).is_err());
    }

    #[test]
    fn wildcards_follow_openssh_match_pattern() {
        for (pattern, text, want) in [
            ("*", "", true),
            ("*", "anything", true),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "aXbY", false),
            ("?", "", false),
            ("??", "ab", true),
            ("a**", "a", true),
            ("*.x", ".x", true),
            ("[1.2.3.4]:*", "[1.2.3.4]:2222", true),
            (
                "*a*a*a*a*a*a*a*a*b",
                "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
                false,
            ),
        ] {
            assert_eq!(
                wildcard_match(pattern.as_bytes(), text.as_bytes()),
                want,
                "{pattern} ~ {text}"
            );
        }
    }

    /// Lines hashed by OpenSSH's own `ssh-keygen -H` from `web.internal` and
    /// `[10.0.0.5]:2222`.
    const HASHED: &str = "|1|qR+0udaPEzZmnXqIjorlJb6LHr8=|pokwShIOkn42ARjKgzTUunsKVLI= ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJJHVDoUsIRT/Fc47sGKAmsvn3/MoG2gYpbign4DCUk3\n\
        |1|ERcV93Th40jkN6dDcHYfXL3pgpg=|MaYQAOC7ZSZuDmCIWh6tf/i+WeM= ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJJHVDoUsIRT/Fc47sGKAmsvn3/MoG2gYpbign4DCUk3\n";

    #[test]
    fn hashed_host_names_from_ssh_keygen_match_their_hosts_only() {
        let hosts = KnownHosts::parse(HASHED).unwrap();
        let listed = PublicKey::from_openssh(
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJJHVDoUsIRT/Fc47sGKAmsvn3/MoG2gYpbign4DCUk3",
        )
        .unwrap();
        let presented = PublicKeyOrCertificate::PublicKey {
            key: listed,
            hash_alg: None,
        };
        hosts
            .check(&presented, &names(&["web.internal"]), 22)
            .unwrap();
        hosts
            .check(&presented, &names(&["other", "10.0.0.5"]), 2222)
            .unwrap();
        // Case is part of the hash as ssh lower-cases names; ports and near names do not match.
        assert!(hosts
            .check(&presented, &names(&["web.internal"]), 2222)
            .is_err());
        assert!(hosts.check(&presented, &names(&["10.0.0.5"]), 22).is_err());
        assert!(hosts
            .check(&presented, &names(&["web.internal2"]), 22)
            .is_err());
        // A wrong key under a matching hashed name is refused, naming the expected one.
        let err = hosts
            .check(&plain(&key(9)), &names(&["web.internal"]), 22)
            .unwrap_err();
        assert!(err.contains("SHA256:"), "{err}");
    }

    #[test]
    fn malformed_hashed_names_are_errors() {
        let k = line(&key(6));
        for bad in [
            format!("|1|notbase64!|AAAA {k}\n"),
            format!("|1|qR+0udaPEzZmnXqIjorlJb6LHr8= {k}\n"),
            format!("|1|AAAA|AAAA {k}\n"),
            format!("|2|qR+0udaPEzZmnXqIjorlJb6LHr8=|pokwShIOkn42ARjKgzTUunsKVLI= {k}\n"),
        ] {
            assert!(KnownHosts::parse(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn revoked_wins_whatever_its_pattern_and_empty_or_unknown_markers_are_errors() {
        let k = key(3);
        let l = line(&k);
        let at = names(&["h"]);
        let hosts = KnownHosts::parse(&format!("h {l}\n@revoked * {l}\n")).unwrap();
        assert!(hosts
            .check(&plain(&k), &at, 22)
            .unwrap_err()
            .contains("@revoked"));
        // Revoked for another host only: still never trusted.
        let other = KnownHosts::parse(&format!("h {l}\n@revoked elsewhere {l}\n")).unwrap();
        assert!(other
            .check(&plain(&k), &at, 22)
            .unwrap_err()
            .contains("@revoked"));
        // Revoked under a hashed name.
        let hashed = KnownHosts::parse(&format!(
            "h {l}\n@revoked |1|qR+0udaPEzZmnXqIjorlJb6LHr8=|pokwShIOkn42ARjKgzTUunsKVLI= {l}\n"
        ))
        .unwrap();
        assert!(hashed.check(&plain(&k), &at, 22).is_err());
        assert!(KnownHosts::parse("# nothing\n").is_err());
        assert!(KnownHosts::parse(&format!("@revoked * {l}\n")).is_err());
        assert!(KnownHosts::parse(&format!("@trusted * {l}\n")).is_err());
        assert!(KnownHosts::parse("@cert-authority\n").is_err());
        assert!(KnownHosts::parse("h ssh-ed25519 notbase64\n").is_err());
    }

    #[test]
    fn cert_authority_lines_apply_to_their_hosts_and_a_revoked_authority_is_refused() {
        let ca = key(10);
        let host = key(11);
        let hosts = KnownHosts::parse(&format!(
            "@cert-authority *.internal,!db.internal {}\n",
            line(&ca)
        ))
        .unwrap();
        let cert = host_cert(&host, &ca, &["web.internal"]);
        hosts.check(&cert, &names(&["web.internal"]), 22).unwrap();
        // The authority is not trusted for a host its pattern does not match.
        let err = hosts
            .check(&cert, &names(&["web.example"]), 22)
            .unwrap_err();
        assert!(err.contains("not accepted"), "{err}");
        // Nor for one it excludes, even with a certificate naming it.
        let db = host_cert(&host, &ca, &["db.internal"]);
        assert!(hosts.check(&db, &names(&["db.internal"]), 22).is_err());
        // A certificate for another name is refused, naming both.
        let elsewhere = host_cert(&host, &ca, &["mail.internal"]);
        let err = hosts
            .check(&elsewhere, &names(&["web.internal"]), 22)
            .unwrap_err();
        assert!(
            err.contains("mail.internal") && err.contains("web.internal"),
            "{err}"
        );
        // A certificate from another CA is refused naming its signer.
        let rogue = key(12);
        let err = hosts
            .check(
                &host_cert(&host, &rogue, &["web.internal"]),
                &names(&["web.internal"]),
                22,
            )
            .unwrap_err();
        assert!(err.contains(&fingerprint(&rogue)), "{err}");
        // A revoked CA signs nothing this file accepts.
        let revoked = KnownHosts::parse(&format!(
            "@cert-authority * {ca}\n@revoked * {ca}\n",
            ca = line(&ca)
        ))
        .unwrap();
        let err = revoked
            .check(&cert, &names(&["web.internal"]), 22)
            .unwrap_err();
        assert!(err.contains("@revoked"), "{err}");
    }
}
