//! The scenarios of BENCH.md this harness measures, one module each, and the host load they
//! share.

mod cold_start;
pub mod crash;
mod durable;
mod embedded;
mod fanout;
mod jetstream;
mod keyed;
mod memory;
mod nats_core;
mod outbound;
mod pipeline;
mod reload;
mod reuse;
mod tracing;

use crate::Mode;
use crate::components::BenchHost;
use crate::driver::{self, Load, Out};
use crate::report::{self, Row};
use plugbus::Event;

/// Runs scenario `id` once.
pub async fn run(id: &str, mode: Mode, handler: &[u8]) -> anyhow::Result<Row> {
    let mut row = match id {
        "embedded-1" => embedded::run(mode, handler).await?,
        "embedded-durable" => durable::run(mode, handler).await?,
        "fanout-10" => fanout::run(mode, handler).await?,
        "keyed" => keyed::run(mode, handler).await?,
        "nats-core" => nats_core::run(mode, handler).await?,
        "jetstream" => jetstream::run(mode, handler).await?,
        "reload" => reload::run(mode, handler).await?,
        "reuse" => reuse::run(mode, handler).await?,
        "cold-start" => cold_start::run(mode, handler).await?,
        "memory" => memory::run(mode, handler).await?,
        "crash" => crash::run(mode, handler).await?,
        "pipeline-5" => pipeline::run(mode, handler).await?,
        "outbound" => outbound::run(mode, handler).await?,
        "tracing" => tracing::run(mode, handler).await?,
        other => match PARTS.iter().find(|(name, ..)| *name == other) {
            Some((_, "embedded-1", part)) => {
                part_row("embedded-1", part, embedded::run_part(mode, handler, part).await?)
            }
            Some((_, "reuse", part)) => part_row("reuse", part, reuse::run_part(mode, handler, part).await?),
            Some((_, "embedded-durable", part)) => {
                part_row("embedded-durable", part, durable::run_part(mode, handler, part).await?)
            }
            Some((_, "nats-core", part)) => {
                part_row("nats-core", part, nats_core::run_part(mode, handler, part).await?)
            }
            Some((_, "jetstream", part)) => {
                part_row("jetstream", part, jetstream::run_part(mode, handler, part).await?)
            }
            _ => anyhow::bail!("unknown scenario {other}"),
        },
    };
    row.scenario = id.to_string();
    row.peak_rss_mib = report::peak_rss_mib();
    Ok(row)
}

/// Parts of a scenario alone, for a profiler, run only when named: (name, scenario, part).
/// Each runs one side of its scenario with nothing else in the process, and reports its rate
/// with no baseline.
pub const PARTS: &[(&str, &str, &str)] = &[
    ("embedded-1-host", "embedded-1", "host"),
    ("embedded-1-host-1thread", "embedded-1", "host-1thread"),
    ("embedded-1-host-2x1thread", "embedded-1", "host-2x1thread"),
    ("embedded-1-host-2producers", "embedded-1", "host-2producers"),
    ("embedded-1-host-2hosts", "embedded-1", "host-2hosts"),
    ("embedded-1-floor", "embedded-1", "floor"),
    ("embedded-1-floor-1task", "embedded-1", "floor-1task"),
    ("embedded-durable-host", "embedded-durable", "host"),
    ("embedded-durable-memory", "embedded-durable", "memory"),
    ("reuse-host", "reuse", "host"),
    ("reuse-host-1thread", "reuse", "host-1thread"),
    ("reuse-host-2x1thread", "reuse", "host-2x1thread"),
    ("reuse-host-2hosts", "reuse", "host-2hosts"),
    ("reuse-host-2producers", "reuse", "host-2producers"),
    ("reuse-floor", "reuse", "floor"),
    ("reuse-floor-1task", "reuse", "floor-1task"),
    ("nats-core-host", "nats-core", "host"),
    ("nats-core-sandboxed-relay", "nats-core", "sandboxed-relay"),
    ("nats-core-native-relay", "nats-core", "native-relay"),
    ("nats-core-cloudevents-relay", "nats-core", "cloudevents-relay"),
    ("jetstream-host", "jetstream", "host"),
    ("jetstream-sandboxed-relay", "jetstream", "sandboxed-relay"),
];

/// The row of one part of `scenario`: its rate and latencies, no baseline.
fn part_row(scenario: &str, part: &str, load: Load) -> Row {
    Row {
        events_per_s: Some(load.rate()),
        p50_us: Some(load.percentile_us(50)),
        p99_us: Some(load.percentile_us(99)),
        notes: format!("{scenario}, {part} alone (for profiling; no baseline)"),
        extra: std::collections::BTreeMap::from([("cpu_us_per_event".into(), load.cpu_us_per_event())]),
        ..Row::default()
    }
}

/// Events outstanding in the closed loops (unless a scenario needs more).
pub const WINDOW: usize = 64;

/// What a closed loop against a host saw.
#[derive(Default)]
pub struct HostRun {
    /// Throughput and latency.
    pub load: Load,
    /// Attempts retried, summed over plugins (0 unless something failed).
    pub retried: u64,
    /// Deliveries dead-lettered, summed over plugins.
    pub dead_lettered: u64,
    /// Most attempts running at once in one plugin.
    pub peak_in_flight: u64,
    /// What the durable log's writer did over the run, warm-up included (zero in memory).
    pub log: LogTotals,
}

/// Sums of the durable log's `plugbus_log_*` metrics over a run.
#[derive(Default, Clone, Copy)]
pub struct LogTotals {
    /// Commits.
    pub commits: f64,
    /// Seconds in commits, `fsync` included.
    pub seconds: f64,
    /// Operations (appends, acks) committed.
    pub operations: f64,
}

impl LogTotals {
    /// Reads them from `transport`'s own metrics (zero when it keeps no log).
    fn of(transport: &dyn plugbus::transport::Transport) -> Self {
        let mut registry = plugbus::metrics::Registry::default();
        transport.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encoding into a String");
        let value = |name: &str| {
            let line = text.lines().find(|l| l.split_whitespace().next() == Some(name));
            line.and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0.0)
        };
        Self {
            commits: value("log_commits_total"),
            seconds: value("log_commit_duration_seconds_sum"),
            operations: value("log_commit_operations_sum"),
        }
    }

    /// Mean microseconds per commit.
    pub fn commit_us(&self) -> f64 {
        1e6 * self.seconds / self.commits.max(1.0)
    }

    /// Mean operations per commit.
    pub fn operations_per_commit(&self) -> f64 {
        self.operations / self.commits.max(1.0)
    }
}

impl HostRun {
    /// Adds another slice of the same run (see `Mode::slice`).
    pub fn merge(&mut self, slice: HostRun) {
        self.load.merge(slice.load);
        self.retried += slice.retried;
        self.dead_lettered += slice.dead_lettered;
        self.peak_in_flight = self.peak_in_flight.max(slice.peak_in_flight);
        self.log.commits += slice.log.commits;
        self.log.seconds += slice.log.seconds;
        self.log.operations += slice.log.operations;
    }
}

/// Starts a host on `plugins` copies of the handler and keeps `window` events outstanding on
/// `bench.in.e1`; an event is done when all `plugins` outputs arrived. With `keys`, each
/// event gets header `key` = one of `keys` keys, chosen pseudo-randomly.
pub async fn host_run(
    mode: Mode,
    handler: &[u8],
    plugins: usize,
    window: usize,
    keys: Option<u64>,
    check: impl FnMut(&Out),
) -> anyhow::Result<HostRun> {
    host_run_by(mode, handler, plugins, window, keys, check, |_| {}, Producers::One).await
}

/// How the closed loop hands events to the host.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Producers {
    /// One producer: each publish returns before the next is made.
    One,
    /// A producer per event (as concurrent HTTP clients are): each publish runs in a task of its
    /// own, so publishes waiting for the durable log's commit share it (group commit).
    PerEvent,
}

/// Like [`host_run`], with a chance to change the host's config, and the producers as
/// `producers` says.
#[allow(clippy::too_many_arguments)]
pub async fn host_run_by(
    mode: Mode,
    handler: &[u8],
    plugins: usize,
    window: usize,
    keys: Option<u64>,
    check: impl FnMut(&Out),
    tweak: impl FnOnce(&mut plugbus::Config),
    producers: Producers,
) -> anyhow::Result<HostRun> {
    let bench = BenchHost::start(handler, plugins, |c| {
        c.flow.queue = c.flow.queue.max(2 * window);
        tweak(c);
    })
    .await?;
    let mut outputs = bench.host.observe(&["bench.out.>"]).await?;
    let mut rng = 0x9e37_79b9_7f4a_7c15_u64;
    let make = |seq| match keys {
        None => Event::new("bench.in.e1", driver::payload(seq, "")),
        Some(n) => {
            // xorshift64: cheap and deterministic.
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let key = format!("k{}", rng % n);
            Event::new("bench.in.e1", driver::payload(seq, &key)).with_header("key", key)
        }
    };
    let host = &bench.host;
    let transport = host.transport().clone();
    let publish = |ev| {
        let transport = transport.clone();
        async move {
            match producers {
                Producers::One => host.publish(ev).await,
                Producers::PerEvent => {
                    // The loop counts outputs, so a publish that failed shows as a stall.
                    tokio::spawn(async move {
                        if let Err(e) = transport.publish(ev).await {
                            eprintln!("publish failed: {e}");
                        }
                    });
                    Ok(())
                }
            }
        }
    };
    let load = driver::closed_loop(mode, window, plugins as u32, &mut outputs, make, publish, check).await?;
    let run = HostRun {
        load,
        retried: bench.counter("retried"),
        dead_lettered: bench.counter("dead_lettered"),
        peak_in_flight: bench.counter_max("peak_in_flight"),
        log: LogTotals::of(bench.host.transport().as_ref()),
    };
    bench.stop().await?;
    Ok(run)
}
