//! Hot reload: the plugins folder is watched; adding, replacing (in place or by rename),
//! removing and renaming a `.wasm` take effect without a restart.
//!
//! Each change is compiled off the event loop and validated, then swapped in atomically by the
//! router (in-flight events finish on the old version, new ones go to the new). Files are
//! applied side by side (`applying.rs`), so a file that compiles for minutes holds back no other
//! file. A file still being written is waited for, not reported, for up to [`SETTLE`]; a file
//! that stays invalid once it settles (or keeps changing past that) is reported (log,
//! `/v1/plugins`, load-error counter) and the previous version keeps serving.
//! Invariant: a bad file never takes a serving plugin down.
//!
//! A file is the plugin its name (or `[plugins.NAME] file`) makes it ([`loader::identity_of`]),
//! so a rename is a removal and an addition: `echo.wasm` → `echo-v2.wasm` removes plugin `echo`
//! and loads `echo-v2`, which is refused if its manifest still says `echo` (the file keeps being
//! reported until it is renamed back or the config binds it). Nothing a file declares can move
//! another file's plugin.

use crate::config::Config;
use crate::kv::KvStore;
use crate::loader::{self, FileError, Rejected};
use crate::router::Router;
use crate::sandbox::{LoadError, Plugin, Sandbox};
use applying::Applying;
use gathered::{Changes, Gathered};
use notify::{RecursiveMode, Watcher};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::oneshot;

mod applying;
mod gathered;
mod linked;

/// Quiet time after the last file event before a change is acted on.
const DEBOUNCE: Duration = Duration::from_millis(75);

/// How often the reload task looks at which folder the plugins folder's path names: replaced
/// (`rm -rf plugins && mkdir plugins`, `mv`), or a symlink to it (or to a folder above it)
/// pointed elsewhere (a release-symlink deploy), the watch on the old folder sees nothing of
/// the new one (review 56a M1: hot reload ended silently, every plugin removed until a
/// restart). Then the new folder is watched and every file looked at again. A folder made again
/// after `rm -rf` often gets the old one's inode number (ext4: review 56d H1): the watcher's
/// report that the folder itself went ([`Changes::folder_lost`]) counts too.
const FOLDER_CHECK: Duration = Duration::from_secs(2);

/// Which folder a path names now (device and inode, symlinks followed); `None` while none.
fn folder_identity(dir: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).ok().filter(|m| m.is_dir()).map(|m| (m.dev(), m.ino()))
}

/// The longest changes are gathered before they are applied: a file written to without pause
/// (a log someone points at the folder, a copy that never ends) must not hold back every other
/// plugin's reload or removal.
const MAX_GATHER: Duration = Duration::from_secs(1);
/// How long an invalid file may keep changing (being written) before it is reported.
const SETTLE: Duration = Duration::from_secs(2);
/// An invalid file written to this lately is taken to be still being written.
const QUIET: Duration = Duration::from_millis(500);

/// How an apply of one file went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    /// Loaded and installed, removed, reported, or given up for a newer change.
    Done,
    /// Not a valid component yet, and still being written: look again shortly.
    NotSettled,
    /// Refused for the host's or the machine's failure, not the file's
    /// ([`LoadError::is_transient`]): reported, and tried again after a growing pause.
    TryAgain,
    /// Refused for room in `sandbox.max_code_mib` ([`LoadError::NoRoom`]): as `TryAgain`, and
    /// tried again as soon as a plugin version gives code back.
    NoRoom,
}

/// Counters of reloads (shown in metrics).
#[derive(Debug, Default)]
pub struct ReloadStats {
    /// Versions swapped in, plugins added or removed.
    pub reloads: AtomicU64,
    /// Files reported as not loadable.
    pub load_errors: AtomicU64,
}

/// What the reloader needs; shared with the host.
pub struct Reloader {
    /// Where plugins live.
    pub sandbox: Sandbox,
    /// Settings (limits, config per plugin).
    pub config: Config,
    /// Plugin state.
    pub kv: Arc<dyn KvStore>,
    /// The live plugins.
    pub router: Arc<Router>,
    /// Files that could not be loaded (path → reason), shared with the API.
    pub rejected: Arc<Mutex<crate::loader::RejectedFiles>>,
    /// Which file each live plugin came from.
    pub files: Mutex<HashMap<PathBuf, String>>,
    /// Counters.
    pub stats: ReloadStats,
    /// Where reload and load-error counters go.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Refused files that may serve now: another spelling of a plugin whose file is gone
    /// ([`Reloader::take_freed`]).
    pub freed: Mutex<Vec<PathBuf>>,
}

impl Reloader {
    /// Every file the host knows: the plugins' and the refused ones'.
    fn known_files(&self) -> Vec<PathBuf> {
        let mut known: Vec<PathBuf> = self.files.lock().expect("poisoned").keys().cloned().collect();
        known.extend(self.rejected.lock().expect("poisoned").iter().map(|r| r.path.clone()));
        known
    }

    fn reject(&self, path: &Path, reason: String) {
        self.stats.load_errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.load_error(path);
        let serving = self.files.lock().expect("poisoned").get(path).cloned();
        let refused = Rejected::new(path.to_path_buf(), &reason);
        refused.log(serving.as_deref());
        self.rejected.lock().expect("poisoned").insert(refused);
    }

    /// The refused files whose plugin names differ from `name`'s only in `-` and `_` (refused as
    /// already served), to be applied again now that it is gone (review 62e F3: the one refused
    /// while `my_handler.wasm` served stayed refused once that file was removed, until touched).
    fn free_other_spellings_of(&self, name: &str) {
        let key = crate::manifest::name_key(name);
        let spelled = |path: &Path| {
            loader::identity_of(path, &self.config).is_ok_and(|other| crate::manifest::name_key(&other) == key)
        };
        let freed: Vec<PathBuf> =
            self.rejected.lock().expect("poisoned").iter().map(|r| r.path.clone()).filter(|p| spelled(p)).collect();
        for path in &freed {
            // Its identity is its own file's name (review 63a F1).
            tracing::warn!(plugin = %name, file = %loader::shown(path),
                "another spelling of the plugin whose file was removed is loaded in its place: a rename, so what the \
                 event log, kv and JetStream hold under the old name (deliveries not settled yet, state, a durable \
                 consumer) stays with that name");
        }
        self.freed.lock().expect("poisoned").extend(freed);
    }

    /// The refused files to apply again, since a removal freed their plugin's name.
    pub fn take_freed(&self) -> Vec<PathBuf> {
        std::mem::take(&mut *self.freed.lock().expect("poisoned"))
    }

    fn clear_rejection(&self, path: &Path) {
        self.rejected.lock().expect("poisoned").remove(path);
    }

    /// Applies the current state of one file, changed at `changed_at` and changing since
    /// `since`. Its load is given up once `superseded` completes (the file is no longer what
    /// is being loaded); an install under way is never cut short. A file that is not a valid
    /// component yet and was written to in the last half second, within [`SETTLE`] of `since`,
    /// is not reported: it is being written, and is [`Applied::NotSettled`].
    pub async fn apply(
        &self,
        path: &Path,
        changed_at: Instant,
        since: Instant,
        superseded: impl Future<Output = ()>,
    ) -> Applied {
        if is_gone(path) {
            // The count first: one who sees the refusal gone finds it gone.
            self.metrics.forget_load_errors(path);
            self.clear_rejection(path);
            let gone = self.files.lock().expect("poisoned").remove(path);
            if let Some(name) = gone {
                // A name is one file; kept as a guard against removing a plugin another path serves.
                let still_elsewhere = self.files.lock().expect("poisoned").values().any(|n| *n == name);
                if !still_elsewhere && self.router.remove(&name) {
                    self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(plugin = %name, file = %loader::shown(path), "plugin removed with its file");
                    self.free_other_spellings_of(&name);
                }
            }
            return Applied::Done;
        }
        let loaded = tokio::select! {
            loaded = loader::load_file(&self.sandbox, path, &self.config, &self.kv) => loaded,
            () = superseded => {
                // Dropping the load ends its compile (the child is killed with it).
                tracing::info!(file = %loader::shown(path), "the file changed while it was loading: loading it again");
                return Applied::Done;
            }
        };
        let plugin = match loaded {
            Ok(plugin) => plugin,
            Err(FileError::Load(LoadError::NotAComponent(_) | LoadError::Invalid(_)))
                if since.elapsed() <= SETTLE && written_lately(path) =>
            {
                return Applied::NotSettled;
            }
            Err(FileError::Load(e)) if e.is_transient() => {
                self.reject(path, format!("{e} (tried again by itself)"));
                return if matches!(e, LoadError::NoRoom(_)) { Applied::NoRoom } else { Applied::TryAgain };
            }
            Err(e) => {
                self.reject(path, e.to_string());
                return Applied::Done;
            }
        };
        self.install(path, plugin, changed_at).await
    }

    /// Serves `plugin` from `path`: [`Applied::TryAgain`] when the bus refused its subscription
    /// (the host's failure, a log that cannot commit now, a broker that refused: review 60c L2,
    /// where a plugin added while the log waited out a failed write stayed refused until its
    /// file changed).
    async fn install(&self, path: &Path, plugin: Plugin, changed_at: Instant) -> Applied {
        // The identity the loader bound: the file's name or its config entry, never a claim.
        let name = plugin.name().to_string();
        let (version, hash) = (plugin.manifest().version.clone(), plugin.hash().to_string());
        // A name is one file (the loader refuses `<NAME>.wasm` when the config names another
        // file), but `my-handler.wasm` and `my_handler.wasm` name one plugin (`name_key`).
        let key = crate::manifest::name_key(&name);
        let owner = self
            .files
            .lock()
            .expect("poisoned")
            .iter()
            .find(|(p, n)| crate::manifest::name_key(n) == key && p.as_path() != path)
            .map(|(p, _)| p.clone());
        if let Some(other) = &owner
            && !is_gone(other)
        {
            self.reject(path, format!("is plugin {name:?}, already served from {}", loader::shown(other)));
            return Applied::Done;
        }
        if self.router.current_hash(&name).as_deref() == Some(hash.as_str())
            && self.files.lock().expect("poisoned").get(path) == Some(&name)
        {
            tracing::debug!(plugin = %name, file = %loader::shown(path), "file touched but unchanged: nothing to reload");
            self.clear_rejection(path);
            return Applied::Done;
        }
        // Claimed before the install is awaited, so another spelling of the name loading beside
        // it (files load in parallel) finds it taken (review 62e F3); given back if refused.
        let claimed = {
            let mut files = self.files.lock().expect("poisoned");
            let taken = files.iter().find(|(p, n)| {
                crate::manifest::name_key(n) == key && p.as_path() != path && Some(*p) != owner.as_ref()
            });
            match taken {
                Some((other, _)) => Err(loader::shown(other)),
                None => Ok(files.insert(path.to_path_buf(), name.clone())),
            }
        };
        let before = match claimed {
            Ok(before) => before,
            Err(other) => {
                self.reject(path, format!("is plugin {name:?}, already served from {other}"));
                return Applied::Done;
            }
        };
        let outcome = if self.router.contains(&name) {
            match self.router.swap(plugin).await {
                Ok(swapped) => {
                    tracing::info!(
                        plugin = %name, file = %loader::shown(path),
                        old_version = %swapped.old_version, old_hash = &swapped.old_hash[..12],
                        new_version = %version, new_hash = &hash[..12],
                        resubscribed = swapped.resubscribed,
                        swap_ms = changed_at.elapsed().as_millis() as u64,
                        "plugin reloaded"
                    );
                    Ok(())
                }
                Err(e) => Err(e),
            }
        } else {
            let delivering = self.config.delivering_for(&name);
            match self.router.install(plugin, delivering).await {
                Ok(()) => {
                    tracing::info!(plugin = %name, file = %loader::shown(path), version = %version, hash = &hash[..12], load_ms = changed_at.elapsed().as_millis() as u64, "plugin added");
                    crate::host::warn_if_the_pool_is_short(
                        &self.config,
                        &self.router.names(),
                        self.sandbox.settings().max_instances,
                    );
                    Ok(())
                }
                Err(e) => Err(e),
            }
        };
        match outcome {
            Ok(()) => {
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                self.metrics.reloads.get_or_create(&crate::metrics::PluginLabels { plugin: name.clone() }).inc();
                self.clear_rejection(path);
                self.files.lock().expect("poisoned").insert(path.to_path_buf(), name.clone());
                Applied::Done
            }
            Err(e) => {
                let mut files = self.files.lock().expect("poisoned");
                match before {
                    Some(before) => files.insert(path.to_path_buf(), before),
                    None => files.remove(path),
                };
                drop(files);
                if let crate::transport::TransportError::Refused(why) = e {
                    self.reject(path, format!("could not subscribe: {why}"));
                    return Applied::Done;
                }
                self.reject(path, format!("could not subscribe: {e} (tried again by itself)"));
                Applied::TryAgain
            }
        }
    }
}

/// Sleeps until `at` (the caller polls it only when there is one).
async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Whether nothing is at `path` any more (a dangling symlink is still there: it is reported).
/// Only "not found" says so (or a folder in its path that is no folder now): any other failure
/// to look (no permission, an I/O error, a mount gone away) removed a serving plugin (review
/// 60b M4); the file's load then fails and is reported, and the plugin keeps serving.
fn is_gone(path: &Path) -> bool {
    matches!(std::fs::symlink_metadata(path),
        Err(e) if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory))
}

/// Whether `path` was written to in the last [`QUIET`] (or its time is in the future).
fn written_lately(path: &Path) -> bool {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .is_ok_and(|at| SystemTime::now().duration_since(at).map_or(true, |age| age < QUIET))
}

fn is_plugin_file(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "wasm")
}

/// What a rescan looks at: every `.wasm` file in `dir` now, and every file a plugin was loaded
/// from or refused for (a file gone meanwhile is then removed or forgotten).
fn rescan_paths(dir: &Path, known: impl IntoIterator<Item = PathBuf>) -> BTreeSet<PathBuf> {
    let mut paths: BTreeSet<PathBuf> = known.into_iter().collect();
    match std::fs::read_dir(dir) {
        Ok(entries) => paths.extend(entries.flatten().map(|e| e.path()).filter(|p| is_plugin_file(p))),
        Err(e) => {
            tracing::error!(dir = %dir.display(), "cannot list the plugins folder to look at every file again: {e}")
        }
    }
    paths
}

/// The plugins folder's changes, gathered from when the watch began: started before the host
/// first reads the folder, so what changes while it starts (a file replaced after it was read,
/// one added after the listing, one removed after it loaded) is applied once it has started,
/// not left until the next change to that file.
pub struct FolderWatch {
    watcher: notify::RecommendedWatcher,
    changes: Arc<Changes>,
    /// The folder the watch was put on ([`folder_identity`]).
    watching: Option<(u64, u64)>,
}

/// Starts watching `dir` for plugin files' changes (see [`FolderWatch`]).
pub fn watch_folder(dir: &Path) -> anyhow::Result<FolderWatch> {
    let dir = dir.to_path_buf();
    let changes = Arc::new(Changes::default());
    let tx = changes.clone();
    // Changes were lost (the kernel's queue of them overflowed, or the watch failed): the task
    // looks at every file again. (The watcher's handler holds nothing of the host: notify's
    // thread drops it after the host stopped, and it must not keep the kv store open then.)
    let folder = dir.clone();
    // The folder's own path as the watcher names it in its events (absolute, as notify makes it).
    let root = std::env::current_dir().map(|cwd| cwd.join(&dir)).unwrap_or_else(|_| dir.clone());
    let rescan = move |tx: &Changes, why: &str| {
        tracing::warn!(dir = %folder.display(),
            "changes to the plugins folder may have been missed ({why}): looking at every file again");
        tx.rescan();
    };
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| match res {
        Ok(event) if event.need_rescan() => rescan(&tx, "the change events overflowed"),
        Ok(event) => {
            use notify::EventKind;
            use notify::event::{AccessKind, AccessMode};
            // Reading a file (as the loader does) raises access events: only changes count.
            let relevant = matches!(
                event.kind,
                EventKind::Create(_)
                    | EventKind::Modify(_)
                    | EventKind::Remove(_)
                    | EventKind::Access(AccessKind::Close(AccessMode::Write))
            );
            if !relevant {
                return;
            }
            // The folder itself removed or moved away: its watch went with it. (`rm -rf` and a
            // new folder often get the old one's inode number, which `FOLDER_CHECK` looks at.)
            let gone =
                matches!(event.kind, EventKind::Remove(_) | EventKind::Modify(notify::event::ModifyKind::Name(_)));
            if gone && event.paths.contains(&root) {
                tx.folder_lost();
            }
            for path in event.paths {
                if is_plugin_file(&path) {
                    tx.file(path);
                }
            }
        }
        Err(e) => {
            tracing::error!("watching the plugins folder: {e}");
            rescan(&tx, "the watch reported an error");
        }
    })?;
    let watching = folder_identity(&dir);
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| anyhow::anyhow!("cannot watch the plugins folder {}: {e}", dir.display()))?;
    Ok(FolderWatch { watcher, changes, watching })
}

/// Applies the changes `folder` gathers (those made since it began first) until the returned
/// guard is dropped.
pub fn watch(reloader: Arc<Reloader>, folder: FolderWatch) -> WatchGuard {
    let FolderWatch { mut watcher, changes, mut watching } = folder;
    let dir = reloader.config.plugins_dir.clone();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let watched = dir.clone();
    let task = tokio::spawn(async move {
        let mut applying = Applying::new(reloader.clone());
        // What the start refused for the host's failure is tried again, as after a reload's.
        let transient: Vec<(PathBuf, bool)> = reloader
            .rejected
            .lock()
            .expect("poisoned")
            .iter()
            .filter(|r| r.transient)
            .map(|r| (r.path.clone(), r.waits_for_room))
            .collect();
        for (path, room) in transient {
            applying.try_again_later(path, room);
        }
        let mut stopping = std::pin::pin!(stop_rx);
        let mut folder_check = tokio::time::interval(FOLDER_CHECK);
        folder_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let linked = Arc::new(linked::LinkedTargets::default());
        loop {
            let retry = applying.next_retry();
            tokio::select! {
                _ = &mut stopping => break,
                () = changes.changed() => {}
                _ = folder_check.tick() => {
                    watch_again_if_replaced(&mut watcher, &watched, &mut watching, &changes);
                    linked.look_in_background(reloader.known_files(), &changes);
                    continue;
                }
                Some(ended) = applying.tasks.join_next() => {
                    // Only an abort (the watch stopping) ends a task without its file.
                    if let Ok((path, applied)) = ended {
                        applying.ended(path, applied);
                    }
                    for path in reloader.take_freed() {
                        applying.start(path, Instant::now());
                    }
                    continue;
                }
                () = sleep_until(retry), if retry.is_some() => {
                    applying.retry_due();
                    continue;
                }
                () = reloader.sandbox.code_budget().freed(), if applying.waits_for_room() => {
                    applying.room_freed();
                    continue;
                }
            };
            let changed_at = Instant::now();
            // Debounce: gather everything that changes together (a copy, a rename pair).
            while changed_at.elapsed() < MAX_GATHER && tokio::time::timeout(DEBOUNCE, changes.changed()).await.is_ok() {
            }
            let Gathered { mut paths, rescan } = changes.take();
            if rescan {
                // Every file, the plugins' and the refused ones' too (they may be gone).
                paths.extend(rescan_paths(&watched, reloader.known_files()));
            }
            // Each file is applied on its own, beside the others: a removal does not wait for
            // a load, so of a rename the old name's plugin is usually removed before the new
            // name's is added (two plugins, each its own subscription: nothing is handed over).
            for path in paths {
                applying.start(path, changed_at);
            }
        }
        // Every apply under way is given up (a compile child is killed with it), and waited for.
        applying.tasks.shutdown().await;
    });
    tracing::info!(dir = %dir.display(), "watching the plugins folder");
    WatchGuard { stop: Some(stop), task }
}

/// When `dir` names another folder than the one watched (see [`FOLDER_CHECK`]), puts the watch
/// on it and asks for every file to be looked at again; a path that names no folder now waits
/// for one (its files' removals were seen as they went).
fn watch_again_if_replaced(
    watcher: &mut notify::RecommendedWatcher,
    dir: &Path,
    watching: &mut Option<(u64, u64)>,
    changes: &Changes,
) {
    let now = folder_identity(dir);
    if now.is_none() {
        // (A folder lost stays lost until one is there again.)
        return;
    }
    if !changes.take_folder_lost() && now == *watching {
        return;
    }
    // The old folder's watch may be gone with it already.
    let _ = watcher.unwatch(dir);
    match watcher.watch(dir, RecursiveMode::NonRecursive) {
        Ok(()) => {
            *watching = now;
            tracing::warn!(dir = %dir.display(),
                "the plugins folder was replaced (or a link to it now points elsewhere): watching the new one and \
                 looking at every file again");
            changes.rescan();
        }
        Err(e) => {
            *watching = now;
            tracing::error!(dir = %dir.display(),
                "the plugins folder was replaced and cannot be watched again (its changes are not seen until a \
                 restart): {e}");
            changes.rescan();
        }
    }
}

/// Stops watching when dropped.
pub struct WatchGuard {
    /// (The watcher lives in the task: it watches again a folder put in the old one's place.)
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl WatchGuard {
    /// Stops watching and waits until the reload task, its applies and what they hold are gone.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review 60b M4: any failure to look at a file counted as its removal.
    #[test]
    fn only_a_file_not_found_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.wasm");
        std::fs::write(&file, b"x").unwrap();
        assert!(!is_gone(&file));
        assert!(is_gone(&dir.path().join("y.wasm")));
        assert!(is_gone(&file.join("z.wasm")), "a folder in its path is no folder now");
        // A path whose folder is a link loop cannot be looked at (ELOOP): not a removal.
        let looped = dir.path().join("loop");
        std::os::unix::fs::symlink(&looped, &looped).unwrap();
        assert!(!is_gone(&looped.join("x.wasm")));
    }

    #[test]
    fn a_rescan_looks_at_every_plugin_file_and_every_file_known_before() {
        let dir = tempfile::tempdir().unwrap();
        let at = |name: &str| dir.path().join(name);
        std::fs::write(at("a.wasm"), b"").unwrap();
        std::fs::write(at("notes.txt"), b"").unwrap();
        std::fs::create_dir(at("odd.wasm")).unwrap();
        // `gone.wasm` served a plugin and was removed while changes were being missed
        let paths = rescan_paths(dir.path(), [at("gone.wasm"), at("a.wasm")]);
        assert_eq!(paths, BTreeSet::from([at("a.wasm"), at("gone.wasm"), at("odd.wasm")]));
    }
}
