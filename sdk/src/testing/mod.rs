//! Unit tests of handlers with plain `cargo test`: no wasm, no host.
//!
//! [`TestHost`] runs a handler function natively against an in-memory host that applies the
//! real host's rules: the `publishes` allow-list of the handler's `#[handler]` attribute (and
//! the host's subject rules: NATS wildcards, no system subjects, dead letters only by name),
//! its per-event caps on publishes, output bytes, headers and kv, and the all-or-nothing end of
//! an attempt: a handler that fails releases no outputs and commits no kv writes. The [`Run`]
//! it returns says what the host would have done.
//!
//! ```
//! use plugbus_sdk::{Event, HandlerError, handler, kv, publish_json, testing::TestHost};
//!
//! #[handler(subscribe = ["orders.created"], publishes = ["inventory.>"])]
//! fn reserve(ev: Event) -> Result<(), HandlerError> {
//!     let order: serde_json::Value = ev.json()?;
//!     let sku = order["sku"].as_str().unwrap_or_default();
//!     let stock = kv::get_json::<u64>(&format!("stock/{sku}"))?.unwrap_or(0);
//!     if stock == 0 {
//!         publish_json("inventory.rejected", &order)?;
//!         return Ok(());
//!     }
//!     kv::set_json(&format!("stock/{sku}"), &(stock - 1))?;
//!     publish_json("inventory.reserved", &order)?;
//!     Ok(())
//! }
//!
//! let mut host = TestHost::new().with_kv_json("stock/widget", &1u64);
//! let order = Event::new_json("orders.created", &serde_json::json!({ "sku": "widget" }));
//!
//! let first = host.run(reserve, order.clone());
//! assert!(first.result.is_ok());
//! assert_eq!(first.published[0].subject, "inventory.reserved");
//! assert_eq!(first.kv_get_json::<u64>("stock/widget"), Some(0));
//!
//! // The host keeps kv across events: the second order finds no stock.
//! let second = host.run(reserve, order);
//! assert_eq!(second.published[0].subject, "inventory.rejected");
//! ```
//!
//! ## Why native-only, and not a feature
//! This module exists on every target but `wasm32` (`cfg(not(target_arch = "wasm32"))`), with
//! no feature to turn on: `cargo test` in a handler crate just works, with nothing in
//! `Cargo.toml`, and none of it is ever compiled into a component. On the native target the
//! SDK's host calls ([`publish`](crate::publish), [`kv`](crate::kv), [`config`](crate::config),
//! [`log`](crate::log)) go to the `TestHost` running on the calling thread; in the component they
//! are the real host's imports. Nothing else differs, so what passes here is the same code that
//! runs in the sandbox.
//!
//! ## What is and is not the same as the host
//! - Same: the allow-list and subject rules, the caps ([`Limits`], the host's defaults unless
//!   [`TestHost::with_limits`] changes them), a refused publish failing the event even when the
//!   handler swallowed the error, a panic failing the attempt like a retry, an oversized event
//!   rejected without running the handler, kv reads seeing the attempt's own writes.
//! - Checked loudly, as the host would at load or never do: a `#[handler]` whose manifest the
//!   host would refuse, or an event on a subject none of its subscriptions match, makes
//!   [`TestHost::run`] panic (the test is wrong, not the handler).
//! - Request/reply: a [`request`](crate::request) is answered by the stub
//!   [`TestHost::with_reply`] gives its subject (no stub: `NoResponders`), after the same subject
//!   and per-event checks as the host's; [`Run::requests`] lists what was asked. A
//!   [`reply`](crate::reply) goes only to the event's own `reply_to` (set it with
//!   [`Event::with_reply_to`]), once, and is in [`Run::reply`] only when the run succeeded.
//! - Not modelled: deadlines, memory caps, instance freshness (a native test shares statics
//!   between runs; the host gives each delivery a fresh instance), concurrent writers to kv.
//! - The SDK's host calls panic outside `TestHost::run` on the native target (there is no host
//!   to answer them), except the [`log`](crate::log) functions, which then print to stderr.

mod subject;

use crate::__private::Declared;
use crate::log::Level;
use crate::{Event, HandlerError, PublishError, kv::KvError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::panic::{AssertUnwindSafe, catch_unwind};
use subject::{Pattern, is_dead_letter_subject, is_system_subject, validate_subject};

/// What the host charges for one output, header or kv key on top of its bytes.
const ENTRY_COST: u64 = 64;
/// The longest subject a plugin may publish to, in bytes.
const MAX_SUBJECT_BYTES: usize = 1024;
/// How much of a string a message repeats.
const ECHO_BYTES: usize = 4096;
/// The longest kv key, in bytes (the host's `MAX_KV_KEY_BYTES`, on every backend).
const MAX_KV_KEY_BYTES: usize = 512;

/// The host's per-event caps that a unit test can meet, with the host's defaults (the
/// operator's `[limits]` / `[plugins.NAME.limits]` keys of the same names).
///
/// ```
/// use plugbus_sdk::testing::{Limits, TestHost};
/// let tight = TestHost::new().with_limits(Limits { max_publishes: 1, ..Limits::default() });
/// # let _ = tight;
/// assert_eq!(Limits::default().max_publishes, 100);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Publishes allowed per event.
    pub max_publishes: u32,
    /// Total bytes (subject, data, headers, 64 more per output and per header) per event.
    pub max_output_bytes: u64,
    /// Headers one output may carry.
    pub max_headers: u32,
    /// Largest event data the handler is handed; larger events are rejected unrun.
    pub max_event_bytes: u64,
    /// Largest kv value (and key).
    pub max_kv_value_bytes: u64,
    /// Distinct kv keys one attempt may write.
    pub max_kv_writes: u32,
    /// Bytes one attempt's kv transaction may hold (keys and values written, keys read, 64 more
    /// per key).
    pub max_kv_write_bytes: u64,
    /// kv reads one attempt may send to the store (a key read again counts again; a key it
    /// wrote is read from its own writes and does not count), as on the host.
    pub max_kv_reads: u32,
    /// Bytes of values one attempt's kv reads may bring from the store (a key read again
    /// counts again; a key the attempt wrote does not).
    pub max_kv_read_bytes: u64,
    /// Bytes the store may hold in all, across events (keys and values, 64 more per key): a
    /// run whose writes would take it past this fails whole and may be retried, as on the host;
    /// deletes and shrinking writes always pass.
    pub max_kv_bytes: u64,
    /// Bytes of log text kept per event; later lines are dropped.
    pub max_log_bytes: u64,
    /// Requests ([`request`](crate::request)) one event may make.
    pub max_requests: u32,
    /// Largest reply a request accepts.
    pub max_reply_bytes: u64,
}

impl Limits {
    /// The most bytes one host call may pass (the host's per-call copy limit, wasmtime's
    /// hostcall fuel): four times the largest legitimate call, plus 64 KiB. A call a little over
    /// a cap gets the cap's error; one past this ends the run as the host's trap does, a retry.
    pub fn hostcall_bytes(&self) -> u64 {
        let headers = u64::from(self.max_headers) * 2 * ENTRY_COST;
        let largest = (self.max_output_bytes + headers + MAX_SUBJECT_BYTES as u64)
            .max(2 * self.max_kv_value_bytes)
            .max(self.max_log_bytes);
        largest.saturating_mul(4).saturating_add(64 * 1024)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_publishes: 100,
            max_output_bytes: 1024 * 1024,
            max_headers: 64,
            max_event_bytes: 1024 * 1024,
            max_kv_value_bytes: 256 * 1024,
            max_kv_writes: 1_000,
            max_kv_write_bytes: 16 * 1024 * 1024,
            max_kv_reads: 1_000,
            max_kv_read_bytes: 16 * 1024 * 1024,
            max_kv_bytes: 256 * 1024 * 1024,
            max_log_bytes: 64 * 1024,
            max_requests: 16,
            max_reply_bytes: 1024 * 1024,
        }
    }
}

/// A host for unit tests: config, a kv store, and the host's rules, on the calling thread.
///
/// Build it with the `with_*` methods, then [`run`](TestHost::run) a handler on an event. The
/// store persists across runs of one `TestHost`, as the host's does across events: a run that
/// succeeds commits its writes, one that fails leaves the store as it was.
///
/// ```
/// use plugbus_sdk::{Event, HandlerError, handler, kv, testing::TestHost};
///
/// #[handler(subscribe = ["visits.>"])]
/// fn count(ev: Event) -> Result<(), HandlerError> {
///     let key = format!("count/{}", ev.subject());
///     kv::set_json(&key, &(kv::get_json::<u64>(&key)?.unwrap_or(0) + 1))?;
///     Ok(())
/// }
///
/// let mut host = TestHost::new();
/// host.run(count, Event::new("visits.home", ""));
/// let run = host.run(count, Event::new("visits.home", ""));
/// assert_eq!(run.kv_get_json::<u64>("count/visits.home"), Some(2));
/// ```
#[derive(Debug, Clone, Default)]
pub struct TestHost {
    config: HashMap<String, String>,
    kv: KvStore,
    limits: Limits,
    http: Vec<(String, crate::http::Response)>,
    replies: Vec<(String, Vec<u8>)>,
}

impl TestHost {
    /// An empty host: no config, an empty store, the host's default limits.
    ///
    /// ```
    /// let host = plugbus_sdk::testing::TestHost::new();
    /// assert!(host.kv().is_empty());
    /// ```
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers outbound requests to exactly `url` (any method) with `status` and `body`; a
    /// request to a URL without a stub fails with [`HttpError::Refused`](crate::http::HttpError),
    /// as does one outside the handler's `outbound` list (as the host would refuse it). The
    /// operator's grant is assumed.
    ///
    /// ```
    /// use plugbus_sdk::{Event, HandlerError, handler, http, testing::TestHost};
    ///
    /// #[handler(subscribe = ["mail.send"], outbound = ["https://mail.example.com"])]
    /// fn send(ev: Event) -> Result<(), HandlerError> {
    ///     http::post_json("https://mail.example.com/v1/send", &ev.json::<serde_json::Value>()?)?;
    ///     Ok(())
    /// }
    ///
    /// let run = TestHost::new().with_http("https://mail.example.com/v1/send", 202, "").run(send, Event::new("mail.send", "{}"));
    /// assert_eq!(run.result, Ok(()));
    /// let unstubbed = TestHost::new().run(send, Event::new("mail.send", "{}"));
    /// assert!(unstubbed.result.unwrap_err().message().contains("no stub"));
    /// ```
    pub fn with_http(mut self, url: impl Into<String>, status: u16, body: impl AsRef<[u8]>) -> Self {
        let response = crate::http::Response { status, headers: Vec::new(), body: body.as_ref().to_vec() };
        self.http.push((url.into(), response));
        self
    }

    /// Answers [`request`](crate::request)s on exactly `subject` with `data` (as another plugin's
    /// [`reply`](crate::reply) would). A request on a subject without a stub fails with
    /// [`RequestError::NoResponders`](crate::RequestError) (as the host says when nothing
    /// subscribes), and one outside the handler's `publishes` with `Denied`, as the host would.
    ///
    /// ```
    /// use plugbus_sdk::{Event, HandlerError, RequestError, handler, testing::TestHost};
    /// use std::time::Duration;
    ///
    /// #[handler(subscribe = ["orders.created"], publishes = ["fraud.score"])]
    /// fn screen(ev: Event) -> Result<(), HandlerError> {
    ///     match plugbus_sdk::request("fraud.score", ev.data(), Duration::from_secs(1)) {
    ///         Ok(score) if score.text()? == "high" => Err(HandlerError::reject("fraud")),
    ///         Ok(_) => Ok(()),
    ///         Err(RequestError::NoResponders(_)) => Ok(()), // no scorer deployed: let it through
    ///         Err(e) => Err(e.into()),
    ///     }
    /// }
    ///
    /// let high = TestHost::new().with_reply("fraud.score", "high").run(screen, Event::new("orders.created", ""));
    /// assert!(high.result.is_err());
    /// assert_eq!(TestHost::new().run(screen, Event::new("orders.created", "")).result, Ok(()));
    /// ```
    pub fn with_reply(mut self, subject: impl Into<String>, data: impl AsRef<[u8]>) -> Self {
        self.replies.push((subject.into(), data.as_ref().to_vec()));
        self
    }

    /// Sets an operator config value (`[plugins.NAME.config]`), read by
    /// [`config::get`](crate::config::get).
    ///
    /// ```
    /// let host = plugbus_sdk::testing::TestHost::new().with_config("sender", "ops@example.com");
    /// # let _ = host;
    /// ```
    pub fn with_config(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.insert(key.into(), value.into());
        self
    }

    /// Puts `value` under `key` in the store before the first run.
    ///
    /// ```
    /// let host = plugbus_sdk::testing::TestHost::new().with_kv("stock/widget", "3");
    /// assert_eq!(host.kv().get("stock/widget"), Some(&b"3"[..]));
    /// ```
    pub fn with_kv(mut self, key: impl Into<String>, value: impl AsRef<[u8]>) -> Self {
        self.kv.0.insert(key.into(), value.as_ref().to_vec());
        self
    }

    /// Puts `value` as JSON under `key`, as [`kv::set_json`](crate::kv::set_json) stores it.
    ///
    /// # Panics
    /// When `value` does not serialize to JSON.
    ///
    /// ```
    /// let host = plugbus_sdk::testing::TestHost::new().with_kv_json("stock/widget", &3u64);
    /// assert_eq!(host.kv().get_json::<u64>("stock/widget"), Some(3));
    /// ```
    pub fn with_kv_json<T: Serialize + ?Sized>(self, key: impl Into<String>, value: &T) -> Self {
        let key = key.into();
        let bytes =
            serde_json::to_vec(value).unwrap_or_else(|e| panic!("TestHost::with_kv_json({key:?}): not JSON: {e}"));
        self.with_kv(key, bytes)
    }

    /// Replaces the host's default [`Limits`], e.g. to test what a handler does at a cap.
    ///
    /// ```
    /// use plugbus_sdk::{Event, HandlerError, PublishError, handler, testing::{Limits, TestHost}};
    ///
    /// #[handler(subscribe = ["batch.ready"], publishes = ["items.>"])]
    /// fn fan_out(_ev: Event) -> Result<(), HandlerError> {
    ///     for i in 0..3 {
    ///         if let Err(PublishError::Limit(why)) = plugbus_sdk::publish(&format!("items.{i}"), b"") {
    ///             return Err(HandlerError::reject(why));
    ///         }
    ///     }
    ///     Ok(())
    /// }
    ///
    /// let mut host = TestHost::new().with_limits(Limits { max_publishes: 2, ..Limits::default() });
    /// let run = host.run(fan_out, Event::new("batch.ready", ""));
    /// assert!(run.result.unwrap_err().message().contains("publish limit of 2"));
    /// assert!(run.published.is_empty());
    /// ```
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.limits = limits;
        self
    }

    /// The store as it is now (the starting kv, plus every successful run's writes).
    ///
    /// ```
    /// let host = plugbus_sdk::testing::TestHost::new().with_kv("a", "1");
    /// assert_eq!(host.kv().len(), 1);
    /// ```
    pub fn kv(&self) -> &KvStore {
        &self.kv
    }

    /// Runs `handler` on `event` as the host runs one attempt, and says what came of it.
    ///
    /// `handler` is usually a `#[handler]` function, passed by name; a closure that calls one
    /// works too (`|ev| reserve(ev)`). A function without `#[handler]` has no `publishes`, so
    /// every publish it makes is denied, as it would be in a component.
    ///
    /// On `Ok`, the outputs are in [`Run::published`] and the kv writes are committed to this
    /// host's store; on `Err` (or a panic, which fails the attempt like a retry, or a refused
    /// publish, which rejects the event even if the handler carried on), nothing is published
    /// and the store is unchanged.
    ///
    /// # Panics
    /// When the test, not the handler, is wrong: the handler's manifest would be refused at
    /// load (a bad pattern, a system subject), the event's subject matches none of the
    /// handler's subscriptions (the host would never deliver it), or `run` is called from
    /// inside a running handler.
    ///
    /// ```
    /// use plugbus_sdk::{Event, HandlerError, handler, kv, testing::TestHost};
    ///
    /// #[handler(subscribe = ["payments.due"], publishes = ["payments.captured"])]
    /// fn capture(ev: Event) -> Result<(), HandlerError> {
    ///     kv::set("last", ev.id())?;
    ///     plugbus_sdk::publish("payments.captured", b"{}")?;
    ///     Err(HandlerError::retry("gateway timed out"))
    /// }
    ///
    /// let run = TestHost::new().with_kv("last", "e-0").run(capture, Event::new("payments.due", "").with_id("e-1"));
    /// assert_eq!(run.result, Err(HandlerError::retry("gateway timed out")));
    /// assert!(run.published.is_empty(), "a failed attempt releases no outputs");
    /// assert_eq!(run.kv_get("last"), Some(&b"e-0"[..]), "and commits no kv writes");
    /// ```
    pub fn run<F>(&mut self, handler: F, event: Event) -> Run
    where
        F: FnOnce(Event) -> Result<(), HandlerError>,
    {
        let subject = event.subject().to_string();
        if event.data().len() as u64 > self.limits.max_event_bytes {
            let why =
                format!("event of {} bytes is over the {}-byte limit", event.data().len(), self.limits.max_event_bytes);
            return Run {
                result: Err(HandlerError::reject(why)),
                published: Vec::new(),
                kv: self.kv.clone(),
                logs: Vec::new(),
                http_calls: Vec::new(),
                requests: Vec::new(),
                reply: None,
            };
        }
        let mut session = Session::new(self);
        session.reply_to = event.reply_to().map(str::to_string);
        session.subject = subject.clone();
        SESSION.with(|cell| {
            let mut slot = cell.borrow_mut();
            assert!(slot.is_none(), "TestHost::run was called inside a running handler");
            *slot = Some(session);
        });
        // Taken back out even if something below unwinds, so the next run starts clean.
        struct Clear;
        impl Drop for Clear {
            fn drop(&mut self) {
                let _ = SESSION.try_with(|cell| cell.borrow_mut().take());
            }
        }
        let clear = Clear;
        let outcome = catch_unwind(AssertUnwindSafe(|| handler(event)));
        let session = SESSION.with(|cell| cell.borrow_mut().take()).expect("the session of this run");
        drop(clear);

        if let Some(why) = &session.load_error {
            panic!("TestHost: the host would refuse this handler at load: {why}");
        }
        if let Some(declared) = &session.declared {
            let subscribed = declared.subscribe.iter().any(|p| Pattern::parse(p).is_ok_and(|p| p.matches(&subject)));
            assert!(
                subscribed,
                "TestHost: the event's subject {subject:?} matches none of {}'s subscriptions {:?}: the host would \
                 never deliver it to this handler",
                declared.name, declared.subscribe
            );
        }
        let result = match outcome {
            // A call past the copy limit ended the run, whatever the handler did with errors.
            _ if let Some(why) = &session.trapped => Err(HandlerError::retry(why.clone())),
            Ok(Err(e)) if e.message().len() as u64 > session.limits.hostcall_bytes() => {
                Err(HandlerError::retry(past_the_copy_limit(&session.limits)))
            }
            Ok(Ok(())) => match &session.refused {
                // A refused publish that the handler swallowed still fails the event: its outputs
                // are incomplete.
                Some(why) => Err(HandlerError::reject(format!("publish refused: {why}"))),
                None => Ok(()),
            },
            Ok(Err(e)) => Err(e),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a panic without a message".into());
                Err(HandlerError::retry(format!("handler panicked: {what}")))
            }
        };
        let Session { writes, outputs, logs, http_calls, requests, reply, .. } = session;
        let result = result.and_then(|()| self.kv.check_quota(&writes, self.limits.max_kv_bytes));
        let reply = if result.is_ok() { reply } else { None };
        let published = if result.is_ok() {
            for (key, value) in writes {
                match value {
                    Some(v) => self.kv.0.insert(key, v),
                    None => self.kv.0.remove(&key),
                };
            }
            outputs
        } else {
            Vec::new()
        };
        Run { result, published, kv: self.kv.clone(), logs, http_calls, requests, reply }
    }
}

/// What came of one [`TestHost::run`].
///
/// ```
/// use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
///
/// #[handler(subscribe = ["orders.created"], publishes = ["orders.seen"])]
/// fn seen(ev: Event) -> Result<(), HandlerError> {
///     plugbus_sdk::log::info(format!("saw {}", ev.id()));
///     plugbus_sdk::kv::set("last", ev.id())?;
///     plugbus_sdk::publish_json("orders.seen", &serde_json::json!({ "id": ev.id() }))?;
///     Ok(())
/// }
///
/// let run = TestHost::new().run(seen, Event::new("orders.created", "").with_id("o-1"));
/// assert_eq!(run.result, Ok(()));
/// assert_eq!(run.published.len(), 1);
/// assert_eq!(run.kv_get("last"), Some(&b"o-1"[..]));
/// assert_eq!(run.logs[0].message, "saw o-1");
/// ```
#[derive(Debug, Clone)]
pub struct Run {
    /// What the handler returned; `Err` too when it panicked (a retry, as the host counts a
    /// trap), when the host refused one of its publishes (a reject, even if the handler went on)
    /// or when the event was over `max_event_bytes` (a reject; the handler did not run).
    pub result: Result<(), HandlerError>,
    /// The outputs the host would release, in publish order; empty when `result` is `Err`.
    pub published: Vec<Published>,
    /// The store after the run: the starting store plus this run's writes when `result` is
    /// `Ok`, the starting store unchanged otherwise.
    pub kv: KvStore,
    /// What the handler logged, in order (kept even when it failed, as the host logs it).
    pub logs: Vec<LogLine>,
    /// The outbound HTTP requests it made, in order (refused ones included).
    pub http_calls: Vec<crate::http::Request>,
    /// The [`request`](crate::request)s it sent, in order (refused ones are not here): unlike
    /// outputs, a request goes out during the attempt, so they are kept even when it failed.
    pub requests: Vec<Published>,
    /// Its [`reply`](crate::reply) (on the subject it handled), released only when `result` is `Ok`.
    pub reply: Option<Published>,
}

impl Run {
    /// The value under `key` in the store after the run.
    ///
    /// ```
    /// # use plugbus_sdk::{Event, testing::TestHost};
    /// let run = TestHost::new().with_kv("a", "1").run(|_| Ok(()), Event::new("x", ""));
    /// assert_eq!(run.kv_get("a"), Some(&b"1"[..]));
    /// ```
    pub fn kv_get(&self, key: &str) -> Option<&[u8]> {
        self.kv.get(key)
    }

    /// The JSON value under `key` in the store after the run.
    ///
    /// # Panics
    /// When the value is not the JSON asked for.
    ///
    /// ```
    /// # use plugbus_sdk::{Event, testing::TestHost};
    /// let run = TestHost::new().with_kv_json("n", &7u64).run(|_| Ok(()), Event::new("x", ""));
    /// assert_eq!(run.kv_get_json::<u64>("n"), Some(7));
    /// ```
    pub fn kv_get_json<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        self.kv.get_json(key)
    }
}

/// One output the handler published.
///
/// ```
/// use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
///
/// #[handler(subscribe = ["a.b"], publishes = ["c.>"])]
/// fn fwd(ev: Event) -> Result<(), HandlerError> {
///     plugbus_sdk::publish_with_headers("c.d", ev.data(), &[("tenant", "acme")])?;
///     Ok(())
/// }
///
/// let run = TestHost::new().run(fwd, Event::new("a.b", "hello"));
/// let out = &run.published[0];
/// assert_eq!((out.subject.as_str(), out.text()), ("c.d", "hello"));
/// assert_eq!(out.header("tenant"), Some("acme"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// Where it goes.
    pub subject: String,
    /// The payload.
    pub data: Vec<u8>,
    /// Its headers as the handler gave them (`publish_json` adds
    /// `datacontenttype: application/json`).
    pub headers: Vec<(String, String)>,
}

impl Published {
    /// The payload parsed as JSON.
    ///
    /// # Panics
    /// When it is not the JSON asked for (the message names the subject and shows the data).
    ///
    /// ```
    /// # use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
    /// # #[handler(subscribe = ["a"], publishes = ["b"])]
    /// # fn h(_ev: Event) -> Result<(), HandlerError> { Ok(plugbus_sdk::publish_json("b", &serde_json::json!({"n": 1}))?) }
    /// let run = TestHost::new().run(h, Event::new("a", ""));
    /// assert_eq!(run.published[0].json::<serde_json::Value>()["n"], 1);
    /// ```
    pub fn json<T: DeserializeOwned>(&self) -> T {
        serde_json::from_slice(&self.data).unwrap_or_else(|e| {
            panic!(
                "the output on {:?} is not the JSON asked for: {e}; its data: {}",
                self.subject,
                String::from_utf8_lossy(&self.data)
            )
        })
    }

    /// The payload as UTF-8 text.
    ///
    /// # Panics
    /// When it is not UTF-8.
    ///
    /// ```
    /// # use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
    /// # #[handler(subscribe = ["a"], publishes = ["b"])]
    /// # fn h(_ev: Event) -> Result<(), HandlerError> { Ok(plugbus_sdk::publish("b", "hi")?) }
    /// let run = TestHost::new().run(h, Event::new("a", ""));
    /// assert_eq!(run.published[0].text(), "hi");
    /// ```
    pub fn text(&self) -> &str {
        std::str::from_utf8(&self.data).unwrap_or_else(|e| panic!("the output on {:?} is not UTF-8: {e}", self.subject))
    }

    /// A header by case-insensitive name (the first when it repeats).
    ///
    /// ```
    /// # use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
    /// # #[handler(subscribe = ["a"], publishes = ["b"])]
    /// # fn h(_ev: Event) -> Result<(), HandlerError> { Ok(plugbus_sdk::publish_json("b", &1)?) }
    /// let run = TestHost::new().run(h, Event::new("a", ""));
    /// assert_eq!(run.published[0].header("DataContentType"), Some("application/json"));
    /// ```
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
}

/// One line the handler logged.
///
/// ```
/// use plugbus_sdk::{log::Level, testing::LogLine};
/// let line = LogLine { level: Level::Warn, message: "stock low".into() };
/// assert_eq!(line.to_string(), "WARN stock low");
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// Its severity.
    pub level: Level,
    /// Its text.
    pub message: String,
}

impl fmt::Display for LogLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.level, self.message)
    }
}

/// A plugin's kv store as the test host keeps it: keys to bytes, in key order.
///
/// Compare two with `==`, e.g. to check that a failed run left the store as it was.
///
/// ```
/// use plugbus_sdk::testing::TestHost;
/// let host = TestHost::new().with_kv("b", "2").with_kv_json("a", &1);
/// let keys: Vec<&str> = host.kv().iter().map(|(k, _)| k).collect();
/// assert_eq!(keys, ["a", "b"]);
/// ```
#[derive(Clone, Default, PartialEq, Eq)]
pub struct KvStore(BTreeMap<String, Vec<u8>>);

/// What an entry counts against `max_kv_bytes`: its key, its value and 64 bytes more.
fn stored_cost(key: &str, value: &[u8]) -> u64 {
    (key.len() + value.len()) as u64 + 64
}

impl KvStore {
    /// Whether `writes` may commit to a store bound to `limit` bytes (see
    /// [`Limits::max_kv_bytes`]); the host's words when not.
    fn check_quota(&self, writes: &BTreeMap<String, Option<Vec<u8>>>, limit: u64) -> Result<(), HandlerError> {
        let holds: u64 = self.0.iter().map(|(k, v)| stored_cost(k, v)).sum();
        let (mut gained, mut freed) = (0, 0);
        for (key, value) in writes {
            freed += self.0.get(key).map_or(0, |old| stored_cost(key, old));
            gained += value.as_ref().map_or(0, |v| stored_cost(key, v));
        }
        let after = (holds + gained).saturating_sub(freed);
        if after > limit && after > holds {
            return Err(HandlerError::retry(format!(
                "the kv would hold {after} bytes, over its max_kv_bytes of {limit} (it holds {holds}; each key counts \
                 its key, its value and 64 bytes more)"
            )));
        }
        Ok(())
    }

    /// The value under `key`.
    ///
    /// ```
    /// let host = plugbus_sdk::testing::TestHost::new().with_kv("a", "1");
    /// assert_eq!(host.kv().get("a"), Some(&b"1"[..]));
    /// assert_eq!(host.kv().get("b"), None);
    /// ```
    pub fn get(&self, key: &str) -> Option<&[u8]> {
        self.0.get(key).map(Vec::as_slice)
    }

    /// The JSON value under `key`.
    ///
    /// # Panics
    /// When the value is not the JSON asked for (the message names the key and shows it).
    ///
    /// ```
    /// let host = plugbus_sdk::testing::TestHost::new().with_kv_json("a", &[1, 2]);
    /// assert_eq!(host.kv().get_json::<Vec<u8>>("a"), Some(vec![1, 2]));
    /// ```
    pub fn get_json<T: DeserializeOwned>(&self, key: &str) -> Option<T> {
        let bytes = self.0.get(key)?;
        Some(serde_json::from_slice(bytes).unwrap_or_else(|e| {
            panic!(
                "kv value under {key:?} is not the JSON asked for: {e}; its value: {}",
                String::from_utf8_lossy(bytes)
            )
        }))
    }

    /// Every key and value, in key order.
    ///
    /// ```
    /// let host = plugbus_sdk::testing::TestHost::new().with_kv("a", "1");
    /// assert_eq!(host.kv().iter().count(), 1);
    /// ```
    pub fn iter(&self) -> impl Iterator<Item = (&str, &[u8])> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_slice()))
    }

    /// How many keys the store holds.
    ///
    /// ```
    /// assert_eq!(plugbus_sdk::testing::TestHost::new().kv().len(), 0);
    /// ```
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the store is empty.
    ///
    /// ```
    /// assert!(plugbus_sdk::testing::TestHost::new().kv().is_empty());
    /// ```
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Values shown as text where they are UTF-8 (kv values are mostly JSON), else as bytes.
impl fmt::Debug for KvStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut map = f.debug_map();
        for (k, v) in &self.0 {
            match std::str::from_utf8(v) {
                Ok(text) => map.entry(k, &text),
                Err(_) => map.entry(k, v),
            };
        }
        map.finish()
    }
}

/// `text`, or its first `limit` bytes saying where it was cut (the host's `event::cut_to`).
fn cut_to(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… [cut at {end} of {} bytes]", &text[..end], text.len())
}

/// `text` quoted like `{:?}`, cut after [`ECHO_BYTES`] bytes, as the host echoes untrusted text.
fn quoted(text: &str) -> String {
    if text.len() <= ECHO_BYTES {
        return format!("{text:?}");
    }
    let mut end = ECHO_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{:?}… (cut at {end} of {} bytes)", &text[..end], text.len())
}

/// Whether a plugin may not set the output header `name` (the host's `is_reserved_header`).
fn is_reserved_header(name: &str) -> bool {
    const CORE_ATTRIBUTES: &[&str] = &["id", "source", "type", "time", "specversion", "subject", "datacontenttype"];
    let lower = name.to_ascii_lowercase();
    if lower == "datacontenttype" || lower == "content-type" {
        return false;
    }
    let base = lower.strip_prefix("ce-").or_else(|| lower.strip_prefix("ce_")).unwrap_or(&lower);
    ["plugbus-", "plugbus_", "nats-", "nats_"].iter().any(|p| base.starts_with(p))
        || CORE_ATTRIBUTES.contains(&base)
        // where the CloudEvents JSON format keeps the data
        || base == "data"
        || base == "data_base64"
}

/// The host's checks of one header of an output, a request or a reply (`check_headers`): its
/// name, a content type it may carry, a value on one line.
fn check_header(name: &str, value: &str) -> Result<(), PublishError> {
    check_header_name(name)?;
    check_content_type(name, value)?;
    if value.contains(['\r', '\n', '\0']) {
        return Err(PublishError::Invalid(format!(
            "header {} has a value with a line break or NUL: {} (a header value is one line)",
            quoted(name),
            quoted(value)
        )));
    }
    Ok(())
}

/// The host's `check_content_type`: at most 1,024 bytes, no control characters, and never a
/// CloudEvents envelope (its receivers would read the data as the event).
fn check_content_type(name: &str, value: &str) -> Result<(), PublishError> {
    const MAX_ATTRIBUTE_BYTES: usize = 1024;
    const ENVELOPE: &str = "application/cloudevents";
    if !(name.eq_ignore_ascii_case("content-type") || name.eq_ignore_ascii_case("datacontenttype")) {
        return Ok(());
    }
    if value.len() > MAX_ATTRIBUTE_BYTES || value.chars().any(char::is_control) {
        return Err(PublishError::Invalid(format!(
            "header {name} {} is not a content type an event may carry: at most {MAX_ATTRIBUTE_BYTES} bytes, no \
             control characters",
            quoted(value)
        )));
    }
    if value.trim_start().get(..ENVELOPE.len()).is_some_and(|p| p.eq_ignore_ascii_case(ENVELOPE)) {
        return Err(PublishError::Denied(format!(
            "header {name} {} is reserved: an output's data cannot be a CloudEvents envelope (its receivers \
             would read the data as the event)",
            quoted(value)
        )));
    }
    Ok(())
}

fn check_header_name(name: &str) -> Result<(), PublishError> {
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if name.is_empty() || name.len() > MAX_SUBJECT_BYTES || !name.bytes().all(token) {
        return Err(PublishError::Invalid(format!(
            "header name {} is not a valid header name (letters, digits and !#$%&'*+-.^_`|~, at most \
             {MAX_SUBJECT_BYTES} bytes)",
            quoted(name)
        )));
    }
    if is_reserved_header(name) {
        return Err(PublishError::Denied(format!(
            "header {} is reserved: the host sets plugbus-*, nats-* and the CloudEvents attributes \
             (id, source, type, time, specversion, subject; datacontenttype only without a prefix; data \
             and data_base64 hold the data)",
            quoted(name)
        )));
    }
    Ok(())
}

/// The plugin names the host accepts (`manifest::valid_plugin_name`).
fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The most patterns a manifest may list in `subscribe` or `publishes` (`manifest::MAX_PATTERNS`).
const MAX_PATTERNS: usize = 256;
/// The most `outbound` destinations a manifest may list (`Manifest::validate_outbound`).
const MAX_OUTBOUND: usize = 64;
/// The longest version or header name a manifest may declare (`manifest::MAX_LABEL_LEN`).
const MAX_LABEL_LEN: usize = 128;

/// Why the host refuses `label` as a version or a header name (`manifest::check_label`).
fn label_error(label: &str) -> Option<String> {
    if label.len() > MAX_LABEL_LEN {
        return Some(format!("is {} bytes, over {MAX_LABEL_LEN}", label.len()));
    }
    let spaced = label.chars().any(|c| c.is_whitespace() || c.is_control());
    spaced.then(|| format!("{} has spaces or control characters", quoted(label)))
}

/// Why the host refuses `queue_group` in the manifest of plugin `name`: only `plugbus.<name>` or
/// a group under it is the plugin's own (`Manifest::bind`; `-` and `_` in the name are one).
fn queue_group_error(name: &str, queue_group: &str) -> Option<String> {
    if queue_group.is_empty()
        || queue_group.len() > MAX_LABEL_LEN
        || queue_group.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Some("must be 1-128 bytes with no spaces or control characters".into());
    }
    // The file's name is the plugin's: `order-handler` may be deployed as `order_handler.wasm`.
    let agrees = |plugin: &str| plugin.replace('-', "_") == name.replace('-', "_");
    let own = queue_group.strip_prefix("plugbus.").is_some_and(|rest| match rest.split_once('.') {
        None => agrees(rest),
        Some((plugin, suffix)) => agrees(plugin) && !suffix.is_empty(),
    });
    (!own).then(|| {
        format!(
            "is not this plugin's: a manifest may only use \"plugbus.{name}\" or a group under it \
             (plugbus.{name}.<suffix>); the operator sets any other with `[plugins.{name}] queue_group`"
        )
    })
}

/// Why the host refuses the `outbound` destination `rule` (`outbound::Rule::parse`):
/// `http(s)://host[:port|:*]`, a trailing `/` allowed, nothing else.
fn outbound_error(rule: &str) -> Option<&'static str> {
    let Some((scheme, rest)) = rule.split_once("://") else { return Some("no scheme") };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return Some("the scheme must be http or https");
    }
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.is_empty() || rest.contains(['/', '?', '#', '@']) || rest.chars().any(char::is_whitespace) {
        return Some("only scheme, host and port, no path, query or user");
    }
    let (host, port) = match rest.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((host, "")) => (host, None),
            Some((host, after)) => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Some("bad host or port"),
            },
            None => return Some("bad host or port"),
        },
        None => match rest.split_once(':') {
            Some((host, port)) if !host.is_empty() && !port.contains(':') => (host, Some(port)),
            Some(_) => return Some("bad host or port"),
            None => (rest, None),
        },
    };
    match port {
        _ if host.is_empty() => Some("bad host or port"),
        Some(p) if p != "*" && p.parse::<u16>().is_err() => Some("bad port"),
        _ => None,
    }
}

/// What the host would say at load about a declared manifest, if it refused it.
fn load_error(d: &Declared) -> Option<String> {
    if !valid_plugin_name(d.name) {
        return Some(format!(
            "manifest field `name` {:?} must be 1-64 characters of a-z, A-Z, 0-9, '-' or '_'",
            d.name
        ));
    }
    if let Some(why) = label_error(d.version) {
        return Some(format!("manifest field `version` {why}"));
    }
    if d.subscribe.is_empty() {
        return Some("manifest field `subscriptions` is empty: the plugin would never run".into());
    }
    for (field, count) in [("subscriptions", d.subscribe.len()), ("publishes", d.publishes.len())] {
        if count > MAX_PATTERNS {
            return Some(format!("manifest field `{field}` lists {count} patterns, over {MAX_PATTERNS}"));
        }
    }
    if let Some(q) = d.queue_group
        && let Some(why) = queue_group_error(d.name, q)
    {
        return Some(format!("manifest field `queue-group` {} {why}", quoted(q)));
    }
    if let Some(h) = d.order_by_header {
        let why = if h.is_empty() { Some("names an empty header".to_string()) } else { label_error(h) };
        if let Some(why) = why {
            return Some(format!("manifest field `order-by` header name {why}"));
        }
    }
    if d.outbound.len() > MAX_OUTBOUND {
        return Some(format!("manifest field `outbound` lists {} destinations, over {MAX_OUTBOUND}", d.outbound.len()));
    }
    for (i, rule) in d.outbound.iter().enumerate() {
        if let Some(why) = outbound_error(rule) {
            return Some(format!("manifest field `outbound[{i}]`: {}: {why}", quoted(rule)));
        }
    }
    for (field, list) in [("subscriptions", d.subscribe), ("publishes", d.publishes)] {
        for (i, raw) in list.iter().enumerate() {
            match Pattern::parse(raw) {
                Err(e) => return Some(format!("manifest field `{field}[{i}]`: {e}")),
                Ok(p) if p.reaches_system() => {
                    return Some(format!(
                        "manifest field `{field}[{i}]` {raw:?} names a system subject (one starting with `$` or \
                         `_INBOX` is the broker's, never a plugin's)"
                    ));
                }
                Ok(_) => {}
            }
        }
    }
    None
}

/// The state of the run in progress on this thread.
struct Session {
    declared: Option<Declared>,
    publishes: Vec<Pattern>,
    load_error: Option<String>,
    limits: Limits,
    config: HashMap<String, String>,
    store: KvStore,
    /// Key → new value (`None`: deleted), committed on `Ok`.
    writes: BTreeMap<String, Option<Vec<u8>>>,
    /// Keys read from the store.
    reads: BTreeSet<String>,
    /// Reads sent to the store (a key read again counted again).
    store_reads: u64,
    /// Bytes `reads` and `writes` hold, as the host charges them.
    held: u64,
    /// Bytes of values read from the store.
    read_bytes: u64,
    outputs: Vec<Published>,
    output_bytes: u64,
    refused: Option<String>,
    /// The host's words for a call past [`Limits::hostcall_bytes`]: the run ended there.
    trapped: Option<String>,
    logs: Vec<LogLine>,
    log_bytes: u64,
    http: Vec<(String, crate::http::Response)>,
    http_calls: Vec<crate::http::Request>,
    replies: Vec<(String, Vec<u8>)>,
    requests: Vec<Published>,
    /// The reply-to of the event being run.
    reply_to: Option<String>,
    reply: Option<Published>,
    subject: String,
}

thread_local! {
    static SESSION: RefCell<Option<Session>> = const { RefCell::new(None) };
}

impl Session {
    fn new(host: &TestHost) -> Self {
        Self {
            declared: None,
            publishes: Vec::new(),
            load_error: None,
            limits: host.limits.clone(),
            config: host.config.clone(),
            store: host.kv.clone(),
            writes: BTreeMap::new(),
            reads: BTreeSet::new(),
            store_reads: 0,
            held: 0,
            read_bytes: 0,
            outputs: Vec::new(),
            output_bytes: 0,
            refused: None,
            trapped: None,
            logs: Vec::new(),
            log_bytes: 0,
            http: host.http.clone(),
            http_calls: Vec::new(),
            replies: host.replies.clone(),
            requests: Vec::new(),
            reply_to: None,
            reply: None,
            subject: String::new(),
        }
    }

    fn refuse(&mut self, err: PublishError) -> Result<(), PublishError> {
        let (PublishError::Denied(why) | PublishError::Limit(why) | PublishError::Invalid(why)) = &err;
        self.refused = Some(why.clone());
        Err(err)
    }

    /// The host's subject checks for a publish or a request.
    fn check_subject(&self, subject: &str) -> Result<(), PublishError> {
        if subject.len() > MAX_SUBJECT_BYTES {
            let why = format!("subject {} is longer than {MAX_SUBJECT_BYTES} bytes", quoted(subject));
            return Err(PublishError::Invalid(why));
        }
        if let Err(e) = validate_subject(subject) {
            return Err(PublishError::Invalid(e));
        }
        if is_system_subject(subject) {
            return Err(PublishError::Denied(format!("{} is a system subject", quoted(subject))));
        }
        if is_dead_letter_subject(subject) {
            return Err(PublishError::Denied(format!(
                "{} is a dead-letter subject: the host alone publishes under `plugbus.dlq.`",
                quoted(subject)
            )));
        }
        if !self.publishes.iter().any(|p| p.matches(subject)) {
            let allowed: Vec<&str> = self.publishes.iter().map(Pattern::as_str).collect();
            let hint = if self.declared.is_none() {
                " (the function TestHost ran is not a #[handler]: only `publishes = [..]` allows a subject)"
            } else {
                ""
            };
            let why = format!("{} is not in the manifest's publishes {allowed:?}{hint}", quoted(subject));
            return Err(PublishError::Denied(why));
        }
        Ok(())
    }

    /// The host's `rpc::request`, check for check; the reply is the stub for the subject.
    fn request(
        &mut self,
        subject: &str,
        data: &[u8],
        headers: &[(String, String)],
        timeout_ms: u64,
    ) -> Result<Event, crate::RequestError> {
        use crate::RequestError;
        let as_request = |e: PublishError| match e {
            PublishError::Denied(m) => RequestError::Denied(m),
            PublishError::Limit(m) => RequestError::Limit(m),
            PublishError::Invalid(m) => RequestError::Invalid(m),
        };
        self.check_subject(subject).map_err(as_request)?;
        if self.requests.len() as u64 >= u64::from(self.limits.max_requests) {
            return Err(RequestError::Limit(format!(
                "request limit of {} per event reached",
                self.limits.max_requests
            )));
        }
        if headers.len() as u64 > u64::from(self.limits.max_headers) {
            let why =
                format!("header limit of {} per output reached ({} given)", self.limits.max_headers, headers.len());
            return Err(RequestError::Limit(why));
        }
        for (name, value) in headers {
            check_header(name, value).map_err(as_request)?;
        }
        let size = (subject.len() + data.len()) as u64
            + ENTRY_COST
            + headers.iter().map(|(k, v)| (k.len() + v.len()) as u64 + ENTRY_COST).sum::<u64>();
        if self.output_bytes + size > self.limits.max_output_bytes {
            let why = format!(
                "output limit of {} bytes per event reached (requests count in it)",
                self.limits.max_output_bytes
            );
            return Err(RequestError::Limit(why));
        }
        self.output_bytes += size;
        self.requests.push(Published { subject: subject.to_string(), data: data.to_vec(), headers: headers.to_vec() });
        if timeout_ms == 0 {
            return Err(RequestError::Timeout(format!("no reply on {subject} within 0s")));
        }
        match self.replies.iter().find(|(s, _)| s == subject) {
            Some((_, reply)) if reply.len() as u64 > self.limits.max_reply_bytes => Err(RequestError::Limit(format!(
                "the reply on {} is {} bytes, over max_reply_bytes ({})",
                quoted(subject),
                reply.len(),
                self.limits.max_reply_bytes
            ))),
            Some((_, reply)) => Ok(Event::new(subject, reply.clone()).with_source("plugbus-sdk/test-reply")),
            None => Err(RequestError::NoResponders(format!(
                "no responders: nothing subscribes to {subject} (no TestHost::with_reply stub for it)"
            ))),
        }
    }

    /// The host's `rpc::reply`, check for check.
    fn reply(&mut self, reply_to: &str, data: &[u8], headers: &[(String, String)]) -> Result<(), crate::ReplyError> {
        use crate::ReplyError;
        match &self.reply_to {
            None => {
                return Err(ReplyError::Denied(
                    "the event being handled has no reply-to: nobody asked for a reply".into(),
                ));
            }
            Some(token) if token != reply_to => {
                return Err(ReplyError::Denied(format!(
                    "{} is not the reply-to of the event being handled (a reply goes only to the request this \
                     attempt handles)",
                    quoted(reply_to)
                )));
            }
            Some(_) => {}
        }
        if self.reply.is_some() {
            return Err(ReplyError::Limit("this attempt already replied (one reply per event)".into()));
        }
        if headers.len() as u64 > u64::from(self.limits.max_headers) {
            let why =
                format!("header limit of {} per output reached ({} given)", self.limits.max_headers, headers.len());
            return Err(ReplyError::Limit(why));
        }
        for (name, value) in headers {
            check_header(name, value).map_err(|e| match e {
                PublishError::Denied(m) => ReplyError::Denied(m),
                PublishError::Limit(m) => ReplyError::Limit(m),
                PublishError::Invalid(m) => ReplyError::Invalid(m),
            })?;
        }
        let size = data.len() as u64
            + ENTRY_COST
            + headers.iter().map(|(k, v)| (k.len() + v.len()) as u64 + ENTRY_COST).sum::<u64>();
        if self.output_bytes + size > self.limits.max_output_bytes {
            let why = format!(
                "output limit of {} bytes per event reached (the reply counts in it)",
                self.limits.max_output_bytes
            );
            return Err(ReplyError::Limit(why));
        }
        self.output_bytes += size;
        self.reply = Some(Published { subject: self.subject.clone(), data: data.to_vec(), headers: headers.to_vec() });
        Ok(())
    }

    /// The host's `bus::publish`, check for check.
    fn publish(&mut self, subject: &str, data: &[u8], headers: &[(String, String)]) -> Result<(), PublishError> {
        if let Err(e) = self.check_subject(subject) {
            return self.refuse(e);
        }
        let limits = &self.limits;
        if self.outputs.len() as u64 >= u64::from(limits.max_publishes) {
            let why = format!("publish limit of {} per event reached", limits.max_publishes);
            return self.refuse(PublishError::Limit(why));
        }
        if headers.len() as u64 > u64::from(limits.max_headers) {
            let why = format!("header limit of {} per output reached ({} given)", limits.max_headers, headers.len());
            return self.refuse(PublishError::Limit(why));
        }
        for (name, value) in headers {
            if let Err(e) = check_header(name, value) {
                return self.refuse(e);
            }
        }
        let size = (subject.len() + data.len()) as u64
            + ENTRY_COST
            + headers.iter().map(|(k, v)| (k.len() + v.len()) as u64 + ENTRY_COST).sum::<u64>();
        if self.output_bytes + size > self.limits.max_output_bytes {
            let why = format!("output limit of {} bytes per event reached", self.limits.max_output_bytes);
            return self.refuse(PublishError::Limit(why));
        }
        self.output_bytes += size;
        self.outputs.push(Published { subject: subject.to_string(), data: data.to_vec(), headers: headers.to_vec() });
        Ok(())
    }

    fn check_kv_size(&self, key: &str, value: usize) -> Result<(), KvError> {
        if key.len() > MAX_KV_KEY_BYTES {
            return Err(KvError::TooLarge(format!(
                "kv key {:?}: {} bytes over the {MAX_KV_KEY_BYTES}-byte cap on keys",
                cut_to(key, 64),
                key.len()
            )));
        }
        let cap = self.limits.max_kv_value_bytes;
        if key.len() as u64 > cap || value as u64 > cap {
            return Err(KvError::TooLarge(format!(
                "key {}: {} bytes over the {cap}-byte cap",
                quoted(key),
                key.len().max(value)
            )));
        }
        Ok(())
    }

    fn check_kv_held(&self, held: u64) -> Result<(), KvError> {
        let cap = self.limits.max_kv_write_bytes;
        if held > cap {
            return Err(KvError::TooLarge(format!(
                "kv limit of {cap} bytes per event reached (keys and values written and keys read, {ENTRY_COST} \
                 bytes more per key)"
            )));
        }
        Ok(())
    }

    fn held_after_write(&self, key: &str, value: Option<usize>) -> u64 {
        let cost = |v: Option<usize>| (key.len() + v.unwrap_or(0)) as u64 + ENTRY_COST;
        let old = self.writes.get(key).map_or(0, |v| cost(v.as_ref().map(Vec::len)));
        self.held - old + cost(value)
    }

    fn check_kv_write(&self, key: &str, value: Option<usize>) -> Result<u64, KvError> {
        self.check_kv_size(key, value.unwrap_or(0))?;
        if !self.writes.contains_key(key) && self.writes.len() as u64 >= u64::from(self.limits.max_kv_writes) {
            return Err(KvError::TooLarge(format!(
                "kv write limit of {} keys per event reached (key {})",
                self.limits.max_kv_writes,
                quoted(key)
            )));
        }
        let held = self.held_after_write(key, value);
        self.check_kv_held(held)?;
        Ok(held)
    }

    fn kv_get(&mut self, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        self.check_kv_size(key, 0)?;
        if let Some(written) = self.writes.get(key) {
            return Ok(written.clone());
        }
        // Every read of the store counts, a key read again too, as on the host.
        if self.store_reads >= u64::from(self.limits.max_kv_reads) {
            return Err(KvError::TooLarge(format!(
                "kv read limit of {} reads per event reached (key {}; a key read again is read again)",
                self.limits.max_kv_reads,
                quoted(key)
            )));
        }
        self.store_reads += 1;
        if !self.reads.contains(key) {
            self.check_kv_held(self.held + key.len() as u64 + ENTRY_COST)?;
            self.held += key.len() as u64 + ENTRY_COST;
            self.reads.insert(key.to_string());
        }
        let value = self.store.get(key).map(<[u8]>::to_vec);
        self.read_bytes += value.as_ref().map_or(0, |v| v.len() as u64);
        if self.read_bytes > self.limits.max_kv_read_bytes {
            return Err(KvError::TooLarge(format!(
                "kv read limit of {} bytes per event reached (key {})",
                self.limits.max_kv_read_bytes,
                quoted(key)
            )));
        }
        Ok(value)
    }

    fn kv_write(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), KvError> {
        self.held = self.check_kv_write(key, value.map(<[u8]>::len))?;
        self.writes.insert(key.to_string(), value.map(<[u8]>::to_vec));
        Ok(())
    }

    fn log(&mut self, level: Level, message: &str) {
        self.log_bytes += message.len() as u64;
        if self.log_bytes > self.limits.max_log_bytes {
            return;
        }
        self.logs.push(LogLine { level, message: message.to_string() });
    }
}

impl Session {
    fn http_send(&mut self, req: &crate::http::Request) -> Result<crate::http::Response, crate::http::HttpError> {
        use crate::http::HttpError;
        self.http_calls.push(req.clone());
        let origin = origin_of(&req.url);
        if let Some(d) = &self.declared
            && !d.outbound.iter().any(|o| origin_allows(o, &origin))
        {
            return Err(HttpError::Refused {
                reason: format!("{origin} is not in the plugin's manifest `outbound` list"),
            });
        }
        match self.http.iter().find(|(url, _)| *url == req.url) {
            Some((_, r)) => Ok(r.clone()),
            None => Err(HttpError::Refused {
                reason: format!("no stub for {} {} (TestHost::with_http)", req.method, req.url),
            }),
        }
    }
}

/// `scheme://host:port` of a URL (the default port filled in).
fn origin_of(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let authority = rest.split(['/', '?']).next().unwrap_or(rest).to_ascii_lowercase();
    let has_port = authority.rsplit_once(':').is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()));
    if has_port {
        format!("{scheme}://{authority}")
    } else {
        format!("{scheme}://{authority}:{}", if scheme == "https" { 443 } else { 80 })
    }
}

/// Whether the `outbound` entry `rule` allows `origin` (from [`origin_of`]).
fn origin_allows(rule: &str, origin: &str) -> bool {
    let rule = rule.trim_end_matches('/');
    match rule.strip_suffix(":*") {
        Some(prefix) => origin.rsplit_once(':').is_some_and(|(o, _)| o == prefix.to_ascii_lowercase()),
        None => origin_of(rule) == origin,
    }
}

/// Records the manifest of the `#[handler]` being run (the first one called wins).
pub(crate) fn declare(declared: Declared) {
    SESSION.with(|cell| {
        if let Some(session) = cell.borrow_mut().as_mut()
            && session.declared.is_none()
        {
            session.load_error = load_error(&declared);
            session.publishes = declared.publishes.iter().filter_map(|p| Pattern::parse(p).ok()).collect();
            session.declared = Some(declared);
        }
    });
}

fn with_session<R>(call: &str, f: impl FnOnce(&mut Session) -> R) -> R {
    SESSION.with(|cell| match cell.borrow_mut().as_mut() {
        Some(session) => f(session),
        None => panic!(
            "{call} was called outside TestHost::run: on the native target the SDK's host calls go to the \
             TestHost running the handler on this thread; run it with \
             `plugbus_sdk::testing::TestHost::new().run(handler, event)`"
        ),
    })
}

/// What the host says of a call past the per-call copy limit (`Limits::hostcall_bytes`).
fn past_the_copy_limit(limits: &Limits) -> String {
    format!(
        "the handler passed more than {} bytes to the host in one call (the per-call copy limit, \
         from max_output_bytes / max_kv_value_bytes / max_log_bytes)",
        limits.hostcall_bytes()
    )
}

/// What the host's per-call copy limit charges a header on top of its bytes (wasmtime's charge
/// for one element of a list of string pairs).
const HOSTCALL_ENTRY_BYTES: usize = 48;

/// The bytes a call passes to the host: its strings and byte lists, and each header's entry.
fn call_bytes(parts: &[&[u8]], headers: &[(String, String)]) -> u64 {
    let headers: usize = headers.iter().map(|(k, v)| k.len() + v.len() + HOSTCALL_ENTRY_BYTES).sum();
    (parts.iter().map(|p| p.len()).sum::<usize>() + headers) as u64
}

/// The native side of the SDK's host calls (see `crate::host`).
pub(crate) mod calls {
    use super::{call_bytes, with_session};
    use crate::{PublishError, kv::KvError, log::Level};

    /// `f` on the session, unless the call passes more than the host copies in one call: then
    /// the run ends there, as the host's trap ends the attempt (unwinding without the panic
    /// hook's message; `TestHost::run` makes it a retry with the host's words).
    fn within_copy_limit<R>(call: &str, bytes: u64, f: impl FnOnce(&mut super::Session) -> R) -> R {
        with_session(call, |s| {
            if bytes > s.limits.hostcall_bytes() {
                s.trapped = Some(super::past_the_copy_limit(&s.limits));
                std::panic::resume_unwind(Box::new(()));
            }
            f(s)
        })
    }

    pub(crate) fn publish(subject: &str, data: &[u8], headers: &[(String, String)]) -> Result<(), PublishError> {
        let bytes = call_bytes(&[subject.as_bytes(), data], headers);
        within_copy_limit("plugbus_sdk::publish", bytes, |s| s.publish(subject, data, headers))
    }

    pub(crate) fn kv_get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
        within_copy_limit("plugbus_sdk::kv::get", key.len() as u64, |s| s.kv_get(key))
    }

    pub(crate) fn kv_set(key: &str, value: &[u8]) -> Result<(), KvError> {
        let bytes = call_bytes(&[key.as_bytes(), value], &[]);
        within_copy_limit("plugbus_sdk::kv::set", bytes, |s| s.kv_write(key, Some(value)))
    }

    pub(crate) fn kv_delete(key: &str) -> Result<(), KvError> {
        within_copy_limit("plugbus_sdk::kv::delete", key.len() as u64, |s| s.kv_write(key, None))
    }

    pub(crate) fn request(
        subject: &str,
        data: &[u8],
        headers: &[(String, String)],
        timeout_ms: u64,
    ) -> Result<crate::Event, crate::RequestError> {
        let bytes = call_bytes(&[subject.as_bytes(), data], headers);
        within_copy_limit("plugbus_sdk::request", bytes, |s| s.request(subject, data, headers, timeout_ms))
    }

    pub(crate) fn reply(reply_to: &str, data: &[u8], headers: &[(String, String)]) -> Result<(), crate::ReplyError> {
        let bytes = call_bytes(&[reply_to.as_bytes(), data], headers);
        within_copy_limit("plugbus_sdk::reply", bytes, |s| s.reply(reply_to, data, headers))
    }

    pub(crate) fn http_send(req: &crate::http::Request) -> Result<crate::http::Response, crate::http::HttpError> {
        // The body is streamed to the host in small writes, each its own call (the limits of
        // outbound requests apply to it, not the copy limit).
        let bytes = call_bytes(&[req.method.as_bytes(), req.url.as_bytes()], &req.headers);
        within_copy_limit("plugbus_sdk::http", bytes, |s| s.http_send(req))
    }

    pub(crate) fn config_get(key: &str) -> Option<String> {
        within_copy_limit("plugbus_sdk::config::get", key.len() as u64, |s| s.config.get(key).cloned())
    }

    /// Outside a run, a log line goes to stderr: a helper that logs stays callable on its own.
    pub(crate) fn log(level: Level, message: &str) {
        let logged = super::SESSION.with(|cell| match cell.borrow_mut().as_mut() {
            Some(s) if message.len() as u64 > s.limits.hostcall_bytes() => {
                s.trapped = Some(super::past_the_copy_limit(&s.limits));
                std::panic::resume_unwind(Box::new(()));
            }
            Some(s) => {
                s.log(level, message);
                true
            }
            None => false,
        });
        if !logged {
            eprintln!("{level} {message}");
        }
    }
}
