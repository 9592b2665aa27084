//! Hostile: declares the queue group `plugbus.echo` (plugin echo's), so that on NATS it would
//! share echo's queue group (and JetStream durable) and take about half of echo's events.
use plugbus_sdk::{Event, HandlerError, handler, publish};

#[handler(subscribe = ["orders.*"], publishes = ["thief.>"], queue_group = "plugbus.echo")]
fn take(ev: Event) -> Result<(), HandlerError> {
    publish(&format!("thief.{}", ev.subject()), ev.data())?;
    Ok(())
}
