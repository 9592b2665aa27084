//! `jetstream`: one host on a `nats-server` started by the bench, the bench plugin made durable
//! (`[plugins.<name>] durable = true`): its deliveries come from a durable pull consumer
//! (`plugbus_<name>`) on stream `BENCH` (`bench.in.>`), acked after the handler returned Ok and
//! its output was acknowledged by stream `BENCHOUT` (`bench.out.>`; one JetStream publish per
//! output, with `Nats-Msg-Id`). A raw producer publishes each input with JetStream publish and
//! a `Nats-Msg-Id` (acks awaited off the loop, so publishes are pipelined), keeping 64 events
//! outstanding; a raw core subscriber on `bench.out.>` completes each. Latency = publish →
//! output observed. `acked_per_s` is the consumer's acks over the measured window (from
//! consumer info at its start and end).
//!
//! At the end, once the consumer has nothing pending or unacked, `BENCHOUT` is read whole and
//! its outputs counted per input: `out_duplicates` (outputs beyond one per input) and
//! `out_missing` (inputs published but without an output) must be 0, `out_messages` must equal
//! `handled` and `published`; `unacked` is what the consumer still held after 20 s.
//!
//! `reuse_instances` is the same run with `instance = "reuse"` on a fresh server (what the
//! sandbox's fresh instance costs on this path); `reuse_clean` = 1 when it, too, lost,
//! duplicated and left unacked nothing.
//!
//! Baseline, same run, same server: the **JetStream broker floor**, a raw JetStream publisher
//! (same pipelining, same `Nats-Msg-Id`) and a raw durable pull consumer that acks each message
//! and passes it on, no handler, in the same closed loop; ratio = plugbus / floor. Also
//! `native_relay_floor`: the same consumer running the handler's logic as plain Rust and
//! publishing its output to a stream (ack awaited) before acking the input: everything plugbus
//! does on JetStream but the sandbox, the router and CloudEvents. `sandboxed_relay` is that relay
//! running the bench handler through `Plugin::handle` (a fresh instance per message): the broker
//! and the sandbox, nothing of plugbus's own machinery. `sandboxed_relay_vs_native_relay` is the
//! most any host that sandboxes the handler can reach against the native relay;
//! `vs_sandboxed_relay` is what plugbus's machinery costs on this path.

use super::WINDOW;
use super::embedded::{relay_output, sandboxed};
use crate::Mode;
use crate::components::{self, BenchHost};
use crate::driver::{self, Load, Out};
use crate::nats::{self, Forward, NatsServer};
use crate::report::Row;
use anyhow::Context;
use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use plugbus::Event;
use plugbus::backend::nats::StreamDef;
use plugbus::sandbox::{InstanceMode, Limits, Plugin};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The duplicate window of the floor's streams (the host's default).
const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

pub async fn run(mode: Mode, handler: &[u8]) -> anyhow::Result<Row> {
    // The target's two sides (plugbus and the native relay) take turns in short slices (see
    // `Mode::slice`), each plugbus slice on a server of its own (its streams start empty, so
    // what they hold afterwards is that slice's).
    // The sandboxed relay is the native relay running the handler in the sandbox: the broker's
    // and the sandbox's cost together, with nothing of plugbus's own machinery.
    let plugin = sandboxed(handler, Limits::default()).await?;
    let (mut d, mut native, mut sandboxed_relay) = (Durable::default(), Load::default(), Load::default());
    let slice = mode.slice();
    for _ in 0..mode.slices() {
        d.merge(durable_run(slice, handler, &NatsServer::start().await?, InstanceMode::Fresh).await?);
        let relay = floor_run(slice, &NatsServer::start().await?, Floor::Relay(None)).await;
        native.merge(relay.context("the native relay floor")?);
        let relay = floor_run(slice, &NatsServer::start().await?, Floor::Relay(Some(plugin.clone()))).await;
        sandboxed_relay.merge(relay.context("the sandboxed relay")?);
    }
    d.acked_per_s /= mode.slices() as f64;
    let server = NatsServer::start().await?;
    // The same with `instance = "reuse"`, on a server of its own (the streams start empty).
    let reuse = durable_run(mode, handler, &NatsServer::start().await?, InstanceMode::Reuse).await?;
    let reuse_clean = reuse.out_duplicates == 0 && reuse.out_missing == 0 && reuse.unacked == 0;
    let floor = floor_run(mode, &server, Floor::Broker).await.context("the JetStream floor")?;
    let rate = d.load.rate();
    let clean = d.out_duplicates == 0 && d.out_missing == 0 && d.unacked == 0 && d.out_messages == d.published;
    Ok(Row {
        events_per_s: Some(rate),
        p50_us: Some(d.load.percentile_us(50)),
        p99_us: Some(d.load.percentile_us(99)),
        baseline: "JetStream floor: raw js pub → pull+ack".into(),
        baseline_value: Some(floor.rate()),
        ratio: Some(rate / floor.rate()),
        extra: BTreeMap::from([
            ("acked_per_s".into(), d.acked_per_s),
            ("reuse_instances".into(), reuse.load.rate()),
            ("reuse_clean".into(), f64::from(u8::from(reuse_clean))),
            ("published".into(), d.published as f64),
            ("handled".into(), d.handled as f64),
            ("out_messages".into(), d.out_messages as f64),
            ("out_duplicates".into(), d.out_duplicates as f64),
            ("out_missing".into(), d.out_missing as f64),
            ("unacked".into(), d.unacked as f64),
            ("redelivered".into(), d.redelivered as f64),
            ("publish_ack_errors".into(), d.ack_errors as f64),
            ("retried".into(), d.retried as f64),
            ("dead_lettered".into(), d.dead_lettered as f64),
            ("floor_p50_us".into(), floor.percentile_us(50)),
            ("floor_p99_us".into(), floor.percentile_us(99)),
            ("native_relay_floor".into(), native.rate()),
            ("native_relay_p50_us".into(), native.percentile_us(50)),
            ("native_relay_p99_us".into(), native.percentile_us(99)),
            ("vs_native_relay".into(), rate / native.rate()),
            ("sandboxed_relay".into(), sandboxed_relay.rate()),
            ("sandboxed_relay_vs_native_relay".into(), sandboxed_relay.rate() / native.rate()),
            ("vs_sandboxed_relay".into(), rate / sandboxed_relay.rate()),
        ]),
        notes: format!(
            "{}; durable consumer, ack after success, 1 js publish per output",
            if clean { "one output per input" } else { "OUTPUTS LOST, DUPLICATED OR UNACKED" }
        ),
        ..Row::default()
    })
}

/// One side of jetstream alone, for a profiler: `host` (the durable host) or
/// `sandboxed-relay`, on a server of its own (see `PARTS`).
pub async fn run_part(mode: Mode, handler: &[u8], part: &str) -> anyhow::Result<Load> {
    let server = NatsServer::start().await?;
    Ok(match part {
        "host" => durable_run(mode, handler, &server, InstanceMode::Fresh).await?.load,
        "sandboxed-relay" => {
            let plugin = sandboxed(handler, Limits::default()).await?;
            floor_run(mode, &server, Floor::Relay(Some(plugin))).await?
        }
        other => anyhow::bail!("no part {other} of jetstream"),
    })
}

/// What the durable host run saw, and what the streams hold afterwards.
#[derive(Default)]
struct Durable {
    load: Load,
    acked_per_s: f64,
    published: u64,
    handled: u64,
    out_messages: u64,
    out_duplicates: u64,
    out_missing: u64,
    unacked: u64,
    redelivered: u64,
    ack_errors: u64,
    retried: u64,
    dead_lettered: u64,
}

impl Durable {
    /// Adds another slice's figures (`acked_per_s` is summed: the caller averages it).
    fn merge(&mut self, slice: Durable) {
        self.load.merge(slice.load);
        self.acked_per_s += slice.acked_per_s;
        self.published += slice.published;
        self.handled += slice.handled;
        self.out_messages += slice.out_messages;
        self.out_duplicates += slice.out_duplicates;
        self.out_missing += slice.out_missing;
        self.unacked += slice.unacked;
        self.redelivered += slice.redelivered;
        self.ack_errors += slice.ack_errors;
        self.retried += slice.retried;
        self.dead_lettered += slice.dead_lettered;
    }
}

async fn durable_run(
    mode: Mode,
    handler: &[u8],
    server: &NatsServer,
    instance: InstanceMode,
) -> anyhow::Result<Durable> {
    let name = components::plugin_name(0);
    let bench = BenchHost::start(handler, 1, |c| {
        c.limits.instance = instance;
        c.nats.url = Some(server.url());
        c.nats.streams.insert("BENCH".into(), StreamDef { subjects: vec!["bench.in.>".into()] });
        c.nats.streams.insert("BENCHOUT".into(), StreamDef { subjects: vec!["bench.out.>".into()] });
        c.plugins.entry(name.clone()).or_default().durable = Some(true);
        c.flow.queue = c.flow.queue.max(2 * WINDOW);
    })
    .await?;
    let (producer, observer) = (server.client().await?, server.client().await?);
    let js = jetstream::new(producer);
    let durable = format!("plugbus_{name}");
    consumer_info(&js, "BENCH", &durable).await.context("the host's durable consumer")?;
    let mut outputs = nats::forward(&observer, "bench.out.>", Forward::Whole).await?;

    // Acks over the measured window, from consumer info at its ends.
    let start = Instant::now();
    let sampler = {
        let (js, durable) = (js.clone(), durable.clone());
        let (from, to) = (start + mode.warmup, start + mode.warmup + mode.measure);
        tokio::spawn(async move {
            tokio::time::sleep_until(from.into()).await;
            let a = acked(&consumer_info(&js, "BENCH", &durable).await?);
            tokio::time::sleep_until(to.into()).await;
            let b = acked(&consumer_info(&js, "BENCH", &durable).await?);
            anyhow::Ok((b - a) as f64 / mode.measure.as_secs_f64())
        })
    };
    let ack_errors = Arc::new(AtomicU64::new(0));
    let mut published = 0;
    let make = |seq| {
        published = seq + 1;
        Event::new("bench.in.e1", driver::payload(seq, ""))
    };
    let (js, ack_errors) = (&js, &ack_errors);
    let publish = |ev: Event| async move { js_publish(js, ev.subject, &ev.id, ev.data, ack_errors).await };
    let load = driver::closed_loop(mode, WINDOW, 1, &mut outputs, make, publish, |_| {}).await.with_context(|| {
        let counters: Vec<_> = bench.host.router().plugins().into_iter().map(|p| p.counters).collect();
        format!("the durable host; its counters: {counters:?}")
    })?;
    let acked_per_s = sampler.await??;

    // Everything settled: nothing pending, nothing unacked (or 20 s passed).
    let deadline = Instant::now() + Duration::from_secs(20);
    let info = loop {
        let info = consumer_info(js, "BENCH", &durable).await?;
        if (info.num_pending == 0 && info.num_ack_pending == 0) || Instant::now() > deadline {
            break info;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let (handled, retried, dead_lettered) =
        (bench.counter("ok"), bench.counter("retried"), bench.counter("dead_lettered"));
    let per_seq = stream_seqs(js, "BENCHOUT").await?;
    bench.stop().await?;
    let out_messages: u64 = per_seq.values().map(|&n| u64::from(n)).sum();
    let out_duplicates = out_messages - per_seq.len() as u64;
    let out_missing = (0..published).filter(|s| !per_seq.contains_key(s)).count() as u64;
    Ok(Durable {
        load,
        acked_per_s,
        published,
        handled,
        out_messages,
        out_duplicates,
        out_missing,
        unacked: info.num_ack_pending as u64 + info.num_pending,
        redelivered: info.num_redelivered as u64,
        ack_errors: ack_errors.load(Ordering::Relaxed),
        retried,
        dead_lettered,
    })
}

/// Publishes with JetStream (`Nats-Msg-Id` = `id`) and awaits the stream's ack in a task of its
/// own, so publishes are pipelined; a failed ack is counted.
async fn js_publish(
    js: &jetstream::Context,
    subject: String,
    id: &str,
    payload: bytes::Bytes,
    failed: &Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", id);
    let ack = js.publish_with_headers(subject, headers, payload).await?;
    let failed = failed.clone();
    tokio::spawn(async move {
        if ack.await.is_err() {
            failed.fetch_add(1, Ordering::Relaxed);
        }
    });
    Ok(())
}

async fn consumer_info(js: &jetstream::Context, stream: &str, name: &str) -> anyhow::Result<consumer::Info> {
    let stream = js.get_stream(stream).await?;
    Ok(stream.consumer_info(name).await?)
}

/// Messages the consumer has acked (deliveries minus those awaiting an ack).
fn acked(info: &consumer::Info) -> u64 {
    info.delivered.consumer_sequence.saturating_sub(info.num_ack_pending as u64)
}

/// How many messages of `stream` carry each `seq`.
async fn stream_seqs(js: &jetstream::Context, name: &str) -> anyhow::Result<HashMap<u64, u32>> {
    let mut stream = js.get_stream(name).await?;
    let messages = stream.info().await?.state.messages;
    let reader = stream.create_consumer(consumer::pull::OrderedConfig::default()).await?;
    let mut all = reader.messages().await?;
    let mut per_seq = HashMap::new();
    for _ in 0..messages {
        let msg = tokio::time::timeout(Duration::from_secs(10), all.next())
            .await
            .with_context(|| format!("reading {name}: stuck"))?
            .with_context(|| format!("reading {name}: ended early"))??;
        let out: Out = serde_json::from_slice(&msg.payload)?;
        *per_seq.entry(out.seq).or_default() += 1;
    }
    Ok(per_seq)
}

/// What a floor run puts behind the raw durable pull consumer.
enum Floor {
    /// Nothing: each message is acked and passed on.
    Broker,
    /// The handler's logic, its output published to a stream before the input is acked: in
    /// plain Rust (`None`), or the bench handler through `Plugin::handle`, a fresh instance per
    /// message as the host runs it.
    Relay(Option<Arc<Plugin>>),
}

/// Raw JetStream publisher → raw durable pull consumer (see [`Floor`]), acking each message,
/// 64 outstanding.
async fn floor_run(mode: Mode, server: &NatsServer, floor: Floor) -> anyhow::Result<Load> {
    let (relay, sandboxed) = match floor {
        Floor::Broker => (false, None),
        Floor::Relay(sandboxed) => (true, sandboxed),
    };
    let prefix = if relay { "relay" } else { "floor" };
    let (producer, worker, observer) = (server.client().await?, server.client().await?, server.client().await?);
    let (js, wjs) = (jetstream::new(producer), jetstream::new(worker));
    let new_stream = |name: String, subjects: String| stream::Config {
        name,
        subjects: vec![subjects],
        storage: stream::StorageType::File,
        duplicate_window: DUPLICATE_WINDOW,
        ..Default::default()
    };
    let input = js.create_stream(new_stream(prefix.to_ascii_uppercase(), format!("{prefix}.in.>"))).await?;
    if relay {
        js.create_stream(new_stream("RELAYOUT".into(), "relay.out.>".into())).await?;
    }
    let pull = input
        .create_consumer(consumer::pull::Config {
            durable_name: Some(prefix.into()),
            ack_policy: consumer::AckPolicy::Explicit,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await?;
    let mut messages = pull.stream().max_messages_per_batch(1000).heartbeat(Duration::from_secs(5)).messages().await?;
    let (mut delivered, worker) = if relay {
        let outputs = nats::forward(&observer, "relay.out.>", Forward::Whole).await?;
        let worker = tokio::spawn(async move {
            while let Some(msg) = messages.next().await {
                let (msg, wjs, sandboxed) = (msg?, wjs.clone(), sandboxed.clone());
                // Concurrently, as the host runs up to `concurrency` attempts.
                tokio::spawn(async move {
                    let id = msg.headers.as_ref().and_then(|h| h.get("Nats-Msg-Id")).map(|v| v.as_str().to_string());
                    let ev = Event::new(msg.subject.as_str(), msg.payload.clone());
                    let out = relay_output(sandboxed.as_deref(), &ev).await?;
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Nats-Msg-Id", format!("{}-out", id.unwrap_or_default()).as_str());
                    let subject = out.subject.replacen("bench.out.", "relay.out.", 1);
                    wjs.publish_with_headers(subject, headers, out.data).await?.await?;
                    msg.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                    anyhow::Ok(())
                });
            }
            anyhow::Ok(())
        });
        (outputs, worker)
    } else {
        let (tx, rx) = tokio::sync::mpsc::channel(1 << 16);
        let worker = tokio::spawn(async move {
            while let Some(msg) = messages.next().await {
                let msg = msg?;
                msg.ack().await.map_err(|e| anyhow::anyhow!("{e}"))?;
                let ev = Event::new(msg.subject.as_str(), nats::forwarded(msg.payload.clone(), Forward::Seq));
                if tx.send(Arc::new(ev)).await.is_err() {
                    break;
                }
            }
            anyhow::Ok(())
        });
        (rx, worker)
    };
    let ack_errors = Arc::new(AtomicU64::new(0));
    let make = |seq| Event::new(format!("{prefix}.in.e1"), driver::payload(seq, ""));
    let (js, ack_errors) = (&js, &ack_errors);
    let publish = |ev: Event| async move { js_publish(js, ev.subject, &ev.id, ev.data, ack_errors).await };
    let load = driver::closed_loop(mode, WINDOW, 1, &mut delivered, make, publish, |_| {}).await;
    worker.abort();
    anyhow::ensure!(ack_errors.load(Ordering::Relaxed) == 0, "the floor's publishes were not all acknowledged");
    load
}
