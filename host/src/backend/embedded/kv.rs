//! Plugin kv inside the embedded bus's durable log (`data_dir/bus.redb`): a commit goes through
//! the log's writer, so an attempt's kv writes commit in one transaction with its outbox (the
//! outputs to release), and a handler never runs again after its kv writes committed.

use crate::backend::embedded::log::DurableLog;
use crate::kv::Outbox;
use crate::kv::{KvError, KvStore, Txn, Versioned};
use std::sync::Arc;

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

    /// In one read transaction (one snapshot of the log), not through the writer.
    async fn check_reads(&self, ns: &str, txn: &Txn) -> Result<(), KvError> {
        self.log.kv_check_reads(ns, txn)
    }
}
