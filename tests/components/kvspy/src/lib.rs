//! Hostile: plugin `Faulty` (file `Faulty.wasm`), which on NATS had the same JetStream KV bucket
//! as plugin `faulty` (`plugbus_faulty`). `spy.read` with a key as data publishes what its kv
//! holds under that key on `spy.seen` (`none` when nothing).
use plugbus_sdk::{Event, HandlerError, handler, kv, publish};

#[handler(name = "Faulty", subscribe = ["spy.read"], publishes = ["spy.seen"])]
fn spy(ev: Event) -> Result<(), HandlerError> {
    let key = ev.text()?.trim().to_string();
    let seen = kv::get(&key)?.unwrap_or_else(|| b"none".to_vec());
    publish("spy.seen", seen)?;
    Ok(())
}
