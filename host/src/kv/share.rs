//! Each plugin's share of its kv store's writer.
//!
//! The stores commit one transaction after another: the event log's one writer (in order, with
//! every producer's append and every ack of the durable bus), redb's one write transaction at a
//! time (`kv.redb`), the one connection to JetStream. A plugin whose every event writes 16 MiB of
//! kv (within every per-event limit) had `flow.concurrency` such commits waiting at once: 256 MiB,
//! and their `fsync`s, ahead of every other plugin's commits, and on the durable bus ahead of
//! every producer's `202` (a `503` past `api.publish_timeout` on a slow disk). [`Shared`] bounds
//! what one plugin's commits sent to the store and not answered yet hold to
//! [`COMMIT_BYTES_PER_PLUGIN`] (one commit larger than that goes alone): past it the plugin's
//! next commit waits, and so do its own deliveries, nobody else's.

use super::{KvError, KvStore, Outbox, Txn, Versioned};
use crate::metrics::{PluginLabels, Registry};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// What one plugin's commits sent to the store and not answered yet may hold, in bytes (as
/// [`commit_bytes`] counts them): one commit of the default `max_kv_write_bytes`.
pub const COMMIT_BYTES_PER_PLUGIN: u64 = 16 << 20;

/// The least a commit is charged, however small: a commit costs the store more than its bytes
/// (redb's `fsync`, a round trip to JetStream), so one plugin has at most 64 commits in it.
pub const MIN_COMMIT_CHARGE: u64 = 256 << 10;

/// The share is counted in units of this many bytes (a semaphore's permits).
const UNIT_BYTES: u64 = 1024;
/// The share, in units.
const SHARE_UNITS: u64 = COMMIT_BYTES_PER_PLUGIN / UNIT_BYTES;

/// What a commit holds and costs while the store takes it: its transaction
/// ([`Txn::held_bytes`]), the values its check reads again ([`Txn::checked_bytes`]: a commit of
/// one small write after reading 16 MiB reads them again, and was charged as small) and the
/// outputs kept with it.
pub fn commit_bytes(txn: &Txn, outbox: Option<&Outbox>) -> u64 {
    let outputs: usize = outbox.map_or(0, |o| o.outputs.iter().map(|e| e.data.len() + e.header_bytes()).sum());
    txn.held_bytes() + txn.checked_bytes() + outputs as u64
}

/// A kv store whose writes each plugin (each namespace) takes a bounded share of.
pub struct Shared {
    inner: Arc<dyn KvStore>,
    /// Per namespace, the units its unanswered commits hold. (One entry per plugin that ever
    /// committed: namespaces are plugin names, which come from the operator's plugins folder.)
    shares: Mutex<HashMap<String, Arc<Semaphore>>>,
    /// `plugbus_kv_commits_waiting{plugin}`.
    waiting: Family<PluginLabels, Gauge>,
}

impl Shared {
    /// `inner`, shared out per namespace.
    pub fn new(inner: Arc<dyn KvStore>) -> Self {
        Self { inner, shares: Mutex::default(), waiting: Family::default() }
    }

    /// Registers `plugbus_kv_commits_waiting{plugin}` (`registry` has the `plugbus` prefix).
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "kv_commits_waiting",
            "Kv commits of a plugin waiting for its share of the kv store's writer (its commits in the store's hands hold at most 16 MiB): a plugin slowed by its own kv writes",
            self.waiting.clone(),
        );
    }

    /// Waits until namespace `ns` has room for a commit of `bytes` (at least
    /// [`MIN_COMMIT_CHARGE`]; a larger commit than the share waits for all of it, and goes
    /// alone); the permit is its room until dropped. (Dropped with the caller's future: a
    /// commit cancelled once in the store's hands would go on outside the share. Nothing
    /// cancels a commit today: dispatch awaits it.)
    async fn room(&self, ns: &str, bytes: u64) -> OwnedSemaphorePermit {
        let share = {
            let mut shares = self.shares.lock().expect("kv shares poisoned");
            match shares.get(ns) {
                Some(share) => share.clone(),
                None => shares
                    .entry(ns.to_string())
                    .or_insert_with(|| Arc::new(Semaphore::new(SHARE_UNITS as usize)))
                    .clone(),
            }
        };
        let units = bytes.max(MIN_COMMIT_CHARGE).div_ceil(UNIT_BYTES).min(SHARE_UNITS) as u32;
        if let Ok(room) = share.clone().try_acquire_many_owned(units) {
            return room;
        }
        let _counted = Waiting::counted(self.waiting.get_or_create(&PluginLabels { plugin: ns.to_string() }).clone());
        share.acquire_many_owned(units).await.expect("kv shares are never closed")
    }
}

/// A commit counted in `plugbus_kv_commits_waiting` while it waits (a cancelled wait too).
struct Waiting(Gauge);

impl Waiting {
    fn counted(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[async_trait::async_trait]
impl KvStore for Shared {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Versioned>, KvError> {
        self.inner.get(ns, key).await
    }

    async fn commit(&self, ns: &str, txn: &Txn) -> Result<(), KvError> {
        let _room = self.room(ns, commit_bytes(txn, None)).await;
        self.inner.commit(ns, txn).await
    }

    async fn commit_settling(&self, ns: &str, txn: &Txn, outbox: Option<Outbox>) -> Result<(), KvError> {
        let _room = self.room(ns, commit_bytes(txn, outbox.as_ref())).await;
        self.inner.commit_settling(ns, txn, outbox).await
    }

    async fn check_reads(&self, ns: &str, txn: &Txn) -> Result<(), KvError> {
        // (A store may check them through its writer: by default, a commit of nothing.)
        let _room = self.room(ns, commit_bytes(txn, None)).await;
        self.inner.check_reads(ns, txn).await
    }

    async fn read(&self, ns: &str, key: &str) -> Result<(Option<Vec<u8>>, u64), KvError> {
        self.inner.read(ns, key).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::MemoryKv;
    use std::time::Duration;

    /// A store whose commits wait at a gate (a slow writer), counting per namespace the bytes of
    /// the commits it is taking at once, and the most it ever took.
    #[derive(Default)]
    struct Gated {
        inner: MemoryKv,
        open: tokio::sync::Notify,
        opened: std::sync::atomic::AtomicBool,
        taking: Mutex<HashMap<String, (u64, u64)>>,
    }

    impl Gated {
        fn open(&self) {
            self.opened.store(true, std::sync::atomic::Ordering::SeqCst);
            self.open.notify_waiters();
        }

        /// (Bytes being taken now, the most ever) for `ns`.
        fn taking(&self, ns: &str) -> (u64, u64) {
            self.taking.lock().unwrap().get(ns).copied().unwrap_or_default()
        }
    }

    #[async_trait::async_trait]
    impl KvStore for Gated {
        async fn get(&self, ns: &str, key: &str) -> Result<Option<Versioned>, KvError> {
            self.inner.get(ns, key).await
        }

        async fn commit(&self, ns: &str, txn: &Txn) -> Result<(), KvError> {
            let bytes = commit_bytes(txn, None);
            {
                let mut taking = self.taking.lock().unwrap();
                let (now, most) = taking.entry(ns.to_string()).or_default();
                *now += bytes;
                *most = (*most).max(*now);
            }
            while !self.opened.load(std::sync::atomic::Ordering::SeqCst) {
                let _ = tokio::time::timeout(Duration::from_millis(10), self.open.notified()).await;
            }
            self.taking.lock().unwrap().get_mut(ns).unwrap().0 -= bytes;
            self.inner.commit(ns, txn).await
        }
    }

    fn writing(key: &str, bytes: usize) -> Txn {
        let mut txn = Txn::default();
        txn.set(key, vec![7; bytes]);
        txn
    }

    /// `n` commits of `bytes` each to namespace `ns` at once (keys `k00`, `k01`, ...).
    fn commit_at_once(
        shared: &Arc<Shared>,
        ns: &'static str,
        n: usize,
        bytes: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<(), KvError>>> {
        let commit = |i: usize| {
            let shared = shared.clone();
            tokio::spawn(async move { shared.commit(ns, &writing(&format!("k{i:02}"), bytes)).await })
        };
        (0..n).map(commit).collect()
    }

    /// Commits of `ns` counted waiting for their share.
    fn counted_waiting(shared: &Shared, ns: &str) -> i64 {
        shared.waiting.get_or_create(&PluginLabels { plugin: ns.into() }).get()
    }

    #[tokio::test]
    async fn one_plugins_commits_take_at_most_its_share_of_the_writer_and_others_go_past() {
        let gated = Arc::new(Gated::default());
        let shared = Arc::new(Shared::new(gated.clone()));
        // The attack: 16 commits of 4 MiB each at once (a plugin's `flow.concurrency`).
        let commits = commit_at_once(&shared, "hostile", 16, 4 << 20);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let (now, _) = gated.taking("hostile");
        assert!(now > 0, "no commit of the plugin reached the store");
        let waiting = counted_waiting(&shared, "hostile");
        let in_store = now / commit_bytes(&writing("k00", 4 << 20), None);
        assert_eq!(waiting as u64 + in_store, 16, "the commits waiting for their share are not counted");
        assert!(now <= COMMIT_BYTES_PER_PLUGIN, "the plugin has {now} bytes of commits in the store at once");
        // Another plugin's commit is not behind them: it reaches the store now.
        let other = {
            let shared = shared.clone();
            tokio::spawn(async move { shared.commit("other", &writing("mine", 100)).await })
        };
        tokio::time::timeout(Duration::from_secs(5), async {
            while gated.taking("other").0 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("another plugin's commit waited behind the first plugin's");
        gated.open();
        for c in commits {
            c.await.unwrap().unwrap();
        }
        other.await.unwrap().unwrap();
        assert_eq!(counted_waiting(&shared, "hostile"), 0);
        let (_, most) = gated.taking("hostile");
        assert!(most <= COMMIT_BYTES_PER_PLUGIN, "at most {most} bytes of the plugin's commits were in the store");
        assert_eq!(shared.get("hostile", "k15").await.unwrap().unwrap().value.len(), 4 << 20);
    }

    /// A commit is charged the values its check reads again, each key once: one small write
    /// after reading 8 values of 250 KB was charged as a few bytes (review 48a H1); one value
    /// read 64 times is read once by the check (review 48c L1).
    #[tokio::test]
    async fn a_commit_is_charged_the_values_its_reads_brought() {
        let store = MemoryKv::new();
        store.commit("p", &writing("big", 250_000)).await.unwrap();
        let mut txn = Txn::default();
        for _ in 0..64 {
            txn.get(&store, "p", "big").await.unwrap();
        }
        txn.set("x", b"1".to_vec());
        assert_eq!(txn.read_bytes(), 64 * 250_000);
        assert_eq!(txn.checked_bytes(), 250_000, "its check reads the key once");
        assert!(commit_bytes(&txn, None) >= 250_000, "{}", commit_bytes(&txn, None));
        let mut wide = Txn::default();
        for i in 0..8 {
            store.commit("p", &writing(&format!("k{i}"), 250_000)).await.unwrap();
            wide.get(&store, "p", &format!("k{i}")).await.unwrap();
        }
        assert!(commit_bytes(&wide, None) >= 8 * 250_000, "{}", commit_bytes(&wide, None));
    }

    #[tokio::test]
    async fn small_commits_are_charged_at_least_the_least_so_one_plugin_has_a_bounded_number_in_the_store() {
        let gated = Arc::new(Gated::default());
        let shared = Arc::new(Shared::new(gated.clone()));
        let commits = commit_at_once(&shared, "p", 100, 10);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let one = commit_bytes(&writing("k00", 10), None);
        let most = COMMIT_BYTES_PER_PLUGIN / MIN_COMMIT_CHARGE;
        assert_eq!(gated.taking("p").0, most * one, "not {most} small commits in the store at once");
        gated.open();
        for c in commits {
            c.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn a_commit_larger_than_the_share_goes_alone() {
        let gated = Arc::new(Gated::default());
        let shared = Arc::new(Shared::new(gated.clone()));
        let big = COMMIT_BYTES_PER_PLUGIN as usize + (1 << 20);
        let first = {
            let shared = shared.clone();
            tokio::spawn(async move { shared.commit("p", &writing("big", big)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let second = {
            let shared = shared.clone();
            tokio::spawn(async move { shared.commit("p", &writing("small", 10)).await })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        // In the store: the larger commit, and not the small one beside it.
        assert_eq!(gated.taking("p").0, commit_bytes(&writing("big", big), None));
        gated.open();
        first.await.unwrap().unwrap();
        second.await.unwrap().unwrap();
        assert_eq!(shared.get("p", "small").await.unwrap().unwrap().value, vec![7; 10]);
    }
}
