//! The live tails' NATS connection: one for all the host's tails (`<nats.name> tails`), made at
//! the first. A tail of busy traffic (`>`) then makes only it a slow consumer the server cuts off,
//! never the connection every delivery, ack and kv call uses (cut off with it, core deliveries
//! were lost). One, whatever the number of tails: a connection per tail let a client opening
//! tails take the connection slot the host's own needed to come back, and churn sockets.
//!
//! What the connection received and no tail took, its client dropped for want of room (each
//! tail's subscriptions hold [`TAIL_CLIENT_MESSAGES`]). A tail counts it as missed once no tail
//! took anything for a whole tick, so nothing still waits for one ([`Tails::count_dropped`]).

use super::{TransportError, connect_as, registered_on};
use crate::transport::ObserverSender;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The most messages a tail's subscription holds for it before its client drops them (each up
/// to the server's `max_payload`, 1 MiB by default; async-nats's default is 65,536).
const TAIL_CLIENT_MESSAGES: usize = 256;

/// The tails' connection, made at the first tail.
#[derive(Default)]
pub(super) struct Tails {
    connection: tokio::sync::OnceCell<Arc<Connection>>,
}

/// The connection, and what its tails took of what it received.
pub(super) struct Connection {
    pub(super) client: async_nats::Client,
    /// Messages taken off its subscriptions (a tail's, or a subscription's registration echo).
    taken: AtomicU64,
    /// Of those received and never taken, how many were counted as missed.
    counted: AtomicU64,
}

impl Tails {
    /// The tails' connection, made now if it is the first tail.
    pub(super) async fn connection(&self, settings: &super::NatsSettings) -> Result<Arc<Connection>, TransportError> {
        self.connection
            .get_or_try_init(|| async {
                let name = format!("{} tails", settings.name);
                let client = connect_as(settings, &name, Some(TAIL_CLIENT_MESSAGES), |event| match event {
                    async_nats::Event::Connected | async_nats::Event::SlowConsumer(_) => {}
                    other => tracing::warn!("NATS connection of the live tails: {other}"),
                })
                .await?;
                // What it received before now (its own registrations) is no tail's.
                let taken = AtomicU64::new(client.statistics().in_messages.load(Ordering::Relaxed));
                Ok(Arc::new(Connection { client, taken, counted: AtomicU64::new(0) }))
            })
            .await
            .cloned()
    }
}

impl Connection {
    /// Returns once the server registered the subscriptions made so far (its echo is counted as
    /// taken before it is asked for: never as missed).
    pub(super) async fn registered(&self) -> Result<(), TransportError> {
        self.taken.fetch_add(1, Ordering::Relaxed);
        registered_on(&self.client).await
    }

    /// Notes a message taken off a tail's subscription.
    pub(super) fn took(&self) {
        self.taken.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts, as missed by `tail`, what the connection received and no tail took, once no tail
    /// took anything since `last` (what it read at its last tick): then nothing waits for one.
    pub(super) fn count_dropped(&self, tail: &ObserverSender, last: &mut u64) {
        let taken = self.taken.load(Ordering::Relaxed);
        if taken == *last {
            let received = self.client.statistics().in_messages.load(Ordering::Relaxed);
            let dropped = received.saturating_sub(taken);
            let before = self.counted.fetch_max(dropped, Ordering::Relaxed);
            if dropped > before {
                tail.count_missed(dropped - before);
            }
        }
        *last = taken;
    }
}
