//! `POST /v1/dlq/{id}/debug`: a kept dead letter run again exactly as it ran, on the version
//! that failed and, optionally, on a candidate, to compare.
//!
//! Exactly as it ran: the event rebuilt from the dead letter, the attempt number that failed,
//! the kv values and config values its failed attempt read fed back from its
//! [`Record`](crate::deadletter::Record), and ids, clocks and random fixed by the event
//! ([`FixedWorld`]), the same for both versions. Never: a debug run writes nothing to the
//! plugin's kv (each run reads a private in-memory copy of the recorded values and nothing is
//! committed), publishes nothing (outputs are only reported), and changes no live plugin.

use crate::config::Config;
use crate::deadletter::{Entry, Record};
use crate::event::Event;
use crate::kv::{KvStore, MemoryKv, Txn};
use crate::sandbox::{FixedWorld, Plugin, PluginSettings, Sandbox};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;

/// Why a dead letter could not be debugged.
#[derive(Debug, thiserror::Error)]
pub enum DebugError {
    /// The dead letter carries no record of its failed attempt.
    #[error(
        "dead letter {0} has no record of what its failed attempt saw (it never ran: too large or \
         undecodable; or it is kept by the broker, or by a host before records): nothing to run again"
    )]
    NoRecord(String),
    /// The dead letter cannot be turned back into the event that failed.
    #[error("dead letter {id} cannot be turned back into its event: {why}")]
    NotAnEvent {
        /// The dead letter.
        id: String,
        /// What is missing.
        why: String,
    },
    /// The candidate component was refused.
    #[error("the candidate component was refused: {0}")]
    Candidate(String),
    /// The version that failed is gone and there is no candidate.
    #[error(
        "the version that failed ({failed}) is no longer loaded (plugin {plugin} serves {serving}) and no \
         candidate was given: nothing to run (send one: plugbus dlq debug ID --against NEW.wasm)"
    )]
    Gone {
        /// The plugin.
        plugin: String,
        /// The hash that failed.
        failed: String,
        /// What serves now.
        serving: String,
    },
    /// The recorded kv values could not be set up.
    #[error("host error: the recorded kv values could not be set up: {0}")]
    Kv(String),
    /// The host could not load the candidate now (its pool or code budget full, its compile
    /// child killed): not the candidate's fault, try again (review 60a L2: answered `422`, "the
    /// candidate component was refused").
    #[error("the candidate could not be loaded now: {0}")]
    HostBusy(String),
}

/// Runs the dead letter `entry` again on the version that failed (when `serving` is it) and on
/// `candidate` (component bytes, loaded as the same plugin); answers both outcomes.
pub async fn debug(
    entry: &Entry,
    serving: Option<Arc<Plugin>>,
    sandbox: &Sandbox,
    config: &Config,
    candidate: Option<&[u8]>,
) -> Result<Value, DebugError> {
    let id = entry.event.id.clone();
    let record = entry.record.as_deref().ok_or_else(|| DebugError::NoRecord(id.clone()))?;
    let event = original_event(entry)?;
    let name = entry.plugin.as_str();
    let values = recorded_config(config.values_for(name), record);
    let failed = match &serving {
        Some(p) if p.hash() == record.version => {
            let plugin = p.rebound(values.clone(), recorded_kv(name, record).await?);
            run(&plugin, &event, record).await
        }
        other => {
            let serving = other.as_ref().map_or_else(|| "nothing".to_string(), |p| p.hash().to_string());
            if candidate.is_none() {
                return Err(DebugError::Gone { plugin: name.to_string(), failed: record.version.clone(), serving });
            }
            json!({ "version": record.version, "ran": false,
                "why": format!("the version that failed is no longer loaded (plugin {name} serves {serving}): only the candidate ran") })
        }
    };
    let candidate = match candidate {
        Some(bytes) => {
            let plugin = load_candidate(sandbox, config, name, bytes, values, recorded_kv(name, record).await?).await?;
            run(&plugin, &event, record).await
        }
        None => Value::Null,
    };
    Ok(json!({
        "dead_letter": id,
        "plugin": name,
        "event_id": event.id,
        "subject": event.subject,
        "attempt": record.attempt,
        "record_truncated": record.seen.truncated,
        "note": if record.seen.truncated {
            "the record was cut at 1 MiB: kv values left out read as absent, so a run may differ from the failed attempt"
        } else { "" },
        "failed": failed,
        "candidate": candidate,
    }))
}

/// The event that failed, from its dead letter.
fn original_event(entry: &Entry) -> Result<Event, DebugError> {
    let not = |why: String| DebugError::NotAnEvent { id: entry.event.id.clone(), why };
    let value = serde_json::to_value(entry).map_err(|e| not(e.to_string()))?;
    let case = crate::casetest::dlq::case_from_entry(&value).map_err(not)?;
    crate::cloudevents::from_json(&case["event"]).map_err(|e| not(e.to_string()))
}

/// The plugin's config now, with the values the failed attempt read put back (and the keys
/// it found unset taken out).
fn recorded_config(mut values: HashMap<String, String>, record: &Record) -> HashMap<String, String> {
    for (k, v) in &record.seen.config {
        match v {
            Some(v) => values.insert(k.clone(), v.clone()),
            None => values.remove(k),
        };
    }
    values
}

/// A private in-memory store holding the kv values the failed attempt read.
async fn recorded_kv(ns: &str, record: &Record) -> Result<Arc<dyn KvStore>, DebugError> {
    let kv = MemoryKv::new();
    let mut txn = Txn::default();
    for read in &record.seen.kv {
        if let Some(v) = read.bytes() {
            txn.set(&read.key, v);
        }
    }
    kv.commit(ns, &txn).await.map_err(|e| DebugError::Kv(e.to_string()))?;
    Ok(Arc::new(kv))
}

/// Loads candidate bytes as plugin `name` (its limits; `values` as config; `kv`).
async fn load_candidate(
    sandbox: &Sandbox,
    config: &Config,
    name: &str,
    bytes: &[u8],
    values: HashMap<String, String>,
    kv: Arc<dyn KvStore>,
) -> Result<Plugin, DebugError> {
    crate::contract::check(bytes).map_err(|e| DebugError::Candidate(e.to_string()))?;
    sandbox
        .load_bound(bytes, |m| {
            m.bind(name, config.queue_group_for(name))
                .map_err(|e| crate::sandbox::LoadError::Manifest(format!("as plugin {name:?}: {e}")))?;
            Ok(PluginSettings {
                limits: config.limits_for(name),
                config: values,
                kv,
                allowed_outbound: config.outbound_for(name),
            })
        })
        .await
        .map_err(candidate_refused)
}

/// Why the candidate did not load: its own fault, or the host's for now.
fn candidate_refused(e: crate::sandbox::LoadError) -> DebugError {
    match e.is_transient() {
        true => DebugError::HostBusy(e.to_string()),
        false => DebugError::Candidate(e.to_string()),
    }
}

/// One run: the recorded attempt number, a fresh instance in the event's fixed world.
async fn run(plugin: &Plugin, event: &Event, record: &Record) -> Value {
    let world = FixedWorld::of(event);
    let attempt = plugin.handle_fixed(event, record.attempt, &world).await;
    let seen = attempt.seen.map(|s| *s).unwrap_or_default();
    let (result, error) = match &attempt.result {
        Ok(()) => ("ok", None),
        // The run says nothing of the handler: the host failed it (a full pool, a panic).
        Err(f @ crate::sandbox::Failure::Host(_)) => ("host-error", Some(f.to_string())),
        Err(f) if f.is_retryable() => ("retry", Some(f.to_string())),
        Err(f) => ("reject", Some(f.to_string())),
    };
    let outputs: Vec<Value> = attempt
        .outputs
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let ev = o.into_event(event, plugin.name(), i);
            let mut out =
                json!({ "subject": ev.subject, "data": String::from_utf8_lossy(&ev.data), "headers": ev.extensions });
            if std::str::from_utf8(&ev.data).is_err() {
                out["data_base64"] = json!(crate::cloudevents::base64_encode(&ev.data));
            }
            out
        })
        .collect();
    let kv_writes: serde_json::Map<String, Value> = attempt
        .txn
        .writes
        .iter()
        .map(|(k, v)| (k.clone(), v.as_ref().map_or(Value::Null, |v| json!(String::from_utf8_lossy(v)))))
        .collect();
    json!({
        "version": plugin.hash(),
        "plugin_version": plugin.manifest().version,
        "ran": true,
        "result": result,
        "error": error,
        "outputs": outputs,
        "kv_writes": kv_writes,
        "kv_read": seen.kv,
        "config_read": seen.config,
        "logs": seen.logs,
        "stdout": seen.stdout,
        "stderr": seen.stderr,
        "truncated": seen.truncated,
        "elapsed_ms": attempt.elapsed.as_secs_f64() * 1000.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::LoadError;

    /// Review 60a L2: a candidate the host could not load now (its pool or code budget full) was
    /// answered `422`, "the candidate component was refused", as the candidate's fault.
    #[test]
    fn a_candidate_the_host_could_not_load_now_is_not_called_refused() {
        assert!(matches!(candidate_refused(LoadError::NoRoom("full".into())), DebugError::HostBusy(_)));
        assert!(matches!(candidate_refused(LoadError::Host("pool".into())), DebugError::HostBusy(_)));
        let refused = candidate_refused(LoadError::Invalid("bad".into()));
        assert!(matches!(refused, DebugError::Candidate(_)));
        assert!(refused.to_string().starts_with("the candidate component was refused"));
    }
}
