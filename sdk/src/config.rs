//! Values the operator sets for this plugin (`[plugins.<name>.config]` in the host's config).
//!
//! In a test, [`TestHost::with_config`](crate::testing::TestHost::with_config) sets them.
//!
//! ```
//! use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
//!
//! #[handler(subscribe = ["orders.created"])]
//! fn greet(_ev: Event) -> Result<(), HandlerError> {
//!     let sender = plugbus_sdk::config::get("sender").unwrap_or_else(|| "shop@example.com".into());
//!     plugbus_sdk::log::info(format!("mail from {sender}"));
//!     Ok(())
//! }
//!
//! let run = TestHost::new().with_config("sender", "ops@example.com").run(greet, Event::new("orders.created", ""));
//! assert_eq!(run.logs[0].message, "mail from ops@example.com");
//! ```

/// The operator's value for `key`, if set.
///
/// ```
/// use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
///
/// #[handler(subscribe = ["orders.created"])]
/// fn limited(_ev: Event) -> Result<(), HandlerError> {
///     let limit: u32 = plugbus_sdk::config::get("limit").and_then(|v| v.parse().ok()).unwrap_or(10);
///     if limit == 0 {
///         return Err(HandlerError::reject("orders are switched off"));
///     }
///     Ok(())
/// }
///
/// assert!(TestHost::new().run(limited, Event::new("orders.created", "")).result.is_ok());
/// assert!(TestHost::new().with_config("limit", "0").run(limited, Event::new("orders.created", "")).result.is_err());
/// ```
pub fn get(key: &str) -> Option<String> {
    crate::host::config_get(key)
}
