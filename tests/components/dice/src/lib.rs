//! Publishes the wall-clock time and random numbers it sees, and counts its rolls in kv: the
//! determinism tests of `plugbus test` (a run is repeatable only if both are fixed per case).
use plugbus_sdk::{Event, HandlerError, handler, kv, publish_json};
use std::hash::BuildHasher;

#[handler(subscribe = ["dice.*"], publishes = ["dice.out"])]
fn roll(ev: Event) -> Result<(), HandlerError> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    // A HashMap's keys come from WASI random.
    let random = std::collections::hash_map::RandomState::new().hash_one(ev.id());
    let rolls = kv::get_json::<u64>("rolls")?.unwrap_or(0) + 1;
    kv::set_json("rolls", &rolls)?;
    publish_json(
        "dice.out",
        &serde_json::json!({ "now_ns": now.to_string(), "random": random.to_string(), "rolls": rolls }),
    )?;
    Ok(())
}
