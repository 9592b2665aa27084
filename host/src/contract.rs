//! The contract version a component was built against, and whether this host speaks it.
//!
//! Components built with `plugbus-sdk` carry a `plugbus-contract` custom section (the
//! `#[handler]` attribute places it in the component's core module): one line,
//! `plugbus:handler@0.1.1 plugbus-sdk@0.1.0`. The host reads it before compiling: a contract
//! of another major version (for `0.x`, another minor: semver's rule before 1.0) is refused,
//! naming both versions; a component without the section (built before the SDK wrote it, or
//! without the SDK) is loaded, and the loader logs a warning.
//!
//! Within a series the contract only grows, and its patch version says how far: 0.1.1 added the
//! `rpc` interface (request/reply). A component built against 0.1.0 imports `…@0.1.0` names and
//! loads unchanged (wasmtime resolves imports and exports semver-compatibly: `@0.1.0` finds the
//! host's `@0.1.1`); a component that does not call `request`/`reply` does not import `rpc` at
//! all. One built against a newer patch than this host speaks loads when it uses nothing the
//! host lacks; otherwise linking fails naming the missing import.

use crate::sandbox::LoadError;

/// The WIT contract this host speaks: `package plugbus:handler@…` in `wit/plugbus.wit` (a test
/// keeps the two equal).
pub const CONTRACT_VERSION: &str = "0.1.1";

/// The custom section the SDK writes.
pub const SECTION: &str = "plugbus-contract";

/// What a component declares about how it was built.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Declared {
    /// The contract version (`0.1.1`).
    pub contract: String,
    /// The SDK version that built it, when the section names one.
    pub sdk: Option<String>,
}

impl std::fmt::Display for Declared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "plugbus contract {}", self.contract)?;
        if let Some(sdk) = &self.sdk {
            write!(f, " (plugbus-sdk {sdk})")?;
        }
        Ok(())
    }
}

/// Reads the component's declaration: `Ok(None)` when it has no `plugbus-contract` section,
/// an error when the section is there but unreadable or names a contract this host does not
/// speak.
pub fn check(component: &[u8]) -> Result<Option<Declared>, LoadError> {
    let Some(text) = section(component) else { return Ok(None) };
    let declared = parse(&text).ok_or_else(|| {
        LoadError::Contract(format!(
            "its {SECTION} section is unreadable ({}): expected `plugbus:handler@X.Y.Z plugbus-sdk@X.Y.Z`",
            crate::event::quoted(&String::from_utf8_lossy(&text))
        ))
    })?;
    let ours = series(CONTRACT_VERSION).expect("CONTRACT_VERSION is X.Y.Z");
    let theirs = series(&declared.contract).expect("parse checked it");
    if ours != theirs {
        // Cut: after its `-` a version may be as long as the section.
        let sdk =
            declared.sdk.as_deref().map(|s| format!(" (plugbus-sdk {})", crate::event::cut(s))).unwrap_or_default();
        return Err(LoadError::Contract(format!(
            "built against plugbus contract {theirs}{sdk}, this host speaks {ours}: rebuild it with a \
             plugbus-sdk for contract {ours}, or run a plugbus that speaks {theirs}"
        )));
    }
    Ok(Some(declared))
}

/// The compatibility series of a version: `0.MINOR` before 1.0 (each minor may break), `MAJOR`
/// from 1.0 on. `None` unless the version is `X.Y.Z` (a pre-release or build suffix allowed).
fn series(version: &str) -> Option<String> {
    let core = version.split(['-', '+']).next()?;
    let mut parts = core.split('.');
    let (major, minor, patch) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let num = |s: &str| (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<u64>().ok())?;
    let (major, minor, _) = (num(major)?, num(minor)?, num(patch)?);
    Some(if major == 0 { format!("0.{minor}") } else { major.to_string() })
}

/// `plugbus:handler@X.Y.Z[ plugbus-sdk@X.Y.Z]` on the first line.
fn parse(text: &[u8]) -> Option<Declared> {
    let text = std::str::from_utf8(text).ok()?;
    let mut words = text.lines().next()?.split_whitespace();
    let contract = words.next()?.strip_prefix("plugbus:handler@")?.to_string();
    series(&contract)?;
    let sdk = match words.next() {
        Some(w) => Some(w.strip_prefix("plugbus-sdk@").filter(|v| series(v).is_some())?.to_string()),
        None => None,
    };
    Some(Declared { contract, sdk })
}

/// The contents of the first `plugbus-contract` custom section of the component, its core
/// modules or nested components; `None` when there is none or the binary is not understood.
/// (wasmparser, the parser wasmtime itself uses, walks the nesting.)
pub fn section(component: &[u8]) -> Option<Vec<u8>> {
    for payload in wasmparser::Parser::new(0).parse_all(component) {
        match payload.ok()? {
            wasmparser::Payload::CustomSection(c) if c.name() == SECTION => return Some(c.data().to_vec()),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leb(mut n: usize, out: &mut Vec<u8>) {
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }

    fn section_bytes(id: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![id];
        leb(body.len(), &mut out);
        out.extend_from_slice(body);
        out
    }

    fn custom(name: &str, contents: &str) -> Vec<u8> {
        let mut body = Vec::new();
        leb(name.len(), &mut body);
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(contents.as_bytes());
        section_bytes(0, &body)
    }

    /// A component whose core module carries `contents` in a `plugbus-contract` section.
    fn component_declaring(contents: &str) -> Vec<u8> {
        let mut module = b"\0asm\x01\0\0\0".to_vec();
        module.extend(custom("producers", "x"));
        module.extend(custom(SECTION, contents));
        let mut component = b"\0asm\x0d\0\x01\0".to_vec();
        component.extend(section_bytes(1, &module));
        component
    }

    #[test]
    fn the_contract_version_is_the_wit_package_version() {
        let wit = include_str!("../../wit/plugbus.wit");
        let declared = format!("package plugbus:handler@{CONTRACT_VERSION};");
        assert!(wit.lines().any(|l| l.trim() == declared), "wit/plugbus.wit does not say {declared:?}");
    }

    #[test]
    fn semver_series_before_and_after_one() {
        assert_eq!(series("0.1.0").as_deref(), Some("0.1"));
        assert_eq!(series("0.1.7").as_deref(), Some("0.1"));
        assert_eq!(series("0.2.0").as_deref(), Some("0.2"));
        assert_eq!(series("1.4.2").as_deref(), Some("1"));
        assert_eq!(series("1.0.0-rc.1").as_deref(), Some("1"));
        assert_eq!(series("1.0"), None);
        assert_eq!(series("x.1.0"), None);
    }

    #[test]
    fn a_compatible_contract_is_read_with_the_sdk_version() {
        let ours = format!("plugbus:handler@{CONTRACT_VERSION} plugbus-sdk@0.1.3\n");
        let d = check(&component_declaring(&ours)).unwrap().unwrap();
        assert_eq!(d, Declared { contract: CONTRACT_VERSION.into(), sdk: Some("0.1.3".into()) });
        assert_eq!(d.to_string(), format!("plugbus contract {CONTRACT_VERSION} (plugbus-sdk 0.1.3)"));
    }

    #[test]
    fn another_series_is_refused_naming_both_versions() {
        let e = check(&component_declaring("plugbus:handler@0.2.0 plugbus-sdk@0.2.0\n")).unwrap_err().to_string();
        assert!(e.contains("built against plugbus contract 0.2 (plugbus-sdk 0.2.0), this host speaks 0.1"), "{e}");
        let e = check(&component_declaring("plugbus:handler@1.0.0\n")).unwrap_err().to_string();
        assert!(e.contains("built against plugbus contract 1, this host speaks 0.1"), "{e}");
    }

    #[test]
    fn garbage_in_the_section_is_refused_and_no_section_is_undeclared() {
        let e = check(&component_declaring("hello")).unwrap_err().to_string();
        assert!(e.contains("plugbus-contract section is unreadable") && e.contains("hello"), "{e}");
        let mut plain = b"\0asm\x0d\0\x01\0".to_vec();
        plain.extend(section_bytes(1, b"\0asm\x01\0\0\0"));
        assert_eq!(check(&plain).unwrap(), None);
        assert_eq!(check(b"not wasm").unwrap(), None);
    }
}
