//! The embedded bus's durable log: every accepted event in a redb file in `data_dir`, and for
//! each plugin the deliveries it has not settled yet. An event is appended (and, with
//! `bus.sync = "always"`, on disk) before `publish` returns, so a `202` survives `kill -9`; after
//! a restart every unsettled delivery runs again.
//!
//! One writer thread owns every write: appends and acks queue up while a commit is in progress
//! and go into the next commit together (group commit: one `fsync` per batch, not per event).
//! A batch of acks alone is committed without `fsync` (a lost ack is a redelivery, never a
//! loss). Outputs are deduplicated by (source, id): a handler re-run after a crash publishes
//! outputs with the same ids, and the log keeps the first.

use super::retired_ids::{self, RetiredIds};
use super::rows::{self, Lookup, LookupError, ROWS, RowBuilder};
use crate::event::Event;
use crate::kv::Outbox;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc as std_mpsc;
use tokio::sync::oneshot;

/// (plugin, seq) → (): a delivery not settled yet.
const PENDING: TableDefinition<(&str, u64), ()> = TableDefinition::new("pending");
/// "source\0id" → seq, for outputs: a re-published output is kept once.
const IDS: TableDefinition<&str, u64> = TableDefinition::new("ids");
/// plugin → the sequence number when it first subscribed (a plugin not here is new to the log).
const SUBSCRIBERS: TableDefinition<&str, u64> = TableDefinition::new("subscribers");
/// plugin → (first, end) sequence numbers of the `deliver = "all"` history still to make
/// pending for it: written with the subscriber and each step of its history, removed with the
/// last step, so a crash between two steps resumes at its next subscription; retention keeps
/// the range meanwhile.
const HISTORY_DUE: TableDefinition<&str, (u64, u64)> = TableDefinition::new("history_due");
/// plugin → the first sequence number accepted while it had no subscription (its file removed
/// or refused, a host stopped), for a known plugin away since: set when its last subscription
/// drops and, for every known plugin, at open; taken by its next registration, which makes a
/// durable plugin's matching events of `[away, next)` pending (as its history: `HISTORY_DUE`),
/// so a durable subscription resumes where it left off, as a JetStream durable consumer does
/// (review 63a F2: a plugin refused at a start for a transient reason never got what was
/// accepted until it loaded).
const AWAY: TableDefinition<&str, u64> = TableDefinition::new("away");
/// "ns\0key" → version (u64 LE) then the value: plugin kv, in the same file as the log so a
/// handler's kv writes commit together with its outbox.
const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
/// (plugin, input seq) → the input's outputs (u32 count, then u32 length + record each): written
/// in the transaction that commits the attempt's kv writes, removed with the input's ack. An
/// unsettled input found here at start is not run again: its outputs are released.
const OUTBOX: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("outbox");
/// An old table (how many plugins still owed each event), deleted at open: `pending` says.
const REFS: TableDefinition<u64, u32> = TableDefinition::new("refs");
/// "next_seq" → the next sequence number; "bytes" → the bytes of the records kept.
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// redb's page cache for the log: what the host holds in memory for it, whatever its size on disk.
const LOG_CACHE_BYTES: usize = 32 << 20;

/// The most operations one commit takes.
const MAX_BATCH: usize = 4096;
/// The most bytes of kv writes (and their outboxes) one commit takes, one kv commit over it
/// alone: the others wait for the next commits, in the order they came, while every append, ack
/// and smaller kv commit goes into the next commit at once. One plugin writing 16 MiB of kv per
/// event put 16 such commits and their `fsync` ahead of every other plugin's acks and every
/// producer's `202` (on a slow disk, `503` past `api.publish_timeout`).
const BATCH_KV_BYTES: u64 = 8 << 20;
/// How many records one step of a replay's backfill reads at most: a long history is made
/// pending in steps, each in its own commit, so the appends and acks of every plugin go through
/// between them instead of waiting for the whole log to be read.
/// (64 in tests, so they take several steps.)
const BACKFILL_STEP_RECORDS: usize = if cfg!(test) { 64 } else { 16_384 };
/// How many times a step of a new plugin's history that failed to commit is tried again (waits
/// of 50 ms more each time: about a minute in all).
const HISTORY_STEP_TRIES: u32 = 48;
/// And how many bytes of records: 16,384 events of up to 1 MiB each would be the whole log.
/// (256 KiB in tests.)
const BACKFILL_STEP_BYTES: usize = if cfg!(test) { 256 << 10 } else { 16 << 20 };

/// The most bytes commits kept only in memory may hold (their copies are kept to be applied
/// again after a failed write): past it the next commit is durable, whatever `bus.sync` says.
const IN_MEMORY_BYTES: u64 = 32 << 20;
/// What handler outputs sent to the writer and not committed yet may hold before publishers of
/// new ones wait ([`DurableLog::room_for_outputs`]): while the disk stays full (each commit
/// fails and they are kept to commit again) or the writer falls far behind, plugins that feed
/// each other would otherwise grow them without bound.
const UNWRITTEN_OUTPUT_BYTES: u64 = 32 << 20;

/// Handler outputs sent to the writer and not committed yet ([`UNWRITTEN_OUTPUT_BYTES`]).
struct Unwritten {
    /// Their bytes (as [`append_cost`] counts them): added when one is sent, taken off by the
    /// first commit that holds it.
    bytes: std::sync::atomic::AtomicU64,
    /// Woken when commits take `bytes` below the bound.
    fell: tokio::sync::Notify,
    /// `plugbus_log_unwritten_output_bytes`.
    gauge: Gauge,
    /// The writer is gone: nothing will take them below the bound any more (publishers then
    /// go on, and their sends fail as `Closed`).
    closed: std::sync::atomic::AtomicBool,
}

impl Unwritten {
    fn new(gauge: Gauge) -> Self {
        Self { bytes: 0.into(), fell: tokio::sync::Notify::new(), gauge, closed: false.into() }
    }

    /// `bytes` more are sent.
    fn add(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Relaxed);
        self.gauge.inc_by(bytes as i64);
    }

    /// `bytes` of them are committed (or were never sent); wakes waiting publishers when that
    /// takes them below the bound.
    fn written(&self, bytes: u64) {
        if bytes == 0 {
            return;
        }
        let sub = |b: u64| Some(b.saturating_sub(bytes));
        let before = self.bytes.fetch_update(Relaxed, Relaxed, sub).unwrap_or_default();
        let after = before.saturating_sub(bytes);
        self.gauge.dec_by((before - after) as i64);
        if before >= UNWRITTEN_OUTPUT_BYTES && after < UNWRITTEN_OUTPUT_BYTES {
            self.fell.notify_waiters();
        }
    }
}

/// When an append is on disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SyncPolicy {
    /// Every commit is `fsync`ed before the events in it are acknowledged (appends waiting at the
    /// same time share one commit). Nothing acknowledged is lost, even on power loss. Commits of
    /// acks alone are `fsync`ed at most every 100 ms: a crash may run again a delivery settled
    /// in the last 100 ms (never lose one).
    #[default]
    Always,
    /// Commits reach the OS at once and are `fsync`ed at most every 100 ms: a process crash may
    /// lose acknowledged events written since the last `fsync` (redb keeps unsynced commits in
    /// its own cache), a power loss too.
    Batch,
    /// `fsync` at most every 5 s (and when the bus is idle, once 32 MiB of commits wait in
    /// memory, and at a clean stop): fastest; a crash may lose what was acknowledged in the
    /// last 5 s. (Never syncing at all would also keep redb from reusing freed pages: the file
    /// would only grow.)
    None,
}

/// `[bus]`: the embedded bus.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusSettings {
    /// Which backend: `embedded` or `nats` (unset: `nats` when `nats.url` is set).
    pub kind: Option<crate::backend::BusKind>,
    /// Keep accepted events in `data_dir/bus.redb` until every plugin settled them (a `202`
    /// survives `kill -9`). Off: in memory only, lost if the process dies.
    pub durable: bool,
    /// When an append is on disk: `always` (default), `batch` or `none`.
    pub sync: SyncPolicy,
    /// How much history the log keeps for replays.
    pub retention: Retention,
}

impl Default for BusSettings {
    fn default() -> Self {
        Self { kind: None, durable: true, sync: SyncPolicy::Always, retention: Retention::default() }
    }
}

/// `[bus.retention]`: settled events older than `max_age`, or the oldest settled ones beyond
/// `max_mib`, are dropped from the log (logged and counted). An event some plugin has not
/// settled is never dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Keep settled events this long (`"7d"`, `"12h"`).
    #[serde(with = "humantime_serde")]
    pub max_age: std::time::Duration,
    /// Keep at most this many MiB of records.
    pub max_mib: u64,
}

impl Default for Retention {
    fn default() -> Self {
        Self { max_age: std::time::Duration::from_secs(7 * 24 * 3600), max_mib: 1024 }
    }
}

/// Why the log failed.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    /// The file could not be opened: damaged, not a log, or an I/O error (`why` says which, and
    /// what to do: [`crate::redb_handle::open_failure`]).
    #[error("the event log {path} cannot be opened: {why}")]
    Open {
        /// The file.
        path: PathBuf,
        /// What redb said.
        why: String,
    },
    /// Another process (or host) has the log open.
    #[error("the event log {path} is in use: is another plugbus running with this data_dir?")]
    InUse {
        /// The file.
        path: PathBuf,
    },
    /// A write or read failed (a full disk, an I/O error).
    #[error("the event log {path} failed: {why}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What failed.
        why: String,
    },
    /// An append whose commit reported a failure after it reached the file (its `fsync` may be
    /// what failed): the event is in the log (`seq`), but nothing says it is on disk.
    #[error(
        "the event log {path} failed: {why} (the commit reached the file but may not be on disk: the event is kept as seq {seq} and delivered; sent again, it is kept twice)"
    )]
    NotOnDisk {
        /// The file.
        path: PathBuf,
        /// Where the event is in the log.
        seq: u64,
        /// What failed.
        why: String,
    },
    /// A stored record could not be read back.
    #[error("the event log {path} holds a record that cannot be read (seq {seq}): {why}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The record.
        seq: u64,
        /// What was wrong.
        why: String,
    },
    /// The writer thread is gone (the host is stopping).
    #[error("the event log is closed")]
    Closed,
}

/// What [`DurableLog::import_kv`] did with another store's kv.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvImport {
    /// Took in this many entries: the log had never committed kv.
    Moved(usize),
    /// Took in nothing: the same entries were taken in before (the host stopped before it
    /// renamed their file).
    MovedBefore,
    /// Took in none of this many entries: the log holds kv of its own (it committed kv before,
    /// deletes included). Merging the two key by key could make a state no handler committed
    /// (one key of a transaction from each store, a key the log deleted brought back).
    LeftOut(usize),
}

/// Every plugin the log knows is away from `next_seq` until it subscribes again (`AWAY`; an
/// earlier mark is kept): none has a subscription while the log opens.
fn mark_known_plugins_away(db: &Database, next_seq: u64) -> Result<(), String> {
    let w = db.begin_write().map_err(|e| e.to_string())?;
    {
        let subscribers = w.open_table(SUBSCRIBERS).map_err(|e| e.to_string())?;
        let mut away = w.open_table(AWAY).map_err(|e| e.to_string())?;
        for row in subscribers.iter().map_err(|e| e.to_string())? {
            let (plugin, _) = row.map_err(|e| e.to_string())?;
            if away.get(plugin.value()).map_err(|e| e.to_string())?.is_none() {
                away.insert(plugin.value(), next_seq).map_err(|e| e.to_string())?;
            }
        }
    }
    w.commit().map_err(|e| e.to_string())
}

/// The `meta` row keeping the digest of the last kv taken in ([`DurableLog::import_kv`]).
const KV_IMPORTED: &str = "kv_imported";

enum Op {
    Append {
        seq: u64,
        event: Arc<Event>,
        plugins: Vec<Arc<str>>,
        dedupe: bool,
        /// `None`: nobody waits (a handler's output: the ack of its input comes later on the same
        /// channel, so it never commits before the output).
        done: Option<oneshot::Sender<Result<Appended, LogError>>>,
        /// When it was first appended (unix ms), for an append done again after a failed write
        /// (see [`KeptInMemory`]): its record keeps its time, which replays and retention read.
        appended_ms: Option<u64>,
    },
    Ack {
        plugin: Arc<str>,
        seq: u64,
        /// `Some(since_ms)`: only its outbox goes, and it stays pending for the replay's
        /// read-back if it was appended at `since_ms` or later (a delivery a replay's history
        /// includes, taken before the replay began: [`DurableLog::ack_for_replay`]).
        keep_pending: Option<u64>,
    },
    Sync {
        done: oneshot::Sender<Result<(), LogError>>,
    },
    /// Commits a kv transaction if no key it read changed, and with it the attempt's outbox.
    KvCommit {
        ns: Arc<str>,
        txn: crate::kv::Txn,
        outbox: Option<Outbox>,
        /// `None`: a commit answered before, applied again after a failed write threw it
        /// away (see `kv_replay`): applied as it was, without checking its reads.
        done: Option<oneshot::Sender<Result<(), crate::kv::KvError>>>,
    },
    /// Records `plugin` as a subscriber, and a new one's history (`deliver_all`: the first step
    /// of it, in the same commit); a durable one (`matches`: its patterns) away since an earlier
    /// subscription gets what was accepted meanwhile as history; answers what it did.
    Register {
        plugin: Arc<str>,
        matches: Option<SubjectMatcher>,
        deliver_all: bool,
        done: oneshot::Sender<Result<Registration, LogError>>,
    },
    /// `plugin`'s last subscription dropped: events from `seq` on are accepted while it is away
    /// (`AWAY`; an earlier mark is kept).
    Away {
        plugin: Arc<str>,
        seq: u64,
    },
    /// One step of a replay's backfill: makes every kept event with a sequence number in `seqs`
    /// (and appended since `from`'s time, if it has one) whose subject `matches` pending for
    /// `plugin`, reading at most [`BACKFILL_STEP_RECORDS`] records ([`BACKFILL_STEP_BYTES`]
    /// bytes); answers how many, and
    /// where the next step begins (`None`: done). `history`: a step of a new plugin's history,
    /// whose progress commits with it (`HISTORY_DUE`).
    Backfill {
        plugin: Arc<str>,
        matches: Arc<dyn Fn(&str) -> bool + Send + Sync>,
        from: crate::transport::ReplayFrom,
        seqs: std::ops::Range<u64>,
        history: bool,
        done: oneshot::Sender<Result<BackfillStep, LogError>>,
    },
}

impl Op {
    /// The bytes of kv writes, of values its read check reads again, and of outbox a kv commit
    /// someone waits for brings to a commit (`None`: not such a kv commit; see
    /// [`BATCH_KV_BYTES`]). A commit applied again after a failed write keeps its place.
    fn waiting_kv_bytes(&self) -> Option<u64> {
        match self {
            Op::KvCommit { txn, outbox, done: Some(_), .. } => Some(
                txn.held_bytes()
                    + txn.checked_bytes()
                    + outbox.as_ref().map_or(0, |o| o.outputs.iter().map(|e| e.data.len() as u64).sum::<u64>()),
            ),
            _ => None,
        }
    }

    /// Whether both are kv commits of one namespace.
    fn same_kv(&self, other: &Op) -> bool {
        matches!((self, other), (Op::KvCommit { ns: a, .. }, Op::KvCommit { ns: b, .. }) if a == b)
    }

    /// A copy of an op nobody waits for (an output, an ack, a commit applied again), to try
    /// again after a failed commit.
    fn retry_copy(&self) -> Option<Op> {
        match self {
            Op::Append { seq, event, plugins, dedupe, done: None, appended_ms } => Some(Op::Append {
                seq: *seq,
                event: event.clone(),
                plugins: plugins.clone(),
                dedupe: *dedupe,
                done: None,
                appended_ms: *appended_ms,
            }),
            Op::Ack { plugin, seq, keep_pending } => {
                Some(Op::Ack { plugin: plugin.clone(), seq: *seq, keep_pending: *keep_pending })
            }
            Op::KvCommit { ns, txn, outbox, done: None } => Some(kv_replay(ns, txn, outbox)),
            // A mark lost with a failed commit would lose the plugin what it misses (review 63c F3).
            Op::Away { plugin, seq } => Some(Op::Away { plugin: plugin.clone(), seq: *seq }),
            _ => None,
        }
    }

    /// What this op counts in [`Unwritten`]: a handler's output sent by
    /// [`DurableLog::append_nowait`] and not committed before (a copy kept to be done again after a
    /// failed write carries its first append time, and was taken off when first committed).
    fn unwritten_output_bytes(&self) -> u64 {
        match self {
            Op::Append { event, plugins, done: None, appended_ms: None, .. } => append_cost(event, plugins),
            _ => 0,
        }
    }

    /// Tells whoever waits for this op that its commit failed.
    fn fail(self, path: &Path, why: &str) {
        let io = || LogError::Io { path: path.to_path_buf(), why: why.to_string() };
        match self {
            Op::Append { done: Some(done), .. } => drop(done.send(Err(io()))),
            Op::Sync { done } => drop(done.send(Err(io()))),
            Op::KvCommit { done: Some(done), .. } => {
                drop(done.send(Err(crate::kv::KvError::Unavailable(why.to_string()))))
            }
            Op::Register { done, .. } => drop(done.send(Err(io()))),
            Op::Backfill { done, .. } => drop(done.send(Err(io()))),
            Op::Append { done: None, .. } | Op::Ack { .. } | Op::KvCommit { done: None, .. } | Op::Away { .. } => {}
        }
    }
}

/// A copy, nobody waiting for it, of a kv commit that passed its read check in a commit kept
/// only in memory (`bus.sync` = `batch` / `none`), applied again after a failed write (see
/// [`KeptInMemory`]) as it was, without checking its reads.
fn kv_replay(ns: &Arc<str>, txn: &crate::kv::Txn, outbox: &Option<Outbox>) -> Op {
    let mut txn = txn.clone();
    txn.quota = None;
    Op::KvCommit { ns: ns.clone(), txn, outbox: outbox.clone(), done: None }
}

/// About what a copy of a kv commit holds in memory, in bytes.
fn kv_cost(ns: &str, txn: &crate::kv::Txn, outbox: &Option<Outbox>) -> u64 {
    let writes: usize = txn.writes.iter().map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len)).sum();
    let reads: usize = txn.reads.keys().map(|k| k.len() + 8).sum();
    let outputs: usize = outbox.as_ref().map_or(0, |o| o.outputs.iter().map(|e| 256 + e.data.len()).sum());
    (128 + ns.len() + writes + reads + outputs) as u64
}

/// Marks [`Unwritten`] closed and wakes its waiters when the writer thread ends.
struct WriterGone(Arc<Unwritten>);

impl Drop for WriterGone {
    fn drop(&mut self) {
        self.0.closed.store(true, Relaxed);
        self.0.fell.notify_waiters();
    }
}

/// What the ops count in [`Unwritten`].
fn unwritten_output_bytes(ops: &[Op]) -> u64 {
    ops.iter().map(Op::unwritten_output_bytes).sum()
}

/// About what a copy of an append holds in memory, in bytes.
fn append_cost(event: &Event, plugins: &[Arc<str>]) -> u64 {
    (256 + event.data.len() + event.header_bytes() + plugins.len() * 16) as u64
}

/// An append sent to the writer ([`DurableLog::send`]), not yet answered.
pub struct SentAppend {
    /// Its sequence number.
    pub seq: u64,
    wait: oneshot::Receiver<Result<Appended, LogError>>,
}

impl SentAppend {
    /// Waits until it is committed (or failed).
    pub async fn landed(self) -> Result<Appended, LogError> {
        self.wait.await.map_err(|_| LogError::Closed).and_then(|answer| answer)
    }
}

/// Which subjects a backfill makes pending.
pub type SubjectMatcher = Box<dyn Fn(&str) -> bool + Send>;

/// What one step of a backfill made pending, and where the next begins (`None`: done).
type BackfillStep = (usize, Option<u64>);

/// A register op's answer, and what it answers (see [`DurableLog::register_with`]).
type Registered = (oneshot::Sender<Result<Registration, LogError>>, Registration);

/// What registering a subscriber did ([`DurableLog::register_with`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registration {
    /// It had never subscribed before.
    pub new: bool,
    /// How many events of its history the register's own commit made pending.
    pub made: usize,
    /// The sequence numbers of its history still to make pending, in steps
    /// ([`DurableLog::backfill_history`]): the rest of a new plugin's, or what a crash left of
    /// an earlier subscription's.
    pub history_due: Option<std::ops::Range<u64>>,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored under this sequence number.
    At(u64),
    /// An output with this (source, id) was stored before, under this sequence number: not
    /// stored again.
    Duplicate(u64),
}

/// What the log's writer did, for `/metrics` (`plugbus_log_*`): how well group commit groups,
/// what a commit costs, what failed and what retention dropped.
#[derive(Clone)]
pub struct LogMetrics {
    /// Commits (each one transaction, many appends and acks).
    pub commits: Counter,
    /// Commits that failed (a full disk, an I/O error).
    pub commit_failures: Counter,
    /// Seconds per commit, `fsync` included when the commit is durable.
    pub commit_seconds: Histogram,
    /// Operations (appends, acks, kv commits, ...) per commit.
    pub commit_operations: Histogram,
    /// Events and outputs appended.
    pub appended: Counter,
    /// Settled events retention dropped.
    pub retention_dropped: Counter,
    /// Ids of outputs retention dropped, forgotten while an older event was kept (over their
    /// bound): such an output is delivered again if its input runs again.
    pub output_ids_forgotten: Counter,
    /// Deliveries settled without running because their record cannot be read (damaged).
    pub damaged_records: Counter,
    /// Outboxes (an attempt's outputs, kept with its kv writes) found unreadable, each time one
    /// is read: left in the log, neither published nor dropped.
    pub damaged_outboxes: Counter,
    /// Bytes of the records the log keeps (what `bus.retention.max_mib` bounds).
    pub record_bytes: Gauge,
    /// Bytes of handler outputs sent to the log and not committed yet (publishers of new ones
    /// wait past 32 MiB: a full disk).
    pub unwritten_output_bytes: Gauge,
    /// Plugins whose history (`deliver = "all"`) is not all pending yet: retention keeps its
    /// events until the plugin subscribes again.
    pub histories_due: Gauge,
}

impl Default for LogMetrics {
    fn default() -> Self {
        Self {
            commits: Counter::default(),
            commit_failures: Counter::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 14)),
            commit_operations: Histogram::new(exponential_buckets(1.0, 2.0, 13)),
            appended: Counter::default(),
            retention_dropped: Counter::default(),
            output_ids_forgotten: Counter::default(),
            damaged_records: Counter::default(),
            damaged_outboxes: Counter::default(),
            record_bytes: Gauge::default(),
            unwritten_output_bytes: Gauge::default(),
            histories_due: Gauge::default(),
        }
    }
}

impl LogMetrics {
    /// Registers them as `plugbus_log_*` (`registry` has the `plugbus` prefix).
    pub fn register(&self, registry: &mut Registry) {
        let r = registry.sub_registry_with_prefix("log");
        r.register("commits", "Commits of the embedded bus's event log (group commits)", self.commits.clone());
        r.register(
            "commit_failures",
            "Event log commits that failed (a full disk, an I/O error); their waiters were answered with the error",
            self.commit_failures.clone(),
        );
        r.register(
            "commit_duration_seconds",
            "Time per event log commit, fsync included when durable",
            self.commit_seconds.clone(),
        );
        r.register(
            "commit_operations",
            "Appends, acks and kv commits per event log commit",
            self.commit_operations.clone(),
        );
        r.register("appended", "Events and outputs appended to the event log", self.appended.clone());
        r.register(
            "retention_dropped",
            "Settled events the event log dropped under bus.retention",
            self.retention_dropped.clone(),
        );
        r.register(
            "output_ids_forgotten",
            "Ids of outputs retention dropped, forgotten while an older event was kept (they take at most an eighth of bus.retention.max_mib): such an output is delivered again if its input runs again",
            self.output_ids_forgotten.clone(),
        );
        r.register(
            "damaged_records",
            "Deliveries the event log settled without running because their record cannot be read (a damaged row)",
            self.damaged_records.clone(),
        );
        r.register(
            "damaged_outboxes",
            "Outboxes (the outputs of an attempt whose kv writes committed) the event log found unreadable, each time it read one; they are left in the log, neither published nor dropped",
            self.damaged_outboxes.clone(),
        );
        r.register("record_bytes", "Bytes of the records the event log keeps", self.record_bytes.clone());
        r.register(
            "unwritten_output_bytes",
            "Bytes of handler outputs sent to the event log and not committed yet (publishers of new outputs wait past 32 MiB: a full disk)",
            self.unwritten_output_bytes.clone(),
        );
        r.register(
            "histories_due",
            "Plugins whose history (deliver = \"all\") is not all pending yet: retention keeps those events until the plugin subscribes again",
            self.histories_due.clone(),
        );
    }
}

/// The durable log. Cheap to share.
pub struct DurableLog {
    store: Arc<Store>,
    path: PathBuf,
    ops: std_mpsc::Sender<Op>,
    metrics: LogMetrics,
    /// The next sequence number, handed out when an append is sent.
    next_seq: std::sync::atomic::AtomicU64,
    /// Held while an append takes its sequence number and is sent: the writer gets appends in
    /// the order of their sequence numbers, so each commit's row of events holds a range of
    /// its own (see `rows`).
    appending: std::sync::Mutex<()>,
    /// The events read back to run again (at start, or for a replay) and not settled yet: their
    /// outputs may be in the log already.
    redelivered: std::sync::Mutex<Redelivered>,
    /// Whether `redelivered` ever held an id: first deliveries (the hot path) skip its lock.
    any_redelivered: std::sync::atomic::AtomicBool,
    /// Handler outputs sent to the writer and not committed yet.
    unwritten: Arc<Unwritten>,
    /// The next key of a request's outbox (see [`REQUEST_KEYS`]).
    next_request_key: std::sync::atomic::AtomicU64,
    /// The first key this run hands out: outboxes below it are the last run's.
    first_request_key: u64,
    /// The (plugin, key) of requests whose kv writes were sent to commit with an outbox: their
    /// settling removes it. A request that wrote no kv is settled without a log operation.
    request_outboxes: std::sync::Mutex<std::collections::HashSet<(Arc<str>, u64)>>,
    /// The sequence numbers replays' backfills are making pending, step by step: retention
    /// keeps every row in them until they are done (else it could drop, between two steps, a
    /// settled event the next step was to make pending).
    backfilling: Backfills,
    /// The file system under the log's file ([`DurableLog::disk_keeps_its_reserve`]).
    disk: super::disk::DiskRoom,
}

/// The ranges replays' backfills are making pending (shared by the log and its writer).
type Backfills = Arc<std::sync::Mutex<Vec<std::ops::Range<u64>>>>;

/// Keeps a backfill's range from retention while it lives ([`DurableLog::backfilling`]).
struct Backfilling<'a>(&'a DurableLog, std::ops::Range<u64>);

impl<'a> Backfilling<'a> {
    fn new(log: &'a DurableLog, seqs: std::ops::Range<u64>) -> Self {
        log.backfilling.lock().expect("backfilling poisoned").push(seqs.clone());
        Self(log, seqs)
    }
}

impl Drop for Backfilling<'_> {
    fn drop(&mut self) {
        let mut ranges = self.0.backfilling.lock().expect("backfilling poisoned");
        if let Some(i) = ranges.iter().position(|r| *r == self.1) {
            ranges.swap_remove(i);
        }
    }
}

/// Where the keys of requests' outboxes start. A request is not in the log, so its delivery has
/// no sequence number; its attempt's kv writes and outputs still commit together, in an outbox
/// under (responder, key). Sequence numbers never come near this.
pub const REQUEST_KEYS: u64 = 1 << 63;

/// Sequence numbers a log may hold: far below [`REQUEST_KEYS`] (2^40 short of it), far beyond
/// any log's (a million events a second for 290,000 years). A log whose counts reach it is
/// damaged (or made so), and refused at its open.
const SEQ_LIMIT: u64 = REQUEST_KEYS - (1 << 40);

/// A request's outbox the last run left: its key and its attempt's outputs.
pub type RequestOutbox = (u64, Vec<Arc<Event>>);

/// The deliveries read back to run again and not settled yet, and how many of them each
/// event id has (one per plugin).
#[derive(Default)]
struct Redelivered {
    ids: std::collections::HashMap<String, u32>,
    by_delivery: std::collections::HashMap<(Arc<str>, u64), String>,
    /// The outboxes read back with them, until their delivery is made ([`DurableLog::take_read_back`]).
    handled: std::collections::HashMap<(Arc<str>, u64), Vec<Arc<Event>>>,
}

/// One unsettled delivery read back at start.
pub struct Unsettled {
    /// Its sequence number.
    pub seq: u64,
    /// The event.
    pub event: Arc<Event>,
    /// Its attempt's outputs when its kv writes committed before the stop (its outbox, read in
    /// the same transaction): it is not run again, these are released.
    pub handled: Option<Vec<Arc<Event>>>,
}

impl DurableLog {
    /// Opens (or creates) the log at `path` and starts its writer thread.
    pub fn open(path: &Path, sync: SyncPolicy) -> Result<Arc<Self>, LogError> {
        Self::open_with(path, sync, Retention::default())
    }

    /// Like [`DurableLog::open`], keeping history as `retention` says.
    pub fn open_with(path: &Path, sync: SyncPolicy, retention: Retention) -> Result<Arc<Self>, LogError> {
        let if_damaged = "with an empty log (accepted, unhandled events in it are then not delivered)";
        // What an opened file refuses (its tables, its records) is damage.
        let open_err = |why: String| LogError::Open {
            path: path.to_path_buf(),
            why: format!("{why} (if the file is damaged, move it aside to start {if_damaged})"),
        };
        if let Some(dir) = path.parent() {
            crate::private_files::create_folder(dir).map_err(|e| LogError::Open {
                path: path.to_path_buf(),
                why: format!("creating {}: {e}", dir.display()),
            })?;
        }
        let db = open_when_free(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => LogError::InUse { path: path.to_path_buf() },
            e => LogError::Open { path: path.to_path_buf(), why: crate::redb_handle::open_failure(&e, if_damaged) },
        })?;
        let w = db.begin_write().map_err(|e| open_err(e.to_string()))?;
        {
            w.open_table(ROWS).map_err(|e| open_err(e.to_string()))?;
            w.open_table(PENDING).map_err(|e| open_err(e.to_string()))?;
            w.open_table(IDS).map_err(|e| open_err(e.to_string()))?;
            w.open_table(META).map_err(|e| open_err(e.to_string()))?;
            // Versions before 0.1 counted per event the plugins that still owed it; pending says.
            w.delete_table(REFS).map_err(|e| open_err(e.to_string()))?;
            w.open_table(SUBSCRIBERS).map_err(|e| open_err(e.to_string()))?;
            w.open_table(HISTORY_DUE).map_err(|e| open_err(e.to_string()))?;
            w.open_table(AWAY).map_err(|e| open_err(e.to_string()))?;
            w.open_table(KV).map_err(|e| open_err(e.to_string()))?;
            w.open_table(OUTBOX).map_err(|e| open_err(e.to_string()))?;
        }
        let any_retired = RetiredIds::open(&w).and_then(|ids| ids.any()).map_err(open_err)?;
        {
            if crate::kv::quota::recount_if_stale(&w, KV, META, "kv_clock")
                .map_err(|e| open_err(format!("counting the plugins' kv: {e}")))?
            {
                tracing::info!(log = %path.display(), "counted each plugin's kv for max_kv_bytes (a new log, or one a version without quotas wrote since the last count)");
            }
        }
        let histories_due = {
            let due = w.open_table(HISTORY_DUE).map_err(|e| open_err(e.to_string()))?;
            for row in due.iter().map_err(|e| open_err(e.to_string()))? {
                let (plugin, range) = row.map_err(|e| open_err(e.to_string()))?;
                let (first, end) = range.value();
                tracing::warn!(log = %path.display(), plugin = plugin.value(), first, end,
                    "a plugin's history (deliver = \"all\") is not all pending yet: it is made pending when the \
                     plugin subscribes, and retention keeps those events until then");
            }
            due.len().map_err(|e| open_err(e.to_string()))?
        };
        w.commit().map_err(|e| open_err(e.to_string()))?;
        let moved = rows::migrate(&db).map_err(|why| open_err(format!("moving events into rows: {why}")))?;
        if moved > 0 {
            tracing::info!(log = %path.display(), events = moved, "the event log's events moved into rows (once, after an upgrade)");
        }
        let (next_seq, record_bytes) = {
            let r = db.begin_read().map_err(|e| open_err(e.to_string()))?;
            let meta = r.open_table(META).map_err(|e| open_err(e.to_string()))?;
            let read = |key: &str| meta.get(key).map(|v| v.map(|v| v.value())).map_err(|e| open_err(e.to_string()));
            // Never below what the rows hold (a row's key is its last sequence number): a
            // damaged count would have new events overwrite kept ones.
            let rows = r.open_table(ROWS).map_err(|e| open_err(e.to_string()))?;
            let last = rows.last().map_err(|e| open_err(e.to_string()))?.map_or(0, |(key, _)| key.value());
            let stored = read("next_seq")?.unwrap_or(1);
            // Short of the range itself too: new events would soon take keys in it, their acks
            // would never settle them, and the next start would refuse the log (review 61c L3).
            if last >= SEQ_LIMIT || stored >= SEQ_LIMIT {
                return Err(open_err(format!(
                    "the event log is damaged: its last event's sequence number ({last}) or the next one ({stored}) \
                     is at or past {SEQ_LIMIT}, next to the range kept for requests' outboxes ({REQUEST_KEYS} and up)"
                )));
            }
            for counter in ["commit", "kv_clock"] {
                let count = read(counter)?.unwrap_or(0);
                if count >= DAMAGED_COUNT {
                    return Err(open_err(format!(
                        "the event log is damaged: its {counter} count ({count}) is past any a log reaches, and the \
                         next would wrap"
                    )));
                }
            }
            if stored <= last {
                tracing::error!(log = %path.display(), next_seq = stored, last_seq = last,
                    "the event log's next sequence number is behind its last event (damaged): going on after the last");
            }
            (stored.max(last.saturating_add(1)), read("bytes")?.unwrap_or(0))
        };
        mark_known_plugins_away(&db, next_seq).map_err(open_err)?;
        let outboxed = outboxed_in(&db).map_err(open_err)?;
        // Past every request outbox the last run left (released once the start has subscribed
        // every plugin, then settled).
        let next_request_key =
            outboxed.iter().map(|(_, key)| key.saturating_add(1)).filter(|k| *k > REQUEST_KEYS).max();
        let store = Arc::new(Store {
            path: path.to_path_buf(),
            db: std::sync::RwLock::new(Some(Arc::new(db))),
            behind: 0.into(),
        });
        let (ops, rx) = std_mpsc::channel();
        let metrics = LogMetrics::default();
        metrics.record_bytes.set(record_bytes as i64);
        metrics.histories_due.set(histories_due as i64);
        let unwritten = Arc::new(Unwritten::new(metrics.unwritten_output_bytes.clone()));
        let backfilling = Backfills::default();
        let writer = Writer {
            backfilling: backfilling.clone(),
            store: store.clone(),
            path: path.to_path_buf(),
            sync,
            retention,
            metrics: metrics.clone(),
            failed: false.into(),
            backoff: Default::default(),
            kv_not_on_file: false.into(),
            unwritten: unwritten.clone(),
            outboxed: std::sync::Mutex::new(outboxed),
            trim_from: 0.into(),
            any_retired: any_retired.into(),
        };
        std::thread::Builder::new()
            .name("plugbus-log".into())
            .spawn(move || writer.run(rx))
            .map_err(|e| LogError::Io { path: path.to_path_buf(), why: format!("starting the writer: {e}") })?;
        Ok(Arc::new(Self {
            disk: super::disk::DiskRoom::new(path.parent().unwrap_or(Path::new("."))),
            store,
            path: path.to_path_buf(),
            ops,
            metrics,
            next_seq: next_seq.into(),
            appending: Default::default(),
            redelivered: Default::default(),
            any_redelivered: false.into(),
            unwritten,
            next_request_key: next_request_key.unwrap_or(REQUEST_KEYS).into(),
            first_request_key: next_request_key.unwrap_or(REQUEST_KEYS),
            request_outboxes: Default::default(),
            backfilling,
        }))
    }

    /// Appends `event` with a pending delivery for each of `plugins`; returns once it is
    /// committed (on disk with `sync = "always"`). With `dedupe`, an event whose (source, id) was
    /// appended before is not appended again.
    pub async fn append(&self, event: Arc<Event>, plugins: Vec<Arc<str>>, dedupe: bool) -> Result<Appended, LogError> {
        self.send(event, plugins, dedupe)?.landed().await
    }

    /// Sends an append to the writer now, its sequence number fixed: an op sent after this
    /// call (a backfill) sees it. [`SentAppend::landed`] waits for its commit; a later try that
    /// finds it as a duplicate can tell its own earlier try (whose commit landed though it was
    /// answered failed) from a copy logged before by that number.
    pub fn send(&self, event: Arc<Event>, plugins: Vec<Arc<str>>, dedupe: bool) -> Result<SentAppend, LogError> {
        self.send_marked(event, plugins, dedupe, |_| {})
    }

    /// Like [`DurableLog::send`]; `mark` is given the sequence number before any later append
    /// gets one (and before [`DurableLog::next_seq_sent`] can answer past it).
    pub fn send_marked(
        &self,
        event: Arc<Event>,
        plugins: Vec<Arc<str>>,
        dedupe: bool,
        mark: impl FnOnce(u64),
    ) -> Result<SentAppend, LogError> {
        let (done, wait) = oneshot::channel();
        let seq = self.send_append(|seq| {
            mark(seq);
            Op::Append { seq, event, plugins, dedupe, done: Some(done), appended_ms: None }
        })?;
        Ok(SentAppend { seq, wait })
    }

    /// Appends a handler's output without waiting for the commit; returns its sequence number.
    /// Safe because the log commits in the order it is sent: the ack of the input that caused
    /// it (and of the output itself, downstream) is sent later, so neither commits before it.
    ///
    /// Its bytes count as unwritten until a commit holds it: see [`DurableLog::room_for_outputs`].
    pub fn append_nowait(&self, event: Arc<Event>, plugins: Vec<Arc<str>>) -> Result<u64, LogError> {
        self.append_nowait_marked(event, plugins, |_| {})
    }

    /// Like [`DurableLog::append_nowait`]; `mark` as for [`DurableLog::send_marked`].
    pub fn append_nowait_marked(
        &self,
        event: Arc<Event>,
        plugins: Vec<Arc<str>>,
        mark: impl FnOnce(u64),
    ) -> Result<u64, LogError> {
        // Counted before it is sent: the writer may commit it (and take it off) at once.
        let cost = append_cost(&event, &plugins);
        self.unwritten.add(cost);
        let sent = self.send_append(|seq| {
            mark(seq);
            Op::Append { seq, event, plugins, dedupe: true, done: None, appended_ms: None }
        });
        if sent.is_err() {
            self.unwritten.written(cost);
        }
        sent
    }

    /// Returns once handler outputs sent to the writer and not committed yet hold less than
    /// [`UNWRITTEN_OUTPUT_BYTES`] (at once, unless the disk is full or the writer far behind).
    /// A publisher of a new output waits here, and the delivery that made it with it: plugins
    /// that feed each other slow down instead of filling the memory, and no output is refused,
    /// dropped or dead-lettered for it. The commits that take the outputs below the bound (once
    /// space returns) wake it.
    pub async fn room_for_outputs(&self) {
        loop {
            let fell = self.unwritten.fell.notified();
            if self.unwritten.bytes.load(Relaxed) < UNWRITTEN_OUTPUT_BYTES || self.unwritten.closed.load(Relaxed) {
                return;
            }
            // The timeout is a backstop: the wake-up is not missed (`fell` was made first).
            let _ = tokio::time::timeout(std::time::Duration::from_millis(100), fell).await;
        }
    }

    /// Sends the append `op(seq)` with the next sequence number; appends reach the writer in the
    /// order of their sequence numbers.
    fn send_append(&self, op: impl FnOnce(u64) -> Op) -> Result<u64, LogError> {
        let _in_order = self.appending.lock().expect("appending poisoned");
        let seq = self.next_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.ops.send(op(seq)).map_err(|_| LogError::Closed)?;
        Ok(seq)
    }

    /// Whether the event with this id was read back to run again and is not settled yet (its
    /// outputs may be logged).
    pub fn was_redelivered(&self, id: &str) -> bool {
        self.any_redelivered.load(std::sync::atomic::Ordering::Acquire)
            && self.redelivered.lock().expect("redelivered poisoned").ids.contains_key(id)
    }

    /// How many read-back deliveries are not settled yet (they are forgotten as they settle).
    pub fn redelivered_pending(&self) -> usize {
        self.redelivered.lock().expect("redelivered poisoned").by_delivery.len()
    }

    /// Remembers that `plugin` gets these events again (their outputs may be logged already).
    fn mark_redelivered(&self, plugin: &str, events: &[Unsettled]) {
        if events.is_empty() {
            return;
        }
        let mut r = self.redelivered.lock().expect("redelivered poisoned");
        for u in events {
            if r.by_delivery.insert((plugin.into(), u.seq), u.event.id.clone()).is_none() {
                *r.ids.entry(u.event.id.clone()).or_default() += 1;
            }
            if let Some(outputs) = &u.handled {
                r.handled.insert((plugin.into(), u.seq), outputs.clone());
            }
        }
        self.any_redelivered.store(true, std::sync::atomic::Ordering::Release);
    }

    /// Whether `plugin`'s delivery of `seq` was read back to run again (after a restart, or for
    /// a replay) and is not settled yet, and the outbox read back with it (see
    /// [`Unsettled::handled`]), taken once: read with the event, not when the delivery is made,
    /// so a read failing then (the log reopening after a failed write) cannot pass for "no
    /// outbox" and run the handler again. One lock, for both, on each delivery the log makes.
    pub fn take_read_back(&self, plugin: &str, seq: u64) -> (bool, Option<Vec<Arc<Event>>>) {
        if !self.any_redelivered.load(std::sync::atomic::Ordering::Acquire) {
            return (false, None);
        }
        let key = (Arc::from(plugin), seq);
        let mut r = self.redelivered.lock().expect("redelivered poisoned");
        (r.by_delivery.contains_key(&key), r.handled.remove(&key))
    }

    /// A key for the outbox of a request's delivery (see [`REQUEST_KEYS`]).
    pub fn request_key(&self) -> u64 {
        self.next_request_key.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// The request outboxes of `plugin` the last run left (a crash between their kv commit and
    /// their settling): key and outputs, to publish (deduplicated) and settle. This run's own are
    /// settled by their deliveries.
    pub fn request_outboxes(&self, plugin: &str) -> Result<Vec<RequestOutbox>, LogError> {
        let io = |e: &dyn std::fmt::Display| LogError::Io { path: self.path.clone(), why: e.to_string() };
        let r = self.store.get().map_err(|e| io(&e))?.begin_read().map_err(|e| io(&e))?;
        let outbox = r.open_table(OUTBOX).map_err(|e| io(&e))?;
        let mut found = Vec::new();
        for row in outbox.range((plugin, REQUEST_KEYS)..(plugin, self.first_request_key)).map_err(|e| io(&e))? {
            let (key, stored) = row.map_err(|e| io(&e))?;
            let key = key.value().1;
            match decode_outbox(stored.value()) {
                Ok(outputs) => found.push((key, outputs)),
                // Left in the log, not settled: what it kept cannot be published, nor dropped unsaid.
                Err(why) => {
                    self.metrics.damaged_outboxes.inc();
                    tracing::error!(plugin, key, log = %self.path.display(),
                        "a request's outbox (the outputs of its attempt, kv committed) cannot be read; it is left in the log: {why}");
                }
            }
        }
        self.request_outboxes
            .lock()
            .expect("request outboxes poisoned")
            .extend(found.iter().map(|(key, _)| (Arc::from(plugin), *key)));
        Ok(found)
    }

    /// Settles `plugin`'s delivery of `seq` (handled or dead-lettered): it is not delivered again.
    pub fn ack(&self, plugin: Arc<str>, seq: u64) {
        if seq >= REQUEST_KEYS {
            // A request: only its outbox, if its attempt wrote one, is in the log.
            let wrote = self.request_outboxes.lock().expect("request outboxes poisoned").remove(&(plugin.clone(), seq));
            if wrote {
                let _ = self.ops.send(Op::Ack { plugin, seq, keep_pending: None });
            }
            return;
        }
        self.forget_redelivered(&plugin, seq);
        // A closed log means the host is stopping: the delivery runs again at the next start.
        let _ = self.ops.send(Op::Ack { plugin, seq, keep_pending: None });
    }

    /// Settles `plugin`'s delivery of `seq`, taken before a replay began whose history may
    /// include it (from `seq`, appended at `since_ms` or later: 0 for a replay from a sequence
    /// number): its outbox goes (its outputs were released), and if it is in the history it
    /// stays pending, and the replay's read-back runs it again in its place. Sent while the
    /// replay holds it (see the bus's `OverflowState::replay_holds`), so it is never lost
    /// between an ack and the backfill, to retention or to a crash.
    pub fn ack_for_replay(&self, plugin: Arc<str>, seq: u64, since_ms: u64) {
        self.forget_redelivered(&plugin, seq);
        let _ = self.ops.send(Op::Ack { plugin, seq, keep_pending: Some(since_ms) });
    }

    /// Forgets that `plugin`'s delivery of `seq` was read back: it settled, or it is gone
    /// unsettled (handed back, or never made: its subscription ended), and is read again (and
    /// remembered again) by the next read-back.
    pub fn forget_redelivered(&self, plugin: &Arc<str>, seq: u64) {
        if !self.any_redelivered.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let mut r = self.redelivered.lock().expect("redelivered poisoned");
        let key = (plugin.clone(), seq);
        r.handled.remove(&key);
        if let Some(id) = r.by_delivery.remove(&key)
            && let Some(n) = r.ids.get_mut(&id)
        {
            *n -= 1;
            if *n == 0 {
                r.ids.remove(&id);
            }
        }
        if r.by_delivery.is_empty() {
            // Every read-back delivery settled: first deliveries skip the lock again.
            self.any_redelivered.store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// Waits until everything sent before is committed and on disk.
    pub async fn sync(&self) -> Result<(), LogError> {
        let (done, wait) = oneshot::channel();
        self.ops.send(Op::Sync { done }).map_err(|_| LogError::Closed)?;
        wait.await.map_err(|_| LogError::Closed)?
    }

    /// Whether the file system under the log keeps its reserve free (see [`super::disk`]): a
    /// plugin's backlog in the log grows only while it does.
    pub fn disk_keeps_its_reserve(&self) -> bool {
        self.disk.keeps_its_reserve()
    }

    /// What the writer did (commits, their cost, retention), for `/metrics`.
    pub fn metrics(&self) -> &LogMetrics {
        &self.metrics
    }

    /// Up to `limit` events from sequence number `from` on, oldest first.
    pub fn read(&self, from: u64, limit: usize) -> Result<Vec<(u64, Arc<Event>)>, LogError> {
        let io = |e: &dyn std::fmt::Display| LogError::Io { path: self.path.clone(), why: e.to_string() };
        let r = self.store.get().map_err(|e| io(&e))?.begin_read().map_err(|e| io(&e))?;
        let events = r.open_table(ROWS).map_err(|e| io(&e))?;
        let mut out = Vec::new();
        for row in events.range(from..).map_err(|e| io(&e))? {
            let (last, stored) = row.map_err(|e| io(&e))?;
            let corrupt = |seq, why| LogError::Corrupt { path: self.path.clone(), seq, why };
            for (seq, record) in
                rows::records(last.value(), stored.value()).map_err(|why| corrupt(last.value(), why))?
            {
                if out.len() == limit {
                    return Ok(out);
                }
                if seq >= from {
                    out.push((seq, Arc::new(decode(record).map_err(|why| corrupt(seq, why))?)));
                }
            }
        }
        Ok(out)
    }

    /// Reads `key` of namespace `ns` from the log's kv.
    pub fn kv_get(&self, ns: &str, key: &str) -> Result<Option<crate::kv::Versioned>, crate::kv::KvError> {
        let unavailable = |e: &dyn std::fmt::Display| crate::kv::KvError::Unavailable(e.to_string());
        let at = self.store.not_behind().map_err(|e| unavailable(&e))?;
        let r = self.store.get().map_err(|e| unavailable(&e))?.begin_read().map_err(|e| unavailable(&e))?;
        self.store.still_at(at).map_err(|e| unavailable(&e))?;
        let kv = r.open_table(KV).map_err(|e| unavailable(&e))?;
        let stored = kv.get(kv_key(ns, key).as_str()).map_err(|e| unavailable(&e))?;
        Ok(stored.map(|v| {
            let (version, value) = stored_kv(v.value());
            crate::kv::Versioned { version, value: value.to_vec() }
        }))
    }

    /// Whether every key `txn` read in namespace `ns` is still as it read it, in one read
    /// transaction: one snapshot (see [`crate::kv::KvStore::check_reads`]).
    pub fn kv_check_reads(&self, ns: &str, txn: &crate::kv::Txn) -> Result<(), crate::kv::KvError> {
        let unavailable = |e: &dyn std::fmt::Display| crate::kv::KvError::Unavailable(e.to_string());
        let at = self.store.not_behind().map_err(|e| unavailable(&e))?;
        let r = self.store.get().map_err(|e| unavailable(&e))?.begin_read().map_err(|e| unavailable(&e))?;
        self.store.still_at(at).map_err(|e| unavailable(&e))?;
        let kv = r.open_table(KV).map_err(|e| unavailable(&e))?;
        for (key, seen) in &txn.reads {
            let stored = kv.get(kv_key(ns, key).as_str()).map_err(|e| unavailable(&e))?;
            if stored.map_or(0, |v| stored_kv(v.value()).0) != *seen {
                return Err(crate::kv::KvError::Conflict(key.clone()));
            }
        }
        Ok(())
    }

    /// Commits `txn` in namespace `ns` if no key it read changed, with `outbox` in the same
    /// transaction.
    pub async fn kv_commit(
        &self,
        ns: &str,
        txn: &crate::kv::Txn,
        outbox: Option<Outbox>,
    ) -> Result<(), crate::kv::KvError> {
        let closed = || crate::kv::KvError::Unavailable("the event log is closed".into());
        if let Some(outbox) = outbox.as_ref().filter(|o| o.seq >= REQUEST_KEYS) {
            let key = (outbox.plugin.clone(), outbox.seq);
            self.request_outboxes.lock().expect("request outboxes poisoned").insert(key);
        }
        let (done, wait) = oneshot::channel();
        let op = Op::KvCommit { ns: ns.into(), txn: txn.clone(), outbox, done: Some(done) };
        self.ops.send(op).map_err(|_| closed())?;
        wait.await.map_err(|_| closed())?
    }

    /// Takes in kv entries (`ns\0key` → value and version) from another store at start: all of
    /// them while the log has never committed kv, none once it has (see [`KvImport`]), in one
    /// transaction. `digest` names the entries: taken in again after a stop before their file
    /// was renamed, they are known as taken in.
    pub fn import_kv(&self, rows: &[(String, crate::kv::Versioned)], digest: u64) -> Result<KvImport, LogError> {
        let io = |e: &dyn std::fmt::Display| LogError::Io { path: self.path.clone(), why: e.to_string() };
        let w = self.store.get().map_err(|e| io(&e))?.begin_write().map_err(|e| io(&e))?;
        let done = {
            let mut kv = w.open_table(KV).map_err(|e| io(&e))?;
            let mut meta = w.open_table(META).map_err(|e| io(&e))?;
            let mut clock = meta.get("kv_clock").map_err(|e| io(&e))?.map_or(0, |v| v.value());
            let imported = meta.get(KV_IMPORTED).map_err(|e| io(&e))?.map(|v| v.value());
            if imported == Some(digest) {
                return Ok(KvImport::MovedBefore);
            }
            if clock > 0 || !kv.is_empty().map_err(|e| io(&e))? {
                return Ok(KvImport::LeftOut(rows.len()));
            }
            for (key, v) in rows {
                let mut stored = v.version.to_le_bytes().to_vec();
                stored.extend_from_slice(&v.value);
                kv.insert(key.as_str(), stored.as_slice()).map_err(|e| io(&e))?;
                clock = clock.max(v.version);
            }
            meta.insert("kv_clock", clock).map_err(|e| io(&e))?;
            meta.insert(KV_IMPORTED, digest).map_err(|e| io(&e))?;
            KvImport::Moved(rows.len())
        };
        crate::kv::quota::recount(&w, KV, META, "kv_clock").map_err(|e| io(&e))?;
        w.commit().map_err(|e| io(&e))?;
        Ok(done)
    }

    /// The outputs kept for `plugin`'s input `seq` (its kv writes committed, the input not acked).
    pub fn outbox(&self, plugin: &str, seq: u64) -> Result<Option<Vec<Arc<Event>>>, LogError> {
        let io = |e: &dyn std::fmt::Display| LogError::Io { path: self.path.clone(), why: e.to_string() };
        let r = self.store.get().map_err(|e| io(&e))?.begin_read().map_err(|e| io(&e))?;
        let outbox = r.open_table(OUTBOX).map_err(|e| io(&e))?;
        let Some(stored) = outbox.get((plugin, seq)).map_err(|e| io(&e))? else { return Ok(None) };
        let corrupt = |why: String| LogError::Corrupt { path: self.path.clone(), seq, why };
        decode_outbox(stored.value()).map(Some).map_err(corrupt)
    }

    /// The sequence number the next append gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The next sequence number, once every append under a lower one has been sent to the
    /// writer: an op sent after this (a backfill) sees them all.
    pub fn next_seq_sent(&self) -> u64 {
        let _in_order = self.appending.lock().expect("appending poisoned");
        self.next_seq.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The events under `seqs` (those retention dropped are left out), as deliveries to run
    /// again: their outputs may be in the log already. One whose record cannot be read is left
    /// out (settled without running, or left pending: see [`DurableLog::read_back`]).
    pub fn read_seqs(&self, plugin: &str, seqs: &[u64]) -> Result<Vec<Unsettled>, LogError> {
        let io = |e: &dyn std::fmt::Display| LogError::Io { path: self.path.clone(), why: e.to_string() };
        let r = self.store.get().map_err(|e| io(&e))?.begin_read().map_err(|e| io(&e))?;
        let events = r.open_table(ROWS).map_err(|e| io(&e))?;
        let outboxes = r.open_table(OUTBOX).map_err(|e| io(&e))?;
        let (out, _) = self.read_back(plugin, &events, &outboxes, seqs, false, u64::MAX)?;
        self.mark_redelivered(plugin, &out);
        Ok(out)
    }

    /// Reads back `plugin`'s deliveries of `seqs` from `rows` to run again. A record that cannot
    /// be read (its row or record is damaged, or, when `pending`, it is not in the log at all)
    /// can never run: it is logged, counted (`plugbus_log_damaged_records_total`) and settled
    /// here, so it neither stops the deliveries after it nor comes back at every start. A read
    /// that fails (an I/O error) fails the whole read: the delivery stays pending. Each
    /// delivery's outbox is read with it ([`Unsettled::handled`]); one whose outbox is damaged
    /// is left pending, logged: running it again would apply its kv writes twice. Stops once
    /// the events and outputs read hold `max_bytes` (a page of large events must not fill the
    /// memory); answers how many of `seqs` it looked at.
    fn read_back(
        &self,
        plugin: &str,
        rows: &impl ReadableTable<u64, &'static [u8]>,
        outboxes: &impl ReadableTable<(&'static str, u64), &'static [u8]>,
        seqs: &[u64],
        pending: bool,
        max_bytes: u64,
    ) -> Result<(Vec<Unsettled>, usize), LogError> {
        let mut lookup = Lookup::new(rows);
        let mut out = Vec::with_capacity(seqs.len());
        let (mut bytes, mut looked) = (0u64, 0);
        for &seq in seqs {
            if looked > 0 && bytes >= max_bytes {
                break;
            }
            looked += 1;
            let record = match lookup.get(seq) {
                // A record of a newer version is not damage: a rolled-back host must not settle
                // what the newer one would run. The delivery stays pending, logged; the read goes
                // on past it (what comes after it is not held up until a newer host runs).
                Ok(Some(stored)) if stored.first().is_some_and(|v| *v > RECORD_VERSION) => {
                    tracing::error!(plugin, seq, log = %self.path.display(),
                        "a delivery whose record was written by a newer plugbus (record version {}; this host reads {RECORD_VERSION}) \
                         is left pending, not run: run the newer plugbus to deliver it", stored[0]);
                    continue;
                }
                Ok(Some(stored)) => decode(stored).map(Some),
                Ok(None) if pending => Err("pending, but not in the log".to_string()),
                Ok(None) => Ok(None),
                Err(LookupError::Damaged(why)) => Err(why),
                Err(LookupError::Storage(why)) => return Err(LogError::Io { path: self.path.clone(), why }),
            };
            match record {
                Ok(Some(event)) => {
                    let stored = outboxes
                        .get((plugin, seq))
                        .map_err(|e| LogError::Io { path: self.path.clone(), why: e.to_string() })?;
                    let handled = match stored.map(|stored| decode_outbox(stored.value())).transpose() {
                        Ok(handled) => handled,
                        Err(why) => {
                            self.metrics.damaged_outboxes.inc();
                            tracing::error!(plugin, seq, event_id = %event.id,
                                "a delivery whose outbox (the outputs of its attempt, kv committed) cannot be read is left pending, not run again: {why}");
                            continue;
                        }
                    };
                    bytes += event.buffered_cost();
                    bytes += handled.iter().flatten().map(|o| o.buffered_cost()).sum::<u64>();
                    out.push(Unsettled { seq, event: Arc::new(event), handled });
                }
                Ok(None) => {}
                Err(why) => {
                    let error = LogError::Corrupt { path: self.path.clone(), seq, why };
                    // Its attempt's outputs are kept (kv committed): settling would drop them.
                    if self.outbox(plugin, seq).map_or(true, |kept| kept.is_some()) {
                        tracing::error!(
                            plugin,
                            seq,
                            "a delivery whose record cannot be read is left pending: its attempt's outputs are kept in the outbox (or the outbox cannot be read): {error}"
                        );
                        continue;
                    }
                    tracing::error!(
                        plugin,
                        seq,
                        "a delivery whose record cannot be read is settled without running: {error}"
                    );
                    self.metrics.damaged_records.inc();
                    let _ = self.ops.send(Op::Ack { plugin: plugin.into(), seq, keep_pending: None });
                }
            }
        }
        Ok((out, looked))
    }

    /// Records `plugin` as a subscriber of the log; `true` when it had never subscribed before.
    pub async fn register(&self, plugin: Arc<str>) -> Result<bool, LogError> {
        Ok(self.register_with(plugin, None, false).await?.new)
    }

    /// Records `plugin` as a subscriber of the log; `matches` (its patterns) when it is durable.
    /// When it had never subscribed before and it is durable with `deliver_all`, every kept
    /// event whose subject it matches is to be made pending for it: the first
    /// [`BACKFILL_STEP_RECORDS`] records' worth in the same commit, and the rest is answered as
    /// `history_due` (kept in the log with the subscriber, so a failure leaves neither and a
    /// crash after it leaves the rest due), for the caller to make pending with
    /// [`DurableLog::backfill_history`] before the plugin reads back. One long history is never
    /// one commit that holds every producer's append and every ack. A plugin registered before
    /// with history still due is answered that while it is durable (even without `deliver_all`
    /// now, as a JetStream consumer keeps its start); once it is not durable the rest is
    /// dropped. A durable plugin known before and away since (`AWAY`) has the kept events
    /// accepted meanwhile that it matches answered as `history_due` too.
    pub async fn register_with(
        &self,
        plugin: Arc<str>,
        matches: Option<SubjectMatcher>,
        deliver_all: bool,
    ) -> Result<Registration, LogError> {
        let (done, wait) = oneshot::channel();
        self.ops.send(Op::Register { plugin, matches, deliver_all, done }).map_err(|_| LogError::Closed)?;
        wait.await.map_err(|_| LogError::Closed)?
    }

    /// `plugin` has no subscription any more: what is accepted from now on, it is away for (see
    /// `AWAY`). Called with the bus's table locked for writing, so no append sent after it was
    /// made for a subscription of the plugin, and each one sent before has a lower sequence
    /// number.
    pub fn away(&self, plugin: Arc<str>) {
        let _in_order = self.appending.lock().expect("appending poisoned");
        let seq = self.next_seq.load(std::sync::atomic::Ordering::Relaxed);
        // A log closing (the host stopping) marks it at its next open.
        let _ = self.ops.send(Op::Away { plugin, seq });
    }

    /// Makes every kept event from `from` on, below sequence number `until`, whose subject
    /// `matches` pending for `plugin` again (a replay); returns how many, those pending already
    /// included (one in flight for the plugin is pending: see the bus's replay). Done in steps
    /// of [`BACKFILL_STEP_RECORDS`] records, each its own commit (the log's other work goes on
    /// between them); a failure or a crash between steps leaves the steps before it pending.
    pub async fn backfill(
        &self,
        plugin: Arc<str>,
        matches: impl Fn(&str) -> bool + Send + Sync + 'static,
        from: crate::transport::ReplayFrom,
        until: u64,
    ) -> Result<usize, LogError> {
        self.backfill_steps(plugin, Arc::new(matches), from, until, false).await
    }

    /// Makes the rest of a new plugin's history pending (`due`, from
    /// [`Registration::history_due`]), as [`DurableLog::backfill`] does a replay's, in steps
    /// that each commit how far it came: a crash between two leaves the rest due.
    pub async fn backfill_history(
        &self,
        plugin: Arc<str>,
        matches: impl Fn(&str) -> bool + Send + Sync + 'static,
        due: std::ops::Range<u64>,
    ) -> Result<usize, LogError> {
        let from = crate::transport::ReplayFrom::Seq(due.start);
        self.backfill_steps(plugin, Arc::new(matches), from, due.end, true).await
    }

    async fn backfill_steps(
        &self,
        plugin: Arc<str>,
        matches: Arc<dyn Fn(&str) -> bool + Send + Sync>,
        from: crate::transport::ReplayFrom,
        until: u64,
        history: bool,
    ) -> Result<usize, LogError> {
        let (mut made, mut start, mut failed_steps) = (0, from.first_seq(), 0);
        let _kept = Backfilling::new(self, start..until);
        while start < until {
            let (done, wait) = oneshot::channel();
            let step = Op::Backfill {
                plugin: plugin.clone(),
                matches: matches.clone(),
                from,
                seqs: start..until,
                history,
                done,
            };
            self.ops.send(step).map_err(|_| LogError::Closed)?;
            let step = wait.await.map_err(|_| LogError::Closed).and_then(|answer| answer);
            // A history's step that did not commit (a full disk, or another op of its batch) is
            // tried again, a while: its progress commits with it, so nothing is done twice, and
            // a plugin refused for one failed commit of many would wait for its file to change.
            if let (true, Err(LogError::Io { why, .. })) = (history, &step)
                && failed_steps < HISTORY_STEP_TRIES
            {
                failed_steps += 1;
                tracing::warn!(log = %self.path.display(), plugin = %plugin, from = start,
                    "a step of a new plugin's history did not commit; trying again: {why}");
                tokio::time::sleep(std::time::Duration::from_millis(50) * failed_steps).await;
                continue;
            }
            // The steps before stay pending (they run): say so.
            let (count, next) = step.map_err(|e| match e {
                LogError::Io { path, why } if made > 0 => LogError::Io {
                    path,
                    why: format!("{why} (after {made} events below seq {start} were made pending again: they run)"),
                },
                e => e,
            })?;
            made += count;
            match next {
                Some(next) => start = next,
                None => break,
            }
        }
        Ok(made)
    }

    /// The deliveries of `plugin` not settled yet, oldest first.
    pub fn unsettled(&self, plugin: &str) -> Result<Vec<Unsettled>, LogError> {
        Ok(self.unsettled_page(plugin, 0..u64::MAX, usize::MAX, u64::MAX, Delivered::Again)?.deliveries)
    }

    /// Up to `limit` of the deliveries of `plugin` not settled yet with sequence numbers in
    /// `seqs`, fewer once what was read holds `max_bytes` (at least one). `delivered` says
    /// whether they were delivered before ([`Delivered::Again`]: marked redelivered, their
    /// outputs may be in the log already) or not ([`Delivered::First`]).
    pub fn unsettled_page(
        &self,
        plugin: &str,
        seqs: std::ops::Range<u64>,
        limit: usize,
        max_bytes: u64,
        delivered: Delivered,
    ) -> Result<UnsettledPage, LogError> {
        let io = |e: &dyn std::fmt::Display| LogError::Io { path: self.path.clone(), why: e.to_string() };
        #[cfg(test)]
        if tests::injected_read_failure(&self.path) {
            return Err(io(&"injected: the log is reopening"));
        }
        let r = self.store.get().map_err(|e| io(&e))?.begin_read().map_err(|e| io(&e))?;
        let pending = r.open_table(PENDING).map_err(|e| io(&e))?;
        let events = r.open_table(ROWS).map_err(|e| io(&e))?;
        let mut owed = Vec::new();
        for row in pending.range((plugin, seqs.start)..(plugin, seqs.end)).map_err(|e| io(&e))?.take(limit) {
            owed.push(row.map_err(|e| io(&e))?.0.value().1);
        }
        let outboxes = r.open_table(OUTBOX).map_err(|e| io(&e))?;
        let (deliveries, looked) = self.read_back(plugin, &events, &outboxes, &owed, true, max_bytes)?;
        if delivered == Delivered::Again {
            self.mark_redelivered(plugin, &deliveries);
        }
        Ok(UnsettledPage { deliveries, last_seq: owed[..looked].last().copied() })
    }

    /// The plugins with a delivery not settled yet, each named once.
    pub fn owing_plugins(&self) -> Result<Vec<String>, LogError> {
        let io = |e: &dyn std::fmt::Display| LogError::Io { path: self.path.clone(), why: e.to_string() };
        let r = self.store.get().map_err(|e| io(&e))?.begin_read().map_err(|e| io(&e))?;
        let pending = r.open_table(PENDING).map_err(|e| io(&e))?;
        owing_plugins(&pending).map_err(|e| io(&e))
    }
}

/// Whether deliveries read back from the log were delivered before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Maybe (what the last run left, a replay's history): marked redelivered
    /// ([`DurableLog::was_redelivered`]), their outputs deduplicated against the log.
    Again,
    /// Never: what waited in the log for a plugin that fell behind its producers, accepted in
    /// this run. Their outputs, and other plugins' outputs of the same events, are logged
    /// without waiting, as any first delivery's.
    First,
}

/// A page of a plugin's unsettled deliveries read back.
pub struct UnsettledPage {
    /// The deliveries, oldest first (those whose record cannot be read are left out: settled, or
    /// left pending when their outbox is kept or damaged or their record is of a newer version).
    pub deliveries: Vec<Unsettled>,
    /// The last pending sequence number the page looked at (`None`: none was left).
    pub last_seq: Option<u64>,
}

/// The open database. After a failed write redb refuses every operation until the database is
/// closed and opened again: the writer then reopens it here (readers meanwhile get an error).
struct Store {
    path: PathBuf,
    db: std::sync::RwLock<Option<Arc<Database>>>,
    /// Whether the file is behind the kv writes the log answered, odd while it is: a reopen
    /// after a failed write threw away commits kept only in memory (`bus.sync` = `batch` /
    /// `none`) holding kv writes, and no commit has applied them again yet. Made odd before
    /// such a reopen and even again once a commit goes through (see [`KeptInMemory`]); each
    /// change moves it on, so a kv read that began its snapshot across one sees it changed.
    behind: std::sync::atomic::AtomicU64,
}

impl Store {
    fn get(&self) -> Result<Arc<Database>, String> {
        self.db
            .read()
            .expect("log store poisoned")
            .clone()
            .ok_or_else(|| format!("{} is being reopened after a failed write (a full disk?)", self.path.display()))
    }

    /// Before a kv read: fails while the file is behind what the log answered
    /// ([`Store::behind`]), where a kv read would see a write answered Ok undone; else where
    /// `behind` stands, for [`Store::still_at`] once the read's snapshot began.
    fn not_behind(&self) -> Result<u64, String> {
        let at = self.behind.load(std::sync::atomic::Ordering::SeqCst);
        match at.is_multiple_of(2) {
            true => Ok(at),
            false => Err(self.behind_why()),
        }
    }

    /// After a kv read's snapshot began: fails when the file fell behind (or caught up) since
    /// [`Store::not_behind`] (the snapshot may be of the file reopened behind).
    fn still_at(&self, at: u64) -> Result<(), String> {
        match self.behind.load(std::sync::atomic::Ordering::SeqCst) == at {
            true => Ok(()),
            false => Err(self.behind_why()),
        }
    }

    fn behind_why(&self) -> String {
        format!(
            "{} is behind the kv writes it answered after a failed write (a full disk?): kv reads wait until a \
             commit goes through",
            self.path.display()
        )
    }

    /// The writer's: the file is about to be reopened behind answered kv writes.
    fn fall_behind(&self) {
        if self.behind.load(std::sync::atomic::Ordering::SeqCst).is_multiple_of(2) {
            self.behind.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// The writer's: a commit went through (applying again first what a reopen threw away).
    fn caught_up(&self) {
        if !self.behind.load(std::sync::atomic::Ordering::SeqCst).is_multiple_of(2) {
            self.behind.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Closes the database (once readers let go of it) and opens it again.
    fn reopen(&self) -> Result<(), String> {
        let old = self.db.write().expect("log store poisoned").take();
        if let Some(mut old) = old {
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            loop {
                match Arc::try_unwrap(old) {
                    Ok(db) => break drop(db),
                    Err(shared) if std::time::Instant::now() < deadline => {
                        old = shared;
                        std::thread::sleep(std::time::Duration::from_millis(1));
                    }
                    Err(shared) => {
                        *self.db.write().expect("log store poisoned") = Some(shared);
                        return Err("a reader kept the log open for 5 s".into());
                    }
                }
            }
        }
        let db = open_when_free(&self.path).map_err(|e| format!("reopening {}: {e}", self.path.display()))?;
        *self.db.write().expect("log store poisoned") = Some(Arc::new(db));
        Ok(())
    }
}

/// Opens the file, waiting up to 2 s while it is locked: a host stopping in this process lets go
/// of it when its last task ends.
fn open_when_free(path: &Path) -> Result<Database, redb::DatabaseError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let backend = super::zeroed_ahead::ZeroedAhead::open(path)?;
        // redb's page cache would otherwise grow with what is written (up to 1 GiB).
        match redb::Builder::new().set_cache_size(LOG_CACHE_BYTES).create_with_backend(backend) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

struct Writer {
    store: Arc<Store>,
    path: PathBuf,
    sync: SyncPolicy,
    retention: Retention,
    metrics: LogMetrics,
    /// Whether the last commit failed: the database is reopened before the next one.
    failed: std::sync::atomic::AtomicBool,
    /// How soon after failed writes the next commit tries the file.
    backoff: std::sync::Mutex<super::reopen_backoff::ReopenBackoff>,
    /// Whether kv writes answered are in commits kept only in memory, or carried from a failed
    /// commit: a reopen throws them away (or finds them missing), and the file is then
    /// [`Store::behind`].
    kv_not_on_file: std::sync::atomic::AtomicBool,
    /// Handler outputs sent and not committed yet (shared with the log, whose publishers of new
    /// outputs wait past [`UNWRITTEN_OUTPUT_BYTES`]).
    unwritten: Arc<Unwritten>,
    /// The (plugin, seq) of the outbox entries in the log: an ack removes one only when there is
    /// one (most deliveries write no kv).
    outboxed: std::sync::Mutex<std::collections::HashSet<(Arc<str>, u64)>>,
    /// What retention keeps for replays' backfills (see [`DurableLog::backfilling`]).
    backfilling: Backfills,
    /// The row key the next retention pass starts from (0: the oldest row). A pass passes over
    /// at most [`TRIM_ROWS`] rows and drops at most [`TRIM_DROP_ROWS`]; the next goes on from
    /// where it stopped.
    trim_from: std::sync::atomic::AtomicU64,
    /// Whether ids of outputs whose rows retention dropped are kept ([`RetiredIds`]): an
    /// output's append looks there only then.
    any_retired: std::sync::atomic::AtomicBool,
}

/// A META count (`commit`, `kv_clock`) at or past this is damage: no log counts this far, and
/// the next would wrap (`kv_clock` wrapping would pass a stale kv read check).
const DAMAGED_COUNT: u64 = 1 << 63;

/// The most rows one retention pass (one a second, on the writer's thread) reads and passes
/// over because an unsettled event keeps them. Without a bound, a log pinned by a plugin that
/// owes its whole history (one removed while it owed it, a `deliver = "all"` plugin behind)
/// was read whole every second, holding up every append, ack and kv commit. 256 rows are at
/// most 64 MiB.
const TRIM_ROWS: usize = 256;

/// The most rows one retention pass drops (each read for its events' ids): a pass that drops
/// this many is followed by the next one at once, not a second later, so retention keeps up
/// with a log that makes a row per event. (One that stopped at [`TRIM_ROWS`] waits the second:
/// rows owed are not read again and again.)
const TRIM_DROP_ROWS: usize = 4096;

/// The most bytes of rows one retention pass drops (each read whole, and its records decoded
/// for their ids, on the writer's thread while every append, ack and kv commit waits): rows of
/// up to 256 KiB, and one of its own for each larger event, made 4,096 rows 1 to 5 GiB read in
/// one pass (review 55a 3). A pass that stops here is followed by the next one at once, as one
/// stopped at [`TRIM_DROP_ROWS`] is.
const TRIM_DROP_BYTES: u64 = 64 << 20;

/// How often retention runs, and how soon the next pass runs after one stopped at the bound of
/// rows dropped.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(1);
const TRIM_AGAIN: std::time::Duration = std::time::Duration::from_millis(20);

/// [`TRIM_ROWS`], [`TRIM_DROP_ROWS`] and [`TRIM_DROP_BYTES`], or less for a test's log.
fn trim_bounds(path: &Path) -> (usize, usize, u64) {
    #[cfg(test)]
    if let Some(bounds) = tests::trim_bounds_for(path) {
        return bounds;
    }
    let _ = path;
    (TRIM_ROWS, TRIM_DROP_ROWS, TRIM_DROP_BYTES)
}

/// Whether event `seq` is in `rows` and can be read back (an I/O error says yes: the caller
/// then keeps what it has rather than log an event twice).
fn readable(rows: &impl ReadableTable<u64, &'static [u8]>, seq: u64) -> bool {
    match Lookup::new(rows).get(seq) {
        Ok(Some(record)) => decode(record).is_ok(),
        Ok(None) | Err(LookupError::Damaged(_)) => false,
        Err(LookupError::Storage(_)) => true,
    }
}

/// The (plugin, seq) of the outbox entries in `db`.
fn outboxed_in(db: &Database) -> Result<std::collections::HashSet<(Arc<str>, u64)>, String> {
    let r = db.begin_read().map_err(|e| e.to_string())?;
    let outbox = r.open_table(OUTBOX).map_err(|e| e.to_string())?;
    let mut kept = std::collections::HashSet::new();
    for row in outbox.iter().map_err(|e| e.to_string())? {
        let (key, _) = row.map_err(|e| e.to_string())?;
        let (plugin, seq) = key.value();
        kept.insert((Arc::<str>::from(plugin), seq));
    }
    Ok(kept)
}

/// The plugins with a pending delivery (one range lookup per plugin, not a scan).
fn owing_plugins(pending: &impl ReadableTable<(&'static str, u64), ()>) -> Result<Vec<String>, String> {
    let mut plugins = Vec::new();
    let mut after = String::new();
    loop {
        let from = (after.as_str(), u64::MAX);
        let next = pending.range(from..).map_err(|e| e.to_string())?.next();
        let Some(row) = next else { break };
        let (key, _) = row.map_err(|e| e.to_string())?;
        let plugin = key.value().0.to_string();
        if plugin == after {
            break;
        }
        after = plugin.clone();
        plugins.push(plugin);
    }
    Ok(plugins)
}

/// What a commit kept only in memory (`bus.sync` = `batch` / `none`) did, to do again: when a
/// later write fails, the database is reopened at its last durable commit, which throws away
/// every commit since, and these go again first, in their order. So a failed write undoes
/// nothing the process answered while it lives: no event answered `202` leaves the log (to be
/// lost by a crash long after the window `bus.sync` names), no kv write answered Ok and no
/// settled delivery comes back. Only a crash loses them, as `bus.sync` says.
#[derive(Default)]
struct KeptInMemory {
    /// Copies, nobody waiting for them, of its appends (not those found to be duplicates), its
    /// acks and its kv commits that passed their read check.
    redo: Vec<Op>,
    /// About what they hold, in bytes.
    bytes: u64,
}

impl KeptInMemory {
    fn keep(&mut self, op: Op, bytes: u64) {
        self.redo.push(op);
        self.bytes += bytes;
    }
}

/// A kv commit's answer and its result.
type KvAnswer = (oneshot::Sender<Result<(), crate::kv::KvError>>, Result<(), crate::kv::KvError>);

/// A backfill's answer and the sequence numbers it made pending.
type Backfilled = (oneshot::Sender<Result<BackfillStep, LogError>>, BackfillStep);

/// Answers to the ops of one batch, sent once it committed (or failed).
type Answers = Vec<(oneshot::Sender<Result<Appended, LogError>>, Appended)>;

impl Writer {
    /// Before a commit of `batch`: whether the file may lack kv writes already answered (copies
    /// nobody waits for, `done: None`, are kv commits applied again): kept only in memory
    /// (`in_memory`), or carried from a failed commit to the head of `batch`. Acks and appends
    /// lost the same way do not matter to kv reads (their readers wait on a commit first).
    fn answering_from(&self, in_memory: &[Op], batch: &[Op]) {
        let kv_again = |op: &Op| matches!(op, Op::KvCommit { done: None, .. });
        self.kv_not_on_file.store(in_memory.iter().chain(batch).any(kv_again), Relaxed);
    }

    /// Opens the database again after a failed write, at its last durable commit; first marks
    /// it [`Store::behind`] when that throws answered commits away.
    fn reopen(&self) -> Result<(), String> {
        #[cfg(test)]
        tests::record_reopen(&self.path);
        if self.kv_not_on_file.load(Relaxed) {
            self.store.fall_behind();
        }
        self.store.reopen()?;
        self.reload_outboxed()
    }

    /// After a reopen the outbox is what the last durable commit left: acks undone by it must
    /// find the entries they remove again.
    fn reload_outboxed(&self) -> Result<(), String> {
        let kept = outboxed_in(&*self.store.get()?)?;
        *self.outboxed.lock().expect("outboxed poisoned") = kept;
        Ok(())
    }

    fn run(self, rx: std_mpsc::Receiver<Op>) {
        // However this thread ends (a panic included), publishers waiting for room go on.
        let _closing = WriterGone(self.unwritten.clone());
        let mut last_sync = std::time::Instant::now();
        let (mut last_trim, mut trim_every) = (std::time::Instant::now(), TRIM_EVERY);
        let mut unsynced = false;
        // Ops nobody waits for (handlers' outputs, acks) of a commit that failed: they go first
        // in the next commit, so the log still commits in the order it was sent.
        let mut carried: Vec<Op> = Vec::new();
        // What the commits kept only in memory since the last durable one did ([`KeptInMemory`]):
        // a failed write throws them away with the reopen; they go again first.
        let mut in_memory: Vec<Op> = Vec::new();
        let mut in_memory_bytes = 0u64;
        // Kv commits past a commit's [`BATCH_KV_BYTES`], in the order they came: nothing sent
        // after one waits for it (its sender does, for its answer).
        let mut deferred: std::collections::VecDeque<Op> = std::collections::VecDeque::new();
        loop {
            if last_trim.elapsed() >= trim_every {
                last_trim = std::time::Instant::now();
                trim_every = match self.trim() {
                    Ok(true) => TRIM_AGAIN,
                    Ok(false) => TRIM_EVERY,
                    Err(why) => {
                        tracing::error!(log = %self.path.display(), "event log retention failed: {why}");
                        TRIM_EVERY
                    }
                };
            }
            let first = match deferred.pop_front() {
                Some(op) => Ok(op),
                None => rx.recv_timeout(std::time::Duration::from_millis(100)),
            };
            let first = match first {
                Ok(op) => op,
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    // A failed write reopens the database at the next commit: an idle log
                    // makes one, so retention and readers do not wait for the next event.
                    let failed = self.failed.load(std::sync::atomic::Ordering::Relaxed);
                    #[cfg(test)]
                    if tests::idle_flush_held(&self.path) {
                        continue;
                    }
                    if unsynced || !carried.is_empty() || failed {
                        let outputs = unwritten_output_bytes(&carried);
                        self.answering_from(&in_memory, &carried);
                        match self.commit(std::mem::take(&mut carried), true) {
                            Ok(_) => {
                                unsynced = false;
                                in_memory.clear();
                                self.unwritten.written(outputs);
                            }
                            Err(retry) => carried = in_memory.drain(..).chain(retry).collect(),
                        }
                        in_memory_bytes = 0;
                        last_sync = std::time::Instant::now();
                    }
                    continue;
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => break,
            };
            #[cfg(test)]
            tests::wait_while_gathering_held(&self.path);
            let mut batch = std::mem::take(&mut carried);
            let mut kv_bytes = first.waiting_kv_bytes().unwrap_or(0);
            batch.push(first);
            // What waits goes first, in its order, within the commit's kv bytes.
            while let Some(op) = deferred.front() {
                let bytes = op.waiting_kv_bytes().unwrap_or(0);
                if kv_bytes + bytes > BATCH_KV_BYTES {
                    break;
                }
                kv_bytes += bytes;
                batch.extend(deferred.pop_front());
            }
            while batch.len() < MAX_BATCH {
                let Ok(op) = rx.try_recv() else { break };
                match op.waiting_kv_bytes() {
                    // Past the commit's bytes, or behind a kv commit of its namespace that waits
                    // (a plugin's commits keep their order), it waits too. So does a `sync`
                    // behind what waits: it answers for everything sent before it.
                    Some(bytes) if kv_bytes + bytes > BATCH_KV_BYTES || deferred.iter().any(|d| d.same_kv(&op)) => {
                        deferred.push_back(op)
                    }
                    None if matches!(op, Op::Sync { .. }) && !deferred.is_empty() => deferred.push_back(op),
                    bytes => {
                        kv_bytes += bytes.unwrap_or(0);
                        batch.push(op);
                    }
                }
            }
            #[cfg(test)]
            tests::record_batch(&self.path, &batch);
            // A replay's ack that keeps its row pending too: the kv commit (and outbox) of its
            // attempt was durable, and a crash must not find the outbox without the ack's removal
            // of it (the event would then be released as handled, not run in the history).
            let wants_sync = batch.iter().any(|op| {
                matches!(
                    op,
                    Op::Sync { .. }
                        | Op::Register { .. }
                        | Op::Backfill { .. }
                        | Op::Ack { keep_pending: Some(_), .. }
                        // Rare (a plugin's last subscription going), and a mark kept only in
                        // memory would be lost with a later failed write (review 63d D1).
                        | Op::Away { .. }
                )
            });
            let has_appends = batch.iter().any(|op| matches!(op, Op::Append { .. } | Op::KvCommit { .. }));
            // Acks alone are not synced under `always` (a delivery acked may run again, never
            // lost), but no longer than 100 ms: a plugin working through a backlog while nothing
            // is published acks without a pause, and the idle flush never came.
            let since_sync = last_sync.elapsed();
            let durable = wants_sync
                || match self.sync {
                    SyncPolicy::Always => has_appends || since_sync >= std::time::Duration::from_millis(100),
                    SyncPolicy::Batch => since_sync >= std::time::Duration::from_millis(100),
                    SyncPolicy::None => last_sync.elapsed() >= std::time::Duration::from_secs(5),
                }
                // After a failed write the next commit is durable whatever `bus.sync` says, and
                // once what is kept only in memory (and copied) reaches its bound.
                || self.failed.load(std::sync::atomic::Ordering::Relaxed)
                || in_memory_bytes >= IN_MEMORY_BYTES;
            #[cfg(test)]
            tests::record_commit(&self.path, durable, since_sync);
            let outputs = unwritten_output_bytes(&batch);
            self.answering_from(&in_memory, &batch);
            let committed = self.commit(batch, durable);
            if committed.is_ok() {
                self.unwritten.written(outputs);
            }
            match committed {
                Ok(_) if durable => {
                    unsynced = false;
                    last_sync = std::time::Instant::now();
                    in_memory.clear();
                    in_memory_bytes = 0;
                }
                Ok(kept) => {
                    unsynced = true;
                    in_memory_bytes += kept.bytes;
                    in_memory.extend(kept.redo);
                }
                Err(retry) => {
                    carried = in_memory.drain(..).chain(retry).collect();
                    in_memory_bytes = 0;
                }
            }
        }
        // The host is stopping: make everything on disk (what was deferred went in the commits
        // before: the channel is read as closed only once none is left).
        // (A failed commit threw away what was kept in memory too.) The file is tried whatever
        // the wait after failed writes says: this is its last chance (review 60c L1).
        self.backoff.lock().expect("backoff poisoned").succeeded();
        if let Err(lost) =
            self.commit(carried, true).map_err(|retry| in_memory.into_iter().chain(retry).collect::<Vec<_>>())
            && !lost.is_empty()
        {
            let accepted = lost.iter().filter(|op| matches!(op, Op::Append { dedupe: false, .. })).count();
            tracing::error!(log = %self.path.display(), ops = lost.len(), accepted_events = accepted,
                "the event log could not commit before the stop: accepted events (answered 202 under bus.sync = \"batch\" / \"none\") are lost; \
                 of the rest, what was settled runs again at the next start, and kv writes kept in memory are lost");
        }
    }

    /// After a commit that reached `commit()` reported a failure: whether it landed anyway (its
    /// header reached the file and, say, its `fsync` failed; on some filesystems a full disk
    /// shows only there). The database is reopened to find out, as the next commit would have
    /// to. A landed commit stands: a kv commit answered failed would run its handler again on top
    /// of its own writes. What follows builds on it, so a power cut that undoes it undoes them
    /// too. Only what leaves the process is refused: a producer's `202` and a `sync`.
    fn landed(&self, number: u64) -> bool {
        #[cfg(test)]
        if tests::landed_check_blocked(&self.path) {
            return false;
        }
        self.any_retired.store(true, Relaxed);
        if self.reopen().is_err() {
            // `failed` is set: the next commit tries to reopen again.
            return false;
        }
        let found = self.store.get().ok().and_then(|db| {
            let r = db.begin_read().ok()?;
            let meta = r.open_table(META).ok()?;
            meta.get("commit").ok()?.map(|v| v.value())
        });
        // Not landed: the reopened database is at the last commit that did, which the next
        // commit (durable, as after any failure) builds on; `failed` stays set until then.
        found == Some(number)
    }

    /// Drops settled events beyond the retention (older than `max_age`, or the oldest beyond
    /// `max_mib`), with their output ids; never one a plugin has not settled. `true`: it
    /// stopped at the bound of rows dropped, with more to drop (the next pass comes at once).
    fn trim(&self) -> Result<bool, String> {
        if self.failed.load(std::sync::atomic::Ordering::Relaxed) {
            // The next commit reopens the database; until then it refuses every write.
            return Ok(false);
        }
        let max_bytes = self.retention.max_mib.saturating_mul(1 << 20);
        let cutoff = unix_ms().saturating_sub(self.retention.max_age.as_millis() as u64);
        let mut w = self.store.get()?.begin_write().map_err(|e| e.to_string())?;
        w.set_durability(redb::Durability::None).map_err(|e| e.to_string())?;
        let (mut dropped, mut freed, mut first, mut last) = (0u64, 0u64, None, 0);
        let mut damaged = Vec::new();
        let bytes_left;
        // Where the next pass starts: over again, unless this one stops at a bound.
        let (mut next_from, mut passed_over, mut more_to_drop) = (0, 0, false);
        let dropped_rows;
        let forgotten;
        let any_retired;
        {
            let mut events = w.open_table(ROWS).map_err(|e| e.to_string())?;
            let mut ids = w.open_table(IDS).map_err(|e| e.to_string())?;
            let mut retired = RetiredIds::open(&w)?;
            let pending = w.open_table(PENDING).map_err(|e| e.to_string())?;
            let owing = owing_plugins(&pending)?;
            let mut backfilling = self.backfilling.lock().expect("backfilling poisoned").clone();
            // And new plugins' histories still due (between their steps, or left by a crash).
            for due in w.open_table(HISTORY_DUE).map_err(|e| e.to_string())?.iter().map_err(|e| e.to_string())? {
                let (first, end) = due.map_err(|e| e.to_string())?.1.value();
                backfilling.push(first..end);
            }
            let mut meta = w.open_table(META).map_err(|e| e.to_string())?;
            let mut bytes = meta.get("bytes").map_err(|e| e.to_string())?.map_or(0, |v| v.value());
            let mut retired_bytes = meta.get("retired_bytes").map_err(|e| e.to_string())?.map_or(0, |v| v.value());
            // Whole rows go: a row with an event some plugin owes, or one retention would keep,
            // stays with all its events (a row holds at most one commit's, `rows::ROW_BYTES`).
            let mut doomed = Vec::new();
            // From where the last pass stopped: a row's key is its last sequence number, and a
            // row begins after the one before it (rows are rebuilt whole after a failed commit:
            // the one before is looked up, never assumed).
            let start = self.trim_from.load(Relaxed);
            let mut after = match events.range(..start).map_err(|e| e.to_string())?.next_back() {
                Some(row) => row.map_err(|e| e.to_string())?.0.value(),
                None => 0,
            };
            // Whether a row before the one looked at is kept (passed over by an earlier pass,
            // or by this one): only then may a dropped output's input still run again.
            let kept_before_start = after > 0;
            let mut looked_at = 0usize;
            let (max_passed_over, max_dropped, max_dropped_bytes) = trim_bounds(&self.path);
            // The bytes of the rows dropped so far.
            let mut dropped_bytes = 0u64;
            'rows: for row in events.range(start..).map_err(|e| e.to_string())? {
                let (row_key, stored) = row.map_err(|e| e.to_string())?;
                // Bounded work a pass: the rows passed over (owed, backfilling) and the rows
                // dropped (in count and in bytes) are each bounded; the next pass goes on from
                // here, soon.
                passed_over = looked_at - doomed.len();
                more_to_drop = doomed.len() >= max_dropped || dropped_bytes >= max_dropped_bytes;
                if passed_over >= max_passed_over || more_to_drop {
                    next_from = after + 1;
                    break 'rows;
                }
                looked_at += 1;
                let first_seq = std::mem::replace(&mut after, row_key.value()) + 1;
                // A replay's backfill is still to make some of it pending.
                if backfilling.iter().any(|r| r.start <= row_key.value() && first_seq < r.end) {
                    continue 'rows;
                }
                let (mut left, mut in_row) = (bytes, Vec::new());
                let records = match rows::records(row_key.value(), stored.value()) {
                    Ok(records) => records,
                    Err(why) => {
                        // A damaged row cannot be read or replayed: it goes once no plugin owes
                        // an event in its range (one that does is settled when read back).
                        for plugin in &owing {
                            let owed = (plugin.as_str(), first_seq)..=(plugin.as_str(), row_key.value());
                            if pending.range(owed).map_err(|e| e.to_string())?.next().is_some() {
                                continue 'rows;
                            }
                        }
                        damaged.push((first_seq..=row_key.value(), why));
                        doomed.push((row_key.value(), Vec::new(), false));
                        continue 'rows;
                    }
                };
                for (seq, record) in records {
                    let old = appended_ms(record).is_none_or(|t| t < cutoff);
                    if !old && left <= max_bytes {
                        break 'rows;
                    }
                    for plugin in &owing {
                        if pending.get((plugin.as_str(), seq)).map_err(|e| e.to_string())?.is_some() {
                            continue 'rows;
                        }
                    }
                    left = left.saturating_sub(record.len() as u64);
                    in_row.push((seq, record.len() as u64, decode(record).ok().map(|ev| dedupe_key(&ev))));
                }
                bytes = left;
                dropped_bytes += stored.value().len() as u64;
                let older_kept = kept_before_start || looked_at - 1 > doomed.len();
                doomed.push((row_key.value(), in_row, older_kept));
            }
            if next_from == 0 {
                passed_over = looked_at - doomed.len();
            }
            dropped_rows = doomed.len();
            for (row_key, in_row, older_kept) in doomed {
                events.remove(row_key).map_err(|e| e.to_string())?;
                for (seq, len, key) in in_row {
                    if let Some(key) = key
                        && ids.get(key.as_str()).map_err(|e| e.to_string())?.is_some_and(|v| v.value() == seq)
                    {
                        ids.remove(key.as_str()).map_err(|e| e.to_string())?;
                        // Kept while its input may run again (see `retired_ids`): only while a
                        // row older than it is kept.
                        if older_kept {
                            retired_bytes += retired.retire(&key, seq)?;
                        }
                    }
                    first.get_or_insert(seq);
                    last = seq;
                    dropped += 1;
                    freed += len;
                }
            }
            // The ids no kept row can need: every row older than their output is gone, their
            // input with it (and, past the bound, the oldest).
            let first_kept = events.first().map_err(|e| e.to_string())?.map_or(u64::MAX, |(key, _)| key.value());
            let bound = retired_ids::bound(self.retention.max_mib);
            forgotten = retired.forget(first_kept, &mut retired_bytes, bound, max_dropped)?;
            more_to_drop |= forgotten.more;
            meta.insert("retired_bytes", retired_bytes).map_err(|e| e.to_string())?;
            any_retired = retired.any()?;
            if !damaged.is_empty() {
                // What a damaged row held is unknown: the count starts again from what is kept.
                bytes = 0;
                for row in events.iter().map_err(|e| e.to_string())? {
                    let (key, stored) = row.map_err(|e| e.to_string())?;
                    let records = rows::records(key.value(), stored.value()).unwrap_or_default();
                    bytes += records.iter().map(|(_, record)| record.len() as u64).sum::<u64>();
                }
            }
            meta.insert("bytes", bytes).map_err(|e| e.to_string())?;
            bytes_left = bytes;
        }
        w.commit().map_err(|e| e.to_string())?;
        // Only once committed: a pass that failed is done again from where it began (and its
        // ids are as they were).
        self.trim_from.store(next_from, Relaxed);
        self.any_retired.store(any_retired, Relaxed);
        if next_from > 0 {
            tracing::debug!(log = %self.path.display(), passed_over, rows_dropped = dropped_rows, next_seq = next_from,
                "a retention pass stopped at its bound: the next goes on from here");
        }
        #[cfg(test)]
        tests::record_trim_pass(&self.path, passed_over, dropped_rows);
        for (seqs, why) in damaged {
            tracing::error!(log = %self.path.display(), first_seq = seqs.start(), last_seq = seqs.end(),
                "retention dropped a damaged row of events no plugin owes: {why}");
        }
        if forgotten.over_bound > 0 {
            self.metrics.output_ids_forgotten.inc_by(forgotten.over_bound);
            tracing::warn!(log = %self.path.display(), forgotten = forgotten.over_bound,
                "the ids of outputs retention dropped while an older event is kept take an eighth of \
                 bus.retention.max_mib: the oldest are forgotten, and such an output is delivered again if its \
                 input runs again (a replay, a restart before its ack)");
        }
        self.metrics.record_bytes.set(bytes_left as i64);
        if let Some(first) = first {
            self.metrics.retention_dropped.inc_by(dropped);
            tracing::info!(log = %self.path.display(), dropped, bytes = freed, first_seq = first, last_seq = last,
                "retention dropped settled events (bus.retention)");
        }
        Ok(more_to_drop)
    }

    /// Makes every kept event with a sequence number in `seqs` (appended since `from`'s time,
    /// if it has one) whose subject `matches` pending for `plugin`, in the writer's
    /// transaction, reading whole rows until `max_records` were read; returns their sequence
    /// numbers, those pending already included (a replay delivers them in their place: one
    /// handed back, or one whose producer has yet to decide it), and where the rest begins
    /// when it stopped before `seqs.end`. A damaged row is skipped, logged.
    #[allow(clippy::too_many_arguments)]
    fn backfill_in(
        &self,
        events: &impl ReadableTable<u64, &'static [u8]>,
        pending: &mut redb::Table<(&'static str, u64), ()>,
        plugin: &str,
        matches: &dyn Fn(&str) -> bool,
        from: crate::transport::ReplayFrom,
        seqs: std::ops::Range<u64>,
        max_records: usize,
    ) -> Result<(Vec<u64>, Option<u64>), String> {
        let (mut wanted, mut read, mut bytes, mut rest, mut stopped) = (Vec::new(), 0, 0, None, false);
        let since_ms = from.since_ms();
        // A row's key is its last sequence number: the rows from the one holding `seqs.start`.
        for stored in events.range(seqs.start..).map_err(|e| e.to_string())? {
            let (row_key, stored) = stored.map_err(|e| e.to_string())?;
            let last = row_key.value();
            if read >= max_records || bytes >= BACKFILL_STEP_BYTES {
                stopped = true;
                break;
            }
            // Read up to this row's end: the rest begins after it, if anything is left.
            rest = Some(last + 1).filter(|next| *next < seqs.end);
            // A damaged row cannot be replayed; it must not fail the commit
            // (and every append in it) either.
            let records = match rows::records(row_key.value(), stored.value()) {
                Ok(records) => records,
                Err(why) => {
                    tracing::error!(log = %self.path.display(), plugin = %plugin, last_seq = row_key.value(),
                        "a replay skips a damaged row of events: {why}");
                    continue;
                }
            };
            for (seq, record) in records {
                read += 1;
                bytes += record.len();
                // A time compares with each record's append time (not a
                // search: a clock set back would otherwise hide events).
                if !seqs.contains(&seq) || (since_ms > 0 && appended_ms(record).is_some_and(|t| t < since_ms)) {
                    continue;
                }
                let subject = decode(record).map(|ev| ev.subject).unwrap_or_default();
                if matches(&subject) {
                    wanted.push(seq);
                }
            }
            if rest.is_none() {
                break;
            }
        }
        // Stopped at the end of the log (no row left) or of `seqs`: done.
        if !stopped {
            rest = None;
        }
        for seq in &wanted {
            pending.insert((plugin, *seq), ()).map_err(|e| e.to_string())?;
        }
        Ok((wanted, rest))
    }

    /// Commits one batch; answers every op in it. When the commit failed each op that has a
    /// waiter is told, and the ops nobody waits for (outputs, acks) come back to be tried again.
    fn commit(&self, batch: Vec<Op>, durable: bool) -> Result<KeptInMemory, Vec<Op>> {
        if self.failed.load(std::sync::atomic::Ordering::Relaxed)
            && let Some(why) = self.backoff.lock().expect("backoff poisoned").refusal()
        {
            // Too soon after failed writes: refused as the last one was, the file untouched.
            tracing::debug!(log = %self.path.display(), "event log commit refused: {why}");
            let retry: Vec<Op> = batch.iter().filter_map(Op::retry_copy).collect();
            for op in batch {
                op.fail(&self.path, &why);
            }
            return Err(retry);
        }
        let started = std::time::Instant::now();
        let mut kept_in_memory = KeptInMemory::default();
        let operations = batch.len();
        let (mut appended, mut bytes_kept) = (0u64, 0u64);
        let mut answers: Answers = Vec::new();
        let retry: Vec<Op> = batch.iter().filter_map(Op::retry_copy).collect();
        let mut ops = batch.into_iter();
        let mut registered: Vec<Registered> = Vec::new();
        let mut backfilled: Vec<Backfilled> = Vec::new();
        let mut kv_answers: Vec<KvAnswer> = Vec::new();
        let mut syncs = Vec::new();
        // This commit's number (META `commit`), once its transaction reached `commit()`: a failure
        // reported then may have landed anyway.
        let mut committing = None;
        // How many plugins' histories are due after this commit, when it touched them.
        let mut histories_due = None;
        let result = (|| -> Result<(), String> {
            // After a failed write the first commit is durable, whatever `bus.sync` says: a
            // commit kept only in memory cannot fail on a full disk, so under `sync = "none"` a
            // trickle of events would each be answered 202 and then dropped from the log by the
            // next failed flush and reopen, and ingress would never say the disk is full.
            let reopened = self.failed.load(std::sync::atomic::Ordering::Relaxed);
            if reopened {
                // What the file holds may be older than what was committed (a commit kept in
                // memory only): kept ids are looked for until the next retention pass says.
                self.any_retired.store(true, Relaxed);
                self.reopen()?;
                self.failed.store(false, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(log = %self.path.display(), "event log reopened after a failed write");
            }
            let in_memory_only = !(durable || reopened);
            let mut w = self.store.get()?.begin_write().map_err(|e| e.to_string())?;
            w.set_durability(if durable || reopened { redb::Durability::Immediate } else { redb::Durability::None })
                .map_err(|e| e.to_string())?;
            {
                let mut events = w.open_table(ROWS).map_err(|e| e.to_string())?;
                let mut row = RowBuilder::default();
                let mut pending = w.open_table(PENDING).map_err(|e| e.to_string())?;
                let mut ids = w.open_table(IDS).map_err(|e| e.to_string())?;
                let retired = match self.any_retired.load(Relaxed) {
                    true => Some(RetiredIds::open(&w)?),
                    false => None,
                };
                let mut meta = w.open_table(META).map_err(|e| e.to_string())?;
                let mut next = meta.get("next_seq").map_err(|e| e.to_string())?.map_or(1, |v| v.value());
                // Appends below it are in the log: a commit can fail after its header reached the
                // file (its `fsync` failed), and the reopen then finds it; its appends, done again
                // or retried, must not be stored twice.
                let logged_below = next;
                let mut bytes = meta.get("bytes").map_err(|e| e.to_string())?.map_or(0, |v| v.value());
                let now_ms = unix_ms();
                let mut record = Vec::new();
                for op in ops.by_ref() {
                    match op {
                        Op::Append { seq, done: None, .. } if seq < logged_below => {}
                        Op::Append { seq, event, plugins, dedupe, done, appended_ms } => {
                            // Every waiter goes into its answers before the first write that can
                            // fail: a failure answers them all with why (a waiter dropped
                            // mid-batch would read "the event log is closed").
                            let answer = done.map(|done| {
                                answers.push((done, Appended::At(seq)));
                                answers.len() - 1
                            });
                            // Past every number handed out, stored or not: a duplicate's was
                            // given to live plugins, and one a restart handed out again could
                            // meet what they left under it (an outbox).
                            next = next.max(seq + 1);
                            let key = dedupe_key(&event);
                            // One lookup: the insert answers whether the id was there (then the
                            // first sequence number is put back).
                            let before = match dedupe {
                                true => ids.insert(key.as_str(), seq).map_err(|e| e.to_string())?.map(|v| v.value()),
                                false => None,
                            };
                            // The first copy counts only while it can be read: one in a damaged
                            // row is logged again (the insert above pointed the id at it), so
                            // its input's re-run regenerates what the damage lost.
                            let before = match before.filter(|first| row.holds(*first) || readable(&events, *first)) {
                                Some(first) => {
                                    ids.insert(key.as_str(), first).map_err(|e| e.to_string())?;
                                    Some(first)
                                }
                                // Its first copy went with retention while its input was kept
                                // (it was delivered: its targets settled it).
                                None => match (dedupe, &retired) {
                                    (true, Some(retired)) => {
                                        let first = retired.first_copy(&key)?;
                                        if first.is_some() {
                                            ids.remove(key.as_str()).map_err(|e| e.to_string())?;
                                        }
                                        first
                                    }
                                    _ => None,
                                },
                            };
                            if let Some(first) = before {
                                match answer {
                                    Some(i) => answers[i].1 = Appended::Duplicate(first),
                                    None => tracing::warn!(log = %self.path.display(), event_id = %event.id,
                                        "an output logged before was delivered again"),
                                }
                                continue;
                            }
                            let appended_ms = appended_ms.unwrap_or(now_ms);
                            bytes += row.push(seq, |out| encode(&event, appended_ms, out)) as u64;
                            if row.is_full() {
                                row.flush(&mut events).map_err(|e| e.to_string())?;
                            }
                            appended += 1;
                            for p in &plugins {
                                pending.insert((&**p, seq), ()).map_err(|e| e.to_string())?;
                            }
                            if in_memory_only {
                                let cost = append_cost(&event, &plugins);
                                let redo = Op::Append {
                                    seq,
                                    event,
                                    plugins,
                                    dedupe,
                                    done: None,
                                    appended_ms: Some(appended_ms),
                                };
                                kept_in_memory.keep(redo, cost);
                            }
                        }
                        Op::Ack { plugin, seq, keep_pending } => {
                            if self.outboxed.lock().expect("outboxed poisoned").remove(&(plugin.clone(), seq)) {
                                w.open_table(OUTBOX)
                                    .map_err(|e| e.to_string())?
                                    .remove((&*plugin, seq))
                                    .map_err(|e| e.to_string())?;
                            }
                            let in_history = match keep_pending {
                                None => false,
                                Some(0) => true,
                                Some(since_ms) => {
                                    // Its record's append time, as the backfill compares it.
                                    row.flush(&mut events).map_err(|e| e.to_string())?;
                                    // A read that fails fails the commit (the ack is tried
                                    // again): it must not settle an event of the history.
                                    let appended = match Lookup::new(&events).get(seq) {
                                        Ok(record) => record.and_then(appended_ms),
                                        Err(LookupError::Damaged(_)) => None,
                                        Err(LookupError::Storage(why)) => return Err(why),
                                    };
                                    appended.is_some_and(|t| t >= since_ms)
                                }
                            };
                            if !in_history {
                                pending.remove((&*plugin, seq)).map_err(|e| e.to_string())?;
                            }
                            if in_memory_only {
                                kept_in_memory.keep(Op::Ack { plugin, seq, keep_pending }, 64);
                            }
                        }
                        Op::Sync { done } => syncs.push(done),
                        Op::KvCommit { ns, txn, outbox, done } => {
                            // Answered before the first write that can fail (see `Append`).
                            let answer = done.map(|done| {
                                kv_answers.push((done, Ok(())));
                                kv_answers.len() - 1
                            });
                            let mut kv = w.open_table(KV).map_err(|e| e.to_string())?;
                            let mut conflict = None;
                            // Applied again: it was checked when first applied, in this order.
                            for (key, seen) in txn.reads.iter().filter(|_| answer.is_some()) {
                                let now = kv
                                    .get(kv_key(&ns, key).as_str())
                                    .map_err(|e| e.to_string())?
                                    .map_or(0, |v| stored_kv(v.value()).0);
                                if now != *seen {
                                    conflict = Some(key.clone());
                                    break;
                                }
                            }
                            if let (Some(key), Some(answer)) = (conflict, answer) {
                                kv_answers[answer].1 = Err(crate::kv::KvError::Conflict(key));
                                continue;
                            }
                            // Refused whole past the namespace's quota (a copy applied again has
                            // none: it passed when first applied, and only its count is redone).
                            let mut usage = w.open_table(crate::kv::quota::USAGE).map_err(|e| e.to_string())?;
                            let charged = crate::kv::quota::charge(&mut usage, &ns, &txn, |key| {
                                let stored = kv
                                    .get(kv_key(&ns, key).as_str())
                                    .map_err(|e| crate::kv::KvError::Unavailable(e.to_string()))?;
                                Ok(stored.map(|v| crate::kv::quota::value_len(v.value())))
                            });
                            match charged {
                                Ok(()) => {}
                                Err(e @ crate::kv::KvError::Quota { .. }) => {
                                    if let Some(answer) = answer {
                                        kv_answers[answer].1 = Err(e);
                                    }
                                    continue;
                                }
                                Err(e) => return Err(e.to_string()),
                            }
                            if in_memory_only && !txn.writes.is_empty() {
                                kept_in_memory.keep(kv_replay(&ns, &txn, &outbox), kv_cost(&ns, &txn, &outbox));
                            }
                            let version = meta.get("kv_clock").map_err(|e| e.to_string())?.map_or(0, |v| v.value()) + 1;
                            meta.insert("kv_clock", version).map_err(|e| e.to_string())?;
                            crate::kv::quota::counted_at(&mut meta, version).map_err(|e| e.to_string())?;
                            for (key, value) in &txn.writes {
                                let k = kv_key(&ns, key);
                                match value {
                                    Some(v) => {
                                        let mut stored = Vec::with_capacity(8 + v.len());
                                        stored.extend_from_slice(&version.to_le_bytes());
                                        stored.extend_from_slice(v);
                                        kv.insert(k.as_str(), stored.as_slice()).map_err(|e| e.to_string())?;
                                    }
                                    None => {
                                        kv.remove(k.as_str()).map_err(|e| e.to_string())?;
                                    }
                                }
                            }
                            if let Some(outbox) = outbox {
                                let mut kept = Vec::new();
                                kept.extend_from_slice(&(outbox.outputs.len() as u32).to_le_bytes());
                                for ev in &outbox.outputs {
                                    record.clear();
                                    encode(ev, now_ms, &mut record);
                                    put(&mut kept, &record);
                                }
                                let mut table = w.open_table(OUTBOX).map_err(|e| e.to_string())?;
                                table
                                    .insert((&*outbox.plugin, outbox.seq), kept.as_slice())
                                    .map_err(|e| e.to_string())?;
                                // Kept even if this commit fails: an ack then removes nothing.
                                self.outboxed
                                    .lock()
                                    .expect("outboxed poisoned")
                                    .insert((outbox.plugin.clone(), outbox.seq));
                            }
                        }
                        Op::Away { plugin, seq } => {
                            let subscribers = w.open_table(SUBSCRIBERS).map_err(|e| e.to_string())?;
                            let mut away = w.open_table(AWAY).map_err(|e| e.to_string())?;
                            if subscribers.get(&*plugin).map_err(|e| e.to_string())?.is_some()
                                && away.get(&*plugin).map_err(|e| e.to_string())?.is_none()
                            {
                                away.insert(&*plugin, seq).map_err(|e| e.to_string())?;
                            }
                        }
                        Op::Register { plugin, matches, deliver_all, done } => {
                            // Answered before the first write that can fail (see `Append`).
                            registered.push((done, Registration::default()));
                            let answer = registered.len() - 1;
                            let history = if deliver_all { matches.as_ref() } else { None };
                            let mut subscribers = w.open_table(SUBSCRIBERS).map_err(|e| e.to_string())?;
                            let mut due = w.open_table(HISTORY_DUE).map_err(|e| e.to_string())?;
                            let away = w
                                .open_table(AWAY)
                                .map_err(|e| e.to_string())?
                                .remove(&*plugin)
                                .map_err(|e| e.to_string())?
                                .map(|v| v.value());
                            if subscribers.get(&*plugin).map_err(|e| e.to_string())?.is_none() {
                                subscribers.insert(&*plugin, next).map_err(|e| e.to_string())?;
                                registered[answer].1.new = true;
                                if let Some(matches) = history {
                                    // Every event before the next one appended: those appended
                                    // earlier in this commit too; any after it has the plugin
                                    // as a target already (it is in the bus's table).
                                    row.flush(&mut events).map_err(|e| e.to_string())?;
                                    let all = crate::transport::ReplayFrom::Seq(0);
                                    let (made, rest) = self.backfill_in(
                                        &events,
                                        &mut pending,
                                        &plugin,
                                        &**matches,
                                        all,
                                        0..next,
                                        BACKFILL_STEP_RECORDS,
                                    )?;
                                    registered[answer].1.made = made.len();
                                    if let Some(rest) = rest {
                                        due.insert(&*plugin, (rest, next)).map_err(|e| e.to_string())?;
                                        registered[answer].1.history_due = Some(rest..next);
                                    }
                                }
                            } else if let Some((first, end)) = {
                                let left = due.get(&*plugin).map_err(|e| e.to_string())?;
                                left.map(|v| v.value())
                            } {
                                match (history, &matches) {
                                    (Some(_), _) => {
                                        // Still owing its first history, it is still new: what
                                        // was accepted while it was not subscribed (a step that
                                        // failed took it out of the bus) is history too, up to
                                        // now. None of it was acked: its read-back starts only
                                        // once the history is pending.
                                        row.flush(&mut events).map_err(|e| e.to_string())?;
                                        let end = end.max(next);
                                        due.insert(&*plugin, (first, end)).map_err(|e| e.to_string())?;
                                        registered[answer].1.history_due = Some(first..end);
                                    }
                                    // Durable still: what is due (the rest of a history, or of
                                    // what was accepted while it was away) stays due, as a
                                    // JetStream consumer keeps its start.
                                    (None, Some(_)) => registered[answer].1.history_due = Some(first..end),
                                    (None, None) => {
                                        tracing::warn!(log = %self.path.display(), plugin = %plugin, first, end,
                                            "the plugin is no longer durable: the rest of its history (deliver = \
                                             \"all\"), or of what was accepted while it was away, not made pending \
                                             yet, is dropped");
                                        due.remove(&*plugin).map_err(|e| e.to_string())?;
                                    }
                                }
                            }
                            // Known and durable, away since `away`: what was accepted meanwhile is
                            // due as history (review 63a F2). None of it was run: nothing was
                            // pending for it but what an append sent before the mark left (pending
                            // again changes nothing).
                            if let (Some(away), Some(_), false) = (away, &matches, registered[answer].1.new)
                                && away < next
                            {
                                row.flush(&mut events).map_err(|e| e.to_string())?;
                                let now = due.get(&*plugin).map_err(|e| e.to_string())?.map(|v| v.value());
                                let (first, end) = now.map_or((away, next), |(f, e)| (f.min(away), e.max(next)));
                                due.insert(&*plugin, (first, end)).map_err(|e| e.to_string())?;
                                registered[answer].1.history_due = Some(first..end);
                                tracing::info!(log = %self.path.display(), plugin = %plugin, first = away, end = next,
                                    "a durable plugin back after it had no subscription: what was accepted meanwhile is \
                                     delivered to it");
                            }
                        }
                        Op::Backfill { plugin, matches, from, seqs, history, done } => {
                            // Answered before the first write that can fail (see `Append`).
                            backfilled.push((done, (0, None)));
                            let answer = backfilled.len() - 1;
                            // A step of a history goes on only from where the log says it is:
                            // another subscription's steps (never two at once today) would
                            // otherwise make pending again what was acked since.
                            if history {
                                let due = w.open_table(HISTORY_DUE).map_err(|e| e.to_string())?;
                                let now = due.get(&*plugin).map_err(|e| e.to_string())?.map(|v| v.value());
                                if now != Some((seqs.start, seqs.end)) {
                                    continue;
                                }
                            }
                            // The events appended earlier in this commit are read too.
                            row.flush(&mut events).map_err(|e| e.to_string())?;
                            let end = seqs.end;
                            let (made, rest) = self.backfill_in(
                                &events,
                                &mut pending,
                                &plugin,
                                &*matches,
                                from,
                                seqs,
                                BACKFILL_STEP_RECORDS,
                            )?;
                            if history {
                                let mut due = w.open_table(HISTORY_DUE).map_err(|e| e.to_string())?;
                                match rest {
                                    Some(rest) => drop(due.insert(&*plugin, (rest, end)).map_err(|e| e.to_string())?),
                                    None => drop(due.remove(&*plugin).map_err(|e| e.to_string())?),
                                }
                            }
                            backfilled[answer].1 = (made.len(), rest);
                        }
                    }
                }
                row.flush(&mut events).map_err(|e| e.to_string())?;
                meta.insert("next_seq", next).map_err(|e| e.to_string())?;
                meta.insert("bytes", bytes).map_err(|e| e.to_string())?;
                let number = meta.get("commit").map_err(|e| e.to_string())?.map_or(0, |v| v.value()) + 1;
                meta.insert("commit", number).map_err(|e| e.to_string())?;
                if !registered.is_empty() || !backfilled.is_empty() {
                    histories_due =
                        Some(w.open_table(HISTORY_DUE).map_err(|e| e.to_string())?.len().map_err(|e| e.to_string())?);
                }
                committing = Some(number);
                bytes_kept = bytes;
            }
            w.commit().map_err(|e| e.to_string())?;
            #[cfg(test)]
            if tests::injected_failure_after_landing(&self.path, !syncs.is_empty()) {
                return Err("injected: the commit landed, then reported a failure".into());
            }
            Ok(())
        })();
        self.metrics.commits.inc();
        self.metrics.commit_seconds.observe(started.elapsed().as_secs_f64());
        self.metrics.commit_operations.observe(operations as f64);
        // A commit that landed after reporting a failure stands (nothing in it is done twice), but
        // nobody is told it is durable: its `fsync` may be what failed.
        let mut not_durable = None;
        let result = match (result, committing) {
            (Err(why), Some(number)) if self.landed(number) => {
                self.metrics.commit_failures.inc();
                tracing::error!(log = %self.path.display(),
                    "an event log commit reported a failure after it reached the file ({why}): it stands (its kv writes, \
                     outputs and acks are not done again), but its appends' producers are refused (their events are \
                     delivered all the same; one sent again is kept twice: at least once)");
                not_durable = Some(why);
                Ok(())
            }
            (result, _) => result,
        };
        let sync_not_on_disk = || {
            not_durable.as_ref().map(|why| LogError::Io {
                path: self.path.clone(),
                why: format!("{why} (the commit reached the file but may not be on disk)"),
            })
        };
        match result {
            Ok(()) => {
                // What a reopen threw away went again first in this commit: readable again before
                // anyone is answered (one waiting on a `sync` reads at once).
                self.store.caught_up();
                self.metrics.appended.inc_by(appended);
                self.metrics.record_bytes.set(bytes_kept as i64);
                if let Some(due) = histories_due {
                    self.metrics.histories_due.set(due as i64);
                }
                for (done, appended) in answers {
                    let answer = match (&not_durable, appended) {
                        (Some(why), Appended::At(seq)) => {
                            Err(LogError::NotOnDisk { path: self.path.clone(), seq, why: why.clone() })
                        }
                        _ => Ok(appended),
                    };
                    let _ = done.send(answer);
                }
                for (done, new) in registered {
                    let _ = done.send(Ok(new));
                }
                for (done, result) in kv_answers {
                    let _ = done.send(result);
                }
                for (done, made) in backfilled {
                    let _ = done.send(Ok(made));
                }
                // Last: a `sync` answers for everything sent before it, so whoever waits on it
                // finds those answered too (a commit of a kv write deferred with it included).
                for done in syncs {
                    let _ = done.send(sync_not_on_disk().map_or(Ok(()), Err));
                }
                self.backoff.lock().expect("backoff poisoned").succeeded();
                Ok(kept_in_memory)
            }
            Err(why) => {
                self.metrics.commit_failures.inc();
                tracing::error!(log = %self.path.display(), outputs_and_acks_kept_to_retry = retry.len(),
                    "event log commit failed: {why}");
                self.failed.store(true, std::sync::atomic::Ordering::Relaxed);
                self.backoff.lock().expect("backoff poisoned").failed(&why);
                for (done, _) in answers {
                    let _ = done.send(Err(LogError::Io { path: self.path.clone(), why: why.clone() }));
                }
                for (done, _) in registered {
                    let _ = done.send(Err(LogError::Io { path: self.path.clone(), why: why.clone() }));
                }
                for (done, _) in kv_answers {
                    let _ = done.send(Err(crate::kv::KvError::Unavailable(why.clone())));
                }
                for (done, _) in backfilled {
                    let _ = done.send(Err(LogError::Io { path: self.path.clone(), why: why.clone() }));
                }
                for done in syncs {
                    let _ = done.send(Err(LogError::Io { path: self.path.clone(), why: why.clone() }));
                }
                for op in ops {
                    op.fail(&self.path, &why);
                }
                Err(retry)
            }
        }
    }
}

/// An outbox entry's outputs: their count (`u32` LE), then each record with its length.
fn decode_outbox(stored: &[u8]) -> Result<Vec<Arc<Event>>, String> {
    let mut r = Reader(stored);
    let n = r.u32()?;
    let mut outputs = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        outputs.push(Arc::new(decode(r.bytes()?)?));
    }
    Ok(outputs)
}

/// The record format of one event: a version byte, the append time (unix ms, `u64` LE), then
/// each field as a little-endian `u32` length and its bytes (`datacontenttype` and `reply_to`
/// with a presence byte first).
const RECORD_VERSION: u8 = 1;

fn put(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
    out.extend_from_slice(bytes);
}

fn put_opt(out: &mut Vec<u8>, value: Option<&str>) {
    match value {
        Some(v) => {
            out.push(1);
            put(out, v.as_bytes());
        }
        None => out.push(0),
    }
}

/// The key under which an output's (source, id) is remembered. An output's id is a hash, so it
/// is prefixed with its input's id (a time-ordered UUIDv7): new keys land at the end of the
/// B-tree, next to each other, instead of dirtying a random page each.
fn dedupe_key(event: &Event) -> String {
    match event.header("plugbus-caused-by") {
        Some(input) => format!("{input}\u{0}{}\u{0}{}", event.source, event.id),
        None => format!("{}\u{0}{}", event.source, event.id),
    }
}

/// A kv value as the log stores it: its version (8 bytes, little-endian), then the value. One
/// shorter than 8 bytes (damaged) reads as version 0 with what it holds as the value: the one
/// read of it, so neither a read nor the writer's conflict check can panic on it (the writer's
/// thread ending would stop every append).
fn stored_kv(stored: &[u8]) -> (u64, &[u8]) {
    match stored.split_first_chunk::<8>() {
        Some((version, value)) => (u64::from_le_bytes(*version), value),
        None => (0, stored),
    }
}

fn kv_key(ns: &str, key: &str) -> String {
    format!("{ns}\u{0}{key}")
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// When the record was appended.
fn appended_ms(stored: &[u8]) -> Option<u64> {
    stored.get(1..9).map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")))
}

pub(crate) fn encode(ev: &Event, appended_ms: u64, out: &mut Vec<u8>) {
    out.push(RECORD_VERSION);
    out.extend_from_slice(&appended_ms.to_le_bytes());
    for field in [&ev.id, &ev.source, &ev.ty, &ev.subject, &ev.time] {
        put(out, field.as_bytes());
    }
    put_opt(out, ev.datacontenttype.as_deref());
    put_opt(out, ev.reply_to.as_deref());
    out.extend_from_slice(&(ev.extensions.len() as u32).to_le_bytes());
    for (k, v) in &ev.extensions {
        put(out, k.as_bytes());
        put(out, v.as_bytes());
    }
    put(out, &ev.data);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err(format!("record ends {} bytes early", n - self.0.len()));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn u32(&mut self) -> Result<usize, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()?;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|e| format!("a text field is not UTF-8: {e}"))
    }
    fn opt(&mut self) -> Result<Option<String>, String> {
        match self.take(1)?[0] {
            0 => Ok(None),
            1 => self.string().map(Some),
            b => Err(format!("bad presence byte {b}")),
        }
    }
}

pub(crate) fn decode(stored: &[u8]) -> Result<Event, String> {
    let mut r = Reader(stored);
    let version = r.take(1)?[0];
    if version != RECORD_VERSION {
        return Err(format!("unknown record version {version}"));
    }
    r.take(8)?;
    let (id, source, ty, subject, time) = (r.string()?, r.string()?, r.string()?, r.string()?, r.string()?);
    let (datacontenttype, reply_to) = (r.opt()?, r.opt()?);
    let n = r.u32()?;
    let mut extensions = Vec::with_capacity(n.min(1024));
    for _ in 0..n {
        extensions.push((r.string()?, r.string()?));
    }
    let data = bytes::Bytes::copy_from_slice(r.bytes()?);
    if !r.0.is_empty() {
        return Err(format!("{} bytes after the record", r.0.len()));
    }
    Ok(Event { id, source, ty, subject, time, datacontenttype, extensions, data, reply_to })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn sample() -> Event {
        let mut ev = Event::new("orders.created", "{\"x\":1}").with_header("tenant", "acme");
        ev.datacontenttype = Some("application/json".into());
        ev
    }

    #[test]
    fn records_round_trip_and_damage_is_named() {
        let ev = sample();
        let mut buf = Vec::new();
        encode(&ev, 1, &mut buf);
        assert_eq!(decode(&buf).unwrap(), ev);
        assert!(decode(&buf[..buf.len() - 1]).unwrap_err().contains("ends 1 bytes early"));
        buf[0] = 9;
        assert!(decode(&buf).unwrap_err().contains("unknown record version 9"));
    }

    #[tokio::test]
    async fn unsettled_deliveries_survive_a_reopen_and_acks_settle_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        {
            let log = DurableLog::open(&path, SyncPolicy::Always).unwrap();
            let s1 = log.append(Arc::new(sample()), vec![a.clone(), b.clone()], false).await.unwrap();
            let s2 = log.append(Arc::new(sample()), vec![a.clone()], false).await.unwrap();
            assert_eq!((s1, s2), (Appended::At(1), Appended::At(2)));
            log.ack(a.clone(), 1);
            log.sync().await.unwrap();
        }
        // The writer thread of the first handle lets go of the file when its sender is dropped.
        let log = loop {
            match DurableLog::open(&path, SyncPolicy::Always) {
                Ok(log) => break log,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        let seqs = |p: &str| log.unsettled(p).unwrap().iter().map(|u| u.seq).collect::<Vec<_>>();
        assert_eq!(seqs("a"), vec![2]);
        assert_eq!(seqs("b"), vec![1]);
        assert_eq!(log.unsettled("a").unwrap()[0].event.subject, "orders.created");
        let s3 = log.append(Arc::new(sample()), vec![], false).await.unwrap();
        assert_eq!(s3, Appended::At(3), "sequence numbers continue after a reopen");
        // Read back to run again: remembered until settled, then forgotten (a replay of a
        // million events must not keep a million ids).
        let id = log.unsettled("b").unwrap()[0].event.id.clone();
        assert!(log.was_redelivered(&id));
        assert_eq!(log.redelivered_pending(), 2, "a's 2 and b's 1");
        log.ack(a.clone(), 2);
        log.ack(b.clone(), 1);
        assert_eq!(log.redelivered_pending(), 0);
        assert!(!log.was_redelivered(&id));
    }

    #[tokio::test]
    async fn an_output_appended_twice_is_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), SyncPolicy::Always).unwrap();
        let out = Arc::new(sample());
        assert_eq!(log.append(out.clone(), vec!["p".into()], true).await.unwrap(), Appended::At(1));
        assert!(matches!(log.append(out, vec!["p".into()], true).await.unwrap(), Appended::Duplicate(_)));
        assert_eq!(log.unsettled("p").unwrap().len(), 1);
    }

    /// A copy of an output logged before is not stored, but its sequence number was handed out
    /// (and the bus gave it to live plugins with it): a restart must not hand it out again, or
    /// what a plugin left under it (its outbox) would be taken for a new event's (review 55a 1).
    #[tokio::test]
    async fn a_sequence_number_a_duplicate_was_given_is_not_given_again_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let dup = {
            let log = DurableLog::open(&path, SyncPolicy::Always).unwrap();
            let out = Arc::new(sample());
            assert_eq!(log.append(out.clone(), vec!["p".into()], true).await.unwrap(), Appended::At(1));
            let dup = log.append_nowait(out, vec!["p".into()]).unwrap();
            log.sync().await.unwrap();
            assert_eq!(log.unsettled("p").unwrap().len(), 1, "the copy is not stored");
            dup
        };
        let log = loop {
            match DurableLog::open(&path, SyncPolicy::Always) {
                Ok(log) => break log,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        let Appended::At(next) = log.append(Arc::new(sample()), vec![], false).await.unwrap() else {
            panic!("a new event is stored")
        };
        assert!(next > dup, "{next} was given to the duplicate before the restart");
    }

    #[tokio::test]
    async fn the_writer_counts_its_commits_what_they_held_and_what_it_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = DurableLog::open(&path, SyncPolicy::Always).unwrap();
        let p: Arc<str> = "p".into();
        // 20 appends waiting at once, then one duplicate and 20 acks
        let appends = (0..20).map(|_| log.append(Arc::new(sample()), vec![p.clone()], false));
        futures::future::join_all(appends).await;
        let out = Arc::new(sample());
        log.append(out.clone(), vec![], true).await.unwrap();
        assert!(matches!(log.append(out, vec![], true).await.unwrap(), Appended::Duplicate(_)));
        for seq in 1..=20 {
            log.ack(p.clone(), seq);
        }
        log.sync().await.unwrap();
        let m = log.metrics();
        assert_eq!(m.appended.get(), 21, "the duplicate is not appended");
        let commits = m.commits.get();
        assert!((1..=43).contains(&commits), "{commits} commits");
        assert_eq!(m.commit_failures.get(), 0);
        let bytes = m.record_bytes.get();
        assert!(bytes > 0);
        // what the log keeps is known again after a restart
        drop(log);
        let log = DurableLog::open(&path, SyncPolicy::Always).unwrap();
        assert_eq!(log.metrics().record_bytes.get(), bytes);
    }

    /// Retention keeps what a replay's backfill is still making pending, step by step: between
    /// two steps it could drop a settled event the next step was to reach (the history then
    /// had a silent gap).
    #[tokio::test]
    async fn retention_keeps_the_range_a_backfill_is_making_pending() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention { max_age: std::time::Duration::ZERO, max_mib: 1024 };
        let log = DurableLog::open_with(&dir.path().join("bus.redb"), SyncPolicy::Always, retention).unwrap();
        let backfill = Backfilling::new(&log, 0..u64::MAX);
        for _ in 0..3 {
            log.append(Arc::new(sample()), vec![], false).await.unwrap();
        }
        // Retention runs about once a second.
        tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
        assert_eq!(log.read(0, 10).unwrap().len(), 3, "retention dropped what a backfill was reading");
        drop(backfill);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !log.read(0, 10).unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline, "retention kept settled events with no backfill");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// A log whose oldest rows a plugin still owes (one removed while it owed them, say) is
    /// trimmed in passes of a bounded number of rows, each going on from where the last stopped:
    /// every pass used to read every pinned row, on the writer's thread, once a second.
    #[tokio::test]
    async fn retention_reads_a_bounded_number_of_rows_a_pass_and_goes_on_where_it_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        // 3 rows passed over and 2 dropped a pass at most
        tests::TRIM_BOUNDS_FOR.lock().unwrap().push((path.clone(), (3, 2, u64::MAX), Vec::new()));
        let retention = Retention { max_age: std::time::Duration::ZERO, max_mib: 1024 };
        let log = DurableLog::open_with(&path, SyncPolicy::Always, retention).unwrap();
        let p: Arc<str> = "p".into();
        // 7 rows owed by `p`, then 4 nobody owes (a commit each: a row each)
        let mut owed = Vec::new();
        for i in 0..11 {
            let owers = if i < 7 { vec![p.clone()] } else { vec![] };
            let Appended::At(seq) = log.append(Arc::new(sample()), owers, false).await.unwrap() else {
                panic!("appended")
            };
            if i < 7 {
                owed.push(seq);
            }
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        while log.metrics().retention_dropped.get() < 4 {
            assert!(std::time::Instant::now() < deadline, "dropped {}", log.metrics().retention_dropped.get());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let left: Vec<u64> = log.read(0, 20).unwrap().iter().map(|(seq, _)| *seq).collect();
        assert_eq!(left, owed, "what p owes stays, the rest goes");
        let passes = tests::TRIM_BOUNDS_FOR.lock().unwrap().iter().find(|(q, ..)| *q == path).unwrap().2.clone();
        assert!(passes.iter().all(|(over, dropped)| *over <= 3 && *dropped <= 2), "a pass past its bounds: {passes:?}");
        assert!(passes.iter().filter(|(over, _)| *over == 3).count() >= 2, "the 7 owed rows took one pass: {passes:?}");
        assert!(
            passes.iter().filter(|(_, dropped)| *dropped == 2).count() >= 2,
            "the 4 free rows took one pass: {passes:?}"
        );
        tests::TRIM_BOUNDS_FOR.lock().unwrap().retain(|(q, ..)| *q != path);
    }

    /// A pass drops a bounded number of bytes too (each row it drops is read whole on the
    /// writer's thread): one of 1 byte at most drops one row, and the next goes on at once.
    #[tokio::test]
    async fn retention_drops_a_bounded_number_of_bytes_a_pass() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        tests::TRIM_BOUNDS_FOR.lock().unwrap().push((path.clone(), (100, 100, 1), Vec::new()));
        let retention = Retention { max_age: std::time::Duration::ZERO, max_mib: 1024 };
        let log = DurableLog::open_with(&path, SyncPolicy::Always, retention).unwrap();
        // 4 rows nobody owes (a commit each: a row each)
        for _ in 0..4 {
            log.append(Arc::new(sample()), vec![], false).await.unwrap();
        }
        dropped_at_least(&log, 4).await;
        let passes = tests::TRIM_BOUNDS_FOR.lock().unwrap().iter().find(|(q, ..)| *q == path).unwrap().2.clone();
        tests::TRIM_BOUNDS_FOR.lock().unwrap().retain(|(q, ..)| *q != path);
        assert!(passes.iter().all(|(_, dropped)| *dropped <= 1), "a pass past its bytes: {passes:?}");
        assert_eq!(passes.iter().filter(|(_, dropped)| *dropped == 1).count(), 4, "{passes:?}");
    }

    #[tokio::test]
    async fn retention_drops_settled_history_and_never_an_unsettled_event() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention { max_age: std::time::Duration::ZERO, max_mib: 1024 };
        let log = DurableLog::open_with(&dir.path().join("bus.redb"), SyncPolicy::Always, retention).unwrap();
        let (p, q, z): (Arc<str>, Arc<str>, Arc<str>) = ("p".into(), "q".into(), "z".into());
        log.append(Arc::new(sample()), vec![], false).await.unwrap();
        let Appended::At(kept) = log.append(Arc::new(sample()), vec![p.clone(), q.clone()], false).await.unwrap()
        else {
            panic!("appended")
        };
        let out = Arc::new(sample());
        log.append(out.clone(), vec![], true).await.unwrap();
        dropped_at_least(&log, 2).await;
        let left: Vec<u64> = log.read(0, 10).unwrap().iter().map(|(seq, _)| *seq).collect();
        assert_eq!(left, vec![kept], "the unsettled event stays");
        // Another plugin owing an event of its own does not keep this one.
        let Appended::At(other) = log.append(Arc::new(sample()), vec![z.clone()], false).await.unwrap() else {
            panic!("appended")
        };
        log.ack(p, kept);
        tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
        let left: Vec<u64> = log.read(0, 10).unwrap().iter().map(|(seq, _)| *seq).collect();
        assert_eq!(left, vec![kept, other], "q still owes it");
        log.ack(q, kept);
        dropped_at_least(&log, 3).await;
        log.ack(z, other);
        dropped_at_least(&log, 4).await;
        assert!(log.read(0, 10).unwrap().is_empty());
        assert_eq!(log.metrics().record_bytes.get(), 0, "nothing kept, nothing counted");
        assert_eq!(log.metrics().retention_dropped.get(), 4);
        // Its output id went with it: the same output may be logged again.
        assert_eq!(log.append(out, vec![], true).await.unwrap(), Appended::At(5));
    }

    /// Waits (up to 10 s) until retention dropped at least `n` events since the log opened.
    async fn dropped_at_least(log: &DurableLog, n: u64) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let dropped = || log.metrics().retention_dropped.get();
        while dropped() < n {
            assert!(std::time::Instant::now() < deadline, "dropped {} of {n}", dropped());
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// An output whose targets settled it goes with retention while its input is still owed
    /// (its delivery waits to publish the next output, or a kill came before its ack). The
    /// input then runs again: its output was delivered once, and must not be logged again.
    #[tokio::test]
    async fn an_output_retention_dropped_while_its_input_is_kept_is_not_logged_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let retention = Retention { max_age: std::time::Duration::ZERO, max_mib: 1024 };
        let log = reopen(&path, retention.clone()).await;
        let p: Arc<str> = "p".into();
        let Appended::At(input) = log.append(Arc::new(sample()), vec![p.clone()], false).await.unwrap() else {
            panic!("appended")
        };
        let out = Arc::new(sample().with_header("plugbus-caused-by", "plugbus\u{0}the-input"));
        let Appended::At(first) = log.append(out.clone(), vec![], true).await.unwrap() else { panic!("appended") };
        dropped_at_least(&log, 1).await;
        let left: Vec<u64> = log.read(0, 10).unwrap().iter().map(|(seq, _)| *seq).collect();
        assert_eq!(left, vec![input], "the output went, its input stays");
        assert_eq!(
            log.append(out.clone(), vec![], true).await.unwrap(),
            Appended::Duplicate(first),
            "an output delivered once was logged again when its input ran again"
        );
        drop(log);
        let log = reopen(&path, retention.clone()).await;
        assert_eq!(log.append(out.clone(), vec![], true).await.unwrap(), Appended::Duplicate(first), "after a restart");
        // Once its input is settled and gone, nothing runs it again: the id is let go.
        log.ack(p, input);
        dropped_at_least(&log, 1).await;
        assert!(log.read(0, 10).unwrap().is_empty());
        assert!(matches!(log.append(out, vec![], true).await.unwrap(), Appended::At(_)), "the id was kept for ever");
    }

    /// A plugin owing an old event for days keeps every later output's id: they stay within an
    /// eighth of `max_mib` (at least 64 KiB), the oldest let go first, and counted.
    #[tokio::test]
    async fn ids_kept_past_their_rows_stay_within_their_bound_oldest_let_go_first() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Retention { max_age: std::time::Duration::ZERO, max_mib: 0 };
        let log = reopen(&dir.path().join("bus.redb"), retention).await;
        log.append(Arc::new(sample()), vec!["p".into()], false).await.unwrap();
        let outputs: Vec<Arc<Event>> = (0..1_000).map(|_| Arc::new(sample())).collect();
        for chunk in outputs.chunks(100) {
            futures::future::join_all(chunk.iter().map(|out| log.append(out.clone(), vec![], true))).await;
        }
        dropped_at_least(&log, 1_000).await;
        let forgotten = log.metrics().output_ids_forgotten.get();
        let kept = 65_536 / (2 * dedupe_key(&outputs[0]).len() as u64 + 16);
        assert!((1_000 - kept..=1_000 - kept + 1).contains(&forgotten), "{forgotten} ids let go, {kept} fit");
        assert!(matches!(log.append(outputs[0].clone(), vec![], true).await.unwrap(), Appended::At(_)), "the oldest");
        assert!(
            matches!(log.append(outputs[999].clone(), vec![], true).await.unwrap(), Appended::Duplicate(_)),
            "the newest"
        );
    }

    /// A damaged `next_seq` (behind the last event kept) never makes new events overwrite kept
    /// ones: the log goes on after its last row.
    #[tokio::test]
    async fn a_next_seq_behind_the_last_event_never_overwrites_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let p: Arc<str> = "p".into();
        let first = {
            let log = DurableLog::open(&path, SyncPolicy::Always).unwrap();
            for _ in 0..3 {
                log.append(Arc::new(sample()), vec![p.clone()], false).await.unwrap();
            }
            log.read(0, 10).unwrap()[0].1.id.clone()
        };
        // the log's writer lets go of the file when the log is dropped
        let db = open_when_free(&path).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(META).unwrap().insert("next_seq", 1).unwrap();
        w.commit().unwrap();
        drop(db);
        let log = DurableLog::open(&path, SyncPolicy::Always).unwrap();
        assert_eq!(log.append(Arc::new(sample()), vec![p.clone()], false).await.unwrap(), Appended::At(4));
        let read = log.read(0, 10).unwrap();
        assert_eq!(read.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![1, 2, 3, 4]);
        assert_eq!(read[0].1.id, first, "event 1 was overwritten");
        assert_eq!(log.unsettled("p").unwrap().len(), 4);
    }

    /// Review 59c L1: a META count at `u64::MAX` (a damaged or hostile file) overflowed at the
    /// next commit: a panic of the writer in a debug build, a wrap in a release one (`kv_clock`
    /// wrapping passes stale kv read checks). Now the open refuses, naming it.
    #[tokio::test]
    async fn a_count_past_any_a_log_reaches_fails_the_open_naming_it() {
        for counter in ["commit", "kv_clock"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("bus.redb");
            drop(DurableLog::open(&path, SyncPolicy::Always).unwrap());
            let db = open_when_free(&path).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(META).unwrap().insert(counter, u64::MAX).unwrap();
            w.commit().unwrap();
            drop(db);
            let Err(e) = DurableLog::open(&path, SyncPolicy::Always) else { panic!("{counter} at u64::MAX opened") };
            let e = e.to_string();
            assert!(e.contains("damaged") && e.contains(&format!("its {counter} count")), "{e}");
        }
    }

    #[tokio::test]
    async fn a_log_from_before_rows_opens_with_its_unsettled_deliveries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        // The layout before rows: an event per row of `events`.
        let legacy: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
        let (first, second) = (sample(), Event::new("orders.shipped", "{}"));
        {
            let db = Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            {
                let mut events = w.open_table(legacy).unwrap();
                let mut pending = w.open_table(PENDING).unwrap();
                let mut meta = w.open_table(META).unwrap();
                let mut bytes = 0;
                for (seq, ev) in [(1u64, &first), (2, &second)] {
                    let mut record = Vec::new();
                    encode(ev, unix_ms(), &mut record);
                    events.insert(seq, record.as_slice()).unwrap();
                    bytes += record.len() as u64;
                }
                pending.insert(("p", 2), ()).unwrap();
                meta.insert("next_seq", 3).unwrap();
                meta.insert("bytes", bytes).unwrap();
            }
            w.commit().unwrap();
        }
        let log = DurableLog::open(&path, SyncPolicy::Always).unwrap();
        let unsettled = log.unsettled("p").unwrap();
        assert_eq!(
            unsettled.iter().map(|u| (u.seq, u.event.id.clone())).collect::<Vec<_>>(),
            vec![(2, second.id.clone())]
        );
        let read: Vec<_> = log.read(0, 10).unwrap().into_iter().map(|(seq, ev)| (seq, ev.id.clone())).collect();
        assert_eq!(read, vec![(1, first.id.clone()), (2, unsettled[0].event.id.clone())]);
        assert_eq!(log.append(Arc::new(sample()), vec![], false).await.unwrap(), Appended::At(3));
        assert_eq!(log.read(2, 10).unwrap().iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![2, 3]);
    }

    #[tokio::test]
    async fn events_appended_together_share_a_row_and_each_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), SyncPolicy::Always).unwrap();
        let p: Arc<str> = "p".into();
        let appends = (0..50).map(|i| log.append(Arc::new(Event::new(format!("n.{i}"), "x")), vec![p.clone()], false));
        let seqs: Vec<u64> = futures::future::join_all(appends)
            .await
            .into_iter()
            .map(|a| match a.unwrap() {
                Appended::At(seq) => seq,
                Appended::Duplicate(_) => panic!("not a duplicate"),
            })
            .collect();
        assert!(log.metrics().commits.get() < 50, "appends waiting together share commits");
        let unsettled = log.unsettled("p").unwrap();
        assert_eq!(unsettled.iter().map(|u| u.seq).collect::<Vec<_>>(), (1..=50).collect::<Vec<_>>());
        for (i, seq) in seqs.iter().enumerate() {
            let found = log.read_seqs("p", &[*seq]).unwrap();
            assert_eq!(found[0].event.subject, format!("n.{i}"), "seq {seq}");
        }
        assert_eq!(log.read(10, 5).unwrap().iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), vec![10, 11, 12, 13, 14]);
    }

    /// Writes `rows` (seq → stored bytes) straight into the file at `path`, once the log let
    /// go of it: damage as a disk or a bug would leave it.
    async fn write_rows(path: &Path, rows: &[(u64, Vec<u8>)]) {
        write_raw(path, |w| {
            for (seq, bytes) in rows {
                w.open_table(ROWS).unwrap().insert(*seq, bytes.as_slice()).unwrap();
            }
        })
        .await;
    }

    /// Writes straight into the file at `path` in one transaction, once the log let go of it.
    async fn write_raw(path: &Path, write: impl Fn(&redb::WriteTransaction)) {
        loop {
            match Database::create(path) {
                Ok(db) => {
                    let w = db.begin_write().unwrap();
                    write(&w);
                    w.commit().unwrap();
                    return;
                }
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }

    #[tokio::test]
    async fn kv_in_the_log_keeps_each_namespace_under_its_quota_across_a_reopen() {
        use crate::kv::KvStore;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        {
            let log = DurableLog::open(&path, SyncPolicy::Always).unwrap();
            crate::kv::tests::quota_holds(&crate::backend::embedded::kv::LogKv::new(log.clone())).await;
            // a copy applied again after a failed write (no waiter, no quota) is counted, not refused
            let mut t = crate::kv::Txn::with_quota(1);
            t.set("y", vec![7; 100]);
            log.ops.send(kv_replay(&Arc::from("r"), &t, &None)).unwrap();
            log.sync().await.unwrap();
        }
        let log = reopen(&path, Retention::default()).await;
        let kv = crate::backend::embedded::kv::LogKv::new(log.clone());
        crate::kv::tests::quota_counts(&kv, 165).await;
        assert!(kv.get("r", "y").await.unwrap().is_some());
        let mut t = crate::kv::Txn::with_quota(165);
        t.set("z", Vec::new());
        assert!(matches!(kv.commit("r", &t).await, Err(crate::kv::KvError::Quota { holds: 165, .. })));
    }

    #[tokio::test]
    async fn a_transaction_that_only_read_is_checked_in_one_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), SyncPolicy::Always).unwrap();
        crate::kv::tests::read_only_is_checked(&crate::backend::embedded::kv::LogKv::new(log)).await;
    }

    /// A damaged kv value (shorter than its version) used to panic the writer's thread in the
    /// conflict check of a transaction that read it: every append after it failed.
    #[tokio::test]
    async fn a_damaged_kv_value_is_a_conflict_at_most_and_never_stops_the_writer() {
        use crate::kv::KvStore;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        write_raw(&path, |w| {
            w.open_table(KV).unwrap().insert("p\u{0}k", b"abc".as_slice()).unwrap();
        })
        .await;
        let log = DurableLog::open(&path, SyncPolicy::Always).unwrap();
        let kv = crate::backend::embedded::kv::LogKv::new(log.clone());
        let read = kv.get("p", "k").await.unwrap().unwrap();
        assert_eq!((read.version, read.value.as_slice()), (0, b"abc".as_slice()));
        let mut txn = crate::kv::Txn::default();
        txn.reads.insert("k".into(), read.version);
        txn.set("k", b"new".to_vec());
        kv.commit("p", &txn).await.unwrap();
        assert_eq!(kv.get("p", "k").await.unwrap().unwrap().value, b"new");
        let seq = log.append(Arc::new(Event::new("a.b", "")), vec![Arc::from("p")], false).await;
        assert!(seq.is_ok(), "the writer stopped: {seq:?}");
    }

    /// A next sequence number just below the range of requests' outboxes opened: new events
    /// then took keys in it, their acks never settled them, and the next start refused the log
    /// (review 61c L3). The open refuses a count that near, naming the file.
    #[tokio::test]
    async fn a_next_sequence_number_near_the_requests_range_is_refused_at_open() {
        for next in [REQUEST_KEYS - 1, SEQ_LIMIT] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("bus.redb");
            drop(DurableLog::open(&path, SyncPolicy::Always).unwrap());
            write_raw(&path, |w| {
                w.open_table(META).unwrap().insert("next_seq", next).unwrap();
            })
            .await;
            let refused = DurableLog::open(&path, SyncPolicy::Always).map(drop).unwrap_err().to_string();
            assert!(refused.contains("bus.redb") && refused.contains(&format!("({next})")), "{refused}");
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        drop(DurableLog::open(&path, SyncPolicy::Always).unwrap());
        write_raw(&path, |w| {
            w.open_table(META).unwrap().insert("next_seq", SEQ_LIMIT - 1).unwrap();
        })
        .await;
        let log = DurableLog::open(&path, SyncPolicy::Always).unwrap();
        let appended = log.append(Arc::new(Event::new("a.b", "")), vec![Arc::from("p")], false).await.unwrap();
        assert!(matches!(appended, Appended::At(seq) if seq == SEQ_LIMIT - 1));
    }

    #[tokio::test]
    async fn a_log_written_before_kv_quotas_counts_its_kv_at_open_and_again_after_a_rollback() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        write_raw(&path, |w| {
            w.open_table(KV).unwrap().insert("q\u{0}b", [0u8; 108].as_slice()).unwrap();
        })
        .await;
        {
            let log = DurableLog::open(&path, SyncPolicy::Always).unwrap();
            crate::kv::tests::quota_counts(&crate::backend::embedded::kv::LogKv::new(log), 165).await;
        }
        // A version without quotas run on it again (a rollback) writes without counting: its kv
        // clock moved, so the next start counts again.
        write_raw(&path, |w| {
            w.open_table(KV).unwrap().insert("q\u{0}z", [0u8; 1008].as_slice()).unwrap();
            let mut meta = w.open_table(META).unwrap();
            let clock = meta.get("kv_clock").unwrap().unwrap().value();
            meta.insert("kv_clock", clock + 1).unwrap();
        })
        .await;
        let log = DurableLog::open(&path, SyncPolicy::Always).unwrap();
        // 165 + 100 (quota_counts' own write) + "z" with 1,000 bytes (1,065)
        crate::kv::tests::quota_counts(&crate::backend::embedded::kv::LogKv::new(log), 1330).await;
    }

    #[tokio::test]
    async fn a_requests_outbox_left_by_a_crash_is_found_at_the_next_start_and_settled_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let p: Arc<str> = "p".into();
        let output = Arc::new(Event::new("out.x", "o"));
        let left = {
            let log = reopen(&path, Retention::default()).await;
            let (left, settled, no_kv) = (log.request_key(), log.request_key(), log.request_key());
            assert!(left >= REQUEST_KEYS && left < settled);
            commit_with_outbox(&log, left, vec![output.clone()]).await;
            commit_with_outbox(&log, settled, vec![output.clone()]).await;
            log.ack(p.clone(), settled);
            // One that wrote no kv is settled without a log operation (and without harm).
            log.ack(p.clone(), no_kv);
            // This run's own are settled by their deliveries, not taken as left over.
            assert!(log.request_outboxes("p").unwrap().is_empty());
            log.sync().await.unwrap();
            left
        };
        let log = reopen(&path, Retention::default()).await;
        assert!(log.request_key() > left, "keys go on past those left in the log");
        let found = log.request_outboxes("p").unwrap();
        assert_eq!(found.iter().map(|(k, o)| (*k, o[0].id.clone())).collect::<Vec<_>>(), [(left, output.id.clone())]);
        assert!(log.request_outboxes("q").unwrap().is_empty(), "another plugin's are its own");
        log.ack(p.clone(), left);
        log.sync().await.unwrap();
        drop(log);
        let log = reopen(&path, Retention::default()).await;
        assert!(log.request_outboxes("p").unwrap().is_empty(), "settled once, gone");
    }

    #[tokio::test]
    async fn a_damaged_request_outbox_is_left_in_the_log_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        drop(reopen(&path, Retention::default()).await);
        write_raw(&path, |w| {
            w.open_table(OUTBOX).unwrap().insert(("p", REQUEST_KEYS), &[9u8, 0, 0, 0][..]).unwrap();
        })
        .await;
        for _ in 0..2 {
            let log = reopen(&path, Retention::default()).await;
            assert!(log.request_outboxes("p").unwrap().is_empty(), "nothing to publish");
            assert_eq!(log.metrics().damaged_outboxes.get(), 1, "counted at each start it is seen");
            assert!(log.request_key() > REQUEST_KEYS, "a new request never takes its key");
        }
    }

    #[tokio::test]
    async fn an_outbox_is_read_back_with_its_delivery_and_a_damaged_one_leaves_it_pending() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let p: Arc<str> = "p".into();
        let output = Arc::new(Event::new("out.x", "o"));
        let mut seqs = Vec::new();
        {
            let log = reopen(&path, Retention::default()).await;
            for with_outbox in [true, true, false] {
                let Appended::At(seq) = log.append(Arc::new(sample()), vec![p.clone()], false).await.unwrap() else {
                    panic!("appended")
                };
                if with_outbox {
                    commit_with_outbox(&log, seq, vec![output.clone()]).await;
                }
                seqs.push(seq);
            }
            log.sync().await.unwrap();
        }
        let [kept, damaged, plain] = seqs[..] else { unreachable!() };
        // The second delivery's outbox is damaged on disk.
        write_raw(&path, |w| {
            w.open_table(OUTBOX).unwrap().insert(("p", damaged), &[9u8, 0, 0, 0][..]).unwrap();
        })
        .await;
        let log = reopen(&path, Retention::default()).await;
        let page = log.unsettled_page("p", 0..u64::MAX, 100, u64::MAX, Delivered::Again).unwrap();
        let read: Vec<(u64, Option<usize>)> =
            page.deliveries.iter().map(|u| (u.seq, u.handled.as_ref().map(Vec::len))).collect();
        // The damaged one is not run (its kv writes committed): left pending, not settled, counted.
        assert_eq!(read, vec![(kept, Some(1)), (plain, None)]);
        assert_eq!(page.last_seq, Some(plain));
        assert_eq!(log.metrics().damaged_outboxes.get(), 1);
        // The delivery made of it gets the outbox read with it, once.
        assert_eq!(log.take_read_back("p", kept).1.map(|o| o[0].id.clone()), Some(output.id.clone()));
        assert!(log.take_read_back("p", kept).1.is_none());
        assert!(log.take_read_back("p", plain).1.is_none());
        log.ack(p.clone(), kept);
        log.ack(p.clone(), plain);
        log.sync().await.unwrap();
        let left: Vec<u64> = log
            .unsettled_page("p", 0..u64::MAX, 100, u64::MAX, Delivered::Again)
            .unwrap()
            .last_seq
            .into_iter()
            .collect();
        assert_eq!(left, vec![damaged], "the delivery with the damaged outbox stays pending");
    }

    /// A row whose count its bytes cannot hold.
    const DAMAGED_ROW: [u8; 5] = [9, 0, 0, 0, 1];

    /// Opens the log at `path` once the last handle let go of it.
    /// Commits a kv write of plugin `p` with `outputs` kept in the outbox of its delivery `seq`
    /// (an event's sequence number, or a request's key): what an attempt that returned Ok commits.
    pub(crate) async fn commit_with_outbox(log: &DurableLog, seq: u64, outputs: Vec<Arc<Event>>) {
        let mut txn = crate::kv::Txn::default();
        txn.set("k", b"v".to_vec());
        log.kv_commit("p", &txn, Some(Outbox { plugin: "p".into(), seq, outputs })).await.unwrap();
    }

    pub(crate) async fn reopen(path: &Path, retention: Retention) -> Arc<DurableLog> {
        loop {
            match DurableLog::open_with(path, SyncPolicy::Always, retention.clone()) {
                Ok(log) => break log,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        }
    }

    #[tokio::test]
    async fn a_damaged_record_is_settled_without_running_and_neither_stops_the_rest_nor_retention() {
        use crate::transport::{SubscriptionSpec, Transport};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let p: Arc<str> = "p".into();
        {
            let log = reopen(&path, Retention::default()).await;
            // One at a time: each event has a row of its own, keyed by its seq.
            for data in ["one", "two", "three", "four"] {
                log.append(Arc::new(Event::new("orders.created", data)), vec![p.clone()], false).await.unwrap();
            }
            // Event 4's attempt committed its kv writes and kept its outputs, then the host died.
            let outbox = Outbox { plugin: p.clone(), seq: 4, outputs: vec![Arc::new(Event::new("out.x", "o"))] };
            log.kv_commit("p", &crate::kv::Txn::default(), Some(outbox)).await.unwrap();
        }
        // The rows of events 2 and 4 are damaged on disk.
        write_rows(&path, &[(2, DAMAGED_ROW.to_vec()), (4, DAMAGED_ROW.to_vec())]).await;
        let retention = Retention { max_age: std::time::Duration::ZERO, max_mib: 1024 };
        let log = reopen(&path, retention).await;
        let bus = super::super::bus::EmbeddedBus::durable(log.clone());
        let spec = SubscriptionSpec {
            plugin: "p".into(),
            patterns: vec![">".into()],
            group: "plugbus.p".into(),
            capacity: 8,
            buffer_bytes: 1 << 20,
            backlog_bytes: 1 << 30,
            durable: None,
        };
        let mut sub = bus.subscribe(spec).await.unwrap();
        let mut got = Vec::new();
        for _ in 0..2 {
            let d = tokio::time::timeout(std::time::Duration::from_secs(5), sub.deliveries.recv()).await;
            got.push(d.expect("the events after the damaged one are delivered").unwrap().event.data.clone());
        }
        assert_eq!(got, [&b"one"[..], &b"three"[..]]);
        log.sync().await.unwrap();
        assert_eq!(log.metrics().damaged_records.get(), 1, "counted");
        let seqs = |log: &DurableLog| log.unsettled("p").unwrap().iter().map(|u| u.seq).collect::<Vec<_>>();
        assert_eq!(seqs(&log), vec![1, 3], "the damaged delivery is settled, the others are not");
        assert_eq!(log.metrics().damaged_records.get(), 1, "settled once, not again at every read");
        let pending = log.unsettled_page("p", 0..u64::MAX, 10, u64::MAX, Delivered::Again).unwrap();
        assert_eq!(pending.last_seq, Some(4), "a damaged delivery whose outputs are kept stays pending");
        assert!(log.outbox("p", 4).unwrap().is_some(), "and so do its outputs");
        // A replay skips the damaged rows (before, one failed the whole commit).
        let q: Arc<str> = "q".into();
        let made = log.backfill(q.clone(), |_| true, crate::transport::ReplayFrom::Seq(0), u64::MAX).await.unwrap();
        assert_eq!(made, 2);
        let for_q: Vec<u64> = log.unsettled("q").unwrap().iter().map(|u| u.seq).collect();
        assert_eq!(for_q, vec![1, 3], "a replay past the damaged row");
        // Retention gets past the damaged rows: once the rest is settled, nothing is left.
        for seq in [1, 3, 4] {
            log.ack(p.clone(), seq);
        }
        for seq in [1, 3] {
            log.ack(q.clone(), seq);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log.read(0, 10).map_or(true, |left| !left.is_empty()) {
            assert!(std::time::Instant::now() < deadline, "retention stalled: {:?}", log.read(0, 10).map(|l| l.len()));
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert_eq!(log.metrics().record_bytes.get(), 0, "nothing kept, nothing counted");
    }

    /// Logs whose next commit reports a failure after it landed (as when its `fsync` fails),
    /// whether the check for that then cannot reopen the database (a reader holds it), and
    /// whether only a commit holding a `sync` is meant (not an idle flush that comes first).
    static FAIL_AFTER_LANDING: std::sync::Mutex<Vec<(PathBuf, bool, bool)>> = std::sync::Mutex::new(Vec::new());
    static LANDED_CHECK_BLOCKED: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    /// Logs whose idle flush waits (a test's steps must not be cut by one, however slow the machine).
    static HOLD_IDLE_FLUSH: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

    /// Logs whose next reads of unsettled deliveries fail with an I/O error, and how many.
    static FAIL_READS: std::sync::Mutex<Vec<(PathBuf, u32)>> = std::sync::Mutex::new(Vec::new());

    /// Makes the next commit of the log at `path` report a failure after it landed (as when its
    /// `fsync` fails).
    pub(crate) fn fail_after_landing(path: &Path) {
        FAIL_AFTER_LANDING.lock().unwrap().push((path.to_path_buf(), false, false));
    }

    /// Like [`fail_after_landing`], and the look for whether it landed cannot be made (a
    /// double fault): the commit is answered as failed.
    pub(crate) fn fail_after_landing_unchecked(path: &Path) {
        FAIL_AFTER_LANDING.lock().unwrap().push((path.to_path_buf(), true, false));
    }

    /// Makes the next `n` reads of unsettled deliveries from the log at `path` fail (I/O).
    pub(crate) fn fail_reads(path: &Path, n: u32) {
        FAIL_READS.lock().unwrap().push((path.to_path_buf(), n));
    }

    /// Ends the read failures [`fail_reads`] made for the log at `path`.
    pub(crate) fn heal_reads(path: &Path) {
        FAIL_READS.lock().unwrap().retain(|(p, _)| p != path);
    }

    pub(super) fn injected_read_failure(path: &Path) -> bool {
        let mut failing = FAIL_READS.lock().unwrap();
        let Some(left) = failing.iter_mut().find(|(p, n)| p == path && *n > 0) else { return false };
        left.1 -= 1;
        true
    }

    /// Logs whose retention passes pass over and drop at most these many rows, and the rows
    /// each pass passed over and dropped.
    type TrimLog = (PathBuf, (usize, usize, u64), Vec<(usize, usize)>);
    static TRIM_BOUNDS_FOR: std::sync::Mutex<Vec<TrimLog>> = std::sync::Mutex::new(Vec::new());

    pub(super) fn trim_bounds_for(path: &Path) -> Option<(usize, usize, u64)> {
        TRIM_BOUNDS_FOR.lock().unwrap().iter().find(|(p, ..)| p == path).map(|(_, bounds, _)| *bounds)
    }

    pub(super) fn record_trim_pass(path: &Path, passed_over: usize, dropped: usize) {
        if let Some((.., passes)) = TRIM_BOUNDS_FOR.lock().unwrap().iter_mut().find(|(p, ..)| p == path) {
            passes.push((passed_over, dropped));
        }
    }

    /// Logs whose writer waits, once it has an op, before it gathers the rest of its commit.
    static HOLD_GATHERING: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    /// Each log's commits: the kv bytes and the appends someone waits for in each.
    type Batches = (PathBuf, Vec<(u64, usize)>);
    static BATCHES: std::sync::Mutex<Vec<Batches>> = std::sync::Mutex::new(Vec::new());

    /// Holds the writer of the log at `path` from its next op on, before it gathers the rest of
    /// its commit, until dropped (a busy writer, seen from outside: nothing sent commits).
    pub(crate) struct HeldCommits(PathBuf);

    impl HeldCommits {
        pub(crate) fn hold(path: &Path) -> Self {
            HOLD_GATHERING.lock().unwrap().push(path.to_path_buf());
            Self(path.to_path_buf())
        }
    }

    impl Drop for HeldCommits {
        fn drop(&mut self) {
            HOLD_GATHERING.lock().unwrap().retain(|p| p != &self.0);
        }
    }

    pub(super) fn wait_while_gathering_held(path: &Path) {
        while HOLD_GATHERING.lock().unwrap().iter().any(|p| p == path) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    static REOPENS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

    pub(super) fn record_reopen(path: &Path) {
        REOPENS.lock().unwrap().push(path.to_path_buf());
    }

    fn reopens(path: &Path) -> usize {
        REOPENS.lock().unwrap().iter().filter(|p| *p == path).count()
    }

    /// A log (`sync = "always"`) on a tmpfs of 16 MiB with one event of `p` in it, then the disk
    /// filled up: the disk (unmounted when dropped), the log's path, the log, `p` and the file
    /// that fills the disk. `None` outside CI when mounting is not allowed.
    async fn a_log_on_a_full_disk() -> Option<(Tmpfs, PathBuf, Arc<DurableLog>, Arc<str>, PathBuf)> {
        let disk = Tmpfs::mount(16)?;
        no_room_ahead(disk.0.path());
        let path = disk.0.path().join("bus.redb");
        let log = DurableLog::open_with(&path, SyncPolicy::Always, Retention::default()).unwrap();
        let p: Arc<str> = "p".into();
        log.append(Arc::new(sample()), vec![p.clone()], false).await.unwrap();
        let filler = fill_up(disk.0.path());
        Some((disk, path, log, p, filler))
    }

    /// Review 59c M3: while the disk stays full, commits come without a pause (each producer's
    /// append, the idle flush every 100 ms), and each reopened the file, which may run redb's
    /// repair of all of it: the writer kept a core and the disk busy. Now the file is tried
    /// again after a growing wait, up to a second, and a commit sooner is refused untouched.
    #[tokio::test]
    async fn a_full_disk_is_tried_again_after_a_growing_wait_not_at_every_commit() {
        let Some((_disk, path, log, p, filler)) = a_log_on_a_full_disk().await else { return };
        let started = std::time::Instant::now();
        let (mut refused, mut waiting) = (0, 0);
        while started.elapsed() < std::time::Duration::from_millis(500) {
            let why = log.append(Arc::new(sample()), vec![p.clone()], false).await.unwrap_err().to_string();
            refused += 1;
            waiting += usize::from(why.contains("the file is tried again in"));
        }
        let reopens = reopens(&path);
        // 25 + 50 + 100 + 200 ms of waits fit in 500 ms: about six tries, with the idle flush's.
        assert!(reopens <= 12, "{reopens} reopens for {refused} refused appends in 500 ms");
        assert!(
            refused >= 20 && waiting > 0,
            "{refused} appends refused, {waiting} saying when the file is tried again"
        );
        // Once there is room, the log notices within its longest wait.
        std::fs::remove_file(&filler).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while let Err(e) = log.append(Arc::new(sample()), vec![p.clone()], false).await {
            assert!(std::time::Instant::now() < deadline, "the log did not take appends again: {e}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Review 60c L1: the stop's last commit went through the wait after failed writes: a stop
    /// within it dropped the outputs and acks the log carried, without trying the file.
    #[tokio::test]
    async fn the_stops_last_commit_tries_the_file_whatever_the_wait() {
        let Some((_disk, path, log, p, filler)) = a_log_on_a_full_disk().await else { return };
        // Failed writes for 2 s: the wait has grown to most of a second.
        let started = std::time::Instant::now();
        while started.elapsed() < std::time::Duration::from_secs(2) {
            let _ = log.append(Arc::new(sample()), vec![p.clone()], false).await;
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        // An output nobody waits for: carried from the commit the wait refuses.
        let output = Arc::new(Event::new("out.x", "kept"));
        log.append_nowait(output.clone(), vec![]).unwrap();
        std::fs::remove_file(&filler).unwrap();
        drop(log);
        let log = reopen(&path, Retention::default()).await;
        let read = log.read(0, 1000).unwrap();
        assert!(read.iter().any(|(_, e)| e.id == output.id), "the output carried at the stop was lost");
    }

    /// Each log's commits: whether each was synced, and how long after the last that was.
    type Commits = (PathBuf, Vec<(bool, std::time::Duration)>);
    static COMMITS: std::sync::Mutex<Vec<Commits>> = std::sync::Mutex::new(Vec::new());

    pub(super) fn record_commit(path: &Path, durable: bool, since_sync: std::time::Duration) {
        if let Some((_, commits)) = COMMITS.lock().unwrap().iter_mut().find(|(p, _)| p == path) {
            commits.push((durable, since_sync));
        }
    }

    /// Review 59c M2: under `bus.sync = "always"` a batch of acks alone was never synced while
    /// acks kept coming (the flush comes when the log goes idle), so a plugin working through a
    /// backlog with nothing published left up to half a million acks unsynced, all of them run
    /// again after a crash, where "the last ~100 ms" is the promise. No commit now leaves the
    /// last sync more than 100 ms behind.
    #[tokio::test]
    async fn under_sync_always_acks_coming_without_a_pause_are_synced_every_100_ms() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = DurableLog::open_with(&path, SyncPolicy::Always, Retention::default()).unwrap();
        let p: Arc<str> = "p".into();
        let mut seqs = Vec::new();
        for _ in 0..200 {
            match log.append(Arc::new(sample()), vec![p.clone()], false).await.unwrap() {
                Appended::At(seq) => seqs.push(seq),
                other => panic!("{other:?}"),
            }
        }
        COMMITS.lock().unwrap().push((path.clone(), Vec::new()));
        // An ack every 2 ms for 400 ms: the writer never goes idle for 100 ms.
        for seq in seqs {
            log.ack(p.clone(), seq);
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        log.sync().await.unwrap();
        let commits = COMMITS.lock().unwrap().iter().find(|(p, _)| p == &path).unwrap().1.clone();
        // (A loaded machine that pauses this task for 100 ms makes the writer flush while idle:
        // not recorded, and not a failure.)
        let late = std::time::Duration::from_millis(100);
        let unsynced_late: Vec<_> = commits.iter().filter(|(durable, since)| !durable && *since >= late).collect();
        assert!(unsynced_late.is_empty(), "acks left unsynced past 100 ms: {unsynced_late:?}");
    }

    pub(super) fn record_batch(path: &Path, batch: &[Op]) {
        if let Some((_, batches)) = BATCHES.lock().unwrap().iter_mut().find(|(p, _)| p == path) {
            let kv = batch.iter().filter_map(Op::waiting_kv_bytes).sum();
            let appends = batch.iter().filter(|op| matches!(op, Op::Append { done: Some(_), .. })).count();
            batches.push((kv, appends));
        }
    }

    /// A producer's append sent behind a plugin's many large kv commits goes into a commit
    /// holding at most [`BATCH_KV_BYTES`] of them, not all of them (and their `fsync`): the kv
    /// commits go in later commits, in the order they came.
    #[tokio::test]
    async fn an_append_behind_many_large_kv_commits_is_not_committed_with_all_of_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = DurableLog::open_with(&path, SyncPolicy::Always, Retention::default()).unwrap();
        BATCHES.lock().unwrap().push((path.clone(), Vec::new()));
        let held = HeldCommits::hold(&path);
        let txns: Vec<crate::kv::Txn> = (0..12)
            .map(|i| {
                let mut txn = crate::kv::Txn::default();
                txn.set(&format!("k{i:02}"), vec![i as u8; 3 << 20]);
                txn
            })
            .collect();
        // Each polled once: its op is sent. The writer takes the first and waits; the rest
        // queue behind it, the producer's append last.
        let mut commits: Vec<_> = txns.iter().map(|txn| Box::pin(log.kv_commit("writer", txn, None))).collect();
        for commit in &mut commits {
            assert!(futures::poll!(commit).is_pending());
        }
        let event = Arc::new(sample());
        let mut append = Box::pin(log.append(event, vec!["p".into()], false));
        assert!(futures::poll!(&mut append).is_pending());
        // A `sync` behind them all answers once they all committed, without taking them into
        // one commit.
        let mut sync = Box::pin(log.sync());
        assert!(futures::poll!(&mut sync).is_pending());
        drop(held);
        append.await.unwrap();
        let mut answered = Vec::new();
        let waiting: Vec<_> = commits
            .into_iter()
            .enumerate()
            .map(|(i, commit)| async move {
                commit.await.unwrap();
                i
            })
            .collect();
        let mut waiting = futures::future::join_all(waiting);
        tokio::select! {
            biased;
            done = &mut waiting => answered.extend(done),
            synced = &mut sync => panic!("the sync answered before the kv commits sent before it: {synced:?}"),
        }
        sync.await.unwrap();
        let batches = BATCHES.lock().unwrap().iter().find(|(p, _)| p == &path).unwrap().1.clone();
        let (kv, _) = batches.iter().find(|(_, appends)| *appends == 1).copied().unwrap();
        assert!(kv <= BATCH_KV_BYTES, "the append was committed with {} MiB of kv: {batches:?}", kv >> 20);
        assert!(batches.iter().all(|(kv, _)| *kv <= BATCH_KV_BYTES.max(3 << 20)), "{batches:?}");
        assert_eq!(answered, (0..12).collect::<Vec<_>>());
        let each = txns[0].held_bytes();
        assert_eq!(batches.iter().map(|(kv, _)| kv).sum::<u64>(), 12 * each, "every kv commit went in once");
    }

    pub(super) fn idle_flush_held(path: &Path) -> bool {
        HOLD_IDLE_FLUSH.lock().unwrap().iter().any(|p| p == path)
    }

    pub(super) fn injected_failure_after_landing(path: &Path, holds_sync: bool) -> bool {
        let mut injected = FAIL_AFTER_LANDING.lock().unwrap();
        let Some(i) = injected.iter().position(|(p, _, on_sync)| p == path && (holds_sync || !on_sync)) else {
            return false;
        };
        let (path, blocked, _) = injected.swap_remove(i);
        if blocked {
            LANDED_CHECK_BLOCKED.lock().unwrap().push(path);
        }
        true
    }

    pub(super) fn landed_check_blocked(path: &Path) -> bool {
        let mut blocked = LANDED_CHECK_BLOCKED.lock().unwrap();
        let found = blocked.iter().position(|p| p == path);
        found.map(|i| blocked.swap_remove(i)).is_some()
    }

    #[tokio::test]
    async fn a_commit_that_landed_but_reported_a_failure_stands_and_promises_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = DurableLog::open_with(&path, SyncPolicy::Always, Retention::default()).unwrap();
        let p: Arc<str> = "p".into();
        // A producer is refused (its commit's `fsync` may be what failed: no 202 without it) ...
        FAIL_AFTER_LANDING.lock().unwrap().push((path.clone(), false, false));
        let refused = log.append(Arc::new(sample()), vec![p.clone()], false).await.unwrap_err();
        assert!(refused.to_string().contains("may not be on disk"), "{refused}");
        // ... but its event stands, pending: not lost (the bus delivers it at once).
        let pending = log.unsettled("p").unwrap();
        assert_eq!(pending.len(), 1);
        let seq = pending[0].seq;
        // A kv commit stands and is answered as done: answered failed, its handler would run
        // again on top of its own writes.
        FAIL_AFTER_LANDING.lock().unwrap().push((path.clone(), false, false));
        let mut txn = crate::kv::Txn::default();
        txn.reads.insert("k".into(), 0);
        txn.set("k", b"1".to_vec());
        let outbox = Outbox { plugin: p.clone(), seq, outputs: vec![Arc::new(Event::new("out.x", "o"))] };
        log.kv_commit("p", &txn, Some(outbox)).await.expect("it stands");
        assert_eq!(log.kv_get("p", "k").unwrap().map(|v| v.value).as_deref(), Some(&b"1"[..]));
        assert_eq!(log.outbox("p", seq).unwrap().map(|o| o.len()), Some(1));
        // A `sync` is refused too.
        FAIL_AFTER_LANDING.lock().unwrap().push((path.clone(), false, true));
        let refused = log.sync().await.unwrap_err();
        assert!(refused.to_string().contains("may not be on disk"), "{refused}");
        assert_eq!(log.metrics().commit_failures.get(), 3, "each reported failure is counted");
        // And the log goes on.
        log.append(Arc::new(sample()), vec![p.clone()], false).await.unwrap();
        assert_eq!(log.read(0, 10).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_commit_that_landed_but_reported_a_failure_is_not_done_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let log = DurableLog::open_with(&path, SyncPolicy::None, Retention::default()).unwrap();
        let p: Arc<str> = "p".into();
        // Kept in memory under `sync = "none"` (answered 202), with an output of it.
        let input = Arc::new(sample());
        let Appended::At(seq) = log.append(input.clone(), vec![p.clone()], false).await.unwrap() else {
            panic!("appended")
        };
        let output = Arc::new(Event::new("out.x", "o").with_header("plugbus-caused-by", input.id.clone()));
        let output_seq = log.append_nowait(output.clone(), vec![]).unwrap();
        // The durable commit that makes them durable lands, then reports a failure, and the check
        // for that cannot reopen: what was kept in memory is kept to be done again after the
        // next commit's reopen, which finds it already there.
        FAIL_AFTER_LANDING.lock().unwrap().push((path.clone(), true, true));
        assert!(log.sync().await.is_err(), "the injected failure");
        log.sync().await.unwrap();
        let read: Vec<u64> = log.read(0, 10).unwrap().into_iter().map(|(s, _)| s).collect();
        assert_eq!(read, vec![seq, output_seq]);
        let mut one = Vec::new();
        let mut other = Vec::new();
        encode(&input, 0, &mut one);
        encode(&output, 0, &mut other);
        assert_eq!(log.metrics().record_bytes.get() as usize, one.len() + other.len(), "records counted twice");
    }

    /// A small tmpfs, unmounted on drop (`None` outside CI when mounting is not allowed).
    pub(crate) struct Tmpfs(pub(crate) tempfile::TempDir);

    /// The log at `dir/bus.redb`, once opened, has no zeros written ahead of its commits: on a
    /// full disk the first commit that needs a page its file lacks fails (a real log may have up
    /// to `ZERO_AHEAD` of room in its file first).
    pub(crate) fn no_room_ahead(dir: &Path) {
        let nothing_ahead = &super::super::zeroed_ahead::tests::NOTHING_AHEAD;
        nothing_ahead.lock().unwrap().push(dir.join("bus.redb"));
    }

    /// Fills the file system under `dir` until a write of even one byte fails; returns the file
    /// that filled it. (Filled in 64 KiB writes only, up to 64 KiB were left, and a small commit
    /// could still land: a full-disk test then failed now and then.)
    pub(crate) fn fill_up(dir: &Path) -> PathBuf {
        use std::io::Write;
        let filler = dir.join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        for chunk in [64 << 10, 4 << 10, 1] {
            while f.write_all(&vec![7u8; chunk]).is_ok() {}
        }
        filler
    }

    /// Waits until a commit of `log` failed (on a full disk), by `deadline`.
    async fn until_a_commit_failed(log: &DurableLog, deadline: std::time::Instant) {
        while log.metrics().commit_failures.get() == 0 {
            assert!(std::time::Instant::now() < deadline, "no commit failed");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }

    /// Removes `filler` (space returns) and waits until `log` commits again, by `deadline`.
    async fn until_space_returns(log: &DurableLog, filler: &Path, deadline: std::time::Instant) {
        std::fs::remove_file(filler).unwrap();
        while let Err(e) = log.sync().await {
            assert!(std::time::Instant::now() < deadline, "the log did not recover: {e}");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    impl Tmpfs {
        pub(crate) fn mount(mib: u32) -> Option<Self> {
            let dir = tempfile::tempdir().unwrap();
            let out = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
                .arg(dir.path())
                .output()
                .expect("running mount");
            if out.status.success() {
                return Some(Self(dir));
            }
            let why = String::from_utf8_lossy(&out.stderr);
            assert!(std::env::var("CI").is_err(), "mounting a tmpfs for a full-disk test failed (run as root): {why}");
            None
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(self.0.path()).status();
        }
    }

    #[tokio::test]
    async fn publishers_of_outputs_wait_once_those_not_yet_written_reach_their_bound() {
        // Room for what is kept (32 MiB) once space returns, beside what the failed commits
        // wrote into the file before they failed.
        let Some(disk) = Tmpfs::mount(128) else { return };
        no_room_ahead(disk.0.path());
        let path = disk.0.path().join("bus.redb");
        let log = DurableLog::open_with(&path, SyncPolicy::Always, Retention::default()).unwrap();
        let p: Arc<str> = "p".into();
        let filler = fill_up(disk.0.path());
        // Plugins that feed each other go on publishing outputs while the disk stays full: no
        // commit can take them, so they add up, to the bound.
        let mib = "x".repeat(1 << 20);
        let unwritten = || log.unwritten.bytes.load(Relaxed);
        let mut sent = 0u64;
        while tokio::time::timeout(std::time::Duration::from_millis(300), log.room_for_outputs()).await.is_ok() {
            log.append_nowait(Arc::new(Event::new("loop.x", mib.clone())), vec![p.clone()]).unwrap();
            sent += 1;
            assert!(
                sent <= UNWRITTEN_OUTPUT_BYTES >> 20,
                "no publisher waited: {sent} sent, {} bytes unwritten",
                unwritten()
            );
        }
        // Each holds a little over 1 MiB: the publisher of the 33rd waits.
        assert_eq!(sent, UNWRITTEN_OUTPUT_BYTES >> 20, "{} bytes unwritten", unwritten());
        assert!(log.metrics().commit_failures.get() > 0);
        assert_eq!(log.metrics().unwritten_output_bytes.get() as u64, unwritten());
        // It goes on once space returns and the outputs commit, each once.
        let waiting = tokio::spawn({
            let log = log.clone();
            async move { log.room_for_outputs().await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        assert!(!waiting.is_finished(), "a publisher went on while the disk was full");
        std::fs::remove_file(&filler).unwrap();
        let went_on = tokio::time::timeout(std::time::Duration::from_secs(30), waiting).await;
        went_on.expect("the publisher still waits after space returned").unwrap();
        assert_eq!(unwritten(), 0);
        log.sync().await.unwrap();
        assert_eq!(log.unsettled("p").unwrap().len() as u64, sent, "every output kept once");
    }

    /// Review 59e F3: a failed write whose reopen throws away only acks (under `sync =
    /// "always"`, where kv writes are on disk when answered) leaves kv reads alone: they failed
    /// for as long as the disk stayed full, though no kv write was undone.
    #[tokio::test]
    async fn a_failed_write_that_undid_only_acks_fails_no_kv_read() {
        let Some(disk) = Tmpfs::mount(16) else { return };
        no_room_ahead(disk.0.path());
        let p: Arc<str> = "p".into();
        let log =
            DurableLog::open_with(&disk.0.path().join("bus.redb"), SyncPolicy::Always, Retention::default()).unwrap();
        let mut txn = crate::kv::Txn::default();
        txn.set("k", b"v".to_vec());
        log.kv_commit("p", &txn, None).await.unwrap();
        let Appended::At(seq) = log.append(Arc::new(sample()), vec![p.clone()], false).await.unwrap() else {
            panic!("appended")
        };
        // An ack alone: committed without `fsync` (kept in memory).
        log.ack(p.clone(), seq);
        let filler = fill_up(disk.0.path());
        let _ = log.sync().await;
        let read = log.kv_get("p", "k");
        assert!(
            matches!(&read, Ok(Some(v)) if v.value == b"v"),
            "a kv read after a failed write that undid no kv write: {read:?}"
        );
        std::fs::remove_file(&filler).unwrap();
    }

    #[tokio::test]
    async fn a_failed_write_undoes_nothing_a_commit_kept_in_memory_had_answered() {
        let Some(disk) = Tmpfs::mount(16) else { return };
        no_room_ahead(disk.0.path());
        let p: Arc<str> = "p".into();
        let log =
            DurableLog::open_with(&disk.0.path().join("bus.redb"), SyncPolicy::None, Retention::default()).unwrap();
        let Appended::At(seq) = log.append(Arc::new(sample()), vec![p.clone()], false).await.unwrap() else {
            panic!("appended")
        };
        // Event `seq`'s attempt committed its kv write with its outbox, on disk.
        let outbox = Outbox { plugin: p.clone(), seq, outputs: vec![Arc::new(Event::new("out.x", "o"))] };
        let mut first = crate::kv::Txn::default();
        first.set("first", b"1".to_vec());
        log.kv_commit("p", &first, Some(outbox)).await.unwrap();
        log.sync().await.unwrap();
        // No idle flush cuts the steps below short, however slow the machine (it would fail on
        // the full disk before they are all kept in memory).
        let path = disk.0.path().join("bus.redb");
        HOLD_IDLE_FLUSH.lock().unwrap().push(path.clone());
        let filler = fill_up(disk.0.path());
        // Under `sync = "none"` these are kept in memory: answered, not on disk yet. The event
        // is acked (its outbox entry removed), another attempt commits a kv write, and a
        // producer's event is accepted (its `202`) with an output of it and a delivery for `q`.
        log.ack(p.clone(), seq);
        let mut txn = crate::kv::Txn::default();
        txn.set("k", b"v".to_vec());
        log.kv_commit("p", &txn, None).await.unwrap();
        let answered = log.kv_get("p", "k").unwrap().expect("an answered write is read").version;
        let q: Arc<str> = "q".into();
        let accepted = Arc::new(Event::new("in.later", "answered 202"));
        let Appended::At(later) = log.append(accepted.clone(), vec![q.clone()], false).await.unwrap() else {
            panic!("appended")
        };
        let output = Arc::new(Event::new("out.later", "o").with_header("plugbus-caused-by", accepted.id.clone()));
        let output_seq = log.append_nowait(output.clone(), vec![]).unwrap();
        // Another attempt read `k2` at a version it no longer has: refused, never applied.
        let mut stale = crate::kv::Txn::default();
        stale.reads.insert("k2".into(), 7);
        stale.set("k2", b"stale".to_vec());
        assert!(matches!(log.kv_commit("p", &stale, None).await, Err(crate::kv::KvError::Conflict(_))));
        HOLD_IDLE_FLUSH.lock().unwrap().retain(|p| *p != path);
        // The flush when the log goes idle fails on the full disk (and the reopen throws away
        // what was kept in memory) ...
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        until_a_commit_failed(&log, deadline).await;
        // While the disk stays full the file is behind what was answered (a commit tried again
        // reopened it, and failed): a kv read fails (its attempt fails as the host's, and is
        // retried) rather than see an answered write undone. (It read nothing, and a read-only
        // handler acted on that.)
        assert!(log.sync().await.is_err(), "a commit went through on a full disk");
        let read = log.kv_get("p", "k");
        assert!(matches!(read, Err(crate::kv::KvError::Unavailable(_))), "a kv read while behind: {read:?}");
        let mut read_only = crate::kv::Txn::default();
        read_only.reads.insert("k".into(), answered);
        let checked = log.kv_check_reads("p", &read_only);
        assert!(matches!(checked, Err(crate::kv::KvError::Unavailable(_))), "a read check while behind: {checked:?}");
        // ... then space returns: what was answered is still there.
        until_space_returns(&log, &filler, deadline).await;
        let kept = log.kv_get("p", "k").unwrap().map(|v| v.value);
        assert_eq!(kept.as_deref(), Some(&b"v"[..]), "an answered kv commit was undone");
        assert!(log.kv_get("p", "k2").unwrap().is_none(), "a refused kv commit was applied after the reopen");
        // The ack was done again: the event stays settled, and its outbox entry gone (a stale
        // one would release old outputs on a replay).
        assert!(log.unsettled("p").unwrap().is_empty(), "a settled delivery came back");
        assert!(log.outbox("p", seq).unwrap().is_none(), "the ack's removal of the outbox entry was undone");
        // The event answered `202` is in the log with its pending delivery, and its output once.
        let read: Vec<_> = log.read(later, 10).unwrap().into_iter().map(|(s, ev)| (s, ev.id.clone())).collect();
        assert_eq!(read, vec![(later, accepted.id.clone()), (output_seq, output.id.clone())]);
        assert_eq!(log.unsettled("q").unwrap().iter().map(|u| u.seq).collect::<Vec<_>>(), vec![later]);
        assert!(
            matches!(log.append(output, vec![], true).await.unwrap(), Appended::Duplicate(_)),
            "the output's id was lost"
        );
        // And it is on disk: a restart finds it.
        drop(log);
        let log = reopen(&path, Retention::default()).await;
        assert_eq!(log.unsettled("q").unwrap().iter().map(|u| u.seq).collect::<Vec<_>>(), vec![later]);
    }

    #[tokio::test]
    async fn an_output_whose_first_copy_is_damaged_is_logged_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let out = Arc::new(sample());
        {
            let log = reopen(&path, Retention::default()).await;
            assert_eq!(log.append(out.clone(), vec![], true).await.unwrap(), Appended::At(1));
            assert_eq!(
                log.append(out.clone(), vec![], true).await.unwrap(),
                Appended::Duplicate(1),
                "readable: kept once"
            );
        }
        write_rows(&path, &[(1, DAMAGED_ROW.to_vec())]).await;
        let log = reopen(&path, Retention::default()).await;
        // Its input ran again after a crash: the output is logged anew, not lost as a duplicate.
        let Appended::At(seq) = log.append(out.clone(), vec![], true).await.unwrap() else {
            panic!("a damaged first copy made the output a duplicate")
        };
        assert_eq!(log.read_seqs("p", &[seq]).unwrap()[0].event.id, out.id);
        assert!(matches!(log.append(out, vec![], true).await.unwrap(), Appended::Duplicate(_)), "and kept once again");
    }

    /// A replay's backfill over many records is made in steps (each its own commit) and makes
    /// pending exactly the matching events of its range, none of those around it.
    #[tokio::test]
    async fn a_backfill_over_many_records_makes_its_range_pending_in_steps() {
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), SyncPolicy::None).unwrap();
        for i in 0..300 {
            let subject = if i % 2 == 0 { "a.x" } else { "b.x" };
            // 4 KiB each, not compressible: about 60 to a row (a step reads whole rows).
            let noise: String = (0..128).map(|_| uuid::Uuid::now_v7().simple().to_string()).collect();
            let data = format!("{i}{noise}");
            log.append_nowait(Arc::new(Event::new(subject, data)), vec!["p".into()]).unwrap();
        }
        log.sync().await.unwrap();
        let commits = log.metrics().commits.get();
        let made = log.backfill("q".into(), |s| s.starts_with("a."), crate::transport::ReplayFrom::Seq(11), 251).await;
        let want: Vec<u64> = (11..251).filter(|seq| (seq - 1) % 2 == 0).collect();
        assert_eq!(made.unwrap(), want.len());
        let for_q: Vec<u64> = log.unsettled("q").unwrap().iter().map(|u| u.seq).collect();
        assert_eq!(for_q, want);
        let steps = log.metrics().commits.get() - commits;
        assert!(steps >= 3, "{steps} commits for 240 records of 4 KiB in steps of {BACKFILL_STEP_RECORDS}");
    }

    /// Appends `n` events of about 4 KiB each (about 60 to a row, so a step reads a few rows),
    /// alternately on `a.x` and `b.x`, pending for `p`; the sequence numbers of the `a.x` ones.
    async fn append_history(log: &DurableLog, n: usize) -> Vec<u64> {
        for i in 0..n {
            let subject = if i % 2 == 0 { "a.x" } else { "b.x" };
            let noise: String = (0..128).map(|_| uuid::Uuid::now_v7().simple().to_string()).collect();
            log.append_nowait(Arc::new(Event::new(subject, format!("{i}{noise}"))), vec!["p".into()]).unwrap();
        }
        log.sync().await.unwrap();
        (1..=n as u64).filter(|seq| (seq - 1) % 2 == 0).collect()
    }

    fn only_a() -> Option<SubjectMatcher> {
        Some(Box::new(|s: &str| s.starts_with("a.")))
    }

    /// One step of `plugin`'s history over `seqs`, as [`DurableLog::backfill_history`] sends it.
    async fn one_history_step(log: &DurableLog, plugin: &str, seqs: std::ops::Range<u64>) -> BackfillStep {
        let (done, wait) = oneshot::channel();
        let matches: Arc<dyn Fn(&str) -> bool + Send + Sync> = Arc::new(|s: &str| s.starts_with("a."));
        let from = crate::transport::ReplayFrom::Seq(seqs.start);
        log.ops.send(Op::Backfill { plugin: plugin.into(), matches, from, seqs, history: true, done }).unwrap();
        wait.await.unwrap().unwrap()
    }

    fn pending_for(log: &DurableLog, plugin: &str) -> Vec<u64> {
        log.unsettled(plugin).unwrap().iter().map(|u| u.seq).collect()
    }

    /// A new `deliver = "all"` plugin's history over a long log: its register commit makes only
    /// the first step pending (one commit over the whole history held every producer's append
    /// and every ack for the whole scan), the rest is due, kept in the log with each step: a
    /// crash between two steps resumes where the last one committed (what was made pending
    /// before is not made pending again, even once settled), and retention keeps what is due
    /// meanwhile while it drops what is not.
    #[tokio::test]
    async fn a_new_plugins_history_is_made_pending_in_steps_and_resumes_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let retention = Retention { max_age: std::time::Duration::ZERO, max_mib: 1024 };
        let (want, settled) = {
            let log = reopen(&path, retention.clone()).await;
            let want = append_history(&log, 300).await;
            let first = log.register_with("q".into(), only_a(), true).await.unwrap();
            assert!(first.new);
            // A step reads whole rows past its 64 records (a row holds a commit's events, as
            // many as the writer grouped): about 32 of the 150, never most of them.
            assert!(first.made > 0 && first.made < want.len() / 2, "{first:?}: one step, not the history");
            let due = first.history_due.clone().expect("the rest is due");
            assert_eq!(due.end, 301, "{first:?}");
            assert_eq!(log.metrics().histories_due.get(), 1, "the gauge shows a history due");
            // A second step commits, then the host dies before the third.
            let (made, rest) = one_history_step(&log, "q", due.clone()).await;
            let rest = rest.expect("more to come");
            assert!(made > 0 && rest > due.start, "{made} {rest} {due:?}");
            // A stale step (not where the log says the history is) does nothing.
            assert_eq!(one_history_step(&log, "q", due.clone()).await, (0, None));
            let settled = pending_for(&log, "q");
            assert_eq!(settled.len(), first.made + made);
            for seq in &settled {
                log.ack("q".into(), *seq);
            }
            for seq in 1..=300 {
                log.ack("p".into(), seq);
            }
            // Settled events past the history, for no plugin: retention drops them, and keeps
            // the history still due.
            for _ in 0..10 {
                log.append_nowait(Arc::new(Event::new("c.x", "after")), vec![]).unwrap();
            }
            log.sync().await.unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            while !log.read(301, 20).unwrap().is_empty() {
                assert!(std::time::Instant::now() < deadline, "retention never ran");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            assert_eq!(log.read(rest, 400).unwrap().len() as u64, 301 - rest, "retention dropped history due");
            (want, settled)
            // Dropped here, as a crash between two steps leaves it.
        };
        let log = reopen(&path, retention).await;
        assert_eq!(log.metrics().histories_due.get(), 1, "counted at open");
        let again = log.register_with("q".into(), only_a(), true).await.unwrap();
        assert!(!again.new);
        let due = again.history_due.expect("still due after the restart");
        assert!(due.start > settled[0] && due.start > *settled.last().unwrap(), "{due:?} resumes after {settled:?}");
        log.backfill_history("q".into(), |s: &str| s.starts_with("a."), due).await.unwrap();
        let rest: Vec<u64> = want.iter().copied().filter(|seq| !settled.contains(seq)).collect();
        assert_eq!(pending_for(&log, "q"), rest, "the rest of the history, none of what was settled again");
        assert_eq!(log.metrics().histories_due.get(), 0, "all of it pending: none due");
        assert_eq!(
            log.register_with("q".into(), only_a(), true).await.unwrap(),
            Registration::default(),
            "nothing due"
        );
    }

    /// A plugin whose history was still due when its subscription went (a step that failed to
    /// commit took it out of the bus) subscribes again: what was accepted meanwhile, for
    /// nobody, is its history too.
    #[tokio::test]
    async fn history_due_grows_to_what_was_accepted_while_the_plugin_was_away() {
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), SyncPolicy::None).unwrap();
        let mut want = append_history(&log, 300).await;
        let first = log.register_with("q".into(), only_a(), true).await.unwrap();
        assert_eq!(first.history_due.as_ref().map(|d| d.end), Some(301), "{first:?}");
        for i in 0..6 {
            let subject = if i % 2 == 0 { "a.x" } else { "b.x" };
            log.append_nowait(Arc::new(Event::new(subject, "meanwhile")), vec!["p".into()]).unwrap();
        }
        log.sync().await.unwrap();
        want.extend([301, 303, 305]);
        let again = log.register_with("q".into(), only_a(), true).await.unwrap();
        let due = again.history_due.clone().expect("due");
        assert_eq!(due.end, 307, "{again:?}");
        log.backfill_history("q".into(), |s: &str| s.starts_with("a."), due).await.unwrap();
        assert_eq!(pending_for(&log, "q"), want);
    }

    /// Review 63a F2: a durable plugin known to the log, away for a while (its last subscription
    /// gone, or the host stopped and the plugin not subscribed again yet), gets what was accepted
    /// meanwhile that it matches when it subscribes again, as a JetStream durable consumer
    /// resumes; a plugin that is not durable does not, and neither gets what it had before.
    #[tokio::test]
    async fn a_durable_plugin_away_for_a_while_gets_what_was_accepted_meanwhile() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let append = |log: &DurableLog, subject: &str, to: &[&str]| {
            log.append_nowait(Arc::new(Event::new(subject, "x")), to.iter().map(|p| Arc::from(*p)).collect()).unwrap()
        };
        let gap = {
            let log = DurableLog::open(&path, SyncPolicy::Always).unwrap();
            assert!(log.register_with("q".into(), only_a(), false).await.unwrap().new);
            assert!(log.register_with("r".into(), None, false).await.unwrap().new);
            let handled = append(&log, "a.before", &["q", "r"]);
            log.sync().await.unwrap();
            log.ack("q".into(), handled);
            log.ack("r".into(), handled);
            log.away("q".into());
            log.away("r".into());
            let meanwhile = [append(&log, "a.1", &[]), append(&log, "b.2", &[]), append(&log, "a.3", &[])];
            log.sync().await.unwrap();
            assert_eq!(log.register_with("r".into(), None, false).await.unwrap().history_due, None, "not durable");
            let back = log.register_with("q".into(), only_a(), false).await.unwrap();
            let due = back.history_due.clone().expect("what was accepted while it was away is due");
            assert_eq!(due, meanwhile[0]..meanwhile[2] + 1, "{back:?}");
            log.backfill_history("q".into(), |s: &str| s.starts_with("a."), due).await.unwrap();
            assert_eq!(pending_for(&log, "q"), [meanwhile[0], meanwhile[2]], "a.1 and a.3, not b.2 nor a.before");
            assert_eq!(log.owing_plugins().unwrap(), ["q"], "the plugins owed a delivery, named once");
            assert_eq!(pending_for(&log, "r"), Vec::<u64>::new());
            assert_eq!(log.register_with("q".into(), only_a(), false).await.unwrap(), Registration::default());
            for seq in [meanwhile[0], meanwhile[2]] {
                log.ack("q".into(), seq);
            }
            log.sync().await.unwrap();
            meanwhile
            // Dropped here: the host stops with q subscribed.
        };
        // Away from the log's open on: what is accepted before it subscribes again is its.
        let log = reopen(&path, Retention::default()).await;
        let at_the_start = append(&log, "a.4", &[]);
        log.sync().await.unwrap();
        let back = log.register_with("q".into(), only_a(), false).await.unwrap();
        let due = back.history_due.clone().expect("due after the restart");
        assert_eq!(due, at_the_start..at_the_start + 1, "{back:?} (before it: {gap:?})");
        log.backfill_history("q".into(), |s: &str| s.starts_with("a."), due).await.unwrap();
        assert_eq!(pending_for(&log, "q"), [at_the_start]);
    }

    /// Review 63c F3: an away mark in a commit that failed (a full disk) was dropped, and the
    /// plugin then missed for good what was accepted while it was away. It is done again with the
    /// commit that lands once space returns.
    #[tokio::test]
    async fn an_away_mark_whose_commit_failed_is_done_again() {
        let Some(disk) = Tmpfs::mount(16) else { return };
        no_room_ahead(disk.0.path());
        let path = disk.0.path().join("bus.redb");
        let log = DurableLog::open_with(&path, SyncPolicy::Always, Retention::default()).unwrap();
        assert!(log.register_with("q".into(), only_a(), false).await.unwrap().new);
        log.sync().await.unwrap();
        let filler = fill_up(disk.0.path());
        // Something the commit must grow the file for, then the mark, in one commit that fails.
        log.append_nowait(Arc::new(Event::new("b.big", vec![7u8; 256 << 10])), vec![]).unwrap();
        log.away("q".into());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        until_a_commit_failed(&log, deadline).await;
        until_space_returns(&log, &filler, deadline).await;
        let Appended::At(meanwhile) = log.append(Arc::new(Event::new("a.1", "x")), vec![], false).await.unwrap() else {
            panic!("appended")
        };
        let back = log.register_with("q".into(), only_a(), false).await.unwrap();
        assert_eq!(back.history_due, Some(meanwhile..meanwhile + 1), "the mark was lost: {back:?}");
    }

    /// A plugin whose history was still due subscribes again without `deliver = "all"`: the
    /// rest is dropped, not made pending later.
    #[tokio::test]
    async fn history_still_due_is_dropped_when_the_plugin_no_longer_asks_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), SyncPolicy::None).unwrap();
        append_history(&log, 300).await;
        let first = log.register_with("q".into(), only_a(), true).await.unwrap();
        assert!(first.history_due.is_some(), "{first:?}");
        assert_eq!(log.register_with("q".into(), None, false).await.unwrap(), Registration::default());
        assert_eq!(log.register_with("q".into(), only_a(), true).await.unwrap(), Registration::default(), "dropped");
        assert_eq!(log.unsettled("q").unwrap().len(), first.made);
    }

    #[tokio::test]
    async fn a_record_of_a_newer_version_is_left_pending_not_settled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        let p: Arc<str> = "p".into();
        drop(reopen(&path, Retention::default()).await.append(Arc::new(sample()), vec![p.clone()], false).await);
        let mut record = Vec::new();
        encode(&sample(), 1, &mut record);
        record[0] = RECORD_VERSION + 1;
        let mut row = RowBuilder::default();
        row.push(1, |out| out.extend_from_slice(&record));
        write_rows(&path, &[(1, row.bytes().to_vec())]).await;
        let log = reopen(&path, Retention::default()).await;
        assert!(log.unsettled("p").unwrap().is_empty(), "a newer record is not run");
        log.sync().await.unwrap();
        assert_eq!(log.metrics().damaged_records.get(), 0);
        let page = log.unsettled_page("p", 0..2, 10, u64::MAX, Delivered::Again).unwrap();
        assert!(page.deliveries.is_empty());
        assert_eq!(page.last_seq, Some(1), "still pending, and the read goes on past it");
    }

    #[test]
    fn a_damaged_file_is_named_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let err = DurableLog::open(&path, SyncPolicy::Always).err().expect("refused").to_string();
        assert!(err.contains("bus.redb") && err.contains("move it aside"), "{err}");
    }

    /// A file the host cannot open (a folder in its place here; a file left owned by root, a
    /// read-only disk) is not called damaged: moved aside, its accepted events would be lost
    /// (review 55a 5).
    #[test]
    fn a_file_that_cannot_be_opened_is_not_called_damaged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus.redb");
        std::fs::create_dir(&path).unwrap();
        let err = DurableLog::open(&path, SyncPolicy::Always).err().expect("refused").to_string();
        assert!(err.contains("bus.redb") && err.contains("an I/O error, not damage"), "{err}");
        assert!(!err.contains("move it aside"), "{err}");
    }
}
