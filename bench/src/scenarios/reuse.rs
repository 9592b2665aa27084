//! `reuse`: embedded-1 with the plugin set to `instance = "reuse"` (warm instances kept across
//! events, recycled after `recycle_after` events or any trap): the opt-in mode for stateless
//! handlers. Target: ≥ 200k events/s on the 2 cores.
//!
//! Baseline, same run: the reused-instance wasm floor, `Plugin::handle` in reuse mode in a loop
//! on 2 tasks (no router, no bus). `idle_*` is the same host with one event outstanding.

use super::embedded::{input, sandbox_floor};
use crate::Mode;
use crate::components::BenchHost;
use crate::driver::{self, Load};
use crate::report::Row;
use plugbus::sandbox::{InstanceMode, Limits};
use std::collections::BTreeMap;

/// Events outstanding: enough to keep both cores busy when each event costs a few µs.
const WINDOW: usize = 256;

async fn host_load(mode: Mode, handler: &[u8], window: usize) -> anyhow::Result<(Load, u64)> {
    let bench = BenchHost::start(handler, 1, |c| {
        c.limits.instance = InstanceMode::Reuse;
        c.flow.queue = c.flow.queue.max(2 * window);
    })
    .await?;
    let mut outputs = bench.host.observe(&["bench.out.>"]).await?;
    let host = &bench.host;
    let publish = |ev| async move { host.publish(ev).await };
    let load = driver::closed_loop(mode, window, 1, &mut outputs, input, publish, |_| {}).await?;
    let failed = bench.counter("retried") + bench.counter("dead_lettered");
    bench.stop().await?;
    Ok((load, failed))
}

/// One side of reuse alone, for a profiler: `host` or `floor` (2 tasks) (see `PARTS`); as for
/// embedded-1, `host-1thread` and `floor-1task` on one core, and two hosts with half the window
/// each on threads of their own (`host-2x1thread`) or as tasks of the one runtime (`host-2hosts`),
/// and one host fed by two closed loops with half the window each (`host-2producers`).
pub async fn run_part(mode: Mode, handler: &[u8], part: &str) -> anyhow::Result<Load> {
    Ok(match part {
        "host" => host_load(mode, handler, WINDOW).await?.0,
        "host-1thread" => {
            super::embedded::on_one_thread(handler, move |h| async move { Ok(host_load(mode, &h, WINDOW).await?.0) })
                .await?
        }
        "host-2x1thread" => {
            let one = || {
                super::embedded::on_one_thread(
                    handler,
                    move |h| async move { Ok(host_load(mode, &h, WINDOW / 2).await?.0) },
                )
            };
            let (a, b) = tokio::join!(one(), one());
            Load::side_by_side(a?, b?)
        }
        "host-2producers" => super::embedded::two_producers(mode, handler, WINDOW, InstanceMode::Reuse).await?,
        "host-2hosts" => {
            let one = || {
                let h = handler.to_vec();
                tokio::spawn(async move { anyhow::Ok(host_load(mode, &h, WINDOW / 2).await?.0) })
            };
            let (a, b) = tokio::join!(one(), one());
            Load::side_by_side(a??, b??)
        }
        "floor-1task" => {
            sandbox_floor(mode, handler, 1, Limits { instance: InstanceMode::Reuse, ..Limits::default() }).await?
        }
        "floor" => {
            sandbox_floor(mode, handler, 2, Limits { instance: InstanceMode::Reuse, ..Limits::default() }).await?
        }
        other => anyhow::bail!("no part {other} of reuse"),
    })
}

pub async fn run(mode: Mode, handler: &[u8]) -> anyhow::Result<Row> {
    let reuse = || Limits { instance: InstanceMode::Reuse, ..Limits::default() };
    // The ratio's sides take turns in short slices (see `Mode::slice`).
    let (mut load, mut failed, mut floor2) = (Load::default(), 0, Load::default());
    let slice = mode.slice();
    for _ in 0..mode.slices() {
        let (l, f) = host_load(slice, handler, WINDOW).await?;
        load.merge(l);
        failed += f;
        floor2.merge(sandbox_floor(slice, handler, 2, reuse()).await?);
    }
    let (idle, _) = host_load(mode, handler, 1).await?;
    let floor1 = sandbox_floor(mode, handler, 1, reuse()).await?;
    let rate = load.rate();
    Ok(Row {
        events_per_s: Some(rate),
        p50_us: Some(load.percentile_us(50)),
        p99_us: Some(load.percentile_us(99)),
        baseline: "reused-instance wasm floor: Plugin::handle, 2 tasks".into(),
        baseline_value: Some(floor2.rate()),
        ratio: Some(rate / floor2.rate()),
        extra: BTreeMap::from([
            ("idle_p50_us".into(), idle.percentile_us(50)),
            ("idle_p99_us".into(), idle.percentile_us(99)),
            ("floor_1task".into(), floor1.rate()),
            // CPU µs per event of the whole process (see embedded-1).
            ("cpu_us_per_event".into(), load.cpu_us_per_event()),
            ("floor_cpu_us_per_event".into(), floor2.cpu_us_per_event()),
            ("floor_1task_p50_us".into(), floor1.percentile_us(50)),
            ("failed".into(), failed as f64),
        ]),
        notes: format!("instance = reuse, {WINDOW} outstanding; target 200k events/s"),
        ..Row::default()
    })
}
