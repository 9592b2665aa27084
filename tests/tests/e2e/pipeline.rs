//! The example order pipeline, end to end on the embedded bus.

use plugbus_tests::{TestHost, order};
use std::time::Duration;

const PIPELINE: &[&str] = &["inventory", "payments", "shipping", "notify", "audit"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_flows_from_created_to_shipped_and_notify_runs() {
    let t = TestHost::start(PIPELINE).await;
    let mut seen = t.observe(&[">"]).await;
    t.publish("orders.created", order("o-1", "widget", 2)).await;

    let reserved = seen.next_on("inventory.reserved").await;
    assert_eq!(reserved.source, "plugbus/inventory");
    let captured = seen.next_on("payments.captured").await;
    assert_eq!(captured.header("plugbus-caused-by"), Some(reserved.id.as_str()));
    let shipped = seen.next_on("shipping.started").await;
    let body: serde_json::Value = serde_json::from_slice(&shipped.data).unwrap();
    assert_eq!(body["tracking"], "TRK-O-1");
    assert_eq!(shipped.datacontenttype.as_deref(), Some("application/json"));

    t.wait_counter("notify", "ok", 1).await;
    assert_eq!(t.counter("notify", "dead_lettered"), 0);
    // audit saw the four pipeline subjects through its wildcard subscriptions
    t.wait_counter("audit", "ok", 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_out_of_stock_order_is_rejected_and_the_customer_told() {
    let t = TestHost::start(PIPELINE).await;
    let mut seen = t.observe(&["inventory.>", "payments.>"]).await;
    t.publish("orders.created", order("o-9", "unobtainium", 1)).await;
    let rejected = seen.next_where(|e| e.subject.starts_with("inventory.")).await;
    assert_eq!(rejected.subject, "inventory.rejected");
    let body: serde_json::Value = serde_json::from_slice(&rejected.data).unwrap();
    assert_eq!(body["order"]["order_id"], "o-9");
    assert!(body["reason"].as_str().unwrap().contains("in stock"), "{body}");
    t.wait_counter("notify", "ok", 1).await;
    assert!(seen.drain(Duration::from_millis(300)).await.iter().all(|e| !e.subject.starts_with("payments.")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_holds_the_reserved_count_even_with_concurrent_orders() {
    const ROUNDS: usize = 20;
    let t = TestHost::start_with(PIPELINE, |c| {
        let inventory = c.plugins.entry("inventory".into()).or_default();
        for r in 0..ROUNDS {
            inventory.config.insert(format!("stock.w{r}"), 10.into());
        }
    })
    .await;
    let mut seen = t.observe(&["inventory.*"]).await;
    let get =
        async |k: &str| t.host.kv().get("inventory", k).await.unwrap().map(|v| String::from_utf8(v.value).unwrap());
    // Rounds of 5 orders of 1 of the same sku at once: each reads and writes the same kv keys
    // concurrently. A round ends right when two attempts collided (a kv conflict re-runs one:
    // the plugin counts more attempts than deliveries); every round must count exactly.
    let mut sku = String::new();
    for round in 0..ROUNDS {
        sku = format!("w{round}");
        let orders = (0..5).map(|i| t.publish("orders.created", order(&format!("c-{round}-{i}"), &sku, 1)));
        futures::future::join_all(orders).await;
        for _ in 0..5 {
            seen.next_on("inventory.reserved").await;
        }
        t.wait_counter("inventory", "ok", 5 * (round as u64 + 1)).await;
        assert_eq!(get(&format!("reserved/{sku}")).await.as_deref(), Some("5"), "round {round}");
        assert_eq!(get(&format!("stock/{sku}")).await.as_deref(), Some("5"), "round {round}");
        if t.counter("inventory", "attempts") > t.counter("inventory", "received") {
            break;
        }
    }
    assert!(
        t.counter("inventory", "attempts") > t.counter("inventory", "received"),
        "no kv conflict in {ROUNDS} rounds of concurrent orders: the test never exercised one"
    );
    // the stock then runs out: 10 at start, 5 reserved, an order for 6 is refused
    t.publish("orders.created", order("c-big", &sku, 6)).await;
    assert_eq!(seen.next_where(|e| e.subject != "inventory.reserved").await.subject, "inventory.rejected");
    assert_eq!(get(&format!("reserved/{sku}")).await.as_deref(), Some("5"));
}
