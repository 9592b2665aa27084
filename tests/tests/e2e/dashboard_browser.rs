//! The dashboard in a real headless Chromium, driven over the DevTools protocol: the page the
//! host serves loads with no console error or uncaught exception, shows the demo's five plugins
//! and the pipeline's edges, counts events posted while it is open, streams the tail, and its
//! replay buttons replay dead letters, with and without an API token.
//!
//! Needs a Chromium (`apt-get install -y chromium`; `scripts/test` installs it): without one the
//! tests say so loudly and pass, except in CI (`CI=true`) where that is a failure.
//! `DASHBOARD_SCREENSHOT=docs/dashboard.png` (`scripts/screenshot`) keeps the demo's screenshot.

use plugbus_tests::browser::{Browser, Page, chromium_or_skip};
use plugbus_tests::{TestHost, order};
use serde_json::{Value, json};
use std::time::Duration;

/// The demo's plugins (`scripts/demo`).
const DEMO: [&str; 5] = ["inventory", "payments", "shipping", "notify", "audit"];
const WAIT: Duration = Duration::from_secs(15);

/// Fails with the page's own errors when `r` failed, so a broken page explains itself.
fn ok<T>(page: &Page<'_>, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{e:#}\npage errors: {:#?}", page.errors()))
}

/// `expr` as a JS string literal.
fn js(s: &str) -> String {
    serde_json::to_string(s).unwrap()
}

/// The text of plugin `plugin`'s cell `col` in the plugins table.
fn cell(plugin: &str, col: &str) -> String {
    format!(
        "(document.querySelector('#plugins tr[data-plugin=' + CSS.escape({}) + '] td[data-col={col}]') || {{}}).textContent",
        js(plugin)
    )
}

/// The pipeline's edges as drawn: `[from, to, kind]` of every SVG path.
async fn drawn_edges(page: &Page<'_>) -> Vec<(String, String, String)> {
    let v = ok(
        page,
        page.eval("[...document.querySelectorAll('#graph path.edge')].map(p => [p.dataset.from, p.dataset.to, p.dataset.kind])")
            .await,
    );
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| (e[0].as_str().unwrap().into(), e[1].as_str().unwrap().into(), e[2].as_str().unwrap().into()))
        .collect()
}

async fn api_get(t: &TestHost, path: &str, token: Option<&str>) -> reqwest::Response {
    let mut req = reqwest::Client::new().get(format!("{}{path}", t.url()));
    if let Some(tok) = token {
        req = req.bearer_auth(tok);
    }
    req.send().await.unwrap()
}

/// Publishes a malformed order: inventory rejects it, so it is dead-lettered at once. Returns
/// the dead letter's id.
async fn dead_letter(t: &TestHost) -> String {
    let mut dead = t.observe(&["plugbus.dlq.>"]).await;
    t.publish("orders.created", "this is not an order").await;
    dead.next_on("plugbus.dlq.inventory").await.id.clone()
}

/// Clicks `button` and checks through the API that dead letter `id` was replayed: its event is
/// published again (`plugbus-replay-of`) and the dead letter left the store.
async fn click_and_see_replayed(t: &TestHost, page: &Page<'_>, button: &str, id: &str, token: Option<&str>) {
    let mut again = t.observe(&["orders.created"]).await;
    ok(page, page.click(button).await);
    let replayed = again.next_where(|e| e.extensions.iter().any(|(k, v)| k == "plugbus-replay-of" && v == id)).await;
    assert_eq!(&replayed.data[..], b"this is not an order");
    let resp = api_get(t, &format!("/v1/dlq/{id}"), token).await;
    assert_eq!(resp.status().as_u16(), 404, "dead letter {id} is still kept after the replay");
    ok(
        page,
        page.wait_for(
            "the page reports the replay",
            "document.querySelector('#notice').textContent.startsWith('replayed 1')",
            WAIT,
        )
        .await,
    );
}

/// Starts the live tail on the page, publishes an order and waits for its row.
async fn tail_shows_an_order(t: &TestHost, page: &Page<'_>, order_id: &str) {
    ok(page, page.click("#tail-button").await);
    ok(
        page,
        page.wait_for("the tail is running", "document.querySelector('#tail-button').textContent === 'Stop'", WAIT)
            .await,
    );
    // The tail subscribes once its request reached the host: publish until a row comes.
    let row =
        format!("[...document.querySelectorAll('#tail tbody tr')].some(r => r.textContent.includes({}))", js(order_id));
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        t.publish("orders.created", order(order_id, "widget", 1)).await;
        match page.wait_for("a tail row", &row, Duration::from_millis(500)).await {
            Ok(_) => break,
            Err(e) if e.to_string().contains("timed out") => {
                assert!(tokio::time::Instant::now() < deadline, "the tail showed no row for {order_id}: {e}")
            }
            Err(e) => ok(page, Err(e)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_shows_the_pipeline_counts_events_and_replays_a_dead_letter() {
    let Some(chromium) = chromium_or_skip("the_page_shows_the_pipeline_counts_events_and_replays_a_dead_letter") else {
        return;
    };
    let t = TestHost::start(&DEMO).await;
    let browser = Browser::launch(&chromium).await.expect("launching Chromium");
    let page = browser.page(1280, 900).await.unwrap();
    ok(&page, page.goto(&format!("{}/", t.url())).await);

    // The five plugins, one row each, and their boxes in the graph.
    ok(
        &page,
        page.wait_for("five plugin rows", "document.querySelectorAll('#plugins tbody tr').length === 5", WAIT).await,
    );
    let rows = ok(
        &page,
        page.eval("[...document.querySelectorAll('#plugins tbody tr')].map(r => r.dataset.plugin).sort()").await,
    );
    let mut want = DEMO.to_vec();
    want.sort();
    assert_eq!(rows, json!(want));
    let boxes =
        ok(&page, page.eval("[...document.querySelectorAll('#graph g.plugin')].map(g => g.dataset.id).sort()").await);
    assert_eq!(boxes, json!(want.iter().map(|p| format!("plugin:{p}")).collect::<Vec<_>>()));

    // Every edge of the host's graph is drawn (both ends placed), the chain's among them.
    let stats: Value = api_get(&t, "/v1/stats", None).await.json().await.unwrap();
    let edges = drawn_edges(&page).await;
    assert_eq!(edges.len(), stats["graph"]["edges"].as_array().unwrap().len(), "{edges:?}");
    for (from, to, kind) in [
        ("subject:orders.created", "plugin:inventory", "subscribe"),
        ("plugin:inventory", "subject:inventory.>", "publish"),
        ("subject:inventory.>", "subject:inventory.reserved", "matches"),
        ("subject:inventory.reserved", "plugin:payments", "subscribe"),
        ("plugin:payments", "subject:payments.captured", "publish"),
        ("subject:payments.captured", "plugin:shipping", "subscribe"),
        ("plugin:shipping", "subject:shipping.started", "publish"),
        ("subject:shipping.started", "plugin:notify", "subscribe"),
        ("subject:orders.>", "plugin:audit", "subscribe"),
    ] {
        assert!(edges.contains(&(from.into(), to.into(), kind.into())), "no {kind} edge {from} → {to} in {edges:?}");
    }
    let unplaced = ok(&page, page.eval("[...document.querySelectorAll('#graph path.edge')].filter(p => !p.getAttribute('d') || p.getAttribute('d').includes('NaN')).length").await);
    assert_eq!(unplaced, json!(0));

    // Counters follow what is posted while the page is open.
    assert_eq!(ok(&page, page.eval(&cell("inventory", "received")).await), json!("0"));
    for i in 0..3 {
        t.publish("orders.created", order(&format!("b-{i}"), "widget", 1)).await;
    }
    for (p, n) in [("inventory", "3"), ("payments", "3"), ("shipping", "3"), ("notify", "3")] {
        let expr = format!("{} === {}", cell(p, "received"), js(n));
        ok(&page, page.wait_for(&format!("{p} shows {n} received"), &expr, WAIT).await);
    }
    assert_ne!(ok(&page, page.eval(&cell("inventory", "p50")).await), json!("–"), "no handler time after 3 events");
    ok(
        &page,
        page.wait_for(
            "inventory's box turns green",
            "document.querySelector('#graph g[data-id=\"plugin:inventory\"] rect').classList.contains('ok')",
            WAIT,
        )
        .await,
    );

    // The live tail.
    tail_shows_an_order(&t, &page, "tail-1").await;

    // A dead letter shows with its error, and its button replays it.
    let id = dead_letter(&t).await;
    let row = format!("#dlq tr[data-id={}]", js(&id));
    ok(&page, page.wait_for("the dead letter is listed", &format!("document.querySelector({})", js(&row)), WAIT).await);
    let text = ok(&page, page.eval(&format!("document.querySelector({}).textContent", js(&row))).await);
    assert!(text.as_str().unwrap().contains("not the expected JSON"), "{text}");
    ok(
        &page,
        page.wait_for("inventory counts its dead letter", &format!("{} === '1'", cell("inventory", "dead")), WAIT)
            .await,
    );
    click_and_see_replayed(&t, &page, &format!("{row} button"), &id, None).await;

    assert_eq!(page.errors(), Vec::<String>::new(), "the page reported errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_api_token_the_page_asks_for_it_and_sends_it_on_every_call() {
    let Some(chromium) = chromium_or_skip("with_an_api_token_the_page_asks_for_it_and_sends_it_on_every_call") else {
        return;
    };
    let t = TestHost::start_with(&DEMO, |c| c.api_token = Some("s3cret".into())).await;
    let id = dead_letter(&t).await;
    let browser = Browser::launch(&chromium).await.expect("launching Chromium");
    let page = browser.page(1280, 900).await.unwrap();
    ok(&page, page.goto(&format!("{}/", t.url())).await);

    // No data without the token: the page asks for it.
    let asks = "!document.querySelector('#token-form').hidden && document.querySelector('#status').className === 'bad'";
    ok(&page, page.wait_for("the page asks for the token", asks, WAIT).await);
    assert_eq!(ok(&page, page.eval("document.querySelectorAll('#plugins tbody tr').length").await), json!(0));

    // A wrong token is refused, and the page says so.
    ok(&page, page.type_into("#token", "wrong").await);
    ok(&page, page.click("#token-form button").await);
    ok(
        &page,
        page.wait_for(
            "the wrong token is refused",
            &format!("{asks} && document.querySelector('#status').textContent.includes('refused')"),
            WAIT,
        )
        .await,
    );
    assert_eq!(
        ok(&page, page.eval("document.querySelector('#token').value").await),
        json!(""),
        "the token stays in the form"
    );

    ok(&page, page.type_into("#token", "s3cret").await);
    ok(&page, page.click("#token-form button").await);
    ok(
        &page,
        page.wait_for("five plugin rows", "document.querySelectorAll('#plugins tbody tr').length === 5", WAIT).await,
    );
    assert_eq!(ok(&page, page.eval("document.querySelector('#token-form').hidden").await), json!(true));
    let row = format!("#dlq tr[data-id={}]", js(&id));
    ok(&page, page.wait_for("the dead letter is listed", &format!("document.querySelector({})", js(&row)), WAIT).await);

    // The tail's stream and the replay's POST carry the token too.
    tail_shows_an_order(&t, &page, "tail-2").await;
    click_and_see_replayed(&t, &page, "#dlq-plugins button", &id, Some("s3cret")).await;

    // The only errors: the browser logging the 401s the page got before it had the token.
    let errors: Vec<String> =
        page.errors().into_iter().filter(|e| !(e.contains("network") && e.contains("401"))).collect();
    assert_eq!(errors, Vec::<String>::new(), "the page reported errors");
}

/// The demo as `scripts/demo` runs it (its three orders, and one malformed order for a dead
/// letter), on screen: the PNG goes to `DASHBOARD_SCREENSHOT` (`scripts/screenshot` points it at
/// `docs/dashboard.png`), else to a temp file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_screenshot_of_the_demo_running() {
    let Some(chromium) = chromium_or_skip("a_screenshot_of_the_demo_running") else { return };
    let t = TestHost::start(&DEMO).await;
    let browser = Browser::launch(&chromium).await.expect("launching Chromium");
    let page = browser.page(1280, 900).await.unwrap();
    ok(&page, page.goto(&format!("{}/", t.url())).await);
    ok(
        &page,
        page.wait_for("five plugin rows", "document.querySelectorAll('#plugins tbody tr').length === 5", WAIT).await,
    );
    tail_shows_an_order(&t, &page, "o-1001").await;
    let mut orders = vec![
        json!({"order_id":"o-1002","sku":"gadget","qty":1,"email":"bob@example.com","amount_cents":4999}),
        json!({"order_id":"o-1003","sku":"unobtainium","qty":1,"email":"cy@example.com","amount_cents":100000}),
    ];
    for i in 0..6 {
        orders.push(json!({"order_id": format!("o-10{}", 10 + i), "sku": "widget", "qty": 1, "email": "dee@example.com", "amount_cents": 999}));
    }
    for o in &orders {
        t.publish("orders.created", o.to_string()).await;
    }
    dead_letter(&t).await;
    t.wait_counter("notify", "ok", 8).await;
    ok(
        &page,
        page.wait_for("the dead letter is listed", "document.querySelectorAll('#dlq tbody tr').length === 1", WAIT)
            .await,
    );
    ok(
        &page,
        page.wait_for("notify's row counts the orders", &format!("Number({}) >= 8", cell("notify", "received")), WAIT)
            .await,
    );
    let png = ok(&page, page.screenshot(1280).await);
    let path = match std::env::var_os("DASHBOARD_SCREENSHOT") {
        Some(p) => std::path::PathBuf::from(p),
        None => std::env::temp_dir().join(format!("plugbus-dashboard-{}.png", std::process::id())),
    };
    std::fs::write(&path, &png).unwrap();
    eprintln!("dashboard screenshot: {} ({} bytes)", path.display(), png.len());
    assert!(png.len() > 10_000, "a blank screenshot? {} bytes", png.len());
    assert_eq!(page.errors(), Vec::<String>::new(), "the page reported errors");
}

/// The harness can fail a page: a console error, an uncaught exception and a failed request are
/// each reported by [`Page::errors`] (which the tests above assert empty).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_error_capture_sees_console_errors_uncaught_exceptions_and_failed_requests() {
    let Some(chromium) =
        chromium_or_skip("the_error_capture_sees_console_errors_uncaught_exceptions_and_failed_requests")
    else {
        return;
    };
    let t = TestHost::start(&["audit"]).await;
    let browser = Browser::launch(&chromium).await.expect("launching Chromium");
    let page = browser.page(800, 600).await.unwrap();
    ok(&page, page.goto(&format!("{}/", t.url())).await);
    ok(
        &page,
        page.wait_for("the page is up", "document.querySelectorAll('#plugins tbody tr').length === 1", WAIT).await,
    );
    assert_eq!(page.errors(), Vec::<String>::new());
    ok(
        &page,
        page.eval("console.error('boom'); setTimeout(() => { throw new Error('uncaught boom'); }); fetch('/no-such-asset'); 1")
            .await,
    );
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let errors = page.errors();
        let seen = |what: &str| errors.iter().any(|e| e.contains(what));
        if seen("console.error: boom") && seen("uncaught exception: Error: uncaught boom") && seen("404") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "not every error was reported: {errors:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
