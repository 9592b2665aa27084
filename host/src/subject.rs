//! Subjects and subject patterns, NATS style: dot-separated tokens; in a pattern `*` matches
//! exactly one token and `>` (last token only) matches one or more trailing tokens.
//!
//! This module is the one place that decides what a valid subject or pattern is and whether a
//! pattern matches; the embedded bus, the publish allow-list and the HTTP ingress all use it.

use std::fmt;

/// Subjects a plugin may never publish to, whatever its manifest says.
pub const SYSTEM_PATTERNS: &[&str] = &["$SYS.>", "$JS.>", "_INBOX.>"];

/// Why a subject or pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {raw:?} is not valid: {reason}")]
pub struct SubjectError {
    what: &'static str,
    raw: String,
    reason: &'static str,
}

fn check_tokens(what: &'static str, raw: &str, wildcards: bool) -> Result<(), SubjectError> {
    let err = |reason| SubjectError { what, raw: raw.to_string(), reason };
    if raw.is_empty() {
        return Err(err("it is empty"));
    }
    if raw.len() > 1024 {
        return Err(err("it is longer than 1024 bytes"));
    }
    let tokens: Vec<&str> = raw.split('.').collect();
    for (i, token) in tokens.iter().enumerate() {
        if token.is_empty() {
            return Err(err("it has an empty token (leading, trailing or double dot)"));
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(err("it contains whitespace or a control character"));
        }
        let is_wild = *token == "*" || *token == ">";
        if !wildcards && (token.contains('*') || token.contains('>')) {
            return Err(err("a subject cannot contain the wildcards `*` or `>`"));
        }
        if wildcards && !is_wild && (token.contains('*') || token.contains('>')) {
            return Err(err("a wildcard must be a whole token"));
        }
        if *token == ">" && i + 1 != tokens.len() {
            return Err(err("`>` may only be the last token"));
        }
    }
    Ok(())
}

/// Checks that `raw` is a concrete subject (no wildcards).
pub fn validate_subject(raw: &str) -> Result<(), SubjectError> {
    check_tokens("subject", raw, false)
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Token {
    Literal(String),
    /// `*`: exactly one token.
    One,
    /// `>`: one or more trailing tokens.
    Tail,
}

/// A validated subject pattern.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Pattern {
    raw: String,
    tokens: Vec<Token>,
}

impl Pattern {
    /// Parses and validates a pattern such as `orders.*` or `inventory.>`.
    pub fn parse(raw: &str) -> Result<Self, SubjectError> {
        check_tokens("pattern", raw, true)?;
        let tokens = raw
            .split('.')
            .map(|t| match t {
                "*" => Token::One,
                ">" => Token::Tail,
                lit => Token::Literal(lit.to_string()),
            })
            .collect();
        Ok(Self { raw: raw.to_string(), tokens })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether the concrete `subject` matches.
    pub fn matches(&self, subject: &str) -> bool {
        let mut parts = subject.split('.');
        for token in &self.tokens {
            match token {
                Token::Tail => return parts.next().is_some(),
                Token::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Token::Literal(lit) => {
                    if parts.next() != Some(lit.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }

    /// Whether some concrete subject matches both patterns.
    pub fn overlaps(&self, other: &Pattern) -> bool {
        overlap(&self.tokens, &other.tokens)
    }

    /// Whether every subject `other` matches, this pattern matches too.
    pub fn covers(&self, other: &Pattern) -> bool {
        covers(&self.tokens, &other.tokens)
    }

    /// Whether the pattern can reach one of the [`SYSTEM_PATTERNS`].
    pub fn reaches_system(&self) -> bool {
        system_patterns().iter().any(|s| self.overlaps(s))
    }
}

fn overlap(a: &[Token], b: &[Token]) -> bool {
    match (a.first(), b.first()) {
        (None, None) => true,
        (Some(Token::Tail), Some(_)) | (Some(_), Some(Token::Tail)) => true,
        (None, _) | (_, None) => false,
        (Some(Token::Literal(x)), Some(Token::Literal(y))) if x != y => false,
        _ => overlap(&a[1..], &b[1..]),
    }
}

fn covers(a: &[Token], b: &[Token]) -> bool {
    match (a.first(), b.first()) {
        (None, None) => true,
        (Some(Token::Tail), Some(_)) => true,
        (None, _) | (_, None) | (_, Some(Token::Tail)) => false,
        (Some(Token::One), Some(_)) => covers(&a[1..], &b[1..]),
        (Some(Token::Literal(x)), Some(Token::Literal(y))) if x == y => covers(&a[1..], &b[1..]),
        _ => false,
    }
}

/// The patterns that are not covered by another one in the list (first of equals kept): a
/// subscription to the result receives each event once where the full list would duplicate.
pub fn without_covered(patterns: &[String]) -> Vec<String> {
    let parsed: Vec<Option<Pattern>> = patterns.iter().map(|p| Pattern::parse(p).ok()).collect();
    let mut kept = Vec::new();
    for (i, p) in parsed.iter().enumerate() {
        let Some(p) = p else { continue };
        let covered = parsed
            .iter()
            .enumerate()
            .any(|(j, q)| j != i && q.as_ref().is_some_and(|q| q.covers(p) && (!p.covers(q) || j < i)));
        if !covered {
            kept.push(patterns[i].clone());
        }
    }
    kept
}

fn system_patterns() -> &'static [Pattern] {
    static SYSTEM: std::sync::OnceLock<Vec<Pattern>> = std::sync::OnceLock::new();
    SYSTEM.get_or_init(|| SYSTEM_PATTERNS.iter().map(|p| Pattern::parse(p).expect("valid")).collect())
}

/// Whether a concrete subject is a system subject no plugin may publish to.
pub fn is_system_subject(subject: &str) -> bool {
    system_patterns().iter().any(|p| p.matches(subject))
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.raw)
    }
}

/// A set of patterns, matched as one: a subject matches when any pattern does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PatternSet(Vec<Pattern>);

impl PatternSet {
    /// Parses every pattern, failing on the first invalid one.
    pub fn parse<S: AsRef<str>>(raw: &[S]) -> Result<Self, SubjectError> {
        raw.iter().map(|p| Pattern::parse(p.as_ref())).collect::<Result<Vec<_>, _>>().map(Self)
    }

    /// Whether any pattern matches `subject`.
    pub fn matches(&self, subject: &str) -> bool {
        self.0.iter().any(|p| p.matches(subject))
    }

    /// The patterns.
    pub fn iter(&self) -> impl Iterator<Item = &Pattern> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, s: &str) -> bool {
        Pattern::parse(p).unwrap().matches(s)
    }

    #[test]
    fn wildcards_match_like_nats() {
        assert!(m("orders.created", "orders.created"));
        assert!(!m("orders.created", "orders.created.eu"));
        assert!(m("orders.*", "orders.created"));
        assert!(!m("orders.*", "orders"));
        assert!(!m("orders.*", "orders.created.eu"));
        assert!(m("orders.>", "orders.created.eu"));
        assert!(!m("orders.>", "orders"));
        assert!(m("*.created", "orders.created"));
        assert!(m(">", "a"));
        assert!(m("a.*.c.>", "a.b.c.d.e"));
    }

    #[test]
    fn invalid_subjects_and_patterns_are_refused_with_a_reason() {
        for bad in ["", "a..b", ".a", "a.", "a b", "a.*", "a.>"] {
            assert!(validate_subject(bad).is_err(), "{bad:?} accepted");
        }
        for bad in ["", "a.>.b", "a*", "a.b>", "a..b", "a\tb"] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} accepted");
        }
        let e = Pattern::parse("a.>.b").unwrap_err().to_string();
        assert!(e.contains("last token"), "{e}");
    }

    #[test]
    fn system_reach_is_detected() {
        for p in [">", "*.>", "$SYS.>", "$JS.API.x", "_INBOX.*", "*.*"] {
            assert!(Pattern::parse(p).unwrap().reaches_system(), "{p}");
        }
        for p in ["orders.>", "inventory.*", "a"] {
            assert!(!Pattern::parse(p).unwrap().reaches_system(), "{p}");
        }
        assert!(is_system_subject("$SYS.x"));
        assert!(!is_system_subject("SYS.x"));
    }

    #[test]
    fn covers_and_reduces_overlapping_subscriptions() {
        let p = |s: &str| Pattern::parse(s).unwrap();
        assert!(p("orders.>").covers(&p("orders.*")));
        assert!(p("orders.>").covers(&p("orders.a.b")));
        assert!(!p("orders.*").covers(&p("orders.>")));
        assert!(p("*.created").covers(&p("orders.created")));
        assert!(!p("orders.*").covers(&p("*.created")));
        assert!(!p("orders.>").covers(&p("orders")));
        let v = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(without_covered(&v(&["orders.*", "orders.>", "orders.>", "x"])), v(&["orders.>", "x"]));
        assert_eq!(without_covered(&v(&["orders.*", "*.created"])), v(&["orders.*", "*.created"]));
    }
}
