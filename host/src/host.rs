//! The host: wires config, transport, sandbox, router and API together, and shuts them down.

use crate::api;
use crate::config::Config;
use crate::deadletter::DeadLetters;
use crate::event::Event;
use crate::kv::KvStore;
use crate::loader::{self, Rejected};
use crate::metrics::Metrics;
use crate::reload::{self, ReloadStats, Reloader};
use crate::router::DrainReport;
use crate::router::Router;
use crate::sandbox::Sandbox;
use crate::transport::Transport;
use anyhow::Context;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};

/// How long a stop lets open HTTP requests finish before closing their connections.
const HTTP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A running host.
pub struct Host {
    transport: Arc<dyn Transport>,
    router: Arc<Router>,
    kv: Arc<dyn KvStore>,
    reloader: Arc<Reloader>,
    watcher: Option<reload::WatchGuard>,
    dead_letters: Arc<DeadLetters>,
    drain_timeout: std::time::Duration,
    rejected: Arc<Mutex<loader::RejectedFiles>>,
    http_addr: Option<SocketAddr>,
    stop_http: Option<oneshot::Sender<()>>,
    http_task: Option<tokio::task::JoinHandle<()>>,
    /// Writes what `dlq.redb` missed while it failed writes ([`DeadLetters::write_missed`]).
    dead_letters_catching_up: CatchingUp,
}

/// The task that writes what `dlq.redb` missed every few seconds; stopped with the host, shut
/// down or dropped. It holds the store (and so the file) only while it writes: a host started
/// again on the same `data_dir` right after a stop found the file still open.
struct CatchingUp(tokio::task::JoinHandle<()>);

impl CatchingUp {
    /// Stops the task and waits until it is gone.
    async fn stop(&mut self) {
        self.0.abort();
        let _ = (&mut self.0).await;
    }
}

impl Drop for CatchingUp {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Every 5 s, writes what the dead-letter file missed while it failed writes (a full disk), so
/// a dead letter kept in memory only is not lost with the process when no later write comes.
async fn write_missed_dead_letters(dead_letters: std::sync::Weak<DeadLetters>) {
    loop {
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        let Some(dead_letters) = dead_letters.upgrade() else { return };
        // On the blocking pool even to look: a write holds the lock over its `fsync`.
        let _ = tokio::task::spawn_blocking(move || dead_letters.write_missed()).await;
    }
}

impl Host {
    /// Loads the plugins folder, subscribes every plugin and starts the HTTP API.
    pub async fn start(config: Config) -> anyhow::Result<Self> {
        Self::start_reporting(config, &|_, _, _| {}).await
    }

    /// Like [`Host::start`], telling `on_load` how far loading the plugins folder has come (the
    /// CLI's progress bar).
    pub async fn start_reporting(config: Config, on_load: loader::OnLoad<'_>) -> anyhow::Result<Self> {
        config.validate()?;
        let crate::backend::Backend { transport, kv } = crate::backend::open(&config).await?;
        Self::start_on_reporting(config, transport, kv, on_load).await
    }

    /// Like [`Host::start`], on a transport and kv store the caller made (tests wrap a transport
    /// to inject faults).
    pub async fn start_on(config: Config, transport: Arc<dyn Transport>, kv: Arc<dyn KvStore>) -> anyhow::Result<Self> {
        Self::start_on_reporting(config, transport, kv, &|_, _, _| {}).await
    }

    async fn start_on_reporting(
        config: Config,
        transport: Arc<dyn Transport>,
        kv: Arc<dyn KvStore>,
        on_load: loader::OnLoad<'_>,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        let config = with_absolute_plugins_dir(config)?;
        // Whatever the store, one plugin's commits take a bounded share of its writer.
        let shared = Arc::new(crate::kv::share::Shared::new(kv));
        let kv: Arc<dyn KvStore> = shared.clone();
        let mut settings = config.sandbox.clone();
        settings.max_memory_mib = settings.max_memory_mib.max(config.max_memory_mib());
        let mut sandbox = Sandbox::new(settings.clone())?;
        if config.compile_cache {
            let dir = config.compile_cache_dir.clone().unwrap_or_else(|| config.data_dir.join("cache"));
            // The cache only saves compiles (every entry is checked, a miss compiles): one it
            // cannot use (a stray file where its folder goes, a read-only mount) starts the host
            // without it, said, rather than keeping down a host whose log holds accepted events
            // (review 61c L1).
            sandbox = match sandbox.with_cache(&dir) {
                Ok(cached) => cached,
                Err(e) => {
                    tracing::error!(
                        "starting without the compile cache, every plugin compiled at each start: {e:#} \
                        (move it aside, or set compile_cache = false to say so)"
                    );
                    Sandbox::new(settings)?
                }
            };
        }
        let sandbox = sandbox.with_requester(Arc::new(crate::rpc::TransportRequester(transport.clone())));
        let dead_letters = if config.persistent_kv {
            let path = config.data_dir.join("dlq.redb");
            let store = DeadLetters::persistent(10_000, &path).context("opening the kept dead letters")?;
            let kept = store.usage().0;
            if kept > 0 {
                tracing::info!(kept, file = %path.display(), "dead letters kept from before the last stop");
            }
            Arc::new(store)
        } else {
            Arc::new(DeadLetters::new(10_000))
        };
        let metrics = Arc::new(Metrics::default());
        metrics.register_with(|registry| {
            transport.register_metrics(registry);
            sandbox.shared_pool().register_metrics(registry);
            sandbox.cpu_shares().register_metrics(registry);
            shared.register_metrics(registry);
        });
        let router = Arc::new(Router::new(transport.clone(), dead_letters.clone(), metrics.clone()));

        // Watched before it is read: what changes while the host starts is applied once it has.
        // (A folder that is not there is the loader's to name.)
        let watching_early = config.watch && config.plugins_dir.is_dir();
        let folder = if watching_early { Some(reload::watch_folder(&config.plugins_dir)?) } else { None };
        let (loaded, mut rejected) = loader::load_dir_reporting(&sandbox, &config, &kv, on_load).await?;
        let mut files = std::collections::HashMap::new();
        for (path, plugin) in loaded {
            let name = plugin.name().to_string();
            match router.install(plugin, config.delivering_for(&name)).await {
                Ok(()) => {
                    files.insert(path, name);
                }
                // One plugin the bus will not subscribe (a broker that refuses its stream) is
                // that plugin's refusal, not the host's: the others serve, and it is tried again
                // (review 62d F1). A host that watches no folder would never try it again while
                // it says it is ready (review 62e F2): its start fails, for its supervisor.
                Err(e) if config.watch => rejected.push(refused_subscription(path, &name, &e)),
                Err(e) => {
                    let file = path.display();
                    return Err(anyhow::Error::new(e).context(format!("subscribing plugin {name} from {file}")));
                }
            }
        }
        transport.all_subscribed();
        warn_if_the_pool_is_short(&config, &router.names(), sandbox.settings().max_instances);
        for name in config.plugins.keys() {
            if !router.names().contains(name) {
                tracing::warn!(plugin = %name, "the config has a [plugins.{name}] table but no such plugin is loaded");
            }
        }
        for r in &rejected {
            metrics.load_error(&r.path);
        }
        let rejected = Arc::new(Mutex::new(rejected.into_iter().collect::<loader::RejectedFiles>()));
        let reloader = Arc::new(Reloader {
            sandbox,
            config: config.clone(),
            kv: kv.clone(),
            router: router.clone(),
            rejected: rejected.clone(),
            files: Mutex::new(files),
            stats: ReloadStats::default(),
            metrics: metrics.clone(),
            freed: Mutex::default(),
        });
        let folder = match folder {
            Some(folder) => Some(folder),
            None if config.watch => Some(reload::watch_folder(&config.plugins_dir)?),
            None => None,
        };
        let watcher = folder.map(|folder| reload::watch(reloader.clone(), folder));

        let (mut http_addr, mut stop_http, mut http_task) = (None, None, None);
        if let Some(addr) = config.http {
            let listener =
                tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding the HTTP API to {addr}"))?;
            http_addr = Some(listener.local_addr()?);
            let state = api::ApiState {
                transport: transport.clone(),
                router: router.clone(),
                rejected: rejected.clone(),
                dead_letters: dead_letters.clone(),
                metrics: metrics.clone(),
                reloader: reloader.clone(),
                api_token: config.api_token.clone(),
                max_event_bytes: config.limits.max_event_bytes as usize,
            };
            let (tx, rx) = oneshot::channel::<()>();
            stop_http = Some(tx);
            let bounds = crate::http_server::Bounds {
                max_connections: config.api.max_connections,
                max_connections_per_peer: config.api.max_connections_per_peer,
                read_timeout: config.api.read_timeout,
            };
            http_task = Some(tokio::spawn(async move {
                let app = api::router(state);
                crate::http_server::serve(listener, app, bounds, async {
                    let _ = rx.await;
                })
                .await;
            }));
            tracing::info!(addr = %http_addr.expect("bound"), "HTTP API listening");
        }
        let catching_up = CatchingUp(tokio::spawn(write_missed_dead_letters(Arc::downgrade(&dead_letters))));
        tracing::info!(
            transport = transport.name(),
            plugins = router.names().len(),
            rejected = rejected.lock().expect("poisoned").len(),
            "host ready"
        );
        Ok(Self {
            transport,
            router,
            kv,
            reloader,
            watcher,
            dead_letters,
            drain_timeout: config.drain_timeout,
            rejected,
            http_addr,
            stop_http,
            http_task,
            dead_letters_catching_up: catching_up,
        })
    }

    /// The transport the host is attached to.
    pub fn transport(&self) -> &Arc<dyn Transport> {
        &self.transport
    }

    /// Publishes an event into the bus, as a producer would.
    pub async fn publish(&self, event: Event) -> anyhow::Result<()> {
        self.transport.publish(event).await.context("publishing")
    }

    /// Observes every event matching `patterns` (outputs included).
    pub async fn observe(&self, patterns: &[&str]) -> anyhow::Result<mpsc::Receiver<Arc<Event>>> {
        let patterns = patterns.iter().map(|s| s.to_string()).collect();
        Ok(self.transport.observe(patterns, 1 << 16).await?.events)
    }

    /// The plugin kv store.
    pub fn kv(&self) -> &Arc<dyn KvStore> {
        &self.kv
    }

    /// The live plugins.
    pub fn router(&self) -> &Arc<Router> {
        &self.router
    }

    /// Files that could not be loaded.
    pub fn rejected(&self) -> Vec<Rejected> {
        self.rejected.lock().expect("poisoned").iter().cloned().collect()
    }

    /// Where the HTTP API listens.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http_addr
    }

    /// The reloader: its sandbox (compile cache counters) and reload counters.
    pub fn reloader(&self) -> &Arc<Reloader> {
        &self.reloader
    }

    /// The dead letters this host kept.
    pub fn dead_letters(&self) -> &Arc<DeadLetters> {
        &self.dead_letters
    }

    /// Stops gracefully: stops the HTTP ingress, lets queued and in-flight events (and the
    /// events they publish) finish within the drain timeout, and reports what was left.
    pub async fn shutdown(mut self) -> DrainReport {
        if let Some(tx) = self.stop_http.take() {
            let _ = tx.send(());
        }
        if let Some(mut task) = self.http_task.take() {
            // Requests in progress get a moment to finish; a live tail (an SSE stream) never ends
            // by itself, so after that the server is stopped with its connections.
            if tokio::time::timeout(HTTP_GRACE, &mut task).await.is_err() {
                tracing::info!(grace = ?HTTP_GRACE, "HTTP connections still open (live tails): closing them");
                task.abort();
                let _ = task.await;
            }
        }
        // No plugin is added or swapped while draining (one added now would subscribe after
        // intake stopped): the watcher stops first, its loads under way given up.
        if let Some(watcher) = self.watcher.take() {
            watcher.stop().await;
        }
        if self.transport.is_external() {
            // Nothing new is taken from the broker; what this host took still finishes (a
            // durable event it cannot finish goes back to the broker unacked).
            self.router.stop_intake();
        }
        tracing::info!(timeout = ?self.drain_timeout, "draining");
        let report = self.router.drain(self.drain_timeout).await;
        self.router.close().await;
        // What the dead-letter file missed while it failed writes, written now or lost with the
        // process (logged).
        self.dead_letters_catching_up.stop().await;
        let dead_letters = self.dead_letters.clone();
        let written = tokio::task::spawn_blocking(move || dead_letters.write_missed()).await.unwrap_or(false);
        if !written {
            tracing::error!(
                "changes dlq.redb did not take (a full disk?) are lost with this stop: dead letters kept in memory only \
                 are gone, and replayed ones it still holds come back at the next start"
            );
        }
        if report.is_clean() {
            tracing::info!("drained: every accepted event was handled; host stopped");
        } else {
            tracing::warn!(report = ?report, "host stopped with events unhandled");
        }
        report
    }
}

/// The refusal of the plugin `name` at `path` whose subscription the bus refused at the start,
/// logged: the watching host tries it again by itself, as after a reload (`reload::watch`).
fn refused_subscription(path: std::path::PathBuf, name: &str, e: &crate::transport::TransportError) -> Rejected {
    let transient = !matches!(e, crate::transport::TransportError::Refused(_));
    let reason = if transient {
        format!("could not subscribe: {e} (tried again by itself)")
    } else {
        format!("could not subscribe: {e}")
    };
    let mut refused = Rejected::new(path, &reason);
    refused.transient = transient;
    tracing::error!(file = %loader::shown(&refused.path), plugin = %name, "plugin not serving: {}", refused.reason);
    refused
}

/// Warns when the plugins may run more attempts at once than the instance pool they share has
/// slots: when they all do, attempts wait for a slot (and past 30 s fail as a host error).
/// Called at start and when a plugin is added.
pub(crate) fn warn_if_the_pool_is_short(config: &Config, plugins: &[String], max_instances: u32) {
    let concurrency: usize = plugins.iter().map(|name| config.delivering_for(name).flow.concurrency).sum();
    if concurrency > max_instances as usize {
        tracing::warn!(
            concurrency,
            max_instances,
            "the plugins may run {concurrency} attempts at once (the sum of their flow.concurrency) but the instance \
             pool they share has {max_instances} slots (sandbox.max_instances): when they all run, attempts wait \
             for a slot; raise sandbox.max_instances or lower flow.concurrency"
        );
    }
}

/// `config` with its `plugins_dir` made absolute as the folder's watcher makes it (joined to
/// the working directory, no symlink resolved): the watcher names every change by that form,
/// and the files loaded at start were kept by the relative one (the default, `plugins`), so a
/// copy over one was refused as "already served from plugins/x.wasm" and a removal was never
/// seen (review 60b H2). `plugbus dev`, which reads it from `/v1/plugins`, gets a path that
/// works from any directory too.
fn with_absolute_plugins_dir(mut config: Config) -> anyhow::Result<Config> {
    if config.plugins_dir.is_relative() {
        let cwd = std::env::current_dir().context("reading the working directory (plugins_dir is relative)")?;
        config.plugins_dir = cwd.join(&config.plugins_dir);
    }
    Ok(config)
}
