//! The embedded bus: an in-process transport, the default, needing no server.
//!
//! Each subscription has its own bounded queue. Publishing waits while a matching
//! subscription's queue is full (backpressure): nothing is dropped. Observers (the live tail)
//! never slow the bus: they miss events instead, and the miss is counted and logged.

use super::{Delivery, Subscription, SubscriptionSpec, Transport, TransportError};
use crate::event::Event;
use crate::subject::{PatternSet, validate_subject};
use async_trait::async_trait;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use tokio::sync::mpsc;

struct Sub {
    id: u64,
    patterns: PatternSet,
    tx: mpsc::Sender<Delivery>,
}

struct Observer {
    patterns: PatternSet,
    tx: mpsc::Sender<Arc<Event>>,
}

#[derive(Default)]
struct Table {
    subs: Vec<Arc<Sub>>,
    observers: Vec<Observer>,
}

/// The in-process bus.
#[derive(Default, Clone)]
pub struct EmbeddedBus {
    table: Arc<RwLock<Table>>,
    next_id: Arc<AtomicU64>,
    /// Events an observer missed because it fell behind.
    observer_misses: Arc<AtomicU64>,
}

impl EmbeddedBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// How many events observers missed because they fell behind.
    pub fn observer_misses(&self) -> u64 {
        self.observer_misses.load(Ordering::Relaxed)
    }
}

/// Removes the subscription from the table when the plugin lets go of it.
struct Unsubscribe {
    table: Arc<RwLock<Table>>,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        if let Ok(mut t) = self.table.write() {
            t.subs.retain(|s| s.id != self.id);
        }
    }
}

#[async_trait]
impl Transport for EmbeddedBus {
    fn name(&self) -> &'static str {
        "embedded"
    }

    async fn publish(&self, event: Event) -> Result<(), TransportError> {
        validate_subject(&event.subject)?;
        let event = Arc::new(event);
        let (targets, observer_gone) = {
            let table = self.table.read().expect("bus table poisoned");
            let mut gone = false;
            for o in table.observers.iter().filter(|o| o.patterns.matches(&event.subject)) {
                match o.tx.try_send(event.clone()) {
                    Ok(()) => {}
                    Err(mpsc::error::TrySendError::Closed(_)) => gone = true,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        self.observer_misses.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(subject = %event.subject, "a slow observer missed an event");
                    }
                }
            }
            let targets: Vec<Arc<Sub>> =
                table.subs.iter().filter(|s| s.patterns.matches(&event.subject)).cloned().collect();
            (targets, gone)
        };
        if observer_gone {
            self.table.write().expect("bus table poisoned").observers.retain(|o| !o.tx.is_closed());
        }
        for sub in targets {
            let delivery = Delivery::once(event.clone());
            // A closed queue means the plugin was unsubscribed meanwhile (removed or reloaded
            // with other subjects): the event is no longer for it.
            let _ = sub.tx.send(delivery).await;
        }
        Ok(())
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<Subscription, TransportError> {
        let patterns = PatternSet::parse(&spec.patterns)?;
        let (tx, rx) = mpsc::channel(spec.capacity.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let subscription = Subscription::new(id, &tx, rx, Unsubscribe { table: self.table.clone(), id });
        self.table.write().expect("bus table poisoned").subs.push(Arc::new(Sub { id, patterns, tx }));
        Ok(subscription)
    }

    async fn retarget(&self, subscription: u64, spec: &SubscriptionSpec) -> Result<(), TransportError> {
        let patterns = PatternSet::parse(&spec.patterns)?;
        let mut table = self.table.write().expect("bus table poisoned");
        let slot = table
            .subs
            .iter_mut()
            .find(|s| s.id == subscription)
            .ok_or_else(|| TransportError::Closed(format!("subscription {subscription} is gone")))?;
        *slot = Arc::new(Sub { id: slot.id, patterns, tx: slot.tx.clone() });
        Ok(())
    }

    async fn observe(
        &self,
        patterns: Vec<String>,
        capacity: usize,
    ) -> Result<mpsc::Receiver<Arc<Event>>, TransportError> {
        let patterns = PatternSet::parse(&patterns)?;
        let (tx, rx) = mpsc::channel(capacity.max(1));
        self.table.write().expect("bus table poisoned").observers.push(Observer { patterns, tx });
        Ok(rx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(patterns: &[&str], capacity: usize) -> SubscriptionSpec {
        SubscriptionSpec {
            plugin: "p".into(),
            patterns: patterns.iter().map(|s| s.to_string()).collect(),
            queue_group: "plugbus.p".into(),
            capacity,
            durable: None,
        }
    }

    #[tokio::test]
    async fn delivers_once_per_subscription_even_when_several_patterns_match() {
        let bus = EmbeddedBus::new();
        let mut a = bus.subscribe(spec(&["orders.*", "orders.>"], 8)).await.unwrap();
        let mut b = bus.subscribe(spec(&["payments.>"], 8)).await.unwrap();
        bus.publish(Event::new("orders.created", "x")).await.unwrap();
        assert_eq!(a.deliveries.recv().await.unwrap().event.subject, "orders.created");
        assert!(a.deliveries.try_recv().is_err());
        assert!(b.deliveries.try_recv().is_err());
    }

    #[tokio::test]
    async fn full_queue_pauses_the_publisher_and_loses_nothing() {
        let bus = EmbeddedBus::new();
        let mut sub = bus.subscribe(spec(&["x"], 1)).await.unwrap();
        let publisher = {
            let bus = bus.clone();
            tokio::spawn(async move {
                for i in 0..100 {
                    bus.publish(Event::new("x", i.to_string())).await.unwrap();
                }
            })
        };
        for i in 0..100 {
            let d = sub.deliveries.recv().await.unwrap();
            assert_eq!(d.event.data, i.to_string());
        }
        publisher.await.unwrap();
    }

    #[tokio::test]
    async fn dropping_a_subscription_unsubscribes() {
        let bus = EmbeddedBus::new();
        let sub = bus.subscribe(spec(&["x"], 1)).await.unwrap();
        drop(sub);
        // Would block forever on the full queue if the subscription were still there.
        for _ in 0..3 {
            bus.publish(Event::new("x", "")).await.unwrap();
        }
        assert!(bus.table.read().unwrap().subs.is_empty());
    }

    #[tokio::test]
    async fn retarget_switches_patterns_in_place() {
        let bus = EmbeddedBus::new();
        let mut sub = bus.subscribe(spec(&["a"], 8)).await.unwrap();
        bus.retarget(sub.id, &spec(&["b"], 8)).await.unwrap();
        bus.publish(Event::new("a", "")).await.unwrap();
        bus.publish(Event::new("b", "")).await.unwrap();
        assert_eq!(sub.deliveries.recv().await.unwrap().event.subject, "b");
        assert!(sub.deliveries.try_recv().is_err());
    }

    #[tokio::test]
    async fn invalid_subject_is_refused() {
        let bus = EmbeddedBus::new();
        assert!(bus.publish(Event::new("a..b", "")).await.is_err());
    }
}
