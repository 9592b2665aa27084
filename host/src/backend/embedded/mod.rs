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
            let kv = RedbKv::open(&kv_path).with_context(|| format!("opening the kv store {}", kv_path.display()))?;
            (EmbeddedBus::new(), Arc::new(kv))
        }
        (false, false) => (EmbeddedBus::new(), Arc::new(MemoryKv::new())),
    };
    Ok(Backend { transport: Arc::new(transport), kv })
}

/// Moves plugin kv kept by an earlier version in `kv.redb` into the event log's file, once (the
/// old file is renamed `kv.redb.imported`).
fn import_kv(kv_path: &std::path::Path, log: &DurableLog) -> anyhow::Result<()> {
    if !kv_path.exists() {
        return Ok(());
    }
    let rows = RedbKv::open(kv_path)
        .and_then(|old| old.export())
        .with_context(|| format!("reading the kv store {} to move it into the event log", kv_path.display()))?;
    log.import_kv(&rows).context("moving plugin kv into the event log")?;
    let done = kv_path.with_extension("redb.imported");
    std::fs::rename(kv_path, &done).with_context(|| format!("renaming {} after moving it", kv_path.display()))?;
    tracing::info!(entries = rows.len(), from = %kv_path.display(), kept_as = %done.display(), "plugin kv moved into the event log");
    Ok(())
}
