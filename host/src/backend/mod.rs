//! Backends: one folder per broker. A backend owns its settings, its transport (how events
//! arrive and leave), its kv store, the dead letters it keeps and how an attempt's kv writes,
//! outputs and ack settle together (its outbox); the rest of the host sees only the
//! [`Transport`] and [`KvStore`] traits.
//!
//! - [`embedded`]: the in-process bus, with the durable event log (`data_dir/bus.redb`) by
//!   default: no server needed.
//! - [`nats`]: NATS core subjects and JetStream durable consumers, JetStream KV, the
//!   `PLUGBUS_DLQ` stream: how plugbus scales past one machine.
//!
//! Adding a broker: a folder here with an `open(&Config) -> Backend`, its settings as a config
//! section, one [`BusKind`] variant and one line in [`open`].

pub mod embedded;
pub mod nats;

use crate::config::Config;
use crate::kv::KvStore;
use crate::transport::Transport;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// `[bus] kind`: which backend the host runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BusKind {
    /// The in-process bus (the default without `nats.url`).
    Embedded,
    /// NATS (the default when `nats.url` or `--nats` is given).
    Nats,
}

/// What a backend gives the host.
pub struct Backend {
    /// How events arrive and leave.
    pub transport: Arc<dyn Transport>,
    /// Where plugin kv lives.
    pub kv: Arc<dyn KvStore>,
}

/// Opens the backend the config chooses.
pub async fn open(config: &Config) -> anyhow::Result<Backend> {
    match config.bus_kind()? {
        BusKind::Embedded => embedded::open(config),
        BusKind::Nats => nats::open(config).await,
    }
}
