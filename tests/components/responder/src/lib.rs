//! The replying side of request/reply, one behaviour per subject under `rpc.`; what a refused
//! reply said goes to `rpc.out.<case>` (the handler swallows the error to report it).
use plugbus_sdk::{Event, HandlerError, handler, kv, publish, reply, reply_with_headers};

#[handler(subscribe = ["rpc.>"], publishes = ["rpc.out.>", "ask.back"])]
fn responder(ev: Event) -> Result<(), HandlerError> {
    // Its own reports come back to it (`rpc.>`): taken, never answered or reported on again.
    if ev.subject().starts_with("rpc.out.") {
        return Ok(());
    }
    let case = ev.subject().strip_prefix("rpc.").unwrap_or_default().to_string();
    let report = |what: String| publish(&format!("rpc.out.{case}"), what);
    match case.as_str() {
        // The reply: the request's data upper-cased, with a header and a content type.
        "echo" => {
            let upper = ev.text()?.to_uppercase();
            reply_with_headers(&ev, upper, &[("datacontenttype", "text/plain"), ("answered-by", "responder")])?;
        }
        // A reply whose headers would reframe an HTTP response or set a cookie, if the route
        // copied them (it sends only `ce-*` attributes and the content type).
        "framing" => {
            let headers = [
                ("content-length", "1"),
                ("transfer-encoding", "chunked"),
                ("connection", "close"),
                ("set-cookie", "session=stolen; Path=/"),
                ("location", "https://evil.example/"),
                ("answered-by", "responder"),
                ("answeredby", "responder"),
            ];
            reply_with_headers(&ev, "framed reply", &headers)?;
        }
        // What the plugin sees as its reply-to (never the host's inbox).
        "peek" => reply(&ev, ev.reply_to().unwrap_or("(none)"))?,
        // Counts its requests in kv, reports the count on `rpc.out.count` and replies it: the
        // kv write and the output commit together (an outbox), across a crash too.
        "count" => {
            let n = kv::get_json::<u64>("count")?.unwrap_or(0) + 1;
            kv::set_json("count", &n)?;
            report(n.to_string())?;
            reply(&ev, n.to_string())?;
        }
        // Asks `ask.back` in turn, with `data` bytes (a number), and replies what came back (or
        // why nothing did): a chain of requests back through the asker.
        "back" => {
            let n: usize = ev.text()?.trim().parse().unwrap_or(0);
            let answer = plugbus_sdk::request("ask.back", vec![b'x'; n], std::time::Duration::from_millis(2000));
            let text = match answer {
                Ok(back) => back.text().unwrap_or_default().to_string(),
                Err(e) => format!("{e:?}"),
            };
            reply(&ev, text)?;
        }
        // Never replies: the requester times out.
        "silent" => {}
        // Replies after `data` milliseconds (busy: the guest has no sleep): too late for a short timeout.
        "late" => {
            let ms: u64 = ev.text()?.trim().parse().unwrap_or(500);
            let until = std::time::Instant::now() + std::time::Duration::from_millis(ms);
            while std::time::Instant::now() < until {}
            reply(&ev, "late")?;
        }
        // Replies, then fails on the first attempt: only the retry's reply goes out.
        "flaky" => {
            reply(&ev, format!("attempt {}", ev.attempt()))?;
            if ev.attempt() == 1 {
                return Err(HandlerError::retry("first attempt fails after replying"));
            }
        }
        // Two replies: the second is refused, the first stands.
        "twice" => {
            reply(&ev, "first")?;
            let second = reply(&ev, "second");
            report(format!("{second:?}"))?;
        }
        // A reply-to the plugin made up.
        "forged" => {
            let forged = ev.clone().with_reply_to("reply-0123456789abcdef01234567");
            let refused = reply(&forged, "forged");
            report(format!("{refused:?}"))?;
        }
        // A reply of `data` bytes (over max_output_bytes: refused).
        "huge" => {
            let n: usize = ev.text()?.trim().parse().unwrap_or(0);
            let refused = reply(&ev, vec![b'x'; n]);
            report(format!("{refused:?}"))?;
        }
        _ => {
            let refused = reply(&ev, "?");
            report(format!("{refused:?}"))?;
        }
    }
    Ok(())
}
