//! A handler that fails hurts only its own delivery: the host, other plugins and later events
//! carry on, and every failure ends in a dead letter naming plugin, event and cause.

use plugbus::deadletter::headers;
use plugbus_tests::{TestHost, eventually, fast_retries};
use std::time::Duration;

/// `src/lib.rs:LINE:COL)` at the end of `text`'s `(at …)`: where a panic happened.
fn panic_location(text: &str) -> Option<(String, u32, u32)> {
    let at = text.rsplit_once("(at ")?.1.strip_suffix(')')?;
    let mut parts = at.rsplitn(3, ':');
    let col = parts.next()?.parse().ok()?;
    let line = parts.next()?.parse().ok()?;
    Some((parts.next()?.to_string(), line, col))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_handler_is_retried_then_dead_lettered_and_fails_only_that_delivery() {
    let t = TestHost::start_with(&["faulty", "audit"], fast_retries).await;
    let mut seen = t.observe(&["faulty.out.>", "orders.>", "plugbus.dlq.>"]).await;
    let trap = t.publish("faulty.trap", "").await;
    let dead = seen.next_on("plugbus.dlq.faulty").await;
    assert_eq!(dead.header(headers::ORIGINAL_ID), Some(trap.as_str()));
    let error = dead.header(headers::ERROR).unwrap();
    assert!(error.contains("wasm trap: wasm `unreachable` instruction executed"), "{error}");
    // a trap is retried: every one of the 3 attempts (fast_retries) ran, then the dead letter
    assert_eq!(dead.header(headers::ATTEMPTS), Some("3"));
    assert_eq!(t.counter("faulty", "attempts"), 3);
    assert_eq!(t.counter("faulty", "retried"), 2);
    assert_eq!(t.counter("faulty", "dead_lettered"), 1);
    // the same plugin serves the next event, and another plugin was never disturbed
    t.publish("faulty.ok", "").await;
    assert_eq!(seen.next_on("faulty.out.ok").await.subject, "faulty.out.ok");
    t.publish("orders.created", "{}").await;
    seen.next_on("orders.created").await;
    t.wait_counter("audit", "ok", 1).await;
    assert_eq!(t.counter("audit", "dead_lettered"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_reported_with_its_message_and_where_it_happened() {
    let t = TestHost::start_with(&["faulty"], fast_retries).await;
    let mut seen = t.observe(&["plugbus.dlq.>"]).await;
    let id = t.publish("faulty.panic", "").await;
    let dead = seen.next_on("plugbus.dlq.faulty").await;
    let error = dead.header(headers::ERROR).unwrap();
    assert!(error.starts_with("handler panicked: "), "{error}");
    assert!(error.contains(&format!("the handler gave up on event {id}")), "{error}");
    let (file, line, col) = panic_location(error).unwrap_or_else(|| panic!("no `(at file:line:col)` in {error:?}"));
    assert!(file.ends_with("src/lib.rs") && line > 0 && col > 0, "{error}");
    // a panic is a trap: retried like one
    assert_eq!(dead.header(headers::ATTEMPTS), Some("3"));
    assert_eq!(t.counter("faulty", "retried"), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_releases_none_of_its_outputs() {
    let t = TestHost::start_with(&["faulty"], fast_retries).await;
    let mut seen = t.observe(&["faulty.out.>"]).await;
    // publishes to faulty.out.flaky, then returns retry, every attempt: nothing may escape
    t.publish("faulty.flaky", "99").await;
    t.wait_counter("faulty", "dead_lettered", 1).await;
    assert_eq!(t.counter("faulty", "attempts"), 3, "every attempt ran (and published)");
    t.publish("faulty.ok", "").await;
    let next = seen.next_where(|_| true).await;
    assert_eq!(next.subject, "faulty.out.ok", "an output of a failed attempt escaped");
    let rest = seen.drain(Duration::from_millis(200)).await;
    assert!(rest.is_empty(), "an output of a failed attempt escaped: {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_dead_letter_mark_off_a_dead_letter_subject_is_dead_lettered_like_any_event() {
    let t = plugbus_tests::TestHost::start(&["faulty"]).await;
    // What a NATS publisher with direct access to the bus could send: the host's mark, forged.
    let mut forged = plugbus::Event::new("faulty.reject", "x").with_header("plugbus-error", "forged");
    forged.source = "plugbus/payments".into();
    t.host.publish(forged).await.unwrap();
    plugbus_tests::eventually("the forged event is dead-lettered", || {
        !t.host.dead_letters().list(Some("faulty")).is_empty()
    })
    .await;
    let dead = &t.host.dead_letters().list(Some("faulty"))[0].event;
    assert!(dead.header("plugbus-error").unwrap().contains("never"), "{dead:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_plugins_failing_on_each_others_dead_letters_stop_after_one_nesting() {
    // faulty's dead letters go to a subject hostile handles (and fails on), hostile's to one
    // faulty fails on: without a bound, every failure would nest the last dead letter again.
    let t = plugbus_tests::TestHost::start_with(&["faulty", "hostile"], |c| {
        c.plugins.entry("faulty".into()).or_default().dead_letter = Some("hostile.bounce".into());
        c.plugins.entry("hostile".into()).or_default().dead_letter = Some("faulty.reject".into());
    })
    .await;
    t.publish("faulty.reject", "x").await;
    plugbus_tests::eventually("faulty dead-lettered the event", || t.counter("faulty", "dead_lettered") >= 1).await;
    plugbus_tests::eventually("hostile dead-lettered that dead letter", || t.counter("hostile", "dead_lettered") >= 1)
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kept = t.host.dead_letters().list(None);
    assert_eq!(kept.len(), 2, "the event, and its dead letter once: {kept:#?}");
    assert_eq!(t.counter("faulty", "received"), 2, "faulty saw the event and the nested dead letter, no more");
    let nested = kept.iter().find(|e| e.plugin == "hostile").expect("hostile's dead letter");
    assert_eq!(nested.event.header("plugbus-dead-letter-depth"), Some("1"), "{nested:?}");
}

/// A transport (the embedded bus), but publishing an output whose data is `panic` panics, as
/// often as `.1` says: a bug of the host's on the delivery path, as no input can cause; and the
/// next `.2` subscriptions are refused (the bus's failure: a log that cannot commit now).
struct PanicsOnOutput(
    std::sync::Arc<dyn plugbus::transport::Transport>,
    std::sync::atomic::AtomicU32,
    std::sync::atomic::AtomicU32,
);

impl PanicsOnOutput {
    fn new(inner: std::sync::Arc<dyn plugbus::transport::Transport>, panics: u32) -> std::sync::Arc<Self> {
        let refusals = std::sync::atomic::AtomicU32::new(0);
        std::sync::Arc::new(Self(inner, std::sync::atomic::AtomicU32::new(panics), refusals))
    }
}

#[async_trait::async_trait]
impl plugbus::transport::Transport for PanicsOnOutput {
    fn name(&self) -> &'static str {
        "panics-on-output"
    }
    async fn publish(&self, event: plugbus::Event) -> Result<(), plugbus::transport::TransportError> {
        self.0.publish(event).await
    }
    async fn publish_output(
        &self,
        event: std::sync::Arc<plugbus::Event>,
    ) -> Result<(), plugbus::transport::TransportError> {
        if &event.data[..] == b"panic" {
            use std::sync::atomic::Ordering::SeqCst;
            let panics = self.1.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok();
            assert!(!panics, "injected: a host bug publishing {}", event.subject);
        }
        self.0.publish_output(event).await
    }
    fn all_subscribed(&self) {
        self.0.all_subscribed();
    }
    fn register_metrics(&self, registry: &mut plugbus::metrics::Registry) {
        self.0.register_metrics(registry);
    }
    async fn subscribe(
        &self,
        spec: plugbus::transport::SubscriptionSpec,
    ) -> Result<plugbus::transport::Subscription, plugbus::transport::TransportError> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.2.fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1)).is_ok() {
            return Err(plugbus::transport::TransportError::Broker("injected: the log cannot commit now".into()));
        }
        self.0.subscribe(spec).await
    }
    async fn retarget(
        &self,
        subscription: u64,
        spec: &plugbus::transport::SubscriptionSpec,
    ) -> Result<(), plugbus::transport::TransportError> {
        self.0.retarget(subscription, spec).await
    }
    async fn observe(
        &self,
        patterns: Vec<String>,
        capacity: usize,
    ) -> Result<plugbus::transport::Observed, plugbus::transport::TransportError> {
        self.0.observe(patterns, capacity).await
    }
}

/// Review 60c L2: a plugin whose subscription the bus refused (the log waiting out a failed
/// write, a broker that refused) was reported as refused for good: it stayed out until its file
/// changed. It is tried again by itself, as any load the host failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_whose_subscription_the_bus_refused_is_tried_again_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(plugbus_tests::wasm("audit"), dir.path().join("audit.wasm")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = plugbus::Config {
        plugins_dir: dir.path().into(),
        data_dir: data.path().into(),
        http: None,
        ..Default::default()
    };
    let transport = PanicsOnOutput::new(std::sync::Arc::new(plugbus::backend::embedded::bus::EmbeddedBus::new()), 0);
    let kv = std::sync::Arc::new(plugbus::kv::MemoryKv::new());
    let host = plugbus::Host::start_on(config, transport.clone(), kv).await.expect("host starts");
    transport.2.store(1, std::sync::atomic::Ordering::SeqCst);
    std::fs::copy(plugbus_tests::wasm("echo"), dir.path().join("echo.wasm")).unwrap();
    let refused = |h: &plugbus::Host| h.rejected().iter().any(|r| r.reason.contains("could not subscribe"));
    eventually("echo's subscription is refused", || refused(&host)).await;
    let why = host.rejected()[0].reason.clone();
    assert!(why.contains("tried again by itself"), "{why}");
    eventually("echo serves once tried again", || host.router().contains("echo")).await;
    assert!(host.rejected().is_empty(), "{:?}", host.rejected());
    host.shutdown().await;
}

/// Review 56b M1: a panic delivering an event of an ordering key (a host bug: nothing a handler
/// or producer sends reaches one) ended the key's lane with the lane still open. Every later
/// event of the key queued behind it for good, and once twice `flow.queue` of them waited, the
/// plugin took no event at all; the plugin never settled, so a stop waited out its drain. Now
/// the panic is caught, logged and counted as the host's, and its event alone is dropped
/// unsettled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_panic_delivering_an_event_of_a_key_hurts_only_that_event() {
    use plugbus::Event;
    let dir = tempfile::tempdir().unwrap();
    // echo's version 2 orders by the header `key` and copies each event to `echo.v2.<subject>`.
    std::fs::copy(plugbus_tests::wasm("echo2"), dir.path().join("echo.wasm")).unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = plugbus::Config {
        plugins_dir: dir.path().into(),
        data_dir: data.path().into(),
        http: None,
        ..Default::default()
    };
    config.flow.queue = 2;
    fast_retries(&mut config);
    let transport =
        PanicsOnOutput::new(std::sync::Arc::new(plugbus::backend::embedded::bus::EmbeddedBus::new()), u32::MAX);
    let kv = std::sync::Arc::new(plugbus::kv::MemoryKv::new());
    let host = plugbus::Host::start_on(config, transport, kv).await.expect("host starts");
    let mut seen = host.observe(&["echo.v2.>"]).await.unwrap();
    let keyed = |key: &str, data: &str| {
        let mut ev = Event::new("orders.created", data.to_string());
        ev.extensions.push(("key".into(), key.into()));
        ev
    };
    host.publish(keyed("k", "panic")).await.unwrap();
    // Behind it on its key, more than twice `flow.queue`, then another key's.
    for n in 0..6 {
        host.publish(keyed("k", &format!("k{n}"))).await.unwrap();
    }
    host.publish(keyed("j", "j0")).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 7 {
        let ev = tokio::time::timeout(Duration::from_secs(10), seen.recv())
            .await
            .unwrap_or_else(|_| panic!("only {got:?} came out: the key's lane (or the plugin) is wedged"))
            .unwrap();
        got.push(String::from_utf8_lossy(&ev.data).into_owned());
    }
    got.sort();
    assert_eq!(got, ["j0", "k0", "k1", "k2", "k3", "k4", "k5"]);
    let counters = &host.router().plugins().into_iter().find(|p| p.name == "echo").unwrap().counters;
    assert_eq!(counters["host_failures"], 1, "{counters:?}");
    plugbus_tests::eventually("nothing is left pending", || {
        host.router().plugins().into_iter().find(|p| p.name == "echo").unwrap().counters["pending"] == 0
    })
    .await;
    let report = host.shutdown().await;
    assert!(report.is_clean(), "{:?}", report.unfinished);
}
