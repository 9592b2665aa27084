//! How far behind each durable plugin's consumers are, for its outputs to itself: a plugin whose
//! outputs come back to its own consumer (every event makes two, forever) has its outputs
//! there refused while that consumer is more than its bound behind, as the embedded bus keeps a
//! plugin's outputs to itself within its `flow.buffer_mib`. JetStream stores every output, and
//! a stream the host made has no limits: the tree doubled until the account's storage was full
//! and every plugin's publishes failed, on every host.
//!
//! The backlog is the consumer's `num_pending` as its pump last read it (about once a second,
//! at a pull): shared by every host of the plugin, so the bound holds across hosts, late by a
//! pull at most.

use super::consumer::SharedSpec;
use crate::subject::Pattern;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};

/// Messages a consumer may have pending, per KiB of its plugin's `flow.buffer_mib`, before the
/// plugin's outputs to it are refused (a message a KiB: 65,536 for the default 64 MiB).
const PENDING_PER_KIB: u64 = 1;

/// The consumers of every durable plugin on this host, by plugin.
#[derive(Default)]
pub struct OwnBacklogs {
    by_plugin: RwLock<HashMap<String, Vec<Weak<Backlog>>>>,
}

/// One pump's consumer: what it takes (its pump's spec) and how many messages it had pending
/// when last read.
pub struct Backlog {
    spec: SharedSpec,
    pending: AtomicU64,
    bound: u64,
}

impl Backlog {
    /// The consumer had `pending` messages not yet delivered.
    pub fn seen(&self, pending: u64) {
        self.pending.store(pending, Ordering::Relaxed);
    }
}

impl OwnBacklogs {
    /// Tracks the consumer `spec` of `plugin`, whose feed's budget is `budget_bytes`, while the
    /// returned backlog lives (its pump holds it).
    pub fn track(&self, plugin: &str, spec: SharedSpec, budget_bytes: u64) -> Arc<Backlog> {
        let bound = (budget_bytes / 1024).saturating_mul(PENDING_PER_KIB).max(1);
        let backlog = Arc::new(Backlog { spec, pending: AtomicU64::new(0), bound });
        let mut by_plugin = self.by_plugin.write().expect("backlogs poisoned");
        // Those of stopped pumps are let go.
        by_plugin.retain(|_, tracked| {
            tracked.retain(|b| b.strong_count() > 0);
            !tracked.is_empty()
        });
        by_plugin.entry(plugin.to_string()).or_default().push(Arc::downgrade(&backlog));
        backlog
    }

    /// Why `plugin`'s output on `subject` is refused now: a consumer of its own that takes
    /// `subject` is past its bound behind. `None`: it is not.
    pub fn refusal(&self, plugin: &str, subject: &str) -> Option<String> {
        let by_plugin = self.by_plugin.read().expect("backlogs poisoned");
        by_plugin.get(plugin)?.iter().filter_map(Weak::upgrade).find_map(|backlog| {
            let pending = backlog.pending.load(Ordering::Relaxed);
            if pending <= backlog.bound {
                return None;
            }
            let spec = backlog.spec.read().expect("spec poisoned");
            let takes = spec.filters.iter().any(|f| Pattern::parse(f).is_ok_and(|p| p.matches_nats(subject)));
            takes.then(|| {
                format!(
                    "plugin {plugin} is {pending} messages behind on its own consumer of stream {} (its outputs to \
                     itself wait until it is within {}: a message per KiB of its flow.buffer_mib)",
                    spec.stream, backlog.bound
                )
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::nats::consumer::ConsumerSpec;
    use crate::transport::Durability;
    use std::time::Duration;

    fn spec(stream: &str, filters: &[&str]) -> SharedSpec {
        Arc::new(RwLock::new(ConsumerSpec {
            stream: stream.into(),
            name: "plugbus_cycler".into(),
            filters: filters.iter().map(|f| f.to_string()).collect(),
            durability: Durability { deliver_all: false, give_up_after: 5, dead_letter: None },
            ack_wait: Duration::from_secs(30),
        }))
    }

    #[test]
    fn outputs_to_a_consumer_of_its_own_past_its_bound_are_refused_and_no_others() {
        let backlogs = OwnBacklogs::default();
        // A budget of 1 MiB: 1,024 messages pending at most.
        let runaway = backlogs.track("cycler", spec("PLUGBUS_RUNAWAY", &["runaway.>"]), 1 << 20);
        let other = backlogs.track("cycler", spec("PLUGBUS_TREE", &["tree.node"]), 1 << 20);
        runaway.seen(1024);
        assert_eq!(backlogs.refusal("cycler", "runaway.go"), None, "within its bound");
        runaway.seen(1025);
        let why = backlogs.refusal("cycler", "runaway.go").expect("past its bound");
        assert!(why.contains("1025 messages behind") && why.contains("PLUGBUS_RUNAWAY"), "{why}");
        assert_eq!(backlogs.refusal("cycler", "tree.node"), None, "another consumer of its own, not behind");
        assert_eq!(backlogs.refusal("cycler", "elsewhere.x"), None, "a subject it does not take");
        assert_eq!(backlogs.refusal("echo", "runaway.go"), None, "another plugin's outputs there");
        other.seen(5000);
        assert!(backlogs.refusal("cycler", "tree.node").is_some());
        // A pump stopped: its consumer is no longer tracked.
        drop(runaway);
        assert_eq!(backlogs.refusal("cycler", "runaway.go"), None);
        drop(other);
        let _again = backlogs.track("echo", spec("ORDERS", &["orders.*"]), 1 << 20);
        assert!(!backlogs.by_plugin.read().unwrap().contains_key("cycler"), "the plugin's dead entries are let go");
    }
}
