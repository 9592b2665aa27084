//! What a plugin's deliveries hold while they back off stays bounded: the record of a failed
//! attempt (what it read, logged and published: up to 1 MiB charged, a few MB of heap) is let
//! go before the wait, not kept through it. Only the last attempt's record goes into a dead
//! letter, and one held through every wait was outside `flow.buffer_mib` (review 43 F2: 1,000
//! deliveries backing off held 627 MB for events of 8 bytes).

use crate::rss_mib;
use plugbus::retry::RetryPolicy;
use plugbus::router::Flow;
use plugbus_tests::{TestHost, measuring_memory};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_backing_off_hold_no_record_of_their_failed_attempt() {
    let _alone = measuring_memory().await;
    // Each attempt reads absent kv keys until its deadline, then traps (retried in a minute):
    // its record is cut at 1 MiB of reads.
    const EVENTS: u64 = 80;
    let t = TestHost::start_with(&["hostile"], |c| {
        c.limits.deadline = Duration::from_millis(300);
        c.limits.max_kv_reads = 10_000_000;
        c.flow = Flow { concurrency: 2, ..Flow::default() };
        c.retry = RetryPolicy {
            max_attempts: 5,
            initial: Duration::from_secs(60),
            max: Duration::from_secs(60),
            ..RetryPolicy::default()
        };
    })
    .await;
    let before = rss_mib();
    for _ in 0..EVENTS {
        t.publish("hostile.kvreads", "10000000").await;
    }
    // Every delivery failed once and waits for its second attempt.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while t.counter("hostile", "retried") < EVENTS {
        assert!(tokio::time::Instant::now() < deadline, "retried {} of {EVENTS}", t.counter("hostile", "retried"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grown = rss_mib().saturating_sub(before);
    eprintln!("{EVENTS} deliveries backing off after an attempt that read kv for 300 ms: RSS grew {grown} MiB");
    // Kept through the wait, their records were about 2.8 MB each (224 MB here).
    assert!(grown < 64, "{EVENTS} deliveries backing off grew RSS by {grown} MiB");
    assert_eq!(t.counter("hostile", "dead_lettered"), 0);
}
