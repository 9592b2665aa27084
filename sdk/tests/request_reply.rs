//! Request/reply under `TestHost`: each test names the host rule it mirrors (`host/src/sandbox/
//! state.rs`, `rpc::Host`) and fails if the test host drifts from it.

use plugbus_sdk::testing::{Limits, TestHost};
use plugbus_sdk::{Event, HandlerError, ReplyError, RequestError, handler, publish, reply, request};
use std::time::Duration;

#[handler(subscribe = ["orders.created"], publishes = ["prices.>", "orders.priced"])]
fn price(ev: Event) -> Result<(), HandlerError> {
    let subject = ev.header("ask").unwrap_or("prices.quote").to_string();
    let quote = request(&subject, ev.data(), Duration::from_secs(1))?;
    publish("orders.priced", quote.data())?;
    Ok(())
}

#[test]
fn a_stubbed_reply_answers_the_request_and_the_request_is_recorded() {
    let run = TestHost::new().with_reply("prices.quote", "42").run(price, Event::new("orders.created", "widget"));
    assert_eq!(run.result, Ok(()));
    assert_eq!(run.published[0].text(), "42");
    assert_eq!(run.requests.len(), 1);
    assert_eq!((run.requests[0].subject.as_str(), run.requests[0].text()), ("prices.quote", "widget"));
}

#[test]
fn a_request_outside_publishes_is_denied_like_a_publish() {
    // host: `check_subject` is shared by publish and request
    let ev = Event::new("orders.created", "").with_header("ask", "billing.quote");
    let run = TestHost::new().with_reply("billing.quote", "1").run(price, ev);
    let err = run.result.unwrap_err();
    assert!(!err.is_retry(), "a denied request rejects with `?`: {err}");
    assert!(err.message().contains("\"billing.quote\" is not in the manifest's publishes"), "{err}");
    assert!(run.requests.is_empty(), "a refused request went out");
}

#[test]
fn no_stub_is_no_responders_and_retries_with_question_mark() {
    let run = TestHost::new().run(price, Event::new("orders.created", ""));
    let err = run.result.unwrap_err();
    assert!(err.is_retry(), "{err}");
    assert!(err.message().contains("no responders"), "{err}");
    assert_eq!(run.requests.len(), 1, "the request went out even though the attempt failed");
}

#[handler(subscribe = ["batch.go"], publishes = ["prices.>", "batch.done"])]
fn flood(_ev: Event) -> Result<(), HandlerError> {
    let mut sent = 0;
    let refused = loop {
        match request("prices.quote", b"", Duration::from_millis(10)) {
            Ok(_) => sent += 1,
            Err(e) => break e,
        }
        assert!(sent < 1_000_000, "never refused");
    };
    publish("batch.done", format!("{sent} {refused}"))?;
    Ok(())
}

#[test]
fn requests_per_event_are_capped() {
    // host: `max_requests` (16 by default)
    let run = TestHost::new().with_reply("prices.quote", "1").run(flood, Event::new("batch.go", ""));
    assert_eq!(run.published[0].text(), "16 request limit: request limit of 16 per event reached");
    let tight = TestHost::new()
        .with_limits(Limits { max_requests: 2, ..Limits::default() })
        .with_reply("prices.quote", "1")
        .run(flood, Event::new("batch.go", ""));
    assert!(tight.published[0].text().starts_with("2 request limit"), "{}", tight.published[0].text());
}

#[test]
fn a_reply_over_max_reply_bytes_is_a_limit_error() {
    let run = TestHost::new()
        .with_limits(Limits { max_reply_bytes: 4, ..Limits::default() })
        .with_reply("prices.quote", "12345")
        .run(price, Event::new("orders.created", ""));
    let err = run.result.unwrap_err();
    assert!(err.message().contains("over max_reply_bytes (4)"), "{err}");
}

#[handler(subscribe = ["prices.quote"], publishes = ["prices.audit"])]
fn quote(ev: Event) -> Result<(), HandlerError> {
    match ev.header("case") {
        Some("twice") => {
            reply(&ev, "first")?;
            let second = reply(&ev, "second");
            assert!(matches!(second, Err(ReplyError::Limit(ref m)) if m.contains("already replied")), "{second:?}");
        }
        Some("forged") => {
            let forged = ev.clone().with_reply_to("reply-made-up");
            let refused = reply(&forged, "x");
            assert!(
                matches!(refused, Err(ReplyError::Denied(ref m)) if m.contains("is not the reply-to")),
                "{refused:?}"
            );
        }
        Some("fail") => {
            reply(&ev, "never seen")?;
            return Err(HandlerError::retry("failed after replying"));
        }
        Some("huge") => {
            let refused = reply(&ev, vec![0u8; 2 << 20]);
            assert!(matches!(refused, Err(ReplyError::Limit(ref m)) if m.contains("output limit")), "{refused:?}");
        }
        _ => reply(&ev, "7")?,
    }
    Ok(())
}

fn asked(case: &str) -> Event {
    Event::new("prices.quote", "").with_reply_to("r-1").with_header("case", case)
}

#[test]
fn a_reply_is_released_on_ok_only_and_once() {
    let run = TestHost::new().run(quote, asked("plain"));
    let r = run.reply.unwrap();
    assert_eq!((r.subject.as_str(), r.text()), ("prices.quote", "7"));
    assert_eq!(TestHost::new().run(quote, asked("twice")).reply.unwrap().text(), "first");
    let failed = TestHost::new().run(quote, asked("fail"));
    assert!(failed.result.is_err());
    assert!(failed.reply.is_none(), "a failed attempt released its reply");
}

#[test]
fn a_forged_or_missing_reply_to_and_a_huge_reply_are_refused() {
    assert_eq!(TestHost::new().run(quote, asked("forged")).result, Ok(()));
    assert_eq!(TestHost::new().run(quote, asked("huge")).result, Ok(()));
    let none = TestHost::new().run(quote, Event::new("prices.quote", ""));
    let err = none.result.unwrap_err();
    assert!(err.message().contains("no reply-to"), "{err}");
    assert!(none.reply.is_none());
}

#[test]
fn request_errors_become_handler_errors_by_kind() {
    for (e, retry) in [
        (RequestError::Timeout("t".into()), true),
        (RequestError::NoResponders("n".into()), true),
        (RequestError::Unavailable("u".into()), true),
        (RequestError::Denied("d".into()), false),
        (RequestError::Limit("l".into()), false),
        (RequestError::Invalid("i".into()), false),
    ] {
        assert_eq!(HandlerError::from(e.clone()).is_retry(), retry, "{e}");
    }
}
