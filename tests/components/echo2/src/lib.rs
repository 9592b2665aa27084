//! Version 2 of the `echo` plugin (same plugin name, other file): copies every event to
//! `echo.v2.<subject>`, so the reload tests can see which version handled an event.
use plugbus_sdk::{Event, HandlerError, handler, publish};

#[handler(name = "echo", version = "2.0.0", subscribe = ["faulty.*", "orders.*"], publishes = ["echo.>"])]
fn echo(ev: Event) -> Result<(), HandlerError> {
    publish(&format!("echo.v2.{}", ev.subject()), ev.data())?;
    Ok(())
}
