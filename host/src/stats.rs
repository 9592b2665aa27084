//! `GET /v1/stats`: what the dashboard shows, computed by the host rather than by the page.
//! Per plugin: version, the last minute (events/s, error rate, p50/p99 handler time), totals
//! (retries, dead letters), queue depth, in-flight and limits; the pipeline graph drawn from the
//! manifests (`subscribe`, `publishes`); the files that were rejected, with the reason.
//!
//! Invariant: everything here is bounded by configuration. Graph nodes are the live plugins and
//! the patterns their manifests name, never subjects seen in traffic; the rates come from each
//! plugin's fixed-size [`Window`](crate::window::Window).

use crate::router::PluginInfo;
use crate::subject::Pattern;
use crate::window::Summary;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// The whole answer of `GET /v1/stats`.
#[derive(Debug, Clone, Serialize)]
pub struct Stats {
    /// Seconds the rates cover.
    pub window_seconds: u64,
    /// Live plugins, by name.
    pub plugins: Vec<PluginStats>,
    /// The pipeline.
    pub graph: Graph,
    /// Files of the plugins folder that are not loaded (the first [`LISTED_REJECTED`]).
    pub rejected: Vec<RejectedFile>,
    /// How many files are not loaded in all.
    pub rejected_total: usize,
    /// Dead letters kept by this host now (all plugins).
    pub dead_letters_kept: usize,
}

/// The most refused files an answer lists (the dashboard asks every 2 s): a folder of a
/// million bad files made each answer hundreds of MB.
pub const LISTED_REJECTED: usize = 1_000;

/// One plugin's row.
#[derive(Debug, Clone, Serialize)]
pub struct PluginStats {
    /// Name.
    pub name: String,
    /// Version from the manifest.
    pub version: String,
    /// Content hash.
    pub hash: String,
    /// Subscription patterns.
    pub subscriptions: Vec<String>,
    /// Allowed publish patterns.
    pub publishes: Vec<String>,
    /// Deliveries received per second over the window.
    pub events_per_second: f64,
    /// Outputs per second over the window.
    pub outputs_per_second: f64,
    /// Failed attempts (retried or dead-lettered) per attempt that ended, over the window.
    pub error_rate: f64,
    /// Median handler time over the window, in ms (bucket bound; `null` when nothing ran).
    pub p50_ms: Option<f64>,
    /// 99th percentile handler time over the window, in ms.
    pub p99_ms: Option<f64>,
    /// Attempts retried since start.
    pub retries: u64,
    /// Deliveries dead-lettered since start.
    pub dead_letters: u64,
    /// Deliveries waiting in its queue now.
    pub queue_depth: u64,
    /// Attempts running now.
    pub in_flight: u64,
    /// Effective limits.
    pub limits: crate::sandbox::Limits,
    /// The window's sums.
    pub last_minute: Summary,
    /// Totals since start (received, ok, retried, dead_lettered, attempts, outputs, ...).
    pub totals: BTreeMap<&'static str, u64>,
}

/// A file that was not loaded.
#[derive(Debug, Clone, Serialize)]
pub struct RejectedFile {
    /// The file.
    pub file: String,
    /// Why.
    pub reason: String,
}

/// Subjects (manifest patterns) and plugins, and what flows between them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Graph {
    /// Nodes: every live plugin and every pattern a manifest names.
    pub nodes: Vec<Node>,
    /// Edges.
    pub edges: Vec<Edge>,
    /// `matches` edges left out past [`MAX_MATCH_EDGES`].
    pub matches_left_out: usize,
}

/// The most `matches` edges a graph draws. Manifests are the plugin authors': one of 256
/// subscriptions and 256 publishes that all overlap made 65,536 of them, 89 MB of JSON on every
/// poll of the dashboard.
pub const MAX_MATCH_EDGES: usize = 1024;

/// Which published pattern feeds which subscribed one: `(published, subscribed)`, at most
/// [`MAX_MATCH_EDGES`], and how many more there are.
type Matches = (Arc<[(String, String)]>, usize);

/// The last pattern sets seen (published, subscribed) and their matches: they change only when
/// a plugin's patterns do (a reload), and finding them compares every published pattern with
/// every subscribed one, too much for every poll. Kept by the sets themselves, not a hash of
/// them: plugin authors choose the patterns.
type Seen = (BTreeSet<String>, BTreeSet<String>, Matches);
static LAST_MATCHES: Mutex<Option<Seen>> = Mutex::new(None);

/// The matches of `published` and `subscribed` (from [`LAST_MATCHES`] when they are the last
/// seen).
fn matches(published: &BTreeSet<String>, subscribed: &BTreeSet<String>) -> Matches {
    if let Some((p, s, found)) = &*LAST_MATCHES.lock().expect("poisoned")
        && p == published
        && s == subscribed
    {
        return found.clone();
    }
    let parsed: Vec<(&String, Pattern)> =
        subscribed.iter().filter_map(|s| Pattern::parse(s).ok().map(|p| (s, p))).collect();
    let mut found = Vec::new();
    let mut more = 0;
    for p in published {
        let Ok(pp) = Pattern::parse(p) else { continue };
        for (s, sp) in parsed.iter().filter(|(s, _)| *s != p) {
            if sp.overlaps(&pp) {
                if found.len() < MAX_MATCH_EDGES {
                    found.push((p.clone(), (*s).clone()));
                } else {
                    more += 1;
                }
            }
        }
    }
    let found: Matches = (found.into(), more);
    *LAST_MATCHES.lock().expect("poisoned") = Some((published.clone(), subscribed.clone(), found.clone()));
    found
}

/// A node of the graph.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Node {
    /// `plugin:<name>` or `subject:<pattern>`.
    pub id: String,
    /// `plugin` or `subject`.
    pub kind: &'static str,
    /// The plugin's name or the pattern.
    pub label: String,
    /// For a subject: whether some plugin subscribes to it / may publish to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscribed: Option<bool>,
    /// See `subscribed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub published: Option<bool>,
    /// For a plugin: deliveries per second over the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate: Option<f64>,
    /// For a plugin: error rate over the window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error_rate: Option<f64>,
}

/// An edge of the graph.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Edge {
    /// Node id.
    pub from: String,
    /// Node id.
    pub to: String,
    /// `subscribe` (subject → plugin), `publish` (plugin → subject) or `matches` (a published
    /// pattern → a subscribed pattern some subject of it matches).
    pub kind: &'static str,
    /// Events per second over the window (subscribe: received by the plugin; publish: its outputs).
    pub rate: f64,
    /// Error rate of the plugin over the window (subscribe edges; 0 otherwise).
    pub error_rate: f64,
}

fn subject_id(p: &str) -> String {
    format!("subject:{p}")
}

fn plugin_id(p: &str) -> String {
    format!("plugin:{p}")
}

/// The pipeline graph of these plugins with their windows.
pub fn graph(plugins: &[PluginInfo], windows: &BTreeMap<String, Summary>) -> Graph {
    let mut subscribed = BTreeSet::new();
    let mut published = BTreeSet::new();
    let mut g = Graph::default();
    for p in plugins {
        let w = windows.get(&p.name).cloned().unwrap_or_default();
        g.nodes.push(Node {
            id: plugin_id(&p.name),
            kind: "plugin",
            label: p.name.clone(),
            subscribed: None,
            published: None,
            rate: Some(w.events_per_second),
            error_rate: Some(w.error_rate),
        });
        for s in &p.subscriptions {
            subscribed.insert(s.clone());
            g.edges.push(Edge {
                from: subject_id(s),
                to: plugin_id(&p.name),
                kind: "subscribe",
                rate: w.events_per_second,
                error_rate: w.error_rate,
            });
        }
        for s in &p.publishes {
            published.insert(s.clone());
            g.edges.push(Edge {
                from: plugin_id(&p.name),
                to: subject_id(s),
                kind: "publish",
                rate: w.outputs_per_second,
                error_rate: 0.0,
            });
        }
    }
    for s in subscribed.union(&published) {
        g.nodes.push(Node {
            id: subject_id(s),
            kind: "subject",
            label: s.clone(),
            subscribed: Some(subscribed.contains(s)),
            published: Some(published.contains(s)),
            rate: None,
            error_rate: None,
        });
    }
    // A published pattern feeds a different subscribed pattern when some subject matches both
    // (`inventory.>` → `inventory.reserved`).
    let (found, more) = matches(&published, &subscribed);
    for (p, s) in found.iter() {
        g.edges.push(Edge { from: subject_id(p), to: subject_id(s), kind: "matches", rate: 0.0, error_rate: 0.0 });
    }
    g.matches_left_out = more;
    g
}

/// One plugin's row from its description and window.
pub fn plugin_stats(p: &PluginInfo, w: Summary) -> PluginStats {
    let c = |k: &str| p.counters.get(k).copied().unwrap_or(0);
    PluginStats {
        name: p.name.clone(),
        version: p.version.clone(),
        hash: p.hash.clone(),
        subscriptions: p.subscriptions.clone(),
        publishes: p.publishes.clone(),
        events_per_second: w.events_per_second,
        outputs_per_second: w.outputs_per_second,
        error_rate: w.error_rate,
        p50_ms: w.p50_ms,
        p99_ms: w.p99_ms,
        retries: c("retried"),
        dead_letters: c("dead_lettered"),
        queue_depth: c("queued"),
        in_flight: c("in_flight"),
        limits: p.limits.clone(),
        last_minute: w,
        totals: p.counters.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(name: &str, subs: &[&str], pubs: &[&str]) -> PluginInfo {
        PluginInfo {
            name: name.into(),
            version: "1".into(),
            hash: "h".into(),
            state: "serving 1".into(),
            subscriptions: subs.iter().map(|s| s.to_string()).collect(),
            publishes: pubs.iter().map(|s| s.to_string()).collect(),
            limits: Default::default(),
            code_bytes: 0,
            dead_letter_subject: format!("plugbus.dlq.{name}"),
            counters: BTreeMap::new(),
            outbound: None,
        }
    }

    #[test]
    fn a_graph_draws_at_most_so_many_matches_whatever_the_manifests() {
        // 256 subscriptions and 256 publishes of about 1,000 bytes, every publish overlapping
        // every subscription.
        let long = ".x".repeat(495);
        let subs: Vec<String> = (0..256).map(|j| format!("g.s{j}{long}")).collect();
        let pubs: Vec<String> = (0..256).map(|i| format!("{}>", "*.".repeat(i % 200 + 1))).collect();
        let subs: Vec<&str> = subs.iter().map(String::as_str).collect();
        let pubs: Vec<&str> = pubs.iter().map(String::as_str).collect();
        let g = graph(&[info("bomb", &subs, &pubs)], &BTreeMap::new());
        let matches = g.edges.iter().filter(|e| e.kind == "matches").count();
        assert_eq!(matches, MAX_MATCH_EDGES);
        assert!(g.matches_left_out > 50_000, "{}", g.matches_left_out);
        assert!(serde_json::to_vec(&g).unwrap().len() < 4 << 20, "the graph is megabytes");
        // and it is found again, the same, from the last sets seen
        let again = graph(&[info("bomb", &subs, &pubs)], &BTreeMap::new());
        assert_eq!((again.edges, again.matches_left_out), (g.edges, g.matches_left_out));
        // and other patterns get their own matches, not the last ones found
        let small = graph(&[info("a", &["x.in"], &["x.>"])], &BTreeMap::new());
        let found: Vec<_> = small.edges.iter().filter(|e| e.kind == "matches").map(|e| (&*e.from, &*e.to)).collect();
        assert_eq!((found, small.matches_left_out), (vec![("subject:x.>", "subject:x.in")], 0));
    }

    #[test]
    fn the_graph_links_published_patterns_to_the_subscriptions_they_feed() {
        let plugins = [
            info("inventory", &["orders.created"], &["inventory.>"]),
            info("payments", &["inventory.reserved"], &["payments.captured"]),
        ];
        let g = graph(&plugins, &BTreeMap::new());
        let edge = |from: &str, to: &str| g.edges.iter().any(|e| e.from == from && e.to == to);
        assert!(edge("subject:orders.created", "plugin:inventory"));
        assert!(edge("plugin:inventory", "subject:inventory.>"));
        assert!(edge("subject:inventory.>", "subject:inventory.reserved"));
        assert!(edge("subject:inventory.reserved", "plugin:payments"));
        assert!(!edge("subject:payments.captured", "subject:orders.created"));
        assert_eq!(g.nodes.len(), 2 + 4);
    }
}
