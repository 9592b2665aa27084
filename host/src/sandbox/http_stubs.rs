//! Outbound HTTP answered from stubs, for repeatable runs (`plugbus test`): a call the policy
//! admitted (the manifest asks for its destination, within the per-event limits and the
//! event's deadline, with the host's `Idempotency-Key`) gets the first unused stub with its
//! method and URL instead of a connection. Every call is recorded, refused ones too, so a case
//! can say which calls its handler made. URLs compare by scheme and host (without case), port
//! (the scheme's default when absent), path and query (exactly, `/` when empty); methods
//! exactly as sent.
//!
//! Never: open a connection or resolve a name, answer a call the policy refused, or answer one
//! call with a stub already used (a handler calling twice needs two stubs).

use super::limits::Limits;
use super::outbound::REFUSED_PREFIX;
use bytes::Bytes;
use http_body_util::BodyExt;
use std::sync::{Arc, Mutex};
use wasmtime_wasi_http::{Error, WasiBody};

/// One canned response: for the first call with this method and URL not answered yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpStub {
    /// The method it answers (compared without case).
    pub method: String,
    /// The URL it answers, as the handler sends it (`https://api.example.com/v1/charges`).
    pub url: String,
    /// The response's status.
    pub status: u16,
    /// The response's headers.
    pub headers: Vec<(String, String)>,
    /// The response's body.
    pub body: Bytes,
}

/// `uri` as stubs compare it: `scheme://host:port/path?query`, scheme and host in lower case,
/// the scheme's default port when it names none; `None` unless it is an absolute `http` or
/// `https` URL.
pub fn normal_url(uri: &http::Uri) -> Option<String> {
    let scheme = uri.scheme_str()?.to_ascii_lowercase();
    let default = match scheme.as_str() {
        "http" => 80,
        "https" => 443,
        _ => return None,
    };
    let host = uri.host()?.to_ascii_lowercase();
    let port = uri.port_u16().unwrap_or(default);
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let path = if path.is_empty() { "/" } else { path };
    Some(format!("{scheme}://{host}:{port}{path}"))
}

/// One call a handler made (answered by a stub or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    /// Its method, as sent.
    pub method: String,
    /// Its URL.
    pub url: String,
    /// Its body.
    pub body: Bytes,
    /// The `Idempotency-Key` the host gave it (empty when the policy refused the call).
    pub idempotency_key: String,
}

/// The stubs of one run and the calls made in it.
#[derive(Debug, Default)]
pub struct HttpStubs {
    /// Each stub, its URL as calls are compared (`normal_url`), and whether it answered a call
    /// already.
    stubs: Mutex<Vec<(HttpStub, Option<String>, bool)>>,
    calls: Mutex<Vec<HttpCall>>,
}

type SendResult =
    wasmtime_wasi_http::Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>)>;

impl HttpStubs {
    /// Stubs for one run.
    pub fn new(stubs: Vec<HttpStub>) -> Arc<Self> {
        let stubs = stubs
            .into_iter()
            .map(|s| {
                let url = s.url.parse().ok().as_ref().and_then(normal_url);
                (s, url, false)
            })
            .collect();
        Arc::new(Self { stubs: Mutex::new(stubs), calls: Mutex::default() })
    }

    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<HttpCall> {
        self.calls.lock().expect("stub calls poisoned").clone()
    }

    /// Records a call the policy refused (its body is not read).
    pub(super) fn refused(&self, method: String, url: String) {
        let call = HttpCall { method, url, body: Bytes::new(), idempotency_key: String::new() };
        self.calls.lock().expect("stub calls poisoned").push(call);
    }

    /// Answers an admitted `request` (its idempotency key set) from the first unused matching
    /// stub, within the request and response byte limits; a call no stub answers is refused.
    pub(super) async fn answer(&self, request: http::Request<WasiBody>, limits: &Limits) -> SendResult {
        let (parts, body) = request.into_parts();
        let method = parts.method.as_str().to_string();
        let url = parts.uri.to_string();
        let cap = limits.max_outbound_request_bytes;
        let body = match http_body_util::Limited::new(body, cap as usize).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                self.refused(method, url);
                return Err(match e.downcast::<Error>() {
                    Ok(inner) => *inner,
                    Err(_) => Error::HttpRequestBodySize(None),
                });
            }
        };
        let wanted = normal_url(&parts.uri);
        let idempotency_key = parts
            .headers
            .get(super::outbound::IDEMPOTENCY_KEY)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        self.calls.lock().expect("stub calls poisoned").push(HttpCall {
            method: method.clone(),
            url: url.clone(),
            body,
            idempotency_key,
        });
        let stub = {
            let mut stubs = self.stubs.lock().expect("stubs poisoned");
            let found =
                stubs.iter_mut().find(|(s, url, used)| !*used && s.method == method && url.is_some() && *url == wanted);
            found.map(|(stub, _, used)| {
                *used = true;
                stub.clone()
            })
        };
        let Some(stub) = stub else {
            tracing::warn!("outbound request refused: no stub for {method} {url} is left in the case");
            return Err(Error::InternalError(Some(format!(
                "{REFUSED_PREFIX}no stub for {method} {url} is left in the case (`http`: [{{\"method\", \"url\", \"status\", \"body\"}}])"
            ))));
        };
        let max = limits.max_outbound_response_bytes;
        if stub.body.len() as u64 > max {
            return Err(Error::HttpResponseBodySize(Some(stub.body.len() as u64)));
        }
        let mut response = http::Response::builder().status(stub.status);
        for (name, value) in &stub.headers {
            response = response.header(name, value);
        }
        let body = http_body_util::Full::new(stub.body).map_err(|never| match never {}).boxed_unsync();
        let response = response.body(body).map_err(|e| {
            Error::InternalError(Some(format!("{REFUSED_PREFIX}the stub for {method} {url} is not a response: {e}")))
        })?;
        let done: Box<dyn Future<Output = Result<(), Error>> + Send> = Box::new(async { Ok(()) });
        Ok((response, done))
    }
}

#[cfg(test)]
mod tests {
    use super::normal_url;

    #[test]
    fn urls_compare_by_what_they_name() {
        let n = |u: &str| normal_url(&u.parse().unwrap());
        let same = ["https://API.Example.com/v1/x?a=1", "HTTPS://api.example.com:443/v1/x?a=1"];
        assert_eq!(n(same[0]), n(same[1]));
        assert_eq!(n("https://a.example"), n("https://a.example/"), "an empty path is /");
        assert_eq!(n("http://a.example/x").unwrap(), "http://a.example:80/x");
        assert_ne!(n("https://a.example/x?a=1"), n("https://a.example/x?a=2"), "the query matches exactly");
        assert_ne!(n("https://a.example/X"), n("https://a.example/x"), "the path too");
        assert_ne!(n("http://a.example/x"), n("https://a.example/x"));
        assert_eq!(n("ftp://a.example/x"), None);
        assert_eq!(n("/x"), None);
    }
}
