//! Dead letters: events a plugin could not handle, kept so an operator can see and replay them.
//!
//! A dead letter is also published as an event on the plugin's dead-letter subject (default
//! `plugbus.dlq.<plugin>`), carrying the original data and headers plus `plugbus-error`,
//! `plugbus-plugin`, `plugbus-attempts`, `plugbus-original-subject` and `plugbus-failed-at`.
//!
//! Whether an event is a dead letter is read from marks no plugin can set: a plugin's outputs
//! never carry `plugbus-*` headers (refused at publish, see [`crate::event::is_reserved_header`])
//! and their `source` is always `plugbus/<plugin>`, set by the host.
//!
//! The kept store is bounded in entries and in bytes; the oldest go first, logged. Failure
//! text in `plugbus-error` is cut (see [`crate::event::cut_to`]).

use crate::event::{ECHO_BYTES, Event, cut_to, now_rfc3339};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Header names on a dead letter.
pub mod headers {
    /// Why the last attempt failed.
    pub const ERROR: &str = "plugbus-error";
    /// The plugin that failed.
    pub const PLUGIN: &str = "plugbus-plugin";
    /// How many attempts were made.
    pub const ATTEMPTS: &str = "plugbus-attempts";
    /// Where the event was first published.
    pub const ORIGINAL_SUBJECT: &str = "plugbus-original-subject";
    /// The original event id.
    pub const ORIGINAL_ID: &str = "plugbus-original-id";
    /// When it was dead-lettered.
    pub const FAILED_AT: &str = "plugbus-failed-at";
    /// The original event's `source` (with its id, what its outputs' ids derive from).
    pub const ORIGINAL_SOURCE: &str = "plugbus-original-source";
    /// On a replayed event: the id of the dead letter it came from.
    pub const REPLAY_OF: &str = "plugbus-replay-of";
    /// On a replay of the dead letter of an event a plugin failed to handle: that plugin, the
    /// only one to run it; every other plugin whose subscription matches its subject takes it
    /// and lets it go unrun (they handled it the first time). Not on the replay of an output
    /// the bus did not take (it reached no one): that goes to every subscriber.
    pub const REPLAY_FOR: &str = "plugbus-replay-for";
    /// On a replay NATS publishes to a subject no stream captures: the inbox its host waits on.
    /// A host whose plugin takes the message into its queue (the plugin it is for, when it
    /// names one) answers there, and only then is the dead letter forgotten: core NATS drops
    /// what a full consumer has no room for, unseen. Never reaches a plugin.
    pub const REPLAY_ACK: &str = "plugbus-replay-ack";
    /// On the dead letter of an event a plugin's delivery failed (its handler, or before it
    /// ran), as opposed to an output of the plugin the bus did not take: that plugin, whom the
    /// replay is for ([`super::failed_in`]). Told apart this way, never by the event's source
    /// alone: an event a plugin failed may be its own output (a plugin subscribed to what it
    /// publishes).
    pub const FAILED_IN: &str = "plugbus-failed-in";
    /// On a dead letter of a dead letter: how deep (1). One that fails again is only logged.
    pub const DEPTH: &str = "plugbus-dead-letter-depth";
    /// On a dead letter published without its event's data (with it, it would be over the
    /// broker's largest message, or its stream's): what was left out, and why. Never replayed.
    pub const DATA_OMITTED: &str = "plugbus-data-omitted";
}

/// The longest `plugbus-error` a dead letter carries: the failure text is built from pieces
/// each cut at [`ECHO_BYTES`]; this bounds the whole.
pub const MAX_ERROR_BYTES: usize = 2 * ECHO_BYTES;

/// Builds the dead-letter event of `original`; `error` is cut at [`MAX_ERROR_BYTES`].
pub fn dead_letter_event(original: &Event, plugin: &str, subject: &str, error: &str, attempts: u32) -> Event {
    // The host's marks are its own to set, but one that says the original lacks its data stays
    // (a dead letter of such a dead letter must not be replayed as whole either).
    let mut extensions: Vec<(String, String)> = original
        .extensions
        .iter()
        .filter(|(k, _)| !k.starts_with("plugbus-") || (k == headers::DATA_OMITTED && is_dead_letter(original)))
        .cloned()
        .collect();
    extensions.extend([
        (headers::ERROR.to_string(), cut_to(error, MAX_ERROR_BYTES).into_owned()),
        (headers::PLUGIN.to_string(), plugin.to_string()),
        (headers::ATTEMPTS.to_string(), attempts.to_string()),
        (headers::ORIGINAL_SUBJECT.to_string(), original.subject.clone()),
        (headers::ORIGINAL_ID.to_string(), original.id.clone()),
        (headers::FAILED_AT.to_string(), now_rfc3339()),
        (headers::ORIGINAL_SOURCE.to_string(), original.source.clone()),
    ]);
    let depth = nesting(original);
    if depth > 0 {
        extensions.push((headers::DEPTH.to_string(), depth.to_string()));
    }
    Event {
        id: dead_letter_id(original, plugin),
        source: crate::event::plugin_source(plugin),
        ty: original.ty.clone(),
        subject: subject.to_string(),
        time: original.time.clone(),
        datacontenttype: original.datacontenttype.clone(),
        extensions,
        data: original.data.clone(),
        reply_to: None,
    }
}

/// The id of `plugin`'s dead letter of `original`: made of the original's source and id, the
/// plugin, and the original's subject and data, so `original` redelivered and failing again
/// (on any host, after a crash) makes the same dead letter (the store replaces it, JetStream
/// drops the copy by its `Nats-Msg-Id`), and an event sent again under the same source and id
/// with other data, or on another subject, makes one of its own. (Made of the source, id and
/// plugin alone, the second was dropped by JetStream as a duplicate of the first, and a bulk
/// replay forgot the host's copy of it.)
pub fn dead_letter_id(original: &Event, plugin: &str) -> String {
    crate::event::IdDigest::of(&original.source, &original.id, plugin, usize::MAX)
        .field(original.subject.as_bytes())
        .field(&original.data)
        .hex()
}

/// How deep a dead letter of `original` would be: 0 for an ordinary event, one more than the
/// original's depth when it carries the host's dead-letter mark.
pub fn nesting(original: &Event) -> u32 {
    if !is_dead_letter(original) {
        return 0;
    }
    original.header(headers::DEPTH).and_then(|d| d.parse::<u32>().ok()).unwrap_or(0).saturating_add(1)
}

/// Whether `event` is itself a dead letter (its failure is logged, never dead-lettered again).
///
/// The mark is the host's: `source` is `plugbus/<plugin>` *and* a `plugbus-error` header is
/// present. A plugin's output has that source but can never carry a `plugbus-*` header; an
/// event from outside with a `plugbus-error` header does not have a `plugbus/` source unless a
/// publisher with direct access to the bus forges both (the bus is the operator's: see
/// ARCHITECTURE.md's trust boundaries).
pub fn is_dead_letter(event: &Event) -> bool {
    event.source.starts_with("plugbus/") && event.header(headers::ERROR).is_some()
}

/// The event a replay publishes: the original subject, data and headers, and an id of its own
/// made from the dead letter's (source, id). The same dead letter replayed twice (two replays
/// at once on two hosts, or a replay repeated after one that timed out but landed) is the same
/// event: JetStream drops the second copy by its `Nats-Msg-Id` within the stream's duplicate
/// window, so the handler runs it once. A dead letter of that replay has an id of its own, so
/// replaying it again is a new event.
///
/// Refused (the error says why) when the dead letter names no original subject, or one a
/// client could not publish to: invalid, or a system subject (`$…`, `_INBOX…`). A dead letter
/// kept by a broker is only as trustworthy as whoever could publish on `plugbus.dlq.*`, and a
/// replay is published with the host's credentials.
pub fn replay_event(dead: &Event) -> Result<Event, String> {
    let subject = dead
        .header(headers::ORIGINAL_SUBJECT)
        .ok_or_else(|| format!("it names no original subject ({})", headers::ORIGINAL_SUBJECT))?
        .to_string();
    if let Err(e) = crate::subject::validate_subject(&subject) {
        return Err(format!("its original subject is not valid: {e}"));
    }
    if crate::subject::is_system_subject(&subject) {
        return Err(format!(
            "its original subject {} is a system subject (`$…`, `_INBOX…`), which is never replayed",
            crate::event::quoted(&subject)
        ));
    }

    if let Some(why) = dead.header(headers::DATA_OMITTED) {
        return Err(format!(
            "it does not carry its event's data ({}), so a replay would publish an event without it: \
             replay it on the host that dead-lettered it, which keeps it whole",
            crate::event::quoted(why)
        ));
    }
    let mut ev = Event::new(subject, dead.data.clone());
    // The dead letter's time is in it: the same event failing again later (a rewind, sent
    // again) makes a dead letter of the same id, whose replay is a new event, not the first's
    // (the embedded bus logs a replay once: review 60e H1). Every host lists a broker's dead
    // letter with its time, so replays of it on two hosts are still one event.
    let instance = match dead.header(headers::FAILED_AT) {
        Some(at) => format!("{}\u{0}{at}", dead.id),
        None => dead.id.clone(),
    };
    ev.id = crate::event::output_id(&dead.source, &instance, REPLAYER, 0);
    ev.ty = dead.ty.clone();
    ev.datacontenttype = dead.datacontenttype.clone();
    ev.extensions = dead.extensions.iter().filter(|(k, _)| !k.starts_with("plugbus-")).cloned().collect();
    ev.extensions.push((headers::REPLAY_OF.to_string(), dead.id.clone()));
    if let Some(plugin) = failed_in(dead) {
        ev.extensions.push((headers::REPLAY_FOR.to_string(), plugin.to_string()));
    }
    Ok(ev)
}

/// Marks `dead` as the dead letter of an event `plugin`'s delivery failed ([`headers::FAILED_IN`]):
/// its replay is for that plugin alone, even when the event was the plugin's own output.
pub fn mark_failed_in(dead: &mut Event, plugin: &str) {
    dead.extensions.push((headers::FAILED_IN.to_string(), plugin.to_string()));
}

/// The plugin whose delivery failed the event `dead` is the dead letter of, the one its replay
/// is for ([`headers::REPLAY_FOR`]); `None` for the dead letter of an output the bus did not
/// take (it reached no one), whose replay goes to every subscriber.
///
/// Read from [`headers::FAILED_IN`] when it names the plugin that dead-lettered it. A dead
/// letter without it (kept by a host before the mark existed) is told by its original source:
/// the plugin's own (`plugbus/<plugin>`) reads as an output not taken, so such an old dead
/// letter of an event a plugin failed that was its own output still goes to every subscriber.
pub fn failed_in(dead: &Event) -> Option<&str> {
    let plugin = dead.header(headers::PLUGIN)?;
    if dead.header(headers::FAILED_IN) == Some(plugin) {
        return Some(plugin);
    }
    let output = dead.header(headers::ORIGINAL_SOURCE) == Some(crate::event::plugin_source(plugin).as_str());
    (!output).then_some(plugin)
}

/// The most of a dead letter's original headers a summary lists ([`summary_headers`]).
pub const SUMMARY_HEADERS: usize = 64;
/// The most bytes of each such header's name and value a summary lists.
pub const SUMMARY_HEADER_BYTES: usize = 256;
/// The most of the host's own headers (`plugbus-*`) a summary lists: the host writes about ten,
/// but a NATS publisher can forge more (on `PLUGBUS_DLQ`, or `plugbus-data-omitted` on an
/// event that looks like a dead letter).
pub const SUMMARY_HOST_HEADERS: usize = 32;

/// A dead letter's headers as a listing's summary shows them: the last
/// [`SUMMARY_HOST_HEADERS`] of the host's own (`plugbus-*`: which plugin, when, why), each value
/// cut at [`MAX_ERROR_BYTES`] (the error's own bound), and the first [`SUMMARY_HEADERS`] of the
/// others, each name and value cut at [`SUMMARY_HEADER_BYTES`]. A summary costs at most about
/// 160 KiB a dead letter, whatever its headers (up to 1,024 and 1,024 more `plugbus-*`).
pub fn summary_headers(dead: &Event) -> Vec<(String, String)> {
    let host = |name: &str| name.starts_with("plugbus-");
    let cut = |limit: usize| {
        move |(k, v): &(String, String)| (cut_to(k, SUMMARY_HEADER_BYTES).into_owned(), cut_to(v, limit).into_owned())
    };
    let theirs = dead.extensions.iter().filter(|(k, _)| !host(k)).take(SUMMARY_HEADERS);
    // The last: the host appends its own after those it kept of the original's.
    let ours: Vec<_> = dead.extensions.iter().filter(|(k, _)| host(k)).collect();
    let ours = &ours[ours.len().saturating_sub(SUMMARY_HOST_HEADERS)..];
    theirs.map(cut(SUMMARY_HEADER_BYTES)).chain(ours.iter().copied().map(cut(MAX_ERROR_BYTES))).collect()
}

/// Whether `event` is the replay of a dead letter that another plugin than `plugin` failed:
/// `plugin` lets it go unrun.
pub fn is_replay_for_another(event: &Event, plugin: &str) -> bool {
    replay_for(event).is_some_and(|p| p != plugin)
}

/// The plugin `event` is the replay of a dead letter for (`plugbus-replay-for`), if it is one.
pub fn replay_for(event: &Event) -> Option<&str> {
    event.header(headers::REPLAY_FOR)
}

/// The name replays are made under in [`replay_event`]'s id (not a valid plugin name, so no
/// plugin's output can have the id of a replay).
const REPLAYER: &str = "plugbus/replay";

/// What the failed attempt of a dead letter saw, kept with it in this host's store (never on
/// the bus): enough to run it again exactly (`POST /v1/dlq/{id}/debug`). Bounded: the reads
/// and lines at [`crate::sandbox::MAX_SEEN_BYTES`], the error at [`MAX_ERROR_BYTES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// The content hash of the plugin version that failed.
    pub version: String,
    /// The attempt number that failed (what the handler saw as `attempt`).
    pub attempt: u32,
    /// Why it failed.
    pub error: String,
    /// What it read (kv, config) and logged.
    #[serde(flatten)]
    pub seen: crate::sandbox::Seen,
}

impl Record {
    /// The record of a failed attempt of `version`; `error` is cut at [`MAX_ERROR_BYTES`].
    pub fn new(version: &str, attempt: u32, error: &str, seen: crate::sandbox::Seen) -> Self {
        Self { version: version.to_string(), attempt, error: cut_to(error, MAX_ERROR_BYTES).into_owned(), seen }
    }

    /// The bytes the store charges for it.
    fn bytes(&self) -> usize {
        self.version.len() + self.error.len() + self.seen.bytes()
    }
}

/// What [`DeadLetters::newest`] answers: the page (oldest first), how many are kept in all,
/// and how many of the page it left out for its bytes.
pub type Newest = (Vec<Entry>, usize, usize);

/// A kept dead letter.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// Sequence number in this host.
    pub seq: u64,
    /// The plugin that failed.
    pub plugin: String,
    /// The dead-letter event (as published).
    #[serde(serialize_with = "serialize_event")]
    pub event: Event,
    /// What the failed attempt saw (`None`: the event never ran, or a broker keeps it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<Box<Record>>,
}

impl Entry {
    /// Whether this is `plugin`'s dead letter of `original`: its source, id, subject and data, as
    /// the dead letter's headers name them (one kept by an older version, whose id was made
    /// otherwise, too).
    fn is_of(&self, plugin: &str, original: &Event) -> bool {
        self.plugin == plugin
            && same_original(&self.event, Some(&original.source), Some(&original.id))
            && self.event.header(headers::ORIGINAL_SUBJECT) == Some(original.subject.as_str())
            && self.event.data == original.data
    }
}

fn serialize_event<S: serde::Serializer>(ev: &Event, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(None)?;
    m.serialize_entry("id", &ev.id)?;
    m.serialize_entry("subject", &ev.subject)?;
    m.serialize_entry("headers", &ev.extensions)?;
    m.serialize_entry("data", &String::from_utf8_lossy(&ev.data))?;
    // The rest of the event, exact, so a dead letter can be turned back into the event that
    // failed (`plugbus dlq export`).
    m.serialize_entry("type", &ev.ty)?;
    m.serialize_entry("time", &ev.time)?;
    m.serialize_entry("datacontenttype", &ev.datacontenttype)?;
    if std::str::from_utf8(&ev.data).is_err() {
        m.serialize_entry("data_base64", &crate::cloudevents::base64_encode(&ev.data))?;
    }
    m.end()
}

/// What one kept entry costs on top of its bytes (the entry, its strings' and the deque's
/// bookkeeping), so many tiny dead letters are charged too.
const ENTRY_OVERHEAD: usize = 256;

/// The default byte budget of the kept store (see [`DeadLetters::with_max_bytes`]).
pub const DEFAULT_MAX_BYTES: usize = 64 << 20;

/// How many of one plugin's dead letters may wait in the file's queue at once
/// ([`DeadLetters::keep`]): the rest wait in that plugin's own deliveries, so a plugin
/// dead-lettering a flood puts at most this many writes (each an `fsync`) ahead of another's.
pub const KEEPS_QUEUED_PER_PLUGIN: usize = 2;

/// How many bytes of records one plugin's dead letters may hold while they wait to be kept: past
/// it a dead letter is kept without its record (logged), so a flood of failures that each read
/// 1 MiB of kv does not hold a record each in memory.
pub const RECORD_BYTES_WAITING_PER_PLUGIN: usize = 16 << 20;

/// Whether two entries are the same plugin's dead letter of the same event: the same original
/// (source, id and subject, as their headers name it) with the same data, on the same
/// dead-letter subject. Not by id: one kept by an older version has an id made of the source,
/// id and plugin alone, and a new one of the same event (its input failing again after a kill)
/// must replace it all the same.
fn same_dead_letter(a: &Entry, b: &Entry) -> bool {
    a.plugin == b.plugin
        && a.event.subject == b.event.subject
        && same_original(&a.event, b.event.header(headers::ORIGINAL_SOURCE), b.event.header(headers::ORIGINAL_ID))
        && a.event.header(headers::ORIGINAL_SUBJECT) == b.event.header(headers::ORIGINAL_SUBJECT)
        && a.event.data == b.event.data
}

/// Whether `dead` is a dead letter of an event of `source` and `id` (a dead letter that names no
/// source, from a version before it did, is of any).
fn same_original(dead: &Event, source: Option<&str>, id: Option<&str>) -> bool {
    let of_source = match (original_source_named(dead), source) {
        (Some(a), Some(b)) => a == b,
        _ => true,
    };
    of_source && id.is_some() && dead.header(headers::ORIGINAL_ID) == id
}

/// The source `dead`'s headers name for its event, if they do.
fn original_source_named(dead: &Event) -> Option<&str> {
    dead.extensions.iter().rev().find(|(k, _)| k == headers::ORIGINAL_SOURCE).map(|(_, v)| v.as_str())
}

/// The bytes the store charges for keeping `entry`.
fn kept_bytes(entry: &Entry) -> usize {
    entry_bytes(&entry.plugin, &entry.event) + entry.record.as_ref().map_or(0, |r| r.bytes())
}

/// The bytes the store charges for keeping `ev`.
fn entry_bytes(plugin: &str, ev: &Event) -> usize {
    let strings = [&ev.id, &ev.source, &ev.ty, &ev.subject, &ev.time].iter().map(|s| s.len()).sum::<usize>();
    let headers = ev.extensions.iter().map(|(k, v)| k.len() + v.len() + 64).sum::<usize>();
    ENTRY_OVERHEAD
        + plugin.len()
        + strings
        + ev.datacontenttype.as_ref().map_or(0, String::len)
        + ev.reply_to.as_ref().map_or(0, String::len)
        + headers
        + ev.data.len()
}

/// The kept entries, oldest first, with what each plugin holds of them.
#[derive(Default)]
struct Kept {
    items: VecDeque<Entry>,
    bytes: usize,
    /// What each plugin holds: the store's bounds are shared, and a plugin over its share loses
    /// its own oldest first, never another plugin's.
    by_plugin: HashMap<String, Held>,
}

/// Entries and bytes one plugin's dead letters hold: in all, and by the source of the events
/// they are of ([`original_source`]). The outputs one plugin floods another with that fail there
/// are the other's dead letters, of the flooding plugin's source: they go first, before the
/// other's own older ones of the events it exists for.
#[derive(Default)]
struct Held {
    all: (usize, usize),
    by_source: HashMap<String, (usize, usize)>,
    /// Entries by the id of the event they are of: a lookup of one event's dead letter (each
    /// event handled after a read-back from the log, each of its outputs) scans the store only
    /// when it may be there, not whenever the plugin holds one of the same source (review 55c M2).
    by_id: HashMap<String, usize>,
}

/// The source of the event `dead` is the dead letter of (`plugbus/<plugin>` for a plugin's
/// output); empty when it names none. Looked for from the end: the host adds its own headers last.
fn original_source(dead: &Event) -> &str {
    original_source_named(dead).unwrap_or_default()
}

impl Kept {
    fn count(&mut self, entry: &Entry, added: bool) {
        let size = kept_bytes(entry);
        let source = original_source(&entry.event);
        let id = entry.event.header(headers::ORIGINAL_ID).unwrap_or_default();
        if added {
            let held = self.by_plugin.entry(entry.plugin.clone()).or_default();
            let of_source = held.by_source.entry(source.to_string()).or_default();
            *of_source = (of_source.0 + 1, of_source.1 + size);
            *held.by_id.entry(id.to_string()).or_default() += 1;
            held.all = (held.all.0 + 1, held.all.1 + size);
            self.bytes += size;
            return;
        }
        self.bytes -= size;
        let Some(held) = self.by_plugin.get_mut(&entry.plugin) else { return };
        held.all = (held.all.0 - 1, held.all.1 - size);
        if let Some(of_source) = held.by_source.get_mut(source) {
            *of_source = (of_source.0 - 1, of_source.1 - size);
            if of_source.0 == 0 {
                held.by_source.remove(source);
            }
        }
        if let Some(of_id) = held.by_id.get_mut(id) {
            *of_id -= 1;
            if *of_id == 0 {
                held.by_id.remove(id);
            }
        }
        if held.all.0 == 0 {
            self.by_plugin.remove(&entry.plugin);
        }
    }

    /// Whether `plugin` may hold a dead letter of `original`: one of its source, or one that names
    /// none (kept by an older version). Counted, so the redeliveries and outputs that look for
    /// one scan the store only when it may be there.
    fn may_hold(&self, plugin: &str, original: &Event) -> bool {
        self.by_plugin.get(plugin).is_some_and(|held| {
            (held.by_source.contains_key(&original.source) || held.by_source.contains_key(""))
                && held.by_id.contains_key(&original.id)
        })
    }

    fn push_back(&mut self, entry: Entry) {
        self.count(&entry, true);
        self.items.push_back(entry);
    }

    fn push_front(&mut self, entry: Entry) {
        self.count(&entry, true);
        self.items.push_front(entry);
    }

    fn remove(&mut self, at: usize) -> Option<Entry> {
        let entry = self.items.remove(at)?;
        self.count(&entry, false);
        Some(entry)
    }

    /// Removes and returns the entries `pick` chooses, oldest first.
    fn take_where(&mut self, pick: impl Fn(&Entry) -> bool) -> Vec<Entry> {
        let (taken, rest): (Vec<Entry>, Vec<Entry>) = self.items.drain(..).partition(pick);
        self.items.extend(rest);
        for e in &taken {
            self.count(e, false);
        }
        taken
    }

    /// Removes the entry that is `entry` kept before (the same plugin's dead letter of the same
    /// event: its id is derived from both), returning its number. It is there when the host was
    /// killed after keeping it and before settling its input, which then failed again.
    fn remove_same(&mut self, entry: &Entry) -> Option<u64> {
        let at = self.items.iter().position(|e| same_dead_letter(e, entry))?;
        self.remove(at).map(|old| old.seq)
    }

    /// The oldest entry of the plugin holding the most of what is over its bound (entries when
    /// `by_count`, bytes otherwise), of the events' source it holds the most of; of plugins and
    /// sources holding as much, the oldest entry of them.
    fn eviction_victim(&self, by_count: bool) -> Option<usize> {
        let held = |&(count, bytes): &(usize, usize)| if by_count { count } else { bytes };
        let most = self.by_plugin.values().map(|h| held(&h.all)).max()?;
        let holds_most = |h: &&Held| held(&h.all) == most;
        let largest = self.by_plugin.values().filter(holds_most).flat_map(|h| h.by_source.values()).map(held).max()?;
        self.items.iter().position(|e| {
            let held_by = self.by_plugin.get(&e.plugin).filter(holds_most);
            held_by.and_then(|h| h.by_source.get(original_source(&e.event))).is_some_and(|s| held(s) == largest)
        })
    }
}

/// The dead letters this host produced, newest last, bounded in count and in bytes (the
/// oldest go first, logged: they were published on their dead-letter subjects).
pub struct DeadLetters {
    kept: Mutex<Kept>,
    next: AtomicU64,
    cap: usize,
    max_bytes: usize,
    /// Where they are kept across restarts (`None`: in memory only).
    file: Option<crate::dlq_file::DlqFile>,
    /// What the file missed while it failed writes, made when it next takes one.
    unwritten: Mutex<Unwritten>,
    /// Turns at the file: one write at a time takes a blocking thread ([`DeadLetters::keep`]).
    file_turn: Arc<tokio::sync::Mutex<()>>,
    /// Each plugin's share of the file's queue and of the records waiting.
    shares: Mutex<HashMap<String, Arc<KeepShare>>>,
}

/// One plugin's share of what dead letters waiting to be kept hold.
struct KeepShare {
    /// Places in the file's queue ([`KEEPS_QUEUED_PER_PLUGIN`]).
    queued: Arc<tokio::sync::Semaphore>,
    /// KiB of records waiting ([`RECORD_BYTES_WAITING_PER_PLUGIN`]).
    record_kib: Arc<tokio::sync::Semaphore>,
}

/// Changes the dead-letter file missed (a full disk): entries to write (those still kept then)
/// and entries to remove (a replay's `forget`, an eviction).
#[derive(Default)]
struct Unwritten {
    inserts: std::collections::BTreeSet<u64>,
    removes: std::collections::BTreeSet<u64>,
}

impl Unwritten {
    fn is_empty(&self) -> bool {
        self.inserts.is_empty() && self.removes.is_empty()
    }
}

/// What one eviction forgot: the entries' numbers, their bytes, and the first one's plugin and
/// event id (for the log line).
struct Evicted {
    gone: Vec<u64>,
    freed: usize,
    oldest: Option<(String, String)>,
}

impl DeadLetters {
    /// A store keeping at most `cap` dead letters and [`DEFAULT_MAX_BYTES`] bytes.
    pub fn new(cap: usize) -> Self {
        Self::with_max_bytes(cap, DEFAULT_MAX_BYTES)
    }

    /// A store keeping at most `cap` dead letters and `max_bytes` bytes (data, headers and a
    /// fixed cost per entry).
    pub fn with_max_bytes(cap: usize, max_bytes: usize) -> Self {
        Self {
            kept: Mutex::new(Kept::default()),
            next: AtomicU64::new(1),
            cap: cap.max(1),
            max_bytes,
            file: None,
            unwritten: Mutex::default(),
            file_turn: Arc::default(),
            shares: Mutex::default(),
        }
    }

    /// A store like [`DeadLetters::new`] kept in `file` too: what it held at the last stop is
    /// back, and every change is written through.
    pub fn persistent(cap: usize, path: &std::path::Path) -> Result<Self, crate::dlq_file::DlqFileError> {
        let (file, kept, next) = crate::dlq_file::DlqFile::open(path)?;
        let mut store = Self::with_max_bytes(cap, DEFAULT_MAX_BYTES);
        store.next.fetch_max(next, Ordering::Relaxed);
        // The same plugin's dead letter of the same event twice (a kill between writing the newer
        // and removing the older): the newer is kept.
        let mut newest = std::collections::HashMap::new();
        for (seq, plugin, event, _) in &kept {
            newest.insert((plugin.as_str(), event.id.as_str(), event.subject.as_str(), &event.data[..]), *seq);
        }
        let newest: std::collections::HashSet<u64> = newest.into_values().collect();
        let mut replaced = Vec::new();
        {
            let mut k = store.kept.lock().expect("dlq poisoned");
            for (seq, plugin, event, record) in kept {
                store.next.fetch_max(seq + 1, Ordering::Relaxed);
                match newest.contains(&seq) {
                    true => k.push_back(Entry { seq, plugin, event, record }),
                    false => replaced.push(seq),
                }
            }
        }
        store.file = Some(file);
        if !replaced.is_empty() {
            store.write_remove(&replaced);
        }
        // A replay cut short by a crash leaves its entries in the file beside newer ones.
        let evicted = store.evict(&mut store.kept.lock().expect("dlq poisoned"));
        store.forget_evicted(evicted);
        Ok(store)
    }

    /// Writes a new entry through to the file; `true` when the file has it. A failure is logged
    /// and remembered: the entry is kept here, and written with the file's next write that
    /// succeeds (if it is still kept then), so a full disk that frees up loses nothing.
    fn write_insert(&self, entry: &Entry) -> bool {
        let Some(file) = &self.file else { return false };
        let mut unwritten = self.unwritten.lock().expect("dlq poisoned");
        match file.insert(entry.seq, &entry.plugin, &entry.event, entry.record.as_deref()) {
            Ok(()) => {
                self.catch_up(file, &mut unwritten);
                true
            }
            Err(e) => {
                unwritten.inserts.insert(entry.seq);
                tracing::error!(plugin = %entry.plugin, event_id = %entry.event.id,
                    "dead letter kept in memory only for now (written once the file takes writes again): {e}");
                false
            }
        }
    }

    /// Removes entries from the file (those it never got need nothing). A failure is logged and
    /// remembered, and the removal made with the file's next write that succeeds: a replayed
    /// dead letter must not come back at the next start and run again.
    fn write_remove(&self, seqs: &[u64]) {
        let Some(file) = &self.file else { return };
        let mut unwritten = self.unwritten.lock().expect("dlq poisoned");
        let seqs: Vec<u64> = seqs.iter().copied().filter(|seq| !unwritten.inserts.remove(seq)).collect();
        if seqs.is_empty() {
            return;
        }
        match file.remove(&seqs) {
            Ok(()) => self.catch_up(file, &mut unwritten),
            Err(e) => {
                unwritten.removes.extend(seqs);
                tracing::error!(
                    "dead letters not removed from the file for now (removed once it takes writes again): {e}"
                );
            }
        }
    }

    /// Makes the changes the file missed while it failed writes (a dead letter kept in memory
    /// only, a removal not made), if any: the host calls it every few seconds and at its stop,
    /// so one the disk refused is not lost with the process when no later write comes. `false`
    /// while something is still not written (logged).
    pub fn write_missed(&self) -> bool {
        let Some(file) = &self.file else { return true };
        let mut unwritten = self.unwritten.lock().expect("dlq poisoned");
        if unwritten.is_empty() {
            return true;
        }
        self.catch_up(file, &mut unwritten);
        unwritten.is_empty()
    }

    /// Whether the file missed changes ([`DeadLetters::write_missed`] has work).
    pub fn missed_writes(&self) -> bool {
        self.file.is_some() && !self.unwritten.lock().expect("dlq poisoned").is_empty()
    }

    /// After a write that succeeded: makes the changes the file missed while it failed.
    fn catch_up(&self, file: &crate::dlq_file::DlqFile, unwritten: &mut Unwritten) {
        if !unwritten.removes.is_empty() {
            let seqs: Vec<u64> = unwritten.removes.iter().copied().collect();
            if let Err(e) = file.remove(&seqs) {
                tracing::error!("dead letters still not removed from the file: {e}");
                return;
            }
            unwritten.removes.clear();
        }
        if unwritten.inserts.is_empty() {
            return;
        }
        // Those taken by a replay meanwhile wait for it: forgotten, or put back and written.
        let missed: Vec<Entry> = {
            let kept = self.kept.lock().expect("dlq poisoned");
            kept.items.iter().filter(|e| unwritten.inserts.contains(&e.seq)).cloned().collect()
        };
        for e in &missed {
            if let Err(err) = file.insert(e.seq, &e.plugin, &e.event, e.record.as_deref()) {
                tracing::error!("dead letters still kept in memory only: {err}");
                return;
            }
            unwritten.inserts.remove(&e.seq);
        }
        if !missed.is_empty() {
            tracing::info!(
                written = missed.len(),
                "dead letters kept in memory while the file failed writes are in it now"
            );
        }
    }

    /// Keeps one as [`DeadLetters::push_recorded`] does, from a runtime thread: the write (and
    /// its `fsync`) runs on the blocking pool, one at a time (so a flood of dead letters takes
    /// one blocking thread, not every one, from outbound DNS lookups, kv commits and reloads),
    /// with at most [`KEEPS_QUEUED_PER_PLUGIN`] of one plugin's in the queue for it. A record
    /// that would take the plugin past [`RECORD_BYTES_WAITING_PER_PLUGIN`] waiting is left out.
    pub async fn keep(self: &Arc<Self>, plugin: &str, event: Event, mut record: Option<Box<Record>>) -> bool {
        let share = self.share_of(plugin);
        let record_held = match &record {
            Some(r) => {
                let kib = u32::try_from(r.bytes().div_ceil(1024).max(1)).unwrap_or(u32::MAX);
                let held = share.record_kib.clone().try_acquire_many_owned(kib).ok();
                if held.is_none() {
                    tracing::warn!(plugin, event_id = %event.id, record_bytes = r.bytes(),
                        "dead letter kept without the record of its failed attempt: the plugin's dead letters waiting to be \
                         kept hold 16 MiB of records already (it fails faster than they are written)");
                    record = None;
                }
                held
            }
            None => None,
        };
        let queued = share.queued.clone().acquire_owned().await.expect("never closed");
        let turn = self.file_turn.clone().lock_owned().await;
        let (store, plugin) = (self.clone(), plugin.to_string());
        let kept = tokio::task::spawn_blocking(move || {
            let _held = (turn, queued, record_held);
            store.push_recorded(&plugin, event, record)
        });
        // Only a panic in the store ends it otherwise: then it was not kept whole (what its file
        // holds is read again at the next start).
        kept.await.unwrap_or_else(|e| {
            tracing::error!("keeping a dead letter failed: {e}");
            false
        })
    }

    /// `plugin`'s share of what waits to be kept.
    fn share_of(&self, plugin: &str) -> Arc<KeepShare> {
        let mut shares = self.shares.lock().expect("dlq poisoned");
        shares
            .entry(plugin.to_string())
            .or_insert_with(|| {
                Arc::new(KeepShare {
                    queued: Arc::new(tokio::sync::Semaphore::new(KEEPS_QUEUED_PER_PLUGIN)),
                    record_kib: Arc::new(tokio::sync::Semaphore::new(RECORD_BYTES_WAITING_PER_PLUGIN >> 10)),
                })
            })
            .clone()
    }

    /// Keeps one (a dead letter larger than the whole budget is not kept, logged).
    pub fn push(&self, plugin: &str, event: Event) {
        let _ = self.push_recorded(plugin, event, None);
    }

    /// Keeps one with what its failed attempt saw. `true` ("kept whole") only when a copy that
    /// survives a restart is kept: it is in the file and was not forgotten at once to stay
    /// within the bounds. `false` when it is over the store's `max_bytes` on its own (not kept),
    /// in memory only, or when the file did not take it (kept here, written later).
    pub fn push_recorded(&self, plugin: &str, event: Event, record: Option<Box<Record>>) -> bool {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let entry = Entry { seq, plugin: plugin.to_string(), event, record };
        let size = kept_bytes(&entry);
        if size > self.max_bytes {
            tracing::warn!(plugin, event_id = %entry.event.id, bytes = size, max_bytes = self.max_bytes,
                "dead letter too large to keep for replay (it is published on its dead-letter subject whole, or not at all)");
            return false;
        }
        // Written before it is listed: a removal of it (by whoever evicts it) comes after.
        let in_file = self.write_insert(&entry);
        let (evicted, replaced) = {
            let mut kept = self.kept.lock().expect("dlq poisoned");
            let replaced = kept.remove_same(&entry);
            kept.push_back(entry);
            (self.evict(&mut kept), replaced)
        };
        let still_kept = !evicted.gone.contains(&seq);
        // Outside the lock: the list, the API and other dead letters do not wait for the file.
        if let Some(old) = replaced {
            self.write_remove(&[old]);
        }
        self.forget_evicted(evicted);
        in_file && still_kept
    }

    /// Forgets entries until the store is within its bounds, each time the oldest of the plugin
    /// holding the most: a plugin that floods the store forgets its own, and can push another
    /// plugin down to an equal share of the bound, never below. Returns what it forgot, for
    /// [`DeadLetters::forget_evicted`] to remove from the file and log once the lock is let go.
    fn evict(&self, kept: &mut Kept) -> Evicted {
        let (mut freed, mut oldest) = (0usize, None);
        let mut gone = Vec::new();
        while kept.items.len() > self.cap || kept.bytes > self.max_bytes {
            let by_count = kept.items.len() > self.cap;
            let Some(old) = kept.eviction_victim(by_count).and_then(|at| kept.remove(at)) else { break };
            gone.push(old.seq);
            freed += kept_bytes(&old);
            oldest.get_or_insert((old.plugin, old.event.id));
        }
        Evicted { gone, freed, oldest }
    }

    /// Removes what [`DeadLetters::evict`] forgot from the file, with one log line.
    fn forget_evicted(&self, evicted: Evicted) {
        let Evicted { gone, freed, oldest } = evicted;
        if !gone.is_empty() {
            self.write_remove(&gone);
        }
        if let Some((plugin, event_id)) = oldest {
            tracing::warn!(plugin = %plugin, event_id = %event_id, forgotten = gone.len(), freed_bytes = freed,
                max_entries = self.cap, max_bytes = self.max_bytes,
                "dead-letter store full: the oldest entries of the plugin holding the most forgotten (they were published on their dead-letter subjects; on NATS whole only when the broker took them whole)");
        }
    }

    /// The kept dead letters, optionally of one plugin.
    pub fn list(&self, plugin: Option<&str>) -> Vec<Entry> {
        let kept = self.kept.lock().expect("dlq poisoned");
        kept.items.iter().filter(|e| plugin.is_none_or(|p| e.plugin == p)).cloned().collect()
    }

    /// The newest `limit` kept dead letters (optionally of one plugin), oldest first, and how many
    /// are kept in all (of that plugin): a page can poll this without copying the whole store.
    ///
    /// Without `records` (a listing's summary), each without its record (up to 1 MiB to copy
    /// under the store's lock) and with its headers as a summary lists them
    /// ([`summary_headers`]): a client's event of a thousand 1 KiB headers made each summary
    /// copy a megabyte under the lock, on a runtime thread.
    ///
    /// The copies stop at `max_bytes` (what the store charges for each, less a summary's data,
    /// which is shared): one that would pass it is left out, and counted in the last number
    /// returned. A summary of the whole store copied up to its 64 MiB (review 60a M2).
    pub fn newest(&self, plugin: Option<&str>, limit: usize, records: bool, max_bytes: usize) -> Newest {
        let kept = self.kept.lock().expect("dlq poisoned");
        let mine = |e: &&Entry| plugin.is_none_or(|p| e.plugin == p);
        let total = kept.items.iter().filter(mine).count();
        let copy = |e: &Entry| Entry {
            seq: e.seq,
            plugin: e.plugin.clone(),
            event: if records {
                e.event.clone()
            } else {
                let ev = &e.event;
                Event {
                    id: ev.id.clone(),
                    source: ev.source.clone(),
                    ty: ev.ty.clone(),
                    subject: ev.subject.clone(),
                    time: ev.time.clone(),
                    datacontenttype: ev.datacontenttype.clone(),
                    extensions: summary_headers(ev),
                    data: ev.data.clone(),
                    reply_to: None,
                }
            },
            record: if records { e.record.clone() } else { None },
        };
        let (mut newest, mut bytes, mut left_out) = (Vec::new(), 0, 0);
        for e in kept.items.iter().rev().filter(mine).take(limit) {
            let cost = match records {
                true => kept_bytes(e),
                false => entry_bytes(&e.plugin, &e.event).saturating_sub(e.event.data.len()),
            };
            // (A summary's cost is the original's: its headers as listed cost less.)
            if bytes + cost > max_bytes {
                left_out += 1;
                continue;
            }
            bytes += cost;
            newest.push(copy(e));
        }
        newest.reverse();
        (newest, total, left_out)
    }

    /// The dead letter kept of `plugin`'s delivery of `original` (its source, id, subject and
    /// data, as the dead letter's headers name them: one kept by an older version, whose id was
    /// made otherwise, too), and whether the file has it (a broker may then take it without its
    /// data).
    pub fn kept_for(&self, plugin: &str, original: &Event) -> Option<(Event, bool)> {
        let entry = {
            let kept = self.kept.lock().expect("dlq poisoned");
            if !kept.may_hold(plugin, original) {
                return None;
            }
            kept.items.iter().find(|e| e.is_of(plugin, original)).map(|e| (e.seq, e.event.clone()))?
        };
        let (seq, event) = entry;
        let in_file = self.file.is_some() && !self.unwritten.lock().expect("dlq poisoned").inserts.contains(&seq);
        Some((event, in_file))
    }

    /// Removes the dead letter kept of `plugin`'s output `output` (not of a delivery: one
    /// [`failed_in`] names no plugin), to [`forget`](Self::forget) once the output itself was
    /// published: a later delivery of the input published it after its dead letter reached no
    /// broker, and a replay would send it twice.
    pub fn take_unpublished_output(&self, plugin: &str, output: &Event) -> Option<Entry> {
        self.take_of(plugin, output, None)
    }

    /// Removes the dead letter kept of `plugin`'s delivery of `original` (not of an output), to
    /// [`forget`](Self::forget) once `original` was handled: run again (read back from the log
    /// after a crash before its ack was written, or for a replay) it succeeded, and a replay of
    /// the dead letter would run it twice.
    pub fn take_delivery_dead_letter(&self, plugin: &str, original: &Event) -> Option<Entry> {
        self.take_of(plugin, original, Some(plugin))
    }

    /// Removes `plugin`'s dead letter of `original` that [`failed_in`] says failed in `failed_in`
    /// (`None`: an output's).
    fn take_of(&self, plugin: &str, original: &Event, failed: Option<&str>) -> Option<Entry> {
        let mut kept = self.kept.lock().expect("dlq poisoned");
        if !kept.may_hold(plugin, original) {
            return None;
        }
        let at = kept.items.iter().position(|e| e.is_of(plugin, original) && failed_in(&e.event) == failed)?;
        kept.remove(at)
    }

    /// The kept dead letter whose (dead-letter event) id is `id`.
    pub fn get(&self, id: &str) -> Option<Entry> {
        let kept = self.kept.lock().expect("dlq poisoned");
        kept.items.iter().find(|e| e.event.id == id).cloned()
    }

    /// Removes and returns the kept dead letter `id` to replay it. It leaves the store's memory
    /// now (no other replay takes it) but its file only when [`forget`](Self::forget) says the
    /// replay was published: a crash in between keeps it. Put it back with
    /// [`restore`](Self::restore) if the replay fails.
    pub fn take_id(&self, id: &str) -> Option<Entry> {
        let mut kept = self.kept.lock().expect("dlq poisoned");
        let at = kept.items.iter().position(|e| e.event.id == id)?;
        kept.remove(at)
    }

    /// How many dead letters are kept, and the bytes charged for them.
    pub fn usage(&self) -> (usize, usize) {
        let kept = self.kept.lock().expect("dlq poisoned");
        (kept.items.len(), kept.bytes)
    }

    /// Removes and returns the dead letters (optionally of one plugin) to replay, like
    /// [`take_id`](Self::take_id): each stays in the file until [`forget`](Self::forget). A bulk
    /// replay publishes them one at a time (each may wait for a full queue): a crash or a stop
    /// meanwhile must not lose those not published yet.
    pub fn take(&self, plugin: Option<&str>) -> Vec<Entry> {
        let mut kept = self.kept.lock().expect("dlq poisoned");
        kept.take_where(|e| plugin.is_none_or(|p| e.plugin == p))
    }

    /// Removes taken entries from the file: their replay was published (or another copy of them
    /// is kept elsewhere). A crash before this keeps them, and a later replay publishes them
    /// again under the same replay id (at least once).
    pub fn forget(&self, taken: &[Entry]) {
        if taken.is_empty() {
            return;
        }
        let seqs: Vec<u64> = taken.iter().map(|e| e.seq).collect();
        self.write_remove(&seqs);
    }

    /// Runs `change` (a [`DeadLetters::forget`] or [`DeadLetters::restore`], which write the
    /// file and wait for its `fsync`) on the blocking pool: the API's replays forget what they
    /// published a hundred at a time, and a runtime thread waiting for the disk holds up every
    /// plugin's deliveries on it.
    pub async fn write_off_runtime(self: &Arc<Self>, change: impl FnOnce(&Self) + Send + 'static) {
        let store = self.clone();
        // In a task of its own, which the caller only waits for: a caller dropped while the
        // change waits for the file's turn (a client that hung up) would drop it, and a restore
        // with the entries it holds (review 60a M3).
        let task = tokio::spawn(async move {
            // In the file's turn, as `keep`: one blocking thread waits for it at a time.
            let turn = store.file_turn.clone().lock_owned().await;
            tokio::task::spawn_blocking(move || {
                let _turn = turn;
                change(&store)
            })
            .await
        });
        if let Err(e) = task.await.map_err(|e| e.to_string()).and_then(|done| done.map_err(|e| e.to_string())) {
            tracing::error!("a change to the kept dead letters did not finish: {e}");
        }
    }

    /// Puts back taken entries whose replay failed (oldest first again; still within the
    /// bounds). They never left the file.
    pub fn restore(&self, entries: Vec<Entry>) {
        let evicted = {
            let mut kept = self.kept.lock().expect("dlq poisoned");
            for e in entries.into_iter().rev() {
                kept.push_front(e);
            }
            self.evict(&mut kept)
        };
        self.forget_evicted(evicted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Review 60a M3: `POST /v1/dlq/{id}/replay` took the entry, then (answering `422`) put it
    /// back by a change that waited for the file's turn inside the request: a client that hung
    /// up meanwhile dropped the change with the entry, gone until the next start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_restore_whose_caller_is_dropped_while_it_waits_for_the_file_still_happens() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DeadLetters::persistent(100, &dir.path().join("dlq.redb")).unwrap());
        store.push("p", Event::new("x.0", ""));
        let id = store.list(None)[0].event.id.clone();
        let taken = store.take_id(&id).expect("kept");
        let busy = store.file_turn.clone().lock_owned().await;
        let restoring = store.clone();
        let dropped = tokio::time::timeout(
            Duration::from_millis(50),
            restoring.write_off_runtime(move |s| s.restore(vec![taken])),
        )
        .await;
        assert!(dropped.is_err(), "it waited for the file's turn");
        drop(busy);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while store.list(None).is_empty() {
            assert!(std::time::Instant::now() < deadline, "the dead letter was not put back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The API's replays forget what they published, a hundred at a time, and put back what
    /// they could not: each a write of `dlq.redb` and its `fsync`. Done on a runtime thread,
    /// they held up every plugin's deliveries on it while the disk was slow.
    #[tokio::test(flavor = "current_thread")]
    async fn forgetting_and_restoring_wait_for_the_file_off_the_runtime() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(DeadLetters::persistent(100, &dir.path().join("dlq.redb")).unwrap());
        for i in 0..4 {
            store.push("p", Event::new(format!("x.{i}"), ""));
        }
        let mut taken = store.take(None);
        let put_back = taken.split_off(2);
        let file = store.clone();
        let writing = store.clone();
        let writes = async move {
            writing.write_off_runtime(move |s| s.forget(&taken)).await;
            writing.write_off_runtime(move |s| s.restore(put_back)).await;
        };
        let hold = move || file.file.as_ref().unwrap().hold_writer();
        let ran = crate::test_support::runtime_runs_while_held(hold, writes).await;
        assert!(ran, "the runtime's one thread waited for the dead-letter file");
        let kept: Vec<String> = store.list(None).into_iter().map(|e| e.event.subject).collect();
        assert_eq!(kept.len(), 2, "{kept:?}");
    }

    /// A summary lists a bounded share of a dead letter's headers, the host's own too (a NATS
    /// publisher can forge a thousand `plugbus-data-omitted` on an event that looks like a dead
    /// letter, all kept in its own dead letter).
    #[test]
    fn a_summary_lists_a_bounded_share_of_the_headers() {
        let mut original = Event::new("orders.x", "x");
        original.source = "plugbus/forger".into();
        original.extensions.push((headers::ERROR.into(), "e".into()));
        for _ in 0..1000 {
            original.extensions.push((headers::DATA_OMITTED.into(), "d".repeat(1000)));
            original.extensions.push(("theirs".into(), "t".repeat(1000)));
        }
        let store = DeadLetters::new(10);
        store.push("p", dead_letter_event(&original, "p", "plugbus.dlq.p", "boom", 1));
        let (listed, ..) = store.newest(None, 10, false, usize::MAX);
        let headers = &listed[0].event.extensions;
        let bytes: usize = headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(bytes < 64 << 10, "a summary of {bytes} bytes of headers");
        assert!(headers.iter().any(|(k, v)| k == headers::ERROR && v.contains("boom")), "{headers:?}");
        let (whole, ..) = store.newest(None, 10, true, usize::MAX);
        assert!(whole[0].event.extensions.len() > 2000);
    }

    /// Review 60a M2: a summary of the whole store copied up to its 64 MiB (with its headers cut,
    /// still about 160 KiB a dead letter), per request. The copies stop at the bytes asked.
    #[test]
    fn the_newest_page_copies_no_more_bytes_than_asked() {
        let store = DeadLetters::with_max_bytes(1000, 64 << 20);
        for i in 0..100 {
            let mut ev = Event::new(format!("orders.{i}"), "x");
            ev.extensions.push(("note".into(), "n".repeat(10_000)));
            store.push("p", ev);
        }
        let (all, total, left_out) = store.newest(None, usize::MAX, false, usize::MAX);
        assert_eq!((all.len(), total, left_out), (100, 100, 0));
        let (page, total, left_out) = store.newest(None, usize::MAX, false, 200_000);
        assert_eq!((total, page.len() + left_out), (100, 100));
        assert!((15..=20).contains(&page.len()), "{} copied within 200 kB", page.len());
        assert_eq!(page.last().unwrap().event.subject, all.last().unwrap().event.subject, "the newest first");
        let (whole, _, left_out) = store.newest(None, 10, true, 50_000);
        assert_eq!(whole.len() + left_out, 10);
        assert!(whole.len() < 10);
    }

    /// The replay of an event a plugin failed is for that plugin alone; that of an output the bus
    /// did not take (its original source is the plugin's own) is for every subscriber.
    #[test]
    fn a_replay_is_for_the_plugin_that_failed_its_event_and_an_outputs_for_everyone() {
        let input = Event::new("orders.created", "{}");
        let replay = replay_event(&dead_letter_event(&input, "audit", "plugbus.dlq.audit", "boom", 3)).unwrap();
        assert_eq!(replay.header(headers::REPLAY_FOR), Some("audit"));
        assert!(is_replay_for_another(&replay, "billing") && !is_replay_for_another(&replay, "audit"));
        let mut output = Event::new("invoices.created", "{}");
        output.source = crate::event::plugin_source("billing");
        let replay = replay_event(&dead_letter_event(&output, "billing", "plugbus.dlq.billing", "refused", 3)).unwrap();
        assert_eq!(replay.header(headers::REPLAY_FOR), None);
        assert!(!is_replay_for_another(&replay, "audit"));
        // billing's own output that billing's handler failed (it subscribes to what it
        // publishes): marked, the replay is for billing alone.
        let mut failed = dead_letter_event(&output, "billing", "plugbus.dlq.billing", "boom", 3);
        mark_failed_in(&mut failed, "billing");
        let replay = replay_event(&failed).unwrap();
        assert_eq!(replay.header(headers::REPLAY_FOR), Some("billing"));
        assert_eq!(replay.header(headers::FAILED_IN), None, "the host's marks stay off the replay");
        assert!(is_replay_for_another(&replay, "audit"));
        // A mark naming another plugin than the one that dead-lettered it is not read.
        let mut forged = dead_letter_event(&output, "billing", "plugbus.dlq.billing", "refused", 3);
        mark_failed_in(&mut forged, "audit");
        assert_eq!(failed_in(&forged), None);
    }

    /// A dead letter of a dead letter published without its data keeps the mark (it must not be
    /// replayed as whole either); an ordinary event's forged mark is dropped like any `plugbus-*`.
    #[test]
    fn the_data_omitted_mark_passes_to_a_dead_letter_of_a_dead_letter_only() {
        let mut first = dead_letter_event(&Event::new("a.b", "data"), "p", "plugbus.dlq.p", "failed", 1);
        first.data = bytes::Bytes::new();
        first.extensions.push((headers::DATA_OMITTED.into(), "its 5 bytes of data".into()));
        let second = dead_letter_event(&first, "q", "plugbus.dlq.q", "failed again", 1);
        assert_eq!(second.header(headers::DATA_OMITTED), Some("its 5 bytes of data"));
        assert!(replay_event(&second).is_err());
        let forged = Event::new("a.b", "data").with_header(headers::DATA_OMITTED, "forged");
        let dead = dead_letter_event(&forged, "p", "plugbus.dlq.p", "failed", 1);
        assert_eq!(dead.header(headers::DATA_OMITTED), None);
        assert!(replay_event(&dead).is_ok());
    }

    #[test]
    fn a_dead_letters_id_is_its_events_with_its_subject_and_data() {
        let event = |subject: &str, data: &str| {
            let mut ev = Event::new(subject, data.to_string());
            (ev.source, ev.id) = ("/shop".into(), "7".into());
            ev
        };
        let id = |ev: &Event, plugin: &str| dead_letter_event(ev, plugin, "plugbus.dlq.p", "no", 1).id;
        let first = id(&event("orders.new", "precious"), "p");
        assert_eq!(id(&event("orders.new", "precious"), "p"), first, "the same event failing again");
        for (other, what) in [
            (id(&event("orders.new", "garbage"), "p"), "other data"),
            (id(&event("orders.old", "precious"), "p"), "another subject"),
            (id(&event("orders.new", "precious"), "q"), "another plugin"),
            (crate::event::output_id("/shop", "7", "p", usize::MAX), "the id made without subject and data"),
        ] {
            assert_ne!(other, first, "{what}");
        }
        let mut elsewhere = event("orders.new", "precious");
        elsewhere.source = "/elsewhere".into();
        assert_ne!(id(&elsewhere, "p"), first, "another source");
    }

    #[test]
    fn a_dead_letter_carries_the_original_and_why_and_replays_to_where_it_came_from() {
        let original = Event::new("orders.created", "{}").with_header("tenant", "acme");
        let dead = dead_letter_event(&original, "inventory", "plugbus.dlq.inventory", "boom", 5);
        assert_eq!(dead.subject, "plugbus.dlq.inventory");
        assert_eq!(dead.header(headers::ERROR), Some("boom"));
        assert_eq!(dead.header(headers::ATTEMPTS), Some("5"));
        assert_eq!(dead.header(headers::ORIGINAL_SUBJECT), Some("orders.created"));
        assert_eq!(dead.header("tenant"), Some("acme"));
        assert!(is_dead_letter(&dead) && !is_dead_letter(&original));
        // the mark is the host's: a plugbus-error header from anyone but the host is not one
        let forged = Event::new("orders.created", "{}")
            .with_header(headers::ERROR, "x")
            .with_header(headers::ORIGINAL_SUBJECT, "orders.created");
        assert!(!is_dead_letter(&forged));
        let again = replay_event(&dead).unwrap();
        assert_eq!(again.subject, "orders.created");
        // The same dead letter replays as the same event (JetStream drops a second copy); another
        // dead letter, and the dead letter of this replay, replay as events of their own.
        assert_eq!(replay_event(&dead).unwrap().id, again.id);
        assert_ne!(again.id, dead.id);
        let other =
            dead_letter_event(&Event::new("orders.created", "{}"), "inventory", "plugbus.dlq.inventory", "boom", 5);
        assert_ne!(replay_event(&other).unwrap().id, again.id);
        let dead_again = dead_letter_event(&again, "inventory", "plugbus.dlq.inventory", "boom", 5);
        assert_ne!(replay_event(&dead_again).unwrap().id, again.id);
        assert_eq!(again.header("tenant"), Some("acme"));
        assert!(again.header(headers::ERROR).is_none());
        assert_ne!(again.id, original.id);
    }

    /// The attack: a dead letter forged on a broker (anyone who may publish on `plugbus.dlq.*`)
    /// naming a `$KV` subject, replayed with the host's credentials.
    #[test]
    fn a_dead_letter_naming_no_subject_a_system_one_or_an_invalid_one_is_not_replayed() {
        let dead = |subject: Option<&str>| {
            let mut ev = dead_letter_event(&Event::new("orders.created", "{}"), "p", "plugbus.dlq.p", "boom", 1);
            ev.extensions.retain(|(k, _)| k != headers::ORIGINAL_SUBJECT);
            match subject {
                Some(s) => ev.with_header(headers::ORIGINAL_SUBJECT, s),
                None => ev,
            }
        };
        assert!(replay_event(&dead(None)).unwrap_err().contains("names no original subject"));
        for system in ["$KV.plugbus_payments.balance", "_INBOX.abc", "$SYS.REQ"] {
            let e = replay_event(&dead(Some(system))).unwrap_err();
            assert!(e.contains("system subject") && e.contains(system), "{e}");
        }
        for invalid in ["", "a..b", "a.*", "a b"] {
            assert!(replay_event(&dead(Some(invalid))).unwrap_err().contains("not valid"), "{invalid:?}");
        }
        assert_eq!(replay_event(&dead(Some("orders.created"))).unwrap().subject, "orders.created");
    }

    #[test]
    fn the_store_is_bounded_and_takes_by_plugin() {
        let s = DeadLetters::new(2);
        for p in ["a", "b", "a"] {
            s.push(p, Event::new("x", ""));
        }
        assert_eq!(s.list(None).len(), 2);
        assert_eq!(s.take(Some("a")).len(), 1);
        assert_eq!(s.list(None).len(), 1);
        assert_eq!(s.list(Some("b")).len(), 1);
    }

    /// A plugin that floods the store (a million small dead letters, or a few huge ones) forgets
    /// its own oldest, never another plugin's.
    #[test]
    fn a_plugin_flooding_the_store_forgets_its_own_dead_letters_not_the_others() {
        let s = DeadLetters::with_max_bytes(10, 1 << 20);
        s.push("victim", Event::new("v.0", ""));
        s.push("quiet", Event::new("q.0", vec![0u8; 100_000]));
        for i in 0..1000 {
            s.push("flood", Event::new(format!("f.{i}"), ""));
        }
        let by = |p: &str| s.list(Some(p)).into_iter().map(|e| e.event.subject).collect::<Vec<_>>();
        assert_eq!((by("victim"), by("quiet")), (vec!["v.0".to_string()], vec!["q.0".to_string()]), "by count");
        assert_eq!(by("flood"), (992..1000).map(|i| format!("f.{i}")).collect::<Vec<_>>());
        // by bytes: the flood's huge ones push out its own, never the quiet plugin's 100 KB
        for i in 0..20 {
            s.push("flood", Event::new(format!("h.{i}"), vec![0u8; 300_000]));
        }
        assert_eq!((by("victim"), by("quiet")), (vec!["v.0".to_string()], vec!["q.0".to_string()]), "by bytes");
        assert!(s.usage().1 <= 1 << 20);
        assert_eq!(by("flood").last().map(String::as_str), Some("h.19"));
    }

    /// A plugin whose outputs fail in another (junk on its subject) makes that other plugin's
    /// dead letters: they go first when the store is full, never that plugin's own older ones of
    /// the events it exists for (review 48a H2: about 100 events of 99 junk outputs each made
    /// `payments` forget every real dead letter it had).
    #[test]
    fn a_plugins_flood_into_another_evicts_the_flood_not_the_victims_own() {
        let s = DeadLetters::new(10);
        let dead = |source: &str, i: usize| {
            let mut ev = Event::new("orders.created", format!("{i}"));
            ev.source = source.to_string();
            dead_letter_event(&ev, "payments", "plugbus.dlq.payments", "not an order", 1)
        };
        for i in 0..3 {
            s.push("payments", dead("/shop", i));
        }
        s.push("other", dead("/shop", 0));
        for i in 0..50 {
            s.push("payments", dead("plugbus/hostile", i));
        }
        let kept = s.list(Some("payments"));
        let from = |source: &str| kept.iter().filter(|e| original_source(&e.event) == source).count();
        assert_eq!((from("/shop"), from("plugbus/hostile")), (3, 6), "the flood's own went first");
        assert_eq!(s.list(Some("other")).len(), 1, "another plugin's is kept");
        assert_eq!(original_source(&kept[0].event), "/shop");
    }

    /// A dead letter over the whole byte budget on its own is not kept, and says so: its
    /// publisher must then not leave its data out (nothing would keep it).
    #[test]
    fn a_dead_letter_over_the_byte_budget_is_not_kept_and_says_so() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = DeadLetters::persistent(10, &dir.path().join("dlq.redb")).unwrap();
        s.max_bytes = 1 << 20;
        assert!(s.push_recorded("p", Event::new("p.0", vec![0u8; 1000]), None));
        assert!(!s.push_recorded("p", Event::new("p.1", vec![0u8; 2 << 20]), None));
        assert_eq!(s.list(Some("p")).into_iter().map(|e| e.event.subject).collect::<Vec<_>>(), vec!["p.0"]);
    }

    /// A bulk replay publishes one at a time: entries taken and not yet replayed (forgotten)
    /// are still in the file if the host dies meanwhile; a failed one put back stays there too.
    #[test]
    fn taken_dead_letters_stay_in_the_file_until_their_replay_is_published() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.redb");
        {
            let s = DeadLetters::persistent(100, &path).unwrap();
            for i in 0..4 {
                s.push("p", Event::new(format!("x.{i}"), ""));
            }
            let taken = s.take(None);
            assert_eq!(taken.len(), 4);
            assert!(s.list(None).is_empty(), "taken entries are out of the store");
            // x.0 replayed, x.1 failed and put back; the host dies before x.2 and x.3.
            s.forget(&taken[..1]);
            s.restore(vec![taken[1].clone()]);
            assert_eq!(s.list(None).len(), 1);
        }
        let s = DeadLetters::persistent(100, &path).unwrap();
        let kept: Vec<String> = s.list(None).into_iter().map(|e| e.event.subject).collect();
        assert_eq!(kept, ["x.1", "x.2", "x.3"], "after the restart");
        drop(s);
        // Taken entries in the file beside newer ones can hold more than the bounds: they hold
        // again once it is open.
        let s = DeadLetters::persistent(2, &path).unwrap();
        let kept: Vec<String> = s.list(None).into_iter().map(|e| e.event.subject).collect();
        assert_eq!(kept, ["x.2", "x.3"], "within its bound of 2 at the start");
        drop(s);
        assert_eq!(DeadLetters::persistent(100, &path).unwrap().usage().0, 2, "the file is within it too");
    }

    #[test]
    fn the_store_is_bounded_in_bytes_oldest_first() {
        let s = DeadLetters::with_max_bytes(10_000, 3 * 1024 * 1024);
        for i in 0..10 {
            s.push("p", Event::new(format!("x.{i}"), vec![0u8; 1 << 20]));
        }
        let (n, bytes) = s.usage();
        assert_eq!(n, 2, "three 1 MiB entries plus their overhead do not fit 3 MiB");
        assert!(bytes <= 3 * 1024 * 1024);
        let kept: Vec<String> = s.list(None).into_iter().map(|e| e.event.subject).collect();
        assert_eq!(kept, ["x.8", "x.9"]);
        // one over the whole budget is not kept, and forgets nothing
        s.push("p", Event::new("huge", vec![0u8; 4 << 20]));
        assert_eq!(s.usage().0, 2);
        // taking and restoring keeps the accounting right
        let taken = s.take(None);
        assert_eq!(s.usage(), (0, 0));
        s.restore(taken);
        assert_eq!(s.usage(), (2, bytes));
    }

    #[test]
    fn a_huge_error_is_cut_in_the_dead_letter() {
        let original = Event::new("orders.created", "{}");
        let error = "E".repeat(16 << 20);
        let dead = dead_letter_event(&original, "p", "plugbus.dlq.p", &error, 1);
        let header = dead.header(headers::ERROR).unwrap();
        assert!(header.len() < MAX_ERROR_BYTES + 64, "{}", header.len());
        assert!(header.ends_with("… [cut at 8192 of 16777216 bytes]"));
    }

    /// "Kept whole" tells a broker that cannot take a dead letter whole that it may leave the
    /// data out (`Transport::publish_dead_letter`): it must mean a copy that survives a restart.
    /// A store in memory only, or one whose newest entry was forgotten at once to stay within its
    /// bounds, keeps nothing that would: it says `false`, and the broker takes it whole or refuses
    /// it (its input then stays in its stream).
    #[test]
    fn kept_whole_means_kept_in_the_file_and_still_kept() {
        let memory = DeadLetters::new(10);
        assert!(!memory.push_recorded("p", Event::new("p.0", "x"), None), "in memory only");
        let dir = tempfile::tempdir().unwrap();
        let mut s = DeadLetters::persistent(10, &dir.path().join("dlq.redb")).unwrap();
        s.max_bytes = 4096;
        assert!(s.push_recorded("p", Event::new("p.1", vec![0u8; 1500]), None));
        assert!(s.push_recorded("q", Event::new("q.1", vec![0u8; 1500]), None));
        // r's one dead letter holds the most of what is over 4 KiB: it goes at once
        assert!(!s.push_recorded("r", Event::new("r.1", vec![0u8; 3000]), None), "forgotten at once");
        let listed: Vec<String> = s.list(None).into_iter().map(|e| e.event.subject).collect();
        assert_eq!(listed, ["p.1", "q.1"]);
    }

    /// The attack: a full disk (or any I/O error) fails one write of `dlq.redb`; redb then
    /// refuses every later write of that handle (`PreviousIo`). Every dead letter after it was
    /// kept in memory only (gone at the next start), and every replay's `forget` failed (its dead
    /// letters came back at the next start and ran again). Now the file is opened again before
    /// the next write, and what it missed meanwhile is written then.
    #[test]
    fn a_dead_letter_file_that_failed_a_write_is_opened_again_and_catches_up() {
        use crate::backend::embedded::log::tests::{Tmpfs, fill_up};
        let Some(disk) = Tmpfs::mount(16) else { return };
        let path = disk.0.path().join("dlq.redb");
        let s = DeadLetters::persistent(100, &path).unwrap();
        s.push("p", Event::new("x.replayed", "r"));
        let filler = fill_up(disk.0.path());
        let lost = s.push_recorded("p", Event::new("x.while-full", vec![7u8; 256 << 10]), None);
        assert!(!lost, "a dead letter the file did not take is not kept whole");
        // a replay of one, published while the disk is full: forgetting it fails too
        let (replayed, others): (Vec<_>, Vec<_>) =
            s.take(None).into_iter().partition(|e| e.event.subject == "x.replayed");
        s.restore(others);
        s.forget(&replayed);
        std::fs::remove_file(filler).unwrap();
        // (opened again at most once a second: the forget above tried)
        std::thread::sleep(Duration::from_secs(1));
        assert!(s.push_recorded("p", Event::new("x.after", "a"), None), "the file takes writes again");
        drop(s);
        let again = DeadLetters::persistent(100, &path).unwrap();
        let listed: Vec<String> = again.list(None).into_iter().map(|e| e.event.subject).collect();
        assert_eq!(listed, ["x.while-full", "x.after"], "after the restart");
    }

    /// Review 59c M1: what the file missed while the disk was full was written only with the
    /// next dead letter or replay; with none before the stop, a dead letter kept in memory only
    /// was lost (its input settled), and a replayed one whose removal failed came back. The
    /// host writes it every few seconds and at its stop ([`DeadLetters::write_missed`]).
    #[test]
    fn what_the_dead_letter_file_missed_is_written_with_no_later_dead_letter() {
        use crate::backend::embedded::log::tests::{Tmpfs, fill_up};
        let Some(disk) = Tmpfs::mount(16) else { return };
        let path = disk.0.path().join("dlq.redb");
        let s = DeadLetters::persistent(100, &path).unwrap();
        s.push("p", Event::new("x.replayed", "r"));
        assert!(!s.missed_writes());
        let filler = fill_up(disk.0.path());
        s.push_recorded("p", Event::new("x.while-full", vec![7u8; 256 << 10]), None);
        let (replayed, others): (Vec<_>, Vec<_>) =
            s.take(None).into_iter().partition(|e| e.event.subject == "x.replayed");
        s.restore(others);
        s.forget(&replayed);
        assert!(s.missed_writes(), "the full disk refused nothing");
        assert!(!s.write_missed(), "written on a full disk");
        std::fs::remove_file(filler).unwrap();
        // (opened again at most once a second)
        std::thread::sleep(Duration::from_secs(1));
        assert!(s.write_missed(), "the file takes writes again");
        assert!(!s.missed_writes());
        drop(s);
        let again = DeadLetters::persistent(100, &path).unwrap();
        let listed: Vec<String> = again.list(None).into_iter().map(|e| e.event.subject).collect();
        assert_eq!(listed, ["x.while-full"], "after the restart");
    }

    /// A damaged `dlq.redb` stops the start, saying what to do (it used to name only the error).
    #[test]
    fn a_damaged_dead_letter_file_is_named_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.redb");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let Err(e) = DeadLetters::persistent(10, &path) else { panic!("a damaged file opened") };
        let e = e.to_string();
        assert!(e.contains("dlq.redb") && e.contains("move it aside"), "{e}");
        // One the host cannot open is not called damaged (review 55a 5).
        let other = dir.path().join("other.redb");
        std::fs::create_dir(&other).unwrap();
        let Err(e) = DeadLetters::persistent(10, &other) else { panic!("a folder opened") };
        let e = e.to_string();
        assert!(e.contains("an I/O error, not damage") && !e.contains("move it aside"), "{e}");
    }

    /// The attack: `kill -9` after a dead letter was kept (its `fsync` done) and before its
    /// input's `term` committed. At the next start the event fails again and is dead-lettered
    /// again under the same id: the store listed two, and a bulk replay ran the event twice. The
    /// newer now takes the older's place.
    #[test]
    fn a_dead_letter_kept_again_after_a_crash_replaces_the_one_kept_before() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.redb");
        let input = Event::new("orders.created", "{}");
        let dead = || dead_letter_event(&input, "audit", "plugbus.dlq.audit", "boom", 3);
        {
            let before = DeadLetters::persistent(10, &path).unwrap();
            before.push("audit", Event::new("other.x", ""));
            before.push("audit", dead());
        }
        let after = DeadLetters::persistent(10, &path).unwrap();
        assert!(after.push_recorded("audit", dead(), None));
        // another plugin's dead letter of the same input is its own
        after.push("billing", dead_letter_event(&input, "billing", "plugbus.dlq.billing", "boom", 3));
        // a publisher reusing the event's source and id with other data makes another one
        let mut forged = input.clone();
        forged.data = "other".into();
        after.push("audit", dead_letter_event(&forged, "audit", "plugbus.dlq.audit", "boom", 3));
        let subjects = |s: &DeadLetters| -> Vec<(String, String)> {
            s.list(None).into_iter().map(|e| (e.plugin, e.event.subject)).collect()
        };
        let expected = [
            ("audit".to_string(), "other.x".to_string()),
            ("audit".to_string(), "plugbus.dlq.audit".to_string()),
            ("billing".to_string(), "plugbus.dlq.billing".to_string()),
            ("audit".to_string(), "plugbus.dlq.audit".to_string()),
        ];
        assert_eq!(subjects(&after), expected);
        drop(after);
        assert_eq!(subjects(&DeadLetters::persistent(10, &path).unwrap()), expected, "in the file too");
    }

    /// A dead letter kept by a version before ids hashed the data (its id made of the source,
    /// id and plugin alone) is the same dead letter as this version's of the same event: kept
    /// again after a kill, the new one replaces it, and `kept_for` finds it (review 48c M1).
    #[test]
    fn a_dead_letter_kept_by_an_older_version_is_found_and_replaced() {
        let input = Event::new("orders.created", "{}");
        let mut old = dead_letter_event(&input, "audit", "plugbus.dlq.audit", "boom", 3);
        old.id = crate::event::output_id(&input.source, &input.id, "audit", usize::MAX);
        let store = DeadLetters::new(10);
        store.push("audit", old.clone());
        assert_eq!(store.kept_for("audit", &input).map(|(e, _)| e.id), Some(old.id.clone()));
        store.push("audit", dead_letter_event(&input, "audit", "plugbus.dlq.audit", "boom", 3));
        let kept = store.list(Some("audit"));
        assert_eq!(kept.len(), 1, "the old one replaced");
        assert_eq!(kept[0].event.id, dead_letter_id(&input, "audit"));
    }

    /// A kill between writing the newer of the two and removing the older leaves both in the
    /// file: the start keeps the newer, and removes the older from the file.
    #[test]
    fn the_same_dead_letter_twice_in_the_file_is_read_back_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.redb");
        let input = Event::new("orders.created", "{}");
        let mut dead = dead_letter_event(&input, "audit", "plugbus.dlq.audit", "first", 3);
        {
            let (file, _, _) = crate::dlq_file::DlqFile::open(&path).unwrap();
            file.insert(1, "audit", &dead, None).unwrap();
            dead.extensions.push(("which".into(), "second".into()));
            file.insert(2, "audit", &dead, None).unwrap();
        }
        let which = |s: &DeadLetters| -> Vec<Option<String>> {
            s.list(None).into_iter().map(|e| e.event.header("which").map(str::to_string)).collect()
        };
        let store = DeadLetters::persistent(10, &path).unwrap();
        assert_eq!(which(&store), [Some("second".to_string())]);
        drop(store);
        let (_, in_file, _) = crate::dlq_file::DlqFile::open(&path).unwrap();
        assert_eq!(in_file.into_iter().map(|k| k.0).collect::<Vec<_>>(), [2], "the older removed from the file");
    }

    /// The attack: a plugin whose events each read 1 MiB of kv and fail, as fast as it can. Each
    /// dead letter took a blocking thread to wait for the file's writer (every write an `fsync`),
    /// holding its record of 1 MiB: the flood filled the blocking pool (outbound DNS lookups, kv
    /// commits, reloads) and memory, and queued ahead of every other plugin's dead letter. Now
    /// the writes take turns on one blocking thread, one plugin has at most two in the queue, and
    /// records past 16 MiB waiting are left out.
    #[test]
    fn a_flood_of_dead_letters_holds_one_blocking_thread_bounded_records_and_two_places_in_the_queue() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .max_blocking_threads(4)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(DeadLetters::persistent(1000, &dir.path().join("dlq.redb")).unwrap());
            let held = store.file.as_ref().unwrap().hold_writer();
            let done = Arc::new(Mutex::new(Vec::new()));
            let keep = |plugin: &'static str, i: usize| {
                let (store, done) = (store.clone(), done.clone());
                let mut seen = crate::sandbox::Seen::default();
                seen.kv_read("big", Some(&vec![b'x'; 900 << 10]), 1);
                let record = Some(Box::new(Record::new("v1", 1, "boom", seen)));
                tokio::spawn(async move {
                    store.keep(plugin, Event::new(format!("{plugin}.{i}"), ""), record).await;
                    done.lock().unwrap().push(plugin);
                })
            };
            // three plugins flooding: without turns at the file, two writes waiting each fill the
            // pool of four
            const FLOODS: [&str; 3] = ["flood-a", "flood-b", "flood-c"];
            // Until `plugin` has `taken` places in the file's queue (10 s at most).
            let queued = |plugin: &'static str, taken: usize| {
                let store = store.clone();
                async move {
                    let places = store.share_of(plugin).queued.clone();
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
                    while KEEPS_QUEUED_PER_PLUGIN - places.available_permits() < taken {
                        assert!(tokio::time::Instant::now() < deadline, "{plugin} never took {taken} places");
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
            };
            let mut keeps: Vec<_> = FLOODS.iter().flat_map(|p| (0..25).map(|i| keep(p, i))).collect();
            for flood in FLOODS {
                queued(flood, KEEPS_QUEUED_PER_PLUGIN).await;
            }
            keeps.push(keep("other", 0));
            queued("other", 1).await;
            let free = tokio::time::timeout(Duration::from_secs(2), tokio::task::spawn_blocking(|| 7)).await;
            assert_eq!(free.expect("the blocking pool was full of dead letters waiting for the file").unwrap(), 7);
            drop(held);
            for k in keeps {
                tokio::time::timeout(Duration::from_secs(30), k).await.unwrap().unwrap();
            }
            let order = done.lock().unwrap().clone();
            let other = order.iter().position(|p| *p == "other").unwrap();
            let ahead = FLOODS.len() * KEEPS_QUEUED_PER_PLUGIN + 1;
            assert!(other <= ahead, "another plugin's dead letter was kept {other}th: {order:?}");
            for flood in FLOODS {
                let with_record = store.list(Some(flood)).iter().filter(|e| e.record.is_some()).count();
                // (16 MiB of records of 900 KiB: 18 wait with theirs)
                assert!((1..=18).contains(&with_record), "{flood}: {with_record} of 25 kept their record of 900 KiB");
            }
            assert_eq!(store.list(None).len(), 76);
        });
    }
}
