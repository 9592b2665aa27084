//! Starts shipping each paid order.
use plugbus_sdk::{Event, HandlerError, handler, log, publish_json};
use serde::Deserialize;

#[derive(Deserialize)]
struct Paid {
    order_id: String,
    email: String,
}

#[handler(subscribe = ["payments.captured"], publishes = ["shipping.started"])]
fn ship(ev: Event) -> Result<(), HandlerError> {
    let paid: Paid = ev.json()?;
    let tracking = format!("TRK-{}", paid.order_id.to_uppercase());
    log::info(format!("order {}: handed to the carrier as {tracking}", paid.order_id));
    publish_json(
        "shipping.started",
        &serde_json::json!({ "order_id": paid.order_id, "email": paid.email, "tracking": tracking }),
    )?;
    Ok(())
}
