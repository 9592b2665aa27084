//! What every loaded version of a plugin shares while any of it lives (its CPU share, its DNS
//! lookups in flight), found by the plugin's name and let go with its last version (review 62d
//! F4: kept a version each, a plugin reloading itself took them once a version).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};

/// The live `T` of each plugin name, held weakly: it goes when its last holder does.
#[derive(Debug)]
pub struct LiveByName<T>(Mutex<HashMap<Arc<str>, Weak<T>>>);

impl<T> Default for LiveByName<T> {
    fn default() -> Self {
        Self(Mutex::default())
    }
}

impl<T> LiveByName<T> {
    /// `name`'s live one, or the one `make` makes, kept for its next versions (those of names
    /// gone are forgotten then).
    pub fn get_or_make(&self, name: &str, make: impl FnOnce() -> Arc<T>) -> Arc<T> {
        let mut by_name = self.0.lock().expect("poisoned");
        if let Some(live) = by_name.get(name).and_then(Weak::upgrade) {
            return live;
        }
        by_name.retain(|_, held| held.strong_count() > 0);
        let made = make();
        by_name.insert(name.into(), Arc::downgrade(&made));
        made
    }

    /// Whether `name` is still listed (live, or gone and not forgotten yet).
    #[cfg(test)]
    pub fn lists(&self, name: &str) -> bool {
        self.0.lock().expect("poisoned").contains_key(name)
    }
}
