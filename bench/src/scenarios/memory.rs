//! `memory`: RSS of the process before and after starting a host with 50 idle plugins
//! (renamed copies), per plugin; then 10,000 deliveries at once (200 events, each delivered
//! to all 50 plugins), and the peak RSS while they drain. `--quick`: 5 plugins, 1,000
//! deliveries.
//!
//! The peak is reset (`/proc/self/clear_refs`) once the plugins are loaded, so the row's peak
//! is the burst's, not the compiler's (that one is `load_peak_mib`). Baseline: the idle RSS
//! with the 50 plugins loaded; ratio = burst peak / idle.

use crate::Mode;
use crate::components::BenchHost;
use crate::driver::{self, Load, Out};
use crate::report::{self, Row};
use plugbus::Event;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub async fn run(mode: Mode, handler: &[u8]) -> anyhow::Result<Row> {
    let (plugins, deliveries) = (mode.plugins, mode.burst);
    let before = report::rss_mib();
    let bench = BenchHost::start(handler, plugins, |_| {}).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle = report::rss_mib();
    let load_peak = report::peak_rss_mib();
    report::reset_peak_rss();

    let mut outputs = bench.host.observe(&["bench.out.>"]).await?;
    let events = deliveries / plugins;
    let started = Instant::now();
    let mut sent = Vec::with_capacity(events);
    for seq in 0..events as u64 {
        sent.push((Instant::now(), plugins));
        bench.host.publish(Event::new("bench.in.m", driver::payload(seq, ""))).await?;
    }
    let mut load = Load::default();
    while load.latencies.len() < events {
        let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(60), outputs.recv()).await else {
            anyhow::bail!("the burst stalled with {} of {events} events complete", load.latencies.len());
        };
        let out: Out = serde_json::from_slice(&ev.data)?;
        let slot = &mut sent[out.seq as usize];
        slot.1 -= 1;
        if slot.1 == 0 {
            load.latencies.push(slot.0.elapsed());
        }
    }
    load.elapsed = started.elapsed();
    load.events = (events * plugins) as u64;
    let peak = report::peak_rss_mib();
    let (retried, dead_lettered) = (bench.counter("retried"), bench.counter("dead_lettered"));
    bench.stop().await?;
    Ok(Row {
        events_per_s: Some(load.rate()),
        p50_us: Some(load.percentile_us(50)),
        p99_us: Some(load.percentile_us(99)),
        baseline: format!("idle RSS, {plugins} plugins loaded (MiB)"),
        baseline_value: Some(idle),
        ratio: Some(peak / idle),
        extra: BTreeMap::from([
            ("plugins".into(), plugins as f64),
            ("rss_before_mib".into(), before),
            ("rss_idle_mib".into(), idle),
            ("per_plugin_mib".into(), (idle - before) / plugins as f64),
            ("load_peak_mib".into(), load_peak),
            ("burst_peak_mib".into(), peak),
            ("retried".into(), retried as f64),
            ("dead_lettered".into(), dead_lettered as f64),
        ]),
        notes: format!("events/s = deliveries/s of the burst; latency = publish → {plugins}th output"),
        ..Row::default()
    })
}
