//! The vocabulary every part of the Portcullis agent shares, below all of them: where a
//! connection came from ([`Origin`]), who is behind it ([`Identity`]), the secrets that must
//! never be printed ([`Secret`]), what it carried ([`ByteCounters`]), the clock and host name,
//! and the one audit event schema ([`event`]). Nothing here depends on the agent: the agent's
//! layers (config, audit, identity, policy, admission, protocols, proxy) all build on it, so
//! none of them needs another for these words.

pub mod clock;
pub mod counters;
pub mod event;
pub mod identity;
pub mod origin;

pub use clock::{hostname, now_ms, now_secs};
pub use counters::ByteCounters;
pub use event::{ApprovalFields, AuditEvent, Decision, Encoded, EventKind, SftpFields, SshFields};
pub use identity::{Identity, IdentityKind, Secret};
pub use origin::{canonical_ip, Origin};
