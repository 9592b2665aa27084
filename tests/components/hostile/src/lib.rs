//! An attacker's handler: tries to make the host allocate, hold, log or forge too much. The
//! subject's last token picks the attack (`hostile.<attack>`), the event's data its size
//! (whitespace-separated numbers, or a header name / subject). What the host refused is
//! returned as the handler's reject text (`{err:?}`, so tests see the error variant), unless
//! the attack swallows it.
use plugbus_sdk::__bindings::plugbus::handler::bus;
use plugbus_sdk::{Event, HandlerError, handler, kv, publish, publish_with_headers};
use std::hint::black_box;

/// Recursion that keeps a 512-byte buffer in linear memory per frame: the guest's own stack
/// (1 MiB at the bottom of memory) overflows long before wasmtime's wasm stack.
#[inline(never)]
fn deep(n: u64) -> u64 {
    let mut buf = [0u8; 512];
    black_box(&mut buf);
    buf[0] = n as u8;
    if black_box(n) == 0 { 0 } else { deep(n - 1) + u64::from(buf[black_box(0)]) }
}

/// Recursion with nothing in linear memory: only wasmtime's wasm stack limit stops it.
fn wasm_deep(n: u64) -> u64 {
    if black_box(n) == u64::MAX { 0 } else { 1 + wasm_deep(black_box(n + 1)) + black_box(1) }
}

// WASI's monotonic clock, imported by hand: each call makes the host put a pollable in the
// store's resource table (the version the Rust standard library itself imports).
#[link(wasm_import_module = "wasi:clocks/monotonic-clock@0.2.4")]
unsafe extern "C" {
    #[link_name = "subscribe-duration"]
    fn subscribe_duration(nanos: i64) -> i32;
}

// WASI's random bytes, imported by hand: the host makes the whole list before the guest sees
// it (`list<u8>`, lowered as a pointer and a length written at `ret`).
#[link(wasm_import_module = "wasi:random/random@0.2.4")]
unsafe extern "C" {
    #[link_name = "get-random-bytes"]
    fn get_random_bytes(len: i64, ret: *mut [usize; 2]);
}

fn refused(what: impl std::fmt::Display, e: impl std::fmt::Debug) -> HandlerError {
    HandlerError::reject(format!("{what} refused: {e:?}"))
}

#[handler(
    name = "hostile",
    subscribe = ["hostile.*"],
    publishes = ["hostile.out.>", "faulty.>", "plugbus.dlq.>"]
)]
fn attack(ev: Event) -> Result<(), HandlerError> {
    let attack = ev.subject().rsplit('.').next().unwrap_or_default().to_string();
    let text = ev.text().unwrap_or_default().trim().to_string();
    let nums: Vec<usize> = text.split_whitespace().filter_map(|t| t.parse().ok()).collect();
    let arg = |i: usize, default: usize| nums.get(i).copied().unwrap_or(default);
    match attack.as_str() {
        // `N P`: P publishes each carrying N headers `h0`, `h1`, … with empty values;
        // `emptyheaders`: with empty names too (400,000 by default: 19 MB of host tuples per
        // publish, free when only string bytes were charged).
        "headers" | "emptyheaders" => {
            let (n, publishes) = (arg(0, 400_000), arg(1, 100));
            let name = |i: usize| if attack == "headers" { format!("h{i}") } else { String::new() };
            let headers: Vec<(String, String)> = (0..n).map(|i| (name(i), String::new())).collect();
            for p in 0..publishes {
                bus::publish("hostile.out.headers", b"", &headers).map_err(|e| refused(format!("publish {p}"), e))?;
            }
        }
        // `N SIZE`: N kv writes of SIZE bytes each (3,000 x 200 KiB = 600 MiB held per event when
        // only the value cap was checked).
        "kvwrites" => {
            let (n, size) = (arg(0, 3_000), arg(1, 200 * 1024));
            let value = vec![7u8; size];
            for i in 0..n {
                kv::set(&format!("k{i}"), &value).map_err(|e| refused(format!("kv write {i}"), e))?;
            }
        }
        // `N SIZE`: N new kv keys of SIZE bytes each, named after the event: every event adds
        // keys, and the plugin's kv grows on the shared disk until its quota (`max_kv_bytes`).
        "kvfill" => {
            let (n, size) = (arg(0, 10), arg(1, 10_000));
            let value = vec![7u8; size];
            for i in 0..n {
                kv::set(&format!("{}/{i}", ev.id()), &value).map_err(|e| refused(format!("kv write {i}"), e))?;
            }
        }
        // `N`: N reads of distinct keys.
        "kvreads" => {
            for i in 0..arg(0, 100_000) {
                kv::get(&format!("r{i}")).map_err(|e| refused(format!("kv read {i}"), e))?;
            }
        }
        // `TEXT`: log TEXT and reject with it (`\n` in it is a line break): a line of its own
        // in the host's log, posing as the host's.
        "forgelog" => {
            let text = text.replace("\\n", "\n");
            plugbus_sdk::log::error(&text);
            // on stdout, where a line ends at `\n`: a carriage return and a line separator
            println!("{}", text.replace('\n', "\r"));
            println!("{}", text.replace('\n', "\u{2028}"));
            return Err(HandlerError::reject(text));
        }
        // `KEY SIZE`: one kv write of SIZE bytes under KEY (to read it in a later event).
        "kvset" => {
            let key = text.split_whitespace().next().unwrap_or("same");
            kv::set(key, &vec![7u8; arg(0, 1024)]).map_err(|e| refused("kv write", e))?;
        }
        // `N`: N reads of one key (each went to the store, only the first was counted).
        "kvreread" => {
            for i in 0..arg(0, 100_000) {
                kv::get("same").map_err(|e| refused(format!("kv read {i}"), e))?;
            }
        }
        // `N`: reject with N bytes of text (1 MiB by default).
        "reject" => return Err(HandlerError::reject("E".repeat(arg(0, 1 << 20)))),
        // `N`: publish to an N-byte subject and swallow the refusal (so the host's own failure
        // text is what the dead letter carries).
        "subject" => {
            let _ = publish(&"a".repeat(arg(0, 1 << 20)), b"");
        }
        // `NAME [SUBJECT [VALUE]]`: publish one output with the header NAME (a reserved one, or a
        // trace context, to forge) set to VALUE (default `forged`; `\n` in it is a line break,
        // `<N>` N bytes of `a`).
        "reserved" => {
            let mut words = text.split_whitespace();
            let name = words.next().unwrap_or("plugbus-error");
            let subject = words.next().unwrap_or("hostile.out.reserved");
            let value = words.next().unwrap_or("forged").replace("\\n", "\n");
            let value = match value.strip_prefix('<').and_then(|v| v.strip_suffix('>')).and_then(|n| n.parse().ok()) {
                Some(n) => "a".repeat(n),
                None => value,
            };
            publish_with_headers(subject, b"forged", &[(name, value.as_str())]).map_err(|e| refused("publish", e))?;
        }
        // `N`: N empty log lines (a million by default): each is a host log line, whatever
        // its length.
        "emptylogs" => {
            for _ in 0..arg(0, 1_000_000) {
                plugbus_sdk::log::info("");
            }
        }
        // `N`: N rounds of three refused host calls (a publish and a request on a subject its
        // manifest does not allow, a reply to an event that asked nothing), each error swallowed:
        // every refusal was a host warning of its own.
        "refusals" => {
            for _ in 0..arg(0, 100_000) {
                let _ = publish("denied.publish", b"x");
                let _ = plugbus_sdk::request("denied.request", b"x", std::time::Duration::from_millis(10));
                let _ = plugbus_sdk::reply(&ev, b"x");
            }
        }
        // `SUBJECT`: publish a plain output there (e.g. to a plugin that fails on it).
        "forward" => publish(&text, b"from hostile").map_err(|e| refused("publish", e))?,
        "deep" => {
            black_box(deep(black_box(10_000_000)));
        }
        // An out-of-bounds read that is not the stack: must not be called a stack overflow.
        "oob" => {
            black_box(unsafe { core::ptr::read_volatile(black_box(0x7000_0000usize) as *const u8) });
        }
        "wasmdeep" => {
            black_box(wasm_deep(0));
        }
        // `N C`: C calls for N random bytes each (the host makes each whole, then the guest's
        // copy is freed).
        "random" => {
            for _ in 0..arg(1, 1) {
                let mut ret = [0usize; 2];
                unsafe { get_random_bytes(arg(0, 64 << 20) as i64, &mut ret) };
                let bytes = unsafe { Vec::from_raw_parts(ret[0] as *mut u8, ret[1], ret[1]) };
                black_box(&bytes);
            }
        }
        // `N`: N pollables, never dropped.
        "resources" => {
            for _ in 0..arg(0, 1_000_000) {
                black_box(unsafe { subscribe_duration(1) });
            }
        }
        // `N`: N million rounds of arithmetic, all in the guest (CPU work, no host call), then
        // `hostile.out.work`.
        "work" => {
            let mut x = 1u64;
            for i in 0..arg(0, 1) as u64 * 1_000_000 {
                x = black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
            }
            publish("hostile.out.work", x.to_string()).map_err(|e| refused("publish", e))?;
        }
        // `N`: N naps of 1 ms, each a wait in a host call (`wasi:io/poll`), then
        // `hostile.out.naps`: a handler that spends its time waiting on the host, not computing.
        "naps" => {
            for _ in 0..arg(0, 1) {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            publish("hostile.out.naps", b"rested").map_err(|e| refused("publish", e))?;
        }
        "ok" => publish("hostile.out.ok", b"ok").map_err(|e| refused("publish", e))?,
        other => return Err(HandlerError::reject(format!("unknown attack {other:?}"))),
    }
    Ok(())
}
