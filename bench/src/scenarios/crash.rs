//! `crash`: events are published into a host on the durable embedded bus (64 producers at once,
//! each waiting for its event to be accepted, as HTTP clients wait for their `202`), the host is
//! SIGKILLed halfway, started again and given the rest. Then the log is read back: every
//! accepted event must have exactly one output record (`lost` and `twice` must be 0), counted
//! by the input id each output names (`plugbus-caused-by`).
//!
//! The host runs in a child process (this binary with `--crash-child`), so the kill is a real
//! `kill -9`. Headline: the time from starting the host again to its first accepted event
//! (opening the log and queueing what was unsettled included); `ratio` is accepted events that
//! came out exactly once over accepted events (1.0 is the only passing value).

use crate::Mode;
use crate::components;
use crate::report::Row;
use plugbus::Event;
use plugbus::backend::embedded::log::{DurableLog, SyncPolicy};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Producers publishing at once.
const PRODUCERS: usize = 64;

/// One host child: accepted `(seq, id)` come back one per line.
struct HostChild {
    child: Child,
    lines: std::io::Lines<BufReader<ChildStdout>>,
}

impl HostChild {
    /// Starts a host publishing events `from..to`; returns once it says it is ready.
    fn start(plugins: &Path, data: &Path, from: u64, to: u64) -> anyhow::Result<(Self, Duration)> {
        let started = Instant::now();
        let mut child = Command::new(std::env::current_exe()?)
            .arg("--crash-child")
            .args([plugins.as_os_str(), data.as_os_str()])
            .args([from.to_string(), to.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().expect("piped");
        let mut me = Self { child, lines: BufReader::new(stdout).lines() };
        match me.next()? {
            Some(line) if line == "ready" => Ok((me, started.elapsed())),
            other => anyhow::bail!("the host child said {other:?} instead of ready"),
        }
    }

    fn next(&mut self) -> anyhow::Result<Option<String>> {
        Ok(self.lines.next().transpose()?)
    }
}

impl Drop for HostChild {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn run(mode: Mode, handler: &[u8]) -> anyhow::Result<Row> {
    let total: u64 = if mode.quick { 2_000 } else { 10_000 };
    let plugins = components::plugins_dir(handler, 1)?;
    let data = tempfile::Builder::new().prefix("plugbus-bench-crash").tempdir()?;
    let (plugins_path, data_path) = (plugins.path().to_path_buf(), data.path().to_path_buf());
    tokio::task::spawn_blocking(move || measure(&plugins_path, &data_path, total)).await?
}

fn measure(plugins: &Path, data: &Path, total: u64) -> anyhow::Result<Row> {
    let mut accepted: HashMap<String, u64> = HashMap::new();
    let read_acks =
        |host: &mut HostChild, accepted: &mut HashMap<String, u64>, stop_at: usize| -> anyhow::Result<u64> {
            let mut last = 0;
            while accepted.len() < stop_at {
                let Some(line) = host.next()? else { break };
                if line == "done" {
                    break;
                }
                let (seq, id) = line.split_once(' ').ok_or_else(|| anyhow::anyhow!("the host child said {line:?}"))?;
                let seq: u64 = seq.parse()?;
                last = last.max(seq);
                accepted.insert(id.to_string(), seq);
            }
            Ok(last)
        };
    // First run: killed once half the events were accepted.
    let (mut first, _) = HostChild::start(plugins, data, 0, total)?;
    let last = read_acks(&mut first, &mut accepted, total as usize / 2)?;
    first.child.kill()?;
    first.child.wait()?;
    drop(first);
    let before_kill = accepted.len();
    // Second run: the rest, after whatever the log kept is recovered.
    let (mut second, restart) = HostChild::start(plugins, data, last + 1, total)?;
    let first_ack = Instant::now();
    let _ = second.next()?.map(|line| {
        if let Some((seq, id)) = line.split_once(' ') {
            accepted.insert(id.to_string(), seq.parse().unwrap_or(0));
        }
    });
    let resume = restart + first_ack.elapsed();
    read_acks(&mut second, &mut accepted, usize::MAX)?;
    let status = second.child.wait()?;
    anyhow::ensure!(status.success(), "the second host child failed: {status}");

    // The log says what came out, counted by the input each output names.
    let log = DurableLog::open(&data.join("bus.redb"), SyncPolicy::Always)?;
    let mut outputs: HashMap<String, u64> = HashMap::new();
    let mut from = 0;
    loop {
        let page = log.read(from, 4096)?;
        let Some((last, _)) = page.last() else { break };
        from = last + 1;
        for (_, ev) in &page {
            if ev.subject.starts_with("bench.out.")
                && let Some(input) = ev.header("plugbus-caused-by")
            {
                *outputs.entry(input.to_string()).or_default() += 1;
            }
        }
    }
    let lost = accepted.keys().filter(|id| !outputs.contains_key(*id)).count();
    let twice = outputs.values().filter(|n| **n > 1).count();
    let once = accepted.keys().filter(|id| outputs.get(*id) == Some(&1)).count();
    Ok(Row {
        events_per_s: None,
        p50_us: Some(resume.as_micros() as f64),
        p99_us: None,
        baseline: "accepted events (exactly-once share)".into(),
        baseline_value: Some(accepted.len() as f64),
        ratio: Some(once as f64 / accepted.len().max(1) as f64),
        extra: BTreeMap::from([
            ("accepted".into(), accepted.len() as f64),
            ("accepted_before_kill".into(), before_kill as f64),
            ("lost".into(), lost as f64),
            ("twice".into(), twice as f64),
            ("restart_to_ready_ms".into(), restart.as_secs_f64() * 1e3),
            ("resume_ms".into(), resume.as_secs_f64() * 1e3),
        ]),
        notes: "p50_us = time from the restart to its first accepted event; lost and twice must be 0".into(),
        ..Row::default()
    })
}

/// The child: a host on the durable embedded bus that publishes events `from..to` with
/// [`PRODUCERS`] producers, prints `seq id` for each accepted one, then drains and stops.
pub fn child(args: &[String]) -> anyhow::Result<()> {
    let [plugins, data, from, to] = args else { anyhow::bail!("--crash-child PLUGINS DATA FROM TO") };
    let (from, to): (u64, u64) = (from.parse()?, to.parse()?);
    let runtime = plugbus::runtime::build()?;
    runtime.block_on(async move {
        let mut config = components::config(Path::new(plugins), Path::new(data));
        config.bus.durable = true;
        let host = std::sync::Arc::new(plugbus::Host::start(config).await?);
        println!("ready");
        let next = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(from));
        let mut producers = tokio::task::JoinSet::new();
        for _ in 0..PRODUCERS {
            let (host, next) = (host.clone(), next.clone());
            producers.spawn(async move {
                loop {
                    let seq = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if seq >= to {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let ev = Event::new("bench.in.e1", crate::driver::payload(seq, ""));
                    let id = ev.id.clone();
                    host.publish(ev).await?;
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "{seq} {id}")?;
                }
            });
        }
        while let Some(done) = producers.join_next().await {
            done??;
        }
        println!("done");
        let host =
            std::sync::Arc::into_inner(host).ok_or_else(|| anyhow::anyhow!("a producer still holds the host"))?;
        let report = host.shutdown().await;
        anyhow::ensure!(report.is_clean(), "host stopped with events unhandled: {report:?}");
        Ok(())
    })
}
