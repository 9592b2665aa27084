//! Plugin kv on a NATS deployment: one JetStream KV bucket per plugin (`plugbus_<plugin>`,
//! see [`bucket_name`]), shared by every host running the plugin.
//!
//! A transaction's writes commit as one JetStream atomic batch (nats-server 2.12+, the bucket's
//! stream has `allow_atomic`): every written key carries `Nats-Expected-Last-Subject-Sequence`
//! = the revision the attempt read (0 = absent), so either all writes land or none does and the
//! attempt re-runs, as on the embedded store. A key only read is checked just before the batch.
//! A single write is a plain compare-and-set (`update` / `create`).

use crate::kv::{KvError, KvStore, Txn, Versioned};
use async_nats::jetstream::{self, kv};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::OnceCell;

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
    /// Each plugin's bucket's `max_bytes` as this host set or left it ([`bucket_bound`]).
    bounds: Mutex<HashMap<String, i64>>,
}

/// The `max_bytes` of the bucket of a plugin whose kv may hold `max_kv_bytes`: twice it, as the
/// server counts entries (a subject of `$KV.<bucket>.<escaped key>`, headers, and a delete
/// marker kept for each key deleted), at least 1 MiB.
pub fn bucket_bound(max_kv_bytes: u64) -> i64 {
    i64::try_from(max_kv_bytes.saturating_mul(2).max(1 << 20)).unwrap_or(i64::MAX)
}

impl JetStreamKv {
    /// A store on `js`; buckets are created on first use.
    pub fn new(js: jetstream::Context) -> Self {
        Self { js, buckets: Default::default(), bounds: Default::default() }
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
        if !config.allow_atomic_publish {
            config.allow_atomic_publish = true;
            self.js.update_stream(config).await.map_err(|e| {
                KvError::Unavailable(format!(
                    "turning on atomic batches for the JetStream KV bucket {name} (needs nats-server 2.12+): {e}"
                ))
            })?;
        }
        Ok(store)
    }

    /// Bounds the bucket of plugin `ns` at [`bucket_bound`] of its quota, once per quota: a plugin
    /// writing new keys on every event filled the account's JetStream storage, and every other
    /// plugin's streams were refused. A bound over what the quota gives (a lowered quota) is
    /// lowered only once the bucket holds no more than the new one (the server would not delete
    /// entries for it under the bucket's `discard = new`, but nothing here relies on that).
    async fn bound(&self, ns: &str, store: &kv::Store, quota: u64) {
        let want = bucket_bound(quota);
        if self.bounds.lock().expect("bounds poisoned").get(ns) == Some(&want) {
            return;
        }
        let name = bucket_name(ns);
        // Best effort: a commit never fails for its bound (the next one tries again).
        let info = match self.js.get_stream(&store.stream_name).await {
            Ok(mut stream) => stream.info().await.map(|i| (i.config.clone(), i.state.bytes)).map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let (mut config, holds) = match info {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(plugin = ns, bucket = %name, "reading the kv bucket to bound it: {e}");
                return;
            }
        };
        let set = match config.max_bytes {
            now if now == want => false,
            now if now < 0 || now < want => true,
            _ if holds <= want as u64 => true,
            now => {
                tracing::warn!(plugin = ns, bucket = %name, max_bytes = now, bound = want, holds,
                    "the plugin's kv bucket keeps its larger max_bytes (until a restart of the host finds it holding no \
                     more than its lowered max_kv_bytes gives)");
                false
            }
        };
        if set {
            config.max_bytes = want;
            // A server that cannot reserve the bound (its `max_store` or the account's storage
            // limit taken by other streams' bounds) leaves the bucket as it was, as before.
            if let Err(e) = self.js.update_stream(config).await {
                tracing::warn!(plugin = ns, bucket = %name, bound = want,
                    "the server did not take the plugin's kv bound ({e}): its bucket is bounded only by the account's \
                     JetStream limits");
            }
        }
        self.bounds.lock().expect("bounds poisoned").insert(ns.to_string(), want);
    }

    /// A write the bucket refused at its `max_bytes` (`why`, the server's words): the plugin's
    /// kv is full ([`KvError::BucketFull`]); anything else is `failed`.
    async fn full_or(&self, ns: &str, store: &kv::Store, quota: Option<u64>, why: &str, failed: KvError) -> KvError {
        let (Some(limit), true) = (quota, why.contains("maximum bytes exceeded")) else { return failed };
        let holds = match self.js.get_stream(&store.stream_name).await {
            Ok(mut stream) => stream.info().await.map_or(0, |i| i.state.bytes),
            Err(_) => 0,
        };
        KvError::BucketFull { ns: ns.to_string(), holds, max_bytes: bucket_bound(limit) as u64, limit }
    }

    /// Writes every key of `txn` in one atomic batch, each checked against the revision read.
    async fn commit_batch(&self, ns: &str, store: &kv::Store, txn: &Txn) -> Result<(), KvError> {
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
                let failed = unavailable("committing the batch with", key, description);
                return Err(self.full_or(ns, store, txn.quota, description, failed).await);
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
        if let Some(quota) = txn.quota.filter(|_| !txn.writes.is_empty()) {
            self.bound(ns, &store, quota).await;
        }
        // Check every read first (a stale attempt fails before it writes anything), then write
        // each key with compare-and-set (which catches a change since the check).
        for (key, seen) in &txn.reads {
            if read_entry(&store, key).await?.1 != *seen {
                return Err(KvError::Conflict(key.clone()));
            }
        }
        if txn.writes.len() > 1 {
            return self.commit_batch(ns, &store, txn).await;
        }
        for (key, value) in &txn.writes {
            let k = nats_key(key);
            let written = self.write_one(&store, key, &k, value, txn).await;
            if let Err((why, failed)) = written {
                return Err(match why {
                    Some(why) => self.full_or(ns, &store, txn.quota, &why, failed).await,
                    None => failed,
                });
            }
        }
        Ok(())
    }
}

impl JetStreamKv {
    /// Writes the one key of a transaction with compare-and-set. `Err((why, error))`: `why`
    /// is the server's words when it refused the write.
    async fn write_one(
        &self,
        store: &kv::Store,
        key: &str,
        k: &str,
        value: &Option<Vec<u8>>,
        txn: &Txn,
    ) -> Result<(), (Option<String>, KvError)> {
        let failed = |e: &dyn std::fmt::Display| (Some(e.to_string()), unavailable("writing", key, e));
        match (value, txn.reads.get(key)) {
            (Some(v), Some(0)) => match store.create(k, v.clone().into()).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    return Err((None, KvError::Conflict(key.to_string())));
                }
                Err(e) => return Err(failed(&e)),
            },
            (Some(v), Some(seen)) => match store.update(k, v.clone().into(), *seen).await {
                Ok(_) => {}
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    return Err((None, KvError::Conflict(key.to_string())));
                }
                Err(e) => return Err(failed(&e)),
            },
            (Some(v), None) => {
                store.put(k, v.clone().into()).await.map_err(|e| failed(&e))?;
            }
            (None, Some(seen)) if *seen > 0 => match store.delete_expect_revision(k, Some(*seen)).await {
                Ok(()) => {}
                // A delete's error kinds are an update's: only a changed revision is a conflict
                // (a lost connection re-running the handler in place would hide the outage).
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    return Err((None, KvError::Conflict(key.to_string())));
                }
                Err(e) => return Err(failed(&e)),
            },
            // Read as absent (just checked above): nothing to delete. Deleting anyway would
            // erase a key another host created since the check; left alone, this
            // transaction comes before that creation.
            (None, Some(_)) => {}
            (None, None) => store.delete(k).await.map_err(|e| failed(&e))?,
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
