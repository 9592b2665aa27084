//! # plugbus-sdk: event handlers in plain Rust
//!
//! A plugbus handler is one Rust function. The [`handler`] attribute turns it into a
//! WebAssembly component that the `plugbus` host loads from its plugins folder: it writes the
//! manifest (name, version, subscriptions, allowed publish subjects) and the glue to the WIT
//! contract, so you never touch `wit-bindgen` yourself.
//!
//! ```no_run
//! use plugbus_sdk::{handler, Event, HandlerError};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Order { id: String, sku: String, qty: u32 }
//!
//! #[handler(subscribe = ["orders.created"], publishes = ["inventory.>"])]
//! fn on_order(ev: Event) -> Result<(), HandlerError> {
//!     let order: Order = ev.json()?; // malformed JSON rejects the event (dead letter)
//!     plugbus_sdk::log::info(format!("order {} wants {} x {}", order.id, order.qty, order.sku));
//!     plugbus_sdk::publish_json("inventory.reserved", &serde_json::json!({ "order": order.id }))?;
//!     Ok(())
//! }
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` (the crate is a `cdylib`) and
//! copy `target/wasm32-wasip2/release/<name>.wasm` into the host's `plugins/` folder.
//!
//! ## What the host guarantees
//! - Each delivery runs in a fresh instance: keep state in [`kv`], not in statics.
//! - What you [`publish`] is buffered and released only when the handler returns `Ok`, so a
//!   failed attempt publishes nothing and a retry does not duplicate outputs.
//! - [`HandlerError::retry`] asks for another attempt later (with backoff);
//!   [`HandlerError::reject`] sends the event to the dead-letter subject at once.
//!   A panic counts as a failed attempt, like `retry`.

extern crate self as plugbus_sdk;

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;

pub use plugbus_sdk_macro::handler;

#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        world: "plugin",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "plugbus_sdk::__bindings",
        runtime_path: "plugbus_sdk::__bindings::__wit_bindgen::rt",
    });
    pub use wit_bindgen as __wit_bindgen;
}

use __bindings::plugbus::handler::types as wit;

/// One event as the handler sees it: a CloudEvents 1.0 record plus delivery information.
///
/// ```no_run
/// # use plugbus_sdk::{Event, HandlerError};
/// fn describe(ev: &Event) -> Result<String, HandlerError> {
///     Ok(format!("{} on {} (attempt {}): {}", ev.id(), ev.subject(), ev.attempt(), ev.text()?))
/// }
/// ```
#[derive(Debug, Clone)]
pub struct Event {
    inner: wit::Event,
}

impl Event {
    #[doc(hidden)]
    pub fn __from_wit(inner: wit::Event) -> Self {
        Self { inner }
    }

    /// Builds an event by hand, for unit tests of handler logic.
    ///
    /// ```
    /// let ev = plugbus_sdk::Event::new("orders.created", br#"{"id":"o-1"}"#.to_vec());
    /// assert_eq!(ev.subject(), "orders.created");
    /// assert_eq!(ev.attempt(), 1);
    /// ```
    pub fn new(subject: impl Into<String>, data: Vec<u8>) -> Self {
        let subject = subject.into();
        Self {
            inner: wit::Event {
                id: "test-event".into(),
                source: "plugbus-sdk/test".into(),
                type_: subject.clone(),
                subject,
                time: "1970-01-01T00:00:00Z".into(),
                datacontenttype: None,
                extensions: Vec::new(),
                data,
                attempt: 1,
                reply_to: None,
            },
        }
    }

    /// Adds a header (extension attribute) to a hand-built event; names are lower-cased.
    ///
    /// ```
    /// let ev = plugbus_sdk::Event::new("orders.created", vec![]).with_header("Tenant", "acme");
    /// assert_eq!(ev.header("tenant"), Some("acme"));
    /// ```
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.inner.extensions.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// The event's unique id (CloudEvents `id`).
    ///
    /// ```
    /// # let ev = plugbus_sdk::Event::new("a", vec![]);
    /// assert!(!ev.id().is_empty());
    /// ```
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The subject (topic) the event arrived on.
    ///
    /// ```
    /// # let ev = plugbus_sdk::Event::new("orders.created", vec![]);
    /// assert_eq!(ev.subject(), "orders.created");
    /// ```
    pub fn subject(&self) -> &str {
        &self.inner.subject
    }

    /// Who produced the event (CloudEvents `source`).
    ///
    /// ```
    /// # let ev = plugbus_sdk::Event::new("a", vec![]);
    /// let _producer: &str = ev.source();
    /// ```
    pub fn source(&self) -> &str {
        &self.inner.source
    }

    /// The event type (CloudEvents `type`); the subject when the producer set none.
    ///
    /// ```
    /// # let ev = plugbus_sdk::Event::new("orders.created", vec![]);
    /// assert_eq!(ev.event_type(), "orders.created");
    /// ```
    pub fn event_type(&self) -> &str {
        &self.inner.type_
    }

    /// When the event happened (CloudEvents `time`, RFC 3339).
    ///
    /// ```
    /// # let ev = plugbus_sdk::Event::new("a", vec![]);
    /// assert!(ev.time().ends_with('Z'));
    /// ```
    pub fn time(&self) -> &str {
        &self.inner.time
    }

    /// The media type of [`Event::data`] (CloudEvents `datacontenttype`), when known.
    ///
    /// ```
    /// # let ev = plugbus_sdk::Event::new("a", vec![]);
    /// assert_eq!(ev.content_type(), None);
    /// ```
    pub fn content_type(&self) -> Option<&str> {
        self.inner.datacontenttype.as_deref()
    }

    /// The payload bytes.
    ///
    /// ```
    /// # let ev = plugbus_sdk::Event::new("a", b"hi".to_vec());
    /// assert_eq!(ev.data(), b"hi");
    /// ```
    pub fn data(&self) -> &[u8] {
        &self.inner.data
    }

    /// The payload as UTF-8 text; invalid UTF-8 rejects the event.
    ///
    /// ```
    /// # let ev = plugbus_sdk::Event::new("a", b"hello".to_vec());
    /// assert_eq!(ev.text().unwrap(), "hello");
    /// ```
    pub fn text(&self) -> Result<&str, HandlerError> {
        std::str::from_utf8(&self.inner.data).map_err(|e| HandlerError::reject(format!("event data is not UTF-8: {e}")))
    }

    /// The payload parsed as JSON into `T`; malformed JSON rejects the event (a poison event
    /// never gets better by retrying).
    ///
    /// ```
    /// #[derive(serde::Deserialize)]
    /// struct Order { id: String }
    /// let ev = plugbus_sdk::Event::new("orders.created", br#"{"id":"o-1"}"#.to_vec());
    /// let order: Order = ev.json().unwrap();
    /// assert_eq!(order.id, "o-1");
    /// ```
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.inner.data)
            .map_err(|e| HandlerError::reject(format!("event data is not the expected JSON: {e}")))
    }

    /// A header (CloudEvents extension attribute or transport header), by case-insensitive name.
    ///
    /// ```
    /// # let ev = plugbus_sdk::Event::new("a", vec![]).with_header("tenant", "acme");
    /// assert_eq!(ev.header("Tenant"), Some("acme"));
    /// ```
    pub fn header(&self, name: &str) -> Option<&str> {
        self.inner.extensions.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Every header, in arrival order.
    ///
    /// ```
    /// # let ev = plugbus_sdk::Event::new("a", vec![]).with_header("tenant", "acme");
    /// assert_eq!(ev.headers().count(), 1);
    /// ```
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.inner.extensions.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// 1 on the first delivery, 2 on the first retry, and so on.
    ///
    /// ```
    /// # let ev = plugbus_sdk::Event::new("a", vec![]);
    /// assert_eq!(ev.attempt(), 1);
    /// ```
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// The subject a reply should go to, when the producer asked for one.
    ///
    /// ```
    /// # let ev = plugbus_sdk::Event::new("a", vec![]);
    /// assert_eq!(ev.reply_to(), None);
    /// ```
    pub fn reply_to(&self) -> Option<&str> {
        self.inner.reply_to.as_deref()
    }
}

/// Why a handler failed, and what the host should do about it.
///
/// ```
/// use plugbus_sdk::HandlerError;
/// let e = HandlerError::retry("payment gateway timed out");
/// assert!(e.is_retry());
/// assert_eq!(e.message(), "payment gateway timed out");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandlerError {
    /// Transient: the host tries again later, with exponential backoff.
    Retry(String),
    /// Poison: the host dead-letters the event at once.
    Reject(String),
}

impl HandlerError {
    /// A transient failure: try this event again later.
    ///
    /// ```
    /// assert!(plugbus_sdk::HandlerError::retry("busy").is_retry());
    /// ```
    pub fn retry(msg: impl Into<String>) -> Self {
        HandlerError::Retry(msg.into())
    }

    /// A permanent failure: send this event to the dead-letter subject now.
    ///
    /// ```
    /// assert!(!plugbus_sdk::HandlerError::reject("unknown sku").is_retry());
    /// ```
    pub fn reject(msg: impl Into<String>) -> Self {
        HandlerError::Reject(msg.into())
    }

    /// Whether the host will retry.
    ///
    /// ```
    /// assert!(plugbus_sdk::HandlerError::retry("x").is_retry());
    /// ```
    pub fn is_retry(&self) -> bool {
        matches!(self, HandlerError::Retry(_))
    }

    /// The message the host logs and puts in the dead letter.
    ///
    /// ```
    /// assert_eq!(plugbus_sdk::HandlerError::reject("bad").message(), "bad");
    /// ```
    pub fn message(&self) -> &str {
        match self {
            HandlerError::Retry(m) | HandlerError::Reject(m) => m,
        }
    }

    #[doc(hidden)]
    pub fn __into_wit(self) -> wit::HandlerError {
        match self {
            HandlerError::Retry(m) => wit::HandlerError::Retry(m),
            HandlerError::Reject(m) => wit::HandlerError::Reject(m),
        }
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandlerError::Retry(m) => write!(f, "retry: {m}"),
            HandlerError::Reject(m) => write!(f, "reject: {m}"),
        }
    }
}

impl std::error::Error for HandlerError {}

/// Why the host refused a publish.
///
/// A refused publish is a bug in the handler or its manifest, so `?` turns it into
/// [`HandlerError::Reject`].
///
/// ```no_run
/// # use plugbus_sdk::{Event, HandlerError, PublishError};
/// fn forward(ev: &Event) -> Result<(), HandlerError> {
///     match plugbus_sdk::publish("audit.seen", ev.data()) {
///         Err(PublishError::Denied(why)) => Err(HandlerError::reject(why)),
///         other => Ok(other?),
///     }
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishError {
    /// Outside the manifest's `publishes` patterns, or a system subject.
    Denied(String),
    /// Too many publishes or too many output bytes for one event.
    Limit(String),
    /// Not a valid subject.
    Invalid(String),
}

impl fmt::Display for PublishError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PublishError::Denied(m) => write!(f, "publish denied: {m}"),
            PublishError::Limit(m) => write!(f, "publish limit: {m}"),
            PublishError::Invalid(m) => write!(f, "invalid subject: {m}"),
        }
    }
}

impl std::error::Error for PublishError {}

impl From<PublishError> for HandlerError {
    fn from(e: PublishError) -> Self {
        HandlerError::reject(e.to_string())
    }
}

impl From<wit::PublishError> for PublishError {
    fn from(e: wit::PublishError) -> Self {
        match e {
            wit::PublishError::Denied(m) => PublishError::Denied(m),
            wit::PublishError::Limit(m) => PublishError::Limit(m),
            wit::PublishError::Invalid(m) => PublishError::Invalid(m),
        }
    }
}

/// Publishes `data` to `subject`. The output is released when the handler returns `Ok`.
///
/// ```no_run
/// plugbus_sdk::publish("payments.captured", b"{\"order\":\"o-1\"}").unwrap();
/// ```
pub fn publish(subject: &str, data: impl AsRef<[u8]>) -> Result<(), PublishError> {
    publish_with_headers(subject, data, &[])
}

/// Publishes with extra headers (CloudEvents extension attributes, e.g. a correlation id).
///
/// ```no_run
/// plugbus_sdk::publish_with_headers("payments.captured", b"{}", &[("order-id", "o-1")]).unwrap();
/// ```
pub fn publish_with_headers(
    subject: &str,
    data: impl AsRef<[u8]>,
    headers: &[(&str, &str)],
) -> Result<(), PublishError> {
    let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    __bindings::plugbus::handler::bus::publish(subject, data.as_ref(), &headers).map_err(PublishError::from)
}

/// Publishes `value` serialized as JSON (`datacontenttype: application/json`).
///
/// ```no_run
/// plugbus_sdk::publish_json("shipping.started", &serde_json::json!({ "order": "o-1" })).unwrap();
/// ```
pub fn publish_json<T: Serialize + ?Sized>(subject: &str, value: &T) -> Result<(), PublishError> {
    let data = serde_json::to_vec(value)
        .map_err(|e| PublishError::Invalid(format!("value does not serialize to JSON: {e}")))?;
    publish_with_headers(subject, data, &[("datacontenttype", "application/json")])
}

/// Key-value state, private to this plugin and kept by the host across events and reloads.
///
/// ```no_run
/// # fn main() -> Result<(), plugbus_sdk::kv::KvError> {
/// let seen = plugbus_sdk::kv::get_json::<u64>("seen")?.unwrap_or(0);
/// plugbus_sdk::kv::set_json("seen", &(seen + 1))?;
/// # Ok(()) }
/// ```
pub mod kv {
    use super::{__bindings::plugbus::handler::kv as imp, HandlerError, wit};
    use serde::{Serialize, de::DeserializeOwned};
    use std::fmt;

    /// Why a key-value call failed.
    ///
    /// ```
    /// let e = plugbus_sdk::kv::KvError::TooLarge("value of 2 MiB over the 64 KiB cap".into());
    /// assert!(e.to_string().contains("too large"));
    /// ```
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum KvError {
        /// The key or value is larger than the host allows.
        TooLarge(String),
        /// The store could not be reached (transient).
        Unavailable(String),
        /// The stored value is not the JSON that was asked for.
        Decode(String),
    }

    impl fmt::Display for KvError {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            match self {
                KvError::TooLarge(m) => write!(f, "kv value too large: {m}"),
                KvError::Unavailable(m) => write!(f, "kv unavailable: {m}"),
                KvError::Decode(m) => write!(f, "kv value is not the expected JSON: {m}"),
            }
        }
    }

    impl std::error::Error for KvError {}

    /// An unavailable store is worth a retry; an oversized or undecodable value is not.
    impl From<KvError> for HandlerError {
        fn from(e: KvError) -> Self {
            match e {
                KvError::Unavailable(_) => HandlerError::retry(e.to_string()),
                _ => HandlerError::reject(e.to_string()),
            }
        }
    }

    fn map(e: wit::KvError) -> KvError {
        match e {
            wit::KvError::TooLarge(m) => KvError::TooLarge(m),
            wit::KvError::Unavailable(m) => KvError::Unavailable(m),
        }
    }

    /// Reads the value stored under `key`.
    ///
    /// ```no_run
    /// let v: Option<Vec<u8>> = plugbus_sdk::kv::get("stock/sku-1").unwrap();
    /// ```
    pub fn get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
        imp::get(key).map_err(map)
    }

    /// Stores `value` under `key`.
    ///
    /// ```no_run
    /// plugbus_sdk::kv::set("stock/sku-1", b"10").unwrap();
    /// ```
    pub fn set(key: &str, value: impl AsRef<[u8]>) -> Result<(), KvError> {
        imp::set(key, value.as_ref()).map_err(map)
    }

    /// Removes `key` (no error when it was absent).
    ///
    /// ```no_run
    /// plugbus_sdk::kv::delete("stock/sku-1").unwrap();
    /// ```
    pub fn delete(key: &str) -> Result<(), KvError> {
        imp::delete(key).map_err(map)
    }

    /// Reads and decodes a JSON value.
    ///
    /// ```no_run
    /// let reserved: u64 = plugbus_sdk::kv::get_json("reserved/sku-1").unwrap().unwrap_or(0);
    /// ```
    pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, KvError> {
        match get(key)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|e| KvError::Decode(format!("key {key:?}: {e}")))
            }
        }
    }

    /// Encodes `value` as JSON and stores it.
    ///
    /// ```no_run
    /// plugbus_sdk::kv::set_json("reserved/sku-1", &3u64).unwrap();
    /// ```
    pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), KvError> {
        let bytes = serde_json::to_vec(value).map_err(|e| KvError::Decode(e.to_string()))?;
        set(key, bytes)
    }
}

/// Values the operator sets for this plugin (`[plugins.<name>.config]` in the host's config).
///
/// ```no_run
/// let sender = plugbus_sdk::config::get("sender").unwrap_or_else(|| "shop@example.com".into());
/// ```
pub mod config {
    /// The operator's value for `key`, if set.
    ///
    /// ```no_run
    /// let limit: u32 = plugbus_sdk::config::get("limit").and_then(|v| v.parse().ok()).unwrap_or(10);
    /// ```
    pub fn get(key: &str) -> Option<String> {
        super::__bindings::plugbus::handler::config::get(key)
    }
}

/// Logging into the host's log, tagged with this plugin and the current event.
///
/// ```no_run
/// plugbus_sdk::log::info("reserved 3 x sku-1");
/// plugbus_sdk::log::warn(format!("stock low: {}", 2));
/// ```
pub mod log {
    use super::__bindings::plugbus::handler::{logging, types::LogLevel};

    fn emit(level: LogLevel, msg: &str) {
        logging::log(level, msg);
    }

    /// Logs at debug level.
    ///
    /// ```no_run
    /// plugbus_sdk::log::debug("details");
    /// ```
    pub fn debug(msg: impl AsRef<str>) {
        emit(LogLevel::Debug, msg.as_ref())
    }

    /// Logs at info level.
    ///
    /// ```no_run
    /// plugbus_sdk::log::info("order accepted");
    /// ```
    pub fn info(msg: impl AsRef<str>) {
        emit(LogLevel::Info, msg.as_ref())
    }

    /// Logs at warn level.
    ///
    /// ```no_run
    /// plugbus_sdk::log::warn("stock low");
    /// ```
    pub fn warn(msg: impl AsRef<str>) {
        emit(LogLevel::Warn, msg.as_ref())
    }

    /// Logs at error level.
    ///
    /// ```no_run
    /// plugbus_sdk::log::error("gateway refused the card");
    /// ```
    pub fn error(msg: impl AsRef<str>) {
        emit(LogLevel::Error, msg.as_ref())
    }
}

/// What the `#[handler]` attribute expands to; not a public API.
#[doc(hidden)]
pub mod __private {
    pub use super::__bindings::exports::plugbus::handler::handler::Guest;
    pub use super::__bindings::plugbus::handler::types::{
        DeliverPolicy, Event as WitEvent, HandlerError as WitHandlerError, OrderKey, PluginManifest as Manifest,
        Subscription,
    };

    /// Runs the user's function on a WIT event.
    pub fn run(event: WitEvent, f: fn(super::Event) -> Result<(), super::HandlerError>) -> Result<(), WitHandlerError> {
        f(super::Event::__from_wit(event)).map_err(super::HandlerError::__into_wit)
    }
}
