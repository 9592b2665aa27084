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
    // The ratio's sides take turns in short slices (see `Mode::slice`); each slice is a host
    // of its own whose sequence numbers start at 0, so order is checked per slice.
    let (mut run, mut unordered) = (HostRun::default(), crate::driver::Load::default());
    let (mut out_of_order, mut outputs, mut keys_seen) = (0u64, 0u64, 0usize);
    let slice = mode.slice();
    for _ in 0..mode.slices() {
        let mut last: HashMap<String, u64> = HashMap::new();
        let check = |out: &crate::driver::Out| {
            outputs += 1;
            let key = out.key.clone().unwrap_or_default();
            if let Some(prev) = last.insert(key, out.seq)
                && prev > out.seq
            {
                out_of_order += 1;
            }
        };
        run.merge(host_run(slice, handler, 1, WINDOW, Some(KEYS), check).await?);
        keys_seen = keys_seen.max(last.len());
        unordered.merge(host_run(slice, handler, 1, WINDOW, None, |_| {}).await?.load);
    }
    let HostRun { load, retried, dead_lettered, peak_in_flight, .. } = run;
    let unordered = unordered.rate();
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
            ("keys_seen".into(), keys_seen as f64),
            ("outputs_checked".into(), outputs as f64),
            ("peak_in_flight".into(), peak_in_flight as f64),
            ("retried".into(), retried as f64),
            ("dead_lettered".into(), dead_lettered as f64),
        ]),
        notes: if out_of_order == 0 { "order kept".into() } else { "ORDER BROKEN".into() },
        ..Row::default()
    })
}
