//! `TestHost` applies the host's rules: each test names the production behaviour it mirrors and
//! fails if the test host drifts from it.

use plugbus_sdk::testing::{Limits, TestHost};
use plugbus_sdk::{Event, HandlerError, PublishError, handler, kv, log, publish, publish_json, publish_with_headers};
use serde_json::{Value, json};

#[handler(subscribe = ["orders.created"], publishes = ["inventory.>"])]
fn sneaky(ev: Event) -> Result<(), HandlerError> {
    publish("inventory.reserved", ev.data())?;
    publish("payments.captured", ev.data())?;
    Ok(())
}

#[test]
fn a_publish_outside_the_allow_list_is_denied_and_releases_nothing() {
    let run = TestHost::new().run(sneaky, Event::new("orders.created", "{}"));
    let err = run.result.unwrap_err();
    assert!(!err.is_retry(), "a denied publish rejects: {err}");
    assert!(
        err.message().contains("\"payments.captured\" is not in the manifest's publishes [\"inventory.>\"]"),
        "{err}"
    );
    assert!(run.published.is_empty(), "the allowed output before the denied one is not released either");
}

#[handler(subscribe = ["orders.created"], publishes = ["inventory.>"])]
fn swallows(_ev: Event) -> Result<(), HandlerError> {
    let denied = publish("billing.x", b"");
    assert!(matches!(denied, Err(PublishError::Denied(_))), "{denied:?}");
    publish("inventory.reserved", b"")?;
    Ok(())
}

#[test]
fn a_swallowed_refusal_still_rejects_the_event() {
    let run = TestHost::new().run(swallows, Event::new("orders.created", ""));
    let err = run.result.unwrap_err();
    assert!(err.message().starts_with("publish refused: \"billing.x\""), "{err}");
    assert!(run.published.is_empty());
}

#[handler(subscribe = ["orders.created"], publishes = [">"])]
fn wide(ev: Event) -> Result<(), HandlerError> {
    let target = ev.text()?.to_string();
    publish(&target, b"")?;
    Ok(())
}

#[test]
fn subjects_follow_the_hosts_rules_even_under_a_catch_all() {
    let mut host = TestHost::new();
    let denied = |host: &mut TestHost, subject: &str| host.run(wide, Event::new("orders.created", subject)).result;
    assert_eq!(denied(&mut host, "a.b.c"), Ok(()));
    for (subject, why) in [
        ("$SYS.x", "is a system subject"),
        ("_INBOX.abc", "is a system subject"),
        ("plugbus.dlq.payments", "is a dead-letter subject"),
        ("a..b", "empty token"),
        ("a.*", "cannot contain the wildcards"),
        ("a b", "whitespace"),
    ] {
        let err = denied(&mut host, subject).unwrap_err();
        assert!(err.message().contains(why), "{subject}: {err}");
    }
    let long = "a".repeat(1025);
    assert!(denied(&mut host, &long).unwrap_err().message().contains("longer than 1024 bytes"));
}

#[handler(subscribe = ["orders.*"], publishes = ["orders.*.seen", "audit.>"])]
fn patterns(ev: Event) -> Result<(), HandlerError> {
    publish(ev.text()?, b"")?;
    Ok(())
}

#[test]
fn wildcards_in_the_allow_list_match_like_nats() {
    let mut host = TestHost::new();
    let mut ok = |subject: &str| host.run(patterns, Event::new("orders.created", subject)).result.is_ok();
    assert!(ok("orders.o1.seen"));
    assert!(!ok("orders.o1.o2.seen"), "`*` is one token");
    assert!(!ok("orders.seen"));
    assert!(ok("audit.a"));
    assert!(ok("audit.a.b.c"), "`>` is one or more trailing tokens");
    assert!(!ok("audit"), "`>` needs at least one token");
}

#[handler(subscribe = ["stock.*"], publishes = ["stock.changed"])]
fn writes_then_fails(ev: Event) -> Result<(), HandlerError> {
    kv::set("a", "changed")?;
    kv::delete("b")?;
    kv::set("new", "x")?;
    assert_eq!(kv::get("a")?.as_deref(), Some(&b"changed"[..]), "reads see the attempt's own writes");
    assert_eq!(kv::get("b")?, None);
    publish("stock.changed", b"")?;
    match ev.subject() {
        "stock.retry" => Err(HandlerError::retry("later")),
        "stock.reject" => Err(HandlerError::reject("never")),
        "stock.panic" => panic!("boom"),
        _ => Ok(()),
    }
}

#[test]
fn a_failed_run_leaves_kv_unchanged_and_publishes_nothing() {
    let start = TestHost::new().with_kv("a", "1").with_kv("b", "2");
    for (subject, retry, text) in [
        ("stock.retry", true, "later"),
        ("stock.reject", false, "never"),
        ("stock.panic", true, "handler panicked: boom"),
    ] {
        let mut host = start.clone();
        let run = host.run(writes_then_fails, Event::new(subject, ""));
        let err = run.result.expect_err(subject);
        assert_eq!((err.is_retry(), err.message()), (retry, text), "{subject}");
        assert!(run.published.is_empty(), "{subject}: outputs released");
        assert_eq!(run.kv, *start.kv(), "{subject}: kv changed");
        assert_eq!(host.kv(), start.kv(), "{subject}: the host's store changed");
    }
    let mut host = start.clone();
    let run = host.run(writes_then_fails, Event::new("stock.ok", ""));
    assert_eq!(run.result, Ok(()));
    assert_eq!(run.published.len(), 1);
    assert_eq!(run.kv_get("a"), Some(&b"changed"[..]));
    assert_eq!(run.kv_get("b"), None);
    assert_eq!(run.kv_get("new"), Some(&b"x"[..]));
    assert_eq!(host.kv(), &run.kv, "a successful run commits to the host's store");
}

#[handler(subscribe = ["payments.due"], publishes = ["payments.captured"])]
fn flaky(ev: Event) -> Result<(), HandlerError> {
    if ev.attempt() < 3 {
        log::warn(format!("attempt {}: gateway busy", ev.attempt()));
        return Err(HandlerError::retry("gateway busy"));
    }
    publish_json("payments.captured", &json!({ "attempt": ev.attempt() }))?;
    Ok(())
}

#[test]
fn retry_logic_is_tested_with_with_attempt() {
    let mut host = TestHost::new();
    let first = host.run(flaky, Event::new("payments.due", ""));
    assert_eq!(first.result, Err(HandlerError::retry("gateway busy")));
    assert_eq!(first.logs[0].to_string(), "WARN attempt 1: gateway busy", "logs are kept on failure");
    let third = host.run(flaky, Event::new("payments.due", "").with_attempt(3));
    assert_eq!(third.result, Ok(()));
    assert_eq!(third.published[0].json::<Value>(), json!({ "attempt": 3 }));
}

#[test]
#[should_panic(expected = "matches none of")]
fn an_event_the_host_would_never_deliver_fails_the_test() {
    TestHost::new().run(flaky, Event::new("payments.refunded", ""));
}

#[handler(subscribe = ["a.b"], publishes = ["$SYS.>"])]
fn greedy(_ev: Event) -> Result<(), HandlerError> {
    Ok(())
}

#[test]
#[should_panic(
    expected = "would refuse this handler at load: manifest field `publishes[0]` \"$SYS.>\" names a system subject"
)]
fn a_manifest_the_host_would_refuse_fails_the_test() {
    TestHost::new().run(greedy, Event::new("a.b", ""));
}

#[handler(name = "shop", subscribe = ["a.b"], queue_group = "orders-workers")]
fn joins_a_foreign_group(_ev: Event) -> Result<(), HandlerError> {
    Ok(())
}

#[handler(name = "shop", subscribe = ["a.b"], queue_group = "plugbus.shop.v2")]
fn splits_its_own_group(_ev: Event) -> Result<(), HandlerError> {
    Ok(())
}

#[handler(name = "shop", subscribe = ["a.b"], order_by_header = "tenant id")]
fn orders_by_a_spaced_header(_ev: Event) -> Result<(), HandlerError> {
    Ok(())
}

#[handler(name = "shop", version = "1.0 beta", subscribe = ["a.b"])]
fn spaced_version(_ev: Event) -> Result<(), HandlerError> {
    Ok(())
}

#[handler(name = "shop", subscribe = ["a.b"], outbound = ["https://api.example.com/v1"])]
fn outbound_with_a_path(_ev: Event) -> Result<(), HandlerError> {
    Ok(())
}

/// Review 61f F5: `#[handler]` options the loader refuses passed `TestHost` silently (a queue
/// group not the plugin's, a header name or version with a space, an outbound rule with a path,
/// which `TestHost` even granted calls under). Each now fails the run as the loader would.
#[test]
fn manifest_options_the_loader_refuses_fail_the_test_naming_the_field() {
    let refusal = |handler: fn(Event) -> Result<(), HandlerError>| {
        let run = std::panic::catch_unwind(|| TestHost::new().run(handler, Event::new("a.b", "")));
        let panic = run.expect_err("the host would refuse it at load");
        panic.downcast_ref::<String>().cloned().unwrap_or_default()
    };
    let why = refusal(joins_a_foreign_group);
    assert!(
        why.contains("manifest field `queue-group` \"orders-workers\" is not this plugin's: a manifest may only use \"plugbus.shop\""),
        "{why}"
    );
    let why = refusal(orders_by_a_spaced_header);
    assert!(why.contains("manifest field `order-by` header name \"tenant id\" has spaces"), "{why}");
    let why = refusal(spaced_version);
    assert!(why.contains("manifest field `version` \"1.0 beta\" has spaces"), "{why}");
    let why = refusal(outbound_with_a_path);
    assert!(
        why.contains("manifest field `outbound[0]`: \"https://api.example.com/v1\": only scheme, host and port"),
        "{why}"
    );
    assert_eq!(TestHost::new().run(splits_its_own_group, Event::new("a.b", "")).result, Ok(()));
}

#[handler(subscribe = ["cache.fill"])]
fn caches_what_fits(ev: Event) -> Result<(), HandlerError> {
    let size: usize = ev.json()?;
    match kv::set("k", vec![0u8; size]) {
        Err(kv::KvError::TooLarge(_)) => Ok(()),
        other => other.map_err(|e| HandlerError::retry(e.to_string())),
    }
}

/// Review 61f F4: a call a little over a cap gets the cap's error, but one past the host's
/// per-call copy limit (about four times the largest legitimate call) traps on the host: the
/// attempt fails, and is retried, whatever the handler does with errors. `TestHost` returned the
/// cap's error there too, so a handler tested to degrade gracefully was dead-lettered in
/// production.
#[test]
fn a_call_far_past_a_cap_fails_the_run_as_the_hosts_trap_does() {
    let mut host = TestHost::new();
    let limit = Limits::default().hostcall_bytes();
    assert_eq!(host.run(caches_what_fits, Event::new("cache.fill", "300000")).result, Ok(()), "TooLarge, handled");
    let run = host.run(caches_what_fits, Event::new("cache.fill", (limit + 1).to_string()));
    let err = run.result.unwrap_err();
    assert!(err.is_retry(), "{err:?}");
    assert_eq!(
        err.message(),
        format!(
            "the handler passed more than {limit} bytes to the host in one call (the per-call copy limit, from \
             max_output_bytes / max_kv_value_bytes / max_log_bytes)"
        )
    );
}

#[handler(subscribe = ["a.b"], publishes = ["out.>"])]
fn headers(ev: Event) -> Result<(), HandlerError> {
    let name = ev.text()?;
    publish_with_headers("out.x", b"", &[(name, "v")])?;
    Ok(())
}

#[test]
fn reserved_and_malformed_header_names_are_refused() {
    let mut host = TestHost::new();
    let mut run = |name: &str| host.run(headers, Event::new("a.b", name)).result;
    assert_eq!(run("tenant"), Ok(()));
    assert_eq!(run("datacontenttype"), Ok(()), "the plugin's own data type is allowed");
    for reserved in ["plugbus-error", "Nats-Msg-Id", "id", "ce-source", "ce_type", "ce-datacontenttype"] {
        assert!(run(reserved).unwrap_err().message().contains("is reserved"), "{reserved}");
    }
    for bad in ["", "a b", "a:b", "a\nb"] {
        assert!(run(bad).unwrap_err().message().contains("not a valid header name"), "{bad:?}");
    }
}

#[handler(subscribe = ["batch.ready"], publishes = ["items.>"])]
fn fan_out(ev: Event) -> Result<(), HandlerError> {
    let (count, size): (usize, usize) = ev.json()?;
    for i in 0..count {
        publish(&format!("items.{i}"), vec![b'x'; size])?;
    }
    Ok(())
}

#[test]
fn publish_count_and_byte_caps_apply_per_event() {
    let mut host = TestHost::new();
    assert_eq!(host.run(fan_out, Event::new("batch.ready", "[100, 1]")).result, Ok(()));
    let err = host.run(fan_out, Event::new("batch.ready", "[101, 1]")).result.unwrap_err();
    assert!(err.message().contains("publish limit of 100 per event reached"), "{err}");
    let err = host.run(fan_out, Event::new("batch.ready", "[2, 600000]")).result.unwrap_err();
    assert!(err.message().contains("output limit of 1048576 bytes per event reached"), "{err}");

    let mut tight = TestHost::new().with_limits(Limits { max_publishes: 2, ..Limits::default() });
    assert!(tight.run(fan_out, Event::new("batch.ready", "[3, 1]")).result.is_err());
}

#[test]
fn an_event_over_max_event_bytes_is_rejected_unrun() {
    let big = Event::new("batch.ready", vec![b' '; 1024 * 1024 + 1]);
    let run = TestHost::new().run(|_| panic!("must not run"), big);
    assert_eq!(run.result, Err(HandlerError::reject("event of 1048577 bytes is over the 1048576-byte limit")));
}

#[handler(subscribe = ["kv.big"])]
fn big_kv(ev: Event) -> Result<(), HandlerError> {
    let size: usize = ev.json()?;
    kv::set("k", vec![0u8; size])?;
    Ok(())
}

#[test]
fn kv_values_over_the_cap_are_too_large() {
    let mut host = TestHost::new();
    assert_eq!(host.run(big_kv, Event::new("kv.big", "262144")).result, Ok(()));
    let err = host.run(big_kv, Event::new("kv.big", "262145")).result.unwrap_err();
    assert!(err.message().contains("kv value too large: key \"k\": 262145 bytes over the 262144-byte cap"), "{err}");
}

#[handler(subscribe = ["kv.key"])]
fn long_key(ev: Event) -> Result<(), HandlerError> {
    let size: usize = ev.json()?;
    kv::set(&"k".repeat(size), "v")?;
    Ok(())
}

/// The host's cap on keys (512 bytes on every backend), with its words.
#[test]
fn kv_keys_over_512_bytes_are_too_large() {
    let mut host = TestHost::new();
    assert_eq!(host.run(long_key, Event::new("kv.key", "512")).result, Ok(()));
    let err = host.run(long_key, Event::new("kv.key", "5000")).result.unwrap_err();
    assert!(err.message().contains("5000 bytes over the 512-byte cap on keys"), "{err}");
    assert!(err.message().contains("[cut at 64 of 5000 bytes]"), "{err}");
}

/// The host's quota on what a plugin's kv holds in all (`max_kv_bytes`), across events.
#[test]
fn a_run_taking_the_kv_past_its_quota_fails_whole_and_deletes_always_pass() {
    let limits = Limits { max_kv_bytes: 300, ..Limits::default() };
    let mut host = TestHost::new().with_limits(limits);
    let set = |key: &'static str, n: usize| move |_| kv::set(key, vec![7u8; n]).map_err(HandlerError::from);
    // "a" + 100 bytes + 64 = 165
    assert_eq!(host.run(set("a", 100), Event::new("any", "")).result, Ok(()));
    let run = host.run(set("b", 100), Event::new("any", ""));
    let err = run.result.clone().unwrap_err();
    assert!(err.message().contains("would hold 330 bytes, over its max_kv_bytes of 300"), "{err}");
    assert!(err.is_retry(), "another event may free room: {err:?}");
    assert!(run.kv_get("b").is_none(), "nothing of it is kept");
    // a rewrite replaces what the key held; a store over a lowered quota may shrink and delete
    assert_eq!(host.run(set("a", 200), Event::new("any", "")).result, Ok(()));
    let mut host = host.with_limits(Limits { max_kv_bytes: 100, ..Limits::default() });
    assert_eq!(host.run(set("a", 150), Event::new("any", "")).result, Ok(()), "it shrinks");
    assert!(host.run(set("z", 0), Event::new("any", "")).result.is_err(), "it grows");
    assert_eq!(host.run(|_| kv::delete("a").map_err(HandlerError::from), Event::new("any", "")).result, Ok(()));
    assert_eq!(host.run(set("z", 30), Event::new("any", "")).result, Ok(()));
}

#[test]
fn kv_write_and_read_counts_are_capped_per_attempt() {
    let limits = Limits { max_kv_writes: 2, max_kv_reads: 3, ..Limits::default() };
    let mut host = TestHost::new().with_limits(limits);
    let run = host.run(
        |_| {
            kv::set("a", "1")?;
            kv::set("b", "1")?;
            kv::set("a", "2")?; // a rewrite is not a new key
            assert!(matches!(kv::set("c", "1"), Err(kv::KvError::TooLarge(m)) if m.contains("write limit of 2 keys")));
            kv::get("x")?;
            kv::get("y")?;
            kv::get("x")?; // read again: read again, as on the host
            kv::get("a")?; // own write: not a read of the store
            assert!(matches!(kv::get("z"), Err(kv::KvError::TooLarge(m)) if m.contains("read limit of 3 reads")));
            Ok(())
        },
        Event::new("any", ""),
    );
    assert_eq!(run.result, Ok(()));
    assert_eq!(run.kv_get("a"), Some(&b"2"[..]));
}

#[test]
fn kv_read_bytes_are_capped_per_attempt_as_on_the_host() {
    let limits = Limits { max_kv_read_bytes: 250, ..Limits::default() };
    let mut host = TestHost::new().with_kv("big", vec![7u8; 100]).with_limits(limits);
    let run = host.run(
        |_| {
            kv::get("big")?;
            kv::get("big")?; // a key read again is read again
            assert!(matches!(kv::get("big"), Err(kv::KvError::TooLarge(m)) if m.contains("read limit of 250 bytes")));
            Ok(())
        },
        Event::new("any", ""),
    );
    assert_eq!(run.result, Ok(()));
}

#[test]
fn config_and_logs_reach_the_handler_and_the_run() {
    let run = TestHost::new().with_config("sender", "ops@example.com").run(
        |_| {
            log::info(plugbus_sdk::config::get("sender").unwrap_or_default());
            log::debug(format!("{:?}", plugbus_sdk::config::get("missing")));
            Ok(())
        },
        Event::new("any", ""),
    );
    let lines: Vec<String> = run.logs.iter().map(ToString::to_string).collect();
    assert_eq!(lines, ["INFO ops@example.com", "DEBUG None"]);
}

#[test]
fn log_text_past_the_cap_is_dropped() {
    let run = TestHost::new().run(
        |_| {
            for _ in 0..100 {
                log::info("x".repeat(1024));
            }
            Ok(())
        },
        Event::new("any", ""),
    );
    assert_eq!(run.logs.len(), 64);
}

#[test]
fn a_plain_function_has_no_publishes() {
    let run = TestHost::new().run(|_| Ok(publish("a.b", b"")?), Event::new("any", ""));
    let err = run.result.unwrap_err();
    assert!(err.message().contains("not a #[handler]"), "{err}");
}

#[test]
fn a_closure_calling_a_handler_gets_its_manifest() {
    let run = TestHost::new().run(|ev| sneaky(ev.with_attempt(2)), Event::new("orders.created", "{}"));
    assert!(run.result.unwrap_err().message().contains("payments.captured"));
}

#[test]
fn the_handler_stays_callable_by_its_own_name() {
    // Outside a TestHost, a handler that touches no host call runs as a plain function...
    assert_eq!(patterns_free(Event::new("a.b", "")), Ok(()));
    // ...and a host call says where it should have run.
    let panic = std::panic::catch_unwind(|| sneaky(Event::new("orders.created", ""))).unwrap_err();
    let text = panic.downcast_ref::<String>().unwrap();
    assert!(text.contains("plugbus_sdk::publish was called outside TestHost::run"), "{text}");
}

#[handler(subscribe = ["a.b"])]
fn patterns_free(ev: Event) -> Result<(), HandlerError> {
    ev.text()?;
    Ok(())
}

#[test]
fn runs_on_separate_threads_do_not_see_each_other() {
    let handles: Vec<_> = (0..4)
        .map(|i| {
            std::thread::spawn(move || {
                let mut host = TestHost::new();
                for _ in 0..50 {
                    let run = host.run(
                        |_| {
                            let n = kv::get_json::<u64>("n")?.unwrap_or(0);
                            kv::set_json("n", &(n + 1))?;
                            Ok(())
                        },
                        Event::new("any", "").with_id(format!("t{i}")),
                    );
                    run.result.unwrap();
                }
                host.kv().get_json::<u64>("n")
            })
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().unwrap(), Some(50));
    }
}

#[handler(subscribe = ["orders.created"], publishes = ["audit.>", "plugbus.dlq.>"])]
fn forward(ev: Event) -> Result<(), HandlerError> {
    let v: Value = ev.json()?;
    let (s, k, val) =
        (v["s"].as_str().unwrap_or_default(), v["k"].as_str().unwrap_or_default(), v["v"].as_str().unwrap_or_default());
    publish_with_headers(s, b"x", &[(k, val)])?;
    Ok(())
}

/// The host refuses these outputs (review 61f F1: TestHost let them through, so `cargo test`
/// said ok of a handler whose every such event is dead-lettered live): a dead-letter subject
/// even where `publishes` names it, a header value with a line break or NUL, a header where
/// the CloudEvents JSON format keeps the data, a content type that is an envelope or holds a
/// control character.
#[test]
fn outputs_the_host_refuses_are_refused_here_too() {
    for (s, k, v) in [
        ("plugbus.dlq.other", "tenant", "a"),
        ("audit.x", "reason", "line one\nline two"),
        ("audit.x", "reason", "nul\0"),
        ("audit.x", "Data_Base64", "v"),
        ("audit.x", "ce-data", "v"),
        ("audit.x", "content-type", "application/cloudevents+json"),
        ("audit.x", "datacontenttype", "text/plain;\tcharset=utf-8"),
    ] {
        let run = TestHost::new().run(forward, Event::new_json("orders.created", &json!({"s": s, "k": k, "v": v})));
        assert!(run.result.is_err(), "{s} {k}={v:?}: the host rejects this event");
        assert!(run.published.is_empty());
    }
    let run = TestHost::new().run(
        forward,
        Event::new_json("orders.created", &json!({"s": "audit.x", "k": "content-type", "v": "text/plain"})),
    );
    assert_eq!(run.result, Ok(()));
    assert_eq!(run.published.len(), 1);
}
