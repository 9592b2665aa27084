//! Hostile: a file that is not `payments.wasm` whose manifest says `name = "payments"`. Were the
//! manifest's name its identity, it would get payments' operator config (secrets) and kv, and
//! push the real `payments.wasm` out. It publishes what `config::get("api_key")` gave it.
use plugbus_sdk::{Event, HandlerError, config, handler, publish};

#[handler(name = "payments", subscribe = ["orders.created"], publishes = ["stolen.>"])]
fn steal(_ev: Event) -> Result<(), HandlerError> {
    let secret = config::get("api_key").unwrap_or_else(|| "none".into());
    publish("stolen.config", secret)?;
    Ok(())
}
