//! Subjects and subject patterns, NATS style: dot-separated tokens; in a pattern `*` matches
//! exactly one token and `>` (last token only) matches one or more trailing tokens.
//!
//! This module is the one place that decides what a valid subject or pattern is and whether a
//! pattern matches; the embedded bus, the publish allow-list and the HTTP ingress all use it.
//!
//! Two rules protect what is not a plugin's, on top of NATS's matching:
//! - **System subjects** ([`is_system_subject`]): anything starting with `$` (`$SYS`, `$JS`,
//!   `$KV`, `$O`, ...) or `_INBOX` is the broker's or a client's own. No plugin publishes or
//!   subscribes to one (the manifest is refused), the HTTP ingress refuses them, and a wildcard
//!   never matches one: `>`, `*.>` and `*.x` see none of them, as in NATS's own rule for `$`.
//! - **Dead letters** (`plugbus.dlq.<plugin>`): a wildcard reaches them only when the pattern
//!   names `plugbus.dlq` literally (`plugbus.dlq.>`, `plugbus.dlq.*`); `>`, `plugbus.>` or
//!   `*.dlq.x` do not see other plugins' dead letters.
//!
//! [`Pattern::matches`] applies both; [`Pattern::matches_nats`] is the broker's plain rule, for
//! questions about what the broker itself does (which stream captures a subject).

use std::fmt;

/// The prefix of dead-letter subjects (`plugbus.dlq.<plugin>` by default).
pub const DEAD_LETTER_PREFIX: &str = "plugbus.dlq.";

/// Why a subject or pattern is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {raw:?} is not valid: {reason}")]
pub struct SubjectError {
    what: &'static str,
    raw: String,
    reason: &'static str,
}

fn check_tokens(what: &'static str, raw: &str, wildcards: bool) -> Result<(), SubjectError> {
    // Cut: a refused pattern can be as long as what sent it (a manifest's, a request's).
    let err = |reason| SubjectError { what, raw: crate::event::cut(raw).into_owned(), reason };
    if raw.is_empty() {
        return Err(err("it is empty"));
    }
    if raw.len() > 1024 {
        return Err(err("it is longer than 1024 bytes"));
    }
    // Split on the byte: `.` is ASCII, so no token boundary falls inside a character (and
    // splitting on a `char` pays a `memcmp` per dot, on every publish).
    let mut tokens = raw.as_bytes().split(|b| *b == b'.').peekable();
    while let Some(token) = tokens.next() {
        if token.is_empty() {
            return Err(err("it has an empty token (leading, trailing or double dot)"));
        }
        let unprintable = if token.is_ascii() {
            token.iter().any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        } else {
            // A token holds whole characters (see above).
            std::str::from_utf8(token).is_ok_and(|t| t.chars().any(|c| c.is_whitespace() || c.is_control()))
        };
        if unprintable {
            return Err(err("it contains whitespace or a control character"));
        }
        let is_wild = token == b"*" || token == b">";
        let has_wild = token.iter().any(|b| *b == b'*' || *b == b'>');
        if !wildcards && has_wild {
            return Err(err("a subject cannot contain the wildcards `*` or `>`"));
        }
        if wildcards && !is_wild && has_wild {
            return Err(err("a wildcard must be a whole token"));
        }
        if token == b">" && tokens.peek().is_some() {
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

    /// Whether the concrete `subject` matches, as a plugin's subscription or allow-list sees it:
    /// NATS matching, except that a wildcard never reaches a system subject, and reaches a dead
    /// letter only under a literal `plugbus.dlq` (see the module docs).
    pub fn matches(&self, subject: &str) -> bool {
        if !self.reaches(subject) {
            return false;
        }
        self.matches_nats(subject)
    }

    /// Whether `subject` is one this pattern may reach at all: a system subject only by a literal
    /// first token, a dead letter only by literal `plugbus.dlq` first tokens.
    fn reaches(&self, subject: &str) -> bool {
        let literal = |i: usize, want: Option<&str>| match self.tokens.get(i) {
            Some(Token::Literal(l)) => want.is_none_or(|w| l == w),
            _ => false,
        };
        if is_system_subject(subject) && !literal(0, None) {
            return false;
        }
        if is_dead_letter_subject(subject) && !(literal(0, Some("plugbus")) && literal(1, Some("dlq"))) {
            return false;
        }
        true
    }

    /// Whether the concrete `subject` matches by NATS's plain rule (what the broker does: a
    /// stream capturing `>` holds `plugbus.dlq.x` too). Not for deciding what a plugin gets.
    pub fn matches_nats(&self, subject: &str) -> bool {
        // Split on the byte, as `check_tokens` does.
        let mut parts = subject.as_bytes().split(|b| *b == b'.');
        for token in &self.tokens {
            match token {
                Token::Tail => return parts.next().is_some(),
                Token::One => {
                    if parts.next().is_none() {
                        return false;
                    }
                }
                Token::Literal(lit) => {
                    if parts.next() != Some(lit.as_bytes()) {
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

    /// Whether some subject `other` holds (by the broker's rule: a stream's subjects) is one this
    /// pattern [`matches`](Pattern::matches): like [`overlaps`](Pattern::overlaps), less what
    /// only a system subject or a dead letter would share (a plugin's `>` has no business with a
    /// KV bucket's stream `$KV.x.>` or with `plugbus.dlq.>`).
    pub fn may_reach(&self, other: &Pattern) -> bool {
        if !self.overlaps(other) {
            return false;
        }
        let literal =
            |p: &Pattern, i: usize, want: &str| matches!(p.tokens.get(i), Some(Token::Literal(l)) if l == want);
        let names_dead_letters = |p: &Pattern| literal(p, 0, "plugbus") && literal(p, 1, "dlq");
        if other.reaches_system() && !self.reaches_system() {
            return false;
        }
        if names_dead_letters(other) && other.tokens.len() > 2 && !names_dead_letters(self) {
            return false;
        }
        true
    }

    /// Whether every subject `other` matches, this pattern matches too.
    pub fn covers(&self, other: &Pattern) -> bool {
        covers(&self.tokens, &other.tokens)
    }

    /// Whether the pattern can reach a system subject (see [`is_system_subject`]): only a
    /// pattern whose first token is literally a system one can, since wildcards never match them.
    pub fn reaches_system(&self) -> bool {
        matches!(self.tokens.first(), Some(Token::Literal(first)) if is_system_subject(first))
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

/// Whether a subject (or a pattern's first token) is a system subject: it starts with `$`
/// (`$SYS`, `$JS`, `$KV`, `$O`, `$MQTT`, ...: NATS reserves them) or its first token is `_INBOX`
/// (replies; `_INBOXES.x` is an ordinary subject). The one rule for what no plugin may publish or
/// subscribe to and the HTTP ingress refuses.
pub fn is_system_subject(subject: &str) -> bool {
    subject.starts_with('$')
        || subject.strip_prefix("_INBOX").is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
}

/// Whether a subject is a dead letter by the default naming (`plugbus.dlq.<something>`).
pub fn is_dead_letter_subject(subject: &str) -> bool {
    subject.len() > DEAD_LETTER_PREFIX.len() && subject.starts_with(DEAD_LETTER_PREFIX)
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
    fn whitespace_and_control_characters_are_refused_in_any_script() {
        // ASCII (vertical tab and DEL too) and beyond it: no-break space, line separator, NEL,
        // a C1 control.
        for bad in ["a.b\x0b", "a.\x7f", "a\rb", "a.x\u{a0}y", "\u{2028}", "a.\u{85}", "gr\u{f6}\u{9b}e"] {
            let e = validate_subject(bad).unwrap_err().to_string();
            assert!(e.contains("whitespace or a control character"), "{bad:?}: {e}");
            assert!(Pattern::parse(bad).is_err(), "{bad:?} accepted as a pattern");
        }
        // Letters of any script are a token's like any other.
        validate_subject("gr\u{f6}\u{df}e.\u{65e5}\u{672c}").unwrap();
        assert!(m("gr\u{f6}\u{df}e.*", "gr\u{f6}\u{df}e.\u{65e5}\u{672c}"));
        assert!(!m("gr\u{f6}\u{df}e.*", "gr\u{f6}sse.x"));
        assert!(m("*.\u{65e5}", "x.\u{65e5}"));
    }

    /// The rules as they were written before subjects were split on the byte (`char` by `char`,
    /// tokens collected): the oracle the byte-wise check must agree with on any input.
    fn check_tokens_by_char(raw: &str, wildcards: bool) -> Result<(), &'static str> {
        if raw.is_empty() {
            return Err("it is empty");
        }
        if raw.len() > 1024 {
            return Err("it is longer than 1024 bytes");
        }
        let tokens: Vec<&str> = raw.split('.').collect();
        for (i, token) in tokens.iter().enumerate() {
            if token.is_empty() {
                return Err("it has an empty token (leading, trailing or double dot)");
            }
            if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err("it contains whitespace or a control character");
            }
            let is_wild = *token == "*" || *token == ">";
            if !wildcards && (token.contains('*') || token.contains('>')) {
                return Err("a subject cannot contain the wildcards `*` or `>`");
            }
            if wildcards && !is_wild && (token.contains('*') || token.contains('>')) {
                return Err("a wildcard must be a whole token");
            }
            if *token == ">" && i + 1 != tokens.len() {
                return Err("`>` may only be the last token");
            }
        }
        Ok(())
    }

    #[test]
    fn the_byte_wise_rules_agree_with_the_char_wise_ones_on_random_text() {
        const ALPHABET: &[char] = &[
            '.',
            '.',
            '.',
            '*',
            '>',
            'a',
            'b',
            ' ',
            '\t',
            '\u{b}',
            '\u{7f}',
            '\u{0}',
            '$',
            '_',
            '\u{e9}',
            '\u{a0}',
            '\u{85}',
            '\u{2028}',
            '\u{65e5}',
            '\u{1f600}',
        ];
        let mut rng = fastrand::Rng::with_seed(18);
        let mut text = || (0..rng.usize(0..10)).map(|_| ALPHABET[rng.usize(..ALPHABET.len())]).collect::<String>();
        let reason = |r: Result<(), SubjectError>| r.map_err(|e| e.reason);
        let (mut valid, mut patterns) = (0, Vec::new());
        for _ in 0..20_000 {
            let raw = text();
            assert_eq!(reason(validate_subject(&raw)), check_tokens_by_char(&raw, false), "subject {raw:?}");
            assert_eq!(reason(Pattern::parse(&raw).map(drop)), check_tokens_by_char(&raw, true), "pattern {raw:?}");
            valid += usize::from(validate_subject(&raw).is_ok());
            patterns.extend(Pattern::parse(&raw).ok());
        }
        assert!(
            valid > 1_000 && patterns.len() > 1_000,
            "too few valid inputs to compare: {valid}, {}",
            patterns.len()
        );
        // Matching: the split on the byte gives the tokens the split on the `char` gave.
        let mut matched = 0;
        for pattern in &patterns {
            for _ in 0..5 {
                let subject = text();
                let mut parts = subject.split('.');
                let by_char = pattern.tokens.iter().all(|t| match (t, parts.next()) {
                    (Token::Tail, Some(_)) => {
                        parts.by_ref().for_each(drop);
                        true
                    }
                    (Token::One, Some(_)) => true,
                    (Token::Literal(l), Some(p)) => l == p,
                    (_, None) => false,
                }) && parts.next().is_none();
                assert_eq!(pattern.matches_nats(&subject), by_char, "{pattern} against {subject:?}");
                matched += usize::from(by_char);
            }
        }
        assert!(matched > 100, "too few matches to compare: {matched}");
    }

    #[test]
    fn system_reach_is_detected() {
        for p in ["$SYS.>", "$JS.API.x", "_INBOX.*", "$KV.plugbus_other.>", "$O.x", "$G", "_INBOX"] {
            assert!(Pattern::parse(p).unwrap().reaches_system(), "{p}");
        }
        for p in ["orders.>", "inventory.*", "a", ">", "*.>", "*.*", "x.$SYS", "_INBOXES.x"] {
            assert!(!Pattern::parse(p).unwrap().reaches_system(), "{p}");
        }
        assert!(is_system_subject("$SYS.x"));
        assert!(is_system_subject("$KV.plugbus_payments.key"));
        assert!(is_system_subject("_INBOX.abc.def"));
        assert!(!is_system_subject("SYS.x"));
        assert!(!is_system_subject("orders.$x"));
    }

    #[test]
    fn wildcards_never_match_system_subjects() {
        for p in [">", "*.>", "*.*.>", "*.ACK.>", "*"] {
            for s in ["$KV.plugbus_payments.k", "$JS.ACK.S.c.1.2.3.4.5", "$SYS.SERVER.x", "_INBOX.x", "$G"] {
                assert!(!m(p, s), "{p} matched {s}");
            }
        }
        // The broker itself does deliver them to `>`: that is why the NATS feeds filter.
        assert!(Pattern::parse(">").unwrap().matches_nats("$KV.plugbus_payments.k"));
        // A literal first token names the system subject: the broker's rule, kept for operators.
        assert!(m("$KV.>", "$KV.plugbus_payments.k"));
        assert!(m("_INBOX.*", "_INBOX.x"));
    }

    #[test]
    fn streams_of_system_subjects_and_dead_letters_are_out_of_a_wildcards_reach() {
        let p = |s: &str| Pattern::parse(s).unwrap();
        assert!(!p(">").may_reach(&p("$KV.plugbus_payments.>")));
        assert!(!p(">").may_reach(&p("plugbus.dlq.>")));
        assert!(!p("plugbus.>").may_reach(&p("plugbus.dlq.>")));
        assert!(p("plugbus.dlq.>").may_reach(&p("plugbus.dlq.>")));
        assert!(p(">").may_reach(&p("orders.>")));
        assert!(p(">").may_reach(&p(">")), "a catch-all stream holds ordinary subjects too");
        assert!(!p("orders.>").may_reach(&p("payments.>")));
    }

    #[test]
    fn dead_letters_reach_only_patterns_that_name_them() {
        for p in [">", "plugbus.>", "*.dlq.payments", "*.*.payments", "plugbus.*.>", "*.>"] {
            assert!(!m(p, "plugbus.dlq.payments"), "{p} saw another plugin's dead letter");
            assert!(Pattern::parse(p).unwrap().matches_nats("plugbus.dlq.payments"), "{p}");
        }
        for p in ["plugbus.dlq.>", "plugbus.dlq.*", "plugbus.dlq.payments"] {
            assert!(m(p, "plugbus.dlq.payments"), "{p}");
        }
        assert!(m("plugbus.>", "plugbus.other.x"));
        assert!(m(">", "plugbus.dlq"), "not a dead letter: no plugin token");
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
