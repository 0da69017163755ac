//! Append throughput on a real directory: one fsync per event versus group commit.
//!
//! `cargo bench -p portcullis-audit-store --bench append` runs the full measurement; under
//! `cargo test --all-targets` (no `--bench` argument) it runs a few events as a smoke test.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    reason = "a benchmark fails loudly"
)]

use portcullis_audit_store::{compress_sealed, verify, Store, StoreOptions};
use std::time::Instant;

fn event(i: usize) -> Vec<u8> {
    format!(
        r#"{{"kind":"query","session":"3f9c1a","user":"alice@example.com","target":"db-prod:5432","sql":"SELECT * FROM orders WHERE id = {i}","decision":"allow"}}"#
    )
    .into_bytes()
}

/// Events/s of one round: `total` events appended one by one (`batch` 1) or in batches, to a
/// fresh store, sealed and verified after.
fn run(total: usize, batch: usize) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut store, _) = Store::open(dir.path(), StoreOptions::default()).expect("open");
    let events: Vec<Vec<u8>> = (0..total).map(event).collect();
    let start = Instant::now();
    if batch == 1 {
        for e in &events {
            store.append(e).expect("append");
        }
    } else {
        for chunk in events.chunks(batch) {
            let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
            store.append_batch(&refs).expect("append_batch");
        }
    }
    let secs = start.elapsed().as_secs_f64();
    store.seal_current().expect("seal");
    let report = verify(dir.path(), None);
    assert!(report.ok, "{:?}", report.first_break);
    total as f64 / secs
}

/// Rounds of the three modes in turn: the disk's own noise (other writers, writeback) lands
/// on one round of each, and each figure is the median of its rounds.
const ROUNDS: usize = 5;

fn median(samples: &[f64]) -> f64 {
    let mut s = samples.to_vec();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

/// A row for `cargo xtask bench`'s table (xtask/src/bench_table.rs reads these lines).
fn bench_row(key: &str, name: &str, value: f64, baseline: Option<(f64, &str)>) {
    let against = baseline.map_or(String::new(), |(b, of)| {
        format!(",\"baseline\":{b},\"ratio_of\":\"{of}\"")
    });
    println!(
        "BENCH-ROW {{\"key\":\"{key}\",\"name\":\"{name}\",\"value\":{value},\"unit\":\"events/s\",\"rounds\":{ROUNDS}{against}}}"
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full { ROUNDS } else { 100 * ROUNDS };
    println!("temp dir: {}", std::env::temp_dir().display());
    let modes = [
        ("audit.append_each", "append (fsync each)", 2_000 / scale, 1),
        (
            "audit.append_batch64",
            "append_batch (64 per fsync)",
            64_000 / scale,
            64,
        ),
        (
            "audit.append_batch256",
            "append_batch (256 per fsync)",
            256_000 / scale,
            256,
        ),
    ];
    let mut rates: [Vec<f64>; 3] = Default::default();
    for _ in 0..ROUNDS {
        for ((_, _, total, batch), r) in modes.iter().zip(rates.iter_mut()) {
            r.push(run(*total, *batch));
        }
    }
    let bytes = event(0).len() as f64;
    for ((_, label, total, _), r) in modes.iter().zip(&rates) {
        let m = median(r);
        println!(
            "{label:<28} {total:>7} events x {ROUNDS} rounds: {m:>10.0} events/s (median), {:>7.2} MiB/s of events",
            m * bytes / (1024.0 * 1024.0)
        );
    }
    let each = median(&rates[0]);
    for (i, (key, label, _, _)) in modes.iter().enumerate() {
        let against = (i > 0).then_some((each, "batched / fsync each"));
        bench_row(key, label, median(&rates[i]), against);
    }
    let compressed: Vec<f64> = (0..ROUNDS)
        .map(|_| compress_rate(1_280_000 / scale))
        .collect();
    bench_row(
        "audit.compress",
        "compress_sealed (zstd, after the seal)",
        median(&compressed),
        None,
    );
}

/// Events/s of `compress_sealed` over one sealed segment of `total` events, read back after.
fn compress_rate(total: usize) -> f64 {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut store, _) = Store::open(dir.path(), StoreOptions::default()).expect("open");
    let events: Vec<Vec<u8>> = (0..total).map(event).collect();
    for chunk in events.chunks(256) {
        let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
        store.append_batch_buffered(&refs).expect("append_batch");
    }
    store.seal_current().expect("seal");
    store.append(&event(0)).expect("open the next segment");
    let start = Instant::now();
    let done = compress_sealed(dir.path()).expect("compress");
    let secs = start.elapsed().as_secs_f64();
    let (plain, packed): (u64, u64) = done.iter().fold((0, 0), |(p, c), s| {
        (p + s.plain_bytes, c + s.compressed_bytes)
    });
    println!(
        "compress_sealed: {total} events, {plain} -> {packed} bytes ({:.1} bytes per event) in {secs:.3} s",
        packed as f64 / total as f64
    );
    let report = verify(dir.path(), None);
    assert!(report.ok, "{:?}", report.first_break);
    total as f64 / secs
}
