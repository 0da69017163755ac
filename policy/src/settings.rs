//! The TOML files next to the policies: masking profiles (`masking.toml`) and approval
//! settings (`approvals.toml`).
//!
//! Both are parsed strictly (`deny_unknown_fields`): a misspelt key is an error with its line,
//! never a silently ignored setting.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use regex::Regex;
use serde::Deserialize;
use toml::Spanned;

use crate::error::{Location, Problem};

/// A named set of masking rules, referenced by `@mask("<name>")` on a permit policy.
#[derive(Debug, Clone)]
pub struct MaskingProfile {
    pub name: String,
    pub description: Option<String>,
    /// Tried in file order; the first that matches a column decides how it is masked.
    pub rules: Vec<MaskRule>,
}

impl MaskingProfile {
    /// The rule that masks `column`, if any.
    pub fn rule_for_column(&self, column: &str) -> Option<&MaskRule> {
        self.rules.iter().find(|rule| rule.columns.matches(column))
    }
}

#[derive(Debug, Clone)]
pub struct MaskRule {
    pub columns: ColumnMatcher,
    pub mask: MaskKind,
}

/// Which result columns a rule applies to.
#[derive(Debug, Clone)]
pub enum ColumnMatcher {
    /// An exact column name, compared ASCII case-insensitively because PostgreSQL folds
    /// unquoted identifiers to lower case.
    Name(String),
    /// A regular expression (Rust `regex` syntax) that must match somewhere in the column name;
    /// anchor it with `^…$` to match whole names.
    Pattern(Regex),
}

impl ColumnMatcher {
    pub fn matches(&self, column: &str) -> bool {
        match self {
            ColumnMatcher::Name(name) => name.eq_ignore_ascii_case(column),
            ColumnMatcher::Pattern(pattern) => pattern.is_match(column),
        }
    }
}

/// How a matched value is masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskKind {
    /// Replace the whole value.
    Redact { replacement: String },
    /// Keep the first and last characters, replace the rest with `*` (card numbers: keep_last 4).
    Partial { keep_first: u32, keep_last: u32 },
    /// Replace by a keyed hash, so equal values stay joinable without being readable. The key
    /// is the agent's secret, not part of the policy set.
    Hash,
}

/// Approval defaults and limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalSettings {
    /// How long a request waits for its approvals before it is denied.
    pub timeout: Duration,
    /// Used by an `@approval` policy without `@approvals`.
    pub default_approvals: u32,
    /// Used by a bare `@approval` (no group named).
    pub default_approver_group: Option<String>,
    /// When set, every approver group a policy names must be one of these, which catches a
    /// misspelt group that nobody belongs to (and so a request nobody can approve).
    pub approver_groups: Option<BTreeSet<String>>,
}

impl Default for ApprovalSettings {
    fn default() -> Self {
        ApprovalSettings {
            timeout: Duration::from_secs(DEFAULT_APPROVAL_TIMEOUT_SECONDS),
            default_approvals: 1,
            default_approver_group: None,
            approver_groups: None,
        }
    }
}

const DEFAULT_APPROVAL_TIMEOUT_SECONDS: u64 = 15 * 60;
const MAX_APPROVAL_TIMEOUT_SECONDS: u64 = 7 * 24 * 60 * 60;
/// More approvers than this is a typo, not a process.
pub(crate) const MAX_APPROVALS: u32 = 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MaskingFile {
    #[serde(default)]
    profiles: BTreeMap<Spanned<String>, ProfileEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileEntry {
    description: Option<String>,
    #[serde(default)]
    rules: Vec<RuleEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    column: Option<Spanned<String>>,
    column_regex: Option<Spanned<String>>,
    mask: Spanned<MaskKindName>,
    keep_first: Option<Spanned<u32>>,
    keep_last: Option<Spanned<u32>>,
    replacement: Option<Spanned<String>>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum MaskKindName {
    Redact,
    Partial,
    Hash,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApprovalsFile {
    timeout_seconds: Option<Spanned<u64>>,
    default_approvals: Option<Spanned<u32>>,
    default_approver_group: Option<Spanned<String>>,
    approver_groups: Option<Vec<Spanned<String>>>,
}

/// Problems are collected, not returned at the first, so an operator sees all of them at once.
struct SettingsFile<'a> {
    path: &'a Path,
    text: &'a str,
    problems: &'a mut Vec<Problem>,
}

impl SettingsFile<'_> {
    fn report(&mut self, span: Range<usize>, message: String) {
        self.problems.push(Problem::Settings {
            at: Location::at_offset(self.path, self.text, span.start),
            message,
        });
    }

    fn parse<T: serde::de::DeserializeOwned>(&mut self) -> Option<T> {
        match toml::from_str(self.text) {
            Ok(value) => Some(value),
            Err(error) => {
                let offset = error.span().map_or(0, |span| span.start);
                let text = one_line(error.message());
                let message = match key_at(self.text, offset) {
                    Some(key) => format!("key `{key}`: {text}"),
                    None => text,
                };
                self.problems.push(Problem::Settings {
                    at: Location::at_offset(self.path, self.text, offset),
                    message,
                });
                None
            }
        }
    }
}

/// Problems are listed one per line; TOML parse messages span several.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The key assigned on the line that holds `offset`, for messages such as "invalid type:
/// string, expected u32" that do not name it themselves.
fn key_at(text: &str, offset: usize) -> Option<&str> {
    let start = text
        .get(..offset)?
        .rfind('\n')
        .map_or(0, |i| i.saturating_add(1));
    let line = text.get(start..)?.lines().next()?;
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"'));
    plain.then_some(key)
}

pub(crate) fn parse_masking(
    path: &Path,
    text: &str,
    problems: &mut Vec<Problem>,
) -> BTreeMap<String, MaskingProfile> {
    let mut file = SettingsFile {
        path,
        text,
        problems,
    };
    let Some(parsed) = file.parse::<MaskingFile>() else {
        return BTreeMap::new();
    };
    let mut profiles = BTreeMap::new();
    for (name, entry) in parsed.profiles {
        let span = name.span();
        let name = name.into_inner();
        if name.trim().is_empty() {
            file.report(span.clone(), "a masking profile needs a name".to_owned());
        }
        if entry.rules.is_empty() {
            file.report(
                span,
                format!(
                    "masking profile `{name}` has no rules; add [[profiles.{name}.rules]] tables"
                ),
            );
            continue;
        }
        let rules = entry
            .rules
            .into_iter()
            .filter_map(|rule| mask_rule(&mut file, &name, rule))
            .collect();
        profiles.insert(
            name.clone(),
            MaskingProfile {
                name,
                description: entry.description,
                rules,
            },
        );
    }
    profiles
}

fn mask_rule(file: &mut SettingsFile<'_>, profile: &str, rule: RuleEntry) -> Option<MaskRule> {
    let rule_span = rule.mask.span();
    let columns = match (rule.column, rule.column_regex) {
        (Some(column), None) => {
            if column.get_ref().is_empty() {
                file.report(column.span(), "key `column`: empty column name".to_owned());
                return None;
            }
            ColumnMatcher::Name(column.into_inner())
        }
        (None, Some(pattern)) => match Regex::new(pattern.get_ref()) {
            Ok(regex) => ColumnMatcher::Pattern(regex),
            Err(error) => {
                // The regex crate draws a caret under the pattern over several lines; its last
                // line says what is wrong, and the location already points at the pattern.
                let text = error.to_string();
                let what = text
                    .lines()
                    .rev()
                    .find(|line| !line.trim().is_empty())
                    .map_or(text.as_str(), |line| line.trim_start_matches("error: "));
                let message = format!("key `column_regex`: not a valid regular expression: {what}");
                file.report(pattern.span(), message);
                return None;
            }
        },
        (Some(_), Some(_)) | (None, None) => {
            file.report(
                rule_span,
                format!(
                    "a rule of masking profile `{profile}` needs exactly one of `column` and `column_regex`"
                ),
            );
            return None;
        }
    };
    let kind = *rule.mask.get_ref();
    if kind != MaskKindName::Partial {
        for (key, value) in [
            ("keep_first", &rule.keep_first),
            ("keep_last", &rule.keep_last),
        ] {
            if let Some(value) = value {
                file.report(
                    value.span(),
                    format!("key `{key}`: only a `partial` mask keeps characters"),
                );
            }
        }
    }
    if kind != MaskKindName::Redact {
        if let Some(replacement) = &rule.replacement {
            file.report(
                replacement.span(),
                "key `replacement`: only a `redact` mask has a replacement".to_owned(),
            );
        }
    }
    let mask = match kind {
        MaskKindName::Redact => MaskKind::Redact {
            replacement: rule
                .replacement
                .map_or_else(|| "****".to_owned(), Spanned::into_inner),
        },
        MaskKindName::Hash => MaskKind::Hash,
        MaskKindName::Partial => {
            let keep_first = rule.keep_first.map_or(0, Spanned::into_inner);
            let keep_last = rule.keep_last.map_or(0, Spanned::into_inner);
            if keep_first == 0 && keep_last == 0 {
                file.report(
                    rule_span,
                    "key `mask`: a `partial` mask needs `keep_first` or `keep_last` (use `redact` to hide everything)"
                        .to_owned(),
                );
                return None;
            }
            MaskKind::Partial {
                keep_first,
                keep_last,
            }
        }
    };
    Some(MaskRule { columns, mask })
}

pub(crate) fn parse_approvals(
    path: &Path,
    text: &str,
    problems: &mut Vec<Problem>,
) -> ApprovalSettings {
    let mut file = SettingsFile {
        path,
        text,
        problems,
    };
    let mut settings = ApprovalSettings::default();
    let Some(parsed) = file.parse::<ApprovalsFile>() else {
        return settings;
    };
    if let Some(timeout) = parsed.timeout_seconds {
        let seconds = *timeout.get_ref();
        if seconds == 0 || seconds > MAX_APPROVAL_TIMEOUT_SECONDS {
            file.report(
                timeout.span(),
                format!(
                    "key `timeout_seconds`: {seconds} is out of range 1..={MAX_APPROVAL_TIMEOUT_SECONDS} (7 days)"
                ),
            );
        } else {
            settings.timeout = Duration::from_secs(seconds);
        }
    }
    if let Some(approvals) = parsed.default_approvals {
        let count = *approvals.get_ref();
        if count == 0 || count > MAX_APPROVALS {
            file.report(
                approvals.span(),
                format!("key `default_approvals`: {count} is out of range 1..={MAX_APPROVALS}"),
            );
        } else {
            settings.default_approvals = count;
        }
    }
    if let Some(groups) = parsed.approver_groups {
        let mut known = BTreeSet::new();
        for group in groups {
            if group.get_ref().trim().is_empty() {
                file.report(
                    group.span(),
                    "key `approver_groups`: empty group name".to_owned(),
                );
            } else {
                known.insert(group.into_inner());
            }
        }
        settings.approver_groups = Some(known);
    }
    if let Some(group) = parsed.default_approver_group {
        let listed = settings
            .approver_groups
            .as_ref()
            .is_none_or(|known| known.contains(group.get_ref()));
        if group.get_ref().trim().is_empty() {
            file.report(
                group.span(),
                "key `default_approver_group`: empty group name".to_owned(),
            );
        } else if !listed {
            file.report(
                group.span(),
                format!(
                    "key `default_approver_group`: `{}` is not in `approver_groups`",
                    group.get_ref()
                ),
            );
        } else {
            settings.default_approver_group = Some(group.into_inner());
        }
    }
    settings
}
