//! Load-time checks: is this file a component of our world, importing nothing else?

use sha2::{Digest, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Why a file cannot be loaded as a plugin.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// Empty, not wasm, or a core module.
    #[error("{0}")]
    NotAComponent(String),
    /// Malformed, truncated, or not linkable.
    #[error("invalid component: {0}")]
    Invalid(String),
    /// Imports outside the contract (every one listed).
    #[error("imports outside the plugbus contract: {}", .0.join(", "))]
    ForbiddenImports(Vec<String>),
    /// The manifest is invalid (the message names the field).
    #[error("invalid manifest: {0}")]
    Manifest(String),
    /// Built against a contract version this host does not speak (both named), or an
    /// unreadable `plugbus-contract` section (`crate::contract`).
    #[error("{0}")]
    Contract(String),
}

/// Hex SHA-256 of the component bytes.
pub fn content_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Cheap checks on the first bytes, for clear messages before the parser's.
pub fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.is_empty() {
        return Err(LoadError::NotAComponent("the file is empty".into()));
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotAComponent("not a WebAssembly file (no \\0asm header)".into()));
    }
    match bytes[4..8] {
        [0x0d, 0x00, 0x01, 0x00] => Ok(()),
        [0x01, 0x00, 0x00, 0x00] => Err(LoadError::NotAComponent(
            "a core WebAssembly module, not a component: build the handler with \
             `--target wasm32-wasip2` and the plugbus SDK"
                .into(),
        )),
        _ => Err(LoadError::NotAComponent("unknown WebAssembly version or layer".into())),
    }
}

/// WASI interfaces a plugin may import: stdio (captured), clocks, random, and the plumbing
/// they need. No filesystem, no sockets, no HTTP.
const ALLOWED_WASI: &[&str] = &[
    "wasi:io/error",
    "wasi:io/streams",
    "wasi:io/poll",
    "wasi:cli/environment",
    "wasi:cli/exit",
    "wasi:cli/stdin",
    "wasi:cli/stdout",
    "wasi:cli/stderr",
    "wasi:cli/terminal-input",
    "wasi:cli/terminal-output",
    "wasi:cli/terminal-stdin",
    "wasi:cli/terminal-stdout",
    "wasi:cli/terminal-stderr",
    "wasi:clocks/wall-clock",
    "wasi:clocks/monotonic-clock",
    "wasi:random/random",
    "wasi:random/insecure",
    "wasi:random/insecure-seed",
];

/// The outbound HTTP client: linked only for a plugin whose manifest asks for destinations the
/// operator grants (see `outbound`).
const HTTP_CLIENT: &[&str] = &["wasi:http/types", "wasi:http/outgoing-handler"];

/// Whether an import name (`ns:pkg/iface@version`) is part of the contract (the HTTP client
/// included: whether this plugin gets it is decided once its manifest is read).
pub fn allowed_import(name: &str) -> bool {
    let unversioned = name.split('@').next().unwrap_or(name);
    unversioned.starts_with("plugbus:handler/") || ALLOWED_WASI.contains(&unversioned) || is_http_import(name)
}

/// Whether an import is the outbound HTTP client.
pub fn is_http_import(name: &str) -> bool {
    HTTP_CLIENT.contains(&name.split('@').next().unwrap_or(name))
}

/// The component's HTTP client imports, by full name.
pub fn http_imports(engine: &Engine, component: &Component) -> Vec<String> {
    component.component_type().imports(engine).map(|(n, _)| n.to_string()).filter(|n| is_http_import(n)).collect()
}

/// Fails with every import outside the contract, by full name.
pub fn check_imports(engine: &Engine, component: &Component) -> Result<(), LoadError> {
    let ty = component.component_type();
    let bad: Vec<String> =
        ty.imports(engine).map(|(name, _)| name.to_string()).filter(|n| !allowed_import(n)).collect();
    if bad.is_empty() { Ok(()) } else { Err(LoadError::ForbiddenImports(bad)) }
}
