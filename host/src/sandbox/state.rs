//! What a store holds while one plugin instance runs: the locked-down WASI context, the
//! plugin's limits, and the per-attempt buffers the host imports write into (outputs, kv
//! transaction). Nothing here is shared between events.

use super::bindings::plugbus::handler::{bus, config, kv, logging, types};
use super::limits::{Limits, MemoryLimiter};
use super::stdio::Capture;
use crate::event::Output;
use crate::kv::{KvStore, Txn};
use crate::subject::{PatternSet, is_system_subject, validate_subject};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// Per-plugin context shared by every store of that plugin.
pub struct PluginCtx {
    /// The plugin's name (its kv namespace and log tag).
    pub name: Arc<str>,
    /// Its limits.
    pub limits: Limits,
    /// Subjects it may publish to.
    pub publishes: PatternSet,
    /// Operator-set values for the `config` import.
    pub config: HashMap<String, String>,
    /// Where `kv` reads and commits.
    pub kv: Arc<dyn KvStore>,
}

/// The data of one store (one instance, one attempt).
pub struct HostState {
    wasi: WasiCtx,
    table: ResourceTable,
    /// The memory cap.
    pub limiter: MemoryLimiter,
    /// The plugin this store runs.
    pub plugin: Arc<PluginCtx>,
    /// The event being handled (empty while reading the manifest).
    pub event_id: String,
    /// Its subject.
    pub subject: String,
    /// Buffered outputs of this attempt.
    pub outputs: Vec<Output>,
    output_bytes: u64,
    /// Why a publish was refused, for the failure report.
    pub refused: Option<String>,
    /// This attempt's kv reads and writes.
    pub txn: Txn,
    /// stdout and stderr of this attempt.
    pub stdout: Capture,
    /// See `stdout`.
    pub stderr: Capture,
    log_bytes: u64,
    /// When the call started (the deadline counts from here).
    pub started: Instant,
    /// Set when the deadline interrupted the call.
    pub deadline_hit: bool,
}

impl HostState {
    /// Fresh state for one attempt of `event_id` on `subject`.
    pub fn new(plugin: Arc<PluginCtx>, event_id: &str, subject: &str) -> Self {
        let log_cap = plugin.limits.max_log_bytes as usize;
        let stdout = Capture::new(log_cap);
        let stderr = Capture::new(log_cap);
        // Locked down: no preopened directories, no environment, no arguments, no network.
        // Stdio goes to capped captures; clocks and random are WASI's defaults.
        let wasi = WasiCtx::builder().stdout(stdout.clone()).stderr(stderr.clone()).build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limiter: MemoryLimiter::new(plugin.limits.memory_bytes()),
            plugin,
            event_id: event_id.to_string(),
            subject: subject.to_string(),
            outputs: Vec::new(),
            output_bytes: 0,
            refused: None,
            txn: Txn::default(),
            stdout,
            stderr,
            log_bytes: 0,
            started: Instant::now(),
            deadline_hit: false,
        }
    }

    /// Readies a warm store for the next event: the per-attempt buffers start empty and the
    /// deadline counts from now. (stdout/stderr were drained when the last attempt ended.)
    pub fn reset_for(&mut self, event_id: &str, subject: &str) {
        self.event_id.clear();
        self.event_id.push_str(event_id);
        self.subject.clear();
        self.subject.push_str(subject);
        self.outputs.clear();
        self.output_bytes = 0;
        self.refused = None;
        self.txn = Txn::default();
        self.log_bytes = 0;
        self.started = Instant::now();
        self.deadline_hit = false;
    }

    fn refuse(&mut self, err: types::PublishError) -> Result<(), types::PublishError> {
        let why = match &err {
            types::PublishError::Denied(m) | types::PublishError::Limit(m) | types::PublishError::Invalid(m) => m,
        };
        tracing::warn!(plugin = %self.plugin.name, event_id = %self.event_id, subject = %self.subject, "publish refused: {why}");
        self.refused = Some(why.clone());
        Err(err)
    }
}

impl WasiView for HostState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl types::Host for HostState {}

impl bus::Host for HostState {
    fn publish(
        &mut self,
        subject: String,
        data: Vec<u8>,
        headers: Vec<(String, String)>,
    ) -> Result<(), types::PublishError> {
        if let Err(e) = validate_subject(&subject) {
            return self.refuse(types::PublishError::Invalid(e.to_string()));
        }
        if is_system_subject(&subject) {
            return self.refuse(types::PublishError::Denied(format!("{subject:?} is a system subject")));
        }
        if !self.plugin.publishes.matches(&subject) {
            return self.refuse(types::PublishError::Denied(format!(
                "{subject:?} is not in the manifest's publishes {:?}",
                self.plugin.publishes.iter().map(|p| p.as_str()).collect::<Vec<_>>()
            )));
        }
        let limits = &self.plugin.limits;
        if self.outputs.len() as u64 >= u64::from(limits.max_publishes) {
            let msg = format!("publish limit of {} per event reached", limits.max_publishes);
            return self.refuse(types::PublishError::Limit(msg));
        }
        let size = (data.len() + headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()) as u64;
        if self.output_bytes + size > limits.max_output_bytes {
            let msg = format!("output limit of {} bytes per event reached", limits.max_output_bytes);
            return self.refuse(types::PublishError::Limit(msg));
        }
        self.output_bytes += size;
        self.outputs.push(Output { subject, data: data.into(), headers });
        Ok(())
    }
}

impl logging::Host for HostState {
    fn log(&mut self, level: types::LogLevel, message: String) {
        self.log_bytes += message.len() as u64;
        if self.log_bytes > self.plugin.limits.max_log_bytes {
            return;
        }
        let (plugin, event_id, subject) = (&*self.plugin.name, &self.event_id, &self.subject);
        match level {
            types::LogLevel::Trace => {
                tracing::trace!(target: "plugin", plugin, event_id, subject, "{message}")
            }
            types::LogLevel::Debug => {
                tracing::debug!(target: "plugin", plugin, event_id, subject, "{message}")
            }
            types::LogLevel::Info => {
                tracing::info!(target: "plugin", plugin, event_id, subject, "{message}")
            }
            types::LogLevel::Warn => {
                tracing::warn!(target: "plugin", plugin, event_id, subject, "{message}")
            }
            types::LogLevel::Error => {
                tracing::error!(target: "plugin", plugin, event_id, subject, "{message}")
            }
        }
    }
}

impl HostState {
    fn check_kv_size(&self, key: &str, value: usize) -> Result<(), types::KvError> {
        let cap = self.plugin.limits.max_kv_value_bytes;
        if key.len() as u64 > cap || value as u64 > cap {
            return Err(types::KvError::TooLarge(format!(
                "key {key:?}: {} bytes over the {cap}-byte cap",
                key.len().max(value)
            )));
        }
        Ok(())
    }
}

fn kv_err(e: crate::kv::KvError) -> types::KvError {
    types::KvError::Unavailable(e.to_string())
}

impl kv::Host for HostState {
    async fn get(&mut self, key: String) -> Result<Option<Vec<u8>>, types::KvError> {
        self.check_kv_size(&key, 0)?;
        let store = self.plugin.kv.clone();
        self.txn.get(&*store, &self.plugin.name, &key).await.map_err(kv_err)
    }

    fn set(&mut self, key: String, value: Vec<u8>) -> Result<(), types::KvError> {
        self.check_kv_size(&key, value.len())?;
        self.txn.set(&key, value);
        Ok(())
    }

    fn delete(&mut self, key: String) -> Result<(), types::KvError> {
        self.check_kv_size(&key, 0)?;
        self.txn.delete(&key);
        Ok(())
    }
}

impl config::Host for HostState {
    fn get(&mut self, key: String) -> Option<String> {
        self.plugin.config.get(&key).cloned()
    }
}
