//! Shared scaffolding for the end-to-end tests: build the handler components once, start a
//! host on a temp plugins folder, publish, and wait for what comes out.

pub mod browser;
pub mod nats;
mod ports;

pub use ports::free_port;

use plugbus::{Config, Event, Host};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::sync::mpsc;

/// Every handler crate the tests use.
pub const COMPONENTS: &[&str] = &[
    "inventory",
    "payments",
    "shipping",
    "notify",
    "audit",
    "faulty",
    "sneaky",
    "echo",
    "echo2",
    "echo3",
    "attrs",
    "cycler",
    "imposter",
    "thief",
    "kvspy",
    "snoop",
    "sysmon",
    "hostile",
    "manifesto",
    "dice",
    "caller",
    "picky",
    "asker",
    "responder",
    "stall",
    "aliased",
    "bench-handler",
];

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| workspace().join("target"))
}

/// Builds every test and example component once per test binary (a no-op when fresh).
fn build_components() -> &'static PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.current_dir(workspace()).args(["build", "--quiet", "--target", "wasm32-wasip2", "--profile", "plugin"]);
        for c in COMPONENTS {
            cmd.args(["-p", c]);
        }
        let status = cmd.status().expect("running cargo to build the components");
        assert!(
            status.success(),
            "building the components failed (is the wasm32-wasip2 target installed? run scripts/test)"
        );
        target_dir().join("wasm32-wasip2").join("plugin")
    })
}

/// The path of a built component, e.g. `wasm("inventory")`.
pub fn wasm(name: &str) -> PathBuf {
    build_components().join(format!("{name}.wasm"))
}

/// The `plugbus` binary built by `cargo build -p plugbus` (the test script builds it first).
pub fn plugbus_bin() -> PathBuf {
    let bin = target_dir().join("debug").join("plugbus");
    assert!(bin.exists(), "{} is missing: run `cargo build -p plugbus` (scripts/test does)", bin.display());
    bin
}

/// The compile cache every test host shares (of every run: entries are named by the wasm's hash
/// and the engine's settings), so each component is compiled once, not once per host: compiling
/// was a quarter of the end-to-end tests' CPU time.
pub fn shared_compile_cache() -> PathBuf {
    target_dir().join("test-compile-cache")
}

/// `plugbus` as a command whose hosts and compiles use [`shared_compile_cache`] (through
/// `PLUGBUS_COMPILE_CACHE_DIR`), for tests about something else than compiling: a child host
/// with a data folder of its own compiles every component again (child hosts ran 114 compiles
/// over the end-to-end suite, 18% of its CPU time, measured with `perf` at `d2e0eb9`).
pub fn plugbus_cached() -> Command {
    let mut cmd = Command::new(plugbus_bin());
    cmd.env("PLUGBUS_COMPILE_CACHE_DIR", shared_compile_cache());
    cmd
}

/// Each component under its own name: `(file name, component)`.
fn file_names<'a>(components: &[&'a str]) -> Vec<(String, &'a str)> {
    components.iter().map(|c| (format!("{c}.wasm"), *c)).collect()
}

/// A host running on a temp plugins folder.
pub struct TestHost {
    /// The host.
    pub host: Host,
    /// The plugins folder.
    pub dir: tempfile::TempDir,
    /// The data folder (kv, compile cache).
    pub data: tempfile::TempDir,
}

impl TestHost {
    /// A host with these components in its plugins folder and the HTTP API on a free port.
    pub async fn start(components: &[&str]) -> Self {
        Self::start_with(components, |_| {}).await
    }

    /// Like [`TestHost::start_with`], on `bus`.
    pub async fn start_on(bus: &Bus<'_>, components: &[&str], tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_with(components, |c| {
            bus.configure(c, components);
            tweak(c);
        })
        .await
    }

    /// Like [`TestHost::start`], with a chance to change the config first.
    pub async fn start_with(components: &[&str], tweak: impl FnOnce(&mut Config)) -> Self {
        let files = file_names(components);
        let files: Vec<(&str, &str)> = files.iter().map(|(f, c)| (f.as_str(), *c)).collect();
        Self::start_files(&files, tweak).await
    }

    /// Like [`TestHost::start_with`], each component copied under a file name of its own:
    /// `(file name, component)` (a plugin is named by its file).
    pub async fn start_files(files: &[(&str, &str)], tweak: impl FnOnce(&mut Config)) -> Self {
        Self::start_files_on(files, tweak, |config| async move { Host::start(config).await }).await
    }

    /// Like [`TestHost::start_with`], on the in-memory embedded bus with the kv store `kv`.
    pub async fn start_with_kv(
        components: &[&str],
        kv: Arc<dyn plugbus::kv::KvStore>,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let files = file_names(components);
        let files: Vec<(&str, &str)> = files.iter().map(|(f, c)| (f.as_str(), *c)).collect();
        let bus = Arc::new(plugbus::backend::embedded::bus::EmbeddedBus::new());
        Self::start_files_on(&files, tweak, |config| Host::start_on(config, bus, kv)).await
    }

    /// Copies `files` into a plugins folder and starts a host on it with `start`.
    async fn start_files_on<F: Future<Output = anyhow::Result<Host>>>(
        files: &[(&str, &str)],
        tweak: impl FnOnce(&mut Config),
        start: impl FnOnce(Config) -> F,
    ) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        for (file, c) in files {
            std::fs::copy(wasm(c), dir.path().join(file)).expect("copying a component");
        }
        let data = tempfile::tempdir().expect("temp dir");
        let mut config = Config {
            plugins_dir: dir.path().to_path_buf(),
            data_dir: data.path().to_path_buf(),
            http: Some("127.0.0.1:0".parse().unwrap()),
            ..Config::default()
        };
        // The durable log without waiting for each commit's `fsync` (at most every 5 s, and at a
        // clean stop): the same code path, minutes less of CI on a busy disk. What `fsync`
        // guarantees across a crash is tested with child processes killed by SIGKILL (`crash`)
        // at the default `sync = "always"`.
        config.bus.sync = plugbus::backend::embedded::log::SyncPolicy::None;
        // One compile cache for every test host; a test that counts compilations sets it back
        // to `None` (its own `data_dir/cache`).
        config.compile_cache_dir = Some(shared_compile_cache());
        // Compile in child processes of the `plugbus` binary under the compile caps, as the CLI
        // does (the library's default compiles in the host's own process).
        config.sandbox.compiler = Some(plugbus_bin());
        tweak(&mut config);
        let host = start(config).await.expect("host starts");
        Self { host, dir, data }
    }

    /// Publishes `data` on `subject`.
    pub async fn publish(&self, subject: &str, data: impl Into<bytes_compat::Bytes>) -> String {
        let ev = Event::new(subject, data.into().0);
        let id = ev.id.clone();
        self.host.publish(ev).await.expect("publish");
        id
    }

    /// Observes every event matching `patterns` from now on.
    pub async fn observe(&self, patterns: &[&str]) -> Observer {
        Observer(self.host.observe(patterns).await.expect("observe"))
    }

    /// The counters of `plugin` (received, ok, failed, attempts, in_flight).
    pub fn counter(&self, plugin: &str, name: &str) -> u64 {
        self.host
            .router()
            .plugins()
            .into_iter()
            .find(|p| p.name == plugin)
            .unwrap_or_else(|| panic!("plugin {plugin} is not loaded"))
            .counters
            .get(name)
            .copied()
            .unwrap_or_else(|| panic!("no counter named {name}"))
    }

    /// Waits until `plugin`'s counter `name` reaches `at_least`.
    pub async fn wait_counter(&self, plugin: &str, name: &str, at_least: u64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.counter(plugin, name) < at_least {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{plugin}.{name} stayed at {} (wanted {at_least})",
                self.counter(plugin, name)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// The base URL of the HTTP API.
    pub fn url(&self) -> String {
        format!("http://{}", self.host.http_addr().expect("HTTP API on"))
    }

    /// `POST /v1/dlq/replay?plugin=PLUGIN`: its report.
    pub async fn replay_dead_letters(&self, plugin: &str) -> serde_json::Value {
        reqwest::Client::new()
            .post(format!("{}/v1/dlq/replay?plugin={plugin}", self.url()))
            .send()
            .await
            .expect("the replay request")
            .json()
            .await
            .expect("the replay's report")
    }
}

/// Which transport a shared test case runs on.
pub enum Bus<'a> {
    /// The embedded bus.
    Embedded,
    /// NATS with every plugin durable (JetStream).
    JetStream(&'a nats::NatsServer),
    /// Core NATS (queue groups).
    Core(&'a nats::NatsServer),
}

impl Bus<'_> {
    /// Points `config` at this bus; on JetStream, makes `plugins` durable.
    pub fn configure(&self, config: &mut Config, plugins: &[&str]) {
        match self {
            Bus::Embedded => {}
            Bus::Core(server) => config.nats.url = Some(server.url()),
            Bus::JetStream(server) => {
                config.nats.url = Some(server.url());
                for p in plugins {
                    config.plugins.entry(p.to_string()).or_default().durable = Some(true);
                }
            }
        }
    }
}

/// Events seen on the bus.
pub struct Observer(pub mpsc::Receiver<Arc<Event>>);

impl Observer {
    /// Waits (up to 30 s) for the next event matching `pred`, skipping others.
    pub async fn next_where(&mut self, pred: impl Fn(&Event) -> bool) -> Arc<Event> {
        let wait = async {
            loop {
                let ev = self.0.recv().await.expect("bus closed");
                if pred(&ev) {
                    return ev;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(30), wait).await.expect("timed out waiting for an event")
    }

    /// Waits for the next event on `subject`.
    pub async fn next_on(&mut self, subject: &str) -> Arc<Event> {
        self.next_where(|e| e.subject == subject).await
    }

    /// Collects everything that arrives within `quiet` of the previous event.
    pub async fn drain(&mut self, quiet: Duration) -> Vec<Arc<Event>> {
        let mut out = Vec::new();
        while let Ok(Some(ev)) = tokio::time::timeout(quiet, self.0.recv()).await {
            out.push(ev);
        }
        out
    }
}

/// Lets tests pass `&str`, `String` or `Vec<u8>` as data.
pub mod bytes_compat {
    /// Owned payload bytes.
    pub struct Bytes(pub Vec<u8>);
    impl From<&str> for Bytes {
        fn from(s: &str) -> Self {
            Bytes(s.as_bytes().to_vec())
        }
    }
    impl From<String> for Bytes {
        fn from(s: String) -> Self {
            Bytes(s.into_bytes())
        }
    }
    impl From<Vec<u8>> for Bytes {
        fn from(v: Vec<u8>) -> Self {
            Bytes(v)
        }
    }
}

/// An order as the example pipeline expects it.
pub fn order(id: &str, sku: &str, qty: u64) -> String {
    serde_json::json!({ "order_id": id, "sku": sku, "qty": qty, "email": format!("{id}@example.com"), "amount_cents": 1000 * qty })
        .to_string()
}

/// Config tweak: retries that take milliseconds, not seconds (3 attempts, 5 ms → 20 ms).
pub fn fast_retries(config: &mut Config) {
    config.retry = plugbus::retry::RetryPolicy {
        max_attempts: 3,
        initial: Duration::from_millis(5),
        factor: 2.0,
        max: Duration::from_millis(20),
        ..plugbus::retry::RetryPolicy::default()
    };
}

/// Waits (up to 30 s) until `cond` holds, polling.
pub async fn eventually(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `cmd` to completion with its output captured, killing it if it is still running after
/// `timeout` (then the test fails with what it printed so far) instead of hanging the test.
pub fn output_within(cmd: &mut Command, timeout: Duration) -> std::process::Output {
    use std::io::Read;
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawning a command");
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = read(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = read(Box::new(child.stderr.take().expect("piped stderr")));
    let status = wait_within(&mut child, timeout);
    let (stdout, stderr) = (stdout.join().expect("stdout reader"), stderr.join().expect("stderr reader"));
    match status {
        Some(status) => std::process::Output { status, stdout, stderr },
        None => panic!(
            "{cmd:?} still running after {timeout:?}: killed.\nstdout: {}\nstderr: {}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    }
}

/// Waits up to `timeout` for `child` to exit; kills it and returns `None` if it did not.
pub fn wait_within(child: &mut std::process::Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child process") {
            return Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The host's log lines (JSON, one per line) written while a test runs in this process.
///
/// A test binary has one global subscriber: the first call installs it, later calls share it.
/// Lines of every test in the binary land here, so look for your event id or plugin.
#[derive(Clone)]
pub struct Logs(Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    /// Starts capturing (once per test binary) and returns the shared buffer.
    pub fn capture() -> Logs {
        static LOGS: OnceLock<Logs> = OnceLock::new();
        LOGS.get_or_init(|| {
            let logs = Logs(Arc::default());
            let writer = logs.clone();
            use tracing_subscriber::layer::SubscriberExt;
            // the host's own lines (debug included) and plugins' stdout/stderr, not wasmtime's
            let only_ours = tracing_subscriber::filter::Targets::new()
                .with_target("plugbus", tracing::Level::DEBUG)
                .with_target("plugin", tracing::Level::INFO);
            let subscriber =
                tracing_subscriber::fmt().json().with_writer(move || writer.clone()).finish().with(only_ours);
            tracing::subscriber::set_global_default(subscriber)
                .expect("installing the log capture (another global subscriber was set first)");
            logs
        })
        .clone()
    }

    /// Every captured line, parsed.
    pub fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.0.lock().expect("log buffer poisoned").clone();
        String::from_utf8_lossy(&bytes).lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The lines whose `fields` have every `(name, value)` of `fields`.
    pub fn with_fields(&self, fields: &[(&str, &str)]) -> Vec<serde_json::Value> {
        self.lines().into_iter().filter(|l| fields.iter().all(|(k, v)| l["fields"][*k].as_str() == Some(*v))).collect()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer poisoned").extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `bytes` with the one occurrence of `from` replaced by `to` (same length): how the tests make
/// a component declare what no SDK build would, by rewriting a placeholder string in its data.
pub fn patch_bytes(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len(), "a patch must keep the length: {from:?} -> {to:?}");
    let hits: Vec<usize> =
        bytes.windows(from.len()).enumerate().filter(|(_, w)| *w == from.as_bytes()).map(|(i, _)| i).collect();
    assert_eq!(hits.len(), 1, "{from:?} must occur exactly once in the component, found at {hits:?}");
    let mut out = bytes.to_vec();
    out[hits[0]..hits[0] + to.len()].copy_from_slice(to.as_bytes());
    out
}

/// Polls an async condition every 50 ms until it holds; fails the test after `timeout`.
pub async fn eventually_async<F: std::future::Future<Output = bool>>(
    what: &str,
    timeout: Duration,
    cond: impl Fn() -> F,
) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !cond().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {timeout:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process (a `plugbus run`) killed and reaped when the test ends, passed or not: a
/// host left running would hold the test's ports and files (and the build lock's inherited fd).
pub struct Running(pub std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `plugbus run` child process on a free loopback port (JSON logs in `data/host.log`),
/// killed and reaped when dropped.
pub struct HostChild {
    pub child: std::process::Child,
    /// Its HTTP API, `http://127.0.0.1:<port>`.
    pub url: String,
    /// Its stderr.
    pub log: PathBuf,
}

impl Drop for HostChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl HostChild {
    /// Starts `plugbus run` on `plugins` and `data` with `config` (written to
    /// `data/plugbus.toml`) and `env` set for it; returns once `/readyz` answers (fails the test
    /// after 60 s, with the host's log).
    pub async fn start(plugins: &Path, data: &Path, config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_in(None, plugins, data, config, env).await
    }

    /// [`HostChild::start`] in the working directory `cwd` (where a relative `plugins` is).
    pub async fn start_in(cwd: Option<&Path>, plugins: &Path, data: &Path, config: &str, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let config_path = data.join("plugbus.toml");
        std::fs::write(&config_path, config).unwrap();
        let log = data.join("host.log");
        let mut command = Command::new(plugbus_bin());
        if let Some(cwd) = cwd {
            command.current_dir(cwd);
        }
        let child = command
            .args(["run", "--log-format", "json", "--http", &format!("127.0.0.1:{port}")])
            .arg("--config")
            .arg(&config_path)
            .arg("--plugins")
            .arg(plugins)
            .arg("--data-dir")
            .arg(data)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting plugbus run");
        let child = Self { child, url: format!("http://127.0.0.1:{port}"), log };
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/readyz", child.url)).await
                && r.status().is_success()
            {
                return child;
            }
            let log = std::fs::read_to_string(&child.log).unwrap();
            assert!(std::time::Instant::now() < deadline, "the host did not start: {log}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The text of a host's `/metrics`.
pub async fn metrics_text(url: &str) -> String {
    reqwest::get(format!("{url}/metrics")).await.unwrap().text().await.unwrap()
}

/// The value of the sample `name` (with its labels, as printed) in a `/metrics` text.
pub fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Held by every test that measures the test process's own RSS, so no two of them run at once
/// (the `memory` binary holds only such tests).
pub async fn measuring_memory() -> tokio::sync::MutexGuard<'static, ()> {
    static ALONE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    ALONE.lock().await
}

/// `n` as LEB128 (the wasm binary format's integers), appended to `out`.
pub fn leb128(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let b = (n & 0x7f) as u8;
        n >>= 7;
        out.push(if n > 0 { b | 0x80 } else { b });
        if n == 0 {
            return;
        }
    }
}

/// A wasm section (id, size, body), appended to `out`.
pub fn wasm_section(id: u8, body: &[u8], out: &mut Vec<u8>) {
    out.push(id);
    leb128(body.len(), out);
    out.extend_from_slice(body);
}

/// A component holding `module` (a core module's bytes) and nothing else: compiled like any
/// component, refused at load for what it lacks (no handler export).
pub fn component_of(module: &[u8]) -> Vec<u8> {
    let mut component = b"\0asm\x0d\0\x01\0".to_vec();
    wasm_section(1, module, &mut component); // a core module section
    component
}

/// A component of one core function, `reps` times `global.get; local.get; i64.add; local.tee;
/// global.set` over 1,000 locals: half a megabyte at 50,000 that cranelift takes seconds and
/// hundreds of MiB to compile, more than linearly (debug build: 50,000 took 9 s and 188 MiB,
/// 100,000 23 s and 297 MiB, 200,000 48 s and 490 MiB). Nothing in it is invalid: only its cost
/// refuses it.
pub fn slow_to_compile(reps: usize) -> Vec<u8> {
    slow_module(reps, None)
}

/// [`slow_to_compile`] with one linear memory of at least `pages` pages: over the instance
/// pool's slots (64 MiB, 1,024 pages), which wasmtime checks only once it has compiled the code.
pub fn slow_to_compile_then_refused(reps: usize, pages: u32) -> Vec<u8> {
    slow_module(reps, Some(pages))
}

fn slow_module(reps: usize, memory_pages: Option<u32>) -> Vec<u8> {
    let (leb, section) = (leb128, wasm_section);
    const LOCALS: usize = 1000;
    let mut body = Vec::new();
    leb(1, &mut body); // one group of locals
    leb(LOCALS, &mut body);
    body.push(0x7e); // i64
    for r in 0..reps {
        body.extend_from_slice(&[0x23, 0x00, 0x20]); // global.get 0, local.get
        leb((r * 7 + 3) % LOCALS, &mut body);
        body.extend_from_slice(&[0x7c, 0x22]); // i64.add, local.tee
        leb((r * 13 + 5) % LOCALS, &mut body);
        body.extend_from_slice(&[0x24, 0x00]); // global.set 0
    }
    body.push(0x0b);
    let mut code = vec![1];
    leb(body.len(), &mut code);
    code.extend_from_slice(&body);
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut module); // one type: () -> ()
    section(3, &[1, 0], &mut module); // one function of it
    if let Some(pages) = memory_pages {
        let mut memory = vec![1, 0x00]; // one memory, a minimum only
        leb(pages as usize, &mut memory);
        section(5, &memory, &mut module);
    }
    section(6, &[1, 0x7e, 1, 0x42, 0, 0x0b], &mut module); // a mutable i64 global, 0
    section(10, &code, &mut module);
    component_of(&module)
}
