//! The masking engine: applies a [`MaskingProfile`] to result values as the PostgreSQL proxy
//! forwards them. Pure: no I/O, no allocation for values it leaves alone.
//!
//! The proxy plans each result column once per RowDescription ([`Masker::plan_column`]) and
//! then masks every value of the column with that plan ([`Masker::mask_value`]). Free text that
//! belongs to no column (NOTIFY payloads, error and notice DETAIL fields, COPY fields) goes
//! through the content detectors alone ([`Masker::mask_text`]).
//!
//! Fail closed: a value that a whole-column rule selects but that cannot be masked in its
//! format (a binary `int4`, say) is an [`Unmaskable`] error, and the proxy must not send the
//! row. Wire formats are those of the PostgreSQL protocol (chapter 55, "Formats and Format
//! Codes"): 0 is text, 1 is binary.

mod detect;

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::settings::{ColumnMatcher, Detector, MaskKind, MaskingProfile, Selector, TableColumn};
use crate::sql_text::{runs_sql_text, unqualified};

/// One detector match in a text: the bytes at `range` are to be replaced by `replacement`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContentMatch {
    pub range: std::ops::Range<usize>,
    pub replacement: Vec<u8>,
}

/// The text wire format (format code 0).
pub const FORMAT_TEXT: i16 = 0;
/// The binary wire format (format code 1).
pub const FORMAT_BINARY: i16 = 1;

/// How the values of one result column are masked; decided once per RowDescription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnPlan {
    /// A column rule selects the column: every value is replaced as a whole by the mask of
    /// rule `rule` (an index into the profile's rules, in file order).
    Whole { rule: usize },
    /// No column rule selects the column, but the profile has content detectors: textual
    /// values are scanned and only what the detectors find is masked.
    ContentOnly,
    /// Nothing in the profile can apply: values pass unchanged at no cost.
    Untouched,
}

/// The table column a result column is read from, as the catalog names it: RowDescription
/// carries the table OID and attribute number of a column that is a plain reference to a
/// table's column, through aliases, subqueries and CTEs alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ColumnOrigin<'a> {
    /// `schema.table.column`, as `table_column` rules name it.
    pub qualified: &'a str,
    /// The column's own name in its table, which no alias in a query changes.
    pub column: &'a str,
}

/// The catalog columns that hold values sampled from the analyzed columns of every table:
/// `pg_statistic`'s `stavalues1`-`stavalues5`, shown by `pg_stats` as `most_common_vals`,
/// `histogram_bounds` and `most_common_elems`, and `pg_statistic_ext_data`'s MCV lists and
/// expression statistics, shown by `pg_stats_ext` and `pg_stats_ext_exprs`. After `ANALYZE`
/// (or autovacuum's) `SELECT histogram_bounds FROM pg_stats` lists a column's values; which
/// column's, only the row's `attname` says. The views' columns are listed as well as the
/// tables': a computed value (`histogram_bounds::text`) names the view, not what it reads.
const SAMPLED_VALUES: &[(&str, &str)] = &[
    ("pg_statistic", "stavalues"),
    ("pg_statistic_ext_data", "stxdmcv"),
    ("pg_statistic_ext_data", "stxdexpr"),
    ("pg_stats", "most_common_vals"),
    ("pg_stats", "histogram_bounds"),
    ("pg_stats", "most_common_elems"),
    ("pg_stats_ext", "most_common_vals"),
    ("pg_stats_ext_exprs", "most_common_vals"),
    ("pg_stats_ext_exprs", "histogram_bounds"),
    ("pg_stats_ext_exprs", "most_common_elems"),
];

/// Whether a source (as [`Masker::plan_derived`] takes it) may hold [`SAMPLED_VALUES`]: one of
/// those columns (by name alone when its table is unknown; compared as a prefix, so
/// `stavalues` covers all five), or a whole row of those tables.
fn holds_sampled_values(table: Option<&str>, column: Option<&str>) -> bool {
    SAMPLED_VALUES.iter().any(|(catalog, sampled)| {
        let table_matches = table.is_none_or(|t| unqualified(t).eq_ignore_ascii_case(catalog));
        let column_matches = column.is_none_or(|c| {
            c.get(..sampled.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(sampled))
        });
        table_matches && column_matches && (table.is_some() || column.is_some())
    })
}

/// A value a profile selects that cannot be masked in the format the client asked for. The
/// proxy must not send the row; the reason is for the client's error and the audit event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct Unmaskable {
    pub reason: String,
}

/// A masking profile compiled for the data path. Built once per profile (and key) and shared
/// by every connection: it is `Send + Sync` and masking takes `&self`.
///
/// `hash` masks are `h:` followed by the first 16 hex digits (64 bits) of
/// HMAC-SHA256(`hash_key`, value), where the value is its text as sent (the UTF-8 text of a
/// binary textual value, without the jsonb version byte; the contents of a JSON string). Equal
/// values give equal hashes across runs and agents that share the key, so they stay joinable;
/// without the key they cannot be recovered or confirmed by guessing.
pub struct Masker {
    profile: String,
    rules: Vec<CompiledRule>,
    detectors: Vec<CompiledDetector>,
    /// Whether a detector's prefilter needs the number of digits in a value (a value with
    /// too few cannot hold a card number, SSN, IBAN or phone number).
    counts_digits: bool,
    /// Functions that run SQL text which this profile allows despite its column rules.
    allowed_sql_text: Vec<String>,
    /// HMAC-SHA256 keyed once; cloned for every value.
    mac: Option<Hmac<Sha256>>,
}

struct CompiledRule {
    selector: RuleTarget,
    mask: MaskKind,
}

enum RuleTarget {
    Column(ColumnMatcher),
    TableColumn(TableColumn),
    Content,
}

struct CompiledDetector {
    rule: usize,
    scanner: Scanner,
}

enum Scanner {
    CardNumber,
    Email,
    NationalId,
    Iban,
    Phone,
    /// `None` if the pattern does not compile for bytes (never expected, as byte patterns are
    /// a superset of text patterns): then every value it scans is masked whole.
    Custom(Option<regex::bytes::Regex>),
}

impl fmt::Debug for Masker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Masker")
            .field("profile", &self.profile)
            .field("rules", &self.rules.len())
            .field("detectors", &self.detectors.len())
            .finish_non_exhaustive()
    }
}

/// A match of a detector: bytes `start..end`, masked by the rule with index `rule`.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    rule: usize,
}

/// How a type's values look on the wire, for masking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TypeClass {
    /// text, varchar, bpchar, name, unknown: the binary format is the text itself.
    Text,
    /// json: binary is the JSON text.
    Json,
    /// jsonb: binary is a version byte (1) and the JSON text.
    Jsonb,
    /// Built-in types whose values cannot hold free text (numbers, dates, uuid, bytea, ...):
    /// detectors skip them in either format; whole-column masks work in text format only.
    NonTextual,
    /// Everything else (arrays, records, xml, extension types such as citext, enums): in text
    /// format masked as text; in binary format their layout is unknown, so a whole-column mask
    /// or a detector match is [`Unmaskable`].
    Opaque,
}

fn type_class(oid: u32) -> TypeClass {
    match oid {
        19 | 25 | 705 | 1042 | 1043 => TypeClass::Text,
        114 => TypeClass::Json,
        3802 => TypeClass::Jsonb,
        // bool, bytea, "char", int8, int2, int4, oid, tid, xid, cid, geometric types, cidr,
        // float4, float8, circle, macaddr8, money, macaddr, inet, date, time, timestamp,
        // timestamptz, interval, timetz, bit, varbit, numeric, uuid, pg_lsn, xid8.
        16
        | 17
        | 18
        | 20
        | 21
        | 23
        | 26..=29
        | 600..=604
        | 628
        | 650
        | 700
        | 701
        | 718
        | 774
        | 790
        | 829
        | 869
        | 1082
        | 1083
        | 1114
        | 1184
        | 1186
        | 1266
        | 1560
        | 1562
        | 1700
        | 2950
        | 3220
        | 5069 => TypeClass::NonTextual,
        _ => TypeClass::Opaque,
    }
}

impl Masker {
    pub fn new(profile: &MaskingProfile, hash_key: &[u8]) -> Self {
        let mut detectors = Vec::new();
        let rules = profile
            .rules
            .iter()
            .enumerate()
            .map(|(index, rule)| {
                let selector = match &rule.selector {
                    Selector::Column(matcher) => RuleTarget::Column(matcher.clone()),
                    Selector::TableColumn(column) => RuleTarget::TableColumn(column.clone()),
                    Selector::Content(detector) => {
                        let scanner = match detector {
                            Detector::CardNumber => Scanner::CardNumber,
                            Detector::Email => Scanner::Email,
                            Detector::NationalId => Scanner::NationalId,
                            Detector::Iban => Scanner::Iban,
                            Detector::Phone => Scanner::Phone,
                            Detector::Regex(regex) => {
                                Scanner::Custom(regex::bytes::Regex::new(regex.as_str()).ok())
                            }
                        };
                        detectors.push(CompiledDetector {
                            rule: index,
                            scanner,
                        });
                        RuleTarget::Content
                    }
                };
                CompiledRule {
                    selector,
                    mask: rule.mask.clone(),
                }
            })
            .collect::<Vec<_>>();
        let counts_digits = detectors
            .iter()
            .any(|detector| !matches!(detector.scanner, Scanner::Custom(_) | Scanner::Email));
        Masker {
            profile: profile.name.clone(),
            rules,
            detectors,
            counts_digits,
            allowed_sql_text: profile.allow_sql_text_functions.clone(),
            mac: keyed_mac(hash_key),
        }
    }

    /// Whether the proxy must learn where each result column the server reports as a table
    /// column is read from (RowDescription's table OID and attribute number, resolved to
    /// [`ColumnOrigin`] in the catalog) before planning: any column rule needs it, a name
    /// rule because an alias (`email AS y`, a subquery's or CTE's column list, `AS c(i, e)`)
    /// changes the label but not the column the value is read from.
    pub fn needs_column_origins(&self) -> bool {
        self.has_column_rules()
    }

    /// The first of `functions` (names as a statement calls them, `schema.name` or `name`)
    /// that runs SQL given as text and that this profile does not allow, when the profile has
    /// column rules: what such a function reads cannot be followed to its columns, so the
    /// statement must be refused. `None` when nothing needs refusing.
    pub fn refused_sql_text_function<'a>(
        &self,
        functions: impl IntoIterator<Item = &'a str>,
    ) -> Option<&'a str> {
        if !self.has_column_rules() {
            return None;
        }
        functions.into_iter().find(|function| {
            runs_sql_text(function)
                && !self
                    .allowed_sql_text
                    .iter()
                    .any(|allowed| allowed.eq_ignore_ascii_case(unqualified(function)))
        })
    }

    /// Whether the profile has content detectors (so [`Masker::mask_text`] can change text).
    pub fn has_detectors(&self) -> bool {
        !self.detectors.is_empty()
    }

    /// Whether a rule selects whole columns (by name, pattern or table column), which output
    /// without column names (COPY) cannot honour.
    pub fn has_column_rules(&self) -> bool {
        self.rules
            .iter()
            .any(|rule| !matches!(rule.selector, RuleTarget::Content))
    }

    /// Decide how a result column is masked, once per RowDescription. `label` is the column's
    /// name as the client sees it; `origin` is the table column it is read from, when the
    /// server reports it as one and the proxy resolved it. A name rule (`column`,
    /// `column_regex`) selects by the label or by the origin's column name, so an alias does
    /// not unmask a column; a `table_column` rule by the origin. The first column rule that
    /// selects it, in file order, wins; detector rules never select a whole column.
    pub fn plan_column(&self, label: &str, origin: Option<ColumnOrigin<'_>>) -> ColumnPlan {
        let selected = self.rules.iter().position(|rule| match &rule.selector {
            RuleTarget::Column(matcher) => {
                matcher.matches(label) || origin.is_some_and(|o| matcher.matches(o.column))
            }
            RuleTarget::TableColumn(column) => origin.is_some_and(|o| column.matches(o.qualified)),
            RuleTarget::Content => false,
        });
        match selected {
            Some(rule) => ColumnPlan::Whole { rule },
            None if self.detectors.is_empty() => ColumnPlan::Untouched,
            None => ColumnPlan::ContentOnly,
        }
    }

    /// Decide how a computed result column is masked (one the server describes with no table:
    /// `lower(email)`, `row_to_json(c)`), from what the query computes it from. `sources` are
    /// `(table, column)` pairs: the table as written (`schema.table` or `table`, any schema),
    /// `None` when unknown; the column `None` for a whole row. A column rule selects the value
    /// when it could select any source: a name rule matches a named column and any whole row
    /// (which may hold a column so named), a table-column rule matches its column of its table
    /// or of an unknown one. The first such rule in file order masks the whole value; without
    /// one, [`Masker::plan_column`] decides by the result column's own name.
    pub fn plan_derived<'a>(
        &self,
        name: &str,
        sources: impl IntoIterator<Item = (Option<&'a str>, Option<&'a str>)>,
    ) -> ColumnPlan {
        let mut selected: Option<usize> = None;
        for (table, column) in sources {
            let first = if holds_sampled_values(table, column) {
                // Any analyzed column's values: every column rule could select it.
                self.rules
                    .iter()
                    .position(|rule| !matches!(rule.selector, RuleTarget::Content))
            } else {
                self.rules.iter().position(|rule| match &rule.selector {
                    RuleTarget::Column(matcher) => column.is_none_or(|c| matcher.matches(c)),
                    RuleTarget::TableColumn(tc) => {
                        let table_matches = table.is_none_or(|t| match t.split_once('.') {
                            Some((schema, table)) => {
                                tc.schema.eq_ignore_ascii_case(schema)
                                    && tc.table.eq_ignore_ascii_case(table)
                            }
                            None => tc.table.eq_ignore_ascii_case(t),
                        });
                        table_matches && column.is_none_or(|c| tc.column.eq_ignore_ascii_case(c))
                    }
                    RuleTarget::Content => false,
                })
            };
            selected = match (selected, first) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
        }
        match selected {
            Some(rule) => ColumnPlan::Whole { rule },
            None => self.plan_column(name, None),
        }
    }

    /// Whether a value of this type can carry a mask's text (text, json and types unknown
    /// here); numbers, booleans, dates and other typed values cannot. A computed value of
    /// such a type that a rule selects is sent as NULL, which every type can hold.
    pub fn holds_text(type_oid: u32) -> bool {
        !matches!(type_class(type_oid), TypeClass::NonTextual)
    }

    /// Mask one non-NULL value of a column planned with [`Masker::plan_column`]. `format` is
    /// the wire format (0 text, 1 binary) and `type_oid` the column's type from RowDescription.
    ///
    /// `Ok(None)`: forward the value unchanged. `Ok(Some(bytes))`: send these bytes instead.
    /// `Err(Unmaskable)`: the value must not be sent; end the row with an error.
    pub fn mask_value(
        &self,
        plan: &ColumnPlan,
        format: i16,
        type_oid: u32,
        value: &[u8],
    ) -> Result<Option<Vec<u8>>, Unmaskable> {
        if format != FORMAT_TEXT && format != FORMAT_BINARY {
            return Err(self.unmaskable(format!("unknown wire format code {format}")));
        }
        let binary = format == FORMAT_BINARY;
        match *plan {
            ColumnPlan::Untouched => Ok(None),
            ColumnPlan::Whole { rule } => {
                let Some(rule) = self.rules.get(rule) else {
                    return Err(self.unmaskable(format!(
                        "column plan names rule {rule}, which this profile does not have"
                    )));
                };
                self.mask_whole(&rule.mask, binary, type_oid, value)
                    .map(Some)
                    .ok_or_else(|| {
                        self.unmaskable(format!(
                            "a column of type {} selected for whole-value masking was requested in binary format, which cannot be masked; request text format for it",
                            type_name(type_oid)
                        ))
                    })
            }
            ColumnPlan::ContentOnly => self.mask_content(binary, type_oid, value),
        }
    }

    /// The content detectors alone, for text that is not a column value: NOTIFY payloads,
    /// error and notice DETAIL fields, COPY fields. `None` if nothing was found.
    pub fn mask_text(&self, text: &str) -> Option<String> {
        let masked = self.mask_found(text.as_bytes(), false)?;
        Some(match String::from_utf8(masked) {
            Ok(text) => text,
            // Only an operator pattern that matches inside a UTF-8 sequence gets here.
            Err(error) => String::from_utf8_lossy(error.as_bytes()).into_owned(),
        })
    }

    /// Where the content detectors match in `text` and what replaces each match, in order and
    /// without overlaps: the same matches and replacements as [`Masker::mask_text`], for
    /// callers that must keep bytes between matches in place (a terminal stream whose escape
    /// sequences are not part of the text).
    pub fn content_matches(&self, text: &[u8]) -> Vec<ContentMatch> {
        self.find(text)
            .into_iter()
            .map(|span| {
                let matched = text.get(span.start..span.end).unwrap_or_default();
                let mut replacement = Vec::new();
                self.replace(span.rule, matched, &mut replacement);
                ContentMatch {
                    range: span.start..span.end,
                    replacement,
                }
            })
            .collect()
    }

    /// The mask of rule `rule` for one detector match. A partial mask counts letters and
    /// digits only, so separators keep the shape readable.
    fn replace(&self, rule: usize, matched: &[u8], out: &mut Vec<u8>) {
        match self.rules.get(rule).map(|rule| &rule.mask) {
            Some(MaskKind::Partial {
                keep_first,
                keep_last,
            }) => partial(matched, *keep_first, *keep_last, significant, out),
            Some(mask) => self.mask_plain(mask, matched, out),
            // Unreachable: spans carry indices of this profile's rules. Hide it anyway.
            None => out.extend(std::iter::repeat_n(b'*', matched.len())),
        }
    }

    fn unmaskable(&self, what: String) -> Unmaskable {
        Unmaskable {
            reason: format!("masking profile `{}`: {what}", self.profile),
        }
    }

    /// The whole replacement for a value, or `None` if its type cannot be rewritten in binary.
    fn mask_whole(
        &self,
        mask: &MaskKind,
        binary: bool,
        type_oid: u32,
        value: &[u8],
    ) -> Option<Vec<u8>> {
        let class = type_class(type_oid);
        let mut out = Vec::with_capacity(value.len().max(18).saturating_add(2));
        match (class, binary) {
            (TypeClass::Json, _) | (TypeClass::Jsonb, false) => {
                self.mask_json_whole(mask, value, &mut out);
            }
            (TypeClass::Jsonb, true) => {
                let text = match value.split_first() {
                    Some((&JSONB_VERSION, text)) => text,
                    _ => value,
                };
                out.push(JSONB_VERSION);
                self.mask_json_whole(mask, text, &mut out);
            }
            (TypeClass::Text, _) | (_, false) => self.mask_plain(mask, value, &mut out),
            (TypeClass::NonTextual | TypeClass::Opaque, true) => return None,
        }
        Some(out)
    }

    /// A whole JSON value becomes a JSON string, so the client can still parse it. A JSON
    /// string is masked by its contents (when it has no escapes), so it hashes like the text.
    fn mask_json_whole(&self, mask: &MaskKind, json: &[u8], out: &mut Vec<u8>) {
        let trimmed = json.trim_ascii();
        let inner = trimmed
            .strip_prefix(b"\"")
            .and_then(|rest| rest.strip_suffix(b"\""))
            .filter(|inner| !inner.contains(&b'\\') && !inner.contains(&b'"'));
        let mut masked = Vec::new();
        self.mask_plain(mask, inner.unwrap_or(json), &mut masked);
        out.push(b'"');
        json_escape(&masked, out);
        out.push(b'"');
    }

    fn mask_plain(&self, mask: &MaskKind, value: &[u8], out: &mut Vec<u8>) {
        match mask {
            MaskKind::Redact { replacement } => out.extend_from_slice(replacement.as_bytes()),
            MaskKind::Hash => self.hash(value, out),
            MaskKind::Partial {
                keep_first,
                keep_last,
            } => partial_whole(value, *keep_first, *keep_last, out),
        }
    }

    fn hash(&self, value: &[u8], out: &mut Vec<u8>) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.extend_from_slice(b"h:");
        let Some(mut mac) = self.mac.clone() else {
            out.extend_from_slice(b"????????????????");
            return;
        };
        mac.update(value);
        let digest = mac.finalize().into_bytes();
        for byte in digest.iter().take(8) {
            for nibble in [byte >> 4, byte & 0x0f] {
                out.push(HEX.get(usize::from(nibble)).copied().unwrap_or(b'0'));
            }
        }
    }

    fn mask_content(
        &self,
        binary: bool,
        type_oid: u32,
        value: &[u8],
    ) -> Result<Option<Vec<u8>>, Unmaskable> {
        match (type_class(type_oid), binary) {
            (TypeClass::NonTextual, _) => Ok(None),
            (TypeClass::Text | TypeClass::Opaque, false) | (TypeClass::Text, true) => {
                Ok(self.mask_found(value, false))
            }
            (TypeClass::Json, _) | (TypeClass::Jsonb, false) => Ok(self.mask_found(value, true)),
            (TypeClass::Jsonb, true) => match value.split_first() {
                Some((&JSONB_VERSION, text)) => Ok(self.mask_found(text, true).map(|masked| {
                    let mut out = Vec::with_capacity(masked.len().saturating_add(1));
                    out.push(JSONB_VERSION);
                    out.extend_from_slice(&masked);
                    out
                })),
                _ => self.refuse_if_found(type_oid, value),
            },
            (TypeClass::Opaque, true) => self.refuse_if_found(type_oid, value),
        }
    }

    /// A binary value whose layout is unknown: it passes if no detector finds anything in its
    /// bytes; otherwise masking would corrupt it and passing it would leak, so it is refused.
    fn refuse_if_found(&self, type_oid: u32, value: &[u8]) -> Result<Option<Vec<u8>>, Unmaskable> {
        match self.find(value).first() {
            None => Ok(None),
            Some(span) => {
                let detector = self
                    .detectors
                    .iter()
                    .find(|d| d.rule == span.rule)
                    .map_or("a detector", |d| d.scanner.name());
                Err(self.unmaskable(format!(
                    "a binary value of type {} contains what {detector} detects and cannot be masked in binary format; request text format for it",
                    type_name(type_oid)
                )))
            }
        }
    }

    /// Every detector match, sorted, overlapping matches merged (a merged match is masked by
    /// the first rule among those that found it).
    fn find(&self, text: &[u8]) -> Vec<Span> {
        let mut spans = Vec::new();
        if self.detectors.is_empty() {
            return spans;
        }
        // One vectorised pass counts digits; the other prefilters search for one byte.
        let digits = if self.counts_digits {
            text.iter().filter(|byte| byte.is_ascii_digit()).count()
        } else {
            0
        };
        for detector in &self.detectors {
            let rule = detector.rule;
            let mut found = |range: std::ops::Range<usize>| {
                spans.push(Span {
                    start: range.start,
                    end: range.end,
                    rule,
                });
            };
            match &detector.scanner {
                Scanner::CardNumber if digits >= 13 => detect::card_numbers(text, &mut found),
                Scanner::Email if text.contains(&b'@') => detect::emails(text, &mut found),
                Scanner::NationalId if digits >= 9 && text.contains(&b'-') => {
                    detect::us_social_security_numbers(text, &mut found);
                }
                Scanner::Iban
                    if digits >= 2
                        && text.len() >= 15
                        && text.iter().any(u8::is_ascii_uppercase) =>
                {
                    detect::ibans(text, &mut found);
                }
                Scanner::Phone if digits >= 10 || (digits >= 8 && text.contains(&b'+')) => {
                    detect::phone_numbers(text, &mut found);
                }
                Scanner::Custom(Some(regex)) => {
                    for m in regex.find_iter(text).filter(|m| !m.is_empty()) {
                        found(m.range());
                    }
                }
                Scanner::Custom(None) if !text.is_empty() => found(0..text.len()),
                _ => {}
            }
        }
        if spans.len() > 1 {
            spans.sort_unstable_by_key(|span| (span.start, span.rule));
            let mut merged: Vec<Span> = Vec::with_capacity(spans.len());
            for span in spans {
                match merged.last_mut() {
                    Some(last) if span.start < last.end => {
                        last.end = last.end.max(span.end);
                        last.rule = last.rule.min(span.rule);
                    }
                    _ => merged.push(span),
                }
            }
            spans = merged;
        }
        spans
    }

    /// The text with every detector match masked, or `None` if there was none. In JSON, a
    /// replacement inside a string is escaped and one outside a string (a bare number) becomes
    /// a string, so the client can still parse the document.
    fn mask_found(&self, text: &[u8], json: bool) -> Option<Vec<u8>> {
        let spans = self.find(text);
        if spans.is_empty() {
            return None;
        }
        let mut out = Vec::with_capacity(text.len().saturating_add(16));
        let mut strings = JsonStrings::default();
        let mut copied = 0;
        let mut replacement = Vec::new();
        for span in spans {
            out.extend_from_slice(text.get(copied..span.start).unwrap_or_default());
            let matched = text.get(span.start..span.end).unwrap_or_default();
            replacement.clear();
            self.replace(span.rule, matched, &mut replacement);
            if json {
                if strings.inside(text, span.start) {
                    json_escape(&replacement, &mut out);
                } else {
                    out.push(b'"');
                    json_escape(&replacement, &mut out);
                    out.push(b'"');
                }
            } else {
                out.extend_from_slice(&replacement);
            }
            copied = span.end;
        }
        out.extend_from_slice(text.get(copied..).unwrap_or_default());
        Some(out)
    }
}

impl Scanner {
    fn name(&self) -> &'static str {
        match self {
            Scanner::CardNumber => "the card_number detector",
            Scanner::Email => "the email detector",
            Scanner::NationalId => "the national_id detector",
            Scanner::Iban => "the iban detector",
            Scanner::Phone => "the phone detector",
            Scanner::Custom(_) => "a regex detector",
        }
    }
}

const JSONB_VERSION: u8 = 1;

/// HMAC takes keys of any length (RFC 2104), so keying never fails; if the crate ever
/// refused a key, hashes would hide values without a key rather than expose them.
fn keyed_mac(key: &[u8]) -> Option<Hmac<Sha256>> {
    <Hmac<Sha256> as Mac>::new_from_slice(key).ok()
}

/// Which positions of a JSON text are inside a string, walking forward once over all matches.
#[derive(Default)]
struct JsonStrings {
    position: usize,
    inside: bool,
    escaped: bool,
}

impl JsonStrings {
    fn inside(&mut self, text: &[u8], until: usize) -> bool {
        for &byte in text.get(self.position..until).unwrap_or_default() {
            if self.escaped {
                self.escaped = false;
            } else if self.inside && byte == b'\\' {
                self.escaped = true;
            } else if byte == b'"' {
                self.inside = !self.inside;
            }
        }
        self.position = self.position.max(until);
        self.inside
    }
}

fn json_escape(text: &[u8], out: &mut Vec<u8>) {
    for &byte in text {
        match byte {
            b'"' => out.extend_from_slice(b"\\\""),
            b'\\' => out.extend_from_slice(b"\\\\"),
            b'\n' => out.extend_from_slice(b"\\n"),
            b'\r' => out.extend_from_slice(b"\\r"),
            b'\t' => out.extend_from_slice(b"\\t"),
            0..=0x1f => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                out.extend_from_slice(b"\\u00");
                for nibble in [byte >> 4, byte & 0x0f] {
                    out.push(HEX.get(usize::from(nibble)).copied().unwrap_or(b'0'));
                }
            }
            _ => out.push(byte),
        }
    }
}

/// In a detector's match, letters and digits (and any non-ASCII character) are what a partial
/// mask counts and hides; ASCII spaces and punctuation stay, so the shape remains readable.
fn significant(character: &[u8]) -> bool {
    match character {
        [byte] => !(byte.is_ascii_whitespace() || byte.is_ascii_punctuation()),
        _ => true,
    }
}

/// Keep the first `keep_first` and last `keep_last` counted characters and replace every other
/// counted character by one `*`. Characters are UTF-8 characters; text that is not UTF-8 (a
/// single-byte client encoding) is taken a byte at a time. A value with no more counted
/// characters than are kept is hidden entirely, so a partial mask never shows a whole value.
fn partial(
    text: &[u8],
    keep_first: u32,
    keep_last: u32,
    counted: impl Fn(&[u8]) -> bool,
    out: &mut Vec<u8>,
) {
    let total = characters(text).filter(|c| counted(c)).count();
    let keep_first = usize::try_from(keep_first).unwrap_or(usize::MAX);
    let keep_last = usize::try_from(keep_last).unwrap_or(usize::MAX);
    let hide_all = total <= keep_first.saturating_add(keep_last);
    let mut index = 0;
    for character in characters(text) {
        if !counted(character) {
            out.extend_from_slice(character);
            continue;
        }
        let kept = !hide_all && (index < keep_first || index >= total.saturating_sub(keep_last));
        if kept {
            out.extend_from_slice(character);
        } else {
            out.push(b'*');
        }
        index += 1;
    }
}

/// [`partial`] counting every character (a whole value's mask), in three copies instead of
/// one step per character: the hot path of a masked column. The same output as
/// `partial(text, keep_first, keep_last, |_| true, out)`.
fn partial_whole(text: &[u8], keep_first: u32, keep_last: u32, out: &mut Vec<u8>) {
    let utf8 = std::str::from_utf8(text).is_ok();
    // In UTF-8 a character starts at every byte that is not a continuation byte.
    let starts = |b: &u8| !utf8 || (*b & 0xc0) != 0x80;
    let total = if utf8 {
        text.iter().filter(|b| starts(b)).count()
    } else {
        text.len()
    };
    let keep_first = usize::try_from(keep_first).unwrap_or(usize::MAX);
    let keep_last = usize::try_from(keep_last).unwrap_or(usize::MAX);
    if total <= keep_first.saturating_add(keep_last) {
        out.resize(out.len().saturating_add(total), b'*');
        return;
    }
    // The byte offset where character `n` starts (`text.len()` for `n == total`).
    let offset = |n: usize| {
        if !utf8 {
            return n;
        }
        text.iter()
            .enumerate()
            .filter(|(_, b)| starts(b))
            .nth(n)
            .map_or(text.len(), |(i, _)| i)
    };
    let head_end = offset(keep_first);
    let tail_start = offset(total - keep_last);
    out.extend_from_slice(text.get(..head_end).unwrap_or_default());
    out.resize(
        out.len().saturating_add(total - keep_first - keep_last),
        b'*',
    );
    out.extend_from_slice(text.get(tail_start..).unwrap_or_default());
}

/// The characters of `text` as byte slices: UTF-8 characters if it is UTF-8, else bytes.
fn characters(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    let utf8 = std::str::from_utf8(text).is_ok();
    let mut rest = text;
    std::iter::from_fn(move || {
        let first = *rest.first()?;
        let len = if utf8 { utf8_len(first) } else { 1 };
        let (character, tail) = rest.split_at_checked(len).unwrap_or((rest, &[]));
        rest = tail;
        Some(character)
    })
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xf0..=0xff => 4,
        0xe0..=0xef => 3,
        0xc0..=0xdf => 2,
        _ => 1,
    }
}

fn type_name(oid: u32) -> String {
    let name = match oid {
        16 => "bool",
        17 => "bytea",
        18 => "\"char\"",
        20 => "int8",
        21 => "int2",
        23 => "int4",
        26 => "oid",
        700 => "float4",
        701 => "float8",
        790 => "money",
        869 => "inet",
        1082 => "date",
        1083 => "time",
        1114 => "timestamp",
        1184 => "timestamptz",
        1186 => "interval",
        1700 => "numeric",
        2950 => "uuid",
        _ => return format!("OID {oid}"),
    };
    format!("{name} (OID {oid})")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn the_whole_value_partial_mask_equals_the_character_by_character_one() {
        let values: [&[u8]; 12] = [
            b"",
            b"a",
            b"4111 1111 1111 1111",
            b"customer 17 asked about delivery windows",
            "Zoë Ångström-Øre".as_bytes(),
            "日本語のテキスト".as_bytes(),
            "🙂🙃🙂🙃🙂".as_bytes(),
            "ab🙂".as_bytes(),
            // Not UTF-8 (a LATIN1 client): taken a byte at a time.
            b"caf\xe9 cr\xe8me br\xfbl\xe9e",
            b"\xff\xfe\xfd",
            // A truncated sequence at the end is not UTF-8 either.
            b"abc\xe6\x97",
            b"tab\tand\nnewline",
        ];
        for value in values {
            for keep_first in [0, 1, 2, 4, 100] {
                for keep_last in [0, 1, 4, 100, u32::MAX] {
                    let mut slow = b"prefix:".to_vec();
                    partial(value, keep_first, keep_last, |_| true, &mut slow);
                    let mut fast = b"prefix:".to_vec();
                    partial_whole(value, keep_first, keep_last, &mut fast);
                    assert_eq!(
                        fast,
                        slow,
                        "{:?} keep_first={keep_first} keep_last={keep_last}",
                        String::from_utf8_lossy(value)
                    );
                }
            }
        }
    }
}
