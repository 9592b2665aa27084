//! A hostile plugin author: the `hostile` component tries to make the host allocate, hold, log
//! or forge too much. Each attack fails its own event with a cause the handler (and the dead
//! letter) can read; the host stays small and honest.

use plugbus::deadletter::headers;
use plugbus::sandbox::{Failure, InstanceMode, Limits, PluginSettings, Sandbox, SandboxSettings};
use plugbus::{Config, Event};
use plugbus_tests::Running;
use plugbus_tests::{TestHost, fast_retries, metrics_text, plugbus_bin, sample, wasm};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn host(tweak: impl FnOnce(&mut Config)) -> TestHost {
    TestHost::start_with(&["hostile", "faulty"], |c| {
        fast_retries(c);
        tweak(c);
    })
    .await
}

/// Publishes `hostile.<attack>` with `data`, waits for its dead letter, returns the error.
async fn dead_letter_of(t: &TestHost, attack: &str, data: &str) -> String {
    let mut seen = t.observe(&["plugbus.dlq.hostile"]).await;
    let id = t.publish(&format!("hostile.{attack}"), data).await;
    let dead = seen.next_where(|e| e.header(headers::ORIGINAL_ID) == Some(id.as_str())).await;
    dead.header(headers::ERROR).unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_header_flood_is_refused_per_output_per_event_and_per_call() {
    let t = host(|c| {
        c.plugins.entry("hostile".into()).or_default().limits.insert("max_publishes".into(), 10_000.into());
    })
    .await;
    // more than max_headers on one output: the handler sees Limit
    let error = dead_letter_of(&t, "headers", "65 1").await;
    assert!(error.contains(r#"Limit("header limit of 64 per output reached (65 given)")"#), "{error}");
    // headers cost a fixed amount each: 1,000 outputs of 64 near-empty headers used to cost
    // ~250 KB of string bytes (under the 1 MiB output cap) while the host held 64,000 tuples
    let error = dead_letter_of(&t, "headers", "64 1000").await;
    assert!(error.contains(r#"Limit("output limit of 1048576 bytes per event reached")"#), "{error}");
    // an empty name is not a header
    let error = dead_letter_of(&t, "emptyheaders", "1 1").await;
    assert!(error.contains(r#"Invalid("header name \"\" is not a valid header name"#), "{error}");
    // 400,000 empty headers in one call: refused by the per-call copy limit before the host
    // holds them (they used to cost nothing: 19 MB of tuples per publish, 100 publishes)
    let error = dead_letter_of(&t, "emptyheaders", "400000 100").await;
    assert!(
        error.contains("the handler passed more than") && error.contains("bytes to the host in one call"),
        "{error}"
    );
    assert_eq!(t.counter("hostile", "ok"), 0);
    let mut ok = t.observe(&["hostile.out.ok"]).await;
    t.publish("hostile.ok", "").await;
    ok.next_on("hostile.out.ok").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resource_flood_stops_at_the_stores_table_cap() {
    let t = host(|_| {}).await;
    // 100,000 WASI pollables never dropped: wasmtime's own caps (1,000,000 table entries,
    // 100,000 handles) would let the host hold them all
    let error = dead_letter_of(&t, "resources", "100000").await;
    assert!(error.contains("the handler holds more than 1024 WASI resources"), "{error}");
    // a handful is fine
    t.publish("hostile.resources", "100").await;
    t.wait_counter("hostile", "ok", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_bytes_are_made_at_most_64_kib_per_call() {
    let t = host(|_| {}).await;
    // 1 MiB in one call: WASI's own cap (64 MiB) let each call make the host build and fill
    // the whole list outside the plugin's memory cap, without yielding (review 55b H1)
    let error = dead_letter_of(&t, "random", "1048576 1").await;
    assert!(error.contains("requested len 1048576 exceeds limit 65536"), "{error}");
    // 64 KiB at a time, as often as the deadline allows, is the handler's own business
    t.publish("hostile.random", "65536 100").await;
    t.wait_counter("hostile", "ok", 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_flood_is_refused_by_keys_and_by_bytes_and_limits_are_per_plugin() {
    let t = host(|_| {}).await;
    // 3,000 empty writes: over max_kv_writes (1,000)
    let error = dead_letter_of(&t, "kvwrites", "3000 0").await;
    assert!(
        error.contains("kv write 1000 refused: TooLarge") && error.contains("kv write limit of 1000 keys"),
        "{error}"
    );
    // 3,000 writes of 200 KiB (each under the value cap): over max_kv_write_bytes (16 MiB) at the 81st
    let error = dead_letter_of(&t, "kvwrites", "3000 204800").await;
    assert!(error.contains("kv write 81 refused: TooLarge"), "{error}");
    assert!(error.contains("kv limit of 16777216 bytes per event reached"), "{error}");
    // 100,000 distinct reads: over max_kv_reads (1,000)
    let error = dead_letter_of(&t, "kvreads", "100000").await;
    assert!(
        error.contains("kv read 1000 refused: TooLarge") && error.contains("kv read limit of 1000 reads"),
        "{error}"
    );
    // ... and one key read 100,000 times: each read goes to the store (on NATS a round trip on
    // the connection every plugin shares), so each counts
    let error = dead_letter_of(&t, "kvreread", "100000").await;
    assert!(
        error.contains("kv read 1000 refused: TooLarge") && error.contains("a key read again is read again"),
        "{error}"
    );
    // ... and bounded in bytes: a 250 KB value read 1,000 times moved 250 MB from the store (and
    // its commit's check read it again, on the log's one writer, charged as a few bytes)
    t.publish("hostile.kvset", "same 250000").await;
    t.wait_counter("hostile", "ok", 1).await;
    let error = dead_letter_of(&t, "kvreread", "1000").await;
    assert!(
        error.contains("kv read 67 refused: TooLarge")
            && error.contains(r#"kv read limit of 16777216 bytes per event reached (key \"same\""#),
        "{error}"
    );
    drop(t);

    // per-plugin overrides, through config like every limit
    let t = host(|c| {
        let l = &mut c.plugins.entry("hostile".into()).or_default().limits;
        l.insert("max_kv_writes".into(), 10.into());
        l.insert("max_kv_reads".into(), 5.into());
        l.insert("max_kv_write_bytes".into(), 10_000.into());
    })
    .await;
    let error = dead_letter_of(&t, "kvwrites", "11 0").await;
    assert!(error.contains("kv write 10 refused") && error.contains("limit of 10 keys"), "{error}");
    let error = dead_letter_of(&t, "kvreads", "6").await;
    assert!(error.contains("kv read 5 refused") && error.contains("limit of 5 reads"), "{error}");
    // each key costs 64 bytes on top: 10 writes of 1,000 bytes ("kN" keys) pass 10,000 at the 10th
    let error = dead_letter_of(&t, "kvwrites", "10 1000").await;
    assert!(error.contains("kv write 9 refused") && error.contains("kv limit of 10000 bytes"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_filling_its_kv_stops_at_its_quota_and_other_plugins_go_on() {
    // Each `kvfill` event writes 10 new keys of 10,000 bytes: about 101,000 bytes counted (keys,
    // values, 64 more per key). Without a quota a plugin doing this on every event fills the
    // disk the event log shares, and every producer of every plugin is refused.
    let t = host(|c| {
        c.plugins.entry("hostile".into()).or_default().limits.insert("max_kv_bytes".into(), 250_000.into());
    })
    .await;
    for _ in 0..2 {
        t.publish("hostile.kvfill", "10 10000").await;
    }
    t.wait_counter("hostile", "ok", 2).await;
    // the third would take it to about 303,000: refused whole, attributed to the plugin
    let error = dead_letter_of(&t, "kvfill", "10 10000").await;
    assert!(error.contains(r#"the kv of plugin "hostile" would hold"#), "{error}");
    assert!(error.contains("over its max_kv_bytes of 250000"), "{error}");
    assert!(!error.contains("host error"), "the plugin's doing, not the host's: {error}");
    // nothing of the refused attempt was kept: what is left under the quota still takes writes
    t.publish("hostile.kvfill", "4 10000").await;
    t.wait_counter("hostile", "ok", 3).await;
    // another plugin's kv is its own
    t.publish("faulty.count", "").await;
    t.wait_counter("faulty", "ok", 1).await;
}

/// A kv store on a slow disk: each commit takes 500 ms, and the store counts per plugin the bytes
/// of the commits it is taking at once, and the most it ever took.
#[derive(Default)]
struct SlowDisk {
    inner: plugbus::kv::MemoryKv,
    taking: std::sync::Mutex<std::collections::HashMap<String, (u64, u64)>>,
}

impl SlowDisk {
    fn most(&self, ns: &str) -> u64 {
        self.taking.lock().unwrap().get(ns).map_or(0, |t| t.1)
    }
}

impl plugbus::kv::KvStore for SlowDisk {
    fn get<'a, 'b, 'c, 'f>(&'a self, ns: &'b str, key: &'c str) -> KvFuture<'f, Option<plugbus::kv::Versioned>>
    where
        'a: 'f,
        'b: 'f,
        'c: 'f,
    {
        self.inner.get(ns, key)
    }

    fn commit<'a, 'b, 'c, 'f>(&'a self, ns: &'b str, txn: &'c plugbus::kv::Txn) -> KvFuture<'f, ()>
    where
        'a: 'f,
        'b: 'f,
        'c: 'f,
    {
        Box::pin(async move {
            let bytes = txn.held_bytes();
            {
                let mut taking = self.taking.lock().unwrap();
                let (now, most) = taking.entry(ns.to_string()).or_default();
                *now += bytes;
                *most = (*most).max(*now);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            self.taking.lock().unwrap().get_mut(ns).unwrap().0 -= bytes;
            self.inner.commit(ns, txn).await
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_subscriber_never_fails_another_plugins_outputs_for_the_others() {
    // The attack: `faulty` subscribes to `faulty.*` and sleeps to its deadline on every event,
    // with a queue of 2 and no buffer; `hostile` publishes outputs on `faulty.sleep`, which `echo`
    // takes too. Once faulty's queue was full, every output of hostile's was refused for every
    // subscriber (all or none), retried and dead-lettered under hostile's name: echo got none of
    // them. Now faulty falls behind into the event log and echo gets each one.
    const EVENTS: u64 = 30;
    let t = TestHost::start_with(&["hostile", "faulty", "echo"], |c| {
        fast_retries(c);
        let flow = &mut c.plugins.entry("faulty".into()).or_default().flow;
        flow.insert("queue".into(), serde_json::json!(2));
        flow.insert("concurrency".into(), serde_json::json!(1));
        flow.insert("buffer_mib".into(), serde_json::json!(0));
        c.drain_timeout = Duration::from_millis(200);
    })
    .await;
    for _ in 0..EVENTS {
        t.publish("hostile.forward", "faulty.sleep").await;
    }
    t.wait_counter("hostile", "ok", EVENTS).await;
    t.wait_counter("echo", "ok", EVENTS).await;
    assert_eq!(t.counter("hostile", "outputs_dead_lettered"), 0, "hostile's outputs were dead-lettered for faulty");
    assert!(t.counter("faulty", "ok") + t.counter("faulty", "dead_lettered") < EVENTS, "faulty was not slow");
    t.host.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_writing_much_kv_takes_only_its_share_of_the_stores_writer() {
    // The attack: every event writes 16 MiB of kv (63 values of 250,000 bytes, within every
    // per-event limit), and the store commits slowly. Its finished attempts (`flow.concurrency`
    // of them) all sent their commits at once: 16 x 16 MiB and their fsyncs ahead of every other
    // plugin's commits in a store with one writer (on the durable bus, ahead of every producer's
    // append and every ack too). Now one plugin's commits in the store hold at most its share.
    const EVENTS: u64 = 8;
    let disk = Arc::new(SlowDisk::default());
    let t = TestHost::start_with_kv(&["hostile", "faulty"], disk.clone(), fast_retries).await;
    for _ in 0..EVENTS {
        t.publish("hostile.kvwrites", "63 250000").await;
    }
    // Every handler ran, and what is not committed waits for the store: another plugin's commit
    // is not behind it (its share is its own).
    t.wait_counter("hostile", "attempts", EVENTS).await;
    plugbus_tests::eventually("hostile's handlers are done", || t.counter("hostile", "in_flight") == 0).await;
    let waiting = EVENTS - t.counter("hostile", "ok");
    // (One commit of hostile's is in the store's hands, the rest wait for its share, counted.)
    let gauge = r#"plugbus_kv_commits_waiting{plugin="hostile"}"#;
    let counted = sample(&metrics_text(&t.url()).await, gauge).unwrap_or(0.0);
    t.publish("faulty.count", "").await;
    t.wait_counter("faulty", "ok", 1).await;
    let left = EVENTS - t.counter("hostile", "ok");
    println!("hostile had {waiting} commits waiting; {left} when the other plugin's commit was done");
    assert!(waiting >= 2, "the attack is over before the other plugin comes ({waiting} commits left)");
    assert!(counted >= 1.0, "{counted} commits counted waiting for their share, with {waiting} not committed");
    assert!(left > 0, "the other plugin's commit waited for all of hostile's");
    t.wait_counter("hostile", "ok", EVENTS).await;
    let most = disk.most("hostile");
    println!("hostile had at most {most} bytes of commits in the store at once");
    assert!(most > 15 << 20, "the attack did not reach the store ({most} bytes)");
    let share = plugbus::kv::share::COMMIT_BYTES_PER_PLUGIN;
    assert!(most <= share, "hostile had {most} bytes of commits in the store at once (its share: {share})");
    assert_eq!(sample(&metrics_text(&t.url()).await, gauge), Some(0.0), "commits still counted waiting");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_holding_every_slot_of_the_shared_pool_delays_other_plugins_never_fails_them() {
    // Four instance slots for all plugins. `faulty` holds them all for its whole deadline (6 s,
    // asleep in a host call: long enough for the other events to come while it does, on a busy
    // CI machine too), and `dice` and `responder` get events meanwhile. Their attempts used to
    // fail at once as if their handlers had trapped ("maximum concurrent … limit"), and be
    // retried and dead-lettered under their names. And the wait must not eat the handler's own
    // time: `responder` (deadline 1 s) is busy 600 ms after waiting up to 6 s for a slot.
    let t = TestHost::start_with(&["faulty", "dice", "responder"], |c| {
        fast_retries(c);
        c.sandbox.max_instances = 4;
        let faulty = c.plugins.entry("faulty".into()).or_default();
        faulty.limits.insert("deadline".into(), "6s".into());
        faulty.retry.insert("max_attempts".into(), 1.into());
        c.plugins.entry("responder".into()).or_default().limits.insert("deadline".into(), "1s".into());
    })
    .await;
    for _ in 0..4 {
        t.publish("faulty.sleep", "").await;
    }
    t.wait_counter("faulty", "in_flight", 4).await;
    // `in_flight` counts run permits, taken before the instance: on a busy machine the last of
    // faulty's instantiations could still be under way, and responder's attempt took that slot
    // (it then never waited, and faulty's fourth did; 300 ms here once was not enough). Its 6 s
    // deadline leaves time for this.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let started = Instant::now();
    t.publish("dice.roll", "").await;
    let http = reqwest::Client::new();
    let late = http.post(format!("{}/v1/request/rpc.late?timeout=10s", t.url())).body("600").send().await.unwrap();
    assert_eq!(late.status(), 200, "{}", late.text().await.unwrap());
    t.wait_counter("dice", "ok", 1).await;
    assert_eq!((t.counter("dice", "retried"), t.counter("dice", "dead_lettered")), (0, 0), "dice waited, never failed");
    assert_eq!(t.counter("responder", "retried"), 0, "the wait for a slot was not the handler's time");
    // (faulty's attempts were running, each for 6 s, when the others' events came: they waited)
    assert!(started.elapsed() >= Duration::from_millis(300), "they ran at once: the pool was not full");
    // and the operator sees who waited: at least once each (`dice` takes its own `dice.out`
    // too, and one of those can come while the last of faulty's attempts still hold their slots)
    let text = metrics_text(&t.url()).await;
    for plugin in ["dice", "responder"] {
        let waits = sample(&text, &format!("plugbus_instance_slot_waits_total{{plugin=\"{plugin}\"}}"));
        assert!(waits.is_some_and(|w| w >= 1.0), "{plugin} waited for a slot: {waits:?} in {text}");
    }
}

/// A pool that stays full past the wait (30 s) fails the waiting attempt as the host's: its
/// dead letter says `host error: every instance slot …`, and it is counted in
/// `host_failures` (`plugbus_host_failures_total`), not as a trap of the handler's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_never_gets_a_slot_of_the_shared_pool_fails_as_the_hosts() {
    let t = TestHost::start_with(&["faulty", "dice"], |c| {
        c.sandbox.max_instances = 1;
        let faulty = c.plugins.entry("faulty".into()).or_default();
        faulty.limits.insert("deadline".into(), "45s".into());
        faulty.retry.insert("max_attempts".into(), 1.into());
        c.plugins.entry("dice".into()).or_default().retry.insert("max_attempts".into(), 1.into());
    })
    .await;
    t.publish("faulty.sleep", "").await;
    t.wait_counter("faulty", "in_flight", 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    t.publish("dice.roll", "").await;
    // (It waits 30 s for a slot first: longer than `wait_counter` waits.)
    let deadline = Instant::now() + Duration::from_secs(120);
    while t.counter("dice", "dead_lettered") == 0 {
        assert!(Instant::now() < deadline, "dice's attempt never failed: {}", t.counter("dice", "retried"));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead = t.host.dead_letters().list(Some("dice"));
    let error = dead[0].event.header(headers::ERROR).unwrap();
    assert!(error.starts_with("host error: every instance slot of the pool plugins share"), "{error}");
    assert_eq!(t.counter("dice", "host_failures"), 1, "the full pool is the host's failure");
    let text = metrics_text(&t.url()).await;
    let counted = sample(&text, "plugbus_host_failures_total{plugin=\"dice\"}");
    assert_eq!(counted, Some(1.0), "{text}");
    assert_eq!(t.counter("faulty", "host_failures"), 0, "faulty's own attempt is not the host's failure");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_warm_instances_give_their_slots_to_other_plugins_when_the_pool_is_full() {
    // Four instance slots for all plugins. `faulty` (`instance = "reuse"`) runs four events at
    // once, then keeps its four warm instances idle. Those slots used to stay taken for good: every
    // other plugin's attempt waited 30 s for a slot and failed as a host error, retried and
    // dead-lettered, while nothing ran at all.
    let t = TestHost::start_with(&["faulty", "dice"], |c| {
        fast_retries(c);
        c.sandbox.max_instances = 4;
        c.flow.concurrency = 4;
        c.plugins.entry("faulty".into()).or_default().instance = Some(InstanceMode::Reuse);
    })
    .await;
    // (busy long enough that all four overlap: the two test workers run the guests, and each
    // publish waits for a turn on them)
    for _ in 0..4 {
        t.publish("faulty.slow", "1000").await;
    }
    t.wait_counter("faulty", "ok", 4).await;
    assert_eq!(t.counter("faulty", "peak_in_flight"), 4, "four warm instances: they ran at once");
    let started = Instant::now();
    t.publish("dice.roll", "").await;
    t.wait_counter("dice", "ok", 1).await;
    assert_eq!((t.counter("dice", "retried"), t.counter("dice", "dead_lettered")), (0, 0), "dice got a slot");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "dice waited {:?} for an idle instance's slot",
        started.elapsed()
    );
    // and `faulty` still runs, on the warm instances it kept
    t.publish("faulty.ok", "").await;
    t.wait_counter("faulty", "ok", 5).await;
    let evicted = sample(&metrics_text(&t.url()).await, "plugbus_idle_instances_evicted_total");
    assert_eq!(evicted, Some(1.0), "one idle instance gave its slot up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_text_and_echoed_subjects_are_cut_to_a_few_kib_saying_where() {
    let t = host(|_| {}).await;
    // a 1 MiB reject text
    let error = dead_letter_of(&t, "reject", "1048576").await;
    assert!(error.len() < 5000, "dead letter error of {} bytes", error.len());
    assert!(error.ends_with("… [cut at 4096 of 1048576 bytes]"), "{}", &error[4000..]);
    // the kept dead letter carries the same cut text
    let kept = t.host.dead_letters().list(Some("hostile"));
    let header = kept.last().unwrap().event.header(headers::ERROR).unwrap();
    assert_eq!(header, error);
    // a refused publish to a 1,000,000-byte subject: the host echoes 4 KiB of it, quoted
    let error = dead_letter_of(&t, "subject", "1000000").await;
    assert!(error.starts_with("handler rejected the event: publish refused: subject \"aaaa"), "{}", &error[..80]);
    assert!(error.contains("… [cut at 4096 of 1000000 bytes] is longer than 1024 bytes"), "{}", &error[4000..]);
    assert!(error.len() < 5000, "{}", error.len());
    // 16 MiB of reject text is more than one call may copy out of the guest
    let error = dead_letter_of(&t, "reject", "16777216").await;
    assert!(error.contains("the handler passed more than 4296704 bytes to the host in one call"), "{error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_headers_are_refused_and_outputs_cannot_pose_as_dead_letters() {
    let t = host(|_| {}).await;
    for name in [
        "plugbus-error",
        "plugbus-original-subject",
        "plugbus-plugin",
        "Plugbus-Caused-By",
        "id",
        "source",
        "type",
        "time",
        "specversion",
        "subject",
        "ce-source",
        "CE_ID",
        "ce-datacontenttype",
        "Nats-Msg-Id",
        "nats-rollup",
    ] {
        let error = dead_letter_of(&t, "reserved", name).await;
        // the handler saw Denied naming the header (its reject text is `{err:?}`)
        let names_it = format!(r#"header \"{name}\" is reserved"#);
        assert!(error.contains("publish refused: Denied(") && error.contains(&names_it), "{name}: {error}");
    }
    // the attack the rule stops: an output posing as a dead letter, sent to a plugin that fails
    // on it, used to be dropped as "a dead letter failing again" instead of dead-lettered
    let error = dead_letter_of(&t, "reserved", "plugbus-original-subject faulty.reject").await;
    assert!(error.contains("is reserved"), "{error}");
    // a plain output of one plugin that fails in another is dead-lettered there
    let mut faulty_dlq = t.observe(&["plugbus.dlq.faulty"]).await;
    t.publish("hostile.forward", "faulty.reject").await;
    let dead = faulty_dlq.next_on("plugbus.dlq.faulty").await;
    assert_eq!(dead.header(headers::ORIGINAL_SUBJECT), Some("faulty.reject"));
    assert!(dead.header(headers::ERROR).unwrap().contains("never"));
    // ... nor as any event at all: a CloudEvents envelope as the content type would make a NATS
    // receiver read the data (any id, source, `plugbus-*` mark) as the event
    for forged in [
        "content-type hostile.out.reserved application/cloudevents+json",
        "DataContentType hostile.out.reserved Application/CloudEvents-batch+json",
    ] {
        let error = dead_letter_of(&t, "reserved", forged).await;
        assert!(
            error.contains("publish refused: Denied(") && error.contains("CloudEvents envelope"),
            "{forged}: {error}"
        );
    }
    // ... nor a content type no transport would read back (over 1 KiB, a control character),
    // nor a header value NATS cannot carry (a line break): each reached NATS subscribers as a
    // malformed message (dead-lettered under their name) or lost the header on NATS only
    for (forged, why) in [
        ("datacontenttype hostile.out.reserved <2000>", "at most 1024 bytes"),
        ("content-type hostile.out.reserved text/plain\\n", "no control characters"),
        ("order-key hostile.out.reserved a\\nb", "line break"),
    ] {
        let error = dead_letter_of(&t, "reserved", forged).await;
        assert!(error.contains("publish refused: Invalid(") && error.contains(why), "{forged}: {error}");
    }
    // ... nor into a dead-letter subject, whatever its manifest's `publishes` says (the HTTP
    // ingress refuses them too): on NATS, a thousand such outputs on `plugbus.dlq.faulty` hid
    // faulty's real dead letters from listings and replays (review 48a M1), and a plugin reading
    // dead letters took them for the host's
    let mut faulty_dlq = t.observe(&["plugbus.dlq.faulty"]).await;
    for subject in ["plugbus.dlq.faulty", "plugbus.dlq.hostile"] {
        let error = dead_letter_of(&t, "forward", subject).await;
        assert!(
            error.contains("publish refused: Denied(") && error.contains("is a dead-letter subject"),
            "{subject}: {error}"
        );
    }
    t.publish("hostile.forward", "faulty.reject").await;
    let first = faulty_dlq.next_on("plugbus.dlq.faulty").await;
    assert_eq!(first.source, "plugbus/faulty", "a forged dead letter reached plugbus.dlq.faulty first");
    // datacontenttype (unprefixed) is the plugin's to say; source is always the host's
    let mut out = t.observe(&["hostile.out.reserved"]).await;
    t.publish("hostile.reserved", "datacontenttype").await;
    let ev = out.next_on("hostile.out.reserved").await;
    assert_eq!(ev.datacontenttype.as_deref(), Some("forged"));
    assert_eq!(ev.source, "plugbus/hostile");
    assert!(!plugbus::deadletter::is_dead_letter(&ev));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_ids_depend_on_the_inputs_source_not_only_its_id() {
    // In memory: the durable log would (rightly) keep the repeated event's output only once.
    let t = TestHost::start_with(&["echo"], |c| c.bus.durable = false).await;
    let mut seen = t.observe(&["echo.orders.created"]).await;
    let mut ids = Vec::new();
    for source in ["/shop", "/attacker", "/shop"] {
        let mut ev = Event::new("orders.created", "{}");
        ev.id = "order-1".into();
        ev.source = source.into();
        t.host.publish(ev).await.unwrap();
        ids.push(seen.next_on("echo.orders.created").await.id.clone());
    }
    assert_ne!(ids[0], ids[1], "a publisher reusing another source's ce-id gets the same output ids");
    assert_eq!(ids[0], ids[2], "output ids are deterministic");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_recursion_is_named_a_stack_overflow_of_the_handlers_own_stack() {
    let t = host(|_| {}).await;
    let error = dead_letter_of(&t, "deep", "").await;
    assert!(error.contains("stack overflow in the handler (its stack is 1024 KiB)"), "{error}");
    let error = dead_letter_of(&t, "wasmdeep", "").await;
    assert!(error.contains("stack overflow (wasm stack limit reached)"), "{error}");
    // an out-of-bounds read elsewhere keeps wasmtime's words
    let error = dead_letter_of(&t, "oob", "").await;
    assert!(error.ends_with("trap: wasm trap: out of bounds memory access"), "{error}");
    // with `instance = "reuse"` too (the warm store is read, then dropped)
    drop(t);
    let t = host(|c| c.plugins.entry("hostile".into()).or_default().instance = Some(InstanceMode::Reuse)).await;
    let error = dead_letter_of(&t, "deep", "").await;
    assert!(error.contains("stack overflow in the handler (its stack is 1024 KiB)"), "{error}");
    let mut ok = t.observe(&["hostile.out.ok"]).await;
    t.publish("hostile.ok", "").await;
    ok.next_on("hostile.out.ok").await;
}

/// A kv store whose reads go wrong: they panic (a bug in a host function), never answer (a
/// stalled broker or disk) or fail (a log being reopened, in words that name the host's files).
/// (`KvStore` is an `async_trait`; written out by hand here, the tests crate does not depend on
/// the macro.)
enum BrokenReads {
    Panic,
    Stall,
    Unavailable,
}

type KvFuture<'a, T> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, plugbus::kv::KvError>> + Send + 'a>>;

impl plugbus::kv::KvStore for BrokenReads {
    fn get<'a, 'b, 'c, 'f>(&'a self, _ns: &'b str, _key: &'c str) -> KvFuture<'f, Option<plugbus::kv::Versioned>>
    where
        'a: 'f,
        'b: 'f,
        'c: 'f,
        Self: 'f,
    {
        match self {
            BrokenReads::Panic => Box::pin(async { panic!("kv store exploded") }),
            BrokenReads::Stall => Box::pin(std::future::pending()),
            BrokenReads::Unavailable => Box::pin(async {
                Err(plugbus::kv::KvError::Unavailable("/srv/plugbus/bus.redb is being reopened".into()))
            }),
        }
    }

    fn commit<'a, 'b, 'c, 'f>(&'a self, _ns: &'b str, _txn: &'c plugbus::kv::Txn) -> KvFuture<'f, ()>
    where
        'a: 'f,
        'b: 'f,
        'c: 'f,
        Self: 'f,
    {
        Box::pin(async { Ok(()) })
    }
}

/// `hostile` loaded alone, its kv `kv`, with `limits`.
async fn hostile_alone(kv: BrokenReads, limits: Limits) -> plugbus::sandbox::Plugin {
    alone("hostile", kv, limits).await
}

/// `component` loaded alone, its kv `kv`, with `limits`.
async fn alone(component: &str, kv: BrokenReads, limits: Limits) -> plugbus::sandbox::Plugin {
    let sandbox = Sandbox::new(SandboxSettings::default()).unwrap();
    let bytes = std::fs::read(wasm(component)).unwrap();
    sandbox
        .load(&bytes, |_| PluginSettings {
            limits,
            config: Default::default(),
            kv: Arc::new(kv),
            allowed_outbound: Vec::new(),
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_host_function_fails_the_attempt_like_a_trap_and_the_plugin_keeps_serving() {
    for mode in [InstanceMode::Fresh, InstanceMode::Reuse] {
        let plugin = hostile_alone(BrokenReads::Panic, Limits { instance: mode, ..Limits::default() }).await;
        for _ in 0..3 {
            let run = plugin.handle(&Event::new("hostile.kvreads", "1"), 1).await;
            match &run.result {
                Err(f @ Failure::Host(_)) => {
                    let m = f.to_string();
                    assert!(m.starts_with("host error: a host function panicked: kv store exploded"), "{mode:?}: {m}")
                }
                other => panic!("{mode:?}: expected the host's failure, got {other:?}"),
            }
            assert!(run.outputs.is_empty() && run.txn.is_empty());
            let ok = plugin.handle(&Event::new("hostile.ok", ""), 1).await;
            assert!(ok.result.is_ok(), "{mode:?}: the next event failed: {:?}", ok.result);
            assert_eq!(ok.outputs.len(), 1);
        }
    }
}

/// The handler waits in a kv read the store never answers: the attempt fails at its deadline
/// as the host's (`host error: the kv store did not answer …`), not as the handler's `deadline
/// exceeded` (which a dead letter and the logs used to say).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_store_that_does_not_answer_fails_the_attempt_as_the_hosts_not_the_handlers() {
    for mode in [InstanceMode::Fresh, InstanceMode::Reuse] {
        let limits = Limits { instance: mode, deadline: Duration::from_millis(300), ..Limits::default() };
        let plugin = hostile_alone(BrokenReads::Stall, limits).await;
        for _ in 0..2 {
            let started = Instant::now();
            let run = plugin.handle(&Event::new("hostile.kvreads", "1"), 1).await;
            match &run.result {
                Err(f @ Failure::Host(m)) => assert!(
                    f.to_string().starts_with("host error: the kv store did not answer a read of key")
                        && m.contains("deadline"),
                    "{mode:?}: {f}"
                ),
                other => panic!("{mode:?}: expected the host's failure, got {other:?}"),
            }
            assert!(started.elapsed() < Duration::from_secs(5), "{mode:?}: the attempt outlived its deadline");
            let ok = plugin.handle(&Event::new("hostile.ok", ""), 1).await;
            assert!(ok.result.is_ok(), "{mode:?}: the next event failed: {:?}", ok.result);
        }
    }
}

/// A kv read the store fails (a log being reopened, a broker gone): the SDK asks to retry, and
/// the attempt fails as the host's (`host error: the kv store failed a read …`), never as the
/// handler's retry (its dead letter said `handler asked to retry: kv store unavailable: …`, and
/// `plugbus_host_failures_total` missed it); the guest is told the store is unavailable, not the
/// store's words, which name the host's files (review 48a L2, L3). A reject after it stays the
/// handler's own choice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kv_read_the_store_fails_fails_the_attempt_as_the_hosts_and_shows_the_guest_no_paths() {
    let plugin = alone("dice", BrokenReads::Unavailable, Limits::default()).await;
    let run = plugin.handle(&Event::new("dice.roll", ""), 1).await;
    match &run.result {
        Err(f @ Failure::Host(m)) => {
            let m = m.as_str();
            assert!(
                f.to_string().starts_with(
                    r#"host error: the kv store failed a read of key "rolls": kv store unavailable: /srv/plugbus/bus.redb"#
                ),
                "{f}"
            );
            assert!(m.contains("(the handler then asked to retry: "), "{m}");
            assert!(m.ends_with("the kv store is unavailable (the host's log says why))"), "{m}");
        }
        other => panic!("expected the host's failure, got {other:?}"),
    }
    let plugin = hostile_alone(BrokenReads::Unavailable, Limits::default()).await;
    let run = plugin.handle(&Event::new("hostile.kvreads", "1"), 1).await;
    match &run.result {
        Err(Failure::Reject(m)) => {
            assert!(m.contains("the kv store is unavailable") && !m.contains("/srv/plugbus"), "{m}")
        }
        other => panic!("expected the handler's reject, got {other:?}"),
    }
}

/// A `/proc/<pid>/status` field, in KiB.
fn proc_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field}"));
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// `plugbus run` on a plugins folder holding `hostile`, in a temp dir (`plugins/`, `data/`), its
/// API on a free port, JSON logs at info to what `stderr` makes of the temp dir: the dir (removed
/// when dropped), the port and the host.
fn run_hostile(stderr: impl FnOnce(&std::path::Path) -> Stdio) -> (tempfile::TempDir, u16, Running) {
    let dir = tempfile::tempdir().unwrap();
    let (plugins, data) = (dir.path().join("plugins"), dir.path().join("data"));
    std::fs::create_dir(&plugins).unwrap();
    std::fs::copy(wasm("hostile"), plugins.join("hostile.wasm")).unwrap();
    let port = plugbus_tests::free_port();
    let child = Command::new(plugbus_bin())
        .args(["run", "--log-format", "json", "--http", &format!("127.0.0.1:{port}")])
        .arg("--plugins")
        .arg(&plugins)
        .arg("--data-dir")
        .arg(&data)
        .env("RUST_LOG", "info")
        .stderr(stderr(dir.path()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    (dir, port, Running(child))
}

/// Review 59d F3: the host wrote its log to stderr on the runtime's workers, so a reader that
/// lags (here: a pipe nobody reads) blocked the worker that logged, then every worker: a plugin
/// logging its most on every event stalled every plugin and the API. Lines now go to stderr
/// from a thread of their own, dropped (and counted) past 8 MiB waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_whose_log_nobody_reads_still_serves() {
    // stderr a pipe whose reading end is held and never read: full after 64 KiB.
    let (_dir, port, child) = run_hostile(|_| Stdio::piped());
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while client.get(format!("{url}/readyz")).send().await.ok().map(|r| r.status().as_u16()) != Some(200) {
        assert!(Instant::now() < deadline, "the host did not come up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Each event logs as much as its limit lets it (64 KiB of lines): the pipe fills at once.
    for _ in 0..40 {
        let posted = client.post(format!("{url}/v1/events/hostile.emptylogs")).body("5000").send().await;
        let r = posted.expect("the API stalled on the unread log");
        assert_eq!(r.status().as_u16(), 202);
    }
    let handled = || async {
        let v: serde_json::Value = client.get(format!("{url}/v1/plugins")).send().await.ok()?.json().await.ok()?;
        v["plugins"][0]["counters"]["ok"].as_u64()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while handled().await.unwrap_or(0) < 40 {
        assert!(Instant::now() < deadline, "the host stalled on its unread log: {:?} of 40 handled", handled().await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let health = client.get(format!("{url}/healthz")).send().await.expect("the API stalled on the unread log");
    assert_eq!(health.status().as_u16(), 200);
    drop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn seven_hostile_events_at_once_do_not_grow_the_host_or_its_log() {
    let (dir, port, child) = run_hostile(|dir| std::fs::File::create(dir.join("host.log")).unwrap().into());
    let log = dir.path().join("host.log");
    let pid = child.0.id();
    let url = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client.get(format!("{url}/readyz")).send().await.ok().map(|r| r.status().as_u16());
        if ready == Some(200) {
            break;
        }
        assert!(Instant::now() < deadline, "the host did not come up: {}", std::fs::read_to_string(&log).unwrap());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead_letters = || async {
        let v: serde_json::Value = client.get(format!("{url}/v1/dlq")).send().await.unwrap().json().await.unwrap();
        v["dead_letters"].as_array().unwrap().len()
    };
    // one ordinary event first, so the baseline has a warm pool slot and runtime
    let r = client.post(format!("{url}/v1/events/hostile.reject")).body("10").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    while dead_letters().await < 1 {
        assert!(Instant::now() < deadline, "the warm-up event was never dead-lettered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_before = proc_kib(pid, "VmRSS:");
    // reset the peak (VmHWM) so it measures the burst, not start-up compilation
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    let log_before = std::fs::metadata(&log).unwrap().len();

    let attacks = [
        ("headers", "400000 100"),     // 19 MB of header tuples per publish, 100 publishes
        ("kvwrites", "3000 204800"),   // 600 MiB of kv writes
        ("kvreads", "100000"),         // 100,000 keys read
        ("reject", "1048576"),         // 1 MiB of failure text, into logs and dead letters
        ("subject", "1000000"),        // a 1 MB subject echoed (escaped) in the refusal
        ("reserved", "plugbus-error"), // a forged dead-letter mark
        ("deep", ""),                  // the handler's own stack overflowing
    ];
    let started = Instant::now();
    let sends = attacks.iter().map(|(attack, body)| {
        let req = client.post(format!("{url}/v1/events/hostile.{attack}")).body(*body);
        async move { req.send().await.unwrap().status().as_u16() }
    });
    for status in futures::future::join_all(sends).await {
        assert_eq!(status, 202);
    }
    let mut peak_sampled = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while dead_letters().await < 1 + attacks.len() {
        peak_sampled = peak_sampled.max(proc_kib(pid, "VmRSS:"));
        assert!(
            Instant::now() < deadline,
            "not every attack was dead-lettered within 120 s: {} of {}; RSS {} MiB before, {} MiB at the sampled peak",
            dead_letters().await - 1,
            attacks.len(),
            rss_before / 1024,
            peak_sampled / 1024
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let took = started.elapsed();
    let plugins: serde_json::Value =
        client.get(format!("{url}/v1/plugins")).send().await.unwrap().json().await.unwrap();
    let attempts = plugins["plugins"][0]["counters"]["attempts"].as_u64().unwrap() - 1;
    let rss_after = proc_kib(pid, "VmRSS:");
    let hwm = proc_kib(pid, "VmHWM:");
    let log_grew = std::fs::metadata(&log).unwrap().len() - log_before;
    let peak_growth_mib = hwm.saturating_sub(rss_before) / 1024;
    eprintln!(
        "hostile burst of {} events ({} attempts incl. retries) in {took:?}: RSS {} MiB before, peak {} MiB \
         (+{peak_growth_mib} MiB; sampled peak {} MiB), {} MiB after; log grew {} KiB",
        attacks.len(),
        attempts,
        rss_before / 1024,
        hwm / 1024,
        peak_sampled / 1024,
        rss_after / 1024,
        log_grew / 1024
    );
    assert!(peak_growth_mib < 400, "the host grew by {peak_growth_mib} MiB during the burst");
    assert!(log_grew < 8 << 20, "the log grew by {log_grew} bytes");
    // the host still serves
    let r = client.post(format!("{url}/v1/events/hostile.reject")).body("10").send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let deadline = Instant::now() + Duration::from_secs(30);
    while dead_letters().await < 2 + attacks.len() {
        assert!(Instant::now() < deadline, "the host stopped serving after the burst");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
