//! `plugbus new NAME`: a handler crate from the template embedded in the binary.
//!
//! The crate depends on `plugbus-sdk` from the crates registry (`"0.x"`: the series this binary
//! speaks), so it builds anywhere; `--sdk PATH` points it at a local SDK checkout instead.

use anyhow::Context;
use std::path::{Path, PathBuf};

const CARGO_TOML: &str = include_str!("templates/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("templates/lib.rs.tmpl");
const README: &str = include_str!("templates/README.md.tmpl");
const GITIGNORE: &str = include_str!("templates/gitignore.tmpl");

/// Where the generated crate gets the SDK from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sdk {
    /// `plugbus-sdk = "<requirement>"` from the crates registry.
    Registry(String),
    /// `plugbus-sdk = { path = ".." }`: a local checkout of the SDK crate.
    Path(PathBuf),
}

impl Sdk {
    /// The registry requirement matching this binary: `"0.1"` for 0.1.x (before 1.0 each minor
    /// is its own series), `"1"` from 1.0 on.
    pub fn registry() -> Sdk {
        let version = env!("CARGO_PKG_VERSION");
        let mut parts = version.split('.');
        let major = parts.next().unwrap_or("0");
        let req = if major == "0" { format!("0.{}", parts.next().unwrap_or("0")) } else { major.to_string() };
        Sdk::Registry(req)
    }

    /// `--sdk PATH` when given, else the registry.
    pub fn from_flag(path: Option<PathBuf>) -> Sdk {
        path.map(Sdk::Path).unwrap_or_else(Sdk::registry)
    }

    /// The dependency's value in `Cargo.toml`; a path is checked to be the SDK crate.
    fn dependency(&self) -> anyhow::Result<String> {
        match self {
            Sdk::Registry(req) => Ok(toml_string(req)),
            Sdk::Path(path) => {
                let sdk =
                    path.canonicalize().with_context(|| format!("--sdk {}: no such directory", path.display()))?;
                let manifest = std::fs::read_to_string(sdk.join("Cargo.toml")).unwrap_or_default();
                anyhow::ensure!(
                    manifest.lines().any(|l| l.trim().replace(' ', "") == "name=\"plugbus-sdk\""),
                    "--sdk {}: not the plugbus-sdk crate (no Cargo.toml naming plugbus-sdk there)",
                    sdk.display()
                );
                Ok(format!("{{ path = {} }}", toml_string(&sdk.display().to_string())))
            }
        }
    }
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Writes the crate `name` into `parent/name`; fails if that exists or the name is unusable.
pub fn new_handler(name: &str, parent: &Path, sdk: &Sdk) -> anyhow::Result<PathBuf> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    anyhow::ensure!(
        valid,
        "handler name {name:?}: use 1-64 characters of a-z, 0-9, '-' or '_', starting with a letter"
    );
    let dependency = sdk.dependency()?;
    let dir = parent.join(name);
    anyhow::ensure!(!dir.exists(), "{} already exists", dir.display());
    let lib = name.replace('-', "_");
    let fill = |t: &str| t.replace("{{name}}", name).replace("{{lib}}", &lib).replace("{{sdk}}", &dependency);
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("creating {}", dir.display()))?;
    for (file, text) in
        [("Cargo.toml", CARGO_TOML), ("src/lib.rs", LIB_RS), ("README.md", README), (".gitignore", GITIGNORE)]
    {
        std::fs::write(dir.join(file), fill(text)).with_context(|| format!("writing {file}"))?;
    }
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_registry_series_of_this_binary() {
        let Sdk::Registry(req) = Sdk::from_flag(None) else { panic!("not the registry") };
        let version = env!("CARGO_PKG_VERSION");
        assert!(version.starts_with(&format!("{req}.")), "{req} is not the series of {version}");
        let dir = std::env::temp_dir().join(format!("plugbus-scaffold-{}", std::process::id()));
        let krate = new_handler("reg-test", &dir, &Sdk::registry()).unwrap();
        let toml = std::fs::read_to_string(krate.join("Cargo.toml")).unwrap();
        assert!(toml.contains(&format!("plugbus-sdk = \"{req}\"")), "{toml}");
        assert!(!toml.contains("path"), "{toml}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The README copies the build under the plugin's name, the package's, as `plugbus dev`
    /// deploys it: copied as `<lib>.wasm` (`order_audit.wasm`) it was a second plugin beside
    /// dev's `order-audit.wasm`, and every event was handled twice (review 61f F6).
    #[test]
    fn the_readme_deploys_the_build_under_the_name_plugbus_dev_gives_it() {
        let dir = std::env::temp_dir().join(format!("plugbus-scaffold-readme-{}", std::process::id()));
        let krate = new_handler("order-audit", &dir, &Sdk::registry()).unwrap();
        let readme = std::fs::read_to_string(krate.join("README.md")).unwrap();
        assert!(
            readme.contains("cp target/wasm32-wasip2/release/order_audit.wasm /path/to/plugins/order-audit.wasm"),
            "{readme}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_must_be_the_sdk_crate_and_is_quoted() {
        let here = Path::new(env!("CARGO_MANIFEST_DIR"));
        let e = Sdk::Path(here.to_path_buf()).dependency().unwrap_err().to_string();
        assert!(e.contains("not the plugbus-sdk crate"), "{e}");
        let dep = Sdk::Path(here.join("../sdk")).dependency().unwrap();
        assert!(dep.starts_with("{ path = \"/") && dep.ends_with("sdk\" }"), "{dep}");
        assert_eq!(toml_string(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
