//! Publishes what it saw of every `ce.>` event on `attrs.out`: the CloudEvents attributes, the
//! headers, the data and the attempt, so tests can check what a transport hands a handler.
use plugbus_sdk::{Event, HandlerError, handler, publish_json};
use std::collections::BTreeMap;

#[handler(subscribe = ["ce.>"], publishes = ["attrs.out"])]
fn attrs(ev: Event) -> Result<(), HandlerError> {
    let headers: BTreeMap<&str, &str> = ev.headers().collect();
    publish_json(
        "attrs.out",
        &serde_json::json!({
            "id": ev.id(),
            "subject": ev.subject(),
            "source": ev.source(),
            "type": ev.event_type(),
            "time": ev.time(),
            "datacontenttype": ev.content_type(),
            "headers": headers,
            "data": String::from_utf8_lossy(ev.data()),
            "attempt": ev.attempt(),
        }),
    )?;
    Ok(())
}
