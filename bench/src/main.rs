//! `plugbus-bench`: how fast plugbus dispatches events, each figure next to a baseline measured
//! in the same run (the rules are in BENCH.md).
//!
//! Everything runs in this process: hosts are started with `plugbus::Host::start`, events go in
//! with `host.publish` and outputs are seen with `host.observe` (on NATS: a raw `async-nats`
//! producer and observer of the bench's own), so latency is publish → output observed on the
//! monotonic clock. The handler is `bench/handler` (built by `scripts/build-plugins`); N
//! distinct plugins are renamed byte-for-byte copies of it. The NATS scenarios (`nats-core`,
//! `jetstream`) start their own `nats-server` (`NATS_SERVER_BIN`, else `nats-server` on `PATH`)
//! on a free loopback port, and kill it at the end.
//!
//! ```text
//! cargo run --release -p plugbus-bench -- [--quick] [SCENARIO...]
//! ```
//!
//! One table row per scenario on stdout, one JSON line per scenario appended to
//! `target/bench/results.jsonl`. `--quick` runs each scenario once, briefly, with 5 plugins
//! instead of 50 in cold-start and memory, and 5 plugin replacements instead of 100 in reload
//! (CI: keeps the harness from rotting, asserts nothing about speed); without it every scenario
//! runs 3 times for a few seconds and each figure is the median of the 3.
//!
//! In a full run the two sides of each headline ratio (plugbus and its floor, relay or in-memory
//! baseline) take turns in 4 short slices rather than running one after the other: this VM's
//! speed drifts by tens of percent over minutes, and a ratio must compare like with like.

mod components;
mod driver;
mod nats;
mod report;
mod scenarios;

use report::Row;
use std::time::Duration;

/// Slices per interleaved measurement in a full run (see [`Mode::slices`]).
const SLICES: usize = 4;

/// How long to measure, and how often.
#[derive(Debug, Clone, Copy)]
pub struct Mode {
    /// `--quick`.
    pub quick: bool,
    /// Warm-up before each measurement.
    pub warmup: Duration,
    /// Length of each measurement.
    pub measure: Duration,
    /// Runs per scenario (the median is reported).
    pub runs: usize,
    /// Plugins in cold-start and memory: 50, or 5 with `--quick` (50 compiles take many seconds).
    pub plugins: usize,
    /// Deliveries in memory's burst: 10,000, or 1,000 with `--quick`.
    pub burst: usize,
}

impl Mode {
    /// One of the `slices` short slices a ratio's two sides are measured in, taking turns (this
    /// VM's speed drifts by tens of percent over minutes: measured one after the other, a host run
    /// and its floor would compare two different machines). Each slice measures `measure /
    /// slices` after half the warm-up (every slice starts its own host or loop). `--quick` does
    /// not slice.
    pub fn slices(self) -> usize {
        if self.quick { 1 } else { SLICES }
    }

    /// The mode of one slice (see [`Mode::slices`]).
    pub fn slice(self) -> Mode {
        let n = self.slices() as u32;
        if n == 1 {
            return self;
        }
        Mode { warmup: self.warmup / 2, measure: self.measure / n, ..self }
    }

    fn new(quick: bool) -> Self {
        if quick {
            let (warmup, measure) = (Duration::from_millis(50), Duration::from_millis(200));
            Self { quick, warmup, measure, runs: 1, plugins: 5, burst: 1_000 }
        } else {
            let (warmup, measure) = (Duration::from_millis(500), Duration::from_secs(3));
            Self { quick, warmup, measure, runs: 3, plugins: 50, burst: 10_000 }
        }
    }
}

/// The scenarios this harness implements, in the order they run.
const SCENARIOS: &[&str] = &[
    "embedded-1",
    "embedded-durable",
    "reuse",
    "fanout-10",
    "keyed",
    "nats-core",
    "jetstream",
    "reload",
    "cold-start",
    "memory",
    "crash",
    "pipeline-5",
    "outbound",
    // Last: it installs the OpenTelemetry layer for the rest of the process.
    "tracing",
];
/// Scenarios of BENCH.md not measured here yet.
const NOT_YET: &[&str] = &[];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().is_some_and(|a| a == "--crash-child") {
        return scenarios::crash::child(&args[1..]);
    }
    let mut quick = false;
    let mut wanted = Vec::new();
    let parts: Vec<&str> = scenarios::PARTS.iter().map(|(name, ..)| *name).collect();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => quick = true,
            "-h" | "--help" => {
                println!(
                    "usage: plugbus-bench [--quick] [SCENARIO...]\nscenarios: {}\nparts, for a profiler: {}",
                    SCENARIOS.join(" "),
                    parts.join(" ")
                );
                return Ok(());
            }
            s if SCENARIOS.contains(&s) || parts.contains(&s) => wanted.push(s.to_string()),
            s if NOT_YET.contains(&s) => anyhow::bail!("scenario {s} is not implemented by this harness yet"),
            s => anyhow::bail!("unknown argument {s:?}; scenarios: {}", SCENARIOS.join(" ")),
        }
    }
    if wanted.is_empty() {
        wanted = SCENARIOS.iter().map(|s| s.to_string()).collect();
    }
    let mode = Mode::new(quick);
    let handler = components::handler_wasm()?;
    let runtime = plugbus::runtime::build()?;
    let mut out = report::Report::open(&components::target_dir(), mode)?;
    out.header();
    for id in wanted {
        let mut runs = Vec::new();
        for _ in 0..mode.runs {
            report::reset_peak_rss();
            // A task on a worker like any publisher of a host (`block_on` would drive it on
            // this thread: a third thread, woken across cores for every output).
            let (id, handler) = (id.clone(), handler.clone());
            let row: Row =
                runtime.block_on(runtime.spawn(async move { scenarios::run(&id, mode, &handler).await }))??;
            runs.push(row);
        }
        out.row(&Row::median(runs))?;
    }
    println!("\nresults appended to {}", out.path().display());
    Ok(())
}

/// The allocator of the `plugbus` binary (host/src/main.rs), so the figures are the host's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
