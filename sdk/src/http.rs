//! Outbound HTTP from a handler, through the host's standard `wasi:http` client.
//!
//! A handler may call only the destinations its [`handler`](crate::handler) attribute asks for
//! (`outbound = ["https://api.example.com"]`) **and** the operator grants
//! (`[plugins.NAME] allowed_outbound = [...]`); anything else fails with
//! [`HttpError::Refused`], naming why. Every request carries an `Idempotency-Key` header set by
//! the host from (event id, plugin, call index): the same on every retry and redelivery of the
//! event, so a provider that honours it performs the side effect once.
//!
//! ```
//! use plugbus_sdk::{Event, HandlerError, handler, http, testing::TestHost};
//!
//! #[handler(subscribe = ["payments.due"], outbound = ["https://pay.example.com"])]
//! fn charge(ev: Event) -> Result<(), HandlerError> {
//!     let order: serde_json::Value = ev.json()?;
//!     let res = http::post_json("https://pay.example.com/charges", &order)?; // Timeout → retry
//!     if !res.is_success() {
//!         return Err(HandlerError::retry(format!("provider said {}", res.status)));
//!     }
//!     Ok(())
//! }
//!
//! let mut host = TestHost::new().with_http("https://pay.example.com/charges", 201, r#"{"id":"ch_1"}"#);
//! let run = host.run(charge, Event::new("payments.due", r#"{"amount":5}"#));
//! assert_eq!(run.result, Ok(()));
//! assert_eq!(run.http_calls[0].url, "https://pay.example.com/charges");
//! ```
//!
//! Redirects are followed (at most [`MAX_REDIRECTS`]), each hop a new call through the same
//! checks: a redirect to a destination that is not allowed is refused.

use crate::HandlerError;
use std::fmt;
use std::time::Duration;

/// How many redirects [`Request::send`] follows.
pub const MAX_REDIRECTS: usize = 5;

/// Why an outbound request failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum HttpError {
    /// The host refused the call: the destination is not requested or not granted, it resolves
    /// to a private address, or a per-event limit was reached. `reason` says which.
    Refused {
        /// The host's words.
        reason: String,
    },
    /// The destination's circuit breaker is open: too many failures in a row; calls fail at
    /// once until the cool-down has passed (then one probe goes through). Returned with `?`,
    /// the event waits out the cool-down without being charged an attempt (see
    /// `From<HttpError>` for [`HandlerError`]).
    CircuitOpen {
        /// The destination host.
        host: String,
        /// When a call may be tried again.
        retry_after: Duration,
    },
    /// The call did not finish within its timeout (or the event's deadline).
    Timeout,
    /// The request body, the response body or the response's headers (64 KiB, 100 of them) are
    /// over the host's limit.
    TooLarge {
        /// Which one.
        what: String,
    },
    /// The request could not be built (a bad URL or header).
    InvalidRequest(String),
    /// Anything else: connection refused, TLS, a protocol error.
    Failed(String),
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HttpError::Refused { reason } => write!(f, "outbound request refused: {reason}"),
            HttpError::CircuitOpen { host, retry_after } => {
                write!(f, "circuit open for {host}: retry after {} ms", retry_after.as_millis())
            }
            HttpError::Timeout => write!(f, "outbound request timed out"),
            HttpError::TooLarge { what } => write!(f, "outbound {what} is over the limit"),
            HttpError::InvalidRequest(m) => write!(f, "invalid outbound request: {m}"),
            HttpError::Failed(m) => write!(f, "outbound request failed: {m}"),
        }
    }
}

impl std::error::Error for HttpError {}

/// `?` in a handler: timeouts, open circuits and network failures retry the event; a refusal,
/// an oversized body or a bad request rejects it (dead letter with the reason).
///
/// An open circuit needs nothing more from the handler: the host saw its breaker refuse the
/// call, so when the attempt asks to retry it waits at least the breaker's `retry_after` and
/// runs the *same* attempt again ([`Event::attempt`](crate::Event::attempt) unchanged, not
/// counted against `max_attempts`, unless the attempt sent a request), up to the operator's
/// `[retry] max_circuit_wait` per event
/// (default 15 minutes; past it such retries count like any other, so a provider that never
/// comes back still ends in a dead letter).
impl From<HttpError> for HandlerError {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Timeout | HttpError::CircuitOpen { .. } | HttpError::Failed(_) => {
                HandlerError::retry(e.to_string())
            }
            _ => HandlerError::reject(e.to_string()),
        }
    }
}

/// An outbound request.
///
/// ```
/// use plugbus_sdk::http::Request;
/// let req = Request::post("https://mail.example.com/send", b"hi".to_vec()).header("x-tenant", "t1");
/// assert_eq!(req.method, "POST");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET`, `POST`, ...
    pub method: String,
    /// `scheme://host[:port]/path?query`.
    pub url: String,
    /// Headers, in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Request {
    /// A request with `method` to `url`, no headers, no body.
    pub fn new(method: impl Into<String>, url: impl Into<String>) -> Self {
        Self { method: method.into(), url: url.into(), headers: Vec::new(), body: Vec::new() }
    }

    /// `GET url`.
    pub fn get(url: impl Into<String>) -> Self {
        Self::new("GET", url)
    }

    /// `POST url` with `body`.
    pub fn post(url: impl Into<String>, body: Vec<u8>) -> Self {
        Self { body, ..Self::new("POST", url) }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Sends it through the host, following redirects (each hop checked by the host again).
    pub fn send(self) -> Result<Response, HttpError> {
        let mut req = self;
        for _ in 0..=MAX_REDIRECTS {
            let res = crate::host::http_send(&req)?;
            let location = res.header("location").map(str::to_owned);
            match (res.status, location) {
                (301 | 302 | 303 | 307 | 308, Some(loc)) => {
                    let url = resolve_location(&req.url, &loc)?;
                    if !matches!(res.status, 307 | 308) {
                        req.method = "GET".into();
                        req.body.clear();
                    }
                    req.url = url;
                }
                _ => return Ok(res),
            }
        }
        Err(HttpError::Failed(format!("more than {MAX_REDIRECTS} redirects")))
    }
}

/// An absolute `location`, or one relative to `base`'s origin.
fn resolve_location(base: &str, location: &str) -> Result<String, HttpError> {
    if location.contains("://") {
        return Ok(location.to_string());
    }
    let (scheme, rest) = base.split_once("://").ok_or_else(|| HttpError::InvalidRequest(base.into()))?;
    let authority = rest.split(['/', '?']).next().unwrap_or(rest);
    if !location.starts_with('/') {
        return Err(HttpError::Failed(format!("unsupported redirect location {location:?}")));
    }
    Ok(format!("{scheme}://{authority}{location}"))
}

/// A response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// Headers (names lower-case), in order.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Vec<u8>,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy UTF-8).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// `GET url`.
pub fn get(url: &str) -> Result<Response, HttpError> {
    Request::get(url).send()
}

/// `POST url` with `value` as a JSON body (`content-type: application/json`).
pub fn post_json<T: serde::Serialize + ?Sized>(url: &str, value: &T) -> Result<Response, HttpError> {
    let body = serde_json::to_vec(value).map_err(|e| HttpError::InvalidRequest(format!("body: {e}")))?;
    Request::post(url, body).header("content-type", "application/json").send()
}

/// What the host puts before its reason when it refuses a call.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
pub(crate) const REFUSED_PREFIX: &str = "plugbus refused: ";

/// What the host puts before `<host> retry_after_ms=<n>` when a breaker is open.
#[cfg_attr(not(target_arch = "wasm32"), allow(dead_code))]
pub(crate) const CIRCUIT_OPEN_PREFIX: &str = "plugbus circuit open: ";

/// The component side: `wasi:http/outgoing-handler`.
#[cfg(target_arch = "wasm32")]
pub(crate) mod wasm {
    use super::{CIRCUIT_OPEN_PREFIX, HttpError, REFUSED_PREFIX, Request, Response};
    use crate::__http_bindings::wasi::http::outgoing_handler;
    use crate::__http_bindings::wasi::http::types::{
        ErrorCode, Fields, IncomingBody, Method, OutgoingBody, OutgoingRequest, Scheme,
    };
    use crate::__http_bindings::wasi::io::streams::StreamError;

    fn code(e: ErrorCode) -> HttpError {
        match e {
            ErrorCode::InternalError(Some(m)) if m.starts_with(REFUSED_PREFIX) => {
                HttpError::Refused { reason: m[REFUSED_PREFIX.len()..].to_string() }
            }
            ErrorCode::InternalError(Some(m)) if m.starts_with(CIRCUIT_OPEN_PREFIX) => {
                let rest = &m[CIRCUIT_OPEN_PREFIX.len()..];
                let (host, ms) = rest.split_once(" retry_after_ms=").unwrap_or((rest, "0"));
                HttpError::CircuitOpen {
                    host: host.to_string(),
                    retry_after: std::time::Duration::from_millis(ms.parse().unwrap_or(0)),
                }
            }
            ErrorCode::ConnectionTimeout | ErrorCode::ConnectionReadTimeout | ErrorCode::HttpResponseTimeout => {
                HttpError::Timeout
            }
            ErrorCode::HttpRequestBodySize(_) => HttpError::TooLarge { what: "request body".into() },
            ErrorCode::HttpResponseBodySize(_) => HttpError::TooLarge { what: "response body".into() },
            ErrorCode::HttpResponseHeaderSectionSize(_) | ErrorCode::HttpResponseHeaderSize(_) => {
                HttpError::TooLarge { what: "response headers".into() }
            }
            other => HttpError::Failed(format!("{other:?}")),
        }
    }

    /// A failure while reading the response body: wasmtime-wasi-http passes the host's error
    /// only as text there (no `error-code`; its first line: the rest may be a host backtrace),
    /// so it is known by its words.
    fn body_error(text: String) -> HttpError {
        let first = text.lines().next().unwrap_or_default().to_ascii_lowercase();
        if first.contains("body size exceeds limit") {
            HttpError::TooLarge { what: "response body".into() }
        } else if first.contains("timeout") || first.contains("timed out") {
            HttpError::Timeout
        } else {
            HttpError::Failed(first)
        }
    }

    pub(crate) fn send(req: &Request) -> Result<Response, HttpError> {
        let (scheme, rest) = req.url.split_once("://").ok_or_else(|| HttpError::InvalidRequest(req.url.clone()))?;
        let scheme = match scheme.to_ascii_lowercase().as_str() {
            "http" => Scheme::Http,
            "https" => Scheme::Https,
            other => return Err(HttpError::InvalidRequest(format!("scheme {other:?}"))),
        };
        let split = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(split);
        let path = if path.is_empty() {
            "/".to_string()
        } else if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        let headers = Fields::new();
        for (k, v) in &req.headers {
            headers.append(k, v.as_bytes()).map_err(|e| HttpError::InvalidRequest(format!("header {k}: {e:?}")))?;
        }
        let out = OutgoingRequest::new(headers);
        let method = match req.method.as_str() {
            "GET" => Method::Get,
            "POST" => Method::Post,
            "PUT" => Method::Put,
            "DELETE" => Method::Delete,
            "PATCH" => Method::Patch,
            "HEAD" => Method::Head,
            other => Method::Other(other.to_string()),
        };
        let bad = |what: &str| HttpError::InvalidRequest(format!("{what} of {}", req.url));
        out.set_method(&method).map_err(|_| bad("method"))?;
        out.set_scheme(Some(&scheme)).map_err(|_| bad("scheme"))?;
        out.set_authority(Some(authority)).map_err(|_| bad("authority"))?;
        out.set_path_with_query(Some(&path)).map_err(|_| bad("path"))?;
        let body = out.body().map_err(|_| bad("body"))?;
        // Sent first, then the body streamed: the host reads it while the request goes out.
        let pending = outgoing_handler::handle(out, None).map_err(code)?;
        if let Ok(stream) = body.write() {
            for chunk in req.body.chunks(4096) {
                if stream.blocking_write_and_flush(chunk).is_err() {
                    break; // the host refused or failed the request: its error comes below
                }
            }
        }
        let _ = OutgoingBody::finish(body, None);
        pending.subscribe().block();
        let response = match pending.get() {
            Some(Ok(r)) => r.map_err(code)?,
            _ => return Err(HttpError::Failed("no response".into())),
        };
        let status = response.status();
        let headers = response
            .headers()
            .entries()
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let incoming = response.consume().map_err(|_| HttpError::Failed("no body".into()))?;
        let mut body = Vec::new();
        {
            let stream = incoming.stream().map_err(|_| HttpError::Failed("no body stream".into()))?;
            loop {
                match stream.blocking_read(64 * 1024) {
                    Ok(bytes) => body.extend_from_slice(&bytes),
                    Err(StreamError::Closed) => break,
                    Err(StreamError::LastOperationFailed(e)) => {
                        let err = crate::__http_bindings::wasi::http::types::http_error_code(&e);
                        return Err(err.map(code).unwrap_or_else(|| body_error(e.to_debug_string())));
                    }
                }
            }
        }
        let _ = IncomingBody::finish(incoming);
        Ok(Response { status, headers, body })
    }
}
