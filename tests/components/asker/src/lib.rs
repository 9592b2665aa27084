//! The requesting side of request/reply. An event on `ask.one` carries
//! `{"subject", "data", "timeout_ms"}`: one request, its outcome published to `asked.one` as
//! `{"ok": data, "source", "subject", "content_type", "answered_by"}` or `{"err": kind, "message"}`. `ask.flood`
//! requests on `data` until refused, publishing how many went out and the refusal. A request on
//! `ask.back` (another plugin asking back, in a chain of requests that started here) is answered
//! `back from asker`.
use plugbus_sdk::{Event, HandlerError, RequestError, handler, publish_json, reply, request};
use serde_json::{Value, json};
use std::time::Duration;

fn outcome(r: Result<Event, RequestError>) -> Value {
    match r {
        Ok(reply) => json!({
            "ok": String::from_utf8_lossy(reply.data()),
            "source": reply.source(),
            "subject": reply.subject(),
            "content_type": reply.content_type(),
            "answered_by": reply.header("answered-by"),
            "reply_to": reply.reply_to(),
        }),
        Err(e) => {
            let kind = match &e {
                RequestError::Denied(_) => "denied",
                RequestError::Limit(_) => "limit",
                RequestError::Invalid(_) => "invalid",
                RequestError::Timeout(_) => "timeout",
                RequestError::NoResponders(_) => "no-responders",
                RequestError::Unavailable(_) => "unavailable",
            };
            json!({ "err": kind, "message": e.message() })
        }
    }
}

#[handler(subscribe = ["ask.*"], publishes = ["rpc.>", "nobody.>", "asked.>"])]
fn asker(ev: Event) -> Result<(), HandlerError> {
    if ev.subject() == "ask.back" {
        return Ok(reply(&ev, "back from asker")?);
    }
    let cmd: Value = ev.json()?;
    let subject = cmd["subject"].as_str().unwrap_or_default();
    let data = cmd["data"].as_str().unwrap_or_default();
    let timeout = Duration::from_millis(cmd["timeout_ms"].as_u64().unwrap_or(2000));
    match ev.subject() {
        "ask.flood" => {
            let mut sent = 0u64;
            let refused = loop {
                match request(subject, data, timeout) {
                    Ok(_) | Err(RequestError::NoResponders(_)) | Err(RequestError::Timeout(_)) => sent += 1,
                    Err(e) => break outcome(Err(e)),
                }
                if sent >= 1_000_000 {
                    break json!(null);
                }
            };
            publish_json("asked.flood", &json!({ "sent": sent, "refused": refused }))?;
        }
        _ => publish_json("asked.one", &outcome(request(subject, data, timeout)))?,
    }
    Ok(())
}
