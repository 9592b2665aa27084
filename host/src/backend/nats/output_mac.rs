//! A host's `Nats-Msg-Id` that nobody without the cluster's key can compute. JetStream keeps
//! the first message of an id within its duplicate window, and an output's and a dead letter's id
//! was a plain hash of what a producer knows (the input's source and id: [`super::wire::msg_id`]).
//! A NATS client with publish rights on an output subject published, ahead of the input, a
//! message of its own under the output's id: the host's output was dropped as a duplicate,
//! answered as published, and its input acked; downstream saw only the forgery.
//!
//! Every host of the cluster shares one key, made at random by the first and kept in the
//! JetStream KV bucket [`BUCKET`] (which a producer allowed only event subjects cannot read or
//! write), and a host's message id is `out-` and an HMAC of its source and id: the same on every
//! host (a redelivery, a retry, a handler run again after a crash is deduplicated as before),
//! and nobody else's. A host that cannot read or make the bucket at start uses the plain hash (as
//! before; logged) and tries again every [`RETRY`]. A producer that may publish on
//! `$KV.PLUGBUS_KEYS.>` can plant a key of its own for hosts that start after it: give
//! producers no rights there.

use async_nats::jetstream::{self, kv};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The KV bucket of the key.
pub const BUCKET: &str = "PLUGBUS_KEYS";
/// The key's name in [`BUCKET`].
const KEY: &str = "output-mac";
/// How often a host without the key tries again to read or make it.
pub const RETRY: Duration = Duration::from_secs(30);

/// The cluster's key, once it was found or made.
#[derive(Clone, Default)]
pub struct OutputMac {
    key: Arc<OnceLock<Vec<u8>>>,
}

impl OutputMac {
    /// Reads the key of `js`'s cluster from [`BUCKET`], or makes it there if none is; `Err(why)`
    /// when it can do neither (then ids are the plain hash).
    pub async fn load(&self, js: &jetstream::Context) -> Result<(), String> {
        if self.key.get().is_some() {
            return Ok(());
        }
        let key = found_or_made(js).await?;
        let _ = self.key.set(key);
        Ok(())
    }

    /// The `Nats-Msg-Id` of a host's message of `source` and `id`: `out-` and the HMAC of both;
    /// `None` without the key.
    pub fn msg_id(&self, source: &str, id: &str) -> Option<String> {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let key = self.key.get()?;
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        for field in [source, id] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field.as_bytes());
        }
        let mut out = String::with_capacity(4 + 64);
        out.push_str("out-");
        for b in mac.finalize().into_bytes() {
            out.push(HEX[usize::from(b >> 4)] as char);
            out.push(HEX[usize::from(b & 0xf)] as char);
        }
        Some(out)
    }
}

/// The key in [`BUCKET`]: read (the key's own `get` first: a host that may only read the bucket
/// takes it), else made by this host (an atomic create: one host's key wins).
async fn found_or_made(js: &jetstream::Context) -> Result<Vec<u8>, String> {
    let store = match js.get_key_value(BUCKET).await {
        Ok(store) => store,
        Err(_) => {
            let config = kv::Config {
                bucket: BUCKET.to_string(),
                description: "plugbus: the key hosts make their messages' ids with".to_string(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            };
            match js.create_key_value(config).await {
                Ok(store) => store,
                // Another host made it meanwhile.
                Err(e) => js.get_key_value(BUCKET).await.map_err(|_| format!("making bucket {BUCKET}: {e}"))?,
            }
        }
    };
    let usable = |key: bytes::Bytes| {
        (key.len() >= 16).then(|| key.to_vec()).ok_or_else(|| format!("the key in {BUCKET} is too short"))
    };
    match store.get(KEY).await {
        Ok(Some(key)) => return usable(key),
        Ok(None) => {}
        Err(e) => return Err(format!("reading the key in {BUCKET}: {e}")),
    }
    let mut key = vec![0u8; 32];
    getrandom::fill(&mut key).map_err(|e| format!("no randomness for a key: {e}"))?;
    match store.create(KEY, key.clone().into()).await {
        Ok(_) => Ok(key),
        Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => match store.get(KEY).await {
            Ok(Some(key)) => usable(key),
            Ok(None) => Err(format!("the key in {BUCKET} was made and is gone")),
            Err(e) => Err(format!("reading the key in {BUCKET}: {e}")),
        },
        Err(e) => Err(format!("keeping a key in {BUCKET}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(key: &[u8]) -> OutputMac {
        let mac = OutputMac::default();
        mac.key.set(key.to_vec()).unwrap();
        mac
    }

    #[test]
    fn a_hosts_id_is_the_same_on_every_host_and_not_the_computable_one() {
        let (a, b) = (keyed(&[7; 32]), keyed(&[7; 32]));
        let id = a.msg_id("plugbus/echo", "e-1").unwrap();
        assert_eq!(Some(id.clone()), b.msg_id("plugbus/echo", "e-1"), "two hosts of one cluster");
        assert!(id.starts_with("out-") && id.len() == "out-".len() + 64, "{id}");
        let mut output = crate::event::Event::new("echo.x", "");
        (output.source, output.id) = ("plugbus/echo".into(), "e-1".into());
        assert_ne!(id, super::super::wire::msg_id(&output, super::super::wire::Origin::Host), "computable");
        assert_ne!(Some(id.clone()), keyed(&[8; 32]).msg_id("plugbus/echo", "e-1"), "another key");
        assert_ne!(Some(id.clone()), a.msg_id("plugbus/echo", "e-2"));
        assert_ne!(a.msg_id("ab", "c"), a.msg_id("a", "bc"), "fields are length-prefixed");
        assert_eq!(OutputMac::default().msg_id("plugbus/echo", "e-1"), None, "no key");
    }
}
