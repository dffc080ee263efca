//! A local HTTP server standing in for the receiver of botline's generic
//! outbound webhook: it checks each request's signature as a receiver
//! should, records it, and answers as told (200, an error status, or not
//! at all).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One request the sink received.
#[derive(Debug, Clone)]
pub struct Received {
    pub idempotency_key: String,
    pub in_reply_to: String,
    pub chat: String,
    pub text: String,
    pub signature_ok: bool,
    pub at: Instant,
}

/// How the sink answers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Answer {
    Ok,
    Status(u16),
    /// 429 with `Retry-After: <seconds>`.
    RetryAfter(u64),
    /// No answer: the request is held until the sender gives up on it.
    Hang,
}

struct SinkState {
    secret: String,
    received: Mutex<Vec<Received>>,
    answer: Mutex<Answer>,
}

pub struct Sink {
    pub url: String,
    state: Arc<SinkState>,
    server: tokio::task::JoinHandle<()>,
}

fn signature_ok(secret: &str, headers: &HeaderMap, body: &[u8]) -> bool {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    };
    let Some(signature) = header("x-botline-signature").strip_prefix("sha256=") else {
        return false;
    };
    let Ok(signature) = hex::decode(signature) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(header("x-botline-timestamp").as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&signature).is_ok()
}

async fn receive(State(state): State<Arc<SinkState>>, headers: HeaderMap, body: Bytes) -> Response {
    let answer = *state.answer.lock().unwrap();
    match answer {
        Answer::Ok => {}
        Answer::Status(code) => {
            return StatusCode::from_u16(code)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                .into_response()
        }
        Answer::RetryAfter(seconds) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", seconds.to_string())],
            )
                .into_response()
        }
        Answer::Hang => {
            // Dropped (unrecorded) when the sender closes the connection.
            tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
            return StatusCode::SERVICE_UNAVAILABLE.into_response();
        }
    }
    let json: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let field = |name: &str| json[name].as_str().unwrap_or_default().to_string();
    let received = Received {
        idempotency_key: headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        in_reply_to: field("in_reply_to"),
        chat: json["chat"]["id"].as_str().unwrap_or_default().to_string(),
        text: field("text"),
        signature_ok: signature_ok(&state.secret, &headers, &body),
        at: Instant::now(),
    };
    state.received.lock().unwrap().push(received);
    StatusCode::OK.into_response()
}

impl Sink {
    pub async fn start(secret: &str) -> Sink {
        let state = Arc::new(SinkState {
            secret: secret.to_string(),
            received: Mutex::new(Vec::new()),
            answer: Mutex::new(Answer::Ok),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("sink port");
        let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(state.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("sink serves");
        });
        Sink { url, state, server }
    }

    pub fn answer_with(&self, answer: Answer) {
        *self.state.answer.lock().unwrap() = answer;
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.state.received.lock().unwrap().len()
    }

    /// Distinct replies (by idempotency key) per inbound message.
    pub fn replies_per_message(&self) -> HashMap<String, usize> {
        let mut keys: HashMap<String, std::collections::HashSet<String>> = HashMap::new();
        for received in self.received() {
            keys.entry(received.in_reply_to)
                .or_default()
                .insert(received.idempotency_key);
        }
        keys.into_iter()
            .map(|(message, replies)| (message, replies.len()))
            .collect()
    }

    /// Requests that repeated an idempotency key already received: a
    /// delivery interrupted between the receiver's answer and botline's
    /// record of it, which the key lets the receiver drop.
    pub fn repeated_keys(&self) -> usize {
        let received = self.received();
        let unique: std::collections::HashSet<&str> = received
            .iter()
            .map(|r| r.idempotency_key.as_str())
            .collect();
        received.len() - unique.len()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.server.abort();
    }
}
