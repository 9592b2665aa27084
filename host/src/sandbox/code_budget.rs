//! The host-wide budget of compiled code held in memory (`sandbox.max_code_mib`).
//!
//! A loaded plugin keeps its compiled component mapped for as long as it serves, and wasm can
//! expand many times when compiled (review 56a H1: a table of `call_indirect`s compiles to
//! 10–20× its bytes). Without a budget, each file was bounded only by the compile child's
//! memory cap (`sandbox.compile_memory_mib`, 2 GiB), so a few hostile files made the host
//! itself the OOM killer's target, and the cache brought the same load back at each restart.
//!
//! Each load is charged its component's mapped image before it is made a plugin; the charge
//! is given back when the last handle of that plugin version goes. A load is refused when its
//! code and every live version's would pass the budget, but for the largest live version of the
//! same plugin: that one is leaving (draining), and counting it would refuse for good the
//! reload of any plugin over half the budget, whose old version never drains until its
//! replacement loads. Only that one: a version's life is up to whoever writes the plugins folder
//! (an attempt's retries and held outputs keep it), so swapping a file to and fro would
//! otherwise add a whole copy at each swap (review 57c H1). The code held is at most twice the
//! budget.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Compiled code held by plugin versions, by plugin name, against one cap.
#[derive(Debug)]
pub struct CodeBudget {
    cap: u64,
    held: Mutex<Held>,
    /// Told whenever code is given back: the files refused for room are tried again then.
    freed: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Held {
    total: u64,
    /// The code of each live version, by plugin.
    by_plugin: HashMap<Arc<str>, Vec<u64>>,
}

/// Why a load's code was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OverBudget {
    /// Its code alone is more than the whole budget: the file's own doing.
    Alone {
        /// Its compiled code, in bytes.
        bytes: u64,
        /// The budget, in bytes.
        cap: u64,
    },
    /// It fits alone, not beside what the other plugins hold now: loads once they hold less.
    Full {
        /// Its compiled code, in bytes.
        bytes: u64,
        /// What the loaded versions hold, in bytes, but for the largest of the same plugin.
        others: u64,
        /// The budget, in bytes.
        cap: u64,
    },
}

impl std::fmt::Display for OverBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            OverBudget::Alone { bytes, cap } => write!(
                f,
                "its compiled code is {}, more than sandbox.max_code_mib ({}) allows all plugins together",
                mib(bytes),
                mib(cap)
            ),
            OverBudget::Full { bytes, others, cap } => write!(
                f,
                "its compiled code ({}) does not fit beside what the loaded plugins hold ({}) within \
                 sandbox.max_code_mib ({}): it loads once they hold less",
                mib(bytes),
                mib(others),
                mib(cap)
            ),
        }
    }
}

/// `bytes` in MiB, as a person reads it.
fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
}

impl CodeBudget {
    /// A budget of `cap` bytes.
    pub fn new(cap: u64) -> Arc<Self> {
        Arc::new(Self { cap, held: Mutex::default(), freed: tokio::sync::Notify::new() })
    }

    /// Bytes of compiled code held now, by every version of every plugin.
    pub fn held(&self) -> u64 {
        self.lock().total
    }

    /// Ends when code is given back (at once if some was since the last such wait ended).
    pub async fn freed(&self) {
        self.freed.notified().await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Held> {
        // Nothing panics while holding it; a poisoned count is still the count.
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Charges `bytes` of code to a version of `plugin`, or refuses them: see the module's
    /// rule. The charge is given back when the returned handle drops.
    pub fn charge(self: &Arc<Self>, plugin: &str, bytes: u64) -> Result<CodeCharge, OverBudget> {
        if bytes > self.cap {
            return Err(OverBudget::Alone { bytes, cap: self.cap });
        }
        let mut held = self.lock();
        let leaving = held.by_plugin.get(plugin).and_then(|own| own.iter().max()).copied().unwrap_or(0);
        let others = held.total - leaving;
        if others + bytes > self.cap {
            return Err(OverBudget::Full { bytes, others, cap: self.cap });
        }
        let plugin: Arc<str> = plugin.into();
        held.by_plugin.entry(plugin.clone()).or_default().push(bytes);
        held.total += bytes;
        Ok(CodeCharge { budget: self.clone(), plugin, bytes })
    }
}

/// One plugin version's code, counted in its [`CodeBudget`] until dropped.
#[derive(Debug)]
pub struct CodeCharge {
    budget: Arc<CodeBudget>,
    plugin: Arc<str>,
    bytes: u64,
}

impl CodeCharge {
    /// The bytes of code charged.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for CodeCharge {
    fn drop(&mut self) {
        self.give_back();
        self.budget.freed.notify_one();
    }
}

impl CodeCharge {
    fn give_back(&self) {
        let mut held = self.budget.lock();
        held.total -= self.bytes;
        if let Some(own) = held.by_plugin.get_mut(&self.plugin) {
            if let Some(at) = own.iter().position(|&b| b == self.bytes) {
                own.swap_remove(at);
            }
            if own.is_empty() {
                held.by_plugin.remove(&self.plugin);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_that_would_pass_the_budget_beside_others_is_refused_until_they_hold_less() {
        let budget = CodeBudget::new(100);
        let a = budget.charge("a", 60).unwrap();
        assert_eq!(budget.charge("b", 50).unwrap_err(), OverBudget::Full { bytes: 50, others: 60, cap: 100 });
        let b = budget.charge("b", 40).unwrap();
        assert_eq!(budget.held(), 100);
        drop(a);
        assert_eq!(budget.held(), 40);
        let _c = budget.charge("c", 50).unwrap();
        drop(b);
        assert_eq!(budget.held(), 50);
    }

    #[test]
    fn code_larger_than_the_whole_budget_is_refused_as_its_own() {
        let budget = CodeBudget::new(100);
        assert_eq!(budget.charge("a", 101).unwrap_err(), OverBudget::Alone { bytes: 101, cap: 100 });
        assert!(budget.charge("a", 101).unwrap_err().to_string().contains("sandbox.max_code_mib"));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_new_version_is_not_refused_for_the_version_it_replaces() {
        // A plugin over half the budget: its old version drains only once the new one is in.
        let budget = CodeBudget::new(100);
        let old = budget.charge("a", 70).unwrap();
        let new = budget.charge("a", 70).unwrap();
        assert_eq!(budget.held(), 140, "both held while the old one drains");
        // A third while both live: only the largest of them is leaving (review 57c H1: a file
        // swapped to and fro added a whole copy at each swap).
        assert_eq!(budget.charge("a", 70).unwrap_err(), OverBudget::Full { bytes: 70, others: 70, cap: 100 });
        assert!(budget.charge("a", 30).is_ok());
        // Another plugin still sees both versions of `a`, which are really in memory.
        assert!(matches!(budget.charge("b", 10), Err(OverBudget::Full { others: 140, .. })));
        drop(old);
        assert!(budget.charge("b", 30).is_ok());
        drop(new);
        assert_eq!(budget.held(), 0);
    }
}
