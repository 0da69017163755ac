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

fn measure(name: &str, masker: &Masker, plan: ColumnPlan, values: &[Vec<u8>]) {
    let bytes: usize = values.iter().map(Vec::len).sum();
    let started = Instant::now();
    let mut rounds = 0u64;
    let mut masked = 0u64;
    while started.elapsed() < Duration::from_secs(2) {
        for v in values {
            if black_box(masker.mask_value(&plan, 0, 25, v))
                .unwrap()
                .is_some()
            {
                masked += 1;
            }
        }
        rounds += 1;
    }
    let secs = started.elapsed().as_secs_f64();
    let mb = (bytes as f64 * rounds as f64) / 1e6;
    println!(
        "| {name} | {:.0} MB/s | {:.1} M values/s | {:.0}% of values changed |",
        mb / secs,
        (values.len() as f64 * rounds as f64) / secs / 1e6,
        100.0 * masked as f64 / (values.len() as f64 * rounds as f64)
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
    println!("| values | throughput | values | changed |\n|---|---:|---:|---:|");
    measure(
        "no rule selects the column",
        &columns,
        columns.plan_column("note", None),
        &values,
    );
    measure(
        "whole column (partial mask)",
        &columns,
        columns.plan_column("card", None),
        &values,
    );
    measure(
        "five content detectors",
        &detectors,
        detectors.plan_column("note", None),
        &values,
    );
}
