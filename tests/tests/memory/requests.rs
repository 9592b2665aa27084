//! Requests on core NATS that nobody answers (hostile plugin or API client, see
//! `e2e/request_reply.rs`): each times out and leaves nothing behind. It reads the test
//! process's RSS, so it lives in the `memory` binary.

use futures::StreamExt;
use plugbus::Event;
use plugbus::rpc::RequestError;
use plugbus_tests::nats::NatsServer;
use plugbus_tests::{Bus, TestHost, measuring_memory};
use std::time::Duration;

/// async-nats's shared request inbox keeps an entry per request until its reply comes
/// (nats-io/nats.rs#1617): one that never comes (a subscriber that does not answer, which is
/// any ordinary handler on the subject) stayed for the life of the connection. A plugin at 16
/// requests per event with a 1 ms timeout, or a client of `POST /v1/request`, grew the host
/// without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_nobody_answers_leave_nothing_behind() {
    let _alone = measuring_memory().await;
    let server = NatsServer::start().await;
    let t = TestHost::start_on(&Bus::Core(&server), &[], |_| {}).await;
    // Interest on the subject (no "no responders" status), and never a reply. (Read and let go:
    // kept unread in this process, the requests filled its buffer, 65,536 of them.)
    let silent = server.client().await;
    let mut interest = silent.subscribe("rpc.silent").await.unwrap();
    silent.flush().await.unwrap();
    let drain = tokio::spawn(async move { while interest.next().await.is_some() {} });
    let transport = t.host.transport().clone();
    let ask = |n: usize| {
        let transport = transport.clone();
        async move {
            let outcomes: Vec<String> = futures::stream::iter(0..n)
                .map(|_| {
                    let transport = transport.clone();
                    async move { transport.request(Event::new("rpc.silent", "?"), Duration::from_millis(1), true).await }
                })
                .buffer_unordered(64)
                .filter_map(|r| {
                    std::future::ready(match r {
                        Err(RequestError::Timeout { .. }) => None,
                        Ok(reply) => Some(format!("a reply on {}", reply.subject)),
                        Err(e) => Some(e.to_string()),
                    })
                })
                .collect()
                .await;
            // Nothing answers, so nothing is a reply. On a loaded machine a few requests may end
            // otherwise (4 of 50,000 in one CI run, which did not say how: a server that cuts the
            // silent reader off as a slow consumer for a moment answers "no responders"); they
            // leave nothing behind either, and are printed.
            assert!(!outcomes.iter().any(|o| o.starts_with("a reply")), "nobody answers, yet: {outcomes:?}");
            assert!(outcomes.len() <= n / 100, "most requests time out; these did not: {outcomes:?}");
            if !outcomes.is_empty() {
                println!(
                    "{} of {n} requests did not time out: {:?}",
                    outcomes.len(),
                    &outcomes[..outcomes.len().min(5)]
                );
            }
        }
    };
    // A first pass grows the process once (the allocator, the client's buffers and maps, to
    // their peak); a second as long must not grow it again.
    const REQUESTS: usize = 50_000;
    let start = super::rss_mib();
    ask(REQUESTS).await;
    let before = super::rss_mib();
    ask(REQUESTS).await;
    let grew = super::rss_mib().saturating_sub(before);
    println!(
        "{REQUESTS} requests nobody answered: the test process grew by {} MiB, then {grew} MiB",
        before.saturating_sub(start)
    );
    // What was kept held about 440 bytes a request: 21 MiB a pass (4 MiB with the fix).
    assert!(grew < 12, "{REQUESTS} more requests nobody answered grew the host by {grew} MiB");
    drain.abort();
    t.host.shutdown().await;
}
