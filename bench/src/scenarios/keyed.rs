//! `keyed`: order per key. Every event carries header `key`, one of 1,000 keys picked
//! pseudo-randomly, and the handler orders by it (`order_by_header = "key"`). 512 events are
//! outstanding, so keys repeat in flight and lanes queue. Each output echoes its input's
//! sequence number: per key the numbers must rise; any that does not is counted
//! (`out_of_order`, must be 0).
//!
//! Baseline: the same host and window without the header (unordered), same run.

use super::{HostRun, host_run};
use crate::Mode;
use crate::report::Row;
use std::collections::{BTreeMap, HashMap};

const KEYS: u64 = 1_000;
const WINDOW: usize = 512;

pub async fn run(mode: Mode, handler: &[u8]) -> anyhow::Result<Row> {
    let mut last: HashMap<String, u64> = HashMap::new();
    let (mut out_of_order, mut outputs) = (0u64, 0u64);
    let check = |out: &crate::driver::Out| {
        outputs += 1;
        let key = out.key.clone().unwrap_or_default();
        if let Some(prev) = last.insert(key, out.seq)
            && prev > out.seq
        {
            out_of_order += 1;
        }
    };
    let HostRun { load, retried, dead_lettered, peak_in_flight } =
        host_run(mode, handler, 1, WINDOW, Some(KEYS), check).await?;
    let unordered = host_run(mode, handler, 1, WINDOW, None, |_| {}).await?.load.rate();
    let rate = load.rate();
    Ok(Row {
        events_per_s: Some(rate),
        p50_us: Some(load.percentile_us(50)),
        p99_us: Some(load.percentile_us(99)),
        baseline: "same host, unordered".into(),
        baseline_value: Some(unordered),
        ratio: Some(rate / unordered),
        extra: BTreeMap::from([
            ("out_of_order".into(), out_of_order as f64),
            ("keys_seen".into(), last.len() as f64),
            ("outputs_checked".into(), outputs as f64),
            ("peak_in_flight".into(), peak_in_flight as f64),
            ("retried".into(), retried as f64),
            ("dead_lettered".into(), dead_lettered as f64),
        ]),
        notes: if out_of_order == 0 { "order kept".into() } else { "ORDER BROKEN".into() },
        ..Row::default()
    })
}
