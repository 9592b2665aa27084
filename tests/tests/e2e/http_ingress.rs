//! `POST /v1/events/{subject}`: accepted events get 202 and their id; bad requests get a JSON
//! error saying what was wrong.

use plugbus_tests::TestHost;

async fn post(url: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let resp = reqwest::Client::new().post(url).body(body).send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_posted_over_http_is_accepted_and_delivered() {
    let t = TestHost::start(&["audit"]).await;
    let mut seen = t.observe(&["orders.>"]).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/events/orders.created", t.url()))
        .header("ce-id", "client-chosen-id")
        .header("ce-tenant", "acme")
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["id"], "client-chosen-id");
    let ev = seen.next_on("orders.created").await;
    assert_eq!(ev.id, "client-chosen-id");
    assert_eq!(ev.header("tenant"), Some("acme"));
    assert_eq!(ev.datacontenttype.as_deref(), Some("application/json"));
    t.wait_counter("audit", "ok", 1).await;
}

/// A core attribute's header given twice is refused, naming it: the first would be checked and
/// taken, the second carried on beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ce_id_given_twice_is_refused_naming_it() {
    let t = TestHost::start(&["audit"]).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/events/orders.created", t.url()))
        .header("ce-id", "y")
        .header("CE-ID", "7")
        .body("{}")
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    assert_eq!(status, 400, "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("the ce-id header is given more than once"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_a_json_error_saying_what_was_wrong() {
    let t = TestHost::start(&["audit"]).await;
    let base = t.url();
    let cases = [
        ("/v1/events/", 400, "empty"),
        ("/v1/events", 400, "empty"),
        ("/v1/events/orders%20created", 400, "whitespace"),
        ("/v1/events/orders.*", 400, "wildcards"),
        ("/v1/events/orders.%3E", 400, "wildcards"),
        ("/v1/events/orders..x", 400, "empty token"),
    ];
    for (path, status, needle) in cases {
        let (got, body) = post(&format!("{base}{path}"), b"{}".to_vec()).await;
        assert_eq!(got, status, "{path}: {body}");
        let msg = body["error"].as_str().unwrap_or_else(|| panic!("{path}: no JSON error: {body}"));
        assert!(msg.contains(needle), "{path}: {msg}");
    }
    let (got, body) = post(&format!("{base}/v1/events/orders.created"), vec![b'x'; 1024 * 1024 + 1]).await;
    assert_eq!(got, 413, "{body}");
    assert!(body["error"].as_str().unwrap().contains("1048576"), "{body}");
    // exactly at the limit is fine
    let (got, _) = post(&format!("{base}/v1/events/orders.created"), vec![b'x'; 1024 * 1024]).await;
    assert_eq!(got, 202);
}
