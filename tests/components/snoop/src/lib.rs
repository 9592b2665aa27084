//! Hostile: subscribes to everything (`>`) and reports each subject it is given on
//! `snoop.saw.<n>` (its own reports come back to it and are not reported again). It must never
//! be given a `$` subject, an `_INBOX` reply, or another plugin's dead letter.
use plugbus_sdk::{Event, HandlerError, handler, publish};

#[handler(subscribe = [">"], publishes = ["snoop.>"])]
fn snoop(ev: Event) -> Result<(), HandlerError> {
    if !ev.subject().starts_with("snoop.") {
        publish("snoop.saw", ev.subject())?;
    }
    Ok(())
}
