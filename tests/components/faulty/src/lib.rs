//! A handler that misbehaves on purpose, for the fault tests. The subject's last token picks
//! the fault: `faulty.<fault>`; every other handler-visible effect is an output on
//! `faulty.out.<fault>` carrying the attempt number, so tests can see what ran.
use plugbus_sdk::{Event, HandlerError, handler, kv, publish, publish_json};
use std::hint::black_box;

fn recurse(n: u64) -> u64 {
    if black_box(n) == u64::MAX { 0 } else { 1 + recurse(black_box(n + 1)) + black_box(1) }
}

fn busy_for_ms(ms: u64) {
    let start = std::time::SystemTime::now();
    while start.elapsed().map(|d| d.as_millis() as u64).unwrap_or(0) < ms {
        black_box(0);
    }
}

#[handler(
    name = "faulty",
    subscribe = ["faulty.*"],
    publishes = ["faulty.out.>", "faulty.reject"],
    order_by_header = "key"
)]
fn misbehave(ev: Event) -> Result<(), HandlerError> {
    let fault = ev.subject().rsplit('.').next().unwrap_or_default().to_string();
    let out = format!("faulty.out.{fault}");
    let arg: u64 = ev.text().ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0);
    match fault.as_str() {
        "ok" => {}
        "trap" => core::arch::wasm32::unreachable(),
        "panic" => panic!("the handler gave up on event {}", ev.id()),
        "loop" => loop {
            black_box(0);
        },
        "recurse" => {
            black_box(recurse(0));
        }
        "grow" => {
            let mut hog: Vec<Vec<u8>> = Vec::new();
            loop {
                hog.push(vec![1u8; 1 << 20]);
                black_box(&hog);
            }
        }
        "flood" => {
            for i in 0..1000 {
                publish(&out, i.to_string())?;
            }
        }
        "sys" => publish("$SYS.x", b"boom")?,
        "unlisted" => publish("payments.captured", b"sneaky")?,
        "big" => publish(&out, vec![0u8; 2 << 20])?,
        // A kv write, then an output of `arg` bytes (within max_output_bytes: one near 1 MiB
        // is over NATS's max_payload once the host's attributes are on it).
        "nearmax" => {
            kv::set("nearmax", b"written")?;
            publish(&out, vec![0u8; arg as usize])?;
            return Ok(());
        }
        "chatty" => {
            for i in 0..100_000 {
                println!("line {i} of a very chatty plugin");
            }
        }
        "kvbig" => kv::set("big", vec![0u8; 1 << 20])?,
        // A 5,000-byte key (under max_kv_value_bytes): on NATS it would become a subject past
        // the server's control line.
        "kvkey" => kv::set(&"k".repeat(5_000), b"v")?,
        "retry" => return Err(HandlerError::retry("not now")),
        "reject" => return Err(HandlerError::reject("never")),
        // Publishes `faulty.reject`, one of its own subjects, which it then rejects: an event
        // it failed that is its own output.
        "selfreject" => publish("faulty.reject", ev.data())?,
        // Fails until the attempt number reaches `arg`, then succeeds.
        "flaky" if ev.attempt() < arg as u32 => {
            publish(&out, format!("lost attempt {}", ev.attempt()))?;
            return Err(HandlerError::retry(format!("attempt {} failed", ev.attempt())));
        }
        "flaky" => {}
        // Two outputs, one after the other: `faulty.out.pair.first`, then `faulty.out.pair.second`.
        "pair" => {
            publish("faulty.out.pair.first", ev.data())?;
            publish("faulty.out.pair.second", ev.data())?;
        }
        // Busy for `arg` milliseconds.
        "slow" => busy_for_ms(arg),
        // Busy for `arg` milliseconds, then fails (retry).
        "slowretry" => {
            busy_for_ms(arg);
            return Err(HandlerError::retry(format!("attempt {} failed slowly", ev.attempt())));
        }
        // Asleep for an hour in a host call (`wasi:io/poll`'s block), where no epoch tick
        // reaches: only a deadline kept by the host's clock ends it.
        "sleep" => std::thread::sleep(std::time::Duration::from_secs(3600)),
        // Ordered work item: {"seq": n, "delay": ms, "fail_until": attempt}; fails (retry)
        // until the attempt reaches fail_until, then is busy for delay ms and reports its seq.
        "step" => {
            let step: serde_json::Value = ev.json()?;
            let fail_until = step["fail_until"].as_u64().unwrap_or(0) as u32;
            if ev.attempt() < fail_until {
                return Err(HandlerError::retry(format!("step fails attempt {}", ev.attempt())));
            }
            busy_for_ms(step["delay"].as_u64().unwrap_or(0));
            let key = ev.header("key").unwrap_or("none");
            publish_json(&out, &serde_json::json!({ "key": key, "seq": step["seq"], "attempt": ev.attempt() }))?;
            return Ok(());
        }
        // Counts in kv under the event's `key` header, checking order via `seq`.
        "count" => {
            let key = ev.header("key").unwrap_or("none").to_string();
            let n = kv::get_json::<u64>(&key)?.unwrap_or(0) + 1;
            kv::set_json(&key, &n)?;
        }
        // Rejected until a `faulty.opengate` event has run (kv `gate`).
        "gate" if kv::get("gate")?.is_none() => return Err(HandlerError::reject("the gate is closed")),
        "gate" => {}
        "opengate" => kv::set("gate", b"open")?,
        // How many events this instance has handled (1 with a fresh instance per event).
        "global" => {
            static SEEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
            let n = SEEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            publish_json(&out, &serde_json::json!({ "instance_events": n }))?;
            return Ok(());
        }
        other => return Err(HandlerError::reject(format!("unknown fault {other:?}"))),
    }
    publish_json(&out, &serde_json::json!({ "attempt": ev.attempt(), "data": ev.text().unwrap_or("") }))?;
    Ok(())
}
