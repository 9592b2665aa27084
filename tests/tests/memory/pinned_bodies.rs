//! Events posted over HTTP hold what their bytes say (hostile API client, see
//! `e2e/hostile_api.rs`): every bound on held events (a plugin's `flow.buffer_mib`, a tail's
//! `api.tail_buffer_bytes`, the log's memory) counts `data.len()`. It reads the test process's
//! RSS, so it lives in the `memory` binary.

use plugbus_tests::{TestHost, measuring_memory};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A 1-byte body sent with a 300 KiB `Cookie` header in one write was a slice of hyper's read
/// buffer: each event held kept the whole buffer alive, about 400 KiB charged as 1 byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_body_sent_with_a_huge_head_holds_only_its_own_bytes() {
    let _alone = measuring_memory().await;
    const EVENTS: usize = 300;
    let t = TestHost::start(&[]).await;
    // Something that holds every event (as a plugin's queue or a tail would), never reading.
    let held = t.observe(&["pinned.>"]).await;
    let addr = t.host.http_addr().unwrap();
    let cookie = "c".repeat(300 << 10);
    let post = |i: usize| {
        format!(
            "POST /v1/events/pinned.{i} HTTP/1.1\r\nhost: 127.0.0.1\r\ncookie: {cookie}\r\ncontent-length: 1\r\n\
             connection: close\r\n\r\nx"
        )
    };
    let send = |request: String| async move {
        let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
        socket.write_all(request.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        socket.read_to_end(&mut answer).await.unwrap();
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert!(answer.starts_with("HTTP/1.1 202"), "{}", &answer[..answer.len().min(300)]);
    };
    // Warm up (the server's buffers, the allocator), then measure.
    for i in 0..20 {
        send(post(i)).await;
    }
    let before = super::rss_mib();
    for i in 0..EVENTS {
        send(post(i)).await;
    }
    let grew = super::rss_mib().saturating_sub(before);
    println!("{EVENTS} events of 1 byte posted with a 300 KiB head: the test process grew by {grew} MiB");
    // Pinned, they held 90 MiB (300 KiB each); copied, 0.
    assert!(grew < 40, "{EVENTS} 1-byte events held {grew} MiB");
    drop(held);
}
