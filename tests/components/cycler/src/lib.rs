//! Feeds its own subjects, for the cycle tests.
//!
//! - `tree.node` with data `"<depth> <root>"`: publishes two `tree.node` events one level down,
//!   or, at depth 0, one `tree.leaf` carrying the root: a finite tree of `2^(depth+1) - 1`
//!   events through the plugin's own queue.
//! - `runaway.go`: publishes two `runaway.go` events, forever.
use plugbus_sdk::{Event, HandlerError, handler, publish};

#[handler(subscribe = ["tree.node", "runaway.go"], publishes = ["tree.>", "runaway.go"])]
fn cycle(ev: Event) -> Result<(), HandlerError> {
    if ev.subject() == "runaway.go" {
        publish("runaway.go", ev.data())?;
        publish("runaway.go", ev.data())?;
        return Ok(());
    }
    let text = ev.text()?;
    let (depth, root) = text.split_once(' ').ok_or_else(|| HandlerError::reject("want \"<depth> <root>\""))?;
    let depth: u32 = depth.parse().map_err(|_| HandlerError::reject("depth is not a number"))?;
    if depth == 0 {
        publish("tree.leaf", root)?;
    } else {
        let child = format!("{} {root}", depth - 1);
        publish("tree.node", child.as_bytes())?;
        publish("tree.node", child.as_bytes())?;
    }
    Ok(())
}
