//! A plugin's stdout and stderr: captured per event, capped, then written to the host log.
//!
//! The guest never sees an error from writing (a chatty plugin is truncated, not crashed);
//! what is cut is counted and reported with the log lines.

use bytes::Bytes;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

#[derive(Default)]
struct Buffer {
    bytes: Vec<u8>,
    dropped: usize,
}

/// A capped in-memory sink for one stream of one event.
#[derive(Clone)]
pub struct Capture {
    cap: usize,
    buf: Arc<Mutex<Buffer>>,
}

impl Capture {
    /// A sink keeping at most `cap` bytes.
    pub fn new(cap: usize) -> Self {
        Self { cap, buf: Arc::default() }
    }

    fn push(&self, data: &[u8]) {
        let mut b = self.buf.lock().expect("capture poisoned");
        let room = self.cap.saturating_sub(b.bytes.len());
        let take = room.min(data.len());
        b.bytes.extend_from_slice(&data[..take]);
        b.dropped += data.len() - take;
    }

    /// The captured lines so far, leaving them in place.
    pub fn peek_lines(&self) -> Vec<String> {
        let b = self.buf.lock().expect("capture poisoned");
        String::from_utf8_lossy(&b.bytes).lines().map(str::to_owned).collect()
    }

    /// The captured lines (lossy UTF-8, empty lines skipped) and how many bytes were cut. Each
    /// line is charged [`crate::kv::ENTRY_COST`] on top of its text against the cap, as a `log`
    /// line is: each is a host log line, and 32,768 two-byte lines fit in 64 KiB.
    pub fn take_lines(&self) -> (Vec<String>, usize) {
        let mut b = self.buf.lock().expect("capture poisoned");
        let bytes = std::mem::take(&mut b.bytes);
        let mut dropped = std::mem::take(&mut b.dropped);
        let text = String::from_utf8_lossy(&bytes);
        let (mut lines, mut room) = (Vec::new(), self.cap);
        for piece in text.split_inclusive('\n') {
            let line = piece.trim_end_matches(['\n', '\r']);
            if line.trim().is_empty() {
                continue;
            }
            // On one line (a `\r` or a separator in it would start a log line of its own), and
            // charged as written (escaping never shrinks a line: one over the room as it came is
            // not escaped).
            let line = if line.len() + crate::kv::ENTRY_COST as usize > room {
                line.into()
            } else {
                crate::event::one_line(line)
            };
            let cost = line.len() + crate::kv::ENTRY_COST as usize;
            // Once one line is cut, every later one is too (the log keeps the start, in order).
            if cost > room {
                room = 0;
                dropped += piece.len();
                continue;
            }
            room -= cost;
            lines.push(line.into_owned());
        }
        (lines, dropped)
    }
}

impl IsTerminal for Capture {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for Capture {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for Capture {
    async fn ready(&mut self) {}
}

impl OutputStream for Capture {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl AsyncWrite for Capture {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_over_the_cap_is_cut_and_counted() {
        let c = Capture::new(64 + 5 + 64 + 5);
        c.push(b"hello\nworld\nand more\nand then some, far past the cap");
        let (lines, dropped) = c.take_lines();
        assert_eq!(lines, vec!["hello", "world"], "each line is charged 64 bytes besides its text");
        assert_eq!(dropped, "and more\nand then some, far past the cap".len());
        // Bytes past the cap are cut as they are written.
        let c = Capture::new(10);
        c.push(b"hello\nworld\nand more");
        assert_eq!(c.take_lines(), (vec![], 20), "no line fits 10 bytes at 64 each");
    }

    /// The attack: 30,000 two-byte lines are 30,000 host log lines, 60 KiB under a 64 KiB cap.
    #[test]
    fn each_line_is_charged_like_a_log_line() {
        let c = Capture::new(64 * 1024);
        c.push(&b"a\n".repeat(30_000));
        let (lines, dropped) = c.take_lines();
        assert_eq!(lines.len(), 64 * 1024 / (1 + 64), "{} lines kept", lines.len());
        assert_eq!(dropped, (30_000 - lines.len()) * 2);
    }
}
