//! Core NATS subscriptions: one queue subscription per pattern, in the plugin's queue group,
//! so each event is handled once per plugin across every host. At-most-once: a message in
//! flight when a host dies is gone (use a durable subscription for at-least-once).
//!
//! A pump never waits while the server hands over messages: whatever it waits on, the client
//! buffers for it (async-nats holds up to 65,536 messages per subscription, of up to
//! `max_payload` each: 64 GiB at 1 MiB). It takes every message at once; what the plugin's
//! queue and budget have no room for waits in the pump ([`Waiting`], at most the feed's
//! budget in bytes again), and what does not fit there is dropped, counted
//! (`plugbus_nats_core_dropped_total{plugin}`) and logged: core NATS is at-most-once, and a
//! full consumer is where it drops.

use super::budget::Intake;
use super::{Filter, wire};
use crate::event::Event;
use crate::transport::Delivery;
use async_nats::{Message, Subscriber};
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use std::collections::VecDeque;
use std::sync::Arc;

/// At most this many messages wait in one pump, however small (as many as async-nats held).
pub const MAX_WAITING: usize = 65_536;

/// Moves messages from the subscription into the plugin's queue until either closes. A message
/// the plugin's patterns do not reach by plugbus's rule (the server gives `>` subscribers `$`
/// subjects, `_INBOX` replies and other plugins' dead letters) is dropped unrun: see
/// [`Filter`]. One the plugin has no room for, even waiting, is dropped and counted in
/// `dropped`.
pub async fn pump(mut sub: Subscriber, intake: Intake, filter: Filter, dropped: Counter) {
    let mut waiting =
        Waiting { max_bytes: intake.budget.bytes(), plugin: filter.plugin.clone(), dropped, ..Default::default() };
    loop {
        let front = waiting.front_cost();
        tokio::select! {
            biased;
            ready = intake.ready(front.unwrap_or(0)), if front.is_some() => {
                let Some(slot) = ready else { return };
                slot.send(waiting.pop());
            }
            msg = sub.next() => {
                let Some(msg) = msg else { return };
                let Some(delivery) = delivery_of(msg, &filter) else { continue };
                let delivery = if waiting.is_empty() {
                    match intake.try_send(delivery) {
                        Ok(()) => continue,
                        Err(Some(delivery)) => delivery,
                        Err(None) => return,
                    }
                } else {
                    delivery
                };
                let cost = intake.budget.cost(&delivery);
                waiting.push(delivery, cost);
            }
        }
    }
}

/// The delivery of a message the plugin takes; `None` for one its patterns do not reach.
fn delivery_of(msg: Message, filter: &Filter) -> Option<Delivery> {
    let subject = msg.subject.to_string();
    if !filter.admits(&subject) {
        return None;
    }
    Some(match wire::event_of(&subject, msg.headers.as_ref(), msg.payload.clone(), None) {
        Ok(mut ev) => {
            // Only an inbox is a reply address: anything else is ignored (see `is_inbox`).
            ev.reply_to = msg.reply.map(|r| r.to_string()).filter(|r| super::is_inbox(r));
            Delivery::once(Arc::new(ev))
        }
        Err(why) => Delivery { defect: Some(why), ..Delivery::once(Arc::new(Event::new(subject, msg.payload))) },
    })
}

/// Messages taken from the client that wait for room in the plugin's queue and budget, in
/// order, bounded in bytes (each at its buffered cost) and in count.
#[derive(Default)]
struct Waiting {
    deliveries: VecDeque<(Delivery, u32)>,
    bytes: u64,
    max_bytes: u64,
    plugin: Arc<str>,
    /// `plugbus_nats_core_dropped_total{plugin}`.
    dropped: Counter,
    /// Messages dropped since the pump last had room for one (logged when it starts and ends).
    dropping: u64,
}

impl Waiting {
    fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }

    fn front_cost(&self) -> Option<u32> {
        self.deliveries.front().map(|(_, cost)| *cost)
    }

    fn pop(&mut self) -> Delivery {
        let (delivery, cost) = self.deliveries.pop_front().expect("popped only when one waits");
        self.bytes -= u64::from(cost);
        delivery
    }

    /// Keeps `delivery` if it fits, else drops it (counted, logged when dropping starts and
    /// ends). The first one always fits: one larger than the whole budget waits for all of it.
    fn push(&mut self, delivery: Delivery, cost: u32) {
        let fits = self.deliveries.is_empty()
            || (self.bytes + u64::from(cost) <= self.max_bytes && self.deliveries.len() < MAX_WAITING);
        if !fits {
            if self.dropping == 0 {
                tracing::warn!(
                    plugin = %self.plugin, subject = %delivery.event.subject, event_id = %delivery.event.id,
                    waiting = self.deliveries.len(), waiting_bytes = self.bytes,
                    "core NATS message dropped: the plugin's queue and flow.buffer_mib are full, and as much again \
                     waits (core NATS is at-most-once; a durable subscription keeps what its plugin has no room for)"
                );
            }
            self.dropped.inc();
            self.dropping += 1;
            return;
        }
        if self.dropping > 0 {
            tracing::warn!(plugin = %self.plugin, dropped = self.dropping, "the plugin has room again after dropping core NATS messages");
            self.dropping = 0;
        }
        self.bytes += u64::from(cost);
        self.deliveries.push_back((delivery, cost));
    }
}
