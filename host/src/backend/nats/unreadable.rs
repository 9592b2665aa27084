//! `plugbus_nats_unreadable_total`: messages the server passed on that the client could not
//! read (a subject or header block that is not UTF-8, a header line without `:`), dropped
//! unread without closing the connection. The NATS server forwards subjects and headers
//! unchecked; async-nats 0.51 closed the whole connection at one (every plugin's), so plugbus
//! builds it patched (`vendor/async-nats`) to drop and count them instead. A JetStream message
//! so is handed to the pull's inbox marked, and dead-lettered unrun and termed (review 62a).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

/// The count of the host's connection, read at each scrape.
#[derive(Debug)]
pub(super) struct Unreadable(pub(super) Arc<async_nats::Statistics>);

impl TypedMetric for Unreadable {
    const TYPE: MetricType = MetricType::Counter;
}

impl EncodeMetric for Unreadable {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<NoLabelSet, _, u64>(&self.0.unreadable_messages.load(Ordering::Relaxed), None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}
