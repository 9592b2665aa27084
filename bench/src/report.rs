//! Rows: what a scenario reports, the median over runs, the table on stdout and the JSON lines
//! in `target/bench/results.jsonl`. Also the process memory readings (`/proc/self/status`).

use crate::Mode;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// One scenario's figures.
#[derive(Debug, Clone, Default)]
pub struct Row {
    /// Scenario id.
    pub scenario: String,
    /// Events (or deliveries, see `notes`) per second.
    pub events_per_s: Option<f64>,
    /// Median end-to-end latency, µs.
    pub p50_us: Option<f64>,
    /// 99th percentile end-to-end latency, µs.
    pub p99_us: Option<f64>,
    /// Peak RSS of the process during the scenario, MiB.
    pub peak_rss_mib: f64,
    /// What the ratio compares against.
    pub baseline: String,
    /// The baseline's figure (same unit as the headline it is compared with).
    pub baseline_value: Option<f64>,
    /// Headline / baseline: the figure to quote.
    pub ratio: Option<f64>,
    /// Other figures of the scenario (floors, counters, RSS deltas).
    pub extra: BTreeMap<String, f64>,
    /// Free text: what the headline counts, what was not measured.
    pub notes: String,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied()
}

impl Row {
    /// The row whose every figure is the median of that figure over `runs`.
    pub fn median(runs: Vec<Row>) -> Row {
        let pick = |f: fn(&Row) -> Option<f64>| median(runs.iter().filter_map(f).collect());
        let first = runs.first().cloned().unwrap_or_default();
        let extra = first
            .extra
            .keys()
            .filter_map(|k| Some((k.clone(), median(runs.iter().filter_map(|r| r.extra.get(k).copied()).collect())?)))
            .collect();
        Row {
            events_per_s: pick(|r| r.events_per_s),
            p50_us: pick(|r| r.p50_us),
            p99_us: pick(|r| r.p99_us),
            peak_rss_mib: pick(|r| Some(r.peak_rss_mib)).unwrap_or(f64::NAN),
            baseline_value: pick(|r| r.baseline_value),
            ratio: pick(|r| r.ratio),
            extra,
            ..first
        }
    }
}

/// A compact number: `12.3k`, `845`, `0.62`.
pub fn num(x: f64) -> String {
    if !x.is_finite() {
        "n/a".into()
    } else if x.abs() >= 10_000.0 {
        format!("{:.1}k", x / 1000.0)
    } else if x.abs() >= 100.0 || x.fract() == 0.0 {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

fn opt(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), num)
}

/// The table on stdout and the JSON lines file.
pub struct Report {
    file: File,
    path: PathBuf,
    mode: Mode,
}

impl Report {
    /// Opens (appends to) `<target>/bench/results.jsonl`.
    pub fn open(target: &Path, mode: Mode) -> anyhow::Result<Self> {
        let dir = target.join("bench");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("results.jsonl");
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Self { file, path, mode })
    }

    /// Where the JSON lines go.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Prints the table header.
    pub fn header(&self) {
        let runs =
            if self.mode.quick { "quick: 1 short run".to_string() } else { format!("median of {}", self.mode.runs) };
        println!("plugbus-bench ({runs}; latency = publish → output observed; ratio = headline / baseline)\n");
        println!(
            "{:<11} {:>9} {:>8} {:>8} {:>8}  {:<34} {:>9} {:>6}  notes",
            "scenario", "events/s", "p50 µs", "p99 µs", "peak MiB", "baseline", "base", "ratio"
        );
    }

    /// Prints one row and appends its JSON line.
    pub fn row(&mut self, r: &Row) -> anyhow::Result<()> {
        let extra: Vec<String> = r.extra.iter().map(|(k, v)| format!("{k}={}", num(*v))).collect();
        println!(
            "{:<11} {:>9} {:>8} {:>8} {:>8}  {:<34} {:>9} {:>6}  {}{}{}",
            r.scenario,
            opt(r.events_per_s),
            opt(r.p50_us),
            opt(r.p99_us),
            num(r.peak_rss_mib),
            r.baseline,
            opt(r.baseline_value),
            opt(r.ratio),
            r.notes,
            if r.notes.is_empty() || extra.is_empty() { "" } else { "; " },
            extra.join(" "),
        );
        let mut json = serde_json::json!({
            "scenario": r.scenario,
            "quick": self.mode.quick,
            "runs": self.mode.runs,
            "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs(),
            "git": git_head(),
            "events_per_s": r.events_per_s,
            "p50_us": r.p50_us,
            "p99_us": r.p99_us,
            "peak_rss_mib": r.peak_rss_mib,
            "baseline": r.baseline,
            "baseline_value": r.baseline_value,
            "ratio": r.ratio,
            "notes": r.notes,
        });
        for (k, v) in &r.extra {
            json[k] = serde_json::json!(v);
        }
        writeln!(self.file, "{json}")?;
        Ok(())
    }
}

/// The short commit the workspace is at (`+dirty` with uncommitted changes), if git can say.
fn git_head() -> Option<String> {
    let git = |args: &[&str]| {
        std::process::Command::new("git").args(args).current_dir(crate::components::workspace()).output().ok()
    };
    let head = git(&["rev-parse", "--short", "HEAD"]).filter(|o| o.status.success())?;
    let dirty = git(&["status", "--porcelain"]).is_some_and(|o| !o.stdout.is_empty());
    Some(format!("{}{}", String::from_utf8_lossy(&head.stdout).trim(), if dirty { "+dirty" } else { "" }))
}

fn status_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().ok()
}

/// Peak RSS of the process (`VmHWM`), MiB.
pub fn peak_rss_mib() -> f64 {
    status_kib("VmHWM:").map_or(f64::NAN, |k| k as f64 / 1024.0)
}

/// Current RSS of the process (`VmRSS`), MiB.
pub fn rss_mib() -> f64 {
    status_kib("VmRSS:").map_or(f64::NAN, |k| k as f64 / 1024.0)
}

/// Resets the peak to the current RSS (`5` into `/proc/self/clear_refs`), so each scenario
/// reports its own peak; where that is not allowed the peak is the process's so far.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
