//! `tracing`: embedded-1's closed loop (one plugin, 64 events outstanding) with OpenTelemetry
//! export off, then on, in the same run. On: the host's spans (a delivery, an attempt, its
//! `instantiate` step and the output's publish: 4 spans per event, each event the root of its
//! own trace since the bench publishes without a `traceparent`) go through the `tracing`
//! layer, the SDK's batch processor and the OTLP/HTTP (protobuf) exporter to a sink this
//! scenario runs on loopback (it reads each request whole, counts it and answers 200, as a
//! collector would). The ratio is on / off (target: off within noise of embedded-1, on a cost
//! worth quoting). `sampled_1pct_*` is on with 1% of traces sampled (`[telemetry]
//! sample_ratio = 0.01`): an unsampled trace makes no span, so this is near off.
//! `otlp_requests` / `otlp_kib` count what both "on" runs exported.
//!
//! The OpenTelemetry layer can only be installed once per process: the first run measures off
//! with no layer at all; later runs (3 without `--quick`) measure off with the layer installed
//! and span making switched off (`telemetry::set_enabled(false)`), which is the same code path
//! for dispatch. This scenario runs last so no other scenario runs with the layer installed.

use super::{HostRun, WINDOW, host_run};
use crate::Mode;
use crate::report::Row;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// What the sink received.
#[derive(Default)]
struct Sink {
    requests: AtomicU64,
    bytes: AtomicU64,
}

/// The sink's URL and counters, and the installed exporter (kept for the process's life).
static INSTALLED: OnceLock<(Arc<Sink>, String)> = OnceLock::new();

async fn install() -> anyhow::Result<Arc<Sink>> {
    if let Some((sink, _)) = INSTALLED.get() {
        plugbus::telemetry::set_enabled(true);
        return Ok(sink.clone());
    }
    let sink = Arc::new(Sink::default());
    let counters = sink.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let counters = counters.clone();
            async move {
                counters.requests.fetch_add(1, Ordering::Relaxed);
                counters.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                ([("content-type", "application/x-protobuf")], Vec::<u8>::new())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let settings = plugbus::telemetry::TelemetrySettings { otlp_endpoint: Some(url.clone()), ..Default::default() };
    let exporter = plugbus::telemetry::Exporter::start(&settings)?.expect("an endpoint is set");
    use tracing_subscriber::layer::SubscriberExt;
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(exporter.layer()))?;
    // Exports for the rest of the process.
    std::mem::forget(exporter);
    let _ = INSTALLED.set((sink.clone(), url));
    Ok(sink)
}

pub async fn run(mode: Mode, handler: &[u8]) -> anyhow::Result<Row> {
    let layer_installed = INSTALLED.get().is_some();
    plugbus::telemetry::set_enabled(false);
    let HostRun { load: off, .. } = host_run(mode, handler, 1, WINDOW, None, |_| {}).await?;
    let sink = install().await?;
    let (requests0, bytes0) = (sink.requests.load(Ordering::Relaxed), sink.bytes.load(Ordering::Relaxed));
    let on = host_run(mode, handler, 1, WINDOW, None, |_| {}).await;
    // On, with 1% of new traces sampled: what a busy host would run with.
    let sampling = |ratio| plugbus::telemetry::Sampling { ratio, follow_parent: true }.install();
    sampling(0.01);
    let sampled = host_run(mode, handler, 1, WINDOW, None, |_| {}).await;
    sampling(1.0);
    plugbus::telemetry::set_enabled(false);
    let HostRun { load: on, retried, dead_lettered, .. } = on?;
    let sampled = sampled?.load;
    // The batch processor exports every 5 s or 512 spans: give it a moment to send the rest.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let requests = sink.requests.load(Ordering::Relaxed) - requests0;
    let bytes = sink.bytes.load(Ordering::Relaxed) - bytes0;
    let (rate_on, rate_off) = (on.rate(), off.rate());
    Ok(Row {
        events_per_s: Some(rate_on),
        p50_us: Some(on.percentile_us(50)),
        p99_us: Some(on.percentile_us(99)),
        baseline: "the same loop with export off".into(),
        baseline_value: Some(rate_off),
        ratio: Some(rate_on / rate_off),
        extra: BTreeMap::from([
            ("off_events_per_s".into(), rate_off),
            ("off_p50_us".into(), off.percentile_us(50)),
            ("off_p99_us".into(), off.percentile_us(99)),
            ("on_events_per_s".into(), rate_on),
            ("sampled_1pct_events_per_s".into(), sampled.rate()),
            ("sampled_1pct_vs_off".into(), sampled.rate() / rate_off),
            ("otlp_requests".into(), requests as f64),
            ("otlp_kib".into(), bytes as f64 / 1024.0),
            ("off_with_layer_installed".into(), if layer_installed { 1.0 } else { 0.0 }),
            ("retried".into(), retried as f64),
            ("dead_lettered".into(), dead_lettered as f64),
        ]),
        notes: "headline: events/s with OTLP/HTTP export on (4 spans per event) to a loopback sink; \
                baseline: the same with export off"
            .into(),
        ..Row::default()
    })
}
