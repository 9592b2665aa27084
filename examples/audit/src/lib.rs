//! Counts every pipeline event per subject in kv (`count/<subject>`): wildcard subscriptions.
use plugbus_sdk::{Event, HandlerError, handler, kv, log};

#[handler(subscribe = ["orders.>", "inventory.*", "payments.*", "shipping.*"])]
fn audit(ev: Event) -> Result<(), HandlerError> {
    let key = format!("count/{}", ev.subject());
    let n = kv::get_json::<u64>(&key)?.unwrap_or(0) + 1;
    kv::set_json(&key, &n)?;
    log::debug(format!("{} #{n}: event {}", ev.subject(), ev.id()));
    Ok(())
}
