//! Deciding: one request in, one decision out, through the same evaluation for `decide` and
//! `explain`.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use cedar_policy as cedar;

use crate::decision::{
    ApprovalRequirement, Decision, Effect, Explanation, Obligation, PolicyEffect, PolicyId,
    PolicyOutcome, PolicyVerdict,
};
use crate::error::{LoadWarning, Location};
use crate::request::{Action, PrincipalKind, Request, STATEMENT_CLASSES};
use crate::settings::{ApprovalSettings, MaskingProfile};

/// What the engine knows about one policy besides its Cedar text.
#[derive(Debug, Clone)]
pub struct PolicyInfo {
    pub id: PolicyId,
    pub effect: PolicyEffect,
    /// Where the policy starts (its first annotation).
    pub location: Location,
    /// From `@description("…")`; quoted in the reason of decisions the policy makes.
    pub description: Option<String>,
    /// From `@approval` / `@approvals`, with defaults from `approvals.toml` applied.
    pub approval: Option<ApprovalRequirement>,
    /// From `@mask("…")`; the profile exists in `masking.toml`.
    pub mask: Option<String>,
    pub(crate) cedar: cedar::Policy,
}

impl PolicyInfo {
    /// The groups this policy names (`Portcullis::Group::"…"` in its scope or its
    /// conditions), sorted, each once: what an access review checks against the groups
    /// people were seen to carry.
    pub fn groups_named(&self) -> Vec<String> {
        let mut groups: Vec<String> = self
            .cedar
            .entity_literals()
            .into_iter()
            .filter(|uid| uid.type_name().to_string() == GROUP_TYPE)
            .map(|uid| uid.id().unescaped().to_owned())
            .collect();
        groups.sort();
        groups.dedup();
        groups
    }
}

const GROUP_TYPE: &str = "Portcullis::Group";

/// The policies that can apply to one action, indexed by the principal their scope names, so a
/// request evaluates only the policies whose scope can include its principal.
pub(crate) struct ActionSlice {
    pub(crate) action: Action,
    pub(crate) uid: cedar::EntityUid,
    /// The action's entity and its action groups, so `action in Action::"ssh"` works.
    pub(crate) entities: cedar::Entities,
    /// Policies for any principal (`principal`, `principal is T`).
    pub(crate) any_principal: PolicyBucket,
    /// Policies with `principal == X`, `principal in X` or `principal is T in X`, by X. A
    /// principal is in itself and its groups only (groups have no parents), so these are the
    /// only buckets a request can match.
    pub(crate) by_principal: HashMap<cedar::EntityUid, PolicyBucket>,
    /// Indices into `PolicySet::policies`.
    pub(crate) in_scope: Vec<usize>,
}

/// Split by effect so one evaluation tells both which permits and which forbids hold (Cedar
/// reports only the winning side).
#[derive(Default)]
pub(crate) struct PolicyBucket {
    pub(crate) permits: cedar::PolicySet,
    pub(crate) forbids: cedar::PolicySet,
}

/// Entity type names parsed once per policy set instead of once per request.
pub(crate) struct EntityTypes {
    user: cedar::EntityTypeName,
    service: cedar::EntityTypeName,
    group: cedar::EntityTypeName,
    target: cedar::EntityTypeName,
    action: cedar::EntityTypeName,
}

impl EntityTypes {
    pub(crate) fn new() -> Result<Self, String> {
        let parse = |name: &str| {
            cedar::EntityTypeName::from_str(name).map_err(|e| format!("type `{name}`: {e}"))
        };
        Ok(EntityTypes {
            user: parse("Portcullis::User")?,
            service: parse("Portcullis::ServiceIdentity")?,
            group: parse(GROUP_TYPE)?,
            target: parse("Portcullis::Target")?,
            action: parse("Portcullis::Action")?,
        })
    }

    pub(crate) fn action(&self, name: &str) -> Result<cedar::EntityUid, String> {
        Ok(uid(&self.action, name))
    }
}

fn uid(type_name: &cedar::EntityTypeName, id: &str) -> cedar::EntityUid {
    cedar::EntityUid::from_type_name_and_id(type_name.clone(), cedar::EntityId::new(id))
}

/// A validated, immutable set of policies with its masking profiles and approval settings.
/// Build it with [`PolicySet::load`]; share it through [`crate::LivePolicySet`].
pub struct PolicySet {
    pub(crate) authorizer: cedar::Authorizer,
    pub(crate) types: EntityTypes,
    /// Indexed by `Action::index`.
    pub(crate) slices: Vec<ActionSlice>,
    /// In file order.
    pub(crate) policies: Vec<PolicyInfo>,
    pub(crate) index: HashMap<String, usize>,
    pub(crate) masking: BTreeMap<String, MaskingProfile>,
    pub(crate) approvals: ApprovalSettings,
    pub(crate) warnings: Vec<LoadWarning>,
}

impl fmt::Debug for PolicySet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PolicySet")
            .field(
                "policies",
                &self
                    .policies
                    .iter()
                    .map(|p| p.id.as_str())
                    .collect::<Vec<_>>(),
            )
            .field("masking_profiles", &self.masking.keys().collect::<Vec<_>>())
            .field("approvals", &self.approvals)
            .finish_non_exhaustive()
    }
}

/// What evaluating every policy that could apply found.
struct Evaluation<'a> {
    slice: &'a ActionSlice,
    /// Indices into `PolicySet::policies`, sorted by policy id.
    permits: Vec<usize>,
    forbids: Vec<usize>,
    errors: Vec<(usize, String)>,
}

/// The Cedar view of a request.
struct CedarRequest<'a> {
    slice: &'a ActionSlice,
    request: cedar::Request,
    entities: cedar::Entities,
    /// The principal and its groups, deduplicated: the keys of `ActionSlice::by_principal`
    /// this request can match.
    principals: Vec<cedar::EntityUid>,
}

impl PolicySet {
    /// The decision for one request. Default deny: allowed only if a permit holds and no
    /// forbid does; denied, with the reason, if the request or any policy that could apply to
    /// it cannot be evaluated.
    pub fn decide(&self, request: &Request) -> Decision {
        match self.evaluate(request) {
            Ok(evaluation) => self.resolve(request, &evaluation),
            Err(reason) => Decision::deny(Vec::new(), reason),
        }
    }

    /// The decision for one request with an account of every policy: `decide` plus, for each
    /// policy, whether it held and, if not, why.
    pub fn explain(&self, request: &Request) -> Explanation {
        let outcome = self.evaluate(request);
        let (decision, verdicts) = match &outcome {
            Err(reason) => (
                Decision::deny(Vec::new(), reason.clone()),
                self.policies
                    .iter()
                    .map(|p| verdict(p, PolicyOutcome::NotEvaluated))
                    .collect(),
            ),
            Ok(evaluation) => {
                let decision = self.resolve(request, evaluation);
                let principal = self.principal_uid(request);
                let groups = self.group_uids(request);
                let resource = uid(&self.types.target, &request.target.name);
                let verdicts = self
                    .policies
                    .iter()
                    .enumerate()
                    .map(|(index, policy)| {
                        let outcome = if !evaluation.slice.in_scope.contains(&index) {
                            PolicyOutcome::OutOfScope(format!(
                                "its action scope does not include `{}`",
                                evaluation.slice.action
                            ))
                        } else if evaluation.permits.contains(&index)
                            || evaluation.forbids.contains(&index)
                        {
                            PolicyOutcome::Satisfied
                        } else if let Some((_, error)) =
                            evaluation.errors.iter().find(|(i, _)| *i == index)
                        {
                            PolicyOutcome::Error(error.clone())
                        } else if !principal_in_scope(&policy.cedar, &principal, &groups) {
                            PolicyOutcome::OutOfScope(format!(
                                "its principal scope does not include {principal}"
                            ))
                        } else if !resource_in_scope(&policy.cedar, &resource) {
                            PolicyOutcome::OutOfScope(format!(
                                "its resource scope does not include {resource}"
                            ))
                        } else {
                            PolicyOutcome::ConditionsNotMet
                        };
                        verdict(policy, outcome)
                    })
                    .collect();
                (decision, verdicts)
            }
        };
        Explanation {
            decision,
            request: request.to_string(),
            policies: verdicts,
        }
    }

    /// Whether some `permit` for the request's action has its principal and target in scope,
    /// its conditions not evaluated: for a question asked before the request's context
    /// exists (which extensions an SSH login certificate carries, before any forward was
    /// asked for). Never a decision: what is then asked is decided by [`Self::decide`].
    pub fn could_permit(&self, request: &Request) -> bool {
        let Some(slice) = self.slices.get(request.action.index()) else {
            return false;
        };
        let principal = self.principal_uid(request);
        let groups = self.group_uids(request);
        let resource = uid(&self.types.target, &request.target.name);
        slice.in_scope.iter().any(|&index| {
            self.policies.get(index).is_some_and(|policy| {
                policy.effect == PolicyEffect::Permit
                    && principal_in_scope(&policy.cedar, &principal, &groups)
                    && resource_in_scope(&policy.cedar, &resource)
            })
        })
    }

    /// Every policy, in file order.
    pub fn policies(&self) -> &[PolicyInfo] {
        &self.policies
    }

    pub fn policy(&self, id: &str) -> Option<&PolicyInfo> {
        self.index.get(id).and_then(|i| self.policies.get(*i))
    }

    pub fn len(&self) -> usize {
        self.policies.len()
    }

    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// A profile a `Mask` obligation names; every profile a decision names exists.
    pub fn masking_profile(&self, name: &str) -> Option<&MaskingProfile> {
        self.masking.get(name)
    }

    pub fn masking_profiles(&self) -> impl Iterator<Item = &MaskingProfile> {
        self.masking.values()
    }

    pub fn approval_settings(&self) -> &ApprovalSettings {
        &self.approvals
    }

    /// Suspicious but not fatal findings of the load, for the operator.
    pub fn warnings(&self) -> &[LoadWarning] {
        &self.warnings
    }

    fn evaluate(&self, request: &Request) -> Result<Evaluation<'_>, String> {
        let cedar_request = self.to_cedar(request, None)?;
        let slice = cedar_request.slice;
        let mut evaluation = Evaluation {
            slice,
            permits: Vec::new(),
            forbids: Vec::new(),
            errors: Vec::new(),
        };
        let buckets = std::iter::once(&slice.any_principal).chain(
            cedar_request
                .principals
                .iter()
                .filter_map(|uid| slice.by_principal.get(uid)),
        );
        for bucket in buckets {
            for (policies, satisfied) in [
                (&bucket.forbids, &mut evaluation.forbids),
                (&bucket.permits, &mut evaluation.permits),
            ] {
                if policies.is_empty() {
                    continue;
                }
                let response = self.authorizer.is_authorized(
                    &cedar_request.request,
                    policies,
                    &cedar_request.entities,
                );
                let diagnostics = response.diagnostics();
                for id in diagnostics.reason() {
                    satisfied.push(self.policy_index(id)?);
                }
                for error in diagnostics.errors() {
                    let cedar::AuthorizationError::PolicyEvaluationError(error) = error;
                    evaluation.errors.push((
                        self.policy_index(error.policy_id())?,
                        error.inner().to_string(),
                    ));
                }
            }
        }
        let by_id = |a: &usize, b: &usize| self.id_of(*a).cmp(self.id_of(*b));
        evaluation.permits.sort_by(by_id);
        evaluation.permits.dedup();
        evaluation.forbids.sort_by(by_id);
        evaluation.forbids.dedup();
        evaluation.errors.sort_by(|a, b| by_id(&a.0, &b.0));
        evaluation.errors.dedup_by_key(|e| e.0);
        Ok(evaluation)
    }

    fn resolve(&self, request: &Request, evaluation: &Evaluation<'_>) -> Decision {
        // Cedar skips a policy that fails to evaluate. For a forbid that would let through what
        // it was written to stop, so any failure denies.
        if !evaluation.errors.is_empty() {
            let matched = evaluation.errors.iter().map(|(i, _)| self.id(*i)).collect();
            let failures: Vec<String> = evaluation
                .errors
                .iter()
                .map(|(i, error)| format!("{}: {error}", self.cite(*i)))
                .collect();
            return Decision::deny(
                matched,
                format!(
                    "denied because a policy that applies could not be evaluated: {}",
                    failures.join("; ")
                ),
            );
        }
        if !evaluation.forbids.is_empty() {
            let matched = evaluation.forbids.iter().map(|i| self.id(*i)).collect();
            let cited: Vec<String> = evaluation
                .forbids
                .iter()
                .map(|i| self.cite_with_description(*i))
                .collect();
            return Decision::deny(matched, format!("forbidden by {}", cited.join("; ")));
        }
        if evaluation.permits.is_empty() {
            let kind = match request.principal.kind {
                PrincipalKind::User => "user",
                PrincipalKind::Service => "service",
            };
            return Decision::deny(
                Vec::new(),
                format!(
                    "no policy permits {} on target `{}` for {kind} `{}`; denied by default",
                    request.action, request.target.name, request.principal.id
                ),
            );
        }

        let matched: Vec<PolicyId> = evaluation.permits.iter().map(|i| self.id(*i)).collect();
        let cited: Vec<String> = evaluation.permits.iter().map(|i| self.cite(*i)).collect();
        let mut reason = format!("permitted by {}", cited.join(", "));

        // An approval requirement is not bypassed by another permit that also holds: the
        // strictest requirement applies (most approvals in all; on a tie, the first policy by
        // id).
        let mut required: Option<(usize, &ApprovalRequirement)> = None;
        for index in &evaluation.permits {
            let Some(approval) = self.policies.get(*index).and_then(|p| p.approval.as_ref()) else {
                continue;
            };
            if required.is_none_or(|(_, current)| approval.total() > current.total()) {
                required = Some((*index, approval));
            }
        }
        let effect = match required {
            Some((index, approval)) => {
                reason.push_str(&format!(
                    "; needs {approval} (required by `{}`)",
                    self.id_of(index)
                ));
                Effect::RequireApproval(approval.clone())
            }
            None => Effect::Allow,
        };

        let mut masks: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for index in &evaluation.permits {
            if let Some(policy) = self.policies.get(*index) {
                if let Some(profile) = &policy.mask {
                    masks
                        .entry(profile.as_str())
                        .or_default()
                        .push(policy.id.as_str());
                }
            }
        }
        for (profile, by) in &masks {
            reason.push_str(&format!(
                "; results masked with profile `{profile}` (required by `{}`)",
                by.join("`, `")
            ));
        }
        Decision {
            effect,
            obligations: masks
                .keys()
                .map(|profile| Obligation::Mask {
                    profile: (*profile).to_owned(),
                })
                .collect(),
            matched,
            reason,
        }
    }

    /// The request, its context and its entities are built here from typed fields and the
    /// checks above, so they conform to the schema by construction; checking that again on
    /// every decision costs a third of a small decision's time. Tests pass the schema as
    /// `check_against` to prove the construction right for every action.
    fn to_cedar(
        &self,
        request: &Request,
        check_against: Option<&cedar::Schema>,
    ) -> Result<CedarRequest<'_>, String> {
        let action = request.action;
        let slice = self
            .slices
            .get(action.index())
            .ok_or_else(|| format!("action `{action}` is not in the policy set's index"))?;
        let context = &request.context;
        let principal = &request.principal;
        if principal.id.is_empty() {
            return Err("the request has no principal id".to_owned());
        }
        if request.target.name.is_empty() {
            return Err("the request has no target name".to_owned());
        }
        if context.hour > 23 {
            return Err(format!(
                "context hour {} is out of range 0..=23",
                context.hour
            ));
        }
        if !(1..=7).contains(&context.weekday) {
            return Err(format!(
                "context weekday {} is out of range 1..=7 (ISO 8601, 1 = Monday)",
                context.weekday
            ));
        }

        let string = |s: &str| cedar::RestrictedExpression::new_string(s.to_owned());
        let long = cedar::RestrictedExpression::new_long;
        let strings = |items: &[String]| {
            cedar::RestrictedExpression::new_set(items.iter().map(|s| string(s)))
        };
        let required = |field: &'static str, value: &Option<String>| {
            value.as_deref().map(string).ok_or_else(|| {
                format!("the request lacks context `{field}`, which action `{action}` needs")
            })
        };
        let mut pairs = vec![
            ("unix_time".to_owned(), long(context.unix_time)),
            ("hour".to_owned(), long(i64::from(context.hour))),
            ("weekday".to_owned(), long(i64::from(context.weekday))),
            ("source_comm".to_owned(), string(&context.source_comm)),
            ("source_uid".to_owned(), long(i64::from(context.source_uid))),
        ];
        match action {
            Action::Connect | Action::Replicate => {
                for (field, value) in [
                    ("db_user", &context.db_user),
                    ("db_name", &context.db_name),
                    ("ssh_user", &context.ssh_user),
                ] {
                    if let Some(value) = value {
                        pairs.push((field.to_owned(), string(value)));
                    }
                }
            }
            Action::Query => {
                let class = context.statement_class.as_deref().unwrap_or_default();
                if !class.is_empty() && !STATEMENT_CLASSES.contains(&class) {
                    return Err(format!(
                        "unknown statement class `{class}`; expected one of {}",
                        STATEMENT_CLASSES.join(", ")
                    ));
                }
                pairs.push((
                    "statement_class".to_owned(),
                    required("statement_class", &context.statement_class)?,
                ));
                pairs.push(("command".to_owned(), required("command", &context.command)?));
                pairs.push(("tables".to_owned(), strings(&context.tables)));
                pairs.push(("functions".to_owned(), strings(&context.functions)));
                pairs.push((
                    "dynamic_sql".to_owned(),
                    cedar::RestrictedExpression::new_bool(context.dynamic_sql),
                ));
                pairs.push(("db_user".to_owned(), required("db_user", &context.db_user)?));
                pairs.push(("db_name".to_owned(), required("db_name", &context.db_name)?));
            }
            Action::SshExec => {
                pairs.push((
                    "command_line".to_owned(),
                    required("command_line", &context.command_line)?,
                ));
                pairs.push((
                    "simple_command".to_owned(),
                    cedar::RestrictedExpression::new_bool(context.simple_command),
                ));
                pairs.push((
                    "guarded_line".to_owned(),
                    cedar::RestrictedExpression::new_bool(context.guarded_line),
                ));
                if let Some(name) = &context.command_name {
                    pairs.push(("command_name".to_owned(), string(name)));
                }
                if context.simple_command {
                    pairs.push(("command_args".to_owned(), strings(&context.command_args)));
                }
            }
            Action::SshForwardLocal | Action::SshForwardRemote => {
                let forward = context.forward.as_ref().ok_or_else(|| {
                    format!("the request lacks context `forward`, which action `{action}` needs")
                })?;
                let (host, port) = if action == Action::SshForwardLocal {
                    ("destination_host", "destination_port")
                } else {
                    ("bind_address", "bind_port")
                };
                pairs.push((host.to_owned(), string(&forward.host)));
                pairs.push((port.to_owned(), long(i64::from(forward.port))));
                if let (Action::SshForwardLocal, Some((from, from_port))) =
                    (action, &forward.originator)
                {
                    pairs.push(("originator_host".to_owned(), string(from)));
                    pairs.push(("originator_port".to_owned(), long(i64::from(*from_port))));
                }
            }
            Action::SshSftp => {
                // The subsystem's own start has no file: an empty path matches no pattern.
                let (operation, path) = context
                    .file
                    .as_ref()
                    .map_or(("start", ""), |f| (f.operation.as_str(), f.path.as_str()));
                pairs.push(("sftp_operation".to_owned(), string(operation)));
                pairs.push(("path".to_owned(), string(path)));
            }
            Action::SshScp => {
                let file = context.file.as_ref().ok_or_else(|| {
                    format!("the request lacks context `file`, which action `{action}` needs")
                })?;
                pairs.push(("direction".to_owned(), string(&file.operation)));
                pairs.push(("path".to_owned(), string(&file.path)));
                pairs.push((
                    "recursive".to_owned(),
                    cedar::RestrictedExpression::new_bool(file.recursive),
                ));
            }
            Action::SshShell | Action::SshAgentForward => {}
        }
        let cedar_context =
            cedar::Context::from_pairs(pairs).map_err(|e| format!("context: {e}"))?;

        let principal_uid = self.principal_uid(request);
        let groups = self.group_uids(request);
        let mut principals = Vec::with_capacity(groups.len().saturating_add(1));
        for uid in groups.iter().chain([&principal_uid]) {
            if !principals.contains(uid) {
                principals.push(uid.clone());
            }
        }
        let mut attrs = Vec::with_capacity(3);
        match principal.kind {
            PrincipalKind::User => {
                attrs.push(("subject".to_owned(), string(&principal.id)));
                if let Some(email) = &principal.email {
                    attrs.push(("email".to_owned(), string(email)));
                }
                if let Some(name) = &principal.name {
                    attrs.push(("name".to_owned(), string(name)));
                }
            }
            PrincipalKind::Service => attrs.push(("name".to_owned(), string(&principal.id))),
        }
        let principal_entity =
            cedar::Entity::new_with_tags(principal_uid.clone(), attrs, groups.iter().cloned(), [])
                .map_err(|e| format!("principal: {e}"))?;

        let target = &request.target;
        let resource = uid(&self.types.target, &target.name);
        let target_entity = cedar::Entity::new_with_tags(
            resource.clone(),
            [
                ("name".to_owned(), string(&target.name)),
                ("protocol".to_owned(), string(&target.protocol)),
            ],
            [],
            target
                .labels
                .iter()
                .map(|(key, value)| (key.clone(), string(value))),
        )
        .map_err(|e| format!("target: {e}"))?;

        // Adding to the action's prebuilt store only closes the hierarchy over the two new
        // entities; building a store from scratch recomputes it for all of them, which costs a
        // fifth of a decision.
        let entities = slice
            .entities
            .clone()
            .add_entities([principal_entity, target_entity], check_against)
            .map_err(|e| format!("entities: {e}"))?;
        let cedar_request = cedar::Request::new(
            principal_uid,
            slice.uid.clone(),
            resource,
            cedar_context,
            check_against,
        )
        .map_err(|e| format!("the request does not match the schema: {e}"))?;
        Ok(CedarRequest {
            slice,
            request: cedar_request,
            entities,
            principals,
        })
    }

    fn principal_uid(&self, request: &Request) -> cedar::EntityUid {
        let type_name = match request.principal.kind {
            PrincipalKind::User => &self.types.user,
            PrincipalKind::Service => &self.types.service,
        };
        uid(type_name, &request.principal.id)
    }

    fn group_uids(&self, request: &Request) -> Vec<cedar::EntityUid> {
        request
            .principal
            .groups
            .iter()
            .map(|g| uid(&self.types.group, g))
            .collect()
    }

    fn policy_index(&self, id: &cedar::PolicyId) -> Result<usize, String> {
        let id: &str = id.as_ref();
        self.index
            .get(id)
            .copied()
            .ok_or_else(|| format!("Cedar reported policy `{id}`, which is not in the set"))
    }

    fn id(&self, index: usize) -> PolicyId {
        self.policies
            .get(index)
            .map_or_else(|| PolicyId::new("?"), |p| p.id.clone())
    }

    fn id_of(&self, index: usize) -> &str {
        self.policies.get(index).map_or("?", |p| p.id.as_str())
    }

    fn cite(&self, index: usize) -> String {
        match self.policies.get(index) {
            Some(p) => format!(
                "`{}` ({} line {})",
                p.id,
                p.location.file.display(),
                p.location.line
            ),
            None => "`?`".to_owned(),
        }
    }

    fn cite_with_description(&self, index: usize) -> String {
        let cited = self.cite(index);
        match self
            .policies
            .get(index)
            .and_then(|p| p.description.as_ref())
        {
            Some(description) => format!("{cited}: {description}"),
            None => cited,
        }
    }
}

fn verdict(policy: &PolicyInfo, outcome: PolicyOutcome) -> PolicyVerdict {
    PolicyVerdict {
        id: policy.id.clone(),
        effect: policy.effect,
        location: policy.location.clone(),
        outcome,
    }
}

/// `principal in X` over the flat hierarchy the engine builds: a principal is in itself and in
/// its groups.
fn principal_in_scope(
    policy: &cedar::Policy,
    principal: &cedar::EntityUid,
    groups: &[cedar::EntityUid],
) -> bool {
    let is_in = |x: &cedar::EntityUid| x == principal || groups.contains(x);
    match policy.principal_constraint() {
        cedar::PrincipalConstraint::Any => true,
        cedar::PrincipalConstraint::Eq(x) => &x == principal,
        cedar::PrincipalConstraint::In(x) => is_in(&x),
        cedar::PrincipalConstraint::Is(t) => &t == principal.type_name(),
        cedar::PrincipalConstraint::IsIn(t, x) => &t == principal.type_name() && is_in(&x),
    }
}

/// Targets have no parents, so `resource in X` holds only for X itself.
fn resource_in_scope(policy: &cedar::Policy, resource: &cedar::EntityUid) -> bool {
    match policy.resource_constraint() {
        cedar::ResourceConstraint::Any => true,
        cedar::ResourceConstraint::Eq(x) | cedar::ResourceConstraint::In(x) => &x == resource,
        cedar::ResourceConstraint::Is(t) => &t == resource.type_name(),
        cedar::ResourceConstraint::IsIn(t, x) => &t == resource.type_name() && &x == resource,
    }
}

#[cfg(test)]
mod tests {
    #![allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        reason = "tests fail loudly"
    )]

    use std::collections::BTreeMap;

    use super::*;
    use crate::request::{Context, Principal, Target};

    fn complete_request(action: Action, kind: PrincipalKind) -> Request {
        Request {
            principal: Principal {
                kind,
                id: "subject-1".to_owned(),
                email: Some("a@example.com".to_owned()),
                name: Some("A".to_owned()),
                groups: vec!["g1".to_owned(), "g2".to_owned()],
            },
            action,
            target: Target {
                name: "db".to_owned(),
                protocol: "postgres".to_owned(),
                labels: BTreeMap::from([("environment".to_owned(), "staging".to_owned())]),
            },
            context: Context {
                unix_time: 1,
                hour: 23,
                weekday: 7,
                source_comm: "psql".to_owned(),
                source_uid: u32::MAX,
                statement_class: Some("read".to_owned()),
                command: Some("SELECT".to_owned()),
                tables: vec!["t".to_owned()],
                functions: vec!["f".to_owned()],
                dynamic_sql: true,
                command_line: Some("ls".to_owned()),
                simple_command: true,
                guarded_line: true,
                command_name: Some("ls".to_owned()),
                command_args: vec!["-l".to_owned()],
                ssh_user: Some("deploy".to_owned()),
                forward: Some(crate::request::Forward {
                    host: "db.internal".to_owned(),
                    port: 5432,
                    originator: Some(("127.0.0.1".to_owned(), 40000)),
                }),
                file: Some(crate::request::FileAccess {
                    operation: "read".to_owned(),
                    path: "/etc/secret/key".to_owned(),
                    recursive: true,
                }),
                db_user: Some("u".to_owned()),
                db_name: Some("d".to_owned()),
            },
        }
    }

    #[test]
    fn groups_named_are_those_of_scope_and_conditions_sorted_once() {
        let set = PolicySet::load([(
            "p.cedar",
            r#"
@id("scope")
permit (principal in Portcullis::Group::"ops", action, resource)
when { principal in Portcullis::Group::"audit" || principal in Portcullis::Group::"ops" };

@id("none")
permit (principal == Portcullis::ServiceIdentity::"etl", action, resource);
"#,
        )])
        .unwrap();
        assert_eq!(
            set.policy("scope").unwrap().groups_named(),
            ["audit", "ops"]
        );
        assert!(set.policy("none").unwrap().groups_named().is_empty());
    }

    /// Decisions skip Cedar's schema check of the request; this proves what they skip holds.
    #[test]
    fn built_requests_conform_to_the_schema_for_every_action_and_principal_kind() {
        let set = PolicySet::load(Vec::<(String, String)>::new()).unwrap();
        let (schema, _) = cedar::Schema::from_cedarschema_str(crate::load::SCHEMA).unwrap();
        for action in Action::ALL {
            for kind in [PrincipalKind::User, PrincipalKind::Service] {
                let mut request = complete_request(action, kind);
                set.to_cedar(&request, Some(&schema))
                    .unwrap_or_else(|e| panic!("{action} {kind:?}: {e}"));
                // Optional fields absent must conform too.
                request.principal.email = None;
                request.principal.name = None;
                if action != Action::Query {
                    request.context.db_user = None;
                    request.context.db_name = None;
                }
                if action == Action::SshSftp {
                    request.context.file = None;
                }
                set.to_cedar(&request, Some(&schema))
                    .unwrap_or_else(|e| panic!("{action} {kind:?} without optionals: {e}"));
            }
        }
    }
}
