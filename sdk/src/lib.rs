//! # plugbus-sdk: event handlers in plain Rust
//!
//! A plugbus handler is one Rust function. The [`handler`] attribute turns it into a
//! WebAssembly component that the `plugbus` host loads from its plugins folder: it writes the
//! manifest (name, version, subscriptions, allowed publish subjects) and the glue to the WIT
//! contract, so you never touch `wit-bindgen` yourself. The same function runs natively under
//! [`testing::TestHost`] for unit tests with plain `cargo test`.
//!
//! ## Your first handler
//!
//! `plugbus new my-handler` writes a crate like this one (`crate-type = ["cdylib"]`, a
//! dependency on `plugbus-sdk`, `serde` and `serde_json`):
//!
//! ```
//! use plugbus_sdk::{Event, HandlerError, handler, kv, log, publish_json};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Deserialize, Serialize)]
//! struct Order { order_id: String, sku: String, qty: u64 }
//!
//! #[handler(subscribe = ["orders.created"], publishes = ["inventory.>"])]
//! fn reserve(ev: Event) -> Result<(), HandlerError> {
//!     let order: Order = ev.json()?; // malformed JSON rejects the event (dead letter)
//!     let key = format!("stock/{}", order.sku);
//!     let stock = kv::get_json::<u64>(&key)?.unwrap_or(0);
//!     if stock < order.qty {
//!         log::warn(format!("order {}: only {stock} x {} left", order.order_id, order.sku));
//!         publish_json("inventory.rejected", &order)?;
//!         return Ok(());
//!     }
//!     kv::set_json(&key, &(stock - order.qty))?; // committed only if the handler returns Ok
//!     publish_json("inventory.reserved", &order)?; // released only if the handler returns Ok
//!     Ok(())
//! }
//! # let run = plugbus_sdk::testing::TestHost::new().with_kv_json("stock/widget", &1)
//! #     .run(reserve, Event::new("orders.created", r#"{"order_id":"o-1","sku":"widget","qty":1}"#));
//! # assert_eq!(run.published[0].subject, "inventory.reserved");
//! ```
//!
//! Build it with `cargo build --release --target wasm32-wasip2` and copy
//! `target/wasm32-wasip2/release/<name>.wasm` into the host's `plugins/` folder: it is live in
//! well under a second, and the file name is the plugin's name (its identity, kv namespace and
//! config section).
//!
//! ## Testing it with `TestHost`
//!
//! Handlers are unit-tested natively, with plain `cargo test`: no wasm, no running host.
//! [`testing::TestHost`] gives the handler config and a kv store, runs it on an [`Event`]
//! built by hand, and returns a [`testing::Run`]: the result, what was published, the store
//! after the run and the log lines. It applies the host's rules: a publish outside the
//! handler's `publishes` is refused, and a failed run releases no outputs and no kv writes.
//!
//! ```
//! # use plugbus_sdk::{Event, HandlerError, handler, kv, publish_json};
//! # #[handler(subscribe = ["orders.created"], publishes = ["inventory.>"])]
//! # fn reserve(ev: Event) -> Result<(), HandlerError> {
//! #     let order: serde_json::Value = ev.json()?;
//! #     let stock = kv::get_json::<u64>("stock/widget")?.unwrap_or(0);
//! #     if stock < order["qty"].as_u64().unwrap_or(1) {
//! #         publish_json("inventory.rejected", &order)?;
//! #         return Ok(());
//! #     }
//! #     kv::set_json("stock/widget", &(stock - 1))?;
//! #     publish_json("inventory.reserved", &order)?;
//! #     Ok(())
//! # }
//! use plugbus_sdk::testing::TestHost;
//!
//! // #[cfg(test)] mod tests { #[test] fn out_of_stock_is_rejected() { ... } }
//! let order = Event::new_json("orders.created", &serde_json::json!({ "order_id": "o-1", "sku": "widget", "qty": 5 }));
//! let run = TestHost::new().with_kv_json("stock/widget", &2u64).run(reserve, order);
//!
//! assert_eq!(run.result, Ok(()));
//! assert_eq!(run.published.len(), 1);
//! assert_eq!(run.published[0].subject, "inventory.rejected");
//! assert_eq!(run.published[0].json::<serde_json::Value>()["order_id"], "o-1");
//! assert_eq!(run.kv_get_json::<u64>("stock/widget"), Some(2)); // untouched
//! ```
//!
//! The handler function stays an ordinary function: the attribute adds nothing to its name or
//! signature. See [`testing`] for what the test host models and what it does not.
//!
//! ## State: `kv`
//!
//! Each delivery runs in a fresh instance, so statics do not survive from one event to the next:
//! keep state in [`kv`], a key-value store private to the plugin and kept across events,
//! restarts and reloads. An attempt's writes commit together with its outputs and the ack of
//! its event, only when it returns `Ok`; reads see the attempt's own writes. Concurrent events
//! that change the same keys never lose an update (the host runs a conflicting attempt again).
//!
//! ## Retries and dead letters
//!
//! Return [`HandlerError::retry`] for a transient failure (a gateway timed out): the host tries
//! again later with exponential backoff (5 attempts by default), and the handler sees which
//! attempt it is in [`Event::attempt`]. Return [`HandlerError::reject`] for an event that will
//! never succeed (bad data): it goes to the dead-letter subject `plugbus.dlq.<plugin>` at once.
//! A panic fails the attempt like a retry. Test retry logic by building the event with
//! [`Event::with_attempt`]:
//!
//! ```
//! use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
//!
//! #[handler(subscribe = ["payments.due"], publishes = ["payments.>"])]
//! fn charge(ev: Event) -> Result<(), HandlerError> {
//!     let gateway_up = plugbus_sdk::config::get("gateway") != Some("down".into());
//!     match (gateway_up, ev.attempt()) {
//!         (true, _) => Ok(plugbus_sdk::publish("payments.captured", ev.data())?),
//!         (false, n) if n < 3 => Err(HandlerError::retry("gateway down")),
//!         (false, n) => Err(HandlerError::reject(format!("gateway down after {n} attempts"))),
//!     }
//! }
//!
//! let mut down = TestHost::new().with_config("gateway", "down");
//! assert!(down.run(charge, Event::new("payments.due", "{}")).result.unwrap_err().is_retry());
//! let last = down.run(charge, Event::new("payments.due", "{}").with_attempt(3));
//! assert!(!last.result.unwrap_err().is_retry());
//! ```
//!
//! ## Order keys
//!
//! By default a plugin's events run concurrently. `order_by_header = "customer"` (or
//! `order_by_token = 1`, the second subject token) makes events with the same key run strictly
//! one after another, retries included, while different keys still run in parallel:
//!
//! ```
//! use plugbus_sdk::{Event, HandlerError, handler, kv};
//!
//! #[handler(subscribe = ["accounts.*.moved"], order_by_token = 1)]
//! fn balance(ev: Event) -> Result<(), HandlerError> {
//!     let account = ev.subject().split('.').nth(1).unwrap_or_default();
//!     let delta: i64 = ev.json()?;
//!     let key = format!("balance/{account}");
//!     kv::set_json(&key, &(kv::get_json::<i64>(&key)?.unwrap_or(0) + delta))?;
//!     Ok(())
//! }
//! # let run = plugbus_sdk::testing::TestHost::new().run(balance, Event::new("accounts.a1.moved", "-5"));
//! # assert_eq!(run.kv_get_json::<i64>("balance/a1"), Some(-5));
//! ```
//!
//! Other options of the attribute: `durable = true` (at-least-once from a durable consumer),
//! `deliver = "all"` (a new plugin replays the history the bus keeps: rebuild a read model),
//! `queue_group`, `name` and `version`; see [`handler`].
//!
//! ## Request/reply
//!
//! [`request`] asks on a subject (one the handler's `publishes` allows) and waits for one reply,
//! within the event's deadline; a handler answers a request with [`reply`] when
//! [`Event::reply_to`] is set. The reply is released with the attempt's outputs, only on `Ok`.
//! Unit tests stub replies with [`testing::TestHost::with_reply`]:
//!
//! ```
//! use plugbus_sdk::{Event, HandlerError, handler, testing::TestHost};
//! use std::time::Duration;
//!
//! #[handler(subscribe = ["orders.created"], publishes = ["stock.check"])]
//! fn check(ev: Event) -> Result<(), HandlerError> {
//!     let answer = plugbus_sdk::request("stock.check", ev.data(), Duration::from_millis(500))?;
//!     if answer.text()? != "in stock" {
//!         return Err(HandlerError::reject("out of stock"));
//!     }
//!     Ok(())
//! }
//!
//! #[handler(subscribe = ["stock.check"])]
//! fn stock(ev: Event) -> Result<(), HandlerError> {
//!     plugbus_sdk::reply(&ev, "in stock")?;
//!     Ok(())
//! }
//!
//! let asked = TestHost::new().with_reply("stock.check", "in stock").run(check, Event::new("orders.created", "w"));
//! assert_eq!(asked.result, Ok(()));
//! let answered = TestHost::new().run(stock, Event::new("stock.check", "w").with_reply_to("r-1"));
//! assert_eq!(answered.reply.unwrap().text(), "in stock");
//! ```
//!
//! ## What the sandbox allows
//!
//! A handler can publish to the subjects its `publishes` allows ([`publish`], [`publish_json`],
//! [`publish_with_headers`]; never a `$` or `_INBOX` subject, never the host's own headers), read
//! and write its own [`kv`], read its [`config`], [`log`], write to stdout and stderr (captured
//! per event), read the wall clock and random numbers, and call the HTTP destinations its
//! `outbound` asks for and the operator grants ([`http`]). Nothing else: no files, no sockets, no
//! environment variables, no other plugin's state. Each event gets a memory cap (64 MiB), a
//! deadline (5 s) and caps on publishes (100), output bytes (1 MiB) and kv use per event; the
//! operator can change every one per plugin. Past a cap the call fails with an error the handler
//! sees ([`PublishError::Limit`], [`kv::KvError::TooLarge`]) or, for memory and time, the
//! attempt fails and is retried. A single call far past a cap (more than about four times the
//! largest call the caps allow, [`testing::Limits::hostcall_bytes`]) is not copied at all: the
//! attempt fails there and is retried, whatever the handler does with errors.

#![warn(missing_docs)]

extern crate self as plugbus_sdk;

mod error;
mod event;
mod host;
mod publish;
mod rpc;

pub mod config;
pub mod http;
pub mod kv;
pub mod log;
#[cfg(not(target_arch = "wasm32"))]
pub mod testing;

pub use error::{HandlerError, PublishError};
pub use event::Event;
pub use publish::{publish, publish_json, publish_with_headers};
pub use rpc::{ReplyError, RequestError, reply, reply_json, reply_with_headers, request, request_with_headers};

/// Turns `fn(Event) -> Result<(), HandlerError>` into a plugbus plugin component.
///
/// Options: `subscribe = [..]` (required: subject patterns with NATS wildcards `*` and `>`),
/// `publishes = [..]` (the subjects the handler may publish to), `outbound = [..]` (the HTTP
/// destinations it may call, `scheme://host[:port]`, see [`http`]), `name = ".."` and
/// `version = ".."` (default: the crate's), `queue_group = ".."`, `order_by_header = ".."` or
/// `order_by_token = N`, `durable = true`, `deliver = "all" | "new"`.
///
/// What the host accepts at load (a manifest past these is refused, naming the field):
/// - at most 256 `subscribe` and 256 `publishes` patterns, none starting with `$` or `_INBOX`;
/// - at most 64 `outbound` destinations, each `http(s)://host[:port]` or `http(s)://host:*`, no
///   path, query or user;
/// - `version` and the `order_by_header` name: at most 128 bytes, no spaces or control characters;
/// - `queue_group`: `plugbus.<plugin>` or a group under it (`plugbus.<plugin>.<suffix>`), where
///   `<plugin>` is the name the plugin is deployed under (its file's name); the operator sets
///   any other group with `[plugins.NAME] queue_group`.
///
/// The function stays callable by its own name, and [`testing::TestHost`] applies its
/// `publishes` and `subscribe` when it runs it, and fails the run on a manifest the host would
/// refuse.
///
/// ```
/// use plugbus_sdk::{Event, HandlerError, handler};
///
/// #[handler(subscribe = ["orders.*"], publishes = ["audit.orders"], order_by_header = "customer", durable = true)]
/// fn audit(ev: Event) -> Result<(), HandlerError> {
///     plugbus_sdk::publish("audit.orders", ev.data())?;
///     Ok(())
/// }
/// # let run = plugbus_sdk::testing::TestHost::new().run(audit, Event::new("orders.paid", "x"));
/// # assert_eq!(run.published[0].subject, "audit.orders");
/// ```
pub use plugbus_sdk_macro::handler;

#[doc(hidden)]
pub mod __bindings {
    wit_bindgen::generate!({
        world: "sdk-plugin",
        path: "wit",
        pub_export_macro: true,
        export_macro_name: "__export_plugin",
        default_bindings_module: "plugbus_sdk::__bindings",
        runtime_path: "plugbus_sdk::__bindings::__wit_bindgen::rt",
    });
    pub use wit_bindgen as __wit_bindgen;
}

/// `wasi:http` client bindings (the `http-client` world), used by [`http`] in the component only:
/// a handler that never calls [`http`] imports none of it.
#[cfg(target_arch = "wasm32")]
#[doc(hidden)]
pub mod __http_bindings {
    wit_bindgen::generate!({
        world: "http-client",
        path: "wit",
        runtime_path: "plugbus_sdk::__bindings::__wit_bindgen::rt",
        generate_all,
    });
}

#[doc(hidden)]
#[path = "private.rs"]
pub mod __private;
