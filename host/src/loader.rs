//! Loading the plugins folder: every `*.wasm` file is read, compiled, validated and named by
//! its manifest. A bad file is reported (path and reason) and skipped; it never stops the host.

use crate::config::Config;
use crate::kv::KvStore;
use crate::sandbox::{LoadError, Plugin, PluginSettings, Sandbox};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A file that could not be loaded, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// Loads one file.
pub async fn load_file(
    sandbox: &Sandbox,
    path: &Path,
    config: &Config,
    kv: &Arc<dyn KvStore>,
) -> Result<Plugin, LoadError> {
    let bytes =
        tokio::fs::read(path).await.map_err(|e| LoadError::NotAComponent(format!("cannot read the file: {e}")))?;
    sandbox
        .load(&bytes, |m| PluginSettings {
            limits: config.limits_for(&m.name),
            config: config.values_for(&m.name),
            kv: kv.clone(),
        })
        .await
}

/// The `*.wasm` files of `dir`, sorted by name.
pub fn wasm_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "wasm"))
        .collect();
    files.sort();
    Ok(files)
}

/// Loads every plugin in `config.plugins_dir`; returns the loaded ones and the rejected files.
/// Two files declaring the same plugin name are both reported; the first (by file name) loads.
pub async fn load_dir(
    sandbox: &Sandbox,
    config: &Config,
    kv: &Arc<dyn KvStore>,
) -> anyhow::Result<(Vec<(PathBuf, Plugin)>, Vec<Rejected>)> {
    use anyhow::Context;
    let dir = &config.plugins_dir;
    let files = wasm_files(dir).with_context(|| format!("reading the plugins folder {}", dir.display()))?;
    let mut loaded: Vec<(PathBuf, Plugin)> = Vec::new();
    let mut rejected = Vec::new();
    let mut by_name: HashMap<String, PathBuf> = HashMap::new();
    for path in files {
        match load_file(sandbox, &path, config, kv).await {
            Ok(plugin) => {
                if let Some(first) = by_name.get(plugin.name()) {
                    let reason =
                        format!("declares plugin name {:?}, already taken by {}", plugin.name(), first.display());
                    tracing::error!(file = %path.display(), "plugin not loaded: {reason}");
                    rejected.push(Rejected { path, reason });
                    continue;
                }
                tracing::info!(file = %path.display(), plugin = plugin.name(), version = %plugin.manifest().version, hash = &plugin.hash()[..12], "plugin loaded");
                by_name.insert(plugin.name().to_string(), path.clone());
                loaded.push((path, plugin));
            }
            Err(e) => {
                tracing::error!(file = %path.display(), "plugin not loaded: {e}");
                rejected.push(Rejected { path, reason: e.to_string() });
            }
        }
    }
    Ok((loaded, rejected))
}
