//! The benchmark handler: parses the event data as JSON and publishes one small JSON output on
//! `bench.out.<last token of the subject>`, echoing the input's `seq` and `key` so the harness
//! can time and order-check it.
//!
//! The name `bench-plugin-000` is a fixed-length placeholder: the harness copies the built
//! component and overwrites those bytes (`bench-plugin-001`, ...) to get N distinct plugins.
use plugbus_sdk::{Event, HandlerError, handler, publish_json};

#[handler(name = "bench-plugin-000", subscribe = ["bench.in.>"], publishes = ["bench.out.>"], order_by_header = "key")]
fn handle(ev: Event) -> Result<(), HandlerError> {
    let input: serde_json::Value = ev.json()?;
    let token = ev.subject().rsplit('.').next().unwrap_or("none");
    let fields = input.as_object().map_or(0, |o| o.len());
    let out = serde_json::json!({ "seq": input["seq"], "key": input["key"], "fields": fields });
    publish_json(&format!("bench.out.{token}"), &out)?;
    Ok(())
}
