//! The `plugbus` command line: run the host, publish an event.

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
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

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum DlqAction {
    /// Print the kept dead letters as JSON.
    List,
    /// Re-publish the kept dead letters to their original subjects (with fresh ids).
    Replay,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Pretty,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the host: load every plugin in the folder, subscribe, serve events until stopped.
    Run {
        /// The plugins folder.
        #[arg(long, default_value = "plugins", env = "PLUGBUS_PLUGINS")]
        plugins: PathBuf,
        /// Address of the HTTP API (event ingress, health, plugin list).
        #[arg(long, default_value = "127.0.0.1:7070", env = "PLUGBUS_HTTP")]
        http: SocketAddr,
        /// Operator config for a plugin, as PLUGIN.KEY=VALUE (repeatable); the plugin reads it
        /// through `plugbus_sdk::config::get("KEY")`.
        #[arg(long = "plugin-config", value_name = "PLUGIN.KEY=VALUE")]
        plugin_config: Vec<String>,
    },
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

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Pretty => builder.compact().init(),
        LogFormat::Json => builder.json().init(),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { plugins, http, plugin_config } => {
            init_logging(cli.log_format);
            let mut config = Config { plugins_dir: plugins, http: Some(http), ..Config::default() };
            for entry in plugin_config {
                let (key, value) = entry
                    .split_once('=')
                    .with_context(|| format!("--plugin-config {entry:?}: expected PLUGIN.KEY=VALUE"))?;
                let (plugin, key) = key
                    .split_once('.')
                    .with_context(|| format!("--plugin-config {entry:?}: expected PLUGIN.KEY=VALUE"))?;
                config.plugins.entry(plugin.to_string()).or_default().config.insert(key.into(), value.into());
            }
            let host = Host::start(config).await?;
            let signal = wait_for_stop_signal().await?;
            tracing::info!(signal, "stopping: draining (a second signal stops at once)");
            tokio::select! {
                _ = host.shutdown() => Ok(()),
                second = wait_for_stop_signal() => {
                    tracing::warn!(signal = second?, "second signal: exiting without finishing the drain");
                    std::process::exit(130);
                }
            }
        }
        Command::Dlq { action, plugin, url } => dlq(&url, action, plugin.as_deref()).await,
        Command::Publish { subject, data, headers, json, url } => publish(&url, &subject, data, &headers, json).await,
    }
}

async fn publish(url: &str, subject: &str, data: String, headers: &[String], json: bool) -> anyhow::Result<()> {
    let data = if data == "-" {
        let mut buf = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut buf).context("reading the payload from stdin")?;
        buf
    } else {
        data
    };
    let mut endpoint = reqwest::Url::parse(url).with_context(|| format!("--url {url:?} is not a URL"))?;
    endpoint
        .path_segments_mut()
        .map_err(|_| anyhow::anyhow!("--url {url:?} cannot take a path"))?
        .pop_if_empty()
        .extend(["v1", "events", subject]);
    let mut req = reqwest::Client::new().post(endpoint).body(data);
    if json {
        req = req.header("content-type", "application/json");
    }
    for h in headers {
        let (k, v) = h.split_once('=').with_context(|| format!("-H {h:?}: expected NAME=VALUE"))?;
        req = req.header(format!("ce-{}", k.trim()), v.trim());
    }
    let resp = req.send().await.with_context(|| format!("no plugbus host answering at {url}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("the host refused the event ({status}): {}", body["error"].as_str().unwrap_or("no reason given"));
    }
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

async fn dlq(url: &str, action: DlqAction, plugin: Option<&str>) -> anyhow::Result<()> {
    let base = url.trim_end_matches('/');
    let client = reqwest::Client::new();
    let req = match action {
        DlqAction::List => client.get(format!("{base}/v1/dlq")),
        DlqAction::Replay => client.post(format!("{base}/v1/dlq/replay")),
    };
    let req = match plugin {
        Some(p) => req.query(&[("plugin", p)]),
        None => req,
    };
    let resp = req.send().await.with_context(|| format!("no plugbus host answering at {url}"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("the host refused ({status}): {}", body["error"].as_str().unwrap_or("no reason given"));
    }
    println!("{}", serde_json::to_string_pretty(&body)?);
    Ok(())
}
