//! Rejects what its kv and config say it cannot take: the dead letter's record shows the kv
//! value and the config value it read, and `plugbus dlq debug` runs it again on them.
use plugbus_sdk::{Event, HandlerError, config, handler, kv, log, publish_json};

/// What it does with an order it cannot fill: the tests patch this placeholder (same length)
/// to `policy=backord` to make a fixed candidate of the same plugin.
static POLICY: [u8; 14] = *b"policy=reject!";

#[handler(name = "picky", subscribe = ["picky.*"], publishes = ["picky.out"])]
fn check(ev: Event) -> Result<(), HandlerError> {
    println!("picky: checking {}", ev.id());
    if ev.subject() == "picky.big" {
        for i in 0..5 {
            kv::get(&format!("big{i}"))?;
        }
        return Err(HandlerError::reject("read five big values"));
    }
    let want: u64 = ev.text()?.trim().parse().map_err(|_| HandlerError::reject("not a number"))?;
    let limit: u64 = config::get("limit").and_then(|v| v.parse().ok()).unwrap_or(10);
    let stock = kv::get_json::<u64>("stock")?.unwrap_or(0);
    if want > stock.min(limit) {
        log::warn(format!("want {want}, stock {stock}, limit {limit}"));
        // Read from memory at run time, so a patched component behaves as patched.
        let policy = unsafe { core::ptr::read_volatile(&POLICY) };
        if policy.ends_with(b"reject!") {
            return Err(HandlerError::reject(format!("want {want}, only {} allowed", stock.min(limit))));
        }
        publish_json("picky.out", &serde_json::json!({ "backorder": want, "stock": stock }))?;
        return Ok(());
    }
    kv::set_json("stock", &(stock - want))?;
    publish_json("picky.out", &serde_json::json!({ "want": want, "left": stock - want }))?;
    Ok(())
}
