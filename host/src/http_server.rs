//! The HTTP API's server: accepts connections, at most `api.max_connections` at once, and
//! serves each with hyper's HTTP/1 under `api.read_timeout` for a request's headers (from the
//! moment the connection waits for them, so an idle kept-alive connection is closed too).
//!
//! Why not `axum::serve`: it runs hyper without a timer, so hyper's header-read timeout never
//! fires, and it accepts without bound. A client opening a thousand connections that never
//! finish their headers held a descriptor each until the host had none left: no plugin file
//! could be read, no compile child started, no broker reconnect made.
//!
//! Invariant: the server never holds more than `max_connections` connections; one past it waits
//! in the kernel's backlog until one ends. Dropping the serve future drops every connection.

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::sync::Arc;
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
    /// waits for them.
    pub header_read_timeout: Duration,
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
            Err(e) => {
                // Out of descriptors (EMFILE) or a connection reset before it was taken: not the
                // listener's end. Wait a moment rather than spin.
                tracing::warn!(error = %e, "HTTP API: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = TowerToHyperService::new(app.clone());
        let mut closing = closing_seen.clone();
        connections.spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(bounds.header_read_timeout);
            let connection = builder.serve_connection(TokioIo::new(stream), service);
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
    let _ = closing.send(true);
    while connections.join_next().await.is_some() {}
}
