//! plugbus: a WebAssembly-pluggable event-handler host.
//!
//! See `ARCHITECTURE.md` for the codemap. In one line: a [`transport`] delivers events, the
//! [`router`] hands each to every plugin whose subscription matches, [`dispatch`] runs it
//! through the [`sandbox`] and settles it, and what the handler published goes back out
//! through the transport.

pub mod api;
pub mod backend;
pub mod casetest;
pub mod cloudevents;
pub mod config;
pub mod config_bounds;
pub mod contract;
pub mod dashboard;
pub mod deadletter;
pub mod dev;
pub mod dispatch;
pub mod dlq_debug;
pub mod dlq_file;
pub mod event;
pub mod fate;
pub mod host;
pub mod http_server;
pub mod inspect;
pub mod kv;
pub mod loader;
pub mod log_fields;
pub mod log_queue;
pub mod manifest;
pub mod metrics;
pub mod private_files;
pub mod redb_handle;
pub mod reload;
pub mod replace_file;
pub mod replay_report;
pub mod retry;
pub mod router;
pub mod rpc;
pub mod runtime;
pub mod sandbox;
pub mod scaffold;
pub mod service;
pub mod shards;
pub mod stats;
pub mod subject;
pub mod telemetry;
#[cfg(test)]
pub(crate) mod test_support;
pub mod transport;
pub mod turn_body;
pub mod window;

pub use config::Config;
pub use event::Event;
pub use host::Host;
