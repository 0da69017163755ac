//! The report as Markdown, CSV (RFC 4180) or JSON (HTML is `super::html`). Markdown, CSV and
//! HTML share one row model and one list of sections, so they say the same figures; their
//! evidence column is bounded (`EVIDENCE_SHOWN` seqs, then how many more), the JSON form
//! lists every seq.

use std::fmt::Write as _;

use serde::Serialize;

use super::report::{Counted, Report, NO_MEMBER_SEEN};

/// Seqs shown per figure in Markdown and CSV; the JSON form has them all.
pub const EVIDENCE_SHOWN: usize = 20;

/// What the report says about the part of the chain it read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainRange {
    pub dir: String,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub segments: usize,
    pub first_segment: Option<String>,
    pub last_segment: Option<String>,
    /// Lower-case hex of the last record's hash: what the signature binds the report to.
    pub head_hash: Option<String>,
    pub verified: bool,
    /// Where the chain breaks, as `audit verify` says it.
    pub broken: Option<String>,
    pub seals_signature_checked: bool,
    /// A fleet's review: each bastion's chain as the central store holds it (empty on one
    /// host, where the fields above say it).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostChain>,
}

/// One bastion's chain in a fleet review: the seqs read, the head, and whether every hash
/// and link verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HostChain {
    pub host: String,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub head_hash: Option<String>,
    pub verified: bool,
    pub broken: Option<String>,
}

/// How the body was sealed (absent when the chain did not verify).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportSignature {
    /// `ed25519` (the audit signing key) or `sha256` (no key configured: a digest only).
    pub method: &'static str,
    /// SHA-256 of the signed message, hex.
    pub digest: String,
    /// The Ed25519 signature of the message, hex.
    pub signature: Option<String>,
    /// The public key that verifies it (`audit public-key` prints the same).
    pub public_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Markdown,
    Csv,
    Json,
    Html,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "md" | "markdown" => Ok(Format::Markdown),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            "html" => Ok(Format::Html),
            other => Err(format!(
                "unknown format `{other}`: use md, csv, json or html"
            )),
        }
    }
}

/// One figure of the report, as Markdown and HTML tables and CSV rows show it.
pub(super) struct Row {
    pub(super) section: &'static str,
    pub(super) identity: String,
    pub(super) target: String,
    pub(super) item: String,
    pub(super) count: String,
    pub(super) detail: String,
    /// The records a figure was computed from, as the report names them (`seq` on one
    /// host, `bastion#seq` on a fleet).
    pub(super) evidence: Vec<String>,
}

/// A section of the Markdown and HTML reports: its key (the CSV `section` column and the
/// HTML anchor), its title, and what a reader must know to read it right.
pub(super) struct Section {
    pub(super) key: &'static str,
    pub(super) title: &'static str,
    pub(super) caveat: Option<&'static str>,
}

pub(super) const SECTIONS: [Section; 11] = [
    Section {
        key: "identity",
        title: "Per identity",
        caveat: None,
    },
    Section {
        key: "unmasked_reads",
        title: "Reads of masked tables that ran without a masking profile",
        caveat: None,
    },
    Section {
        key: "privileged_without_approval",
        title: "Privileged actions without an approval (must be none)",
        caveat: None,
    },
    Section {
        key: "privileged_with_approval",
        title: "Privileged actions with an approval",
        caveat: None,
    },
    Section {
        key: "sessions",
        title: "Sessions: which can be replayed",
        caveat: None,
    },
    Section {
        key: "production_reach",
        title: "Who can reach production targets today",
        caveat: None,
    },
    Section {
        key: "unused_permits",
        title: "Finding: permits that matched no request",
        caveat: None,
    },
    Section {
        key: "unused_access",
        title: "Finding: access never used",
        caveat: None,
    },
    Section {
        key: "stale_services",
        title: "Finding: stale service identities",
        caveat: None,
    },
    Section {
        key: "single_approver",
        title: "Finding: approvals always given by one person",
        caveat: None,
    },
    Section {
        key: "groups_unseen",
        title: "Finding: groups granted by policy with no member seen in the period",
        caveat: Some(
            "The agent cannot list an identity provider's groups: a group is listed when a \
             permit or an approval rule names it and no identity seen in the period carried \
             it. It may have members who did not use the agent in the period.",
        ),
    },
];

/// The production section's preamble: which targets, and how reach was decided.
pub(super) fn production_preamble(report: &Report) -> String {
    format!(
        "Production targets: {}. Limitation: {}.",
        if report.production.production_targets.is_empty() {
            "none labelled environment = production".to_string()
        } else {
            report.production.production_targets.join(", ")
        },
        report.production.limitation
    )
}

/// The report's title, without the markup of a format.
pub(super) fn title(report: &Report) -> String {
    format!(
        "Access review {} to {} (UTC, both days included){}",
        day(report.period.from_ms),
        day(report.period.to_ms.saturating_sub(1)),
        report
            .target
            .as_ref()
            .map(|t| format!(", target {t}"))
            .unwrap_or_default()
    )
}

fn time(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

fn day(ms: u64) -> String {
    i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| t.format("%Y-%m-%d").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// A record as the report names it: its seq, or on a fleet its bastion and seq there.
pub(super) fn evidence_name(report: &Report, seq: u64) -> String {
    let named = report.evidence_names.as_ref().and_then(|names| {
        usize::try_from(seq)
            .ok()
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| names.get(i))
    });
    match named {
        Some(name) => name.clone(),
        None => seq.to_string(),
    }
}

fn refs(report: &Report, seqs: &[u64]) -> Vec<String> {
    seqs.iter().map(|s| evidence_name(report, *s)).collect()
}

pub(super) fn evidence_text(seqs: &[String]) -> String {
    let mut out = seqs
        .iter()
        .take(EVIDENCE_SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(" ");
    if seqs.len() > EVIDENCE_SHOWN {
        let _ = write!(
            out,
            " … and {} more (--format json lists all)",
            seqs.len() - EVIDENCE_SHOWN
        );
    }
    out
}

fn counted_rows(
    report: &Report,
    rows: &mut Vec<Row>,
    section: &'static str,
    identity: &str,
    what: &str,
    list: &[Counted],
) {
    for c in list {
        rows.push(Row {
            section,
            identity: identity.to_string(),
            target: String::new(),
            item: format!("{what} {}", c.name),
            count: c.count.to_string(),
            detail: String::new(),
            evidence: refs(report, &c.evidence),
        });
    }
}

pub(super) fn rows(report: &Report) -> Vec<Row> {
    let mut rows = Vec::new();
    for i in &report.identities {
        let id = i.identity.as_str();
        for t in &i.targets {
            rows.push(Row {
                section: "identity",
                identity: id.to_string(),
                target: t.target.clone(),
                item: "connections".to_string(),
                count: t.connections.to_string(),
                detail: format!("first {}, last {}", time(t.first_ms), time(t.last_ms)),
                evidence: refs(report, &t.evidence),
            });
        }
        counted_rows(
            report,
            &mut rows,
            "identity",
            id,
            "statements",
            &i.statement_classes,
        );
        counted_rows(report, &mut rows, "identity", id, "ssh", &i.ssh_actions);
        counted_rows(report, &mut rows, "identity", id, "denied", &i.denials);
        counted_rows(
            report,
            &mut rows,
            "identity",
            id,
            "masked reads, profile",
            &i.masked_reads,
        );
        counted_rows(
            report,
            &mut rows,
            "identity",
            id,
            "approval given for",
            &i.approvals_given,
        );
        for r in &i.approvals_requested {
            rows.push(Row {
                section: "identity",
                identity: id.to_string(),
                target: r.target.clone(),
                item: format!(
                    "approval requested {}{}",
                    r.request_id,
                    if r.break_glass { " (break-glass)" } else { "" }
                ),
                count: String::new(),
                detail: format!("{}; approvers: {}", r.state, r.approvers.join(", ")),
                evidence: refs(report, &r.evidence),
            });
        }
        for r in &i.break_glass {
            rows.push(Row {
                section: "identity",
                identity: id.to_string(),
                target: r.target.clone(),
                item: format!("break-glass {}", r.request_id),
                count: String::new(),
                detail: format!("self-approved by {}", r.approvers.join(", ")),
                evidence: refs(report, &r.evidence),
            });
        }
        for s in &i.recorded_sessions {
            rows.push(Row {
                section: "identity",
                identity: id.to_string(),
                target: s.target.clone(),
                item: format!("recorded session {}", s.session_id),
                count: String::new(),
                detail: String::new(),
                evidence: refs(report, &s.evidence),
            });
        }
    }
    for u in &report.unmasked_reads {
        rows.push(Row {
            section: "unmasked_reads",
            identity: u.identity.clone(),
            target: u.target.clone(),
            item: u.tables.join(", "),
            count: String::new(),
            detail: format!(
                "{}; allowed by {}; {}",
                u.protected_by.join("; "),
                u.policy_ids.join(", "),
                u.statement
            ),
            evidence: refs(report, &[u.seq]),
        });
    }
    for (section, list) in [
        (
            "privileged_without_approval",
            &report.privileged.without_approval,
        ),
        ("privileged_with_approval", &report.privileged.approved),
    ] {
        for p in list {
            rows.push(Row {
                section,
                identity: p.identity.clone(),
                target: p.target.clone(),
                item: format!("{}: {}", p.event, p.what),
                count: String::new(),
                detail: if p.approved_by.is_empty() {
                    "no approval or grant".to_string()
                } else {
                    format!(
                        "{}; approvers: {}{}",
                        p.approved_by.join(", "),
                        p.approvers.join(", "),
                        if p.break_glass { "; BREAK-GLASS" } else { "" }
                    )
                },
                evidence: refs(report, &[p.seq]),
            });
        }
    }
    for s in &report.sessions {
        rows.push(Row {
            section: "sessions",
            identity: s.identity.clone(),
            target: s.target.clone(),
            item: format!("session {}", s.session_id),
            count: String::new(),
            detail: if s.replayable {
                "replayable".to_string()
            } else {
                format!("not replayable: {}", s.why)
            },
            evidence: refs(report, &s.evidence),
        });
    }
    for r in &report.production.reach {
        rows.push(Row {
            section: "production_reach",
            identity: r.identity.clone(),
            target: r.target.clone(),
            item: r.decision.clone(),
            count: String::new(),
            detail: r.policy_ids.join(", "),
            evidence: refs(report, &r.evidence),
        });
    }
    for p in &report.findings.unused_permits {
        rows.push(Row {
            section: "unused_permits",
            identity: String::new(),
            target: String::new(),
            item: p.clone(),
            count: "0".to_string(),
            detail: "matched no request in the period".to_string(),
            evidence: Vec::new(),
        });
    }
    for r in &report.findings.unused_access {
        rows.push(Row {
            section: "unused_access",
            identity: r.identity.clone(),
            target: r.target.clone(),
            item: r.decision.clone(),
            count: "0".to_string(),
            detail: format!("policies: {}", r.policy_ids.join(", ")),
            evidence: refs(report, &r.evidence),
        });
    }
    for s in &report.findings.stale_services {
        rows.push(Row {
            section: "stale_services",
            identity: s.identity.clone(),
            target: String::new(),
            item: "last seen".to_string(),
            count: String::new(),
            detail: time(s.last_seen_ms),
            evidence: refs(report, &s.evidence),
        });
    }
    for s in &report.findings.single_approver {
        rows.push(Row {
            section: "single_approver",
            identity: s.requester.clone(),
            target: String::new(),
            item: format!("always approved by {}", s.approver),
            count: s.requests.len().to_string(),
            detail: s.requests.join(", "),
            evidence: refs(report, &s.evidence),
        });
    }
    for g in &report.findings.groups_without_members_seen {
        rows.push(Row {
            section: "groups_unseen",
            identity: String::new(),
            target: String::new(),
            item: format!("group {}", g.group),
            count: "0".to_string(),
            detail: format!("{NO_MEMBER_SEEN}; named by {}", g.named_by.join(", ")),
            evidence: Vec::new(),
        });
    }
    rows
}

pub(super) fn chain_sentence(chain: &ChainRange) -> String {
    let state = match &chain.broken {
        Some(b) => format!("UNVERIFIED: the chain is BROKEN: {b}"),
        None if chain.seals_signature_checked => "verified intact, seals signed".to_string(),
        None => "verified intact".to_string(),
    };
    format!("{}: {state}", chain_range(chain))
}

/// Which records were read: the store, the seqs and the segment files.
pub(super) fn chain_range(chain: &ChainRange) -> String {
    if !chain.hosts.is_empty() {
        let hosts = chain
            .hosts
            .iter()
            .map(|h| {
                let range = match (h.first_seq, h.last_seq) {
                    (Some(a), Some(b)) => format!("seq {a}..{b}"),
                    _ => "no records".to_string(),
                };
                let state = match &h.broken {
                    Some(b) => format!("BROKEN: {b}"),
                    None => "verified".to_string(),
                };
                format!(
                    "{} {range}, head {} ({state})",
                    h.host,
                    h.head_hash.as_deref().unwrap_or("-")
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        return format!(
            "{} of {} bastions: {hosts}; fleet head {}",
            chain.dir,
            chain.hosts.len(),
            chain.head_hash.as_deref().unwrap_or("-")
        );
    }
    let range = match (chain.first_seq, chain.last_seq) {
        (Some(a), Some(b)) => format!("seq {a}..{b}"),
        _ => "no records".to_string(),
    };
    let segments = match (&chain.first_segment, &chain.last_segment) {
        (Some(a), Some(b)) => format!("{} segment(s), {a} to {b}", chain.segments),
        _ => format!("{} segment(s)", chain.segments),
    };
    format!("{} {range} in {segments}", chain.dir)
}

/// Where the signature part of a Markdown report starts: the signed body is what precedes it.
pub const MARKDOWN_SIGNATURE_HEADING: &str = "## Signature\n";

/// A value in a Markdown table: `|` escaped, line breaks as spaces, and control and bidi
/// characters as `[U+XXXX]` (as the HTML report shows them), so a hostile statement or name
/// cannot make the report read differently from what it holds.
fn md_cell(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '|' => out.push_str("\\|"),
            '\n' | '\r' => out.push(' '),
            c if c.is_control() || super::html::is_bidi_control(c) => {
                let _ = write!(out, "[U+{:04X}]", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out
}

pub fn markdown_body(report: &Report, chain: &ChainRange) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# {}\n", title(report));
    if !chain.verified {
        out.push_str("**UNVERIFIED: computed from a chain that does not verify; not signed.**\n\n");
    }
    let _ = writeln!(out, "Chain read: {}\n", chain_sentence(chain));
    let _ = writeln!(out, "Events in the period: {}\n", report.events);
    for note in &report.notes {
        let _ = writeln!(out, "Note: {note}\n");
    }
    let all = rows(report);
    for Section { key, title, caveat } in SECTIONS {
        let _ = writeln!(out, "## {title}\n");
        if key == "production_reach" {
            let _ = writeln!(out, "{}\n", production_preamble(report));
        }
        if let Some(caveat) = caveat {
            let _ = writeln!(out, "{caveat}\n");
        }
        let section: Vec<&Row> = all.iter().filter(|r| r.section == key).collect();
        if section.is_empty() {
            out.push_str("None.\n\n");
            continue;
        }
        out.push_str("| Identity | Target | What | Count | Detail | Evidence (seq) |\n");
        out.push_str("|---|---|---|---|---|---|\n");
        for r in section {
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {} |",
                md_cell(&r.identity),
                md_cell(&r.target),
                md_cell(&r.item),
                md_cell(&r.count),
                md_cell(&r.detail),
                evidence_text(&r.evidence)
            );
        }
        out.push('\n');
    }
    out
}

/// One RFC 4180 field: quoted when it holds a comma, a quote or a line break.
/// One RFC 4180 field. A value a spreadsheet would read as a formula (it starts with `=`,
/// `+`, `-`, `@`, a tab or a carriage return: a statement or name any user can choose) is
/// prefixed with `'`, which spreadsheets show as text; a lone `-` (no value) stays as it is.
pub fn csv_field(s: &str) -> String {
    let formula = s.len() > 1 && s.starts_with(['=', '+', '-', '@', '\t', '\r']);
    let s = if formula {
        std::borrow::Cow::Owned(format!("'{s}"))
    } else {
        std::borrow::Cow::Borrowed(s)
    };
    if s.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.into_owned()
    }
}

fn csv_line(out: &mut String, fields: &[&str]) {
    let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
    out.push_str(&line.join(","));
    out.push_str("\r\n");
}

pub const CSV_HEADER: [&str; 7] = [
    "section", "identity", "target", "item", "count", "detail", "evidence",
];

/// The CSV body: a header, one row per figure; the chain range is the first data row so a
/// spreadsheet shows it beside the figures.
pub fn csv_body(report: &Report, chain: &ChainRange) -> String {
    let mut out = String::new();
    csv_line(&mut out, &CSV_HEADER);
    csv_line(
        &mut out,
        &[
            "chain",
            "",
            report.target.as_deref().unwrap_or(""),
            &format!(
                "period {} to {}",
                day(report.period.from_ms),
                day(report.period.to_ms.saturating_sub(1))
            ),
            &report.events.to_string(),
            &chain_sentence(chain),
            "",
        ],
    );
    for r in rows(report) {
        csv_line(
            &mut out,
            &[
                r.section,
                &r.identity,
                &r.target,
                &r.item,
                &r.count,
                &r.detail,
                &evidence_text(&r.evidence),
            ],
        );
    }
    out
}

/// The signature rows (section `signature`) after the CSV body.
pub fn csv_signature(signature: Option<&ReportSignature>) -> String {
    let mut out = String::new();
    match signature {
        Some(s) => {
            csv_line(&mut out, &["signature", "", "", "method", "", s.method, ""]);
            csv_line(
                &mut out,
                &["signature", "", "", "digest", "", &s.digest, ""],
            );
            if let (Some(sig), Some(key)) = (&s.signature, &s.public_key) {
                csv_line(&mut out, &["signature", "", "", "ed25519", "", sig, ""]);
                csv_line(&mut out, &["signature", "", "", "public_key", "", key, ""]);
            }
        }
        None => csv_line(
            &mut out,
            &["signature", "", "", "UNVERIFIED", "", "not signed", ""],
        ),
    }
    out
}

pub fn markdown_signature(signature: Option<&ReportSignature>) -> String {
    let mut out = String::from(MARKDOWN_SIGNATURE_HEADING);
    out.push('\n');
    match signature {
        Some(s) => {
            let _ = writeln!(
                out,
                "Method: {}\n\nSHA-256 of the signed message: {}\n",
                match s.method {
                    "ed25519" => "Ed25519, the audit signing key (audit.signing_key_file)",
                    _ => "SHA-256 digest only (no audit.signing_key_file configured)",
                },
                s.digest
            );
            if let (Some(sig), Some(key)) = (&s.signature, &s.public_key) {
                let _ = writeln!(out, "Signature: {sig}\n\nPublic key: {key}");
            }
        }
        None => out.push_str("UNVERIFIED: not signed, the chain did not verify.\n"),
    }
    out
}

/// The JSON body: the report and the chain it read, compact (the signed bytes).
pub fn json_body(report: &Report, chain: &ChainRange) -> Result<String, serde_json::Error> {
    let review = serde_json::to_value(report)?;
    if report.evidence_names.is_none() {
        return serde_json::to_string(&serde_json::json!({ "chain": chain, "review": review }));
    }
    // On a fleet the evidence numbers are the report's own: each one cited is named here by
    // its bastion and its seq there.
    let mut cited = std::collections::BTreeSet::new();
    cited_evidence(&review, &mut cited);
    let records: serde_json::Map<String, serde_json::Value> = cited
        .into_iter()
        .map(|n| (n.to_string(), evidence_name(report, n).into()))
        .collect();
    serde_json::to_string(&serde_json::json!({
        "chain": chain,
        "review": review,
        "evidence_records": records,
    }))
}

/// Every number in an `evidence` array of the report, and every listed event's `seq`.
fn cited_evidence(value: &serde_json::Value, out: &mut std::collections::BTreeSet<u64>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("evidence", serde_json::Value::Array(items)) => {
                        out.extend(items.iter().filter_map(serde_json::Value::as_u64));
                    }
                    ("seq", serde_json::Value::Number(n)) => out.extend(n.as_u64()),
                    _ => cited_evidence(v, out),
                }
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                cited_evidence(v, out);
            }
        }
        _ => {}
    }
}
