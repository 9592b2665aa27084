//! Metrics a user can scrape: the one place that names them. `/metrics` serves them in the
//! Prometheus text format.
//!
//! Counters are per plugin and subject; gauges (in flight, queue depth, cache) are read from the
//! router and sandbox at scrape time so the hot path only bumps counters.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::Mutex;

/// Labels of per-event counters.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabels {
    /// The plugin.
    pub plugin: String,
    /// The subject the event arrived on.
    pub subject: String,
}

/// Labels of per-plugin metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PluginLabels {
    /// The plugin.
    pub plugin: String,
}

/// Labels of per-file metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FileLabels {
    /// The file in the plugins folder.
    pub file: String,
}

/// Every metric of the host.
pub struct Metrics {
    registry: Mutex<Registry>,
    /// Deliveries received.
    pub received: Family<EventLabels, Counter>,
    /// Deliveries handled (Ok, outputs released).
    pub handled: Family<EventLabels, Counter>,
    /// Failed attempts that were retried.
    pub retried: Family<EventLabels, Counter>,
    /// Deliveries dead-lettered.
    pub dead_lettered: Family<EventLabels, Counter>,
    /// Handler duration per attempt (instantiation included).
    pub handler_seconds: Family<PluginLabels, Histogram>,
    /// Attempts running now.
    pub in_flight: Family<PluginLabels, Gauge>,
    /// Deliveries waiting in the plugin's queue.
    pub queue_depth: Family<PluginLabels, Gauge>,
    /// Versions swapped in, added or removed.
    pub reloads: Family<PluginLabels, Counter>,
    /// Files that could not be loaded.
    pub load_errors: Family<FileLabels, Counter>,
    /// Components compiled (cache misses included).
    pub compiled: Gauge,
    /// Components read from the compile cache.
    pub cache_hits: Gauge,
    /// Plugins serving.
    pub plugins: Gauge,
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
            handler_seconds: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.000_01, 2.5, 16))),
            in_flight: Family::default(),
            queue_depth: Family::default(),
            reloads: Family::default(),
            load_errors: Family::default(),
            compiled: Gauge::default(),
            cache_hits: Gauge::default(),
            plugins: Gauge::default(),
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
        r.register("load_errors", "Plugin files that could not be loaded", m.load_errors.clone());
        r.register("components_compiled", "Components compiled since start", m.compiled.clone());
        r.register("compile_cache_hits", "Components read from the compile cache since start", m.cache_hits.clone());
        r.register("plugins", "Plugins serving", m.plugins.clone());
        *m.registry.lock().expect("metrics poisoned") = r;
        m
    }
}

/// The per-event counters of one (plugin, subject), looked up once and kept by the plugin.
#[derive(Clone)]
pub struct EventCounters {
    /// `plugbus_events_received_total`.
    pub received: Counter,
    /// `plugbus_events_handled_total`.
    pub handled: Counter,
    /// `plugbus_events_retried_total`.
    pub retried: Counter,
    /// `plugbus_events_dead_lettered_total`.
    pub dead_lettered: Counter,
}

/// One plugin's handles: the duration histogram and the event counters by subject, so the hot
/// path neither builds label sets nor hashes them more than once per event.
pub struct PluginMetrics {
    plugin: String,
    family: std::sync::Arc<Metrics>,
    /// `plugbus_handler_duration_seconds{plugin}`.
    pub handler_seconds: Histogram,
    /// Behind an `Arc`: one reference count per event instead of one per counter (each a cache
    /// line the two cores pass back and forth).
    by_subject: std::sync::RwLock<std::collections::HashMap<String, std::sync::Arc<EventCounters>>>,
}

impl PluginMetrics {
    /// The handles of `plugin` in `metrics`.
    pub fn new(metrics: std::sync::Arc<Metrics>, plugin: &str) -> Self {
        let handler_seconds = metrics.handler_seconds.get_or_create(&PluginLabels { plugin: plugin.into() }).clone();
        Self { plugin: plugin.into(), family: metrics, handler_seconds, by_subject: Default::default() }
    }

    /// The counters of events on `subject`.
    pub fn event(&self, subject: &str) -> std::sync::Arc<EventCounters> {
        if let Some(c) = self.by_subject.read().expect("metrics poisoned").get(subject) {
            return c.clone();
        }
        let labels = Metrics::event(&self.plugin, subject);
        let m = &self.family;
        let counters = std::sync::Arc::new(EventCounters {
            received: m.received.get_or_create(&labels).clone(),
            handled: m.handled.get_or_create(&labels).clone(),
            retried: m.retried.get_or_create(&labels).clone(),
            dead_lettered: m.dead_lettered.get_or_create(&labels).clone(),
        });
        self.by_subject.write().expect("metrics poisoned").insert(subject.to_string(), counters.clone());
        counters
    }
}

impl Metrics {
    /// Labels for one event of one plugin.
    pub fn event(plugin: &str, subject: &str) -> EventLabels {
        EventLabels { plugin: plugin.to_string(), subject: subject.to_string() }
    }

    /// Counts a file of the plugins folder that could not be loaded.
    pub fn load_error(&self, path: &std::path::Path) {
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        self.load_errors.get_or_create(&FileLabels { file }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().expect("metrics poisoned");
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("encoding into a String");
        out
    }
}
