//! A redb database that is closed and opened again after a failed write. redb refuses every
//! write of a handle once one failed (`PreviousIo`: "close and re-open the database"), so a full
//! disk that frees up would leave the store refusing writes until a restart. `dlq.redb` and
//! `kv.redb` use it; the event log reopens with its own writer (`backend::embedded::log`).

use redb::Database;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// How often a broken database is opened again at most: each open after a failed write runs
/// redb's repair (it reads the whole file), and on a disk still full it fails again.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// How long an open waits for a handle of the same file to be let go (a host stopping in this
/// process, or a read finishing before a reopen).
const OPEN_WAIT: Duration = Duration::from_secs(2);

/// One database file, opened again after a failed write.
pub struct ReopeningDb {
    path: PathBuf,
    /// Its page cache's bound, kept for each open.
    cache_bytes: usize,
    /// What moving a damaged file aside costs ([`open_failure`]).
    if_damaged: &'static str,
    /// The open database: `None` once an open after a failed write failed too.
    db: RwLock<Option<Arc<Database>>>,
    /// A write failed: the next write opens it again first (reads go on meanwhile).
    broken: AtomicBool,
    /// When it was last opened again (at most once per [`REOPEN_EVERY`]).
    last_try: Mutex<Option<Instant>>,
}

impl ReopeningDb {
    /// Opens (or creates) the database at `path` (blocking: waits up to 2 s for a handle this
    /// process still holds), with a page cache of at most `cache_bytes` (redb's default is
    /// 1 GiB: what a plugin's kv writes would pin in the host's memory).
    pub fn open(path: &Path, cache_bytes: usize, if_damaged: &'static str) -> Result<Self, String> {
        let db = open_db(path, cache_bytes, if_damaged)?;
        Ok(Self {
            path: path.to_path_buf(),
            cache_bytes,
            if_damaged,
            db: RwLock::new(Some(Arc::new(db))),
            broken: AtomicBool::new(false),
            last_try: Mutex::new(None),
        })
    }

    /// The database open now, if one is (after a failed write it still reads).
    pub fn current(&self) -> Option<Arc<Database>> {
        self.db.read().expect("redb handle poisoned").clone()
    }

    /// The database to read: the one open, or, when none is, opened again (blocking; at most
    /// once a second).
    pub fn for_read(&self) -> Result<Arc<Database>, String> {
        match self.current() {
            Some(db) => Ok(db),
            None => self.reopen_if_due(),
        }
    }

    /// The database to write: opened again first after a failed write (blocking; at most once a
    /// second, else refused naming why).
    pub fn for_write(&self) -> Result<Arc<Database>, String> {
        // (The handle is let go before it is opened again: redb opens a file once at a time.)
        match self.current().filter(|_| !self.broken.load(Ordering::Acquire)) {
            Some(db) => Ok(db),
            None => self.reopen_if_due(),
        }
    }

    /// A write failed: the next one opens the database again first.
    pub fn failed(&self) {
        self.broken.store(true, Ordering::Release);
    }

    /// Closes the database, as an open after a failed write that failed too leaves it.
    #[cfg(test)]
    pub(crate) fn close(&self) {
        drop(self.db.write().expect("redb handle poisoned").take());
    }

    /// Closes the database and opens it again at its last durable commit, unless that was tried
    /// less than a second ago.
    fn reopen_if_due(&self) -> Result<Arc<Database>, String> {
        let mut last_try = self.last_try.lock().expect("redb handle poisoned");
        if last_try.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
            return Err(format!(
                "{} failed a write and is opened again at most once a second (a full disk?)",
                self.path.display()
            ));
        }
        *last_try = Some(Instant::now());
        drop(self.db.write().expect("redb handle poisoned").take());
        let db = Arc::new(
            open_db(&self.path, self.cache_bytes, self.if_damaged)
                .map_err(|e| format!("opening it again after a failed write: {e}"))?,
        );
        *self.db.write().expect("redb handle poisoned") = Some(db.clone());
        self.broken.store(false, Ordering::Release);
        tracing::info!(path = %self.path.display(), "opened again after a failed write");
        Ok(db)
    }
}

/// What an open of a database file that failed with `e` says to do: an I/O error (permissions
/// after a run as another user, a read-only disk, a folder in the file's place) says to look at
/// the file and its folder, which keep every byte; anything else may be damage, and only then is
/// the file to be moved aside, losing what `if_damaged` says (review 55a 5: the one advice for
/// both had an operator throw away a log of accepted events over a permission error).
pub fn open_failure(e: &redb::DatabaseError, if_damaged: &str) -> String {
    match e {
        // The system's errors carry its number (EACCES, EROFS, EISDIR, EIO of a failing disk…);
        // what redb cannot read as a database it reports as an I/O error of its own, without one
        // (`InvalidData`, `UnexpectedEof`).
        redb::DatabaseError::Storage(redb::StorageError::Io(io)) if io.raw_os_error().is_some() => {
            format!(
                "{io} (an I/O error, not damage: check the owner and mode of the file and of its folder, and the \
             disk; what the file keeps is not lost)"
            )
        }
        e => format!("{e} (if the file is damaged, move it aside to start {if_damaged})"),
    }
}

/// Opens (or creates) the database at `path` with a cache of `cache_bytes`, waiting up to 2 s
/// for another handle of this process to be let go; an error says what to do
/// ([`open_failure`], with `if_damaged`).
fn open_db(path: &Path, cache_bytes: usize, if_damaged: &str) -> Result<Database, String> {
    // Made readable by its owner alone when missing (redb initialises an empty file).
    crate::private_files::create_file(path)
        .map_err(|e| open_failure(&redb::DatabaseError::Storage(e.into()), if_damaged))?;
    let deadline = Instant::now() + OPEN_WAIT;
    loop {
        match redb::Builder::new().set_cache_size(cache_bytes).create(path) {
            Err(redb::DatabaseError::DatabaseAlreadyOpen) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err("in use: is another plugbus running with this data_dir?".into());
            }
            other => return other.map_err(|e| open_failure(&e, if_damaged)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opened again at most once a second: each open after a failed write repairs the file.
    #[test]
    fn a_broken_database_is_opened_again_at_most_once_a_second() {
        let dir = tempfile::tempdir().unwrap();
        let db = ReopeningDb::open(&dir.path().join("x.redb"), 1 << 20, "empty").unwrap();
        db.failed();
        db.for_write().expect("the first open after a failure");
        db.failed();
        assert!(db.for_write().unwrap_err().contains("at most once a second"));
        assert!(db.for_read().is_ok(), "it still reads meanwhile");
        std::thread::sleep(REOPEN_EVERY);
        db.for_write().expect("a second later");
        // Closed (an open that failed): a read opens it again, once a second too.
        db.close();
        std::thread::sleep(REOPEN_EVERY);
        db.for_read().expect("a read opens it again");
    }
}
