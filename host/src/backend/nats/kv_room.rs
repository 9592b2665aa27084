//! How much a plugin's JetStream KV bucket may hold, and the room each commit takes in it,
//! counted by plugbus (a quota the server would keep with `max_bytes` is reserved out of its
//! store, and refuses deletes at it).
//!
//! A bucket may hold [`bucket_bound`] bytes and [`entry_bound`] entries of its plugin's quota, as
//! the server counts them. A commit that grows the bucket past either fails as the plugin's
//! ([`KvError::BucketFull`]); one that does not grow it (deletes, rewrites no larger than what
//! they replace) always passes. The bucket's size is read at most every [`SIZE_FRESH`], one read
//! at a time, and what the host's commits under way take is held against it until they land
//! (then counted in, until the next read). Hosts sharing a bucket see each other's writes only
//! at their reads: together they may pass the bound by what they write within [`SIZE_FRESH`].

use crate::kv::{ENTRY_COST, KvError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The bytes a plugin's bucket may hold, as the server counts them (each entry's subject and
/// headers with its value, and the markers of keys deleted lately), for a quota of
/// `max_kv_bytes`: four times it, at least 4 MiB.
pub fn bucket_bound(max_kv_bytes: u64) -> u64 {
    max_kv_bytes.saturating_mul(4).max(4 << 20)
}

/// The entries (keys, markers of deleted ones included) a plugin's bucket may hold: one for each
/// [`ENTRY_COST`] bytes of its quota, as the embedded store counts them, at least 4,096. The
/// server keeps each subject in memory (a few hundred bytes each).
pub fn entry_bound(max_kv_bytes: u64) -> u64 {
    (max_kv_bytes / ENTRY_COST).max(4096)
}

/// What a value of `value_len` bytes under a subject of `subject_len` adds to a bucket as the
/// server counts it, about: the subject, the value, and the headers and record (at most about
/// 256 bytes). A delete marker is one of no value.
pub(super) fn stored_bytes(subject_len: usize, value_len: usize) -> u64 {
    (subject_len + value_len) as u64 + 256
}

/// How long a bucket's size, as last read, stands in for it (with what the host wrote since).
const SIZE_FRESH: Duration = Duration::from_millis(250);

/// What one commit changes in its bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Change {
    /// The bytes it adds, net of what its writes replace (known for the keys it read).
    pub(super) grows: i64,
    /// The entries it adds (values under keys not known to be there).
    pub(super) entries: u64,
}

#[derive(Default)]
struct Held {
    read_at: Option<Instant>,
    bytes: u64,
    entries: u64,
    /// Taken by commits under way.
    pending_bytes: u64,
    pending_entries: u64,
}

/// One bucket's room.
#[derive(Default)]
pub(super) struct Room {
    held: Mutex<Held>,
    /// One read of the bucket's size at a time.
    reading: tokio::sync::Mutex<()>,
}

/// Room a commit took, given back when it is dropped: counted in the bucket when it [`landed`],
/// else let go.
///
/// [`landed`]: Taken::landed
pub(super) struct Taken {
    room: Arc<Room>,
    bytes: u64,
    entries: u64,
}

impl Taken {
    /// The commit's writes are in the bucket: they count there until the next read.
    pub(super) fn landed(self) {
        let mut held = self.room.held.lock().expect("room poisoned");
        held.bytes = held.bytes.saturating_add(self.bytes);
        held.entries = held.entries.saturating_add(self.entries);
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        let mut held = self.room.held.lock().expect("room poisoned");
        held.pending_bytes = held.pending_bytes.saturating_sub(self.bytes);
        held.pending_entries = held.pending_entries.saturating_sub(self.entries);
    }
}

impl Room {
    fn fresh(&self) -> bool {
        self.held.lock().expect("room poisoned").read_at.is_some_and(|at| at.elapsed() < SIZE_FRESH)
    }

    /// Takes the room `change` needs in plugin `ns`'s bucket of quota `limit`, reading its size
    /// (bytes, entries) with `size` when the last read is stale. `None`: it does not grow the
    /// bucket, and always passes.
    pub(super) async fn take<F>(
        self: &Arc<Self>,
        ns: &str,
        limit: u64,
        change: Change,
        size: impl FnOnce() -> F,
    ) -> Result<Option<Taken>, KvError>
    where
        F: std::future::Future<Output = Result<(u64, u64), KvError>>,
    {
        if change.grows <= 0 && change.entries == 0 {
            return Ok(None);
        }
        if !self.fresh() {
            let _one = self.reading.lock().await;
            if !self.fresh() {
                let (bytes, entries) = size().await?;
                let mut held = self.held.lock().expect("room poisoned");
                (held.bytes, held.entries, held.read_at) = (bytes, entries, Some(Instant::now()));
            }
        }
        let mut held = self.held.lock().expect("room poisoned");
        let (bytes, entries) = (u64::try_from(change.grows).unwrap_or(0), change.entries);
        let holds = held.bytes.saturating_add(held.pending_bytes);
        let holds_entries = held.entries.saturating_add(held.pending_entries);
        let (bound, entry_bound) = (bucket_bound(limit), entry_bound(limit));
        if holds.saturating_add(bytes) > bound || holds_entries.saturating_add(entries) > entry_bound {
            return Err(KvError::BucketFull {
                ns: ns.to_string(),
                holds,
                entries: holds_entries,
                bound,
                entry_bound,
                limit,
            });
        }
        held.pending_bytes += bytes;
        held.pending_entries += entries;
        Ok(Some(Taken { room: self.clone(), bytes, entries }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn size(bytes: u64, entries: u64) -> Result<(u64, u64), KvError> {
        Ok((bytes, entries))
    }

    #[tokio::test]
    async fn commits_under_way_hold_their_room_and_landed_ones_count_until_the_next_read() {
        let room = Arc::new(Room::default());
        let limit = 1 << 20; // 4 MiB and 16,384 entries
        let grow = |bytes: i64| Change { grows: bytes, entries: 1 };
        let first = room.take("p", limit, grow(3 << 20), || size(0, 0)).await.unwrap().unwrap();
        // Under way, the first holds its room: a second of 2 MiB does not fit beside it.
        let Err(refused) = room.take("p", limit, grow(2 << 20), || size(0, 0)).await else { panic!("it fit") };
        assert!(matches!(refused, KvError::BucketFull { holds, .. } if holds == 3 << 20), "{refused}");
        first.landed();
        assert!(room.take("p", limit, grow(2 << 20), || size(0, 0)).await.is_err(), "landed, it still counts");
        // A commit that does not grow the bucket always passes; one given up lets its room go.
        assert!(room.take("p", limit, Change { grows: -5, entries: 0 }, || size(0, 0)).await.unwrap().is_none());
        drop(room.take("p", limit, grow(1 << 20), || size(0, 0)).await.unwrap());
        let held = room.held.lock().unwrap();
        assert_eq!((held.bytes, held.pending_bytes), (3 << 20, 0));
    }

    #[tokio::test]
    async fn entries_are_bounded_too() {
        let room = Arc::new(Room::default());
        let Err(full) = room.take("p", 1 << 20, Change { grows: 100, entries: 1 }, || size(0, 16_384)).await else {
            panic!("an entry past the bound fit")
        };
        assert!(matches!(full, KvError::BucketFull { entries: 16_384, entry_bound: 16_384, .. }), "{full}");
    }
}
