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

/// How long a consumer waits to be narrowed while nothing it holds moves (its ack floor and
/// what it delivered stay where they were; looks that fail count as such): past the longest a
/// delivery is held by default (a 15-minute wait for open circuit breakers, kept alive with
/// `in-progress`) and a redelivery after it. A backlog being worked through keeps it waiting. A
/// message of a left subject still unsettled then is dropped from the consumer by the narrowing,
/// and an interest stream deletes it with what of the left subjects it never delivered (a
/// warning names how many are pending).
const WAIT_AT_MOST: Duration = Duration::from_secs(20 * 60);

/// How long a narrowing the server refused waits before it is asked again; the longest wait
/// between tries to read what a stream stored.
const AGAIN_AFTER: Duration = Duration::from_secs(5);

/// After this long unable to read what a stream stored, a warning says so (and again each time as
/// long).
const WARN_AFTER: Duration = Duration::from_secs(60);

/// A consumer a change left wide: the spec it is to be narrowed to, and the filters that takes
/// away.
pub(super) struct Narrow {
    /// The consumer after the change.
    pub(super) spec: ConsumerSpec,
    /// The filters it has now that `spec` leaves.
    pub(super) left: Vec<String>,
    /// What its stream stored before the change ([`boundary`]), once read.
    pub(super) before: Option<u64>,
}

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
        narrow: Vec<Narrow>,
    ) -> Self {
        let js = js.clone();
        let task = tokio::spawn(async move {
            // Every stream's boundary first (those the change could not read): until it is known,
            // the filter takes every message of a left subject there.
            let mut boundaries = Vec::with_capacity(narrow.len());
            for n in &narrow {
                boundaries.push(match n.before {
                    Some(before) => before,
                    None => stored_before(&js, &filter, &n.spec).await,
                });
            }
            let narrow = narrow.into_iter().map(|n| n.spec);
            for (spec, before) in narrow.into_iter().zip(boundaries) {
                let floor = wait_until_settled(&js, &filter, &spec, before).await;
                if !narrowed(&js, &feeds, id, generation, &filter, spec, floor).await {
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
    let (mut failing_since, mut wait) = (Instant::now(), LOOK_EVERY);
    loop {
        match boundary(js, spec).await {
            Ok(last) => {
                filter.retiring_before(&spec.stream, last);
                return last;
            }
            Err(e) if failing_since.elapsed() >= WARN_AFTER => {
                failing_since = Instant::now();
                tracing::warn!(plugin = %filter.plugin, stream = %spec.stream, consumer = %spec.name,
                    "cannot read what the stream stored before the plugin's change ({e}): its consumer keeps the \
                     filters the change left, and every message of theirs is taken, until it can");
            }
            Err(e) => {
                tracing::debug!(plugin = %filter.plugin, stream = %spec.stream, "reading the stream's last sequence: {e}")
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(AGAIN_AFTER);
    }
}

/// What [`stored_before`] reads, once (a change reads it as soon as the feed took the new
/// patterns: what is stored between the two is taken as stored before).
pub(super) async fn boundary(js: &jetstream::Context, spec: &ConsumerSpec) -> Result<u64, String> {
    let mut stream = js.get_stream(&spec.stream).await.map_err(|e| e.to_string())?;
    let info = stream.consumer_info(&spec.name).await.map_err(|e| e.to_string())?;
    Ok(match info.num_pending {
        0 => info.delivered.stream_sequence,
        _ => stream.info().await.map_err(|e| e.to_string())?.state.last_sequence,
    })
}

/// Waits until the consumer holds nothing stored at or below `before` ([`Settled::up_to`]), or
/// nothing it holds moved for [`WAIT_AT_MOST`]; answers its ack floor as last seen (where a
/// consumer deleted meanwhile is made again from).
async fn wait_until_settled(js: &jetstream::Context, filter: &Filter, spec: &ConsumerSpec, before: u64) -> Option<u64> {
    let started = Instant::now();
    let (mut told, mut last, mut moved_at): (bool, Option<Settled>, Instant) = (false, None, Instant::now());
    loop {
        let state = match js.get_stream_no_info(&spec.stream).await {
            Ok(stream) => {
                stream.consumer_info(&spec.name).await.map(|info| Settled::of(&info)).map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        if let Ok(state) = &state
            && last.is_none_or(|last| (last.floor, last.delivered) != (state.floor, state.delivered))
        {
            (last, moved_at) = (Some(*state), Instant::now());
        }
        match state {
            Ok(state) if state.up_to(before) => return Some(state.floor),
            _ if moved_at.elapsed() >= WAIT_AT_MOST => {
                tracing::warn!(plugin = %filter.plugin, stream = %spec.stream, consumer = %spec.name,
                    pending = last.map(|s| s.ack_pending), ack_floor = last.map(|s| s.floor), stored_before = before,
                    "narrowing the consumer: nothing it holds moved for {WAIT_AT_MOST:?} while it waited for what it \
                     stored before the change; a message of a subject the plugin left that is still unsettled is \
                     dropped from it (an interest stream deletes it)");
                return last.map(|s| s.floor);
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
/// feed still has this narrowing; asks again after a refusal. One deleted meanwhile is made
/// again from past `floor`, its ack floor as last seen. `false`: the feed or this narrowing is
/// gone.
async fn narrowed(
    js: &jetstream::Context,
    feeds: &Weak<tokio::sync::Mutex<HashMap<u64, Feed>>>,
    id: u64,
    generation: u64,
    filter: &Filter,
    spec: ConsumerSpec,
    floor: Option<u64>,
) -> bool {
    loop {
        let Some(feeds) = feeds.upgrade() else { return false };
        let mut feeds = feeds.lock().await;
        let Some(feed) =
            feeds.get_mut(&id).filter(|feed| feed.narrowing.as_ref().is_some_and(|n| n.generation == generation))
        else {
            return false;
        };
        match consumer::ensure_from(js, &spec, floor.map(|floor| floor + 1)).await {
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
    /// The stream sequence it delivered last.
    delivered: u64,
}

impl Settled {
    fn of(info: &jetstream::consumer::Info) -> Self {
        Self {
            floor: info.ack_floor.stream_sequence,
            ack_pending: info.num_ack_pending as u64,
            not_delivered: info.num_pending,
            delivered: info.delivered.stream_sequence,
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
        let state = |floor, ack_pending, not_delivered| Settled { floor, ack_pending, not_delivered, delivered: floor };
        assert!(state(10, 3, 5).up_to(10), "the floor at the sequence");
        assert!(!state(9, 1, 0).up_to(10), "one pending at or below it");
        assert!(!state(9, 0, 1).up_to(10), "one not delivered yet");
        assert!(state(4, 0, 0).up_to(10), "nothing held: what the filters skip leaves the floor behind");
    }
}
