//! Masking throughput: MB/s of result values through `Masker::mask_value`, for a column that
//! no rule selects (the common case), a whole-column mask, and the five content detectors over
//! realistic text (one value in ten holds a card number or an email).
//!
//! `cargo bench -p portcullis-policy --bench mask` (also run by `cargo xtask bench postgres`).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a benchmark fails loudly"
)]

use std::hint::black_box;
use std::time::{Duration, Instant};

use portcullis_policy::{ColumnPlan, Masker, PolicySet};

const MASKING: &str = r#"
[profiles.columns]
[[profiles.columns.rules]]
column = "card"
mask = "partial"
keep_last = 4

[profiles.detectors]
[[profiles.detectors.rules]]
detector = "card_number"
mask = "partial"
keep_last = 4
[[profiles.detectors.rules]]
detector = "email"
mask = "hash"
[[profiles.detectors.rules]]
detector = "national_id"
mask = "redact"
[[profiles.detectors.rules]]
detector = "iban"
mask = "redact"
[[profiles.detectors.rules]]
detector = "phone"
mask = "redact"
"#;

const POLICY: &str = r#"@id("masked")
@mask("detectors")
permit (principal, action == Portcullis::Action::"query", resource);
"#;

/// Values like a customer table's text columns.
fn values() -> Vec<Vec<u8>> {
    (0..20_000)
        .map(|i| {
            let v = match i % 10 {
                0 => format!("order {i} paid with 4111 1111 1111 1111 on 2026-11-23"),
                1 => format!("contact customer{i}@example.com about invoice {i}"),
                2 => format!("{i}"),
                _ => format!("customer {i} asked about delivery windows and the usual discount for order {i}"),
            };
            v.into_bytes()
        })
        .collect()
}

/// Rounds of every case in turn (no rule, whole column, detectors, no rule, …): each figure
/// is the median of its rounds, so a burst of load on a shared machine moves one round of
/// each case rather than all of one case.
const ROUNDS: usize = 5;
const ROUND_TIME: Duration = Duration::from_millis(400);

struct Case<'a> {
    key: &'static str,
    name: &'static str,
    masker: &'a Masker,
    plan: ColumnPlan,
    mb_per_s: Vec<f64>,
    values_per_s: Vec<f64>,
    changed: f64,
}

/// One round of one case: MB/s and values/s over `ROUND_TIME`, and the share of values changed.
fn measure(masker: &Masker, plan: &ColumnPlan, values: &[Vec<u8>]) -> (f64, f64, f64) {
    let bytes: usize = values.iter().map(Vec::len).sum();
    let started = Instant::now();
    let mut rounds = 0u64;
    let mut masked = 0u64;
    while started.elapsed() < ROUND_TIME {
        for v in values {
            if black_box(masker.mask_value(plan, 0, 25, v))
                .unwrap()
                .is_some()
            {
                masked += 1;
            }
        }
        rounds += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let count = values.len() as f64 * rounds as f64;
    (
        bytes as f64 * rounds as f64 / 1e6 / secs,
        count / secs,
        masked as f64 / count,
    )
}

fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// A row for `cargo xtask bench`'s table (xtask/src/bench_table.rs reads these lines).
fn bench_row(key: &str, name: &str, value: f64, unit: &str, rounds: usize) {
    println!(
        "BENCH-ROW {{\"key\":\"{key}\",\"name\":\"{name}\",\"value\":{value},\"unit\":\"{unit}\",\"rounds\":{rounds}}}"
    );
}

fn main() {
    let set = PolicySet::load(vec![
        ("masked.cedar".to_string(), POLICY.to_string()),
        ("masking.toml".to_string(), MASKING.to_string()),
    ])
    .unwrap();
    let key = [7u8; 32];
    let columns = Masker::new(set.masking_profile("columns").unwrap(), &key);
    let detectors = Masker::new(set.masking_profile("detectors").unwrap(), &key);
    let values = values();
    let mut cases = [
        Case {
            key: "masking.no_rule",
            name: "no rule selects the column",
            masker: &columns,
            plan: columns.plan_column("note", None),
            mb_per_s: Vec::new(),
            values_per_s: Vec::new(),
            changed: 0.0,
        },
        Case {
            key: "masking.whole_column",
            name: "whole column (partial mask)",
            masker: &columns,
            plan: columns.plan_column("card", None),
            mb_per_s: Vec::new(),
            values_per_s: Vec::new(),
            changed: 0.0,
        },
        Case {
            key: "masking.detectors",
            name: "five content detectors",
            masker: &detectors,
            plan: detectors.plan_column("note", None),
            mb_per_s: Vec::new(),
            values_per_s: Vec::new(),
            changed: 0.0,
        },
    ];
    for _ in 0..ROUNDS {
        for case in &mut cases {
            let (mb, per_s, changed) = measure(case.masker, &case.plan, &values);
            case.mb_per_s.push(mb);
            case.values_per_s.push(per_s);
            case.changed = changed;
        }
    }
    println!(
        "| values (median of {ROUNDS} interleaved rounds) | throughput | values | changed |\n|---|---:|---:|---:|"
    );
    for case in &cases {
        println!(
            "| {} | {:.0} MB/s | {:.1} M values/s | {:.0}% of values changed |",
            case.name,
            median(&case.mb_per_s),
            median(&case.values_per_s) / 1e6,
            100.0 * case.changed
        );
    }
    for case in &cases {
        bench_row(case.key, case.name, median(&case.mb_per_s), "MB/s", ROUNDS);
    }
}
