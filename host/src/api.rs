//! The HTTP API (axum): event ingress, health, plugin listing, live tails, dead letters.
//!
//! Invariants:
//! - A request either gets its event accepted by the transport (202 with the id) or a JSON error
//!   saying what was wrong; an ingress publish the bus cannot take within `api.publish_timeout`
//!   (a plugin's queue is full) answers `503` with `Retry-After`, never hangs.
//! - A web page cannot use the API: a request carrying an `Origin` (or a cross-site
//!   `Sec-Fetch-Site`) is refused unless `api.allowed_origins` lists the origin or it is the
//!   host's own dashboard (`Origin` equal to the `Host`, fetch metadata `same-origin`, and a
//!   loopback listener or an API token), and on a loopback listener a `Host` that is not a
//!   loopback name is refused (DNS rebinding).
//! - Nothing a client holds open grows without bound: at most `api.max_tails` live tails, each
//!   buffering at most `api.tail_buffer_bytes` for a client that does not read (then dropping,
//!   counted in `/metrics`).
//! - A dead-letter replay runs to its end in its own task: a client that goes away midway loses
//!   no dead letter.

use crate::replay_report::{NotTaken, ReplayReport, Target};
use crate::router::Router;
use crate::subject::validate_subject;
use crate::transport::Transport;
use axum::Json;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tracing::Instrument;

/// `[api]` in the config: how the HTTP API protects the host from its clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiSettings {
    /// How long an ingress publish may wait for the bus to take the event (a subscriber's
    /// queue is full) before the answer is `503` with `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub publish_timeout: Duration,
    /// Web origins (`https://dash.example.com`) whose pages may call the API (CORS). A request
    /// from any other page is refused.
    pub allowed_origins: Vec<String>,
    /// Live tails (`GET /v1/events/{pattern}`, `plugbus tail`) open at once; more get `503`.
    pub max_tails: usize,
    /// Bytes of events one tail holds for a client that does not keep up; events beyond are
    /// dropped for that tail and counted (`plugbus_tail_events_dropped_total`).
    pub tail_buffer_bytes: usize,
    /// Connections open at once; one more waits (in the kernel's backlog) until one ends. Each
    /// holds a file descriptor the host also needs for plugin files, compiles and its broker.
    pub max_connections: usize,
    /// Connections one client address holds at once (an IPv6 client's /64 counts as one
    /// address); one more is answered `503` and closed. So one client cannot take every
    /// connection, and the health probes and other clients find room. At most
    /// `max_connections`. Behind a reverse proxy every client is the proxy's address: raise it
    /// to what the proxy opens.
    pub max_connections_per_peer: usize,
    /// How long a client has to send a request's headers (counted from when the connection waits
    /// for them: an idle kept-alive connection is closed after it too), and again its body (a
    /// body not in by then is answered `408`); and how long a write may wait for the client to
    /// take any of it (a client that stopped reading loses its connection).
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
}

impl Default for ApiSettings {
    fn default() -> Self {
        Self {
            publish_timeout: Duration::from_secs(5),
            allowed_origins: Vec::new(),
            max_tails: 16,
            tail_buffer_bytes: 8 << 20,
            max_connections: 512,
            max_connections_per_peer: 128,
            read_timeout: Duration::from_secs(30),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// Where ingress events go.
    pub transport: Arc<dyn Transport>,
    /// The live plugins.
    pub router: Arc<Router>,
    /// Files that could not be loaded.
    pub rejected: Arc<Mutex<crate::loader::RejectedFiles>>,
    /// Kept dead letters.
    pub dead_letters: Arc<crate::deadletter::DeadLetters>,
    /// Counters and gauges.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Reload state (compile cache counters) and the host's config (`[api]`, `http`).
    pub reloader: Arc<crate::reload::Reloader>,
    /// Bearer token guarding every route but `/healthz`.
    pub api_token: Option<String>,
    /// Largest accepted body.
    pub max_event_bytes: usize,
}

/// The state behind every route: the caller's [`ApiState`] and what the API itself keeps.
struct Inner {
    s: ApiState,
    settings: ApiSettings,
    /// Whether the API listens on a loopback address only (then `Host` must be a loopback name).
    loopback: bool,
    /// SHA-256 of the token: compared digest to digest in constant time, so neither the
    /// token's bytes nor its length leak through timing.
    token_digest: Option<[u8; 32]>,
    /// One permit per live tail.
    tails: Arc<Semaphore>,
    /// One permit per `POST /v1/dlq/{id}/debug` at work ([`DEBUG_RUNS_AT_ONCE`]).
    debugging: Arc<Semaphore>,
    /// The ids of the dead letters a `POST /v1/dlq/{id}/replay` is replaying now: a second
    /// request for one of them (a double click) is refused instead of replaying it twice.
    replaying_one: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Turns at looking a dead letter up in the broker by id (`broker_entry`).
    finding_dead_letter: tokio::sync::Mutex<()>,
    /// One bulk replay (`POST /v1/dlq/replay`) at a time: on NATS each reads up to 64 MiB of the
    /// broker's dead letters, and two at once both read (and replay) the same ones.
    replaying_all: Arc<Semaphore>,
    /// One permit per whole dead-letter listing being built ([`WHOLE_LISTINGS_AT_ONCE`]).
    listing_whole: Arc<Semaphore>,
    /// One permit per dead-letter summary being built or sent ([`SUMMARY_LISTINGS_AT_ONCE`]).
    listing_summary: Arc<Semaphore>,
}

/// Summaries of this host's dead letters (`GET /v1/dlq?summary=true`, what the dashboard asks
/// every 2 s) built and sent at once: each copies at most [`LISTING_BYTES`] of them (about
/// 160 KiB a dead letter, their headers cut) and writes at most as much JSON, off the runtime.
/// Without a bound, a hundred clients each copied the whole store (review 60a M2). One more is
/// answered `503` with `Retry-After`.
pub const SUMMARY_LISTINGS_AT_ONCE: usize = 8;

/// Whole dead-letter listings (`GET /v1/dlq` without `summary`) built (and sent: a turn is
/// held until the client has taken the answer, [`crate::turn_body`]) at once: each copies the
/// records of the dead letters it lists (up to the store's 64 MiB, several times that in heap),
/// and 128 such requests of one client at once copied the store 128 times. One more is answered
/// `503` with `Retry-After`. The same turns bound what else copies dead letters whole, waiting
/// up to `api.publish_timeout` for one: a summary read from a broker (which reads the data too)
/// and `GET /v1/dlq/{id}`. A summary of this host's own copies no record or data and takes a
/// turn of its own ([`SUMMARY_LISTINGS_AT_ONCE`]).
pub const WHOLE_LISTINGS_AT_ONCE: usize = 2;

type Api = Arc<Inner>;

/// Observer queue between the transport and a tail's forwarder; the forwarder empties it at
/// once, so it only absorbs bursts: a handler's outputs come all at once, and at 16 a tail that
/// read on missed 1,680 of 2,020 events of 100-output bursts. Events beyond are missed, and the
/// forwarder counts them as dropped for its client.
const TAIL_OBSERVER_CAPACITY: usize = 1024;

/// Dead-letter debug runs at once. Each reads up to `max_wasm_bytes` of candidate, compiles it
/// in a child (up to `sandbox.compile_memory_mib`) outside the loader's bound, and runs in the
/// instance pool live plugins use: without a bound, a client sending a few hundred of them at
/// once took the host's memory and the plugins' slots.
pub const DEBUG_RUNS_AT_ONCE: usize = 2;

/// How often an idle tail sends a keep-alive comment (also how soon a vanished client is noticed).
const TAIL_KEEP_ALIVE: Duration = Duration::from_secs(5);

/// The API's routes.
pub fn router(state: ApiState) -> axum::Router {
    let settings = state.reloader.config.api.clone();
    let loopback = state.reloader.config.http.is_some_and(|a| is_loopback_ip(a.ip()));
    let token_digest = state.api_token.as_deref().map(digest);
    let tails = Arc::new(Semaphore::new(settings.max_tails));
    let debugging = Arc::new(Semaphore::new(DEBUG_RUNS_AT_ONCE));
    let api: Api = Arc::new(Inner {
        s: state,
        settings,
        loopback,
        token_digest,
        tails,
        debugging,
        replaying_one: Default::default(),
        finding_dead_letter: Default::default(),
        replaying_all: Arc::new(Semaphore::new(1)),
        listing_whole: Arc::new(Semaphore::new(WHOLE_LISTINGS_AT_ONCE)),
        listing_summary: Arc::new(Semaphore::new(SUMMARY_LISTINGS_AT_ONCE)),
    });
    let guarded = axum::Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/plugins", get(plugins))
        .route("/v1/stats", get(stats))
        .route("/v1/events/{subject}", post(publish).get(tail))
        .route("/v1/dlq", get(dlq_list))
        .route("/v1/dlq/replay", post(dlq_replay))
        .route("/v1/dlq/{id}", get(dlq_get))
        .route("/v1/dlq/{id}/replay", post(dlq_replay_one))
        .route("/v1/dlq/{id}/debug", post(dlq_debug))
        .route("/v1/replay", post(replay_log))
        .route("/v1/request/{subject}", post(request))
        .route("/v1/events", post(empty_subject))
        .route("/v1/events/", post(empty_subject))
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(api.clone(), guard));
    axum::Router::new()
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .merge(crate::dashboard::routes())
        .merge(guarded)
        .with_state(api)
}

fn digest(token: &str) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    Sha256::digest(token.as_bytes()).into()
}

/// The most of a refused web page's request's `Host`, `Origin`, `Sec-Fetch-Site` and path that
/// is logged and answered (review 62c F3: any page could make each refusal a 60 KB log line, and
/// a client with no token one of 300 KB).
const REFUSED_SHOWN_BYTES: usize = 256;

/// Every guarded route: refuses web pages and foreign `Host` names, answers CORS preflights of
/// allowed origins, then checks `Authorization: Bearer <token>` when the host has a token.
async fn guard(State(api): State<Api>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let origin = match api.check_browser(req.headers(), req.uri()) {
        Ok(origin) => origin,
        Err(why) => {
            api.s.metrics.browser_refused.inc();
            let path = crate::event::cut_to(req.uri().path(), REFUSED_SHOWN_BYTES);
            tracing::warn!(method = %req.method(), path = %path, "API request refused: {why}");
            return error(StatusCode::FORBIDDEN, why);
        }
    };
    if let Some(origin) = &origin
        && req.method() == Method::OPTIONS
    {
        return preflight(origin, req.headers());
    }
    if let Some(expected) = &api.token_digest {
        use subtle::ConstantTimeEq;
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(bearer);
        let ok = given.is_some_and(|g| bool::from(digest(g)[..].ct_eq(&expected[..])));
        if !ok {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong API token (Authorization: Bearer <token>)");
        }
    }
    let mut resp = next.run(req).await;
    if let Some(origin) = origin {
        allow_origin(resp.headers_mut(), &origin);
    }
    resp
}

/// The token of `Authorization: Bearer <token>` (the scheme is case-insensitive).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

impl Inner {
    /// Whether a request naming `origin` comes from a page this host served itself (the
    /// dashboard): the origin is `http://<Host>` (or https) and the fetch metadata, when sent,
    /// says same-origin. Trusted only where a DNS-rebinding page cannot pose as the host: on a
    /// loopback listener (its `Host` was checked to be a loopback name) or with an API token (a
    /// page from another name never holds the token the dashboard keeps for its own origin).
    fn same_origin(&self, headers: &HeaderMap, origin: &str) -> bool {
        if !self.loopback && self.token_digest.is_none() {
            return false;
        }
        let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else { return false };
        let site_ok = headers.get("sec-fetch-site").is_none_or(|v| v.as_bytes() == b"same-origin");
        let served_here = ["http://", "https://"]
            .iter()
            .any(|scheme| origin.strip_prefix(scheme).is_some_and(|rest| rest.eq_ignore_ascii_case(host)));
        site_ok && served_here
    }

    /// `Ok(Some(origin))` for a request from an allowed web origin, `Ok(None)` for a request
    /// from no web page (curl, the CLI, Prometheus), `Err` naming why a request is refused.
    fn check_browser(&self, headers: &HeaderMap, uri: &axum::http::Uri) -> Result<Option<String>, String> {
        if self.loopback {
            let host = headers.get(header::HOST).map(|h| h.to_str().unwrap_or("<not text>")).or(uri.host());
            if let Some(host) = host
                && !is_loopback_host(host)
            {
                let host = crate::event::cut_to(host, REFUSED_SHOWN_BYTES);
                return Err(format!(
                    "Host {host:?} is not a loopback name: the API listens on loopback only and answers to \
                     localhost, 127.0.0.1 and [::1] (a web page reaching it through its own DNS name is refused)"
                ));
            }
        }
        let origin = headers.get(header::ORIGIN).map(|o| o.to_str().unwrap_or("<not text>").to_string());
        if let Some(origin) = origin {
            let wanted = origin.trim_end_matches('/');
            if self.settings.allowed_origins.iter().any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(wanted)) {
                return Ok(Some(origin));
            }
            if self.same_origin(headers, wanted) {
                // The host's own page (the dashboard at `GET /`): no CORS headers needed.
                return Ok(None);
            }
            let origin = crate::event::cut_to(&origin, REFUSED_SHOWN_BYTES);
            return Err(format!(
                "requests from web pages are refused: Origin {origin:?} is not in api.allowed_origins"
            ));
        }
        // A browser request without `Origin` (a no-cors GET from an <img>, a navigation): its
        // fetch metadata says where it came from.
        match headers.get("sec-fetch-site").map(|v| v.to_str().unwrap_or("<not text>")) {
            None | Some("none") | Some("same-origin") => Ok(None),
            Some(site) => Err(format!(
                "requests from web pages are refused: Sec-Fetch-Site is {:?} and the request names no \
                 Origin listed in api.allowed_origins",
                crate::event::cut_to(site, REFUSED_SHOWN_BYTES)
            )),
        }
    }
}

/// The answer to a CORS preflight from an allowed origin.
fn preflight(origin: &str, headers: &HeaderMap) -> Response {
    let mut resp = StatusCode::NO_CONTENT.into_response();
    let h = resp.headers_mut();
    allow_origin(h, origin);
    h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST"));
    if let Some(asked) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    h.insert(header::ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
    resp
}

fn allow_origin(h: &mut HeaderMap, origin: &str) {
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.append(header::VARY, HeaderValue::from_static("Origin"));
}

fn is_loopback_ip(ip: IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

/// Whether a `Host` header names this machine's loopback: `localhost`, `*.localhost` (RFC 6761:
/// browsers never resolve them through DNS), or a loopback IP; any port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => match rest.split_once(']') {
            Some((ip, _)) => ip,
            None => return false,
        },
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.to_ascii_lowercase();
    name == "localhost" || name.ends_with(".localhost") || name.parse::<IpAddr>().is_ok_and(is_loopback_ip)
}

async fn readyz(State(api): State<Api>) -> Response {
    let state = &api.s;
    let connected = state.transport.is_connected();
    let body =
        Json(json!({ "ready": connected, "transport": state.transport.name(), "plugins": state.router.names().len() }));
    let status = if connected { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, body).into_response()
}

async fn metrics(State(api): State<Api>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    let state = &api.s;
    state.router.refresh_gauges();
    let cache = state.reloader.sandbox.cache_stats();
    state.metrics.compiled.set(cache.compiled.load(Relaxed) as i64);
    state.metrics.cache_hits.set(cache.hits.load(Relaxed) as i64);
    state.metrics.compiled_code_bytes.set(state.reloader.sandbox.code_budget().held() as i64);
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], state.metrics.encode()).into_response()
}

/// A live tail's slot: counted in `plugbus_tails_open` while the client is connected.
struct TailSlot {
    _permit: OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for TailSlot {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// What a tail's stream holds: the events waiting for the client, their bytes, its slot.
struct TailStream {
    rx: mpsc::UnboundedReceiver<(Arc<crate::event::Event>, usize)>,
    buffered: Arc<AtomicUsize>,
    _slot: TailSlot,
}

/// The bytes a tail holds by keeping `ev` (its data, attributes and headers).
fn held_bytes(ev: &crate::event::Event) -> usize {
    let attrs = ev.id.len() + ev.source.len() + ev.ty.len() + ev.subject.len() + ev.time.len();
    let headers: usize = ev.extensions.iter().map(|(k, v)| k.len() + v.len() + 16).sum();
    ev.data.len() + attrs + headers + 128
}

/// `GET /v1/events/{pattern}`: a Server-Sent-Events stream of every event matching the pattern.
///
/// A forwarder task takes events from the transport as they come (it only counts bytes, so it
/// keeps up with the bus) and keeps them for the client up to `api.tail_buffer_bytes`; what a
/// client that does not read would push past that is dropped for it (and counted), so a stalled
/// client holds a bounded amount. Events are serialized as the client takes them.
/// `GET /v1/events/{pattern}?format=cloudevents`: each event in the CloudEvents JSON shape
/// ([`crate::cloudevents::to_json`], exact data) instead of the plain view.
#[derive(serde::Deserialize)]
struct TailQuery {
    format: Option<String>,
}

async fn tail(State(api): State<Api>, Path(pattern): Path<String>, Query(q): Query<TailQuery>) -> Response {
    use axum::response::sse::{Event as Sse, KeepAlive};
    match crate::subject::Pattern::parse(&pattern) {
        Err(e) => return error(StatusCode::BAD_REQUEST, e.to_string()),
        // On NATS the server would hand the host's subscription every plugin's kv writes
        // (`$KV.>`) or every reply (`_INBOX.>`): a client may tail what it may publish.
        Ok(p) if p.reaches_system() => {
            let msg = format!(
                "{} names a system subject: patterns starting with `$` or `_INBOX` cannot be tailed",
                crate::event::quoted(&pattern)
            );
            return error(StatusCode::BAD_REQUEST, msg);
        }
        Ok(_) => {}
    }
    let cloudevents = match q.format.as_deref() {
        None | Some("plain") => false,
        Some("cloudevents") => true,
        Some(other) => {
            return error(StatusCode::BAD_REQUEST, format!("format {other:?}: expected `plain` or `cloudevents`"));
        }
    };
    let metrics = &api.s.metrics;
    let Ok(permit) = api.tails.clone().try_acquire_owned() else {
        metrics.tails_refused.inc();
        let msg = format!(
            "too many live tails: {} are open (api.max_tails); close one or raise the limit",
            api.settings.max_tails
        );
        return with_retry_after(error(StatusCode::SERVICE_UNAVAILABLE, msg), 1);
    };
    metrics.tails_open.inc();
    let slot = TailSlot { _permit: permit, gauge: metrics.tails_open.clone() };
    let crate::transport::Observed { mut events, missed } =
        match api.s.transport.observe(vec![pattern.clone()], TAIL_OBSERVER_CAPACITY).await {
            Ok(observed) => observed,
            Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        };
    let (tx, rx) = mpsc::unbounded_channel();
    let buffered = Arc::new(AtomicUsize::new(0));
    let budget = api.settings.tail_buffer_bytes;
    let (held, dropped) = (buffered.clone(), metrics.tail_events_dropped.clone());
    tokio::spawn(async move {
        let mut dropped_here = 0u64;
        // What the transport could not hand this tail (a burst past its queue, a broker
        // client's full buffer) is dropped for the client too: taken with each event, every
        // second (misses at the end of a burst), and at the end.
        let take_missed = |dropped_here: &mut u64| {
            let n = missed.swap(0, Ordering::Relaxed);
            if n > 0 {
                dropped.inc_by(n);
                if *dropped_here == 0 {
                    tracing::warn!(pattern = %pattern, "a live tail missed events of a burst: events dropped for it");
                }
                *dropped_here += n;
            }
        };
        let mut every_second = tokio::time::interval(Duration::from_secs(1));
        loop {
            let ev = tokio::select! {
                ev = events.recv() => ev,
                // The client went away: stop observing even if nothing matches any more.
                _ = tx.closed() => None,
                _ = every_second.tick() => {
                    take_missed(&mut dropped_here);
                    continue;
                }
            };
            let Some(ev) = ev else { break };
            take_missed(&mut dropped_here);
            let len = held_bytes(&ev);
            if held.load(Ordering::Acquire) + len > budget {
                dropped.inc();
                if dropped_here == 0 {
                    tracing::warn!(pattern = %pattern, budget, "a live tail's client is not keeping up: events dropped for it");
                }
                dropped_here += 1;
                continue;
            }
            held.fetch_add(len, Ordering::AcqRel);
            if tx.send((ev, len)).is_err() {
                break;
            }
        }
        take_missed(&mut dropped_here);
        if dropped_here > 0 {
            tracing::info!(pattern = %pattern, dropped = dropped_here, "live tail closed");
        }
    });
    let state = TailStream { rx, buffered, _slot: slot };
    let stream = futures::stream::unfold(state, move |mut st| async move {
        let (ev, len) = st.rx.recv().await?;
        let body = if cloudevents {
            crate::cloudevents::to_json(&ev)
        } else {
            json!({
                "id": ev.id, "source": ev.source, "type": ev.ty, "subject": ev.subject, "time": ev.time,
                "datacontenttype": ev.datacontenttype, "headers": ev.extensions,
                "data": String::from_utf8_lossy(&ev.data),
            })
        };
        drop(ev);
        st.buffered.fetch_sub(len, Ordering::AcqRel);
        Some((Ok::<_, std::convert::Infallible>(Sse::default().event("event").data(body.to_string())), st))
    });
    axum::response::sse::Sse::new(stream).keep_alive(KeepAlive::new().interval(TAIL_KEEP_ALIVE)).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

fn with_retry_after(mut resp: Response, seconds: u64) -> Response {
    resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    resp
}

async fn empty_subject() -> Response {
    error(StatusCode::BAD_REQUEST, "the subject is empty: POST /v1/events/{subject}")
}

/// Prefix of the header and extension names only the host sets (dead-letter marks,
/// `plugbus-caused-by`, `plugbus-replay-of`, ...).
const RESERVED_PREFIX: &str = "plugbus-";

/// Why a client may not publish to `subject`: NATS's own subjects (`$...`, `_INBOX...`).
fn system_subject(subject: &str) -> Option<String> {
    let inbox = subject == "_INBOX" || subject.starts_with("_INBOX.");
    (subject.starts_with('$') || inbox || crate::subject::is_system_subject(subject)).then(|| {
        format!("{subject:?} is a system subject: subjects starting with `$` or `_INBOX` cannot be published here")
    })
}

/// The first header a client may not set: a name starting with `plugbus-` or `nats-` (`_`
/// alike), or either after `ce-` / `ce_`, as a plugin may not ([`crate::event::is_reserved_header`]);
/// a plain `Nats-Msg-Id` (a plain message's id) is the client's. A `nats-` header (`Nats-Rollup`,
/// `Nats-Expected-Last-Sequence`, `Nats-TTL`) went on to NATS as a header of the event (review
/// 60a L3).
fn reserved_header(headers: &HeaderMap) -> Option<String> {
    headers.keys().map(|k| k.as_str()).find_map(|name| {
        reserved_name(name).then(|| {
            format!(
                "header {name:?} is reserved for the host: names starting with `{RESERVED_PREFIX}` or `nats-` cannot \
                 be set (a plain `Nats-Msg-Id` can)"
            )
        })
    })
}

/// Whether a client may not give `name` (a header or a decoded attribute, any case).
fn reserved_name(name: &str) -> bool {
    crate::event::names_the_host_or_broker(name) && !name.eq_ignore_ascii_case("nats-msg-id")
}

/// The event a client posts (to `POST /v1/events/{subject}` or `/v1/request/{subject}`): the
/// subject checked, no system subject, no host header, the body within the event limit, a valid
/// CloudEvent, no host attribute. `Err` is the answer naming what was wrong.
async fn incoming_event(
    state: &ApiState,
    subject: &str,
    headers: &HeaderMap,
    body: Body,
) -> Result<crate::event::Event, Box<Response>> {
    let refuse = |status: StatusCode, why: String| Err(Box::new(error(status, why)));
    if let Err(e) = validate_subject(subject) {
        return refuse(StatusCode::BAD_REQUEST, e.to_string());
    }
    if let Some(why) = system_subject(subject) {
        return refuse(StatusCode::BAD_REQUEST, why);
    }
    // The host's own: a client's event there would read as a plugin's dead letter (listed,
    // replayed, and on NATS kept in `PLUGBUS_DLQ`, where a thousand of them at its front hid
    // the real ones from the listings).
    if crate::subject::is_dead_letter_subject(subject) {
        let why = format!("{subject:?} is a dead-letter subject: the host alone publishes under `plugbus.dlq.`");
        return refuse(StatusCode::BAD_REQUEST, why);
    }
    if let Some(why) = reserved_header(headers) {
        return refuse(StatusCode::BAD_REQUEST, why);
    }
    // A client trickling its body would hold its connection, and what it sent, for ever.
    let read_timeout = state.reloader.config.api.read_timeout;
    let read = tokio::time::timeout(read_timeout, axum::body::to_bytes(body, state.max_event_bytes)).await;
    let Ok(read) = read else {
        let why = format!("the body was not in within {} (api.read_timeout)", humantime::format_duration(read_timeout));
        return refuse(StatusCode::REQUEST_TIMEOUT, why);
    };
    let Ok(data) = read else {
        let why = format!("the body is over the {}-byte event limit", state.max_event_bytes);
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, why);
    };
    // Not a slice of hyper's read buffer (a 1-byte body kept a 400 KiB head alive).
    let data = crate::event::owned_data(&data);
    let headers = match header_pairs(headers) {
        Ok(headers) => headers,
        Err(why) => return refuse(StatusCode::BAD_REQUEST, why),
    };
    if let Some(why) = crate::cloudevents::repeated_core_attribute(&headers) {
        return refuse(StatusCode::BAD_REQUEST, why);
    }
    let event = match crate::cloudevents::decode(subject, headers.into_iter(), data) {
        Ok(ev) => ev,
        Err(e) => return refuse(StatusCode::BAD_REQUEST, e),
    };
    if let Some((name, _)) = event.extensions.iter().find(|(k, _)| reserved_name(k)) {
        let why = format!(
            "attribute {name:?} is reserved for the host: names starting with `{RESERVED_PREFIX}` or `nats-` cannot be set"
        );
        return refuse(StatusCode::BAD_REQUEST, why);
    }
    if let Some(why) = state.transport.too_large(&event) {
        return refuse(StatusCode::PAYLOAD_TOO_LARGE, why);
    }
    Ok(event)
}

async fn publish(State(api): State<Api>, Path(subject): Path<String>, headers: HeaderMap, body: Body) -> Response {
    let state = &api.s;
    let mut event = match incoming_event(state, &subject, &headers, body).await {
        Ok(ev) => ev,
        Err(refused) => return *refused,
    };
    // The W3C trace context (`traceparent` / `tracestate` headers, or `ce-` ones): with tracing
    // on, this request's span continues it (or starts a trace) and the event carries the span's;
    // an invalid one is dropped (a new trace), never refused.
    let span = crate::telemetry::ingress(&mut event);
    let id = event.id.clone();
    let timeout = api.settings.publish_timeout;
    match tokio::time::timeout(timeout, state.transport.publish(event)).instrument(span.clone()).await {
        Ok(Ok(())) => (StatusCode::ACCEPTED, Json(json!({ "id": id }))).into_response(),
        Ok(Err(e)) => {
            crate::telemetry::fail(&span, &e);
            error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
        }
        Err(_) => {
            crate::telemetry::fail(&span, &"not taken by the bus within api.publish_timeout");
            state.metrics.ingress_timeouts.inc();
            tracing::warn!(subject = %subject, event_id = %id, ?timeout,
                "ingress event not taken by the bus in time (a subscriber's queue is full, or the event log's commit is slow): answered 503");
            let msg = format!(
                "the bus did not take the event within {} (api.publish_timeout): a subscriber's queue is full, or \
                 the event log's commit (its fsync) is slow; retry later with the same ce-id (JetStream drops \
                 a copy within its duplicate window; on the embedded bus and core NATS, plugins that already took \
                 it see it again, with the same id)",
                humantime::format_duration(timeout)
            );
            with_retry_after(error(StatusCode::SERVICE_UNAVAILABLE, msg), retry_after_secs(timeout))
        }
    }
}

#[derive(serde::Deserialize)]
struct RequestQuery {
    /// How long to wait for the reply (`500ms`, `2s`); default and maximum in `crate::rpc`.
    timeout: Option<String>,
}

/// `POST /v1/request/{subject}`: the body (and `Content-Type`, `ce-*` headers, as for
/// `POST /v1/events`) goes out as a request; the first reply comes back as the answer: its data
/// as the body, its `datacontenttype` as `Content-Type`, its attributes as `ce-*` headers. `504`
/// when no reply came within `?timeout=` (default 5 s, at most 60 s), `503` when nothing
/// subscribes to the subject or the bus cannot take the request.
async fn request(
    State(api): State<Api>,
    Path(subject): Path<String>,
    Query(q): Query<RequestQuery>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    use crate::rpc::{API_DEFAULT_TIMEOUT, API_MAX_TIMEOUT, RequestError};
    let state = &api.s;
    let timeout = match q.timeout.as_deref().map(str::trim) {
        None | Some("") => API_DEFAULT_TIMEOUT,
        Some(text) => match humantime::parse_duration(text) {
            Ok(t) if t > API_MAX_TIMEOUT => {
                let max = humantime::format_duration(API_MAX_TIMEOUT);
                return error(StatusCode::BAD_REQUEST, format!("timeout {text:?} is over the maximum of {max}"));
            }
            Ok(t) if t.is_zero() => return error(StatusCode::BAD_REQUEST, "timeout must be more than 0"),
            Ok(t) => t,
            Err(e) => {
                let why = format!("timeout {:?}: {e} (expected a duration like 500ms or 2s)", crate::event::cut(text));
                return error(StatusCode::BAD_REQUEST, why);
            }
        },
    };
    let mut event = match incoming_event(state, &subject, &headers, body).await {
        Ok(ev) => ev,
        Err(refused) => return *refused,
    };
    // The client's trace context, as for a publish (an invalid one dropped, never passed on).
    let span = crate::telemetry::ingress(&mut event);
    let id = event.id.clone();
    // The transport bounds its own wait by `timeout`; this bounds a transport that does not.
    let asked = state.transport.request(event, timeout, true);
    let answer = match tokio::time::timeout(timeout + Duration::from_secs(1), asked).instrument(span.clone()).await {
        Ok(answer) => answer,
        Err(_) => Err(RequestError::Timeout { subject: subject.clone(), after: timeout }),
    };
    if let Err(e) = &answer {
        crate::telemetry::fail(&span, e);
    }
    match answer {
        Ok(reply) => {
            let mut resp = (StatusCode::OK, reply.data.clone()).into_response();
            let out = resp.headers_mut();
            // `Bytes` answered `application/octet-stream`: the reply's own type replaces it.
            out.remove(header::CONTENT_TYPE);
            // Only what the route promises: the `ce-*` attributes and `Content-Type`. The reply's
            // other headers are the plugin's words, and as HTTP headers they would be the host's:
            // a `Content-Length` or `Transfer-Encoding` that reframes the response (the plugin's
            // bytes read as the next response on a kept-alive connection), a `Set-Cookie` on the
            // API's origin, a `Location`.
            for (name, value) in crate::cloudevents::encode_binary(&reply) {
                if !(name.starts_with("ce-") || name == "content-type") {
                    continue;
                }
                if let (Ok(n), Ok(v)) = (header::HeaderName::try_from(name.as_ref()), HeaderValue::from_str(&value)) {
                    out.append(n, v);
                }
            }
            // None, or one HTTP cannot carry: bytes. Either way never sniffed into something else,
            // and never a page of the API's origin (a plugin chooses it: `text/html` is allowed).
            if !out.contains_key(header::CONTENT_TYPE) {
                out.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
            }
            out.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            out.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("sandbox"));
            resp
        }
        Err(e @ RequestError::Timeout { .. }) => {
            state.metrics.api_request_timeouts.inc();
            tracing::info!(subject = %subject, event_id = %id, ?timeout, "request answered 504: {e}");
            error(StatusCode::GATEWAY_TIMEOUT, e.to_string())
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// `Retry-After` for a publish that timed out: the timeout, in whole seconds, at least 1.
fn retry_after_secs(timeout: Duration) -> u64 {
    timeout.as_secs_f64().ceil().max(1.0) as u64
}

/// The first [`crate::stats::LISTED_REJECTED`] refused files, each as `entry` makes it, and how
/// many there are.
fn listed_rejected<T>(state: &ApiState, entry: impl Fn(&crate::loader::Rejected) -> T) -> (Vec<T>, usize) {
    let all = state.rejected.lock().expect("poisoned");
    (all.iter().take(crate::stats::LISTED_REJECTED).map(entry).collect(), all.len())
}

async fn plugins(State(api): State<Api>) -> Response {
    let state = &api.s;
    let (rejected, rejected_total) = listed_rejected(
        state,
        |r| json!({ "file": r.path.display().to_string(), "state": format!("rejected: {}", r.reason) }),
    );
    // `plugins_dir`: where `plugbus dev` copies a rebuilt handler when not told (`--plugins`).
    let plugins_dir = api.s.reloader.config.plugins_dir.display().to_string();
    let plugins = state.router.plugins();
    Json(json!({ "plugins": plugins, "rejected": rejected, "rejected_total": rejected_total, "plugins_dir": plugins_dir }))
        .into_response()
}

/// The request's headers as text: a value in UTF-8 is kept as it is (it used to be left out
/// unless it was plain ASCII, the event taken without it); one that is not UTF-8 is refused,
/// naming the header (CloudEvents attributes go percent-encoded), unless it is one the event
/// never takes (`User-Agent`, `Cookie`, …), which is left out as before.
fn header_pairs(headers: &HeaderMap) -> Result<Vec<(&str, &str)>, String> {
    let mut pairs = Vec::with_capacity(headers.len());
    for (k, v) in headers {
        match std::str::from_utf8(v.as_bytes()) {
            Ok(text) => pairs.push((k.as_str(), text)),
            Err(_) if crate::cloudevents::is_transport_header(k.as_str()) => {}
            Err(_) => {
                return Err(format!(
                    "header {:?} is not UTF-8 text: send it in UTF-8 (a CloudEvents attribute percent-encoded)",
                    k.as_str()
                ));
            }
        }
    }
    Ok(pairs)
}

#[derive(serde::Deserialize)]
struct ReplayQuery {
    plugin: String,
    #[serde(default)]
    from: String,
}

/// Delivers again to one plugin every event the bus keeps from `from` on (a sequence number, an
/// RFC 3339 time or a duration ago) that its subscription matches (the embedded bus's log), to
/// rebuild its state.
async fn replay_log(State(api): State<Api>, Query(q): Query<ReplayQuery>) -> Response {
    let from = match crate::transport::ReplayFrom::parse(&q.from, std::time::SystemTime::now()) {
        Ok(from) => from,
        Err(why) => return error(StatusCode::BAD_REQUEST, why),
    };
    match api.s.transport.replay(&q.plugin, from).await {
        Ok(events) => Json(json!({ "plugin": q.plugin, "from": from.to_string(), "events": events })).into_response(),
        Err(crate::transport::TransportError::Closed(m)) => error(StatusCode::NOT_FOUND, m),
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

#[derive(serde::Deserialize)]
struct DlqQuery {
    plugin: Option<String>,
}

/// The most dead letters one listing or replay reads from a broker.
const BROKER_DLQ_LIMIT: usize = 10_000;

#[derive(serde::Deserialize)]
struct DlqListQuery {
    plugin: Option<String>,
    /// Only the newest this many (the dashboard polls with a limit).
    limit: Option<usize>,
    /// Each dead letter without its data and record (what the dashboard shows).
    #[serde(default)]
    summary: bool,
}

/// The most JSON one dead-letter listing answers with; an entry past it is left out
/// (`left_out`). A dead letter's data can be 1 MiB that JSON writes six times over (`\u0001`),
/// and a page of 100 was 400 MB, built again on every poll of the dashboard.
const LISTING_BYTES: usize = 16 << 20;

/// The `400` for a `?plugin=` that no plugin can be named (on NATS it made the subject read,
/// `plugbus.dlq.<plugin>`: a bad one answered `503`, a `>` every plugin's; review 60a L2).
fn not_a_plugin_name(plugin: Option<&str>) -> Option<Response> {
    let name = plugin.filter(|p| !crate::manifest::valid_plugin_name(p))?;
    let why = format!(
        "plugin {} is not a plugin's name (1-64 characters of a-z, A-Z, 0-9, '-' and '_')",
        crate::event::quoted(name)
    );
    Some(error(StatusCode::BAD_REQUEST, why))
}

async fn dlq_list(State(api): State<Api>, Query(q): Query<DlqListQuery>) -> Response {
    if let Some(bad) = not_a_plugin_name(q.plugin.as_deref()) {
        return bad;
    }
    // Held until the listing is sent (see `json_in_turn`; dropped should the client go away).
    let permit = if q.summary {
        let Ok(permit) = api.listing_summary.clone().try_acquire_owned() else {
            let why = format!(
                "{SUMMARY_LISTINGS_AT_ONCE} dead-letter summaries are being built or sent: try again in a moment"
            );
            return with_retry_after(error(StatusCode::SERVICE_UNAVAILABLE, why), 1);
        };
        Some(permit)
    } else {
        let Ok(permit) = api.listing_whole.clone().try_acquire_owned() else {
            let why = format!(
                "{WHOLE_LISTINGS_AT_ONCE} whole dead-letter listings are being built or sent: try again in a moment, \
                 or ask summary=true (no data or records)"
            );
            return with_retry_after(error(StatusCode::SERVICE_UNAVAILABLE, why), 1);
        };
        Some(permit)
    };
    let limit = q.limit.unwrap_or(usize::MAX);
    // Without a broker's store, the host's own newest page (no copy of the whole store; copied
    // off the runtime, under the store's lock).
    if api.s.transport.kept_dead_letters(None, 0).await.ok().flatten().is_none() {
        let (store, plugin, summary) = (api.s.dead_letters.clone(), q.plugin.clone(), q.summary);
        let page =
            tokio::task::spawn_blocking(move || store.newest(plugin.as_deref(), limit, !summary, LISTING_BYTES)).await;
        let Ok((dead_letters, total, left_out)) = page else {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "host error: copying the dead letters");
        };
        let listed = dead_letters.into_iter().map(|e| (e, "host")).collect();
        return listing(listed, total, left_out, q.summary, permit).await;
    }
    // The broker's page is read whole (its data too, up to 64 MiB) even for a summary: a summary
    // waits for a permit too (review 44c: 128 summaries at once read the stream 128 times).
    let permit = match (permit, q.summary) {
        (Some(permit), false) => permit,
        _ => match copying_turn(&api).await {
            Ok(permit) => permit,
            Err(busy) => return busy,
        },
    };
    // The broker's newest page: it costs about `limit` reads however many the broker keeps
    // (read oldest first, the dashboard's page every 2 s was up to 10,000 reads and 64 MiB, and
    // past 10,000 the newest were never listed).
    let page = limit.min(BROKER_DLQ_LIMIT);
    let (mut broker, broker_total) = match api.s.transport.newest_dead_letters(q.plugin.as_deref(), page).await {
        Ok(newest) => newest.unwrap_or_default(),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, format!("reading the broker's dead letters: {e}")),
    };
    if q.summary {
        // Cut as this host's own are (`DeadLetters::newest`).
        for entry in &mut broker {
            entry.event.extensions = crate::deadletter::summary_headers(&entry.event);
        }
    }
    let (local, _, local_left_out) = api.s.dead_letters.newest(q.plugin.as_deref(), page, !q.summary, LISTING_BYTES);
    let local = only_here(&broker, local, page);
    let total = broker_total + local.len();
    // The broker's in its order, then this host's (newer than a full page's oldest, see
    // `only_here`), as before.
    let mut all: Vec<_> =
        broker.into_iter().map(|e| (e, "broker")).chain(local.into_iter().map(|e| (e, "host"))).collect();
    all.drain(..all.len().saturating_sub(limit));
    listing(all, total, local_left_out, q.summary, Some(permit)).await
}

/// A turn at copying dead letters whole (one of [`WHOLE_LISTINGS_AT_ONCE`]), waited for at most
/// `api.publish_timeout`; else the `503` to answer.
async fn copying_turn(api: &Inner) -> Result<OwnedSemaphorePermit, Response> {
    match tokio::time::timeout(api.settings.publish_timeout, api.listing_whole.clone().acquire_owned()).await {
        Ok(Ok(permit)) => Ok(permit),
        _ => {
            let why = format!(
                "{WHOLE_LISTINGS_AT_ONCE} copies of dead letters are being made or sent for other requests: try again in a moment"
            );
            Err(with_retry_after(error(StatusCode::SERVICE_UNAVAILABLE, why), 1))
        }
    }
}

/// The answer of `GET /v1/dlq`: `entries` (oldest first, each with who keeps it), from the newest
/// back, each that still fits in [`LISTING_BYTES`] of JSON (one that does not is left out, and
/// older ones that fit are still listed), whole or (`summary`) without its data and record;
/// `left_out` counts those left out. Built off the runtime: it can be megabytes.
async fn listing(
    entries: Vec<(crate::deadletter::Entry, &'static str)>,
    total: usize,
    left_out: usize,
    summary: bool,
    permit: Option<OwnedSemaphorePermit>,
) -> Response {
    let built = tokio::task::spawn_blocking(move || {
        let mut listed = Vec::new();
        let mut bytes = 0;
        let mut left_out = left_out;
        for (entry, kept_by) in entries.into_iter().rev() {
            // One whose data alone cannot fit is left out unwritten (writing each of 67 entries
            // of 6 MB to find that none fits took 5 s of CPU).
            if !summary && bytes + json_len_at_least(&entry.event.data) > LISTING_BYTES {
                left_out += 1;
                continue;
            }
            let v = if summary { summary_of(&entry, kept_by) } else { tag(entry, kept_by) };
            let text = v.to_string();
            if bytes + text.len() > LISTING_BYTES {
                left_out += 1;
                continue;
            }
            bytes += text.len() + 1;
            listed.push(text);
        }
        listed.reverse();
        format!(r#"{{"dead_letters":[{}],"total":{total},"left_out":{left_out}}}"#, listed.join(","))
    })
    .await;
    match built {
        Ok(body) => json_in_turn(body, permit),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("host error: listing the dead letters: {e}")),
    }
}

/// A `200` of JSON `body`, sent holding `turn` (the copying turn it was built in) until the
/// client has taken it ([`TurnHeldBody`]).
fn json_in_turn(body: String, turn: Option<OwnedSemaphorePermit>) -> Response {
    let mut resp = Response::new(Body::new(crate::turn_body::TurnHeldBody::new(body, turn)));
    resp.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The fewest bytes a listing writes `data` in (`deadletter::serialize_event`: its text as a
/// JSON string, and a base64 copy beside it when it is not UTF-8).
fn json_len_at_least(data: &[u8]) -> usize {
    match std::str::from_utf8(data) {
        Ok(text) => text
            .bytes()
            .map(|b| match b {
                b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
                0..=0x1f => 6,
                _ => 1,
            })
            .sum(),
        Err(_) => data.len() + data.len().div_ceil(3) * 4,
    }
}

/// A listed dead letter without its data and record: what a page of them shows.
fn summary_of(entry: &crate::deadletter::Entry, kept_by: &str) -> serde_json::Value {
    let ev = &entry.event;
    json!({
        "seq": entry.seq,
        "plugin": entry.plugin,
        "kept_by": kept_by,
        "event": {
            "id": ev.id,
            "subject": ev.subject,
            "headers": ev.extensions,
            "type": ev.ty,
            "time": ev.time,
            "datacontenttype": ev.datacontenttype,
            "data_bytes": ev.data.len(),
        },
    })
}

/// When a listed dead letter was made (`plugbus-failed-at`, RFC 3339 to the millisecond, so it
/// sorts as text).
fn failed_at(entry: &crate::deadletter::Entry) -> String {
    entry.event.header(crate::deadletter::headers::FAILED_AT).unwrap_or_default().to_string()
}

/// Of this host's newest dead letters (`local`, oldest first), those to list beside the broker's
/// newest `page` (`broker`, oldest first): those it does not hold (too large for it, or made
/// while it was away). One not in a full page but older than its oldest may well be in the
/// broker, older than the page, and is left to a larger page; beside a page that is not full
/// the broker holds no other.
fn only_here(
    broker: &[crate::deadletter::Entry],
    local: Vec<crate::deadletter::Entry>,
    page: usize,
) -> Vec<crate::deadletter::Entry> {
    let held: std::collections::HashSet<&str> = broker.iter().map(|e| e.event.id.as_str()).collect();
    let oldest_listed = (broker.len() >= page).then(|| broker.first().map(failed_at)).flatten();
    local
        .into_iter()
        .filter(|e| !held.contains(e.event.id.as_str()))
        .filter(|e| oldest_listed.as_ref().is_none_or(|oldest| failed_at(e) > *oldest))
        .collect()
}

/// A listed dead letter, saying who keeps it (`broker` or `host`).
fn tag(entry: crate::deadletter::Entry, kept_by: &str) -> serde_json::Value {
    let mut v = serde_json::to_value(entry).unwrap_or_default();
    v["kept_by"] = json!(kept_by);
    v
}

/// Re-publishes kept dead letters to their original subjects (new ids made from the dead letters', `plugbus-replay-of`: see `deadletter::replay_event`).
///
/// The replay runs in its own task: the entries it took out of the store are re-published, or
/// put back when the bus does not take them within `api.publish_timeout`, whether or not the
/// client waits for the answer.
async fn dlq_replay(State(api): State<Api>, Query(q): Query<DlqQuery>) -> Response {
    if let Some(bad) = not_a_plugin_name(q.plugin.as_deref()) {
        return bad;
    }
    let Ok(alone) = api.replaying_all.clone().try_acquire_owned() else {
        return error(
            StatusCode::CONFLICT,
            "a replay of dead letters is under way on this host: try again once it is done (its answer says what it replayed)",
        );
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task_api = api.clone();
    tokio::spawn(async move {
        let report = replay(&task_api, q.plugin.as_deref()).await;
        drop(alone);
        if tx.send(report.clone()).is_err() {
            tracing::info!(replayed = report["replayed"].as_array().map_or(0, Vec::len),
                failed = %report["failed"], untried = %report["untried"],
                refused = report["refused"].as_array().map_or(0, Vec::len),
                "dead-letter replay finished after its client went away");
        }
    });
    match rx.await {
        Ok(report) => Json(report).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the replay task ended without a report (see the log)"),
    }
}

async fn replay(api: &Inner, plugin: Option<&str>) -> serde_json::Value {
    let (broker, complete) = match api.s.transport.kept_dead_letters(plugin, BROKER_DLQ_LIMIT).await {
        Ok(Some(kept)) => (kept.entries, kept.complete),
        Ok(None) => (Vec::new(), true),
        Err(e) => {
            return json!({ "replayed": [], "failed": 0, "error": format!("reading the broker's dead letters: {e}") });
        }
    };
    let held: std::collections::HashSet<String> = broker.iter().map(|e| e.event.id.clone()).collect();
    // This host's own, taken out of its store now (the replays below may make new ones, which
    // wait for the next replay); those the broker holds too are replayed from the broker, but
    // where only this host's copy carries the data (see `whole_here`).
    let taken = api.s.dead_letters.take(plugin);
    let mine_by_id: std::collections::HashMap<&str, &crate::deadletter::Entry> =
        taken.iter().map(|e| (e.event.id.as_str(), e)).collect();
    let whole: std::collections::HashSet<String> = broker
        .iter()
        .filter(|b| mine_by_id.get(b.event.id.as_str()).is_some_and(|m| whole_here(b, m)))
        .map(|b| b.event.id.clone())
        .collect();
    let (in_broker, mine): (Vec<_>, Vec<_>) =
        taken.into_iter().partition(|e| held.contains(&e.event.id) && !whole.contains(&e.event.id));
    // Beside a page the read cut short, one of this host's own not in it may be kept by the
    // broker past it: replayed from here, its copy there stayed, and a later replay ran it again
    // (review 62c F1). It is left for a later replay (each removes from the broker what it
    // replays, so the next page reaches further).
    let (mine, left): (Vec<_>, Vec<_>) = mine.into_iter().partition(|e| complete || held.contains(&e.event.id));
    let left_for_later = left.len();
    api.s
        .dead_letters
        .write_off_runtime(move |s| {
            s.forget(&in_broker);
            s.restore(left);
        })
        .await;
    let (copies, broker): (Vec<_>, Vec<_>) = broker.into_iter().partition(|b| whole.contains(&b.event.id));
    // One report for both: a plugin whose replay the bus did not take gets no more tries in this
    // run, whichever store its dead letters are in.
    let mut report = ReplayReport::default();
    replay_from_broker(api, broker, &mut report).await;
    replay_whole_here(api, mine, copies, &mut report).await;
    let mut report = report.to_json();
    if left_for_later > 0 {
        report["left_for_a_later_replay"] = left_for_later.into();
    }
    report
}

/// Whether this host's copy (`mine`) is whole of the dead letter the broker keeps without its
/// data (`plugbus-data-omitted`: with it, it was over the server's or its stream's largest
/// message): that one is replayed from this host's copy, and the broker's goes after.
fn whole_here(broker: &crate::deadletter::Entry, mine: &crate::deadletter::Entry) -> bool {
    let lacks_data = |e: &crate::deadletter::Entry| e.event.header(crate::deadletter::headers::DATA_OMITTED).is_some();
    mine.event.id == broker.event.id && lacks_data(broker) && !lacks_data(mine)
}

/// Replays this host's own dead letters, then removes from the broker its copies (`copies`,
/// kept without their data) of those replayed.
async fn replay_whole_here(
    api: &Inner,
    mine: Vec<crate::deadletter::Entry>,
    copies: Vec<crate::deadletter::Entry>,
    report: &mut ReplayReport,
) {
    replay_entries(api, mine, report).await;
    let replayed: std::collections::HashSet<&str> =
        report.replayed.iter().filter_map(|r| r["dead_letter"].as_str()).collect();
    for copy in copies.iter().filter(|c| replayed.contains(c.event.id.as_str())) {
        if let Err(e) = api.s.transport.forget_dead_letter(copy.seq).await {
            tracing::error!(plugin = %copy.plugin, event_id = %copy.event.id,
                "dead letter replayed from this host's copy but its copy without data is still kept by the broker: {e}");
        }
    }
}

/// Publishes `replay`, the replay of `entry`, unless its target was given up on in this run
/// (see [`crate::replay_report`]); whether the bus took it (the caller forgets the dead letter;
/// else it is kept).
async fn publish_replay(
    api: &Inner,
    report: &mut ReplayReport,
    entry: &crate::deadletter::Entry,
    replay: crate::event::Event,
) -> bool {
    let target = Target::of(&replay);
    if report.skips(&target) {
        return false;
    }
    let id = replay.id.clone();
    let timeout = api.settings.publish_timeout;
    let outcome = tokio::time::timeout(timeout, api.s.transport.publish(replay)).await.ok();
    report.note(entry, target, id, NotTaken::of(outcome, timeout))
}

/// The replay of the dead letter `dead` ([`crate::deadletter::replay_event`]); refused, and so
/// kept, when it is for a plugin this host does not run, or that no longer subscribes to its
/// subject, and no other host can run it (the embedded bus): every plugin would let it go
/// unrun, and it would be reported replayed and forgotten.
fn replay_of(api: &Inner, dead: &crate::event::Event) -> Result<crate::event::Event, String> {
    let event = crate::deadletter::replay_event(dead)?;
    if api.s.transport.is_external() {
        return on_the_broker(api, dead, event);
    }
    let Some(plugin) = crate::deadletter::failed_in(dead) else {
        return Ok(event);
    };
    match api.s.router.subscribes(plugin, &event.subject) {
        Some(true) => Ok(event),
        None => Err(format!(
            "the plugin it is for, {}, is not loaded (removed or renamed): every other plugin would let its \
             replay go unrun; replay it once that plugin is loaded again",
            crate::event::quoted(plugin)
        )),
        Some(false) => Err(format!(
            "the plugin it is for, {}, no longer subscribes to {} (its subscriptions changed): every other \
             plugin would let its replay go unrun; replay it once that plugin subscribes to it again",
            crate::event::quoted(plugin),
            crate::event::quoted(&event.subject)
        )),
    }
}

/// [`replay_of`] on a broker, where a replay is published with the host's credentials and a
/// dead letter is only as trustworthy as whoever could publish on its subject (review 60d M1):
/// - never to a dead-letter subject: the stream would keep it as that plugin's dead letter
///   (on the embedded bus a plugin that failed another's dead letter is given it again);
/// - when its plugin runs on this host, only to a subject that plugin subscribes or publishes
///   to (a dead letter of an event it failed, or of an output of its the bus did not take).
fn on_the_broker(
    api: &Inner,
    dead: &crate::event::Event,
    event: crate::event::Event,
) -> Result<crate::event::Event, String> {
    if crate::subject::is_dead_letter_subject(&event.subject) {
        return Err(format!(
            "its original subject {} is a dead-letter subject (`plugbus.dlq.…`): on a broker its replay would be kept \
             as that plugin's dead letter",
            crate::event::quoted(&event.subject)
        ));
    }
    let owner = dead.header(crate::deadletter::headers::PLUGIN).unwrap_or_default();
    let Some(plugin) = api.s.router.current(owner) else { return Ok(event) };
    let its = api.s.router.subscribes(owner, &event.subject) == Some(true) || plugin.publishes_to(&event.subject);
    match its {
        true => Ok(event),
        false => Err(format!(
            "its plugin {} (which runs on this host) neither subscribes nor publishes to its original subject {} \
             now: kept, not replayed (its subscriptions changed since it failed, or a forgery on its subject); replay \
             it once the plugin subscribes to it again",
            crate::event::quoted(owner),
            crate::event::quoted(&event.subject)
        )),
    }
}

/// Replays dead letters the broker keeps; each leaves the broker once the bus took its replay.
/// Each is claimed first ([`Transport::claim_dead_letter`]): every host attached to the broker
/// lists the same dead letters, and two replaying at once both published them (on core NATS
/// each ran twice). One another replay holds is left to it (`replayed_elsewhere`). Where no claim
/// can be stored at all (the claims' store cannot be found or made), it is replayed unclaimed
/// (`unclaimed`): twice rather than never; one whose claim failed is kept, counted as not taken.
async fn replay_from_broker(api: &Inner, entries: Vec<crate::deadletter::Entry>, report: &mut ReplayReport) {
    use crate::transport::Claim;
    let transport = &api.s.transport;
    for entry in entries {
        let event = match replay_of(api, &entry.event) {
            Ok(event) => event,
            Err(why) => {
                report.refuse(&entry, &why);
                continue;
            }
        };
        if report.skips(&Target::of(&event)) {
            continue;
        }
        let claim = match transport.claim_dead_letter(entry.seq, &entry.event.id).await {
            Ok(Claim::Ours(revision)) => Some(revision),
            Ok(Claim::Elsewhere) => {
                report.elsewhere(&entry);
                continue;
            }
            Ok(Claim::Unavailable(why)) => {
                report.unclaimed(&entry, &why);
                None
            }
            // Kept, and a strike against its target as a replay not taken in time: a claim that
            // fails again and again (a timeout each) gives its target up after two.
            Err(e) => {
                let why = NotTaken::InTime(format!("its replay could not be claimed: {e}"));
                report.note(&entry, Target::of(&event), event.id.clone(), Err(why));
                continue;
            }
        };
        if publish_replay(api, report, &entry, event).await {
            if let Err(e) = transport.forget_dead_letter(entry.seq).await {
                tracing::error!(plugin = %entry.plugin, event_id = %entry.event.id,
                    "dead letter replayed but still kept by the broker (a later replay repeats it): {e}");
            }
        } else if let Some(revision) = claim
            && let Err(e) = transport.release_dead_letter_claim(entry.seq, &entry.event.id, revision).await
        {
            tracing::warn!(plugin = %entry.plugin, event_id = %entry.event.id,
                "its replay was not taken, and its claim could not be let go: other replays leave it until the \
                 claim expires: {e}");
        }
    }
}

/// How many replayed dead letters leave the file together (one commit each batch): a crash
/// replays at most this many twice.
const FORGET_BATCH: usize = 100;

/// Replays this host's own dead letters, taken out of its store; those the bus does not take
/// are put back, those it took leave the file in batches.
async fn replay_entries(api: &Inner, taken: Vec<crate::deadletter::Entry>, report: &mut ReplayReport) {
    let mut kept = Vec::new();
    let mut published = Vec::new();
    for entry in taken {
        if published.len() >= FORGET_BATCH {
            forget_replayed(api, std::mem::take(&mut published), Vec::new()).await;
        }
        let event = match replay_of(api, &entry.event) {
            Ok(event) => event,
            Err(why) => {
                report.refuse(&entry, &why);
                kept.push(entry);
                continue;
            }
        };
        if publish_replay(api, report, &entry, event).await {
            published.push(entry);
        } else {
            kept.push(entry);
        }
    }
    forget_replayed(api, published, kept).await;
}

/// Lets the replayed dead letters (`published`) leave the store once the bus says what it took
/// of their replays survives a crash (the store's removal is on disk at once; the log's commit
/// under `bus.sync = "batch"` or `"none"` only later: review 61c M1 lost both to a `kill -9`),
/// and puts `kept` back. Replayed ones the bus cannot say so of are kept too: a replay run
/// twice (the embedded bus logs a dead letter's replay once) rather than lost.
async fn forget_replayed(
    api: &Inner,
    mut published: Vec<crate::deadletter::Entry>,
    mut kept: Vec<crate::deadletter::Entry>,
) {
    if !published.is_empty()
        && let Err(e) = api.s.transport.sync_taken().await
    {
        tracing::error!(
            replays = published.len(),
            "replayed dead letters kept: the bus cannot say their replays are on disk: {e}"
        );
        kept.append(&mut published);
    }
    api.s
        .dead_letters
        .write_off_runtime(move |s| {
            s.forget(&published);
            s.restore(kept);
        })
        .await;
}

/// `GET /v1/dlq/{id}`: one kept dead letter, by the id of its dead-letter event. Its copy (up
/// to 1 MiB of data and 1 MiB of record, several times that as JSON) is made in a turn of
/// [`copying_turn`] and written off the runtime (review 44c: unbounded, on a runtime thread).
/// This host's own store is looked in under a copying turn; the broker without one, under the
/// one lookup turn ([`finding_turn`], waited for at most `api.publish_timeout`) (review 55d L3: a
/// lookup of an id no dead letter has reads up to 20,000 messages back, and two clients asking
/// for one in a loop held both copying turns, the dashboard's listing answered `503`); a copying
/// turn is taken once it found one, before the next lookup may begin, so at most one entry found
/// waits for a turn.
async fn dlq_get(State(api): State<Api>, Path(id): Path<String>) -> Response {
    let here = match copying_turn(&api).await {
        Ok(permit) => api.s.dead_letters.get(&id).map(|entry| (entry, permit)),
        Err(busy) => return busy,
    };
    let kept = match here {
        Some(found) => Some(found),
        None => {
            let turn = match finding_turn(&api).await {
                Ok(turn) => turn,
                Err(busy) => return busy,
            };
            match find_in_broker(&api, &id).await {
                Ok(Some(entry)) => match copying_turn(&api).await {
                    Ok(permit) => {
                        drop(turn);
                        Some((entry, permit))
                    }
                    Err(busy) => return busy,
                },
                Ok(None) => None,
                Err(unreadable) => return unreadable,
            }
        }
    };
    match kept {
        Some((entry, permit)) => {
            let body = tokio::task::spawn_blocking(move || json!({ "dead_letter": entry }).to_string()).await;
            match body {
                Ok(body) => json_in_turn(body, Some(permit)),
                Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("host error: writing the dead letter: {e}")),
            }
        }
        None => error(
            StatusCode::NOT_FOUND,
            format!("no kept dead letter has id {} (see GET /v1/dlq)", crate::event::quoted(&id)),
        ),
    }
}

/// The dead letter `id` as the broker keeps it, if it does.
/// One lookup at a time (each may read thousands of messages back, one request each), waited
/// for at most `api.publish_timeout` ([`finding_turn`]).
/// `Err`: the `503` to answer when the broker's dead letters could not be read (not "no such
/// dead letter": a replay by id would then take this host's copy and leave the broker's).
async fn broker_entry(api: &Inner, id: &str) -> Result<Option<crate::deadletter::Entry>, Response> {
    let _turn = finding_turn(api).await?;
    find_in_broker(api, id).await
}

/// The turn at looking a dead letter up in the broker, waited for at most
/// `api.publish_timeout`; else the `503` to answer.
async fn finding_turn(api: &Inner) -> Result<tokio::sync::MutexGuard<'_, ()>, Response> {
    match tokio::time::timeout(api.settings.publish_timeout, api.finding_dead_letter.lock()).await {
        Ok(turn) => Ok(turn),
        Err(_) => {
            let why = "another request is looking a dead letter up in the broker: try again in a moment";
            Err(with_retry_after(error(StatusCode::SERVICE_UNAVAILABLE, why), 1))
        }
    }
}

/// [`broker_entry`] for a caller holding the [`finding_turn`].
async fn find_in_broker(api: &Inner, id: &str) -> Result<Option<crate::deadletter::Entry>, Response> {
    api.s.transport.find_dead_letter(id).await.map_err(|e| {
        error(StatusCode::SERVICE_UNAVAILABLE, format!("the broker's dead letters could not be read now: {e}"))
    })
}

/// `POST /v1/dlq/{id}/replay`: re-publishes one kept dead letter (a new id made from the dead letter's, `plugbus-replay-of`);
/// like the bulk replay, in its own task, and put back when the bus does not take it. As in the
/// bulk replay, a dead letter the broker keeps is replayed from the broker, which then forgets
/// it, and this host's copy of it goes too: otherwise the broker's copy would be replayed again
/// by the next replay, here or on another host.
async fn dlq_replay_one(State(api): State<Api>, Path(id): Path<String>) -> Response {
    if !api.replaying_one.lock().expect("replaying poisoned").insert(id.clone()) {
        return error(
            StatusCode::CONFLICT,
            format!("the dead letter {} is being replayed by another request", crate::event::quoted(&id)),
        );
    }
    // Held by the replay's task: the id is let go when the replay ends, even after this request
    // was dropped (a client that hung up).
    struct Replaying(Api, String);
    impl Drop for Replaying {
        fn drop(&mut self) {
            self.0.replaying_one.lock().expect("replaying poisoned").remove(&self.1);
        }
    }
    let replaying = Replaying(api.clone(), id.clone());
    let task_api = api.clone();
    let broker = match broker_entry(&api, &id).await {
        Ok(broker) => broker,
        Err(unreadable) => return unreadable,
    };
    let mine = api.s.dead_letters.take_id(&id);
    // The broker's copy without its data, when this host keeps it whole: replayed from here.
    let (broker, copy) = match (broker, &mine) {
        (Some(b), Some(m)) if whole_here(&b, m) => (None, Some(b)),
        (b, _) => (b, None),
    };
    // One that can never be replayed (no, an invalid or a system original subject) is kept and
    // answered `422` with why: a `503` would tell the client to try again.
    if let Some(Err(why)) = broker.as_ref().or(mine.as_ref()).map(|e| replay_of(&api, &e.event)) {
        let mine: Vec<_> = mine.into_iter().collect();
        api.s.dead_letters.write_off_runtime(move |s| s.restore(mine)).await;
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("the dead letter {} is not replayed, and is kept: {why}", crate::event::quoted(&id)),
        );
    }
    let report = match (broker, mine) {
        (Some(entry), mine) => {
            tokio::spawn(async move {
                let _replaying = replaying;
                let mut report = ReplayReport::default();
                replay_from_broker(&task_api, vec![entry], &mut report).await;
                // Not replayed: the broker still keeps it, and so does this host. Left to another
                // replay, which replays the broker's: this host's copy goes, as when replayed here.
                let mine: Vec<_> = mine.into_iter().collect();
                let replayed = !report.replayed.is_empty() || report.left_to_another();
                task_api
                    .s
                    .dead_letters
                    .write_off_runtime(move |s| if replayed { s.forget(&mine) } else { s.restore(mine) })
                    .await;
                report.to_json()
            })
            .await
        }
        (None, Some(entry)) => {
            tokio::spawn(async move {
                let _replaying = replaying;
                let mut report = ReplayReport::default();
                replay_whole_here(&task_api, vec![entry], copy.into_iter().collect(), &mut report).await;
                report.to_json()
            })
            .await
        }
        (None, None) => {
            return error(
                StatusCode::NOT_FOUND,
                format!("no kept dead letter has id {} (see GET /v1/dlq)", crate::event::quoted(&id)),
            );
        }
    };
    match report {
        Ok(report) if report["failed"] == 0 => Json(report).into_response(),
        Ok(report) => (StatusCode::SERVICE_UNAVAILABLE, Json(report)).into_response(),
        Err(_) => error(StatusCode::INTERNAL_SERVER_ERROR, "the replay task ended without a report (see the log)"),
    }
}

/// `POST /v1/dlq/{id}/debug`: runs one kept dead letter again exactly as it ran (recorded kv
/// and config reads fed back, the same attempt number, ids, time and random fixed by the
/// event) on the version that failed and, when the body holds component bytes
/// (`application/wasm`, at most `max_wasm_bytes`), on that candidate; answers both outcomes.
/// Publishes nothing and writes no kv (see [`crate::dlq_debug`]).
async fn dlq_debug(State(api): State<Api>, Path(id): Path<String>, headers: HeaderMap, body: Body) -> Response {
    // Taken before the body is read: a client trickling a candidate holds its run.
    let Ok(_run) = api.debugging.clone().try_acquire_owned() else {
        let why =
            format!("{DEBUG_RUNS_AT_ONCE} dead-letter debug runs are at work already: try again when one is done");
        return error(StatusCode::SERVICE_UNAVAILABLE, why);
    };
    let cap = api.s.reloader.config.max_wasm_bytes;
    let read_timeout = api.settings.read_timeout;
    let too_big = || {
        error(StatusCode::PAYLOAD_TOO_LARGE, format!("the candidate component is over max_wasm_bytes ({cap} bytes)"))
    };
    let declared = headers.get(axum::http::header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cap) {
        return too_big();
    }
    // Bounded in time too: a client trickling its candidate held one of the runs for ever.
    let read = axum::body::to_bytes(body, usize::try_from(cap).unwrap_or(usize::MAX));
    let Ok(read) = tokio::time::timeout(read_timeout, read).await else {
        let waited = humantime::format_duration(read_timeout);
        return error(
            StatusCode::REQUEST_TIMEOUT,
            format!("the candidate was not in within {waited} (api.read_timeout)"),
        );
    };
    let Ok(bytes) = read else {
        return too_big();
    };
    let kind = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let kind = kind.split(';').next().unwrap_or("").trim();
    if !bytes.is_empty() && !kind.eq_ignore_ascii_case("application/wasm") {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("a candidate component is sent as Content-Type: application/wasm (got {kind:?})"),
        );
    }
    let entry = match api.s.dead_letters.get(&id) {
        Some(entry) => entry,
        None => match broker_entry(&api, &id).await {
            Err(unreadable) => return unreadable,
            Ok(Some(entry)) => entry,
            Ok(None) => {
                return error(
                    StatusCode::NOT_FOUND,
                    format!("no kept dead letter has id {} (see GET /v1/dlq)", crate::event::quoted(&id)),
                );
            }
        },
    };
    let serving = api.s.router.current(&entry.plugin);
    let candidate = (!bytes.is_empty()).then_some(&bytes[..]);
    let reloader = &api.s.reloader;
    match crate::dlq_debug::debug(&entry, serving, &reloader.sandbox, &reloader.config, candidate).await {
        Ok(answer) => Json(answer).into_response(),
        Err(e @ crate::dlq_debug::DebugError::Kv(_)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e @ crate::dlq_debug::DebugError::Gone { .. }) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ crate::dlq_debug::DebugError::HostBusy(_)) => {
            with_retry_after(error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()), 1)
        }
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e.to_string()),
    }
}

/// `GET /v1/stats`: per plugin the last minute and the totals, the pipeline graph, the
/// rejected files (what the dashboard shows; see [`crate::stats`]).
async fn stats(State(api): State<Api>) -> Response {
    // Off the runtime: plugin authors' manifests make the graph (see `stats::MAX_MATCH_EDGES`).
    match tokio::task::spawn_blocking(move || stats_now(&api)).await {
        Ok(stats) => stats,
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, format!("host error: gathering the stats: {e}")),
    }
}

fn stats_now(api: &Api) -> Response {
    let state = &api.s;
    let plugins = state.router.plugins();
    let windows = state.router.windows();
    let graph = crate::stats::graph(&plugins, &windows);
    let rows = plugins
        .iter()
        .map(|p| crate::stats::plugin_stats(p, windows.get(&p.name).cloned().unwrap_or_default()))
        .collect();
    let (rejected, rejected_total) = listed_rejected(state, |r| crate::stats::RejectedFile {
        file: r.path.display().to_string(),
        reason: r.reason.clone(),
    });
    Json(crate::stats::Stats {
        window_seconds: crate::window::SECONDS as u64,
        plugins: rows,
        graph,
        rejected,
        rejected_total,
        dead_letters_kept: state.dead_letters.usage().0,
    })
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_listings_estimate_of_data_never_passes_what_it_writes() {
        for data in [
            &b"plain"[..],
            b"\x01\x01\x02",
            b"\"quoted\" \\ \n\t",
            "caf\u{e9} \u{1f600}".as_bytes(),
            &[0xff, 0xfe, 0x41],
        ] {
            let mut written = serde_json::to_string(&String::from_utf8_lossy(data)).unwrap().len() - 2;
            if std::str::from_utf8(data).is_err() {
                written += crate::cloudevents::base64_encode(data).len();
            }
            assert!(json_len_at_least(data) <= written, "{data:?}: {} > {written}", json_len_at_least(data));
        }
        assert_eq!(json_len_at_least(&[1u8; 1000]), 6000, "a control byte is six");
    }

    /// Beside the broker's newest page, only this host's dead letters the broker does not hold
    /// are listed: never its copies of the page's, nor (beside a full page) older ones that may
    /// be in the broker past the page; beside a page that is not full, every one it lacks.
    #[test]
    fn a_hosts_own_dead_letters_are_listed_beside_the_brokers_page_only_when_it_lacks_them() {
        let entry = |id: &str, at: &str| {
            let mut event = crate::event::Event::new("plugbus.dlq.p", "");
            event.id = id.into();
            event.extensions.push((crate::deadletter::headers::FAILED_AT.into(), at.into()));
            crate::deadletter::Entry { seq: 0, plugin: "p".into(), event, record: None }
        };
        let ids = |v: Vec<crate::deadletter::Entry>| v.into_iter().map(|e| e.event.id).collect::<Vec<_>>();
        let page = [entry("b2", "2026-01-01T00:00:02.000Z"), entry("b3", "2026-01-01T00:00:03.000Z")];
        let local = || {
            vec![
                entry("old", "2026-01-01T00:00:01.000Z"),
                entry("b2", "2026-01-01T00:00:02.000Z"),
                entry("b3", "2026-01-01T00:00:03.000Z"),
                entry("new", "2026-01-01T00:00:04.000Z"),
            ]
        };
        assert_eq!(ids(only_here(&page, local(), 2)), ["new"]);
        assert_eq!(ids(only_here(&page, local(), 3)), ["old", "new"], "the broker holds no other");
        assert_eq!(ids(only_here(&[], local(), 2)), ["old", "b2", "b3", "new"], "no broker page");
    }

    /// A dead letter the broker keeps without its data is replayed from this host's copy only
    /// when that copy is whole; any other is replayed from the broker's.
    #[test]
    fn a_dead_letter_is_replayed_from_this_hosts_copy_only_where_the_brokers_lacks_its_data() {
        use crate::deadletter::{Entry, headers::DATA_OMITTED};
        let entry = |id: &str, data: &'static str, omitted: bool| {
            let mut event = crate::Event::new("plugbus.dlq.p", data);
            event.id = id.into();
            if omitted {
                event.extensions.push((DATA_OMITTED.into(), "its data".into()));
            }
            Entry { seq: 1, plugin: "p".into(), event, record: None }
        };
        let (without, whole) = (entry("a", "", true), entry("a", "data", false));
        assert!(whole_here(&without, &whole));
        assert!(!whole_here(&without, &entry("b", "data", false)), "another dead letter");
        assert!(!whole_here(&without, &entry("a", "", true)), "this host's copy lacks it too");
        assert!(!whole_here(&whole, &whole), "the broker's copy is whole");
    }

    #[test]
    fn loopback_hosts_are_told_from_foreign_names() {
        for ok in [
            "localhost",
            "localhost:7070",
            "LOCALHOST:1",
            "api.localhost:7070",
            "127.0.0.1",
            "127.0.0.1:7070",
            "127.3.2.1:80",
            "[::1]:7070",
            "[::1]",
            "[::ffff:127.0.0.1]:7070",
        ] {
            assert!(is_loopback_host(ok), "{ok}");
        }
        for bad in [
            "evil.example",
            "evil.example:7070",
            "localhost.evil.example",
            "10.0.0.1:7070",
            "[::2]:7070",
            "0.0.0.0:7070",
            "[::1",
            "localhost.",
        ] {
            assert!(!is_loopback_host(bad), "{bad}");
        }
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive_and_the_token_exact() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer abc"), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearerabc"), None);
    }

    #[test]
    fn system_subjects_and_reserved_headers_are_named() {
        for s in ["$SYS.x", "$JS.API.INFO", "$KV.plugbus_payments.k", "_INBOX.abc", "_INBOX"] {
            assert!(system_subject(s).is_some_and(|m| m.contains(s)), "{s}");
        }
        for s in ["orders.created", "SYS.x", "INBOX.x", "_INBOXES.x"] {
            assert!(system_subject(s).is_none(), "{s}");
        }
        let mut h = HeaderMap::new();
        h.insert("ce-tenant", HeaderValue::from_static("a"));
        assert!(reserved_header(&h).is_none());
        h.insert("ce-plugbus-error", HeaderValue::from_static("x"));
        assert!(reserved_header(&h).unwrap().contains("ce-plugbus-error"));
    }

    /// A header value in UTF-8 that is not plain ASCII (`ce-customer: Müller`) was left out, the
    /// event taken (`202`) without it; one that is not UTF-8 is refused, naming it.
    #[test]
    fn a_header_in_utf8_is_kept_and_one_in_no_utf8_is_refused_by_name() {
        let mut h = HeaderMap::new();
        h.insert("ce-customer", HeaderValue::from_bytes("Müller".as_bytes()).unwrap());
        assert_eq!(header_pairs(&h).unwrap(), [("ce-customer", "Müller")]);
        let ev =
            crate::cloudevents::decode("orders.created", header_pairs(&h).unwrap().into_iter(), "".into()).unwrap();
        assert_eq!(ev.header("customer"), Some("Müller"));
        // one the event never takes is left out, as before
        h.insert("user-agent", HeaderValue::from_bytes(b"K\xf6ln/1.0").unwrap());
        assert_eq!(header_pairs(&h).unwrap(), [("ce-customer", "Müller")]);
        h.insert("ce-city", HeaderValue::from_bytes(b"K\xf6ln").unwrap());
        assert!(header_pairs(&h).unwrap_err().contains("\"ce-city\" is not UTF-8"));
    }

    #[test]
    fn retry_after_is_whole_seconds_at_least_one() {
        assert_eq!(retry_after_secs(Duration::from_millis(300)), 1);
        assert_eq!(retry_after_secs(Duration::from_secs(5)), 5);
        assert_eq!(retry_after_secs(Duration::from_millis(5001)), 6);
    }
}
