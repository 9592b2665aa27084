//! The NATS transport: the host joins a NATS deployment instead of running the embedded bus.
//!
//! - A plain subscription becomes core NATS queue subscriptions ([`queue_group`]): each event is
//!   handled once per plugin across every host, at most once.
//! - A durable subscription (manifest `durable`, or `[plugins.NAME] durable = true`) becomes a
//!   JetStream durable pull consumer per stream ([`consumer`]): at least once, acked only after
//!   the handler returned Ok and JetStream acknowledged every output.
//! - A publish to a subject some stream captures waits for the stream's ack and carries a
//!   `Nats-Msg-Id` made from the event's source and id, producers' events apart from the
//!   host's ([`wire::msg_id`]): a redelivered input does not duplicate its outputs, and no
//!   client's event can pass for an output.
//! - Messages are CloudEvents in the NATS binding ([`wire`]).

mod brought;
mod budget;
mod consumer;
pub mod dead_letters;
mod filter;
pub mod kv;
mod kv_room;
mod narrowing;
mod pull;
mod queue_group;
mod replay_claims;
mod streams;
mod tails;
mod unreadable;
mod watched;
pub mod wire;

use crate::deadletter::headers::DATA_OMITTED;
use crate::event::Event;
use crate::metrics::PluginLabels;
use crate::subject::{PatternSet, validate_subject, without_covered};
use crate::transport::{Observed, Subscription, SubscriptionSpec, Transport, TransportError};
use async_nats::jetstream;
use async_trait::async_trait;
pub use filter::{Filter, Pulled};
use futures::StreamExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;
use streams::StreamIndex;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Joins NATS as `[nats]` says; plugin kv lives in JetStream KV, shared by every host running
/// the plugin.
pub async fn open(config: &crate::config::Config) -> anyhow::Result<super::Backend> {
    use anyhow::Context;
    let url = config.nats.url.as_deref().unwrap_or("(no nats.url)");
    let mut nats = NatsTransport::connect(&config.nats).await.with_context(|| format!("joining NATS at {url}"))?;
    nats.dead_letter_subjects =
        config.plugins.iter().filter_map(|(name, p)| Some((name.clone(), p.dead_letter.clone()?))).collect();
    let kv = Arc::new(kv::JetStreamKv::new(nats.jetstream().clone()));
    Ok(super::Backend { transport: Arc::new(nats), kv })
}

/// Whether `subject` is a request's reply inbox (`_INBOX.…`, what NATS clients make by
/// default): the only reply address a message from NATS may give a plugin's reply. A publisher
/// setting `reply` to an ordinary subject cannot steer a plugin's reply onto it (past the
/// plugin's `publishes`, with the host's credentials).
pub fn is_inbox(subject: &str) -> bool {
    subject.strip_prefix("_INBOX.").is_some_and(|rest| !rest.is_empty()) && validate_subject(subject).is_ok()
}

/// The event a reply message carries, on the subject that was asked (the inbox is the host's
/// and never reaches a plugin), with no reply address of its own. A message on another subject
/// than the request's `inbox` is no reply (review 61e F1: a client that misread a publisher's
/// subject delivered it to the inbox's subscription, a forged answer).
fn reply_event(subject: String, inbox: &str, msg: async_nats::Message) -> Result<Event, crate::rpc::RequestError> {
    if msg.subject.as_str() != inbox {
        return Err(crate::rpc::RequestError::Unavailable(format!(
            "requesting on {subject}: a message on {} came to the reply inbox {inbox}, not a reply",
            crate::event::quoted(msg.subject.as_str())
        )));
    }
    let mut reply = wire::event_of(&subject, msg.headers.as_ref(), msg.payload, None).map_err(|why| {
        crate::rpc::RequestError::Unavailable(format!("the reply on {subject} is not a valid event: {why}"))
    })?;
    reply.subject = subject;
    reply.reply_to = None;
    Ok(reply)
}

/// A stream the operator declares; the host creates it or updates its subjects.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamDef {
    /// The subjects it captures.
    pub subjects: Vec<String>,
}

/// How to reach NATS, and JetStream defaults (`[nats]` in the config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsSettings {
    /// Server URL(s), comma-separated; unset runs the embedded bus.
    pub url: Option<String>,
    /// A `.creds` file (JWT + NKey).
    pub creds: Option<PathBuf>,
    /// A PEM file of CA certificates to trust; turns TLS on.
    pub tls_ca: Option<PathBuf>,
    /// User name (with `password`).
    pub user: Option<String>,
    /// Password.
    pub password: Option<String>,
    /// Auth token.
    pub token: Option<String>,
    /// Connection name shown by the server.
    pub name: String,
    /// How long JetStream waits for a settlement before redelivering.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// How long a publish waits for a stream's ack.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Create a stream when a durable subscription's subjects are in none.
    pub auto_streams: bool,
    /// Duplicate window of the streams the host creates (outputs are deduplicated inside it).
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Streams to create (or whose subjects to update) at start.
    pub streams: BTreeMap<String, StreamDef>,
}

impl Default for NatsSettings {
    fn default() -> Self {
        Self {
            url: None,
            creds: None,
            tls_ca: None,
            user: None,
            password: None,
            token: None,
            name: "plugbus".into(),
            ack_wait: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(5),
            auto_streams: true,
            duplicate_window: Duration::from_secs(120),
            streams: BTreeMap::new(),
        }
    }
}

/// Aborts a task when dropped.
pub(super) struct Task(pub(super) JoinHandle<()>);

impl Drop for Task {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What feeds one plugin's queue now.
struct Feed {
    intake: budget::Intake,
    filter: Filter,
    /// Core messages dropped because the plugin had no room (see `queue_group`).
    dropped: Counter,
    /// The patterns it takes (the last spec applied whole).
    patterns: Vec<String>,
    /// Core pattern → its queue subscription.
    core: HashMap<String, Task>,
    /// Stream → its pull consumer pump.
    durable: HashMap<String, Pump>,
    /// The consumers the last retarget widened, narrowed once what they held is settled.
    narrowing: Option<narrowing::Narrowing>,
}

/// A durable consumer's pump, and the spec it re-creates the consumer from.
struct Pump {
    spec: consumer::SharedSpec,
    _task: Task,
}

impl Pump {
    /// The spec as it is now.
    fn spec(&self) -> consumer::ConsumerSpec {
        self.spec.read().expect("spec poisoned").clone()
    }
}

/// The host's NATS connection.
pub struct NatsTransport {
    client: async_nats::Client,
    js: jetstream::Context,
    settings: NatsSettings,
    connected: Arc<AtomicBool>,
    index: Arc<StreamIndex>,
    held: Arc<consumer::Held>,
    feeds: Arc<tokio::sync::Mutex<HashMap<u64, Feed>>>,
    next_id: AtomicU64,
    /// `plugbus_nats_core_dropped_total{plugin}`: core messages a plugin had no room for.
    core_dropped: Family<PluginLabels, Counter>,
    /// The live tails' connection ([`tails`]).
    tails: tails::Tails,
    /// Which host replays a kept dead letter now ([`replay_claims`]).
    replay_claims: replay_claims::ReplayClaims,
    /// The dead-letter subjects the operator set: a dead letter is its plugin's only on its own.
    dead_letter_subjects: dead_letters::Subjects,
    _background: Vec<Task>,
}

impl NatsTransport {
    /// A request on a subject a JetStream stream captures: the stream's publish ack would take
    /// the NATS reply subject, so the request is stored with its inbox in [`wire::REPLY_TO`]
    /// (the durable consumer hands it to the plugin's delivery as its reply address) and the
    /// reply is awaited on that inbox. Stored means no "no responders": a request nobody
    /// answers within `timeout` (publish ack included) is a timeout; a consumer that takes it
    /// later answers an inbox nobody reads.
    async fn request_stored(
        &self,
        subject: String,
        mut headers: async_nats::HeaderMap,
        payload: bytes::Bytes,
        timeout: Duration,
    ) -> Result<Event, crate::rpc::RequestError> {
        use crate::rpc::RequestError;
        let unavailable =
            |what: String| RequestError::Unavailable(format!("requesting on {subject} over JetStream: {what}"));
        let inbox = self.client.new_inbox();
        // Subscribed before the publish, on the same connection: the reply cannot come first.
        let mut replies = self.client.subscribe(inbox.clone()).await.map_err(|e| {
            RequestError::Broker(format!("requesting on {subject} over JetStream: subscribing its reply inbox: {e}"))
        })?;
        headers.insert(wire::REPLY_TO, inbox.as_str());
        // A request is asked once per ask: its `Nats-Msg-Id` is the ask's (its inbox), not the
        // event's source and id, which a client asking again after a timeout keeps (JetStream
        // dropped that ask as a duplicate, and nobody was asked).
        headers.insert(wire::MSG_ID, format!("req-{inbox}").as_str());
        let asked = async {
            let ack = self
                .js
                .publish_with_headers(subject.clone(), headers, payload)
                .await
                .map_err(|e| unavailable(e.to_string()))?;
            let ack = ack.await.map_err(|e| unavailable(format!("the stream did not take it: {e}")))?;
            if ack.duplicate {
                return Err(unavailable("the stream already holds this request (a duplicate): nobody is asked".into()));
            }
            replies.next().await.ok_or_else(|| {
                RequestError::Broker(format!("requesting on {subject} over JetStream: the reply subscription closed"))
            })
        };
        let msg = match tokio::time::timeout(timeout, asked).await {
            Ok(reply) => reply?,
            Err(_) => return Err(RequestError::Timeout { subject, after: timeout }),
        };
        reply_event(subject, &inbox, msg)
    }

    /// Publishes the replay of a dead letter to a subject no stream captures, and returns once a
    /// host's plugin took it into its queue ([`crate::deadletter::headers::REPLAY_ACK`]): a core
    /// publish the server accepted may still be dropped by a consumer with no room, and the dead
    /// letter is forgotten once this returns. Waits as long as it takes: the replay's caller
    /// bounds it (`api.publish_timeout`), and then keeps the dead letter (should the answer
    /// come later, a later replay runs it again: twice rather than never).
    async fn publish_replay_taken(&self, event: &Event, origin: wire::Origin) -> Result<(), TransportError> {
        validate_subject(&event.subject)?;
        let inbox = self.client.new_inbox();
        let mut taken = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| TransportError::Broker(format!("subscribing to the replay's answer on NATS: {e}")))?;
        let (mut headers, payload) = wire::message_of(event, origin);
        headers.insert(crate::deadletter::headers::REPLAY_ACK, inbox.as_str());
        let subject = event.subject.clone();
        self.client
            .publish_with_headers(subject.clone(), headers, payload)
            .await
            .map_err(|e| TransportError::Broker(format!("publishing to {subject} on NATS: {e}")))?;
        // Only an answer naming this replay counts (a message merely sent to the inbox does not).
        while let Some(answer) = taken.next().await {
            if answer.payload.as_ref() == event.id.as_bytes() {
                return Ok(());
            }
        }
        Err(TransportError::Closed(format!("the connection closed before a host took the replay on {subject}")))
    }

    /// Publishes `event`, made by `origin`; on a subject a stream captures, waits for the
    /// stream's ack.
    async fn publish_event(&self, event: &Event, origin: wire::Origin) -> Result<(), PublishFailure> {
        validate_subject(&event.subject).map_err(TransportError::from)?;
        let (headers, payload) = wire::message_of(event, origin);
        let subject = event.subject.clone();
        if self.index.captures(&subject) {
            let ack = self
                .js
                .publish_with_headers(subject.clone(), headers, payload)
                .await
                .map_err(|e| TransportError::Broker(format!("publishing to {subject} on JetStream: {e}")))?;
            let ack = ack.await.map_err(|e| PublishFailure {
                over_stream_limit: stream_limit_refusing(&e),
                error: TransportError::Broker(format!("JetStream did not acknowledge the event on {subject}: {e}")),
            })?;
            if ack.duplicate {
                tracing::debug!(subject = %subject, event_id = %event.id, "JetStream already had this event (duplicate dropped)");
            }
        } else {
            self.client
                .publish_with_headers(subject.clone(), headers, payload)
                .await
                .map_err(|e| TransportError::Broker(format!("publishing to {subject} on NATS: {e}")))?;
        }
        Ok(())
    }

    /// Publishes a dead letter this host's store kept whole, whole if the broker takes it, else
    /// without what it cannot take, step by step ([`Omit`]), marked [`DATA_OMITTED`] with what
    /// was left out and why. Two limits refuse it: the server's `max_payload` (its event's data
    /// near or over it: an input near it with the dead letter's headers on top, or a message
    /// stored through a server with a higher one), checked here, and what the stream that keeps
    /// it refuses (its `max_msg_size`, below `max_payload`: an operator's setting on
    /// `PLUGBUS_DLQ` or on a stream of their own; or a header block over 64 KiB, where the server
    /// checks it), learnt from its answer. Without this such a dead letter was never kept by the
    /// broker, and its input was `nak`ed until `max_deliver`, then left in its stream unhandled.
    async fn publish_dead_letter_within_limits(&self, event: &Event) -> Result<(), TransportError> {
        let max = self.client.server_info().max_payload;
        let size = wire_size(event);
        // Why the step before was refused: none yet.
        let mut why =
            (size > max).then(|| format!("they took it to {size} bytes, over the server's max_payload of {max}"));
        let mut refused = None;
        for omit in [None, Some(Omit::Data), Some(Omit::DataAndHeaders), Some(Omit::AllButTheHosts)] {
            let smaller;
            let candidate = match (omit, &why) {
                (None, None) => event,
                (None, Some(_)) | (Some(_), None) => continue,
                (Some(omit), Some(why)) => {
                    smaller = without_data(event, omit, why);
                    // A step still over max_payload is never sent (the client would refuse it).
                    if wire_size(&smaller) > max {
                        continue;
                    }
                    tracing::warn!(subject = %event.subject, event_id = %event.id, size, max_payload = max,
                        "a dead letter the broker does not take whole is published without {}: {why}",
                        omitted(&smaller));
                    &smaller
                }
            };
            match self.publish_event(candidate, wire::Origin::Host).await {
                Ok(()) => return Ok(()),
                Err(PublishFailure { over_stream_limit: Some(limit), error }) => {
                    why = Some(format!("the stream that keeps {} refused it as over its {limit}", event.subject));
                    refused = Some(error);
                }
                Err(failure) => return Err(failure.error),
            }
        }
        Err(refused.unwrap_or_else(|| {
            TransportError::Broker(format!(
                "dead letter of {size} bytes: over the server's max_payload of {max} even without its data, the \
                 event's own headers, and with the host's own cut"
            ))
        }))
    }

    /// Connects, declares the configured streams and reads which subjects streams capture.
    pub async fn connect(settings: &NatsSettings) -> Result<Self, TransportError> {
        let connected = Arc::new(AtomicBool::new(false));
        let flag = connected.clone();
        let client = connect_as(settings, &settings.name, None, move |event| on_event(&flag, event)).await?;
        connected.store(true, Ordering::Relaxed);
        let js = jetstream::ContextBuilder::new().timeout(settings.publish_timeout).build(client.clone());
        let index = Arc::new(StreamIndex::default());
        if !settings.streams.is_empty() {
            streams::declare(&js, settings).await?;
        }
        if let Err(e) = index.refresh(&js).await {
            tracing::warn!("JetStream is not available, only core NATS will work: {e}");
        }
        let held = Arc::new(consumer::Held::new(settings.ack_wait));
        let keep_alive = Task(tokio::spawn(held.clone().keep_alive(client.clone())));
        let refresh = {
            let (js, index) = (js.clone(), index.clone());
            Task(tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    if let Err(e) = index.refresh(&js).await {
                        tracing::debug!("refreshing the JetStream stream list: {e}");
                    }
                }
            }))
        };
        tracing::info!(url = %settings.url.as_deref().unwrap_or_default(), server = %client.server_info().version, "connected to NATS");
        let replay_claims = replay_claims::ReplayClaims::new(js.clone());
        Ok(Self {
            client,
            js,
            settings: settings.clone(),
            connected,
            index,
            held,
            feeds: Default::default(),
            next_id: AtomicU64::new(1),
            core_dropped: Default::default(),
            tails: Default::default(),
            replay_claims,
            dead_letter_subjects: Default::default(),
            _background: vec![keep_alive, refresh],
        })
    }
}

/// Returns once the server has processed everything `client` sent before (so its subscriptions
/// are registered): a message to its own inbox comes back only after that.
async fn registered_on(client: &async_nats::Client) -> Result<(), TransportError> {
    let broker =
        |e: &dyn std::fmt::Display| TransportError::Broker(format!("confirming a subscription with NATS: {e}"));
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await.map_err(|e| broker(&e))?;
    client.publish(inbox, bytes::Bytes::new()).await.map_err(|e| broker(&e))?;
    match tokio::time::timeout(Duration::from_secs(10), echo.next()).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(broker(&"the subscription closed")),
        Err(_) => Err(broker(&"no echo from the server within 10 s")),
    }
}

/// A connection to the configured server named `name` (as the server lists it), telling
/// `on_event` of its connection events; each subscription holds `subscription_capacity`
/// messages at most (async-nats's default, 65,536, when `None`).
async fn connect_as(
    settings: &NatsSettings,
    name: &str,
    subscription_capacity: Option<usize>,
    on_event: impl Fn(async_nats::Event) + Send + Sync + 'static,
) -> Result<async_nats::Client, TransportError> {
    let url = settings.url.clone().ok_or_else(|| TransportError::Broker("no NATS url configured".into()))?;
    let on_event = Arc::new(on_event);
    let mut options = async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .event_callback(move |event| {
            let on_event = on_event.clone();
            async move { on_event(event) }
        });
    if let Some(capacity) = subscription_capacity {
        options = options.subscription_capacity(capacity);
    }
    if let Some(creds) = &settings.creds {
        options = options.credentials_file(creds).await.map_err(|e| {
            TransportError::Broker(format!("reading the NATS credentials file {}: {e}", creds.display()))
        })?;
    }
    if let Some(ca) = &settings.tls_ca {
        if !ca.is_file() {
            return Err(TransportError::Broker(format!("the NATS TLS CA file {} does not exist", ca.display())));
        }
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    match (&settings.user, &settings.password, &settings.token) {
        (Some(u), Some(p), _) => options = options.user_and_password(u.clone(), p.clone()),
        (Some(_), None, _) | (None, Some(_), _) => {
            return Err(TransportError::Broker("NATS user and password must be given together".into()));
        }
        (None, None, Some(t)) => options = options.token(t.clone()),
        _ => {}
    }
    options
        .connect(url.as_str())
        .await
        .map_err(|e| TransportError::Broker(format!("cannot connect to NATS at {url}: {e}")))
}

impl NatsTransport {
    /// The raw client (tests, the bench).
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// The JetStream context (the kv buckets use it).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    /// Returns once the server has processed everything this connection sent before (so its
    /// subscriptions are registered): a message to our own inbox comes back only after that.
    /// `Client::flush` is not enough: it only empties the client's buffer into the socket.
    async fn registered(&self) -> Result<(), TransportError> {
        registered_on(&self.client).await
    }

    /// Makes `feed` take exactly what `spec` asks for: core subscriptions or durable consumers.
    /// All or nothing: while it changes, the feed takes what either the version serving or
    /// `spec` names (neither's events are settled unrun); a change that fails leaves it taking
    /// what it took, its consumers' filters put back, so the version serving (a reload refused)
    /// keeps every event it had.
    ///
    /// The consumers a change leaves wide are returned with the filters they are to be narrowed
    /// to ([`narrowing`]); meanwhile the feed still takes what they stored before the change
    /// under the patterns it left ([`Filter::retire`]).
    async fn apply(&self, feed: &mut Feed, spec: &SubscriptionSpec) -> Result<Vec<narrowing::Narrow>, TransportError> {
        let taking = PatternSet::parse(&spec.patterns)?;
        let serving = feed.patterns.clone();
        feed.filter.set(PatternSet::parse(&[serving.as_slice(), spec.patterns.as_slice()].concat())?);
        let changed = match &spec.durable {
            Some(durability) => self.apply_durable(feed, spec, durability).await,
            None => self.apply_core(feed, spec).await.map(|()| Vec::new()),
        };
        match changed {
            Ok(mut narrow) => {
                let mut retiring = feed.filter.retiring_patterns();
                retiring.extend(narrow.iter().flat_map(|n| n.left.iter().cloned()));
                retiring.extend(serving.iter().cloned());
                feed.filter.retire(&retiring, narrow.iter().map(|n| n.spec.stream.clone()));
                feed.filter.set(taking);
                feed.patterns = spec.patterns.clone();
                // What each stream stored before the change, read once the feed took the new
                // patterns (what a narrowing waits for; the filter takes it as the plugin's).
                for n in &mut narrow {
                    n.before = narrowing::boundary(&self.js, &n.spec).await.ok();
                    if let Some(before) = n.before {
                        feed.filter.retiring_before(&n.spec.stream, before);
                    }
                }
                Ok(narrow)
            }
            Err(e) => {
                feed.filter.set(PatternSet::parse(&serving)?);
                Err(e)
            }
        }
    }

    /// A durable consumer per stream that captures `spec`'s patterns; see [`Self::apply`].
    async fn apply_durable(
        &self,
        feed: &mut Feed,
        spec: &SubscriptionSpec,
        durability: &crate::transport::Durability,
    ) -> Result<Vec<narrowing::Narrow>, TransportError> {
        let patterns = covering(spec);
        // Every stream first: one that cannot be found or made fails the change before any
        // consumer is touched.
        let mut plan: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in &patterns {
            for stream in streams::capture(&self.js, &self.index, &self.settings, p).await? {
                plan.entry(stream).or_default().push(p.clone());
            }
        }
        if let Some(dead_letter) = &durability.dead_letter {
            streams::capture(&self.js, &self.index, &self.settings, dead_letter).await?;
        }
        let name = durable_name(&spec.group);
        // A new version may name its own queue group (`plugbus.<name>.<suffix>`), but a swap to
        // another one made a new consumer from new messages only and left what the old one had
        // not delivered behind (review 62d F3).
        if let Some(old) = feed.durable.values().map(|pump| pump.spec().name).find(|old| *old != name) {
            return Err(TransportError::Refused(format!(
                "the new version moves plugin {plugin}'s queue group to {group}, so its durable JetStream consumer \
                 from {old} to {name}: what {old} has not delivered would be left behind. Keep the queue group \
                 (a manifest's `queue_group`, or `[plugins.{plugin}] queue_group`); to move it, stop the plugin \
                 once its consumer is drained",
                plugin = spec.plugin,
                group = spec.group,
            )));
        }
        // Each consumer this feed pulls first takes both versions' filters (`widened`), and is
        // narrowed to the new ones only once every stream's took the change, and then only once
        // what it stored before the change is settled (`narrowing`): a consumer narrowed before
        // a later stream's change failed would pass over, for good, what the version serving
        // takes there until `put_back`, and one narrowed while a message of a subject it leaves
        // waits for a retry drops that message (an interest stream deletes it).
        let mut ensured = Vec::new();
        let mut narrow = Vec::new();
        for (stream, filters) in &plan {
            let cspec = consumer::ConsumerSpec {
                stream: stream.clone(),
                name: name.clone(),
                filters: filters.clone(),
                durability: durability.clone(),
                ack_wait: self.settings.ack_wait,
            };
            // What the consumer takes now, whichever host or version set it (a host starting with a
            // new version, or again after a crash during a narrowing, widens from it too), else
            // what this host's pump knows.
            let pumped = feed.durable.get(stream).map(Pump::spec);
            let on_server = consumer::on_the_server(&self.js, &cspec).await;
            if pumped.as_ref().is_some_and(|pumped| pumped.same_consumer(&cspec))
                && on_server.as_ref().is_none_or(|on_server| on_server.same_consumer(&cspec))
            {
                continue;
            }
            let mut wide = on_server.or(pumped).and_then(|serving| serving.widened(&cspec));
            let mut made = consumer::ensure(&self.js, wide.as_ref().unwrap_or(&cspec)).await;
            if let (Err(e), Some(_)) = (&made, &wide) {
                tracing::warn!(plugin = %spec.plugin, stream = %stream, "JetStream refused the consumer with both versions' \
                    filters ({e}): it takes the new ones at once, and may pass over the serving version's messages there \
                    if a later stream's change fails");
                wide = None;
                made = consumer::ensure(&self.js, &cspec).await;
            }
            match made {
                Ok(c) => {
                    if let Some(wide) = wide {
                        let left = wide.filters.iter().filter(|f| !cspec.filters.contains(f)).cloned().collect();
                        narrow.push(narrowing::Narrow { spec: cspec, left, before: None });
                        ensured.push((wide, c));
                    } else {
                        ensured.push((cspec, c));
                    }
                }
                Err(e) => {
                    self.put_back(feed, spec, ensured.iter().map(|(cspec, _)| cspec)).await;
                    return Err(e);
                }
            }
        }
        for (cspec, c) in ensured {
            tracing::info!(plugin = %spec.plugin, stream = %cspec.stream, consumer = %cspec.name, filters = ?cspec.filters,
                "durable JetStream consumer");
            match feed.durable.get_mut(&cspec.stream) {
                // Same consumer, new filters: the pump goes on, and re-creates it from these.
                Some(pump) if pump.spec().name == cspec.name => *pump.spec.write().expect("spec poisoned") = cspec,
                other => {
                    if let Some(old) = other {
                        tracing::warn!(plugin = %spec.plugin, stream = %cspec.stream, consumer = %old.spec().name,
                            "the plugin's queue group changed: this host no longer pulls its old consumer, whose \
                             unsettled messages wait there for a host that runs the old group");
                    }
                    let stream = cspec.stream.clone();
                    let shared = Arc::new(std::sync::RwLock::new(cspec));
                    let feeding = consumer::Feeding {
                        intake: feed.intake.clone(),
                        held: self.held.clone(),
                        queue: spec.capacity,
                        filter: feed.filter.clone(),
                    };
                    let task = consumer::pump(self.js.clone(), shared.clone(), c, feeding);
                    feed.durable.insert(stream, Pump { spec: shared, _task: Task(tokio::spawn(task)) });
                }
            }
        }
        feed.durable.retain(|stream, _| plan.contains_key(stream));
        feed.core.clear();
        Ok(narrow)
    }

    /// The narrowing of what a change of feed `id` left wide (`None`: nothing).
    fn narrowing(&self, id: u64, feed: &Feed, narrow: Vec<narrowing::Narrow>) -> Option<narrowing::Narrowing> {
        (!narrow.is_empty()).then(|| {
            narrowing::Narrowing::start(
                &self.js,
                Arc::downgrade(&self.feeds),
                id,
                self.next_id.fetch_add(1, Ordering::Relaxed),
                feed.filter.clone(),
                narrow,
            )
        })
    }

    /// After a change failed: the consumers it changed (`changed`) are given back the spec of
    /// their pump. One made for the change (no pump here) is left to whichever host runs the
    /// new version, unpulled by this one.
    async fn put_back<'a>(
        &self,
        feed: &Feed,
        spec: &SubscriptionSpec,
        changed: impl Iterator<Item = &'a consumer::ConsumerSpec>,
    ) {
        for cspec in changed {
            let Some(pump) = feed.durable.get(&cspec.stream) else {
                tracing::warn!(plugin = %spec.plugin, stream = %cspec.stream, consumer = %cspec.name,
                    "a consumer made for a change that failed is left as it is: this host does not pull it");
                continue;
            };
            if let Err(e) = consumer::ensure(&self.js, &pump.spec()).await {
                tracing::error!(plugin = %spec.plugin, stream = %cspec.stream, consumer = %cspec.name,
                    "putting back the filters of a consumer a failed change had changed: {e}; it keeps the filters \
                     the change left (messages of the serving version's subjects it lacks are passed over; those of \
                     subjects only the new version takes are given back) until a reload that changes the plugin's \
                     subjects, a restart of the host, or its re-creation if it is deleted");
            }
        }
    }

    /// A queue subscription per pattern; see [`Self::apply`].
    async fn apply_core(&self, feed: &mut Feed, spec: &SubscriptionSpec) -> Result<(), TransportError> {
        // A swap that turns durable delivery off left the consumer's undelivered messages and
        // those waiting for a retry on the server, pulled by nobody, and while other hosts still
        // pull it every event was handled twice, once by each (review 63b F2).
        if let Some(pump) = feed.durable.values().next() {
            return Err(TransportError::Refused(format!(
                "the new version (or its config) turns durable delivery off for plugin {plugin}: what its JetStream \
                 consumer {consumer} has not delivered, and what waits there for a retry, would be left behind, and \
                 hosts still pulling it would handle every event a second time. Keep `durable` (the manifest's, or \
                 `[plugins.{plugin}] durable`); to turn it off, stop the plugin once its consumer is drained",
                plugin = spec.plugin,
                consumer = pump.spec().name,
            )));
        }
        let patterns = covering(spec);
        let mut added = Vec::new();
        let subscribed = async {
            for p in &patterns {
                if feed.core.contains_key(p) {
                    continue;
                }
                let sub =
                    self.client.queue_subscribe(p.clone(), spec.group.clone()).await.map_err(|e| {
                        TransportError::Broker(format!("subscribing {} to {p} on NATS: {e}", spec.plugin))
                    })?;
                let pump = queue_group::pump(
                    sub,
                    feed.intake.clone(),
                    feed.filter.clone(),
                    feed.dropped.clone(),
                    self.client.clone(),
                );
                feed.core.insert(p.clone(), Task(tokio::spawn(pump)));
                added.push(p.clone());
            }
            // Once subscribe returns, the server has the subscriptions: nothing published
            // after it is missed.
            self.registered().await
        }
        .await;
        if let Err(e) = subscribed {
            for p in added {
                feed.core.remove(&p);
            }
            return Err(e);
        }
        feed.core.retain(|p, _| patterns.contains(p));
        feed.durable.clear();
        tracing::info!(plugin = %spec.plugin, patterns = ?patterns, queue_group = %spec.group, "core NATS queue subscriptions");
        Ok(())
    }
}

/// `spec`'s patterns without those another of them covers (subscribed once).
fn covering(spec: &SubscriptionSpec) -> Vec<String> {
    let patterns = without_covered(&spec.patterns);
    if patterns.len() < spec.patterns.len() {
        tracing::debug!(plugin = %spec.plugin, kept = ?patterns, "patterns covered by others are not subscribed twice");
    }
    patterns
}

/// A JetStream name (KV bucket, consumer) for `text` under `prefix`, injective: two different
/// texts never share a name (a plugin `Payments` never meets `payments`' bucket). Text of
/// lower-case letters, digits, `_` and `-` is kept as it is after a `_` (`plugbus_payments`);
/// any other text is escaped after a `-` instead (`Payments` → `plugbus--payments`, see
/// [`escape_name`]), so the two kinds never meet; a name too long for JetStream becomes a hash
/// of the text (`plugbus-H<hex>`: escaped text has no upper case, so it meets neither).
pub fn scoped_name(prefix: &str, text: &str) -> String {
    let name = if kept_as_is(text) { format!("{prefix}_{text}") } else { format!("{prefix}-{}", escape_name(text)) };
    fit(prefix, name, text)
}

/// The JetStream durable consumer name of a plugin's queue group, injective like
/// [`scoped_name`]: the default group `plugbus.<id>` gives `plugbus_<id>` (as it always did)
/// when `<id>` is lower-case; any other group is escaped whole after `plugbus-`
/// (`plugbus.evil.x` → `plugbus-plugbus-_evil-_x`), so no group can name another's consumer.
pub fn durable_name(queue_group: &str) -> String {
    let name = match queue_group.strip_prefix("plugbus.") {
        Some(id) if kept_as_is(id) => format!("plugbus_{id}"),
        _ => format!("plugbus-{}", escape_name(queue_group)),
    };
    fit("plugbus", name, queue_group)
}

fn kept_as_is(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-'))
}

fn fit(prefix: &str, name: String, text: &str) -> String {
    if name.len() <= MAX_NAME_LEN {
        return name;
    }
    format!("{prefix}-H{}", &crate::sandbox::content_hash(text.as_bytes())[..40])
}

/// JetStream names are kept well under the server's 255-character limit.
const MAX_NAME_LEN: usize = 200;

/// Escapes free text into `a-z`, `0-9`, `_` and `-`, as a prefix code (so different texts never
/// give one result): `a-z`, `0-9`, `_` stay; `A-Z` become `-` and the lower-case letter; `-`
/// becomes `--`; `.` becomes `-_`; any other byte becomes `-` and its three decimal digits.
pub fn escape_name(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    for b in text.bytes() {
        match b {
            b'a'..=b'z' | b'0'..=b'9' | b'_' => out.push(b as char),
            b'A'..=b'Z' => {
                out.push('-');
                out.push(b.to_ascii_lowercase() as char);
            }
            b'-' => out.push_str("--"),
            b'.' => out.push_str("-_"),
            other => out.push_str(&format!("-{other:03}")),
        }
    }
    out
}

fn on_event(connected: &AtomicBool, event: async_nats::Event) {
    match event {
        async_nats::Event::Connected => {
            connected.store(true, Ordering::Relaxed);
            tracing::info!("NATS connection (re)established");
        }
        async_nats::Event::Disconnected => {
            connected.store(false, Ordering::Relaxed);
            tracing::warn!(
                "NATS connection lost; reconnecting (JetStream deliveries resume, core messages meanwhile are missed)"
            );
        }
        async_nats::Event::Closed => {
            connected.store(false, Ordering::Relaxed);
            tracing::warn!("NATS connection closed");
        }
        async_nats::Event::SlowConsumer(sid) => {
            tracing::warn!(
                subscription = sid,
                "NATS slow consumer: core messages dropped for a subscription that fell behind"
            );
        }
        other => tracing::info!("NATS: {other}"),
    }
}

/// Unsubscribes a plugin's feed when the router lets go of it.
struct Unsubscribe {
    feeds: Arc<tokio::sync::Mutex<HashMap<u64, Feed>>>,
    id: u64,
}

impl Drop for Unsubscribe {
    fn drop(&mut self) {
        let id = self.id;
        if let Ok(mut feeds) = self.feeds.try_lock() {
            feeds.remove(&id);
            return;
        }
        // Busy (a subscribe or retarget is running): unsubscribe as soon as it is done.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let feeds = self.feeds.clone();
            rt.spawn(async move {
                feeds.lock().await.remove(&id);
            });
        }
    }
}

/// Why a publish failed, and the limit of the stream that refused the message for its size, if
/// that was why.
struct PublishFailure {
    error: TransportError,
    over_stream_limit: Option<&'static str>,
}

impl From<TransportError> for PublishFailure {
    fn from(error: TransportError) -> Self {
        Self { error, over_stream_limit: None }
    }
}

impl From<PublishFailure> for TransportError {
    fn from(failure: PublishFailure) -> Self {
        failure.error
    }
}

/// The limit of the stream that captures a publish's subject that JetStream refused it as over:
/// its `max_msg_size` (error code 10054) or the largest header block (10097). A fixed text: the
/// error's own text comes from whoever answered on the reply inbox.
fn stream_limit_refusing(e: &async_nats::jetstream::context::PublishError) -> Option<&'static str> {
    use async_nats::jetstream::ErrorCode;
    let code = std::error::Error::source(e)?.downcast_ref::<async_nats::jetstream::Error>()?.error_code();
    match code {
        ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM => Some("max_msg_size (JetStream error 10054)"),
        ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM => Some("largest header block (JetStream error 10097)"),
        _ => None,
    }
}

/// What a dead letter too large for the broker is published without, step by step.
#[derive(Clone, Copy)]
enum Omit {
    /// Its event's data.
    Data,
    /// Its event's data and the event's own headers (only the size of an event's attributes is
    /// bounded: a header may be as large as the data), keeping the host's `plugbus-*` ones.
    DataAndHeaders,
    /// That, its `datacontenttype`, and each of the host's headers cut to
    /// [`OMITTED_HEADER_BYTES`] (`plugbus-error` holds up to 8 KiB of the handler's words).
    AllButTheHosts,
}

/// The most of each of the host's headers a dead letter keeps at [`Omit::AllButTheHosts`].
const OMITTED_HEADER_BYTES: usize = 256;

/// `event` (a dead letter) without what `omit` says, marked [`DATA_OMITTED`] with what was
/// left out and `why`: it can be kept and listed, never replayed from the broker
/// (`deadletter::replay_event` refuses it; this host's own store keeps the whole dead letter).
fn without_data(event: &Event, omit: Omit, why: &str) -> Event {
    let mut smaller = event.clone();
    smaller.data = bytes::Bytes::new();
    let mut left_out = format!("its {} bytes of data", event.data.len());
    match omit {
        Omit::Data => smaller.extensions.retain(|(name, _)| name != DATA_OMITTED),
        Omit::DataAndHeaders | Omit::AllButTheHosts => {
            smaller.extensions.retain(|(name, _)| name.starts_with("plugbus-") && name != DATA_OMITTED);
            left_out.push_str(" and the event's own headers");
        }
    }
    if let Omit::AllButTheHosts = omit {
        smaller.datacontenttype = None;
        for (_, value) in &mut smaller.extensions {
            if let std::borrow::Cow::Owned(cut) = crate::event::cut_to(value, OMITTED_HEADER_BYTES) {
                *value = cut;
            }
        }
        left_out.push_str(", its content type, and all but 256 bytes of each of the host's headers");
    }
    smaller
        .extensions
        .push((DATA_OMITTED.to_string(), format!("{left_out}: {why}; the host that dead-lettered it keeps it whole")));
    smaller
}

/// What [`without_data`] left out of `smaller`, as its mark says.
fn omitted(smaller: &Event) -> &str {
    smaller.header(DATA_OMITTED).and_then(|mark| mark.split(": ").next()).unwrap_or_default()
}

/// The bytes the server counts against `max_payload` for `event` (a dead letter): its payload
/// and its header block.
fn wire_size(event: &Event) -> usize {
    let (headers, payload) = wire_sizes(event);
    headers + payload
}

/// The bytes of `event`'s header block on the wire (`NATS/1.0`, a `name: value` line each,
/// every line ended by CRLF) and of its payload.
fn wire_sizes(event: &Event) -> (usize, usize) {
    let (headers, payload) = wire::message_of(event, wire::Origin::Host);
    let lines: usize = headers
        .iter()
        .flat_map(|(name, values)| values.iter().map(move |v| AsRef::<str>::as_ref(name).len() + v.as_str().len() + 4))
        .sum();
    (lines + 12, payload.len())
}

/// The largest header block a stream stores (JetStream refuses a larger one: error 10097).
const STREAM_HEADER_MAX: usize = 65_535;

/// At least the size of `event`'s header block on the wire ([`wire_sizes`]), without building
/// it (every output is checked, [`Transport::too_large`]): each value percent-encoded at most
/// three bytes a byte, each name with its `ce-` prefix, `: ` and CRLF in 64 bytes, and the
/// headers the host adds (`Nats-Msg-Id`, `ce-specversion`) in 1 KiB.
fn header_bound(event: &Event) -> usize {
    let attributes = event.id.len()
        + event.source.len()
        + event.ty.len()
        + event.subject.len()
        + event.time.len()
        + event.datacontenttype.as_ref().map_or(0, String::len);
    let extensions: usize = event.extensions.iter().map(|(name, value)| name.len() + 3 * value.len() + 64).sum();
    3 * attributes + 6 * 64 + extensions + 1024
}

impl NatsTransport {
    /// Why `event` cannot go out: over the server's `max_payload`, or a header block over
    /// `header_max`. Measured exactly only when a bound without encoding anything says it may be.
    fn over_limits(&self, event: &Event, header_max: usize) -> Option<String> {
        let max = self.client.server_info().max_payload;
        let bound = header_bound(event);
        if (max == 0 || event.data.len() + bound <= max) && bound <= header_max {
            return None;
        }
        let (headers, payload) = wire_sizes(event);
        let size = headers + payload;
        if max > 0 && size > max {
            return Some(format!(
                "the event is {size} bytes as a NATS message (headers included), over the server's max_payload of {max}"
            ));
        }
        (headers > header_max).then(|| {
            format!(
                "its headers are {headers} bytes as a NATS message, over the {header_max} bytes a stream stores \
                 (the stream capturing {} would refuse it)",
                event.subject
            )
        })
    }
}

#[async_trait]
impl Transport for NatsTransport {
    fn name(&self) -> &'static str {
        "nats"
    }

    /// Over the server's `max_payload` (which counts the headers: a body within the host's
    /// event limit may not fit with its CloudEvents attributes, which percent-encoding may
    /// triple), or, on a subject a stream captures, a header block over what a stream stores.
    /// Measured exactly only when a bound without encoding anything says it may be.
    fn too_large(&self, event: &Event) -> Option<String> {
        let header_max = if self.index.captures(&event.subject) { STREAM_HEADER_MAX } else { usize::MAX };
        self.over_limits(event, header_max)
    }

    /// A reply goes to its requester's inbox, which no stream captures (review 61e: one to a
    /// stored request was held to the stream's header limit).
    fn reply_too_large(&self, reply: &Event) -> Option<String> {
        self.over_limits(reply, usize::MAX)
    }

    /// A producer's event, except a replay: its id is the host's, made from its dead letter's
    /// (`deadletter::replay_event`), as computable as an output's. Only the host sets
    /// `plugbus-replay-of` (the ingress refuses `plugbus-*` headers).
    async fn publish(&self, event: Event) -> Result<(), TransportError> {
        let origin = match event.header(crate::deadletter::headers::REPLAY_OF) {
            Some(_) => wire::Origin::Host,
            None => wire::Origin::Producer,
        };
        // Disconnected, a core NATS publish is only buffered in this process until it reconnects
        // (lost if it stops first): a producer must hear "not taken", not `202`. On a subject a
        // stream captures the stream's ack says it already.
        if !self.is_connected() && !self.index.captures(&event.subject) {
            return Err(TransportError::Closed(format!(
                "not connected to NATS: an event on {} would only wait in this process for the connection",
                event.subject
            )));
        }
        if event.header(crate::deadletter::headers::REPLAY_OF).is_some() && !self.index.captures(&event.subject) {
            return self.publish_replay_taken(&event, origin).await;
        }
        Ok(self.publish_event(&event, origin).await?)
    }

    async fn publish_output(&self, event: Arc<Event>) -> Result<(), TransportError> {
        Ok(self.publish_event(&event, wire::Origin::Host).await?)
    }

    /// Kept whole here, a dead letter the broker cannot take whole is published without what it
    /// cannot take ([`NatsTransport::publish_dead_letter_within_limits`]). Not kept here (over
    /// the store's `max_bytes`), it is published whole or refused, so its input is `nak`ed and
    /// stays in its stream: its data is never left nowhere.
    async fn publish_dead_letter(&self, event: Arc<Event>, kept_whole: bool) -> Result<(), TransportError> {
        if kept_whole { self.publish_dead_letter_within_limits(&event).await } else { self.publish_output(event).await }
    }

    /// NATS request/reply: an inbox of its own (`_INBOX.…`, subscribed for the request alone), a
    /// no-responders status when nothing subscribes. The reply's subject is set back to the one
    /// asked on: the inbox is the host's and never reaches a plugin.
    async fn request(
        &self,
        event: Event,
        timeout: Duration,
        producer: bool,
    ) -> Result<Event, crate::rpc::RequestError> {
        use crate::rpc::RequestError;
        let subject = event.subject.clone();
        validate_subject(&subject).map_err(|e| RequestError::Unavailable(e.to_string()))?;
        let origin = if producer { wire::Origin::Producer } else { wire::Origin::Host };
        let (headers, payload) = wire::message_of(&event, origin);
        // Disconnected, the request would wait in this process's buffer and time out: say so
        // at once (`503` over HTTP, `Unavailable` to a plugin, the host's failure), as a publish
        // does; a stored request too.
        if !self.is_connected() {
            return Err(RequestError::Broker(format!("not connected to NATS: a request on {subject} cannot go out")));
        }
        if self.index.captures(&subject) {
            return self.request_stored(subject, headers, payload, timeout).await;
        }
        // On an inbox of its own (a subscription the request drops as it ends): on the client's
        // shared one, async-nats keeps an entry per request until its reply comes
        // (nats-io/nats.rs#1617), and one nobody answers (any ordinary handler on the subject)
        // stayed for the life of the connection, about 440 bytes each.
        let inbox = self.client.new_inbox();
        let request =
            async_nats::Request::new().headers(headers).payload(payload).timeout(Some(timeout)).inbox(inbox.clone());
        let msg = match self.client.send_request(subject.clone(), request).await {
            Ok(msg) => msg,
            Err(e) => {
                return Err(match e.kind() {
                    async_nats::RequestErrorKind::TimedOut => RequestError::Timeout { subject, after: timeout },
                    async_nats::RequestErrorKind::NoResponders => RequestError::NoResponders(subject),
                    _ => RequestError::Unavailable(format!("requesting on {subject} over NATS: {e}")),
                });
            }
        };
        reply_event(subject, &inbox, msg)
    }

    /// Publishes the reply on the requester's inbox. Core NATS cannot tell whether anyone still
    /// waits there: `Ok(true)` once the client took it.
    async fn reply(&self, to: &str, event: Event) -> Result<bool, TransportError> {
        if !is_inbox(to) {
            return Err(TransportError::Broker(format!("{} is not a reply inbox", crate::event::quoted(to))));
        }
        let (headers, payload) = wire::message_of(&event, wire::Origin::Host);
        self.client
            .publish_with_headers(to.to_string(), headers, payload)
            .await
            .map_err(|e| TransportError::Broker(format!("publishing a reply on NATS: {e}")))?;
        Ok(true)
    }

    fn register_metrics(&self, registry: &mut crate::metrics::Registry) {
        registry.register(
            "nats_core_dropped",
            "Core NATS messages dropped because their plugin had no room for them (its queue and flow.buffer_mib full, as much again waiting)",
            self.core_dropped.clone(),
        );
        registry.register(
            "nats_unreadable",
            "Messages the NATS server passed on that could not be read (a subject or header block not UTF-8, a header line without ':'), dropped without closing the connection",
            unreadable::Unreadable(self.client.statistics()),
        );
    }

    async fn subscribe(&self, spec: SubscriptionSpec) -> Result<Subscription, TransportError> {
        let (tx, rx) = mpsc::channel(spec.capacity.max(1));
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let plugin: Arc<str> = spec.plugin.as_str().into();
        let filter = Filter::new(plugin);
        let intake = budget::Intake::new(tx.clone(), spec.buffer_bytes);
        let dropped = self.core_dropped.get_or_create(&PluginLabels { plugin: spec.plugin.clone() }).clone();
        let mut feed = Feed {
            intake,
            filter,
            dropped,
            patterns: Vec::new(),
            core: HashMap::new(),
            durable: HashMap::new(),
            narrowing: None,
        };
        // A consumer that takes more than this version (a host starting with a new version, or
        // again after a crash while a narrowing waited) is narrowed once what it holds is settled.
        let narrow = self.apply(&mut feed, &spec).await?;
        let mut feeds = self.feeds.lock().await;
        feed.narrowing = self.narrowing(id, &feed, narrow);
        feeds.insert(id, feed);
        drop(feeds);
        Ok(Subscription::new(id, &tx, rx, Unsubscribe { feeds: self.feeds.clone(), id }))
    }

    async fn retarget(&self, subscription: u64, spec: &SubscriptionSpec) -> Result<(), TransportError> {
        let mut feeds = self.feeds.lock().await;
        let feed = feeds
            .get_mut(&subscription)
            .ok_or_else(|| TransportError::Closed(format!("subscription {subscription} is gone")))?;
        let narrow = self.apply(feed, spec).await?;
        // What the last change left to narrow is this change's now (its consumers are wide from
        // it); a change that failed leaves it as it was.
        feed.narrowing = self.narrowing(subscription, feed, narrow);
        Ok(())
    }

    async fn observe(&self, patterns: Vec<String>, capacity: usize) -> Result<Observed, TransportError> {
        // Observers see what the embedded bus would show them: no `$`/`_INBOX` subject or
        // dead letter their patterns do not name (the server would deliver those to `>`).
        let set = PatternSet::parse(&patterns)?;
        let (tx, observed) = Observed::channel(capacity);
        let tails = self.tails.connection(&self.settings).await?;
        let mut subs = Vec::new();
        for p in without_covered(&patterns) {
            let sub = tails
                .client
                .subscribe(p.clone())
                .await
                .map_err(|e| TransportError::Broker(format!("observing {p} on NATS: {e}")))?;
            subs.push(sub);
        }
        tails.registered().await?;
        tokio::spawn(async move {
            // Ends (and unsubscribes) when the observer goes away, even if nothing arrives.
            let mut last = u64::MAX;
            let mut every_half_second = tokio::time::interval(Duration::from_millis(500));
            let mut messages = futures::stream::select_all(subs);
            loop {
                let msg = tokio::select! {
                    biased;
                    msg = messages.next() => msg,
                    _ = tx.closed() => None,
                    _ = every_half_second.tick() => {
                        tails.count_dropped(&tx, &mut last);
                        continue;
                    }
                };
                let Some(msg) = msg else { break };
                tails.took();
                if !set.matches(msg.subject.as_str()) {
                    continue;
                }
                let Ok(ev) = wire::event_of(msg.subject.as_str(), msg.headers.as_ref(), msg.payload, None) else {
                    continue;
                };
                if !tx.offer(Arc::new(ev)) {
                    break;
                }
            }
            tails.count_dropped(&tx, &mut last);
        });
        Ok(observed)
    }

    fn is_connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    async fn kept_dead_letters(
        &self,
        plugin: Option<&str>,
        limit: usize,
    ) -> Result<Option<crate::transport::KeptPage>, TransportError> {
        dead_letters::list(&self.js, plugin, limit, &self.dead_letter_subjects).await
    }

    async fn newest_dead_letters(
        &self,
        plugin: Option<&str>,
        limit: usize,
    ) -> Result<Option<(Vec<crate::deadletter::Entry>, usize)>, TransportError> {
        dead_letters::newest(&self.js, plugin, limit, &self.dead_letter_subjects).await
    }

    async fn find_dead_letter(&self, id: &str) -> Result<Option<crate::deadletter::Entry>, TransportError> {
        dead_letters::find(&self.js, id, &self.dead_letter_subjects).await
    }

    async fn forget_dead_letter(&self, seq: u64) -> Result<(), TransportError> {
        dead_letters::forget(&self.js, seq).await
    }

    async fn claim_dead_letter(&self, seq: u64, id: &str) -> Result<crate::transport::Claim, TransportError> {
        self.replay_claims.claim(seq, id).await
    }

    async fn release_dead_letter_claim(&self, seq: u64, id: &str, revision: u64) -> Result<(), TransportError> {
        self.replay_claims.release(seq, id, revision).await
    }

    fn is_external(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the stream answers a publish over its limits with, as async-nats 0.51 hands it over
    /// (`PublishErrorKind::Other` with the API error as its source), and only that, reads as a
    /// stream's size limit; a client-side refusal or any other API error does not.
    #[test]
    fn only_a_streams_size_refusals_read_as_its_limit() {
        use async_nats::jetstream::context::{PublishError, PublishErrorKind};
        let answered = |err_code: u64| {
            let body = format!(r#"{{"code":400,"err_code":{err_code},"description":"refused"}}"#);
            let api: async_nats::jetstream::Error = serde_json::from_str(&body).unwrap();
            PublishError::with_source(PublishErrorKind::Other, api)
        };
        assert_eq!(stream_limit_refusing(&answered(10054)), Some("max_msg_size (JetStream error 10054)"));
        assert_eq!(stream_limit_refusing(&answered(10097)), Some("largest header block (JetStream error 10097)"));
        for other in [10077, 10060, 10071] {
            assert_eq!(stream_limit_refusing(&answered(other)), None, "{other}");
        }
        let local = PublishError::with_source(PublishErrorKind::MaxPayloadExceeded, "over max_payload".to_string());
        assert_eq!(stream_limit_refusing(&local), None);
        assert_eq!(stream_limit_refusing(&PublishError::new(PublishErrorKind::TimedOut)), None);
    }

    #[test]
    fn a_dead_letter_without_its_data_keeps_the_hosts_headers_and_one_mark() {
        let mut dead = Event::new("plugbus.dlq.p", vec![b'x'; 100]).with_header("tenant", "acme");
        dead.extensions.push(("plugbus-error".into(), "never".into()));
        // A dead letter of a dead letter carries the mark of the one before it.
        dead.extensions.push((DATA_OMITTED.into(), "an earlier mark".into()));
        let smaller = without_data(&dead, Omit::Data, "too large");
        assert!(smaller.data.is_empty());
        assert_eq!(smaller.header("tenant"), Some("acme"));
        assert_eq!(smaller.header("plugbus-error"), Some("never"));
        let marks: Vec<_> = smaller.extensions.iter().filter(|(k, _)| k == DATA_OMITTED).collect();
        assert_eq!(marks.len(), 1, "{marks:?}");
        let kept = "the host that dead-lettered it keeps it whole";
        assert_eq!(smaller.header(DATA_OMITTED), Some(format!("its 100 bytes of data: too large; {kept}").as_str()));
        assert_eq!(omitted(&smaller), "its 100 bytes of data");

        let smallest = without_data(&dead, Omit::DataAndHeaders, "still too large");
        assert_eq!(smallest.header("tenant"), None);
        assert_eq!(smallest.header("plugbus-error"), Some("never"));
        assert_eq!(
            smallest.header(DATA_OMITTED),
            Some(format!("its 100 bytes of data and the event's own headers: still too large; {kept}").as_str())
        );
        assert_eq!(smallest.extensions.iter().filter(|(k, _)| k == DATA_OMITTED).count(), 1);
        assert!(wire_size(&smaller) < wire_size(&dead));

        // The last step: the host's own headers cut, the content type gone.
        let mut wordy = dead.clone();
        wordy.datacontenttype = Some("x".repeat(2000));
        wordy.extensions.push(("plugbus-error".into(), "e".repeat(8192)));
        let cut = without_data(&wordy, Omit::AllButTheHosts, "over");
        assert_eq!(cut.datacontenttype, None);
        assert!(
            cut.extensions.iter().all(|(k, v)| k == DATA_OMITTED || v.len() <= OMITTED_HEADER_BYTES + 64),
            "{cut:?}"
        );
        assert!(cut.header(DATA_OMITTED).unwrap().contains("all but 256 bytes of each of the host's headers"));
        assert!(wire_size(&cut) < 2048, "{}", wire_size(&cut));
    }

    #[test]
    fn jetstream_names_never_collide() {
        let texts = [
            "payments",
            "Payments",
            "PAYMENTS",
            "pay-ments",
            "pay_ments",
            "payMents",
            "pay--ments",
            "pay.ments",
            "-payments",
            "_payments",
            "a-b",
            "aB",
            "a_b",
            "a.b",
            "a-_b",
            "a--b",
            "x-065",
            "xA",
            "é",
            "-195-169",
        ];
        let mut seen = std::collections::HashMap::new();
        for t in texts {
            let name = scoped_name("plugbus", t);
            assert!(name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'), "{name}");
            assert_eq!(seen.insert(name.clone(), t), None, "{t:?} and another text share {name}");
        }
        assert_eq!(scoped_name("plugbus", "payments"), "plugbus_payments");
        assert_eq!(scoped_name("plugbus", "Payments"), "plugbus--payments");
        let groups = [
            "plugbus.payments",
            "plugbus.Payments",
            "plugbus_payments",
            "plugbus.payments.x",
            "plugbus.evil.payments",
            "plugbus.evil_payments",
            "payments",
            "shared_stock",
            "shared.stock",
            "a-b",
            "aB",
            "plugbus.a-b",
        ];
        let mut seen = std::collections::HashMap::new();
        for g in groups {
            let name = durable_name(g);
            assert!(!name.contains('.'), "{name}");
            assert_eq!(seen.insert(name.clone(), g), None, "{g:?} and another group share {name}");
        }
        assert_eq!(durable_name("plugbus.payments"), "plugbus_payments", "the default durable keeps its name");
        let long = "x".repeat(128);
        assert!(durable_name(&format!("plugbus.{long}.{long}")).len() <= MAX_NAME_LEN);
    }
}
