//! Targets named by a DNS `host`: every A and AAAA record is a protected address. The
//! names are resolved before the programs are attached (a name that resolves to nothing
//! stops the start: a target that protects nothing would be a silent hole), again when
//! the records' TTL runs out (within `[dns] min_ttl_secs..=max_ttl_secs`), and on SIGHUP.
//! A change is applied to the kernel's trie, added addresses first, and logged and
//! recorded as a `target.addresses_changed` event. A lookup that fails keeps the
//! addresses already protected: a resolver outage never removes protection.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::TokioResolver;
use tokio_util::sync::CancellationToken;

use crate::config::{canonical_ip, DnsConfig, ProtectedTarget, MAX_ADDRESSES_PER_TARGET};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("cannot set up the DNS resolver: {0}")]
    Setup(String),
    #[error("target `{target}`: host `{host}` did not resolve: {reason}")]
    Lookup {
        target: String,
        host: String,
        reason: String,
    },
    #[error("target `{target}`: host `{host}` has {count} addresses; at most {MAX_ADDRESSES_PER_TARGET} are protected per target")]
    TooMany {
        target: String,
        host: String,
        count: usize,
    },
}

/// The addresses each `host` target resolved to, read on every accepted connection.
#[derive(Default)]
pub struct ResolvedHosts {
    by_target: ArcSwap<BTreeMap<u32, BTreeSet<IpAddr>>>,
}

impl ResolvedHosts {
    pub fn covers(&self, target_id: u32, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.by_target
            .load()
            .get(&target_id)
            .is_some_and(|set| set.contains(&ip))
    }

    pub fn addresses(&self, target_id: u32) -> BTreeSet<IpAddr> {
        self.by_target
            .load()
            .get(&target_id)
            .cloned()
            .unwrap_or_default()
    }

    fn set(&self, target_id: u32, addresses: BTreeSet<IpAddr>) {
        self.by_target.rcu(|current| {
            let mut next = BTreeMap::clone(current);
            next.insert(target_id, addresses.clone());
            next
        });
    }
}

/// What changed for one target between two lookups.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AddressChange {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
}

impl AddressChange {
    pub fn between(before: &BTreeSet<IpAddr>, after: &BTreeSet<IpAddr>) -> Self {
        Self {
            added: after.difference(before).copied().collect(),
            removed: before.difference(after).copied().collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

pub struct HostResolver {
    resolver: TokioResolver,
    min_ttl: Duration,
    max_ttl: Duration,
}

impl HostResolver {
    pub fn new(config: &DnsConfig) -> Result<Self, DnsError> {
        let mut options = ResolverOpts::default();
        options.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        // The re-resolution schedule follows the answers' TTL; a cache would only return
        // the same answer until then.
        options.cache_size = 0;
        let provider = TokioRuntimeProvider::default();
        let builder = if config.nameservers.is_empty() {
            TokioResolver::builder(provider).map_err(|e| {
                DnsError::Setup(format!(
                    "reading /etc/resolv.conf: {e} (or set [dns] nameservers)"
                ))
            })?
        } else {
            let servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut server = NameServerConfig::udp_and_tcp(addr.ip());
                    for connection in &mut server.connections {
                        connection.port = addr.port();
                    }
                    server
                })
                .collect();
            TokioResolver::builder_with_config(ResolverConfig::from_name_servers(servers), provider)
        };
        let resolver = builder
            .with_options(options)
            .build()
            .map_err(|e| DnsError::Setup(e.to_string()))?;
        Ok(Self {
            resolver,
            min_ttl: Duration::from_secs(config.min_ttl_secs.max(1)),
            max_ttl: Duration::from_secs(config.max_ttl_secs.max(config.min_ttl_secs.max(1))),
        })
    }

    /// Every A and AAAA address of `target`'s host, and when to ask again.
    pub async fn resolve(
        &self,
        target: &ProtectedTarget,
    ) -> Result<(BTreeSet<IpAddr>, Instant), DnsError> {
        let host = target.host.as_deref().unwrap_or_default();
        let lookup_error = |reason: String| DnsError::Lookup {
            target: target.name.clone(),
            host: host.to_string(),
            reason,
        };
        // Fully qualified: no search domain is ever appended to a configured name.
        let lookup = self
            .resolver
            .lookup_ip(format!("{host}."))
            .await
            .map_err(|e| lookup_error(e.to_string()))?;
        let addresses: BTreeSet<IpAddr> = lookup.iter().map(canonical_ip).collect();
        if addresses.is_empty() {
            return Err(lookup_error("no A or AAAA record".into()));
        }
        if addresses.len() + target.addresses.len() > MAX_ADDRESSES_PER_TARGET {
            return Err(DnsError::TooMany {
                target: target.name.clone(),
                host: host.to_string(),
                count: addresses.len(),
            });
        }
        let now = Instant::now();
        let ttl = lookup
            .valid_until()
            .saturating_duration_since(now)
            .clamp(self.min_ttl, self.max_ttl);
        Ok((addresses, now + ttl))
    }
}

/// Resolves every `host` before anything is attached; any failure stops the start.
pub async fn resolve_all(
    resolver: &HostResolver,
    targets: &[ProtectedTarget],
    resolved: &ResolvedHosts,
) -> Result<BTreeMap<u32, Instant>, DnsError> {
    let mut schedule = BTreeMap::new();
    for target in targets.iter().filter(|t| t.host.is_some()) {
        let (addresses, next) = resolver.resolve(target).await?;
        tracing::info!(
            target = %target.name,
            host = target.host.as_deref().unwrap_or_default(),
            addresses = %join(&addresses),
            "protecting the addresses the target's host resolves to"
        );
        resolved.set(target.id, addresses);
        schedule.insert(target.id, next);
    }
    Ok(schedule)
}

/// Keeps every `host` target's addresses current until `stop`. `apply` puts a change into
/// force (the kernel's trie, added addresses first) and records it.
pub async fn maintain(
    resolver: HostResolver,
    targets: Arc<Vec<ProtectedTarget>>,
    resolved: Arc<ResolvedHosts>,
    mut schedule: BTreeMap<u32, Instant>,
    apply: impl Fn(&ProtectedTarget, &AddressChange, &BTreeSet<IpAddr>) -> Result<(), String> + Send,
    stop: CancellationToken,
) {
    if schedule.is_empty() {
        return;
    }
    let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler for DNS targets; TTLs still apply");
            None
        }
    };
    loop {
        let next = schedule
            .values()
            .min()
            .copied()
            .unwrap_or_else(Instant::now);
        let due: Vec<u32> = tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep_until(next.into()) => {
                let now = Instant::now();
                schedule.iter().filter(|(_, at)| **at <= now).map(|(id, _)| *id).collect()
            }
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => {
                tracing::info!("SIGHUP: resolving every target host again");
                schedule.keys().copied().collect()
            }
        };
        for id in due {
            let Some(target) = targets.iter().find(|t| t.id == id) else {
                continue;
            };
            match resolver.resolve(target).await {
                Ok((after, next)) => {
                    schedule.insert(id, next);
                    let before = resolved.addresses(id);
                    let change = AddressChange::between(&before, &after);
                    if change.is_empty() {
                        continue;
                    }
                    if let Err(e) = apply(target, &change, &after) {
                        // Whatever part was applied stays; the next lookup tries again.
                        tracing::error!(target = %target.name, error = %e, "could not update the protected addresses");
                        schedule.insert(id, Instant::now() + resolver.min_ttl);
                        continue;
                    }
                    resolved.set(id, after);
                }
                Err(e) => {
                    tracing::warn!(error = %e, "DNS lookup failed; the addresses already protected stay protected");
                    schedule.insert(id, Instant::now() + resolver.min_ttl);
                }
            }
        }
    }
}

pub fn join(addresses: &BTreeSet<IpAddr>) -> String {
    addresses
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    use crate::config::validate_host_name;

    #[test]
    fn host_names_are_checked_and_normalised() {
        assert_eq!(validate_host_name("DB1.Internal.").unwrap(), "db1.internal");
        assert_eq!(
            validate_host_name("db-1.example.com").unwrap(),
            "db-1.example.com"
        );
        assert_eq!(validate_host_name("localhost").unwrap(), "localhost");
        for bad in [
            "",
            ".",
            "a..b",
            "-db.internal",
            "db-.internal",
            "db_1.internal",
            "db 1",
            "127.0.0.1",
            "::1",
            "1.2.3.4.5",
            &"a".repeat(64),
            &format!("{}.x", "a.".repeat(130)),
        ] {
            assert!(validate_host_name(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn changes_list_added_and_removed_addresses() {
        let set =
            |s: &[&str]| -> BTreeSet<IpAddr> { s.iter().map(|a| a.parse().unwrap()).collect() };
        let change =
            AddressChange::between(&set(&["127.0.0.1", "::1"]), &set(&["127.0.0.2", "::1"]));
        assert_eq!(change.added, vec!["127.0.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(change.removed, vec!["127.0.0.1".parse::<IpAddr>().unwrap()]);
        assert!(AddressChange::between(&set(&["::1"]), &set(&["::1"])).is_empty());
    }

    #[test]
    fn resolved_hosts_answer_for_v4_mapped_addresses_too() {
        let hosts = ResolvedHosts::default();
        hosts.set(3, ["127.0.0.7".parse().unwrap()].into_iter().collect());
        assert!(hosts.covers(3, "127.0.0.7".parse().unwrap()));
        assert!(hosts.covers(3, "::ffff:127.0.0.7".parse().unwrap()));
        assert!(!hosts.covers(4, "127.0.0.7".parse().unwrap()));
        assert!(!hosts.covers(3, "127.0.0.8".parse().unwrap()));
    }
}
