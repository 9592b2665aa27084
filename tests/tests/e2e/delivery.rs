//! Delivery semantics: retries with backoff, dead letters, isolation between plugins, order per
//! key, backpressure and drain. The retry and dead-letter cases run on every transport: the
//! embedded bus, core NATS (retries wait in the host) and JetStream (where a retry is a `nak`
//! with the backoff delay).

use plugbus::deadletter::headers;
use plugbus::retry::RetryPolicy;
use plugbus::router::Flow;
use plugbus_tests::nats::NatsServer;
use plugbus_tests::{Bus, TestHost, fast_retries};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Runs a shared case on the embedded bus, core NATS and JetStream.
macro_rules! on_every_transport {
    ($case:ident) => {
        mod $case {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn embedded() {
                super::$case(&super::Bus::Embedded).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn core_nats() {
                let server = super::NatsServer::start().await;
                super::$case(&super::Bus::Core(&server)).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn jetstream() {
                let server = super::NatsServer::start().await;
                super::$case(&super::Bus::JetStream(&server)).await;
            }
        }
    };
}

on_every_transport!(fails_twice_then_succeeds_handled_once_outputs_once);
on_every_transport!(reject_dead_letters_at_once_with_every_header);
on_every_transport!(exhausted_retries_dead_letter_with_the_last_error_and_replay_works);
on_every_transport!(a_replayed_dead_letter_runs_again_only_in_the_plugin_that_failed_it);
on_every_transport!(a_replayed_dead_letter_of_a_plugins_own_output_runs_again_only_in_it);

/// The attack on the documented recovery: `faulty` rejects an event that `echo` handles too.
/// Replaying faulty's dead letter used to publish it on its original subject to every
/// subscriber: echo ran it again (its kv writes twice, its outputs again under new ids). The
/// replay now names the plugin it is for (`plugbus-replay-for`): only faulty runs it. On NATS
/// echo takes it and lets it go unrun; the embedded bus gives it to faulty alone.
async fn a_replayed_dead_letter_runs_again_only_in_the_plugin_that_failed_it(bus: &Bus<'_>) {
    let t = TestHost::start_on(bus, &["faulty", "echo"], fast_retries).await;
    let mut seen = t.observe(&["echo.>", "plugbus.dlq.>"]).await;
    t.publish("faulty.reject", "once").await;
    t.wait_counter("echo", "ok", 1).await;
    t.wait_counter("faulty", "dead_lettered", 1).await;
    // (the echo and the dead letter, in either order)
    seen.drain(Duration::from_millis(300)).await;
    replay_faultys_dead_letter_and_see_echo_let_it_go(bus, &t, &mut seen, 1).await;
    assert_eq!(t.counter("faulty", "received"), 2);
}

/// Replays faulty's one dead letter (`POST /v1/dlq/replay?plugin=faulty`); faulty runs it
/// again (and rejects it again), and echo, which handled `echo_handled` events, runs nothing more.
/// On NATS (the broker gives the replay to every subscriber) echo lets it go, counted
/// (`replays_let_go`, `plugbus_replays_let_go_total`); the embedded bus never gives it to echo.
async fn replay_faultys_dead_letter_and_see_echo_let_it_go(
    bus: &Bus<'_>,
    t: &TestHost,
    seen: &mut plugbus_tests::Observer,
    echo_handled: u64,
) {
    let client = reqwest::Client::new();
    let replay = client.post(format!("{}/v1/dlq/replay?plugin=faulty", t.url())).send().await.unwrap();
    let report: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(report["replayed"].as_array().map(Vec::len), Some(1), "{report}");
    t.wait_counter("faulty", "dead_lettered", 2).await;
    let rest = seen.drain(Duration::from_millis(500)).await;
    assert!(rest.iter().all(|e| !e.subject.starts_with("echo.")), "echo ran the replay: {rest:?}");
    assert_eq!((t.counter("echo", "received"), t.counter("echo", "ok")), (echo_handled, echo_handled));
    let let_go = match bus {
        Bus::Embedded => 0,
        Bus::Core(_) | Bus::JetStream(_) => 1,
    };
    t.wait_counter("echo", "replays_let_go", let_go).await;
    assert_eq!(t.counter("echo", "replays_let_go"), let_go, "echo was given faulty's replay");
    assert_eq!(t.counter("faulty", "replays_let_go"), 0, "faulty ran its replay");
    let metrics = reqwest::get(format!("{}/metrics", t.url())).await.unwrap().text().await.unwrap();
    let line = |plugin: &str, n: u64| format!("plugbus_replays_let_go_total{{plugin=\"{plugin}\"}} {n}");
    assert!(
        metrics.lines().any(|l| l == line("echo", let_go)) && metrics.lines().any(|l| l == line("faulty", 0)),
        "{}",
        metrics.lines().filter(|l| l.contains("replays_let_go")).collect::<Vec<_>>().join("\n")
    );
}

/// The same when the event faulty failed was its own output (faulty publishes `faulty.reject`,
/// which it subscribes to, and which echo handles too). Its dead letter's original source is
/// faulty's own, which is also what the dead letter of an output the bus did not take looks
/// like: told by that, the replay went to every subscriber and echo ran it again. The dead
/// letter now says whose delivery failed (`plugbus-failed-in`).
async fn a_replayed_dead_letter_of_a_plugins_own_output_runs_again_only_in_it(bus: &Bus<'_>) {
    let t = TestHost::start_on(bus, &["faulty", "echo"], fast_retries).await;
    let mut seen = t.observe(&["echo.>", "plugbus.dlq.>"]).await;
    t.publish("faulty.selfreject", "mine").await;
    // echo handles both the input and faulty's output; faulty rejects its own output.
    t.wait_counter("echo", "ok", 2).await;
    t.wait_counter("faulty", "dead_lettered", 1).await;
    let dead = t.host.dead_letters().list(Some("faulty"));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].event.header(headers::ORIGINAL_SOURCE), Some("plugbus/faulty"));
    assert_eq!(dead[0].event.header(headers::FAILED_IN), Some("faulty"));
    seen.drain(Duration::from_millis(300)).await;
    replay_faultys_dead_letter_and_see_echo_let_it_go(bus, &t, &mut seen, 2).await;
}

/// On the embedded bus no other host can run a replay: a dead letter of a plugin that is no
/// longer loaded (removed, renamed) is not replayed (every plugin would let it go unrun, and it
/// would be forgotten as replayed): it is kept, and the answer says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_of_a_plugin_not_loaded_is_kept_not_replayed_into_nobody() {
    let t = TestHost::start_with(&["faulty", "echo"], fast_retries).await;
    t.publish("faulty.reject", "once").await;
    t.wait_counter("faulty", "dead_lettered", 1).await;
    assert!(t.host.router().remove("faulty"));
    let client = reqwest::Client::new();
    let replay = client.post(format!("{}/v1/dlq/replay?plugin=faulty", t.url())).send().await.unwrap();
    let report: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(report["replayed"].as_array().map(Vec::len), Some(0), "{report}");
    let why = report["refused"][0]["why"].as_str().unwrap_or_default();
    assert!(why.contains("not loaded"), "{report}");
    assert_eq!(t.host.dead_letters().list(Some("faulty")).len(), 1, "the dead letter is kept");
}

/// The same for a plugin still loaded that no longer subscribes to the dead letter's subject
/// (its subscriptions changed since it failed the event): its replay would reach only plugins
/// that let it go unrun (here echo, on `orders.*`), and it was reported replayed and forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_of_a_plugin_no_longer_subscribed_is_kept_not_replayed_into_nobody() {
    let t = TestHost::start_with(&["faulty", "echo"], fast_retries).await;
    let mut dead = plugbus::deadletter::dead_letter_event(
        &plugbus::Event::new("orders.created", "{}"),
        "faulty",
        "plugbus.dlq.faulty",
        "failed when faulty still subscribed to orders.*",
        1,
    );
    plugbus::deadletter::mark_failed_in(&mut dead, "faulty");
    t.host.dead_letters().push("faulty", dead);
    let client = reqwest::Client::new();
    let replay = client.post(format!("{}/v1/dlq/replay?plugin=faulty", t.url())).send().await.unwrap();
    let report: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(report["replayed"].as_array().map(Vec::len), Some(0), "{report}");
    let why = report["refused"][0]["why"].as_str().unwrap_or_default();
    assert!(why.contains("no longer subscribes") && why.contains("orders.created"), "{report}");
    assert_eq!(t.host.dead_letters().list(Some("faulty")).len(), 1, "the dead letter is kept");
    assert_eq!(t.counter("echo", "received"), 0, "nothing was published");
}

async fn fails_twice_then_succeeds_handled_once_outputs_once(bus: &Bus<'_>) {
    let policy = RetryPolicy {
        max_attempts: 5,
        initial: Duration::from_millis(100),
        factor: 2.0,
        max: Duration::from_secs(1),
        ..RetryPolicy::default()
    };
    let p = policy.clone();
    let t = TestHost::start_on(bus, &["faulty"], move |c| c.retry = p).await;
    let mut seen = t.observe(&["faulty.out.>", "plugbus.dlq.>"]).await;
    let started = Instant::now();
    t.publish("faulty.flaky", "3").await;
    let out = seen.next_on("faulty.out.flaky").await;
    let elapsed = started.elapsed();
    let body: serde_json::Value = serde_json::from_slice(&out.data).unwrap();
    assert_eq!(body["attempt"], 3, "the handler saw attempts 1..3 and succeeded on the 3rd");
    t.wait_counter("faulty", "ok", 1).await;
    assert_eq!(t.counter("faulty", "retried"), 2);
    assert_eq!(t.counter("faulty", "dead_lettered"), 0);
    // on JetStream each retry went back through the broker (nak with delay): 3 deliveries;
    // on the embedded bus and core NATS the retries waited in the host: 1
    let deliveries = if matches!(bus, Bus::JetStream(_)) { 3 } else { 1 };
    assert_eq!(t.counter("faulty", "received"), deliveries);
    // the two failed attempts' outputs ("lost attempt N") never escaped, the success's came once
    let rest = seen.drain(Duration::from_millis(300)).await;
    assert!(rest.is_empty(), "unexpected extra events: {rest:?}");
    // full jitter: each wait is in [0, ceiling]; two waits at most 100 ms + 200 ms
    let bound = policy.ceiling(1) + policy.ceiling(2) + Duration::from_secs(5);
    assert!(elapsed < bound, "retries took {elapsed:?}, over the backoff bound {bound:?}");
}

async fn reject_dead_letters_at_once_with_every_header(bus: &Bus<'_>) {
    let t = TestHost::start_on(bus, &["faulty"], fast_retries).await;
    let mut seen = t.observe(&["plugbus.dlq.>"]).await;
    let ev = plugbus::Event::new("faulty.reject", "payload").with_header("tenant", "acme");
    let id = ev.id.clone();
    t.host.publish(ev).await.unwrap();
    let dead = seen.next_on("plugbus.dlq.faulty").await;
    assert_eq!(dead.data, "payload");
    assert_eq!(dead.header("tenant"), Some("acme"));
    assert_eq!(dead.header(headers::PLUGIN), Some("faulty"));
    assert_eq!(dead.header(headers::ATTEMPTS), Some("1"));
    assert_eq!(dead.header(headers::ORIGINAL_SUBJECT), Some("faulty.reject"));
    assert_eq!(dead.header(headers::ORIGINAL_ID), Some(id.as_str()));
    assert!(dead.header(headers::ERROR).unwrap().contains("never"));
    assert!(dead.header(headers::FAILED_AT).unwrap().ends_with('Z'));
    assert_eq!(t.counter("faulty", "retried"), 0);
}

async fn exhausted_retries_dead_letter_with_the_last_error_and_replay_works(bus: &Bus<'_>) {
    let t = TestHost::start_on(bus, &["faulty"], fast_retries).await;
    let mut seen = t.observe(&["plugbus.dlq.>", "faulty.retry"]).await;
    t.publish("faulty.retry", "").await;
    seen.next_on("faulty.retry").await;
    let dead = seen.next_on("plugbus.dlq.faulty").await;
    assert_eq!(dead.header(headers::ATTEMPTS), Some("3"));
    assert!(dead.header(headers::ERROR).unwrap().contains("not now"));
    assert_eq!(t.counter("faulty", "retried"), 2);

    // the operator replays it over HTTP: back on its original subject, with an id of its own
    assert_eq!(t.host.dead_letters().list(Some("faulty")).len(), 1);
    let resp = t.replay_dead_letters("faulty").await;
    assert_eq!(resp["replayed"].as_array().unwrap().len(), 1, "{resp}");
    let again = seen.next_on("faulty.retry").await;
    assert_eq!(again.header(headers::REPLAY_OF), Some(dead.id.as_str()));

    // it left the store's file too: a restart does not bring it back
    let plugbus_tests::TestHost { host, data, dir: _dir } = t;
    host.shutdown().await;
    let file = plugbus::deadletter::DeadLetters::persistent(10, &data.path().join("dlq.redb")).unwrap();
    let back: Vec<String> = file.list(None).into_iter().map(|e| e.event.id).collect();
    assert!(!back.contains(&dead.id), "the replayed dead letter is kept after a restart: {back:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_plugin_does_not_delay_a_fast_one_on_the_same_subject() {
    let t = TestHost::start(&["faulty", "echo"]).await;
    let mut seen = t.observe(&["faulty.out.>", "echo.>"]).await;
    // 4 s: long enough for the fast ones on a loaded machine (1.5 s was a guess that load can beat)
    t.publish("faulty.slow", "4000").await;
    for _ in 0..20 {
        t.publish("faulty.ok", "").await;
    }
    // every echo of the 21 events (and faulty's own fast ones) lands before the slow one ends
    let mut order = Vec::new();
    while !order.iter().any(|s: &String| s == "faulty.out.slow") {
        order.push(seen.next_where(|_| true).await.subject.clone());
    }
    let echoes = order.iter().filter(|s| s.starts_with("echo.")).count();
    assert_eq!(echoes, 21, "the fast plugin waited for the slow one: {order:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_per_key_holds_across_retries_while_keys_run_in_parallel() {
    let t = TestHost::start_with(&["faulty"], |c| {
        c.retry = RetryPolicy {
            max_attempts: 5,
            initial: Duration::from_millis(2),
            factor: 2.0,
            max: Duration::from_millis(10),
            ..RetryPolicy::default()
        };
        c.flow = Flow { concurrency: 8, queue: 256, ..Flow::default() };
    })
    .await;
    let mut seen = t.observe(&["faulty.out.step"]).await;
    let mut rng = 0x2545F4914F6CDD1Du64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    const EVENTS: u64 = 1000;
    const KEYS: u64 = 50;
    for seq in 0..EVENTS {
        let key = format!("k{}", next() % KEYS);
        let delay = next() % 3;
        let fail_until = if next() % 10 == 0 { 1 + next() % 3 } else { 0 };
        let data = serde_json::json!({ "seq": seq, "delay": delay, "fail_until": fail_until }).to_string();
        t.host.publish(plugbus::Event::new("faulty.step", data).with_header("key", key)).await.unwrap();
    }
    let mut last: HashMap<String, u64> = HashMap::new();
    for _ in 0..EVENTS {
        let out = seen.next_on("faulty.out.step").await;
        let v: serde_json::Value = serde_json::from_slice(&out.data).unwrap();
        let (key, seq) = (v["key"].as_str().unwrap().to_string(), v["seq"].as_u64().unwrap());
        if let Some(prev) = last.insert(key.clone(), seq) {
            assert!(prev < seq, "key {key}: event {seq} handled after {prev}");
        }
    }
    assert!(t.counter("faulty", "retried") > 0, "no retry happened: the test lost its point");
    assert!(t.counter("faulty", "peak_in_flight") > 1, "keys never ran in parallel");
    assert_eq!(t.counter("faulty", "dead_lettered"), 0);
}

/// The attack: one key's event runs long or backs off (a poison event), with many events of
/// its key behind it. Those wait behind it, as they must; they used to wait holding the
/// plugin's admission (one slot each of `flow.queue`), so once they filled it, no other key's
/// event ran until the hot key's first was done. A lane now holds one slot of `flow.queue`,
/// whatever waits in it; up to `LANE_WAITING_PER_QUEUE` × `flow.queue` may wait in the lanes
/// apart: the other keys run meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_hot_key_holds_up_no_other_key() {
    const QUEUE: usize = 4;
    let t = TestHost::start_with(&["faulty"], |c| {
        c.flow = Flow { concurrency: 4, queue: QUEUE, ..Flow::default() };
    })
    .await;
    let mut seen = t.observe(&["faulty.out.step"]).await;
    let step = |seq: u64, delay: u64| serde_json::json!({ "seq": seq, "delay": delay }).to_string();
    // The hot key's first runs for 4 s (a backoff's wait is random: this is not; and long
    // enough for the others on a loaded machine); as many more of that key as the lanes may
    // hold wait behind it.
    let hot = 1 + plugbus::router::LANE_WAITING_PER_QUEUE * QUEUE;
    for seq in 0..hot as u64 {
        let event = plugbus::Event::new("faulty.step", step(seq, if seq == 0 { 4000 } else { 0 }));
        t.host.publish(event.with_header("key", "hot")).await.unwrap();
    }
    for seq in 100..110 {
        let event = plugbus::Event::new("faulty.step", step(seq, 0));
        t.host.publish(event.with_header("key", format!("cold{seq}"))).await.unwrap();
    }
    // More of the hot key than the lanes may hold: they wait in the transport, not in the host.
    for seq in hot as u64..hot as u64 + 10 {
        let event = plugbus::Event::new("faulty.step", step(seq, 0));
        t.host.publish(event.with_header("key", "hot")).await.unwrap();
    }
    let most = (QUEUE * (1 + plugbus::router::LANE_WAITING_PER_QUEUE)) as u64;
    let pending = t.counter("faulty", "pending");
    assert!(pending <= most, "{pending} deliveries held, {most} at most");
    let mut keys = Vec::new();
    for _ in 0..hot + 20 {
        let out = seen.next_on("faulty.out.step").await;
        let v: serde_json::Value = serde_json::from_slice(&out.data).unwrap();
        keys.push(v["key"].as_str().unwrap().to_string());
    }
    let first_hot = keys.iter().position(|k| k == "hot").unwrap();
    assert_eq!(first_hot, 10, "the other keys waited for the hot key's slow event: {keys:?}");
    assert_eq!(t.counter("faulty", "dead_lettered"), 0);
}

/// The attack on a lane that holds no slot for what waits in it: requests skip the bound on
/// bytes in hand (their requester may be one of those deliveries), so requests on a stalled
/// key, each given up by its requester at once, would pile up in its lane without bound. A
/// request waiting in a lane keeps its slot of `flow.queue`: they stay bounded in count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_given_up_behind_a_stalled_key_stay_bounded_by_the_queue() {
    const QUEUE: u64 = 4;
    let t = TestHost::start_with(&["faulty"], |c| {
        c.flow = Flow { concurrency: 4, queue: QUEUE as usize, ..Flow::default() };
    })
    .await;
    let slow = serde_json::json!({ "seq": 0, "delay": 3000 }).to_string();
    t.host.publish(plugbus::Event::new("faulty.step", slow).with_header("key", "hot")).await.unwrap();
    t.wait_counter("faulty", "in_flight", 1).await;
    let http = reqwest::Client::new();
    let url = format!("{}/v1/request/faulty.step?timeout=20ms", t.url());
    let step = serde_json::json!({ "seq": 1, "delay": 0 }).to_string();
    for _ in 0..40 {
        let answer = http.post(&url).header("ce-key", "hot").body(step.clone()).send().await.unwrap();
        assert!(!answer.status().is_success(), "a request behind a stalled key was answered");
    }
    let pending = t.counter("faulty", "pending");
    assert!(pending <= 2 * QUEUE, "{pending} deliveries held behind a stalled key with a queue of {QUEUE}");
}

/// The attack: a slow plugin (300 ms an event, one at a time, a queue of 2). Once its queue
/// was full, every producer waited for it, and so did every other plugin on the same subjects.
/// On the durable log it falls behind instead: the events it has no room for wait in the log
/// and reach it in order, while producers and the other plugin go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_plugin_falls_behind_and_holds_up_no_producer_or_other_plugin() {
    const EVENTS: u64 = 30;
    let t =
        TestHost::start_with(&["faulty", "echo"], |c| c.flow = Flow { concurrency: 1, queue: 2, ..Flow::default() })
            .await;
    let mut echoed = t.observe(&["echo.faulty.slow"]).await;
    let mut slow_outputs = t.observe(&["faulty.out.slow"]).await;
    for i in 0..EVENTS {
        let ev = plugbus::Event::new("faulty.slow", "300").with_header("n", i.to_string());
        t.host.publish(ev).await.unwrap();
    }
    for _ in 0..EVENTS {
        echoed.next_on("echo.faulty.slow").await;
    }
    let slow_done = t.counter("faulty", "ok");
    assert!(
        slow_done < EVENTS / 2,
        "the slow plugin had handled {slow_done} of {EVENTS} when the other had all: the test lost its point"
    );
    // a user sees it fall behind, and only it
    let text = plugbus_tests::metrics_text(&t.url()).await;
    let fell =
        |plugin: &str| plugbus_tests::sample(&text, &format!("plugbus_fell_behind_total{{plugin=\"{plugin}\"}}"));
    assert!(fell("faulty").is_some_and(|n| n >= 1.0), "{text}");
    assert_eq!(fell("echo").unwrap_or(0.0), 0.0, "{text}");
    // ... and how much waits for it beyond its queue (in the log, or read back behind the queue)
    let waiting = |text: &str, plugin: &str| {
        let events = plugbus_tests::sample(text, &format!("plugbus_waiting_events{{plugin=\"{plugin}\"}}"));
        let bytes = plugbus_tests::sample(text, &format!("plugbus_waiting_bytes{{plugin=\"{plugin}\"}}"));
        (events.unwrap_or_else(|| panic!("no waiting events for {plugin}: {text}")), bytes.unwrap())
    };
    let (events, bytes) = waiting(&text, "faulty");
    // (as many as its queue holds are charged nothing in the log, as they would be in the queue)
    assert!(events >= 10.0 && bytes >= (events - 2.0) * 512.0, "{events} events ({bytes} bytes) waiting: {text}");
    assert_eq!(waiting(&text, "echo"), (0.0, 0.0), "{text}");
    // and the slow plugin gets every one of them, none dead-lettered
    t.wait_counter("faulty", "ok", EVENTS).await;
    for _ in 0..EVENTS {
        slow_outputs.next_on("faulty.out.slow").await;
    }
    let text = plugbus_tests::metrics_text(&t.url()).await;
    assert_eq!(waiting(&text, "faulty"), (0.0, 0.0), "{text}");
    assert_eq!(t.counter("faulty", "received"), EVENTS);
    assert_eq!(t.counter("faulty", "dead_lettered"), 0);
}

/// With `flow.backlog_mib = 0`, a plugin's full queue holds its producers (backpressure at
/// once, as on the in-memory bus).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_applies_backpressure_and_loses_nothing() {
    const QUEUE: usize = 2;
    let t = TestHost::start_with(&["faulty"], |c| {
        c.flow = Flow { concurrency: 1, queue: QUEUE, backlog_mib: 0, ..Flow::default() }
    })
    .await;
    // slow events (1 s each, one at a time): a bounded queue fills within a few publishes and
    // the next publish waits; an unbounded one would take them all at once. (A publish taking
    // over 500 ms is paused: one a loaded machine merely slowed could take more than 150 ms.)
    let mut quick = 0;
    loop {
        let publish = t.publish("faulty.slow", "1000");
        tokio::pin!(publish);
        if tokio::time::timeout(Duration::from_millis(500), &mut publish).await.is_ok() {
            quick += 1;
            // room for: QUEUE admitted by the plugin, QUEUE in its transport queue, one in hand
            assert!(quick <= 2 * QUEUE + 1, "{quick} slow events taken at once by a queue of {QUEUE}: no backpressure");
            continue;
        }
        // the producer is paused ... until the plugin settles an event and makes room
        let waited = Instant::now();
        tokio::time::timeout(Duration::from_secs(10), publish).await.expect("the paused publish completes");
        assert!(t.counter("faulty", "ok") >= 1, "the publish went through before any event was settled");
        assert!(
            waited.elapsed() < Duration::from_secs(5),
            "paused for {:?}, far longer than one event",
            waited.elapsed()
        );
        break;
    }
    assert!(quick >= QUEUE, "only {quick} publishes went through before the pause");
    let slow = quick as u64 + 1;

    // a long burst through the same small queue: every event arrives, none is lost
    const N: u64 = 10_000;
    for _ in 0..N {
        t.publish("faulty.ok", "").await;
    }
    t.wait_counter("faulty", "ok", N + slow).await;
    assert_eq!(t.counter("faulty", "received"), N + slow);
    assert_eq!(t.counter("faulty", "dead_lettered"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_finishes_what_was_accepted_and_reports_the_rest() {
    // generous timeout: everything accepted is handled
    let t =
        TestHost::start_with(&["faulty"], |c| c.flow = Flow { concurrency: 2, queue: 1024, ..Flow::default() }).await;
    for _ in 0..200 {
        t.publish("faulty.slow", "2").await;
    }
    let report = t.host.shutdown().await;
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.handled["faulty"], 200, "the drain returned before every accepted event was handled");

    // tiny timeout: what is left is reported, and handled + reported = accepted
    let t = TestHost::start_with(&["faulty"], |c| {
        c.flow = Flow { concurrency: 1, queue: 1024, ..Flow::default() };
        c.drain_timeout = Duration::from_millis(50);
    })
    .await;
    for _ in 0..200 {
        t.publish("faulty.slow", "5").await;
    }
    let report = t.host.shutdown().await;
    let handled = report.handled["faulty"];
    let unfinished = report.unfinished["faulty"].len() as u64;
    let queued = report.queued["faulty"] as u64;
    assert!(!report.is_clean());
    assert!(handled + unfinished + queued >= 200, "{handled} + {unfinished} + {queued} < 200: events vanished");
}

/// The durable log takes a producer's event sent twice under one source and id as two events
/// (a re-send with the data mended, say), and both run; but their outputs' ids were made of
/// the input's source and id alone, so the log dropped the second run's outputs as a duplicate
/// of the first's: lost for a plugin catching up, never durable for a live one (review 61b). An
/// output's id on the log now takes in its input's subject and data; the same event sent again
/// as it was (a producer's retry after a `503`) keeps its outputs' ids, so downstream drops the
/// copy by id (review 61e F3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outputs_of_two_events_under_one_source_and_id_are_both_logged() {
    let t = TestHost::start(&["echo"]).await;
    let mut outputs = t.observe(&["echo.>"]).await;
    let client = reqwest::Client::new();
    for data in ["one", "two-mended"] {
        let resp = client
            .post(format!("{}/v1/events/orders.created", t.url()))
            .header("ce-specversion", "1.0")
            .header("ce-id", "order-42")
            .header("ce-source", "/shop")
            .header("ce-type", "order.created")
            .body(data)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 202);
    }
    let first = outputs.next_on("echo.orders.created").await;
    let second = outputs.next_on("echo.orders.created").await;
    assert_ne!(first.id, second.id, "two events, two outputs");
    t.wait_counter("echo", "ok", 2).await;
    let resent = client
        .post(format!("{}/v1/events/orders.created", t.url()))
        .header("ce-specversion", "1.0")
        .header("ce-id", "order-42")
        .header("ce-source", "/shop")
        .header("ce-type", "order.created")
        .body("two-mended")
        .send()
        .await
        .unwrap();
    assert_eq!(resent.status().as_u16(), 202);
    let third = outputs.next_on("echo.orders.created").await;
    // (The two first ran side by side: their outputs come in either order. Echo's output
    // carries its input's data.)
    let mended = [&first, &second].into_iter().find(|o| o.data == "two-mended").expect("the mended one's output");
    assert_eq!(third.data, "two-mended");
    assert_eq!(third.id, mended.id, "the same event sent again: its output keeps its id");
    t.wait_counter("echo", "ok", 3).await;
    // The three inputs and the two outputs are in the log (the third's output is the second's).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = plugbus_tests::metrics_text(&t.url()).await;
        let appended = text.lines().find_map(|l| l.strip_prefix("plugbus_log_appended_total ")).map(str::to_string);
        if appended.as_deref() == Some("5") {
            break;
        }
        assert!(Instant::now() < deadline, "appended {appended:?}, not 5: the second output was dropped\n{text}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
