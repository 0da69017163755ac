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
    /// Functions that run SQL given as text (see [`crate::runs_sql_text`]) that statements
    /// masked by this profile may call although it has column rules; lower case, as written
    /// in `allow_sql_text_functions`. Their results are masked by the detectors alone.
    pub allow_sql_text_functions: Vec<String>,
}

impl MaskingProfile {
    /// The first rule that selects a column by its name alone (`column` or `column_regex`).
    /// Rules by `table_column` and content detectors need more than a name; the proxy decides
    /// with [`crate::Masker::plan_column`].
    pub fn rule_for_column(&self, column: &str) -> Option<&MaskRule> {
        self.rules.iter().find(|rule| match &rule.selector {
            Selector::Column(matcher) => matcher.matches(column),
            Selector::TableColumn(_) | Selector::Content(_) => false,
        })
    }
}

#[derive(Debug, Clone)]
pub struct MaskRule {
    pub selector: Selector,
    pub mask: MaskKind,
}

/// What a rule masks: whole columns (by name or by table and column), or the parts of any
/// textual value that a content detector finds.
#[derive(Debug, Clone)]
pub enum Selector {
    /// `column` or `column_regex`: the whole value of every result column so named.
    Column(ColumnMatcher),
    /// `table_column`: the whole value of a result column that comes straight from that table
    /// column (the proxy resolves RowDescription's table OID and attribute number).
    TableColumn(TableColumn),
    /// `detector`: only the matched spans, in every textual value.
    Content(Detector),
}

/// Which result columns a rule applies to by name.
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

/// A table column, `schema.table.column`; written `table.column` it is in schema `public`.
/// Names are compared ASCII case-insensitively, like [`ColumnMatcher::Name`]; quoted
/// identifiers that contain a `.` cannot be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableColumn {
    pub schema: String,
    pub table: String,
    pub column: String,
}

impl TableColumn {
    /// Whether `qualified`, a `schema.table.column` as the proxy resolved it, is this column.
    pub fn matches(&self, qualified: &str) -> bool {
        let mut rest = qualified;
        for (index, part) in [&self.schema, &self.table, &self.column]
            .into_iter()
            .enumerate()
        {
            let Some(head) = rest.get(..part.len()) else {
                return false;
            };
            if !head.eq_ignore_ascii_case(part) {
                return false;
            }
            rest = rest.get(part.len()..).unwrap_or_default();
            if index < 2 {
                match rest.strip_prefix('.') {
                    Some(after) => rest = after,
                    None => return false,
                }
            }
        }
        rest.is_empty()
    }

    fn parse(text: &str) -> Option<Self> {
        let parts: Vec<&str> = text.split('.').collect();
        let valid = |part: &&str| !part.is_empty() && !part.chars().any(char::is_whitespace);
        if !parts.iter().all(valid) {
            return None;
        }
        let (schema, table, column) = match parts.as_slice() {
            [table, column] => ("public", *table, *column),
            [schema, table, column] => (*schema, *table, *column),
            _ => return None,
        };
        Some(TableColumn {
            schema: schema.to_owned(),
            table: table.to_owned(),
            column: column.to_owned(),
        })
    }
}

impl std::fmt::Display for TableColumn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.schema, self.table, self.column)
    }
}

/// A content detector: finds sensitive data inside a textual value wherever it appears. What
/// each one matches, and what keeps it from firing on look-alikes, is in `README.md`
/// ("Content detectors") and in `mask::detect`.
#[derive(Debug, Clone)]
pub enum Detector {
    /// 13 to 19 digits, optionally grouped by single spaces or single dashes, Luhn-valid.
    CardNumber,
    /// `local@domain.tld`, a pragmatic ASCII subset of RFC 5322 `addr-spec`.
    Email,
    /// US Social Security numbers, `AAA-GG-SSSS`, without the ranges never issued.
    NationalId,
    /// IBANs, compact or in groups of four, with a valid ISO 13616 mod-97 checksum.
    Iban,
    /// E.164 (`+` and 8 to 15 digits) and North American `(NNN) NNN-NNNN` numbers.
    Phone,
    /// Every non-empty match of an operator's regular expression.
    Regex(Regex),
}

impl Detector {
    /// The name used in `masking.toml`.
    pub fn name(&self) -> &'static str {
        match self {
            Detector::CardNumber => "card_number",
            Detector::Email => "email",
            Detector::NationalId => "national_id",
            Detector::Iban => "iban",
            Detector::Phone => "phone",
            Detector::Regex(_) => "regex",
        }
    }

    /// The fewest letters and digits a match has, so a `partial` mask that keeps more would
    /// show whole values; `None` when unknown (operator patterns).
    fn shortest_match(&self) -> Option<(u32, &'static str)> {
        match self {
            Detector::CardNumber => Some((13, "a card number (13 to 19 digits)")),
            Detector::Email => Some((4, "an email address (as short as a@b.co)")),
            Detector::NationalId => Some((9, "a US SSN (9 digits)")),
            Detector::Iban => Some((15, "an IBAN (15 to 34 characters)")),
            Detector::Phone => Some((8, "a phone number (8 to 15 digits)")),
            Detector::Regex(_) => None,
        }
    }
}

/// How a matched value is masked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskKind {
    /// Replace the whole value.
    Redact { replacement: String },
    /// Keep the first and last characters, replace the rest with `*` (card numbers: keep_last 4).
    /// A value too short to hide anything is masked entirely. In a detector's match only
    /// letters and digits count and are replaced; separators stay (`**** **** **** 1111`).
    Partial { keep_first: u32, keep_last: u32 },
    /// Replace by a keyed hash, so equal values stay joinable without being readable. The key
    /// is the agent's secret, not part of the policy set: `h:` and the first 16 hex digits of
    /// HMAC-SHA256(key, value), see [`crate::Masker`].
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
    #[serde(default)]
    allow_sql_text_functions: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    column: Option<Spanned<String>>,
    column_regex: Option<Spanned<String>>,
    table_column: Option<Spanned<String>>,
    detector: Option<Spanned<DetectorName>>,
    pattern: Option<Spanned<String>>,
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

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
enum DetectorName {
    CardNumber,
    Email,
    NationalId,
    Iban,
    Phone,
    Regex,
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
        let mut allow_sql_text_functions = Vec::new();
        for function in entry.allow_sql_text_functions {
            let span = function.span();
            let function = function.into_inner().to_ascii_lowercase();
            if crate::sql_text::runs_sql_text(&function) {
                allow_sql_text_functions.push(function);
            } else {
                file.report(
                    span,
                    format!(
                        "key `allow_sql_text_functions` of masking profile `{name}`: `{function}` is not a function known to run SQL given as text ({}); only those are refused, so only those can be allowed",
                        crate::sql_text::SQL_TEXT_FUNCTIONS.join(", ")
                    ),
                );
            }
        }
        profiles.insert(
            name.clone(),
            MaskingProfile {
                name,
                description: entry.description,
                rules,
                allow_sql_text_functions,
            },
        );
    }
    profiles
}

fn mask_rule(file: &mut SettingsFile<'_>, profile: &str, rule: RuleEntry) -> Option<MaskRule> {
    let rule_span = rule.mask.span();
    let given: Vec<&str> = [
        ("`column`", rule.column.is_some()),
        ("`column_regex`", rule.column_regex.is_some()),
        ("`table_column`", rule.table_column.is_some()),
        ("`detector`", rule.detector.is_some()),
    ]
    .into_iter()
    .filter_map(|(key, present)| present.then_some(key))
    .collect();
    if given.len() != 1 {
        let message = match given.as_slice() {
            [] => format!(
                "a rule of masking profile `{profile}` selects nothing; give it one of `column`, `column_regex`, `table_column` or `detector`"
            ),
            [init @ .., last] => format!(
                "a rule of masking profile `{profile}` needs exactly one of {} and {last}; a rule selects by one of `column`, `column_regex`, `table_column` or `detector`",
                init.join(", ")
            ),
        };
        file.report(rule_span, message);
        return None;
    }
    if let Some(pattern) = &rule.pattern {
        if rule.detector.as_ref().map(Spanned::get_ref) != Some(&DetectorName::Regex) {
            file.report(
                pattern.span(),
                "key `pattern`: only `detector = \"regex\"` takes a pattern".to_owned(),
            );
            return None;
        }
    }
    let selector = if let Some(column) = rule.column {
        if column.get_ref().is_empty() {
            file.report(column.span(), "key `column`: empty column name".to_owned());
            return None;
        }
        Selector::Column(ColumnMatcher::Name(column.into_inner()))
    } else if let Some(pattern) = rule.column_regex {
        Selector::Column(ColumnMatcher::Pattern(compile(
            file,
            "column_regex",
            &pattern,
        )?))
    } else if let Some(qualified) = rule.table_column {
        let Some(column) = TableColumn::parse(qualified.get_ref()) else {
            file.report(
                qualified.span(),
                format!(
                    "key `table_column`: `{}` is not `table.column` or `schema.table.column`",
                    qualified.get_ref()
                ),
            );
            return None;
        };
        Selector::TableColumn(column)
    } else if let Some(detector) = rule.detector {
        Selector::Content(match detector.get_ref() {
            DetectorName::CardNumber => Detector::CardNumber,
            DetectorName::Email => Detector::Email,
            DetectorName::NationalId => Detector::NationalId,
            DetectorName::Iban => Detector::Iban,
            DetectorName::Phone => Detector::Phone,
            DetectorName::Regex => {
                let Some(pattern) = rule.pattern else {
                    file.report(
                        detector.span(),
                        "key `detector`: the `regex` detector needs a `pattern`".to_owned(),
                    );
                    return None;
                };
                let regex = compile(file, "pattern", &pattern)?;
                if regex.is_match("") {
                    file.report(
                        pattern.span(),
                        "key `pattern`: matches the empty string, so it would match everywhere; require at least one character".to_owned(),
                    );
                    return None;
                }
                Detector::Regex(regex)
            }
        })
    } else {
        return None;
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
            let keep_first = rule.keep_first.as_ref().map_or(0, |n| *n.get_ref());
            let keep_last = rule.keep_last.as_ref().map_or(0, |n| *n.get_ref());
            if keep_first == 0 && keep_last == 0 {
                file.report(
                    rule_span,
                    "key `mask`: a `partial` mask needs `keep_first` or `keep_last` (use `redact` to hide everything)"
                        .to_owned(),
                );
                return None;
            }
            let kept = keep_first.saturating_add(keep_last);
            if let Selector::Content(detector) = &selector {
                if let Some((shortest, what)) = detector.shortest_match() {
                    if kept >= shortest {
                        let span = rule
                            .keep_last
                            .as_ref()
                            .or(rule.keep_first.as_ref())
                            .map_or(rule_span, Spanned::span);
                        file.report(
                            span,
                            format!(
                                "keys `keep_first` + `keep_last`: keeping {kept} characters of {what} would show whole values; keep fewer than {shortest}"
                            ),
                        );
                        return None;
                    }
                }
            }
            if kept > MAX_KEPT_CHARACTERS {
                file.report(
                    rule_span,
                    format!(
                        "keys `keep_first` + `keep_last`: keeping {kept} characters is not masking; keep at most {MAX_KEPT_CHARACTERS}"
                    ),
                );
                return None;
            }
            MaskKind::Partial {
                keep_first,
                keep_last,
            }
        }
    };
    Some(MaskRule { selector, mask })
}

/// A `partial` mask that keeps more than this shows most values whole.
const MAX_KEPT_CHARACTERS: u32 = 64;

fn compile(file: &mut SettingsFile<'_>, key: &str, pattern: &Spanned<String>) -> Option<Regex> {
    match Regex::new(pattern.get_ref()) {
        Ok(regex) => Some(regex),
        Err(error) => {
            // The regex crate draws a caret under the pattern over several lines; its last
            // line says what is wrong, and the location already points at the pattern.
            let text = error.to_string();
            let what = text
                .lines()
                .rev()
                .find(|line| !line.trim().is_empty())
                .map_or(text.as_str(), |line| line.trim_start_matches("error: "));
            let message = format!("key `{key}`: not a valid regular expression: {what}");
            file.report(pattern.span(), message);
            None
        }
    }
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
