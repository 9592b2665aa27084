//! `plugbus dev [CRATE_DIR]`: the handler author's edit loop.
//!
//! Watches a handler crate (`src/`, `Cargo.toml`, `build.rs`), rebuilds it for `wasm32-wasip2`
//! after a save (debounced), copies the component into a host's plugins folder (written beside
//! it, then renamed: the host's reloader never sees half a file) and waits until the host's
//! `GET /v1/plugins` serves the new content hash. One line per rebuild:
//! `built in 2.1 s, live in 140 ms (order-audit 0.1.0, sha256 1a2b3c4d5e6f)`, or the compile
//! error, or the host's refusal (imports, manifest, contract), each in one line. The host's
//! plugins folder is `--plugins DIR`, else the one its `/v1/plugins` names; `plugbus dev --run`
//! runs a host on the embedded bus in the same process instead.
//!
//! It never deploys a build that failed to compile (the host keeps serving the last good one),
//! and never writes anywhere in the plugins folder but `<package>.wasm` and its temporary twin.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What `plugbus dev` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// The handler crate.
    pub krate: PathBuf,
    /// The host's plugins folder; `None`: the one the host's `/v1/plugins` names.
    pub plugins: Option<PathBuf>,
    /// The host's HTTP API.
    pub url: String,
    /// The cargo profile to build with (`release`: the template's small, fast profile).
    pub profile: String,
    /// Quiet time after the last change before building.
    pub debounce: Duration,
    /// How long to wait for the host to serve a copied build.
    pub live_timeout: Duration,
}

/// The crate being watched, as `cargo metadata` describes it.
#[derive(Debug, Clone)]
pub struct Crate {
    /// Its directory.
    pub dir: PathBuf,
    /// The package name: the plugin's name and file name (`<package>.wasm`).
    pub package: String,
    /// The library target's name (the artifact's file name).
    pub lib: String,
    /// Where cargo puts its output (`CARGO_TARGET_DIR` honoured).
    pub target_dir: PathBuf,
}

impl Crate {
    /// Reads the crate at `dir` with `cargo metadata`.
    pub fn read(dir: &Path) -> anyhow::Result<Crate> {
        let manifest = dir.join("Cargo.toml");
        anyhow::ensure!(manifest.is_file(), "{} is not a crate (no Cargo.toml there)", dir.display());
        let out = std::process::Command::new(cargo())
            .args(["metadata", "--no-deps", "--format-version", "1", "--manifest-path"])
            .arg(&manifest)
            .output()
            .context("running cargo metadata")?;
        anyhow::ensure!(out.status.success(), "cargo metadata: {}", first_error(&String::from_utf8_lossy(&out.stderr)));
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).context("reading cargo metadata")?;
        let manifest = manifest.canonicalize()?;
        let package = meta["packages"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["manifest_path"].as_str().map(Path::new) == Some(&manifest)))
            .with_context(|| format!("cargo metadata does not list the package of {}", manifest.display()))?;
        let lib = package["targets"]
            .as_array()
            .and_then(|ts| ts.iter().find(|t| t["kind"].as_array().is_some_and(|k| k.iter().any(|k| k == "cdylib"))))
            .and_then(|t| t["name"].as_str())
            .map(|n| n.replace('-', "_"))
            .with_context(|| {
                format!("{} has no cdylib target: a handler crate has `[lib] crate-type = [\"cdylib\"]`", dir.display())
            })?;
        Ok(Crate {
            dir: dir.to_path_buf(),
            package: package["name"].as_str().unwrap_or_default().to_string(),
            lib,
            target_dir: PathBuf::from(meta["target_directory"].as_str().context("no target_directory")?),
        })
    }

    /// Where a build with `profile` leaves the component.
    pub fn artifact(&self, profile: &str) -> PathBuf {
        let dir = if profile == "dev" || profile == "test" { "debug" } else { profile };
        self.target_dir.join("wasm32-wasip2").join(dir).join(format!("{}.wasm", self.lib))
    }
}

/// One rebuild's outcome: [`std::fmt::Display`] is its one line.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The host serves the new build.
    Live { built: Duration, live: Duration, version: String, hash: String },
    /// The build produced the component the host already has.
    Unchanged { built: Duration },
    /// The crate did not compile; the host keeps the last good build.
    CompileError { line: String },
    /// The host refused the component (imports, manifest, contract); it keeps the last good one.
    Refused { built: Duration, reason: String },
    /// Copied, but no answer from the host about it (no host, or it watches another folder).
    Copied { built: Duration, to: PathBuf, why: String },
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = |d: &Duration| format!("{:.1} s", d.as_secs_f64());
        match self {
            Outcome::Live { built, live, version, hash } => write!(
                f,
                "built in {}, live in {} ms ({version}, sha256 {})",
                secs(built),
                live.as_millis(),
                &hash[..hash.len().min(12)]
            ),
            Outcome::Unchanged { built } => {
                write!(f, "built in {}, unchanged: the host already serves it", secs(built))
            }
            Outcome::CompileError { line } => write!(f, "compile error: {line}"),
            Outcome::Refused { built, reason } => {
                write!(
                    f,
                    "built in {}, refused by the host (the previous version keeps serving): {reason}",
                    secs(built)
                )
            }
            Outcome::Copied { built, to, why } => {
                write!(f, "built in {}, copied to {}, {why}", secs(built), to.display())
            }
        }
    }
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

/// The first error of cargo's `--message-format short` output, in one line, with the count
/// of the rest.
fn first_error(stderr: &str) -> String {
    let errors: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| (l.starts_with("error") || l.contains(": error")) && !l.starts_with("error: could not compile"))
        .collect();
    let Some(first) = errors.first() else {
        return stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("failed, no message").trim().to_string();
    };
    let mut line = crate::event::cut(first).to_string();
    if first.contains("can't find crate for `core`") || first.contains("can't find crate for `std`") {
        line.push_str(" (is the target installed? rustup target add wasm32-wasip2)");
    }
    if errors.len() > 1 {
        line.push_str(&format!(" (+{} more)", errors.len() - 1));
    }
    line
}

/// Builds the crate for `wasm32-wasip2`; the component's bytes, or the compile error's line.
pub async fn build(krate: &Crate, profile: &str) -> Result<Vec<u8>, String> {
    let out = tokio::process::Command::new(cargo())
        .args(["build", "--target", "wasm32-wasip2", "--message-format", "short", "--profile", profile])
        .current_dir(&krate.dir)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    if !out.status.success() {
        return Err(first_error(&String::from_utf8_lossy(&out.stderr)));
    }
    let path = krate.artifact(profile);
    std::fs::read(&path).map_err(|e| format!("cargo built, but {} cannot be read: {e}", path.display()))
}

/// What the host says about one plugin file.
#[derive(Debug, Default)]
struct HostView {
    /// (version, hash) of the plugin serving under the name.
    serving: Option<(String, String)>,
    /// The host's rejection of the file, if any.
    rejected: Option<String>,
    /// `plugbus_load_errors_total` for the file: grows with every refusal.
    load_errors: u64,
}

/// The most of an answer `plugbus dev` reads from whatever answers on the port (every 10 ms
/// while it waits for a deploy): a host's `/v1/plugins` and `/metrics` are far smaller; another
/// server there could stream gigabytes (review 60a L5).
const MOST_ANSWER_BYTES: usize = 16 << 20;

/// A refusal's reason as `plugbus dev` prints it: on one line, whatever the loader's message
/// holds (an error chain may span lines), with no control character (whatever answers on the
/// port chose it: an escape sequence would reach the terminal), at most 16 KiB.
fn shown_reason(reason: &str) -> String {
    crate::event::one_line_cut(&reason.split_whitespace().collect::<Vec<_>>().join(" "), 16 << 10)
}

/// The body of `GET url+path`, at most [`MOST_ANSWER_BYTES`].
async fn get(client: &reqwest::Client, url: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    let url = format!("{}{path}", url.trim_end_matches('/'));
    let mut resp =
        client.get(&url).timeout(Duration::from_secs(5)).send().await.with_context(|| format!("GET {url}"))?;
    anyhow::ensure!(resp.status().is_success(), "GET {url}: {}", resp.status());
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.with_context(|| format!("GET {url}"))? {
        anyhow::ensure!(
            body.len() + chunk.len() <= MOST_ANSWER_BYTES,
            "GET {url}: the answer is over {MOST_ANSWER_BYTES} bytes: is a plugbus host answering there?"
        );
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// [`get`] as JSON.
async fn get_json(client: &reqwest::Client, url: &str, path: &str) -> anyhow::Result<serde_json::Value> {
    let body = get(client, url, path).await?;
    serde_json::from_slice(&body).with_context(|| format!("GET {url}{path}: not JSON"))
}

async fn host_view(client: &reqwest::Client, url: &str, name: &str, file: &str) -> anyhow::Result<HostView> {
    let plugins = get_json(client, url, "/v1/plugins").await?;
    let serving = plugins["plugins"].as_array().and_then(|ps| ps.iter().find(|p| p["name"] == name)).map(|p| {
        (p["version"].as_str().unwrap_or_default().to_string(), p["hash"].as_str().unwrap_or_default().to_string())
    });
    let rejected = plugins["rejected"]
        .as_array()
        .and_then(|rs| {
            rs.iter().find(|r| r["file"].as_str().and_then(|f| Path::new(f).file_name()).is_some_and(|f| f == file))
        })
        .and_then(|r| r["state"].as_str())
        .map(|s| s.strip_prefix("rejected: ").unwrap_or(s).to_string());
    let metrics = String::from_utf8_lossy(&get(client, url, "/metrics").await?).into_owned();
    let label = format!("file=\"{file}\"");
    let load_errors = metrics
        .lines()
        .filter(|l| l.starts_with("plugbus_load_errors_total{") && l.contains(&label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum();
    Ok(HostView { serving, rejected, load_errors })
}

/// The host's plugins folder, as its `/v1/plugins` names it.
pub async fn plugins_dir_of(client: &reqwest::Client, url: &str) -> anyhow::Result<PathBuf> {
    let plugins = get_json(client, url, "/v1/plugins")
        .await
        .with_context(|| format!("no plugbus host answering at {url}: start one, or pass --run or --plugins DIR"))?;
    let dir =
        plugins["plugins_dir"].as_str().context("the host does not name its plugins folder: pass --plugins DIR")?;
    let named = PathBuf::from(dir);
    // Resolved once, and that folder is where every build goes: a link re-pointed later
    // changes nothing.
    let dir = yours(&named).map_err(|why| {
        anyhow::anyhow!(
            "the host at {url} names {} as its plugins folder, but {why}: another user's host may be \
             answering there (whoever takes the port first); pass --plugins DIR to deploy into it anyway",
            crate::event::one_line(&named.display().to_string())
        )
    })?;
    Ok(dir)
}

/// `dir` resolved (links followed, once), when that is a folder of this user's: what a host
/// answering on a port names is deployed into only then (on a shared machine, any user may start
/// a server on the port first and name a folder of theirs, to be sent the build and answer that
/// it went live).
fn yours(dir: &Path) -> Result<PathBuf, String> {
    use std::os::unix::fs::MetadataExt;
    let dir = std::fs::canonicalize(dir).map_err(|e| format!("it cannot be read here ({e})"))?;
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| format!("it cannot be read here ({e})"))?;
    if !meta.is_dir() {
        return Err("it is not a folder".into());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if meta.uid() != me {
        return Err(format!("it belongs to uid {}, not to you (uid {me})", meta.uid()));
    }
    Ok(dir)
}

/// Writes `bytes` to `target` through a new file beside it, then a rename (one event for the
/// reloader, which ignores the temporary file: not `*.wasm`). The temporary name is random and
/// the file made new (`O_EXCL`): whatever someone who can write the folder put at a name is
/// never written through (a symlink to another file) nor opened (a FIFO); what a killed deploy
/// left beside it under its own names goes (`replace_file`).
fn write_beside(target: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let temp = crate::replace_file::temp_beside(target, "plugbus-dev");
    crate::replace_file::replace_with(&temp, target, bytes)
        .with_context(|| format!("writing {} through {}", target.display(), temp.display()))
}

/// Copies `bytes` into `plugins/<name>.wasm` (beside it first, then a rename) and waits until
/// the host serves them or refuses them.
pub async fn deploy(
    client: &reqwest::Client,
    url: &str,
    plugins: &Path,
    name: &str,
    bytes: &[u8],
    built: Duration,
    timeout: Duration,
) -> anyhow::Result<Outcome> {
    let file = format!("{name}.wasm");
    let hash = crate::sandbox::content_hash(bytes);
    let before = host_view(client, url, name, &file).await.ok();
    if before.as_ref().and_then(|b| b.serving.as_ref()).is_some_and(|(_, h)| *h == hash) {
        return Ok(Outcome::Unchanged { built });
    }
    let target = plugins.join(&file);
    write_beside(&target, bytes)?;
    let copied = Instant::now();
    let Some(before) = before else {
        return Ok(Outcome::Copied {
            built,
            to: target,
            why: format!("no host answering at {url} to confirm it live"),
        });
    };
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let now = host_view(client, url, name, &file).await?;
        if let Some((version, served)) = now.serving.filter(|(_, h)| *h == hash) {
            return Ok(Outcome::Live {
                built,
                live: copied.elapsed(),
                version: format!("{name} {version}"),
                hash: served,
            });
        }
        if now.load_errors > before.load_errors
            && let Some(reason) = now.rejected
        {
            return Ok(Outcome::Refused { built, reason: shown_reason(&reason) });
        }
        if copied.elapsed() > timeout {
            return Ok(Outcome::Copied {
                built,
                to: target,
                why: format!("not live after {} s: does the host at {url} watch that folder?", timeout.as_secs()),
            });
        }
    }
}

/// One build-and-deploy round.
pub async fn round(client: &reqwest::Client, opts: &Options, krate: &Crate, plugins: &Path) -> Outcome {
    let started = Instant::now();
    match build(krate, &opts.profile).await {
        Err(line) => Outcome::CompileError { line },
        Ok(bytes) => {
            let built = started.elapsed();
            deploy(client, &opts.url, plugins, &krate.package, &bytes, built, opts.live_timeout)
                .await
                .unwrap_or_else(|e| Outcome::Copied { built, to: plugins.to_path_buf(), why: format!("{e:#}") })
        }
    }
}

/// Whether a changed path should trigger a rebuild: not an editor's swap or backup file.
fn relevant(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
    !(name.starts_with('.') || name.ends_with('~') || name.ends_with(".swp") || name.ends_with(".tmp"))
}

/// Builds once, then once per (debounced) change to the crate's sources, forever; calls `line`
/// with each outcome's line.
pub async fn watch(client: &reqwest::Client, opts: &Options, mut line: impl FnMut(&str)) -> anyhow::Result<()> {
    use notify::{RecursiveMode, Watcher};
    let krate = Crate::read(&opts.krate)?;
    let plugins = match &opts.plugins {
        Some(p) => p.clone(),
        None => plugins_dir_of(client, &opts.url).await?,
    };
    anyhow::ensure!(plugins.is_dir(), "the plugins folder {} does not exist", plugins.display());
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res
            && !matches!(ev.kind, notify::EventKind::Access(_))
            && ev.paths.iter().any(|p| relevant(p))
        {
            let _ = tx.send(());
        }
    })?;
    watcher.watch(&krate.dir.join("src"), RecursiveMode::Recursive).context("watching src/")?;
    watcher.watch(&krate.dir.join("Cargo.toml"), RecursiveMode::NonRecursive).context("watching Cargo.toml")?;
    if krate.dir.join("build.rs").is_file() {
        watcher.watch(&krate.dir.join("build.rs"), RecursiveMode::NonRecursive)?;
    }
    line(&format!(
        "watching {} ({}), deploying to {} for the host at {}",
        krate.dir.display(),
        krate.package,
        plugins.display(),
        opts.url
    ));
    loop {
        let outcome = round(client, opts, &krate, &plugins).await;
        line(&outcome.to_string());
        rx.recv().await.context("the file watcher stopped")?;
        // Debounce: an editor's save is often several events; build once they are quiet.
        while let Ok(Some(())) = tokio::time::timeout(opts.debounce, rx.recv()).await {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review 60a L5: what answers on the port chose what `plugbus dev` read whole and printed
    /// raw, escape sequences included.
    #[test]
    fn a_refusal_is_printed_on_one_line_without_control_characters() {
        let shown = shown_reason("bad\n  thing \u{1b}]52;c;aGk=\u{7}\u{1b}[2J done");
        assert!(!shown.chars().any(char::is_control), "{shown:?}");
        assert!(shown.starts_with("bad thing \\u{1b}]52"), "{shown:?}");
        assert!(shown_reason(&"x".repeat(1 << 20)).len() < 17 << 10);
    }

    #[tokio::test]
    async fn an_answer_past_its_bound_is_not_read_whole() {
        let huge = || async { vec![b' '; MOST_ANSWER_BYTES + 1] };
        let app = axum::Router::new().route("/v1/plugins", axum::routing::get(huge));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let why = get(&reqwest::Client::new(), &url, "/v1/plugins").await.unwrap_err().to_string();
        assert!(why.contains("is a plugbus host answering there"), "{why}");
    }

    #[test]
    fn a_compile_error_is_one_line_with_the_count_of_the_rest() {
        let stderr = "   Compiling x v0.1.0\nsrc/lib.rs:3:5: error[E0425]: cannot find value `y` in this scope\n\
                      src/lib.rs:9:1: error: expected item\nwarning: unused\n\
                      error: could not compile `x` (lib) due to 2 previous errors\n";
        assert_eq!(first_error(stderr), "src/lib.rs:3:5: error[E0425]: cannot find value `y` in this scope (+1 more)");
        assert!(first_error("error[E0463]: can't find crate for `core`\n").contains("rustup target add wasm32-wasip2"));
    }

    /// Someone who can write the plugins folder plants a symlink (or a FIFO) at the name the
    /// build is written to first: the build is never written through it.
    #[tokio::test]
    async fn deploy_never_writes_through_what_is_at_a_temporary_name() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let plugins = dir.path().join("plugins");
        std::fs::create_dir(&plugins).unwrap();
        let victim = dir.path().join("victim");
        std::fs::write(&victim, "keep").unwrap();
        symlink(&victim, plugins.join(".x.wasm.plugbus-dev")).unwrap();
        let client = reqwest::Client::new();
        let bytes = b"\0asm the build";
        let outcome =
            deploy(&client, "http://127.0.0.1:9", &plugins, "x", bytes, Duration::ZERO, Duration::from_secs(1)).await;
        assert!(matches!(outcome.unwrap(), Outcome::Copied { .. }));
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep", "the build was written through a symlink");
        let served = plugins.join("x.wasm");
        assert!(std::fs::symlink_metadata(&served).unwrap().is_file(), "x.wasm is not a file of its own");
        assert_eq!(std::fs::read(&served).unwrap(), bytes);
        // What a killed deploy left beside it an hour ago goes with the next one (its own names
        // only; the link planted above is left alone).
        let left = plugins.join(".x.wasm.0123456789abcdef.plugbus-dev");
        std::fs::write(&left, "left").unwrap();
        let long_ago = std::time::SystemTime::now() - Duration::from_secs(7200);
        std::fs::File::options().write(true).open(&left).unwrap().set_modified(long_ago).unwrap();
        std::fs::write(plugins.join(".y.wasm.0123456789abcdef.plugbus-dev"), "another's").unwrap();
        deploy(&client, "http://127.0.0.1:9", &plugins, "x", bytes, Duration::ZERO, Duration::from_secs(1))
            .await
            .unwrap();
        let mut names: Vec<_> = std::fs::read_dir(&plugins).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        assert_eq!(names, [".x.wasm.plugbus-dev", ".y.wasm.0123456789abcdef.plugbus-dev", "x.wasm"]);
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "keep");
    }

    #[test]
    fn a_folder_named_through_a_link_is_resolved_once_and_checked_there() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        // Deployed into the folder the link named then: re-pointing it later changes nothing.
        assert_eq!(yours(&link).unwrap(), std::fs::canonicalize(&real).unwrap());
        let file = dir.path().join("file");
        std::fs::write(&file, "").unwrap();
        assert_eq!(yours(&file).unwrap_err(), "it is not a folder");
        assert!(yours(&dir.path().join("missing")).unwrap_err().starts_with("it cannot be read here"));
    }

    #[test]
    fn outcomes_are_one_line() {
        let live = Outcome::Live {
            built: Duration::from_millis(2140),
            live: Duration::from_millis(140),
            version: "order-audit 0.1.0".into(),
            hash: "1a2b3c4d5e6f7a8b9c".into(),
        };
        assert_eq!(live.to_string(), "built in 2.1 s, live in 140 ms (order-audit 0.1.0, sha256 1a2b3c4d5e6f)");
        let refused = Outcome::Refused { built: Duration::from_secs(3), reason: "imports outside".into() };
        assert!(!refused.to_string().contains('\n'));
        assert!(relevant(Path::new("src/lib.rs")) && !relevant(Path::new("src/.lib.rs.swp")));
    }
}
