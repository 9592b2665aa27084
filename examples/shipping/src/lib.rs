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

#[cfg(test)]
mod tests {
    use super::ship;
    use plugbus_sdk::{Event, testing::TestHost};
    use serde_json::json;

    #[test]
    fn a_paid_order_gets_a_tracking_number() {
        let paid = Event::new_json("payments.captured", &json!({ "order_id": "o-1", "email": "a@example.com" }));
        let run = TestHost::new().run(ship, paid);
        assert_eq!(run.result, Ok(()));
        assert_eq!(run.published[0].subject, "shipping.started");
        assert_eq!(
            run.published[0].json::<serde_json::Value>(),
            json!({ "order_id": "o-1", "email": "a@example.com", "tracking": "TRK-O-1" })
        );
    }
}
