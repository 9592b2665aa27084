//! Captures the payment of each order whose stock was reserved.
//!
//! The card gateway is simulated: the operator's config `gateway = "down"` makes it unavailable.
//! An outage is transient, so the handler asks for a retry (the host backs off and runs it
//! again); from attempt `give_up_after` (config, default 3) on it stops waiting and publishes
//! `payments.failed`, so the order is settled one way or the other instead of dead-lettered.
use plugbus_sdk::{Event, HandlerError, config, handler, log, publish_json};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reserved {
    order_id: String,
    email: String,
    amount_cents: u64,
}

#[handler(subscribe = ["inventory.reserved"], publishes = ["payments.captured", "payments.failed"])]
fn capture(ev: Event) -> Result<(), HandlerError> {
    let order: Reserved = ev.json()?;
    if order.amount_cents == 0 {
        return Err(HandlerError::reject(format!("order {} has nothing to charge", order.order_id)));
    }
    if config::get("gateway").as_deref() == Some("down") {
        let give_up_after = config::get("give_up_after").and_then(|v| v.parse().ok()).unwrap_or(3);
        if ev.attempt() < give_up_after {
            log::warn(format!("order {}: gateway down, attempt {}", order.order_id, ev.attempt()));
            return Err(HandlerError::retry("payment gateway unavailable"));
        }
        log::error(format!("order {}: gateway still down after {} attempts", order.order_id, ev.attempt()));
        publish_json(
            "payments.failed",
            &serde_json::json!({
                "order_id": order.order_id,
                "email": order.email,
                "reason": format!("payment gateway unavailable after {} attempts", ev.attempt()),
            }),
        )?;
        return Ok(());
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

#[cfg(test)]
mod tests {
    use super::capture;
    use plugbus_sdk::testing::TestHost;
    use plugbus_sdk::{Event, HandlerError};
    use serde_json::{Value, json};

    fn reserved(amount_cents: u64) -> Event {
        let order =
            json!({ "order_id": "o-1", "email": "a@example.com", "amount_cents": amount_cents, "sku": "widget" });
        Event::new_json("inventory.reserved", &order).with_id("evt-9")
    }

    #[test]
    fn captures_a_reserved_order() {
        let run = TestHost::new().run(capture, reserved(1250));
        assert_eq!(run.result, Ok(()));
        assert_eq!(run.published.len(), 1);
        assert_eq!(run.published[0].subject, "payments.captured");
        let out: Value = run.published[0].json();
        assert_eq!((out["amount_cents"].as_u64(), out["payment_id"].as_str()), (Some(1250), Some("pay-evt-9")));
        assert_eq!(run.logs[0].message, "order o-1: captured 12.50");
    }

    #[test]
    fn a_gateway_outage_is_retried_then_settled_as_failed() {
        let mut host = TestHost::new().with_config("gateway", "down");
        for attempt in [1, 2] {
            let run = host.run(capture, reserved(1250).with_attempt(attempt));
            assert_eq!(run.result, Err(HandlerError::retry("payment gateway unavailable")), "attempt {attempt}");
            assert!(run.published.is_empty(), "attempt {attempt}: a retried attempt publishes nothing");
        }
        let last = host.run(capture, reserved(1250).with_attempt(3));
        assert_eq!(last.result, Ok(()));
        assert_eq!(last.published.len(), 1);
        assert_eq!(last.published[0].subject, "payments.failed");
        assert_eq!(last.published[0].json::<Value>()["reason"], "payment gateway unavailable after 3 attempts");
    }

    #[test]
    fn the_operator_sets_how_long_to_wait() {
        let mut host = TestHost::new().with_config("gateway", "down").with_config("give_up_after", "5");
        assert!(host.run(capture, reserved(1250).with_attempt(4)).result.unwrap_err().is_retry());
        assert_eq!(host.run(capture, reserved(1250).with_attempt(5)).published[0].subject, "payments.failed");
    }

    #[test]
    fn nothing_to_charge_is_rejected_not_retried() {
        let run = TestHost::new().run(capture, reserved(0));
        assert_eq!(run.result, Err(HandlerError::reject("order o-1 has nothing to charge")));
    }
}
