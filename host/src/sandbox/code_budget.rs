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
//! code and every *other* plugin's would pass the budget. The older versions of the plugin it
//! replaces do not count against it: they are leaving (draining), and counting them would
//! refuse for good the reload of any plugin over half the budget, whose old version never
//! drains until its replacement loads. So the budget may be passed by the versions of one
//! plugin still draining, for as long as they drain.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Compiled code held by plugin versions, by plugin name, against one cap.
#[derive(Debug)]
pub struct CodeBudget {
    cap: u64,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    total: u64,
    by_plugin: HashMap<Arc<str>, u64>,
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
        /// What the other plugins' versions hold, in bytes.
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
                "its compiled code ({}) does not fit beside the other plugins' ({}) within sandbox.max_code_mib \
                 ({}): it is tried again by itself, and loads once they hold less",
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
        Arc::new(Self { cap, held: Mutex::default() })
    }

    /// Bytes of compiled code held now, by every version of every plugin.
    pub fn held(&self) -> u64 {
        self.lock().total
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
        let own = held.by_plugin.get(plugin).copied().unwrap_or(0);
        let others = held.total - own;
        if others + bytes > self.cap {
            return Err(OverBudget::Full { bytes, others, cap: self.cap });
        }
        let plugin: Arc<str> = plugin.into();
        *held.by_plugin.entry(plugin.clone()).or_insert(0) += bytes;
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

impl Drop for CodeCharge {
    fn drop(&mut self) {
        let mut held = self.budget.lock();
        held.total -= self.bytes;
        if let Some(own) = held.by_plugin.get_mut(&self.plugin) {
            *own -= self.bytes;
            if *own == 0 {
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
        // Another plugin still sees both versions of `a`, which are really in memory.
        assert!(matches!(budget.charge("b", 10), Err(OverBudget::Full { others: 140, .. })));
        drop(old);
        assert!(budget.charge("b", 30).is_ok());
        drop(new);
        assert_eq!(budget.held(), 0);
    }
}
