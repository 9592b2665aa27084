//! Claims on replaying a dead letter the broker keeps. Every host on one NATS cluster reads the
//! same `PLUGBUS_DLQ` stream, and two hosts replaying at once (two operators, two bulk replays)
//! both published each dead letter they had both listed: on a subject no stream captures (core
//! NATS, nothing dedupes it) its plugin ran it twice. A host now replays one only once it made
//! the dead letter's claim, an atomic create in the JetStream KV bucket [`BUCKET`] (one host
//! wins).
//!
//! A claim of a replay the bus took is left to expire ([`CLAIM_TTL`], the bucket's `max_age`): a
//! host that listed the dead letter before it left the stream finds it claimed. A claim of one
//! not taken is let go at once (its own revision only), for the next replay. A host killed while
//! it holds a claim leaves it for at most [`CLAIM_TTL`]: meanwhile other hosts keep that dead
//! letter, saying why. Where the bucket cannot be found or made (the NATS user may not make it,
//! the account is at its stream limit), the replay goes on without claims (twice rather than
//! never), and the bucket is not asked again for [`UNUSABLE_PAUSE`]; a claim that fails in a
//! bucket there is (a timeout, a denied publish) keeps its dead letter, as a replay not taken.

use crate::transport::{Claim, TransportError};
use async_nats::jetstream::{self, kv};
use std::time::Duration;

/// The KV bucket of replay claims.
pub const BUCKET: &str = "PLUGBUS_REPLAY_CLAIMS";
/// How long a claim lasts: far past any replay's publish (`api.publish_timeout`) and the
/// removal after it, and past how long a bulk replay of thousands takes to reach the last one
/// it listed (a claim expired before then would let that replay publish it again).
pub const CLAIM_TTL: Duration = Duration::from_secs(3600);
/// How long a bucket that could not be found or made is not asked again: each try may wait out
/// the JetStream timeout, once per dead letter of a bulk replay.
pub const UNUSABLE_PAUSE: Duration = Duration::from_secs(60);

/// The claims bucket, found or made at its first use.
pub struct ReplayClaims {
    js: jetstream::Context,
    store: tokio::sync::OnceCell<kv::Store>,
    /// Until when a bucket that could not be found or made is not asked again, and why.
    unusable: std::sync::Mutex<Option<(std::time::Instant, String)>>,
}

impl ReplayClaims {
    pub fn new(js: jetstream::Context) -> Self {
        Self { js, store: tokio::sync::OnceCell::new(), unusable: Default::default() }
    }

    /// The bucket; `Err(why)` when it cannot be found or made (then not asked again for
    /// [`UNUSABLE_PAUSE`]).
    async fn store(&self) -> Result<&kv::Store, String> {
        if let Some(store) = self.store.get() {
            return Ok(store);
        }
        if let Some((until, why)) = &*self.unusable.lock().expect("claims poisoned")
            && std::time::Instant::now() < *until
        {
            return Err(why.clone());
        }
        let made = self.open().await.map_err(|e| e.to_string());
        if let Err(why) = &made {
            let until = std::time::Instant::now() + UNUSABLE_PAUSE;
            *self.unusable.lock().expect("claims poisoned") = Some((until, why.clone()));
        }
        made
    }

    async fn open(&self) -> Result<&kv::Store, TransportError> {
        // A setup that failed leaves the cell empty: a claim after the pause tries again.
        self.store
            .get_or_try_init(|| async {
                if let Ok(store) = self.js.get_key_value(BUCKET).await {
                    return Ok(store);
                }
                let config = kv::Config {
                    bucket: BUCKET.to_string(),
                    description: "plugbus: which host replays a kept dead letter now".to_string(),
                    history: 1,
                    max_age: CLAIM_TTL,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                };
                match self.js.create_key_value(config).await {
                    Ok(store) => Ok(store),
                    // Another host made it meanwhile.
                    Err(e) => self.js.get_key_value(BUCKET).await.map_err(|_| {
                        TransportError::Broker(format!("making the JetStream KV bucket {BUCKET} (replay claims): {e}"))
                    }),
                }
            })
            .await
    }

    /// Claims the replay of the dead letter at `seq` (id `id`) for this host: [`Claim::Ours`],
    /// [`Claim::Elsewhere`] when another replay holds it, [`Claim::Unavailable`] when the bucket
    /// cannot be found or made. `Err`: this claim could not be made (the dead letter is kept).
    pub async fn claim(&self, seq: u64, id: &str) -> Result<Claim, TransportError> {
        let store = match self.store().await {
            Ok(store) => store,
            Err(why) => return Ok(Claim::Unavailable(why)),
        };
        match store.create(key(seq, id), bytes::Bytes::new()).await {
            Ok(revision) => Ok(Claim::Ours(revision)),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(Claim::Elsewhere),
            Err(e) => Err(TransportError::Broker(format!("claiming the replay of dead letter {seq} in {BUCKET}: {e}"))),
        }
    }

    /// Lets go of this host's claim (of `revision`) on the dead letter at `seq` (its replay was
    /// not taken). Only that claim: one another host made after it expired stays.
    pub async fn release(&self, seq: u64, id: &str, revision: u64) -> Result<(), TransportError> {
        let store = self.store().await.map_err(TransportError::Broker)?;
        store
            .delete_expect_revision(key(seq, id), Some(revision))
            .await
            .map_err(|e| TransportError::Broker(format!("letting go of the replay claim of dead letter {seq}: {e}")))
    }
}

/// A claim's key: the dead letter's place in the stream and a hash of its id (a stream made again
/// numbers its messages from 1, and a claim left from before must not hold a new dead letter).
fn key(seq: u64, id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(id.as_bytes());
    let hash: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{seq}.{hash}")
}

#[cfg(test)]
mod tests {
    use super::key;

    #[test]
    fn a_claims_key_is_a_valid_kv_key_naming_the_place_and_the_id() {
        let k = key(42, "dlq-1/with spaces and \u{1F600}");
        assert!(k.starts_with("42."), "{k}");
        assert_eq!(k.len(), "42.".len() + 16);
        assert!(k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.'), "{k}");
        assert_ne!(key(42, "a"), key(42, "b"));
        assert_ne!(key(42, "a"), key(43, "a"));
    }
}
