//! `fanout-10`: ten plugins (renamed copies) all subscribed to `bench.in.>`, so every event is
//! delivered ten times. Headline: deliveries/s; latency is publish → the tenth output.
//!
//! Baseline: the 1-plugin host (embedded-1's setup) measured in the same run. Ten plugins
//! share the same two cores, so each gets at best a tenth: ratio = deliveries/s ÷ 1-plugin
//! events/s (1.0 = fan-out costs nothing beyond the extra handler runs).

use super::{HostRun, WINDOW, host_run};
use crate::Mode;
use crate::driver::Load;
use crate::report::Row;
use std::collections::BTreeMap;

const PLUGINS: usize = 10;

pub async fn run(mode: Mode, handler: &[u8]) -> anyhow::Result<Row> {
    // The ratio's sides take turns in short slices (see `Mode::slice`).
    let (mut run, mut single) = (HostRun::default(), Load::default());
    let slice = mode.slice();
    for _ in 0..mode.slices() {
        run.merge(host_run(slice, handler, PLUGINS, WINDOW, None, |_| {}).await?);
        single.merge(host_run(slice, handler, 1, WINDOW, None, |_| {}).await?.load);
    }
    let (HostRun { load, retried, dead_lettered, .. }, single) = (run, single.rate());
    let delivered = load.rate() * PLUGINS as f64;
    Ok(Row {
        events_per_s: Some(delivered),
        p50_us: Some(load.percentile_us(50)),
        p99_us: Some(load.percentile_us(99)),
        baseline: "1 plugin events/s (embedded-1)".into(),
        baseline_value: Some(single),
        ratio: Some(delivered / single),
        extra: BTreeMap::from([
            ("events_in_per_s".into(), load.rate()),
            ("retried".into(), retried as f64),
            ("dead_lettered".into(), dead_lettered as f64),
        ]),
        notes: "events/s = deliveries/s (10 per event)".into(),
        ..Row::default()
    })
}
