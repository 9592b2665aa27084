//! Hostile and careless clients of the host: high-cardinality traffic, a full queue behind the
//! HTTP ingress, web pages and DNS rebinding, stalled and piled-up live tails, a dead-letter
//! replay cut off midway, system subjects and host headers, and CloudEvents that are not.

use plugbus::Config;
use plugbus_tests::nats::NatsServer;
use plugbus_tests::{
    Bus, HostChild, TestHost, eventually, eventually_async, fast_retries, metrics_text, plugbus_bin, sample, wasm,
    workspace,
};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Gives `plugin` a queue and concurrency of its own, and no backlog: its producers wait for a
/// full queue (on the durable log it would fall behind instead, and they would not wait).
fn set_flow(c: &mut Config, plugin: &str, queue: u64, concurrency: u64) {
    let flow = &mut c.plugins.entry(plugin.into()).or_default().flow;
    flow.insert("queue".into(), json!(queue));
    flow.insert("concurrency".into(), json!(concurrency));
    flow.insert("backlog_mib".into(), json!(0));
}

async fn json_error(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap_or_default();
    (status, body["error"].as_str().unwrap_or_default().to_string())
}

// ---------------------------------------------------------------------------------------------
// 1. Metrics are bounded by configuration, not by traffic.

/// The host's resident memory now.
fn rss_kib(host: &HostChild) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", host.child.id())).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS in /proc/<pid>/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The host's resident memory once idle: the least of samples over 6 s. A single sample swung by
/// ±50 MiB from one second to the next (the log's writes waiting for its next durable commit,
/// every 5 s at `sync = "none"`, and freed pages not yet returned), which is as much as the leak
/// this measures.
async fn idle_rss_kib(host: &HostChild) -> u64 {
    let mut least = u64::MAX;
    for _ in 0..24 {
        least = least.min(rss_kib(host));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    least
}

/// Posts `count` events on distinct subjects `orders.<prefix><i>` over 16 connections, each
/// request answered `202` before the test goes on. Each connection writes its requests 64 at a
/// time, pipelined (HTTP/1.1), and reads their answers: the same requests a client makes one
/// by one, for less CPU on both sides (with reqwest, unoptimised in the tests' build, one
/// request at a time per client, the test took 105 CPU-s and 67 s alone; pipelined, 74 and 51).
async fn post_distinct(url: &str, prefix: &str, count: usize) {
    let addr = url.strip_prefix("http://").expect("an http:// url").to_string();
    let tasks: Vec<_> = (0..16)
        .map(|w| {
            let (addr, prefix) = (addr.clone(), prefix.to_string());
            tokio::spawn(async move {
                let mut conn = tokio::net::TcpStream::connect(&addr).await.expect("connecting to the host");
                let subjects: Vec<String> = (w..count).step_by(16).map(|i| format!("orders.{prefix}{i}")).collect();
                for batch in subjects.chunks(64) {
                    let mut requests = String::new();
                    for subject in batch {
                        requests.push_str(&format!(
                            "POST /v1/events/{subject} HTTP/1.1\r\nhost: {addr}\r\ncontent-length: 2\r\n\r\n{{}}"
                        ));
                    }
                    let answers =
                        tokio::time::timeout(Duration::from_secs(30), pipelined(&mut conn, &requests, batch.len()));
                    let statuses = answers.await.unwrap_or_else(|_| panic!("{} answers within 30 s", batch.len()));
                    for (subject, status) in batch.iter().zip(statuses) {
                        assert_eq!(status, 202, "{subject}");
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Writes `requests` (HTTP/1.1, pipelined) and reads `n` answers: their status codes, in order.
async fn pipelined(conn: &mut tokio::net::TcpStream, requests: &str, n: usize) -> Vec<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(requests.as_bytes()).await.expect("writing the requests");
    let (mut read, mut statuses) = (Vec::new(), Vec::new());
    let mut buf = [0u8; 16 * 1024];
    while statuses.len() < n {
        // One whole answer at the front of `read`: its head, and a body of `content-length`.
        let answer = read.windows(4).position(|w| w == b"\r\n\r\n").and_then(|end| {
            let head = std::str::from_utf8(&read[..end]).expect("an answer's head in UTF-8");
            let status: u16 = head.split(' ').nth(1)?.parse().ok()?;
            let length: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .map_or(Some(0), |v| v.parse().ok())?;
            (read.len() >= end + 4 + length).then_some((status, end + 4 + length))
        });
        match answer {
            Some((status, len)) => {
                statuses.push(status);
                read.drain(..len);
            }
            None => {
                let got = conn.read(&mut buf).await.expect("reading the answers");
                assert!(got > 0, "the host closed the connection after {} of {n} answers", statuses.len());
                read.extend_from_slice(&buf[..got]);
            }
        }
    }
    statuses
}

async fn wait_handled(url: &str, plugin: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let body: Value = reqwest::get(format!("{url}/v1/plugins")).await.unwrap().json().await.unwrap();
        let p = body["plugins"].as_array().unwrap().iter().find(|p| p["name"] == plugin).cloned().unwrap();
        let ok = p["counters"]["ok"].as_u64().unwrap();
        if ok >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{plugin} handled {ok} of {at_least}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Series and bytes of `/metrics`.
async fn series(url: &str) -> (usize, usize, String) {
    let text = metrics_text(url).await;
    let n = text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()).count();
    (n, text.len(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forty_thousand_distinct_subjects_leave_metrics_and_memory_flat() {
    // (40,000 a burst: the old per-subject leak below, ~1.7 KiB a subject, grows the host by
    // about 68 MiB over it, twice the bound. 100,000 took 333 of 1,076 test-seconds.)
    const WARMUP: usize = 5_000;
    const BURST: usize = 40_000;
    let plugins = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    // echo subscribes to `orders.*` and republishes to `echo.<subject>`: every event and every
    // output is on a subject no other event has. (A small buffer: on a loaded machine echo may
    // fall behind the burst, and what it then reads back and holds is bounded by its buffer, up
    // to twice 64 MiB by default, which is not what this test measures.)
    std::fs::copy(wasm("echo"), plugins.path().join("echo.wasm")).unwrap();
    let host = HostChild::start(
        plugins.path(),
        data.path(),
        "watch = false\n[bus]\nsync = \"none\"\n[flow]\nbuffer_mib = 4\n[plugins.echo]\ninstance = \"reuse\"\n",
        &[],
    )
    .await;

    post_distinct(&host.url, "warm-", WARMUP).await;
    wait_handled(&host.url, "echo", WARMUP as u64).await;
    let (series_before, bytes_before, _) = series(&host.url).await;
    // Memory is compared across a second burst: after the first the allocator and the log's
    // caches are at their working size (an idle sample after the warm-up alone caught the
    // allocator having just given pages back, 84 MiB against the usual 170, and the burst then
    // "grew" the host by 93 MiB). A per-subject leak grows it as much again in the second.
    post_distinct(&host.url, "first-", BURST).await;
    wait_handled(&host.url, "echo", (WARMUP + BURST) as u64).await;
    let rss_before = idle_rss_kib(&host).await;

    let started = Instant::now();
    post_distinct(&host.url, "id-", BURST).await;
    wait_handled(&host.url, "echo", (WARMUP + 2 * BURST) as u64).await;
    let took = started.elapsed();
    let (series_after, bytes_after, text) = series(&host.url).await;
    let rss_after = idle_rss_kib(&host).await;

    println!(
        "{BURST} events on distinct subjects in {took:.1?}: /metrics {series_before} -> {series_after} series, \
         {bytes_before} -> {bytes_after} bytes; host RSS {} -> {} MiB",
        rss_before / 1024,
        rss_after / 1024
    );
    assert_eq!(series_after, series_before, "a subject made a series:\n{text}");
    assert!(bytes_after < bytes_before + 1024, "/metrics grew from {bytes_before} to {bytes_after} bytes");
    let total = (WARMUP + 2 * BURST) as f64;
    let received = r#"plugbus_events_received_total{plugin="echo",subscription="orders.*"}"#;
    assert_eq!(sample(&text, received), Some(total), "{text}");
    assert!(!text.contains("orders.id-"), "a subject leaked into a label");
    // The old per-subject handle cache and series held ~1.7 KiB per subject (~68 MiB here).
    let grew_mib = rss_after.saturating_sub(rss_before) / 1024;
    assert!(grew_mib < 32, "the host grew by {grew_mib} MiB over {BURST} distinct subjects");
}

/// The attack: a plugin whose every event writes 16 MiB of kv (63 values of 250,000 bytes,
/// within every per-event limit). Its handlers finish far faster than a slow disk commits
/// 16 MiB with an `fsync` (made slow here: `PLUGBUS_FAULT_KV_COMMIT_DELAY_MS`), and each
/// finished attempt used to wait for its commit without its run permit, holding its writes
/// (twice: the commit's copy), up to `flow.queue` of them: about 32 MiB an event, GiBs for one
/// plugin, then the host is killed for its memory. What waits for its commit now holds a
/// permit of its own (`flow.concurrency` of them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kv_writes_waiting_for_their_commit_are_bounded_by_the_plugins_concurrency() {
    const EVENTS: usize = 40;
    let plugins = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("hostile"), plugins.path().join("hostile.wasm")).unwrap();
    let config = "watch = false\n[flow]\nconcurrency = 2\n";
    let slow_disk = [("PLUGBUS_FAULT_KV_COMMIT_DELAY_MS", "250")];
    let host = HostChild::start(plugins.path(), data.path(), config, &slow_disk).await;
    let rss_before = rss_kib(&host);
    // (the peak, VmHWM, from here on, not start-up compilation's)
    std::fs::write(format!("/proc/{}/clear_refs", host.child.id()), "5").unwrap();
    let client = reqwest::Client::new();
    for i in 0..EVENTS {
        let resp = client.post(format!("{}/v1/events/hostile.kvwrites", host.url)).body("63 250000").send().await;
        assert_eq!(resp.unwrap().status().as_u16(), 202, "event {i}");
    }
    wait_handled(&host.url, "hostile", EVENTS as u64).await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", host.child.id())).unwrap();
    let hwm: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let grew_mib = hwm.saturating_sub(rss_before) / 1024;
    println!("{EVENTS} events of 16 MiB of kv writes: RSS {} MiB before, peak {} MiB", rss_before / 1024, hwm / 1024);
    // (About 150 MiB: two attempts running and two waiting, each up to 32 MiB, and the log's
    // own; unbounded, about 450 MiB and more with the events.)
    assert!(grew_mib < 300, "the host grew by {grew_mib} MiB for {EVENTS} events of 16 MiB of kv writes");
}

// ---------------------------------------------------------------------------------------------
// 2. An ingress publish the bus cannot take in time answers 503 + Retry-After.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_into_a_full_queue_gets_503_with_retry_after_instead_of_hanging() {
    let t = TestHost::start_with(&["faulty"], |c| {
        set_flow(c, "faulty", 1, 1);
        c.api.publish_timeout = Duration::from_millis(300);
    })
    .await;
    let client = reqwest::Client::new();
    let post = |body: &'static str| {
        client.post(format!("{}/v1/events/faulty.slow", t.url())).body(body).timeout(Duration::from_secs(20)).send()
    };
    // One runs (4 s), one waits in the plugin's queue of 1: the queue is full.
    assert_eq!(post("4000").await.unwrap().status().as_u16(), 202);
    assert_eq!(post("4000").await.unwrap().status().as_u16(), 202);
    eventually("faulty runs one event and has one queued", || {
        t.counter("faulty", "in_flight") == 1 && t.counter("faulty", "queued") == 1
    })
    .await;

    let started = Instant::now();
    let resp = post("0").await.expect("an answer, not a hang");
    let waited = started.elapsed();
    let retry_after = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
    let (status, error) = json_error(resp).await;
    println!("answered {status} after {waited:?}, Retry-After {retry_after:?}: {error}");
    assert_eq!(status, 503, "{error}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(error.contains("api.publish_timeout") && error.contains("queue is full"), "{error}");
    // The advice names who drops a retried copy and who sees it again.
    assert!(error.contains("same ce-id") && error.contains("duplicate window"), "{error}");
    assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(2), "answered after {waited:?}");
    let text = metrics_text(&t.url()).await;
    assert_eq!(sample(&text, "plugbus_ingress_timeouts_total"), Some(1.0), "{text}");
}

// ---------------------------------------------------------------------------------------------
// 3. The token, web pages, DNS rebinding.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_token_must_match_exactly_whatever_its_length() {
    // The comparison itself is constant-time by construction (SHA-256 digests compared with
    // `subtle::ConstantTimeEq`); timing is not measured here (too noisy on a shared machine).
    let t = TestHost::start_with(&["audit"], |c| c.api_token = Some("s3cret-token".into())).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/events/orders.created", t.url());
    for wrong in ["", "s", "s3cret-toke", "s3cret-tokeN", "s3cret-token2", "S3CRET-TOKEN", "s3cret-token\u{0}"] {
        let value = format!("Bearer {wrong}");
        let Ok(resp) = client.post(&url).header("authorization", value).body("{}").send().await else { continue };
        assert_eq!(resp.status().as_u16(), 401, "token {wrong:?} was accepted");
    }
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let resp = client.post(&url).header("authorization", format!("{scheme} s3cret-token")).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 202, "scheme {scheme}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_page_cannot_post_events_unless_its_origin_is_allowed() {
    let t = TestHost::start_with(&["audit"], |c| c.api.allowed_origins = vec!["https://dash.example".into()]).await;
    let mut seen = t.observe(&["orders.>"]).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/events/orders.created", t.url());

    // What `fetch(url, {method: "POST", mode: "no-cors", body: "..."})` sends from any site.
    let resp = client
        .post(&url)
        .header("origin", "https://evil.example")
        .header("sec-fetch-site", "cross-site")
        .header("sec-fetch-mode", "no-cors")
        .header("content-type", "text/plain;charset=UTF-8")
        .body(r#"{"order_id":"forged"}"#)
        .send()
        .await
        .unwrap();
    let (status, error) = json_error(resp).await;
    assert_eq!(status, 403, "{error}");
    assert!(error.contains("https://evil.example") && error.contains("api.allowed_origins"), "{error}");
    // Review 62c F3: what a refused page names is echoed cut (it was logged and answered
    // whole: 300 KB lines from one request, without a token)
    for (name, value) in [("origin", format!("https://{}.example", "b".repeat(100_000))), ("host", "c".repeat(100_000))]
    {
        let resp = client.post(&url).header(name, value).body("{}").send().await.unwrap();
        let (status, error) = json_error(resp).await;
        assert_eq!(status, 403, "{name}: {error}");
        let shown = if name == "origin" { "bbbbbbbb" } else { "cccccccc" };
        assert!(error.len() < 2048 && error.contains(shown), "{name}: {} bytes", error.len());
    }
    // A page on another port of this machine is a web page too.
    let resp = client
        .post(&url)
        .header("origin", "http://localhost:3000")
        .header("sec-fetch-site", "same-site")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    // A no-cors GET (an <img>, a link) carries no Origin, only fetch metadata.
    let resp = client.get(format!("{}/v1/dlq", t.url())).header("sec-fetch-site", "cross-site").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 403);
    assert!(seen.drain(Duration::from_millis(300)).await.is_empty(), "a refused request published an event");

    // The allowed origin: preflight and POST, with CORS headers.
    let pre = client
        .request(reqwest::Method::OPTIONS, &url)
        .header("origin", "https://dash.example")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type, ce-id")
        .send()
        .await
        .unwrap();
    assert_eq!(pre.status().as_u16(), 204);
    assert_eq!(pre.headers()["access-control-allow-origin"], "https://dash.example");
    assert_eq!(pre.headers()["access-control-allow-headers"], "content-type, ce-id");
    let ok = client.post(&url).header("origin", "https://dash.example").body("{}").send().await.unwrap();
    assert_eq!(ok.status().as_u16(), 202);
    assert_eq!(ok.headers()["access-control-allow-origin"], "https://dash.example");
    seen.next_on("orders.created").await;
    // No Origin at all (curl, the CLI, a webhook sender): as before.
    let ok = client.post(&url).header("sec-fetch-site", "none").body("{}").send().await.unwrap();
    assert_eq!(ok.status().as_u16(), 202);
    let ok = client.post(&url).body("{}").send().await.unwrap();
    assert_eq!(ok.status().as_u16(), 202);
    let text = metrics_text(&t.url()).await;
    assert_eq!(sample(&text, "plugbus_api_browser_refused_total"), Some(5.0), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_host_name_is_refused_on_a_loopback_listener() {
    let t = TestHost::start(&["audit"]).await;
    let port = t.host.http_addr().unwrap().port();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/events/orders.created", t.url());
    // DNS rebinding: evil.example resolves to 127.0.0.1 after the page loaded; the browser
    // sends the page's own name as Host (and no Origin on a same-origin GET).
    for host in [format!("evil.example:{port}"), "evil.example".into(), format!("localhost.evil.example:{port}")] {
        let resp = client.post(&url).header("host", &host).body("{}").send().await.unwrap();
        let (status, error) = json_error(resp).await;
        assert_eq!(status, 403, "Host {host}: {error}");
        assert!(error.contains(&host) && error.contains("loopback"), "{error}");
        let resp = client.get(format!("{}/v1/plugins", t.url())).header("host", &host).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 403, "GET with Host {host}");
    }
    for host in [format!("localhost:{port}"), format!("127.0.0.1:{port}"), format!("[::1]:{port}"), "localhost".into()]
    {
        let resp = client.post(&url).header("host", &host).body("{}").send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 202, "Host {host}");
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Live tails: a bounded number, each with a bounded buffer.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_tails_are_limited_and_counted() {
    let t = TestHost::start_with(&[], |c| c.api.max_tails = 2).await;
    let tail = || reqwest::get(format!("{}/v1/events/orders.*", t.url()));
    let first = tail().await.unwrap();
    let second = tail().await.unwrap();
    assert_eq!((first.status().as_u16(), second.status().as_u16()), (200, 200));
    let third = tail().await.unwrap();
    assert!(third.headers().contains_key("retry-after"));
    let (status, error) = json_error(third).await;
    assert_eq!(status, 503, "{error}");
    assert!(error.contains("api.max_tails"), "{error}");
    let text = metrics_text(&t.url()).await;
    assert_eq!(sample(&text, "plugbus_tails_open"), Some(2.0), "{text}");
    assert_eq!(sample(&text, "plugbus_tails_refused_total"), Some(1.0), "{text}");
    // A client that goes away frees its slot.
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(30);
    let again = loop {
        let r = tail().await.unwrap();
        if r.status().as_u16() == 200 {
            break r;
        }
        assert!(Instant::now() < deadline, "the closed tail's slot never came back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    drop((second, again));
}

// ---------------------------------------------------------------------------------------------
// 5. A replay cut off midway loses no dead letter.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dlq_replay_cancelled_midway_loses_no_dead_letter() {
    let t = TestHost::start_with(&["faulty"], |c| {
        fast_retries(c);
        set_flow(c, "faulty", 1, 1);
    })
    .await;
    let mut dead = t.observe(&["plugbus.dlq.faulty"]).await;
    let mut rejects = t.observe(&["faulty.reject"]).await;
    for _ in 0..3 {
        t.publish("faulty.reject", "").await;
        dead.next_on("plugbus.dlq.faulty").await;
    }
    let client = reqwest::Client::new();
    let list = || async {
        let v: Value = client.get(format!("{}/v1/dlq", t.url())).send().await.unwrap().json().await.unwrap();
        v["dead_letters"].as_array().unwrap().iter().map(|e| e["event"]["id"].as_str().unwrap().to_string()).collect()
    };
    let kept: Vec<String> = list().await;
    assert_eq!(kept.len(), 3);

    // Fill faulty's queue (one running for 1.5 s, one waiting), so the replay's publishes wait.
    t.publish("faulty.slow", "1500").await;
    t.publish("faulty.slow", "1500").await;
    eventually("faulty is busy with a full queue", || {
        t.counter("faulty", "in_flight") == 1 && t.counter("faulty", "queued") == 1
    })
    .await;
    // The client gives up 200 ms into the replay.
    let cut =
        client.post(format!("{}/v1/dlq/replay?plugin=faulty", t.url())).timeout(Duration::from_millis(200)).send();
    assert!(cut.await.is_err(), "the replay answered before the queue had room");
    // It goes on after its client left; a second bulk replay meanwhile is refused (two at once
    // would both read, and on NATS both replay, the same dead letters).
    let second = client.post(format!("{}/v1/dlq/replay?plugin=faulty", t.url())).send().await.unwrap();
    assert_eq!(second.status(), 409, "a second replay ran beside the first");
    let body: Value = second.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("a replay of dead letters is under way"), "{body}");

    // Every dead letter is replayed anyway (or, had the bus refused it, still kept).
    let mut replayed = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let still: Vec<String> = list().await;
        let missing: Vec<&String> = kept.iter().filter(|id| !replayed.contains(*id) && !still.contains(id)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "dead letters lost by a cancelled replay: {missing:?}");
        for ev in rejects.drain(Duration::from_millis(200)).await {
            if let Some(of) = ev.header("plugbus-replay-of") {
                replayed.insert(of.to_string());
            }
        }
    }
    println!("replayed after the client left: {replayed:?}");
    // Once it is done, a replay is taken again.
    let again = client.post(format!("{}/v1/dlq/replay?plugin=faulty", t.url())).send().await.unwrap();
    assert_eq!(again.status(), 200, "{:?}", again.text().await);
}

/// A bulk replay stops trying a plugin once the bus did not take two of its replays in a row
/// within `api.publish_timeout`: the rest of its dead letters are kept untried. Before, each
/// waited the timeout in turn (10,000 dead letters of a stuck plugin held the replay 14 hours, every other
/// bulk replay refused meanwhile; on core NATS each was re-published into a plugin dropping
/// it). Other plugins' dead letters in the same replay are replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_replay_stops_trying_a_plugin_whose_replay_was_not_taken_and_keeps_the_rest() {
    const EACH: usize = 4;
    let t = TestHost::start_with(&["faulty", "hostile"], |c| {
        fast_retries(c);
        c.api.publish_timeout = Duration::from_millis(300);
        set_flow(c, "faulty", 1, 1);
    })
    .await;
    let mut faulty_dead = t.observe(&["plugbus.dlq.faulty"]).await;
    let mut hostile_dead = t.observe(&["plugbus.dlq.hostile"]).await;
    for _ in 0..EACH {
        t.publish("faulty.reject", "").await;
        faulty_dead.next_on("plugbus.dlq.faulty").await;
        t.publish("hostile.zzz", "").await;
        hostile_dead.next_on("plugbus.dlq.hostile").await;
    }
    let ids =
        |plugin| -> Vec<String> { t.host.dead_letters().list(Some(plugin)).into_iter().map(|d| d.event.id).collect() };
    let faultys = ids("faulty");
    assert_eq!((faultys.len(), ids("hostile").len()), (EACH, EACH));
    // faulty busy for 6 s with a full queue: its replays find no room.
    t.publish("faulty.slow", "3000").await;
    t.publish("faulty.slow", "3000").await;
    eventually("faulty is busy with a full queue", || {
        t.counter("faulty", "in_flight") == 1 && t.counter("faulty", "queued") == 1
    })
    .await;
    let client = reqwest::Client::new();
    let report: Value = client.post(format!("{}/v1/dlq/replay", t.url())).send().await.unwrap().json().await.unwrap();
    // hostile's are replayed; of faulty's, two are tried and the rest kept untried.
    let replayed: Vec<&str> =
        report["replayed"].as_array().unwrap().iter().map(|r| r["dead_letter"].as_str().unwrap()).collect();
    assert_eq!(replayed.len(), EACH, "{report}");
    assert!(replayed.iter().all(|id| !faultys.iter().any(|f| f == id)), "{report}");
    assert_eq!(report["failed"], EACH, "{report}");
    assert_eq!(report["not_taken"], 2, "{report}");
    assert_eq!(report["untried"], EACH - 2, "each of faulty's was tried in turn: {report}");
    assert_eq!(report["gave_up"][0]["plugin"], "faulty", "{report}");
    assert_eq!(report["gave_up"][0]["untried"], EACH - 2, "{report}");
    assert!(report["gave_up"][0]["why"].as_str().unwrap().contains("api.publish_timeout"), "{report}");
    // `plugbus dlq replay` on a terminal (one by one, with a progress bar) stops the same way.
    let (bin, url) = (plugbus_bin(), t.url());
    let cli = tokio::task::spawn_blocking(move || {
        let line = format!("{} dlq replay --plugin faulty --url {url}", bin.display());
        Command::new("script").args(["-qec", &line, "/dev/null"]).stdin(Stdio::null()).output().unwrap()
    })
    .await
    .unwrap();
    let shown = String::from_utf8_lossy(&cli.stdout);
    assert!(cli.status.success(), "{shown}");
    assert!(shown.contains("4 kept (the bus did not take them), 2 of them not tried"), "{shown}");
    assert!(shown.contains("plugin faulty's replays were not taken"), "{shown}");
    // Every one of faulty's is still kept, and replayed once faulty has room again.
    let mut kept = ids("faulty");
    kept.sort();
    let mut expected = faultys.clone();
    expected.sort();
    assert_eq!(kept, expected);
    eventually("faulty is done", || t.counter("faulty", "in_flight") == 0 && t.counter("faulty", "queued") == 0).await;
    let again = t.replay_dead_letters("faulty").await;
    assert_eq!(again["replayed"].as_array().unwrap().len(), EACH, "{again}");
    assert_eq!((again["failed"].as_u64(), again["untried"].as_u64()), (Some(0), Some(0)), "{again}");
}

/// A replay of one plugin's dead letter goes to that plugin alone on the embedded bus: a
/// co-subscriber of its subject stuck with a full queue (faulty, busy) does not hold it back.
/// Before, the replay waited for room in every subscriber of its subject, including those that
/// would let it go unrun, was not taken within `api.publish_timeout`, and was kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_is_not_held_back_by_a_stuck_plugin_it_is_not_for() {
    let t = TestHost::start_with(&["faulty", "echo"], |c| {
        fast_retries(c);
        c.api.publish_timeout = Duration::from_millis(300);
        set_flow(c, "faulty", 1, 1);
    })
    .await;
    // A dead letter of echo's on a subject faulty subscribes to too (`faulty.*`).
    let mut dead = plugbus::deadletter::dead_letter_event(
        &plugbus::Event::new("faulty.ok", "{}"),
        "echo",
        "plugbus.dlq.echo",
        "failed in echo",
        1,
    );
    plugbus::deadletter::mark_failed_in(&mut dead, "echo");
    t.host.dead_letters().push("echo", dead);
    // faulty busy for 6 s with a full queue (echo handles both at once).
    t.publish("faulty.slow", "3000").await;
    t.publish("faulty.slow", "3000").await;
    eventually("faulty is busy with a full queue", || {
        t.counter("faulty", "in_flight") == 1 && t.counter("faulty", "queued") == 1
    })
    .await;
    t.wait_counter("echo", "ok", 2).await;
    let report = t.replay_dead_letters("echo").await;
    assert_eq!(report["replayed"].as_array().map(Vec::len), Some(1), "{report}");
    assert_eq!((report["failed"].as_u64(), report["not_taken"].as_u64()), (Some(0), Some(0)), "{report}");
    t.wait_counter("echo", "ok", 3).await;
    assert!(t.host.dead_letters().list(Some("echo")).is_empty(), "echo's dead letter was replayed and forgotten");
    assert_eq!(t.counter("faulty", "replays_let_go"), 0, "faulty was given echo's replay");
}

/// Whole dead-letter listings are built two at once: each copies the records of the dead
/// letters it lists (up to the store's 64 MiB, several times that in heap), and one client's
/// 128 connections at once copied the store 128 times. One more is answered `503` with
/// `Retry-After`; summaries (what the dashboard asks) copy no record and are always answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_dead_letter_listings_are_built_two_at_once() {
    let t = with_big_dead_letters(40).await;
    let client = reqwest::Client::new();
    let get = |query: &'static str| {
        let (client, url) = (client.clone(), format!("{}/v1/dlq{query}", t.url()));
        async move {
            let resp = client.get(url).send().await.unwrap();
            let retry_after = resp.headers().get("retry-after").is_some();
            (resp.status().as_u16(), retry_after, resp.text().await.unwrap())
        }
    };
    let whole: Vec<_> = (0..12).map(|_| tokio::spawn(get(""))).collect();
    let summary = get("?summary=true").await;
    assert_eq!(summary.0, 200, "a summary was refused: {}", summary.2);
    let mut answers = Vec::new();
    for w in whole {
        answers.push(w.await.unwrap());
    }
    let built = answers.iter().filter(|a| a.0 == 200).count();
    let refused: Vec<_> = answers.iter().filter(|a| a.0 == 503).collect();
    assert_eq!(built + refused.len(), answers.len(), "{:?}", answers.iter().map(|a| a.0).collect::<Vec<_>>());
    assert!(built >= 2, "{built} built");
    assert!(!refused.is_empty(), "12 whole listings at once were all built");
    for (_, retry_after, body) in refused {
        assert!(retry_after, "a 503 without Retry-After");
        assert!(body.contains("whole dead-letter listings are being built") && body.contains("summary=true"), "{body}");
    }
    // Once they are done, a whole listing is built again.
    assert_eq!(get("").await.0, 200);
}

/// A host whose `picky` dead-lettered `dead` events, each dead letter's record holding 768 KiB
/// of kv values its attempt read (a whole listing of 40 is its 16 MiB).
async fn with_big_dead_letters(dead: u64) -> TestHost {
    with_big_dead_letters_and(dead, |_| {}).await
}

/// [`with_big_dead_letters`], the config changed by `configure` too.
async fn with_big_dead_letters_and(dead: u64, configure: impl FnOnce(&mut Config)) -> TestHost {
    let t = TestHost::start_with(&["picky"], |c| {
        c.plugins.entry("picky".into()).or_default().config.insert("limit".into(), "3".into());
        configure(c);
    })
    .await;
    let mut txn = plugbus::kv::Txn::default();
    for i in 0..5 {
        txn.set(&format!("big{i}"), vec![b'a'; 256 * 1024]);
    }
    t.host.kv().commit("picky", &txn).await.expect("kv set");
    for _ in 0..dead {
        t.publish("picky.big", "").await;
    }
    t.wait_counter("picky", "dead_lettered", dead).await;
    t
}

/// A loopback connection to `addr` whose receive buffer is 4 KiB (set before it connects, so
/// the window it offers stays small): a client that reads slowly, or not at all.
fn small_window_client(addr: std::net::SocketAddr) -> std::net::TcpStream {
    use std::os::fd::FromRawFd;
    let std::net::SocketAddr::V4(v4) = addr else { panic!("a loopback IPv4 address: {addr}") };
    // SAFETY: a new socket, its options and its connect; the fd is owned by the stream made of
    // it (closed when dropped).
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        assert!(fd >= 0, "socket()");
        let size: libc::c_int = 4096;
        let set = libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        assert_eq!(set, 0, "SO_RCVBUF");
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: v4.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from(*v4.ip()).to_be() },
            sin_zero: [0; 8],
        };
        let connected = libc::connect(
            fd,
            &sa as *const libc::sockaddr_in as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        assert_eq!(connected, 0, "connect()");
        std::net::TcpStream::from_raw_fd(fd)
    }
}

/// Review 60a L2: `?plugin=` was never checked: on NATS it made the subject read
/// (`plugbus.dlq.<plugin>`), so a bad one answered `503` and `>` listed every plugin's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_no_plugin_can_be_named_is_a_bad_request() {
    let t = TestHost::start(&["audit"]).await;
    let client = reqwest::Client::new();
    for (method, path) in
        [("GET", "/v1/dlq?plugin=%3E"), ("GET", "/v1/dlq?plugin=a%20b"), ("POST", "/v1/dlq/replay?plugin=*")]
    {
        let req = match method {
            "GET" => client.get(format!("{}{path}", t.url())),
            _ => client.post(format!("{}{path}", t.url())),
        };
        let (status, error) = json_error(req.send().await.unwrap()).await;
        assert_eq!(status, 400, "{method} {path}: {error}");
        assert!(error.contains("is not a plugin's name"), "{error}");
    }
    let listed = client.get(format!("{}/v1/dlq?plugin=audit", t.url())).send().await.unwrap();
    assert_eq!(listed.status().as_u16(), 200);
}

/// Review 60a H1: a whole listing's turn was let go once the listing was built, before a byte of
/// it was sent, and a client may read its answer as slowly as a few KiB every half minute: 128
/// connections of one address held 128 listings of 16 MiB. Now the turn is held until the
/// client has taken the answer: while two clients read theirs slowly, a third whole listing is
/// answered `503` (a summary still `200`), and once they hang up, it is built again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_listing_holds_its_turn_until_its_client_has_taken_it() {
    use std::io::{Read, Write};
    let t = with_big_dead_letters(40).await;
    let addr = t.host.http_addr().expect("HTTP API on");
    let slow: Vec<std::net::TcpStream> = (0..2)
        .map(|_| {
            let mut c = small_window_client(addr);
            write!(c, "GET /v1/dlq HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
            // The listing was built and its sending began.
            let mut first = [0u8; 1024];
            c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            c.read_exact(&mut first).unwrap();
            assert!(first.starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&first[..64]));
            c
        })
        .collect();
    let whole = reqwest::get(format!("{}/v1/dlq", t.url())).await.unwrap();
    let status = whole.status().as_u16();
    let body = whole.text().await.unwrap();
    assert_eq!(status, 503, "a third whole listing while two are sent slowly: {}", &body[..body.len().min(200)]);
    assert!(body.contains("being built or sent"), "{body}");
    let summary = reqwest::get(format!("{}/v1/dlq?summary=true", t.url())).await.unwrap();
    assert_eq!(summary.status().as_u16(), 200);
    drop(slow);
    let client = reqwest::Client::new();
    eventually_async("a whole listing is built again", Duration::from_secs(30), || async {
        client.get(format!("{}/v1/dlq", t.url())).send().await.unwrap().status().as_u16() == 200
    })
    .await;
}

/// Review 60c M1: a whole listing is sent within its turn, so a client reading it slowly holds
/// the turn. While writes wait on it, a client must take 256 KiB per `api.read_timeout` (some
/// progress was enough before; here the kernel's own wake-up, once half its send buffer is
/// free, already asked more of these clients, but a smaller buffer asks less): two reading
/// 1 KiB every 300 ms are cut off (what the kernel holds for them it still sends), and the two
/// turns they held are free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reading_listings_slowly_are_cut_off_and_their_turns_freed() {
    use std::io::{Read, Write};
    let t = with_big_dead_letters_and(40, |c| c.api.read_timeout = Duration::from_secs(2)).await;
    let addr = t.host.http_addr().expect("HTTP API on");
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut c = small_window_client(addr);
                write!(c, "GET /v1/dlq HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
                c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
                let mut chunk = [0u8; 1024];
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(0) = c.read(&mut chunk) {
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
        })
        .collect();
    // Both began reading (their listings built, each holding a turn), then were cut off.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let client = reqwest::Client::new();
    let freed = plugbus_tests::eventually_async("a whole listing is built again", Duration::from_secs(30), || async {
        client.get(format!("{}/v1/dlq", t.url())).send().await.unwrap().status().as_u16() == 200
    });
    freed.await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
}

/// Dead letters whose data JSON writes six times over (`\u0001`): a page of them was 400 MB,
/// built on every poll of the dashboard. A listing now holds at most 16 MiB of JSON, the newest
/// first to fit, saying how many it left out; the dashboard's summary leaves data and records
/// out and stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_listing_is_bounded_in_bytes_whatever_the_data() {
    let t = TestHost::start(&["hostile"]).await;
    let mut dead = t.observe(&["plugbus.dlq.hostile"]).await;
    // Three small ones first: older than the large ones, they still fit, and are listed.
    for _ in 0..3 {
        t.publish("hostile.zzz", "small").await;
        dead.next_on("plugbus.dlq.hostile").await;
    }
    for i in 0..12 {
        let mut data = vec![1u8; 1_000_000];
        data[..8].copy_from_slice(format!("{i:08}").as_bytes());
        t.publish("hostile.zzz", data).await;
        dead.next_on("plugbus.dlq.hostile").await;
    }
    let client = reqwest::Client::new();
    let get = |query: &'static str| {
        let client = client.clone();
        let url = format!("{}/v1/dlq?limit=100{query}", t.url());
        async move { client.get(url).send().await.unwrap().bytes().await.unwrap() }
    };
    let whole = get("").await;
    assert!(whole.len() <= (16 << 20) + 4096, "a listing of {} bytes", whole.len());
    let v: Value = serde_json::from_slice(&whole).unwrap();
    let listed = v["dead_letters"].as_array().unwrap();
    assert_eq!(v["total"], 15);
    assert_eq!(v["left_out"].as_u64().unwrap() as usize + listed.len(), 15, "{}", v["left_out"]);
    let data = |e: &Value| e["event"]["data"].as_str().unwrap().chars().take(8).collect::<String>();
    let shown: Vec<String> = listed.iter().map(data).collect();
    // The newest large ones that fit, whole, then the older small ones past those left out.
    assert_eq!(shown[..3], ["small", "small", "small"], "{shown:?}");
    assert!(shown.len() > 3 && shown.len() < 15, "{shown:?}");
    assert_eq!(shown.last().unwrap(), "00000011", "{shown:?}");
    let summary = get("&summary=true").await;
    assert!(summary.len() < 64 << 10, "a summary of {} bytes", summary.len());
    let v: Value = serde_json::from_slice(&summary).unwrap();
    let listed = v["dead_letters"].as_array().unwrap();
    assert_eq!((listed.len(), v["left_out"].as_u64()), (15, Some(0)));
    let first = &listed[3];
    assert!(first["event"].get("data").is_none() && first.get("record").is_none(), "{first}");
    assert_eq!(first["event"]["data_bytes"], 1_000_000);
    assert_eq!(first["kept_by"], "host");
    assert!(first["event"]["headers"].to_string().contains("plugbus-error"), "{first}");
    // `plugbus dlq export` exports every one: what the listing left out, one by one.
    let out = Command::new(plugbus_bin()).args(["dlq", "export", "--url", &t.url()]).output().unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 15, "{stderr}");
}

/// Dead letters of events with hundreds of large headers: each summary (what the dashboard polls
/// every 2 s, and which waits for no turn) copied every header under the store's lock, on a
/// runtime thread: 20 of them were a 10 MB summary, copied again by every request. A summary
/// lists the host's own headers and the first 64 of the others, each cut at 256 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_summary_stays_small_whatever_the_headers() {
    let t = TestHost::start(&["hostile"]).await;
    let mut dead = t.observe(&["plugbus.dlq.hostile"]).await;
    for i in 0..20 {
        let mut ev = plugbus::Event::new("hostile.zzz", format!("{i}"));
        for h in 0..500 {
            ev = ev.with_header(&format!("h{h:03}"), "v".repeat(1000));
        }
        t.host.publish(ev).await.unwrap();
        dead.next_on("plugbus.dlq.hostile").await;
    }
    let url = format!("{}/v1/dlq?limit=100&summary=true", t.url());
    let summary = reqwest::get(url).await.unwrap().bytes().await.unwrap();
    assert!(summary.len() < 1 << 20, "a summary of {} bytes", summary.len());
    let v: Value = serde_json::from_slice(&summary).unwrap();
    let listed = v["dead_letters"].as_array().unwrap();
    assert_eq!((listed.len(), v["left_out"].as_u64()), (20, Some(0)));
    let headers = listed[0]["event"]["headers"].as_array().unwrap();
    let theirs: Vec<_> = headers.iter().filter(|h| !h[0].as_str().unwrap().starts_with("plugbus-")).collect();
    assert_eq!(theirs.len(), 64, "{headers:?}");
    assert_eq!(theirs[0][0], "h000");
    assert!(theirs[0][1].as_str().unwrap().contains("[cut at 256 of 1000 bytes]"), "{}", theirs[0][1]);
    assert!(headers.iter().any(|h| h[0] == "plugbus-error"), "{headers:?}");
    // The whole listing still has every header.
    let url = format!("{}/v1/dlq?limit=1", t.url());
    let whole: Value = reqwest::get(url).await.unwrap().json().await.unwrap();
    let headers = whole["dead_letters"][0]["event"]["headers"].as_array().unwrap();
    assert!(headers.len() >= 500, "{}", headers.len());
}

// ---------------------------------------------------------------------------------------------
// 6. What a client must not inject.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_refuses_system_subjects_and_the_hosts_own_headers() {
    let t = TestHost::start(&["audit"]).await;
    let client = reqwest::Client::new();
    for subject in ["$SYS.ACCOUNT.x", "$JS.API.STREAM.DELETE.ORDERS", "$KV.plugbus_payments.k", "_INBOX.abc.def"] {
        let resp = client.post(format!("{}/v1/events/{subject}", t.url())).body("{}").send().await.unwrap();
        let (status, error) = json_error(resp).await;
        assert_eq!(status, 400, "{subject}: {error}");
        assert!(error.contains(subject) && error.contains("system subject"), "{error}");
    }
    // A forged dead letter: listed and replayed as a plugin's, and on NATS kept in PLUGBUS_DLQ
    // before the real ones.
    for path in ["/v1/events/plugbus.dlq.audit", "/v1/request/plugbus.dlq.audit"] {
        let resp = client.post(format!("{}{path}", t.url())).body("{}").send().await.unwrap();
        let (status, error) = json_error(resp).await;
        assert_eq!(status, 400, "{path}: {error}");
        assert!(error.contains("plugbus.dlq.audit") && error.contains("dead-letter subject"), "{error}");
    }
    let url = format!("{}/v1/events/orders.created", t.url());
    // Review 60a L3: `nats-` headers too (they went on to NATS as the event's headers).
    for header in ["plugbus-error", "Plugbus-Original-Subject", "ce-plugbus-plugin", "Nats-Rollup", "ce-nats-ttl"] {
        let resp = client.post(&url).header(header, "forged").body("{}").send().await.unwrap();
        let (status, error) = json_error(resp).await;
        assert_eq!(status, 400, "{header}: {error}");
        assert!(error.contains(&header.to_ascii_lowercase()) && error.contains("reserved"), "{error}");
    }
    let body = r#"{"specversion":"1.0","id":"s-1","source":"/s","type":"t","plugbus-error":"forged"}"#;
    let resp =
        client.post(&url).header("content-type", "application/cloudevents+json").body(body).send().await.unwrap();
    let (status, error) = json_error(resp).await;
    assert_eq!(status, 400, "{error}");
    assert!(error.contains("plugbus-error"), "{error}");
    for member in ["ce-plugbus-error", "nats-rollup"] {
        let body = format!(r#"{{"specversion":"1.0","id":"s-2","source":"/s","type":"t","{member}":"forged"}}"#);
        let resp =
            client.post(&url).header("content-type", "application/cloudevents+json").body(body).send().await.unwrap();
        let (status, error) = json_error(resp).await;
        assert_eq!(status, 400, "{member}: {error}");
        assert!(error.contains(member) && error.contains("reserved"), "{error}");
    }
    let plain_id = client.post(&url).header("Nats-Msg-Id", "m-1").body("{}").send().await.unwrap();
    assert_eq!(plain_id.status().as_u16(), 202, "a plain message's id is the client's");
    assert_eq!(client.post(&url).header("ce-tenant", "acme").body("{}").send().await.unwrap().status().as_u16(), 202);
    // A client's credentials never become the event's headers (every plugin would see them,
    // the log keep them, a tail show them).
    let mut seen = t.observe(&["orders.created"]).await;
    let resp = client
        .post(&url)
        .header("cookie", "session=s3cret")
        .header("proxy-authorization", "Basic czNjcmV0")
        .header("x-tenant", "acme")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let ev = seen.next_on("orders.created").await;
    assert_eq!((ev.header("cookie"), ev.header("proxy-authorization")), (None, None), "{:?}", ev.extensions);
    assert_eq!(ev.header("x-tenant"), Some("acme"), "other headers still come through");
    // Where the JSON format keeps the data: as an extension it was read as the data by
    // `tail --record` and `dlq export`, or made their record unreadable.
    for header in ["ce-data", "data_base64"] {
        let resp = client.post(&url).header(header, "forged").body("{}").send().await.unwrap();
        let (status, error) = json_error(resp).await;
        assert_eq!(status, 400, "{header}: {error}");
        assert!(error.contains("is reserved") && error.contains("data"), "{error}");
    }

    // An envelope inside the envelope: its dead letter, read back from a broker, would be the
    // inner event (any plugin, any original subject), and replay would publish it.
    let inner = r#"{"specversion":"1.0","id":"x","source":"/s","type":"t","plugbus-plugin":"payments"}"#;
    let body = serde_json::json!({"specversion": "1.0", "id": "s-2", "source": "/s", "type": "t",
        "datacontenttype": "application/cloudevents+json", "data": inner});
    let resp = client.post(&url).header("content-type", "application/cloudevents+json").body(body.to_string());
    let (status, error) = json_error(resp.send().await.unwrap()).await;
    assert_eq!(status, 400, "{error}");
    assert!(error.contains("`datacontenttype`") && error.contains("envelope"), "{error}");
    // A 512 KiB id would be copied into every output the event causes (`plugbus-caused-by`).
    let id = "i".repeat(512 << 10);
    let body = serde_json::json!({"specversion": "1.0", "id": id, "source": "/s", "type": "t"});
    let resp = client.post(&url).header("content-type", "application/cloudevents+json").body(body.to_string());
    let (status, error) = json_error(resp.send().await.unwrap()).await;
    assert_eq!(status, 400, "{}", &error[..error.len().min(300)]);
    assert!(error.contains("attribute `id` is 524288 bytes"), "{}", &error[..error.len().min(300)]);

    // Nor may a client tail what it may not publish: on NATS the server would stream every
    // plugin's kv writes or every reply to it.
    for pattern in ["$KV.>", "$SYS.>", "_INBOX.>", "$KV.plugbus_payments.balance"] {
        let (status, error) = json_error(reqwest::get(format!("{}/v1/events/{pattern}", t.url())).await.unwrap()).await;
        assert_eq!(status, 400, "{pattern}: {error}");
        assert!(error.contains(pattern) && error.contains("system subject"), "{error}");
    }
}

// ---------------------------------------------------------------------------------------------
// 7. CloudEvents that are not.

/// A request that is a CloudEvent in name (binary or structured) but not a valid 1.0 one.
struct Invalid {
    name: &'static str,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
    /// What the 400 must name.
    names: &'static str,
}

const STRUCTURED: (&str, &str) = ("content-type", "application/cloudevents+json");

const INVALID: &[Invalid] = &[
    Invalid {
        name: "structured 0.1 without id (the issue's example)",
        headers: &[STRUCTURED],
        body: r#"{"specversion":"0.1","type":"t","source":"/s"}"#,
        names: "specversion",
    },
    Invalid {
        name: "structured 2.0",
        headers: &[STRUCTURED],
        body: r#"{"specversion":"2.0","id":"1","type":"t","source":"/s"}"#,
        names: "specversion",
    },
    Invalid {
        name: "structured without specversion",
        headers: &[STRUCTURED],
        body: r#"{"id":"1","type":"t","source":"/s"}"#,
        names: "specversion",
    },
    Invalid {
        name: "structured without id",
        headers: &[STRUCTURED],
        body: r#"{"specversion":"1.0","type":"t","source":"/s"}"#,
        names: "`id`",
    },
    Invalid {
        name: "structured with an empty id",
        headers: &[STRUCTURED],
        body: r#"{"specversion":"1.0","id":"","type":"t","source":"/s"}"#,
        names: "`id`",
    },
    Invalid {
        name: "structured with a numeric id",
        headers: &[STRUCTURED],
        body: r#"{"specversion":"1.0","id":7,"type":"t","source":"/s"}"#,
        names: "`id`",
    },
    Invalid {
        name: "structured without source",
        headers: &[STRUCTURED],
        body: r#"{"specversion":"1.0","id":"1","type":"t"}"#,
        names: "`source`",
    },
    Invalid {
        name: "structured without type",
        headers: &[STRUCTURED],
        body: r#"{"specversion":"1.0","id":"1","source":"/s"}"#,
        names: "`type`",
    },
    Invalid {
        name: "binary 0.1",
        headers: &[("ce-specversion", "0.1"), ("ce-id", "1"), ("ce-source", "/s"), ("ce-type", "t")],
        body: "{}",
        names: "specversion",
    },
    Invalid {
        name: "binary without ce-id",
        headers: &[("ce-specversion", "1.0"), ("ce-source", "/s"), ("ce-type", "t")],
        body: "x",
        names: "ce-id",
    },
    Invalid {
        name: "binary with an empty ce-id",
        headers: &[("ce-specversion", "1.0"), ("ce-id", ""), ("ce-source", "/s"), ("ce-type", "t")],
        body: "x",
        names: "ce-id",
    },
    Invalid {
        name: "binary without ce-source",
        headers: &[("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-type", "t")],
        body: "x",
        names: "ce-source",
    },
    Invalid {
        name: "binary without ce-type",
        headers: &[("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-source", "/s")],
        body: "x",
        names: "ce-type",
    },
    Invalid {
        name: "binary 0.3 (a CloudEvents version this host does not read)",
        headers: &[("ce-specversion", "0.3"), ("ce-id", "1"), ("ce-source", "/s"), ("ce-type", "t")],
        body: "x",
        names: "specversion",
    },
];

async fn post_raw(url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> (u16, String) {
    let mut req = reqwest::Client::new().post(url).body(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    json_error(req.send().await.unwrap()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_cloudevent_over_http_gets_400_naming_the_attribute() {
    let t = TestHost::start(&["audit"]).await;
    let mut seen = t.observe(&["orders.>"]).await;
    let url = format!("{}/v1/events/orders.created", t.url());
    for case in INVALID {
        let (status, error) = post_raw(&url, case.headers, case.body.into()).await;
        assert_eq!(status, 400, "{}: {error}", case.name);
        assert!(error.contains(case.names), "{}: the error does not name {}: {error}", case.name, case.names);
    }
    assert!(seen.drain(Duration::from_millis(300)).await.is_empty(), "an invalid CloudEvent was published");
    // No CloudEvents marker: a plain event, as before (ce- headers without ce-specversion too).
    let (status, _) = post_raw(&url, &[("content-type", "text/plain")], b"hello".to_vec()).await;
    assert_eq!(status, 202);
    let (status, _) = post_raw(&url, &[("ce-id", "plain-1"), ("ce-tenant", "acme")], b"{}".to_vec()).await;
    assert_eq!(status, 202);
    assert_eq!(seen.next_on("orders.created").await.data, "hello");
    assert_eq!(seen.next_on("orders.created").await.id, "plain-1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_cloudevent_on_nats_is_dead_lettered_unrun() {
    let server = NatsServer::start().await;
    let t = TestHost::start_on(&Bus::Core(&server), &["attrs"], |_| {}).await;
    let mut dlq = t.observe(&["plugbus.dlq.>"]).await;
    let client = server.client().await;
    for (i, case) in INVALID.iter().enumerate() {
        let mut h = async_nats::HeaderMap::new();
        for (k, v) in case.headers {
            h.insert(*k, *v);
        }
        client.publish_with_headers(format!("ce.invalid.{i}"), h, case.body.into()).await.unwrap();
        let dead = dlq.next_on("plugbus.dlq.attrs").await;
        let why = dead.header("plugbus-error").unwrap();
        assert!(why.contains("not a valid event") && why.contains(case.names), "{}: {why}", case.name);
        assert_eq!(dead.header("plugbus-attempts"), Some("0"), "{}", case.name);
        assert_eq!(dead.header("plugbus-original-subject"), Some(format!("ce.invalid.{i}").as_str()));
    }
    assert_eq!((t.counter("attrs", "attempts"), t.counter("attrs", "ok")), (0, 0), "an invalid event ran");
}

/// The official CloudEvents SDK for Python (`cloudevents` on PyPI) in `target/py`: `None` (the
/// test is skipped, said on stderr) when it cannot be installed outside CI; in CI a failure.
fn python_cloudevents() -> Option<std::path::PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR").map(Into::into).unwrap_or_else(|| workspace().join("target"));
    let dir: std::path::PathBuf = target.join("py");
    let ci = std::env::var("CI").is_ok_and(|v| v == "true" || v == "1");
    let installed = |dir: &std::path::Path| dir.join("cloudevents").join("core").join("bindings").is_dir();
    if !installed(&dir) {
        eprintln!("==> installing the CloudEvents Python SDK into {} (pip install cloudevents)", dir.display());
        let status = Command::new("python3")
            .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-warn-conflicts"])
            .args(["--upgrade", "--target"])
            .arg(&dir)
            .arg("cloudevents>=2.2,<3")
            .status();
        let ok = status.as_ref().is_ok_and(|s| s.success()) && installed(&dir);
        if !ok {
            let why = format!("the CloudEvents Python SDK could not be installed into {} ({status:?})", dir.display());
            assert!(!ci, "{why}: in CI this is a failure, not a skip");
            eprintln!("SKIPPED: {why}");
            return None;
        }
    }
    Some(dir)
}

fn python(dir: &std::path::Path, command: &str, input: &str) -> Value {
    use std::io::Write;
    let script = workspace().join("tests").join("py").join("cloudevents_sdk.py");
    let mut child = Command::new("python3")
        .arg(&script)
        .arg(command)
        .env("PYTHONPATH", dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running python3");
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{script:?} {command}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(A[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn unb64(s: &str) -> Vec<u8> {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let (mut out, mut acc, mut bits) = (Vec::new(), 0u32, 0);
    for c in s.bytes().filter(|c| *c != b'=') {
        acc = (acc << 6) | A.iter().position(|a| *a == c).unwrap() as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_agrees_on_what_a_cloudevent_is() {
    let Some(py) = python_cloudevents() else { return };
    let t = TestHost::start(&[]).await;
    let mut seen = t.observe(&["ce.py.>"]).await;

    // What the SDK makes (binary and structured, its 2.x core API and its 1.x API) is accepted
    // and read back attribute for attribute.
    let made = python(&py, "make", "");
    for (i, req) in made.as_array().unwrap().iter().enumerate() {
        let name = req["name"].as_str().unwrap();
        let headers: Vec<(String, String)> = req["headers"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
            .collect();
        let pairs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let subject = format!("ce.py.{i}");
        let body = unb64(req["body_b64"].as_str().unwrap());
        let (status, error) = post_raw(&format!("{}/v1/events/{subject}", t.url()), &pairs, body).await;
        assert_eq!(status, 202, "{name}: {error}");
        let ev = seen.next_on(&subject).await;
        let expect = &req["expect"];
        assert_eq!(
            (ev.id.as_str(), ev.source.as_str(), ev.ty.as_str()),
            (expect["id"].as_str().unwrap(), expect["source"].as_str().unwrap(), expect["type"].as_str().unwrap()),
            "{name}"
        );
        for (k, v) in expect["extensions"].as_object().unwrap() {
            assert_eq!(ev.header(k), v.as_str(), "{name}: extension {k}");
        }
        let data = unb64(expect["data_b64"].as_str().unwrap());
        if req["json_data"].as_bool().unwrap() {
            let got: Value = serde_json::from_slice(&ev.data).unwrap();
            assert_eq!(got, serde_json::from_slice::<Value>(&data).unwrap(), "{name}");
        } else {
            assert_eq!(ev.data.as_ref(), data.as_slice(), "{name}");
        }
        println!("SDK {name}: accepted and read back");
    }

    // What the host refuses, the SDK refuses too (one of its two parsers at least: they differ,
    // the 2.x one fills a missing id, the 1.x one takes an empty one); the one exception is
    // CloudEvents 0.3, an older version the SDK still reads and this host does not.
    let requests: Vec<Value> = INVALID
        .iter()
        .map(|c| {
            let headers: BTreeMap<&str, &str> = c.headers.iter().copied().collect();
            json!({ "name": c.name, "headers": headers, "body_b64": b64(c.body.as_bytes()) })
        })
        .collect();
    let verdicts = python(&py, "check", &serde_json::to_string(&requests).unwrap());
    for (case, verdict) in INVALID.iter().zip(verdicts.as_array().unwrap()) {
        let (v2, v1) = (verdict["v2"].as_str().unwrap(), verdict["v1"].as_str().unwrap());
        let (status, error) =
            post_raw(&format!("{}/v1/events/ce.py.bad", t.url()), case.headers, case.body.into()).await;
        println!("{}:\n    host: {status} {error}\n    SDK 2.x: {v2}\n    SDK 1.x: {v1}", case.name);
        assert_eq!(status, 400, "{}: {error}", case.name);
        if case.name.starts_with("binary 0.3") {
            assert!(v2 == "accepted", "the SDK no longer reads 0.3: drop this exception ({v2})");
            continue;
        }
        assert!(
            v2.starts_with("rejected") || v1.starts_with("rejected"),
            "{}: the host refuses it but the official SDK accepts it",
            case.name
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 7. Slow and idle connections.

/// Reads from `stream` until the server closes it or `within` passes: what it read, and whether
/// it was closed.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, within: Duration) -> (Vec<u8>, bool) {
    use tokio::io::AsyncReadExt;
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (got, true),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (got, false),
        }
    }
}

/// A host running `audit` whose API takes `connections` at once (`tails` of them tails) and
/// waits 1 s for a client.
async fn bounded_api(connections: usize, tails: usize) -> TestHost {
    TestHost::start_with(&["audit"], |c| {
        c.api.max_connections = connections;
        c.api.max_tails = tails;
        c.api.read_timeout = Duration::from_secs(1);
    })
    .await
}

/// The attack: connections that never finish their headers (a slowloris), or send nothing, or
/// trickle a body. Each held a file descriptor for ever: a thousand of them left the host none
/// for plugin files, compiles or its broker. Now at most `api.max_connections` are open, and
/// each is closed after `api.read_timeout` without headers (idle ones too), or answered `408`
/// when its body is not in by then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_bounded_and_closed() {
    use tokio::io::AsyncWriteExt;
    let t = bounded_api(8, 2).await;
    let addr = t.url().trim_start_matches("http://").to_string();
    // Twice the cap: half-sent headers, and connections that send nothing at all.
    let mut held = Vec::new();
    for i in 0..16 {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        if i % 2 == 0 {
            s.write_all(b"POST /v1/events/orders.created HTTP/1.1\r\nHost: localhost\r\n").await.unwrap();
        }
        held.push(s);
    }
    // A client arriving meanwhile from another address is served, at the latest once the slow
    // ones are closed (from theirs it is refused while they hold its share: see
    // `one_client_address_cannot_take_every_connection`).
    let started = Instant::now();
    let other = client_from("127.0.0.2");
    let health = other.get(format!("{}/healthz", t.url())).send().await.unwrap();
    assert_eq!(health.status().as_u16(), 200);
    assert!(started.elapsed() < Duration::from_secs(10), "served after {:?}", started.elapsed());
    // Every slow connection the server took is closed by it (those past the cap, when taken).
    for (i, s) in held.iter_mut().enumerate() {
        let (_, closed) = read_until_closed(s, Duration::from_secs(10)).await;
        assert!(closed, "connection {i} still open 10 s after the host served another client");
    }
    // A body trickled past the timeout: 408, naming the setting.
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = "POST /v1/events/orders.created HTTP/1.1\r\nHost: localhost\r\nContent-Length: 100\r\n\r\n{";
    s.write_all(head.as_bytes()).await.unwrap();
    let (answer, _) = read_until_closed(&mut s, Duration::from_secs(5)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("api.read_timeout"), "{answer}");
    // The host still serves, and nothing was accepted from the slow clients.
    let resp = reqwest::Client::new().post(format!("{}/v1/events/orders.created", t.url())).body("{}").send().await;
    assert_eq!(resp.unwrap().status().as_u16(), 202);
}

/// The attack: a client pipelining thousands of requests on one connection and never reading
/// their answers. hyper reads no further request while an answer waits to be written, so its
/// header timeout never starts, and it has no write timeout: the connection, and with
/// `max_connections` of them every slot, was held for ever. Now a write the client takes nothing
/// of for `api.read_timeout` ends the connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_reads_its_answers_loses_its_connection() {
    use tokio::io::AsyncWriteExt;
    let t = bounded_api(1, 0).await;
    let addr: std::net::SocketAddr = t.url().trim_start_matches("http://").parse().unwrap();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut hog = socket.connect(addr).await.unwrap();
    // 2,000 answers of 9 KiB: more than the socket buffers on both sides hold
    let requests = "GET /dashboard.js HTTP/1.1\r\nHost: localhost\r\n\r\n".repeat(2000);
    let writer = tokio::spawn(async move {
        let _ = hog.write_all(requests.as_bytes()).await;
        hog // never read, kept open
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let client = reqwest::Client::builder().timeout(Duration::from_secs(15)).build().unwrap();
    let health = client.get(format!("{}/healthz", t.url())).send().await;
    assert_eq!(health.map(|r| r.status().as_u16()).ok(), Some(200), "the one slot stayed taken");
    assert!(started.elapsed() < Duration::from_secs(10), "served after {:?}", started.elapsed());
    drop(writer);
}

/// A host running `audit` whose API takes 8 connections at once, `per_peer` from one address,
/// and waits 20 s for a client (its idle connections stay).
async fn shared_api(per_peer: usize) -> TestHost {
    TestHost::start_with(&["audit"], |c| {
        c.api.max_connections = 8;
        c.api.max_connections_per_peer = per_peer;
        c.api.max_tails = 2;
        c.api.read_timeout = Duration::from_secs(20);
    })
    .await
}

/// A TCP connection to the API on `port` from `ip` (Linux routes all of 127/8 to loopback),
/// sending nothing.
async fn connect_from(ip: [u8; 4], port: u16) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(std::net::SocketAddr::from((ip, 0))).unwrap();
    socket.connect(([127, 0, 0, 1], port).into()).await.unwrap()
}

/// A fresh client (no pooled connection) whose connections come from `ip` (Linux routes all of
/// 127/8 to loopback).
fn client_from(ip: &str) -> reqwest::Client {
    let ip = ip.parse::<std::net::IpAddr>().unwrap();
    reqwest::Client::builder().local_address(ip).timeout(Duration::from_secs(5)).build().unwrap()
}

/// The attack: one client opening every connection the API takes (`api.max_connections`) and
/// holding them (idle keep-alives renewed before `api.read_timeout`, long waits on
/// `/v1/request`, tails). Every other client, and the orchestrator's health probe, waited in the
/// kernel's backlog behind it: a probe timing out gets the host restarted. Now one address
/// holds at most `api.max_connections_per_peer`; one more is answered `503` naming the key, and
/// another address is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_client_address_cannot_take_every_connection() {
    let t = shared_api(3).await;
    let addr = t.url().trim_start_matches("http://").to_string();
    let port = addr.rsplit(':').next().unwrap().to_string();
    // The hog's three connections, idle, from 127.0.0.1.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Its fourth is refused at once, saying why.
    let refused = client_from("127.0.0.1").get(format!("{}/healthz", t.url())).send().await.expect("an answer");
    assert_eq!(refused.status().as_u16(), 503);
    assert_eq!(refused.headers().get("retry-after").map(|v| v.to_str().unwrap()), Some("1"));
    let why = refused.text().await.unwrap();
    assert!(why.contains("api.max_connections_per_peer") && why.contains('3'), "{why}");
    // Another address is served meanwhile (Linux routes all of 127/8 to loopback).
    let other = client_from("127.0.0.2").get(format!("http://127.0.0.1:{port}/healthz")).send().await.unwrap();
    assert_eq!(other.status().as_u16(), 200);
    // Once the hog lets go of one, it is served again.
    held.pop();
    let mut served = None;
    for _ in 0..50 {
        match client_from("127.0.0.1").get(format!("{}/healthz", t.url())).send().await {
            Ok(r) if r.status().as_u16() == 200 => {
                served = Some(());
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    assert!(served.is_some(), "the address was not served again after closing a connection");
    drop(held);
}

/// `plugbus` commands that only read ask a busy host again: a `503` with `Retry-After` (here this
/// address's share of connections, taken by another of its clients) is asked again after that
/// wait, for up to 30 s, saying so on stderr. Before, the command failed at once. A publish is
/// not sent again (one the bus did not take in time may have been taken meanwhile).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_asks_a_busy_host_again_after_its_retry_after() {
    let t = shared_api(1).await;
    let port: u16 = t.url().rsplit(':').next().unwrap().parse().unwrap();
    let held = connect_from([127, 0, 0, 1], port).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (bin, url) = (plugbus_bin(), t.url());
    let publish = Command::new(&bin).args(["publish", "--url", &url, "audit.x", "once"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&publish.stderr);
    assert!(!publish.status.success(), "{stderr}");
    assert!(stderr.contains("503") && !stderr.contains("asking again"), "{stderr}");
    let mut cli = Command::new(bin)
        .args(["plugins", "--json", "--url", &url])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let cli_stderr = cli.stderr.take().unwrap();
    let (refused, was_refused) = tokio::sync::oneshot::channel();
    let stderr = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let (mut all, mut refused) = (String::new(), Some(refused));
        for line in std::io::BufReader::new(cli_stderr).lines().map_while(Result::ok) {
            if line.contains("asking again") {
                refused.take().map(|r| r.send(()));
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    // Refused at least once before the connection goes (however long the command takes to start).
    let _ = tokio::time::timeout(Duration::from_secs(30), was_refused).await;
    drop(held);
    let out = tokio::task::spawn_blocking(move || cli.wait_with_output().unwrap()).await.unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), stderr.await.unwrap());
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("the host is busy (503")
            && stderr.contains("api.max_connections_per_peer")
            && stderr.contains("asking again in 1 s"),
        "{stderr}"
    );
    let body: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(body["plugins"][0]["name"], "audit", "{body}");
}

/// The attack: one address at its share opening connections as fast as it can, each refused.
/// Their answers linger (at most 32 at once, 200 ms each, for the request's head), and it took
/// all 32: another address over its share then got its connection closed without a word, not
/// the `503` naming the key. Now one address's refusals take at most 4 of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_refused_over_and_over_leaves_the_others_refusals_answered() {
    let t = shared_api(1).await;
    let port: u16 = t.url().rsplit(':').next().unwrap().parse().unwrap();
    let connect_from = |ip: [u8; 4]| connect_from(ip, port);
    // Each address at its share of one, idle.
    let held = (connect_from([127, 0, 0, 1]).await, connect_from([127, 0, 0, 3]).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    // The flood: 40 more from the first, sending nothing, so each lingers its 200 ms.
    let mut flood = Vec::new();
    for _ in 0..40 {
        flood.push(connect_from([127, 0, 0, 1]).await);
    }
    // The other address's next connection is refused, and told why.
    let refused = client_from("127.0.0.3")
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .expect("an answer, not a connection closed without one");
    assert_eq!(refused.status().as_u16(), 503);
    let why = refused.text().await.unwrap();
    assert!(why.contains("api.max_connections_per_peer"), "{why}");
    drop((held, flood));
}

/// The same attack from a handful of addresses, each at its share (4 × 128 fill the default
/// 512): `accept` stopped for everyone else. The last eighth of `api.max_connections` go only to
/// addresses holding fewer than two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_client_addresses_cannot_take_the_last_connections() {
    let t = shared_api(4).await;
    let port: u16 = t.url().rsplit(':').next().unwrap().parse().unwrap();
    let connect_from = |ip: [u8; 4]| connect_from(ip, port);
    // Seven of the eight: four from one address, three from another, idle.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(connect_from([127, 0, 0, 1]).await);
    }
    for _ in 0..3 {
        held.push(connect_from([127, 0, 0, 2]).await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let url = format!("http://127.0.0.1:{port}/healthz");
    // The last one is not for an address holding three, under its share of four ...
    let refused = client_from("127.0.0.2").get(&url).send().await.expect("an answer");
    assert_eq!(refused.status().as_u16(), 503);
    let why = refused.text().await.unwrap();
    assert!(why.contains("api.max_connections") && why.contains("fewer than 2"), "{why}");
    // ... it is for an address holding none.
    let served = client_from("127.0.0.3").get(&url).send().await.unwrap();
    assert_eq!(served.status().as_u16(), 200);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_bounds_of_zero_are_refused_naming_the_key() {
    let mut c = Config::default();
    c.api.max_connections = 0;
    assert!(c.validate().unwrap_err().to_string().contains("api.max_connections"));
    let mut c = Config::default();
    c.api.max_connections_per_peer = 0;
    assert!(c.validate().unwrap_err().to_string().contains("api.max_connections_per_peer"));
    let mut c = Config::default();
    c.api.read_timeout = Duration::ZERO;
    assert!(c.validate().unwrap_err().to_string().contains("api.read_timeout"));
    // tails that could take every connection
    let mut c = Config::default();
    c.api.max_connections = 16;
    assert!(
        c.validate().unwrap_err().to_string().contains("api.max_tails (16) must be below api.max_connections (16)")
    );
}
