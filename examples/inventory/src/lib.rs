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
