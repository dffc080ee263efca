//! Telegram: each reply is one `POST <api>/bot<token>/sendMessage`, the
//! token being `BOTLINE_TELEGRAM_BOT_TOKEN`.
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
//! it. Text beyond Telegram's 4096 characters is cut with `…`.
//!
//! Answers: `{"ok": true, "result": {"message_id": …}}` is delivered;
//! 429 waits `parameters.retry_after` seconds; 5xx and timeouts are retried;
//! any other `ok: false` (400 bad request, 401 bad token, 403 blocked by the
//! user, a group migrated to a supergroup) is permanent, its reason naming
//! Telegram's `error_code` and `description`. Telegram has no idempotency
//! field; egress's sent keys keep a reply from being sent twice.

use super::http::{self, Answered, Http};
use super::mentions::{self, escape};
use super::{Attempt, Kit, Platform, Sender, Verdict};
use crate::limits::Limit;
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
/// Telegram's longest message text, in characters.
const MAX_TEXT_CHARS: usize = 4096;

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
    /// `<api>/bot<token>/sendMessage`: holds the token, so never logged.
    url: reqwest::Url,
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
    let url = reqwest::Url::parse(&format!("{base}/bot{token}/sendMessage")).map_err(|_| {
        Error::config(
            "egress.platforms.telegram.api_base_url",
            "with the bot token, does not make a URL",
        )
    })?;
    Ok(Arc::new(TelegramSender {
        http: Http::new(PLATFORM.name, settings.timeout_ms)?,
        url,
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
            let request = self.http.post(self.url.clone()).json(&payload(reply));
            self.http.attempt(request, PLATFORM.name, judge).await
        })
    }
}

/// The `sendMessage` body for `reply` (documented at the top of this module).
pub fn payload(reply: &Reply) -> serde_json::Value {
    let mut body = serde_json::json!({
        "chat_id": number_or_text(&reply.chat.id),
        "text": render(reply),
        "parse_mode": "HTML",
    });
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
    {
        body["reply_parameters"] = serde_json::json!({
            "message_id": message,
            "allow_sending_without_reply": true,
        });
    }
    body
}

fn number_or_text(id: &str) -> serde_json::Value {
    id.parse::<i64>()
        .map_or_else(|_| id.into(), serde_json::Value::from)
}

/// The reply's text as Telegram HTML, its mentions as inline mentions.
pub fn render(reply: &Reply) -> String {
    mentions::place(&escape(&cut(&reply.text)), &reply.mentions, |user| {
        let name = reply
            .platform_data
            .get(&format!("name:{user}"))
            .map_or(user, String::as_str);
        if !user.is_empty() && user.bytes().all(|b| b.is_ascii_digit()) {
            format!("<a href=\"tg://user?id={user}\">{}</a>", escape(name))
        } else {
            escape(name)
        }
    })
}

/// At most [`MAX_TEXT_CHARS`] characters, leaving room for mentions.
fn cut(text: &str) -> String {
    let limit = MAX_TEXT_CHARS - 96;
    if text.chars().count() <= limit {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(limit - 1).collect();
        cut.push('…');
        cut
    }
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
            render(&reply(ChatKind::Group, text, mentions)),
            expected,
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
    fn long_texts_are_cut_to_what_telegram_takes() {
        let long = "长".repeat(5000);
        let rendered = render(&reply(ChatKind::Direct, &long, &[]));
        assert_eq!(rendered.chars().count(), MAX_TEXT_CHARS - 96);
        assert!(rendered.ends_with('…'));
    }

    #[test]
    fn payloads_carry_threads_and_replies_as_numbers() {
        let mut sent = reply(ChatKind::Group, "hi", &[]);
        sent.thread = Some("4".into());
        sent.reply_to = Some("12".into());
        assert_eq!(
            payload(&sent),
            serde_json::json!({
                "chat_id": -1001234,
                "text": "hi",
                "parse_mode": "HTML",
                "message_thread_id": 4,
                "reply_parameters": {"message_id": 12, "allow_sending_without_reply": true},
            })
        );
        sent.chat.id = "@news".into();
        sent.thread = None;
        sent.reply_to = None;
        assert_eq!(
            payload(&sent),
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
            url: reqwest::Url::parse("http://127.0.0.1:1/bot1:x/sendMessage").unwrap(),
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
