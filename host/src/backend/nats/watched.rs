//! What a JetStream pump knows of its consumer as the server has it now: its ack floor and its
//! `max_deliver`, looked at again by a task of the pump's own ([`watch`]) about once a second
//! while the pump has messages out (not yet settled) or had one within the last 10 s, at once when
//! a message comes after a quiet while, and every 5 s otherwise (what the pump's own look before
//! each pull cost an idle plugin before). No pull and no message waits on a look (a server slow to
//! answer info requests would otherwise stall every message, and the messages read late would
//! outlive their `ack_wait`); only a delivery about to give its event back may, below, and a look
//! that fails ends its wait.
//!
//! Every host of a plugin shares its consumer, and a host of another version (another
//! `retry.max_attempts`) or an operator may have set its `max_deliver` lower than this host would
//! ([`super::consumer::ensure`] never lowers it): a message given back at its last delivery is
//! dropped by JetStream unrun. So each delivery carries the shared cell
//! ([`crate::transport::Delivery::max_deliveries`]) and reads it when it decides, not when it was
//! pulled; a delivery about to give its event back after a quiet while (the bound read up to
//! [`IDLE_EVERY`] ago) asks for a look first and waits for it ([`MaxDeliveries::fresh`], review
//! 54b M5).

use super::consumer::SharedSpec;
use crate::transport::MaxDeliveries;
use async_nats::jetstream::consumer::{Info, PullConsumer};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often the consumer is looked at while the pump is busy.
const EVERY: Duration = Duration::from_secs(1);
/// How often the consumer is looked at while the pump is idle.
const IDLE_EVERY: Duration = Duration::from_secs(5);
/// How long a look may take before it is given up (the last values stand).
const LOOK_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after its last message a pump with nothing out is still looked after.
const ACTIVE_FOR: Duration = Duration::from_secs(10);
/// How old a look may be for a delivery to decide by it: past [`EVERY`], plus a look's time, a
/// busy pump's never is.
const FRESH_FOR: Duration = Duration::from_secs(2);
/// The longest a delivery waits for the look it asked for: a look under way when it asks ends
/// (answered, failed or given up at [`LOOK_TIMEOUT`]) within this, and ends the wait.
const ASKED_WAIT: Duration = Duration::from_millis(LOOK_TIMEOUT.as_millis() as u64 + 500);

/// The consumer as last seen.
pub struct Watched {
    /// Its ack floor (stream sequence): where one deleted underneath is made again from.
    settled: AtomicU64,
    /// How many times it delivers a message ([`bound`]), shared with the deliveries.
    max_deliveries: Arc<MaxDeliveries>,
    /// When the pump last got a message.
    active_at: Mutex<Instant>,
    /// The pump's messages not settled yet (their ackers not dropped).
    out: AtomicU64,
    /// Wakes the watcher when a message comes after a quiet while.
    woken: tokio::sync::Notify,
    /// Told the consumer's `ack_wait` at each look ([`super::consumer::Held::saw_ack_wait`]).
    held: Arc<super::consumer::Held>,
}

impl Watched {
    /// What `info` (the consumer as made or opened) says; `fallback` is this host's own bound.
    pub fn new(info: &Info, fallback: u32, held: Arc<super::consumer::Held>) -> Arc<Self> {
        held.saw_ack_wait(&info.name, info.config.ack_wait);
        Arc::new(Self {
            settled: AtomicU64::new(info.ack_floor.stream_sequence),
            max_deliveries: Arc::new(MaxDeliveries::new(
                bound(info.config.max_deliver, fallback),
                FRESH_FOR,
                ASKED_WAIT,
            )),
            active_at: Mutex::new(Instant::now()),
            out: AtomicU64::new(0),
            woken: tokio::sync::Notify::new(),
            held,
        })
    }

    /// The ack floor as last seen.
    pub fn settled(&self) -> u64 {
        self.settled.load(Relaxed)
    }

    /// How many times the consumer delivers a message, as last seen.
    pub fn max_deliveries(&self) -> u32 {
        self.max_deliveries.now()
    }

    /// The cell a delivery reads its bound from when it decides.
    pub fn max_deliveries_cell(&self) -> Arc<MaxDeliveries> {
        self.max_deliveries.clone()
    }

    /// The pump got a message: the consumer is looked after for [`ACTIVE_FOR`] more, and looked
    /// at now when it was not.
    pub fn active(&self) {
        let mut at = self.active_at.lock().expect("watched poisoned");
        if at.elapsed() >= ACTIVE_FOR {
            self.woken.notify_one();
        }
        *at = Instant::now();
    }

    /// One of the pump's messages is out until the guard is dropped (its acker, with it).
    pub fn out(self: &Arc<Self>) -> Out {
        self.out.fetch_add(1, Relaxed);
        Out(self.clone())
    }

    fn idle(&self) -> bool {
        self.out.load(Relaxed) == 0 && self.active_at.lock().expect("watched poisoned").elapsed() >= ACTIVE_FOR
    }

    fn update(&self, info: &Info, fallback: u32) {
        self.settled.store(info.ack_floor.stream_sequence, Relaxed);
        self.max_deliveries.read(bound(info.config.max_deliver, fallback));
        self.held.saw_ack_wait(&info.name, info.config.ack_wait);
    }
}

/// A message of the pump's not settled yet ([`Watched::out`]).
pub struct Out(Arc<Watched>);

impl Out {
    /// The cell its delivery reads the consumer's bound from ([`Watched::max_deliveries_cell`]).
    pub fn max_deliveries_cell(&self) -> Arc<MaxDeliveries> {
        self.0.max_deliveries_cell()
    }
}

impl Drop for Out {
    fn drop(&mut self) {
        self.0.out.fetch_sub(1, Relaxed);
    }
}

/// The deliveries a consumer whose `max_deliver` is `max_deliver` makes of a message: it, or
/// `fallback` (this host's own, `retry.max_attempts` doubled) when it sets none (0 or -1:
/// unlimited; this host dead-letters at its `retry.max_attempts` anyway).
pub fn bound(max_deliver: i64, fallback: u32) -> u32 {
    match u32::try_from(max_deliver) {
        Ok(max) if max > 0 => max,
        _ => fallback.max(1),
    }
}

/// Looks at `consumer` again into `watched`: every [`EVERY`] while the pump has a message out or
/// had one within [`ACTIVE_FOR`], when woken ([`Watched::active`]) or asked by a delivery
/// ([`MaxDeliveries::fresh`]), and every [`IDLE_EVERY`] otherwise. Runs until aborted (with its
/// pump).
pub async fn watch(mut consumer: PullConsumer, watched: Arc<Watched>, spec: SharedSpec) {
    /// Ends the waits for a look once this task ends (aborted with its pump).
    struct Closing(Arc<MaxDeliveries>);
    impl Drop for Closing {
        fn drop(&mut self) {
            self.0.close();
        }
    }
    let _closing = Closing(watched.max_deliveries.clone());
    let mut last = Instant::now();
    loop {
        let woken = tokio::select! {
            () = tokio::time::sleep(EVERY) => false,
            () = watched.woken.notified() => true,
            () = watched.max_deliveries.asked() => true,
        };
        if !woken && watched.idle() && last.elapsed() < IDLE_EVERY {
            continue;
        }
        last = Instant::now();
        match tokio::time::timeout(LOOK_TIMEOUT, consumer.info()).await {
            Ok(Ok(info)) => {
                let fallback = spec.read().expect("spec poisoned").durability.give_up_after;
                watched.update(info, fallback);
            }
            _ => watched.max_deliveries.look_failed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bound;

    #[test]
    fn a_consumer_without_a_bound_is_taken_at_this_hosts_own() {
        assert_eq!(bound(2, 8), 2);
        assert_eq!(bound(20, 8), 20);
        assert_eq!((bound(0, 8), bound(-1, 8)), (8, 8));
        assert_eq!(bound(i64::MAX, 8), 8, "past u32: none this host can count to");
        assert_eq!(bound(-1, 0), 1);
    }
}
