//! A delivery's fate: the one place that decides, after a failure, whether the event is tried
//! again in this host, handed back to the transport for redelivery, or dead-lettered, and how
//! a delivery is settled with its transport. Dispatch runs attempts and reports what went wrong
//! as a [`DeliveryError`]; it never decides a fate itself.

use crate::retry::RetryPolicy;
use crate::sandbox::Failure;
use std::time::Duration;

/// Why an attempt or a delivery failed, attributed truthfully: a host or broker failure is
/// never reported as the handler's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryError {
    /// The handler failed: asked to retry, rejected the event, or trapped.
    Handler(Failure),
    /// The host failed the attempt while running the handler ([`Failure::Host`]: a host
    /// function panicked, the shared instance pool stayed full, a host call did not answer).
    Host(String),
    /// The kv store could not commit the attempt's writes (not the handler's doing).
    Kv(String),
    /// Another event changed a key the attempt read before its writes committed, and the
    /// attempt could not be run again in place (it called out, or it lost the race every
    /// time): contention between the plugin's own events, neither the handler's fault nor the
    /// host's. A later attempt reads the new value.
    KvConflict(String),
    /// The attempt's kv writes would take the plugin's kv past its `max_kv_bytes`: the
    /// handler's doing (a later attempt may pass once other events deleted keys).
    KvQuota(String),
    /// The transport did not take an output or a dead letter.
    Publish(String),
    /// The event is larger than the plugin's `max_event_bytes`: it is never run.
    Oversize {
        /// The event's data size.
        bytes: usize,
        /// The plugin's limit.
        limit: u64,
    },
    /// The message could not be read as an event: it is never run.
    Undecodable(String),
    /// No host of the plugin took it before the transport's delivery limit: hosts of a version
    /// that does not subscribe to it gave it back (a rolling upgrade). It is never run here.
    Unclaimed(String),
}

impl DeliveryError {
    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            DeliveryError::Handler(f) => f.is_retryable(),
            DeliveryError::Host(_)
            | DeliveryError::Kv(_)
            | DeliveryError::KvConflict(_)
            | DeliveryError::KvQuota(_)
            | DeliveryError::Publish(_) => true,
            DeliveryError::Oversize { .. } | DeliveryError::Undecodable(_) | DeliveryError::Unclaimed(_) => false,
        }
    }
}

/// Why `ev` is never run by a plugin with `limits`: its data is over the plugin's
/// `max_event_bytes` (dead-lettered unrun). Dispatch and `plugbus test` both ask here.
pub fn unrunnable(ev: &crate::event::Event, limits: &crate::sandbox::Limits) -> Option<DeliveryError> {
    let limit = limits.max_event_bytes;
    (ev.data.len() as u64 > limit).then(|| DeliveryError::Oversize { bytes: ev.data.len(), limit })
}

impl DeliveryError {
    /// The error of an attempt that failed with `failure`: the handler's, or the host's when
    /// the host failed it ([`Failure::Host`]).
    pub fn of_attempt(failure: Failure) -> Self {
        match failure {
            Failure::Host(why) => DeliveryError::Host(why),
            failure => DeliveryError::Handler(failure),
        }
    }

    /// Whether the host (its kv store, its bus, its instance pool, a host function) failed, not
    /// the handler nor the event (an attempt's are counted in `plugbus_host_failures_total`; an
    /// output's, which never fails its attempt, in `plugbus_outputs_dead_lettered_total`).
    pub fn is_the_hosts(&self) -> bool {
        matches!(self, DeliveryError::Host(_) | DeliveryError::Kv(_) | DeliveryError::Publish(_))
    }
}

/// What the handler is expected to do with the event whose dead letter says `error` (its
/// `plugbus-error`, a [`DeliveryError`]'s display), for a test case made of it
/// (`plugbus dlq export`): `"reject"` or `"retry"` when the handler failed it (rejected it, asked
/// to retry, trapped, went past its kv quota, or was kept waiting for a CPU past 4 times its
/// deadline: whether it would have finished is not known), `"reject"` too for an event over the
/// plugin's `max_event_bytes` (never run: `plugbus test` dead-letters it unrun as the host does,
/// review 63c F8), `"ok"` when something else did (the host or the bus failed, two of its events
/// raced on a kv key, or it never ran: undecodable, unclaimed). Read from the words
/// [`DeliveryError`]'s display starts with.
pub fn expected_of(error: &str) -> &'static str {
    let not_the_handlers =
        ["host error:", "kv conflict:", "the message is not a valid event:", "no host of the plugin took it:"];
    let starved = error.strip_prefix("host error: ").is_some_and(|e| e.starts_with(crate::sandbox::cpu_wait::STARVED));
    if error.starts_with("handler rejected the event") || never_run_for_its_size(error) {
        "reject"
    } else if starved {
        // It was kept waiting past 4 times its deadline: whether it would have finished is not known.
        "retry"
    } else if not_the_handlers.iter().any(|p| error.starts_with(p)) {
        "ok"
    } else {
        "retry"
    }
}

/// Whether a dead letter's `error` says the event was over the plugin's `max_event_bytes` (never
/// run: neither the handler's failure nor the host's).
pub fn never_run_for_its_size(error: &str) -> bool {
    error.starts_with("event of ") && error.contains("-byte limit")
}

impl std::fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeliveryError::Handler(failure) => write!(f, "{failure}"),
            DeliveryError::Host(why) => write!(f, "host error: {why}"),
            DeliveryError::Kv(why) => write!(f, "host error: the kv store did not commit the attempt: {why}"),
            DeliveryError::KvConflict(why) => write!(f, "kv conflict: the attempt's writes were not committed: {why}"),
            DeliveryError::KvQuota(why) => write!(f, "the attempt's kv writes were refused: {why}"),
            DeliveryError::Publish(why) => write!(f, "host error: the bus did not take it: {why}"),
            DeliveryError::Oversize { bytes, limit } => {
                write!(f, "event of {bytes} bytes is over the {limit}-byte limit")
            }
            DeliveryError::Undecodable(why) => write!(f, "the message is not a valid event: {why}"),
            DeliveryError::Unclaimed(why) => write!(f, "no host of the plugin took it: {why}"),
        }
    }
}

/// What happens after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Wait this long and try again in this host (the delivery and its ordering lane are held).
    RetryHere(Duration),
    /// Hand it back to the transport to deliver again after this long (any host may take it).
    Redeliver(Duration),
    /// Give up: dead-letter it.
    DeadLetter,
    /// The attempt asked to retry after an open circuit breaker refused one of its outbound
    /// calls: wait this long in this host (at least the breaker's cool-down) and run the same
    /// attempt again. Not charged against `max_attempts` (the destination is down, not the
    /// event), and never handed to the transport: a `nak` would count as a delivery there.
    WaitForCircuit(Duration),
}

/// What dispatch knows of a failed attempt beyond its error: whether open circuit breakers
/// refused its outbound calls, and how long the delivery already waited for them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Circuit {
    /// The longest `retry_after` of the calls an open breaker refused during the attempt
    /// (`None`: none was refused).
    pub open: Option<Duration>,
    /// How long this delivery has waited for open breakers so far ([`Fate::WaitForCircuit`]s).
    pub waited: Duration,
    /// The requests the attempt sent (to other plugins or responders): an attempt that sent any
    /// is charged, since a run again in its place would send them again, each running a handler
    /// there, under fresh per-attempt limits. (Its outbound HTTP calls do not count: run again as
    /// the same attempt, each goes out under the same `Idempotency-Key`.)
    pub requests_out: u32,
}

/// The most a breaker wait is spread past the cool-down (a tenth of it, at most this), so the
/// events waiting on one breaker do not all come back at the same instant.
const CIRCUIT_JITTER_MAX: Duration = Duration::from_secs(1);

/// Decides the fate of a delivery whose attempt number `attempt` (1-based) failed with `error`.
/// `redelivering`: the transport redelivers after a `nak` and the plugin lets it hold retries.
pub fn decide(error: &DeliveryError, attempt: u32, policy: &RetryPolicy, redelivering: bool) -> Fate {
    decide_after(error, attempt, Circuit::default(), policy, redelivering)
}

/// [`decide`], knowing what open circuit breakers did to the attempt (`circuit`).
///
/// An attempt that asked to retry (`retry`, what the SDK makes of `CircuitOpen`) after an open
/// breaker refused one of its calls, and sent no request (`circuit.requests_out`), waits
/// `max(backoff, retry_after)` (plus a little jitter) and runs again as the same attempt, until
/// the delivery has waited `policy.max_circuit_wait` in
/// all; then such an attempt is charged like any other, and its retry still waits at least the
/// breaker's `retry_after` (a retry sooner would only be refused again). So a provider that is
/// down for a while makes events wait, and one that never comes back still ends in dead letters
/// after at most `max_circuit_wait` plus `max_attempts` cool-downs.
pub fn decide_after(
    error: &DeliveryError,
    attempt: u32,
    circuit: Circuit,
    policy: &RetryPolicy,
    redelivering: bool,
) -> Fate {
    let retry_after = circuit.open.filter(|_| error.is_retryable());
    if let (DeliveryError::Handler(Failure::Retry(_)), Some(after)) = (error, retry_after)
        && circuit.waited < policy.max_circuit_wait
        && circuit.requests_out == 0
    {
        let jitter = after.mul_f64(0.1).min(CIRCUIT_JITTER_MAX).mul_f64(fastrand::f64());
        return Fate::WaitForCircuit(policy.backoff(attempt).max(after + jitter));
    }
    if !error.is_retryable() || attempt >= policy.max_attempts {
        return Fate::DeadLetter;
    }
    let wait = policy.backoff(attempt).max(retry_after.unwrap_or_default());
    if redelivering { Fate::Redeliver(wait) } else { Fate::RetryHere(wait) }
}

/// How a delivery is settled with its transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    /// Handled: never deliver again.
    Ack,
    /// Deliver again after this long.
    Nak(Duration),
    /// Never deliver again (dead-lettered, or a dead letter that failed).
    Term,
    /// Keep it here, unsettled and kept alive, until its dead letter is taken, then `term`: the
    /// transport would not deliver it again.
    HoldUntilDeadLettered,
}

/// How a dead-lettered delivery is settled: `term` once the dead letter is kept; when the
/// transport did not take it, a redelivering transport gets it back (`nak`) rather than lose it,
/// or, at its last delivery (`comes_again` false: given back, the transport would drop it), the
/// delivery is held until the dead letter is taken.
pub fn settle_dead_letter(
    kept: bool,
    redeliverable: bool,
    comes_again: bool,
    attempts: u32,
    policy: &RetryPolicy,
) -> Settle {
    match (kept, redeliverable, comes_again) {
        (true, _, _) | (false, false, _) => Settle::Term,
        (false, true, true) => Settle::Nak(policy.backoff(attempts.max(1))),
        (false, true, false) => Settle::HoldUntilDeadLettered,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy { max_attempts: 3, ..RetryPolicy::default() }
    }

    #[test]
    fn retryable_failures_retry_until_the_last_attempt_then_dead_letter() {
        let retry = DeliveryError::Handler(Failure::Retry("busy".into()));
        assert!(matches!(decide(&retry, 1, &policy(), false), Fate::RetryHere(_)));
        assert!(matches!(decide(&retry, 2, &policy(), true), Fate::Redeliver(_)));
        assert_eq!(decide(&retry, 3, &policy(), false), Fate::DeadLetter);
        let kv = DeliveryError::Kv("disk full".into());
        assert!(matches!(decide(&kv, 1, &policy(), false), Fate::RetryHere(_)));
    }

    #[test]
    fn poison_is_dead_lettered_at_once() {
        for error in [
            DeliveryError::Handler(Failure::Reject("bad order".into())),
            DeliveryError::Oversize { bytes: 10, limit: 5 },
            DeliveryError::Undecodable("not JSON".into()),
        ] {
            assert_eq!(decide(&error, 1, &policy(), true), Fate::DeadLetter, "{error}");
        }
    }

    #[test]
    fn a_retry_after_an_open_circuit_waits_the_cool_down_uncharged_until_the_budget_is_spent() {
        let p = RetryPolicy { max_circuit_wait: Duration::from_secs(60), ..policy() };
        let retry = DeliveryError::Handler(Failure::Retry("circuit open for pay.example".into()));
        let open = |waited| Circuit {
            open: Some(Duration::from_secs(10)),
            waited: Duration::from_secs(waited),
            requests_out: 0,
        };
        // Even on the last attempt, and even where the transport redelivers: wait here.
        for (attempt, redelivering) in [(1, false), (3, true), (7, false)] {
            let Fate::WaitForCircuit(wait) = decide_after(&retry, attempt, open(0), &p, redelivering) else {
                panic!("attempt {attempt}: not a circuit wait");
            };
            assert!(wait >= Duration::from_secs(10) && wait <= Duration::from_secs(11), "{wait:?}");
        }
        // A longer normal backoff wins.
        let slow = RetryPolicy { initial: Duration::from_secs(100), max: Duration::from_secs(100), ..p.clone() };
        assert!(
            matches!(decide_after(&retry, 1, Circuit { open: Some(Duration::from_millis(1)), ..Circuit::default() }, &slow, false),
            Fate::WaitForCircuit(w) if w <= Duration::from_secs(100))
        );
        // The budget spent: charged like any retry, still not sooner than the breaker allows,
        // and the last attempt dead-letters (a provider that never comes back).
        assert!(
            matches!(decide_after(&retry, 1, open(60), &p, false), Fate::RetryHere(w) if w >= Duration::from_secs(10))
        );
        assert!(
            matches!(decide_after(&retry, 2, open(61), &p, true), Fate::Redeliver(w) if w >= Duration::from_secs(10))
        );
        assert_eq!(decide_after(&retry, 3, open(61), &p, false), Fate::DeadLetter);
        // No circuit refused: the plain rule; a reject or a trap is not waited for.
        assert_eq!(decide_after(&retry, 3, Circuit::default(), &p, false), Fate::DeadLetter);
        let reject = DeliveryError::Handler(Failure::Reject("declined".into()));
        assert_eq!(decide_after(&reject, 1, open(0), &p, false), Fate::DeadLetter);
        let trap = DeliveryError::Handler(Failure::Trap("unwrap on CircuitOpen".into()));
        assert!(
            matches!(decide_after(&trap, 1, open(0), &p, false), Fate::RetryHere(w) if w >= Duration::from_secs(10))
        );
        assert_eq!(decide_after(&trap, 3, open(0), &p, false), Fate::DeadLetter);
        // Requests sent: charged, never sooner than the breaker allows (run again uncharged,
        // each run sent them again: review 55b M2).
        let sent = Circuit { requests_out: 16, ..open(0) };
        assert!(matches!(decide_after(&retry, 1, sent, &p, false), Fate::RetryHere(w) if w >= Duration::from_secs(10)));
        assert_eq!(decide_after(&retry, 3, sent, &p, false), Fate::DeadLetter);
    }

    #[test]
    fn host_failures_are_never_reported_as_the_handlers() {
        let kv = DeliveryError::Kv("the event log is closed".into()).to_string();
        assert!(kv.starts_with("host error:") && !kv.contains("handler"), "{kv}");
        let handler = DeliveryError::Handler(Failure::Retry("busy".into())).to_string();
        assert!(handler.starts_with("handler asked to retry"), "{handler}");
        // a plugin over its kv quota did it itself: retried (other events may free room), and
        // not called the host's failure
        let quota = DeliveryError::KvQuota("the kv of plugin \"p\" would hold …".into());
        assert!(!quota.to_string().contains("host error"), "{quota}");
        assert!(matches!(decide(&quota, 1, &policy(), false), Fate::RetryHere(_)));
        assert_eq!(decide(&quota, 3, &policy(), false), Fate::DeadLetter);
        // contention between the plugin's own events is neither: retried, named as a conflict
        let conflict = DeliveryError::KvConflict("key \"n\" it read changed".into());
        let text = conflict.to_string();
        assert!(
            text.starts_with("kv conflict:") && !text.contains("host error") && !text.contains("handler"),
            "{text}"
        );
        assert!(matches!(decide(&conflict, 1, &policy(), false), Fate::RetryHere(_)));
    }

    #[test]
    fn a_dead_letters_case_expects_a_failure_only_of_the_handlers() {
        let handlers = |f: Failure| DeliveryError::Handler(f).to_string();
        for (error, expected) in [
            (handlers(Failure::Reject("bad order".into())), "reject"),
            (handlers(Failure::Retry("busy".into())), "retry"),
            (handlers(Failure::Trap("wasm trap: unreachable".into())), "retry"),
            (DeliveryError::KvQuota("over max_kv_bytes".into()).to_string(), "retry"),
            (DeliveryError::of_attempt(Failure::Host("a host function panicked".into())).to_string(), "ok"),
            (
                DeliveryError::of_attempt(Failure::Host(format!(
                    "{}: it ran 3 ms …",
                    crate::sandbox::cpu_wait::STARVED
                )))
                .to_string(),
                "retry",
            ),
            (DeliveryError::Kv("the event log is closed".into()).to_string(), "ok"),
            (DeliveryError::Publish("full".into()).to_string(), "ok"),
            (DeliveryError::KvConflict("key \"n\" changed".into()).to_string(), "ok"),
            (DeliveryError::Oversize { bytes: 2 << 20, limit: 1 << 20 }.to_string(), "reject"),
            (DeliveryError::Undecodable("no id".into()).to_string(), "ok"),
            (DeliveryError::Unclaimed("5 deliveries".into()).to_string(), "ok"),
        ] {
            assert_eq!(expected_of(&error), expected, "{error}");
        }
    }

    #[test]
    fn a_dead_letter_the_bus_did_not_take_comes_back_when_the_transport_can_redeliver() {
        assert_eq!(settle_dead_letter(true, true, true, 3, &policy()), Settle::Term);
        assert_eq!(settle_dead_letter(true, true, false, 3, &policy()), Settle::Term);
        assert_eq!(settle_dead_letter(false, false, false, 3, &policy()), Settle::Term);
        assert!(matches!(settle_dead_letter(false, true, true, 3, &policy()), Settle::Nak(_)));
        assert_eq!(settle_dead_letter(false, true, false, 3, &policy()), Settle::HoldUntilDeadLettered);
    }
}
