//! Copies every event it sees to `echo.<subject>`, at once: the fast neighbour in the
//! isolation tests.
use plugbus_sdk::{Event, HandlerError, handler, publish};

#[handler(subscribe = ["faulty.*", "orders.*"], publishes = ["echo.>"])]
fn echo(ev: Event) -> Result<(), HandlerError> {
    publish(&format!("echo.{}", ev.subject()), ev.data())?;
    Ok(())
}
