//! The router: which plugins are live, what each subscribes to, and each plugin's worker,
//! which takes deliveries off the plugin's queue and runs them: concurrently (bounded), or in
//! ordering lanes when a subscription asks for order per key.
//!
//! Invariant: the router never runs wasm itself and never lets one plugin block another: each
//! plugin has its own queue, worker, lanes and bounds.

use crate::deadletter::DeadLetters;
use crate::dispatch::{self, Outcome, PluginRuntime, PluginStats, RetryIn, RunPermits, Serving};
use crate::event::Event;
use crate::manifest::OrderKey;
use crate::metrics::{Metrics, PluginLabels, PluginMetrics};
use crate::retry::RetryPolicy;
use crate::sandbox::Plugin;
use crate::subject::Pattern;
use crate::transport::{Delivery, Durability, Subscription, SubscriptionSpec, Transport, TransportError};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

/// How deliveries for one plugin are queued and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Flow {
    /// Handlers running at once in the sandbox (kv commits and output publishes wait outside it).
    pub concurrency: usize,
    /// Deliveries taken but not settled (backing off, running) before the transport is paused
    /// for this plugin. An ordering key's lane takes one, whatever waits in it behind its
    /// running delivery: up to [`LANE_WAITING_PER_QUEUE`] times as many wait in the plugin's
    /// lanes apart (a request waiting there keeps a slot of its own), so one key whose event
    /// runs long or backs off holds up the other keys only once that many of its events wait
    /// behind it, or `buffer_mib` of bytes.
    pub queue: usize,
    /// MiB of handlers' outputs (its own included) that may wait for this plugin beyond a full
    /// queue on the embedded bus. Outputs never wait for a queue (a cycle through the bus would
    /// wait forever); past this bound an output is refused and retried by its producer. On
    /// either bus, also the most the plugin's deliveries may hold in the host (queued, running,
    /// waiting to settle; one larger than it alone): what has no room waits behind the queue on
    /// the embedded bus (`Overflow::room_in_hand`), in the stream or the pump on NATS
    /// (`backend/nats/budget.rs`).
    pub buffer_mib: u64,
    /// MiB of producers' events that may wait in the durable embedded log for this plugin once
    /// it falls behind (its queue full): its producers, and so every other plugin, go on until
    /// then, and only then wait. 0: producers wait for its queue (backpressure at once). Never
    /// below `buffer_mib`, the bound while it catches up after a restart or a replay. It grows
    /// only while the disk under the log keeps its reserve free (`backend/embedded/disk.rs`).
    /// NATS ignores it (the stream's own limits bound what waits there).
    pub backlog_mib: u64,
}

impl Default for Flow {
    fn default() -> Self {
        Self { concurrency: 16, queue: 1024, buffer_mib: 64, backlog_mib: 1024 }
    }
}

/// Per-plugin delivery settings the router applies.
#[derive(Debug, Clone)]
pub struct Delivering {
    /// Queue and concurrency.
    pub flow: Flow,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Dead-letter subject.
    pub dead_letter_subject: String,
    /// Operator override of durability: `Some(true)` makes every subscription of the plugin
    /// durable, `Some(false)` none; `None` follows the manifest.
    pub durable: Option<bool>,
    /// Operator override of where a new durable consumer starts (`Some(true)`: the stream's start).
    pub deliver_all: Option<bool>,
}

impl Delivering {
    /// What to ask the transport for `plugin`: its patterns, queue group and durability. A
    /// plugin is durable as a whole when any of its subscriptions asks (or the operator says so),
    /// so an event matching two of its patterns is never delivered twice by two mechanisms.
    ///
    /// The queue group (and so the JetStream durable name) is the one bound at load from the
    /// plugin's identity ([`Manifest::bind`](crate::manifest::Manifest::bind): the operator's,
    /// or the manifest's own under `plugbus.<plugin>`), never a subscription's raw claim: a
    /// plugin declaring `plugbus.payments` never joins payments' group.
    pub fn subscription(&self, plugin: &Plugin) -> SubscriptionSpec {
        let m = plugin.manifest();
        let name = plugin.name().to_string();
        let queue_group = m.queue_group.clone().unwrap_or_else(|| format!("plugbus.{name}"));
        let durable = self.durable.unwrap_or_else(|| m.subscriptions.iter().any(|s| s.durable));
        SubscriptionSpec {
            plugin: name,
            patterns: m.patterns(),
            group: queue_group,
            capacity: self.flow.queue,
            buffer_bytes: self.flow.buffer_mib.saturating_mul(1 << 20),
            backlog_bytes: self.flow.backlog_mib.saturating_mul(1 << 20),
            durable: durable.then(|| Durability {
                deliver_all: self.deliver_all.unwrap_or_else(|| m.subscriptions.iter().any(|s| s.deliver_all)),
                give_up_after: self.retry.transport_deliveries(),
                dead_letter: Some(self.dead_letter_subject.clone()),
            }),
        }
    }
}

/// A live plugin.
///
/// Dropping it unsubscribes; the worker then drains what is already queued and exits, so a
/// removed plugin finishes the events it had accepted, but for a delivery held until the broker
/// takes its output and the later events of its key, left to come again when they may
/// ([`PluginRuntime::leave`]).
struct Entry {
    runtime: Arc<PluginRuntime>,
    delivering: Delivering,
    spec: SubscriptionSpec,
    subscription_id: u64,
    queue_depth: Box<dyn Fn() -> usize + Send + Sync>,
    subscribed: Option<Box<dyn Send + Sync>>,
    worker: JoinHandle<()>,
}

/// How a swap went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swapped {
    /// The version that served before.
    pub old_version: String,
    /// Its content hash.
    pub old_hash: String,
    /// Whether the subscription patterns changed (and were re-targeted).
    pub resubscribed: bool,
}

/// What `/v1/plugins` shows for one plugin.
#[derive(Debug, Clone, Serialize)]
pub struct PluginInfo {
    /// Name.
    pub name: String,
    /// Version from the manifest.
    pub version: String,
    /// Content hash of the component.
    pub hash: String,
    /// `serving <version>`.
    pub state: String,
    /// Subscription patterns.
    pub subscriptions: Vec<String>,
    /// Allowed publish patterns.
    pub publishes: Vec<String>,
    /// Effective limits.
    pub limits: crate::sandbox::Limits,
    /// The bytes of its compiled code held in memory (counted in `sandbox.max_code_mib`).
    pub code_bytes: u64,
    /// Where its dead letters go.
    pub dead_letter_subject: String,
    /// Counters: received, ok, retried, circuit_waits, dead_lettered, expired, attempts, in_flight, peak_in_flight,
    /// pending, queued, outputs, outputs_dead_lettered, replays_let_go, host_failures, held (deliveries held now).
    pub counters: BTreeMap<&'static str, u64>,
    /// Outbound HTTP (requested, granted, breakers), when it asks for or is granted any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbound: Option<crate::sandbox::outbound::OutboundInfo>,
}

/// What a drain left behind.
#[derive(Debug, Clone, Default, Serialize)]
pub struct DrainReport {
    /// Plugin → ids of deliveries not settled when the drain timed out.
    pub unfinished: BTreeMap<String, Vec<String>>,
    /// Plugin → deliveries still waiting in its queue.
    pub queued: BTreeMap<String, usize>,
    /// Plugin → deliveries handled since start.
    pub handled: BTreeMap<String, u64>,
}

impl DrainReport {
    /// Whether everything finished.
    pub fn is_clean(&self) -> bool {
        self.unfinished.values().all(Vec::is_empty) && self.queued.values().all(|n| *n == 0)
    }
}

/// The set of live plugins.
pub struct Router {
    transport: Arc<dyn Transport>,
    metrics: Arc<Metrics>,
    dead_letters: Arc<DeadLetters>,
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl Router {
    /// A router with no plugins.
    pub fn new(transport: Arc<dyn Transport>, dead_letters: Arc<DeadLetters>, metrics: Arc<Metrics>) -> Self {
        Self { transport, metrics, dead_letters, entries: Mutex::new(BTreeMap::new()) }
    }

    /// The metrics its plugins count in (what `/metrics` serves).
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Updates the gauges read at scrape time.
    pub fn refresh_gauges(&self) {
        let entries = self.entries.lock().expect("router poisoned");
        self.metrics.plugins.set(entries.len() as i64);
        for (name, e) in entries.iter() {
            let labels = PluginLabels { plugin: name.clone() };
            self.metrics.in_flight.get_or_create(&labels).set(e.runtime.run_permits.in_flight() as i64);
            self.metrics.queue_depth.get_or_create(&labels).set((e.queue_depth)() as i64);
            for b in e.runtime.plugin().outbound().breakers.views() {
                let labels = crate::metrics::BreakerLabels { plugin: name.clone(), host: b.host };
                self.metrics.breaker_open.get_or_create(&labels).set(i64::from(b.state != "closed"));
                self.metrics.breaker_opened.get_or_create(&labels).set(b.opened as i64);
            }
        }
    }

    /// Makes `plugin` live: subscribes it and starts its worker.
    pub async fn install(&self, plugin: Plugin, delivering: Delivering) -> Result<(), TransportError> {
        let name = plugin.name().to_string();
        let spec = delivering.subscription(&plugin);
        let mut subscription = self.transport.subscribe(spec.clone()).await?;
        let runtime = Arc::new(PluginRuntime {
            name: name.clone(),
            current: Serving::new(plugin),
            stats: PluginStats::default(),
            retry: delivering.retry.clone(),
            dead_letter_subject: delivering.dead_letter_subject.clone(),
            transport: self.transport.clone(),
            dead_letters: self.dead_letters.clone(),
            run_permits: RunPermits::new(delivering.flow.concurrency),
            republishing: dispatch::republish_room(delivering.flow.buffer_mib),
            metrics: PluginMetrics::new(self.metrics.clone(), &name, &spec.patterns),
            leaving: tokio::sync::watch::Sender::new(false),
        });
        let queue_depth = subscription.depth_probe();
        let subscription_id = subscription.id;
        let subscribed = subscription.take_guard();
        let worker = tokio::spawn(run_worker(runtime.clone(), subscription, delivering.flow));
        tracing::info!(plugin = %name, "plugin serving");
        let entry =
            Entry { runtime, delivering, spec, subscription_id, queue_depth, subscribed: Some(subscribed), worker };
        self.entries.lock().expect("router poisoned").insert(name, entry);
        Ok(())
    }

    /// Whether a plugin of this name is live.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.lock().expect("router poisoned").contains_key(name)
    }

    /// Whether the live plugin `name` subscribes to `subject` now; `None` when it is not loaded.
    pub fn subscribes(&self, name: &str, subject: &str) -> Option<bool> {
        let entries = self.entries.lock().expect("router poisoned");
        let patterns = &entries.get(name)?.spec.patterns;
        Some(crate::subject::PatternSet::parse(patterns).is_ok_and(|set| set.matches(subject)))
    }

    /// Replaces the version of a live plugin atomically: deliveries in flight finish on the
    /// old version, every later one (and every later retry) runs on the new. If the
    /// subscriptions changed, the transport re-targets them in place (no gap, no duplicate),
    /// after the new version serves: an event of a pattern only the new version has, delivered
    /// while the transport changes (seconds on JetStream), runs on the version that asked for
    /// it, in its key order (review 61b F3: it ran on the old one); one of a pattern only the old
    /// had runs on the new, as one queued across the swap does. A refused retarget puts the old
    /// version back.
    pub async fn swap(&self, plugin: Plugin) -> Result<Swapped, TransportError> {
        let name = plugin.name().to_string();
        let (runtime, old_spec, new_spec, subscription_id) = {
            let entries = self.entries.lock().expect("router poisoned");
            let e = entries.get(&name).ok_or_else(|| TransportError::Closed(format!("plugin {name} is not live")))?;
            (e.runtime.clone(), e.spec.clone(), e.delivering.subscription(&plugin), e.subscription_id)
        };
        let resubscribed = (&old_spec.patterns, &old_spec.group, &old_spec.durable)
            != (&new_spec.patterns, &new_spec.group, &new_spec.durable);
        let old = runtime.current.swap(plugin);
        if resubscribed && let Err(refused) = self.transport.retarget(subscription_id, &new_spec).await {
            runtime.current.serve(old);
            return Err(refused);
        }
        runtime.metrics.set_subscriptions(&new_spec.patterns);
        if let Some(e) = self.entries.lock().expect("router poisoned").get_mut(&name) {
            e.spec = new_spec;
        }
        Ok(Swapped { old_version: old.manifest().version.clone(), old_hash: old.hash().to_string(), resubscribed })
    }

    /// Takes a plugin out: unsubscribes it; what it already took still finishes, but a delivery
    /// held until the broker takes its output is left to the broker to deliver again, when it
    /// may ([`PluginRuntime::leave`]). (On the durable
    /// embedded bus, what waits in the log for its read-back waits for its next subscription:
    /// a reinstall, or the next start. A reinstall reads it once what this one took is done.)
    pub fn remove(&self, name: &str) -> bool {
        let removed = self.entries.lock().expect("router poisoned").remove(name);
        if let Some(e) = &removed {
            e.runtime.leave();
            let breakers = e.runtime.plugin().outbound().breakers.views().into_iter().map(|b| b.host);
            self.metrics.forget_gauges(name, breakers);
            tracing::info!(plugin = %name, "plugin removed: unsubscribed");
        }
        removed.is_some()
    }

    /// The version of `name` serving now.
    pub fn current(&self, name: &str) -> Option<Arc<Plugin>> {
        self.entries.lock().expect("router poisoned").get(name).map(|e| e.runtime.plugin())
    }

    /// The content hash of the version serving now.
    pub fn current_hash(&self, name: &str) -> Option<String> {
        self.entries.lock().expect("router poisoned").get(name).map(|e| e.runtime.plugin().hash().to_string())
    }

    /// Takes every plugin out and waits for their workers to end (after a drain: a delivery
    /// still held until the broker takes its output is left to the broker then,
    /// [`PluginRuntime::leave`]).
    pub async fn close(&self) {
        let entries = std::mem::take(&mut *self.entries.lock().expect("router poisoned"));
        for entry in entries.values() {
            entry.runtime.leave();
        }
        for (_, entry) in entries {
            let Entry { subscribed, worker, .. } = entry;
            drop(subscribed);
            let _ = tokio::time::timeout(Duration::from_secs(5), worker).await;
        }
    }

    /// Unsubscribes every plugin but keeps its worker: what was taken still runs (a stop on a
    /// broker, before the drain).
    pub fn stop_intake(&self) {
        let mut entries = self.entries.lock().expect("router poisoned");
        for e in entries.values_mut() {
            e.subscribed.take();
        }
    }

    /// Names of the live plugins.
    pub fn names(&self) -> Vec<String> {
        self.entries.lock().expect("router poisoned").keys().cloned().collect()
    }

    /// Descriptions of the live plugins.
    pub fn plugins(&self) -> Vec<PluginInfo> {
        let entries = self.entries.lock().expect("router poisoned");
        entries
            .iter()
            .map(|(name, e)| {
                let p = e.runtime.plugin();
                let s = &e.runtime.stats;
                PluginInfo {
                    name: name.clone(),
                    version: p.manifest().version.clone(),
                    hash: p.hash().to_string(),
                    state: format!("serving {}", p.manifest().version),
                    subscriptions: p.manifest().patterns(),
                    publishes: p.manifest().publishes.clone(),
                    limits: p.limits().clone(),
                    code_bytes: p.code_bytes(),
                    dead_letter_subject: e.runtime.dead_letter_subject.clone(),
                    outbound: p.outbound().info(),
                    counters: BTreeMap::from([
                        ("received", s.total(|c| &c.received)),
                        ("ok", s.total(|c| &c.ok)),
                        ("retried", s.total(|c| &c.retried)),
                        ("circuit_waits", s.total(|c| &c.circuit_waits)),
                        ("dead_lettered", s.total(|c| &c.dead_lettered)),
                        ("expired", s.total(|c| &c.expired)),
                        ("attempts", s.total(|c| &c.attempts)),
                        ("in_flight", e.runtime.run_permits.in_flight()),
                        ("peak_in_flight", e.runtime.run_permits.peak()),
                        ("pending", s.pending()),
                        ("queued", (e.queue_depth)() as u64),
                        ("outputs", s.total(|c| &c.outputs)),
                        ("outputs_dead_lettered", s.total(|c| &c.outputs_dead_lettered)),
                        ("replays_let_go", s.total(|c| &c.replays_let_go)),
                        ("host_failures", s.total(|c| &c.host_failures)),
                        ("held", e.runtime.metrics.held()),
                    ]),
                }
            })
            .collect()
    }

    /// Each live plugin's last minute (`GET /v1/stats`).
    pub fn windows(&self) -> BTreeMap<String, crate::window::Summary> {
        let entries = self.entries.lock().expect("router poisoned");
        entries.iter().map(|(name, e)| (name.clone(), e.runtime.stats.window.summary())).collect()
    }

    /// Whether no plugin has anything queued or pending.
    pub fn is_idle(&self) -> bool {
        let entries = self.entries.lock().expect("router poisoned");
        entries.values().all(|e| e.runtime.stats.pending() == 0 && (e.queue_depth)() == 0)
    }

    /// Waits until every queued and pending delivery has settled (outputs included: on the
    /// embedded bus they are deliveries too), or `timeout` passes; reports what was left.
    /// The caller stops intake first.
    pub async fn drain(&self, timeout: Duration) -> DrainReport {
        let deadline = crate::sandbox::limits::tokio_instant_in(timeout);
        while !self.is_idle() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let entries = self.entries.lock().expect("router poisoned");
        let mut report = DrainReport::default();
        for (name, e) in entries.iter() {
            let ids = e.runtime.stats.pending_ids();
            let queued = (e.queue_depth)();
            if !ids.is_empty() || queued > 0 {
                // The first ids name what was left; a plugin may hold thousands (`4 × flow.queue`).
                let shown = &ids[..ids.len().min(DRAIN_IDS_LOGGED)];
                tracing::warn!(plugin = %name, unfinished = ids.len(), queued, ids = ?shown,
                    "drain timed out: these events were not handled (the first {} ids)", shown.len());
            }
            report.unfinished.insert(name.clone(), ids);
            report.queued.insert(name.clone(), queued);
            report.handled.insert(name.clone(), e.runtime.stats.total(|c| &c.ok));
        }
        report
    }
}

/// How many ids of what a plugin left unfinished a drain's warning names.
const DRAIN_IDS_LOGGED: usize = 32;

/// Where an event goes inside one plugin: which subscriptions order by which key.
struct OrderRule {
    pattern: Pattern,
    key: Option<OrderKey>,
}

/// The plugin's subscriptions in order, each with its key; none when no subscription orders
/// (most plugins: then no event's subject is matched again here).
fn order_rules(plugin: &Plugin) -> Vec<OrderRule> {
    let subscriptions = &plugin.manifest().subscriptions;
    if subscriptions.iter().all(|s| s.order_by.is_none()) {
        return Vec::new();
    }
    subscriptions
        .iter()
        .filter_map(|s| Pattern::parse(&s.pattern).ok().map(|pattern| OrderRule { pattern, key: s.order_by.clone() }))
        .collect()
}

/// The ordering key of `event`: from the first matching subscription that orders. `None`
/// (no ordering, or the header is missing) means the event runs unordered.
fn ordering_key(rules: &[OrderRule], event: &Event) -> Option<String> {
    let rule = rules.iter().find(|r| r.pattern.matches(&event.subject))?;
    match rule.key.as_ref()? {
        OrderKey::Header(h) => event.header(h).map(str::to_owned),
        OrderKey::SubjectToken(i) => event.subject.split('.').nth(*i as usize).map(str::to_owned),
    }
}

/// How many deliveries may wait in a plugin's ordering lanes behind their keys' running ones,
/// per slot of `flow.queue`. So a plugin holds at most 4 × `flow.queue` deliveries (its
/// transport queue, those admitted, those in lanes): on JetStream, four hosts of a plugin at the
/// default `flow.queue` stay under its consumer's `max_ack_pending` (20,000), and the in-progress
/// acks for what they hold stay in proportion.
pub const LANE_WAITING_PER_QUEUE: usize = 2;

/// A delivery in an ordering lane, with its ticket of the plugin's stats and what it holds
/// while it waits there: a permit of the plugin's lanes' own bound (`LANE_WAITING_PER_QUEUE`
/// × `flow.queue`), or for a request, its admission permit.
type LaneItem = (Delivery, usize, OwnedSemaphorePermit);

/// Keys being worked on, with the deliveries waiting behind the one running. A lane holds one
/// admission permit, that of the delivery that opened it, until it closes: what waits behind
/// its key's running delivery holds no slot of `flow.queue`, so one key whose event runs long
/// or backs off (a poison event, a hot key) does not take the slots every other key needs.
/// What waits is bounded apart: in count by the lanes' own permits, in bytes with every
/// delivery the plugin holds (`flow.buffer_mib`). A request may pass that bound in bytes (a
/// plugin's own, or another plugin's up to twice it: see the embedded bus's `room_for`): it
/// keeps its admission permit.
#[derive(Default)]
struct Lanes {
    waiting: Mutex<HashMap<String, VecDeque<LaneItem>>>,
    /// Keys one of whose deliveries was left unsettled ([`Outcome::Left`]): the plugin is
    /// leaving this host, and the key's later deliveries are left too rather than overtake it.
    left: Mutex<HashSet<String>>,
}

impl Lanes {
    /// Queues the item behind its key; returns it back if the lane was idle (caller runs it).
    fn enqueue(&self, key: &str, item: LaneItem) -> Option<LaneItem> {
        let mut lanes = self.waiting.lock().expect("lanes poisoned");
        match lanes.get_mut(key) {
            Some(waiting) => {
                waiting.push_back(item);
                None
            }
            None => {
                lanes.insert(key.to_string(), VecDeque::new());
                Some(item)
            }
        }
    }

    /// Whether `key`'s lane is open (a delivery of the key is running or backing off).
    fn is_open(&self, key: &str) -> bool {
        self.waiting.lock().expect("lanes poisoned").contains_key(key)
    }

    /// Marks `key` as left ([`Lanes::left`]).
    fn leave(&self, key: &str) {
        self.left.lock().expect("lanes poisoned").insert(key.to_string());
    }

    /// Whether a delivery of `key` was left unsettled.
    fn was_left(&self, key: &str) -> bool {
        self.left.lock().expect("lanes poisoned").contains(key)
    }

    /// The next item of the lane, or `None` (and the lane closes).
    fn next(&self, key: &str) -> Option<LaneItem> {
        let mut lanes = self.waiting.lock().expect("lanes poisoned");
        let next = lanes.get_mut(key).and_then(VecDeque::pop_front);
        if next.is_none() {
            lanes.remove(key);
        }
        next
    }
}

async fn run_worker(rt: Arc<PluginRuntime>, mut subscription: Subscription, flow: Flow) {
    let capacity = flow.queue.max(1);
    let admission = Arc::new(Semaphore::new(capacity));
    let lanes = Arc::new(Lanes::default());
    let lanes_room = Arc::new(Semaphore::new(capacity.saturating_mul(LANE_WAITING_PER_QUEUE)));
    // The order rules of the version serving, with its swap count when they were read.
    let mut rules_for: Option<(u64, Vec<OrderRule>)> = None;
    loop {
        // Taking a delivery needs room: a plugin with `queue` deliveries unsettled stops
        // taking more, its transport queue fills, and the transport pauses (backpressure).
        let Ok(admit) = admission.clone().acquire_owned().await else { break };
        let Some(delivery) = subscription.deliveries.recv().await else { break };
        let ticket = rt.stats.admit(&delivery.event);
        let swaps = rt.current.swaps();
        let rules = match &rules_for {
            Some((seen, rules)) if *seen == swaps => rules,
            // `swaps` is bumped after the swap: rules read after a swap but kept under the
            // count before it are read again at the next delivery.
            _ => &rules_for.insert((swaps, order_rules(&rt.plugin()))).1,
        };
        match ordering_key(rules, &delivery.event) {
            None => {
                let rt = rt.clone();
                tokio::spawn(async move {
                    // Boxed: the delivery's future is large, and unboxed it would be moved
                    // through each of spawn's layers (measured: ~4% of nats-core's throughput).
                    Box::pin(dispatch::deliver_caught(&rt, delivery, RetryIn::Transport)).await;
                    rt.stats.settle(ticket);
                    // The plugin (and its kv handle) is let go before the permit: once the
                    // worker holds every permit, no task holds anything of the plugin.
                    drop(rt);
                    drop(admit);
                });
            }
            Some(key) => {
                // Behind its key's running delivery, it waits with a permit of the lanes' own
                // bound and `admit` goes back (the worker waits for one, holding `admit`, when
                // they are all taken); a request keeps `admit`. (Only the worker opens a lane:
                // one found open may close meanwhile, and this one then opens it again.)
                let (permit, admit) = if lanes.is_open(&key) && delivery.event.reply_to.is_none() {
                    let Ok(room) = lanes_room.clone().acquire_owned().await else { break };
                    (room, Some(admit))
                } else {
                    (admit, None)
                };
                if let Some((delivery, ticket, permit)) = lanes.enqueue(&key, (delivery, ticket, permit)) {
                    // It opens the lane, which holds an admission permit until it closes.
                    let lane_permit = admit.unwrap_or(permit);
                    tokio::spawn(run_lane(rt.clone(), lanes.clone(), key, (delivery, ticket), lane_permit));
                }
            }
        }
    }
    // Every delivery and lane task holds a permit until it is done with the plugin: holding
    // them all means none is left, so a closed router holds nothing of the plugin.
    let _all = admission.acquire_many(capacity as u32).await;
}

/// Runs one key's deliveries strictly one after another, retries included, holding the
/// permit of the delivery that opened the lane until it closes.
async fn run_lane(
    rt: Arc<PluginRuntime>,
    lanes: Arc<Lanes>,
    key: String,
    (delivery, ticket): (Delivery, usize),
    admit: OwnedSemaphorePermit,
) {
    let mut item = Some((delivery, ticket, None));
    while let Some((delivery, ticket, waited_with)) = item.take() {
        if lanes.was_left(&key) && dispatch::may_come_again(&rt, &delivery).await {
            // Run now, it would overtake its key's event left unsettled: left too, the
            // transport delivers both again. (At its last delivery it runs: left, it would be lost.)
            dispatch::leave_behind_its_key(&rt, delivery);
        } else if let Some(Outcome::Left { .. }) = dispatch::deliver_caught(&rt, delivery, RetryIn::Host).await {
            lanes.leave(&key);
        }
        // (A delivery that panicked (`None`) is unsettled too, but its key is not marked left:
        // that holds every later event of the key on this host until its last delivery, for as
        // long as the plugin serves. Its later events go on; it comes again where the transport
        // keeps it, after them.)
        // (Retries waited in `deliver`, holding the lane: the key's later events must not overtake.)
        rt.stats.settle(ticket);
        // (What it waited with goes back once it is done: the lanes' bound counts it until then.)
        drop(waited_with);
        item = lanes.next(&key).map(|(delivery, ticket, permit)| (delivery, ticket, Some(permit)));
    }
    // The lane is closed: let go of the plugin before the permit.
    drop(rt);
    drop(admit);
}
