//! The host's settings: one `Config`, the single source of truth for every knob.

use crate::router::Flow;
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
            sandbox: SandboxSettings::default(),
            plugins: HashMap::new(),
        }
    }
}

impl Config {
    /// The effective limits of `plugin`.
    pub fn limits_for(&self, plugin: &str) -> Limits {
        self.plugins
            .get(plugin)
            .and_then(|p| p.limits.clone())
            .unwrap_or_else(|| self.limits.clone())
    }

    /// The effective flow of `plugin`.
    pub fn flow_for(&self, plugin: &str) -> Flow {
        self.plugins
            .get(plugin)
            .and_then(|p| p.flow)
            .unwrap_or(self.flow)
    }

    /// The operator's `config` values for `plugin`.
    pub fn values_for(&self, plugin: &str) -> HashMap<String, String> {
        self.plugins
            .get(plugin)
            .map(|p| p.config.clone())
            .unwrap_or_default()
    }
}
