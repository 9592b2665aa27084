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

#[cfg(test)]
mod tests {
    use super::notify;
    use plugbus_sdk::{Event, testing::TestHost};
    use serde_json::json;

    #[test]
    fn logs_the_mail_for_a_rejected_order_from_the_configured_sender() {
        let rejected =
            json!({ "order": { "order_id": "o-1", "email": "a@example.com" }, "reason": "only 0 x widget in stock" });
        let run = TestHost::new()
            .with_config("sender", "ops@example.com")
            .run(notify, Event::new_json("inventory.rejected", &rejected));
        assert_eq!(run.result, Ok(()));
        assert!(run.published.is_empty());
        assert_eq!(
            run.logs[0].message,
            "e-mail from ops@example.com to a@example.com: sorry, we could not take order o-1: only 0 x widget in stock"
        );
    }
}
