//! A plugin's manifest as the host uses it: who the plugin is, what it subscribes to and
//! where it may publish. Converted from the WIT record and validated once, at load.

use crate::sandbox::bindings::types as wit;
use crate::subject::Pattern;
use serde::Serialize;

/// How the ordering key of an event is chosen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OrderKey {
    /// The value of a header.
    Header(String),
    /// The subject token at this index.
    SubjectToken(u32),
}

/// One subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SubscriptionDef {
    /// Subject pattern.
    pub pattern: String,
    /// Queue group override.
    pub queue_group: Option<String>,
    /// Order per key, when set.
    pub order_by: Option<OrderKey>,
    /// Durable (JetStream) delivery requested.
    pub durable: bool,
    /// Start from the beginning of the stream on first creation.
    pub deliver_all: bool,
}

/// A validated manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Manifest {
    /// Identity of the plugin.
    pub name: String,
    /// Its version.
    pub version: String,
    /// What it subscribes to.
    pub subscriptions: Vec<SubscriptionDef>,
    /// Where it may publish.
    pub publishes: Vec<String>,
}

impl Manifest {
    /// Converts and validates the WIT record; the error names the offending field.
    pub fn from_wit(m: wit::PluginManifest) -> Result<Self, String> {
        let manifest = Manifest {
            name: m.name,
            version: m.version,
            subscriptions: m
                .subscriptions
                .into_iter()
                .map(|s| SubscriptionDef {
                    pattern: s.pattern,
                    queue_group: s.queue_group,
                    order_by: s.order_by.map(|o| match o {
                        wit::OrderKey::Header(h) => OrderKey::Header(h.to_ascii_lowercase()),
                        wit::OrderKey::SubjectToken(i) => OrderKey::SubjectToken(i),
                    }),
                    durable: s.durable,
                    deliver_all: matches!(s.deliver, wit::DeliverPolicy::All),
                })
                .collect(),
            publishes: m.publishes,
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks every field; the first problem found is returned, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return Err(format!(
                "manifest field `name` {:?} must be 1-64 characters of a-z, A-Z, 0-9, '-' or '_'",
                self.name
            ));
        }
        if self.subscriptions.is_empty() {
            return Err("manifest field `subscriptions` is empty: the plugin would never run".into());
        }
        for (i, s) in self.subscriptions.iter().enumerate() {
            Pattern::parse(&s.pattern).map_err(|e| format!("manifest field `subscriptions[{i}].pattern`: {e}"))?;
            if let Some(q) = &s.queue_group
                && (q.is_empty() || q.contains(char::is_whitespace))
            {
                return Err(format!("manifest field `subscriptions[{i}].queue-group` {q:?} is empty or has spaces"));
            }
            if let Some(OrderKey::Header(h)) = &s.order_by
                && h.is_empty()
            {
                return Err(format!("manifest field `subscriptions[{i}].order-by` names an empty header"));
            }
        }
        for (i, p) in self.publishes.iter().enumerate() {
            let pattern = Pattern::parse(p).map_err(|e| format!("manifest field `publishes[{i}]`: {e}"))?;
            if pattern.reaches_system() {
                return Err(format!(
                    "manifest field `publishes[{i}]` {p:?} could reach a system subject ($SYS.>, $JS.>, _INBOX.>)"
                ));
            }
        }
        Ok(())
    }

    /// The subscription patterns.
    pub fn patterns(&self) -> Vec<String> {
        self.subscriptions.iter().map(|s| s.pattern.clone()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            name: "inventory".into(),
            version: "1.0.0".into(),
            subscriptions: vec![SubscriptionDef {
                pattern: "orders.created".into(),
                queue_group: None,
                order_by: None,
                durable: false,
                deliver_all: false,
            }],
            publishes: vec!["inventory.>".into()],
        }
    }

    #[test]
    fn a_good_manifest_validates() {
        manifest().validate().unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut m = manifest();
        m.name = String::new();
        assert!(m.validate().unwrap_err().contains("`name`"));
        let mut m = manifest();
        m.subscriptions[0].pattern = "orders..x".into();
        assert!(m.validate().unwrap_err().contains("subscriptions[0].pattern"));
        let mut m = manifest();
        m.publishes.push("$SYS.>".into());
        assert!(m.validate().unwrap_err().contains("publishes[1]"));
        let mut m = manifest();
        m.publishes = vec![">".into()];
        assert!(m.validate().unwrap_err().contains("system subject"));
        let mut m = manifest();
        m.subscriptions.clear();
        assert!(m.validate().unwrap_err().contains("subscriptions"));
    }
}
