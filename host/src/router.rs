//! The router: which plugins are live, what each subscribes to, and the per-plugin worker that
//! takes deliveries off the plugin's queue and runs them concurrently (bounded).
//!
//! Invariant: the router never runs wasm itself and never blocks on one plugin on behalf of
//! another: each plugin has its own queue, worker and concurrency bound.

use crate::dispatch::{self, PluginStats};
use crate::sandbox::Plugin;
use crate::transport::{Subscription, SubscriptionSpec, Transport, TransportError};
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

/// How deliveries for one plugin are queued and run.
#[derive(Debug, Clone, Copy)]
pub struct Flow {
    /// Deliveries running at once.
    pub concurrency: usize,
    /// Deliveries waiting in the queue before the transport pauses.
    pub queue: usize,
}

impl Default for Flow {
    fn default() -> Self {
        Self {
            concurrency: 16,
            queue: 1024,
        }
    }
}

/// A live plugin: the version serving now, its counters and its worker.
struct Entry {
    current: Arc<RwLock<Arc<Plugin>>>,
    stats: Arc<PluginStats>,
    worker: JoinHandle<()>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.worker.abort();
    }
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
    /// `serving`.
    pub state: String,
    /// Subscription patterns.
    pub subscriptions: Vec<String>,
    /// Allowed publish patterns.
    pub publishes: Vec<String>,
    /// Effective limits.
    pub limits: crate::sandbox::Limits,
    /// Deliveries received / ok / failed / attempts / in flight.
    pub counters: BTreeMap<&'static str, u64>,
}

/// The set of live plugins.
pub struct Router {
    transport: Arc<dyn Transport>,
    entries: Mutex<BTreeMap<String, Entry>>,
}

impl Router {
    /// A router with no plugins.
    pub fn new(transport: Arc<dyn Transport>) -> Self {
        Self {
            transport,
            entries: Mutex::new(BTreeMap::new()),
        }
    }

    /// Makes `plugin` live: subscribes it and starts its worker.
    pub async fn install(&self, plugin: Plugin, flow: Flow) -> Result<(), TransportError> {
        let name = plugin.name().to_string();
        let manifest = plugin.manifest();
        let queue_group = manifest
            .subscriptions
            .iter()
            .find_map(|s| s.queue_group.clone())
            .unwrap_or_else(|| format!("plugbus.{name}"));
        let spec = SubscriptionSpec {
            plugin: name.clone(),
            patterns: manifest.patterns(),
            queue_group,
            capacity: flow.queue,
        };
        let subscription = self.transport.subscribe(spec).await?;
        let current = Arc::new(RwLock::new(Arc::new(plugin)));
        let stats = Arc::new(PluginStats::default());
        let worker = tokio::spawn(run_worker(
            current.clone(),
            stats.clone(),
            subscription,
            self.transport.clone(),
            flow,
        ));
        tracing::info!(plugin = %name, "plugin serving");
        self.entries.lock().expect("router poisoned").insert(
            name,
            Entry {
                current,
                stats,
                worker,
            },
        );
        Ok(())
    }

    /// Names of the live plugins.
    pub fn names(&self) -> Vec<String> {
        self.entries
            .lock()
            .expect("router poisoned")
            .keys()
            .cloned()
            .collect()
    }

    /// Descriptions of the live plugins.
    pub fn plugins(&self) -> Vec<PluginInfo> {
        use std::sync::atomic::Ordering::Relaxed;
        let entries = self.entries.lock().expect("router poisoned");
        entries
            .iter()
            .map(|(name, e)| {
                let p = e.current.read().expect("slot poisoned").clone();
                let s = &e.stats;
                PluginInfo {
                    name: name.clone(),
                    version: p.manifest().version.clone(),
                    hash: p.hash().to_string(),
                    state: format!("serving {}", p.manifest().version),
                    subscriptions: p.manifest().patterns(),
                    publishes: p.manifest().publishes.clone(),
                    limits: p.limits().clone(),
                    counters: BTreeMap::from([
                        ("received", s.received.load(Relaxed)),
                        ("ok", s.ok.load(Relaxed)),
                        ("failed", s.failed.load(Relaxed)),
                        ("attempts", s.attempts.load(Relaxed)),
                        ("in_flight", s.in_flight.load(Relaxed)),
                    ]),
                }
            })
            .collect()
    }
}

async fn run_worker(
    current: Arc<RwLock<Arc<Plugin>>>,
    stats: Arc<PluginStats>,
    mut subscription: Subscription,
    transport: Arc<dyn Transport>,
    flow: Flow,
) {
    let permits = Arc::new(Semaphore::new(flow.concurrency.max(1)));
    while let Some(delivery) = subscription.deliveries.recv().await {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        // New deliveries always go to the version serving now; one in flight keeps its own.
        let plugin = current.read().expect("slot poisoned").clone();
        let (transport, stats) = (transport.clone(), stats.clone());
        tokio::spawn(async move {
            dispatch::deliver(&plugin, delivery, &transport, &stats).await;
            drop(permit);
        });
    }
}
