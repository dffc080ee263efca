//! Replies from any OpenAI-compatible Chat Completions endpoint (OpenAI,
//! DeepSeek, Qwen, Ollama, vLLM, llama.cpp server …). Each request carries
//! the system prompt, the chat's earlier turns (oldest first, trimmed to a
//! character budget, group turns naming their speaker) and the message.
//! 429/5xx/timeouts are retried with backoff within one time budget; a
//! circuit breaker stops calling an endpoint that keeps failing, so replies
//! come from the fallback at once, and says so in the log once, not per message.
//! Markdown images in an answer (`![alt](https://…)`) leave its text and
//! become the reply's attachments ([`crate::markdown`]).

use crate::backend::{BackendError, Generator, ReplyRequest};
use botline_shared::config::Env;
use botline_shared::message::{ChatKind, Role, Turn};
use botline_shared::Error;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// `[respond.llm]`. Every default is in the shipped defaults.toml.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmSettings {
    /// The endpoint's base, e.g. `https://api.openai.com/v1`; empty: no LLM.
    pub base_url: String,
    pub model: String,
    /// The environment variable holding the API key (never the key itself).
    pub api_key_env: String,
    /// `{bot_name}` is replaced by `[respond] bot_name`.
    pub system_prompt: String,
    pub temperature: f32,
    pub max_tokens: u32,
    /// One request's timeout.
    pub timeout_ms: u64,
    /// All attempts at one reply end within this long.
    pub budget_ms: u64,
    pub max_attempts: u32,
    pub backoff_base_ms: u64,
    /// Requests in flight at once, over all chats.
    pub max_in_flight: usize,
    /// Characters of earlier turns sent with a request; the oldest go first.
    pub context_budget_chars: usize,
    /// Failed calls in a row that open the circuit …
    pub breaker_failures: u32,
    /// … for this long, during which the endpoint is not called.
    pub breaker_open_ms: u64,
}

impl std::fmt::Debug for LlmSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmSettings")
            .field(
                "base_url",
                &botline_shared::config::redact_url(&self.base_url),
            )
            .field("model", &self.model)
            .field("api_key_env", &self.api_key_env)
            .finish_non_exhaustive()
    }
}

impl LlmSettings {
    pub fn enabled(&self) -> bool {
        !self.base_url.is_empty()
    }

    fn validate(&self) -> Result<(), Error> {
        let url = reqwest::Url::parse(&self.base_url)
            .map_err(|error| Error::config("respond.llm.base_url", error))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::config(
                "respond.llm.base_url",
                "is not an http(s) URL",
            ));
        }
        for (name, value) in [
            ("respond.llm.timeout_ms", self.timeout_ms),
            ("respond.llm.budget_ms", self.budget_ms),
            ("respond.llm.max_attempts", u64::from(self.max_attempts)),
            ("respond.llm.max_in_flight", self.max_in_flight as u64),
            (
                "respond.llm.breaker_failures",
                u64::from(self.breaker_failures),
            ),
        ] {
            if value == 0 {
                return Err(Error::config(name, "must be greater than 0"));
            }
        }
        Ok(())
    }
}

/// Why a call failed, as counted in `botline_respond_backend_errors_total{reason}`.
#[derive(Debug)]
struct Failure {
    reason: &'static str,
    detail: String,
    retry: bool,
    wait: Option<Duration>,
}

/// Closed → open after `breaker_failures` failures in a row → calls resume
/// after `breaker_open_ms`; a success closes it.
struct Breaker {
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl Breaker {
    fn is_open(&self) -> bool {
        matches!(*self.open_until.lock().expect("breaker lock"), Some(until) if Instant::now() < until)
    }

    fn success(&self) {
        self.failures.store(0, Ordering::Relaxed);
        if self
            .open_until
            .lock()
            .expect("breaker lock")
            .take()
            .is_some()
        {
            info!(message = "LLM endpoint answers again; circuit closed");
            metrics::gauge!("botline_respond_llm_circuit_open").set(0.0);
        }
    }

    fn failure(&self, threshold: u32, open_for: Duration, failure: &Failure) {
        let failures = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
        if failures < threshold {
            return;
        }
        let mut open_until = self.open_until.lock().expect("breaker lock");
        let was_open = open_until.is_some();
        *open_until = Some(Instant::now() + open_for);
        if !was_open {
            warn!(
                message = "LLM endpoint keeps failing; answering from the fallback until it recovers",
                failures, reason = failure.reason, detail = %failure.detail, pause = ?open_for
            );
            metrics::gauge!("botline_respond_llm_circuit_open").set(1.0);
        }
    }
}

pub struct LlmBackend {
    settings: LlmSettings,
    api_key: Option<String>,
    system_prompt: String,
    http: reqwest::Client,
    in_flight: Semaphore,
    breaker: Breaker,
}

impl LlmBackend {
    pub fn new(settings: LlmSettings, bot_name: &str, env: &impl Env) -> Result<Self, Error> {
        settings.validate()?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(settings.timeout_ms))
            .build()
            .map_err(|error| Error::config("respond.llm", error))?;
        Ok(LlmBackend {
            api_key: env.get(&settings.api_key_env),
            system_prompt: settings.system_prompt.replace("{bot_name}", bot_name),
            in_flight: Semaphore::new(settings.max_in_flight),
            breaker: Breaker {
                failures: AtomicU32::new(0),
                open_until: Mutex::new(None),
            },
            http,
            settings,
        })
    }

    /// The request body for `request`.
    pub fn body(&self, request: &ReplyRequest<'_>) -> Value {
        let messages: Vec<Value> = prompt_messages(
            &self.system_prompt,
            request,
            self.settings.context_budget_chars,
        )
        .into_iter()
        .map(|message| json!({ "role": message.role.as_str(), "content": message.content }))
        .collect();
        json!({
            "model": self.settings.model,
            "messages": messages,
            "temperature": self.settings.temperature,
            "max_tokens": self.settings.max_tokens,
            "stream": false,
        })
    }

    async fn call_once(&self, body: &Value) -> Result<String, Failure> {
        let url = format!(
            "{}/chat/completions",
            self.settings.base_url.trim_end_matches('/')
        );
        let mut post = self.http.post(url).json(body);
        if let Some(key) = &self.api_key {
            post = post.bearer_auth(key);
        }
        let response = post.send().await.map_err(|error| Failure {
            reason: if error.is_timeout() {
                "timeout"
            } else {
                "connect"
            },
            detail: error.without_url().to_string(),
            retry: true,
            wait: None,
        })?;
        let status = response.status();
        if !status.is_success() {
            let wait = response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let detail: String = response
                .text()
                .await
                .unwrap_or_default()
                .chars()
                .take(200)
                .collect();
            let retry = status.as_u16() == 429 || status.is_server_error();
            let reason = match status.as_u16() {
                429 => "status_429",
                500..=599 => "status_5xx",
                _ => "status_4xx",
            };
            return Err(Failure {
                reason,
                detail: format!("{status}: {detail}"),
                retry,
                wait,
            });
        }
        let malformed = |detail: String| Failure {
            reason: "malformed",
            detail,
            retry: true,
            wait: None,
        };
        let json: Value = response
            .json()
            .await
            .map_err(|error| malformed(error.without_url().to_string()))?;
        json["choices"][0]["message"]["content"]
            .as_str()
            .map(|text| text.trim().to_string())
            .filter(|text| !text.is_empty())
            .ok_or_else(|| malformed("no choices[0].message.content in the answer".into()))
    }

    async fn call(&self, request: &ReplyRequest<'_>) -> Result<String, BackendError> {
        if self.breaker.is_open() {
            count_error("circuit_open");
            return Err(BackendError::Refused("the LLM circuit is open".into()));
        }
        let _permit = self
            .in_flight
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let body = self.body(request);
        let started = Instant::now();
        let budget = Duration::from_millis(self.settings.budget_ms);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let left = budget.saturating_sub(started.elapsed());
            let called = match tokio::time::timeout(left, self.call_once(&body)).await {
                Ok(called) => called,
                Err(_) => Err(Failure {
                    reason: "timeout",
                    detail: format!("no answer within the budget of {budget:?}"),
                    retry: false,
                    wait: None,
                }),
            };
            match called {
                Ok(text) => {
                    metrics::histogram!("botline_respond_llm_seconds")
                        .record(started.elapsed().as_secs_f64());
                    self.breaker.success();
                    return Ok(text);
                }
                Err(failure) => {
                    count_error(failure.reason);
                    debug!(message = "LLM call failed", attempt, reason = failure.reason, detail = %failure.detail);
                    let backoff = Duration::from_millis(
                        self.settings.backoff_base_ms << (attempt - 1).min(6),
                    );
                    let pause = failure
                        .wait
                        .unwrap_or(backoff)
                        .mul_f64(0.5 + rand::random::<f64>() / 2.0);
                    let out_of_time = started.elapsed() + pause >= budget;
                    if !failure.retry || attempt >= self.settings.max_attempts || out_of_time {
                        self.breaker.failure(
                            self.settings.breaker_failures,
                            Duration::from_millis(self.settings.breaker_open_ms),
                            &failure,
                        );
                        return Err(if failure.retry {
                            BackendError::Transient(format!(
                                "{}: {}",
                                failure.reason, failure.detail
                            ))
                        } else {
                            BackendError::Refused(format!("{}: {}", failure.reason, failure.detail))
                        });
                    }
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }
}

fn count_error(reason: &'static str) {
    metrics::counter!("botline_respond_backend_errors_total", "backend" => "llm", "reason" => reason).increment(1);
}

/// The newest turns whose text fits in `budget` characters, oldest first.
pub fn trim_context(turns: &[Turn], budget: usize) -> &[Turn] {
    let mut used = 0;
    let mut first = turns.len();
    for (index, turn) in turns.iter().enumerate().rev() {
        used += turn.text.chars().count();
        if used > budget {
            break;
        }
        first = index;
    }
    &turns[first..]
}

/// Who says one message of a chat prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptRole {
    System,
    User,
    Assistant,
}

impl PromptRole {
    /// As Chat Completions and chat templates (ChatML) name it.
    pub fn as_str(self) -> &'static str {
        match self {
            PromptRole::System => "system",
            PromptRole::User => "user",
            PromptRole::Assistant => "assistant",
        }
    }
}

/// One message of a chat prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PromptMessage {
    pub role: PromptRole,
    pub content: String,
}

/// What a chat model is asked for `request`, whatever carries it (the
/// Chat Completions wire format here, a chat template in `local`): the
/// system prompt; the FAQ answer classify matched, as grounding; the
/// chat's earlier turns, oldest first, trimmed to `context_budget_chars`;
/// the message. In groups, user turns name their speaker.
pub fn prompt_messages(
    system_prompt: &str,
    request: &ReplyRequest<'_>,
    context_budget_chars: usize,
) -> Vec<PromptMessage> {
    let message = &request.message.message;
    let group = message.chat.kind != ChatKind::Direct;
    let mut messages = vec![PromptMessage {
        role: PromptRole::System,
        content: system_prompt.to_string(),
    }];
    if let Some(faq) = &request.message.faq {
        messages.push(PromptMessage {
            role: PromptRole::System,
            content: format!(
                "A reference answer from the FAQ (question: {}): {}\nUse it if it answers the user.",
                faq.question, faq.answer
            ),
        });
    }
    for turn in trim_context(request.context, context_budget_chars) {
        messages.push(turn_message(turn, group));
    }
    let text = if group {
        format!("{}: {}", message.sender.name, message.text)
    } else {
        message.text.clone()
    };
    messages.push(PromptMessage {
        role: PromptRole::User,
        content: text,
    });
    messages
}

fn turn_message(turn: &Turn, group: bool) -> PromptMessage {
    let (role, content) = match turn.role {
        Role::Bot => (PromptRole::Assistant, turn.text.clone()),
        Role::User if group => (
            PromptRole::User,
            format!("{}: {}", turn.speaker_name, turn.text),
        ),
        Role::User => (PromptRole::User, turn.text.clone()),
    };
    PromptMessage { role, content }
}

impl Generator for LlmBackend {
    fn name(&self) -> &'static str {
        "llm"
    }

    fn generate<'a>(
        &'a self,
        request: &'a ReplyRequest<'a>,
    ) -> BoxFuture<'a, Result<String, BackendError>> {
        Box::pin(self.call(request))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(text: &str) -> Turn {
        Turn {
            role: Role::User,
            speaker_id: "u".into(),
            speaker_name: "Ann".into(),
            text: text.into(),
            message_id: "m".into(),
            at_ms: 0,
            attachments: vec![],
        }
    }

    #[test]
    fn context_is_trimmed_from_the_oldest() {
        let turns = [turn("aaaa"), turn("bbbb"), turn("cc")];
        let check = |budget: usize, expected: &[&str]| {
            let kept: Vec<&str> = trim_context(&turns, budget)
                .iter()
                .map(|t| t.text.as_str())
                .collect();
            assert_eq!(kept, expected, "budget {budget}");
        };
        check(100, &["aaaa", "bbbb", "cc"]);
        check(10, &["aaaa", "bbbb", "cc"]);
        check(9, &["bbbb", "cc"]);
        check(6, &["bbbb", "cc"]);
        check(5, &["cc"]);
        check(1, &[]);
        check(0, &[]);
    }
}
