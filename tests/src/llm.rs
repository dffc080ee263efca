//! A stand-in for an OpenAI-compatible Chat Completions endpoint that
//! answers every request after a fixed delay, for the benchmark's LLM mode.

use axum::routing::post;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct SlowLlm {
    /// The base URL to configure as `[respond.llm] base_url`.
    pub base_url: String,
    /// The most requests that were in flight at once.
    pub peak_in_flight: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl SlowLlm {
    pub async fn start(delay: Duration) -> SlowLlm {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak_in_flight = Arc::new(AtomicUsize::new(0));
        let (now, peak) = (in_flight.clone(), peak_in_flight.clone());
        let app = Router::new().route(
            "/v1/chat/completions",
            post(move |Json(_body): Json<Value>| {
                let (now, peak) = (now.clone(), peak.clone());
                async move {
                    let current = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(current, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    Json(json!({ "choices": [{ "message": { "role": "assistant", "content": "Our plans start at $10 a month." } }] }))
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("llm port");
        let base_url = format!("http://{}/v1", listener.local_addr().expect("addr"));
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .await
                .expect("llm stand-in serves");
        });
        SlowLlm {
            base_url,
            peak_in_flight,
            server,
        }
    }
}

impl Drop for SlowLlm {
    fn drop(&mut self) {
        self.server.abort();
    }
}
