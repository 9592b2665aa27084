//! Dead letters as JetStream keeps them: the `PLUGBUS_DLQ` stream (`plugbus.dlq.>`) holds the
//! dead letters of every host attached to the broker, so `plugbus dlq list|replay` reads them
//! from there, not from one host's memory, and they survive any host's restart.

use super::wire;
use crate::deadletter::{Entry, headers};
use crate::transport::{KeptPage, TransportError};
use async_nats::jetstream;
use async_nats::jetstream::message::StreamMessage;

/// The stream the host creates for dead letters (see `streams.rs`).
pub const STREAM: &str = "PLUGBUS_DLQ";
/// What it captures.
const SUBJECTS: &str = "plugbus.dlq.>";
/// The most bytes of dead letters one listing reads (as the host's own store): payload,
/// headers and [`crate::kv::ENTRY_COST`] per message and per header.
const MAX_BYTES: usize = crate::deadletter::DEFAULT_MAX_BYTES;
/// The most messages one listing reads and passes over (not an event, or not a dead letter of
/// the host's: no `plugbus-plugin`, another plugin's under a plugin's subject) before it stops:
/// anyone who may publish on `plugbus.dlq.*` could otherwise make every listing walk a million
/// of them, one request each.
const MAX_PASSED_OVER: usize = 1_000;

/// What a message read from the stream costs a listing: its payload and headers, each header
/// and the message charged [`crate::kv::ENTRY_COST`] on top (a million empty headers are not
/// free).
fn message_cost(headers: &async_nats::HeaderMap, payload: usize) -> usize {
    let entry = crate::kv::ENTRY_COST as usize;
    let headers: usize = headers
        .iter()
        .flat_map(|(name, values)| values.iter().map(move |v| AsRef::<str>::as_ref(name).len() + v.as_str().len()))
        .map(|bytes| bytes + entry)
        .sum();
    entry + payload + headers
}

/// The stream, or `None` when the broker keeps none (no durable plugin ever dead-lettered
/// here, or JetStream is off on this server or account).
async fn stream(js: &jetstream::Context) -> Result<Option<jetstream::stream::Stream>, TransportError> {
    use jetstream::ErrorCode;
    use jetstream::context::GetStreamErrorKind;
    match js.get_stream(STREAM).await {
        Ok(s) => Ok(Some(s)),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j)
                if [
                    ErrorCode::STREAM_NOT_FOUND,
                    ErrorCode::JETSTREAM_NOT_ENABLED,
                    ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT,
                ]
                .contains(&j.error_code()) =>
            {
                Ok(None)
            }
            // No JetStream answers on this server at all.
            GetStreamErrorKind::Request if e.to_string().contains("does not exist") => Ok(None),
            _ => Err(TransportError::Broker(format!("reading the {STREAM} stream: {e}"))),
        },
    }
}

/// The dead-letter subjects the operator set (`[plugins.<plugin>] dead_letter`), by plugin: any
/// other plugin's are `plugbus.dlq.<plugin>`.
pub type Subjects = std::collections::HashMap<String, String>;

/// Where `plugin`'s dead letters are published: the subject the operator set, or
/// `plugbus.dlq.<plugin>`.
fn subject_of(plugin: &str, subjects: &Subjects) -> String {
    subjects.get(plugin).cloned().unwrap_or_else(|| format!("{}{plugin}", crate::subject::DEAD_LETTER_PREFIX))
}

/// Up to `limit` dead letters the stream keeps (of `plugin`, when given), oldest first, and
/// whether that is all it keeps; each entry's `seq` is its stream sequence number. `None` when
/// there is no stream.
pub async fn list(
    js: &jetstream::Context,
    plugin: Option<&str>,
    limit: usize,
    subjects: &Subjects,
) -> Result<Option<KeptPage>, TransportError> {
    let Some(stream) = stream(js).await? else { return Ok(None) };
    let subject = plugin.map_or_else(|| SUBJECTS.to_string(), |p| subject_of(p, subjects));
    let (mut out, mut bytes, mut next, mut passed_over) = (Vec::new(), 0usize, 1u64, 0usize);
    let mut complete = false;
    while out.len() < limit && bytes < MAX_BYTES {
        if passed_over >= MAX_PASSED_OVER {
            tracing::warn!(
                stream = STREAM,
                seq = next,
                "listing dead letters stopped: {passed_over} messages read \
                were not dead letters of this host's plugins (someone else publishes on {SUBJECTS}); later ones are \
                still kept, not listed"
            );
            break;
        }
        let Some(msg) = first_from(&stream, &subject, next).await? else {
            complete = true;
            break;
        };
        next = msg.sequence + 1;
        bytes += message_cost(&msg.headers, msg.payload.len());
        match entry_of(msg, plugin, subjects) {
            Some(entry) => out.push(entry),
            None => passed_over += 1,
        }
    }
    Ok(Some(KeptPage { entries: out, complete }))
}

/// The newest `limit` dead letters the stream keeps (of `plugin`, when given), oldest first,
/// and how many messages it keeps under their subject; `None` when there is no stream. When it
/// keeps no more than `limit` there, they are read as [`list`] reads them (the server skips
/// other subjects); otherwise from the newest back, one message a request, so a page costs
/// about `limit` requests however many the stream keeps (the dashboard asks for its page every
/// 2 s: read oldest first, that was up to 10,000 requests and 64 MiB each time, and past 10,000
/// the newest were never listed). Read back, it stops at [`MAX_BYTES`], and after
/// [`MAX_PASSED_OVER`] sequence numbers that hold nothing it lists (removed by a replay,
/// another plugin's, not a dead letter).
pub async fn newest(
    js: &jetstream::Context,
    plugin: Option<&str>,
    limit: usize,
    subjects: &Subjects,
) -> Result<Option<(Vec<Entry>, usize)>, TransportError> {
    let Some(mut stream) = stream(js).await? else { return Ok(None) };
    let broker = |what: &str, e: &dyn std::fmt::Display| TransportError::Broker(format!("{what} {STREAM}: {e}"));
    let state = stream.info().await.map_err(|e| broker("reading the state of", &e))?.state.clone();
    let subject = plugin.map(|p| subject_of(p, subjects));
    let total = match &subject {
        None => state.messages as usize,
        Some(subject) => {
            use futures::TryStreamExt;
            let mut counts = stream.info_with_subjects(subject).await.map_err(|e| broker("counting in", &e))?;
            let mut total = 0;
            while let Some((counted, n)) = counts.try_next().await.map_err(|e| broker("counting in", &e))? {
                if counted == *subject {
                    total += n;
                }
            }
            total
        }
    };
    if total <= limit {
        return Ok(list(js, plugin, limit, subjects).await?.map(|all| (all.entries, total)));
    }
    let (mut out, mut bytes, mut passed_over) = (Vec::new(), 0usize, 0usize);
    let mut seq = state.last_sequence;
    while out.len() < limit && bytes < MAX_BYTES && seq >= state.first_sequence.max(1) {
        if passed_over >= MAX_PASSED_OVER {
            tracing::warn!(
                stream = STREAM,
                seq,
                "listing the newest dead letters stopped: {passed_over} sequence \
                numbers read back held no dead letter listed here (removed, another plugin's, or not one); older \
                ones are still kept, not listed"
            );
            break;
        }
        let at = seq;
        seq -= 1;
        let Some(msg) = message_at(&stream, at).await? else {
            passed_over += 1;
            continue;
        };
        if subject.as_ref().is_some_and(|s| *s != msg.subject.as_str()) {
            passed_over += 1;
            continue;
        }
        bytes += message_cost(&msg.headers, msg.payload.len());
        match entry_of(msg, plugin, subjects) {
            Some(entry) => out.push(entry),
            None => passed_over += 1,
        }
    }
    out.reverse();
    Ok(Some((out, total)))
}

/// How many messages [`find`] reads back from the newest before it gives up: as many as the
/// listings ever show, one message held at a time.
const MAX_FIND: usize = 10_000;

/// The dead letter whose (dead-letter event) id is `id`, one message held at a time: read back
/// from the newest (at most [`MAX_FIND`] sequence numbers: what the listing of the newest shows),
/// then from the oldest on under the dead-letter subjects (at most [`MAX_FIND`] messages: what a
/// plugin's listing of its few shows, oldest first). (It was looked for among the oldest 10,000
/// only, all held at once: one the dashboard listed was not found, and a replay by id took this
/// host's copy and left the broker's, to be replayed again later.) `None` when not found or
/// there is no stream; an error when not found in what was read and the stream keeps more,
/// between the two (review 62c F1: a replay by id then took this host's copy, and left the
/// broker's to be replayed again).
pub async fn find(js: &jetstream::Context, id: &str, subjects: &Subjects) -> Result<Option<Entry>, TransportError> {
    let Some(mut stream) = stream(js).await? else { return Ok(None) };
    let state =
        stream.info().await.map_err(|e| TransportError::Broker(format!("reading the state of {STREAM}: {e}")))?;
    let (first, last) = (state.state.first_sequence.max(1), state.state.last_sequence);
    let found = |msg| entry_of(msg, None, subjects).filter(|e| e.event.id == id);
    let (mut seq, mut read) = (last, 0);
    while seq >= first && read < MAX_FIND {
        let at = seq;
        seq -= 1;
        read += 1;
        if let Some(entry) = message_at(&stream, at).await?.and_then(found) {
            return Ok(Some(entry));
        }
    }
    // Below what was read back: from the oldest on, up to it.
    let (below, mut next, mut read) = (seq + 1, first, 0);
    while next < below && read < MAX_FIND {
        let Some(msg) = first_from(&stream, SUBJECTS, next).await? else { break };
        if msg.sequence >= below {
            break;
        }
        next = msg.sequence + 1;
        read += 1;
        if let Some(entry) = found(msg) {
            return Ok(Some(entry));
        }
    }
    if next < below && read >= MAX_FIND {
        return Err(TransportError::Broker(format!(
            "{STREAM} keeps more than one lookup reads ({MAX_FIND} messages from the newest back, {MAX_FIND} from \
             the oldest on): the dead letter {} is not among them, and may be kept between; a replay of them \
             all removes what it replays",
            crate::event::quoted(id)
        )));
    }
    Ok(None)
}

/// The message at `seq`; `None` when the stream holds none there (removed, or never written).
async fn message_at(stream: &jetstream::stream::Stream, seq: u64) -> Result<Option<StreamMessage>, TransportError> {
    match stream.get_raw_message(seq).await {
        Ok(msg) => Ok(Some(msg)),
        Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(TransportError::Broker(format!("reading {STREAM} at {seq}: {e}"))),
    }
}

/// The first message under `subject` at or after `from`; `None` past the last.
async fn first_from(
    stream: &jetstream::stream::Stream,
    subject: &str,
    from: u64,
) -> Result<Option<StreamMessage>, TransportError> {
    match stream.get_first_raw_message_by_subject(subject, from).await {
        Ok(msg) => Ok(Some(msg)),
        Err(e) if e.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(TransportError::Broker(format!("reading {STREAM} at {from}: {e}"))),
    }
}

/// The entry a message of the stream is, when it is a dead letter (of `plugin`, when given);
/// `None` (logged when it is not an event) otherwise.
fn entry_of(msg: StreamMessage, plugin: Option<&str>, subjects: &Subjects) -> Option<Entry> {
    // One that names no id (not a host's: it has `ce-id`) is known by its place in the
    // stream, the same at every listing, so a replay can name it.
    let fallback_id = Some(format!("{STREAM}-{}", msg.sequence));
    let event = match wire::event_of(&msg.subject, Some(&msg.headers), msg.payload, fallback_id) {
        Ok(event) => event,
        Err(why) => {
            tracing::warn!(
                stream = STREAM,
                seq = msg.sequence,
                "a message in the dead-letter stream is not an event: {why}"
            );
            return None;
        }
    };
    let owner = event.header(headers::PLUGIN)?.to_string();
    // A host publishes a plugin's dead letters on its dead-letter subject (`plugbus.dlq.<plugin>`,
    // or the one `[plugins.<plugin>] dead_letter` names): one on another subject naming it is a
    // forgery by whoever may publish there, and is not that plugin's (review 60d M1: rights on
    // `plugbus.dlq.junk` listed, and replayed, a dead letter as any plugin's). (Logged at debug:
    // the dashboard lists every 2 s.)
    // (Its default subject too: dead letters made before the operator set one stay its.)
    let its = msg.subject.strip_prefix(crate::subject::DEAD_LETTER_PREFIX) == Some(owner.as_str())
        || subjects.get(&owner).is_some_and(|configured| *msg.subject == **configured);
    if !its {
        tracing::debug!(stream = STREAM, seq = msg.sequence, subject = %crate::event::cut(&msg.subject),
            plugin = %crate::event::cut(&owner), "a dead letter naming a plugin it is not the subject of: not listed or replayed");
        return None;
    }
    plugin.is_none_or(|p| p == owner).then_some(Entry { seq: msg.sequence, plugin: owner, event, record: None })
}

/// Removes the dead letter at `seq` (after its replay was taken). One already gone is fine: a
/// replay on another host (or another replay here) took the same dead letter at the same time
/// and removed it first; JetStream kept one copy of the replay (it has the same id).
pub async fn forget(js: &jetstream::Context, seq: u64) -> Result<(), TransportError> {
    let Some(stream) = stream(js).await? else {
        return Err(TransportError::Broker(format!("the {STREAM} stream is gone")));
    };
    match stream.delete_message(seq).await {
        Ok(_) => Ok(()),
        Err(e) if already_gone(&e) => {
            tracing::debug!(stream = STREAM, seq, "the replayed dead letter was removed by another replay");
            Ok(())
        }
        Err(e) => Err(TransportError::Broker(format!("removing dead letter {seq} from {STREAM}: {e}"))),
    }
}

/// Whether a delete failed because the message is not in the stream (any more).
fn already_gone(e: &jetstream::stream::DeleteMessageError) -> bool {
    match e.kind() {
        jetstream::stream::DeleteMessageErrorKind::JetStream(j) => {
            use jetstream::ErrorCode;
            // The server answers a delete of a message not there with the generic "delete
            // failed" code and "no message found" as its description.
            [ErrorCode::NO_MESSAGE_FOUND, ErrorCode::SEQUENCE_NOT_FOUND].contains(&j.error_code())
                || (j.error_code() == ErrorCode::STREAM_MESSAGE_DELETE_FAILED
                    && j.to_string().to_ascii_lowercase().contains("no message found"))
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_costs_its_payload_its_headers_and_an_entry_for_each() {
        let entry = crate::kv::ENTRY_COST as usize;
        assert_eq!(message_cost(&async_nats::HeaderMap::new(), 10), entry + 10);
        let mut h = async_nats::HeaderMap::new();
        h.insert("plugbus-plugin", "p");
        h.append("x", "12345");
        h.append("x", "");
        assert_eq!(message_cost(&h, 0), entry + (14 + 1 + entry) + (1 + 5 + entry) + (1 + entry));
    }
}
