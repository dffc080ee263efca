//! Telegram: a reply is `POST <api>/bot<token>/sendMessage`, the token
//! being `BOTLINE_TELEGRAM_BOT_TOKEN`; a reply with pictures is one
//! `sendPhoto` per picture first.
//!
//! ```json
//! {
//!   "chat_id": -1001234,                 // a number when the chat id is one, else "@channel"
//!   "text": "<a href=\"tg://user?id=42\">Ann</a> your order &lt;A-1&gt; has shipped",
//!   "parse_mode": "HTML",
//!   "message_thread_id": 4,              // forum topics only (the message's thread)
//!   "reply_parameters": {"message_id": 12, "allow_sending_without_reply": true}
//! }
//! ```
//!
//! The text is HTML-escaped; each user to mention becomes an inline mention
//! (`tg://user?id=`), named by the `name:<id>` ingest left in
//! `platform_data`, in place of its `@<id>` in the text or else in front of
//! it. Attachments other than pictures are links on lines of their own.
//!
//! A text longer than Telegram's 4096 characters (UTF-16 code units, after
//! the HTML is parsed) is sent as several `sendMessage` calls, split at a
//! paragraph, line, sentence or space ([`super::split`]: the plain text is
//! split, then each piece escaped, so no entity or link is ever cut).
//! Pictures: `{"chat_id", "photo": "<url>", "caption", "parse_mode":
//! "HTML"}`, Telegram fetching the URL itself; the text is the first
//! picture's caption when it fits in Telegram's 1024, else the pictures go
//! without captions and the text follows in `sendMessage` calls. Every call
//! carries `message_thread_id`; only the first quotes the message answered
//! (`reply_parameters`). A reply of several calls is sent part by part
//! through [`crate::parts`], so a retry never sends a part twice.
//!
//! Answers: `{"ok": true, "result": {"message_id": …}}` is delivered;
//! 429 waits `parameters.retry_after` seconds; 5xx and timeouts are retried;
//! any other `ok: false` (400 bad request, 401 bad token, 403 blocked by the
//! user, a group migrated to a supergroup) is permanent, its reason naming
//! Telegram's `error_code` and `description`. Telegram has no idempotency
//! field; egress's sent keys keep a reply from being sent twice.

use super::http::{self, Answered, Http};
use super::mentions::{self, escape};
use super::{media, split};
use super::{Attempt, Kit, Platform, Sender, Verdict};
use crate::limits::Limit;
use crate::parts::Parts;
use botline_shared::config::secret_env;
use botline_shared::message::{ChatKind, Reply};
use botline_shared::Error;
use futures_util::future::BoxFuture;
use reqwest::StatusCode;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;

pub const PLATFORM: Platform = Platform {
    name: "telegram",
    build,
};

/// The bot token from @BotFather: `<bot id>:<secret>`.
pub const TOKEN_ENV: &str = "BOTLINE_TELEGRAM_BOT_TOKEN";
/// Telegram's longest message text, in UTF-16 code units after entity parsing.
const MAX_TEXT_UNITS: usize = 4096;
/// Telegram's longest photo caption, likewise.
const MAX_CAPTION_UNITS: usize = 1024;

/// `[egress.platforms.telegram]`, documented in shared/defaults.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TelegramSettings {
    /// Read by `enabled_platforms`; named here so `deny_unknown_fields` accepts it.
    #[serde(rename = "enabled")]
    _enabled: bool,
    api_base_url: String,
    timeout_ms: u64,
    bot_per_second: u32,
    chat_per_second: u32,
    chat_burst: u32,
    group_per_minute: u32,
}

pub struct TelegramSender {
    http: Http,
    /// `<api>/bot<token>/`, the methods' base: holds the token, so never logged.
    url: reqwest::Url,
    parts: Parts,
    /// The digits before `:` in the token: names the bot's limits.
    bot_id: String,
    bot_per_second: u32,
    chat_per_second: u32,
    chat_burst: u32,
    group_per_minute: u32,
}

fn build(table: &toml::Value, kit: &Kit) -> Result<Arc<dyn Sender>, Error> {
    let settings = super::settings(PLATFORM.name, table, |settings: &TelegramSettings| {
        vec![
            ("bot_per_second", settings.bot_per_second),
            ("chat_per_second", settings.chat_per_second),
            ("chat_burst", settings.chat_burst),
            ("group_per_minute", settings.group_per_minute),
        ]
    })?;
    let token = secret_env(kit.env, TOKEN_ENV, 1)?;
    let bot_id = match token.split_once(':') {
        Some((id, rest))
            if !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && !rest.is_empty() =>
        {
            id.to_string()
        }
        _ => {
            return Err(Error::config(
                TOKEN_ENV,
                "is not a bot token (<bot id>:<secret>, as @BotFather gives it)",
            ))
        }
    };
    let base = settings.api_base_url.trim_end_matches('/');
    let url = reqwest::Url::parse(&format!("{base}/bot{token}/"))
        .ok()
        .filter(|url| url.join("sendMessage").is_ok())
        .ok_or_else(|| {
            Error::config(
                "egress.platforms.telegram.api_base_url",
                "with the bot token, does not make a URL",
            )
        })?;
    Ok(Arc::new(TelegramSender {
        http: Http::new(PLATFORM.name, settings.timeout_ms)?,
        url,
        parts: kit.parts.clone(),
        bot_id,
        bot_per_second: settings.bot_per_second,
        chat_per_second: settings.chat_per_second,
        chat_burst: settings.chat_burst,
        group_per_minute: settings.group_per_minute,
    }))
}

impl Sender for TelegramSender {
    fn platform(&self) -> &'static str {
        PLATFORM.name
    }

    /// The bot's pace, the chat's (with a small burst) and, for groups and
    /// channels, 20 a minute spread evenly (a burst would break the minute).
    fn limits(&self, reply: &Reply) -> Vec<Limit> {
        let bot = &self.bot_id;
        let chat = &reply.chat.id;
        let second = Duration::from_secs(1);
        let mut limits = vec![
            Limit::new(format!("telegram:{bot}"), self.bot_per_second, second).with_burst(1),
            Limit::new(
                format!("telegram:{bot}:chat:{chat}"),
                self.chat_per_second,
                second,
            )
            .with_burst(self.chat_burst),
        ];
        if reply.chat.kind != ChatKind::Direct {
            limits.push(
                Limit::new(
                    format!("telegram:{bot}:group:{chat}"),
                    self.group_per_minute,
                    Duration::from_secs(60),
                )
                .with_burst(1),
            );
        }
        limits
    }

    fn attempt<'a>(&'a self, reply: &'a Reply) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            let plan: Vec<(usize, Part)> = plan(reply).into_iter().enumerate().collect();
            let limits = self.limits(reply);
            self.parts
                .send(PLATFORM.name, reply, &limits, &plan, |(index, part)| {
                    Box::pin(self.send_part(reply, *index, part))
                })
                .await
        })
    }
}

impl TelegramSender {
    async fn send_part(&self, reply: &Reply, index: usize, part: &Part) -> Attempt {
        let (method, body) = payload(reply, index, part);
        let url = self.url.join(method).expect("checked at start");
        let request = self.http.post(url).json(&body);
        self.http.attempt(request, PLATFORM.name, judge).await
    }
}

/// One Bot API call of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// `sendPhoto`: the picture by URL, with the text (HTML) as its caption
    /// when it fits.
    Photo {
        url: String,
        caption: Option<String>,
    },
    /// `sendMessage`: a piece of the text, as HTML.
    Text(String),
}

/// The calls that send `reply`, in order (documented at the top of this module).
pub fn plan(reply: &Reply) -> Vec<Part> {
    let images = media::images(reply);
    let text = media::text_with_links(reply, false);
    let pieces = render_pieces(reply, &text);
    let mut parts: Vec<Part> = images
        .iter()
        .map(|image| Part::Photo {
            url: image.url.to_string(),
            caption: None,
        })
        .collect();
    let fits_caption = pieces.len() == 1 && visible_length(reply, &text) <= MAX_CAPTION_UNITS;
    match parts.first_mut() {
        Some(Part::Photo { caption, .. }) if fits_caption => {
            *caption = pieces.into_iter().next().filter(|piece| !piece.is_empty());
        }
        Some(_) => parts.extend(
            pieces
                .into_iter()
                .filter(|piece| !piece.is_empty())
                .map(Part::Text),
        ),
        None => parts.extend(pieces.into_iter().map(Part::Text)),
    }
    parts
}

/// The method and body of part `index` of `reply`.
pub fn payload(reply: &Reply, index: usize, part: &Part) -> (&'static str, serde_json::Value) {
    let mut body = serde_json::json!({ "chat_id": number_or_text(&reply.chat.id) });
    let method = match part {
        Part::Photo { url, caption } => {
            body["photo"] = url.as_str().into();
            if let Some(caption) = caption {
                body["caption"] = caption.as_str().into();
                body["parse_mode"] = "HTML".into();
            }
            "sendPhoto"
        }
        Part::Text(text) => {
            body["text"] = text.as_str().into();
            body["parse_mode"] = "HTML".into();
            "sendMessage"
        }
    };
    if let Some(thread) = reply
        .thread
        .as_deref()
        .and_then(|id| id.parse::<i64>().ok())
    {
        body["message_thread_id"] = thread.into();
    }
    if let Some(message) = reply
        .reply_to
        .as_deref()
        .and_then(|id| id.parse::<i64>().ok())
        .filter(|_| index == 0)
    {
        body["reply_parameters"] = serde_json::json!({
            "message_id": message,
            "allow_sending_without_reply": true,
        });
    }
    (method, body)
}

fn number_or_text(id: &str) -> serde_json::Value {
    id.parse::<i64>()
        .map_or_else(|_| id.into(), serde_json::Value::from)
}

/// How a mentioned user is named: the name ingest saw, else the id.
fn name_of<'r>(reply: &'r Reply, user: &'r str) -> &'r str {
    reply
        .platform_data
        .get(&format!("name:{user}"))
        .map_or(user, String::as_str)
}

/// `text` as Telegram HTML, `mentions` as inline mentions.
fn render(reply: &Reply, text: &str, mentions: &[String]) -> String {
    mentions::place(&escape(text), mentions, |user| {
        let name = name_of(reply, user);
        if !user.is_empty() && user.bytes().all(|b| b.is_ascii_digit()) {
            format!("<a href=\"tg://user?id={user}\">{}</a>", escape(name))
        } else {
            escape(name)
        }
    })
}

/// How long `text` shows once its mentions are rendered (HTML parsed), in
/// UTF-16 code units.
fn visible_length(reply: &Reply, text: &str) -> usize {
    let shown = mentions::place(text, &reply.mentions, |user| {
        name_of(reply, user).to_string()
    });
    split::length(&shown, split::utf16)
}

/// `text` as Telegram HTML in pieces of at most [`MAX_TEXT_UNITS`] each
/// once parsed ([`split::render_pieces`]: the plain text is split, each
/// piece then escaped, with the mentions it names).
pub fn render_pieces(reply: &Reply, text: &str) -> Vec<String> {
    let growth = visible_length(reply, text).saturating_sub(split::length(text, split::utf16));
    split::render_pieces(
        text,
        &reply.mentions,
        MAX_TEXT_UNITS,
        split::utf16,
        growth,
        |piece, mentions| render(reply, piece, mentions),
    )
}

/// A Bot API answer.
#[derive(Debug, Deserialize)]
struct ApiAnswer {
    ok: bool,
    #[serde(default)]
    result: Option<SentMessage>,
    #[serde(default)]
    error_code: Option<u16>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<ResponseParameters>,
}

#[derive(Debug, Deserialize)]
struct SentMessage {
    message_id: i64,
}

#[derive(Debug, Deserialize)]
struct ResponseParameters {
    #[serde(default)]
    retry_after: Option<u64>,
    #[serde(default)]
    migrate_to_chat_id: Option<i64>,
}

/// What Telegram's answer means.
fn judge(answered: &Answered) -> Verdict {
    let status = answered.status;
    let Ok(answer) = serde_json::from_str::<ApiAnswer>(&answered.body) else {
        let reason = format!(
            "telegram answered {} without Bot API JSON: {}",
            status.as_u16(),
            http::quote(&answered.body)
        );
        return if status.is_server_error() || status == StatusCode::TOO_MANY_REQUESTS {
            Verdict::RetryAfter {
                wait: answered.retry_after,
                reason,
            }
        } else {
            Verdict::Permanent(reason)
        };
    };
    if answer.ok && status.is_success() {
        return Verdict::Delivered {
            platform_message_id: answer.result.map(|message| message.message_id.to_string()),
            writes: Vec::new(),
        };
    }
    let code = answer.error_code.unwrap_or(status.as_u16());
    let mut reason = format!(
        "telegram error {code}: {}",
        http::quote(answer.description.as_deref().unwrap_or_default())
    );
    let parameters = answer.parameters.unwrap_or(ResponseParameters {
        retry_after: None,
        migrate_to_chat_id: None,
    });
    if let Some(chat) = parameters.migrate_to_chat_id {
        reason.push_str(&format!(" (the group is now supergroup {chat})"));
    }
    if code == 429 || status == StatusCode::TOO_MANY_REQUESTS {
        Verdict::RetryAfter {
            wait: parameters
                .retry_after
                .map(Duration::from_secs)
                .or(answered.retry_after),
            reason,
        }
    } else if code >= 500 || status.is_server_error() {
        Verdict::RetryAfter { wait: None, reason }
    } else {
        Verdict::Permanent(reason)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(kind: ChatKind, text: &str, mentions: &[&str]) -> Reply {
        Reply {
            mentions: mentions.iter().map(|user| user.to_string()).collect(),
            platform_data: [("name:42".to_string(), "Ann <3".to_string())].into(),
            ..http::test_reply("telegram", "999", "-1001234", kind, text)
        }
    }

    fn check_render(text: &str, mentions: &[&str], expected: &str) {
        assert_eq!(
            render_pieces(&reply(ChatKind::Group, text, mentions), text),
            [expected],
            "{text:?} {mentions:?}"
        );
    }

    #[test]
    fn text_is_escaped_and_mentions_are_inline_links() {
        check_render("plain", &[], "plain");
        check_render("a < b && c > d", &[], "a &lt; b &amp;&amp; c &gt; d");
        check_render(
            "hi",
            &["42"],
            "<a href=\"tg://user?id=42\">Ann &lt;3</a> hi",
        );
        check_render(
            "thanks @42!",
            &["42"],
            "thanks <a href=\"tg://user?id=42\">Ann &lt;3</a>!",
        );
        check_render(
            "@421 is not @42",
            &["42"],
            "@421 is not <a href=\"tg://user?id=42\">Ann &lt;3</a>",
        );
        check_render(
            "hi",
            &["7", "42"],
            "<a href=\"tg://user?id=7\">7</a> <a href=\"tg://user?id=42\">Ann &lt;3</a> hi",
        );
        check_render("hi", &["@channel"], "@channel hi");
    }

    #[test]
    fn long_texts_are_split_into_messages_telegram_takes() {
        // 3000 emoji are 6000 UTF-16 units: two messages, split at a space.
        let long = format!("{} {}", "😀".repeat(1500), "😀".repeat(1500));
        let sent = reply(ChatKind::Direct, &long, &[]);
        let parts = plan(&sent);
        assert_eq!(
            parts,
            [Part::Text("😀".repeat(1500)), Part::Text("😀".repeat(1500))]
        );
        // Entities are never cut: each piece is escaped after the split.
        let escaped = format!("{}\n\n{}", "<&>".repeat(1300), "b".repeat(300));
        let pieces = render_pieces(&reply(ChatKind::Direct, &escaped, &[]), &escaped);
        assert!(pieces == ["&lt;&amp;&gt;".repeat(1300), "b".repeat(300)]);
        // A mention in the second piece is rendered there, not again in front of the first.
        let text = format!("{}\n\nthanks @42", "a".repeat(4090));
        let pieces = render_pieces(&reply(ChatKind::Group, &text, &["42"]), &text);
        assert_eq!(
            pieces,
            [
                "a".repeat(4090),
                "thanks <a href=\"tg://user?id=42\">Ann &lt;3</a>".into()
            ]
        );
        // One not in the text goes in front of the first piece only, with room made for it.
        let text = "a".repeat(5000);
        let pieces = render_pieces(&reply(ChatKind::Group, &text, &["42"]), &text);
        assert_eq!(pieces.len(), 2);
        assert!(pieces[0].starts_with("<a href=\"tg://user?id=42\">Ann &lt;3</a> aaa"));
        assert!(!pieces[1].contains("tg://"));
        assert!(
            pieces[0].len() - "<a href=\"tg://user?id=42\">Ann &lt;3</a> ".len() + "Ann <3 ".len()
                <= MAX_TEXT_UNITS
        );
    }

    fn image(url: &str) -> botline_shared::message::Attachment {
        botline_shared::message::Attachment::image(url, None)
    }

    #[test]
    fn pictures_go_first_with_the_text_as_caption_when_it_fits() {
        let mut sent = reply(ChatKind::Direct, "our <shop>", &[]);
        sent.attachments = vec![image("https://x.test/a.png"), image("https://x.test/b.png")];
        assert_eq!(
            plan(&sent),
            [
                Part::Photo {
                    url: "https://x.test/a.png".into(),
                    caption: Some("our &lt;shop&gt;".into())
                },
                Part::Photo {
                    url: "https://x.test/b.png".into(),
                    caption: None
                },
            ]
        );
        sent.text = "x".repeat(1025);
        sent.attachments.truncate(1);
        assert_eq!(
            plan(&sent),
            [
                Part::Photo {
                    url: "https://x.test/a.png".into(),
                    caption: None
                },
                Part::Text("x".repeat(1025)),
            ]
        );
        sent.text = "x".repeat(1024);
        assert_eq!(plan(&sent).len(), 1, "1024 units fit a caption");
        sent.text.clear();
        assert_eq!(
            plan(&sent),
            [Part::Photo {
                url: "https://x.test/a.png".into(),
                caption: None
            }]
        );
        // Other attachments are links in the text.
        sent.text = "menu".into();
        sent.attachments.push(botline_shared::message::Attachment {
            kind: botline_shared::message::AttachmentKind::File,
            name: Some("menu.pdf".into()),
            ..image("https://x.test/menu.pdf")
        });
        assert_eq!(
            plan(&sent),
            [Part::Photo {
                url: "https://x.test/a.png".into(),
                caption: Some("menu\nmenu.pdf: https://x.test/menu.pdf".into())
            }]
        );
    }

    #[test]
    fn payloads_carry_threads_and_replies_as_numbers() {
        let mut sent = reply(ChatKind::Group, "hi", &[]);
        sent.thread = Some("4".into());
        sent.reply_to = Some("12".into());
        let first = |sent: &Reply| payload(sent, 0, &plan(sent)[0]).1;
        assert_eq!(
            first(&sent),
            serde_json::json!({
                "chat_id": -1001234,
                "text": "hi",
                "parse_mode": "HTML",
                "message_thread_id": 4,
                "reply_parameters": {"message_id": 12, "allow_sending_without_reply": true},
            })
        );
        // A later part keeps the thread but quotes nothing.
        let photo = Part::Photo {
            url: "https://x.test/a.png".into(),
            caption: None,
        };
        assert_eq!(
            payload(&sent, 1, &photo),
            (
                "sendPhoto",
                serde_json::json!({
                    "chat_id": -1001234,
                    "photo": "https://x.test/a.png",
                    "message_thread_id": 4,
                })
            )
        );
        sent.chat.id = "@news".into();
        sent.thread = None;
        sent.reply_to = None;
        assert_eq!(
            first(&sent),
            serde_json::json!({"chat_id": "@news", "text": "hi", "parse_mode": "HTML"})
        );
    }

    fn check_judge(status: u16, retry_after: Option<u64>, body: &str, expected: &str) {
        assert_eq!(
            http::judged(judge, status, retry_after, body),
            expected,
            "{status} {body}"
        );
    }

    #[test]
    fn answers_are_judged_by_the_bot_api_json() {
        check_judge(
            200,
            None,
            r#"{"ok":true,"result":{"message_id":77,"date":1,"chat":{"id":1,"type":"private"}}}"#,
            r#"delivered Some("77")"#,
        );
        check_judge(
            429,
            None,
            r#"{"ok":false,"error_code":429,"description":"Too Many Requests: retry after 7","parameters":{"retry_after":7}}"#,
            "retry Some(7s) telegram error 429: Too Many Requests: retry after 7",
        );
        check_judge(
            400,
            None,
            r#"{"ok":false,"error_code":400,"description":"Bad Request: chat not found"}"#,
            "permanent telegram error 400: Bad Request: chat not found",
        );
        check_judge(
            403,
            None,
            r#"{"ok":false,"error_code":403,"description":"Forbidden: bot was blocked by the user"}"#,
            "permanent telegram error 403: Forbidden: bot was blocked by the user",
        );
        check_judge(
            400,
            None,
            r#"{"ok":false,"error_code":400,"description":"Bad Request: group chat was upgraded to a supergroup chat","parameters":{"migrate_to_chat_id":-1009}}"#,
            "permanent telegram error 400: Bad Request: group chat was upgraded to a supergroup chat (the group is now supergroup -1009)",
        );
        check_judge(
            502,
            None,
            r#"{"ok":false,"error_code":502,"description":"Bad Gateway"}"#,
            "retry None telegram error 502: Bad Gateway",
        );
        check_judge(
            502,
            Some(3),
            "<html>bad gateway</html>",
            "retry Some(3s) telegram answered 502 without Bot API JSON: <html>bad gateway</html>",
        );
        check_judge(
            404,
            None,
            "not found",
            "permanent telegram answered 404 without Bot API JSON: not found",
        );
    }

    #[test]
    fn group_replies_count_against_the_group_minute() {
        let sender = TelegramSender {
            http: Http::new("telegram", 1000).unwrap(),
            url: reqwest::Url::parse("http://127.0.0.1:1/bot1:x/").unwrap(),
            parts: crate::parts::unconnected(),
            bot_id: "1".into(),
            bot_per_second: 30,
            chat_per_second: 1,
            chat_burst: 1,
            group_per_minute: 20,
        };
        let names = |kind| {
            sender
                .limits(&reply(kind, "x", &[]))
                .into_iter()
                .map(|limit| format!("{} {}/{:?}", limit.name, limit.count, limit.period))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(ChatKind::Direct),
            ["telegram:1 30/1s", "telegram:1:chat:-1001234 1/1s"]
        );
        assert_eq!(
            names(ChatKind::Group),
            [
                "telegram:1 30/1s",
                "telegram:1:chat:-1001234 1/1s",
                "telegram:1:group:-1001234 20/60s"
            ]
        );
    }
}
