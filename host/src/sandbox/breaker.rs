//! Circuit breakers for outbound HTTP, per plugin and destination host.
//!
//! Closed: calls go out; `failures` consecutive failures (connect errors, timeouts, 5xx) open it.
//! Open: calls fail at once (`CircuitOpen`, with the time left) until `cooldown` has passed.
//! Half-open: one call (the probe) goes out; success closes it, failure opens it again. A probe
//! whose outcome never comes (its guest gave up) is replaced after another `cooldown`.
//!
//! Must never: let more than one probe out per cool-down, or hold a host's state past the
//! plugin's granted destinations (hosts are only those a call was admitted to).

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The breakers of one plugin.
pub struct Breakers {
    failures: u32,
    cooldown: Duration,
    hosts: Mutex<BTreeMap<String, State>>,
}

#[derive(Debug, Default)]
struct State {
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probe_since: Option<Instant>,
    opened: u64,
}

/// One breaker as `/v1/plugins` and `/metrics` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BreakerView {
    /// The destination host.
    pub host: String,
    /// `closed`, `open` or `half-open`.
    pub state: &'static str,
    /// Failures in a row so far.
    pub consecutive_failures: u32,
    /// How many times it opened.
    pub opened: u64,
}

impl Breakers {
    /// Breakers opening after `failures` failures in a row (at least 1), for `cooldown`.
    pub fn new(failures: u32, cooldown: Duration) -> Self {
        Self { failures: failures.max(1), cooldown, hosts: Mutex::default() }
    }

    /// Whether a call to `host` may go out now: `Ok(true)` when it is the half-open probe,
    /// `Err(retry_after)` when the breaker is open.
    pub fn admit(&self, host: &str) -> Result<bool, Duration> {
        let mut hosts = self.hosts.lock().expect("breakers poisoned");
        let Some(s) = hosts.get_mut(host) else { return Ok(false) };
        let Some(until) = s.open_until else { return Ok(false) };
        let now = Instant::now();
        if now < until {
            return Err(until - now);
        }
        match s.probe_since {
            Some(since) if now < since + self.cooldown => Err(since + self.cooldown - now),
            _ => {
                s.probe_since = Some(now);
                Ok(true)
            }
        }
    }

    /// Records the outcome of an admitted call (`probe` as [`Breakers::admit`] said).
    pub fn record(&self, host: &str, ok: bool, probe: bool) {
        let mut hosts = self.hosts.lock().expect("breakers poisoned");
        let s = hosts.entry(host.to_string()).or_default();
        if ok {
            *s = State { opened: s.opened, ..State::default() };
            return;
        }
        s.consecutive_failures = s.consecutive_failures.saturating_add(1);
        let closed = s.open_until.is_none();
        if probe || (closed && s.consecutive_failures >= self.failures) {
            s.open_until = Some(super::limits::instant_after(Instant::now(), self.cooldown));
            s.probe_since = None;
            s.opened += 1;
        }
    }

    /// A probe that ended without saying anything about the destination (refused by the
    /// host's own checks): the next call may probe.
    pub fn release(&self, host: &str, probe: bool) {
        if probe && let Some(s) = self.hosts.lock().expect("breakers poisoned").get_mut(host) {
            s.probe_since = None;
        }
    }

    /// Every breaker that has seen a failure, by host.
    pub fn views(&self) -> Vec<BreakerView> {
        let now = Instant::now();
        let hosts = self.hosts.lock().expect("breakers poisoned");
        hosts
            .iter()
            .filter(|(_, s)| s.consecutive_failures > 0 || s.opened > 0)
            .map(|(host, s)| BreakerView {
                host: host.clone(),
                state: match s.open_until {
                    None => "closed",
                    Some(until) if now < until => "open",
                    Some(_) => "half-open",
                },
                consecutive_failures: s.consecutive_failures,
                opened: s.opened,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_n_failures_lets_one_probe_and_closes_on_success() {
        let b = Breakers::new(3, Duration::from_millis(50));
        for _ in 0..2 {
            assert_eq!(b.admit("h"), Ok(false));
            b.record("h", false, false);
        }
        assert_eq!(b.admit("h"), Ok(false), "still closed after 2 of 3");
        b.record("h", false, false);
        assert!(b.admit("h").is_err(), "open after 3");
        assert_eq!(b.views()[0].state, "open");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit("h"), Ok(true), "the probe");
        assert!(b.admit("h").is_err(), "one probe at a time");
        b.record("h", false, true);
        assert!(b.admit("h").is_err(), "a failed probe opens it again");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(b.admit("h"), Ok(true));
        b.record("h", true, true);
        assert_eq!(b.admit("h"), Ok(false), "closed");
        assert_eq!(b.views()[0].opened, 2);
        assert_eq!(b.admit("other"), Ok(false), "per host");
    }
}
