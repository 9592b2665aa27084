//! JetStream streams as the host sees them: which subjects are captured (so a publish there
//! waits for the stream's ack), the streams the operator declared, and the streams made on
//! demand for durable subscriptions.

use super::NatsSettings;
use crate::subject::Pattern;
use crate::transport::TransportError;
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
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

/// Creates the streams the operator declared (`[nats.streams.NAME] subjects = [...]`), or
/// brings their subjects up to date.
pub async fn declare(js: &jetstream::Context, settings: &NatsSettings) -> Result<(), TransportError> {
    for (name, def) in &settings.streams {
        let config = stream_config(name, def.subjects.clone(), settings);
        let mut existing = js
            .get_or_create_stream(config)
            .await
            .map_err(|e| TransportError::Broker(format!("nats.streams.{name}: creating the stream: {e}")))?;
        let info = existing
            .info()
            .await
            .map_err(|e| TransportError::Broker(format!("nats.streams.{name}: reading the stream: {e}")))?
            .clone();
        if info.config.subjects != def.subjects {
            let mut config = info.config;
            config.subjects = def.subjects.clone();
            js.update_stream(config)
                .await
                .map_err(|e| TransportError::Broker(format!("nats.streams.{name}: updating its subjects: {e}")))?;
            tracing::info!(stream = %name, subjects = ?def.subjects, "stream subjects updated");
        }
    }
    Ok(())
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

/// The streams that hold `pattern`'s subjects; when none does and `auto_streams` is on, makes
/// one: `PLUGBUS_<FIRST TOKEN>` for `<first>` and `<first>.>` (`PLUGBUS_DLQ` for dead letters),
/// or one for exactly `pattern` when that would overlap another stream.
pub async fn capture(
    js: &jetstream::Context,
    index: &StreamIndex,
    settings: &NatsSettings,
    pattern: &str,
) -> Result<Vec<String>, TransportError> {
    let parsed = Pattern::parse(pattern)?;
    let found = index.overlapping(&parsed);
    if !found.is_empty() {
        return Ok(found);
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
        candidates.push((format!("PLUGBUS_{}", stream_token(first)), vec![first.to_string(), format!("{first}.>")]));
    }
    candidates.push((format!("PLUGBUS_{}", stream_token(pattern)), vec![pattern.to_string()]));
    let mut last_error = String::new();
    for (name, subjects) in candidates {
        match js.get_or_create_stream(stream_config(&name, subjects.clone(), settings)).await {
            Ok(_) => {
                tracing::info!(stream = %name, subjects = ?subjects, "created a JetStream stream for a durable subscription");
                index.refresh(js).await?;
                return Ok(vec![name]);
            }
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(TransportError::Broker(format!("no JetStream stream captures {pattern} and creating one failed: {last_error}")))
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
