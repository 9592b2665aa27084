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
        let subject = subject.into();
        Self {
            id: new_id(),
            source: "plugbus".into(),
            ty: subject.clone(),
            subject,
            time: now_rfc3339(),
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
}

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

/// The current time as RFC 3339 with milliseconds.
pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

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
    /// The event this output becomes. Its id is derived from (input id, plugin, output index),
    /// so a redelivered input produces outputs with the same ids: transports deduplicate on it.
    pub fn into_event(self, input: &Event, plugin: &str, index: usize) -> Event {
        let mut datacontenttype = None;
        let mut extensions = Vec::with_capacity(self.headers.len() + 1);
        for (k, v) in self.headers {
            let k = k.to_ascii_lowercase();
            if k == "datacontenttype" || k == "content-type" {
                datacontenttype = Some(v);
            } else {
                extensions.push((k, v));
            }
        }
        extensions.push(("plugbus-caused-by".into(), input.id.clone()));
        Event {
            id: output_id(&input.id, plugin, index),
            source: format!("plugbus/{plugin}"),
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

/// Deterministic id of the `index`th output of `plugin` for input `input_id`.
pub fn output_id(input_id: &str, plugin: &str, index: usize) -> String {
    let mut h = Sha256::new();
    h.update(input_id.as_bytes());
    h.update([0]);
    h.update(plugin.as_bytes());
    h.update([0]);
    h.update((index as u64).to_be_bytes());
    let digest = h.finalize();
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for b in &digest[..16] {
        id.push(HEX[usize::from(b >> 4)] as char);
        id.push(HEX[usize::from(b & 0xf)] as char);
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_ids_are_stable_and_distinct() {
        assert_eq!(output_id("e1", "p", 0), output_id("e1", "p", 0));
        assert_ne!(output_id("e1", "p", 0), output_id("e1", "p", 1));
        assert_ne!(output_id("e1", "p", 0), output_id("e1", "q", 0));
        assert_eq!(output_id("e1", "p", 0).len(), 32);
        // The first 16 bytes of SHA-256("e1\0p\0" + 0u64 big-endian), lower-case hex.
        let mut h = Sha256::new();
        h.update(b"e1\0p\0\0\0\0\0\0\0\0\0");
        let want: String = h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(output_id("e1", "p", 0), want);
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
}
