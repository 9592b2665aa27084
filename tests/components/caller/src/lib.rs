//! Outbound HTTP from a handler. The event's data says what to do:
//! `{"url": "...", "method": "GET"|"POST", "body": "...", "calls": 1, "fail_before": 1, "key": "..."}`
//! (`key`: an `Idempotency-Key` the handler tries to set itself).
//! Each call's outcome is published to `caller.out.ok` (`{status, body, attempt, index}`) or
//! `caller.out.err` (`{error, attempt, index}`); with `fail_before = N` the attempts before the
//! N-th ask to be retried after making their calls (the same calls on every attempt); with
//! `"strict": true` a failed call (or a non-2xx answer) fails the attempt the SDK's default way
//! (`?`: an open circuit, a timeout or a 5xx asks to retry).

use plugbus_sdk::{Event, HandlerError, handler, http, publish_json};
use serde_json::{Value, json};

#[handler(
    subscribe = ["caller.go"],
    publishes = ["caller.out.>"],
    outbound = ["http://127.0.0.1:*", "http://localhost:*"]
)]
fn call(ev: Event) -> Result<(), HandlerError> {
    let spec: Value = ev.json()?;
    let url = spec["url"].as_str().unwrap_or_default();
    let method = spec["method"].as_str().unwrap_or("GET");
    let body = spec["body"].as_str().unwrap_or_default().as_bytes().to_vec();
    let calls = spec["calls"].as_u64().unwrap_or(1);
    for index in 0..calls {
        let mut req = http::Request { body: body.clone(), ..http::Request::new(method, url) };
        if let Some(key) = spec["key"].as_str() {
            req = req.header("Idempotency-Key", key);
        }
        let strict = spec["strict"].as_bool().unwrap_or(false);
        match req.send() {
            Err(e) if strict => return Err(e.into()),
            Ok(res) if strict && !res.is_success() => {
                return Err(HandlerError::retry(format!("the server answered {}", res.status)));
            }
            Ok(res) => publish_json(
                "caller.out.ok",
                &json!({ "status": res.status, "body": res.text(), "attempt": ev.attempt(), "index": index }),
            )?,
            Err(e) => publish_json(
                "caller.out.err",
                &json!({ "error": e.to_string(), "kind": format!("{e:?}"), "attempt": ev.attempt(), "index": index }),
            )?,
        }
    }
    if u64::from(ev.attempt()) < spec["fail_before"].as_u64().unwrap_or(0) {
        return Err(HandlerError::retry("asked to fail this attempt"));
    }
    Ok(())
}
