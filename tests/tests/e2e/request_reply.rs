//! Request/reply (issue #16): `plugbus_sdk::request` / `reply` between two plugins on the embedded
//! bus, on core NATS and on JetStream (durable responders: the request is stored), a timeout on
//! each, `POST /v1/request/{subject}` (200, 504 and its
//! refusals), and each adversary: a subject the plugin may not publish to, a forged reply-to, a
//! reply sent twice, a huge reply, a flood of requests in one event, a timeout longer than the
//! event's deadline, a late reply (dropped and counted), a NATS publisher steering a reply onto an
//! ordinary subject; and a component built against contract 0.1.0 still loading.

use plugbus_tests::nats::NatsServer;
use plugbus_tests::{Bus, TestHost, fast_retries, plugbus_bin, wasm};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Runs a shared case on the embedded bus and on core NATS.
macro_rules! on_both_buses {
    ($case:ident) => {
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$case(&super::Bus::Embedded).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn core_nats() {
                let server = super::NatsServer::start().await;
                super::$case(&super::Bus::Core(&server)).await;
            }

            /// Every plugin durable: the requests are stored in a stream, the responder answers
            /// from its durable consumer.
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn jetstream() {
                let server = super::NatsServer::start().await;
                super::$case(&super::Bus::JetStream(&server)).await;
            }
        }
    };
}

on_both_buses!(a_plugin_asks_another_and_gets_its_reply);
on_both_buses!(no_reply_within_the_timeout_is_a_timeout_error);
on_both_buses!(a_failed_attempt_replies_nothing_and_its_retry_replies);
on_both_buses!(the_http_route_answers_with_the_reply_or_504);
on_both_buses!(the_plugin_sees_an_opaque_reply_to_never_the_inbox);
on_both_buses!(a_request_asked_again_with_the_same_ce_id_is_answered_again);

async fn start(bus: &Bus<'_>) -> TestHost {
    TestHost::start_on(bus, &["asker", "responder"], fast_retries).await
}

/// Has `asker` request `subject` with `data`; returns what it published about the outcome.
async fn ask(t: &TestHost, subject: &str, data: &str, timeout_ms: u64) -> Value {
    let mut seen = t.observe(&["asked.one"]).await;
    let cmd = json!({ "subject": subject, "data": data, "timeout_ms": timeout_ms }).to_string();
    t.publish("ask.one", cmd).await;
    let out = seen.next_on("asked.one").await;
    serde_json::from_slice(&out.data).unwrap()
}

/// With tracing off, a host is a transparent hop: a request carries the context its input came
/// with, as an output does, so a responder on a host that exports joins the trace. It used to
/// carry none, and the responder started a trace of its own mid-chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_passes_its_inputs_trace_context_on_when_tracing_is_off() {
    let t = TestHost::start(&["asker", "responder"]).await;
    let mut reported = t.observe(&["rpc.out.count"]).await;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let cmd = json!({ "subject": "rpc.count", "data": "", "timeout_ms": 5000 }).to_string();
    let ev = plugbus::Event::new("ask.one", cmd).with_header("traceparent", traceparent);
    t.host.publish(ev).await.unwrap();
    // The responder's output carries its input's (the request's) context on.
    let out = reported.next_on("rpc.out.count").await;
    let carried = out.header("traceparent").unwrap_or_default();
    assert!(carried.starts_with("00-0af7651916cd43dd8448eb211c80319c-"), "{carried:?}");
}

async fn a_plugin_asks_another_and_gets_its_reply(bus: &Bus<'_>) {
    let t = start(bus).await;
    let got = ask(&t, "rpc.echo", "hello", 5000).await;
    assert_eq!(got["ok"], "HELLO", "{got}");
    assert_eq!(got["subject"], "rpc.echo", "the reply comes on the subject asked on, never an inbox: {got}");
    assert_eq!(got["source"], "plugbus/responder", "{got}");
    assert_eq!(got["content_type"], "text/plain", "{got}");
    assert_eq!(got["answered_by"], "responder", "{got}");
    assert_eq!(got["reply_to"], Value::Null, "{got}");
    t.wait_counter("responder", "ok", 1).await;
}

async fn no_reply_within_the_timeout_is_a_timeout_error(bus: &Bus<'_>) {
    let t = start(bus).await;
    let started = Instant::now();
    let got = ask(&t, "rpc.silent", "", 300).await;
    let took = started.elapsed();
    assert_eq!(got["err"], "timeout", "{got}");
    assert!(got["message"].as_str().unwrap().contains("no reply on rpc.silent within 300ms"), "{got}");
    assert!(took < Duration::from_secs(5), "the timeout took {took:?}");
    t.wait_counter("asker", "ok", 1).await;
}

async fn a_failed_attempt_replies_nothing_and_its_retry_replies(bus: &Bus<'_>) {
    let t = start(bus).await;
    // The responder replies "attempt 1" and then fails: that reply must never be released.
    let got = ask(&t, "rpc.flaky", "", 10_000).await;
    assert_eq!(got["ok"], "attempt 2", "{got}");
    assert_eq!(t.counter("responder", "retried"), 1);
}

async fn the_http_route_answers_with_the_reply_or_504(bus: &Bus<'_>) {
    let t = start(bus).await;
    let http = reqwest::Client::new();
    let resp = http.post(format!("{}/v1/request/rpc.echo", t.url())).body("hi there").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    assert_eq!(header("content-type").as_deref(), Some("text/plain"));
    assert_eq!(header("ce-source").as_deref(), Some("plugbus/responder"));
    assert_eq!(header("ce-specversion").as_deref(), Some("1.0"));
    assert_eq!(header("answered-by"), None, "a reply header that is not a CloudEvents attribute");
    assert_eq!(resp.text().await.unwrap(), "HI THERE");

    // The attack: a reply whose headers, copied onto the response, would reframe it (its bytes
    // read as the next response on a kept-alive connection), set a cookie on the API's origin or
    // redirect the requester. Only `ce-*` attributes and the content type come back.
    let resp = http.post(format!("{}/v1/request/rpc.framing", t.url())).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    for name in ["set-cookie", "location", "transfer-encoding", "answered-by"] {
        assert_eq!(resp.headers().get(name), None, "{name} came back: {:?}", resp.headers());
    }
    let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
    assert_eq!(header("content-length").as_deref(), Some("12"), "{:?}", resp.headers());
    assert_eq!(header("ce-answeredby").as_deref(), Some("responder"), "an attribute comes back as ce-*");
    // the plugin chooses the content type: never sniffed into another, never a page of the API's
    assert_eq!(header("x-content-type-options").as_deref(), Some("nosniff"));
    assert_eq!(header("content-security-policy").as_deref(), Some("sandbox"));
    assert_eq!(resp.text().await.unwrap(), "framed reply");

    let started = Instant::now();
    let resp = http.post(format!("{}/v1/request/rpc.silent?timeout=300ms", t.url())).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 504);
    assert!(started.elapsed() < Duration::from_secs(5), "504 after {:?}", started.elapsed());
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("no reply on rpc.silent within 300ms"), "{body}");
    let metrics = http.get(format!("{}/metrics", t.url())).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("plugbus_api_request_timeouts_total 1"), "{metrics}");
}

/// A client asking again with the same `ce-source` and `ce-id` (a retry after a timeout, as the
/// publish route's `503` advises for events) is asked again and answered. On a subject a
/// JetStream stream captures, the stored request's `Nats-Msg-Id` came from that pair alone:
/// JetStream dropped the second as a duplicate within its window, nobody was asked, and the
/// client waited out its timeout for a `504`.
async fn a_request_asked_again_with_the_same_ce_id_is_answered_again(bus: &Bus<'_>) {
    let t = start(bus).await;
    let http = reqwest::Client::new();
    for ask in ["first", "again"] {
        let resp = http
            .post(format!("{}/v1/request/rpc.echo?timeout=5s", t.url()))
            .header("ce-specversion", "1.0")
            .header("ce-id", "order-7")
            .header("ce-source", "shop")
            .header("ce-type", "shop.ask")
            .body(ask)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap();
        assert_eq!((status, body.as_str()), (200, ask.to_uppercase().as_str()), "asked {ask}");
    }
}

/// A client's trace context on `POST /v1/request` goes through the same check as on
/// `POST /v1/events`: an invalid `traceparent` (and the `tracestate` beside it) is dropped, never passed
/// on to the responder, the tails and the broker as the client wrote it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_trace_context_on_a_request_is_dropped_as_on_a_publish() {
    let t = start(&Bus::Embedded).await;
    let mut seen = t.observe(&["rpc.echo"]).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/request/rpc.echo", t.url()))
        .header("traceparent", "00-not-a-trace-context-01")
        .header("tracestate", "forged=1")
        .body("hi")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let asked = seen.next_on("rpc.echo").await;
    let trace: Vec<_> = asked.extensions.iter().filter(|(k, _)| k.contains("trace")).collect();
    assert!(trace.is_empty(), "the request carried {trace:?}");
}

async fn the_plugin_sees_an_opaque_reply_to_never_the_inbox(bus: &Bus<'_>) {
    let t = start(bus).await;
    let got = ask(&t, "rpc.peek", "", 5000).await;
    let seen = got["ok"].as_str().unwrap();
    assert!(seen.starts_with("reply-") && !seen.contains("INBOX"), "the plugin saw {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_request_refusals() {
    let t = TestHost::start_with(&["asker", "responder"], |c| c.api_token = Some("s3cret".into())).await;
    let http = reqwest::Client::new();
    let post = |path: &str, body: Vec<u8>, token: bool| {
        let mut req = http.post(format!("{}{path}", t.url())).body(body);
        if token {
            req = req.bearer_auth("s3cret");
        }
        req.send()
    };
    let cases: [(&str, Vec<u8>, bool, u16, &str); 7] = [
        ("/v1/request/rpc.echo", b"x".to_vec(), false, 401, "API token"),
        ("/v1/request/_INBOX.abc", b"x".to_vec(), true, 400, "system subject"),
        ("/v1/request/rpc.*", b"x".to_vec(), true, 400, "wildcards"),
        ("/v1/request/rpc.echo?timeout=2h", b"x".to_vec(), true, 400, "over the maximum of 1m"),
        ("/v1/request/rpc.echo?timeout=soon", b"x".to_vec(), true, 400, "expected a duration"),
        ("/v1/request/nobody.here", b"x".to_vec(), true, 503, "no responders"),
        ("/v1/request/rpc.echo", vec![b'x'; 1024 * 1024 + 1], true, 413, "1048576"),
    ];
    for (path, body, token, status, needle) in cases {
        let resp = post(path, body, token).await.unwrap();
        let got = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap_or_default();
        assert_eq!(got, status, "{path}: {body}");
        let msg = body["error"].as_str().unwrap_or_else(|| panic!("{path}: no JSON error: {body}"));
        assert!(msg.contains(needle), "{path}: {msg}");
    }
    let ok = post("/v1/request/rpc.echo?timeout=2s", b"ok".to_vec(), true).await.unwrap();
    assert_eq!(ok.status().as_u16(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_outside_publishes_or_on_a_system_subject_is_denied() {
    let t = start(&Bus::Embedded).await;
    let got = ask(&t, "secret.plans", "x", 1000).await;
    assert_eq!(got["err"], "denied", "{got}");
    assert!(got["message"].as_str().unwrap().contains("\"secret.plans\" is not in the manifest's publishes"), "{got}");
    let got = ask(&t, "_INBOX.someone", "x", 1000).await;
    assert_eq!(got["err"], "denied", "{got}");
    assert!(got["message"].as_str().unwrap().contains("system subject"), "{got}");
    let got = ask(&t, "nobody.listens", "x", 1000).await;
    assert_eq!(got["err"], "no-responders", "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_requests_in_one_event_stops_at_max_requests() {
    let t = start(&Bus::Embedded).await;
    let mut seen = t.observe(&["asked.flood"]).await;
    t.publish("ask.flood", json!({ "subject": "nobody.listens", "data": "x", "timeout_ms": 10 }).to_string()).await;
    let out: Value = serde_json::from_slice(&seen.next_on("asked.flood").await.data).unwrap();
    assert_eq!(out["sent"], 16, "{out}");
    assert_eq!(out["refused"]["err"], "limit", "{out}");
    assert!(out["refused"]["message"].as_str().unwrap().contains("request limit of 16 per event reached"), "{out}");
}

/// Waits for what the responder reported on `rpc.out.<case>` after asking on `rpc.<case>`.
async fn refusal(t: &TestHost, case: &str, data: &str, timeout_ms: u64) -> (Value, String) {
    let mut seen = t.observe(&[&format!("rpc.out.{case}")]).await;
    let got = ask(t, &format!("rpc.{case}"), data, timeout_ms).await;
    let report = seen.next_on(&format!("rpc.out.{case}")).await;
    (got, String::from_utf8_lossy(&report.data).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_reply_a_forged_reply_to_and_a_huge_reply_are_refused() {
    let t = start(&Bus::Embedded).await;
    let (got, report) = refusal(&t, "twice", "", 5000).await;
    assert_eq!(got["ok"], "first", "{got}");
    assert!(report.contains("Limit") && report.contains("already replied"), "{report}");

    let (got, report) = refusal(&t, "forged", "", 300).await;
    assert_eq!(got["err"], "timeout", "a forged reply-to reached the requester: {got}");
    assert!(report.contains("Denied") && report.contains("is not the reply-to of the event being handled"), "{report}");

    let (got, report) = refusal(&t, "huge", "2000000", 300).await;
    assert_eq!(got["err"], "timeout", "{got}");
    assert!(report.contains("Limit") && report.contains("output limit of 1048576 bytes"), "{report}");

    // An event nobody asked about: `reply` has nowhere to go.
    let mut seen = t.observe(&["rpc.out.unasked"]).await;
    t.publish("rpc.unasked", "").await;
    let report = seen.next_on("rpc.out.unasked").await;
    let report = String::from_utf8_lossy(&report.data);
    assert!(report.contains("Denied") && report.contains("no reply-to"), "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_after_the_requester_timed_out_is_dropped_and_counted() {
    let t = start(&Bus::Embedded).await;
    let got = ask(&t, "rpc.late", "800", 200).await;
    assert_eq!(got["err"], "timeout", "{got}");
    t.wait_counter("responder", "ok", 1).await;
    let http = reqwest::Client::new();
    let metrics = http.get(format!("{}/metrics", t.url())).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"plugbus_replies_dropped_total{plugin="responder"} 1"#), "{metrics}");
}

/// A host running `components`, each plugin one attempt at a time (a request can wait its turn).
async fn one_attempt_at_a_time(components: &[&str]) -> TestHost {
    TestHost::start_with(components, |c| {
        fast_retries(c);
        c.flow.concurrency = 1;
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_requester_gave_up_in_the_queue_is_not_run() {
    // One attempt at a time: a request queued behind an 800 ms one outlives its own 100 ms
    // timeout. It used to run anyway (and be retried, and dead-lettered under the responder's
    // name), a question nobody waited for; junk requests with tiny timeouts delayed everyone's.
    let t = one_attempt_at_a_time(&["asker", "responder"]).await;
    let http = reqwest::Client::new();
    let late = http.post(format!("{}/v1/request/rpc.late?timeout=5s", t.url())).body("800").send();
    let queued = async {
        // once the late one runs (a fixed head start lost the race on a loaded machine)
        t.wait_counter("responder", "in_flight", 1).await;
        http.post(format!("{}/v1/request/rpc.echo?timeout=100ms", t.url())).body("hi").send().await.unwrap()
    };
    let (late, queued) = tokio::join!(late, queued);
    assert_eq!(late.unwrap().status(), 200);
    assert_eq!(queued.status(), 504);
    t.wait_counter("responder", "expired", 1).await;
    assert_eq!(t.counter("responder", "ok"), 1, "only the request someone waited for ran");
    assert_eq!((t.counter("responder", "attempts"), t.counter("responder", "expired")), (1, 1));
    assert_eq!(t.counter("responder", "received"), 2);
    let metrics = http.get(format!("{}/metrics", t.url())).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"plugbus_requests_expired_total{plugin="responder"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"plugbus_replies_dropped_total{plugin="responder"} 0"#), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_another_plugin_answered_still_runs_in_its_other_subscribers() {
    // `snoop` takes everything (`>`) as events; with one attempt at a time and 100 events ahead
    // of it, it reaches the request long after `responder` answered. Answered is not given up:
    // it still runs there.
    let t = one_attempt_at_a_time(&["responder", "snoop"]).await;
    for i in 0..100 {
        t.publish(&format!("busy.{i}"), "").await;
    }
    let http = reqwest::Client::new();
    let answered = http.post(format!("{}/v1/request/rpc.echo?timeout=5s", t.url())).body("hi").send().await.unwrap();
    assert_eq!(answered.status(), 200);
    // 100 events, the request, and snoop's own 101 reports (which it does not report again)
    t.wait_counter("snoop", "ok", 202).await;
    assert_eq!(t.counter("snoop", "expired"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_past_the_events_deadline_gets_the_deadline() {
    let t = TestHost::start_with(&["asker", "responder"], |c| {
        c.retry.max_attempts = 1;
        c.plugins.entry("asker".into()).or_default().limits.insert("deadline".into(), "1s".into());
    })
    .await;
    let mut dead = t.observe(&["plugbus.dlq.asker"]).await;
    let started = Instant::now();
    t.publish("ask.one", json!({ "subject": "rpc.silent", "data": "", "timeout_ms": 60_000 }).to_string()).await;
    let letter = dead.next_on("plugbus.dlq.asker").await;
    let took = started.elapsed();
    assert!(took < Duration::from_secs(8), "a 60 s request held the event for {took:?}");
    let error = letter.header("plugbus-error").unwrap_or_default();
    assert!(error.contains("deadline of 1s exceeded"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_nats_requester_is_answered_and_a_non_inbox_reply_subject_is_ignored() {
    use futures::StreamExt;
    let server = NatsServer::start().await;
    let t = start(&Bus::Core(&server)).await;
    let client = server.client().await;
    // A plain NATS request (the `nats` CLI, another service) is answered by the plugin.
    let reply = tokio::time::timeout(Duration::from_secs(10), client.request("rpc.echo", "from nats".into()))
        .await
        .expect("no reply within 10 s")
        .expect("the request failed");
    assert_eq!(&reply.payload[..], b"FROM NATS");
    // A publisher naming an ordinary subject as `reply` cannot steer the plugin's reply onto it.
    let mut stolen = client.subscribe("orders.stolen").await.unwrap();
    client.flush().await.unwrap();
    client.publish_with_reply("rpc.echo", "orders.stolen", "x".into()).await.unwrap();
    client.flush().await.unwrap();
    t.wait_counter("responder", "dead_lettered", 1).await;
    let leaked = tokio::time::timeout(Duration::from_millis(500), stolen.next()).await;
    assert!(leaked.is_err(), "a reply reached orders.stolen: {leaked:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_request_is_answered_on_its_inbox_and_an_ordinary_subject_there_is_ignored() {
    use futures::StreamExt;
    let server = NatsServer::start().await;
    let t = start(&Bus::JetStream(&server)).await;
    let client = server.client().await;
    let js = async_nats::jetstream::new(client.clone());
    // Any JetStream client stores a request naming its inbox: the durable responder answers there.
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    let mut stolen = client.subscribe("orders.stolen").await.unwrap();
    client.flush().await.unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("plugbus-reply-to", inbox.as_str());
    js.publish_with_headers("rpc.echo", headers, "stored".into()).await.unwrap().await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), replies.next())
        .await
        .expect("no reply on the inbox within 10 s")
        .expect("the inbox subscription closed");
    assert_eq!(&reply.payload[..], b"STORED");
    // A publisher naming an ordinary subject there cannot steer the reply onto it: the event has
    // no reply-to, so the responder's reply is refused (and the event dead-lettered).
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("plugbus-reply-to", "orders.stolen");
    js.publish_with_headers("rpc.echo", headers, "x".into()).await.unwrap().await.unwrap();
    t.wait_counter("responder", "dead_lettered", 1).await;
    let leaked = tokio::time::timeout(Duration::from_millis(500), stolen.next()).await;
    assert!(leaked.is_err(), "a reply reached orders.stolen: {leaked:?}");
}

/// Every occurrence of `from` replaced by `to` (same length).
fn patch_all(bytes: &[u8], from: &str, to: &str) -> (Vec<u8>, usize) {
    assert_eq!(from.len(), to.len());
    let mut out = bytes.to_vec();
    let mut hits = 0;
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from.as_bytes() {
            out[i..i + from.len()].copy_from_slice(to.as_bytes());
            hits += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    (out, hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_component_built_against_contract_0_1_0_still_loads_and_runs() {
    // A component that does not call request/reply does not import `rpc` at all.
    let out = std::process::Command::new(plugbus_bin()).args(["inspect", "--json"]).arg(wasm("echo")).output().unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(!report.contains("plugbus:handler/rpc"), "echo imports rpc: {report}");
    let asker =
        std::process::Command::new(plugbus_bin()).args(["inspect", "--json"]).arg(wasm("asker")).output().unwrap();
    assert!(String::from_utf8_lossy(&asker.stdout).contains("plugbus:handler/rpc@0.1.1"));

    // echo as an SDK for contract 0.1.0 built it: every `@0.1.1` name (imports, the handler
    // export, the contract section) back to `@0.1.0`.
    let (old, hits) = patch_all(&std::fs::read(wasm("echo")).unwrap(), "@0.1.1", "@0.1.0");
    assert!(hits >= 3, "only {hits} version strings in echo");
    let t = TestHost::start(&[]).await;
    let mut seen = t.observe(&["echo.>"]).await;
    std::fs::write(t.dir.path().join("echo.wasm"), &old).unwrap();
    plugbus_tests::eventually("the 0.1.0 echo is serving", || t.host.router().names() == vec!["echo".to_string()])
        .await;
    assert!(t.host.rejected().is_empty(), "{:?}", t.host.rejected());
    t.publish("orders.created", "old").await;
    assert_eq!(seen.next_on("echo.orders.created").await.data, "old");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_over_max_reply_bytes_is_refused() {
    use futures::StreamExt;
    let server = NatsServer::start().await;
    let t = TestHost::start_on(&Bus::Core(&server), &["asker", "responder"], |c| {
        c.plugins.entry("asker".into()).or_default().limits.insert("max_reply_bytes".into(), 100.into());
    })
    .await;
    // A responder outside plugbus answering with more than the asker accepts.
    let client = server.client().await;
    let mut asked = client.subscribe("nobody.big").await.unwrap();
    client.flush().await.unwrap();
    let answer = tokio::spawn(async move {
        let msg = asked.next().await.expect("the request");
        client.publish(msg.reply.expect("a reply inbox"), vec![b'x'; 1000].into()).await.unwrap();
        client.flush().await.unwrap();
    });
    let got = ask(&t, "nobody.big", "", 5000).await;
    assert_eq!(got["err"], "limit", "{got}");
    assert!(got["message"].as_str().unwrap().contains("1000 bytes, over max_reply_bytes (100)"), "{got}");
    answer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_reply_holds_no_worker_thread() {
    let t = start(&Bus::Embedded).await;
    let mut seen = t.observe(&["asked.one"]).await;
    // Four requests waiting 3 s each on a runtime of two worker threads...
    for _ in 0..4 {
        t.publish("ask.one", json!({ "subject": "rpc.silent", "data": "", "timeout_ms": 3000 }).to_string()).await;
    }
    t.wait_counter("responder", "ok", 4).await;
    // ...while another request is asked and answered at once.
    let started = Instant::now();
    t.publish("ask.one", json!({ "subject": "rpc.echo", "data": "quick", "timeout_ms": 3000 }).to_string()).await;
    let first = seen.next_on("asked.one").await;
    let first: Value = serde_json::from_slice(&first.data).unwrap();
    assert_eq!(first["ok"], "QUICK", "the quick request was not the first answered: {first}");
    assert!(started.elapsed() < Duration::from_millis(1500), "answered after {:?}", started.elapsed());
}

/// A chain of requests back through the asker (asker asks responder, whose handler asks the
/// asker back) while the asker's deliveries hold its buffer: its event (900 KiB) and the
/// request back (1.2 MiB) pass twice its `flow.buffer_mib` of 1 MiB, the bound of another
/// plugin's request. The request back used to wait for room held by the asker's delivery that
/// waits for it, and the chain timed out; the host marks a plugin's request with the chain it
/// belongs to (`plugbus-asked-through`), and a plugin takes the chain's requests up to three
/// times its buffer, ahead of what waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_of_requests_back_through_a_plugin_holding_its_buffer_is_answered() {
    let t = TestHost::start_with(&["asker", "responder"], |c| {
        fast_retries(c);
        let asker = c.plugins.entry("asker".into()).or_default();
        asker.flow.insert("buffer_mib".into(), json!(1));
        asker.limits.insert("max_event_bytes".into(), json!(4 << 20));
        c.plugins.entry("responder".into()).or_default().limits.insert("max_output_bytes".into(), json!(4 << 20));
    })
    .await;
    let mut seen = t.observe(&["asked.one", "ask.back"]).await;
    let pad = "p".repeat(900 << 10);
    let cmd = json!({ "subject": "rpc.back", "data": (1200 << 10).to_string(), "timeout_ms": 4000, "pad": pad });
    t.publish("ask.one", cmd.to_string()).await;
    let back = seen.next_on("ask.back").await;
    assert_eq!(back.header("plugbus-asked-through"), Some("asker,responder"));
    let out: Value = serde_json::from_slice(&seen.next_on("asked.one").await.data).unwrap();
    assert_eq!(out["ok"], "back from asker", "{out}");
}
