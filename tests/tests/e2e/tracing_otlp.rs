//! OpenTelemetry traces, end to end: `plugbus run` (the binary) exports over OTLP/HTTP to a
//! receiver this test runs, which decodes every request with the official protobuf definitions
//! (`opentelemetry-proto`'s `ExportTraceServiceRequest`). No collector binary is needed.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use plugbus_tests::{Running, free_port, order, wasm};
use prost::Message;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PIPELINE: &[&str] = &["inventory", "payments", "shipping", "notify", "audit"];
const WAIT: Duration = Duration::from_secs(60);

/// What the receiver got: spans (with their resource's `service.name`), and what it could not
/// decode.
#[derive(Clone, Default)]
struct Received {
    spans: Arc<Mutex<Vec<(String, Span)>>>,
    errors: Arc<Mutex<Vec<String>>>,
    /// The size of every request, taken or refused.
    sizes: Arc<Mutex<Vec<usize>>>,
    /// The spans of every request taken.
    batches: Arc<Mutex<Vec<usize>>>,
}

/// What the OpenTelemetry Collector's OTLP/HTTP receiver takes at most by default
/// (`max_request_body_size`): a larger request is refused, and every span in it lost.
const COLLECTOR_MAX_BODY: usize = 20 << 20;

impl Received {
    fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().iter().map(|(_, s)| s.clone()).collect()
    }
}

async fn export(
    State(got): State<Received>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> (StatusCode, HeaderMap, Vec<u8>) {
    let mut out = HeaderMap::new();
    out.insert(header::CONTENT_TYPE, "application/x-protobuf".parse().unwrap());
    got.sizes.lock().unwrap().push(body.len());
    if body.len() > COLLECTOR_MAX_BODY {
        return (StatusCode::PAYLOAD_TOO_LARGE, out, Vec::new());
    }
    let ct = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    if ct != "application/x-protobuf" {
        got.errors.lock().unwrap().push(format!("content-type {ct:?}"));
        return (StatusCode::UNSUPPORTED_MEDIA_TYPE, out, Vec::new());
    }
    match ExportTraceServiceRequest::decode(body) {
        Ok(req) => {
            let batch = req.resource_spans.iter().flat_map(|rs| &rs.scope_spans).map(|ss| ss.spans.len()).sum();
            got.batches.lock().unwrap().push(batch);
            let mut spans = got.spans.lock().unwrap();
            for rs in req.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|kv| kv.key == "service.name")
                    .and_then(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
                    .unwrap_or_default();
                for ss in rs.scope_spans {
                    spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s)));
                }
            }
            (StatusCode::OK, out, ExportTraceServiceResponse::default().encode_to_vec())
        }
        Err(e) => {
            got.errors.lock().unwrap().push(format!("not an ExportTraceServiceRequest: {e}"));
            (StatusCode::BAD_REQUEST, out, Vec::new())
        }
    }
}

fn text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        Value::DoubleValue(d) => Some(d.to_string()),
        Value::BoolValue(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A span's attribute as text.
fn attr(span: &Span, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| text(kv.value.as_ref().and_then(|v| v.value.as_ref())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An OTLP/HTTP receiver on a free loopback port: its base URL (what
/// `OTEL_EXPORTER_OTLP_ENDPOINT` names) and what it receives.
async fn receiver() -> (String, Received) {
    let got = Received::default();
    let app = axum::Router::new()
        .route("/v1/traces", axum::routing::post(export))
        .layer(axum::extract::DefaultBodyLimit::max(4 * COLLECTOR_MAX_BODY))
        .with_state(got.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (url, got)
}

/// `plugbus run` on these components, exporting to `otlp`; its API URL and log file.
async fn run_host(dir: &std::path::Path, components: &[&str], otlp: &str) -> (Running, String, std::path::PathBuf) {
    run_host_with(dir, components, otlp, &[]).await
}

/// Like [`run_host`], with more arguments for `plugbus run`.
async fn run_host_with(
    dir: &std::path::Path,
    components: &[&str],
    otlp: &str,
    extra: &[&str],
) -> (Running, String, std::path::PathBuf) {
    run_host_env(dir, components, otlp, extra, &[]).await
}

/// Like [`run_host_with`], with more environment variables.
async fn run_host_env(
    dir: &std::path::Path,
    components: &[&str],
    otlp: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Running, String, std::path::PathBuf) {
    for c in components {
        std::fs::copy(wasm(c), dir.join(format!("{c}.wasm"))).unwrap();
    }
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let log = dir.join("host.log");
    let host = Running(
        plugbus_tests::plugbus_cached()
            .args(["run", "--plugins"])
            .arg(dir)
            .arg("--data-dir")
            .arg(dir.join(".data"))
            .args(["--http", &format!("127.0.0.1:{port}"), "--log-format", "json"])
            .args(extra)
            .env("RUST_LOG", "info")
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", otlp)
            // Export batches every 100 ms rather than 5 s: the test waits less.
            .env("OTEL_BSP_SCHEDULE_DELAY", "100")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .env_remove("OTEL_TRACES_SAMPLER")
            .env_remove("OTEL_SDK_DISABLED")
            .envs(env.iter().copied())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(Instant::now() < deadline, "plugbus run did not come up on {url}:\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (host, url, log)
}

/// Posts `data` to `subject` with extra headers; the event id.
async fn post(url: &str, subject: &str, data: String, headers: &[(&str, &str)]) -> String {
    let mut req = reqwest::Client::new()
        .post(format!("{url}/v1/events/{subject}"))
        .header("content-type", "application/json")
        .body(data);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let res = req.send().await.unwrap();
    let status = res.status();
    let body: serde_json::Value = res.json().await.unwrap_or_default();
    assert_eq!(status, 202, "{body}");
    body["id"].as_str().unwrap().to_string()
}

/// Waits until `pick` finds what it looks for in the spans received.
async fn wait_for<T>(got: &Received, what: &str, pick: impl Fn(&[Span]) -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        let spans = got.spans();
        if let Some(t) = pick(&spans) {
            return t;
        }
        let errors = got.errors.lock().unwrap().clone();
        assert!(errors.is_empty(), "the receiver could not decode an export: {errors:?}");
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; received {} spans: {:#?}",
            spans.len(),
            spans.iter().map(|s| (&s.name, attr(s, "plugin"), hex(&s.trace_id))).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The delivery span (`process <subject>`) of `plugin` in the trace `trace`.
fn delivery<'a>(spans: &'a [Span], trace: &[u8], plugin: &str) -> Option<&'a Span> {
    spans
        .iter()
        .find(|s| s.trace_id == trace && s.name.starts_with("process ") && attr(s, "plugin").as_deref() == Some(plugin))
}

/// Whether `ancestor` is a parent, grandparent, … of `span` among `spans`.
fn descends_from(spans: &[Span], span: &Span, ancestor: &Span) -> bool {
    let mut parent = span.parent_span_id.clone();
    for _ in 0..16 {
        if parent.is_empty() {
            return false;
        }
        if parent == ancestor.span_id {
            return true;
        }
        match spans.iter().find(|s| s.span_id == parent) {
            Some(p) => parent = p.parent_span_id.clone(),
            None => return false,
        }
    }
    false
}

/// The parent span of `span`.
fn parent_of<'a>(spans: &'a [Span], span: &Span) -> Option<&'a Span> {
    spans.iter().find(|s| s.span_id == span.parent_span_id)
}

/// An attempt's span carries its plugin's log lines and output as events (about 200 KB for one
/// that logs and prints all it may): an export request carries at most 64 spans, so it stays
/// under what a collector takes. At the SDK's 512 a request reached 27 MB, refused, and echo's
/// spans in it were lost with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_logs_never_make_an_export_request_a_collector_refuses() {
    let (otlp, got) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    // Batches are made every 5 s (the SDK's default) or once full.
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "5000")];
    let (_host, url, log) = run_host_env(dir.path(), &["hostile", "echo"], &otlp, &[], &env).await;
    let line = serde_json::Value::String("x".repeat(60_000)).to_string();
    for i in 0..150 {
        post(&url, "hostile.forgelog", line.clone(), &[]).await;
        if i % 10 == 0 {
            post(&url, &format!("orders.o{i}"), "{}".into(), &[]).await;
        }
    }
    let count = |spans: &[Span], plugin: &str| {
        spans.iter().filter(|s| s.name.starts_with("process ") && attr(s, "plugin").as_deref() == Some(plugin)).count()
    };
    let sizes = || got.sizes.lock().unwrap().clone();
    let deadline = Instant::now() + WAIT;
    while count(&got.spans(), "hostile") < 150 || count(&got.spans(), "echo") < 15 {
        assert!(sizes().iter().all(|&n| n <= COLLECTOR_MAX_BODY), "a request the collector refuses: {:?}", sizes());
        assert!(Instant::now() < deadline, "spans missing; requests of {:?} bytes", sizes());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sizes().iter().all(|&n| n <= COLLECTOR_MAX_BODY), "{:?}", sizes());
    // At most 64 spans a request, whatever they carry: 64 of the largest fit under the bound.
    let batches = got.batches.lock().unwrap().clone();
    assert_eq!(batches.iter().max(), Some(&64), "spans per request: {batches:?}");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("ExportError"), "{text}");
}

/// Review 56c M2: every line a plugin logs or prints was an event of its attempt's span, held by
/// the OpenTelemetry layer until the span ended (~3,000 an attempt, each a copy of the event's
/// subject and six more fields), and all but 128 then dropped by the SDK. The span takes the
/// first 128; the rest go to the log only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempts_span_takes_at_most_128_of_its_plugins_lines_and_the_log_all() {
    let (otlp, got) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let (_host, url, log) = run_host(dir.path(), &["hostile"], &otlp).await;
    let id = post(&url, "hostile.emptylogs", "900".into(), &[]).await;
    let attempt = wait_for(&got, "hostile's attempt span", |spans| {
        let process = spans
            .iter()
            .find(|s| s.name.starts_with("process ") && attr(s, "event_id").as_deref() == Some(id.as_str()))?;
        spans.iter().find(|s| s.name == "attempt" && s.parent_span_id == process.span_id).cloned()
    })
    .await;
    let lines = attempt.events.iter().filter(|e| e.attributes.iter().any(|a| a.key == "plugin")).count();
    assert_eq!((lines, attempt.dropped_events_count), (128, 0), "(the plugin's lines on the span, events dropped)");
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(&log).unwrap();
        let logged = text.lines().filter(|l| l.contains(&id) && l.contains("\"target\":\"plugin\"")).count();
        if logged >= 900 {
            break;
        }
        assert!(Instant::now() < deadline, "{logged} of the 900 lines in the log");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_order_is_one_trace_through_the_five_handlers() {
    let (otlp, got) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let (_host, url, log) = run_host(dir.path(), PIPELINE, &otlp).await;
    let id = post(&url, "orders.created", order("t-1", "widget", 1), &[]).await;

    // The ingress started the trace: a root producer span for the post.
    let ingress = wait_for(&got, "the ingress span", |spans| {
        spans
            .iter()
            .find(|s| s.name == "publish orders.created" && attr(s, "event_id").as_deref() == Some(&id))
            .cloned()
    })
    .await;
    assert!(ingress.parent_span_id.is_empty(), "no traceparent came in: the ingress span is a root");
    let trace = ingress.trace_id.clone();
    // (Every delivery's span: one ends after its output was taken and its input settled, so the
    // next plugin's may be exported in an earlier batch.)
    let chain = ["inventory", "payments", "shipping", "notify"];
    let spans = wait_for(&got, "the four delivery spans", |spans| {
        chain.iter().all(|p| delivery(spans, &trace, p).is_some()).then(|| spans.to_vec())
    })
    .await;

    // orders.created → inventory → payments → shipping → notify: each delivery a descendant of
    // the one whose output it handles, the first a child of the ingress span.
    let chain: Vec<&Span> = chain.iter().map(|p| delivery(&spans, &trace, p).expect("waited for")).collect();
    assert_eq!(chain[0].parent_span_id, ingress.span_id, "inventory's delivery is a child of the ingress");
    for pair in chain.windows(2) {
        let (up, down) = (pair[0], pair[1]);
        // The output's context is the attempt that produced it: down's parent is up's attempt.
        let attempt = parent_of(&spans, down).expect("the parent of a delivery span was exported");
        assert_eq!(attempt.name, "attempt");
        assert_eq!(attempt.parent_span_id, up.span_id, "{} → {}", up.name, down.name);
        assert!(descends_from(&spans, down, up));
    }
    let subjects: Vec<String> = chain.iter().map(|s| attr(s, "subject").unwrap()).collect();
    assert_eq!(subjects, ["orders.created", "inventory.reserved", "payments.captured", "shipping.started"]);
    for span in &chain {
        assert_eq!(span.kind, 5, "a delivery is a consumer span"); // SPAN_KIND_CONSUMER
        assert_eq!(attr(span, "outcome").as_deref(), Some("handled"), "{span:?}");
        assert_eq!(attr(span, "attempts").as_deref(), Some("1"));
        assert_eq!(attr(span, "plugin.version").as_deref(), Some("0.1.0"));
        assert!(attr(span, "event_id").is_some() && attr(span, "queue_wait_ms").is_some(), "{span:?}");
    }
    assert_eq!(attr(chain[0], "outputs").as_deref(), Some("1"));
    // The host's own steps are children of the attempts.
    let inventory_attempt = spans.iter().find(|s| s.name == "attempt" && s.parent_span_id == chain[0].span_id).unwrap();
    assert_eq!(attr(inventory_attempt, "attempt").as_deref(), Some("1"));
    assert_eq!(attr(inventory_attempt, "outcome").as_deref(), Some("ok"));
    let children: Vec<&str> =
        spans.iter().filter(|s| s.parent_span_id == inventory_attempt.span_id).map(|s| s.name.as_str()).collect();
    for step in ["instantiate", "kv commit", "publish inventory.reserved"] {
        assert!(children.contains(&step), "inventory's attempt has no {step:?} child: {children:?}");
    }
    // audit saw the same order's four subjects, in the same trace.
    let audits =
        spans.iter().filter(|s| s.name.starts_with("process ") && attr(s, "plugin").as_deref() == Some("audit"));
    assert!(audits.clone().all(|s| s.trace_id == trace));
    // Every span of this order is in the one trace; the resource names the service.
    assert!(got.spans.lock().unwrap().iter().all(|(service, _)| service == "plugbus"));

    // notify's log line is an event of its attempt span, and the JSON log names the trace.
    let notify_attempt = spans.iter().find(|s| s.name == "attempt" && s.parent_span_id == chain[3].span_id).unwrap();
    assert!(
        notify_attempt.events.iter().any(|e| e.name.contains("is on its way")),
        "notify's log is not an event of its attempt: {:?}",
        notify_attempt.events
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let line = text.lines().find(|l| l.contains("is on its way")).expect("notify logged");
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["fields"]["trace_id"], hex(&trace), "{line}");
    // The trace spans are not log lines.
    assert!(!text.contains("\"process\""), "trace spans leaked into the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incoming_traceparent_is_continued_and_garbage_starts_a_new_trace() {
    let (otlp, got) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let (_host, url, log) = run_host(dir.path(), &["inventory"], &otlp).await;

    // A client's W3C context: the ingress span is its child, the delivery in its trace.
    let (trace, parent) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    let traceparent = format!("00-{trace}-{parent}-01");
    let id = post(
        &url,
        "orders.created",
        order("t-2", "widget", 1),
        &[("traceparent", &traceparent), ("tracestate", "vendor=x")],
    )
    .await;
    let ingress = wait_for(&got, "the ingress span", |spans| {
        spans.iter().find(|s| attr(s, "event_id").as_deref() == Some(&id) && s.name.starts_with("publish")).cloned()
    })
    .await;
    assert_eq!(hex(&ingress.trace_id), trace);
    assert_eq!(hex(&ingress.parent_span_id), parent);
    assert_eq!(ingress.trace_state, "vendor=x");
    let spans = wait_for(&got, "inventory's delivery", |spans| {
        delivery(spans, &ingress.trace_id, "inventory").map(|_| spans.to_vec())
    })
    .await;
    assert_eq!(delivery(&spans, &ingress.trace_id, "inventory").unwrap().parent_span_id, ingress.span_id);

    // Garbage, a huge value and a valid-looking one with an all-zero id: each event is still
    // accepted and delivered, under a new trace of its own.
    let huge = format!("00-{}", "f".repeat(8 << 10));
    let bad = ["garbage", huge.as_str(), "00-00000000000000000000000000000000-b7ad6b7169203331-01"];
    for (i, tp) in bad.iter().enumerate() {
        let id = post(&url, "orders.created", order(&format!("bad-{i}"), "widget", 1), &[("traceparent", tp)]).await;
        let ingress = wait_for(&got, "the ingress span of a bad traceparent", |spans| {
            spans.iter().find(|s| attr(s, "event_id").as_deref() == Some(&id) && s.name.starts_with("publish")).cloned()
        })
        .await;
        assert!(ingress.parent_span_id.is_empty(), "{tp:.40}: a new trace starts");
        assert_ne!(hex(&ingress.trace_id), trace);
        let spans = wait_for(&got, "the delivery of an event with a bad traceparent", |spans| {
            delivery(spans, &ingress.trace_id, "inventory").map(|_| spans.to_vec())
        })
        .await;
        assert_eq!(
            attr(delivery(&spans, &ingress.trace_id, "inventory").unwrap(), "outcome").as_deref(),
            Some("handled")
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains(&"f".repeat(8 << 10)), "the huge traceparent was echoed into the log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_and_its_reply_stay_in_the_requesters_trace() {
    let (otlp, got) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let (_host, url, _log) = run_host(dir.path(), &["asker", "responder"], &otlp).await;
    let cmd = serde_json::json!({ "subject": "rpc.echo", "data": "hi", "timeout_ms": 5000 }).to_string();
    let id = post(&url, "ask.one", cmd, &[]).await;
    let ingress = wait_for(&got, "the ingress span", |spans| {
        spans.iter().find(|s| attr(s, "event_id").as_deref() == Some(&id) && s.name.starts_with("publish")).cloned()
    })
    .await;
    // The responder's delivery of the request joins the asker's trace, under the asker's attempt.
    // (Both deliveries waited for: the asker's span ends after the reply, and may be exported
    // in a later batch than the responder's.)
    let spans = wait_for(&got, "the asker's and the responder's deliveries", |spans| {
        delivery(spans, &ingress.trace_id, "responder")
            .and(delivery(spans, &ingress.trace_id, "asker"))
            .map(|_| spans.to_vec())
    })
    .await;
    let responder = delivery(&spans, &ingress.trace_id, "responder").unwrap();
    let asker = delivery(&spans, &ingress.trace_id, "asker").unwrap();
    assert!(descends_from(&spans, responder, asker), "the request's delivery is not under the asker's");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handler_cannot_set_the_trace_context_of_its_outputs() {
    let (otlp, got) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let (_host, url, _log) = run_host(dir.path(), &["hostile", "faulty"], &otlp).await;
    // hostile publishes to faulty.ok with a valid traceparent of another trace in its headers.
    let forged_trace = "11111111111111111111111111111111";
    let forged = format!("00-{forged_trace}-2222222222222222-01");
    let id = post(&url, "hostile.reserved", format!("traceparent faulty.ok {forged}"), &[]).await;
    let ingress = wait_for(&got, "the ingress span", |spans| {
        spans.iter().find(|s| attr(s, "event_id").as_deref() == Some(&id) && s.name.starts_with("publish")).cloned()
    })
    .await;
    let spans = wait_for(&got, "faulty's delivery of hostile's output", |spans| {
        spans
            .iter()
            .find(|s| s.name == "process faulty.ok" && attr(s, "plugin").as_deref() == Some("faulty"))
            .map(|_| spans.to_vec())
    })
    .await;
    let faulty = spans.iter().find(|s| s.name == "process faulty.ok").unwrap();
    assert_eq!(hex(&faulty.trace_id), hex(&ingress.trace_id), "the host's context wins over the handler's");
    let hostile = delivery(&spans, &ingress.trace_id, "hostile").unwrap();
    assert_eq!(parent_of(&spans, faulty).unwrap().parent_span_id, hostile.span_id);
    assert!(spans.iter().all(|s| hex(&s.trace_id) != forged_trace), "a span joined the forged trace");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trace_crosses_nats_jetstream_from_a_publishers_traceparent() {
    let server = plugbus_tests::nats::NatsServer::start().await;
    let (otlp, got) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    // Every hop through a JetStream stream and a durable consumer.
    let config = dir.path().join("plugbus.toml");
    std::fs::write(
        &config,
        r#"
[plugins.inventory]
durable = true
[plugins.payments]
durable = true
[plugins.shipping]
durable = true
[plugins.notify]
durable = true
[nats.streams.ORDERS]
subjects = ["orders.>"]
[nats.streams.INVENTORY]
subjects = ["inventory.>"]
[nats.streams.PAYMENTS]
subjects = ["payments.>"]
[nats.streams.SHIPPING]
subjects = ["shipping.>"]
"#,
    )
    .unwrap();
    let config = config.display().to_string();
    let (_host, url, _log) = run_host_with(
        dir.path(),
        &["inventory", "payments", "shipping", "notify"],
        &otlp,
        &["--nats", &server.url(), "--config", &config],
    )
    .await;
    // Subscribed once ready (a new durable consumer starts at new messages).
    wait_ready(&url).await;

    // An instrumented NATS publisher: a plain message with the W3C header.
    let nats = server.client().await;
    let js = async_nats::jetstream::new(nats);
    let (trace, parent) = ("5b8efff798038103d269b633813fc60c", "eee19b7ec3c1b174");
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("traceparent", format!("00-{trace}-{parent}-01").as_str());
    headers.insert("Nats-Msg-Id", "nats-order-1");
    js.publish_with_headers("orders.created", headers, order("n-1", "widget", 1).into()).await.unwrap().await.unwrap();
    let trace_id: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&trace[2 * i..2 * i + 2], 16).unwrap()).collect();
    // Every delivery's span, not only the last one's: a delivery's span ends after its output
    // was taken and its input acked, so the next plugin's may be exported in an earlier batch.
    let chain = ["inventory", "payments", "shipping", "notify"];
    let spans = wait_for(&got, "the four deliveries in the publisher's trace", |spans| {
        chain.iter().all(|p| delivery(spans, &trace_id, p).is_some()).then(|| spans.to_vec())
    })
    .await;
    let chain: Vec<&Span> = chain.iter().map(|p| delivery(&spans, &trace_id, p).expect("waited for")).collect();
    assert_eq!(hex(&chain[0].parent_span_id), parent, "inventory continues the publisher's span");
    for pair in chain.windows(2) {
        assert!(descends_from(&spans, pair[1], pair[0]), "{} → {}", pair[0].name, pair[1].name);
    }

    // A binary-mode CloudEvent with a garbage ce-traceparent: delivered, in a trace of its own.
    let mut headers = async_nats::HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "nats-order-2"),
        ("ce-source", "test"),
        ("ce-type", "orders.created"),
        ("ce-traceparent", "00-not-a-trace-context-01"),
    ] {
        headers.insert(k, v);
    }
    js.publish_with_headers("orders.created", headers, order("n-2", "widget", 1).into()).await.unwrap().await.unwrap();
    let span = wait_for(&got, "inventory's delivery of the garbage-traced event", |spans| {
        spans
            .iter()
            .find(|s| s.name.starts_with("process ") && attr(s, "event_id").as_deref() == Some("nats-order-2"))
            .cloned()
    })
    .await;
    assert!(span.parent_span_id.is_empty(), "a garbage context starts a new trace");
    assert_eq!(attr(&span, "outcome").as_deref(), Some("handled"));
}

/// Waits until the host at `url` answers `/readyz` (on NATS: subscribed).
async fn wait_ready(url: &str) {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + WAIT;
    while !client.get(format!("{url}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
        assert!(Instant::now() < deadline, "the host never became ready on NATS");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `ok` of each plugin, from `/v1/plugins`.
async fn handled(url: &str, plugin: &str) -> u64 {
    let body: serde_json::Value =
        reqwest::get(format!("{url}/v1/plugins")).await.unwrap().json().await.unwrap_or_default();
    let plugins = body["plugins"].as_array().cloned().unwrap_or_default();
    plugins.iter().find(|p| p["name"] == plugin).and_then(|p| p["counters"]["ok"].as_u64()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_trace_makes_no_span_anywhere_and_a_sampled_parent_still_decides() {
    let (otlp, got) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("plugbus.toml");
    std::fs::write(&config, "[telemetry]\nsample_ratio = 0.0\n").unwrap();
    let config = config.to_str().unwrap().to_string();
    let (_host, url, _log) = run_host_with(dir.path(), &["inventory", "audit"], &otlp, &["--config", &config]).await;

    // No new trace is made: not the ingress's, not a delivery's, not an attempt's or an
    // output's (each would otherwise be a root of its own).
    post(&url, "orders.created", order("s-1", "widget", 1), &[]).await;
    let deadline = Instant::now() + WAIT;
    while handled(&url, "audit").await < 2 {
        assert!(Instant::now() < deadline, "audit did not handle the order and inventory's output");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The exporter sends every 100 ms: wait for more than a few rounds.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let spans = got.spans();
    assert!(spans.is_empty(), "spans of an unsampled trace: {:?}", spans.iter().map(|s| &s.name).collect::<Vec<_>>());

    // A client's sampled context is followed (parentbased): the whole trace is made.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let traceparent = format!("00-{trace}-00f067aa0ba902b7-01");
    post(&url, "orders.created", order("s-2", "widget", 1), &[("traceparent", &traceparent)]).await;
    let trace_id: Vec<u8> = (0..16).map(|i| u8::from_str_radix(&trace[2 * i..2 * i + 2], 16).unwrap()).collect();
    wait_for(&got, "audit's delivery of inventory's output in the client's trace", |spans| {
        spans
            .iter()
            .any(|s| {
                s.trace_id == trace_id
                    && s.name == "process inventory.reserved"
                    && attr(s, "plugin").as_deref() == Some("audit")
            })
            .then_some(())
    })
    .await;
    assert!(got.spans().iter().all(|s| s.trace_id == trace_id), "only the sampled trace has spans");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_delivery_of_a_message_without_context_passes_the_decision_on() {
    let server = plugbus_tests::nats::NatsServer::start().await;
    let (otlp, got) = receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("plugbus.toml");
    std::fs::write(&config, "[telemetry]\nsample_ratio = 0.0\n").unwrap();
    let config = config.to_str().unwrap().to_string();
    let (_host, url, _log) =
        run_host_with(dir.path(), &["inventory"], &otlp, &["--nats", &server.url(), "--config", &config]).await;
    wait_ready(&url).await;
    let nats = server.client().await;
    let mut outputs = nats.subscribe("inventory.reserved").await.unwrap();
    nats.flush().await.unwrap();
    // A publisher without tracing: the message carries no context at all.
    for i in 0..2 {
        nats.publish("orders.created", order(&format!("u-{i}"), "widget", 1).into()).await.unwrap();
    }
    nats.flush().await.unwrap();
    let mut traces = Vec::new();
    for _ in 0..2 {
        let msg = tokio::time::timeout(WAIT, futures::StreamExt::next(&mut outputs))
            .await
            .expect("no output of inventory")
            .unwrap();
        let headers = msg.headers.clone().unwrap_or_default();
        let tp = headers
            .get("traceparent")
            .or_else(|| headers.get("ce-traceparent"))
            .unwrap_or_else(|| panic!("the output carries no trace context: {headers:?}"))
            .to_string();
        // The next hop follows an unsampled parent; without one it would start a trace
        // mid-pipeline that this host decided not to make.
        assert!(tp.starts_with("00-") && tp.ends_with("-00"), "not an unsampled context: {tp}");
        traces.push(tp[3..35].to_string());
    }
    assert_ne!(traces[0], traces[1], "two deliveries share a trace");
    // Nothing can be awaited for an absence: the exporter sends every 100 ms, so a few rounds.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(got.spans().is_empty(), "spans of an unsampled delivery: {}", got.spans().len());
}
