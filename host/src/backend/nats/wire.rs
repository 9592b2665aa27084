//! NATS messages ↔ events: the CloudEvents NATS binding.
//!
//! In: binary mode (`ce-` headers), structured mode (`Content-Type: application/cloudevents+json`)
//! or a plain message (id from `Nats-Msg-Id` or generated, `type` = subject, `time` = receipt).
//! Out: binary mode, with `Nats-Msg-Id` = [`msg_id`] (a hash of the event's source and id, in
//! the namespace of who made it), so JetStream drops a re-published copy and only that.
//!
//! A message that claims to be a CloudEvent (a `ce-specversion` header, or the structured content
//! type) but is not a valid 1.0 one (another `specversion`, no `id`, `source` or `type`) is an
//! error here like malformed JSON: the transports make it a delivery with `defect` set, which
//! dispatch dead-letters without running the handler.

use crate::cloudevents;
use crate::event::Event;
use async_nats::HeaderMap;
use async_nats::header::{HeaderName, HeaderValue};
use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::str::FromStr;

/// The header JetStream deduplicates on.
pub const MSG_ID: &str = "Nats-Msg-Id";

/// Who chose an event's (source, id): what [`msg_id`] keeps apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// A producer (the HTTP ingress, `plugbus publish`, `Host::publish`): its (source, id) is
    /// whatever the client sent.
    Producer,
    /// The host, which derived the id (`event::output_id`): a handler's output, request or
    /// reply, a dead letter, a replay. Anyone can compute such an id, so no producer may ever
    /// meet one in JetStream's duplicate window.
    Host,
}

/// The `Nats-Msg-Id` of `ev` published by `origin`: `in-` (a producer's) or `out-` (the
/// host's), then the lower-case hex SHA-256 of its source and id, each length-prefixed (u64
/// big-endian). JetStream drops a message whose `Nats-Msg-Id` it saw within the stream's
/// duplicate window, so this is the one thing that decides what counts as the same message:
/// - CloudEvents ids are unique per source only: two producers' events with one id and
///   different sources are two events, both kept (the id alone dropped the second, answered
///   `202`).
/// - A producer's event never shares a `Nats-Msg-Id` with the host's: a client posting an
///   output's computable id (even with the output's source) ahead of its input would otherwise
///   have the real output dropped, and the input acked as if it had been published.
/// - The same (source, id) from the same origin is the same message: a producer's retry, an
///   output published again by a retried attempt or a redelivery, a dead letter replayed twice.
///
/// Every other reader takes the event's id from `ce-id`; only a plain message (published by
/// something other than a host) is known by its `Nats-Msg-Id`.
pub fn msg_id(ev: &Event, origin: Origin) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut h = Sha256::new();
    for field in [&ev.source, &ev.id] {
        h.update((field.len() as u64).to_be_bytes());
        h.update(field.as_bytes());
    }
    let prefix = match origin {
        Origin::Producer => "in-",
        Origin::Host => "out-",
    };
    let mut id = String::with_capacity(prefix.len() + 64);
    id.push_str(prefix);
    for b in h.finalize() {
        id.push(HEX[usize::from(b >> 4)] as char);
        id.push(HEX[usize::from(b & 0xf)] as char);
    }
    id
}

/// Where a request stored in a JetStream stream wants its reply: the requester's `_INBOX.…`
/// (a stored message has no NATS reply subject of its own: the stream's publish ack takes it).
/// Never an extension of the event a plugin sees (`cloudevents` drops it); only an inbox counts.
pub const REPLY_TO: &str = "plugbus-reply-to";

/// The reply inbox a durable message names in [`REPLY_TO`], if it is one (see `is_inbox`).
pub fn reply_inbox(headers: Option<&HeaderMap>) -> Option<String> {
    let value = headers?.get(REPLY_TO)?.as_str();
    super::is_inbox(value).then(|| value.to_string())
}

/// The event a NATS message carries; the error says what is malformed. A message naming no id
/// gets `fallback_id`, or a fresh one. Its data is the payload's own copy (see [`owned`]).
pub fn event_of(
    subject: &str,
    headers: Option<&HeaderMap>,
    payload: Bytes,
    fallback_id: Option<String>,
) -> Result<Event, String> {
    // The server passes subjects on unchecked: one with whitespace or a control character (an
    // escape sequence, a carriage return, a no-break space) is no subject of plugbus's, which
    // refuses them wherever a subject is published (`subject::validate_subject`), and would reach
    // handlers and dead letters' `plugbus-original-subject` (review 61d L3). (A bidirectional
    // mark is a subject's as anywhere else: review 61e F5; the log escapes it.)
    if subject.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!(
            "its subject {} holds whitespace or a control character",
            crate::event::one_line(&crate::event::cut(subject))
        ));
    }
    let payload = crate::event::owned_data(&payload);
    // A replay's answer address is the hosts' (`plugbus-replay-ack`), never part of the event: a
    // plugin never sees it, nor does the dead letter it may make, on any subject.
    let pairs = headers
        .into_iter()
        .flat_map(|h| h.iter())
        .filter(|(name, _)| !AsRef::<str>::as_ref(*name).eq_ignore_ascii_case(crate::deadletter::headers::REPLAY_ACK))
        .flat_map(|(name, values)| values.iter().map(move |v| (AsRef::<str>::as_ref(name), v.as_str())));
    // Whatever anyone publishes is decoded in the pumps: a decoder's panic (a bug, as review 55d
    // H1's was) fails this one message as undecodable, dead-lettered unrun, instead of ending
    // the pump (and, on JetStream, every host's in turn as the message came back).
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        cloudevents::decode_with_id(subject, pairs, payload, fallback_id)
    }))
    .unwrap_or_else(|_| Err("the host could not decode it (a fault of the host's, logged as a panic)".into()))
}

/// The event of a message that is not a valid event, to dead-letter unrun: its payload, under
/// `fallback_id` when the transport gives one (its place in the stream, the same on every
/// redelivery). A redelivery (its `term` lost) then makes the same dead letter, which replaces
/// the one kept before and which JetStream drops as a duplicate, instead of a second one under a
/// new id, replayed twice.
pub fn undecodable(subject: &str, payload: &Bytes, fallback_id: Option<String>) -> Event {
    let mut ev = Event::new(subject, crate::event::owned_data(payload));
    if let Some(id) = fallback_id {
        ev.id = id;
    }
    ev
}

/// The headers and payload that carry `ev`, published by `origin` (binary mode, `Nats-Msg-Id`
/// = [`msg_id`]). Headers NATS cannot carry (a name with `:` or control characters, a value
/// with a line break) are left out and logged.
pub fn message_of(ev: &Event, origin: Origin) -> (HeaderMap, Bytes) {
    let mut headers = HeaderMap::new();
    for (name, value) in cloudevents::encode_binary(ev) {
        let parsed = match &name {
            // The core attributes' names: valid, nothing to copy, and each once and first.
            Cow::Borrowed(core) => Some((HeaderName::from_static(core), true)),
            Cow::Owned(extension) => HeaderName::from_str(extension).ok().map(|n| (n, false)),
        };
        match parsed.filter(|_| !value.contains(['\r', '\n'])) {
            // `insert` hashes the name once; `append` looks it up first.
            Some((n, true)) => headers.insert(n, HeaderValue::from(value)),
            Some((n, false)) => headers.append(n, HeaderValue::from(value)),
            None => tracing::warn!(subject = %ev.subject, event_id = %ev.id, header = %name,
                "header left out: NATS cannot carry this name or value"),
        }
    }
    // Hex: any id and source (a line break included) give a header NATS can carry.
    headers.insert(HeaderName::from_static(MSG_ID), HeaderValue::from(msg_id(ev, origin)));
    (headers, ev.data.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The server passes subjects on unchecked (review 61d L3): one with an escape sequence, a
    /// carriage return, a line separator or a no-break space is malformed (dead-lettered unrun),
    /// as it is refused where plugbus publishes; a bidirectional mark is a subject's there, and
    /// here too (review 61e F5).
    #[test]
    fn a_subject_with_whitespace_or_a_control_character_is_malformed() {
        for subject in
            ["orders.\u{1b}[2J", "orders.x\rFORGED", "orders.a\u{2028}b", "orders.a\u{a0}9", "orders.x\u{b}17"]
        {
            let e = event_of(subject, None, Bytes::from_static(b"{}"), None).unwrap_err();
            assert!(e.contains("whitespace or a control character"), "{subject:?}: {e}");
            assert!(crate::subject::validate_subject(subject).is_err(), "{subject:?}");
        }
        for subject in ["orders.créé", "orders.\u{200f}x"] {
            assert!(event_of(subject, None, Bytes::from_static(b"{}"), None).is_ok(), "{subject:?}");
            assert!(crate::subject::validate_subject(subject).is_ok(), "{subject:?}");
        }
    }

    #[test]
    fn a_replays_answer_address_is_never_part_of_the_event() {
        let ev = Event::new("orders.created", "{}").with_header("tenant", "acme");
        let (mut headers, payload) = message_of(&ev, Origin::Producer);
        headers.insert(crate::deadletter::headers::REPLAY_ACK, "_INBOX.abc");
        headers.insert("Plugbus-Replay-Ack", "_INBOX.def");
        let back = event_of("orders.created", Some(&headers), payload, None).unwrap();
        assert_eq!(back.header("tenant"), Some("acme"));
        assert!(
            back.extensions.iter().all(|(k, _)| !k.eq_ignore_ascii_case(crate::deadletter::headers::REPLAY_ACK)),
            "{:?}",
            back.extensions
        );
    }

    #[test]
    fn an_event_survives_the_trip_through_nats_headers() {
        let mut ev = Event::new("orders.created", "{}").with_header("tenant", "acme co").with_header("trace-id", "t1");
        ev.datacontenttype = Some("application/json".into());
        let (headers, payload) = message_of(&ev, Origin::Producer);
        let dedupe = msg_id(&ev, Origin::Producer);
        assert_eq!(headers.get(MSG_ID).map(|v| v.as_str()), Some(dedupe.as_str()));
        // The id comes from `ce-id`; the Nats-Msg-Id beside it is the transport's, not shown.
        let mut back = event_of(&ev.subject, Some(&headers), payload, None).unwrap();
        assert_eq!(back.header("nats-msg-id"), None);
        back.extensions.sort();
        ev.extensions.sort();
        assert_eq!(back, ev);
    }

    #[test]
    fn nats_msg_ids_tell_sources_apart_and_keep_producers_from_the_hosts_ids() {
        let ev = |source: &str, id: &str| {
            let mut ev = Event::new("orders.created", "");
            (ev.source, ev.id) = (source.into(), id.into());
            ev
        };
        let a = ev("/shop/a", "1");
        // The same event again (a client's retry, an output of a retried attempt): one message.
        assert_eq!(msg_id(&a, Origin::Producer), msg_id(&ev("/shop/a", "1"), Origin::Producer));
        assert_eq!(msg_id(&a, Origin::Host), msg_id(&ev("/shop/a", "1"), Origin::Host));
        // Another source with the same id is another event.
        assert_ne!(msg_id(&a, Origin::Producer), msg_id(&ev("/shop/b", "1"), Origin::Producer));
        // Length-prefixed: moving bytes from the source to the id changes it.
        assert_ne!(msg_id(&ev("ab", "c"), Origin::Producer), msg_id(&ev("a", "bc"), Origin::Producer));
        // An output's id is anyone's to compute: a producer posting it, with the output's own
        // source, still never meets the output.
        let output = ev("plugbus/echo", &crate::event::output_id("/shop/a", "1", "echo", 0));
        assert_ne!(msg_id(&output, Origin::Producer), msg_id(&output, Origin::Host));
        // `in-`/`out-`, then the hex SHA-256 of each field length-prefixed (u64 big-endian).
        let want: String = Sha256::digest(b"\0\0\0\0\0\0\0\x07/shop/a\0\0\0\0\0\0\0\x011")
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(msg_id(&a, Origin::Producer), format!("in-{want}"));
        assert_eq!(msg_id(&a, Origin::Host), format!("out-{want}"));
    }

    #[test]
    fn a_plain_message_takes_its_id_from_nats_msg_id() {
        let mut h = HeaderMap::new();
        h.insert(MSG_ID, "m-1");
        let ev = event_of("a.b", Some(&h), Bytes::from_static(b"x"), Some("s-1".into())).unwrap();
        assert_eq!((ev.id.as_str(), ev.ty.as_str()), ("m-1", "a.b"));
        assert!(!event_of("a.b", None, Bytes::new(), None).unwrap().id.is_empty());
        assert_eq!(event_of("a.b", None, Bytes::new(), Some("ORDERS-7".into())).unwrap().id, "ORDERS-7");
    }

    #[test]
    fn a_message_claiming_an_invalid_cloudevent_is_an_error_naming_the_attribute() {
        let mut h = HeaderMap::new();
        for (k, v) in [("ce-specversion", "0.3"), ("ce-id", "1"), ("ce-source", "/s"), ("ce-type", "t")] {
            h.insert(k, v);
        }
        assert!(event_of("a.b", Some(&h), Bytes::new(), None).unwrap_err().contains("specversion"));
        h.insert("ce-specversion", "1.0");
        assert!(event_of("a.b", Some(&h), Bytes::new(), None).is_ok());
        let mut h = HeaderMap::new();
        h.insert("Content-Type", "application/cloudevents+json");
        let body = Bytes::from_static(br#"{"specversion":"1.0","source":"/s","type":"t"}"#);
        assert!(event_of("a.b", Some(&h), body, Some("s-1".into())).unwrap_err().contains("`id`"));
    }

    #[test]
    fn a_stored_requests_inbox_is_read_only_when_it_is_an_inbox_and_never_shown_as_an_extension() {
        let mut h = HeaderMap::new();
        h.insert(REPLY_TO, "_INBOX.abc.1");
        assert_eq!(reply_inbox(Some(&h)).as_deref(), Some("_INBOX.abc.1"));
        let ev = event_of("rpc.echo", Some(&h), Bytes::new(), None).unwrap();
        assert_eq!(ev.header(REPLY_TO), None, "the plugin would see the inbox: {:?}", ev.extensions);
        assert_eq!(ev.reply_to, None, "only the durable consumer sets a reply address");
        for forged in ["orders.stolen", "_INBOX.", "_INBOX.a b", ""] {
            h.insert(REPLY_TO, forged);
            assert_eq!(reply_inbox(Some(&h)), None, "{forged:?} is not an inbox");
        }
        assert_eq!(reply_inbox(None), None);
    }

    #[test]
    fn a_chain_mark_a_nats_publisher_wrote_is_not_taken_in() {
        let mut h = HeaderMap::new();
        h.insert(crate::rpc::ASKED_THROUGH, "payments,audit");
        h.insert("x-kept", "yes");
        let ev = event_of("rpc.echo", Some(&h), Bytes::new(), None).unwrap();
        assert_eq!(ev.header(crate::rpc::ASKED_THROUGH), None, "{:?}", ev.extensions);
        assert_eq!(ev.header("x-kept"), Some("yes"));
        // nor written as a CloudEvents attribute, in binary mode or structured mode
        let mut h = HeaderMap::new();
        h.insert("ce-plugbus-asked-through", "payments");
        let ev = event_of("rpc.echo", Some(&h), Bytes::new(), None).unwrap();
        assert_eq!(ev.header(crate::rpc::ASKED_THROUGH), None, "{:?}", ev.extensions);
        let mut h = HeaderMap::new();
        h.insert("content-type", "application/cloudevents+json");
        let body = r#"{"specversion":"1.0","id":"1","source":"s","type":"t","plugbus-asked-through":"payments"}"#;
        let ev = event_of("rpc.echo", Some(&h), Bytes::from(body), None).unwrap();
        assert_eq!(ev.header(crate::rpc::ASKED_THROUGH), None, "{:?}", ev.extensions);
    }

    /// A malformed message is dead-lettered under its place in the stream, the same on every
    /// redelivery (it was a new random id each time: a lost `term` made a second dead letter).
    #[test]
    fn a_malformed_message_keeps_the_id_its_place_in_the_stream_gives_it() {
        let payload = Bytes::from_static(b"not an event");
        let a = undecodable("orders.x", &payload, Some("ORDERS-42".into()));
        let b = undecodable("orders.x", &payload, Some("ORDERS-42".into()));
        assert_eq!((a.id.as_str(), b.id.as_str()), ("ORDERS-42", "ORDERS-42"));
        assert_eq!(a.data, payload);
        assert_ne!(undecodable("orders.x", &payload, None).id, undecodable("orders.x", &payload, None).id);
    }

    #[test]
    fn an_id_nats_cannot_carry_as_it_is_goes_percent_encoded_and_never_panics() {
        let mut ev = Event::new("a.b", "");
        ev.id = "a\r\nb".into();
        let (headers, _) = message_of(&ev, Origin::Host);
        // Hashed, so JetStream still deduplicates it.
        assert_eq!(headers.get(MSG_ID).map(|v| v.as_str()), Some(msg_id(&ev, Origin::Host).as_str()));
        assert_eq!(headers.get("ce-id").map(|v| v.as_str()), Some("a%0D%0Ab"));
    }

    #[test]
    fn a_header_nats_cannot_carry_is_left_out() {
        let ev = Event::new("a", "").with_header("bad:name", "v").with_header("ok", "v");
        let (headers, _) = message_of(&ev, Origin::Producer);
        assert!(headers.get("ce-ok").is_some());
        assert_eq!(headers.iter().filter(|(k, _)| AsRef::<str>::as_ref(k).contains(':')).count(), 0);
    }
}
