//! Outbound HTTP from a handler. The event's data says what to do:
//! `{"url": "...", "method": "GET"|"POST", "body": "...", "calls": 1, "fail_before": 1, "key": "..."}`
//! (`key`: an `Idempotency-Key` the handler tries to set itself; `first`: a URL called once
//! before the others, its outcome ignored; `ask`: a subject asked once before them, likewise).
//! Each call's outcome is published to `caller.out.ok` (`{status, body, attempt, index}`) or
//! `caller.out.err` (`{error, attempt, index}`); with `fail_before = N` the attempts before the
//! N-th ask to be retried after making their calls (the same calls on every attempt); with
//! `"strict": true` a failed call (or a non-2xx answer) fails the attempt the SDK's default way
//! (`?`: an open circuit, a timeout or a 5xx asks to retry).
//! `{"stage": N, "header_bytes": H}` is an attack instead: N requests whose bodies are written as
//! far as the host lets them and never sent, and one header map given H bytes of headers (1 KiB
//! values); what the host took is published to `caller.out.staged` (`{bodies, body_bytes}`).
//! `{"strings": N, "authority_bytes": A, "method_bytes": M, "path_bytes": P}` is another: N
//! requests, each given an authority, a method and a path of those lengths and held, never sent;
//! how many of each the host took is published to `caller.out.strings`.

use plugbus_sdk::{Event, HandlerError, handler, http, kv, publish_json};
use serde_json::{Value, json};

#[handler(
    subscribe = ["caller.go"],
    publishes = ["caller.out.>"],
    outbound = ["http://127.0.0.1:*", "http://127.0.0.2:*", "http://localhost:*"]
)]
fn call(ev: Event) -> Result<(), HandlerError> {
    let spec: Value = ev.json()?;
    if let Some(requests) = spec["strings"].as_u64() {
        let len = |key: &str| spec[key].as_u64().unwrap_or(0) as usize;
        return strings(requests, len("authority_bytes"), len("method_bytes"), len("path_bytes"));
    }
    if let Some(bodies) = spec["stage"].as_u64() {
        return stage(bodies, spec["header_bytes"].as_u64().unwrap_or(0));
    }
    let url = spec["url"].as_str().unwrap_or_default();
    let method = spec["method"].as_str().unwrap_or("GET");
    let body = spec["body"].as_str().unwrap_or_default().as_bytes().to_vec();
    let calls = spec["calls"].as_u64().unwrap_or(1);
    // `bump`: the kv key it reads before its calls and writes (one more) after them, so
    // another event writing it meanwhile makes this attempt's commit conflict.
    let bump = spec["bump"].as_str();
    let before: u64 = match bump {
        Some(key) => kv::get(key)?.and_then(|v| String::from_utf8(v).ok()?.parse().ok()).unwrap_or(0),
        None => 0,
    };
    // `first`: a URL called once before the others, its outcome not looked at (a call that
    // goes out in an attempt another call's open breaker then fails).
    if let Some(first) = spec["first"].as_str() {
        let _ = http::Request::new("GET", first).send();
    }
    // `ask`: a request sent once before the calls, its answer (or none) not looked at.
    if let Some(subject) = spec["ask"].as_str() {
        let _ = plugbus_sdk::request(subject, b"", std::time::Duration::from_millis(100));
    }
    for index in 0..calls {
        let mut req = http::Request { body: body.clone(), ..http::Request::new(method, url) };
        if let Some(key) = spec["key"].as_str() {
            req = req.header("Idempotency-Key", key);
        }
        let strict = spec["strict"].as_bool().unwrap_or(false);
        match req.send() {
            Err(e) if strict => return Err(e.into()),
            Ok(res) if strict && !res.is_success() => {
                return Err(HandlerError::retry(format!("the server answered {}", res.status)));
            }
            Ok(res) => publish_json(
                "caller.out.ok",
                &json!({ "status": res.status, "body": res.text(), "attempt": ev.attempt(), "index": index }),
            )?,
            Err(e) => publish_json(
                "caller.out.err",
                &json!({ "error": e.to_string(), "kind": format!("{e:?}"), "attempt": ev.attempt(), "index": index }),
            )?,
        }
    }
    if let Some(key) = bump {
        kv::set(key, (before + 1).to_string())?;
    }
    if u64::from(ev.attempt()) < spec["fail_before"].as_u64().unwrap_or(0) {
        return Err(HandlerError::retry("asked to fail this attempt"));
    }
    Ok(())
}

/// Makes the host hold what it will of `bodies` outgoing bodies never sent, and `header_bytes`
/// in one header map (wasmtime-wasi-http traps the attempt past its cap), and reports it.
fn stage(bodies: u64, header_bytes: u64) -> Result<(), HandlerError> {
    use plugbus_sdk::__http_bindings::wasi::http::types::{Fields, OutgoingRequest};
    let chunk = vec![0u8; 64 * 1024];
    let mut held = Vec::new();
    let mut body_bytes = 0u64;
    for _ in 0..bodies {
        let request = OutgoingRequest::new(Fields::new());
        let Ok(body) = request.body() else { break };
        let Ok(stream) = body.write() else { break };
        while let Ok(room) = stream.check_write() {
            let n = (room as usize).min(chunk.len());
            if n == 0 || stream.write(&chunk[..n]).is_err() {
                break;
            }
            body_bytes += n as u64;
        }
        // Dropped child first: a stream before its body, a body before its request.
        held.push((stream, body, request));
    }
    let headers = Fields::new();
    let value = vec![b'v'; 1024];
    let mut given = 0u64;
    for i in 0.. {
        let name = format!("x-h{i:04}");
        if given + (name.len() + value.len()) as u64 > header_bytes {
            break;
        }
        headers.append(&name, &value).map_err(|e| HandlerError::reject(format!("append: {e:?}")))?;
        given += (name.len() + value.len()) as u64;
    }
    publish_json(
        "caller.out.staged",
        &json!({ "body_bytes": body_bytes, "bodies": held.len(), "header_bytes": given }),
    )?;
    drop(held);
    Ok(())
}

/// Gives `requests` requests an authority, a method and a path of these lengths each and holds
/// them; reports how many of each the host took.
fn strings(requests: u64, authority: usize, method: usize, path: usize) -> Result<(), HandlerError> {
    use plugbus_sdk::__http_bindings::wasi::http::types::{Fields, Method, OutgoingRequest};
    let (authority, method, path) =
        ("a".repeat(authority), "M".repeat(method), format!("/{}", "p".repeat(path.max(1) - 1)));
    let mut held = Vec::new();
    let (mut authorities, mut methods, mut paths) = (0u64, 0u64, 0u64);
    for _ in 0..requests {
        let request = OutgoingRequest::new(Fields::new());
        authorities += u64::from(request.set_authority(Some(&authority)).is_ok());
        methods += u64::from(request.set_method(&Method::Other(method.clone())).is_ok());
        paths += u64::from(request.set_path_with_query(Some(&path)).is_ok());
        held.push(request);
    }
    publish_json(
        "caller.out.strings",
        &json!({ "requests": held.len(), "authorities": authorities, "methods": methods, "paths": paths }),
    )?;
    Ok(())
}
