//! How much a plugin's kv may hold in all (`limits.max_kv_bytes`), across every event: without
//! it a plugin writing new keys on each event (up to `max_kv_write_bytes`, 16 MiB, per attempt)
//! fills the disk the event log shares, and every producer is refused.
//!
//! An entry counts its key and value and [`ENTRY_COST`] more. A commit that would take a
//! namespace past its quota fails as a whole ([`KvError::Quota`]), unless it does not make the
//! namespace grow: deletes and shrinking rewrites always pass, so a plugin over a lowered quota
//! can clean up. The redb stores keep each namespace's count in a table of their own ([`USAGE`]),
//! changed in the transaction that changes the entries.
//!
//! What counts is logical bytes: redb may take up to twice that on disk for large values (it
//! gives them runs of pages, a power of two). The NATS backend does not enforce the quota yet:
//! its server counts delete markers too (kept for good in a bucket of one revision), and a
//! stream's `max_bytes` lowered below what it holds makes the server delete its oldest entries.

use super::{ENTRY_COST, KvError, Txn};
use redb::{ReadableTable, TableDefinition};

/// Namespace → the bytes its entries count ([`stored_cost`]), in the redb stores.
pub(crate) const USAGE: TableDefinition<&str, u64> = TableDefinition::new("kv_usage");

/// What an entry of `key` holding `value_bytes` counts against its namespace's quota.
pub fn stored_cost(key: &str, value_bytes: usize) -> u64 {
    (key.len() + value_bytes) as u64 + ENTRY_COST
}

/// Whether a namespace holding `holds` may hold `after` once `txn` commits.
pub fn check(ns: &str, txn: &Txn, holds: u64, after: u64) -> Result<(), KvError> {
    match txn.quota {
        Some(limit) if after > limit && after > holds => {
            Err(KvError::Quota { ns: ns.to_string(), holds, would_hold: after, limit })
        }
        _ => Ok(()),
    }
}

/// `holds` changed by `txn`'s writes, given what each written key holds now (`old`: the bytes
/// of its value, `None` when absent).
pub fn after(
    holds: u64,
    txn: &Txn,
    mut old: impl FnMut(&str) -> Result<Option<usize>, KvError>,
) -> Result<u64, KvError> {
    let (mut gained, mut freed) = (0u64, 0u64);
    for (key, value) in &txn.writes {
        if let Some(old) = old(key)? {
            freed = freed.saturating_add(stored_cost(key, old));
        }
        if let Some(v) = value {
            gained = gained.saturating_add(stored_cost(key, v.len()));
        }
    }
    Ok(holds.saturating_add(gained).saturating_sub(freed))
}

/// The bytes of the value in a redb store's entry (stored behind its 8-byte version).
pub(crate) fn value_len(stored: &[u8]) -> usize {
    stored.len().saturating_sub(8)
}

/// The `ns\0key` of a redb store's entry, split.
fn namespace(stored_key: &str) -> Option<(&str, &str)> {
    stored_key.split_once('\u{0}')
}

/// The meta key holding the store's kv clock (its count of kv commits, under the store's own
/// key) at which [`USAGE`] was last right. A file written by a version without quotas, or by one
/// rolled back to, moved its clock without counting: it is counted again at open.
const COUNTED_AT: &str = "kv_usage_clock";

/// Counts every namespace's entries of `data` (values behind an 8-byte version) into [`USAGE`],
/// from scratch, as of the store's kv clock (`meta[clock]`): at open when the count is stale
/// ([`recount_if_stale`]), and after an import.
pub(crate) fn recount(
    w: &redb::WriteTransaction,
    data: TableDefinition<&str, &[u8]>,
    meta: TableDefinition<&str, u64>,
    clock: &str,
) -> Result<(), redb::Error> {
    let mut totals: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    {
        let data = w.open_table(data)?;
        for row in data.iter()? {
            let (k, v) = row?;
            if let Some((ns, key)) = namespace(k.value()) {
                let total = totals.entry(ns.to_string()).or_default();
                *total = total.saturating_add(stored_cost(key, value_len(v.value())));
            }
        }
    }
    w.delete_table(USAGE)?;
    let mut usage = w.open_table(USAGE)?;
    for (ns, bytes) in &totals {
        usage.insert(ns.as_str(), *bytes)?;
    }
    let mut meta = w.open_table(meta)?;
    let now = meta.get(clock)?.map_or(0, |v| v.value());
    counted_at(&mut meta, now)?;
    Ok(())
}

/// [`recount`], unless [`USAGE`] is right as of the store's kv clock; whether it counted.
pub(crate) fn recount_if_stale(
    w: &redb::WriteTransaction,
    data: TableDefinition<&str, &[u8]>,
    meta: TableDefinition<&str, u64>,
    clock: &str,
) -> Result<bool, redb::Error> {
    let stale = {
        let meta = w.open_table(meta)?;
        let now = meta.get(clock)?.map_or(0, |v| v.value());
        meta.get(COUNTED_AT)?.map(|v| v.value()) != Some(now)
    };
    if stale {
        recount(w, data, meta, clock)?;
    }
    Ok(stale)
}

/// Records that [`USAGE`] is right as of kv clock `clock`: in every kv commit's transaction,
/// with the clock it sets.
pub(crate) fn counted_at(meta: &mut redb::Table<&str, u64>, clock: u64) -> Result<(), redb::StorageError> {
    meta.insert(COUNTED_AT, clock)?;
    Ok(())
}

/// Checks `txn` against its namespace's quota in a redb store's write transaction and, when it
/// passes, records the new count; the caller then writes the entries. `old` reads what a key
/// holds now (the bytes of its value behind the version).
pub(crate) fn charge(
    usage: &mut redb::Table<&str, u64>,
    ns: &str,
    txn: &Txn,
    old: impl FnMut(&str) -> Result<Option<usize>, KvError>,
) -> Result<(), KvError> {
    let unavailable = |e: redb::StorageError| KvError::Unavailable(e.to_string());
    let holds = usage.get(ns).map_err(unavailable)?.map_or(0, |v| v.value());
    let after = after(holds, txn, old)?;
    check(ns, txn, holds, after)?;
    if after != holds {
        usage.insert(ns, after).map_err(unavailable)?;
    }
    Ok(())
}
