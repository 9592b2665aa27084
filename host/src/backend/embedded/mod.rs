//! The embedded backend: an in-process bus (`bus`), by default over a durable event log in
//! `data_dir/bus.redb` (`log`), with plugin kv in the same file (`kv`) so an attempt's kv
//! writes commit with its outputs (the outbox). Settings: `[bus]`.

pub mod bus;
pub mod disk;
pub mod kv;
pub mod log;
mod rows;

use super::Backend;
use crate::config::Config;
use crate::kv::{KvStore, MemoryKv, RedbKv};
use anyhow::Context;
use bus::EmbeddedBus;
use log::DurableLog;
use std::sync::Arc;

/// Opens the embedded bus as `[bus]` and `persistent_kv` say.
pub fn open(config: &Config) -> anyhow::Result<Backend> {
    let kv_path = config.data_dir.join("kv.redb");
    let (transport, kv): (EmbeddedBus, Arc<dyn KvStore>) = match (config.bus.durable, config.persistent_kv) {
        (true, persistent) => {
            let path = config.data_dir.join("bus.redb");
            let log = DurableLog::open_with(&path, config.bus.sync, config.bus.retention.clone())
                .context("opening the embedded bus's event log")?;
            let kv: Arc<dyn KvStore> = if persistent {
                import_kv(&kv_path, &log)?;
                // Kv in the log's file: an attempt's kv writes commit with its outbox.
                Arc::new(kv::LogKv::new(log.clone()))
            } else {
                Arc::new(MemoryKv::new())
            };
            (EmbeddedBus::durable_at_start(log), kv)
        }
        (false, true) => {
            let log_path = config.data_dir.join("bus.redb");
            if log_path.exists() {
                tracing::warn!(kv = %kv_path.display(), log = %log_path.display(),
                    "bus.durable = false: plugin kv is kept in kv.redb, and what an earlier durable run kept in the \
                     event log is not seen by this run; at the next durable start kv.redb's entries move into the \
                     log only for keys the log does not hold (the log's own values stay)");
            }
            let kv = RedbKv::open(&kv_path).with_context(|| format!("opening the kv store {}", kv_path.display()))?;
            (EmbeddedBus::new(), Arc::new(kv))
        }
        (false, false) => (EmbeddedBus::new(), Arc::new(MemoryKv::new())),
    };
    Ok(Backend { transport: Arc::new(transport), kv })
}

/// Moves plugin kv kept in `kv.redb` (by an earlier version, or a run with `bus.durable =
/// false`) into the event log's file, once: the file is renamed `kv.redb.imported`. A key the
/// log holds already keeps the log's value; the file's is left in the renamed file, and a
/// warning says how many. (An in-memory run started from an empty `kv.redb`: its value of a key
/// is not the one the log's came from, and overwriting the log's would lose that.)
fn import_kv(kv_path: &std::path::Path, log: &DurableLog) -> anyhow::Result<log::KvImport> {
    if !kv_path.exists() {
        return Ok(log::KvImport::default());
    }
    let rows = RedbKv::open(kv_path)
        .and_then(|old| old.export())
        .with_context(|| format!("reading the kv store {} to move it into the event log", kv_path.display()))?;
    let import = log.import_kv(&rows).context("moving plugin kv into the event log")?;
    let done = kv_path.with_extension("redb.imported");
    std::fs::rename(kv_path, &done).with_context(|| format!("renaming {} after moving it", kv_path.display()))?;
    tracing::info!(entries = import.moved, from = %kv_path.display(), kept_as = %done.display(), "plugin kv moved into the event log");
    if import.kept_from_log > 0 {
        tracing::warn!(entries = import.kept_from_log, from = %kv_path.display(), kept_as = %done.display(),
            "entries of kv.redb not moved: the event log holds a value of its own for their keys, which stays \
             (the file's are in the renamed file)");
    }
    Ok(import)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::{KvStore, Txn};

    fn set(pairs: &[(&str, &str)]) -> Txn {
        let mut txn = Txn::default();
        for (k, v) in pairs {
            txn.set(k, v.as_bytes().to_vec());
        }
        txn
    }

    async fn value(kv: &dyn KvStore, key: &str) -> Option<String> {
        kv.get("p", key).await.unwrap().map(|v| String::from_utf8(v.value).unwrap())
    }

    /// The loss: kv kept in the log (a durable run), then a run with `bus.durable = false`, whose
    /// kv starts from an empty `kv.redb` (a counter at 0, counted to 3), then a durable start:
    /// the file's entries were moved in over the log's, and the counter at 100 became 3. Now the
    /// log's own values stay, the file's new keys move in, and the file is kept renamed.
    #[tokio::test]
    async fn a_kv_file_moved_into_the_log_does_not_overwrite_the_logs_own_values() {
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), log::SyncPolicy::Always).unwrap();
        let in_log = kv::LogKv::new(log.clone());
        in_log.commit("p", &set(&[("count", "100")])).await.unwrap();
        let kv_path = dir.path().join("kv.redb");
        {
            let file = RedbKv::open(&kv_path).unwrap();
            file.commit("p", &set(&[("count", "3"), ("fresh", "yes")])).await.unwrap();
        }
        let import = import_kv(&kv_path, &log).unwrap();
        assert_eq!(import, log::KvImport { moved: 1, kept_from_log: 1 });
        assert_eq!(value(&in_log, "count").await.as_deref(), Some("100"), "the log's own value was overwritten");
        assert_eq!(value(&in_log, "fresh").await.as_deref(), Some("yes"), "the file's new key was not moved");
        assert!(!kv_path.exists() && dir.path().join("kv.redb.imported").exists());
        // Once: a second start finds no file.
        assert_eq!(import_kv(&kv_path, &log).unwrap(), log::KvImport::default());
    }
}
