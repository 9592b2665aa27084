//! `embedded-durable`: embedded-1's workload with the durable event log at the default
//! `bus.sync = "always"` (every accepted event committed and fsynced before `publish` returns;
//! appends waiting together share one commit). Baseline: the in-memory embedded-1 of the same
//! run, with the same producers: a task per event, as concurrent HTTP clients are (each waits
//! for its own `202`). Latency is from the publish (what `POST /v1/events` calls) to the output.
//! `sync_none` is the same with `bus.sync = "none"`: what the fsync itself costs. `w512_*` is
//! both again with 512 clients at once: with 64, each client waits for one fsync per event, so
//! the rate cannot pass 64 / fsync latency however cheap the rest is. `commit_us` and
//! `ops_per_commit` are the log writer's mean commit (fsync included) and how many appends and
//! acks each held, from its `plugbus_log_*` metrics: what the durable side costs, without the
//! VM's drift.

use super::{HostRun, Producers, WINDOW, host_run_by};
use crate::Mode;
use crate::driver::Load;
use crate::report::Row;
use plugbus::backend::embedded::log::SyncPolicy;
use std::collections::BTreeMap;

pub async fn run(mode: Mode, handler: &[u8]) -> anyhow::Result<Row> {
    let by = Producers::PerEvent;
    // The ratio's sides take turns in short slices (see `Mode::slice`).
    let (mut memory, mut run) = (Load::default(), HostRun::default());
    let slice = mode.slice();
    for _ in 0..mode.slices() {
        memory.merge(host_run_by(slice, handler, 1, WINDOW, None, |_| {}, |_| {}, by).await?.load);
        run.merge(host_run_by(slice, handler, 1, WINDOW, None, |_| {}, |c| c.bus.durable = true, by).await?);
    }
    let HostRun { load, retried, dead_lettered, log, .. } = run;
    let idle = host_run_by(mode, handler, 1, 1, None, |_| {}, |c| c.bus.durable = true, by).await?.load;
    let no_sync = host_run_by(
        mode,
        handler,
        1,
        WINDOW,
        None,
        |_| {},
        |c| {
            c.bus.durable = true;
            c.bus.sync = SyncPolicy::None;
        },
        by,
    )
    .await?
    .load;
    // 512 clients at once: group commit shares each fsync among more appends, so the bound of
    // WINDOW / fsync latency (64 / ~4 ms here) gives way to what the log costs in CPU.
    let wide = 8 * WINDOW;
    let wide_memory = host_run_by(mode, handler, 1, wide, None, |_| {}, |_| {}, by).await?.load;
    let wide_durable = host_run_by(mode, handler, 1, wide, None, |_| {}, |c| c.bus.durable = true, by).await?.load;
    let rate = load.rate();
    Ok(Row {
        events_per_s: Some(rate),
        p50_us: Some(load.percentile_us(50)),
        p99_us: Some(load.percentile_us(99)),
        baseline: "in-memory embedded-1".into(),
        baseline_value: Some(memory.rate()),
        ratio: Some(rate / memory.rate()),
        extra: BTreeMap::from([
            ("idle_p50_us".into(), idle.percentile_us(50)),
            ("idle_p99_us".into(), idle.percentile_us(99)),
            ("sync_none".into(), no_sync.rate()),
            ("sync_none_vs_memory".into(), no_sync.rate() / memory.rate()),
            ("w512_memory".into(), wide_memory.rate()),
            ("w512_durable".into(), wide_durable.rate()),
            ("w512_ratio".into(), wide_durable.rate() / wide_memory.rate()),
            ("w512_p99_us".into(), wide_durable.percentile_us(99)),
            ("commit_us".into(), log.commit_us()),
            ("ops_per_commit".into(), log.operations_per_commit()),
            ("retried".into(), retried as f64),
            ("dead_lettered".into(), dead_lettered as f64),
        ]),
        ..Row::default()
    })
}

/// One side of embedded-durable alone, for a profiler (`perf record … plugbus-bench
/// embedded-durable-host`): `host` the durable log at the default sync, `memory` its baseline,
/// the in-memory bus with the same producers. Nothing else runs in the process meanwhile.
pub async fn run_part(mode: Mode, handler: &[u8], part: &str) -> anyhow::Result<Load> {
    let by = Producers::PerEvent;
    let durable = match part {
        "host" => true,
        "memory" => false,
        other => anyhow::bail!("embedded-durable has no part {other:?}"),
    };
    let run = host_run_by(mode, handler, 1, WINDOW, None, |_| {}, |c| c.bus.durable = durable, by).await?;
    Ok(run.load)
}
