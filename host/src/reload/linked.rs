//! Plugin files that are symlinks to builds elsewhere (`plugins/orders.wasm ->
//! /builds/orders.wasm`): the folder's watch sees the link, not its target, so a build written
//! again in place or renamed over the target raised nothing (review 62d F6: the old version kept
//! serving silently). Each [`super::FOLDER_CHECK`] the targets of the linked files the host knows
//! (serving or refused) are looked at, and a target that changed is gathered as its link's change.

use super::gathered::Changes;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// What identifies a target's content without reading it: device, inode, size, and the
/// modification and change times (a rename over it changes the inode; a write in place, the times).
type Fingerprint = (u64, u64, u64, i64, i64, i64, i64);

/// The target of a plugin file that is a symlink, as last seen; `None` when `path` is no symlink
/// or names nothing now.
fn target_of(path: &Path) -> Option<Fingerprint> {
    use std::os::unix::fs::MetadataExt;
    if !std::fs::symlink_metadata(path).ok()?.file_type().is_symlink() {
        return None;
    }
    let m = std::fs::metadata(path).ok()?;
    Some((m.dev(), m.ino(), m.size(), m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()))
}

/// The targets of the linked plugin files, as last looked at.
#[derive(Debug, Default)]
pub struct LinkedTargets {
    seen: Mutex<HashMap<PathBuf, Fingerprint>>,
    /// A look is under way ([`LinkedTargets::look_in_background`]).
    looking: AtomicBool,
}

impl LinkedTargets {
    /// [`LinkedTargets::check`] in a blocking thread of its own, unless the last one is still
    /// under way: a target on a file system that hangs (NFS, FUSE) holds no worker of the runtime
    /// and no reload of the folder's own files (review 63c F4), only that one thread.
    pub fn look_in_background(self: &Arc<Self>, known: Vec<PathBuf>, changes: &Arc<Changes>) {
        if self.looking.swap(true, Ordering::AcqRel) {
            return;
        }
        /// Ends the look when dropped, even by a panic (looks would stop for good otherwise).
        struct Looked(Arc<LinkedTargets>);
        impl Drop for Looked {
            fn drop(&mut self) {
                self.0.looking.store(false, Ordering::Release);
            }
        }
        let (looked, changes) = (Looked(self.clone()), changes.clone());
        tokio::task::spawn_blocking(move || looked.0.check(known, &changes));
    }

    /// Looks at the targets of `known` (the files the host serves or refused): one that changed
    /// since the last look, or is seen for the first time, is gathered into `changes` as its
    /// link's change; links no longer known are forgotten.
    pub fn check(&self, known: impl IntoIterator<Item = PathBuf>, changes: &Changes) {
        let mut seen = self.seen.lock().expect("linked targets poisoned");
        let mut now = HashMap::new();
        for path in known {
            let Some(target) = target_of(&path) else { continue };
            // First seen, it is looked at once too: the build may have changed between the load
            // that read it and this look (a reload of what serves already changes nothing).
            match seen.get(&path) {
                Some(before) if *before == target => {}
                Some(_) => {
                    tracing::info!(file = %path.display(), "the build a plugin file links to changed: loading it again");
                    changes.file(path.clone());
                }
                None => changes.file(path.clone()),
            }
            now.insert(path, target);
        }
        *seen = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A target written again in place, or replaced by a rename, is its link's change; a plain
    /// file, or a link whose target did not change, is none.
    #[test]
    fn a_linked_build_written_again_or_renamed_over_is_its_links_change() {
        let builds = tempfile::tempdir().unwrap();
        let plugins = tempfile::tempdir().unwrap();
        let build = builds.path().join("orders.wasm");
        std::fs::write(&build, b"v1").unwrap();
        let link = plugins.path().join("orders.wasm");
        std::os::unix::fs::symlink(&build, &link).unwrap();
        let plain = plugins.path().join("audit.wasm");
        std::fs::write(&plain, b"v1").unwrap();
        let known = || vec![link.clone(), plain.clone()];
        let changes = Changes::default();
        let linked = LinkedTargets::default();

        linked.check(known(), &changes);
        let first: Vec<PathBuf> = changes.take().paths.into_iter().collect();
        assert_eq!(first, vec![link.clone()], "first seen: looked at once (it may have changed since its load)");
        linked.check(known(), &changes);
        assert!(changes.take().paths.is_empty(), "nothing changed");

        std::fs::write(&build, b"v2 longer").unwrap();
        std::fs::write(&plain, b"v2 longer").unwrap();
        linked.check(known(), &changes);
        assert_eq!(changes.take().paths.into_iter().collect::<Vec<_>>(), vec![link.clone()], "written in place");

        let next = builds.path().join("orders.wasm.new");
        std::fs::write(&next, b"v3 longer").unwrap();
        std::fs::rename(&next, &build).unwrap();
        linked.check(known(), &changes);
        assert_eq!(changes.take().paths.into_iter().collect::<Vec<_>>(), vec![link.clone()], "renamed over");

        std::fs::remove_file(&build).unwrap();
        linked.check(known(), &changes);
        assert!(changes.take().paths.is_empty(), "a dangling link is the folder watch's to report");
    }
}
