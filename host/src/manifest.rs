//! A plugin's manifest as the host uses it: what it subscribes to and where it may publish.
//! Converted from the WIT record and validated once, at load.
//!
//! Who the plugin *is* is not the manifest's to say: the operator names it (its file name, or
//! a `[plugins.NAME] file = ...` entry), and [`Manifest::bind`] checks the manifest against that
//! identity: a `name` that disagrees is refused, a queue group is only ever the plugin's own.

use crate::event::quoted;
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
    /// The plugin's name: what the manifest declared until [`Manifest::bind`], then the identity
    /// the operator gave the plugin (which the declaration had to agree with).
    pub name: String,
    /// Its version.
    pub version: String,
    /// What it subscribes to.
    pub subscriptions: Vec<SubscriptionDef>,
    /// Where it may publish.
    pub publishes: Vec<String>,
    /// The queue group (and so the durable consumer) the plugin is delivered through, set by
    /// [`Manifest::bind`]: the operator's, or the manifest's own under `plugbus.<identity>`, or
    /// `plugbus.<identity>`. `None` until bound: an unbound manifest's claims reach no transport.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue_group: Option<String>,
    /// The outbound HTTP destinations it asks for (`scheme://host[:port]`), from the optional
    /// `outbound` export; empty when it asks for none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub outbound: Vec<String>,
}

/// The longest queue group a manifest or the operator may set.
pub const MAX_QUEUE_GROUP_LEN: usize = 128;

/// Whether `name` can be a plugin's identity: 1-64 characters of a-z, A-Z, 0-9, `-`, `_`.
pub fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 64 && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Whether a declared manifest name agrees with the identity: equal, or equal once `-` is read
/// as `_` (cargo names `order-handler`'s component `order_handler.wasm`, while the SDK's default
/// manifest name is the package name `order-handler`). Case matters.
pub fn names_agree(declared: &str, identity: &str) -> bool {
    declared == identity
        || (declared.len() == identity.len()
            && declared
                .bytes()
                .zip(identity.bytes())
                .all(|(a, b)| a == b || (matches!(a, b'-' | b'_') && matches!(b, b'-' | b'_'))))
}

/// A plugin name as one plugin is known however its file spells `-` and `_` (`my-handler.wasm`
/// and `my_handler.wasm` hold one plugin: [`names_agree`]): two files whose names give one key
/// are refused as two plugins (review 62d F5: cargo's `my_handler.wasm` copied in, then
/// `plugbus dev`'s `my-handler.wasm`, handled every event twice).
pub fn name_key(name: &str) -> String {
    name.replace('-', "_")
}

/// The most patterns a manifest's `subscriptions`, and its `publishes`, may list.
pub const MAX_PATTERNS: usize = 256;

/// The longest a manifest's `version` or an `order-by` header name may be, in bytes.
pub const MAX_LABEL_LEN: usize = 128;

/// A short label the host shows and logs (a version, a header name): at most
/// [`MAX_LABEL_LEN`] bytes, no whitespace or control characters (it is written into log lines
/// and trace spans as is).
fn check_label(label: &str) -> Result<(), String> {
    if label.len() > MAX_LABEL_LEN {
        return Err(format!("is {} bytes, over {MAX_LABEL_LEN}", label.len()));
    }
    if label.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("{} has spaces or control characters", quoted(label)));
    }
    Ok(())
}

/// Checks a queue group the operator or a manifest sets: not empty, no spaces or control
/// characters, at most [`MAX_QUEUE_GROUP_LEN`] bytes.
pub fn check_queue_group(q: &str) -> Result<(), &'static str> {
    if q.is_empty() {
        return Err("is empty");
    }
    if q.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("has spaces or control characters");
    }
    if q.len() > MAX_QUEUE_GROUP_LEN {
        return Err("is longer than 128 bytes");
    }
    Ok(())
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
            queue_group: None,
            outbound: Vec::new(),
        };
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks the `outbound` destinations (at most 64, each `scheme://host[:port]`).
    pub fn validate_outbound(&self) -> Result<(), String> {
        if self.outbound.len() > 64 {
            return Err(format!("manifest field `outbound` lists {} destinations, over 64", self.outbound.len()));
        }
        for (i, o) in self.outbound.iter().enumerate() {
            crate::sandbox::outbound::Rule::parse(o).map_err(|e| format!("manifest field `outbound[{i}]`: {e}"))?;
        }
        Ok(())
    }

    /// Checks every field; the first problem found is returned, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if !valid_plugin_name(&self.name) {
            return Err(format!(
                "manifest field `name` {} must be 1-64 characters of a-z, A-Z, 0-9, '-' or '_'",
                quoted(&self.name)
            ));
        }
        if let Err(why) = check_label(&self.version) {
            return Err(format!("manifest field `version` {why}"));
        }
        if self.subscriptions.is_empty() {
            return Err("manifest field `subscriptions` is empty: the plugin would never run".into());
        }
        // Every event and output on the embedded bus is matched against every pattern.
        for (field, count) in [("subscriptions", self.subscriptions.len()), ("publishes", self.publishes.len())] {
            if count > MAX_PATTERNS {
                return Err(format!("manifest field `{field}` lists {count} patterns, over {MAX_PATTERNS}"));
            }
        }
        for (i, s) in self.subscriptions.iter().enumerate() {
            let pattern =
                Pattern::parse(&s.pattern).map_err(|e| format!("manifest field `subscriptions[{i}].pattern`: {e}"))?;
            if pattern.reaches_system() {
                return Err(format!(
                    "manifest field `subscriptions[{i}].pattern` {} names a system subject \
                     (one starting with `$` or `_INBOX` is the broker's, never a plugin's)",
                    quoted(&s.pattern)
                ));
            }
            if let Some(q) = &s.queue_group
                && let Err(why) = check_queue_group(q)
            {
                return Err(format!("manifest field `subscriptions[{i}].queue-group` {} {why}", quoted(q)));
            }
            if let Some(OrderKey::Header(h)) = &s.order_by {
                if h.is_empty() {
                    return Err(format!("manifest field `subscriptions[{i}].order-by` names an empty header"));
                }
                if let Err(why) = check_label(h) {
                    return Err(format!("manifest field `subscriptions[{i}].order-by` header name {why}"));
                }
            }
        }
        for (i, p) in self.publishes.iter().enumerate() {
            let pattern = Pattern::parse(p).map_err(|e| format!("manifest field `publishes[{i}]`: {e}"))?;
            if pattern.reaches_system() {
                return Err(format!(
                    "manifest field `publishes[{i}]` {} names a system subject \
                     (one starting with `$` or `_INBOX` is the broker's, never a plugin's)",
                    quoted(p)
                ));
            }
        }
        Ok(())
    }

    /// Binds the manifest to `identity`, the name the operator gave the plugin, and settles its
    /// queue group. Refused, naming the field: a declared `name` that disagrees with the identity
    /// (see [`names_agree`]), a queue group that is not `plugbus.<identity>` or under it
    /// (`plugbus.<identity>.<suffix>`: a manifest may split its own plugin's work, never join
    /// another's), or subscriptions asking for different queue groups. `operator_queue_group`
    /// (`[plugins.NAME] queue_group`) wins over the manifest's. On success `name` is `identity`.
    pub fn bind(&mut self, identity: &str, operator_queue_group: Option<&str>) -> Result<(), String> {
        if !valid_plugin_name(identity) {
            return Err(format!(
                "the plugin name {} must be 1-64 characters of a-z, A-Z, 0-9, '-' or '_'",
                quoted(identity)
            ));
        }
        if !names_agree(&self.name, identity) {
            return Err(format!(
                "manifest field `name` {} disagrees with the plugin's name {identity:?}: a plugin is who the \
                 operator names it (its file name, or `[plugins.NAME] file = ...`), not who its manifest says",
                quoted(&self.name)
            ));
        }
        let own = format!("plugbus.{identity}");
        let mut declared: Option<&str> = None;
        for (i, s) in self.subscriptions.iter().enumerate() {
            let Some(q) = s.queue_group.as_deref() else { continue };
            let under_own =
                q == own || q.strip_prefix(own.as_str()).is_some_and(|rest| rest.len() > 1 && rest.starts_with('.'));
            if !under_own {
                return Err(format!(
                    "manifest field `subscriptions[{i}].queue-group` {} is not this plugin's: a manifest may \
                     only use {own:?} or a group under it ({own}.<suffix>); the operator sets any other \
                     with `[plugins.{identity}] queue_group`",
                    quoted(q)
                ));
            }
            match declared {
                Some(first) if first != q => {
                    return Err(format!(
                        "manifest field `subscriptions[{i}].queue-group` {} differs from an earlier \
                         subscription's {}: a plugin has one queue group",
                        quoted(q),
                        quoted(first)
                    ));
                }
                _ => declared = Some(q),
            }
        }
        let group = match (operator_queue_group, declared) {
            (Some(op), declared) => {
                if let Some(d) = declared.filter(|d| *d != op) {
                    tracing::info!(plugin = %identity, manifest = %d, operator = %op, "the operator's queue group replaces the manifest's");
                }
                op.to_string()
            }
            (None, Some(d)) => d.to_string(),
            (None, None) => own,
        };
        self.name = identity.to_string();
        self.queue_group = Some(group);
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

    #[test]
    fn a_refusal_echoes_at_most_a_few_kib_of_what_the_manifest_says() {
        let mut m = manifest();
        m.name = "\u{1}".repeat(1 << 20);
        let why = m.validate().unwrap_err();
        assert!(why.len() < 8 << 10, "{} bytes", why.len());
        assert!(why.starts_with("manifest field `name` \"\\u{1}") && why.contains("[cut at"), "{}", &why[..80]);
        let mut m = manifest();
        m.name = "x".repeat(1 << 20);
        let why = m.bind("inventory", None).unwrap_err();
        assert!(why.len() < 8 << 10, "{} bytes", why.len());
    }

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
            queue_group: None,
            outbound: Vec::new(),
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
        for sys in ["$KV.plugbus_payments.>", "_INBOX.>", "$JS.ACK.>", "$SYS.>"] {
            let mut m = manifest();
            m.publishes.push(sys.into());
            let e = m.validate().unwrap_err();
            assert!(e.contains("publishes[1]") && e.contains("system subject"), "{e}");
            let mut m = manifest();
            m.subscriptions[0].pattern = sys.into();
            let e = m.validate().unwrap_err();
            assert!(e.contains("subscriptions[0].pattern") && e.contains("system subject"), "{e}");
        }
        // Wildcards never reach a system subject: `>` is no way in.
        let mut m = manifest();
        m.publishes = vec![">".into()];
        m.validate().unwrap();
        let mut m = manifest();
        m.subscriptions.clear();
        assert!(m.validate().unwrap_err().contains("subscriptions"));
    }

    /// What a hostile manifest could make the host carry on every event (patterns matched
    /// against each one, a version written into every span and log line) is bounded.
    #[test]
    fn counts_and_lengths_are_bounded_naming_the_field() {
        let mut m = manifest();
        m.subscriptions = vec![m.subscriptions[0].clone(); MAX_PATTERNS];
        m.publishes = vec!["a.b".into(); MAX_PATTERNS];
        m.version = "v".repeat(MAX_LABEL_LEN);
        m.validate().unwrap();
        m.subscriptions.push(m.subscriptions[0].clone());
        assert_eq!(m.validate().unwrap_err(), "manifest field `subscriptions` lists 257 patterns, over 256");
        m.subscriptions.pop();
        m.publishes.push("a.b".into());
        assert_eq!(m.validate().unwrap_err(), "manifest field `publishes` lists 257 patterns, over 256");
        let mut m = manifest();
        m.version = "v".repeat(MAX_LABEL_LEN + 1);
        assert_eq!(m.validate().unwrap_err(), "manifest field `version` is 129 bytes, over 128");
        for bad in ["1.0\n[forged] line", "1.0 beta"] {
            let mut m = manifest();
            m.version = bad.into();
            assert!(m.validate().unwrap_err().starts_with("manifest field `version` "), "{bad:?}");
        }
        let mut m = manifest();
        m.subscriptions[0].order_by = Some(OrderKey::Header("k".repeat(MAX_LABEL_LEN + 1)));
        let e = m.validate().unwrap_err();
        assert_eq!(e, "manifest field `subscriptions[0].order-by` header name is 129 bytes, over 128");
        m.subscriptions[0].order_by = Some(OrderKey::Header(String::new()));
        assert!(m.validate().unwrap_err().contains("order-by` names an empty header"));
    }

    #[test]
    fn bind_refuses_a_name_that_is_not_the_identity() {
        let mut m = manifest();
        let e = m.bind("00-evil", None).unwrap_err();
        assert!(e.contains("\"inventory\"") && e.contains("\"00-evil\""), "{e}");
        let mut m = manifest();
        assert!(m.bind("Inventory", None).is_err(), "case matters");
        let mut m = manifest();
        m.name = "order-handler".into();
        m.bind("order_handler", None).unwrap();
        assert_eq!((m.name.as_str(), m.queue_group.as_deref()), ("order_handler", Some("plugbus.order_handler")));
    }

    #[test]
    fn a_manifest_queue_group_is_only_ever_its_own() {
        let with_group = |q: &str| {
            let mut m = manifest();
            m.subscriptions[0].queue_group = Some(q.into());
            m
        };
        for stolen in ["plugbus.payments", "plugbus.inventory_x", "plugbus.inventoryx", "plugbus.inventory.", "other"] {
            let e = with_group(stolen).bind("inventory", None).unwrap_err();
            assert!(e.contains("subscriptions[0].queue-group") && e.contains("plugbus.inventory"), "{stolen}: {e}");
        }
        let mut m = with_group("plugbus.inventory.eu");
        m.bind("inventory", None).unwrap();
        assert_eq!(m.queue_group.as_deref(), Some("plugbus.inventory.eu"));
        // The operator's group wins, whatever the manifest says.
        let mut m = with_group("plugbus.inventory.eu");
        m.bind("inventory", Some("shared.stock")).unwrap();
        assert_eq!(m.queue_group.as_deref(), Some("shared.stock"));
        let mut m = manifest();
        m.bind("inventory", None).unwrap();
        assert_eq!(m.queue_group.as_deref(), Some("plugbus.inventory"));
    }
}
