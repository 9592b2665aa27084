//! Metrics a user can scrape: the one place that names them. `/metrics` serves them in the
//! Prometheus text format.
//!
//! Counters are per plugin and subscription (the pattern that matched, as the manifest wrote it),
//! never per concrete subject: subjects carry ids (`orders.<id>.created`), so a label taken from
//! traffic would grow the host and `/metrics` with every new id. Every label value here comes from
//! configuration (plugin names, manifest patterns, file names). Gauges (in flight, queue depth,
//! cache, live tails) are read or set outside the hot path, which only bumps counters.

use crate::shards::{ShardedCounter, ShardedHistogram};
use crate::subject::Pattern;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::exponential_buckets;
/// The Prometheus registry the host's metrics are in (what [`crate::transport::Transport::register_metrics`] adds to).
pub use prometheus_client::registry::Registry;
use std::sync::{Arc, Mutex, RwLock};

/// Labels of per-event counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// The plugin.
    pub plugin: String,
    /// The subscription pattern that matched the event (first in manifest order), or
    /// [`UNSUBSCRIBED`] for an event no current pattern matches (queued before a hot reload
    /// changed the patterns).
    pub subscription: String,
}

/// The `subscription` label of an event that no current pattern of its plugin matches.
pub const UNSUBSCRIBED: &str = "(none)";

/// Labels of per-plugin metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// The plugin.
    pub plugin: String,
}

/// Labels of per-destination outbound metrics (the host is one the operator granted).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BreakerLabels {
    /// The plugin.
    pub plugin: String,
    /// The destination host.
    pub host: String,
}

/// Labels of per-file metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabels {
    /// The file in the plugins folder.
    pub file: String,
}

/// The most files `plugbus_load_errors_total` names (see [`Metrics::load_error`]).
pub const LOAD_ERROR_FILES: usize = 1_000;
/// The `file` label of the load errors of files past [`LOAD_ERROR_FILES`].
pub const OTHER_FILES: &str = "(others)";

/// Every metric of the host.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Outbound circuit breakers: 1 open or half-open, 0 closed.
    pub breaker_open: Family<BreakerLabels, Gauge>,
    /// How many times each outbound circuit breaker opened.
    pub breaker_opened: Family<BreakerLabels, Gauge>,
    /// Deliveries received.
    pub received: Family<EventLabels, ShardedCounter>,
    /// Deliveries handled (Ok, outputs released).
    pub handled: Family<EventLabels, ShardedCounter>,
    /// Failed attempts that were retried.
    pub retried: Family<EventLabels, ShardedCounter>,
    /// Deliveries dead-lettered.
    pub dead_lettered: Family<EventLabels, ShardedCounter>,
    /// Handler duration per attempt (instantiation included).
    pub handler_seconds: Family<PluginLabels, ShardedHistogram>,
    /// Attempts running now.
    pub in_flight: Family<PluginLabels, Gauge>,
    /// Deliveries waiting in the plugin's queue.
    pub queue_depth: Family<PluginLabels, Gauge>,
    /// Versions swapped in, added or removed.
    pub reloads: Family<PluginLabels, Counter>,
    /// Files that could not be loaded: the first [`LOAD_ERROR_FILES`] by name, the rest
    /// under [`OTHER_FILES`].
    pub load_errors: Family<FileLabels, Counter>,
    /// The files `load_errors` has a series of.
    load_error_files: Mutex<std::collections::HashSet<String>>,
    /// Components compiled (cache misses included).
    pub compiled: Gauge,
    /// Components read from the compile cache.
    pub cache_hits: Gauge,
    /// Plugins serving.
    pub plugins: Gauge,
    /// Bytes of compiled code every loaded plugin version holds (`sandbox.max_code_mib`).
    pub compiled_code_bytes: Gauge,
    /// Live tails (`GET /v1/events/{pattern}`) open now.
    pub tails_open: Gauge,
    /// Tails refused because `api.max_tails` were open.
    pub tails_refused: Counter,
    /// Events a live tail dropped: its client did not keep up (its buffer was full), or a burst
    /// passed the queue its transport fills.
    pub tail_events_dropped: Counter,
    /// Ingress publishes answered `503` because the bus did not take the event within
    /// `api.publish_timeout`.
    pub ingress_timeouts: Counter,
    /// Requests refused as coming from a web page (`Origin`, `Sec-Fetch-Site`) or through a
    /// foreign `Host` name (DNS rebinding).
    pub browser_refused: Counter,
    /// Replies a plugin gave that found no request waiting (timed out, or answered already).
    pub replies_dropped: Family<PluginLabels, Counter>,
    /// Requests settled without running because their requester stopped waiting.
    pub requests_expired: Family<PluginLabels, Counter>,
    /// Outputs the transport did not take after every try, dead-lettered by themselves (their
    /// input was handled: it is not counted in `dead_lettered`).
    pub outputs_dead_lettered: Family<PluginLabels, Counter>,
    /// Replays of another plugin's dead letter a plugin let go unrun.
    pub replays_let_go: Family<PluginLabels, Counter>,
    /// Failed attempts of a plugin that the host failed, not the handler.
    pub host_failures: Family<PluginLabels, Counter>,
    /// Deliveries held now: an output and its dead letter both refused by the transport, or, at an
    /// event's last delivery, its own dead letter refused ([`PluginMetrics::holding`]).
    pub deliveries_held: Family<PluginLabels, Gauge>,
    /// Held deliveries (and the later events of their key) left unsettled as their plugin left.
    pub deliveries_left: Family<PluginLabels, Counter>,
    /// Taken to count a hold in `deliveries_held` and to take a series out of it: a hold counted
    /// as its plugin is removed is never counted in a series taken out.
    held_series: Mutex<()>,
    /// `POST /v1/request/{subject}` answered `504`: no reply within its timeout.
    pub api_request_timeouts: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("plugbus");
        let m = Self {
            registry: Mutex::new(Registry::default()),
            received: Family::default(),
            handled: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            handler_seconds: Family::new_with_constructor(|| {
                ShardedHistogram::new(exponential_buckets(0.000_01, 2.5, 16))
            }),
            in_flight: Family::default(),
            queue_depth: Family::default(),
            reloads: Family::default(),
            load_errors: Family::default(),
            load_error_files: Mutex::default(),
            breaker_open: Family::default(),
            breaker_opened: Family::default(),
            compiled: Gauge::default(),
            cache_hits: Gauge::default(),
            plugins: Gauge::default(),
            compiled_code_bytes: Gauge::default(),
            tails_open: Gauge::default(),
            tails_refused: Counter::default(),
            tail_events_dropped: Counter::default(),
            ingress_timeouts: Counter::default(),
            browser_refused: Counter::default(),
            replies_dropped: Family::default(),
            requests_expired: Family::default(),
            outputs_dead_lettered: Family::default(),
            host_failures: Family::default(),
            replays_let_go: Family::default(),
            deliveries_held: Family::default(),
            deliveries_left: Family::default(),
            held_series: Mutex::default(),
            api_request_timeouts: Counter::default(),
        };
        r.register("events_received", "Events delivered to a plugin", m.received.clone());
        r.register("events_handled", "Events a plugin handled successfully", m.handled.clone());
        r.register("events_retried", "Failed attempts that were retried", m.retried.clone());
        r.register("events_dead_lettered", "Events sent to the dead-letter subject", m.dead_lettered.clone());
        r.register(
            "handler_duration_seconds",
            "Handler attempt duration, instantiation included",
            m.handler_seconds.clone(),
        );
        r.register("in_flight", "Handler attempts running now", m.in_flight.clone());
        r.register("queue_depth", "Events waiting in a plugin's queue", m.queue_depth.clone());
        r.register("reloads", "Plugin versions added, swapped in or removed", m.reloads.clone());
        r.register(
            "outbound_breaker_open",
            "Outbound circuit breakers per plugin and host: 1 open or half-open, 0 closed",
            m.breaker_open.clone(),
        );
        r.register(
            "outbound_breaker_opened",
            "Times an outbound circuit breaker opened, per plugin and host",
            m.breaker_opened.clone(),
        );
        r.register("load_errors", "Plugin files that could not be loaded", m.load_errors.clone());
        r.register("components_compiled", "Components compiled since start", m.compiled.clone());
        r.register("compile_cache_hits", "Components read from the compile cache since start", m.cache_hits.clone());
        r.register("plugins", "Plugins serving", m.plugins.clone());
        r.register(
            "compiled_code_bytes",
            "Compiled code every loaded plugin version holds in memory, against sandbox.max_code_mib",
            m.compiled_code_bytes.clone(),
        );
        r.register("tails_open", "Live tails (SSE) open now", m.tails_open.clone());
        r.register("tails_refused", "Live tails refused because api.max_tails were open", m.tails_refused.clone());
        r.register(
            "tail_events_dropped",
            "Events a live tail dropped: its client did not keep up (api.tail_buffer_bytes), or a burst passed its queue of 1,024",
            m.tail_events_dropped.clone(),
        );
        r.register(
            "ingress_timeouts",
            "HTTP events answered 503 because the bus did not take them within api.publish_timeout",
            m.ingress_timeouts.clone(),
        );
        r.register(
            "api_browser_refused",
            "API requests refused as coming from a web page or through a foreign Host name",
            m.browser_refused.clone(),
        );
        r.register(
            "replies_dropped",
            "Replies a plugin gave that found no request waiting (it timed out, or another reply came first)",
            m.replies_dropped.clone(),
        );
        r.register(
            "requests_expired",
            "Requests a plugin got and did not run: their requester had stopped waiting (timed out)",
            m.requests_expired.clone(),
        );
        r.register(
            "outputs_dead_lettered",
            "Outputs of a plugin the bus did not take after every try, dead-lettered by themselves (the event \
             that made them was handled)",
            m.outputs_dead_lettered.clone(),
        );
        r.register(
            "replays_let_go",
            "Replays of another plugin's dead letter a plugin got and let go unrun (a replay runs only in the plugin \
             that failed it; the embedded bus publishes it to no other)",
            m.replays_let_go.clone(),
        );
        r.register(
            "host_failures",
            "Attempts of a plugin that failed because of the host, not the handler: the kv store did not commit the \
             attempt's writes, the instance pool plugins share stayed full, a host call did not answer within the \
             deadline, or a host function panicked (also counted as retried or dead-lettered; outputs the bus did not \
             take are counted in outputs_dead_lettered)",
            m.host_failures.clone(),
        );
        r.register(
            "deliveries_held",
            "Deliveries of a plugin held now: an output and its dead letter were both refused by the broker; the \
             event is kept alive, not acked, and both are tried again until one is taken",
            m.deliveries_held.clone(),
        );
        r.register(
            "deliveries_left",
            "Held deliveries left unsettled because their plugin left this host (removed, or a stop's drain passed), \
             with the later events of their key: the broker delivers them again, as after a crash",
            m.deliveries_left.clone(),
        );
        r.register(
            "api_request_timeouts",
            "POST /v1/request answered 504: no reply within the timeout",
            m.api_request_timeouts.clone(),
        );
        *m.registry.lock().expect("metrics poisoned") = r;
        m
    }
}

/// The per-event counters of one (plugin, subscription), looked up once and kept by the plugin.
#[derive(Clone)]
pub struct EventCounters {
    /// `plugbus_events_received_total`.
    pub received: ShardedCounter,
    /// `plugbus_events_handled_total`.
    pub handled: ShardedCounter,
    /// `plugbus_events_retried_total`.
    pub retried: ShardedCounter,
    /// `plugbus_events_dead_lettered_total`.
    pub dead_lettered: ShardedCounter,
}

/// A plugin's subscription patterns, in manifest order, each with its counters.
type Subscriptions = Arc<[(Pattern, Arc<EventCounters>)]>;

/// One plugin's handles: the duration histogram and the event counters of each of its
/// subscription patterns, so the hot path neither builds label sets nor hashes them.
///
/// Bounded by configuration: one entry per pattern of the version serving now (replaced on hot
/// reload), plus one for events no current pattern matches; nothing is keyed by a subject.
pub struct PluginMetrics {
    plugin: String,
    family: Arc<Metrics>,
    /// `plugbus_handler_duration_seconds{plugin}`.
    pub handler_seconds: ShardedHistogram,
    /// `plugbus_replies_dropped_total{plugin}`.
    pub replies_dropped: Counter,
    /// `plugbus_requests_expired_total{plugin}`.
    pub requests_expired: Counter,
    /// `plugbus_outputs_dead_lettered_total{plugin}`.
    pub outputs_dead_lettered: Counter,
    /// `plugbus_replays_let_go_total{plugin}`.
    pub replays_let_go: Counter,
    /// `plugbus_host_failures_total{plugin}`.
    pub host_failures: Counter,
    /// `plugbus_deliveries_left_total{plugin}`.
    pub deliveries_left: Counter,
    /// The patterns in manifest order with their counters. Behind an `Arc`: one reference count
    /// per event instead of one per counter (each a cache line the two cores pass back and forth).
    by_subscription: RwLock<Subscriptions>,
    unsubscribed: Arc<EventCounters>,
}

/// A delivery counted as held ([`PluginMetrics::holding`]) until dropped.
pub struct Holding(Gauge);

impl Drop for Holding {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl PluginMetrics {
    /// The handles of `plugin` (subscribed to `patterns`) in `metrics`.
    pub fn new(metrics: Arc<Metrics>, plugin: &str, patterns: &[String]) -> Self {
        let labels = PluginLabels { plugin: plugin.into() };
        let handler_seconds = metrics.handler_seconds.get_or_create(&labels).clone();
        let unsubscribed = Arc::new(metrics.counters(plugin, UNSUBSCRIBED));
        let replies_dropped = metrics.replies_dropped.get_or_create(&labels).clone();
        let requests_expired = metrics.requests_expired.get_or_create(&labels).clone();
        let outputs_dead_lettered = metrics.outputs_dead_lettered.get_or_create(&labels).clone();
        let replays_let_go = metrics.replays_let_go.get_or_create(&labels).clone();
        let host_failures = metrics.host_failures.get_or_create(&labels).clone();
        let deliveries_left = metrics.deliveries_left.get_or_create(&labels).clone();
        // (at 0 from the start, as its counters are: not only once a hold or `/v1/plugins` asks)
        drop(metrics.deliveries_held.get_or_create(&labels));
        let this = Self {
            plugin: plugin.into(),
            family: metrics,
            handler_seconds,
            replies_dropped,
            requests_expired,
            outputs_dead_lettered,
            replays_let_go,
            host_failures,
            deliveries_left,
            by_subscription: RwLock::new(Arc::from(Vec::new())),
            unsubscribed,
        };
        this.set_subscriptions(patterns);
        this
    }

    /// Counts a delivery in `plugbus_deliveries_held{plugin}` while the guard lives (however its
    /// hold ends). The gauge is the plugin name's, not this runtime's: a hold that outlives its
    /// plugin's removal stays in it, and a reinstall of the plugin counts in the same series.
    pub fn holding(&self) -> Holding {
        let _series = self.family.held_series.lock().expect("metrics poisoned");
        let gauge = self.family.deliveries_held.get_or_create(&PluginLabels { plugin: self.plugin.clone() }).clone();
        gauge.inc();
        Holding(gauge)
    }

    /// The deliveries of the plugin's name held now ([`PluginMetrics::holding`]).
    pub fn held(&self) -> u64 {
        let labels = PluginLabels { plugin: self.plugin.clone() };
        self.family.deliveries_held.get_or_create(&labels).get().max(0) as u64
    }

    /// Follows a hot reload: the counters of `patterns` (a pattern kept across the reload keeps
    /// counting where it was; the series of patterns dropped leave `/metrics`, or every reload
    /// that changed the patterns would add series that stay for good).
    pub fn set_subscriptions(&self, patterns: &[String]) {
        let table: Subscriptions = patterns
            .iter()
            .filter_map(|p| Pattern::parse(p).ok())
            .map(|p| {
                let counters = Arc::new(self.family.counters(&self.plugin, p.as_str()));
                (p, counters)
            })
            .collect();
        let old = std::mem::replace(&mut *self.by_subscription.write().expect("metrics poisoned"), table.clone());
        for (dropped, _) in old.iter().filter(|(p, _)| !table.iter().any(|(q, _)| q.as_str() == p.as_str())) {
            let labels = Metrics::event(&self.plugin, dropped.as_str());
            for family in
                [&self.family.received, &self.family.handled, &self.family.retried, &self.family.dead_lettered]
            {
                family.remove(&labels);
            }
        }
    }

    /// The counters of an event on `subject`: those of the first pattern that matches it.
    pub fn event(&self, subject: &str) -> Arc<EventCounters> {
        let table = self.by_subscription.read().expect("metrics poisoned");
        match table.iter().find(|(p, _)| p.matches(subject)) {
            Some((_, counters)) => counters.clone(),
            None => self.unsubscribed.clone(),
        }
    }
}

impl Metrics {
    /// Labels for the events of one plugin that one of its subscriptions matched.
    pub fn event(plugin: &str, subscription: &str) -> EventLabels {
        EventLabels { plugin: plugin.to_string(), subscription: subscription.to_string() }
    }

    /// The event counters of (plugin, subscription), created on first use.
    fn counters(&self, plugin: &str, subscription: &str) -> EventCounters {
        let labels = Self::event(plugin, subscription);
        EventCounters {
            received: self.received.get_or_create(&labels).clone(),
            handled: self.handled.get_or_create(&labels).clone(),
            retried: self.retried.get_or_create(&labels).clone(),
            dead_lettered: self.dead_lettered.get_or_create(&labels).clone(),
        }
    }

    /// Takes a removed plugin's gauges out of `/metrics` (its in-flight and queue depth, its
    /// breakers to `breaker_hosts`): left, they stayed at their last value, and an alert on them
    /// fired for a plugin that no longer exists. Its counters stay, as totals.
    pub fn forget_gauges(&self, plugin: &str, breaker_hosts: impl IntoIterator<Item = String>) {
        let labels = PluginLabels { plugin: plugin.to_string() };
        self.in_flight.remove(&labels);
        self.queue_depth.remove(&labels);
        // (Kept while a hold of the plugin gone goes on, and at 0 once it ends: a hold whose
        // output's dead letter is in no file outlives its plugin, and one being left ends just
        // after this. Gone only if no hold was counted in it then.)
        let _series = self.held_series.lock().expect("metrics poisoned");
        if self.deliveries_held.get_or_create(&labels).get() == 0 {
            self.deliveries_held.remove(&labels);
        }
        for host in breaker_hosts {
            let labels = BreakerLabels { plugin: plugin.to_string(), host };
            self.breaker_open.remove(&labels);
            self.breaker_opened.remove(&labels);
        }
    }

    /// Counts a file of the plugins folder that could not be loaded: under its name while at
    /// most [`LOAD_ERROR_FILES`] files have a series, else under [`OTHER_FILES`] (a folder of a
    /// million refused links made a million series, in every scrape and `plugbus dev`'s poll).
    pub fn load_error(&self, path: &std::path::Path) {
        let mut file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let mut named = self.load_error_files.lock().expect("metrics poisoned");
        if !named.contains(&file) {
            if named.len() < LOAD_ERROR_FILES {
                named.insert(file.clone());
            } else {
                file = OTHER_FILES.to_string();
            }
        }
        self.load_errors.get_or_create(&FileLabels { file }).inc();
    }

    /// Forgets the load errors of a file gone from the plugins folder: the labels stay as many
    /// as the files there, not every name a file ever had.
    pub fn forget_load_errors(&self, path: &std::path::Path) {
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        if self.load_error_files.lock().expect("metrics poisoned").remove(&file) {
            self.load_errors.remove(&FileLabels { file });
        }
    }

    /// Lets `register` add metrics kept elsewhere (a transport's own) to the registry.
    pub fn register_with(&self, register: impl FnOnce(&mut Registry)) {
        register(&mut self.registry.lock().expect("metrics poisoned"));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("metrics poisoned");
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encoding into a String");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(m: &Metrics) -> usize {
        m.encode().lines().filter(|l| l.starts_with("plugbus_events_")).count()
    }

    #[test]
    fn a_reload_and_a_removal_leave_no_series_behind() {
        let m = Arc::new(Metrics::default());
        let p = PluginMetrics::new(m.clone(), "orders", &["orders.a".into(), "orders.b".into()]);
        p.event("orders.a").received.inc();
        for i in 0..5 {
            p.set_subscriptions(&[format!("orders.v{i}"), "orders.b".into()]);
        }
        let text = m.encode();
        assert!(!text.contains(r#"subscription="orders.a""#) && !text.contains("orders.v3"), "{text}");
        assert!(text.contains(r#"subscription="orders.v4""#) && text.contains(r#"subscription="orders.b""#), "{text}");
        let labels = PluginLabels { plugin: "orders".into() };
        m.in_flight.get_or_create(&labels).set(1);
        m.queue_depth.get_or_create(&labels).set(3);
        let p = PluginMetrics::new(m.clone(), "orders", &[]);
        let held = p.holding();
        let breaker = BreakerLabels { plugin: "orders".into(), host: "pay.example".into() };
        m.breaker_open.get_or_create(&breaker).set(1);
        m.forget_gauges("orders", ["pay.example".to_string()]);
        let text = m.encode();
        for gone in ["plugbus_in_flight{", "plugbus_queue_depth{", "plugbus_breaker_open{"] {
            assert!(!text.contains(gone), "{gone} is still there: {text}");
        }
        // A hold going on past the removal stays counted; none held, the series goes.
        assert!(text.contains(r#"plugbus_deliveries_held{plugin="orders"} 1"#), "{text}");
        drop(held);
        assert_eq!(p.held(), 0);
        m.forget_gauges("orders", []);
        assert!(!m.encode().contains("plugbus_deliveries_held{"), "{}", m.encode());
    }

    #[test]
    fn a_plugins_held_deliveries_are_a_series_from_its_start() {
        let m = Arc::new(Metrics::default());
        let _p = PluginMetrics::new(m.clone(), "orders", &[]);
        let text = m.encode();
        assert!(text.contains(r#"plugbus_deliveries_held{plugin="orders"} 0"#), "{text}");
        assert!(text.contains(r#"plugbus_deliveries_left_total{plugin="orders"} 0"#), "{text}");
    }

    #[test]
    fn counters_are_labelled_by_the_subscription_never_by_the_subject() {
        let m = Arc::new(Metrics::default());
        let p = PluginMetrics::new(m.clone(), "orders", &["orders.*.created".into(), "orders.>".into()]);
        let before = series(&m);
        for i in 0..10_000 {
            p.event(&format!("orders.{i}.created")).received.inc();
            p.event(&format!("orders.{i}.paid")).handled.inc();
        }
        p.event("elsewhere").received.inc();
        assert_eq!(series(&m), before, "a subject made a series");
        let text = m.encode();
        assert!(
            text.contains(r#"plugbus_events_received_total{plugin="orders",subscription="orders.*.created"} 10000"#)
        );
        assert!(text.contains(r#"plugbus_events_handled_total{plugin="orders",subscription="orders.>"} 10000"#));
        assert!(text.contains(r#"plugbus_events_received_total{plugin="orders",subscription="(none)"} 1"#));
        assert!(!text.contains("orders.17."), "{text}");
    }

    #[test]
    fn a_reload_swaps_the_patterns_and_a_kept_pattern_keeps_counting() {
        let m = Arc::new(Metrics::default());
        let p = PluginMetrics::new(m.clone(), "x", &["a.*".into()]);
        p.event("a.1").received.inc();
        p.set_subscriptions(&["b.*".into(), "a.*".into()]);
        p.event("a.2").received.inc();
        p.event("b.2").received.inc();
        assert_eq!(p.by_subscription.read().unwrap().len(), 2);
        let text = m.encode();
        assert!(text.contains(r#"plugbus_events_received_total{plugin="x",subscription="a.*"} 2"#), "{text}");
        assert!(text.contains(r#"plugbus_events_received_total{plugin="x",subscription="b.*"} 1"#), "{text}");
    }
}
