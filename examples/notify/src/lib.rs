//! Logs the e-mail it would send: shipped orders and orders rejected for lack of stock.
use plugbus_sdk::{Event, HandlerError, config, handler, log};
use serde_json::Value;

#[handler(subscribe = ["shipping.started", "inventory.rejected"])]
fn notify(ev: Event) -> Result<(), HandlerError> {
    let body: Value = ev.json()?;
    let sender = config::get("sender").unwrap_or_else(|| "shop@example.com".into());
    let text = match ev.subject() {
        "shipping.started" => format!(
            "to {}: your order {} is on its way (tracking {})",
            body["email"].as_str().unwrap_or("?"),
            body["order_id"].as_str().unwrap_or("?"),
            body["tracking"].as_str().unwrap_or("?"),
        ),
        _ => format!(
            "to {}: sorry, we could not take order {}: {}",
            body["order"]["email"].as_str().unwrap_or("?"),
            body["order"]["order_id"].as_str().unwrap_or("?"),
            body["reason"].as_str().unwrap_or("?"),
        ),
    };
    log::info(format!("e-mail from {sender} {text}"));
    Ok(())
}
