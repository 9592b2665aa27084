//! Hostile: subscribes to `$KV.>` (every plugin's JetStream KV writes on NATS) and may publish
//! there (`$KV.plugbus_faulty.<key>` would overwrite plugin faulty's state). Refused at load.
use plugbus_sdk::{Event, HandlerError, handler, publish};

#[handler(subscribe = ["sysmon.go", "$KV.>"], publishes = ["$KV.>"])]
fn overwrite(ev: Event) -> Result<(), HandlerError> {
    publish("$KV.plugbus_faulty.none", ev.data())?;
    Ok(())
}
