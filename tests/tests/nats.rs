//! The NATS transport against a real nats-server: fan-out on wildcards, queue groups across
//! hosts, CloudEvents in and out, JetStream at-least-once through a host crash and a broker
//! restart. (Retry and dead-letter cases run on both transports in `delivery.rs`.)

use futures::StreamExt;
use plugbus_tests::nats::NatsServer;
use plugbus_tests::{Bus, TestHost};
use std::collections::HashSet;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fan_out_to_two_plugins_on_wildcard_subjects() {
    let server = NatsServer::start().await;
    let t = TestHost::start_on(&Bus::Core(&server), &["echo", "audit"], |_| {}).await;
    assert_eq!(t.host.transport().name(), "nats");
    let client = server.client().await;
    let mut echoes = client.subscribe("echo.>").await.unwrap();
    client.flush().await.unwrap();
    for i in 0..20 {
        client.publish(format!("orders.o{i}"), format!("{i}").into()).await.unwrap();
    }
    client.flush().await.unwrap();
    let mut seen = HashSet::new();
    while seen.len() < 20 {
        let msg = tokio::time::timeout(Duration::from_secs(10), echoes.next()).await.expect("echo output").unwrap();
        seen.insert(msg.subject.to_string());
    }
    assert!(seen.contains("echo.orders.o7"));
    t.wait_counter("audit", "ok", 20).await;
    assert_eq!(t.counter("echo", "ok"), 20);
}
