//! `pipeline-5`: the demo's five example handlers on the durable embedded bus (default
//! `bus.sync`): `orders.created` → inventory → payments → shipping → notify, with audit on every
//! hop. An order is done when `shipping.started`, the event notify handles, is published (four
//! hops from the ingress: three handlers run and the event is logged and queued for notify;
//! notify publishes nothing to time). First the top rate (64 orders outstanding), then an open
//! loop at half of it: the headline is that loop's p99 from publish to `shipping.started`
//! (target ≤ 10 ms). Each order has its own sku, seeded with ample stock, so inventory's kv
//! transactions never conflict.

use crate::Mode;
use crate::components;
use crate::report::Row;
use plugbus::{Event, Host};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const EXAMPLES: [&str; 5] = ["inventory", "payments", "shipping", "notify", "audit"];
/// Distinct skus, each with stock for the whole run.
const SKUS: u64 = 1024;
const WINDOW: usize = 64;

fn order(seq: u64) -> Event {
    let body = serde_json::json!({
        "order_id": format!("o-{seq}"), "sku": format!("sku-{}", seq % SKUS), "qty": 1,
        "email": "ann@example.com", "amount_cents": 1250,
    });
    Event::new("orders.created", body.to_string().into_bytes())
}

/// Publish times by order number; the observer turns them into latencies.
type Sent = Arc<Mutex<BTreeMap<u64, Instant>>>;

pub async fn run(mode: Mode, _handler: &[u8]) -> anyhow::Result<Row> {
    let plugins = tempfile::Builder::new().prefix("plugbus-bench-pipeline").tempdir()?;
    for name in EXAMPLES {
        let path = components::target_dir().join(format!("wasm32-wasip2/plugin/{name}.wasm"));
        std::fs::copy(&path, plugins.path().join(format!("{name}.wasm")))
            .map_err(|e| anyhow::anyhow!("copying {} (run scripts/build-plugins first): {e}", path.display()))?;
    }
    let data = tempfile::Builder::new().prefix("plugbus-bench-data").tempdir()?;
    let mut config = components::config(plugins.path(), data.path());
    config.bus.durable = true;
    let stock = config.plugins.entry("inventory".into()).or_default();
    for sku in 0..SKUS {
        stock.config.insert(format!("stock.sku-{sku}"), serde_json::json!(1_000_000_000u64));
    }
    let host = Arc::new(Host::start(config).await?);
    anyhow::ensure!(host.router().names().len() == EXAMPLES.len(), "rejected: {:?}", host.rejected());

    let sent: Sent = Arc::default();
    let (done_tx, mut done) = tokio::sync::mpsc::unbounded_channel::<Duration>();
    let mut shipped = host.observe(&["shipping.started"]).await?;
    let watcher = {
        let sent = sent.clone();
        tokio::spawn(async move {
            while let Some(ev) = shipped.recv().await {
                let Ok(body) = serde_json::from_slice::<serde_json::Value>(&ev.data) else { continue };
                let seq = body["order_id"].as_str().and_then(|id| id.strip_prefix("o-")).and_then(|n| n.parse().ok());
                if let Some(at) = seq.and_then(|seq: u64| sent.lock().expect("sent").remove(&seq)) {
                    let _ = done_tx.send(at.elapsed());
                }
            }
        })
    };
    let publish = |seq: u64| {
        let (host, sent) = (host.clone(), sent.clone());
        sent.lock().expect("sent").insert(seq, Instant::now());
        tokio::spawn(async move {
            if let Err(e) = host.publish(order(seq)).await {
                eprintln!("pipeline-5: order {seq} not accepted: {e}");
            }
        });
    };

    // Top rate: 64 orders outstanding.
    let mut seq = 0;
    for _ in 0..WINDOW {
        publish(seq);
        seq += 1;
    }
    let (start, mut completed) = (Instant::now(), 0u64);
    let until = start + mode.warmup + mode.measure;
    let measure_from = start + mode.warmup;
    let mut counted = 0u64;
    while Instant::now() < until {
        tokio::time::timeout(Duration::from_secs(20), done.recv())
            .await?
            .ok_or_else(|| anyhow::anyhow!("the observer stopped"))?;
        completed += 1;
        if Instant::now() >= measure_from {
            counted += 1;
        }
        publish(seq);
        seq += 1;
    }
    let top = counted as f64 / mode.measure.as_secs_f64();
    while completed < seq {
        tokio::time::timeout(Duration::from_secs(20), done.recv()).await?;
        completed += 1;
    }

    // Half of it, open loop: an order every 2 / top seconds whatever the pipeline does.
    let rate = top / 2.0;
    let every = Duration::from_secs_f64(1.0 / rate);
    let (start, mut next) = (Instant::now(), Instant::now());
    let first = seq;
    while next < start + mode.measure {
        tokio::time::sleep_until(next.into()).await;
        publish(seq);
        seq += 1;
        next += every;
    }
    let mut latencies = Vec::new();
    while completed < seq {
        latencies.push(tokio::time::timeout(Duration::from_secs(20), done.recv()).await?.unwrap_or_default());
        completed += 1;
    }
    let offered = (seq - first) as f64 / start.elapsed().as_secs_f64();
    watcher.abort();
    latencies.sort_unstable();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)].as_secs_f64() * 1e6;
    let (p50, p99) = (pct(50), pct(99));
    let counters = |name: &str| -> u64 {
        host.router().plugins().iter().map(|p| p.counters.get(name).copied().unwrap_or(0)).sum()
    };
    let (retried, dead) = (counters("retried"), counters("dead_lettered"));
    let host = Arc::into_inner(host).ok_or_else(|| anyhow::anyhow!("a publish task still holds the host"))?;
    let report = host.shutdown().await;
    anyhow::ensure!(report.is_clean(), "host stopped with events unhandled: {report:?}");
    Ok(Row {
        events_per_s: Some(rate),
        p50_us: Some(p50),
        p99_us: Some(p99),
        baseline: "p99 target (µs)".into(),
        baseline_value: Some(10_000.0),
        ratio: Some(p99 / 10_000.0),
        extra: BTreeMap::from([
            ("top_rate".into(), top),
            ("offered_rate".into(), offered),
            ("retried".into(), retried as f64),
            ("dead_lettered".into(), dead as f64),
        ]),
        notes: "open loop at half the top rate; ratio = p99 / 10 ms (≤ 1 meets the target)".into(),
        ..Row::default()
    })
}
