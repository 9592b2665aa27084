//! Captures the payment of each order whose stock was reserved.
use plugbus_sdk::{Event, HandlerError, handler, log, publish_json};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reserved {
    order_id: String,
    email: String,
    amount_cents: u64,
}

#[handler(subscribe = ["inventory.reserved"], publishes = ["payments.captured"])]
fn capture(ev: Event) -> Result<(), HandlerError> {
    let order: Reserved = ev.json()?;
    if order.amount_cents == 0 {
        return Err(HandlerError::reject(format!("order {} has nothing to charge", order.order_id)));
    }
    log::info(format!(
        "order {}: captured {}.{:02}",
        order.order_id,
        order.amount_cents / 100,
        order.amount_cents % 100
    ));
    publish_json(
        "payments.captured",
        &serde_json::json!({
            "order_id": order.order_id,
            "email": order.email,
            "amount_cents": order.amount_cents,
            "payment_id": format!("pay-{}", ev.id()),
        }),
    )?;
    Ok(())
}
