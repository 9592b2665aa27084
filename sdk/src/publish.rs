//! Publishing: what a handler sends on. Buffered per attempt, released only on `Ok`.

use crate::PublishError;
use serde::Serialize;

/// Publishes `data` to `subject`. The output is released when the handler returns `Ok`; a
/// subject outside the handler's `publishes` is refused ([`PublishError::Denied`]).
///
/// ```
/// use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
///
/// #[handler(subscribe = ["orders.created"], publishes = ["payments.>"])]
/// fn charge(ev: Event) -> Result<(), HandlerError> {
///     plugbus_sdk::publish("payments.requested", ev.data())?;
///     Ok(())
/// }
///
/// let run = TestHost::new().run(charge, Event::new("orders.created", r#"{"order":"o-1"}"#));
/// assert_eq!(run.published[0].subject, "payments.requested");
/// assert_eq!(run.published[0].data, br#"{"order":"o-1"}"#);
/// ```
pub fn publish(subject: &str, data: impl AsRef<[u8]>) -> Result<(), PublishError> {
    publish_with_headers(subject, data, &[])
}

/// Publishes with extra headers (CloudEvents extension attributes, e.g. a correlation id).
///
/// Header names are HTTP-style tokens; the host's own (`plugbus-*`, `nats-*`) and the
/// CloudEvents core attributes (`id`, `source`, `type`, ...) are refused: the host sets them.
///
/// ```
/// use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
///
/// #[handler(subscribe = ["orders.created"], publishes = ["payments.>"])]
/// fn charge(ev: Event) -> Result<(), HandlerError> {
///     plugbus_sdk::publish_with_headers("payments.requested", b"{}", &[("order-id", ev.id())])?;
///     Ok(())
/// }
///
/// let run = TestHost::new().run(charge, plugbus_sdk::Event::new("orders.created", "{}").with_id("o-7"));
/// assert_eq!(run.published[0].header("order-id"), Some("o-7"));
/// ```
pub fn publish_with_headers(
    subject: &str,
    data: impl AsRef<[u8]>,
    headers: &[(&str, &str)],
) -> Result<(), PublishError> {
    let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    crate::host::publish(subject, data.as_ref(), &headers)
}

/// Publishes `value` serialized as JSON (`datacontenttype: application/json`).
///
/// ```
/// use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
///
/// #[handler(subscribe = ["payments.captured"], publishes = ["shipping.started"])]
/// fn ship(ev: Event) -> Result<(), HandlerError> {
///     plugbus_sdk::publish_json("shipping.started", &serde_json::json!({ "order": "o-1" }))?;
///     Ok(())
/// }
///
/// let run = TestHost::new().run(ship, Event::new("payments.captured", "{}"));
/// assert_eq!(run.published[0].json::<serde_json::Value>()["order"], "o-1");
/// assert_eq!(run.published[0].header("datacontenttype"), Some("application/json"));
/// ```
pub fn publish_json<T: Serialize + ?Sized>(subject: &str, value: &T) -> Result<(), PublishError> {
    let data = serde_json::to_vec(value)
        .map_err(|e| PublishError::Invalid(format!("value does not serialize to JSON: {e}")))?;
    publish_with_headers(subject, data, &[("datacontenttype", "application/json")])
}
