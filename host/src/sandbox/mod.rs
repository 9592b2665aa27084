//! The sandbox: wasmtime, the limits, and the host functions a plugin may call.
//!
//! It owns compiling and validating components ([`Sandbox::load`]) and running one attempt of
//! one event in a fresh instance, or a warm one for plugins set to `instance = "reuse"`
//! ([`Plugin::handle`]). Invariant: nothing under `sandbox/`
//! knows about transports, retries or subjects beyond the publish allow-list; a failure in
//! here is returned as a value ([`Failure`]), never a panic or a host crash.

pub mod bindings;
mod breaker;
pub(crate) mod cache;
mod code_budget;
mod compile_jail;
pub mod compiler;
pub mod cpu_share;
pub mod cpu_wait;
mod engine;
mod guest_stack;
mod http_caps;
pub mod http_stubs;
pub mod limits;
mod live_by_name;
mod lookup;
mod naps;
pub mod outbound;
mod plugin;
mod pool;
pub mod record;
pub mod state;
mod stdio;
mod validate;
mod world;

pub use breaker::BreakerView;
pub use cache::CacheStats;
pub use code_budget::{CodeBudget, OverBudget};
pub use engine::{Sandbox, SandboxSettings};
pub use limits::{InstanceMode, Limits};
pub use plugin::{Attempt, Failure, Plugin, PluginSettings};
pub use pool::SharedPool;
pub use record::{KvRead, MAX_SEEN_BYTES, Seen};
pub use validate::{LoadError, allowed_import, check_header, content_hash, shown_name};
pub use world::FixedWorld;
