//! Where replies come from. Each backend (templates, FAQ, an
//! OpenAI-compatible LLM, a local model) answers a request with a
//! [`Draft`] (a text and the pictures that go with it), with nothing (not
//! its kind of question), or with an error; respond tries its backends in
//! order and falls back to a reply that is always there.

use botline_shared::message::{Attachment, ClassifiedMessage, Turn};
use futures_util::future::BoxFuture;
use thiserror::Error;

/// A backend's answer: the reply's text and its attachments (images by
/// URL), which egress renders the platform's way.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Draft {
    pub text: String,
    pub attachments: Vec<Attachment>,
}

impl From<String> for Draft {
    fn from(text: String) -> Self {
        Draft {
            text,
            attachments: Vec::new(),
        }
    }
}

impl Draft {
    /// `text` with the picture at `image`, if any.
    pub fn with_image(text: String, image: Option<&str>) -> Self {
        Draft {
            text,
            attachments: image
                .map(|url| Attachment::image(url, None))
                .into_iter()
                .collect(),
        }
    }
}

/// `value` if it is an absolute http(s) URL, else the error that stops
/// respond at start naming `setting`.
pub fn image_url(setting: &str, value: &str) -> Result<String, botline_shared::Error> {
    let parsed = reqwest::Url::parse(value).ok().filter(|url| {
        matches!(url.scheme(), "http" | "https")
            && url.host_str().is_some_and(|host| !host.is_empty())
    });
    match parsed {
        Some(_) if botline_shared::message::is_http_url(value) => Ok(value.to_string()),
        _ => Err(botline_shared::Error::config(
            setting,
            format!("{value:?} is not an http(s) URL"),
        )),
    }
}

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
    ) -> BoxFuture<'a, Result<Option<Draft>, BackendError>>;
}

/// A backend that writes its answer from the conversation (the LLM, the
/// local model): it reads the chat's context, its text passes the output
/// audit, and Markdown images in it are sent as pictures, not as text.
pub trait Generator: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    fn generate<'a>(
        &'a self,
        request: &'a ReplyRequest<'a>,
    ) -> BoxFuture<'a, Result<String, BackendError>>;
}

impl<G: Generator> ReplyBackend for G {
    fn name(&self) -> &'static str {
        Generator::name(self)
    }

    fn wants_context(&self) -> bool {
        true
    }

    fn generates(&self) -> bool {
        true
    }

    fn reply<'a>(
        &'a self,
        request: &'a ReplyRequest<'a>,
    ) -> BoxFuture<'a, Result<Option<Draft>, BackendError>> {
        Box::pin(async move {
            self.generate(request)
                .await
                .map(|text| Some(crate::markdown::take_images(&text)))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_settings_must_be_http_urls() {
        let check =
            |value: &str| image_url("respond.templates.x.image", value).map_err(|e| e.to_string());
        assert_eq!(
            check("https://example.com/map.png"),
            Ok("https://example.com/map.png".into())
        );
        assert_eq!(
            check("http://127.0.0.1:8080/a.jpg"),
            Ok("http://127.0.0.1:8080/a.jpg".into())
        );
        for bad in [
            "",
            "map.png",
            "/static/map.png",
            "ftp://example.com/a.png",
            "data:image/png;base64,AA",
            "https://",
            "https://exa mple.com/a.png",
        ] {
            assert_eq!(
                check(bad),
                Err(format!(
                    "setting respond.templates.x.image: {bad:?} is not an http(s) URL"
                )),
                "{bad:?}"
            );
        }
    }
}
