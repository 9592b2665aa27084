//! Which plugin files are being applied, and when each is applied next: the reload task's
//! scheduler.
//!
//! Each file is applied in a task of its own, so a file that takes long to load (a compile
//! that runs up to 4 × `sandbox.compile_timeout` of wall time) holds back no other file's reload or removal:
//! - at most [`loader::loads_at_once`] files load at once; the others wait in line, as paths,
//!   not as tasks (a folder of a million files holds a million paths, no more);
//! - a removal never waits in line: it is quick, and runs as soon as the file is gone (one still
//!   in line is taken out of it);
//! - a file not settled yet (being written) is looked at again 100 ms later, out of the line and
//!   holding no load's place meanwhile;
//! - a file refused for the host's or the machine's failure ([`Applied::TryAgain`]) is tried
//!   again after 5 s, doubling up to every 5 minutes, holding no place meanwhile; a change to it
//!   tries at once, and so does code given back for one refused for room ([`Applied::NoRoom`]);
//! - one file is applied once at a time, in the order of its changes: the changes made while it
//!   is applied are applied after, once, however many they are (the apply reads the file as it
//!   is then), and a load under way is given up if the file is no longer what it read (its
//!   device, inode, length or modification time changed): replacing a slow file with a good
//!   build, or removing it, does not wait out its compile, while a look at every file (a rescan)
//!   gives up nothing.
//!
//! Invariant: every file in [`Applying::files`] is in exactly one place: in line, waiting for
//! its retry, or in a task; and a task's end is the only way out of a task.

use super::{Applied, Reloader, is_gone};
use crate::loader;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet, VecDeque};
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Notify;
use tokio::task::JoinSet;

/// How soon a file not settled yet is looked at again.
const RETRY: Duration = Duration::from_millis(100);

/// The first pause before a load refused for the host's failure is tried again ([`Applied::TryAgain`]);
/// each next one twice the last, up to [`TRY_AGAIN_MOST`].
pub(super) const TRY_AGAIN_FIRST: Duration = Duration::from_secs(5);
/// See [`TRY_AGAIN_FIRST`].
const TRY_AGAIN_MOST: Duration = Duration::from_secs(300);

/// The pause before try `tries + 1` of a load refused for the host's failure.
fn try_again_after(tries: u32) -> Duration {
    TRY_AGAIN_FIRST.saturating_mul(1 << tries.min(16)).min(TRY_AGAIN_MOST)
}

/// Where a file being applied is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// In line for a load's place.
    InLine,
    /// Being loaded (and installed), holding a place.
    Loading,
    /// Being removed (no place needed).
    Removing,
    /// Not settled: looked at again at its retry time.
    Retrying,
    /// Refused for the host's failure: tried again at `File::retry_at`, or at its next change,
    /// or, refused for room (`File::waits_for_room`), when code is given back.
    BackingOff,
}

/// A file being applied.
#[derive(Debug)]
struct File {
    phase: Phase,
    /// The change this apply is for (how long a swap took is measured from it).
    changed_at: Instant,
    /// The first change since the file was last applied and done with: how long it has been
    /// changing, which bounds how long it is waited for while it is written.
    since: Instant,
    /// A change made while it is applied, if any: it is applied once more after.
    again: Option<Instant>,
    /// Told of every change while it is applied (the load gives up if the file differs).
    changed: Arc<Notify>,
    /// Loads refused in a row for the host's failure, and when the next is due.
    tries: u32,
    retry_at: Option<Instant>,
    /// The last refusal was for room in `sandbox.max_code_mib`: tried again when code is given back.
    waits_for_room: bool,
    /// Code was given back while it loaded: refused for room then, it is tried again at once
    /// (the wake came before it waited for one).
    freed_meanwhile: bool,
}

impl File {
    /// A file changed at `changed_at`, in line.
    fn new(changed_at: Instant) -> Self {
        let changed = Arc::new(Notify::new());
        File {
            phase: Phase::InLine,
            changed_at,
            since: changed_at,
            again: None,
            changed,
            tries: 0,
            retry_at: None,
            waits_for_room: false,
            freed_meanwhile: false,
        }
    }
}

/// What applies one file: the [`Reloader`] (a stand-in in the tests).
pub(super) trait ApplyFile: Send + Sync + 'static {
    /// As [`Reloader::apply`].
    fn apply(
        &self,
        path: &Path,
        changed_at: Instant,
        since: Instant,
        superseded: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = Applied> + Send;
}

impl ApplyFile for Reloader {
    fn apply(
        &self,
        path: &Path,
        changed_at: Instant,
        since: Instant,
        superseded: impl Future<Output = ()> + Send,
    ) -> impl Future<Output = Applied> + Send {
        Reloader::apply(self, path, changed_at, since, superseded)
    }
}

/// The scheduler the reload task drives: [`Applying::start`] on every change, [`Applying::ended`]
/// on every task's end (from [`Applying::tasks`]), [`Applying::retry_due`] at
/// [`Applying::next_retry`].
pub(super) struct Applying<A: ApplyFile = Reloader> {
    reloader: Arc<A>,
    /// Each ends with its file and how its apply went (a panic reads as done).
    pub(super) tasks: JoinSet<(PathBuf, Applied)>,
    files: HashMap<PathBuf, File>,
    /// Files in line for a load's place, each once (a file taken out of line keeps its entry
    /// here until it comes up, and is skipped then; back in line meanwhile, it keeps it).
    line: VecDeque<PathBuf>,
    /// The paths in `line`.
    lined: HashSet<PathBuf>,
    retries: BinaryHeap<Reverse<(Instant, PathBuf)>>,
    /// Files refused for room, backing off (a path that changed since is dropped at the next
    /// [`Applying::room_freed`]).
    room_waiters: HashSet<PathBuf>,
    loading: usize,
    at_once: usize,
}

impl Applying<Reloader> {
    pub(super) fn new(reloader: Arc<Reloader>) -> Self {
        let at_once = loader::loads_at_once(reloader.sandbox.settings());
        Self::with_places(reloader, at_once)
    }
}

impl<A: ApplyFile> Applying<A> {
    fn with_places(reloader: Arc<A>, at_once: usize) -> Self {
        let (tasks, files, line, lined, retries, room_waiters) = Default::default();
        Self { reloader, tasks, files, line, lined, retries, room_waiters, loading: 0, at_once: at_once.max(1) }
    }

    /// `path` changed at `changed_at`: applies it, now or once the apply under way ends.
    pub(super) fn start(&mut self, path: PathBuf, changed_at: Instant) {
        let Some(file) = self.files.get_mut(&path) else {
            self.files.insert(path.clone(), File::new(changed_at));
            return self.schedule(path);
        };
        match file.phase {
            // It reads the file as it is when it runs. A removal does not wait in line.
            Phase::InLine | Phase::Retrying => {
                if is_gone(&path) {
                    file.changed_at = changed_at;
                    self.schedule(path);
                }
            }
            // Changed (or looked at again): tried at once, not at its pause's end.
            Phase::BackingOff => {
                file.changed_at = changed_at;
                file.since = changed_at;
                file.retry_at = None;
                file.tries = 0;
                self.schedule(path);
            }
            Phase::Loading | Phase::Removing => {
                file.again.get_or_insert(changed_at);
                file.changed.notify_one();
            }
        }
    }

    /// `path` was refused at the host's start for the host's failure: it is tried again as
    /// after [`Applied::TryAgain`], or [`Applied::NoRoom`] when `waits_for_room`.
    pub(super) fn try_again_later(&mut self, path: PathBuf, waits_for_room: bool) {
        self.files.entry(path.clone()).or_insert_with(|| File::new(Instant::now()));
        self.back_off(path, waits_for_room);
    }

    /// Whether code given back matters now: a file refused for room waits for its next try, or
    /// a file is loading (it may be refused for room before it waits).
    pub(super) fn waits_for_room(&self) -> bool {
        !self.room_waiters.is_empty() || self.loading > 0
    }

    /// Code was given back: the files refused for room are tried again now (those that still
    /// find none go on backing off), and those loading are tried again at once if refused so.
    pub(super) fn room_freed(&mut self) {
        for file in self.files.values_mut().filter(|f| matches!(f.phase, Phase::Loading | Phase::Removing)) {
            file.freed_meanwhile = true;
        }
        for path in std::mem::take(&mut self.room_waiters) {
            // (One that changed meanwhile was scheduled already.)
            if self.files.get(&path).is_some_and(|f| f.phase == Phase::BackingOff && f.waits_for_room) {
                self.schedule(path);
            }
        }
    }

    /// Puts `path` (in `files`, in no other place) aside until its next try is due. (For as
    /// long as the host's failure lasts, at most every [`TRY_AGAIN_MOST`]: a compile child that
    /// crashed, which compiling the file may have caused, is not tried again so, review 56d M1.)
    fn back_off(&mut self, path: PathBuf, waits_for_room: bool) {
        let Some(file) = self.files.get_mut(&path) else { return };
        file.waits_for_room = waits_for_room;
        if waits_for_room {
            self.room_waiters.insert(path.clone());
        }
        let at = Instant::now() + try_again_after(file.tries);
        file.tries = file.tries.saturating_add(1);
        file.phase = Phase::BackingOff;
        file.retry_at = Some(at);
        self.retries.push(Reverse((at, path)));
    }

    /// A task ended: its place goes to the next in line, and its file is applied again if it
    /// changed meanwhile, looked at again if it was not settled, or done with.
    pub(super) fn ended(&mut self, path: PathBuf, applied: Applied) {
        let Some(file) = self.files.get_mut(&path) else { return };
        if file.phase == Phase::Loading {
            self.loading -= 1;
        }
        match (file.again.take(), applied) {
            (Some(changed_at), _) => {
                // Behind the files that waited meanwhile.
                file.changed_at = changed_at;
                self.schedule(path);
            }
            (None, Applied::NotSettled) => {
                file.phase = Phase::Retrying;
                self.retries.push(Reverse((Instant::now() + RETRY, path)));
            }
            (None, Applied::TryAgain) => self.back_off(path, false),
            (None, Applied::NoRoom) if std::mem::take(&mut file.freed_meanwhile) => {
                file.waits_for_room = true;
                self.schedule(path);
            }
            (None, Applied::NoRoom) => self.back_off(path, true),
            (None, Applied::Done) => {
                self.files.remove(&path);
            }
        }
        self.fill_places();
    }

    /// When `path`'s next try is due, if it is backing off.
    #[cfg(test)]
    fn retry_at(&self, path: &Path) -> Option<Instant> {
        self.files.get(path).filter(|f| f.phase == Phase::BackingOff).and_then(|f| f.retry_at)
    }

    /// When the next retry is due, if any.
    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.retries.peek().map(|Reverse((at, _))| *at)
    }

    /// Looks again at the files whose retry is due.
    pub(super) fn retry_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse((at, _))) = self.retries.peek()
            && *at <= now
        {
            let Some(Reverse((at, path))) = self.retries.pop() else { break };
            // A removal may have taken it meanwhile, or a change tried it since.
            let due = self.files.get(&path).is_some_and(|f| {
                f.phase == Phase::Retrying || (f.phase == Phase::BackingOff && f.retry_at == Some(at))
            });
            if due {
                self.schedule(path);
            }
        }
    }

    /// Runs `path` (in `files`) now if it is gone; else puts it at the back of the line, and
    /// gives free places to the line (so it runs at once if nobody waits there): a file that
    /// never stops changing does not keep a place for itself.
    fn schedule(&mut self, path: PathBuf) {
        self.run_or_line(path, false);
        self.fill_places();
    }

    fn run_or_line(&mut self, path: PathBuf, may_load_now: bool) {
        let gone = is_gone(&path);
        let file = self.files.get_mut(&path).expect("scheduled a file not being applied");
        if gone {
            file.phase = Phase::Removing;
        } else if may_load_now && self.loading < self.at_once {
            file.phase = Phase::Loading;
            self.loading += 1;
        } else {
            file.phase = Phase::InLine;
            if self.lined.insert(path.clone()) {
                self.line.push_back(path);
            }
            return;
        }
        file.freed_meanwhile = false;
        let (changed_at, since, changed) = (file.changed_at, file.since, file.changed.clone());
        let reloader = self.reloader.clone();
        self.tasks.spawn(async move {
            let read = identity(&path);
            // Given up only if the file is no longer what this load read: a change event for
            // the same file (a rescan, a touch that changed nothing) gives up nothing.
            let superseded = async {
                loop {
                    changed.notified().await;
                    if identity(&path) != read {
                        return;
                    }
                }
            };
            let apply = std::panic::AssertUnwindSafe(reloader.apply(&path, changed_at, since, superseded));
            // A panic is a bug of ours: it is logged, and the file is applied at its next change.
            let applied = futures::FutureExt::catch_unwind(apply).await.unwrap_or_else(|_| {
                tracing::error!(file = %crate::loader::shown(&path), "applying a change to this file panicked");
                Applied::Done
            });
            (path, applied)
        });
    }

    /// Gives free places to the files in line, first come first.
    fn fill_places(&mut self) {
        while self.loading < self.at_once
            && let Some(path) = self.line.pop_front()
        {
            self.lined.remove(&path);
            if self.files.get(&path).is_some_and(|f| f.phase == Phase::InLine) {
                self.run_or_line(path, true);
            }
        }
    }
}

/// What a load reads of a file, to tell whether it is still there as read.
fn identity(path: &Path) -> Option<(u64, u64, u64, Option<SystemTime>)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino(), m.len(), m.modified().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A stand-in that records each apply (`load` or `remove`, as the file is there or not),
    /// holds it until the test lets it end (or it is superseded), and answers `NotSettled` as
    /// often as asked for a file.
    #[derive(Default)]
    struct Recorder {
        applied: Mutex<Vec<(String, &'static str)>>,
        release: Notify,
        not_settled: Mutex<HashMap<String, usize>>,
        /// Files answered `TryAgain` (the host's failure), each as often as asked.
        try_again: Mutex<HashMap<String, usize>>,
        /// Files answered `NoRoom`, each as often as asked.
        no_room: Mutex<HashMap<String, usize>>,
    }

    fn name(path: &Path) -> String {
        path.file_name().unwrap().to_string_lossy().into_owned()
    }

    impl ApplyFile for Recorder {
        fn apply(
            &self,
            path: &Path,
            _changed_at: Instant,
            _since: Instant,
            superseded: impl Future<Output = ()> + Send,
        ) -> impl Future<Output = Applied> + Send {
            let kind = if is_gone(path) { "remove" } else { "load" };
            self.applied.lock().unwrap().push((name(path), kind));
            // One of the answers asked for `path`, if any is left.
            let take_one = |asked: &Mutex<HashMap<String, usize>>| match asked.lock().unwrap().get_mut(&name(path)) {
                Some(left) if *left > 0 => {
                    *left -= 1;
                    true
                }
                _ => false,
            };
            let (not_settled, try_again) = (take_one(&self.not_settled), take_one(&self.try_again));
            let no_room = take_one(&self.no_room);
            async move {
                tokio::select! {
                    () = self.release.notified() => {}
                    () = superseded => return Applied::Done,
                }
                match (not_settled, try_again, no_room) {
                    (true, _, _) => Applied::NotSettled,
                    (_, true, _) => Applied::TryAgain,
                    (_, _, true) => Applied::NoRoom,
                    _ => Applied::Done,
                }
            }
        }
    }

    /// `a.wasm` and `b.wasm` started with one place: `a` loads first and ends as `recorder`
    /// answers it (put aside: not settled, or refused for the host's failure), and `b` takes the
    /// place meanwhile.
    async fn a_aside_and_b_loading(recorder: Recorder) -> (tempfile::TempDir, PathBuf, PathBuf, Applying<Recorder>) {
        let (dir, a, b) = two_files("bytes");
        let mut applying = Applying::with_places(Arc::new(recorder), 1);
        applying.start(a.clone(), Instant::now());
        applying.start(b.clone(), Instant::now());
        settle().await;
        assert_eq!(end_one(&mut applying).await, "a.wasm");
        settle().await;
        assert_eq!(applied(&applying).last().unwrap(), &("b.wasm".into(), "load"), "a is out of line");
        (dir, a, b, applying)
    }

    /// Makes `path`'s next try due now, as if its pause were waited out, and runs what is due.
    fn make_due(applying: &mut Applying<Recorder>, path: &Path) {
        let now = Instant::now();
        applying.files.get_mut(path).unwrap().retry_at = Some(now);
        applying.retries.clear();
        applying.retries.push(Reverse((now, path.to_path_buf())));
        applying.retry_due();
    }

    /// Lets one apply end, and hands its end to the scheduler.
    async fn end_one(applying: &mut Applying<Recorder>) -> String {
        applying.reloader.release.notify_one();
        let (path, applied) = tokio::time::timeout(Duration::from_secs(5), applying.tasks.join_next())
            .await
            .expect("no apply ended")
            .unwrap()
            .unwrap();
        applying.ended(path.clone(), applied);
        name(&path)
    }

    fn applied(applying: &Applying<Recorder>) -> Vec<(String, &'static str)> {
        applying.reloader.applied.lock().unwrap().clone()
    }

    /// `a.wasm` (holding `a`) and `b.wasm` in a folder of their own.
    fn two_files(a: &str) -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (path_a, path_b) = (dir.path().join("a.wasm"), dir.path().join("b.wasm"));
        std::fs::write(&path_a, a).unwrap();
        std::fs::write(&path_b, "b").unwrap();
        (dir, path_a, path_b)
    }

    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn loads_take_places_in_turn_and_a_removal_never_waits_in_line() {
        let dir = tempfile::tempdir().unwrap();
        let at = |n: &str| dir.path().join(n);
        for n in ["a.wasm", "b.wasm", "c.wasm"] {
            std::fs::write(at(n), n).unwrap();
        }
        let mut applying = Applying::with_places(Arc::new(Recorder::default()), 1);
        let now = Instant::now();
        for n in ["a.wasm", "b.wasm", "c.wasm"] {
            applying.start(at(n), now);
        }
        settle().await;
        assert_eq!(applied(&applying), [("a.wasm".into(), "load")], "one place: b and c wait in line");
        // c is removed while in line: removed at once, while a still loads.
        std::fs::remove_file(at("c.wasm")).unwrap();
        applying.start(at("c.wasm"), now);
        settle().await;
        assert_eq!(applied(&applying)[1], ("c.wasm".into(), "remove"));
        // Ends come in any order; each load's end gives its place to the next in line, once.
        let mut ended = vec![end_one(&mut applying).await];
        settle().await;
        ended.push(end_one(&mut applying).await);
        settle().await;
        ended.push(end_one(&mut applying).await);
        ended.sort();
        assert_eq!(ended, ["a.wasm", "b.wasm", "c.wasm"]);
        let loads: Vec<_> = applied(&applying).into_iter().filter(|(_, k)| *k == "load").map(|(n, _)| n).collect();
        assert_eq!(loads, ["a.wasm", "b.wasm"], "c, removed in line, was never loaded");
        assert!(applying.files.is_empty() && applying.loading == 0 && applying.tasks.is_empty());
    }

    #[tokio::test]
    async fn a_load_is_given_up_when_its_file_changes_and_not_when_it_is_only_looked_at() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.wasm");
        std::fs::write(&a, "first").unwrap();
        let mut applying = Applying::with_places(Arc::new(Recorder::default()), 2);
        applying.start(a.clone(), Instant::now());
        settle().await;
        // Looked at again (a rescan), unchanged: the load goes on, and runs once more after.
        applying.start(a.clone(), Instant::now());
        settle().await;
        assert!(applying.tasks.try_join_next().is_none(), "an unchanged file's load was given up");
        // Changed: the load under way is given up, and the file loaded again, once.
        std::fs::write(&a, "second, longer").unwrap();
        applying.start(a.clone(), Instant::now());
        applying.start(a.clone(), Instant::now());
        let (path, how) = tokio::time::timeout(Duration::from_secs(5), applying.tasks.join_next())
            .await
            .expect("the load was not given up")
            .unwrap()
            .unwrap();
        assert_eq!(how, Applied::Done);
        applying.ended(path, how);
        settle().await;
        assert_eq!(applied(&applying), [("a.wasm".into(), "load"), ("a.wasm".into(), "load")]);
        assert_eq!(end_one(&mut applying).await, "a.wasm");
        assert!(applying.files.is_empty(), "done with after the last change");
    }

    #[tokio::test]
    async fn a_file_that_keeps_changing_goes_behind_the_files_waiting_for_its_place() {
        let (_dir, a, b) = two_files("a");
        let mut applying = Applying::with_places(Arc::new(Recorder::default()), 1);
        applying.start(a.clone(), Instant::now());
        applying.start(b.clone(), Instant::now());
        for round in 0..3 {
            settle().await; // the load under way has read the file
            std::fs::write(&a, format!("a, changed {round} times and longer")).unwrap();
            applying.start(a.clone(), Instant::now());
            let ended = tokio::time::timeout(Duration::from_secs(5), applying.tasks.join_next()).await;
            let (path, how) = ended.expect("nothing ended").unwrap().unwrap();
            applying.ended(path, how);
            settle().await;
            if applied(&applying).iter().any(|(n, _)| n == "b.wasm") {
                break;
            }
        }
        assert_eq!(
            applied(&applying),
            [("a.wasm".into(), "load"), ("b.wasm".into(), "load")],
            "b waited behind a file that kept changing"
        );
        assert_eq!(applying.line.iter().filter(|p| **p == a).count(), 1, "a is in line once: {:?}", applying.line);
    }

    #[tokio::test]
    async fn a_file_not_settled_is_looked_at_again_without_holding_a_place() {
        let recorder = Recorder::default();
        recorder.not_settled.lock().unwrap().insert("a.wasm".into(), 1);
        let (_dir, _a, _b, mut applying) = a_aside_and_b_loading(recorder).await;
        let retry = applying.next_retry().expect("a retry is due");
        assert!(retry > Instant::now() && retry <= Instant::now() + RETRY);
        tokio::time::sleep_until(retry.into()).await;
        applying.retry_due();
        assert_eq!(applying.next_retry(), None);
        // The place is b's until it ends: a waits in line, then loads.
        settle().await;
        assert_eq!(applied(&applying).len(), 2);
        assert_eq!(end_one(&mut applying).await, "b.wasm");
        settle().await;
        assert_eq!(applied(&applying).last().unwrap(), &("a.wasm".into(), "load"));
        assert_eq!(end_one(&mut applying).await, "a.wasm");
        assert!(applying.files.is_empty());
    }

    /// Review 56a M2: a load refused for the host's failure (a compile child killed from
    /// outside, a machine too busy) was final until the file changed. It is tried again after a
    /// pause that doubles, holding no place meanwhile; a change to it tries at once.
    #[tokio::test]
    async fn a_load_refused_for_the_hosts_failure_is_tried_again_after_a_growing_pause() {
        let recorder = Recorder::default();
        recorder.try_again.lock().unwrap().insert("a.wasm".into(), 3);
        let (_dir, a, _b, mut applying) = a_aside_and_b_loading(recorder).await;
        let first = applying.next_retry().expect("a is tried again") - Instant::now();
        assert!(first > TRY_AGAIN_FIRST - Duration::from_secs(1) && first <= TRY_AGAIN_FIRST, "{first:?}");
        assert_eq!(end_one(&mut applying).await, "b.wasm");
        // Its pause over (here: made due), it loads again, and is refused again: twice the pause.
        make_due(&mut applying, &a);
        settle().await;
        assert_eq!(applied(&applying).last().unwrap(), &("a.wasm".into(), "load"));
        assert_eq!(end_one(&mut applying).await, "a.wasm");
        let second = applying.next_retry().expect("a is tried again") - Instant::now();
        assert!(second > 2 * TRY_AGAIN_FIRST - Duration::from_secs(1), "{second:?}");
        // A change to it tries at once, and the pause it waited is not tried on top; it is a new
        // file, whose pauses start again from the first.
        let loads = applied(&applying).len();
        applying.start(a.clone(), Instant::now());
        settle().await;
        assert_eq!(applied(&applying).len(), loads + 1, "a change tried it at once");
        assert_eq!(end_one(&mut applying).await, "a.wasm");
        let third = applying.retry_at(&a).expect("refused a third time") - Instant::now();
        assert!(third > TRY_AGAIN_FIRST - Duration::from_secs(1) && third <= TRY_AGAIN_FIRST, "{third:?}");
        // Loaded at last: done with.
        make_due(&mut applying, &a);
        settle().await;
        assert_eq!(end_one(&mut applying).await, "a.wasm");
        assert!(applying.files.is_empty() && applying.next_retry().is_none());
        assert_eq!(try_again_after(30), TRY_AGAIN_MOST);
    }

    /// A file refused for room in the code budget is tried again as soon as code is given back,
    /// not after its pause (up to 5 minutes); a file refused for another failure of the host's
    /// waits its pause.
    #[tokio::test]
    async fn a_load_refused_for_room_is_tried_again_when_code_is_given_back() {
        let recorder = Recorder::default();
        recorder.no_room.lock().unwrap().insert("a.wasm".into(), 1);
        recorder.try_again.lock().unwrap().insert("b.wasm".into(), 1);
        let (dir, a, b) = two_files("bytes");
        let mut applying = Applying::with_places(Arc::new(recorder), 2);
        applying.start(a.clone(), Instant::now());
        applying.start(b.clone(), Instant::now());
        settle().await;
        let ended = [end_one(&mut applying).await, end_one(&mut applying).await];
        assert!(ended.contains(&"a.wasm".to_string()) && ended.contains(&"b.wasm".to_string()));
        assert!(applying.waits_for_room());
        let loads = applied(&applying).len();
        applying.room_freed();
        settle().await;
        assert_eq!(applied(&applying)[loads..], [("a.wasm".to_string(), "load")], "only a is tried again, at once");
        assert_eq!(end_one(&mut applying).await, "a.wasm");
        assert!(!applying.waits_for_room(), "b waits its pause, not for room");
        assert!(applying.retry_at(&b).is_some(), "b still waits its pause");
        drop(dir);
    }

    /// Code given back while a file loads, which then finds no room: it is tried again at once
    /// (the wake came before it waited for one; review 57d C1).
    #[tokio::test]
    async fn a_load_refused_for_room_after_code_was_given_back_meanwhile_is_tried_again_at_once() {
        let recorder = Recorder::default();
        recorder.no_room.lock().unwrap().insert("a.wasm".into(), 1);
        let (dir, a, _b) = two_files("bytes");
        let mut applying = Applying::with_places(Arc::new(recorder), 1);
        applying.start(a.clone(), Instant::now());
        settle().await;
        assert!(applying.waits_for_room(), "a loading: a give-back matters");
        applying.room_freed();
        assert_eq!(end_one(&mut applying).await, "a.wasm");
        settle().await;
        assert_eq!(applied(&applying).len(), 2, "a tried again at once");
        assert_eq!(end_one(&mut applying).await, "a.wasm");
        assert!(applying.files.is_empty() && !applying.waits_for_room());
        drop(dir);
    }

    /// A file whose load keeps failing for the host's failure is tried again for as long as it
    /// lasts (a plugin that served is not dropped for good after an outage of the host's), the
    /// pauses growing to [`TRY_AGAIN_MOST`] and no further.
    #[tokio::test]
    async fn a_load_refused_for_the_hosts_failure_is_tried_again_at_most_every_5_minutes() {
        let (_dir, a, _b) = two_files("bytes");
        let recorder = Recorder::default();
        recorder.try_again.lock().unwrap().insert("a.wasm".into(), usize::MAX);
        let mut applying = Applying::with_places(Arc::new(recorder), 1);
        applying.start(a.clone(), Instant::now());
        settle().await;
        assert_eq!(end_one(&mut applying).await, "a.wasm");
        for _ in 0..12 {
            let pause = applying.retry_at(&a).expect("tried again") - Instant::now();
            assert!(pause <= TRY_AGAIN_MOST, "{pause:?}");
            make_due(&mut applying, &a);
            settle().await;
            assert_eq!(end_one(&mut applying).await, "a.wasm");
        }
        let pause = applying.retry_at(&a).expect("still tried again") - Instant::now();
        assert!(pause > TRY_AGAIN_MOST - Duration::from_secs(1), "{pause:?}");
        assert_eq!(applied(&applying).len(), 13);
    }
}
