//! The second half of a retarget: a durable consumer the change widened to both versions'
//! filters is narrowed to the new ones only once every message it stored before the change is
//! settled. Narrowed earlier, the server drops from the consumer a message of a subject it
//! leaves that waits for a retry (a `nak` with a delay) or is still running, and an interest
//! stream deletes it: never run again, never dead-lettered. Until then the feed takes those
//! messages as the plugin's ([`Filter::retire`]), and a retry runs on the version serving.

use super::consumer::{self, ConsumerSpec};
use super::{Feed, Filter, Task};
use async_nats::jetstream;
use std::collections::HashMap;
use std::sync::Weak;
use std::time::{Duration, Instant};

/// How often a consumer waiting to be narrowed is looked at.
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// How long a consumer waits to be narrowed at most: past the longest a delivery is held by
/// default (a 15-minute wait for open circuit breakers, kept alive with `in-progress`) and a
/// redelivery after it. A message of a left subject still unsettled then is dropped from the
/// consumer by the narrowing (a warning names how many are pending).
const WAIT_AT_MOST: Duration = Duration::from_secs(20 * 60);

/// How long a narrowing the server refused waits before it is asked again.
const AGAIN_AFTER: Duration = Duration::from_secs(5);

/// The narrowing of the consumers one retarget widened, running until they are narrowed (or the
/// next retarget, or the feed's end, replaces it).
pub(super) struct Narrowing {
    /// Which retarget's narrowing this is: the task narrows only while its feed still has it.
    generation: u64,
    _task: Task,
}

impl Narrowing {
    /// Narrows each consumer to `narrow` (its spec after the change) once it is settled: the
    /// feed `id` of `feeds` is looked up (under its lock, as a retarget is) for each change.
    pub(super) fn start(
        js: &jetstream::Context,
        feeds: Weak<tokio::sync::Mutex<HashMap<u64, Feed>>>,
        id: u64,
        generation: u64,
        filter: Filter,
        narrow: Vec<ConsumerSpec>,
    ) -> Self {
        let js = js.clone();
        let task = tokio::spawn(async move {
            for spec in narrow {
                let before = stored_before(&js, &filter, &spec).await;
                wait_until_settled(&js, &filter, &spec, before).await;
                if !narrowed(&js, &feeds, id, generation, &filter, spec).await {
                    return;
                }
            }
        });
        Self { generation, _task: Task(task) }
    }
}

/// The last sequence the stream stored before the change (the feed took the new patterns
/// before this runs) that the consumer may hold: the last it delivered, when it has nothing left
/// to deliver (its ack floor does not move past later messages its filters skip until it settles
/// a later one, which may be a message the new version gives back, again and again), else the
/// stream's last. Told to the filter, which takes every message of a left subject until it knows.
async fn stored_before(js: &jetstream::Context, filter: &Filter, spec: &ConsumerSpec) -> u64 {
    loop {
        let read = async {
            let mut stream = js.get_stream(&spec.stream).await.map_err(|e| e.to_string())?;
            let info = stream.consumer_info(&spec.name).await.map_err(|e| e.to_string())?;
            Ok::<_, String>(match info.num_pending {
                0 => info.delivered.stream_sequence,
                _ => stream.info().await.map_err(|e| e.to_string())?.state.last_sequence,
            })
        };
        match read.await {
            Ok(last) => {
                filter.retiring_before(&spec.stream, last);
                return last;
            }
            Err(e) => {
                tracing::debug!(plugin = %filter.plugin, stream = %spec.stream, "reading the stream's last sequence: {e}");
                tokio::time::sleep(LOOK_EVERY).await;
            }
        }
    }
}

/// Waits until the consumer holds nothing stored at or below `before` ([`Settled::up_to`]), or
/// [`WAIT_AT_MOST`].
async fn wait_until_settled(js: &jetstream::Context, filter: &Filter, spec: &ConsumerSpec, before: u64) {
    let started = Instant::now();
    let mut told = false;
    loop {
        let state = match js.get_stream_no_info(&spec.stream).await {
            Ok(stream) => {
                stream.consumer_info(&spec.name).await.map(|info| Settled::of(&info)).map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        match state {
            Ok(state) if state.up_to(before) => return,
            Ok(state) if started.elapsed() >= WAIT_AT_MOST => {
                tracing::warn!(plugin = %filter.plugin, stream = %spec.stream, consumer = %spec.name,
                    pending = state.ack_pending, ack_floor = state.floor, stored_before = before,
                    "narrowing the consumer after waiting {WAIT_AT_MOST:?} for what it stored before the change: \
                     a message of a subject the plugin left that is still unsettled is dropped from it (an interest \
                     stream deletes it)");
                return;
            }
            Ok(state) if !told && started.elapsed() >= Duration::from_secs(5) => {
                told = true;
                tracing::info!(plugin = %filter.plugin, stream = %spec.stream, consumer = %spec.name,
                    pending = state.ack_pending, ack_floor = state.floor, stored_before = before,
                    "the consumer keeps the filters the change left until what it stored before the change is settled");
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(plugin = %filter.plugin, stream = %spec.stream, "looking at the consumer: {e}"),
        }
        tokio::time::sleep(LOOK_EVERY).await;
    }
}

/// Sets the consumer to `spec` and its pump's spec with it, under the feeds' lock, while the
/// feed still has this narrowing; asks again after a refusal. `false`: the feed or this
/// narrowing is gone.
async fn narrowed(
    js: &jetstream::Context,
    feeds: &Weak<tokio::sync::Mutex<HashMap<u64, Feed>>>,
    id: u64,
    generation: u64,
    filter: &Filter,
    spec: ConsumerSpec,
) -> bool {
    loop {
        let Some(feeds) = feeds.upgrade() else { return false };
        let mut feeds = feeds.lock().await;
        let Some(feed) =
            feeds.get_mut(&id).filter(|feed| feed.narrowing.as_ref().is_some_and(|n| n.generation == generation))
        else {
            return false;
        };
        match consumer::ensure(js, &spec).await {
            Ok(_) => {
                tracing::info!(plugin = %filter.plugin, stream = %spec.stream, consumer = %spec.name, filters = ?spec.filters,
                    "durable JetStream consumer narrowed: what it stored before the change is settled");
                if let Some(pump) = feed.durable.get(&spec.stream).filter(|pump| pump.spec().name == spec.name) {
                    *pump.spec.write().expect("spec poisoned") = spec.clone();
                }
                filter.narrowed(&spec.stream);
                return true;
            }
            Err(e) => {
                tracing::warn!(plugin = %filter.plugin, stream = %spec.stream, consumer = %spec.name,
                    "narrowing the consumer to the new version's filters: {e}; it keeps both versions' (a message only the \
                     older takes is given back) and is asked again in {AGAIN_AFTER:?}");
                drop(feeds);
                tokio::time::sleep(AGAIN_AFTER).await;
            }
        }
    }
}

/// What the consumer holds unsettled, as its info says.
#[derive(Debug, Clone, Copy)]
struct Settled {
    /// Every message stored at or below it is settled (the ack floor's stream sequence).
    floor: u64,
    /// Delivered and not settled.
    ack_pending: u64,
    /// Matching its filters and not delivered yet.
    not_delivered: u64,
}

impl Settled {
    fn of(info: &jetstream::consumer::Info) -> Self {
        Self {
            floor: info.ack_floor.stream_sequence,
            ack_pending: info.num_ack_pending as u64,
            not_delivered: info.num_pending,
        }
    }

    /// Whether nothing stored at or below `before` is unsettled. The ack floor moves past a
    /// stretch the consumer's filters skip only with a later delivery or settlement, so a
    /// consumer holding nothing at all is settled too.
    fn up_to(self, before: u64) -> bool {
        self.floor >= before || (self.ack_pending == 0 && self.not_delivered == 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_is_settled_up_to_a_sequence_once_its_floor_passes_it_or_it_holds_nothing() {
        let state = |floor, ack_pending, not_delivered| Settled { floor, ack_pending, not_delivered };
        assert!(state(10, 3, 5).up_to(10), "the floor at the sequence");
        assert!(!state(9, 1, 0).up_to(10), "one pending at or below it");
        assert!(!state(9, 0, 1).up_to(10), "one not delivered yet");
        assert!(state(4, 0, 0).up_to(10), "nothing held: what the filters skip leaves the floor behind");
    }
}
