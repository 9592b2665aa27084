//! The host's settings: one `Config`, the single source of truth for every knob.
//!
//! Layers, later wins: built-in defaults, the TOML file (`--config`), environment variables
//! `PLUGBUS_*` (nested keys with `__`: `PLUGBUS_LIMITS__MEMORY_MIB=32`), then command-line flags.
//! Unknown keys are errors, not silently ignored. A `[plugins.<name>]` table overrides any
//! subset of the defaults for one plugin.

use crate::backend::embedded::log::BusSettings;
use crate::backend::nats::NatsSettings;
use crate::retry::RetryPolicy;
use crate::router::{Delivering, Flow};
use crate::sandbox::{InstanceMode, Limits, SandboxSettings};
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of one plugin, by name: each table overrides only the keys it names.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PluginConfig {
    /// Overrides of `[limits]`.
    pub limits: Map<String, Value>,
    /// Overrides of `[flow]`.
    pub flow: Map<String, Value>,
    /// Overrides of `[retry]`.
    pub retry: Map<String, Value>,
    /// Dead-letter subject (default `plugbus.dlq.<plugin>`).
    pub dead_letter: Option<String>,
    /// Values for the plugin's `config` import.
    pub config: BTreeMap<String, Value>,
    /// Force durable (JetStream) delivery on or off for every subscription of the plugin.
    pub durable: Option<bool>,
    /// Where a new durable consumer of the plugin starts: `"all"` (the stream's first event,
    /// to rebuild state) or `"new"`; overrides the manifest's `deliver`.
    pub deliver: Option<Deliver>,
    /// `"reuse"`: warm instances reused across events (stateless handlers only); same as
    /// `limits = { instance = "reuse" }`.
    pub instance: Option<InstanceMode>,
    /// The file in the plugins folder that is this plugin (a bare `*.wasm` name), when it is
    /// not `<NAME>.wasm`. A plugin is who the operator names it: by its file, or here.
    pub file: Option<String>,
    /// The queue group (and JetStream durable) the plugin's work is shared through across hosts;
    /// default `plugbus.<NAME>`, or the manifest's own group under it.
    pub queue_group: Option<String>,
    /// Outbound HTTP destinations granted to the plugin (`scheme://host[:port]`, port `*` for
    /// any): a call goes out only when its manifest asks for the destination too. Loopback,
    /// private and link-local addresses only by exact IP.
    pub allowed_outbound: Vec<String>,
}

/// Where a new durable consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Deliver {
    /// Every event the stream holds.
    All,
    /// Events published from now on.
    New,
}

/// Everything the host needs to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// The plugins folder.
    pub plugins_dir: PathBuf,
    /// Where the host keeps state (kv, dead letters, compile cache).
    pub data_dir: PathBuf,
    /// Where the HTTP API listens; `None` for no API.
    pub http: Option<SocketAddr>,
    /// How long a stop waits for queued and in-flight events.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// When set, every API route but `/healthz` needs `Authorization: Bearer <token>`.
    pub api_token: Option<String>,
    /// Watch the plugins folder and hot-reload changes.
    pub watch: bool,
    /// Keep plugin kv in `data_dir/kv.redb` (survives restarts); off keeps it in memory.
    pub persistent_kv: bool,
    /// Keep compiled components under `data_dir/cache` so restarts skip compilation.
    pub compile_cache: bool,
    /// Keep them in this folder instead of `data_dir/cache` (its key beside it, `<folder>.key`).
    /// Hosts run by the same user may share one: entries are written by rename and named by
    /// the wasm's hash and the engine's settings.
    pub compile_cache_dir: Option<PathBuf>,
    /// Default limits for every plugin.
    pub limits: Limits,
    /// Default queue and concurrency per plugin.
    pub flow: Flow,
    /// Default retry policy.
    pub retry: RetryPolicy,
    /// Engine-wide sandbox settings.
    pub sandbox: SandboxSettings,
    /// NATS: set `url` to join a NATS deployment instead of running the embedded bus.
    pub nats: NatsSettings,
    /// The embedded bus: its durable log and when it syncs.
    pub bus: BusSettings,
    /// Per-plugin settings.
    pub plugins: BTreeMap<String, PluginConfig>,
    /// The largest plugin file the loader reads, in bytes (checked before reading and while
    /// reading): a bigger file is refused, never read into memory.
    pub max_wasm_bytes: u64,
    /// The HTTP API's defences: publish timeout, allowed web origins, live-tail bounds.
    pub api: crate::api::ApiSettings,
    /// OpenTelemetry traces: `otlp_endpoint` turns export on (see `telemetry`).
    pub telemetry: crate::telemetry::TelemetrySettings,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            plugins_dir: PathBuf::from("plugins"),
            data_dir: PathBuf::from(".plugbus"),
            http: Some(SocketAddr::from(([127, 0, 0, 1], 7070))),
            drain_timeout: Duration::from_secs(30),
            api_token: None,
            watch: true,
            compile_cache: true,
            compile_cache_dir: None,
            persistent_kv: true,
            limits: Limits::default(),
            flow: Flow::default(),
            retry: RetryPolicy::default(),
            sandbox: SandboxSettings::default(),
            nats: NatsSettings::default(),
            bus: BusSettings::default(),
            plugins: BTreeMap::new(),
            max_wasm_bytes: 64 << 20,
            api: crate::api::ApiSettings::default(),
            telemetry: crate::telemetry::TelemetrySettings::default(),
        }
    }
}

/// Overlays `overrides` on `base` and decodes the result; errors name the key.
fn overlay<T: Serialize + DeserializeOwned>(base: &T, overrides: &Map<String, Value>, at: &str) -> Result<T, String> {
    if overrides.is_empty() {
        return serde_json::to_value(base).and_then(serde_json::from_value).map_err(|e| format!("{at}: {e}"));
    }
    let mut merged = serde_json::to_value(base).map_err(|e| format!("{at}: {e}"))?;
    if let Value::Object(m) = &mut merged {
        for (k, v) in overrides {
            m.insert(k.clone(), v.clone());
        }
    }
    serde_json::from_value(merged).map_err(|e| format!("{at}: {e}"))
}

impl Config {
    /// Loads defaults ← `file` ← `PLUGBUS_*` env; fails naming the file, the key and what was
    /// expected. Flags are applied by the caller on the result, then [`Config::validate`].
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            anyhow::ensure!(path.is_file(), "config file {} does not exist", path.display());
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed("PLUGBUS_").split("__").ignore(&[
            "url",
            "log_format",
            "api_token",
            "demo_port",
            "nats_url",
            "nats_user",
            "nats_password",
            "nats_token",
            "fault_abort_after_kv_commit",
            "fault_kv_commit_delay_ms",
            "perf_map",
        ]));
        let config: Config = figment.extract().map_err(|e| {
            let mut msg = String::from("invalid configuration");
            for err in e {
                msg.push_str(&format!("\n  - {err}"));
            }
            anyhow::anyhow!(msg)
        })?;
        Ok(config)
    }

    /// Checks every per-plugin table against the defaults; errors name the key.
    /// The backend: `[bus] kind`, else NATS when `nats.url` is set, else the embedded bus.
    pub fn bus_kind(&self) -> anyhow::Result<crate::backend::BusKind> {
        use crate::backend::BusKind;
        match (self.bus.kind, &self.nats.url) {
            (Some(BusKind::Nats), None) => {
                anyhow::bail!("bus.kind = \"nats\" needs nats.url (or --nats URL): which server to join")
            }
            (Some(BusKind::Embedded), Some(url)) => anyhow::bail!(
                "bus.kind = \"embedded\" but nats.url is set ({url}): remove one (--nats also selects NATS)"
            ),
            (Some(kind), _) => Ok(kind),
            (None, Some(_)) => Ok(BusKind::Nats),
            (None, None) => Ok(BusKind::Embedded),
        }
    }

    /// Checks what serde cannot: the overlays, subjects, names and the backend choice.
    pub fn validate(&self) -> anyhow::Result<()> {
        self.bus_kind()?;
        self.telemetry.validate().map_err(anyhow::Error::msg)?;
        self.sandbox.validate().map_err(anyhow::Error::msg)?;
        anyhow::ensure!(self.api.max_connections > 0, "api.max_connections is 0: the API would take no connection");
        anyhow::ensure!(
            self.api.max_connections_per_peer > 0,
            "api.max_connections_per_peer is 0: the API would take no client's connection"
        );
        anyhow::ensure!(!self.api.read_timeout.is_zero(), "api.read_timeout is 0: no request could be read");
        anyhow::ensure!(
            !self.api.publish_timeout.is_zero(),
            "api.publish_timeout is 0: no event posted to the API could be taken (every one answered 503)"
        );
        // A zero ack wait ended the `in-progress` keep-alive at once (a zero interval panics), so
        // every slow handler's message was redelivered while it ran.
        anyhow::ensure!(
            self.nats.ack_wait >= std::time::Duration::from_millis(100),
            "nats.ack_wait is {:?}: at least 100ms (the keep-alive sends in-progress every third of it)",
            self.nats.ack_wait
        );
        // A redelivery comes at least an ack wait after the first delivery: its outputs are
        // deduplicated only within the duplicate window.
        anyhow::ensure!(
            self.nats.ack_wait < self.nats.duplicate_window,
            "nats.ack_wait ({:?}) must be below nats.duplicate_window ({:?}): a redelivered event's outputs would \
             come after the window and be stored twice",
            self.nats.ack_wait,
            self.nats.duplicate_window
        );
        anyhow::ensure!(
            self.api.max_tails < self.api.max_connections,
            "api.max_tails ({}) must be below api.max_connections ({}): live tails would take every connection",
            self.api.max_tails,
            self.api.max_connections
        );
        crate::config_bounds::count("api", "max_connections", self.api.max_connections as u64, 1)
            .map_err(anyhow::Error::msg)?;
        self.validate_plugin_settings()?;
        if self.bus_kind()? == crate::backend::BusKind::Nats {
            self.check_nats_kv_writes()?;
        }
        for (name, p) in &self.plugins {
            for (i, o) in p.allowed_outbound.iter().enumerate() {
                crate::sandbox::outbound::Rule::parse(o)
                    .map_err(|e| anyhow::anyhow!("plugins.{name}.allowed_outbound[{i}]: {e}"))?;
            }
            if let Some(s) = &p.dead_letter {
                crate::subject::validate_subject(s).map_err(|e| anyhow::anyhow!("plugins.{name}.dead_letter: {e}"))?;
            }
            if let Some(q) = &p.queue_group {
                crate::manifest::check_queue_group(q)
                    .map_err(|why| anyhow::anyhow!("plugins.{name}.queue_group {q:?} {why}"))?;
            }
            if let Some(file) = &p.file {
                anyhow::ensure!(
                    crate::manifest::valid_plugin_name(name),
                    "plugins.{name}.file: the plugin name {name:?} must be 1-64 characters of a-z, A-Z, 0-9, '-' or '_'"
                );
                let bare = Path::new(file).file_name().is_some_and(|f| f == file.as_str());
                anyhow::ensure!(
                    bare && file.ends_with(".wasm") && file != ".wasm",
                    "plugins.{name}.file {file:?} must be a file name in the plugins folder ending in .wasm (no directories)"
                );
                if let Some((other, _)) =
                    self.plugins.iter().find(|(n, o)| *n != name && o.file.as_deref() == Some(file.as_str()))
                {
                    anyhow::bail!("plugins.{name}.file {file:?} is also plugins.{other}.file: a file is one plugin");
                }
            }
        }
        anyhow::ensure!(self.max_wasm_bytes > 0, "max_wasm_bytes must be more than 0");
        // Empty, it would be the working directory (`/` under systemd), loaded and watched.
        anyhow::ensure!(
            !self.plugins_dir.as_os_str().is_empty(),
            "plugins_dir is empty: name the plugins folder (the default is `plugins`)"
        );
        // Past it, "unlimited" written as a huge number read every file as empty (a `+ 1` wrapped).
        anyhow::ensure!(
            self.max_wasm_bytes <= crate::config_bounds::MAX_BYTES,
            "max_wasm_bytes = {} is over {} (1 TiB)",
            self.max_wasm_bytes,
            crate::config_bounds::MAX_BYTES
        );
        Ok(())
    }

    /// Checks `[flow]`, `[retry]`, `[limits]` and each plugin's merged tables: that each parses
    /// and keeps within its bounds (`config_bounds`). Part of [`Config::validate`]; the tools
    /// that run plugins without a host (`plugbus test`, `inspect`, `dev`) check this much too.
    pub fn validate_plugin_settings(&self) -> anyhow::Result<()> {
        use crate::config_bounds as bounds;
        bounds::flow(&self.flow, "flow").map_err(anyhow::Error::msg)?;
        bounds::retry(&self.retry, "retry").map_err(anyhow::Error::msg)?;
        bounds::limits(&self.limits, "limits").map_err(anyhow::Error::msg)?;
        for (name, p) in &self.plugins {
            let at = |table: &str| format!("plugins.{name}.{table}");
            let limits = overlay(&self.limits, &p.limits, &at("limits")).map_err(anyhow::Error::msg)?;
            bounds::limits(&limits, &at("limits")).map_err(anyhow::Error::msg)?;
            let flow = overlay(&self.flow, &p.flow, &at("flow")).map_err(anyhow::Error::msg)?;
            bounds::flow(&flow, &at("flow")).map_err(anyhow::Error::msg)?;
            let retry = overlay(&self.retry, &p.retry, &at("retry")).map_err(anyhow::Error::msg)?;
            bounds::retry(&retry, &at("retry")).map_err(anyhow::Error::msg)?;
        }
        Ok(())
    }

    /// On NATS one kv commit is one JetStream atomic batch, which the server takes at most
    /// [`MAX_BATCH_WRITES`](crate::backend::nats::kv::MAX_BATCH_WRITES) messages in: a plugin
    /// allowed more writes would have every commit past that fail as the host's, not as its
    /// handler's limit (review 59d F4).
    fn check_nats_kv_writes(&self) -> anyhow::Result<()> {
        use crate::backend::nats::kv::MAX_BATCH_WRITES;
        let within = |limits: &Limits, at: &str| {
            anyhow::ensure!(
                limits.max_kv_writes <= MAX_BATCH_WRITES,
                "{at}.max_kv_writes = {} is over {MAX_BATCH_WRITES}, the most writes one NATS JetStream atomic batch takes \
                 (on NATS a kv commit is one batch): every commit past it would fail",
                limits.max_kv_writes
            );
            Ok(())
        };
        within(&self.limits, "limits")?;
        for name in self.plugins.keys() {
            within(&self.limits_for(name), &format!("plugins.{name}.limits"))?;
        }
        Ok(())
    }

    /// The plugin `[plugins.NAME] file` binds the file `file_name` to, if any.
    pub fn plugin_bound_to(&self, file_name: &str) -> Option<&str> {
        self.plugins.iter().find(|(_, p)| p.file.as_deref() == Some(file_name)).map(|(n, _)| n.as_str())
    }

    /// The file `[plugins.NAME] file` names for `plugin`, if any.
    pub fn file_of(&self, plugin: &str) -> Option<&str> {
        self.plugins.get(plugin).and_then(|p| p.file.as_deref())
    }

    /// The operator's queue group for `plugin`, if any.
    pub fn queue_group_for(&self, plugin: &str) -> Option<&str> {
        self.plugins.get(plugin).and_then(|p| p.queue_group.as_deref())
    }

    /// The effective limits of `plugin`.
    pub fn limits_for(&self, plugin: &str) -> Limits {
        match self.plugins.get(plugin) {
            Some(p) => {
                let mut limits = overlay(&self.limits, &p.limits, plugin).unwrap_or_else(|_| self.limits.clone());
                if let Some(mode) = p.instance {
                    limits.instance = mode;
                }
                limits
            }
            None => self.limits.clone(),
        }
    }

    /// How deliveries to `plugin` are queued, retried and dead-lettered.
    pub fn delivering_for(&self, plugin: &str) -> Delivering {
        let p = self.plugins.get(plugin);
        let none = Map::new();
        Delivering {
            flow: overlay(&self.flow, p.map_or(&none, |p| &p.flow), plugin).unwrap_or(self.flow),
            retry: overlay(&self.retry, p.map_or(&none, |p| &p.retry), plugin).unwrap_or_else(|_| self.retry.clone()),
            dead_letter_subject: p
                .and_then(|p| p.dead_letter.clone())
                .unwrap_or_else(|| format!("plugbus.dlq.{plugin}")),
            durable: p.and_then(|p| p.durable),
            deliver_all: p.and_then(|p| p.deliver).map(|d| d == Deliver::All),
        }
    }

    /// The outbound HTTP destinations granted to `plugin`.
    pub fn outbound_for(&self, plugin: &str) -> Vec<String> {
        self.plugins.get(plugin).map(|p| p.allowed_outbound.clone()).unwrap_or_default()
    }

    /// The operator's `config` values for `plugin` (scalars as text).
    pub fn values_for(&self, plugin: &str) -> HashMap<String, String> {
        let Some(p) = self.plugins.get(plugin) else { return HashMap::new() };
        p.config
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())))
            .collect()
    }

    /// The largest memory cap of any plugin, in MiB (sizes the sandbox pool).
    pub fn max_memory_mib(&self) -> u64 {
        self.plugins.keys().map(|n| self.limits_for(n).memory_mib).fold(self.limits.memory_mib, u64::max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_kind_is_chosen_in_one_place_and_contradictions_are_named() {
        use crate::backend::BusKind;
        let from = |text: &str| {
            Config::load(Some(&write(text).0)).and_then(|c| {
                c.validate()?;
                Ok(c)
            })
        };
        assert_eq!(from("").unwrap().bus_kind().unwrap(), BusKind::Embedded);
        assert_eq!(from("[nats]\nurl = \"nats://127.0.0.1:1\"").unwrap().bus_kind().unwrap(), BusKind::Nats);
        let c = from("[bus]\nkind = \"embedded\"\ndurable = false").unwrap();
        assert_eq!((c.bus_kind().unwrap(), c.bus.durable), (BusKind::Embedded, false));
        let why = from("[bus]\nkind = \"nats\"").unwrap_err().to_string();
        assert!(why.contains("bus.kind = \"nats\" needs nats.url"), "{why}");
        let why = from("[bus]\nkind = \"embedded\"\n[nats]\nurl = \"nats://x:1\"").unwrap_err().to_string();
        assert!(why.contains("nats.url is set (nats://x:1)"), "{why}");
        let why = format!("{:#}", from("[bus]\nkind = \"kafka\"").unwrap_err());
        assert!(why.contains("kafka") && why.contains("kind"), "{why}");
    }

    /// Review 59d F4: on NATS a kv commit is one JetStream atomic batch of at most 1,000 writes;
    /// a plugin allowed more had every larger commit fail as a host error. The config says so
    /// at the start, naming the table; the embedded bus has no such bound.
    #[test]
    fn on_nats_max_kv_writes_stays_within_one_atomic_batch() {
        let from = |text: &str| Config::load(Some(&write(text).0)).and_then(|c| c.validate());
        let nats = "[nats]\nurl = \"nats://127.0.0.1:1\"\n";
        from(&format!("{nats}[limits]\nmax_kv_writes = 1000")).unwrap();
        let why = from(&format!("{nats}[limits]\nmax_kv_writes = 1001")).unwrap_err().to_string();
        assert!(why.contains("limits.max_kv_writes = 1001 is over 1000") && why.contains("atomic batch"), "{why}");
        let why = from(&format!("{nats}[plugins.inventory]\nlimits = {{ max_kv_writes = 5000 }}")).unwrap_err();
        assert!(why.to_string().contains("plugins.inventory.limits.max_kv_writes = 5000"), "{why}");
        from("[limits]\nmax_kv_writes = 5000").unwrap();
    }

    /// Review 60c L3: an empty `plugins_dir` (`PLUGBUS_PLUGINS_DIR=`) would be the working
    /// directory once made absolute (`/` under systemd).
    #[test]
    fn an_empty_plugins_dir_is_refused() {
        let config = Config { plugins_dir: std::path::PathBuf::new(), ..Config::default() };
        let why = config.validate().unwrap_err().to_string();
        assert!(why.contains("plugins_dir is empty"), "{why}");
    }

    /// Review 60b L6: "unlimited" as a huge `max_wasm_bytes` made every file read as empty.
    #[test]
    fn max_wasm_bytes_is_refused_past_a_tebibyte() {
        let from = |text: &str| Config::load(Some(&write(text).0)).and_then(|c| c.validate());
        from("max_wasm_bytes = 1099511627776").unwrap();
        let why = from("max_wasm_bytes = 9223372036854775807").unwrap_err().to_string();
        assert!(why.contains("max_wasm_bytes = 9223372036854775807 is over"), "{why}");
    }

    fn write(text: &str) -> tempfile_path::TempPath {
        tempfile_path::write(text)
    }

    /// A tiny temp-file helper (no extra dependency).
    mod tempfile_path {
        pub struct TempPath(pub std::path::PathBuf);
        impl Drop for TempPath {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        pub fn write(text: &str) -> TempPath {
            static N: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!("plugbus-config-{}-{n}.toml", std::process::id()));
            std::fs::write(&path, text).unwrap();
            TempPath(path)
        }
    }

    #[test]
    fn a_plugin_table_overrides_only_what_it_names() {
        let f = write(
            r#"
            [limits]
            deadline = "2s"
            [plugins.inventory]
            limits = { memory_mib = 32 }
            retry = { max_attempts = 2 }
            dead_letter = "dead.inventory"
            config = { "stock.widget" = 7, sender = "x@y" }
            instance = "reuse"
            "#,
        );
        let c = Config::load(Some(&f.0)).unwrap();
        c.validate().unwrap();
        let l = c.limits_for("inventory");
        assert_eq!((l.memory_mib, l.deadline), (32, Duration::from_secs(2)));
        assert_eq!(c.limits_for("other").memory_mib, 64);
        assert_eq!((l.instance, c.limits_for("other").instance), (InstanceMode::Reuse, InstanceMode::Fresh));
        let d = c.delivering_for("inventory");
        assert_eq!((d.retry.max_attempts, d.retry.initial), (2, Duration::from_millis(100)));
        assert_eq!(d.dead_letter_subject, "dead.inventory");
        assert_eq!(c.delivering_for("other").dead_letter_subject, "plugbus.dlq.other");
        assert_eq!(c.values_for("inventory")["stock.widget"], "7");
        assert_eq!(c.max_memory_mib(), 64);
    }

    #[test]
    fn unknown_and_mistyped_keys_are_errors_naming_the_key() {
        let f = write("plugins_folder = \"x\"\n");
        let e = Config::load(Some(&f.0)).unwrap_err().to_string();
        assert!(e.contains("plugins_folder"), "{e}");

        let f = write("[limits]\nmemory_mib = \"lots\"\n");
        let e = Config::load(Some(&f.0)).unwrap_err().to_string();
        assert!(e.contains("memory_mib") && e.contains(&f.0.display().to_string()), "{e}");

        let f = write("[plugins.inventory]\nlimits = { memory = 3 }\n");
        let e = Config::load(Some(&f.0)).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains("plugins.inventory.limits") && e.contains("memory"), "{e}");

        let f = write("[limits\n");
        assert!(Config::load(Some(&f.0)).is_err());
        assert!(
            Config::load(Some(Path::new("/nonexistent/plugbus.toml")))
                .unwrap_err()
                .to_string()
                .contains("does not exist")
        );
    }

    /// Review 56e: numbers past what the host can hold (from TOML, or the environment, which
    /// takes what TOML cannot) were taken as they were: a `retry.max` of 2^64 − 1 s panicked
    /// every failed delivery's backoff (the event neither retried nor dead-lettered), a huge
    /// `flow.queue` or `api.max_connections` panicked a semaphore, a `max_output_bytes` near
    /// 2^63 overflowed every host call's budget, and a 0 `memory_mib` dead-lettered every
    /// event. Each is refused at the start, naming its key, in a plugin's table too.
    #[test]
    fn numbers_past_their_bounds_are_refused_naming_the_key() {
        for (text, key) in [
            ("[retry]\nmax = \"18446744073709551615s\"\n", "retry.max = "),
            ("[retry]\nfactor = -2.0\n", "retry.factor"),
            ("[retry]\nmax_attempts = 2000000\n", "retry.max_attempts = 2000000 is over"),
            ("[flow]\nqueue = 4611686018427387904\n", "flow.queue = 4611686018427387904 is over"),
            ("[plugins.p.flow]\nconcurrency = 4611686018427387904\n", "plugins.p.flow.concurrency"),
            ("[api]\nmax_connections = 4611686018427387904\n", "api.max_connections"),
            ("[limits]\nmemory_mib = 0\n", "limits.memory_mib = 0 is below 1"),
            ("[limits]\ndeadline = \"0s\"\n", "limits.deadline is 0"),
            ("[plugins.p.limits]\nmax_output_bytes = 9223372036854775807\n", "plugins.p.limits.max_output_bytes"),
            ("[plugins.p.retry]\ninitial = \"500000d\"\n", "plugins.p.retry.initial"),
            ("[sandbox]\ncompile_timeout = \"500000d\"\n", "sandbox.compile_timeout"),
        ] {
            let e = Config::load(Some(&write(text).0)).unwrap().validate().unwrap_err().to_string();
            assert!(e.contains(key), "{text}: {e}");
        }
    }

    /// A publish timeout of 0 answered every ingress event `503` (the bus never takes one in no
    /// time): refused at load, naming the key.
    #[test]
    fn a_publish_timeout_of_zero_is_refused_naming_the_key() {
        let f = write("[api]\npublish_timeout = \"0s\"\n");
        let e = Config::load(Some(&f.0)).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains("api.publish_timeout is 0"), "{e}");
    }

    /// An ack wait of 0 panicked the keep-alive task (an interval of 0), silently: every slow
    /// handler's message was then redelivered while it ran. Refused at load, naming the key.
    #[test]
    fn an_ack_wait_of_zero_is_refused_naming_the_key() {
        let f = write("[nats]\nack_wait = \"0s\"\n");
        let e = Config::load(Some(&f.0)).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains("nats.ack_wait is 0ns: at least 100ms"), "{e}");
        let f = write("[nats]\nack_wait = \"3m\"\n");
        let e = Config::load(Some(&f.0)).unwrap().validate().unwrap_err().to_string();
        assert!(e.contains("nats.ack_wait (180s) must be below nats.duplicate_window (120s)"), "{e}");
    }

    #[test]
    fn compile_caps_below_what_the_compiler_itself_needs_are_refused_naming_the_key() {
        let mut c = Config::default();
        c.sandbox.compile_memory_mib = 40;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("sandbox.compile_memory_mib = 40 is below 128"), "{err}");
        c.sandbox.compile_memory_mib = 128;
        c.sandbox.compile_timeout = Duration::ZERO;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("sandbox.compile_timeout = 0s is below 1s"), "{err}");
        c.sandbox.compile_timeout = Duration::from_secs(1);
        c.validate().unwrap();
    }

    #[test]
    fn a_code_budget_of_nothing_or_past_a_tebibyte_is_refused_naming_the_key() {
        let mut c = Config::default();
        c.sandbox.max_code_mib = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("sandbox.max_code_mib = 0 is below 1"), "{err}");
        c.sandbox.max_code_mib = (1 << 20) + 1;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("sandbox.max_code_mib = 1048577 is over"), "{err}");
        c.sandbox.max_code_mib = 1;
        c.validate().unwrap();
    }
}
