//! Outbound HTTP answered from stubs, for repeatable runs (`plugbus test`): a call the policy
//! admitted (the manifest asks for its destination, within the per-event limits, with the
//! host's `Idempotency-Key`) gets the first unused stub with its method and URL instead of a
//! connection, and is recorded, so a case can say which calls its handler made.
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

/// One call a handler made (answered by a stub or not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    /// Its method, upper case.
    pub method: String,
    /// Its URL.
    pub url: String,
    /// Its body.
    pub body: Bytes,
    /// The `Idempotency-Key` the host gave it.
    pub idempotency_key: String,
}

/// The stubs of one run and the calls made in it.
#[derive(Debug, Default)]
pub struct HttpStubs {
    /// Each stub and whether it answered a call already.
    stubs: Mutex<Vec<(HttpStub, bool)>>,
    calls: Mutex<Vec<HttpCall>>,
}

type SendResult =
    wasmtime_wasi_http::Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>)>;

impl HttpStubs {
    /// Stubs for one run.
    pub fn new(stubs: Vec<HttpStub>) -> Arc<Self> {
        Arc::new(Self { stubs: Mutex::new(stubs.into_iter().map(|s| (s, false)).collect()), calls: Mutex::default() })
    }

    /// The calls made so far, in order.
    pub fn calls(&self) -> Vec<HttpCall> {
        self.calls.lock().expect("stub calls poisoned").clone()
    }

    /// Answers an admitted `request` (its idempotency key set) from the first unused matching
    /// stub, within the request and response byte limits; a call no stub answers is refused.
    pub(super) async fn answer(&self, request: http::Request<WasiBody>, limits: &Limits) -> SendResult {
        let (parts, body) = request.into_parts();
        let cap = limits.max_outbound_request_bytes;
        let body = match http_body_util::Limited::new(body, cap as usize).collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return Err(Error::HttpRequestBodySize(None)),
        };
        let method = parts.method.as_str().to_ascii_uppercase();
        let url = parts.uri.to_string();
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
                stubs.iter_mut().find(|(s, used)| !*used && s.method.eq_ignore_ascii_case(&method) && s.url == url);
            found.map(|(stub, used)| {
                *used = true;
                stub.clone()
            })
        };
        let Some(stub) = stub else {
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
