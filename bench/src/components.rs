//! The bench handler component: finding it, renaming copies of it, and starting hosts on a
//! folder of them.

use anyhow::Context;
use plugbus::{Config, Host};
use std::path::{Path, PathBuf};

/// The plugin name compiled into `bench/handler`; copies get `bench-plugin-001`, ... (same length).
pub const PLACEHOLDER: &[u8] = b"bench-plugin-000";

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("bench/ has a parent").to_path_buf()
}

/// `CARGO_TARGET_DIR`, or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target"))
}

/// The bytes of the built bench handler; checks that its name can be rewritten.
pub fn handler_wasm() -> anyhow::Result<Vec<u8>> {
    let path = target_dir().join("wasm32-wasip2/plugin/bench_handler.wasm");
    let bytes = std::fs::read(&path)
        .with_context(|| format!("reading {} (run scripts/build-plugins first)", path.display()))?;
    let found = bytes.windows(PLACEHOLDER.len()).filter(|w| *w == PLACEHOLDER).count();
    anyhow::ensure!(
        found == 1,
        "{} holds the name placeholder {found} times, not once: renamed copies cannot be made",
        path.display()
    );
    Ok(bytes)
}

/// The plugin name of copy `i`.
pub fn plugin_name(i: usize) -> String {
    format!("bench-plugin-{i:03}")
}

/// A copy of the component whose manifest names it `plugin_name(i)` (a same-length byte
/// replacement, so the component stays valid).
pub fn renamed(bytes: &[u8], i: usize) -> Vec<u8> {
    assert!(i < 1000, "three digits");
    let at = bytes.windows(PLACEHOLDER.len()).position(|w| w == PLACEHOLDER).expect("checked by handler_wasm");
    let mut copy = bytes.to_vec();
    copy[at..at + PLACEHOLDER.len()].copy_from_slice(plugin_name(i).as_bytes());
    copy
}

/// A copy of the component whose manifest declares another version (the last digit of the
/// crate version it was built with, changed in place: same length, so the component stays
/// valid): a byte-different build of the same plugin, for hot-reload swaps. The version string
/// is found as the one occurrence not preceded by `@` (those are WIT interface versions).
pub fn rebuilt(bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let version = env!("CARGO_PKG_VERSION").as_bytes();
    let found: Vec<usize> = bytes
        .windows(version.len())
        .enumerate()
        .filter(|(at, w)| *w == version && (*at == 0 || bytes[at - 1] != b'@'))
        .map(|(at, _)| at)
        .collect();
    let [at] = found[..] else {
        anyhow::bail!(
            "the handler holds its version {:?} {} times outside WIT names, not once: cannot make a second build",
            env!("CARGO_PKG_VERSION"),
            found.len()
        );
    };
    let last = at + version.len() - 1;
    let mut copy = bytes.to_vec();
    copy[last] = if copy[last] == b'9' { b'8' } else { copy[last] + 1 };
    Ok(copy)
}

/// A temp plugins folder holding `n` distinct copies.
pub fn plugins_dir(bytes: &[u8], n: usize) -> anyhow::Result<tempfile::TempDir> {
    let dir = tempfile::Builder::new().prefix("plugbus-bench-plugins").tempdir()?;
    for i in 0..n {
        std::fs::write(dir.path().join(format!("{}.wasm", plugin_name(i))), renamed(bytes, i))?;
    }
    Ok(dir)
}

/// The config every bench host uses: no HTTP API, state in `data_dir` (a temp dir, so the
/// compile cache, if the host has one, starts empty).
pub fn config(plugins: &Path, data_dir: &Path) -> Config {
    let mut config = Config {
        plugins_dir: plugins.to_path_buf(),
        data_dir: data_dir.to_path_buf(),
        http: None,
        ..Config::default()
    };
    // The scenarios measure the in-memory embedded bus unless they ask for the durable log
    // (embedded-durable compares the two).
    config.bus.durable = false;
    config
}

/// A host on `n` plugins, with its folders (dropped with it).
pub struct BenchHost {
    /// The host.
    pub host: Host,
    plugins: tempfile::TempDir,
    _data: tempfile::TempDir,
}

impl BenchHost {
    /// Starts a host on `n` copies of the handler; `tweak` may change the config first.
    pub async fn start(bytes: &[u8], n: usize, tweak: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let plugins = plugins_dir(bytes, n)?;
        let data = tempfile::Builder::new().prefix("plugbus-bench-data").tempdir()?;
        let mut config = config(plugins.path(), data.path());
        tweak(&mut config);
        let host = Host::start(config).await?;
        let live = host.router().names().len();
        anyhow::ensure!(live == n, "{live} of {n} plugins loaded; rejected: {:?}", host.rejected());
        Ok(Self { host, plugins, _data: data })
    }

    /// The plugins folder the host loaded (and watches, with `watch`).
    pub fn plugins_dir(&self) -> &Path {
        self.plugins.path()
    }

    /// Sum of one counter over every plugin.
    pub fn counter(&self, name: &str) -> u64 {
        self.host.router().plugins().iter().map(|p| p.counters.get(name).copied().unwrap_or(0)).sum()
    }

    /// Max of one counter over every plugin.
    pub fn counter_max(&self, name: &str) -> u64 {
        self.host.router().plugins().iter().map(|p| p.counters.get(name).copied().unwrap_or(0)).max().unwrap_or(0)
    }

    /// Stops the host, failing if anything was left unhandled.
    pub async fn stop(self) -> anyhow::Result<()> {
        let report = self.host.shutdown().await;
        anyhow::ensure!(report.is_clean(), "host stopped with events unhandled: {report:?}");
        Ok(())
    }
}
