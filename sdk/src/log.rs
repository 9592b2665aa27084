//! Logging into the host's log, tagged with this plugin and the current event.
//!
//! The host keeps at most 64 KiB of log text per event (its `max_log_bytes` default); later
//! lines are dropped. In a test the lines land in [`Run::logs`](crate::testing::Run::logs).
//!
//! ```
//! use plugbus_sdk::{Event, HandlerError, handler, log, testing::TestHost};
//!
//! #[handler(subscribe = ["stock.changed"])]
//! fn watch(_ev: Event) -> Result<(), HandlerError> {
//!     log::info("reserved 3 x sku-1");
//!     log::warn(format!("stock low: {}", 2));
//!     Ok(())
//! }
//!
//! let run = TestHost::new().run(watch, Event::new("stock.changed", ""));
//! assert_eq!(run.logs[1].level, log::Level::Warn);
//! assert_eq!(run.logs[1].message, "stock low: 2");
//! ```

use std::fmt;

/// How severe a log line is.
///
/// ```
/// assert!(plugbus_sdk::log::Level::Warn > plugbus_sdk::log::Level::Info);
/// assert_eq!(plugbus_sdk::log::Level::Error.to_string(), "ERROR");
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Very detailed tracing.
    Trace,
    /// Details for debugging.
    Debug,
    /// Normal operation.
    Info,
    /// Something looks wrong, the handler carries on.
    Warn,
    /// Something failed.
    Error,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Trace => "TRACE",
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        })
    }
}

/// Logs at `level`.
///
/// ```
/// # plugbus_sdk::testing::TestHost::new().run(|_| {
/// plugbus_sdk::log::log(plugbus_sdk::log::Level::Info, "order accepted");
/// # Ok(()) }, plugbus_sdk::Event::new("a", ""));
/// ```
pub fn log(level: Level, msg: impl AsRef<str>) {
    crate::host::log(level, msg.as_ref())
}

/// Logs at trace level.
///
/// ```
/// # plugbus_sdk::testing::TestHost::new().run(|_| {
/// plugbus_sdk::log::trace("entered the pricing rules");
/// # Ok(()) }, plugbus_sdk::Event::new("a", ""));
/// ```
pub fn trace(msg: impl AsRef<str>) {
    log(Level::Trace, msg)
}

/// Logs at debug level.
///
/// ```
/// # plugbus_sdk::testing::TestHost::new().run(|_| {
/// plugbus_sdk::log::debug("details");
/// # Ok(()) }, plugbus_sdk::Event::new("a", ""));
/// ```
pub fn debug(msg: impl AsRef<str>) {
    log(Level::Debug, msg)
}

/// Logs at info level.
///
/// ```
/// # plugbus_sdk::testing::TestHost::new().run(|_| {
/// plugbus_sdk::log::info("order accepted");
/// # Ok(()) }, plugbus_sdk::Event::new("a", ""));
/// ```
pub fn info(msg: impl AsRef<str>) {
    log(Level::Info, msg)
}

/// Logs at warn level.
///
/// ```
/// # plugbus_sdk::testing::TestHost::new().run(|_| {
/// plugbus_sdk::log::warn("stock low");
/// # Ok(()) }, plugbus_sdk::Event::new("a", ""));
/// ```
pub fn warn(msg: impl AsRef<str>) {
    log(Level::Warn, msg)
}

/// Logs at error level.
///
/// ```
/// # plugbus_sdk::testing::TestHost::new().run(|_| {
/// plugbus_sdk::log::error("gateway refused the card");
/// # Ok(()) }, plugbus_sdk::Event::new("a", ""));
/// ```
pub fn error(msg: impl AsRef<str>) {
    log(Level::Error, msg)
}
