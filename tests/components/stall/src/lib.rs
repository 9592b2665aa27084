//! A hostile plugin that never finishes loading: its `manifest()` sleeps for an hour. On
//! `wasm32-wasip2`, `std::thread::sleep` subscribes to a monotonic-clock timer and waits in
//! `wasi:io/poll.poll`, a host call: the guest runs no code meanwhile, so the epoch deadline that
//! stops a looping guest never fires. Written against the bindings directly (the `#[handler]`
//! attribute builds a manifest that returns at once).
#![cfg(target_arch = "wasm32")]

use plugbus_sdk::__private as p;

#[unsafe(link_section = "plugbus-contract")]
#[used]
static CONTRACT: [u8; p::CONTRACT_SECTION.len()] = p::CONTRACT_SECTION;

struct Stall;

impl p::Guest for Stall {
    fn manifest() -> p::Manifest {
        std::thread::sleep(std::time::Duration::from_secs(3600));
        p::Manifest { name: "stall".into(), version: "0.1.0".into(), subscriptions: Vec::new(), publishes: Vec::new() }
    }

    fn handle(_: p::WitEvent) -> Result<(), p::WitHandlerError> {
        Ok(())
    }
}

impl p::OutboundGuest for Stall {
    fn requested() -> Vec<String> {
        Vec::new()
    }
}

plugbus_sdk::__bindings::__export_plugin!(Stall);
