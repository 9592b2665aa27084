//! `outbound`: what one outbound HTTP request costs when a handler makes it through the sandbox
//! (`wasi:http` in the guest, the host's policy hook: allow-lists, address check, breaker,
//! idempotency key, caps; then hyper on a fresh connection), next to a plain `reqwest` call to
//! the same local server in the same run.
//!
//! The handler is the tests' `caller` component (built by `scripts/build-plugins`), run with
//! `Plugin::handle` in a loop on one task (no bus): an event asking for `CALLS` GETs, and one
//! asking for none; the per-call figure is the difference of their median attempt times over
//! `CALLS` (what the handler's own work per call adds, a JSON output per call, is in it). The
//! baselines are sequential `reqwest` GETs of the same URL: on a fresh connection per call (what
//! the host does: it keeps no connection pool, each call connects to the address it checked)
//! and on a pooled keep-alive connection.

use crate::Mode;
use crate::components::target_dir;
use crate::driver;
use crate::report::Row;
use anyhow::Context;
use plugbus::kv::MemoryKv;
use plugbus::sandbox::{Limits, PluginSettings, Sandbox, SandboxSettings};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Calls per event in the measured attempts.
const CALLS: u64 = 10;

/// A local server answering `GET /ok` with `pong`; its port.
async fn server() -> anyhow::Result<u16> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let app = axum::Router::new().route("/ok", axum::routing::get(|| async { "pong" }));
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(port)
}

/// Median time of a `caller` attempt making `calls` calls to `url`, in µs.
async fn sandbox_p50_us(
    mode: Mode,
    plugin: &Arc<plugbus::sandbox::Plugin>,
    url: &str,
    calls: u64,
) -> anyhow::Result<f64> {
    let spec = serde_json::json!({ "url": url, "calls": calls }).to_string();
    let plugin = plugin.clone();
    let load = driver::direct_loop(mode, 1, move |seq| {
        let (plugin, spec) = (plugin.clone(), spec.clone());
        async move {
            let mut ev = plugbus::Event::new("caller.go", spec);
            ev.id = format!("bench-{seq}");
            let attempt = plugin.handle(&ev, 1).await;
            attempt.result.map_err(|f| anyhow::anyhow!("the caller failed: {f}"))?;
            let ok = attempt.outputs.iter().filter(|o| o.subject == "caller.out.ok").count() as u64;
            anyhow::ensure!(
                ok == calls,
                "{ok} of {calls} calls succeeded: {:?}",
                attempt.outputs.first().map(|o| String::from_utf8_lossy(&o.data).into_owned())
            );
            Ok(())
        }
    })
    .await?;
    Ok(load.percentile_us(50))
}

/// Median time of one plain `reqwest` GET of `url` with `client`, in µs.
async fn reqwest_p50_us(mode: Mode, client: reqwest::Client, url: &str) -> anyhow::Result<f64> {
    let url = url.to_string();
    let load = driver::direct_loop(mode, 1, move |_| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            let body = client.get(&url).send().await?.error_for_status()?.bytes().await?;
            anyhow::ensure!(&body[..] == b"pong", "unexpected answer");
            Ok(())
        }
    })
    .await?;
    Ok(load.percentile_us(50))
}

pub async fn run(mode: Mode, _handler: &[u8]) -> anyhow::Result<Row> {
    let path = target_dir().join("wasm32-wasip2/plugin/caller.wasm");
    let caller = std::fs::read(&path)
        .with_context(|| format!("reading {} (run scripts/build-plugins first)", path.display()))?;
    let port = server().await?;
    let url = format!("http://127.0.0.1:{port}/ok");
    let sandbox = Sandbox::new(SandboxSettings::default())?;
    let settings = |_: &_| PluginSettings {
        limits: Limits { max_outbound_requests: CALLS as u32, ..Limits::default() },
        config: Default::default(),
        kv: Arc::new(MemoryKv::new()),
        allowed_outbound: vec![format!("http://127.0.0.1:{port}")],
    };
    let plugin = Arc::new(sandbox.load(&caller, settings).await?);
    let with_calls = sandbox_p50_us(mode, &plugin, &url, CALLS).await?;
    let without = sandbox_p50_us(mode, &plugin, &url, 0).await?;
    let per_call = (with_calls - without) / CALLS as f64;
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build()?;
    let fresh_us = reqwest_p50_us(mode, fresh, &url).await?;
    let pooled_us = reqwest_p50_us(mode, reqwest::Client::new(), &url).await?;
    Ok(Row {
        events_per_s: Some(1e6 / per_call),
        p50_us: Some(per_call),
        baseline: "plain reqwest GET, fresh connection".into(),
        baseline_value: Some(fresh_us),
        ratio: Some(per_call / fresh_us),
        extra: BTreeMap::from([
            ("sandbox_call_us".into(), per_call),
            ("overhead_vs_fresh_us".into(), per_call - fresh_us),
            ("reqwest_fresh_us".into(), fresh_us),
            ("reqwest_pooled_us".into(), pooled_us),
            ("overhead_vs_pooled_us".into(), per_call - pooled_us),
            ("attempt_10_calls_p50_us".into(), with_calls),
            ("attempt_no_call_p50_us".into(), without),
        ]),
        notes: format!(
            "per outbound call (events/s = calls/s, p50 = µs per call: (attempt with {CALLS} calls - attempt with none) / {CALLS}); ratio = sandbox / reqwest per call"
        ),
        ..Row::default()
    })
}
