//! A fixed world for one attempt: the wall clock, monotonic clock and random numbers a handler
//! sees, all derived from the event, so running the same event twice gives the same outputs
//! (`plugbus test`). Production attempts never use it: they get WASI's real clocks and random.

use crate::event::Event;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use wasmtime_wasi::{HostMonotonicClock, HostWallClock};

/// How far each reading of a fixed clock moves it on: time passes, the same way every run.
const TICK_NANOS: u64 = 1_000;

/// Bytes of the repeating random stream (a cycle of SHA-256 blocks of the seed).
const RANDOM_BYTES: usize = 4096;

/// What a deterministic attempt's clocks and random start from.
#[derive(Debug, Clone)]
pub struct FixedWorld {
    /// The wall clock's first reading, since the Unix epoch.
    pub wall: Duration,
    /// The seed of every random number the handler sees.
    pub seed: [u8; 32],
    /// What answers its outbound HTTP calls (`None`: every call is refused).
    pub http: Option<std::sync::Arc<super::http_stubs::HttpStubs>>,
}

impl FixedWorld {
    /// The world of `event`: the wall clock starts at its `time` (the epoch when it has none
    /// that parses), random is seeded from its source and id.
    pub fn of(event: &Event) -> Self {
        let wall = humantime::parse_rfc3339_weak(&event.time)
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .unwrap_or_default();
        let mut h = Sha256::new();
        for field in [event.source.as_str(), event.id.as_str()] {
            h.update((field.len() as u64).to_be_bytes());
            h.update(field.as_bytes());
        }
        Self { wall, seed: h.finalize().into(), http: None }
    }

    /// The WASI context builder with this world's clocks and random installed.
    pub(super) fn install(&self, builder: &mut wasmtime_wasi::WasiCtxBuilder) {
        let mut bytes = Vec::with_capacity(RANDOM_BYTES);
        let mut block: [u8; 32] = self.seed;
        while bytes.len() < RANDOM_BYTES {
            block = Sha256::digest(block).into();
            bytes.extend_from_slice(&block);
        }
        let insecure_seed = u128::from_be_bytes(self.seed[..16].try_into().expect("16 bytes"));
        builder
            .secure_random(wasmtime_wasi::Deterministic::new(bytes.clone()))
            .insecure_random(wasmtime_wasi::Deterministic::new(bytes.into_iter().rev().collect()))
            .insecure_random_seed(insecure_seed)
            .wall_clock(FixedWall { start: self.wall, ticks: AtomicU64::new(0) })
            .monotonic_clock(FixedMonotonic { ticks: AtomicU64::new(0) });
    }
}

struct FixedWall {
    start: Duration,
    ticks: AtomicU64,
}

impl HostWallClock for FixedWall {
    fn resolution(&self) -> Duration {
        Duration::from_nanos(TICK_NANOS)
    }
    fn now(&self) -> Duration {
        self.start + Duration::from_nanos(self.ticks.fetch_add(1, Ordering::Relaxed) * TICK_NANOS)
    }
}

struct FixedMonotonic {
    ticks: AtomicU64,
}

impl HostMonotonicClock for FixedMonotonic {
    fn resolution(&self) -> u64 {
        TICK_NANOS
    }
    fn now(&self) -> u64 {
        self.ticks.fetch_add(1, Ordering::Relaxed) * TICK_NANOS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_world_follows_the_event() {
        let mut ev = Event::new("a.b", "x");
        ev.time = "2026-11-30T07:00:00.250Z".into();
        let w = FixedWorld::of(&ev);
        assert_eq!(w.wall, Duration::from_millis(1_796_022_000_250));
        let again = FixedWorld::of(&ev.clone());
        assert_eq!((w.wall, w.seed), (again.wall, again.seed));
        let mut other = ev.clone();
        other.id.push('x');
        assert_ne!(FixedWorld::of(&other).seed, w.seed);
    }
}
