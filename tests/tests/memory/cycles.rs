//! Cycles through the bus make progress: a plugin whose outputs come back to its own queue
//! never waits on that queue (its outputs go behind it, bounded by `flow.buffer_mib`), so a
//! finite tree of work much larger than `flow.queue` finishes, and a runaway fills only its own
//! buffer while the ingress and other plugins keep serving.

use crate::rss_mib;
use plugbus::router::Flow;
use plugbus_tests::{TestHost, eventually, fast_retries, measuring_memory};
use std::collections::HashMap;
use std::time::Duration;

async fn post(client: &reqwest::Client, url: &str, body: String) -> u16 {
    let send = client.post(url).body(body).send();
    let resp = tokio::time::timeout(Duration::from_secs(30), send).await.expect("the ingress answered in time");
    resp.expect("request").status().as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_feeding_its_own_subject_finishes_every_branch() {
    let _alone = measuring_memory().await;
    // Each root makes a tree of 2^8 - 1 = 255 node events and 128 leaves, all through the
    // plugin's own queue of 16: 32 roots at once are 8,160 events through a queue of 16.
    const ROOTS: usize = 32;
    const DEPTH: u32 = 7;
    let t = TestHost::start_with(&["cycler"], |c| c.flow = Flow { concurrency: 4, queue: 16, ..Flow::default() }).await;
    let mut leaves = t.observe(&["tree.leaf"]).await;
    let before = rss_mib();
    let started = std::time::Instant::now();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/events/tree.node", t.url());
    let posts = (0..ROOTS).map(|i| {
        let (client, url) = (client.clone(), url.clone());
        tokio::spawn(async move { post(&client, &url, format!("{DEPTH} root{i}")).await })
    });
    for status in futures::future::join_all(posts).await {
        assert_eq!(status.expect("client task"), 202);
    }
    let mut per_root: HashMap<String, usize> = HashMap::new();
    let want = 1usize << DEPTH;
    for _ in 0..ROOTS * want {
        let leaf = leaves.next_on("tree.leaf").await;
        *per_root.entry(String::from_utf8_lossy(&leaf.data).into_owned()).or_default() += 1;
    }
    assert_eq!(per_root.len(), ROOTS, "every root reached its leaves: {per_root:?}");
    assert!(per_root.values().all(|n| *n == want), "every branch finished once: {per_root:?}");
    let nodes = (ROOTS * ((1usize << (DEPTH + 1)) - 1)) as u64;
    t.wait_counter("cycler", "ok", nodes).await;
    let grown = rss_mib().saturating_sub(before);
    eprintln!(
        "cycle burst: {nodes} node events through a queue of 16 in {:?}; RSS grew {grown} MiB",
        started.elapsed()
    );
    assert!(grown < 256, "RSS grew by {grown} MiB during the cycle burst");
    assert_eq!(t.counter("cycler", "dead_lettered"), 0);
    assert!(t.host.dead_letters().list(None).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runaway_plugin_fills_only_its_own_buffer() {
    let _alone = measuring_memory().await;
    let t = TestHost::start_with(&["cycler", "echo"], |c| {
        fast_retries(c);
        c.flow = Flow { concurrency: 4, queue: 16, buffer_mib: 1, ..Flow::default() };
        c.drain_timeout = Duration::from_millis(200);
    })
    .await;
    let client = reqwest::Client::new();
    let base = t.url();
    let before = rss_mib();
    assert_eq!(post(&client, &format!("{base}/v1/events/runaway.go"), "x".repeat(1000)).await, 202);
    // Every event makes two: the buffer fills, and outputs beyond it are refused, retried,
    // then dead-lettered by themselves (the handler is not run again).
    eventually("the runaway's refused outputs are dead-lettered", || {
        t.host.dead_letters().list(Some("cycler")).iter().any(|d| {
            d.event.header("plugbus-error").is_some_and(|e| e.contains("flow.buffer_mib") && e.contains("cycler"))
        })
    })
    .await;
    // Meanwhile the ingress and the other plugin serve as usual.
    let mut echoed = t.observe(&["echo.orders.created"]).await;
    for i in 0..20 {
        assert_eq!(post(&client, &format!("{base}/v1/events/orders.created"), format!("order {i}")).await, 202);
        let ev = echoed.next_on("echo.orders.created").await;
        assert_eq!(ev.data, format!("order {i}").as_bytes());
    }
    // Memory stays bounded while it runs on.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let grown = rss_mib().saturating_sub(before);
    eprintln!("runaway: RSS grew {grown} MiB (flow.buffer_mib = 1)");
    assert!(grown < 256, "RSS grew by {grown} MiB while a runaway ran");
    assert!(t.counter("cycler", "ok") > 100, "the runaway kept running");
    t.host.shutdown().await;
}
