//! The demo's outside world: a payment provider and a mail API, each on its own loopback port,
//! so `scripts/demo` shows handlers calling out (`examples/payments`, `examples/notify`).
//!
//! `demo-stubs [--pay-port 7071] [--mail-port 7072]`
//!
//! - payment provider: `POST /v1/charges` with `{"order_id", "amount_cents", "email"}` answers
//!   `201 {"id": "ch_N", "status": "captured", ...}`; `402 {"error": "card_declined"}` for an
//!   amount over 50,000.00.
//! - mail API: `POST /v1/messages` with `{"from", "to", "subject", "text"}` answers
//!   `202 {"id": "msg_N"}`.
//!
//! Both honour `Idempotency-Key` as payment APIs do: a request repeating a key gets the first
//! answer again (with `Idempotent-Replayed: true`) and nothing happens twice. Every request is
//! one line on stdout, with its key. Keys are remembered up to [`MAX_KEYS`] per API (oldest
//! forgotten first). A stand-in for the demo, not a server to expose: it binds 127.0.0.1 only.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Idempotency keys remembered per API.
const MAX_KEYS: usize = 10_000;

/// The largest charge the stub provider accepts, in cents.
const MAX_CHARGE_CENTS: u64 = 5_000_000;

/// One API's memory: answers by idempotency key, and a counter for ids.
#[derive(Default)]
struct Api {
    answers: HashMap<String, (StatusCode, Value)>,
    order: VecDeque<String>,
    next_id: u64,
}

impl Api {
    /// The first answer given for `key`, or `make`'s (remembered under `key`).
    fn answer(
        &mut self,
        key: Option<&str>,
        make: impl FnOnce(u64) -> (StatusCode, Value),
    ) -> (StatusCode, Value, bool) {
        if let Some((status, body)) = key.and_then(|k| self.answers.get(k)) {
            return (*status, body.clone(), true);
        }
        self.next_id += 1;
        let (status, body) = make(self.next_id);
        if let Some(k) = key {
            if self.order.len() >= MAX_KEYS
                && let Some(old) = self.order.pop_front()
            {
                self.answers.remove(&old);
            }
            self.order.push_back(k.to_string());
            self.answers.insert(k.to_string(), (status, body.clone()));
        }
        (status, body, false)
    }
}

type Shared = Arc<Mutex<Api>>;

fn key_of(headers: &HeaderMap) -> Option<String> {
    headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

fn reply(status: StatusCode, body: Value, replayed: bool) -> Response {
    let mut res = (status, axum::Json(body)).into_response();
    if replayed {
        res.headers_mut().insert("idempotent-replayed", "true".parse().expect("a header value"));
    }
    res
}

fn bad_request(api: &str, why: String) -> Response {
    println!("[{api}] 400 {why}");
    (StatusCode::BAD_REQUEST, axum::Json(json!({ "error": why }))).into_response()
}

async fn charge(State(api): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request("payment-provider", format!("the body is not JSON: {e}")),
    };
    let (Some(order), Some(amount)) = (req["order_id"].as_str(), req["amount_cents"].as_u64()) else {
        return bad_request("payment-provider", "order_id and amount_cents are required".into());
    };
    let key = key_of(&headers);
    let (status, answer, replayed) = api.lock().expect("stub state").answer(key.as_deref(), |n| {
        if amount > MAX_CHARGE_CENTS {
            (StatusCode::PAYMENT_REQUIRED, json!({ "error": "card_declined", "order_id": order }))
        } else {
            let charge =
                json!({ "id": format!("ch_{n}"), "status": "captured", "order_id": order, "amount_cents": amount });
            (StatusCode::CREATED, charge)
        }
    });
    println!(
        "[payment-provider] POST /v1/charges order={order} amount={}.{:02} idempotency-key={} -> {} {}{}",
        amount / 100,
        amount % 100,
        key.as_deref().unwrap_or("(none)"),
        status.as_u16(),
        answer["id"].as_str().or(answer["error"].as_str()).unwrap_or("?"),
        if replayed { " (repeated key: the first answer again, not charged twice)" } else { "" }
    );
    reply(status, answer, replayed)
}

async fn message(State(api): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => return bad_request("mail-api", format!("the body is not JSON: {e}")),
    };
    let Some(to) = req["to"].as_str() else {
        return bad_request("mail-api", "`to` is required".into());
    };
    let key = key_of(&headers);
    let (status, answer, replayed) = api
        .lock()
        .expect("stub state")
        .answer(key.as_deref(), |n| (StatusCode::ACCEPTED, json!({ "id": format!("msg_{n}") })));
    println!(
        "[mail-api] POST /v1/messages to={to} subject={:?} idempotency-key={} -> {} {}{}",
        req["subject"].as_str().unwrap_or(""),
        key.as_deref().unwrap_or("(none)"),
        status.as_u16(),
        answer["id"].as_str().unwrap_or("?"),
        if replayed { " (repeated key: not sent twice)" } else { "" }
    );
    reply(status, answer, replayed)
}

fn port_arg(args: &[String], name: &str, default: u16) -> Result<u16, String> {
    match args.iter().position(|a| a == name) {
        None => Ok(default),
        Some(i) => args
            .get(i + 1)
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("{name} takes a port number (e.g. {name} {default})")),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let Some(unknown) = args.iter().find(|a| a.starts_with("--") && *a != "--pay-port" && *a != "--mail-port") {
        eprintln!("demo-stubs: unknown option {unknown} (options: --pay-port PORT, --mail-port PORT)");
        std::process::exit(2);
    }
    let ports = port_arg(&args, "--pay-port", 7071).and_then(|p| Ok((p, port_arg(&args, "--mail-port", 7072)?)));
    let (pay_port, mail_port) = ports.unwrap_or_else(|e| {
        eprintln!("demo-stubs: {e}");
        std::process::exit(2);
    });
    let pay = Router::new().route("/v1/charges", post(charge)).with_state(Shared::default());
    let mail = Router::new().route("/v1/messages", post(message)).with_state(Shared::default());
    let bind = |port: u16| async move {
        tokio::net::TcpListener::bind(("127.0.0.1", port)).await.unwrap_or_else(|e| {
            eprintln!("demo-stubs: cannot listen on 127.0.0.1:{port}: {e}");
            std::process::exit(1);
        })
    };
    let (pay_listener, mail_listener) = (bind(pay_port).await, bind(mail_port).await);
    println!("[demo-stubs] payment provider on http://127.0.0.1:{pay_port}, mail API on http://127.0.0.1:{mail_port}");
    let served = tokio::try_join!(axum::serve(pay_listener, pay), axum::serve(mail_listener, mail));
    if let Err(e) = served {
        eprintln!("demo-stubs: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_key_gets_the_first_answer_and_nothing_happens_twice() {
        let mut api = Api::default();
        let charge = |n| (StatusCode::CREATED, json!({ "id": format!("ch_{n}") }));
        let (s1, first, replayed) = api.answer(Some("k1"), charge);
        assert_eq!((s1, first["id"].as_str(), replayed), (StatusCode::CREATED, Some("ch_1"), false));
        let (_, again, replayed) = api.answer(Some("k1"), |_| panic!("charged twice"));
        assert_eq!((again, replayed), (first, true));
        assert_eq!(api.answer(Some("k2"), charge).1["id"], "ch_2");
        assert_eq!(api.answer(None, charge).1["id"], "ch_3", "no key: a new charge every time");
        assert_eq!(api.answer(None, charge).1["id"], "ch_4");
    }

    #[test]
    fn keys_are_remembered_up_to_the_bound() {
        let mut api = Api::default();
        for i in 0..MAX_KEYS + 1 {
            api.answer(Some(&format!("k{i}")), |n| (StatusCode::ACCEPTED, json!(n)));
        }
        assert_eq!(api.answers.len(), MAX_KEYS);
        assert!(!api.answers.contains_key("k0"), "the oldest key is forgotten first");
    }
}
