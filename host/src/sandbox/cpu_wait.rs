//! The time an attempt waited for a CPU behind other plugins' attempts: its deadline does not
//! count it (review 57a H1).
//!
//! At an epoch tick (every millisecond while attempts run, past [`FRESH_SLICE`]) a running
//! guest yields to the async runtime and goes to the back of its worker's queue, so the CPUs are
//! shared round robin by every runnable attempt (past its first slice, an attempt also needs a
//! turn of its plugin's share of the CPUs: `cpu_share`). The deadline was wall time: a plugin
//! spinning in 16 attempts stretched another plugin's 100 ms handler past its 400 ms deadline,
//! and that plugin's events were retried and dead-lettered as its handler's fault. Now the wait
//! between a yield and the next run is credited to the attempt, in the share of the other
//! runnable attempts that were other plugins' when it yielded. Its own plugin's attempts slow it
//! as before: a plugin does not stretch its own deadline by running more of them. A wait in a
//! host call (a kv read, an HTTP response) still counts: it is not a wait for a CPU; but a
//! timer's (a nap's) past its due time is credited (`naps`): the runtime noticed it late, behind
//! other attempts. However much is credited, the attempt ends at [`WALL_FACTOR`] times its
//! deadline of wall time, as the host's failure (`starved`), not its handler's.

use crate::sandbox::cpu_share::{PluginShare, TurnSlot, TurnWait};
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
    own: Arc<AtomicU32>,
}

impl Runnable {
    /// One plugin's count, within the host's `host`.
    pub fn within(host: Arc<AtomicU32>) -> Self {
        Self { host, own: Arc::default() }
    }

    /// The count `own` of a plugin every loaded version of which shares it (review 62e F7: each
    /// version's attempts were another plugin's to the others), within the host's `host`.
    pub fn sharing(host: Arc<AtomicU32>, own: Arc<AtomicU32>) -> Self {
        Self { host, own }
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
    nanos_at(Instant::now())
}

fn nanos_at(at: Instant) -> u64 {
    // +1: 0 means "not yielded".
    u64::try_from(at.saturating_duration_since(*EPOCH).as_nanos()).unwrap_or(u64::MAX - 1) + 1
}

/// How late tokio's timers fire with nobody else running (they count whole milliseconds): a
/// timer found due later than this after its time waited behind others.
pub const TIMER_GRAIN: Duration = Duration::from_millis(1);

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
    /// When it began to wait in its plugin's line for a turn ([`now_nanos`]); 0: not waiting.
    in_line_since: AtomicU64,
    /// The share of that wait, in 1/1024, that other plugins cause (`PluginShare::ask`).
    in_line_share: AtomicU64,
    /// When its last poll ended waiting in a host call ([`now_nanos`]); 0: it did not.
    host_wait_since: AtomicU64,
    /// When it was first polled after that wait ([`now_nanos`]); 0: not yet.
    host_wait_over: AtomicU64,
    /// Its turn of its plugin's share of the CPUs, while it runs past its first slice
    /// (`cpu_share`).
    turn: TurnSlot,
}

impl CpuWait {
    /// Starts again for the next attempt of a warm store.
    pub fn reset(&self) {
        self.turn.reset();
        self.in_line_since.store(0, Relaxed);
        self.yielded_at.store(0, Relaxed);
        self.host_wait_since.store(0, Relaxed);
        self.host_wait_over.store(0, Relaxed);
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
        if self.host_wait_since.load(Relaxed) != 0 && self.host_wait_over.load(Relaxed) == 0 {
            self.host_wait_over.store(now, Relaxed);
        }
        let at = self.yielded_at.swap(0, Relaxed);
        if at != 0 {
            let waited = now.saturating_sub(at);
            let credit =
                u64::try_from(u128::from(waited) * u128::from(self.share.load(Relaxed)) / 1024).unwrap_or(u64::MAX);
            self.credited.fetch_add(credit, Relaxed);
        }
    }

    /// A poll of the attempt ended: waiting in a host call (`in_host_call`), or not.
    fn paused(&self, in_host_call: bool) {
        self.host_wait_since.store(if in_host_call { now_nanos() } else { 0 }, Relaxed);
        self.host_wait_over.store(0, Relaxed);
    }

    /// In the poll that ended its wait in a host call, the attempt found a timer it waited for
    /// (`naps`, asked for at `asked`) past its `due` time: from then (or from when the wait
    /// began, if later) to the poll, past [`TIMER_GRAIN`], it waited for the runtime to notice
    /// the timer and for a CPU, and is credited that in `share` (the other runnable attempts
    /// that are other plugins' now). Only once per wait; nothing when the timer is found due
    /// while the guest runs, or was first asked about after the wait began (review 62e F1: a
    /// timer made before a long request and looked at after it was credited the request's
    /// wait).
    pub fn timer_was_due(&self, due: Instant, asked: Instant, share: u64) {
        let (since, over) = (self.host_wait_since.load(Relaxed), self.host_wait_over.load(Relaxed));
        if since == 0 || over == 0 || nanos_at(asked) > since {
            return;
        }
        let due = nanos_at(due).saturating_add(TIMER_GRAIN.as_nanos() as u64);
        let waited = over.saturating_sub(due.max(since));
        let credit = u64::try_from(u128::from(waited) * u128::from(share) / 1024).unwrap_or(u64::MAX);
        self.credited.fetch_add(credit, Relaxed);
        // a second timer due in the same wait adds nothing
        self.host_wait_since.store(over, Relaxed);
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
    pub fn turn(&self) -> &TurnSlot {
        &self.turn
    }

    /// It waits in its plugin's line for a turn, `share` of the wait being other plugins' doing:
    /// credited as it goes (so the deadline moves while it waits).
    fn joined_line(&self, share: u64) {
        self.in_line_share.store(share, Relaxed);
        self.in_line_since.store(now_nanos(), Relaxed);
    }

    /// Whether it waits in its plugin's line for a turn now.
    pub fn in_line(&self) -> bool {
        self.in_line_since.load(Relaxed) != 0
    }

    /// Its wait in line is over: what it is credited is kept.
    fn left_line(&self) {
        let credit = self.in_line_credit();
        self.in_line_since.store(0, Relaxed);
        self.credited.fetch_add(credit, Relaxed);
    }

    fn in_line_credit(&self) -> u64 {
        let since = self.in_line_since.load(Relaxed);
        if since == 0 {
            return 0;
        }
        let waited = now_nanos().saturating_sub(since);
        u64::try_from(u128::from(waited) * u128::from(self.in_line_share.load(Relaxed)) / 1024).unwrap_or(u64::MAX)
    }

    /// What the attempt's deadline does not count so far.
    pub fn credited(&self) -> Duration {
        Duration::from_nanos(self.credited.load(Relaxed).saturating_add(self.in_line_credit()))
    }
}

/// Polls an attempt's call, keeping it counted in [`Runnable`] while it runs or waits for a CPU
/// after a yield (not while it waits in a host call), and crediting its waits to its [`CpuWait`].
/// Past its first epoch tick (or from its start while its plugin's share is contended:
/// `PluginShare::contended`) the attempt runs guest code only with a turn of its plugin's share
/// of the CPUs (`cpu_share`): it gives its turn back when it ends (unless kept for the next
/// call: `keep_turn_at_end`) or waits in a host call, and asks again before it runs on. Waiting
/// in its plugin's line it is not runnable; the wait is credited as `PluginShare::ask` says
/// (whole when the attempt would have run at once were its plugin alone, else not at all).
pub struct Running<'a> {
    wait: &'a CpuWait,
    runnable: &'a Runnable,
    share: &'a PluginShare,
    counted: bool,
    in_line: Option<TurnWait>,
    /// Keep a turn held when the call ends (an instantiation, the handler's call next).
    keep_turn_at_end: bool,
    ended: bool,
}

impl<'a> Running<'a> {
    /// The bookkeeping of one call of an attempt of the plugin whose share is `share`.
    pub fn new(wait: &'a CpuWait, runnable: &'a Runnable, share: &'a PluginShare) -> Self {
        Self { wait, runnable, share, counted: false, in_line: None, keep_turn_at_end: false, ended: false }
    }

    /// A turn held when the call ends stays with the attempt (its next call runs at once).
    pub fn keep_turn_at_end(&mut self) {
        self.keep_turn_at_end = true;
    }

    /// Polls `call` once.
    pub fn poll<F: Future>(&mut self, call: Pin<&mut F>, cx: &mut Context<'_>) -> Poll<F::Output> {
        if !self.counted {
            self.runnable.enter();
            self.counted = true;
        }
        self.wait.resumed();
        if self.in_line.is_none()
            && self.wait.turn.needs_turn(|| self.share.contended())
            && let Some((in_line, others)) = self.share.ask(&self.wait.turn)
        {
            self.wait.joined_line(others);
            self.in_line = Some(in_line);
        }
        if let Some(in_line) = self.in_line.as_mut() {
            let Poll::Ready(turn) = in_line.as_mut().poll(cx) else {
                self.runnable.leave();
                self.counted = false;
                return Poll::Pending;
            };
            self.in_line = None;
            self.wait.left_line();
            if let Some(turn) = turn {
                self.wait.turn.keep(turn);
            }
        }
        let polled = call.poll(cx);
        self.ended = polled.is_ready();
        self.wait.paused(!self.ended && !self.wait.is_yielded());
        if self.ended || !self.wait.is_yielded() {
            self.runnable.leave();
            self.counted = false;
            self.give_back_unless_kept();
        }
        polled
    }

    /// Gives the attempt's turn back, but for one kept at the end of a call for the next.
    fn give_back_unless_kept(&self) {
        if !(self.ended && self.keep_turn_at_end) {
            self.wait.turn.give_back();
        }
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if self.counted {
            self.runnable.leave();
        }
        // (a turn sent to the line's wait and not yet taken goes back with it)
        if self.in_line.take().is_some() {
            self.wait.left_line();
        }
        self.give_back_unless_kept();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

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
        // measured around the wait: a sleep may last longer than asked (a loaded machine)
        let slept = std::time::Instant::now();
        wait.yielded(512);
        std::thread::sleep(Duration::from_millis(40));
        wait.resumed();
        let slept = slept.elapsed();
        let half = wait.credited() - credited;
        assert!(half >= Duration::from_millis(20) && half <= slept / 2, "{half:?} of {slept:?}");
        wait.reset();
        assert_eq!(wait.credited(), Duration::ZERO);
    }

    /// Review 61a F2: a timer a host call waited for, found due late, is credited from its due
    /// time (past the timers' grain) or the wait's start, whichever is later, to the first poll
    /// after the wait, in the share given; once per wait, and never for time the guest ran.
    #[test]
    fn a_timer_found_due_late_after_a_wait_in_a_host_call_is_credited_the_wait_past_its_time() {
        let wait = CpuWait::default();
        let asked = Instant::now();
        let began = Instant::now();
        wait.paused(true);
        let due = Instant::now() + Duration::from_millis(5);
        std::thread::sleep(Duration::from_millis(40));
        wait.resumed();
        let polled = began.elapsed();
        // the guest runs on a while in that poll before its poll of the timer returns
        std::thread::sleep(Duration::from_millis(30));
        wait.timer_was_due(due, asked, 1024);
        let credited = wait.credited();
        let most = polled.saturating_sub(Duration::from_millis(5) + TIMER_GRAIN);
        assert!(credited >= Duration::from_millis(33) && credited <= most, "{credited:?}, at most {most:?}");
        wait.timer_was_due(due, asked, 1024);
        assert_eq!(wait.credited(), credited, "a second timer of the same wait adds nothing");

        // in other plugins' share only; from the wait's start when the timer was due before it
        let due = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let asked = Instant::now();
        // measured around the wait: `began` before it starts, `polled` after it ends
        let began = Instant::now();
        wait.paused(true);
        std::thread::sleep(Duration::from_millis(40));
        wait.resumed();
        let polled = began.elapsed();
        wait.timer_was_due(due, asked, 512);
        let half = wait.credited() - credited;
        assert!(half >= Duration::from_millis(20) && half <= polled / 2, "{half:?} of {polled:?}");

        // found due while the guest runs (a poll that did not end a wait in a host call)
        let credited = wait.credited();
        wait.paused(false);
        wait.resumed();
        std::thread::sleep(Duration::from_millis(20));
        wait.timer_was_due(Instant::now() - Duration::from_millis(20), Instant::now(), 1024);
        assert_eq!(wait.credited(), credited, "the guest ran meanwhile");

        // made before a wait in another host call (a long request), looked at after it
        wait.paused(false);
        wait.resumed();
        let due = Instant::now() + Duration::from_millis(1);
        wait.paused(true);
        std::thread::sleep(Duration::from_millis(30));
        wait.resumed();
        wait.timer_was_due(due, Instant::now(), 1024);
        assert_eq!(wait.credited(), credited, "the request's wait was credited to the timer");
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

    /// A call of the attempt waiting on `wait` that records each poll in `ran` and yields at an
    /// epoch tick, never ending.
    fn yielding_call(ran: &'static AtomicBool, wait: &'static CpuWait) -> impl Future<Output = ()> {
        std::future::poll_fn(move |_| {
            ran.store(true, Relaxed);
            wait.yielded(0);
            Poll::Pending
        })
    }

    /// An attempt's waits, kept for the test's life (its calls borrow them for `'static`).
    fn leaked() -> &'static CpuWait {
        Box::leak(Box::default())
    }

    /// Review 58a: an attempt gave its turn back while it waited in a host call, then ran guest
    /// code without one until its next tick; a plugin alternating short waits with spinning ran
    /// mostly turnless. Past its first tick it now takes a turn before it runs on.
    #[test]
    fn past_its_first_tick_an_attempt_runs_guest_code_only_with_a_turn() {
        use crate::sandbox::cpu_share::CpuShares;
        let share = CpuShares::new(1).plugin("p");
        let runnable = Runnable::within(Arc::default());
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        static HOLDER_RAN: AtomicBool = AtomicBool::new(false);
        static OTHER_RAN: AtomicBool = AtomicBool::new(false);
        let (holder, other): (&'static CpuWait, &'static CpuWait) = (leaked(), leaked());
        let mut holder_call = std::pin::pin!(yielding_call(&HOLDER_RAN, holder));
        let mut other_call = std::pin::pin!(yielding_call(&OTHER_RAN, other));
        share.at_tick(holder.turn());
        let mut holding = Running::new(holder, &runnable, &share);
        assert!(holding.poll(holder_call.as_mut(), &mut cx).is_pending());
        assert!(HOLDER_RAN.load(Relaxed), "the plugin's one turn was free");
        // the other attempt is past its first tick (back from a host call, say): no turn, no run
        share.at_tick(other.turn());
        let mut asking = Running::new(other, &runnable, &share);
        assert!(asking.poll(other_call.as_mut(), &mut cx).is_pending());
        assert!(!OTHER_RAN.load(Relaxed), "it ran guest code without a turn");
        assert!(!asking.counted, "waiting in its plugin's line, it is not runnable");
        // the holder's call ends: its turn goes to the one in line
        HOLDER_RAN.store(false, Relaxed);
        drop(holding);
        assert!(asking.poll(other_call.as_mut(), &mut cx).is_pending());
        assert!(OTHER_RAN.load(Relaxed), "the turn given back was not passed on");
        let mut back = Running::new(holder, &runnable, &share);
        assert!(back.poll(holder_call.as_mut(), &mut cx).is_pending());
        assert!(!HOLDER_RAN.load(Relaxed), "past its first tick, it ran on without a turn");
    }

    /// Review 58a M1 and M2: attempts that each ended within one slice never asked for a turn;
    /// and a wait in line was never credited, though other plugins had cut the quota. While an
    /// attempt waits in some line, a new one asks before its first slice; a wait in line that
    /// other plugins cause (the attempt would have run at once were its plugin alone) is
    /// credited whole.
    #[test]
    fn while_one_waits_in_line_new_attempts_ask_first_and_a_wait_is_credited_in_the_others_share() {
        use crate::sandbox::cpu_share::{CpuShares, TurnSlot};
        let shares = CpuShares::new(2);
        let (spinner, victim) = (shares.plugin("spinner"), shares.plugin("victim"));
        let spinning: Vec<TurnSlot> = (0..3).map(|_| TurnSlot::default()).collect();
        for slot in &spinning {
            spinner.at_tick(slot);
        }
        assert!(spinner.ask(&spinning[0]).is_none() && spinner.ask(&spinning[1]).is_none());
        let _in_line = spinner.ask(&spinning[2]).expect("both turns held");
        assert!(spinner.contended() && victim.contended());
        let runnable = Runnable::within(Arc::default());
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        static FIRST_RAN: AtomicBool = AtomicBool::new(false);
        static SECOND_RAN: AtomicBool = AtomicBool::new(false);
        let (first, second): (&'static CpuWait, &'static CpuWait) = (leaked(), leaked());
        let (mut first_call, mut second_call) =
            (std::pin::pin!(yielding_call(&FIRST_RAN, first)), std::pin::pin!(yielding_call(&SECOND_RAN, second)));
        // two fresh attempts of the victim (no tick seen): the first takes its one turn
        let mut running = Running::new(first, &runnable, &victim);
        assert!(running.poll(first_call.as_mut(), &mut cx).is_pending() && FIRST_RAN.load(Relaxed));
        std::mem::forget(running); // it holds its turn on
        let asked = std::time::Instant::now();
        let mut asking = Running::new(second, &runnable, &victim);
        assert!(asking.poll(second_call.as_mut(), &mut cx).is_pending());
        assert!(!SECOND_RAN.load(Relaxed), "a fresh attempt ran guest code without a turn while others waited in line");
        // alone the victim's second attempt would have run at once: none of its wait counts
        std::thread::sleep(Duration::from_millis(40));
        let credited = second.credited();
        assert!(credited >= Duration::from_millis(40) && credited <= asked.elapsed(), "{credited:?}");
    }

    /// Review 58b H2: while another plugin's long attempt held a turn and nobody waited in a
    /// line, attempts that each end within one slice never asked, and shared the CPUs round robin
    /// with it however many they were. Now they ask before their first slice.
    #[test]
    fn while_another_plugin_holds_a_turn_new_attempts_ask_before_their_first_slice() {
        use crate::sandbox::cpu_share::{CpuShares, TurnSlot};
        let shares = CpuShares::new(2);
        let (victim, flood) = (shares.plugin("victim"), shares.plugin("flood"));
        let long = TurnSlot::default();
        victim.at_tick(&long);
        assert!(victim.ask(&long).is_none(), "the victim's long attempt holds a turn");
        assert!(!victim.contended(), "its own line alone: its fresh attempts need not ask");
        assert!(flood.contended(), "another plugin holds a turn");
        let runnable = Runnable::within(Arc::default());
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        static RAN: [AtomicBool; 2] = [AtomicBool::new(false), AtomicBool::new(false)];
        let (first, second): (&'static CpuWait, &'static CpuWait) = (leaked(), leaked());
        let (mut first_call, mut second_call) =
            (std::pin::pin!(yielding_call(&RAN[0], first)), std::pin::pin!(yielding_call(&RAN[1], second)));
        let mut running = Running::new(first, &runnable, &flood);
        assert!(running.poll(first_call.as_mut(), &mut cx).is_pending() && RAN[0].load(Relaxed), "its quota of 1");
        let mut asking = Running::new(second, &runnable, &flood);
        assert!(asking.poll(second_call.as_mut(), &mut cx).is_pending());
        assert!(!RAN[1].load(Relaxed), "a fresh attempt ran beyond the flood's share");
        drop(running);
        assert!(asking.poll(second_call.as_mut(), &mut cx).is_pending() && RAN[1].load(Relaxed), "its turn, in turn");
    }

    /// Review 58c M1: an instantiation gave its turn back at its end, and the handler's call
    /// then waited in line again. The turn now goes on to the handler's call.
    #[test]
    fn a_turn_held_at_the_end_of_an_instantiation_goes_on_to_the_handlers_call() {
        use crate::sandbox::cpu_share::CpuShares;
        let shares = CpuShares::new(1);
        let share = shares.plugin("p");
        let (runnable, wait) = (Runnable::within(Arc::default()), CpuWait::default());
        let waker = futures::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        share.at_tick(wait.turn());
        let mut instantiating = Running::new(&wait, &runnable, &share);
        instantiating.keep_turn_at_end();
        assert!(instantiating.poll(std::pin::pin!(std::future::ready(())), &mut cx).is_ready());
        drop(instantiating);
        assert!(wait.turn().holds(), "given back at the instantiation's end");
        let other = crate::sandbox::cpu_share::TurnSlot::default();
        share.at_tick(&other);
        assert!(share.ask(&other).is_some(), "the one turn is the attempt's still");
        let mut handling = Running::new(&wait, &runnable, &share);
        assert!(handling.poll(std::pin::pin!(std::future::ready(())), &mut cx).is_ready());
        drop(handling);
        assert!(!wait.turn().holds(), "the handler's call gives it back at its end");
    }
}
