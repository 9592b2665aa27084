//! DNS lookups for plugins' outbound calls, bounded until they return. `getaddrinfo` cannot be
//! cancelled: a lookup runs on a blocking thread to its end even when the call that asked for it
//! is dropped (a guest dropping its future, the attempt ending, the event's deadline). Bounded by
//! the call, a plugin that starts calls to a slow-resolving name and drops them would fill the
//! runtime's blocking pool, which dead letters, kv commits, reloads and NATS reconnects share.
//! So each lookup holds a permit of its plugin's and one of the host's until it returns.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::{Arc, LazyLock};
use tokio::sync::Semaphore;

/// Lookups in flight in the whole host (of the runtime's 512 blocking threads).
const HOST_LOOKUPS: usize = 64;

static HOST: LazyLock<Arc<Semaphore>> = LazyLock::new(|| Arc::new(Semaphore::new(HOST_LOOKUPS)));

/// Why a lookup gave no addresses.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// The resolver's answer: no such name, no server reachable.
    #[error("{0}")]
    Resolver(#[from] std::io::Error),
    /// The lookup's thread ended without an answer (the runtime shutting down).
    #[error("the DNS lookup did not finish: {0}")]
    Host(String),
}

/// One plugin's lookups in flight: at most its `max_outbound_concurrency`.
#[derive(Clone)]
pub struct Lookups(Arc<Semaphore>);

impl Lookups {
    /// At most `n` (at least 1) lookups of the plugin's at once.
    pub fn new(n: usize) -> Self {
        Self(Arc::new(Semaphore::new(n.max(1))))
    }

    /// Resolves `host:port`. Waits (in the host, not at the destination) for a permit of the
    /// plugin's and one of the host's, calls `admitted` once it has them, and keeps them until
    /// the resolver returns, whether or not this future is still awaited then.
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
        admitted: impl FnOnce(),
    ) -> Result<Vec<SocketAddr>, LookupError> {
        let closed = |_| LookupError::Host("closed".into());
        let plugins = self.0.clone().acquire_owned().await.map_err(closed)?;
        let hosts = HOST.clone().acquire_owned().await.map_err(closed)?;
        admitted();
        let name = host.to_string();
        let found = tokio::task::spawn_blocking(move || {
            let _held = (plugins, hosts);
            #[cfg(test)]
            if let Some(answer) = tests::slow_answer(&name) {
                return answer;
            }
            (name.as_str(), port).to_socket_addrs().map(Iterator::collect)
        });
        found.await.map_err(|e| LookupError::Host(e.to_string()))?.map_err(LookupError::from)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A name whose lookup takes 300 ms and finds nothing, counted in flight.
    const SLOW: &str = "slow.lookup.test";
    static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);
    static PEAK: AtomicUsize = AtomicUsize::new(0);

    pub(super) fn slow_answer(name: &str) -> Option<std::io::Result<Vec<SocketAddr>>> {
        if name != SLOW {
            return None;
        }
        let now = IN_FLIGHT.fetch_add(1, Ordering::SeqCst) + 1;
        PEAK.fetch_max(now, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        IN_FLIGHT.fetch_sub(1, Ordering::SeqCst);
        Some(Ok(Vec::new()))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_dropped_calls_lookup_holds_its_plugins_permit_until_it_returns() {
        let lookups = Lookups::new(2);
        // Twenty calls, each dropped 10 ms after it began (a guest dropping its future).
        for _ in 0..20 {
            let lookups = lookups.clone();
            let call = tokio::spawn(async move { lookups.resolve(SLOW, 443, || {}).await });
            tokio::time::sleep(Duration::from_millis(10)).await;
            call.abort();
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        let peak = PEAK.load(Ordering::SeqCst);
        assert!(peak <= 2, "{peak} lookups of one plugin ran at once, past its 2");
        assert_eq!(IN_FLIGHT.load(Ordering::SeqCst), 0);
        // And its permits came back: a lookup after them goes through.
        let found = tokio::time::timeout(Duration::from_secs(2), lookups.resolve(SLOW, 443, || {})).await;
        assert!(found.expect("the plugin's permits never came back").unwrap().is_empty());
    }
}
