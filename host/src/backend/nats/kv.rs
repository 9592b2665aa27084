//! Plugin kv on a NATS deployment: one JetStream KV bucket per plugin (`plugbus_<plugin>`,
//! see [`bucket_name`]), shared by every host running the plugin.
//!
//! A transaction's writes commit as one JetStream atomic batch (nats-server 2.12+, the bucket's
//! stream has `allow_atomic`): every written key carries `Nats-Expected-Last-Subject-Sequence`
//! = the revision the attempt read (0 = absent), so either all writes land or none does and the
//! attempt re-runs, as on the embedded store. A key only read is checked just before the batch.
//! A single write is a plain compare-and-set (`update` / `create`).
//!
//! A plugin's kv holds at most [`bucket_bound`] of its quota (`limits.max_kv_bytes`) as the
//! server counts its bucket: a commit that writes a value into a bucket holding that much fails
//! as the plugin's ([`KvError::BucketFull`]); deletes always pass. Plugbus counts, not the
//! server's `max_bytes`: the server reserves a stream's `max_bytes` out of its store when it is
//! set (bounds on many buckets leave no room for other streams), and at it refuses batches of
//! deletes. Delete markers expire after [`MARKER_TTL`] (`Nats-TTL`, the bucket has
//! `allow_msg_ttl`): a bucket keeps one revision per key, and a marker kept for good made every
//! key a plugin ever deleted cost bytes there. A transaction that read a key as deleted before its
//! marker expired conflicts (the revision it read is gone) and runs again.

use crate::kv::{KvError, KvStore, Txn, Versioned};
use async_nats::jetstream::{self, kv};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

/// How long a delete marker stays in a plugin's bucket (see the module's text).
pub const MARKER_TTL: Duration = Duration::from_secs(15 * 60);

/// What a plugin's bucket may hold, as the server counts it (each entry's subject and headers
/// with its value, and the markers of keys deleted in the last [`MARKER_TTL`]), for a quota of
/// `max_kv_bytes`: four times it, at least 4 MiB.
pub fn bucket_bound(max_kv_bytes: u64) -> u64 {
    max_kv_bytes.saturating_mul(4).max(4 << 20)
}

/// What a value written under `subject` adds to a bucket as the server counts it, about: the
/// subject, the value, and its headers and record (at most about 200 bytes).
fn stored_bytes(subject_len: usize, value_len: usize) -> u64 {
    (subject_len + value_len) as u64 + 256
}

/// How long a bucket's size, as last read, stands in for it (with what this host wrote since).
const SIZE_FRESH: Duration = Duration::from_millis(250);

/// The KV bucket of plugin `ns`: `plugbus_<plugin>` for a lower-case name, an escaped form for
/// any other (`Payments` → `plugbus--payments`), so no two plugins ever share a bucket.
pub fn bucket_name(ns: &str) -> String {
    crate::backend::nats::scoped_name("plugbus", ns)
}

/// JetStream KV buckets, one per plugin.
pub struct JetStreamKv {
    js: jetstream::Context,
    /// Each plugin's bucket, set up once on first use. A cell of its own per plugin: one
    /// plugin's setup that JetStream is slow to answer (or will not make, each try waiting out
    /// the request timeout) keeps no other plugin's kv waiting.
    buckets: Mutex<HashMap<String, Arc<OnceCell<kv::Store>>>>,
    /// Each bucket's bytes as last read, when, and what this host wrote into it since.
    sizes: Mutex<HashMap<String, (Instant, u64)>>,
    /// How long delete markers stay ([`MARKER_TTL`]; shorter in tests).
    marker_ttl: Duration,
}

impl JetStreamKv {
    /// A store on `js`; buckets are created on first use.
    pub fn new(js: jetstream::Context) -> Self {
        Self { js, buckets: Default::default(), sizes: Default::default(), marker_ttl: MARKER_TTL }
    }

    /// The same with delete markers that stay `ttl` (tests; at least a second).
    pub fn with_marker_ttl(mut self, ttl: Duration) -> Self {
        self.marker_ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// The `Nats-TTL` of a delete marker.
    fn marker_ttl_header(&self) -> String {
        format!("{}s", self.marker_ttl.as_secs())
    }

    /// Refuses, as the plugin's, a commit writing values into plugin `ns`'s bucket once it holds
    /// its [`bucket_bound`] (a commit that only deletes always passes); counts what it writes.
    async fn room_for(&self, ns: &str, store: &kv::Store, txn: &Txn) -> Result<(), KvError> {
        let Some(limit) = txn.quota else { return Ok(()) };
        let writes: u64 = txn
            .writes
            .iter()
            .filter_map(|(key, value)| {
                value.as_ref().map(|v| stored_bytes(store.prefix.len() + nats_key(key).len(), v.len()))
            })
            .sum();
        if writes == 0 {
            return Ok(());
        }
        let cached = self.sizes.lock().expect("sizes poisoned").get(ns).copied();
        let holds = match cached {
            Some((at, bytes)) if at.elapsed() < SIZE_FRESH => bytes,
            _ => {
                let mut stream = self.js.get_stream(&store.stream_name).await.map_err(|e| {
                    KvError::Unavailable(format!("reading the size of the JetStream KV bucket of {ns:?}: {e}"))
                })?;
                let bytes = stream
                    .info()
                    .await
                    .map_err(|e| {
                        KvError::Unavailable(format!("reading the size of the JetStream KV bucket of {ns:?}: {e}"))
                    })?
                    .state
                    .bytes;
                self.sizes.lock().expect("sizes poisoned").insert(ns.to_string(), (Instant::now(), bytes));
                bytes
            }
        };
        let bound = bucket_bound(limit);
        if holds.saturating_add(writes) > bound {
            return Err(KvError::BucketFull { ns: ns.to_string(), holds, bound, limit });
        }
        if let Some((_, bytes)) = self.sizes.lock().expect("sizes poisoned").get_mut(ns) {
            *bytes = bytes.saturating_add(writes);
        }
        Ok(())
    }

    /// Deletes `key` (under `subject`) with a marker that expires, checked against revision
    /// `seen` when given.
    async fn delete(&self, subject: String, key: &str, seen: Option<u64>) -> Result<(), KvError> {
        let mut h = async_nats::HeaderMap::new();
        h.insert("KV-Operation", "DEL");
        h.insert("Nats-TTL", self.marker_ttl_header().as_str());
        if let Some(seen) = seen {
            h.insert("Nats-Expected-Last-Subject-Sequence", seen.to_string().as_str());
        }
        let failed = |e: &dyn std::fmt::Display| unavailable("deleting", key, e);
        let ack = self.js.publish_with_headers(subject, h, bytes::Bytes::new()).await.map_err(|e| failed(&e))?;
        match ack.await {
            Ok(_) => Ok(()),
            // Only a changed revision is a conflict (a lost connection re-running the handler in
            // place would hide the outage).
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence => {
                Err(KvError::Conflict(key.to_string()))
            }
            Err(e) => Err(failed(&e)),
        }
    }

    async fn bucket(&self, ns: &str) -> Result<kv::Store, KvError> {
        let cell = {
            let mut buckets = self.buckets.lock().expect("buckets poisoned");
            match buckets.get(ns) {
                Some(cell) => cell.clone(),
                None => buckets.entry(ns.to_string()).or_default().clone(),
            }
        };
        // A setup that failed leaves the cell empty: the next use tries again.
        cell.get_or_try_init(|| self.open_bucket(ns)).await.cloned()
    }

    /// Finds or makes plugin `ns`'s bucket, with atomic batches on.
    async fn open_bucket(&self, ns: &str) -> Result<kv::Store, KvError> {
        let name = bucket_name(ns);
        let store = match self.js.get_key_value(&name).await {
            Ok(s) => s,
            Err(_) => self
                .js
                .create_key_value(kv::Config {
                    bucket: name.clone(),
                    description: format!("plugbus kv of plugin {ns}"),
                    history: 1,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| KvError::Unavailable(format!("creating the JetStream KV bucket {name}: {e}")))?,
        };
        let mut stream = self
            .js
            .get_stream(&store.stream_name)
            .await
            .map_err(|e| KvError::Unavailable(format!("reading the JetStream KV bucket {name}: {e}")))?;
        // Unread, the bucket is not taken as set up (it would stay without atomic batches, every
        // commit of more than one key refused, until a restart): the next use tries again.
        let mut config = stream
            .info()
            .await
            .map_err(|e| KvError::Unavailable(format!("reading the JetStream KV bucket {name}'s settings: {e}")))?
            .config
            .clone();
        if !config.allow_atomic_publish || !config.allow_message_ttl {
            config.allow_atomic_publish = true;
            config.allow_message_ttl = true;
            self.js.update_stream(config).await.map_err(|e| {
                KvError::Unavailable(format!(
                    "turning on atomic batches and expiring delete markers for the JetStream KV bucket {name} (needs \
                     nats-server 2.12+): {e}"
                ))
            })?;
        }
        Ok(store)
    }

    /// Writes every key of `txn` in one atomic batch, each checked against the revision read.
    async fn commit_batch(&self, store: &kv::Store, txn: &Txn) -> Result<(), KvError> {
        let client = self.js.client();
        let batch = crate::event::new_id();
        let count = txn.writes.len();
        for (i, (key, value)) in txn.writes.iter().enumerate() {
            let subject = format!("{}{}", store.prefix, nats_key(key));
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Batch-Id", batch.as_str());
            h.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            if let Some(seen) = txn.reads.get(key) {
                h.insert("Nats-Expected-Last-Subject-Sequence", seen.to_string().as_str());
            }
            let payload = match value {
                Some(v) => bytes::Bytes::from(v.clone()),
                None => {
                    h.insert("KV-Operation", "DEL");
                    h.insert("Nats-TTL", self.marker_ttl_header().as_str());
                    bytes::Bytes::new()
                }
            };
            if i + 1 < count {
                client.publish_with_headers(subject, h, payload).await.map_err(|e| unavailable("writing", key, e))?;
                continue;
            }
            h.insert("Nats-Batch-Commit", "1");
            let reply = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                client.request_with_headers(subject, h, payload),
            )
            .await
            .map_err(|_| unavailable("committing", key, "no answer within 5 s"))?
            .map_err(|e| unavailable("committing", key, e))?;
            let answer: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
            if let Some(err) = answer.get("error") {
                let description = err["description"].as_str().unwrap_or_default();
                if description.contains("wrong last sequence") || err["err_code"] == 10071 {
                    return Err(KvError::Conflict(key.clone()));
                }
                return Err(unavailable("committing the batch with", key, description));
            }
        }
        Ok(())
    }
}

/// A NATS KV key for any plugin key: characters outside `[A-Za-z0-9-/_.]` (and `=`) become
/// `=XX`; dots too when they would make an empty token.
pub fn nats_key(key: &str) -> String {
    let escape_dots = key.is_empty() || key.starts_with('.') || key.ends_with('.') || key.contains("..");
    let mut out = String::with_capacity(key.len());
    for b in key.bytes() {
        let plain = b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_') || (b == b'.' && !escape_dots);
        if plain {
            out.push(b as char);
        } else {
            out.push_str(&format!("={b:02X}"));
        }
    }
    if out.is_empty() { "=".into() } else { out }
}

fn unavailable(what: &str, key: &str, e: impl std::fmt::Display) -> KvError {
    KvError::Unavailable(format!("{what} kv key {key:?} on JetStream: {e}"))
}

/// The value (`None` if absent or deleted) and the revision of the key's last entry, a delete
/// marker included: that is what `Nats-Expected-Last-Subject-Sequence` compares against.
async fn read_entry(store: &kv::Store, key: &str) -> Result<(Option<Vec<u8>>, u64), KvError> {
    let entry = store.entry(nats_key(key)).await.map_err(|e| unavailable("reading", key, e))?;
    Ok(entry.map_or((None, 0), |e| {
        let value = (e.operation == kv::Operation::Put).then(|| e.value.to_vec());
        (value, e.revision)
    }))
}

#[async_trait::async_trait]
impl KvStore for JetStreamKv {
    async fn get(&self, ns: &str, key: &str) -> Result<Option<Versioned>, KvError> {
        let store = self.bucket(ns).await?;
        let entry = store.entry(nats_key(key)).await.map_err(|e| unavailable("reading", key, e))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .map(|e| Versioned { value: e.value.to_vec(), version: e.revision }))
    }

    async fn read(&self, ns: &str, key: &str) -> Result<(Option<Vec<u8>>, u64), KvError> {
        read_entry(&self.bucket(ns).await?, key).await
    }

    async fn commit(&self, ns: &str, txn: &Txn) -> Result<(), KvError> {
        let store = self.bucket(ns).await?;
        // Check every read first (a stale attempt fails before it writes anything), then write
        // each key with compare-and-set (which catches a change since the check).
        for (key, seen) in &txn.reads {
            if read_entry(&store, key).await?.1 != *seen {
                return Err(KvError::Conflict(key.clone()));
            }
        }
        self.room_for(ns, &store, txn).await?;
        if txn.writes.len() > 1 {
            return self.commit_batch(&store, txn).await;
        }
        for (key, value) in &txn.writes {
            let k = nats_key(key);
            let failed = |e: &dyn std::fmt::Display| unavailable("writing", key, e);
            match (value, txn.reads.get(key)) {
                (Some(v), Some(0)) => match store.create(&k, v.clone().into()).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                        return Err(KvError::Conflict(key.clone()));
                    }
                    Err(e) => return Err(failed(&e)),
                },
                (Some(v), Some(seen)) => match store.update(&k, v.clone().into(), *seen).await {
                    Ok(_) => {}
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                        return Err(KvError::Conflict(key.clone()));
                    }
                    Err(e) => return Err(failed(&e)),
                },
                (Some(v), None) => {
                    store.put(&k, v.clone().into()).await.map_err(|e| failed(&e))?;
                }
                (None, Some(seen)) if *seen > 0 => {
                    self.delete(format!("{}{k}", store.prefix), key, Some(*seen)).await?
                }
                // Read as absent (just checked above): nothing to delete. Deleting anyway would
                // erase a key another host created since the check; left alone, this
                // transaction comes before that creation.
                (None, Some(_)) => {}
                (None, None) => self.delete(format!("{}{k}", store.prefix), key, None).await?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::nats_key;

    #[test]
    fn any_plugin_key_becomes_a_valid_nats_key() {
        assert_eq!(nats_key("stock/widget"), "stock/widget");
        assert_eq!(nats_key("count/orders.created"), "count/orders.created");
        assert_eq!(nats_key("a b=c"), "a=20b=3Dc");
        assert_eq!(nats_key(".x"), "=2Ex");
        assert_eq!(nats_key("a..b"), "a=2E=2Eb");
        assert_ne!(nats_key("a b"), nats_key("a_b"));
    }
}
