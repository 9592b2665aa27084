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

use crate::event::{ECHO_BYTES, Event, cut_to, now_rfc3339, output_id};
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
        id: output_id(&original.source, &original.id, plugin, usize::MAX),
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
    ev.id = crate::event::output_id(&dead.source, &dead.id, REPLAYER, 0);
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

/// Whether `event` is the replay of a dead letter that another plugin than `plugin` failed:
/// `plugin` lets it go unrun.
pub fn is_replay_for_another(event: &Event, plugin: &str) -> bool {
    event.header(headers::REPLAY_FOR).is_some_and(|p| p != plugin)
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
    /// Entries and bytes per plugin: the store's bounds are shared, and a plugin over its share
    /// loses its own oldest first, never another plugin's.
    by_plugin: HashMap<String, (usize, usize)>,
}

impl Kept {
    fn count(&mut self, entry: &Entry, added: bool) {
        let size = kept_bytes(entry);
        let held = self.by_plugin.entry(entry.plugin.clone()).or_default();
        if added {
            *held = (held.0 + 1, held.1 + size);
            self.bytes += size;
        } else {
            *held = (held.0 - 1, held.1 - size);
            self.bytes -= size;
            if held.0 == 0 {
                self.by_plugin.remove(&entry.plugin);
            }
        }
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

    /// The oldest entry of the plugin holding the most of what is over its bound (entries when
    /// `by_count`, bytes otherwise); of plugins holding as much, the oldest entry of them.
    fn eviction_victim(&self, by_count: bool) -> Option<usize> {
        let held = |&(count, bytes): &(usize, usize)| if by_count { count } else { bytes };
        let most = self.by_plugin.values().map(held).max()?;
        self.items.iter().position(|e| self.by_plugin.get(&e.plugin).is_some_and(|h| held(h) == most))
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
        Self { kept: Mutex::new(Kept::default()), next: AtomicU64::new(1), cap: cap.max(1), max_bytes, file: None }
    }

    /// A store like [`DeadLetters::new`] kept in `file` too: what it held at the last stop is
    /// back, and every change is written through.
    pub fn persistent(cap: usize, path: &std::path::Path) -> Result<Self, crate::dlq_file::DlqFileError> {
        let (file, kept, next) = crate::dlq_file::DlqFile::open(path)?;
        let mut store = Self::with_max_bytes(cap, DEFAULT_MAX_BYTES);
        store.next.fetch_max(next, Ordering::Relaxed);
        {
            let mut k = store.kept.lock().expect("dlq poisoned");
            for (seq, plugin, event, record) in kept {
                let entry = Entry { seq, plugin, event, record };
                store.next.fetch_max(seq + 1, Ordering::Relaxed);
                k.push_back(entry);
            }
        }
        store.file = Some(file);
        // A replay cut short by a crash leaves its entries in the file beside newer ones.
        let evicted = store.evict(&mut store.kept.lock().expect("dlq poisoned"));
        store.forget_evicted(evicted);
        Ok(store)
    }

    /// Writes a change through to the file; a failure is logged (the entry is still kept here
    /// and was published on its dead-letter subject).
    fn write_through(
        &self,
        change: impl FnOnce(&crate::dlq_file::DlqFile) -> Result<(), crate::dlq_file::DlqFileError>,
    ) {
        if let Some(file) = &self.file
            && let Err(e) = change(file)
        {
            tracing::error!("dead letters not kept across a restart: {e}");
        }
    }

    /// Keeps one (a dead letter larger than the whole budget is not kept, logged).
    pub fn push(&self, plugin: &str, event: Event) {
        let _ = self.push_recorded(plugin, event, None);
    }

    /// Keeps one with what its failed attempt saw; `false` when it is over the store's
    /// `max_bytes` on its own and so not kept.
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
        self.write_through(|f| f.insert(seq, plugin, &entry.event, entry.record.as_deref()));
        let evicted = {
            let mut kept = self.kept.lock().expect("dlq poisoned");
            kept.push_back(entry);
            self.evict(&mut kept)
        };
        // Outside the lock: the list, the API and other dead letters do not wait for the file.
        self.forget_evicted(evicted);
        true
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
            self.write_through(|f| f.remove(&gone));
        }
        if let Some((plugin, event_id)) = oldest {
            tracing::warn!(plugin = %plugin, event_id = %event_id, forgotten = gone.len(), freed_bytes = freed,
                max_entries = self.cap, max_bytes = self.max_bytes,
                "dead-letter store full: the oldest entries of the plugin holding the most forgotten (they were published on their dead-letter subjects)");
        }
    }

    /// The kept dead letters, optionally of one plugin.
    pub fn list(&self, plugin: Option<&str>) -> Vec<Entry> {
        let kept = self.kept.lock().expect("dlq poisoned");
        kept.items.iter().filter(|e| plugin.is_none_or(|p| e.plugin == p)).cloned().collect()
    }

    /// The newest `limit` kept dead letters (optionally of one plugin), oldest first, and how many
    /// are kept in all (of that plugin): a page can poll this without copying the whole store.
    pub fn newest(&self, plugin: Option<&str>, limit: usize) -> (Vec<Entry>, usize) {
        let kept = self.kept.lock().expect("dlq poisoned");
        let mine = |e: &&Entry| plugin.is_none_or(|p| e.plugin == p);
        let total = kept.items.iter().filter(mine).count();
        let mut newest: Vec<Entry> = kept.items.iter().rev().filter(mine).take(limit).cloned().collect();
        newest.reverse();
        (newest, total)
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
        self.write_through(|f| f.remove(&seqs));
    }

    /// Runs `change` (a [`DeadLetters::forget`] or [`DeadLetters::restore`], which write the
    /// file and wait for its `fsync`) on the blocking pool: the API's replays forget what they
    /// published a hundred at a time, and a runtime thread waiting for the disk holds up every
    /// plugin's deliveries on it.
    pub async fn write_off_runtime(self: &Arc<Self>, change: impl FnOnce(&Self) + Send + 'static) {
        let store = self.clone();
        if let Err(e) = tokio::task::spawn_blocking(move || change(&store)).await {
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

    /// A dead letter over the whole byte budget on its own is not kept, and says so: its
    /// publisher must then not leave its data out (nothing would keep it).
    #[test]
    fn a_dead_letter_over_the_byte_budget_is_not_kept_and_says_so() {
        let s = DeadLetters::with_max_bytes(10, 1 << 20);
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
}
