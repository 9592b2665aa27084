//! Plugin kv inside the embedded bus's durable log (`data_dir/bus.redb`): a commit goes through
//! the log's writer, so an attempt's kv writes commit in one transaction with its outbox (the
//! outputs to release), and a handler never runs again after its kv writes committed.

use crate::backend::embedded::log::DurableLog;
use crate::kv::Outbox;
use crate::kv::{KvError, KvStore, Txn, Versioned};
use std::sync::Arc;

/// The most keys, and bytes of their values, a read check reads on the runtime's worker that
/// asks it: more go to the blocking pool.
const CHECK_INLINE_KEYS: usize = 16;
/// See [`CHECK_INLINE_KEYS`].
const CHECK_INLINE_BYTES: u64 = 256 << 10;

/// The kv store of the durable embedded bus.
pub struct LogKv {
    log: Arc<DurableLog>,
}

impl LogKv {
    /// Kv kept in `log`.
    pub fn new(log: Arc<DurableLog>) -> Self {
        Self { log }
    }
}

#[async_trait::async_trait]
impl KvStore for LogKv {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Versioned>, KvError> {
        self.log.kv_get(ns, key)
    }

    async fn commit(&self, ns: &str, txn: &Txn) -> Result<(), KvError> {
        self.log.kv_commit(ns, txn, None).await
    }

    async fn commit_settling(&self, ns: &str, txn: &Txn, outbox: Option<Outbox>) -> Result<(), KvError> {
        self.log.kv_commit(ns, txn, outbox).await
    }

    /// In one read transaction (one snapshot of the log), not through the writer; off the
    /// runtime's workers when it reads many keys or bytes (up to `max_kv_reads` keys of
    /// `max_kv_read_bytes` in all: tens of milliseconds of page reads).
    async fn check_reads(&self, ns: &str, txn: &Txn) -> Result<(), KvError> {
        if txn.reads.len() <= CHECK_INLINE_KEYS && txn.checked_bytes() <= CHECK_INLINE_BYTES {
            return self.log.kv_check_reads(ns, txn);
        }
        let (log, ns, txn) = (self.log.clone(), ns.to_string(), txn.clone());
        tokio::task::spawn_blocking(move || log.kv_check_reads(&ns, &txn))
            .await
            .map_err(|e| KvError::Unavailable(format!("the read check's task failed: {e}")))?
    }
}
