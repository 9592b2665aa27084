//! The HTTP API's server: accepts connections, at most `api.max_connections` at once, and
//! serves each with hyper's HTTP/1 under `api.read_timeout` for a request's headers (from the
//! moment the connection waits for them, so an idle kept-alive connection is closed too), and
//! for a write the client does not take (it stopped reading: [`WriteStallBound`]).
//!
//! Why not `axum::serve`: it runs hyper without a timer, so hyper's header-read timeout never
//! fires, and it accepts without bound. A client opening a thousand connections that never
//! finish their headers held a descriptor each until the host had none left: no plugin file
//! could be read, no compile child started, no broker reconnect made.
//!
//! Invariant: the server never holds more than `max_connections` connections; one past it waits
//! in the kernel's backlog until one ends. One client address (an IPv6 client's /64) holds at
//! most `max_connections_per_peer` of them, and the last eighth go only to addresses holding
//! fewer than two: one more is answered `503` and closed at once, so neither one client nor a
//! handful can keep the others (and the health probes) waiting in that backlog. Refused
//! connections linger at most 200 ms, at most 32 at once (4 of one address's), holding no
//! slot. No connection waits on its client for longer than `read_timeout` (a reply a route
//! waits for, as `POST /v1/request` does, is not the client's wait). Dropping the serve future
//! drops every connection.

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

/// How the server bounds its clients (from `[api]`).
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Connections open at once.
    pub max_connections: usize,
    /// Connections one client address holds at once (at most `max_connections`).
    pub max_connections_per_peer: usize,
    /// How long a client has to send a request's headers, counted from when the connection
    /// waits for them; and how long a write may wait for the client to take it.
    pub read_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets the open connections finish
/// their requests (each is told to close after the one in progress) and returns when they have.
pub async fn serve(listener: TcpListener, app: axum::Router, bounds: Bounds, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(bounds.max_connections.max(1)));
    let peers = Arc::new(PeerShares::new(bounds.max_connections_per_peer.clamp(1, bounds.max_connections.max(1))));
    let refusals = Arc::new(Semaphore::new(REFUSALS_LINGERING));
    let reserve = bounds.max_connections / RESERVED_PART;
    let (closing, closing_seen) = watch::channel(false);
    let mut connections = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        // Reap what ended, so the set holds only live connections.
        while connections.try_join_next().is_some() {}
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            // A connection its client gave up on before it was taken: nothing to say.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                // Out of descriptors (EMFILE) or memory: not the listener's end. Wait, as
                // `axum::serve` does, rather than spin and log twenty times a second.
                tracing::error!(error = %e, "HTTP API: accepting a connection failed; trying again in 1 s");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // The last slots are kept for addresses holding few: a handful of addresses at their
        // share each cannot fill every slot (and stop `accept` for everyone else).
        let scarce = slots.available_permits() < reserve;
        let share = match peers.take(peer.ip(), scarce) {
            Ok(share) => share,
            Err(holds) => {
                refuse_over_share(stream, peer, holds, scarce, (&refusals, &peers));
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        let mut closing = closing_seen.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(bounds.read_timeout);
            let io = WriteStallBound::new(TokioIo::new(stream), bounds.read_timeout);
            let connection = builder.serve_connection(io, service);
            let mut connection = std::pin::pin!(connection);
            let mut told = false;
            loop {
                tokio::select! {
                    served = connection.as_mut() => {
                        if let Err(e) = served {
                            tracing::debug!(peer = %peer, error = %e, "HTTP API connection ended");
                        }
                        break;
                    }
                    changed = closing.changed(), if !told => {
                        told = true;
                        if changed.is_ok() {
                            connection.as_mut().graceful_shutdown();
                        }
                    }
                }
            }
            drop(share);
            drop(slot);
        });
    }
    // No more connections: the kernel stops taking them for a server that is stopping.
    drop(listener);
    let _ = closing.send(true);
    while connections.join_next().await.is_some() {}
}

/// How many connections each client address holds (see [`PeerShares::take`]), and how many of
/// its refused ones linger (see [`PeerShares::linger`]).
struct PeerShares {
    per_peer: usize,
    held: Arc<PerPeer>,
    lingering: Arc<PerPeer>,
}

/// A count per client address ([`peer_key`]): only addresses with a count are kept, so the map is
/// as large as what it counts at most.
#[derive(Default)]
struct PerPeer(Mutex<HashMap<IpAddr, usize>>);

impl PerPeer {
    /// One more for `key`, given back when the share is dropped, if `allowed` says yes to what it
    /// counts now; `Err`: that count.
    fn take(self: &Arc<Self>, key: IpAddr, allowed: impl FnOnce(usize) -> bool) -> Result<PeerShare, usize> {
        let mut counts = self.0.lock().expect("peer shares poisoned");
        let count = counts.get(&key).copied().unwrap_or(0);
        if !allowed(count) {
            return Err(count);
        }
        counts.insert(key, count + 1);
        Ok(PeerShare { counts: self.clone(), key })
    }
}

/// An IPv6 address counts by its /64 (one host's usual allocation, whose 2^64 addresses would
/// each get a share of their own), an IPv4-mapped one as IPv4.
fn peer_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from_bits(v6.to_bits() & !u128::from(u64::MAX))),
        v4 => v4,
    }
}

impl PeerShares {
    fn new(per_peer: usize) -> Self {
        Self { per_peer, held: Arc::default(), lingering: Arc::default() }
    }

    /// A refused connection of `ip`'s that may linger for its answer, until dropped; `None` when
    /// [`REFUSALS_LINGERING_PER_PEER`] of its address's linger already.
    fn linger(&self, ip: IpAddr) -> Option<PeerShare> {
        self.lingering.take(peer_key(ip), |lingering| lingering < REFUSALS_LINGERING_PER_PEER).ok()
    }

    /// A connection of `ip`'s, held until the share is dropped; `Err` (how many its address
    /// holds) when its address ([`peer_key`]) holds `per_peer` already, or, `scarce` (only the
    /// reserved slots are left), [`SCARCE_SHARE`].
    fn take(&self, ip: IpAddr, scarce: bool) -> Result<PeerShare, usize> {
        self.held.take(peer_key(ip), |holds| holds < self.per_peer && !(scarce && holds >= SCARCE_SHARE))
    }
}

/// One connection's part of its address's count ([`PerPeer`]); given back when dropped.
struct PeerShare {
    counts: Arc<PerPeer>,
    key: IpAddr,
}

impl Drop for PeerShare {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().expect("peer shares poisoned");
        if let Some(count) = counts.get_mut(&self.key) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.key);
            }
        }
    }
}

/// The part of `max_connections` kept for addresses holding fewer than [`SCARCE_SHARE`] (an
/// eighth: 64 of the default 512).
const RESERVED_PART: usize = 8;
/// What an address may hold and still get one of the reserved slots.
const SCARCE_SHARE: usize = 2;

/// Refused connections whose answer may linger at once (see [`refuse_over_share`]); past them a
/// refused connection is closed without one.
const REFUSALS_LINGERING: usize = 32;
/// Of those, what one address's may take: a client refused as fast as it can connect keeps the
/// others' refusals answered (it took all 32, and theirs were closed without a word).
const REFUSALS_LINGERING_PER_PEER: usize = 4;
/// How long a refused connection's answer lingers, and how much of its request is read meanwhile.
const REFUSAL_LINGER: Duration = Duration::from_millis(200);
const REFUSAL_READ_BYTES: usize = 16 << 10;

/// Answers a connection over its address's share `503` and closes it. Its request's head is read
/// (and thrown away) first, for at most [`REFUSAL_LINGER`] and [`REFUSAL_READ_BYTES`]: an answer
/// sent before the request is one an HTTP client refuses as unexpected, and a connection closed
/// with its request unread is reset, its answer lost. The answer is written only if the socket
/// takes it at once (nothing waits on this client). At most [`REFUSALS_LINGERING`] linger at
/// once, [`REFUSALS_LINGERING_PER_PEER`] of one address's, none of them holding a connection
/// slot: past them a refused connection is closed at once, so a client opening connections as
/// fast as it can is only closed faster.
fn refuse_over_share(
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    holds: usize,
    scarce: bool,
    (refusals, peers): (&Arc<Semaphore>, &Arc<PeerShares>),
) {
    tracing::debug!(peer = %peer, holds, scarce, "HTTP API connection refused: its address holds its share of connections");
    let Some(its_own) = peers.linger(peer.ip()) else { return };
    let Ok(lingering) = refusals.clone().try_acquire_owned() else { return };
    let body = if scarce {
        format!(
            "too many connections from this address: it holds {holds}, and the API's last free connections are \
             kept for clients holding fewer than {SCARCE_SHARE} (api.max_connections)\n"
        )
    } else {
        format!("too many connections from this address: it holds {holds} already (api.max_connections_per_peer)\n")
    };
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = stream;
        let deadline = tokio::time::Instant::now() + REFUSAL_LINGER;
        let (mut head, mut chunk) = (Vec::new(), [0u8; 4096]);
        let _ = tokio::time::timeout_at(deadline, async {
            while head.len() < REFUSAL_READ_BYTES {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        // Only what is new is looked at (with the 3 bytes before it), so a
                        // client trickling its head a byte at a time costs no rescans.
                        let from = head.len().saturating_sub(3);
                        head.extend_from_slice(&chunk[..n]);
                        if head[from..].windows(4).any(|w| w == b"\r\n\r\n") {
                            break;
                        }
                    }
                }
            }
        })
        .await;
        if stream.try_write(answer.as_bytes()).is_err() {
            return;
        }
        let _ = stream.shutdown().await;
        // What follows the head (a body) is read and thrown away until the client closes, or
        // the linger ends: closed with it unread, the connection would be reset under the answer.
        let mut read = head.len();
        let _ = tokio::time::timeout_at(deadline, async {
            while read < REFUSAL_READ_BYTES {
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => read += n,
                }
            }
        })
        .await;
        drop(lingering);
        drop(its_own);
    });
}

/// Errors of one connection, not of the listener (as `axum::serve` reads them).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// A connection whose writes may wait for the client at most `limit` while it takes less than
/// [`min_taken`]: then the write fails with `TimedOut`, and hyper closes the connection. hyper
/// has no write timeout, and while a response waits to be written it reads no further request,
/// so its header timeout never starts: a client pipelining requests and never reading their
/// answers (or a tail's client that stopped reading) held its connection, and its slot, for
/// ever.
///
/// Some progress is not enough (review 60c M1): a client reading a few KiB every half minute
/// held a 16 MiB dead-letter listing for hours, and the copying turn it is sent in. The time
/// writes wait on the client is summed (only while one waits: an idle keep-alive connection
/// runs no clock), and the sum starts again each time the client has taken [`min_taken`].
struct WriteStallBound<T> {
    inner: T,
    limit: Duration,
    /// The write waiting now: since when, and the timer that ends what is left of `limit`.
    waiting: Option<(std::time::Instant, Pin<Box<tokio::time::Sleep>>)>,
    /// The time writes waited on the client since it last took `min_taken`.
    waited: Duration,
    /// What it took since then.
    taken: usize,
    /// What it must take while writes wait on it `limit` ([`min_taken`]).
    min_taken: usize,
}

/// What a client must take while writes wait on it for `limit` (`api.read_timeout`): 8 KiB a
/// second of it, from 8 KiB to 256 KiB (240 KiB at the default 30 s): one rate whatever the limit.
fn min_taken(limit: Duration) -> usize {
    ((limit.as_secs_f64() * 8192.0) as usize).clamp(8 << 10, 256 << 10)
}

impl<T> WriteStallBound<T> {
    fn new(inner: T, limit: Duration) -> Self {
        Self { inner, limit, waiting: None, waited: Duration::ZERO, taken: 0, min_taken: min_taken(limit) }
    }

    /// A write or flush is pending: `Ready(error)` once writes have waited `limit` in all since
    /// the client last took `min_taken`, else `Pending` (the timer wakes the task then).
    fn still_stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let left = self.limit.saturating_sub(self.waited);
        let (_, timer) =
            self.waiting.get_or_insert_with(|| (std::time::Instant::now(), Box::pin(tokio::time::sleep(left))));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the client took {} of what was written to it while writes waited {:?} (api.read_timeout), \
                     less than {} bytes",
                    self.taken, self.limit, self.min_taken
                ),
            )),
            Poll::Pending => Poll::Pending,
        }
    }

    /// A write or flush went through, taking `n` bytes: the wait (if one) ends and counts.
    fn went(&mut self, n: usize) {
        if let Some((since, _)) = self.waiting.take() {
            self.waited += since.elapsed();
        }
        self.taken += n;
        if self.taken >= self.min_taken {
            (self.waited, self.taken) = (Duration::ZERO, 0);
        }
    }

    /// What a write answered, with the bound applied.
    fn bounded_write(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        match polled {
            Poll::Pending => self.still_stalled(cx).map(Err),
            Poll::Ready(Ok(n)) => {
                self.went(n);
                Poll::Ready(Ok(n))
            }
            failed => failed,
        }
    }

    /// What a flush answered, with the bound applied.
    fn bounded_flush(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<()>>) -> Poll<io::Result<()>> {
        match polled {
            Poll::Pending => self.still_stalled(cx).map(Err),
            done => {
                self.went(0);
                done
            }
        }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for WriteStallBound<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for WriteStallBound<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.bounded_write(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bounded_write(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.bounded_flush(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod write_stall_tests {
    use super::*;

    /// Review 60e L2: a fixed 256 KiB per `api.read_timeout` asked 256 KiB/s of a client at 1 s.
    #[test]
    fn the_least_a_client_must_take_is_one_rate_whatever_the_limit() {
        assert_eq!(min_taken(Duration::from_secs(30)), 240 << 10);
        assert_eq!(min_taken(Duration::from_secs(60)), 256 << 10);
        assert_eq!(min_taken(Duration::from_secs(2)), 16 << 10);
        assert_eq!(min_taken(Duration::from_millis(100)), 8 << 10);
    }
}
