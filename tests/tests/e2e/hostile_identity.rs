//! Hostile plugins, files and cache writers against who a plugin is and what it can reach:
//! - a file declaring another plugin's name gets nothing of that plugin (config, kv, its place);
//! - a manifest cannot join another plugin's queue group (NATS);
//! - plugin names that differ only in case never share a JetStream KV bucket;
//! - no plugin is given a `$` subject, an `_INBOX` reply or another plugin's dead letter
//!   through a wildcard, nor may its manifest name one (embedded bus and NATS);
//! - the plugins folder loads only regular files of bounded size (a FIFO, `/dev/zero`, a huge
//!   file are refused, never read, never hang the watcher);
//! - a compile-cache entry the host did not make is never loaded.

use plugbus::{Config, Event, Host};
use plugbus_tests::nats::NatsServer;
use plugbus_tests::{Bus, TestHost, eventually, fast_retries, plugbus_bin, wasm};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn rejection(host: &Host, file: &str) -> Option<String> {
    host.rejected().into_iter().find(|r| r.path.file_name().is_some_and(|f| f == file)).map(|r| r.reason)
}

fn must_reject(host: &Host, file: &str) -> String {
    rejection(host, file).unwrap_or_else(|| panic!("{file} was not rejected: {:?}", host.rejected()))
}

async fn get_text(url: String) -> String {
    let fetch = async { reqwest::get(url).await.unwrap().text().await.unwrap() };
    tokio::time::timeout(Duration::from_secs(10), fetch).await.expect("the API answers within 10 s")
}

/// The load-error counter of `file` in `/metrics` (0 when absent).
async fn load_errors(t: &TestHost, file: &str) -> u64 {
    let text = get_text(format!("{}/metrics", t.url())).await;
    let prefix = format!("plugbus_load_errors_total{{file=\"{file}\"}} ");
    text.lines().find_map(|l| l.strip_prefix(prefix.as_str())).map_or(0, |n| n.trim().parse().unwrap())
}

fn with_secret(c: &mut Config) {
    c.plugins.entry("payments".into()).or_default().config.insert("api_key".into(), "sk-live-123".into());
}

// ---- 1. A plugin is who the operator says it is --------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_claiming_another_plugins_name_gets_nothing_of_it() {
    // `00-evil.wasm` sorts first; its manifest says `name = "payments"`.
    let t = TestHost::start_files(&[("00-evil.wasm", "imposter"), ("payments.wasm", "payments")], with_secret).await;
    let reason = must_reject(&t.host, "00-evil.wasm");
    assert!(reason.contains("\"payments\"") && reason.contains("\"00-evil\""), "both names: {reason}");
    assert!(rejection(&t.host, "payments.wasm").is_none(), "the real payments was pushed out: {:?}", t.host.rejected());
    assert_eq!(t.host.router().names(), vec!["payments".to_string()]);

    // The real payments serves; nothing ever reads its secret for the impostor.
    let mut seen = t.observe(&["stolen.>", "payments.captured"]).await;
    t.publish("orders.created", plugbus_tests::order("o-1", "widget", 1)).await;
    t.publish("inventory.reserved", plugbus_tests::order("o-2", "widget", 1)).await;
    assert_eq!(seen.next_where(|_| true).await.subject, "payments.captured");
    let late = seen.drain(Duration::from_millis(300)).await;
    assert!(late.iter().all(|e| !e.subject.starts_with("stolen.")), "the secret leaked: {late:?}");

    // Reported like any load error: `/v1/plugins` and the load-error counter.
    let body: serde_json::Value = serde_json::from_str(&get_text(format!("{}/v1/plugins", t.url())).await).unwrap();
    let listed = body["rejected"].as_array().unwrap();
    let evil = listed.iter().find(|r| r["file"].as_str().unwrap().ends_with("00-evil.wasm")).expect("listed");
    assert!(evil["state"].as_str().unwrap().starts_with("rejected: "), "{body}");
    assert!(evil["state"].as_str().unwrap().contains("\"payments\""), "{body}");
    assert_eq!(load_errors(&t, "00-evil.wasm").await, 1);
}

/// Review 62d F5: one component as `bench-plugin-000.wasm` and `bench_plugin_000.wasm` (its
/// manifest's `bench-plugin-000` agrees with both) loaded as two plugins, each handling every
/// event: cargo's `my_handler.wasm` copied in, then `plugbus dev`'s `my-handler.wasm`. The
/// second spelling is refused naming the first, at the start and on a hot reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_plugin_under_two_spellings_of_dash_and_underscore_is_served_once() {
    let files = [("bench-plugin-000.wasm", "bench_handler"), ("bench_plugin_000.wasm", "bench_handler")];
    let t = TestHost::start_files(&files, |_| {}).await;
    assert_eq!(t.host.router().names(), vec!["bench-plugin-000".to_string()]);
    let reason = must_reject(&t.host, "bench_plugin_000.wasm");
    assert!(reason.contains("\"bench_plugin_000\"") && reason.contains("bench-plugin-000.wasm"), "{reason}");

    let t = TestHost::start_files(&files[..1], |_| {}).await;
    std::fs::copy(wasm("bench_handler"), t.dir.path().join("bench_plugin_000.wasm")).unwrap();
    let host = &t.host;
    eventually("the second spelling is reported", || rejection(host, "bench_plugin_000.wasm").is_some()).await;
    let reason = must_reject(host, "bench_plugin_000.wasm");
    assert!(reason.contains("\"bench_plugin_000\"") && reason.contains("bench-plugin-000.wasm"), "{reason}");
    assert_eq!(host.router().names(), vec!["bench-plugin-000".to_string()]);
    // The served spelling removed, the other serves (review 62e F3: it stayed refused until
    // its file was touched).
    std::fs::remove_file(t.dir.path().join("bench-plugin-000.wasm")).unwrap();
    let router = host.router().clone();
    eventually("the other spelling serves", || router.names() == vec!["bench_plugin_000".to_string()]).await;
    eventually("its refusal is cleared", || rejection(host, "bench_plugin_000.wasm").is_none()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_hot_reload_a_claimed_name_and_a_disagreeing_rename_are_refused() {
    let t = TestHost::start_files(&[("payments.wasm", "payments")], with_secret).await;
    let dir = t.dir.path().to_path_buf();
    let host = &t.host;

    std::fs::copy(wasm("imposter"), dir.join("00-evil.wasm")).unwrap();
    eventually("the impostor is reported", || rejection(host, "00-evil.wasm").is_some()).await;
    let reason = must_reject(host, "00-evil.wasm");
    assert!(reason.contains("\"payments\"") && reason.contains("\"00-evil\""), "{reason}");
    assert_eq!(host.router().names(), vec!["payments".to_string()]);
    assert_eq!(host.reloader().stats.load_errors.load(Ordering::Relaxed), 1);
    assert_eq!(load_errors(&t, "00-evil.wasm").await, 1);

    // A rename is a new name: `payments-old.wasm` is plugin `payments-old`, and its manifest
    // (`payments`) disagrees. Plugin `payments` goes with its file; the renamed file is reported.
    std::fs::rename(dir.join("payments.wasm"), dir.join("payments-old.wasm")).unwrap();
    let router = host.router().clone();
    eventually("payments leaves with its file", || !router.contains("payments")).await;
    eventually("the renamed file is reported", || rejection(host, "payments-old.wasm").is_some()).await;
    let reason = must_reject(host, "payments-old.wasm");
    assert!(reason.contains("\"payments\"") && reason.contains("\"payments-old\""), "{reason}");
    assert!(router.names().is_empty(), "{:?}", router.names());

    // Renamed back: served again, its report cleared.
    std::fs::rename(dir.join("payments-old.wasm"), dir.join("payments.wasm")).unwrap();
    eventually("payments serves again", || router.contains("payments")).await;
    eventually("the report is cleared", || rejection(host, "payments-old.wasm").is_none()).await;
    let mut seen = t.observe(&["payments.captured"]).await;
    t.publish("inventory.reserved", plugbus_tests::order("o-3", "widget", 1)).await;
    seen.next_on("payments.captured").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_config_names_a_plugins_file_and_then_no_other_file_is_that_plugin() {
    let t = TestHost::start_files(&[("payments.wasm", "payments"), ("payments-v3.wasm", "payments")], |c| {
        c.plugins.entry("payments".into()).or_default().file = Some("payments-v3.wasm".into());
    })
    .await;
    assert_eq!(t.host.router().names(), vec!["payments".to_string()]);
    let reason = must_reject(&t.host, "payments.wasm");
    assert!(reason.contains("payments-v3.wasm") && reason.contains("[plugins.payments] file"), "{reason}");
    assert!(rejection(&t.host, "payments-v3.wasm").is_none());
}

#[test]
fn inspect_shows_the_identity_a_file_would_get() {
    let dir = tempfile::tempdir().unwrap();
    let evil = dir.path().join("00-evil.wasm");
    std::fs::copy(wasm("imposter"), &evil).unwrap();
    let out = Command::new(plugbus_bin()).arg("inspect").arg(&evil).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("plugin     00-evil 0.1.0 (its manifest says \"payments\")"), "{text}");
    assert!(text.contains("verdict    NOT loadable") && text.contains("disagrees"), "{text}");

    let good = dir.path().join("payments.wasm");
    std::fs::copy(wasm("payments"), &good).unwrap();
    let out = Command::new(plugbus_bin()).args(["inspect", "--json"]).arg(&good).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["identity"].as_str(), v["manifest"]["queue_group"].as_str()),
        (Some("payments"), Some("plugbus.payments"))
    );
}

// ---- 2. Queue groups come from the identity ---------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_cannot_join_another_plugins_queue_group() {
    let server = NatsServer::start().await;
    // thief's manifest asks for `plugbus.echo`: echo's group, so half of echo's events.
    let t = TestHost::start_on(&Bus::Core(&server), &["echo", "thief"], |_| {}).await;
    let reason = must_reject(&t.host, "thief.wasm");
    assert!(reason.contains("subscriptions[0].queue-group") && reason.contains("\"plugbus.echo\""), "{reason}");
    assert!(reason.contains("plugbus.thief"), "says what it may use: {reason}");
    let client = server.client().await;
    for i in 0..100 {
        client.publish(format!("orders.o{i}"), "x".into()).await.unwrap();
    }
    client.flush().await.unwrap();
    t.wait_counter("echo", "ok", 100).await;
}

// ---- 3. KV buckets never collide ------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugins_whose_names_differ_in_case_never_share_a_kv_bucket() {
    let server = NatsServer::start().await;
    let t = TestHost::start_files(&[("faulty.wasm", "faulty"), ("Faulty.wasm", "kvspy")], |c| {
        c.nats.url = Some(server.url());
    })
    .await;
    assert_eq!(t.host.router().names().len(), 2, "{:?}", t.host.rejected());
    t.publish("faulty.count", "").await; // faulty: kv `none` = 1
    t.wait_counter("faulty", "ok", 1).await;
    let mut seen = t.observe(&["spy.seen"]).await;
    t.publish("spy.read", "none").await;
    let got = seen.next_on("spy.seen").await;
    assert_eq!(String::from_utf8_lossy(&got.data), "none", "Faulty read faulty's kv");
    let js = async_nats::jetstream::new(server.client().await);
    js.get_key_value("plugbus_faulty").await.expect("faulty's bucket");
    js.get_key_value("plugbus--faulty").await.expect("Faulty's own bucket");
}

// ---- 4. System subjects and dead letters ----------------------------------------------------

/// Publishes what a snooping `>` subscriber must never be given, then an ordinary event, and
/// returns every subject snoop reported.
async fn what_snoop_saw(t: &TestHost, publish_raw: impl AsyncFn(&str)) -> BTreeSet<String> {
    let mut reports = t.observe(&["snoop.saw"]).await;
    let mut dead = t.observe(&["plugbus.dlq.>"]).await;
    for s in ["$KV.plugbus_faulty.none", "$JS.ACK.S.c.1.1.1.1.0", "$SYS.REQ.SERVER.PING", "_INBOX.r1"] {
        publish_raw(s).await;
    }
    t.publish("faulty.reject", "").await; // dead-lettered to plugbus.dlq.faulty
    assert_eq!(dead.next_where(|_| true).await.subject, "plugbus.dlq.faulty");
    t.publish("orders.created", "{}").await;
    let mut saw = BTreeSet::new();
    while !saw.contains("orders.created") {
        saw.insert(String::from_utf8_lossy(&reports.next_where(|_| true).await.data).into_owned());
    }
    for late in reports.drain(Duration::from_millis(500)).await {
        saw.insert(String::from_utf8_lossy(&late.data).into_owned());
    }
    saw
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_never_deliver_system_subjects_or_other_plugins_dead_letters() {
    let t = TestHost::start_with(&["snoop", "faulty"], fast_retries).await;
    let saw = what_snoop_saw(&t, async |s: &str| t.host.publish(Event::new(s, "x")).await.unwrap()).await;
    assert_eq!(saw, BTreeSet::from(["faulty.reject".to_string(), "orders.created".to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_nats_wildcards_never_deliver_system_subjects_or_other_plugins_dead_letters() {
    let server = NatsServer::start().await;
    let t = TestHost::start_on(&Bus::Core(&server), &["snoop", "faulty"], fast_retries).await;
    let client = server.client().await;
    let saw = what_snoop_saw(&t, async |s: &str| {
        client.publish(s.to_string(), "x".into()).await.unwrap();
        client.flush().await.unwrap();
    })
    .await;
    assert_eq!(saw, BTreeSet::from(["faulty.reject".to_string(), "orders.created".to_string()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_manifest_naming_a_system_subject_is_refused_at_load() {
    let t = TestHost::start(&["sysmon", "echo"]).await;
    let reason = must_reject(&t.host, "sysmon.wasm");
    assert!(reason.contains("subscriptions[1].pattern") && reason.contains("$KV.>"), "{reason}");
    assert!(reason.contains("system subject"), "{reason}");
    assert_eq!(t.host.router().names(), vec!["echo".to_string()]);
}

// ---- 5. The plugins folder: regular files of bounded size -----------------------------------

fn mkfifo(path: &Path) {
    let ok = Command::new("mkfifo").arg(path).status().expect("running mkfifo").success();
    assert!(ok, "mkfifo {}", path.display());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_regular_files_of_bounded_size_are_loaded_at_start() {
    let plugins = tempfile::tempdir().unwrap();
    let builds = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let dir = plugins.path();
    // A symlink to a regular file elsewhere is the operator's way to deploy: allowed.
    std::fs::copy(wasm("echo"), builds.path().join("echo-build.wasm")).unwrap();
    std::os::unix::fs::symlink(builds.path().join("echo-build.wasm"), dir.join("echo.wasm")).unwrap();
    mkfifo(&dir.join("fifo.wasm"));
    std::os::unix::fs::symlink("/dev/zero", dir.join("zero.wasm")).unwrap();
    std::fs::create_dir(dir.join("folder.wasm")).unwrap();
    // 65 MiB (sparse): over the 64 MiB default, refused before it is read.
    std::fs::File::create(dir.join("huge.wasm")).unwrap().set_len(65 << 20).unwrap();
    let config =
        Config { plugins_dir: dir.to_path_buf(), data_dir: data.path().to_path_buf(), http: None, ..Config::default() };
    let host = tokio::time::timeout(Duration::from_secs(60), Host::start(config))
        .await
        .expect("the host starts without hanging on a FIFO")
        .unwrap();
    assert_eq!(host.router().names(), vec!["echo".to_string()]);
    assert!(must_reject(&host, "fifo.wasm").contains("a FIFO, not a regular file"));
    assert!(must_reject(&host, "zero.wasm").contains("a symlink to a character device"));
    assert!(must_reject(&host, "folder.wasm").contains("a directory"));
    let huge = must_reject(&host, "huge.wasm");
    assert!(huge.contains("68157440 bytes") && huge.contains("67108864-byte cap (max_wasm_bytes)"), "{huge}");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_reload_a_fifo_a_device_or_a_big_file_is_refused_and_the_watcher_goes_on() {
    let t = TestHost::start_with(&["echo"], |c| c.max_wasm_bytes = 1 << 20).await;
    let dir = t.dir.path().to_path_buf();
    let host = &t.host;
    mkfifo(&dir.join("pipe.wasm"));
    eventually("the FIFO is reported", || rejection(host, "pipe.wasm").is_some()).await;
    assert!(must_reject(host, "pipe.wasm").contains("a FIFO"));
    std::os::unix::fs::symlink("/dev/zero", dir.join("zero.wasm")).unwrap();
    eventually("the device is reported", || rejection(host, "zero.wasm").is_some()).await;
    assert!(must_reject(host, "zero.wasm").contains("a symlink to a character device"));
    // Valid-looking but 2 MiB, over the 1 MiB cap set for this host.
    let mut big = std::fs::read(wasm("audit")).unwrap();
    big.resize(2 << 20, 0);
    std::fs::write(dir.join("big.wasm"), &big).unwrap();
    eventually("the big file is reported", || rejection(host, "big.wasm").is_some()).await;
    assert!(must_reject(host, "big.wasm").contains("over the 1048576-byte cap (max_wasm_bytes)"));
    // The watcher is not stuck: a good file still loads.
    std::fs::copy(wasm("audit"), dir.join("audit.wasm")).unwrap();
    let router = host.router().clone();
    eventually("audit loads after them", || router.contains("audit")).await;
    for f in ["pipe.wasm", "zero.wasm", "big.wasm"] {
        assert!(load_errors(&t, f).await >= 1, "{f} not counted");
    }
}

// ---- 6. The compile cache loads only what this host made ------------------------------------

fn cache_entry(data: &Path, component: &str) -> PathBuf {
    let hash = plugbus::sandbox::content_hash(&std::fs::read(wasm(component)).unwrap());
    std::fs::read_dir(data.join("cache"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.file_name().unwrap().to_string_lossy().starts_with(&hash) && p.extension().unwrap() == "cwasm")
        .unwrap_or_else(|| panic!("no cache entry for {component}"))
}

fn cache_config(plugins: &Path, data: &Path) -> Config {
    Config { plugins_dir: plugins.to_path_buf(), data_dir: data.to_path_buf(), http: None, ..Config::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_cache_entry_the_host_did_not_make_is_never_loaded() {
    let plugins = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    for c in ["echo", "audit"] {
        std::fs::copy(wasm(c), plugins.path().join(format!("{c}.wasm"))).unwrap();
    }
    let first = Host::start(cache_config(plugins.path(), data.path())).await.unwrap();
    first.shutdown().await;

    // Someone who can write the cache directory puts audit's (valid, compiled) code, and its
    // tag, where echo's entry is: were it loaded, echo would run audit's code.
    let (echo, audit) = (cache_entry(data.path(), "echo"), cache_entry(data.path(), "audit"));
    std::fs::copy(&audit, &echo).unwrap();
    let tag = |p: &Path| PathBuf::from(format!("{}.tag", p.display()));
    if tag(&audit).exists() {
        std::fs::copy(tag(&audit), tag(&echo)).unwrap();
    }

    let second = Host::start(cache_config(plugins.path(), data.path())).await.unwrap();
    let stats = second.reloader().sandbox.cache_stats();
    assert_eq!(
        (stats.hits.load(Ordering::Relaxed), stats.compiled.load(Ordering::Relaxed)),
        (1, 1),
        "the forged entry was loaded instead of recompiled"
    );
    assert_eq!(stats.rejected.load(Ordering::Relaxed), 1);
    let mut seen = second.observe(&["echo.>"]).await.unwrap();
    second.publish(Event::new("orders.created", "{}")).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), seen.recv()).await.expect("echo answers").unwrap();
    assert_eq!(out.subject, "echo.orders.created");
    second.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_key_others_can_read_is_replaced_and_everything_recompiled() {
    use std::os::unix::fs::PermissionsExt;
    let plugins = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    for c in ["echo", "audit"] {
        std::fs::copy(wasm(c), plugins.path().join(format!("{c}.wasm"))).unwrap();
    }
    Host::start(cache_config(plugins.path(), data.path())).await.unwrap().shutdown().await;
    let key = data.path().join("cache.key");
    assert_eq!(std::fs::metadata(&key).expect("a key beside the cache").permissions().mode() & 0o777, 0o600);
    let old = std::fs::read(&key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();

    let second = Host::start(cache_config(plugins.path(), data.path())).await.unwrap();
    let stats = second.reloader().sandbox.cache_stats();
    assert_eq!((stats.hits.load(Ordering::Relaxed), stats.compiled.load(Ordering::Relaxed)), (0, 2));
    assert_eq!(std::fs::metadata(&key).unwrap().permissions().mode() & 0o777, 0o600);
    assert_ne!(std::fs::read(&key).unwrap(), old, "a key others could read was kept");
    second.shutdown().await;
}

#[test]
fn inspect_refuses_a_fifo_instead_of_hanging_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.wasm");
    mkfifo(&fifo);
    let mut child = Command::new(plugbus_bin())
        .arg("inspect")
        .arg(&fifo)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("plugbus inspect hung on a FIFO");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success());
    assert!(stderr.contains("FIFO"), "{stderr}");
}
