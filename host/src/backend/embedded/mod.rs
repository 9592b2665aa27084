//! The embedded backend: an in-process bus (`bus`), by default over a durable event log in
//! `data_dir/bus.redb` (`log`), with plugin kv in the same file (`kv`) so an attempt's kv
//! writes commit with its outputs (the outbox). Settings: `[bus]`.

pub mod bus;
pub mod disk;
pub mod kv;
pub mod log;
mod reopen_backoff;
mod retired_ids;
mod rows;
mod zeroed_ahead;

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
                    "bus.durable = false: plugin kv is kept in kv.redb; this run does not see the kv an earlier \
                     durable run kept in the event log, and at the next durable start what it writes is not moved \
                     into a log that holds kv of its own (the file is kept, renamed)");
            }
            let kv = RedbKv::open(&kv_path).with_context(|| format!("opening the kv store {}", kv_path.display()))?;
            (EmbeddedBus::new(), Arc::new(kv))
        }
        (false, false) => (EmbeddedBus::new(), Arc::new(MemoryKv::new())),
    };
    Ok(Backend { transport: Arc::new(transport), kv })
}

/// Moves plugin kv kept in `kv.redb` (by an earlier version, or a run with `bus.durable =
/// false`) into the event log's file, then renames the file `kv.redb.imported` (or, that name
/// taken, `kv.redb.imported.<unix ms>`): all of it while the log has never committed kv, none
/// once it has ([`log::KvImport`]), and a warning says so. Merging the two key by key made states
/// no handler committed: a run with `bus.durable = false` starts from an empty `kv.redb` (a
/// counter at 100 in the log counts from 0 to 3 there), and its keys overwrote the log's, or came
/// back where the log had deleted them.
fn import_kv(kv_path: &std::path::Path, log: &DurableLog) -> anyhow::Result<Option<log::KvImport>> {
    if !kv_path.exists() {
        return Ok(None);
    }
    let rows = RedbKv::open(kv_path)
        .and_then(|old| old.export())
        .with_context(|| format!("reading the kv store {} to move it into the event log", kv_path.display()))?;
    let import = log.import_kv(&rows, digest_of(&rows)).context("moving plugin kv into the event log")?;
    let mut kept_as = kv_path.with_extension("redb.imported");
    if kept_as.exists() {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        kept_as = kv_path.with_extension(format!("redb.imported.{}", now.as_millis()));
    }
    std::fs::rename(kv_path, &kept_as).with_context(|| format!("renaming {} after moving it", kv_path.display()))?;
    let (from, kept_as) = (kv_path.display(), kept_as.display());
    match import {
        log::KvImport::Moved(entries) => {
            tracing::info!(entries, %from, %kept_as, "plugin kv moved into the event log");
        }
        log::KvImport::MovedBefore => {
            tracing::info!(%from, %kept_as, "plugin kv was moved into the event log before the last stop");
        }
        log::KvImport::LeftOut(entries) => tracing::warn!(entries, %from, %kept_as,
            "plugin kv NOT moved into the event log: the log holds kv of its own (a durable run's), and merging \
             the two key by key could make a state no handler committed; the log's kv is what plugins see, and \
             the file's entries stay in the renamed file"),
    }
    Ok(Some(import))
}

/// A digest of kv entries: what [`DurableLog::import_kv`] keeps to know them again.
fn digest_of(rows: &[(String, crate::kv::Versioned)]) -> u64 {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for (key, v) in rows {
        for part in [key.as_bytes(), &v.value] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update(v.version.to_le_bytes());
    }
    let digest = h.finalize();
    u64::from_le_bytes(digest[..8].try_into().expect("a SHA-256 digest has 8 bytes"))
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
    /// the file's entries were moved in over the log's, and the counter at 100 became 3. Now
    /// nothing of the file moves into a log that holds kv; the file is kept renamed, each time
    /// under a name of its own.
    #[tokio::test]
    async fn a_kv_file_is_not_merged_into_a_log_that_holds_kv() {
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), log::SyncPolicy::Always).unwrap();
        let in_log = kv::LogKv::new(log.clone());
        in_log.commit("p", &set(&[("count", "100")])).await.unwrap();
        let kv_path = dir.path().join("kv.redb");
        for run in 0..2 {
            {
                let file = RedbKv::open(&kv_path).unwrap();
                file.commit("p", &set(&[("count", "3"), ("fresh", "yes")])).await.unwrap();
            }
            assert_eq!(import_kv(&kv_path, &log).unwrap(), Some(log::KvImport::LeftOut(2)), "run {run}");
            assert_eq!(value(&in_log, "count").await.as_deref(), Some("100"), "the log's own value was overwritten");
            assert_eq!(value(&in_log, "fresh").await, None, "half of the file was merged in");
            assert!(!kv_path.exists());
        }
        // Both files kept, the second under a name of its own.
        let kept = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("kv.redb.imported"))
            .count();
        assert_eq!(kept, 2);
        // A second start finds no file.
        assert_eq!(import_kv(&kv_path, &log).unwrap(), None);
    }

    /// An old version's `kv.redb` moves into a log that never held kv, whole, once; a stop
    /// between the move and the rename is not taken for kv of the log's own at the next start.
    #[tokio::test]
    async fn a_kv_file_moves_whole_into_a_new_log_once_across_a_stop() {
        let dir = tempfile::tempdir().unwrap();
        let log = DurableLog::open(&dir.path().join("bus.redb"), log::SyncPolicy::Always).unwrap();
        let kv_path = dir.path().join("kv.redb");
        {
            let file = RedbKv::open(&kv_path).unwrap();
            file.commit("p", &set(&[("count", "3"), ("fresh", "yes")])).await.unwrap();
        }
        // The move committed, the host stopped before the rename.
        let rows = RedbKv::open(&kv_path).unwrap().export().unwrap();
        assert_eq!(log.import_kv(&rows, digest_of(&rows)).unwrap(), log::KvImport::Moved(2));
        assert_eq!(import_kv(&kv_path, &log).unwrap(), Some(log::KvImport::MovedBefore));
        let in_log = kv::LogKv::new(log.clone());
        assert_eq!(value(&in_log, "count").await.as_deref(), Some("3"));
        assert_eq!(value(&in_log, "fresh").await.as_deref(), Some("yes"));
        assert!(!kv_path.exists() && dir.path().join("kv.redb.imported").exists());
    }
}
