//! Debugging a dead letter: its record (what the failed attempt read and logged, bounded),
//! `POST /v1/dlq/{id}/debug` running it again on the version that failed and on a candidate,
//! and `plugbus dlq debug`.

use plugbus::Config;
use plugbus::kv::Txn;
use plugbus_tests::{TestHost, eventually, output_within, patch_bytes, plugbus_bin, wasm};
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

const TOKEN: &str = "s3cret-debug";

fn setup(c: &mut Config) {
    c.api_token = Some(TOKEN.into());
    c.max_wasm_bytes = 1 << 20;
    c.plugins.entry("picky".into()).or_default().config.insert("limit".into(), "3".into());
}

async fn set_kv(t: &TestHost, pairs: &[(&str, Vec<u8>)]) {
    let mut txn = Txn::default();
    for (k, v) in pairs {
        txn.set(k, v.clone());
    }
    t.host.kv().commit("picky", &txn).await.expect("kv set");
}

/// picky, fixed: an order it cannot fill is backordered (published), not rejected.
fn fixed_picky() -> Vec<u8> {
    patch_bytes(&std::fs::read(wasm("picky")).unwrap(), "policy=reject!", "policy=backord")
}

fn client() -> reqwest::Client {
    reqwest::Client::new()
}

async fn get(t: &TestHost, path: &str) -> Value {
    let resp = client().get(format!("{}{path}", t.url())).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 200, "GET {path}");
    resp.json().await.unwrap()
}

/// `POST /v1/dlq/{id}/debug` with `body` (a candidate, `application/wasm`): (status, answer).
async fn debug(t: &TestHost, id: &str, body: Option<Vec<u8>>) -> (u16, Value) {
    let mut req = client().post(format!("{}/v1/dlq/{id}/debug", t.url())).bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.header("content-type", "application/wasm").body(b);
    }
    let resp = req.send().await.unwrap();
    (resp.status().as_u16(), resp.json().await.unwrap_or_default())
}

/// The only kept dead letter's id, once there is one (the counter moves before it is kept).
async fn dead_letter_id(t: &TestHost) -> String {
    t.wait_counter("picky", "dead_lettered", 1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let list = get(t, "/v1/dlq").await;
        if let Some(id) = list["dead_letters"][0]["event"]["id"].as_str() {
            return id.to_string();
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letter kept: {list}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_records_what_it_read_and_debug_reproduces_it_then_a_candidate_differs() {
    let t = TestHost::start_with(&["picky"], setup).await;
    set_kv(&t, &[("stock", b"2".to_vec())]).await;
    t.publish("picky.order", "5").await;
    let id = dead_letter_id(&t).await;

    // The record: the version, the attempt, the error, the kv value and config value it read,
    // what it printed and logged.
    let entry = get(&t, &format!("/v1/dlq/{id}")).await;
    let record = &entry["dead_letter"]["record"];
    assert_eq!(record["version"].as_str(), t.host.router().current_hash("picky").as_deref(), "{record}");
    assert_eq!(record["attempt"], 1);
    assert!(record["error"].as_str().unwrap().contains("want 5, only 2 allowed"), "{record}");
    assert_eq!(record["kv"][0]["key"], "stock");
    assert_eq!(record["kv"][0]["value"], "2");
    assert!(record["kv"][0]["version"].as_u64().unwrap() >= 1, "{record}");
    assert_eq!(record["config"]["limit"], "3");
    assert!(record["stdout"][0].as_str().unwrap().starts_with("picky: checking"), "{record}");
    assert_eq!(record["logs"][0], "WARN want 5, stock 2, limit 3");
    assert_eq!(record["truncated"], false);
    // Not on the bus: the dead-letter event's headers carry none of it.
    let headers = entry["dead_letter"]["event"]["headers"].to_string();
    assert!(!headers.contains("picky: checking") && !headers.contains("\"stock\""), "{headers}");

    // The live stock changes since: the debug run still sees what the failed attempt read.
    set_kv(&t, &[("stock", b"100".to_vec())]).await;
    let (status, answer) = debug(&t, &id, None).await;
    assert_eq!(status, 200, "{answer}");
    let failed = &answer["failed"];
    assert_eq!(failed["ran"], true);
    assert_eq!(failed["result"], "reject", "{answer}");
    assert!(failed["error"].as_str().unwrap().contains("want 5, only 2 allowed"), "{answer}");
    assert_eq!(failed["kv_read"][0]["value"], "2");
    assert_eq!(failed["config_read"]["limit"], "3");
    assert_eq!(failed["logs"][0], "WARN want 5, stock 2, limit 3");
    assert!(answer["candidate"].is_null());
    assert_eq!(answer["attempt"], 1);
    // Repeatable: the same answer again.
    let (_, again) = debug(&t, &id, None).await;
    assert_eq!(again["failed"]["stdout"], failed["stdout"]);

    // Against a fixed candidate of picky: its outcome, side by side, on the same reads.
    let (status, answer) = debug(&t, &id, Some(fixed_picky())).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["failed"]["result"], "reject");
    let candidate = &answer["candidate"];
    assert_eq!(candidate["result"], "ok", "{answer}");
    assert_eq!(candidate["outputs"][0]["subject"], "picky.out");
    let out: Value = serde_json::from_str(candidate["outputs"][0]["data"].as_str().unwrap()).unwrap();
    assert_eq!(out, serde_json::json!({ "backorder": 5, "stock": 2 }), "it saw the recorded stock, not 100");
    assert_ne!(candidate["version"], answer["failed"]["version"]);
    assert_eq!(candidate["stdout"], answer["failed"]["stdout"], "same ids and time: the same lines");

    // A candidate that is another plugin is refused, naming why.
    let (status, answer) = debug(&t, &id, Some(std::fs::read(wasm("echo")).unwrap())).await;
    assert_eq!(status, 422, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("disagrees with the plugin's name \"picky\""), "{answer}");

    // Nothing was published or written by debugging: the live stock and the counters stand.
    let (value, _) = t.host.kv().read("picky", "stock").await.unwrap();
    assert_eq!(value.as_deref(), Some(&b"100"[..]));
    assert_eq!(t.counter("picky", "received"), 1);
    assert_eq!(get(&t, "/v1/dlq").await["total"], 1, "the dead letter is still kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_debug_route_is_guarded_bounded_and_refuses_bad_bytes() {
    let t = TestHost::start_with(&["picky"], |c| {
        setup(c);
        c.api.read_timeout = Duration::from_secs(2);
    })
    .await;
    t.publish("picky.order", "5").await;
    let id = dead_letter_id(&t).await;
    let url = format!("{}/v1/dlq/{id}/debug", t.url());

    let resp = client().post(&url).send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401, "no token");
    let resp = client().post(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 401, "wrong token");

    // The server may answer `413` before it has read the upload, and close the connection
    // while the client still sends: the client then sees the reset, not the answer. Tried
    // again (a few times at most) until the answer is read.
    let oversize = async || {
        for _ in 0..5 {
            let req = client().post(&url).bearer_auth(TOKEN).header("content-type", "application/wasm");
            if let Ok(resp) = req.body(vec![0u8; (1 << 20) + 1]).send().await {
                return (resp.status().as_u16(), resp.json::<Value>().await.unwrap_or_default());
            }
        }
        panic!("no answer to an oversized candidate in 5 tries");
    };
    let (status, answer) = oversize().await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("max_wasm_bytes"), "{answer}");

    let (status, answer) = debug(&t, &id, Some(b"this is not a component".to_vec())).await;
    assert_eq!(status, 422, "{answer}");
    assert!(answer["error"].as_str().unwrap().starts_with("the candidate component was refused:"), "{answer}");

    let resp =
        client().post(&url).bearer_auth(TOKEN).header("content-type", "text/plain").body("x").send().await.unwrap();
    assert_eq!(resp.status().as_u16(), 415);

    let (status, answer) = debug(&t, "no-such-id", None).await;
    assert_eq!(status, 404, "{answer}");

    // The attack: many debug runs at once (each reads up to max_wasm_bytes, compiles in a child
    // and runs in the shared instance pool). Two candidates still being sent hold both runs;
    // a third is refused at once. The two are answered `408` after `api.read_timeout` (they
    // held their runs for ever before), and the next run is served.
    use tokio::io::AsyncWriteExt;
    let addr = t.url().trim_start_matches("http://").to_string();
    let mut uploading = Vec::new();
    for _ in 0..plugbus::api::DEBUG_RUNS_AT_ONCE {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "POST /v1/dlq/{id}/debug HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Type: application/wasm\r\nContent-Length: 1000\r\n\r\n\0asm"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        uploading.push(s);
    }
    let busy = eventually_status(&t, &id, 503).await;
    assert!(busy["error"].as_str().unwrap().contains("debug runs are at work already"), "{busy}");
    eventually_status(&t, &id, 200).await;
    use tokio::io::AsyncReadExt;
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), uploading[0].read(&mut answer)).await.unwrap().unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408") && answer.contains("api.read_timeout"), "{answer}");
}

/// Asks a debug run of `id` (no candidate) until it is answered `status`; the answer.
async fn eventually_status(t: &TestHost, id: &str, status: u16) -> Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (got, answer) = debug(t, id, None).await;
        if got == status {
            return answer;
        }
        assert!(std::time::Instant::now() < deadline, "still {got} after 10 s (wanted {status}): {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_over_the_byte_bound_is_truncated_and_says_so() {
    let t = TestHost::start_with(&["picky"], setup).await;
    let big: Vec<(String, Vec<u8>)> = (0..5).map(|i| (format!("big{i}"), vec![b'a'; 256 * 1024])).collect();
    let pairs: Vec<(&str, Vec<u8>)> = big.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
    set_kv(&t, &pairs).await;
    t.publish("picky.big", "").await;
    let id = dead_letter_id(&t).await;

    let entry = get(&t, &format!("/v1/dlq/{id}")).await;
    let record = &entry["dead_letter"]["record"];
    assert_eq!(record["truncated"], true, "five 256 KiB values do not fit 1 MiB");
    let kv = record["kv"].as_array().unwrap();
    assert_eq!(kv.len(), 5, "every key read is named");
    let kept = kv.iter().filter(|r| r["value"].is_string()).count();
    let cut = kv.iter().filter(|r| r["cut"] == true).count();
    assert_eq!((kept, cut), (3, 2), "{:?}", kv.iter().map(|r| &r["key"]).collect::<Vec<_>>());
    assert!(record.to_string().len() <= (1 << 20) + 16 * 1024, "{}", record.to_string().len());
    let (_, store_bytes) = t.host.dead_letters().usage();
    assert!(store_bytes <= (1 << 20) + 64 * 1024, "{store_bytes}");

    let (status, answer) = debug(&t, &id, None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["record_truncated"], true);
    assert!(answer["note"].as_str().unwrap().contains("cut"), "{answer}");
    assert_eq!(answer["failed"]["result"], "reject");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_is_kept_across_a_restart() {
    let t = TestHost::start_with(&["picky"], setup).await;
    set_kv(&t, &[("stock", b"1".to_vec())]).await;
    t.publish("picky.order", "4").await;
    let id = dead_letter_id(&t).await;
    let TestHost { host, dir, data } = t;
    host.shutdown().await;
    let mut config = Config {
        plugins_dir: dir.path().to_path_buf(),
        data_dir: data.path().to_path_buf(),
        http: Some("127.0.0.1:0".parse().unwrap()),
        ..Config::default()
    };
    setup(&mut config);
    let t = TestHost { host: plugbus::Host::start(config).await.unwrap(), dir, data };
    let entry = get(&t, &format!("/v1/dlq/{id}")).await;
    assert_eq!(entry["dead_letter"]["record"]["kv"][0]["value"], "1", "{entry}");
    let (status, answer) = debug(&t, &id, None).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["failed"]["error"].as_str().unwrap().contains("want 4, only 1 allowed"), "{answer}");
}

fn plugbus(args: &[&str]) -> std::process::Output {
    output_within(Command::new(plugbus_bin()).args(args).env("PLUGBUS_API_TOKEN", TOKEN), Duration::from_secs(60))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugbus_dlq_debug_prints_both_side_by_side_then_replay_sends_it() {
    let t = TestHost::start_with(&["picky"], setup).await;
    set_kv(&t, &[("stock", b"2".to_vec())]).await;
    t.publish("picky.order", "5").await;
    let id = dead_letter_id(&t).await;
    let url = t.url();
    let fixed = t.data.path().join("picky-fixed.wasm");
    std::fs::write(&fixed, fixed_picky()).unwrap();

    let out = tokio::task::block_in_place(|| {
        plugbus(&["dlq", "debug", &id, "--against", fixed.to_str().unwrap(), "--url", &url])
    });
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("FAILED VERSION") && stdout.contains("CANDIDATE"), "{stdout}");
    assert!(stdout.contains("reject: handler rejected the event: want 5, only 2 allowed"), "{stdout}");
    assert!(stdout.contains(r#"picky.out {"backorder":5,"stock":2}"#), "{stdout}");
    assert!(stdout.contains("WARN want 5, stock 2, limit 3"), "{stdout}");

    let out = tokio::task::block_in_place(|| plugbus(&["dlq", "debug", &id, "--json", "--url", &url]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["failed"]["result"], "reject");

    let missing = std::env::temp_dir().join("plugbus-no-such-candidate.wasm");
    let out = tokio::task::block_in_place(|| {
        plugbus(&["dlq", "debug", &id, "--against", missing.to_str().unwrap(), "--url", &url])
    });
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("plugbus-no-such-candidate.wasm"));

    // Then it is sent for real.
    let out = tokio::task::block_in_place(|| plugbus(&["dlq", "replay", "--id", &id, "--url", &url]));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    t.wait_counter("picky", "received", 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_failed_version_is_gone_it_says_so_and_runs_only_the_candidate() {
    let t = TestHost::start_with(&["picky"], setup).await;
    set_kv(&t, &[("stock", b"2".to_vec())]).await;
    t.publish("picky.order", "5").await;
    let id = dead_letter_id(&t).await;
    let failed_hash = t.host.router().current_hash("picky").unwrap();
    // The fixed version is deployed (hot reload).
    std::fs::write(t.dir.path().join("picky.wasm"), fixed_picky()).unwrap();
    eventually("the fixed picky serves", || t.host.router().current_hash("picky").as_deref() != Some(&failed_hash))
        .await;

    let (status, answer) = debug(&t, &id, None).await;
    assert_eq!(status, 409, "{answer}");
    let error = answer["error"].as_str().unwrap();
    assert!(error.contains(&format!("the version that failed ({failed_hash}) is no longer loaded")), "{error}");
    assert!(error.contains("--against"), "{error}");

    let (status, answer) = debug(&t, &id, Some(fixed_picky())).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["failed"]["ran"], false);
    assert!(answer["failed"]["why"].as_str().unwrap().contains("only the candidate ran"), "{answer}");
    assert_eq!(answer["candidate"]["result"], "ok", "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_record_is_of_the_last_attempt_and_debug_runs_that_attempt() {
    let t = TestHost::start_with(&["faulty"], |c| {
        plugbus_tests::fast_retries(c);
        c.api_token = Some(TOKEN.into());
    })
    .await;
    // Fails every attempt before the 9th: the third and last is dead-lettered.
    t.publish("faulty.flaky", "9").await;
    t.wait_counter("faulty", "dead_lettered", 1).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let id = loop {
        let list = get(&t, "/v1/dlq").await;
        if let Some(id) = list["dead_letters"][0]["event"]["id"].as_str() {
            break id.to_string();
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letter kept: {list}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let record = &get(&t, &format!("/v1/dlq/{id}")).await["dead_letter"]["record"];
    assert_eq!(record["attempt"], 3, "{record}");
    assert_eq!(record["error"], "handler asked to retry: attempt 3 failed");
    let (status, answer) = debug(&t, &id, None).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["failed"]["result"], "retry");
    assert_eq!(answer["failed"]["error"], "handler asked to retry: attempt 3 failed", "the same attempt number");
    // Its lost output is reported, not published.
    assert!(answer["failed"]["outputs"].as_array().unwrap().is_empty(), "a failed attempt releases nothing");
}

/// The kept dead letter (with its record) whose event's data satisfies `which`, once there is one.
async fn dead_letter_where(t: &TestHost, what: &str, which: impl Fn(&str) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let list = get(t, "/v1/dlq").await;
        let found = list["dead_letters"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| which(e["event"]["data"].as_str().unwrap_or("")));
        if let Some(entry) = found {
            return entry.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "no dead letter of {what}: {list}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A warm instance serves event after event: each dead letter's record must be of its own
/// attempt. picky's output `picky.out` comes back to it (`picky.*`) and is rejected before any
/// kv read (`not a number`: its data is JSON), right after the warm instance read `stock` for
/// the order that published it; that dead letter must show no kv read. (This test was once
/// ignored for that `not a number` dead letter: it took the first dead letter listed, which
/// could be the echo's rather than the order's.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_instance_records_its_failed_attempt_too() {
    let t = TestHost::start_with(&["picky"], |c| {
        setup(c);
        c.plugins.entry("picky".into()).or_default().limits.insert("instance".into(), "reuse".into());
    })
    .await;
    set_kv(&t, &[("stock", b"7".to_vec())]).await;
    t.publish("picky.order", "1").await; // handled: its reads are not kept anywhere
    t.wait_counter("picky", "ok", 1).await;
    let echo = dead_letter_where(&t, "picky.out", |d| d.contains("\"want\":1")).await;
    let record = &echo["record"];
    assert!(record["error"].as_str().unwrap_or("").contains("not a number"), "{echo}");
    assert_eq!(
        record["kv"].as_array().map(Vec::len),
        Some(0),
        "the last event's reads leaked into this record: {echo}"
    );
    assert_eq!(record["stdout"].as_array().map(Vec::len), Some(1), "only this attempt's lines: {echo}");
    assert_eq!(record["logs"].as_array().map(Vec::len), Some(0), "{echo}");

    t.publish("picky.order", "9").await;
    let entry = dead_letter_where(&t, "the order of 9", |d| d == "9").await;
    let record = &entry["record"];
    assert_eq!(record["kv"].as_array().unwrap().len(), 1, "only this attempt's reads: {entry}");
    assert_eq!(record["kv"][0]["value"], "6");
    assert_eq!(record["stdout"].as_array().unwrap().len(), 1, "only this attempt's lines: {record}");
    assert_eq!(record["logs"][0], "WARN want 9, stock 6, limit 3");
    assert!(record["error"].as_str().unwrap_or("").contains("want 9, only 3 allowed"), "{entry}");
    // A dead letter is kept (and listed) just before it is counted: the count is awaited.
    t.wait_counter("picky", "dead_lettered", 2).await;
    assert_eq!(t.counter("picky", "dead_lettered"), 2, "the order and the echo of the first one");
}
