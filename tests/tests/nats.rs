//! The NATS transport against a real nats-server: fan-out on wildcards, queue groups across
//! hosts, CloudEvents in and out, JetStream at-least-once through a host crash and a broker
//! restart. (Retry and dead-letter cases run on both transports in `delivery.rs`.)

use async_nats::jetstream;
use futures::StreamExt;
use plugbus::Config;
use plugbus_tests::nats::NatsServer;
use plugbus_tests::{Bus, TestHost, eventually, plugbus_bin, wasm};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

async fn next(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(Duration::from_secs(10), sub.next()).await.expect("a message within 10 s").expect("open")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_two_plugins_on_wildcard_subjects() {
    let server = NatsServer::start().await;
    let t = TestHost::start_on(&Bus::Core(&server), &["echo", "audit"], |_| {}).await;
    assert_eq!(t.host.transport().name(), "nats");
    let client = server.client().await;
    let mut echoes = client.subscribe("echo.>").await.unwrap();
    client.flush().await.unwrap();
    for i in 0..20 {
        client.publish(format!("orders.o{i}"), format!("{i}").into()).await.unwrap();
    }
    client.flush().await.unwrap();
    let mut seen = HashSet::new();
    while seen.len() < 20 {
        seen.insert(next(&mut echoes).await.subject.to_string());
    }
    assert!(seen.contains("echo.orders.o7"));
    t.wait_counter("audit", "ok", 20).await;
    assert_eq!(t.counter("echo", "ok"), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_group_shares_the_work_of_two_hosts_each_event_once() {
    let server = NatsServer::start().await;
    let a = TestHost::start_on(&Bus::Core(&server), &["echo"], |_| {}).await;
    let b = TestHost::start_on(&Bus::Core(&server), &["echo"], |_| {}).await;
    let client = server.client().await;
    let mut echoes = client.subscribe("echo.>").await.unwrap();
    client.flush().await.unwrap();
    const N: usize = 2000;
    for i in 0..N {
        client.publish(format!("orders.o{i}"), "x".into()).await.unwrap();
    }
    client.flush().await.unwrap();
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..N {
        *counts.entry(next(&mut echoes).await.subject.to_string()).or_default() += 1;
    }
    // nothing more comes: no event was handled twice
    let extra = tokio::time::timeout(Duration::from_millis(500), echoes.next()).await;
    assert!(extra.is_err(), "an extra output: {:?}", extra.unwrap().map(|m| m.subject));
    assert_eq!(counts.len(), N, "every event handled");
    assert!(counts.values().all(|n| *n == 1));
    let (on_a, on_b) = (a.counter("echo", "ok"), b.counter("echo", "ok"));
    assert_eq!(on_a + on_b, N as u64);
    assert!(on_a > 0 && on_b > 0, "both hosts did some of the work: {on_a} + {on_b}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudevents_binary_structured_and_plain_messages_reach_the_handler() {
    let server = NatsServer::start().await;
    let _t = TestHost::start_on(&Bus::Core(&server), &["attrs"], |_| {}).await;
    let client = server.client().await;
    let mut out = client.subscribe("attrs.out").await.unwrap();
    client.flush().await.unwrap();
    let seen = async |out: &mut async_nats::Subscriber| -> (Value, async_nats::Message) {
        let msg = next(out).await;
        (serde_json::from_slice(&msg.payload).unwrap(), msg)
    };

    // binary mode: ce- headers, percent-encoded values, data as the payload
    let mut h = async_nats::HeaderMap::new();
    for (k, v) in [
        ("ce-specversion", "1.0"),
        ("ce-id", "bin-1"),
        ("ce-source", "/shop/eu"),
        ("ce-type", "com.shop.order.created"),
        ("ce-time", "2026-11-26T10:00:00Z"),
        ("ce-tenant", "acme%20co"),
        ("content-type", "application/json"),
    ] {
        h.insert(k, v);
    }
    client.publish_with_headers("ce.binary", h, r#"{"n":1}"#.into()).await.unwrap();
    let (v, msg) = seen(&mut out).await;
    assert_eq!(v["id"], "bin-1");
    assert_eq!(v["source"], "/shop/eu");
    assert_eq!(v["type"], "com.shop.order.created");
    assert_eq!(v["time"], "2026-11-26T10:00:00Z");
    assert_eq!(v["datacontenttype"], "application/json");
    assert_eq!(v["headers"]["tenant"], "acme co");
    assert_eq!(v["data"], r#"{"n":1}"#);
    // the output goes out in binary mode too, with a deterministic Nats-Msg-Id
    let oh = msg.headers.expect("output headers");
    assert_eq!(oh.get("ce-specversion").map(|v| v.as_str()), Some("1.0"));
    assert_eq!(oh.get("ce-source").map(|v| v.as_str()), Some("plugbus/attrs"));
    assert_eq!(oh.get("Nats-Msg-Id").map(|v| v.as_str()), oh.get("ce-id").map(|v| v.as_str()));
    assert_eq!(oh.get("plugbus-caused-by").map(|v| v.as_str()), Some("bin-1"));

    // structured mode: the whole event as JSON
    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/cloudevents+json");
    let body =
        r#"{"specversion":"1.0","id":"st-1","source":"/crm","type":"customer.updated","region":"eu","data":{"a":1}}"#;
    client.publish_with_headers("ce.structured", h, body.into()).await.unwrap();
    let (v, _) = seen(&mut out).await;
    assert_eq!(
        (v["id"].as_str(), v["source"].as_str(), v["type"].as_str()),
        (Some("st-1"), Some("/crm"), Some("customer.updated"))
    );
    assert_eq!(v["headers"]["region"], "eu");
    assert_eq!(v["data"], r#"{"a":1}"#);

    // a plain message: id from Nats-Msg-Id, type = subject, time = receipt
    let mut h = async_nats::HeaderMap::new();
    h.insert("Nats-Msg-Id", "plain-1");
    client.publish_with_headers("ce.plain", h, "hello".into()).await.unwrap();
    let (v, _) = seen(&mut out).await;
    assert_eq!(
        (v["id"].as_str(), v["type"].as_str(), v["data"].as_str()),
        (Some("plain-1"), Some("ce.plain"), Some("hello"))
    );
    assert!(v["time"].as_str().unwrap().ends_with('Z'));
    client.publish("ce.bare", "no headers at all".into()).await.unwrap();
    let (v, _) = seen(&mut out).await;
    assert!(!v["id"].as_str().unwrap().is_empty());
    assert_eq!(v["subject"], "ce.bare");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_cloudevent_is_dead_lettered_with_the_reason() {
    let server = NatsServer::start().await;
    let t = TestHost::start_on(&Bus::JetStream(&server), &["attrs"], |_| {}).await;
    let mut dlq = t.observe(&["plugbus.dlq.>"]).await;
    let client = server.client().await;
    let js = jetstream::new(client);
    let mut h = async_nats::HeaderMap::new();
    h.insert("Content-Type", "application/cloudevents+json");
    js.publish_with_headers("ce.broken", h, "{not json".into()).await.unwrap().await.unwrap();
    let dead = dlq.next_on("plugbus.dlq.attrs").await;
    let why = dead.header("plugbus-error").unwrap();
    assert!(why.contains("not a valid event") && why.contains("not valid JSON"), "{why}");
    assert_eq!(dead.data, "{not json");
    assert_eq!(t.counter("attrs", "ok"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_server_fails_the_start_naming_the_url() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let mut config =
        Config { plugins_dir: dir.path().into(), data_dir: dir.path().into(), http: None, ..Config::default() };
    config.nats.url = Some(format!("nats://127.0.0.1:{port}"));
    let err = format!("{:#}", plugbus::Host::start(config).await.err().expect("start fails"));
    assert!(err.contains(&format!("127.0.0.1:{port}")) && err.contains("NATS"), "{err}");
}

/// The ids of every message in `stream` (by `Nats-Msg-Id`), and how many messages there are.
async fn stream_msg_ids(js: &jetstream::Context, stream: &str) -> (usize, HashSet<String>) {
    let mut s = js.get_stream(stream).await.unwrap();
    let state = s.info().await.unwrap().state.clone();
    let mut ids = HashSet::new();
    for seq in state.first_sequence..=state.last_sequence {
        if let Ok(m) = s.get_raw_message(seq).await {
            let id = m.headers.get("Nats-Msg-Id").map(|v| v.as_str().to_string()).unwrap_or_default();
            ids.insert(id);
        }
    }
    (state.messages as usize, ids)
}

async fn stream_count(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(0),
        Err(_) => 0,
    }
}

fn durable_echo_config(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("plugbus.toml");
    std::fs::write(
        &path,
        r#"
[nats]
ack_wait = "2s"
[plugins.echo]
durable = true
[nats.streams.ORDERS]
subjects = ["orders.>"]
[nats.streams.ECHO]
subjects = ["echo.>"]
"#,
    )
    .unwrap();
    path
}

struct HostProcess(Child);

impl Drop for HostProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_host(server: &NatsServer, plugins: &std::path::Path, data: &std::path::Path, log: &str) -> HostProcess {
    let log = std::fs::File::create(data.join(log)).unwrap();
    let child = Command::new(plugbus_bin())
        .args(["run", "--http", "127.0.0.1:0", "--concurrency", "1", "--nats", &server.url(), "--plugins"])
        .arg(plugins)
        .arg("--data-dir")
        .arg(data)
        .arg("--config")
        .arg(durable_echo_config(data))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    HostProcess(child)
}

async fn wait_for_consumer(js: &jetstream::Context) {
    for _ in 0..400 {
        if let Ok(s) = js.get_stream("ORDERS").await
            && s.consumer_info("plugbus_echo").await.is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the host never created its durable consumer");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_a_host_killed_mid_stream_loses_nothing_and_duplicates_no_output() {
    let server = NatsServer::start().await;
    let (plugins, data) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    std::fs::copy(wasm("echo"), plugins.path().join("echo.wasm")).unwrap();
    let js = jetstream::new(server.client().await);
    let mut host = spawn_host(&server, plugins.path(), data.path(), "first.log");
    wait_for_consumer(&js).await;

    const N: usize = 2000;
    let mut acks = Vec::with_capacity(N);
    for i in 0..N {
        acks.push(js.publish(format!("orders.o{i}"), "x".into()).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }
    // kill -9 once the host is well into the stream
    let mut at_kill = 0;
    for _ in 0..2000 {
        at_kill = stream_count(&js, "ECHO").await;
        if at_kill >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    host.0.kill().unwrap();
    host.0.wait().unwrap();
    assert!((100..N as u64).contains(&at_kill), "killed mid-stream ({at_kill} of {N} handled)");

    let _host = spawn_host(&server, plugins.path(), data.path(), "second.log");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while stream_count(&js, "ECHO").await < N as u64 {
        assert!(tokio::time::Instant::now() < deadline, "only {} of {N} outputs", stream_count(&js, "ECHO").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (messages, ids) = stream_msg_ids(&js, "ECHO").await;
    assert_eq!(messages, N, "one output per input in the output stream: none lost, none duplicated");
    assert_eq!(ids.len(), N, "distinct Nats-Msg-Ids");
    // every input was acked in the end
    eventually_async(|| async {
        let info = js.get_stream("ORDERS").await.unwrap().consumer_info("plugbus_echo").await.unwrap();
        info.num_ack_pending == 0 && info.num_pending == 0
    })
    .await;
}

async fn eventually_async<F: std::future::Future<Output = bool>>(cond: impl Fn() -> F) {
    for _ in 0..600 {
        if cond().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("condition never held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_a_broker_restart_mid_stream_loses_nothing_and_the_host_recovers() {
    let mut server = NatsServer::start().await;
    let t = TestHost::start_on(&Bus::JetStream(&server), &["echo"], |c| {
        c.nats.streams.insert("ECHO".into(), plugbus::transport::nats::StreamDef { subjects: vec!["echo.>".into()] });
    })
    .await;
    let producer = server.client().await;
    let js = jetstream::ContextBuilder::new().timeout(Duration::from_secs(1)).build(producer);
    const N: usize = 600;
    let publish = async |i: usize| loop {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("in-{i}").as_str());
        if let Ok(ack) = js.publish_with_headers(format!("orders.o{i}"), h, "x".into()).await
            && ack.await.is_ok()
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for i in 0..N / 2 {
        publish(i).await;
    }
    server.stop();
    let ready = format!("{}/readyz", t.url());
    eventually_async(|| async { reqwest::get(&ready).await.map(|r| r.status().as_u16() == 503).unwrap_or(false) })
        .await;
    server.start_again().await;
    eventually_async(|| async { reqwest::get(&ready).await.map(|r| r.status().is_success()).unwrap_or(false) }).await;
    for i in N / 2..N {
        publish(i).await;
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while stream_count(&js, "ECHO").await < N as u64 {
        assert!(tokio::time::Instant::now() < deadline, "only {} of {N} outputs", stream_count(&js, "ECHO").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (messages, ids) = stream_msg_ids(&js, "ECHO").await;
    assert_eq!((messages, ids.len()), (N, N), "every input handled, outputs not duplicated");
    eventually("the host handled every event", || t.counter("echo", "ok") >= N as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_lives_in_jetstream_and_two_hosts_never_lose_an_update() {
    let server = NatsServer::start().await;
    let a = TestHost::start_on(&Bus::Core(&server), &["inventory"], |_| {}).await;
    let b = TestHost::start_on(&Bus::Core(&server), &["inventory"], |_| {}).await;
    let client = server.client().await;
    let mut out = client.subscribe("inventory.*").await.unwrap();
    client.flush().await.unwrap();
    // 12 orders of one widget, at once, shared by two hosts: the stock of 10 is reserved exactly
    for i in 0..12 {
        client.publish("orders.created", plugbus_tests::order(&format!("o{i}"), "widget", 1).into()).await.unwrap();
    }
    client.flush().await.unwrap();
    let mut by_subject: HashMap<String, usize> = HashMap::new();
    for _ in 0..12 {
        *by_subject.entry(next(&mut out).await.subject.to_string()).or_default() += 1;
    }
    assert_eq!(by_subject.get("inventory.reserved"), Some(&10), "{by_subject:?}");
    assert_eq!(by_subject.get("inventory.rejected"), Some(&2), "{by_subject:?}");
    assert!(a.counter("inventory", "ok") > 0 && b.counter("inventory", "ok") > 0);
    // the state is in the plugin's JetStream KV bucket, seen the same from either host
    let bucket = jetstream::new(client).get_key_value("plugbus_inventory").await.unwrap();
    assert_eq!(bucket.get("reserved/widget").await.unwrap().unwrap(), "10");
    assert_eq!(bucket.get("stock/widget").await.unwrap().unwrap(), "0");
    let v = b.host.kv().get("inventory", "reserved/widget").await.unwrap().unwrap();
    assert_eq!(v.value, b"10");
}

/// A stream with 5 events in it, then a new durable echo plugin, then one more event: how many
/// events the plugin handled in the end.
async fn durable_echo_after_history(deliver: Option<plugbus::config::Deliver>) -> u64 {
    let server = NatsServer::start().await;
    let js = jetstream::new(server.client().await);
    js.create_stream(jetstream::stream::Config {
        name: "ORDERS".into(),
        subjects: vec!["orders.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..5 {
        js.publish(format!("orders.old{i}"), "x".into()).await.unwrap().await.unwrap();
    }
    let t = TestHost::start_on(&Bus::JetStream(&server), &["echo"], |c| {
        c.plugins.entry("echo".into()).or_default().deliver = deliver;
    })
    .await;
    let mut seen = t.observe(&["echo.orders.new"]).await;
    js.publish("orders.new", "x".into()).await.unwrap().await.unwrap();
    seen.next_on("echo.orders.new").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    t.counter("echo", "ok")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_durable_plugin_starts_with_new_events_or_with_the_whole_stream() {
    assert_eq!(durable_echo_after_history(None).await, 1, "deliver = new (the default) skips what was there");
    let all = durable_echo_after_history(Some(plugbus::config::Deliver::All)).await;
    assert_eq!(all, 6, "deliver = all replays the stream from its start");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_are_used_and_bad_ones_fail_the_start_clearly() {
    let server = NatsServer::start_with(&["--user", "plugbus", "--pass", "s3cret"]).await;
    let start = async |user: &str, pass: &str| {
        let dir = tempfile::tempdir().unwrap();
        let mut config =
            Config { plugins_dir: dir.path().into(), data_dir: dir.path().into(), http: None, ..Config::default() };
        config.nats.url = Some(server.url());
        config.nats.user = Some(user.into());
        config.nats.password = Some(pass.into());
        plugbus::Host::start(config).await.map(|h| h.transport().is_connected())
    };
    assert!(start("plugbus", "s3cret").await.expect("right credentials connect"));
    let err = format!("{:#}", start("plugbus", "wrong").await.expect_err("wrong password fails"));
    assert!(err.contains("NATS") && err.to_lowercase().contains("auth"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    let mut config =
        Config { plugins_dir: dir.path().into(), data_dir: dir.path().into(), http: None, ..Config::default() };
    config.nats.url = Some(server.url());
    config.nats.tls_ca = Some("/nonexistent/ca.pem".into());
    let err = format!("{:#}", plugbus::Host::start(config).await.err().expect("a missing CA file fails"));
    assert!(err.contains("/nonexistent/ca.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_a_handler_slower_than_ack_wait_is_kept_alive_not_redelivered() {
    let server = NatsServer::start().await;
    let t = TestHost::start_on(&Bus::JetStream(&server), &["faulty"], |c| {
        c.nats.ack_wait = Duration::from_secs(1);
    })
    .await;
    let mut seen = t.observe(&["faulty.out.>"]).await;
    // busy for 2.5 s: two and a half ack waits; `in-progress` every third of one keeps it ours
    t.publish("faulty.slow", "2500").await;
    seen.next_on("faulty.out.slow").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(t.counter("faulty", "received"), 1, "redelivered while still running");
    assert_eq!(t.counter("faulty", "ok"), 1);
    assert!(seen.drain(Duration::from_millis(200)).await.is_empty());
}
