//! Reserves stock for each new order. Stock lives in the plugin's kv (`stock/<sku>`), seeded
//! from the operator's config (`stock.<sku>`) or a small built-in catalogue on first use.
use plugbus_sdk::{Event, HandlerError, config, handler, kv, log, publish_json};
use serde::{Deserialize, Serialize};

#[derive(Deserialize, Serialize)]
struct Order {
    order_id: String,
    sku: String,
    qty: u64,
    email: String,
    amount_cents: u64,
}

fn initial_stock(sku: &str) -> u64 {
    config::get(&format!("stock.{sku}")).and_then(|v| v.parse().ok()).unwrap_or(match sku {
        "widget" => 10,
        "gadget" => 5,
        _ => 0,
    })
}

#[handler(subscribe = ["orders.created"], publishes = ["inventory.>"])]
fn reserve(ev: Event) -> Result<(), HandlerError> {
    let order: Order = ev.json()?;
    let stock_key = format!("stock/{}", order.sku);
    let stock = kv::get_json::<u64>(&stock_key)?.unwrap_or_else(|| initial_stock(&order.sku));
    if stock < order.qty {
        log::warn(format!("order {}: {} x {} wanted, {stock} in stock", order.order_id, order.qty, order.sku));
        let reason = format!("only {stock} x {} in stock", order.sku);
        publish_json("inventory.rejected", &serde_json::json!({ "order": order, "reason": reason }))?;
        return Ok(());
    }
    kv::set_json(&stock_key, &(stock - order.qty))?;
    let reserved_key = format!("reserved/{}", order.sku);
    let reserved = kv::get_json::<u64>(&reserved_key)?.unwrap_or(0) + order.qty;
    kv::set_json(&reserved_key, &reserved)?;
    log::info(format!("order {}: reserved {} x {} ({} left)", order.order_id, order.qty, order.sku, stock - order.qty));
    publish_json("inventory.reserved", &order)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::reserve;
    use plugbus_sdk::testing::TestHost;
    use plugbus_sdk::{Event, HandlerError};
    use serde_json::{Value, json};

    fn order(sku: &str, qty: u64) -> Event {
        let order = json!({ "order_id": "o-1", "sku": sku, "qty": qty, "email": "a@example.com", "amount_cents": 500 });
        Event::new_json("orders.created", &order)
    }

    #[test]
    fn out_of_stock_is_rejected_and_nothing_is_reserved() {
        let mut host = TestHost::new().with_kv_json("stock/widget", &1u64);
        let run = host.run(reserve, order("widget", 2));
        assert_eq!(run.result, Ok(()), "out of stock is an answer, not a failure");
        assert_eq!(run.published.len(), 1);
        assert_eq!(run.published[0].subject, "inventory.rejected");
        let out: Value = run.published[0].json();
        assert_eq!(out["reason"], "only 1 x widget in stock");
        assert_eq!(out["order"]["order_id"], "o-1");
        assert_eq!(run.kv, *TestHost::new().with_kv_json("stock/widget", &1u64).kv(), "stock untouched");
        assert_eq!(run.logs[0].to_string(), "WARN order o-1: 2 x widget wanted, 1 in stock");
    }

    #[test]
    fn reserves_from_the_operators_stock_and_remembers_it() {
        let mut host = TestHost::new().with_config("stock.gizmo", "3");
        let first = host.run(reserve, order("gizmo", 2));
        assert_eq!(first.published[0].subject, "inventory.reserved");
        assert_eq!(first.kv_get_json::<u64>("stock/gizmo"), Some(1));
        assert_eq!(first.kv_get_json::<u64>("reserved/gizmo"), Some(2));
        // The next order sees the stock the first one left.
        let second = host.run(reserve, order("gizmo", 2));
        assert_eq!(second.published[0].subject, "inventory.rejected");
    }

    #[test]
    fn an_unknown_sku_has_no_stock() {
        let run = TestHost::new().run(reserve, order("unobtainium", 1));
        assert_eq!(run.published[0].json::<Value>()["reason"], "only 0 x unobtainium in stock");
    }

    #[test]
    fn malformed_orders_are_rejected() {
        let run = TestHost::new().run(reserve, Event::new("orders.created", "not json"));
        assert!(matches!(run.result, Err(HandlerError::Reject(_))), "{:?}", run.result);
        assert!(run.published.is_empty() && run.kv.is_empty());
    }
}
