//! The embedded bus: an in-process transport, the default, needing no server.
//!
//! Each subscription has its own queue, bounded in deliveries (`flow.queue`) and in the bytes
//! its deliveries hold until they go (`flow.buffer_mib`: what has no room waits behind the
//! queue). On the in-memory bus a producer's [`Transport::publish`] waits while a matching
//! subscription's queue is full (backpressure). On the durable log such a plugin falls behind
//! instead ([`Overflow::fall_behind`]): new events for it wait in the log and its read-back
//! delivers them in order, so a slow plugin holds up no producer, and so no other plugin, until
//! `flow.backlog_mib` of events wait there for it (then its producers wait). Nothing is
//! dropped. A subscription on the durable log catches up with it before it takes
//! events live (see [`Intake`]). A handler's
//! outputs ([`Transport::publish_output`]) never wait on a queue: a plugin's outputs can come
//! back to its own queue (a countdown, a `>` subscriber), and waiting there while holding the
//! plugin's capacity would wait forever. They go behind the queue into the subscription's
//! overflow, bounded in bytes (`flow.buffer_mib`); past that bound the output is refused
//! ([`TransportError::Full`]) and dispatch retries it, so a runaway plugin fills only its own
//! buffer. Past it, a plugin holding less than an equal share of it is still taken (up to
//! twice the bound in all): a plugin flooding another's buffer is refused alone. Observers (the
//! live tail) never slow the bus: they miss events instead, and the miss is counted and logged.

use super::log::{Appended, Delivered, DurableLog, LogError, SentAppend};
use crate::event::Event;
use crate::metrics::PluginLabels;
use crate::rpc::{Replies, RequestError};
use crate::subject::{PatternSet, validate_subject};
use crate::transport::{
    Acker, Delivery, Observed, ObserverSender, Subscription, SubscriptionSpec, Transport, TransportError,
};
use async_trait::async_trait;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

struct Sub {
    id: u64,
    plugin: Arc<str>,
    patterns: PatternSet,
    tx: mpsc::Sender<Delivery>,
    overflow: Arc<Overflow>,
}

impl Sub {
    /// Whether a producer's `event` is for this subscription: its subject matches, and it is not
    /// the replay of another plugin's dead letter (`replay_for`, the event's
    /// [`crate::deadletter::replay_for`]). Such a replay goes to its plugin alone: every other
    /// subscriber would let it go unrun, and waiting for room in one of them (a co-subscriber
    /// stuck with a full queue) held the replay back until the API gave up on it.
    fn takes(&self, event: &Event, replay_for: Option<&str>) -> bool {
        self.patterns.matches(&event.subject) && replay_for.is_none_or(|p| *p == *self.plugin)
    }
}

/// Settles a delivery in the durable log: handled or dead-lettered, it is not delivered again;
/// handed back (`nak`), it stays pending and runs again at the next start.
struct LogAck {
    log: Arc<DurableLog>,
    plugin: Arc<str>,
    seq: u64,
    /// The subscription that took it, kept until the delivery is gone: a later subscription of
    /// the plugin reads the log back only once nothing an earlier one took is left
    /// ([`Load::earlier`]); counted in its `in_hand` meanwhile (a replay waits for none).
    taken_by: Arc<Overflow>,
    /// Acked (or dead-lettered): the log forgot it then.
    settled: std::sync::atomic::AtomicBool,
    /// What it holds of its subscription's room in hand ([`Overflow::held`]), given back when
    /// it goes.
    held: u64,
}

impl LogAck {
    /// Settles it in the log (handled or dead-lettered), but one a replay's history includes,
    /// taken before the replay began, stays pending: the replay's read-back runs it again in its
    /// place. Decided and sent under the overflow's lock, so every ack is either sent before the
    /// replay's backfill (which makes it pending again) or keeps it pending: none is lost to the
    /// history, whatever ends the wait (a removal, a crash, retention).
    fn settle(&self) {
        self.settled.store(true, Ordering::Relaxed);
        if self.seq >= super::log::REQUEST_KEYS {
            return self.log.ack(self.plugin.clone(), self.seq);
        }
        let state = self.taken_by.state.lock().expect("overflow poisoned");
        if let Some((_, since_ms)) = state.replay_holds.as_ref().filter(|(held, _)| held.contains(&self.seq)) {
            self.log.ack_for_replay(self.plugin.clone(), self.seq, *since_ms);
        } else {
            self.log.ack(self.plugin.clone(), self.seq);
        }
    }
}

#[async_trait]
impl Acker for LogAck {
    async fn ack(&self) {
        self.settle();
    }
    async fn nak(&self, _delay: std::time::Duration) {}
    async fn term(&self) {
        self.settle();
    }
    fn position(&self) -> Option<(Arc<str>, u64)> {
        Some((self.plugin.clone(), self.seq))
    }
}

impl Drop for LogAck {
    /// Settled, or gone unsettled (handed back, or dropped with its queue): either way no
    /// longer a read-back's delivery (see [`DurableLog::forget_redelivered`]).
    fn drop(&mut self) {
        if !self.settled.load(Ordering::Relaxed) {
            self.log.forget_redelivered(&self.plugin, self.seq);
        }
        if self.seq < super::log::REQUEST_KEYS {
            self.taken_by.in_hand.fetch_sub(1, Ordering::AcqRel);
        }
        self.taken_by.release(self.held);
    }
}

/// The acker of a delivery on the in-memory bus: nothing to settle; gives its room in hand
/// back to its subscription when it goes.
struct Held {
    overflow: Arc<Overflow>,
    held: u64,
}

#[async_trait]
impl Acker for Held {
    async fn ack(&self) {}
    async fn nak(&self, _delay: std::time::Duration) {}
    async fn term(&self) {}
    fn acks_nothing(&self) -> bool {
        true
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        self.overflow.release(self.held);
    }
}

/// An event appended for some plugins whose producer or publisher has yet to decide, for each,
/// whether it goes to it live ([`Intake`]): marked in each one's [`Overflow::undecided`] before
/// a later append gets its sequence number, unmarked when dropped (after the decisions, or when
/// they are given up). A plugin that falls behind meanwhile takes such events live when decided
/// (`Intake::late`).
#[derive(Default)]
struct Deciding {
    overflows: Vec<Arc<Overflow>>,
    seq: std::sync::OnceLock<u64>,
}

impl Deciding {
    fn mark(&self, seq: u64) {
        for overflow in &self.overflows {
            overflow.undecided.lock().expect("undecided poisoned").insert(seq);
        }
        let _ = self.seq.set(seq);
    }
}

impl Drop for Deciding {
    fn drop(&mut self) {
        if let Some(seq) = self.seq.get() {
            for overflow in &self.overflows {
                overflow.undecided.lock().expect("undecided poisoned").remove(seq);
            }
        }
    }
}

/// Where an event stands in the log: not logged (in-memory bus), or its sequence number.
#[derive(Clone, Copy)]
struct Logged(Option<u64>);

impl Overflow {
    /// The delivery of `event` to the plugin, holding its cost of the room in hand until it goes
    /// (settled and let go, or dropped with the queue).
    fn delivery(self: &Arc<Self>, event: Arc<Event>, logged: Logged) -> Delivery {
        let held = event.buffered_cost();
        self.held.fetch_add(held, Ordering::AcqRel);
        match (logged.0, &self.log) {
            (Some(seq), Some(log)) => {
                // Read back after a restart: its kv writes may have committed with an outbox,
                // read with it.
                let (redelivered, handled) = log.take_read_back(&self.plugin, seq);
                if seq < super::log::REQUEST_KEYS {
                    self.in_hand.fetch_add(1, Ordering::AcqRel);
                }
                Delivery {
                    acker: Box::new(LogAck {
                        log: log.clone(),
                        plugin: self.plugin.clone(),
                        seq,
                        taken_by: self.clone(),
                        settled: false.into(),
                        held,
                    }),
                    handled,
                    redelivered,
                    ..Delivery::once(event)
                }
            }
            _ => Delivery { acker: Box::new(Held { overflow: self.clone(), held }), ..Delivery::once(event) },
        }
    }

    /// Whether a delivery of `cost` bytes may be made now: the plugin's deliveries in hand (in its
    /// queue, or taken by its worker: admitted, running, backing off, waiting to settle) hold at
    /// most its budget, or it is the only one. Without this bound its `flow.queue` queued and
    /// `flow.queue` admitted deliveries of 1 MiB each were 2 GiB held for one plugin.
    /// (`bound`: the budget, or more for a plugin's request, see [`Overflow::bound_for`].)
    fn room_in_hand(&self, cost: u64, bound: u64) -> bool {
        // SeqCst with `pump_waits`: the pump sets that, then looks here; `release` takes off
        // here, then looks there. One of the two sees the other.
        let held = self.held.load(Ordering::SeqCst);
        held == 0 || held + cost <= bound
    }

    /// Whether `event` (of `cost` bytes, put in by `publisher`: a plugin's source, `None` for
    /// anyone else) may go into the queue now as far as room in hand goes (see
    /// [`Overflow::bound_for`]).
    fn room_for(&self, event: &Event, publisher: Option<&str>, cost: u64) -> bool {
        self.bound_for(event, publisher).is_none_or(|bound| self.room_in_hand(cost, bound))
    }

    /// The room in hand `event` (put in by `publisher`) may go up to: a request of this
    /// plugin's own has no bound (its requester is a delivery of this plugin, holding room in
    /// hand until the reply comes: waiting for that room would wait for itself). A plugin's
    /// request of a chain that passed through this plugin ([`crate::rpc::ASKED_THROUGH`]: A asks
    /// B, whose handler asks A, and a delivery of A waits for the chain's reply) may go up to
    /// three times the budget: past what this plugin's events (the budget) and other plugins'
    /// requests (twice it) may take, so they cannot stall it, while a plugin in the chain asking
    /// back flood after flood (each attempt up to `max_requests`) is still bounded. Another
    /// plugin's request may go up to twice the budget; a client's waits for room as an event
    /// does. Requests given up at once by their requesters (`?timeout=1ms`) would otherwise have
    /// the plugin hold `flow.queue` queued and as many admitted, of any size. Who asked is told
    /// by who put it in (a plugin's request is put in under its source, which the host sets),
    /// never by the event's own `source`, which a client's request sets as it likes.
    fn bound_for(&self, event: &Event, publisher: Option<&str>) -> Option<u64> {
        let Some(asker) = publisher.filter(|_| event.reply_to.is_some()) else { return Some(self.budget) };
        if asker.strip_prefix("plugbus/") == Some(&*self.plugin) {
            None
        } else if crate::rpc::passed_through(event, &self.plugin) {
            Some(self.budget.saturating_mul(3))
        } else {
            Some(self.budget.saturating_mul(2))
        }
    }

    /// Where `event` waits for room in hand among what waits: a request of this plugin's own
    /// ([`Place::Own`]) or of a chain that passed through it ([`Place::Chain`]) ahead of the rest
    /// (what waits may wait for room their requester holds; see [`Overflow::bound_for`]).
    fn place_of(&self, event: &Event, publisher: Option<&str>) -> Place {
        match self.bound_for(event, publisher) {
            None => Place::Own,
            Some(bound) if bound > self.budget.saturating_mul(2) => Place::Chain,
            Some(_) => Place::Behind,
        }
    }

    /// A delivery went, giving back `held` bytes of room in hand; wakes the pump if it waits
    /// for that.
    fn release(&self, held: u64) {
        self.held.fetch_sub(held, Ordering::SeqCst);
        self.wake_the_pump();
    }

    /// Wakes the pump if it waits for room in hand (`pump_waits`). The flag is loaded first:
    /// the swap writes its cache line, which every release would otherwise pull to its core
    /// while the pump does not wait (almost always).
    fn wake_the_pump(&self) {
        if self.pump_waits.load(Ordering::SeqCst) && self.pump_waits.swap(false, Ordering::SeqCst) {
            self.released.notify_waiters();
        }
    }
}

/// What waits behind a full queue, in order (outputs, requests, events read back from the log,
/// and on the durable bus producers' events behind those), and the task that moves it into the
/// queue.
struct Overflow {
    state: Mutex<OverflowState>,
    /// The most bytes that may wait.
    budget: u64,
    /// The most bytes of producers' events that may wait in the log for a plugin that fell
    /// behind or catches up (`flow.backlog_mib`; never below `budget`); 0: a live plugin never
    /// falls behind, its producers wait for its queue (see [`Overflow::fall_behind`]).
    backlog: u64,
    plugin: Arc<str>,
    log: Option<Arc<DurableLog>>,
    /// Woken when what waits drops to the budget or below (producers wait for that) or to half
    /// of it (a read-back waits for that).
    drained: tokio::sync::Notify,
    /// Set when the plugin unsubscribes: its read-back stops (its worker may still drain the
    /// queue, so the queue is not closed yet), and leaves the rest to the next subscription.
    unsubscribed: std::sync::atomic::AtomicBool,
    /// Whether the subscription's read-back (see [`Intake`]) is still going: a replay waits for
    /// that (it would make pending again what the read-back has yet to read, and both would
    /// deliver it).
    reading_back: std::sync::atomic::AtomicBool,
    /// A replay waiting to take the read-back over ([`ReadBackDone`] hands it over as it ends;
    /// the read-back of a plugin that fell behind ends early for it, see
    /// [`Overflow::taken_over`]).
    take_over: Mutex<Option<tokio::sync::oneshot::Sender<ReadBackDone>>>,
    /// Deliveries of logged events made and not gone yet (in the queue, or taken by the worker).
    in_hand: std::sync::atomic::AtomicUsize,
    /// Bytes the deliveries made and not gone yet hold ([`Overflow::room_in_hand`]).
    held: AtomicU64,
    /// Events appended for the plugin whose producer or publisher has yet to decide whether
    /// they go to it live ([`Deciding`]): marked before a later append gets its sequence number.
    undecided: Mutex<std::collections::BTreeSet<u64>>,
    /// `plugbus_fell_behind_total{plugin}`: how often it fell behind its producers.
    fell_behind: Counter,
    /// Set by the pump while it waits for room in hand; woken through `released`.
    pump_waits: std::sync::atomic::AtomicBool,
    released: tokio::sync::Notify,
    /// Queue slots producers hold while they wait for another target's (`EmbeddedBus::hold_and_wait`):
    /// at most half the queue, so the plugin's own events keep the rest.
    held_across: std::sync::atomic::AtomicUsize,
    /// Woken when one of those is let go.
    held_across_freed: tokio::sync::Notify,
}

/// One of a plugin's queue slots a producer holds while it waits for another target's
/// ([`Overflow::hold_across`]); counted until dropped.
struct HeldAcross(Arc<Overflow>);

impl Drop for HeldAcross {
    fn drop(&mut self) {
        self.0.held_across.fetch_sub(1, Ordering::Relaxed);
        self.0.held_across_freed.notify_waiters();
    }
}

/// Whether a durable subscription takes what the log accepts for it as it is accepted, or
/// leaves it to its read-back.
///
/// A subscription on the durable log starts catching up: its read-back delivers, in the log's
/// order, what the last run left unsettled, a new `deliver = "all"` plugin's history, and then
/// every event accepted for it since it subscribed (each has a pending row in the log), until
/// nothing is left to read. Only then do new events go to it live, behind whatever waits in its
/// overflow. A replay catches up again: its history, then what was accepted since it began. So
/// an event never overtakes an older one of the log for the same plugin, however long the
/// history, and no producer waits for a read-back (only for room: in the queue, and once live
/// in the overflow).
/// JetStream's durable consumer delivers in stream order too. The exception: a read-back that
/// cannot read or commit the log for 2 s lets new events through live
/// ([`CATCH_UP_WHILE_FAILING`]).
///
/// Each event is decided once, when the producer or publisher that appended it looks (after the
/// append, which may be late): by its sequence number, which says whether a read-back reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Intake {
    /// Below this, events are the read-backs'; from it on they go live, unless it is catching
    /// up. (0 on the in-memory bus, which logs nothing.)
    read_to: u64,
    /// While a read-back catches up: events from `read_from` on are left in the log for it, and
    /// `skipped` is the highest sequence number left so (it may not be committed yet: an
    /// output is logged without waiting).
    catching_up: Option<CatchingUp>,
    /// Events appended before the plugin fell behind whose producer or publisher had not
    /// decided them then ([`Overflow::undecided`]): they go live whenever decided. Its
    /// read-back reads only from where it fell behind, and once it caught up, `read_to` is past
    /// them: without this they would be the read-back's, and nobody's until the next start.
    late: std::collections::BTreeSet<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct CatchingUp {
    /// Where it began catching up: the log's next sequence number then (0 for a new
    /// subscription).
    since: u64,
    /// Where its read-back reads from (at most `since`): for a replay, its first sequence number
    /// or, if lower, where live deliveries began. An event from here on whose producer decides
    /// it late is the read-back's (pending, read in its place), not live as well.
    read_from: u64,
    skipped: Option<u64>,
    /// Outputs left in the log for the read-back and not read yet, by sequence number, with
    /// what each counts against the budget (nothing for as many as its queue holds): the bound
    /// on what a flooding plugin makes wait in the log for one catching up, as the queue and
    /// overflow are for one live.
    left: std::collections::BTreeMap<u64, (u64, Option<Arc<str>>)>,
    /// Their sum (producers' events and outputs).
    left_bytes: u64,
    /// Their sum by publishing plugin (the shares past the budget, as `OverflowState::by_plugin`).
    left_by_plugin: std::collections::HashMap<Arc<str>, u64>,
    /// The read-back has taken everything pending below this (nothing below is counted in
    /// `left`: an output it read before its publisher looked).
    read_below: u64,
}

impl CatchingUp {
    /// Bytes of the outputs left in the log for the read-back and charged (what publishing
    /// plugins make wait there, bounded by their shares in `check_room`).
    fn outputs_bytes(&self) -> u64 {
        self.left_by_plugin.values().sum()
    }

    /// Bytes of the producers' events left in the log for the read-back and charged (bounded by
    /// `flow.backlog_mib` in `room_for_a_producer`, apart from the outputs).
    fn producers_bytes(&self) -> u64 {
        self.left_bytes - self.outputs_bytes()
    }

    /// Counts an output left in the log at `seq` for the read-back (charged `cost`).
    fn leave(&mut self, seq: u64, cost: u64, publisher: Option<Arc<str>>) {
        if seq < self.read_below {
            return;
        }
        // Only what is charged makes a share (as in the overflow, where all of it is).
        if let Some(p) = publisher.as_ref().filter(|_| cost > 0) {
            *self.left_by_plugin.entry(p.clone()).or_default() += cost;
        }
        self.left_bytes += cost;
        if let Some((old, old_publisher)) = self.left.insert(seq, (cost, publisher)) {
            self.forget(old, old_publisher);
        }
    }

    /// The read-back took everything pending below `read_below`: what was counted there is off
    /// the count (read, or never logged: an output the log dropped as a duplicate).
    fn read_to(&mut self, read_below: u64) {
        self.read_below = self.read_below.max(read_below);
        // (Split off, not scanned: a backlog may hold millions, and this runs under the lock.)
        let unread = self.left.split_off(&self.read_below);
        for (cost, publisher) in std::mem::replace(&mut self.left, unread).into_values() {
            self.forget(cost, publisher);
        }
    }

    fn forget(&mut self, cost: u64, publisher: Option<Arc<str>>) {
        self.left_bytes -= cost;
        if let Some(p) = publisher.filter(|_| cost > 0)
            && let Some(held) = self.left_by_plugin.get_mut(&p)
        {
            *held -= cost;
            if *held == 0 {
                self.left_by_plugin.remove(&p);
            }
        }
    }
}

impl Intake {
    /// Whether the event at `seq` goes to the plugin now; `false`: a read-back delivers it.
    fn goes_live(&mut self, seq: u64) -> bool {
        if self.late.remove(&seq) {
            return true;
        }
        if let Some(c) = &mut self.catching_up
            && seq >= c.read_from
        {
            c.skipped = Some(c.skipped.map_or(seq, |s| s.max(seq)));
            return false;
        }
        seq >= self.read_to
    }

    /// Hands over to live deliveries: events from `read_to` on go live.
    fn live_from(&mut self, read_to: u64) {
        self.read_to = self.read_to.max(read_to);
        self.catching_up = None;
    }
}

/// Where a read-back that found nothing more to read stands.
enum CatchUp {
    /// Done: new events go to the plugin live.
    Done,
    /// An event left to the log, up to this one, may not be committed yet: wait for the log,
    /// then read again.
    Uncommitted(u64),
}

/// Who put an event into an overflow: a plugin (its outputs, requests and dead letters, whose
/// `source` the host sets: `plugbus/<plugin>`), or anyone else (a producer's event or request,
/// whose `source` is the client's; an event read back from the log), who gets no share of its
/// own.
#[derive(Clone, Copy)]
enum Publisher<'a> {
    Plugin(&'a str),
    Other,
}

/// An event waiting in an overflow: the event, its cost, its place in the log and who
/// published it (a plugin's source, to take it off its tally when it leaves).
type Waiting = (Arc<Event>, u64, Logged, Option<Arc<str>>);

/// Where a delivery waits for room in hand, in this order: each place behind the ones before it,
/// in the order they came ([`Overflow::place_of`]). A plugin's own request needs no room, so
/// it never waits behind a chain's request that needs some.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Place {
    Own,
    Chain,
    Behind,
}

#[derive(Default)]
struct OverflowState {
    events: VecDeque<Waiting>,
    bytes: u64,
    /// What waits, by publishing plugin: past the budget, a plugin holding less than an equal
    /// share of it is still taken, so one plugin flooding another's buffer is refused alone.
    by_plugin: std::collections::HashMap<Arc<str>, u64>,
    pumping: bool,
    /// Whether new events go to the plugin live or are left to the read-back.
    intake: Intake,
    /// While a replay waits for what the plugin took before it began: the sequence numbers its
    /// history may hold (its first up to the log's next then), and its time (`since_ms`, 0 for
    /// none). A delivery of one of its history settled meanwhile stays pending
    /// ([`LogAck::settle`]).
    replay_holds: Option<(std::ops::Range<u64>, u64)>,
    /// When falling behind was last logged (once a minute at most).
    told_fell_behind: Option<Instant>,
    /// When a backlog held back by a low disk was last logged (once a minute at most).
    told_disk_low: Option<Instant>,
}

impl OverflowState {
    fn add(&mut self, publisher: Option<&Arc<str>>, cost: u64) {
        self.bytes += cost;
        if let Some(p) = publisher {
            *self.by_plugin.entry(p.clone()).or_default() += cost;
        }
    }

    fn remove(&mut self, publisher: Option<&Arc<str>>, cost: u64) {
        self.bytes -= cost;
        if let Some(p) = publisher
            && let Some(held) = self.by_plugin.get_mut(p)
        {
            *held -= cost;
            if *held == 0 {
                self.by_plugin.remove(p);
            }
        }
    }
}

impl Overflow {
    /// A subscription's overflow; on the durable log it starts catching up (see [`Intake`]).
    fn new(
        plugin: Arc<str>,
        budget: u64,
        backlog: u64,
        log: Option<Arc<DurableLog>>,
        fell_behind: Counter,
    ) -> Arc<Self> {
        let catching_up = log.is_some().then(CatchingUp::default);
        let intake = Intake { catching_up, ..Intake::default() };
        Arc::new(Self {
            state: Mutex::new(OverflowState { intake, ..OverflowState::default() }),
            budget,
            backlog,
            plugin,
            reading_back: log.is_some().into(),
            take_over: Mutex::default(),
            log,
            drained: tokio::sync::Notify::new(),
            unsubscribed: false.into(),
            in_hand: 0.into(),
            held: 0.into(),
            undecided: Mutex::default(),
            fell_behind,
            pump_waits: false.into(),
            released: tokio::sync::Notify::new(),
            held_across: 0.into(),
            held_across_freed: tokio::sync::Notify::new(),
        })
    }

    /// Leave to hold one of the plugin's `capacity` queue slots while waiting for another
    /// target's: while fewer than half of them are held so (at least one).
    fn hold_across(self: &Arc<Self>, capacity: usize) -> Option<HeldAcross> {
        let most = (capacity / 2).max(1);
        let counted =
            self.held_across.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < most).then_some(n + 1));
        counted.ok().map(|_| HeldAcross(self.clone()))
    }

    /// Whether an event the log accepted for the plugin at `logged` goes to it now; `false`:
    /// its read-back delivers it from the log, in order (see [`Intake`]).
    fn goes_live(state: &mut OverflowState, logged: Logged) -> bool {
        logged.0.is_none_or(|seq| state.intake.goes_live(seq))
    }

    /// Counts an event left in the log at `logged` for the read-back of one catching up (an
    /// output, `publisher` its plugin, or a producer's event): charged `cost` past as many as
    /// its queue holds, as it would be in the queue and behind it (see `check_room` and
    /// `room_for_a_producer`).
    fn left_in_log(
        state: &mut OverflowState,
        tx: &mpsc::Sender<Delivery>,
        logged: Logged,
        cost: u64,
        publisher: Option<Arc<str>>,
    ) {
        if let (Some(c), Some(seq)) = (state.intake.catching_up.as_mut(), logged.0) {
            let charged = if c.left.len() >= tx.max_capacity() { cost } else { 0 };
            c.leave(seq, charged, publisher);
        }
    }

    /// Where the read-back stops reading: nowhere while it catches up, else where live
    /// deliveries begin.
    fn read_back_end(&self) -> u64 {
        let intake = &self.state.lock().expect("overflow poisoned").intake;
        if intake.catching_up.is_some() { super::log::REQUEST_KEYS } else { intake.read_to }
    }

    /// The read-back found nothing pending from `from` on: whether it caught up (new events then
    /// go to the plugin live, behind what it read). `committed`: every event up to this sequence
    /// number was committed or dropped before that read (one left and still not read was not
    /// logged: a duplicate output). After [`Overflow::stop_catching_up`] it is done once it read
    /// the committed events below where live deliveries begin.
    fn catch_up_at(&self, from: u64, committed: Option<u64>) -> CatchUp {
        let is_committed = |seq: u64| committed.is_some_and(|c| seq <= c);
        let mut state = self.state.lock().expect("overflow poisoned");
        let Some(skipped) = state.intake.catching_up.as_ref().map(|c| c.skipped) else {
            let live = state.intake.read_to;
            if from < live && !is_committed(live - 1) {
                return CatchUp::Uncommitted(live - 1);
            }
            return CatchUp::Done;
        };
        let unread = skipped.filter(|s| *s >= from);
        if let Some(s) = unread.filter(|s| !is_committed(*s)) {
            return CatchUp::Uncommitted(s);
        }
        state.intake.live_from(from.max(unread.map_or(0, |s| s + 1)));
        // Producers waiting for what was left in the log look at its overflow now.
        self.drained.notify_waiters();
        CatchUp::Done
    }

    /// Waits before a read-back tries the log again after it failed (to read, or to commit what
    /// was left in it); once it has failed for [`CATCH_UP_WHILE_FAILING`] with no read or commit
    /// going through in between, new events
    /// go live (a reopening log answers again within a second; one that does not must not keep
    /// them from the plugin).
    async fn wait_out_failure(&self, plugin: &str, since: &mut Option<Instant>, retry_in: &mut Duration, read: u64) {
        let failing_for = since.get_or_insert_with(Instant::now).elapsed();
        if failing_for >= CATCH_UP_WHILE_FAILING && self.stop_catching_up(read) {
            tracing::warn!(
                plugin,
                "new events go to the plugin as they are accepted while the event log fails: \
                 one may run before an older event of its key that is still to be read back"
            );
        }
        // Tried again by then at the latest, to let them through in time.
        let until_live = CATCH_UP_WHILE_FAILING.saturating_sub(failing_for);
        tokio::time::sleep(if until_live.is_zero() { *retry_in } else { (*retry_in).min(until_live) }).await;
        *retry_in = (*retry_in * 2).min(LOAD_RETRY_MAX);
    }

    /// Starts catching up again (a replay whose history begins at `first`): answers the log's
    /// next sequence number and where the read-back reads from. Events accepted for the plugin
    /// from then on wait in the log behind the history; so do those accepted before whose
    /// producer has yet to decide them, from the history's first or where live deliveries
    /// began, whichever is lower (the read-back reads everything pending from there, the
    /// backfill being sent after their appends): none of them goes live after the history.
    fn catch_up_from_now(&self, log: &DurableLog, first: u64, since_ms: u64) -> (u64, u64) {
        let mut state = self.state.lock().expect("overflow poisoned");
        let since = log.next_seq_sent();
        let intake = &mut state.intake;
        // Still catching up (a replay took over the read-back of a plugin that fell behind, see
        // `Overflow::taken_over`): what is left in the log for it stays counted, and is read.
        let earlier = intake.catching_up.take();
        let read_from = first.min(intake.read_to).min(since).min(earlier.as_ref().map_or(u64::MAX, |c| c.read_from));
        // Its read-back reads those from where it reads on (they are pending); those below still go
        // live when decided.
        intake.late.retain(|seq| *seq < read_from);
        // Nothing below where it reads from is left to it.
        intake.catching_up =
            Some(CatchingUp { since, read_from, read_below: read_from, ..earlier.unwrap_or_default() });
        // What the plugin took before now and settles from now on stays pending in the history.
        state.replay_holds = Some((first..since, since_ms));
        (since, read_from)
    }

    /// Whether anything the log holds for the plugin is in its hands or on its way there (a
    /// delivery not gone yet, or an event waiting in the overflow); the replay's hold stays.
    fn holds_any(&self) -> bool {
        let state = self.state.lock().expect("overflow poisoned");
        Self::holding(self, &state)
    }

    fn holding(&self, state: &OverflowState) -> bool {
        self.in_hand.load(Ordering::Acquire) > 0
            || state.events.iter().any(|(_, _, logged, _)| logged.0.is_some_and(|seq| seq < super::log::REQUEST_KEYS))
    }

    /// Whether anything the log holds for the plugin is in its hands or on its way there (a
    /// delivery not gone yet, or an event waiting in the overflow); when nothing is, a replay's
    /// hold ends ([`OverflowState::replay_holds`]).
    fn holds_events(&self) -> bool {
        let mut state = self.state.lock().expect("overflow poisoned");
        let holds = self.holding(&state);
        if !holds {
            state.replay_holds = None;
        }
        holds
    }

    /// Stops catching up before the read-back is done (it cannot read or commit the log now, or
    /// it ended): events from `read` on, from where it began catching up on (`since`), and past
    /// every one left to the log so far go to the plugin live; the read-back reads only below
    /// that (waiting for what was left there uncommitted). A new event may then run before an
    /// older one of its key. `false` when it was not catching up.
    fn stop_catching_up(&self, read: u64) -> bool {
        let mut state = self.state.lock().expect("overflow poisoned");
        let Some(CatchingUp { since, skipped, .. }) = state.intake.catching_up.take() else { return false };
        state.intake.live_from(read.max(since).max(skipped.map_or(0, |s| s + 1)));
        self.drained.notify_waiters();
        true
    }

    /// Whether `event`, of `cost` bytes, can be taken now (into the queue or behind it, or, for
    /// an output to one catching up (`into_log`), into the log). The bound is the budget, or for
    /// other plugins' outputs in the log half the backlog (while the disk keeps its reserve).
    /// Past it, a publisher that holds less than an equal share of it (among the publishers that
    /// have events waiting) is taken still, up to twice the bound in all: a plugin flooding
    /// another's buffer is refused alone, and the outputs of the others are not retried and
    /// dead-lettered for it. The plugin's own outputs in the log are bounded by what it holds
    /// there itself, against the budget.
    fn check_room(
        &self,
        state: &OverflowState,
        tx: &mpsc::Sender<Delivery>,
        publisher: Publisher<'_>,
        into_log: bool,
        cost: u64,
    ) -> Result<(), TransportError> {
        // What waits for it where this one would: an output for one catching up is left in the
        // log (as many as its queue holds uncharged, as they would be in the queue); anything
        // else (a request is never logged) goes to the queue or behind it.
        // In the log, only outputs count here: producers' events left there are bounded apart
        // (`flow.backlog_mib`, in `room_for_a_producer`), so a plugin fallen behind its producers
        // refuses no other plugin's output for them.
        let in_log = matches!(publisher, Publisher::Plugin(_)) && into_log && self.log.is_some();
        let (waiting, count, by_plugin, queue_has_room) = match state.intake.catching_up.as_ref() {
            Some(c) if in_log => (c.outputs_bytes(), c.left.len(), &c.left_by_plugin, c.left.len() < tx.max_capacity()),
            _ => (state.bytes, state.events.len(), &state.by_plugin, state.events.is_empty() && tx.capacity() > 0),
        };
        if queue_has_room || tx.is_closed() || waiting + cost <= self.budget {
            return Ok(());
        }
        let in_log = in_log && state.intake.catching_up.is_some();
        // Its own outputs waiting in the log (a plugin that feeds itself): bounded by its buffer,
        // as when it is live, whatever other plugins' outputs wait there (counting theirs, a
        // flood into it would fail its own outputs for every other subscriber too).
        if let Publisher::Plugin(source) = publisher
            && in_log
            && self.is_own(publisher)
        {
            let held = by_plugin.get(source).copied().unwrap_or(0);
            if held + cost <= self.budget {
                return Ok(());
            }
            return Err(TransportError::Full(format!(
                "plugin {} has {held} bytes of its own outputs waiting for it in the event log while it catches up; \
                 its flow.buffer_mib is {} KiB",
                self.plugin,
                self.budget >> 10
            )));
        }
        // Other plugins' outputs waiting in the log for one behind may take half its backlog
        // (disk, not memory: all of it with the shares past the bound), while the disk keeps
        // its reserve, as producers' events may apart from them.
        let keeps_reserve = || self.log.as_ref().is_none_or(|log| log.disk_keeps_its_reserve());
        let (bound, bound_is) = match in_log {
            true if self.backlog / 2 > self.budget && keeps_reserve() => (self.backlog / 2, "flow.backlog_mib / 2 is"),
            _ => (self.budget, "flow.buffer_mib is"),
        };
        if waiting + cost <= bound {
            return Ok(());
        }
        let mut share = None;
        if let Publisher::Plugin(source) = publisher {
            let held = by_plugin.get(source).copied().unwrap_or(0);
            let publishers = (by_plugin.len() + usize::from(held == 0)) as u64;
            let equal = bound / publishers;
            if held + cost <= equal && waiting + cost <= bound.saturating_mul(2) {
                return Ok(());
            }
            share = Some((crate::event::quoted(source), held, publishers, equal));
        }
        let where_ = if in_log { "in the event log while it catches up" } else { "beyond its queue" };
        let mut why = format!(
            "plugin {} has {} events ({} bytes) waiting {where_}; its {bound_is} {} KiB",
            self.plugin,
            count,
            waiting,
            bound >> 10
        );
        if let Some((source, held, publishers, equal)) = share {
            let each = match publishers {
                1 => "its one publisher".to_string(),
                n => format!("each of the {n} publishers"),
            };
            why.push_str(&format!("; past it {each} may hold {equal} bytes, and {source} holds {held}"));
        }
        Err(TransportError::Full(why))
    }

    /// Whether `publisher` is this plugin itself (its own output, `plugbus/<plugin>`).
    fn is_own(&self, publisher: Publisher<'_>) -> bool {
        matches!(publisher, Publisher::Plugin(source)
            if source.strip_prefix("plugbus/").is_some_and(|name| name == &*self.plugin))
    }

    /// Takes `event` without waiting: straight into the queue when it has room and nothing waits
    /// before it, else behind the queue. The caller checked the room.
    fn take(
        self: &Arc<Self>,
        state: &mut OverflowState,
        tx: &mpsc::Sender<Delivery>,
        event: &Arc<Event>,
        publisher: Publisher<'_>,
        cost: u64,
        logged: Logged,
    ) {
        let source = match publisher {
            Publisher::Plugin(source) => Some(source),
            Publisher::Other => None,
        };
        // Its own request (or a chain's through it) goes ahead of what waits: that may wait for
        // room its requester holds.
        let place = self.place_of(event, source);
        if (state.events.is_empty() || place != Place::Behind) && self.room_for(event, source, cost) {
            // Room first: the delivery is made only when it goes into the queue (making it takes
            // a read-back outbox, which a delivery thrown away would lose).
            match tx.try_reserve() {
                Ok(slot) => return slot.send(self.delivery(event.clone(), logged)),
                // Closed: unsubscribed meanwhile, the event is no longer for it.
                Err(mpsc::error::TrySendError::Closed(())) => return self.forget(logged),
                Err(mpsc::error::TrySendError::Full(())) => {}
            }
        }
        // (Its own request, then a chain's, first behind the queue: the pump takes them next,
        // its own room in hand or not, a chain's once it has room.)
        self.wait_behind(state, tx, (event.clone(), cost, logged, source.map(Arc::from)), place);
    }

    /// Puts `waiting` behind what waits at its `place` or before it (ahead of the rest: a
    /// plugin's own request, or a chain's through it, see [`Overflow::place_of`]), for the pump
    /// to move into the queue.
    fn wait_behind(
        self: &Arc<Self>,
        state: &mut OverflowState,
        tx: &mpsc::Sender<Delivery>,
        waiting: Waiting,
        place: Place,
    ) {
        state.add(waiting.3.as_ref(), waiting.1);
        if place != Place::Behind {
            // (What waits ahead of the rest is requests only, each made by an attempt that waits
            // for its reply, at most `max_requests` an attempt: the scan is bounded by those.)
            let at = state.events.iter().position(|(e, _, _, p)| self.place_of(e, p.as_deref()) > place);
            state.events.insert(at.unwrap_or(state.events.len()), waiting);
            // The pump may wait for room in hand for the one that was first, which only this
            // request's reply may free: it is woken to take this one (it waited for its 1 s
            // backstop).
            self.wake_the_pump();
        } else {
            state.events.push_back(waiting);
        }
        if !state.pumping {
            state.pumping = true;
            tokio::spawn(self.clone().pump(tx.clone()));
        }
    }

    /// Sends a producer's event into the queue slot it reserved (the producer waited for room:
    /// backpressure), behind whatever waits in the overflow: the slot then takes the oldest
    /// waiting event, and the new one waits last in its place.
    fn send_behind(
        self: &Arc<Self>,
        state: &mut OverflowState,
        slot: mpsc::OwnedPermit<Delivery>,
        event: &Arc<Event>,
        logged: Logged,
    ) {
        let cost = event.buffered_cost();
        // No room in hand for the next one: the event waits behind, and the slot is given back.
        let room = match state.events.front() {
            Some((first, first_cost, _, publisher)) => self.room_for(first, publisher.as_deref(), *first_cost),
            None => self.room_for(event, None, cost),
        };
        if !room {
            let tx = slot.release();
            return self.wait_behind(state, &tx, (event.clone(), cost, logged, None), Place::Behind);
        }
        let Some((first, first_cost, first_logged, publisher)) = state.events.pop_front() else {
            slot.send(self.delivery(event.clone(), logged));
            return;
        };
        state.remove(publisher.as_ref(), first_cost);
        slot.send(self.delivery(first, first_logged));
        state.add(None, cost);
        state.events.push_back((event.clone(), cost, logged, None));
        if state.bytes <= self.budget {
            self.drained.notify_waiters();
        }
    }

    /// Waits while a subscription has no room for a producer's event, holding nothing; answers
    /// whether the event goes to the log for its read-back (`true`) or to its queue, live. On the
    /// durable log, a live plugin whose queue is full, or with more than its budget waiting
    /// behind it, falls behind ([`Overflow::fall_behind`]) rather than hold up its producers,
    /// and with them every other plugin: producers wait only while more than
    /// `flow.backlog_mib` of their events waits in the log for it (since it began catching up,
    /// or fell behind; what it reads back from before was accepted already). On the in-memory
    /// bus, and with a backlog of 0, they wait while more than its budget waits behind its
    /// queue (a producer's event waits there when the plugin's deliveries in hand hold the
    /// budget: [`Overflow::room_in_hand`]), then for a slot in the queue. Producers that looked
    /// at once may each add one event past it.
    async fn room_for_a_producer(self: &Arc<Self>, tx: &mpsc::Sender<Delivery>) -> bool {
        let look = || {
            let mut state = self.state.lock().expect("overflow poisoned");
            // (The disk is looked at whatever is left: the first `flow.queue` events left
            // are charged nothing, and may be as large as any.)
            match state.intake.catching_up.as_ref().map(|c| (c.producers_bytes(), c.left.is_empty())) {
                Some((_, true)) => (true, true),
                Some((left, false)) => {
                    (left <= self.backlog.max(self.budget) && self.disk_keeps_its_reserve(&mut state), true)
                }
                None if tx.capacity() > 0 && state.bytes <= self.budget => (true, false),
                None if self.fall_behind(&mut state, tx) => (true, true),
                None => (state.bytes <= self.budget, false),
            }
        };
        // Room at the first look (almost always): no waiter is registered with `drained`, whose
        // list every producer of the plugin would otherwise lock twice per event.
        let (room, catching_up) = look();
        if room || tx.is_closed() {
            return catching_up;
        }
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            // Looked at again once `drained` is registered, so a wake-up between the two looks
            // is not missed.
            let (room, catching_up) = look();
            if room || tx.is_closed() {
                return catching_up;
            }
            // The timeout is a backstop: the wake-up is not missed (`drained` was made first).
            let _ = tokio::time::timeout(Duration::from_secs(1), drained).await;
        }
    }

    /// Whether the disk under the log keeps its reserve free ([`super::disk`]): a plugin's
    /// backlog grows only while it does, so one slow plugin does not fill the disk every
    /// producer appends to. Says so once a minute at most when it does not.
    fn disk_keeps_its_reserve(&self, state: &mut OverflowState) -> bool {
        let keeps = self.log.as_ref().is_none_or(|log| log.disk_keeps_its_reserve());
        if !keeps && state.told_disk_low.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            state.told_disk_low = Some(Instant::now());
            tracing::warn!(plugin = %self.plugin, waiting_bytes = state.intake.catching_up.as_ref().map_or(0, |c| c.left_bytes),
                "the disk under the event log keeps less than its reserve free (a tenth of it, up to 1 GiB): the \
                 plugin's backlog in the log stops growing, and its producers wait for it to read some back \
                 (logged once a minute at most)");
        }
        keeps
    }

    /// [`Overflow::slot_for_a_producer`] without waiting: `None` when the producer would wait.
    fn try_slot_for_a_producer(self: &Arc<Self>, tx: &mpsc::Sender<Delivery>) -> Option<Slot> {
        match tx.clone().try_reserve_owned() {
            Ok(permit) => Some(Slot::Reserved(permit)),
            // Unsubscribed meanwhile, the event is no longer for it.
            Err(mpsc::error::TrySendError::Closed(_)) => Some(Slot::Closed),
            Err(mpsc::error::TrySendError::Full(_)) if self.log.is_none() || self.backlog == 0 => None,
            Err(mpsc::error::TrySendError::Full(_)) => {
                let mut state = self.state.lock().expect("overflow poisoned");
                (state.intake.catching_up.is_some() || self.fall_behind(&mut state, tx)).then_some(Slot::Unreserved)
            }
        }
    }

    /// A queue slot for a producer's event to a live subscription; on the durable log, when the
    /// queue filled meanwhile, the plugin falls behind instead (`Unreserved`: the event goes to
    /// the log for its read-back). When it cannot (no backlog, the in-memory bus), the producer
    /// waits for a slot; while a read-back ends (it may fall behind once it did), it looks again
    /// every 10 ms.
    async fn slot_for_a_producer(self: &Arc<Self>, tx: &mpsc::Sender<Delivery>) -> Slot {
        let reserve = || async {
            match tx.clone().reserve_owned().await {
                Ok(permit) => Slot::Reserved(permit),
                // Unsubscribed meanwhile, the event is no longer for it.
                Err(_) => Slot::Closed,
            }
        };
        if self.log.is_none() || self.backlog == 0 {
            return reserve().await;
        }
        loop {
            if let Some(slot) = self.try_slot_for_a_producer(tx) {
                return slot;
            }
            if let Ok(slot) = tokio::time::timeout(Duration::from_millis(10), reserve()).await {
                return slot;
            }
        }
    }

    /// Makes a live subscription on the durable log fall behind: producers' events accepted for
    /// it from now on (from the log's next sequence number) wait in the log, pending, and a
    /// read-back of its own delivers them in order once its queue and overflow drain, then hands
    /// over to live deliveries again, as after a restart (see [`Intake`]). What it took before,
    /// in its queue or overflow, stays there; an event appended before and decided by its
    /// producer later goes live (`Intake::late`: the read-back reads only from where it fell
    /// behind). So a slow plugin never holds up its producers, and through them every other
    /// plugin, until `flow.backlog_mib` of events wait in the log for it. `false` when it
    /// cannot: no backlog allowed (`flow.backlog_mib = 0`), unsubscribed, or a read-back still
    /// running (one that could not read the log let new events through live, and reads below
    /// them).
    fn fall_behind(self: &Arc<Self>, state: &mut OverflowState, tx: &mpsc::Sender<Delivery>) -> bool {
        let Some(log) = &self.log else { return false };
        if self.backlog == 0 || self.is_gone(tx) || state.intake.catching_up.is_some() {
            return false;
        }
        if self.reading_back.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return false;
        }
        let since = log.next_seq_sent();
        // Every event below `since` was marked before `since` was answered. Those from `read_to`
        // on would go live; those below are a read-back's (one that ended may have read them
        // before their producer looked), but for those still late from an earlier fall.
        let live_from = state.intake.read_to.min(since);
        // (A poisoned lock is read all the same: a panic here would leave `reading_back` set.)
        let undecided = self.undecided.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let late = &mut state.intake.late;
        late.retain(|seq| undecided.contains(seq));
        late.extend(undecided.range(live_from..since));
        drop(undecided);
        state.intake.catching_up =
            Some(CatchingUp { since, read_from: since, read_below: since, ..CatchingUp::default() });
        self.fell_behind.inc();
        if state.told_fell_behind.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
            state.told_fell_behind = Some(Instant::now());
            tracing::info!(plugin = %self.plugin, queued = tx.max_capacity() - tx.capacity(),
                waiting_bytes = state.bytes,
                "the plugin fell behind: new events and other plugins' outputs for it wait in the event log (up to \
                 its flow.backlog_mib) and are read back in order as it drains; its producers, its publishers and \
                 other plugins go on (logged once a minute at most)");
        }
        let done = ReadBackDone(self.clone());
        let load = Load { from: since, earlier: Vec::new(), fell_behind: true };
        tokio::spawn(load.run(done, log.clone(), self.clone(), tx.clone(), self.plugin.clone()));
        true
    }

    /// An event that will not be delivered to it after all (its subscription ended): if it was
    /// read back, the log no longer counts it as a read-back's delivery.
    fn forget(&self, logged: Logged) {
        if let (Some(log), Some(seq)) = (&self.log, logged.0) {
            log.forget_redelivered(&self.plugin, seq);
        }
    }

    /// Whether an event logged at `logged` was appended after the subscription went (its targets
    /// were taken before): on the log it is pending for the plugin's next subscription, which
    /// gets it from there (a durable one as part of what was accepted while it was away), so the
    /// worker still draining this one must not run it too (review 63c F2: it ran twice).
    /// Checked after the append, which the log ordered after the plugin's `away` mark.
    fn gone_before(&self, logged: Logged) -> bool {
        logged.0.is_some() && self.unsubscribed.load(Ordering::Acquire)
    }

    /// Whether the subscription is gone: its read-back has nobody to read for.
    fn is_gone(&self, tx: &mpsc::Sender<Delivery>) -> bool {
        tx.is_closed() || self.unsubscribed.load(Ordering::Acquire)
    }

    /// Moves waiting events into the queue as it makes room, oldest first; ends when none wait.
    async fn pump(self: Arc<Self>, tx: mpsc::Sender<Delivery>) {
        loop {
            let Ok(slot) = tx.reserve().await else {
                // The plugin unsubscribed: what waited is no longer for it.
                let mut state = self.state.lock().expect("overflow poisoned");
                for (_, _, logged, _) in state.events.drain(..) {
                    self.forget(logged);
                }
                state.bytes = 0;
                state.by_plugin.clear();
                state.pumping = false;
                self.drained.notify_waiters();
                return;
            };
            // Room in hand for the oldest waiting (see `room_in_hand`), holding the slot.
            loop {
                let released = self.released.notified();
                tokio::pin!(released);
                released.as_mut().enable();
                self.pump_waits.store(true, Ordering::SeqCst);
                let room = match self.state.lock().expect("overflow poisoned").events.front() {
                    Some((first, cost, _, publisher)) => self.room_for(first, publisher.as_deref(), *cost),
                    None => true,
                };
                if room || tx.is_closed() {
                    break;
                }
                // The timeout is a backstop: the wake-up is not missed (`released` was made first).
                let _ = tokio::time::timeout(Duration::from_secs(1), released).await;
            }
            let mut state = self.state.lock().expect("overflow poisoned");
            let Some((event, cost, logged, publisher)) = state.events.pop_front() else {
                state.pumping = false;
                return;
            };
            state.remove(publisher.as_ref(), cost);
            if state.bytes <= self.budget {
                self.drained.notify_waiters();
            }
            slot.send(self.delivery(event, logged));
            if state.events.is_empty() {
                state.pumping = false;
                return;
            }
        }
    }

    fn waiting(&self) -> usize {
        self.state.lock().expect("overflow poisoned").events.len()
    }

    /// Whether a replay waits to take over a read-back of what was left in the log for the
    /// plugin since it fell behind, which then ends where it is, still catching up (see
    /// [`ReadBackDone`]): it may run as long as the plugin stays behind, and a replay must not
    /// wait for that. (Not once it stopped catching up: the replay would not read what it had
    /// yet to read below where live deliveries began.)
    fn taken_over(&self) -> bool {
        self.take_over.lock().expect("take-over poisoned").as_ref().is_some_and(|replay| !replay.is_closed())
            && self.state.lock().expect("overflow poisoned").intake.catching_up.is_some()
    }

    /// Hands the read-back to the replay waiting to take it over; `Err` (it is given back) when
    /// none waits any more.
    fn hand_over(&self, done: ReadBackDone) -> Result<(), ReadBackDone> {
        match self.take_over.lock().expect("take-over poisoned").take() {
            Some(replay) => replay.send(done),
            None => Err(done),
        }
    }

    /// The read-back, for a replay of the plugin: at once when none runs, else when the one
    /// running ends, or (one of what waits in the log since it fell behind) as soon as it is
    /// between pages; refused after [`REPLAY_WAITS_FOR_READ_BACK`] (another read-back may still
    /// run: of what the last run left, or another replay's). Called from a task no client can
    /// cancel: one handed over is never dropped unread.
    async fn read_back_for_a_replay(self: &Arc<Self>, plugin: &str) -> Result<ReadBackDone, TransportError> {
        let started = || self.reading_back.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok();
        if started() {
            return Ok(ReadBackDone(self.clone()));
        }
        let (to, mut handed) = tokio::sync::oneshot::channel();
        *self.take_over.lock().expect("take-over poisoned") = Some(to);
        // A read-back waiting for room looks again now.
        self.drained.notify_waiters();
        let deadline = tokio::time::Instant::now() + REPLAY_WAITS_FOR_READ_BACK;
        loop {
            match tokio::time::timeout(Duration::from_millis(10), &mut handed).await {
                Ok(Ok(done)) => return Ok(done),
                // Another replay took its place.
                Ok(Err(_)) => break,
                // Ended before it looked for a replay waiting.
                Err(_) if started() => {
                    self.take_over.lock().expect("take-over poisoned").take();
                    return Ok(ReadBackDone(self.clone()));
                }
                Err(_) if tokio::time::Instant::now() >= deadline => {
                    // None can be handed over from now on; one handed over already is taken.
                    handed.close();
                    if let Ok(done) = handed.try_recv() {
                        return Ok(done);
                    }
                    break;
                }
                Err(_) => {}
            }
        }
        Err(TransportError::Broker(format!(
            "replay of {plugin}: the plugin is still reading back from the event log (what its last run left \
             unsettled, or a replay; a replay now would deliver some of it twice); try again once that is done"
        )))
    }
}

/// A subscription's read-back: deliveries read from the log into its overflow in the log's
/// order, a page at a time while the overflow has room (a long history never sits in memory at
/// once), until it caught up (see [`Intake`]).
struct Load {
    /// Everything the plugin has pending from this sequence number on: from 0 when it subscribes
    /// (what the last run left, a new plugin's history and what was accepted since), from a
    /// replay's `CatchingUp::read_from` (its history, made pending again, and what was pending
    /// already, in order, then what was accepted since).
    from: u64,
    /// The plugin's earlier subscriptions (it was removed and installed again): nothing is read
    /// until every delivery they took is gone (handled and settled, or handed back), and their
    /// acks are committed. Read before, what they still held is pending, and would run twice.
    earlier: Vec<std::sync::Weak<Overflow>>,
    /// It reads what was left in the log for a live plugin that fell behind its producers
    /// ([`Overflow::fall_behind`]), not what it is delivered again.
    fell_behind: bool,
}

/// Events read from the log per page.
const LOAD_PAGE: usize = 1024;

/// How long a replay waits for the plugin's read-back (of what its last run left, its history,
/// or a replay before it) before it is refused.
const REPLAY_WAITS_FOR_READ_BACK: Duration = Duration::from_secs(2);

/// The longest wait before a read-back tries the log again after an I/O error (the waits double
/// from 1 s): a read-back that gave up would leave events answered `202` undelivered while the
/// host runs. (One that meets anything else, which trying again cannot mend, ends: what it left
/// unread runs at the next start.)
const LOAD_RETRY_MAX: Duration = Duration::from_secs(30);

/// How long a catching-up read-back that cannot read or commit the log keeps new events
/// waiting in the log before it lets them go to the plugin live.
const CATCH_UP_WHILE_FAILING: Duration = Duration::from_secs(2);

/// Ends a subscription's read-back however it ends (a panic included): new events live (left
/// to the log, they would wait for the next start, as do those it left there unread), then
/// `reading_back` cleared (a flag left set would refuse every replay of the plugin; cleared
/// first, a replay could begin catching up and be ended here). With a replay waiting to take
/// it over ([`Overflow::take_over`]), it is handed over instead, still catching up: the
/// replay's read-back reads what this one left, and ends it. (A replay gone meanwhile drops
/// what it was handed, which ends it.)
struct ReadBackDone(Arc<Overflow>);

impl Drop for ReadBackDone {
    fn drop(&mut self) {
        let take_over = self.0.take_over.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(replay) = take_over {
            let _ = replay.send(ReadBackDone(self.0.clone()));
            return;
        }
        self.0.stop_catching_up(0);
        self.0.reading_back.store(false, Ordering::Release);
    }
}

impl Load {
    /// Waits until nothing the plugin's `earlier` subscriptions took is left, and their acks
    /// are committed; `false` when this subscription went first.
    async fn after_earlier(
        earlier: &[std::sync::Weak<Overflow>],
        log: &DurableLog,
        overflow: &Overflow,
        tx: &mpsc::Sender<Delivery>,
        plugin: &str,
    ) -> bool {
        if earlier.is_empty() {
            return true;
        }
        let mut told = false;
        while earlier.iter().any(|e| e.strong_count() > 0) {
            if overflow.is_gone(tx) {
                return false;
            }
            if !told {
                tracing::info!(
                    plugin,
                    "reading back from the event log once the plugin's previous subscription \
                    has finished what it took"
                );
                told = true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut retry_in = Duration::from_millis(50);
        while let Err(e) = log.sync().await {
            if overflow.is_gone(tx) {
                return false;
            }
            tracing::error!(plugin, "waiting for the event log to commit the previous subscription's acks: {e}");
            tokio::time::sleep(retry_in).await;
            retry_in = (retry_in * 2).min(LOAD_RETRY_MAX);
        }
        true
    }

    /// Reads back; the read-back (marked before) ends with `done`, however it ends, or is handed
    /// over with it to a replay that takes it over ([`Overflow::taken_over`]). A replay gone
    /// before it took it leaves it reading on from where it stopped: what it had yet to read
    /// must not wait for the next start while newer events overtake it.
    async fn run(
        mut self,
        mut done: ReadBackDone,
        log: Arc<DurableLog>,
        overflow: Arc<Overflow>,
        tx: mpsc::Sender<Delivery>,
        plugin: Arc<str>,
    ) {
        while let Some(stopped_at) = self.load(log.clone(), &overflow, tx.clone(), plugin.clone()).await {
            match overflow.hand_over(done) {
                Ok(()) => return,
                Err(back) => (done, self.from) = (back, stopped_at),
            }
        }
        drop(done);
    }

    /// Reads back until caught up (or unsubscribed, or the log fails for good): `None`; or, for
    /// a plugin that fell behind, until a replay waits to take it over: where it stopped.
    async fn load(
        &self,
        log: Arc<DurableLog>,
        overflow: &Arc<Overflow>,
        tx: mpsc::Sender<Delivery>,
        plugin: Arc<str>,
    ) -> Option<u64> {
        if !Self::after_earlier(&self.earlier, &log, overflow, &tx, &plugin).await {
            return None;
        }
        let (mut from, mut loaded, mut retry_in) = (self.from, 0usize, Duration::from_secs(1));
        // Events left to the log up to here were committed before the last read (see `catch_up_at`).
        let mut committed = None;
        // Since when the log has failed (reads, or commits of what was left in it), with nothing
        // going through since.
        let mut failing_since: Option<Instant> = None;
        loop {
            // Room first: half the buffer free (the pump says when).
            loop {
                let drained = overflow.drained.notified();
                tokio::pin!(drained);
                drained.as_mut().enable();
                if overflow.state.lock().expect("overflow poisoned").bytes <= overflow.budget / 2 {
                    break;
                }
                if overflow.is_gone(&tx) {
                    return None;
                }
                if self.fell_behind && overflow.taken_over() {
                    return Some(from);
                }
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), drained).await;
            }
            // Unsubscribed: the rest is left pending for the next subscription, which reads it.
            // Taken over: the replay's read-back reads it.
            if overflow.is_gone(&tx) {
                return None;
            }
            if self.fell_behind && overflow.taken_over() {
                return Some(from);
            }
            // A page's last looked-at sequence number: pages go on past records that could not
            // be read (the log settled those), even a page of nothing else.
            // Up to half the buffer at a time (the other half is what may wait already).
            let page_bytes = overflow.budget / 2;
            let seqs = from..overflow.read_back_end();
            let delivered = if self.fell_behind { Delivered::First } else { Delivered::Again };
            let read = log.unsettled_page(&plugin, seqs, LOAD_PAGE, page_bytes, delivered);
            let (page, last) = match read.map(|page| (page.deliveries, page.last_seq)) {
                Ok(page) => page,
                // The log is reopening after a failed write: the same page again, shortly.
                Err(e @ super::log::LogError::Io { .. }) if !overflow.is_gone(&tx) => {
                    tracing::error!(plugin = %plugin, retry_in_s = retry_in.as_secs(),
                        "reading deliveries back from the event log: {e}");
                    overflow.wait_out_failure(&plugin, &mut failing_since, &mut retry_in, from).await;
                    continue;
                }
                Err(e) => {
                    overflow.stop_catching_up(from);
                    tracing::error!(plugin = %plugin,
                        "reading deliveries back from the event log: {e}; what was not read runs at the next start");
                    return None;
                }
            };
            // Reads and commits going again: the failure is over. (An empty read alone says nothing
            // of commits: a full disk fails those while reads work.)
            if !page.is_empty() {
                (retry_in, failing_since) = (Duration::from_secs(1), None);
            }
            if let Some(last) = last {
                from = last + 1;
            } else {
                if overflow.is_gone(&tx) {
                    return None;
                }
                // Nothing more to read: caught up, or not yet.
                let CatchUp::Uncommitted(skipped) = overflow.catch_up_at(from, committed) else { break };
                match log.sync().await {
                    Ok(()) => {
                        committed = Some(skipped);
                        (retry_in, failing_since) = (Duration::from_secs(1), None);
                    }
                    Err(e) => {
                        tracing::error!(plugin = %plugin, retry_in_s = retry_in.as_secs(),
                            "waiting for the event log to commit what was left in it for the plugin: {e}");
                        overflow.wait_out_failure(&plugin, &mut failing_since, &mut retry_in, from).await;
                    }
                }
                continue;
            }
            loaded += page.len();
            let mut state = overflow.state.lock().expect("overflow poisoned");
            for u in page {
                let cost = u.event.buffered_cost();
                overflow.take(&mut state, &tx, &u.event, Publisher::Other, cost, Logged(Some(u.seq)));
            }
            if let Some(c) = state.intake.catching_up.as_mut() {
                c.read_to(from);
                // (Producers wait on their own events' bytes: `room_for_a_producer`.)
                if c.producers_bytes() <= overflow.backlog.max(overflow.budget) {
                    overflow.drained.notify_waiters();
                }
            }
        }
        if loaded > 0 && self.fell_behind {
            tracing::debug!(plugin = %plugin, events = loaded, "caught up with what waited in the event log");
        } else if loaded > 0 {
            tracing::info!(plugin = %plugin, events = loaded, "delivered again from the event log");
        }
        None
    }
}

struct Observer {
    patterns: PatternSet,
    tx: ObserverSender,
}

#[derive(Default)]
struct Table {
    subs: Vec<Arc<Sub>>,
    observers: Vec<Observer>,
    /// Bumped when a subscription joins or changes its patterns: an append whose targets were
    /// taken before finds the subscriptions it would miss ([`EmbeddedBus::send_to_log`]).
    generation: u64,
    /// Subscriptions that left the table, by plugin, while anything holds them (their worker
    /// still finishes what they took): a later subscription of the plugin reads back after them.
    retired: Vec<(Arc<str>, std::sync::Weak<Overflow>)>,
}

/// The in-process bus.
#[derive(Default, Clone)]
pub struct EmbeddedBus {
    table: Arc<RwLock<Table>>,
    next_id: Arc<AtomicU64>,
    /// Where accepted events are kept until every plugin settled them (`None`: in memory only).
    log: Option<Arc<DurableLog>>,
    /// `plugbus_fell_behind_total{plugin}` (see [`Overflow::fall_behind`]).
    fell_behind: Family<PluginLabels, Counter>,
    /// Requests waiting for a reply, by the reply token they carry.
    replies: Arc<Replies>,
    /// Until the host has subscribed every plugin it loaded at start
    /// ([`Transport::all_subscribed`]; `None` from then on): the read-backs of the plugins
    /// subscribed so far, started then. What the last run left is run again (or its outbox
    /// released) only once every plugin that may take its outputs is in the table: an output
    /// logged before a plugin subscribed would have no pending delivery for it, lost to it.
    held_back: Arc<Mutex<Option<Vec<HeldBack>>>>,
}

/// `plugbus_waiting_events{plugin}` and `plugbus_waiting_bytes{plugin}`, read at each scrape:
/// what waits for each plugin beyond its queue, in its overflow and, while it catches up (it
/// fell behind, or reads back after a start or a replay), in the event log, as charged against
/// `flow.buffer_mib` and `flow.backlog_mib` (in the log, as many as its queue holds are charged
/// nothing, as in the queue). Summed by plugin (a reload's old and new subscriptions).
struct WaitingGauges(Arc<RwLock<Table>>);

impl std::fmt::Debug for WaitingGauges {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WaitingGauges")
    }
}

impl prometheus_client::collector::Collector for WaitingGauges {
    fn encode(&self, mut encoder: prometheus_client::encoding::DescriptorEncoder) -> std::fmt::Result {
        use prometheus_client::encoding::EncodeMetric;
        let mut by_plugin: std::collections::BTreeMap<Arc<str>, [u64; 2]> = Default::default();
        for sub in &self.0.read().expect("bus table poisoned").subs {
            let state = sub.overflow.state.lock().expect("overflow poisoned");
            let [events, bytes] = by_plugin.entry(sub.plugin.clone()).or_default();
            *events += state.events.len() as u64;
            *bytes += state.bytes;
            if let Some(c) = &state.intake.catching_up {
                *events += c.left.len() as u64;
                *bytes += c.left_bytes;
            }
        }
        let gauges = [
            (
                "waiting_events",
                "Events waiting for a plugin beyond its queue: behind it in memory, and in the event log while it catches up (it fell behind its producers, or reads back after a start or a replay)",
            ),
            (
                "waiting_bytes",
                "Bytes of the events waiting for a plugin beyond its queue (plugbus_waiting_events), as charged against flow.buffer_mib and flow.backlog_mib",
            ),
        ];
        for (i, (name, help)) in gauges.into_iter().enumerate() {
            let mut family =
                encoder.encode_descriptor(name, help, None, prometheus_client::metrics::MetricType::Gauge)?;
            for (plugin, values) in &by_plugin {
                let labels = PluginLabels { plugin: plugin.to_string() };
                let gauge = prometheus_client::metrics::gauge::ConstGauge::new(values[i] as i64);
                gauge.encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// A subscription's read-back of what the last run left, waiting for the start to end. (Its
/// queue is held weakly: a start that fails drops it with the subscription.)
struct HeldBack {
    load: Load,
    overflow: Arc<Overflow>,
    tx: mpsc::WeakSender<Delivery>,
    plugin: Arc<str>,
}

impl EmbeddedBus {
    /// An empty in-memory bus: what it accepted is lost if the process dies.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty bus that appends every accepted event to `log` before accepting it, and
    /// redelivers a plugin's unsettled events when it subscribes.
    pub fn durable(log: Arc<DurableLog>) -> Self {
        Self { log: Some(log), ..Self::default() }
    }

    /// Like [`EmbeddedBus::durable`] for a host that is starting: what the last run left is
    /// redelivered (and requests' outboxes released) once it has subscribed every plugin it
    /// loaded ([`Transport::all_subscribed`]), so their outputs reach plugins subscribed later
    /// in the start too.
    pub fn durable_at_start(log: Arc<DurableLog>) -> Self {
        Self { held_back: Arc::new(Mutex::new(Some(Vec::new()))), ..Self::durable(log) }
    }

    /// Starts `plugin`'s read-back and the release of its requests' outboxes (nothing when it
    /// unsubscribed meanwhile).
    fn read_back(&self, log: &Arc<DurableLog>, held: HeldBack) {
        let HeldBack { load, overflow, tx, plugin } = held;
        let Some(tx) = tx.upgrade() else {
            drop(ReadBackDone(overflow));
            return;
        };
        let done = ReadBackDone(overflow.clone());
        tokio::spawn(load.run(done, log.clone(), overflow, tx, plugin.clone()));
        tokio::spawn(self.clone().release_request_outboxes(log.clone(), plugin));
    }

    /// A producer's event for `targets`: room in every target's queue first (backpressure), then
    /// into the log, then to the targets that take it live (see [`Intake`]).
    async fn accept(&self, event: Arc<Event>, targets: Targets) -> Result<(), TransportError> {
        let slots = Self::room_in(&targets.0).await;
        self.take_in(event, targets, slots).await
    }

    /// Waits for room for a producer's event in every target (backpressure), holding it. Nothing
    /// is taken yet: a producer that stops waiting (an HTTP publish past `api.publish_timeout`,
    /// answered `503`) leaves nothing behind. At first it holds no target's slot while it waits
    /// for another's: a producer waiting for a slow plugin holding a slot of a fast one kept that
    /// slot from the fast one's other events, and enough of them filled its queue with slots
    /// nothing was sent on (review 61b F2: an event only the fast plugin takes waited 4 s for
    /// the slow one on the in-memory bus). When the slot it waited for then finds another
    /// target full, it holds what it gets and waits for each in turn, as before: two targets
    /// each with producers waiting (a slot let go goes to the next waiter) would otherwise keep
    /// bouncing it between them until its producer gave up (review 61e F4).
    async fn room_in(targets: &[Arc<Sub>]) -> Vec<Slot> {
        let mut catching_up = Vec::with_capacity(targets.len());
        for sub in targets {
            catching_up.push(sub.overflow.room_for_a_producer(&sub.tx).await);
        }
        // The slot waited for (kept: let go, it would go to the next producer waiting), and
        // whose it is; whether it waited once.
        let (mut waited, mut bounced): (Option<(usize, Slot)>, bool) = (None, false);
        loop {
            let mut slots = Vec::with_capacity(targets.len());
            let mut full = None;
            for (i, (sub, catching_up)) in targets.iter().zip(&catching_up).enumerate() {
                // One catching up takes the event from the log: its queue is its read-back's, and
                // a producer waiting there would go at its handler's pace.
                if *catching_up {
                    slots.push(Slot::Unreserved);
                    continue;
                }
                if let Some((_, slot)) = waited.take_if(|(of, _)| *of == i) {
                    slots.push(slot);
                    continue;
                }
                match sub.overflow.try_slot_for_a_producer(&sub.tx) {
                    Some(slot) => slots.push(slot),
                    None => {
                        full = Some(i);
                        break;
                    }
                }
            }
            let Some(i) = full else { return slots };
            drop(slots);
            drop(waited.take());
            if bounced {
                return Self::hold_and_wait(targets, &catching_up).await;
            }
            bounced = true;
            let sub = &targets[i];
            waited = Some((i, sub.overflow.slot_for_a_producer(&sub.tx).await));
        }
    }

    /// Waits for a slot in each target in turn, holding those it has (targets in the table's
    /// order: producers waiting so never wait for one another in a cycle). A target's slot is
    /// held across a later target's wait only while fewer than half its queue is held so
    /// ([`Overflow::hold_across`]): else it lets everything go and waits for one of those to be
    /// let go (review 61g F1: producers waiting for a slow plugin filled a fast one's queue with
    /// slots held so, 61b F2 again).
    async fn hold_and_wait(targets: &[Arc<Sub>], catching_up: &[bool]) -> Vec<Slot> {
        let last = catching_up.iter().rposition(|c| !c);
        loop {
            let (mut slots, mut held, mut capped) = (Vec::with_capacity(targets.len()), Vec::new(), None);
            for (i, (sub, catching_up)) in targets.iter().zip(catching_up).enumerate() {
                if *catching_up {
                    slots.push(Slot::Unreserved);
                    continue;
                }
                let slot = sub.overflow.slot_for_a_producer(&sub.tx).await;
                if Some(i) != last && matches!(slot, Slot::Reserved(_)) {
                    match sub.overflow.hold_across(sub.tx.max_capacity()) {
                        Some(counted) => held.push(counted),
                        None => {
                            capped = Some(sub);
                            break;
                        }
                    }
                }
                slots.push(slot);
            }
            // (What it held is counted until it returns: its slots are sent on at once.)
            let Some(sub) = capped else { return slots };
            drop(slots);
            drop(held);
            // The timeout is a backstop for a let-go between the look and the wait.
            let freed = sub.overflow.held_across_freed.notified();
            let _ = tokio::time::timeout(Duration::from_millis(10), freed).await;
        }
    }

    /// Takes a producer's event, with the room `slots` held in `targets`: into the log, then to
    /// the targets that take it live.
    async fn take_in(
        &self,
        event: Arc<Event>,
        (targets, seen): Targets,
        slots: Vec<Slot>,
    ) -> Result<(), TransportError> {
        // An event whose commit reported a failure after it landed is in the log all the same:
        // it is delivered now (not left for the next start), and its producer refused, since
        // nothing says it is on disk.
        let _deciding;
        let (logged, refused, late) = match &self.log {
            None => (Logged(None), None, Vec::new()),
            Some(log) => {
                // A dead letter's replay has an id of its own, derived from the dead letter's: one
                // in the log already is a replay that was taken though its publish timed out
                // (the dead letter was kept), and a second would run it again (review 60a L1).
                // Only the host sets the mark: ingress and plugins may not give `plugbus-*`.
                let dedupe = event.header(crate::deadletter::headers::REPLAY_OF).is_some();
                let (sent, late, deciding) = self
                    .send_to_log(&event, &targets, seen, |plugins, deciding| {
                        log.send_marked(event.clone(), plugins, dedupe, |seq| deciding.mark(seq))
                    })
                    .map_err(|e| TransportError::Broker(e.to_string()))?;
                _deciding = deciding;
                match sent.landed().await {
                    Ok(Appended::At(seq)) => (Logged(Some(seq)), None, late),
                    Ok(Appended::Duplicate(_)) => return Ok(()),
                    Err(e @ LogError::NotOnDisk { seq, .. }) => (Logged(Some(seq)), Some(e), late),
                    Err(e) => return Err(TransportError::Broker(e.to_string())),
                }
            }
        };
        self.notify_observers(&event);
        // Those that joined after the targets were taken have no slot either.
        let late = late.iter().map(|sub| (sub, Slot::Unreserved));
        for (sub, slot) in targets.iter().zip(slots).chain(late) {
            if let Slot::Closed = slot {
                continue;
            }
            // Decided and sent under the overflow's lock: the read-back hands over to live
            // deliveries under it too, and they go behind what it read (or anything else) still
            // waiting there.
            let mut state = sub.overflow.state.lock().expect("overflow poisoned");
            if sub.overflow.gone_before(logged) {
                continue;
            }
            if !Overflow::goes_live(&mut state, logged) {
                Overflow::left_in_log(&mut state, &sub.tx, logged, event.buffered_cost(), None);
                continue;
            }
            match slot {
                Slot::Reserved(slot) => sub.overflow.send_behind(&mut state, slot, &event, logged),
                // It caught up meanwhile: taken without waiting (one event past its buffer at
                // most, as for producers that looked at once).
                _ => sub.overflow.take(&mut state, &sub.tx, &event, Publisher::Other, event.buffered_cost(), logged),
            }
        }
        refused.map_or(Ok(()), |e| Err(TransportError::Broker(e.to_string())))
    }

    /// Sends `event`'s append to the log with `send`, for the plugins of `targets` (taken when
    /// the table stood at `seen`) and of every subscription that joined or changed its patterns
    /// since and matches it; returns what `send` made and those late subscriptions. Sent under
    /// the table's lock: a new plugin's history is made pending after it joined the table, so
    /// an append sent before that is in its history, and one sent after has its pending row
    /// (with the targets taken alone, one whose producer took them before and appended after
    /// was in neither, lost to it).
    ///
    /// `send` marks the event undecided for each of them ([`Deciding::mark`], under the log's
    /// append order); the [`Deciding`] returned unmarks it once dropped, after the decisions.
    fn send_to_log<T>(
        &self,
        event: &Event,
        targets: &[Arc<Sub>],
        seen: u64,
        send: impl FnOnce(Vec<Arc<str>>, &Deciding) -> Result<T, LogError>,
    ) -> Result<(T, Vec<Arc<Sub>>, Deciding), LogError> {
        let table = self.table.read().expect("bus table poisoned");
        let late: Vec<Arc<Sub>> = if table.generation == seen {
            Vec::new()
        } else {
            let targeted = |s: &Sub| targets.iter().any(|t| t.plugin == s.plugin);
            let replay_for = crate::deadletter::replay_for(event);
            table.subs.iter().filter(|s| s.takes(event, replay_for) && !targeted(s)).cloned().collect()
        };
        let plugins = targets.iter().chain(&late).map(|s| s.plugin.clone()).collect();
        let deciding = Deciding {
            overflows: targets.iter().chain(&late).map(|s| s.overflow.clone()).collect(),
            seq: std::sync::OnceLock::new(),
        };
        let sent = send(plugins, &deciding)?;
        Ok((sent, late, deciding))
    }

    /// Appends an output that may be in the log already (a dead letter, or an output of an
    /// event run again after a restart) for `targets` when the bus is durable; `None` when it
    /// was (not delivered again).
    async fn append_output(
        &self,
        event: &Arc<Event>,
        (targets, seen): (&[Arc<Sub>], u64),
    ) -> Result<Option<(Logged, Vec<Arc<Sub>>, Deciding)>, TransportError> {
        let Some(log) = &self.log else {
            return Ok(Some((Logged(None), Vec::new(), Deciding::default())));
        };
        let mut wait = Duration::from_millis(50);
        // The sequence numbers of this output's tries answered failed, with their marks: kept
        // undecided until this output is (a plugin falling behind meanwhile takes one that
        // landed live, see `Intake::late`).
        let mut failed_tries: Vec<(u64, Deciding)> = Vec::new();
        loop {
            let (sent, late, deciding): (SentAppend, _, _) = self
                .send_to_log(event, targets, seen, |plugins, deciding| {
                    log.send_marked(event.clone(), plugins, true, |seq| deciding.mark(seq))
                })
                .map_err(|e| TransportError::Broker(e.to_string()))?;
            match (sent.seq, sent.landed().await) {
                // In the log, its commit standing: nobody outside waits for this one to be on disk.
                (_, Ok(Appended::At(seq)) | Err(LogError::NotOnDisk { seq, .. })) => {
                    return Ok(Some((Logged(Some(seq)), late, deciding)));
                }
                // The copy found is this output's own earlier try: its commit landed though it
                // was answered failed (the look for that could not be made). It is delivered
                // now rather than at the next start. A copy logged before this output was
                // published (a run before, a replay) is not delivered again: it was, or is
                // pending for its plugins and read back.
                (_, Ok(Appended::Duplicate(first))) => {
                    return Ok(failed_tries
                        .iter()
                        .position(|(seq, _)| *seq == first)
                        .map(|at| (Logged(Some(first)), late, failed_tries.swap_remove(at).1)));
                }
                // A failed write (a full disk): the output waits for the log to take it, as a
                // new one does past its bound. Refused, it would spend its tries and be
                // dead-lettered (on the same full disk) with its input acked: lost.
                (seq, Err(e @ LogError::Io { .. })) => {
                    failed_tries.push((seq, deciding));
                    if wait == Duration::from_millis(50) {
                        tracing::warn!(subject = %event.subject, event_id = %event.id,
                            "the event log cannot take an output now; trying again until it can: {e}");
                    }
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                (_, Err(e)) => return Err(TransportError::Broker(e.to_string())),
            }
        }
    }

    /// Logs a plugin's output or dead letter and queues it for every target, or for none when
    /// one has no room (`Full`). `first_time_output`: it cannot be in the log yet, so it is
    /// logged without waiting for the commit; otherwise it is deduplicated.
    async fn deliver_output(&self, event: Arc<Event>, first_time_output: bool) -> Result<(), TransportError> {
        if self.log.is_none() {
            return self.deliver_output_in_memory(&event);
        }
        let (targets, seen) = self.targets(&event);
        let cost = event.buffered_cost();
        // A handler's output or a dead letter: its `source` is the host's (`plugbus/<plugin>`).
        let publisher = Publisher::Plugin(&event.source);
        // All or none: every target's room is checked before the event is logged or queued,
        // so a refused output reached no one and its retry delivers it once.
        for sub in &targets {
            let mut state = sub.overflow.state.lock().expect("overflow poisoned");
            // For one catching up too, which leaves it in the log: its backlog, shared between
            // its publishers, bounds what a flooding plugin makes wait there for it.
            if let Err(full) = sub.overflow.check_room(&state, &sub.tx, publisher, true, cost) {
                // A live plugin without room falls behind, as for a producer's event: the output
                // waits for it in the log, and the publisher and the other targets go on. (Without
                // this, one slow subscriber failed the output for every other.) Not for its own
                // outputs: a plugin feeding itself faster than it runs is bounded by its buffer
                // and refused (it hurts only itself), not let fill its backlog on the disk.
                if sub.overflow.is_own(publisher) || !sub.overflow.fall_behind(&mut state, &sub.tx) {
                    return Err(full);
                }
                sub.overflow.check_room(&state, &sub.tx, publisher, true, cost)?;
            }
        }
        let (logged, late, _deciding) = match &self.log {
            // Logged without waiting for the commit: the ack of its input is sent after it, so
            // it never commits before it.
            Some(log) if first_time_output => {
                let (seq, late, deciding) = self
                    .send_to_log(&event, &targets, seen, |plugins, deciding| {
                        log.append_nowait_marked(event.clone(), plugins, |seq| deciding.mark(seq))
                    })
                    .map_err(|e| TransportError::Broker(e.to_string()))?;
                (Logged(Some(seq)), late, deciding)
            }
            // A dead letter, or an output of an event run again after a restart: it may be in
            // the log already, and then it is not delivered again.
            _ => match self.append_output(&event, (&targets, seen)).await? {
                Some(logged) => logged,
                None => return Ok(()),
            },
        };
        // Those that joined since the targets were taken too (their room was not checked: one
        // output each, once).
        for sub in targets.iter().chain(&late) {
            let mut state = sub.overflow.state.lock().expect("overflow poisoned");
            if sub.overflow.gone_before(logged) {
                continue;
            }
            if Overflow::goes_live(&mut state, logged) {
                sub.overflow.take(&mut state, &sub.tx, &event, publisher, cost, logged);
            } else {
                Overflow::left_in_log(&mut state, &sub.tx, logged, cost, Some(Arc::from(event.source.as_str())));
            }
        }
        self.notify_observers(&event);
        Ok(())
    }

    /// [`EmbeddedBus::deliver_output`] on the in-memory bus: nothing is logged and nothing waits,
    /// so the targets, their room, the takes and the observers are all done under one read of
    /// the table (once per output, where the durable bus reads it twice), and no target is
    /// cloned out of it. All or none as there: every target's room is checked before any takes it.
    fn deliver_output_in_memory(&self, event: &Arc<Event>) -> Result<(), TransportError> {
        let cost = event.buffered_cost();
        let publisher = Publisher::Plugin(&event.source);
        let observer_gone = {
            let table = self.table.read().expect("bus table poisoned");
            let targets = || table.subs.iter().filter(|s| s.patterns.matches(&event.subject));
            for sub in targets() {
                let state = sub.overflow.state.lock().expect("overflow poisoned");
                sub.overflow.check_room(&state, &sub.tx, publisher, true, cost)?;
            }
            for sub in targets() {
                let mut state = sub.overflow.state.lock().expect("overflow poisoned");
                sub.overflow.take(&mut state, &sub.tx, event, publisher, cost, Logged(None));
            }
            self.send_to_observers(&table.observers, event)
        };
        if observer_gone {
            self.table.write().expect("bus table poisoned").observers.retain(|o| !o.tx.is_closed());
        }
        Ok(())
    }

    /// Publishes the outputs of `plugin`'s requests whose kv writes committed with them before
    /// the last stop and which were not settled (a crash between the two), then settles them.
    /// Some may be in the log already: they are deduplicated, not delivered again. A target's
    /// full buffer is waited out, however long; a log that cannot be read or written now is
    /// tried again (waits doubling from 50 ms to 30 s) for about ten minutes, then they are left
    /// in the log for the next start. A damaged outbox is logged and left.
    async fn release_request_outboxes(self, log: Arc<DurableLog>, plugin: Arc<str>) {
        const FIRST_WAIT: Duration = Duration::from_millis(50);
        let give_up = tokio::time::Instant::now() + Duration::from_secs(600);
        let mut wait = FIRST_WAIT;
        let retry = async |wait: &mut Duration, why: String, full: bool| {
            if !full && tokio::time::Instant::now() >= give_up {
                tracing::error!(plugin = %plugin,
                    "outputs of requests handled before the last stop are left for the next start: {why}");
                return false;
            }
            tracing::debug!(plugin = %plugin, retry_in_ms = wait.as_millis() as u64,
                "outputs of requests handled before the last stop cannot be released now: {why}");
            tokio::time::sleep(*wait).await;
            *wait = (*wait * 2).min(if full { Duration::from_secs(1) } else { LOAD_RETRY_MAX });
            true
        };
        let outboxes = loop {
            match log.request_outboxes(&plugin) {
                Ok(outboxes) => break outboxes,
                Err(e) if retry(&mut wait, e.to_string(), false).await => {}
                Err(_) => return,
            }
        };
        for (key, outputs) in outboxes {
            tracing::info!(plugin = %plugin, outputs = outputs.len(),
                "a request handled before the last stop (kv committed): releasing its outputs");
            for output in outputs {
                loop {
                    match self.deliver_output(output.clone(), false).await {
                        Ok(()) => break,
                        Err(e) => {
                            let full = matches!(e, TransportError::Full(_));
                            if !retry(&mut wait, format!("event {}: {e}", output.id), full).await {
                                return;
                            }
                        }
                    }
                }
                wait = FIRST_WAIT;
            }
            log.ack(plugin.clone(), key);
        }
    }

    /// Replies that found no request waiting (it timed out, or another reply came first).
    pub fn replies_dropped(&self) -> u64 {
        self.replies.dropped.load(Ordering::Relaxed)
    }

    /// How many outputs wait in overflows beyond the queues, over every subscription.
    pub fn overflowing(&self) -> usize {
        self.table.read().expect("bus table poisoned").subs.iter().map(|s| s.overflow.waiting()).sum()
    }

    fn notify_observers(&self, event: &Arc<Event>) {
        let observer_gone = {
            let table = self.table.read().expect("bus table poisoned");
            self.send_to_observers(&table.observers, event)
        };
        if observer_gone {
            self.table.write().expect("bus table poisoned").observers.retain(|o| !o.tx.is_closed());
        }
    }

    /// Sends `event` to the observers whose patterns match it, never waiting (a slow one misses
    /// it, counted for it to report); `true` when one has gone (for the caller to remove once it
    /// let go of the table: this runs under its read lock).
    fn send_to_observers(&self, observers: &[Observer], event: &Arc<Event>) -> bool {
        let mut gone = false;
        for o in observers.iter().filter(|o| o.patterns.matches(&event.subject)) {
            gone |= !o.tx.offer(event.clone());
        }
        gone
    }

    /// Waits for the log to commit what was sent to it (the acks a replay's read-back must see
    /// settled), trying again as a read-back does (new events go live after 2 s of failures);
    /// `false` when the plugin unsubscribed meanwhile.
    async fn acks_committed(log: &DurableLog, sub: &Sub, read_from: u64) -> bool {
        let (mut failing_since, mut retry_in) = (None, Duration::from_secs(1));
        while let Err(e) = log.sync().await {
            if sub.overflow.is_gone(&sub.tx) {
                return false;
            }
            tracing::error!(plugin = %sub.plugin, "replay: waiting for the event log to commit: {e}");
            sub.overflow.wait_out_failure(&sub.plugin, &mut failing_since, &mut retry_in, read_from).await;
        }
        true
    }

    /// Waits until nothing the plugin held when a replay began is in its hands: what it settles
    /// meanwhile stays pending in the history ([`LogAck::settle`]) and runs again in its place,
    /// after this run, never twice at once. `None` when the plugin unsubscribed meanwhile (its
    /// next subscription reads what stayed pending).
    async fn wait_for_what_it_holds(sub: &Sub) -> Option<()> {
        let waited_from = Instant::now();
        let mut told = false;
        while sub.overflow.holds_events() {
            if sub.overflow.is_gone(&sub.tx) {
                return None;
            }
            if !told && waited_from.elapsed() >= Duration::from_secs(1) {
                tracing::info!(plugin = %sub.plugin, "replay: the history waits for the events the plugin still holds");
                told = true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Some(())
    }

    /// The subscriptions `event` goes to, in subscription order, and the table's generation
    /// they were taken at.
    fn targets(&self, event: &Event) -> Targets {
        let replay_for = crate::deadletter::replay_for(event);
        let table = self.table.read().expect("bus table poisoned");
        (table.subs.iter().filter(|s| s.takes(event, replay_for)).cloned().collect(), table.generation)
    }
}

/// The subscriptions an event goes to, and the table's generation they were taken at.
type Targets = (Vec<Arc<Sub>>, u64);

/// A producer's room in a target's queue.
enum Slot {
    /// Waited for and held (backpressure).
    Reserved(mpsc::OwnedPermit<Delivery>),
    /// None waited for: it was catching up (its read-back delivers the event), or joined after
    /// the targets were taken.
    Unreserved,
    /// It unsubscribed: the event is no longer for it.
    Closed,
}

/// Removes the subscription from the table when the plugin lets go of it.
struct Unsubscribe {
    table: Arc<RwLock<Table>>,
    id: u64,
    /// The durable log, told when the plugin's last subscription goes ([`DurableLog::away`]).
    log: Option<Arc<DurableLog>>,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        if let Ok(mut t) = self.table.write() {
            let Table { subs, retired, .. } = &mut *t;
            retired.retain(|(_, overflow)| overflow.strong_count() > 0);
            let mut plugin = None;
            for s in subs.iter().filter(|s| s.id == self.id) {
                s.overflow.unsubscribed.store(true, Ordering::Release);
                retired.push((s.plugin.clone(), Arc::downgrade(&s.overflow)));
                plugin = Some(s.plugin.clone());
            }
            subs.retain(|s| s.id != self.id);
            // Under the table's lock: an append sent after it targets no subscription of the
            // plugin, and one sent before has a lower sequence number.
            if let (Some(log), Some(plugin)) = (&self.log, plugin)
                && !subs.iter().any(|s| s.plugin == plugin)
            {
                log.away(plugin);
            }
        }
    }
}

#[async_trait]
impl Transport for EmbeddedBus {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn publish(&self, event: Event) -> Result<(), TransportError> {
        validate_subject(&event.subject)?;
        let event = Arc::new(event);
        if self.log.is_none() {
            let targets = self.targets(&event);
            return self.accept(event, targets).await;
        }
        let targets = self.targets(&event);
        // Waited for here: a producer that stops waiting has taken nothing.
        let slots = Self::room_in(&targets.0).await;
        // In a task of its own, so a producer that goes away (an HTTP client hanging up) cannot
        // leave an event logged but not queued.
        let bus = self.clone();
        let accept = tokio::spawn(async move { bus.take_in(event, targets, slots).await });
        accept.await.map_err(|e| TransportError::Closed(format!("accepting the event: {e}")))?
    }

    async fn sync_taken(&self) -> Result<(), TransportError> {
        match &self.log {
            Some(log) => log.sync().await.map_err(|e| TransportError::Broker(format!("syncing the event log: {e}"))),
            None => Ok(()),
        }
    }

    async fn publish_output(&self, event: Arc<Event>) -> Result<(), TransportError> {
        validate_subject(&event.subject)?;
        // While the log holds too many outputs not committed yet (a full disk), the publisher
        // waits here, and the delivery that made the output with it: plugins that feed each
        // other slow down instead of filling the memory, and nothing is refused for it.
        if let Some(log) = &self.log {
            log.room_for_outputs().await;
        }
        // An output of an event delivered for the first time cannot be in the log yet.
        let first_time_output = self
            .log
            .as_ref()
            .and_then(|log| Some(!log.was_redelivered(event.header("plugbus-caused-by")?)))
            .unwrap_or(false);
        self.deliver_output(event, first_time_output).await
    }

    /// A request is not logged: like a core NATS request it is at most once (a requester that
    /// gets no reply asks again), and after a restart nobody would wait for its reply (on a
    /// durable bus each responder's kv writes and outputs still commit together, in an outbox
    /// under the request's key). It goes to
    /// every matching plugin like an output (never waiting on a queue: `Full` when a plugin's
    /// buffer is full); the first reply wins, later ones are dropped and counted.
    async fn request(&self, mut event: Event, timeout: Duration, producer: bool) -> Result<Event, RequestError> {
        validate_subject(&event.subject).map_err(|e| RequestError::Unavailable(e.to_string()))?;
        let subject = event.subject.clone();
        let (targets, _) = self.targets(&event);
        if targets.is_empty() {
            return Err(RequestError::NoResponders(subject));
        }
        let mut slot = self.replies.open()?;
        event.reply_to = Some(slot.token.clone());
        // Not in the log, but on a durable bus each responder's kv writes and outputs commit
        // together in an outbox under this key (see `log::REQUEST_KEYS`).
        let outbox_key = Logged(self.log.as_ref().map(|log| log.request_key()));
        let event = Arc::new(event);
        slot.sent(&event);
        let cost = event.buffered_cost();
        // A producer's request carries the client's `source`: it gets no share of its own.
        let publisher = if producer { Publisher::Other } else { Publisher::Plugin(&event.source) };
        // Each plugin with room takes it; refused only when none can. (Outputs go to all or
        // none, so a retry delivers them once; a request is never retried by the bus, and a
        // plugin that subscribes to the subject and never keeps up must not make every
        // request on it fail while another plugin answers.)
        let mut refused = None;
        let mut taken = 0;
        for sub in targets.iter().filter(|s| !s.tx.is_closed()) {
            let mut state = sub.overflow.state.lock().expect("overflow poisoned");
            match sub.overflow.check_room(&state, &sub.tx, publisher, false, cost) {
                Ok(()) => {
                    sub.overflow.take(&mut state, &sub.tx, &event, publisher, cost, outbox_key);
                    taken += 1;
                }
                Err(e) => {
                    refused.get_or_insert(e);
                }
            }
        }
        if taken == 0 {
            slot.withdraw();
            let why = refused.map_or_else(|| "no plugin took it".to_string(), |e| e.to_string());
            return Err(RequestError::Unavailable(why));
        }
        self.notify_observers(&event);
        slot.wait(&subject, timeout).await
    }

    async fn reply(&self, to: &str, event: Event) -> Result<bool, TransportError> {
        Ok(self.replies.answer(to, event))
    }

    fn awaits_reply(&self, to: &str) -> bool {
        !self.replies.abandoned(to)
    }

    fn all_subscribed(&self) {
        let Some(log) = &self.log else { return };
        let held = self.held_back.lock().expect("held back poisoned").take();
        for held in held.into_iter().flatten() {
            self.read_back(log, held);
        }
        // What the log owes a plugin that is not loaded waits for it, named nowhere else
        // (review 63a F3): retention keeps it, and past `max_mib` drops other settled events.
        let subscribed: Vec<Arc<str>> =
            self.table.read().expect("bus table poisoned").subs.iter().map(|s| s.plugin.clone()).collect();
        match log.owing_plugins() {
            Ok(owing) => {
                for plugin in owing.iter().filter(|p| !subscribed.iter().any(|s| &**s == p.as_str())) {
                    tracing::warn!(plugin = %plugin,
                        "the event log holds deliveries not settled for a plugin that is not loaded: they wait for it \
                         (loaded again, it runs them), and retention keeps them meanwhile");
                }
            }
            Err(e) => tracing::warn!("listing the plugins the event log owes deliveries: {e}"),
        }
    }

    fn register_metrics(&self, registry: &mut crate::metrics::Registry) {
        registry.register_collector(Box::new(WaitingGauges(self.table.clone())));
        if let Some(log) = &self.log {
            log.metrics().register(registry);
            registry.register(
                "fell_behind",
                "Times a plugin's queue was full and it fell behind: new events and outputs for it waited in the event log (flow.backlog_mib) instead of holding up its producers or failing other plugins' outputs",
                self.fell_behind.clone(),
            );
        }
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<Subscription, TransportError> {
        let patterns = PatternSet::parse(&spec.patterns)?;
        let (tx, rx) = mpsc::channel(spec.capacity.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let unsubscribe = Unsubscribe { table: self.table.clone(), id, log: self.log.clone() };
        let subscription = Subscription::new(id, &tx, rx, unsubscribe);
        let plugin: Arc<str> = spec.plugin.as_str().into();
        // On the durable log it starts catching up: what was accepted for it before it subscribed
        // and since is delivered from the log, in order, before anything goes to it live.
        let fell_behind = self.fell_behind.get_or_create(&PluginLabels { plugin: spec.plugin.clone() }).clone();
        let overflow =
            Overflow::new(plugin.clone(), spec.buffer_bytes, spec.backlog_bytes, self.log.clone(), fell_behind);
        // In the table before it is registered and a new plugin's history is made pending: an
        // event whose producer finds it here, or whose append is sent after (`send_to_log`), is
        // pending for it too (left in the log while it catches up); one sent before is in the
        // history.
        let earlier = {
            let mut table = self.table.write().expect("bus table poisoned");
            table.retired.retain(|(_, overflow)| overflow.strong_count() > 0);
            let earlier = table.retired.iter().filter(|(p, _)| *p == plugin).map(|(_, o)| o.clone()).collect();
            table.subs.push(Arc::new(Sub {
                id,
                plugin: plugin.clone(),
                patterns: patterns.clone(),
                tx: tx.clone(),
                overflow: overflow.clone(),
            }));
            table.generation += 1;
            earlier
        };
        if let Some(log) = &self.log {
            // Registered with the first step of its history in one commit: one that fails leaves
            // the plugin new, and the next subscription makes its history then. The rest is made
            // pending in steps, each its own commit, before it reads back: a crash between two
            // leaves the rest due for its next subscription.
            let wants_history = spec.durable.as_ref().is_some_and(|d| d.deliver_all);
            let durable = spec.durable.is_some().then(|| {
                let patterns = patterns.clone();
                let matches: super::log::SubjectMatcher = Box::new(move |s| patterns.matches(s));
                matches
            });
            let registered = log.register_with(plugin.clone(), durable, wants_history).await;
            // `subscription` drops with the error: out of the table again.
            let registered = registered.map_err(|e| TransportError::Broker(e.to_string()))?;
            let mut made = registered.made;
            if let Some(due) = registered.history_due.clone() {
                let patterns = patterns.clone();
                let rest = log.backfill_history(plugin.clone(), move |s: &str| patterns.matches(s), due).await;
                made += rest.map_err(|e| {
                    TransportError::Broker(format!(
                        "making the history of {plugin} pending (deliver = \"all\", or what was accepted while it was \
                         away): {e}"
                    ))
                })?;
            }
            if wants_history && (registered.new || registered.history_due.is_some()) {
                tracing::info!(plugin = %spec.plugin, events = made,
                    "a new plugin with deliver = \"all\": the log's history is delivered to it");
            }
        }
        if let Some(log) = &self.log {
            let held =
                HeldBack { load: Load { from: 0, earlier, fell_behind: false }, overflow, tx: tx.downgrade(), plugin };
            match self.held_back.lock().expect("held back poisoned").as_mut() {
                Some(waiting) => waiting.push(held),
                None => self.read_back(log, held),
            }
        }
        Ok(subscription)
    }

    async fn replay(&self, plugin: &str, from: crate::transport::ReplayFrom) -> Result<usize, TransportError> {
        let Some(log) = &self.log else {
            return Err(TransportError::Broker(format!(
                "replay of {plugin}: the embedded bus keeps no history with bus.durable = false"
            )));
        };
        let sub = {
            let table = self.table.read().expect("bus table poisoned");
            table.subs.iter().find(|s| &*s.plugin == plugin).cloned()
        };
        let sub =
            sub.ok_or_else(|| TransportError::Closed(format!("replay: no plugin named {plugin} is subscribed")))?;
        // In a task of its own, so a caller that goes away (an HTTP client hanging up) cannot
        // leave the plugin catching up with no read-back.
        let (log, made, name) = (log.clone(), tokio::sync::oneshot::channel(), plugin.to_string());
        tokio::spawn(async move {
            // One read-back at a time: a plugin just subscribed reads back what its last run left
            // (usually at once), and a replay's read-back may still run.
            let done = match sub.overflow.read_back_for_a_replay(&name).await {
                Ok(done) => done,
                Err(refused) => return drop(made.0.send(Err(refused))),
            };
            // Events accepted for it from now on wait in the log behind the history, in order.
            let (since, read_from) = sub.overflow.catch_up_from_now(&log, from.first_seq(), from.since_ms());
            // What it holds now is all it can ack from here on (what comes from now waits in the log).
            let holds = sub.overflow.holds_any();
            let patterns = sub.patterns.clone();
            // The history: what the log holds below where the replay began (what was accepted
            // since is pending for it already).
            let count = log.backfill(sub.plugin.clone(), move |s: &str| patterns.matches(s), from, since).await;
            let failed = count.is_err();
            let _ = made.0.send(count.map_err(|e| TransportError::Broker(e.to_string())));
            // An event in its hands (or on the way there) stays pending when it settles, and
            // runs again in its place in the history, after this run: never twice at once.
            if Self::wait_for_what_it_holds(&sub).await.is_none() {
                return;
            }
            // The acks of what it held are committed before anything is read: pending still in
            // what the read sees, an event they settled outside the history would run again. (A
            // backfill that went through committed those sent before it, not those sent while it
            // waited; after one that failed, none.) Holding nothing, it sent none since: a full
            // disk then holds no history back.
            if (holds || failed) && !Self::acks_committed(&log, &sub, read_from).await {
                return;
            }
            // Everything pending from `read_from` on, in order: the history, what was pending
            // already (handed back, or decided late by its producer), then what was accepted
            // since. Read even when the backfill failed.
            Load { from: read_from, earlier: Vec::new(), fell_behind: false }
                .run(done, log, sub.overflow.clone(), sub.tx.clone(), sub.plugin.clone())
                .await;
        });
        let count =
            made.1.await.map_err(|_| TransportError::Closed(format!("replay of {plugin}: the task ended")))??;
        tracing::info!(plugin, %from, events = count, "replay: the log's events are delivered to the plugin again");
        Ok(count)
    }

    async fn retarget(&self, subscription: u64, spec: &SubscriptionSpec) -> Result<(), TransportError> {
        let patterns = PatternSet::parse(&spec.patterns)?;
        let mut table = self.table.write().expect("bus table poisoned");
        let slot = table
            .subs
            .iter_mut()
            .find(|s| s.id == subscription)
            .ok_or_else(|| TransportError::Closed(format!("subscription {subscription} is gone")))?;
        *slot = Arc::new(Sub {
            id: slot.id,
            plugin: slot.plugin.clone(),
            patterns,
            tx: slot.tx.clone(),
            overflow: slot.overflow.clone(),
        });
        table.generation += 1;
        Ok(())
    }

    async fn observe(&self, patterns: Vec<String>, capacity: usize) -> Result<Observed, TransportError> {
        let patterns = PatternSet::parse(&patterns)?;
        let (tx, observed) = Observed::channel(capacity);
        let observers = &mut self.table.write().expect("bus table poisoned").observers;
        // Those gone are let go here too, not only when an event they match comes (one on a
        // subject nothing publishes on would stay for good): the table holds at most one more
        // than the observers open at its last change (`api.max_tails` + 1).
        observers.retain(|o| !o.tx.is_closed());
        observers.push(Observer { patterns, tx });
        Ok(observed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 100,000 empty headers (a 1 MiB NATS header block, or a structured envelope of many keys)
    /// hold about 8 MiB of `String` pairs: a buffer bounded in bytes must count them.
    #[test]
    fn an_events_cost_counts_every_header_however_short() {
        let mut ev = Event::new("a.b", "");
        let bare = ev.buffered_cost();
        ev.extensions = (0..100_000).map(|_| (String::new(), String::new())).collect();
        assert!(ev.buffered_cost() - bare >= 100_000 * crate::kv::ENTRY_COST, "{}", ev.buffered_cost() - bare);
    }

    fn spec(patterns: &[&str], capacity: usize) -> SubscriptionSpec {
        SubscriptionSpec {
            plugin: "p".into(),
            patterns: patterns.iter().map(|s| s.to_string()).collect(),
            group: "plugbus.p".into(),
            capacity,
            buffer_bytes: 1 << 20,
            // Producers wait for a full queue (the in-memory bus's way), unless a test asks
            // for a backlog.
            backlog_bytes: 0,
            durable: None,
        }
    }

    /// A producer waiting for a slot in a slow plugin's queue holds no slot of another target:
    /// those it held kept a fast plugin's other events waiting for the slow one, and enough
    /// waiting producers filled its queue with slots nothing was sent on (review 61b F2).
    #[tokio::test]
    async fn a_producer_waiting_for_a_slow_plugin_holds_no_slot_of_a_fast_one() {
        let bus = EmbeddedBus::new();
        let mut fast = bus.subscribe(SubscriptionSpec { plugin: "fast".into(), ..spec(&["x.>"], 2) }).await.unwrap();
        let _slow = bus.subscribe(SubscriptionSpec { plugin: "slow".into(), ..spec(&["x.shared"], 1) }).await.unwrap();
        // The slow plugin's queue is full from here on; the fast one has one slot left.
        bus.publish(Event::new("x.shared", "0")).await.unwrap();
        for i in 1..=2 {
            let bus = bus.clone();
            tokio::spawn(async move { bus.publish(Event::new("x.shared", i.to_string())).await });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(fast.deliveries.recv().await.unwrap().event.data, "0");
        let only_fast =
            tokio::time::timeout(Duration::from_millis(500), bus.publish(Event::new("x.only_fast", ""))).await;
        assert!(only_fast.is_ok(), "an event only the fast plugin takes waited for the slow one");
        assert_eq!(fast.deliveries.recv().await.unwrap().event.subject, "x.only_fast");
    }

    /// A producer that bounced (it waited for the slow plugin's slot and found the fast one's
    /// queue full) held a fast plugin's slot while it waited for the slow one's: enough of them
    /// filled the fast queue with slots nothing was sent on (review 61g F1). At most half a
    /// queue is held so.
    #[tokio::test]
    async fn a_bounced_producer_holds_no_more_than_half_a_fast_plugins_queue_while_it_waits() {
        let bus = EmbeddedBus::new();
        let mut fast = bus
            .subscribe(SubscriptionSpec { plugin: "fast".into(), group: "plugbus.fast".into(), ..spec(&["x.>"], 2) })
            .await
            .unwrap();
        let _slow = bus
            .subscribe(SubscriptionSpec {
                plugin: "slow".into(),
                group: "plugbus.slow".into(),
                ..spec(&["x.shared"], 1)
            })
            .await
            .unwrap();
        bus.publish(Event::new("x.shared", "0")).await.unwrap();
        bus.publish(Event::new("x.only_fast", "a")).await.unwrap();
        for i in 1..=2 {
            let bus = bus.clone();
            tokio::spawn(async move { bus.publish(Event::new("x.shared", i.to_string())).await });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(fast.deliveries.recv().await.unwrap().event.data, "0");
        assert_eq!(fast.deliveries.recv().await.unwrap().event.data, "a");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let only_fast =
            tokio::time::timeout(Duration::from_millis(500), bus.publish(Event::new("x.only_fast", "b"))).await;
        assert!(only_fast.is_ok(), "an event only the fast plugin takes waited for the slow one");
    }

    /// An event for two plugins whose queues both have producers waiting gets through: waiting
    /// for one while holding nothing, it found the other full again (a slot let go goes to the
    /// next producer waiting), and bounced between them until its producer gave up (review 61e
    /// F4). After one such bounce it holds what it gets and waits in turn.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_event_for_two_busy_plugins_is_not_starved_by_their_other_producers() {
        let bus = EmbeddedBus::new();
        let a = bus
            .subscribe(SubscriptionSpec { plugin: "a".into(), group: "plugbus.a".into(), ..spec(&["x.>"], 1) })
            .await
            .unwrap();
        let b = bus
            .subscribe(SubscriptionSpec {
                plugin: "b".into(),
                group: "plugbus.b".into(),
                ..spec(&["x.shared", "y.>"], 1)
            })
            .await
            .unwrap();
        for sub in [a, b] {
            tokio::spawn(async move {
                // (the whole subscription: its guard let go unsubscribes it)
                let mut sub = sub;
                while sub.deliveries.recv().await.is_some() {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            });
        }
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for subject in ["x.a", "x.a", "x.a", "x.a", "y.b", "y.b", "y.b", "y.b"] {
            let (bus, stop) = (bus.clone(), stop.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let _ = bus.publish(Event::new(subject, "")).await;
                }
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let shared = tokio::time::timeout(Duration::from_secs(3), bus.publish(Event::new("x.shared", ""))).await;
        stop.store(true, Ordering::Relaxed);
        assert!(shared.is_ok(), "an event for both plugins never got a slot in both");
    }

    /// A plugin that subscribes to a request subject and never keeps up (its queue and buffer
    /// full) used to fail every request on it (all or none, as for outputs), while another
    /// plugin answered them.
    #[tokio::test]
    async fn a_subscriber_that_never_keeps_up_fails_no_request_another_answers() {
        let bus = EmbeddedBus::new();
        let stalled = SubscriptionSpec { plugin: "stalled".into(), buffer_bytes: 4096, ..spec(&["q"], 1) };
        let _stalled = bus.subscribe(stalled).await.unwrap();
        let mut answering = bus.subscribe(spec(&["q"], 16)).await.unwrap();
        let replier = bus.clone();
        tokio::spawn(async move {
            while let Some(d) = answering.deliveries.recv().await {
                let to = d.event.reply_to.clone().unwrap();
                replier.reply(&to, Event::new("q.reply", "ok")).await.unwrap();
            }
        });
        for i in 0..200 {
            let got = bus.request(Event::new("q", format!("{i}")), Duration::from_secs(5), false).await;
            assert!(got.is_ok(), "request {i}: {got:?}");
        }
        // With no plugin able to take it, it is refused, saying why.
        let only_stalled = EmbeddedBus::new();
        let stalled = SubscriptionSpec { plugin: "stalled".into(), buffer_bytes: 4096, ..spec(&["q"], 1) };
        let _stalled = only_stalled.subscribe(stalled).await.unwrap();
        let mut tries = 0;
        let refused = loop {
            tries += 1;
            assert!(tries < 100, "a plugin that never keeps up was never refused requests");
            match tokio::time::timeout(
                Duration::from_millis(50),
                only_stalled.request(Event::new("q", "x"), Duration::from_millis(10), false),
            )
            .await
            {
                Ok(Err(RequestError::Unavailable(why))) => break why,
                _ => continue,
            }
        };
        assert!(refused.contains("plugin stalled has"), "{refused}");
    }

    /// Review 60a L1: a replay whose publish timed out while the log committed it is delivered,
    /// and its dead letter kept; the next replay of that dead letter published it again, and the
    /// handler ran twice. A replay already in the log is taken as done.
    #[tokio::test]
    async fn a_dead_letters_replay_already_in_the_log_is_not_delivered_again() {
        let dir = tempfile::tempdir().unwrap();
        let (_path, _log, bus, mut sub) = durable_bus(dir.path(), "orders.>", 16).await;
        let input = Event::new("orders.created", "1");
        let dead = crate::deadletter::dead_letter_event(&input, "p", "plugbus.dlq.p", "boom", 3);
        let replay = crate::deadletter::replay_event(&dead).unwrap();
        bus.publish(replay.clone()).await.unwrap();
        bus.publish(replay).await.unwrap();
        // A producer's event sent twice is two events, as before.
        let twice = Event::new("orders.created", "2");
        bus.publish(twice.clone()).await.unwrap();
        bus.publish(twice).await.unwrap();
        let got = ack_through(&mut sub, "2").await;
        assert_eq!(got, ["1", "2", "2"], "the replay ran twice, or a producer's second send was dropped");
        // Review 60e H1: the same event failing again later (a rewind) makes a dead letter of the
        // same id; its replay is a new event, and runs.
        let mut again = crate::deadletter::dead_letter_event(&input, "p", "plugbus.dlq.p", "boom", 3);
        assert_eq!(again.id, dead.id);
        again.extensions.retain(|(k, _)| k != crate::deadletter::headers::FAILED_AT);
        again.extensions.push((crate::deadletter::headers::FAILED_AT.into(), "2999-01-01T00:00:00.000Z".into()));
        bus.publish(crate::deadletter::replay_event(&again).unwrap()).await.unwrap();
        assert_eq!(ack_through(&mut sub, "1").await, ["1"], "the later dead letter's replay did not run");
    }

    /// Review 63a F2: a durable plugin whose subscription went (its file removed, or refused at
    /// a start for a transient reason) gets, when it subscribes again, what was accepted for its
    /// patterns meanwhile, before anything after.
    #[tokio::test]
    async fn a_durable_plugin_subscribing_again_gets_what_was_accepted_while_it_was_away() {
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), super::super::log::SyncPolicy::Always).unwrap();
        let bus = EmbeddedBus::durable(log);
        let durable = || SubscriptionSpec {
            durable: Some(crate::transport::Durability { deliver_all: false, give_up_after: 5, dead_letter: None }),
            ..spec(&["a.>"], 16)
        };
        drop(bus.subscribe(durable()).await.unwrap());
        bus.publish(Event::new("a.1", "1")).await.unwrap();
        bus.publish(Event::new("b.2", "2")).await.unwrap();
        let mut sub = bus.subscribe(durable()).await.unwrap();
        bus.publish(Event::new("a.3", "3")).await.unwrap();
        assert_eq!(ack_through(&mut sub, "3").await, ["1", "3"], "what it missed first, then what came after");
    }

    /// A durable bus over a new log at `dir/bus.redb` (`sync = "always"`) with plugin `p`
    /// subscribed to `pattern`: the log's path (for injected faults), the log, the bus and the
    /// subscription.
    async fn durable_bus(
        dir: &std::path::Path,
        pattern: &str,
        capacity: usize,
    ) -> (std::path::PathBuf, Arc<DurableLog>, EmbeddedBus, Subscription) {
        let path = dir.join("bus.redb");
        let log = DurableLog::open(&path, super::super::log::SyncPolicy::Always).unwrap();
        let bus = EmbeddedBus::durable(log.clone());
        let sub = bus.subscribe(spec(&[pattern], capacity)).await.unwrap();
        (path, log, bus, sub)
    }

    /// The log at `path` as the last run left it, opened again as at a start: `events`
    /// appended with a pending delivery for plugin `p`, none settled.
    async fn left_by_the_last_run(path: &std::path::Path, events: impl IntoIterator<Item = Event>) -> Arc<DurableLog> {
        {
            let log = DurableLog::open(path, super::super::log::SyncPolicy::None).unwrap();
            assert!(log.register("p".into()).await.unwrap());
            for event in events {
                log.append_nowait(Arc::new(event), vec!["p".into()]).unwrap();
            }
            log.sync().await.unwrap();
        }
        super::super::log::tests::reopen(path, Default::default()).await
    }

    /// Takes and acks every delivery until `last` came (waiting up to 5 s for each: a read-back
    /// waits on the log's writer, slow under load), then any more until none comes for 300 ms:
    /// their data, in order.
    async fn ack_through(sub: &mut Subscription, last: &str) -> Vec<String> {
        let mut got: Vec<String> = Vec::new();
        while got.last().is_none_or(|d| d != last) {
            let d = tokio::time::timeout(Duration::from_secs(5), sub.deliveries.recv()).await;
            let d = d.unwrap_or_else(|_| panic!("{last:?} never came after {got:?}")).expect("unsubscribed");
            got.push(String::from_utf8_lossy(&d.event.data).to_string());
            d.acker.ack().await;
        }
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(300), sub.deliveries.recv()).await {
            got.push(String::from_utf8_lossy(&d.event.data).to_string());
            d.acker.ack().await;
        }
        got
    }

    /// Waits (up to 10 s) until `cond` holds.
    async fn eventually_true(cond: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(tokio::time::Instant::now() < deadline, "the condition never held");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A closed tail was let go only when an event matching its pattern came: a client opening
    /// and closing tails on patterns nothing publishes on grew the table (and every publish's
    /// walk of it) without bound, `api.max_tails` notwithstanding.
    #[tokio::test]
    async fn a_closed_observer_is_let_go_though_nothing_matches_it_again() {
        let bus = EmbeddedBus::new();
        for i in 0..1000 {
            drop(bus.observe(vec![format!("never.{i}")], 16).await.unwrap());
        }
        bus.publish(Event::new("x.y", "")).await.unwrap();
        let open = bus.observe(vec!["x.>".into()], 16).await.unwrap();
        assert_eq!(bus.table.read().unwrap().observers.len(), 1, "closed observers kept");
        drop(open);
    }

    #[tokio::test]
    async fn an_observer_that_falls_behind_misses_events_counted_and_holds_no_publisher() {
        let bus = EmbeddedBus::new();
        let mut observed = bus.observe(vec!["x.>".into()], 2).await.unwrap();
        for i in 0..5 {
            bus.publish(Event::new("x.y", i.to_string())).await.unwrap();
        }
        assert_eq!(observed.missed.load(Ordering::Relaxed), 3, "three had no room");
        assert_eq!(observed.events.recv().await.unwrap().data, "0");
        assert_eq!(observed.events.recv().await.unwrap().data, "1");
    }

    #[tokio::test]
    async fn delivers_once_per_subscription_even_when_several_patterns_match() {
        let bus = EmbeddedBus::new();
        let mut a = bus.subscribe(spec(&["orders.*", "orders.>"], 8)).await.unwrap();
        let mut b = bus.subscribe(spec(&["payments.>"], 8)).await.unwrap();
        bus.publish(Event::new("orders.created", "x")).await.unwrap();
        assert_eq!(a.deliveries.recv().await.unwrap().event.subject, "orders.created");
        assert!(a.deliveries.try_recv().is_err());
        assert!(b.deliveries.try_recv().is_err());
    }

    #[tokio::test]
    async fn full_queue_pauses_the_publisher_and_loses_nothing() {
        let bus = EmbeddedBus::new();
        let mut sub = bus.subscribe(spec(&["x"], 1)).await.unwrap();
        let publisher = {
            let bus = bus.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    bus.publish(Event::new("x", i.to_string())).await.unwrap();
                }
            })
        };
        for i in 0..100 {
            let d = sub.deliveries.recv().await.unwrap();
            assert_eq!(d.event.data, i.to_string());
        }
        publisher.await.unwrap();
    }

    #[tokio::test]
    async fn dropping_a_subscription_unsubscribes() {
        let bus = EmbeddedBus::new();
        let sub = bus.subscribe(spec(&["x"], 1)).await.unwrap();
        drop(sub);
        // Would block forever on the full queue if the subscription were still there.
        for _ in 0..3 {
            bus.publish(Event::new("x", "")).await.unwrap();
        }
        assert!(bus.table.read().unwrap().subs.is_empty());
    }

    #[tokio::test]
    async fn retarget_switches_patterns_in_place() {
        let bus = EmbeddedBus::new();
        let mut sub = bus.subscribe(spec(&["a"], 8)).await.unwrap();
        bus.retarget(sub.id, &spec(&["b"], 8)).await.unwrap();
        bus.publish(Event::new("a", "")).await.unwrap();
        bus.publish(Event::new("b", "")).await.unwrap();
        assert_eq!(sub.deliveries.recv().await.unwrap().event.subject, "b");
        assert!(sub.deliveries.try_recv().is_err());
    }

    #[tokio::test]
    async fn outputs_never_wait_on_a_full_queue_and_keep_their_order() {
        let bus = EmbeddedBus::new();
        let mut sub = bus.subscribe(spec(&["x"], 2)).await.unwrap();
        // Nobody reads yet: with a queue of 2, a waiting publish would hang here.
        for i in 0..100 {
            bus.publish_output(Arc::new(Event::new("x", i.to_string()))).await.unwrap();
        }
        assert_eq!(bus.overflowing(), 98);
        for i in 0..100 {
            let d = tokio::time::timeout(std::time::Duration::from_secs(5), sub.deliveries.recv()).await;
            assert_eq!(d.unwrap().unwrap().event.data, i.to_string());
        }
        assert_eq!(bus.overflowing(), 0);
    }

    #[tokio::test]
    async fn an_output_beyond_the_buffer_is_refused_and_reaches_no_one() {
        let bus = EmbeddedBus::new();
        let mut small = bus.subscribe(spec(&["x"], 1)).await.unwrap();
        let mut roomy = bus.subscribe(spec(&["x"], 1 << 16)).await.unwrap();
        let big = vec![0u8; 300 * 1024];
        let mut refused = None;
        for i in 0..10 {
            if let Err(e) = bus.publish_output(Arc::new(Event::new("x", big.clone()))).await {
                refused = Some((i, e));
                break;
            }
        }
        // 1 in the queue, 3 x 300 KiB behind it fill the 1 MiB buffer: the 5th is refused.
        let (i, e) = refused.expect("the buffer filled");
        assert_eq!(i, 4);
        assert!(matches!(e, TransportError::Full(_)), "{e}");
        assert!(e.to_string().contains("flow.buffer_mib"), "{e}");
        // (the 4th waits behind roomy's queue until a delivery lets go of its room in hand)
        let mut got = 0;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(200), roomy.deliveries.recv()).await {
            got += 1;
        }
        assert_eq!(got, 4, "the refused output reached no subscriber");
        for _ in 0..4 {
            small.deliveries.recv().await.unwrap();
        }
        // Room again once the plugin caught up.
        bus.publish_output(Arc::new(Event::new("x", big))).await.unwrap();
    }

    /// One plugin flooding another's buffer is refused alone: a publisher holding less than an
    /// equal share of the buffer is still taken (up to twice the buffer in all), so its delivery
    /// is neither retried nor dead-lettered for the flood.
    #[tokio::test]
    async fn a_flood_into_a_plugins_buffer_refuses_the_flooder_not_other_publishers() {
        let bus = EmbeddedBus::new();
        let mut victim = bus.subscribe(spec(&["x"], 1)).await.unwrap();
        let from = |source: &str| {
            let mut e = Event::new("x", vec![0u8; 100 * 1024]);
            e.source = source.into();
            Arc::new(e)
        };
        let mut flooded = 0;
        let alone = loop {
            match bus.publish_output(from("plugbus/hostile")).await {
                Ok(()) => flooded += 1,
                Err(e) => break e.to_string(),
            }
            assert!(flooded < 100, "the buffer never filled");
        };
        assert!(alone.contains("past it its one publisher may hold 1048576 bytes"), "{alone}");
        // Another publisher: up to an equal share (half of 1 MiB, with two publishers) is taken.
        let mut taken = 0;
        while bus.publish_output(from("plugbus/innocent")).await.is_ok() {
            taken += 1;
            assert!(taken < 100, "the innocent publisher was never bounded");
        }
        // Its equal share: half of the 1 MiB with two publishers, five outputs of 100 KiB.
        assert_eq!(taken, 5, "the innocent publisher's share");
        let refused = bus.publish_output(from("plugbus/hostile")).await.unwrap_err().to_string();
        assert!(
            refused.contains("each of the 2 publishers may hold") && refused.contains("\"plugbus/hostile\" holds"),
            "{refused}"
        );
        // Every output taken is delivered, in order, and the tallies are back to nothing.
        let mut got = Vec::new();
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_millis(200), victim.deliveries.recv()).await {
            got.push(d.event.source.clone());
        }
        let expected: Vec<String> = std::iter::repeat_n("plugbus/hostile".to_string(), flooded)
            .chain(std::iter::repeat_n("plugbus/innocent".to_string(), taken))
            .collect();
        assert_eq!(got, expected);
        let table = bus.table.read().unwrap();
        let state = table.subs[0].overflow.state.lock().unwrap();
        assert!(state.by_plugin.is_empty() && state.bytes == 0, "{} bytes left", state.bytes);
    }

    /// A plugin catching up (here: what the last run left, more than its buffer) whose handler
    /// does not keep up. What waits for it in memory stays within its buffer: a hostile plugin's
    /// requests (never logged) are refused past it, a page read back holds at most half of it,
    /// and a producer's event goes to the log without waiting on the queue the read-back fills.
    #[tokio::test]
    async fn a_plugin_catching_up_is_bounded_in_memory_and_holds_no_producer() {
        const BUDGET: u64 = 256 << 10;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let big = "x".repeat(64 << 10);
        let log = left_by_the_last_run(&path, (0..40).map(|i| Event::new("a.old", format!("{i}{big}")))).await;
        let bus = EmbeddedBus::durable(log);
        let mut sub = bus.subscribe(SubscriptionSpec { buffer_bytes: BUDGET, ..spec(&["a.>"], 1) }).await.unwrap();
        let overflow = bus.table.read().unwrap().subs[0].overflow.clone();
        eventually_true(|| overflow.waiting() > 0).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        let waiting = overflow.state.lock().unwrap().bytes;
        assert!(waiting <= BUDGET, "a page read back put {waiting} bytes into an overflow of {BUDGET}");
        assert!(overflow.state.lock().unwrap().intake.catching_up.is_some());
        // A producer's event: not held behind the read-back's queue.
        let publishing = tokio::time::timeout(Duration::from_secs(2), bus.publish(Event::new("a.new", "new")));
        publishing.await.expect("a producer waited on a plugin catching up").unwrap();
        // A plugin's requests: refused once the buffer is full.
        let mut refused = None;
        for i in 0..64 {
            let mut request = Event::new("a.ask", big.clone());
            request.source = "plugbus/hostile".into();
            match bus.request(request, Duration::from_millis(1), false).await {
                Err(RequestError::Unavailable(why)) => {
                    refused = Some((i, why));
                    break;
                }
                Err(RequestError::Timeout { .. }) => {}
                other => panic!("request {i}: {other:?}"),
            }
        }
        let (taken, why) = refused.expect("64 requests of 64 KiB taken into a buffer of 256 KiB");
        assert!(why.contains("plugin p has"), "{why}");
        let waiting = overflow.state.lock().unwrap().bytes;
        assert!(waiting <= 2 * BUDGET + (70 << 10), "{taken} requests left {waiting} bytes waiting");
        // Everything the log holds for it comes in order, then the new event.
        let mut got = Vec::new();
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(5), sub.deliveries.recv()).await {
            if d.event.subject != "a.ask" {
                got.push(
                    String::from_utf8_lossy(&d.event.data[..d.event.data.len().min(3)])
                        .trim_end_matches('x')
                        .to_string(),
                );
            }
            d.acker.ack().await;
            if got.len() == 41 {
                break;
            }
        }
        let expected: Vec<String> = (0..40).map(|i| i.to_string()).chain(["new".to_string()]).collect();
        assert_eq!(got, expected);
    }

    /// While a plugin catches up (here a replay waiting for the event it holds), what producers
    /// leave in the log for it is bounded by its buffer as its overflow is when it is live:
    /// past it they wait, instead of filling the disk while its handler is stuck. Nothing is
    /// lost and the order holds.
    #[tokio::test]
    async fn producers_wait_past_the_buffer_of_a_plugin_catching_up() {
        const BUDGET: u64 = 256 << 10;
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), super::super::log::SyncPolicy::Always).unwrap();
        let bus = EmbeddedBus::durable(log);
        let mut sub = bus.subscribe(SubscriptionSpec { buffer_bytes: BUDGET, ..spec(&["a.>"], 1) }).await.unwrap();
        bus.publish(Event::new("a.x", "n00")).await.unwrap();
        let in_flight = sub.deliveries.recv().await.unwrap();
        assert_eq!(bus.replay("p", crate::transport::ReplayFrom::Seq(0)).await.unwrap(), 1);
        let published = Arc::new(AtomicU64::new(0));
        let producer = {
            let (bus, published) = (bus.clone(), published.clone());
            let big = "x".repeat(64 << 10);
            tokio::spawn(async move {
                for i in 1..=20 {
                    bus.publish(Event::new("a.x", format!("n{i:02}{big}"))).await.unwrap();
                    published.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let taken = published.load(Ordering::Relaxed);
        assert!(
            taken < 10,
            "{taken} events of 64 KiB left in the log for a plugin catching up with a buffer of 256 KiB"
        );
        assert!(!producer.is_finished());
        in_flight.acker.ack().await;
        drop(in_flight);
        let mut got = Vec::new();
        while let Ok(Some(d)) = tokio::time::timeout(Duration::from_secs(5), sub.deliveries.recv()).await {
            got.push(String::from_utf8_lossy(&d.event.data[..3]).to_string());
            d.acker.ack().await;
            if got.len() == 21 {
                break;
            }
        }
        let expected: Vec<String> = (0..=20).map(|i| format!("n{i:02}")).collect();
        assert_eq!(got, expected);
        tokio::time::timeout(Duration::from_secs(5), producer).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_read_back_outbox_reaches_its_delivery_behind_a_full_queue() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let p: Arc<str> = "p".into();
        let output = Arc::new(Event::new("out.x", "o"));
        {
            let log = DurableLog::open(&path, super::super::log::SyncPolicy::Always).unwrap();
            assert!(log.register(p.clone()).await.unwrap());
            log.append(Arc::new(Event::new("a.1", "1")), vec![p.clone()], false).await.unwrap();
            let Appended::At(seq) = log.append(Arc::new(Event::new("a.2", "2")), vec![p.clone()], false).await.unwrap()
            else {
                panic!("appended")
            };
            // The second one's attempt committed its kv writes with its outputs, then the host died.
            super::super::log::tests::commit_with_outbox(&log, seq, vec![output.clone()]).await;
        }
        let log = super::super::log::tests::reopen(&path, Default::default()).await;
        let bus = EmbeddedBus::durable(log);
        // Room for one: the second is read back behind the full queue.
        let mut sub = bus.subscribe(spec(&["a.>"], 1)).await.unwrap();
        let first = sub.deliveries.recv().await.unwrap();
        assert_eq!(first.event.subject, "a.1");
        assert!(first.handled.is_none());
        let second = sub.deliveries.recv().await.unwrap();
        assert_eq!(second.event.subject, "a.2");
        let released = second.handled.expect("its outbox: the handler must not run again after its kv commit");
        assert_eq!(released[0].id, output.id);
    }

    /// The events the last run left are read back through the overflow, while a producer's
    /// new event reserved a place in the queue directly: it overtook leftovers still waiting in
    /// the overflow (or not read yet), and a subscription ordering by key ran a key's new event
    /// before its older one. (JetStream's durable consumer delivers in stream order.)
    #[tokio::test]
    async fn a_new_event_waits_behind_what_the_last_run_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = left_by_the_last_run(&path, (0..4).map(|i| Event::new("a.old", format!("{i}")))).await;
        let bus = EmbeddedBus::durable_at_start(log);
        // a queue of one: the leftovers wait in the overflow
        let mut sub = bus.subscribe(spec(&["a.>"], 1)).await.unwrap();
        bus.all_subscribed();
        eventually_true(|| bus.overflowing() == 3).await;
        let publisher = bus.clone();
        let new = tokio::spawn(async move { publisher.publish(Event::new("a.new", "n")).await.unwrap() });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut order = Vec::new();
        for _ in 0..5 {
            let d = sub.deliveries.recv().await.unwrap();
            order.push(format!("{}:{}", d.event.subject, String::from_utf8_lossy(&d.event.data)));
            d.acker.ack().await;
        }
        new.await.unwrap();
        assert_eq!(order, ["a.old:0", "a.old:1", "a.old:2", "a.old:3", "a.new:n"]);
    }

    /// The same with more leftovers than one page of the read-back: the new event waits for the
    /// pages not read yet too.
    #[tokio::test]
    async fn a_new_event_waits_behind_every_page_of_what_the_last_run_left() {
        const LEFT: usize = LOAD_PAGE + 76;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = left_by_the_last_run(&path, (0..LEFT).map(|i| Event::new("a.old", format!("{i}")))).await;
        let bus = EmbeddedBus::durable_at_start(log);
        let mut sub = bus.subscribe(SubscriptionSpec { buffer_bytes: 4096, ..spec(&["a.>"], 1) }).await.unwrap();
        bus.all_subscribed();
        // the first page read back, the rest not yet
        eventually_true(|| bus.overflowing() > 0).await;
        let publisher = bus.clone();
        let new = tokio::spawn(async move { publisher.publish(Event::new("a.new", "n")).await.unwrap() });
        let mut got = Vec::new();
        for _ in 0..=LEFT {
            let d = tokio::time::timeout(Duration::from_secs(10), sub.deliveries.recv()).await.unwrap().unwrap();
            got.push(String::from_utf8_lossy(&d.event.data).to_string());
            d.acker.ack().await;
        }
        new.await.unwrap();
        let expected: Vec<String> = (0..LEFT).map(|i| i.to_string()).chain(["n".to_string()]).collect();
        assert!(got == expected, "the new event came after {:?}", got.iter().position(|d| d == "n"));
    }

    /// At start, what the last run left is run again only once every plugin loaded is
    /// subscribed: an output of a re-run made before a later plugin subscribed would have no
    /// pending delivery for it.
    #[tokio::test]
    async fn at_start_what_the_last_run_left_waits_until_every_plugin_is_subscribed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = left_by_the_last_run(&path, [Event::new("a.1", "1")]).await;
        let bus = EmbeddedBus::durable_at_start(log);
        let mut sub = bus.subscribe(spec(&["a.>"], 8)).await.unwrap();
        let mut later =
            bus.subscribe(SubscriptionSpec { plugin: "later".into(), ..spec(&["out.>"], 8) }).await.unwrap();
        let early = tokio::time::timeout(Duration::from_millis(200), sub.deliveries.recv()).await;
        assert!(early.is_err(), "read back before every plugin subscribed");
        bus.all_subscribed();
        let first = sub.deliveries.recv().await.unwrap();
        assert_eq!(first.event.subject, "a.1");
        // its output reaches the plugin subscribed after it
        bus.publish_output(Arc::new(Event::new("out.1", "o"))).await.unwrap();
        assert_eq!(later.deliveries.recv().await.unwrap().event.subject, "out.1");
        // after the start, a plugin subscribing is read back at once (the delivery of its
        // earlier subscription handed back unsettled)
        drop((first, sub));
        let mut again = bus.subscribe(spec(&["a.>"], 8)).await.unwrap();
        let read = tokio::time::timeout(Duration::from_secs(5), again.deliveries.recv()).await;
        assert_eq!(read.expect("read back at once").unwrap().event.subject, "a.1");
    }

    #[tokio::test]
    async fn an_event_whose_commit_landed_but_reported_a_failure_is_delivered_and_its_producer_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (path, log, bus, mut sub) = durable_bus(dir.path(), "a.>", 8).await;
        super::super::log::tests::fail_after_landing(&path);
        let refused = bus.publish(Event::new("a.1", "1")).await.unwrap_err();
        assert!(refused.to_string().contains("may not be on disk"), "{refused}");
        // It is in the log all the same: delivered now, not left for the next start, and its
        // ack settles it there.
        let delivered = tokio::time::timeout(Duration::from_secs(5), sub.deliveries.recv()).await;
        let delivered = delivered.expect("delivered at once").unwrap();
        assert_eq!(delivered.event.subject, "a.1");
        let pending = log.unsettled("p").unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(delivered.acker.position(), Some(("p".into(), pending[0].seq)));
        delivered.acker.ack().await;
        log.sync().await.unwrap();
        assert!(log.unsettled("p").unwrap().is_empty(), "its ack did not settle it");
        bus.publish(Event::new("a.2", "2")).await.unwrap();
        assert_eq!(sub.deliveries.recv().await.unwrap().event.subject, "a.2");
    }

    #[tokio::test]
    async fn a_publisher_of_outputs_waits_while_the_disk_is_full_and_none_is_refused() {
        use super::super::log::tests::{Tmpfs, fill_up, no_room_ahead};
        let Some(disk) = Tmpfs::mount(128) else { return };
        no_room_ahead(disk.0.path());
        let (_, _, bus, mut sub) = durable_bus(disk.0.path(), "loop.>", 64).await;
        let filler = fill_up(disk.0.path());
        let mib = "x".repeat(1 << 20);
        let output = |i: usize| {
            Arc::new(Event::new("loop.x", mib.clone()).with_header("plugbus-caused-by", format!("input-{i}")))
        };
        // Outputs of plugins feeding each other, while the disk stays full: taken (kept to commit
        // once space returns) until those not yet written reach their bound, then the publisher
        // waits; never an error, which would spend the output's tries and dead-letter it.
        let mut published = 0;
        while let Ok(taken) = tokio::time::timeout(Duration::from_secs(1), bus.publish_output(output(published))).await
        {
            taken.expect("an output refused on a full disk");
            published += 1;
            assert!(published <= 40, "the publisher never waited");
        }
        let waiting = tokio::spawn({
            let (bus, next) = (bus.clone(), output(published));
            async move { bus.publish_output(next).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "an output was taken past the bound while the disk was full");
        std::fs::remove_file(&filler).unwrap();
        let went_on = tokio::time::timeout(Duration::from_secs(30), waiting).await;
        went_on.expect("still waiting after space returned").unwrap().expect("taken once space returned");
        published += 1;
        for i in 0..published {
            let delivered = tokio::time::timeout(Duration::from_secs(5), sub.deliveries.recv()).await;
            assert_eq!(
                delivered.expect("every output delivered").unwrap().event.header("plugbus-caused-by"),
                Some(&*format!("input-{i}"))
            );
        }
    }

    #[tokio::test]
    async fn an_output_that_may_be_logged_already_waits_out_a_full_disk_instead_of_failing() {
        use super::super::log::tests::{Tmpfs, fill_up, no_room_ahead};
        let Some(disk) = Tmpfs::mount(16) else { return };
        no_room_ahead(disk.0.path());
        let (_, _, bus, mut sub) = durable_bus(disk.0.path(), "dlq.>", 8).await;
        let filler = fill_up(disk.0.path());
        // A dead letter (or an output of an event run again after a restart) may be in the log
        // already: its append is waited for. On the full disk it waits; refused, it would be
        // dead-lettered on the same full disk and its input acked: lost.
        let dead = Arc::new(Event::new("dlq.x", "x".repeat(256 << 10)));
        let publishing = tokio::spawn({
            let (bus, dead) = (bus.clone(), dead.clone());
            async move { bus.publish_output(dead).await }
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        if publishing.is_finished() {
            panic!("answered on the full disk: {:?}", publishing.await.unwrap());
        }
        std::fs::remove_file(&filler).unwrap();
        let taken = tokio::time::timeout(Duration::from_secs(30), publishing).await;
        taken.expect("still waiting after space returned").unwrap().expect("taken once space returned");
        let delivered = tokio::time::timeout(Duration::from_secs(5), sub.deliveries.recv()).await;
        assert_eq!(delivered.expect("delivered").unwrap().event.id, dead.id);
    }

    #[tokio::test]
    async fn an_output_whose_commit_landed_though_answered_failed_is_delivered_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _, bus, mut sub) = durable_bus(dir.path(), "dlq.>", 8).await;
        // A dead letter's commit lands, reports a failure, and the look for whether it landed
        // cannot be made: answered failed, it is tried again and found in the log.
        super::super::log::tests::fail_after_landing_unchecked(&path);
        let dead = Arc::new(Event::new("dlq.x", "dead"));
        let taken = tokio::time::timeout(Duration::from_secs(10), bus.publish_output(dead.clone())).await;
        taken.expect("tried again").expect("taken");
        let delivered = tokio::time::timeout(Duration::from_secs(5), sub.deliveries.recv()).await;
        let delivered = delivered.expect("delivered now, not at the next start").unwrap();
        assert_eq!(delivered.event.id, dead.id);
        assert_eq!(delivered.acker.position().map(|(_, seq)| seq), Some(1), "as the copy in the log");
    }

    #[tokio::test]
    async fn an_output_logged_before_is_not_delivered_again_after_a_failed_write() {
        let dir = tempfile::tempdir().unwrap();
        let (path, _, bus, mut sub) = durable_bus(dir.path(), "dlq.>", 8).await;
        let dead = Arc::new(Event::new("dlq.x", "dead"));
        bus.publish_output(dead.clone()).await.unwrap();
        assert_eq!(sub.deliveries.recv().await.unwrap().event.id, dead.id);
        // The same output again (its event run again after a restart, say); its first try is
        // answered failed (a commit that landed, with no way to look), and the next finds the
        // copy logged before it was published: not delivered a second time.
        super::super::log::tests::fail_after_landing_unchecked(&path);
        let again = tokio::time::timeout(Duration::from_secs(10), bus.publish_output(dead.clone())).await;
        again.expect("tried again").expect("answered");
        let twice = tokio::time::timeout(Duration::from_millis(500), sub.deliveries.recv()).await;
        assert!(twice.is_err(), "delivered a second time: {:?}", twice.map(|d| d.map(|d| d.event.id.clone())));
    }

    #[tokio::test]
    async fn a_replay_waits_for_the_read_back_of_what_the_last_run_left() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        // More left unsettled than the plugin's buffer holds: its read-back waits for room.
        let left = 3000;
        let log = left_by_the_last_run(&path, (0..left).map(|i| Event::new("a.x", format!("{i}")))).await;
        let bus = EmbeddedBus::durable(log);
        let mut sub = bus.subscribe(spec(&["a.>"], 1)).await.unwrap();
        let refused = bus.replay("p", crate::transport::ReplayFrom::Seq(0)).await.unwrap_err();
        assert!(refused.to_string().contains("still reading back"), "{refused}");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..left {
            let delivery = tokio::time::timeout(Duration::from_secs(10), sub.deliveries.recv()).await.unwrap().unwrap();
            assert!(seen.insert(delivery.event.id.clone()), "delivered twice");
        }
        // Read back (and handed back unsettled): a replay now delivers each of them once more,
        // in order, once.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let made = loop {
            match bus.replay("p", crate::transport::ReplayFrom::Seq(0)).await {
                Ok(made) => break made,
                Err(e) => assert!(std::time::Instant::now() < deadline, "{e}"),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(made, left);
        for i in 0..left {
            let delivery = tokio::time::timeout(Duration::from_secs(10), sub.deliveries.recv()).await.unwrap().unwrap();
            assert_eq!(String::from_utf8_lossy(&delivery.event.data), i.to_string());
        }
        let more = tokio::time::timeout(Duration::from_millis(300), sub.deliveries.recv()).await;
        assert!(more.is_err(), "the replay delivered more than its history");
    }

    #[tokio::test]
    async fn a_read_back_that_fails_for_a_while_is_tried_again_and_delivers_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = left_by_the_last_run(&path, (0..3).map(|i| Event::new("a.x", format!("{i}")))).await;
        // The first two reads fail (the log reopening after a failed write, say).
        super::super::log::tests::fail_reads(&path, 2);
        let bus = EmbeddedBus::durable(log);
        let mut sub = bus.subscribe(spec(&["a.>"], 8)).await.unwrap();
        for i in 0..3 {
            let delivery = tokio::time::timeout(Duration::from_secs(10), sub.deliveries.recv())
                .await
                .expect("the read-back gave up")
                .unwrap();
            assert_eq!(&delivery.event.data[..], format!("{i}").as_bytes());
        }
    }

    /// A read-back that cannot read the log (it tries again, for as long as it takes) holds no
    /// producer, and after a while lets new events go to the plugin live; what it had left to
    /// read arrives once the log reads again.
    #[tokio::test]
    async fn a_read_back_that_cannot_read_the_log_holds_no_producer_and_lets_new_events_through() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = left_by_the_last_run(&path, [Event::new("a.old", "0")]).await;
        super::super::log::tests::fail_reads(&path, 1000);
        let bus = EmbeddedBus::durable(log);
        let mut sub = bus.subscribe(spec(&["a.>"], 8)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), bus.publish(Event::new("a.new", "n")))
            .await
            .expect("the producer was held behind a read-back that cannot go on")
            .unwrap();
        // left to the log, which cannot be read now
        let early = tokio::time::timeout(Duration::from_millis(500), sub.deliveries.recv()).await;
        assert!(early.is_err(), "delivered ahead of the event the last run left");
        tokio::time::sleep(CATCH_UP_WHILE_FAILING + Duration::from_secs(1)).await;
        // past that, new events go live
        bus.publish(Event::new("a.newer", "n")).await.unwrap();
        let live = tokio::time::timeout(Duration::from_secs(5), sub.deliveries.recv()).await;
        assert_eq!(live.expect("held behind a read-back that cannot go on").unwrap().event.subject, "a.newer");
        super::super::log::tests::heal_reads(&path);
        let mut rest = Vec::new();
        for _ in 0..2 {
            let d = tokio::time::timeout(Duration::from_secs(40), sub.deliveries.recv()).await;
            rest.push(d.expect("not read back once the log reads again").unwrap().event.subject.clone());
        }
        assert_eq!(rest, ["a.old", "a.new"]);
        let twice = tokio::time::timeout(Duration::from_millis(300), sub.deliveries.recv()).await;
        assert!(twice.is_err(), "delivered twice: {:?}", twice.map(|d| d.map(|d| d.event.subject.clone())));
    }

    /// A new plugin with `deliver = "all"` gets the log's history first, then what was accepted
    /// while it read it, in the log's order: a new event never runs before an older one of its
    /// key (JetStream's durable consumer delivers in stream order).
    /// While `history` events (data `0`, `1`, ...) are read back into `sub` a page at a time,
    /// three new ones are published: all of the history comes first, then the new ones, in
    /// order; once caught up, the next one goes live, once.
    async fn new_events_come_after_the_history(bus: &EmbeddedBus, sub: &mut Subscription, history: usize) {
        // the first page read back, the rest not yet
        eventually_true(|| bus.overflowing() > 0).await;
        let publisher = bus.clone();
        let new = tokio::spawn(async move {
            for i in 0..3 {
                publisher.publish(Event::new("a.new", format!("n{i}"))).await.unwrap();
            }
        });
        let mut got = Vec::new();
        for _ in 0..history + 3 {
            let d = tokio::time::timeout(Duration::from_secs(10), sub.deliveries.recv()).await.unwrap().unwrap();
            got.push(String::from_utf8_lossy(&d.event.data).to_string());
            d.acker.ack().await;
        }
        new.await.unwrap();
        let expected: Vec<String> =
            (0..history).map(|i| i.to_string()).chain((0..3).map(|i| format!("n{i}"))).collect();
        assert!(got == expected, "a new event came at {:?}", got.iter().position(|d| d.starts_with('n')));
        // caught up: the next one goes live, once
        bus.publish(Event::new("a.new", "live")).await.unwrap();
        let live = tokio::time::timeout(Duration::from_secs(5), sub.deliveries.recv()).await.unwrap().unwrap();
        assert_eq!(&live.event.data[..], b"live");
        let twice = tokio::time::timeout(Duration::from_millis(300), sub.deliveries.recv()).await;
        assert!(twice.is_err(), "delivered twice");
    }

    #[tokio::test]
    async fn a_new_plugins_history_comes_before_what_is_accepted_while_it_is_read() {
        const HISTORY: usize = LOAD_PAGE + 76;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = DurableLog::open(&path, super::super::log::SyncPolicy::None).unwrap();
        assert!(log.register("other".into()).await.unwrap());
        for i in 0..HISTORY {
            log.append_nowait(Arc::new(Event::new("a.old", format!("{i}"))), vec!["other".into()]).unwrap();
        }
        log.sync().await.unwrap();
        let bus = EmbeddedBus::durable(log);
        let durable = Some(crate::transport::Durability { deliver_all: true, give_up_after: 10, dead_letter: None });
        let mut sub =
            bus.subscribe(SubscriptionSpec { buffer_bytes: 4096, durable, ..spec(&["a.>"], 1) }).await.unwrap();
        new_events_come_after_the_history(&bus, &mut sub, HISTORY).await;
    }

    /// A producer takes its targets, then waits (for room, or the scheduler) while a new
    /// `deliver = "all"` plugin subscribes and its history is made pending, then appends: the
    /// event was neither in that history nor pending for the plugin, lost to it.
    #[tokio::test]
    async fn an_event_whose_producer_took_its_targets_before_a_new_plugin_joined_reaches_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), super::super::log::SyncPolicy::Always).unwrap();
        let bus = EmbeddedBus::durable(log);
        let mut other = bus.subscribe(SubscriptionSpec { plugin: "other".into(), ..spec(&["a.>"], 8) }).await.unwrap();
        bus.publish(Event::new("a.old", "old")).await.unwrap();
        let event = Arc::new(Event::new("a.new", "new"));
        let taken_before = bus.targets(&event);
        let durable = Some(crate::transport::Durability { deliver_all: true, give_up_after: 10, dead_letter: None });
        let mut joined = bus.subscribe(SubscriptionSpec { durable, ..spec(&["a.>"], 8) }).await.unwrap();
        bus.accept(event, taken_before).await.unwrap();
        for want in ["old", "new"] {
            let d = tokio::time::timeout(Duration::from_secs(5), joined.deliveries.recv()).await;
            let d = d.unwrap_or_else(|_| panic!("{want:?} never reached the plugin that joined")).unwrap();
            assert_eq!(String::from_utf8_lossy(&d.event.data), want);
            d.acker.ack().await;
            let o = other.deliveries.recv().await.unwrap();
            assert_eq!(String::from_utf8_lossy(&o.event.data), want);
        }
        let twice = tokio::time::timeout(Duration::from_millis(300), joined.deliveries.recv()).await;
        assert!(twice.is_err(), "delivered twice");
    }

    /// A plugin removed (its file deleted) and installed again: its old worker still finishes
    /// what it took. The new subscription read the log back at once, so what the old one still
    /// held (pending, not acked yet) ran twice. It now reads after the old one let go: only what
    /// the old one handed back unsettled, then what came since, in order.
    #[tokio::test]
    async fn a_plugin_installed_again_gets_only_what_its_removed_subscription_left_unsettled() {
        let dir = tempfile::tempdir().unwrap();
        let (_path, _log, bus, mut old) = durable_bus(dir.path(), "a.>", 8).await;
        for i in 0..3 {
            bus.publish(Event::new("a.x", format!("{i}"))).await.unwrap();
        }
        let in_flight = old.deliveries.recv().await.unwrap();
        // Removed: unsubscribed, its worker still holding what it took.
        drop(old.take_guard());
        let mut new = bus.subscribe(spec(&["a.>"], 8)).await.unwrap();
        bus.publish(Event::new("a.x", "3")).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The old worker acks the first, the second it had queued, and hands the third back.
        in_flight.acker.ack().await;
        let queued = old.deliveries.recv().await.unwrap();
        assert_eq!(&queued.event.data[..], b"1");
        queued.acker.ack().await;
        let handed_back = old.deliveries.recv().await.unwrap();
        assert_eq!(&handed_back.event.data[..], b"2");
        drop((handed_back, queued, in_flight, old));
        let got = ack_through(&mut new, "3").await;
        assert_eq!(got, ["2", "3"], "the new subscription got what the old one had settled, or missed some");
    }

    /// A delivery read back and handed back unsettled (or dropped with its queue) is no longer
    /// remembered as a read-back's: the memory for it (and its outbox) stayed until the next
    /// start, and every output of the plugin took the slow, deduplicating path meanwhile.
    #[tokio::test]
    async fn a_read_back_delivery_that_is_gone_unsettled_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = left_by_the_last_run(&path, (0..3).map(|i| Event::new("a.x", format!("{i}")))).await;
        let bus = EmbeddedBus::durable(log.clone());
        let mut sub = bus.subscribe(spec(&["a.>"], 1)).await.unwrap();
        let settled = sub.deliveries.recv().await.unwrap();
        settled.acker.ack().await;
        drop(settled);
        let handed_back = sub.deliveries.recv().await.unwrap();
        assert_eq!(log.redelivered_pending(), 2);
        drop(handed_back);
        assert_eq!(log.redelivered_pending(), 1, "a delivery handed back is still remembered");
        // The third, in the queue, goes with it.
        drop(sub);
        eventually_true(|| log.redelivered_pending() == 0).await;
    }

    /// Events "0" to "2" published on a durable bus in `dir`, the first two acked and the last
    /// held (in flight), then a replay of `p` from the start begun: the log, the bus, the
    /// subscription and the delivery in flight.
    async fn a_replay_begun_holding_the_last_of_three(
        dir: &std::path::Path,
    ) -> (Arc<DurableLog>, EmbeddedBus, Subscription, Delivery) {
        let (_path, log, bus, mut sub) = durable_bus(dir, "a.>", 8).await;
        for i in 0..3 {
            bus.publish(Event::new("a.x", format!("{i}"))).await.unwrap();
        }
        let mut in_flight = None;
        for _ in 0..3 {
            let d = sub.deliveries.recv().await.unwrap();
            if &d.event.data[..] == b"2" {
                in_flight = Some(d);
            } else {
                d.acker.ack().await;
            }
        }
        log.sync().await.unwrap();
        assert_eq!(bus.replay("p", crate::transport::ReplayFrom::Seq(0)).await.unwrap(), 3);
        (log, bus, sub, in_flight.unwrap())
    }

    /// An event in flight when a replay begins runs again in its place in the history, after
    /// its current run: a read model rebuilt by the replay ends on it, not on an older event of
    /// its key. (Left out as "pending already", it ran only before the history it belongs
    /// after.) The history waits for what the plugin holds, so no event runs twice at once.
    #[tokio::test]
    async fn an_event_in_flight_when_a_replay_begins_comes_again_in_its_place() {
        let dir = tempfile::tempdir().unwrap();
        let (_log, _bus, mut sub, in_flight) = a_replay_begun_holding_the_last_of_three(dir.path()).await;
        let early = tokio::time::timeout(Duration::from_millis(300), sub.deliveries.recv()).await;
        assert!(early.is_err(), "the history began while an event was in flight");
        in_flight.acker.ack().await;
        drop(in_flight);
        let got = ack_through(&mut sub, "2").await;
        assert_eq!(got, ["0", "1", "2"]);
    }

    /// An event in flight when a replay begins stays pending when it is settled while the
    /// replay waits for it: it is in the history whatever ends the wait. Here the plugin is
    /// removed meanwhile (its file deleted), and its next subscription reads the whole history;
    /// a crash or retention at that point would find the same pending row. (It was lost: acked,
    /// with the backfill that would make it pending again never run.)
    #[tokio::test]
    async fn an_event_in_flight_when_a_replay_begins_stays_in_its_history_if_the_plugin_goes() {
        let dir = tempfile::tempdir().unwrap();
        let (log, bus, mut old, in_flight) = a_replay_begun_holding_the_last_of_three(dir.path()).await;
        // Removed while the replay waits; its worker still finishes what it took.
        drop(old.take_guard());
        in_flight.acker.ack().await;
        log.sync().await.unwrap();
        let pending: Vec<u64> = log.unsettled("p").unwrap().iter().map(|u| u.seq).collect();
        assert_eq!(pending, [1, 2, 3], "what the replay held was settled out of its history");
        drop((in_flight, old));
        let mut new = bus.subscribe(spec(&["a.>"], 8)).await.unwrap();
        let got = ack_through(&mut new, "2").await;
        assert_eq!(got, ["0", "1", "2"]);
    }

    /// An event in flight when a replay from a time begins, appended before that time, is not
    /// in its history: settled, it is not kept pending, and runs once (it ran again). Its ack
    /// is committed before the history is read, however late the writer gets to it (it was read
    /// at once, and a busy writer left the event pending there: CI ran it twice).
    #[tokio::test]
    async fn an_event_in_flight_from_before_a_replays_time_is_not_run_again() {
        let dir = tempfile::tempdir().unwrap();
        let (path, log, bus, mut sub) = durable_bus(dir.path(), "a.>", 8).await;
        bus.publish(Event::new("a.x", "0")).await.unwrap();
        let in_flight = sub.deliveries.recv().await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let from = std::time::SystemTime::now();
        tokio::time::sleep(Duration::from_millis(20)).await;
        bus.publish(Event::new("a.x", "1")).await.unwrap();
        sub.deliveries.recv().await.unwrap().acker.ack().await;
        log.sync().await.unwrap();
        assert_eq!(bus.replay("p", crate::transport::ReplayFrom::Time(from)).await.unwrap(), 1);
        // Its ack is not committed at once (a busy writer): the history is read only once it
        // is. (It was read at once, and found the event pending still.)
        let held = super::super::log::tests::HeldCommits::hold(&path);
        in_flight.acker.ack().await;
        drop(in_flight);
        tokio::time::sleep(Duration::from_millis(300)).await;
        drop(held);
        assert_eq!(ack_through(&mut sub, "1").await, ["1"]);
    }

    /// A producer that stops waiting for room (an HTTP publish past `api.publish_timeout`,
    /// answered `503`: "not taken") has taken nothing: the event is not logged and delivered
    /// later behind its back, so a client that publishes it again gets it once (it was twice).
    #[tokio::test]
    async fn a_publish_given_up_while_waiting_for_room_takes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (_path, log, bus, mut sub) = durable_bus(dir.path(), "a.>", 1).await;
        bus.publish(Event::new("a.x", "0")).await.unwrap();
        let given_up = tokio::time::timeout(Duration::from_millis(200), bus.publish(Event::new("a.x", "1"))).await;
        assert!(given_up.is_err(), "a full queue took the event");
        let first = sub.deliveries.recv().await.unwrap();
        first.acker.ack().await;
        drop(first);
        let again = tokio::time::timeout(Duration::from_secs(2), bus.publish(Event::new("a.x", "2"))).await;
        again.expect("the queue stayed full: the given-up event took its room").unwrap();
        assert_eq!(ack_through(&mut sub, "2").await, ["2"]);
        log.sync().await.unwrap();
        assert!(log.read(0, 10).unwrap().iter().all(|(_, ev)| &ev.data[..] != b"1"), "the given-up event was logged");
    }

    /// A replay from above where live deliveries began also reads what is pending below its
    /// first, in order: an event handed back there (say by a drain that timed out) runs before
    /// the history, not only at the next start.
    #[tokio::test]
    async fn a_replay_reads_what_was_handed_back_below_its_first_before_its_history() {
        let dir = tempfile::tempdir().unwrap();
        let (_path, log, bus, mut sub) = durable_bus(dir.path(), "a.>", 8).await;
        for i in 0..5 {
            bus.publish(Event::new("a.x", format!("{i}"))).await.unwrap();
        }
        for _ in 0..5 {
            let d = sub.deliveries.recv().await.unwrap();
            if &d.event.data[..] != b"1" {
                d.acker.ack().await;
            }
        }
        log.sync().await.unwrap();
        // seqs 1 to 5 hold "0" to "4": from 4, the history is "3" and "4"
        assert_eq!(bus.replay("p", crate::transport::ReplayFrom::Seq(4)).await.unwrap(), 2);
        let got = ack_through(&mut sub, "4").await;
        assert_eq!(got, ["1", "3", "4"]);
    }

    /// A new `deliver = "all"` plugin whose subscription fails (a full disk) is still new to
    /// the log: its next subscription, once space returns, gets the history (it is registered
    /// in the commit that makes the history pending, not before).
    #[tokio::test]
    async fn a_new_plugin_whose_subscription_failed_gets_its_history_at_the_next_one() {
        use super::super::log::tests::{Tmpfs, fill_up, no_room_ahead};
        let Some(disk) = Tmpfs::mount(16) else { return };
        no_room_ahead(disk.0.path());
        let (_, log, bus, mut other) = durable_bus(disk.0.path(), "a.>", 8).await;
        for i in 0..3 {
            bus.publish(Event::new("a.old", format!("{i}"))).await.unwrap();
            other.deliveries.recv().await.unwrap().acker.ack().await;
        }
        let filler = fill_up(disk.0.path());
        let durable = Some(crate::transport::Durability { deliver_all: true, give_up_after: 10, dead_letter: None });
        let new = || SubscriptionSpec { plugin: "new".into(), durable: durable.clone(), ..spec(&["a.>"], 8) };
        let failed = bus.subscribe(new()).await;
        assert!(failed.is_err(), "subscribed on a full disk");
        std::fs::remove_file(&filler).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while let Err(e) = log.sync().await {
            assert!(std::time::Instant::now() < deadline, "the log did not recover: {e}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut joined = bus.subscribe(new()).await.unwrap();
        for want in ["0", "1", "2"] {
            let d = tokio::time::timeout(Duration::from_secs(5), joined.deliveries.recv()).await;
            let d = d.unwrap_or_else(|_| panic!("history event {want} never came")).unwrap();
            assert_eq!(String::from_utf8_lossy(&d.event.data), want);
            d.acker.ack().await;
        }
    }

    /// The same when the plugin that joined has caught up before the producer appends: the event
    /// goes to it live, though the producer reserved it no room, once.
    #[tokio::test]
    async fn an_event_whose_producer_took_its_targets_before_a_plugin_joined_and_caught_up_goes_live() {
        let dir = tempfile::tempdir().unwrap();
        let (_path, _log, bus, _other) = durable_bus(dir.path(), "b.>", 8).await;
        let event = Arc::new(Event::new("a.new", "late"));
        let taken_before = bus.targets(&event);
        assert!(taken_before.0.is_empty());
        let mut joined = bus.subscribe(SubscriptionSpec { plugin: "q".into(), ..spec(&["a.>"], 8) }).await.unwrap();
        // caught up: a new event goes to it live
        let overflow = bus.table.read().unwrap().subs[1].overflow.clone();
        eventually_true(|| overflow.state.lock().unwrap().intake.catching_up.is_none()).await;
        bus.accept(event, taken_before).await.unwrap();
        let d = tokio::time::timeout(Duration::from_secs(5), joined.deliveries.recv()).await;
        let d = d.expect("the event never reached the plugin that joined").unwrap();
        assert_eq!(&d.event.data[..], b"late");
        d.acker.ack().await;
        let twice = tokio::time::timeout(Duration::from_millis(300), joined.deliveries.recv()).await;
        assert!(twice.is_err(), "delivered twice");
    }

    /// A replay delivers the history again, and what is accepted for the plugin meanwhile comes
    /// after all of it, in the log's order: a read model rebuilt by a replay never applies a new
    /// event before an older one of its key (and nothing twice).
    #[tokio::test]
    async fn what_is_accepted_during_a_replay_comes_after_the_replayed_history() {
        const HISTORY: usize = LOAD_PAGE + 76;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = DurableLog::open(&path, super::super::log::SyncPolicy::None).unwrap();
        let bus = EmbeddedBus::durable(log.clone());
        let mut sub = bus.subscribe(SubscriptionSpec { buffer_bytes: 4096, ..spec(&["a.>"], 1) }).await.unwrap();
        let publisher = bus.clone();
        let history = tokio::spawn(async move {
            for i in 0..HISTORY {
                publisher.publish(Event::new("a.old", format!("{i}"))).await.unwrap();
            }
        });
        for _ in 0..HISTORY {
            let d = tokio::time::timeout(Duration::from_secs(10), sub.deliveries.recv()).await.unwrap().unwrap();
            d.acker.ack().await;
        }
        history.await.unwrap();
        log.sync().await.unwrap();
        let made = bus.replay("p", crate::transport::ReplayFrom::Seq(0)).await.unwrap();
        assert_eq!(made, HISTORY);
        new_events_come_after_the_history(&bus, &mut sub, HISTORY).await;
    }

    /// Where each event goes while a subscription catches up and once it is live: a replay keeps
    /// what the read-back before it delivered from being delivered live again (an append whose
    /// producer was slow to look), and after a forced hand-over the read-back waits for what
    /// was left uncommitted below it.
    #[tokio::test]
    async fn the_intake_decides_each_event_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), super::super::log::SyncPolicy::None).unwrap();
        for i in 0..20 {
            log.append_nowait(Arc::new(Event::new("a.x", format!("{i}"))), vec![]).unwrap();
        }
        let overflow = Overflow::new("p".into(), 1 << 20, 0, Some(log.clone()), Counter::default());
        let live = |seq| Overflow::goes_live(&mut overflow.state.lock().unwrap(), Logged(Some(seq)));
        // caught up at 10: below was read back
        assert!(matches!(overflow.catch_up_at(10, None), CatchUp::Done));
        assert!(!live(5) && live(12));
        // a replay from 21: what the log takes from now on (21, after events 1 to 20) waits behind
        // the history
        // (it reads from 10, where live deliveries began: an event from there on accepted before
        // the replay and decided late is its, not live as well)
        assert_eq!(overflow.catch_up_from_now(&log, 21, 0), (21, 10));
        assert!(!live(5), "read back before the replay, delivered live again");
        assert!(!live(12) && !live(25));
        // forced live (the log failing): everything skipped so far stays the read-back's
        assert!(overflow.stop_catching_up(21));
        assert!(!live(25) && live(26));
        assert!(!live(12), "accepted before the replay began, decided after it ended: the read-back's");
        assert!(matches!(overflow.catch_up_at(21, None), CatchUp::Uncommitted(25)), "left uncommitted below");
        assert!(matches!(overflow.catch_up_at(21, Some(25)), CatchUp::Done));
        assert!(matches!(overflow.catch_up_at(26, None), CatchUp::Done));
        // the in-memory bus decides nothing
        assert!(Overflow::goes_live(&mut overflow.state.lock().unwrap(), Logged(None)));
        // A replay from 15 of a plugin live from 10, and one from 5 of a plugin live from 10:
        // it reads from the lower, and an event from there on accepted before the replay and
        // decided late is its (pending, read in its place), not live after the history.
        for (first, reads_from) in [(15, 10), (5, 5)] {
            let replayed = Overflow::new("p".into(), 1 << 20, 0, Some(log.clone()), Counter::default());
            let live = |seq| Overflow::goes_live(&mut replayed.state.lock().unwrap(), Logged(Some(seq)));
            assert!(matches!(replayed.catch_up_at(10, None), CatchUp::Done));
            assert_eq!(replayed.catch_up_from_now(&log, first, 0), (21, reads_from));
            assert!(!live(12) && !live(16), "in the replay's history, and live as well");
            assert!(!live(22));
            assert!(
                matches!(replayed.catch_up_at(21, Some(21)), CatchUp::Uncommitted(22)),
                "decided late, uncommitted"
            );
            assert!(matches!(replayed.catch_up_at(21, Some(22)), CatchUp::Done));
            assert!(!live(16) && !live(22) && !live(12) && live(23));
        }
    }

    /// A producer's event goes behind what waits in the overflow through the queue slot it
    /// waited for: producers still wait for room one by one, none slips past the queue's
    /// backpressure into the overflow.
    #[tokio::test]
    async fn producers_wait_for_room_behind_what_waits_in_the_overflow() {
        let dir = tempfile::tempdir().unwrap();
        let (_, _log, bus, mut sub) = durable_bus(dir.path(), "a.>", 1).await;
        let overflow = bus.table.read().unwrap().subs[0].overflow.clone();
        eventually_true(|| overflow.state.lock().unwrap().intake.catching_up.is_none()).await;
        // the queue full, two outputs behind it
        for i in 0..3 {
            bus.publish_output(Arc::new(Event::new("a.out", format!("{i}")))).await.unwrap();
        }
        assert_eq!(bus.overflowing(), 2);
        let producers: Vec<_> = (0..5)
            .map(|i| {
                let bus = bus.clone();
                tokio::spawn(async move { bus.publish(Event::new("a.new", format!("{i}"))).await.unwrap() })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut got = Vec::new();
        for _ in 0..2 {
            got.push(sub.deliveries.recv().await.unwrap());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(bus.overflowing() <= 2, "{} wait beyond a queue of one: producers slipped past it", bus.overflowing());
        for _ in 0..6 {
            got.push(tokio::time::timeout(Duration::from_secs(5), sub.deliveries.recv()).await.unwrap().unwrap());
        }
        for p in producers {
            p.await.unwrap();
        }
        let order: Vec<String> =
            got.iter().map(|d| format!("{}:{}", d.event.subject, String::from_utf8_lossy(&d.event.data))).collect();
        assert_eq!(order[..3], ["a.out:0", "a.out:1", "a.out:2"], "{order:?}");
    }

    /// Outputs left in the log for a plugin catching up count against its buffer as if they
    /// waited in it: a plugin flooding one that reads back history is refused, not filling the
    /// disk; once the read-back took them, there is room again.
    #[tokio::test]
    async fn outputs_left_in_the_log_for_a_plugin_catching_up_are_bounded_by_its_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = left_by_the_last_run(&path, [Event::new("a.old", "0")]).await;
        let bus = EmbeddedBus::durable_at_start(log);
        let mut sub = bus.subscribe(SubscriptionSpec { buffer_bytes: 8192, ..spec(&["a.>"], 64) }).await.unwrap();
        let output = |i: usize| {
            let mut out = Event::new("a.out", vec![b'x'; 1000]);
            out.source = "plugbus/flooder".into();
            out.extensions.push(("plugbus-caused-by".into(), format!("input-{i}")));
            Arc::new(out)
        };
        // held back (the start is not over): every output is left in the log
        let mut taken = 0;
        let refused = loop {
            match bus.publish_output(output(taken)).await {
                Ok(()) => taken += 1,
                Err(e) => break e,
            }
            assert!(taken < 100, "a plugin catching up took {taken} outputs into a buffer of 8 KiB");
        };
        assert!(matches!(refused, TransportError::Full(_)), "{refused}");
        assert!(taken >= 5, "refused after {taken}");
        // the flooder alone: another plugin's output is still taken
        let mut other = Event::new("a.out", "o");
        other.source = "plugbus/other".into();
        other.extensions.push(("plugbus-caused-by".into(), "other-input".into()));
        bus.publish_output(Arc::new(other)).await.expect("another plugin refused for the flooder");
        taken += 1;
        bus.all_subscribed();
        for _ in 0..=taken {
            let d = tokio::time::timeout(Duration::from_secs(10), sub.deliveries.recv()).await.unwrap().unwrap();
            d.acker.ack().await;
        }
        bus.publish_output(output(1000)).await.expect("room again once read back");
    }

    /// An output left to the log while the plugin catches up that the log then drops as a
    /// duplicate (the same output published twice) never stalls the catch-up: new events go live
    /// after it.
    #[tokio::test]
    async fn a_duplicate_output_left_to_the_log_does_not_stall_the_catch_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = left_by_the_last_run(&path, [Event::new("a.old", "0")]).await;
        let bus = EmbeddedBus::durable_at_start(log);
        let mut sub = bus.subscribe(spec(&["a.>"], 8)).await.unwrap();
        // an output of a first delivery (not read back): logged without waiting, deduplicated
        let mut out = Event::new("a.out", "o");
        out.extensions.push(("plugbus-caused-by".into(), "some-input".into()));
        let out = Arc::new(out);
        bus.publish_output(out.clone()).await.unwrap();
        bus.publish_output(out).await.unwrap();
        bus.all_subscribed();
        let mut got = Vec::new();
        for _ in 0..2 {
            let d = tokio::time::timeout(Duration::from_secs(10), sub.deliveries.recv()).await.unwrap().unwrap();
            got.push(d.event.subject.clone());
        }
        assert_eq!(got, ["a.old", "a.out"]);
        let sub_overflow = bus.table.read().unwrap().subs[0].overflow.clone();
        eventually_true(|| sub_overflow.state.lock().unwrap().intake.catching_up.is_none()).await;
        bus.publish(Event::new("a.new", "n")).await.unwrap();
        let live = tokio::time::timeout(Duration::from_secs(5), sub.deliveries.recv()).await.unwrap().unwrap();
        assert_eq!(live.event.subject, "a.new");
        let twice = tokio::time::timeout(Duration::from_millis(300), sub.deliveries.recv()).await;
        assert!(twice.is_err(), "delivered twice");
    }

    /// Subscribes `plugin` to `pattern` on `bus` with a queue of `capacity`, a buffer of
    /// `buffer` bytes and a backlog of `backlog` bytes, and waits until it went live.
    async fn live_sub(
        bus: &EmbeddedBus,
        plugin: &str,
        pattern: &str,
        (capacity, buffer, backlog): (usize, u64, u64),
    ) -> Subscription {
        let spec = SubscriptionSpec {
            plugin: plugin.into(),
            buffer_bytes: buffer,
            backlog_bytes: backlog,
            ..spec(&[pattern], capacity)
        };
        let sub = bus.subscribe(spec).await.unwrap();
        let overflow = bus.table.read().unwrap().subs.iter().find(|s| &*s.plugin == plugin).unwrap().overflow.clone();
        eventually_true(|| overflow.state.lock().unwrap().intake.catching_up.is_none()).await;
        sub
    }

    /// A producer publishing `n` events on `a.x` one after another, each's data its number (two
    /// digits) and `padding` bytes: how many it published so far, and its task.
    fn counted_producer(bus: &EmbeddedBus, n: usize, padding: usize) -> (Arc<AtomicU64>, tokio::task::JoinHandle<()>) {
        let (bus, published) = (bus.clone(), Arc::new(AtomicU64::new(0)));
        let counted = published.clone();
        let producer = tokio::spawn(async move {
            let pad = "x".repeat(padding);
            for i in 0..n {
                bus.publish(Event::new("a.x", format!("{i:02}{pad}"))).await.unwrap();
                counted.fetch_add(1, Ordering::Relaxed);
            }
        });
        (published, producer)
    }

    /// Receives `n` deliveries (5 s each at most), acks them and answers their data.
    async fn ack_n(sub: &mut Subscription, n: usize) -> Vec<String> {
        let mut got = Vec::new();
        for _ in 0..n {
            let d = tokio::time::timeout(Duration::from_secs(5), sub.deliveries.recv()).await;
            let d = d.unwrap_or_else(|_| panic!("only {} of {n} delivered: {got:?}", got.len())).unwrap();
            got.push(String::from_utf8_lossy(&d.event.data).to_string());
            d.acker.ack().await;
        }
        got
    }

    /// The attack: a plugin on `>` that never takes an event. Its queue fills, and every
    /// producer used to wait for it, and so every other plugin starved. Now it falls behind:
    /// what it has not room for waits in the log, and reaches it in order once it drains, then
    /// it goes live again.
    #[tokio::test]
    async fn a_slow_plugin_falls_behind_into_the_log_and_holds_up_no_producer_or_other_plugin() {
        const EVENTS: usize = 300;
        let dir = tempfile::tempdir().unwrap();
        let bus = bus_on_a_log(dir.path());
        let mut slow = live_sub(&bus, "slow", ">", (2, 1 << 20, 1 << 30)).await;
        let mut fast = live_sub(&bus, "fast", "a.>", (1024, 1 << 20, 1 << 30)).await;
        let producer = {
            let bus = bus.clone();
            tokio::spawn(async move {
                for i in 0..EVENTS {
                    bus.publish(Event::new("a.x", format!("{i:03}"))).await.unwrap();
                }
            })
        };
        let expected: Vec<String> = (0..EVENTS).map(|i| format!("{i:03}")).collect();
        assert_eq!(ack_n(&mut fast, EVENTS).await, expected, "the other plugin got every event, in order");
        tokio::time::timeout(Duration::from_secs(10), producer)
            .await
            .expect("the producer waited for a plugin that takes nothing")
            .unwrap();
        // (read back into its overflow as that has room: a buffer of 1 MiB holds them all)
        let overflow = bus.table.read().unwrap().subs[0].overflow.clone();
        assert_eq!(ack_n(&mut slow, EVENTS).await, expected, "the slow plugin got every event, in order");
        // caught up, it takes new events live again
        eventually_true(|| overflow.state.lock().unwrap().intake.catching_up.is_none()).await;
        bus.publish(Event::new("a.x", "live")).await.unwrap();
        assert_eq!(ack_n(&mut slow, 1).await, ["live"]);
        assert_eq!(ack_n(&mut fast, 1).await, ["live"]);
        assert!(slow.deliveries.try_recv().is_err(), "nothing delivered twice");
    }

    /// A durable bus on a new log in `dir` (no `fsync`).
    fn bus_on_a_log(dir: &std::path::Path) -> EmbeddedBus {
        EmbeddedBus::durable(DurableLog::open(&dir.join("bus.redb"), super::super::log::SyncPolicy::None).unwrap())
    }

    /// An output from `plugbus/publisher` (1,000 bytes), the `i`th of its input.
    fn publishers_output(subject: &str, i: usize) -> Arc<Event> {
        let mut out = Event::new(subject, format!("{i:04}{}", "x".repeat(996)));
        out.source = "plugbus/publisher".into();
        out.extensions.push(("plugbus-caused-by".into(), format!("input-{i}")));
        Arc::new(out)
    }

    /// The attack: a plugin on `a.>` that never takes an event, and another plugin's outputs on
    /// `a.x`. Once the slow one's buffer was full, every output was refused for every subscriber
    /// (all or none), retried and dead-lettered as the publisher's: one slow plugin cut the
    /// pipeline from the publisher to everyone downstream. Now it falls behind on outputs as on
    /// producers' events: they wait for it in the log (up to its `flow.backlog_mib`), the others
    /// get them at once, and it reads them back in order.
    #[tokio::test]
    async fn a_slow_plugin_falls_behind_on_outputs_and_holds_up_no_publisher_or_other_plugin() {
        const OUTPUTS: usize = 300;
        let dir = tempfile::tempdir().unwrap();
        let bus = bus_on_a_log(dir.path());
        // 300 KB of outputs against a buffer of 8 KiB and a backlog of 1 MiB
        let mut slow = live_sub(&bus, "slow", "a.>", (2, 8 << 10, 1 << 20)).await;
        let mut fast = live_sub(&bus, "fast", "a.>", (1024, 1 << 20, 1 << 30)).await;
        for i in 0..OUTPUTS {
            let published = bus.publish_output(publishers_output("a.x", i)).await;
            published.unwrap_or_else(|e| panic!("output {i} refused for the slow plugin: {e}"));
        }
        let expected: Vec<String> = (0..OUTPUTS).map(|i| format!("{i:04}{}", "x".repeat(996))).collect();
        assert_eq!(ack_n(&mut fast, OUTPUTS).await, expected, "the other plugin got every output, in order");
        assert_eq!(ack_n(&mut slow, OUTPUTS).await, expected, "the slow plugin got every output, in order");
        assert!(slow.deliveries.try_recv().is_err(), "nothing delivered twice");
    }

    /// A plugin feeding itself faster than it runs is bounded by its buffer, as before: it does
    /// not fall behind on its own outputs (it hurts only itself) and fill its backlog on the disk.
    #[tokio::test]
    async fn a_plugin_feeding_itself_is_refused_at_its_buffer_not_let_fill_its_backlog() {
        let dir = tempfile::tempdir().unwrap();
        let bus = bus_on_a_log(dir.path());
        let _selfish = live_sub(&bus, "selfish", "a.>", (2, 8 << 10, 1 << 20)).await;
        let own = |i| {
            let mut out = Arc::unwrap_or_clone(publishers_output("a.x", i));
            out.source = "plugbus/selfish".into();
            Arc::new(out)
        };
        let mut taken = 0;
        let refused = loop {
            match bus.publish_output(own(taken)).await {
                Ok(()) => taken += 1,
                Err(e) => break e.to_string(),
            }
            assert!(taken < 100, "a plugin's own outputs took {taken} KB past its buffer of 8 KiB");
        };
        // (2 in its queue and its 8 KiB buffer: falling behind would add as much again in the log)
        assert!(taken <= 8, "{taken} of its own outputs taken");
        assert!(refused.contains("flow.buffer_mib"), "{refused}");
        // Another plugin's output makes it fall behind; its own outputs in the log are still
        // bounded by its buffer.
        let overflow = bus.table.read().unwrap().subs[0].overflow.clone();
        let mut others = 0;
        while overflow.state.lock().unwrap().intake.catching_up.is_none() {
            bus.publish_output(publishers_output("a.x", 1000 + others)).await.expect("another plugin's output");
            others += 1;
            assert!(others < 20, "it never fell behind");
        }
        let mut in_log = 0;
        while bus.publish_output(own(2000 + in_log)).await.is_ok() {
            in_log += 1;
            assert!(in_log < 100, "a plugin's own outputs took {in_log} KB of its backlog");
        }
        assert!(in_log <= 8, "{in_log} of its own outputs left in the log");
    }

    /// The attack on the bound above: a plugin flooding another that fell behind filled the log's
    /// room for outputs, and the slow plugin's own outputs to itself, counted against all that
    /// waited, were refused, so (all or none) its outputs failed for every other subscriber too.
    /// Its own outputs are now bounded by what it holds itself.
    #[tokio::test]
    async fn a_flood_into_a_plugin_behind_does_not_refuse_its_own_outputs() {
        let dir = tempfile::tempdir().unwrap();
        let bus = bus_on_a_log(dir.path());
        let mut selfish = live_sub(&bus, "selfish", "a.>", (2, 8 << 10, 1 << 20)).await;
        for i in 0..40 {
            bus.publish_output(publishers_output("a.x", i)).await.expect("another plugin's output");
        }
        let mut own = Arc::unwrap_or_clone(publishers_output("a.x", 1000));
        own.source = "plugbus/selfish".into();
        bus.publish_output(Arc::new(own)).await.expect("its own output, with 40 KB of another's waiting");
        assert_eq!(ack_n(&mut selfish, 41).await.last().map(|d| &d[..4]), Some("1000"));
    }

    /// What waits in the log for a plugin behind is bounded: a publisher alone may leave up to half
    /// its `flow.backlog_mib` of outputs there, then is refused, naming the backlog; another still
    /// has its equal share. Producers' events are bounded apart, so outputs filling their room
    /// (with the producers' events already there, more than the backlog) hold up no producer.
    #[tokio::test]
    async fn outputs_waiting_in_the_log_for_a_slow_plugin_stop_at_its_backlog_and_hold_up_no_producer() {
        let dir = tempfile::tempdir().unwrap();
        let bus = bus_on_a_log(dir.path());
        let mut slow = live_sub(&bus, "slow", "a.>", (2, 8 << 10, 64 << 10)).await;
        // 40 KB of producers' events: it falls behind, most of them wait in the log
        const PRODUCED: usize = 40;
        for i in 0..PRODUCED {
            let publish = bus.publish(Event::new("a.p", format!("p{i:03}{}", "x".repeat(996))));
            tokio::time::timeout(Duration::from_secs(5), publish).await.expect("a producer waited").unwrap();
        }
        let mut taken = 0;
        let refused = loop {
            match bus.publish_output(publishers_output("a.x", taken)).await {
                Ok(()) => taken += 1,
                Err(e) => break e.to_string(),
            }
            assert!(taken < 1000, "a backlog of 64 KiB took {taken} outputs of 1 KB");
        };
        // (each charged about 1.4 KB: half of 64 KiB of backlog)
        assert!((15..=30).contains(&taken), "refused after {taken} outputs of 1 KB");
        assert!(refused.contains("flow.backlog_mib"), "{refused}");
        // Another publisher still has its equal share.
        let mut other = 0;
        loop {
            let mut out = Arc::unwrap_or_clone(publishers_output("a.x", 5000 + other));
            out.source = "plugbus/other".into();
            if bus.publish_output(Arc::new(out)).await.is_err() {
                break;
            }
            other += 1;
            assert!(other < 1000, "another publisher was never bounded");
        }
        assert!(other >= 5, "another publisher took {other}");
        taken += other;
        let produced = tokio::time::timeout(Duration::from_secs(5), bus.publish(Event::new("a.y", "produced"))).await;
        produced.expect("a producer waited for the outputs' room").unwrap();
        let got = ack_n(&mut slow, PRODUCED + taken + 1).await;
        assert_eq!(got.last().map(String::as_str), Some("produced"));
    }

    /// Appends `data` for `bus`'s targets as a producer does, and waits for its commit, without
    /// deciding it yet: its sequence number, its targets and its mark.
    async fn appended_undecided(
        bus: &EmbeddedBus,
        log: &DurableLog,
        data: &str,
    ) -> (Arc<Event>, u64, Vec<Arc<Sub>>, Deciding) {
        let event = Arc::new(Event::new("a.x", data.to_string()));
        let (targets, seen) = bus.targets(&event);
        let (sent, _, deciding) = bus
            .send_to_log(&event, &targets, seen, |plugins, deciding| {
                log.send_marked(event.clone(), plugins, false, |seq| deciding.mark(seq))
            })
            .unwrap();
        let Ok(Appended::At(seq)) = sent.landed().await else { panic!("not appended") };
        (event, seq, targets, deciding)
    }

    /// Decides `event` at `seq` for `sub` as its producer does: live (taken) or the read-back's.
    fn decide(sub: &Sub, event: &Arc<Event>, seq: u64) -> bool {
        let mut state = sub.overflow.state.lock().unwrap();
        let live = Overflow::goes_live(&mut state, Logged(Some(seq)));
        if live {
            sub.overflow.take(&mut state, &sub.tx, event, Publisher::Other, event.buffered_cost(), Logged(Some(seq)));
        }
        live
    }

    /// Makes the plugin on `sub` (a queue of 1) fall behind with two new events, reads them and
    /// waits until it went live again.
    async fn fall_behind_and_catch_up(bus: &EmbeddedBus, sub: &mut Subscription, overflow: &Overflow, tag: &str) {
        bus.publish(Event::new("a.x", format!("{tag}1"))).await.unwrap();
        bus.publish(Event::new("a.x", format!("{tag}2"))).await.unwrap();
        assert_eq!(ack_n(sub, 2).await, [format!("{tag}1"), format!("{tag}2")]);
        eventually_true(|| overflow.state.lock().unwrap().intake.catching_up.is_none()).await;
    }

    /// An event appended before its plugin fell behind and decided by its producer only after
    /// the plugin's read-back caught up (once or twice) goes to it live: it used to be left to
    /// the read-back that had ended (below where live deliveries began), delivered to nobody
    /// until the next start. One its read-back read before its producer looked is not live at
    /// the next fall (it ran twice).
    #[tokio::test]
    async fn an_event_decided_after_its_plugin_fell_behind_and_caught_up_is_delivered_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), super::super::log::SyncPolicy::None).unwrap();
        let bus = EmbeddedBus::durable(log.clone());
        // A buffer that holds one event: its read-back reads one at a time, as it drains.
        let mut sub = live_sub(&bus, "p", "a.>", (1, 1024, 1 << 30)).await;
        // A producer appends "late" and has yet to decide it ...
        let (late, late_seq, targets, late_mark) = appended_undecided(&bus, &log, "late").await;
        let overflow = targets[0].overflow.clone();
        // ... while others fill the queue and make the plugin fall behind ...
        for data in ["first", "second", "third", "fourth"] {
            bus.publish(Event::new("a.x", data)).await.unwrap();
        }
        assert!(overflow.state.lock().unwrap().intake.catching_up.is_some(), "it fell behind");
        // ... and another is appended, read back before its producer looks.
        let (read, read_seq, _, read_mark) = appended_undecided(&bus, &log, "read").await;
        assert_eq!(ack_n(&mut sub, 5).await, ["first", "second", "third", "fourth", "read"]);
        eventually_true(|| overflow.state.lock().unwrap().intake.catching_up.is_none()).await;
        // It falls behind and catches up again.
        fall_behind_and_catch_up(&bus, &mut sub, &overflow, "again").await;
        assert!(overflow.state.lock().unwrap().intake.read_to > read_seq);
        // Decided now: the first goes live, the one read back does not.
        assert!(decide(&targets[0], &late, late_seq), "left to a read-back that has ended");
        assert!(!decide(&targets[0], &read, read_seq), "read back already: it would run twice");
        drop((late_mark, read_mark));
        assert_eq!(ack_n(&mut sub, 1).await, ["late"]);
        assert!(tokio::time::timeout(Duration::from_millis(200), sub.deliveries.recv()).await.is_err());
    }

    /// Makes the plugin on `sub` (a queue of 1, a buffer of 1 KiB, which its read-back reads
    /// into half a page at a time) fall behind with `n` events it does not take, so its
    /// read-back of what waits in the log keeps running: their data, and the sequence number of
    /// each.
    async fn keep_behind(bus: &EmbeddedBus, log: &DurableLog, overflow: &Overflow, n: usize) -> Vec<(String, u64)> {
        let mut published = Vec::new();
        for i in 0..n {
            let data = format!("{i:02}");
            published.push((data.clone(), log.next_seq_sent()));
            bus.publish(Event::new("a.x", data)).await.unwrap();
        }
        assert!(overflow.state.lock().unwrap().intake.catching_up.is_some(), "it fell behind");
        assert!(overflow.reading_back.load(Ordering::Acquire), "its read-back runs");
        published
    }

    /// Takes and acks everything through `after` ([`ack_through`]), and checks it against a
    /// replay from `first` begun while the plugin was behind: what it held then (in order, from
    /// the oldest), then every event not taken before it, or from `first` on, each once and in
    /// order, then `after`.
    async fn check_replayed_behind(sub: &mut Subscription, published: &[(String, u64)], first: u64, after: &str) {
        let got = ack_through(sub, after).await;
        // What it held then: at least the one in its queue, at most what its buffer holds.
        let expected = |held: usize| {
            let mut expected: Vec<String> = published[..held].iter().map(|(d, _)| d.clone()).collect();
            let again = published.iter().enumerate().filter(|(i, (_, seq))| *i >= held || *seq >= first);
            expected.extend(again.map(|(_, (d, _))| d.clone()));
            expected.push(after.to_string());
            expected
        };
        assert!(
            (1..=10).any(|held| got == expected(held)),
            "not the replay's history and what waited in the log, each once and in order: {got:?}"
        );
    }

    /// A plugin that keeps falling behind its producers has a read-back running for as long as
    /// it is behind; a replay used to be refused after 2 s ("still reading back"), so a plugin
    /// that is always behind could never be replayed. Now the replay takes that read-back over:
    /// it reads from where the fallen-behind one read, so what waited in the log for the plugin
    /// is delivered once, in order, with the history (from before it fell behind, or from
    /// within what waited). A caller that goes away at once (an HTTP client hanging up) leaves
    /// the replay to finish: the read-back stopped for it is not left stranded.
    #[tokio::test]
    async fn a_replay_takes_over_the_read_back_of_a_plugin_that_fell_behind() {
        for (from_within_the_backlog, caller_goes_away) in [(false, false), (true, false), (false, true)] {
            let dir = tempfile::tempdir().unwrap();
            let log = DurableLog::open(&dir.path().join("bus.redb"), super::super::log::SyncPolicy::None).unwrap();
            let bus = EmbeddedBus::durable(log.clone());
            let mut sub = live_sub(&bus, "p", "a.>", (1, 1024, 1 << 30)).await;
            let overflow = bus.table.read().unwrap().subs[0].overflow.clone();
            let published = keep_behind(&bus, &log, &overflow, 40).await;
            let first = if from_within_the_backlog { published[30].1 } else { 0 };
            let replay = bus.replay("p", crate::transport::ReplayFrom::Seq(first));
            if caller_goes_away {
                // Polled once (its task is spawned, and cannot run before this test yields), then
                // dropped, as by a client hanging up.
                let mut replay = Box::pin(replay);
                assert!(futures::poll!(&mut replay).is_pending());
                drop(replay);
                // (The replay's task took the read-back over.)
                eventually_true(|| overflow.take_over.lock().unwrap().is_none()).await;
            } else {
                let replayed = tokio::time::timeout(Duration::from_secs(10), replay)
                    .await
                    .expect("the replay waited for a read-back that runs as long as the plugin is behind");
                let replayed = replayed.unwrap_or_else(|e| panic!("replay from {first}: {e}"));
                assert_eq!(replayed, published.iter().filter(|(_, seq)| *seq >= first).count());
            }
            // Accepted after the replay began: after its history.
            bus.publish(Event::new("a.x", "after")).await.unwrap();
            check_replayed_behind(&mut sub, &published, first, "after").await;
            // Caught up, it goes live again.
            eventually_true(|| overflow.state.lock().unwrap().intake.catching_up.is_none()).await;
            bus.publish(Event::new("a.x", "live")).await.unwrap();
            assert_eq!(ack_n(&mut sub, 1).await, ["live"]);
        }
    }

    /// With `flow.backlog_mib = 0` a plugin never falls behind: its producers wait for its
    /// queue, as on the in-memory bus.
    #[tokio::test]
    async fn with_no_backlog_a_full_queue_holds_its_producers() {
        let dir = tempfile::tempdir().unwrap();
        let bus = bus_on_a_log(dir.path());
        let mut sub = live_sub(&bus, "slow", "a.>", (2, 1 << 20, 0)).await;
        let (published, producer) = counted_producer(&bus, 20, 0);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(published.load(Ordering::Relaxed), 2, "a queue of 2 took more");
        let expected: Vec<String> = (0..20).map(|i| format!("{i:02}")).collect();
        assert_eq!(ack_n(&mut sub, 20).await, expected);
        producer.await.unwrap();
    }

    /// Past `flow.backlog_mib` of producers' events waiting in the log for a plugin that fell
    /// behind, its producers wait (backpressure), and nothing is lost.
    #[tokio::test]
    async fn producers_wait_once_a_fallen_behind_plugins_backlog_is_full() {
        const BACKLOG: u64 = 256 << 10;
        let dir = tempfile::tempdir().unwrap();
        let bus = bus_on_a_log(dir.path());
        let mut sub = live_sub(&bus, "slow", "a.>", (1, 64 << 10, BACKLOG)).await;
        let (published, producer) = counted_producer(&bus, 20, 64 << 10);
        // Each publish waits for its append (the log's writer, slow under load): the least it
        // takes is waited for, the most it takes looked at after a while.
        eventually_true(|| published.load(Ordering::Relaxed) >= 5).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let taken = published.load(Ordering::Relaxed);
        // one in the queue, one left uncharged (as many as the queue holds), four of 64 KiB,
        // one past it
        assert!((5..10).contains(&taken), "{taken} events of 64 KiB taken with a backlog of 256 KiB");
        let got: Vec<String> = ack_n(&mut sub, 20).await.into_iter().map(|d| d[..2].to_string()).collect();
        let expected: Vec<String> = (0..20).map(|i| format!("{i:02}")).collect();
        assert_eq!(got, expected);
        tokio::time::timeout(Duration::from_secs(5), producer).await.unwrap().unwrap();
    }

    /// Outputs to a plugin that fell behind its producers are bounded by its buffer apart from
    /// the producers' backlog: another plugin's output is not refused (and dead-lettered under
    /// that plugin's name) because the slow one has more than its buffer of producers' events
    /// waiting.
    #[tokio::test]
    async fn a_fallen_behind_plugins_backlog_refuses_no_other_plugins_output() {
        let dir = tempfile::tempdir().unwrap();
        let bus = bus_on_a_log(dir.path());
        let mut sub = live_sub(&bus, "slow", "a.>", (1, 64 << 10, 1 << 30)).await;
        let big = "x".repeat(16 << 10);
        for i in 0..40 {
            let publish = bus.publish(Event::new("a.x", format!("{i:02}{big}")));
            tokio::time::timeout(Duration::from_secs(5), publish).await.expect("a producer waited").unwrap();
        }
        let output = Event { source: "plugbus/other".into(), ..Event::new("a.out", "output") };
        bus.publish_output(Arc::new(output)).await.expect("an output to a plugin whose producers' backlog is 640 KiB");
        let got = ack_n(&mut sub, 41).await;
        assert_eq!(got.last().map(String::as_str), Some("output"), "{:?}", &got[39..]);
    }

    /// The attack: large events to a plugin that takes every delivery and holds it (slow
    /// handlers; deliveries admitted and waiting for their key or a retry). Its `flow.queue`
    /// queued and `flow.queue` admitted deliveries of 1 MiB each were 2 GiB for one plugin. What
    /// its deliveries hold in hand is now bounded by its buffer; the rest waits behind its queue
    /// (bounded by the buffer too), in the log for one fallen behind, or in its producers.
    #[tokio::test]
    async fn what_a_plugins_deliveries_hold_is_bounded_by_its_buffer_not_its_queue() {
        const BUFFER: u64 = 256 << 10;
        const EVENTS: usize = 64;
        for (durable, backlog) in [(false, 0), (true, 0), (true, 1 << 30)] {
            let dir = tempfile::tempdir().unwrap();
            let bus = match durable {
                false => EmbeddedBus::new(),
                true => EmbeddedBus::durable(
                    DurableLog::open(&dir.path().join("bus.redb"), super::super::log::SyncPolicy::None).unwrap(),
                ),
            };
            let mut sub = live_sub(&bus, "p", "a.>", (1024, BUFFER, backlog)).await;
            let (published, producer) = counted_producer(&bus, EVENTS, 16 << 10);
            // At least 8 come (each publish may wait for its append: waited for), then what
            // more came after a while is looked at.
            let mut held = Vec::new();
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while held.len() < 8 && tokio::time::Instant::now() < deadline {
                match sub.deliveries.try_recv() {
                    Ok(d) => held.push(d),
                    Err(_) => tokio::time::sleep(Duration::from_millis(5)).await,
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            while let Ok(d) = sub.deliveries.try_recv() {
                held.push(d);
            }
            let bytes: u64 = held.iter().map(|d| d.event.buffered_cost()).sum();
            let case = format!("durable {durable}, backlog {backlog}");
            assert!(
                bytes <= BUFFER + (17 << 10),
                "{case}: {bytes} bytes held by deliveries in hand, past a buffer of {BUFFER}"
            );
            assert!(held.len() >= 8, "{case}: only {} delivered", held.len());
            if backlog == 0 {
                // in hand, and as much behind the queue, then its producer waits
                let taken = published.load(Ordering::Relaxed);
                assert!(taken < 40, "{case}: {taken} events of 16 KiB taken for a buffer of 256 KiB");
            }
            let mut got: Vec<String> = Vec::new();
            for d in held {
                got.push(String::from_utf8_lossy(&d.event.data[..2]).to_string());
                d.acker.ack().await;
            }
            let rest = ack_n(&mut sub, EVENTS - got.len()).await;
            got.extend(rest.into_iter().map(|d| d[..2].to_string()));
            let expected: Vec<String> = (0..EVENTS).map(|i| format!("{i:02}")).collect();
            assert_eq!(got, expected, "{case}");
            tokio::time::timeout(Duration::from_secs(5), producer).await.unwrap().unwrap();
        }
    }

    /// What a plugin that fell behind reads back from the log is a first delivery: not marked
    /// redelivered, so its outputs (and other plugins' outputs of the same event) are logged
    /// without waiting for a commit each, as any first delivery's.
    #[tokio::test]
    async fn what_a_fallen_behind_plugin_reads_back_is_not_marked_redelivered() {
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), super::super::log::SyncPolicy::None).unwrap();
        let bus = EmbeddedBus::durable(log.clone());
        // A buffer of about one event: the read-back waits while an output waits behind the queue.
        let mut sub = live_sub(&bus, "p", "a.>", (1, 1024, 1 << 30)).await;
        let (first, second) = (Event::new("a.x", "first"), Event::new("a.x", "second"));
        let second_id = second.id.clone();
        bus.publish(first).await.unwrap();
        bus.publish_output(Arc::new(Event::new("a.out", "output"))).await.unwrap();
        bus.publish(second).await.unwrap();
        let overflow = bus.table.read().unwrap().subs[0].overflow.clone();
        assert!(overflow.state.lock().unwrap().intake.catching_up.is_some(), "it fell behind");
        // (each let go as it comes: the next needs its room in hand)
        let mut last = None;
        for _ in 0..3 {
            drop(last.take());
            last = Some(tokio::time::timeout(Duration::from_secs(5), sub.deliveries.recv()).await.unwrap().unwrap());
        }
        assert_eq!(last.as_ref().unwrap().event.id, second_id, "read back after the fall");
        assert!(!log.was_redelivered(&second_id), "a first delivery read back after a fall counted as redelivered");
    }

    /// An in-memory bus with plugin `p` on `a.>` (a queue of `queue`, a buffer of 64 KiB) holding
    /// a delivery of 60 KiB: its deliveries in hand hold its buffer.
    async fn holding_its_buffer(queue: usize) -> (EmbeddedBus, Subscription, Delivery) {
        let bus = EmbeddedBus::new();
        let mut sub = live_sub(&bus, "p", "a.>", (queue, 64 << 10, 0)).await;
        bus.publish(Event::new("a.big", vec![0u8; 60 << 10])).await.unwrap();
        let big = sub.deliveries.recv().await.unwrap();
        (bus, sub, big)
    }

    /// A request of `size` bytes on `a.ask` whose source is plugin `plugin`'s.
    fn ask_as(plugin: &str, size: usize) -> Event {
        let mut ask = Event::new("a.ask", vec![0u8; size]);
        ask.source = crate::event::plugin_source(plugin);
        ask
    }

    /// Asks `event` on `bus` (a client's request when `by_client`) in a task of its own, waiting
    /// up to 5 s for the reply.
    fn ask_in_task(
        bus: &EmbeddedBus,
        event: Event,
        by_client: bool,
    ) -> tokio::task::JoinHandle<Result<Event, RequestError>> {
        let bus = bus.clone();
        tokio::spawn(async move { bus.request(event, Duration::from_secs(5), by_client).await })
    }

    /// Answers the request `asked` with `yes` and checks that its requester got it.
    async fn answer_yes(
        bus: &EmbeddedBus,
        asked: &Delivery,
        asker: tokio::task::JoinHandle<Result<Event, RequestError>>,
    ) {
        bus.reply(asked.event.reply_to.as_deref().unwrap(), Event::new("answer", "yes")).await.unwrap();
        assert_eq!(asker.await.unwrap().unwrap().data, "yes".as_bytes());
    }

    /// A plugin's own request to a subject it serves reaches it though its deliveries in hand
    /// hold its buffer, ahead of what waits for room: its requester is one of them, which would
    /// wait for itself.
    #[tokio::test]
    async fn a_plugins_own_request_is_not_held_back_by_room_in_hand() {
        let (bus, mut sub, big) = holding_its_buffer(16).await;
        // An event waits behind the queue for room.
        bus.publish(Event::new("a.waits", vec![0u8; 8 << 10])).await.unwrap();
        assert_eq!(bus.table.read().unwrap().subs[0].overflow.waiting(), 1);
        let asker = ask_in_task(&bus, ask_as("p", 8 << 10), false);
        let ask = tokio::time::timeout(Duration::from_secs(2), sub.deliveries.recv())
            .await
            .expect("the request waited for room its requester holds")
            .unwrap();
        answer_yes(&bus, &ask, asker).await;
        drop(big);
    }

    /// The same when its queue is full: the request goes ahead of what waits behind the queue,
    /// and the pump, which holds the queue's one slot waiting for room in hand for the event
    /// that was first, is woken to take it. It waited for its 1 s backstop: a request chain
    /// through a plugin whose deliveries hold its buffer took a second a hop.
    #[tokio::test]
    async fn a_plugins_own_request_wakes_the_pump_waiting_for_room() {
        let (bus, mut sub, big) = holding_its_buffer(1).await;
        // The pump takes the queue's one slot for it and waits for room in hand.
        bus.publish(Event::new("a.waits", vec![0u8; 8 << 10])).await.unwrap();
        tokio::task::yield_now().await;
        let asker = ask_in_task(&bus, ask_as("p", 8 << 10), false);
        let ask = tokio::time::timeout(Duration::from_millis(500), sub.deliveries.recv())
            .await
            .expect("the request waited for the pump's backstop")
            .unwrap();
        assert_eq!(&*ask.event.subject, "a.ask");
        answer_yes(&bus, &ask, asker).await;
        drop((big, ask));
        let waited = tokio::time::timeout(Duration::from_secs(2), sub.deliveries.recv()).await.unwrap().unwrap();
        assert_eq!(&*waited.event.subject, "a.waits");
    }

    /// A plugin's own request is not put behind a chain's request that waits for room (a
    /// chain's request takes room up to three times the budget; a plugin's own, none): the pump
    /// looks only at what waits first, and waited for room for the chain's request while the
    /// plugin's own, which the chain's reply may wait for, waited behind it.
    #[tokio::test]
    async fn a_plugins_own_request_never_waits_behind_a_chains_request_waiting_for_room() {
        let (bus, mut sub, big) = holding_its_buffer(1).await;
        let ask = |event: Event| ask_in_task(&bus, event, false);
        // Its own request of 100 KiB in hand: 160 KiB held, of the chain's 192.
        let _first = ask(ask_as("p", 100 << 10));
        let first = tokio::time::timeout(Duration::from_secs(2), sub.deliveries.recv()).await.unwrap().unwrap();
        // The pump takes the queue's one slot for an event and waits for room in hand.
        bus.publish(Event::new("a.waits", vec![0u8; 8 << 10])).await.unwrap();
        tokio::task::yield_now().await;
        // Its own request waits first; then a chain's through it, past three times the budget.
        let own = ask(ask_as("p", 8 << 10));
        let mut chain = ask_as("q", 40 << 10);
        chain.extensions.push((crate::rpc::ASKED_THROUGH.into(), "p,q".into()));
        let _chain = ask(chain);
        let asked = tokio::time::timeout(Duration::from_millis(500), sub.deliveries.recv())
            .await
            .expect("the plugin's own request waited behind the chain's")
            .unwrap();
        assert_eq!(asked.event.source, crate::event::plugin_source("p"));
        answer_yes(&bus, &asked, own).await;
        drop((big, first, asked));
        let next = tokio::time::timeout(Duration::from_secs(2), sub.deliveries.recv()).await.unwrap().unwrap();
        assert_eq!(next.event.source, crate::event::plugin_source("q"), "the chain's request, then the event");
    }

    /// The attack: requests of 8 KiB from a client that gives each up at once, into a plugin whose deliveries in hand hold its buffer. Requests skipped room in
    /// hand, so each went into the queue and was admitted, up to twice `flow.queue` of any size.
    /// Now they wait behind the queue for room, bounded by its buffer as any event is.
    #[tokio::test]
    async fn requests_from_others_wait_for_room_in_hand() {
        let (bus, mut sub, big) = holding_its_buffer(16).await;
        for _ in 0..10 {
            // (A client's request naming the plugin as its source is still a client's.)
            let answer = bus.request(ask_as("p", 8 << 10), Duration::from_millis(1), true).await;
            assert!(answer.is_err(), "nobody answered: {answer:?}");
        }
        let overflow = bus.table.read().unwrap().subs[0].overflow.clone();
        assert!(sub.deliveries.try_recv().is_err(), "a request went into the queue with no room in hand");
        assert!(overflow.waiting() >= 1, "the requests wait behind the queue");
        // Room again: what waited comes.
        drop(big);
        let next = tokio::time::timeout(Duration::from_secs(2), sub.deliveries.recv()).await.unwrap().unwrap();
        assert_eq!(next.event.subject, "a.ask");
    }

    /// Another plugin's request goes into the queue up to twice the budget in hand (a chain of
    /// requests may come back through the plugin whose deliveries hold the budget), not past.
    #[tokio::test]
    async fn another_plugins_request_may_go_up_to_twice_the_budget_in_hand() {
        let (bus, mut sub, _big) = holding_its_buffer(16).await;
        let ask = |size: usize| {
            let bus = bus.clone();
            tokio::spawn(async move { bus.request(ask_as("q", size), Duration::from_millis(300), false).await })
        };
        let _within = ask(40 << 10);
        let _within = tokio::time::timeout(Duration::from_secs(2), sub.deliveries.recv())
            .await
            .expect("another plugin's request within twice the budget waited")
            .unwrap();
        let _past = ask(40 << 10);
        let past = tokio::time::timeout(Duration::from_millis(200), sub.deliveries.recv()).await;
        assert!(past.is_err(), "another plugin's request past twice the budget went in");
    }

    /// A chain of requests that comes back through a plugin (p asks q, whose handler asks p)
    /// reaches it though its deliveries hold twice its buffer: one of them waits for the chain's
    /// reply, so the request would wait for room its own requester holds, and every request of
    /// the chain waited out its timeout. Only the host's mark of the chain counts, on a plugin's
    /// request: a client's request naming it waits for room as any client's does.
    #[tokio::test]
    async fn a_chain_of_requests_back_through_a_plugin_is_not_held_back_by_room_in_hand() {
        let (bus, mut sub, _big) = holding_its_buffer(16).await;
        let ask = |event: Event, by_client: bool| ask_in_task(&bus, event, by_client);
        // Another plugin's request takes p's deliveries in hand to twice its budget.
        let _within = ask(ask_as("q", 60 << 10), false);
        let _within = tokio::time::timeout(Duration::from_secs(2), sub.deliveries.recv()).await.unwrap().unwrap();
        let through_p = |size: usize| {
            let mut back = ask_as("q", size);
            back.extensions.push((crate::rpc::ASKED_THROUGH.into(), crate::rpc::asked_through(Some("p"), "q")));
            back
        };
        // A client's request naming p in its chain (the API refuses `plugbus-*` headers; a
        // library caller's is still a client's) waits.
        let _client = ask(through_p(10 << 10), true);
        let client = tokio::time::timeout(Duration::from_millis(200), sub.deliveries.recv()).await;
        assert!(client.is_err(), "a client's request naming the plugin in its chain went past room in hand");
        // q's handler, running p's request, asks p back.
        let asker = ask(through_p(10 << 10), false);
        let back = tokio::time::timeout(Duration::from_secs(2), sub.deliveries.recv())
            .await
            .expect("the chain's request back through p waited for room its requester holds")
            .unwrap();
        assert_eq!(back.event.header(crate::rpc::ASKED_THROUGH), Some("p,q"));
        answer_yes(&bus, &back, asker).await;
        // Not without bound: a plugin of the chain asking back over and over goes up to three
        // times the budget (130 KiB held here, of 192), not past.
        let _within = ask(through_p(40 << 10), false);
        let _within = tokio::time::timeout(Duration::from_secs(2), sub.deliveries.recv())
            .await
            .expect("the chain's request within three times the budget waited")
            .unwrap();
        let _past = ask(through_p(30 << 10), false);
        let past = tokio::time::timeout(Duration::from_millis(200), sub.deliveries.recv()).await;
        assert!(past.is_err(), "a chain's request past three times the budget went in");
    }

    #[tokio::test]
    async fn invalid_subject_is_refused() {
        let bus = EmbeddedBus::new();
        assert!(bus.publish(Event::new("a..b", "")).await.is_err());
    }
}
