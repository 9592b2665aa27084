//! The dashboard and what it reads: `GET /v1/stats` (the last minute per plugin, the pipeline
//! graph, rejected files), dead letters by id, and `GET /` served so that its own requests pass
//! the API's browser guard while another site's still do not.

use plugbus_tests::{TestHost, fast_retries, order};
use serde_json::Value;

async fn stats(t: &TestHost) -> Value {
    let resp = reqwest::get(format!("{}/v1/stats", t.url())).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.json().await.unwrap()
}

fn plugin<'a>(stats: &'a Value, name: &str) -> &'a Value {
    stats["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {stats}"))
}

fn has_edge(stats: &Value, from: &str, to: &str, kind: &str) -> bool {
    stats["graph"]["edges"].as_array().unwrap().iter().any(|e| e["from"] == from && e["to"] == to && e["kind"] == kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_show_the_last_minute_the_graph_and_the_rejected_files() {
    let t = TestHost::start_with(&["inventory", "payments", "shipping", "notify", "faulty"], |c| {
        fast_retries(c);
        std::fs::write(c.plugins_dir.join("broken.wasm"), b"garbage").unwrap();
    })
    .await;
    let mut dead = t.observe(&["plugbus.dlq.>"]).await;
    t.publish("orders.created", order("d-1", "widget", 1)).await;
    t.publish("faulty.retry", "").await;
    dead.next_on("plugbus.dlq.faulty").await;
    for p in ["inventory", "payments", "shipping", "notify"] {
        t.wait_counter(p, "ok", 1).await;
    }
    let s = stats(&t).await;
    assert_eq!(s["window_seconds"], 60);
    let inv = plugin(&s, "inventory");
    assert!(!inv["version"].as_str().unwrap().is_empty(), "{inv}");
    assert_eq!(inv["last_minute"]["received"], 1, "{inv}");
    assert!((inv["events_per_second"].as_f64().unwrap() - 1.0 / 60.0).abs() < 1e-9, "{inv}");
    assert!(inv["p50_ms"].as_f64().unwrap() > 0.0 && inv["p99_ms"].as_f64() >= inv["p50_ms"].as_f64(), "{inv}");
    assert_eq!(inv["error_rate"], 0.0);
    assert_eq!(inv["queue_depth"], 0);
    assert_eq!(inv["in_flight"], 0);
    assert!(inv["limits"]["memory_mib"].as_u64().unwrap() > 0, "{inv}");
    let faulty = plugin(&s, "faulty");
    // fast_retries: 3 attempts, 2 retried, 1 dead letter; 3 of 3 ended attempts failed.
    assert_eq!((faulty["retries"].as_u64(), faulty["dead_letters"].as_u64()), (Some(2), Some(1)), "{faulty}");
    assert_eq!(faulty["error_rate"], 1.0, "{faulty}");
    assert_eq!(s["dead_letters_kept"], 1);

    // The graph from the manifests: orders.created → inventory → inventory.> → inventory.reserved → payments.
    assert!(has_edge(&s, "subject:orders.created", "plugin:inventory", "subscribe"), "{}", s["graph"]);
    assert!(has_edge(&s, "plugin:inventory", "subject:inventory.>", "publish"));
    assert!(has_edge(&s, "subject:inventory.>", "subject:inventory.reserved", "matches"));
    assert!(has_edge(&s, "subject:inventory.reserved", "plugin:payments", "subscribe"));
    assert!(has_edge(&s, "plugin:shipping", "subject:shipping.started", "publish"));
    let plugins = s["graph"]["nodes"].as_array().unwrap().iter().filter(|n| n["kind"] == "plugin").count();
    assert_eq!(plugins, 5);

    let rejected = s["rejected"].as_array().unwrap();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
    assert!(rejected[0]["file"].as_str().unwrap().ends_with("broken.wasm"));
    assert!(!rejected[0]["reason"].as_str().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stats_grow_with_configuration_never_with_traffic() {
    let t = TestHost::start(&["audit"]).await;
    let before = stats(&t).await;
    let size =
        |s: &Value| (s["graph"]["nodes"].as_array().unwrap().len(), s["graph"]["edges"].as_array().unwrap().len());
    for i in 0..300 {
        t.publish(&format!("orders.id{i}.created"), "{}").await;
    }
    t.wait_counter("audit", "ok", 300).await;
    let after = stats(&t).await;
    assert_eq!(size(&after), size(&before));
    assert_eq!(plugin(&after, "audit")["last_minute"]["received"], 300);
    assert!(!after.to_string().contains("id17"), "a subject from traffic reached the stats");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_dead_letter_is_read_and_replayed_by_its_id() {
    let t = TestHost::start_with(&["faulty"], fast_retries).await;
    let mut dead = t.observe(&["plugbus.dlq.>"]).await;
    t.publish("faulty.retry", "").await;
    let letter = dead.next_on("plugbus.dlq.faulty").await;
    t.publish("faulty.retry", "").await;
    let other = dead.next_on("plugbus.dlq.faulty").await;
    let client = reqwest::Client::new();
    // The page polls only the newest few, and learns how many are kept.
    let newest: Value = client.get(format!("{}/v1/dlq?limit=1", t.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!(newest["total"], 2, "{newest}");
    assert_eq!(newest["dead_letters"].as_array().unwrap().len(), 1);
    assert_eq!(newest["dead_letters"][0]["event"]["id"], other.id.as_str(), "{newest}");
    let one = format!("{}/v1/dlq/{}", t.url(), letter.id);
    let got: Value = client.get(&one).send().await.unwrap().json().await.unwrap();
    assert_eq!(got["dead_letter"]["event"]["id"], letter.id.as_str());
    assert_eq!(got["dead_letter"]["plugin"], "faulty");

    let mut replays = t.observe(&["faulty.retry"]).await;
    let resp = client.post(format!("{one}/replay")).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let report: Value = resp.json().await.unwrap();
    assert_eq!(report["replayed"][0]["dead_letter"], letter.id.as_str(), "{report}");
    let replayed = replays.next_on("faulty.retry").await;
    assert!(replayed.extensions.iter().any(|(k, v)| k == "plugbus-replay-of" && *v == letter.id));
    // Only that one left the store; the other is still there.
    assert_eq!(client.get(&one).send().await.unwrap().status().as_u16(), 404);
    let other_url = format!("{}/v1/dlq/{}", t.url(), other.id);
    assert_eq!(client.get(&other_url).send().await.unwrap().status().as_u16(), 200);
    let missing = client.post(format!("{}/v1/dlq/no-such-id/replay", t.url())).send().await.unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let body: Value = missing.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("no-such-id"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_served_offline_with_a_strict_policy_and_the_data_stays_behind_the_token() {
    let t = TestHost::start_with(&["audit"], |c| c.api_token = Some("s3cret".into())).await;
    let client = reqwest::Client::new();
    let page = client.get(format!("{}/", t.url())).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("frame-ancestors 'none'") && csp.contains("script-src 'self'"), "{csp}");
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    let html = page.text().await.unwrap();
    assert!(html.contains("/dashboard.js") && !html.contains("http"), "the page loads something from elsewhere");
    for (asset, kind) in [("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")] {
        let resp = client.get(format!("{}/{asset}", t.url())).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200);
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with(kind));
        assert!(!resp.text().await.unwrap().contains("https://"), "{asset} names another site");
    }
    for route in ["/v1/stats", "/v1/dlq", "/v1/dlq/x"] {
        let resp = client.get(format!("{}{route}", t.url())).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 401, "{route}");
        let ok = client.get(format!("{}{route}", t.url())).bearer_auth("s3cret").send().await.unwrap();
        assert_ne!(ok.status().as_u16(), 401, "{route}");
    }
}

/// What the dashboard's `fetch(url, {method: "POST"})` sends from the page the host served.
fn from_page(req: reqwest::RequestBuilder, origin: &str, host: &str, site: &str) -> reqwest::RequestBuilder {
    req.header("origin", origin).header("host", host).header("sec-fetch-site", site).header("sec-fetch-mode", "cors")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_s_own_origin_may_replay_and_another_site_may_not() {
    let t = TestHost::start_with(&["faulty"], fast_retries).await;
    let mut dead = t.observe(&["plugbus.dlq.>"]).await;
    t.publish("faulty.retry", "").await;
    dead.next_on("plugbus.dlq.faulty").await;
    let port = t.host.http_addr().unwrap().port();
    let client = reqwest::Client::new();
    let url = format!("{}/v1/dlq/replay?plugin=faulty", t.url());
    for (origin, host, site) in [
        ("https://evil.example", format!("127.0.0.1:{port}"), "cross-site"),
        // another port of this machine is another site
        (&*format!("http://127.0.0.1:{}", port + 1), format!("127.0.0.1:{port}"), "same-site"),
        // the page's own origin, but the browser says the request came from elsewhere
        (&*format!("http://127.0.0.1:{port}"), format!("127.0.0.1:{port}"), "cross-site"),
        // DNS rebinding: the page and the Host both name evil.example
        (&*format!("http://evil.example:{port}"), format!("evil.example:{port}"), "same-origin"),
    ] {
        let resp = from_page(client.post(&url), origin, &host, site).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 403, "Origin {origin}, Host {host}, Sec-Fetch-Site {site}");
    }
    assert_eq!(t.host.dead_letters().list(None).len(), 1, "a refused request replayed");
    for (origin, host) in [
        (format!("http://127.0.0.1:{port}"), format!("127.0.0.1:{port}")),
        (format!("http://localhost:{port}"), format!("localhost:{port}")),
    ] {
        let resp =
            from_page(client.get(format!("{}/v1/stats", t.url())), &origin, &host, "same-origin").send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{origin}");
        assert!(!resp.headers().contains_key("access-control-allow-origin"), "same-origin needs no CORS");
    }
    let resp =
        from_page(client.post(&url), &format!("http://127.0.0.1:{port}"), &format!("127.0.0.1:{port}"), "same-origin")
            .send()
            .await
            .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let report: Value = resp.json().await.unwrap();
    assert_eq!(report["replayed"].as_array().unwrap().len(), 1, "{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_public_listener_the_page_may_only_post_with_a_token() {
    // Without a token a rebinding page could pose as the host's own page: refused.
    let open = TestHost::start_with(&["audit"], |c| c.http = Some("0.0.0.0:0".parse().unwrap())).await;
    let port = open.host.http_addr().unwrap().port();
    let (origin, host) = (format!("http://rebound.example:{port}"), format!("rebound.example:{port}"));
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{port}/v1/dlq/replay");
    let resp = from_page(client.post(&url), &origin, &host, "same-origin").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 403);

    let guarded = TestHost::start_with(&["audit"], |c| {
        c.http = Some("0.0.0.0:0".parse().unwrap());
        c.api_token = Some("s3cret".into());
    })
    .await;
    let port = guarded.host.http_addr().unwrap().port();
    let (origin, host) = (format!("http://dash.internal:{port}"), format!("dash.internal:{port}"));
    let url = format!("http://127.0.0.1:{port}/v1/dlq/replay");
    let resp = from_page(client.post(&url), &origin, &host, "same-origin").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401, "the page's own origin passes the guard, then needs the token");
    let resp = from_page(client.post(&url), &origin, &host, "same-origin").bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}
