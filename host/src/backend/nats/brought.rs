//! What a JetStream pull brought and the plugin's queue has no room for yet: read from the
//! pull's inbox at once and held (kept alive with `in-progress`), queued as room comes.
//!
//! A pull is sized to the feed's budget by the messages' bytes on the wire, but a message costs
//! the budget more than those (`Event::buffered_cost`: 64 bytes a header), so a pull of many
//! small headers brings more than the budget takes. A message left unread in the client while
//! the pump waits for room is kept alive by nothing: past `ack_wait` JetStream delivered it
//! again while the first copy still waited, and the event ran twice. Held here, each is only
//! its bytes on the wire (within what the pull asked for) until it is the next to be queued.

use super::budget::Intake;
use super::consumer::HeldMessage;
use crate::transport::Delivery;
use std::collections::VecDeque;

/// Messages read and held, oldest first, waiting for room in the plugin's queue.
#[derive(Default)]
pub struct Brought {
    /// The next to queue, read into its delivery (its cost known).
    next: Option<Delivery>,
    /// The rest, in the order they came.
    rest: VecDeque<Waiting>,
}

/// A message waiting for room: as it came, or already a delivery (one settled as a defect).
enum Waiting {
    Message(HeldMessage),
    Delivery(Delivery),
}

impl Brought {
    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.next.is_none() && self.rest.is_empty()
    }

    /// Adds a message read from the inbox (held already), after those waiting.
    pub fn push(&mut self, message: HeldMessage) {
        self.rest.push_back(Waiting::Message(message));
    }

    /// Adds a delivery made already (held already), after those waiting.
    pub fn push_delivery(&mut self, delivery: Delivery) {
        self.rest.push_back(Waiting::Delivery(delivery));
    }

    /// Queues, oldest first, what has room now, without waiting; `false` once the queue is
    /// closed.
    pub fn queue_now(&mut self, intake: &Intake) -> bool {
        while let Some(delivery) = self.take_next() {
            match intake.try_send(delivery) {
                Ok(()) => {}
                Err(None) => return false,
                Err(Some(delivery)) => {
                    self.next = Some(delivery);
                    return true;
                }
            }
        }
        true
    }

    /// Waits for room for the oldest and queues it; `false` once the queue is closed.
    /// Cancel-safe: dropped before it is done, it queues nothing and keeps the message. Returns
    /// at once when nothing waits.
    pub async fn queue_next(&mut self, intake: &Intake) -> bool {
        if self.next.is_none() {
            self.next = self.take_next();
        }
        let Some(next) = &self.next else { return true };
        let Some(slot) = intake.ready(intake.budget.cost(next)).await else { return false };
        slot.send(self.next.take().expect("the next delivery, read above"));
        true
    }

    /// Queues everything waiting, oldest first, waiting for room; `false` once the queue is
    /// closed.
    pub async fn queue_all(&mut self, intake: &Intake) -> bool {
        while !self.is_empty() {
            if !self.queue_next(intake).await {
                return false;
            }
        }
        true
    }

    fn take_next(&mut self) -> Option<Delivery> {
        self.next.take().or_else(|| {
            self.rest.pop_front().map(|waiting| match waiting {
                Waiting::Message(message) => message.delivery(),
                Waiting::Delivery(delivery) => delivery,
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::sync::mpsc;

    fn delivery(bytes: usize) -> Delivery {
        Delivery::once(Arc::new(Event::new("a.b", vec![0u8; bytes])))
    }

    /// What has room is queued at once and in order; the rest waits, and a wait for room given
    /// up keeps what it waited to queue.
    #[tokio::test]
    async fn what_has_no_room_waits_in_order_and_an_unfinished_wait_keeps_it() {
        let (tx, mut rx) = mpsc::channel(8);
        let intake = Intake::new(tx, 3 << 20);
        let mut brought = Brought::default();
        for bytes in [1 << 20, (1 << 20) + 1, (1 << 20) + 2, (1 << 20) + 3] {
            brought.push_delivery(delivery(bytes));
        }
        assert!(brought.queue_now(&intake));
        let first = rx.recv().await.unwrap();
        let second = rx.recv().await.unwrap();
        assert_eq!((first.event.data.len(), second.event.data.len()), (1 << 20, (1 << 20) + 1));
        assert!(rx.try_recv().is_err(), "a third MiB was queued past a budget of 3 MiB");
        assert!(!brought.is_empty());
        let waited = tokio::time::timeout(Duration::from_millis(50), brought.queue_next(&intake)).await;
        assert!(waited.is_err(), "queued without room");
        drop(first);
        assert!(brought.queue_next(&intake).await);
        assert_eq!(rx.recv().await.unwrap().event.data.len(), (1 << 20) + 2, "the one waited for, kept");
        drop(second);
        assert!(brought.queue_all(&intake).await);
        assert_eq!(rx.recv().await.unwrap().event.data.len(), (1 << 20) + 3);
        assert!(brought.is_empty());
        assert!(brought.queue_next(&intake).await, "nothing waits: at once");
        drop(rx);
        brought.push_delivery(delivery(1));
        assert!(!brought.queue_now(&intake), "the queue is closed");
    }
}
