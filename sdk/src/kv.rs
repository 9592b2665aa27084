//! Key-value state, private to this plugin and kept by the host across events and reloads.
//!
//! Each attempt reads and writes through a transaction: reads see the attempt's own writes, and
//! the writes commit only when the handler returns `Ok` (together with its outputs and the ack
//! of its event), so a failed attempt leaves the store as it was and a retry starts clean.
//! Keys and values are at most 256 KiB each; one attempt may write 1,000 keys and read 1,000
//! (the host's defaults; the operator can change them). Calls past a cap fail with
//! [`KvError::TooLarge`].
//!
//! ```
//! use plugbus_sdk::{Event, HandlerError, handler, kv, testing::TestHost};
//!
//! #[handler(subscribe = ["page.viewed"])]
//! fn count(_ev: Event) -> Result<(), HandlerError> {
//!     let seen = kv::get_json::<u64>("seen")?.unwrap_or(0);
//!     kv::set_json("seen", &(seen + 1))?;
//!     Ok(())
//! }
//!
//! let mut host = TestHost::new().with_kv_json("seen", &41u64);
//! let run = host.run(count, Event::new("page.viewed", ""));
//! assert_eq!(run.kv_get_json::<u64>("seen"), Some(42));
//! ```

use crate::HandlerError;
use serde::{Serialize, de::DeserializeOwned};
use std::fmt;

/// Why a key-value call failed.
///
/// ```
/// let e = plugbus_sdk::kv::KvError::TooLarge("value of 2 MiB over the 64 KiB cap".into());
/// assert!(e.to_string().contains("too large"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvError {
    /// The key or value is larger than the host allows, or the attempt's transaction is full.
    TooLarge(String),
    /// The store could not be reached (transient).
    Unavailable(String),
    /// The stored value is not the JSON that was asked for.
    Decode(String),
}

impl fmt::Display for KvError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvError::TooLarge(m) => write!(f, "kv value too large: {m}"),
            KvError::Unavailable(m) => write!(f, "kv unavailable: {m}"),
            KvError::Decode(m) => write!(f, "kv value is not the expected JSON: {m}"),
        }
    }
}

impl std::error::Error for KvError {}

/// An unavailable store is worth a retry; an oversized or undecodable value is not.
///
/// ```
/// use plugbus_sdk::{HandlerError, kv::KvError};
/// assert!(HandlerError::from(KvError::Unavailable("down".into())).is_retry());
/// assert!(!HandlerError::from(KvError::Decode("not a number".into())).is_retry());
/// ```
impl From<KvError> for HandlerError {
    fn from(e: KvError) -> Self {
        match e {
            KvError::Unavailable(_) => HandlerError::retry(e.to_string()),
            _ => HandlerError::reject(e.to_string()),
        }
    }
}

/// Reads the value stored under `key` (this attempt's own writes first).
///
/// ```
/// # use plugbus_sdk::{Event, testing::TestHost};
/// # let run = TestHost::new().with_kv("stock/sku-1", "10").run(|_| {
/// let v: Option<Vec<u8>> = plugbus_sdk::kv::get("stock/sku-1")?;
/// assert_eq!(v.as_deref(), Some(&b"10"[..]));
/// # Ok(()) }, Event::new("a", ""));
/// # run.result.unwrap();
/// ```
pub fn get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
    crate::host::kv_get(key)
}

/// Stores `value` under `key` (committed when the handler returns `Ok`).
///
/// ```
/// # use plugbus_sdk::{Event, testing::TestHost};
/// # let run = TestHost::new().run(|_| {
/// plugbus_sdk::kv::set("stock/sku-1", b"10")?;
/// # Ok(()) }, Event::new("a", ""));
/// # assert_eq!(run.kv_get("stock/sku-1"), Some(&b"10"[..]));
/// ```
pub fn set(key: &str, value: impl AsRef<[u8]>) -> Result<(), KvError> {
    crate::host::kv_set(key, value.as_ref())
}

/// Removes `key` (no error when it was absent; committed when the handler returns `Ok`).
///
/// ```
/// # use plugbus_sdk::{Event, testing::TestHost};
/// # let run = TestHost::new().with_kv("stock/sku-1", "10").run(|_| {
/// plugbus_sdk::kv::delete("stock/sku-1")?;
/// # Ok(()) }, Event::new("a", ""));
/// # assert_eq!(run.kv_get("stock/sku-1"), None);
/// ```
pub fn delete(key: &str) -> Result<(), KvError> {
    crate::host::kv_delete(key)
}

/// Reads and decodes a JSON value; a value that is not the JSON asked for is a
/// [`KvError::Decode`].
///
/// ```
/// # use plugbus_sdk::{Event, testing::TestHost};
/// # let run = TestHost::new().with_kv_json("reserved/sku-1", &2u64).run(|_| {
/// let reserved: u64 = plugbus_sdk::kv::get_json("reserved/sku-1")?.unwrap_or(0);
/// assert_eq!(reserved, 2);
/// # Ok(()) }, Event::new("a", ""));
/// # run.result.unwrap();
/// ```
pub fn get_json<T: DeserializeOwned>(key: &str) -> Result<Option<T>, KvError> {
    match get(key)? {
        None => Ok(None),
        Some(bytes) => {
            serde_json::from_slice(&bytes).map(Some).map_err(|e| KvError::Decode(format!("key {key:?}: {e}")))
        }
    }
}

/// Encodes `value` as JSON and stores it.
///
/// ```
/// # use plugbus_sdk::{Event, testing::TestHost};
/// # let run = TestHost::new().run(|_| {
/// plugbus_sdk::kv::set_json("reserved/sku-1", &3u64)?;
/// # Ok(()) }, Event::new("a", ""));
/// # assert_eq!(run.kv_get_json::<u64>("reserved/sku-1"), Some(3));
/// ```
pub fn set_json<T: Serialize + ?Sized>(key: &str, value: &T) -> Result<(), KvError> {
    let bytes = serde_json::to_vec(value).map_err(|e| KvError::Decode(e.to_string()))?;
    set(key, bytes)
}
