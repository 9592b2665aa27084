//! The compile cache: compiled components on disk, keyed by the SHA-256 of the wasm bytes and
//! a fingerprint of the engine's settings, so a restart with many plugins skips compilation.
//!
//! A compiled component is native code: loading one from disk runs whatever it holds. So every
//! entry is verified before it is loaded: `<entry>.cwasm.tag` holds the entry's length with an
//! HMAC-SHA256 of it, and an HMAC-SHA256 of the entry (its name and bytes), under a random
//! 32-byte key in `data_dir/cache.key` (created `0600`;
//! one that is not a regular file of this user, or is readable or writable by anyone else, is
//! replaced, which recompiles everything). The length is checked first, so an entry of another
//! length is never read (review 56a L1: a 1 GiB file planted under a plugin's entry name was
//! read whole and hashed at every start); then the entry is read into memory, its tag checked in
//! constant time, and only those bytes are deserialized: a missing or wrong tag means the entry
//! is recompiled and overwritten (logged), never loaded.
//!
//! Trust boundary: `data_dir` is the host's own. The key protects against whoever can write the
//! cache directory but cannot read the key (another user or service given the directory, a
//! backup restore, a shared volume): they cannot make an entry the host will run. Whoever can
//! read the key, or runs as the host's user, can run code in the host anyway.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Counters of the cache (asserted on by tests, shown in metrics).
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Components compiled from wasm.
    pub compiled: AtomicU64,
    /// Components read back from the cache.
    pub hits: AtomicU64,
    /// Cache entries refused because their tag was missing or wrong (then recompiled).
    pub rejected: AtomicU64,
}

/// The key's length in bytes.
const KEY_LEN: usize = 32;
/// The largest cache entry read back (a compiled component of a 64 MiB wasm is far smaller).
const MAX_ENTRY_BYTES: u64 = 1 << 30;

/// The most bytes of entries the cache keeps: past it, the entries used longest ago go first
/// (a plugin rebuilt a thousand times in a `plugbus dev` loop, or a folder fed a new variant of
/// a file over and over, would otherwise fill the disk the event log writes to).
const MAX_CACHE_BYTES: u64 = 2 << 30;

/// How old a temporary file beside an entry must be before it is removed as left by a crash
/// (another host sharing the folder may be writing a younger one).
const STALE_TEMPORARY: std::time::Duration = std::time::Duration::from_secs(3600);

/// What a small file takes of the disk at least (a kept refusal is a few hundred bytes).
const BLOCK_BYTES: u64 = 4096;

/// The largest kept refusal read back.
const MAX_REFUSAL_BYTES: u64 = 64 << 10;

/// A kept refusal: the caps it was refused under, and why.
#[derive(serde::Serialize, serde::Deserialize)]
struct RefusalMemo {
    caps: String,
    reason: String,
}

/// A directory of serialized components, each with its tag.
pub struct CompileCache {
    dir: PathBuf,
    engine_key: String,
    key: [u8; KEY_LEN],
    max_bytes: u64,
    /// The largest entry read back, and so kept ([`MAX_ENTRY_BYTES`]).
    max_entry_bytes: u64,
}

impl CompileCache {
    /// A cache in `dir` for `engine` (created if missing), with its key in `<dir>.key` (created
    /// if missing, replaced if unsafe).
    pub fn new(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        crate::private_files::create_folder(dir)?;
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        // The tag's form: entries of another form are named apart, so hosts of two versions
        // sharing the folder do not recompile each other's entries (and call them forged).
        TAG_FORM.hash(&mut h);
        let key = load_or_make_key(&key_path(dir))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            engine_key: format!("{:016x}", h.finish()),
            key,
            max_bytes: MAX_CACHE_BYTES,
            max_entry_bytes: MAX_ENTRY_BYTES,
        })
    }

    fn path(&self, wasm_hash: &str) -> PathBuf {
        self.dir.join(format!("{wasm_hash}-{}.cwasm", self.engine_key))
    }

    fn mac(&self, name: &str, bytes: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(b"plugbus compile cache v1\0");
        mac.update(name.as_bytes());
        mac.update(b"\0");
        mac.update(bytes);
        mac
    }

    /// The MAC of an entry's length, which its tag begins with ([`TAG_BYTES`]).
    fn length_mac(&self, name: &str, len: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(b"plugbus compile cache length v1\0");
        mac.update(name.as_bytes());
        mac.update(b"\0");
        mac.update(&len.to_le_bytes());
        mac
    }

    /// An entry's tag: its length, the length's MAC, the entry's MAC ([`TAG_BYTES`]).
    fn tag(&self, name: &str, bytes: &[u8]) -> Vec<u8> {
        let len = bytes.len() as u64;
        let mut tag = len.to_le_bytes().to_vec();
        tag.extend_from_slice(&self.length_mac(name, len).finalize().into_bytes());
        tag.extend_from_slice(&self.mac(name, bytes).finalize().into_bytes());
        tag
    }

    /// The cached component for `wasm_hash`, if its entry is there and its tag is right.
    fn read_verified(&self, engine: &Engine, wasm_hash: &str, stats: &CacheStats) -> Option<Component> {
        let path = self.path(wasm_hash);
        let name = path.file_name()?.to_string_lossy().into_owned();
        let refused = |why: &str| {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(file = %path.display(), "compile cache entry failed verification ({why}): not loaded, recompiling");
        };
        // The length the tag vouches for, before the entry is read: no more is read.
        let tag = match read_regular(&tag_path(&path), TAG_BYTES as u64) {
            Ok(tag) => tag,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !path.exists() => return None,
            Err(_) => Vec::new(),
        };
        let Some((len, length_mac, mac)) = split_tag(&tag) else {
            // (A 32-byte tag is an older version's, of an entry read whole to check it.)
            refused("no tag, a tag of an older version, or not made by this host");
            return None;
        };
        if len > self.max_entry_bytes || self.length_mac(&name, len).verify_slice(length_mac).is_err() {
            refused("its tag's length is not this host's");
            return None;
        }
        let bytes = match read_regular(&path, len) {
            Ok(b) if b.len() as u64 == len => b,
            Ok(_) => {
                refused("shorter than its tag says");
                return None;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                refused(&format!("unreadable, or longer than its tag says: {e}"));
                return None;
            }
        };
        if self.mac(&name, &bytes).verify_slice(mac).is_err() {
            stats.rejected.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                file = %path.display(),
                "compile cache entry failed verification (no tag, or not made by this host): not loaded, recompiling"
            );
            return None;
        }
        // SAFETY: these exact bytes carry a valid HMAC under this host's own key, so they are
        // what `Component::serialize` of this host wrote (an attacker cannot forge the tag
        // without the key); the bytes are in memory, so nothing can change them after the check.
        // wasmtime still checks version and settings compatibility.
        match unsafe { Component::deserialize(engine, &bytes) } {
            Ok(c) => {
                // Used now: the last to go when the cache is over its size.
                let _ = std::fs::File::options()
                    .write(true)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
                    .open(&path)
                    .and_then(|f| f.set_modified(std::time::SystemTime::now()));
                Some(c)
            }
            Err(e) => {
                tracing::warn!(file = %path.display(), "compile cache entry unusable, recompiling: {e}");
                None
            }
        }
    }

    /// The cached compiled component for `wasm_hash`, if its entry is there and verifies
    /// (counted as a hit).
    pub fn cached(&self, engine: &Engine, wasm_hash: &str, stats: &CacheStats) -> Option<Component> {
        let component = self.read_verified(engine, wasm_hash, stats)?;
        stats.hits.fetch_add(1, Ordering::Relaxed);
        Some(component)
    }

    /// Keeps `serialized` (what `Component::serialize` on an engine of this host's settings, in
    /// this process or the compiling child, made of the wasm with `wasm_hash`) for the next load. Best effort: a
    /// failure is logged, and the next load compiles again.
    pub fn keep(&self, wasm_hash: &str, serialized: &[u8]) {
        if let Err(e) = self.write_entry(wasm_hash, serialized) {
            tracing::warn!(file = %self.path(wasm_hash).display(), "could not write the compile cache: {e}");
        }
    }

    /// The refusal kept for `wasm_hash` under `caps` ([`CompileCache::remember_refusal`]), if
    /// there is one and its tag is right: a forged or damaged one is ignored (the file is
    /// compiled again), so whoever can write the folder cannot have a plugin refused.
    pub fn refusal(&self, wasm_hash: &str, caps: &str) -> Option<(String, PathBuf)> {
        let path = self.refusal_path(wasm_hash);
        let name = path.file_name()?.to_string_lossy().into_owned();
        let kept = read_regular(&path, MAX_REFUSAL_BYTES).ok()?;
        let (tag, memo) = kept.split_at_checked(32)?;
        if self.mac(&name, memo).verify_slice(tag).is_err() {
            tracing::warn!(file = %path.display(), "a kept compile refusal failed verification: ignored");
            return None;
        }
        let memo: RefusalMemo = serde_json::from_slice(memo).ok()?;
        (memo.caps == caps).then_some((memo.reason, path))
    }

    /// Keeps `reason` as the refusal of the wasm with `wasm_hash` under `caps` (a compile that
    /// passed the memory or CPU-time cap: trying again under the same caps costs the same and
    /// ends the same),
    /// so a restart, or a touch of the file, does not pay for it again. Best effort.
    pub fn remember_refusal(&self, wasm_hash: &str, caps: &str, reason: &str) {
        let path = self.refusal_path(wasm_hash);
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let Ok(memo) = serde_json::to_vec(&RefusalMemo { caps: caps.to_string(), reason: reason.to_string() }) else {
            return;
        };
        let mut kept = self.mac(&name, &memo).finalize().into_bytes().to_vec();
        kept.extend_from_slice(&memo);
        if let Err(e) = write_atomically(&path, &kept) {
            return tracing::warn!(file = %path.display(), "could not keep a compile refusal: {e}");
        }
        // Counted with the entries: a folder fed a new hostile variant of a file over and over
        // would otherwise leave a refusal of each for good.
        self.tidy(&path);
    }

    fn refusal_path(&self, wasm_hash: &str) -> PathBuf {
        self.dir.join(format!("{wasm_hash}-{}.refused", self.engine_key))
    }

    /// Forgets a kept refusal of `wasm_hash` (it compiled, under other caps). Best effort.
    pub fn forget_refusal(&self, wasm_hash: &str) {
        let _ = std::fs::remove_file(self.refusal_path(wasm_hash));
    }

    /// Writes the entry, then its tag (each by rename: a crash in between leaves an entry whose
    /// tag does not match, which is recompiled).
    fn write_entry(&self, wasm_hash: &str, serialized: &[u8]) -> std::io::Result<()> {
        let path = self.path(wasm_hash);
        // One it would never read back (compiled under a `sandbox.compile_memory_mib` above it)
        // is not kept: it would take its size of the cache for nothing.
        if serialized.len() as u64 > self.max_entry_bytes {
            tracing::info!(file = %path.display(), bytes = serialized.len(), max_bytes = self.max_entry_bytes,
                "a compiled component over the compile cache's bound on an entry: not kept (compiled at each load)");
            return Ok(());
        }
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tag = self.tag(&name, serialized);
        write_atomically(&path, serialized)?;
        write_atomically(&tag_path(&path), &tag)?;
        self.tidy(&path);
        Ok(())
    }

    /// Keeps the cache within [`MAX_CACHE_BYTES`]: entries (with their tags) and kept refusals
    /// (each counted as at least a file-system block: [`BLOCK_BYTES`]) go, used longest ago
    /// first, never `keep` (the one just written); temporary files older than
    /// [`STALE_TEMPORARY`] (a crash mid-write left them) go too. Best effort: what cannot be
    /// listed or removed is left, logged.
    fn tidy(&self, keep: &Path) {
        let listed = match std::fs::read_dir(&self.dir) {
            Ok(listed) => listed,
            Err(e) => return tracing::warn!(dir = %self.dir.display(), "cannot list the compile cache to trim it: {e}"),
        };
        let now = std::time::SystemTime::now();
        let (mut entries, mut total) = (Vec::new(), 0u64);
        for entry in listed.flatten() {
            let (path, Ok(meta)) = (entry.path(), entry.metadata()) else { continue };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or_default();
            if name.contains(".cwasm.tmp") || name.contains(".tag.tmp") || name.contains(".refused.tmp") {
                if age > STALE_TEMPORARY {
                    let _ = std::fs::remove_file(&path);
                }
            } else if meta.is_file() && (name.ends_with(".cwasm") || name.ends_with(".refused")) {
                let refusal = name.ends_with(".refused");
                let len = if refusal { meta.len().max(BLOCK_BYTES) } else { meta.len() };
                total += len;
                entries.push((meta.modified().unwrap_or(std::time::UNIX_EPOCH), len, path));
            }
        }
        if total <= self.max_bytes {
            return;
        }
        entries.sort();
        let (mut removed, mut freed) = (0, 0);
        for (_, len, path) in entries {
            if total <= self.max_bytes {
                break;
            }
            if path == keep {
                continue;
            }
            // The tag first: an entry without its tag is recompiled, never loaded. (A refusal
            // carries its own.)
            if path.extension().is_some_and(|e| e == "cwasm") {
                let _ = std::fs::remove_file(tag_path(&path));
            }
            if std::fs::remove_file(&path).is_ok() {
                total -= len;
                (removed, freed) = (removed + 1, freed + len);
            }
        }
        tracing::info!(dir = %self.dir.display(), removed, bytes = freed, max_bytes = self.max_bytes,
            "the compile cache was over its size: the entries used longest ago were removed");
    }
}

/// Why the cache in `dir` cannot be used as it is, by a tool that must change nothing of it
/// (`plugbus test`, `plugbus inspect`: run as another user, or before the host made it, they
/// made the folder, or replaced the key of a running host's cache): `None` when `dir` is a
/// folder of this user's and its key is there and safe ([`CompileCache::new`] then reads it).
pub fn unusable_as_is(dir: &Path) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    match std::fs::symlink_metadata(dir) {
        Ok(meta) if meta.is_dir() && meta.uid() == me => {}
        Ok(_) => return Some(format!("{} is not a folder of this user's", dir.display())),
        Err(e) => return Some(format!("{}: {e}", dir.display())),
    }
    let key = key_path(dir);
    match std::fs::symlink_metadata(&key) {
        Ok(meta) => unsafe_key(&meta).map(|why| format!("its key {} is {why}", key.display())),
        Err(e) => Some(format!("its key {}: {e}", key.display())),
    }
}

fn key_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "cache".into());
    name.push(".key");
    dir.with_file_name(name)
}

/// The form of this version's tags ([`TAG_BYTES`]), part of every entry's name.
const TAG_FORM: &str = "length and MAC, then MAC";

/// The length of an entry's tag: the entry's length (8 bytes, little-endian), its MAC, and the
/// entry's MAC (32 bytes each).
const TAG_BYTES: usize = 8 + 32 + 32;

/// A tag's parts: the length it vouches for, that length's MAC, the entry's MAC.
fn split_tag(tag: &[u8]) -> Option<(u64, &[u8], &[u8])> {
    if tag.len() != TAG_BYTES {
        return None;
    }
    let (len, macs) = tag.split_at(8);
    let (length_mac, mac) = macs.split_at(32);
    Some((u64::from_le_bytes(len.try_into().ok()?), length_mac, mac))
}

fn tag_path(entry: &Path) -> PathBuf {
    let mut name = entry.as_os_str().to_os_string();
    name.push(".tag");
    PathBuf::from(name)
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temporary_beside(path);
    let written = std::fs::write(&tmp, bytes).and_then(|_| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// A name beside `path` that no other write uses: hosts sharing the folder (two containers may
/// both be pid 1, hence the random part), and threads of one host writing the same entry at
/// once, never write into each other's file.
fn temporary_beside(path: &Path) -> PathBuf {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut random = [0u8; 8];
    // Without randomness the pid and the counter still keep this host's writes apart.
    let _ = getrandom::fill(&mut random);
    let mut tmp = path.as_os_str().to_os_string();
    tmp.push(format!(
        ".tmp{}-{}-{:016x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed),
        u64::from_le_bytes(random)
    ));
    PathBuf::from(tmp)
}

/// Reads a regular file (never through a symlink, never a FIFO or device) of at most `cap` bytes.
fn read_regular(path: &Path, cap: u64) -> std::io::Result<Vec<u8>> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(invalid("not a regular file".into()));
    }
    if meta.len() > cap {
        return Err(invalid(format!("{} bytes, over {cap}", meta.len())));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    (&mut file).take(cap + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > cap {
        return Err(invalid(format!("over {cap} bytes")));
    }
    Ok(bytes)
}

/// The key in the file at `path`, checked on the file opened (its owner, mode and length, by
/// `fstat`), not on the path: a path checked and then opened may name another file by then.
/// `Err(why)` when the file opened is not a safe key.
fn read_key(path: &Path) -> std::io::Result<Result<[u8; KEY_LEN], String>> {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    if let Some(why) = unsafe_key(&file.metadata()?) {
        return Ok(Err(why));
    }
    let mut key = [0u8; KEY_LEN];
    file.read_exact(&mut key)?;
    Ok(Ok(key))
}

/// Why a key file is not safe to use, if it is not.
fn unsafe_key(meta: &std::fs::Metadata) -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.file_type().is_file() {
        return Some("not a regular file".into());
    }
    if meta.uid() != me {
        return Some(format!("owned by uid {}, not this host's uid {me}", meta.uid()));
    }
    if meta.mode() & 0o077 != 0 {
        return Some(format!("its mode {:o} lets others read or write it", meta.mode() & 0o777));
    }
    if meta.len() != KEY_LEN as u64 {
        return Some(format!("{} bytes, not {KEY_LEN}", meta.len()));
    }
    None
}

/// Reads the key at `path`, or makes one: a key file that is not a regular file of this user
/// with mode `0600` (or stricter) and 32 bytes is replaced (every entry is then recompiled).
///
/// A new key is written whole under a name of its own and then linked in place, which fails if
/// a key appeared meanwhile; either way the key used is the one then read at `path`: hosts
/// sharing the folder never read a key half written (and replace it as unsafe), and of hosts
/// making or replacing one at once all keep the one that stands. Where the filesystem has no
/// hard links, the key is created in place (a host starting at that moment may read it half
/// written and replace it: its entries are then recompiled, never loaded unchecked).
fn load_or_make_key(path: &Path) -> std::io::Result<[u8; KEY_LEN]> {
    for _ in 0..4 {
        let unsafe_one = match std::fs::symlink_metadata(path) {
            Ok(meta) => match unsafe_key(&meta) {
                None => match read_key(path)? {
                    Ok(key) => return Ok(key),
                    Err(why) => {
                        tracing::warn!(file = %path.display(),
                            "the compile cache key changed while read ({why}): making a new one");
                        true
                    }
                },
                Some(why) => {
                    tracing::warn!(
                        file = %path.display(),
                        "the compile cache key is not safe ({why}): making a new one; every cached component is recompiled"
                    );
                    true
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        // Only a key found unsafe is removed: one found missing may have been made meanwhile.
        if unsafe_one {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        let key = new_key()?;
        let tmp = temporary_beside(path);
        write_key(&tmp, &key)?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            // Read back at the loop's next turn: another host replacing an unsafe key at the
            // same moment may have removed this one and linked its own.
            Ok(()) => {}
            // Another host made one first: read it (the loop's next turn).
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            // No hard links here (vfat, some FUSE and network mounts): made in place.
            Err(_) => match write_key(path, &key) {
                Ok(()) => return Ok(key),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            },
        }
    }
    Err(std::io::Error::other(format!(
        "{}: the compile cache key kept being replaced while this host read it",
        path.display()
    )))
}

fn new_key() -> std::io::Result<[u8; KEY_LEN]> {
    let mut key = [0u8; KEY_LEN];
    getrandom::fill(&mut key).map_err(|e| std::io::Error::other(format!("no randomness for the cache key: {e}")))?;
    Ok(key)
}

/// Writes `key` to a new file at `path`, readable by this user only, and syncs it.
fn write_key(path: &Path, key: &[u8; KEY_LEN]) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    file.write_all(key)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn hmac_sha256_matches_rfc_4231() {
        // RFC 4231 test case 2.
        let mut mac = Hmac::<Sha256>::new_from_slice(b"Jefe").unwrap();
        mac.update(b"what do ya want for nothing?");
        let hex: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
    }

    #[test]
    fn an_unsafe_key_is_replaced_and_a_safe_one_kept() {
        let dir = std::env::temp_dir().join(format!("plugbus-cache-key-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cache.key");
        let first = load_or_make_key(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(load_or_make_key(&path).unwrap(), first, "a safe key is kept");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let second = load_or_make_key(&path).unwrap();
        assert_ne!(second, first, "a key others can read is no key");
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &path).unwrap();
        load_or_make_key(&path).unwrap();
        assert!(std::fs::symlink_metadata(&path).unwrap().is_file(), "a symlinked key is replaced by a file");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The attack on a check by path: someone who may write the key's folder swaps their own
    /// key file (readable by them) in just before the open and the real one back just after
    /// (`renameat2` with `RENAME_EXCHANGE`, over and over). The key used is never theirs: it
    /// is checked on the file opened. (The window is microseconds: a second of this passed
    /// on the check by path too. The first assertion is the deterministic part.)
    #[test]
    fn a_key_swapped_in_between_the_check_and_the_open_is_never_used() {
        use std::sync::atomic::AtomicBool;
        let dir = tempfile::tempdir().unwrap();
        let (path, theirs) = (dir.path().join("cache.key"), dir.path().join("theirs.key"));
        let forged = [7u8; KEY_LEN];
        std::fs::write(&theirs, forged).unwrap();
        std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert_eq!(read_key(&theirs).unwrap().unwrap_err(), "its mode 644 lets others read or write it");
        load_or_make_key(&path).unwrap();
        let c = |p: &Path| std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        let (a, b) = (c(&path), c(&theirs));
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: two valid NUL-terminated paths; the call has no other preconditions.
                    unsafe {
                        libc::renameat2(libc::AT_FDCWD, a.as_ptr(), libc::AT_FDCWD, b.as_ptr(), libc::RENAME_EXCHANGE)
                    };
                }
            });
            let until = std::time::Instant::now() + std::time::Duration::from_secs(1);
            let mut tries = 0;
            while std::time::Instant::now() < until {
                tries += 1;
                // A key made anew (the forged one found unsafe and removed) is fine; theirs never is.
                if let Ok(key) = load_or_make_key(&path) {
                    assert_ne!(key, forged, "the forged key was used (try {tries})");
                }
                if !theirs.exists() {
                    std::fs::write(&theirs, forged).unwrap();
                    std::fs::set_permissions(&theirs, std::fs::Permissions::from_mode(0o644)).unwrap();
                }
            }
            stop.store(true, Ordering::Relaxed);
        });
    }

    /// Hosts sharing one cache folder start at once: every one of them gets the same key (none
    /// reads a key half written and replaces it, none fails because another made it first).
    #[test]
    fn hosts_making_the_key_at_once_all_get_the_same_one() {
        let dir = tempfile::tempdir().unwrap();
        for round in 0..20 {
            let path = dir.path().join(format!("cache{round}.key"));
            let start = std::sync::Barrier::new(8);
            let keys: Vec<_> = std::thread::scope(|s| {
                let threads: Vec<_> = (0..8)
                    .map(|_| {
                        s.spawn(|| {
                            start.wait();
                            load_or_make_key(&path)
                        })
                    })
                    .collect();
                threads.into_iter().map(|t| t.join().unwrap()).collect()
            });
            let keys: Vec<_> = keys.into_iter().map(|k| k.expect("every host gets a key")).collect();
            assert!(keys.iter().all(|k| *k == keys[0]), "round {round}: hosts got different keys");
            assert_eq!(std::fs::read(&path).unwrap(), keys[0], "round {round}: the file holds another key");
        }
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left.len(), 20, "temporary files left beside the keys: {left:?}");
    }

    /// Bytes this process read so far (`/proc/self/io`'s `rchar`).
    fn bytes_read() -> u64 {
        let io = std::fs::read_to_string("/proc/self/io").unwrap();
        io.lines().find_map(|l| l.strip_prefix("rchar: ")).unwrap().trim().parse().unwrap()
    }

    /// Review 56a L1: an entry is read only up to the length its tag vouches for. A file of 1 GiB
    /// put in an entry's place (by whoever can write the cache directory but not read the key)
    /// was read whole and hashed at every load before its tag refused it; now it is refused
    /// unread. A tag not of this version's form (an older version's 32 bytes) is refused too.
    #[test]
    fn an_entry_longer_than_its_tag_says_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let cache = CompileCache::new(&dir.path().join("cache"), &engine).unwrap();
        cache.write_entry("a", &[7u8; 1000]).unwrap();
        assert_eq!(std::fs::read(tag_path(&cache.path("a"))).unwrap().len(), TAG_BYTES);
        std::fs::File::options().write(true).open(cache.path("a")).unwrap().set_len(1 << 30).unwrap();
        let stats = CacheStats::default();
        let before = bytes_read();
        assert!(cache.read_verified(&engine, "a", &stats).is_none());
        let read = bytes_read() - before;
        assert!(read < 256 << 20, "{read} bytes read to refuse it");
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 1);
        // Its tag's length vouched for by another key (or forged): refused before reading too.
        cache.write_entry("b", &[7u8; 1000]).unwrap();
        let mut tag = std::fs::read(tag_path(&cache.path("b"))).unwrap();
        tag[..8].copy_from_slice(&(1u64 << 30).to_le_bytes());
        std::fs::write(tag_path(&cache.path("b")), &tag).unwrap();
        std::fs::File::options().write(true).open(cache.path("b")).unwrap().set_len(1 << 30).unwrap();
        let before = bytes_read();
        assert!(cache.read_verified(&engine, "b", &stats).is_none());
        assert!(bytes_read() - before < 256 << 20, "a forged length was believed");
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 2);
        cache.write_entry("c", &[7u8; 1000]).unwrap();
        std::fs::write(tag_path(&cache.path("c")), [0u8; 32]).unwrap();
        assert!(cache.read_verified(&engine, "c", &stats).is_none());
        assert_eq!(stats.rejected.load(Ordering::Relaxed), 3, "an older version's tag");
    }

    /// The cache keeps within its size: the entries used longest ago go first (with their tags),
    /// never the one just written; temporary files a crash left go once old.
    #[test]
    fn the_cache_keeps_within_its_size_dropping_the_entries_used_longest_ago() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let mut cache = CompileCache::new(&dir.path().join("cache"), &engine).unwrap();
        cache.max_bytes = 3_000;
        let entry = vec![0u8; 1_000];
        let at = |secs: u64| std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000 + secs);
        let age = |path: &Path, secs: u64| {
            std::fs::File::options().write(true).open(path).unwrap().set_modified(at(secs)).unwrap();
        };
        for (hash, used) in [("a", 30), ("b", 10), ("c", 20)] {
            cache.write_entry(hash, &entry).unwrap();
            age(&cache.path(hash), used);
        }
        // a temporary file left by a crash long ago, and one another host is writing now
        let (stale, fresh) = (cache.dir.join("x.cwasm.tmp1-2-3"), cache.dir.join("y.cwasm.tmp4-5-6"));
        std::fs::write(&stale, b"half").unwrap();
        age(&stale, 0);
        std::fs::write(&fresh, b"half").unwrap();
        // 4,000 bytes, over 3,000: `b` (used longest ago) goes with its tag; `a`, `c` and `d` stay
        cache.write_entry("d", &entry).unwrap();
        let mut left: Vec<String> = std::fs::read_dir(&cache.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let (key, cwasm) = (&cache.engine_key, |h: &str| format!("{h}-{}.cwasm", cache.engine_key));
        let mut want = vec![cwasm("a"), cwasm("c"), cwasm("d")];
        want.extend([cwasm("a"), cwasm("c"), cwasm("d")].map(|c| format!("{c}.tag")));
        want.push("y.cwasm.tmp4-5-6".into());
        want.sort();
        assert_eq!(left, want, "engine key {key}");
        // the one just written stays however old its time reads
        cache.max_bytes = 0;
        cache.write_entry("e", &entry).unwrap();
        assert!(cache.path("e").exists() && tag_path(&cache.path("e")).exists());
        assert!(!cache.path("a").exists() && !cache.path("c").exists() && !cache.path("d").exists());
    }

    /// Kept refusals count against the cache's size too (one per hostile variant of a file was
    /// kept for good), and an entry it would never read back is not kept.
    #[test]
    fn kept_refusals_are_trimmed_with_the_entries_and_an_unreadable_entry_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        let mut cache = CompileCache::new(&dir.path().join("cache"), &engine).unwrap();
        cache.max_bytes = 10 * BLOCK_BYTES;
        for i in 0..100 {
            cache.remember_refusal(&format!("h{i}"), "caps", "needs more CPU time than sandbox.compile_timeout");
        }
        let kept = std::fs::read_dir(&cache.dir)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "refused"))
            .count();
        assert!((1..=10).contains(&kept), "{kept} refusals kept");
        assert!(cache.refusal_path("h99").exists(), "the one just kept stays");
        cache.max_entry_bytes = 500;
        cache.write_entry("big", &[0u8; 1_000]).unwrap();
        assert!(!cache.path("big").exists(), "an entry it would never read back was kept");
    }

    /// Threads (or hosts) writing the same entry at once each succeed, and what is left is whole.
    #[test]
    fn the_same_entry_written_at_once_is_written_whole_by_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("entry.cwasm");
        let bytes: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
        let start = std::sync::Barrier::new(8);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    start.wait();
                    for _ in 0..10 {
                        write_atomically(&path, &bytes).expect("each write succeeds");
                    }
                });
            }
        });
        assert!(std::fs::read(&path).unwrap() == bytes, "the entry is torn");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temporary files left beside the entry");
    }
}
