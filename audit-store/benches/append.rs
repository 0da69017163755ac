//! Append throughput on a real directory: one fsync per event versus group commit.
//!
//! `cargo bench -p portcullis-audit-store --bench append` runs the full measurement; under
//! `cargo test --all-targets` (no `--bench` argument) it runs a few events as a smoke test.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a benchmark fails loudly"
)]

use portcullis_audit_store::{verify, Store, StoreOptions};
use std::time::Instant;

fn event(i: usize) -> Vec<u8> {
    format!(
        r#"{{"kind":"query","session":"3f9c1a","user":"alice@example.com","target":"db-prod:5432","sql":"SELECT * FROM orders WHERE id = {i}","decision":"allow"}}"#
    )
    .into_bytes()
}

fn run(label: &str, total: usize, batch: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (mut store, _) = Store::open(dir.path(), StoreOptions::default()).expect("open");
    let events: Vec<Vec<u8>> = (0..total).map(event).collect();
    let bytes: usize = events.iter().map(Vec::len).sum();
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
    println!(
        "{label:<28} {total:>7} events in {secs:>7.3} s: {:>10.0} events/s, {:>7.2} MiB/s of events",
        total as f64 / secs,
        bytes as f64 / secs / (1024.0 * 1024.0)
    );
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let scale = if full { 1 } else { 100 };
    println!("temp dir: {}", std::env::temp_dir().display());
    run("append (fsync each)", 2_000 / scale, 1);
    run("append_batch (64 per fsync)", 64_000 / scale, 64);
    run("append_batch (256 per fsync)", 256_000 / scale, 256);
}
