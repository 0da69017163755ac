//! Decision latency and throughput for generated policy sets of 10, 100 and 1,000 policies.
//!
//! `cargo bench -p portcullis-policy --bench decide`. Figures are for one thread; the set is
//! shared read-only, so threads scale with cores.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "a benchmark fails loudly"
)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::{Duration, Instant};

use portcullis_policy::{
    Action, Context, Effect, PolicyOutcome, PolicySet, Principal, PrincipalKind, Request, Target,
};

const ENVIRONMENTS: [&str; 4] = ["production", "staging", "test", "dev"];
const CLASSES: [&str; 4] = ["read", "write", "ddl", "admin"];

/// A realistic mix: per-group permits by statement class and environment, connect and SSH
/// permits, table forbids, a time window, and an approval now and then.
fn policies(count: usize) -> String {
    // One policy the benchmark request satisfies, so the figures are for an allow that still
    // has to evaluate every other policy for its action (forbids included).
    let mut text = String::from(
        r#"@id("readers")
permit (principal in Portcullis::Group::"readers", action == Portcullis::Action::"query", resource)
when { context.statement_class == "read" };
"#,
    );
    for i in 1..count {
        let group = format!("team-{}", i % 50);
        let env = ENVIRONMENTS[i % ENVIRONMENTS.len()];
        let class = CLASSES[(i / 4) % CLASSES.len()];
        let policy = match i % 10 {
            0 => format!(
                r#"@id("forbid-table-{i}")
forbid (principal, action == Portcullis::Action::"query", resource)
when {{ context.tables.contains("secret.t{i}") }};
"#
            ),
            1 => format!(
                r#"@id("connect-{i}")
permit (principal in Portcullis::Group::"{group}", action == Portcullis::Action::"connect", resource)
when {{ resource.protocol == "postgres" && resource.hasTag("environment") && resource.getTag("environment") == "{env}" }};
"#
            ),
            2 => format!(
                r#"@id("ssh-{i}")
permit (principal in Portcullis::Group::"{group}", action in Portcullis::Action::"ssh", resource)
when {{ resource.protocol == "ssh" }};
"#
            ),
            3 => format!(
                r#"@id("window-{i}")
permit (principal in Portcullis::Group::"{group}", action == Portcullis::Action::"query", resource)
when {{ context.statement_class == "ddl" && context.weekday == {} && context.hour >= 18 && context.hour < 22 }};
"#,
                1 + i % 7
            ),
            4 => format!(
                r#"@id("approval-{i}")
@approval("leads-{}")
@approvals("2")
permit (principal in Portcullis::Group::"{group}", action == Portcullis::Action::"query", resource)
when {{ context.statement_class == "write" && resource.hasTag("environment") && resource.getTag("environment") == "{env}" }};
"#,
                i % 5
            ),
            _ => format!(
                r#"@id("query-{i}")
permit (principal in Portcullis::Group::"{group}", action == Portcullis::Action::"query", resource)
when {{ context.statement_class == "{class}" && resource.hasTag("environment") && resource.getTag("environment") == "{env}" && context.db_name == "app" }};
"#
            ),
        };
        text.push_str(&policy);
    }
    text
}

fn request() -> Request {
    Request {
        principal: Principal {
            kind: PrincipalKind::User,
            id: "00u1a2b3c4d5e6f7".to_owned(),
            email: Some("alice@example.com".to_owned()),
            name: Some("Alice".to_owned()),
            groups: vec![
                "readers".to_owned(),
                "team-5".to_owned(),
                "team-15".to_owned(),
                "team-45".to_owned(),
            ],
        },
        action: Action::Query,
        target: Target {
            name: "orders-db".to_owned(),
            protocol: "postgres".to_owned(),
            labels: BTreeMap::from([
                ("environment".to_owned(), "staging".to_owned()),
                ("team".to_owned(), "payments".to_owned()),
            ]),
        },
        context: Context {
            unix_time: 1_750_000_000,
            hour: 14,
            weekday: 3,
            source_comm: "psql".to_owned(),
            source_uid: 1001,
            statement_class: Some("read".to_owned()),
            command: Some("SELECT".to_owned()),
            tables: vec!["public.orders".to_owned(), "public.customers".to_owned()],
            functions: vec!["now".to_owned()],
            dynamic_sql: false,
            command_line: None,
            simple_command: false,
            guarded_line: false,
            command_name: None,
            command_args: Vec::new(),
            ssh_user: None,
            forward: None,
            file: None,
            db_user: Some("app".to_owned()),
            db_name: Some("app".to_owned()),
        },
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Rounds of every size in turn (10, 100, 1,000, 10, …): throughput is the median of the
/// rounds, latency percentiles are over every round's samples.
const ROUNDS: usize = 5;

/// A row for `cargo xtask bench`'s table (xtask/src/bench_table.rs reads these lines).
fn bench_row(key: &str, name: &str, value: f64, unit: &str, rounds: usize) {
    println!(
        "BENCH-ROW {{\"key\":\"{key}\",\"name\":\"{name}\",\"value\":{value},\"unit\":\"{unit}\",\"rounds\":{rounds}}}"
    );
}

struct Size {
    count: usize,
    set: PolicySet,
    evaluated: usize,
    effect: &'static str,
    iterations: usize,
    samples: Vec<Duration>,
    per_s: Vec<f64>,
}

fn main() {
    let request = request();
    // PORTCULLIS_BENCH_SIZES=100 runs one size, for profiling.
    let counts: Vec<usize> = std::env::var("PORTCULLIS_BENCH_SIZES")
        .map(|sizes| {
            sizes
                .split(',')
                .filter_map(|n| n.trim().parse().ok())
                .collect()
        })
        .unwrap_or_else(|_| vec![10, 100, 1_000]);
    let mut sizes: Vec<Size> = counts
        .into_iter()
        .map(|count| {
            let text = policies(count);
            let set = PolicySet::load([("bench/generated.cedar", text.as_str())])
                .unwrap_or_else(|e| panic!("{e}"));
            let decision = set.decide(&request);
            assert_eq!(decision.effect, Effect::Allow, "{}", decision.reason);
            // The engine indexes policies by action and principal scope; these are the ones
            // left for Cedar to evaluate for this request.
            let evaluated = set
                .explain(&request)
                .policies
                .iter()
                .filter(|verdict| match &verdict.outcome {
                    PolicyOutcome::OutOfScope(why) => why.starts_with("its resource"),
                    _ => true,
                })
                .count();
            for _ in 0..2_000 {
                black_box(set.decide(black_box(&request)));
            }
            let effect = match decision.effect {
                Effect::Allow => "allow",
                Effect::Deny => "deny",
                Effect::RequireApproval(_) => "appr.",
            };
            let iterations = if count >= 1_000 { 5_000 } else { 20_000 } / ROUNDS;
            Size {
                count,
                set,
                evaluated,
                effect,
                iterations,
                samples: Vec::new(),
                per_s: Vec::new(),
            }
        })
        .collect();
    for _ in 0..ROUNDS {
        for size in &mut sizes {
            let started = Instant::now();
            for _ in 0..size.iterations {
                let t = Instant::now();
                black_box(size.set.decide(black_box(&request)));
                size.samples.push(t.elapsed());
            }
            size.per_s
                .push(size.iterations as f64 / started.elapsed().as_secs_f64());
        }
    }
    println!("policies  evaluated  effect  p50       p99       throughput (median of {ROUNDS} interleaved rounds)");
    for size in &mut sizes {
        size.samples.sort();
        size.per_s.sort_by(f64::total_cmp);
        let p50 = percentile(&size.samples, 0.50).as_secs_f64() * 1e6;
        let p99 = percentile(&size.samples, 0.99).as_secs_f64() * 1e6;
        let per_s = size.per_s[size.per_s.len() / 2];
        println!(
            "{:>8}  {:>9}  {:<6}  {p50:>7.1}µs {p99:>7.1}µs {per_s:>8.0}/s",
            size.count, size.evaluated, size.effect,
        );
    }
    for size in &sizes {
        let n = size.count;
        let per_s = size.per_s[size.per_s.len() / 2];
        bench_row(
            &format!("policy.decide_p50/{n}"),
            &format!("decision p50, {n} policies"),
            percentile(&size.samples, 0.50).as_secs_f64() * 1e6,
            "µs",
            ROUNDS,
        );
        bench_row(
            &format!("policy.decide_p99/{n}"),
            &format!("decision p99, {n} policies"),
            percentile(&size.samples, 0.99).as_secs_f64() * 1e6,
            "µs",
            ROUNDS,
        );
        bench_row(
            &format!("policy.decisions_per_s/{n}"),
            &format!("decisions per second, {n} policies, one thread"),
            per_s,
            "per s",
            ROUNDS,
        );
    }
}
