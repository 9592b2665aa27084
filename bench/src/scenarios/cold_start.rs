//! `cold-start`: seconds from `Host::start` to ready with 50 plugins (renamed copies; 5 with
//! `--quick`) in a fresh plugins folder and a fresh, empty `data_dir`.
//!
//! Warm start: if the cold start left files in `data_dir` (a compile cache), the host is
//! started again on the same folders and timed; otherwise warm is n/a. Baseline: the warm
//! start when there is one, else the compile floor (`Component::new` of each copy on a bare
//! engine configured like the sandbox's), i.e. what compiling alone costs.

use crate::Mode;
use crate::components;
use crate::report::Row;
use plugbus::Host;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

pub async fn run(mode: Mode, handler: &[u8]) -> anyhow::Result<Row> {
    let n = mode.plugins;
    let plugins = components::plugins_dir(handler, n)?;
    let data = tempfile::Builder::new().prefix("plugbus-bench-data").tempdir()?;
    let config = components::config(plugins.path(), data.path());
    let cold = timed_start(config.clone(), n).await?;
    let cached_files = count_files(data.path());
    let warm = if cached_files > 0 { Some(timed_start(config, n).await?) } else { None };
    let floor = compile_floor(handler, n).await?;
    let mut extra = BTreeMap::from([
        ("plugins".to_string(), n as f64),
        ("cold_s".to_string(), cold.as_secs_f64()),
        ("compile_floor_s".to_string(), floor.as_secs_f64()),
        ("per_plugin_ms".to_string(), cold.as_secs_f64() * 1000.0 / n as f64),
        ("data_dir_files".to_string(), cached_files as f64),
    ]);
    let (baseline, base, notes) = match warm {
        Some(w) => {
            extra.insert("warm_s".into(), w.as_secs_f64());
            ("warm start (compile cache)", w, "headline = cold seconds to ready; ratio = cold / warm")
        }
        None => (
            "compile floor: Component::new each",
            floor,
            "headline = cold seconds to ready; warm n/a (no compile cache in data_dir); ratio = cold / compile floor",
        ),
    };
    Ok(Row {
        baseline: format!("{baseline} (s)"),
        baseline_value: Some(base.as_secs_f64()),
        ratio: Some(cold.as_secs_f64() / base.as_secs_f64()),
        extra,
        notes: notes.into(),
        ..Row::default()
    })
}

async fn timed_start(config: plugbus::Config, n: usize) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let host = Host::start(config).await?;
    let took = started.elapsed();
    let live = host.router().names().len();
    anyhow::ensure!(live == n, "{live} of {n} plugins loaded: {:?}", host.rejected());
    host.shutdown().await;
    Ok(took)
}

fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.filter_map(Result::ok).map(|e| if e.path().is_dir() { count_files(&e.path()) } else { 1 }).sum()
}

/// Compiles the `n` copies one after another, as the loader does, on a bare engine.
async fn compile_floor(handler: &[u8], n: usize) -> anyhow::Result<Duration> {
    let copies: Vec<Vec<u8>> = (0..n).map(|i| components::renamed(handler, i)).collect();
    tokio::task::spawn_blocking(move || {
        let engine = super::embedded::engine(false, true)?;
        let started = Instant::now();
        for bytes in &copies {
            wasmtime::component::Component::new(&engine, bytes)?;
        }
        Ok(started.elapsed())
    })
    .await?
}
