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
    /// Imports outside the contract (the first [`LISTED_IMPORTS`] named, each cut at
    /// [`NAME_BYTES`], with how many more).
    #[error("imports outside the plugbus contract: {}", listed(.0))]
    ForbiddenImports(Vec<String>),
    /// The manifest is invalid (the message names the field).
    #[error("invalid manifest: {0}")]
    Manifest(String),
    /// Built against a contract version this host does not speak (both named), or an
    /// unreadable `plugbus-contract` section (`crate::contract`).
    #[error("{0}")]
    Contract(String),
    /// The host could not load it now (not the component's fault, as far as the host can tell):
    /// every instance slot stayed taken (or the component needs more than the whole pool holds,
    /// which the host cannot tell apart), the compile child was killed from outside. Tried again
    /// by itself (see [`LoadError::is_transient`]), or when the file changes.
    #[error("host error: {0}")]
    Host(String),
    /// The machine was too busy to compile it within the wall-clock bound (not the file's
    /// fault, not kept): tried again as [`LoadError::Host`] is.
    #[error("{0}")]
    Busy(String),
    /// Its compile child crashed (a panic, a signal), or its output did not load: the host's
    /// error, but compiling this file may be what caused it, so not tried again by itself.
    #[error("host error: {0}")]
    Crashed(String),
    /// Its compiled code fits `sandbox.max_code_mib` alone, not beside what the other plugins
    /// hold now (`code_budget`): tried again by itself as [`LoadError::Host`] is, so it loads
    /// once they hold less.
    #[error("{0}")]
    NoRoom(String),
}

impl LoadError {
    /// Whether the failure is the host's or the machine's, not the file's: the reloader tries
    /// such a load again by itself, after a growing pause (review 56a M2: a plugin refused so at
    /// a restart under memory pressure stayed out until someone touched its file).
    pub fn is_transient(&self) -> bool {
        matches!(self, LoadError::Host(_) | LoadError::Busy(_) | LoadError::NoRoom(_))
    }
}

/// The most imports a refusal names: a file can import thousands (each name its own), and the
/// refusal is logged and served by the API on every read of the plugin list.
pub const LISTED_IMPORTS: usize = 16;

/// The most of an import's or export's name shown (on one line): a name can be 100 KB.
pub const NAME_BYTES: usize = 512;

/// `name` as the host shows it: on one line, cut at [`NAME_BYTES`].
pub fn shown_name(name: &str) -> String {
    crate::event::one_line_cut(name, NAME_BYTES)
}

fn listed(names: &[String]) -> String {
    let mut text = names.iter().take(LISTED_IMPORTS).map(|n| shown_name(n)).collect::<Vec<_>>().join(", ");
    if names.len() > LISTED_IMPORTS {
        text.push_str(&format!(" … and {} more", names.len() - LISTED_IMPORTS));
    }
    text
}

/// Hex SHA-256 of the component bytes.
pub fn content_hash(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Cheap checks before the parser reads anything: the first bytes (for clear messages) and
/// how deep components nest ([`check_nesting`]). Whatever compiles or inspects a file calls it
/// first.
pub fn check_header(bytes: &[u8]) -> Result<(), LoadError> {
    if bytes.is_empty() {
        return Err(LoadError::NotAComponent("the file is empty".into()));
    }
    if bytes.len() < 8 || &bytes[..4] != b"\0asm" {
        return Err(LoadError::NotAComponent("not a WebAssembly file (no \\0asm header)".into()));
    }
    match bytes[4..8] {
        [0x0d, 0x00, 0x01, 0x00] => check_nesting(bytes),
        [0x01, 0x00, 0x00, 0x00] => Err(LoadError::NotAComponent(
            "a core WebAssembly module, not a component: build the handler with \
             `--target wasm32-wasip2` and the plugbus SDK"
                .into(),
        )),
        _ => Err(LoadError::NotAComponent("unknown WebAssembly version or layer".into())),
    }
}

/// The deepest a component may hold components inside components. Tools that compose
/// components nest a few levels; a file nested thousands deep is an attack: compiling one of
/// 100,000 levels (a 1.2 MB file) grew the process past 24 GiB until the kernel killed it.
pub const MAX_NESTING: usize = 64;

/// Refuses a component that holds components nested more than [`MAX_NESTING`] deep, before
/// anything compiles or walks it. Reads only section headers, without recursion; what it
/// cannot read is left for the parser to name.
pub fn check_nesting(bytes: &[u8]) -> Result<(), LoadError> {
    // Where each component being read ends, outermost first.
    let mut ends = vec![bytes.len()];
    let mut pos = 8;
    while let Some(&end) = ends.last() {
        if pos >= end {
            ends.pop();
            continue;
        }
        let id = bytes[pos];
        let Some((size, body)) = leb_u32(bytes, pos + 1) else { return Ok(()) };
        let Some(body_end) = body.checked_add(size).filter(|e| *e <= end) else { return Ok(()) };
        if id == 4 {
            if ends.len() >= MAX_NESTING {
                return Err(LoadError::Invalid(format!("components nested more than {MAX_NESTING} deep")));
            }
            ends.push(body_end);
            // past the nested component's own 8-byte header
            pos = body + 8;
        } else {
            if id == 7 {
                check_type_nesting(&bytes[body..body_end], body)?;
            }
            pos = body_end;
        }
    }
    Ok(())
}

/// Refuses a component type section whose component or instance types nest more than
/// [`MAX_NESTING`] deep. wasmparser reads a type by recursion, one stack frame set a level and
/// about 3 bytes of file a level: a few kilobytes overflow a thread's stack and abort the whole
/// process (1,000 levels did in a debug build). This reads the nesting with a stack of its
/// own: a declaration that opens a component or instance type (`0x01` then `0x41` / `0x42`) is
/// entered here, every other one is read by wasmparser (none of them holds a nested type).
/// What it cannot read is left for the parser to name.
fn check_type_nesting(section: &[u8], offset: usize) -> Result<(), LoadError> {
    use wasmparser::{BinaryReader, ComponentTypeDeclaration, InstanceTypeDeclaration};
    let too_deep = || LoadError::Invalid(format!("component types nested more than {MAX_NESTING} deep"));
    let mut r = BinaryReader::new(section, offset);
    let Ok(types) = r.read_var_u32() else { return Ok(()) };
    // The byte after the next one, without moving `r`.
    let second = |r: &BinaryReader| {
        let mut probe = r.clone();
        probe.read_u8().and_then(|_| probe.read_u8()).ok()
    };
    for _ in 0..types {
        // (declarations left, an instance type's) of each type open, outermost first
        let mut open: Vec<(u32, bool)> = Vec::new();
        let opens = |r: &mut BinaryReader, open: &mut Vec<(u32, bool)>| -> Option<()> {
            let instance = r.read_u8().ok()? == 0x42;
            let decls = r.read_var_u32().ok()?;
            open.push((decls, instance));
            Some(())
        };
        let Ok(first) = r.clone().read_u8() else { return Ok(()) };
        if matches!(first, 0x41 | 0x42) {
            if opens(&mut r, &mut open).is_none() {
                return Ok(());
            }
        } else if r.read::<wasmparser::ComponentType>().is_err() {
            return Ok(());
        }
        while let Some((left, instance)) = open.last_mut() {
            if *left == 0 {
                open.pop();
                continue;
            }
            *left -= 1;
            let instance = *instance;
            let kind = r.clone().read_u8().ok();
            if kind == Some(0x01) && matches!(second(&r), Some(0x41 | 0x42)) {
                if open.len() >= MAX_NESTING {
                    return Err(too_deep());
                }
                let _ = r.read_u8();
                if opens(&mut r, &mut open).is_none() {
                    return Ok(());
                }
                continue;
            }
            let read = if instance {
                r.read::<InstanceTypeDeclaration>().map(drop)
            } else {
                r.read::<ComponentTypeDeclaration>().map(drop)
            };
            if read.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// An unsigned LEB128 `u32` at `pos`: its value and where the next byte is.
fn leb_u32(bytes: &[u8], mut pos: usize) -> Option<(usize, usize)> {
    let mut value = 0u64;
    for shift in (0..35).step_by(7) {
        let b = *bytes.get(pos)?;
        pos += 1;
        value |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return u32::try_from(value).ok().map(|v| (v as usize, pos));
        }
    }
    None
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_names_a_few_imports_each_cut_and_says_how_many_more() {
        let names: Vec<String> = (0..600).map(|i| format!("evil:x{i}/{}", "y".repeat(99_000))).collect();
        let text = LoadError::ForbiddenImports(names).to_string();
        assert!(text.len() < 16 * (NAME_BYTES + 64) + 200, "{} bytes", text.len());
        assert!(text.starts_with("imports outside the plugbus contract: evil:x0/yyy"), "{}", &text[..80]);
        assert!(text.ends_with(" … and 584 more"), "{}", &text[text.len() - 80..]);
        let forged = LoadError::ForbiddenImports(vec!["a:b/c\nINFO plugin loaded".into()]).to_string();
        assert_eq!(forged, "imports outside the plugbus contract: a:b/c\\nINFO plugin loaded");
    }

    const HEADER: &[u8] = b"\0asm\x0d\x00\x01\x00";

    /// Appends `n` as an unsigned LEB128.
    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            out.push(if n > 0 { b | 0x80 } else { b });
            if n == 0 {
                return;
            }
        }
    }

    /// `depth` components, each the only section of the one around it: the sizes from the
    /// inside out, then the bytes from the outside in (linear, no copying of the inner levels).
    fn nested(depth: usize) -> Vec<u8> {
        let mut sizes = vec![HEADER.len()];
        for _ in 0..depth {
            let inner = *sizes.last().unwrap();
            let mut len = Vec::new();
            leb(inner, &mut len);
            sizes.push(HEADER.len() + 1 + len.len() + inner);
        }
        let mut out = Vec::with_capacity(sizes[depth]);
        for inner in sizes[..depth].iter().rev() {
            out.extend_from_slice(HEADER);
            out.push(4);
            leb(*inner, &mut out);
        }
        out.extend_from_slice(HEADER);
        out
    }

    /// A component whose type section holds one component type `depth` levels deep, instance
    /// and component types taking turns (`0x41` / `0x42`, one declaration each: a type).
    fn nested_types(depth: usize) -> Vec<u8> {
        let mut body = vec![1]; // one type
        for level in 0..depth {
            body.extend([if level % 2 == 0 { 0x41 } else { 0x42 }, 0x01, 0x01]);
        }
        body.extend([0x41, 0x00]);
        let mut out = HEADER.to_vec();
        out.push(7);
        leb(body.len(), &mut out);
        out.extend(body);
        out
    }

    #[test]
    fn components_are_refused_past_the_nesting_limit_and_read_without_recursion() {
        // the outermost is level 1: MAX_NESTING levels in all pass, one more does not
        assert!(check_nesting(&nested(MAX_NESTING - 1)).is_ok());
        let err = check_nesting(&nested(MAX_NESTING)).unwrap_err().to_string();
        assert_eq!(err, format!("invalid component: components nested more than {MAX_NESTING} deep"));
        // a million levels: no stack is deep enough for a recursive reader
        assert!(check_nesting(&nested(1_000_000)).is_err());
        // siblings are not depth: 1,000 components side by side
        let mut wide = HEADER.to_vec();
        for _ in 0..1_000 {
            wide.extend([4, 8]);
            wide.extend(HEADER);
        }
        assert!(check_nesting(&wide).is_ok());
        // component types nested inside component and instance types: the same bound
        assert!(check_header(&nested_types(MAX_NESTING - 1)).is_ok());
        let err = check_header(&nested_types(MAX_NESTING)).unwrap_err().to_string();
        assert_eq!(err, format!("invalid component: component types nested more than {MAX_NESTING} deep"));
        assert!(check_header(&nested_types(1_000_000)).is_err());
        // what it cannot read is the parser's to name
        for garbage in [&b"\0asm\x0d\x00\x01\x00\x04\xff"[..], b"\0asm\x0d\x00\x01\x00\x04\x7f\x00", b"\0asm"] {
            assert!(check_nesting(garbage).is_ok(), "{garbage:?}");
        }
    }
}
