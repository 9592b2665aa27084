//! A NATS feed's byte budget: what one plugin's deliveries from NATS may hold in the host at
//! once (queued, admitted, running, waiting to settle), `flow.buffer_mib` in all. The server
//! bounds each message (`max_payload`), not how many a publisher sends: without a budget, a
//! plugin's `flow.queue` queued and `flow.queue` admitted deliveries of 1 MiB each are 2 GiB
//! held for one hostile publisher. A delivery takes room before it is queued, and the room
//! comes back when the delivery, settled, is let go. A JetStream pump waits for room (and
//! asks for at most the budget's bytes per pull: `consumer::Batch`); a core pump never waits
//! (what it waits on, the client would buffer): what has no room waits in it, charged to a
//! second budget of the same size shared by the feed's core pumps, and the rest is dropped
//! (`queue_group`).

use crate::transport::{Acker, Delivery};
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};

/// One feed's budget, shared by its pumps.
#[derive(Clone)]
pub struct Budget {
    room: Arc<Semaphore>,
    size: u32,
}

impl Budget {
    /// A budget of `bytes` (at least 1: a budget of 0 lets one delivery in at a time).
    pub fn new(bytes: u64) -> Self {
        let size = bytes.clamp(1, u64::from(u32::MAX).min(Semaphore::MAX_PERMITS as u64)) as u32;
        Self { room: Arc::new(Semaphore::new(size as usize)), size }
    }

    /// Waits for room for `delivery` ([`Budget::cost`]: one larger than the whole budget waits
    /// for all of it), then ties that room to its acker. `None` once the budget is closed.
    #[cfg(test)]
    async fn hold(&self, delivery: Delivery) -> Option<Delivery> {
        let room = self.room(self.cost(&delivery)).await?;
        Some(Self::attach(delivery, room))
    }

    /// The room `delivery` takes: [`crate::event::Event::buffered_cost`], at most the whole
    /// budget.
    pub fn cost(&self, delivery: &Delivery) -> u32 {
        delivery.event.buffered_cost().clamp(1, u64::from(self.size)) as u32
    }

    /// The budget's size in bytes.
    pub fn bytes(&self) -> u64 {
        u64::from(self.size)
    }

    /// Waits for `cost` bytes of room. Cancel-safe: dropped before it is done, it takes
    /// nothing. `None` once the budget is closed.
    async fn room(&self, cost: u32) -> Option<OwnedSemaphorePermit> {
        self.room.clone().acquire_many_owned(cost).await.ok()
    }

    /// Takes `cost` bytes of room now (at most the whole budget), if there is that much.
    pub fn try_room(&self, cost: u64) -> Option<OwnedSemaphorePermit> {
        let cost = cost.clamp(1, u64::from(self.size)) as u32;
        self.room.clone().try_acquire_many_owned(cost).ok()
    }

    /// Ties `room` to `delivery`'s acker: it comes back when the delivery is let go.
    fn attach(mut delivery: Delivery, room: OwnedSemaphorePermit) -> Delivery {
        delivery.acker = Box::new(Budgeted { inner: delivery.acker, _room: room });
        delivery
    }

    /// Bytes free now.
    fn free(&self) -> u64 {
        self.room.available_permits() as u64
    }

    /// Bytes held by deliveries now.
    #[cfg(test)]
    fn held(&self) -> u64 {
        u64::from(self.size) - self.room.available_permits() as u64
    }
}

/// Where a feed's pumps put deliveries: the plugin's queue, each delivery first given room in
/// the feed's budget.
#[derive(Clone)]
pub struct Intake {
    /// The plugin's queue.
    pub tx: mpsc::Sender<Delivery>,
    /// The feed's budget.
    pub budget: Budget,
    /// What the feed's core pumps may hold besides, while the queue or the budget has no room
    /// (as large as `budget`; see `queue_group`).
    pub waiting: Budget,
    /// The feed's JetStream pumps pulling now (one per stream): each asks for its share of the
    /// room ([`Intake::room`]).
    pullers: Arc<std::sync::atomic::AtomicUsize>,
}

/// A pump's place among its feed's pullers, given up when dropped.
pub struct Puller(Arc<std::sync::atomic::AtomicUsize>);

impl Drop for Puller {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Intake {
    /// The intake of a feed of `bytes` bytes into `tx`.
    pub fn new(tx: mpsc::Sender<Delivery>, bytes: u64) -> Self {
        Self { tx, budget: Budget::new(bytes), waiting: Budget::new(bytes), pullers: Default::default() }
    }

    /// Counts a pump among the feed's pullers while the returned guard lives.
    pub fn puller(&self) -> Puller {
        self.pullers.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Puller(self.pullers.clone())
    }

    /// Queues `delivery` now if the budget and the queue both have room for it; gives it back
    /// if not. `Err(None)` once the queue is closed.
    pub fn try_send(&self, delivery: Delivery) -> Result<(), Option<Delivery>> {
        let Some(room) = self.budget.try_room(u64::from(self.budget.cost(&delivery))) else {
            return Err(Some(delivery));
        };
        match self.tx.try_reserve() {
            Ok(slot) => {
                slot.send(Budget::attach(delivery, room));
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(())) => Err(Some(delivery)),
            Err(mpsc::error::TrySendError::Closed(())) => Err(None),
        }
    }

    /// Waits until the queue has a free slot, then says how much room there is: what a pull
    /// may ask for. `None` once the queue is closed.
    ///
    /// With several pumps (a stream each), each gets an equal share: each pulls what it was told
    /// there is room for, and together they must not pull more than that.
    pub async fn room(&self) -> Option<Room> {
        drop(self.tx.reserve().await.ok()?);
        let pullers = self.pullers.load(std::sync::atomic::Ordering::Relaxed).max(1);
        Some(Room { slots: (self.tx.capacity() / pullers).max(1), bytes: self.budget.free() / pullers as u64 })
    }

    /// Waits until the budget has `cost` bytes of room and the queue a slot. Cancel-safe:
    /// dropped before it is done, it takes neither. `None` once either is closed.
    pub async fn ready(&self, cost: u32) -> Option<Slot<'_>> {
        let room = self.budget.room(cost).await?;
        let slot = self.tx.reserve().await.ok()?;
        Some(Slot { room, slot })
    }
}

/// How much a feed could take now ([`Intake::room`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    /// Free slots in the plugin's queue.
    pub slots: usize,
    /// Free bytes of the budget.
    pub bytes: u64,
}

/// Room in a feed's budget and a slot in the plugin's queue, taken together ([`Intake::ready`]).
pub struct Slot<'a> {
    room: OwnedSemaphorePermit,
    slot: mpsc::Permit<'a, Delivery>,
}

impl Slot<'_> {
    /// Queues `delivery`, holding the room (it must cost no more than was asked for).
    pub fn send(self, delivery: Delivery) {
        self.slot.send(Budget::attach(delivery, self.room));
    }
}

/// An acker holding its delivery's room in the budget until it is let go.
struct Budgeted {
    inner: Box<dyn Acker>,
    _room: OwnedSemaphorePermit,
}

#[async_trait]
impl Acker for Budgeted {
    async fn ack(&self) {
        self.inner.ack().await;
    }
    async fn nak(&self, delay: Duration) {
        self.inner.nak(delay).await;
    }
    async fn term(&self) {
        self.inner.term().await;
    }
    fn position(&self) -> Option<(Arc<str>, u64)> {
        self.inner.position()
    }
    fn acks_nothing(&self) -> bool {
        self.inner.acks_nothing()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    fn delivery(bytes: usize) -> Delivery {
        Delivery::once(Arc::new(Event::new("a.b", vec![0u8; bytes])))
    }

    /// The attack: a publisher sending 1 MiB messages as fast as the server takes them.
    #[tokio::test]
    async fn deliveries_hold_their_bytes_until_let_go_and_a_full_budget_waits() {
        let budget = Budget::new(3 << 20);
        let mut held = Vec::new();
        for _ in 0..2 {
            held.push(budget.hold(delivery(1 << 20)).await.unwrap());
        }
        assert!(budget.held() >= 2 << 20 && budget.held() < 3 << 20, "{}", budget.held());
        let third = tokio::time::timeout(Duration::from_millis(50), budget.hold(delivery(1 << 20))).await;
        assert!(third.is_err(), "a third MiB was let in past a budget of 3 MiB with 2 held");
        held.pop().unwrap().acker.ack().await;
        drop(held.pop());
        assert_eq!(budget.held(), 0, "settled deliveries gave their room back");
        // One larger than the whole budget waits for all of it, never forever.
        let big = tokio::time::timeout(Duration::from_millis(50), budget.hold(delivery(8 << 20))).await;
        assert!(big.unwrap().is_some());
        assert_eq!(Budget::new(0).size, 1);
    }

    /// A core pump never waits while it has something else to do: `try_send` gives back what
    /// has no room, and `ready` dropped unfinished takes neither room nor a queue slot.
    #[tokio::test]
    async fn try_send_gives_back_what_has_no_room_and_an_unfinished_ready_takes_nothing() {
        let (tx, mut rx) = mpsc::channel(1);
        let intake = Intake::new(tx, 3 << 20);
        assert!(intake.try_send(delivery(1 << 20)).is_ok());
        let held = intake.budget.held();
        assert!(matches!(intake.try_send(delivery(10)), Err(Some(_))), "the queue is full");
        let second = delivery(1 << 20);
        let cost = intake.budget.cost(&second);
        let waited = tokio::time::timeout(Duration::from_millis(50), intake.ready(cost)).await;
        assert!(waited.is_err(), "a slot was given while the queue was full");
        assert_eq!(intake.budget.held(), held, "an unfinished ready kept room");
        let first = rx.recv().await.unwrap();
        intake.ready(cost).await.unwrap().send(second);
        let second = rx.recv().await.unwrap();
        assert!(matches!(intake.try_send(delivery(1 << 20)), Err(Some(_))), "the budget is full");
        drop((first, second));
        assert_eq!(intake.budget.held(), 0);
        drop(rx);
        assert!(matches!(intake.try_send(delivery(10)), Err(None)), "the queue is closed");
    }
}
