//! Turning the files of a policy directory into a [`PolicySet`]: parse, check annotations,
//! validate against the schema, and index by action.
//!
//! Loading never reads the filesystem: the caller reads the directory and hands over
//! `(path, contents)` pairs, so the same code serves the agent, `portcullis policy check` and
//! tests, and the path it reports is the one the operator knows.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cedar_policy as cedar;
use miette::Diagnostic;

use crate::decision::{ApprovalRequirement, PolicyEffect, PolicyId, Quorum};
use crate::engine::{ActionSlice, EntityTypes, PolicyBucket, PolicyInfo, PolicySet};
use crate::error::{LoadError, LoadWarning, Location, Problem};
use crate::request::Action;
use crate::settings::{self, ApprovalSettings, MaskingProfile, MAX_APPROVALS};

/// The Cedar schema every policy is validated against.
pub const SCHEMA: &str = include_str!("../schema/portcullis.cedarschema");

pub const MASKING_FILE: &str = "masking.toml";
pub const APPROVALS_FILE: &str = "approvals.toml";

const KNOWN_ANNOTATIONS: [&str; 5] = ["id", "description", "approval", "approvals", "mask"];
const MAX_ID_LEN: usize = 128;

/// Whether a file in a policy directory belongs to the policy set: `*.cedar` files and any
/// `*.toml`, so that a misnamed settings file (`approval.toml`) is reported instead of ignored.
pub fn is_policy_set_file(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("cedar" | "toml")
    )
}

enum FileKind {
    Policies,
    Masking,
    Approvals,
}

fn file_kind(path: &Path) -> Option<FileKind> {
    match path.file_name().and_then(|n| n.to_str()) {
        Some(MASKING_FILE) => Some(FileKind::Masking),
        Some(APPROVALS_FILE) => Some(FileKind::Approvals),
        Some(_) if path.extension().is_some_and(|e| e == "cedar") => Some(FileKind::Policies),
        _ => None,
    }
}

/// One parsed policy before the set is assembled.
struct Parsed {
    info: PolicyInfo,
    file: usize,
}

impl PolicySet {
    /// Builds a policy set from the files of one policy directory: any number of `*.cedar`
    /// files, at most one `masking.toml` and one `approvals.toml`. Every problem found is
    /// reported, each with its file, line and column.
    pub fn load<I, P, S>(files: I) -> Result<PolicySet, LoadError>
    where
        I: IntoIterator<Item = (P, S)>,
        P: Into<PathBuf>,
        S: AsRef<str>,
    {
        let mut problems = Vec::new();
        let mut sources: Vec<(PathBuf, String)> = files
            .into_iter()
            .map(|(path, text)| (path.into(), text.as_ref().to_owned()))
            .collect();
        // Sorted so that "first" in a duplicate-id report and the order of problems do not
        // depend on the order a directory listing happened to return.
        sources.sort_by(|a, b| a.0.cmp(&b.0));

        let mut masking = BTreeMap::new();
        let mut approvals = ApprovalSettings::default();
        let mut cedar_files = Vec::new();
        let mut seen_masking = false;
        let mut seen_approvals = false;
        let mut previous: Option<&Path> = None;
        for (path, text) in &sources {
            if previous == Some(path.as_path()) {
                problems.push(Problem::DuplicateFile { file: path.clone() });
                continue;
            }
            previous = Some(path);
            match file_kind(path) {
                Some(FileKind::Policies) => cedar_files.push((path.as_path(), text.as_str())),
                Some(FileKind::Masking) if !seen_masking => {
                    seen_masking = true;
                    masking = settings::parse_masking(path, text, &mut problems);
                }
                Some(FileKind::Approvals) if !seen_approvals => {
                    seen_approvals = true;
                    approvals = settings::parse_approvals(path, text, &mut problems);
                }
                Some(FileKind::Masking | FileKind::Approvals) => {
                    problems.push(Problem::DuplicateFile { file: path.clone() })
                }
                None => problems.push(Problem::UnexpectedFile { file: path.clone() }),
            }
        }

        let schema = match cedar::Schema::from_cedarschema_str(SCHEMA) {
            Ok((schema, _warnings)) => schema,
            Err(error) => {
                problems.push(Problem::EmbeddedSchema {
                    message: error.to_string(),
                });
                return Err(LoadError::new(problems));
            }
        };

        let mut parsed = Vec::new();
        let mut first_use: HashMap<String, Location> = HashMap::new();
        for (file_index, (path, text)) in cedar_files.iter().enumerate() {
            let checker = AnnotationChecker {
                masking: &masking,
                approvals: &approvals,
            };
            for (offset, policy) in parse_file(path, text, &mut problems) {
                let at = Location::at_offset(path, text, offset);
                if let Some(info) = checker.check(policy, at, &mut first_use, &mut problems) {
                    parsed.push(Parsed {
                        info,
                        file: file_index,
                    });
                }
            }
        }

        let mut combined = cedar::PolicySet::new();
        for entry in &parsed {
            if let Err(error) = combined.add(entry.info.cedar.clone()) {
                problems.push(Problem::Syntax {
                    at: entry.info.location.clone(),
                    message: error.to_string(),
                });
            }
        }

        let mut warnings = Vec::new();
        let file_of: HashMap<&str, usize> = parsed
            .iter()
            .map(|entry| (entry.info.id.as_str(), entry.file))
            .collect();
        let locate = |policy: &cedar::PolicyId, diagnostic: &dyn Diagnostic| -> Location {
            let file = file_of
                .get(policy.to_string().as_str())
                .and_then(|index| cedar_files.get(*index));
            match file {
                Some((path, text)) => Location::at_offset(path, text, first_offset(diagnostic)),
                None => Location::file(Path::new("<policies>")),
            }
        };
        let validation = cedar::Validator::new(schema.clone())
            .validate(&combined, cedar::ValidationMode::Strict);
        for error in validation.validation_errors() {
            problems.push(Problem::Schema {
                at: locate(error.policy_id(), error),
                policy: error.policy_id().to_string(),
                message: with_help(strip_policy_prefix(&error.to_string()), error),
            });
        }
        for warning in validation.validation_warnings() {
            let at = locate(warning.policy_id(), warning);
            let message = with_help(strip_policy_prefix(&warning.to_string()), warning);
            // Bidirectional control characters are how "Trojan Source" hides what a policy
            // really says; a reviewer must be able to trust what they read.
            if matches!(
                warning,
                cedar::ValidationWarning::BidiCharsInString(_)
                    | cedar::ValidationWarning::BidiCharsInIdentifier(_)
            ) {
                problems.push(Problem::Schema {
                    at,
                    policy: warning.policy_id().to_string(),
                    message,
                });
            } else {
                warnings.push(LoadWarning {
                    at,
                    message: format!("policy `{}`: {message}", warning.policy_id()),
                });
            }
        }

        if !problems.is_empty() {
            return Err(LoadError::new(problems));
        }

        let policies: Vec<PolicyInfo> = parsed.into_iter().map(|entry| entry.info).collect();
        match assemble(schema, policies, masking, approvals, warnings) {
            Ok(set) => Ok(set),
            Err(problem) => Err(LoadError::new(vec![problem])),
        }
    }
}

/// Parses one file and returns its policies with the byte offset where each starts.
fn parse_file(path: &Path, text: &str, problems: &mut Vec<Problem>) -> Vec<(usize, cedar::Policy)> {
    let set = match cedar::PolicySet::from_str(text) {
        Ok(set) => set,
        Err(errors) => {
            for error in errors.iter() {
                let label = error
                    .labels()
                    .and_then(|mut labels| labels.next())
                    .and_then(|label| label.label().map(str::to_owned));
                let mut message = error.to_string();
                if let Some(label) = label {
                    message = format!("{message}; {label}");
                }
                problems.push(Problem::Syntax {
                    at: Location::at_offset(path, text, first_offset(error)),
                    message: with_help(message, error),
                });
            }
            return Vec::new();
        }
    };

    // The parser names statements policy0, policy1, ... in file order; each keeps its exact
    // source text, which is found again in the file to know where the statement starts.
    let mut statements: Vec<(usize, Statement)> = set
        .policies()
        .map(|p| (statement_number(p.id()), Statement::Static(p.clone())))
        .chain(
            set.templates()
                .map(|t| (statement_number(t.id()), Statement::Template(t.clone()))),
        )
        .collect();
    statements.sort_by_key(|(number, _)| *number);

    let mut cursor = 0;
    let mut policies = Vec::new();
    for (_, statement) in statements {
        let source = match &statement {
            Statement::Static(p) => p.to_cedar(),
            Statement::Template(t) => Some(t.to_cedar()),
        };
        let (offset, length) = source
            .and_then(|source| {
                let found = text.get(cursor..)?.find(source.as_str())?;
                Some((cursor.saturating_add(found), source.len()))
            })
            .unwrap_or((cursor, 0));
        // Searching on from the end of this statement keeps two identical statements apart.
        cursor = offset.saturating_add(length.max(1));
        match statement {
            Statement::Static(policy) => policies.push((offset, policy)),
            Statement::Template(template) => {
                let id = template.annotation("id").unwrap_or("(no @id)").to_owned();
                problems.push(Problem::Template {
                    at: Location::at_offset(path, text, offset),
                    id,
                });
            }
        }
    }
    policies
}

enum Statement {
    Static(cedar::Policy),
    Template(cedar::Template),
}

fn statement_number(id: &cedar::PolicyId) -> usize {
    id.to_string()
        .strip_prefix("policy")
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

fn first_offset(diagnostic: &dyn Diagnostic) -> usize {
    diagnostic
        .labels()
        .and_then(|mut labels| labels.next())
        .map_or(0, |label| label.offset())
}

fn with_help(message: String, diagnostic: &dyn Diagnostic) -> String {
    match diagnostic.help() {
        Some(help) => format!("{message}; {help}"),
        None => message,
    }
}

/// Cedar starts validation messages with "for policy `x`, "; the problem names the policy itself.
fn strip_policy_prefix(message: &str) -> String {
    if let Some(rest) = message.strip_prefix("for policy `") {
        if let Some((_, tail)) = rest.split_once("`, ") {
            return tail.to_owned();
        }
    }
    message.to_owned()
}

struct AnnotationChecker<'a> {
    masking: &'a BTreeMap<String, MaskingProfile>,
    approvals: &'a ApprovalSettings,
}

impl AnnotationChecker<'_> {
    /// Checks the Portcullis annotations of one policy and gives it its `@id`.
    fn check(
        &self,
        policy: cedar::Policy,
        at: Location,
        first_use: &mut HashMap<String, Location>,
        problems: &mut Vec<Problem>,
    ) -> Option<PolicyInfo> {
        let Some(id) = policy.annotation("id").map(str::to_owned) else {
            problems.push(Problem::MissingId { at });
            return None;
        };
        if !is_valid_id(&id) {
            problems.push(Problem::InvalidId { at, id });
            return None;
        }
        if let Some(first) = first_use.get(&id) {
            problems.push(Problem::DuplicateId {
                at,
                id,
                first: first.clone(),
            });
            return None;
        }
        first_use.insert(id.clone(), at.clone());

        let before = problems.len();
        for (key, _) in policy.annotations() {
            if !KNOWN_ANNOTATIONS.contains(&key) {
                problems.push(Problem::UnknownAnnotation {
                    at: at.clone(),
                    id: id.clone(),
                    key: key.to_owned(),
                });
            }
        }
        let mut complain = |message: String| {
            problems.push(Problem::Annotation {
                at: at.clone(),
                id: id.clone(),
                message,
            })
        };

        let effect = match policy.effect() {
            cedar::Effect::Permit => PolicyEffect::Permit,
            cedar::Effect::Forbid => PolicyEffect::Forbid,
        };
        if effect == PolicyEffect::Forbid {
            for key in ["approval", "approvals", "mask"] {
                if policy.annotation(key).is_some() {
                    complain(format!(
                        "@{key} only belongs on a permit policy; a forbid never lets a request through"
                    ));
                }
            }
        }

        let approval = match (
            policy.annotation("approval"),
            policy.annotation("approvals"),
        ) {
            (None, None) => None,
            (None, Some(list)) if list.contains(':') => self.approval_list(list, &mut complain),
            (None, Some(_)) => {
                complain("@approvals needs @approval(\"<approver group>\") next to it, or names its groups itself (@approvals(\"dba-leads:1,security:1\"))".to_owned());
                None
            }
            (Some(_), Some(list)) if list.contains(':') => {
                complain(
                    "@approvals(\"group:N,…\") names its groups itself; drop @approval next to it"
                        .to_owned(),
                );
                None
            }
            (Some(group), count) => {
                let approvals = match count {
                    None => Some(self.approvals.default_approvals),
                    Some(count) => match count.trim().parse::<u32>() {
                        Ok(n) if (1..=MAX_APPROVALS).contains(&n) => Some(n),
                        _ => {
                            complain(format!(
                                "@approvals(\"{count}\") must be a number from 1 to {MAX_APPROVALS}, or groups with counts (\"dba-leads:1,security:1\")"
                            ));
                            None
                        }
                    },
                };
                let group = if group.trim().is_empty() {
                    let default = self.approvals.default_approver_group.clone();
                    if default.is_none() {
                        complain(
                            "@approval names no approver group and approvals.toml sets no default_approver_group"
                                .to_owned(),
                        );
                    }
                    default
                } else {
                    if !self.is_known_group(group) {
                        complain(format!(
                            "@approval(\"{group}\") names a group that is not in approver_groups of approvals.toml"
                        ));
                    }
                    Some(group.to_owned())
                };
                match (group, approvals) {
                    (Some(group), Some(approvals)) => {
                        Some(ApprovalRequirement::of(&group, approvals))
                    }
                    _ => None,
                }
            }
        };

        let mask = policy.annotation("mask").map(str::to_owned);
        if let Some(profile) = &mask {
            if !self.masking.contains_key(profile) {
                let known: Vec<&str> = self.masking.keys().map(String::as_str).collect();
                let known = if known.is_empty() {
                    "masking.toml defines none".to_owned()
                } else {
                    format!("known profiles: {}", known.join(", "))
                };
                complain(format!(
                    "@mask(\"{profile}\") names an unknown masking profile; {known}"
                ));
            }
        }

        if problems.len() != before {
            return None;
        }
        Some(PolicyInfo {
            id: PolicyId::new(&id),
            effect,
            location: at,
            description: policy.annotation("description").map(str::to_owned),
            approval,
            mask,
            cedar: policy.new_id(cedar::PolicyId::new(&id)),
        })
    }
}

impl AnnotationChecker<'_> {
    fn is_known_group(&self, group: &str) -> bool {
        self.approvals
            .approver_groups
            .as_ref()
            .is_none_or(|known| known.contains(group))
    }

    /// `@approvals("dba-leads:1,security:1")`: every group listed must approve, with its
    /// own count (an AND of groups).
    fn approval_list(
        &self,
        list: &str,
        complain: &mut impl FnMut(String),
    ) -> Option<ApprovalRequirement> {
        let mut quorums: Vec<Quorum> = Vec::new();
        let mut ok = true;
        for entry in list.split(',') {
            let entry = entry.trim();
            let Some((group, count)) = entry.split_once(':') else {
                complain(format!(
                    "@approvals(\"{list}\"): `{entry}` is not `group:count`"
                ));
                ok = false;
                continue;
            };
            let group = group.trim();
            let count = count.trim();
            if group.is_empty() {
                complain(format!("@approvals(\"{list}\"): `{entry}` names no group"));
                ok = false;
                continue;
            }
            let Some(approvals) = count
                .parse::<u32>()
                .ok()
                .filter(|n| (1..=MAX_APPROVALS).contains(n))
            else {
                complain(format!(
                    "@approvals(\"{list}\"): the count of `{group}` must be a number from 1 to {MAX_APPROVALS}"
                ));
                ok = false;
                continue;
            };
            if !self.is_known_group(group) {
                complain(format!(
                    "@approvals(\"{list}\"): `{group}` is not in approver_groups of approvals.toml"
                ));
                ok = false;
            }
            if quorums.iter().any(|q| q.group == group) {
                complain(format!(
                    "@approvals(\"{list}\"): `{group}` is listed twice; give it one count"
                ));
                ok = false;
            }
            quorums.push(Quorum {
                group: group.to_owned(),
                approvals,
            });
        }
        (ok && !quorums.is_empty()).then_some(ApprovalRequirement { quorums })
    }
}

fn is_valid_id(id: &str) -> bool {
    let mut chars = id.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    starts_well
        && id.len() <= MAX_ID_LEN
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/'))
}

/// Indexes the validated policies by the action they can apply to, so a decision evaluates
/// only the policies that could possibly match its action.
fn assemble(
    schema: cedar::Schema,
    policies: Vec<PolicyInfo>,
    masking: BTreeMap<String, MaskingProfile>,
    approvals: ApprovalSettings,
    warnings: Vec<LoadWarning>,
) -> Result<PolicySet, Problem> {
    let embedded = |message: String| Problem::EmbeddedSchema { message };
    let action_entities = schema
        .action_entities()
        .map_err(|e| embedded(e.to_string()))?;
    let types = EntityTypes::new().map_err(embedded)?;

    let mut slices = Vec::with_capacity(Action::ALL.len());
    for action in Action::ALL {
        let uid = types.action(action.cedar_name()).map_err(embedded)?;
        let Some(entity) = action_entities.get(&uid) else {
            return Err(embedded(format!("action `{action}` is not declared")));
        };
        let ancestors: HashSet<cedar::EntityUid> = action_entities
            .ancestors(&uid)
            .map(|a| a.cloned().collect())
            .unwrap_or_default();
        let entities = cedar::Entities::from_entities(
            std::iter::once(entity.clone()).chain(
                ancestors
                    .iter()
                    .filter_map(|a| action_entities.get(a))
                    .cloned(),
            ),
            None,
        )
        .map_err(|e| embedded(e.to_string()))?;

        let mut any_principal = PolicyBucket::default();
        let mut by_principal: HashMap<cedar::EntityUid, PolicyBucket> = HashMap::new();
        let mut in_scope = Vec::new();
        for (index, info) in policies.iter().enumerate() {
            if !action_may_match(&info.cedar.action_constraint(), &uid, &ancestors) {
                continue;
            }
            in_scope.push(index);
            let bucket = match info.cedar.principal_constraint() {
                cedar::PrincipalConstraint::Any | cedar::PrincipalConstraint::Is(_) => {
                    &mut any_principal
                }
                cedar::PrincipalConstraint::Eq(x)
                | cedar::PrincipalConstraint::In(x)
                | cedar::PrincipalConstraint::IsIn(_, x) => by_principal.entry(x).or_default(),
            };
            let target = match info.effect {
                PolicyEffect::Permit => &mut bucket.permits,
                PolicyEffect::Forbid => &mut bucket.forbids,
            };
            target
                .add(info.cedar.clone())
                .map_err(|e| embedded(e.to_string()))?;
        }
        slices.push(ActionSlice {
            action,
            uid,
            entities,
            any_principal,
            by_principal,
            in_scope,
        });
    }

    let index = policies
        .iter()
        .enumerate()
        .map(|(i, info)| (info.id.as_str().to_owned(), i))
        .collect();
    Ok(PolicySet {
        authorizer: cedar::Authorizer::new(),
        types,
        slices,
        policies,
        index,
        masking,
        approvals,
        warnings,
    })
}

/// Whether a policy's action scope can match `action`. Leaving out a policy that could match
/// would skip a forbid, so anything not provably excluded is kept.
pub(crate) fn action_may_match(
    constraint: &cedar::ActionConstraint,
    action: &cedar::EntityUid,
    ancestors: &HashSet<cedar::EntityUid>,
) -> bool {
    match constraint {
        cedar::ActionConstraint::Any => true,
        cedar::ActionConstraint::Eq(uid) => uid == action,
        cedar::ActionConstraint::In(uids) => uids
            .iter()
            .any(|uid| uid == action || ancestors.contains(uid)),
    }
}
