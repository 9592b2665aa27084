//! A pump's pulls from its JetStream consumer, on one inbox the pump keeps across its pulls.
//!
//! A replicated consumer (R3, as production runs JetStream) ends a pull at its bytes with
//! `409 Batch Completed` *before* the pull's messages, which the server sends once the
//! consumer's replicas agree on them (seen with nats-server 2.15; a single server sends the
//! status last). async-nats's `batch()` closes its inbox at that status: the messages on their
//! way were dropped unread, delivered again only after `ack_wait`, out of order and a delivery
//! more each (one dropped at its `max_deliver` never ran). Here the inbox outlives the pull: a
//! message that comes after its pull's status is read like any other, and the pump reads the
//! pull's messages still on their way (the status says how many the pull did not bring:
//! `Nats-Pending-Messages`) before it asks again (waiting at most [`STRAGGLERS`] for each).

use super::consumer::Batch;
use crate::transport::TransportError;
use async_nats::StatusCode;
use async_nats::jetstream;
use futures::StreamExt;
use std::time::Duration;

/// How long one pull waits for messages before the server ends it (`408 Request Timeout`) and
/// the next is asked for (sized to the room then).
pub const PULL_EXPIRES: Duration = Duration::from_secs(5);

/// Past a pull's expiry, how long the pump waits for the status that ends it before it takes
/// the pull as lost (its request or its status went in a reconnect) and asks again.
pub const STATUS_GRACE: Duration = Duration::from_secs(2);

/// Once a status ended a pull whose messages are still on their way (a replicated consumer sends
/// them after it), how long the pump waits for each before it asks again anyway: the next pull
/// is sized to the room left once they are read.
pub const STRAGGLERS: Duration = Duration::from_secs(1);

/// The pump's inbox: every pull it asks for answers here, messages and statuses, each pull on
/// a subject of its own (`<inbox>.<n>`), so a status is known as its pull's: a status of a pull
/// given up earlier never ends a later one (which would leave two open at once, bringing twice
/// the room). A message comes with its stream subject, not the inbox's: it says no pull.
pub struct Inbox {
    js: jetstream::Context,
    prefix: String,
    incoming: async_nats::Subscriber,
    /// The number of the last pull asked for.
    pulls: u64,
}

/// What came on the inbox. Returned and matched at once, so the message is not boxed (that
/// would be an allocation per message).
#[allow(clippy::large_enum_variant)]
pub enum Came {
    /// A message of the consumer's.
    Message(jetstream::Message),
    /// A status the server ended a pull with: the pull's number (`None`: not one of this
    /// inbox's), its code and description (`PullEnd::of` reads it), and how many messages the
    /// pull asked for and did not bring (`None`: not said).
    Status(Option<u64>, String, Option<usize>),
}

impl Inbox {
    /// Subscribes a new inbox of `js`'s client.
    pub async fn open(js: &jetstream::Context) -> Result<Self, TransportError> {
        let client = js.client();
        let prefix = client.new_inbox();
        // A message the client cannot read comes on marked (review 62a): dropped, it was never
        // settled, came back every `ack_wait` up to `max_deliver`, and each pull that brought it
        // waited a second for it. It is dead-lettered as malformed (`HeldMessage::delivery`).
        let incoming = client
            .subscribe_keeping_unreadable(format!("{prefix}.*"))
            .await
            .map_err(|e| TransportError::Broker(format!("subscribing the inbox JetStream pulls answer on: {e}")))?;
        Ok(Self { js: js.clone(), prefix, incoming, pulls: 0 })
    }

    /// The number of the last pull asked for.
    pub fn pull(&self) -> u64 {
        self.pulls
    }

    /// Asks `consumer` on `stream` for `batch`, answered here until [`PULL_EXPIRES`]: the pull
    /// [`Self::pull`] numbers.
    pub async fn ask(&mut self, stream: &str, consumer: &str, batch: Batch) -> Result<(), TransportError> {
        self.pulls += 1;
        let request = serde_json::json!({
            "batch": batch.messages,
            "max_bytes": batch.bytes,
            "expires": u64::try_from(PULL_EXPIRES.as_nanos()).unwrap_or(u64::MAX),
        });
        self.js
            .client()
            .publish_with_reply(
                format!("$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"),
                format!("{}.{}", self.prefix, self.pulls),
                request.to_string().into(),
            )
            .await
            .map_err(|e| {
                TransportError::Broker(format!("asking consumer {consumer} on stream {stream} for messages: {e}"))
            })
    }

    /// The next message or status (heartbeats passed over); `None` once the client closed.
    pub async fn next(&mut self) -> Option<Came> {
        loop {
            let message = self.incoming.next().await?;
            return Some(match message.status {
                // A consumer's message comes with its stream subject; one on the inbox itself was
                // published there by someone, its reply an ack subject of their choosing (review
                // 60d L2: the host acked or nak'ed other consumers' messages with its credentials).
                None | Some(StatusCode::OK) if !from_the_consumer(&self.prefix, &message.subject) => {
                    tracing::warn!(inbox = %self.prefix, "a message published onto a JetStream pull's inbox (not the consumer's): dropped unsettled");
                    continue;
                }
                None | Some(StatusCode::OK) => Came::Message(jetstream::Message { message, context: self.js.clone() }),
                Some(StatusCode::IDLE_HEARTBEAT) => continue,
                Some(status) => {
                    let not_brought = message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("Nats-Pending-Messages"))
                        .and_then(|n| n.as_str().parse().ok());
                    let pull = message.subject.rsplit('.').next().and_then(|n| n.parse().ok());
                    Came::Status(pull, format!("{status}, {:?}", message.description), not_brought)
                }
            });
        }
    }
}

/// Whether a message (not a status) that came on the inbox `prefix` is the consumer's: the
/// server sends a consumer's messages with their stream subject, never the inbox's.
fn from_the_consumer(prefix: &str, subject: &str) -> bool {
    !subject.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

#[cfg(test)]
mod forged_tests {
    use super::from_the_consumer;

    #[test]
    fn a_message_on_the_inbox_itself_is_not_the_consumers() {
        let prefix = "_INBOX.abc";
        assert!(from_the_consumer(prefix, "orders.created"));
        assert!(from_the_consumer(prefix, "_INBOX.abcd.1"), "another inbox is a subject like any");
        assert!(!from_the_consumer(prefix, "_INBOX.abc.1"));
        assert!(!from_the_consumer(prefix, "_INBOX.abc"));
    }
}
