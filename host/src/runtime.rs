//! The async runtime the host runs on: `plugbus` and the benchmark build it here, so the bench
//! measures what users run.

/// How many tasks a worker runs between looks at the sockets and timers (tokio's default is
/// 61). A plugin's attempt runs a slice per poll (then 10 ms, an epoch tick; now 2 to 3 ms:
/// `sandbox::engine::EPOCH_TICK`), so with every worker busy running plugins (one plugin
/// spinning in two attempts is enough), the default looked at them about every 610 ms per
/// worker. With 16 attempts spinning (a debug build), `/healthz` answered in 181 ms (p50) and an
/// ingress `POST` in 211 ms; at 4, in 5 ms and 112 ms (review 57a H2).
pub const EVENT_INTERVAL: u32 = 4;

/// A multi-thread runtime, one worker per core, with every driver.
pub fn build() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().event_interval(EVENT_INTERVAL).build()
}
