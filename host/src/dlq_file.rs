//! The kept dead letters on disk (`data_dir/dlq.redb`), so `plugbus dlq list|replay` works after
//! a restart. [`crate::deadletter::DeadLetters`] writes through to it: a push inserts, an
//! eviction or a replay removes; at start the store is read back in order.

use crate::backend::embedded::log::{decode, encode};
use crate::event::Event;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};

/// seq → plugin name (u32 length + bytes), then the encoded dead-letter event.
const KEPT: TableDefinition<u64, &[u8]> = TableDefinition::new("kept");

/// Why the file failed.
#[derive(Debug, thiserror::Error)]
#[error("the dead-letter file {path}: {why}")]
pub struct DlqFileError {
    path: PathBuf,
    why: String,
}

/// One kept dead letter read back: its sequence number, its plugin, the dead-letter event.
pub type KeptLetter = (u64, String, Event);

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
        w.commit().map_err(|e| err(e.to_string()))?;
        let mut kept = Vec::new();
        {
            let r = db.begin_read().map_err(|e| err(e.to_string()))?;
            let table = r.open_table(KEPT).map_err(|e| err(e.to_string()))?;
            for row in table.iter().map_err(|e| err(e.to_string()))? {
                let (seq, stored) = row.map_err(|e| err(e.to_string()))?;
                let (plugin, event) =
                    split(stored.value()).map_err(|why| err(format!("entry {}: {why}", seq.value())))?;
                kept.push((seq.value(), plugin, event));
            }
        }
        Ok((Self { db, path: path.to_path_buf() }, kept))
    }

    /// Keeps one dead letter under `seq`.
    pub fn insert(&self, seq: u64, plugin: &str, event: &Event) -> Result<(), DlqFileError> {
        let mut record = Vec::new();
        record.extend_from_slice(&(plugin.len() as u32).to_le_bytes());
        record.extend_from_slice(plugin.as_bytes());
        encode(event, 0, &mut record);
        self.write(|t| t.insert(seq, record.as_slice()).map(|_| ()))
    }

    /// Forgets the dead letters under `seqs`.
    pub fn remove(&self, seqs: &[u64]) -> Result<(), DlqFileError> {
        self.write(|t| {
            for seq in seqs {
                t.remove(*seq)?;
            }
            Ok(())
        })
    }

    fn write(
        &self,
        f: impl FnOnce(&mut redb::Table<u64, &[u8]>) -> Result<(), redb::StorageError>,
    ) -> Result<(), DlqFileError> {
        let err = |why: String| DlqFileError { path: self.path.clone(), why };
        let w = self.db.begin_write().map_err(|e| err(e.to_string()))?;
        {
            let mut t = w.open_table(KEPT).map_err(|e| err(e.to_string()))?;
            f(&mut t).map_err(|e| err(e.to_string()))?;
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
