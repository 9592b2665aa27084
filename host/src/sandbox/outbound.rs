//! Outbound HTTP: the policy a plugin's `wasi:http/outgoing-handler` calls go through, applied in
//! the one hook `wasmtime-wasi-http` offers for it ([`WasiHttpHooks::send_request`]).
//!
//! Deny by default. A call goes out only when the plugin's manifest asked for its destination
//! (`outbound`) and the operator granted it (`allowed_outbound`): both must allow the scheme, the
//! host and the port. The host name is resolved once, here; every address it resolves to must be
//! public (not loopback, private, link-local, CGNAT, unspecified, multicast or the cloud metadata
//! address) unless the destination was granted by that exact address (an IP literal), and the
//! connection goes to the address that was checked (no second lookup: DNS rebinding). Redirects
//! are never followed here: a 3xx goes back to the guest, whose next call passes the same checks.
//!
//! Per attempt: at most `max_outbound_requests` calls; request and response bodies capped; each
//! call ends by `outbound_timeout` and never after the event's deadline. Per plugin: at most
//! `max_outbound_concurrency` calls in flight. Every request carries an `Idempotency-Key` derived
//! from (event id, plugin, call index in the attempt): the same on every retry and redelivery.
//!
//! Must never: connect to an address it did not check, follow a redirect itself, or let a
//! guest-set `Idempotency-Key` through in place of the host's.

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use sha2::{Digest, Sha256};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use wasmtime_wasi_http::io::TokioIo;
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use super::breaker::Breakers;
use super::limits::Limits;
use super::lookup::Lookups;
use std::sync::atomic::{AtomicBool, Ordering};

/// How long a connection's I/O may outlive its request's end time (see `send`).
const CONN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// The most bytes a response's head (status line and headers) may take, and the connection's
/// read buffer, which the head's values are slices of (review 56c M1: hyper's defaults, ~408 KiB
/// and 100 headers, let a granted server make each of an attempt's 16 calls hold 408 KiB in the
/// host, outside every limit, for as long as the plugin kept the response). A larger head is
/// `HttpError::TooLarge` ("response headers").
pub const RESPONSE_HEAD_BYTES: usize = 64 * 1024;

/// The most headers a response may have.
pub const RESPONSE_HEADERS: usize = 100;

/// The header every outbound request carries.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// What a guest sees in `internal-error` when the host refuses a call (the SDK reads it).
pub const REFUSED_PREFIX: &str = "plugbus refused: ";

/// What a guest sees in `internal-error` when a breaker is open:
/// `plugbus circuit open: <host> retry_after_ms=<n>` (the SDK reads it).
pub const CIRCUIT_OPEN_PREFIX: &str = "plugbus circuit open: ";

/// One allowed destination: `scheme://host[:port]` (port `*`: any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    scheme: String,
    host: String,
    /// `None`: any port.
    port: Option<u16>,
}

/// Why a destination rule does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{rule:?} is not a destination: {why} (expected scheme://host[:port], e.g. \"https://api.example.com\")")]
pub struct RuleError {
    rule: String,
    why: &'static str,
}

impl Rule {
    /// Parses `http(s)://host[:port|:*]` (a trailing `/` allowed; no path, user or query).
    pub fn parse(text: &str) -> Result<Self, RuleError> {
        let err = |why| RuleError { rule: text.to_string(), why };
        let (scheme, rest) = text.split_once("://").ok_or(err("no scheme"))?;
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(err("the scheme must be http or https"));
        }
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.is_empty() || rest.contains(['/', '?', '#', '@']) || rest.chars().any(char::is_whitespace) {
            return Err(err("only scheme, host and port, no path, query or user"));
        }
        let (host, port) = split_host_port(rest).ok_or(err("bad host or port"))?;
        let port = match port {
            None => Some(default_port(&scheme)),
            Some("*") => None,
            Some(p) => Some(p.parse::<u16>().map_err(|_| err("bad port"))?),
        };
        Ok(Self { scheme, host: host.to_ascii_lowercase(), port })
    }

    fn allows(&self, scheme: &str, host: &str, port: u16) -> bool {
        self.scheme == scheme && self.host == host && self.port.is_none_or(|p| p == port)
    }
}

fn default_port(scheme: &str) -> u16 {
    if scheme == "https" { 443 } else { 80 }
}

/// `host[:port]`, IPv6 literals in brackets; the host without brackets.
fn split_host_port(s: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = s.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        return match after {
            "" => Some((host, None)),
            a => Some((host, Some(a.strip_prefix(':')?))),
        };
    }
    match s.split_once(':') {
        Some((h, p)) if !h.is_empty() && !p.contains(':') => Some((h, Some(p))),
        Some(_) => None,
        None => Some((s, None)),
    }
}

/// A plugin's outbound HTTP as `/v1/plugins` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutboundInfo {
    /// What its manifest asks for.
    pub requested: Vec<String>,
    /// What the operator grants.
    pub granted: Vec<String>,
    /// Its breakers that have seen a failure, by host.
    pub breakers: Vec<super::breaker::BreakerView>,
}

/// One plugin's outbound policy, shared by all its attempts.
pub struct OutboundPolicy {
    /// What the manifest asked for, as written.
    pub requested: Vec<String>,
    /// What the operator granted, as written.
    pub granted: Vec<String>,
    requested_rules: Vec<Rule>,
    granted_rules: Vec<Rule>,
    slots: Arc<Semaphore>,
    /// Its DNS lookups in flight, counted until they return (see `lookup`): the plugin's, shared
    /// by every loaded version of it ([`OutboundPolicy::sharing_lookups`]).
    lookups: Arc<Lookups>,
    /// Its circuit breakers, per destination host.
    pub breakers: Breakers,
}

impl OutboundPolicy {
    /// The policy for a plugin asking for `requested` and granted `granted` (both already
    /// checked with [`Rule::parse`]; an entry that does not parse allows nothing).
    pub fn new(requested: &[String], granted: &[String], limits: &Limits) -> Self {
        let rules = |l: &[String]| l.iter().filter_map(|r| Rule::parse(r).ok()).collect::<Vec<_>>();
        Self {
            requested: requested.to_vec(),
            granted: granted.to_vec(),
            requested_rules: rules(requested),
            granted_rules: rules(granted),
            slots: Arc::new(Semaphore::new(limits.max_outbound_concurrency.max(1) as usize)),
            lookups: Arc::new(Lookups::new(limits.max_outbound_concurrency as usize)),
            breakers: Breakers::new(limits.outbound_breaker_failures, limits.outbound_breaker_cooldown),
        }
    }

    /// The policy counting its DNS lookups in `lookups` (its plugin's, which every loaded
    /// version of it shares: review 62d F4, a plugin reloading itself took the host's reserved
    /// lookups once a version).
    pub(super) fn sharing_lookups(self, lookups: Arc<Lookups>) -> Self {
        Self { lookups, ..self }
    }

    /// What `/v1/plugins` shows: requested, granted and the breakers that have seen failures;
    /// `None` for a plugin that asks for nothing and is granted nothing.
    pub fn info(&self) -> Option<OutboundInfo> {
        if self.requested.is_empty() && self.granted.is_empty() {
            return None;
        }
        Some(OutboundInfo {
            requested: self.requested.clone(),
            granted: self.granted.clone(),
            breakers: self.breakers.views(),
        })
    }

    /// No outbound access at all.
    pub fn none() -> Self {
        Self::new(&[], &[], &Limits::default())
    }

    /// Whether some destination is both requested and granted (or could be: rules overlap).
    pub fn any_granted(&self) -> bool {
        self.requested_rules.iter().any(|r| {
            self.granted_rules.iter().any(|g| {
                r.scheme == g.scheme && r.host == g.host && (r.port.is_none() || g.port.is_none() || r.port == g.port)
            })
        })
    }

    /// Why `scheme://host:port` may not be called, if it may not.
    fn check(&self, plugin: &str, scheme: &str, host: &str, port: u16) -> Result<(), String> {
        let dest = format!("{scheme}://{host}:{port}");
        if !self.requested_rules.iter().any(|r| r.allows(scheme, host, port)) {
            return Err(format!("{dest} is not in the plugin's manifest `outbound` list"));
        }
        if !self.granted_rules.iter().any(|r| r.allows(scheme, host, port)) {
            return Err(format!("{dest} is not granted to the plugin (operator: [plugins.{plugin}] allowed_outbound)"));
        }
        Ok(())
    }
}

/// Why an address is not a public one, if it is not.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if o == [169, 254, 169, 254] {
                Some("the cloud metadata address")
            } else if o == [168, 63, 129, 16] {
                // Azure's host address (wireserver: the VM agent's channel, its health probes),
                // reachable from every Azure VM though it is a public address.
                Some("the Azure host address")
            } else if v4.is_link_local() {
                Some("link-local")
            } else if v4.is_private() {
                Some("private")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("shared (CGNAT)")
            } else if o[..3] == [192, 0, 0] && !matches!(o[3], 9 | 10) {
                // IETF protocol assignments, among them 192.0.0.192 (a cloud's metadata address);
                // .9 and .10 are global anycast services.
                Some("reserved for protocol assignments")
            } else if o[0] == 198 && (o[1] & 0xfe) == 18 {
                Some("reserved for benchmarking")
            } else if matches!(o[..3], [192, 0, 2] | [198, 51, 100] | [203, 0, 113]) {
                Some("documentation")
            } else if v4.is_unspecified() || o[0] == 0 {
                Some("unspecified")
            } else if v4.is_broadcast() || v4.is_multicast() || o[0] >= 240 {
                Some("broadcast, multicast or reserved")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return non_public(IpAddr::V4(v4));
            }
            let s = v6.segments();
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("private (unique local)")
            } else if (s[0] & 0xffc0) == 0xfec0 {
                Some("site-local")
            } else if s[..6] == [0, 0, 0, 0, 0xffff, 0] {
                // IPv4-translated (`::ffff:0:a.b.c.d`): the embedded one.
                let v4 = std::net::Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
                non_public(IpAddr::V4(v4))
            } else if v6.is_multicast() {
                Some("multicast")
            } else if s[..6] == [0; 6] {
                // IPv4-compatible (`::127.0.0.1`, deprecated but still parsed): the embedded one.
                let v4 = std::net::Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
                non_public(IpAddr::V4(v4))
            } else if s[0] == 0x2002 {
                // 6to4 carries an IPv4 address in its second and third segments.
                let v4 = std::net::Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8);
                non_public(IpAddr::V4(v4))
            } else if s[0] == 0x2001 && s[1] == 0x0db8 {
                Some("documentation")
            } else if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
                Some("local-use NAT64")
            } else if s[0] == 0x64 && s[1] == 0xff9b {
                // NAT64 of an IPv4 address: judge the embedded one.
                let v4 = std::net::Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
                non_public(IpAddr::V4(v4))
            } else {
                None
            }
        }
    }
}

/// The idempotency key of call `index` (0-based, within one attempt) of `plugin` on the event
/// `event_id` from `event_source`: hex of the first 16 bytes of a SHA-256 over the four, each
/// length-prefixed. The source is in it because CloudEvents ids are unique per source only: two
/// producers' events with the same id shared keys (v1), and a provider answered the second
/// event's call with the first one's effect (review 55b M1).
pub fn idempotency_key(event_source: &str, event_id: &str, plugin: &str, index: u32) -> String {
    let mut h = Sha256::new();
    h.update(b"plugbus idempotency v2\0");
    for part in [event_source.as_bytes(), event_id.as_bytes(), plugin.as_bytes()] {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.update(index.to_be_bytes());
    h.finalize()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// The per-attempt side of the policy: the `wasi:http` hooks of one store.
pub struct Outbound {
    policy: Arc<OutboundPolicy>,
    plugin: Arc<str>,
    limits: Limits,
    /// The event being handled.
    pub event_id: String,
    /// Its source (with its id, what names it: the `Idempotency-Key`'s).
    pub event_source: String,
    /// Calls made in this attempt.
    pub calls: u32,
    /// Calls of this attempt that passed the policy and its breakers: what a run again would
    /// make again.
    pub sent: u32,
    /// Calls refused in this attempt: only the first [`super::state::MAX_LOGGED_REFUSALS`] are
    /// logged (the handler gets each as its call's error).
    pub refusals: u32,
    /// When the event's deadline passes (set before every call).
    pub deadline: Instant,
    /// A repeatable run (`plugbus test`, `dlq debug`): nothing goes out; a call is answered
    /// from `stubs` when there are some, else refused.
    pub offline: bool,
    /// The stubs answering calls in a repeatable run (`plugbus test`'s case `http`; set only
    /// with `offline`).
    pub stubs: Option<Arc<super::http_stubs::HttpStubs>>,
    /// The longest `retry_after` of the calls this attempt's open breakers refused (`None`:
    /// none was refused): when the attempt then asks to retry, dispatch waits at least this long
    /// and runs it again without charging an attempt (`fate::decide`).
    pub circuit_open: Option<std::time::Duration>,
}

impl Outbound {
    /// Hooks for one attempt of `plugin`.
    pub fn new(policy: Arc<OutboundPolicy>, plugin: Arc<str>, limits: &Limits, event_id: &str) -> Self {
        Self {
            policy,
            plugin,
            limits: limits.clone(),
            event_id: event_id.to_string(),
            event_source: String::new(),
            calls: 0,
            sent: 0,
            refusals: 0,
            deadline: super::limits::tokio_instant_in(limits.deadline),
            offline: false,
            stubs: None,
            circuit_open: None,
        }
    }

    /// The error for a refused call, logged while the attempt has refusals left to log (a
    /// handler looping on a refused call wrote a warning per call, millions per event).
    fn refuse(&mut self, reason: String) -> Error {
        self.refusals = self.refusals.saturating_add(1);
        let max = super::state::MAX_LOGGED_REFUSALS;
        let (plugin, event_id) = (&*self.plugin, &self.event_id);
        if self.refusals <= max {
            tracing::warn!(plugin, event_id, "outbound request refused: {}", crate::event::cut(&reason));
        } else if self.refusals == max + 1 {
            tracing::warn!(
                plugin,
                event_id,
                "outbound request refused; this attempt's further refused outbound \
                requests are not logged (its handler gets each as its call's error; {max} were logged)"
            );
        }
        Error::InternalError(Some(format!("{REFUSED_PREFIX}{reason}")))
    }

    /// The checks that need no network; the request with its idempotency key and where to go.
    fn admit(&mut self, mut request: http::Request<WasiBody>) -> Result<(http::Request<WasiBody>, Target), Error> {
        let index = self.calls;
        self.calls += 1;
        let stubbed = self.stubs.is_some();
        if self.offline && !stubbed {
            return Err(self.refuse("outbound HTTP is off in repeatable runs (`plugbus test`, `dlq debug`)".into()));
        }
        if self.calls > self.limits.max_outbound_requests {
            return Err(self
                .refuse(format!("outbound request limit of {} per event reached", self.limits.max_outbound_requests)));
        }
        let uri = request.uri();
        let scheme = uri.scheme_str().unwrap_or("https").to_ascii_lowercase();
        let Some(host) = uri.host().map(|h| h.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase())
        else {
            return Err(self.refuse("the request has no host".into()));
        };
        // The allow-list checks the host alone, but the whole authority would go out as the
        // `Host` header (`user:pass@granted.host`), for a front end to route as it reads it.
        if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
            return Err(self
                .refuse("the URL carries a user name or password (`user@host`): send credentials in a header".into()));
        }
        let port = uri.port_u16().unwrap_or(default_port(&scheme));
        if let Err(why) = self.policy.check(&self.plugin, &scheme, &host, port) {
            return Err(self.refuse(why));
        }
        let cap = self.limits.max_outbound_request_bytes;
        if let Some(len) = request.body().size_hint().exact().filter(|&n| n > cap) {
            tracing::warn!(plugin = %self.plugin, event_id = %self.event_id, "outbound request body of {len} bytes is over the {cap}-byte limit");
            return Err(Error::HttpRequestBodySize(Some(len)));
        }
        // Stubs never fail as a destination: a repeatable run leaves the breakers alone.
        let breaker = if stubbed { Ok(false) } else { self.policy.breakers.admit(&host) };
        let probe = match breaker {
            Ok(probe) => probe,
            Err(retry_after) => {
                tracing::warn!(plugin = %self.plugin, event_id = %self.event_id, host, "outbound request failed at once: circuit open");
                self.circuit_open = Some(self.circuit_open.map_or(retry_after, |r| r.max(retry_after)));
                let ms = retry_after.as_millis();
                return Err(Error::InternalError(Some(format!("{CIRCUIT_OPEN_PREFIX}{host} retry_after_ms={ms}"))));
            }
        };
        let key = idempotency_key(&self.event_source, &self.event_id, &self.plugin, index);
        request
            .headers_mut()
            .insert(IDEMPOTENCY_KEY, http::HeaderValue::from_str(&key).expect("hex is a header value"));
        let ends = super::limits::tokio_instant_in(self.limits.outbound_timeout).min(self.deadline);
        self.sent += 1;
        Ok((request, Target { scheme, host, port, ends, probe }))
    }
}

/// Where one admitted request goes and by when it must be done.
struct Target {
    scheme: String,
    host: String,
    port: u16,
    ends: Instant,
    /// Whether this call is its breaker's half-open probe.
    probe: bool,
}

type SendResult =
    wasmtime_wasi_http::Result<(http::Response<WasiBody>, Box<dyn Future<Output = Result<(), Error>> + Send>)>;

impl WasiHttpHooks for Outbound {
    /// What a body not yet sent holds: see [`super::limits::OUTGOING_BODY_CHUNK_BYTES`].
    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        1
    }

    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        super::limits::OUTGOING_BODY_CHUNK_BYTES
    }

    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        _options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> Box<dyn Future<Output = SendResult> + Send> {
        if let Some(stubs) = self.stubs.clone() {
            let (method, url) = (request.method().to_string(), request.uri().to_string());
            let admitted = self.admit(request);
            let limits = self.limits.clone();
            return Box::new(async move {
                let (request, target) = match admitted {
                    Ok(admitted) => admitted,
                    Err(refused) => {
                        stubs.refused(method, url);
                        return Err(refused);
                    }
                };
                // The event's deadline bounds a stubbed call too (a body never finished).
                match tokio::time::timeout_at(target.ends, stubs.answer(request, &limits)).await {
                    Ok(answered) => answered,
                    Err(_) => Err(Error::ConnectionTimeout),
                }
            });
        }
        let admitted = self.admit(request);
        let (slots, limits, policy) = (self.policy.slots.clone(), self.limits.clone(), self.policy.clone());
        let (plugin, event_id) = (self.plugin.clone(), self.event_id.clone());
        Box::new(async move {
            let (request, target) = admitted?;
            let refuse = |reason: String| {
                tracing::warn!(plugin = %plugin, event_id = %event_id, "outbound request refused: {reason}");
                Error::InternalError(Some(format!("{REFUSED_PREFIX}{reason}")))
            };
            let ends = target.ends;
            // Until the call has its slot and its lookup's permits it waits in the host.
            let in_host = AtomicBool::new(true);
            let sending = send(request, &target, (slots, &policy.lookups), &limits, &refuse, &in_host);
            let result = match tokio::time::timeout_at(ends, sending).await {
                Ok(r) => r,
                Err(_) => {
                    tracing::warn!(plugin = %plugin, event_id = %event_id, host = %target.host,
                        waiting_in_the_host = in_host.load(Ordering::Relaxed), "outbound request timed out");
                    Err(Error::ConnectionTimeout)
                }
            };
            // The breaker counts what the destination did, not the host's own refusals or waits.
            let (breakers, host) = (&policy.breakers, target.host.as_str());
            match &result {
                Err(_) if in_host.load(Ordering::Relaxed) => breakers.release(host, target.probe),
                Ok((response, _)) => breakers.record(host, response.status().as_u16() < 500, target.probe),
                Err(Error::InternalError(_) | Error::HttpRequestBodySize(_) | Error::HttpResponseBodySize(_)) => {
                    breakers.release(host, target.probe)
                }
                Err(_) => breakers.record(host, false, target.probe),
            }
            result
        })
    }
}

/// Sends one admitted request: waits for a slot, reads the body within its cap, resolves and
/// checks the host, connects to the checked address, sends, and caps the response. `in_host`
/// is cleared once it no longer waits for the host (a slot, a lookup's permits).
async fn send(
    request: http::Request<WasiBody>,
    target: &Target,
    (slots, lookups): (Arc<Semaphore>, &Lookups),
    limits: &Limits,
    refuse: &(dyn Fn(String) -> Error + Send + Sync),
    in_host: &AtomicBool,
) -> SendResult {
    let permit = slots.acquire_owned().await.map_err(|_| Error::ConnectionLimitReached)?;
    let (mut parts, body) = request.into_parts();
    let cap = limits.max_outbound_request_bytes;
    let body = match http_body_util::Limited::new(body, cap as usize).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return Err(match e.downcast::<Error>() {
                Ok(inner) => *inner,
                Err(_) => {
                    tracing::warn!("outbound request body over the {cap}-byte limit");
                    Error::HttpRequestBodySize(None)
                }
            });
        }
    };
    let addr = resolve(target, lookups, refuse, || in_host.store(false, Ordering::Relaxed)).await?;
    let tcp = tokio::net::TcpStream::connect(addr).await.map_err(Error::Connect)?;
    let io: Box<dyn Io> = if target.scheme == "https" {
        let name = rustls_pki_name(&target.host)?;
        Box::new(tls().connect(name, tcp).await.map_err(Error::Tls)?)
    } else {
        Box::new(tcp)
    };
    let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
        .max_buf_size(RESPONSE_HEAD_BYTES)
        .max_header_size(RESPONSE_HEAD_BYTES)
        .max_headers(RESPONSE_HEADERS)
        .handshake(TokioIo::new(io))
        .await?;
    parts.uri = http::Uri::builder()
        .path_and_query(parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .build()
        .map_err(|_| Error::HttpRequestUriInvalid)?;
    let body = http_body_util::Full::new(body).map_err(|never| match never {}).boxed_unsync();
    // The connection's I/O runs on its own task, never past the request's end time.
    // (A second past it: the request's own timeout, not the connection's end, must say "timeout".)
    let conn = tokio::spawn(tokio::time::timeout_at(target.ends + CONN_GRACE, conn));
    let conn: Box<dyn Future<Output = Result<(), Error>> + Send> = Box::new(async move {
        match conn.await {
            Ok(Ok(done)) => done.map_err(Error::from),
            Ok(Err(_)) => Err(Error::ConnectionReadTimeout),
            Err(_) => Ok(()),
        }
    });
    let response = match sender.send_request(http::Request::from_parts(parts, body)).await {
        Ok(r) => r,
        // The connection ended because the request's time was up.
        Err(_) if Instant::now() >= target.ends => return Err(Error::ConnectionTimeout),
        Err(e) if e.is_parse_too_large() => {
            return Err(Error::HttpResponseHeaderSectionSize(Some(RESPONSE_HEAD_BYTES as u32)));
        }
        Err(e) => return Err(e.into()),
    };
    let max = limits.max_outbound_response_bytes;
    if let Some(len) = response.body().size_hint().exact().filter(|&n| n > max) {
        return Err(Error::HttpResponseBodySize(Some(len)));
    }
    let response = response.map(|incoming| {
        CappedBody {
            inner: incoming,
            left: max,
            deadline: Box::pin(tokio::time::sleep_until(target.ends)),
            _permit: permit,
        }
        .boxed_unsync()
    });
    Ok((response, conn))
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// The one address the request goes to: the host itself when it is an IP literal (granted by
/// exact address, so any kind); otherwise the first address the name resolves to, where every
/// address it resolves to must be public.
/// `admitted` is called once nothing is waited for in the host any more.
async fn resolve(
    target: &Target,
    lookups: &Lookups,
    refuse: &(dyn Fn(String) -> Error + Send + Sync),
    admitted: impl FnOnce(),
) -> Result<SocketAddr, Error> {
    if let Ok(ip) = target.host.parse::<IpAddr>() {
        admitted();
        return Ok(SocketAddr::new(ip, target.port));
    }
    let addrs = lookups.resolve(&target.host, target.port, admitted).await.map_err(|e| match e {
        super::lookup::LookupError::Resolver(e) => Error::DnsError { rcode: Some(e.to_string()), info_code: None },
        e @ super::lookup::LookupError::Host(_) => Error::InternalError(Some(e.to_string())),
    })?;
    if let Some((addr, why)) = addrs.iter().find_map(|a| non_public(a.ip()).map(|w| (a, w))) {
        return Err(refuse(format!(
            "{} resolves to {} ({why}): such an address is reachable only when granted by exact address",
            target.host,
            addr.ip()
        )));
    }
    addrs.first().copied().ok_or(Error::DestinationNotFound)
}

fn rustls_pki_name(host: &str) -> Result<tokio_rustls::rustls::pki_types::ServerName<'static>, Error> {
    tokio_rustls::rustls::pki_types::ServerName::try_from(host.to_string())
        .map_err(|_| Error::DnsError { rcode: Some("invalid DNS name".into()), info_code: None })
}

/// The TLS client: the system's roots, ring, made once.
fn tls() -> tokio_rustls::TlsConnector {
    static CONFIG: OnceLock<Arc<tokio_rustls::rustls::ClientConfig>> = OnceLock::new();
    let config = CONFIG.get_or_init(|| {
        let mut roots = tokio_rustls::rustls::RootCertStore::empty();
        for cert in rustls_native_certs::load_native_certs().certs {
            let _ = roots.add(cert);
        }
        let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
        let config = tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("ring supports the default versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    });
    tokio_rustls::TlsConnector::from(config.clone())
}

/// A response body cut at its byte cap and at the request's end time; holds the plugin's
/// concurrency slot until it is read or dropped.
struct CappedBody {
    inner: hyper::body::Incoming,
    left: u64,
    deadline: Pin<Box<tokio::time::Sleep>>,
    _permit: OwnedSemaphorePermit,
}

impl Body for CappedBody {
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    let n = data.len() as u64;
                    if n > self.left {
                        return Poll::Ready(Some(Err(Error::HttpResponseBodySize(None))));
                    }
                    self.left -= n;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Error::Hyper(e)))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match self.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(Error::ConnectionReadTimeout))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_match_scheme_host_and_port() {
        let r = Rule::parse("https://API.example.com").unwrap();
        assert!(r.allows("https", "api.example.com", 443));
        assert!(!r.allows("http", "api.example.com", 443));
        assert!(!r.allows("https", "api.example.com", 8443));
        assert!(!r.allows("https", "evil.example.com", 443));
        let any = Rule::parse("http://127.0.0.1:*").unwrap();
        assert!(any.allows("http", "127.0.0.1", 1234));
        assert!(Rule::parse("http://[::1]:8080/").unwrap().allows("http", "::1", 8080));
        for bad in ["api.example.com", "ftp://x", "https://x/path", "https://u@x", "https://x:99999", "https://"] {
            assert!(Rule::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn special_addresses_are_not_public() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
            "::a9fe:a9fe",
            "2002:7f00:1::1",
            "2002:a9fe:a9fe::",
            "2001:db8::1",
            "192.0.0.192",
            "192.0.0.8",
            "198.18.0.1",
            "198.19.255.255",
            "192.0.2.1",
            "203.0.113.7",
            "fec0::1",
            "::ffff:0:127.0.0.1",
            "::ffff:0:a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "168.63.129.16",
            "::ffff:168.63.129.16",
        ] {
            assert!(non_public(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in
            ["93.184.216.34", "2606:4700::1111", "8.8.8.8", "2002:5db8:d822::1", "198.20.0.1", "192.0.1.1", "192.0.0.9"]
        {
            assert!(non_public(ip.parse().unwrap()).is_none(), "{ip}");
        }
    }

    /// The allow-list checks the host alone, and the whole authority went out as `Host`:
    /// `x:y@granted.host` reached the server as `Host: x:y@granted.host`.
    #[tokio::test]
    async fn a_url_with_a_user_name_is_refused() {
        let limits = Limits::default();
        let granted = ["http://127.0.0.1:9".to_string()];
        let policy = Arc::new(OutboundPolicy::new(&granted, &granted, &limits));
        let mut hooks = Outbound::new(policy, "p".into(), &limits, "e1");
        let body = http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync();
        let request = http::Request::get("http://x:y@127.0.0.1:9/x").body(body).unwrap();
        let sent = Box::into_pin(hooks.send_request(request, None, Box::new(async { Ok(()) }))).await;
        let Err(Error::InternalError(Some(why))) = sent else { panic!("not refused: {:?}", sent.err()) };
        assert!(why.contains("carries a user name or password"), "{why}");
    }

    /// A call that runs out of time while it waits in the host (its plugin's slots all taken,
    /// the host's lookups all busy) is not counted against the destination's breaker: the
    /// host's own stall would otherwise open a healthy provider's breaker.
    #[tokio::test]
    async fn a_call_timed_out_waiting_in_the_host_is_not_the_destinations_failure() {
        let limits = Limits {
            max_outbound_concurrency: 1,
            outbound_breaker_failures: 1,
            outbound_timeout: std::time::Duration::from_millis(100),
            ..Limits::default()
        };
        let granted = ["http://127.0.0.1:9".to_string()];
        let policy = Arc::new(OutboundPolicy::new(&granted, &granted, &limits));
        let _slot_taken = policy.slots.clone().acquire_owned().await.unwrap();
        let mut hooks = Outbound::new(policy.clone(), "p".into(), &limits, "e1");
        let body = http_body_util::Empty::new().map_err(|never| match never {}).boxed_unsync();
        let request = http::Request::get("http://127.0.0.1:9/x").body(body).unwrap();
        let sent = Box::into_pin(hooks.send_request(request, None, Box::new(async { Ok(()) }))).await;
        assert!(matches!(sent, Err(Error::ConnectionTimeout)), "{:?}", sent.err());
        let failures: u32 = policy.breakers.views().iter().map(|b| b.consecutive_failures).sum();
        assert_eq!(failures, 0, "the host's wait was counted as the destination's failure");
    }

    #[test]
    fn the_key_is_stable_per_call_and_differs_between_calls() {
        let key = idempotency_key;
        assert_eq!(key("/shop", "e1", "pay", 0), key("/shop", "e1", "pay", 0));
        assert_ne!(key("/shop", "e1", "pay", 0), key("/shop", "e1", "pay", 1));
        assert_ne!(key("/shop", "e1", "pay", 0), key("/shop", "e1", "ship", 0));
        assert_ne!(key("/shop", "e1x", "pay", 0), key("/shop", "e1", "xpay", 0));
        // Another producer's event with the same id is another event (review 55b M1).
        assert_ne!(key("/shop", "e1", "pay", 0), key("/billing", "e1", "pay", 0));
        assert_ne!(key("/shop", "e1", "pay", 0), key("/shope", "1", "pay", 0));
    }
}
