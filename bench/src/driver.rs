//! Load generators: a closed loop over a bus (keep `window` events outstanding, time each from
//! publish to its last output observed) and a direct loop for the floors (no bus at all).

use crate::Mode;
use plugbus::Event;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// How long the driver waits for an output before calling the run stuck.
const STALL: Duration = Duration::from_secs(20);

/// What one measurement saw.
#[derive(Debug, Clone, Default)]
pub struct Load {
    /// Events completed inside the measured window.
    pub events: u64,
    /// Length of the measured window.
    pub elapsed: Duration,
    /// End-to-end latency of the events published inside the window.
    pub latencies: Vec<Duration>,
}

impl Load {
    /// Events per second.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    /// The `p`th percentile latency, in µs.
    pub fn percentile_us(&self, p: usize) -> f64 {
        let mut v = self.latencies.clone();
        if v.is_empty() {
            return f64::NAN;
        }
        v.sort_unstable();
        v[(v.len() * p / 100).min(v.len() - 1)].as_secs_f64() * 1e6
    }
}

/// The ~1 KiB JSON event `seq` (field `seq` and `key` are echoed by the handler).
pub fn payload(seq: u64, key: &str) -> Vec<u8> {
    static TAIL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let tail = TAIL.get_or_init(|| {
        let items: Vec<_> = (0..12)
            .map(|i| serde_json::json!({ "sku": format!("sku-{i:04}"), "qty": i % 5 + 1, "price_cents": 995 + i * 10 }))
            .collect();
        let body = serde_json::json!({
            "customer": { "id": "c-000123", "email": "ann@example.com", "tier": "gold" },
            "items": items,
            "currency": "EUR",
        });
        let body = body.to_string();
        // Pad to 1 KiB with the seq/key prefix (about 40 bytes) included.
        let pad = 1024usize.saturating_sub(body.len() + 40 + 12);
        format!("{},\"note\":\"{}\"}}", &body[1..body.len() - 1], "x".repeat(pad))
    });
    format!("{{\"seq\":{seq},\"key\":\"{key}\",{tail}").into_bytes()
}

/// The fields of an output the driver reads.
#[derive(serde::Deserialize)]
pub struct Out {
    /// The input's sequence number.
    pub seq: u64,
    /// The input's key.
    pub key: Option<String>,
}

/// Keeps `window` events outstanding: `make(seq)` builds event `seq`, `publish` sends it, and
/// an event completes when `per_event` outputs carrying its `seq` were observed on `outputs`.
/// `check` sees every output (for order checks). After the window it waits for the outstanding
/// events so the host is idle again.
pub async fn closed_loop(
    mode: Mode,
    window: usize,
    per_event: u32,
    outputs: &mut mpsc::Receiver<Arc<Event>>,
    mut make: impl FnMut(u64) -> Event,
    publish: impl AsyncFn(Event) -> anyhow::Result<()>,
    mut check: impl FnMut(&Out),
) -> anyhow::Result<Load> {
    let start = Instant::now();
    let (measure_from, measure_to) = (start + mode.warmup, start + mode.warmup + mode.measure);
    // Per seq: when it was published and how many outputs are still missing.
    let mut sent: Vec<(Instant, u32)> = Vec::new();
    let (mut outstanding, mut load) = (0usize, Load { elapsed: mode.measure, ..Load::default() });
    loop {
        let now = Instant::now();
        if now < measure_to {
            while outstanding < window {
                let seq = sent.len() as u64;
                let event = make(seq);
                sent.push((Instant::now(), per_event));
                publish(event).await?;
                outstanding += 1;
            }
        } else if outstanding == 0 {
            return Ok(load);
        }
        let Ok(Some(ev)) = tokio::time::timeout(STALL, outputs.recv()).await else {
            anyhow::bail!("no output for {STALL:?} with {outstanding} events outstanding (a handler failing?)");
        };
        let out: Out = serde_json::from_slice(&ev.data)?;
        check(&out);
        let slot = &mut sent[out.seq as usize];
        slot.1 -= 1;
        if slot.1 == 0 {
            outstanding -= 1;
            let done = Instant::now();
            if done >= measure_from && done < measure_to {
                load.events += 1;
            }
            if slot.0 >= measure_from && slot.0 < measure_to {
                load.latencies.push(done - slot.0);
            }
        }
    }
}

/// Runs `tasks` concurrent loops of `call(seq)` (one event each, no bus) for the warm-up and
/// the measured window.
pub async fn direct_loop<F, Fut>(mode: Mode, tasks: usize, call: F) -> anyhow::Result<Load>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let start = Instant::now();
    let (measure_from, measure_to) = (start + mode.warmup, start + mode.warmup + mode.measure);
    let mut handles = Vec::new();
    for t in 0..tasks {
        let call = call.clone();
        handles.push(tokio::spawn(async move {
            let mut load = Load::default();
            let mut seq = t as u64;
            loop {
                let began = Instant::now();
                if began >= measure_to {
                    return anyhow::Ok(load);
                }
                call(seq).await?;
                let done = Instant::now();
                if began >= measure_from && done < measure_to {
                    load.events += 1;
                    load.latencies.push(done - began);
                }
                seq += tasks as u64;
            }
        }));
    }
    let mut total = Load { elapsed: mode.measure, ..Load::default() };
    for h in handles {
        let load = h.await??;
        total.events += load.events;
        total.latencies.extend(load.latencies);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_is_one_kib_of_json_carrying_seq_and_key() {
        let p = payload(123_456, "k-999");
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!((v["seq"].as_u64(), v["key"].as_str()), (Some(123_456), Some("k-999")));
        assert!((1000..=1048).contains(&p.len()), "{}", p.len());
    }
}
