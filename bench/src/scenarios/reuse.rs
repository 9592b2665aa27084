//! `reuse`: embedded-1 with the plugin set to `instance = "reuse"` (warm instances kept across
//! events, recycled after `recycle_after` events or any trap): the opt-in mode for stateless
//! handlers. Target: ≥ 200k events/s on the 2 cores.
//!
//! Baseline, same run: the reused-instance wasm floor, `Plugin::handle` in reuse mode in a loop
//! on 2 tasks (no router, no bus). `idle_*` is the same host with one event outstanding.

use crate::Mode;
use crate::components::BenchHost;
use crate::driver::{self, Load};
use crate::report::Row;
use plugbus::Event;
use plugbus::kv::MemoryKv;
use plugbus::sandbox::{InstanceMode, Limits, PluginSettings, Sandbox, SandboxSettings};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Events outstanding: enough to keep both cores busy when each event costs a few µs.
const WINDOW: usize = 256;

fn input(seq: u64) -> Event {
    Event::new("bench.in.e1", driver::payload(seq, ""))
}

async fn host_load(mode: Mode, handler: &[u8], window: usize) -> anyhow::Result<(Load, u64)> {
    let bench = BenchHost::start(handler, 1, |c| {
        c.limits.instance = InstanceMode::Reuse;
        c.flow.queue = c.flow.queue.max(2 * window);
    })
    .await?;
    let mut outputs = bench.host.observe(&["bench.out.>"]).await?;
    let publish = async |ev| Ok(bench.host.publish(ev).await?);
    let load = driver::closed_loop(mode, window, 1, &mut outputs, input, publish, |_| {}).await?;
    let failed = bench.counter("retried") + bench.counter("dead_lettered");
    bench.stop().await?;
    Ok((load, failed))
}

async fn floor(mode: Mode, handler: &[u8], tasks: usize) -> anyhow::Result<Load> {
    let sandbox = Sandbox::new(SandboxSettings::default())?;
    let settings = |_: &_| PluginSettings {
        limits: Limits { instance: InstanceMode::Reuse, ..Limits::default() },
        config: Default::default(),
        kv: Arc::new(MemoryKv::new()),
    };
    let plugin = Arc::new(sandbox.load(handler, settings).await?);
    driver::direct_loop(mode, tasks, move |seq| {
        let plugin = plugin.clone();
        async move {
            let attempt = plugin.handle(&input(seq), 1).await;
            attempt.result.map_err(|f| anyhow::anyhow!("the handler failed: {f}"))?;
            anyhow::ensure!(attempt.outputs.len() == 1, "expected 1 output, got {}", attempt.outputs.len());
            Ok(())
        }
    })
    .await
}

pub async fn run(mode: Mode, handler: &[u8]) -> anyhow::Result<Row> {
    let (load, failed) = host_load(mode, handler, WINDOW).await?;
    let (idle, _) = host_load(mode, handler, 1).await?;
    let floor1 = floor(mode, handler, 1).await?;
    let floor2 = floor(mode, handler, 2).await?;
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
            ("floor_1task_p50_us".into(), floor1.percentile_us(50)),
            ("failed".into(), failed as f64),
        ]),
        notes: format!("instance = reuse, {WINDOW} outstanding; target 200k events/s"),
        ..Row::default()
    })
}
