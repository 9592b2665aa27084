//! Dispatch: runs one delivery through one plugin and settles it.
//!
//! It owns what happens around the handler: the event size check, kv commit (and re-running
//! on a kv conflict), releasing outputs only after success, and acking. Invariant: every
//! delivery ends in exactly one of ack (handled) or term (failed, reported); nothing is
//! dropped without a log line naming plugin, subject and event id.

use crate::sandbox::{Failure, Plugin};
use crate::transport::{Delivery, Transport};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// How often an attempt is re-run when another event changed the kv keys it read.
const MAX_KV_CONFLICT_RERUNS: u32 = 100;

/// Counters for one plugin, shown in `/v1/plugins`.
#[derive(Debug, Default)]
pub struct PluginStats {
    /// Deliveries received.
    pub received: AtomicU64,
    /// Handled with Ok, outputs released.
    pub ok: AtomicU64,
    /// Failed (after the last attempt).
    pub failed: AtomicU64,
    /// Handler runs, including re-runs after kv conflicts.
    pub attempts: AtomicU64,
    /// Deliveries being handled now.
    pub in_flight: AtomicU64,
}

/// How a delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Handled; this many outputs were released.
    Handled(usize),
    /// Not handled, with the reason.
    Failed(Failure),
}

/// Runs `delivery` through `plugin` and settles it with the transport.
pub async fn deliver(
    plugin: &Plugin,
    delivery: Delivery,
    transport: &Arc<dyn Transport>,
    stats: &PluginStats,
) -> Outcome {
    stats.received.fetch_add(1, Ordering::Relaxed);
    stats.in_flight.fetch_add(1, Ordering::Relaxed);
    let outcome = run(plugin, &delivery, transport, stats).await;
    stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    let ev = &delivery.event;
    match &outcome {
        Outcome::Handled(outputs) => {
            stats.ok.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(plugin = plugin.name(), subject = %ev.subject, event_id = %ev.id, outputs, "handled");
            delivery.acker.ack().await;
        }
        Outcome::Failed(failure) => {
            stats.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(plugin = plugin.name(), subject = %ev.subject, event_id = %ev.id, "event failed: {failure}");
            delivery.acker.term().await;
        }
    }
    outcome
}

async fn run(
    plugin: &Plugin,
    delivery: &Delivery,
    transport: &Arc<dyn Transport>,
    stats: &PluginStats,
) -> Outcome {
    let ev = &delivery.event;
    let max = plugin.limits().max_event_bytes;
    if ev.data.len() as u64 > max {
        return Outcome::Failed(Failure::Reject(format!(
            "event of {} bytes is over the {max}-byte limit",
            ev.data.len()
        )));
    }
    let mut reruns = 0;
    loop {
        stats.attempts.fetch_add(1, Ordering::Relaxed);
        let attempt = plugin.handle(ev, 1).await;
        if let Err(failure) = attempt.result {
            return Outcome::Failed(failure);
        }
        match plugin.commit(&attempt.txn) {
            Ok(()) => {}
            Err(crate::kv::KvError::Conflict(key)) if reruns < MAX_KV_CONFLICT_RERUNS => {
                reruns += 1;
                tracing::debug!(plugin = plugin.name(), event_id = %ev.id, key, "kv conflict, running again");
                continue;
            }
            Err(e) => return Outcome::Failed(Failure::Retry(e.to_string())),
        }
        let count = attempt.outputs.len();
        for (i, output) in attempt.outputs.into_iter().enumerate() {
            let out = output.into_event(ev, plugin.name(), i);
            let (subject, id) = (out.subject.clone(), out.id.clone());
            if let Err(e) = transport.publish(out).await {
                tracing::error!(plugin = plugin.name(), subject, event_id = id, caused_by = %ev.id, "output not published: {e}");
            }
        }
        return Outcome::Handled(count);
    }
}
