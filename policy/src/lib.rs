//! The Portcullis policy engine: a pure function from a [`Request`] (who, what, where, under
//! which circumstances) to a [`Decision`] (allow, deny or require approval, with obligations
//! such as masking, the policies that decided and the reason).
//!
//! Policies are [Cedar](https://www.cedarpolicy.com) files validated against the schema in
//! `schema/portcullis.cedarschema`; effects beyond allow/deny are annotations on `permit`
//! policies (`@approval`, `@approvals`, `@mask`), with masking profiles and approval defaults in
//! TOML next to the policies. The crate does no I/O: the caller reads the policy directory and
//! passes `(path, contents)` pairs to [`PolicySet::load`]. See `README.md` for the policy
//! language as Portcullis uses it.

mod decision;
mod engine;
mod error;
mod live;
mod load;
mod mask;
mod request;
mod settings;
mod sql_text;

pub use decision::{
    ApprovalRequirement, Decision, Effect, Explanation, Obligation, PolicyEffect, PolicyId,
    PolicyOutcome, PolicyVerdict, Quorum,
};
pub use engine::{PolicyInfo, PolicySet};
pub use error::{LoadError, LoadWarning, Location, Problem};
pub use live::LivePolicySet;
pub use load::{is_policy_set_file, APPROVALS_FILE, MASKING_FILE, SCHEMA};
pub use mask::{
    ColumnOrigin, ColumnPlan, ContentMatch, Masker, Unmaskable, FORMAT_BINARY, FORMAT_TEXT,
};
pub use request::{
    Action, Context, FileAccess, Forward, Principal, PrincipalKind, Request, Target,
    STATEMENT_CLASSES,
};
pub use settings::{
    ApprovalSettings, ColumnMatcher, Detector, MaskKind, MaskRule, MaskingProfile, Selector,
    TableColumn,
};
pub use sql_text::{runs_sql_text, takes_query_text, SQL_TEXT_FUNCTIONS};
