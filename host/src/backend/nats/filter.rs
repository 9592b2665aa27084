//! Which messages a plugin's feed takes of what the server brings it ([`Filter`]), and what a
//! durable feed does with the rest ([`Pulled`]).

use crate::subject::PatternSet;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// Which messages a plugin's feed takes: the server matches by NATS's rule, where `>` reaches
/// `$` subjects, `_INBOX` replies and every dead letter; a plugin takes only what its patterns
/// reach by [`Pattern::matches`](crate::subject::Pattern::matches). Shared by the feed's pumps
/// and updated in place on retarget.
#[derive(Clone)]
pub struct Filter {
    pub(super) plugin: Arc<str>,
    patterns: Arc<RwLock<PatternSet>>,
    retiring: Arc<RwLock<Retiring>>,
}

/// The patterns a retarget left (those of the versions served before it), while the consumers
/// it widened wait to be narrowed (`narrowing`): a message of theirs a stream stored before the
/// change (at or below `before`, the stream's last sequence once the feed took the new
/// patterns; `u64::MAX` until that is read) was accepted for the plugin, and is delivered,
/// though the version serving does not name its subject: a retry runs on the version serving,
/// as on the embedded bus. Narrowing a consumer while such a message waits for its retry drops
/// it from the consumer, and an interest stream deletes it.
#[derive(Default)]
struct Retiring {
    patterns: Vec<String>,
    set: Option<PatternSet>,
    /// Stream → the last sequence stored before the change, for each consumer not narrowed yet.
    before: HashMap<String, u64>,
}

impl Filter {
    /// A feed's filter, taking nothing until [`Self::set`].
    pub fn new(plugin: Arc<str>) -> Self {
        Self { plugin, patterns: Default::default(), retiring: Default::default() }
    }

    /// Takes what `patterns` match from now on.
    pub(super) fn set(&self, patterns: PatternSet) {
        *self.patterns.write().expect("filter poisoned") = patterns;
    }

    /// After a retarget that left `patterns` (with those still retiring from earlier ones): the
    /// consumers of `streams` are narrowed later, and until then what they stored before the
    /// change under those patterns is still the plugin's. An empty `streams`: nothing retires. A
    /// filter plugbus cannot read as a pattern (an operator's, on the server) retires nothing:
    /// its messages are given back as another version's.
    pub(super) fn retire(&self, patterns: &[String], streams: impl IntoIterator<Item = String>) {
        let mut retiring = self.retiring.write().expect("filter poisoned");
        let before: HashMap<String, u64> = streams.into_iter().map(|stream| (stream, u64::MAX)).collect();
        if before.is_empty() {
            *retiring = Retiring::default();
            return;
        }
        let mut all = retiring.patterns.clone();
        for p in patterns {
            if !all.contains(p) && PatternSet::parse(std::slice::from_ref(p)).is_ok() {
                all.push(p.clone());
            }
        }
        let set = PatternSet::parse(&all).ok();
        *retiring = Retiring { set, patterns: all, before };
    }

    /// What `stream` stored before the change ends at `last_sequence`.
    pub(super) fn retiring_before(&self, stream: &str, last_sequence: u64) {
        if let Some(before) = self.retiring.write().expect("filter poisoned").before.get_mut(stream) {
            *before = last_sequence;
        }
    }

    /// `stream`'s consumer was narrowed: nothing of the retired patterns comes from it.
    pub(super) fn narrowed(&self, stream: &str) {
        self.retiring.write().expect("filter poisoned").before.remove(stream);
    }

    /// The patterns still retiring (to be kept retiring by the next retarget).
    pub(super) fn retiring_patterns(&self) -> Vec<String> {
        let retiring = self.retiring.read().expect("filter poisoned");
        match retiring.before.is_empty() {
            true => Vec::new(),
            false => retiring.patterns.clone(),
        }
    }

    /// What a durable feed does with a message on `subject` that its pull on `stream` brought,
    /// stored there at `sequence` (read only for a subject the version serving does not name; see
    /// [`Pulled`]).
    pub fn pulled(&self, subject: &str, stream: &str, sequence: impl FnOnce() -> Option<u64>) -> Pulled {
        let patterns = self.patterns.read().expect("filter poisoned");
        if patterns.matches(subject) {
            return Pulled::Take;
        }
        {
            let retiring = self.retiring.read().expect("filter poisoned");
            if let (Some(set), Some(&before)) = (&retiring.set, retiring.before.get(stream))
                && set.matches(subject)
            {
                // A sequence that cannot be read is taken: run, not lost.
                return match sequence() {
                    Some(seq) if seq > before => Pulled::NoLongerTaken,
                    _ => Pulled::Take,
                };
            }
        }
        if patterns.iter().any(|p| p.matches_nats(subject)) { Pulled::NotThePlugins } else { Pulled::AnotherVersions }
    }

    /// Whether the plugin takes a message on `subject`; logs the ones it does not.
    pub fn admits(&self, subject: &str) -> bool {
        let ok = self.patterns.read().expect("filter poisoned").matches(subject);
        if !ok {
            tracing::debug!(plugin = %self.plugin, subject = %subject, "not delivered: a system subject or dead letter the plugin's patterns do not name");
        }
        ok
    }
}

/// A message a durable consumer brought, as the feed sees it ([`Filter::pulled`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pulled {
    /// The plugin's: delivered.
    Take,
    /// One its patterns reach only by NATS's rule (a system subject, another plugin's dead
    /// letter in a stream its wildcard overlaps): settled without running.
    NotThePlugins,
    /// One no pattern of this version reaches even by NATS's rule: the consumer, shared by every
    /// host running the plugin, has another version's filters (a rolling upgrade, a reload on
    /// another host). Given back for another host to take, never settled unrun.
    AnotherVersions,
    /// One only the patterns a retarget on this host left name, stored after the change, while
    /// the consumer waits to be narrowed: given back like [`Self::AnotherVersions`] (a host still
    /// running an older version may take it), without the pause that leaves another version's
    /// hosts the redeliveries (this host's own change, not another host's version).
    NoLongerTaken,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(patterns: &[&str]) -> Filter {
        let filter = Filter::new("p".into());
        filter.set(PatternSet::parse(patterns).unwrap());
        filter
    }

    #[test]
    fn a_retired_subject_stored_before_the_change_is_taken_and_one_stored_after_is_given_back() {
        let f = filter(&["a.new"]);
        assert_eq!(f.pulled("a.old", "AA", || Some(1)), Pulled::AnotherVersions);
        f.retire(&["a.old".into(), "a.new".into(), "a..bad".into()], ["AA".to_string()]);
        // Until the stream's last sequence is read, every retired message is the plugin's.
        assert_eq!(f.pulled("a.old", "AA", || Some(u64::MAX - 1)), Pulled::Take);
        f.retiring_before("AA", 10);
        assert_eq!(f.pulled("a.old", "AA", || Some(10)), Pulled::Take);
        assert_eq!(f.pulled("a.old", "AA", || Some(11)), Pulled::NoLongerTaken);
        assert_eq!(f.pulled("a.old", "AA", || None), Pulled::Take, "an unreadable sequence is run, not lost");
        // Another stream's consumer is not retiring; the serving patterns are read first.
        assert_eq!(f.pulled("a.old", "BB", || Some(1)), Pulled::AnotherVersions);
        assert_eq!(f.pulled("a.new", "AA", || unreachable!("read only for a retired subject")), Pulled::Take);
        // A later change keeps what still retires.
        f.retire(&["a.new".into()], ["AA".to_string()]);
        assert_eq!(f.retiring_patterns(), vec!["a.old".to_string(), "a.new".to_string()]);
        f.narrowed("AA");
        assert_eq!(f.pulled("a.old", "AA", || Some(1)), Pulled::AnotherVersions);
        assert!(f.retiring_patterns().is_empty());
    }
}
