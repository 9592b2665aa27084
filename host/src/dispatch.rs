//! Dispatch: one delivery through one plugin, from first attempt to ack or dead letter.
//!
//! It owns the delivery semantics both transports share: the event size check, attempts with
//! exponential backoff and full jitter, kv commit (re-running the attempt on a kv conflict),
//! releasing outputs only after success, dead letters, and settling with the transport.
//! Invariant: every delivery ends in exactly one of ack (handled), nak (handed back to a
//! redelivering transport: a retry, or a dead letter the transport did not take) or term
//! (dead-lettered, or logged when it was itself a dead letter), or, on a redelivering transport
//! when the plugin leaves this host, unsettled (`Outcome::Left`: delivered again, as after a
//! crash); nothing ends without a log line naming plugin, subject and event id.

use crate::deadletter::{self, DeadLetters, Record};
use crate::event::Event;
use crate::fate::{self, DeliveryError, Fate, Settle};
use crate::kv::KvError;
use crate::kv::Outbox;
use crate::metrics::PluginMetrics;
use crate::retry::RetryPolicy;
use crate::sandbox::{Failure, Plugin};
use crate::shards::Sharded;
use crate::telemetry;
use crate::transport::{Delivery, Transport};
use crate::window::Mark;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::Semaphore;
use tracing::Instrument;

/// Fault injection for the crash tests: with `PLUGBUS_FAULT_ABORT_AFTER_KV_COMMIT=1` the process
/// aborts right after an attempt's kv writes committed, before its outputs are released and its
/// input acked (the window the outbox closes). Read once.
fn fault_abort_after_kv_commit() -> bool {
    static SET: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SET.get_or_init(|| std::env::var_os("PLUGBUS_FAULT_ABORT_AFTER_KV_COMMIT").is_some_and(|v| v == "1"))
}

/// Fault injection for the memory tests: with `PLUGBUS_FAULT_KV_COMMIT_DELAY_MS=N` every kv
/// commit waits N ms first, one commit at a time (a slow disk: the log commits far slower than
/// handlers write). Read once.
fn fault_kv_commit_delay() -> Option<std::time::Duration> {
    static SET: std::sync::OnceLock<Option<std::time::Duration>> = std::sync::OnceLock::new();
    *SET.get_or_init(|| {
        let ms = std::env::var("PLUGBUS_FAULT_KV_COMMIT_DELAY_MS").ok()?.parse().ok()?;
        Some(std::time::Duration::from_millis(ms))
    })
}

/// An attempt that holds this much or less (kv writes, outputs) waits for its commit without a
/// settling permit ([`RunPermits::settling`]): `flow.queue` of them hold at most `flow.queue`
/// × 64 KiB, and most attempts (small events) take no permit at all.
const SETTLING_FREE_BYTES: u64 = 64 << 10;

/// What a finished attempt holds until its kv writes commit and its outputs are released.
fn holds_bytes(run: &crate::sandbox::Attempt) -> u64 {
    run.txn.held_bytes() + run.outputs.iter().chain(&run.reply).map(crate::event::Output::held_cost).sum::<u64>()
}

/// How often an attempt is re-run when another event changed the kv keys it read.
const MAX_KV_CONFLICT_RERUNS: u32 = 100;

/// One thread's share of a plugin's counters: added to on the hot path, summed to be read
/// ([`PluginStats::total`]; see [`crate::shards`]).
#[derive(Debug, Default)]
pub struct Counts {
    /// Deliveries received.
    pub received: AtomicU64,
    /// Handled with Ok, outputs released.
    pub ok: AtomicU64,
    /// Attempts that failed and were retried.
    pub retried: AtomicU64,
    /// Of those, attempts run again after waiting for an open circuit breaker (not counted
    /// against `max_attempts`).
    pub circuit_waits: AtomicU64,
    /// Deliveries dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Requests settled without running: their requester gave up without a reply.
    pub expired: AtomicU64,
    /// Handler runs, including re-runs after kv conflicts.
    pub attempts: AtomicU64,
    /// Outputs released.
    pub outputs: AtomicU64,
    /// Outputs the transport did not take after every try, dead-lettered by themselves (their
    /// delivery counts as handled, not in `dead_lettered`).
    pub outputs_dead_lettered: AtomicU64,
    /// Replays of another plugin's dead letter, let go unrun (a replay runs only in the plugin
    /// that failed it; they are not counted in `received`).
    pub replays_let_go: AtomicU64,
    /// Failed attempts the host failed, not the handler ([`DeliveryError::is_the_hosts`]):
    /// also counted in `retried` or `dead_lettered`.
    pub host_failures: AtomicU64,
}

/// Counters for one plugin (`/v1/plugins`, metrics).
#[derive(Debug, Default)]
pub struct PluginStats {
    /// The counters every delivery adds to, a copy per thread.
    counts: Sharded<Counts>,
    /// The last minute (rates, handler times) for `GET /v1/stats`.
    pub window: crate::window::Window,
    /// The deliveries pending now, for the drain report.
    pending_events: Mutex<Slots>,
}

/// A slab of pending events: a slot is reused once settled, so admitting allocates nothing in
/// the steady state.
#[derive(Debug, Default)]
struct Slots {
    slots: Vec<Option<Arc<Event>>>,
    free: Vec<usize>,
}

impl PluginStats {
    /// Adds `n` to the counter `which` (on the calling thread's copy).
    pub fn add(&self, which: fn(&Counts) -> &AtomicU64, n: u64) {
        which(self.counts.local()).fetch_add(n, Ordering::Relaxed);
    }

    /// The counter `which`.
    pub fn total(&self, which: fn(&Counts) -> &AtomicU64) -> u64 {
        self.counts.sum(which)
    }

    /// Registers a delivery as pending; returns its ticket.
    pub fn admit(&self, event: &Arc<Event>) -> usize {
        let mut s = self.pending_events.lock().expect("stats poisoned");
        match s.free.pop() {
            Some(i) => {
                s.slots[i] = Some(event.clone());
                i
            }
            None => {
                s.slots.push(Some(event.clone()));
                s.slots.len() - 1
            }
        }
    }

    /// Marks a delivery settled.
    pub fn settle(&self, ticket: usize) {
        let mut s = self.pending_events.lock().expect("stats poisoned");
        let settled = s.slots.get_mut(ticket).and_then(Option::take);
        if settled.is_some() {
            s.free.push(ticket);
        }
        drop(s);
        // Often the event's last holder: it is freed after the lock, which other threads'
        // admissions wait for.
        drop(settled);
    }

    /// Deliveries taken from the queue and not yet settled (waiting in a lane, backing off,
    /// running). Exact: counted under the lock admission and settling take anyway (a sharded
    /// count, added on one thread and taken back on another, can read 0 while one is pending).
    pub fn pending(&self) -> u64 {
        let s = self.pending_events.lock().expect("stats poisoned");
        (s.slots.len() - s.free.len()) as u64
    }

    /// Ids of the deliveries still pending.
    pub fn pending_ids(&self) -> Vec<String> {
        let s = self.pending_events.lock().expect("stats poisoned");
        s.slots.iter().flatten().map(|e| e.id.clone()).collect()
    }
}

/// Everything dispatch needs to run deliveries for one plugin.
pub struct PluginRuntime {
    /// The plugin's name.
    pub name: String,
    /// The version serving now (hot reload swaps it; a delivery's next attempt uses the new one).
    pub current: Serving,
    /// Counters.
    pub stats: PluginStats,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Dead-letter subject.
    pub dead_letter_subject: String,
    /// Where outputs and dead letters go.
    pub transport: Arc<dyn Transport>,
    /// Kept dead letters.
    pub dead_letters: Arc<DeadLetters>,
    /// Bounds the attempts running at once.
    pub run_permits: RunPermits,
    /// KiB of the plugin's outputs that may wait to be published again ([`republish_room`]).
    pub republishing: RepublishRoom,
    /// Where counters go.
    pub metrics: PluginMetrics,
    /// Set once the plugin leaves this host ([`PluginRuntime::leave`]).
    pub leaving: tokio::sync::watch::Sender<bool>,
}

/// Room for a plugin's outputs waiting to be published again after the transport refused them
/// (retried with backoff, each delivery's in turn): its `flow.buffer_mib`, at least 1 MiB, in
/// KiB. A delivery whose outputs do not fit has the refused one dead-lettered at once instead
/// (`release_output`): refused outputs were bounded per event only, so a plugin whose outputs
/// a full subscriber refused held up to `flow.queue` events' outputs (1 GiB by default) while
/// they waited.
pub fn republish_room(buffer_mib: u64) -> RepublishRoom {
    let kib = buffer_mib.max(1).saturating_mul(1024).min(tokio::sync::Semaphore::MAX_PERMITS as u64);
    let kib = u32::try_from(kib).unwrap_or(u32::MAX);
    RepublishRoom { free: Arc::new(tokio::sync::Semaphore::new(kib as usize)), kib }
}

/// A plugin's room for outputs waiting to be published again ([`republish_room`]).
#[derive(Clone)]
pub struct RepublishRoom {
    /// KiB free.
    free: Arc<tokio::sync::Semaphore>,
    /// KiB in all.
    kib: u32,
}

impl RepublishRoom {
    /// `kib` of room now, if there is that much.
    fn try_take(&self, kib: u32) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.free.clone().try_acquire_many_owned(kib).ok()
    }

    /// `kib` of room (at most all of it), once there is.
    async fn take(&self, kib: u32) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.free.clone().acquire_many_owned(kib.min(self.kib)).await.ok()
    }
}

impl PluginRuntime {
    /// The plugin leaves this host (removed, or the host closing after its drain): a delivery
    /// held until the transport takes its output ([`hold_until_placed`]) ends unsettled, for the
    /// transport to deliver again (here later, or on another host), rather than hold on for a
    /// plugin gone; the later deliveries of its key are left with it (`router::run_lane`).
    /// Everything else it took still finishes.
    pub fn leave(&self) {
        self.leaving.send_replace(true);
    }

    /// The version serving now.
    pub fn plugin(&self) -> Arc<Plugin> {
        self.current.plugin()
    }
}

/// Bounds the attempts of one plugin running in the sandbox at once, and counts them: the
/// attempts in flight are the permits taken (no counter of their own, added to and taken from
/// on every core at every attempt). Bounds as many again whose handler returned holding much
/// and whose kv commit is not done yet ([`RunPermits::settling`]).
pub struct RunPermits {
    permits: Semaphore,
    size: usize,
    peak: AtomicU64,
    settling: Semaphore,
}

impl RunPermits {
    /// `size` attempts at once (at least one).
    pub fn new(size: usize) -> Self {
        let size = size.max(1);
        Self { permits: Semaphore::new(size), size, peak: AtomicU64::new(0), settling: Semaphore::new(size) }
    }

    /// Waits for a permit for an attempt whose handler returned holding more than
    /// `SETTLING_FREE_BYTES`, taken before its run permit goes and held until its kv writes
    /// committed: what it holds (up to `max_kv_write_bytes` of writes, copied once more for the
    /// commit, and `max_output_bytes` of outputs) waits for a commit that may be far slower
    /// than the handler (16 MiB and an `fsync`), and as many attempts as the plugin may admit
    /// (`flow.queue`) would hold GiBs. So at most `flow.concurrency` wait so, and the handlers
    /// wait for them.
    pub async fn settling(&self) -> tokio::sync::SemaphorePermit<'_> {
        self.settling.acquire().await.expect("settling permits never close")
    }

    /// Waits for a permit to run an attempt, and raises the peak if this one makes it. The count
    /// is read just after the permit is taken: if another permit is let go in between, this
    /// reading is one short. A peak held through a handler's run is never missed.
    pub async fn acquire(&self) -> tokio::sync::SemaphorePermit<'_> {
        let permit = self.permits.acquire().await.expect("run permits never close");
        let now = self.in_flight();
        // Read first: the peak rarely moves, and a read leaves its cache line shared.
        if now > self.peak.load(Ordering::Relaxed) {
            self.peak.fetch_max(now, Ordering::Relaxed);
        }
        permit
    }

    /// Attempts running now.
    pub fn in_flight(&self) -> u64 {
        self.size.saturating_sub(self.permits.available_permits()) as u64
    }

    /// The most run permits ever held at once (a request found expired holds one for its
    /// check, without running).
    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

/// The version of a plugin serving now, and how many times it was swapped.
pub struct Serving {
    plugin: RwLock<Arc<Plugin>>,
    swaps: AtomicU64,
}

impl Serving {
    /// `plugin` serving.
    pub fn new(plugin: Plugin) -> Self {
        Self { plugin: RwLock::new(Arc::new(plugin)), swaps: AtomicU64::new(0) }
    }

    /// The version serving now.
    pub fn plugin(&self) -> Arc<Plugin> {
        self.plugin.read().expect("slot poisoned").clone()
    }

    /// Puts `plugin` in service; returns the version that served before.
    pub fn swap(&self, plugin: Plugin) -> Arc<Plugin> {
        self.serve(Arc::new(plugin))
    }

    /// Puts `plugin` (back) in service; returns the version that served before.
    pub fn serve(&self, plugin: Arc<Plugin>) -> Arc<Plugin> {
        let mut serving = self.plugin.write().expect("slot poisoned");
        let old = std::mem::replace(&mut *serving, plugin);
        // Under the lock: one who reads the new count reads the new version after it.
        self.swaps.fetch_add(1, Ordering::Relaxed);
        old
    }

    /// Versions swapped in since it was made: what was derived from [`Serving::plugin`] holds
    /// while this stays (read without taking the lock).
    pub fn swaps(&self) -> u64 {
        self.swaps.load(Ordering::Relaxed)
    }
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled after this many attempts; this many outputs were released.
    Handled {
        /// Attempts made.
        attempts: u32,
        /// Outputs released.
        outputs: usize,
    },
    /// Failed; handed back to the transport to deliver again after `wait` (any host may take it).
    Redelivering {
        /// The attempt that failed.
        attempt: u32,
        /// The backoff before the next attempt.
        wait: std::time::Duration,
    },
    /// A request whose requester stopped waiting (it timed out): settled without running (again)
    /// after this many attempts; nobody would read its reply.
    Expired {
        /// Attempts made before.
        attempts: u32,
    },
    /// The replay of a dead letter another plugin failed (`plugbus-replay-for`): acked unrun.
    NotItsReplay,
    /// Dead-lettered before (its dead letter is kept here) and delivered again: not run again;
    /// its dead letter was published again and the input settled as a dead letter's.
    DeadLetteredBefore {
        /// The transport's delivery count.
        attempt: u32,
    },
    /// Dead-lettered after this many attempts.
    DeadLettered {
        /// Attempts made.
        attempts: u32,
        /// Why.
        failure: DeliveryError,
    },
    /// Handled, but held because an output and its dead letter were both refused, when the
    /// plugin left this host ([`PluginRuntime::leave`]): left unsettled, so the transport
    /// delivers it again (as after a crash before the ack), and its handler runs again.
    Left {
        /// Attempts made.
        attempts: u32,
    },
}

/// Where the retries of a delivery wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryIn {
    /// In this host, holding the delivery (and its ordering lane) across the backoff.
    Host,
    /// In the transport: `nak` with the backoff delay, when the transport redelivers.
    Transport,
}

/// Runs `delivery` until it is handled, handed back for redelivery, or dead-lettered, and
/// settles it with the transport. With tracing on, inside a `process <subject>` span (a child
/// of the context the event carries) that records how it ended.
///
/// A plain function, not an `async fn`: the delivery's future is `deliver_in_span`'s itself
/// (in its span), not one more level around it (each level's future, kilobytes here, is
/// copied whole when it is made).
pub fn deliver(rt: &PluginRuntime, delivery: Delivery, retry_in: RetryIn) -> impl Future<Output = Outcome> + '_ {
    let span = if telemetry::enabled() {
        let version = rt.plugin().manifest().version.clone();
        telemetry::delivery_span(&rt.name, &version, &delivery.event, delivery.queued_at)
    } else {
        tracing::Span::none()
    };
    deliver_in_span(rt, delivery, retry_in, span.clone()).instrument(span)
}

/// [`deliver`], with a panic in it caught: a bug of the host's (a handler's traps, and panics of
/// its host calls, are caught in the sandbox as failed attempts), logged as the host's with the
/// event's subject and id and counted in `plugbus_host_failures_total`. The delivery is dropped
/// unsettled, so the transport delivers it again where it keeps it (JetStream after `ack_wait`;
/// the durable log at the plugin's next subscription: a restart or reinstall, or a replay; the
/// in-memory bus and core NATS keep nothing), and the task that ran it
/// goes on: `None` then (a key's lane goes on to its next event: the panicked one, should it come
/// again, comes after it). (Review 56b M1:
/// a panic ended its key's lane with the lane still open, and every later event of the key
/// waited behind it for good, then every event of the plugin.)
pub fn deliver_caught(
    rt: &PluginRuntime,
    delivery: Delivery,
    retry_in: RetryIn,
) -> impl Future<Output = Option<Outcome>> + '_ {
    use futures::FutureExt;
    let event = delivery.event.clone();
    std::panic::AssertUnwindSafe(deliver(rt, delivery, retry_in)).catch_unwind().map(move |caught| match caught {
        Ok(outcome) => Some(outcome),
        Err(panic) => {
            rt.stats.add(|c| &c.host_failures, 1);
            rt.metrics.host_failures.inc();
            tracing::error!(plugin = %rt.name, subject = %event.subject, event_id = %event.id,
                "delivering this event panicked, a bug of the host's (not the handler's): the delivery is dropped \
                 unsettled, delivered again where the transport keeps it: {}",
                crate::event::panic_text(&*panic, 1024));
            None
        }
    })
}

/// Records how a delivery ended on its span.
fn record_outcome(span: &tracing::Span, outcome: &Outcome) {
    match outcome {
        Outcome::Handled { attempts, outputs } => {
            span.record("outcome", "handled");
            span.record("attempts", attempts);
            span.record("outputs", *outputs as u64);
        }
        Outcome::Redelivering { attempt, .. } => {
            span.record("outcome", "redelivering");
            span.record("attempts", attempt);
        }
        Outcome::Expired { attempts } => {
            span.record("outcome", "expired");
            span.record("attempts", attempts);
        }
        Outcome::NotItsReplay => {
            span.record("outcome", "not_its_replay");
        }
        Outcome::DeadLetteredBefore { attempt } => {
            span.record("outcome", "dead_lettered_before");
            span.record("attempts", attempt);
        }
        Outcome::DeadLettered { attempts, failure } => {
            span.record("outcome", "dead_lettered");
            span.record("attempts", attempts);
            telemetry::fail(span, failure);
        }
        Outcome::Left { attempts } => {
            span.record("outcome", "left");
            span.record("attempts", attempts);
        }
    }
}

async fn deliver_in_span(rt: &PluginRuntime, delivery: Delivery, retry_in: RetryIn, span: tracing::Span) -> Outcome {
    // Another plugin's to run again: this one handled it the first time.
    if deadletter::is_replay_for_another(&delivery.event, &rt.name) {
        let ev = &delivery.event;
        tracing::debug!(plugin = %rt.name, subject = %ev.subject, event_id = %ev.id,
            "the replay of another plugin's dead letter: let go unrun");
        rt.stats.add(|c| &c.replays_let_go, 1);
        rt.metrics.replays_let_go.inc();
        delivery.acker.ack().await;
        if !span.is_none() {
            record_outcome(&span, &Outcome::NotItsReplay);
        }
        return Outcome::NotItsReplay;
    }
    rt.stats.add(|c| &c.received, 1);
    rt.stats.window.mark(Mark::Received);
    let ev = &delivery.event;
    let counters = rt.metrics.event(&ev.subject);
    counters.received.inc();
    // At its last delivery the retries stay here: given back, the broker would drop it unrun
    // (asked at each failure: `Release::may_leave`).
    let by_transport = retry_in == RetryIn::Transport;
    // What the failed attempt saw, when the delivery ends dead-lettered.
    let mut record = None;
    let outcome = match &delivery.defect {
        Some(failure) => Outcome::DeadLettered { attempts: 0, failure: failure.clone() },
        // A redelivery of an event this plugin dead-lettered: the dead letter's publish failed or
        // its ack was lost, so the input was given back. Run again, a success left its dead letter
        // behind for a replay to run it twice: its dead letter is published again instead.
        None if delivery.attempt > 1
            && let Some(dead) = rt.dead_letters.kept_for(&rt.name, ev) =>
        {
            let (dead, in_file) = dead;
            tracing::warn!(plugin = %rt.name, subject = %ev.subject, event_id = %ev.id, attempt = delivery.attempt,
                "dead-lettered before and delivered again (its dead letter's publish failed or was not \
                 confirmed): not run again; its dead letter is published again");
            publish_dead_letter_and_settle(rt, &delivery, Some((dead, in_file)), delivery.attempt).await;
            Outcome::DeadLetteredBefore { attempt: delivery.attempt }
        }
        None => match delivery.handled.clone() {
            // Its kv writes committed (with these outputs) before the host stopped: it is not
            // run again; its outputs are released and it is acked.
            Some(outputs) => {
                tracing::info!(plugin = %rt.name, subject = %ev.subject, event_id = %ev.id, outputs = outputs.len(),
                    "handled before the last stop (kv committed): releasing its outputs without running it again");
                let release = Release::of(rt, &delivery, delivery.attempt);
                match release_outputs(rt, ev, outputs, release).await {
                    Some(outputs) => Outcome::Handled { attempts: 0, outputs },
                    None => Outcome::Left { attempts: 0 },
                }
            }
            None => {
                let first = delivery.attempt.max(1);
                let release = Release::of(rt, &delivery, first);
                attempts(rt, ev, first, by_transport, release, delivery.acker.position(), &mut record).await
            }
        },
    };
    match &outcome {
        Outcome::Handled { attempts, outputs } => {
            counters.handled.inc();
            rt.stats.add(|c| &c.ok, 1);
            rt.stats.add(|c| &c.outputs, *outputs as u64);
            rt.stats.window.handled(*outputs as u64);
            tracing::debug!(plugin = %rt.name, subject = %ev.subject, event_id = %ev.id, attempts, outputs, "handled");
            if delivery.delivered_before() {
                let_go_of_the_events_dead_letter(rt, ev).await;
            }
            if !delivery.acker.acks_nothing() {
                delivery.acker.ack().await;
            }
        }
        Outcome::Redelivering { wait, .. } => delivery.acker.nak(*wait).await,
        // (Settled where it was decided, before any attempt.)
        Outcome::NotItsReplay | Outcome::DeadLetteredBefore { .. } => {}
        // Not settled: dropped, the acker stops keeping it alive and the transport delivers it
        // again after its ack wait, as after a crash (the later events of its key with it:
        // `run_lane`).
        Outcome::Left { .. } => {
            rt.metrics.deliveries_left.inc();
        }
        Outcome::Expired { attempts } => {
            rt.stats.add(|c| &c.expired, 1);
            rt.metrics.requests_expired.inc();
            tracing::info!(plugin = %rt.name, subject = %ev.subject, event_id = %ev.id, attempts,
                "a request whose requester gave up without a reply (it timed out): settled without running it");
            delivery.acker.ack().await;
        }
        Outcome::DeadLettered { attempts, failure } => {
            let dead = keep_dead_letter(rt, ev, DeadOf::Delivery, &failure.to_string(), *attempts, record).await;
            // Counted once kept and before it is published: whoever reads the count finds the
            // dead letter in the store, and whoever sees it on the bus reads it counted.
            counters.dead_lettered.inc();
            rt.stats.add(|c| &c.dead_lettered, 1);
            rt.stats.window.mark(Mark::DeadLettered);
            publish_dead_letter_and_settle(rt, &delivery, dead, *attempts).await;
        }
    }
    if !span.is_none() {
        record_outcome(&span, &outcome);
    }
    outcome
}

/// Publishes the dead letter of `delivery` (kept here: `dead`, with whether the store kept it
/// whole; `None`, nothing to publish) and settles the delivery as [`fate::settle_dead_letter`]
/// decides: `term` once the broker took it; given back (`nak`) when it did not and the event comes
/// again (delivered again, it is not run: its dead letter is published again); held when it would
/// not (its last delivery: given back, the broker would drop it unrun), the dead letter published
/// again (1 s doubling to 30 s) until it is taken, then `term`. The plugin leaving this host
/// (removed, or a stop after its drain) ends the hold: the event is left unsettled at its last
/// delivery, and the broker drops it after its ack wait, as a crash would leave it; the dead
/// letter stays kept here either way.
async fn publish_dead_letter_and_settle(
    rt: &PluginRuntime,
    delivery: &Delivery,
    dead: Option<(Event, bool)>,
    attempts: u32,
) {
    let ev = &delivery.event;
    let kept = match &dead {
        Some((dead, kept_whole)) => publish_dead_letter(rt, &ev.id, dead.clone(), *kept_whole).await.is_ok(),
        None => true,
    };
    // (Asked only where it decides: a dead letter kept terms the input either way.)
    let comes_again = !kept && may_come_again(rt, delivery).await;
    match fate::settle_dead_letter(kept, delivery.redeliverable, comes_again, attempts, &rt.retry) {
        Settle::Term => delivery.acker.term().await,
        Settle::Nak(wait) => delivery.acker.nak(wait).await,
        Settle::Ack => delivery.acker.ack().await,
        Settle::HoldUntilDeadLettered => {
            let Some((dead, kept_whole)) = dead else { return delivery.acker.term().await };
            tracing::error!(plugin = %rt.name, subject = %ev.subject, event_id = %ev.id, attempt = delivery.attempt,
                "its dead letter was not taken, and the event is at its last delivery (given back, the broker would \
                 drop it): the event is held (kept alive, not settled) and its dead letter published again until \
                 it is taken");
            let _holding = rt.metrics.holding();
            let mut leaving = rt.leaving.subscribe();
            let mut wait = HOLD_WAIT_FIRST;
            loop {
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    _ = leaving.wait_for(|&left| left) => {
                        rt.metrics.deliveries_left.inc();
                        tracing::warn!(plugin = %rt.name, subject = %ev.subject, event_id = %ev.id,
                            "the plugin left this host while its event was held for its dead letter: left unsettled \
                             at its last delivery, the broker drops it; its dead letter stays kept here");
                        return;
                    }
                }
                wait = (wait * 2).min(HOLD_WAIT_MAX);
                if publish_dead_letter(rt, &ev.id, dead.clone(), kept_whole).await.is_ok() {
                    tracing::info!(plugin = %rt.name, subject = %ev.subject, event_id = %ev.id,
                        "a held event's dead letter is published");
                    return delivery.acker.term().await;
                }
            }
        }
    }
}

/// Runs attempts from `first`; when the delivery is dead-lettered after a handler failure,
/// `record` gets what that last attempt saw.
async fn attempts(
    rt: &PluginRuntime,
    ev: &Event,
    first: u32,
    by_transport: bool,
    release: Release,
    position: Option<(Arc<str>, u64)>,
    record: &mut Option<Box<Record>>,
) -> Outcome {
    let serving = rt.plugin();
    if let Some(failure) = crate::fate::unrunnable(ev, serving.limits()) {
        return Outcome::DeadLettered { attempts: 0, failure };
    }
    // The version of the first attempt; each later one takes the version serving then.
    let mut first_version = Some(serving);
    let mut attempt = first;
    // How long this delivery waited for open circuit breakers (not charged as attempts).
    let mut circuit_waited = std::time::Duration::ZERO;
    loop {
        let plugin = first_version.take().unwrap_or_else(|| rt.plugin());
        let mut seen = None;
        let mut circuit = fate::Circuit { waited: circuit_waited, ..fate::Circuit::default() };
        let span = telemetry::attempt_span(attempt);
        let result = run_attempt(rt, &plugin, ev, attempt, position.clone(), &mut seen, &mut circuit)
            .instrument(span.clone())
            .await;
        match result {
            Ok(Ran::Expired) => return Outcome::Expired { attempts: attempt - first },
            Ok(Ran::Done(outputs, reply)) => {
                if let Some(reply) = reply {
                    send_reply(rt, ev, reply).await;
                }
                let Some(outputs) = release_outputs(rt, ev, outputs, release.clone()).instrument(span.clone()).await
                else {
                    span.record("outcome", "left");
                    return Outcome::Left { attempts: attempt };
                };
                span.record("outcome", "ok");
                span.record("outputs", outputs as u64);
                return Outcome::Handled { attempts: attempt, outputs };
            }
            Err(failure) => {
                span.record("outcome", if failure.is_retryable() { "failed" } else { "rejected" });
                telemetry::fail(&span, &failure);
                if failure.is_the_hosts() {
                    rt.stats.add(|c| &c.host_failures, 1);
                    rt.metrics.host_failures.inc();
                }
                drop(span);
                // Decided by the broker's bound as last seen; a give-back asks the broker again
                // first when that is old (`ComesAgain::fresh`): only there does the answer matter.
                let redelivering = by_transport && release.may_leave.now();
                let mut fate = fate::decide_after(&failure, attempt, circuit, &rt.retry, redelivering);
                if matches!(fate, Fate::Redeliver(_)) && !release.may_leave.fresh().await {
                    fate = fate::decide_after(&failure, attempt, circuit, &rt.retry, false);
                }
                if let Fate::WaitForCircuit(wait) = fate {
                    rt.stats.add(|c| &c.retried, 1);
                    rt.stats.add(|c| &c.circuit_waits, 1);
                    rt.stats.window.mark(Mark::Retried);
                    rt.metrics.event(&ev.subject).retried.inc();
                    tracing::warn!(
                        plugin = %rt.name, subject = %ev.subject, event_id = %ev.id, attempt,
                        retry_in_ms = wait.as_millis() as u64, circuit_waited_ms = circuit_waited.as_millis() as u64,
                        "an open circuit breaker refused the attempt's outbound call: waiting out its cool-down, \
                         then the same attempt again (not counted against max_attempts): {failure}"
                    );
                    // Held here on every transport: a `nak` would count as a delivery there.
                    // What the attempt saw is let go first: only the last attempt's record is
                    // kept for a dead letter, and one held through the wait is outside the bytes
                    // `flow.buffer_mib` bounds (a few MB each, `flow.queue` of them).
                    drop(seen);
                    tokio::time::sleep(wait).await;
                    circuit_waited += wait;
                    continue;
                }
                let (Fate::RetryHere(wait) | Fate::Redeliver(wait)) = fate else {
                    // Not a dead letter of the responder's for a question nobody waits for.
                    if gave_up(rt, ev) {
                        return Outcome::Expired { attempts: attempt };
                    }
                    *record = seen.map(|s| Box::new(Record::new(plugin.hash(), attempt, &failure.to_string(), *s)));
                    return Outcome::DeadLettered { attempts: attempt, failure };
                };
                rt.stats.add(|c| &c.retried, 1);
                rt.stats.window.mark(Mark::Retried);
                rt.metrics.event(&ev.subject).retried.inc();
                tracing::warn!(
                    plugin = %rt.name, subject = %ev.subject, event_id = %ev.id, attempt,
                    retry_in_ms = wait.as_millis() as u64, "attempt failed, will retry: {failure}"
                );
                if fate == Fate::Redeliver(wait) {
                    return Outcome::Redelivering { attempt, wait };
                }
                // The run permit is released while waiting: other events keep flowing. The
                // attempt's record is let go before the wait (see the circuit wait above).
                drop(seen);
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
        }
    }
}

/// Whether `ev` is a request whose requester gave up without a reply (the transport knows).
fn gave_up(rt: &PluginRuntime, ev: &Event) -> bool {
    ev.reply_to.as_deref().is_some_and(|to| !rt.transport.awaits_reply(to))
}

/// What an attempt that did not fail came to. (Returned once per attempt, never kept: the size
/// of its larger variant costs nothing a box would save.)
#[allow(clippy::large_enum_variant)]
enum Ran {
    /// The outputs and the reply to release.
    Done(Vec<Arc<Event>>, Option<Event>),
    /// Not run: a request whose requester stopped waiting while it waited for its turn.
    Expired,
}

/// One attempt: run the handler (again on kv conflict) and commit its kv writes; returns the
/// outputs and the reply to release. After the commit the handler never runs again for this delivery: where
/// the transport keeps a log (`position`), the outputs commit with the kv writes (an outbox), so
/// a crash before the ack releases them at the next start instead of running the handler again.
/// When the handler fails, `seen` gets what it read and logged (moved, not copied), and
/// `circuit` the longest `retry_after` of the calls open breakers refused and the requests it
/// sent.
async fn run_attempt(
    rt: &PluginRuntime,
    plugin: &Plugin,
    ev: &Event,
    attempt: u32,
    position: Option<(Arc<str>, u64)>,
    seen: &mut Option<Box<crate::sandbox::Seen>>,
    circuit: &mut fate::Circuit,
) -> Result<Ran, DeliveryError> {
    let mut reruns = 0;
    loop {
        let (run, settling) = {
            // The permit bounds handlers running in the sandbox; committing kv and waiting for
            // the transport to take the outputs happen without it (the commit of an attempt
            // that holds much, with a settling permit).
            let _permit = rt.run_permits.acquire().await;
            // A request waits in the queue, for a permit and between retries: its requester may
            // have given up meanwhile (a kv re-run is part of an attempt that started for it).
            if reruns == 0 && gave_up(rt, ev) {
                return Ok(Ran::Expired);
            }
            rt.stats.add(|c| &c.attempts, 1);
            let run = plugin.handle(ev, attempt).await;
            let settling =
                if holds_bytes(&run) > SETTLING_FREE_BYTES { Some(rt.run_permits.settling().await) } else { None };
            (run, settling)
        };
        rt.metrics.handler_seconds.observe(run.elapsed.as_secs_f64());
        rt.stats.window.time(run.elapsed);
        if let Err(failure) = run.result {
            *seen = run.seen;
            (circuit.open, circuit.requests_out) = (run.circuit_open, run.requests_out);
            return Err(DeliveryError::of_attempt(failure));
        }
        // Every output carries the host's trace context (the attempt's span, or the input's
        // context passed on when tracing is off), never one the plugin set.
        let trace = telemetry::output_context(ev);
        // On the durable log an output's id takes in its input's content (once an attempt).
        let content = (position.is_some() && !run.outputs.is_empty()).then(|| crate::event::content_digest(ev));
        let outputs: Vec<Arc<Event>> = run
            .outputs
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                let mut out = o.into_event_logged(ev, &rt.name, i, content.as_ref());
                telemetry::set_context(&mut out, trace.as_ref());
                Arc::new(out)
            })
            .collect();
        // The attempt's context, as on its outputs (the plugin's own was dropped).
        let reply = run.reply.map(|r| {
            let mut reply = r.into_reply(ev, &rt.name);
            telemetry::set_context(&mut reply, trace.as_ref());
            reply
        });
        // What the bus can never take (a broker's limit on one message, with the attributes the
        // host adds and their encoding) fails the attempt as the handler's, before its kv writes
        // commit: it was retried as the bus's failure and dead-lettered as the host's after them,
        // and a reply was dropped for its requester to time out (review 61a F1).
        if let Some(why) = never_taken(rt, &outputs, reply.as_ref()) {
            return Err(DeliveryError::Handler(Failure::Reject(why)));
        }
        let outbox = match &position {
            Some((plugin, seq)) if !run.txn.writes.is_empty() => {
                Some(Outbox { plugin: plugin.clone(), seq: *seq, outputs: outputs.clone() })
            }
            _ => None,
        };
        let commit_span = if run.txn.is_empty() { tracing::Span::none() } else { telemetry::step_span("kv commit") };
        if let Some(delay) = fault_kv_commit_delay().filter(|_| !run.txn.is_empty()) {
            static SLOW_DISK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
            let _one_at_a_time = SLOW_DISK.lock().await;
            tokio::time::sleep(delay).await;
        }
        match plugin.commit_settling(&run.txn, outbox).instrument(commit_span).await {
            Ok(()) => {
                if reruns > 0 && telemetry::enabled() {
                    tracing::Span::current().record("kv_conflicts", reruns);
                }
                if !run.txn.writes.is_empty() && fault_abort_after_kv_commit() {
                    tracing::error!(plugin = %rt.name, event_id = %ev.id, "PLUGBUS_FAULT_ABORT_AFTER_KV_COMMIT: aborting");
                    crate::log_queue::flush(std::time::Duration::from_secs(1));
                    std::process::abort();
                }
                // Committed: what it holds now is its outputs, bounded per event, which may wait
                // for the transport (retried with backoff when refused) without holding the
                // plugin's other attempts back.
                drop(settling);
                return Ok(Ran::Done(outputs, reply));
            }
            // Re-run in place only what stays inside the sandbox: each run gets fresh
            // per-attempt limits (and its own deadline), so a handler whose calls leave it (HTTP,
            // requests) would make them again, up to MAX_KV_CONFLICT_RERUNS times per attempt.
            Err(KvError::Conflict(key)) if run.calls_out > 0 => {
                return Err(DeliveryError::KvConflict(format!(
                    "key {} it read changed before its writes committed, and it made {} outbound calls or \
                     requests: not run again within the attempt (they would be made again)",
                    crate::event::quoted(&key),
                    run.calls_out
                )));
            }
            Err(KvError::Conflict(key)) if reruns < MAX_KV_CONFLICT_RERUNS => {
                reruns += 1;
                tracing::debug!(plugin = %rt.name, event_id = %ev.id, key, "kv conflict, running again");
            }
            Err(KvError::Conflict(key)) => {
                return Err(DeliveryError::KvConflict(format!(
                    "key {} it read changed before its writes committed, {MAX_KV_CONFLICT_RERUNS} times running",
                    crate::event::quoted(&key)
                )));
            }
            Err(e) if e.is_quota() => return Err(DeliveryError::KvQuota(e.to_string())),
            Err(e) => return Err(DeliveryError::Kv(e.to_string())),
        }
    }
}

/// Why the transport could never take one of an attempt's outputs or its reply, naming it.
fn never_taken(rt: &PluginRuntime, outputs: &[Arc<Event>], reply: Option<&Event>) -> Option<String> {
    let outputs = outputs.iter().map(|o| ("output to", &**o, rt.transport.too_large(o)));
    let mut checked = outputs.chain(reply.map(|r| ("reply on", r, rt.transport.reply_too_large(r))));
    checked
        .find_map(|(what, event, why)| Some(format!("its {what} {} can never be published: {}", event.subject, why?)))
}

/// Releases the outputs of an attempt whose kv writes committed. The handler is not run again
/// for them: an output the transport refuses is published again by itself, with the plugin's
/// backoff (its id is deterministic, so a deduplicating transport drops a second copy); one still
/// refused after `retry.max_attempts` tries is dead-lettered by itself (a replay publishes it to
/// its subject). Nothing is committed twice. Returns how many the transport took.
///
/// Where the transport would deliver the event again (`release.hold`: JetStream), an output
/// whose dead letter the transport refused too (a broker outage; its stream and the dead letters'
/// both full) is never left only in this host's store with its input acked: the delivery is held
/// (kept alive, its key's lane with it) and both are tried again until one is taken
/// ([`hold_until_placed`]). How many were published; `None` when the plugin left this host
/// while one was held: the outputs after that one are not released (the event comes again).
async fn release_outputs(rt: &PluginRuntime, ev: &Event, outputs: Vec<Arc<Event>>, release: Release) -> Option<usize> {
    let mut released = 0;
    // Bytes of the outputs not released yet (what the delivery holds while one is retried), and
    // its room among those waiting to be published again, taken at the first refusal.
    let mut left: u64 = outputs.iter().map(|o| o.buffered_cost()).sum();
    let mut room = None;
    let mut outputs = outputs.into_iter();
    while let Some(out) = outputs.next() {
        let span = telemetry::output_span(&out);
        let waiting = Waiting { left_bytes: left, room: &mut room };
        left -= out.buffered_cost();
        match release_output(rt, ev, out, waiting, release.clone(), &span).instrument(span.clone()).await {
            Released::Published => released += 1,
            Released::DeadLettered => {}
            Released::Left => {
                publish_while_taken(rt, ev, outputs, release.redelivered).await;
                return None;
            }
        }
    }
    Some(released)
}

/// The outputs after one whose delivery was left as its plugin leaves ([`Released::Left`]),
/// published while the broker takes each at once: kept for the run again, they would be lost with
/// the event should it never come again (gone from its stream by `max_age` or a limit). One try
/// each, none retried, held or dead-lettered (the plugin is leaving; and a dead letter kept now
/// could push the held output's own out of the store, the copy that let the delivery be left): the
/// first refused ends it, as does [`LEAVING_PUBLISH_MAX`], and the rest wait for the run again, as
/// after a crash. The run again publishes them again (JetStream drops those within its duplicate
/// window; on a subject no stream keeps they arrive twice), after the held one.
async fn publish_while_taken(
    rt: &PluginRuntime,
    ev: &Event,
    outputs: impl Iterator<Item = Arc<Event>>,
    redelivered: bool,
) {
    let publishing = async {
        for out in outputs {
            if let Err(e) = rt.transport.publish_output(out.clone()).await {
                tracing::warn!(plugin = %rt.name, subject = %out.subject, event_id = %out.id, caused_by = %ev.id,
                    "an output after the held one, not published as its delivery is left (the run again publishes \
                     it): {e}");
                return;
            }
            if redelivered {
                let_go_of_its_dead_letter(rt, ev, &out).await;
            }
        }
    };
    // A broker slow to answer keeps the leave no longer than this (what was not taken by then
    // waits for the run again).
    if tokio::time::timeout(LEAVING_PUBLISH_MAX, publishing).await.is_err() {
        tracing::warn!(plugin = %rt.name, event_id = %ev.id,
            "the outputs after a held one, published as its delivery is left: the broker took too long; the rest wait \
             for the run again");
    }
}

/// How long the outputs after a held one may take to be published as its delivery is left
/// ([`publish_while_taken`]).
const LEAVING_PUBLISH_MAX: std::time::Duration = std::time::Duration::from_secs(5);

/// What became of one output ([`release_output`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Released {
    /// The transport took it.
    Published,
    /// Its dead letter is kept (and published, or it could not be).
    DeadLettered,
    /// Neither was taken, and the plugin left this host while the delivery was held.
    Left,
}

/// How a delivery's outputs are released.
#[derive(Debug, Clone)]
struct Release {
    /// The transport delivered the event before: an output published now lets go of a dead
    /// letter this host kept of it then ([`let_go_of_its_dead_letter`]).
    redelivered: bool,
    /// The transport would deliver the event again: an output and its dead letter both refused
    /// hold the delivery until one is taken ([`hold_until_placed`]).
    hold: bool,
    /// Whether the transport delivers the event again if it is given back or left unsettled,
    /// asked when that is decided: a failed attempt is retried here rather than given back, and a
    /// hold goes on when the plugin leaves this host, when it would not.
    may_leave: ComesAgain,
}

impl Release {
    /// How the outputs of `delivery`'s attempts from `first` on are released.
    fn of(rt: &PluginRuntime, delivery: &Delivery, first: u32) -> Self {
        Self {
            redelivered: first > 1 || delivery.redelivered,
            hold: delivery.redeliverable,
            may_leave: ComesAgain::of(rt, delivery),
        }
    }
}

/// Whether the transport delivers a delivery again if it is given back or left unsettled
/// ([`may_come_again`]), kept to be asked when that is decided: the broker's bound may have
/// changed since the delivery began.
#[derive(Debug, Clone)]
struct ComesAgain {
    redeliverable: bool,
    /// The transport's count of this delivery.
    attempt: u32,
    /// The broker's bound as last seen ([`Delivery::max_deliveries`]), or this host's own
    /// ([`RetryPolicy::transport_deliveries`]).
    bound: Result<Arc<crate::transport::MaxDeliveries>, u32>,
}

impl ComesAgain {
    fn of(rt: &PluginRuntime, delivery: &Delivery) -> Self {
        let bound = delivery.max_deliveries.clone().ok_or_else(|| rt.retry.transport_deliveries());
        Self { redeliverable: delivery.redeliverable, attempt: delivery.attempt, bound }
    }

    /// Whether it comes again, as the broker's bound was last seen.
    fn now(&self) -> bool {
        let last = match &self.bound {
            Ok(max) => max.now(),
            Err(own) => *own,
        };
        self.redeliverable && self.attempt < last
    }

    /// Whether it comes again, as the broker's bound is now: read from the broker again first
    /// when the last look is old ([`crate::transport::MaxDeliveries::fresh`]). Before an event is
    /// given back.
    async fn fresh(&self) -> bool {
        if !self.redeliverable {
            return false;
        }
        let last = match &self.bound {
            Ok(max) => max.fresh().await,
            Err(own) => *own,
        };
        self.attempt < last
    }
}

/// Whether the transport delivers `delivery` again if it is given back or left unsettled: it
/// redelivers, and this is not its last delivery (the broker's bound, [`Delivery::max_deliveries`],
/// or else [`RetryPolicy::transport_deliveries`]). Given back at its last, it would be lost.
pub async fn may_come_again(rt: &PluginRuntime, delivery: &Delivery) -> bool {
    ComesAgain::of(rt, delivery).fresh().await
}

/// What a delivery releasing its outputs holds, for [`release_output`]'s retries.
struct Waiting<'a> {
    /// The bytes of this output and those after it.
    left_bytes: u64,
    /// Its room in [`PluginRuntime::republishing`], once one was refused.
    room: &'a mut Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Waiting<'_> {
    /// The room these outputs take among those waiting to be published again, in KiB (at least 1).
    fn kib(&self) -> u32 {
        u32::try_from(self.left_bytes.div_ceil(1024).max(1)).unwrap_or(u32::MAX)
    }
}

/// Sends the reply of an attempt that returned Ok (after its kv writes committed, before its
/// outputs) to the reply address of the event it handled. A reply nobody waits for any more
/// (the requester timed out, or another plugin answered first) is dropped and counted
/// (`plugbus_replies_dropped_total`); a reply is never retried: the requester has a timeout.
async fn send_reply(rt: &PluginRuntime, ev: &Event, reply: Event) {
    let Some(to) = &ev.reply_to else { return };
    let dropped = match rt.transport.reply(to, reply).await {
        Ok(true) => return,
        Ok(false) => "nobody waits for it any more (the request timed out, or another reply came first)".to_string(),
        Err(e) => format!("the transport did not take it: {e}"),
    };
    rt.metrics.replies_dropped.inc();
    tracing::info!(plugin = %rt.name, subject = %ev.subject, event_id = %ev.id, "reply dropped: {dropped}");
}

/// Publishes one output until the transport takes it (`true`) or it is dead-lettered. Refused,
/// it is tried again only while the delivery's outputs have room among the plugin's waiting to
/// be published again ([`republish_room`]); otherwise it is dead-lettered at once.
async fn release_output(
    rt: &PluginRuntime,
    ev: &Event,
    out: Arc<Event>,
    waiting: Waiting<'_>,
    release: Release,
    span: &tracing::Span,
) -> Released {
    let mut tries = 1;
    loop {
        let err = match rt.transport.publish_output(out.clone()).await {
            Ok(()) => {
                span.record("tries", tries);
                if release.redelivered {
                    let_go_of_its_dead_letter(rt, ev, &out).await;
                }
                return Released::Published;
            }
            Err(e) => e,
        };
        let (subject, id) = (&out.subject, &out.id);
        let fate = fate::decide(&DeliveryError::Publish(err.to_string()), tries, &rt.retry, false);
        let room = match (&fate, waiting.room.is_some()) {
            (Fate::RetryHere(_), false) => match rt.republishing.try_take(waiting.kib()) {
                Some(room) => {
                    *waiting.room = Some(room);
                    true
                }
                None => false,
            },
            _ => true,
        };
        let retry = match fate {
            Fate::RetryHere(wait) if room => Some(wait),
            _ => None,
        };
        let Some(wait) = retry else {
            tracing::error!(plugin = %rt.name, subject = %subject, event_id = %id, caused_by = %ev.id, tries,
                "output not published; dead-lettering the output (the handler's kv writes stand): {err}");
            let why = match room {
                true => format!("output to {subject} not published after {tries} tries: {err}"),
                false => format!(
                    "output to {subject} not published: {err}; not tried again: the plugin's outputs waiting to be \
                     published again hold its flow.buffer_mib already"
                ),
            };
            span.record("tries", tries);
            telemetry::fail(span, &why);
            return match dead_letter_output(rt, &out, &why, tries).await {
                Err(dead) if release.hold => {
                    hold_until_placed(rt, ev, &out, dead, waiting, release).instrument(span.clone()).await
                }
                Ok(()) | Err(_) => Released::DeadLettered,
            };
        };
        tracing::warn!(plugin = %rt.name, subject = %subject, event_id = %id, caused_by = %ev.id, tries,
            retry_in_ms = wait.as_millis() as u64, "output not published, publishing it again: {err}");
        tokio::time::sleep(wait).await;
        tries += 1;
    }
}

/// Lets go of the dead letter this host kept of `ev` at an earlier delivery, now that `ev` was
/// handled (a replay of it would run it twice): on the embedded log, a crash between the dead
/// letter and the ack's commit reads the event back to run again, as does a replay.
async fn let_go_of_the_events_dead_letter(rt: &PluginRuntime, ev: &Event) {
    let Some(kept) = rt.dead_letters.take_delivery_dead_letter(&rt.name, ev) else { return };
    tracing::info!(plugin = %rt.name, subject = %ev.subject, event_id = %ev.id,
        "dead-lettered before, run again and handled now: its dead letter is let go");
    rt.dead_letters.write_off_runtime(move |store| store.forget(&[kept])).await;
}

/// Lets go of the dead letter this host kept of `out` when its publish failed (at an earlier
/// delivery of `ev`, or while it was held): `out` is published now (a replay would send it
/// twice).
async fn let_go_of_its_dead_letter(rt: &PluginRuntime, ev: &Event, out: &Event) {
    let Some(kept) = rt.dead_letters.take_unpublished_output(&rt.name, out) else { return };
    tracing::info!(plugin = %rt.name, subject = %out.subject, event_id = %out.id, caused_by = %ev.id,
        "an output dead-lettered here before (its dead letter not published) is published now: its dead letter \
         is let go");
    rt.dead_letters.write_off_runtime(move |store| store.forget(&[kept])).await;
}

/// Keeps and publishes the dead letter of `out`, an output of the plugin's that the transport
/// did not take after `tries`; when the transport did not take the dead letter either, `Err`
/// with it (and whether the store kept it whole), to publish again.
async fn dead_letter_output(rt: &PluginRuntime, out: &Event, failure: &str, tries: u32) -> Result<(), (Event, bool)> {
    let kept = keep_dead_letter(rt, out, DeadOf::UnpublishedOutput, failure, tries, None).await;
    // Counted once kept and before it is published, as a delivery's dead letter is.
    rt.stats.add(|c| &c.outputs_dead_lettered, 1);
    rt.metrics.outputs_dead_lettered.inc();
    let Some((dead, kept_whole)) = kept else { return Ok(()) };
    match publish_dead_letter(rt, &out.id, dead.clone(), kept_whole).await {
        Ok(()) => Ok(()),
        Err(()) => Err((dead, kept_whole)),
    }
}

/// The first wait of [`hold_until_placed`], doubled after each refusal up to
/// [`HOLD_WAIT_MAX`].
const HOLD_WAIT_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
/// The longest wait of [`hold_until_placed`].
const HOLD_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// Holds a delivery whose output `out` and its dead letter `dead` the transport both refused,
/// where the transport would deliver the event again: acked, the output would be only in this
/// host's store (bounded, and no other host lists it); given back, the handler would run again
/// over its committed kv writes, its calls out and its reply again, after later events of its
/// key. So the delivery stays here, kept alive (and its key's lane with it), and the output, then
/// its dead letter, are tried again (1 s doubling to 30 s) until one is taken. It holds its
/// outputs' room among the plugin's waiting to be published again (waiting for it, if it had
/// none), so a broker that refuses everything holds the plugin back rather than its memory
/// growing. A crash meanwhile leaves the event unsettled: it comes again, as after any crash
/// before the ack.
///
/// When the plugin leaves this host meanwhile (removed, or the host closing after its drain:
/// [`PluginRuntime::leave`]), the hold ends and the event is left unsettled the same way: it
/// comes again, here or on another host, and runs again there. The dead letter this host kept of
/// the output stays kept, as after a crash: the run again may publish another output, or none
/// (over its own kv writes), or not come at all (the input gone from its stream); when it
/// publishes this one here, that lets the dead letter go. Only a dead letter still in the
/// store's file when the plugin leaves lets the hold end ([`leave_if_it_may`]): otherwise the hold is
/// the output's only copy. Nor does it end at the event's last delivery ([`may_come_again`]).
async fn hold_until_placed(
    rt: &PluginRuntime,
    ev: &Event,
    out: &Arc<Event>,
    (dead, kept_whole): (Event, bool),
    waiting: Waiting<'_>,
    release: Release,
) -> Released {
    tracing::error!(plugin = %rt.name, subject = %out.subject, event_id = %out.id, caused_by = %ev.id,
        "neither the output nor its dead letter was taken: the event is held (kept alive, not acked) and both are \
         tried again until one is");
    let _holding = rt.metrics.holding();
    let mut leaving = rt.leaving.subscribe();
    // Whether the plugin's leaving may end the hold (no longer, once it found it may not: not at
    // the event's last delivery, which would never come again, nor with the dead letter gone).
    let mut watching = true;
    let mut has_room = waiting.room.is_some();
    while !has_room {
        tokio::select! {
            room = rt.republishing.take(waiting.kib()) => (*waiting.room, has_room) = (room, true),
            _ = leaving.wait_for(|&left| left), if watching => match leave_if_it_may(rt, ev, out, &release.may_leave) {
                Some(left) => return left,
                None => watching = false,
            },
        }
    }
    let mut wait = HOLD_WAIT_FIRST;
    loop {
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            _ = leaving.wait_for(|&left| left), if watching => match leave_if_it_may(rt, ev, out, &release.may_leave) {
                Some(left) => return left,
                None => {
                    watching = false;
                    continue;
                }
            },
        }
        wait = (wait * 2).min(HOLD_WAIT_MAX);
        match rt.transport.publish_output(out.clone()).await {
            Ok(()) => {
                tracing::info!(plugin = %rt.name, subject = %out.subject, event_id = %out.id, caused_by = %ev.id,
                    "a held output is published");
                let_go_of_its_dead_letter(rt, ev, out).await;
                return Released::Published;
            }
            Err(e) => tracing::debug!(plugin = %rt.name, subject = %out.subject, event_id = %out.id,
                "a held output refused again: {e}"),
        }
        if publish_dead_letter(rt, &out.id, dead.clone(), kept_whole).await.is_ok() {
            tracing::info!(plugin = %rt.name, subject = %out.subject, event_id = %out.id, caused_by = %ev.id,
                "a held output's dead letter is published");
            return Released::DeadLettered;
        }
    }
}

/// As a held output's plugin leaves this host: [`Released::Left`], ending the hold, when its dead
/// letter is in the store's file, to outlive the hold, and the event comes again (`comes_again`,
/// asked now); `None` (the hold goes on) at the event's last delivery, or when the dead letter is
/// not in the file (the output's only copy): evicted or deleted since, over the store's bytes, or
/// a store without a file (`persistent_kv = false`).
fn leave_if_it_may(rt: &PluginRuntime, ev: &Event, out: &Event, comes_again: &ComesAgain) -> Option<Released> {
    if !comes_again.now() {
        tracing::warn!(plugin = %rt.name, subject = %out.subject, event_id = %out.id, caused_by = %ev.id,
            "the plugin leaves this host, but its held event is at its last delivery (the broker's max_deliver): the \
             hold goes on, since the event would not come again");
        return None;
    }
    if !matches!(rt.dead_letters.kept_for(&rt.name, out), Some((_, true))) {
        tracing::warn!(plugin = %rt.name, subject = %out.subject, event_id = %out.id, caused_by = %ev.id,
            "the plugin leaves this host, but a held output's dead letter is not in this host's dead-letter file: \
             the hold goes on, as the output's only copy");
        return None;
    }
    tracing::warn!(plugin = %rt.name, subject = %out.subject, event_id = %out.id, caused_by = %ev.id,
        "the plugin left this host while its event was held: left unsettled, the transport delivers it again and \
         its handler runs again; the output's dead letter stays kept here");
    Some(Released::Left)
}

/// Leaves `delivery` unsettled and unrun behind an earlier event of its key left unsettled
/// ([`Outcome::Left`]): run now, it would overtake that one. The transport delivers both again
/// after their ack wait, as after a crash. (Not given back with `nak`: tried, the earlier one,
/// given back first, came again after this one.)
pub fn leave_behind_its_key(rt: &PluginRuntime, delivery: Delivery) {
    rt.metrics.deliveries_left.inc();
    let ev = &delivery.event;
    tracing::warn!(plugin = %rt.name, subject = %ev.subject, event_id = %ev.id,
        "left unsettled, unrun: an earlier event of its key was left unsettled as the plugin left this host, and \
         this one would overtake it; the transport delivers both again");
}

/// What a dead letter is of: decides whom its replay is for ([`deadletter::failed_in`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeadOf {
    /// An event the plugin's delivery failed (its handler, or before it ran): the replay is for
    /// this plugin alone (the others handled it the first time), even when the event was the
    /// plugin's own output.
    Delivery,
    /// An output of the plugin that the transport did not take: it reached no one, so its
    /// replay goes to every subscriber.
    UnpublishedOutput,
}

/// Keeps the dead letter of `ev` (with `record`, in this host's store only) and returns it to
/// publish, with whether the store kept it (not when it alone is over the store's bytes);
/// `None` when it is only logged (a dead letter that failed again).
///
/// The store writes through to its file (`dlq.redb`, an `fsync` per commit, waiting for any
/// other write): that runs on the blocking pool, not on the runtime thread every plugin's
/// deliveries share, so a plugin dead-lettering as fast as it can stalls only itself.
async fn keep_dead_letter(
    rt: &PluginRuntime,
    ev: &Event,
    of: DeadOf,
    failure: &str,
    attempts: u32,
    record: Option<Box<Record>>,
) -> Option<(Event, bool)> {
    let (plugin, subject, id) = (&rt.name, &ev.subject, &ev.id);
    // A dead letter is the host's mark on a dead-letter subject (the default `plugbus.dlq.*`, or
    // this plugin's own): a publisher with direct access to the bus who forges the mark on any
    // other subject gets its event dead-lettered like any other.
    let on_dead_letter_subject = crate::subject::is_dead_letter_subject(subject) || *subject == rt.dead_letter_subject;
    // A dead letter of a dead letter is kept once; when that fails too (two plugins whose
    // dead-letter subjects feed each other), it is only logged: nesting never runs away.
    if deadletter::is_dead_letter(ev) && (on_dead_letter_subject || deadletter::nesting(ev) > 1) {
        tracing::error!(plugin = %plugin, subject = %subject, event_id = %id, attempts,
            "a dead letter failed in its handler and is not dead-lettered again: {failure}");
        return None;
    }
    tracing::error!(plugin = %plugin, subject = %subject, event_id = %id, attempts,
        dead_letter = %rt.dead_letter_subject, "event dead-lettered: {failure}");
    let mut dead = deadletter::dead_letter_event(ev, plugin, &rt.dead_letter_subject, failure, attempts);
    if of == DeadOf::Delivery {
        deadletter::mark_failed_in(&mut dead, plugin);
    }
    let kept_whole = rt.dead_letters.keep(plugin, dead.clone(), record).await;
    Some((dead, kept_whole))
}

/// Publishes the dead letter of the event `id` (`kept_whole`: this host's store kept it);
/// `Err` when the transport did not take it.
async fn publish_dead_letter(rt: &PluginRuntime, id: &str, dead: Event, kept_whole: bool) -> Result<(), ()> {
    rt.transport.publish_dead_letter(Arc::new(dead), kept_whole).await.map_err(|e| {
        let kept = if kept_whole { "kept here" } else { "too large to keep here" };
        tracing::error!(plugin = %rt.name, event_id = %id, "dead letter {kept} and not published: {e}");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn attempts_in_flight_are_the_run_permits_taken_and_the_peak_stays() {
        let permits = RunPermits::new(3);
        assert_eq!((permits.in_flight(), permits.peak()), (0, 0));
        let (a, b) = (permits.acquire().await, permits.acquire().await);
        assert_eq!((permits.in_flight(), permits.peak()), (2, 2));
        drop(a);
        let c = permits.acquire().await;
        assert_eq!((permits.in_flight(), permits.peak()), (2, 2));
        let d = permits.acquire().await;
        assert_eq!((permits.in_flight(), permits.peak()), (3, 3));
        // A fourth waits for one of the three.
        let fourth = tokio::time::timeout(std::time::Duration::from_millis(50), permits.acquire()).await;
        assert!(fourth.is_err(), "a fourth attempt ran beside three");
        drop((b, c, d));
        assert_eq!((permits.in_flight(), permits.peak()), (0, 3));
        // Zero is read as one: a plugin always runs.
        let one = RunPermits::new(0);
        let _p = one.acquire().await;
        assert_eq!(one.in_flight(), 1);
    }

    #[test]
    fn pending_is_exact_when_deliveries_settle_on_other_threads() {
        let stats = Arc::new(PluginStats::default());
        let event = Arc::new(Event::new("a.b", "{}"));
        let tickets: Vec<usize> = (0..4).map(|_| stats.admit(&event)).collect();
        assert_eq!(stats.pending(), 4);
        // Settled on other threads than the one that admitted them, one at a time: the count
        // never reads below what is still pending.
        for (left, ticket) in (0..4u64).rev().zip(tickets) {
            let s = stats.clone();
            std::thread::spawn(move || s.settle(ticket)).join().unwrap();
            assert_eq!(stats.pending(), left);
        }
        // A ticket settled twice is not counted twice.
        let ticket = stats.admit(&event);
        stats.settle(ticket);
        stats.settle(ticket);
        assert_eq!(stats.pending(), 0);
        assert!(stats.pending_ids().is_empty());
    }
}
