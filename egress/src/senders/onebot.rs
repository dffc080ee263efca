//! OneBot v11 (QQ through NapCat, Lagrange, go-cqhttp): the HTTP API's
//! `send_msg` action, `POST {api_base_url}/send_msg` with
//! `Authorization: Bearer <access token>`:
//!
//! ```json
//! {"message_type": "group", "group_id": 123456789,        // or "private", "user_id"
//!  "message": [{"type": "reply", "data": {"id": "-2147483001"}},   // when the reply quotes one
//!              {"type": "at", "data": {"qq": "12345678"}},         // each mention
//!              {"type": "text", "data": {"text": " hello"}}]}
//! ```
//!
//! A mention written `@<qq>` in the text becomes an `at` segment where it
//! stands; one the text does not name goes in front. Segments, not CQ
//! strings, so the text needs no escaping. QQ ids are numbers: a chat id
//! that is not one is refused.
//!
//! OneBot answers 401 (no token), 403 (wrong token), 400, 404 and 406 for
//! requests it cannot take (permanent here), otherwise 200 with
//! `{"status", "retcode", "data": {"message_id"}}`: `retcode` 0 is sent, 1
//! (`async`) is accepted, anything else failed (permanent: OneBot cannot
//! say whether a failed send was half done, and QQ is better off without a
//! duplicate). 5xx and timeouts are retried. OneBot has no rate limit of
//! its own; the limits here (per account, per group, per private chat) are
//! to keep the QQ account out of trouble.
//!
//! With `transport = "ws"` the same `send_msg` goes over the WebSocket ingest
//! holds for the bot instead ([`ws`]), and its answer is judged alike.

mod ws;

use super::http::{self, Answered, Http};
use super::{media, mentions};
use super::{Attempt, Kit, Platform, Sender, Verdict};
use crate::limits::Limit;
use botline_shared::config::secret_env;
use botline_shared::message::{ChatKind, Reply};
use botline_shared::Error;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

pub const PLATFORM: Platform = Platform {
    name: "onebot",
    build,
};

/// The `access_token` set in the OneBot implementation's HTTP API settings.
pub const TOKEN_ENV: &str = "BOTLINE_ONEBOT_ACCESS_TOKEN";

/// `[egress.platforms.onebot]`, documented in shared/defaults.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OneBotSettings {
    #[allow(dead_code)]
    enabled: bool,
    transport: Transport,
    api_base_url: String,
    timeout_ms: u64,
    pickup_timeout_ms: u64,
    account_per_minute: u32,
    group_per_minute: u32,
    private_per_minute: u32,
    burst: u32,
}

/// How send_msg reaches the implementation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Transport {
    Http,
    Ws,
}

pub struct OneBotSender {
    http: Http,
    url: reqwest::Url,
    /// `Bearer <access token>`; empty with the WebSocket, which ingest holds.
    authorization: String,
    /// `transport = "ws"`: the WebSocket ingest holds, through Redis.
    socket: Option<ws::Socket>,
    account_per_minute: u32,
    group_per_minute: u32,
    private_per_minute: u32,
    burst: u32,
}

fn build(table: &toml::Value, kit: &Kit) -> Result<Arc<dyn Sender>, Error> {
    let settings = super::settings(PLATFORM.name, table, |settings: &OneBotSettings| {
        vec![
            ("account_per_minute", settings.account_per_minute),
            ("group_per_minute", settings.group_per_minute),
            ("private_per_minute", settings.private_per_minute),
            ("burst", settings.burst),
        ]
    })?;
    let setting = |name: &str| format!("egress.platforms.onebot.{name}");
    if settings.timeout_ms == 0 {
        return Err(Error::config(
            setting("timeout_ms"),
            "must be greater than 0",
        ));
    }
    let socket = match settings.transport {
        Transport::Http => None,
        Transport::Ws => Some(ws::Socket::new(kit, &settings)?),
    };
    let authorization = match socket {
        None => format!("Bearer {}", secret_env(kit.env, TOKEN_ENV, 1)?),
        Some(_) => String::new(),
    };
    let url = reqwest::Url::parse(&format!(
        "{}/send_msg",
        settings.api_base_url.trim_end_matches('/')
    ))
    .ok()
    .filter(|url| matches!(url.scheme(), "http" | "https"))
    .ok_or_else(|| Error::config(setting("api_base_url"), "must be an http(s) URL"))?;
    Ok(Arc::new(OneBotSender {
        http: Http::new(PLATFORM.name, settings.timeout_ms)?,
        url,
        authorization,
        socket,
        account_per_minute: settings.account_per_minute,
        group_per_minute: settings.group_per_minute,
        private_per_minute: settings.private_per_minute,
        burst: settings.burst,
    }))
}

impl Sender for OneBotSender {
    fn platform(&self) -> &'static str {
        PLATFORM.name
    }

    fn limits(&self, reply: &Reply) -> Vec<Limit> {
        let minute = Duration::from_secs(60);
        let (kind, per_minute) = match reply.chat.kind {
            ChatKind::Direct => ("private", self.private_per_minute),
            ChatKind::Group | ChatKind::Channel => ("group", self.group_per_minute),
        };
        vec![
            Limit::new(
                format!("onebot:{}", reply.bot),
                self.account_per_minute,
                minute,
            )
            .with_burst(self.burst),
            Limit::new(
                format!("onebot:{}:{kind}:{}", reply.bot, reply.chat.id),
                per_minute,
                minute,
            )
            .with_burst(self.burst),
        ]
    }

    fn attempt<'a>(&'a self, reply: &'a Reply) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            let body = match payload(reply) {
                Ok(body) => body,
                Err(reason) => {
                    return Attempt {
                        response: None,
                        verdict: Verdict::Permanent(reason),
                    }
                }
            };
            if let Some(socket) = &self.socket {
                return socket.attempt(reply, body).await;
            }
            let request = self
                .http
                .post(self.url.clone())
                .header(reqwest::header::AUTHORIZATION, &self.authorization)
                .json(&body);
            self.http.attempt(request, PLATFORM.name, judge).await
        })
    }
}

/// The `send_msg` parameters for `reply` (documented at the top of this
/// module), or why it cannot be sent.
pub fn payload(reply: &Reply) -> Result<Value, String> {
    let id: i64 = reply.chat.id.parse().map_err(|_| {
        format!(
            "onebot: chat {:?} is not a QQ number or group number",
            reply.chat.id
        )
    })?;
    let target = match reply.chat.kind {
        ChatKind::Direct => json!({ "message_type": "private", "user_id": id }),
        ChatKind::Group => json!({ "message_type": "group", "group_id": id }),
        ChatKind::Channel => {
            return Err(format!(
                "onebot: chat {} is a channel; OneBot v11 sends to private chats and groups",
                reply.chat.id
            ))
        }
    };
    let mut body = target;
    body["message"] = Value::Array(segments(reply));
    Ok(body)
}

fn segment(kind: &str, data: Value) -> Value {
    json!({ "type": kind, "data": data })
}

/// The reply as message segments: the quote, mentions not in the text,
/// the text with its `@<qq>` mentions as `at` segments (other attachments
/// as links on lines of their own), then an `image` segment per picture,
/// `{"type": "image", "data": {"file": "<url>"}}` (the implementation
/// fetches the URL).
fn segments(reply: &Reply) -> Vec<Value> {
    let mut segments = Vec::new();
    if let Some(id) = &reply.reply_to {
        segments.push(segment("reply", json!({ "id": id })));
    }
    let full_text = media::text_with_links(reply, false);
    let ahead: Vec<&String> = reply
        .mentions
        .iter()
        .filter(|user| !mentions::names(&full_text, user))
        .collect();
    for user in &ahead {
        segments.push(segment("at", json!({ "qq": user })));
    }
    let mut text = String::new();
    if !ahead.is_empty() {
        text.push(' ');
    }
    for piece in mentions::pieces(&full_text, &reply.mentions) {
        match piece {
            mentions::Piece::Text(part) => text.push_str(part),
            mentions::Piece::Mention(user) => {
                if !text.is_empty() {
                    segments.push(segment(
                        "text",
                        json!({ "text": std::mem::take(&mut text) }),
                    ));
                }
                segments.push(segment("at", json!({ "qq": user })));
            }
        }
    }
    if !text.is_empty() {
        segments.push(segment("text", json!({ "text": text })));
    }
    for image in media::images(reply) {
        segments.push(segment("image", json!({ "file": image.url })));
    }
    segments
}

/// An action's answer.
#[derive(Debug, Deserialize)]
struct ActionAnswer {
    #[serde(default)]
    status: String,
    retcode: i64,
    #[serde(default)]
    data: Option<Value>,
    /// go-cqhttp says why in `msg`, NapCat in `message`; both add `wording`.
    #[serde(default, alias = "msg")]
    message: Option<String>,
    #[serde(default)]
    wording: Option<String>,
}

/// What OneBot's answer means.
fn judge(answered: &Answered) -> Verdict {
    if let Some(verdict) = answered.status_verdict(PLATFORM.name) {
        return verdict;
    }
    judge_answer(&answered.body)
}

/// What an action's answer (the body of a 2xx, or a WebSocket frame) means.
fn judge_answer(body: &str) -> Verdict {
    let Ok(answer) = serde_json::from_str::<ActionAnswer>(body) else {
        return Verdict::Permanent(format!(
            "onebot send_msg answered without OneBot JSON: {}",
            http::quote(body)
        ));
    };
    match answer.retcode {
        0 | 1 => Verdict::Delivered {
            platform_message_id: answer
                .data
                .as_ref()
                .and_then(|data| data.get("message_id"))
                .and_then(|id| match id {
                    Value::Number(number) => Some(number.to_string()),
                    Value::String(text) => Some(text.clone()),
                    _ => None,
                }),
            writes: Vec::new(),
        },
        retcode => {
            let why = [answer.wording, answer.message]
                .into_iter()
                .flatten()
                .find(|why| !why.is_empty())
                .unwrap_or_default();
            Verdict::Permanent(format!(
                "onebot send_msg retcode {retcode} ({}): {}",
                answer.status,
                http::quote(&why)
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(kind: ChatKind, text: &str, mentions: &[&str], reply_to: Option<&str>) -> Reply {
        Reply {
            reply_to: reply_to.map(str::to_string),
            mentions: mentions.iter().map(|user| user.to_string()).collect(),
            ..http::test_reply("onebot", "10001000", "123456789", kind, text)
        }
    }

    fn check(reply: Reply, expected: Value) {
        assert_eq!(payload(&reply).unwrap(), expected, "{reply:?}");
    }

    #[test]
    fn replies_become_segments() {
        check(
            reply(ChatKind::Direct, "你好~", &[], None),
            json!({"message_type": "private", "user_id": 123456789,
                   "message": [{"type": "text", "data": {"text": "你好~"}}]}),
        );
        check(
            reply(ChatKind::Group, "hello", &["12345678"], Some("-2147483001")),
            json!({"message_type": "group", "group_id": 123456789, "message": [
                {"type": "reply", "data": {"id": "-2147483001"}},
                {"type": "at", "data": {"qq": "12345678"}},
                {"type": "text", "data": {"text": " hello"}}]}),
        );
        check(
            reply(
                ChatKind::Group,
                "hi @1 and @22, not @222x or @2",
                &["22", "1"],
                None,
            ),
            json!({"message_type": "group", "group_id": 123456789, "message": [
                {"type": "text", "data": {"text": "hi "}},
                {"type": "at", "data": {"qq": "1"}},
                {"type": "text", "data": {"text": " and "}},
                {"type": "at", "data": {"qq": "22"}},
                {"type": "text", "data": {"text": ", not @222x or @2"}}]}),
        );
        check(
            reply(ChatKind::Group, "@7", &["7"], None),
            json!({"message_type": "group", "group_id": 123456789, "message": [
                {"type": "at", "data": {"qq": "7"}}]}),
        );
    }

    #[test]
    fn pictures_are_image_segments_after_the_text() {
        let mut sent = reply(ChatKind::Group, "看 @12345678", &["12345678"], None);
        sent.attachments = vec![
            botline_shared::message::Attachment::image("https://x.test/a.png", Some("a".into())),
            botline_shared::message::Attachment::image("http://x.test/b.jpg", None),
        ];
        check(
            sent,
            json!({"message_type": "group", "group_id": 123456789, "message": [
                {"type": "text", "data": {"text": "看 "}},
                {"type": "at", "data": {"qq": "12345678"}},
                {"type": "image", "data": {"file": "https://x.test/a.png"}},
                {"type": "image", "data": {"file": "http://x.test/b.jpg"}}]}),
        );
    }

    #[test]
    fn chats_that_are_not_qq_numbers_are_refused() {
        let mut channel = reply(ChatKind::Channel, "x", &[], None);
        assert!(payload(&channel).unwrap_err().contains("channel"));
        channel.chat.id = "abc".into();
        channel.chat.kind = ChatKind::Group;
        assert!(payload(&channel).unwrap_err().contains("not a QQ number"));
    }
}
