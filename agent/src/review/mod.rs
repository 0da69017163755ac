//! Access reviews (`portcullis review report`): who reached what, what they ran, who approved
//! it, what was read unmasked, which sessions replay, who can reach production now, and the
//! least-privilege findings, each figure with the event seqs it was computed from.
//!
//! `report` computes (pure, over parsed events and the policies in force), `render` writes
//! Markdown, CSV or JSON and `html` one self-contained HTML page; this file does the I/O around them: it verifies the chain, reads it,
//! and seals the rendered body to the chain's head, with the audit signing key when one is
//! configured. A chain that does not verify still gives its report, marked UNVERIFIED and not
//! signed, and the command fails.

pub mod html;
pub mod render;
pub mod report;

#[cfg(test)]
mod fixture;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};

use portcullis_audit_store::{ChainHash, SigningKey};

pub use render::{ChainRange, Format, HostChain, ReportSignature};
pub use report::{Inputs, Period, TrailEvent};

/// Put before the body in the signed message, so a report signature can never pass for a
/// seal's (the audit key signs both).
const SIGNATURE_DOMAIN: &[u8] = b"portcullis-review-report-v1\0";

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    #[error("reading the audit store {dir}: {source}")]
    Store {
        dir: PathBuf,
        source: portcullis_audit_store::StoreError,
    },
    #[error("listing the audit store {dir}: {source}")]
    List {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("rendering the report as JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the audit signing key cannot sign: {0}")]
    Key(String),
    #[error("reading the central audit store: {0}")]
    Central(String),
}

/// What `run` printed and whether it may be trusted.
pub struct Rendered {
    pub text: String,
    /// The chain verified and the report is signed.
    pub verified: bool,
}

/// The events read back, with where the reading stopped.
struct Trail {
    events: Vec<TrailEvent>,
    head: Option<(u64, ChainHash)>,
    first_seq: Option<u64>,
    /// Why the reading stopped before the end, or records that are not events.
    problems: Vec<String>,
}

/// Reads up to `upto` (the last seq `verify` checked), so records the running agent appends
/// meanwhile are not counted as verified.
fn read_trail(dir: &Path, upto: Option<u64>) -> Result<Trail, ReviewError> {
    let reader = portcullis_audit_store::Reader::all(dir).map_err(|source| ReviewError::Store {
        dir: dir.to_path_buf(),
        source,
    })?;
    let mut trail = Trail {
        events: Vec::new(),
        head: None,
        first_seq: None,
        problems: Vec::new(),
    };
    for record in reader {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                // The reader checks each link: what follows a bad one is not evidence.
                trail
                    .problems
                    .push(format!("reading stopped after a bad record: {e}"));
                break;
            }
        };
        if upto.is_some_and(|last| record.seq > last) {
            break;
        }
        trail.first_seq.get_or_insert(record.seq);
        trail.head = Some((record.seq, record.hash));
        match TrailEvent::parse(record.seq, &record.event) {
            Ok(e) => trail.events.push(e),
            Err(e) => trail
                .problems
                .push(format!("record {} is not an event: {e}", record.seq)),
        }
    }
    Ok(trail)
}

fn segment_names(dir: &Path) -> Result<Vec<String>, ReviewError> {
    let err = |source| ReviewError::List {
        dir: dir.to_path_buf(),
        source,
    };
    let mut names: Vec<(u64, String)> = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(err)? {
        let name = entry
            .map_err(err)?
            .file_name()
            .to_string_lossy()
            .into_owned();
        if let Some(seq) = portcullis_audit_store::parse_segment_file_name(&name) {
            names.push((seq, name));
        }
    }
    names.sort();
    Ok(names.into_iter().map(|(_, n)| n).collect())
}

/// The message a report's digest and signature cover: the domain, the body exactly as
/// printed, and the hash of the last record read (the verified chain head).
pub fn signed_message(body: &str, head: &ChainHash) -> Vec<u8> {
    let mut msg = Vec::with_capacity(SIGNATURE_DOMAIN.len() + body.len() + 32);
    msg.extend_from_slice(SIGNATURE_DOMAIN);
    msg.extend_from_slice(body.as_bytes());
    msg.extend_from_slice(&head.0);
    msg
}

fn sign(
    body: &str,
    head: &ChainHash,
    key: Option<&SigningKey>,
) -> Result<ReportSignature, ReviewError> {
    let msg = signed_message(body, head);
    let digest = hex::encode(ring::digest::digest(&ring::digest::SHA256, &msg));
    let Some(key) = key else {
        return Ok(ReportSignature {
            method: "sha256",
            digest,
            signature: None,
            public_key: None,
        });
    };
    // The seed is the audit key's; Ed25519 signatures are deterministic, so ring's equal the
    // ones the store's own library would make and its verifier accepts them.
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(&key.to_bytes())
        .map_err(|e| ReviewError::Key(e.to_string()))?;
    Ok(ReportSignature {
        method: "ed25519",
        digest,
        signature: Some(hex::encode(pair.sign(&msg).as_ref())),
        public_key: Some(hex::encode(key.verifying_key().to_bytes())),
    })
}

/// The policy side of a review: the policies in force and the configured targets.
pub struct PolicyView<'a> {
    pub policies: Option<&'a portcullis_policy::PolicySet>,
    pub targets: &'a [portcullis_policy::Target],
}

pub struct Options<'a> {
    pub period: Period,
    pub target: Option<&'a str>,
    pub stale_days: u64,
    pub format: Format,
}

impl Options<'_> {
    /// What the report is computed from: these options and the policy in force.
    fn inputs<'b>(&'b self, policy: &PolicyView<'b>) -> Inputs<'b> {
        Inputs {
            period: self.period,
            target: self.target,
            policies: policy.policies,
            targets: policy.targets,
            stale_days: self.stale_days,
        }
    }
}

/// Verifies the chain in `dir`, computes the review over it and renders it, sealed.
pub fn run(
    dir: &Path,
    policy: &PolicyView<'_>,
    options: &Options<'_>,
    key: Option<&SigningKey>,
) -> Result<Rendered, ReviewError> {
    let verifying = key.map(SigningKey::verifying_key);
    let verdict = portcullis_audit_store::verify(dir, verifying.as_ref());
    let trail = read_trail(dir, verdict.last_seq.filter(|_| verdict.ok))?;
    let segments = segment_names(dir)?;
    let mut report = report::compute(&trail.events, &options.inputs(policy));
    report.notes.extend(trail.problems.iter().cloned());
    let verified = verdict.ok
        && trail.problems.is_empty()
        && trail.head.map(|(seq, _)| seq) == verdict.last_seq
        && trail.head.is_some();
    let broken = match (&verdict.first_break, &trail.problems.first(), trail.head) {
        (Some(b), _, _) => Some(b.to_string()),
        (None, Some(p), _) => Some((*p).clone()),
        (None, None, None) => Some("the store holds no records".to_string()),
        (None, None, Some(_)) => None,
    };
    let chain = ChainRange {
        dir: dir.display().to_string(),
        first_seq: trail.first_seq,
        last_seq: trail.head.map(|(seq, _)| seq),
        segments: segments.len(),
        first_segment: segments.first().cloned(),
        last_segment: segments.last().cloned(),
        head_hash: trail.head.map(|(_, h)| h.to_hex()),
        verified,
        broken,
        seals_signature_checked: verdict.signatures_checked,
        hosts: Vec::new(),
    };
    let head = trail.head.map(|(_, h)| h).filter(|_| verified);
    seal(&report, &chain, head, options.format, key)
}

/// Renders `report` and seals it to `head` (the verified chain's head; `None`: the chain
/// did not verify, and the report is marked so and not signed).
fn seal(
    report: &report::Report,
    chain: &ChainRange,
    head: Option<ChainHash>,
    format: Format,
    key: Option<&SigningKey>,
) -> Result<Rendered, ReviewError> {
    let body = match format {
        Format::Markdown => render::markdown_body(report, chain),
        Format::Csv => render::csv_body(report, chain),
        Format::Json => render::json_body(report, chain)?,
        Format::Html => html::html_body(report, chain),
    };
    let signature = match head {
        Some(head) => Some(sign(&body, &head, key)?),
        None => None,
    };
    let text = match format {
        Format::Markdown => format!("{body}{}", render::markdown_signature(signature.as_ref())),
        Format::Csv => format!("{body}{}", render::csv_signature(signature.as_ref())),
        Format::Html => format!("{body}{}", html::html_signature(signature.as_ref())),
        // The body is the `report` member's exact bytes, so a verifier can cut them out.
        Format::Json => format!(
            "{{\"report\":{body},\"signature\":{}}}\n",
            serde_json::to_string(&signature)?
        ),
    };
    Ok(Rendered {
        text,
        verified: signature.is_some(),
    })
}

/// A fleet's trail made one: every bastion's chain verified on its own (what follows a
/// break is not evidence), the events merged in time order and numbered 1, 2, … (evidence
/// number `n` is `names[n - 1]`, `bastion#seq`), and the fleet's head: a hash over each
/// bastion's name, last seq and head, which a fleet report is sealed to.
pub struct FleetTrail {
    events: Vec<TrailEvent>,
    names: Vec<String>,
    chains: Vec<HostChain>,
    /// Records that are not events, and chains that broke.
    problems: Vec<String>,
    /// Sessions shown renumbered (not a problem with the trail).
    renumbered: Vec<String>,
    head: ChainHash,
}

/// Builds a [`FleetTrail`] from the central store's rows, one bastion after another, each
/// in seq order, keeping the events and not the rows.
pub struct FleetBuilder {
    merged: Vec<(String, TrailEvent)>,
    chains: Vec<HostChain>,
    problems: Vec<String>,
    head_input: Vec<u8>,
    current: Option<(String, crate::audit::central::CentralVerifier)>,
}

impl Default for FleetBuilder {
    fn default() -> Self {
        Self {
            merged: Vec::new(),
            chains: Vec::new(),
            problems: Vec::new(),
            head_input: FLEET_HEAD_DOMAIN.to_vec(),
            current: None,
        }
    }
}

impl FleetBuilder {
    /// The rows that follow are `host`'s.
    pub fn host(&mut self, host: &str) {
        self.end_host();
        self.current = Some((host.to_string(), Default::default()));
    }

    /// The next row of the current bastion. Its event is read from `event_text`, the bytes
    /// the chain verifies, never from the `event` column, which a bastion could make say
    /// something else.
    pub fn row(&mut self, row: &crate::audit::central::CentralRow) {
        let Some((host, verifier)) = &mut self.current else {
            return;
        };
        if verifier.broken() {
            return;
        }
        verifier.accept(row);
        if verifier.broken() {
            return;
        }
        match serde_json::from_str::<TrailEvent>(&row.event_text) {
            Ok(mut e) => {
                e.seq = row.seq;
                self.merged.push((host.clone(), e));
            }
            Err(e) => self
                .problems
                .push(format!("{host} record {} is not an event: {e}", row.seq)),
        }
    }

    fn end_host(&mut self) {
        let Some((host, verifier)) = self.current.take() else {
            return;
        };
        let head = verifier.head();
        let verdict = verifier.finish();
        let broken = verdict
            .first_break
            .as_ref()
            .map(|b| format!("seq {}: {}", b.seq, b.reason));
        if let Some(b) = &broken {
            self.problems
                .push(format!("{host}: reading stopped at a bad record: {b}"));
        }
        let len = u32::try_from(host.len()).unwrap_or(u32::MAX);
        self.head_input.extend_from_slice(&len.to_be_bytes());
        self.head_input.extend_from_slice(host.as_bytes());
        self.head_input
            .extend_from_slice(&verdict.last_seq.unwrap_or(0).to_be_bytes());
        self.head_input
            .extend_from_slice(&head.map_or([0; 32], |h| h.0));
        self.chains.push(HostChain {
            host,
            first_seq: verdict.first_seq,
            last_seq: verdict.last_seq,
            head_hash: head.map(|h| h.to_hex()),
            verified: broken.is_none(),
            broken,
        });
    }

    pub fn finish(mut self) -> FleetTrail {
        self.end_host();
        let mut merged = std::mem::take(&mut self.merged);
        merged.sort_by(|(ha, a), (hb, b)| {
            (a.time_ms, ha.as_str(), a.seq).cmp(&(b.time_ms, hb.as_str(), b.seq))
        });
        // Session ids are each bastion's own; two bastions whose agents started in the same
        // second can share one. The later bastion's is shown renumbered, and the report says so.
        let mut owner: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
        let mut renamed: std::collections::HashMap<(String, u64), u64> =
            std::collections::HashMap::new();
        let mut renumbered = Vec::new();
        let mut next_free = u64::MAX / 2;
        let mut names = Vec::with_capacity(merged.len());
        let mut events = Vec::with_capacity(merged.len());
        for (n, (host, mut e)) in merged.into_iter().enumerate() {
            names.push(format!("{host}#{}", e.seq));
            e.seq = u64::try_from(n).unwrap_or(u64::MAX).saturating_add(1);
            if let Some(id) = e.connection_id {
                let first = owner.entry(id).or_insert_with(|| host.clone());
                if *first != host {
                    let shown = *renamed.entry((host.clone(), id)).or_insert_with(|| {
                        next_free = next_free.saturating_add(1);
                        renumbered.push(format!(
                            "session {id} of {host} is shown as session {next_free}: {first} has a session with the same id"
                        ));
                        next_free
                    });
                    e.connection_id = Some(shown);
                }
            }
            events.push(e);
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.head_input);
        let mut head = [0u8; 32];
        head.copy_from_slice(digest.as_ref());
        FleetTrail {
            events,
            names,
            chains: self.chains,
            problems: self.problems,
            renumbered,
            head: ChainHash(head),
        }
    }
}

/// Reads every bastion's rows from the central store into a [`FleetTrail`].
pub async fn read_fleet(
    trail: &crate::audit::central_read::CentralTrail,
) -> Result<FleetTrail, ReviewError> {
    let central = |e: tokio_postgres::Error| ReviewError::Central(crate::audit::with_sources(&e));
    let mut builder = FleetBuilder::default();
    for h in trail.hosts().await.map_err(central)? {
        builder.host(&h.host);
        trail
            .for_each_host_row(&h.host, |row| builder.row(&row))
            .await
            .map_err(central)?;
    }
    Ok(builder.finish())
}

/// Put before the bastions' heads in the fleet's head, so it can never equal a record's hash.
const FLEET_HEAD_DOMAIN: &[u8] = b"portcullis-fleet-head-v1\0";

/// A fleet's review from the central store: one report over every bastion's events, each
/// figure's evidence named `bastion#seq`, sealed to the fleet's head when every chain
/// verified and every record is an event.
pub fn run_fleet(
    trail: FleetTrail,
    policy: &PolicyView<'_>,
    options: &Options<'_>,
    key: Option<&SigningKey>,
) -> Result<Rendered, ReviewError> {
    let mut report = report::compute(&trail.events, &options.inputs(policy));
    report.notes.extend(trail.problems.iter().cloned());
    report.notes.extend(trail.renumbered.iter().cloned());
    report.evidence_names = Some(std::sync::Arc::new(trail.names));
    let verified = !trail.chains.is_empty() && trail.problems.is_empty();
    let broken = match trail.problems.first() {
        Some(p) => Some(p.clone()),
        None if trail.chains.is_empty() => Some("the central store holds no records".to_string()),
        None => None,
    };
    let chain = ChainRange {
        dir: "the central audit store".to_string(),
        first_seq: None,
        last_seq: None,
        segments: 0,
        first_segment: None,
        last_segment: None,
        head_hash: Some(trail.head.to_hex()),
        verified,
        broken,
        seals_signature_checked: false,
        hosts: trail.chains,
    };
    seal(
        &report,
        &chain,
        verified.then_some(trail.head),
        options.format,
        key,
    )
}

/// `--from`/`--to` dates (`2026-10-01`, UTC) as a period: `to` is included whole.
pub fn period(from: &str, to: &str) -> Result<Period, String> {
    let day = |s: &str| {
        chrono::NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d")
            .map_err(|_| format!("`{s}` is not a date: use YYYY-MM-DD (UTC)"))
            .and_then(|d| {
                let ms = d
                    .and_hms_opt(0, 0, 0)
                    .map(|t| t.and_utc().timestamp_millis())
                    .unwrap_or(0);
                u64::try_from(ms).map_err(|_| format!("`{s}` is before 1970"))
            })
    };
    let from_ms = day(from)?;
    let to_ms = day(to)?.saturating_add(86_400_000);
    if to_ms <= from_ms {
        return Err(format!("--to {to} is before --from {from}"));
    }
    Ok(Period { from_ms, to_ms })
}
