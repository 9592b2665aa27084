//! Runs cases through the real component: loaded by the host's loader (same identity, limits
//! and config), each case in a fresh instance with the case's kv and a fixed world.

use super::CaseError;
use super::case::{Case, Verdict};
use crate::config::Config;
use crate::fate::DeliveryError;
use crate::kv::{KvError, KvStore, MemoryKv, Txn, Versioned};
use crate::sandbox::http_stubs::{HttpCall, HttpStubs};
use crate::sandbox::{Failure, FixedWorld, Plugin, Sandbox};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

/// One output of a case, as it would be published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputGot {
    /// Its id (derived from the input's source and id, the plugin and its index).
    pub id: String,
    /// Where it would go.
    pub subject: String,
    /// Its payload.
    pub data: Bytes,
}

/// What the component did with one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Ok, retry or reject.
    pub verdict: Verdict,
    /// Why it failed (the text a dead letter would carry).
    pub message: Option<String>,
    /// What it published (released only on Ok, so empty otherwise).
    pub outputs: Vec<OutputGot>,
    /// The plugin's kv after the event: the case's kv with the handler's writes on Ok.
    pub kv: BTreeMap<String, Vec<u8>>,
    /// Whether it wrote (or deleted) any key.
    pub wrote_kv: bool,
    /// The outbound HTTP calls it made, in order (answered by the case's stubs or refused).
    pub calls: Vec<HttpCall>,
    /// The host failed the run ([`Failure::Host`]), not the handler: the outcome says nothing
    /// of the handler (it is neither compared nor kept as an expectation).
    pub by_the_host: bool,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.message {
            Some(m) => write!(f, "{} ({})", self.verdict, crate::event::cut(m)),
            None => write!(f, "{} with {} output(s)", self.verdict, self.outputs.len()),
        }
    }
}

/// The kv store of the case being run: replaced, in memory, before each case.
#[derive(Default)]
struct CaseKv {
    current: Mutex<Arc<MemoryKv>>,
}

impl CaseKv {
    async fn reset(&self, ns: &str, entries: &BTreeMap<String, Vec<u8>>) -> Result<(), KvError> {
        let kv = MemoryKv::new();
        let mut txn = Txn::default();
        for (k, v) in entries {
            txn.set(k, v.clone());
        }
        kv.commit(ns, &txn).await?;
        *self.current.lock().map_err(|_| KvError::Unavailable("poisoned".into()))? = Arc::new(kv);
        Ok(())
    }

    fn store(&self) -> Result<Arc<MemoryKv>, KvError> {
        Ok(self.current.lock().map_err(|_| KvError::Unavailable("poisoned".into()))?.clone())
    }
}

#[async_trait::async_trait]
impl KvStore for CaseKv {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Versioned>, KvError> {
        self.store()?.get(ns, key).await
    }

    async fn commit(&self, ns: &str, txn: &Txn) -> Result<(), KvError> {
        self.store()?.commit(ns, txn).await
    }
}

/// A component loaded for testing.
pub struct Runner {
    plugin: Plugin,
    /// What the plugin subscribes to, parsed once at load.
    subscriptions: crate::subject::PatternSet,
    kv: Arc<CaseKv>,
    _sandbox: Sandbox,
}

impl Runner {
    /// Loads `component` as the host would (its file name is its identity; `config`'s limits;
    /// `plugin_config` as its `config` values).
    pub async fn load(
        component: &Path,
        config: &Config,
        plugin_config: &[(String, String)],
    ) -> Result<Self, CaseError> {
        let load_error = |reason: String| CaseError::Load { file: component.to_path_buf(), reason };
        let mut config = config.clone();
        if !plugin_config.is_empty() {
            let identity = crate::loader::identity_of(component, &config).map_err(|e| load_error(e.to_string()))?;
            let values = &mut config.plugins.entry(identity).or_default().config;
            values.extend(plugin_config.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))));
        }
        let sandbox = crate::loader::tool_sandbox(&config).map_err(|e| CaseError::Sandbox(format!("{e:#}")))?;
        let kv = Arc::new(CaseKv::default());
        let store: Arc<dyn KvStore> = kv.clone();
        // Its calls are answered from the cases' stubs: what the manifest asks for is granted
        // (the operator's grant is a deployment's), and the policy still checks each call.
        let grants = crate::loader::Grants::Requested;
        let plugin = crate::loader::load_file_as(&sandbox, component, &config, &store, grants)
            .await
            .map_err(|e| load_error(e.to_string()))?;
        let subscriptions = crate::subject::PatternSet::parse(&plugin.manifest().patterns())
            .map_err(|e| load_error(format!("its subscriptions: {e}")))?;
        Ok(Self { plugin, subscriptions, kv, _sandbox: sandbox })
    }

    /// The plugin's name (its identity).
    pub fn name(&self) -> &str {
        self.plugin.name()
    }

    /// Why the host would never deliver a case's event to this plugin: it is the replay of
    /// another plugin's dead letter, or its subject matches none of the plugin's subscriptions
    /// (review 61f F3: such a case ran, and its snapshot passed).
    pub fn never_delivered(&self, case: &Case) -> Option<String> {
        // The replay of another plugin's dead letter goes to that plugin alone (review 63c F7).
        if let Some(other) = crate::deadletter::replay_for(&case.event).filter(|p| *p != self.plugin.name()) {
            return Some(format!(
                "the event is the replay of a dead letter of plugin {} (plugbus-replay-for): the host delivers it to \
                 that plugin alone, never to {}",
                crate::event::quoted(other),
                self.plugin.name()
            ));
        }
        (!self.subscriptions.matches(&case.event.subject)).then(|| {
            format!(
                "the event's subject {} matches none of plugin {}'s subscriptions ({}): the host would never \
                 deliver it to this plugin",
                crate::event::quoted(&case.event.subject),
                self.plugin.name(),
                self.plugin.manifest().patterns().join(", ")
            )
        })
    }

    /// Runs one case as the host would deliver it: an event over the plugin's
    /// `max_event_bytes` is dead-lettered unrun (the decision is dispatch's,
    /// [`crate::fate::unrunnable`]); otherwise a fresh instance runs it with the case's kv and its
    /// clocks and random fixed by the event, and the handler's kv writes are committed against
    /// the plugin's `max_kv_bytes` (past it the attempt fails as the host fails it, a retry).
    pub async fn run(&self, case: &Case) -> Outcome {
        let name = self.plugin.name().to_string();
        if let Some(never_run) = crate::fate::unrunnable(&case.event, self.plugin.limits()) {
            return failed_delivery(never_run, case, Vec::new());
        }
        if let Err(e) = self.kv.reset(&name, &case.kv).await {
            return failed(Failure::Host(format!("the case's kv could not be set: {e}")), case, Vec::new());
        }
        let stubs = HttpStubs::new(case.http.clone());
        let world = FixedWorld { http: Some(stubs.clone()), ..FixedWorld::of(&case.event) };
        let attempt = self.plugin.handle_fixed(&case.event, case.attempt, &world).await;
        let calls = stubs.calls();
        if let Err(failure) = attempt.result {
            return failed(failure, case, calls);
        }
        match self.plugin.commit(&attempt.txn).await {
            Ok(()) => {}
            Err(e) if e.is_quota() => return failed_delivery(DeliveryError::KvQuota(e.to_string()), case, calls),
            Err(e) => return failed_delivery(DeliveryError::Kv(e.to_string()), case, calls),
        }
        let outputs = attempt
            .outputs
            .into_iter()
            .enumerate()
            .map(|(i, o)| {
                let ev = o.into_event(&case.event, &name, i);
                OutputGot { id: ev.id, subject: ev.subject, data: ev.data }
            })
            .collect();
        let mut kv = case.kv.clone();
        for (k, v) in &attempt.txn.writes {
            match v {
                Some(v) => kv.insert(k.clone(), v.clone()),
                None => kv.remove(k),
            };
        }
        Outcome {
            verdict: Verdict::Ok,
            message: None,
            outputs,
            kv,
            wrote_kv: !attempt.txn.is_empty(),
            calls,
            by_the_host: false,
        }
    }
}

pub(super) fn failed(failure: Failure, case: &Case, calls: Vec<HttpCall>) -> Outcome {
    failed_delivery(DeliveryError::of_attempt(failure), case, calls)
}

/// The outcome of a case whose delivery failed with `error`, as the host would settle it: a
/// reject when no attempt could succeed, a retry otherwise; the host's own failures say nothing
/// of the handler ([`Outcome::by_the_host`]).
fn failed_delivery(error: DeliveryError, case: &Case, calls: Vec<HttpCall>) -> Outcome {
    let verdict = if error.is_retryable() { Verdict::Retry } else { Verdict::Reject };
    let by_the_host = error.is_the_hosts();
    let message = Some(error.to_string());
    Outcome { verdict, message, outputs: Vec::new(), kv: case.kv.clone(), wrote_kv: false, calls, by_the_host }
}
