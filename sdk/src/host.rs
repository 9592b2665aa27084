//! The one seam between the SDK's free functions and whoever answers them.
//!
//! Every host call the SDK makes ([`publish`](crate::publish), [`kv`](crate::kv),
//! [`config`](crate::config), [`log`](crate::log), [`request`](crate::request),
//! [`reply`](crate::reply)) goes through the functions of this module.
//! In the component (`wasm32`) they are the WIT imports of the real host; on any other target
//! (`cargo test`) they are the thread-local [`TestHost`](crate::testing::TestHost) of the
//! running test. Both sides have the same signatures, in the SDK's own types.

#[cfg(target_arch = "wasm32")]
pub(crate) use crate::http::wasm::send as http_send;
#[cfg(not(target_arch = "wasm32"))]
pub(crate) use crate::testing::calls::{
    config_get, http_send, kv_delete, kv_get, kv_set, log, publish, reply, request,
};
#[cfg(target_arch = "wasm32")]
pub(crate) use wasm::{config_get, kv_delete, kv_get, kv_set, log, publish, reply, request};

#[cfg(target_arch = "wasm32")]
mod wasm {
    use crate::__bindings::plugbus::handler::{bus, config, kv, logging, rpc, types as wit};
    use crate::{Event, PublishError, ReplyError, RequestError, kv::KvError, log::Level};

    pub(crate) fn publish(subject: &str, data: &[u8], headers: &[(String, String)]) -> Result<(), PublishError> {
        bus::publish(subject, data, headers).map_err(|e| match e {
            wit::PublishError::Denied(m) => PublishError::Denied(m),
            wit::PublishError::Limit(m) => PublishError::Limit(m),
            wit::PublishError::Invalid(m) => PublishError::Invalid(m),
        })
    }

    pub(crate) fn request(
        subject: &str,
        data: &[u8],
        headers: &[(String, String)],
        timeout_ms: u64,
    ) -> Result<Event, RequestError> {
        rpc::request(subject, data, headers, timeout_ms).map(Event::__from_wit).map_err(|e| match e {
            rpc::RequestError::Denied(m) => RequestError::Denied(m),
            rpc::RequestError::Limit(m) => RequestError::Limit(m),
            rpc::RequestError::Invalid(m) => RequestError::Invalid(m),
            rpc::RequestError::Timeout(m) => RequestError::Timeout(m),
            rpc::RequestError::NoResponders(m) => RequestError::NoResponders(m),
            rpc::RequestError::Unavailable(m) => RequestError::Unavailable(m),
        })
    }

    pub(crate) fn reply(reply_to: &str, data: &[u8], headers: &[(String, String)]) -> Result<(), ReplyError> {
        rpc::reply(reply_to, data, headers).map_err(|e| match e {
            rpc::ReplyError::Denied(m) => ReplyError::Denied(m),
            rpc::ReplyError::Limit(m) => ReplyError::Limit(m),
            rpc::ReplyError::Invalid(m) => ReplyError::Invalid(m),
        })
    }

    fn kv_err(e: wit::KvError) -> KvError {
        match e {
            wit::KvError::TooLarge(m) => KvError::TooLarge(m),
            wit::KvError::Unavailable(m) => KvError::Unavailable(m),
        }
    }

    pub(crate) fn kv_get(key: &str) -> Result<Option<Vec<u8>>, KvError> {
        kv::get(key).map_err(kv_err)
    }

    pub(crate) fn kv_set(key: &str, value: &[u8]) -> Result<(), KvError> {
        kv::set(key, value).map_err(kv_err)
    }

    pub(crate) fn kv_delete(key: &str) -> Result<(), KvError> {
        kv::delete(key).map_err(kv_err)
    }

    pub(crate) fn config_get(key: &str) -> Option<String> {
        config::get(key)
    }

    pub(crate) fn log(level: Level, message: &str) {
        let level = match level {
            Level::Trace => wit::LogLevel::Trace,
            Level::Debug => wit::LogLevel::Debug,
            Level::Info => wit::LogLevel::Info,
            Level::Warn => wit::LogLevel::Warn,
            Level::Error => wit::LogLevel::Error,
        };
        logging::log(level, message);
    }
}
