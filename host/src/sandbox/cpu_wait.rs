//! The time an attempt waited for a CPU behind other plugins' attempts: its deadline does not
//! count it (review 57a H1).
//!
//! Every epoch tick a running guest yields to the async runtime and goes to the back of its
//! worker's queue, so the CPUs are shared round robin by every runnable attempt (past its first
//! slice, an attempt also needs a turn of its plugin's share of the CPUs: `cpu_share`). The deadline was
//! wall time: a plugin spinning in 16 attempts stretched another plugin's 100 ms handler past its
//! 400 ms deadline, and that plugin's events were retried and dead-lettered as its handler's
//! fault. Now the wait between a yield and the next run is credited to the attempt, in the share
//! of the other runnable attempts that were other plugins' when it yielded. Its own plugin's
//! attempts slow it as before: a plugin does not stretch its own deadline by running more of
//! them. A wait in a host call (a kv read, an HTTP response) still counts: it is not a wait for
//! a CPU. However much is credited, the attempt ends at [`WALL_FACTOR`] times its deadline of
//! wall time, as the host's failure (`starved`), not its handler's.

use crate::sandbox::cpu_share::TurnSlot;
use crate::sandbox::limits::instant_after;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// An attempt may take at most this many times its deadline of wall time, whatever it waited.
pub const WALL_FACTOR: u32 = 4;

/// How the failure of an attempt ended by that bound starts (after `host error: `): the host's,
/// as far as it can tell, but whether the handler would have finished is not known (a test
/// case made of its dead letter expects a retry, not success: `fate::expected_of`).
pub const STARVED: &str = "the host kept the handler waiting for a CPU behind other plugins' attempts";

/// An attempt that got the CPU less than this ago runs on at an epoch tick (to the next one)
/// instead of yielding. Without it, the tick that passed while it waited made it yield again at
/// once: under load only the attempt first in its worker's queue ran a whole tick, the others a
/// few instructions each, so the CPUs were not shared round robin at all (one attempt could get
/// them all, another none).
pub const FRESH_SLICE: Duration = Duration::from_millis(2);

/// When the attempt that started at `started` with `deadline` must end, having been credited
/// `credited` of waits for a CPU: its deadline later by them, at most [`WALL_FACTOR`] times it.
pub fn deadline_at(started: Instant, deadline: Duration, credited: Duration) -> Instant {
    instant_after(started, deadline.saturating_add(credited).min(deadline.saturating_mul(WALL_FACTOR)))
}

/// Whether the attempt's time is up at `elapsed`: `Some(true)` for its handler's deadline
/// (it ran that long, not counting what was credited), `Some(false)` for the wall-clock bound
/// (it was starved), `None` when neither.
pub fn over(elapsed: Duration, deadline: Duration, credited: Duration) -> Option<bool> {
    if elapsed.saturating_sub(credited) >= deadline {
        Some(true)
    } else if elapsed >= deadline.saturating_mul(WALL_FACTOR) {
        Some(false)
    } else {
        None
    }
}

/// Attempts running guest code or ready to: the host's (shared by every plugin of a sandbox)
/// and one plugin's.
#[derive(Debug, Default)]
pub struct Runnable {
    host: Arc<AtomicU32>,
    own: AtomicU32,
}

impl Runnable {
    /// One plugin's count, within the host's `host`.
    pub fn within(host: Arc<AtomicU32>) -> Self {
        Self { host, own: AtomicU32::new(0) }
    }

    /// The host's count, for another plugin.
    pub fn host(&self) -> Arc<AtomicU32> {
        self.host.clone()
    }

    fn enter(&self) {
        self.host.fetch_add(1, Relaxed);
        self.own.fetch_add(1, Relaxed);
    }

    fn leave(&self) {
        self.host.fetch_sub(1, Relaxed);
        self.own.fetch_sub(1, Relaxed);
    }

    /// Of the other runnable attempts (this one aside), the share that are other plugins', in
    /// 1/1024. None: a wait then was for the machine (other processes), not for other plugins.
    pub fn others_share(&self) -> u64 {
        let (host, own) = (u64::from(self.host.load(Relaxed)), u64::from(self.own.load(Relaxed)));
        (host.saturating_sub(own) * 1024).checked_div(host.saturating_sub(1)).map_or(0, |share| share.min(1024))
    }
}

/// What the clocks below count from.
static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);

fn now_nanos() -> u64 {
    // +1: 0 means "not yielded".
    u64::try_from(EPOCH.elapsed().as_nanos()).unwrap_or(u64::MAX - 1) + 1
}

/// One attempt's waits for a CPU (one per store, reset with it). Written by the store's epoch
/// callback and by [`Running`], both on the attempt's own task: atomics only to be shared.
#[derive(Debug, Default)]
pub struct CpuWait {
    /// When it last yielded at an epoch tick ([`now_nanos`]); 0: running, or waiting in a host call.
    yielded_at: AtomicU64,
    /// [`Runnable::others_share`] when it yielded.
    share: AtomicU64,
    /// When it was last polled ([`now_nanos`]).
    polled_at: AtomicU64,
    /// What its deadline does not count, in nanoseconds.
    credited: AtomicU64,
    /// Its turn of its plugin's share of the CPUs, while it runs past its first slice
    /// (`cpu_share`).
    turn: Arc<TurnSlot>,
}

impl CpuWait {
    /// Starts again for the next attempt of a warm store.
    pub fn reset(&self) {
        self.turn.give_back();
        self.yielded_at.store(0, Relaxed);
        self.credited.store(0, Relaxed);
    }

    /// The attempt yields at an epoch tick, `share` of the other runnable attempts being
    /// other plugins'.
    pub fn yielded(&self, share: u64) {
        self.share.store(share, Relaxed);
        self.yielded_at.store(now_nanos(), Relaxed);
    }

    /// The attempt runs again: the wait since it yielded is credited in the share then.
    fn resumed(&self) {
        let now = now_nanos();
        self.polled_at.store(now, Relaxed);
        let at = self.yielded_at.swap(0, Relaxed);
        if at != 0 {
            let waited = now.saturating_sub(at);
            let credit =
                u64::try_from(u128::from(waited) * u128::from(self.share.load(Relaxed)) / 1024).unwrap_or(u64::MAX);
            self.credited.fetch_add(credit, Relaxed);
        }
    }

    /// Whether it got the CPU less than [`FRESH_SLICE`] ago: then an epoch tick seen now
    /// passed while it waited, and yielding again would give it no slice at all.
    pub fn just_polled(&self) -> bool {
        now_nanos().saturating_sub(self.polled_at.load(Relaxed)) < FRESH_SLICE.as_nanos() as u64
    }

    fn is_yielded(&self) -> bool {
        self.yielded_at.load(Relaxed) != 0
    }

    /// Where the attempt keeps its turn of its plugin's share of the CPUs.
    pub fn turn(&self) -> &Arc<TurnSlot> {
        &self.turn
    }

    /// What the attempt's deadline does not count so far.
    pub fn credited(&self) -> Duration {
        Duration::from_nanos(self.credited.load(Relaxed))
    }
}

/// Polls an attempt's call, keeping it counted in [`Runnable`] while it runs or waits for a CPU
/// after a yield (not while it waits in a host call), and crediting its waits to its [`CpuWait`].
/// Its turn of its plugin's share of the CPUs is given back when it ends or waits in a host call.
pub struct Running<'a> {
    wait: &'a CpuWait,
    runnable: &'a Runnable,
    counted: bool,
}

impl<'a> Running<'a> {
    /// The bookkeeping of one call of an attempt.
    pub fn new(wait: &'a CpuWait, runnable: &'a Runnable) -> Self {
        Self { wait, runnable, counted: false }
    }

    /// Polls `call` once.
    pub fn poll<F: Future>(&mut self, call: Pin<&mut F>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if !self.counted {
            self.runnable.enter();
            self.counted = true;
        }
        self.wait.resumed();
        let polled = call.poll(cx);
        if polled.is_ready() || !self.wait.is_yielded() {
            self.runnable.leave();
            self.counted = false;
            self.wait.turn.give_back();
        }
        polled
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.runnable.leave();
        }
        self.wait.turn.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_share_of_other_plugins_attempts_is_credited() {
        let host = Arc::new(AtomicU32::new(0));
        let (victim, spinner) = (Runnable::within(host.clone()), Runnable::within(host.clone()));
        victim.enter();
        for _ in 0..16 {
            spinner.enter();
        }
        assert_eq!(victim.others_share(), 1024, "every other runnable attempt is another plugin's");
        assert_eq!(spinner.others_share(), 1024 / 16, "one of its 16 others is another plugin's");
        victim.leave();
        assert_eq!(spinner.others_share(), 0, "only its own attempts are runnable");
        let alone = Runnable::within(Arc::new(AtomicU32::new(0)));
        alone.enter();
        assert_eq!(alone.others_share(), 0, "alone, a wait is the machine's");
    }

    #[test]
    fn a_wait_after_a_yield_is_credited_and_a_wait_in_a_host_call_is_not() {
        let wait = CpuWait::default();
        wait.yielded(1024);
        std::thread::sleep(Duration::from_millis(30));
        wait.resumed();
        let credited = wait.credited();
        assert!(credited >= Duration::from_millis(30), "{credited:?}");
        // not yielded (a host call's wait): nothing more
        std::thread::sleep(Duration::from_millis(10));
        wait.resumed();
        assert_eq!(wait.credited(), credited);
        wait.yielded(512);
        std::thread::sleep(Duration::from_millis(40));
        wait.resumed();
        let half = wait.credited() - credited;
        assert!(half >= Duration::from_millis(20) && half < Duration::from_millis(40), "{half:?}");
        wait.reset();
        assert_eq!(wait.credited(), Duration::ZERO);
    }

    #[test]
    fn time_is_up_at_the_deadline_run_or_at_the_wall_clock_bound() {
        let d = Duration::from_millis(100);
        assert_eq!(over(Duration::from_millis(99), d, Duration::ZERO), None);
        assert_eq!(over(Duration::from_millis(100), d, Duration::ZERO), Some(true));
        assert_eq!(over(Duration::from_millis(250), d, Duration::from_millis(200)), None);
        assert_eq!(over(Duration::from_millis(300), d, Duration::from_millis(200)), Some(true));
        assert_eq!(over(Duration::from_millis(400), d, Duration::from_millis(350)), Some(false));
        let t = Instant::now();
        assert_eq!(deadline_at(t, d, Duration::from_millis(50)), t + Duration::from_millis(150));
        assert_eq!(deadline_at(t, d, Duration::from_secs(9)), t + d * WALL_FACTOR);
        // a deadline past the clock's range does not overflow
        let _ = deadline_at(t, Duration::MAX, Duration::MAX);
        assert_eq!(over(Duration::from_secs(1), Duration::MAX, Duration::ZERO), None);
    }
}
