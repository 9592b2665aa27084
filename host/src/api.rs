//! The HTTP API (axum): event ingress, health and plugin listing.
//!
//! Invariant: a request either gets its event accepted by the transport (202 with the id) or a
//! JSON error saying what was wrong; a slow plugin never turns into an error here (at worst
//! the answer waits for backpressure).

use crate::loader::Rejected;
use crate::router::Router;
use crate::subject::validate_subject;
use crate::transport::Transport;
use axum::Json;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use std::sync::{Arc, Mutex};

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// Where ingress events go.
    pub transport: Arc<dyn Transport>,
    /// The live plugins.
    pub router: Arc<Router>,
    /// Files that could not be loaded.
    pub rejected: Arc<Mutex<Vec<Rejected>>>,
    /// Kept dead letters.
    pub dead_letters: Arc<crate::deadletter::DeadLetters>,
    /// Counters and gauges.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Reload state (compile cache counters).
    pub reloader: Arc<crate::reload::Reloader>,
    /// Bearer token guarding every route but `/healthz`.
    pub api_token: Option<String>,
    /// Largest accepted body.
    pub max_event_bytes: usize,
}

/// The API's routes.
pub fn router(state: ApiState) -> axum::Router {
    let guarded = axum::Router::new()
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/plugins", get(plugins))
        .route("/v1/events/{subject}", post(publish).get(tail))
        .route("/v1/dlq", get(dlq_list))
        .route("/v1/dlq/replay", post(dlq_replay))
        .route("/v1/events", post(empty_subject))
        .route("/v1/events/", post(empty_subject))
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(state.clone(), require_token));
    axum::Router::new()
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .merge(guarded)
        .with_state(state)
}

/// Checks `Authorization: Bearer <token>` when the host has a token.
async fn require_token(
    State(state): State<ApiState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if let Some(token) = &state.api_token {
        let given =
            req.headers().get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(token.as_str()) {
            return error(StatusCode::UNAUTHORIZED, "missing or wrong API token (Authorization: Bearer <token>)");
        }
    }
    next.run(req).await
}

async fn readyz(State(state): State<ApiState>) -> Response {
    let connected = state.transport.is_connected();
    let body =
        Json(json!({ "ready": connected, "transport": state.transport.name(), "plugins": state.router.names().len() }));
    let status = if connected { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, body).into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    use std::sync::atomic::Ordering::Relaxed;
    state.router.refresh_gauges();
    let cache = state.reloader.sandbox.cache_stats();
    state.metrics.compiled.set(cache.compiled.load(Relaxed) as i64);
    state.metrics.cache_hits.set(cache.hits.load(Relaxed) as i64);
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(axum::http::header::CONTENT_TYPE, content_type)], state.metrics.encode()).into_response()
}

/// `GET /v1/events/{pattern}`: a Server-Sent-Events stream of every event matching the pattern.
async fn tail(State(state): State<ApiState>, Path(pattern): Path<String>) -> Response {
    use axum::response::sse::{Event as Sse, KeepAlive};
    if let Err(e) = crate::subject::Pattern::parse(&pattern) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let rx = match state.transport.observe(vec![pattern], 4096).await {
        Ok(rx) => rx,
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let ev = rx.recv().await?;
        let body = json!({
            "id": ev.id, "source": ev.source, "type": ev.ty, "subject": ev.subject, "time": ev.time,
            "datacontenttype": ev.datacontenttype, "headers": ev.extensions,
            "data": String::from_utf8_lossy(&ev.data),
        });
        Some((Ok::<_, std::convert::Infallible>(Sse::default().event("event").data(body.to_string())), rx))
    });
    axum::response::sse::Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

async fn empty_subject() -> Response {
    error(StatusCode::BAD_REQUEST, "the subject is empty: POST /v1/events/{subject}")
}

async fn publish(
    State(state): State<ApiState>,
    Path(subject): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    if let Err(e) = validate_subject(&subject) {
        return error(StatusCode::BAD_REQUEST, e.to_string());
    }
    let data = match axum::body::to_bytes(body, state.max_event_bytes).await {
        Ok(b) => b,
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the body is over the {}-byte event limit", state.max_event_bytes),
            );
        }
    };
    let event = match crate::cloudevents::decode(&subject, header_pairs(&headers), data) {
        Ok(ev) => ev,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let id = event.id.clone();
    match state.transport.publish(event).await {
        Ok(()) => (StatusCode::ACCEPTED, Json(json!({ "id": id }))).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn plugins(State(state): State<ApiState>) -> Response {
    let rejected: Vec<_> = state
        .rejected
        .lock()
        .expect("poisoned")
        .iter()
        .map(|r| json!({ "file": r.path.display().to_string(), "state": format!("rejected: {}", r.reason) }))
        .collect();
    Json(json!({ "plugins": state.router.plugins(), "rejected": rejected })).into_response()
}

fn header_pairs(headers: &HeaderMap) -> impl Iterator<Item = (&str, &str)> {
    headers.iter().filter_map(|(k, v)| v.to_str().ok().map(|v| (k.as_str(), v)))
}

#[derive(serde::Deserialize)]
struct DlqQuery {
    plugin: Option<String>,
}

async fn dlq_list(State(state): State<ApiState>, Query(q): Query<DlqQuery>) -> Response {
    Json(json!({ "dead_letters": state.dead_letters.list(q.plugin.as_deref()) })).into_response()
}

/// Re-publishes kept dead letters to their original subjects (fresh ids, `plugbus-replay-of`).
async fn dlq_replay(State(state): State<ApiState>, Query(q): Query<DlqQuery>) -> Response {
    let taken = state.dead_letters.take(q.plugin.as_deref());
    let mut replayed = Vec::new();
    let mut failed = Vec::new();
    for entry in taken {
        let Some(event) = crate::deadletter::replay_event(&entry.event) else { continue };
        let id = event.id.clone();
        match state.transport.publish(event).await {
            Ok(()) => replayed.push(json!({ "dead_letter": entry.event.id, "id": id })),
            Err(e) => {
                tracing::error!(plugin = %entry.plugin, event_id = %entry.event.id, "replay failed: {e}");
                failed.push(entry);
            }
        }
    }
    let kept = failed.len();
    state.dead_letters.restore(failed);
    Json(json!({ "replayed": replayed, "failed": kept })).into_response()
}
