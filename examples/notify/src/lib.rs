//! Tells the customer: shipped orders and orders rejected for lack of stock.
//!
//! With the operator's config `mail_api_url` (e.g. `"http://127.0.0.1:7072"`, the demo's stub
//! mail API; granted with `[plugins.notify] allowed_outbound`) the e-mail is handed to the mail
//! API's `POST {mail_api_url}/v1/messages`, with the host's `Idempotency-Key` so a retried event
//! does not send it twice. Without `mail_api_url` it is only logged (what the pipeline tests
//! run). A mail API that is down asks for a retry; one that refuses the message (4xx) rejects
//! the event (dead letter, with the API's answer).
use plugbus_sdk::{Event, HandlerError, config, handler, http, log};
use serde_json::Value;

#[handler(
    subscribe = ["shipping.started", "inventory.rejected"],
    outbound = ["http://127.0.0.1:*", "https://mail.example"]
)]
fn notify(ev: Event) -> Result<(), HandlerError> {
    let body: Value = ev.json()?;
    let sender = config::get("sender").unwrap_or_else(|| "shop@example.com".into());
    let (to, subject, text) = match ev.subject() {
        "shipping.started" => (
            body["email"].as_str().unwrap_or("?"),
            "Your order is on its way",
            format!(
                "your order {} is on its way (tracking {})",
                body["order_id"].as_str().unwrap_or("?"),
                body["tracking"].as_str().unwrap_or("?"),
            ),
        ),
        _ => (
            body["order"]["email"].as_str().unwrap_or("?"),
            "We could not take your order",
            format!(
                "sorry, we could not take order {}: {}",
                body["order"]["order_id"].as_str().unwrap_or("?"),
                body["reason"].as_str().unwrap_or("?"),
            ),
        ),
    };
    let Some(api) = config::get("mail_api_url") else {
        log::info(format!("e-mail from {sender} to {to}: {text}"));
        return Ok(());
    };
    let message = serde_json::json!({ "from": sender, "to": to, "subject": subject, "text": text });
    let res = http::post_json(&format!("{}/v1/messages", api.trim_end_matches('/')), &message)?;
    match res.status {
        200..=299 => {
            let id = res.json::<Value>().ok().and_then(|v| v["id"].as_str().map(str::to_owned));
            log::info(format!("e-mail from {sender} to {to}: {text} (sent, {})", id.as_deref().unwrap_or("no id")));
            Ok(())
        }
        400..=499 => {
            Err(HandlerError::reject(format!("the mail API refused the message ({}): {}", res.status, res.text())))
        }
        s => Err(HandlerError::retry(format!("the mail API answered {s}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::notify;
    use plugbus_sdk::{Event, HandlerError, testing::TestHost};
    use serde_json::{Value, json};

    const MESSAGES: &str = "http://127.0.0.1:7072/v1/messages";

    fn rejected() -> Event {
        let rejected =
            json!({ "order": { "order_id": "o-1", "email": "a@example.com" }, "reason": "only 0 x widget in stock" });
        Event::new_json("inventory.rejected", &rejected)
    }

    #[test]
    fn logs_the_mail_for_a_rejected_order_from_the_configured_sender() {
        let run = TestHost::new().with_config("sender", "ops@example.com").run(notify, rejected());
        assert_eq!(run.result, Ok(()));
        assert!(run.published.is_empty() && run.http_calls.is_empty());
        assert_eq!(
            run.logs[0].message,
            "e-mail from ops@example.com to a@example.com: sorry, we could not take order o-1: only 0 x widget in stock"
        );
    }

    #[test]
    fn hands_the_mail_to_the_mail_api() {
        let shipped = json!({ "order_id": "o-2", "email": "b@example.com", "tracking": "TRK-O-2" });
        let run = TestHost::new()
            .with_config("mail_api_url", "http://127.0.0.1:7072/")
            .with_http(MESSAGES, 202, r#"{"id":"msg_3"}"#)
            .run(notify, Event::new_json("shipping.started", &shipped));
        assert_eq!(run.result, Ok(()));
        assert_eq!(run.http_calls[0].url, MESSAGES);
        let sent: Value = serde_json::from_slice(&run.http_calls[0].body).unwrap();
        assert_eq!(sent["to"], "b@example.com");
        assert_eq!(sent["subject"], "Your order is on its way");
        assert_eq!(sent["text"], "your order o-2 is on its way (tracking TRK-O-2)");
        assert!(run.logs[0].message.ends_with("(sent, msg_3)"), "{:?}", run.logs);
    }

    #[test]
    fn a_mail_api_that_is_down_is_retried_and_one_that_refuses_is_rejected() {
        let host = || TestHost::new().with_config("mail_api_url", "http://127.0.0.1:7072");
        let down = host().with_http(MESSAGES, 503, "").run(notify, rejected());
        assert_eq!(down.result, Err(HandlerError::retry("the mail API answered 503")));
        let refused = host().with_http(MESSAGES, 422, "bad address").run(notify, rejected());
        assert_eq!(refused.result, Err(HandlerError::reject("the mail API refused the message (422): bad address")));
    }
}
