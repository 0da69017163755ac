//! What the engine answers.

use std::fmt;
use std::sync::Arc;

use crate::error::Location;

/// The stable id a policy declares with `@id("…")`; decisions and audit events name policies by
/// it, so it survives reordering and moving policies between files.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PolicyId(Arc<str>);

impl PolicyId {
    pub fn new(id: &str) -> Self {
        PolicyId(Arc::from(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl PartialEq<str> for PolicyId {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for PolicyId {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

/// One group's share of an approval: `approvals` different people of `group`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Quorum {
    pub group: String,
    pub approvals: u32,
}

/// Who must approve: every quorum (an AND of groups), each person counting once, the
/// requester never (the agent's approvals module enforces the counting).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ApprovalRequirement {
    /// Never empty; at most one quorum per group.
    pub quorums: Vec<Quorum>,
}

impl ApprovalRequirement {
    /// N approvals from one group (`@approval("g") @approvals("N")`).
    pub fn of(group: &str, approvals: u32) -> Self {
        ApprovalRequirement {
            quorums: vec![Quorum {
                group: group.to_owned(),
                approvals,
            }],
        }
    }

    /// How many people must approve in all.
    pub fn total(&self) -> u32 {
        self.quorums.iter().map(|q| q.approvals).sum()
    }
}

impl fmt::Display for ApprovalRequirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, q) in self.quorums.iter().enumerate() {
            if i > 0 {
                f.write_str(" and ")?;
            }
            write!(
                f,
                "{} approval{} from group `{}`",
                q.approvals,
                if q.approvals == 1 { "" } else { "s" },
                q.group
            )?;
        }
        Ok(())
    }
}

/// The verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Allow,
    Deny,
    /// Allowed once the requirement is met by people other than the requester.
    RequireApproval(ApprovalRequirement),
}

impl fmt::Display for Effect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Effect::Allow => f.write_str("allow"),
            Effect::Deny => f.write_str("deny"),
            Effect::RequireApproval(requirement) => {
                write!(f, "require approval ({requirement})")
            }
        }
    }
}

/// Something the agent must do when it lets the request through.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Obligation {
    /// Mask results with this profile from `masking.toml`.
    Mask { profile: String },
}

/// The engine's answer to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub effect: Effect,
    /// Empty unless the effect lets the request through.
    pub obligations: Vec<Obligation>,
    /// The policies that decided, sorted: the satisfied `forbid`s of a denial, the satisfied
    /// `permit`s of an allow, the failing policies of an unevaluable request, none for the
    /// default deny.
    pub matched: Vec<PolicyId>,
    /// One sentence for the operator and the audit log.
    pub reason: String,
}

impl Decision {
    pub(crate) fn deny(matched: Vec<PolicyId>, reason: String) -> Self {
        Decision {
            effect: Effect::Deny,
            obligations: Vec::new(),
            matched,
            reason,
        }
    }

    /// True for `Allow` only; a caller that treats `RequireApproval` as allowed has a bug.
    pub fn is_allowed(&self) -> bool {
        self.effect == Effect::Allow
    }
}

/// `permit` or `forbid`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PolicyEffect {
    Permit,
    Forbid,
}

impl fmt::Display for PolicyEffect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PolicyEffect::Permit => f.pad("permit"),
            PolicyEffect::Forbid => f.pad("forbid"),
        }
    }
}

/// How one policy fared against the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyOutcome {
    /// Scope and conditions held.
    Satisfied,
    /// The scope (principal, action or resource) excludes the request; says which part.
    OutOfScope(String),
    /// The scope matched but a `when` or `unless` condition did not hold.
    ConditionsNotMet,
    /// Evaluating the policy failed; the request is denied.
    Error(String),
    /// The request itself could not be evaluated, so no policy was.
    NotEvaluated,
}

/// One line of an explanation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyVerdict {
    pub id: PolicyId,
    pub effect: PolicyEffect,
    pub location: Location,
    pub outcome: PolicyOutcome,
}

/// A decision with the account of how it was reached, for `portcullis policy explain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    /// Exactly what `decide` returns for the same request and policy set.
    pub decision: Decision,
    /// The request as the engine read it.
    pub request: String,
    /// Every policy in the set, in file order.
    pub policies: Vec<PolicyVerdict>,
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "request:  {}", self.request)?;
        writeln!(f, "decision: {}", self.decision.effect)?;
        for obligation in &self.decision.obligations {
            match obligation {
                Obligation::Mask { profile } => {
                    writeln!(f, "          mask results with profile `{profile}`")?
                }
            }
        }
        writeln!(f, "reason:   {}", self.decision.reason)?;
        writeln!(f, "policies considered ({}):", self.policies.len())?;
        for verdict in &self.policies {
            let decided = self.decision.matched.contains(&verdict.id);
            let outcome = match &verdict.outcome {
                PolicyOutcome::Satisfied if decided => "satisfied; decided".to_owned(),
                PolicyOutcome::Satisfied => "satisfied; did not decide".to_owned(),
                PolicyOutcome::OutOfScope(why) => format!("not applicable: {why}"),
                PolicyOutcome::ConditionsNotMet => "in scope, conditions not met".to_owned(),
                PolicyOutcome::Error(error) => format!("error: {error}"),
                PolicyOutcome::NotEvaluated => "not evaluated".to_owned(),
            };
            writeln!(
                f,
                "  {:<6} {} ({}): {outcome}",
                verdict.effect, verdict.id, verdict.location
            )?;
        }
        Ok(())
    }
}
