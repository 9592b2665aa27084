//! The wasmtime engine: pooling allocator, epoch ticker, the linker with our imports.

use super::bindings;
use super::cache::{CacheStats, CompileCache};
use super::code_budget::{CodeBudget, CodeCharge, OverBudget};
use super::limits::Limits;
use super::outbound::OutboundPolicy;
use super::plugin::{Plugin, PluginSettings};
use super::pool::{POOL_WAIT_MAX, SharedPool, SlotWait};
use super::state::{HostState, PluginCtx};
use super::validate::{self, LoadError};
use crate::kv::MemoryKv;
use crate::manifest::Manifest;
use crate::subject::PatternSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wasmtime::component::{Component, HasSelf, Linker};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};

/// How often the epoch advances while an attempt runs guest code or is ready to: the
/// granularity of deadlines and of yielding to the runtime. An attempt yields at the first tick
/// [`super::cpu_wait::FRESH_SLICE`] after it got the CPU, so the runtime's workers look at
/// their timers and sockets, and an attempt whose host call has answered gets a CPU again, within
/// a few milliseconds while other plugins' attempts spin on every worker. At 10 ms, a handler
/// waiting in 300 host calls of 1 ms (naps) took 13 ms for each behind 16 spinning attempts of
/// another plugin, past 4 times its deadline of 1 s; at 1 ms, 3.7 ms (review 61a F2).
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// How often it advances while no attempt runs guest code or is ready to (a tick then only
/// starts the next attempt's first slice).
const IDLE_TICK: Duration = Duration::from_millis(10);

/// Engine-wide settings (per-plugin ones are in [`Limits`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SandboxSettings {
    /// How many instances may be live at once across all plugins (pool size).
    pub max_instances: u32,
    /// The largest memory cap any plugin may have (pool slot size), in MiB.
    pub max_memory_mib: u64,
    /// Wasm stack cap, in bytes (engine-wide: wasmtime sets it per engine).
    pub max_stack_bytes: usize,
    /// The memory the child process compiling one component may use (its peak resident set,
    /// read every 20 ms; its compiled code included), in MiB: a file that needs more is
    /// refused (see `compiler`).
    pub compile_memory_mib: u64,
    /// The CPU time compiling one component may use (every compiling thread's together): a
    /// file that needs more is refused, and the refusal kept like the memory cap's. A compile
    /// starved of CPU by a busy machine is stopped after `compiler::WALL_FACTOR` times this of
    /// wall time, and that refusal is not kept.
    #[serde(with = "humantime_serde")]
    pub compile_timeout: Duration,
    /// The compiled code every loaded plugin version may hold in the host's memory together,
    /// in MiB (see `code_budget`): a file whose code alone is more is refused, one that does
    /// not fit beside the others is tried again by itself until it does.
    pub max_code_mib: u64,
    /// The `plugbus` binary that compiles components in a child process under the two caps
    /// above. The CLI sets it to itself; `None` (a library's default) compiles in this process,
    /// uncapped. Not a config key: which program runs is the binary's to say.
    #[serde(skip)]
    pub compiler: Option<std::path::PathBuf>,
}

impl Default for SandboxSettings {
    fn default() -> Self {
        Self {
            max_instances: 256,
            max_memory_mib: 64,
            max_stack_bytes: 512 * 1024,
            compile_memory_mib: 2048,
            compile_timeout: Duration::from_secs(120),
            max_code_mib: 1024,
            compiler: None,
        }
    }
}

/// The least `compile_memory_mib` may be: the compiler's own baseline is about 50 MiB, more
/// with more threads (see `compiler::MAX_THREADS`).
pub const MIN_COMPILE_MEMORY_MIB: u64 = 128;
/// The least `compile_timeout` may be.
pub const MIN_COMPILE_TIMEOUT: Duration = Duration::from_secs(1);

impl SandboxSettings {
    /// Refuses compile caps below what compiling any component needs (a cap under the
    /// compiler's own baseline would refuse every file, blaming each).
    pub fn validate(&self) -> Result<(), String> {
        if self.compile_memory_mib < MIN_COMPILE_MEMORY_MIB {
            return Err(format!(
                "sandbox.compile_memory_mib = {} is below {MIN_COMPILE_MEMORY_MIB}: the compiler alone needs about 50 MiB",
                self.compile_memory_mib
            ));
        }
        crate::config_bounds::mib("sandbox", "max_code_mib", self.max_code_mib, 1)?;
        // Every command that compiles checks it (`plugbus dev` adds to it, and the wall-clock
        // bound is 4 times it).
        crate::config_bounds::duration("sandbox", "compile_timeout", self.compile_timeout, false)?;
        if self.compile_timeout < MIN_COMPILE_TIMEOUT {
            return Err(format!(
                "sandbox.compile_timeout = {} is below {}",
                humantime::format_duration(self.compile_timeout),
                humantime::format_duration(MIN_COMPILE_TIMEOUT)
            ));
        }
        Ok(())
    }
}

/// The engine's code settings: everything but how instances are allocated.
fn engine_config(settings: &SandboxSettings) -> Config {
    let mut config = Config::new();
    config
        .epoch_interruption(true)
        .max_wasm_stack(settings.max_stack_bytes)
        // A trap carries handles to the store's globals, so `plugin` can read the guest's
        // stack pointer and name its own stack overflowing (see `guest_stack`). Handles, not
        // copies: cheap, and only on traps.
        .coredump_on_trap(true);
    // `PLUGBUS_PERF_MAP=1` writes /tmp/perf-<pid>.map so `perf report` names the plugins'
    // compiled functions (profiling a handler; off by default).
    if std::env::var_os("PLUGBUS_PERF_MAP").is_some_and(|v| v == "1") {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    config
}

/// What one instance of a component may take of the shared pool: its core module instances,
/// linear memories and tables. The pool holds `max_instances` times these, so a component may
/// take no more than its share: one of 64 tables at `flow.concurrency` 32 (or two plugins of it
/// at 16) took every table slot, and every other plugin's attempt waited 30 s and failed (review
/// 48a M2). A component built with the SDK uses a few of each.
pub const CORE_INSTANCES_PER_COMPONENT: u32 = 16;
/// See [`CORE_INSTANCES_PER_COMPONENT`].
pub const MEMORIES_PER_COMPONENT: u32 = 2;
/// See [`CORE_INSTANCES_PER_COMPONENT`].
pub const TABLES_PER_COMPONENT: u32 = 8;

/// The engine plugins run on: [`engine_config`] with the instance pool all plugins share. The
/// compiling child builds the same (the pool's limits are checked when a component is made, so
/// a file over them is refused there in the same words), which reserves address space but
/// touches no memory.
pub(super) fn pooled_engine(settings: &SandboxSettings) -> anyhow::Result<Engine> {
    let mut pool = PoolingAllocationConfig::new();
    let n = settings.max_instances.max(1);
    pool.total_component_instances(n)
        .total_core_instances(n.saturating_mul(CORE_INSTANCES_PER_COMPONENT))
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .total_memories(n.saturating_mul(MEMORIES_PER_COMPONENT))
        .max_memories_per_component(MEMORIES_PER_COMPONENT)
        .total_tables(n.saturating_mul(TABLES_PER_COMPONENT))
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .total_stacks(n)
        .max_memory_size((settings.max_memory_mib as usize).saturating_mul(1024 * 1024))
        // Reset a returned slot by rewriting its dirty pages (found with PAGEMAP_SCAN) instead
        // of madvise: no cross-CPU TLB shootdown per event. Measured with plugbus-bench on
        // 2 cores: bare instantiate+call 21.7k/s → 45.8k/s on one task, 16.1k → 91.7k on two.
        // Falls back to madvise on kernels before 6.7.
        .pagemap_scan(wasmtime::Enabled::Auto)
        .linear_memory_keep_resident(4 << 20)
        .table_keep_resident(64 << 10);
    let mut config = engine_config(settings);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&config).map_err(|e| {
        anyhow::anyhow!(
            "cannot set up the sandbox pool for {n} instances of up to {} MiB: {e} \
             (lower sandbox.max_instances or the memory caps)",
            settings.max_memory_mib
        )
    })
}

/// Stops the epoch ticker thread when the last sandbox handle goes.
struct Ticker {
    stop: Arc<AtomicBool>,
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The compiler and runtime for plugins. Cheap to clone.
#[derive(Clone)]
pub struct Sandbox {
    engine: Engine,
    cache: Option<Arc<CompileCache>>,
    cache_stats: Arc<CacheStats>,
    /// The instance pool all plugins share: their idle warm instances, its waits.
    pool: Arc<SharedPool>,
    linker: Arc<Linker<HostState>>,
    /// `linker` plus the `wasi:http` client, for plugins granted outbound HTTP.
    http_linker: Arc<Linker<HostState>>,
    settings: SandboxSettings,
    /// Where plugins' requests (request/reply) go; refused until the host wires the transport.
    requester: Arc<dyn crate::rpc::Requester>,
    /// What every loaded plugin version's compiled code holds, against `max_code_mib`.
    code: Arc<CodeBudget>,
    /// Attempts of every plugin running guest code or ready to (`cpu_wait`).
    runnable: Arc<std::sync::atomic::AtomicU32>,
    /// Each plugin's share of the CPUs (`cpu_share`).
    shares: Arc<super::cpu_share::CpuShares>,
    /// Each live plugin's DNS lookups in flight, by name: its versions share them.
    lookups: Arc<super::live_by_name::LiveByName<super::lookup::Lookups>>,
    _ticker: Arc<Ticker>,
}

impl Sandbox {
    /// Builds the engine; fails with a clear message if the pool cannot be reserved.
    pub fn new(settings: SandboxSettings) -> anyhow::Result<Self> {
        let engine = pooled_engine(&settings)?;

        let mut linker = Linker::<HostState>::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(|e| anyhow::anyhow!("linking WASI: {e}"))?;
        bindings::Plugin::add_to_linker::<HostState, HasSelf<HostState>>(&mut linker, |s| s)
            .map_err(|e| anyhow::anyhow!("linking the plugbus imports: {e}"))?;
        super::naps::credit_late_timers(&mut linker)
            .map_err(|e| anyhow::anyhow!("linking the monotonic clock's timers: {e}"))?;
        let mut http_linker = linker.clone();
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut http_linker)
            .map_err(|e| anyhow::anyhow!("linking wasi:http: {e}"))?;
        super::http_caps::cap_request_strings(&mut http_linker)
            .map_err(|e| anyhow::anyhow!("capping wasi:http's request strings: {e}"))?;

        let stop = Arc::new(AtomicBool::new(false));
        let runnable = Arc::<std::sync::atomic::AtomicU32>::default();
        {
            let engine = engine.clone();
            let (stop, runnable) = (stop.clone(), runnable.clone());
            std::thread::Builder::new().name("plugbus-epoch".into()).spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let busy = runnable.load(Ordering::Relaxed) > 0;
                    std::thread::sleep(if busy { EPOCH_TICK } else { IDLE_TICK });
                    engine.increment_epoch();
                }
            })?;
        }
        Ok(Self {
            engine,
            code: CodeBudget::new(settings.max_code_mib.saturating_mul(1 << 20)),
            runnable,
            shares: super::cpu_share::CpuShares::for_this_runtime(),
            lookups: Arc::default(),
            cache: None,
            cache_stats: Arc::default(),
            pool: Arc::default(),
            linker: Arc::new(linker),
            http_linker: Arc::new(http_linker),
            settings,
            requester: Arc::new(crate::rpc::NoRequests),
            _ticker: Arc::new(Ticker { stop }),
        })
    }

    /// Sends plugins' requests (request/reply) through `requester` (the host's transport).
    pub fn with_requester(mut self, requester: Arc<dyn crate::rpc::Requester>) -> Self {
        self.requester = requester;
        self
    }

    /// Keeps compiled components in `dir` so restarts skip compilation.
    pub fn with_cache(mut self, dir: &std::path::Path) -> anyhow::Result<Self> {
        let cache = CompileCache::new(dir, &self.engine)
            .map_err(|e| anyhow::anyhow!("cannot use {} as the compile cache: {e}", dir.display()))?;
        self.cache = Some(Arc::new(cache));
        Ok(self)
    }

    /// How many components were compiled and how many came from the cache.
    pub fn cache_stats(&self) -> &CacheStats {
        &self.cache_stats
    }

    /// The instance pool all plugins share: idle warm instances given up, attempts that waited.
    pub fn shared_pool(&self) -> &SharedPool {
        &self.pool
    }

    /// Each plugin's share of the CPUs (`cpu_share`).
    pub fn cpu_shares(&self) -> &super::cpu_share::CpuShares {
        &self.shares
    }

    /// The compiled code every loaded plugin version holds (`sandbox.max_code_mib`).
    pub fn code_budget(&self) -> &CodeBudget {
        &self.code
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The engine-wide settings.
    pub fn settings(&self) -> &SandboxSettings {
        &self.settings
    }

    /// Compiles and validates `bytes` (blocking: call it off the async runtime) and reads the
    /// manifest. `settings` gives the limits, config and kv for the plugin once it is named.
    pub async fn load(
        &self,
        bytes: &[u8],
        settings: impl FnOnce(&Manifest) -> PluginSettings,
    ) -> Result<Plugin, LoadError> {
        self.load_bound(bytes, |m| Ok(settings(m))).await
    }

    /// Like [`Sandbox::load`], where `bind` may change the manifest before the plugin is made
    /// (the loader binds it to the identity the operator gave the file, [`Manifest::bind`]) or
    /// refuse it; the plugin's name (kv namespace, logs) is the manifest's name after `bind`.
    pub async fn load_bound(
        &self,
        bytes: &[u8],
        bind: impl FnOnce(&mut Manifest) -> Result<PluginSettings, LoadError>,
    ) -> Result<Plugin, LoadError> {
        validate::check_header(bytes)?;
        let hash = validate::content_hash(bytes);
        let component = self.compile(bytes, &hash).await?;
        let stack = super::guest_stack::GuestStack::of_component(bytes);
        Ok(self.prepare_bound(component, hash, bind).await?.with_guest_stack(stack))
    }

    /// The compiled component for `bytes` (`hash` is their [`content_hash`](super::content_hash),
    /// the cache's key): from the cache, else compiled in a child process under the compile caps
    /// (`settings.compiler`), else in this process; what was compiled is kept in the cache.
    /// Never on the async runtime's workers.
    pub(crate) async fn compile(&self, bytes: &[u8], hash: &str) -> Result<Component, LoadError> {
        async fn off_runtime<T: Send + 'static>(
            f: impl FnOnce() -> Result<T, LoadError> + Send + 'static,
        ) -> Result<T, LoadError> {
            tokio::task::spawn_blocking(f)
                .await
                .map_err(|e| LoadError::Host(format!("the compiler task failed: {e}")))?
        }
        let (engine, cache, stats, key) =
            (self.engine.clone(), self.cache.clone(), self.cache_stats.clone(), hash.to_string());
        if let Some(cache) = cache.clone() {
            let (engine, stats, key) = (engine.clone(), stats.clone(), key.clone());
            if let Some(c) = off_runtime(move || Ok(cache.cached(&engine, &key, &stats))).await? {
                return Ok(c);
            }
        }
        let component = match &self.settings.compiler {
            Some(program) => {
                // A file refused at a cap before, under the same caps: not compiled again (a
                // restart or a touch of the file would pay the whole cap each time).
                let caps = super::compiler::caps_key(&self.settings);
                if let Some(cache) = cache.clone() {
                    let (key, caps) = (key.clone(), caps.clone());
                    if let Some((reason, kept)) = off_runtime(move || Ok(cache.refusal(&key, &caps))).await? {
                        return Err(LoadError::Invalid(format!(
                            "{reason} (kept from an earlier try under the same caps in {}: it is compiled again once \
                             the file, sandbox.compile_memory_mib, sandbox.compile_timeout or the plugins' memory or \
                             stack limits change, or that file is removed)",
                            kept.display()
                        )));
                    }
                }
                let artifact = match super::compiler::compile_in_child(program, &self.settings, bytes).await {
                    Ok(artifact) => artifact,
                    Err(refused) => {
                        if let (true, Some(cache), LoadError::Invalid(reason)) =
                            (refused.repeatable, cache, &refused.error)
                        {
                            let (key, reason) = (key.clone(), reason.clone());
                            off_runtime(move || {
                                cache.remember_refusal(&key, &caps, &reason);
                                Ok(())
                            })
                            .await?;
                        }
                        return Err(refused.error);
                    }
                };
                off_runtime(move || {
                    // SAFETY: `artifact` is what this host's own binary, run as its compiler
                    // child with these settings, wrote on a pipe only this process reads; it is
                    // in memory, so nothing changes it after. wasmtime still checks version and
                    // settings compatibility.
                    let c = unsafe { Component::deserialize(&engine, &artifact) }
                        // (Not tried again by itself: compiled again, it would cost the whole
                        // compile every few minutes.)
                        .map_err(|e| LoadError::Crashed(format!("the compiler child's output does not load: {e:#}")))?;
                    if let Some(cache) = cache {
                        cache.keep(&key, &artifact);
                        cache.forget_refusal(&key);
                    }
                    Ok(c)
                })
                .await?
            }
            None => {
                let bytes = bytes.to_vec();
                off_runtime(move || {
                    let c = Component::new(&engine, &bytes).map_err(|e| LoadError::Invalid(format!("{e:#}")))?;
                    if let Some(cache) = cache {
                        match c.serialize() {
                            Ok(serialized) => cache.keep(&key, &serialized),
                            Err(e) => tracing::warn!("could not serialize a component for the cache: {e}"),
                        }
                    }
                    Ok(c)
                })
                .await?
            }
        };
        stats.compiled.fetch_add(1, Ordering::Relaxed);
        Ok(component)
    }

    /// Validates a compiled component and reads its manifest.
    pub async fn prepare(
        &self,
        component: Component,
        hash: String,
        settings: impl FnOnce(&Manifest) -> PluginSettings,
    ) -> Result<Plugin, LoadError> {
        self.prepare_bound(component, hash, |m| Ok(settings(m))).await
    }

    /// Like [`Sandbox::prepare`], with `bind` as in [`Sandbox::load_bound`].
    pub async fn prepare_bound(
        &self,
        component: Component,
        hash: String,
        bind: impl FnOnce(&mut Manifest) -> Result<PluginSettings, LoadError>,
    ) -> Result<Plugin, LoadError> {
        validate::check_imports(&self.engine, &component)?;
        let http = validate::http_imports(&self.engine, &component);
        let linker = if http.is_empty() { &self.linker } else { &self.http_linker };
        let pre = linker.instantiate_pre(&component).map_err(|e| LoadError::Invalid(format!("cannot link: {e:#}")))?;
        let pre = bindings::PluginPre::new(pre)
            .map_err(|e| LoadError::Invalid(format!("does not export plugbus:handler/handler: {e:#}")))?;
        let mut manifest = self.read_manifest(&pre).await?;
        let settings = bind(&mut manifest)?;
        let publishes = PatternSet::parse(&manifest.publishes).map_err(|e| LoadError::Manifest(e.to_string()))?;
        let outbound = OutboundPolicy::new(&manifest.outbound, &settings.allowed_outbound, &settings.limits)
            .sharing_lookups(self.lookups_of(&manifest.name, settings.limits.max_outbound_concurrency));
        let ungranted = !http.is_empty() && !outbound.any_granted();
        // A component that imports the HTTP client without saying what it would call is hiding something.
        if ungranted && manifest.outbound.is_empty() {
            let why = "its manifest asks for no `outbound` destination";
            return Err(LoadError::ForbiddenImports(http.into_iter().map(|i| format!("{i} ({why})")).collect()));
        }
        // Last of the refusals, so a load refused after it gives nothing back (which would try
        // again every file waiting for room).
        let code = self.charge_code(&component, &manifest.name)?;
        if ungranted {
            // It says what it would call and the operator granted none of it: it loads (its calls
            // may be optional, e.g. a URL from config), and every call is refused by the policy
            // before anything is resolved or sent (`Refused: … is not granted to the plugin`).
            tracing::warn!(
                plugin = %manifest.name,
                "asks for outbound HTTP to {} but [plugins.{}] allowed_outbound grants none of it: it loads, \
                 and every HTTP call it makes is refused",
                manifest.outbound.join(", "),
                manifest.name
            );
        }
        let share = self.shares.plugin(&manifest.name);
        let ctx = PluginCtx {
            name: manifest.name.as_str().into(),
            limits: settings.limits,
            publishes,
            config: settings.config,
            kv: settings.kv,
            outbound: Arc::new(outbound),
            requester: self.requester.clone(),
            runnable: super::cpu_wait::Runnable::sharing(self.runnable.clone(), share.runnable()),
            share,
        };
        Ok(Plugin::new(self._ticker.clone(), pre, code, manifest, hash, Arc::new(ctx), self.pool.clone()))
    }

    /// The DNS lookups in flight of the plugin `name` (at most `at_once`): those of its live
    /// versions, or new ones.
    fn lookups_of(&self, name: &str, at_once: u32) -> Arc<super::lookup::Lookups> {
        self.lookups.get_or_make(name, || Arc::new(super::lookup::Lookups::new(at_once as usize)))
    }

    /// Charges `component`'s mapped image to `plugin` in the code budget, or refuses the load.
    fn charge_code(&self, component: &Component, plugin: &str) -> Result<CodeCharge, LoadError> {
        let image = component.image_range();
        let bytes = (image.end as usize).saturating_sub(image.start as usize) as u64;
        self.code.charge(plugin, bytes).map_err(|over| match over {
            OverBudget::Alone { .. } => LoadError::Invalid(over.to_string()),
            OverBudget::Full { .. } => LoadError::NoRoom(over.to_string()),
        })
    }

    /// Instantiates the component and reads its manifest and the outbound destinations it asks
    /// for, all within [`MANIFEST_DEADLINE`]. The epoch deadline stops guest code that runs;
    /// this bound stops a guest that waits inside a host call (a WASI timer polled), which
    /// would otherwise hold the loader, and every load after it, for as long as it likes.
    ///
    /// While the pool all plugins share is full, the instance waits for a slot as an attempt's
    /// does (an idle warm instance's slot first), for up to 30 s, not counted in that time.
    async fn read_manifest(&self, pre: &bindings::PluginPre<HostState>) -> Result<Manifest, LoadError> {
        let ctx = Arc::new(PluginCtx {
            name: "(loading)".into(),
            limits: Limits { deadline: MANIFEST_DEADLINE, ..Limits::default() },
            publishes: PatternSet::default(),
            config: Default::default(),
            kv: Arc::new(MemoryKv::new()),
            outbound: Arc::new(OutboundPolicy::none()),
            requester: Arc::new(crate::rpc::NoRequests),
            runnable: super::cpu_wait::Runnable::within(self.runnable.clone()),
            share: self.shares.loading(),
        });
        let mut wait = SlotWait::until(Instant::now() + POOL_WAIT_MAX);
        loop {
            let mut store = Store::new(&self.engine, HostState::new(ctx.clone(), "manifest", "manifest"));
            super::plugin::arm_store(&mut store);
            let limit = MANIFEST_DEADLINE + super::plugin::DEADLINE_GRACE;
            match tokio::time::timeout(limit, manifest_of(&mut store, pre)).await {
                Ok(Ok(manifest)) => return Ok(manifest),
                Ok(Err(Reading::Failed(e))) => return Err(e),
                Ok(Err(Reading::PoolFull)) => {
                    drop(store);
                    // A load is no plugin's attempt: not counted as one that waited.
                    if !wait.again(&self.pool, || {}).await {
                        return Err(LoadError::Host(format!(
                            "every instance slot of the pool plugins share (sandbox.max_instances) stayed taken for \
                             {}, or the component needs more instances, memories or tables than the whole pool \
                             holds: the manifest could not be read",
                            humantime::format_duration(POOL_WAIT_MAX)
                        )));
                    }
                }
                // The store is dropped with the call suspended in it: nothing of it runs again.
                Err(_) => {
                    return Err(LoadError::Manifest(format!(
                        "manifest() did not return within {}: the plugin waited in a host call (a timer or poll) \
                         while instantiated or asked for its manifest",
                        humantime::format_duration(MANIFEST_DEADLINE)
                    )));
                }
            }
        }
    }
}

/// How long instantiating a plugin and reading its manifest may take, in guest code and host
/// calls together.
const MANIFEST_DEADLINE: Duration = Duration::from_secs(2);

/// Why [`manifest_of`] read no manifest.
enum Reading {
    /// Every slot of the pool all plugins share was taken: try again.
    PoolFull,
    /// The component's own fault: final.
    Failed(LoadError),
}

impl From<LoadError> for Reading {
    fn from(e: LoadError) -> Self {
        Reading::Failed(e)
    }
}

/// What [`Sandbox::read_manifest`] bounds in time.
async fn manifest_of(store: &mut Store<HostState>, pre: &bindings::PluginPre<HostState>) -> Result<Manifest, Reading> {
    let raw_instance = match pre.instance_pre().instantiate_async(&mut *store).await {
        Ok(instance) => instance,
        Err(e) if e.is::<wasmtime::PoolConcurrencyLimitError>() => return Err(Reading::PoolFull),
        Err(e) => {
            return Err(LoadError::Invalid(format!("cannot instantiate: {}", super::plugin::error_text(&e))).into());
        }
    };
    let instance = bindings::Plugin::new(&mut *store, &raw_instance)
        .map_err(|e| LoadError::Invalid(format!("does not export plugbus:handler/handler: {e:#}")))?;
    let raw = instance
        .plugbus_handler_handler()
        .call_manifest(&mut *store)
        .await
        .map_err(|e| LoadError::Manifest(format!("manifest() failed: {}", super::plugin::error_text(&e))))?;
    let mut manifest = Manifest::from_wit(raw).map_err(LoadError::Manifest)?;
    manifest.outbound = requested_outbound(store, &raw_instance).await?;
    manifest.validate_outbound().map_err(LoadError::Manifest)?;
    Ok(manifest)
}

/// The optional `plugbus:handler/outbound` export: the destinations the plugin asks for (none
/// when the component does not export it, as components built before it existed do not).
async fn requested_outbound(
    store: &mut Store<HostState>,
    instance: &wasmtime::component::Instance,
) -> Result<Vec<String>, LoadError> {
    let Some(iface) = instance.get_export_index(&mut *store, None, OUTBOUND_EXPORT) else {
        return Ok(Vec::new());
    };
    let bad = |e: String| LoadError::Manifest(format!("{OUTBOUND_EXPORT}: {e}"));
    let func = instance
        .get_export_index(&mut *store, Some(&iface), "requested")
        .ok_or_else(|| bad("exports no `requested` function".into()))?;
    let func = instance
        .get_typed_func::<(), (Vec<String>,)>(&mut *store, &func)
        .map_err(|e| bad(format!("`requested` has the wrong type: {e}")))?;
    let (list,) = func.call_async(&mut *store, ()).await.map_err(|e| bad(super::plugin::error_text(&e)))?;
    Ok(list)
}

/// The name of the optional export that lists a plugin's outbound destinations.
/// (wasmtime finds a semver-compatible export: a component built against 0.1.0 exports
/// `outbound@0.1.0`, found by this 0.1.1 name.)
const OUTBOUND_EXPORT: &str = "plugbus:handler/outbound@0.1.1";

#[cfg(test)]
mod tests {
    use super::{Sandbox, SandboxSettings};
    use std::sync::Arc;

    /// Review 62d F4: each loaded version of a plugin counted its DNS lookups apart, so a plugin
    /// reloading itself (two builds swapped in turn) held the host's reserved lookups once a
    /// version. Its versions count them together; a plugin gone and loaded again afresh.
    #[tokio::test]
    async fn every_version_of_a_plugin_counts_its_lookups_together() {
        let sandbox = Sandbox::new(SandboxSettings::default()).unwrap();
        let (v1, v2) = (sandbox.lookups_of("p", 8), sandbox.lookups_of("p", 8));
        assert!(Arc::ptr_eq(&v1, &v2));
        assert!(!Arc::ptr_eq(&v1, &sandbox.lookups_of("q", 8)));
        drop((v1, v2));
        let _other = sandbox.lookups_of("x", 8);
        assert!(!sandbox.lookups.lists("p"), "a gone plugin's lookups were kept");
    }

    /// The oldest wasmtime on the 48 LTS line with the 2026 advisories fixed
    /// (GHSA-rc4p-x33f-vpr2 among them): the lock must not go back below it.
    const OLDEST_FIXED: (u64, u64, u64) = (48, 0, 9);

    /// The version of `package` in the workspace's `Cargo.lock` (what every build links).
    fn locked_version(package: &str) -> (u64, u64, u64) {
        let lock_path = concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.lock");
        let lock = std::fs::read_to_string(lock_path).expect("the workspace's Cargo.lock");
        // Line by line, trimmed: a checkout with CRLF line ends reads the same.
        let mut lines = lock.lines().map(str::trim);
        let name_line = format!("name = \"{package}\"");
        lines.find(|l| *l == name_line).unwrap_or_else(|| panic!("{package} is not in {lock_path}"));
        let version = lines
            .next()
            .and_then(|l| l.strip_prefix("version = \"")?.strip_suffix('"'))
            .unwrap_or_else(|| panic!("no version line after {package} in {lock_path}"));
        // (A pre-release, `48.0.10-rc.1`, is no release with the fixes: it fails here, by name.)
        let parts: Vec<u64> = version
            .split('.')
            .map(|p| p.parse().unwrap_or_else(|_| panic!("{package} {version} in {lock_path} is not a plain release")))
            .collect();
        (parts[0], parts[1], parts[2])
    }

    /// A component of `modules` core modules, each instantiated once and defining `tables`
    /// tables of one element.
    fn component_of(modules: usize, tables: usize) -> Vec<u8> {
        let mut module = vec![0, 0x61, 0x73, 0x6d, 1, 0, 0, 0];
        if tables > 0 {
            let mut section = vec![tables as u8];
            for _ in 0..tables {
                section.extend([0x70, 0x00, 0x01]); // funcref, min 1
            }
            module.extend([4, section.len() as u8]);
            module.extend(section);
        }
        let mut out = vec![0, 0x61, 0x73, 0x6d, 0x0d, 0, 1, 0];
        for _ in 0..modules {
            out.extend([1, module.len() as u8]);
            out.extend(&module);
        }
        let mut instances = vec![modules as u8];
        for i in 0..modules {
            instances.extend([0x00, i as u8, 0x00]); // instantiate module i with no arguments
        }
        out.extend([2, instances.len() as u8]);
        out.extend(instances);
        out
    }

    /// A component that would take more than its share of the shared pool is refused when it
    /// is made, in wasmtime's words; one within its share is made.
    #[tokio::test]
    async fn a_component_over_its_share_of_the_pool_is_refused() {
        let settings = super::SandboxSettings { max_instances: 4, ..Default::default() };
        let sandbox = super::Sandbox::new(settings).unwrap();
        let refusal = |bytes: Vec<u8>| {
            let sandbox = &sandbox;
            async move { sandbox.compile(&bytes, "test").await.err().map(|e| e.to_string()).unwrap_or_default() }
        };
        let err = refusal(component_of(9, 1)).await;
        assert!(err.contains("contains 9 tables, which exceeds the configured maximum of 8"), "{err}");
        let err = refusal(component_of(1, 2)).await;
        assert!(err.contains("tables count of 2 exceeds the per-instance limit of 1"), "{err}");
        let err = refusal(component_of(17, 0)).await;
        assert!(err.contains("contains 17 core module instances, which exceeds the configured maximum of 16"), "{err}");
        assert_eq!(refusal(component_of(16, 0)).await, "", "16 core instances are its share");
        assert_eq!(refusal(component_of(8, 1)).await, "", "8 tables are its share");
    }

    #[test]
    fn the_locked_wasmtime_is_on_the_48_line_with_the_2026_advisories_fixed() {
        let locked = locked_version("wasmtime");
        assert_eq!(locked.0, OLDEST_FIXED.0, "wasmtime {locked:?} is off the 48 LTS line the host is built for");
        assert!(locked >= OLDEST_FIXED, "wasmtime {locked:?} predates the advisory fixes in {OLDEST_FIXED:?}");
    }
}
