//! Hot reload: the plugins folder is watched; adding, replacing (in place or by rename),
//! removing and renaming a `.wasm` take effect without a restart.
//!
//! Each change is compiled off the event loop and validated, then swapped in atomically by the
//! router (in-flight events finish on the old version, new ones go to the new). Files are
//! applied side by side, so a file that compiles for minutes holds back no other file. A file still
//! being written is waited for, not reported; a file that stays invalid once it settles is
//! reported (log, `/v1/plugins`, load-error counter) and the previous version keeps serving.
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
use futures::FutureExt;
use notify::{RecursiveMode, Watcher};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;

/// Quiet time after the last file event before a change is acted on.
const DEBOUNCE: Duration = Duration::from_millis(75);

/// The longest changes are gathered before they are applied: a file written to without pause
/// (a log someone points at the folder, a copy that never ends) must not hold back every other
/// plugin's reload or removal.
const MAX_GATHER: Duration = Duration::from_secs(1);
/// How long an invalid file may keep changing (being written) before it is reported.
const SETTLE: Duration = Duration::from_secs(2);

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
    pub rejected: Arc<Mutex<Vec<Rejected>>>,
    /// Which file each live plugin came from.
    pub files: Mutex<HashMap<PathBuf, String>>,
    /// Counters.
    pub stats: ReloadStats,
    /// Where reload and load-error counters go.
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl Reloader {
    fn reject(&self, path: &Path, reason: String) {
        self.stats.load_errors.fetch_add(1, Ordering::Relaxed);
        self.metrics.load_error(path);
        let serving = self.files.lock().expect("poisoned").get(path).cloned();
        match &serving {
            Some(name) => {
                tracing::error!(file = %path.display(), plugin = %name, "reload rejected, the previous version keeps serving: {reason}")
            }
            None => tracing::error!(file = %path.display(), "plugin not loaded: {reason}"),
        }
        let mut rejected = self.rejected.lock().expect("poisoned");
        rejected.retain(|r| r.path != path);
        rejected.push(Rejected { path: path.to_path_buf(), reason });
    }

    fn clear_rejection(&self, path: &Path) {
        self.rejected.lock().expect("poisoned").retain(|r| r.path != path);
    }

    /// Applies the current state of one file. Its load is given up once `superseded` completes
    /// (the file changed again: what is being loaded is no longer what is there); an install
    /// under way is never cut short.
    pub async fn apply(&self, path: &Path, changed_at: Instant, superseded: impl Future<Output = ()>) {
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
                    tracing::info!(plugin = %name, file = %path.display(), "plugin removed with its file");
                }
            }
            return;
        }
        let loaded = tokio::select! {
            loaded = self.load_settled(path) => loaded,
            () = superseded => {
                // Dropping the load ends its compile (the child is killed with it).
                tracing::info!(file = %path.display(), "the file changed again while it was loading: loading it again");
                return;
            }
        };
        let plugin = match loaded {
            Ok(p) => p,
            Err(reason) => return self.reject(path, reason),
        };
        self.install(path, plugin, changed_at).await;
    }

    /// Loads the file, waiting while it is still being written.
    async fn load_settled(&self, path: &Path) -> Result<Plugin, String> {
        let started = Instant::now();
        let mut last_seen = file_state(path);
        loop {
            let result = loader::load_file(&self.sandbox, path, &self.config, &self.kv).await;
            let transient = matches!(result, Err(FileError::Load(LoadError::NotAComponent(_) | LoadError::Invalid(_))));
            if !transient || started.elapsed() > SETTLE {
                return result.map_err(|e| e.to_string());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = file_state(path);
            if now.is_none() {
                return Err("the file disappeared while loading".into());
            }
            if now == last_seen && started.elapsed() > Duration::from_millis(500) {
                // Settled and still invalid: report it.
                return result.map_err(|e| e.to_string());
            }
            last_seen = now;
        }
    }

    async fn install(&self, path: &Path, plugin: Plugin, changed_at: Instant) {
        // The identity the loader bound: the file's name or its config entry, never a claim.
        let name = plugin.name().to_string();
        let (version, hash) = (plugin.manifest().version.clone(), plugin.hash().to_string());
        // A name is one file (the loader refuses `<NAME>.wasm` when the config names another
        // file): another live path with this name would be a bug, never a takeover.
        let owner = self
            .files
            .lock()
            .expect("poisoned")
            .iter()
            .find(|(p, n)| **n == name && p.as_path() != path)
            .map(|(p, _)| p.clone());
        if let Some(other) = owner
            && !is_gone(&other)
        {
            return self.reject(path, format!("is plugin {name:?}, already served from {}", other.display()));
        }
        if self.router.current_hash(&name).as_deref() == Some(hash.as_str())
            && self.files.lock().expect("poisoned").get(path) == Some(&name)
        {
            tracing::debug!(plugin = %name, file = %path.display(), "file touched but unchanged: nothing to reload");
            self.clear_rejection(path);
            return;
        }
        let outcome = if self.router.contains(&name) {
            match self.router.swap(plugin).await {
                Ok(swapped) => {
                    tracing::info!(
                        plugin = %name, file = %path.display(),
                        old_version = %swapped.old_version, old_hash = &swapped.old_hash[..12],
                        new_version = %version, new_hash = &hash[..12],
                        resubscribed = swapped.resubscribed,
                        swap_ms = changed_at.elapsed().as_millis() as u64,
                        "plugin reloaded"
                    );
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        } else {
            let delivering = self.config.delivering_for(&name);
            match self.router.install(plugin, delivering).await {
                Ok(()) => {
                    tracing::info!(plugin = %name, file = %path.display(), version = %version, hash = &hash[..12], load_ms = changed_at.elapsed().as_millis() as u64, "plugin added");
                    crate::host::warn_if_the_pool_is_short(
                        &self.config,
                        &self.router.names(),
                        self.sandbox.settings().max_instances,
                    );
                    Ok(())
                }
                Err(e) => Err(e.to_string()),
            }
        };
        match outcome {
            Ok(()) => {
                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                self.metrics.reloads.get_or_create(&crate::metrics::PluginLabels { plugin: name.clone() }).inc();
                self.clear_rejection(path);
                self.files.lock().expect("poisoned").insert(path.to_path_buf(), name.clone());
            }
            Err(e) => self.reject(path, format!("could not subscribe: {e}")),
        }
    }
}

/// Whether nothing is at `path` any more (a dangling symlink is still there: it is reported).
fn is_gone(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_err()
}

fn file_state(path: &Path) -> Option<(u64, Option<SystemTime>)> {
    std::fs::metadata(path).ok().map(|m| (m.len(), m.modified().ok()))
}

fn is_plugin_file(path: &Path) -> bool {
    path.extension().is_some_and(|x| x == "wasm")
}

/// What the watcher tells the reload task.
enum Change {
    /// This file changed.
    File(PathBuf),
    /// Changes may have been missed: look at every file.
    Rescan,
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

/// Watches the plugins folder until the returned guard is dropped.
pub fn watch(reloader: Arc<Reloader>) -> anyhow::Result<WatchGuard> {
    let dir = reloader.config.plugins_dir.clone();
    let (tx, mut rx) = mpsc::unbounded_channel::<Change>();
    // Changes were lost (the kernel's queue of them overflowed, or the watch failed): the task
    // looks at every file again. (The watcher's handler holds nothing of the host: notify's
    // thread drops it after the host stopped, and it must not keep the kv store open then.)
    let folder = dir.clone();
    let rescan = move |tx: &mpsc::UnboundedSender<Change>, why: &str| {
        tracing::warn!(dir = %folder.display(),
            "changes to the plugins folder may have been missed ({why}): looking at every file again");
        let _ = tx.send(Change::Rescan);
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
            for path in event.paths {
                if is_plugin_file(&path) {
                    let _ = tx.send(Change::File(path));
                }
            }
        }
        Err(e) => {
            tracing::error!("watching the plugins folder: {e}");
            rescan(&tx, "the watch reported an error");
        }
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|e| anyhow::anyhow!("cannot watch the plugins folder {}: {e}", dir.display()))?;
    let watched = dir.clone();
    let task = tokio::spawn(async move {
        // Every file, the plugins' and the refused ones' too (they may be gone).
        let expand = |change: Change, paths: &mut BTreeSet<PathBuf>| match change {
            Change::File(path) => {
                paths.insert(path);
            }
            Change::Rescan => {
                let mut known: Vec<PathBuf> = reloader.files.lock().expect("poisoned").keys().cloned().collect();
                known.extend(reloader.rejected.lock().expect("poisoned").iter().map(|r| r.path.clone()));
                paths.extend(rescan_paths(&watched, known));
            }
        };
        let mut applying = Applying::new(reloader.clone());
        loop {
            let first = tokio::select! {
                change = rx.recv() => match change {
                    Some(change) => change,
                    None => break,
                },
                Some(ended) = applying.tasks.join_next() => {
                    // Only an abort (the watch stopping) ends a task without its file.
                    if let Ok(path) = ended {
                        applying.done(path);
                    }
                    continue;
                }
            };
            let changed_at = Instant::now();
            let mut paths = BTreeSet::new();
            expand(first, &mut paths);
            // Debounce: gather everything that changes together (a copy, a rename pair).
            while changed_at.elapsed() < MAX_GATHER
                && let Ok(Some(change)) = tokio::time::timeout(DEBOUNCE, rx.recv()).await
            {
                expand(change, &mut paths);
            }
            // Present files first, then the gone ones (a rename is the new name's plugin added,
            // the old name's removed). Each file is applied on its own, beside the others.
            let (gone, present): (Vec<PathBuf>, Vec<PathBuf>) = paths.into_iter().partition(|p| is_gone(p));
            for path in present.into_iter().chain(gone) {
                applying.start(path, changed_at);
            }
        }
    });
    tracing::info!(dir = %dir.display(), "watching the plugins folder");
    Ok(WatchGuard { _watcher: watcher, task })
}

/// The files being applied, each in a task of its own, so a file that takes long to load (a
/// compile that runs up to `sandbox.compile_timeout`) holds back no other file's reload or
/// removal. At most [`loader::loads_at_once`] files load at once; removals never wait for a
/// slot. A file that changes while it loads has that load given up: replacing a slow file with
/// a good one, or removing it, does not wait out its compile. Dropping it (the watch stopped)
/// aborts every apply, and with it any compile child.
struct Applying {
    reloader: Arc<Reloader>,
    /// Each ends with its file (an apply that panicked too).
    tasks: tokio::task::JoinSet<PathBuf>,
    running: Running,
    /// Told when its file changes again while it is applied.
    changed_again: HashMap<PathBuf, Arc<tokio::sync::Notify>>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl Applying {
    fn new(reloader: Arc<Reloader>) -> Self {
        let slots = Arc::new(tokio::sync::Semaphore::new(loader::loads_at_once()));
        let (tasks, running, changed_again) = Default::default();
        Self { reloader, tasks, running, changed_again, slots }
    }

    /// Applies `path`, or once more after the apply under way (whose load is given up).
    fn start(&mut self, path: PathBuf, changed_at: Instant) {
        if self.running.start(&path, changed_at) {
            self.spawn(path, changed_at);
        } else if let Some(changed) = self.changed_again.get(&path) {
            changed.notify_one();
        }
    }

    /// An apply ended: its file is applied again if it changed meanwhile.
    fn done(&mut self, path: PathBuf) {
        match self.running.ended(&path) {
            Some(changed_at) => self.spawn(path, changed_at),
            None => {
                self.changed_again.remove(&path);
            }
        }
    }

    fn spawn(&mut self, path: PathBuf, changed_at: Instant) {
        let changed = Arc::new(tokio::sync::Notify::new());
        self.changed_again.insert(path.clone(), changed.clone());
        let (reloader, slots) = (self.reloader.clone(), self.slots.clone());
        self.tasks.spawn(async move {
            // A removal takes no slot: it is quick, and must not wait behind slow loads.
            let _slot = if is_gone(&path) { None } else { slots.acquire_owned().await.ok() };
            // A panic is a bug of ours: it is logged, and the file is applied at its next change.
            let apply = reloader.apply(&path, changed_at, changed.notified());
            if std::panic::AssertUnwindSafe(apply).catch_unwind().await.is_err() {
                tracing::error!(file = %path.display(), "applying a change to this file panicked");
            }
            path
        });
    }
}

/// Which files are being applied. One file is applied once at a time, in the order of its
/// changes: changes made while it is applied are applied after, once, however many they are
/// (the apply reads the file as it is then).
#[derive(Debug, Default)]
struct Running(HashMap<PathBuf, Option<Instant>>);

impl Running {
    /// Whether to apply `path` now: not while it is applied already (it is then applied again
    /// once that ends, as of the first change since).
    fn start(&mut self, path: &Path, changed_at: Instant) -> bool {
        match self.0.get_mut(path) {
            Some(again) => {
                again.get_or_insert(changed_at);
                false
            }
            None => {
                self.0.insert(path.to_path_buf(), None);
                true
            }
        }
    }

    /// An apply of `path` ended: when the file changed since, if it did (it is then applied
    /// again, and still counts as being applied).
    fn ended(&mut self, path: &Path) -> Option<Instant> {
        let again = self.0.get_mut(path).and_then(Option::take);
        if again.is_none() {
            self.0.remove(path);
        }
        again
    }
}

/// Stops watching when dropped.
pub struct WatchGuard {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl WatchGuard {
    /// Stops watching and waits until the reload task (and what it holds) is gone.
    pub async fn stop(mut self) {
        self.task.abort();
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

    #[test]
    fn a_file_is_applied_once_at_a_time_and_once_more_for_the_changes_made_meanwhile() {
        let (a, b) = (Path::new("a.wasm"), Path::new("b.wasm"));
        let t0 = Instant::now();
        let (t1, t2) = (t0 + Duration::from_millis(1), t0 + Duration::from_millis(2));
        let mut running = Running::default();
        assert!(running.start(a, t0), "a file no one applies is applied at once");
        assert!(running.start(b, t0), "another file is applied beside it");
        // Two changes to `a` while it is applied: one more apply, dated by the first of them.
        assert!(!running.start(a, t1));
        assert!(!running.start(a, t2));
        assert_eq!(running.ended(a), Some(t1));
        // That apply runs: `a` still counts as applied, so a change now waits for it again.
        assert!(!running.start(a, t2));
        assert_eq!(running.ended(a), Some(t2));
        assert_eq!(running.ended(a), None, "nothing changed during the last apply");
        assert!(running.start(a, t2), "done with: the next change applies at once");
        assert_eq!(running.ended(b), None);
        assert_eq!(running.ended(a), None);
        assert!(running.0.is_empty(), "{running:?}");
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
