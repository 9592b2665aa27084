//! Plugin key-value state: the store behind the `kv` import.
//!
//! Every handler attempt works on a [`Txn`]: reads are recorded with the version they saw,
//! writes are buffered. When the handler returns Ok the transaction commits atomically, or
//! fails with a conflict if another event changed a key it read meanwhile; dispatch then runs
//! the handler again. So concurrent events never lose each other's updates, and a failed
//! attempt leaves no trace.

pub mod quota;
pub mod share;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

/// Why a kv operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    /// Another event changed `key` after this attempt read it.
    #[error("kv conflict on key {0:?}")]
    Conflict(String),
    /// The store could not be reached.
    #[error("kv store unavailable: {0}")]
    Unavailable(String),
    /// The commit would take the namespace past its quota (`limits.max_kv_bytes`): the plugin's
    /// own doing, and nothing of it was written.
    #[error(
        "the kv of plugin {ns:?} would hold {would_hold} bytes, over its max_kv_bytes of {limit} (it holds {holds}; \
         each key counts its key, its value and 64 bytes more): nothing of the attempt was written; events that delete \
         keys free room, or limits.max_kv_bytes can be raised and the dead letter replayed"
    )]
    Quota {
        /// The namespace (the plugin).
        ns: String,
        /// What it holds now.
        holds: u64,
        /// What it would hold after the commit.
        would_hold: u64,
        /// Its quota.
        limit: u64,
    },
    /// On NATS: the commit would grow the plugin's JetStream KV bucket past what its quota lets
    /// it hold as the server counts it (`backend::nats::kv_room`): the plugin's own doing, as
    /// [`KvError::Quota`]. Nothing of the attempt was written.
    #[error(
        "the JetStream KV bucket of plugin {ns:?} holds {holds} bytes in {entries} entries, and the attempt's writes \
         would take it past its bound of {bound} bytes or {entry_bound} entries (from its max_kv_bytes of {limit}, as \
         the server counts entries; a deleted key's marker stays a minute): nothing of the attempt was written; \
         events that delete keys free room, or limits.max_kv_bytes can be raised and the dead letter replayed"
    )]
    BucketFull {
        /// The namespace (the plugin).
        ns: String,
        /// The bytes its bucket holds (with commits under way), as the server counts them.
        holds: u64,
        /// The entries it holds.
        entries: u64,
        /// The bytes it may hold.
        bound: u64,
        /// The entries it may hold.
        entry_bound: u64,
        /// Its quota.
        limit: u64,
    },
}

impl KvError {
    /// Whether the plugin's kv is over its quota: the plugin's doing, not the host's.
    pub fn is_quota(&self) -> bool {
        matches!(self, KvError::Quota { .. } | KvError::BucketFull { .. })
    }
}

/// A value and the version it was written at (versions start at 1 and only grow).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned {
    /// The bytes.
    pub value: Vec<u8>,
    /// Its version.
    pub version: u64,
}

/// A namespaced, versioned key-value store.
#[async_trait::async_trait]
pub trait KvStore: Send + Sync {
    /// Reads `key` in namespace `ns`.
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Versioned>, KvError>;
    /// Applies `txn` if none of the keys it read changed since.
    async fn commit(&self, ns: &str, txn: &Txn) -> Result<(), KvError>;

    /// Like [`KvStore::commit`], keeping `outbox` (the attempt's outputs, until its input is
    /// acked) in the same transaction where the store can (the durable embedded bus's log).
    async fn commit_settling(&self, ns: &str, txn: &Txn, outbox: Option<Outbox>) -> Result<(), KvError> {
        let _ = outbox;
        self.commit(ns, txn).await
    }

    /// For a transaction that wrote nothing: whether every key it read is still as it read it,
    /// all at one instant, as a commit checks them (a conflict names a key that changed). A
    /// delete takes a key's version back to 0, so keys checked one by one could each pass at a
    /// different instant and together show a state that never held: by default this is a
    /// commit with nothing to write.
    async fn check_reads(&self, ns: &str, txn: &Txn) -> Result<(), KvError> {
        self.commit(ns, txn).await
    }

    /// The value of `key` (`None` when absent or deleted) and the version a commit checks.
    async fn read(&self, ns: &str, key: &str) -> Result<(Option<Vec<u8>>, u64), KvError> {
        Ok(self.get(ns, key).await?.map_or((None, 0), |v| (Some(v.value), v.version)))
    }
}

/// The outputs of an attempt whose kv writes commit, kept until its input is acked.
#[derive(Debug, Clone)]
pub struct Outbox {
    /// The plugin.
    pub plugin: std::sync::Arc<str>,
    /// The input's sequence number in the transport's log.
    pub seq: u64,
    /// The outputs, as they will be published.
    pub outputs: Vec<std::sync::Arc<crate::event::Event>>,
}

/// What the host charges for one key in a transaction on top of the key's and value's bytes
/// (its map node and allocations): 3,000 empty writes are not free.
pub const ENTRY_COST: u64 = 64;

/// One attempt's reads and buffered writes.
///
/// It counts what it holds ([`Txn::held_bytes`]: keys and values written, keys read, each plus
/// [`ENTRY_COST`]) so the sandbox can bound it per attempt (`limits.max_kv_writes`,
/// `max_kv_reads`, `max_kv_write_bytes`).
#[derive(Debug, Default, Clone)]
pub struct Txn {
    /// Key → version seen (0 = absent).
    pub reads: HashMap<String, u64>,
    /// Key → new value (`None` = delete).
    pub writes: BTreeMap<String, Option<Vec<u8>>>,
    /// Bytes held by `reads` and `writes`, as charged.
    held: u64,
    /// Bytes of values the store gave its reads (a key read again counted again).
    read_bytes: u64,
    /// Bytes of the values of `reads` as first read: what a check of them reads again.
    checked_bytes: u64,
    /// The most the namespace may hold once this commits ([`quota`]; `None`: no bound).
    pub quota: Option<u64>,
}

fn write_cost(key: &str, value: Option<&[u8]>) -> u64 {
    (key.len() + value.map_or(0, <[u8]>::len)) as u64 + ENTRY_COST
}

impl Txn {
    /// An empty transaction whose commit may not take its namespace past `max_kv_bytes`.
    pub fn with_quota(max_kv_bytes: u64) -> Self {
        Self { quota: Some(max_kv_bytes), ..Self::default() }
    }

    /// Reads through the transaction: its own writes first, then the store.
    pub async fn get(&mut self, store: &dyn KvStore, ns: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        if let Some(w) = self.writes.get(key) {
            return Ok(w.clone());
        }
        let (value, version) = store.read(ns, key).await?;
        let value_len = value.as_ref().map_or(0, |v| v.len() as u64);
        self.read_bytes += value_len;
        if !self.reads.contains_key(key) {
            self.checked_bytes += value_len;
            self.held += key.len() as u64 + ENTRY_COST;
            self.reads.insert(key.to_string(), version);
        }
        Ok(value)
    }

    /// Buffers a write.
    pub fn set(&mut self, key: &str, value: Vec<u8>) {
        self.held = self.held_after_write(key, Some(value.len()));
        self.writes.insert(key.to_string(), Some(value));
    }

    /// Buffers a delete.
    pub fn delete(&mut self, key: &str) {
        self.held = self.held_after_write(key, None);
        self.writes.insert(key.to_string(), None);
    }

    /// Whether the transaction wrote anything.
    pub fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    /// The bytes this transaction holds: keys and values written, keys read, each plus
    /// [`ENTRY_COST`].
    pub fn held_bytes(&self) -> u64 {
        self.held
    }

    /// The bytes of values the store gave this transaction's reads (a key read again counted
    /// again; its own writes read back not counted): bounded per attempt by
    /// `max_kv_read_bytes`.
    pub fn read_bytes(&self) -> u64 {
        self.read_bytes
    }

    /// The bytes of the values of the keys it read, each as first read: what its commit's check
    /// reads again (each key once), charged to the commit.
    pub fn checked_bytes(&self) -> u64 {
        self.checked_bytes
    }

    /// What [`Txn::held_bytes`] would be after writing `value_len` bytes (`None`: a delete)
    /// under `key` (a rewrite of a key replaces its old value).
    pub fn held_after_write(&self, key: &str, value_len: Option<usize>) -> u64 {
        let old = self.writes.get(key).map_or(0, |v| write_cost(key, v.as_deref()));
        self.held - old + (key.len() + value_len.unwrap_or(0)) as u64 + ENTRY_COST
    }

    /// Whether a [`Txn::get`] of `key` would read the store and add a key to `reads`.
    pub fn would_read(&self, key: &str) -> bool {
        !self.writes.contains_key(key) && !self.reads.contains_key(key)
    }
}

/// The in-memory store (state is lost on restart).
#[derive(Default)]
pub struct MemoryKv {
    data: Mutex<HashMap<(String, String), Versioned>>,
    clock: Mutex<u64>,
    /// Namespace → what its entries count against its quota.
    usage: Mutex<HashMap<String, u64>>,
}

impl MemoryKv {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

#[async_trait::async_trait]
impl KvStore for MemoryKv {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Versioned>, KvError> {
        let data = self.data.lock().map_err(|_| KvError::Unavailable("poisoned".into()))?;
        Ok(data.get(&(ns.to_string(), key.to_string())).cloned())
    }

    async fn commit(&self, ns: &str, txn: &Txn) -> Result<(), KvError> {
        let mut data = self.data.lock().map_err(|_| KvError::Unavailable("poisoned".into()))?;
        for (key, seen) in &txn.reads {
            let now = data.get(&(ns.to_string(), key.clone())).map_or(0, |v| v.version);
            if now != *seen {
                return Err(KvError::Conflict(key.clone()));
            }
        }
        let mut usage = self.usage.lock().map_err(|_| KvError::Unavailable("poisoned".into()))?;
        let holds = usage.get(ns).copied().unwrap_or(0);
        let after =
            quota::after(holds, txn, |key| Ok(data.get(&(ns.to_string(), key.to_string())).map(|v| v.value.len())))?;
        quota::check(ns, txn, holds, after)?;
        usage.insert(ns.to_string(), after);
        let mut clock = self.clock.lock().map_err(|_| KvError::Unavailable("poisoned".into()))?;
        *clock += 1;
        for (key, value) in &txn.writes {
            let k = (ns.to_string(), key.clone());
            match value {
                Some(v) => {
                    data.insert(k, Versioned { value: v.clone(), version: *clock });
                }
                None => {
                    data.remove(&k);
                }
            }
        }
        Ok(())
    }
}

/// The persistent store of the embedded default: one redb file in the data dir.
///
/// redb is a pure-Rust, ACID, copy-on-write B-tree in one file: crash-safe commits without a
/// server, which is what plugin state on a single box needs.
///
/// A commit waits for redb's one write transaction, and its `fsync`, on a blocking thread,
/// never on one of the runtime's; commits take turns before they take one (a blocking thread
/// each, waiting on redb's writer, would fill the pool the dead-letter store and file reads use).
pub struct RedbKv {
    /// Opened again after a failed commit (redb refuses every write of a handle once one
    /// failed), at most once a second.
    db: std::sync::Arc<crate::redb_handle::ReopeningDb>,
    /// Held by the commit on its blocking thread (moved there: a caller that stops waiting
    /// does not give it back while the commit goes on).
    turn: std::sync::Arc<tokio::sync::Mutex<()>>,
}

const DATA: redb::TableDefinition<&str, &[u8]> = redb::TableDefinition::new("kv");
const META: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("meta");

fn unavailable(e: impl std::fmt::Display) -> KvError {
    KvError::Unavailable(e.to_string())
}

fn db_key(ns: &str, key: &str) -> String {
    format!("{ns}\u{0}{key}")
}

fn decode(stored: &[u8]) -> Versioned {
    let (version, value) = stored.split_at(8.min(stored.len()));
    Versioned { value: value.to_vec(), version: u64::from_be_bytes(version.try_into().unwrap_or([0; 8])) }
}

/// The page cache of `kv.redb`: what the host keeps in memory of the plugins' kv, whatever they
/// wrote (as the event log's, `log::LOG_CACHE_BYTES`).
const KV_CACHE_BYTES: usize = 32 << 20;

impl RedbKv {
    /// Opens (or creates) the store at `path`.
    pub fn open(path: &std::path::Path) -> Result<Self, KvError> {
        if let Some(dir) = path.parent() {
            crate::private_files::create_folder(dir).map_err(unavailable)?;
        }
        let handle = crate::redb_handle::ReopeningDb::open(path, KV_CACHE_BYTES, "with the plugins' kv empty")
            .map_err(|e| unavailable(format!("{}: {e}", path.display())))?;
        let db = handle.current().expect("just opened");
        let txn = db.begin_write().map_err(unavailable)?;
        txn.open_table(DATA).map_err(unavailable)?;
        txn.open_table(META).map_err(unavailable)?;
        quota::recount_if_stale(&txn, DATA, META, "clock").map_err(unavailable)?;
        txn.commit().map_err(unavailable)?;
        drop(db);
        Ok(Self { db: std::sync::Arc::new(handle), turn: Default::default() })
    }

    /// The database to read: the one open (after a failed commit it still reads), or, when
    /// none is (opening it again failed), opened again off the runtime, in the commits' turn.
    async fn for_read(&self) -> Result<std::sync::Arc<redb::Database>, KvError> {
        if let Some(db) = self.db.current() {
            return Ok(db);
        }
        let turn = self.turn.clone().lock_owned().await;
        let handle = self.db.clone();
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            handle.for_read().map_err(unavailable)
        })
        .await
        .map_err(|e| unavailable(format!("opening kv.redb again did not finish: {e}")))?
    }

    /// Every entry, as (`ns\0key`, value and version): to move the store into another.
    pub fn export(&self) -> Result<Vec<(String, Versioned)>, KvError> {
        use redb::{ReadableDatabase, ReadableTable};
        let r = self.db.for_read().map_err(unavailable)?.begin_read().map_err(unavailable)?;
        let table = r.open_table(DATA).map_err(unavailable)?;
        let mut out = Vec::new();
        for row in table.iter().map_err(unavailable)? {
            let (k, v) = row.map_err(unavailable)?;
            out.push((k.value().to_string(), decode(v.value())));
        }
        Ok(out)
    }
}

#[async_trait::async_trait]
impl KvStore for RedbKv {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Versioned>, KvError> {
        use redb::ReadableDatabase;
        let txn = self.for_read().await?.begin_read().map_err(unavailable)?;
        let table = txn.open_table(DATA).map_err(unavailable)?;
        Ok(table.get(db_key(ns, key).as_str()).map_err(unavailable)?.map(|v| decode(v.value())))
    }

    async fn commit(&self, ns: &str, txn: &Txn) -> Result<(), KvError> {
        let turn = self.turn.clone().lock_owned().await;
        let (handle, ns, txn) = (self.db.clone(), ns.to_string(), txn.clone());
        tokio::task::spawn_blocking(move || {
            let _turn = turn;
            let db = handle.for_write().map_err(unavailable)?;
            let committed = redb_commit(&db, &ns, &txn);
            if let Err(KvError::Unavailable(_)) = &committed {
                // Opened again (at its last durable commit) before the next commit.
                handle.failed();
            }
            committed
        })
        .await
        .map_err(|e| unavailable(format!("the kv commit did not finish: {e}")))?
    }
}

/// Commits `txn` in namespace `ns` of `db`, waiting for its writer (blocking).
fn redb_commit(db: &redb::Database, ns: &str, txn: &Txn) -> Result<(), KvError> {
    use redb::ReadableTable;
    // redb has one writer at a time: checking the reads and writing happen atomically.
    let w = db.begin_write().map_err(unavailable)?;
    {
        let mut data = w.open_table(DATA).map_err(unavailable)?;
        for (key, seen) in &txn.reads {
            let now = data.get(db_key(ns, key).as_str()).map_err(unavailable)?.map_or(0, |v| decode(v.value()).version);
            if now != *seen {
                return Err(KvError::Conflict(key.clone()));
            }
        }
        let mut usage = w.open_table(quota::USAGE).map_err(unavailable)?;
        quota::charge(&mut usage, ns, txn, |key| {
            Ok(data.get(db_key(ns, key).as_str()).map_err(unavailable)?.map(|v| quota::value_len(v.value())))
        })?;
        let mut meta = w.open_table(META).map_err(unavailable)?;
        let clock = meta.get("clock").map_err(unavailable)?.map_or(0, |v| v.value());
        if clock >= 1 << 63 {
            // Damage: no file counts this far, and a clock that wraps passes stale read checks.
            return Err(KvError::Unavailable(format!(
                "kv.redb is damaged: its clock ({clock}) is past any a file reaches"
            )));
        }
        let clock = clock + 1;
        meta.insert("clock", clock).map_err(unavailable)?;
        quota::counted_at(&mut meta, clock).map_err(unavailable)?;
        for (key, value) in &txn.writes {
            let k = db_key(ns, key);
            match value {
                Some(v) => {
                    let mut stored = clock.to_be_bytes().to_vec();
                    stored.extend_from_slice(v);
                    data.insert(k.as_str(), stored.as_slice()).map_err(unavailable)?;
                }
                None => {
                    data.remove(k.as_str()).map_err(unavailable)?;
                }
            }
        }
    }
    w.commit().map_err(unavailable)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::time::Duration;

    /// The attack on a read-only handler: it reads `a`, another event moves 1 from `a` to
    /// `b`, it reads `b` and publishes the sum, one too many. With no writes it used to commit
    /// nothing and so check nothing.
    #[tokio::test]
    async fn a_transaction_that_only_read_is_checked_too() {
        read_only_is_checked(&MemoryKv::new()).await;
    }

    /// Review 59c L1: a clock at `u64::MAX` in `kv.redb` (a damaged or hostile file) overflowed
    /// at the next commit (a panic in a debug build; in a release one versions from 0 again,
    /// which pass stale read checks). Now the commit fails, naming the damage.
    #[tokio::test]
    async fn a_clock_past_any_count_fails_the_commit_naming_the_damage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        drop(RedbKv::open(&path).unwrap());
        {
            let db = redb::Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(META).unwrap().insert("clock", u64::MAX).unwrap();
            w.commit().unwrap();
        }
        let kv = RedbKv::open(&path).unwrap();
        let mut txn = Txn::default();
        txn.set("k", b"v".to_vec());
        let e = kv.commit("p", &txn).await.unwrap_err();
        assert!(matches!(&e, KvError::Unavailable(why) if why.contains("damaged")), "{e:?}");
    }

    /// See [`a_transaction_that_only_read_is_checked_too`]; every store runs it.
    pub(crate) async fn read_only_is_checked(kv: &dyn KvStore) {
        let mut seed = Txn::default();
        seed.set("a", b"5".to_vec());
        seed.set("b", b"5".to_vec());
        kv.commit("p", &seed).await.unwrap();
        let mut reader = Txn::default();
        reader.get(kv, "p", "a").await.unwrap();
        let mut mover = Txn::default();
        mover.get(kv, "p", "a").await.unwrap();
        mover.set("a", b"4".to_vec());
        mover.set("b", b"6".to_vec());
        kv.commit("p", &mover).await.unwrap();
        reader.get(kv, "p", "b").await.unwrap();
        assert!(reader.is_empty(), "it wrote nothing");
        assert_eq!(kv.check_reads("p", &reader).await, Err(KvError::Conflict("a".into())));
        let mut again = Txn::default();
        again.get(kv, "p", "a").await.unwrap();
        again.get(kv, "p", "b").await.unwrap();
        again.get(kv, "p", "absent").await.unwrap();
        assert_eq!(kv.check_reads("p", &again).await, Ok(()));
    }

    /// A namespace's quota on `kv` (empty): a commit past it fails whole; a rewrite counts its
    /// new size only; namespaces count apart; over a lowered quota, growing fails and shrinking
    /// or deleting passes. Leaves `q` holding 165 bytes (one key of 100 bytes).
    pub(crate) async fn quota_holds(kv: &dyn KvStore) {
        let quota = |limit: u64, writes: &[(&str, Option<usize>)]| {
            let mut t = Txn::with_quota(limit);
            for (key, value) in writes {
                match value {
                    Some(n) => t.set(key, vec![7; *n]),
                    None => t.delete(key),
                }
            }
            t
        };
        // "a" + 100 bytes + 64 = 165
        kv.commit("p", &quota(300, &[("a", Some(100))])).await.unwrap();
        let refused = kv.commit("p", &quota(300, &[("b", Some(100)), ("c", Some(1))])).await;
        assert_eq!(refused, Err(KvError::Quota { ns: "p".into(), holds: 165, would_hold: 165 + 165 + 66, limit: 300 }));
        assert!(kv.get("p", "c").await.unwrap().is_none(), "refused whole");
        assert!(refused.unwrap_err().to_string().contains("over its max_kv_bytes of 300"));
        // a rewrite replaces what the key held: 265
        kv.commit("p", &quota(300, &[("a", Some(200))])).await.unwrap();
        kv.commit("q", &quota(300, &[("b", Some(100))])).await.unwrap();
        // lowered to 100: 215 passes (it shrinks), one more key does not, a delete does
        kv.commit("p", &quota(100, &[("a", Some(150))])).await.unwrap();
        assert!(matches!(kv.commit("p", &quota(100, &[("z", Some(0))])).await, Err(KvError::Quota { holds: 215, .. })));
        kv.commit("p", &quota(100, &[("a", None)])).await.unwrap();
        kv.commit("p", &quota(100, &[("z", Some(30))])).await.unwrap();
        assert_eq!(kv.get("p", "z").await.unwrap().unwrap().value.len(), 30);
    }

    /// That `kv` counts `q` as holding `holds` bytes: a commit of one byte more than is left fails.
    pub(crate) async fn quota_counts(kv: &dyn KvStore, holds: u64) {
        // A key of its own: 8 + 29 + 64 = 101, one byte over.
        let key = format!("{holds:08}");
        let mut t = Txn::with_quota(holds + 100);
        t.set(&key, vec![7; 29]);
        assert!(
            matches!(kv.commit("q", &t).await, Err(KvError::Quota { holds: h, .. }) if h == holds),
            "q holds {holds}"
        );
        let mut t = Txn::with_quota(holds + 100);
        t.set(&key, vec![7; 28]);
        kv.commit("q", &t).await.unwrap();
    }

    /// A plugin writing its quota into `kv.redb` (the in-memory bus's store) and reading it
    /// back pins at most the store's page cache in the host's memory, not all it wrote (redb's
    /// default cache is 1 GiB).
    #[tokio::test]
    async fn kv_redb_holds_a_bounded_cache_whatever_a_plugin_wrote() {
        use redb::ReadableDatabase;
        let dir = tempfile::tempdir().unwrap();
        let kv = RedbKv::open(&dir.path().join("kv.redb")).unwrap();
        for round in 0..3 {
            let mut t = Txn::default();
            for i in 0..4096 {
                t.set(&format!("k{round}-{i}"), vec![round as u8; 4 << 10]);
            }
            kv.commit("hostile", &t).await.unwrap();
        }
        for round in 0..3 {
            for i in 0..4096 {
                assert!(kv.get("hostile", &format!("k{round}-{i}")).await.unwrap().is_some());
            }
        }
        let cached = kv.db.current().unwrap().cache_stats().used_bytes();
        assert!(cached <= KV_CACHE_BYTES + (1 << 20), "{cached} bytes cached of the 48 MiB written");
    }

    #[tokio::test]
    async fn the_memory_store_keeps_each_namespace_under_its_quota() {
        let kv = MemoryKv::new();
        quota_holds(&kv).await;
        quota_counts(&kv, 165).await;
    }

    #[tokio::test]
    async fn the_redb_store_keeps_its_quota_counts_across_a_reopen_and_counts_an_older_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        quota_holds(&RedbKv::open(&path).unwrap()).await;
        quota_counts(&RedbKv::open(&path).unwrap(), 165).await;
        // a file written before quotas: counted once at open
        let old = dir.path().join("old.redb");
        {
            let db = redb::Database::create(&old).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(DATA).unwrap().insert("q\u{0}b", [0u8; 108].as_slice()).unwrap();
            w.commit().unwrap();
        }
        quota_counts(&RedbKv::open(&old).unwrap(), 165).await;
    }

    #[tokio::test]
    async fn redb_store_persists_and_detects_conflicts() {
        let dir = std::env::temp_dir().join(format!("plugbus-kv-{}", std::process::id()));
        let path = dir.join("kv.redb");
        {
            let kv = RedbKv::open(&path).unwrap();
            let mut a = Txn::default();
            let mut b = Txn::default();
            assert_eq!(a.get(&kv, "p", "n").await.unwrap(), None);
            assert_eq!(b.get(&kv, "p", "n").await.unwrap(), None);
            a.set("n", b"1".to_vec());
            b.set("n", b"2".to_vec());
            kv.commit("p", &a).await.unwrap();
            assert_eq!(kv.commit("p", &b).await, Err(KvError::Conflict("n".into())));
        }
        let kv = RedbKv::open(&path).unwrap();
        assert_eq!(kv.get("p", "n").await.unwrap().unwrap().value, b"1");
        assert!(kv.get("q", "n").await.unwrap().is_none());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A commit to `kv.redb` waits for redb's one write transaction (another plugin's 16 MiB and
    /// its `fsync`) off the runtime's threads: it used to wait on one, and with two plugins
    /// committing both of a two-core host's threads stopped (the API, every other plugin).
    #[tokio::test(flavor = "current_thread")]
    async fn a_redb_commit_waiting_for_the_writer_leaves_the_runtime_running() {
        let dir = tempfile::tempdir().unwrap();
        let kv = std::sync::Arc::new(RedbKv::open(&dir.path().join("kv.redb")).unwrap());
        let db = kv.db.current().unwrap();
        let committing = kv.clone();
        let commit = async move {
            let mut txn = Txn::default();
            txn.set("n", b"1".to_vec());
            committing.commit("p", &txn).await.unwrap();
        };
        let ran = crate::test_support::runtime_runs_while_held(move || db.begin_write().unwrap(), commit).await;
        assert!(ran, "the runtime's one thread waited for redb's writer");
        assert_eq!(kv.get("p", "n").await.unwrap().unwrap().value, b"1");
    }

    /// The attack: a full disk fails one commit of `kv.redb` (with `bus.durable = false`); redb
    /// then refuses every later write of that handle (`PreviousIo`), so every kv commit of every
    /// plugin failed, and every delivery of a plugin using kv was dead-lettered, until a restart.
    /// Now the store is opened again after a failed commit, and takes commits once there is room.
    #[tokio::test]
    async fn a_kv_store_whose_commit_failed_takes_commits_again_once_there_is_room() {
        use crate::backend::embedded::log::tests::{Tmpfs, fill_up};
        let Some(disk) = Tmpfs::mount(16) else { return };
        let kv = RedbKv::open(&disk.0.path().join("kv.redb")).unwrap();
        let set = |key: &str, len: usize| {
            let mut txn = Txn::default();
            txn.set(key, vec![7u8; len]);
            txn
        };
        kv.commit("p", &set("before", 10)).await.unwrap();
        let filler = fill_up(disk.0.path());
        let full = kv.commit("p", &set("while-full", 1 << 20)).await;
        assert!(matches!(full, Err(KvError::Unavailable(_))), "{full:?}");
        assert_eq!(kv.get("p", "before").await.unwrap().unwrap().value.len(), 10, "it reads meanwhile");
        std::fs::remove_file(filler).unwrap();
        kv.commit("p", &set("after", 10)).await.expect("a commit once there is room again");
        assert_eq!(kv.get("p", "after").await.unwrap().unwrap().value.len(), 10);
        assert_eq!(kv.get("p", "before").await.unwrap().unwrap().value.len(), 10);
        assert_eq!(kv.get("p", "while-full").await.unwrap(), None);
        // Closed (opening it again failed while the disk was full): a read opens it, not only
        // a commit (a handler reads before it writes; a read-only one never commits).
        kv.db.close();
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(kv.get("p", "after").await.unwrap().unwrap().value.len(), 10, "a read opens it again");
    }

    /// A damaged `kv.redb` stops the start, saying what to do (it used to name only the error).
    #[test]
    fn a_damaged_kv_file_is_named_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let Err(e) = RedbKv::open(&path) else { panic!("a damaged file opened") };
        let e = e.to_string();
        assert!(e.contains("kv.redb") && e.contains("move it aside"), "{e}");
        // One the host cannot open is not called damaged (review 55a 5).
        let other = dir.path().join("other.redb");
        std::fs::create_dir(&other).unwrap();
        let Err(e) = RedbKv::open(&other) else { panic!("a folder opened") };
        let e = e.to_string();
        assert!(e.contains("an I/O error, not damage") && !e.contains("move it aside"), "{e}");
    }

    #[tokio::test]
    async fn commit_detects_a_concurrent_change() {
        let kv = MemoryKv::new();
        let mut a = Txn::default();
        let mut b = Txn::default();
        assert_eq!(a.get(&kv, "p", "n").await.unwrap(), None);
        assert_eq!(b.get(&kv, "p", "n").await.unwrap(), None);
        a.set("n", b"1".to_vec());
        b.set("n", b"1".to_vec());
        kv.commit("p", &a).await.unwrap();
        assert_eq!(kv.commit("p", &b).await, Err(KvError::Conflict("n".into())));
        assert_eq!(kv.get("p", "n").await.unwrap().unwrap().value, b"1");
    }

    #[tokio::test]
    async fn namespaces_are_separate_and_reads_see_own_writes() {
        let kv = MemoryKv::new();
        let mut t = Txn::default();
        t.set("k", b"v".to_vec());
        assert_eq!(t.get(&kv, "p", "k").await.unwrap(), Some(b"v".to_vec()));
        kv.commit("p", &t).await.unwrap();
        assert!(kv.get("q", "k").await.unwrap().is_none());
        let mut d = Txn::default();
        d.delete("k");
        kv.commit("p", &d).await.unwrap();
        assert!(kv.get("p", "k").await.unwrap().is_none());
    }

    #[tokio::test]
    async fn a_transaction_counts_what_it_holds_per_entry() {
        let kv = MemoryKv::new();
        let mut t = Txn::default();
        t.set("k", vec![0; 10]);
        assert_eq!(t.held_bytes(), 11 + ENTRY_COST);
        t.set("k", vec![0; 100]); // a rewrite replaces, not adds
        assert_eq!(t.held_bytes(), 101 + ENTRY_COST);
        t.delete("k");
        assert_eq!(t.held_bytes(), 1 + ENTRY_COST);
        for i in 0..1000 {
            t.set(&format!("{i:04}"), Vec::new()); // empty writes are not free
        }
        assert_eq!(t.held_bytes(), 1 + ENTRY_COST + 1000 * (4 + ENTRY_COST));
        let before = t.held_bytes();
        assert!(t.would_read("r"));
        t.get(&kv, "p", "r").await.unwrap();
        t.get(&kv, "p", "r").await.unwrap(); // read once, charged once
        assert_eq!(t.held_bytes(), before + 1 + ENTRY_COST);
        assert!(!t.would_read("r") && !t.would_read("0001"));
        assert_eq!(t.held_after_write("0001", Some(5)), t.held_bytes() + 5);
    }
}
