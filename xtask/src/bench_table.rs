//! The one table every suite of `cargo xtask bench` feeds: rows of (value, baseline, ratio)
//! with issue 22's goals, printed as text, written as JSON with the machine's facts and as an
//! SVG bar chart of the ratios. Everything here is pure except [`Machine::read`] and [`write`],
//! so the formats are unit-tested.
//!
//! Benches run through `cargo bench` cannot return values to xtask: they print
//! `BENCH-ROW {json}` lines on stdout, which [`parse_rows`] reads back.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

/// What the prefix of a machine-readable line from a bench binary is.
pub const ROW_PREFIX: &str = "BENCH-ROW ";

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Bound {
    AtLeast,
    AtMost,
}

/// Whether a goal holds the ratio to the baseline or the value itself.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum GoalOf {
    Ratio,
    Value,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Goal {
    pub of: GoalOf,
    pub bound: Bound,
    pub limit: f64,
}

/// Issue 22's goals (and the SSH bench's), in one place, by row key; a key `a/b` takes the
/// goal of `a` (the PostgreSQL rows carry their pgbench case after the slash).
const GOALS: &[(&str, Goal)] = &[
    ("redirect.connect_unprotected", ratio_at_least(0.98)),
    ("redirect.bulk", ratio_at_least(0.80)),
    ("redirect.new_connections_16", ratio_at_least(0.50)),
    ("redirect.rss_idle", value(Bound::AtMost, 25.0)),
    ("redirect.rss_per_connection", value(Bound::AtMost, 16.0)),
    ("postgres.rss_per_tls_session", value(Bound::AtMost, 16.0)),
    ("postgres.tls_sessions_answering", ratio_at_least(1.0)),
    ("postgres.tps_vs_pgbouncer", ratio_at_least(1.0)),
    ("postgres.cpu_per_txn", ratio_at_most(1.0)),
    ("postgres.connect_p50", ratio_at_most(1.0)),
    ("masking.whole_column", value(Bound::AtLeast, 300.0)),
    ("audit.bytes_per_statement", value(Bound::AtMost, 150.0)),
    ("ssh.cat", ratio_at_least(0.80)),
    ("ssh.scp", ratio_at_least(0.80)),
    ("ssh.setup_p50", ratio_at_most(1.5)),
    ("ssh.setup_p99", ratio_at_most(1.5)),
];

const fn ratio_at_least(limit: f64) -> Goal {
    Goal {
        of: GoalOf::Ratio,
        bound: Bound::AtLeast,
        limit,
    }
}

const fn ratio_at_most(limit: f64) -> Goal {
    Goal {
        of: GoalOf::Ratio,
        bound: Bound::AtMost,
        limit,
    }
}

const fn value(bound: Bound, limit: f64) -> Goal {
    Goal {
        of: GoalOf::Value,
        bound,
        limit,
    }
}

pub fn goal_for(key: &str) -> Option<Goal> {
    let family = key.split_once('/').map_or(key, |(family, _)| family);
    GOALS
        .iter()
        .find(|(k, _)| *k == family)
        .map(|(_, goal)| *goal)
}

impl Goal {
    pub fn text(&self, unit: &str) -> String {
        let sign = match self.bound {
            Bound::AtLeast => "≥",
            Bound::AtMost => "≤",
        };
        match self.of {
            // Display keeps the goal as the issue writes it (0.98, 300), not padded.
            GoalOf::Ratio => format!("{sign} {}", self.limit),
            GoalOf::Value => format!("{sign} {} {unit}", self.limit),
        }
    }

    fn holds(&self, x: f64) -> bool {
        match self.bound {
            Bound::AtLeast => x >= self.limit,
            Bound::AtMost => x <= self.limit,
        }
    }
}

/// One figure of one suite.
#[derive(Clone, Debug, PartialEq)]
pub struct Row {
    pub suite: String,
    /// Stable across runs (the JSON's join key): `suite.measure` or `suite.measure/case`.
    pub key: String,
    pub name: String,
    pub value: f64,
    pub unit: String,
    pub baseline: Option<f64>,
    /// What the ratio divides: "proxy / direct".
    pub ratio_of: Option<String>,
    /// How many interleaved rounds the value (and baseline) is the median of.
    pub rounds: usize,
    pub goal: Option<Goal>,
}

impl Row {
    pub fn new(suite: &str, key: &str, name: &str, value: f64, unit: &str, rounds: usize) -> Self {
        Row {
            suite: suite.to_string(),
            key: key.to_string(),
            name: name.to_string(),
            value,
            unit: unit.to_string(),
            baseline: None,
            ratio_of: None,
            rounds,
            goal: goal_for(key),
        }
    }

    pub fn against(mut self, baseline: f64, ratio_of: &str) -> Self {
        self.baseline = Some(baseline);
        self.ratio_of = Some(ratio_of.to_string());
        self
    }

    pub fn ratio(&self) -> Option<f64> {
        let baseline = self.baseline.filter(|b| *b > 0.0 && b.is_finite())?;
        Some(self.value / baseline).filter(|r| r.is_finite())
    }

    /// None without a goal, or when the goal is on a ratio this row does not have.
    pub fn met(&self) -> Option<bool> {
        let goal = self.goal?;
        match goal.of {
            GoalOf::Ratio => self.ratio().map(|r| goal.holds(r)),
            GoalOf::Value => Some(goal.holds(self.value)),
        }
    }

    /// The bar the chart draws: the ratio, or for a goal on the value, the value over the
    /// goal's limit (so 1.0 is the goal).
    fn chart_ratio(&self) -> Option<(f64, Option<f64>, &'static str)> {
        match (self.ratio(), self.goal) {
            (Some(r), Some(g)) if g.of == GoalOf::Ratio => Some((r, Some(g.limit), "")),
            (Some(r), None) => Some((r, None, "")),
            (_, Some(g)) if g.of == GoalOf::Value && g.limit > 0.0 => {
                Some((self.value / g.limit, Some(1.0), " (value / goal)"))
            }
            (Some(r), Some(_)) => Some((r, None, "")),
            (None, _) => None,
        }
    }
}

/// A suite that did not finish: it stays in the table, as a failure.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub suite: String,
    pub error: String,
}

/// Three significant digits or so, without an exponent.
pub fn number(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "–".to_string()
    } else if a >= 100.0 || a == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

pub fn format_table(rows: &[Row], failures: &[Failure]) -> String {
    let header = [
        "suite", "measure", "value", "baseline", "ratio", "goal", "met?",
    ];
    let mut lines: Vec<[String; 7]> = vec![header.map(str::to_string)];
    for r in rows {
        lines.push([
            r.suite.clone(),
            format!("{} ({})", r.name, r.unit),
            number(r.value),
            r.baseline.map_or("–".to_string(), number),
            r.ratio().map_or("–".to_string(), |x| format!("{x:.3}")),
            r.goal.map_or("–".to_string(), |g| g.text(&r.unit)),
            match r.met() {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "–",
            }
            .to_string(),
        ]);
    }
    let mut widths = [0usize; 7];
    for line in &lines {
        for (w, cell) in widths.iter_mut().zip(line) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for line in &lines {
        let mut text = String::new();
        for (i, (cell, w)) in line.iter().zip(widths).enumerate() {
            let pad = w.saturating_sub(cell.chars().count());
            // Names left, figures right.
            if i < 2 {
                let _ = write!(text, "{cell}{}  ", " ".repeat(pad));
            } else {
                let _ = write!(text, "{}{cell}  ", " ".repeat(pad));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    }
    for f in failures {
        let _ = writeln!(out, "{}: not measured: {}", f.suite, f.error);
    }
    out
}

/// The same table in Markdown, for docs/performance.md.
pub fn format_markdown(rows: &[Row]) -> String {
    let mut out = String::from(
        "| suite | measure | value | baseline | ratio | ratio of | rounds | goal | met? |\n\
         |---|---|---:|---:|---:|---|---:|---|---|\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "| {} | {} ({}) | {} | {} | {} | {} | {} | {} | {} |",
            r.suite,
            r.name.replace('|', "\\|"),
            r.unit,
            number(r.value),
            r.baseline.map_or("–".to_string(), number),
            r.ratio().map_or("–".to_string(), |x| format!("{x:.3}")),
            r.ratio_of.as_deref().unwrap_or("–"),
            r.rounds,
            r.goal.map_or("–".to_string(), |g| g.text(&r.unit)),
            match r.met() {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            }
        );
    }
    out
}

/// What the figures depend on besides the code.
#[derive(Clone, Debug, PartialEq)]
pub struct Machine {
    pub kernel: String,
    pub cpu_model: String,
    pub cores: usize,
    pub memory_kib: u64,
    pub date: String,
    pub commit: String,
    /// The agent measured and when it was built: with `--no-build` it may predate `commit`.
    pub agent: String,
}

impl Machine {
    pub fn read() -> Self {
        let file = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let out = |c: &mut Command| {
            c.stderr(Stdio::null())
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default()
        };
        let root = crate::root();
        let commit = out(Command::new("git")
            .args(["rev-parse", "HEAD"])
            .current_dir(&root));
        // The figures are of the tree as built, which may hold changes not committed yet.
        let dirty = !out(Command::new("git")
            .args(["status", "--porcelain", "--untracked-files=no"])
            .current_dir(&root))
        .is_empty();
        let bin = crate::bench_common::agent_bin();
        let built = out(Command::new("date")
            .args(["-u", "+%Y-%m-%dT%H:%M:%SZ", "-r"])
            .arg(&bin));
        let mut machine = Self::from_sources(
            &file("/proc/sys/kernel/osrelease"),
            &file("/proc/cpuinfo"),
            &file("/proc/meminfo"),
            &out(Command::new("date").args(["-u", "+%Y-%m-%dT%H:%M:%SZ"])),
            &if dirty && !commit.is_empty() {
                format!("{commit} (with uncommitted changes)")
            } else {
                commit
            },
        );
        machine.agent = format!("{} built {built}", bin.display());
        machine
    }

    pub fn from_sources(
        osrelease: &str,
        cpuinfo: &str,
        meminfo: &str,
        date: &str,
        commit: &str,
    ) -> Self {
        let cpu_model = cpuinfo
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "model name").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let cores = cpuinfo
            .lines()
            .filter(|l| l.split(':').next().is_some_and(|k| k.trim() == "processor"))
            .count();
        let memory_kib = meminfo
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        Machine {
            kernel: osrelease.trim().to_string(),
            cpu_model,
            cores,
            memory_kib,
            date: date.trim().to_string(),
            commit: commit.trim().to_string(),
            agent: String::new(),
        }
    }

    pub fn describe(&self) -> String {
        format!(
            "{} ({} cores), {:.1} GiB memory, Linux {}, {}, commit {}, agent {}",
            self.cpu_model,
            self.cores,
            self.memory_kib as f64 / f64::from(1u32 << 20),
            self.kernel,
            self.date,
            self.commit,
            self.agent
        )
    }
}

pub fn to_json(machine: &Machine, rows: &[Row], failures: &[Failure]) -> Value {
    json!({
        "machine": {
            "kernel": machine.kernel,
            "cpu_model": machine.cpu_model,
            "cores": machine.cores,
            "memory_kib": machine.memory_kib,
            "date": machine.date,
            "commit": machine.commit,
            "agent": machine.agent,
        },
        "rows": rows.iter().map(|r| json!({
            "suite": r.suite,
            "key": r.key,
            "name": r.name,
            "value": r.value,
            "unit": r.unit,
            "baseline": r.baseline,
            "ratio": r.ratio(),
            "ratio_of": r.ratio_of,
            "rounds": r.rounds,
            "goal": r.goal.map(|g| json!({
                "of": match g.of { GoalOf::Ratio => "ratio", GoalOf::Value => "value" },
                "bound": match g.bound { Bound::AtLeast => "at_least", Bound::AtMost => "at_most" },
                "limit": g.limit,
                "text": g.text(&r.unit),
            })),
            "met": r.met(),
        })).collect::<Vec<_>>(),
        "failures": failures.iter().map(|f| json!({"suite": f.suite, "error": f.error})).collect::<Vec<_>>(),
    })
}

fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Bars beyond this are drawn to the edge, with their figure: one ratio of 40 would
/// otherwise flatten every other bar.
const CHART_MAX: f64 = 3.0;

/// A horizontal bar per row that has a ratio (or a goal on its value), a tick at its goal;
/// green when the goal is met, red when not, grey without a goal.
pub fn svg(rows: &[Row], title: &str) -> String {
    let bars: Vec<(&Row, f64, Option<f64>, &str)> = rows
        .iter()
        .filter_map(|r| r.chart_ratio().map(|(x, g, note)| (r, x, g, note)))
        .collect();
    // Wide enough for the longest label (about 6.6 px a character at 12 px), so none is cut.
    let longest = bars
        .iter()
        .map(|(r, _, _, note)| r.suite.chars().count() + r.name.chars().count() + note.len() + 2)
        .max()
        .unwrap_or(0);
    let label_w = (longest as f64 * 6.6 + 20.0).max(200.0);
    let plot_w = 420.0;
    let row_h = 22.0;
    let top = 50.0;
    let width = label_w + plot_w + 90.0;
    let height = top + row_h * bars.len() as f64 + 40.0;
    let scale_max = bars
        .iter()
        .flat_map(|(_, x, g, _)| [Some(*x), *g])
        .flatten()
        .filter(|x| x.is_finite())
        .fold(1.2_f64, f64::max)
        .min(CHART_MAX);
    let x_of = |v: f64| label_w + (v.clamp(0.0, scale_max) / scale_max) * plot_w;
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" viewBox="0 0 {width:.0} {height:.0}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="22" font-size="15" font-weight="bold">{}</text>"#,
        xml_escape(title)
    );
    // Gridlines at every 0.5 with their label, and a stronger one at 1.0 (parity).
    let mut tick = 0.0;
    while tick <= scale_max + 1e-9 {
        let x = x_of(tick);
        let stroke = if (tick - 1.0).abs() < 1e-9 {
            "#666"
        } else {
            "#ddd"
        };
        let _ = writeln!(
            out,
            r#"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="{stroke}"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" fill="dimgray">{tick:.1}</text>"#,
            top - 6.0,
            top + row_h * bars.len() as f64,
            top - 10.0
        );
        tick += 0.5;
    }
    for (i, (row, x, goal, note)) in bars.iter().enumerate() {
        let y = top + row_h * i as f64;
        let fill = match row.met() {
            Some(true) => "#2e7d32",
            Some(false) => "#c62828",
            None => "#9e9e9e",
        };
        let label = format!("{}: {}{note}", row.suite, row.name);
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            label_w - 8.0,
            y + 15.0,
            xml_escape(&label)
        );
        let _ = writeln!(
            out,
            r#"<rect x="{label_w:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{fill}"><title>{}</title></rect>"#,
            y + 3.0,
            x_of(*x) - label_w,
            row_h - 6.0,
            xml_escape(&format!("{} = {x:.3}", row.key))
        );
        // The figure goes right of the bar and of its goal tick, so the tick never crosses it.
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}">{}{:.3}</text>"#,
            x_of(goal.map_or(*x, |g| x.max(g))) + 4.0,
            y + 15.0,
            if *x > scale_max { "› " } else { "" },
            x
        );
        if let Some(g) = goal {
            let gx = x_of(*g);
            let _ = writeln!(
                out,
                r#"<line x1="{gx:.1}" y1="{:.1}" x2="{gx:.1}" y2="{:.1}" stroke="black" stroke-width="2"><title>goal {}</title></line>"#,
                y + 1.0,
                y + row_h - 1.0,
                row.goal
                    .map_or(String::new(), |g| xml_escape(&g.text(&row.unit)))
            );
        }
    }
    let _ = writeln!(
        out,
        r#"<text x="10" y="{:.1}" fill="dimgray">black tick: goal; green: met, red: not met, grey: no goal; rows with a goal on their value show value / goal</text>"#,
        height - 12.0
    );
    out.push_str("</svg>\n");
    out
}

/// Rows a bench binary printed as `BENCH-ROW {"key":…,"name":…,"value":…,"unit":…,
/// "rounds":…[,"baseline":…,"ratio_of":…]}`; every other line is left alone. A line that
/// starts like a row but does not parse is an error: a figure must not vanish silently.
pub fn parse_rows(suite: &str, stdout: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for line in stdout.lines() {
        let Some(text) = line.strip_prefix(ROW_PREFIX) else {
            continue;
        };
        let v: Value = serde_json::from_str(text).with_context(|| format!("bench row `{text}`"))?;
        let str_field = |k: &str| -> Result<String> {
            v.get(k)
                .and_then(Value::as_str)
                .map(str::to_string)
                .with_context(|| format!("bench row `{text}` has no string `{k}`"))
        };
        let value = v
            .get("value")
            .and_then(Value::as_f64)
            .filter(|x| x.is_finite())
            .with_context(|| format!("bench row `{text}` has no finite `value`"))?;
        let rounds = v
            .get("rounds")
            .and_then(Value::as_u64)
            .and_then(|r| usize::try_from(r).ok())
            .filter(|r| *r > 0)
            .with_context(|| format!("bench row `{text}` has no positive `rounds`"))?;
        let key = str_field("key")?;
        if !key.starts_with(&format!("{suite}.")) {
            bail!("bench row `{text}`: its key is not in suite `{suite}`");
        }
        let mut row = Row::new(
            suite,
            &key,
            &str_field("name")?,
            value,
            &str_field("unit")?,
            rounds,
        );
        match (v.get("baseline").and_then(Value::as_f64), v.get("ratio_of")) {
            (Some(b), Some(Value::String(of))) => row = row.against(b, of),
            (None, None) => {}
            _ => bail!("bench row `{text}`: `baseline` and `ratio_of` go together"),
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Runs `cmd`, its stdout shown as it comes (but for `BENCH-ROW` lines) and returned.
pub fn run_capturing(cmd: &mut Command) -> Result<String> {
    use std::io::BufRead;
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {cmd:?}"))?;
    let mut captured = String::new();
    if let Some(stdout) = child.stdout.take() {
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line?;
            if !line.starts_with(ROW_PREFIX) {
                println!("{line}");
            }
            captured.push_str(&line);
            captured.push('\n');
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(captured)
}

/// `cargo bench -p package --bench name` (release), its rows.
pub fn cargo_bench_rows(suite: &str, package: &str, bench: &str) -> Result<Vec<Row>> {
    let out = run_capturing(&mut crate::cargo_cmd(&[
        "bench", "-q", "-p", package, "--bench", bench,
    ]))?;
    let rows = parse_rows(suite, &out)?;
    if rows.is_empty() {
        bail!("cargo bench -p {package} --bench {bench} printed no {ROW_PREFIX}line");
    }
    Ok(rows)
}

/// The review bench is a test of the agent's (engineer B's file): its lines
/// `review report over N events (Markdown): 2.10 s, 512 KiB, 476190 events/s` are read as
/// they are, one row per format.
pub fn parse_review_lines(stdout: &str) -> Vec<Row> {
    stdout
        .lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("review report over ")?;
            let (events, rest) = rest.split_once(" events (")?;
            let (format, rest) = rest.split_once("): ")?;
            let rate: f64 = rest
                .strip_suffix(" events/s")?
                .rsplit(", ")
                .next()?
                .parse()
                .ok()?;
            Some(Row::new(
                "review",
                &format!("review.report/{}", format.to_lowercase()),
                &format!("review report over {events} events, {format}"),
                rate,
                "events/s",
                1,
            ))
        })
        .collect()
}

/// Prints the table and writes `dir/<stem>.json` and `dir/<stem>.svg`.
pub fn report(stem: &str, rows: &[Row], failures: &[Failure]) -> Result<PathBuf> {
    let machine = Machine::read();
    println!("\n{}", format_table(rows, failures));
    println!("machine: {}", machine.describe());
    let dir = bench_dir();
    write(&dir, stem, &machine, rows, failures)?;
    println!("written: {0}/{stem}.json, {0}/{stem}.svg", dir.display());
    Ok(dir)
}

/// `target/bench` under the target directory the build uses.
fn bench_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                crate::root().join(t)
            }
        })
        .unwrap_or_else(|| crate::root().join("target"))
        .join("bench")
}

pub fn write(
    dir: &Path,
    stem: &str,
    machine: &Machine,
    rows: &[Row],
    failures: &[Failure],
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let json = to_json(machine, rows, failures);
    std::fs::write(
        dir.join(format!("{stem}.json")),
        serde_json::to_string_pretty(&json)? + "\n",
    )?;
    let command = match stem {
        "bench" => "cargo xtask bench".to_string(),
        suite => format!("cargo xtask bench {suite}"),
    };
    let title = format!(
        "{command}: {}, {} cores, {}",
        machine.cpu_model, machine.cores, machine.date
    );
    std::fs::write(dir.join(format!("{stem}.svg")), svg(rows, &title))?;
    std::fs::write(dir.join(format!("{stem}.md")), format_markdown(rows))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing, reason = "tests")]
mod tests {
    use super::*;

    fn rows() -> Vec<Row> {
        vec![
            Row::new(
                "redirect",
                "redirect.connect_unprotected",
                "connect+close, unprotected port",
                9_800.0,
                "per s",
                5,
            )
            .against(10_000.0, "attached / detached"),
            Row::new(
                "redirect",
                "redirect.bulk",
                "bulk throughput",
                500.0,
                "MiB/s",
                5,
            )
            .against(1_000.0, "proxy / direct"),
            Row::new(
                "masking",
                "masking.whole_column",
                "whole column <partial> & co",
                576.0,
                "MB/s",
                5,
            ),
            Row::new(
                "redirect",
                "redirect.cpu_per_gib",
                "agent CPU per GiB",
                800.0,
                "ms",
                5,
            ),
        ]
    }

    #[test]
    fn goals_are_met_or_missed_on_ratio_or_value() {
        let r = rows();
        assert_eq!(r[0].ratio(), Some(0.98));
        assert_eq!(r[0].met(), Some(true), "0.98 meets ≥ 0.98");
        assert_eq!(r[1].met(), Some(false), "0.5 misses ≥ 0.80");
        assert_eq!(r[2].ratio(), None);
        assert_eq!(r[2].met(), Some(true), "576 MB/s meets ≥ 300 on the value");
        assert_eq!(r[3].met(), None, "no goal");
        let cpu = Row::new(
            "postgres",
            "postgres.cpu_per_txn/-S -c1",
            "cpu",
            14.7,
            "µs",
            3,
        )
        .against(9.4, "agent / pgbouncer");
        assert_eq!(cpu.met(), Some(false), "1.56 misses ≤ 1.0");
        // A goal on a ratio without a baseline is not met, nor missed: it is not measured.
        let lone = Row::new("redirect", "redirect.bulk", "bulk", 1.0, "MiB/s", 1);
        assert_eq!(lone.met(), None);
        let zero = lone.clone().against(0.0, "proxy / direct");
        assert_eq!(zero.ratio(), None, "no division by a zero baseline");
    }

    #[test]
    fn every_goal_of_issue_22_has_a_row_key() {
        for key in [
            "redirect.connect_unprotected",
            "redirect.bulk",
            "redirect.new_connections_16",
            "redirect.rss_idle",
            "redirect.rss_per_connection",
            "postgres.cpu_per_txn/TPC-B -M simple -c1",
            "masking.whole_column",
        ] {
            assert!(goal_for(key).is_some(), "{key}");
        }
        assert_eq!(goal_for("redirect.round_trips"), None);
        assert_eq!(
            goal_for("redirect.bulkier"),
            None,
            "whole keys, not prefixes"
        );
    }

    #[test]
    fn table_has_one_line_per_row_aligned_with_goal_and_verdict() {
        let failures = [Failure {
            suite: "ssh".into(),
            error: "sshd is missing".into(),
        }];
        let text = format_table(&rows(), &failures);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 1 + 4 + 1);
        assert!(lines[0].starts_with("suite"));
        for h in ["measure", "value", "baseline", "ratio", "goal", "met?"] {
            assert!(lines[0].contains(h), "{h}");
        }
        assert!(
            lines[1].contains("0.980") && lines[1].contains("≥ 0.98") && lines[1].ends_with("yes")
        );
        assert!(lines[2].contains("0.500") && lines[2].ends_with("NO"));
        assert!(lines[3].contains("≥ 300 MB/s") && lines[3].ends_with("yes"));
        assert!(lines[4].ends_with('–'));
        assert_eq!(lines[5], "ssh: not measured: sshd is missing");
        // Right-aligned figures end in the same column on every row.
        let col = |l: &str| l.find("  –").or_else(|| l.find(" 0."));
        assert!(col(lines[1]).is_some());
        let widths: Vec<usize> = lines[..5].iter().map(|l| l.chars().count()).collect();
        assert!(widths.iter().all(|w| *w > 40));
    }

    #[test]
    fn json_holds_machine_rows_goals_and_failures() {
        let machine = Machine::from_sources(
            "6.1.0-26-amd64\n",
            "processor\t: 0\nmodel name\t: AMD EPYC 7B13\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13\n",
            "MemTotal:        8132340 kB\nMemFree: 1 kB\n",
            "2026-12-05T16:30:00Z\n",
            "abc123",
        );
        assert_eq!(machine.cores, 2);
        assert_eq!(machine.cpu_model, "AMD EPYC 7B13");
        assert_eq!(machine.memory_kib, 8_132_340);
        let failures = [Failure {
            suite: "ssh".into(),
            error: "boom".into(),
        }];
        let v = to_json(&machine, &rows(), &failures);
        assert_eq!(v["machine"]["kernel"], "6.1.0-26-amd64");
        assert_eq!(v["machine"]["date"], "2026-12-05T16:30:00Z");
        assert_eq!(v["machine"]["commit"], "abc123");
        assert_eq!(v["machine"]["agent"], "");
        let r = &v["rows"][0];
        assert_eq!(r["suite"], "redirect");
        assert_eq!(r["key"], "redirect.connect_unprotected");
        assert_eq!(r["value"], 9_800.0);
        assert_eq!(r["baseline"], 10_000.0);
        assert_eq!(r["ratio"], 0.98);
        assert_eq!(r["ratio_of"], "attached / detached");
        assert_eq!(r["rounds"], 5);
        assert_eq!(r["goal"]["of"], "ratio");
        assert_eq!(r["goal"]["bound"], "at_least");
        assert_eq!(r["goal"]["limit"], 0.98);
        assert_eq!(r["met"], true);
        assert_eq!(v["rows"][2]["goal"]["of"], "value");
        assert_eq!(v["rows"][2]["ratio"], Value::Null);
        assert_eq!(v["rows"][3]["goal"], Value::Null);
        assert_eq!(v["rows"][3]["met"], Value::Null);
        assert_eq!(v["failures"][0]["suite"], "ssh");
    }

    #[test]
    fn svg_draws_a_bar_per_ratio_with_goal_ticks_and_escaped_labels() {
        let text = svg(&rows(), "bench <all> & more");
        assert!(text.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
        assert!(text.trim_end().ends_with("</svg>"));
        assert!(text.contains("bench &lt;all&gt; &amp; more"));
        assert!(text.contains("whole column &lt;partial&gt; &amp; co (value / goal)"));
        assert!(!text.contains("<partial>"));
        // Three bars (two ratios, one value goal); the row with neither is not drawn.
        assert_eq!(text.matches("<rect x=").count(), 3);
        assert!(!text.contains("agent CPU per GiB"));
        // A goal tick per goal, coloured by the verdict.
        assert_eq!(text.matches("stroke=\"black\"").count(), 3);
        assert_eq!(text.matches("fill=\"#2e7d32\"").count(), 2);
        assert_eq!(text.matches("fill=\"#c62828\"").count(), 1);
        // Every element opened is closed: tags balance.
        assert_eq!(
            text.matches("<text").count(),
            text.matches("</text>").count()
        );
        assert_eq!(
            text.matches("<title>").count(),
            text.matches("</title>").count()
        );
    }

    #[test]
    fn svg_labels_get_the_room_the_longest_one_needs() {
        let long = "x".repeat(150);
        let row = Row::new("postgres", "postgres.x", &long, 1.0, "TPS", 1).against(1.0, "a / b");
        let text = svg(&[row], "t");
        // 150 + "postgres: " characters at 6.6 px, plus the margin: the label's right edge.
        let edge = (160.0_f64 * 6.6 + 20.0) - 8.0;
        assert!(text.contains(&format!("<text x=\"{edge:.1}\"")), "{text}");
    }

    #[test]
    fn svg_clips_huge_ratios_to_the_edge() {
        let row = Row::new("policy", "policy.x", "x", 40.0, "per s", 1).against(1.0, "a / b");
        let text = svg(&[row], "t");
        assert!(text.contains("› 40.000"));
        assert!(text.contains("width=\"420.0\""), "a full-width bar: {text}");
    }

    #[test]
    fn rows_are_parsed_from_bench_output_and_bad_rows_fail() {
        let out = "| values | throughput |\n\
                   BENCH-ROW {\"key\":\"masking.whole_column\",\"name\":\"whole column (partial mask)\",\"value\":612.5,\"unit\":\"MB/s\",\"rounds\":5}\n\
                   something else\n\
                   BENCH-ROW {\"key\":\"masking.detectors\",\"name\":\"detectors\",\"value\":300,\"unit\":\"MB/s\",\"rounds\":5,\"baseline\":600,\"ratio_of\":\"detectors / none\"}\n";
        let rows = parse_rows("masking", out).unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].key, "masking.whole_column");
        assert_eq!(rows[0].value, 612.5);
        assert_eq!(rows[0].rounds, 5);
        assert_eq!(rows[0].goal, goal_for("masking.whole_column"));
        assert_eq!(rows[1].ratio(), Some(0.5));
        assert_eq!(rows[1].ratio_of.as_deref(), Some("detectors / none"));
        for bad in [
            "BENCH-ROW {not json}",
            "BENCH-ROW {\"key\":\"masking.a\",\"name\":\"a\",\"unit\":\"MB/s\",\"rounds\":1}",
            "BENCH-ROW {\"key\":\"masking.a\",\"name\":\"a\",\"value\":1,\"unit\":\"MB/s\",\"rounds\":0}",
            "BENCH-ROW {\"key\":\"policy.a\",\"name\":\"a\",\"value\":1,\"unit\":\"MB/s\",\"rounds\":1}",
            "BENCH-ROW {\"key\":\"masking.a\",\"name\":\"a\",\"value\":1,\"unit\":\"MB/s\",\"rounds\":1,\"baseline\":2}",
        ] {
            assert!(parse_rows("masking", bad).is_err(), "{bad}");
        }
        assert!(parse_rows("masking", "no rows here\n").unwrap().is_empty());
    }

    #[test]
    fn review_lines_become_rows() {
        let out = "running 1 test\n\
                   phases: verify 1.00 s, read and parse 2.00 s, compute 0.50 s (40 identities)\n\
                   review report over 1000000 events (Markdown): 4.20 s, 512 KiB, 238095 events/s\n\
                   review report over 1000000 events (Csv): 4.00 s, 600 KiB, 250000 events/s\n\
                   test review::tests::bench_report_over_a_million_events ... ok\n";
        let rows = parse_review_lines(out);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].key, "review.report/markdown");
        assert_eq!(rows[0].value, 238_095.0);
        assert_eq!(rows[0].unit, "events/s");
        assert_eq!(rows[1].name, "review report over 1000000 events, Csv");
    }

    #[test]
    fn numbers_keep_about_three_digits() {
        assert_eq!(number(92_757.4), "92757");
        assert_eq!(number(14.66), "14.7");
        assert_eq!(number(1.234), "1.23");
        assert_eq!(number(0.5678), "0.568");
        assert_eq!(number(0.0), "0");
        assert_eq!(number(f64::NAN), "–");
    }

    #[test]
    fn markdown_table_escapes_pipes_and_marks_misses() {
        let md = format_markdown(&rows());
        assert_eq!(md.lines().count(), 2 + 4);
        assert!(md.contains("| redirect | bulk throughput (MiB/s) | 500 | 1000 | 0.500 | proxy / direct | 5 | ≥ 0.8 | **no** |"));
        let piped = Row::new("postgres", "postgres.x", "a | b", 1.0, "x", 1);
        assert!(format_markdown(&[piped]).contains("a \\| b"));
    }
}
