//! Host-side bindings generated from `wit/plugbus.wit` (the one contract).

wasmtime::component::bindgen!({
    world: "plugin",
    path: "../wit",
    exports: { default: async },
    // kv reads may go over the network (JetStream KV); everything else answers from memory.
    // A request waits for its reply: the guest is suspended meanwhile, the worker runs others.
    imports: { "plugbus:handler/kv.get": async, "plugbus:handler/rpc.request": async },
    // The event goes into the guest from borrowed fields: no String or 1 KiB Vec copied per
    // attempt just to be copied again into guest memory.
    ownership: Borrowing { duplicate_if_necessary: true },
});

pub use self::exports::plugbus::handler::handler::Guest;
pub use self::plugbus::handler::types;
