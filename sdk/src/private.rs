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
    /// `queue_group = ".."`.
    pub queue_group: Option<&'static str>,
    /// `order_by_header = ".."`.
    pub order_by_header: Option<&'static str>,
}

/// Called first thing by a `#[handler]` function on the native target: tells a running
/// `TestHost` which allow-list and subscriptions apply (the outermost handler wins). Does
/// nothing outside `TestHost::run`.
#[cfg(not(target_arch = "wasm32"))]
pub fn declare(declared: Declared) {
    crate::testing::declare(declared);
}

/// The version of the WIT contract this SDK speaks: `package plugbus:handler@…` in
/// `wit/plugbus.wit` (a test keeps the two equal).
pub const CONTRACT_VERSION: &str = "0.1.1";

/// What every component built with this SDK carries in its `plugbus-contract` custom section:
/// the contract it was built against and the SDK that built it, one line. The host reads it at
/// load and refuses a component whose contract it does not speak, naming both versions.
pub const CONTRACT_SECTION_TEXT: &str = concat!("plugbus:handler@0.1.1 plugbus-sdk@", env!("CARGO_PKG_VERSION"), "\n");

/// [`CONTRACT_SECTION_TEXT`] as the byte array the `#[handler]` attribute places in the section.
pub const CONTRACT_SECTION: [u8; CONTRACT_SECTION_TEXT.len()] = {
    let text = CONTRACT_SECTION_TEXT.as_bytes();
    let mut out = [0u8; CONTRACT_SECTION_TEXT.len()];
    let mut i = 0;
    while i < text.len() {
        out[i] = text[i];
        i += 1;
    }
    out
};

#[cfg(test)]
mod contract_tests {
    #[test]
    fn the_contract_version_is_the_wit_package_version() {
        let wit = include_str!("../wit/plugbus.wit");
        let declared = format!("package plugbus:handler@{};", super::CONTRACT_VERSION);
        assert!(wit.lines().any(|l| l.trim() == declared), "wit/plugbus.wit does not say {declared:?}");
        assert!(super::CONTRACT_SECTION_TEXT.starts_with(&format!("plugbus:handler@{} ", super::CONTRACT_VERSION)));
    }
}
