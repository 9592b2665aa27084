//! Replay on the embedded bus's durable log: a new plugin with `deliver = "all"` gets the log's
//! history, and `POST /v1/replay` (`plugbus replay`) delivers it again to a live plugin.

use plugbus::config::Deliver;
use plugbus::{Config, Event, Host};
use plugbus_tests::{order, wasm};
use std::time::{Duration, Instant};

fn counter(host: &Host, plugin: &str, name: &str) -> u64 {
    host.router().plugins().into_iter().find(|p| p.name == plugin).map_or(0, |p| p.counters[name])
}

async fn wait_counter(host: &Host, plugin: &str, name: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(host, plugin, name) < at_least {
        assert!(Instant::now() < deadline, "{plugin}.{name} = {} (wanted {at_least})", counter(host, plugin, name));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_plugin_with_deliver_all_gets_the_history_and_replay_rewinds_a_live_one() {
    let plugins = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("echo"), plugins.path().join("echo.wasm")).unwrap();
    let mut config = Config {
        plugins_dir: plugins.path().to_path_buf(),
        data_dir: data.path().to_path_buf(),
        http: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    };
    let host = Host::start(config.clone()).await.unwrap();
    for i in 0..5 {
        host.publish(Event::new("orders.created", order(&format!("h-{i}"), "widget", 1))).await.unwrap();
    }
    wait_counter(&host, "echo", "ok", 5).await;
    host.shutdown().await;

    // A new plugin asking for everything: the five orders from before it existed reach it.
    std::fs::copy(wasm("audit"), plugins.path().join("audit.wasm")).unwrap();
    let audit = config.plugins.entry("audit".into()).or_default();
    audit.durable = Some(true);
    audit.deliver = Some(Deliver::All);
    let host = Host::start(config.clone()).await.unwrap();
    wait_counter(&host, "audit", "ok", 5).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(counter(&host, "audit", "received"), 5, "the history once");
    assert_eq!(counter(&host, "echo", "received"), 0, "echo settled them before: not again");

    // Rewind echo: the five orders run through it again.
    let url = format!("http://{}/v1/replay?plugin=echo&from=0", host.http_addr().unwrap());
    let resp = reqwest::Client::new().post(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["events"], 5, "{body}");
    wait_counter(&host, "echo", "ok", 5).await;
    let missing = format!("http://{}/v1/replay?plugin=nobody", host.http_addr().unwrap());
    let resp = reqwest::Client::new().post(&missing).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    host.shutdown().await;

    // A restart after all that redelivers nothing: everything was settled.
    config.plugins.clear();
    let host = Host::start(config).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(counter(&host, "echo", "received"), 0);
    assert_eq!(counter(&host, "audit", "received"), 0);
    host.shutdown().await;
}

/// Review 63a F2: a durable plugin not loaded for a while (refused at a start, its file being
/// rewritten; or removed and copied back) got none of what was accepted meanwhile, answered
/// `202`: the log made an event pending only for the plugins subscribed then. It resumes where
/// it left off now, as a JetStream durable consumer does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_durable_plugin_not_loaded_for_a_while_gets_what_was_accepted_meanwhile() {
    let plugins = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let file = plugins.path().join("echo.wasm");
    std::fs::copy(wasm("echo"), &file).unwrap();
    let mut config = Config {
        plugins_dir: plugins.path().to_path_buf(),
        data_dir: data.path().to_path_buf(),
        http: None,
        ..Config::default()
    };
    config.plugins.entry("echo".into()).or_default().durable = Some(true);
    let publish = async |host: &Host, n: usize, tag: &str| {
        for i in 0..n {
            host.publish(Event::new("orders.created", order(&format!("{tag}-{i}"), "widget", 1))).await.unwrap();
        }
    };
    let host = Host::start(config.clone()).await.unwrap();
    publish(&host, 3, "before").await;
    wait_counter(&host, "echo", "ok", 3).await;
    host.shutdown().await;

    // The next start finds the file broken (a build half written): echo is refused.
    std::fs::write(&file, b"\0asm half written").unwrap();
    let host = Host::start(config.clone()).await.unwrap();
    assert!(!host.router().contains("echo"));
    publish(&host, 4, "refused").await;
    std::fs::copy(wasm("echo"), &file).unwrap();
    wait_counter(&host, "echo", "ok", 4).await;
    // Removed, then copied back.
    std::fs::remove_file(&file).unwrap();
    let router = host.router().clone();
    let deadline = Instant::now() + Duration::from_secs(30);
    while router.contains("echo") {
        assert!(Instant::now() < deadline, "echo was never removed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    publish(&host, 2, "removed").await;
    std::fs::copy(wasm("echo"), &file).unwrap();
    wait_counter(&host, "echo", "ok", 2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(counter(&host, "echo", "received"), 2, "each once, none from before");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_on_the_in_memory_bus_says_why_not() {
    let t = plugbus_tests::TestHost::start_with(&["echo"], |c| c.bus.durable = false).await;
    let resp = reqwest::Client::new().post(format!("{}/v1/replay?plugin=echo", t.url())).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 409);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("bus.durable = false"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_a_time_delivers_only_what_was_appended_since() {
    let t = plugbus_tests::TestHost::start(&["echo"]).await;
    for i in 0..3 {
        t.host.publish(Event::new("orders.created", order(&format!("old-{i}"), "widget", 1))).await.unwrap();
    }
    wait_counter(&t.host, "echo", "ok", 3).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let since = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    tokio::time::sleep(Duration::from_millis(50)).await;
    for i in 0..2 {
        t.host.publish(Event::new("orders.created", order(&format!("new-{i}"), "widget", 1))).await.unwrap();
    }
    wait_counter(&t.host, "echo", "ok", 5).await;
    let client = reqwest::Client::new();
    let replay = |from: String| {
        let req = client.post(format!("{}/v1/replay", t.url())).query(&[("plugin", "echo"), ("from", from.as_str())]);
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, body) = replay(since.clone()).await;
    assert_eq!((status, &body["events"]), (200, &serde_json::json!(2)), "from {since}: {body}");
    wait_counter(&t.host, "echo", "ok", 7).await;
    let (status, body) = replay("1h".into()).await;
    assert_eq!((status, &body["events"]), (200, &serde_json::json!(5)), "an hour ago: {body}");
    let (status, body) = replay("yesterday-ish".into()).await;
    assert_eq!(status, 400, "{body}");
    let why = body["error"].as_str().unwrap();
    assert!(why.contains("yesterday-ish") && why.contains("RFC 3339"), "{why}");
}

/// An event run again from the log that succeeds now lets go of the dead letter kept of its
/// earlier run: left, a `dlq replay` would run it twice. A replay here; a crash between a dead
/// letter and the ack's commit reads the event back the same way (review 55a 2).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_run_again_from_the_log_that_succeeds_lets_go_of_its_dead_letter() {
    let t = plugbus_tests::TestHost::start_with(&["faulty"], plugbus_tests::fast_retries).await;
    let mut dlq = t.observe(&["plugbus.dlq.faulty"]).await;
    t.publish("faulty.gate", "").await;
    dlq.next_on("plugbus.dlq.faulty").await;
    assert_eq!(t.host.dead_letters().list(Some("faulty")).len(), 1);
    let mut out = t.observe(&["faulty.out.>"]).await;
    t.publish("faulty.opengate", "").await;
    out.next_on("faulty.out.opengate").await;
    let replay = format!("{}/v1/replay?plugin=faulty&from=0", t.url());
    assert_eq!(reqwest::Client::new().post(&replay).send().await.unwrap().status().as_u16(), 200);
    out.next_on("faulty.out.gate").await;
    plugbus_tests::eventually("its dead letter is let go", || t.host.dead_letters().list(Some("faulty")).is_empty())
        .await;
}
