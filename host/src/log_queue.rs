//! The host's log lines on their way to stderr (`plugbus run`): handed to a thread of their own,
//! so a reader that lags (a stalled pipe, a busy journald, a paused terminal) never blocks the
//! runtime's workers. Written to stderr directly, a line blocked the worker that logged it, and
//! std's stderr lock then every worker that logged after it: one plugin logging its most on every
//! event, with the reader behind, stalled every plugin and the API (review 59d F3). Past
//! [`QUEUED_BYTES`] waiting, lines are dropped, counted, and said to be once the reader catches
//! up; never waited for.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, mpsc};
use std::time::Duration;

/// The most bytes of log lines waiting for stderr; past it a line is dropped.
pub const QUEUED_BYTES: u64 = 8 << 20;

/// Lines waiting for the writer thread, and what it has not written yet.
struct Queue {
    lines: mpsc::Sender<Vec<u8>>,
    /// Bytes sent and not written yet (the writer takes them off once written).
    waiting: Arc<Waiting>,
    /// Lines dropped since the start.
    dropped: Arc<AtomicU64>,
}

#[derive(Default)]
struct Waiting {
    bytes: Mutex<u64>,
    written: Condvar,
}

static QUEUE: OnceLock<Queue> = OnceLock::new();

/// Starts the writer thread: from now on [`push`] hands lines to it, which writes them to
/// `out`. Once per process; later calls change nothing.
pub fn start(out: impl Write + Send + 'static) -> std::io::Result<()> {
    if QUEUE.get().is_some() {
        return Ok(());
    }
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let (waiting, dropped) = (Arc::new(Waiting::default()), Arc::new(AtomicU64::new(0)));
    let (thread_waiting, thread_dropped) = (waiting.clone(), dropped.clone());
    std::thread::Builder::new().name("plugbus-log".into()).spawn(move || {
        write_lines(rx, out, &thread_waiting, &thread_dropped);
    })?;
    let _ = QUEUE.set(Queue { lines: tx, waiting, dropped });
    Ok(())
}

fn write_lines(rx: mpsc::Receiver<Vec<u8>>, mut out: impl Write, waiting: &Waiting, dropped: &AtomicU64) {
    let mut told = 0;
    for line in rx {
        // (A line that cannot be written is lost; nothing else can be done with it.)
        let _ = out.write_all(&line);
        let now = dropped.load(Ordering::Relaxed);
        if now > told {
            let note = format!(
                "plugbus: {} log lines dropped: stderr was not read as fast as the host wrote ({} MiB waited)\n",
                now - told,
                QUEUED_BYTES >> 20
            );
            let _ = out.write_all(note.as_bytes());
            told = now;
        }
        let _ = out.flush();
        let mut bytes = waiting.bytes.lock().unwrap_or_else(|e| e.into_inner());
        *bytes = bytes.saturating_sub(line.len() as u64);
        if *bytes == 0 {
            waiting.written.notify_all();
        }
    }
}

/// Lines dropped so far because stderr lagged past [`QUEUED_BYTES`] (the log itself says so
/// once the reader catches up).
#[cfg(test)]
fn dropped() -> u64 {
    QUEUE.get().map_or(0, |q| q.dropped.load(Ordering::Relaxed))
}

/// Waits until every line handed over is written, or `timeout` passes: before the process
/// ends (an error reported after the queue's lines, not before them).
pub fn flush(timeout: Duration) {
    let Some(q) = QUEUE.get() else { return };
    let bytes = q.waiting.bytes.lock().unwrap_or_else(|e| e.into_inner());
    let _ = q.waiting.written.wait_timeout_while(bytes, timeout, |b| *b > 0);
}

/// Hands a line to the writer thread, or drops it past [`QUEUED_BYTES`] waiting; never waits.
/// `false` when the queue was not started (the caller writes the line itself).
pub fn push(buf: &[u8]) -> bool {
    let Some(q) = QUEUE.get() else { return false };
    {
        let mut bytes = q.waiting.bytes.lock().unwrap_or_else(|e| e.into_inner());
        if *bytes + buf.len() as u64 > QUEUED_BYTES {
            q.dropped.fetch_add(1, Ordering::Relaxed);
            return true;
        }
        *bytes += buf.len() as u64;
    }
    let sent = q.lines.send(buf.to_vec());
    if sent.is_err() {
        // The writer thread is gone: nothing will take it off.
        let mut bytes = q.waiting.bytes.lock().unwrap_or_else(|e| e.into_inner());
        *bytes = bytes.saturating_sub(buf.len() as u64);
        q.dropped.fetch_add(1, Ordering::Relaxed);
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stderr nobody reads: its writes wait until it is let go.
    struct Stalled(Arc<(Mutex<bool>, Condvar)>, Arc<Mutex<Vec<u8>>>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, opened) = &*self.0;
            let open = opened.wait_while(open.lock().unwrap(), |open| !*open).unwrap();
            drop(open);
            self.1.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// Review 59d F3: with stderr not read, a line written blocked the worker that logged it
    /// (and, through std's lock, every worker after it). Now a line never waits: past
    /// [`QUEUED_BYTES`] waiting it is dropped and counted, and once the reader comes back the
    /// queued lines go out, then a note of how many were dropped.
    #[test]
    fn a_stderr_nobody_reads_never_holds_a_line_up() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let read = Arc::new(Mutex::new(Vec::new()));
        start(Stalled(gate.clone(), read.clone())).unwrap();
        let line = vec![b'x'; 1 << 20];
        let started = std::time::Instant::now();
        for _ in 0..20 {
            assert!(push(&line));
        }
        assert!(started.elapsed() < Duration::from_secs(5), "a line waited for the reader: {:?}", started.elapsed());
        assert_eq!(dropped(), 20 - (QUEUED_BYTES >> 20), "lines past the queue's bytes");
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        flush(Duration::from_secs(10));
        let read = String::from_utf8(read.lock().unwrap().clone()).unwrap();
        assert_eq!(read.matches('x').count() as u64, QUEUED_BYTES, "the queued lines, whole");
        let note = "plugbus: 12 log lines dropped: stderr was not read as fast as the host wrote (8 MiB waited)\n";
        assert!(read.contains(note), "no note of the lines dropped");
    }
}
