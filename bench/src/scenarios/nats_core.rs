//! `nats-core`: two hosts in this process on one `nats-server` (started by the bench), each
//! running the bench handler, subscribed through core NATS in the plugin's queue group, so
//! each event is handled by one of them. A raw `async-nats` producer keeps 64 events
//! outstanding on `bench.in.e1` (plain messages, the 1 KiB JSON of `driver::payload`); a raw
//! subscriber on `bench.out.e1` (another connection) completes each. Latency = publish →
//! output observed, one broker hop in and one out. Before the loop, probes on `bench.in.probe`
//! are published until both hosts have handled one (see `every_host_serving`).
//!
//! `reuse_instances` is the same two hosts with `instance = "reuse"` (what the sandbox's fresh
//! instance costs on this path).
//!
//! Baseline, same run, same server, same payload: the **broker floor**, a raw publisher and a
//! raw subscriber (two connections) that only counts, in the same closed loop (64
//! outstanding, one broker hop); ratio = plugbus / floor. Also in `extra`:
//! - `native_relay_floor`: the handler's logic as plain Rust on two raw connections in one
//!   queue group (two "hosts"), each republishing its output: the same two hops as plugbus,
//!   without the sandbox, the router or CloudEvents.
//! - `sandboxed_relay`: the native relay running the bench handler through `Plugin::handle` (a
//!   fresh instance per message) instead of plain Rust: the broker and the sandbox, nothing of
//!   plugbus's own machinery. `sandboxed_relay_vs_native_relay` is the most any host that
//!   sandboxes the handler can reach against the native relay; `vs_sandboxed_relay` is what
//!   plugbus's machinery (router, dispatch, CloudEvents, queues) costs on this path.
//! - `cloudevents_relay`: the native relay speaking CloudEvents as plugbus does on NATS (each
//!   message read as an event by `wire::event_of`, its output made an event by
//!   `Output::into_event` and published in binary mode by `wire::message_of`), still in plain
//!   Rust: `cloudevents_relay_vs_native_relay` is what the wire format costs the relay and its
//!   observer (async-nats keeps headers in a SipHash map, built by the publisher and again by
//!   every subscriber).
//! - `flat_out_floor`: the raw publisher publishing bursts of 10,000 flat out for `measure`,
//!   each burst counted whole by the raw subscriber before the next (so at most one burst is
//!   buffered); `flat_out_dropped` = published − counted (a subscriber falling behind loses
//!   core messages).

use super::WINDOW;
use super::embedded::{relay_output, sandboxed};
use crate::Mode;
use crate::components::BenchHost;
use crate::driver::{self, Load};
use crate::nats::{self, Forward, NatsServer};
use crate::report::Row;
use anyhow::Context;
use futures::StreamExt;
use plugbus::Event;
use plugbus::backend::nats::wire as nats_wire;
use plugbus::sandbox::{InstanceMode, Limits, Plugin};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

const HOSTS: usize = 2;

pub async fn run(mode: Mode, handler: &[u8]) -> anyhow::Result<Row> {
    let server = NatsServer::start().await?;
    // The target's two sides (plugbus and the native relay) take turns in short slices (see
    // `Mode::slice`).
    // The sandboxed relay is the native relay running the handler in the sandbox: the broker's
    // and the sandbox's cost together, with nothing of plugbus's own machinery.
    let plugin = sandboxed(handler, Limits::default()).await?;
    let (mut hosts, mut native, mut sandboxed_relay, mut cloudevents_relay) = Default::default();
    let slice = mode.slice();
    for _ in 0..mode.slices() {
        Hosts::merge(&mut hosts, hosts_run(slice, handler, &server, InstanceMode::Fresh).await?);
        let relay = native_relay_run(slice, &server, None, Wire::Plain).await;
        Load::merge(&mut native, relay.context("the native relay floor")?);
        let relay = native_relay_run(slice, &server, Some(plugin.clone()), Wire::Plain).await;
        Load::merge(&mut sandboxed_relay, relay.context("the sandboxed relay")?);
        let relay = native_relay_run(slice, &server, None, Wire::CloudEvents).await;
        Load::merge(&mut cloudevents_relay, relay.context("the CloudEvents relay")?);
    }
    let Hosts { load, handled, retried, dead_lettered } = hosts;
    let reuse = hosts_run(mode, handler, &server, InstanceMode::Reuse).await?.load;
    let floor = floor_run(mode, &server).await.context("the broker floor")?;
    let (flat, flat_dropped) = flat_out(mode, &server).await.context("the flat-out floor")?;
    let (rate, total) = (load.rate(), handled.iter().sum::<u64>().max(1));
    let mut extra = BTreeMap::from([
        ("reuse_instances".into(), reuse.rate()),
        ("reuse_vs_floor".into(), reuse.rate() / floor.rate()),
        ("native_relay_floor".into(), native.rate()),
        ("native_relay_vs_floor".into(), native.rate() / floor.rate()),
        ("native_relay_p50_us".into(), native.percentile_us(50)),
        ("vs_native_relay".into(), rate / native.rate()),
        ("sandboxed_relay".into(), sandboxed_relay.rate()),
        ("sandboxed_relay_vs_native_relay".into(), sandboxed_relay.rate() / native.rate()),
        ("vs_sandboxed_relay".into(), rate / sandboxed_relay.rate()),
        ("cloudevents_relay".into(), cloudevents_relay.rate()),
        ("cloudevents_relay_vs_native_relay".into(), cloudevents_relay.rate() / native.rate()),
        ("native_relay_cpu_us_per_event".into(), native.cpu_us_per_event()),
        ("cloudevents_relay_cpu_us_per_event".into(), cloudevents_relay.cpu_us_per_event()),
        ("floor_p50_us".into(), floor.percentile_us(50)),
        ("floor_p99_us".into(), floor.percentile_us(99)),
        ("flat_out_floor".into(), flat),
        ("flat_out_dropped".into(), flat_dropped as f64),
        ("retried".into(), retried as f64),
        ("dead_lettered".into(), dead_lettered as f64),
    ]);
    for (i, h) in handled.iter().enumerate() {
        extra.insert(format!("host{i}_share"), *h as f64 / total as f64);
    }
    Ok(Row {
        events_per_s: Some(rate),
        p50_us: Some(load.percentile_us(50)),
        p99_us: Some(load.percentile_us(99)),
        baseline: "broker floor: raw pub → raw sub".into(),
        baseline_value: Some(floor.rate()),
        ratio: Some(rate / floor.rate()),
        extra,
        notes: format!("{HOSTS} hosts, 1 queue group; floor = same closed loop, 1 hop, no handler"),
        ..Row::default()
    })
}

/// One side of nats-core alone, for a profiler: `host` (the two hosts), `sandboxed-relay`,
/// `native-relay` or `cloudevents-relay`, on a server of its own (see `PARTS`).
pub async fn run_part(mode: Mode, handler: &[u8], part: &str) -> anyhow::Result<Load> {
    let server = NatsServer::start().await?;
    Ok(match part {
        "host" => hosts_run(mode, handler, &server, InstanceMode::Fresh).await?.load,
        "sandboxed-relay" => {
            let plugin = sandboxed(handler, Limits::default()).await?;
            native_relay_run(mode, &server, Some(plugin), Wire::Plain).await?
        }
        "native-relay" => native_relay_run(mode, &server, None, Wire::Plain).await?,
        "cloudevents-relay" => native_relay_run(mode, &server, None, Wire::CloudEvents).await?,
        other => anyhow::bail!("no part {other} of nats-core"),
    })
}

/// What the two-host closed loop saw.
#[derive(Default)]
struct Hosts {
    load: Load,
    /// Events each host handled.
    handled: Vec<u64>,
    retried: u64,
    dead_lettered: u64,
}

impl Hosts {
    /// Adds another slice of the same run.
    fn merge(&mut self, slice: Hosts) {
        self.load.merge(slice.load);
        self.handled.resize(self.handled.len().max(slice.handled.len()), 0);
        for (sum, n) in self.handled.iter_mut().zip(slice.handled) {
            *sum += n;
        }
        self.retried += slice.retried;
        self.dead_lettered += slice.dead_lettered;
    }
}

async fn hosts_run(mode: Mode, handler: &[u8], server: &NatsServer, instance: InstanceMode) -> anyhow::Result<Hosts> {
    let mut hosts = Vec::new();
    for _ in 0..HOSTS {
        let bench = BenchHost::start(handler, 1, |c| {
            c.limits.instance = instance;
            c.nats.url = Some(server.url());
            c.flow.queue = c.flow.queue.max(2 * WINDOW);
        })
        .await?;
        anyhow::ensure!(bench.host.transport().name() == "nats", "the host is not on NATS");
        hosts.push(bench);
    }
    let (producer, observer) = (server.client().await?, server.client().await?);
    every_host_serving(&producer, &hosts).await?;
    let mut outputs = nats::forward(&observer, "bench.out.e1", Forward::Whole).await?;
    let make = |seq| Event::new("bench.in.e1", driver::payload(seq, ""));
    let producer = &producer;
    let publish = |ev: Event| async move { Ok(producer.publish(ev.subject, ev.data).await?) };
    let load = driver::closed_loop(mode, WINDOW, 1, &mut outputs, make, publish, |_| {}).await.with_context(|| {
        let counters: Vec<_> = hosts.iter().flat_map(|h| h.host.router().plugins()).map(|p| p.counters).collect();
        format!("{HOSTS} hosts on NATS core; their counters: {counters:?}")
    })?;
    let run = Hosts {
        load,
        handled: hosts.iter().map(|h| h.counter("ok")).collect(),
        retried: hosts.iter().map(|h| h.counter("retried")).sum(),
        dead_lettered: hosts.iter().map(|h| h.counter("dead_lettered")).sum(),
    };
    for bench in hosts {
        bench.stop().await?;
    }
    Ok(run)
}

/// Publishes probes on `bench.in.probe` (outputs on `bench.out.probe`, which the loop does not
/// observe) until every host has handled one: `Host::start` returning does not mean the server
/// has registered the host's queue subscription yet (the transport only flushes its socket),
/// and a core message published before that is lost, which would stall the closed loop.
async fn every_host_serving(producer: &async_nats::Client, hosts: &[BenchHost]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while hosts.iter().any(|h| h.counter("ok") == 0) {
        anyhow::ensure!(Instant::now() < deadline, "the hosts did not all serve a probe within 10 s");
        producer.publish("bench.in.probe", driver::payload(0, "probe").into()).await?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Raw publisher → raw subscriber that only counts (passes `seq` on), 64 outstanding.
async fn floor_run(mode: Mode, server: &NatsServer) -> anyhow::Result<Load> {
    let (producer, counter) = (server.client().await?, server.client().await?);
    let mut delivered = nats::forward(&counter, "floor.in.>", Forward::Seq).await?;
    let make = |seq| Event::new("floor.in.e1", driver::payload(seq, ""));
    let producer = &producer;
    let publish = |ev: Event| async move { Ok(producer.publish(ev.subject, ev.data).await?) };
    driver::closed_loop(mode, WINDOW, 1, &mut delivered, make, publish, |_| {}).await
}

/// How a relay reads and writes its messages.
#[derive(Clone, Copy)]
enum Wire {
    /// The payload alone, as it came; the output's data alone, no headers.
    Plain,
    /// CloudEvents as plugbus's NATS transport reads and writes them (binary mode).
    CloudEvents,
}

/// The handler's logic on two raw connections sharing a queue group, each message parsed and
/// its output published, as the two hosts do: in plain Rust, or (`sandboxed`) the bench handler
/// through `Plugin::handle`, a fresh instance per message as the hosts run it.
async fn native_relay_run(
    mode: Mode,
    server: &NatsServer,
    sandboxed: Option<Arc<Plugin>>,
    wire: Wire,
) -> anyhow::Result<Load> {
    let mut workers = Vec::new();
    for _ in 0..HOSTS {
        let client = server.client().await?;
        let mut sub = client.queue_subscribe("relay.in.>".to_string(), "relay".to_string()).await?;
        nats::registered(&client).await?;
        let sandboxed = sandboxed.clone();
        workers.push(tokio::spawn(async move {
            while let Some(msg) = sub.next().await {
                match wire {
                    Wire::Plain => {
                        let ev = Event::new(msg.subject.as_str(), msg.payload);
                        let out = relay_output(sandboxed.as_deref(), &ev).await?;
                        client.publish(format!("relay.{}", out.subject), out.data).await?;
                    }
                    Wire::CloudEvents => {
                        let ev = nats_wire::event_of(&msg.subject, msg.headers.as_ref(), msg.payload, None)
                            .map_err(|e| anyhow::anyhow!("{e}"))?;
                        let out = relay_output(sandboxed.as_deref(), &ev).await?.into_event(&ev, "relay", 0);
                        let (headers, payload) = nats_wire::message_of(&out, nats_wire::Origin::Host);
                        client.publish_with_headers(format!("relay.{}", out.subject), headers, payload).await?;
                    }
                }
            }
            anyhow::Ok(())
        }));
    }
    let (producer, observer) = (server.client().await?, server.client().await?);
    let mut outputs = nats::forward(&observer, "relay.bench.out.>", Forward::Whole).await?;
    let make = |seq| Event::new("relay.in.e1", driver::payload(seq, ""));
    let producer = &producer;
    let publish = |ev: Event| async move { Ok(producer.publish(ev.subject, ev.data).await?) };
    let load = driver::closed_loop(mode, WINDOW, 1, &mut outputs, make, publish, |_| {}).await;
    for w in workers {
        w.abort();
    }
    load
}

/// Messages per burst of the flat-out floor (bounds what is buffered: about 10 MiB).
const BURST: u64 = 10_000;

/// Publishes bursts of `BURST` messages flat out, each counted whole by a raw subscriber
/// before the next, for `measure`; (rate, messages never counted).
async fn flat_out(mode: Mode, server: &NatsServer) -> anyhow::Result<(f64, u64)> {
    let (producer, counter) = (server.client().await?, server.client().await?);
    let mut sub = counter.subscribe("flat.>".to_string()).await?;
    nats::registered(&counter).await?;
    let (count, target, done) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(Notify::new()));
    let task = {
        let (count, target, done) = (count.clone(), target.clone(), done.clone());
        tokio::spawn(async move {
            let mut n = 0;
            while sub.next().await.is_some() {
                n += 1;
                count.store(n, Ordering::Relaxed);
                if n >= target.load(Ordering::Relaxed) {
                    done.notify_one();
                }
            }
        })
    };
    let payload: bytes::Bytes = driver::payload(0, "").into();
    let started = Instant::now();
    let (mut sent, mut lost) = (0, 0);
    while started.elapsed() < mode.measure {
        let want = sent + BURST - lost;
        target.store(want, Ordering::Relaxed);
        for _ in 0..BURST {
            producer.publish("flat.e1", payload.clone()).await?;
        }
        sent += BURST;
        while count.load(Ordering::Relaxed) < want {
            // Messages of the burst were dropped (a slow consumer): given up after 2 s.
            if tokio::time::timeout(Duration::from_secs(2), done.notified()).await.is_err() {
                lost = sent - count.load(Ordering::Relaxed);
                break;
            }
        }
    }
    let elapsed = started.elapsed();
    task.abort();
    let counted = count.load(Ordering::Relaxed);
    Ok((counted as f64 / elapsed.as_secs_f64(), sent.saturating_sub(counted)))
}
