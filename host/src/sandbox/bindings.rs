//! Host-side bindings generated from `wit/plugbus.wit` (the one contract).

wasmtime::component::bindgen!({
    world: "plugin",
    path: "../wit",
    exports: { default: async },
});

pub use exports::plugbus::handler::handler::Guest;
pub use plugbus::handler::types;
