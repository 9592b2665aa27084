//! `plugbus inspect FILE.wasm`: what a component is, what it imports and exports, the limits it
//! would run under, and whether the host would load it (with every reason it would not).

use crate::config::Config;
use crate::kv::MemoryKv;
use crate::manifest::Manifest;
use crate::sandbox::{Limits, LoadError, PluginSettings, Sandbox, allowed_import};
use serde::Serialize;
use std::sync::Arc;
use wasmtime::component::Component;

/// The verdict on one file.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The file.
    pub file: String,
    /// Its size in bytes.
    pub size: usize,
    /// SHA-256 of its bytes.
    pub hash: String,
    /// Whether the host would load it.
    pub loadable: bool,
    /// Every reason it would not.
    pub problems: Vec<String>,
    /// Its manifest, when it could be read.
    pub manifest: Option<Manifest>,
    /// Its imports, by full name.
    pub imports: Vec<String>,
    /// Its exports, by full name.
    pub exports: Vec<String>,
    /// The limits it would run under with this config.
    pub limits: Option<Limits>,
}

/// Inspects `bytes` as the host would load them under `config`.
pub async fn inspect(sandbox: &Sandbox, file: &str, bytes: &[u8], config: &Config) -> Inspection {
    let mut report = Inspection {
        file: file.to_string(),
        size: bytes.len(),
        hash: crate::sandbox::content_hash(bytes),
        loadable: false,
        problems: Vec::new(),
        manifest: None,
        imports: Vec::new(),
        exports: Vec::new(),
        limits: None,
    };
    if let Err(e) = crate::sandbox::check_header(bytes) {
        report.problems.push(e.to_string());
        return report;
    }
    let component = match Component::new(sandbox.engine(), bytes) {
        Ok(c) => c,
        Err(e) => {
            report.problems.push(format!("invalid component: {e:#}"));
            return report;
        }
    };
    let ty = component.component_type();
    report.imports = ty.imports(sandbox.engine()).map(|(n, _)| n.to_string()).collect();
    report.exports = ty.exports(sandbox.engine()).map(|(n, _)| n.to_string()).collect();
    let forbidden: Vec<String> = report.imports.iter().filter(|n| !allowed_import(n)).cloned().collect();
    if !forbidden.is_empty() {
        report.problems.push(LoadError::ForbiddenImports(forbidden).to_string());
        return report;
    }
    let kv = Arc::new(MemoryKv::new());
    match sandbox
        .prepare(component, report.hash.clone(), |m| PluginSettings {
            limits: config.limits_for(&m.name),
            config: config.values_for(&m.name),
            kv,
        })
        .await
    {
        Ok(plugin) => {
            report.limits = Some(plugin.limits().clone());
            report.manifest = Some(plugin.manifest().clone());
            report.loadable = true;
        }
        Err(e) => report.problems.push(e.to_string()),
    }
    report
}

impl std::fmt::Display for Inspection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} ({} bytes, sha256 {})", self.file, self.size, &self.hash[..16])?;
        if let Some(m) = &self.manifest {
            writeln!(f, "plugin     {} {}", m.name, m.version)?;
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
