//! Core NATS subscriptions: one queue subscription per pattern, in the plugin's queue group,
//! so each event is handled once per plugin across every host. At-most-once: a message in
//! flight when a host dies is gone (use a durable subscription for at-least-once).

use super::budget::Intake;
use super::{Filter, wire};
use crate::event::Event;
use crate::transport::Delivery;
use async_nats::Subscriber;
use futures::StreamExt;
use std::sync::Arc;

/// Moves messages from the subscription into the plugin's queue until either closes. A message
/// the plugin's patterns do not reach by plugbus's rule (the server gives `>` subscribers `$`
/// subjects, `_INBOX` replies and other plugins' dead letters) is dropped unrun: see
/// [`Filter`].
pub async fn pump(mut sub: Subscriber, intake: Intake, filter: Filter) {
    while let Some(msg) = sub.next().await {
        let subject = msg.subject.to_string();
        if !filter.admits(&subject) {
            continue;
        }
        let delivery = match wire::event_of(&subject, msg.headers.as_ref(), msg.payload.clone(), None) {
            Ok(mut ev) => {
                // Only an inbox is a reply address: anything else is ignored (see `is_inbox`).
                ev.reply_to = msg.reply.map(|r| r.to_string()).filter(|r| super::is_inbox(r));
                Delivery::once(Arc::new(ev))
            }
            Err(why) => Delivery { defect: Some(why), ..Delivery::once(Arc::new(Event::new(subject, msg.payload))) },
        };
        if !intake.send(delivery).await {
            break;
        }
    }
}
