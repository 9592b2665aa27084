//! Transports: where events come from and where outputs go.
//!
//! One trait, [`Transport`], with two implementations: [`embedded`] (an in-process bus, the
//! default) and [`nats`] (core subjects with queue groups, JetStream durable consumers). A transport knows subjects and deliveries; it knows nothing of
//! plugins' code, retries or the sandbox. Invariant: a transport never drops an accepted event
//! silently: it either delivers it, applies backpressure, or returns an error to the publisher.

mod max_deliveries;

pub use max_deliveries::MaxDeliveries;

use crate::event::Event;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// What an observer gets ([`Transport::observe`]).
pub struct Observed {
    /// The events, in the order the transport saw them.
    pub events: mpsc::Receiver<Arc<Event>>,
    /// Events missed because `events` was full: the transport adds, the observer takes.
    pub missed: Arc<std::sync::atomic::AtomicU64>,
}

impl Observed {
    /// An observer's two ends: what the transport sends into, and what the observer gets.
    pub fn channel(capacity: usize) -> (ObserverSender, Observed) {
        let (tx, events) = mpsc::channel(capacity.max(1));
        let missed = Arc::<std::sync::atomic::AtomicU64>::default();
        (ObserverSender { tx, missed: missed.clone() }, Observed { events, missed })
    }
}

/// The transport's end of an observer: sends without waiting, counting what it misses.
#[derive(Clone)]
pub struct ObserverSender {
    tx: mpsc::Sender<Arc<Event>>,
    missed: Arc<std::sync::atomic::AtomicU64>,
}

impl ObserverSender {
    /// Sends `event` if the observer has room, else counts it missed; `false` once the observer
    /// has gone.
    pub fn offer(&self, event: Arc<Event>) -> bool {
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.missed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Counts `n` events the observer missed before they reached this sender (a broker
    /// client's own buffer was full).
    pub fn count_missed(&self, n: u64) {
        self.missed.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the observer has gone.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Waits until the observer has gone.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

/// Why a transport call failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The subject or pattern is not valid.
    #[error(transparent)]
    Subject(#[from] crate::subject::SubjectError),
    /// The transport is shut down or disconnected.
    #[error("transport closed: {0}")]
    Closed(String),
    /// The broker refused or failed the request.
    #[error("{0}")]
    Broker(String),
    /// No room for the event now (a handler's output beyond a plugin's buffer): try again later.
    #[error("no room: {0}")]
    Full(String),
    /// The transport will not take this subscription change at any time: what the plugin
    /// asks is the refusal, not the transport's state (a hot swap that would move a durable
    /// consumer). Not tried again until the file changes.
    #[error("{0}")]
    Refused(String),
}

/// The dead letters a broker keeps, oldest first, as far as one read of them went.
#[derive(Debug, Default)]
pub struct KeptPage {
    /// Those read.
    pub entries: Vec<crate::deadletter::Entry>,
    /// Whether the read reached the last it keeps: else it stopped at its limit, its bytes, or
    /// the messages it passed over, and the broker may keep newer ones.
    pub complete: bool,
}

/// Where a replay starts: a sequence number of the log, or the time events were appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayFrom {
    /// The first sequence number to deliver again (0: the oldest kept).
    Seq(u64),
    /// Events appended at or after this time.
    Time(std::time::SystemTime),
}

impl ReplayFrom {
    /// Reads `--from`: a sequence number (`1200`), an RFC 3339 time (`2026-11-30T07:00:00Z`),
    /// or a duration back from `now` (`90m`, `2h`, `7d`).
    pub fn parse(text: &str, now: std::time::SystemTime) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Ok(Self::Seq(0));
        }
        if let Ok(seq) = text.parse::<u64>() {
            return Ok(Self::Seq(seq));
        }
        if let Ok(time) = humantime::parse_rfc3339_weak(text) {
            // Nothing was appended then yet: a replay from it would deliver nothing, and the
            // events accepted as it began would be left to its empty history.
            if time > now {
                return Err(format!("from {:?}: that time is still to come", crate::event::cut(text)));
            }
            return Ok(Self::Time(time.max(std::time::UNIX_EPOCH)));
        }
        if let Ok(ago) = humantime::parse_duration(text) {
            // Nothing was appended before 1970: `100y` ago is the whole log (a time before the
            // epoch, which a `SystemTime` holds, made the replay's log line panic once it ran).
            let from = now.checked_sub(ago).unwrap_or(std::time::UNIX_EPOCH);
            return Ok(Self::Time(from.max(std::time::UNIX_EPOCH)));
        }
        Err(format!(
            "from {:?}: expected a sequence number (1200), an RFC 3339 time (2026-11-30T07:00:00Z) or a duration ago (90m, 2h, 7d)",
            crate::event::cut(text)
        ))
    }

    /// The append time in unix milliseconds an event must have to be replayed (0 for a sequence).
    pub fn since_ms(self) -> u64 {
        match self {
            Self::Seq(_) => 0,
            Self::Time(t) => t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        }
    }

    /// The first sequence number to look at.
    pub fn first_seq(self) -> u64 {
        match self {
            Self::Seq(seq) => seq,
            Self::Time(_) => 0,
        }
    }
}

impl std::fmt::Display for ReplayFrom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Seq(seq) => write!(f, "seq {seq}"),
            // humantime panics on a time before the epoch (`parse` never makes one).
            Self::Time(t) => write!(f, "{}", humantime::format_rfc3339_millis((*t).max(std::time::UNIX_EPOCH))),
        }
    }
}

/// What to subscribe for one plugin.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    /// The plugin the deliveries are for.
    pub plugin: String,
    /// Subject patterns; an event matching several is delivered once.
    pub patterns: Vec<String>,
    /// The name every host running this plugin shares, so each event goes to one of them (a
    /// consumer group: NATS's queue group and durable consumer name on the NATS backend).
    pub group: String,
    /// How many deliveries may wait in the plugin's queue before the transport pauses.
    pub capacity: usize,
    /// Bytes of handler outputs that may wait beyond a full queue (in-process transports).
    pub buffer_bytes: u64,
    /// Bytes of producers' events that may wait in a durable in-process log for a plugin that
    /// fell behind (0: producers wait for its queue instead).
    pub backlog_bytes: u64,
    /// At-least-once delivery from a durable consumer, when the transport has one.
    pub durable: Option<Durability>,
}

/// What a durable subscription asks of the transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Durability {
    /// On first creation, start from the oldest event the stream holds (else from new ones).
    pub deliver_all: bool,
    /// Deliveries after which the transport gives up on an event by itself (a backstop: the
    /// host dead-letters before this).
    pub give_up_after: u32,
    /// Where the plugin's dead letters go: the transport keeps them durably too.
    pub dead_letter: Option<String>,
}

/// Settles one delivery with the transport once dispatch is done with it.
///
/// The embedded bus has nothing to settle; JetStream maps these to ack / nak / term.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Handled (and its outputs accepted): never deliver again.
    async fn ack(&self);
    /// Failed transiently: deliver again after `delay`.
    async fn nak(&self, delay: Duration);
    /// Dead-lettered: never deliver again.
    async fn term(&self);

    /// Where the delivery sits in the transport's own log (plugin, sequence number), when the
    /// transport keeps one: an attempt's kv commit then keeps its outbox under it.
    fn position(&self) -> Option<(Arc<str>, u64)> {
        None
    }

    /// Whether `ack` does nothing (the in-memory bus): a handled delivery is then let go
    /// without calling it (each call boxes its future).
    fn acks_nothing(&self) -> bool {
        false
    }
}

/// An acker with nothing to settle.
pub struct NoAck;

#[async_trait]
impl Acker for NoAck {
    async fn ack(&self) {}
    async fn nak(&self, _delay: Duration) {}
    async fn term(&self) {}
    fn acks_nothing(&self) -> bool {
        true
    }
}

/// One event delivered to one plugin.
pub struct Delivery {
    /// The event.
    pub event: Arc<Event>,
    /// How to settle it.
    pub acker: Box<dyn Acker>,
    /// The number of this attempt (1 on first delivery; a durable transport counts redeliveries).
    pub attempt: u32,
    /// Whether the transport delivers it again after a `nak` (so retries may leave the host).
    pub redeliverable: bool,
    /// Delivered before, though `attempt` is 1: read back from the embedded bus's log after a
    /// restart or for a replay (it may have run, and been dead-lettered, before). See
    /// [`Delivery::delivered_before`].
    pub redelivered: bool,
    /// The most times the transport delivers it, as the broker last said (JetStream's
    /// `max_deliver` of the consumer every host of the plugin shares: another host or an operator
    /// may have set it lower than this host would), read when a fate is decided, not when it was
    /// pulled (and read again first when its last look is old: [`MaxDeliveries::fresh`]). `None`:
    /// the transport says nothing;
    /// [`RetryPolicy::transport_deliveries`](crate::retry::RetryPolicy) is assumed then.
    pub max_deliveries: Option<Arc<MaxDeliveries>>,
    /// Why it is dead-lettered without running: it could not be read as an event
    /// ([`DeliveryError::Undecodable`](crate::fate::DeliveryError)), or no host took it.
    pub defect: Option<crate::fate::DeliveryError>,
    /// The outputs of an attempt whose kv writes committed before the host stopped: the event
    /// is not run again, these are released and it is acked.
    pub handled: Option<Vec<Arc<Event>>>,
    /// When the transport queued it for the plugin (only while tracing is on: the delivery
    /// span's `queue_wait_ms`).
    pub queued_at: Option<std::time::Instant>,
}

impl Delivery {
    /// Whether the transport delivered it before: its count says so (`attempt` > 1), or it was
    /// read back ([`Delivery::redelivered`]).
    pub fn delivered_before(&self) -> bool {
        self.attempt > 1 || self.redelivered
    }

    /// A first delivery with nothing to settle and no redelivery.
    pub fn once(event: Arc<Event>) -> Self {
        Self {
            event,
            acker: Box::new(NoAck),
            attempt: 1,
            redeliverable: false,
            redelivered: false,
            max_deliveries: None,
            defect: None,
            handled: None,
            queued_at: crate::telemetry::enabled().then(std::time::Instant::now),
        }
    }
}

/// A live subscription: deliveries arrive on `deliveries`; dropping it unsubscribes.
pub struct Subscription {
    /// The plugin's queue of deliveries.
    pub deliveries: mpsc::Receiver<Delivery>,
    /// Identifies the subscription to the transport (for [`Transport::retarget`]).
    pub id: u64,
    weak: mpsc::WeakSender<Delivery>,
    guard: Option<Box<dyn Send + Sync>>,
}

impl Subscription {
    /// Wraps the queue (`tx` is only used to measure its depth) and a guard that unsubscribes
    /// when dropped.
    pub fn new(
        id: u64,
        tx: &mpsc::Sender<Delivery>,
        deliveries: mpsc::Receiver<Delivery>,
        guard: impl Send + Sync + 'static,
    ) -> Self {
        Self { deliveries, id, weak: tx.downgrade(), guard: Some(Box::new(guard)) }
    }

    /// Takes the guard out: the subscription lasts until the guard is dropped, while the
    /// queue can still be drained by whoever owns `deliveries`.
    pub fn take_guard(&mut self) -> Box<dyn Send + Sync> {
        self.guard.take().unwrap_or_else(|| Box::new(()))
    }

    /// A probe for how many deliveries wait in the queue (for metrics and drain).
    pub fn depth_probe(&self) -> Box<dyn Fn() -> usize + Send + Sync> {
        let weak = self.weak.clone();
        Box::new(move || weak.upgrade().map_or(0, |tx| tx.max_capacity() - tx.capacity()))
    }
}

/// What claiming the replay of a dead letter the broker keeps came to
/// ([`Transport::claim_dead_letter`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This host replays it; the claim's revision, to let go of this claim and no later one.
    Ours(u64),
    /// Another replay (on this host or another) holds it now: it is not published here.
    Elsewhere,
    /// No claim can be stored at all (why): the claims' store cannot be found or made. The
    /// replay goes on unclaimed (twice rather than never).
    Unavailable(String),
}

/// The bus the host is attached to.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// A short name for logs: `embedded`, `nats`.
    fn name(&self) -> &'static str;

    /// Publishes one event from a producer (HTTP ingress, `plugbus publish`, a replay);
    /// returns once the transport accepted it, waiting while a consumer is full (backpressure).
    async fn publish(&self, event: Event) -> Result<(), TransportError>;

    /// Publishes a handler's output or a dead letter. It must never wait on a plugin's queue:
    /// outputs may come back to the plugin that made them, whose capacity the waiting delivery
    /// holds (a cycle would wait forever). When there is no room it fails with
    /// [`TransportError::Full`] and dispatch retries. A broker never waits on its consumers, so
    /// the default is [`Transport::publish`].
    async fn publish_output(&self, event: Arc<Event>) -> Result<(), TransportError> {
        self.publish(Arc::unwrap_or_clone(event)).await
    }

    /// Publishes a dead letter, as [`Transport::publish_output`]. `kept_whole`: this host's
    /// store kept it whole (for a replay here), so a broker that cannot take it whole may take
    /// it without what it cannot take, marked (NATS); otherwise it is taken whole or refused.
    async fn publish_dead_letter(&self, event: Arc<Event>, kept_whole: bool) -> Result<(), TransportError> {
        let _ = kept_whole;
        self.publish_output(event).await
    }

    /// Registers the metrics the transport keeps itself (the embedded event log's
    /// `plugbus_log_*`); `registry` has the `plugbus` prefix.
    fn register_metrics(&self, registry: &mut crate::metrics::Registry) {
        let _ = registry;
    }

    /// Subscribes a plugin; deliveries arrive on the returned subscription's queue.
    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<Subscription, TransportError>;

    /// Waits until every event [`Transport::publish`] took so far would survive a crash. The
    /// embedded log under `bus.sync = "batch"` or `"none"` answers a publish once committed,
    /// before its `fsync`; what a replay took leaves the dead-letter store, whose removal is on
    /// disk at once, only after this (review 61c M1: a `kill -9` lost both). A transport whose
    /// taking is durable already does nothing; one that wraps another passes it on.
    async fn sync_taken(&self) -> Result<(), TransportError> {
        Ok(())
    }

    /// Told once, when the host has subscribed every plugin it loaded at start: what the last
    /// run left (the embedded log's unsettled deliveries, run again, and request outboxes) goes
    /// out then, so no plugin loaded later in the start misses its outputs. A plugin subscribing
    /// after this is served at once. A transport that wraps another must pass it on.
    fn all_subscribed(&self) {}

    /// Changes the patterns (and durability) of a live subscription in place: events matching
    /// only the old patterns stop, events matching the new ones start, the queue stays.
    async fn retarget(&self, subscription: u64, spec: &SubscriptionSpec) -> Result<(), TransportError>;

    /// Observes every event matching `patterns` without taking part in delivery (the live tail,
    /// tests). An observer that falls more than `capacity` events behind misses events, counted
    /// in its [`Observed::missed`]; delivery never waits for it.
    async fn observe(&self, patterns: Vec<String>, capacity: usize) -> Result<Observed, TransportError>;

    /// Why `event` is too large for this transport to ever take it (a broker's limit on one
    /// message, headers included, which may be below the host's own event limit), or `None`. A
    /// producer is told so (`413`) rather than to try again later (`503`).
    fn too_large(&self, event: &Event) -> Option<String> {
        let _ = event;
        None
    }

    /// [`Transport::too_large`] for a reply, which goes to its requester's reply address, not
    /// to the subject it carries (a stream capturing that subject never sees it).
    fn reply_too_large(&self, reply: &Event) -> Option<String> {
        self.too_large(reply)
    }

    /// Delivers again to `plugin` every event the transport keeps from `from` on (a sequence
    /// number or an append time) that its subscription matches (to rebuild its state); returns how many. Transports that
    /// keep no history refuse.
    async fn replay(&self, plugin: &str, from: ReplayFrom) -> Result<usize, TransportError> {
        let _ = from;
        Err(TransportError::Broker(format!(
            "replay of {plugin}: the {} transport cannot rewind a plugin (on NATS, use a new durable plugin with deliver = \"all\")",
            self.name()
        )))
    }

    /// The dead letters the broker keeps for every host attached to it (of `plugin`, when given;
    /// oldest first, at most `limit`), each under the broker's own sequence number. `None`: the
    /// broker keeps none, and the host's own store is the record.
    async fn kept_dead_letters(&self, plugin: Option<&str>, limit: usize) -> Result<Option<KeptPage>, TransportError> {
        let _ = (plugin, limit);
        Ok(None)
    }

    /// The newest `limit` dead letters the broker keeps (of `plugin`, when given; oldest first),
    /// and how many it keeps in all: a page to show, read from the newest back. `None`: the
    /// broker keeps none.
    async fn newest_dead_letters(
        &self,
        plugin: Option<&str>,
        limit: usize,
    ) -> Result<Option<(Vec<crate::deadletter::Entry>, usize)>, TransportError> {
        let _ = (plugin, limit);
        Ok(None)
    }

    /// The dead letter the broker keeps whose (dead-letter event) id is `id`, looked for from the
    /// newest back, as far as the listing of the newest reads. `None`: not found, or the broker
    /// keeps none.
    async fn find_dead_letter(&self, id: &str) -> Result<Option<crate::deadletter::Entry>, TransportError> {
        let _ = id;
        Ok(None)
    }

    /// Removes a dead letter the broker keeps (its replay was taken by the bus).
    async fn forget_dead_letter(&self, seq: u64) -> Result<(), TransportError> {
        Err(TransportError::Broker(format!("the {} transport keeps no dead letters (seq {seq})", self.name())))
    }

    /// Claims the replay of the dead letter the broker keeps at `seq` (its dead-letter event's
    /// id `id`) for this host, before it is published: every host attached to the broker may
    /// replay it, and it must run once. [`Claim::Ours`] is held until it expires (its replay was
    /// taken) or [`Transport::release_dead_letter_claim`] (it was not). A transport whose dead
    /// letters no other host sees has nothing to claim.
    async fn claim_dead_letter(&self, seq: u64, id: &str) -> Result<Claim, TransportError> {
        let _ = (seq, id);
        Ok(Claim::Ours(0))
    }

    /// Lets go of this host's claim (of revision `revision`) on the dead letter at `seq` (its
    /// replay was not taken: the next replay, here or on another host, may try it).
    async fn release_dead_letter_claim(&self, seq: u64, id: &str, revision: u64) -> Result<(), TransportError> {
        let _ = (seq, id, revision);
        Ok(())
    }

    /// Publishes `event` with a reply address the transport makes and waits up to `timeout` for
    /// one reply, whose `subject` is the one asked on (the address is the host's, never shown).
    /// `producer`: an API client asking (it may wait for room, as a producer's publish does);
    /// otherwise a plugin asking, whose request never waits on a queue (like an output).
    async fn request(
        &self,
        event: Event,
        timeout: Duration,
        producer: bool,
    ) -> Result<Event, crate::rpc::RequestError> {
        let _ = (timeout, producer);
        Err(crate::rpc::RequestError::Unavailable(format!(
            "the {} transport has no request/reply (asked on {})",
            self.name(),
            event.subject
        )))
    }

    /// Sends a handler's reply to the reply address `to` of the event it handled. `Ok(false)`:
    /// nobody waits for it any more (the requester timed out, or another reply came first); it
    /// was dropped. A broker that cannot tell answers `Ok(true)` once it took the reply.
    async fn reply(&self, to: &str, event: Event) -> Result<bool, TransportError> {
        let _ = event;
        Err(TransportError::Broker(format!("the {} transport cannot reply to {to}", self.name())))
    }

    /// Whether a request's requester may still read a reply to `to`: `false` only where the
    /// transport knows it gave up without one (the embedded bus: it timed out). Dispatch
    /// settles such a request without running it (again): nobody reads its reply, and a
    /// request is at most once. (A request another plugin answered is still run by its other
    /// subscribers: to them it is an event.)
    fn awaits_reply(&self, to: &str) -> bool {
        let _ = to;
        true
    }

    /// Whether the transport can currently deliver (used by `/readyz`).
    fn is_connected(&self) -> bool {
        true
    }

    /// Whether events come from outside this host (a broker). A stop then unsubscribes first
    /// and drains what was taken; on an in-process bus the plugins stay subscribed during the
    /// drain, because the events they publish are deliveries too.
    fn is_external(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::ReplayFrom;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    #[test]
    fn replay_from_reads_a_sequence_a_time_or_a_duration_ago() {
        let now = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(ReplayFrom::parse("", now), Ok(ReplayFrom::Seq(0)));
        assert_eq!(ReplayFrom::parse("1200", now), Ok(ReplayFrom::Seq(1200)));
        let at = ReplayFrom::parse("2026-11-30T07:00:00Z", now).unwrap();
        assert_eq!(at.since_ms(), 1_796_022_000_000);
        assert_eq!(ReplayFrom::parse("2h", now), Ok(ReplayFrom::Time(now - Duration::from_secs(7200))));
        let to_come = ReplayFrom::parse("2999-01-01T00:00:00Z", now).unwrap_err();
        assert!(to_come.contains("still to come"), "{to_come}");
        let why = ReplayFrom::parse("-5", now).unwrap_err();
        assert!(why.contains("\"-5\"") && why.contains("RFC 3339"), "{why}");
        assert!(ReplayFrom::parse("1h", SystemTime::now()).unwrap().since_ms() > 0);
        // Review 60a M1: a duration reaching before 1970 is the whole log, and shows as 1970
        // (it made a time before the epoch, whose display panicked after the replay ran).
        let all = ReplayFrom::parse("100y", now).unwrap();
        assert_eq!(all, ReplayFrom::Time(UNIX_EPOCH));
        assert_eq!(all.to_string(), "1970-01-01T00:00:00.000Z");
        assert_eq!(ReplayFrom::Time(UNIX_EPOCH - Duration::from_secs(5)).to_string(), "1970-01-01T00:00:00.000Z");
    }
}
