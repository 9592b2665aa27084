//! The compile cache: compiled components on disk, keyed by the SHA-256 of the wasm bytes and
//! a fingerprint of the engine's settings, so a restart with many plugins skips compilation.
//!
//! Entries are only read back into the engine they fit (wasmtime checks the fingerprint and
//! version on deserialize); a corrupt or stale entry is recompiled and overwritten. The cache
//! directory belongs to the host: whoever can write it can run native code in the host.

use std::hash::{DefaultHasher, Hash, Hasher};
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
}

/// A directory of serialized components.
pub struct CompileCache {
    dir: PathBuf,
    engine_key: String,
}

impl CompileCache {
    /// A cache in `dir` for `engine` (created if missing).
    pub fn new(dir: &Path, engine: &Engine) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut h = DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut h);
        Ok(Self { dir: dir.to_path_buf(), engine_key: format!("{:016x}", h.finish()) })
    }

    fn path(&self, wasm_hash: &str) -> PathBuf {
        self.dir.join(format!("{wasm_hash}-{}.cwasm", self.engine_key))
    }

    /// Compiles `bytes` or reads the cached result.
    pub fn compile(
        &self,
        engine: &Engine,
        bytes: &[u8],
        wasm_hash: &str,
        stats: &CacheStats,
    ) -> wasmtime::Result<Component> {
        let path = self.path(wasm_hash);
        if path.exists() {
            // SAFETY: the file was written by `Component::serialize` of this host into its own
            // cache directory; wasmtime checks version and settings compatibility on load.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(c) => {
                    stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(c);
                }
                Err(e) => tracing::warn!(file = %path.display(), "compile cache entry unusable, recompiling: {e}"),
            }
        }
        let component = Component::new(engine, bytes)?;
        stats.compiled.fetch_add(1, Ordering::Relaxed);
        match component.serialize() {
            Ok(serialized) => {
                let tmp = path.with_extension(format!("tmp{}", std::process::id()));
                let written = std::fs::write(&tmp, serialized).and_then(|_| std::fs::rename(&tmp, &path));
                if let Err(e) = written {
                    tracing::warn!(file = %path.display(), "could not write the compile cache: {e}");
                    let _ = std::fs::remove_file(&tmp);
                }
            }
            Err(e) => tracing::warn!("could not serialize a component for the cache: {e}"),
        }
        Ok(component)
    }
}
