//! JetStream durable pull consumers: one per plugin (per queue group) per stream, shared by
//! every host running the plugin. Messages become deliveries; their acker maps ack / nak with
//! delay / term onto JetStream, and a ticker sends `in-progress` for every message held longer
//! than a third of `ack_wait` (queued or running), so a slow handler is not redelivered under it.

use super::Pulled;
use super::pull::{Came, Inbox, PULL_EXPIRES, STATUS_GRACE, STRAGGLERS};
use super::wire;
use crate::transport::{Acker, Delivery, Durability, TransportError};
use async_nats::jetstream;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull};
use async_nats::jetstream::message::AckKind;
use async_nats::{Client, Subject};
use async_trait::async_trait;
use bytes::Bytes;
use futures::StreamExt;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The shortest `ack_wait` the keep-alive keeps to (`nats.ack_wait`'s own floor).
const MIN_ACK_WAIT: Duration = Duration::from_millis(100);

/// `d` in whole milliseconds.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Messages taken from JetStream and not yet settled, with when they arrived.
pub struct Held {
    items: Mutex<HashMap<u64, (Subject, Instant)>>,
    next: AtomicU64,
    /// This host's `nats.ack_wait`.
    own_ack_wait: Duration,
    /// The shortest `ack_wait` a consumer this host pulls from was seen with, or its own, in ms:
    /// the consumer every host of a plugin shares has the one the host
    /// that made it last asked for (review 56b L1: another host's shorter `ack_wait` had a
    /// message in progress here delivered again there while it ran).
    shortest_ack_wait_ms: AtomicU64,
    /// Wakes the keep-alive when that shortens.
    shortened: tokio::sync::Notify,
}

impl Held {
    /// Nothing held yet; in-progress sent at a third of `own_ack_wait`, or of a consumer's
    /// shorter one once seen ([`Held::saw_ack_wait`]).
    pub fn new(own_ack_wait: Duration) -> Self {
        Self {
            items: Mutex::default(),
            next: AtomicU64::new(0),
            own_ack_wait,
            shortest_ack_wait_ms: AtomicU64::new(millis(own_ack_wait)),
            shortened: tokio::sync::Notify::new(),
        }
    }

    /// The consumer `name` was seen with `ack_wait`: a shorter one than this host's (another
    /// host's setting, or an operator's) makes the keep-alive keep to it (at least 100 ms), for
    /// every consumer this host pulls from, until it stops (never lengthened again: in-progress
    /// sent more often than needed costs only messages).
    pub fn saw_ack_wait(&self, name: &str, ack_wait: Duration) {
        // (No shorter than a host may set its own: a consumer made with 1 ms would have every
        // message held sent in-progress hundreds of times a second.)
        let ms = millis(ack_wait.max(MIN_ACK_WAIT));
        if ms < self.shortest_ack_wait_ms.fetch_min(ms, Ordering::Relaxed) {
            tracing::warn!(consumer = name, ack_wait = ?ack_wait, own_ack_wait = ?self.own_ack_wait,
                "a JetStream consumer has a shorter ack_wait than this host's nats.ack_wait (another host's or an \
                 operator's setting): messages in progress here are kept alive at a third of it");
            self.shortened.notify_one();
        }
    }

    /// How often in-progress is sent, and after how long a message is held: a third of the
    /// shortest `ack_wait`.
    fn keep_alive_every(&self) -> Duration {
        Duration::from_millis(self.shortest_ack_wait_ms.load(Ordering::Relaxed)) / 3
    }

    fn hold(&self, reply: Option<Subject>) -> u64 {
        let token = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(reply) = reply {
            self.items.lock().expect("held poisoned").insert(token, (reply, Instant::now()));
        }
        token
    }

    fn release(&self, token: u64) {
        self.items.lock().expect("held poisoned").remove(&token);
    }

    /// Sends `in-progress` for every message held longer than a third of the shortest
    /// `ack_wait` ([`Held::keep_alive_every`]), that often.
    pub async fn keep_alive(self: Arc<Self>, client: Client) {
        loop {
            let after = self.keep_alive_every();
            tokio::select! {
                () = tokio::time::sleep(after) => {}
                () = self.shortened.notified() => continue,
            }
            let due: Vec<Subject> = {
                let items = self.items.lock().expect("held poisoned");
                items.values().filter(|(_, at)| at.elapsed() >= after).map(|(reply, _)| reply.clone()).collect()
            };
            for reply in due {
                let _ = client.publish(reply, Bytes::from_static(b"+WPI")).await;
            }
        }
    }
}

struct JsAcker {
    acker: jetstream::message::Acker,
    held: Arc<Held>,
    token: u64,
    plugin: Arc<str>,
    /// Counts it among its pump's messages out until it is dropped (`watched.rs`).
    out: super::watched::Out,
}

impl JsAcker {
    async fn settle(&self, kind: AckKind) {
        self.held.release(self.token);
        if let Err(e) = self.acker.ack_with(kind).await {
            tracing::warn!(plugin = %self.plugin, "JetStream did not take the settlement (the event will come again): {e}");
        }
    }
}

impl Drop for JsAcker {
    fn drop(&mut self) {
        self.held.release(self.token);
    }
}

#[async_trait]
impl Acker for JsAcker {
    async fn ack(&self) {
        self.settle(AckKind::Ack).await;
    }
    async fn nak(&self, delay: Duration) {
        self.settle(AckKind::Nak(Some(delay))).await;
    }
    async fn term(&self) {
        self.settle(AckKind::Term).await;
    }
}

/// Where a durable consumer lives and what it takes.
#[derive(Clone)]
pub struct ConsumerSpec {
    /// The stream.
    pub stream: String,
    /// The durable name (shared by every host running the plugin).
    pub name: String,
    /// Subject filters inside the stream.
    pub filters: Vec<String>,
    /// Start position and redelivery backstop.
    pub durability: Durability,
    /// How long JetStream waits for a settlement before redelivering.
    pub ack_wait: Duration,
}

impl ConsumerSpec {
    /// Whether `other` asks the server for the same consumer with the same settings.
    pub fn same_consumer(&self, other: &ConsumerSpec) -> bool {
        (&self.stream, &self.name, &self.filters, &self.durability, self.ack_wait)
            == (&other.stream, &other.name, &other.filters, &other.durability, other.ack_wait)
    }

    /// `to` with this consumer's filters kept beside its own: what a retarget sets first, so that
    /// until every stream's consumer took the change, none skips what the version serving takes
    /// (a consumer whose filter left a subject passes over its messages for good, and an interest
    /// stream deletes them). `None` when this is another consumer or nothing would be added. A
    /// filter another covers is left out (JetStream refuses such a pair; it takes filters that
    /// only partly overlap).
    pub fn widened(&self, to: &ConsumerSpec) -> Option<ConsumerSpec> {
        if (&self.stream, &self.name) != (&to.stream, &to.name) {
            return None;
        }
        let filters = crate::subject::without_covered(&[to.filters.as_slice(), self.filters.as_slice()].concat());
        let adds = filters.iter().any(|f| !to.filters.contains(f));
        adds.then(|| ConsumerSpec { filters, ..to.clone() })
    }
}

/// The durable consumer as it is, or made from `spec` when it is gone: a pump that lost its pull
/// (a broker restart, a leader change) never writes its own filters over those another host's
/// version set (every host of the plugin shares the consumer; a retarget updates it, `ensure`).
///
/// One made again starts past `settled` (the consumer's ack floor as the pump last saw it): what
/// it had pending or unacked is delivered again (at least once), not skipped as a consumer made
/// for new messages would (nor the whole stream run again for `deliver = "all"`).
async fn reopen(js: &jetstream::Context, spec: &ConsumerSpec, settled: u64) -> Result<PullConsumer, TransportError> {
    if let Ok(stream) = js.get_stream(&spec.stream).await
        && let Ok(consumer) = stream.get_consumer::<pull::Config>(&spec.name).await
    {
        return Ok(consumer);
    }
    tracing::warn!(stream = %spec.stream, consumer = %spec.name, from_stream_seq = settled + 1,
        "the JetStream consumer is gone (deleted underneath): made again from past what it had settled, so what it had \
         pending runs (some of it perhaps again)");
    ensure_from(js, spec, Some(settled + 1)).await
}

/// Creates the durable consumer, or updates its filters (keeping where it started from).
pub async fn ensure(js: &jetstream::Context, spec: &ConsumerSpec) -> Result<PullConsumer, TransportError> {
    ensure_from(js, spec, None).await
}

/// `spec` with the filters the server's consumer has now (`None`: it is not there, or the server
/// does not say): what a change widens from, whichever host or version set them.
pub(super) async fn on_the_server(js: &jetstream::Context, spec: &ConsumerSpec) -> Option<ConsumerSpec> {
    let stream = js.get_stream_no_info(&spec.stream).await.ok()?;
    let info = stream.consumer_info(&spec.name).await.ok()?;
    let filters = match (&info.config.filter_subject, &info.config.filter_subjects) {
        (one, many) if many.is_empty() && !one.is_empty() => vec![one.clone()],
        (_, many) if !many.is_empty() => many.clone(),
        // No filter: the whole stream.
        _ => return None,
    };
    Some(ConsumerSpec { filters, ..spec.clone() })
}

/// [`ensure`], making a consumer that is not there start at stream sequence `resume` when given
/// (one deleted underneath a pump: from past what it knew settled, not from new messages only).
pub(super) async fn ensure_from(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
    resume: Option<u64>,
) -> Result<PullConsumer, TransportError> {
    let broker = |what: &str, e: &dyn std::fmt::Display| {
        TransportError::Broker(format!("{what} consumer {} on stream {}: {e}", spec.name, spec.stream))
    };
    let stream = js.get_stream(&spec.stream).await.map_err(|e| broker("finding the stream for", &e))?;
    let existing = stream.consumer_info(&spec.name).await.ok();
    let deliver_policy = match (&existing, resume) {
        (Some(info), _) => info.config.deliver_policy,
        (None, Some(start_sequence)) => DeliverPolicy::ByStartSequence { start_sequence },
        (None, None) if spec.durability.deliver_all => DeliverPolicy::All,
        (None, None) => DeliverPolicy::New,
    };
    let own_max_deliver = i64::from(spec.durability.give_up_after.max(1));
    let max_deliver =
        existing.map_or(own_max_deliver, |info| kept_max_deliver(info.config.max_deliver, own_max_deliver));
    let (filter_subject, filter_subjects) = match spec.filters.as_slice() {
        [one] => (one.clone(), Vec::new()),
        many => (String::new(), many.to_vec()),
    };
    let config = pull::Config {
        durable_name: Some(spec.name.clone()),
        description: Some("plugbus plugin deliveries".into()),
        deliver_policy,
        ack_policy: AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        max_deliver,
        filter_subject,
        filter_subjects,
        max_ack_pending: 20_000,
        ..Default::default()
    };
    stream.create_consumer(config).await.map_err(|e| broker("creating", &e))
}

/// The `max_deliver` a consumer that has `existing` keeps when this host, whose own is `own`,
/// makes it again: never lower. Every host of the plugin shares it (hosts of two versions with
/// different `retry.max_attempts`, an operator's change): lowered, a host counting on more would
/// see its event dropped unrun at the lower bound. A consumer without a bound (0 or -1) keeps none.
fn kept_max_deliver(existing: i64, own: i64) -> i64 {
    if existing <= 0 { existing } else { existing.max(own) }
}

/// What one pull asks the server for: at most `messages` messages and `bytes` bytes. The bytes
/// bound what async-nats holds for the pump before the feed's budget sees them (a pull of
/// `flow.queue` messages of 1 MiB each would be 1 GiB).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Batch {
    /// Messages per pull (`flow.queue`, 1 to 1,000).
    pub messages: usize,
    /// Bytes per pull: the feed's budget, but never less than twice the server's
    /// `max_payload` (and 64 KiB more for the subject and headers): the server answers a pull
    /// whose next message is larger than its bytes with an error, not the message, and the
    /// consumer would stall on it.
    pub bytes: usize,
}

impl Batch {
    /// The pull of a feed of `budget` bytes and `queue` messages on a server of `max_payload`.
    pub fn new(queue: usize, budget: u64, max_payload: usize) -> Self {
        let bytes = usize::try_from(budget).unwrap_or(usize::MAX).max(Self::floor(max_payload));
        Self { messages: queue.clamp(1, 1000), bytes }
    }

    /// The fewest bytes a pull asks for on a server of `max_payload`.
    fn floor(max_payload: usize) -> usize {
        max_payload.saturating_mul(2).saturating_add(64 << 10)
    }

    /// This pull, asking for no more than `room` takes: its free slots in the plugin's queue
    /// and its free bytes. With fewer bytes free than the pull's floor (on a server of
    /// `max_payload`), one message: it then waits for room read, kept alive, not unread in the
    /// client behind others.
    ///
    /// A message costs the budget more than its bytes on the wire (`Event::buffered_cost`: about
    /// [`COST_OVER_WIRE`] more): the bytes asked for leave that much free per message.
    pub fn within(self, room: super::budget::Room, max_payload: usize) -> Self {
        let free = usize::try_from(room.bytes).unwrap_or(usize::MAX);
        let messages = self.messages.min(room.slots).max(1);
        let bytes = free.saturating_sub(messages.saturating_mul(COST_OVER_WIRE));
        match bytes >= Self::floor(max_payload) {
            true => Self { messages, bytes: self.bytes.min(bytes) },
            false => Self { messages: 1, bytes: Self::floor(max_payload) },
        }
    }
}

/// What a delivery costs the feed's budget beyond its bytes on the wire, about (the event's
/// fixed part and its header strings: `Event::buffered_cost`).
const COST_OVER_WIRE: usize = 2 << 10;

/// A pump's consumer spec, which a retarget of its plugin changes (its filters): a consumer
/// re-created after it was deleted takes the spec of the version serving, never the one the
/// pump was started with.
pub type SharedSpec = Arc<std::sync::RwLock<ConsumerSpec>>;

/// Where a pump puts what it pulls, and what it tells.
pub struct Feeding {
    /// The plugin's queue and the feed's budget.
    pub intake: super::budget::Intake,
    /// The messages held, which the keep-alive sends `in-progress` for.
    pub held: Arc<Held>,
    /// The plugin's `flow.queue`.
    pub queue: usize,
    /// What the plugin takes.
    pub filter: super::Filter,
}

/// Pulls from the consumer into the plugin's queue until the queue closes; reopens the pull
/// after errors and re-creates the consumer (from `spec` as it is then) if it was deleted.
///
/// Each pull asks only for what the plugin has room for now ([`Batch::within`]): a message a
/// pull brought and left in the client unread is kept alive by nothing (`in-progress` is sent
/// for the messages [`Held`] knows, those read), and past `ack_wait` JetStream delivers it
/// again while the first copy still waits: the event ran twice (a continuous pull, asking
/// again at half its batch and at each expiry whatever was read, held thousands under a
/// backlog). What a pull brought beyond the room its messages turn out to take (a message costs
/// the budget more than its bytes on the wire) is read at once and held
/// ([`super::brought::Brought`]) until it has room; the next pull is asked once it all has.
/// Pulls answer on one inbox the pump keeps ([`Inbox`]): a replicated consumer sends a pull's
/// messages after the status that ends it.
pub async fn pump(js: jetstream::Context, spec: SharedSpec, mut consumer: PullConsumer, feeding: Feeding) {
    let Feeding { intake, held, queue, filter } = feeding;
    let plugin = filter.plugin.clone();
    let _puller = intake.puller();
    let stream = spec.read().expect("spec poisoned").stream.clone();
    let current = || spec.read().expect("spec poisoned").clone();
    // How long a pull may bring nothing before the consumer is looked at (see `STUCK_CHECK`).
    let mut quiet_for = STUCK_CHECK;
    // When another version's message was last given back with a warning (one each 10 s).
    let mut given_back = None;
    // The consumer's ack floor and `max_deliver` as the server has them, looked at by a task of
    // the pump's own while it is busy (`watched.rs`).
    let watched = {
        let fallback = spec.read().expect("spec poisoned").durability.give_up_after;
        super::watched::Watched::new(consumer.cached_info(), fallback, held.clone())
    };
    let _watching = super::Task(tokio::spawn(super::watched::watch(consumer.clone(), watched.clone(), spec.clone())));
    // Kept across pulls: what a pull brings after its status is read, not dropped.
    let mut inbox: Option<Inbox> = None;
    // A pull given up with no status (past `lost_at`): the server is answered once before the
    // next is asked. A link that stalls without dropping leaves the client "connected" for
    // minutes, and a pull asked every `lost_at` would wait in the network, going live together.
    let mut unanswered = false;
    // What pulls brought that the plugin's queue has no room for yet, held and kept alive.
    let mut brought = super::brought::Brought::default();
    loop {
        // The last pull's messages are all queued before the next is sized to the room left.
        if !brought.queue_all(&intake).await {
            return;
        }
        let Some(room) = intake.room().await else { return };
        // The server's `max_payload` as it is now: a reconnect may have reached another server.
        let max_payload = js.client().server_info().max_payload;
        let batch = Batch::new(queue, intake.budget.bytes(), max_payload).within(room, max_payload);
        let open = match &mut inbox {
            Some(open) => open,
            None => match Inbox::open(&js).await {
                Ok(open) => inbox.insert(open),
                Err(e) => {
                    tracing::warn!(plugin = %plugin, stream = %stream, "cannot pull from JetStream yet: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        // Asked while the client reconnects, a pull waits in its buffer and goes live with every
        // other asked meanwhile, each sized to the whole room.
        if js.client().connection_state() != async_nats::connection::State::Connected {
            tokio::time::sleep(Duration::from_millis(250)).await;
            continue;
        }
        if unanswered {
            match tokio::time::timeout(Duration::from_secs(2), consumer.info()).await {
                Ok(Ok(_)) => unanswered = false,
                _ => {
                    tracing::warn!(plugin = %plugin, stream = %stream,
                        "a pull's status never came and JetStream does not answer: waiting before the next pull");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let asked = {
            let spec = current();
            open.ask(&spec.stream, &spec.name, batch).await
        };
        if let Err(e) = asked {
            tracing::warn!(plugin = %plugin, stream = %stream, "cannot pull from JetStream yet: {e}");
            tokio::time::sleep(Duration::from_secs(1)).await;
            if let Ok(c) = reopen(&js, &current(), watched.settled()).await {
                consumer = c;
            }
            continue;
        }
        // A pull ends with its own status (after its messages from a single server, before them
        // from a replicated consumer), once the messages it says the pull brought are read; or,
        // with none (its bytes used up exactly, or its status lost in a reconnect or a stalled
        // link), once its count came and 1 s passed, or after a quiet while, at `lost_at`.
        let lost_at = Instant::now() + PULL_EXPIRES + STATUS_GRACE;
        let (mut closed, mut failed, mut stuck, mut received, mut gave_back) = (false, false, false, 0usize, false);
        let mut ended: Option<String> = None;
        // How many messages this pull brings: what it asked for until its status says less.
        let mut brings = batch.messages;
        loop {
            if ended.is_some() && received >= brings {
                break;
            }
            let wait = match ended.is_some() || received >= batch.messages {
                true => STRAGGLERS,
                false => quiet_for.min(lost_at.saturating_duration_since(Instant::now())),
            };
            let next = tokio::time::timeout(wait, open.next());
            let came = match brought.is_empty() {
                true => next.await,
                // Read on while what came waits for room: nothing brought waits unread.
                false => tokio::select! {
                    came = next => came,
                    queued = brought.queue_next(&intake) => match queued {
                        true => continue,
                        false => return,
                    },
                },
            };
            let came = match came {
                Ok(Some(came)) => came,
                Ok(None) => {
                    closed = true;
                    break;
                }
                Err(_) if ended.is_some() || received >= batch.messages => break,
                Err(_) if Instant::now() >= lost_at => {
                    unanswered = true;
                    break;
                }
                Err(_) if !waits_behind_a_message_no_pull_takes(&mut consumer).await => {
                    quiet_for = (quiet_for * 2).min(STUCK_CHECK_MAX);
                    continue;
                }
                // What came during the look is taken first: a burst the open pull is already
                // bringing reads as messages waiting too.
                Err(_) => match tokio::time::timeout(DRAIN, open.next()).await {
                    Ok(Some(came)) => came,
                    Ok(None) => {
                        closed = true;
                        break;
                    }
                    Err(_) => {
                        stuck = true;
                        break;
                    }
                },
            };
            let this_pull = open.pull();
            let msg = match came {
                // Its status ends the pull; those of its messages still on their way (after the
                // status, from a replicated consumer) are read first.
                Came::Status(Some(pull), status, not_brought) if pull == this_pull && ended.is_none() => {
                    brings = batch.messages.saturating_sub(not_brought.unwrap_or(batch.messages));
                    ended = Some(status);
                    continue;
                }
                // A pull given up earlier (stuck, or its status late past `lost_at`).
                Came::Status(_, status, _) => {
                    tracing::debug!(plugin = %plugin, stream = %stream, "the status of a pull given up earlier: {status}");
                    continue;
                }
                // (A message does not say which pull brought it: one of a pull given up earlier
                // counts as this one's.)
                Came::Message(msg) => {
                    received += 1;
                    msg
                }
            };
            watched.active();
            match filter.pulled(msg.subject.as_str(), &stream, || stream_sequence(&msg)) {
                Pulled::Take => {
                    brought.push(HeldMessage::of(msg, &held, &plugin, &watched));
                    if !brought.queue_now(&intake) {
                        return;
                    }
                }
                // Its last delivery: given back once more, JetStream would drop it unrun. One only
                // the patterns this host's change left name, stored after the change, is no
                // plugin version's: acked unrun, as the narrowed consumer would pass over it.
                Pulled::NoLongerTaken if last_delivery(&msg, watched.max_deliveries()) => {
                    tracing::debug!(plugin = %plugin, stream = %stream, subject = %msg.subject,
                        "a message only the patterns the plugin left name, stored after the change, given back until \
                         its last delivery: settled unrun");
                    if let Err(e) = msg.ack().await {
                        tracing::debug!(plugin = %plugin, "settling a message the plugin does not take here: {e}");
                    }
                }
                Pulled::AnotherVersions if last_delivery(&msg, watched.max_deliveries()) => {
                    let mut delivery = HeldMessage::of(msg, &held, &plugin, &watched).delivery();
                    delivery.defect = Some(crate::fate::DeliveryError::Unclaimed(UNCLAIMED.into()));
                    brought.push_delivery(delivery);
                    if !brought.queue_now(&intake) {
                        return;
                    }
                }
                not => gave_back |= not_delivered(&msg, not, &plugin, &mut given_back).await,
            }
        }
        if closed {
            // The client closed the inbox: a new one at the next turn.
            tracing::warn!(plugin = %plugin, stream = %stream, "the inbox JetStream pulls answer on closed; opening another");
            inbox = None;
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        if let Some(status) = ended {
            match PullEnd::of(&status, received) {
                PullEnd::Done => {}
                PullEnd::MaybeStuck => stuck = waits_behind_a_message_no_pull_takes(&mut consumer).await,
                PullEnd::Failed => {
                    tracing::warn!(plugin = %plugin, stream = %stream, "JetStream pull ended: {status}; making the consumer again");
                    failed = true;
                }
            }
        }
        if stuck {
            // The open pull is not taken back: it stays open until its expiry (its status, read at
            // a later pull, ends nothing). The message is delivered as any other:
            // `max_event_bytes` decides whether it runs, and a dead letter too large for the
            // server is published without its data (`NatsTransport`).
            quiet_for = STUCK_CHECK;
            match take_the_next_message(&consumer).await {
                Ok(Some(msg)) => match filter.pulled(msg.subject.as_str(), &stream, || stream_sequence(&msg)) {
                    Pulled::Take => {
                        tracing::warn!(plugin = %plugin, stream = %stream, subject = %msg.subject,
                            bytes = msg.message.length, pull_bytes = batch.bytes,
                            "the consumer waited behind a message larger than a pull takes; taken alone");
                        brought.push(HeldMessage::of(msg, &held, &plugin, &watched));
                        if !brought.queue_all(&intake).await {
                            return;
                        }
                    }
                    not => {
                        not_delivered(&msg, not, &plugin, &mut given_back).await;
                    }
                },
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(plugin = %plugin, stream = %stream, "taking the message the consumer waits behind: {e}")
                }
            }
            continue;
        }
        if gave_back {
            // The redeliveries go to the hosts of the consumer's version meanwhile: each one
            // given back here counts toward the consumer's `max_deliver`.
            tokio::time::sleep(ANOTHER_VERSIONS_PAUSE).await;
        }
        if failed {
            tokio::time::sleep(Duration::from_millis(250)).await;
            match reopen(&js, &current(), watched.settled()).await {
                Ok(c) => consumer = c,
                Err(e) => tracing::warn!(plugin = %plugin, "{e}"),
            }
        }
    }
}

/// How long a message another version of the plugin takes waits before JetStream delivers it
/// again (to any host of the plugin's).
const ANOTHER_VERSIONS_WAIT: Duration = Duration::from_secs(1);

/// Why a message only another version takes is dead-lettered at its last delivery.
const UNCLAIMED: &str = "hosts of a version that does not subscribe to it gave it back until JetStream's max_deliver \
     (a rolling upgrade, or another version running elsewhere): dead-lettered rather than dropped";

/// Where the stream stored `msg`.
fn stream_sequence(msg: &jetstream::Message) -> Option<u64> {
    msg.info().ok().map(|info| info.stream_sequence)
}

/// Whether `msg` comes for the last time (the consumer delivers a message `max_deliveries` times,
/// `watched.rs`): JetStream drops it once given back now.
fn last_delivery(msg: &jetstream::Message, max_deliveries: u32) -> bool {
    msg.info().is_ok_and(|info| info.delivered >= i64::from(max_deliveries))
}

/// How long a pump that gave back another version's message waits before its next pull.
const ANOTHER_VERSIONS_PAUSE: Duration = Duration::from_secs(2);

/// Settles a message the feed does not deliver (`not`: see [`Pulled`]): acked when it is not the
/// plugin's, given back when it is another version's or no longer taken (a warning at most
/// every 10 s). `true`: given back for another version's hosts, who get the pause.
async fn not_delivered(
    msg: &jetstream::Message,
    not: Pulled,
    plugin: &str,
    given_back: &mut Option<std::time::Instant>,
) -> bool {
    let settled = match not {
        Pulled::AnotherVersions | Pulled::NoLongerTaken => {
            if given_back.is_none_or(|at| at.elapsed() >= Duration::from_secs(10)) {
                *given_back = Some(std::time::Instant::now());
                tracing::warn!(plugin, subject = %msg.subject,
                    "a message no subscription of this version names, from the consumer every host of the plugin \
                     shares (another version runs on another host, or this one is being changed): given back \
                     for the host that takes it");
            }
            msg.ack_with(AckKind::Nak(Some(ANOTHER_VERSIONS_WAIT))).await
        }
        Pulled::NotThePlugins | Pulled::Take => msg.ack().await,
    };
    if let Err(e) = settled {
        tracing::debug!(plugin, "settling a message the plugin does not take here: {e}");
    }
    not == Pulled::AnotherVersions
}

/// How a pull ended that the server ended with a status.
#[derive(Debug, PartialEq, Eq)]
enum PullEnd {
    /// It brought what it could (`409 Batch Completed` at its bytes, a leader change, a next
    /// message over its bytes after some): the next pull is asked for at once.
    Done,
    /// Its first message was over its bytes: the consumer may wait behind one no pull takes.
    MaybeStuck,
    /// The consumer is gone or JetStream is not there (`Consumer Deleted`, no responders,
    /// anything else): the consumer is made again.
    Failed,
}

impl PullEnd {
    /// The end a status (its code and description) makes of a pull that brought `brought`
    /// messages.
    fn of(status: &str, brought: usize) -> Self {
        if status.contains("Message Size Exceeds MaxBytes") {
            return if brought == 0 { Self::MaybeStuck } else { Self::Done };
        }
        if ["Batch Completed", "Leadership Change", "Request Timeout"].iter().any(|s| status.contains(s)) {
            return Self::Done;
        }
        Self::Failed
    }
}

/// How long a pull may bring nothing before the host asks JetStream whether the consumer waits
/// behind a message larger than any pull of its takes (`Batch::bytes`); doubled up to
/// [`STUCK_CHECK_MAX`] each time the answer is no, back to this after a yes. So a plugin whose
/// events come every few seconds costs few consumer-info requests, and a stuck one is found
/// within a minute (an idle one costs a request a minute).
///
/// Such a message was stored through a server with a higher `max_payload`, or before this one
/// was restarted with a lower one (and `flow.buffer_mib` is below it). The server answers a
/// pull whose next message is over the pull's bytes with a `409` status, not the message;
/// async-nats swallows it and pulls again, so every later event of the plugin would wait behind
/// it for good, with nothing said.
const STUCK_CHECK: Duration = Duration::from_secs(3);
const STUCK_CHECK_MAX: Duration = Duration::from_secs(60);

/// How long the open pull is given, once the consumer looked stuck, to bring what it may be
/// bringing already.
const DRAIN: Duration = Duration::from_millis(200);

/// Whether messages wait for the plugin that its pull does not bring, though the consumer is
/// not at `max_ack_pending`: the pull is stuck behind one it cannot take.
async fn waits_behind_a_message_no_pull_takes(consumer: &mut PullConsumer) -> bool {
    match consumer.info().await {
        Ok(info) => {
            let limit = info.config.max_ack_pending;
            info.num_pending > 0 && (limit <= 0 || (info.num_ack_pending as i64) < limit)
        }
        Err(e) => {
            tracing::debug!("consumer info, looking for a pull stuck behind a large message: {e}");
            false
        }
    }
}

/// The consumer's next message, pulled alone and without a byte bound (so as large as its stream
/// stored it: at most 64 MiB, NATS's own bound on `max_payload`).
async fn take_the_next_message(consumer: &PullConsumer) -> Result<Option<jetstream::Message>, String> {
    let mut one =
        consumer.fetch().max_messages(1).expires(Duration::from_secs(5)).messages().await.map_err(|e| e.to_string())?;
    match one.next().await {
        // As `pull::Inbox::next`: a consumer's message carries its stream subject; one on a
        // reply inbox was published there by someone (review 60f L3).
        Some(Ok(msg)) if super::is_inbox(&msg.subject) => {
            tracing::warn!(subject = %crate::event::cut(&msg.subject),
                "a message published onto a JetStream pull's inbox (not the consumer's): dropped unsettled");
            Ok(None)
        }
        Some(Ok(msg)) => Ok(Some(msg)),
        Some(Err(e)) => Err(e.to_string()),
        None => Ok(None),
    }
}

/// A message read from JetStream and held (kept alive until it is settled or dropped), not yet
/// read into its delivery: as it came over the wire ([`super::brought::Brought`]).
pub struct HeldMessage {
    message: async_nats::Message,
    acker: Box<JsAcker>,
    attempt: u32,
    /// A message that names no id is known by its place in the stream: the same on redelivery.
    fallback_id: Option<String>,
}

impl HeldMessage {
    /// Holds `msg` in `held` now; `watched` says how many times the consumer delivers it.
    fn of(
        msg: jetstream::Message,
        held: &Arc<Held>,
        plugin: &Arc<str>,
        watched: &Arc<super::watched::Watched>,
    ) -> Self {
        let info = msg.info().ok();
        let attempt = info.as_ref().map_or(1, |i| i.delivered.max(1) as u32);
        let fallback_id = info.as_ref().map(|i| format!("{}-{}", i.stream, i.stream_sequence));
        // The ack subject: `split` moves it into the acker, the keep-alive needs it too.
        let reply = msg.message.reply.clone();
        let (message, acker) = msg.split();
        let token = held.hold(reply);
        let acker = Box::new(JsAcker { acker, held: held.clone(), token, plugin: plugin.clone(), out: watched.out() });
        Self { message, acker, attempt, fallback_id }
    }

    /// The delivery of this message (an undecodable one carries its defect).
    pub fn delivery(self) -> Delivery {
        let Self { message, acker, attempt, fallback_id } = self;
        let max_deliveries = Some(acker.out.max_deliveries_cell());
        let subject = message.subject.to_string();
        let decoded = if message.unreadable {
            Err(UNREADABLE.to_string())
        } else {
            wire::event_of(&subject, message.headers.as_ref(), message.payload.clone(), fallback_id.clone())
        };
        match decoded {
            Ok(mut ev) => {
                // A request stored in the stream: its reply goes to the requester's inbox.
                ev.reply_to = wire::reply_inbox(message.headers.as_ref());
                Delivery { attempt, acker, redeliverable: true, max_deliveries, ..Delivery::once(Arc::new(ev)) }
            }
            Err(why) => {
                let raw = wire::undecodable(&subject, &message.payload, fallback_id);
                let defect = Some(crate::fate::DeliveryError::Undecodable(why));
                Delivery {
                    attempt,
                    acker,
                    redeliverable: true,
                    max_deliveries,
                    defect,
                    ..Delivery::once(Arc::new(raw))
                }
            }
        }
    }
}

/// Why a message the client could not read is dead-lettered unrun (and termed, never left to
/// come back every `ack_wait` until `max_deliver`).
const UNREADABLE: &str = "the NATS client could not read its subject or headers (not UTF-8, or a header line without \
    ':'): its subject is shown with U+FFFD for each byte that is not UTF-8, its headers are left out";

#[cfg(test)]
mod tests {
    use super::{Batch, ConsumerSpec, PullEnd, kept_max_deliver};

    #[test]
    fn a_consumer_made_again_never_lowers_its_max_deliver() {
        assert_eq!(kept_max_deliver(4, 8), 8);
        assert_eq!(kept_max_deliver(20, 8), 20, "another host's higher bound is kept");
        assert_eq!((kept_max_deliver(-1, 8), kept_max_deliver(0, 8)), (-1, 0), "no bound stays none");
    }
    use crate::backend::nats::budget::Room;
    use crate::transport::Durability;
    use std::time::Duration;

    fn consumer(stream: &str, filters: &[&str]) -> ConsumerSpec {
        ConsumerSpec {
            stream: stream.into(),
            name: "plugbus_p".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
            durability: Durability { deliver_all: false, give_up_after: 5, dead_letter: None },
            ack_wait: Duration::from_secs(30),
        }
    }

    /// A retarget's first step keeps the serving filters beside the new ones, once each, less
    /// those another covers (JetStream refuses such a pair).
    #[test]
    fn a_widened_consumer_keeps_both_versions_filters_once_each() {
        let serving = consumer("AA", &["a.old", "a.both"]);
        let wide = serving.widened(&consumer("AA", &["a.new", "a.both"])).expect("widened");
        assert_eq!(wide.filters, ["a.new", "a.both", "a.old"]);
        // Covered by a new filter: the new one alone takes both.
        assert!(consumer("AA", &["a.x"]).widened(&consumer("AA", &["a.*"])).is_none());
        // Nothing to add, another stream.
        assert!(serving.widened(&consumer("AA", &["a.old", "a.both", "a.new"])).is_none());
        assert!(serving.widened(&consumer("BB", &["a.new"])).is_none());
        // Partly overlapping filters: JetStream takes them together.
        let wide = consumer("AA", &["a.*.x"]).widened(&consumer("AA", &["a.b.*"])).expect("widened");
        assert_eq!(wide.filters, ["a.b.*", "a.*.x"]);
    }

    /// A pull asks for no more than the feed has room for (a message pulled and unread has no
    /// `in-progress`), and for one message when fewer bytes than its floor are free.
    #[test]
    fn a_pull_asks_only_for_the_room_there_is() {
        let b = Batch::new(1024, 64 << 20, 1 << 20);
        assert_eq!(
            b.within(Room { slots: 3, bytes: 64 << 20 }, 1 << 20),
            Batch { messages: 3, bytes: (64 << 20) - 3 * 2048 }
        );
        let bytes = (8 << 20) - 1000 * 2048;
        assert_eq!(b.within(Room { slots: 1024, bytes: 8 << 20 }, 1 << 20), Batch { messages: 1000, bytes });
        let floor = (2 << 20) + (64 << 10);
        assert_eq!(b.within(Room { slots: 1024, bytes: 1 << 20 }, 1 << 20), Batch { messages: 1, bytes: floor });
    }

    /// The server ends a pull at its bytes with `409 Batch Completed` (and a next message over
    /// them after some with `Message Size Exceeds MaxBytes`): the next pull follows, nothing is
    /// taken for a stuck consumer. Only a first message over the bytes may be one.
    #[test]
    fn a_pull_ended_at_its_bytes_is_done_not_stuck() {
        let status = |s: &str| format!("409, Some(\"{s}\")");
        assert_eq!(PullEnd::of(&status("Batch Completed"), 0), PullEnd::Done);
        assert_eq!(PullEnd::of(&status("Message Size Exceeds MaxBytes"), 3), PullEnd::Done);
        assert_eq!(PullEnd::of(&status("Message Size Exceeds MaxBytes"), 0), PullEnd::MaybeStuck);
        assert_eq!(PullEnd::of(&status("Leadership Change"), 0), PullEnd::Done);
        assert_eq!(PullEnd::of(&status("Consumer Deleted"), 0), PullEnd::Failed);
        assert_eq!(PullEnd::of("503, None", 0), PullEnd::Failed);
    }

    /// A pull is bounded in bytes by the feed's budget, yet always takes the largest message.
    #[test]
    fn a_pull_is_bounded_by_the_budget_but_always_fits_the_largest_message() {
        let b = Batch::new(1024, 64 << 20, 1 << 20);
        assert_eq!(b, Batch { messages: 1000, bytes: 64 << 20 });
        // A budget smaller than a message would stall the consumer: the pull takes two.
        let b = Batch::new(0, 1, 8 << 20);
        assert_eq!(b, Batch { messages: 1, bytes: (16 << 20) + (64 << 10) });
        assert_eq!(Batch::new(10, u64::MAX, usize::MAX).bytes, usize::MAX);
    }
}
