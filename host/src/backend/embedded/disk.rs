//! Whether the file system under the event log keeps its reserve free: a plugin's backlog
//! (events waiting in the log for a plugin that fell behind its producers, or catches up)
//! grows only while it does, so one slow plugin cannot fill the disk that every producer
//! appends to (a full disk refuses them all). Read with `statvfs`, at most every
//! [`LOOK_EVERY`]. It sees what the file system has free, not the pages free inside the log's
//! file (redb reuses those, and gives them back only from the file's end): after a large
//! backlog drained, it reads less room than there is, and producers wait sooner.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a look at the file system is trusted.
pub const LOOK_EVERY: Duration = Duration::from_millis(20);

/// The most a reserve is: a tenth of the file system, up to this.
pub const RESERVE_MAX: u64 = 1 << 30;

/// What is kept free on a file system of `size` bytes: a tenth of it, at most [`RESERVE_MAX`].
pub fn reserve(size: u64) -> u64 {
    (size / 10).min(RESERVE_MAX)
}

/// The file system under one directory, looked at now and then.
#[derive(Debug)]
pub struct DiskRoom {
    dir: PathBuf,
    /// When it was last looked at, and whether it kept its reserve free then.
    last: Mutex<Option<(Instant, bool)>>,
    /// Whether a failed look was logged (once: the check is off while it fails).
    told_unreadable: std::sync::atomic::AtomicBool,
}

impl DiskRoom {
    /// The file system holding `dir`.
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf(), last: Mutex::new(None), told_unreadable: false.into() }
    }

    /// Whether more than its [`reserve`] is free (as of [`LOOK_EVERY`] ago at most); `true` when
    /// the file system cannot be read (the log's own writes then say how it is).
    pub fn keeps_its_reserve(&self) -> bool {
        let mut last = self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, keeps)) = *last
            && at.elapsed() < LOOK_EVERY
        {
            return keeps;
        }
        let keeps = match free_and_size(&self.dir) {
            Some((free, size)) => free > reserve(size),
            None => {
                if !self.told_unreadable.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(dir = %self.dir.display(), "cannot read the file system under the event log \
                        (statvfs failed): a slow plugin's backlog is bounded by flow.backlog_mib alone, not by the \
                        disk's reserve (logged once)");
                }
                true
            }
        };
        *last = Some((Instant::now(), keeps));
        keeps
    }
}

/// The bytes free to an unprivileged writer on the file system holding `dir`, and its size.
fn free_and_size(dir: &Path) -> Option<(u64, u64)> {
    let path = CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut stat = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is NUL-terminated and lives across the call; `stat` is written by
    // `statvfs` when it answers 0, and only read then.
    let stat = unsafe {
        if libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) != 0 {
            return None;
        }
        stat.assume_init()
    };
    // (The fields' types differ between platforms.)
    #[allow(clippy::unnecessary_cast)]
    let (unit, free, blocks) = ((stat.f_frsize as u64).max(1), stat.f_bavail as u64, stat.f_blocks as u64);
    Some((free.saturating_mul(unit), blocks.saturating_mul(unit)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_a_tenth_up_to_a_gibibyte() {
        assert_eq!(reserve(24 << 20), (24 << 20) / 10);
        assert_eq!(reserve(100 << 30), RESERVE_MAX);
    }

    #[test]
    fn a_file_system_is_read_and_an_unreadable_one_does_not_hold_anything_back() {
        let dir = tempfile::tempdir().unwrap();
        let (free, size) = free_and_size(dir.path()).expect("statvfs of a temp dir");
        assert!(size > 0 && free <= size, "free {free} of {size}");
        assert!(DiskRoom::new(Path::new("/no/such/dir/at/all")).keeps_its_reserve());
    }
}
