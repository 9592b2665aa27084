//! The instance pool all plugins share (`sandbox.max_instances`), seen from the plugins: every
//! plugin's idle warm instances (`instance = "reuse"`), so that one whose slot another plugin
//! needs can give it up, and how often attempts found the pool full.
//!
//! A warm instance kept between events holds a slot of the pool. Without a way to take it back,
//! a burst to reuse plugins would pin their slots for good and every other plugin's attempt
//! would wait for a slot that never frees. An idle instance is only a cache: when the pool is
//! full, dropping one costs its plugin a new instantiation later, nothing else.

use super::bindings;
use super::state::HostState;
use crate::metrics::PluginLabels;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use wasmtime::Store;

/// How long an attempt waits before trying again for an instance slot, while every slot of the
/// pool all plugins share (`sandbox.max_instances`) is taken (by attempts in flight, or idle
/// warm instances of `instance = "reuse"` plugins).
const POOL_RETRY: Duration = Duration::from_millis(5);

/// The longest an attempt waits for an instance slot (or its deadline, if longer): a hog
/// holds each of its slots at most its own deadline, so a wait bounded by the waiting plugin's
/// deadline alone would give up just before slots free when both deadlines are alike.
pub(super) const POOL_WAIT_MAX: Duration = Duration::from_secs(30);

/// The wait for a slot of the shared pool, after an instantiation found every one taken (an
/// attempt's, or a load's reading a manifest): an idle warm instance of any plugin is only a
/// cache, so its slot goes first; then a try every [`POOL_RETRY`] until the wait gives up.
pub(super) struct SlotWait {
    give_up: Instant,
    /// Whether the last try followed an eviction: one eviction per wait, so a try that loses
    /// the freed slot to another does not empty every idle list in a loop.
    evicted: bool,
    /// Whether it has slept once (`first_wait` was called).
    waited: bool,
}

impl SlotWait {
    /// A wait that gives up at `give_up`.
    pub(super) fn until(give_up: Instant) -> Self {
        Self { give_up, evicted: false, waited: false }
    }

    /// Readies the next try: evicts an idle warm instance, or sleeps [`POOL_RETRY`] (calling
    /// `first_wait` the first time); `false` when the wait gives up instead.
    pub(super) async fn again(&mut self, pool: &SharedPool, first_wait: impl FnOnce()) -> bool {
        if !self.evicted && pool.evict_one() {
            self.evicted = true;
            tokio::task::yield_now().await;
            return true;
        }
        self.evicted = false;
        if !self.waited {
            self.waited = true;
            first_wait();
        }
        if Instant::now() + POOL_RETRY >= self.give_up {
            return false;
        }
        tokio::time::sleep(POOL_RETRY).await;
        true
    }
}

/// An instantiated plugin kept between events, with its store.
pub(super) struct Warm {
    pub store: Store<HostState>,
    pub instance: bindings::Plugin,
    /// Events it has run.
    pub uses: u32,
}

/// One plugin's idle warm instances, the most recently used last.
pub(super) type WarmList = Mutex<Vec<Warm>>;

/// Every plugin's idle list, to take an instance from when the shared pool is full, and the
/// pool's counters.
#[derive(Default)]
pub struct SharedPool {
    lists: Mutex<Vec<Weak<WarmList>>>,
    /// Idle instances dropped to give their slot to another attempt.
    evicted: Counter,
    /// Attempts that found every slot taken (no idle instance to drop) and waited, by plugin.
    waited: Family<PluginLabels, Counter>,
}

impl SharedPool {
    /// A new idle list for a plugin, known to the registry while the plugin lives.
    pub(super) fn register(&self) -> Arc<WarmList> {
        let list = Arc::new(WarmList::default());
        let mut lists = self.lists.lock().expect("idle lists poisoned");
        lists.retain(|l| l.strong_count() > 0);
        lists.push(Arc::downgrade(&list));
        list
    }

    /// Drops the least recently used idle instance of the plugin that keeps the most, freeing
    /// its pool slot; `false` when no plugin keeps one.
    pub(super) fn evict_one(&self) -> bool {
        // The lists are taken out first: a plugin dropped meanwhile may be dropped with the last
        // of these handles, and its instances with it, which must not happen under the lock.
        let mut live: Vec<(usize, Arc<WarmList>)> = {
            let lists = self.lists.lock().expect("idle lists poisoned");
            lists.iter().filter_map(Weak::upgrade).map(|l| (0, l)).collect()
        };
        for (len, list) in &mut live {
            *len = list.lock().expect("warm pool poisoned").len();
        }
        live.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        // The fullest first; another when it was emptied meanwhile.
        let taken = live.iter().filter(|(len, _)| *len > 0).find_map(|(_, list)| {
            let mut idle = list.lock().expect("warm pool poisoned");
            (!idle.is_empty()).then(|| idle.remove(0))
        });
        // Dropped outside the locks: resetting the slot touches its memory.
        let Some(warm) = taken else { return false };
        tracing::debug!(plugin = %warm.store.data().plugin.name, uses = warm.uses,
            "an idle warm instance gave its slot to another attempt (the instance pool is full)");
        drop(warm);
        self.evicted.inc();
        true
    }

    /// Counts an attempt of `plugin` that found every slot taken and waits for one.
    pub(super) fn count_wait(&self, plugin: &str) {
        self.waited.get_or_create(&PluginLabels { plugin: plugin.to_string() }).inc();
    }

    /// Registers `plugbus_idle_instances_evicted_total` and
    /// `plugbus_instance_slot_waits_total{plugin}`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "idle_instances_evicted",
            "Idle warm instances (instance = \"reuse\") dropped to give their slot of the shared pool to another attempt",
            self.evicted.clone(),
        );
        registry.register(
            "instance_slot_waits",
            "Attempts that found every slot of the instance pool plugins share (sandbox.max_instances) taken and waited for one",
            self.waited.clone(),
        );
    }
}
