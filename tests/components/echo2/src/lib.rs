//! Version 2 of the `echo` plugin (same plugin name, other file): copies every event to
//! `echo.v2.<subject>`, so the reload tests can see which version handled an event. Unlike
//! version 1 it orders by the header `key` (an event without one runs unordered), and an event
//! with a header `busyms` keeps the handler busy that long first: a hot swap that adds
//! `order_by` is seen in which output comes first.
use plugbus_sdk::{Event, HandlerError, handler, publish};
use std::hint::black_box;

#[handler(
    name = "echo",
    version = "2.0.0",
    subscribe = ["faulty.*", "orders.*"],
    publishes = ["echo.>"],
    order_by_header = "key"
)]
fn echo(ev: Event) -> Result<(), HandlerError> {
    let busy_ms: u64 = ev.header("busyms").and_then(|ms| ms.parse().ok()).unwrap_or(0);
    let start = std::time::SystemTime::now();
    while start.elapsed().map(|d| d.as_millis() as u64).unwrap_or(0) < busy_ms {
        black_box(0);
    }
    publish(&format!("echo.v2.{}", ev.subject()), ev.data())?;
    Ok(())
}
