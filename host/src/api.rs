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
    /// Largest accepted body.
    pub max_event_bytes: usize,
}

/// The API's routes.
pub fn router(state: ApiState) -> axum::Router {
    axum::Router::new()
        .route("/healthz", get(|| async { Json(json!({ "status": "ok" })) }))
        .route("/v1/plugins", get(plugins))
        .route("/v1/events/{subject}", post(publish))
        .route("/v1/dlq", get(dlq_list))
        .route("/v1/dlq/replay", post(dlq_replay))
        .route("/v1/events", post(empty_subject))
        .route("/v1/events/", post(empty_subject))
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
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
