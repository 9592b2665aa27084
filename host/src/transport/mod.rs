//! Transports: where events come from and where outputs go.
//!
//! One trait, [`Transport`], with two implementations: [`embedded`] (an in-process bus, the
//! default) and NATS (later). A transport knows subjects and deliveries; it knows nothing of
//! plugins' code, retries or the sandbox. Invariant: a transport never drops an accepted event
//! silently: it either delivers it, applies backpressure, or returns an error to the publisher.

pub mod embedded;

use crate::event::Event;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

/// Why a transport call failed.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The subject or pattern is not valid.
    #[error(transparent)]
    Subject(#[from] crate::subject::SubjectError),
    /// The transport is shut down or disconnected.
    #[error("transport closed: {0}")]
    Closed(String),
}

/// What to subscribe for one plugin.
#[derive(Debug, Clone)]
pub struct SubscriptionSpec {
    /// The plugin the deliveries are for.
    pub plugin: String,
    /// Subject patterns; an event matching several is delivered once.
    pub patterns: Vec<String>,
    /// Queue group shared by every host running this plugin.
    pub queue_group: String,
    /// How many deliveries may wait in the plugin's queue before the transport pauses.
    pub capacity: usize,
}

/// Settles one delivery with the transport once dispatch is done with it.
///
/// The embedded bus has nothing to settle; JetStream maps these to ack / nak / term.
#[async_trait]
pub trait Acker: Send + Sync {
    /// Handled (and its outputs accepted): never deliver again.
    async fn ack(&self);
    /// Failed transiently: deliver again after `delay`.
    async fn nak(&self, delay: Duration);
    /// Dead-lettered: never deliver again.
    async fn term(&self);
}

/// An acker with nothing to settle.
pub struct NoAck;

#[async_trait]
impl Acker for NoAck {
    async fn ack(&self) {}
    async fn nak(&self, _delay: Duration) {}
    async fn term(&self) {}
}

/// One event delivered to one plugin.
pub struct Delivery {
    /// The event.
    pub event: Arc<Event>,
    /// How to settle it.
    pub acker: Box<dyn Acker>,
}

/// A live subscription: deliveries arrive on `deliveries`; dropping it unsubscribes.
pub struct Subscription {
    /// The plugin's queue of deliveries.
    pub deliveries: mpsc::Receiver<Delivery>,
    /// Identifies the subscription to the transport (for [`Transport::retarget`]).
    pub id: u64,
    weak: mpsc::WeakSender<Delivery>,
    guard: Option<Box<dyn Send + Sync>>,
}

impl Subscription {
    /// Wraps the queue (`tx` is only used to measure its depth) and a guard that unsubscribes
    /// when dropped.
    pub fn new(
        id: u64,
        tx: &mpsc::Sender<Delivery>,
        deliveries: mpsc::Receiver<Delivery>,
        guard: impl Send + Sync + 'static,
    ) -> Self {
        Self { deliveries, id, weak: tx.downgrade(), guard: Some(Box::new(guard)) }
    }

    /// Takes the guard out: the subscription lasts until the guard is dropped, while the
    /// queue can still be drained by whoever owns `deliveries`.
    pub fn take_guard(&mut self) -> Box<dyn Send + Sync> {
        self.guard.take().unwrap_or_else(|| Box::new(()))
    }

    /// A probe for how many deliveries wait in the queue (for metrics and drain).
    pub fn depth_probe(&self) -> Box<dyn Fn() -> usize + Send + Sync> {
        let weak = self.weak.clone();
        Box::new(move || weak.upgrade().map_or(0, |tx| tx.max_capacity() - tx.capacity()))
    }
}

/// The bus the host is attached to.
#[async_trait]
pub trait Transport: Send + Sync + 'static {
    /// A short name for logs: `embedded`, `nats`.
    fn name(&self) -> &'static str;

    /// Publishes one event; returns once the transport accepted it.
    async fn publish(&self, event: Event) -> Result<(), TransportError>;

    /// Subscribes a plugin; deliveries arrive on the returned subscription's queue.
    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<Subscription, TransportError>;

    /// Changes the patterns of a live subscription in place: events matching only the old
    /// patterns stop, events matching the new ones start, nothing in between is lost or doubled.
    async fn retarget(&self, subscription: u64, patterns: Vec<String>) -> Result<(), TransportError>;

    /// Observes every event matching `patterns` without taking part in delivery (the live tail,
    /// tests). An observer that falls more than `capacity` events behind misses events.
    async fn observe(
        &self,
        patterns: Vec<String>,
        capacity: usize,
    ) -> Result<mpsc::Receiver<Arc<Event>>, TransportError>;

    /// Whether the transport can currently deliver (used by `/readyz`).
    fn is_connected(&self) -> bool {
        true
    }
}
