//! Loading the plugins folder: every `*.wasm` file is read, compiled, validated and bound to the
//! identity the operator gave it. A bad file is reported (path and reason) and skipped; it never
//! stops the host.
//!
//! - **Identity.** A plugin is who the operator names it: `payments.wasm` is plugin `payments`,
//!   unless a `[plugins.NAME] file = "payments-v3.wasm"` entry names the file. Its config
//!   values, limits, kv namespace, queue group and dead-letter subject all follow that name. The
//!   manifest's `name` must agree with it (equal, or equal with `-` read as `_`, as cargo names
//!   files), or the file is refused with both names: a `00-evil.wasm` declaring
//!   `name = "payments"` gets nothing of payments'.
//! - **Files.** Only regular files (or symlinks to one) of at most `max_wasm_bytes` are read:
//!   the type is checked before opening (`symlink_metadata`, then the target), the file is opened
//!   non-blocking (a FIFO never hangs the loader) and checked again after opening (`fstat`), and
//!   the read stops at the cap, whatever the size said.
//! - **Contract.** A component built against a contract version this host does not speak is
//!   refused with both versions named; one that declares none is loaded with a warning
//!   ([`crate::contract`]).

use crate::config::Config;
use crate::kv::KvStore;
use crate::sandbox::{LoadError, Plugin, PluginSettings, Sandbox};
use futures::StreamExt;
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// A file that could not be loaded, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    /// The file.
    pub path: PathBuf,
    /// Why: on one line, at most [`REASON_BYTES`] ([`Rejected::new`]).
    pub reason: String,
    /// The host's or the machine's failure, not the file's ([`LoadError::is_transient`]): a
    /// watching host tries it again by itself.
    pub transient: bool,
    /// Refused for room in `sandbox.max_code_mib` (transient too): a watching host tries it
    /// again as soon as a plugin version gives code back.
    pub waits_for_room: bool,
}

/// The most of a refusal's reason kept, logged and served (`/v1/plugins`, `/v1/stats`): the
/// file can make its own reason as long as it likes (a name it declares, an import it makes).
pub const REASON_BYTES: usize = 16 << 10;

impl Rejected {
    /// `path` refused for `reason`, kept on one line (a line break in it would start a log line
    /// of its own, one that can pose as the host's) and cut at [`REASON_BYTES`].
    pub fn new(path: PathBuf, reason: &str) -> Self {
        Self { path, reason: crate::event::one_line_cut(reason, REASON_BYTES), transient: false, waits_for_room: false }
    }

    /// Logs the refusal: `plugin` is the plugin its file serves, whose previous version keeps
    /// serving.
    pub fn log(&self, plugin: Option<&str>) {
        let (file, reason) = (shown(&self.path), &self.reason);
        match plugin {
            Some(name) => tracing::error!(file = %file, plugin = %name,
                "reload rejected, the previous version keeps serving: {reason}"),
            None => tracing::error!(file = %file, "plugin not loaded: {reason}"),
        }
    }
}

/// The files of the plugins folder that could not be loaded, by path: a refusal replaces the
/// file's last one in `O(log n)` (a `Vec` scanned for it under the lock the API shares cost a
/// rescan of a million refused files ~10^12 comparisons). A file refused once
/// [`crate::stats::LISTED_REJECTED`] others are keeps at most [`UNLISTED_REASON_BYTES`] of its
/// reason (it was logged whole; a listing, by path, may show it cut): a million links to a file
/// with a long reason held GiBs.
#[derive(Debug, Default, Clone)]
pub struct RejectedFiles(std::collections::BTreeMap<PathBuf, Rejected>);

/// The most of a refusal's reason kept past the first listed ones ([`RejectedFiles`]).
pub const UNLISTED_REASON_BYTES: usize = 512;

impl RejectedFiles {
    /// Keeps `refused`, in place of its file's last refusal.
    pub fn insert(&mut self, mut refused: Rejected) {
        if self.0.len() >= crate::stats::LISTED_REJECTED && !self.0.contains_key(&refused.path) {
            refused.reason = crate::event::cut_to(&refused.reason, UNLISTED_REASON_BYTES).into_owned();
        }
        self.0.insert(refused.path.clone(), refused);
    }

    /// Forgets `path`'s refusal (loaded since, or gone).
    pub fn remove(&mut self, path: &Path) {
        self.0.remove(path);
    }

    /// How many files are refused.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The refusals, by path.
    pub fn iter(&self) -> impl Iterator<Item = &Rejected> {
        self.0.values()
    }
}

impl FromIterator<Rejected> for RejectedFiles {
    fn from_iter<I: IntoIterator<Item = Rejected>>(refusals: I) -> Self {
        let mut files = Self::default();
        for refused in refusals {
            files.insert(refused);
        }
        files
    }
}

/// A plugins-folder path as logs show it: on one line (a file's name can hold a line break and
/// an escape, and would forge a log line of the host's, or drive the reader's terminal).
pub fn shown(path: &Path) -> String {
    crate::event::one_line(&path.to_string_lossy()).into_owned()
}

/// Why a file in the plugins folder is not loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FileError {
    /// Refused before its content mattered: not a regular file, over `max_wasm_bytes`, or a name
    /// that is no plugin's. Final: waiting does not change it.
    #[error("{0}")]
    Refused(String),
    /// Read, but not a loadable plugin.
    #[error(transparent)]
    Load(#[from] LoadError),
}

/// The identity of the plugin file `path`: the plugin a `[plugins.NAME] file` entry binds it
/// to, else its file name without `.wasm`. Refused: a file name that is not a plugin name, and
/// `<NAME>.wasm` when `[plugins.NAME] file` names another file.
pub fn identity_of(path: &Path, config: &Config) -> Result<String, FileError> {
    let refused = |why: String| Err(FileError::Refused(why));
    let Some(file) = path.file_name().and_then(|f| f.to_str()) else {
        return refused(format!("the file name {:?} is not UTF-8: it cannot name a plugin", path.file_name()));
    };
    if let Some(bound) = config.plugin_bound_to(file) {
        return Ok(bound.to_string());
    }
    let stem = file.strip_suffix(".wasm").unwrap_or(file);
    if !crate::manifest::valid_plugin_name(stem) {
        return refused(format!(
            "the file name {file:?} does not name a plugin: a plugin is named by its file ({stem:?} would need to \
             be 1-64 characters of a-z, A-Z, 0-9, '-' or '_') or by `[plugins.NAME] file = {file:?}` in the config"
        ));
    }
    if let Some(bound) = config.file_of(stem) {
        return refused(format!(
            "plugin {stem:?} is the file {bound:?} (`[plugins.{stem}] file` in the config), not this one"
        ));
    }
    Ok(stem.to_string())
}

/// What kind of thing a non-regular file is, for the refusal.
fn kind_of(t: std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_symlink() {
        "a symlink"
    } else {
        "not a regular file"
    }
}

/// Reads a plugin file: only a regular file (or a symlink to one), at most `cap` bytes.
/// Blocking: call it off the async runtime.
pub fn read_plugin_file(path: &Path, cap: u64) -> Result<Vec<u8>, FileError> {
    use std::os::unix::fs::OpenOptionsExt;
    let too_big = |n: u64| {
        FileError::Refused(format!("the file is {n} bytes, over the {cap}-byte cap (max_wasm_bytes): not read"))
    };
    let link = std::fs::symlink_metadata(path).map_err(unreadable)?;
    if link.file_type().is_symlink() {
        // The operator's folder may hold symlinks to builds elsewhere; never to a device or FIFO.
        let target = std::fs::metadata(path).map_err(unreadable)?;
        if !target.is_file() {
            return Err(FileError::Refused(format!(
                "a symlink to {}, not to a regular file: not read",
                kind_of(target.file_type())
            )));
        }
    } else if !link.is_file() {
        return Err(FileError::Refused(format!("{}, not a regular file: not read", kind_of(link.file_type()))));
    }
    // Non-blocking: were it swapped for a FIFO since the check, opening returns at once (and
    // the check below refuses it) instead of waiting for a writer.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(unreadable)?;
    let opened = file.metadata().map_err(unreadable)?;
    if !opened.is_file() {
        return Err(FileError::Refused(format!("{}, not a regular file: not read", kind_of(opened.file_type()))));
    }
    if opened.len() > cap {
        return Err(too_big(opened.len()));
    }
    let mut bytes = Vec::with_capacity(opened.len() as usize);
    // The size may change while reading (a file still being written): the cap holds anyway.
    (&mut file).take(cap.saturating_add(1)).read_to_end(&mut bytes).map_err(unreadable)?;
    if bytes.len() as u64 > cap {
        return Err(too_big(bytes.len() as u64));
    }
    Ok(bytes)
}

/// Why a plugin file could not be read. The file's own fault (gone, not permitted, a link loop,
/// a bad name) is final until it changes; anything else (out of file descriptors or memory, an
/// I/O error, a network mount gone away) is the host's or the machine's, tried again by itself
/// ([`LoadError::Host`]): it was reported as "not a component" and left refused until the file
/// changed (review 60b M4).
fn unreadable(e: std::io::Error) -> FileError {
    let the_files = matches!(
        e.raw_os_error(),
        Some(
            libc::ENOENT | libc::EACCES | libc::EPERM | libc::ELOOP | libc::ENAMETOOLONG | libc::ENOTDIR | libc::EISDIR
        )
    );
    match the_files {
        true => FileError::Load(LoadError::NotAComponent(format!("cannot read the file: {e}"))),
        false => FileError::Load(LoadError::Host(format!("the file could not be read now: {e}"))),
    }
}

/// Loads one file as the plugin the operator named it (see [`identity_of`]).
pub async fn load_file(
    sandbox: &Sandbox,
    path: &Path,
    config: &Config,
    kv: &Arc<dyn KvStore>,
) -> Result<Plugin, FileError> {
    load_file_as(sandbox, path, config, kv, Grants::Operator).await
}

/// Whose word grants a plugin's outbound destinations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grants {
    /// The operator's (`[plugins.NAME] allowed_outbound`): the host.
    Operator,
    /// Whatever the manifest asks for: a repeatable run (`plugbus test`), whose calls are
    /// answered from stubs and never leave the sandbox.
    Requested,
}

/// [`load_file`], with outbound destinations granted as `grants` says.
pub async fn load_file_as(
    sandbox: &Sandbox,
    path: &Path,
    config: &Config,
    kv: &Arc<dyn KvStore>,
    grants: Grants,
) -> Result<Plugin, FileError> {
    let identity = identity_of(path, config)?;
    let (owned, cap) = (path.to_path_buf(), config.max_wasm_bytes);
    let bytes = tokio::task::spawn_blocking(move || read_plugin_file(&owned, cap))
        .await
        .map_err(|e| FileError::Load(LoadError::NotAComponent(format!("cannot read the file: {e}"))))??;
    let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
    // The nesting bounds first: nothing else reads the file before them (the contract's
    // parser walks nested components too).
    crate::sandbox::check_header(&bytes)?;
    let undeclared = crate::contract::check(&bytes)?.is_none();
    let plugin = sandbox
        .load_bound(&bytes, |m| {
            m.bind(&identity, config.queue_group_for(&identity))
                .map_err(|e| LoadError::Manifest(format!("the file {file} is plugin {identity:?}: {e}")))?;
            // Everything the operator gives a plugin goes by the identity, never by the claim.
            Ok(PluginSettings {
                limits: config.limits_for(&identity),
                config: config.values_for(&identity),
                kv: kv.clone(),
                allowed_outbound: match grants {
                    Grants::Operator => config.outbound_for(&identity),
                    Grants::Requested => m.outbound.clone(),
                },
            })
        })
        .await?;
    // Said only of a component that loads: a file that is not one gets one error, not two lines.
    if undeclared {
        tracing::warn!(
            file = %shown(path),
            plugin = %identity,
            "the component declares no plugbus contract version (built with an older plugbus-sdk, or without it): \
             loading it anyway; rebuild it to have its contract checked"
        );
    }
    debug_assert_eq!(plugin.name(), identity);
    Ok(plugin)
}

/// The sandbox a tool loads a plugin in (`plugbus test`, `plugbus inspect`): the host's limits
/// (as [`crate::Host`] sets them), a few instances, and the compile cache the host would use
/// (`compile_cache_dir`, or `data_dir/cache`) when it is on and already made, by this user, with
/// its key (`sandbox::cache::unusable_as_is`): a tool run again on a component it or the host
/// compiled before skips compiling it (seconds each). A tool makes no folder and no key, and
/// replaces none (run as another user, or before the host, it made the folder, or replaced a
/// running host's key); it goes on without a cache it cannot use (logged at debug).
pub fn tool_sandbox(config: &Config) -> anyhow::Result<Sandbox> {
    let mut settings = crate::sandbox::SandboxSettings { max_instances: 4, ..config.sandbox.clone() };
    settings.max_memory_mib = settings.max_memory_mib.max(config.max_memory_mib());
    let sandbox = Sandbox::new(settings.clone())?;
    if !config.compile_cache {
        return Ok(sandbox);
    }
    let dir = config.compile_cache_dir.clone().unwrap_or_else(|| config.data_dir.join("cache"));
    if let Some(why) = crate::sandbox::cache::unusable_as_is(&dir) {
        tracing::debug!("compiling without the compile cache: {why}");
        return Ok(sandbox);
    }
    match sandbox.with_cache(&dir) {
        Ok(cached) => Ok(cached),
        Err(e) => {
            tracing::warn!("compiling without a cache: {e:#}");
            Sandbox::new(settings)
        }
    }
}

/// The `*.wasm` entries of `dir`, sorted by name: every kind of file, so that one the loader
/// refuses (a FIFO, a symlink to a device) is reported rather than silently skipped.
pub fn wasm_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "wasm"))
        .collect();
    files.sort();
    Ok(files)
}

/// Told how far loading the plugins folder has come, to draw progress (`plugbus run` on a
/// terminal): `(files done, files in all, the file done last)` as files finish, and
/// `(all, all, None)` at the end.
pub type OnLoad<'a> = &'a (dyn Fn(usize, usize, Option<&Path>) + Send + Sync);

/// The most files the loader reads, compiles and checks at once, at start or on reload.
pub const LOADS_AT_ONCE: usize = 4;

/// How many files load at once: as many as the machine has cores, at most [`LOADS_AT_ONCE`],
/// and, when each compiles in a child under `sandbox.compile_memory_mib`, no more than that cap
/// fits in the memory available now (so files compiling side by side cannot take together what
/// each alone may not: a 2 GiB machine under the default 2 GiB cap compiles one at a time).
pub fn loads_at_once(settings: &crate::sandbox::SandboxSettings) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cap_mib = settings.compiler.as_ref().map(|_| settings.compile_memory_mib);
    at_once(cores, cap_mib, available_mib())
}

/// [`loads_at_once`] of `cores`, a compile memory cap (when compiles are capped) and the MiB
/// available (when known).
fn at_once(cores: usize, cap_mib: Option<u64>, available_mib: Option<u64>) -> usize {
    let by_memory = match (cap_mib, available_mib) {
        (Some(cap), Some(available)) => usize::try_from(available / cap.max(1)).unwrap_or(usize::MAX),
        _ => usize::MAX,
    };
    cores.min(LOADS_AT_ONCE).min(by_memory).max(1)
}

/// The memory this process may still take, in MiB: the machine's `MemAvailable`, and under a
/// cgroup (v2) limit what is left of it, whichever is less; `None` when neither can be read.
fn available_mib() -> Option<u64> {
    let read = |path: &str| std::fs::read_to_string(path).ok();
    let machine = read("/proc/meminfo").and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?.to_string();
        line["MemAvailable:".len()..].trim().trim_end_matches("kB").trim().parse::<u64>().ok().map(|kib| kib / 1024)
    });
    let cgroup = read("/sys/fs/cgroup/memory.max").and_then(|max| max.trim().parse::<u64>().ok()).map(|max| {
        let used = read("/sys/fs/cgroup/memory.current").and_then(|c| c.trim().parse::<u64>().ok()).unwrap_or(0);
        max.saturating_sub(used) >> 20
    });
    match (machine, cgroup) {
        (Some(m), Some(c)) => Some(m.min(c)),
        (m, c) => m.or(c),
    }
}

/// Loads every plugin in `config.plugins_dir`; returns the loaded ones and the rejected files.
/// Each file is the plugin its name (or the config) makes it, so no file can take another's
/// name; a manifest that claims another name is refused.
pub async fn load_dir(
    sandbox: &Sandbox,
    config: &Config,
    kv: &Arc<dyn KvStore>,
) -> anyhow::Result<(Vec<(PathBuf, Plugin)>, Vec<Rejected>)> {
    load_dir_reporting(sandbox, config, kv, &|_, _, _| {}).await
}

/// Like [`load_dir`], telling `on_load` of each file (see [`OnLoad`]).
pub async fn load_dir_reporting(
    sandbox: &Sandbox,
    config: &Config,
    kv: &Arc<dyn KvStore>,
    on_load: OnLoad<'_>,
) -> anyhow::Result<(Vec<(PathBuf, Plugin)>, Vec<Rejected>)> {
    use anyhow::Context;
    let dir = &config.plugins_dir;
    let files = wasm_files(dir).with_context(|| format!("reading the plugins folder {}", dir.display()))?;
    let mut loaded: Vec<(PathBuf, Plugin)> = Vec::new();
    let mut rejected = Vec::new();
    let mut by_name: HashMap<String, PathBuf> = HashMap::new();
    let total = files.len();
    // A few files at once (as many as the machine has cores, at most `LOADS_AT_ONCE`), each
    // compiled in a process of its own: one that takes its whole compile budget (4 × `sandbox.compile_timeout`
    // at most, in wall time) holds one of them, and the others go on past it. The results are then taken in the
    // folder's order, as one at a time would.
    let at_once = loads_at_once(sandbox.settings());
    let mut loads = futures::stream::iter(files.into_iter().enumerate())
        .map(|(i, path)| async move {
            // Cut at once ([`Rejected::new`]): a refusal's text can be as long as its file (a
            // declared version, an import's name), and every file's result waits here until the
            // last is done: a thousand links to one such file held a thousand copies (review
            // 60b H3).
            let result = load_file(sandbox, &path, config, kv).await.map_err(|e| {
                let mut refused = Rejected::new(path.clone(), &e.to_string());
                refused.transient = matches!(&e, FileError::Load(load) if load.is_transient());
                refused.waits_for_room = matches!(&e, FileError::Load(LoadError::NoRoom(_)));
                refused
            });
            (i, path, result)
        })
        .buffer_unordered(at_once);
    let mut results = Vec::with_capacity(total);
    let mut refusals = 0;
    on_load(0, total, None);
    while let Some((i, path, mut result)) = loads.next().await {
        // Past the listed ones, as [`RejectedFiles`] keeps them.
        if let Err(refused) = &mut result {
            refusals += 1;
            if refusals > crate::stats::LISTED_REJECTED {
                refused.reason = crate::event::cut_to(&refused.reason, UNLISTED_REASON_BYTES).into_owned();
            }
        }
        on_load(results.len() + 1, total, Some(&path));
        results.push((i, path, result));
    }
    results.sort_by_key(|(i, ..)| *i);
    for (_, path, result) in results {
        match result {
            Ok(plugin) => {
                // A name is one file, but `my-handler.wasm` and `my_handler.wasm` name one plugin.
                if let Some(first) = by_name.get(&crate::manifest::name_key(plugin.name())) {
                    let reason = format!("is plugin {:?}, already loaded from {}", plugin.name(), shown(first));
                    let refused = Rejected::new(path, &reason);
                    refused.log(None);
                    rejected.push(refused);
                    continue;
                }
                tracing::info!(file = %shown(&path), plugin = plugin.name(), version = %plugin.manifest().version, hash = &plugin.hash()[..12], "plugin loaded");
                by_name.insert(crate::manifest::name_key(plugin.name()), path.clone());
                loaded.push((path, plugin));
            }
            Err(refused) => {
                refused.log(None);
                rejected.push(refused);
            }
        }
    }
    on_load(total, total, None);
    Ok((loaded, rejected))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review 60b M4: the host's own failures to read a file were the file's, never tried again.
    #[test]
    fn a_read_the_host_failed_is_tried_again_and_one_the_file_failed_is_not() {
        let transient = |errno| match unreadable(std::io::Error::from_raw_os_error(errno)) {
            FileError::Load(e) => e.is_transient(),
            FileError::Refused(_) => false,
        };
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOMEM, libc::EIO, libc::ENOTCONN, libc::ESTALE] {
            assert!(transient(errno), "errno {errno} is the host's");
        }
        for errno in [libc::ENOENT, libc::EACCES, libc::ELOOP, libc::ENAMETOOLONG] {
            assert!(!transient(errno), "errno {errno} is the file's");
        }
    }

    /// Review 60b L6: `max_wasm_bytes = u64::MAX` overflowed the read's cap (in release every
    /// file read as empty).
    #[test]
    fn a_cap_of_u64_max_reads_the_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.wasm");
        std::fs::write(&file, [7u8; 100]).unwrap();
        assert_eq!(read_plugin_file(&file, u64::MAX).ok().map(|b| b.len()), Some(100));
    }

    /// Refused files are kept by path (a file refused again replaces its refusal), and past the
    /// listed ones each keeps a short reason (it was logged whole).
    #[test]
    fn refused_files_are_kept_by_path_and_unlisted_reasons_are_short() {
        let long = "x".repeat(10_000);
        let mut files: RejectedFiles = (0..crate::stats::LISTED_REJECTED)
            .map(|i| Rejected::new(PathBuf::from(format!("f{i:05}.wasm")), &long))
            .collect();
        files.insert(Rejected::new(PathBuf::from("f00000.wasm"), "again"));
        assert_eq!(files.len(), crate::stats::LISTED_REJECTED);
        assert_eq!(files.iter().next().unwrap().reason, "again");
        files.insert(Rejected::new(PathBuf::from("z.wasm"), &long));
        let last = files.iter().last().unwrap();
        assert!(last.reason.len() < UNLISTED_REASON_BYTES + 64, "{}", last.reason.len());
        assert!(files.iter().nth(1).unwrap().reason.len() > 9_000, "a listed one keeps its reason");
        files.remove(Path::new("z.wasm"));
        assert_eq!(files.len(), crate::stats::LISTED_REJECTED);
    }

    #[test]
    fn a_refusal_and_a_file_name_are_kept_on_one_line_and_bounded() {
        // A reason the file made: 600 imports of 99,000-byte names, one forging a log line.
        let forged = "a:b/c\n2026-12-05T05:00:00Z  INFO plugbus::loader: plugin loaded plugin=payments\x1b]0;x\x07";
        let reason = format!("imports outside the plugbus contract: {forged}, {}", "n".repeat(59 << 20));
        let refused = Rejected::new(PathBuf::from("plugins/x.wasm"), &reason);
        assert!(refused.reason.len() <= REASON_BYTES + 64, "{} bytes kept", refused.reason.len());
        assert!(!refused.reason.contains(['\n', '\x1b', '\x07']), "{}", &refused.reason[..200]);
        assert!(
            refused.reason.contains("\\n2026-12-05") && refused.reason.contains("[cut at"),
            "{}",
            &refused.reason[..200]
        );
        let name =
            PathBuf::from("plugins/x\n2026-12-05T05:00:00Z ERROR plugbus: plugin payments panicked\x1b[31m.wasm");
        assert!(!shown(&name).contains(['\n', '\x1b']), "{}", shown(&name));
        assert_eq!(shown(Path::new("plugins/audit.wasm")), "plugins/audit.wasm");
    }

    #[test]
    fn files_load_side_by_side_only_as_far_as_cores_and_memory_go() {
        // Cores, at most 4.
        assert_eq!(at_once(2, None, None), 2);
        assert_eq!(at_once(64, None, Some(1)), LOADS_AT_ONCE, "uncapped compiles: memory does not count");
        // Capped compiles: no more than the cap fits in what is available, and at least one.
        assert_eq!(at_once(8, Some(2048), Some(24 * 1024)), 4);
        assert_eq!(at_once(8, Some(2048), Some(5000)), 2);
        assert_eq!(at_once(8, Some(2048), Some(1500)), 1);
        assert_eq!(at_once(8, Some(0), Some(10)), 4, "a cap of 0 divides nothing by zero");
        assert_eq!(at_once(0, Some(128), None), 1);
        // What this machine reads is a figure, not nothing.
        assert!(available_mib().is_some_and(|mib| mib > 0));
    }

    #[test]
    fn a_file_is_the_plugin_its_name_or_the_config_says() {
        let mut config = Config::default();
        assert_eq!(identity_of(Path::new("/p/payments.wasm"), &config).unwrap(), "payments");
        assert_eq!(identity_of(Path::new("/p/00-evil.wasm"), &config).unwrap(), "00-evil");
        let e = identity_of(Path::new("/p/my.plugin.wasm"), &config).unwrap_err().to_string();
        assert!(e.contains("my.plugin.wasm") && e.contains("file ="), "{e}");
        config.plugins.entry("payments".into()).or_default().file = Some("payments-v3.wasm".into());
        assert_eq!(identity_of(Path::new("/p/payments-v3.wasm"), &config).unwrap(), "payments");
        let e = identity_of(Path::new("/p/payments.wasm"), &config).unwrap_err().to_string();
        assert!(e.contains("payments-v3.wasm"), "{e}");
    }

    #[test]
    fn only_regular_files_under_the_cap_are_read() {
        let dir = tempfile_dir();
        let file = dir.join("a.wasm");
        std::fs::write(&file, vec![7u8; 100]).unwrap();
        assert_eq!(read_plugin_file(&file, 100).unwrap().len(), 100);
        let e = read_plugin_file(&file, 99).unwrap_err().to_string();
        assert!(e.contains("100 bytes") && e.contains("max_wasm_bytes"), "{e}");
        let link = dir.join("zero.wasm");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        let e = read_plugin_file(&link, 1 << 20).unwrap_err().to_string();
        assert!(e.contains("symlink to a character device"), "{e}");
        let good_link = dir.join("good.wasm");
        std::os::unix::fs::symlink(&file, &good_link).unwrap();
        assert_eq!(read_plugin_file(&good_link, 100).unwrap().len(), 100);
        let e = read_plugin_file(&dir, 100).unwrap_err().to_string();
        assert!(e.contains("a directory"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("plugbus-loader-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
