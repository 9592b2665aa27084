//! `plugbus inspect FILE.wasm`: what a component is, what it imports and exports, the plugin it
//! would be (the identity its file name or the config gives it, which its manifest must agree
//! with), the limits it would run under, and whether the host would load it (with every reason
//! it would not).

use crate::config::Config;
use crate::event::one_line;
use crate::kv::MemoryKv;
use crate::manifest::Manifest;
use crate::sandbox::{Limits, LoadError, PluginSettings, Sandbox, allowed_import, shown_name};
use serde::Serialize;
use std::path::Path;
use std::sync::Arc;

/// The verdict on one file.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The file.
    pub file: String,
    /// Its size in bytes.
    pub size: usize,
    /// SHA-256 of its bytes.
    pub hash: String,
    /// The plugin the host would run it as: its file name without `.wasm`, or the plugin a
    /// `[plugins.NAME] file` entry binds it to. `None` when the file name names no plugin.
    pub identity: Option<String>,
    /// Whether the host would load it.
    pub loadable: bool,
    /// Every reason it would not.
    pub problems: Vec<String>,
    /// The contract (and SDK) version it declares it was built against; `None` when it declares
    /// none (loadable, with a warning) or the declaration is refused (see `problems`).
    pub contract: Option<crate::contract::Declared>,
    /// Its manifest, when it could be read (as declared: `name` is the manifest's claim; a
    /// loadable plugin runs as `identity`).
    pub manifest: Option<Manifest>,
    /// Its imports, by full name.
    pub imports: Vec<String>,
    /// Its exports, by full name.
    pub exports: Vec<String>,
    /// The limits it would run under with this config.
    pub limits: Option<Limits>,
    /// The bytes of its compiled code the host would hold in memory while it serves, against
    /// `sandbox.max_code_mib` (`None` when it was not made a plugin).
    pub code_bytes: Option<u64>,
    /// `sandbox.max_code_mib`, the code all loaded plugins may hold together, in bytes (`None`
    /// for a file not read).
    pub code_budget_bytes: Option<u64>,
    /// The outbound HTTP destinations the config grants it (its manifest's `outbound` are the
    /// requested ones; a call goes out only when both allow it).
    pub granted_outbound: Vec<String>,
}

/// The verdict on a file the loader would not read (a FIFO, a device, over `max_wasm_bytes`):
/// not loadable, for `why`.
pub fn unreadable(file: &str, why: &str) -> Inspection {
    Inspection {
        file: file.to_string(),
        size: 0,
        hash: String::new(),
        identity: None,
        loadable: false,
        problems: vec![why.to_string()],
        contract: None,
        manifest: None,
        imports: Vec::new(),
        exports: Vec::new(),
        limits: None,
        code_bytes: None,
        code_budget_bytes: None,
        granted_outbound: Vec::new(),
    }
}

/// Inspects `bytes` as the host would load them under `config`.
pub async fn inspect(sandbox: &Sandbox, file: &str, bytes: &[u8], config: &Config) -> Inspection {
    let mut report = Inspection {
        file: file.to_string(),
        size: bytes.len(),
        hash: crate::sandbox::content_hash(bytes),
        identity: None,
        loadable: false,
        problems: Vec::new(),
        contract: None,
        manifest: None,
        imports: Vec::new(),
        exports: Vec::new(),
        limits: None,
        code_bytes: None,
        code_budget_bytes: Some(config.sandbox.max_code_mib.saturating_mul(1 << 20)),
        granted_outbound: Vec::new(),
    };
    if let Err(e) = crate::sandbox::check_header(bytes) {
        report.problems.push(e.to_string());
        return report;
    }
    match crate::contract::check(bytes) {
        Ok(declared) => report.contract = declared,
        Err(e) => report.problems.push(e.to_string()),
    }
    // Compiled as the loader compiles it: in a child under the compile caps when the sandbox
    // has a compiler, through the compile cache when it has one.
    let component = match sandbox.compile(bytes, &report.hash).await {
        Ok(c) => c,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    let ty = component.component_type();
    let forbidden: Vec<String> =
        ty.imports(sandbox.engine()).map(|(n, _)| n.to_string()).filter(|n| !allowed_import(n)).collect();
    // Each name on one line and cut: a hostile file's names are as long and as many as it likes.
    report.imports = ty.imports(sandbox.engine()).map(|(n, _)| shown_name(n)).collect();
    report.exports = ty.exports(sandbox.engine()).map(|(n, _)| shown_name(n)).collect();
    if !forbidden.is_empty() {
        report.problems.push(LoadError::ForbiddenImports(forbidden).to_string());
        return report;
    }
    let identity = match crate::loader::identity_of(Path::new(file), config) {
        Ok(id) => Some(id),
        Err(e) => {
            report.problems.push(e.to_string());
            None
        }
    };
    report.identity = identity.clone();
    let kv = Arc::new(MemoryKv::new());
    let mut declared: Option<Manifest> = None;
    let mut granted = Vec::new();
    let result = sandbox
        .prepare_bound(component, report.hash.clone(), |m| {
            declared = Some(m.clone());
            // Without an identity, the rest is still checked as the manifest's own name.
            let id = identity.clone().unwrap_or_else(|| m.name.clone());
            m.bind(&id, config.queue_group_for(&id))
                .map_err(|e| LoadError::Manifest(format!("the file {} is plugin {id:?}: {e}", file_name(file))))?;
            granted = config.outbound_for(&id);
            Ok(PluginSettings {
                limits: config.limits_for(&id),
                config: config.values_for(&id),
                kv,
                allowed_outbound: granted.clone(),
            })
        })
        .await;
    report.manifest = declared;
    report.granted_outbound = granted;
    match result {
        Ok(plugin) => {
            report.limits = Some(plugin.limits().clone());
            report.code_bytes = Some(plugin.code_bytes());
            if let Some(m) = &mut report.manifest {
                m.queue_group = plugin.manifest().queue_group.clone();
            }
            report.loadable = report.problems.is_empty();
        }
        Err(e) => report.problems.push(e.to_string()),
    }
    report
}

fn file_name(file: &str) -> String {
    Path::new(file).file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| file.to_string())
}

impl std::fmt::Display for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.hash.get(..16) {
            // The file's name on one line: a name with a line break would draw lines of its own.
            Some(hash) => writeln!(f, "{} ({} bytes, sha256 {hash})", one_line(&self.file), self.size)?,
            // A file the loader would not read (a FIFO, a device, over the size bound).
            None => writeln!(f, "{} (not read)", one_line(&self.file))?,
        }
        match (&self.identity, &self.manifest) {
            (Some(id), Some(m)) if *id == m.name => writeln!(f, "plugin     {id} {}", m.version)?,
            (Some(id), Some(m)) => writeln!(f, "plugin     {id} {} (its manifest says {:?})", m.version, m.name)?,
            (Some(id), None) => writeln!(f, "plugin     {id} (by its file name)")?,
            (None, Some(m)) => {
                writeln!(f, "plugin     none: the file name names no plugin (manifest says {:?})", m.name)?
            }
            (None, None) => {}
        }
        match &self.contract {
            Some(c) => writeln!(f, "contract   {c} (this host speaks {})", crate::contract::CONTRACT_VERSION)?,
            None if self.problems.iter().any(|p| p.contains("plugbus contract") || p.contains("plugbus-contract")) => {}
            None => writeln!(
                f,
                "contract   not declared (built with an older plugbus-sdk, or without it): loaded with a warning"
            )?,
        }
        if let Some(g) = self.manifest.as_ref().and_then(|m| m.queue_group.as_ref()) {
            writeln!(f, "queue      {g}")?;
        }
        if let Some(m) = &self.manifest {
            for s in &m.subscriptions {
                let mut extra = Vec::new();
                if let Some(q) = &s.queue_group {
                    extra.push(format!("queue group {q}"));
                }
                if let Some(o) = &s.order_by {
                    extra.push(format!("ordered by {o:?}"));
                }
                if s.durable {
                    extra.push(format!("durable, deliver {}", if s.deliver_all { "all" } else { "new" }));
                }
                let extra = if extra.is_empty() { String::new() } else { format!(" ({})", extra.join(", ")) };
                writeln!(f, "subscribes {}{extra}", s.pattern)?;
            }
            writeln!(
                f,
                "publishes  {}",
                if m.publishes.is_empty() { "(nothing)".into() } else { m.publishes.join(", ") }
            )?;
        }
        let requested = self.manifest.as_ref().map(|m| m.outbound.clone()).unwrap_or_default();
        if !requested.is_empty() || !self.granted_outbound.is_empty() {
            let list = |l: &[String]| if l.is_empty() { "(none)".to_string() } else { l.join(", ") };
            writeln!(f, "outbound   requested {}", list(&requested))?;
            let granted = match self.granted_outbound.is_empty() {
                true => "(none: it loads, and every call it makes is refused)".to_string(),
                false => list(&self.granted_outbound),
            };
            writeln!(f, "           granted   {granted}")?;
        }
        writeln!(f, "imports")?;
        for i in &self.imports {
            let mark = if allowed_import(i) { " " } else { "✗" };
            writeln!(f, "  {mark} {i}")?;
        }
        writeln!(f, "exports")?;
        for e in &self.exports {
            writeln!(f, "    {e}")?;
        }
        if let Some(l) = &self.limits {
            writeln!(
                f,
                "limits     memory {} MiB, deadline {}, {} publishes / {} bytes out per event, events up to {} bytes, kv values up to {} bytes",
                l.memory_mib,
                humantime::format_duration(l.deadline),
                l.max_publishes,
                l.max_output_bytes,
                l.max_event_bytes,
                l.max_kv_value_bytes
            )?;
        }
        if let (Some(code), Some(budget)) = (self.code_bytes, self.code_budget_bytes) {
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            writeln!(
                f,
                "code       {:.1} MiB compiled, held in memory while it serves ({:.1}% of sandbox.max_code_mib, {:.0} MiB, for all plugins together)",
                mib(code),
                code as f64 * 100.0 / budget.max(1) as f64,
                mib(budget)
            )?;
        }
        if self.loadable {
            write!(f, "verdict    loadable")
        } else {
            writeln!(f, "verdict    NOT loadable:")?;
            for p in &self.problems {
                writeln!(f, "  - {p}")?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_the_loader_would_not_read_is_shown_with_its_reason() {
        let text = unreadable("plugins/fifo.wasm", "a FIFO, not a regular file: not read").to_string();
        assert!(text.starts_with("plugins/fifo.wasm (not read)"), "{text}");
        assert!(text.contains("a FIFO, not a regular file"), "{text}");
        // A name with a line break is shown on one line: it cannot draw a line of its own.
        let text = unreadable("plugins/a\nplugin     forged", "a FIFO").to_string();
        assert!(text.starts_with("plugins/a\\nplugin     forged (not read)"), "{text}");
        assert!(!text.lines().any(|l| l.starts_with("plugin     forged")), "{text}");
    }
}
