//! The one place where a PostgreSQL session's failures become the client's wire errors.
//! Messages say what happened and what to do; they never carry a credential.

use portcullis_pgwire::ErrorFields;

use super::upstream::UpstreamError;

/// SQLSTATEs the agent itself reports (PostgreSQL docs, appendix "PostgreSQL Error Codes").
pub mod sqlstate {
    pub const INVALID_AUTHORIZATION: &str = "28000";
    pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
    pub const SYNTAX_ERROR: &str = "42601";
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    pub const CONNECTION_FAILURE: &str = "08006";
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    pub const SYSTEM_ERROR: &str = "58000";
    pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
    pub const INVALID_CURSOR_NAME: &str = "34000";
    pub const DUPLICATE_PREPARED_STATEMENT: &str = "42P05";
    pub const DUPLICATE_CURSOR: &str = "42P03";
    pub const PROGRAM_LIMIT_EXCEEDED: &str = "54000";
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    pub const IO_ERROR: &str = "58030";
}

/// Why the agent refuses a session or a statement.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{0}")]
    NoIdentity(crate::identity::ResolveError),
    #[error("connection denied by policy: {reason}")]
    ConnectDenied {
        reason: String,
        policy_ids: Vec<String>,
    },
    #[error("{0}")]
    Refused(String),
    /// A start-up parameter off the agent's list, or a value it cannot check statements under.
    #[error(transparent)]
    Parameter(#[from] super::params::ParamError),
    #[error("{0}")]
    Upstream(#[from] UpstreamError),
    #[error("{0}")]
    Capacity(String),
    /// Admission could not open the connection: at its connection limit, or the audit
    /// store could not record it. Both read as the server's "no slot" (53300).
    #[error("{0}")]
    Open(crate::admission::OpenError),
    #[error("{0}")]
    Internal(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// A statement the policy refused; the session continues.
    #[error("statement denied by policy: {reason}")]
    StatementDenied {
        reason: String,
        policy_ids: Vec<String>,
    },
    /// A statement whose policy asks for approval, where it cannot wait for one (the
    /// extended protocol); the session continues. A simple query waits instead.
    #[error("statement requires approval: {reason}; only a statement sent as a simple query (psql) can wait for one")]
    ApprovalRequired {
        reason: String,
        policy_ids: Vec<String>,
        requirement: portcullis_policy::ApprovalRequirement,
    },
    /// A statement that does not parse is never forwarded.
    #[error("statement refused: it does not parse: {0}")]
    Unparsable(String),
    /// A statement the agent never lets through, whatever the policy (it would change how
    /// the server reads later statements); the session continues.
    #[error("statement refused: {0}")]
    Unsafe(String),
    /// A statement or portal name the session cannot use as the client asks: not one it
    /// created through the protocol, or one that exists already. Carries the SQLSTATE the
    /// server gives for that, so a driver recovers as from the server's own error (one
    /// that re-prepares on 26000, for instance); the session continues.
    #[error("statement refused: {message}")]
    NameRefused {
        sqlstate: &'static str,
        message: String,
    },
    /// The session keeps as many prepared statements or portals as the agent keeps for one
    /// (a bound on the agent's memory); the session continues.
    #[error("statement refused: {0}")]
    Limit(String),
    /// A value a masking profile selects could not be masked; the session ends.
    #[error("{0}")]
    Unmaskable(String),
    /// The agent ended the session (the user's login ended, or the agent is stopping);
    /// a driver reads 57P01 as "reconnect later", as after a server shutdown.
    #[error("the session was closed by the agent (logout, session end or shutdown)")]
    ClosedByAgent,
    /// The audit trail cannot be written, so nothing more runs unrecorded; the session ends.
    #[error("{0}")]
    AuditUnwritable(String),
}

impl PgError {
    /// Whether the session ends with this error (FATAL) or only the statement fails (ERROR).
    pub fn is_fatal(&self) -> bool {
        !matches!(
            self,
            PgError::StatementDenied { .. }
                | PgError::ApprovalRequired { .. }
                | PgError::Unparsable(_)
                | PgError::Unsafe(_)
                | PgError::NameRefused { .. }
                | PgError::Limit(_)
        )
    }

    pub fn sqlstate(&self) -> &'static str {
        use sqlstate::*;
        match self {
            PgError::NoIdentity(_) => INVALID_AUTHORIZATION,
            PgError::ConnectDenied { .. }
            | PgError::StatementDenied { .. }
            | PgError::ApprovalRequired { .. }
            | PgError::Refused(_)
            | PgError::Parameter(_)
            | PgError::Unsafe(_)
            | PgError::Unmaskable(_) => INSUFFICIENT_PRIVILEGE,
            PgError::Upstream(UpstreamError::NoCredential { .. })
            | PgError::Upstream(UpstreamError::Credentials { .. }) => INVALID_AUTHORIZATION,
            PgError::Upstream(_) => CONNECTION_FAILURE,
            PgError::Capacity(_) | PgError::Open(_) => TOO_MANY_CONNECTIONS,
            PgError::Internal(_) => SYSTEM_ERROR,
            PgError::Protocol(_) => PROTOCOL_VIOLATION,
            PgError::Unparsable(_) => SYNTAX_ERROR,
            PgError::NameRefused { sqlstate, .. } => sqlstate,
            PgError::Limit(_) => PROGRAM_LIMIT_EXCEEDED,
            PgError::ClosedByAgent => ADMIN_SHUTDOWN,
            PgError::AuditUnwritable(_) => IO_ERROR,
        }
    }

    /// The ErrorResponse the client sees.
    pub fn to_fields(&self) -> ErrorFields {
        let severity = if self.is_fatal() { "FATAL" } else { "ERROR" };
        match self {
            // The server's own answer (unknown database, too many clients) is the most useful
            // thing to show, except for a rejected credential, which is the operator's to fix.
            PgError::Upstream(UpstreamError::Refused(fields))
                if !matches!(fields.sqlstate(), Some("28P01" | "28000")) =>
            {
                let mut f = fields.clone();
                f.set(b'S', "FATAL".into());
                f.set(b'V', "FATAL".into());
                f
            }
            PgError::Upstream(UpstreamError::Refused(_)) => ErrorFields::new(
                severity,
                sqlstate::INVALID_AUTHORIZATION,
                "Portcullis: the server rejected the agent's credential for this role",
            )
            .with_hint("Ask an administrator to update the target's credentials file."),
            PgError::NoIdentity(reason) => {
                ErrorFields::new(severity, self.sqlstate(), format!("Portcullis: {reason}"))
                    .with_hint("Run `portcullis login`, then connect again.")
            }
            PgError::ConnectDenied { policy_ids, .. }
            | PgError::StatementDenied { policy_ids, .. }
            | PgError::ApprovalRequired { policy_ids, .. } => {
                let mut f =
                    ErrorFields::new(severity, self.sqlstate(), format!("Portcullis: {self}"));
                if !policy_ids.is_empty() {
                    f = f.with_detail(format!("Policy: {}", policy_ids.join(", ")));
                }
                f.with_hint("`portcullis policy explain` shows which rule decided and why.")
            }
            _ => ErrorFields::new(severity, self.sqlstate(), format!("Portcullis: {self}")),
        }
    }
}

/// The NoticeResponse a client waiting for an approval gets: `waits` says what waits and
/// for how long; the hint is the same for every wait, naming the request to approve and
/// to follow.
pub fn encode_approval_notice(waits: String, request_id: &str, out: &mut bytes::BytesMut) {
    portcullis_pgwire::encode_notice_response(
        &ErrorFields::new("NOTICE", "01000", format!("Portcullis: {waits}")).with_hint(format!(
            "An approver runs `portcullis approvals approve {request_id}`; follow it with `portcullis approvals show {request_id}`."
        )),
        out,
    );
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn denials_are_errors_with_42501_and_name_the_policy() {
        let e = PgError::StatementDenied {
            reason: "forbid no-drop".into(),
            policy_ids: vec!["no-drop".into()],
        };
        let f = e.to_fields();
        assert_eq!(f.severity(), Some("ERROR"));
        assert_eq!(f.sqlstate(), Some("42501"));
        assert_eq!(f.detail(), Some("Policy: no-drop"));
        assert!(!e.is_fatal());
    }

    #[test]
    fn a_refused_name_carries_the_servers_sqlstate_and_the_session_goes_on() {
        let e = PgError::NameRefused {
            sqlstate: sqlstate::INVALID_CURSOR_NAME,
            message: "Execute of portal \"c\" ...".into(),
        };
        let f = e.to_fields();
        assert_eq!((f.severity(), f.sqlstate()), (Some("ERROR"), Some("34000")));
        assert!(f.message().unwrap().contains("portal \"c\""));
        assert!(!e.is_fatal());
    }

    #[test]
    fn a_refused_start_up_parameter_is_fatal_42501_naming_it() {
        let e = PgError::from(super::super::params::ParamError::Identity {
            name: "role".into(),
            in_options: true,
        });
        let f = e.to_fields();
        assert_eq!((f.severity(), f.sqlstate()), (Some("FATAL"), Some("42501")));
        assert!(f.message().unwrap().contains("`role` (in `options`)"));
    }

    #[test]
    fn no_identity_is_fatal_28000_and_says_what_to_do() {
        let f = PgError::NoIdentity(crate::identity::ResolveError::NoLogin {
            who: "uid 1000".into(),
        })
        .to_fields();
        assert_eq!((f.severity(), f.sqlstate()), (Some("FATAL"), Some("28000")));
        assert_eq!(
            f.message(),
            Some("Portcullis: no valid login for uid 1000: run `portcullis login`")
        );
        assert!(f.get(b'H').unwrap().contains("portcullis login"));
    }

    #[test]
    fn a_rejected_credential_is_not_the_servers_message() {
        let server = ErrorFields::new(
            "FATAL",
            "28P01",
            "password authentication failed for user \"app\"",
        );
        let f = PgError::Upstream(UpstreamError::Refused(server)).to_fields();
        assert_eq!(f.sqlstate(), Some("28000"));
        assert!(!f.message().unwrap().contains("password authentication"));
        let server = ErrorFields::new("FATAL", "3D000", "database \"nope\" does not exist");
        let f = PgError::Upstream(UpstreamError::Refused(server)).to_fields();
        assert_eq!(f.sqlstate(), Some("3D000"));
    }

    #[test]
    fn the_agents_own_endings_are_fatal_with_their_sqlstates_and_messages() {
        let f = PgError::ClosedByAgent.to_fields();
        assert_eq!((f.severity(), f.sqlstate()), (Some("FATAL"), Some("57P01")));
        assert_eq!(
            f.message(),
            Some(
                "Portcullis: the session was closed by the agent (logout, session end or shutdown)"
            )
        );
        let f = PgError::AuditUnwritable("the audit trail cannot be written".into()).to_fields();
        assert_eq!((f.severity(), f.sqlstate()), (Some("FATAL"), Some("58030")));
        assert_eq!(
            f.message(),
            Some("Portcullis: the audit trail cannot be written")
        );
        let f = PgError::Open(crate::admission::OpenError::AtCapacity(5)).to_fields();
        assert_eq!((f.severity(), f.sqlstate()), (Some("FATAL"), Some("53300")));
        assert_eq!(
            f.message(),
            Some("Portcullis: connection limit of 5 reached")
        );
        let f = PgError::Capacity("too many connections".into()).to_fields();
        assert_eq!((f.severity(), f.sqlstate()), (Some("FATAL"), Some("53300")));
        assert_eq!(f.message(), Some("Portcullis: too many connections"));
    }
}
