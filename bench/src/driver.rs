//! Load generators: a closed loop over a bus (keep `window` events outstanding, time each from
//! publish to its last output observed), an open loop (publish at a fixed rate whatever the
//! host does) and a direct loop for the floors (no bus at all).

use crate::Mode;
use plugbus::Event;
use plugbus::transport::Transport;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

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
    /// CPU time the whole process used inside the window (every thread: host, driver, wasm).
    pub cpu: Duration,
}

impl Load {
    /// Events per second.
    pub fn rate(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64()
    }

    /// Adds another slice of the same measurement (see `Mode::slice`).
    pub fn merge(&mut self, slice: Load) {
        self.events += slice.events;
        self.elapsed += slice.elapsed;
        self.cpu += slice.cpu;
        self.latencies.extend(slice.latencies);
    }

    /// Two measurements that ran at the same time, as one: their events over the longer window.
    /// Each window's CPU is the whole process's, so the two CPU figures are of the same time and
    /// their mean is kept, not their sum.
    pub fn side_by_side(a: Load, b: Load) -> Load {
        let mut latencies = a.latencies;
        latencies.extend(b.latencies);
        Load { events: a.events + b.events, elapsed: a.elapsed.max(b.elapsed), latencies, cpu: (a.cpu + b.cpu) / 2 }
    }

    /// CPU µs the process spent per event completed in the window: what an event costs,
    /// whatever the cores did meanwhile (steadier than a rate on a VM whose speed drifts, and
    /// it shows what a second core adds per event).
    pub fn cpu_us_per_event(&self) -> f64 {
        self.cpu.as_secs_f64() * 1e6 / self.events.max(1) as f64
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
///
/// `publish` is a closure returning a future rather than an `AsyncFn`: an async closure that
/// borrows makes the scenario's future not `Send` (rustc #100013), and scenarios run as tasks.
pub async fn closed_loop<P: Future<Output = anyhow::Result<()>>>(
    mode: Mode,
    window: usize,
    per_event: u32,
    outputs: &mut mpsc::Receiver<Arc<Event>>,
    mut make: impl FnMut(u64) -> Event,
    publish: impl Fn(Event) -> P,
    mut check: impl FnMut(&Out),
) -> anyhow::Result<Load> {
    let start = Instant::now();
    let (measure_from, measure_to) = (start + mode.warmup, start + mode.warmup + mode.measure);
    let cpu = CpuWindow::over(measure_from, measure_to);
    // Per seq: when it was published and how many outputs are still missing.
    let mut sent: Vec<(Instant, u32)> = Vec::new();
    let (mut outstanding, mut load) = (0usize, Load { elapsed: mode.measure, ..Load::default() });
    loop {
        let now = Instant::now();
        cpu.tick(now);
        if now < measure_to {
            while outstanding < window {
                let seq = sent.len() as u64;
                let event = make(seq);
                sent.push((Instant::now(), per_event));
                publish(event).await?;
                outstanding += 1;
            }
        } else if outstanding == 0 {
            load.cpu = cpu.used();
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

/// A fixed-rate publisher: event `seq` is due at `start + seq / rate` and is published as soon
/// as it is due, whether or not earlier ones were handled (an open loop: a host that stalls
/// does not slow the schedule). Latency is publish → first output, as in the closed loop; how
/// late each publish was against its schedule is kept too (`OpenRun::window`'s `lag`), so a
/// publish held up by backpressure shows rather than hiding a stall (timer ticks are 1 ms, so
/// up to about 1 ms of lag is the clock, not the host). Every output is counted per `seq`, so
/// losses and duplicates show.
pub struct OpenLoop {
    start: Instant,
    rate: f64,
    stop: Arc<AtomicBool>,
    publisher: JoinHandle<anyhow::Result<Vec<Instant>>>,
    collector: JoinHandle<anyhow::Result<Seen>>,
    distinct: Arc<AtomicU64>,
    stop_collector: oneshot::Sender<()>,
}

/// Per `seq`: outputs seen and when the first one arrived.
#[derive(Default)]
struct Seen {
    outputs: Vec<u32>,
    first: Vec<Option<Instant>>,
}

impl OpenLoop {
    /// Starts publishing `make(seq)` on `transport` at `rate` events/s; one output per event is
    /// expected on `outputs`.
    pub fn start(
        rate: f64,
        transport: Arc<dyn Transport>,
        make: impl Fn(u64) -> Event + Send + 'static,
        mut outputs: mpsc::Receiver<Arc<Event>>,
    ) -> Self {
        let start = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let due = move |seq: u64| start + Duration::from_secs_f64(seq as f64 / rate);
        let publisher = {
            let stop = stop.clone();
            tokio::spawn(async move {
                // When each event was published.
                let mut sent = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    let now = Instant::now();
                    while due(sent.len() as u64) <= now {
                        let event = make(sent.len() as u64);
                        sent.push(Instant::now());
                        transport.publish(event).await?;
                    }
                    tokio::time::sleep_until(due(sent.len() as u64).into()).await;
                }
                Ok(sent)
            })
        };
        let distinct = Arc::new(AtomicU64::new(0));
        let (stop_collector, mut stopped) = oneshot::channel();
        let collector = {
            let distinct = distinct.clone();
            tokio::spawn(async move {
                let mut seen = Seen::default();
                loop {
                    let ev = tokio::select! {
                        biased;
                        ev = outputs.recv() => ev,
                        _ = &mut stopped => None,
                    };
                    let Some(ev) = ev else { return Ok(seen) };
                    let at = Instant::now();
                    let seq = serde_json::from_slice::<Out>(&ev.data)?.seq as usize;
                    if seen.outputs.len() <= seq {
                        seen.outputs.resize(seq + 1, 0);
                        seen.first.resize(seq + 1, None);
                    }
                    seen.outputs[seq] += 1;
                    if seen.first[seq].is_none() {
                        seen.first[seq] = Some(at);
                        distinct.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        };
        Self { start, rate, stop, publisher, collector, distinct, stop_collector }
    }

    /// Stops publishing, waits (up to the stall limit) until every published event has an
    /// output, then a little longer for late duplicates.
    pub async fn finish(self) -> anyhow::Result<OpenRun> {
        self.stop.store(true, Ordering::Relaxed);
        let sent = self.publisher.await??;
        let published = sent.len() as u64;
        let deadline = Instant::now() + STALL;
        while self.distinct.load(Ordering::Relaxed) < published && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let _ = self.stop_collector.send(());
        let Seen { mut outputs, mut first } = self.collector.await??;
        anyhow::ensure!(outputs.len() as u64 <= published, "an output for an event never published");
        outputs.resize(published as usize, 0);
        first.resize(published as usize, None);
        Ok(OpenRun { start: self.start, rate: self.rate, outputs, sent, first })
    }
}

/// What an open loop saw, per event.
pub struct OpenRun {
    start: Instant,
    rate: f64,
    /// Outputs per `seq` (1 each when nothing was lost or handled twice).
    pub outputs: Vec<u32>,
    sent: Vec<Instant>,
    first: Vec<Option<Instant>>,
}

impl OpenRun {
    /// Events published.
    pub fn published(&self) -> u64 {
        self.outputs.len() as u64
    }

    /// Events with no output.
    pub fn lost(&self) -> u64 {
        self.outputs.iter().filter(|&&n| n == 0).count() as u64
    }

    /// Outputs beyond the first of their event.
    pub fn duplicates(&self) -> u64 {
        self.outputs.iter().map(|&n| u64::from(n.saturating_sub(1))).sum()
    }

    /// Between `from` and `to`: the events whose first output arrived in the window, the
    /// latency (publish → first output) of the events published in it, and how late those
    /// publishes were against the schedule (`lag`, as a [`Load`] of latencies).
    pub fn window(&self, from: Instant, to: Instant) -> (Load, Load) {
        let mut load = Load { elapsed: to - from, ..Load::default() };
        let mut lag = load.clone();
        for (seq, (first, &sent)) in self.first.iter().zip(&self.sent).enumerate() {
            let Some(first) = *first else { continue };
            if first >= from && first < to {
                load.events += 1;
            }
            if sent >= from && sent < to {
                let due = self.start + Duration::from_secs_f64(seq as f64 / self.rate);
                load.latencies.push(first - sent);
                lag.latencies.push(sent.saturating_duration_since(due));
            }
        }
        (load, lag)
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
    let cpu = Arc::new(CpuWindow::over(measure_from, measure_to));
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (call, cpu) = (call.clone(), cpu.clone());
        handles.push(tokio::spawn(async move {
            let mut load = Load::default();
            let mut seq = t as u64;
            loop {
                let began = Instant::now();
                cpu.tick(began);
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
    total.cpu = cpu.used();
    Ok(total)
}

/// The process's CPU time between two instants, read by the loop itself at the first event
/// it sees past each (a task of its own would not run while a one-thread loop is busy).
struct CpuWindow {
    window: (Instant, Instant),
    from: std::sync::OnceLock<Duration>,
    to: std::sync::OnceLock<Duration>,
}

impl CpuWindow {
    /// The window from `from` to `to`, not read yet.
    fn over(from: Instant, to: Instant) -> Self {
        Self { window: (from, to), from: Default::default(), to: Default::default() }
    }

    /// Reads the clock at the first call at or past the window's start, and at the first at or
    /// past its end.
    fn tick(&self, now: Instant) {
        if now >= self.window.0 {
            self.from.get_or_init(process_cpu);
        }
        if now >= self.window.1 {
            self.to.get_or_init(process_cpu);
        }
    }

    /// The CPU time between the two readings (zero when the window was never passed).
    fn used(&self) -> Duration {
        match (self.from.get(), self.to.get()) {
            (Some(from), Some(to)) => to.saturating_sub(*from),
            _ => Duration::ZERO,
        }
    }
}

/// CPU time of every thread of this process so far (`CLOCK_PROCESS_CPUTIME_ID`).
fn process_cpu() -> Duration {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid, writable timespec; the clock id is a constant Linux supports.
    let read = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) };
    if read != 0 {
        return Duration::ZERO;
    }
    Duration::new(t.tv_sec as u64, t.tv_nsec as u32)
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

    #[test]
    fn cpu_per_event_is_the_windows_cpu_over_its_events_and_slices_add_up() {
        let mut load = Load { events: 4, cpu: Duration::from_micros(100), ..Load::default() };
        assert_eq!(load.cpu_us_per_event(), 25.0);
        load.merge(Load { events: 6, cpu: Duration::from_micros(150), ..Load::default() });
        assert_eq!((load.events, load.cpu), (10, Duration::from_micros(250)));
        assert_eq!(load.cpu_us_per_event(), 25.0);
        // No event completed: the CPU is not divided by zero.
        assert_eq!(Load { cpu: Duration::from_micros(7), ..Load::default() }.cpu_us_per_event(), 7.0);
    }

    #[test]
    fn two_loads_side_by_side_add_their_events_over_the_longer_window_and_share_the_cpu() {
        let load = |events, ms, cpu_us| Load {
            events,
            elapsed: Duration::from_millis(ms),
            latencies: vec![Duration::from_micros(events)],
            cpu: Duration::from_micros(cpu_us),
        };
        let both = Load::side_by_side(load(300, 1000, 4000), load(100, 500, 6000));
        assert_eq!((both.events, both.elapsed), (400, Duration::from_millis(1000)));
        assert_eq!(both.rate(), 400.0);
        // The process's CPU over the same time, seen twice: its mean, over both sides' events.
        assert_eq!(both.cpu_us_per_event(), 12.5);
        assert_eq!(both.latencies.len(), 2);
    }

    #[tokio::test]
    async fn a_loop_measures_the_cpu_its_events_burn() {
        // Each event burns at least 200 µs of the process's CPU, one at a time: whatever else
        // runs, the window's CPU per event cannot read less than about that. (Bounded in wall
        // time too: a clock that cannot be read fails the assertion instead of spinning.)
        let burn = |_seq| async {
            let (until, started) = (process_cpu() + Duration::from_micros(200), Instant::now());
            while process_cpu() < until && started.elapsed() < Duration::from_millis(50) {
                std::hint::spin_loop();
            }
            Ok(())
        };
        let load = direct_loop(crate::Mode::new(true), 1, burn).await.unwrap();
        assert!(load.events > 0, "no event completed in the window");
        let per_event = load.cpu_us_per_event();
        assert!(per_event >= 150.0, "{per_event} µs of CPU per event, each burning at least 200");
    }
}
