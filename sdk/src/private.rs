//! What the `#[handler]` attribute expands to; not a public API.

pub use crate::__bindings::exports::plugbus::handler::handler::Guest;
pub use crate::__bindings::exports::plugbus::handler::outbound::Guest as OutboundGuest;
pub use crate::__bindings::plugbus::handler::types::{
    DeliverPolicy, Event as WitEvent, HandlerError as WitHandlerError, OrderKey, PluginManifest as Manifest,
    Subscription,
};

/// Runs the user's function on a WIT event.
pub fn run(event: WitEvent, f: fn(crate::Event) -> Result<(), crate::HandlerError>) -> Result<(), WitHandlerError> {
    f(crate::Event::__from_wit(event)).map_err(crate::HandlerError::__into_wit)
}

/// What a `#[handler]` function says about itself when called natively: the parts of its
/// manifest the test host enforces.
#[derive(Debug, Clone, Copy)]
pub struct Declared {
    /// `name = ".."`, or the crate name.
    pub name: &'static str,
    /// `version = ".."`, or the crate version.
    pub version: &'static str,
    /// `subscribe = [..]`.
    pub subscribe: &'static [&'static str],
    /// `publishes = [..]`.
    pub publishes: &'static [&'static str],
    /// `outbound = [..]`.
    pub outbound: &'static [&'static str],
}

/// Called first thing by a `#[handler]` function on the native target: tells a running
/// `TestHost` which allow-list and subscriptions apply (the outermost handler wins). Does
/// nothing outside `TestHost::run`.
#[cfg(not(target_arch = "wasm32"))]
pub fn declare(declared: Declared) {
    crate::testing::declare(declared);
}
