//! The bounds of the config's numbers: one place decides them, and `Config::validate` checks
//! them on `[flow]`, `[retry]` and `[limits]` and on each plugin's merged settings
//! (`[plugins.NAME.flow]`, …), and on `api.max_connections`; `SandboxSettings::validate`, which
//! every command that compiles runs, on `sandbox.compile_timeout` and `sandbox.max_code_mib`. A value past one is refused at the start naming its key; none
//! reaches a semaphore, a channel or a sum it would overflow. (Review 56e: a `retry.max` of
//! 2^64 − 1 s panicked every failed delivery's backoff, the event neither retried nor
//! dead-lettered; a `flow.queue` of 2^62 panicked the start; a `max_output_bytes` of 2^64 − 1
//! from the environment overflowed every host call's budget; a `memory_mib` of 0 dead-lettered
//! every event.)

use crate::retry::RetryPolicy;
use crate::router::Flow;
use crate::sandbox::Limits;
use std::time::Duration;

/// The longest a `[retry]` duration or `sandbox.compile_timeout` may be: a year. (`[limits]`
/// durations past the clock's range are taken as a century where they are used.)
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);
/// The most a count that becomes permits or slots may be (tokio's semaphores panic past 2^61).
pub const MAX_COUNT: usize = 1 << 20;
/// The most a byte limit may be: 1 TiB (the sums of limits never overflow).
pub const MAX_BYTES: u64 = 1 << 40;
/// The most a setting in MiB may be: 1 TiB.
pub const MAX_MIB: u64 = 1 << 20;

/// `at.key`, a duration: at most [`MAX_DURATION`], and more than 0 when `more_than_0`.
pub fn duration(at: &str, key: &str, value: Duration, more_than_0: bool) -> Result<(), String> {
    if value > MAX_DURATION {
        return Err(format!("{at}.{key} = {} is over a year", humantime::format_duration(value)));
    }
    if more_than_0 { nonzero(at, key, value) } else { Ok(()) }
}

/// `at.key`, a duration more than 0.
fn nonzero(at: &str, key: &str, value: Duration) -> Result<(), String> {
    if value.is_zero() {
        return Err(format!("{at}.{key} is 0: it must be more"));
    }
    Ok(())
}

/// `at.key` from `min` to `max`; past `max`, named as `over` says.
fn within(at: &str, key: &str, value: u64, min: u64, max: u64, over: &str) -> Result<(), String> {
    if value < min {
        return Err(format!("{at}.{key} = {value} is below {min}"));
    }
    if value > max {
        return Err(format!("{at}.{key} = {value} is over {over}"));
    }
    Ok(())
}

/// `at.key`, a count: from `min` to [`MAX_COUNT`].
pub fn count(at: &str, key: &str, value: u64, min: u64) -> Result<(), String> {
    within(at, key, value, min, MAX_COUNT as u64, &MAX_COUNT.to_string())
}

/// `at.key`, bytes: from `min` to [`MAX_BYTES`].
pub fn bytes(at: &str, key: &str, value: u64, min: u64) -> Result<(), String> {
    within(at, key, value, min, MAX_BYTES, &format!("{MAX_BYTES} (1 TiB)"))
}

/// `at.key`, MiB: from `min` to [`MAX_MIB`].
pub fn mib(at: &str, key: &str, value: u64, min: u64) -> Result<(), String> {
    within(at, key, value, min, MAX_MIB, &format!("{MAX_MIB} (1 TiB)"))
}

/// A plugin's `[flow]` (`at`: `flow` or `plugins.NAME.flow`).
pub fn flow(f: &Flow, at: &str) -> Result<(), String> {
    count(at, "concurrency", f.concurrency as u64, 1)?;
    count(at, "queue", f.queue as u64, 1)?;
    mib(at, "buffer_mib", f.buffer_mib, 0)?;
    mib(at, "backlog_mib", f.backlog_mib, 0)
}

/// A plugin's `[retry]` (`max_attempts` 0 is taken as 1: no retry).
pub fn retry(r: &RetryPolicy, at: &str) -> Result<(), String> {
    count(at, "max_attempts", u64::from(r.max_attempts), 0)?;
    duration(at, "initial", r.initial, false)?;
    duration(at, "max", r.max, false)?;
    duration(at, "max_circuit_wait", r.max_circuit_wait, false)?;
    // (Below 1 it is taken as 1.)
    if !r.factor.is_finite() || r.factor < 0.0 {
        return Err(format!("{at}.factor = {} must be a number, at least 0", r.factor));
    }
    Ok(())
}

/// A plugin's `[limits]`. (Its durations past the clock's range are taken as a century where
/// they are used, `limits::instant_after`: only a zero `deadline` or `outbound_timeout` is
/// refused.)
pub fn limits(l: &Limits, at: &str) -> Result<(), String> {
    mib(at, "memory_mib", l.memory_mib, 1)?;
    for (key, value) in [("deadline", l.deadline), ("outbound_timeout", l.outbound_timeout)] {
        nonzero(at, key, value)?;
    }
    bytes(at, "max_event_bytes", l.max_event_bytes, 1)?;
    for (key, value) in [
        ("max_output_bytes", l.max_output_bytes),
        ("max_kv_value_bytes", l.max_kv_value_bytes),
        ("max_kv_write_bytes", l.max_kv_write_bytes),
        ("max_kv_read_bytes", l.max_kv_read_bytes),
        ("max_kv_bytes", l.max_kv_bytes),
        ("max_log_bytes", l.max_log_bytes),
        ("max_outbound_request_bytes", l.max_outbound_request_bytes),
        ("max_outbound_response_bytes", l.max_outbound_response_bytes),
        ("max_reply_bytes", l.max_reply_bytes),
    ] {
        bytes(at, key, value, 0)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_bound_names_its_key() {
        let huge = Duration::from_secs(u64::MAX);
        assert!(duration("retry", "max", huge, false).unwrap_err().starts_with("retry.max = "));
        assert!(duration("retry", "initial", Duration::ZERO, true).unwrap_err().contains("retry.initial is 0"));
        let zero = Limits { deadline: Duration::ZERO, ..Limits::default() };
        assert!(limits(&zero, "limits").unwrap_err().contains("limits.deadline is 0"));
        let century = Limits { deadline: Duration::from_secs(u64::MAX), ..Limits::default() };
        assert!(limits(&century, "limits").is_ok(), "taken as a century where it is used");
        assert!(count("flow", "queue", 1 << 62, 1).unwrap_err().contains("flow.queue = 4611686018427387904 is over"));
        assert!(bytes("limits", "max_output_bytes", u64::MAX, 0).unwrap_err().contains("limits.max_output_bytes"));
        assert!(mib("limits", "memory_mib", 0, 1).unwrap_err().contains("limits.memory_mib = 0 is below 1"));
        assert!(flow(&Flow::default(), "flow").is_ok());
        assert!(retry(&RetryPolicy::default(), "retry").is_ok());
        assert!(limits(&Limits::default(), "limits").is_ok());
        let nan = RetryPolicy { factor: f64::NAN, ..RetryPolicy::default() };
        assert!(retry(&nan, "plugins.p.retry").unwrap_err().contains("plugins.p.retry.factor"));
    }
}
