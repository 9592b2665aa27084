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
use crate::shards::Sharded;
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
/// holds each of its slots for its own deadline (up to `cpu_wait::WALL_FACTOR` times it when
/// other plugins' attempts kept it waiting for a CPU), so a wait bounded by the waiting plugin's
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

/// One plugin's idle warm instances: a list per shard of threads (`shards::shard`), each the
/// most recently used last. A thread takes back the instance it put back last, whose memory and
/// store are still in its core's caches, before one another thread put back: taken from one shared
/// list, an instance moved between the cores at nearly every event on a busy host (its linear
/// memory, stack and store pulled from the other core's cache). Only when its own list is empty
/// does a thread take another's most recent one, so an instance is made only when no list keeps
/// one, as with one list.
/// (`T` is [`Warm`] but in its unit tests.)
pub(super) struct WarmList<T = Warm>(Sharded<Mutex<Vec<T>>>);

impl<T> Default for WarmList<T> {
    fn default() -> Self {
        Self(Sharded::default())
    }
}

impl<T> WarmList<T> {
    /// An idle instance: the calling thread's most recently used, else another thread's.
    pub(super) fn take(&self) -> Option<T> {
        let own = self.0.local();
        if let Some(warm) = own.lock().expect("warm pool poisoned").pop() {
            return Some(warm);
        }
        self.0
            .each()
            .filter(|list| !std::ptr::eq(*list, own))
            .find_map(|list| list.lock().expect("warm pool poisoned").pop())
    }

    /// Keeps `warm` idle, on the calling thread's list.
    pub(super) fn put(&self, warm: T) {
        self.0.local().lock().expect("warm pool poisoned").push(warm);
    }

    /// How many are idle.
    fn len(&self) -> usize {
        self.0.each().map(|list| list.lock().expect("warm pool poisoned").len()).sum()
    }

    /// The least recently used idle instance of the fullest list.
    fn take_oldest(&self) -> Option<T> {
        let mut lists: Vec<_> = self.0.each().map(|list| list.lock().expect("warm pool poisoned")).collect();
        let fullest = lists.iter_mut().max_by_key(|list| list.len())?;
        (!fullest.is_empty()).then(|| fullest.remove(0))
    }
}

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
            *len = list.len();
        }
        live.sort_by_key(|(len, _)| std::cmp::Reverse(*len));
        // The fullest first; another when it was emptied meanwhile.
        let taken = live.iter().filter(|(len, _)| *len > 0).find_map(|(_, list)| list.take_oldest());
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

#[cfg(test)]
mod tests {
    use super::WarmList;
    use crate::shards::shard;
    use std::sync::Arc;

    /// Runs `f` on a new thread whose shard is not `other`'s (threads take shards in turn, so
    /// one of the next few differs even while other tests' threads take some); a thread on
    /// `other`'s shard runs nothing.
    fn on_another_shard<R: Send + 'static>(other: usize, f: impl FnOnce() -> R + Send + Clone + 'static) -> R {
        for _ in 0..64 {
            let f = f.clone();
            let ran = std::thread::spawn(move || (shard() != other).then(f)).join().expect("the thread ran");
            if let Some(r) = ran {
                return r;
            }
        }
        panic!("no thread got a shard other than {other}");
    }

    #[test]
    fn a_thread_takes_back_its_own_instance_before_another_threads() {
        let list = Arc::new(WarmList::<&str>::default());
        let here = shard();
        list.put("put here");
        // Another thread puts one after, and takes the one it put, not the more recent one here.
        let there = list.clone();
        let taken = on_another_shard(here, move || {
            there.put("put there");
            there.take()
        });
        assert_eq!(taken, Some("put there"));
        // Here, the one put here comes first though another thread's one is more recent.
        let there = list.clone();
        on_another_shard(here, move || there.put("put there last"));
        assert_eq!(list.take(), Some("put here"));
        // Its own list empty, a thread takes another's: none is made while one is idle.
        assert_eq!(list.take(), Some("put there last"));
        assert_eq!(list.take(), None);
    }

    #[test]
    fn an_eviction_takes_the_oldest_of_the_fullest_list() {
        let list = Arc::new(WarmList::<&str>::default());
        list.put("oldest here");
        list.put("newer here");
        let there = list.clone();
        on_another_shard(shard(), move || there.put("alone there"));
        assert_eq!(list.len(), 3);
        assert_eq!(list.take_oldest(), Some("oldest here"));
        assert_eq!(list.len(), 2);
        assert!(list.take_oldest().is_some());
        assert!(list.take_oldest().is_some());
        assert_eq!(list.take_oldest(), None);
    }
}
