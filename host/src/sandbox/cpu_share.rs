//! Each plugin's share of the CPUs: a plugin running many long attempts does not take the
//! CPUs from the others (review 57a M1).
//!
//! Every epoch tick a running guest yields to the async runtime, which runs its ready tasks
//! round robin: a plugin with 16 attempts spinning got 16 times the CPU of a plugin with one,
//! and every other task (an ingress request, a NATS message, a log commit's answer) waited
//! behind all of them. Now, from its first epoch tick on, an attempt runs guest code only while
//! it holds a *turn* of its plugin (asked for in `cpu_wait::Running` before each run). There are
//! as many turns as the runtime has workers. A plugin may always hold its quota: the workers
//! divided among the plugins that want turns now (rounded up), so one plugin alone has every
//! worker and two plugins half each; beyond its quota it takes a turn only while one is free.
//! An attempt without a turn waits in its plugin's line, first come first served, until one is
//! given back: at the attempt's end, when it waits in a host call (it needs no CPU then; it asks
//! again before it runs on), at a tick while its plugin's own attempts wait (so they take the
//! plugin's turns a slice each, round robin), or at a tick when its plugin holds more than its
//! quota while the workers are oversubscribed or another plugin waits. Meanwhile the attempt is not counted runnable.
//! Its deadline does not count the wait when the attempt would have run at once were its plugin
//! alone (its place among its plugin's attempts wanting the CPU within the workers), and counts
//! all of it otherwise: alone, a plugin stretches no deadline by running more attempts. While
//! any attempt waits in a line, or another plugin holds turns, every attempt takes a turn before
//! it runs guest code, its first slice too: attempts that each end within a slice would
//! otherwise never ask.
//!
//! One place decides who holds a turn: [`CpuShares`], under one lock taken when an attempt
//! asks, when a turn is given back and, while the workers are contended, at ticks.

use crate::metrics::PluginLabels;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// The host's turns: how many workers there are to share, and which plugins want them now.
#[derive(Debug)]
pub struct CpuShares {
    workers: u32,
    turns: Mutex<Turns>,
    /// Whether an attempt waits in some plugin's line: then every attempt takes a turn before
    /// it runs guest code, its first slice too (review 58a M1: attempts that each end within
    /// one slice never asked).
    contended: AtomicBool,
    /// Whether more turns are held than there are workers (a plugin took its quota while
    /// another held spare turns): then a holder over its quota gives its turn back at a tick.
    oversubscribed: AtomicBool,
    /// How many plugins hold a turn or wait for one (`Turns::lines`).
    lines: AtomicUsize,
    next_plugin: AtomicU64,
    waits: Family<PluginLabels, Counter>,
    /// Each live plugin's share, by name: every loaded version of a plugin takes the one share
    /// (review 62d F4: a share a version, so a plugin reloading itself took a quota for each).
    by_name: super::live_by_name::LiveByName<PluginShare>,
}

/// The turns held, and each plugin's line.
#[derive(Debug, Default)]
struct Turns {
    lines: HashMap<u64, Line>,
    held: u32,
}

/// One plugin's turns held and its attempts waiting for one, oldest first.
#[derive(Debug)]
struct Line {
    holding: u32,
    waiting: VecDeque<oneshot::Sender<Turn>>,
    /// Its plugin's [`PluginShare::has_line`], true while this line is kept.
    kept: Arc<AtomicBool>,
}

impl Line {
    fn wants(&self) -> bool {
        self.holding > 0 || !self.waiting.is_empty()
    }
}

/// Keeps the lines that hold or wait, marking those let go.
fn keep_wanting(lines: &mut HashMap<u64, Line>) {
    lines.retain(|_, line| {
        let wants = line.wants();
        if !wants {
            line.kept.store(false, Relaxed);
        }
        wants
    });
}

impl CpuShares {
    /// Turns for `workers` workers (the async runtime's; at least 1).
    pub fn new(workers: usize) -> Arc<Self> {
        Arc::new(Self {
            workers: u32::try_from(workers.max(1)).unwrap_or(u32::MAX),
            turns: Mutex::default(),
            contended: AtomicBool::new(false),
            oversubscribed: AtomicBool::new(false),
            lines: AtomicUsize::new(0),
            next_plugin: AtomicU64::new(0),
            waits: Family::default(),
            by_name: Default::default(),
        })
    }

    /// Turns for the current async runtime's workers (1 outside one).
    pub fn for_this_runtime() -> Arc<Self> {
        Self::new(tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers()))
    }

    /// A new plugin version's share (`name` in the metrics).
    pub fn plugin(self: &Arc<Self>, name: &str) -> Arc<PluginShare> {
        self.by_name.get_or_make(name, || self.separate(name))
    }

    /// A share of its own for `name`, beside the plugin's ([`PluginShare::another`]).
    fn separate(self: &Arc<Self>, name: &str) -> Arc<PluginShare> {
        self.share(name, self.waits.get_or_create(&PluginLabels { plugin: name.to_string() }).clone())
    }

    /// A share for reading a file's manifest at load (its waits in no metric: it has no name yet).
    pub fn loading(self: &Arc<Self>) -> Arc<PluginShare> {
        self.share("(loading)", Counter::default())
    }

    fn share(self: &Arc<Self>, name: &str, waits: Counter) -> Arc<PluginShare> {
        Arc::new(PluginShare {
            id: self.next_plugin.fetch_add(1, Relaxed),
            name: name.into(),
            shares: self.clone(),
            waits,
            runnable: Arc::default(),
            has_line: Arc::default(),
        })
    }

    /// How many plugins want turns now (hold one or wait for one; a debug run's share apart).
    pub fn wanting(&self) -> usize {
        self.turns.lock().expect("poisoned").lines.len()
    }

    /// Registers `cpu_turn_waits`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "cpu_turn_waits",
            "Times an attempt waited for a turn of its plugin's share of the CPUs (the plugin held its quota while other plugins wanted theirs, or every worker's turn was held)",
            self.waits.clone(),
        );
    }

    /// The turns a plugin may always hold while `wanting` plugins want them: every worker
    /// shared out, rounded up.
    fn quota(&self, wanting: usize) -> u32 {
        self.workers.div_ceil(u32::try_from(wanting.max(1)).unwrap_or(u32::MAX))
    }

    /// Gives turns to the first attempts in line: to every plugin under its quota, then, while a
    /// worker's turn is free, to any; lets go of the lines that neither hold nor wait (which
    /// raises the others' quota). Called with the lock held.
    fn hand_out(self: &Arc<Self>, turns: &mut Turns) {
        loop {
            keep_wanting(&mut turns.lines);
            let quota = self.quota(turns.lines.len());
            let Turns { lines, held } = turns;
            let mut emptied = false;
            for spare in [false, true] {
                for (&plugin, line) in lines.iter_mut() {
                    loop {
                        let room = if spare { *held < self.workers } else { line.holding < quota };
                        if !room {
                            break;
                        }
                        let Some(next) = line.waiting.pop_front() else { break };
                        match next.send(Turn::new(self, plugin)) {
                            Ok(()) => {
                                line.holding += 1;
                                *held += 1;
                            }
                            // that attempt is gone (its deadline passed as it waited): the next one
                            Err(turn) => turn.forget(),
                        }
                    }
                    emptied |= !line.wants();
                }
            }
            // A line whose every waiter was gone leaves: the others' quota may rise.
            if !emptied {
                self.settle(turns);
                return;
            }
        }
    }

    /// Keeps the flags read without the lock true to `turns`.
    fn settle(&self, turns: &Turns) {
        self.contended.store(turns.lines.values().any(|line| !line.waiting.is_empty()), Relaxed);
        self.oversubscribed.store(turns.held > self.workers, Relaxed);
        self.lines.store(turns.lines.len(), Relaxed);
    }

    fn give_back(self: &Arc<Self>, plugin: u64) {
        let mut turns = self.turns.lock().expect("poisoned");
        if let Some(line) = turns.lines.get_mut(&plugin) {
            line.holding = line.holding.saturating_sub(1);
            turns.held = turns.held.saturating_sub(1);
        }
        self.hand_out(&mut turns);
    }
}

/// What an attempt waits on for its turn (`None`: never, the host's turns are gone).
pub type TurnWait = Pin<Box<dyn Future<Output = Option<Turn>> + Send>>;

/// One plugin version's share: what its attempts ask for a turn with.
#[derive(Debug)]
pub struct PluginShare {
    id: u64,
    name: Arc<str>,
    shares: Arc<CpuShares>,
    waits: Counter,
    /// Its attempts running guest code or ready to (`cpu_wait::Runnable`'s own count), shared
    /// by the versions that share it.
    runnable: Arc<AtomicU32>,
    /// Whether its line is kept now (it holds a turn or waits for one).
    has_line: Arc<AtomicBool>,
}

impl PluginShare {
    /// The count of its attempts running guest code or ready to (`cpu_wait::Runnable::sharing`).
    pub fn runnable(&self) -> Arc<AtomicU32> {
        self.runnable.clone()
    }

    /// Another share of the same host's turns (a debug run of the same version).
    pub fn another(&self) -> Arc<PluginShare> {
        self.shares.separate(&self.name)
    }

    /// At an epoch tick of the attempt keeping its turn in `slot`: from now on it runs guest
    /// code only with a turn. Its turn is given back (`true`; the attempt asks again before it
    /// runs on, at the back of its line) when its plugin's own attempts wait in line (so they
    /// take turns a slice each, round robin, as before there were shares: review 58c H1), or
    /// when its plugin holds more than its quota while the workers are oversubscribed or another
    /// plugin waits.
    pub fn at_tick(&self, slot: &TurnSlot) -> bool {
        slot.ticked.store(true, Relaxed);
        let shares = &self.shares;
        let (contended, oversubscribed) = (shares.contended.load(Relaxed), shares.oversubscribed.load(Relaxed));
        // Otherwise nobody waits for the turn: no lock.
        if !slot.holds() || !(contended || oversubscribed) {
            return false;
        }
        let mut turns = shares.turns.lock().expect("poisoned");
        let quota = shares.quota(turns.lines.len());
        let over_workers = turns.held > shares.workers;
        let Turns { lines, held } = &mut *turns;
        let gives_back =
            |line: &Line| !line.waiting.is_empty() || (line.holding > quota && (over_workers || contended));
        let Some(line) = lines.get_mut(&self.id).filter(|line| gives_back(line)) else { return false };
        // Taken out under the lock, so never dropped here: its count is settled by hand.
        let Some(turn) = slot.take() else { return false };
        turn.forget();
        line.holding -= 1;
        *held = held.saturating_sub(1);
        shares.hand_out(&mut turns);
        true
    }

    /// Whether its attempts ask for a turn before their first slice too: while an attempt waits
    /// in some plugin's line, or another plugin holds turns (review 58b H2: attempts that each
    /// end within one slice never asked, and shared the CPUs round robin with that plugin's
    /// long attempt, however many they were).
    pub fn contended(&self) -> bool {
        let shares = &self.shares;
        shares.contended.load(Relaxed) || shares.lines.load(Relaxed) > usize::from(self.has_line.load(Relaxed))
    }

    /// Before the attempt keeping its turn in `slot` runs guest code without a turn when it needs
    /// one ([`TurnSlot::needs_turn`]): `None` when it takes one at once (nobody before it in its
    /// line, and its plugin under its quota or a worker's turn free), else what to wait on for
    /// its turn, and the share of that wait, in 1/1024, that its deadline does not count: all of
    /// it when the attempt would have run at once were its plugin alone (within the workers
    /// among its plugin's attempts wanting the CPU), none otherwise.
    pub fn ask(&self, slot: &TurnSlot) -> Option<(TurnWait, u64)> {
        let shares = &self.shares;
        let mut turns = shares.turns.lock().expect("poisoned");
        let wanting_now = turns.lines.len() + usize::from(!turns.lines.contains_key(&self.id));
        let quota = shares.quota(wanting_now);
        let Turns { lines, held } = &mut *turns;
        let line = lines.entry(self.id).or_insert_with(|| {
            self.has_line.store(true, Relaxed);
            Line { holding: 0, waiting: VecDeque::new(), kept: self.has_line.clone() }
        });
        if line.waiting.is_empty() && (line.holding < quota || *held < shares.workers) {
            line.holding += 1;
            *held += 1;
            shares.settle(&turns);
            slot.keep(Turn::new(shares, self.id));
            return None;
        }
        let (tx, rx) = oneshot::channel();
        line.waiting.push_back(tx);
        let place = u64::try_from(line.waiting.len()).unwrap_or(u64::MAX).saturating_add(u64::from(line.holding));
        let others = if place <= u64::from(shares.workers) { 1024 } else { 0 };
        // (a line whose first waiters are gone may serve this one at once)
        shares.hand_out(&mut turns);
        drop(turns);
        self.waits.inc();
        Some((Box::pin(async move { rx.await.ok() }), others))
    }
}

/// A turn of a plugin's share, given back when dropped.
#[derive(Debug)]
pub struct Turn {
    shares: Arc<CpuShares>,
    plugin: u64,
    /// Whether dropping it gives the turn back.
    armed: bool,
}

impl Turn {
    fn new(shares: &Arc<CpuShares>, plugin: u64) -> Self {
        Self { shares: shares.clone(), plugin, armed: true }
    }

    /// Lets go of it without giving the turn back (the caller settles its line's count).
    fn forget(mut self) {
        self.armed = false;
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        if self.armed {
            self.shares.give_back(self.plugin);
        }
    }
}

/// Where an attempt keeps its turn (one per store).
#[derive(Debug, Default)]
pub struct TurnSlot {
    turn: Mutex<Option<Turn>>,
    /// Whether `turn` is `Some`: read at every poll of an attempt without the lock.
    holds: AtomicBool,
    /// Whether the attempt has seen an epoch tick: from then on it runs only with a turn.
    ticked: AtomicBool,
}

impl TurnSlot {
    /// Keeps `turn`, the attempt's one (it holds none: it asked for this one).
    pub fn keep(&self, turn: Turn) {
        let old = self.turn.lock().expect("poisoned").replace(turn);
        self.holds.store(true, Relaxed);
        // Never: an attempt asks only while it holds no turn, and waits for one answer at a time.
        // (Not dropped here: the caller may hold the lock a give-back takes.)
        if let Some(old) = old {
            old.forget();
        }
    }

    fn take(&self) -> Option<Turn> {
        self.holds.store(false, Relaxed);
        self.turn.lock().expect("poisoned").take()
    }

    /// Whether it holds a turn.
    pub fn holds(&self) -> bool {
        self.holds.load(Relaxed)
    }

    /// Whether the attempt must have a turn before it runs guest code again: holding none, past
    /// its first tick or while its plugin's share is `contended` ([`PluginShare::contended`],
    /// read only when the rest does not say).
    pub fn needs_turn(&self, contended: impl FnOnce() -> bool) -> bool {
        !self.holds() && (self.ticked.load(Relaxed) || contended())
    }

    /// Gives its turn back, if it holds one (the attempt ended, or waits in a host call).
    pub fn give_back(&self) {
        if self.holds() {
            drop(self.take());
        }
    }

    /// For the next attempt of a warm store: no turn, no tick seen.
    pub fn reset(&self) {
        self.give_back();
        self.ticked.store(false, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;

    impl PluginShare {
        /// The turns this plugin version holds now.
        fn held(&self) -> u32 {
            self.shares.turns.lock().unwrap().lines.get(&self.id).map_or(0, |line| line.holding)
        }
    }

    impl CpuShares {
        fn idle(&self) -> bool {
            let turns = self.turns.lock().unwrap();
            turns.lines.is_empty() && turns.held == 0
        }
    }

    fn attempts(n: usize) -> Vec<TurnSlot> {
        (0..n).map(|_| TurnSlot::default()).collect()
    }

    /// Each of `slots` has seen its first tick (the share ticking them holds no turn of theirs).
    fn ticked<'a>(share: &PluginShare, slots: impl IntoIterator<Item = &'a TurnSlot>) {
        for slot in slots {
            share.at_tick(slot);
        }
    }

    /// Every turn `slots` hold, given back.
    fn all_given_back<'a>(slots: impl IntoIterator<Item = &'a TurnSlot>) {
        for slot in slots {
            slot.give_back();
        }
    }

    /// Waits on `wait` now: the turn it brings is kept in `slot`.
    fn served(wait: &mut TurnWait, slot: &TurnSlot) -> bool {
        match wait.now_or_never() {
            Some(turn) => {
                slot.keep(turn.expect("a turn"));
                true
            }
            None => false,
        }
    }

    /// Review 62d F4: each loaded version of a plugin took a share of its own, so a plugin
    /// reloading itself (two builds swapped in turn) held a quota for every version still
    /// running attempts. Its versions share one; a debug run's is apart; a gone plugin's goes.
    #[test]
    fn every_version_of_a_plugin_takes_its_one_share() {
        let shares = CpuShares::new(2);
        let (v1, v2) = (shares.plugin("p"), shares.plugin("p"));
        assert!(Arc::ptr_eq(&v1, &v2));
        assert!(Arc::ptr_eq(&v1.runnable(), &v2.runnable()), "one count of runnable attempts");
        let (a, b) = (attempts(1), attempts(1));
        ticked(&v1, &a);
        ticked(&v2, &b);
        assert!(v1.ask(&a[0]).is_none() && v2.ask(&b[0]).is_none());
        assert_eq!(shares.wanting(), 1, "two versions of one plugin are one plugin wanting turns");
        let debug = v1.another();
        assert!(!Arc::ptr_eq(&debug, &v1) && !Arc::ptr_eq(&debug.runnable(), &v1.runnable()));
        all_given_back(a.iter().chain(&b));
        let id = v1.id;
        drop((v1, v2, debug));
        assert_ne!(shares.plugin("p").id, id, "a plugin gone and loaded again starts afresh");
    }

    #[test]
    fn a_plugin_alone_holds_every_worker_and_its_other_attempts_wait_in_line() {
        let shares = CpuShares::new(2);
        let spinner = shares.plugin("spinner");
        let a = attempts(3);
        assert!(!a[0].needs_turn(|| false), "before its first tick an attempt needs none");
        for slot in &a {
            assert!(!spinner.at_tick(slot));
            assert!(slot.needs_turn(|| false));
        }
        assert!(spinner.ask(&a[0]).is_none() && spinner.ask(&a[1]).is_none());
        let (mut third, credit) = spinner.ask(&a[2]).expect("both workers' turns are held");
        assert_eq!(credit, 0, "alone it would wait as long: behind its own attempts");
        assert!(!served(&mut third, &a[2]), "it waits");
        assert!(spinner.at_tick(&a[0]), "its own attempts wait: at a tick it gives its turn back, round robin");
        assert!(served(&mut third, &a[2]), "the turn given back is the next in line's");
        assert!(!a[2].needs_turn(|| false));
        let mut first_again = spinner.ask(&a[0]).expect("at the back of the line").0;
        assert_eq!(spinner.held(), 2);
        a[1].give_back();
        assert!(a[1].needs_turn(|| false), "given back (a host call): it asks again before it runs on");
        assert!(served(&mut first_again, &a[0]));
        a[0].give_back();
        a[2].reset();
        assert!(!a[2].needs_turn(|| false), "a warm store's next attempt starts afresh");
        assert!(shares.idle(), "nothing held, nothing kept");
    }

    #[test]
    fn a_second_plugin_takes_its_half_at_once_and_the_first_gives_back_what_is_over() {
        let shares = CpuShares::new(2);
        let (spinner, light) = (shares.plugin("spinner"), shares.plugin("light"));
        let (s, l) = (attempts(4), attempts(2));
        ticked(&spinner, s.iter().chain(&l));
        assert!(spinner.ask(&s[0]).is_none() && spinner.ask(&s[1]).is_none());
        let mut waiting: Vec<TurnWait> = s[2..].iter().map(|a| spinner.ask(a).expect("every turn held").0).collect();
        assert!(light.ask(&l[0]).is_none(), "under its quota of 1, though the spinner holds both turns");
        assert_eq!(spinner.held(), 2, "until its next tick");
        assert!(spinner.at_tick(&s[0]), "over its quota of 1, the workers oversubscribed: it gives its turn back");
        let (mut over, credit) = spinner.ask(&s[0]).expect("and asks again at the back of the line");
        assert_eq!(credit, 0, "4th of its plugin's attempts on 2 workers: it would wait alone too");
        assert_eq!(spinner.held(), 1);
        // within its quota, its turn goes round its own line a slice each
        assert!(spinner.at_tick(&s[1]), "its own attempts wait: round robin");
        assert!(served(&mut waiting[0], &s[2]), "first come, first served");
        let mut again = spinner.ask(&s[1]).expect("at the back of its line").0;
        let (mut light_next, credit) = light.ask(&l[1]).expect("the light plugin is held to its quota too");
        assert_eq!(credit, 1024, "alone it would have run at once: none of its wait counts");
        l[0].give_back();
        assert!(served(&mut light_next, &l[1]), "its own next in line takes it");
        assert!(!served(&mut waiting[1], &s[3]), "not the spinner, at its quota with every turn held");
        // the light plugin done: the spinner alone again, its next in line goes on
        l[1].give_back();
        assert!(served(&mut waiting[1], &s[3]));
        assert!(!served(&mut over, &s[0]) && !served(&mut again, &s[1]), "behind those before them");
        assert_eq!((spinner.held(), light.held()), (2, 0));
        drop(waiting);
        drop(over);
        drop(again);
        all_given_back(s.iter().chain(&l));
        assert!(shares.idle(), "nothing held, nothing kept: {:?}", shares.turns);
        // a turn forgotten (given back by hand at a tick) kept its hold on the host's turns
        assert_eq!(Arc::strong_count(&shares), 3, "the host's turns, and each plugin's share");
    }

    /// No worker idles while a plugin waits: beyond its quota a plugin takes a turn while one is
    /// free, and gives it back at a tick once another plugin takes its quota (review 58b M1).
    #[test]
    fn a_free_turn_goes_to_a_plugin_over_its_quota_until_another_wants_it() {
        let shares = CpuShares::new(4);
        let (busy, light) = (shares.plugin("busy"), shares.plugin("light"));
        let (b, l) = (attempts(4), attempts(2));
        ticked(&busy, b.iter().chain(&l));
        assert!(light.ask(&l[0]).is_none());
        assert!(busy.ask(&b[0]).is_none() && busy.ask(&b[1]).is_none(), "its quota of 2");
        assert!(busy.ask(&b[2]).is_none(), "a third: the fourth worker's turn was free");
        let mut fourth = busy.ask(&b[3]).expect("every worker's turn held").0;
        assert!(light.ask(&l[1]).is_none(), "the light plugin's second is within its quota of 2");
        assert!(busy.at_tick(&b[0]), "5 turns on 4 workers: the busy plugin gives back what is over its quota");
        assert_eq!((busy.held(), light.held()), (2, 2));
        assert!(!served(&mut fourth, &b[3]));
        l[0].give_back();
        assert!(served(&mut fourth, &b[3]), "a free turn, to the one waiting");
        all_given_back(b.iter().chain(&l));
        assert!(shares.idle());
    }

    #[test]
    fn an_attempt_gone_while_it_waited_keeps_no_turn() {
        let shares = CpuShares::new(1);
        let plugin = shares.plugin("p");
        let a = attempts(3);
        assert!(plugin.ask(&a[0]).is_none());
        let gone = plugin.ask(&a[1]).expect("waits").0;
        let mut next = plugin.ask(&a[2]).expect("waits").0;
        drop(gone); // its deadline passed
        a[0].give_back();
        assert!(served(&mut next, &a[2]), "the one after it got the turn");
        // a turn sent to an attempt that then went, unread, is given back with it
        let mut after = plugin.ask(&a[0]).expect("waits").0;
        let unread = plugin.ask(&a[1]).expect("waits").0;
        a[2].give_back();
        assert!(served(&mut after, &a[0]));
        a[0].give_back();
        drop(unread);
        assert!(shares.idle(), "{:?}", shares.turns);
    }
}
