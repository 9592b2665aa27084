//! Hot reload: replace, half-written, garbage, remove, rename (a new name), and a warm compile cache.

use plugbus::{Config, Event, Host};
use plugbus_tests::{HostChild, TestHost, eventually, eventually_async, wasm};
use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn echo_version(subject: &str) -> &'static str {
    if subject.starts_with("echo.v2.") { "v2" } else { "v1" }
}

/// Publishes `n` events steadily while `during` runs; returns input id → the versions whose
/// output answered it.
async fn steady_flow(
    t: &TestHost,
    n: usize,
    during: impl std::future::Future<Output = ()>,
) -> HashMap<String, Vec<&'static str>> {
    let mut seen = t.observe(&["echo.>"]).await;
    let publisher = async {
        let mut ids = Vec::new();
        for _ in 0..n {
            ids.push(t.publish("orders.created", "{}").await);
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        ids
    };
    let (ids, ()) = tokio::join!(publisher, during);
    let mut answered: HashMap<String, Vec<&'static str>> = ids.iter().map(|id| (id.clone(), Vec::new())).collect();
    let mut outputs = 0;
    while outputs < n {
        let out = seen.next_where(|_| true).await;
        let cause = out.header("plugbus-caused-by").unwrap().to_string();
        answered.get_mut(&cause).expect("an output for an event we did not publish").push(echo_version(&out.subject));
        outputs += 1;
    }
    let late = seen.drain(Duration::from_millis(300)).await;
    assert!(late.is_empty(), "duplicate outputs: {late:?}");
    answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_a_plugin_under_load_loses_and_doubles_nothing() {
    let t = TestHost::start(&["echo"]).await;
    let dir = t.dir.path().to_path_buf();
    let answered = steady_flow(&t, 1500, async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        // the way `mv tmp x.wasm` deploys: an atomic rename over the live file
        std::fs::copy(wasm("echo2"), dir.join("echo.tmp")).unwrap();
        std::fs::rename(dir.join("echo.tmp"), dir.join("echo.wasm")).unwrap();
    })
    .await;
    assert!(answered.values().all(|v| v.len() == 1), "an event was lost or handled twice");
    let v2 = answered.values().filter(|v| v[0] == "v2").count();
    assert!(v2 > 0 && v2 < 1500, "the switch did not happen under load: {v2} of 1500 on v2");
    assert!(t.host.reloader().stats.reloads.load(Ordering::Relaxed) >= 1);
    let info = t.host.router().plugins();
    assert_eq!(info[0].version, "2.0.0");
    // once swapped, it stays put: reading the file must not look like a change
    let reloads = t.host.reloader().stats.reloads.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(t.host.reloader().stats.reloads.load(Ordering::Relaxed), reloads, "the plugin keeps reloading itself");
}

/// The worker reads a plugin's order rules again after a swap: a version that adds
/// `order_by` runs the next events of a key one after another, though the version before it
/// had no rules at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_swap_that_adds_order_by_orders_the_next_events_by_key() {
    let t = TestHost::start(&["echo"]).await;
    let mut seen = t.observe(&["echo.>"]).await;
    t.publish("orders.created", "{}").await;
    assert_eq!(seen.next_where(|_| true).await.subject, "echo.orders.created", "v1 serves first, unordered");

    let dir = t.dir.path().to_path_buf();
    std::fs::copy(wasm("echo2"), dir.join("echo.tmp")).unwrap();
    std::fs::rename(dir.join("echo.tmp"), dir.join("echo.wasm")).unwrap();
    let router = t.host.router().clone();
    eventually("v2 serves", || router.plugins()[0].version == "2.0.0").await;

    // Key `k`: a slow event, then a fast one, which must wait for it (unordered, it would
    // overtake by the 400 ms the first keeps the handler busy).
    for (subject, busy_ms) in [("orders.first", "400"), ("orders.second", "0")] {
        let ev = Event::new(subject, "{}").with_header("key", "k").with_header("busyms", busy_ms);
        t.host.publish(ev).await.unwrap();
    }
    let first = seen.next_where(|e| e.subject.starts_with("echo.v2.orders.")).await;
    let second = seen.next_where(|e| e.subject.starts_with("echo.v2.orders.")).await;
    assert_eq!(
        [first.subject.as_str(), second.subject.as_str()],
        ["echo.v2.orders.first", "echo.v2.orders.second"],
        "key k was not run in order after the swap"
    );
}

/// The attack: a `.wasm` file written to without pause. Changes are gathered until the folder
/// is quiet for a moment, and it never was: every other plugin's reload waited forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_to_without_pause_holds_back_no_other_plugins_reload() {
    let t = TestHost::start(&["echo"]).await;
    let dir = t.dir.path().to_path_buf();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (path, stop) = (dir.join("noisy.wasm"), stop.clone());
        tokio::spawn(async move {
            let mut f = std::fs::File::create(&path).unwrap();
            while !stop.load(Ordering::Relaxed) {
                f.write_all(b"not wasm yet").unwrap();
                f.flush().unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    std::fs::copy(wasm("echo2"), dir.join("echo.tmp")).unwrap();
    std::fs::rename(dir.join("echo.tmp"), dir.join("echo.wasm")).unwrap();
    let router = t.host.router().clone();
    eventually("v2 serves while another file is still being written", || router.plugins()[0].version == "2.0.0").await;
    // And the file itself is reported once it has been written to for a while (2 s), though
    // it never stops changing.
    let host = &t.host;
    eventually("the file written to without pause is reported", || {
        host.rejected().iter().any(|r| r.path.ends_with("noisy.wasm"))
    })
    .await;
    assert!(!writer.is_finished(), "reported only once the writer stopped");
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_written_in_chunks_is_waited_for_then_served() {
    let t = TestHost::start(&["echo"]).await;
    let bytes = std::fs::read(wasm("echo2")).unwrap();
    let path = t.dir.path().join("echo.wasm");
    {
        let mut f = std::fs::File::create(&path).unwrap(); // `cp` over the live file: truncate, then write
        for chunk in bytes.chunks(bytes.len() / 3 + 1) {
            f.write_all(chunk).unwrap();
            f.flush().unwrap();
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    let router = t.host.router().clone();
    eventually("v2 serves", || router.plugins()[0].version == "2.0.0").await;
    assert!(t.host.rejected().is_empty(), "a half-written file was reported: {:?}", t.host.rejected());
    assert_eq!(t.host.reloader().stats.load_errors.load(Ordering::Relaxed), 0);
    let mut seen = t.observe(&["echo.>"]).await;
    t.publish("orders.created", "{}").await;
    assert_eq!(seen.next_where(|_| true).await.subject, "echo.v2.orders.created");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_stays_half_written_is_reported_and_the_old_version_keeps_serving() {
    let t = TestHost::start(&["echo"]).await;
    let bytes = std::fs::read(wasm("echo2")).unwrap();
    let path = t.dir.path().join("echo.wasm");
    // `cp` over the live file that never finishes: truncated, half written, the writer still open
    let mut writer = std::fs::File::create(&path).unwrap();
    writer.write_all(&bytes[..bytes.len() / 2]).unwrap();
    writer.flush().unwrap();
    let host = &t.host;
    eventually("the half-written file is reported", || !host.rejected().is_empty()).await;
    let r = &host.rejected()[0];
    assert!(r.path.ends_with("echo.wasm") && r.reason.contains("invalid component"), "{r:?}");
    assert_eq!(host.reloader().stats.load_errors.load(Ordering::Relaxed), 1);
    let body: serde_json::Value = reqwest::get(format!("{}/v1/plugins", t.url())).await.unwrap().json().await.unwrap();
    assert_eq!(body["rejected"][0]["state"], format!("rejected: {}", r.reason), "{body}");
    assert_eq!(body["plugins"][0]["state"], "serving 0.1.0", "{body}");
    let metrics = reqwest::get(format!("{}/metrics", t.url())).await.unwrap().text().await.unwrap();
    assert!(metrics.contains("plugbus_load_errors_total{file=\"echo.wasm\"} 1"), "{metrics}");

    // the old version keeps serving, for as long as the file stays broken
    let mut seen = t.observe(&["echo.>"]).await;
    for _ in 0..3 {
        t.publish("orders.created", "{}").await;
        assert_eq!(seen.next_where(|_| true).await.subject, "echo.orders.created", "the old version stopped serving");
    }
    assert_eq!(host.router().plugins()[0].version, "0.1.0");
    assert_eq!(host.reloader().stats.reloads.load(Ordering::Relaxed), 0, "a half-written file was swapped in");

    // finishing the file later swaps the new version in and clears the report
    writer.write_all(&bytes[bytes.len() / 2..]).unwrap();
    drop(writer);
    let router = t.host.router().clone();
    eventually("v2 serves", || router.plugins()[0].version == "2.0.0").await;
    eventually("the rejection is cleared", || host.rejected().is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_rejected_and_the_old_version_keeps_serving() {
    let t = TestHost::start(&["echo"]).await;
    let path = t.dir.path().join("echo.wasm");
    std::fs::write(&path, b"definitely not wasm").unwrap();
    let host = &t.host;
    eventually("the garbage is reported", || !host.rejected().is_empty()).await;
    let r = &host.rejected()[0];
    assert!(r.path.ends_with("echo.wasm") && r.reason.contains("not a WebAssembly file"), "{r:?}");
    let body: serde_json::Value = reqwest::get(format!("{}/v1/plugins", t.url())).await.unwrap().json().await.unwrap();
    assert!(body["rejected"][0]["state"].as_str().unwrap().starts_with("rejected: "), "{body}");
    assert_eq!(body["plugins"][0]["state"], "serving 0.1.0", "{body}");

    let mut seen = t.observe(&["echo.>"]).await;
    t.publish("orders.created", "{}").await;
    assert_eq!(seen.next_where(|_| true).await.subject, "echo.orders.created", "the old version stopped serving");

    std::fs::copy(wasm("echo2"), &path).unwrap();
    let router = t.host.router().clone();
    eventually("v2 serves", || router.plugins()[0].version == "2.0.0").await;
    eventually("the rejection is cleared", || host.rejected().is_empty()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removing_unsubscribes_and_renaming_is_a_new_name() {
    let t = TestHost::start(&["echo", "audit"]).await;
    let dir = t.dir.path().to_path_buf();
    let host = &t.host;

    // A plugin is named by its file: a rename removes `echo` and adds `echo-renamed`, whose
    // manifest still says `echo`, so it is reported, naming both.
    std::fs::rename(dir.join("echo.wasm"), dir.join("echo-renamed.wasm")).unwrap();
    let router = t.host.router().clone();
    eventually("echo is removed with its name", || !router.contains("echo")).await;
    eventually("the renamed file is reported", || !host.rejected().is_empty()).await;
    let r = &host.rejected()[0];
    assert!(r.path.ends_with("echo-renamed.wasm") && r.reason.contains("\"echo-renamed\""), "{r:?}");

    // remove: its report goes, and nothing of echo receives events
    std::fs::remove_file(dir.join("echo-renamed.wasm")).unwrap();
    eventually("the report is cleared", || host.rejected().is_empty()).await;
    let mut seen = t.observe(&["echo.>"]).await;
    t.publish("orders.created", "{}").await;
    t.wait_counter("audit", "ok", 1).await;
    assert!(seen.drain(Duration::from_millis(300)).await.is_empty(), "a removed plugin still received events");
}

/// Review 60b H2: with a relative plugins folder (the default, `plugins`), the files loaded at
/// start were kept by the relative path while the watcher names changes by the absolute one: a
/// new build copied over one was refused as "already served from plugins/echo.wasm" (the old
/// one kept serving), and a removed one went on handling events until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_relative_plugins_folder_a_replaced_file_serves_and_a_removed_one_goes() {
    let work = tempfile::tempdir().unwrap();
    let plugins = work.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    for c in ["echo", "audit"] {
        std::fs::copy(wasm(c), plugins.join(format!("{c}.wasm"))).unwrap();
    }
    let data = tempfile::tempdir().unwrap();
    let host = HostChild::start_in(Some(work.path()), std::path::Path::new("plugins"), data.path(), "", &[]).await;
    let listing = || async {
        let body: serde_json::Value =
            reqwest::get(format!("{}/v1/plugins", host.url)).await.unwrap().json().await.unwrap();
        body
    };

    let staged = work.path().join("echo.wasm.new");
    std::fs::copy(wasm("echo2"), &staged).unwrap();
    std::fs::rename(&staged, plugins.join("echo.wasm")).unwrap();
    let serves_v2 = |b: &serde_json::Value| {
        b["plugins"].as_array().unwrap().iter().any(|p| p["name"] == "echo" && p["version"] == "2.0.0")
    };
    eventually_async("the new build serves", Duration::from_secs(10), || async { serves_v2(&listing().await) }).await;
    let body = listing().await;
    assert_eq!(body["rejected_total"], 0, "{body}");

    std::fs::remove_file(plugins.join("audit.wasm")).unwrap();
    let audit_gone = |b: &serde_json::Value| b["plugins"].as_array().unwrap().iter().all(|p| p["name"] != "audit");
    eventually_async("the removed plugin goes", Duration::from_secs(10), || async { audit_gone(&listing().await) })
        .await;
    // `plugbus dev` copies there from any directory.
    let body = listing().await;
    assert_eq!(body["plugins_dir"].as_str(), Some(plugins.to_str().unwrap()), "{body}");
}

/// Review 56a M1: the watch was on the folder the path named at the start; once that folder was
/// replaced (`mv plugins old && mkdir plugins`, `rm -rf` and a new one), nothing in the new one
/// was ever seen: every plugin removed with its file, none added until a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_folder_replaced_by_a_new_one_is_watched_again() {
    let t = TestHost::start(&["echo"]).await;
    let dir = t.dir.path().to_path_buf();
    let old = dir.with_extension("old");
    std::fs::rename(&dir, &old).unwrap();
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(wasm("audit"), dir.join("audit.wasm")).unwrap();
    let router = t.host.router().clone();
    eventually("audit, in the new folder, is loaded", || router.contains("audit")).await;
    eventually("echo, not in the new folder, is removed", || !router.contains("echo")).await;
    // And the new folder's changes are seen from then on.
    std::fs::copy(wasm("echo"), dir.join("echo.wasm")).unwrap();
    eventually("echo, copied into the new folder, is loaded", || router.contains("echo")).await;
    std::fs::remove_dir_all(&old).unwrap();
}

/// Review 56d H1: `rm -rf plugins && mkdir plugins` often gives the new folder the old one's
/// inode number (ext4 does), so the folder looked the same by device and inode, and its watch,
/// gone with the old folder, was never put on the new one. The watcher's report that the
/// folder itself went counts too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_folder_removed_and_made_again_is_watched_again() {
    use std::os::unix::fs::MetadataExt;
    let t = TestHost::start(&["echo"]).await;
    let dir = t.dir.path().to_path_buf();
    let before = std::fs::metadata(&dir).unwrap().ino();
    std::fs::remove_dir_all(&dir).unwrap();
    std::fs::create_dir(&dir).unwrap();
    let reused = std::fs::metadata(&dir).unwrap().ino() == before;
    std::fs::copy(wasm("audit"), dir.join("audit.wasm")).unwrap();
    let router = t.host.router().clone();
    eventually(&format!("audit, in the new folder, is loaded (its inode reused: {reused})"), || {
        router.contains("audit")
    })
    .await;
    assert!(!router.contains("echo"), "echo went with its file");
    std::fs::copy(wasm("echo"), dir.join("echo.wasm")).unwrap();
    eventually("echo, copied into the new folder, is loaded", || router.contains("echo")).await;
}

/// Review 56a M1, a release-symlink deploy: the plugins folder is a link, pointed at another
/// folder in one rename (`ln -s releases/v2 tmp && mv -T tmp plugins`). No event reached the
/// watch on the first folder: the host served the old release for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_folder_link_pointed_at_another_folder_is_followed() {
    let releases = tempfile::tempdir().unwrap();
    let link = releases.path().join("plugins");
    let t = TestHost::start_with(&["echo"], |c| {
        std::os::unix::fs::symlink(&c.plugins_dir, &link).unwrap();
        c.plugins_dir = link.clone();
    })
    .await;
    let v2 = releases.path().join("v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::copy(wasm("audit"), v2.join("audit.wasm")).unwrap();
    let tmp = releases.path().join("plugins.tmp");
    std::os::unix::fs::symlink(&v2, &tmp).unwrap();
    std::fs::rename(&tmp, &link).unwrap();
    let router = t.host.router().clone();
    eventually("audit, in the release the link names now, is loaded", || router.contains("audit")).await;
    eventually("echo, not in it, is removed", || !router.contains("echo")).await;
    std::fs::copy(wasm("echo"), v2.join("echo.wasm")).unwrap();
    eventually("echo, copied into the new release, is loaded", || router.contains("echo")).await;
}

/// Review 62d F6: a plugin file may be a symlink to a build elsewhere, and the folder's watch sees
/// the link, not the build. A build written again in place, or renamed over, is loaded again
/// (the old version served on silently).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_linked_to_a_build_elsewhere_reloads_when_the_build_changes() {
    let builds = tempfile::tempdir().unwrap();
    let build = builds.path().join("echo.wasm");
    std::fs::copy(wasm("echo"), &build).unwrap();
    let t = TestHost::start(&[]).await;
    std::os::unix::fs::symlink(&build, t.dir.path().join("echo.wasm")).unwrap();
    let router = t.host.router().clone();
    let version = || router.plugins().first().map(|p| p.version.clone());
    eventually("echo, linked into the folder, is loaded", || version().as_deref() == Some("0.1.0")).await;
    // Written again in place, as a build that overwrites its output does.
    std::fs::write(&build, std::fs::read(wasm("echo2")).unwrap()).unwrap();
    eventually("the rebuilt echo serves", || version().as_deref() == Some("2.0.0")).await;
    // Renamed over, as a build that writes a new file and moves it does.
    let next = builds.path().join("echo.wasm.new");
    std::fs::copy(wasm("echo"), &next).unwrap();
    std::fs::rename(&next, &build).unwrap();
    eventually("the build renamed over the target serves", || version().as_deref() == Some("0.1.0")).await;
}

/// The compile cache only saves compiles: a stray file where its folder goes (or a folder
/// where its key goes) refused the whole start, so the events the log had accepted waited for
/// an operator (review 61c L1). The host starts without it, compiling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compile_cache_that_cannot_be_used_starts_the_host_without_it() {
    let plugins = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("echo"), plugins.path().join("echo.wasm")).unwrap();
    std::fs::write(data.path().join("cache"), "not a folder").unwrap();
    let config =
        Config { plugins_dir: plugins.path().into(), data_dir: data.path().into(), http: None, ..Config::default() };
    let host = Host::start(config).await.expect("the host starts without its cache");
    let stats = host.reloader().sandbox.cache_stats();
    assert_eq!((stats.compiled.load(Ordering::Relaxed), stats.hits.load(Ordering::Relaxed)), (1, 0));
    let mut seen = host.observe(&["echo.>"]).await.unwrap();
    host.publish(Event::new("orders.created", "{}")).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), seen.recv()).await.expect("an output").unwrap();
    assert_eq!(out.subject, "echo.orders.created");
    host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_warm_cache_compiles_nothing() {
    let plugins = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    for c in ["inventory", "payments", "shipping"] {
        std::fs::copy(wasm(c), plugins.path().join(format!("{c}.wasm"))).unwrap();
    }
    let config = Config {
        plugins_dir: plugins.path().to_path_buf(),
        data_dir: data.path().to_path_buf(),
        http: None,
        ..Config::default()
    };
    let cold = Host::start(config.clone()).await.unwrap();
    let stats = &cold.reloader().sandbox.cache_stats();
    assert_eq!((stats.compiled.load(Ordering::Relaxed), stats.hits.load(Ordering::Relaxed)), (3, 0));
    cold.shutdown().await;

    let warm = Host::start(config).await.unwrap();
    let stats = &warm.reloader().sandbox.cache_stats();
    assert_eq!((stats.compiled.load(Ordering::Relaxed), stats.hits.load(Ordering::Relaxed)), (0, 3));
    let mut seen = warm.observe(&["inventory.>"]).await.unwrap();
    warm.publish(Event::new("orders.created", plugbus_tests::order("w-1", "widget", 1))).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), seen.recv()).await.expect("an output within 30 s");
    assert_eq!(out.expect("bus open").subject, "inventory.reserved");
}

/// `compile_cache_dir`: two hosts with data folders of their own share one cache folder, and the
/// second compiles nothing; neither writes a cache into its data folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_sharing_a_compile_cache_dir_compile_each_component_once() {
    let shared = tempfile::tempdir().unwrap();
    let cache_dir = shared.path().join("compiled");
    let mut datas = Vec::new();
    let mut counts = Vec::new();
    for _ in 0..2 {
        let plugins = tempfile::tempdir().unwrap();
        let data = tempfile::tempdir().unwrap();
        for c in ["inventory", "payments"] {
            std::fs::copy(wasm(c), plugins.path().join(format!("{c}.wasm"))).unwrap();
        }
        let config = Config {
            plugins_dir: plugins.path().to_path_buf(),
            data_dir: data.path().to_path_buf(),
            compile_cache_dir: Some(cache_dir.clone()),
            http: None,
            ..Config::default()
        };
        let host = Host::start(config).await.unwrap();
        let stats = host.reloader().sandbox.cache_stats();
        counts.push((stats.compiled.load(Ordering::Relaxed), stats.hits.load(Ordering::Relaxed)));
        host.shutdown().await;
        datas.push(data);
    }
    assert_eq!(counts, [(2, 0), (0, 2)], "(compiled, read from the cache) of each host");
    assert!(shared.path().join("compiled.key").is_file(), "the key beside the shared folder");
    for data in &datas {
        assert!(!data.path().join("cache").exists(), "a cache in {}", data.path().display());
    }
}

/// A host that stopped holds nothing of its data folder: another starts on it at once, many
/// times over (notify's thread drops the folder watcher's handler after the host stopped: a
/// handler holding the reloader kept the kv store open, and the next start failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_host_lets_another_start_on_its_folders_at_once() {
    let plugins = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("echo"), plugins.path().join("echo.wasm")).unwrap();
    let config = || {
        let mut c = Config {
            data_dir: data.path().to_path_buf(),
            plugins_dir: plugins.path().to_path_buf(),
            http: None,
            ..Default::default()
        };
        // The in-memory bus keeps its kv in a store of its own (`kv.redb`), opened at start.
        c.bus.durable = false;
        c
    };
    for round in 0..5 {
        let host = Host::start(config()).await.unwrap_or_else(|e| panic!("round {round}: {e:#}"));
        assert_eq!(host.router().names(), vec!["echo".to_string()]);
        host.shutdown().await;
    }
}

/// What changes in the plugins folder while the host starts (after the loader read a file,
/// before the start is done) is applied once it has started: a file removed after it loaded
/// was served until the next restart, and a file added after the listing never loaded (the
/// watch began only after every file had loaded, and nothing looked again).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_changes_in_the_folder_while_the_host_starts_is_applied_once_it_has() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("plugins");
    std::fs::create_dir(&dir).unwrap();
    for name in ["audit", "faulty"] {
        std::fs::copy(wasm(name), dir.join(format!("{name}.wasm"))).unwrap();
    }
    let config = Config { data_dir: tmp.path().join("data"), plugins_dir: dir.clone(), ..Default::default() };
    // As each file is loaded: faulty's file goes, and echo's comes (once, past the listing).
    let folder = dir.clone();
    let on_load = move |_: usize, _: usize, done: Option<&std::path::Path>| {
        if done.is_some_and(|p| p.ends_with("faulty.wasm")) {
            std::fs::remove_file(folder.join("faulty.wasm")).unwrap();
            std::fs::copy(wasm("echo"), folder.join("echo.wasm")).unwrap();
        }
    };
    let host = Host::start_reporting(config, &on_load).await.unwrap();
    eventually("faulty, removed while the host started, is removed", || !host.router().contains("faulty")).await;
    eventually("echo, added while the host started, is loaded", || host.router().contains("echo")).await;
    assert!(host.router().contains("audit"));
    host.shutdown().await;
}

/// The embedded bus, whose `retarget` takes its time after the new patterns are live (as
/// JetStream's finds streams and changes consumers, seconds with several): an event on
/// `widget.x`, a pattern only the new version has, is delivered meanwhile.
struct SlowRetarget {
    bus: plugbus::backend::embedded::bus::EmbeddedBus,
}

#[async_trait::async_trait]
impl plugbus::transport::Transport for SlowRetarget {
    fn name(&self) -> &'static str {
        "slow-retarget"
    }
    async fn publish(&self, event: Event) -> Result<(), plugbus::transport::TransportError> {
        self.bus.publish(event).await
    }
    async fn publish_output(&self, event: std::sync::Arc<Event>) -> Result<(), plugbus::transport::TransportError> {
        self.bus.publish_output(event).await
    }
    async fn subscribe(
        &self,
        spec: plugbus::transport::SubscriptionSpec,
    ) -> Result<plugbus::transport::Subscription, plugbus::transport::TransportError> {
        self.bus.subscribe(spec).await
    }
    async fn retarget(
        &self,
        subscription: u64,
        spec: &plugbus::transport::SubscriptionSpec,
    ) -> Result<(), plugbus::transport::TransportError> {
        self.bus.retarget(subscription, spec).await?;
        self.bus.publish(Event::new("widget.x", "w")).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }
    async fn observe(
        &self,
        patterns: Vec<String>,
        capacity: usize,
    ) -> Result<plugbus::transport::Observed, plugbus::transport::TransportError> {
        self.bus.observe(patterns, capacity).await
    }
}

/// A new version that subscribes to a pattern the old one did not (`widget.*`): while the
/// transport took it on, its events ran on the old version, which never asked for them (and
/// with the old version's key order), because the version was swapped only after the
/// transport's change (review 61b F3). The new version serves first now.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_of_a_pattern_only_the_new_version_has_runs_on_the_new_version() {
    let plugins = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("echo"), plugins.path().join("echo.wasm")).unwrap();
    let config =
        Config { plugins_dir: plugins.path().into(), data_dir: data.path().into(), http: None, ..Config::default() };
    let transport = std::sync::Arc::new(SlowRetarget { bus: plugbus::backend::embedded::bus::EmbeddedBus::new() });
    let host = Host::start_on(config, transport, std::sync::Arc::new(plugbus::kv::MemoryKv::new())).await.unwrap();
    let mut seen = host.observe(&["echo.>"]).await.unwrap();
    // Version 2 (`echo.v2.<subject>`), subscribing to `widget.*` where version 1 had `faulty.*`.
    let v2 = plugbus_tests::patch_bytes(&std::fs::read(wasm("echo2")).unwrap(), "faulty.*", "widget.*");
    let staged = plugins.path().join("echo.staged");
    std::fs::write(&staged, v2).unwrap();
    std::fs::rename(&staged, plugins.path().join("echo.wasm")).unwrap();
    let out = tokio::time::timeout(Duration::from_secs(30), seen.recv()).await.expect("an output").unwrap();
    assert_eq!(out.subject, "echo.v2.widget.x", "widget.x ran on the version that does not subscribe to it");
    host.shutdown().await;
}
