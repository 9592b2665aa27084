//! Request/reply: ask another plugin (or any NATS responder) and wait for one answer, or answer
//! a request you handle.

use crate::{Event, HandlerError};
use serde::Serialize;
use std::fmt;
use std::time::Duration;

/// Publishes `data` to `subject` as a request and waits up to `timeout` for one reply.
///
/// The subject must be one the handler's `publishes` allows (as for [`publish`](crate::publish)).
/// The wait counts in the event's deadline: a `timeout` longer than what is left of it is cut to
/// it. The reply is an [`Event`] on `subject` (its `source` says who answered). Requests are
/// bounded per event (`max_requests`, 16 by default) and their bytes count in the event's
/// `max_output_bytes`. With `?`, a timeout or a missing responder retries the event, a refused
/// subject rejects it ([`RequestError`] into [`HandlerError`]).
///
/// Unlike a publish, a request goes out at once, not when the handler returns: a handler that
/// then fails and is retried asks again.
///
/// ```
/// use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
/// use std::time::Duration;
///
/// #[handler(subscribe = ["orders.created"], publishes = ["prices.quote", "orders.priced"])]
/// fn price(ev: Event) -> Result<(), HandlerError> {
///     let quote = plugbus_sdk::request("prices.quote", ev.data(), Duration::from_secs(1))?;
///     plugbus_sdk::publish("orders.priced", quote.data())?;
///     Ok(())
/// }
///
/// let run = TestHost::new().with_reply("prices.quote", "42").run(price, Event::new("orders.created", "widget"));
/// assert_eq!(run.published[0].text(), "42");
/// assert_eq!(run.requests[0].text(), "widget");
/// ```
pub fn request(subject: &str, data: impl AsRef<[u8]>, timeout: Duration) -> Result<Event, RequestError> {
    request_with_headers(subject, data, &[], timeout)
}

/// [`request`] with extra headers (CloudEvents extension attributes; the host's own are refused,
/// as for [`publish_with_headers`](crate::publish_with_headers)).
///
/// ```
/// use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
/// use std::time::Duration;
///
/// #[handler(subscribe = ["orders.created"], publishes = ["prices.quote"])]
/// fn price(ev: Event) -> Result<(), HandlerError> {
///     plugbus_sdk::request_with_headers("prices.quote", ev.data(), &[("tenant", "acme")], Duration::from_secs(1))?;
///     Ok(())
/// }
///
/// let run = TestHost::new().with_reply("prices.quote", "42").run(price, Event::new("orders.created", ""));
/// assert_eq!(run.requests[0].header("tenant"), Some("acme"));
/// ```
pub fn request_with_headers(
    subject: &str,
    data: impl AsRef<[u8]>,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<Event, RequestError> {
    let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    let millis = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
    crate::host::request(subject, data.as_ref(), &headers, millis)
}

/// Replies `data` to the event being handled, when its producer asked for a reply
/// ([`Event::reply_to`] is set).
///
/// The reply is released with the attempt's outputs, only when the handler returns `Ok` (a
/// failed attempt replies nothing; its retry may reply). One reply per event; its bytes count in
/// `max_output_bytes`. Replying to an event without a reply-to, or to another event's, is
/// refused ([`ReplyError::Denied`]).
///
/// ```
/// use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
///
/// #[handler(subscribe = ["prices.quote"])]
/// fn quote(ev: Event) -> Result<(), HandlerError> {
///     let price = ev.text()?.len() * 7;
///     plugbus_sdk::reply(&ev, price.to_string())?;
///     Ok(())
/// }
///
/// let run = TestHost::new().run(quote, Event::new("prices.quote", "widget").with_reply_to("r-1"));
/// assert_eq!(run.reply.unwrap().text(), "42");
/// ```
pub fn reply(ev: &Event, data: impl AsRef<[u8]>) -> Result<(), ReplyError> {
    reply_with_headers(ev, data, &[])
}

/// [`reply`] with extra headers.
///
/// ```
/// use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
///
/// #[handler(subscribe = ["prices.quote"])]
/// fn quote(ev: Event) -> Result<(), HandlerError> {
///     plugbus_sdk::reply_with_headers(&ev, "42", &[("currency", "EUR")])?;
///     Ok(())
/// }
///
/// let run = TestHost::new().run(quote, Event::new("prices.quote", "").with_reply_to("r-1"));
/// assert_eq!(run.reply.unwrap().header("currency"), Some("EUR"));
/// ```
pub fn reply_with_headers(ev: &Event, data: impl AsRef<[u8]>, headers: &[(&str, &str)]) -> Result<(), ReplyError> {
    let Some(to) = ev.reply_to() else {
        return Err(ReplyError::Denied(format!("event {} has no reply-to: nobody asked for a reply", ev.id())));
    };
    let headers: Vec<(String, String)> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    crate::host::reply(to, data.as_ref(), &headers)
}

/// Replies `value` as JSON (`datacontenttype: application/json`).
///
/// ```
/// use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
///
/// #[handler(subscribe = ["prices.quote"])]
/// fn quote(ev: Event) -> Result<(), HandlerError> {
///     plugbus_sdk::reply_json(&ev, &serde_json::json!({ "price": 42 }))?;
///     Ok(())
/// }
///
/// let run = TestHost::new().run(quote, Event::new("prices.quote", "").with_reply_to("r-1"));
/// let reply = run.reply.unwrap();
/// assert_eq!(reply.json::<serde_json::Value>()["price"], 42);
/// assert_eq!(reply.header("datacontenttype"), Some("application/json"));
/// ```
pub fn reply_json<T: Serialize + ?Sized>(ev: &Event, value: &T) -> Result<(), ReplyError> {
    let data =
        serde_json::to_vec(value).map_err(|e| ReplyError::Invalid(format!("value does not serialize to JSON: {e}")))?;
    reply_with_headers(ev, data, &[("datacontenttype", "application/json")])
}

/// Why a [`request`] got no reply.
///
/// With `?` in a handler: [`Timeout`](RequestError::Timeout),
/// [`NoResponders`](RequestError::NoResponders) and [`Unavailable`](RequestError::Unavailable)
/// retry the event (the responder may be back later); the others reject it (a bug in the
/// handler or its manifest).
///
/// ```
/// use plugbus_sdk::{HandlerError, RequestError};
/// let e: HandlerError = RequestError::Timeout("no reply on prices.quote within 1s".into()).into();
/// assert!(e.is_retry());
/// let e: HandlerError = RequestError::Denied("not in publishes".into()).into();
/// assert!(!e.is_retry());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestError {
    /// The subject is outside the manifest's `publishes`, or is a system subject.
    Denied(String),
    /// A per-event limit was reached (requests, output bytes), or the reply was over
    /// `max_reply_bytes`.
    Limit(String),
    /// Not a valid subject or header.
    Invalid(String),
    /// No reply within the timeout (or what was left of the event's deadline).
    Timeout(String),
    /// Nothing subscribes to the subject.
    NoResponders(String),
    /// The bus could not take the request now.
    Unavailable(String),
}

impl RequestError {
    /// The host's words.
    ///
    /// ```
    /// assert_eq!(plugbus_sdk::RequestError::Timeout("late".into()).message(), "late");
    /// ```
    pub fn message(&self) -> &str {
        match self {
            RequestError::Denied(m)
            | RequestError::Limit(m)
            | RequestError::Invalid(m)
            | RequestError::Timeout(m)
            | RequestError::NoResponders(m)
            | RequestError::Unavailable(m) => m,
        }
    }
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            RequestError::Denied(_) => "request denied",
            RequestError::Limit(_) => "request limit",
            RequestError::Invalid(_) => "invalid request",
            RequestError::Timeout(_) => "request timed out",
            RequestError::NoResponders(_) => "no responders",
            RequestError::Unavailable(_) => "request not sent",
        };
        write!(f, "{kind}: {}", self.message())
    }
}

impl std::error::Error for RequestError {}

impl From<RequestError> for HandlerError {
    fn from(e: RequestError) -> Self {
        match e {
            RequestError::Timeout(_) | RequestError::NoResponders(_) | RequestError::Unavailable(_) => {
                HandlerError::retry(e.to_string())
            }
            _ => HandlerError::reject(e.to_string()),
        }
    }
}

/// Why a [`reply`] was refused; with `?` it rejects the event.
///
/// ```
/// use plugbus_sdk::{Event, ReplyError};
/// let err = plugbus_sdk::testing::TestHost::new()
///     .run(|ev| { plugbus_sdk::reply(&ev, "x")?; Ok(()) }, Event::new("a", ""))
///     .result.unwrap_err();
/// assert!(err.message().contains("no reply-to"), "{err}");
/// # let _ = ReplyError::Limit(String::new());
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplyError {
    /// The event has no reply-to, or the reply-to is not the handled event's.
    Denied(String),
    /// The attempt already replied, or the reply is over the event's output bytes.
    Limit(String),
    /// A header is not valid.
    Invalid(String),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::Denied(m) => write!(f, "reply denied: {m}"),
            ReplyError::Limit(m) => write!(f, "reply limit: {m}"),
            ReplyError::Invalid(m) => write!(f, "invalid reply: {m}"),
        }
    }
}

impl std::error::Error for ReplyError {}

impl From<ReplyError> for HandlerError {
    fn from(e: ReplyError) -> Self {
        HandlerError::reject(e.to_string())
    }
}
