//! A stand-in for an OpenAI-compatible Chat Completions endpoint: after a
//! fixed delay with the same answer (the benchmark's LLM mode), or after a
//! random delay echoing what it was asked (the ordering test).

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

/// How the stand-in answers one request.
type Answerer = fn(&Value) -> (Duration, String);

impl SlowLlm {
    /// Every answer the same, after `delay`.
    pub async fn start(delay: Duration) -> SlowLlm {
        Self::serve(move |_| (delay, "Our plans start at $10 a month.".into())).await
    }

    /// After a random delay up to 150 ms, answers `<last user turn> | <user
    /// turns before it>`, so a test sees which message each reply answers
    /// and how much of the chat's context came with it.
    pub async fn echoing() -> SlowLlm {
        let answer: Answerer = |request| {
            let users: Vec<&str> = request["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|turn| turn["role"] == "user")
                .filter_map(|turn| turn["content"].as_str())
                .collect();
            let last = users.last().copied().unwrap_or_default();
            let delay = Duration::from_millis(rand::random::<u64>() % 150);
            (delay, format!("{last} | {}", users.len().saturating_sub(1)))
        };
        Self::serve(answer).await
    }

    async fn serve(
        answer: impl Fn(&Value) -> (Duration, String) + Clone + Send + Sync + 'static,
    ) -> SlowLlm {
        let in_flight = Arc::new(AtomicUsize::new(0));
        let peak_in_flight = Arc::new(AtomicUsize::new(0));
        let (now, peak) = (in_flight.clone(), peak_in_flight.clone());
        let app = Router::new().route(
            "/v1/chat/completions",
            post(move |Json(body): Json<Value>| {
                let (now, peak) = (now.clone(), peak.clone());
                let (delay, content) = answer(&body);
                async move {
                    let current = now.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(current, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    Json(json!({ "choices": [{ "message": { "role": "assistant", "content": content } }] }))
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
