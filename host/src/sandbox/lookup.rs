//! DNS lookups for plugins' outbound calls, bounded until they return. `getaddrinfo` cannot be
//! cancelled: a lookup runs on a blocking thread to its end even when the call that asked for it
//! is dropped (a guest dropping its future, the attempt ending, the event's deadline). Bounded by
//! the call, a plugin that starts calls to a slow-resolving name and drops them would fill the
//! runtime's blocking pool, which dead letters, kv commits, reloads and NATS reconnects share.
//! So each lookup holds a permit of its plugin's and one of the host's until it returns.
//!
//! The host's permits are shared, but not all to anyone: of the last [`RESERVED`] a plugin holds
//! at most one, so plugins whose names resolve slowly (eight at their default
//! `max_outbound_concurrency` would hold all 64) leave every other plugin a lookup at a time.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Lookups in flight in the whole host (of the runtime's 512 blocking threads).
const HOST_LOOKUPS: usize = 64;

/// Of [`HOST_LOOKUPS`], those a plugin takes at most one of.
pub const RESERVED: usize = 16;

static HOST: LazyLock<Arc<HostLookups>> =
    LazyLock::new(|| Arc::new(HostLookups::new(HOST_LOOKUPS - RESERVED, RESERVED)));

/// The host's lookups in flight: `shared`, and `reserved` of which a plugin holds at most one.
pub struct HostLookups {
    shared: Arc<Semaphore>,
    reserved: Arc<Semaphore>,
}

impl HostLookups {
    /// `shared` permits, and `reserved` more of which a plugin holds at most one.
    pub fn new(shared: usize, reserved: usize) -> Self {
        Self { shared: Arc::new(Semaphore::new(shared)), reserved: Arc::new(Semaphore::new(reserved)) }
    }

    /// A permit for a plugin whose claim on a reserved one is `claim`: a shared one first, and
    /// a reserved one when the plugin holds none (its claim is then kept until the permit goes).
    async fn take(&self, claim: &Arc<AtomicBool>) -> Result<HostPermit, tokio::sync::AcquireError> {
        if let Ok(permit) = self.shared.clone().try_acquire_owned() {
            return Ok(HostPermit { _permit: permit, _claim: None });
        }
        let Some(claimed) = Claim::take(claim) else {
            let permit = self.shared.clone().acquire_owned().await?;
            return Ok(HostPermit { _permit: permit, _claim: None });
        };
        tokio::select! {
            biased;
            permit = self.shared.clone().acquire_owned() => Ok(HostPermit { _permit: permit?, _claim: None }),
            permit = self.reserved.clone().acquire_owned() => Ok(HostPermit { _permit: permit?, _claim: Some(claimed) }),
        }
    }
}

/// A plugin's claim on one reserved permit, given up when dropped (also by a lookup dropped while
/// it waits).
struct Claim(Arc<AtomicBool>);

impl Claim {
    fn take(claim: &Arc<AtomicBool>) -> Option<Self> {
        claim.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).ok().map(|_| Self(claim.clone()))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// A permit of the host's, with the plugin's claim when it is a reserved one.
struct HostPermit {
    _permit: OwnedSemaphorePermit,
    _claim: Option<Claim>,
}

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
pub struct Lookups {
    own: Arc<Semaphore>,
    /// Whether the plugin holds (or waits for) one of the host's reserved permits.
    reserve_claimed: Arc<AtomicBool>,
    host: Arc<HostLookups>,
}

impl Lookups {
    /// At most `n` (at least 1) lookups of the plugin's at once, within the host's.
    pub fn new(n: usize) -> Self {
        Self::within(n, HOST.clone())
    }

    /// [`Lookups::new`] within `host`'s permits instead of the host's own.
    pub fn within(n: usize, host: Arc<HostLookups>) -> Self {
        Self { own: Arc::new(Semaphore::new(n.max(1))), reserve_claimed: Default::default(), host }
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
        let own = self.own.clone().acquire_owned().await.map_err(closed)?;
        let host_permit = self.host.take(&self.reserve_claimed).await.map_err(closed)?;
        let held = (own, host_permit);
        admitted();
        let name = host.to_string();
        let found = tokio::task::spawn_blocking(move || {
            let _held = held;
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
    /// A name whose lookups wait until [`RELEASE`] is set.
    const BLOCKED: &str = "blocked.lookup.test";
    static RELEASE: std::sync::LazyLock<(std::sync::Mutex<bool>, std::sync::Condvar)> =
        std::sync::LazyLock::new(Default::default);
    static PEAK: AtomicUsize = AtomicUsize::new(0);

    pub(super) fn slow_answer(name: &str) -> Option<std::io::Result<Vec<SocketAddr>>> {
        if name == BLOCKED {
            let (lock, released) = &*RELEASE;
            let mut free = lock.lock().unwrap();
            while !*free {
                free = released.wait(free).unwrap();
            }
            return Some(Ok(Vec::new()));
        }
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

    /// Plugins whose names never resolve, at their limit, leave another plugin a lookup: of the
    /// reserved permits each takes one at most. Before, the first two took
    /// every permit of the host's and the third waited for one of theirs to return.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn plugins_whose_lookups_hang_leave_another_plugin_a_lookup() {
        // Every lookup that never returns is let go when the test ends, failed or not (the
        // runtime waits for its blocking threads as it shuts down).
        struct Release;
        impl Drop for Release {
            fn drop(&mut self) {
                let (lock, released) = &*RELEASE;
                *lock.lock().unwrap() = true;
                released.notify_all();
            }
        }
        let _release = Release;
        let host = Arc::new(HostLookups::new(4, 2));
        let admitted = Arc::new(AtomicUsize::new(0));
        let flood = |lookups: &Lookups, n: usize| {
            for _ in 0..n {
                let (lookups, admitted) = (lookups.clone(), admitted.clone());
                tokio::spawn(async move {
                    let _ = lookups
                        .resolve(BLOCKED, 443, || {
                            admitted.fetch_add(1, Ordering::SeqCst);
                        })
                        .await;
                });
            }
        };
        let reached = |n: usize| {
            let admitted = admitted.clone();
            async move {
                while admitted.load(Ordering::SeqCst) < n {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        };
        flood(&Lookups::within(4, host.clone()), 4);
        tokio::time::timeout(Duration::from_secs(2), reached(4)).await.expect("the first plugin's 4 admitted");
        flood(&Lookups::within(4, host.clone()), 4);
        tokio::time::timeout(Duration::from_secs(2), reached(5)).await.expect("the second plugin's first admitted");
        // Time for a second reserved permit to be taken, were one to be.
        tokio::time::sleep(Duration::from_millis(100)).await;
        let hung = admitted.load(Ordering::SeqCst);
        assert_eq!(hung, 5, "the second plugin took more than one reserved permit");
        let another = Lookups::within(4, host.clone());
        let admitted_too = tokio::time::timeout(Duration::from_secs(2), async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(async move {
                another
                    .resolve(BLOCKED, 443, move || {
                        let _ = tx.send(());
                    })
                    .await
            });
            rx.await
        })
        .await;
        assert!(admitted_too.is_ok(), "another plugin's lookup waited behind two plugins' hung ones");
    }
}
