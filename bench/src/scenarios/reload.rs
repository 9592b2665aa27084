//! `reload`: embedded-1's host (embedded bus, 1 plugin, 1 KiB JSON events) with `watch` on,
//! under a steady open-loop load while its plugin file is replaced 100 times (5 with `--quick`).
//!
//! First the host's capacity is measured (closed loop, 64 outstanding, as embedded-1); then
//! events are published at half that rate on a fixed schedule, whatever the host does (latency
//! = publish → output observed; `lag_p99_us`/`lag_max_us` say how late publishes were against
//! the schedule, which would show the host pushing back). The file is overwritten in place with
//! the other of two builds, alternately: the handler, and a copy whose manifest version differs
//! by one byte (`components::rebuilt`). Each swap is timed from the write to
//! `router().current_hash` naming the new build; this includes the watcher's 75 ms debounce.
//!
//! Only the first swap to the second build compiles it. That one is done during the warm-up
//! (`compile_swap_ms`; latency of the events published from its write to 100 ms after it
//! served: `compile_swap_p99_us`/`_max_us`) and swapped back, then the load runs `measure`
//! without swaps (the baseline), then the measured swaps follow back to back, all reading the
//! compile cache (`compiled`, `cache_hits`).
//!
//! Headline: events/s handled during the measured swaps, p50/p99 of the events published
//! during them. Baseline: p99 of the same load without swaps; ratio = p99 with swaps / p99
//! without. Every output is counted per event over the whole run: `lost` (no output) must be 0,
//! `duplicates` (an event handled twice) too.

use super::WINDOW;
use crate::Mode;
use crate::components::{self, BenchHost};
use crate::driver::{self, OpenLoop};
use crate::report::Row;
use plugbus::Event;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The open loop's rate, as a share of the measured capacity.
const LOAD: f64 = 0.5;
/// How long one swap may take before the run is called stuck.
const SWAP_LIMIT: Duration = Duration::from_secs(30);

fn input(seq: u64) -> Event {
    Event::new("bench.in.e1", driver::payload(seq, ""))
}

pub async fn run(mode: Mode, handler: &[u8]) -> anyhow::Result<Row> {
    let swaps = if mode.quick { 5 } else { 100 };
    let name = components::plugin_name(0);
    // The file the host loaded is `renamed(handler, 0)`; the other build differs in its version.
    let builds = [components::renamed(handler, 0), components::rebuilt(&components::renamed(handler, 0))?];
    let bench = BenchHost::start(handler, 1, |c| {
        c.watch = true;
        c.flow.queue = c.flow.queue.max(2 * WINDOW);
    })
    .await?;
    let swapper = Swapper {
        file: bench.plugins_dir().join(format!("{name}.wasm")),
        hashes: builds.each_ref().map(|b| plugbus::sandbox::content_hash(b)),
        builds,
        name,
    };
    let router = bench.host.router().clone();
    anyhow::ensure!(swapper.serving(&router) == Some(0), "the host is not serving the handler");

    let mut outputs = bench.host.observe(&["bench.out.>"]).await?;
    let host = &bench.host;
    let publish = |ev| async move { host.publish(ev).await };
    let capacity = driver::closed_loop(mode, WINDOW, 1, &mut outputs, input, publish, |_| {}).await?.rate();
    let rate = capacity * LOAD;

    let load = OpenLoop::start(rate, bench.host.transport().clone(), input, outputs);
    tokio::time::sleep(mode.warmup).await;
    // The first swap to the second build compiles it; timed here, out of the measured swaps.
    let compile_from = Instant::now();
    let compile_swap = swapper.swap(&bench, 1).await?;
    let compile_to = Instant::now() + Duration::from_millis(100);
    swapper.swap(&bench, 0).await?;
    tokio::time::sleep(mode.warmup).await;
    let quiet_from = Instant::now();
    tokio::time::sleep(mode.measure).await;
    let (quiet_to, swaps_from) = (Instant::now(), Instant::now());
    let mut swap_times = Vec::with_capacity(swaps);
    let mut versions = std::collections::BTreeSet::new();
    for i in 1..=swaps {
        swap_times.push(swapper.swap(&bench, i % 2).await?);
        versions.extend(router.plugins().into_iter().filter(|p| p.name == swapper.name).map(|p| p.version));
    }
    let swaps_to = Instant::now();
    let run = load.finish().await?;
    anyhow::ensure!(versions.len() == 2, "the two builds should serve two versions, saw {versions:?}");

    let (quiet, _) = run.window(quiet_from, quiet_to);
    let (during, lag) = run.window(swaps_from, swaps_to);
    let (compiling, _) = run.window(compile_from, compile_to);
    let stats = &bench.host.reloader().stats;
    let cache = bench.host.reloader().sandbox.cache_stats();
    let (compiled, cache_hits) = (cache.compiled.load(Ordering::Relaxed), cache.hits.load(Ordering::Relaxed));
    let reloads = stats.reloads.load(Ordering::Relaxed);
    let (retried, dead_lettered) = (bench.counter("retried"), bench.counter("dead_lettered"));
    bench.stop().await?;

    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut sorted = swap_times.clone();
    sorted.sort_unstable();
    let swap_pct = |p: usize| {
        sorted.get((sorted.len() * p / 100).min(sorted.len().saturating_sub(1))).map_or(f64::NAN, |d| ms(*d))
    };
    let (lost, duplicates) = (run.lost(), run.duplicates());
    let p99 = during.percentile_us(99);
    Ok(Row {
        events_per_s: Some(during.rate()),
        p50_us: Some(during.percentile_us(50)),
        p99_us: Some(p99),
        baseline: "p99 µs, same load without swaps".into(),
        baseline_value: Some(quiet.percentile_us(99)),
        ratio: Some(p99 / quiet.percentile_us(99)),
        extra: BTreeMap::from([
            ("swaps".into(), swap_times.len() as f64),
            ("lost".into(), lost as f64),
            ("duplicates".into(), duplicates as f64),
            ("published".into(), run.published() as f64),
            ("capacity_per_s".into(), capacity),
            ("offered_per_s".into(), rate),
            ("quiet_per_s".into(), quiet.rate()),
            ("quiet_p50_us".into(), quiet.percentile_us(50)),
            ("max_us".into(), during.percentile_us(100)),
            ("lag_p99_us".into(), lag.percentile_us(99)),
            ("lag_max_us".into(), lag.percentile_us(100)),
            ("swaps_s".into(), (swaps_to - swaps_from).as_secs_f64()),
            ("swap_p50_ms".into(), swap_pct(50)),
            ("swap_max_ms".into(), swap_pct(100)),
            ("compile_swap_ms".into(), ms(compile_swap)),
            ("compile_swap_p99_us".into(), compiling.percentile_us(99)),
            ("compile_swap_max_us".into(), compiling.percentile_us(100)),
            ("reloads".into(), reloads as f64),
            ("compiled".into(), compiled as f64),
            ("cache_hits".into(), cache_hits as f64),
            ("retried".into(), retried as f64),
            ("dead_lettered".into(), dead_lettered as f64),
        ]),
        notes: format!(
            "{}; open loop at {:.0}% of capacity; swap = write → new hash serving",
            if lost == 0 && duplicates == 0 { "none lost, none twice" } else { "EVENTS LOST OR HANDLED TWICE" },
            LOAD * 100.0
        ),
        ..Row::default()
    })
}

/// Replaces the plugin's file with one of the two builds and waits until it serves.
struct Swapper {
    file: std::path::PathBuf,
    name: String,
    builds: [Vec<u8>; 2],
    hashes: [String; 2],
}

impl Swapper {
    /// Which build serves now.
    fn serving(&self, router: &plugbus::router::Router) -> Option<usize> {
        let hash = router.current_hash(&self.name)?;
        self.hashes.iter().position(|h| *h == hash)
    }

    /// Writes build `b` over the file in place; the time from the write until it serves.
    async fn swap(&self, bench: &BenchHost, b: usize) -> anyhow::Result<Duration> {
        let router = bench.host.router();
        anyhow::ensure!(self.serving(router) != Some(b), "build {b} is serving already: the swap would be a no-op");
        let written = Instant::now();
        tokio::fs::write(&self.file, &self.builds[b]).await?;
        while self.serving(router) != Some(b) {
            anyhow::ensure!(
                written.elapsed() < SWAP_LIMIT,
                "build {b} was not serving {SWAP_LIMIT:?} after the write (rejected: {:?})",
                bench.host.rejected()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        Ok(written.elapsed())
    }
}
