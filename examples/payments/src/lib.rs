//! Captures the payment of each order whose stock was reserved.
//!
//! With the operator's config `provider_url` (e.g. `"http://127.0.0.1:7071"`, the demo's stub
//! provider; granted with `[plugins.payments] allowed_outbound`), it charges the order through
//! the provider's `POST {provider_url}/v1/charges`. The host puts an `Idempotency-Key` on the
//! request, the same on every retry of the event, so a provider that honours it (as payment
//! APIs do) never charges twice. Without `provider_url` the capture is simulated (a log line
//! says so), which is what the tests of the pipeline run.
//!
//! A provider that is down (5xx, timeout, connection refused, an open circuit breaker) is
//! transient: the handler asks for a retry (an open breaker's cool-down is waited out by the
//! host without charging an attempt); from attempt `give_up_after` (config, default 3) on it
//! stops waiting and publishes `payments.failed`, so the order is settled one way or the other
//! instead of dead-lettered. A declined card (4xx) is `payments.failed` at once. The config
//! `gateway = "down"` simulates an outage without a provider.
use plugbus_sdk::{Event, HandlerError, config, handler, http, log, publish_json};
use serde::Deserialize;

#[derive(Deserialize)]
struct Reserved {
    order_id: String,
    email: String,
    amount_cents: u64,
}

/// What the charge came to.
enum Charge {
    /// Captured, with the provider's id for it.
    Captured(String),
    /// The provider refused it for good (a declined card).
    Declined(String),
    /// The provider could not be reached or failed: worth another attempt.
    Unavailable(HandlerError),
}

#[handler(
    subscribe = ["inventory.reserved"],
    publishes = ["payments.captured", "payments.failed"],
    outbound = ["http://127.0.0.1:*", "https://api.payments.example"]
)]
fn capture(ev: Event) -> Result<(), HandlerError> {
    let order: Reserved = ev.json()?;
    if order.amount_cents == 0 {
        return Err(HandlerError::reject(format!("order {} has nothing to charge", order.order_id)));
    }
    let charge = if config::get("gateway").as_deref() == Some("down") {
        Charge::Unavailable(HandlerError::retry("payment gateway unavailable"))
    } else {
        match config::get("provider_url") {
            Some(url) => charge(&url, &order)?,
            None => {
                log::info(format!("order {}: no provider_url configured, capture simulated", order.order_id));
                Charge::Captured(format!("pay-{}", ev.id()))
            }
        }
    };
    let failed = |reason: String| {
        publish_json(
            "payments.failed",
            &serde_json::json!({ "order_id": order.order_id, "email": order.email, "reason": reason }),
        )
    };
    match charge {
        Charge::Captured(payment_id) => {
            log::info(format!(
                "order {}: captured {}.{:02} ({payment_id})",
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
                    "payment_id": payment_id,
                }),
            )?;
        }
        Charge::Declined(why) => {
            log::warn(format!("order {}: {why}", order.order_id));
            failed(why)?;
        }
        Charge::Unavailable(err) => {
            let give_up_after = config::get("give_up_after").and_then(|v| v.parse().ok()).unwrap_or(3);
            if ev.attempt() < give_up_after {
                log::warn(format!("order {}: {}, attempt {}", order.order_id, err.message(), ev.attempt()));
                return Err(err);
            }
            log::error(format!("order {}: {} after {} attempts", order.order_id, err.message(), ev.attempt()));
            failed(format!("{} after {} attempts", err.message(), ev.attempt()))?;
        }
    }
    Ok(())
}

/// Charges `order` through the provider at `url`. A refused call (the destination not granted)
/// is the operator's to fix: it rejects the event (`?`), to be replayed once granted.
fn charge(url: &str, order: &Reserved) -> Result<Charge, HandlerError> {
    let body = serde_json::json!({
        "order_id": order.order_id,
        "amount_cents": order.amount_cents,
        "email": order.email,
    });
    let res = match http::post_json(&format!("{}/v1/charges", url.trim_end_matches('/')), &body) {
        Ok(res) => res,
        Err(e @ (http::HttpError::Timeout | http::HttpError::CircuitOpen { .. } | http::HttpError::Failed(_))) => {
            return Ok(Charge::Unavailable(e.into()));
        }
        Err(e) => return Err(e.into()),
    };
    Ok(match res.status {
        200..=299 => match res.json::<serde_json::Value>().ok().and_then(|v| v["id"].as_str().map(str::to_owned)) {
            Some(id) => Charge::Captured(id),
            None => Charge::Unavailable(HandlerError::retry("the payment provider's answer has no charge id")),
        },
        400..=499 => Charge::Declined(format!("declined by the payment provider ({}): {}", res.status, res.text())),
        s => Charge::Unavailable(HandlerError::retry(format!("the payment provider answered {s}"))),
    })
}

#[cfg(test)]
mod tests {
    use super::capture;
    use plugbus_sdk::testing::TestHost;
    use plugbus_sdk::{Event, HandlerError};
    use serde_json::{Value, json};

    const CHARGES: &str = "http://127.0.0.1:7071/v1/charges";

    fn reserved(amount_cents: u64) -> Event {
        let order =
            json!({ "order_id": "o-1", "email": "a@example.com", "amount_cents": amount_cents, "sku": "widget" });
        Event::new_json("inventory.reserved", &order).with_id("evt-9")
    }

    fn with_provider() -> TestHost {
        TestHost::new().with_config("provider_url", "http://127.0.0.1:7071")
    }

    #[test]
    fn captures_a_reserved_order_through_the_provider() {
        let run = with_provider()
            .with_http(CHARGES, 201, r#"{"id":"ch_7","status":"captured"}"#)
            .run(capture, reserved(1250));
        assert_eq!(run.result, Ok(()));
        assert_eq!(run.http_calls.len(), 1);
        assert_eq!(run.http_calls[0].method, "POST");
        let sent: Value = serde_json::from_slice(&run.http_calls[0].body).unwrap();
        assert_eq!(sent, json!({ "order_id": "o-1", "amount_cents": 1250, "email": "a@example.com" }));
        assert_eq!(run.published.len(), 1);
        assert_eq!(run.published[0].subject, "payments.captured");
        let out: Value = run.published[0].json();
        assert_eq!((out["amount_cents"].as_u64(), out["payment_id"].as_str()), (Some(1250), Some("ch_7")));
        assert_eq!(run.logs[0].message, "order o-1: captured 12.50 (ch_7)");
    }

    #[test]
    fn without_a_provider_the_capture_is_simulated_and_says_so() {
        let run = TestHost::new().run(capture, reserved(1250));
        assert_eq!(run.result, Ok(()));
        assert!(run.http_calls.is_empty());
        assert_eq!(run.published[0].json::<Value>()["payment_id"], "pay-evt-9");
        assert_eq!(run.logs[0].message, "order o-1: no provider_url configured, capture simulated");
    }

    #[test]
    fn a_provider_outage_is_retried_then_settled_as_failed() {
        let mut host = with_provider().with_http(CHARGES, 503, "busy");
        for attempt in [1, 2] {
            let run = host.run(capture, reserved(1250).with_attempt(attempt));
            assert_eq!(run.result, Err(HandlerError::retry("the payment provider answered 503")), "attempt {attempt}");
            assert!(run.published.is_empty(), "attempt {attempt}: a retried attempt publishes nothing");
        }
        let last = host.run(capture, reserved(1250).with_attempt(3));
        assert_eq!(last.result, Ok(()));
        assert_eq!(last.published[0].subject, "payments.failed");
        assert_eq!(last.published[0].json::<Value>()["reason"], "the payment provider answered 503 after 3 attempts");
    }

    #[test]
    fn a_declined_card_fails_the_payment_at_once() {
        let run = with_provider().with_http(CHARGES, 402, r#"{"error":"card_declined"}"#).run(capture, reserved(1250));
        assert_eq!(run.result, Ok(()));
        assert_eq!(run.published[0].subject, "payments.failed");
        let reason = run.published[0].json::<Value>()["reason"].as_str().unwrap().to_string();
        assert!(reason.starts_with("declined by the payment provider (402)"), "{reason}");
    }

    #[test]
    fn a_provider_outside_the_manifest_is_refused_and_the_event_rejected() {
        let run = TestHost::new().with_config("provider_url", "https://evil.example").run(capture, reserved(1250));
        let err = run.result.unwrap_err();
        assert!(!err.is_retry() && err.message().contains("not in the plugin's manifest"), "{err:?}");
        assert!(run.published.is_empty());
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
