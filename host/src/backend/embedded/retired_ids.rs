//! Output ids kept past their rows. Retention drops a settled output's row (all its targets
//! settled it) whatever became of its input, which an older, unsettled row can still hold: a
//! plugin owing the input, a delivery waiting to publish its next output, a replay's range. When
//! that input runs again (a restart, `plugbus replay`), its outputs must still be found as logged
//! once: their ids are kept here while any row older than the output is kept (the input is older
//! than its outputs), and forgotten once none is, or, past a bound of bytes, oldest first.
//!
//! Each id is kept twice (by dedupe key, to find it; by the output's sequence number, to forget
//! the oldest first), both written in the writer's transactions only.

use redb::{ReadableTable, Table, TableDefinition, WriteTransaction};

/// Dedupe key ("source\0id", see `log::dedupe_key`) → the output's sequence number.
const BY_KEY: TableDefinition<&str, u64> = TableDefinition::new("retired_ids");
/// The output's sequence number → its dedupe key.
const BY_SEQ: TableDefinition<u64, &str> = TableDefinition::new("retired_ids_by_seq");

/// What one id costs in the file, about: its key twice and two sequence numbers.
fn cost(key: &str) -> u64 {
    2 * key.len() as u64 + 16
}

/// The most bytes of ids kept past their rows: an eighth of what `bus.retention.max_mib` lets
/// the records take, at least 64 KiB. A plugin owing an old event for days keeps every later
/// output's id otherwise.
pub(super) fn bound(max_mib: u64) -> u64 {
    (max_mib.saturating_mul(1 << 20) / 8).max(64 << 10)
}

/// The ids kept past their rows, in a write transaction.
pub(super) struct RetiredIds<'txn> {
    by_key: Table<'txn, &'static str, u64>,
    by_seq: Table<'txn, u64, &'static str>,
}

/// What [`RetiredIds::forget`] did.
#[derive(Debug, Default, PartialEq)]
pub(super) struct Forgotten {
    /// Ids forgotten because no row older than their output is kept.
    pub(super) inputs_gone: u64,
    /// Ids forgotten, oldest first, because the kept ones were over the bound.
    pub(super) over_bound: u64,
    /// Whether it stopped at its most removals with more to forget.
    pub(super) more: bool,
}

impl<'txn> RetiredIds<'txn> {
    /// Opens (or makes) the tables.
    pub(super) fn open(w: &'txn WriteTransaction) -> Result<Self, String> {
        Ok(Self {
            by_key: w.open_table(BY_KEY).map_err(|e| e.to_string())?,
            by_seq: w.open_table(BY_SEQ).map_err(|e| e.to_string())?,
        })
    }

    /// Whether any id is kept (a writer skips the lookup when none is).
    pub(super) fn any(&self) -> Result<bool, String> {
        Ok(self.by_seq.first().map_err(|e| e.to_string())?.is_some())
    }

    /// The sequence number of the output logged first under `key`, if its row was dropped and
    /// its id kept.
    pub(super) fn first_copy(&self, key: &str) -> Result<Option<u64>, String> {
        Ok(self.by_key.get(key).map_err(|e| e.to_string())?.map(|v| v.value()))
    }

    /// Keeps the id of output `seq`, whose row retention drops; returns the bytes it added.
    pub(super) fn retire(&mut self, key: &str, seq: u64) -> Result<u64, String> {
        if let Some(old) = self.by_key.insert(key, seq).map_err(|e| e.to_string())? {
            // (Not met: an id is logged again only once its kept one is forgotten.)
            self.by_seq.remove(old.value()).map_err(|e| e.to_string())?;
            self.by_seq.insert(seq, key).map_err(|e| e.to_string())?;
            return Ok(0);
        }
        self.by_seq.insert(seq, key).map_err(|e| e.to_string())?;
        Ok(cost(key))
    }

    /// Forgets the ids of outputs below `first_kept` (the first row kept: none older is left),
    /// then, while `bytes` is over `bound`, the oldest; at most `max` of them. `bytes` is what
    /// the kept ids take, brought down by what it forgets.
    pub(super) fn forget(
        &mut self,
        first_kept: u64,
        bytes: &mut u64,
        bound: u64,
        max: usize,
    ) -> Result<Forgotten, String> {
        let mut forgotten = Forgotten::default();
        loop {
            let Some((seq, key)) = self.oldest()? else { return Ok(forgotten) };
            let input_gone = seq < first_kept;
            if !input_gone && *bytes <= bound {
                return Ok(forgotten);
            }
            if forgotten.inputs_gone + forgotten.over_bound >= max as u64 {
                forgotten.more = true;
                return Ok(forgotten);
            }
            match input_gone {
                true => forgotten.inputs_gone += 1,
                false => forgotten.over_bound += 1,
            }
            self.by_seq.remove(seq).map_err(|e| e.to_string())?;
            self.by_key.remove(key.as_str()).map_err(|e| e.to_string())?;
            *bytes = bytes.saturating_sub(cost(&key));
        }
    }

    /// The oldest id kept: its output's sequence number and its key.
    fn oldest(&self) -> Result<Option<(u64, String)>, String> {
        let first = self.by_seq.first().map_err(|e| e.to_string())?;
        Ok(first.map(|(seq, key)| (seq.value(), key.value().to_string())))
    }
}
