//! Each plugin's share of the CPUs: a plugin running many long attempts does not take the
//! CPUs from the others (review 57a M1).
//!
//! Every epoch tick a running guest yields to the async runtime, which runs its ready tasks
//! round robin: a plugin with 16 attempts spinning got 16 times the CPU of a plugin with one,
//! and every other task (an ingress request, a NATS message, a log commit's answer) waited
//! behind all of them. Now, from its first epoch tick on, an attempt runs guest code only while
//! it holds a *turn* of its plugin. A plugin holds at most its quota of turns at once: the
//! runtime's workers divided among the plugins that want turns now (rounded up), so one plugin
//! alone still has every worker, and two plugins half each. An attempt without a turn waits in
//! its plugin's line, first come first served, until one of its plugin's turns is given back:
//! at the attempt's end, when it waits in a host call (it needs no CPU then; it asks again
//! before it runs on), or at a tick when its plugin is over a quota that fell. Meanwhile the
//! attempt is not counted runnable, and its deadline counts the wait but for the share other
//! plugins cause (the turns its plugin would hold alone beyond its quota; alone, a plugin
//! stretches no deadline by running more attempts). While any attempt waits in a line, every
//! attempt takes a turn before it runs guest code, its first slice too: attempts that each end
//! within a slice would otherwise never ask.
//!
//! One place decides who holds a turn: [`CpuShares`], under one lock taken only at ticks, when
//! an attempt past its first tick asks, and when a turn is given back.

use crate::metrics::PluginLabels;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

/// The host's turns: how many workers there are to share, and which plugins want more than a
/// slice now.
#[derive(Debug)]
pub struct CpuShares {
    workers: u32,
    wanting: Mutex<HashMap<u64, Line>>,
    /// Whether an attempt waits in some plugin's line: then every attempt takes a turn before
    /// it runs guest code, its first slice too (review 58a M1: attempts that each end within
    /// one slice never asked).
    contended: AtomicBool,
    next_plugin: AtomicU64,
    waits: Family<PluginLabels, Counter>,
}

/// One plugin's turns held and its attempts waiting for one, oldest first.
#[derive(Debug, Default)]
struct Line {
    holding: u32,
    waiting: VecDeque<oneshot::Sender<Turn>>,
}

impl Line {
    fn wants(&self) -> bool {
        self.holding > 0 || !self.waiting.is_empty()
    }
}

impl CpuShares {
    /// Turns for `workers` workers (the async runtime's; at least 1).
    pub fn new(workers: usize) -> Arc<Self> {
        Arc::new(Self {
            workers: u32::try_from(workers.max(1)).unwrap_or(u32::MAX),
            wanting: Mutex::default(),
            contended: AtomicBool::new(false),
            next_plugin: AtomicU64::new(0),
            waits: Family::default(),
        })
    }

    /// Turns for the current async runtime's workers (1 outside one).
    pub fn for_this_runtime() -> Arc<Self> {
        Self::new(tokio::runtime::Handle::try_current().map_or(1, |h| h.metrics().num_workers()))
    }

    /// A new plugin version's share (`name` in the metrics).
    pub fn plugin(self: &Arc<Self>, name: &str) -> Arc<PluginShare> {
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
        })
    }

    /// How many plugin versions want more than a slice now (hold a turn or wait for one).
    pub fn wanting(&self) -> usize {
        self.wanting.lock().expect("poisoned").len()
    }

    /// Registers `cpu_turn_waits`.
    pub fn register_metrics(&self, registry: &mut prometheus_client::registry::Registry) {
        registry.register(
            "cpu_turn_waits",
            "Times an attempt running past its first slice waited for a turn of its plugin's share of the CPUs (the plugin's other attempts held them)",
            self.waits.clone(),
        );
    }

    /// The most turns a plugin may hold while `wanting` plugins want them: every worker shared
    /// out, rounded up (so no worker idles while a plugin waits).
    fn quota(&self, wanting: usize) -> u32 {
        self.workers.div_ceil(u32::try_from(wanting.max(1)).unwrap_or(u32::MAX))
    }

    /// Gives turns to the first attempts in line while their plugins are under quota, and lets
    /// go of the lines that neither hold nor wait (which raises the others' quota). Called with
    /// the lock held.
    fn hand_out(self: &Arc<Self>, wanting: &mut HashMap<u64, Line>) {
        loop {
            wanting.retain(|_, line| line.wants());
            let quota = self.quota(wanting.len());
            let mut emptied = false;
            for (&plugin, line) in wanting.iter_mut() {
                while line.holding < quota {
                    let Some(next) = line.waiting.pop_front() else { break };
                    line.holding += 1;
                    if let Err(turn) = next.send(Turn::new(self, plugin)) {
                        // that attempt is gone (its deadline passed as it waited): the next one
                        turn.forget();
                        line.holding -= 1;
                    }
                }
                emptied |= !line.wants();
            }
            // A line whose every waiter was gone leaves: the others' quota may rise.
            if !emptied {
                self.contended.store(wanting.values().any(|line| !line.waiting.is_empty()), Relaxed);
                return;
            }
        }
    }

    fn give_back(self: &Arc<Self>, plugin: u64) {
        let mut wanting = self.wanting.lock().expect("poisoned");
        if let Some(line) = wanting.get_mut(&plugin) {
            line.holding = line.holding.saturating_sub(1);
        }
        self.hand_out(&mut wanting);
    }
}

/// What an attempt waits on for its turn.
pub type TurnWait = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One plugin version's share: what its attempts ask for a turn with.
#[derive(Debug)]
pub struct PluginShare {
    id: u64,
    name: Arc<str>,
    shares: Arc<CpuShares>,
    waits: Counter,
}

impl PluginShare {
    /// Another share of the same host's turns (a debug run of the same version).
    pub fn another(&self) -> Arc<PluginShare> {
        self.shares.plugin(&self.name)
    }

    /// At an epoch tick of the attempt keeping its turn in `slot`: from now on it runs guest
    /// code only with a turn. One held while its plugin is over a quota that fell, while some
    /// attempt waits in a line, is given back (`true`): the attempt asks again before it runs
    /// on, at the back of its line.
    pub fn at_tick(&self, slot: &TurnSlot) -> bool {
        slot.ticked.store(true, Relaxed);
        // With nobody in any line, a turn over quota takes nothing from anyone: no lock.
        if !slot.holds.load(Relaxed) || !self.contended() {
            return false;
        }
        let shares = &self.shares;
        let mut wanting = shares.wanting.lock().expect("poisoned");
        let quota = shares.quota(wanting.len());
        let Some(line) = wanting.get_mut(&self.id).filter(|line| line.holding > quota) else { return false };
        // Taken out under the lock, so never dropped here: its count is settled by hand.
        if let Some(turn) = slot.take() {
            turn.forget();
        }
        line.holding -= 1;
        shares.hand_out(&mut wanting);
        true
    }

    /// Whether an attempt waits in some plugin's line now (then every attempt asks for a turn
    /// before it runs guest code).
    pub fn contended(&self) -> bool {
        self.shares.contended.load(Relaxed)
    }

    /// Before the attempt keeping its turn in `slot` runs guest code without a turn when it needs
    /// one ([`TurnSlot::needs_turn`]): `None` when it takes one at once (its plugin under quota,
    /// nobody before it in line), else what to wait on for its turn (which puts the turn in
    /// `slot`), and the share of that wait, in 1/1024, that other plugins cause: the turns its
    /// plugin would hold alone (the workers, or as many as its attempts want) beyond its quota.
    pub fn ask(&self, slot: &Arc<TurnSlot>) -> Option<(TurnWait, u64)> {
        let shares = &self.shares;
        let mut wanting = shares.wanting.lock().expect("poisoned");
        let wanting_now = wanting.len() + usize::from(!wanting.contains_key(&self.id));
        let quota = shares.quota(wanting_now);
        let line = wanting.entry(self.id).or_default();
        if line.holding < quota && line.waiting.is_empty() {
            line.holding += 1;
            slot.put(Turn::new(shares, self.id));
            return None;
        }
        let (tx, rx) = oneshot::channel();
        line.waiting.push_back(tx);
        let alone =
            shares.workers.min(u32::try_from(line.waiting.len()).unwrap_or(u32::MAX).saturating_add(line.holding));
        let others = u64::from(alone.saturating_sub(quota)) * 1024 / u64::from(alone.max(1));
        // (a line under quota whose first waiters are gone serves this one at once)
        shares.hand_out(&mut wanting);
        drop(wanting);
        self.waits.inc();
        let slot = slot.clone();
        let wait: TurnWait = Box::pin(async move {
            if let Ok(turn) = rx.await {
                slot.put(turn);
            }
        });
        Some((wait, others))
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
    fn put(&self, turn: Turn) {
        let old = self.turn.lock().expect("poisoned").replace(turn);
        self.holds.store(true, Relaxed);
        // Never: a slot is put into only when it holds no turn (taken at each tick and ask).
        debug_assert!(old.is_none(), "an attempt holds one turn at most");
        // (not dropped: the caller may hold the lock a give-back takes)
        std::mem::forget(old);
    }

    fn take(&self) -> Option<Turn> {
        self.holds.store(false, Relaxed);
        self.turn.lock().expect("poisoned").take()
    }

    /// Whether the attempt must have a turn before it runs guest code again: holding none, past
    /// its first tick or while the host is `contended` ([`PluginShare::contended`]).
    pub fn needs_turn(&self, contended: bool) -> bool {
        !self.holds.load(Relaxed) && (contended || self.ticked.load(Relaxed))
    }

    /// Gives its turn back, if it holds one (the attempt ended, or waits in a host call).
    pub fn give_back(&self) {
        if self.holds.load(Relaxed) {
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
            self.shares.wanting.lock().unwrap().get(&self.id).map_or(0, |line| line.holding)
        }
    }

    fn attempts(n: usize) -> Vec<Arc<TurnSlot>> {
        (0..n).map(|_| Arc::default()).collect()
    }

    #[test]
    fn a_plugin_alone_holds_every_worker_and_its_other_attempts_wait_in_line() {
        let shares = CpuShares::new(2);
        let spinner = shares.plugin("spinner");
        let a = attempts(3);
        assert!(!a[0].needs_turn(false), "before its first tick an attempt needs none");
        for slot in &a {
            assert!(!spinner.at_tick(slot));
            assert!(slot.needs_turn(false));
        }
        assert!(spinner.ask(&a[0]).is_none() && spinner.ask(&a[1]).is_none());
        let mut third = spinner.ask(&a[2]).expect("both workers' turns are held").0;
        assert!((&mut third).now_or_never().is_none(), "it waits");
        assert!(!spinner.at_tick(&a[0]), "a holder within quota keeps its turn");
        assert_eq!(spinner.held(), 2);
        a[0].give_back();
        assert!(a[0].needs_turn(false), "given back (a host call): it asks again before it runs on");
        assert!(third.now_or_never().is_some(), "the turn given back is the next in line's");
        assert!(!a[2].needs_turn(false));
        assert_eq!(spinner.held(), 2);
        a[1].give_back();
        a[2].reset();
        assert!(!a[2].needs_turn(false), "a warm store's next attempt starts afresh");
        assert!(shares.wanting.lock().unwrap().is_empty(), "nothing held, nothing kept");
    }

    #[test]
    fn a_second_plugin_takes_its_half_at_once_and_the_first_gives_back_what_is_over() {
        let shares = CpuShares::new(2);
        let (spinner, light) = (shares.plugin("spinner"), shares.plugin("light"));
        let (s, l) = (attempts(4), attempts(2));
        for slot in s.iter().chain(&l) {
            spinner.at_tick(slot);
        }
        assert!(spinner.ask(&s[0]).is_none() && spinner.ask(&s[1]).is_none());
        let (mut waiting, credit): (Vec<TurnWait>, Vec<u64>) =
            s[2..].iter().map(|a| spinner.ask(a).expect("over quota")).unzip();
        assert_eq!(credit, [0, 0], "alone, its wait is behind its own attempts only");
        assert!(light.ask(&l[0]).is_none(), "under its quota of 1, though the spinner holds 2");
        assert_eq!(spinner.held(), 2, "until its next tick");
        assert!(spinner.at_tick(&s[0]), "over the quota of 1: it gives its turn back");
        let (mut over, credit) = spinner.ask(&s[0]).expect("and asks again at the back of the line");
        assert_eq!(credit, 512, "half its wait is the other plugin's doing: alone it would hold 2 turns, now 1");
        assert_eq!(spinner.held(), 1);
        assert!(!spinner.at_tick(&s[1]), "within quota");
        let mut light_next = light.ask(&l[1]).expect("the light plugin is held to its quota too").0;
        l[0].give_back();
        assert!((&mut light_next).now_or_never().is_some(), "its own next in line takes it");
        assert!(waiting[0].as_mut().now_or_never().is_none(), "not the spinner, at its quota");
        // the light plugin done: the spinner alone again, its first in line goes on
        l[1].give_back();
        assert!(waiting.remove(0).now_or_never().is_some(), "first come, first served");
        assert!((&mut over).now_or_never().is_none(), "behind those before it");
        assert_eq!((spinner.held(), light.held()), (2, 0));
        drop(waiting);
        drop(over);
        for slot in s.iter().chain(&l) {
            slot.give_back();
        }
        assert!(shares.wanting.lock().unwrap().is_empty(), "nothing held, nothing kept: {:?}", shares.wanting);
        // a turn forgotten (given back by hand at a tick) kept its hold on the host's turns
        assert_eq!(Arc::strong_count(&shares), 3, "the host's turns, and each plugin's share");
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
        assert!((&mut next).now_or_never().is_some(), "the one after it got the turn");
        // a turn sent to an attempt that then went, unread, is given back with it
        let mut after = plugin.ask(&a[0]).expect("waits").0;
        let unread = plugin.ask(&a[1]).expect("waits").0;
        a[2].give_back();
        assert!((&mut after).now_or_never().is_some());
        a[0].give_back();
        drop(unread);
        assert!(shares.wanting.lock().unwrap().is_empty(), "{:?}", shares.wanting);
    }
}
