//! `plugbus tail --record`, `plugbus test` and `plugbus dlq export`: recorded events run
//! through the real component, compared with their expectations, updated as snapshots.

use plugbus::Event;
use plugbus_tests::Running;
use plugbus_tests::{TestHost, output_within, plugbus_bin, plugbus_cached, wasm};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

/// `plugbus ARGS…` (compiling through the tests' shared compile cache), its output once it exits.
fn plugbus(args: &[&str]) -> Output {
    output_within(plugbus_cached().args(args), WAIT)
}

/// `plugbus test COMPONENT CASES EXTRA…`: (exit code, stdout, stderr).
fn test(component: &Path, cases: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["test", component.to_str().unwrap(), cases.to_str().unwrap()];
    args.extend_from_slice(extra);
    let out = plugbus(&args);
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.code().unwrap_or(-1), text(&out.stdout), text(&out.stderr))
}

fn lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path).unwrap().lines().map(|l| serde_json::from_str(l).expect("a JSON line")).collect()
}

fn write_lines(path: &Path, values: &[Value]) {
    let text: String = values.iter().map(|v| format!("{v}\n")).collect();
    std::fs::write(path, text).unwrap();
}

/// A component copied into `dir` under `file` (a plugin is named by its file).
fn component_as(dir: &Path, component: &str, file: &str) -> PathBuf {
    let path = dir.join(file);
    std::fs::copy(wasm(component), &path).unwrap();
    path
}

/// Waits until `cond` holds, polling; panics with `what` after [`WAIT`].
async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn event(subject: &str, data: &str, json: bool) -> Event {
    let mut ev = Event::new(subject, data.to_string()).with_header("tenant", "acme co");
    ev.source = "/shop".into();
    if json {
        ev.datacontenttype = Some("application/json".into());
    }
    ev
}

#[tokio::test(flavor = "multi_thread")]
async fn record_then_test_then_a_changed_component_fails_with_a_diff_then_update_passes() {
    let t = TestHost::start(&["echo"]).await;
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("cases.jsonl");
    let tail = Running(
        Command::new(plugbus_bin())
            .args(["tail", "orders.*", "--record", cases.to_str().unwrap(), "--url", &t.url()])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let metrics = format!("{}/metrics", t.url());
    wait_for("the tail to open", async || {
        let text = reqwest::get(&metrics).await.unwrap().text().await.unwrap();
        text.lines().any(|l| !l.starts_with('#') && l.contains("tails_open") && l.ends_with(" 1"))
    })
    .await;
    let first = event("orders.created", r#"{"order_id": "o-1", "qty": 2}"#, true);
    let second = event("orders.paid", "paid in full", false);
    let ids = [first.id.clone(), second.id.clone()];
    t.host.publish(first).await.unwrap();
    t.host.publish(second).await.unwrap();
    wait_for("two recorded lines", async || std::fs::read_to_string(&cases).is_ok_and(|s| s.lines().count() >= 2))
        .await;
    drop(tail);

    // The recording is CloudEvents JSON, exact.
    let recorded = lines(&cases);
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert_eq!(recorded[0]["id"], ids[0].as_str());
    assert_eq!((recorded[0]["specversion"].as_str(), recorded[0]["source"].as_str()), (Some("1.0"), Some("/shop")));
    assert_eq!(recorded[0]["subject"], "orders.created");
    assert_eq!(recorded[0]["datacontenttype"], "application/json");
    assert_eq!(recorded[0]["data"], json!({"order_id": "o-1", "qty": 2}));
    assert_eq!(recorded[0]["tenant"], "acme co");
    assert_eq!(recorded[1]["data"], "paid in full");

    // No expectation yet: not a pass.
    let echo = component_as(dir.path(), "echo", "echo.wasm");
    let (code, out, _) = test(&echo, &cases, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains(&format!("case 1 (line 1, event {}): no expectation yet; got ok with 1 output(s)", ids[0])),
        "{out}"
    );

    // --update keeps what it does; then it passes.
    let (code, out, err) = test(&echo, &cases, &["--update"]);
    assert_eq!(code, 0, "{out}{err}");
    let snap = lines(&cases);
    assert_eq!(snap[0]["event"], recorded[0], "the event is kept as recorded");
    assert_eq!(
        snap[0]["expect"],
        json!({"result": "ok", "outputs": [{"subject": "echo.orders.created", "data": {"order_id": "o-1", "qty": 2}}]})
    );
    assert_eq!(
        snap[1]["expect"]["outputs"][0],
        json!({"subject": "echo.orders.paid", "data": {"text": "paid in full"}})
    );
    let (code, out, err) = test(&echo, &cases, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 case(s): 2 passed, 0 failed"), "{out}");

    // Another build of the plugin (echo v2 publishes elsewhere): a diff per case, exit 1.
    let v2_dir = tempfile::tempdir().unwrap();
    let v2 = component_as(v2_dir.path(), "echo2", "echo.wasm");
    let (code, out, _) = test(&v2, &cases, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("case 1 (line 1, event {}): differs", ids[0])), "{out}");
    assert!(
        out.contains(
            "  outputs[0].subject:\n    expected \"echo.orders.created\"\n    got      \"echo.v2.orders.created\""
        ),
        "{out}"
    );
    assert!(out.contains("2 case(s): 0 passed, 2 failed"), "{out}");

    // A changed expectation fails on the field that changed, and only there.
    let mut edited = snap.clone();
    edited[1]["expect"]["outputs"][0]["data"] = json!({"text": "paid in part"});
    write_lines(&cases, &edited);
    let (code, out, _) = test(&echo, &cases, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains(&format!("case 2 (line 2, event {}): differs", ids[1])), "{out}");
    assert!(
        out.contains(
            "  outputs[0].data:\n    expected {\"text\":\"paid in part\"}\n    got      {\"text\":\"paid in full\"}"
        ),
        "{out}"
    );
    assert!(!out.contains("case 1 "), "case 1 still matches: {out}");

    // --update with v2 accepts v2's behaviour; v2 passes, v1 now differs.
    assert_eq!(test(&v2, &cases, &["--update"]).0, 0);
    assert_eq!(lines(&cases)[0]["expect"]["outputs"][0]["subject"], "echo.v2.orders.created");
    let (code, out, _) = test(&v2, &cases, &[]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(test(&echo, &cases, &[]).0, 1);
}

fn order_case(id: &str, sku: &str, qty: u64, kv: Option<Value>) -> Value {
    let order = json!({"order_id": id, "sku": sku, "qty": qty, "email": "a@example.com", "amount_cents": 500});
    let event = json!({"specversion": "1.0", "id": id, "source": "/shop", "type": "order.created",
        "subject": "orders.created", "time": "2026-11-30T07:00:00Z", "datacontenttype": "application/json",
        "data": order});
    match kv {
        Some(kv) => json!({"event": event, "kv": kv}),
        None => json!({"event": event}),
    }
}

#[test]
fn kv_comes_from_the_case_and_config_from_the_flags_and_the_kv_after_is_compared() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = component_as(dir.path(), "inventory", "inventory.wasm");
    let cases = dir.path().join("cases.jsonl");
    write_lines(
        &cases,
        &[order_case("o-1", "widget", 2, Some(json!({"stock/widget": 1}))), order_case("o-2", "gizmo", 2, None)],
    );
    let config = ["--plugin-config", "stock.gizmo=3"];
    let (code, out, err) = test(&inventory, &cases, &[config[0], config[1], "--update"]);
    assert_eq!(code, 0, "{out}{err}");
    let snap = lines(&cases);
    // Out of stock: answered, nothing reserved, the case's kv unchanged.
    assert_eq!(snap[0]["expect"]["outputs"][0]["subject"], "inventory.rejected");
    assert_eq!(snap[0]["expect"]["outputs"][0]["data"]["reason"], "only 1 x widget in stock");
    assert_eq!(snap[0]["expect"]["kv"], json!({"stock/widget": 1}));
    // The operator's stock (from --plugin-config) reserved from.
    assert_eq!(snap[1]["expect"]["outputs"][0]["subject"], "inventory.reserved");
    assert_eq!(snap[1]["expect"]["kv"], json!({"stock/gizmo": 1, "reserved/gizmo": 2}));
    assert_eq!(test(&inventory, &cases, &config).0, 0);

    // Without the config the gizmo is out of stock: the diff names outputs and kv.
    let (code, out, _) = test(&inventory, &cases, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("case 2 (line 2, event o-2): differs"), "{out}");
    assert!(out.contains("expected \"inventory.reserved\"\n    got      \"inventory.rejected\""), "{out}");
    assert!(out.contains("  kv[\"stock/gizmo\"]:\n    expected 1\n    got      (absent)"), "{out}");

    // A changed kv expectation fails on that key.
    let mut edited = snap.clone();
    edited[1]["expect"]["kv"]["reserved/gizmo"] = json!(3);
    write_lines(&cases, &edited);
    let (code, out, _) = test(&inventory, &cases, &config);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("  kv[\"reserved/gizmo\"]:\n    expected 3\n    got      2"), "{out}");
}

#[test]
fn a_run_is_repeatable_clocks_and_random_are_fixed_per_case() {
    let dir = tempfile::tempdir().unwrap();
    let dice = component_as(dir.path(), "dice", "dice.wasm");
    let ev = |id: &str| {
        json!({"specversion": "1.0", "id": id, "source": "/table", "type": "roll", "subject": "dice.roll",
            "time": "2026-11-30T07:00:00Z", "data": "go"})
    };
    let (a, b) = (dir.path().join("a.jsonl"), dir.path().join("b.jsonl"));
    for f in [&a, &b] {
        write_lines(f, &[ev("r-1"), ev("r-2"), json!({"event": ev("r-1"), "kv": {"rolls": 41}})]);
        let (code, out, err) = test(&dice, f, &["--update"]);
        assert_eq!(code, 0, "{out}{err}");
    }
    assert_eq!(std::fs::read_to_string(&a).unwrap(), std::fs::read_to_string(&b).unwrap(), "two runs differ");
    let snap = lines(&a);
    let data = |i: usize| snap[i]["expect"]["outputs"][0]["data"].clone();
    // The wall clock starts at the event's time.
    assert_eq!(data(0)["now_ns"], "1796022000000000000", "{}", data(0));
    // Random is seeded by the event: another event, other numbers; the same event, the same.
    assert_ne!(data(0)["random"], data(1)["random"]);
    assert_eq!(data(0)["random"], data(2)["random"]);
    assert_eq!((data(0)["rolls"].clone(), data(2)["rolls"].clone()), (json!(1), json!(42)));
    // And the snapshot passes on a third run.
    let (code, out, _) = test(&dice, &a, &[]);
    assert_eq!(code, 0, "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_export_turns_dead_letters_into_cases_that_plugbus_test_runs() {
    let t = TestHost::start_with(&["faulty"], |c| c.retry.max_attempts = 1).await;
    let rejected = event("faulty.reject", "1", false);
    let retried = event("faulty.retry", "2", false);
    let ids = [rejected.id.clone(), retried.id.clone()];
    t.host.publish(rejected).await.unwrap();
    t.host.publish(retried).await.unwrap();
    t.wait_counter("faulty", "dead_lettered", 2).await;

    let out = plugbus(&["dlq", "export", "--plugin", "faulty", "--url", &t.url()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let dir = tempfile::tempdir().unwrap();
    let cases = dir.path().join("dead.jsonl");
    std::fs::write(&cases, &out.stdout).unwrap();
    let exported = lines(&cases);
    assert_eq!(exported.len(), 2, "{exported:?}");
    let by_id =
        |id: &str| exported.iter().find(|c| c["event"]["id"] == id).unwrap_or_else(|| panic!("{id} not exported"));
    let r = by_id(&ids[0]);
    assert_eq!(r["event"]["subject"], "faulty.reject", "the original subject, not the dead-letter subject");
    assert_eq!((r["event"]["source"].as_str(), r["event"]["tenant"].as_str()), (Some("/shop"), Some("acme co")));
    assert_eq!(r["event"]["data"], "1");
    assert_eq!(r["expect"], json!({"result": "reject"}));
    assert!(r["dead_letter"]["error"].as_str().unwrap().contains("never"), "{r}");
    assert_eq!(by_id(&ids[1])["expect"], json!({"result": "retry"}));

    // The component still does what it did: both cases pass.
    let faulty = component_as(dir.path(), "faulty", "faulty.wasm");
    let (code, out, err) = test(&faulty, &cases, &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 case(s): 2 passed, 0 failed"), "{out}");
    // A "fixed" expectation the component does not meet fails, naming the failure.
    let mut fixed = exported.clone();
    for c in &mut fixed {
        c["expect"]["result"] = json!("ok");
    }
    write_lines(&cases, &fixed);
    let (code, out, _) = test(&faulty, &cases, &[]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("  result: expected ok, got reject (handler rejected the event: never)"), "{out}");
}

/// Review 61f F3: `plugbus test` passed cases the host fails. An event over the plugin's
/// `max_event_bytes` is dead-lettered unrun (a reject naming the size), kv writes past its
/// `max_kv_bytes` fail the attempt as a retry (the host's message), and a case on a subject the
/// plugin does not subscribe to is refused naming the line: the host never delivers it there.
#[test]
fn plugbus_test_runs_a_case_as_the_host_would_its_size_kv_quota_and_subscriptions() {
    let dir = tempfile::tempdir().unwrap();
    let inventory = component_as(dir.path(), "inventory", "inventory.wasm");
    let cases = dir.path().join("cases.jsonl");
    let config = dir.path().join("plugbus.toml");
    let with_config = |toml: &str| {
        std::fs::write(&config, toml).unwrap();
        vec!["--config".to_string(), config.to_str().unwrap().to_string()]
    };
    let run = |extra: &[String]| {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        test(&inventory, &cases, &extra)
    };
    // The widget is in stock: reserved, and that writes two keys.
    write_lines(&cases, &[order_case("o-1", "widget", 2, Some(json!({"stock/widget": 5})))]);
    let (code, out, err) = run(&with_config(""));
    assert_eq!(code, 1, "no expectation yet: {out}{err}");
    assert!(out.contains("got ok with 1 output(s)"), "{out}");

    let (code, out, err) = run(&with_config("[plugins.inventory.limits]\nmax_event_bytes = 10\n"));
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("got reject (event of ") && out.contains(" bytes is over the 10-byte limit)"), "{out}");

    let (code, out, err) = run(&with_config("[plugins.inventory.limits]\nmax_kv_bytes = 20\n"));
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("got retry (the attempt's kv writes were refused: "), "{out}");
    let mut kept = with_config("[plugins.inventory.limits]\nmax_kv_bytes = 20\n");
    kept.push("--update".into());
    assert_eq!(run(&kept).0, 0);
    let kept = &lines(&cases)[0]["expect"];
    assert_eq!(kept["result"], "retry");
    assert_eq!((kept["kv"].clone(), kept["outputs"].clone()), (json!({"stock/widget": 5}), json!([])), "nothing kept");

    // The replay of another plugin's dead letter goes to that plugin alone (review 63c F7).
    let mut replay = order_case("o-3", "widget", 1, None);
    replay["event"]["plugbus-replay-for"] = json!("billing");
    write_lines(&cases, &[replay]);
    let err = bad(&inventory, &cases);
    assert!(err.contains(":1: the event is the replay of a dead letter of plugin \"billing\""), "{err}");

    let mut cancelled = order_case("o-2", "widget", 1, None);
    cancelled["event"]["subject"] = json!("orders.cancelled");
    write_lines(&cases, &[order_case("o-1", "widget", 2, None), cancelled]);
    let err = bad(&inventory, &cases);
    assert!(
        err.contains(&format!(
            "{}:2: the event's subject \"orders.cancelled\" matches none of plugin inventory's subscriptions \
             (orders.created): the host would never deliver it to this plugin",
            cases.display()
        )),
        "{err}"
    );
}

/// Bad input: exit 2 and one line on stderr naming the file, the line and what is wrong.
fn bad(component: &Path, cases: &Path) -> String {
    bad_with(component, cases, &[])
}

/// [`bad`], with `extra` flags.
fn bad_with(component: &Path, cases: &Path, extra: &[&str]) -> String {
    let (code, out, err) = test(component, cases, extra);
    assert_eq!(code, 2, "stdout: {out}\nstderr: {err}");
    let err = err.trim_end();
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    err.to_string()
}

/// Review 56f: `plugbus test` ran a plugin with limits `plugbus run` refuses (a 0 `memory_mib`:
/// every case failed as a memory limit, not as the config's error). It refuses them the same way,
/// naming the key.
#[test]
fn a_config_past_its_bounds_is_refused_by_plugbus_test_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let echo = component_as(dir.path(), "echo", "echo.wasm");
    let cases = dir.path().join("cases.jsonl");
    write_lines(&cases, &[json!({"event": {"subject": "orders.created", "data": {}}})]);
    let config = dir.path().join("plugbus.toml");
    std::fs::write(&config, "[plugins.echo.limits]\nmemory_mib = 0\n").unwrap();
    let (code, out, err) = test(&echo, &cases, &["--config", config.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("plugins.echo.limits.memory_mib = 0 is below 1"), "{out}{err}");
}

#[test]
fn bad_input_is_one_line_naming_the_file_the_line_and_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let echo = component_as(dir.path(), "echo", "echo.wasm");
    let cases = dir.path().join("cases.jsonl");
    let good = json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "subject": "orders.created"});
    let c = cases.display();

    std::fs::write(&cases, format!("{good}\n{{\"id\": \n")).unwrap();
    let err = bad(&echo, &cases);
    assert!(err.contains(&format!("{c}:2: not valid JSON")), "{err}");

    write_lines(&cases, &[good.clone(), good.clone(), json!({"id": "1", "source": "s", "type": "t"})]);
    let err = bad(&echo, &cases);
    assert!(err.contains(&format!("{c}:3: the event has no `subject`")), "{err}");

    write_lines(&cases, &[json!({"event": good, "expect": {"result": "maybe"}})]);
    let err = bad(&echo, &cases);
    assert!(err.contains(&format!("{c}:1: `expect.result` is \"maybe\"")), "{err}");

    let broken = dir.path().join("broken.wasm");
    std::fs::write(&broken, b"garbage").unwrap();
    write_lines(&cases, &[good]);
    let err = bad(&broken, &cases);
    assert!(
        err.contains(&format!("{}: the component does not load: not a WebAssembly file", broken.display())),
        "{err}"
    );

    let missing = dir.path().join("missing.jsonl");
    let err = bad(&echo, &missing);
    assert!(err.contains(&format!("{}: cannot read the case file", missing.display())), "{err}");
}

/// `--update` of a case file someone else wrote: a link they planted beside it, at the name the
/// rewrite used to write through (`<cases>.tmp`), is left alone, and so is what it points to; a
/// few cases whose handler writes megabytes of kv each are refused, naming the case, before the
/// rewritten file passes its bound (a 570-byte file became 468 MB and 1.1 GB of memory).
#[test]
fn an_update_writes_through_no_planted_link_and_stops_at_its_bound() {
    let dir = tempfile::tempdir().unwrap();
    let hostile = component_as(dir.path(), "hostile", "hostile.wasm");
    let cases = dir.path().join("cases.jsonl");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious").unwrap();
    std::os::unix::fs::symlink(&victim, dir.path().join("cases.jsonl.tmp")).unwrap();
    let case = |id: &str, data: &str| json!({"specversion": "1.0", "id": id, "source": "s", "type": "t", "subject": "hostile.kvwrites", "data": data});
    write_lines(&cases, &[case("1", "2 10")]);
    let (code, out, err) = test(&hostile, &cases, &["--update"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious", "written through the planted link");
    assert!(std::fs::symlink_metadata(&cases).unwrap().file_type().is_file(), "the case file became a link");
    assert_eq!(lines(&cases)[0]["expect"]["result"], "ok");
    // Five cases of 60 keys of 260,000 bytes each: about 78 MB of kv as JSON, past 64 MiB.
    let big: Vec<Value> = (0..5).map(|i| case(&i.to_string(), "60 260000")).collect();
    write_lines(&cases, &big);
    let before = std::fs::read(&cases).unwrap();
    let err = bad_with(&hostile, &cases, &["--update"]);
    let c = cases.display();
    assert!(err.contains(&format!("{c}:")) && err.contains("would pass 64 MiB: nothing was written"), "{err}");
    assert_eq!(std::fs::read(&cases).unwrap(), before, "the case file changed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tail_format_other_than_plain_or_cloudevents_is_refused_naming_it() {
    let t = TestHost::start(&["echo"]).await;
    let resp = reqwest::get(format!("{}/v1/events/orders.*?format=yaml", t.url())).await.unwrap();
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("format \"yaml\""), "{body}");
}

/// A `inventory.reserved` event for the payments handler.
fn reserved_case(order: &str, http: Value) -> Value {
    let event = json!({"specversion": "1.0", "id": format!("r-{order}"), "source": "/shop", "type": "reserved",
        "subject": "inventory.reserved", "datacontenttype": "application/json",
        "data": {"order_id": order, "email": "a@example.com", "amount_cents": 1250}});
    json!({"event": event, "http": http})
}

#[test]
fn outbound_http_is_answered_from_the_cases_stubs_and_the_calls_are_compared() {
    let dir = tempfile::tempdir().unwrap();
    let payments = component_as(dir.path(), "payments", "payments.wasm");
    let cases = dir.path().join("cases.jsonl");
    let charges = "https://api.payments.example/v1/charges";
    let stub = |status: u16, body: Value| json!([{"method": "POST", "url": charges, "status": status, "body": body}]);
    write_lines(
        &cases,
        &[
            reserved_case("o-1", stub(201, json!({"id": "ch_7"}))),
            reserved_case("o-2", stub(402, json!({"error": "card declined"}))),
            reserved_case("o-3", stub(503, json!({"text": "down"}))),
            // No stub for the call: it is refused, never sent anywhere.
            reserved_case("o-4", json!([{"method": "GET", "url": charges, "body": {"id": "ch_x"}}])),
        ],
    );
    let config = ["--plugin-config", "provider_url=https://api.payments.example"];
    let (code, out, err) = test(&payments, &cases, &[config[0], config[1], "--update"]);
    assert_eq!(code, 0, "{out}{err}");
    let snap = lines(&cases);
    let sent = json!({"order_id": "o-1", "amount_cents": 1250, "email": "a@example.com"});
    assert_eq!(snap[0]["expect"]["http"], json!([{"call": format!("POST {charges}"), "body": sent}]));
    assert_eq!(snap[0]["expect"]["outputs"][0]["subject"], "payments.captured");
    assert_eq!(snap[0]["expect"]["outputs"][0]["data"]["payment_id"], "ch_7", "the stub's answer reached the handler");
    assert_eq!(snap[1]["expect"]["outputs"][0]["subject"], "payments.failed");
    assert!(snap[1]["expect"]["outputs"][0]["data"]["reason"].as_str().unwrap().contains("402"), "{}", snap[1]);
    assert_eq!(snap[2]["expect"]["result"], "retry", "a 503 is the provider's outage: {}", snap[2]);
    assert_eq!(snap[3]["expect"]["result"], "reject", "{}", snap[3]);
    assert_eq!(snap[3]["expect"]["http"][0]["call"], format!("POST {charges}"), "the refused call is listed too");
    // The snapshot passes again.
    let (code, out, _) = test(&payments, &cases, &config);
    assert_eq!(code, 0, "{out}");
    // Why case 4 failed: no stub left for the call.
    let (_, out, _) = {
        let one = dir.path().join("one.jsonl");
        write_lines(&one, &[reserved_case("o-4", json!([]))]);
        test(&payments, &one, &config)
    };
    assert!(out.contains("no stub for POST https://api.payments.example/v1/charges"), "{out}");

    // Another answer from the provider: the diff names the output; another request: the call.
    let mut edited = snap.clone();
    edited[0]["http"][0]["body"] = json!({"id": "ch_8"});
    edited[1]["expect"]["http"][0]["body"]["amount_cents"] = json!(999);
    write_lines(&cases, &edited);
    let (code, out, _) = test(&payments, &cases, &config);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("case 1 (line 1, event r-o-1): differs\n  outputs[0].data:"), "{out}");
    assert!(out.contains("case 2 (line 2, event r-o-2): differs\n  http[0]:\n    expected POST https://api.payments.example/v1/charges {\"amount_cents\":999"), "{out}");

    // A stub does not open a destination the manifest does not ask for.
    let evil = dir.path().join("evil.jsonl");
    let evil_stub =
        json!([{"method": "POST", "url": "https://evil.example/v1/charges", "status": 201, "body": {"id": "x"}}]);
    write_lines(&evil, &[reserved_case("o-5", evil_stub)]);
    let (code, out, _) = test(&payments, &evil, &["--plugin-config", "provider_url=https://evil.example"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("is not in the plugin's manifest `outbound` list"), "{out}");

    // A stub that is not one is named with its place.
    write_lines(&evil, &[reserved_case("o-6", json!([{"method": "POST", "status": 201}]))]);
    let (code, out, err) = test(&payments, &evil, &config);
    assert_ne!(code, 0);
    assert!(err.contains("evil.jsonl:1: `http[0]`: no `url`"), "{out}{err}");
}

/// `plugbus test` compiles through the compile cache the host would use (here the one
/// `PLUGBUS_COMPILE_CACHE_DIR` names) once the host made it: a second run reads what the first
/// kept (an entry forged in between is refused, and compiled again). It makes no cache, no key
/// and no `data_dir` of its own (review 48c M3: run as another user it replaced a running host's
/// key). Every run compiled the component again (seconds each).
#[test]
fn plugbus_test_compiles_through_the_hosts_compile_cache_and_makes_no_data_dir() {
    let dir = tempfile::tempdir().unwrap();
    let cases = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/payments/cases.jsonl");
    let copy = dir.path().join("cases.jsonl");
    std::fs::copy(&cases, &copy).unwrap();
    let payments = component_as(dir.path(), "payments", "payments.wasm");
    let cache = dir.path().join("compiled");
    let run = |cache: Option<&Path>, cwd: &Path| {
        let mut cmd = Command::new(plugbus_bin());
        cmd.current_dir(cwd).env_remove("PLUGBUS_COMPILE_CACHE_DIR");
        if let Some(cache) = cache {
            cmd.env("PLUGBUS_COMPILE_CACHE_DIR", cache);
        }
        cmd.args(["test", payments.to_str().unwrap(), copy.to_str().unwrap()]);
        cmd.args(["--plugin-config", "provider_url=https://api.payments.example"]);
        let out = output_within(&mut cmd, WAIT);
        let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        assert_eq!(out.status.code(), Some(0), "{}{}", text(&out.stdout), text(&out.stderr));
        text(&out.stderr)
    };
    let entries = || -> Vec<PathBuf> {
        let mut found: Vec<PathBuf> = std::fs::read_dir(&cache).map_or(Vec::new(), |d| {
            d.map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|x| x == "cwasm")).collect()
        });
        found.sort();
        found
    };
    // Not made yet: the tool makes neither the folder nor its key.
    run(Some(&cache), dir.path());
    assert!(!cache.exists() && !dir.path().join("compiled.key").exists(), "the tool made a cache");
    // Made by a host (its own code path), with its key.
    let settings = plugbus::sandbox::SandboxSettings::default();
    drop(plugbus::sandbox::Sandbox::new(settings).unwrap().with_cache(&cache).unwrap());
    run(Some(&cache), dir.path());
    let kept = entries();
    assert_eq!(kept.len(), 1, "the first run kept what it compiled in {}", cache.display());
    std::fs::write(&kept[0], b"forged").unwrap();
    let err = run(Some(&cache), dir.path());
    assert!(err.contains("failed verification"), "the second run did not read the cache: {err}");
    assert_ne!(std::fs::read(&kept[0]).unwrap(), b"forged", "compiled again and kept");

    let bare = tempfile::tempdir().unwrap();
    run(None, bare.path());
    let made: Vec<_> = std::fs::read_dir(bare.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(made.is_empty(), "a run with no data_dir made {made:?}");
}

#[test]
fn the_payments_example_cases_pass_against_the_built_example() {
    let cases = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/payments/cases.jsonl");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("cases.jsonl");
    std::fs::copy(&cases, &copy).unwrap();
    let payments = component_as(dir.path(), "payments", "payments.wasm");
    let (code, out, err) = test(&payments, &copy, &["--plugin-config", "provider_url=https://api.payments.example"]);
    assert_eq!(code, 0, "the README's example cases fail:\n{out}{err}");
    assert!(out.contains("5 case(s): 5 passed, 0 failed"), "{out}");
    // Its calls are answered from stubs: no warning that the operator granted none.
    assert!(!err.contains("allowed_outbound grants none"), "{err}");
}
