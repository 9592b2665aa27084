//! Plugin kv on a NATS deployment: one JetStream KV bucket per plugin (`plugbus_<plugin>`,
//! see [`bucket_name`]), shared by every host running the plugin.
//!
//! A transaction's writes commit as one JetStream atomic batch (nats-server 2.12+, the bucket's
//! stream has `allow_atomic`): every written key carries `Nats-Expected-Last-Subject-Sequence`
//! = the revision the attempt read (0 = absent), so either all writes land or none does and the
//! attempt re-runs, as on the embedded store. A key only read is checked just before the batch.
//! A single write is a plain compare-and-set (`update` / `create`).
//!
//! A plugin's kv is bounded in its bucket by plugbus ([`super::kv_room`]): a commit that grows
//! the bucket past what its quota gives fails as the plugin's. Delete markers expire after
//! [`MARKER_TTL`] (`Nats-TTL`, the bucket has `allow_msg_ttl`): a bucket keeps one revision per
//! key, and a marker kept for good made every key a plugin ever deleted cost bytes there. A
//! transaction that read a key as deleted before its marker expired conflicts (the revision it
//! read is gone) and runs again. A delete of a key that is not there writes no marker.

use super::kv_room::{Change, Room, stored_bytes};
pub use super::kv_room::{bucket_bound, entry_bound};
use crate::kv::{KvError, KvStore, Txn, Versioned};
use async_nats::jetstream::{self, kv};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;

/// How long a delete marker stays in a plugin's bucket (see the module's text): a minute, well
/// past an attempt (whose read of a deleted key then conflicts as it should); markers count
/// against the bucket's entries while they stay.
pub const MARKER_TTL: Duration = Duration::from_secs(60);

/// The most messages the server takes in one JetStream atomic batch (its default,
/// `max_batch_size`): the most keys one kv commit may write on NATS.
pub const MAX_BATCH_WRITES: u32 = 1_000;

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
    /// Each bucket's room ([`super::kv_room`]).
    rooms: Mutex<HashMap<String, Arc<Room>>>,
    /// How long delete markers stay ([`MARKER_TTL`]; shorter in tests).
    marker_ttl: Duration,
}

impl JetStreamKv {
    /// A store on `js`; buckets are created on first use.
    pub fn new(js: jetstream::Context) -> Self {
        Self { js, buckets: Default::default(), rooms: Default::default(), marker_ttl: MARKER_TTL }
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

    /// The bytes and entries `store`'s bucket holds, as the server counts them.
    async fn size(&self, ns: &str, store: &kv::Store) -> Result<(u64, u64), KvError> {
        let unavailable = |e: &dyn std::fmt::Display| {
            KvError::Unavailable(format!("reading the size of plugin {ns:?}'s kv bucket: {e}"))
        };
        let mut stream = self.js.get_stream(&store.stream_name).await.map_err(|e| unavailable(&e))?;
        let state = stream.info().await.map_err(|e| unavailable(&e))?.state.clone();
        Ok((state.bytes, state.messages))
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
        // A setup that failed leaves the cell empty: the next use tries again.
        of_plugin(&self.buckets, ns).get_or_try_init(|| self.open_bucket(ns)).await.cloned()
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

    /// Writes every op in one atomic batch, each checked against the revision it expects (at
    /// most [`MAX_BATCH_WRITES`]: the config keeps `max_kv_writes` within it).
    async fn commit_batch(&self, ops: &[Write<'_>]) -> Result<(), KvError> {
        let client = self.js.client();
        let batch = crate::event::new_id();
        let count = ops.len();
        for (i, op) in ops.iter().enumerate() {
            let (key, subject) = (op.key, op.subject.clone());
            let mut h = async_nats::HeaderMap::new();
            h.insert("Nats-Batch-Id", batch.as_str());
            h.insert("Nats-Batch-Sequence", (i + 1).to_string().as_str());
            if let Some(seen) = op.expect {
                h.insert("Nats-Expected-Last-Subject-Sequence", seen.to_string().as_str());
            }
            let payload = match op.value {
                Some(v) => bytes::Bytes::from(v.to_vec()),
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
                    return Err(KvError::Conflict(key.to_string()));
                }
                return Err(unavailable("committing the batch with", key, description));
            }
        }
        Ok(())
    }

    /// Writes the one op of a commit with compare-and-set where it expects a revision.
    async fn write_one(&self, store: &kv::Store, op: &Write<'_>) -> Result<(), KvError> {
        let (key, k) = (op.key, nats_key(op.key));
        let failed = |e: &dyn std::fmt::Display| unavailable("writing", key, e);
        match (op.value, op.expect) {
            (Some(v), Some(0)) => match store.create(&k, v.to_vec().into()).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Err(KvError::Conflict(key.to_string())),
                Err(e) => Err(failed(&e)),
            },
            (Some(v), Some(seen)) => match store.update(&k, v.to_vec().into(), seen).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Err(KvError::Conflict(key.to_string())),
                Err(e) => Err(failed(&e)),
            },
            (Some(v), None) => store.put(&k, v.to_vec().into()).await.map(|_| ()).map_err(|e| failed(&e)),
            (None, seen) => self.delete(op.subject.clone(), key, seen).await,
        }
    }
}

/// Plugin `ns`'s entry of `map`, made on first use.
fn of_plugin<T: Default>(map: &Mutex<HashMap<String, Arc<T>>>, ns: &str) -> Arc<T> {
    let mut map = map.lock().expect("kv buckets poisoned");
    match map.get(ns) {
        Some(entry) => entry.clone(),
        None => map.entry(ns.to_string()).or_default().clone(),
    }
}

/// One write of a commit: `value` under `key` (`None`: a delete), expecting the key's last
/// revision to be `expect` (`None`: whatever it is).
struct Write<'a> {
    key: &'a str,
    subject: String,
    value: Option<&'a [u8]>,
    expect: Option<u64>,
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
        // each key with compare-and-set (which catches a change since the check). What a key
        // read holds is known: a write there is counted net of it.
        let mut held: HashMap<&str, Option<usize>> = HashMap::new();
        for (key, seen) in &txn.reads {
            let (value, revision) = read_entry(&store, key).await?;
            if revision != *seen {
                return Err(KvError::Conflict(key.clone()));
            }
            held.insert(key, value.map(|v| v.len()));
        }
        let mut ops = Vec::with_capacity(txn.writes.len());
        for (key, value) in &txn.writes {
            let subject = format!("{}{}", store.prefix, nats_key(key));
            let expect = match (value, txn.reads.get(key)) {
                // Read as absent or deleted (just checked above): nothing to delete. Deleting
                // anyway would erase a key another host created since the check, and its marker
                // would only cost bytes; left alone, this transaction comes before that creation.
                (None, Some(_)) if held.get(key.as_str()) == Some(&None) => continue,
                (None, None) => {
                    // Not read: deleted only if it is there (its marker costs bytes), as read now.
                    let (value, revision) = read_entry(&store, key).await?;
                    let Some(value) = value else { continue };
                    held.insert(key, Some(value.len()));
                    Some(revision)
                }
                (_, seen) => seen.copied(),
            };
            ops.push(Write { key, subject, value: value.as_deref(), expect });
        }
        let change = ops.iter().fold(Change::default(), |change, op| {
            let replaced = held.get(op.key).copied().flatten();
            let was = replaced.map_or(0, |len| stored_bytes(op.subject.len(), len) as i64);
            let now = stored_bytes(op.subject.len(), op.value.map_or(0, <[u8]>::len)) as i64;
            let new_entry = op.value.is_some() && replaced.is_none();
            Change { grows: change.grows + now - was, entries: change.entries + u64::from(new_entry) }
        });
        let taken = match txn.quota {
            Some(limit) => of_plugin(&self.rooms, ns).take(ns, limit, change, || self.size(ns, &store)).await?,
            None => None,
        };
        match ops.as_slice() {
            [] => {}
            [one] => self.write_one(&store, one).await?,
            many => self.commit_batch(many).await?,
        }
        if let Some(taken) = taken {
            taken.landed();
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
