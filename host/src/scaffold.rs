//! `plugbus new NAME`: a handler crate from the template embedded in the binary.

use anyhow::Context;
use std::path::{Path, PathBuf};

const CARGO_TOML: &str = include_str!("templates/Cargo.toml.tmpl");
const LIB_RS: &str = include_str!("templates/lib.rs.tmpl");
const README: &str = include_str!("templates/README.md.tmpl");
const GITIGNORE: &str = include_str!("templates/gitignore.tmpl");

/// Where the SDK this binary was built with lives (used when `--sdk` is not given).
pub fn default_sdk() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("sdk")
}

/// Writes the crate `name` into `parent/name`; fails if that exists or the name is unusable.
pub fn new_handler(name: &str, parent: &Path, sdk: &Path) -> anyhow::Result<PathBuf> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.chars().next().is_some_and(|c| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    anyhow::ensure!(
        valid,
        "handler name {name:?}: use 1-64 characters of a-z, 0-9, '-' or '_', starting with a letter"
    );
    let sdk =
        sdk.canonicalize().with_context(|| format!("the plugbus SDK is not at {} (pass --sdk PATH)", sdk.display()))?;
    anyhow::ensure!(
        sdk.join("Cargo.toml").is_file(),
        "{} is not the plugbus-sdk crate (pass --sdk PATH)",
        sdk.display()
    );
    let dir = parent.join(name);
    anyhow::ensure!(!dir.exists(), "{} already exists", dir.display());
    let lib = name.replace('-', "_");
    let fill =
        |t: &str| t.replace("{{name}}", name).replace("{{lib}}", &lib).replace("{{sdk}}", &sdk.display().to_string());
    std::fs::create_dir_all(dir.join("src")).with_context(|| format!("creating {}", dir.display()))?;
    for (file, text) in
        [("Cargo.toml", CARGO_TOML), ("src/lib.rs", LIB_RS), ("README.md", README), (".gitignore", GITIGNORE)]
    {
        std::fs::write(dir.join(file), fill(text)).with_context(|| format!("writing {file}"))?;
    }
    Ok(dir)
}
