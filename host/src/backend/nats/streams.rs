//! JetStream streams as the host sees them: which subjects are captured (so a publish there
//! waits for the stream's ack), the streams the operator declared, and the streams made on
//! demand for durable subscriptions.

use super::NatsSettings;
use crate::subject::Pattern;
use crate::transport::TransportError;
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use sha2::Digest;
use std::sync::RwLock;

/// Streams and the subjects they capture, refreshed from the server.
#[derive(Default)]
pub struct StreamIndex {
    streams: RwLock<Vec<(String, Vec<Pattern>)>>,
}

impl StreamIndex {
    /// Whether some stream captures `subject` (by the broker's plain rule: a `>` stream holds dead
    /// letters too).
    pub fn captures(&self, subject: &str) -> bool {
        self.streams
            .read()
            .expect("stream index poisoned")
            .iter()
            .any(|(_, ps)| ps.iter().any(|p| p.matches_nats(subject)))
    }

    /// The streams holding some subject `pattern` matches (never a KV bucket's or the dead
    /// letters' stream for a wildcard that cannot reach them: see [`Pattern::may_reach`]).
    pub fn overlapping(&self, pattern: &Pattern) -> Vec<String> {
        let streams = self.streams.read().expect("stream index poisoned");
        streams.iter().filter(|(_, ps)| ps.iter().any(|p| pattern.may_reach(p))).map(|(n, _)| n.clone()).collect()
    }

    /// Whether one stream captures every subject `pattern` matches.
    pub fn covers(&self, pattern: &Pattern) -> bool {
        let streams = self.streams.read().expect("stream index poisoned");
        streams.iter().any(|(_, ps)| ps.iter().any(|p| p.covers(pattern)))
    }

    /// Reads every stream's subjects from the server.
    pub async fn refresh(&self, js: &jetstream::Context) -> Result<(), TransportError> {
        let mut list = js.streams();
        let mut streams = Vec::new();
        while let Some(info) = list.next().await {
            let info = info.map_err(|e| TransportError::Broker(format!("listing JetStream streams: {e}")))?;
            let patterns = info.config.subjects.iter().filter_map(|s| Pattern::parse(s).ok()).collect();
            streams.push((info.config.name.clone(), patterns));
        }
        *self.streams.write().expect("stream index poisoned") = streams;
        Ok(())
    }
}

/// What a declared stream's refused change may mean: the server refuses a subject that overlaps
/// one a stream holds (this one, where neither covers the other, or another), and a host never
/// takes a subject away from a stream, so one the config moved is still held where it was.
const MOVED: &str = " (the server refuses a subject that overlaps one a stream holds, in this stream or another; a \
                     host never removes a stream's subject, so one the config moved or narrowed is still held: change \
                     the streams' subjects with `nats stream edit`)";

/// Creates the streams the operator declared (`[nats.streams.NAME] subjects = [...]`), or adds
/// the declared subjects an existing one lacks. Never removes one: every host of a cluster
/// declares the stream, and a host started with an older config (a rollback, a host rescheduled
/// during a rollout) set exactly its own list, taking away the subjects a newer config added, so
/// events published there were answered `202` and stored nowhere (review 63b F3). A subject the
/// stream holds beyond this host's config is named in a warning; removing it is the operator's
/// (`nats stream edit`).
pub async fn declare(js: &jetstream::Context, settings: &NatsSettings) -> Result<(), TransportError> {
    for (name, def) in &settings.streams {
        let config = stream_config(name, def.subjects.clone(), settings);
        let mut existing = js
            .get_or_create_stream(config)
            .await
            .map_err(|e| TransportError::Broker(format!("nats.streams.{name}: creating the stream: {e}{MOVED}")))?;
        let info = existing
            .info()
            .await
            .map_err(|e| TransportError::Broker(format!("nats.streams.{name}: reading the stream: {e}")))?
            .clone();
        let (subjects, added, beyond) = with_declared(&info.config.subjects, &def.subjects);
        if !beyond.is_empty() {
            tracing::warn!(stream = %name, subjects = ?beyond,
                "the stream holds subjects this host's config does not declare (another host's config, or an \
                 operator's): kept, since a host never removes a stream's subject; remove them with `nats stream edit`");
        }
        if !added.is_empty() {
            let mut config = info.config;
            config.subjects = subjects;
            js.update_stream(config).await.map_err(|e| {
                TransportError::Broker(format!("nats.streams.{name}: adding subjects {added:?}: {e}{MOVED}"))
            })?;
            tracing::info!(stream = %name, added = ?added, "stream subjects added");
        }
    }
    Ok(())
}

/// A stream's subjects with `declared` added: (all of them, those added, those it holds that
/// `declared` does not name). By coverage, as the server compares them (it refuses two subjects
/// of a stream that overlap, review 63c F1): a declared subject one it holds covers is not added
/// (`orders.>` held, `orders.created` declared: nothing changes), and one it holds that a
/// declared subject covers is replaced by it (`orders.created` held, `orders.>` declared).
fn with_declared(existing: &[String], declared: &[String]) -> (Vec<String>, Vec<String>, Vec<String>) {
    let covers = |wide: &str, narrow: &str| {
        wide == narrow || Pattern::parse(wide).ok().zip(Pattern::parse(narrow).ok()).is_some_and(|(w, n)| w.covers(&n))
    };
    let added: Vec<String> = declared.iter().filter(|d| !existing.iter().any(|e| covers(e, d))).cloned().collect();
    let beyond = existing.iter().filter(|e| !declared.iter().any(|d| covers(d, e))).cloned().collect();
    let kept = existing.iter().filter(|e| !added.iter().any(|a| covers(a, e)));
    let all = kept.chain(&added).cloned().collect();
    (all, added, beyond)
}

fn stream_config(name: &str, subjects: Vec<String>, settings: &NatsSettings) -> stream::Config {
    stream::Config {
        name: name.to_string(),
        subjects,
        storage: stream::StorageType::File,
        duplicate_window: settings.duplicate_window,
        ..Default::default()
    }
}

/// The streams that hold `pattern`'s subjects, when one of them holds them all (review 62d F2:
/// a stream holding part of them was taken, and an event on the others, stored by no stream,
/// was published on core NATS, answered `202`, and never reached the durable subscription);
/// when none holds any and `auto_streams` is on, makes one: `PLUGBUS_<FIRST TOKEN>` for
/// `<first>` and `<first>.>` (`PLUGBUS_DLQ` for dead letters), or one for exactly `pattern`
/// when that would overlap another stream ([`stream_name`]).
pub async fn capture(
    js: &jetstream::Context,
    index: &StreamIndex,
    settings: &NatsSettings,
    pattern: &str,
) -> Result<Vec<String>, TransportError> {
    let parsed = Pattern::parse(pattern)?;
    let found = index.overlapping(&parsed);
    if !found.is_empty() {
        if index.covers(&parsed) {
            return Ok(found);
        }
        return Err(TransportError::Broker(format!(
            "the JetStream streams {found:?} hold only some of the subjects of {pattern}: an event on the others \
             would be kept by no stream and never reach this durable subscription; declare a stream under \
             [nats.streams] that holds all of {pattern}, or subscribe to what those streams hold"
        )));
    }
    if !settings.auto_streams {
        return Err(TransportError::Broker(format!(
            "no JetStream stream captures {pattern}: declare one under [nats.streams] or create it (auto_streams is off)"
        )));
    }
    let tokens: Vec<&str> = pattern.split('.').collect();
    let mut candidates = Vec::new();
    if tokens.len() > 2 && tokens[0] == "plugbus" && tokens[1] == "dlq" {
        candidates.push(("PLUGBUS_DLQ".to_string(), vec!["plugbus.dlq.>".to_string()]));
    } else if !matches!(tokens[0], "*" | ">") {
        let first = tokens[0];
        candidates.push((stream_name(first), vec![first.to_string(), format!("{first}.>")]));
    }
    candidates.push((stream_name(pattern), vec![pattern.to_string()]));
    let mut last_error = String::new();
    for (name, subjects) in candidates {
        match js.get_or_create_stream(stream_config(&name, subjects.clone(), settings)).await {
            // A stream of that name that holds other subjects is not this one: `get_or_create`
            // hands back whatever stream has the name.
            Ok(mut made) => match made.info().await.map(|info| info.config.subjects.clone()) {
                Ok(held) if held == subjects => {
                    tracing::info!(stream = %name, subjects = ?subjects, "created a JetStream stream for a durable subscription");
                    index.refresh(js).await?;
                    return Ok(vec![name]);
                }
                Ok(held) => last_error = format!("a stream named {name} holds {held:?}, not {subjects:?}"),
                Err(e) => last_error = format!("reading the stream {name}: {e}"),
            },
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(TransportError::Broker(format!("no JetStream stream captures {pattern} and creating one failed: {last_error}")))
}

/// The name of a stream made for the subjects `s` names: `PLUGBUS_` and `s` upper-cased when `s`
/// is lower-case letters, digits and `-` (`orders`: `PLUGBUS_ORDERS`), and followed by a digest
/// of `s` otherwise, so two subject families never get one name (review 62d F2: `ORDERS` and
/// `orders` both made `PLUGBUS_ORDERS`, and the second plugin's consumer went onto the first's
/// stream, which never holds its events).
pub fn stream_name(s: &str) -> String {
    let token = stream_token(s);
    if s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return format!("PLUGBUS_{token}");
    }
    let digest = sha2::Sha256::digest(s.as_bytes());
    format!("PLUGBUS_{token}_{}", digest[..8].iter().map(|b| format!("{b:02x}")).collect::<String>())
}

/// A stream or consumer name from free text: letters, digits, `_` and `-`, upper-cased.
pub fn stream_token(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '*' => 'S',
            '>' => 'T',
            c if c.is_ascii_alphanumeric() || c == '-' || c == '_' => c.to_ascii_uppercase(),
            _ => '_',
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_declared_list_adds_subjects_and_takes_none_away() {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let (all, added, beyond) = with_declared(&strings(&["orders.>", "refunds.>"]), &strings(&["orders.>"]));
        assert_eq!((all, added, beyond), (strings(&["orders.>", "refunds.>"]), vec![], strings(&["refunds.>"])));
        let (all, added, beyond) = with_declared(&strings(&["orders.>"]), &strings(&["returns.>", "orders.>"]));
        assert_eq!((all, added, beyond), (strings(&["orders.>", "returns.>"]), strings(&["returns.>"]), vec![]));
        // Widened: the held subject the declared one covers goes (the server refuses an overlap).
        let (all, added, beyond) = with_declared(&strings(&["orders.created", "a"]), &strings(&["orders.>", "a"]));
        assert_eq!((all, added, beyond), (strings(&["a", "orders.>"]), strings(&["orders.>"]), vec![]));
        // Narrowed: nothing to add, the wider one held is kept and named.
        let (all, added, beyond) = with_declared(&strings(&["orders.>"]), &strings(&["orders.created"]));
        assert_eq!((all, added, beyond), (strings(&["orders.>"]), vec![], strings(&["orders.>"])));
    }

    /// Review 62d F2: `ORDERS` and `orders` made one stream name.
    #[test]
    fn two_subject_families_never_get_one_stream_name() {
        assert_eq!(stream_name("orders"), "PLUGBUS_ORDERS");
        assert_eq!(stream_name("eu-orders2"), "PLUGBUS_EU-ORDERS2");
        let names = ["orders", "ORDERS", "Orders", "a.b", "a_b", "a.*", "a.S", "ü", "é", "orders.*", "orders.>"];
        let made: std::collections::HashSet<String> = names.iter().map(|s| stream_name(s)).collect();
        assert_eq!(made.len(), names.len(), "{made:?}");
        let valid = |n: &str| n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        assert!(made.iter().all(|n| valid(n)), "{made:?}");
    }

    #[test]
    fn a_pattern_is_covered_only_by_one_stream_holding_all_its_subjects() {
        let index = StreamIndex::default();
        let stream = |name: &str, subjects: &[&str]| {
            (name.to_string(), subjects.iter().map(|s| Pattern::parse(s).unwrap()).collect::<Vec<_>>())
        };
        *index.streams.write().unwrap() = vec![stream("EU", &["orders.eu"]), stream("US", &["orders.us"])];
        let orders = Pattern::parse("orders.*").unwrap();
        assert_eq!(index.overlapping(&orders), vec!["EU".to_string(), "US".to_string()]);
        assert!(!index.covers(&orders), "orders.ca is held by neither");
        assert!(index.covers(&Pattern::parse("orders.eu").unwrap()));
        index.streams.write().unwrap().push(stream("ALL", &["orders", "orders.>"]));
        assert!(index.covers(&orders));
    }
}
