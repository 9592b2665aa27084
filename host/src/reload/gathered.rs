//! The plugins folder's changes as the watcher reports them, gathered until the reload task
//! takes them: each file once, and past [`MAX_FILES`] files one look at every file instead
//! (a rescan). A flood of changes (a million files made or touched while the host starts, when
//! nothing takes them for minutes) holds a bounded set, not a queue of every event.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio::sync::Notify;

/// The most files gathered one by one; past it, a rescan (which looks at every file) instead.
pub const MAX_FILES: usize = 10_000;

/// What changed since the reload task last took it.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Gathered {
    /// These files changed.
    pub paths: BTreeSet<PathBuf>,
    /// Changes may have been missed, or too many files changed: look at every file.
    pub rescan: bool,
}

/// The watcher's side puts changes in; the reload task waits for them and takes them.
#[derive(Default)]
pub struct Changes {
    gathered: Mutex<Gathered>,
    wake: Notify,
    /// The watched folder itself was removed or moved away (its watch is gone with it).
    folder_lost: AtomicBool,
}

impl Changes {
    /// `path` changed.
    pub fn file(&self, path: PathBuf) {
        {
            let mut g = self.gathered.lock().expect("changes poisoned");
            if !g.rescan {
                g.paths.insert(path);
                if g.paths.len() > MAX_FILES {
                    *g = Gathered { paths: BTreeSet::new(), rescan: true };
                }
            }
        }
        self.wake.notify_one();
    }

    /// Changes may have been missed: every file is looked at.
    pub fn rescan(&self) {
        *self.gathered.lock().expect("changes poisoned") = Gathered { paths: BTreeSet::new(), rescan: true };
        self.wake.notify_one();
    }

    /// The watched folder itself was removed or moved away.
    pub fn folder_lost(&self) {
        self.folder_lost.store(true, Ordering::Relaxed);
    }

    /// Whether the watched folder was lost since the last call that answered `true`.
    pub fn take_folder_lost(&self) -> bool {
        self.folder_lost.swap(false, Ordering::Relaxed)
    }

    /// Returns once something changed since the last call returned (a change made before the
    /// call is not missed).
    pub async fn changed(&self) {
        self.wake.notified().await;
    }

    /// Takes what changed.
    pub fn take(&self) -> Gathered {
        std::mem::take(&mut *self.gathered.lock().expect("changes poisoned"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flood of distinct files is gathered as one rescan, not one entry each; a file changed
    /// many times is gathered once.
    #[test]
    fn changes_gather_each_file_once_and_a_flood_as_one_rescan() {
        let changes = Changes::default();
        for _ in 0..3 {
            changes.file("a.wasm".into());
        }
        assert_eq!(changes.take(), Gathered { paths: BTreeSet::from(["a.wasm".into()]), rescan: false });
        for i in 0..=MAX_FILES {
            changes.file(format!("{i}.wasm").into());
        }
        changes.file("late.wasm".into());
        assert_eq!(changes.take(), Gathered { paths: BTreeSet::new(), rescan: true });
        assert_eq!(changes.take(), Gathered::default());
    }

    /// A change reported before the reload task waits wakes it.
    #[tokio::test]
    async fn a_change_made_before_the_wait_is_not_missed() {
        let changes = Changes::default();
        changes.file("a.wasm".into());
        tokio::time::timeout(std::time::Duration::from_secs(1), changes.changed()).await.expect("woken");
    }
}
