//! The host's settings: one `Config`, the single source of truth for every knob.

use crate::retry::RetryPolicy;
use crate::router::{Delivering, Flow};
use crate::sandbox::{Limits, SandboxSettings};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;

/// Settings of one plugin, by name.
#[derive(Debug, Clone, Default)]
pub struct PluginConfig {
    /// Limits overriding the defaults.
    pub limits: Option<Limits>,
    /// Values for the plugin's `config` import.
    pub config: HashMap<String, String>,
    /// Concurrency and queue overriding the defaults.
    pub flow: Option<Flow>,
    /// Retry policy overriding the default.
    pub retry: Option<RetryPolicy>,
    /// Dead-letter subject overriding `plugbus.dlq.<plugin>`.
    pub dead_letter: Option<String>,
}

/// Everything the host needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// The plugins folder.
    pub plugins_dir: PathBuf,
    /// Where the HTTP API listens; `None` for no API.
    pub http: Option<SocketAddr>,
    /// Default limits for every plugin.
    pub limits: Limits,
    /// Default queue and concurrency per plugin.
    pub flow: Flow,
    /// Default retry policy.
    pub retry: RetryPolicy,
    /// How long a stop waits for queued and in-flight events.
    pub drain_timeout: std::time::Duration,
    /// Engine-wide sandbox settings.
    pub sandbox: SandboxSettings,
    /// Per-plugin settings.
    pub plugins: HashMap<String, PluginConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            plugins_dir: PathBuf::from("plugins"),
            http: Some(SocketAddr::from(([127, 0, 0, 1], 7070))),
            limits: Limits::default(),
            flow: Flow::default(),
            retry: RetryPolicy::default(),
            drain_timeout: std::time::Duration::from_secs(30),
            sandbox: SandboxSettings::default(),
            plugins: HashMap::new(),
        }
    }
}

impl Config {
    /// The effective limits of `plugin`.
    pub fn limits_for(&self, plugin: &str) -> Limits {
        self.plugins.get(plugin).and_then(|p| p.limits.clone()).unwrap_or_else(|| self.limits.clone())
    }

    /// How deliveries to `plugin` are queued, retried and dead-lettered.
    pub fn delivering_for(&self, plugin: &str) -> Delivering {
        let p = self.plugins.get(plugin);
        Delivering {
            flow: p.and_then(|p| p.flow).unwrap_or(self.flow),
            retry: p.and_then(|p| p.retry.clone()).unwrap_or_else(|| self.retry.clone()),
            dead_letter_subject: p
                .and_then(|p| p.dead_letter.clone())
                .unwrap_or_else(|| format!("plugbus.dlq.{plugin}")),
        }
    }

    /// The operator's `config` values for `plugin`.
    pub fn values_for(&self, plugin: &str) -> HashMap<String, String> {
        self.plugins.get(plugin).map(|p| p.config.clone()).unwrap_or_default()
    }
}
