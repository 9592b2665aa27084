//! Dead letters: events a plugin could not handle, kept so an operator can see and replay them.
//!
//! A dead letter is also published as an event on the plugin's dead-letter subject (default
//! `plugbus.dlq.<plugin>`), carrying the original data and headers plus `plugbus-error`,
//! `plugbus-plugin`, `plugbus-attempts`, `plugbus-original-subject` and `plugbus-failed-at`.

use crate::event::{Event, now_rfc3339, output_id};
use serde::Serialize;
use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// On a replayed event: the id of the dead letter it came from.
    pub const REPLAY_OF: &str = "plugbus-replay-of";
}

/// Builds the dead-letter event of `original`.
pub fn dead_letter_event(original: &Event, plugin: &str, subject: &str, error: &str, attempts: u32) -> Event {
    let mut extensions: Vec<(String, String)> =
        original.extensions.iter().filter(|(k, _)| !k.starts_with("plugbus-")).cloned().collect();
    extensions.extend([
        (headers::ERROR.to_string(), error.to_string()),
        (headers::PLUGIN.to_string(), plugin.to_string()),
        (headers::ATTEMPTS.to_string(), attempts.to_string()),
        (headers::ORIGINAL_SUBJECT.to_string(), original.subject.clone()),
        (headers::ORIGINAL_ID.to_string(), original.id.clone()),
        (headers::FAILED_AT.to_string(), now_rfc3339()),
    ]);
    Event {
        id: output_id(&original.id, plugin, usize::MAX),
        source: format!("plugbus/{plugin}"),
        ty: original.ty.clone(),
        subject: subject.to_string(),
        time: original.time.clone(),
        datacontenttype: original.datacontenttype.clone(),
        extensions,
        data: original.data.clone(),
        reply_to: None,
    }
}

/// Whether `event` is itself a dead letter (its failure is logged, never dead-lettered again).
pub fn is_dead_letter(event: &Event) -> bool {
    event.header(headers::ORIGINAL_SUBJECT).is_some() && event.header(headers::ERROR).is_some()
}

/// The event a replay publishes: the original subject, data and headers, a fresh id.
pub fn replay_event(dead: &Event) -> Option<Event> {
    let subject = dead.header(headers::ORIGINAL_SUBJECT)?.to_string();
    let mut ev = Event::new(subject, dead.data.clone());
    ev.ty = dead.ty.clone();
    ev.datacontenttype = dead.datacontenttype.clone();
    ev.extensions = dead.extensions.iter().filter(|(k, _)| !k.starts_with("plugbus-")).cloned().collect();
    ev.extensions.push((headers::REPLAY_OF.to_string(), dead.id.clone()));
    Some(ev)
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
}

fn serialize_event<S: serde::Serializer>(ev: &Event, s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(None)?;
    m.serialize_entry("id", &ev.id)?;
    m.serialize_entry("subject", &ev.subject)?;
    m.serialize_entry("headers", &ev.extensions)?;
    m.serialize_entry("data", &String::from_utf8_lossy(&ev.data))?;
    m.end()
}

/// The dead letters this host produced, newest last, bounded (the oldest go first, logged).
pub struct DeadLetters {
    items: Mutex<VecDeque<Entry>>,
    next: AtomicU64,
    cap: usize,
}

impl DeadLetters {
    /// A store keeping at most `cap` dead letters.
    pub fn new(cap: usize) -> Self {
        Self { items: Mutex::new(VecDeque::new()), next: AtomicU64::new(1), cap: cap.max(1) }
    }

    /// Keeps one.
    pub fn push(&self, plugin: &str, event: Event) {
        let seq = self.next.fetch_add(1, Ordering::Relaxed);
        let mut items = self.items.lock().expect("dlq poisoned");
        if items.len() == self.cap
            && let Some(old) = items.pop_front()
        {
            tracing::warn!(plugin = %old.plugin, event_id = %old.event.id, "dead-letter store full: oldest entry forgotten (it was published on its dead-letter subject)");
        }
        items.push_back(Entry { seq, plugin: plugin.to_string(), event });
    }

    /// The kept dead letters, optionally of one plugin.
    pub fn list(&self, plugin: Option<&str>) -> Vec<Entry> {
        let items = self.items.lock().expect("dlq poisoned");
        items.iter().filter(|e| plugin.is_none_or(|p| e.plugin == p)).cloned().collect()
    }

    /// Removes and returns the dead letters (optionally of one plugin) to replay.
    pub fn take(&self, plugin: Option<&str>) -> Vec<Entry> {
        let mut items = self.items.lock().expect("dlq poisoned");
        let (taken, kept): (Vec<Entry>, Vec<Entry>) =
            items.drain(..).partition(|e| plugin.is_none_or(|p| e.plugin == p));
        items.extend(kept);
        taken
    }

    /// Puts back entries whose replay failed.
    pub fn restore(&self, entries: Vec<Entry>) {
        let mut items = self.items.lock().expect("dlq poisoned");
        for e in entries.into_iter().rev() {
            items.push_front(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let again = replay_event(&dead).unwrap();
        assert_eq!(again.subject, "orders.created");
        assert_eq!(again.header("tenant"), Some("acme"));
        assert!(again.header(headers::ERROR).is_none());
        assert_ne!(again.id, original.id);
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
}
