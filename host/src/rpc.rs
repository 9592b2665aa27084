//! Request/reply: a plugin (or an API client) asks on a subject and waits for one reply.
//!
//! The pieces every side shares live here, so that neither the sandbox nor a transport needs to
//! know the other: [`RequestError`] (why no reply came), [`Requester`] (what the sandbox calls,
//! wired by the host to the transport), [`Replies`] (the in-memory reply slots of the embedded
//! bus, keyed by a token the host made), and [`reply_token`] (what a plugin sees as its event's
//! `reply-to`).
//!
//! A reply address is the host's own: on NATS an `_INBOX.…` subject, on the embedded bus a slot
//! token. A plugin never sees it: its event's `reply-to` is an opaque token derived from it
//! ([`reply_token`]), and its `reply` is accepted only for the event it is handling. Showing the
//! inbox would hand untrusted code a capability: whoever knows an inbox can answer in the
//! requester's place (a plugin could pass it out through a log line or an outbound call).

use crate::event::Event;
use async_trait::async_trait;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use tokio::sync::oneshot;

/// The longest timeout `POST /v1/request/{subject}` accepts, and its default.
pub const API_MAX_TIMEOUT: Duration = Duration::from_secs(60);
/// See [`API_MAX_TIMEOUT`].
pub const API_DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// How many requests may wait for a reply at once on one embedded bus (plugins' and the API's):
/// every slot is bounded by its timeout, and this bounds them all.
pub const MAX_PENDING_REQUESTS: usize = 65_536;

/// The host's header on a plugin's request: the plugins the chain of requests it belongs to
/// passed through, itself last (`p,q`: p's handler asked q, whose handler asks now). A plugin
/// whose deliveries hold its buffer takes a request that passed through it up to three times
/// its buffer, ahead of what waits (`Overflow::bound_for` on the embedded bus): one of its
/// deliveries waits for the chain's reply, and waiting for room it holds would wait for itself.
/// Reserved (`plugbus-`): no plugin or API client sets it, and one a NATS message carries is
/// dropped as it comes in (`cloudevents::TRANSPORT_HEADERS`); the bus reads it only on a
/// plugin's request.
pub const ASKED_THROUGH: &str = "plugbus-asked-through";

/// Most plugins an [`ASKED_THROUGH`] chain names: with plugin names of at most 64 bytes, the
/// header stays within about 4 KiB, whatever a request from NATS carried in.
const MAX_ASKED_THROUGH: usize = 64;

/// The [`ASKED_THROUGH`] chain of a request `plugin` makes while it runs a request whose chain
/// is `chain` (`None`: it runs an event, not a request of a plugin): each plugin once, what is
/// not a plugin name left out, the first 63 kept ([`MAX_ASKED_THROUGH`] with `plugin`), and
/// `plugin` last.
pub fn asked_through(chain: Option<&str>, plugin: &str) -> String {
    let mut names: Vec<&str> = Vec::new();
    for name in chain.into_iter().flat_map(|c| c.split(',')) {
        if names.len() + 1 == MAX_ASKED_THROUGH {
            break;
        }
        if name != plugin && crate::manifest::valid_plugin_name(name) && !names.contains(&name) {
            names.push(name);
        }
    }
    names.push(plugin);
    names.join(",")
}

/// Whether the request `event`'s chain passed through `plugin` (see [`ASKED_THROUGH`]).
pub fn passed_through(event: &Event, plugin: &str) -> bool {
    event.header(ASKED_THROUGH).is_some_and(|chain| chain.split(',').any(|n| n == plugin))
}

/// Why a request got no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No reply within the timeout.
    #[error("no reply on {subject} within {}", humantime::format_duration(*.after))]
    Timeout {
        /// The subject asked on.
        subject: String,
        /// How long the requester waited.
        after: Duration,
    },
    /// Nobody subscribes to the subject.
    #[error("no responders: nothing subscribes to {0}")]
    NoResponders(String),
    /// The transport could not take the request now (a full queue, a reply that is no event,
    /// over the server's `max_payload`): possibly the handler's doing.
    #[error("request not sent: {0}")]
    Unavailable(String),
    /// The broker failed it (not connected, its reply inbox could not be subscribed): the host's
    /// failure, never the handler's. An attempt that fails after it counts as the host's
    /// (review 60d M2: during an outage, plugins that make requests spent their tries and were
    /// dead-lettered as their handlers' failures).
    #[error("request not sent: {0}")]
    Broker(String),
}

/// What sends a plugin's request and waits for its reply: the host wires it to the transport.
#[async_trait]
pub trait Requester: Send + Sync {
    /// Publishes `event` with a reply address the transport makes, and waits up to `timeout`
    /// for one reply (its subject: the one asked on).
    async fn request(&self, event: Event, timeout: Duration) -> Result<Event, RequestError>;
}

/// A requester that refuses every request (before the host wires one: reading a manifest).
pub struct NoRequests;

#[async_trait]
impl Requester for NoRequests {
    async fn request(&self, event: Event, _timeout: Duration) -> Result<Event, RequestError> {
        Err(RequestError::Unavailable(format!("no bus to send the request on {} through", event.subject)))
    }
}

/// A transport as a [`Requester`]: a plugin's request is an output (it never waits on a
/// queue: a plugin asking itself would wait on its own capacity).
pub struct TransportRequester(pub Arc<dyn crate::transport::Transport>);

#[async_trait]
impl Requester for TransportRequester {
    async fn request(&self, event: Event, timeout: Duration) -> Result<Event, RequestError> {
        self.0.request(event, timeout, false).await
    }
}

/// The token a plugin sees as the `reply-to` of an event whose real reply address is `address`:
/// opaque (the address is not recoverable from it) and stable across the event's retries.
pub fn reply_token(address: &str) -> String {
    let digest = Sha256::digest(address.as_bytes());
    let mut token = String::from("reply-");
    for b in &digest[..12] {
        token.push_str(&format!("{b:02x}"));
    }
    token
}

/// The embedded bus's reply slots: one per request waiting, keyed by a host-made token, removed
/// when the reply arrives or the requester stops waiting. A reply to a token no one waits on
/// (the requester timed out, or another responder answered first) is dropped and counted.
#[derive(Default)]
pub struct Replies {
    slots: Mutex<HashMap<String, oneshot::Sender<Event>>>,
    /// Requests whose requester stopped waiting without a reply (timed out, or went away) while
    /// a delivery of theirs may still wait: those deliveries are not run.
    abandoned: Mutex<Abandoned>,
    /// Replies that found no one waiting.
    pub dropped: AtomicU64,
}

/// Tokens of requests given up without a reply, each with its request (not kept alive): a
/// token is needed only while a delivery of its request holds the request, so one whose request
/// is gone is forgotten. Kept are thus at most as many as the bus's queues hold requests, and
/// those gone are swept once they are as many as those kept. (Review 56c M3: the newest 65,536
/// tokens of the whole host were kept, so a plugin asking itself with 1 ms timeouts pushed out
/// every other plugin's and API client's, and their stale requests ran.)
#[derive(Default)]
struct Abandoned {
    tokens: HashMap<String, Weak<Event>>,
    /// The count at which the next insert sweeps out the tokens whose request is gone.
    sweep_at: usize,
}

/// The fewest tokens [`Abandoned`] holds before it sweeps.
const ABANDONED_SWEEP_FLOOR: usize = 1024;

impl Abandoned {
    fn insert(&mut self, token: String, request: Weak<Event>) {
        if request.strong_count() == 0 {
            return;
        }
        if self.tokens.len() >= self.sweep_at {
            self.tokens.retain(|_, request| request.strong_count() > 0);
            self.sweep_at = (2 * self.tokens.len()).max(ABANDONED_SWEEP_FLOOR);
        }
        self.tokens.insert(token, request);
    }

    fn contains(&self, token: &str) -> bool {
        self.tokens.get(token).is_some_and(|request| request.strong_count() > 0)
    }
}

/// One waiting request's slot; dropping it removes the slot.
pub struct Slot {
    /// The reply address the request carries.
    pub token: String,
    rx: Option<oneshot::Receiver<Event>>,
    replies: Arc<Replies>,
    /// The request, once sent ([`Slot::sent`]): given up, its token is kept while it lives.
    request: Weak<Event>,
}

impl Replies {
    /// Opens a slot, or refuses when [`MAX_PENDING_REQUESTS`] wait already.
    pub fn open(self: &Arc<Self>) -> Result<Slot, RequestError> {
        let token = format!("_INBOX.plugbus.{}", crate::event::new_id());
        let (tx, rx) = oneshot::channel();
        let mut slots = self.slots.lock().expect("reply slots poisoned");
        if slots.len() >= MAX_PENDING_REQUESTS {
            return Err(RequestError::Unavailable(format!(
                "{MAX_PENDING_REQUESTS} requests are waiting for replies already"
            )));
        }
        slots.insert(token.clone(), tx);
        Ok(Slot { token, rx: Some(rx), replies: self.clone(), request: Weak::new() })
    }

    /// Hands `reply` to the request waiting on `token`; `false` (and counted) when none waits.
    pub fn answer(&self, token: &str, reply: Event) -> bool {
        let waiting = self.slots.lock().expect("reply slots poisoned").remove(token);
        let taken = waiting.is_some_and(|tx| tx.send(reply).is_ok());
        if !taken {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        taken
    }

    /// Whether the requester of `token` gave up without a reply (its deliveries still queued
    /// need not run). A request answered by another plugin is not given up: its other
    /// subscribers take it as an event like any other.
    pub fn abandoned(&self, token: &str) -> bool {
        self.abandoned.lock().expect("abandoned requests poisoned").contains(token)
    }

    /// Requests waiting now.
    pub fn waiting(&self) -> usize {
        self.slots.lock().expect("reply slots poisoned").len()
    }
}

impl Slot {
    /// The request as its deliveries hold it: should the requester give up, its token is kept
    /// as given up for as long as one of them does. A slot whose request was never marked
    /// sent keeps nothing when given up.
    pub fn sent(&mut self, request: &Arc<Event>) {
        self.request = Arc::downgrade(request);
    }

    /// Removes the slot of a request that went to no one: nothing of it is queued, so it is not
    /// kept as given up (that would push out tokens whose deliveries still wait).
    pub fn withdraw(self) {
        self.replies.slots.lock().expect("reply slots poisoned").remove(&self.token);
    }

    /// Waits up to `timeout` for the reply.
    pub async fn wait(mut self, subject: &str, timeout: Duration) -> Result<Event, RequestError> {
        let rx = self.rx.take().expect("a slot is waited on once");
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            // The sender went away without a reply: only when the slot was removed, i.e. never
            // while we hold it; read as a timeout anyway.
            Ok(Err(_)) | Err(_) => Err(RequestError::Timeout { subject: subject.to_string(), after: timeout }),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let unanswered = self.replies.slots.lock().expect("reply slots poisoned").remove(&self.token).is_some();
        if unanswered {
            let request = std::mem::take(&mut self.request);
            let token = std::mem::take(&mut self.token);
            self.replies.abandoned.lock().expect("abandoned requests poisoned").insert(token, request);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_given_up_without_a_reply_is_abandoned_and_an_answered_one_is_not() {
        let replies = Arc::new(Replies::default());
        let answered = replies.open().unwrap();
        let token = answered.token.clone();
        assert!(replies.answer(&token, Event::new("q", "r")));
        answered.wait("q", Duration::from_secs(1)).await.unwrap();
        assert!(!replies.abandoned(&token), "answered by one plugin: the others still take it");
        let mut timed_out = replies.open().unwrap();
        let token = timed_out.token.clone();
        let request = Arc::new(Event::new("q", ""));
        timed_out.sent(&request);
        assert!(!replies.abandoned(&token), "still waiting");
        assert!(timed_out.wait("q", Duration::from_millis(1)).await.is_err());
        assert!(replies.abandoned(&token));
        // a request that went to no one is not kept as given up
        let refused = replies.open().unwrap();
        let withdrawn = refused.token.clone();
        refused.withdraw();
        assert!(!replies.abandoned(&withdrawn));
        // Review 56c M3: a flood of requests given up (a plugin asking itself with 1 ms
        // timeouts) forgets none whose request a delivery still holds: here `request`.
        let mut flood = Vec::new();
        for _ in 0..100_000 {
            let mut slot = replies.open().unwrap();
            let request = Arc::new(Event::new("q", ""));
            slot.sent(&request);
            drop(slot);
            flood.push(request);
            if flood.len() == 4096 {
                flood.clear();
            }
        }
        assert!(replies.abandoned(&token), "pushed out by other requests given up");
        let kept = replies.abandoned.lock().unwrap().tokens.len();
        assert!(kept <= 3 * 4096 + ABANDONED_SWEEP_FLOOR, "kept {kept}: those whose request is gone are swept");
        // Once no delivery holds the request, its token is forgotten.
        drop(request);
        assert!(!replies.abandoned(&token));
    }

    #[tokio::test]
    async fn a_reply_reaches_its_slot_once_and_a_late_one_is_dropped_and_counted() {
        let replies = Arc::new(Replies::default());
        let slot = replies.open().unwrap();
        let token = slot.token.clone();
        assert!(replies.answer(&token, Event::new("q", "first")));
        assert!(!replies.answer(&token, Event::new("q", "second")), "a second reply found a slot");
        assert_eq!(slot.wait("q", Duration::from_secs(1)).await.unwrap().data, "first");
        assert_eq!(replies.dropped.load(Ordering::Relaxed), 1);

        let slot = replies.open().unwrap();
        let token = slot.token.clone();
        let err = slot.wait("q", Duration::from_millis(20)).await.unwrap_err();
        assert!(matches!(err, RequestError::Timeout { .. }), "{err}");
        assert_eq!(replies.waiting(), 0, "a timed-out slot stays");
        assert!(!replies.answer(&token, Event::new("q", "late")));
        assert_eq!(replies.dropped.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn the_token_a_plugin_sees_does_not_show_the_inbox() {
        let t = reply_token("_INBOX.abc.def");
        assert!(t.starts_with("reply-") && !t.contains("INBOX"), "{t}");
        assert_eq!(t, reply_token("_INBOX.abc.def"));
        assert_ne!(t, reply_token("_INBOX.abc.deg"));
    }
}
