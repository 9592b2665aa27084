//! The event: a CloudEvents 1.0 record as it moves through the host.
//!
//! Transports turn their wire format into an [`Event`]; the sandbox turns it into the WIT
//! record; what a plugin publishes comes back as an [`Output`] and becomes an [`Event`] again.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use std::time::SystemTime;

/// One event. Cheap to share: transports hand out `Arc<Event>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// CloudEvents `id`.
    pub id: String,
    /// CloudEvents `source`.
    pub source: String,
    /// CloudEvents `type`.
    pub ty: String,
    /// The subject it is published on.
    pub subject: String,
    /// CloudEvents `time`, RFC 3339.
    pub time: String,
    /// CloudEvents `datacontenttype`.
    pub datacontenttype: Option<String>,
    /// Extension attributes and transport headers, lower-case names.
    pub extensions: Vec<(String, String)>,
    /// The payload.
    pub data: Bytes,
    /// Where a reply should go.
    pub reply_to: Option<String>,
}

impl Event {
    /// A new event with a fresh time-ordered id, `type` = subject and `time` = now.
    pub fn new(subject: impl Into<String>, data: impl Into<Bytes>) -> Self {
        Self::identified(subject, data, new_id(), now_rfc3339())
    }

    /// A new event with this `id` and `time` (a decoder that read them makes none up), `type` =
    /// subject.
    pub fn identified(subject: impl Into<String>, data: impl Into<Bytes>, id: String, time: String) -> Self {
        let subject = subject.into();
        Self {
            id,
            source: "plugbus".into(),
            ty: subject.clone(),
            subject,
            time,
            datacontenttype: None,
            extensions: Vec::new(),
            data: data.into(),
            reply_to: None,
        }
    }

    /// Adds a header (extension attribute); the name is lower-cased.
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.extensions.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// The first header with this name (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.extensions.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The bytes of its headers' names and values (what an event held in memory is charged for
    /// them).
    pub fn header_bytes(&self) -> usize {
        self.extensions.iter().map(|(k, v)| k.len() + v.len()).sum()
    }

    /// What the event costs held in a buffer bounded in bytes (a plugin's overflow on the
    /// embedded bus, a page read back from its log, a NATS feed's budget): its data, strings
    /// (its content type and reply address too) and headers, each header
    /// [`crate::kv::ENTRY_COST`] more (100,000 empty headers are not free), and
    /// [`BUFFERED_ENTRY_COST`] for the event itself (nor are a million empty events).
    pub fn buffered_cost(&self) -> u64 {
        let optional =
            self.datacontenttype.as_ref().map_or(0, String::len) + self.reply_to.as_ref().map_or(0, String::len);
        let strings =
            self.id.len() + self.subject.len() + self.source.len() + self.ty.len() + self.time.len() + optional;
        let headers = self.extensions.len() as u64 * crate::kv::ENTRY_COST;
        BUFFERED_ENTRY_COST + headers + (self.data.len() + self.header_bytes() + strings) as u64
    }
}

/// What an event held in a buffer is charged on top of its data and headers (the event record,
/// its id strings, the queue slot).
pub const BUFFERED_ENTRY_COST: u64 = 512;

/// A fresh UUID v7 (time-ordered to the millisecond). The 74 random bits come from `fastrand`
/// (a per-thread generator seeded once) rather than the OS: `Uuid::now_v7` made one
/// `getrandom` syscall per event, 25k/s in the embedded-1 bench. Ids need to be unique, not
/// unguessable.
pub fn new_id() -> String {
    let millis = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    let mut random = [0u8; 10];
    fastrand::fill(&mut random);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid().to_string()
}

/// The current time as RFC 3339 with milliseconds. Formatted once per millisecond and thread:
/// every output and decoded event takes one, a hundred in a millisecond at speed.
pub fn now_rfc3339() -> String {
    thread_local! {
        static LAST: std::cell::RefCell<(u128, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let Ok(since_epoch) = now.duration_since(SystemTime::UNIX_EPOCH) else {
        return humantime::format_rfc3339_millis(now).to_string();
    };
    let millis = since_epoch.as_millis();
    let format = || humantime::format_rfc3339_millis(now).to_string();
    // Formatted anew where the thread's copy is gone (a destructor at the thread's end).
    LAST.try_with(|last| {
        let (at, text) = &mut *last.borrow_mut();
        if *at != millis || text.is_empty() {
            *at = millis;
            *text = format();
        }
        text.clone()
    })
    .unwrap_or_else(|_| format())
}

/// `plugbus/<plugin>`: the `source` of what the host makes for a plugin (outputs, requests,
/// replies, dead letters).
pub fn plugin_source(plugin: &str) -> String {
    let mut source = String::with_capacity("plugbus/".len() + plugin.len());
    source.push_str("plugbus/");
    source.push_str(plugin);
    source
}

/// What the host adds to an output's event, charged before it is built: its id, source
/// (`plugbus/` and a plugin name of up to 64 characters), type, time and `plugbus-caused-by`
/// header (the input's id, and [`crate::kv::ENTRY_COST`]).
pub const OUTPUT_ATTRIBUTES_COST: u64 = 384;

/// What a plugin published while handling one event; released only if the handler succeeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// Where it goes.
    pub subject: String,
    /// The payload.
    pub data: Bytes,
    /// Headers the plugin set; `datacontenttype` is lifted into the attribute.
    pub headers: Vec<(String, String)>,
}

impl Output {
    /// What the output costs held until it is released: the [`Event`] it becomes (its
    /// [`Event::buffered_cost`]: data, headers each [`crate::kv::ENTRY_COST`] more, the record,
    /// and [`OUTPUT_ATTRIBUTES_COST`] for what the host adds) and its subject once more, the
    /// output's own copy. Charged its data and header bytes alone, 100 outputs of a 1 KiB
    /// subject and 64 empty headers each were charged 6 KB and took 658 KB (review 44b).
    pub fn held_cost(&self) -> u64 {
        let headers: usize = self.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
        let per_header = self.headers.len() as u64 * crate::kv::ENTRY_COST;
        BUFFERED_ENTRY_COST
            + OUTPUT_ATTRIBUTES_COST
            + per_header
            + (2 * self.subject.len() + self.data.len() + headers) as u64
    }

    /// The event this output becomes. Its id is derived from (input source, input id, plugin,
    /// output index), so a redelivered input produces outputs with the same ids: transports
    /// deduplicate on it. Its `source` is `plugbus/<plugin>`, set by the host: the plugin cannot
    /// choose it (reserved names are refused at publish, see [`is_reserved_header`]). A
    /// `traceparent` / `tracestate` the plugin set is dropped: the host's context wins.
    pub fn into_event(self, input: &Event, plugin: &str, index: usize) -> Event {
        self.into_event_logged(input, plugin, index, None)
    }

    /// [`Output::into_event`] for an input the transport logged (the embedded durable log),
    /// whose [`content_digest`] is `content`: it is part of the id too. The log takes the same
    /// id twice as one output run again (a restart, a rewind), while it takes the same source and
    /// id sent twice as two events: without it, the outputs of a re-send with its data mended
    /// were dropped as the first's (review 61b F1). A re-send of the same content keeps its
    /// outputs' ids, so a plugin downstream still drops the copy by id (review 61e F3: the
    /// input's sequence number in the id took that away).
    pub fn into_event_logged(self, input: &Event, plugin: &str, index: usize, content: Option<&[u8; 32]>) -> Event {
        let (datacontenttype, mut extensions) = lift_headers(self.headers);
        extensions.push(("plugbus-caused-by".into(), input.id.clone()));
        let mut id = IdDigest::of(&input.source, &input.id, plugin, index);
        if let Some(content) = content {
            id = id.field(content);
        }
        Event {
            id: id.hex(),
            source: plugin_source(plugin),
            ty: self.subject.clone(),
            subject: self.subject,
            time: now_rfc3339(),
            datacontenttype,
            extensions,
            data: self.data,
            reply_to: None,
        }
    }
}

impl Output {
    /// The event a plugin's request sends: a fresh id (every request is a new question),
    /// `source` = `plugbus/<plugin>`, `plugbus-caused-by` = the event being handled; the reply
    /// address is the transport's to set.
    pub fn into_request(self, caused_by: &str, plugin: &str) -> Event {
        let (datacontenttype, mut extensions) = lift_headers(self.headers);
        extensions.push(("plugbus-caused-by".into(), caused_by.to_string()));
        Event {
            id: new_id(),
            source: plugin_source(plugin),
            ty: self.subject.clone(),
            subject: self.subject,
            time: now_rfc3339(),
            datacontenttype,
            extensions,
            data: self.data,
            reply_to: None,
        }
    }

    /// The reply a plugin gave to `input` (a request): on the subject asked on, its id derived
    /// from (input source, input id, plugin) like an output's, so a retried attempt's reply has
    /// the same id.
    pub fn into_reply(self, input: &Event, plugin: &str) -> Event {
        let (datacontenttype, mut extensions) = lift_headers(self.headers);
        extensions.push(("plugbus-caused-by".into(), input.id.clone()));
        Event {
            id: output_id(&input.source, &input.id, plugin, usize::MAX),
            source: plugin_source(plugin),
            ty: input.subject.clone(),
            subject: input.subject.clone(),
            time: now_rfc3339(),
            datacontenttype,
            extensions,
            data: self.data,
            reply_to: None,
        }
    }
}

/// A plugin's headers as an event's (an output, a request, a reply): `datacontenttype` (or
/// `content-type`) lifted into the attribute, names lower-cased. Reserved names are refused at
/// the call already and dropped here too, so no path lets one through. A `traceparent` /
/// `tracestate` is dropped: a trace context is the host's to set (dispatch sets the attempt's
/// on outputs, `telemetry::set_context`), and a plugin choosing one would pick the parent and
/// the sampling of another plugin's spans.
fn lift_headers(headers: Vec<(String, String)>) -> (Option<String>, Vec<(String, String)>) {
    let mut datacontenttype = None;
    let mut extensions = Vec::with_capacity(headers.len() + 1);
    for (mut k, v) in headers {
        k.make_ascii_lowercase();
        if k == "datacontenttype" || k == "content-type" {
            datacontenttype = Some(v);
        } else if !is_reserved_header(&k) && !crate::telemetry::is_trace_header(&k) {
            extensions.push((k, v));
        }
    }
    (datacontenttype, extensions)
}

/// Deterministic id of the `index`th output of `plugin` for the input (`input_source`,
/// `input_id`). CloudEvents ids are unique per source only, so the source is part of it: a
/// publisher reusing another's `id` does not make its outputs look like duplicates. Each field
/// is length-prefixed, so no two different inputs hash the same bytes.
pub fn output_id(input_source: &str, input_id: &str, plugin: &str, index: usize) -> String {
    IdDigest::of(input_source, input_id, plugin, index).hex()
}

/// SHA-256 of what a producer says of an event: its subject, `type`, `datacontenttype` (its
/// presence too) and data, each length-prefixed; what its outputs' ids take in on the durable
/// log ([`Output::into_event_logged`]), made once per attempt. Not its extensions: an HTTP
/// client's other headers are extensions too (a proxy's `x-request-id`, `date`), and a retry
/// through one would get new output ids, which downstream could not drop (review 61g F2 asked
/// for them; a re-send that mends only an extension keeps its ids).
pub fn content_digest(ev: &Event) -> [u8; 32] {
    let mut digest = Sha256::new();
    let content_type = ev.datacontenttype.as_deref().map(str::as_bytes);
    for field in [
        ev.subject.as_bytes(),
        ev.ty.as_bytes(),
        &[u8::from(content_type.is_some())],
        content_type.unwrap_or_default(),
        &ev.data,
    ] {
        digest.update((field.len() as u64).to_be_bytes());
        digest.update(field);
    }
    digest.finalize().into()
}

/// The hash behind [`output_id`], which may take more fields after it (a dead letter's id takes
/// its event's subject and data: [`crate::deadletter::dead_letter_id`]).
pub(crate) struct IdDigest(Sha256);

impl IdDigest {
    /// The digest [`output_id`] makes of these.
    pub(crate) fn of(input_source: &str, input_id: &str, plugin: &str, index: usize) -> Self {
        let mut digest = IdDigest(Sha256::new());
        for field in [input_source, input_id, plugin] {
            digest = digest.field(field.as_bytes());
        }
        digest.0.update((index as u64).to_be_bytes());
        digest
    }

    /// Adds `bytes`, length-prefixed (no two different lists of fields hash the same bytes).
    pub(crate) fn field(mut self, bytes: &[u8]) -> Self {
        self.0.update((bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
        self
    }

    /// The first 16 bytes of the hash, as 32 hex digits.
    pub(crate) fn hex(self) -> String {
        let digest = self.0.finalize();
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut id = String::with_capacity(32);
        for b in &digest[..16] {
            id.push(HEX[usize::from(b >> 4)] as char);
            id.push(HEX[usize::from(b & 0xf)] as char);
        }
        id
    }
}

/// CloudEvents context attributes the host sets on every event it publishes.
const CORE_ATTRIBUTES: &[&str] = &["id", "source", "type", "time", "specversion", "subject", "datacontenttype"];

/// Whether a plugin may not set the output header `name`: the host's own headers and the
/// event's identity, which downstream plugins, dead-letter handling and dedup trust.
///
/// Reserved (ASCII case-insensitive): `plugbus-*` (the host's marks: dead letters, causes),
/// `nats-*` (headers the NATS server acts on: `Nats-Msg-Id` dedup, `Nats-Rollup`, expected
/// sequences, TTLs), and the CloudEvents core attributes `id`, `source`, `type`, `time`,
/// `specversion`, `subject`, `datacontenttype`, each also with a `ce-` or `ce_` prefix (how
/// the binary bindings spell them), which also covers `ce-plugbus-*`.
///
/// Not reserved: `datacontenttype` and `content-type` without a prefix. They say what the
/// plugin's own data is (the SDK's `publish_json` sets `datacontenttype: application/json`);
/// the host lifts them into the output's `datacontenttype` attribute.
pub fn is_reserved_header(name: &str) -> bool {
    // ASCII case-insensitive throughout, without a lower-cased copy (every output header of
    // every event passes here).
    let is = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
    if is(name, "datacontenttype") || is(name, "content-type") {
        return false;
    }
    let base = without_ce_prefix(name);
    // `data` and `data_base64` are where the JSON format keeps the data: as headers they were
    // taken for it by `plugbus tail --record`, `dlq export` and `plugbus test`.
    names_the_host_or_broker(name)
        || CORE_ATTRIBUTES.iter().any(|a| is(base, a))
        || is(base, "data")
        || is(base, "data_base64")
}

/// Whether `name` is one of the host's marks (`plugbus-*`) or a header the NATS server acts on
/// (`nats-*`), `_` alike, with or without a `ce-` / `ce_` prefix (ASCII case-insensitive): what
/// neither a plugin nor an API client may give.
pub fn names_the_host_or_broker(name: &str) -> bool {
    let base = without_ce_prefix(name);
    ["plugbus-", "plugbus_", "nats-", "nats_"].iter().any(|p| starts_ignoring_case(base, p))
}

/// `name` without a leading `ce-` / `ce_` (ASCII case-insensitive).
fn without_ce_prefix(name: &str) -> &str {
    // (Slicing at the prefix's length is safe once it matched: the prefixes are ASCII.)
    if starts_ignoring_case(name, "ce-") || starts_ignoring_case(name, "ce_") { &name[3..] } else { name }
}

fn starts_ignoring_case(s: &str, prefix: &str) -> bool {
    s.as_bytes().get(..prefix.len()).is_some_and(|h| h.eq_ignore_ascii_case(prefix.as_bytes()))
}

/// How many bytes of a string a plugin (or a remote publisher) controls the host repeats in a
/// log line, an error message or a dead-letter header: failure text, subjects, keys, header
/// names. The rest is cut by [`cut`], saying where.
pub const ECHO_BYTES: usize = 4096;

/// The one place that decides how much of an untrusted string is echoed: `None` when `text`
/// fits in `limit`, else the byte index to cut it at (always a character boundary). Each
/// character counts `weight(c)`: its UTF-8 length for plain text, (at least) its escaped length
/// for quoted text, so quoting never makes an echo longer than `limit`. Stops at the limit: a
/// 48 MiB string costs 4 KiB of work.
fn cut_point(text: &str, limit: usize, weight: impl Fn(char) -> usize) -> Option<usize> {
    let mut used = 0;
    for (i, c) in text.char_indices() {
        used += weight(c);
        if used > limit {
            return Some(i);
        }
    }
    None
}

/// What follows a cut string: where it was cut and how long it was.
fn cut_note(end: usize, len: usize) -> String {
    format!("… [cut at {end} of {len} bytes]")
}

/// `text` itself when it is at most `limit` bytes, else its first `limit` bytes followed by
/// `… [cut at <limit> of <len> bytes]`. Use [`cut`] (the [`ECHO_BYTES`] limit) unless a larger
/// whole is being bounded.
pub fn cut_to(text: &str, limit: usize) -> std::borrow::Cow<'_, str> {
    match cut_point(text, limit, char::len_utf8) {
        None => std::borrow::Cow::Borrowed(text),
        Some(end) => std::borrow::Cow::Owned(format!("{}{}", &text[..end], cut_note(end, text.len()))),
    }
}

/// `text` on one line: each control character (a line break, a carriage return, an escape) and
/// each bidirectional mark or override written out as Rust escapes it (`\n`, `\u{1b}`,
/// `\u{202e}`). For what a plugin writes into the host's log and its failure reports: a line
/// break in it would start a line of its own in the log, one that can pose as the host's
/// (`… ERROR plugbus: event dead-lettered plugin=payments …`), an override would show the rest
/// of the host's line reordered (`plugin=` and `event_id=` read backwards), and NATS cannot carry
/// a line break in a dead letter's `plugbus-error` header.
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains(breaks_line) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut line = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        if breaks_line(c) {
            line.extend(c.escape_default());
        } else {
            line.push(c);
        }
    }
    std::borrow::Cow::Owned(line)
}

/// Whether [`one_line`] escapes `c`. Unicode's line and paragraph separators end a line too,
/// for some readers.
fn breaks_line(c: char) -> bool {
    c.is_control()
        || matches!(c, '\u{2028}' | '\u{2029}')
        || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
}

/// `text` on one line ([`one_line`]), its escaped form at most `limit` bytes followed by
/// `… [cut at <end> of <len> bytes]` (`end` in `text`) when cut: cut before it is escaped, so a
/// huge text is never escaped whole (4 MiB of control characters made 21 MiB).
pub fn one_line_cut(text: &str, limit: usize) -> String {
    let escaped_len = |c: char| if breaks_line(c) { c.escape_default().len() } else { c.len_utf8() };
    match cut_point(text, limit, escaped_len) {
        None => one_line(text).into_owned(),
        Some(end) => format!("{}{}", one_line(&text[..end]), cut_note(end, text.len())),
    }
}

/// What a caught panic said (its message, on one line, at most `limit` bytes), for the log line
/// that reports it as the host's.
pub fn panic_text(panic: &(dyn std::any::Any + Send), limit: usize) -> String {
    let what = panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into());
    one_line_cut(&what, limit)
}

/// A copy of `data` in an allocation of its own, for an event's data. A NATS payload and an HTTP
/// body are slices of the buffer they were read into (async-nats's connection buffer, hyper's):
/// held, even a 1-byte one keeps that whole buffer alive, with the headers and other messages
/// read into it (a hostile publisher's 1 MiB message beside each small one it knows will be
/// kept, a 400 KiB `Cookie` beside a 1-byte body). Every bound on held events counts
/// `data.len()`: a held event must cost what its bytes say.
pub fn owned_data(data: &[u8]) -> Bytes {
    Bytes::copy_from_slice(data)
}

/// [`cut_to`] at [`ECHO_BYTES`]: for failure text a plugin wrote (a reject or retry message, a
/// panic message).
pub fn cut(text: &str) -> std::borrow::Cow<'_, str> {
    cut_to(text, ECHO_BYTES)
}

/// `text` quoted and escaped like `{:?}`, at most [`ECHO_BYTES`] of escaped text (a 48 MiB
/// subject is never escaped in full): for echoing subjects, keys and header names inside a
/// message.
pub fn quoted(text: &str) -> String {
    match cut_point(text, ECHO_BYTES, |c| c.escape_debug().len()) {
        None => format!("{text:?}"),
        Some(end) => format!("{:?}{}", &text[..end], cut_note(end, text.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A long text with control characters is cut before it is escaped, to at most `limit`
    /// escaped bytes, and the note says where in the text it was cut; plain text is cut as
    /// [`cut_to`] cuts it.
    #[test]
    fn one_line_cut_escapes_no_more_than_it_keeps() {
        let controls = "\u{1}".repeat(1 << 20);
        let line = one_line_cut(&controls, 4096);
        assert_eq!(line, format!("{}… [cut at 819 of 1048576 bytes]", "\\u{1}".repeat(819)));
        let plain = "E".repeat(1 << 20);
        assert_eq!(one_line_cut(&plain, 4096), cut_to(&plain, 4096));
        assert_eq!(one_line_cut("a\nb", 4096), "a\\nb");
    }

    /// An output is charged at least what the event it becomes costs held, whatever its shape:
    /// many empty headers, a long subject (review 44b: 6 KB charged for 658 KB).
    #[test]
    fn an_output_is_charged_at_least_the_event_it_becomes() {
        let input = Event::new("orders.created", b"{}".to_vec());
        let shapes = [
            Output {
                subject: "s".repeat(1024),
                data: Bytes::new(),
                headers: (0..64).map(|i| (format!("h{i}"), String::new())).collect(),
            },
            Output { subject: "out.x".into(), data: Bytes::from(vec![0u8; 100_000]), headers: Vec::new() },
            Output {
                subject: "out.y".into(),
                data: Bytes::new(),
                headers: vec![("content-type".into(), "text/plain".into())],
            },
        ];
        for (i, o) in shapes.into_iter().enumerate() {
            let charged = o.held_cost();
            let event = o.clone().into_event(&input, &"p".repeat(64), i);
            assert!(
                charged >= event.buffered_cost(),
                "shape {i}: charged {charged}, the event costs {}",
                event.buffered_cost()
            );
        }
    }

    #[test]
    fn the_time_is_now_to_the_millisecond_on_every_call() {
        for _ in 0..3 {
            let before = SystemTime::now();
            let text = now_rfc3339();
            let after = SystemTime::now();
            let time = humantime::parse_rfc3339(&text).expect("RFC 3339");
            let millis = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_millis();
            assert!(millis(before) <= millis(time) && millis(time) <= millis(after), "{text}");
            assert_eq!(text.len(), "2026-12-02T13:34:29.123Z".len(), "{text}");
            // The next millisecond's is formatted anew, not the one kept for this one.
            std::thread::sleep(std::time::Duration::from_millis(3));
        }
    }

    /// On the durable log the input's subject and data are part of an output's id: the same
    /// event run again, or sent again as it was, keeps its outputs' ids; another sent under the
    /// same source and id with other data (or on another subject) gets its own.
    #[test]
    fn an_output_id_on_the_log_takes_in_its_inputs_content() {
        let input = Event::new("orders.created", "x");
        let mut mended = input.clone();
        mended.data = "y".into();
        let mut moved = input.clone();
        moved.subject = "orders.updated".into();
        let mut retyped = input.clone();
        retyped.ty = "order.cancelled".into();
        let mut recontent = input.clone();
        recontent.datacontenttype = Some("application/json".into());
        let mut empty_content = input.clone();
        empty_content.datacontenttype = Some(String::new());
        let mut tagged = input.clone();
        tagged.extensions.push(("x-request-id".into(), "r2".into()));
        let out = || Output { subject: "o.x".into(), data: b"d".to_vec().into(), headers: vec![] };
        let id = |ev: &Event, logged: bool| {
            let content = content_digest(ev);
            out().into_event_logged(ev, "p", 0, logged.then_some(&content)).id
        };
        assert_eq!(id(&input, true), id(&input.clone(), true));
        assert_ne!(id(&input, true), id(&mended, true));
        assert_ne!(id(&input, true), id(&moved, true));
        for mended in [&retyped, &recontent, &empty_content] {
            assert_ne!(id(&input, true), id(mended, true), "{mended:?}");
        }
        assert_eq!(id(&input, true), id(&tagged, true), "a proxy's header on a retry");
        assert_ne!(id(&input, true), id(&input, false));
        assert_eq!(id(&input, false), out().into_event(&input, "p", 0).id);
        assert_eq!(id(&input, false), output_id(&input.source, &input.id, "p", 0));
        // fields are length-prefixed
        let (a, b) = (Event::new("a.b", "cd"), Event::new("a.bc", "d"));
        assert_ne!(content_digest(&a), content_digest(&b));
    }

    #[test]
    fn output_ids_are_stable_and_distinct() {
        assert_eq!(output_id("s", "e1", "p", 0), output_id("s", "e1", "p", 0));
        assert_ne!(output_id("s", "e1", "p", 0), output_id("s", "e1", "p", 1));
        assert_ne!(output_id("s", "e1", "p", 0), output_id("s", "e1", "q", 0));
        // CloudEvents ids are unique per source: another source reusing the id is another event
        assert_ne!(output_id("s", "e1", "p", 0), output_id("t", "e1", "p", 0));
        // fields are length-prefixed: moving bytes between them changes the id
        assert_ne!(output_id("ab", "c", "p", 0), output_id("a", "bc", "p", 0));
        assert_eq!(output_id("s", "e1", "p", 0).len(), 32);
        // The first 16 bytes of SHA-256 over each field length-prefixed (u64 big-endian), then
        // the index (u64 big-endian), lower-case hex.
        let mut h = Sha256::new();
        h.update(b"\0\0\0\0\0\0\0\x01s\0\0\0\0\0\0\0\x02e1\0\0\0\0\0\0\0\x01p\0\0\0\0\0\0\0\0");
        let want: String = h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(output_id("s", "e1", "p", 0), want);
    }

    #[test]
    fn new_ids_are_version_7_uuids_and_distinct() {
        let ids: std::collections::HashSet<String> = (0..10_000).map(|_| new_id()).collect();
        assert_eq!(ids.len(), 10_000);
        for id in ids.iter().take(10) {
            let uuid = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(uuid.get_version_num(), 7, "{id}");
            let (secs, _) = uuid.get_timestamp().unwrap().to_unix();
            let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
            assert!(now.abs_diff(secs) < 60, "{id} is not stamped now");
        }
    }

    #[test]
    fn a_plugins_trace_context_never_reaches_its_outputs_requests_or_replies() {
        let input = Event::new("a", "x");
        let out = || Output {
            subject: "b".into(),
            data: Bytes::from_static(b"{}"),
            headers: vec![
                ("traceparent".into(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
                ("TraceState".into(), "x=1".into()),
                ("k".into(), "v".into()),
            ],
        };
        for ev in [out().into_event(&input, "p", 0), out().into_request(&input.id, "p"), out().into_reply(&input, "p")]
        {
            assert_eq!(ev.header("traceparent"), None, "{ev:?}");
            assert_eq!(ev.header("tracestate"), None, "{ev:?}");
            assert_eq!(ev.header("k"), Some("v"));
        }
    }

    #[test]
    fn output_lifts_content_type_and_links_its_cause() {
        let input = Event::new("a", "x");
        let out = Output {
            subject: "b".into(),
            data: Bytes::from_static(b"{}"),
            headers: vec![("DataContentType".into(), "application/json".into()), ("k".into(), "v".into())],
        };
        let ev = out.into_event(&input, "p", 0);
        assert_eq!(ev.datacontenttype.as_deref(), Some("application/json"));
        assert_eq!(ev.header("k"), Some("v"));
        assert_eq!(ev.header("plugbus-caused-by"), Some(input.id.as_str()));
        assert_eq!(ev.source, "plugbus/p");
    }

    #[test]
    fn reserved_headers_are_the_hosts_marks_and_the_core_attributes_in_every_spelling() {
        for name in [
            "plugbus-error",
            "PLUGBUS-ORIGINAL-SUBJECT",
            "plugbus-plugin",
            "plugbus-caused-by",
            "plugbus_error",
            "ce-plugbus-error",
            "id",
            "ID",
            "source",
            "ce-source",
            "CE_Source",
            "type",
            "time",
            "specversion",
            "ce-specversion",
            "subject",
            "ce-subject",
            "ce-datacontenttype",
            "ce_datacontenttype",
            "Nats-Msg-Id",
            "nats-rollup",
            "Nats-Expected-Last-Sequence",
            "data",
            "Data_Base64",
            "ce-data",
        ] {
            assert!(is_reserved_header(name), "{name} should be reserved");
        }
        let free = ["datacontenttype", "Content-Type", "order-id", "tenant", "traceparent", "ce-tenant", "sourcecode"];
        for name in free.into_iter().chain(["database", "data-center"]) {
            assert!(!is_reserved_header(name), "{name} should be free");
        }
        // Names that are not ASCII are looked at byte by byte (never sliced inside a character)
        // and match nothing reserved: `ı` and `K` (Kelvin) do not fold to ASCII.
        for name in ["cé-source", "c\u{e9}", "é", "ce-ıd", "\u{212a}", "ce-", "ce_", "", "nats\u{2010}msg-id"] {
            assert!(!is_reserved_header(name), "{name} should be free");
        }
        assert!(is_reserved_header("ce-plugbus-é"), "a reserved prefix is reserved whatever follows");
    }

    #[test]
    fn reserved_headers_never_reach_an_output_event() {
        let input = Event::new("a", "x");
        let out = Output {
            subject: "b".into(),
            data: Bytes::new(),
            headers: vec![("ce-source".into(), "forged".into()), ("plugbus-error".into(), "x".into())],
        };
        let ev = out.into_event(&input, "p", 0);
        assert_eq!(ev.source, "plugbus/p");
        assert!(ev.header("ce-source").is_none() && ev.header("plugbus-error").is_none());
    }

    #[test]
    fn untrusted_text_is_cut_saying_where() {
        assert_eq!(cut("short"), "short");
        assert_eq!(one_line("one line, é"), "one line, é");
        assert_eq!(one_line("a\n2026 ERROR plugbus: forged\r\u{1b}[2J"), "a\\n2026 ERROR plugbus: forged\\r\\u{1b}[2J");
        assert_eq!(one_line("a\u{2028}b\u{2029}c\u{85}d\x0be"), "a\\u{2028}b\\u{2029}c\\u{85}d\\u{b}e");
        // A bidirectional override or isolate would show the rest of the host's line reordered.
        assert_eq!(
            one_line("ok \u{202e}deilppa\u{202c} \u{2066}x\u{2069}\u{200f}\u{61c}"),
            "ok \\u{202e}deilppa\\u{202c} \\u{2066}x\\u{2069}\\u{200f}\\u{61c}"
        );
        assert_eq!(one_line("שלום עולם"), "שלום עולם", "right-to-left text itself is kept");
        let long = "E".repeat(16 << 20);
        let c = cut(&long);
        assert!(c.starts_with(&"E".repeat(ECHO_BYTES)));
        assert!(c.ends_with("… [cut at 4096 of 16777216 bytes]"), "{}", &c[ECHO_BYTES..]);
        assert!(c.len() < ECHO_BYTES + 64);
        // never inside a character
        let wide = "é".repeat(3000);
        let c = cut(&wide);
        assert!(c.ends_with("… [cut at 4096 of 6000 bytes]"), "{}", &c[4000..]);
        // quoting escapes only what is kept
        let q = quoted(&"\n".repeat(1 << 20));
        assert!(q.len() < ECHO_BYTES + 64, "{}", q.len());
        assert!(q.ends_with("… [cut at 2048 of 1048576 bytes]"), "{}", &q[4000..]);
        assert_eq!(quoted("a.b"), "\"a.b\"");
    }
}
