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
//! in the kernel's backlog until one ends. No connection waits on its client for longer than
//! `read_timeout` (a reply a route waits for, as `POST /v1/request` does, is not the client's
//! wait). Dropping the serve future drops every connection.

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
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
    /// How long a client has to send a request's headers, counted from when the connection
    /// waits for them; and how long a write may wait for the client to take it.
    pub read_timeout: Duration,
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets the open connections finish
/// their requests (each is told to close after the one in progress) and returns when they have.
pub async fn serve(listener: TcpListener, app: axum::Router, bounds: Bounds, shutdown: impl Future<Output = ()>) {
    let slots = Arc::new(Semaphore::new(bounds.max_connections.max(1)));
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
        let service = TowerToHyperService::new(app.clone());
        let mut closing = closing_seen.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(bounds.read_timeout);
            let io = WriteStallBound { inner: TokioIo::new(stream), limit: bounds.read_timeout, stalled: None };
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
            drop(slot);
        });
    }
    // No more connections: the kernel stops taking them for a server that is stopping.
    drop(listener);
    let _ = closing.send(true);
    while connections.join_next().await.is_some() {}
}

/// Errors of one connection, not of the listener (as `axum::serve` reads them).
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused | io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset
    )
}

/// A connection whose writes may wait for the client at most `limit` without any progress: then
/// the write fails with `TimedOut`, and hyper closes the connection. hyper has no write timeout,
/// and while a response waits to be written it reads no further request, so its header timeout
/// never starts: a client pipelining requests and never reading their answers (or a tail's
/// client that stopped reading) held its connection, and its slot, for ever.
struct WriteStallBound<T> {
    inner: T,
    limit: Duration,
    /// Since when writes have made no progress (armed at the first write left pending).
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteStallBound<T> {
    /// A write is pending: `Ready(error)` once it has been for `limit`, else `Pending` (the
    /// timer wakes the task then).
    fn still_stalled(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let limit = self.limit;
        let stalled = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stalled.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took nothing written to it for {limit:?} (api.read_timeout)"),
            )),
            Poll::Pending => Poll::Pending,
        }
    }

    /// What a write or flush answered, with the stall bound applied.
    fn bounded<R>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<R>>) -> Poll<io::Result<R>> {
        match polled {
            Poll::Pending => self.still_stalled(cx).map(Err),
            ready => {
                self.stalled = None;
                ready
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
        self.bounded(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.bounded(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.bounded(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
