//! Who is behind a connection. The one lookup every protocol uses: the kernel's uid for
//! the socket (from the origin record or SO_PEERCRED), resolved to the Unix account.
//! The OIDC session bound to that uid joins here when identity login lands.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    /// The Unix account name, when NSS knows the uid.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// Resolves the identity for a uid/gid the kernel reported. Never trusts a client claim.
pub fn lookup(uid: u32, gid: u32) -> Identity {
    Identity {
        uid,
        gid,
        user: crate::sys::user_name(uid),
    }
}
