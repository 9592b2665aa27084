//! Core NATS subscriptions: one queue subscription per pattern, in the plugin's queue group,
//! so each event is handled once per plugin across every host. At-most-once: a message in
//! flight when a host dies is gone (use a durable subscription for at-least-once).
//!
//! A pump never waits while the server hands over messages: whatever it waits on, the client
//! buffers for it (async-nats holds up to 65,536 messages per subscription, of up to
//! `max_payload` each: 64 GiB at 1 MiB). It takes every message at once; what the plugin's
//! queue and budget have no room for waits in the pump, charged to the feed's second budget
//! (`Intake::waiting`: `flow.buffer_mib` again, shared by the feed's pumps, each message at
//! its size on the wire), and what does not fit there is dropped unread, counted
//! (`plugbus_nats_core_dropped_total{plugin}`) and logged: core NATS is at-most-once, and a
//! full consumer is where it drops.

use super::budget::{Budget, Intake};
use super::{Filter, wire};
use crate::deadletter::headers::REPLAY_ACK;
use crate::event::BUFFERED_ENTRY_COST;
use crate::transport::Delivery;
use async_nats::{Client, Message, Subscriber};
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::sync::OwnedSemaphorePermit;

/// Moves messages from the subscription into the plugin's queue until either closes. A message
/// the plugin's patterns do not reach by plugbus's rule (the server gives `>` subscribers `$`
/// subjects, `_INBOX` replies and other plugins' dead letters) is dropped unrun: see
/// [`Filter`]. One the plugin has no room for, even waiting, is dropped and counted in
/// `dropped`.
///
/// A replay that asks to be answered once taken ([`REPLAY_ACK`]) is answered on `answers` when
/// it goes into the plugin's queue (not while it waits in the pump, which drops what waits when
/// it ends, nor when it is dropped); by the pump of the plugin it is for, when it names one
/// (another plugin would let it go unrun).
pub async fn pump(mut sub: Subscriber, intake: Intake, filter: Filter, dropped: Counter, answers: Client) {
    let mut waiting = Waiting { deliveries: VecDeque::new(), plugin: filter.plugin.clone(), dropped, dropping: 0 };
    loop {
        let front = waiting.front_cost();
        tokio::select! {
            biased;
            ready = intake.ready(front.unwrap_or(0)), if front.is_some() => {
                let Some(slot) = ready else { return };
                let (delivery, answer) = waiting.pop();
                slot.send(delivery);
                taken(&answers, answer, &filter.plugin).await;
            }
            msg = sub.next() => {
                let Some(msg) = msg else { return };
                if !filter.admits(&msg.subject) {
                    continue;
                }
                let wire_cost = wire_cost(&msg);
                let inbox = replay_inbox(&msg);
                if !waiting.is_empty() {
                    // Behind others: it waits too, if there is room for it, or is dropped unread.
                    match intake.waiting.try_room(wire_cost) {
                        Some(room) => {
                            let delivery = delivery_of(msg);
                            let answer = answer_of(inbox, &delivery, &filter.plugin);
                            waiting.push(delivery, answer, &intake.budget, room);
                        }
                        None => waiting.drop_one(&msg.subject),
                    }
                    continue;
                }
                let delivery = delivery_of(msg);
                let answer = answer_of(inbox, &delivery, &filter.plugin);
                match intake.try_send(delivery) {
                    Ok(()) => {
                        waiting.caught_up();
                        taken(&answers, answer, &filter.plugin).await;
                    }
                    Err(Some(delivery)) => match intake.waiting.try_room(wire_cost) {
                        Some(room) => waiting.push(delivery, answer, &intake.budget, room),
                        None => waiting.drop_one(&delivery.event.subject),
                    },
                    Err(None) => return,
                }
            }
        }
    }
}

/// Where `msg` asks to be told it was taken ([`REPLAY_ACK`]: an inbox, nothing else). Read off
/// the message: the event read from it never carries it (`wire::event_of`).
fn replay_inbox(msg: &Message) -> Option<String> {
    let inbox = msg.headers.as_ref()?.get(REPLAY_ACK)?.as_str();
    super::is_inbox(inbox).then(|| inbox.to_string())
}

/// Where a replay taken into the queue is answered, and what with: (inbox, replayed event's id).
type Answer = (String, String);

/// The answer a delivery gets from `plugin`'s pump once in the queue: on `inbox`, the replayed
/// event's id, when it is a replay that could be read as an event (a message merely carrying the
/// header, or one dead-lettered unrun, is not answered) for this plugin, or for every subscriber
/// (the replay of an output); another plugin would let it go unrun.
fn answer_of(inbox: Option<String>, delivery: &Delivery, plugin: &str) -> Option<Answer> {
    use crate::deadletter::headers::REPLAY_OF;
    let ev = &delivery.event;
    let replay = delivery.defect.is_none() && ev.header(REPLAY_OF).is_some();
    let for_it = !crate::deadletter::is_replay_for_another(ev, plugin);
    inbox.filter(|_| replay && for_it).map(|inbox| (inbox, ev.id.clone()))
}

/// Says a replay was taken into `plugin`'s queue (its id on its inbox: the replayer takes no
/// other answer); a failed answer leaves the dead letter kept by its replayer, which gives up
/// waiting.
async fn taken(answers: &Client, answer: Option<Answer>, plugin: &str) {
    if let Some((inbox, id)) = answer
        && let Err(e) = answers.publish(inbox, bytes::Bytes::from(id)).await
    {
        tracing::warn!(plugin = %plugin,
            "a replay was taken but its replayer could not be told (it keeps the dead letter): {e}");
    }
}

/// What a message costs while it waits: its size on the wire (subject, reply, headers,
/// payload), 64 bytes a header, and the event's own record.
fn wire_cost(msg: &Message) -> u64 {
    let headers = msg.headers.as_ref().map_or(0, |h| h.iter().map(|(_, values)| values.len()).sum::<usize>());
    (msg.length as u64) + (headers as u64) * crate::kv::ENTRY_COST + BUFFERED_ENTRY_COST
}

/// The delivery of a message the plugin takes (its patterns reach it: see [`Filter`]).
fn delivery_of(msg: Message) -> Delivery {
    let subject = msg.subject.to_string();
    match wire::event_of(&subject, msg.headers.as_ref(), msg.payload.clone(), None) {
        Ok(mut ev) => {
            // Only an inbox is a reply address: anything else is ignored (see `is_inbox`).
            ev.reply_to = msg.reply.map(|r| r.to_string()).filter(|r| super::is_inbox(r));
            Delivery::once(Arc::new(ev))
        }
        Err(why) => {
            let raw = wire::undecodable(&subject, &msg.payload, None);
            Delivery { defect: Some(crate::fate::DeliveryError::Undecodable(why)), ..Delivery::once(Arc::new(raw)) }
        }
    }
}

/// Messages taken from the client that wait for room in the plugin's queue and budget, in
/// order, each holding its room in the feed's waiting budget.
struct Waiting {
    /// Each with its cost in the plugin's budget, its room in the waiting budget and, for a
    /// replay that asks, where to say it was taken (and its id).
    deliveries: VecDeque<(Delivery, u32, OwnedSemaphorePermit, Option<Answer>)>,
    plugin: Arc<str>,
    /// `plugbus_nats_core_dropped_total{plugin}`.
    dropped: Counter,
    /// Messages dropped since nothing waited (logged when dropping starts and when the pump has
    /// caught up: one line each, however a publisher interleaves large and small messages).
    dropping: u64,
}

impl Waiting {
    fn is_empty(&self) -> bool {
        self.deliveries.is_empty()
    }

    fn front_cost(&self) -> Option<u32> {
        self.deliveries.front().map(|(_, cost, ..)| *cost)
    }

    /// The first in line, and where to say it was taken; its room in the waiting budget comes
    /// back.
    fn pop(&mut self) -> (Delivery, Option<Answer>) {
        let (delivery, _, _room, answer) = self.deliveries.pop_front().expect("popped only when one waits");
        if self.deliveries.is_empty() {
            self.caught_up();
        }
        (delivery, answer)
    }

    /// Nothing waits in this pump any more: a burst of drops, if any, has ended.
    fn caught_up(&mut self) {
        if self.dropping > 0 {
            tracing::warn!(plugin = %self.plugin, dropped = self.dropping, "caught up after dropping core NATS messages");
            self.dropping = 0;
        }
    }

    /// Keeps `delivery` in line, with its `room` and where to say it was taken (`answer`).
    fn push(&mut self, delivery: Delivery, answer: Option<Answer>, budget: &Budget, room: OwnedSemaphorePermit) {
        let cost = budget.cost(&delivery);
        self.deliveries.push_back((delivery, cost, room, answer));
    }

    /// Drops a message on `subject` the plugin has no room for.
    fn drop_one(&mut self, subject: &str) {
        if self.dropping == 0 {
            tracing::warn!(
                plugin = %self.plugin, subject = %subject, waiting = self.deliveries.len(),
                "core NATS messages dropped: the plugin's queue and flow.buffer_mib are full, and as much again \
                 waits (core NATS is at-most-once; a durable subscription keeps what its plugin has no room for)"
            );
        }
        self.dropped.inc();
        self.dropping += 1;
    }
}

impl Drop for Waiting {
    /// A pump ends (its pattern unsubscribed, the plugin gone) with messages still in line:
    /// they are dropped, and counted.
    fn drop(&mut self) {
        if !self.deliveries.is_empty() {
            tracing::warn!(plugin = %self.plugin, dropped = self.deliveries.len(),
                "core NATS messages dropped: their subscription ended while they waited for room");
            self.dropped.inc_by(self.deliveries.len() as u64);
        }
    }
}
