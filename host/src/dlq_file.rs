//! The kept dead letters on disk (`data_dir/dlq.redb`), so `plugbus dlq list|replay` works after
//! a restart. [`crate::deadletter::DeadLetters`] writes through to it: a push inserts, an
//! eviction or a replay removes; at start the store is read back in order.

use crate::backend::embedded::log::{decode, encode};
use crate::event::Event;
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};

/// A kept entry's number at or past this is damage (no file reaches it): it is passed over at
/// open, so the numbers after it cannot wrap.
const DAMAGED_SEQ: u64 = 1 << 63;

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
    /// Opened again after a failed write (redb refuses every write of a handle once one failed).
    db: crate::redb_handle::ReopeningDb,
    path: PathBuf,
}

impl DlqFile {
    /// The file's one write transaction, held (a slow disk, for tests).
    #[cfg(test)]
    pub(crate) fn hold_writer(&self) -> redb::WriteTransaction {
        let db = self.db.current().expect("the dead-letter file is open");
        db.begin_write().expect("the dead-letter file's writer")
    }

    /// Opens (or creates) the file; returns it with what it keeps that reads back, oldest
    /// first, and the sequence number after every entry it holds. An entry that does not read
    /// back (damaged, or written by a newer release) is logged, naming it, and left in the file
    /// untouched: it stops neither the start nor the others, and its number is never reused.
    pub fn open(path: &Path) -> Result<(Self, Vec<KeptLetter>, u64), DlqFileError> {
        let err = |why: String| DlqFileError { path: path.to_path_buf(), why };
        if let Some(dir) = path.parent() {
            crate::private_files::create_folder(dir).map_err(|e| err(e.to_string()))?;
        }
        // A host stopping in this process lets go of the file when its last task ends.
        // Its page cache: a few MiB (the store is bounded in entries and records; redb's
        // default is 1 GiB).
        let handle =
            crate::redb_handle::ReopeningDb::open(path, 8 << 20, "without the dead letters it keeps").map_err(err)?;
        let db = handle.current().expect("just opened");
        let w = db.begin_write().map_err(|e| err(e.to_string()))?;
        w.open_table(KEPT).map_err(|e| err(e.to_string()))?;
        w.open_table(RECORDS).map_err(|e| err(e.to_string()))?;
        w.commit().map_err(|e| err(e.to_string()))?;
        let (mut kept, mut next) = (Vec::new(), 0);
        {
            let r = db.begin_read().map_err(|e| err(e.to_string()))?;
            let table = r.open_table(KEPT).map_err(|e| err(e.to_string()))?;
            let records = r.open_table(RECORDS).map_err(|e| err(e.to_string()))?;
            for row in table.iter().map_err(|e| err(e.to_string()))? {
                let (seq, stored) = row.map_err(|e| err(e.to_string()))?;
                if seq.value() >= DAMAGED_SEQ {
                    // No file counts this far: the number after it would wrap, and new dead
                    // letters would be written over kept ones.
                    tracing::error!(path = %path.display(), seq = seq.value(),
                        "a kept dead letter's number is past any a file reaches (damaged): left in the file, not listed or replayed");
                    continue;
                }
                next = next.max(seq.value() + 1);
                let (plugin, event) = match split(stored.value()) {
                    Ok(read) => read,
                    Err(why) => {
                        tracing::error!(path = %path.display(), seq = seq.value(),
                            "a kept dead letter does not read back: left in the file, not listed or replayed: {why}");
                        continue;
                    }
                };
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
        drop(db);
        Ok((Self { db: handle, path: path.to_path_buf() }, kept, next))
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
        let db = self.db.for_write().map_err(err)?;
        let written = (|| {
            let w = db.begin_write().map_err(|e| err(e.to_string()))?;
            {
                let mut t = w.open_table(KEPT).map_err(|e| err(e.to_string()))?;
                let mut r = w.open_table(RECORDS).map_err(|e| err(e.to_string()))?;
                f(&mut t, &mut r).map_err(|e| err(e.to_string()))?;
            }
            w.commit().map_err(|e| err(e.to_string()))
        })();
        if written.is_err() {
            // Opened again (at its last durable commit) before the next write.
            self.db.failed();
        }
        written
    }
}

fn split(stored: &[u8]) -> Result<(String, Event), String> {
    let n = stored.get(..4).ok_or("too short")?;
    let n = u32::from_le_bytes(n.try_into().expect("4 bytes")) as usize;
    let plugin = stored.get(4..4 + n).ok_or("too short for its plugin name")?;
    let plugin = String::from_utf8(plugin.to_vec()).map_err(|e| e.to_string())?;
    Ok((plugin, decode(&stored[4 + n..])?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deadletter::DeadLetters;

    /// One damaged entry (or one a newer release wrote) used to stop the host at start.
    #[test]
    fn an_entry_that_does_not_read_back_is_skipped_kept_and_its_number_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.redb");
        let seqs: Vec<u64> = {
            let s = DeadLetters::persistent(100, &path).unwrap();
            for i in 0..3 {
                s.push("p", Event::new(format!("x.{i}"), ""));
            }
            s.list(None).into_iter().map(|e| e.seq).collect()
        };
        let damaged = seqs[2];
        {
            let db = redb::Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            w.open_table(KEPT).unwrap().insert(damaged, b"\x07\0\0\0garbage".as_slice()).unwrap();
            w.commit().unwrap();
        }
        let s = DeadLetters::persistent(100, &path).unwrap();
        let kept: Vec<String> = s.list(None).into_iter().map(|e| e.event.subject).collect();
        assert_eq!(kept, ["x.0", "x.1"], "the others are kept");
        s.push("p", Event::new("x.3", ""));
        let newest = s.list(None).into_iter().map(|e| e.seq).max().unwrap();
        assert!(newest > damaged, "the damaged entry's number {damaged} was given again ({newest})");
        drop(s);
        let db = redb::Database::create(&path).unwrap();
        let r = db.begin_read().unwrap();
        let row = r.open_table(KEPT).unwrap().get(damaged).unwrap().map(|v| v.value().to_vec());
        assert_eq!(row.as_deref(), Some(b"\x07\0\0\0garbage".as_slice()), "the damaged entry left the file");
    }
    /// Review 59c L1: an entry numbered `u64::MAX` (a damaged or hostile file) made the number
    /// after it overflow: a panic in a debug build, and in a release one new dead letters
    /// numbered from 0 again, over kept ones.
    #[test]
    fn an_entry_numbered_past_any_count_is_passed_over_and_numbers_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.redb");
        let kept = {
            let s = DeadLetters::persistent(100, &path).unwrap();
            s.push("p", Event::new("x.0", ""));
            s.list(None)[0].seq
        };
        {
            let db = redb::Database::create(&path).unwrap();
            let w = db.begin_write().unwrap();
            let copy = w.open_table(KEPT).unwrap().get(kept).unwrap().unwrap().value().to_vec();
            w.open_table(KEPT).unwrap().insert(u64::MAX, copy.as_slice()).unwrap();
            w.commit().unwrap();
        }
        let s = DeadLetters::persistent(100, &path).unwrap();
        assert_eq!(s.list(None).into_iter().map(|e| e.seq).collect::<Vec<_>>(), [kept]);
        s.push("p", Event::new("x.1", ""));
        let seqs: Vec<u64> = s.list(None).into_iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [kept, kept + 1], "numbers go on after the last entry that counts");
    }
}
