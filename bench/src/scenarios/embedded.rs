//! `embedded-1`: one plugin on the embedded bus, 1 KiB JSON events, a fresh instance per
//! event; the handler parses the JSON and publishes one output. 64 events outstanding, so the
//! p50/p99 include queueing (Little's law: 64 / rate); `idle_p50_us`/`idle_p99_us` are the
//! same path with one event outstanding. `plugbus_1thread` is the same host with everything
//! (host tasks and driver) on one current-thread runtime: the one-core figure, compared with
//! the 1-task floor (`plugbus_1thread_vs_floor_1task`, target ≥ 0.95). The 2-core figure
//! against the 1-task floor is `plugbus_vs_floor_1task` (target ≥ 1.7); `plugbus_vs_1thread`
//! is what the second core adds to the host, `floor_2tasks_vs_1task` what it adds to wasmtime
//! alone on the same machine. `cpu_us_per_event*` are each side's CPU per event (see
//! `driver::Load::cpu_us_per_event`).
//!
//! Baselines, same run, same event, same handler logic:
//! - wasm floor: `plugbus::sandbox` without router or bus: `Plugin::handle` (instantiate + one
//!   call) in a loop, 1 task and 2 tasks. The ratio is plugbus / the 2-task floor (the host
//!   also has both cores).
//! - bare wasmtime: our own `Engine` (pooling, epoch interruption, as `sandbox/engine.rs`) and
//!   linker; per event a `Store`, `InstancePre::instantiate_async` and `call_handle`: what
//!   the `Plugin` wrapper itself adds. Also measured with a tuned pool (`bare_tuned_*`:
//!   `pagemap_scan` + `linear_memory_keep_resident` + `table_keep_resident`, resetting slots
//!   with memset instead of `madvise`), a candidate engine config for the host.
//! - native floor: the same logic as a plain Rust function behind the same `EmbeddedBus`
//!   (subscribe, a task per delivery, publish the output): what the sandbox costs.

use super::{HostRun, WINDOW, host_run};
use crate::Mode;
use crate::driver::{self, Load};
use crate::report::Row;
use anyhow::Context;
use plugbus::Event;
use plugbus::backend::embedded::bus::EmbeddedBus;
use plugbus::event::Output;
use plugbus::kv::MemoryKv;
use plugbus::sandbox::bindings::{self, types as wit};
use plugbus::sandbox::state::{HostState, PluginCtx};
use plugbus::sandbox::{InstanceMode, Limits, Plugin, PluginSettings, Sandbox, SandboxSettings};
use plugbus::subject::PatternSet;
use plugbus::transport::{SubscriptionSpec, Transport};
use std::collections::BTreeMap;
use std::sync::Arc;
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

pub async fn run(mode: Mode, handler: &[u8]) -> anyhow::Result<Row> {
    // The headline ratios' sides take turns in short slices (see `Mode::slice`).
    let (mut run, mut one_core, mut floor1, mut floor2) = Default::default();
    let slice = mode.slice();
    for _ in 0..mode.slices() {
        HostRun::merge(&mut run, host_run(slice, handler, 1, WINDOW, None, |_| {}).await?);
        Load::merge(&mut floor2, sandbox_floor(slice, handler, 2, Limits::default()).await?);
        let one =
            on_one_thread(
                handler,
                move |h| async move { Ok(host_run(slice, &h, 1, WINDOW, None, |_| {}).await?.load) },
            );
        Load::merge(&mut one_core, one.await?);
        Load::merge(&mut floor1, sandbox_floor(slice, handler, 1, Limits::default()).await?);
    }
    let HostRun { load, retried, dead_lettered, .. } = run;
    let idle = host_run(mode, handler, 1, 1, None, |_| {}).await?.load;
    let bare = Arc::new(Bare::new(handler, false, true)?);
    let bare1 = bare_floor(mode, &bare, 1).await?;
    let bare2 = bare_floor(mode, &bare, 2).await?;
    drop(bare);
    let tuned = Arc::new(Bare::new(handler, true, true)?);
    let tuned1 = bare_floor(mode, &tuned, 1).await?;
    let tuned2 = bare_floor(mode, &tuned, 2).await?;
    drop(tuned);
    // The same without epoch interruption: what the wall-clock deadline costs per event.
    let no_epoch = Arc::new(Bare::new(handler, true, false)?);
    let no_epoch1 = bare_floor(mode, &no_epoch, 1).await?;
    drop(no_epoch);
    let native = native_floor(mode).await?;
    let rate = load.rate();
    Ok(Row {
        events_per_s: Some(rate),
        p50_us: Some(load.percentile_us(50)),
        p99_us: Some(load.percentile_us(99)),
        baseline: "wasm floor: Plugin::handle, 2 tasks".into(),
        baseline_value: Some(floor2.rate()),
        ratio: Some(rate / floor2.rate()),
        extra: BTreeMap::from([
            ("idle_p50_us".into(), idle.percentile_us(50)),
            ("idle_p99_us".into(), idle.percentile_us(99)),
            ("plugbus_1thread".into(), one_core.rate()),
            ("plugbus_1thread_vs_floor_1task".into(), one_core.rate() / floor1.rate()),
            ("plugbus_vs_1thread".into(), rate / one_core.rate()),
            // The two-core target (≥ 1.7): both cores against the 1-task floor.
            ("plugbus_vs_floor_1task".into(), rate / floor1.rate()),
            // CPU µs per event of the whole process, each side in its own slices: what a second
            // core adds per event (host and floor), and what the host adds to the floor's.
            ("cpu_us_per_event".into(), load.cpu_us_per_event()),
            ("cpu_us_per_event_1thread".into(), one_core.cpu_us_per_event()),
            ("floor_cpu_us_per_event_1task".into(), floor1.cpu_us_per_event()),
            ("floor_cpu_us_per_event_2tasks".into(), floor2.cpu_us_per_event()),
            // How far wasmtime itself scales from one core to two on this machine.
            ("floor_2tasks_vs_1task".into(), floor2.rate() / floor1.rate()),
            ("wasm_floor_1task".into(), floor1.rate()),
            ("wasm_floor_1task_p50_us".into(), floor1.percentile_us(50)),
            ("wasm_floor_2tasks".into(), floor2.rate()),
            ("bare_wasmtime_1task".into(), bare1.rate()),
            ("bare_wasmtime_2tasks".into(), bare2.rate()),
            ("bare_tuned_1task".into(), tuned1.rate()),
            ("bare_tuned_2tasks".into(), tuned2.rate()),
            ("bare_tuned_no_epoch_1task".into(), no_epoch1.rate()),
            ("native_floor".into(), native.rate()),
            ("native_p50_us".into(), native.percentile_us(50)),
            ("vs_native".into(), rate / native.rate()),
            ("retried".into(), retried as f64),
            ("dead_lettered".into(), dead_lettered as f64),
        ]),
        ..Row::default()
    })
}

/// One side of embedded-1 alone, for a profiler (`perf record … plugbus-bench
/// embedded-1-host`): `host` on both cores, `host-1thread` on one thread, `host-2x1thread` two
/// one-thread hosts side by side (what a host sharing nothing between its cores would reach),
/// `host-2hosts` two whole hosts (each with its own closed loop) as tasks of the one two-worker
/// runtime (what the work-stealing runtime costs, against `host-2x1thread`; what one host shares
/// between two producers, against `host-2producers`),
/// `floor` and `floor-1task` the wasm floor on 2 tasks and on 1. Nothing else runs in the process
/// meanwhile (see `PARTS`).
pub async fn run_part(mode: Mode, handler: &[u8], part: &str) -> anyhow::Result<Load> {
    Ok(match part {
        "host" => host_run(mode, handler, 1, WINDOW, None, |_| {}).await?.load,
        "host-1thread" => {
            on_one_thread(handler, move |h| async move { Ok(host_run(mode, &h, 1, WINDOW, None, |_| {}).await?.load) })
                .await?
        }
        "host-2x1thread" => {
            // Thread-per-core's ceiling in one process: two whole hosts (each its own engine, bus,
            // router and driver) on a current-thread runtime each, sharing nothing but the process.
            let one = || {
                on_one_thread(
                    handler,
                    move |h| async move { Ok(host_run(mode, &h, 1, WINDOW, None, |_| {}).await?.load) },
                )
            };
            let (a, b) = tokio::join!(one(), one());
            Load::side_by_side(a?, b?)
        }
        "host-2producers" => two_producers(mode, handler, WINDOW, InstanceMode::Fresh).await?,
        "host-2hosts" => {
            // Spawned: each host and its loop may take a worker of its own.
            let one = || {
                let h = handler.to_vec();
                tokio::spawn(async move { anyhow::Ok(host_run(mode, &h, 1, WINDOW, None, |_| {}).await?.load) })
            };
            let (a, b) = tokio::join!(one(), one());
            Load::side_by_side(a??, b??)
        }
        "floor" => sandbox_floor(mode, handler, 2, Limits::default()).await?,
        "floor-1task" => sandbox_floor(mode, handler, 1, Limits::default()).await?,
        other => anyhow::bail!("no part {other} of embedded-1"),
    })
}

/// One two-core host fed by two closed loops, each in a task of its own (so each may keep a
/// core) on a subject of its own (`bench.in.a`, `bench.in.b`; the handler answers on
/// `bench.out.<last token>`), each with half of `window`: ingress on both cores, as concurrent
/// HTTP clients are, against `host`'s one producer. `instance` is the plugin's instance mode
/// (reuse's part runs it with `Reuse`).
pub(super) async fn two_producers(
    mode: Mode,
    handler: &[u8],
    window: usize,
    instance: InstanceMode,
) -> anyhow::Result<Load> {
    let bench = Arc::new(
        crate::components::BenchHost::start(handler, 1, |c| {
            c.limits.instance = instance;
            c.flow.queue = c.flow.queue.max(2 * window);
        })
        .await?,
    );
    let one = |token: &'static str| {
        let bench = bench.clone();
        tokio::spawn(async move {
            let mut outputs = bench.host.observe(&[&format!("bench.out.{token}")]).await?;
            let subject = format!("bench.in.{token}");
            let make = |seq| Event::new(subject.clone(), driver::payload(seq, ""));
            let host = &bench.host;
            let publish = |ev| async move { host.publish(ev).await };
            driver::closed_loop(mode, window / 2, 1, &mut outputs, make, publish, |_| {}).await
        })
    };
    let (a, b) = tokio::join!(one("a"), one("b"));
    let load = Load::side_by_side(a??, b??);
    Arc::into_inner(bench).context("the producers are done")?.stop().await?;
    Ok(load)
}

/// Runs `f(handler)` on a current-thread runtime of its own thread: the host, its tasks and the
/// driver on one core's worth of threads (the epoch ticker aside), for the one-core figure.
pub(super) async fn on_one_thread<F, Fut>(handler: &[u8], f: F) -> anyhow::Result<Load>
where
    F: FnOnce(Vec<u8>) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<Load>>,
{
    let handler = handler.to_vec();
    let thread = std::thread::Builder::new()
        .name("one-thread-host".into())
        .spawn(move || tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f(handler)))?;
    tokio::task::spawn_blocking(move || thread.join().map_err(|_| anyhow::anyhow!("the one-thread run panicked"))?)
        .await?
}

pub(super) fn input(seq: u64) -> Event {
    Event::new("bench.in.e1", driver::payload(seq, ""))
}

/// `Plugin::handle` in a loop: the public sandbox API, no router, no bus. Each output is parsed
/// and matched to its event as the closed loop does.
pub(super) async fn sandbox_floor(mode: Mode, handler: &[u8], tasks: usize, limits: Limits) -> anyhow::Result<Load> {
    let plugin = sandboxed(handler, limits).await?;
    driver::direct_loop(mode, tasks, move |seq| {
        let plugin = plugin.clone();
        async move {
            let attempt = plugin.handle(&input(seq), 1).await;
            attempt.result.map_err(|f| anyhow::anyhow!("the handler failed: {f}"))?;
            anyhow::ensure!(attempt.outputs.len() == 1, "expected 1 output, got {}", attempt.outputs.len());
            // What the closed loop does with every output it sees (it finds the event by `seq`),
            // so the harness's own work is on both sides of the ratio.
            let out: driver::Out = serde_json::from_slice(&attempt.outputs[0].data)?;
            anyhow::ensure!(out.seq == seq, "output of event {} for event {seq}", out.seq);
            Ok(())
        }
    })
    .await
}

/// The bench handler loaded through the public sandbox API (its own engine, default settings):
/// what the floors and the sandboxed relays run, with no router and no bus.
pub(super) async fn sandboxed(handler: &[u8], limits: Limits) -> anyhow::Result<Arc<Plugin>> {
    let sandbox = Sandbox::new(SandboxSettings::default())?;
    let settings = |_: &_| PluginSettings {
        limits,
        config: Default::default(),
        kv: Arc::new(MemoryKv::new()),
        allowed_outbound: Vec::new(),
    };
    Ok(Arc::new(sandbox.load(handler, settings).await?))
}

/// The relays' handler step: the handler's logic in plain Rust, or (`sandboxed`) the bench
/// handler through `Plugin::handle`, a fresh instance per event as the host runs it.
pub(super) async fn relay_output(sandboxed: Option<&Plugin>, ev: &Event) -> anyhow::Result<Output> {
    let Some(plugin) = sandboxed else { return native_handler(ev) };
    let mut attempt = plugin.handle(ev, 1).await;
    attempt.result.map_err(|f| anyhow::anyhow!("the handler failed: {f}"))?;
    attempt.outputs.pop().context("the handler published nothing")
}

/// An engine set up as `sandbox/engine.rs` sets it up with `SandboxSettings::default()`:
/// pooling allocator, epoch interruption. `tuned` resets pool slots with memset (only the
/// pages dirtied, found with `pagemap_scan`) instead of `madvise`, which on this VM costs a
/// TLB-shootdown IPI per instance.
pub fn engine(tuned: bool, epochs: bool) -> anyhow::Result<Engine> {
    let s = SandboxSettings::default();
    let n = s.max_instances;
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(n)
        .total_core_instances(n * 16)
        .max_core_instances_per_component(64)
        .total_memories(n * 2)
        .max_memories_per_component(4)
        .total_tables(n * 8)
        .total_stacks(n)
        .max_memory_size(s.max_memory_mib as usize * 1024 * 1024);
    if tuned {
        pool.pagemap_scan(wasmtime::Enabled::Auto).linear_memory_keep_resident(4 << 20).table_keep_resident(64 << 10);
    }
    let mut config = wasmtime::Config::new();
    config
        .epoch_interruption(epochs)
        .max_wasm_stack(s.max_stack_bytes)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Ok(Engine::new(&config)?)
}

/// Wasmtime with nothing of plugbus but its host state (the WASI context and the imports).
struct Bare {
    engine: Engine,
    epochs: bool,
    pre: bindings::PluginPre<HostState>,
    ctx: Arc<PluginCtx>,
}

impl Bare {
    fn new(handler: &[u8], tuned: bool, epochs: bool) -> anyhow::Result<Self> {
        let engine = engine(tuned, epochs)?;
        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        bindings::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)?;
        let component = Component::new(&engine, handler)?;
        let pre = bindings::PluginPre::new(linker.instantiate_pre(&component)?)?;
        let ctx = Arc::new(PluginCtx {
            name: "bench-plugin-000".into(),
            limits: Limits::default(),
            publishes: PatternSet::parse(&["bench.out.>"])?,
            config: Default::default(),
            kv: Arc::new(MemoryKv::new()),
            outbound: Arc::new(plugbus::sandbox::outbound::OutboundPolicy::none()),
            requester: Arc::new(plugbus::rpc::NoRequests),
            runnable: Default::default(),
            share: plugbus::sandbox::cpu_share::CpuShares::new(1).plugin("bench-plugin-000"),
        });
        Ok(Self { engine, epochs, pre, ctx })
    }

    async fn handle(&self, ev: &Event) -> anyhow::Result<()> {
        let mut store = Store::new(&self.engine, HostState::new(self.ctx.clone(), &ev.id, &ev.subject));
        store.limiter(|s| &mut s.limiter);
        // No ticker advances this engine's epoch: the deadline is never reached, but the
        // checks compiled into the code run as in the host.
        if self.epochs {
            store.set_epoch_deadline(1 << 40);
        }
        let instance = self.pre.instantiate_async(&mut store).await?;
        let headers: Vec<(&str, &str)> = ev.extensions.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let wit_event = wit::EventParam {
            id: &ev.id,
            source: &ev.source,
            type_: &ev.ty,
            subject: &ev.subject,
            time: &ev.time,
            datacontenttype: ev.datacontenttype.as_deref(),
            extensions: &headers,
            data: &ev.data,
            attempt: 1,
            reply_to: None,
        };
        let result = instance.plugbus_handler_handler().call_handle(&mut store, wit_event).await?;
        result.map_err(|e| anyhow::anyhow!("the handler failed: {e:?}"))?;
        anyhow::ensure!(store.data().outputs.len() == 1, "expected 1 output");
        Ok(())
    }
}

async fn bare_floor(mode: Mode, bare: &Arc<Bare>, tasks: usize) -> anyhow::Result<Load> {
    let bare = bare.clone();
    driver::direct_loop(mode, tasks, move |seq| {
        let bare = bare.clone();
        async move { bare.handle(&input(seq)).await }
    })
    .await
}

/// The handler's logic in Rust.
pub(super) fn native_handler(ev: &Event) -> anyhow::Result<Output> {
    let input: serde_json::Value = serde_json::from_slice(&ev.data)?;
    let token = ev.subject.rsplit('.').next().unwrap_or("none");
    let fields = input.as_object().map_or(0, |o| o.len());
    let out = serde_json::json!({ "seq": input["seq"], "key": input["key"], "fields": fields });
    Ok(Output {
        subject: format!("bench.out.{token}"),
        data: serde_json::to_vec(&out)?.into(),
        headers: vec![("datacontenttype".into(), "application/json".into())],
    })
}

/// `native_handler` behind the embedded bus, a task per delivery as the router does.
async fn native_floor(mode: Mode) -> anyhow::Result<Load> {
    let bus = EmbeddedBus::new();
    let spec = SubscriptionSpec {
        plugin: "native".into(),
        patterns: vec!["bench.in.>".into()],
        group: "native".into(),
        capacity: 1024,
        buffer_bytes: 64 << 20,
        backlog_bytes: 1 << 30,
        durable: None,
    };
    let mut sub = bus.subscribe(spec).await?;
    let mut outputs = bus.observe(vec!["bench.out.>".into()], 1 << 16).await?.events;
    let worker = {
        let bus = bus.clone();
        tokio::spawn(async move {
            while let Some(delivery) = sub.deliveries.recv().await {
                let bus = bus.clone();
                tokio::spawn(async move {
                    let ev = &delivery.event;
                    let out = native_handler(ev).expect("the bench payload is JSON");
                    bus.publish_output(Arc::new(out.into_event(ev, "native", 0))).await.expect("publishing the output");
                });
            }
        })
    };
    let bus = &bus;
    let publish = |ev| async move { bus.publish(ev).await.context("publishing") };
    let load = driver::closed_loop(mode, WINDOW, 1, &mut outputs, input, publish, |_| {}).await;
    worker.abort();
    load
}
