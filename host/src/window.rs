//! The last minute of one plugin, for the dashboard and `GET /v1/stats`: events received,
//! handled, retried, dead-lettered and outputs per second, and handler times as a coarse
//! histogram, in a ring of one-second slots.
//!
//! Invariants:
//! - Bounded by configuration: one [`Window`] per live plugin, of a fixed size (a ring of
//!   [`SECONDS`] slots of [`LATENCY_BUCKETS`] + 5 counters per shard a thread counted on, at
//!   most [`SHARDS`]: threads take shards in turn, later ones share); nothing is keyed by a
//!   subject or an event.
//! - The hot path only does relaxed atomic adds, but for a shard's first count, which makes its
//!   ring (about 14 KiB; a thread sharing the shard waits for it). A slot is reset by the first
//!   writer of a new second; a write racing that reset may be lost or land in the new second:
//!   the figures are for people, not for billing.

use crate::shards::{SHARDS, shard};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Seconds the window covers.
pub const SECONDS: usize = 60;
/// Handler-time buckets: upper bounds 10 µs · 2^i (10 µs .. ~84 s), the last open-ended.
pub const LATENCY_BUCKETS: usize = 24;
const FIRST_BOUND_US: f64 = 10.0;

#[derive(Debug, Default)]
struct Slot {
    /// The second (since the Unix epoch) this slot counts; 0 when never used.
    second: AtomicU64,
    received: AtomicU64,
    handled: AtomicU64,
    retried: AtomicU64,
    dead_lettered: AtomicU64,
    outputs: AtomicU64,
    latency: [AtomicU64; LATENCY_BUCKETS],
}

impl Slot {
    fn reset(&self) {
        for c in [&self.received, &self.handled, &self.retried, &self.dead_lettered, &self.outputs] {
            c.store(0, Relaxed);
        }
        for b in &self.latency {
            b.store(0, Relaxed);
        }
    }
}

/// What happened in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// A delivery arrived.
    Received,
    /// An attempt failed and was retried.
    Retried,
    /// A delivery was dead-lettered.
    DeadLettered,
}

/// One plugin's last minute: a ring of slots per shard (see [`crate::shards`]: one shared ring
/// passed its cache lines between the cores at every event), made at the shard's first count,
/// summed to be read.
#[derive(Debug, Default)]
pub struct Window {
    rings: [OnceLock<Box<[Slot]>>; SHARDS],
}

/// The sums of a window.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Seconds covered.
    pub seconds: u64,
    /// Deliveries received.
    pub received: u64,
    /// Deliveries handled.
    pub handled: u64,
    /// Attempts retried.
    pub retried: u64,
    /// Deliveries dead-lettered.
    pub dead_lettered: u64,
    /// Outputs released.
    pub outputs: u64,
    /// Deliveries received per second.
    pub events_per_second: f64,
    /// Outputs per second.
    pub outputs_per_second: f64,
    /// (retried + dead-lettered) / attempts that ended (0 when idle).
    pub error_rate: f64,
    /// Handler attempts timed.
    pub timed: u64,
    /// Median handler time in milliseconds (a bucket's upper bound; `None` when nothing ran).
    pub p50_ms: Option<f64>,
    /// 99th percentile handler time in milliseconds (likewise).
    pub p99_ms: Option<f64>,
}

fn now_second() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn bucket(elapsed: Duration) -> usize {
    let us = elapsed.as_secs_f64() * 1e6;
    if us <= FIRST_BOUND_US {
        return 0;
    }
    ((us / FIRST_BOUND_US).log2().ceil() as usize).min(LATENCY_BUCKETS - 1)
}

fn bound_ms(bucket: usize) -> f64 {
    FIRST_BOUND_US * f64::from(1u32 << bucket) / 1000.0
}

impl Window {
    /// The calling thread's slot for `second`.
    fn slot(&self, second: u64) -> &Slot {
        let ring = self.rings[shard()].get_or_init(|| (0..SECONDS).map(|_| Slot::default()).collect());
        let slot = &ring[(second % SECONDS as u64) as usize];
        let seen = slot.second.load(Relaxed);
        if seen != second && slot.second.compare_exchange(seen, second, Relaxed, Relaxed).is_ok() {
            slot.reset();
        }
        slot
    }

    /// Counts one thing happening now.
    pub fn mark(&self, what: Mark) {
        let slot = self.slot(now_second());
        let counter = match what {
            Mark::Received => &slot.received,
            Mark::Retried => &slot.retried,
            Mark::DeadLettered => &slot.dead_lettered,
        };
        counter.fetch_add(1, Relaxed);
    }

    /// Counts a delivery handled now, with the outputs it released.
    pub fn handled(&self, outputs: u64) {
        let slot = self.slot(now_second());
        slot.handled.fetch_add(1, Relaxed);
        slot.outputs.fetch_add(outputs, Relaxed);
    }

    /// Records one handler attempt's time.
    pub fn time(&self, elapsed: Duration) {
        self.slot(now_second()).latency[bucket(elapsed)].fetch_add(1, Relaxed);
    }

    /// The last [`SECONDS`] seconds, the current one included.
    pub fn summary(&self) -> Summary {
        self.summary_at(now_second())
    }

    fn summary_at(&self, now: u64) -> Summary {
        let mut s = Summary { seconds: SECONDS as u64, ..Summary::default() };
        let mut latency = [0u64; LATENCY_BUCKETS];
        for slot in self.rings.iter().filter_map(OnceLock::get).flat_map(|ring| ring.iter()) {
            let second = slot.second.load(Relaxed);
            if second == 0 || second > now || now - second >= SECONDS as u64 {
                continue;
            }
            s.received += slot.received.load(Relaxed);
            s.handled += slot.handled.load(Relaxed);
            s.retried += slot.retried.load(Relaxed);
            s.dead_lettered += slot.dead_lettered.load(Relaxed);
            s.outputs += slot.outputs.load(Relaxed);
            for (sum, b) in latency.iter_mut().zip(&slot.latency) {
                *sum += b.load(Relaxed);
            }
        }
        s.events_per_second = s.received as f64 / SECONDS as f64;
        s.outputs_per_second = s.outputs as f64 / SECONDS as f64;
        let failed = s.retried + s.dead_lettered;
        let ended = s.handled + failed;
        s.error_rate = if ended == 0 { 0.0 } else { failed as f64 / ended as f64 };
        s.timed = latency.iter().sum();
        s.p50_ms = quantile(&latency, s.timed, 0.50);
        s.p99_ms = quantile(&latency, s.timed, 0.99);
        s
    }
}

fn quantile(latency: &[u64; LATENCY_BUCKETS], total: u64, q: f64) -> Option<f64> {
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (i, n) in latency.iter().enumerate() {
        seen += n;
        if seen >= rank {
            return Some(bound_ms(i));
        }
    }
    Some(bound_ms(LATENCY_BUCKETS - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_come_from_the_buckets_and_old_seconds_fall_out() {
        let w = Window::default();
        let now = 1_000_000;
        let slot = w.slot(now);
        for _ in 0..98 {
            slot.latency[bucket(Duration::from_micros(900))].fetch_add(1, Relaxed);
        }
        for _ in 0..2 {
            slot.latency[bucket(Duration::from_millis(50))].fetch_add(1, Relaxed);
        }
        slot.received.fetch_add(120, Relaxed);
        slot.handled.fetch_add(90, Relaxed);
        slot.retried.fetch_add(10, Relaxed);
        let s = w.summary_at(now);
        assert_eq!(s.received, 120);
        assert_eq!(s.events_per_second, 2.0);
        assert_eq!(s.error_rate, 0.1);
        assert_eq!(s.p50_ms, Some(1.28), "900 µs lands in the (640 µs, 1.28 ms] bucket");
        assert_eq!(s.p99_ms, Some(81.92));
        // a minute later it is gone; the slot is reused by the second that maps onto it
        assert_eq!(w.summary_at(now + 60).received, 0);
        w.slot(now + 60);
        assert_eq!(w.summary_at(now + 60), Summary { seconds: 60, ..Summary::default() });
    }

    #[test]
    fn counts_from_every_thread_are_summed() {
        let w = std::sync::Arc::new(Window::default());
        let threads: Vec<_> = (0..2 * SHARDS)
            .map(|_| {
                let w = w.clone();
                std::thread::spawn(move || {
                    w.mark(Mark::Received);
                    w.handled(2);
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        let s = w.summary();
        assert_eq!((s.received, s.handled, s.outputs), (2 * SHARDS as u64, 2 * SHARDS as u64, 4 * SHARDS as u64));
    }

    #[test]
    fn buckets_are_bounded() {
        assert_eq!(bucket(Duration::ZERO), 0);
        assert_eq!(bucket(Duration::from_micros(10)), 0);
        assert_eq!(bucket(Duration::from_micros(11)), 1);
        assert_eq!(bucket(Duration::from_secs(10_000)), LATENCY_BUCKETS - 1);
    }
}
