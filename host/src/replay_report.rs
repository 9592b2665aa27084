//! What a replay of dead letters did, and when it stops trying a plugin: the report
//! `POST /v1/dlq/replay` answers (`api.rs` publishes; this decides and counts).
//!
//! Once the bus did not take [`STRIKES`] replays in a row for the same plugin (an output's: the
//! same subject) within `api.publish_timeout`, or had no room for them, the rest for it in that
//! replay are kept untried. A plugin with no room, or run on no host, made a bulk replay wait
//! the timeout for each of its dead letters, one after another (10,000 of them: 14 hours, every
//! other bulk replay refused meanwhile), and on core NATS re-publish each into a plugin that
//! dropped it. A failure about one event (too large for the broker, refused by its stream) or
//! the connection stops nothing: the next may be taken. Two in a row, not one: one replay to a
//! subject the plugin no longer subscribes to on NATS, or one host of several with a full
//! queue, does not cost its others their try.

use crate::deadletter::Entry;
use crate::event::Event;
use crate::transport::TransportError;
use serde_json::json;
use std::collections::HashMap;

/// Replays in a row for one target the bus did not take in time before its rest are untried.
pub const STRIKES: u32 = 2;

/// Whom a replay goes to: the plugin it is for, or (the replay of an output, for every
/// subscriber) its subject.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// `plugbus-replay-for`.
    Plugin(String),
    /// An output's replay: its subject.
    Subject(String),
}

impl Target {
    /// The target of `replay`.
    pub fn of(replay: &Event) -> Self {
        match crate::deadletter::replay_for(replay) {
            Some(plugin) => Self::Plugin(plugin.to_string()),
            None => Self::Subject(replay.subject.clone()),
        }
    }

    /// The target of the replay of the dead letter `dead` (as [`Target::of`] its replay), or
    /// `None` when it has none (no original subject: never replayable).
    pub fn of_dead_letter(dead: &Event) -> Option<Self> {
        crate::deadletter::replay_event(dead).ok().map(|replay| Self::of(&replay))
    }

    fn parts(&self) -> (&'static str, &str) {
        match self {
            Self::Plugin(p) => ("plugin", p),
            Self::Subject(s) => ("subject", s),
        }
    }

    /// `{"plugin": P}` or `{"subject": S}`.
    pub fn to_json(&self) -> serde_json::Value {
        let (kind, name) = self.parts();
        json!({ kind: name })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (kind, name) = self.parts();
        write!(f, "{kind} {}", crate::event::quoted(name))
    }
}

/// Why the bus did not take a replay.
#[derive(Debug)]
pub enum NotTaken {
    /// Not within `api.publish_timeout`, or no room: about its target (a strike).
    InTime(String),
    /// Anything else: about this event (too large, refused by its stream) or the connection.
    Failed(String),
}

impl NotTaken {
    /// The publish's outcome, or `None` when it did not end within the timeout.
    pub fn of(outcome: Option<Result<(), TransportError>>, timeout: std::time::Duration) -> Result<(), Self> {
        match outcome {
            Some(Ok(())) => Ok(()),
            Some(Err(e @ TransportError::Full(_))) => Err(Self::InTime(e.to_string())),
            Some(Err(e)) => Err(Self::Failed(e.to_string())),
            None => Err(Self::InTime(format!("the bus did not take it within {timeout:?} (api.publish_timeout)"))),
        }
    }
}

/// A target given up on: why, and how many of its dead letters were kept untried.
struct GaveUp {
    why: String,
    untried: usize,
}

/// The one rule for giving up on a target, kept by a replay run (the host's bulk replay, and
/// `plugbus dlq replay` replaying one by one): [`STRIKES`] not taken in a row give it up; one
/// taken starts the count again; a per-event failure neither counts nor resets.
#[derive(Default)]
pub struct GivingUp {
    /// Not-taken replays in a row per target.
    strikes: HashMap<Target, u32>,
    /// Targets given up on, in the order given up.
    gave_up: Vec<(Target, GaveUp)>,
}

impl GivingUp {
    /// Whether `target` was given up on: if so, the dead letter about to be replayed to it is
    /// kept untried, and counted.
    pub fn skips(&mut self, target: &Target) -> bool {
        let Some((_, gave_up)) = self.gave_up.iter_mut().find(|(t, _)| t == target) else { return false };
        gave_up.untried += 1;
        true
    }

    /// A replay to `target` was taken.
    pub fn taken(&mut self, target: &Target) {
        self.strikes.remove(target);
    }

    /// A replay to `target` was not taken in time (`why`); whether that gave it up.
    pub fn not_taken(&mut self, target: Target, why: &str) -> bool {
        let strikes = self.strikes.entry(target.clone()).or_default();
        *strikes += 1;
        let gives_up = *strikes >= STRIKES;
        if gives_up {
            self.gave_up.push((target, GaveUp { why: why.to_string(), untried: 0 }));
        }
        gives_up
    }

    /// How many dead letters were kept untried.
    pub fn untried(&self) -> usize {
        self.gave_up.iter().map(|(_, g)| g.untried).sum()
    }

    /// `[{plugin | subject, why, untried}]`.
    pub fn to_json(&self) -> Vec<serde_json::Value> {
        let json = |(target, g): &(Target, GaveUp)| {
            let mut v = target.to_json();
            v["why"] = g.why.clone().into();
            v["untried"] = g.untried.into();
            v
        };
        self.gave_up.iter().map(json).collect()
    }
}

/// What a replay did: the dead letters replayed (each with the new event's id); how many are
/// kept because the bus did not take them (`failed`), of those how many it did not take in
/// time (`not_taken`) and how many were not tried (`untried`, per target in `gave_up`); and
/// those never replayable (kept, each with why: no, an invalid or a system original subject).
#[derive(Default)]
pub struct ReplayReport {
    /// `{dead_letter, id}` of each replayed.
    pub replayed: Vec<serde_json::Value>,
    failed: usize,
    not_taken: usize,
    refused: Vec<serde_json::Value>,
    /// Ids of the dead letters another replay held (see [`ReplayReport::elsewhere`]).
    elsewhere: Vec<String>,
    /// How many were tried without a claim ([`ReplayReport::unclaimed`]).
    unclaimed: usize,
    giving_up: GivingUp,
}

impl ReplayReport {
    /// Whether `target` was given up on in this replay: if so, the dead letter the caller was
    /// about to replay to it is kept untried, and counted.
    pub fn skips(&mut self, target: &Target) -> bool {
        let skips = self.giving_up.skips(target);
        self.failed += usize::from(skips);
        skips
    }

    /// Notes how the replay of `entry` (new id `id`) to `target` went; whether the bus took it
    /// (the caller forgets the dead letter; else it is kept).
    pub fn note(&mut self, entry: &Entry, target: Target, id: String, outcome: Result<(), NotTaken>) -> bool {
        let why = match outcome {
            Ok(()) => {
                self.giving_up.taken(&target);
                self.replayed.push(json!({ "dead_letter": entry.event.id, "id": id }));
                return true;
            }
            Err(NotTaken::Failed(why)) => why,
            Err(NotTaken::InTime(why)) => {
                self.not_taken += 1;
                if self.giving_up.not_taken(target.clone(), &why) {
                    tracing::warn!(plugin = %entry.plugin, event_id = %entry.event.id,
                        "{STRIKES} replays in a row for {target} were not taken: its other dead letters in this replay are kept untried ({why})");
                }
                why
            }
        };
        tracing::error!(plugin = %entry.plugin, event_id = %entry.event.id, "replay failed, the dead letter is kept: {why}");
        self.failed += 1;
        false
    }

    /// Notes one another replay holds (on this host or another attached to the broker): not
    /// published here, and not a failure.
    pub fn elsewhere(&mut self, entry: &Entry) {
        tracing::info!(plugin = %entry.plugin, event_id = %entry.event.id, "not replayed here: another replay holds it");
        self.elsewhere.push(entry.event.id.clone());
    }

    /// Notes one tried without a claim (`why` none can be stored): another host replaying it
    /// at the same time may run it too. Logged once per replay run.
    pub fn unclaimed(&mut self, entry: &Entry, why: &str) {
        if self.unclaimed == 0 {
            tracing::warn!(plugin = %entry.plugin, event_id = %entry.event.id,
                "replaying the broker's dead letters without claims (another host replaying them at the same \
                 time may run them too): {why}");
        }
        self.unclaimed += 1;
    }

    /// Whether another replay held one of those this one was asked for.
    pub fn left_to_another(&self) -> bool {
        !self.elsewhere.is_empty()
    }

    /// Notes one never replayable, logged.
    pub fn refuse(&mut self, entry: &Entry, why: &str) {
        tracing::error!(plugin = %entry.plugin, event_id = %entry.event.id, "not replayed, the dead letter is kept: {why}");
        self.refused.push(json!({ "dead_letter": entry.event.id, "why": why }));
    }

    /// `{"replayed": [{dead_letter, id}], "failed": n, "not_taken": n, "untried": n,
    /// "gave_up": [{plugin | subject, why, untried}], "refused": [{dead_letter, why}],
    /// "replayed_elsewhere": [dead_letter], "unclaimed": n}`.
    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "replayed": self.replayed,
            "replayed_elsewhere": self.elsewhere,
            "unclaimed": self.unclaimed,
            "failed": self.failed,
            "not_taken": self.not_taken,
            "untried": self.giving_up.untried(),
            "gave_up": self.giving_up.to_json(),
            "refused": self.refused,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(id: &str) -> Entry {
        let mut event = Event::new("plugbus.dlq.p", Vec::new());
        event.id = id.to_string();
        Entry { seq: 0, plugin: "p".into(), event, record: None }
    }

    #[test]
    fn only_a_timeout_or_no_room_is_about_the_target() {
        let t = Duration::from_secs(5);
        assert!(matches!(NotTaken::of(None, t), Err(NotTaken::InTime(_))));
        assert!(matches!(NotTaken::of(Some(Err(TransportError::Full("q".into()))), t), Err(NotTaken::InTime(_))));
        // Too large for the server, refused by a stream, the connection: about the event.
        assert!(matches!(NotTaken::of(Some(Err(TransportError::Broker("big".into()))), t), Err(NotTaken::Failed(_))));
        assert!(matches!(NotTaken::of(Some(Err(TransportError::Closed("c".into()))), t), Err(NotTaken::Failed(_))));
        assert!(NotTaken::of(Some(Ok(())), t).is_ok());
    }

    #[test]
    fn a_target_is_given_up_after_strikes_in_a_row_and_only_that_target() {
        let mut r = ReplayReport::default();
        let b = Target::Plugin("b".into());
        let other = Target::Subject("b".into());
        let in_time = || Err(NotTaken::InTime("late".into()));
        // A per-event failure and a success between strikes: no two in a row.
        assert!(!r.note(&entry("1"), b.clone(), "r1".into(), in_time()));
        assert!(!r.note(&entry("2"), b.clone(), "r2".into(), Err(NotTaken::Failed("too large".into()))));
        assert!(!r.skips(&b), "a per-event failure counted as a strike");
        assert!(r.note(&entry("3"), b.clone(), "r3".into(), Ok(())));
        assert!(!r.note(&entry("4"), b.clone(), "r4".into(), in_time()));
        assert!(!r.skips(&b), "a strike before a success still counted");
        assert!(!r.note(&entry("5"), b.clone(), "r5".into(), in_time()));
        assert!(r.skips(&b) && r.skips(&b));
        assert!(!r.skips(&other), "a subject named like the plugin was given up with it");
        let v = r.to_json();
        assert_eq!(v["replayed"].as_array().unwrap().len(), 1);
        assert_eq!((v["failed"].as_u64(), v["not_taken"].as_u64(), v["untried"].as_u64()), (Some(6), Some(3), Some(2)));
        assert_eq!(v["gave_up"], json!([{ "plugin": "b", "why": "late", "untried": 2 }]));
    }
}
