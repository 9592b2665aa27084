//! A NATS feed's byte budget: what one plugin's deliveries from NATS may hold in the host at
//! once (queued, admitted, running, waiting to settle), `flow.buffer_mib` in all. The server
//! bounds each message (`max_payload`), not how many a publisher sends: without a budget, a
//! plugin's `flow.queue` queued and `flow.queue` admitted deliveries of 1 MiB each are 2 GiB
//! held for one hostile publisher. A pump waits for room before it queues a delivery (core
//! NATS then drops what the server cannot hand over, as for a full queue; JetStream keeps it);
//! the room comes back when the delivery, settled, is let go.

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

    /// Waits for room for `delivery` ([`crate::event::Event::buffered_cost`]; one larger than
    /// the whole budget waits for all of it), then ties that room to its acker. `None` once
    /// the budget is closed.
    pub async fn hold(&self, mut delivery: Delivery) -> Option<Delivery> {
        let cost = delivery.event.buffered_cost().clamp(1, u64::from(self.size)) as u32;
        let room = self.room.clone().acquire_many_owned(cost).await.ok()?;
        delivery.acker = Box::new(Budgeted { inner: delivery.acker, _room: room });
        Some(delivery)
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
}

impl Intake {
    /// Queues `delivery` once it has room; `false` once the queue is closed.
    pub async fn send(&self, delivery: Delivery) -> bool {
        match self.budget.hold(delivery).await {
            Some(delivery) => self.tx.send(delivery).await.is_ok(),
            None => false,
        }
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
}
