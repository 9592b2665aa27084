//! Ports for servers a test starts as a separate process (`plugbus run`, `nats-server`).
//!
//! Binding port 0 and letting go is racy here: the kernel hands the same port out again as the
//! *source* port of any outgoing connection, and the e2e tests open thousands of them. A host then
//! started on that port finds it in use. The ports given here come from below the kernel's
//! ephemeral range, which outgoing connections never take, each one bound once to check that no
//! other process holds it, and never the same twice in one test process.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// Where the kernel's ephemeral range begins (`/proc/sys/net/ipv4/ip_local_port_range`).
fn ephemeral_low() -> u32 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| text.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

/// A loopback TCP port no other process holds and no outgoing connection will be given.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let high = ephemeral_low().clamp(2048, 65536);
    let low = high / 2;
    let span = high - low;
    // Test processes running at once start at different places in the range.
    let start = std::process::id().wrapping_mul(2654435761) % span;
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + (start + n.wrapping_mul(7)) % span;
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free loopback port in {low}..{high}")
}
