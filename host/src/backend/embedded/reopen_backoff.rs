//! How soon the event log's writer tries its file again after failed writes.
//!
//! After a failed write the log reopens its file before the next commit, and a reopen may run
//! redb's repair of the whole file. While a disk stays full, every commit (each producer's
//! append, each ack, the idle flush every 100 ms) failed and reopened again, so the writer kept
//! a core and the disk busy with repairs (review 59c M3). After one failure the next commit
//! tries at once (a single failed `fsync` heals without a pause); after more in a row, it waits
//! 25 ms, then twice as long each time, up to a second. A commit that comes sooner is refused
//! without touching the file, with the last failure's reason.

use std::time::{Duration, Instant};

/// The first wait, after two failures in a row.
const FIRST_WAIT: Duration = Duration::from_millis(25);

/// The longest wait between two tries: how late a log whose disk has room again may notice it.
const MOST_WAIT: Duration = Duration::from_secs(1);

/// The failures in a row and when the last one was.
#[derive(Default)]
pub(super) struct ReopenBackoff {
    failures: u32,
    last: Option<(Instant, String)>,
}

impl ReopenBackoff {
    /// A write failed (`why`).
    pub(super) fn failed(&mut self, why: &str) {
        self.failures = self.failures.saturating_add(1);
        self.last = Some((Instant::now(), why.to_string()));
    }

    /// A commit went through.
    pub(super) fn succeeded(&mut self) {
        *self = Self::default();
    }

    /// How long the next try must wait still.
    fn wait(&self) -> Duration {
        let Some((at, _)) = &self.last else { return Duration::ZERO };
        let wait = match self.failures {
            0 | 1 => Duration::ZERO,
            n => FIRST_WAIT.saturating_mul(1u32 << (n - 2).min(10)).min(MOST_WAIT),
        };
        wait.saturating_sub(at.elapsed())
    }

    /// Why a commit now is refused without a try, when it is.
    pub(super) fn refusal(&self) -> Option<String> {
        let wait = self.wait();
        let (_, why) = self.last.as_ref()?;
        (!wait.is_zero()).then(|| {
            format!(
                "{why} (after {} failed writes in a row, the file is tried again in {} ms)",
                self.failures,
                wait.as_millis().max(1)
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_grows_from_nothing_to_a_second() {
        let mut b = ReopenBackoff::default();
        assert!(b.refusal().is_none(), "no failure, no wait");
        b.failed("disk full");
        assert!(b.refusal().is_none(), "one failure: the next commit tries at once");
        b.failed("disk full");
        let why = b.refusal().expect("two in a row: a wait");
        assert!(why.starts_with("disk full (after 2 failed writes in a row"), "{why}");
        assert!(b.wait() <= FIRST_WAIT);
        for _ in 0..40 {
            b.failed("disk full");
        }
        assert!(b.wait() > Duration::from_millis(900) && b.wait() <= MOST_WAIT, "{:?}", b.wait());
        b.succeeded();
        assert!(b.refusal().is_none(), "a commit that went through ends the wait");
    }

    #[test]
    fn the_wait_ends_by_itself() {
        let mut b = ReopenBackoff::default();
        b.failed("x");
        b.failed("x");
        std::thread::sleep(FIRST_WAIT + Duration::from_millis(5));
        assert!(b.refusal().is_none());
    }
}
