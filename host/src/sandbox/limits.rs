//! Per-plugin limits: the defaults, and how each is enforced.
//!
//! Memory is capped by [`MemoryLimiter`] (a `ResourceLimiter`: growing past the cap traps);
//! wall-clock time by epoch interruption (see `engine`); publishes, output bytes, kv values and
//! log volume by the host functions in `state`.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What one plugin may use while handling one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Linear memory cap, in MiB.
    pub memory_mib: u64,
    /// Wall-clock deadline per event (e.g. `"5s"`, `"250ms"`).
    #[serde(with = "humantime_serde")]
    pub deadline: Duration,
    /// Publishes allowed per event.
    pub max_publishes: u32,
    /// Total bytes (data + headers) a plugin may publish per event.
    pub max_output_bytes: u64,
    /// Largest event (data) the plugin is handed; larger ones are dead-lettered unread.
    pub max_event_bytes: u64,
    /// Largest kv value (and key) the plugin may store.
    pub max_kv_value_bytes: u64,
    /// Bytes of stdout/stderr/log kept per event; the rest is cut and counted.
    pub max_log_bytes: u64,
    /// `fresh`: a new instance per attempt (nothing survives an event). `reuse`: a pool of warm
    /// instances, for handlers that keep no state between events (globals survive!).
    pub instance: InstanceMode,
    /// With `reuse`: an instance is dropped after this many events (and after any trap).
    pub recycle_after: u32,
}

/// How instances are used across events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceMode {
    /// A fresh instance per attempt: the default, full isolation between events.
    #[default]
    Fresh,
    /// Warm instances reused across events: much faster, for stateless handlers.
    Reuse,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mib: 64,
            deadline: Duration::from_secs(5),
            max_publishes: 100,
            max_output_bytes: 1024 * 1024,
            max_event_bytes: 1024 * 1024,
            max_kv_value_bytes: 256 * 1024,
            max_log_bytes: 64 * 1024,
            instance: InstanceMode::Fresh,
            recycle_after: 10_000,
        }
    }
}

impl Limits {
    /// The memory cap in bytes.
    pub fn memory_bytes(&self) -> usize {
        (self.memory_mib as usize).saturating_mul(1024 * 1024)
    }
}

/// Refuses memory growth past the plugin's cap, and remembers that it did, so the trap can be
/// reported as "memory limit reached" rather than as a bare trap.
pub struct MemoryLimiter {
    cap: usize,
    /// Set when a growth was refused.
    pub breached: bool,
}

impl MemoryLimiter {
    /// A limiter for `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self { cap, breached: false }
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.breached = true;
            return Err(wasmtime::Error::msg(format!(
                "memory limit {} MiB reached (wanted {} MiB)",
                self.cap / (1024 * 1024),
                desired.div_ceil(1024 * 1024)
            )));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}
