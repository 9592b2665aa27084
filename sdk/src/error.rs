//! What can go wrong: a handler's own failure, and a refused publish.

use crate::__bindings::plugbus::handler::types as wit;
use std::fmt;

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
/// A handler that swallows a refused publish still fails: the host (and
/// [`TestHost`](crate::testing::TestHost)) rejects the event, since its outputs are incomplete.
///
/// ```
/// use plugbus_sdk::{Event, HandlerError, PublishError, handler, testing::TestHost};
///
/// #[handler(subscribe = ["orders.created"], publishes = ["audit.>"])]
/// fn forward(ev: Event) -> Result<(), HandlerError> {
///     match plugbus_sdk::publish("billing.seen", ev.data()) {
///         Err(PublishError::Denied(why)) => Err(HandlerError::reject(why)),
///         other => Ok(other?),
///     }
/// }
///
/// let run = TestHost::new().run(forward, Event::new("orders.created", "{}"));
/// let err = run.result.unwrap_err();
/// assert!(err.message().contains("not in the manifest's publishes"), "{err}");
/// assert!(run.published.is_empty());
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
