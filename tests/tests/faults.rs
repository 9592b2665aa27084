//! A handler that fails hurts only its own delivery: the host, other plugins and later events
//! carry on, and every failure ends in a dead letter naming plugin, event and cause.

use plugbus::deadletter::headers;
use plugbus_tests::{TestHost, fast_retries};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_handler_fails_only_that_delivery() {
    let t = TestHost::start_with(&["faulty", "audit"], fast_retries).await;
    let mut seen = t.observe(&["faulty.out.>", "orders.>", "plugbus.dlq.>"]).await;
    let trap = t.publish("faulty.trap", "").await;
    let dead = seen.next_on("plugbus.dlq.faulty").await;
    assert_eq!(dead.header(headers::ORIGINAL_ID), Some(trap.as_str()));
    assert!(dead.header(headers::ERROR).unwrap().contains("unreachable"), "{:?}", dead.header(headers::ERROR));
    // the same plugin serves the next event, and another plugin was never disturbed
    t.publish("faulty.ok", "").await;
    assert_eq!(seen.next_on("faulty.out.ok").await.subject, "faulty.out.ok");
    t.publish("orders.created", "{}").await;
    seen.next_on("orders.created").await;
    t.wait_counter("audit", "ok", 1).await;
    assert_eq!(t.counter("audit", "dead_lettered"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_reported_with_its_message() {
    let t = TestHost::start_with(&["faulty"], fast_retries).await;
    let mut seen = t.observe(&["plugbus.dlq.>"]).await;
    t.publish("faulty.panic", "").await;
    let dead = seen.next_on("plugbus.dlq.faulty").await;
    let error = dead.header(headers::ERROR).unwrap();
    assert!(error.contains("panicked") && error.contains("the handler gave up"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_releases_none_of_its_outputs() {
    let t = TestHost::start_with(&["faulty"], fast_retries).await;
    let mut seen = t.observe(&["faulty.out.>"]).await;
    // publishes to faulty.out.flaky, then returns retry, every attempt: nothing may escape
    t.publish("faulty.flaky", "99").await;
    t.wait_counter("faulty", "dead_lettered", 1).await;
    t.publish("faulty.ok", "").await;
    let next = seen.next_where(|_| true).await;
    assert_eq!(next.subject, "faulty.out.ok", "an output of a failed attempt escaped");
}
