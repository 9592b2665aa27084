//! The fault matrix: every way a handler can misbehave fails that one event, with a dead letter
//! naming the plugin, the event and the cause; the host stays up, other plugins keep serving,
//! and the next event to the same plugin succeeds.

use plugbus::deadletter::headers;
use plugbus::{Config, Event};
use plugbus_tests::{Logs, TestHost, fast_retries, output_within, plugbus_bin, wasm};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn host() -> TestHost {
    TestHost::start_with(&["faulty", "echo"], |c| {
        fast_retries(c);
        let faulty = c.plugins.entry("faulty".into()).or_default();
        faulty.limits.insert("deadline".into(), "300ms".into());
        faulty.limits.insert("memory_mib".into(), 32.into());
        faulty.limits.insert("max_kv_value_bytes".into(), 65536.into());
        faulty.limits.insert("max_event_bytes".into(), 4096.into());
    })
    .await
}

/// Publishes `faulty.<fault>`, waits for its dead letter and returns it.
async fn dead_letter_of(t: &TestHost, fault: &str, data: Vec<u8>) -> Arc<Event> {
    let mut seen = t.observe(&["plugbus.dlq.faulty"]).await;
    let id = t.publish(&format!("faulty.{fault}"), data).await;
    let dead = seen.next_where(|e| e.header(headers::ORIGINAL_ID) == Some(id.as_str())).await;
    assert_eq!(dead.header(headers::PLUGIN), Some("faulty"));
    dead
}

fn error_of(dead: &Event) -> String {
    dead.header(headers::ERROR).unwrap().to_string()
}

async fn still_serving(t: &TestHost, after: &str) {
    let mut seen = t.observe(&["faulty.out.ok", "echo.faulty.ok"]).await;
    let id = t.publish("faulty.ok", "").await;
    let ours = |e: &plugbus::Event| e.header("plugbus-caused-by") == Some(id.as_str());
    let a = seen.next_where(ours).await.subject.clone();
    let b = seen.next_where(ours).await.subject.clone();
    let mut got = [a, b];
    got.sort();
    assert_eq!(got, ["echo.faulty.ok".to_string(), "faulty.out.ok".to_string()], "after {after}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_fails_only_its_event_with_the_cause_named() {
    let t = host().await;
    // what the flood and the oversized output published before their limit: none may escape
    let mut escaped = t.observe(&["faulty.out.flood", "faulty.out.big", "faulty.out.sys", "faulty.out.unlisted"]).await;
    let cases: &[(&str, &str)] = &[
        ("trap", "unreachable"),
        ("panic", "handler panicked: the handler gave up"),
        ("loop", "deadline of 300ms exceeded"),
        ("sleep", "deadline of 300ms exceeded"),
        ("recurse", "stack overflow"),
        ("grow", "memory limit 32 MiB reached"),
        ("flood", "publish limit of 100 per event reached"),
        ("sys", "\"$SYS.x\" is a system subject"),
        ("unlisted", "not in the manifest's publishes"),
        ("big", "output limit of 1048576 bytes per event reached"),
        ("kvbig", "over the 65536-byte cap"),
        ("kvkey", "5000 bytes over the 512-byte cap on keys"),
    ];
    for (fault, cause) in cases {
        let dead = dead_letter_of(&t, fault, Vec::new()).await;
        let error = error_of(&dead);
        assert!(error.contains(cause), "{fault}: dead letter says {error:?}, expected it to name {cause:?}");
        if ["flood", "sys", "unlisted", "big", "kvbig", "kvkey"].contains(fault) {
            // the refused call returned the error to the handler, which gave up with it (faulty
            // passes it on with `?`); a host that failed the event behind the handler's back
            // would report `publish refused: …` after a handler that returned Ok
            assert!(error.starts_with("handler rejected the event: "), "{fault}: the handler did not see it: {error}");
            assert_eq!(dead.header(headers::ATTEMPTS), Some("1"), "{fault}: a rejection is not retried");
        }
        still_serving(&t, fault).await;
    }
    // every event above was settled before its neighbour's outputs came: anything the flood or
    // the oversized output had let out would be here by now
    let escapes = escaped.drain(Duration::from_millis(200)).await;
    assert!(
        escapes.is_empty(),
        "outputs of failed events escaped: {:?}",
        escapes.iter().map(|e| &e.subject).collect::<Vec<_>>()
    );

    // an event over max_event_bytes is dead-lettered unread: no attempt ran
    let attempts = t.counter("faulty", "attempts");
    let retried = t.counter("faulty", "retried");
    let dead = dead_letter_of(&t, "ok", vec![b'x'; 4097]).await;
    let error = error_of(&dead);
    assert!(error.contains("event of 4097 bytes is over the 4096-byte limit"), "{error}");
    assert_eq!(dead.header(headers::ATTEMPTS), Some("0"), "the oversized event was handed to the plugin");
    assert_eq!(dead.data.len(), 4097, "the dead letter keeps the event's data");
    assert_eq!(t.counter("faulty", "attempts"), attempts, "the plugin ran on an oversized event");
    assert_eq!(t.counter("faulty", "retried"), retried);
    still_serving(&t, "oversized event").await;
}

/// A deadline past the clock's range (`Instant` cannot add it) is a deadline never reached, not
/// a host panic on every attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deadline_past_the_clocks_range_never_passes() {
    let t = TestHost::start_with(&["faulty", "echo"], |c| {
        c.plugins.entry("faulty".into()).or_default().limits.insert("deadline".into(), "500000000000y".into());
    })
    .await;
    still_serving(&t, "a deadline of 500,000,000,000 years").await;
    assert_eq!(t.counter("faulty", "dead_lettered"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chatty_plugin_is_cut_off_in_the_log_not_failed() {
    const CAP: usize = 4096;
    let logs = Logs::capture();
    let t = TestHost::start_with(&["faulty"], |c| {
        c.plugins.entry("faulty".into()).or_default().limits.insert("max_log_bytes".into(), CAP.into());
    })
    .await;
    let mut seen = t.observe(&["faulty.out.chatty"]).await;
    let id = t.publish("faulty.chatty", "").await;
    seen.next_on("faulty.out.chatty").await;
    t.wait_counter("faulty", "ok", 1).await;
    assert_eq!(t.counter("faulty", "dead_lettered"), 0);

    // what the plugin printed: 100,000 lines (see tests/components/faulty)
    let printed: usize = (0..100_000).map(|i| format!("line {i} of a very chatty plugin\n").len()).sum();
    // the lines kept went to the log, tagged with the plugin and the event, up to the cap ...
    let kept = logs.with_fields(&[("plugin", "faulty"), ("event_id", id.as_str()), ("stream", "stdout")]);
    let lines: Vec<&str> =
        kept.iter().filter(|l| l["target"] == "plugin").filter_map(|l| l["fields"]["message"].as_str()).collect();
    assert_eq!(lines.first().copied(), Some("line 0 of a very chatty plugin"), "{kept:?}");
    // (the last line kept may be cut short, without its newline)
    let kept_bytes = lines.join("\n").len();
    assert!(kept_bytes <= CAP, "{kept_bytes} bytes of plugin output logged, over the {CAP}-byte cap");
    // ... and the cut is logged once, as a warning saying how much was cut
    let cut: Vec<_> = kept.iter().filter(|l| l["fields"]["dropped"].is_u64()).collect();
    assert_eq!(cut.len(), 1, "the cut is not logged once: {kept:?}");
    assert_eq!(cut[0]["level"], "WARN", "{}", cut[0]);
    assert!(cut[0]["fields"]["message"].as_str().unwrap().contains("cut"), "{}", cut[0]);
    let dropped = cut[0]["fields"]["dropped"].as_u64().unwrap() as usize;
    assert!(dropped >= printed - CAP, "{dropped} bytes said cut, but {printed} printed and at most {CAP} kept");
}

/// The attack: a million empty log lines, each a host log line, charged nothing when only a
/// line's bytes counted against `max_log_bytes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_log_lines_are_charged_against_the_log_cap() {
    const CAP: u64 = 4096;
    let logs = Logs::capture();
    let t = TestHost::start_with(&["hostile"], |c| {
        c.plugins.entry("hostile".into()).or_default().limits.insert("max_log_bytes".into(), CAP.into());
    })
    .await;
    let id = t.publish("hostile.emptylogs", "1000000").await;
    t.wait_counter("hostile", "ok", 1).await;
    let lines = logs.with_fields(&[("plugin", "hostile"), ("event_id", id.as_str())]);
    let plugin_lines = lines.iter().filter(|l| l["target"] == "plugin").count() as u64;
    let most = CAP / plugbus::kv::ENTRY_COST;
    assert!(plugin_lines > 0 && plugin_lines <= most, "{plugin_lines} empty lines logged for one event, over {most}");
}

/// The attack: a handler looping on refused host calls (publish, request, reply), swallowing
/// each error, until its work is done. Each refusal was a host warning of up to 4 KiB, outside
/// `max_log_bytes`: millions of host log lines per event. Now an attempt logs the first few.
/// (The event is dead-lettered after its attempts: a swallowed refused publish fails it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_host_calls_are_logged_a_few_times_per_attempt_not_once_each() {
    let logs = Logs::capture();
    let t = TestHost::start(&["hostile"]).await;
    let id = t.publish("hostile.refusals", "3000").await;
    // (a swallowed refused publish still fails the event: its outputs are incomplete)
    t.wait_counter("hostile", "dead_lettered", 1).await;
    let refused = lines_starting(&logs, "hostile", &id, &["publish refused", "request refused", "reply refused"]);
    // the first few in full, then one line saying the rest are not logged
    let most = plugbus::sandbox::state::MAX_LOGGED_REFUSALS + 1;
    assert!(refused > 0 && refused <= most, "{refused} refusal lines for one attempt of 9,000 refused calls");
}

/// The attack: a log line or a reject message with a line break, whose second line poses as the
/// host's in a plain-text log. Both come out on one line, the break written `\n`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugins_line_breaks_never_start_a_log_line_of_their_own() {
    let logs = Logs::capture();
    let t = TestHost::start(&["hostile"]).await;
    let mut dead = t.observe(&["plugbus.dlq.hostile"]).await;
    let forged = "ok\\n2026-12-03T00:00:00Z ERROR plugbus: event dead-lettered plugin=payments";
    let id = t.publish("hostile.forgelog", forged).await;
    let letter = dead.next_on("plugbus.dlq.hostile").await;
    let error = letter.header(plugbus::deadletter::headers::ERROR).unwrap_or_default().to_string();
    assert!(error.contains("ok\\n2026-12-03T00:00:00Z ERROR"), "{error}");
    let lines = logs.with_fields(&[("plugin", "hostile"), ("event_id", id.as_str())]);
    let messages: Vec<&str> = lines.iter().filter_map(|l| l["fields"]["message"].as_str()).collect();
    assert!(messages.iter().any(|m| m.starts_with("ok\\n2026")), "{messages:?}");
    assert!(messages.iter().any(|m| m.starts_with("ok\\r2026")), "stdout's line: {messages:?}");
    assert!(messages.iter().any(|m| m.starts_with("ok\\u{2028}2026")), "stdout's line: {messages:?}");
    let breaks = ['\n', '\r', '\u{2028}'];
    assert!(messages.iter().all(|m| !m.contains(breaks)), "a line break reached the log: {messages:?}");
}

/// The same attack through outbound HTTP: a handler calling a destination it was not granted,
/// over and over. Each refusal was a warning of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_outbound_calls_are_logged_a_few_times_per_attempt() {
    let logs = Logs::capture();
    let t = TestHost::start(&["caller"]).await;
    let id = t.publish("caller.go", r#"{"url": "http://127.0.0.1:9/never", "calls": 90}"#).await;
    t.wait_counter("caller", "ok", 1).await;
    let refused = lines_starting(&logs, "caller", &id, &["outbound request refused"]);
    let most = plugbus::sandbox::state::MAX_LOGGED_REFUSALS + 1;
    assert!(refused > 0 && refused <= most, "{refused} refusal lines for one attempt of 90 refused calls");
}

/// How many of `plugin`'s log lines for the event `id` start with one of `starts`.
fn lines_starting(logs: &Logs, plugin: &str, id: &str, starts: &[&str]) -> u32 {
    logs.with_fields(&[("plugin", plugin), ("event_id", id)])
        .into_iter()
        .filter(|l| l["fields"]["message"].as_str().is_some_and(|m| starts.iter().any(|s| m.starts_with(s))))
        .count() as u32
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_smaller_than_the_plugins_concurrency_is_named_at_start_and_on_reload() {
    let logs = Logs::capture();
    let warned = |logs: &Logs, slots: &str| {
        logs.lines().into_iter().any(|l| {
            l["level"] == "WARN"
                && l["fields"]["max_instances"].as_u64().map(|m| m.to_string()).as_deref() == Some(slots)
                && l["fields"]["message"].as_str().is_some_and(|m| m.contains("sandbox.max_instances"))
        })
    };
    // two plugins of 16 each: 32 attempts at once, 20 slots
    let t = TestHost::start_with(&["faulty", "dice"], |c| c.sandbox.max_instances = 20).await;
    assert!(warned(&logs, "20"), "no warning for 32 attempts over 20 slots");
    drop(t);
    // 32 slots are enough ...
    let t = TestHost::start_with(&["faulty", "dice"], |c| c.sandbox.max_instances = 32).await;
    assert!(!warned(&logs, "32"), "a warning though the pool is large enough");
    // ... until a third plugin is added while the host runs
    std::fs::copy(wasm("echo"), t.dir.path().join("echo.wasm")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !warned(&logs, "32") {
        assert!(Instant::now() < deadline, "no warning when a plugin added took the plugins past the pool");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(t);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_plugin_does_not_starve_the_others() {
    // both runtime workers busy with looping instances would stall everything without the
    // epoch yield; the fast neighbour must still answer while they loop
    let t = TestHost::start_with(&["faulty", "echo"], |c| {
        let faulty = c.plugins.entry("faulty".into()).or_default();
        faulty.limits.insert("deadline".into(), "3s".into());
        faulty.retry.insert("max_attempts".into(), 1.into());
    })
    .await;
    let mut seen = t.observe(&["echo.orders.created", "plugbus.dlq.faulty"]).await;
    for _ in 0..4 {
        t.publish("faulty.loop", "").await;
    }
    // all four loop in the sandbox at once: more than the runtime's two workers
    t.wait_counter("faulty", "in_flight", 4).await;
    t.publish("orders.created", "{}").await;
    let first = seen.next_where(|_| true).await;
    assert_eq!(first.subject, "echo.orders.created", "the fast plugin waited for the looping ones");
    assert_eq!(t.counter("faulty", "in_flight"), 4, "the loops had stopped before the neighbour answered");
    assert_eq!(t.counter("faulty", "dead_lettered"), 0);
    // and the loops do end, at their deadline
    for _ in 0..4 {
        let dead = seen.next_on("plugbus.dlq.faulty").await;
        let error = dead.header(headers::ERROR).unwrap();
        assert!(error.contains("deadline of 3s exceeded"), "{error}");
    }
}

/// Held by the tests with spinning plugins: two at once would share the CPUs, and each stretch
/// the other's victim.
static SPINNING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A host with `faulty` spinning in `spinners` attempts (6 s deadline) beside `hostile`
/// (deadline `victim_deadline`), and how many million rounds of `hostile.work` take about
/// `work_ms` alone (measured through the bus, the fastest of three).
async fn spinners_beside_a_victim(
    spinners: u64,
    victim_deadline: &str,
    work_ms: f64,
) -> (tokio::sync::MutexGuard<'static, ()>, TestHost, plugbus_tests::Observer, u64) {
    let alone_here = SPINNING.lock().await;
    let t = TestHost::start_with(&["faulty", "hostile"], |c| {
        let faulty = c.plugins.entry("faulty".into()).or_default();
        faulty.limits.insert("deadline".into(), "6s".into());
        faulty.retry.insert("max_attempts".into(), 1.into());
        faulty.flow.insert("concurrency".into(), spinners.into());
        let hostile = c.plugins.entry("hostile".into()).or_default();
        hostile.limits.insert("deadline".into(), victim_deadline.into());
        hostile.retry.insert("max_attempts".into(), 1.into());
    })
    .await;
    let mut seen = t.observe(&["hostile.out.work", "plugbus.dlq.>"]).await;
    let mut alone = Duration::MAX;
    for _ in 0..3 {
        let at = Instant::now();
        t.publish("hostile.work", "20").await;
        assert_eq!(seen.next_where(|_| true).await.subject, "hostile.out.work");
        alone = alone.min(at.elapsed());
    }
    let rounds = (20.0 * work_ms / 1000.0 / alone.as_secs_f64()).round().max(1.0) as u64;
    for _ in 0..spinners {
        t.publish("faulty.loop", "").await;
    }
    t.wait_counter("faulty", "in_flight", spinners).await;
    (alone_here, t, seen, rounds)
}

/// Review 57a H1: a plugin spinning in many attempts at once stretched another plugin's handler
/// past its deadline (wall time: the runtime shares the CPUs round robin by attempt), and that
/// plugin's events were retried and dead-lettered as its handler's fault. The wait behind other
/// plugins' attempts is not counted against a deadline; a plugin's own attempts still are (the
/// spinners end at their own deadline, as their handler's).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_spinning_in_many_attempts_fails_no_other_plugins_events() {
    // About 17 times longer behind 32 spinners: past 1 s, within the wall-clock bound of 4 s.
    let (_alone, t, mut seen, rounds) = spinners_beside_a_victim(32, "1s", 100.0).await;
    let at = Instant::now();
    t.publish("hostile.work", rounds.to_string()).await;
    let first = seen.next_where(|_| true).await;
    assert_eq!(
        first.subject,
        "hostile.out.work",
        "{rounds} million rounds (about 100 ms alone) failed behind the spinners after {:?}: {:?}",
        at.elapsed(),
        first.header(headers::ERROR)
    );
    assert_eq!(t.counter("hostile", "dead_lettered"), 0);
    let dead = seen.next_on("plugbus.dlq.faulty").await;
    let error = dead.header(headers::ERROR).unwrap();
    assert!(error.contains("deadline of 6s exceeded") && !error.contains("host error"), "{error}");
}

/// Review 61a F2: an attempt that waits in host calls (naps, kv reads, HTTP, requests) gives
/// its turn back at each; once its answer was ready, the runtime noticed it only when a worker
/// read its timers and sockets (every 4 tasks, `runtime::EVENT_INTERVAL`: 40 ms of another
/// plugin's 10 ms slices), and then it waited for a turn; none of it was credited, so a handler
/// making hundreds of short host calls missed its deadline as its own failure (300 naps of 1 ms:
/// 13 ms each behind 16 spinners). Now the epoch ticks every millisecond while attempts run
/// (slices of 2 to 3 ms), and a timer's wait past its due time is credited (`sandbox/naps.rs`).
#[test]
fn a_plugin_spinning_fails_no_other_plugins_events_that_wait_in_host_calls() {
    // on the runtime `plugbus` runs on (it looks at its timers and sockets more often than
    // tokio's default, which a test's runtime has)
    plugbus::runtime::build().unwrap().block_on(naps_behind_spinners())
}

async fn naps_behind_spinners() {
    let (_alone, t, _seen, _) = spinners_beside_a_victim(16, "1s", 100.0).await;
    let mut seen = t.observe(&["hostile.out.naps", "plugbus.dlq.hostile"]).await;
    for _ in 0..3 {
        let at = Instant::now();
        // 300 naps of 1 ms: about a third of a second alone.
        t.publish("hostile.naps", "300").await;
        let got = seen.next_where(|_| true).await;
        assert_eq!(
            got.subject,
            "hostile.out.naps",
            "300 naps failed behind the spinners after {:?}: {:?}",
            at.elapsed(),
            got.header(headers::ERROR)
        );
    }
    assert_eq!(t.counter("hostile", "dead_lettered"), 0);
}

/// Review 57a M1: the CPUs were shared round robin by attempt, so a plugin spinning in 16
/// attempts took 16 times the CPU of a plugin running one, and every other task waited behind
/// them. Each plugin that wants more than a slice now holds a share of the runtime's workers
/// (`cpu_share`): the spinner's attempts past their first slice wait in line for its turns,
/// and the other plugin's attempt never waits for one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_spinning_in_many_attempts_holds_only_its_share_of_the_cpus() {
    let (_alone, t, mut seen, rounds) = spinners_beside_a_victim(16, "1s", 100.0).await;
    t.publish("hostile.work", rounds.to_string()).await;
    assert_eq!(seen.next_where(|_| true).await.subject, "hostile.out.work");
    let text = plugbus_tests::metrics_text(&t.url()).await;
    let waits = |plugin: &str| {
        plugbus_tests::sample(&text, &format!("plugbus_cpu_turn_waits_total{{plugin=\"{plugin}\"}}")).unwrap_or(0.0)
    };
    // 16 spinning on 2 workers: at most 2 hold a turn at once, the others wait for one
    assert!(waits("faulty") >= 14.0, "the spinner's attempts waited {} times for a turn", waits("faulty"));
    assert_eq!(waits("hostile"), 0.0, "the other plugin's attempt waited for a turn");
}

/// However long other plugins keep it waiting, an attempt ends at 4 times its deadline of wall
/// time; having run less than its deadline, it failed for the host, and says so. One plugin's
/// attempts no longer keep another's that long (each holds its share of the CPUs): here 80
/// plugins spin at once, beside a victim that gets about a fortieth of the CPUs (a turn in
/// 81), so its 100 ms of work would take about 2 s. (With 40, a turn in 41 made 80 ms of work
/// about 820 ms: at the bound, and CI once saw it finish at 940 ms.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_starved_past_four_times_its_deadline_fails_as_the_hosts() {
    use plugbus::sandbox::{Failure, Limits, PluginSettings, Sandbox, SandboxSettings};
    let _alone = SPINNING.lock().await;
    let sandbox = Sandbox::new(SandboxSettings::default()).unwrap();
    let load = async |component: &str, deadline: Duration| {
        let bytes = std::fs::read(wasm(component)).unwrap();
        let settings = move |_: &_| PluginSettings {
            limits: Limits { deadline, ..Limits::default() },
            config: Default::default(),
            kv: Arc::new(plugbus::kv::MemoryKv::new()),
            allowed_outbound: Vec::new(),
        };
        sandbox.load(&bytes, settings).await.unwrap()
    };
    let victim = Arc::new(load("hostile", Duration::from_millis(200)).await);
    // on the runtime's workers, as the host runs attempts (not on the test's own thread)
    let work = |rounds: u64| {
        let victim = victim.clone();
        async move {
            let at = Instant::now();
            let run =
                tokio::spawn(async move { victim.handle(&Event::new("hostile.work", rounds.to_string()), 1).await });
            (run.await.unwrap().result, at.elapsed())
        }
    };
    let spinner = load("faulty", Duration::from_secs(6)).await;
    // how many million rounds take about 100 ms alone (the fastest of three)
    let mut alone = Duration::MAX;
    for _ in 0..3 {
        let (result, took) = work(20).await;
        assert!(result.is_ok(), "{result:?}");
        alone = alone.min(took);
    }
    let rounds = (20.0 * 0.1 / alone.as_secs_f64()).round().max(1.0) as u64;
    // 80 plugins (the spinner's version rebound: a share each), each spinning in one attempt
    let spinning: Vec<_> = (0..80)
        .map(|_| {
            let plugin = spinner.rebound(Default::default(), Arc::new(plugbus::kv::MemoryKv::new()));
            tokio::spawn(async move { plugin.handle(&Event::new("faulty.loop", ""), 1).await })
        })
        .collect();
    let waiting_since = Instant::now();
    while sandbox.cpu_shares().wanting() < 80 {
        assert!(waiting_since.elapsed() < Duration::from_secs(30), "{} spinning", sandbox.cpu_shares().wanting());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (result, took) = work(rounds).await;
    match &result {
        Err(Failure::Host(error)) => assert!(
            error.starts_with("the host kept the handler waiting for a CPU behind other plugins' attempts")
                && error.contains("of its deadline of 200ms in"),
            "{error}"
        ),
        other => panic!("{rounds} million rounds beside 80 spinning plugins, after {took:?}: {other:?}"),
    }
    assert!(took >= Duration::from_millis(800), "ended after {took:?}");
    for spinner in spinning {
        spinner.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_the_machine_cannot_hold_stops_the_host_at_start_with_a_clear_error() {
    let plugins = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    std::fs::copy(wasm("audit"), plugins.path().join("audit.wasm")).unwrap();
    let needle = "cannot set up the sandbox pool for 100000000 instances";

    // the library: Host::start refuses
    let mut config = Config {
        plugins_dir: plugins.path().to_path_buf(),
        data_dir: data.path().to_path_buf(),
        http: None,
        ..Config::default()
    };
    config.sandbox.max_instances = 100_000_000;
    let err =
        format!("{:#}", plugbus::Host::start(config).await.err().expect("a 100M-instance pool cannot be reserved"));
    assert!(err.contains(needle), "{err}");

    // the binary: `plugbus run --max-instances` exits non-zero, saying so
    let out = output_within(
        Command::new(plugbus_bin())
            .args(["run", "--http", "127.0.0.1:0", "--max-instances", "100000000", "--plugins"])
            .arg(plugins.path())
            .arg("--data-dir")
            .arg(data.path()),
        Duration::from_secs(60),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the host started with an impossible pool: {stderr}");
    assert!(stderr.contains(needle), "{stderr}");
}

#[test]
fn inspect_gives_a_verdict_and_an_exit_code() {
    let bin = plugbus_tests::plugbus_bin();
    let run = |cmd: &mut Command| output_within(cmd, Duration::from_secs(60));
    let ok = run(Command::new(&bin).arg("inspect").arg(wasm("inventory")));
    assert!(ok.status.success());
    let text = String::from_utf8(ok.stdout).unwrap();
    assert!(text.contains("plugin     inventory") && text.contains("verdict    loadable"), "{text}");
    assert!(text.contains("subscribes orders.created") && text.contains("memory 64 MiB"), "{text}");

    let bad = run(Command::new(&bin).args(["inspect", "--json"]).arg(wasm("sneaky")));
    assert_eq!(bad.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&bad.stdout).unwrap();
    assert_eq!(v["loadable"], false);
    let problems = v["problems"].to_string();
    assert!(problems.contains("wasi:sockets/tcp@") && problems.contains("wasi:filesystem/preopens@"), "{problems}");

    let dir = tempfile::tempdir().unwrap();
    let core = dir.path().join("core.wasm");
    std::fs::write(&core, b"\0asm\x01\0\0\0").unwrap();
    let out = run(Command::new(&bin).arg("inspect").arg(&core));
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("core WebAssembly module"));
}

/// What `faulty.global` reports: how many events its instance has handled.
async fn instance_events(t: &TestHost, seen: &mut plugbus_tests::Observer) -> u64 {
    t.publish("faulty.global", "").await;
    let out = seen.next_on("faulty.out.global").await;
    serde_json::from_slice::<serde_json::Value>(&out.data).unwrap()["instance_events"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_instances_share_nothing_between_events() {
    let t = TestHost::start(&["faulty"]).await;
    let mut seen = t.observe(&["faulty.out.>"]).await;
    for _ in 0..3 {
        assert_eq!(instance_events(&t, &mut seen).await, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_reuse_keeps_warm_instances_and_recycles_them_after_a_trap_or_n_events() {
    let t = TestHost::start_with(&["faulty"], |c| {
        plugbus_tests::fast_retries(c);
        c.flow.concurrency = 1;
        let p = c.plugins.entry("faulty".into()).or_default();
        p.instance = Some(plugbus::sandbox::InstanceMode::Reuse);
        p.limits.insert("recycle_after".into(), 4.into());
        p.limits.insert("deadline".into(), "300ms".into());
    })
    .await;
    let mut seen = t.observe(&["faulty.out.>"]).await;
    // one warm instance serves event after event
    for expected in 1..=3 {
        assert_eq!(instance_events(&t, &mut seen).await, expected);
    }
    // a trap throws the instance away: the next event gets a new one
    let mut dlq = t.observe(&["plugbus.dlq.faulty"]).await;
    t.publish("faulty.trap", "").await;
    dlq.next_on("plugbus.dlq.faulty").await;
    assert_eq!(instance_events(&t, &mut seen).await, 1);
    // so does a deadline passed asleep in a host call: the call is dropped with its instance
    t.publish("faulty.sleep", "").await;
    dlq.next_on("plugbus.dlq.faulty").await;
    assert_eq!(instance_events(&t, &mut seen).await, 1);
    // and after `recycle_after` (4) events an instance is replaced
    for expected in 2..=4 {
        assert_eq!(instance_events(&t, &mut seen).await, expected);
    }
    assert_eq!(instance_events(&t, &mut seen).await, 1);
}

/// A plugin added while idle warm instances (`instance = "reuse"`) hold every slot of the pool
/// all plugins share is loaded: reading its manifest takes an idle instance's slot, as an
/// attempt does, instead of failing as an invalid component.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_added_while_idle_warm_instances_fill_the_pool_is_loaded() {
    let t = TestHost::start_with(&["faulty"], |c| {
        c.sandbox.max_instances = 1;
        c.flow.concurrency = 1;
        let p = c.plugins.entry("faulty".into()).or_default();
        p.instance = Some(plugbus::sandbox::InstanceMode::Reuse);
    })
    .await;
    // one event: its warm instance stays, idle, in the pool's only slot
    let mut seen = t.observe(&["faulty.out.>"]).await;
    assert_eq!(instance_events(&t, &mut seen).await, 1);
    std::fs::copy(wasm("echo"), t.dir.path().join("echo.wasm")).unwrap();
    let host = &t.host;
    let settled = || host.router().contains("echo") || !host.rejected().is_empty();
    plugbus_tests::eventually("echo is loaded or refused", settled).await;
    assert!(host.rejected().is_empty(), "{:?}", host.rejected());
    // and faulty takes a new instance for its next event
    assert_eq!(instance_events(&t, &mut seen).await, 1);
}
