//! A handler that fails hurts only its own delivery: the host, other plugins and later events
//! carry on, and every failure is logged and counted.

use plugbus_tests::TestHost;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trapping_handler_fails_only_that_delivery() {
    let t = TestHost::start(&["faulty", "audit"]).await;
    let mut seen = t.observe(&["faulty.out.>", "orders.>"]).await;
    t.publish("faulty.trap", "").await;
    t.publish("faulty.panic", "").await;
    t.publish("faulty.reject", "").await;
    t.wait_counter("faulty", "failed", 3).await;
    // the same plugin serves the next event, and another plugin was never disturbed
    t.publish("faulty.ok", "").await;
    assert_eq!(seen.next_on("faulty.out.ok").await.subject, "faulty.out.ok");
    t.publish("orders.created", "{}").await;
    seen.next_on("orders.created").await;
    t.wait_counter("audit", "ok", 1).await;
    assert_eq!(t.counter("audit", "failed"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_attempt_releases_none_of_its_outputs() {
    let t = TestHost::start(&["faulty"]).await;
    let mut seen = t.observe(&["faulty.out.>"]).await;
    // publishes to faulty.out.flaky, then returns retry: the output must not escape
    t.publish("faulty.flaky", "99").await;
    t.wait_counter("faulty", "failed", 1).await;
    t.publish("faulty.ok", "").await;
    let next = seen.next_where(|_| true).await;
    assert_eq!(
        next.subject, "faulty.out.ok",
        "an output of the failed attempt escaped"
    );
}
