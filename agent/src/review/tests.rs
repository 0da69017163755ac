//! A quarter's trail with known answers, written by the real store into a temp dir, and the
//! policies of a small bastion: each section of the report must give exactly those answers.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic,
    reason = "a test: a failure is the test failing"
)]

use std::collections::BTreeMap;
use std::path::Path;

use portcullis_audit_store::{SigningKey, Store, StoreOptions};
use serde_json::{json, Value};

use super::fixture::{quarter, user, Trail, APPROVALS, DAY, MASKING, POLICIES, QUARTER_START_MS};
use super::render::{csv_field, Format};
use super::report::{compute, Inputs, Report, TrailEvent};
use super::{period, run, Options, PolicyView};

fn write_store(dir: &Path, trail: &Trail, key: Option<SigningKey>) -> BTreeMap<String, u64> {
    let (mut store, _) = Store::open(
        dir,
        StoreOptions {
            // Several segments, so the report names a range across them.
            max_segment_bytes: 4096,
            signing_key: key,
            ..StoreOptions::default()
        },
    )
    .unwrap();
    // Seqs by a short name, so assertions read as the story above.
    let mut seqs = BTreeMap::new();
    for e in &trail.events {
        let r = store.append(e.to_string().as_bytes()).unwrap();
        let name = format!(
            "{}@{}#{}",
            e["event"].as_str().unwrap(),
            e["connection_id"].as_u64().unwrap_or(0),
            e["statement"]
                .as_str()
                .or(e["request_id"].as_str())
                .unwrap_or("")
        );
        seqs.insert(name, r.seq);
    }
    store.sync().unwrap();
    seqs
}

fn policy_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("review.cedar"), POLICIES).unwrap();
    std::fs::write(d.path().join("masking.toml"), MASKING).unwrap();
    std::fs::write(d.path().join("approvals.toml"), APPROVALS).unwrap();
    d
}

fn targets() -> Vec<portcullis_policy::Target> {
    let t = |name: &str, protocol: &str, env: &str| portcullis_policy::Target {
        name: name.into(),
        protocol: protocol.into(),
        labels: [("environment".to_string(), env.to_string())].into(),
    };
    vec![
        t("prod-db", "postgres", "production"),
        t("staging-db", "postgres", "staging"),
        t("web-1", "ssh", "production"),
    ]
}

fn read_events(dir: &Path) -> Vec<TrailEvent> {
    portcullis_audit_store::Reader::all(dir)
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            TrailEvent::parse(r.seq, &r.event).unwrap()
        })
        .collect()
}

struct World {
    store: tempfile::TempDir,
    policies: portcullis_policy::PolicySet,
    seqs: BTreeMap<String, u64>,
}

fn world(key: Option<SigningKey>) -> World {
    world_of(&quarter(), key)
}

fn world_of(trail: &Trail, key: Option<SigningKey>) -> World {
    let store = tempfile::tempdir().unwrap();
    let seqs = write_store(store.path(), trail, key);
    let pdir = policy_dir();
    let policies = crate::policy::load_dir(pdir.path()).unwrap();
    World {
        store,
        policies,
        seqs,
    }
}

impl World {
    fn seq(&self, name: &str) -> u64 {
        *self
            .seqs
            .get(name)
            .unwrap_or_else(|| panic!("no event {name}: {:?}", self.seqs.keys()))
    }

    fn report(&self, target: Option<&str>) -> Report {
        let targets = targets();
        compute(
            &read_events(self.store.path()),
            &Inputs {
                period: period("2026-10-01", "2026-12-31").unwrap(),
                target,
                policies: Some(&self.policies),
                targets: &targets,
                stale_days: 30,
            },
        )
    }

    fn run(&self, format: Format, key: Option<&SigningKey>) -> super::Rendered {
        let targets = targets();
        run(
            self.store.path(),
            &PolicyView {
                policies: Some(&self.policies),
                targets: &targets,
            },
            &Options {
                period: period("2026-10-01", "2026-12-31").unwrap(),
                target: None,
                stale_days: 30,
                format,
            },
            key,
        )
        .unwrap()
    }
}

#[test]
fn per_identity_figures_match_the_quarter_with_their_evidence() {
    let w = world(None);
    let r = w.report(None);
    let names: Vec<&str> = r.identities.iter().map(|i| i.identity.as_str()).collect();
    assert_eq!(
        names,
        [
            "service:billing-etl",
            "user:alice@example.com",
            "user:bob@example.com",
            "user:carol@example.com",
            "user:dave@example.com",
            "user:erin@example.com",
            "workload:repo:acme/app:ref:refs/heads/main",
        ]
    );
    let alice = &r.identities[1];
    // The connection before the period is not counted.
    assert_eq!(alice.targets.len(), 1);
    assert_eq!(alice.targets[0].target, "prod-db");
    assert_eq!(alice.targets[0].connections, 2);
    assert_eq!(
        alice.targets[0].evidence,
        [
            w.seq("connection.opened@101#"),
            w.seq("connection.opened@102#")
        ]
    );
    assert_eq!(alice.statement_classes.len(), 1);
    assert_eq!(alice.statement_classes[0].name, "read");
    assert_eq!(alice.statement_classes[0].count, 2);
    assert_eq!(alice.masked_reads.len(), 1);
    assert_eq!(alice.masked_reads[0].name, "pii");
    assert_eq!(
        alice.masked_reads[0].evidence,
        [
            w.seq("statement.executed@101#SELECT * FROM billing.customers"),
            w.seq("statement.executed@101#SELECT * FROM sales.leads")
        ]
    );
    let denials: Vec<(&str, u64)> = alice
        .denials
        .iter()
        .map(|d| (d.name.as_str(), d.count))
        .collect();
    assert_eq!(
        denials,
        [("connection.refused", 1), ("statement.denied", 1)]
    );
    let bob = &r.identities[2];
    assert_eq!(
        bob.approvals_given
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>(),
        ["r-1", "r-2"]
    );
    let dave = &r.identities[4];
    assert_eq!(dave.statement_classes[0].name, "ddl");
    assert_eq!(dave.statement_classes[0].count, 3);
    assert_eq!(dave.approvals_requested.len(), 2);
    assert!(dave
        .approvals_requested
        .iter()
        .all(|a| a.approvers == ["bob"] && a.state == "approved"));
    let erin = &r.identities[5];
    assert_eq!(erin.break_glass.len(), 1);
    assert_eq!(erin.break_glass[0].request_id, "r-3");
    assert_eq!(erin.break_glass[0].approvers, ["erin"]);
    assert_eq!(
        erin.break_glass[0].evidence,
        [
            w.seq("approval.requested@0#r-3"),
            w.seq("approval.break_glass@0#r-3")
        ]
    );
    let ci = &r.identities[6];
    assert_eq!(ci.kind, "workload");
    let ssh: Vec<(&str, u64)> = ci
        .ssh_actions
        .iter()
        .map(|c| (c.name.as_str(), c.count))
        .collect();
    assert_eq!(ssh, [("exec", 1), ("shell", 2)]);
    assert_eq!(ci.recorded_sessions.len(), 1);
    assert_eq!(ci.recorded_sessions[0].session_id, 501);
}

#[test]
fn unmasked_reads_of_masked_tables_are_listed_with_what_protects_them() {
    let w = world(None);
    let r = w.report(None);
    let found: Vec<(u64, &str, &[String])> = r
        .unmasked_reads
        .iter()
        .map(|u| (u.seq, u.identity.as_str(), u.tables.as_slice()))
        .collect();
    assert_eq!(
        found,
        [
            (
                w.seq("statement.executed@201#SELECT name, \"tax_id\"\nFROM billing.customers"),
                "user:carol@example.com",
                &["billing.customers".to_string()][..]
            ),
            (
                w.seq("statement.executed@601#SELECT id FROM sales.leads"),
                "service:billing-etl",
                &["sales.leads".to_string()][..]
            ),
        ]
    );
    // In trail order: Carol's read was written first.
    assert_eq!(
        r.unmasked_reads[0].protected_by,
        [
            "masked for others in the period (profile pii)",
            "profile pii (table_column rule)"
        ]
    );
    assert_eq!(r.unmasked_reads[0].policy_ids, ["compliance-read"]);
    assert_eq!(
        r.unmasked_reads[1].protected_by,
        ["masked for others in the period (profile pii)"]
    );
}

#[test]
fn privileged_actions_without_approval_and_break_glass_are_named() {
    let w = world(None);
    let r = w.report(None);
    let without: Vec<u64> = r
        .privileged
        .without_approval
        .iter()
        .map(|p| p.seq)
        .collect();
    assert_eq!(
        without,
        [w.seq("statement.executed@301#ALTER TABLE billing.invoices ADD COLUMN note text")]
    );
    let approved: Vec<(u64, &[String], bool)> = r
        .privileged
        .approved
        .iter()
        .map(|p| (p.seq, p.approvers.as_slice(), p.break_glass))
        .collect();
    let bob = ["bob".to_string()];
    let erin = ["erin".to_string()];
    assert_eq!(
        approved,
        [
            (
                w.seq("statement.executed@301#CREATE INDEX ON billing.invoices (due)"),
                &bob[..],
                false
            ),
            (
                w.seq("statement.executed@301#DROP INDEX billing.invoices_due_idx"),
                &bob[..],
                false
            ),
            (w.seq("connection.opened@401#"), &erin[..], true),
        ]
    );
}

#[test]
fn sessions_say_which_replay_and_why_the_others_do_not() {
    let w = world(None);
    let r = w.report(None);
    let sessions: Vec<(u64, bool, &str)> = r
        .sessions
        .iter()
        .map(|s| (s.session_id, s.replayable, s.why.as_str()))
        .collect();
    assert_eq!(
        sessions,
        [
            (501, true, ""),
            (502, false, "disk full; recording_failure = continue"),
            (503, false, "not recorded: no recording event"),
        ]
    );
    assert_eq!(
        r.sessions[0].evidence,
        [
            w.seq("recording.chunk@501#"),
            w.seq("recording.closed@501#")
        ]
    );
    assert!(r
        .sessions
        .iter()
        .all(|s| s.identity == "workload:repo:acme/app:ref:refs/heads/main"));
}

#[test]
fn production_reach_comes_from_the_current_policies_for_identities_seen() {
    let w = world(None);
    let r = w.report(None);
    assert_eq!(r.production.production_targets, ["prod-db", "web-1"]);
    let reach: Vec<(&str, &str, &str)> = r
        .production
        .reach
        .iter()
        .map(|x| (x.identity.as_str(), x.target.as_str(), x.decision.as_str()))
        .collect();
    assert_eq!(
        reach,
        [
            ("service:billing-etl", "prod-db", "allow"),
            ("user:alice@example.com", "prod-db", "allow"),
            ("user:carol@example.com", "prod-db", "allow"),
            ("user:dave@example.com", "prod-db", "allow"),
            (
                "workload:repo:acme/app:ref:refs/heads/main",
                "web-1",
                "allow"
            ),
        ]
    );
    assert_eq!(r.production.reach[1].policy_ids, ["analysts-connect"]);
    assert!(r.production.limitation.contains("never seen"));
}

#[test]
fn least_privilege_findings_match_the_quarter() {
    let w = world(None);
    let r = w.report(None);
    assert_eq!(r.findings.unused_permits, ["contractors-staging"]);
    let unused: Vec<(&str, &str)> = r
        .findings
        .unused_access
        .iter()
        .map(|x| (x.identity.as_str(), x.target.as_str()))
        .collect();
    assert_eq!(
        unused,
        [
            ("service:billing-etl", "staging-db"),
            ("user:alice@example.com", "staging-db"),
            ("user:carol@example.com", "staging-db"),
            ("user:dave@example.com", "staging-db"),
        ]
    );
    let stale: Vec<&str> = r
        .findings
        .stale_services
        .iter()
        .map(|s| s.identity.as_str())
        .collect();
    assert_eq!(stale, ["service:billing-etl"]);
    assert_eq!(
        r.findings.stale_services[0].evidence,
        [w.seq("statement.executed@601#SELECT id FROM sales.leads")]
    );
    assert_eq!(r.findings.single_approver.len(), 1);
    let s = &r.findings.single_approver[0];
    assert_eq!(
        (s.requester.as_str(), s.approver.as_str()),
        ("user:dave@example.com", "bob")
    );
    assert_eq!(s.requests, ["r-1", "r-2"]);
}

#[test]
fn target_filter_keeps_only_that_targets_events() {
    let w = world(None);
    let r = w.report(Some("web-1"));
    let names: Vec<&str> = r.identities.iter().map(|i| i.identity.as_str()).collect();
    // Alice's refusal names web-1; the CI workload used it.
    assert_eq!(
        names,
        [
            "user:alice@example.com",
            "workload:repo:acme/app:ref:refs/heads/main"
        ]
    );
    assert_eq!(r.sessions.len(), 3);
    assert!(r.unmasked_reads.is_empty());
    // Recording events name no target: they follow their connection's.
    assert_eq!(r.identities[1].recorded_sessions.len(), 1);
}

/// A strict RFC 4180 reader: quoted fields may hold commas, doubled quotes and line breaks;
/// records end in CRLF.
fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => quoted = false,
                c => field.push(c),
            }
            continue;
        }
        match c {
            '"' => {
                assert!(
                    field.is_empty(),
                    "a quote inside an unquoted field: {field}"
                );
                quoted = true;
            }
            ',' => row.push(std::mem::take(&mut field)),
            '\r' => {
                assert_eq!(chars.next(), Some('\n'), "CR without LF");
                row.push(std::mem::take(&mut field));
                rows.push(std::mem::take(&mut row));
            }
            '\n' => panic!("a bare LF ends a record"),
            c => field.push(c),
        }
    }
    assert!(!quoted, "unterminated quoted field");
    assert!(field.is_empty() && row.is_empty(), "no CRLF at the end");
    rows
}

#[test]
fn csv_is_rfc_4180_with_commas_quotes_and_line_breaks_kept() {
    assert_eq!(csv_field("a,b"), "\"a,b\"");
    assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    assert_eq!(csv_field("plain"), "plain");
    // What a spreadsheet would run as a formula is text; a lone "-" (no value) stays.
    assert_eq!(
        csv_field("=HYPERLINK(\"http://x\",\"y\")"),
        "\"'=HYPERLINK(\"\"http://x\"\",\"\"y\"\")\""
    );
    assert_eq!(csv_field("@SUM(A1)"), "'@SUM(A1)");
    assert_eq!(csv_field("+1"), "'+1");
    assert_eq!(csv_field("-2+3"), "'-2+3");
    assert_eq!(csv_field("-"), "-");
    let w = world(None);
    let out = w.run(Format::Csv, None);
    assert!(out.verified);
    let rows = parse_csv(&out.text);
    assert!(rows.iter().all(|r| r.len() == 7), "ragged rows: {rows:?}");
    assert_eq!(rows[0][0], "section");
    let carol = rows
        .iter()
        .find(|r| r[0] == "unmasked_reads" && r[1] == "user:carol@example.com")
        .expect("carol's unmasked read");
    assert!(
        carol[5].contains("SELECT name, \"tax_id\"\nFROM billing.customers"),
        "{carol:?}"
    );
    assert_eq!(
        carol[6],
        w.seq("statement.executed@201#SELECT name, \"tax_id\"\nFROM billing.customers")
            .to_string()
    );
    assert_eq!(rows.last().unwrap()[0], "signature");
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}

fn head(dir: &Path) -> portcullis_audit_store::ChainHash {
    portcullis_audit_store::Reader::all(dir)
        .unwrap()
        .last()
        .unwrap()
        .unwrap()
        .hash
}

#[test]
fn without_a_key_the_report_carries_a_digest_of_its_body_and_the_chain_head() {
    let w = world(None);
    let out = w.run(Format::Markdown, None);
    assert!(out.verified);
    let (body, signature) = out
        .text
        .split_once(super::render::MARKDOWN_SIGNATURE_HEADING)
        .unwrap();
    assert!(body.contains("verified intact"), "{body}");
    assert!(!body.contains("UNVERIFIED"));
    let digest = sha256_hex(&super::signed_message(body, &head(w.store.path())));
    assert!(
        signature.contains(&format!("SHA-256 of the signed message: {digest}")),
        "{signature}"
    );
    assert!(signature.contains("no audit.signing_key_file"));
    // The range read names the segments.
    let last = w.seqs.values().max().unwrap();
    assert!(body.contains(&format!("seq 1..{last} in ")), "{body}");
    assert!(body.contains("segment-00000000000000000001.jsonl to segment-"));
}

#[test]
fn with_the_audit_key_the_report_is_signed_and_the_signature_verifies() {
    let key = SigningKey::from_bytes(&[7; 32]);
    let w = world(Some(key.clone()));
    let out = w.run(Format::Json, Some(&key));
    assert!(out.verified);
    let value: Value = serde_json::from_str(&out.text).unwrap();
    // The signed body is the `report` member exactly as printed.
    let body = out
        .text
        .strip_prefix("{\"report\":")
        .unwrap()
        .split_once(",\"signature\":")
        .unwrap()
        .0;
    let sig = &value["signature"];
    assert_eq!(sig["method"], "ed25519");
    assert_eq!(
        sig["public_key"],
        hex::encode(key.verifying_key().to_bytes())
    );
    let msg = super::signed_message(body, &head(w.store.path()));
    let public = ring::signature::UnparsedPublicKey::new(
        &ring::signature::ED25519,
        key.verifying_key().to_bytes(),
    );
    let signature = hex::decode(sig["signature"].as_str().unwrap()).unwrap();
    public.verify(&msg, &signature).unwrap();
    // One byte of the body changed no longer verifies.
    let forged = super::signed_message(&body.replace("dave", "dawe"), &head(w.store.path()));
    assert!(public.verify(&forged, &signature).is_err());
    assert_eq!(value["report"]["chain"]["verified"], true);
    assert_eq!(value["report"]["chain"]["seals_signature_checked"], true);
    // JSON lists every seq of a figure.
    assert_eq!(
        value["report"]["review"]["findings"]["unused_permits"],
        json!(["contractors-staging"])
    );
}

#[test]
fn a_tampered_segment_makes_the_report_unverified_and_unsigned() {
    let w = world(None);
    let segment = std::fs::read_dir(w.store.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("segment-"))
        .min()
        .unwrap();
    let text = std::fs::read_to_string(&segment).unwrap();
    assert!(text.contains("\"rows\":3"));
    std::fs::write(&segment, text.replacen("\"rows\":3", "\"rows\":1", 1)).unwrap();
    for format in [Format::Markdown, Format::Csv, Format::Html] {
        let out = w.run(format, None);
        assert!(!out.verified, "{format:?}");
        assert!(out.text.contains("UNVERIFIED"), "{format:?}: {}", out.text);
        assert!(out.text.contains("BROKEN"), "{format:?}");
        assert!(out.text.contains("RecordAltered"), "{format:?}");
        assert!(!out.text.contains("SHA-256 of the signed message"));
    }
    let out = w.run(Format::Json, None);
    assert!(!out.verified);
    let json: Value = serde_json::from_str(&out.text).unwrap();
    assert_eq!(json["signature"], Value::Null);
    assert_eq!(json["report"]["chain"]["verified"], false);
    assert!(json["report"]["chain"]["broken"]
        .as_str()
        .unwrap()
        .contains("RecordAltered"));
    // HTML says so first, as an alert above the seal and every figure.
    let html = w.run(Format::Html, None).text;
    let alert = html
        .find("role=\"alert\">UNVERIFIED")
        .expect("an UNVERIFIED alert");
    assert!(alert < html.find("id=\"seal\"").unwrap(), "{html}");
}

#[test]
fn period_takes_whole_utc_days_and_refuses_a_reversed_one() {
    let p = period("2026-10-01", "2026-12-31").unwrap();
    assert_eq!(p.from_ms, 1_790_812_800_000);
    assert_eq!(p.from_ms, QUARTER_START_MS);
    assert_eq!(p.to_ms, 1_798_761_600_000);
    assert!(period("2026-12-31", "2026-10-01").is_err());
    assert!(period("2026-13-01", "2026-12-31")
        .unwrap_err()
        .contains("YYYY-MM-DD"));
}

/// The quarter above, repeated with its people, connections and requests renamed per round
/// (500 analysts and so on), until the trail holds `count` events.
fn big_trail(count: usize) -> Vec<Vec<u8>> {
    let template = quarter().events;
    let mut out = Vec::with_capacity(count);
    let mut round = 0u64;
    while out.len() < count {
        let k = round % 500;
        for e in &template {
            let mut e = e.clone();
            if let Some(id) = e["connection_id"].as_u64() {
                e["connection_id"] = json!(id + round * 1000);
            }
            for key in ["subject", "email", "name"] {
                if let Some(v) = e["identity"][key].as_str() {
                    e["identity"][key] = json!(format!("{k}.{v}"));
                }
            }
            for key in ["request_id", "grant_id"] {
                if let Some(v) = e[key].as_str() {
                    e[key] = json!(format!("{v}-{round}"));
                }
            }
            if let Some(ids) = e["policy_ids"].as_array() {
                let ids: Vec<Value> = ids
                    .iter()
                    .map(|id| match id.as_str() {
                        Some(s) if s.contains(':') => json!(format!("{s}-{round}")),
                        _ => id.clone(),
                    })
                    .collect();
                e["policy_ids"] = json!(ids);
            }
            out.push(e.to_string().into_bytes());
            if out.len() == count {
                break;
            }
        }
        round += 1;
    }
    out
}

/// `cargo xtask bench review`: a report over a million events, timed (run in release).
#[test]
#[ignore = "a benchmark: cargo xtask bench review"]
fn bench_report_over_a_million_events() {
    let count: usize = std::env::var("PORTCULLIS_REVIEW_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let store = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    {
        let (mut s, _) = Store::open(store.path(), StoreOptions::default()).unwrap();
        let events = big_trail(count);
        for chunk in events.chunks(10_000) {
            let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
            s.append_batch_buffered(&refs).unwrap();
        }
        s.sync().unwrap();
    }
    eprintln!(
        "wrote {count} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let w = World {
        store,
        policies: crate::policy::load_dir(policy_dir().path()).unwrap(),
        seqs: BTreeMap::new(),
    };
    let phase = std::time::Instant::now();
    assert!(portcullis_audit_store::verify(w.store.path(), None).ok);
    let verify_s = phase.elapsed().as_secs_f64();
    let phase = std::time::Instant::now();
    let events = read_events(w.store.path());
    let read_s = phase.elapsed().as_secs_f64();
    let phase = std::time::Instant::now();
    let targets = targets();
    let report = compute(
        &events,
        &Inputs {
            period: period("2026-10-01", "2026-12-31").unwrap(),
            target: None,
            policies: Some(&w.policies),
            targets: &targets,
            stale_days: 30,
        },
    );
    println!(
        "phases: verify {verify_s:.2} s, read and parse {read_s:.2} s, compute {:.2} s ({} identities)",
        phase.elapsed().as_secs_f64(),
        report.identities.len()
    );
    drop(events);
    for format in [Format::Markdown, Format::Csv, Format::Json] {
        let started = std::time::Instant::now();
        let out = w.run(format, None);
        let took = started.elapsed().as_secs_f64();
        assert!(out.verified);
        println!(
            "review report over {count} events ({format:?}): {took:.2} s, {} KiB, {:.0} events/s",
            out.text.len() / 1024,
            count as f64 / took
        );
    }
}

/// What the agent itself writes (its `AuditEvent`s through its `AuditLog`), not JSON written
/// by hand: a field renamed in the schema must fail here, not leave a section silently empty.
#[test]
fn the_report_reads_the_events_the_agent_writes() {
    use portcullis_core::{
        ApprovalFields, AuditEvent, Decision, EventKind, Identity, IdentityKind,
    };
    use std::sync::Arc;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("audit");
    let time = period("2026-10-01", "2026-12-31").unwrap().from_ms + DAY;
    let identity = Identity {
        kind: IdentityKind::User,
        uid: 1001,
        gid: 1001,
        user: Some("alice".into()),
        subject: Some("alice".into()),
        email: Some("alice@example.com".into()),
        name: None,
        groups: vec!["analysts".into()],
        issuer: None,
    };
    let event = |kind: EventKind| {
        let mut e = AuditEvent::new(kind);
        e.time_ms = time;
        e.connection_id = Some(7);
        e.target = Some("prod-db".into());
        e.identity = Some(identity.clone().into());
        e.decision = Some(Decision::Allow);
        e
    };
    let mut opened = event(EventKind::ConnectionOpened);
    opened.policy_ids = Arc::from(vec!["analysts-connect".to_string()]);
    let mut read = event(EventKind::StatementExecuted);
    read.policy_ids = Arc::from(vec!["analysts-read".to_string()]);
    read.statement = Some(Box::new(crate::audit::StatementFields {
        statement: "SELECT * FROM billing.customers".into(),
        statement_class: Some("read"),
        tables: Arc::from(vec!["billing.customers".to_string()]),
        masking_profile: Some("pii".into()),
        ..Default::default()
    }));
    let mut glass = event(EventKind::ApprovalBreakGlass);
    glass.approval = Some(Box::new(ApprovalFields {
        request_id: "r-9".into(),
        grant_id: Some("g-9".into()),
        requester: "alice@example.com".into(),
        approvers: vec!["alice".into()],
        required: "1 approval from group `dba-leads`".into(),
        approval_state: "approved",
        asked: "grant",
        break_glass: true,
        ..Default::default()
    }));
    let mut closed = AuditEvent::new(EventKind::RecordingClosed);
    closed.time_ms = time;
    closed.connection_id = Some(7);
    closed.recording = Some(Box::new(portcullis_core::event::RecordingFields::default()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (log, _) = crate::audit::AuditLog::open(&Default::default(), &dir, Vec::new()).unwrap();
        for e in [&opened, &read, &glass, &closed] {
            log.record_durable(e).await.unwrap();
        }
        log.flush();
    });
    let r = compute(
        &read_events(&dir),
        &Inputs {
            period: period("2026-10-01", "2026-12-31").unwrap(),
            target: None,
            policies: None,
            targets: &[],
            stale_days: 30,
        },
    );
    assert_eq!(r.identities.len(), 1, "{:?}", r.identities);
    let alice = &r.identities[0];
    assert_eq!(alice.identity, "user:alice@example.com");
    assert_eq!(alice.targets[0].connections, 1);
    assert_eq!(alice.statement_classes[0].name, "read");
    assert_eq!(alice.masked_reads[0].name, "pii");
    assert_eq!(alice.break_glass.len(), 1);
    assert_eq!(alice.break_glass[0].grant_id.as_deref(), Some("g-9"));
    assert_eq!(alice.recorded_sessions[0].session_id, 7);
    assert_eq!(r.sessions.len(), 1);
    assert!(r.sessions[0].replayable);
}

/// The agent may append while a review runs: what is read stops at the last seq `verify`
/// checked, so no record after it is counted (or sealed) as verified.
#[test]
fn reading_stops_at_the_last_verified_seq() {
    let w = world(None);
    let verified_upto = 10;
    let trail = super::read_trail(w.store.path(), Some(verified_upto)).unwrap();
    assert_eq!(trail.head.map(|(seq, _)| seq), Some(verified_upto));
    assert_eq!(trail.events.len(), 10);
    assert!(trail.events.iter().all(|e| e.seq <= verified_upto));
    let all = super::read_trail(w.store.path(), None).unwrap();
    assert_eq!(all.head.map(|(seq, _)| seq), w.seqs.values().max().copied());
}

#[test]
fn groups_granted_by_policy_with_no_member_seen_are_named_with_their_rules() {
    // The quarter: every group a permit or approver rule names was carried by someone in
    // the period, except the contractors'.
    let w = world(None);
    let found: Vec<(String, Vec<String>)> = w
        .report(None)
        .findings
        .groups_without_members_seen
        .into_iter()
        .map(|g| (g.group, g.named_by))
        .collect();
    assert_eq!(
        found,
        [(
            "contractors".to_string(),
            vec!["contractors-staging (permit)".to_string()]
        )]
    );
    let md = w.run(Format::Markdown, None).text;
    assert!(
        md.contains(
            "| group contractors | 0 | no member seen in the period; named by contractors-staging (permit) |"
        ),
        "{md}"
    );

    // One rule shape per group: a group in a condition counts like one in the scope, a
    // forbid grants nothing, a member seen only before or after the period does not count,
    // any event of the period (an approval too) shows a member, approver groups count.
    let policies = r#"
@id("ops-connect")
permit (principal in Portcullis::Group::"ops", action == Portcullis::Action::"connect", resource)
when { principal in Portcullis::Group::"audit" || principal in Portcullis::Group::"ops" };

@id("no-interns")
forbid (principal in Portcullis::Group::"interns", action, resource);

@id("ops-ddl")
@approvals("leads:1,security:1")
permit (principal in Portcullis::Group::"ops", action == Portcullis::Action::"query", resource)
when { context.statement_class == "ddl" };

@id("retired")
permit (principal in Portcullis::Group::"retired", action == Portcullis::Action::"connect", resource);
"#;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("p.cedar"), policies).unwrap();
    let set = crate::policy::load_dir(dir.path()).unwrap();
    let mut t = Trail::new();
    t.at(
        -3,
        0,
        "connection.opened",
        json!({"connection_id": 1, "target": "db", "identity": user("old", 2001, &["retired"])}),
    );
    t.at(
        5,
        0,
        "connection.opened",
        json!({"connection_id": 2, "target": "db", "identity": user("olga", 2002, &["ops", "interns"])}),
    );
    t.at(
        6,
        0,
        "approval.approved",
        json!({"request_id": "r-1", "identity": user("lee", 2003, &["leads"]), "approvers": ["lee"]}),
    );
    t.at(
        95,
        0,
        "connection.opened",
        json!({"connection_id": 3, "target": "db", "identity": user("sam", 2004, &["security", "audit"])}),
    );
    let events: Vec<TrailEvent> = t
        .events
        .iter()
        .enumerate()
        .map(|(i, e)| TrailEvent::parse(i as u64 + 1, &e.to_string()).unwrap())
        .collect();
    let r = compute(
        &events,
        &Inputs {
            period: period("2026-10-01", "2026-12-31").unwrap(),
            target: None,
            policies: Some(&set),
            targets: &[],
            stale_days: 30,
        },
    );
    let found: Vec<(&str, Vec<&str>)> = r
        .findings
        .groups_without_members_seen
        .iter()
        .map(|g| {
            (
                g.group.as_str(),
                g.named_by.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            ("audit", vec!["ops-connect (permit)"]),
            ("retired", vec!["retired (permit)"]),
            ("security", vec!["ops-ddl (approver)"]),
        ]
    );
}

/// Hostile text in the fields a client or a token controls: an identity and a statement
/// with markup, quotes, `&`, a bidi override and the signature marker itself.
fn hostile_world() -> World {
    let mut t = quarter();
    let mallory = json!({"kind": "user", "uid": 1666, "gid": 1666,
        "subject": "mallory", "email": "<script>alert('x')</script>\"&amp;@evil.example",
        "groups": ["analysts"]});
    t.at(
        30,
        0,
        "connection.opened",
        json!({"connection_id": 666, "target": "prod-db", "identity": mallory,
        "decision": "allow", "policy_ids": ["compliance-connect"]}),
    );
    t.at(
        30,
        1,
        "statement.executed",
        json!({"connection_id": 666, "target": "prod-db", "identity": mallory,
        "decision": "allow", "policy_ids": ["compliance-read"],
        "statement": "SELECT '</td><img src=x onerror=alert(1)>' AS \"a&b\", \u{202e}gnp.exe <section id=\"signature\"> FROM billing.customers",
        "statement_class": "read", "tables": ["billing.customers"]}),
    );
    world_of(&t, None)
}

#[test]
fn markdown_and_csv_show_a_hostile_statement_as_what_it_holds() {
    let w = hostile_world();
    let md = w.run(Format::Markdown, None).text;
    assert!(
        !md.contains('\u{202e}'),
        "a bidi override reached the Markdown: {md}"
    );
    assert!(md.contains("[U+202E]gnp.exe"), "{md}");
    let csv = w.run(Format::Csv, None).text;
    for row in parse_csv(&csv) {
        for cell in row {
            assert!(
                !cell.starts_with(['=', '+', '@']),
                "a cell a spreadsheet would run: {cell:?}"
            );
        }
    }
}

#[test]
fn html_escapes_hostile_identities_and_statements() {
    use super::html::{escape, HTML_SIGNATURE_START};
    assert_eq!(
        escape("<a href='x'>\"&\"</a>"),
        "&lt;a href=&#39;x&#39;&gt;&quot;&amp;&quot;&lt;/a&gt;"
    );
    assert_eq!(
        escape("a\u{202E}b\u{0}c\u{1b}[0m"),
        "a[U+202E]b[U+0000]c[U+001B][0m"
    );
    assert_eq!(escape("SELECT 1\nFROM t"), "SELECT 1\nFROM t");

    let w = hostile_world();
    let out = w.run(Format::Html, None);
    assert!(out.verified);
    let html = &out.text;
    // The only markup is the renderer's: no script or image from the values (their handler
    // attribute stays inert text).
    for forbidden in ["<script", "<img", "\u{202e}"] {
        assert!(!html.contains(forbidden), "{forbidden} in {html}");
    }
    assert!(html.contains(
        "user:&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;&quot;&amp;amp;@evil.example"
    ));
    assert!(html.contains(
        "SELECT &#39;&lt;/td&gt;&lt;img src=x onerror=alert(1)&gt;&#39; AS &quot;a&amp;b&quot;, \
         [U+202E]gnp.exe &lt;section id=&quot;signature&quot;&gt; FROM billing.customers"
    ));
    // The statement's fake marker is escaped: the signed body ends at the real one only.
    assert_eq!(html.matches(HTML_SIGNATURE_START).count(), 1);
    let (body, signature) = html.split_once(HTML_SIGNATURE_START).unwrap();
    let digest = sha256_hex(&super::signed_message(body, &head(w.store.path())));
    assert!(
        signature.contains(&format!("<code>{digest}</code>")),
        "{signature}"
    );
}

#[test]
fn html_has_every_section_the_seal_first_and_nothing_to_fetch_or_run() {
    let w = world(None);
    let out = w.run(Format::Html, None);
    assert!(out.verified);
    let html = &out.text;
    assert!(html.starts_with("<!DOCTYPE html>\n<html lang=\"en\">"));
    assert!(html.contains(
        "<title>Access review 2026-10-01 to 2026-12-31 (UTC, both days included)</title>"
    ));
    assert!(html.ends_with("</section>\n</main>\n</body>\n</html>\n"));
    // Self-contained: no script, nothing loaded, and a policy that forbids both anyway.
    for forbidden in [
        "<script", "<link", "<img", "<iframe", "<object", "<embed", "src=", "url(", "@import",
        "http:", "https:", "//",
    ] {
        assert!(!html.contains(forbidden), "{forbidden} in the report");
    }
    assert!(html.contains("Content-Security-Policy\" content=\"default-src 'none';"));
    // The seal first, then the sections in the Markdown's order, each with its anchor.
    let mut at = html.find("<section id=\"seal\"").unwrap();
    assert!(html[at..].contains("verified intact"));
    let keys = super::render::SECTIONS.map(|s| s.key);
    for key in keys.iter().chain(&["signature"]) {
        let next = html
            .find(&format!("<section id=\"{key}\""))
            .unwrap_or_else(|| panic!("no section {key}"));
        assert!(next > at, "{key} out of order");
        at = next;
        assert!(html.contains(&format!("<h2 id=\"{key}-title\">")), "{key}");
    }
    // Headings in order: one h1, then h2s only.
    assert_eq!(html.matches("<h1>").count(), 1);
    assert!(!html.contains("<h3") && !html.contains("<h4"));
    // Every column header has its scope.
    assert_eq!(
        html.matches("<th ").count(),
        html.matches("<th scope=\"col\">").count()
    );
    // A known figure with its evidence: Alice's two connections.
    let alice = format!(
        "<td>user:alice@example.com</td><td>prod-db</td><td>connections</td><td>2</td>\
         <td>first 2026-10-03T00:00:00Z, last 2026-11-10T00:00:00Z</td><td class=\"evidence\">{} {}</td></tr>",
        w.seq("connection.opened@101#"),
        w.seq("connection.opened@102#")
    );
    assert!(html.contains(&alice), "{html}");
    // The same figures as Markdown: every evidence list of the one is in the other.
    let md = w.run(Format::Markdown, None).text;
    let md_rows = md
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| Identity"))
        .count();
    assert_eq!(html.matches("<tr id=").count(), md_rows);
}

/// The quarter split over two bastions as the central store holds them: connections with an
/// even id (and events of no connection) on bastion-a, odd ones on bastion-b, each bastion's
/// rows a chain of its own.
fn fleet_rows(trail: &Trail) -> Vec<(String, Vec<crate::audit::central::CentralRow>)> {
    let mut hosts: Vec<(String, Vec<crate::audit::central::CentralRow>)> = vec![
        ("bastion-a".into(), Vec::new()),
        ("bastion-b".into(), Vec::new()),
    ];
    for e in &trail.events {
        let i = usize::from(e["connection_id"].as_u64().unwrap_or(0) % 2 == 1);
        let rows = &mut hosts[i].1;
        let prev = rows
            .last()
            .map_or(portcullis_audit_store::ChainHash::GENESIS, |r| {
                portcullis_audit_store::ChainHash(r.hash.clone().try_into().unwrap())
            });
        let seq = rows.len() as u64 + 1;
        let time_ms = e["time_ms"].as_u64().unwrap();
        let text = e.to_string();
        let hash =
            portcullis_audit_store::format::record_hash(&prev, seq, time_ms, text.as_bytes());
        rows.push(crate::audit::central::CentralRow {
            seq,
            time_ms,
            prev: prev.0.to_vec(),
            hash: hash.0.to_vec(),
            event_text: text,
        });
    }
    hosts
}

fn fleet_trail(hosts: &[(String, Vec<crate::audit::central::CentralRow>)]) -> super::FleetTrail {
    let mut builder = super::FleetBuilder::default();
    for (host, rows) in hosts {
        builder.host(host);
        for row in rows {
            builder.row(row);
        }
    }
    builder.finish()
}

fn run_fleet_json(w: &World, trail: super::FleetTrail, key: Option<&SigningKey>) -> (Value, bool) {
    let targets = targets();
    let out = super::run_fleet(
        trail,
        &PolicyView {
            policies: Some(&w.policies),
            targets: &targets,
        },
        &Options {
            period: period("2026-10-01", "2026-12-31").unwrap(),
            target: None,
            stale_days: 30,
            format: Format::Json,
        },
        key,
    )
    .unwrap();
    (serde_json::from_str(&out.text).unwrap(), out.verified)
}

/// The report without its evidence numbers (`evidence`, and the `seq` of a listed event),
/// which are each trail's own.
fn without_evidence(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(k, _)| !matches!(k.as_str(), "evidence" | "seq"))
                .map(|(k, v)| (k.clone(), without_evidence(v)))
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.iter().map(without_evidence).collect()),
        other => other.clone(),
    }
}

#[test]
fn a_fleet_review_gives_the_single_trails_answers_with_evidence_named_by_bastion_and_seq() {
    // In time order, as a fleet's events are merged, so lists come in the same order.
    let mut quarter = quarter();
    quarter.events.sort_by_key(|e| e["time_ms"].as_u64());
    let w = world_of(&quarter, None);
    let one: Value = serde_json::from_str(&w.run(Format::Json, None).text).unwrap();
    let hosts = fleet_rows(&quarter);
    let (fleet, verified) = run_fleet_json(&w, fleet_trail(&hosts), None);
    assert!(verified, "{fleet}");
    // Every figure is the one the same events give on one host.
    assert_eq!(
        without_evidence(&fleet["report"]["review"]),
        without_evidence(&one["report"]["review"])
    );
    // Each cited record is named by its bastion and its seq there, and is that event.
    let records = fleet["report"]["evidence_records"].as_object().unwrap();
    assert!(!records.is_empty());
    for name in records.values() {
        let (host, seq) = name.as_str().unwrap().split_once('#').unwrap();
        let rows = &hosts.iter().find(|(h, _)| h == host).unwrap().1;
        assert!(rows.iter().any(|r| r.seq.to_string() == seq), "{name}");
    }
    // The chain part names both bastions, their heads, and the fleet's head it is sealed to.
    let chain = &fleet["report"]["chain"];
    assert_eq!(chain["hosts"].as_array().unwrap().len(), 2, "{chain}");
    assert_eq!(chain["hosts"][0]["host"], "bastion-a");
    assert_eq!(chain["hosts"][1]["verified"], true);
    assert!(fleet["signature"]["digest"].is_string(), "{fleet}");
}

#[test]
fn a_fleet_review_of_a_tampered_bastion_says_where_and_is_not_signed() {
    let quarter = quarter();
    let w = world_of(&quarter, None);
    let mut hosts = fleet_rows(&quarter);
    let row = &mut hosts[1].1[3];
    row.event_text = row.event_text.replace("\"time_ms\"", "\"time_ms\" ");
    let (fleet, verified) = run_fleet_json(&w, fleet_trail(&hosts), None);
    assert!(!verified);
    assert!(fleet["signature"].is_null(), "{fleet}");
    let chain = &fleet["report"]["chain"];
    assert_eq!(chain["verified"], false);
    assert_eq!(chain["hosts"][0]["verified"], true);
    assert_eq!(chain["hosts"][1]["verified"], false);
    assert!(
        chain["broken"]
            .as_str()
            .unwrap()
            .starts_with("bastion-b: reading stopped at a bad record: seq 4"),
        "{chain}"
    );
}

#[test]
fn two_bastions_sharing_a_session_id_are_told_apart_in_a_fleet_review() {
    let mut t = Trail::new();
    let opened = |time: u64, who: &str, uid: u32| {
        json!({"event": "connection.opened", "time_ms": QUARTER_START_MS + time, "connection_id": 7,
               "protocol": "postgres", "target": "prod-db", "identity": user(who, uid, &["dba"])})
    };
    t.events.push(opened(1_000, "alice", 1001));
    t.events.push(opened(2_000, "bob", 1002));
    // Both sessions have id 7: one on each bastion.
    let mut hosts = Vec::new();
    for (host, e) in [("bastion-a", &t.events[0]), ("bastion-b", &t.events[1])] {
        let text = e.to_string();
        let time_ms = e["time_ms"].as_u64().unwrap();
        let prev = portcullis_audit_store::ChainHash::GENESIS;
        let hash = portcullis_audit_store::format::record_hash(&prev, 1, time_ms, text.as_bytes());
        hosts.push((
            host.to_string(),
            vec![crate::audit::central::CentralRow {
                seq: 1,
                time_ms,
                prev: prev.0.to_vec(),
                hash: hash.0.to_vec(),
                event_text: text,
            }],
        ));
    }
    let w = world(None);
    let (fleet, verified) = run_fleet_json(&w, fleet_trail(&hosts), None);
    assert!(verified, "{fleet}");
    let notes = fleet["report"]["review"]["notes"].to_string();
    assert!(
        notes.contains("session 7 of bastion-b is shown as session")
            && notes.contains("bastion-a has a session with the same id"),
        "{notes}"
    );
}
