//! The most times a broker delivers a message, as a transport last read it from the broker
//! ([`MaxDeliveries`]): what a delivery asks when it decides to give its event back, which the
//! broker would drop unrun at its last delivery.
//!
//! One value per consumer, shared by its deliveries and set by the transport's own look at the
//! broker (NATS: `backend/nats/watched.rs`, every second while busy, every few seconds while
//! idle). A look a few seconds old may miss a bound another host or an operator lowered since, so
//! a delivery that would give its event back asks for a look first when the last is older than
//! the transport's cadence while busy ([`MaxDeliveries::fresh`]): only when it would give the
//! event back (never on a delivery that goes well, is retried in the host or dead-lettered), and
//! never for longer than a look takes: a look that fails, or a watcher that is gone (its plugin
//! left), ends the wait with the value as last read.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, watch};

/// See the module docs.
#[derive(Debug)]
pub struct MaxDeliveries {
    value: AtomicU32,
    /// When the broker was last read.
    read_at: Mutex<Instant>,
    /// How long a value read stays fresh enough to decide by.
    fresh_for: Duration,
    /// The longest a delivery waits for the look it asked for.
    wait: Duration,
    /// Asks the transport for a look now ([`MaxDeliveries::asked`]).
    ask: Notify,
    /// Counts the looks (failed ones too), for a delivery waiting for the next one.
    looks: watch::Sender<u64>,
    /// The transport no longer looks (its watcher ended): nobody waits for a look.
    closed: AtomicBool,
}

impl MaxDeliveries {
    /// `value` as read from the broker now; a delivery asks for a look when the last is older
    /// than `fresh_for`, and waits for it up to `wait`.
    pub fn new(value: u32, fresh_for: Duration, wait: Duration) -> Self {
        Self {
            value: AtomicU32::new(value),
            read_at: Mutex::new(Instant::now()),
            fresh_for,
            wait,
            ask: Notify::new(),
            looks: watch::Sender::new(0),
            closed: false.into(),
        }
    }

    /// As last read.
    pub fn now(&self) -> u32 {
        self.value.load(Relaxed)
    }

    /// As read within `fresh_for`: read longer ago, the transport is asked for a look, and this
    /// waits for one up to `wait` (without one, the value as last read).
    pub async fn fresh(&self) -> u32 {
        if self.read_at.lock().expect("max deliveries poisoned").elapsed() <= self.fresh_for {
            return self.now();
        }
        // Subscribed before asking (and before reading `closed`): a look that ends from here on,
        // or a close, is seen.
        let mut looks = self.looks.subscribe();
        if self.closed.load(Relaxed) {
            return self.now();
        }
        self.ask.notify_one();
        let _ = tokio::time::timeout(self.wait, looks.changed()).await;
        self.now()
    }

    /// A look read `value` from the broker.
    pub fn read(&self, value: u32) {
        self.value.store(value, Relaxed);
        *self.read_at.lock().expect("max deliveries poisoned") = Instant::now();
        self.looks.send_modify(|n| *n += 1);
    }

    /// A look failed (the broker did not answer, or refused): those waiting for it go on with
    /// the value as last read.
    pub fn look_failed(&self) {
        self.looks.send_modify(|n| *n += 1);
    }

    /// The transport looks no more (its watcher ended): those waiting, and those who ask from
    /// now on, go on with the value as last read.
    pub fn close(&self) {
        self.closed.store(true, Relaxed);
        self.looks.send_modify(|n| *n += 1);
    }

    /// Returns once a delivery asks for a look ([`MaxDeliveries::fresh`]); an ask made while
    /// nobody waited here is kept for the next call.
    pub async fn asked(&self) {
        self.ask.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::MaxDeliveries;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering::Relaxed};
    use std::time::{Duration, Instant};

    /// A transport that reads `lowered` from the broker each time a delivery asks, counting the
    /// looks in the returned counter.
    fn looking(max: &Arc<MaxDeliveries>, lowered: u32) -> Arc<AtomicU32> {
        let looks = Arc::new(AtomicU32::new(0));
        let (max, counted) = (max.clone(), looks.clone());
        tokio::spawn(async move {
            loop {
                max.asked().await;
                counted.fetch_add(1, Relaxed);
                max.read(lowered);
            }
        });
        looks
    }

    #[tokio::test]
    async fn a_bound_read_long_ago_is_read_again_before_it_is_decided_by() {
        let max = Arc::new(MaxDeliveries::new(8, Duration::from_millis(20), Duration::from_secs(30)));
        let looks = looking(&max, 2);
        tokio::time::sleep(Duration::from_millis(40)).await;
        assert_eq!(max.now(), 8, "nothing looked before it was asked");
        assert_eq!(max.fresh().await, 2, "another host lowered it since the last look");
        assert_eq!(looks.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn a_bound_read_just_now_is_decided_by_without_a_look() {
        let max = Arc::new(MaxDeliveries::new(8, Duration::from_secs(60), Duration::from_secs(30)));
        let looks = looking(&max, 2);
        assert_eq!(max.fresh().await, 8);
        tokio::task::yield_now().await;
        assert_eq!(looks.load(Relaxed), 0, "a fresh bound asks the broker nothing");
    }

    #[tokio::test]
    async fn a_failed_look_or_a_gone_watcher_ends_the_wait_at_once() {
        let max = Arc::new(MaxDeliveries::new(8, Duration::ZERO, Duration::from_secs(30)));
        let failing = max.clone();
        tokio::spawn(async move {
            failing.asked().await;
            failing.look_failed();
        });
        tokio::time::sleep(Duration::from_millis(5)).await;
        let started = Instant::now();
        assert_eq!(max.fresh().await, 8);
        assert!(started.elapsed() < Duration::from_secs(25), "it waited out the wait for a failed look");
        max.close();
        assert_eq!(max.fresh().await, 8, "nobody looks: no wait");
    }

    #[tokio::test]
    async fn a_look_that_does_not_come_leaves_the_bound_as_last_read() {
        let wait = Duration::from_millis(100);
        let max = MaxDeliveries::new(8, Duration::ZERO, wait);
        tokio::time::sleep(Duration::from_millis(5)).await;
        let started = Instant::now();
        assert_eq!(max.fresh().await, 8);
        assert!(started.elapsed() >= wait, "it waited for the look it asked for");
    }
}
