//! The case file: one JSON object per line.
//!
//! A line is either a recorded event (CloudEvents JSON, as `plugbus tail --record` writes it:
//! a case with no expectation yet) or a case:
//!
//! ```json
//! {"event": {...}, "kv": {"stock/widget": 3}, "attempt": 1,
//!  "expect": {"result": "ok", "outputs": [{"subject": "inventory.reserved", "data": {...}}], "kv": {...}}}
//! ```
//!
//! A case may stub its handler's outbound HTTP: `"http": [{"method": "POST", "url":
//! "https://api.example.com/v1/charges", "status": 201, "headers": {...}, "body": {...}}]` (each
//! answers the first call with its method and URL; a call no stub answers is refused, as is one
//! to a destination the manifest does not ask for). `expect.http` lists the calls the handler
//! made: `[{"call": "POST https://...", "body": ...}]`.
//!
//! Bytes (kv values, output data, HTTP bodies) are written as their JSON value when they are JSON, as
//! `{"text": "..."}` when they are other UTF-8, else as `{"base64": "..."}`. Other keys of a
//! case line (`dead_letter`, notes) are kept as they are when the file is rewritten.

use super::CaseError;
use crate::cloudevents::{base64_decode, base64_encode, from_json};
use crate::event::Event;
use crate::sandbox::http_stubs::{HttpCall, HttpStub};
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// What a handler's attempt came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// It returned Ok: its outputs and kv writes are released.
    Ok,
    /// It asked to be retried, or trapped (ran out of time or memory, panicked).
    Retry,
    /// It rejected the event (or a publish of it was refused).
    Reject,
}

impl Verdict {
    /// Its name in a case file.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Ok => "ok",
            Verdict::Retry => "retry",
            Verdict::Reject => "reject",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "ok" => Some(Verdict::Ok),
            "retry" => Some(Verdict::Retry),
            "reject" => Some(Verdict::Reject),
            _ => None,
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a case expects; `None` fields are not compared.
#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    /// The verdict.
    pub result: Verdict,
    /// The outputs, in order: subject and data (as written in the file).
    pub outputs: Option<Vec<(String, Value)>>,
    /// The plugin's kv after the event (every key), values as written in the file.
    pub kv: Option<BTreeMap<String, Value>>,
    /// The outbound HTTP calls it made, in order: `"METHOD url"` and the body.
    pub http: Option<Vec<(String, Value)>>,
}

impl Expect {
    /// The expectation that `outcome` meets: its verdict and outputs, and its kv when the
    /// previous expectation named kv, the case starts from some, or the handler wrote any.
    pub fn of(outcome: &super::Outcome, previous: Option<&Expect>, had_kv: bool) -> Self {
        let outputs = outcome.outputs.iter().map(|o| (o.subject.clone(), bytes_to_value(&o.data))).collect();
        let with_kv = had_kv || outcome.wrote_kv || previous.is_some_and(|p| p.kv.is_some());
        let kv = with_kv.then(|| outcome.kv.iter().map(|(k, v)| (k.clone(), bytes_to_value(v))).collect());
        let with_http = !outcome.calls.is_empty() || previous.is_some_and(|p| p.http.is_some());
        let http = with_http.then(|| outcome.calls.iter().map(|c| (call_line(c), bytes_to_value(&c.body))).collect());
        Self { result: outcome.verdict, outputs: Some(outputs), kv, http }
    }

    fn to_json(&self) -> Value {
        let mut m = Map::new();
        m.insert("result".into(), self.result.as_str().into());
        if let Some(outputs) = &self.outputs {
            let list = outputs.iter().map(|(s, d)| json!({ "subject": s, "data": d })).collect();
            m.insert("outputs".into(), Value::Array(list));
        }
        if let Some(kv) = &self.kv {
            m.insert("kv".into(), Value::Object(kv.clone().into_iter().collect()));
        }
        if let Some(http) = &self.http {
            let list = http.iter().map(|(call, body)| json!({ "call": call, "body": body })).collect();
            m.insert("http".into(), Value::Array(list));
        }
        Value::Object(m)
    }
}

/// How a call is named in a case file: `POST https://api.example.com/v1/charges`.
pub fn call_line(call: &HttpCall) -> String {
    format!("{} {}", call.method, call.url)
}

/// One case.
#[derive(Debug, Clone)]
pub struct Case {
    /// Its line in the file (1-based).
    pub line: usize,
    /// The event to run.
    pub event: Event,
    /// The kv the plugin starts from.
    pub kv: BTreeMap<String, Vec<u8>>,
    /// The attempt number the handler sees (default 1).
    pub attempt: u32,
    /// What answers the handler's outbound HTTP calls.
    pub http: Vec<HttpStub>,
    /// What it should do (`None`: not known yet).
    pub expect: Option<Expect>,
    /// The line as written, for rewriting it.
    written: Map<String, Value>,
    /// Whether the line was a bare recorded event.
    bare: bool,
}

impl Case {
    /// Reads one line (already parsed as JSON); the error says what is wrong.
    pub fn parse(line: usize, v: Value) -> Result<Self, String> {
        let Value::Object(obj) = v else { return Err("a case must be a JSON object".into()) };
        let bare = !obj.contains_key("event");
        let event_json = if bare { Value::Object(obj.clone()) } else { obj["event"].clone() };
        let event = from_json(&event_json).map_err(|e| if bare { e.to_string() } else { format!("`event`: {e}") })?;
        let field = |k: &str| if bare { None } else { obj.get(k) };
        let mut kv = BTreeMap::new();
        if let Some(v) = field("kv") {
            let Value::Object(entries) = v else { return Err("`kv` must be an object of key: value".into()) };
            for (k, v) in entries {
                kv.insert(k.clone(), value_to_bytes(v).map_err(|e| format!("`kv` key {k:?}: {e}"))?);
            }
        }
        let attempt = match field("attempt") {
            None => 1,
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n >= 1)
                .ok_or_else(|| format!("`attempt` is {v}: expected a whole number from 1"))?,
        };
        let http = match field("http") {
            None => Vec::new(),
            Some(Value::Array(list)) => list
                .iter()
                .enumerate()
                .map(|(i, v)| parse_stub(v).map_err(|e| format!("`http[{i}]`: {e}")))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err("`http` must be an array of {method, url, status, headers, body}".into()),
        };
        let expect = field("expect").map(parse_expect).transpose()?;
        Ok(Self { line, event, kv, attempt, http, expect, written: obj, bare })
    }

    /// The line for this case as it is now (its expectation included).
    pub fn to_json(&self) -> Value {
        let mut m = if self.bare {
            let mut m = Map::new();
            m.insert("event".into(), Value::Object(self.written.clone()));
            m
        } else {
            self.written.clone()
        };
        match &self.expect {
            Some(e) => m.insert("expect".into(), e.to_json()),
            None => m.remove("expect"),
        };
        Value::Object(m)
    }
}

/// One stubbed response: `url` required; `method` GET, `status` 200, no headers and an empty
/// body unless given.
fn parse_stub(v: &Value) -> Result<HttpStub, String> {
    let Value::Object(obj) = v else {
        return Err("a stub must be an object {method, url, status, headers, body}".into());
    };
    let method = match obj.get("method") {
        None => "GET".to_string(),
        Some(m) => m
            .as_str()
            .filter(|m| http::Method::from_bytes(m.as_bytes()).is_ok())
            .ok_or_else(|| format!("`method` is {m}: expected an HTTP method such as \"POST\""))?
            .to_ascii_uppercase(),
    };
    let url = obj.get("url").and_then(Value::as_str).ok_or("no `url` (the URL the handler calls)")?;
    // No user info: a guest's call never carries it, so such a stub could never answer.
    let uri = url.parse::<http::Uri>().ok().filter(|u| u.authority().is_some_and(|a| !a.as_str().contains('@')));
    uri.as_ref()
        .and_then(crate::sandbox::http_stubs::normal_url)
        .ok_or_else(|| format!("`url` {url:?} is not an absolute http:// or https:// URL"))?;
    let status = match obj.get("status") {
        None => 200,
        Some(s) => s
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .filter(|n| (100..=999).contains(n))
            .ok_or_else(|| format!("`status` is {s}: expected a number from 100 to 999"))?,
    };
    let mut headers = Vec::new();
    match obj.get("headers") {
        None => {}
        Some(Value::Object(entries)) => {
            for (name, value) in entries {
                let value = value.as_str().ok_or_else(|| format!("`headers` {name:?} must be a string"))?;
                http::HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| format!("`headers` {name:?} is not a header name"))?;
                http::HeaderValue::from_str(value)
                    .map_err(|_| format!("`headers` {name:?} has a value a header cannot carry"))?;
                headers.push((name.clone(), value.to_string()));
            }
        }
        Some(_) => return Err("`headers` must be an object of name: value".into()),
    }
    let body = match obj.get("body") {
        None => Vec::new(),
        Some(b) => value_to_bytes(b).map_err(|e| format!("`body`: {e}"))?,
    };
    Ok(HttpStub { method, url: url.to_string(), status, headers, body: body.into() })
}

fn parse_expect(v: &Value) -> Result<Expect, String> {
    let Value::Object(obj) = v else { return Err("`expect` must be an object".into()) };
    let result = match obj.get("result") {
        None => return Err("`expect` has no `result` (ok, retry or reject)".into()),
        Some(r) => r
            .as_str()
            .and_then(Verdict::parse)
            .ok_or_else(|| format!("`expect.result` is {r}: expected \"ok\", \"retry\" or \"reject\""))?,
    };
    let outputs = match obj.get("outputs") {
        None => None,
        Some(Value::Array(list)) => {
            let mut outputs = Vec::with_capacity(list.len());
            for (i, o) in list.iter().enumerate() {
                let subject = o.get("subject").and_then(Value::as_str).filter(|s| !s.is_empty());
                let subject = subject.ok_or_else(|| format!("`expect.outputs[{i}]` has no `subject`"))?;
                // No `data`: an empty payload.
                let data = o.get("data").cloned().unwrap_or_else(|| json!({ "text": "" }));
                value_to_bytes(&data).map_err(|e| format!("`expect.outputs[{i}].data`: {e}"))?;
                outputs.push((subject.to_string(), data));
            }
            Some(outputs)
        }
        Some(_) => return Err("`expect.outputs` must be an array of {subject, data}".into()),
    };
    let kv = match obj.get("kv") {
        None => None,
        Some(Value::Object(entries)) => {
            for (k, v) in entries {
                value_to_bytes(v).map_err(|e| format!("`expect.kv` key {k:?}: {e}"))?;
            }
            Some(entries.clone().into_iter().collect())
        }
        Some(_) => return Err("`expect.kv` must be an object of key: value".into()),
    };
    let http = match obj.get("http") {
        None => None,
        Some(Value::Array(list)) => {
            let mut calls = Vec::with_capacity(list.len());
            for (i, c) in list.iter().enumerate() {
                let call = c.get("call").and_then(Value::as_str).filter(|s| s.contains(' '));
                let call = call.ok_or_else(|| format!("`expect.http[{i}]` has no `call` (\"METHOD url\")"))?;
                let body = c.get("body").cloned().unwrap_or_else(|| json!({ "text": "" }));
                value_to_bytes(&body).map_err(|e| format!("`expect.http[{i}].body`: {e}"))?;
                calls.push((call.to_string(), body));
            }
            Some(calls)
        }
        Some(_) => return Err("`expect.http` must be an array of {call, body}".into()),
    };
    Ok(Expect { result, outputs, kv, http })
}

/// How bytes are written in a case file: their JSON value, `{"text": ...}` or `{"base64": ...}`.
pub fn bytes_to_value(bytes: &[u8]) -> Value {
    if let Ok(v) = serde_json::from_slice::<Value>(bytes)
        && !is_wrapper(&v)
    {
        return v;
    }
    match std::str::from_utf8(bytes) {
        Ok(text) => json!({ "text": text }),
        Err(_) => json!({ "base64": base64_encode(bytes) }),
    }
}

/// The bytes a case-file value stands for (see [`bytes_to_value`]).
pub fn value_to_bytes(v: &Value) -> Result<Vec<u8>, String> {
    if is_wrapper(v) {
        let (k, inner) = v.as_object().and_then(|o| o.iter().next()).expect("a one-key object");
        let text = inner.as_str().ok_or_else(|| format!("`{k}` must be a string"))?;
        return match k.as_str() {
            "text" => Ok(text.as_bytes().to_vec()),
            _ => base64_decode(text).ok_or_else(|| "`base64` is not valid base64".to_string()),
        };
    }
    Ok(serde_json::to_vec(v).expect("re-encoding JSON"))
}

/// `{"text": ...}` or `{"base64": ...}` (a one-key object).
fn is_wrapper(v: &Value) -> bool {
    v.as_object().is_some_and(|o| o.len() == 1 && (o.contains_key("text") || o.contains_key("base64")))
}

/// A case file, read.
#[derive(Debug)]
pub struct CaseFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its cases, in order (blank lines skipped).
    pub cases: Vec<Case>,
}

impl CaseFile {
    /// Reads and checks every line; the first bad one is the error (file, line, what).
    pub fn read(path: &Path) -> Result<Self, CaseError> {
        let text = std::fs::read_to_string(path).map_err(|source| CaseError::Io {
            file: path.to_path_buf(),
            what: "cannot read the case file",
            source,
        })?;
        let mut cases = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            if raw.trim().is_empty() {
                continue;
            }
            let bad = |what: String| CaseError::Line { file: path.to_path_buf(), line, what };
            let v: Value = serde_json::from_str(raw).map_err(|e| bad(format!("not valid JSON: {e}")))?;
            cases.push(Case::parse(line, v).map_err(bad)?);
        }
        Ok(Self { path: path.to_path_buf(), cases })
    }

    /// Replaces the file with `out` at once (its cases, one JSON line each).
    pub fn write_text(&self, out: &str) -> Result<(), CaseError> {
        let io = |what: &'static str| {
            let file = self.path.clone();
            move |source: std::io::Error| CaseError::Io { file, what, source }
        };
        // A temporary of its own: a link planted at a name known in advance (a repo can ship
        // one) would be written through, to any file of the user's.
        let temp = crate::replace_file::temp_beside(&self.path, "plugbus-test");
        crate::replace_file::replace_with(&temp, &self.path, out.as_bytes())
            .map_err(io("cannot replace the case file with the updated one"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_written_as_json_text_or_base64_and_read_back() {
        for bytes in [&br#"{"a":1}"#[..], b"42", b"hello", b"", &[0u8, 255], br#"{"text":"x"}"#] {
            let v = bytes_to_value(bytes);
            assert_eq!(value_to_bytes(&v).unwrap(), bytes, "{v}");
        }
        assert_eq!(bytes_to_value(b"hello"), json!({"text": "hello"}));
        assert!(value_to_bytes(&json!({"base64": "!!"})).unwrap_err().contains("base64"));
    }

    #[test]
    fn a_case_names_what_is_wrong() {
        let ev = json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "subject": "a.b", "data": "x"});
        assert!(Case::parse(1, ev.clone()).unwrap().expect.is_none());
        let no_subject = json!({"id": "1", "source": "s", "type": "t"});
        assert!(Case::parse(1, no_subject).unwrap_err().contains("`subject`"));
        let bad = json!({"event": ev, "expect": {"result": "maybe"}});
        assert!(Case::parse(1, bad).unwrap_err().contains("expect.result"));
        let bad = json!({"event": ev, "expect": {"result": "ok", "outputs": [{"data": 1}]}});
        assert!(Case::parse(1, bad).unwrap_err().contains("outputs[0]"));
        let bad = json!({"event": ev, "kv": {"k": {"base64": "%%"}}});
        assert!(Case::parse(1, bad).unwrap_err().contains("\"k\""));
    }

    #[test]
    fn http_stubs_are_read_with_defaults_and_bad_ones_are_named() {
        let ev = json!({"specversion": "1.0", "id": "1", "source": "s", "type": "t", "subject": "a.b"});
        let stub = |s: Value| Case::parse(1, json!({"event": ev, "http": [s]}));
        let got = stub(json!({"url": "https://api.example.com/x"})).unwrap().http;
        let want = HttpStub {
            method: "GET".into(),
            url: "https://api.example.com/x".into(),
            status: 200,
            headers: vec![],
            body: Default::default(),
        };
        assert_eq!(got, vec![want]);
        let full = json!({"method": "post", "url": "https://a.example/v1", "status": 402,
            "headers": {"content-type": "application/json"}, "body": {"error": "declined"}});
        let got = &stub(full).unwrap().http[0];
        assert_eq!((got.method.as_str(), got.status, &got.body[..]), ("POST", 402, &br#"{"error":"declined"}"#[..]));
        for (bad, says) in [
            (json!({"method": "POST"}), "`http[0]`: no `url`"),
            (json!({"url": "/relative"}), "not an absolute http:// or https:// URL"),
            (json!({"url": "ftp://a.example/x"}), "not an absolute http:// or https:// URL"),
            (json!({"url": "https://user@a.example/x"}), "not an absolute http:// or https:// URL"),
            (json!({"url": "https://a.example", "status": 42}), "`status` is 42"),
            (json!({"url": "https://a.example", "method": "GE T"}), "`method`"),
            (json!({"url": "https://a.example", "headers": {"x": 1}}), "`headers` \"x\" must be a string"),
            (json!({"url": "https://a.example", "headers": {"bad name": "v"}}), "not a header name"),
            (json!({"url": "https://a.example", "body": {"base64": "%%"}}), "`body`"),
            (json!("https://a.example"), "a stub must be an object"),
        ] {
            let err = stub(bad.clone()).unwrap_err();
            assert!(err.contains(says), "{bad}: {err}");
        }
        let bad = json!({"event": ev, "expect": {"result": "ok", "http": [{"body": 1}]}});
        assert!(Case::parse(1, bad).unwrap_err().contains("`expect.http[0]` has no `call`"));
    }
}
