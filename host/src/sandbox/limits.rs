//! Per-plugin limits: the defaults, and how each is enforced.
//!
//! Memory is capped by [`MemoryLimiter`] (a `ResourceLimiter`: growing past the cap traps);
//! wall-clock time by epoch interruption (see `engine`); publishes, output bytes and headers,
//! kv values, keys and transaction size, and log volume by the host functions in `state`; what
//! one host call may copy out of the guest by wasmtime's hostcall fuel
//! ([`Limits::hostcall_bytes`]); WASI resources by the store's resource-table capacity
//! ([`MAX_RESOURCES`]).
//!
//! Everything a plugin makes the host hold for one event is bounded in count and in bytes, each
//! entry (output, header, kv key) charged [`ENTRY_COST`] on top of its bytes.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What one plugin may use while handling one event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Linear memory cap, in MiB.
    pub memory_mib: u64,
    /// Wall-clock deadline per event (e.g. `"5s"`, `"250ms"`), not counting what the attempt
    /// waited for a CPU behind other plugins' attempts (`cpu_wait`), and at most 4 times it.
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
    /// Headers one output may carry.
    pub max_headers: u32,
    /// Distinct kv keys one attempt may write (sets and deletes).
    pub max_kv_writes: u32,
    /// Bytes one attempt's kv transaction may hold: keys and values written and keys read,
    /// each plus a fixed 64 per key.
    pub max_kv_write_bytes: u64,
    /// kv reads one attempt may send to the store (a key read again counts again; a key it
    /// wrote is read from its own writes and does not count).
    pub max_kv_reads: u32,
    /// Bytes of values one attempt's kv reads may bring from the store (counted as
    /// `max_kv_reads` counts reads): what the host copies for it, and what its commit's check
    /// reads again.
    pub max_kv_read_bytes: u64,
    /// Bytes the plugin's kv may hold in all, across every event: keys and values, each key
    /// 64 more (see `kv::quota`). A commit past it fails; deletes always pass.
    pub max_kv_bytes: u64,
    /// Bytes kept per event of each of stdout, stderr and `log` lines (each its own budget, so
    /// three times this in all; each `log` line 64 more); the rest is cut and counted.
    pub max_log_bytes: u64,
    /// `fresh`: a new instance per attempt (nothing survives an event). `reuse`: a pool of warm
    /// instances, for handlers that keep no state between events (globals survive!).
    pub instance: InstanceMode,
    /// With `reuse`: an instance is dropped after this many events (and after any trap).
    pub recycle_after: u32,
    /// Outbound HTTP requests one attempt may make (see `outbound`).
    pub max_outbound_requests: u32,
    /// Largest outbound request body, in bytes.
    pub max_outbound_request_bytes: u64,
    /// Largest outbound response body, in bytes.
    pub max_outbound_response_bytes: u64,
    /// Per-request timeout (connect to last body byte); never past the event's deadline.
    #[serde(with = "humantime_serde")]
    pub outbound_timeout: Duration,
    /// Outbound requests of this plugin in flight at once, across all its events.
    pub max_outbound_concurrency: u32,
    /// Failures in a row (connect errors, timeouts, 5xx) to one host that open its breaker.
    pub outbound_breaker_failures: u32,
    /// How long an open breaker fails calls at once before letting one probe through.
    #[serde(with = "humantime_serde")]
    pub outbound_breaker_cooldown: Duration,
    /// Requests (request/reply) one attempt may make; their bytes count in `max_output_bytes`.
    pub max_requests: u32,
    /// Largest reply (data and headers) a request accepts; a larger one is a `limit` error.
    pub max_reply_bytes: u64,
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
            max_headers: 64,
            max_kv_writes: 1_000,
            max_kv_write_bytes: 16 * 1024 * 1024,
            max_kv_reads: 1_000,
            max_kv_read_bytes: 16 * 1024 * 1024,
            max_kv_bytes: 256 * 1024 * 1024,
            max_log_bytes: 64 * 1024,
            instance: InstanceMode::Fresh,
            recycle_after: 10_000,
            max_outbound_requests: 16,
            max_outbound_request_bytes: 1024 * 1024,
            max_outbound_response_bytes: 1024 * 1024,
            outbound_timeout: Duration::from_secs(5),
            max_outbound_concurrency: 8,
            outbound_breaker_failures: 5,
            outbound_breaker_cooldown: Duration::from_secs(30),
            max_requests: 16,
            max_reply_bytes: 1024 * 1024,
        }
    }
}

/// What the host charges for one output, header or kv key on top of its bytes (the `String`s,
/// the tuple, the map node): 400,000 empty headers are not free.
pub const ENTRY_COST: u64 = crate::kv::ENTRY_COST;

/// The most WASI resources (streams, pollables, …) and component handles one store may hold at
/// once. A handler needs a handful (stdout, stderr, a clock pollable); wasmtime's defaults
/// (1,000,000 and 100,000) let a guest make the host allocate hundreds of MiB of table entries.
pub const MAX_RESOURCES: usize = 1_024;

/// The largest write to an outgoing HTTP body the host takes (wasmtime-wasi-http's default is
/// 1 MiB). Until its request is sent and the server reads it, a body holds at most two writes
/// in the host (one queued, one in the channel): 16 KiB here. A guest making hundreds of bodies
/// it never sends (a few handles each, up to [`MAX_RESOURCES`]) makes the host hold at most that
/// for each. The SDK writes 4 KiB at a time.
pub const OUTGOING_BODY_CHUNK_BYTES: usize = 8 * 1024;

/// The most bytes of names and values one `wasi:http` header map a guest builds may hold
/// (wasmtime-wasi-http's default is 128 KiB, for each of up to [`MAX_RESOURCES`] maps).
pub const HTTP_FIELDS_BYTES: usize = 16 * 1024;

/// The longest authority (`user@host:port`) a guest may give a `wasi:http` request
/// (wasmtime-wasi-http keeps any length for as long as the guest holds the request: up to
/// [`MAX_RESOURCES`] of them, each given a value as long as one host call copies).
pub const MAX_HTTP_AUTHORITY_BYTES: usize = 1024;

/// The longest method name a guest may give a `wasi:http` request (as the authority).
pub const MAX_HTTP_METHOD_BYTES: usize = 64;

/// The longest path and query a guest may give a `wasi:http` request (the `http` crate takes up
/// to 64 KiB; servers commonly refuse past 8 KiB).
pub const MAX_HTTP_PATH_BYTES: usize = 16 * 1024;

/// The longest kv key, in bytes, on every backend. On NATS a key goes into a subject (`$KV.…`,
/// escaped: up to three bytes per byte), and a subject past the server's control line (4 KiB)
/// makes it close the host's connection, every plugin's with it.
pub const MAX_KV_KEY_BYTES: usize = 512;

/// The longest subject a plugin may publish to, in bytes (`subject::validate_subject` refuses
/// longer ones; checked first so the refusal never copies a huge subject).
pub const MAX_SUBJECT_BYTES: usize = 1_024;

/// `start + wait`, for a deadline or a timeout from the limits: one past the clock's range
/// (`deadline = "500000000000y"`, which `Instant` cannot add and would panic on) is taken as a
/// century.
pub fn instant_after(start: std::time::Instant, wait: Duration) -> std::time::Instant {
    const CENTURY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);
    start.checked_add(wait.min(CENTURY)).unwrap_or(start)
}

/// [`instant_after`] now, for tokio's timers.
pub fn tokio_instant_in(wait: Duration) -> tokio::time::Instant {
    tokio::time::Instant::from_std(instant_after(std::time::Instant::now(), wait))
}

impl Limits {
    /// The memory cap in bytes.
    pub fn memory_bytes(&self) -> usize {
        (self.memory_mib as usize).saturating_mul(1024 * 1024)
    }

    /// The most bytes one call from the guest may make the host copy out of guest memory
    /// (wasmtime's hostcall fuel, set on every store; the guest traps past it): four times the
    /// largest legitimate call (a publish of `max_output_bytes` with `max_headers` headers, a kv
    /// write of a key and value at the cap, a log line), plus 64 KiB. Four times, so a call a
    /// little over a limit still reaches the host function and the handler sees the limit's
    /// error; far over it (a 48 MiB subject, 400,000 headers, 16 MiB of reject text) the call
    /// traps before the host allocates it.
    pub fn hostcall_bytes(&self) -> usize {
        let headers = u64::from(self.max_headers) * 2 * ENTRY_COST;
        let largest = (self.max_output_bytes + headers + MAX_SUBJECT_BYTES as u64)
            .max(2 * self.max_kv_value_bytes)
            .max(self.max_log_bytes);
        usize::try_from(largest.saturating_mul(4).saturating_add(64 * 1024)).unwrap_or(usize::MAX)
    }
}

/// Refuses memory growth past the plugin's cap, and remembers that it did, so the trap can be
/// reported as "memory limit reached" rather than as a bare trap. The cap is the instance's: the
/// sum of its linear memories (a component may define two, [`super::engine::MEMORIES_PER_COMPONENT`],
/// and each grown to the cap alone took twice what the operator allowed: review 61a F3).
pub struct MemoryLimiter {
    cap: usize,
    /// The bytes of every linear memory of the store's instances, as grown so far (each growth,
    /// the first at instantiation from 0, is reported with its memory's size before and after).
    used: usize,
    /// Set when a growth was refused.
    pub breached: bool,
}

impl MemoryLimiter {
    /// A limiter for `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self { cap, used: 0, breached: false }
    }
}

impl wasmtime::ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, max: Option<usize>) -> wasmtime::Result<bool> {
        // Past the memory's own maximum wasmtime refuses the growth after asking: not counted
        // (review 61g F3: counted, a warm instance's later events hit the cap).
        if max.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        let used = self.used.saturating_sub(current).saturating_add(desired);
        if used > self.cap {
            self.breached = true;
            return Err(wasmtime::Error::msg(format!(
                "memory limit {} MiB reached (wanted {} MiB)",
                self.cap / (1024 * 1024),
                used.div_ceil(1024 * 1024)
            )));
        }
        self.used = used;
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::ResourceLimiter;

    /// Two linear memories of one instance are held to one cap together (review 61a F3: each
    /// was held to it alone, so a component with two took twice what the operator allowed).
    #[test]
    fn an_instances_memories_share_one_cap() {
        const MIB: usize = 1024 * 1024;
        let mut limiter = MemoryLimiter::new(2 * MIB);
        // Instantiation reports each memory growing from nothing.
        assert!(limiter.memory_growing(0, MIB, None).unwrap());
        assert!(limiter.memory_growing(0, MIB / 2, None).unwrap());
        // The first grows to 1.5 MiB: 2 MiB in all, at the cap.
        assert!(limiter.memory_growing(MIB, MIB + MIB / 2, None).unwrap());
        assert!(!limiter.breached);
        // The second may not add a byte more.
        // A growth past a memory's own maximum is refused, and counts nothing.
        assert!(!limiter.memory_growing(MIB / 2, MIB, Some(MIB / 2)).unwrap());
        assert!(!limiter.breached);
        let refused = limiter.memory_growing(MIB / 2, MIB, None).unwrap_err();
        assert!(refused.to_string().contains("memory limit 2 MiB reached (wanted 3 MiB)"), "{refused}");
        assert!(limiter.breached);
    }
}
