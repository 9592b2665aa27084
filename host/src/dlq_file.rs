//! The kept dead letters on disk (`data_dir/dlq.redb`), so `plugbus dlq list|replay` works after
//! a restart. [`crate::deadletter::DeadLetters`] writes through to it: a push inserts, an
//! eviction or a replay removes; at start the store is read back in order.

use crate::backend::embedded::log::{decode, encode};
use crate::event::Event;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};

/// seq → plugin name (u32 length + bytes), then the encoded dead-letter event.
const KEPT: TableDefinition<u64, &[u8]> = TableDefinition::new("kept");

/// seq → what the failed attempt saw ([`crate::deadletter::Record`] as JSON), for those that ran.
const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("records");

/// Why the file failed.
#[derive(Debug, thiserror::Error)]
#[error("the dead-letter file {path}: {why}")]
pub struct DlqFileError {
    path: PathBuf,
    why: String,
}

/// One kept dead letter read back: its sequence number, its plugin, the dead-letter event and
/// what its failed attempt saw.
pub type KeptLetter = (u64, String, Event, Option<Box<crate::deadletter::Record>>);

/// The dead-letter file.
pub struct DlqFile {
    db: Database,
    path: PathBuf,
}

impl DlqFile {
    /// Opens (or creates) the file; returns it with what it keeps, oldest first.
    pub fn open(path: &Path) -> Result<(Self, Vec<KeptLetter>), DlqFileError> {
        let err = |why: String| DlqFileError { path: path.to_path_buf(), why };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
        }
        // A host stopping in this process lets go of the file when its last task ends.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
        let db = loop {
            match Database::create(path) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    return Err(err("in use: is another plugbus running with this data_dir?".into()));
                }
                other => break other.map_err(|e| err(e.to_string()))?,
            }
        };
        let w = db.begin_write().map_err(|e| err(e.to_string()))?;
        w.open_table(KEPT).map_err(|e| err(e.to_string()))?;
        w.open_table(RECORDS).map_err(|e| err(e.to_string()))?;
        w.commit().map_err(|e| err(e.to_string()))?;
        let mut kept = Vec::new();
        {
            let r = db.begin_read().map_err(|e| err(e.to_string()))?;
            let table = r.open_table(KEPT).map_err(|e| err(e.to_string()))?;
            let records = r.open_table(RECORDS).map_err(|e| err(e.to_string()))?;
            for row in table.iter().map_err(|e| err(e.to_string()))? {
                let (seq, stored) = row.map_err(|e| err(e.to_string()))?;
                let (plugin, event) =
                    split(stored.value()).map_err(|why| err(format!("entry {}: {why}", seq.value())))?;
                // A record that does not read back is dropped (the dead letter itself is kept).
                let record = match records.get(seq.value()).map_err(|e| err(e.to_string()))? {
                    Some(r) => match serde_json::from_slice(r.value()) {
                        Ok(record) => Some(Box::new(record)),
                        Err(e) => {
                            tracing::warn!(path = %path.display(), seq = seq.value(),
                                "the record of a kept dead letter does not read back, dropped: {e}");
                            None
                        }
                    },
                    None => None,
                };
                kept.push((seq.value(), plugin, event, record));
            }
        }
        Ok((Self { db, path: path.to_path_buf() }, kept))
    }

    /// Keeps one dead letter under `seq`, with what its failed attempt saw.
    pub fn insert(
        &self,
        seq: u64,
        plugin: &str,
        event: &Event,
        record: Option<&crate::deadletter::Record>,
    ) -> Result<(), DlqFileError> {
        let mut stored = Vec::new();
        stored.extend_from_slice(&(plugin.len() as u32).to_le_bytes());
        stored.extend_from_slice(plugin.as_bytes());
        encode(event, 0, &mut stored);
        let record = record.map(serde_json::to_vec).transpose().map_err(|e| DlqFileError {
            path: self.path.clone(),
            why: format!("the record of dead letter {}: {e}", event.id),
        })?;
        self.write(|t, r| {
            t.insert(seq, stored.as_slice())?;
            match &record {
                Some(record) => r.insert(seq, record.as_slice()).map(|_| ()),
                None => r.remove(seq).map(|_| ()),
            }
        })
    }

    /// Forgets the dead letters under `seqs`.
    pub fn remove(&self, seqs: &[u64]) -> Result<(), DlqFileError> {
        self.write(|t, r| {
            for seq in seqs {
                t.remove(*seq)?;
                r.remove(*seq)?;
            }
            Ok(())
        })
    }

    fn write(
        &self,
        f: impl FnOnce(&mut redb::Table<u64, &[u8]>, &mut redb::Table<u64, &[u8]>) -> Result<(), redb::StorageError>,
    ) -> Result<(), DlqFileError> {
        let err = |why: String| DlqFileError { path: self.path.clone(), why };
        let w = self.db.begin_write().map_err(|e| err(e.to_string()))?;
        {
            let mut t = w.open_table(KEPT).map_err(|e| err(e.to_string()))?;
            let mut r = w.open_table(RECORDS).map_err(|e| err(e.to_string()))?;
            f(&mut t, &mut r).map_err(|e| err(e.to_string()))?;
        }
        w.commit().map_err(|e| err(e.to_string()))
    }
}

fn split(stored: &[u8]) -> Result<(String, Event), String> {
    let n = stored.get(..4).ok_or("too short")?;
    let n = u32::from_le_bytes(n.try_into().expect("4 bytes")) as usize;
    let plugin = stored.get(4..4 + n).ok_or("too short for its plugin name")?;
    let plugin = String::from_utf8(plugin.to_vec()).map_err(|e| e.to_string())?;
    Ok((plugin, decode(&stored[4 + n..])?))
}
