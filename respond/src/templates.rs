//! Per-intent reply templates, in English and Chinese, with variables:
//! `{sender_name}`, `{bot_name}`, `{text}`, `{intent}`, `{previous_text}`
//! (the sender's previous message in this chat, or empty) and `{turns}`
//! (how many turns the chat's context holds). A template naming any other
//! variable stops respond at start, naming the template.

use crate::backend::{BackendError, ReplyBackend, ReplyRequest};
use botline_shared::message::Role;
use botline_shared::Error;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use std::collections::BTreeMap;

pub const VARIABLES: &[&str] = &[
    "sender_name",
    "bot_name",
    "text",
    "intent",
    "previous_text",
    "turns",
];

/// One intent's reply, per language.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Template {
    pub en: String,
    pub zh: String,
}

/// Which language a text is in, as far as choosing a template goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    English,
    Chinese,
}

/// Chinese when the text has any Han character, English otherwise.
pub fn language_of(text: &str) -> Language {
    let han = |c: char| matches!(c, '\u{4E00}'..='\u{9FFF}' | '\u{3400}'..='\u{4DBF}' | '\u{F900}'..='\u{FAFF}');
    if text.chars().any(han) {
        Language::Chinese
    } else {
        Language::English
    }
}

/// `template` with `{name}` replaced by its value; `{{` and `}}` are literal braces.
pub fn render(
    template: &str,
    mut value: impl FnMut(&str) -> Option<String>,
) -> Result<String, String> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find(['{', '}']) {
        out.push_str(&rest[..open]);
        let tail = &rest[open..];
        if tail.starts_with("{{") || tail.starts_with("}}") {
            out.push_str(&tail[..1]);
            rest = &tail[2..];
            continue;
        }
        if tail.starts_with('}') {
            return Err("a lone `}` (write `}}` for a brace)".into());
        }
        let close = tail.find('}').ok_or("a `{` without its `}`")?;
        let name = &tail[1..close];
        out.push_str(&value(name).ok_or_else(|| {
            format!(
                "unknown variable {{{name}}}; known: {}",
                VARIABLES.join(", ")
            )
        })?);
        rest = &tail[close + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

pub struct Templates {
    by_intent: BTreeMap<String, Template>,
    /// Whether any template uses `{previous_text}` or `{turns}`.
    uses_context: bool,
}

/// The template that answers a `/reset`.
pub const RESET_INTENT: &str = "reset";

/// The intent whose template answers anything no other template does.
pub const FALLBACK_INTENT: &str = "unknown";

impl Templates {
    /// Checks every template renders, so a typo stops respond at start.
    pub fn new(by_intent: BTreeMap<String, Template>) -> Result<Self, Error> {
        if !by_intent.contains_key(FALLBACK_INTENT) {
            return Err(Error::config(
                format!("respond.templates.{FALLBACK_INTENT}"),
                "is required: it answers whatever no other template does",
            ));
        }
        let mut uses_context = false;
        for (intent, template) in &by_intent {
            for (language, text) in [("en", &template.en), ("zh", &template.zh)] {
                render(text, |name| {
                    uses_context |= matches!(name, "previous_text" | "turns");
                    VARIABLES.contains(&name).then(String::new)
                })
                .map_err(|reason| {
                    Error::config(format!("respond.templates.{intent}.{language}"), reason)
                })?;
            }
        }
        Ok(Templates {
            by_intent,
            uses_context,
        })
    }

    fn text_for(&self, intent: &str, language: Language) -> Option<&str> {
        self.by_intent.get(intent).map(|template| match language {
            Language::English => template.en.as_str(),
            Language::Chinese => template.zh.as_str(),
        })
    }

    /// The reply for `request` from `intent`'s template, if it has one.
    pub fn answer(&self, request: &ReplyRequest<'_>, intent: &str) -> Option<String> {
        let message = &request.message.message;
        let template = self.text_for(intent, language_of(&message.text))?;
        let previous_text = request
            .context
            .iter()
            .rev()
            .find(|turn| {
                turn.role == Role::User
                    && turn.speaker_id == message.sender.id
                    && turn.message_id != message.id
            })
            .map(|turn| turn.text.clone())
            .unwrap_or_default();
        let rendered = render(template, |name| {
            Some(match name {
                "sender_name" => message.sender.name.clone(),
                "bot_name" => request.bot_name.to_string(),
                "text" => message.text.clone(),
                "intent" => request.message.intent.name.clone(),
                "previous_text" => previous_text.clone(),
                "turns" => request.context.len().to_string(),
                _ => return None,
            })
        });
        rendered.ok()
    }

    /// The fallback reply: always there, checked at start.
    pub fn fallback(&self, request: &ReplyRequest<'_>) -> String {
        self.answer(request, FALLBACK_INTENT)
            .expect("the fallback template exists and renders, checked at start")
    }
}

impl ReplyBackend for Templates {
    fn name(&self) -> &'static str {
        "templates"
    }

    fn wants_context(&self) -> bool {
        self.uses_context
    }

    fn reply<'a>(
        &'a self,
        request: &'a ReplyRequest<'a>,
    ) -> BoxFuture<'a, Result<Option<String>, BackendError>> {
        let intent = request.message.intent.name.as_str();
        let answer = if intent == FALLBACK_INTENT {
            None
        } else {
            self.answer(request, intent)
        };
        Box::pin(async move { Ok(answer) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(template: &str, expected: Result<&str, &str>) {
        let value = |name: &str| match name {
            "sender_name" => Some("小明".to_string()),
            "turns" => Some("3".to_string()),
            _ => None,
        };
        let rendered = render(template, value);
        assert_eq!(
            rendered.as_deref().map_err(String::as_str),
            expected,
            "{template:?}"
        );
    }

    #[test]
    fn rendering() {
        check("Hello {sender_name}!", Ok("Hello 小明!"));
        check("{turns} turns", Ok("3 turns"));
        check("no variables", Ok("no variables"));
        check("", Ok(""));
        check("braces {{like this}}", Ok("braces {like this}"));
        check("{nope}", Err("unknown variable {nope}; known: sender_name, bot_name, text, intent, previous_text, turns"));
        check("open {sender_name", Err("a `{` without its `}`"));
        check("close }", Err("a lone `}` (write `}}` for a brace)"));
    }

    #[test]
    fn language() {
        assert_eq!(language_of("你好"), Language::Chinese);
        assert_eq!(language_of("hi 你好"), Language::Chinese);
        assert_eq!(language_of("hello"), Language::English);
        assert_eq!(language_of("🎉"), Language::English);
    }
}
