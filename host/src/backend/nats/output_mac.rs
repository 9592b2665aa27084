//! Tells a host's own message from a forgery under the same `Nats-Msg-Id`. An output's and a
//! dead letter's `Nats-Msg-Id` are computable from what a producer knows (the input's source and
//! id: [`super::wire::msg_id`]), and JetStream keeps the first message of an id within its
//! duplicate window. A NATS client with publish rights on an output subject published, ahead of
//! the input, a message of its own under the output's id: the host's output was dropped as a
//! duplicate, answered as published, and its input acked; downstream saw only the forgery.
//!
//! Every host of the cluster shares one key, made at random by the first and kept in the
//! JetStream KV bucket [`BUCKET`] (which a producer allowed only event subjects cannot read). A
//! host's message carries [`HEADER`], a MAC of its id, subject and data. When JetStream answers
//! a host's publish as a duplicate, the copy it holds is read: with a valid MAC it is a host's
//! (this output published before: a retry, a redelivery, a handler run again after a crash, its
//! data the same or not), and the duplicate stands; without one it is a forgery, and the host's
//! message is published again under an id the forger cannot compute (its id and the first bytes of
//! its MAC). Where the bucket cannot be found or made, messages go unsigned and a duplicate is
//! taken as before (logged at start).

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::sync::Arc;

/// The KV bucket of the key.
pub const BUCKET: &str = "PLUGBUS_KEYS";
/// The key's name in [`BUCKET`].
const KEY: &str = "output-mac";
/// The header a host's message carries its MAC in.
pub const HEADER: &str = "plugbus-mac";

/// The cluster's key, if it could be found or made.
#[derive(Clone, Default)]
pub struct OutputMac {
    key: Option<Arc<[u8]>>,
}

/// What the copy JetStream kept under a host's message's id is.
#[derive(Debug, PartialEq, Eq)]
pub enum Kept {
    /// A host's (its MAC valid): the duplicate stands.
    Hosts,
    /// Not a host's: a forgery under the id.
    Forged,
    /// Not known: no key.
    Unknown,
}

impl OutputMac {
    /// The key of `js`'s cluster: read from [`BUCKET`], or made there by this host if none is.
    /// Without one (the bucket cannot be read or made), messages go unsigned.
    pub async fn load(js: &jetstream::Context) -> Self {
        match Self::found_or_made(js).await {
            Ok(key) => Self { key: Some(key.into()) },
            Err(e) => {
                tracing::info!(
                    "no key to sign outputs with ({e}): an output a NATS publisher forged ahead of it \
                    under its Nats-Msg-Id is taken as the output"
                );
                Self::default()
            }
        }
    }

    async fn found_or_made(js: &jetstream::Context) -> Result<Vec<u8>, String> {
        let store = match js.get_key_value(BUCKET).await {
            Ok(store) => store,
            Err(_) => {
                let config = kv::Config {
                    bucket: BUCKET.to_string(),
                    description: "plugbus: the key hosts sign their outputs with".to_string(),
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
        let mut key = vec![0u8; 32];
        getrandom::fill(&mut key).map_err(|e| format!("no randomness for a key: {e}"))?;
        match store.create(KEY, key.clone().into()).await {
            Ok(_) => return Ok(key),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("keeping the key in {BUCKET}: {e}")),
        }
        match store.get(KEY).await {
            Ok(Some(key)) if key.len() >= 16 => Ok(key.to_vec()),
            Ok(_) => Err(format!("the key in {BUCKET} is missing or too short")),
            Err(e) => Err(format!("reading the key in {BUCKET}: {e}")),
        }
    }

    /// Whether messages are signed.
    pub fn signs(&self) -> bool {
        self.key.is_some()
    }

    /// Signs a host's message (its `Nats-Msg-Id` is `msg_id`).
    pub fn sign(&self, headers: &mut HeaderMap, msg_id: &str, subject: &str, payload: &[u8]) {
        if let Some(mac) = self.mac(msg_id, subject, payload) {
            headers.insert(HEADER, mac.as_str());
        }
    }

    /// What the copy JetStream kept under `msg_id` is, from its subject, headers and data.
    pub fn kept(&self, msg_id: &str, subject: &str, headers: Option<&HeaderMap>, payload: &[u8]) -> Kept {
        let Some(mac) = self.mac(msg_id, subject, payload) else { return Kept::Unknown };
        let signed = headers.and_then(|h| h.get(HEADER)).map(|v| v.as_str());
        let valid = signed.is_some_and(|s| {
            use subtle::ConstantTimeEq;
            s.len() == mac.len() && bool::from(s.as_bytes().ct_eq(mac.as_bytes()))
        });
        if valid { Kept::Hosts } else { Kept::Forged }
    }

    /// The id a host's message is published again under when a forgery holds its own: `msg_id`
    /// and the first bytes of its MAC (the same on every host, so it is deduplicated too).
    pub fn second_id(&self, msg_id: &str, subject: &str, payload: &[u8]) -> Option<String> {
        let mac = self.mac(msg_id, subject, payload)?;
        Some(format!("{msg_id}-{}", &mac[..32]))
    }

    fn mac(&self, msg_id: &str, subject: &str, payload: &[u8]) -> Option<String> {
        let key = self.key.as_ref()?;
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        for field in [msg_id.as_bytes(), subject.as_bytes(), payload] {
            mac.update(&(field.len() as u64).to_be_bytes());
            mac.update(field);
        }
        Some(mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(key: &[u8]) -> OutputMac {
        OutputMac { key: Some(key.into()) }
    }

    #[test]
    fn a_hosts_message_is_told_from_a_forgery_under_its_id() {
        let mac = keyed(&[7; 32]);
        let mut headers = HeaderMap::new();
        mac.sign(&mut headers, "out-1", "echo.x", b"real");
        assert_eq!(mac.kept("out-1", "echo.x", Some(&headers), b"real"), Kept::Hosts);
        // Another handler run's data, signed: still a host's.
        let mut rerun = HeaderMap::new();
        mac.sign(&mut rerun, "out-1", "echo.x", b"other run");
        assert_eq!(mac.kept("out-1", "echo.x", Some(&rerun), b"other run"), Kept::Hosts);
        // Forgeries: unsigned, a real MAC on other data or another subject, another key's MAC.
        assert_eq!(mac.kept("out-1", "echo.x", None, b"forged"), Kept::Forged);
        assert_eq!(mac.kept("out-1", "echo.x", Some(&headers), b"forged"), Kept::Forged);
        assert_eq!(mac.kept("out-1", "echo.y", Some(&headers), b"real"), Kept::Forged);
        let mut theirs = HeaderMap::new();
        keyed(&[8; 32]).sign(&mut theirs, "out-1", "echo.x", b"forged");
        assert_eq!(mac.kept("out-1", "echo.x", Some(&theirs), b"forged"), Kept::Forged);
        // Without a key nothing is known, and nothing is signed.
        let none = OutputMac::default();
        let mut unsigned = HeaderMap::new();
        none.sign(&mut unsigned, "out-1", "echo.x", b"real");
        assert!(unsigned.get(HEADER).is_none());
        assert_eq!(none.kept("out-1", "echo.x", None, b"forged"), Kept::Unknown);
        // The second id: the same for the same message on every host, not computable without the key.
        let second = mac.second_id("out-1", "echo.x", b"real").unwrap();
        assert!(second.starts_with("out-1-") && second.len() == "out-1-".len() + 32, "{second}");
        assert_eq!(Some(second.clone()), keyed(&[7; 32]).second_id("out-1", "echo.x", b"real"));
        assert_ne!(Some(second), keyed(&[8; 32]).second_id("out-1", "echo.x", b"real"));
    }
}
