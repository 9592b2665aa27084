//! Nothing is committed twice: after an attempt's kv writes committed, the handler never runs
//! again for that delivery. An output the transport refuses is published again by itself; one
//! still refused after the retries is dead-lettered by itself.

use async_trait::async_trait;
use plugbus::backend::embedded::bus::EmbeddedBus;
use plugbus::kv::{KvStore, MemoryKv};
use plugbus::transport::{Observed, Subscription, SubscriptionSpec, Transport, TransportError};
use plugbus::{Config, Event, Host};
use plugbus_tests::{eventually, fast_retries, order, wasm};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The embedded bus, but the first `failures` outputs on `subject` are refused.
struct FailingOutputs {
    bus: EmbeddedBus,
    subject: &'static str,
    failures: AtomicU32,
    refused: AtomicU32,
}

#[async_trait]
impl Transport for FailingOutputs {
    fn name(&self) -> &'static str {
        "failing"
    }
    async fn publish(&self, event: Event) -> Result<(), TransportError> {
        self.bus.publish(event).await
    }
    async fn publish_output(&self, event: Arc<Event>) -> Result<(), TransportError> {
        if event.subject == self.subject
            && self.failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
        {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(TransportError::Broker(format!("injected: {} refused", event.subject)));
        }
        self.bus.publish_output(event).await
    }
    fn register_metrics(&self, registry: &mut plugbus::metrics::Registry) {
        self.bus.register_metrics(registry);
    }
    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<Subscription, TransportError> {
        self.bus.subscribe(spec).await
    }
    async fn retarget(&self, subscription: u64, spec: &SubscriptionSpec) -> Result<(), TransportError> {
        self.bus.retarget(subscription, spec).await
    }
    async fn observe(&self, patterns: Vec<String>, capacity: usize) -> Result<Observed, TransportError> {
        self.bus.observe(patterns, capacity).await
    }
}

struct Setup {
    host: Host,
    transport: Arc<FailingOutputs>,
    _dirs: (tempfile::TempDir, tempfile::TempDir),
}

async fn start(failures: u32) -> Setup {
    start_with(failures, Arc::new(MemoryKv::new())).await
}

/// inventory on an embedded bus whose first `failures` outputs are refused, over `kv`.
async fn start_with(failures: u32, kv: Arc<dyn KvStore>) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("inventory"), dir.path().join("inventory.wasm")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = Config { plugins_dir: dir.path().into(), data_dir: data.path().into(), ..Config::default() };
    config.http = Some("127.0.0.1:0".parse().unwrap());
    fast_retries(&mut config);
    let transport = Arc::new(FailingOutputs {
        bus: EmbeddedBus::new(),
        subject: "inventory.reserved",
        failures: AtomicU32::new(failures),
        refused: AtomicU32::new(0),
    });
    let host = Host::start_on(config, transport.clone(), kv).await.expect("host starts");
    Setup { host, transport, _dirs: (dir, data) }
}

async fn stock(host: &Host) -> u64 {
    let v = host.kv().get("inventory", "stock/widget").await.unwrap().expect("stock was written");
    serde_json::from_slice(&v.value).unwrap()
}

fn counter(host: &Host, name: &str) -> u64 {
    host.router().plugins().into_iter().find(|p| p.name == "inventory").unwrap().counters[name]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_output_is_published_again_without_running_the_handler_again() {
    let s = start(1).await;
    let mut seen = s.host.observe(&["inventory.>"]).await.unwrap();
    s.host.publish(Event::new("orders.created", order("o1", "widget", 3))).await.unwrap();
    let reserved = tokio::time::timeout(Duration::from_secs(30), seen.recv()).await.expect("an output").unwrap();
    assert_eq!(reserved.subject, "inventory.reserved");
    eventually("the delivery is settled", || counter(&s.host, "ok") == 1).await;
    assert_eq!(s.transport.refused.load(Ordering::SeqCst), 1, "the first publish was refused");
    assert_eq!(counter(&s.host, "attempts"), 1, "the handler ran once");
    assert_eq!(stock(&s.host).await, 7, "10 in stock, 3 reserved once");
    assert!(tokio::time::timeout(Duration::from_millis(300), seen.recv()).await.is_err(), "the output came once");
    assert!(s.host.dead_letters().list(None).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_refused_every_time_is_dead_lettered_by_itself_and_kv_stands() {
    let s = start(u32::MAX).await;
    s.host.publish(Event::new("orders.created", order("o2", "widget", 4))).await.unwrap();
    eventually("the output is dead-lettered", || !s.host.dead_letters().list(Some("inventory")).is_empty()).await;
    eventually("the delivery is settled", || counter(&s.host, "ok") == 1).await;
    let dead = s.host.dead_letters().list(Some("inventory"));
    assert_eq!(dead.len(), 1);
    let ev = &dead[0].event;
    assert_eq!(ev.header("plugbus-original-subject"), Some("inventory.reserved"), "the dead letter is the output");
    let error = ev.header("plugbus-error").unwrap();
    assert!(error.contains("not published after 3 tries") && error.contains("injected"), "{error}");
    assert_eq!(s.transport.refused.load(Ordering::SeqCst), 3, "published three times");
    assert_eq!(counter(&s.host, "attempts"), 1, "the handler ran once");
    assert_eq!(counter(&s.host, "dead_lettered"), 0, "the input itself was handled");
    assert_eq!(counter(&s.host, "outputs_dead_lettered"), 1, "the output is counted apart");
    let addr = s.host.http_addr().expect("the test host serves its API");
    let metrics = reqwest::get(format!("http://{addr}/metrics")).await.unwrap().text().await.unwrap();
    assert!(
        metrics.lines().any(|l| l == r#"plugbus_outputs_dead_lettered_total{plugin="inventory"} 1"#),
        "{}",
        metrics.lines().filter(|l| l.contains("dead_lettered")).collect::<Vec<_>>().join("\n")
    );
    assert_eq!(stock(&s.host).await, 6, "10 in stock, 4 reserved once");
}

/// The attack: a plugin whose outputs a full subscriber refuses, one event after another. Each
/// refused output waited for its retries, and each delivery held its outputs meanwhile: up to
/// `flow.queue` events' outputs (1 GiB by default) for one plugin. Now those waiting to be
/// published again hold at most the plugin's `flow.buffer_mib`; past it a refused output is
/// dead-lettered at once (kept for replay), not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_waiting_to_be_published_again_hold_at_most_the_plugins_buffer() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("faulty"), dir.path().join("faulty.wasm")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = Config { plugins_dir: dir.path().into(), data_dir: data.path().into(), ..Config::default() };
    // 1,000 outputs of about 1 KB an event, against a buffer of 1 MiB; a retry waits a minute
    config.limits.max_publishes = 1001;
    config.flow.buffer_mib = 1;
    config.retry = plugbus::retry::RetryPolicy {
        max_attempts: 3,
        initial: Duration::from_secs(60),
        max: Duration::from_secs(60),
        ..plugbus::retry::RetryPolicy::default()
    };
    config.drain_timeout = Duration::from_millis(200);
    // (dead letters in memory: a thousand fsyncs of dlq.redb would be the test's time)
    config.persistent_kv = false;
    let transport = Arc::new(FailingOutputs {
        bus: EmbeddedBus::new(),
        subject: "faulty.out.flood",
        failures: AtomicU32::new(u32::MAX),
        refused: AtomicU32::new(0),
    });
    let host = Host::start_on(config, transport.clone(), Arc::new(MemoryKv::new())).await.expect("host starts");
    let count = |name: &str| host.router().plugins().into_iter().find(|p| p.name == "faulty").unwrap().counters[name];
    host.publish(Event::new("faulty.flood", "")).await.unwrap();
    eventually("the first event's outputs wait", || transport.refused.load(Ordering::SeqCst) == 1).await;
    host.publish(Event::new("faulty.flood", "")).await.unwrap();
    // The second event's outputs have no room: each refused one is dead-lettered at once.
    // (The first event's first output waits its retry, a minute away.)
    eventually("the second event's outputs are dead-lettered", || count("outputs_dead_lettered") >= 100).await;
    let dead = host.dead_letters().list(Some("faulty"));
    let error = dead[0].event.header("plugbus-error").unwrap();
    assert!(error.contains("not tried again") && error.contains("flow.buffer_mib"), "{error}");
    let (refused, dead_lettered) = (transport.refused.load(Ordering::SeqCst), count("outputs_dead_lettered"));
    assert!(u64::from(refused) <= dead_lettered + 3, "{refused} refused, {dead_lettered} dead-lettered: some wait");
    host.shutdown().await;
}

/// A kv store whose commits always fail (a broken disk, a lost broker).
struct BrokenKv(MemoryKv);

#[async_trait::async_trait]
impl KvStore for BrokenKv {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<plugbus::kv::Versioned>, plugbus::kv::KvError> {
        self.0.get(ns, key).await
    }
    async fn commit(&self, _ns: &str, _txn: &plugbus::kv::Txn) -> Result<(), plugbus::kv::KvError> {
        Err(plugbus::kv::KvError::Unavailable("injected: the store is gone".into()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_store_failure_is_the_hosts_not_the_handlers() {
    let s = start_with(0, Arc::new(BrokenKv(MemoryKv::new()))).await;
    let host = &s.host;
    host.publish(Event::new("orders.created", order("o3", "widget", 1))).await.unwrap();
    eventually("the event is dead-lettered", || !host.dead_letters().list(Some("inventory")).is_empty()).await;
    let dead = host.dead_letters().list(Some("inventory"));
    let error = dead[0].event.header("plugbus-error").unwrap();
    assert!(error.starts_with("host error: the kv store did not commit"), "{error}");
    assert!(error.contains("injected") && !error.contains("handler asked"), "{error}");
    assert_eq!(counter(host, "retried"), 2, "retried like any transient failure");
    // Counted as the host's, for every attempt (two retried, the third dead-lettered).
    assert_eq!(counter(host, "host_failures"), 3, "each attempt the store failed is the host's");
    let metrics = host.router().metrics().encode();
    assert!(metrics.contains("plugbus_host_failures_total{plugin=\"inventory\"} 3"), "{metrics}");
    // `plugbus dlq export` makes it a case expecting the handler to handle it: the host failed it.
    let case = plugbus::casetest::dlq::case_from_entry(&serde_json::to_value(&dead[0]).unwrap()).unwrap();
    assert_eq!(case["expect"]["result"], "ok", "{case}");
    assert_eq!(case["dead_letter"]["failed_by_the_handler"], false, "{case}");
}
