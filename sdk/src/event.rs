//! The event a handler receives, and how a test builds one.

use crate::__bindings::plugbus::handler::types as wit;
use crate::HandlerError;
use serde::Serialize;
use serde::de::DeserializeOwned;

/// One event as the handler sees it: a CloudEvents 1.0 record plus delivery information.
///
/// ```
/// # use plugbus_sdk::{Event, HandlerError};
/// fn describe(ev: &Event) -> Result<String, HandlerError> {
///     Ok(format!("{} on {} (attempt {}): {}", ev.id(), ev.subject(), ev.attempt(), ev.text()?))
/// }
/// let ev = Event::new("orders.created", "hi").with_attempt(2);
/// assert_eq!(describe(&ev).unwrap(), "test-event on orders.created (attempt 2): hi");
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

    /// Builds an event by hand, for unit tests of handler logic: attempt 1, id `test-event`,
    /// source `plugbus-sdk/test`, type = the subject, time `1970-01-01T00:00:00Z`, no headers.
    /// The `with_*` methods change each of these.
    ///
    /// ```
    /// let ev = plugbus_sdk::Event::new("orders.created", br#"{"id":"o-1"}"#.to_vec());
    /// assert_eq!(ev.subject(), "orders.created");
    /// assert_eq!(ev.attempt(), 1);
    /// assert_eq!(ev.id(), "test-event");
    /// ```
    pub fn new(subject: impl Into<String>, data: impl Into<Vec<u8>>) -> Self {
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
                data: data.into(),
                attempt: 1,
                reply_to: None,
            },
        }
    }

    /// Builds an event whose data is `value` as JSON (`datacontenttype: application/json`), as
    /// a producer using `plugbus publish --json` or [`publish_json`](crate::publish_json) sends it.
    ///
    /// # Panics
    /// When `value` does not serialize to JSON (a map with non-string keys, say): a bug in the test.
    ///
    /// ```
    /// let ev = plugbus_sdk::Event::new_json("orders.created", &serde_json::json!({ "order_id": "o-1" }));
    /// assert_eq!(ev.content_type(), Some("application/json"));
    /// assert_eq!(ev.json::<serde_json::Value>().unwrap()["order_id"], "o-1");
    /// ```
    pub fn new_json<T: Serialize + ?Sized>(subject: impl Into<String>, value: &T) -> Self {
        let data = serde_json::to_vec(value).unwrap_or_else(|e| panic!("Event::new_json: the value is not JSON: {e}"));
        Self::new(subject, data).with_content_type("application/json")
    }

    /// Sets the delivery attempt (1 on first delivery, 2 on the first retry, ...), to test
    /// retry logic.
    ///
    /// ```
    /// let ev = plugbus_sdk::Event::new("payments.due", vec![]).with_attempt(3);
    /// assert_eq!(ev.attempt(), 3);
    /// ```
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.inner.attempt = attempt;
        self
    }

    /// Sets the event id (CloudEvents `id`).
    ///
    /// ```
    /// let ev = plugbus_sdk::Event::new("orders.created", vec![]).with_id("evt-42");
    /// assert_eq!(ev.id(), "evt-42");
    /// ```
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.inner.id = id.into();
        self
    }

    /// Sets who produced the event (CloudEvents `source`).
    ///
    /// ```
    /// let ev = plugbus_sdk::Event::new("orders.created", vec![]).with_source("/shop/web");
    /// assert_eq!(ev.source(), "/shop/web");
    /// ```
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.inner.source = source.into();
        self
    }

    /// Sets the event type (CloudEvents `type`; [`Event::new`] uses the subject).
    ///
    /// ```
    /// let ev = plugbus_sdk::Event::new("orders.created", vec![]).with_type("com.shop.order.v2");
    /// assert_eq!(ev.event_type(), "com.shop.order.v2");
    /// ```
    pub fn with_type(mut self, event_type: impl Into<String>) -> Self {
        self.inner.type_ = event_type.into();
        self
    }

    /// Sets when the event happened (CloudEvents `time`, RFC 3339; not checked).
    ///
    /// ```
    /// let ev = plugbus_sdk::Event::new("orders.created", vec![]).with_time("2026-05-01T12:00:00Z");
    /// assert_eq!(ev.time(), "2026-05-01T12:00:00Z");
    /// ```
    pub fn with_time(mut self, time: impl Into<String>) -> Self {
        self.inner.time = time.into();
        self
    }

    /// Sets the media type of the data (CloudEvents `datacontenttype`).
    ///
    /// ```
    /// let ev = plugbus_sdk::Event::new("a", "x,y".as_bytes().to_vec()).with_content_type("text/csv");
    /// assert_eq!(ev.content_type(), Some("text/csv"));
    /// ```
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Self {
        self.inner.datacontenttype = Some(content_type.into());
        self
    }

    /// Sets the subject a reply should go to.
    ///
    /// ```
    /// let ev = plugbus_sdk::Event::new("prices.quote", vec![]).with_reply_to("replies.web.1");
    /// assert_eq!(ev.reply_to(), Some("replies.web.1"));
    /// ```
    pub fn with_reply_to(mut self, subject: impl Into<String>) -> Self {
        self.inner.reply_to = Some(subject.into());
        self
    }

    /// Adds a header (extension attribute) to a hand-built event; names are lower-cased, as the
    /// host delivers them.
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
