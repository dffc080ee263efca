//! Per-intent reply templates, in English and Chinese, with variables:
//! `{sender_name}`, `{bot_name}`, `{text}`, `{intent}`, `{previous_text}`
//! (the sender's previous message in this chat, or empty) and `{turns}`
//! (how many turns the chat's context holds). A template naming any other
//! variable stops respond at start, naming the template. A template may
//! also name a picture to send with its text, `image = "https://…"` (both
//! languages); anything but an http(s) URL there stops respond at start too.

use crate::backend::{self, BackendError, Draft, ReplyBackend, ReplyRequest};
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
    /// A picture sent with the text (an http(s) URL), whatever the language.
    #[serde(default)]
    pub image: Option<String>,
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
            if let Some(image) = &template.image {
                backend::image_url(&format!("respond.templates.{intent}.image"), image)?;
            }
        }
        Ok(Templates {
            by_intent,
            uses_context,
        })
    }

    /// The reply for `request` from `intent`'s template, if it has one:
    /// its text in the message's language, and its image.
    pub fn answer(&self, request: &ReplyRequest<'_>, intent: &str) -> Option<Draft> {
        let message = &request.message.message;
        let chosen = self.by_intent.get(intent)?;
        let template = match language_of(&message.text) {
            Language::English => chosen.en.as_str(),
            Language::Chinese => chosen.zh.as_str(),
        };
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
        let text = rendered.ok()?;
        Some(Draft::with_image(text, chosen.image.as_deref()))
    }

    /// The fallback reply: always there, checked at start.
    pub fn fallback(&self, request: &ReplyRequest<'_>) -> Draft {
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
    ) -> BoxFuture<'a, Result<Option<Draft>, BackendError>> {
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

    fn templates(image: Option<&str>) -> Result<Templates, Error> {
        let template = |en: &str, zh: &str, image: Option<&str>| Template {
            en: en.into(),
            zh: zh.into(),
            image: image.map(str::to_string),
        };
        Templates::new(BTreeMap::from([
            ("unknown".to_string(), template("Sorry?", "抱歉？", None)),
            (
                "where".to_string(),
                template("Here, {sender_name}:", "在这里，{sender_name}：", image),
            ),
        ]))
    }

    fn answer(templates: &Templates, text: &str, intent: &str) -> Option<Draft> {
        let mut message = botline_shared::testing::sample_message(1, text);
        message.sender.name = "Ann".into();
        let classified = botline_shared::message::ClassifiedMessage {
            message,
            priority: botline_shared::message::Priority::Normal,
            intent: botline_shared::message::Intent {
                name: intent.into(),
                confidence: 1.0,
            },
            audit: vec![],
            faq: None,
        };
        let request = ReplyRequest {
            message: &classified,
            context: &[],
            bot_name: "botline",
        };
        templates.answer(&request, intent)
    }

    #[test]
    fn a_template_sends_its_image_with_its_text_in_either_language() {
        let templates = templates(Some("https://example.com/map.png")).unwrap();
        for (text, expected) in [
            ("where are you?", "Here, Ann:"),
            ("你们在哪", "在这里，Ann："),
        ] {
            let draft = answer(&templates, text, "where").unwrap();
            assert_eq!(draft.text, expected);
            assert_eq!(
                draft.attachments,
                [botline_shared::message::Attachment::image(
                    "https://example.com/map.png",
                    None
                )]
            );
        }
        let plain = answer(&templates, "hm", "unknown").unwrap();
        assert_eq!(plain, Draft::from("Sorry?".to_string()));
        let without = templates_without_image();
        assert!(answer(&without, "where?", "where")
            .unwrap()
            .attachments
            .is_empty());
    }

    fn templates_without_image() -> Templates {
        templates(None).unwrap()
    }

    #[test]
    fn an_image_that_is_not_an_http_url_stops_respond_naming_the_template() {
        for bad in ["map.png", "file:///srv/map.png", "javascript:alert(1)", ""] {
            let error = templates(Some(bad)).err().unwrap().to_string();
            assert_eq!(
                error,
                format!("setting respond.templates.where.image: {bad:?} is not an http(s) URL")
            );
        }
        let shipped: Template =
            serde_json::from_str(r#"{"en": "a", "zh": "b", "image": "https://x.test/a.png"}"#)
                .unwrap();
        assert_eq!(shipped.image.as_deref(), Some("https://x.test/a.png"));
        let typo = serde_json::from_str::<Template>(r#"{"en": "a", "zh": "b", "img": "x"}"#);
        assert!(typo.is_err(), "unknown keys are refused");
    }

    #[test]
    fn language() {
        assert_eq!(language_of("你好"), Language::Chinese);
        assert_eq!(language_of("hi 你好"), Language::Chinese);
        assert_eq!(language_of("hello"), Language::English);
        assert_eq!(language_of("🎉"), Language::English);
    }
}
