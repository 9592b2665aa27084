//! Subjects and subject patterns as the host checks them (a mirror of `host/src/subject.rs`,
//! which is the authority; the tests below are the host's own, so a drift shows up here).
//!
//! NATS style: dot-separated tokens; in a pattern `*` matches exactly one token and `>` (last
//! token only) one or more trailing tokens. On top of NATS: a wildcard never matches a system
//! subject (`$...`, `_INBOX...`), and reaches a dead letter (`plugbus.dlq.<plugin>`) only when
//! the pattern names `plugbus.dlq` literally.

const DEAD_LETTER_PREFIX: &str = "plugbus.dlq.";

fn check_tokens(what: &str, raw: &str, wildcards: bool) -> Result<(), String> {
    let err = |reason: &str| format!("{what} {} is not valid: {reason}", super::quoted(raw));
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
pub(crate) fn validate_subject(raw: &str) -> Result<(), String> {
    check_tokens("subject", raw, false)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    /// `*`: exactly one token.
    One,
    /// `>`: one or more trailing tokens.
    Tail,
}

/// A validated subject pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Pattern {
    raw: String,
    tokens: Vec<Token>,
}

impl Pattern {
    pub(crate) fn parse(raw: &str) -> Result<Self, String> {
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

    pub(crate) fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether `subject` matches, as a plugin's subscription or allow-list sees it.
    pub(crate) fn matches(&self, subject: &str) -> bool {
        self.reaches(subject) && self.matches_nats(subject)
    }

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

    fn matches_nats(&self, subject: &str) -> bool {
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

    /// Whether the pattern can reach a system subject: only by a literal system first token.
    pub(crate) fn reaches_system(&self) -> bool {
        matches!(self.tokens.first(), Some(Token::Literal(first)) if is_system_subject(first))
    }
}

/// `$...` or a first token `_INBOX`: the broker's or a client's own, never a plugin's.
pub(crate) fn is_system_subject(subject: &str) -> bool {
    subject.starts_with('$') || subject.split('.').next() == Some("_INBOX")
}

pub(crate) fn is_dead_letter_subject(subject: &str) -> bool {
    subject.len() > DEAD_LETTER_PREFIX.len() && subject.starts_with(DEAD_LETTER_PREFIX)
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
        let e = Pattern::parse("a.>.b").unwrap_err();
        assert!(e.contains("last token"), "{e}");
        assert!(validate_subject(&"a".repeat(1025)).unwrap_err().contains("longer than 1024 bytes"));
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
        assert!(Pattern::parse(">").unwrap().matches_nats("$KV.plugbus_payments.k"));
        assert!(m("$KV.>", "$KV.plugbus_payments.k"));
        assert!(m("_INBOX.*", "_INBOX.x"));
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
}
