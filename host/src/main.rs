//! The `plugbus` command line: run the host, publish an event.

mod cli;

use anyhow::Context;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use plugbus::{Config, Host};
use std::net::SocketAddr;
use std::path::PathBuf;

/// plugbus: run sandboxed WebAssembly event handlers from a plugins folder.
///
/// Drop a handler component (built with plugbus-sdk for wasm32-wasip2) into the plugins folder;
/// the host subscribes to what its manifest asks for and runs every matching event through it.
#[derive(Parser)]
#[command(name = "plugbus", version, about, long_about = None)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Pretty, global = true, env = "PLUGBUS_LOG_FORMAT")]
    log_format: LogFormat,

    /// Bearer token for the HTTP API (client commands send it; `run` requires it when set).
    #[arg(long, global = true, env = "PLUGBUS_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct RunArgs {
    /// A TOML config file (see examples/deploy/plugbus.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// The plugins folder [default: plugins].
    #[arg(long, value_name = "DIR")]
    plugins: Option<PathBuf>,
    /// Where state is kept (kv, dead letters, compile cache) [default: .plugbus].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// Address of the HTTP API (event ingress, health, metrics, plugins) [default: 127.0.0.1:7070].
    #[arg(long, value_name = "ADDR")]
    http: Option<SocketAddr>,
    /// Default memory cap per plugin instance, in MiB [default: 64].
    #[arg(long, value_name = "MIB")]
    memory_mib: Option<u64>,
    /// Default deadline per event (wall time, not counting waits for a CPU behind other plugins'
    /// attempts; at most 4x of wall time), e.g. 5s or 250ms [default: 5s].
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    deadline: Option<std::time::Duration>,
    /// Default publishes allowed per event [default: 100].
    #[arg(long, value_name = "N")]
    max_publishes: Option<u32>,
    /// Default attempts per event before it is dead-lettered [default: 5].
    #[arg(long, value_name = "N")]
    max_attempts: Option<u32>,
    /// Default attempts running at once per plugin [default: 16].
    #[arg(long, value_name = "N")]
    concurrency: Option<usize>,
    /// Instances that may be live at once across all plugins (sandbox pool size) [default: 256].
    #[arg(long, value_name = "N")]
    max_instances: Option<u32>,
    /// Join a NATS deployment at this URL instead of running the embedded bus.
    #[arg(long = "nats", value_name = "URL", env = "PLUGBUS_NATS_URL")]
    nats: Option<String>,
    /// NATS credentials file (JWT + NKey).
    #[arg(long, value_name = "FILE", requires = "nats")]
    nats_creds: Option<PathBuf>,
    /// PEM file of CA certificates to trust for NATS over TLS.
    #[arg(long, value_name = "FILE", requires = "nats")]
    nats_tls_ca: Option<PathBuf>,
    /// NATS user name (with --nats-password).
    #[arg(long, value_name = "USER", env = "PLUGBUS_NATS_USER")]
    nats_user: Option<String>,
    /// NATS password.
    #[arg(long, value_name = "PASSWORD", env = "PLUGBUS_NATS_PASSWORD", hide_env_values = true)]
    nats_password: Option<String>,
    /// NATS auth token.
    #[arg(long, value_name = "TOKEN", env = "PLUGBUS_NATS_TOKEN", hide_env_values = true)]
    nats_token: Option<String>,
    /// Operator config for a plugin, as PLUGIN.KEY=VALUE (repeatable); the plugin reads it
    /// through `plugbus_sdk::config::get("KEY")`.
    #[arg(long = "plugin-config", value_name = "PLUGIN.KEY=VALUE")]
    plugin_config: Vec<String>,
}

impl RunArgs {
    /// The config file and env, with these flags on top.
    fn config(self) -> anyhow::Result<Config> {
        let mut c = load_config(self.config.as_deref())?;
        if let Some(v) = self.plugins {
            c.plugins_dir = v;
        }
        if let Some(v) = self.data_dir {
            c.data_dir = v;
        }
        if let Some(v) = self.http {
            c.http = Some(v);
        }
        if let Some(v) = self.memory_mib {
            c.limits.memory_mib = v;
        }
        if let Some(v) = self.deadline {
            c.limits.deadline = v;
        }
        if let Some(v) = self.max_publishes {
            c.limits.max_publishes = v;
        }
        if let Some(v) = self.max_attempts {
            c.retry.max_attempts = v;
        }
        if let Some(v) = self.concurrency {
            c.flow.concurrency = v;
        }
        if let Some(v) = self.max_instances {
            c.sandbox.max_instances = v;
        }
        if let Some(v) = self.nats {
            c.nats.url = Some(v);
            c.bus.kind = Some(plugbus::backend::BusKind::Nats);
        }
        if let Some(v) = self.nats_creds {
            c.nats.creds = Some(v);
        }
        if let Some(v) = self.nats_tls_ca {
            c.nats.tls_ca = Some(v);
        }
        if let Some(v) = self.nats_user {
            c.nats.user = Some(v);
        }
        if let Some(v) = self.nats_password {
            c.nats.password = Some(v);
        }
        if let Some(v) = self.nats_token {
            c.nats.token = Some(v);
        }
        for entry in self.plugin_config {
            let bad = || format!("--plugin-config {entry:?}: expected PLUGIN.KEY=VALUE");
            let (key, value) = entry.split_once('=').with_context(bad)?;
            let (plugin, key) = key.split_once('.').with_context(bad)?;
            c.plugins.entry(plugin.to_string()).or_default().config.insert(key.into(), value.into());
        }
        c.validate()?;
        Ok(c)
    }
}

#[derive(Subcommand)]
enum DlqAction {
    /// List the kept dead letters (a table; `--json` for the API's answer).
    List {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Re-publish the kept dead letters to their original subjects (each with an id of its own, made from the dead letter's).
    Replay {
        /// Only this dead letter (its ID as `plugbus dlq list` shows it).
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// Print the API's JSON report instead of a summary.
        #[arg(long)]
        json: bool,
    },
    /// Print the kept dead letters as case lines for `plugbus test` (the event that failed,
    /// expecting what happened): `plugbus dlq export > cases.jsonl`.
    Export,
    /// Run one dead letter again exactly as it ran (the kv and config values it read, the same
    /// attempt, ids, time and random) on the version that failed and, with --against, on a
    /// candidate; print both outcomes side by side. Nothing is published or written.
    Debug {
        /// The dead letter (its ID as `plugbus dlq list` shows it).
        id: String,
        /// A candidate component to run it on too (a fixed build of the handler).
        #[arg(long, value_name = "NEW.wasm")]
        against: Option<PathBuf>,
        /// Print the API's JSON answer instead of the side-by-side text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the host: load every plugin in the folder, subscribe, serve events until stopped.
    ///
    /// Settings come from built-in defaults, then the TOML file given with --config, then
    /// PLUGBUS_* environment variables (PLUGBUS_LIMITS__MEMORY_MIB=32), then these flags.
    Run(Box<RunArgs>),
    /// Dead letters kept by a running host: list them, or replay them to their original subjects.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
        /// Only this plugin's dead letters.
        #[arg(long, global = true)]
        plugin: Option<String>,
        /// The host's HTTP API.
        #[arg(long, default_value = "http://127.0.0.1:7070", env = "PLUGBUS_URL", global = true)]
        url: String,
    },
    /// Deliver again to one plugin every event the embedded bus's log keeps (from a sequence
    /// number on) that its subscription matches: rebuild a read model from history.
    Replay {
        /// The plugin to rewind.
        #[arg(long)]
        plugin: String,
        /// Where to start: a sequence number (`1200`), an RFC 3339 time
        /// (`2026-11-30T07:00:00Z`) or a duration ago (`90m`, `2h`); default: the oldest kept.
        /// Outputs the handler made before keep their ids, so downstream sees each once.
        #[arg(long, default_value = "0")]
        from: String,
        /// The host's HTTP API.
        #[arg(long, default_value = "http://127.0.0.1:7070", env = "PLUGBUS_URL")]
        url: String,
    },
    /// Check a component the way the host would load it: manifest, imports, exports, limits
    /// and a verdict. Exit code 0 when loadable, 1 when not. Given a folder, every `*.wasm` in
    /// it, as the host would load the plugins folder (exit code 0 when all are loadable).
    Inspect {
        /// The component to inspect, or a plugins folder.
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Apply this config file's limits.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print every event matching PATTERN as it flows through a running host (`*`, `>` wildcards):
    /// time, subject, id and the start of the data, one line each (`--json` for the records).
    Tail {
        /// Subject pattern, e.g. `orders.>`.
        pattern: String,
        /// Also append each event to FILE as one CloudEvents JSON line (exact data), a case
        /// file for `plugbus test`.
        #[arg(long, value_name = "FILE")]
        record: Option<PathBuf>,
        /// Print each event's full JSON record, one per line.
        #[arg(long)]
        json: bool,
        /// The host's HTTP API.
        #[arg(long, default_value = "http://127.0.0.1:7070", env = "PLUGBUS_URL")]
        url: String,
    },
    /// Run recorded events (CASES, JSON lines) through a component in the real sandbox and
    /// compare what it does with each case's `expect`. Exit code 0 when all match, 1 when a
    /// case differs (a diff per case is printed), 2 when the input is bad.
    Test {
        /// The component.
        plugin: PathBuf,
        /// The case file: lines of recorded events (`plugbus tail --record`) or
        /// `{"event", "kv", "expect"}` cases.
        cases: PathBuf,
        /// A value for the plugin's `config` import, as KEY=VALUE (repeatable).
        #[arg(long = "plugin-config", value_name = "KEY=VALUE")]
        plugin_config: Vec<String>,
        /// Rewrite the case file with what the component does now as each case's expectation.
        #[arg(long)]
        update: bool,
        /// Apply this config file's limits.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// List the plugins of a running host, with their state and counters (a table; `--json` for
    /// the API's answer).
    Plugins {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// The host's HTTP API.
        #[arg(long, default_value = "http://127.0.0.1:7070", env = "PLUGBUS_URL")]
        url: String,
    },
    /// Watch a handler crate: rebuild it for wasm32-wasip2 on save and deploy it to a host,
    /// one line per rebuild (`built in N s, live in M ms`, the compile error, or the refusal).
    Dev {
        /// The handler crate.
        #[arg(value_name = "CRATE_DIR", default_value = ".")]
        krate: PathBuf,
        /// The running host's plugins folder [default: the one its /v1/plugins names].
        #[arg(long, value_name = "DIR")]
        plugins: Option<PathBuf>,
        /// Run a host on the embedded bus here instead (plugins and data under the crate's
        /// target dir unless --plugins / --data-dir say otherwise).
        #[arg(long)]
        run: bool,
        /// With --run: where the host keeps its state.
        #[arg(long, value_name = "DIR", requires = "run")]
        data_dir: Option<PathBuf>,
        /// With --run: the address of its HTTP API [default: 127.0.0.1:7070].
        #[arg(long, value_name = "ADDR", requires = "run")]
        http: Option<SocketAddr>,
        /// The cargo profile to build with.
        #[arg(long, default_value = "release")]
        profile: String,
        /// Quiet time after the last change before building, e.g. 150ms.
        #[arg(long, default_value = "150ms", value_parser = humantime::parse_duration)]
        debounce: std::time::Duration,
        /// The host's HTTP API (without --run).
        #[arg(long, default_value = "http://127.0.0.1:7070", env = "PLUGBUS_URL", conflicts_with = "run")]
        url: String,
    },
    /// Create a handler crate NAME from the template: build it for wasm32-wasip2 and drop it in.
    New {
        /// The handler's name (also the plugin's name).
        name: String,
        /// Where to create it.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// A local plugbus-sdk crate to depend on [default: `plugbus-sdk = "0.x"` from crates.io,
        /// the series this binary speaks].
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Print a shell completion script (e.g. `plugbus completions bash > /etc/bash_completion.d/plugbus`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), e.g. `plugbus man > plugbus.1`.
    Man,
    /// Internal: compile one component read on stdin under the compile caps, the artifact on
    /// stdout (the host runs this as a child process; see `sandbox::compiler`).
    #[command(name = "compile-child", hide = true)]
    CompileChild {
        /// The sandbox settings, as JSON.
        #[arg(long)]
        settings: String,
        /// The host's process id: the child ends if it is not (or no longer) its parent.
        #[arg(long)]
        parent: u32,
    },
    /// Publish one event to a running host through its HTTP API.
    Publish {
        /// The subject, e.g. `orders.created`.
        subject: String,
        /// The payload (use `-` to read it from stdin).
        data: String,
        /// A header (CloudEvents extension), as NAME=VALUE (repeatable).
        #[arg(short = 'H', long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
        /// Mark the payload as JSON (`content-type: application/json`).
        #[arg(long)]
        json: bool,
        /// The host's HTTP API.
        #[arg(long, default_value = "http://127.0.0.1:7070", env = "PLUGBUS_URL")]
        url: String,
    },
}

/// Logs at `default` (unless `RUST_LOG` says otherwise) to stderr.
/// Flushes the host's queued log lines when dropped ([`plugbus::log_queue::flush`], 2 s at most).
struct FlushedLog;

impl Drop for FlushedLog {
    fn drop(&mut self) {
        plugbus::log_queue::flush(std::time::Duration::from_secs(2));
    }
}

fn init_logging_at(format: LogFormat, default: &str) {
    init_logging_with(format, default, None, false);
}

/// Logs at `default` (unless `RUST_LOG` says otherwise) to stderr and, with `exporter`, turns
/// the host's trace spans into OpenTelemetry spans (their own filter: the log never shows them).
/// With `queued` (the host, `plugbus run`), lines go to stderr from a thread of their own
/// ([`plugbus::log_queue`]): a reader that lags never blocks the runtime's workers.
fn init_logging_with(format: LogFormat, default: &str, exporter: Option<&plugbus::telemetry::Exporter>, queued: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let rust_log = std::env::var("RUST_LOG").ok();
    let filter = EnvFilter::try_new(log_directives(rust_log.as_deref(), default))
        .unwrap_or_else(|_| EnvFilter::new(log_directives(None, default)));
    let off = format!("{}=off", plugbus::telemetry::TARGET).parse().expect("a valid directive");
    let filter = filter.add_directive(off);
    let log_level = log_max_level(&filter);
    // Above a progress bar while one is drawn; escapes only on a terminal without NO_COLOR.
    let queued = queued && plugbus::log_queue::start(cli::LogWriter).is_ok();
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(move || match queued {
            true => cli::LogLines::Queued,
            false => cli::LogLines::Direct,
        })
        .with_ansi(cli::colour(std::io::IsTerminal::is_terminal(&std::io::stderr())));
    let fmt = match format {
        LogFormat::Pretty => fmt.compact().fmt_fields(plugbus::log_fields::OneLineFields).with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    let otel = exporter.map(|e| e.layer());
    tracing_subscriber::registry().with(fmt).with(otel).init();
    // `init` let through `log` (the crate) whatever any layer might want: with an exporter, the
    // TRACE its spans need. Then every `log::trace!` of wasmtime's compiler passed `log`'s static
    // check and was dispatched, to be dropped by the filter one record at a time; a third of the
    // compile time of a host with an exporter, in a profile of the end-to-end tests. The
    // exporter takes no `log` records, so only the log's own filter decides.
    log::set_max_level(log_level);
}

/// The log's filter directives: `RUST_LOG` when set (else `default`), with async-nats at `warn`
/// unless they name it. async-nats logs each of its connection events at info, one per message a
/// full subscription drops: plugbus tells those itself (counted, once), and `RUST_LOG=debug`, asked
/// for plugbus's own detail, would otherwise bring a line per dropped message back.
fn log_directives(rust_log: Option<&str>, default: &str) -> String {
    let asked = rust_log.map(str::trim).filter(|d| !d.is_empty()).unwrap_or(default);
    if asked.contains("async_nats") { asked.to_string() } else { format!("{asked},async_nats=warn") }
}

/// The most verbose level `filter` lets through, for the `log` crate's static check.
fn log_max_level(filter: &tracing_subscriber::EnvFilter) -> log::LevelFilter {
    use tracing_subscriber::filter::LevelFilter;
    match filter.max_level_hint() {
        Some(LevelFilter::OFF) => log::LevelFilter::Off,
        Some(LevelFilter::ERROR) => log::LevelFilter::Error,
        Some(LevelFilter::WARN) => log::LevelFilter::Warn,
        Some(LevelFilter::INFO) => log::LevelFilter::Info,
        Some(LevelFilter::DEBUG) => log::LevelFilter::Debug,
        Some(_) | None => log::LevelFilter::Trace,
    }
}

/// mimalloc rather than glibc malloc: events are allocated on one worker thread and freed on
/// another, and glibc's arena locks made workers sleep on each other (`__lll_lock_wait_private`
/// was 18% of the context switches in the embedded-1 bench); with mimalloc embedded-1 went from
/// 53.9k to 62.3k events/s on 2 cores (same machine, same day).
///
/// It asks the kernel for transparent huge pages (`madvise`), which makes a whole 2 MiB page
/// resident for a few small allocations in it. `MIMALLOC_ALLOW_THP=0` in the environment turns
/// that off for the process (README, "Memory"): `plugbus run` (release) with the five example
/// plugins then held 29 MiB idle instead of 60-64, and `plugbus-bench` spent 3-5% more CPU per
/// event, on the host and on its wasm floors alike (same machine, alternated).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Runs the command; a user error (a bad flag value, a host that is not there, a refusal) is
/// one line with its causes and exit code 1, never a backtrace: `RUST_BACKTRACE` only shows
/// on a panic (a bug).
/// The config (`Config::load`), compiling plugins in child processes of this binary under the
/// compile caps (`sandbox::compiler`).
fn load_config(file: Option<&std::path::Path>) -> anyhow::Result<Config> {
    let mut config = Config::load(file)?;
    // Every command that compiles refuses caps too low to compile anything (not only `run`),
    // and runs plugins only within bounded limits (review 56f: `plugbus test` ran with limits
    // `plugbus run` refused).
    config.sandbox.validate().map_err(anyhow::Error::msg)?;
    config.validate_plugin_settings()?;
    // The running binary itself, even once an upgrade replaced or deleted its file: a newer
    // binary's artifacts would not load in this one.
    let this = std::path::PathBuf::from("/proc/self/exe");
    config.sandbox.compiler = Some(match this.exists() {
        true => this,
        false => std::env::current_exe().context("finding this binary, which compiles plugins in a child process")?,
    });
    Ok(config)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The compiling child: no runtime, no logging, nothing but the compile.
    if let Command::CompileChild { settings, parent } = &cli.command {
        return plugbus::sandbox::compiler::child_main(settings, *parent);
    }
    let runtime = match plugbus::runtime::build() {
        Ok(rt) => rt,
        Err(e) => {
            cli::report_error(&anyhow::Error::new(e).context("starting the async runtime"));
            return std::process::ExitCode::FAILURE;
        }
    };
    // The host's log lines still queued go out before the process ends, an error report after
    // them (and on a panic out of the run too).
    let flushed = FlushedLog;
    let ran = runtime.block_on(run(cli));
    drop(flushed);
    match ran {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            cli::report_error(&e);
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => {
            let mut config = args.config()?;
            // OpenTelemetry traces when an OTLP endpoint is set (`[telemetry] otlp_endpoint`,
            // `OTEL_EXPORTER_OTLP_ENDPOINT`); off and free otherwise.
            let exporter = match plugbus::telemetry::Exporter::start(&config.telemetry) {
                Ok(e) => e,
                Err(e) => {
                    init_logging_at(cli.log_format, "info");
                    return Err(e);
                }
            };
            init_logging_with(cli.log_format, "info", exporter.as_ref(), true);
            if let Some(e) = &exporter {
                tracing::info!(endpoint = %e.endpoint, "exporting OpenTelemetry traces (OTLP/HTTP protobuf)");
            }
            if cli.api_token.is_some() {
                config.api_token = cli.api_token.clone();
            }
            let progress = cli::Progress::new("loading plugins", matches!(cli.log_format, LogFormat::Json));
            let on_load = |done: usize, total: usize, file: Option<&std::path::Path>| {
                // One plugin is not worth a bar.
                if total > 1 {
                    progress.update(
                        done,
                        total,
                        &file.and_then(|f| f.file_name()).unwrap_or_default().to_string_lossy(),
                    );
                }
            };
            // Loading is bounded: each file by its compile's wall-clock bound (and a few at once).
            let files = plugbus::loader::wasm_files(&config.plugins_dir).map_or(0, |f| f.len()) as u32;
            let loading =
                plugbus::service::loading(plugbus::sandbox::compiler::wall_cap(&config.sandbox) * (files + 1));
            let host = Host::start_reporting(config, &on_load).await;
            loading.inspect(tokio::task::JoinHandle::abort);
            drop(progress);
            let host = std::sync::Arc::new(host?);
            plugbus::service::ready(&host);
            let watchdog = plugbus::service::watchdog(&host);
            let signal = wait_for_stop_signal().await?;
            tracing::info!(signal, "stopping: draining (a second signal stops at once)");
            plugbus::service::stopping();
            if let Some(w) = watchdog {
                w.abort();
            }
            let host = std::sync::Arc::into_inner(host).context("the host is still shared at the stop")?;
            tokio::select! {
                _ = host.shutdown() => {}
                second = wait_for_stop_signal() => {
                    tracing::warn!(signal = second?, "second signal: exiting without finishing the drain");
                    plugbus::log_queue::flush(std::time::Duration::from_secs(2));
                    std::process::exit(130);
                }
            }
            // The spans still buffered go out before the process ends.
            if let Some(e) = exporter {
                let _ = tokio::task::spawn_blocking(move || e.shutdown()).await;
            }
            Ok(())
        }
        Command::Inspect { file, json, config } if file.is_dir() => {
            let config = load_config(config.as_deref())?;
            let loadable = inspect_folder(&file, json, &config).await?;
            std::process::exit(if loadable { 0 } else { 1 });
        }
        Command::Inspect { file, json, config } => {
            let config = load_config(config.as_deref())?;
            // The loader's own reader: a regular file (or a symlink to one) of at most
            // max_wasm_bytes; a FIFO or device is refused, never waited on.
            let bytes = plugbus::loader::read_plugin_file(&file, config.max_wasm_bytes)
                .with_context(|| format!("reading {}", file.display()))?;
            let sandbox = plugbus::loader::tool_sandbox(&config)?;
            let report = plugbus::inspect::inspect(&sandbox, &file.display().to_string(), &bytes, &config).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{}", cli::printable(&report.to_string()));
            }
            std::process::exit(if report.loadable { 0 } else { 1 });
        }
        Command::Tail { pattern, url, record, json } => {
            tail(&client(cli.api_token.as_deref())?, &url, &pattern, record.as_deref(), json).await
        }
        Command::Test { plugin, cases, plugin_config, update, config } => {
            // Warnings (a refused publish, a cut log) on stderr; the handler's own log lines
            // with RUST_LOG=info.
            init_logging_at(cli.log_format, "warn");
            let code = match test_cases(&plugin, &cases, &plugin_config, update, config.as_deref()).await {
                Ok(true) => 0,
                Ok(false) => 1,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    2
                }
            };
            std::process::exit(code);
        }
        Command::Plugins { url, json } => plugins(&client(cli.api_token.as_deref())?, &url, json).await,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "plugbus", &mut std::io::stdout());
            Ok(())
        }
        Command::CompileChild { .. } => anyhow::bail!("compile-child runs before the async runtime starts (see main)"),
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout()).context("writing the man page")
        }
        Command::Dev { krate, plugins, run, data_dir, http, profile, debounce, url } => {
            let mut opts = plugbus::dev::Options {
                krate,
                plugins,
                url,
                profile,
                debounce,
                live_timeout: std::time::Duration::from_secs(10),
            };
            let client = client(cli.api_token.as_deref())?;
            let print = |line: &str| println!("{line}");
            if !run {
                return tokio::select! {
                    r = plugbus::dev::watch(&client, &opts, print) => r,
                    s = wait_for_stop_signal() => s.map(|_| ()),
                };
            }
            init_logging_at(cli.log_format, "warn");
            let krate = plugbus::dev::Crate::read(&opts.krate)?;
            let home = krate.target_dir.join("plugbus-dev");
            let plugins = opts.plugins.clone().unwrap_or_else(|| home.join("plugins"));
            std::fs::create_dir_all(&plugins).with_context(|| format!("creating {}", plugins.display()))?;
            let mut config = load_config(None)?;
            // This host compiles each build within its wall-clock bound or refuses it (a refusal
            // is seen at once): a busy machine's compile is waited for, not reported as a host
            // that does not watch the folder.
            let compile_bound = plugbus::sandbox::compiler::wall_cap(&config.sandbox);
            opts.live_timeout = opts.live_timeout.max(compile_bound + std::time::Duration::from_secs(5));
            config.plugins_dir = plugins.clone();
            config.data_dir = data_dir.unwrap_or_else(|| home.join("data"));
            config.http = Some(http.unwrap_or_else(|| "127.0.0.1:7070".parse().expect("an address")));
            config.api_token = cli.api_token.clone();
            let host = Host::start(config).await?;
            opts.url = format!("http://{}", host.http_addr().context("the host has no HTTP API")?);
            opts.plugins = Some(plugins);
            let result = tokio::select! {
                r = plugbus::dev::watch(&client, &opts, print) => r,
                s = wait_for_stop_signal() => s.map(|_| ()),
            };
            host.shutdown().await;
            result
        }
        Command::New { name, dir, sdk } => {
            let sdk_flag_was_none = sdk.is_none();
            let created = plugbus::scaffold::new_handler(&name, &dir, &plugbus::scaffold::Sdk::from_flag(sdk))?;
            println!("created {}", created.display());
            if sdk_flag_was_none {
                println!("it depends on plugbus-sdk from crates.io (--sdk PATH for a local SDK checkout)");
            }
            println!("next: cd {} && cargo test && plugbus dev --run", created.display());
            Ok(())
        }
        Command::Replay { plugin, from, url } => {
            let client = client(cli.api_token.as_deref())?;
            let req = client.post(api_url(&url, &["v1", "replay"])?).query(&[("plugin", plugin.as_str())]);
            let req = req.query(&[("from", from.as_str())]);
            let body: serde_json::Value = send(req, &url).await?.json().await.unwrap_or_default();
            println!("{}", serde_json::to_string_pretty(&body)?);
            Ok(())
        }
        Command::Dlq { action, plugin, url } => {
            dlq(&client(cli.api_token.as_deref())?, &url, action, plugin.as_deref()).await
        }
        Command::Publish { subject, data, headers, json, url } => {
            publish(&client(cli.api_token.as_deref())?, &url, &subject, data, &headers, json).await
        }
    }
}

async fn publish(
    client: &reqwest::Client,
    url: &str,
    subject: &str,
    data: String,
    headers: &[String],
    json: bool,
) -> anyhow::Result<()> {
    let data = if data == "-" {
        let mut buf = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut buf).context("reading the payload from stdin")?;
        buf
    } else {
        data
    };
    let mut req = client.post(api_url(url, &["v1", "events", subject])?).body(data);
    if json {
        req = req.header("content-type", "application/json");
    }
    for h in headers {
        let (k, v) = h.split_once('=').with_context(|| format!("-H {h:?}: expected NAME=VALUE"))?;
        req = req.header(format!("ce-{}", k.trim()), v.trim());
    }
    let body: serde_json::Value = send(req, url).await?.json().await.unwrap_or_default();
    println!("{}", body["id"].as_str().unwrap_or_default());
    Ok(())
}

/// Waits for SIGINT (Ctrl-C) or SIGTERM (systemd's stop).
async fn wait_for_stop_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.map(|_| "SIGINT").context("waiting for Ctrl-C"),
        _ = term.recv() => Ok("SIGTERM"),
    }
}

/// `plugbus test`: Ok(whether every case met its expectation).
async fn test_cases(
    plugin: &std::path::Path,
    cases: &std::path::Path,
    plugin_config: &[String],
    update: bool,
    config: Option<&std::path::Path>,
) -> anyhow::Result<bool> {
    let config = load_config(config).context("reading the config")?;
    let mut values = Vec::with_capacity(plugin_config.len());
    for entry in plugin_config {
        let (k, v) = entry.split_once('=').with_context(|| format!("--plugin-config {entry:?}: expected KEY=VALUE"))?;
        values.push((k.to_string(), v.to_string()));
    }
    let runner = plugbus::casetest::Runner::load(plugin, &config, &values).await?;
    let report = plugbus::casetest::test_file(&runner, cases, update).await?;
    print!("{}", cli::printable(&report.to_string()));
    Ok(report.passed())
}

/// `plugbus inspect DIR`: every `*.wasm` of the folder, with a progress bar on a terminal
/// (compiling takes seconds each); a file the loader would not read is a report with that
/// reason. Whether every file is loadable.
async fn inspect_folder(dir: &std::path::Path, json: bool, config: &Config) -> anyhow::Result<bool> {
    let files = plugbus::loader::wasm_files(dir).with_context(|| format!("reading the folder {}", dir.display()))?;
    let sandbox = plugbus::loader::tool_sandbox(config)?;
    let progress = cli::Progress::new("inspecting", false);
    let mut reports = Vec::with_capacity(files.len());
    for (done, file) in files.iter().enumerate() {
        let name = file.display().to_string();
        progress.update(done, files.len(), &file.file_name().unwrap_or_default().to_string_lossy());
        let report = match plugbus::loader::read_plugin_file(file, config.max_wasm_bytes) {
            Ok(bytes) => plugbus::inspect::inspect(&sandbox, &name, &bytes, config).await,
            Err(e) => plugbus::inspect::unreadable(&name, &e.to_string()),
        };
        reports.push(report);
    }
    drop(progress);
    if json {
        println!("{}", serde_json::to_string_pretty(&reports)?);
    } else if reports.is_empty() {
        println!("no *.wasm files in {}", dir.display());
    } else {
        let texts: Vec<String> = reports.iter().map(|r| r.to_string()).collect();
        println!("{}", cli::printable(&texts.join("\n")));
    }
    Ok(reports.iter().all(|r| r.loadable))
}

async fn dlq(client: &reqwest::Client, url: &str, action: DlqAction, plugin: Option<&str>) -> anyhow::Result<()> {
    if let (DlqAction::Replay { id: Some(_), .. }, Some(_)) = (&action, plugin) {
        anyhow::bail!("--id and --plugin cannot be used together: --id names one dead letter");
    }
    let (req, json) = match &action {
        DlqAction::Debug { id, against, json } => {
            let req = client.post(api_url(url, &["v1", "dlq", id, "debug"])?);
            let req = match against {
                Some(path) => {
                    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                    req.header(reqwest::header::CONTENT_TYPE, "application/wasm").body(bytes)
                }
                None => req,
            };
            let body: serde_json::Value = send(req, url).await?.json().await.context("reading the host's answer")?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&body)?);
            } else {
                println!("{}", cli::debug_report(&body));
            }
            return Ok(());
        }
        DlqAction::Export => {
            let req = client.get(api_url(url, &["v1", "dlq"])?);
            let req = match plugin {
                Some(p) => req.query(&[("plugin", p)]),
                None => req,
            };
            let summary = req.try_clone().context("a listing request")?.query(&[("summary", "true")]);
            let body: serde_json::Value = send(req, url).await?.json().await.context("reading the dead letters")?;
            let mut out = std::io::stdout().lock();
            let mut export = |entry: &serde_json::Value| -> anyhow::Result<()> {
                let omitted = entry["event"]["headers"].as_array().into_iter().flatten().any(|pair| {
                    pair.get(0).and_then(serde_json::Value::as_str) == Some(plugbus::deadletter::headers::DATA_OMITTED)
                });
                let case = match plugbus::casetest::dlq::case_from_entry(entry) {
                    // Said and passed over: the others are exported.
                    Err(e) if omitted => {
                        let id = plugbus::event::one_line_cut(entry["event"]["id"].as_str().unwrap_or("?"), 200);
                        eprintln!("dead letter {}: not exported: {}", cli::printable(&id), cli::printable(&e));
                        return Ok(());
                    }
                    other => other.map_err(|e| anyhow::anyhow!("dead letter {}: {e}", entry["event"]["id"]))?,
                };
                if case["dead_letter"]["failed_by_the_handler"] == false {
                    eprintln!(
                        "dead letter {}: not the handler's failure ({}): exported expecting ok",
                        cli::printable(&plugbus::event::one_line_cut(
                            entry["event"]["id"].as_str().unwrap_or("?"),
                            200
                        )),
                        cli::printable(&plugbus::event::one_line_cut(
                            case["dead_letter"]["error"].as_str().unwrap_or(""),
                            200
                        ))
                    );
                }
                std::io::Write::write_all(&mut out, format!("{case}\n").as_bytes()).context("writing to stdout")
            };
            let listed: Vec<&serde_json::Value> = body["dead_letters"].as_array().into_iter().flatten().collect();
            for entry in &listed {
                export(entry)?;
            }
            if body["left_out"].as_u64().unwrap_or(0) == 0 {
                return Ok(());
            }
            // The listing had no room for some (one holds at most 16 MiB of JSON): the summary
            // names them, and each is fetched by itself.
            let done: std::collections::HashSet<&str> =
                listed.iter().filter_map(|e| e["event"]["id"].as_str()).collect();
            let names: serde_json::Value =
                send(summary, url).await?.json().await.context("reading the dead letters")?;
            for id in names["dead_letters"].as_array().into_iter().flatten().filter_map(|e| e["event"]["id"].as_str()) {
                if done.contains(id) {
                    continue;
                }
                let resp = send(client.get(api_url(url, &["v1", "dlq", id])?), url).await?;
                let one: serde_json::Value = resp.json().await.with_context(|| format!("reading dead letter {id}"))?;
                export(&one["dead_letter"])?;
            }
            if let Some(n) = names["left_out"].as_u64().filter(|n| *n > 0) {
                anyhow::bail!(
                    "{n} dead letter(s) were left out: even their summaries pass 16 MiB (export per plugin with --plugin)"
                );
            }
            return Ok(());
        }
        // The table shows no data: the summary is enough, and lists far more in 16 MiB.
        DlqAction::List { json: false } => {
            (client.get(api_url(url, &["v1", "dlq"])?).query(&[("summary", "true")]), false)
        }
        DlqAction::List { json } => (client.get(api_url(url, &["v1", "dlq"])?), *json),
        DlqAction::Replay { id: Some(id), json } => (client.post(api_url(url, &["v1", "dlq", id, "replay"])?), *json),
        DlqAction::Replay { id: None, json: false }
            if cli::progress_shown(std::io::IsTerminal::is_terminal(&std::io::stderr()), false) =>
        {
            return replay_with_progress(client, url, plugin).await;
        }
        DlqAction::Replay { id: None, json } => (client.post(api_url(url, &["v1", "dlq", "replay"])?), *json),
    };
    let req = match plugin {
        Some(p) => req.query(&[("plugin", p)]),
        None => req,
    };
    let body: serde_json::Value = send(req, url).await?.json().await.context("reading the host's answer")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else if matches!(action, DlqAction::List { .. }) {
        println!("{}", cli::dlq_table(&body));
    } else {
        println!("{}", cli::replay_summary(&body));
    }
    Ok(())
}

/// `plugbus dlq replay` on a terminal: the kept dead letters one by one with a progress bar.
/// Only when the host alone keeps them all (the embedded bus): a dead letter a broker keeps too
/// is left to the one bulk replay, which replays it from the broker once.
async fn replay_with_progress(client: &reqwest::Client, url: &str, plugin: Option<&str>) -> anyhow::Result<()> {
    let with_plugin = |req: reqwest::RequestBuilder| match plugin {
        Some(p) => req.query(&[("plugin", p)]),
        None => req,
    };
    let listed = client.get(api_url(url, &["v1", "dlq"])?).query(&[("summary", "true")]);
    let listed: serde_json::Value =
        send(with_plugin(listed), url).await?.json().await.context("reading the dead letters")?;
    let letters: Vec<&serde_json::Value> = listed["dead_letters"].as_array().into_iter().flatten().collect();
    // One by one only when the listing holds them all; else the one bulk replay takes them all.
    let all_listed = listed["left_out"].as_u64().unwrap_or(0) == 0;
    if !all_listed || letters.iter().any(|d| d["kept_by"] != "host") {
        let req = with_plugin(client.post(api_url(url, &["v1", "dlq", "replay"])?));
        let body: serde_json::Value = send(req, url).await?.json().await.context("reading the host's answer")?;
        println!("{}", cli::replay_summary(&body));
        return Ok(());
    }
    let progress = cli::Progress::new("replaying", false);
    let (mut replayed, mut failed, mut refused) = (Vec::new(), 0u64, Vec::new());
    // As the bulk replay does (`plugbus::replay_report`): once a target's replays were not taken
    // in time `STRIKES` times in a row, its other dead letters are kept untried (each would wait
    // `api.publish_timeout`).
    use plugbus::replay_report::{GivingUp, Target};
    let (mut giving_up, mut not_taken) = (GivingUp::default(), 0u64);
    for (done, d) in letters.iter().enumerate() {
        let id = d["event"]["id"].as_str().unwrap_or_default();
        progress.update(done, letters.len(), id);
        // One never replayable is answered 422 below, before any strike.
        let listed_plugin = || Target::Plugin(d["plugin"].as_str().unwrap_or_default().to_string());
        let target = Target::of_dead_letter(&listed_event(&d["event"])).unwrap_or_else(listed_plugin);
        if giving_up.skips(&target) {
            failed += 1;
            continue;
        }
        let resp = client.post(api_url(url, &["v1", "dlq", id, "replay"])?).send().await;
        let resp = resp.with_context(|| format!("no plugbus host answering at {url}"))?;
        match resp.status().as_u16() {
            // Replayed by someone else meanwhile: nothing left to do for it.
            404 => {}
            // Never replayable: kept, and why.
            422 => {
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                let error = body["error"].as_str().unwrap_or("not replayable");
                let why = error.split_once("and is kept: ").map_or(error, |(_, why)| why);
                refused.push(serde_json::json!({ "dead_letter": id, "why": why }));
            }
            _ => {
                let body: serde_json::Value = resp.json().await.unwrap_or_default();
                replayed.extend(body["replayed"].as_array().cloned().unwrap_or_default());
                failed += body["failed"].as_u64().unwrap_or(1);
                let late = body["not_taken"].as_u64().unwrap_or(0);
                not_taken += late;
                // A failure about the one event (or the connection) neither counts nor resets.
                if late > 0 {
                    giving_up.not_taken(target, "not taken within api.publish_timeout (see the host's log)");
                } else if body["replayed"].as_array().is_some_and(|r| !r.is_empty()) {
                    giving_up.taken(&target);
                }
            }
        }
    }
    drop(progress);
    let report = serde_json::json!({ "replayed": replayed, "failed": failed, "not_taken": not_taken,
        "untried": giving_up.untried(), "gave_up": giving_up.to_json(), "refused": refused });
    println!("{}", cli::replay_summary(&report));
    Ok(())
}

/// The dead-letter event of a listed dead letter (its id, subject and headers: what a summary
/// has), to find whom its replay is for.
fn listed_event(ev: &serde_json::Value) -> plugbus::Event {
    let mut event = plugbus::Event::new(ev["subject"].as_str().unwrap_or_default(), Vec::new());
    event.id = ev["id"].as_str().unwrap_or_default().to_string();
    event.extensions = serde_json::from_value(ev["headers"].clone()).unwrap_or_default();
    event
}

/// `url` with these path segments appended (each percent-encoded: a subject may hold `>`).
fn api_url(url: &str, segments: &[&str]) -> anyhow::Result<reqwest::Url> {
    // A URL's path drops `.` and `..` segments (percent-encoded too): `dlq replay .` asked
    // `POST /v1/dlq/replay`, a replay of every plugin's dead letters (review 60a L4).
    if let Some(dot) = segments.iter().find(|s| matches!(**s, "." | "..")) {
        anyhow::bail!("{dot:?} cannot be sent in a URL path (it would be read as a step of the path, not as a name)");
    }
    let mut endpoint = reqwest::Url::parse(url).with_context(|| format!("--url {url:?} is not a URL"))?;
    endpoint
        .path_segments_mut()
        .map_err(|_| anyhow::anyhow!("--url {url:?} cannot take a path"))?
        .pop_if_empty()
        .extend(segments);
    Ok(endpoint)
}

/// How long, in all, the CLI asks again a host that answers a `GET` with `503` and `Retry-After`
/// (busy: this address's share of connections taken, the dead-letter listings' turns, the live
/// tails all open), before it reports the refusal.
const BUSY_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

/// Sends a request to the host; an unreachable host and a refusal (with the host's reason)
/// are errors. A `GET` answered `503` with `Retry-After` (the host says when to ask again) is
/// asked again after that wait (1 to 5 s), for up to [`BUSY_PATIENCE`], saying so on stderr.
/// Nothing else is: a publish the bus did not take in time may have been taken meanwhile (sent
/// again, it would run twice), and a replay or a rewind is not for a client to repeat unasked.
async fn send(req: reqwest::RequestBuilder, url: &str) -> anyhow::Result<reqwest::Response> {
    let started = std::time::Instant::now();
    let is_get = req.try_clone().and_then(|r| r.build().ok()).is_some_and(|r| *r.method() == reqwest::Method::GET);
    let mut req = req;
    loop {
        // (A request whose body is a stream cannot be sent twice: it is not asked again.)
        let again = if is_get { req.try_clone() } else { None };
        let resp = req.send().await.with_context(|| format!("no plugbus host answering at {url}"))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let wait = busy_wait(&resp).filter(|wait| started.elapsed() + *wait <= BUSY_PATIENCE);
        let why = refusal_reason(resp).await;
        match (again, wait) {
            (Some(again), Some(wait)) => {
                eprintln!(
                    "the host is busy ({status}): {}; asking again in {} s",
                    cli::printable(&why),
                    wait.as_secs()
                );
                tokio::time::sleep(wait).await;
                req = again;
            }
            _ => anyhow::bail!("the host refused ({status}): {why}"),
        }
    }
}

/// Why the host refused: its JSON answer's `error`, or the answer's text (a connection refused
/// before any route answers in plain text), on one line, cut at 512 bytes.
async fn refusal_reason(resp: reqwest::Response) -> String {
    let text = resp.text().await.unwrap_or_default();
    let why = match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(body) => body["error"].as_str().unwrap_or("no reason given").to_string(),
        Err(_) if text.trim().is_empty() => "no reason given".to_string(),
        Err(_) => text.trim().to_string(),
    };
    plugbus::event::one_line_cut(&why, 512)
}

/// The wait a `503` answer asks for (`Retry-After` in whole seconds, taken as 1 to 5 s); `None`
/// for any other answer, or one without the header (a dated `Retry-After` is not asked again).
fn busy_wait(resp: &reqwest::Response) -> Option<std::time::Duration> {
    if resp.status() != reqwest::StatusCode::SERVICE_UNAVAILABLE {
        return None;
    }
    let seconds: u64 = resp.headers().get(reqwest::header::RETRY_AFTER)?.to_str().ok()?.trim().parse().ok()?;
    Some(std::time::Duration::from_secs(seconds.clamp(1, 5)))
}

/// An HTTP client that sends the API token on every request, when there is one.
fn client(token: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .context("the API token is not a valid header value")?;
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder().default_headers(headers).build()?)
}

async fn tail(
    client: &reqwest::Client,
    url: &str,
    pattern: &str,
    record: Option<&std::path::Path>,
    json: bool,
) -> anyhow::Result<()> {
    use futures::StreamExt;
    use std::io::{IsTerminal, Write};
    let colour = cli::colour(std::io::stdout().is_terminal());
    let mut req = client.get(api_url(url, &["v1", "events", pattern])?);
    let mut file = match record {
        Some(path) => {
            req = req.query(&[("format", "cloudevents")]);
            let f = std::fs::OpenOptions::new().create(true).append(true).open(path);
            Some(f.with_context(|| format!("--record {}: cannot open it for writing", path.display()))?)
        }
        None => None,
    };
    let resp = send(req, url).await?;
    let mut stream = resp.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = stream.next().await {
        buf.extend_from_slice(&chunk.context("the stream broke")?);
        for line in cli::complete_lines(&mut buf)? {
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                if let (Some(f), Some(path)) = (file.as_mut(), record) {
                    // One write per line, straight to the file: a stopped tail keeps every line.
                    f.write_all(format!("{data}\n").as_bytes())
                        .with_context(|| format!("--record {}: writing failed", path.display()))?;
                }
                let shown = match serde_json::from_str::<serde_json::Value>(data) {
                    Ok(record) if !json => cli::tail_line(&record, colour),
                    _ => data.to_string(),
                };
                // A closed pipe (`plugbus tail '>' | head`) ends the tail quietly.
                if writeln!(std::io::stdout(), "{shown}").is_err() {
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

async fn plugins(client: &reqwest::Client, url: &str, json: bool) -> anyhow::Result<()> {
    let body: serde_json::Value = send(client.get(api_url(url, &["v1", "plugins"])?), url)
        .await?
        .json()
        .await
        .context("reading the host's answer")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
    } else {
        println!("{}", cli::plugins_table(&body));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{api_url, busy_wait, log_directives, log_max_level};

    /// Review 60a L4: an id of `.` or `..` vanished from the path (`dlq replay .` replayed every
    /// plugin's dead letters).
    #[test]
    fn a_dot_segment_is_refused_not_dropped_from_the_path() {
        let ok = api_url("http://127.0.0.1:8080", &["v1", "dlq", "a.b", "replay"]).unwrap();
        assert_eq!(ok.path(), "/v1/dlq/a.b/replay");
        for dot in [".", ".."] {
            let why = api_url("http://127.0.0.1:8080", &["v1", "dlq", dot, "replay"]).unwrap_err().to_string();
            assert!(why.contains(&format!("{dot:?} cannot be sent in a URL path")), "{why}");
        }
    }
    use std::time::Duration;
    use tracing_subscriber::EnvFilter;

    #[test]
    fn only_a_503_with_retry_after_in_seconds_is_asked_again_within_one_to_five_seconds() {
        let answer = |status: u16, retry_after: Option<&str>| {
            let mut resp = http::Response::builder().status(status);
            if let Some(v) = retry_after {
                resp = resp.header("retry-after", v);
            }
            reqwest::Response::from(resp.body(Vec::<u8>::new()).unwrap())
        };
        assert_eq!(busy_wait(&answer(503, Some("1"))), Some(Duration::from_secs(1)));
        assert_eq!(busy_wait(&answer(503, Some(" 3 "))), Some(Duration::from_secs(3)));
        assert_eq!(busy_wait(&answer(503, Some("0"))), Some(Duration::from_secs(1)));
        assert_eq!(busy_wait(&answer(503, Some("3600"))), Some(Duration::from_secs(5)));
        assert_eq!(busy_wait(&answer(503, Some("Wed, 21 Oct 2026 07:28:00 GMT"))), None);
        assert_eq!(busy_wait(&answer(503, None)), None);
        assert_eq!(busy_wait(&answer(429, Some("1"))), None);
        assert_eq!(busy_wait(&answer(500, Some("1"))), None);
    }

    #[test]
    fn async_nats_logs_warnings_only_unless_rust_log_names_it() {
        assert_eq!(log_directives(None, "info"), "info,async_nats=warn");
        assert_eq!(log_directives(Some("debug"), "info"), "debug,async_nats=warn");
        assert_eq!(log_directives(Some("  "), "info"), "info,async_nats=warn");
        assert_eq!(log_directives(Some("info,async_nats=debug"), "info"), "info,async_nats=debug");
        // What the filter then lets through: plugbus's debug lines, not async-nats's info ones.
        let filter = EnvFilter::new(log_directives(Some("debug"), "info"));
        assert_eq!(filter.to_string().matches("async_nats=warn").count(), 1, "{filter}");
    }

    #[test]
    fn dependencies_log_records_only_up_to_the_most_verbose_level_the_filter_shows() {
        for (directives, level) in [
            ("info", log::LevelFilter::Info),
            ("warn,plugbus::telemetry=off", log::LevelFilter::Warn),
            ("info,plugbus::dispatch=debug", log::LevelFilter::Debug),
            ("info,cranelift_codegen=trace", log::LevelFilter::Trace),
            ("off", log::LevelFilter::Off),
        ] {
            assert_eq!(log_max_level(&EnvFilter::new(directives)), level, "{directives}");
        }
    }
}
