//! The CloudEvents bindings shared by the HTTP ingress and the NATS transport: binary mode
//! (`ce-` headers, data as the body) and structured mode (`application/cloudevents+json`).
//! A message with neither is still an event: id, time and type are filled in.
//!
//! Which mode a message is in follows the CloudEvents SDKs: a `ce-specversion` header makes it
//! binary mode, the `application/cloudevents+json` content type structured mode. A message in
//! either mode must be a valid CloudEvents 1.0 event: `specversion` `1.0` and a non-empty `id`,
//! `source` and `type`; the error names the attribute that is wrong. `ce-` headers without
//! `ce-specversion` (`plugbus publish -H`) are read as the attributes of a plain event.

use crate::event::{Event, cut_to, new_id, now_rfc3339};
use bytes::Bytes;
use std::borrow::Cow;

/// Media type of structured-mode CloudEvents.
pub const STRUCTURED: &str = "application/cloudevents+json";

/// The most bytes an event's `id`, `source`, `type` or `time` may hold (a subject's bound):
/// an input's id goes into every output it causes (`plugbus-caused-by`), and its source and
/// id into their ids.
pub const MAX_ATTRIBUTE_BYTES: usize = 1_024;

/// The most extensions (headers) one event may carry: each costs the host a pair of strings
/// however short it is. Above what a plugin's output may carry (`limits.max_headers`, 64 by
/// default) and what the host adds to it.
pub const MAX_EXTENSIONS: usize = 1_024;

/// Whether `content_type` is a CloudEvents envelope (`application/cloudevents…`, in any case):
/// the one rule for where an envelope begins. No event has one as its own `datacontenttype`:
/// sent on in binary mode, a receiver would read its data as the event, headers ignored.
pub fn is_envelope_type(content_type: &str) -> bool {
    const ENVELOPE: &str = "application/cloudevents";
    content_type.trim_start().get(..ENVELOPE.len()).is_some_and(|p| p.eq_ignore_ascii_case(ENVELOPE))
}

/// Whether `content_type` says structured mode (`application/cloudevents+json`, in any case).
fn is_structured(content_type: &str) -> bool {
    content_type.trim_start().get(..STRUCTURED.len()).is_some_and(|p| p.eq_ignore_ascii_case(STRUCTURED))
}

/// What every decoded event must be, whatever its mode: `id`, `source`, `type`, `time` and
/// `datacontenttype` within [`MAX_ATTRIBUTE_BYTES`] and free of control characters
/// (CloudEvents 1.0 strings exclude them; a line break in an id would break the NATS header that
/// carries it), no envelope as `datacontenttype`, at most [`MAX_EXTENSIONS`] extensions. The
/// error names the attribute.
fn check_event(ev: &Event) -> Result<(), String> {
    let content_type = ev.datacontenttype.as_ref().map(|ct| ("datacontenttype", ct));
    let attributes = [("id", &ev.id), ("source", &ev.source), ("type", &ev.ty), ("time", &ev.time)];
    for (attr, value) in attributes.into_iter().chain(content_type) {
        // A plain message's type is its subject, which NATS may let run longer.
        let subject_as_type = attr == "type" && *value == ev.subject;
        if value.len() > MAX_ATTRIBUTE_BYTES && !subject_as_type {
            return Err(format!(
                "attribute `{attr}` is {} bytes: at most {MAX_ATTRIBUTE_BYTES} are accepted",
                value.len()
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(format!(
                "attribute `{attr}` holds a control character: {} (CloudEvents strings exclude them)",
                crate::event::quoted(value)
            ));
        }
    }
    if let Some(ct) = ev.datacontenttype.as_deref().filter(|ct| is_envelope_type(ct)) {
        return Err(format!(
            "`datacontenttype` is {}: an event's data cannot be a CloudEvents envelope (sent on in binary \
             mode, its content type would make the message that envelope, its own attributes ignored)",
            crate::event::quoted(ct)
        ));
    }
    // A name a header can carry (what NATS takes: printable ASCII without `:`): a structured
    // event's JSON keys are any text, and one with a line break or an escape was logged raw and
    // left out, unseen, of what went to NATS (review 61d L2).
    let carried = |name: &str| {
        !name.is_empty() && name.len() <= MAX_ATTRIBUTE_BYTES && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
    };
    if let Some((name, _)) = ev.extensions.iter().find(|(k, _)| !carried(k)) {
        return Err(format!(
            "extension name {} is not one a header can carry (printable ASCII without `:`, 1 to \
             {MAX_ATTRIBUTE_BYTES} bytes)",
            crate::event::quoted(&crate::event::cut(name))
        ));
    }
    // Where the JSON format keeps the data: as extensions they were read as the data by
    // `plugbus tail --record`, `dlq export` and `plugbus test`, or made the record unreadable.
    if let Some((name, _)) = ev.extensions.iter().find(|(k, _)| k == "data" || k == "data_base64") {
        return Err(format!("extension `{name}` is reserved: the CloudEvents JSON format keeps an event's data there"));
    }
    // The host's own (`plugbus-*`: a dead letter's marks, `caused-by`, ...) are counted apart,
    // so a dead letter of an event at the bound still reads back.
    let own = ev.extensions.iter().filter(|(k, _)| k.starts_with("plugbus-")).count();
    let theirs = ev.extensions.len() - own;
    if theirs > MAX_EXTENSIONS || own > MAX_EXTENSIONS {
        return Err(format!(
            "the event carries {} extensions (headers): at most {MAX_EXTENSIONS} are accepted, and as many \
             plugbus-* ones",
            theirs.max(own)
        ));
    }
    Ok(())
}

/// Headers that describe the transport, not the event; never copied into extensions.
const TRANSPORT_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "user-agent",
    "accept",
    "accept-encoding",
    "connection",
    // A client's credentials (for the host's API, or a proxy's, or its session): never handed
    // to plugins, kept in the log or shown by tails.
    "authorization",
    "proxy-authorization",
    "cookie",
    "transfer-encoding",
    "expect",
    // The reply inbox of a request stored in a JetStream stream: the host's own capability,
    // read by the durable consumer (`backend::nats::wire::REPLY_TO`), never shown to a plugin.
    "plugbus-reply-to",
    // The chain of requests a request belongs to (`rpc::ASKED_THROUGH`): the embedded bus's own
    // mark; any NATS publisher could write one, which a plugin would carry on in its requests.
    crate::rpc::ASKED_THROUGH,
];

/// Whether a header describes the transport, not the event (never an extension).
pub fn is_transport_header(name: &str) -> bool {
    TRANSPORT_HEADERS.iter().any(|h| h.eq_ignore_ascii_case(name))
}

/// Drops a request chain's mark ([`crate::rpc::ASKED_THROUGH`]) however the message wrote it:
/// a plain header (also in `TRANSPORT_HEADERS`), a `ce-` attribute, or a structured-mode key.
/// Only the host marks a chain, for its own plugins' requests on the embedded bus; one taken in
/// here would be carried on in a plugin's own requests.
fn drop_chain_mark(ev: &mut Event) {
    ev.extensions.retain(|(name, _)| name != crate::rpc::ASKED_THROUGH);
}

/// Builds the event that arrived on `subject` with `headers` and `body`.
pub fn decode<'a>(
    subject: &str,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    body: Bytes,
) -> Result<Event, String> {
    decode_with_id(subject, headers, body, None)
}

/// Like [`decode`]; a message that names no id (no `ce-id`, no `Nats-Msg-Id`, no `id` in the
/// envelope) gets `fallback_id` (a durable transport passes one that is the same on every
/// redelivery, so the event's outputs keep their ids) or a fresh one.
pub fn decode_with_id<'a>(
    subject: &str,
    headers: impl Iterator<Item = (&'a str, &'a str)>,
    body: Bytes,
    fallback_id: Option<String>,
) -> Result<Event, String> {
    // Header names are matched without regard to case; a name is copied (lower-cased) only when
    // it is kept as an extension.
    let headers: Vec<(&str, &str)> = headers.collect();
    let find = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| *v);
    let content_type = find("content-type");
    if content_type.is_some_and(is_structured) {
        let mut ev = decode_structured(subject, &body, fallback_id)?;
        drop_chain_mark(&mut ev);
        check_event(&ev)?;
        return Ok(ev);
    }
    if let Some(envelope) = content_type.filter(|ct| is_envelope_type(ct)) {
        return Err(format!(
            "Content-Type {} is a CloudEvents envelope this host does not read: send one event, in \
             structured mode ({STRUCTURED}) or binary mode",
            crate::event::quoted(envelope)
        ));
    }
    if let Some(version) = find("ce-specversion") {
        check_binary(version, find)?;
    }
    let has_ce_id = find("ce-id").is_some();
    // The id and time are made up only when the message names none.
    // Each core attribute is its first header, the one checked above (and the one a broker
    // deduplicates on): a later one is kept as an extension of its name (hosts before this
    // version sent an extension `id` or `source` so), never taken for the event's own. The HTTP
    // ingress refuses a repeat ([`repeated_core_attribute`]).
    let (mut id, mut source, mut ty, mut time) = (None, None, None, None);
    let mut ev = Event::identified(subject, body, String::new(), String::new());
    ev.datacontenttype = content_type.map(str::to_owned);
    for (name, value) in headers {
        let name = match name.bytes().any(|b| b.is_ascii_uppercase()) {
            true => Cow::Owned(name.to_ascii_lowercase()),
            false => Cow::Borrowed(name),
        };
        let first = |slot: &mut Option<String>, ext: &mut Vec<(String, String)>, attr: &str| match slot {
            None => *slot = Some(percent_decode(value)),
            Some(_) => ext.push((attr.to_string(), percent_decode(value))),
        };
        match name.strip_prefix("ce-") {
            Some("id") => first(&mut id, &mut ev.extensions, "id"),
            Some("source") => first(&mut source, &mut ev.extensions, "source"),
            Some("type") => first(&mut ty, &mut ev.extensions, "type"),
            Some("time") => first(&mut time, &mut ev.extensions, "time"),
            Some("specversion") | Some("subject") => {}
            Some(ext) => ev.extensions.push((ext.to_string(), percent_decode(value))),
            None if name == "content-type" => {}
            // A plain message's id (its first, as the broker's dedupe reads it). Beside a
            // `ce-id` it is the transport's dedupe key (plugbus sends a hash of source and id:
            // `backend::nats::wire::msg_id`), not the event's.
            None if name == "nats-msg-id" => {
                if !has_ce_id && id.is_none() {
                    let value = percent_decode(value);
                    id = Some(value.clone());
                    ev.extensions.push((name.into_owned(), value));
                }
            }
            None if TRANSPORT_HEADERS.contains(&&*name) => {}
            None => ev.extensions.push((name.into_owned(), percent_decode(value))),
        }
    }
    ev.id = id.or(fallback_id).unwrap_or_else(new_id);
    if let Some(source) = source {
        ev.source = source;
    }
    if let Some(ty) = ty {
        ev.ty = ty;
    }
    ev.time = time.unwrap_or_else(now_rfc3339);
    drop_chain_mark(&mut ev);
    if ev.id.is_empty() {
        return Err("ce-id is empty".into());
    }
    check_event(&ev)?;
    Ok(ev)
}

/// Reads a structured-mode envelope. Its `data` is kept as written (the bytes of its JSON value;
/// read into a `serde_json::Value` and written again, an integer past u64 became a float and keys
/// were sorted), its other members read as JSON values. A key given twice is the last, as
/// `serde_json` reads every map.
fn decode_structured(subject: &str, body: &[u8], fallback_id: Option<String>) -> Result<Event, String> {
    use serde_json::value::RawValue;
    let members: std::collections::BTreeMap<String, &RawValue> =
        serde_json::from_slice(body).map_err(|e| match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
            Ok(_) => "structured CloudEvent is not a JSON object".to_string(),
            Err(_) => format!("structured CloudEvent is not valid JSON: {e}"),
        })?;
    let data = members.get("data").copied();
    // A member serde_json reads as raw text may still not be a value it reads (a number out of
    // range, `1e400`; nesting past its depth; a lone surrogate in a string): refused, never a
    // panic in the consumer that decodes it.
    let value = |k: &str, raw: &RawValue| {
        serde_json::from_str(raw.get())
            .map_err(|e| format!("member `{}` of the structured CloudEvent is not valid JSON: {e}", cut_to(k, 64)))
    };
    let obj = members
        .iter()
        .filter(|(k, _)| *k != "data")
        .map(|(k, v)| Ok((k.clone(), value(k, v)?)))
        .collect::<Result<serde_json::Map<String, serde_json::Value>, String>>()?;
    check_structured(&obj, data.is_some())?;
    let text = |k: &str| obj.get(k).and_then(|v| v.as_str()).map(str::to_owned);
    let mut ev = Event::new(subject, Bytes::new());
    if let Some(id) = text("id").or(fallback_id) {
        ev.id = id;
    }
    if let Some(s) = text("source") {
        ev.source = s;
    }
    if let Some(t) = text("type") {
        ev.ty = t;
    }
    ev.time = text("time").unwrap_or_else(now_rfc3339);
    ev.datacontenttype = text("datacontenttype");
    ev.data = if let Some(b64) = text("data_base64") {
        exact(base64_decode(&b64).ok_or("data_base64 is not valid base64")?)
    } else {
        let text_type = ev.datacontenttype.as_deref().is_some_and(|c| !c.contains("json"));
        match data.map(RawValue::get) {
            None | Some("null") => Bytes::new(),
            Some(json) if text_type && json.starts_with('"') => {
                let text: String = serde_json::from_str(json)
                    .map_err(|e| format!("`data` of the structured CloudEvent is not a valid JSON string: {e}"))?;
                exact(text.into_bytes())
            }
            Some(json) => {
                if ev.datacontenttype.is_none() {
                    ev.datacontenttype = Some("application/json".into());
                }
                Bytes::copy_from_slice(json.as_bytes())
            }
        }
    };
    for (k, v) in obj {
        let known =
            ["id", "source", "type", "time", "datacontenttype", "data", "data_base64", "specversion", "subject"];
        if !known.contains(&k.as_str()) {
            let value = v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
            ev.extensions.push((k.to_ascii_lowercase(), value));
        }
    }
    Ok(ev)
}

/// The CloudEvents version this host reads and writes.
pub const SPECVERSION: &str = "1.0";

/// The attributes every CloudEvents 1.0 event has, besides `specversion`, each with its
/// binary-mode header.
const REQUIRED: [(&str, &str); 3] = [("id", "ce-id"), ("source", "ce-source"), ("type", "ce-type")];

/// Checks a binary-mode message (it has `ce-specversion`): version 1.0, `ce-id`, `ce-source`
/// and `ce-type` present and not empty.
fn check_binary<'a>(version: &str, find: impl Fn(&str) -> Option<&'a str>) -> Result<(), String> {
    if version.trim() != SPECVERSION {
        return Err(format!(
            "ce-specversion is {version:?}: only CloudEvents {SPECVERSION} is accepted (attribute `specversion`)"
        ));
    }
    for (attr, name) in REQUIRED {
        match find(name) {
            None => {
                return Err(format!(
                    "the {name} header is missing: a binary-mode CloudEvent (it has ce-specversion) needs \
                     attribute `{attr}`"
                ));
            }
            Some(v) if v.trim().is_empty() => {
                return Err(format!("the {name} header is empty (attribute `{attr}`)"));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Checks a structured-mode envelope: `specversion` "1.0", `id`, `source` and `type` non-empty
/// strings.
fn check_structured(obj: &serde_json::Map<String, serde_json::Value>, has_data: bool) -> Result<(), String> {
    match obj.get("specversion") {
        None => return Err("the structured CloudEvent has no `specversion` attribute".into()),
        Some(serde_json::Value::String(v)) if v == SPECVERSION => {}
        Some(other) => {
            return Err(format!(
                "`specversion` is {other}: only CloudEvents {SPECVERSION} is accepted (attribute `specversion`)"
            ));
        }
    }
    for (attr, _) in REQUIRED {
        match obj.get(attr) {
            None => {
                return Err(format!(
                    "the structured CloudEvent has no `{attr}` attribute (CloudEvents {SPECVERSION} requires id, \
                     source and type)"
                ));
            }
            Some(serde_json::Value::String(v)) if v.trim().is_empty() => {
                return Err(format!("attribute `{attr}` of the structured CloudEvent is empty"));
            }
            Some(serde_json::Value::String(_)) => {}
            Some(other) => {
                return Err(format!("attribute `{attr}` of the structured CloudEvent is {other}, not a string"));
            }
        }
    }
    if has_data && obj.contains_key("data_base64") {
        return Err("the structured CloudEvent has both `data` and `data_base64`".into());
    }
    Ok(())
}

/// The first core attribute whose `ce-` header `headers` give more than once, as the refusal
/// to answer: the HTTP ingress refuses it (a client's mistake, or an event meant to be checked as
/// one and taken as another); a broker's message is read with the first ([`decode_with_id`]).
pub fn repeated_core_attribute(headers: &[(&str, &str)]) -> Option<String> {
    BINARY_CORE.iter().find_map(|attr| {
        let named = |(k, _): &&(&str, &str)| {
            k.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ce-"))
                && k.get(3..).is_some_and(|a| a.eq_ignore_ascii_case(attr))
        };
        let twice = headers.iter().filter(named).nth(1).is_some();
        twice.then(|| format!("the ce-{attr} header is given more than once (attribute `{attr}`)"))
    })
}

/// The core attributes a binary-mode `ce-` header sets (or, for `specversion` and `subject`,
/// that the event's envelope and subject decide): an extension of the same name is never sent
/// as one.
const BINARY_CORE: [&str; 6] = ["id", "source", "type", "time", "specversion", "subject"];

/// The binary-mode headers of `ev` (data goes as the body): `ce-` attributes, `content-type`,
/// and extensions: as `ce-<name>` when the name is a valid CloudEvents attribute name
/// (lower-case letters and digits) other than a core attribute's, else under their own name
/// (an extension `id`, from a client's plain `id` header, went out as a second `ce-id`, and the
/// next hop took it for the event's id). Values are percent-encoded,
/// so [`decode`] gives the same event back. The names of the core attributes are static (a
/// transport can use them without parsing or copying).
pub fn encode_binary(ev: &Event) -> Vec<(Cow<'static, str>, String)> {
    let mut headers = Vec::with_capacity(ev.extensions.len() + 6);
    headers.push((Cow::Borrowed("ce-specversion"), SPECVERSION.to_string()));
    headers.push((Cow::Borrowed("ce-id"), percent_encode(&ev.id)));
    headers.push((Cow::Borrowed("ce-source"), percent_encode(&ev.source)));
    headers.push((Cow::Borrowed("ce-type"), percent_encode(&ev.ty)));
    headers.push((Cow::Borrowed("ce-time"), percent_encode(&ev.time)));
    if let Some(ct) = &ev.datacontenttype {
        headers.push((Cow::Borrowed("content-type"), ct.clone()));
    }
    for (name, value) in &ev.extensions {
        let ce = name.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ce-"));
        if ce || name.eq_ignore_ascii_case("nats-msg-id") || name.eq_ignore_ascii_case("content-type") {
            continue;
        }
        let is_attribute = !name.is_empty()
            && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            && !BINARY_CORE.contains(&name.as_str());
        // A `nats-` name (a NATS publisher's `Nats-Expected-Stream`, `Nats-Rollup`, `Nats-TTL`,
        // kept as the event's) goes under `ce-`: as a plain header the server would act on it at
        // the host's publish of a dead letter or a replay (review 60d L1). Read back, it is the
        // same extension.
        let broker_control =
            name.get(..5).is_some_and(|p| p.eq_ignore_ascii_case("nats-") || p.eq_ignore_ascii_case("nats_"));
        let name = if is_attribute || broker_control { format!("ce-{name}") } else { name.clone() };
        headers.push((Cow::Owned(name), percent_encode(value)));
    }
    headers
}

/// Whether a `datacontenttype` says the data is JSON (`application/json`, `…+json`).
fn is_json_type(ct: &str) -> bool {
    let media = ct.split(';').next().unwrap_or_default().trim().to_ascii_lowercase();
    media == "application/json" || media == "text/json" || media.ends_with("+json")
}

/// The members of an event's CloudEvents JSON shape that are not extensions ([`to_json`]).
const JSON_ATTRIBUTES: [&str; 9] =
    ["id", "source", "type", "time", "datacontenttype", "data", "data_base64", "specversion", "subject"];

/// The one place that decides the CloudEvents JSON shape of an event (what `plugbus tail
/// --record` writes and `plugbus test` reads): `specversion`, `id`, `source`, `type`, `subject`,
/// `time`, `datacontenttype` (when set), the data, and every header as a top-level extension.
///
/// The data is `data` as a JSON value when the content type is JSON and the bytes parse, `data`
/// as a string when the content type is not JSON (or absent) and the bytes are UTF-8, else
/// `data_base64`. [`from_json`] reads it back to the same event (JSON data re-encoded compactly).
/// A header named as one of those attributes (a plain `datacontenttype:` HTTP header, taken as
/// an extension) is left out: it would be read back as the attribute (review 62c F2: such a
/// `datacontenttype` took the empty content type's place, and the data came back as a JSON
/// string, so `dlq debug` and `plugbus test` ran the handler on other data than it was given).
pub fn to_json(ev: &Event) -> serde_json::Value {
    use serde_json::Value;
    let mut m = serde_json::Map::new();
    m.insert("specversion".into(), SPECVERSION.into());
    m.insert("id".into(), ev.id.clone().into());
    m.insert("source".into(), ev.source.clone().into());
    m.insert("type".into(), ev.ty.clone().into());
    m.insert("subject".into(), ev.subject.clone().into());
    m.insert("time".into(), ev.time.clone().into());
    if let Some(ct) = &ev.datacontenttype {
        m.insert("datacontenttype".into(), ct.clone().into());
    }
    let json_type = ev.datacontenttype.as_deref().is_some_and(is_json_type);
    let as_json = if json_type { serde_json::from_slice::<Value>(&ev.data).ok() } else { None };
    match (as_json, std::str::from_utf8(&ev.data)) {
        (Some(v), _) => {
            m.insert("data".into(), v);
        }
        (None, Ok(text)) if !json_type => {
            m.insert("data".into(), text.into());
        }
        _ if ev.data.is_empty() => {}
        _ => {
            m.insert("data_base64".into(), base64_encode(&ev.data).into());
        }
    }
    for (name, value) in ev.extensions.iter().filter(|(name, _)| !JSON_ATTRIBUTES.contains(&name.as_str())) {
        m.entry(name.clone()).or_insert_with(|| value.clone().into());
    }
    Value::Object(m)
}

/// Why a CloudEvents JSON record (see [`to_json`]) is not an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JsonEventError {
    /// Not a JSON object.
    #[error("the event is not a JSON object")]
    NotAnObject,
    /// A required attribute is missing, empty or not a string.
    #[error("the event has no `{0}` (a non-empty string)")]
    Missing(&'static str),
    /// `data_base64` does not decode.
    #[error("`data_base64` is not valid base64")]
    BadBase64,
    /// Both `data` and `data_base64`.
    #[error("the event has both `data` and `data_base64`")]
    BothData,
}

/// Reads an event written by [`to_json`] (or by hand in that shape): `subject`, `id`, `source`
/// and `type` are required; `time` may be absent (then empty); other string attributes are
/// headers (other values become their JSON text).
pub fn from_json(v: &serde_json::Value) -> Result<Event, JsonEventError> {
    use serde_json::Value;
    let obj = v.as_object().ok_or(JsonEventError::NotAnObject)?;
    let text = |k: &'static str| match obj.get(k) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s.clone()),
        _ => Err(JsonEventError::Missing(k)),
    };
    let subject = text("subject")?;
    let mut ev = Event::new(subject, Bytes::new());
    ev.id = text("id")?;
    ev.source = text("source")?;
    ev.ty = text("type")?;
    ev.time = obj.get("time").and_then(Value::as_str).unwrap_or_default().to_string();
    ev.datacontenttype = obj.get("datacontenttype").and_then(Value::as_str).map(str::to_owned);
    if obj.contains_key("data") && obj.contains_key("data_base64") {
        return Err(JsonEventError::BothData);
    }
    let json_type = ev.datacontenttype.as_deref().is_some_and(is_json_type);
    ev.data = match (obj.get("data_base64"), obj.get("data")) {
        (Some(b64), _) => exact(b64.as_str().and_then(base64_decode).ok_or(JsonEventError::BadBase64)?),
        (None, None | Some(Value::Null)) => Bytes::new(),
        (None, Some(Value::String(s))) if !json_type => Bytes::from(s.clone().into_bytes()),
        (None, Some(other)) => exact(serde_json::to_vec(other).expect("re-encoding JSON")),
    };
    for (k, v) in obj.iter().filter(|(k, _)| !JSON_ATTRIBUTES.contains(&k.as_str())) {
        let value = v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string());
        ev.extensions.push((k.to_ascii_lowercase(), value));
    }
    Ok(ev)
}

/// Standard base64 with padding.
pub fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Encodes what a header value may not carry as-is: `%`, `"`, space, controls and non-ASCII.
pub fn percent_encode(s: &str) -> String {
    let plain = |b: u8| b.is_ascii_graphic() && b != b'%' && b != b'"';
    if s.bytes().all(plain) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for b in s.bytes() {
        if plain(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Decodes `%XX` escapes (the CloudEvents binary-mode header encoding); invalid escapes stay.
pub fn percent_decode(s: &str) -> String {
    if !s.contains('%') {
        return s.to_string();
    }
    // On bytes: a `%` before a multi-byte character (`100%€`) made a `str` slice that ended
    // inside it, and the panic took down the NATS pump decoding the message, for every host
    // (review 55d H1); and `u8::from_str_radix` read `%+1` as 0x01.
    let hex = |b: u8| char::from(b).to_digit(16).map(|d| d as u8);
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let (Some(&hi), Some(&lo)) = (bytes.get(i + 1), bytes.get(i + 2))
            && let (Some(hi), Some(lo)) = (hex(hi), hex(lo))
        {
            out.push(hi << 4 | lo);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `data` made by decoding, in an allocation of exactly its length: a `Vec` grown by doubling
/// (a JSON string unescaped, JSON re-encoded by [`from_json`]) or sized by its input (base64 with whitespace or padding skipped) keeps its
/// whole capacity as `Bytes`, and every bound on held events counts `data.len()` (1 MiB of
/// spaces before `QQ==` decoded to 1 byte holding 786 KB).
fn exact(mut data: Vec<u8>) -> Bytes {
    data.shrink_to_fit();
    Bytes::from(data)
}

/// Decodes standard base64 (padding and whitespace ignored); `None` on a foreign character.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=') {
        let v = ALPHABET.iter().position(|a| *a == c)? as u32;
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Review 60d L1: a NATS publisher's `Nats-Expected-Stream` (or `ce-nats-rollup`), kept as
    /// an extension, went out again as a plain header on the host's publish of its dead letter
    /// or replay, where the server would act on it.
    #[test]
    fn a_nats_control_name_kept_as_an_extension_never_goes_out_as_a_plain_header() {
        let headers = [
            ("ce-specversion", "1.0"),
            ("ce-id", "i"),
            ("ce-source", "/s"),
            ("ce-type", "t"),
            ("Nats-Expected-Stream", "NOPE"),
            ("ce-nats-rollup", "all"),
        ];
        let ev = decode("a.b", headers.into_iter(), Bytes::new()).unwrap();
        let out = encode_binary(&ev);
        let plain: Vec<_> = out.iter().filter(|(k, _)| k.to_ascii_lowercase().starts_with("nats")).collect();
        assert!(plain.is_empty(), "{plain:?}");
        let back = decode("a.b", out.iter().map(|(k, v)| (k.as_ref(), v.as_str())), Bytes::new()).unwrap();
        assert_eq!(back.header("nats-expected-stream"), Some("NOPE"));
        assert_eq!(back.header("nats-rollup"), Some("all"));
    }

    /// Review 62c F2: a `ce-datacontenttype` header without a `Content-Type` is an extension;
    /// in the JSON shape it took the empty content type's place, and JSON data came back as a
    /// string. What is read back is what was delivered.
    #[test]
    fn an_extension_named_as_an_attribute_never_changes_the_event_read_back_from_json() {
        let headers = [("ce-datacontenttype", "application/json")];
        let ev = decode("a.b", headers.into_iter(), Bytes::from_static(br#"{"a":1}"#)).unwrap();
        assert_eq!((ev.datacontenttype.as_deref(), ev.header("datacontenttype")), (None, Some("application/json")));
        let back = from_json(&to_json(&ev)).unwrap();
        assert_eq!((back.data, back.datacontenttype), (ev.data, None));
    }

    /// A structured event's JSON keys become extension names: one a header cannot carry (a
    /// line break, an escape, a `:`) was logged raw and left out of what went to NATS (review
    /// 61d L2). It is refused, naming it; one a header can carry is kept.
    #[test]
    fn an_extension_name_no_header_can_carry_is_refused() {
        let structured = [("content-type", "application/cloudevents+json")];
        for name in ["a\\nb", "x\\u001b[2J", "a:b", "a b", ""] {
            let body = format!(r#"{{"specversion":"1.0","id":"1","source":"s","type":"t","{name}":"v"}}"#);
            let e = decode("a.b", structured.into_iter(), Bytes::from(body)).unwrap_err();
            assert!(e.contains("extension name"), "{name:?}: {e}");
        }
        let body = r#"{"specversion":"1.0","id":"1","source":"s","type":"t","tenant-id":"v"}"#;
        let ev = decode("a.b", structured.into_iter(), Bytes::from_static(body.as_bytes())).unwrap();
        assert_eq!(ev.header("tenant-id"), Some("v"));
    }

    /// Any header value a NATS publisher or HTTP client sends decodes without a panic (review
    /// 55d H1: a `%` before a multi-byte character sliced inside it), and only `%` with two hex
    /// digits is an escape.
    #[test]
    fn percent_decoding_takes_any_text_and_only_two_hex_digits() {
        for (encoded, decoded) in [
            ("100%€", "100%€"),
            ("%a€", "%a€"),
            ("50% é", "50% é"),
            ("%😀", "%😀"),
            ("5%。", "5%。"),
            ("%+1", "%+1"),
            ("%-1", "%-1"),
            ("%", "%"),
            ("%4", "%4"),
            ("a%2", "a%2"),
            ("%41%42", "AB"),
            ("acme%20co", "acme co"),
            ("%e2%82%AC", "€"),
            ("%ff", "\u{fffd}"),
        ] {
            assert_eq!(percent_decode(encoded), decoded, "{encoded:?}");
        }
    }

    #[test]
    fn binary_mode_maps_ce_headers() {
        let h = [
            ("ce-id", "e-1"),
            ("ce-source", "/shop"),
            ("ce-type", "order.v1"),
            ("ce-tenant", "acme%20co"),
            ("content-type", "application/json"),
        ];
        let ev = decode("orders.created", h.into_iter(), Bytes::from_static(b"{}")).unwrap();
        assert_eq!((ev.id.as_str(), ev.source.as_str(), ev.ty.as_str()), ("e-1", "/shop", "order.v1"));
        assert_eq!(ev.header("tenant"), Some("acme co"));
        assert_eq!(ev.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(ev.subject, "orders.created");
    }

    #[test]
    fn plain_message_gets_id_time_and_type() {
        let ev = decode("a.b", std::iter::empty(), Bytes::from_static(b"x")).unwrap();
        assert!(!ev.id.is_empty());
        assert_eq!(ev.ty, "a.b");
        assert!(ev.time.ends_with('Z'));
    }

    #[test]
    fn header_names_match_in_any_case_and_extensions_are_kept_lower_case() {
        let h = [
            ("CE-SpecVersion", "1.0"),
            ("Ce-Id", "e-1"),
            ("CE-SOURCE", "/shop"),
            ("ce-Type", "order.v1"),
            ("Ce-Time", "2026-11-30T00:00:00Z"),
            ("CE-Tenant", "acme"),
            ("X-Trace", "t1"),
            ("Content-Type", "application/json"),
            ("User-Agent", "curl"),
        ];
        let ev = decode("orders.created", h.into_iter(), Bytes::new()).unwrap();
        assert_eq!((ev.id.as_str(), ev.source.as_str(), ev.ty.as_str()), ("e-1", "/shop", "order.v1"));
        assert_eq!(ev.time, "2026-11-30T00:00:00Z", "the message's time, none made up");
        assert_eq!(ev.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(ev.extensions, vec![("tenant".into(), "acme".into()), ("x-trace".into(), "t1".into())]);
        // A binary-mode message without an id is refused whatever the case of its names.
        let h = [("CE-SpecVersion", "1.0"), ("CE-SOURCE", "/shop"), ("CE-TYPE", "t")];
        assert!(decode("a.b", h.into_iter(), Bytes::new()).unwrap_err().contains("ce-id"));
        // An id named but empty is refused, not replaced by a made-up one.
        let h = [("ce-id", ""), ("ce-source", "/shop")];
        assert!(decode("a.b", h.into_iter(), Bytes::new()).unwrap_err().contains("ce-id is empty"));
    }

    #[test]
    fn structured_mode_reads_the_envelope() {
        let body = br#"{"specversion":"1.0","id":"s-1","source":"/x","type":"t","data":{"a":1},"tenant":"acme"}"#;
        let h = [("content-type", "application/cloudevents+json")];
        let ev = decode("a.b", h.into_iter(), Bytes::from_static(body)).unwrap();
        assert_eq!(ev.id, "s-1");
        assert_eq!(ev.data, Bytes::from_static(br#"{"a":1}"#));
        assert_eq!(ev.header("tenant"), Some("acme"));
        let bad = decode("a.b", h.into_iter(), Bytes::from_static(b"{nope"));
        assert!(bad.unwrap_err().contains("not valid JSON"));
    }

    #[test]
    fn an_invalid_cloudevent_is_refused_naming_the_attribute() {
        let structured = [("content-type", "application/cloudevents+json")];
        let cases: &[(&[u8], &str)] = &[
            (br#"{"specversion":"0.1","type":"t","source":"/s"}"#, "specversion"),
            (br#"{"type":"t","source":"/s","id":"1"}"#, "specversion"),
            (br#"{"specversion":"1.0","type":"t","source":"/s"}"#, "`id`"),
            (br#"{"specversion":"1.0","id":"1","type":"t"}"#, "`source`"),
            (br#"{"specversion":"1.0","id":"1","source":"/s"}"#, "`type`"),
            (br#"{"specversion":"1.0","id":"","source":"/s","type":"t"}"#, "`id`"),
            (br#"{"specversion":"1.0","id":7,"source":"/s","type":"t"}"#, "`id`"),
            (br#"{"specversion":1.0,"id":"1","source":"/s","type":"t"}"#, "specversion"),
        ];
        for (body, needle) in cases {
            let e = decode("a.b", structured.into_iter(), Bytes::from_static(body)).unwrap_err();
            assert!(e.contains(needle), "{}: {e}", String::from_utf8_lossy(body));
        }
        let full = [("ce-specversion", "1.0"), ("ce-id", "1"), ("ce-source", "/s"), ("ce-type", "t")];
        assert!(decode("a.b", full.into_iter(), Bytes::new()).is_ok());
        for (i, attr) in ["specversion", "id", "source", "type"].iter().enumerate() {
            let mut h = full.to_vec();
            if i == 0 {
                h[0].1 = "0.3";
            } else {
                h.remove(i);
            }
            let e = decode("a.b", h.into_iter(), Bytes::new()).unwrap_err();
            assert!(e.contains(&format!("ce-{attr}")) && e.contains(&format!("`{attr}`")), "{e}");
        }
        // Without ce-specversion the ce- headers are a plain event's attributes, as before.
        let ev = decode("a.b", [("ce-id", "x"), ("ce-tenant", "t")].into_iter(), Bytes::new()).unwrap();
        assert_eq!((ev.id.as_str(), ev.header("tenant")), ("x", Some("t")));
    }

    /// The attack: a structured envelope as an event's own content type. Sent on in binary
    /// mode, a receiver reads the data as the event (any id, source, `plugbus-*` marks) and
    /// ignores the headers the host wrote.
    #[test]
    fn an_event_whose_data_would_read_as_another_event_is_refused() {
        let inner =
            r#"{"specversion":"1.0","id":"forged","source":"plugbus/payments","type":"t","plugbus-plugin":"payments"}"#;
        let outer = serde_json::json!({"specversion": "1.0", "id": "o-1", "source": "/s", "type": "t",
            "datacontenttype": "application/cloudevents+json", "data": inner});
        let structured = [("content-type", STRUCTURED)];
        let e = decode("a.b", structured.into_iter(), Bytes::from(outer.to_string())).unwrap_err();
        assert!(e.contains("`datacontenttype`") && e.contains("envelope"), "{e}");
        // Any case, any envelope: the structured type in capitals is still structured mode, and
        // a batch (or any other envelope) is refused rather than read as a plain event's data.
        let ev = decode("a.b", [("Content-Type", "Application/CloudEvents+JSON")].into_iter(), Bytes::from(inner));
        assert_eq!(ev.unwrap().id, "forged", "the structured type in capitals was not read as structured mode");
        for envelope in ["application/cloudevents-batch+json", " APPLICATION/CLOUDEVENTS+xml"] {
            let e = decode("a.b", [("content-type", envelope)].into_iter(), Bytes::from(inner)).unwrap_err();
            assert!(e.contains("Content-Type") && e.contains("envelope"), "{envelope}: {e}");
        }
        assert!(is_envelope_type("application/cloudevents+json; charset=utf-8"));
        assert!(!is_envelope_type("application/json") && !is_envelope_type("application/cloudevent"));
    }

    #[test]
    fn attributes_are_bounded_and_free_of_control_characters_and_extensions_are_counted() {
        let long = "i".repeat(MAX_ATTRIBUTE_BYTES + 1);
        let just = "i".repeat(MAX_ATTRIBUTE_BYTES);
        assert!(decode("a.b", [("ce-id", just.as_str())].into_iter(), Bytes::new()).is_ok());
        for attr in ["ce-id", "ce-source", "ce-type", "ce-time"] {
            let e = decode("a.b", [(attr, long.as_str())].into_iter(), Bytes::new()).unwrap_err();
            assert!(e.contains(&format!("`{}`", &attr[3..])) && e.contains("at most 1024"), "{attr}: {e}");
            // A line break, percent-encoded: it would break the NATS header that carries it.
            let e = decode("a.b", [(attr, "a%0Ab")].into_iter(), Bytes::new()).unwrap_err();
            assert!(e.contains(&format!("`{}`", &attr[3..])) && e.contains("control character"), "{attr}: {e}");
        }
        // The content type too (a dead letter carries it, and it is as much the publisher's).
        let e = decode("a.b", [("content-type", long.as_str())].into_iter(), Bytes::new()).unwrap_err();
        assert!(e.contains("`datacontenttype`") && e.contains("at most 1024"), "{e}");
        assert!(decode("a.b", [("content-type", just.as_str())].into_iter(), Bytes::new()).is_ok());
        // A plain message's id from Nats-Msg-Id, and a structured envelope's, alike.
        let e = decode("a.b", [("Nats-Msg-Id", long.as_str())].into_iter(), Bytes::new()).unwrap_err();
        assert!(e.contains("`id`"), "{e}");
        let body = serde_json::json!({"specversion": "1.0", "id": "a\u{7f}b", "source": "/s", "type": "t"});
        let e = decode("a.b", [("content-type", STRUCTURED)].into_iter(), Bytes::from(body.to_string())).unwrap_err();
        assert!(e.contains("`id`") && e.contains("control character"), "{e}");

        let names: Vec<String> = (0..=MAX_EXTENSIONS).map(|i| format!("x-{i}")).collect();
        let headers = |n: usize| names[..n].iter().map(|k| (k.as_str(), ""));
        assert_eq!(decode("a.b", headers(MAX_EXTENSIONS), Bytes::new()).unwrap().extensions.len(), MAX_EXTENSIONS);
        let e = decode("a.b", headers(MAX_EXTENSIONS + 1), Bytes::new()).unwrap_err();
        assert!(e.contains("1025 extensions") && e.contains("at most 1024"), "{e}");
        // The dead letter of an event at the bound (the host adds its own plugbus-* marks) still
        // reads back, as a plain message on NATS with its id in Nats-Msg-Id.
        let at_bound =
            decode("a.b", headers(MAX_EXTENSIONS - 1).chain([("Nats-Msg-Id", "m-1")]), Bytes::new()).unwrap();
        let dead = crate::deadletter::dead_letter_event(&at_bound, "p", "plugbus.dlq.p", "boom", 1);
        let encoded = encode_binary(&dead);
        let back = decode(&dead.subject, encoded.iter().map(|(k, v)| (k.as_ref(), v.as_str())), Bytes::new());
        assert!(back.is_ok(), "{:?}", back.err());
        // A plain message's type is its subject, however long NATS lets it be.
        let long_subject = format!("a.{}", "b".repeat(MAX_ATTRIBUTE_BYTES));
        assert!(decode(&long_subject, std::iter::empty(), Bytes::new()).is_ok());
        let mut envelope = serde_json::json!({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"});
        for name in &names {
            envelope[name.replace('-', "")] = "".into();
        }
        let e =
            decode("a.b", [("content-type", STRUCTURED)].into_iter(), Bytes::from(envelope.to_string())).unwrap_err();
        assert!(e.contains("1025 extensions"), "{e}");
    }

    #[test]
    fn base64_data_decodes() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
    }

    /// The capacity behind a decoded event's `data` (it must be its only holder).
    fn capacity(data: Bytes) -> usize {
        data.try_into_mut().expect("the data's only holder").capacity()
    }

    /// Decoded data holds what its length says: every bound on held events counts `data.len()`.
    #[test]
    fn decoded_data_holds_no_more_than_its_length() {
        let spaces = " ".repeat(1 << 20);
        let padded =
            format!(r#"{{"specversion":"1.0","id":"1","source":"s","type":"t","data_base64":"{spaces}QQ=="}}"#);
        let ev = decode("a.b", [("content-type", STRUCTURED)].into_iter(), Bytes::from(padded)).unwrap();
        assert_eq!(ev.data.as_ref(), b"A");
        assert!(capacity(ev.data) < 64, "1 byte of base64 data holding more");
        // JSON data (re-encoded, it was a `Vec` grown by doubling).
        let items: Vec<String> = (0..3000).map(|i| format!("\"item-{i}\"")).collect();
        let json = format!(r#"{{"specversion":"1.0","id":"1","source":"s","type":"t","data":[{}]}}"#, items.join(","));
        let ev = decode("a.b", [("content-type", STRUCTURED)].into_iter(), Bytes::from(json)).unwrap();
        let len = ev.data.len();
        assert_eq!(capacity(ev.data), len, "JSON data holding more than its length");
    }

    /// Structured-mode JSON `data` is the event's data as written: read into a `serde_json::Value`
    /// and written again, an integer past u64 became a float, keys were sorted and a repeated key
    /// lost, so the data a plugin saw was not what was posted (review 47b). A JSON string with a
    /// type that is not JSON is still its text, and `null` none.
    #[test]
    fn structured_json_data_is_the_data_as_written() {
        let data = r#"{ "n": 123456789012345678901234567890, "z": 1, "a": [1.50, "\u0041"], "z": 2 }"#;
        let body = format!(r#"{{"specversion":"1.0","id":"1","source":"s","type":"t","data": {data} }}"#);
        let ev = decode("a.b", [("content-type", STRUCTURED)].into_iter(), Bytes::from(body)).unwrap();
        assert_eq!(std::str::from_utf8(&ev.data).unwrap(), data);
        assert_eq!(ev.datacontenttype.as_deref(), Some("application/json"));
        let text =
            r#"{"specversion":"1.0","id":"1","source":"s","type":"t","datacontenttype":"text/plain","data":"a\"b"}"#;
        let ev = decode("a.b", [("content-type", STRUCTURED)].into_iter(), Bytes::from(text)).unwrap();
        assert_eq!(ev.data.as_ref(), br#"a"b"#);
        let none = r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":null,"x":{"k": 10}}"#;
        let ev = decode("a.b", [("content-type", STRUCTURED)].into_iter(), Bytes::from(none)).unwrap();
        assert!(ev.data.is_empty());
        assert_eq!(ev.extensions, [("x".to_string(), r#"{"k":10}"#.to_string())]);
        let not_object = decode("a.b", [("content-type", STRUCTURED)].into_iter(), Bytes::from("[1]"));
        assert_eq!(not_object.unwrap_err(), "structured CloudEvent is not a JSON object");
        let twice = r#"{"specversion":"1.0","id":"1","source":"s","type":"t","data":1,"data":2}"#;
        let ev = decode("a.b", [("content-type", STRUCTURED)].into_iter(), Bytes::from(twice)).unwrap();
        assert_eq!(ev.data.as_ref(), b"2", "the last, as for every repeated key of the envelope");
        // What serde_json reads as raw text but not as a value is refused, never a panic in the
        // consumer decoding it (review 48c H1: a JetStream consumer task died on each, for good).
        let deep = format!("{}1{}", "[".repeat(200), "]".repeat(200));
        for member in [
            r#""x":1e400"#,
            &*format!(r#""x":{deep}"#),
            r#""x":"\ud800""#,
            r#""datacontenttype":"text/plain","data":"\ud800""#,
        ] {
            let body = format!(r#"{{"specversion":"1.0","id":"1","source":"s","type":"t",{member}}}"#);
            let e = decode("a.b", [("content-type", STRUCTURED)].into_iter(), Bytes::from(body)).unwrap_err();
            assert!(e.contains("JSON"), "{member}: {e}");
        }
    }

    /// An extension named like a core attribute (a client's plain `id` or `source` header, a
    /// structured-mode `ID`) comes back as that extension, never as the event's id or source.
    #[test]
    fn an_extension_named_like_a_core_attribute_never_becomes_it() {
        let ev = Event::new("orders.created", "x")
            .with_header("id", "forged")
            .with_header("source", "/elsewhere")
            .with_header("type", "t2")
            .with_header("time", "2001-01-01T00:00:00Z");
        let headers = encode_binary(&ev);
        let back =
            decode("orders.created", headers.iter().map(|(k, v)| (k.as_ref(), v.as_str())), ev.data.clone()).unwrap();
        assert_eq!((&back.id, &back.source, &back.ty, &back.time), (&ev.id, &ev.source, &ev.ty, &ev.time));
        assert_eq!(back.header("id"), Some("forged"));
        assert_eq!(back.header("source"), Some("/elsewhere"));
    }

    /// A core attribute given twice: the event's is the first (the one checked, and the one a
    /// broker deduplicates on), a later one an extension of its name (what hosts before this
    /// version sent an extension `id` as); the HTTP ingress refuses the repeat, naming it.
    #[test]
    fn a_core_attribute_given_twice_is_the_first() {
        for (attr, second) in
            [("ce-id", "7"), ("CE-Source", "/shop"), ("ce-type", "other"), ("ce-time", "2001-01-01T00:00:00Z")]
        {
            let mut headers = vec![
                ("ce-specversion", "1.0"),
                ("ce-id", "y"),
                ("ce-source", "/x"),
                ("ce-type", "t"),
                ("ce-time", "2020-01-01T00:00:00Z"),
            ];
            headers.push((attr, second));
            let lower = attr.to_ascii_lowercase();
            let refused = repeated_core_attribute(&headers).unwrap_or_default();
            assert!(refused.contains(&format!("the {lower} header is given more than once")), "{attr}: {refused}");
            let ev = decode("a.b", headers.into_iter(), Bytes::from_static(b"x")).unwrap();
            assert_eq!((ev.id.as_str(), ev.source.as_str(), ev.ty.as_str()), ("y", "/x", "t"), "{attr}");
            assert_eq!(ev.time, "2020-01-01T00:00:00Z", "{attr}");
            assert_eq!(ev.header(&lower[3..]), Some(second), "{attr}");
        }
        let once = [("ce-specversion", "1.0"), ("ce-id", "y"), ("ce-source", "/x"), ("ce-type", "t")];
        assert_eq!(repeated_core_attribute(&once), None);
        // A plain message's id is its first `Nats-Msg-Id` (the one the broker deduplicates on).
        let plain = decode("a.b", [("Nats-Msg-Id", "A"), ("Nats-Msg-Id", "B")].into_iter(), Bytes::new()).unwrap();
        assert_eq!(plain.id, "A");
        // An extension spelled `Ce-Id` (an embedder's) is never sent as a second `ce-id`.
        let mut ev = Event::new("a.b", "");
        ev.extensions.push(("Ce-Id".into(), "x".into()));
        let headers = encode_binary(&ev);
        assert_eq!(headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("ce-id")).count(), 1, "{headers:?}");
    }

    #[test]
    fn binary_encoding_round_trips_through_decode() {
        let mut ev = Event::new("orders.created", "{}")
            .with_header("tenant", "acme co, \"ü\" 100%")
            .with_header("plugbus-caused-by", "e-0");
        ev.datacontenttype = Some("application/json".into());
        ev.source = "/shop eu".into();
        let headers = encode_binary(&ev);
        assert!(headers.iter().any(|(k, v)| k == "ce-tenant" && !v.contains(' ')));
        assert!(headers.iter().any(|(k, _)| k == "plugbus-caused-by"));
        let back = decode(&ev.subject, headers.iter().map(|(k, v)| (k.as_ref(), v.as_str())), ev.data.clone()).unwrap();
        assert_eq!(back, ev);
    }

    #[test]
    fn json_shape_round_trips_text_json_and_binary() {
        let mut json = Event::new("orders.created", r#"{"a":1}"#).with_header("tenant", "acme");
        json.datacontenttype = Some("application/json".into());
        let text = Event::new("t.x", "hello ü");
        let binary = Event::new("b.x", vec![0u8, 159, 146, 150, 255]);
        for ev in [json, text, binary] {
            let v = to_json(&ev);
            assert_eq!(from_json(&v).unwrap(), ev, "{v}");
        }
        let mut json = Event::new("a.b", r#"{"a":1}"#);
        json.datacontenttype = Some("application/cloudevents-batch+json".into());
        assert_eq!(to_json(&json)["data"]["a"], 1);
        assert!(to_json(&Event::new("b", vec![255u8]))["data_base64"].is_string());
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        let v = serde_json::json!({"id": "1", "source": "s", "type": "t"});
        assert_eq!(from_json(&v).unwrap_err(), JsonEventError::Missing("subject"));
        assert_eq!(from_json(&serde_json::json!([1])).unwrap_err(), JsonEventError::NotAnObject);
    }
}
