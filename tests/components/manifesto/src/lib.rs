//! A valid plugin whose manifest the tests rewrite. The SDK would let no one ship a manifest
//! that publishes to `$JS.>`, so the tests take this component and replace one of the
//! placeholder strings below (each exactly as long as the bad value that replaces it, and found
//! once in the binary) with the bad value: a component declaring it, loaded by the real host.
//!
//! | placeholder | becomes    | field                      |
//! |-------------|------------|----------------------------|
//! | `Zj.JS`     | `$JS.>`    | `publishes[1]`             |
//! | `Zsys.X`    | `$SYS.>`   | `publishes[2]`             |
//! | `Zinbox.X`  | `_INBOX.>` | `publishes[3]`             |
//! | `Zsub.pat`  | `bad..pat` | `subscriptions[1].pattern` |
use plugbus_sdk::{Event, HandlerError, handler, publish};

#[handler(subscribe = ["manifesto.in", "Zsub.pat"], publishes = ["manifesto.out", "Zj.JS", "Zsys.X", "Zinbox.X"])]
fn manifesto(ev: Event) -> Result<(), HandlerError> {
    publish("manifesto.out", ev.data())?;
    Ok(())
}
