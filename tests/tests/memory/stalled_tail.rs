//! Live tails (hostile API, see `e2e/hostile_api.rs`): a client that asks for a tail and never
//! reads holds a bounded buffer, and what it missed is counted. It reads the test process's RSS,
//! so it lives in the `memory` binary.

use plugbus_tests::{TestHost, measuring_memory, metrics_text, sample};
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_tail_holds_a_bounded_buffer_and_counts_what_it_dropped() {
    let _alone = measuring_memory().await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const EVENTS: usize = 400;
    const SIZE: usize = 512 << 10;
    let t = TestHost::start_with(&[], |c| c.api.tail_buffer_bytes = 1 << 20).await;
    // A client that asks for a tail, reads the response head, then never reads again.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(t.host.http_addr().unwrap()).await.unwrap();
    stalled.write_all(b"GET /v1/events/bulk.* HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n").await.unwrap();
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(10), stalled.read(&mut buf)).await.unwrap().unwrap();
        assert!(n > 0, "the tail closed");
        head.extend_from_slice(&buf[..n]);
    }
    assert!(head.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&head));

    let rss = || {
        let s = std::fs::read_to_string("/proc/self/status").unwrap();
        s.lines().find(|l| l.starts_with("VmRSS:")).unwrap().split_whitespace().nth(1).unwrap().parse::<u64>().unwrap()
    };
    let before = rss();
    for i in 0..EVENTS {
        t.host.publish(plugbus::Event::new(format!("bulk.{i}"), vec![b'x'; SIZE])).await.unwrap();
        // Paced so the tail's forwarder sees every event (the bus drops events for an observer
        // that falls behind before the tail could count them).
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let dropped = || async { sample(&metrics_text(&t.url()).await, "plugbus_tail_events_dropped_total") };
    let deadline = Instant::now() + Duration::from_secs(30);
    while dropped().await.unwrap_or(0.0) < (EVENTS / 2) as f64 {
        assert!(Instant::now() < deadline, "dropped only {:?} of {EVENTS} events for a stalled tail", dropped().await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let grew_mib = rss().saturating_sub(before) / 1024;
    println!(
        "stalled tail: {EVENTS} x {} KiB published, {:?} dropped, the test process grew by {grew_mib} MiB",
        SIZE >> 10,
        dropped().await
    );
    assert!(grew_mib < 100, "a stalled tail made the host hold {grew_mib} MiB");
    let text = metrics_text(&t.url()).await;
    assert_eq!(sample(&text, "plugbus_tails_open"), Some(1.0), "{text}");
    drop(stalled);
}
