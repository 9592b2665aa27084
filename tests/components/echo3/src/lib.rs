//! Version 3 of the `echo` plugin (same plugin name, other file) that names its own queue group,
//! `plugbus.echo.v3` (a manifest may split its own plugin's work): copies every event to
//! `echo.v3.<subject>`. On JetStream a hot swap to it would move the plugin's durable consumer,
//! and is refused (review 62d F3).
use plugbus_sdk::{Event, HandlerError, handler, publish};

#[handler(
    name = "echo",
    version = "3.0.0",
    subscribe = ["faulty.*", "orders.*"],
    publishes = ["echo.>"],
    queue_group = "plugbus.echo.v3"
)]
fn echo(ev: Event) -> Result<(), HandlerError> {
    publish(&format!("echo.v3.{}", ev.subject()), ev.data())?;
    Ok(())
}
