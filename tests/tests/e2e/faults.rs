//! A handler that fails hurts only its own delivery: the host, other plugins and later events
//! carry on, and every failure ends in a dead letter naming plugin, event and cause.

use plugbus::deadletter::headers;
use plugbus_tests::{TestHost, fast_retries};
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
