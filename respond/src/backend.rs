//! Where replies come from. Each backend (templates now; FAQ and an
//! OpenAI-compatible LLM later) answers a request with a text, with
//! nothing (not its kind of question), or with an error; respond tries its
//! backends in order and falls back to a reply that is always there.

use botline_shared::message::{ClassifiedMessage, Turn};
use futures_util::future::BoxFuture;
use thiserror::Error;

/// What a backend is asked.
pub struct ReplyRequest<'a> {
    pub message: &'a ClassifiedMessage,
    /// The chat's earlier turns, oldest first (the message itself not among them).
    pub context: &'a [Turn],
    pub bot_name: &'a str,
}

#[derive(Debug, Error)]
pub enum BackendError {
    /// Worth trying again later (timeouts, 429, 5xx).
    #[error("{0}")]
    Transient(String),
    /// Will not work for this message; the next backend or the fallback answers.
    #[error("{0}")]
    Refused(String),
}

pub trait ReplyBackend: Send + Sync + 'static {
    /// Label of `botline_respond_replies_total{backend}`.
    fn name(&self) -> &'static str;

    /// Whether this backend reads the chat's earlier turns; when none does,
    /// respond does not read `ctx:` streams at all.
    fn wants_context(&self) -> bool;

    /// Whether its text is generated rather than the operator's own words
    /// (templates, FAQ answers); generated text passes the output audit.
    fn generates(&self) -> bool {
        false
    }

    fn reply<'a>(
        &'a self,
        request: &'a ReplyRequest<'a>,
    ) -> BoxFuture<'a, Result<Option<String>, BackendError>>;
}
