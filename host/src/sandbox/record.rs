//! What one attempt saw: the kv values and config values it read and what it logged, kept
//! (bounded) so a dead letter can say what its failed attempt saw and be run again exactly
//! (`POST /v1/dlq/{id}/debug`). Capturing costs a copy of each kv value read, at most
//! [`MAX_SEEN_BYTES`] per attempt; the record is kept only when the delivery is dead-lettered.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The most bytes one attempt's record holds (values, keys, lines): past it, what does not
/// fit is left out and the record is marked `truncated`.
pub const MAX_SEEN_BYTES: usize = 1 << 20;

/// What a recorded kv read costs on top of its key's and value's bytes: its `KvRead` in a
/// vector that doubles as it grows, and an allocation's rounding for each of its two strings.
const KV_READ_COST: usize = 2 * std::mem::size_of::<KvRead>() + 32;

/// What a recorded config key costs on top of its key's and value's bytes: a B-tree slot of
/// two strings in nodes about half full, and the rounding of its allocations (measured: 30,070
/// keys of 1–3 bytes took 3.5 MB, 116 bytes each, where a flat 32 bytes an item was charged).
const CONFIG_COST: usize = 128;

/// What a recorded line costs on top of its bytes: its `String` in a vector that doubles as
/// it grows, and an allocation's rounding.
const LINE_COST: usize = 2 * std::mem::size_of::<String>() + 16;

/// One kv key the attempt read from the store (not its own writes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvRead {
    /// The key.
    pub key: String,
    /// The value read, when it is UTF-8 (absent keys have neither `value` nor `value_base64`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The value read, when it is not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value_base64: Option<String>,
    /// The version it had (0: absent).
    pub version: u64,
    /// The value did not fit the record and was left out.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cut: bool,
}

impl KvRead {
    /// The value's bytes (`None`: absent, or cut).
    pub fn bytes(&self) -> Option<Vec<u8>> {
        match (&self.value, &self.value_base64) {
            (Some(v), _) => Some(v.clone().into_bytes()),
            (None, Some(b)) => crate::cloudevents::base64_decode(b),
            (None, None) => None,
        }
    }
}

/// What an attempt saw, bounded by [`MAX_SEEN_BYTES`] of what it costs in memory (each item
/// charged its bytes and what holding it costs). Read back (a dead letter's record from
/// `dlq.redb` after a restart), it is charged again from what it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "SeenParts")]
pub struct Seen {
    /// The kv keys read from the store, in the order first read.
    #[serde(default)]
    pub kv: Vec<KvRead>,
    /// The config keys read and their values (`null`: not set).
    #[serde(default)]
    pub config: BTreeMap<String, Option<String>>,
    /// The guest's stdout lines.
    #[serde(default)]
    pub stdout: Vec<String>,
    /// The guest's stderr lines.
    #[serde(default)]
    pub stderr: Vec<String>,
    /// What it logged through the `logging` import (`LEVEL message`).
    #[serde(default)]
    pub logs: Vec<String>,
    /// Something did not fit and was left out (or the guest's own output was cut).
    #[serde(default)]
    pub truncated: bool,
    #[serde(skip)]
    bytes: usize,
}

/// What a config key read costs recorded.
fn config_cost(key: &str, value: Option<&str>) -> usize {
    key.len() + value.map_or(0, str::len) + CONFIG_COST
}

/// What a line of `len` bytes costs recorded.
fn line_cost(len: usize) -> usize {
    len + LINE_COST
}

/// A [`Seen`] as written, charged once read ([`Seen::held`]).
#[derive(Deserialize)]
struct SeenParts {
    #[serde(default)]
    kv: Vec<KvRead>,
    #[serde(default)]
    config: BTreeMap<String, Option<String>>,
    #[serde(default)]
    stdout: Vec<String>,
    #[serde(default)]
    stderr: Vec<String>,
    #[serde(default)]
    logs: Vec<String>,
    #[serde(default)]
    truncated: bool,
}

impl From<SeenParts> for Seen {
    fn from(p: SeenParts) -> Self {
        let SeenParts { kv, config, stdout, stderr, logs, truncated } = p;
        let mut seen = Seen { kv, config, stdout, stderr, logs, truncated, bytes: 0 };
        seen.bytes = seen.held();
        seen
    }
}

impl Seen {
    /// Takes `n` bytes of the budget (an item's bytes and what holding it costs) when they
    /// fit; otherwise marks the record truncated.
    fn charge(&mut self, n: usize) -> bool {
        if self.bytes + n > MAX_SEEN_BYTES {
            self.truncated = true;
            return false;
        }
        self.bytes += n;
        true
    }

    /// What it holds, charged as it was recorded (each item by the same rule as when it was
    /// recorded: [`KvRead`]'s key and value, a config key, a line).
    fn held(&self) -> usize {
        let value =
            |r: &KvRead| r.value.as_ref().map_or(0, String::len) + r.value_base64.as_ref().map_or(0, String::len);
        let kv: usize = self.kv.iter().map(|r| r.key.len() + KV_READ_COST + value(r)).sum();
        let config: usize = self.config.iter().map(|(k, v)| config_cost(k, v.as_deref())).sum();
        let lines: usize =
            [&self.stdout, &self.stderr, &self.logs].iter().flat_map(|l| l.iter()).map(|l| line_cost(l.len())).sum();
        kv + config + lines
    }

    /// The bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Records a kv read from the store.
    pub fn kv_read(&mut self, key: &str, value: Option<&[u8]>, version: u64) {
        if !self.charge(key.len() + KV_READ_COST) {
            return;
        }
        let mut read = KvRead { key: key.to_string(), version, ..KvRead::default() };
        if let Some(v) = value {
            let (text, b64) = match std::str::from_utf8(v) {
                Ok(t) => (Some(t), None),
                Err(_) => (None, Some(crate::cloudevents::base64_encode(v))),
            };
            let len = text.map_or(0, str::len) + b64.as_ref().map_or(0, String::len);
            if self.charge(len) {
                read.value = text.map(str::to_owned);
                read.value_base64 = b64;
            } else {
                read.cut = true;
            }
        }
        self.kv.push(read);
    }

    /// Records a config read (the first read of a key).
    pub fn config_read(&mut self, key: &str, value: Option<&str>) {
        if self.config.contains_key(key) || !self.charge(config_cost(key, value)) {
            return;
        }
        self.config.insert(key.to_string(), value.map(str::to_owned));
    }

    /// Records a line the handler logged.
    pub fn log(&mut self, level: &str, message: &str) {
        if self.charge(line_cost(level.len() + 1 + message.len())) {
            self.logs.push(format!("{level} {message}"));
        }
    }

    /// Records the guest's stdout or stderr lines; `dropped`: bytes its capture already cut.
    pub fn output(&mut self, stderr: bool, lines: Vec<String>, dropped: usize) {
        if dropped > 0 {
            self.truncated = true;
        }
        for line in lines {
            if !self.charge(line_cost(line.len())) {
                return;
            }
            if stderr { &mut self.stderr } else { &mut self.stdout }.push(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_record_is_bounded_and_says_so() {
        let mut s = Seen::default();
        s.kv_read("small", Some(b"1"), 3);
        s.kv_read("big", Some(&vec![b'x'; MAX_SEEN_BYTES]), 1);
        s.kv_read("bin", Some(&[0xff, 0]), 2);
        s.kv_read("gone", None, 0);
        assert!(s.truncated);
        assert!(s.bytes() <= MAX_SEEN_BYTES);
        assert_eq!(s.kv[0].bytes(), Some(b"1".to_vec()));
        assert!(s.kv[1].cut && s.kv[1].bytes().is_none() && s.kv[1].version == 1);
        assert_eq!(s.kv[2].bytes(), Some(vec![0xff, 0]));
        assert_eq!((s.kv[3].bytes(), s.kv[3].version), (None, 0));
        s.config_read("limit", Some("3"));
        s.config_read("limit", Some("changed"));
        assert_eq!(s.config["limit"].as_deref(), Some("3"));
        let back: Seen = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back.kv, s.kv);
    }

    /// A record read back (from `dlq.redb`, after a restart) is charged what it holds, as when
    /// it was recorded: it came back charged 0 bytes, so the dead-letter store took another
    /// 64 MiB of records before it evicted anything (review 44b).
    #[test]
    fn a_record_read_back_is_charged_as_when_it_was_recorded() {
        let mut s = Seen::default();
        s.kv_read("k", Some(&vec![b'v'; 300_000]), 1);
        s.kv_read("bin", Some(&[0xff; 1000]), 2);
        s.kv_read("gone", None, 0);
        s.config_read("limit", Some("3"));
        s.config_read("unset", None);
        s.log("INFO", "hello");
        s.output(false, vec!["out".into()], 0);
        s.output(true, vec!["err".into(), "more".into()], 0);
        assert!(s.bytes() > 300_000);
        let back: Seen = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.bytes(), s.bytes());
        assert_eq!(s.held(), s.bytes());
    }

    /// Many tiny items are charged what holding them costs, not a flat 32 bytes each: 30,070
    /// config keys of 1–3 bytes fitted the 1 MiB bound and took 3.5 MB (review 44b).
    #[test]
    fn tiny_items_are_charged_what_holding_them_costs() {
        let mut s = Seen::default();
        let mut i = 0u32;
        while !s.truncated {
            s.config_read(&format!("{i:x}"), None);
            i += 1;
        }
        // At least a B-tree slot of two strings and the key's own allocation each.
        let lower_bound = s.config.len() * (2 * std::mem::size_of::<String>() + 16);
        assert!(s.bytes() >= lower_bound, "{} keys charged {} bytes", s.config.len(), s.bytes());
        assert!(s.config.len() < 10_000, "{} config keys fit the record", s.config.len());
        let mut lines = Seen::default();
        for _ in 0..100_000 {
            lines.log("I", "");
        }
        assert!(lines.logs.len() * (std::mem::size_of::<String>() + 8) <= lines.bytes());
    }
}
