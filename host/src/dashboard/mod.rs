//! `GET /`: the dashboard, one page (HTML, JS, CSS embedded in the binary with `include_str!`:
//! no build step, no CDN, works offline). The page only calls the API (`/v1/stats`, `/v1/dlq`,
//! the SSE tail, the replay routes) with the token the user typed, like any other client.
//!
//! Invariants:
//! - The assets are static and hold no secret, so they are served without the token; every
//!   route holding data stays behind the API's guard.
//! - The page runs no inline script and loads nothing from elsewhere (its Content-Security-Policy
//!   says `'self'` only) and cannot be framed (`frame-ancestors 'none'`): another site can neither
//!   inject into it nor overlay its replay buttons.
//! - Everything the page shows from events is set as text, never as HTML.

use axum::http::{HeaderValue, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

const INDEX: &str = include_str!("index.html");
const SCRIPT: &str = include_str!("dashboard.js");
const STYLE: &str = include_str!("dashboard.css");

/// The Content-Security-Policy of every asset.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; \
                       img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The dashboard's routes (unguarded: static assets only).
pub fn routes<S: Clone + Send + Sync + 'static>() -> axum::Router<S> {
    axum::Router::new()
        .route("/", get(|| async { asset(INDEX, "text/html; charset=utf-8") }))
        .route("/dashboard.js", get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }))
        .route("/dashboard.css", get(|| async { asset(STYLE, "text/css; charset=utf-8") }))
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = body.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
