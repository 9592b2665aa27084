//! Outbound HTTP from handlers against real HTTP servers the tests start: the adversary is a
//! plugin (or the network it is pointed at) trying to reach what the operator did not grant:
//! another port, loopback through a name, a redirect to a refused host, a huge or endless
//! response. The `caller` component makes the calls an event describes and publishes each
//! outcome (`caller.out.ok` / `caller.out.err`).

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use plugbus::Config;
use plugbus::sandbox::{PluginSettings, Sandbox, SandboxSettings};
use plugbus_tests::nats::NatsServer;
use plugbus_tests::{Bus, TestHost, eventually, fast_retries, wasm};
use serde_json::{Value, json};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the test server saw: (path, idempotency key) per request.
type Seen = Arc<Mutex<Vec<(String, String)>>>;

/// A local HTTP server: `/ok`, `/redirect` (to `http://localhost:PORT/ok`), `/big` (4 KiB with
/// a length), `/stream` (4 KiB, chunked), `/slow` (answers after 10 s).
struct Server {
    ip: String,
    port: u16,
    seen: Seen,
    /// `/gate`: its requests in flight, the most at once, and whether it holds them.
    gate: Gate,
    /// While set, `/flaky` answers 500 (a provider that is down); then `recovered`.
    down: Arc<AtomicBool>,
}

/// `/gate` answers after 300 ms, or, while `closed`, once the test opens it (15 s at most).
#[derive(Default)]
struct GateState {
    /// Its requests in flight now.
    inside: AtomicUsize,
    /// The most in flight at once.
    most: AtomicUsize,
    closed: AtomicBool,
}

type Gate = Arc<GateState>;

impl Server {
    async fn start() -> Self {
        Self::start_at("127.0.0.1").await
    }

    /// A server on another loopback address: another destination host (a breaker of its own).
    async fn start_at(ip: &str) -> Self {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (seen, gate, down): (Seen, Gate, Arc<AtomicBool>) = Default::default();
        let app = Router::new().route("/{what}", get(answer).post(answer)).with_state((
            seen.clone(),
            port,
            gate.clone(),
            down.clone(),
        ));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Self { ip: ip.to_string(), port, seen, gate, down }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr())
    }

    /// Its address and port.
    fn addr(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }

    fn seen(&self, path: &str) -> Vec<String> {
        self.seen.lock().unwrap().iter().filter(|(p, _)| p == path).map(|(_, k)| k.clone()).collect()
    }
}

async fn answer(
    State((seen, port, gate, down)): State<(Seen, u16, Gate, Arc<AtomicBool>)>,
    Path(what): Path<String>,
    headers: HeaderMap,
) -> axum::response::Response {
    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    seen.lock().unwrap().push((format!("/{what}"), key));
    match what.as_str() {
        "ok" => "pong".into_response(),
        "fail" => (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response(),
        "flaky" if down.load(Ordering::SeqCst) => (StatusCode::INTERNAL_SERVER_ERROR, "down").into_response(),
        "flaky" => "recovered".into_response(),
        "gate" => {
            let now = gate.inside.fetch_add(1, Ordering::SeqCst) + 1;
            gate.most.fetch_max(now, Ordering::SeqCst);
            let held = Instant::now();
            match gate.closed.load(Ordering::SeqCst) {
                true => {
                    while gate.closed.load(Ordering::SeqCst) && held.elapsed() < Duration::from_secs(15) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                }
                false => tokio::time::sleep(Duration::from_millis(300)).await,
            }
            gate.inside.fetch_sub(1, Ordering::SeqCst);
            "through".into_response()
        }
        "redirect" => (StatusCode::FOUND, [(header::LOCATION, format!("http://localhost:{port}/ok"))]).into_response(),
        "big" => vec![b'x'; 4096].into_response(),
        "bigheaders" => {
            // 90 headers of 4,000 bytes: within hyper's defaults (~408 KiB and 100 headers, with
            // the server's own), over the host's 64 KiB.
            let mut response = "small body".into_response();
            for n in 0..90 {
                let name = axum::http::HeaderName::try_from(format!("x-h{n}")).unwrap();
                response.headers_mut().insert(name, "a".repeat(4000).parse().unwrap());
            }
            response
        }
        "stream" => {
            let chunks = (0..4).map(|_| Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'y'; 1024])));
            axum::body::Body::from_stream(futures::stream::iter(chunks)).into_response()
        }
        "slow" => {
            tokio::time::sleep(Duration::from_secs(10)).await;
            "late".into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

/// A host running `caller`, granted `grants`, with `tweak` applied to its limits.
async fn host(grants: Vec<String>, limits: &[(&str, Value)]) -> TestHost {
    host_on(&Bus::Embedded, grants, limits).await
}

/// [`host`] on `bus`.
async fn host_on(bus: &Bus<'_>, grants: Vec<String>, limits: &[(&str, Value)]) -> TestHost {
    TestHost::start_on(bus, &["caller"], |c: &mut Config| {
        fast_retries(c);
        let p = c.plugins.entry("caller".into()).or_default();
        p.allowed_outbound = grants;
        for (k, v) in limits {
            p.limits.insert(k.to_string(), v.clone());
        }
    })
    .await
}

/// Publishes a call spec and returns the first outcome it caused.
async fn call(t: &TestHost, spec: Value) -> (String, Value) {
    let mut seen = t.observe(&["caller.out.>", "plugbus.dlq.caller"]).await;
    let id = t.publish("caller.go", spec.to_string()).await;
    let out = seen
        .next_where(|e| {
            e.header("plugbus-caused-by") == Some(id.as_str())
                || e.header(plugbus::deadletter::headers::ORIGINAL_ID) == Some(id.as_str())
        })
        .await;
    if let Some(error) = out.header(plugbus::deadletter::headers::ERROR) {
        panic!("the call was dead-lettered: {error}");
    }
    (out.subject.clone(), serde_json::from_slice(&out.data).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_call_carries_the_same_idempotency_key_on_every_retry() {
    let server = Server::start().await;
    let t = host(vec![format!("http://127.0.0.1:{}", server.port)], &[]).await;
    let (subject, out) = call(&t, json!({ "url": server.url("/ok"), "fail_before": 3 })).await;
    assert_eq!(subject, "caller.out.ok", "{out}");
    assert_eq!(out["body"], "pong");
    assert_eq!(out["attempt"], 3);
    let keys = server.seen("/ok");
    assert_eq!(keys.len(), 3, "one call per attempt: {keys:?}");
    assert!(keys[0].len() == 32 && keys[0].bytes().all(|b| b.is_ascii_hexdigit()), "{keys:?}");
    assert!(keys.iter().all(|k| *k == keys[0]), "the key changed between retries: {keys:?}");

    // Another event, two calls: new keys, one per call.
    let (subject, _) = call(&t, json!({ "url": server.url("/ok"), "calls": 2 })).await;
    assert_eq!(subject, "caller.out.ok");
    let keys = server.seen("/ok");
    assert_eq!(keys.len(), 5);
    assert!(keys[3] != keys[0] && keys[4] != keys[3], "{keys:?}");

    // Two producers' events with the same id are two events: two keys. With the id alone in
    // it, a provider answered the second charge with the first one's (review 55b M1).
    for (calls, source) in [(6, "/shop"), (7, "/billing")] {
        let mut ev = plugbus::Event::new("caller.go", json!({ "url": server.url("/ok") }).to_string());
        (ev.id, ev.source) = ("order-1001".into(), source.into());
        t.host.publish(ev).await.expect("publish");
        plugbus_tests::eventually("its call is made", || server.seen("/ok").len() == calls).await;
    }
    let keys = server.seen("/ok");
    assert_ne!(keys[5], keys[6], "{keys:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_not_granted_is_refused_with_the_reason() {
    let (granted, other) = (Server::start().await, Server::start().await);
    let t = host(vec![format!("http://127.0.0.1:{}", granted.port)], &[]).await;
    let (subject, out) = call(&t, json!({ "url": other.url("/ok") })).await;
    assert_eq!(subject, "caller.out.err", "{out}");
    let error = out["error"].as_str().unwrap();
    assert!(error.contains(&format!("http://127.0.0.1:{} is not granted", other.port)), "{error}");
    assert!(error.contains("[plugins.caller] allowed_outbound"), "{error}");
    assert!(out["kind"].as_str().unwrap().starts_with("Refused"), "{out}");
    assert!(other.seen("/ok").is_empty(), "the refused server was reached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_resolving_to_loopback_is_refused_unless_granted_by_address() {
    let server = Server::start().await;
    // `localhost` is granted by name (and requested by the manifest): it resolves to loopback,
    // which only an exact address grants.
    let grants = vec![format!("http://localhost:{}", server.port), format!("http://127.0.0.1:{}", server.port)];
    let t = host(grants, &[]).await;
    let (subject, out) = call(&t, json!({ "url": format!("http://localhost:{}/ok", server.port) })).await;
    assert_eq!(subject, "caller.out.err", "{out}");
    let error = out["error"].as_str().unwrap();
    assert!(error.contains("localhost resolves to") && error.contains("(loopback)"), "{error}");
    assert!(server.seen("/ok").is_empty(), "the loopback server was reached through a name");
    // The same server by its exact address is reachable.
    let (subject, out) = call(&t, json!({ "url": server.url("/ok") })).await;
    assert_eq!(subject, "caller.out.ok", "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redirect_to_a_refused_host_is_refused() {
    let server = Server::start().await;
    let t = host(vec![format!("http://127.0.0.1:{}", server.port)], &[]).await;
    let (subject, out) = call(&t, json!({ "url": server.url("/redirect") })).await;
    assert_eq!(subject, "caller.out.err", "{out}");
    let error = out["error"].as_str().unwrap();
    assert!(error.contains(&format!("http://localhost:{} is not granted", server.port)), "{error}");
    assert_eq!(server.seen("/redirect").len(), 1);
    assert!(server.seen("/ok").is_empty(), "the redirect was followed to a refused host");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_response_or_request_is_refused() {
    let server = Server::start().await;
    let limits = [("max_outbound_response_bytes", json!(2048)), ("max_outbound_request_bytes", json!(1024))];
    let t = host(vec![format!("http://127.0.0.1:{}", server.port)], &limits).await;
    let spec = json!({ "url": server.url("/ok"), "method": "POST", "body": "z".repeat(4096) });
    let (subject, out) = call(&t, spec).await;
    assert_eq!(subject, "caller.out.err", "{out}");
    assert_eq!(out["kind"], "TooLarge { what: \"request body\" }", "{out}");
    assert!(server.seen("/ok").is_empty(), "the oversized request went out");
    for path in ["/big", "/stream"] {
        let (subject, out) = call(&t, json!({ "url": server.url(path) })).await;
        assert_eq!(subject, "caller.out.err", "{path}: {out}");
        assert!(out["kind"].as_str().unwrap().starts_with("TooLarge"), "{path}: {out}");
    }
}

/// Review 56c M1: a granted server's response head was bounded only by hyper's defaults (~408 KiB,
/// 100 headers), each held in the host outside every limit while the plugin kept the response.
/// Over 64 KiB it is refused, `TooLarge` ("response headers").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_response_whose_headers_are_over_64_kib_is_refused() {
    let server = Server::start().await;
    let t = host(vec![format!("http://127.0.0.1:{}", server.port)], &[]).await;
    let (subject, out) = call(&t, json!({ "url": server.url("/bigheaders") })).await;
    assert_eq!(subject, "caller.out.err", "{out}");
    assert_eq!(out["kind"], "TooLarge { what: \"response headers\" }", "{out}");
    let (subject, out) = call(&t, json!({ "url": server.url("/ok") })).await;
    assert_eq!(subject, "caller.out.ok", "the plugin goes on calling: {out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_server_times_out_within_the_limit() {
    let server = Server::start().await;
    let t = host(vec![format!("http://127.0.0.1:{}", server.port)], &[("outbound_timeout", json!("300ms"))]).await;
    let started = Instant::now();
    let (subject, out) = call(&t, json!({ "url": server.url("/slow") })).await;
    assert_eq!(subject, "caller.out.err", "{out}");
    assert_eq!(out["kind"], "Timeout", "{out}");
    assert!(started.elapsed() < Duration::from_secs(3), "took {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_never_outlasts_the_event_deadline() {
    let server = Server::start().await;
    let limits = [("outbound_timeout", json!("30s")), ("deadline", json!("400ms"))];
    let t = host(vec![format!("http://127.0.0.1:{}", server.port)], &limits).await;
    let mut dead = t.observe(&["plugbus.dlq.caller"]).await;
    let started = Instant::now();
    let id = t.publish("caller.go", json!({ "url": server.url("/slow") }).to_string()).await;
    let letter = dead.next_where(|e| e.header(plugbus::deadletter::headers::ORIGINAL_ID) == Some(id.as_str())).await;
    let error = letter.header(plugbus::deadletter::headers::ERROR).unwrap();
    assert!(error.contains("deadline of 400ms exceeded"), "{error}");
    // three attempts of at most 400 ms each (plus backoff), not 30 s or the server's 10 s
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}", started.elapsed());
    assert_eq!(server.seen("/slow").len(), 3);
}

/// The attack: an attempt's kv commit conflicts, and a re-run in place would make its calls
/// again under fresh per-attempt limits (100 re-runs: 100 times `max_outbound_requests`). An
/// attempt that called out is not re-run in place: it fails as a kv conflict and is retried
/// as the next attempt, which the plugin's attempts bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_called_out_is_not_run_again_in_place_after_a_kv_conflict() {
    let server = Server::start().await;
    let patient = [("deadline", json!("30s")), ("outbound_timeout", json!("30s"))];
    let t = host(vec!["http://127.0.0.1:*".into()], &patient).await;
    let mut seen = t.observe(&["caller.out.>", "plugbus.dlq.caller"]).await;
    // The slow one reads `n`, is held on `/gate`, writes `n`; the fast one writes `n`
    // meanwhile, so the slow one's first commit conflicts.
    server.gate.closed.store(true, Ordering::SeqCst);
    let slow = t.publish("caller.go", json!({ "url": server.url("/gate"), "bump": "n" }).to_string()).await;
    eventually("the slow one read n and called /gate", || server.seen("/gate").len() == 1).await;
    let fast = t.publish("caller.go", json!({ "url": server.url("/ok"), "bump": "n" }).to_string()).await;
    let first = seen.next_where(|e| e.header("plugbus-caused-by") == Some(fast.as_str())).await;
    assert_eq!(first.subject, "caller.out.ok", "{first:?}");
    server.gate.closed.store(false, Ordering::SeqCst);
    let out = seen.next_where(|e| e.header("plugbus-caused-by") == Some(slow.as_str())).await;
    assert_eq!(out.subject, "caller.out.ok", "{out:?}");
    let body: Value = serde_json::from_slice(&out.data).unwrap();
    assert_eq!(body["attempt"], 2, "the conflicting attempt was run again in place: {body}");
    assert_eq!(server.seen("/gate").len(), 2, "one call per attempt");
    assert_eq!(t.counter("caller", "retried"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_cannot_choose_its_idempotency_key() {
    let server = Server::start().await;
    let t = host(vec![format!("http://127.0.0.1:{}", server.port)], &[]).await;
    let spec = json!({ "url": server.url("/ok"), "key": "forged" });
    let (subject, _) = call(&t, spec).await;
    assert_eq!(subject, "caller.out.ok");
    let keys = server.seen("/ok");
    assert_eq!(keys.len(), 1);
    assert!(keys[0] != "forged" && keys[0].len() == 32, "{keys:?}");
}

/// The most `/gate` calls in flight at once when two events each make one, concurrently: the
/// gate holds them until as many as the limit allows (two at most) are in, then 300 ms more.
async fn most_at_once(concurrency: u32) -> usize {
    let server = Server::start().await;
    let limits = [
        ("max_outbound_concurrency", json!(concurrency)),
        ("deadline", json!("30s")),
        ("outbound_timeout", json!("30s")),
    ];
    let t = host(vec![format!("http://127.0.0.1:{}", server.port)], &limits).await;
    let mut seen = t.observe(&["caller.out.>"]).await;
    server.gate.closed.store(true, Ordering::SeqCst);
    let spec = json!({ "url": server.url("/gate") }).to_string();
    let ids = [t.publish("caller.go", spec.clone()).await, t.publish("caller.go", spec).await];
    let allowed = (concurrency as usize).min(2);
    eventually("the calls allowed at once are in", || server.gate.inside.load(Ordering::SeqCst) >= allowed).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.gate.closed.store(false, Ordering::SeqCst);
    for _ in 0..2 {
        let e = seen.next_where(|e| ids.iter().any(|id| e.header("plugbus-caused-by") == Some(id.as_str()))).await;
        assert_eq!(e.subject, "caller.out.ok", "{:?}", String::from_utf8_lossy(&e.data));
    }
    server.gate.most.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_concurrency_is_bounded_per_plugin() {
    assert_eq!(most_at_once(8).await, 2, "the two events' calls overlap when allowed");
    assert_eq!(most_at_once(1).await, 1, "max_outbound_concurrency = 1 let two calls out at once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_past_the_per_event_limit_are_refused() {
    let server = Server::start().await;
    let t = host(vec![format!("http://127.0.0.1:{}", server.port)], &[("max_outbound_requests", json!(2))]).await;
    let mut seen = t.observe(&["caller.out.>"]).await;
    let id = t.publish("caller.go", json!({ "url": server.url("/ok"), "calls": 3 }).to_string()).await;
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let e = seen.next_where(|e| e.header("plugbus-caused-by") == Some(id.as_str())).await;
        outcomes.push((e.subject.clone(), serde_json::from_slice::<Value>(&e.data).unwrap()));
    }
    outcomes.sort_by_key(|(_, v)| v["index"].as_u64());
    assert_eq!(outcomes[0].0, "caller.out.ok");
    assert_eq!(outcomes[1].0, "caller.out.ok");
    assert_eq!(outcomes[2].0, "caller.out.err", "{outcomes:?}");
    let error = outcomes[2].1["error"].as_str().unwrap();
    assert!(error.contains("outbound request limit of 2 per event reached"), "{error}");
    assert_eq!(server.seen("/ok").len(), 2);
}

/// The caller's breaker for `host` as `/v1/plugins` shows it.
fn breaker(t: &TestHost, host: &str) -> Option<plugbus::sandbox::BreakerView> {
    let caller = t.host.router().plugins().into_iter().find(|p| p.name == "caller")?;
    caller.outbound?.breakers.into_iter().find(|b| b.host == host)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_after_n_failures_and_closes_after_the_cool_down() {
    let server = Server::start().await;
    let limits = [("outbound_breaker_failures", json!(2)), ("outbound_breaker_cooldown", json!("1s"))];
    let t = host(vec![format!("http://127.0.0.1:{}", server.port)], &limits).await;
    let mut seen = t.observe(&["caller.out.>"]).await;
    let id = t.publish("caller.go", json!({ "url": server.url("/fail"), "calls": 3 }).to_string()).await;
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        let e = seen.next_where(|e| e.header("plugbus-caused-by") == Some(id.as_str())).await;
        outcomes.push(serde_json::from_slice::<Value>(&e.data).unwrap());
    }
    outcomes.sort_by_key(|v| v["index"].as_u64());
    assert_eq!(outcomes[0]["status"], 500);
    assert_eq!(outcomes[1]["status"], 500);
    let kind = outcomes[2]["kind"].as_str().unwrap();
    assert!(kind.starts_with("CircuitOpen { host: \"127.0.0.1\""), "{outcomes:?}");
    assert_eq!(server.seen("/fail").len(), 2, "the open breaker let a call through");
    assert_eq!(breaker(&t, "127.0.0.1").unwrap().state, "open");
    let metrics = reqwest::get(format!("{}/metrics", t.url())).await.unwrap().text().await.unwrap();
    let line = metrics.lines().find(|l| l.contains("outbound_breaker_open{") && l.contains("caller")).unwrap_or("");
    assert!(line.ends_with(" 1"), "{line:?} in\n{metrics}");

    // After the cool-down one probe goes through; its success closes the breaker.
    plugbus_tests::eventually("the breaker half-opens", || {
        breaker(&t, "127.0.0.1").is_some_and(|b| b.state == "half-open")
    })
    .await;
    let (subject, out) = call(&t, json!({ "url": server.url("/ok") })).await;
    assert_eq!(subject, "caller.out.ok", "{out}");
    let b = breaker(&t, "127.0.0.1").unwrap();
    assert_eq!((b.state, b.opened), ("closed", 1));
}

/// The adversary is an outage: a provider down long enough to open the breaker. An event that
/// needs it must wait for the cool-down (not burn its attempts on instant refusals and be
/// dead-lettered in milliseconds), go through as the half-open probe once the provider is back,
/// and see the attempt number it would have seen without the outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_makes_the_event_wait_its_cool_down_without_burning_attempts() {
    waits_out_an_open_breaker(&Bus::Embedded).await;
}

/// The same on JetStream: the wait is held in the host (kept alive with `in-progress`), not
/// `nak`ed: JetStream delivers each of the two events once, so its delivery count (the attempt
/// number there, capped by `max_deliver`) is not spent either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_an_open_breaker_makes_the_event_wait_without_a_redelivery() {
    let nats = NatsServer::start().await;
    waits_out_an_open_breaker(&Bus::JetStream(&nats)).await;
    let js = async_nats::jetstream::new(nats.client().await);
    let stream =
        js.get_stream(js.stream_by_subject("caller.go").await.expect("a stream captures caller.go")).await.unwrap();
    let infos: Vec<_> = futures::StreamExt::collect(stream.consumers()).await;
    let [Ok(info)] = &infos[..] else { panic!("one consumer on caller.go: {infos:?}") };
    assert_eq!(info.delivered.consumer_sequence, 2, "JetStream delivered again: the wait was a nak: {info:?}");
}

async fn waits_out_an_open_breaker(bus: &Bus<'_>) {
    let server = Server::start().await;
    server.down.store(true, Ordering::SeqCst);
    let cooldown = Duration::from_secs(2);
    let limits = [("outbound_breaker_failures", json!(2)), ("outbound_breaker_cooldown", json!("2s"))];
    // fast_retries: 3 attempts 5-20 ms apart, all within the cool-down if the refusals counted.
    let t = host_on(bus, vec![format!("http://127.0.0.1:{}", server.port)], &limits).await;
    // Two failed calls open the breaker (this caller swallows its errors).
    let (_, out) = call(&t, json!({ "url": server.url("/flaky"), "calls": 2 })).await;
    assert_eq!(out["status"], 500, "{out}");
    plugbus_tests::eventually("the breaker opens", || breaker(&t, "127.0.0.1").is_some_and(|b| b.state == "open"))
        .await;
    let opened = Instant::now();
    // The provider is back, but the breaker does not know it until its probe.
    server.down.store(false, Ordering::SeqCst);

    let (subject, out) = call(&t, json!({ "url": server.url("/flaky"), "strict": true })).await;
    assert_eq!(subject, "caller.out.ok", "{out}");
    assert_eq!(out["body"], "recovered");
    assert_eq!(out["attempt"], 1, "the waits for the breaker were charged as attempts: {out}");
    assert!(opened.elapsed() >= cooldown - Duration::from_millis(100), "went through before the cool-down");
    assert!(t.counter("caller", "circuit_waits") >= 1, "the event never met the open breaker: the test lost its point");
    assert_eq!(t.counter("caller", "dead_lettered"), 0);
    // It waited instead of hammering: two failures, then the one probe that closed the breaker.
    assert_eq!(server.seen("/flaky").len(), 3, "{:?}", server.seen("/flaky"));
    let b = breaker(&t, "127.0.0.1").unwrap();
    assert_eq!((b.state, b.opened), ("closed", 1));
}

/// A provider that never comes back: an event still ends in a dead letter. Each cool-down its
/// attempt is the probe, which fails and counts; the refusals between probes do not. With
/// `max_circuit_wait = "0s"` no wait is free: the refusals count too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_that_never_comes_back_still_ends_in_a_dead_letter() {
    for (budget, waits, calls, least_ms) in [("10m", 2, 3, 550), ("0s", 0, 2, 250)] {
        let server = Server::start().await;
        server.down.store(true, Ordering::SeqCst);
        let limits = [("outbound_breaker_failures", json!(1)), ("outbound_breaker_cooldown", json!("300ms"))];
        let t = TestHost::start_with(&["caller"], |c: &mut Config| {
            fast_retries(c);
            c.retry.max_circuit_wait = humantime::parse_duration(budget).unwrap();
            let p = c.plugins.entry("caller".into()).or_default();
            p.allowed_outbound = vec![format!("http://127.0.0.1:{}", server.port)];
            for (k, v) in limits {
                p.limits.insert(k.to_string(), v.clone());
            }
        })
        .await;
        let mut seen = t.observe(&["plugbus.dlq.caller"]).await;
        let started = Instant::now();
        t.publish("caller.go", json!({ "url": server.url("/flaky"), "strict": true }).to_string()).await;
        let dead = seen.next_on("plugbus.dlq.caller").await;
        let error = dead.header(plugbus::deadletter::headers::ERROR).unwrap_or_default().to_string();
        let attempts = dead.header(plugbus::deadletter::headers::ATTEMPTS).unwrap_or_default().to_string();
        assert_eq!(attempts, "3", "budget {budget}: {error}");
        assert_eq!(t.counter("caller", "circuit_waits"), waits, "budget {budget}");
        assert_eq!(server.seen("/flaky").len(), calls, "budget {budget}: one call per probe, none between");
        // Every retry after a refusal waited for the breaker, counted or not.
        assert!(started.elapsed() >= Duration::from_millis(least_ms), "budget {budget}: {:?}", started.elapsed());
    }
}

/// An open breaker's wait is free only for what runs again harmlessly. An attempt that also made
/// an outbound call runs again uncharged: the call repeats under the same `Idempotency-Key`
/// (fetching a token before the payment is the common case). One that sent a request is charged:
/// run again uncharged, each run asked again (another plugin's handler ran each time, under
/// fresh per-attempt limits) for as long as `max_circuit_wait`, where the README bounds requests
/// by `max_attempts` (review 55b M2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_sent_a_request_is_charged_though_a_breaker_refused_its_call() {
    // Two destination hosts: a breaker is per host.
    let (up, down) = (Server::start_at("127.0.0.2").await, Server::start().await);
    down.down.store(true, Ordering::SeqCst);
    let t = TestHost::start_with(&["caller"], |c: &mut Config| {
        fast_retries(c);
        c.retry.max_circuit_wait = Duration::from_secs(600);
        let p = c.plugins.entry("caller".into()).or_default();
        p.allowed_outbound = vec![format!("http://{}", up.addr()), format!("http://{}", down.addr())];
        p.limits.insert("outbound_breaker_failures".into(), json!(1));
        p.limits.insert("outbound_breaker_cooldown".into(), json!("300ms"));
    })
    .await;
    let mut seen = t.observe(&["plugbus.dlq.caller"]).await;
    let attempts_of = |dead: &plugbus::Event| dead.header(plugbus::deadletter::headers::ATTEMPTS).map(str::to_string);

    // An outbound call first: waits uncharged; each run's call repeats the key. (Attempt 1 opens
    // the breaker; 2 is refused, waits, runs again as 2 (the probe, failing); 3 likewise.)
    let spec = json!({ "first": up.url("/ok"), "url": down.url("/flaky"), "strict": true });
    t.publish("caller.go", spec.to_string()).await;
    let dead = seen.next_on("plugbus.dlq.caller").await;
    assert_eq!(attempts_of(&dead).as_deref(), Some("3"));
    assert_eq!(t.counter("caller", "circuit_waits"), 2);
    let keys = up.seen("/ok");
    assert_eq!(keys.len(), 5, "{keys:?}");
    assert!(keys.iter().all(|k| *k == keys[0]), "a run again made a new call: {keys:?}");

    // A request first: charged, never run again uncharged.
    let spec = json!({ "ask": "caller.out.ask", "url": down.url("/flaky"), "strict": true });
    t.publish("caller.go", spec.to_string()).await;
    let dead = seen.next_on("plugbus.dlq.caller").await;
    assert_eq!(attempts_of(&dead).as_deref(), Some("3"));
    assert_eq!(t.counter("caller", "circuit_waits"), 2, "no wait was free");
}

/// A guest that builds requests and never sends them (no grant needed): what the host holds for
/// their bodies and header maps is bounded per body and per map, not wasmtime-wasi-http's 1 MiB
/// per body and 128 KiB per map (×hundreds of handles per attempt, ×concurrent attempts).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_and_headers_staged_and_never_sent_hold_little_in_the_host() {
    use plugbus::sandbox::limits::{HTTP_FIELDS_BYTES, OUTGOING_BODY_CHUNK_BYTES};
    let t = host(Vec::new(), &[]).await;
    let under = HTTP_FIELDS_BYTES as u64 - 1029;
    let (subject, staged) = call(&t, json!({ "stage": 100, "header_bytes": under })).await;
    assert_eq!(subject, "caller.out.staged");
    assert_eq!(staged["bodies"], 100, "{staged}");
    let body = staged["body_bytes"].as_u64().unwrap();
    // Two writes per body at most: one queued, one in the channel to the (never started) request.
    let most = 100 * 2 * OUTGOING_BODY_CHUNK_BYTES as u64;
    assert!(body > 0 && body <= most, "{body} bytes held for 100 bodies never sent, over {most}");
    assert!(staged["header_bytes"].as_u64().unwrap() > under - 1029, "{staged}");
    // One header map past the cap fails the attempt (wasmtime-wasi-http traps), naming it.
    let mut dead = t.observe(&["plugbus.dlq.caller"]).await;
    let spec = json!({ "stage": 0, "header_bytes": HTTP_FIELDS_BYTES + 2 * 1029 });
    t.publish("caller.go", spec.to_string()).await;
    let error =
        dead.next_on("plugbus.dlq.caller").await.header(plugbus::deadletter::headers::ERROR).unwrap().to_string();
    assert!(error.contains("total size of fields exceeds limit"), "{error}");
}

/// Review 59d F1: a request's authority and method were kept at any length (the path up to 64
/// KiB) for as long as the guest held the request: 200 requests given 1 MiB of each held 400
/// MiB in the host, outside every memory limit (a thousand handles of 4 MiB ones, gigabytes).
/// Past their caps they are refused as invalid ones are, and nothing of them is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requests_authority_method_and_path_are_kept_only_within_their_caps() {
    use plugbus::sandbox::limits::{MAX_HTTP_AUTHORITY_BYTES, MAX_HTTP_METHOD_BYTES, MAX_HTTP_PATH_BYTES};
    let t = host(Vec::new(), &[]).await;
    let at_the_caps = json!({ "strings": 4, "authority_bytes": MAX_HTTP_AUTHORITY_BYTES,
        "method_bytes": MAX_HTTP_METHOD_BYTES, "path_bytes": MAX_HTTP_PATH_BYTES });
    let (subject, took) = call(&t, at_the_caps).await;
    assert_eq!(subject, "caller.out.strings");
    assert_eq!((&took["authorities"], &took["methods"], &took["paths"]), (&json!(4), &json!(4), &json!(4)), "{took}");
    let past = json!({ "strings": 200, "authority_bytes": 1 << 20, "method_bytes": 1 << 20,
        "path_bytes": MAX_HTTP_PATH_BYTES + 1 });
    let (_, took) = call(&t, past).await;
    assert_eq!(took["requests"], 200, "{took}");
    assert_eq!((&took["authorities"], &took["methods"], &took["paths"]), (&json!(0), &json!(0), &json!(0)), "{took}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_client_is_linked_only_when_granted_and_only_for_plugins_that_ask() {
    let sandbox = Sandbox::new(SandboxSettings::default()).unwrap();
    let settings = |grants: Vec<String>| {
        move |_: &_| PluginSettings {
            limits: Default::default(),
            config: Default::default(),
            kv: Arc::new(plugbus::kv::MemoryKv::new()),
            allowed_outbound: grants,
        }
    };
    let caller = std::fs::read(wasm("caller")).unwrap();
    // Asked for but not granted: it loads (its calls may be optional), and every call is
    // refused naming the missing grant; nothing is sent.
    let server = Server::start().await;
    let ungranted = sandbox.load(&caller, settings(Vec::new())).await.expect("loads without a grant");
    let ev = plugbus::Event::new("caller.go", json!({ "url": server.url("/ok") }).to_string());
    let attempt = ungranted.handle(&ev, 1).await;
    assert!(attempt.result.is_ok(), "{:?}", attempt.result);
    let out = String::from_utf8_lossy(&attempt.outputs[0].data).into_owned();
    assert!(
        out.contains("Refused")
            && out.contains("is not granted to the plugin (operator: [plugins.caller] allowed_outbound)"),
        "{out}"
    );
    assert!(server.seen("/ok").is_empty());
    let plugin = sandbox.load(&caller, settings(vec!["http://127.0.0.1:8080".into()])).await.unwrap();
    assert_eq!(plugin.manifest().outbound, ["http://127.0.0.1:*", "http://127.0.0.2:*", "http://localhost:*"]);
    assert_eq!(plugin.outbound().granted, ["http://127.0.0.1:8080"]);
    // `plugbus inspect` shows both sides.
    let mut config = Config::default();
    config.plugins.entry("caller".into()).or_default().allowed_outbound = vec!["http://127.0.0.1:8080".into()];
    let report = plugbus::inspect::inspect(&sandbox, "caller.wasm", &caller, &config).await;
    assert!(report.loadable, "{report}");
    let text = report.to_string();
    assert!(text.contains("outbound   requested http://127.0.0.1:*, http://127.0.0.2:*, http://localhost:*"), "{text}");
    assert!(text.contains("granted   http://127.0.0.1:8080"), "{text}");
    let ungranted = plugbus::inspect::inspect(&sandbox, "caller.wasm", &caller, &Config::default()).await;
    assert!(ungranted.loadable, "{ungranted}");
    assert!(
        ungranted.to_string().contains("granted   (none: it loads, and every call it makes is refused)"),
        "{ungranted}"
    );

    // A repeatable run (`plugbus test`) makes no call, even when granted.
    let grant = vec![format!("http://127.0.0.1:{}", server.port)];
    let plugin = sandbox.load(&caller, settings(grant)).await.unwrap();
    let ev = plugbus::Event::new("caller.go", json!({ "url": server.url("/ok") }).to_string());
    let attempt = plugin.handle_fixed(&ev, 1, &plugbus::sandbox::FixedWorld::of(&ev)).await;
    assert!(attempt.result.is_ok(), "{:?}", attempt.result);
    let out = String::from_utf8_lossy(&attempt.outputs[0].data).into_owned();
    assert!(out.contains("outbound HTTP is off in repeatable runs"), "{out}");
    assert!(server.seen("/ok").is_empty());

    // A handler that never calls http imports none of it.
    let echo = std::fs::read(wasm("echo")).unwrap();
    let imports = plugbus::inspect::inspect(&sandbox, "echo.wasm", &echo, &Config::default()).await.imports;
    assert!(!imports.iter().any(|i| i.starts_with("wasi:http")), "{imports:?}");
}
