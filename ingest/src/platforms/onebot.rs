//! OneBot v11 (QQ through NapCat, Lagrange, go-cqhttp): events by HTTP POST.
//!
//! The implementation POSTs each event as JSON to `/hooks/onebot`, with
//! `X-Self-ID` (the bot's QQ number) and, since a secret is configured,
//! `X-Signature: sha1=<hex HMAC-SHA1(secret, body)>`, checked here in
//! constant time (401 `missing_signature`, `bad_signature`). OneBot has no
//! timestamp window and does not retry; the dedup key is
//! `<self_id>:<message_id>`, so a repeated post adds nothing.
//!
//! Only `post_type: message` becomes a message: `message_type` `private` is
//! a direct chat with the sender (chat id = `user_id`), `group` a group chat
//! (chat id = `group_id`). The message is either an array of segments or a
//! CQ-code string (`[CQ:at,qq=123]`, text escaped with `&amp;` `&#91;`
//! `&#93;`, parameter values also `&#44;`); both are read alike: `text`
//! segments are the text, `at` becomes `@<qq>` (and a mention; the bot is
//! mentioned when `qq` is its `self_id`, `@all` mentions no one in
//! particular), `reply` is the message answered, `image`, `record`, `video`
//! and `file` are attachments (by URL when given, and by file name). The
//! bot's own messages (`message_sent`, or a sender that is the bot),
//! `notice`, `request` and `meta_event` (heartbeats) are acknowledged and
//! counted as ignored.
//!
//! The same events come over a WebSocket in the other two modes, read by
//! the same parser ([`read_frame`]) and deduplicated by the same key, and
//! the bot's replies go back over it ([`session`]): `mode = "forward"`,
//! ingest connects to the implementation ([`forward`]); `mode = "reverse"`,
//! the implementation connects to `/hooks/onebot/ws` ([`reverse`]). In
//! both, the access token (`BOTLINE_ONEBOT_ACCESS_TOKEN`) authenticates
//! the connection and `/hooks/onebot` is off.

mod forward;
mod reverse;
mod session;

use super::connection::{platform_settings, Supervision};
use super::{Answer, Event, Hook, HookRequest, InboundPlatform, Registration, SocketService};
use crate::error::IngestError;
use crate::generic::{parse_json, Stamp};
use crate::inbox::Inbox;
use axum::http::{HeaderMap, Method};
use botline_shared::config::{secret_env, Env};
use botline_shared::message::{
    Attachment, AttachmentKind, Chat, ChatKind, Mentions, Sender, UnifiedMessage,
};
use botline_shared::telemetry::Health;
use botline_shared::Error;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha1::Sha1;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub const PLATFORM: Registration = Registration {
    name: "onebot",
    build,
};

/// The `secret` set in the OneBot implementation's HTTP POST settings.
pub const SECRET_ENV: &str = "BOTLINE_ONEBOT_SECRET";
/// The implementation's `access_token`: the WebSocket modes' credential.
pub const TOKEN_ENV: &str = "BOTLINE_ONEBOT_ACCESS_TOKEN";
const SIGNATURE_HEADER: &str = "x-signature";
const SECTION: &str = "ingest.platforms.onebot";
/// The lease of a bot's connection, the one that carries its replies
/// (`consumer:onebot-socket:<self_id>`).
const LEASE_KIND: &str = "onebot-socket";

/// `[ingest.platforms.onebot]`, documented in shared/defaults.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OneBotSettings {
    #[allow(dead_code)]
    enabled: bool,
    mode: Mode,
    ws_url: String,
    self_id: String,
    heartbeat_misses: u32,
}

/// How events reach ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// The implementation POSTs them to `/hooks/onebot`.
    Http,
    /// Ingest connects to the implementation's WebSocket.
    Forward,
    /// The implementation connects to `/hooks/onebot/ws`.
    Reverse,
}

pub struct OneBot {
    transport: Transport,
}

enum Transport {
    /// HTTP POST, signed with this secret.
    Http {
        secret: Vec<u8>,
    },
    Forward(Arc<forward::Target>),
    Reverse(Arc<reverse::Reverse>),
}

fn build(table: &toml::Value, env: &dyn Env) -> Result<Arc<dyn InboundPlatform>, Error> {
    let (settings, supervision): (OneBotSettings, _) = platform_settings(SECTION, table)?;
    if settings.heartbeat_misses == 0 {
        return Err(Error::config(
            format!("{SECTION}.heartbeat_misses"),
            "must be at least 1",
        ));
    }
    let mode = settings.mode;
    let transport = match mode {
        Mode::Http => Transport::Http {
            secret: secret_env(env, SECRET_ENV, 8)?.into_bytes(),
        },
        Mode::Forward => Transport::Forward(Arc::new(target(settings, supervision, env)?)),
        Mode::Reverse => Transport::Reverse(Arc::new(reverse::Reverse::new(
            secret_env(env, TOKEN_ENV, 8)?,
            settings.heartbeat_misses,
            supervision,
        ))),
    };
    info!(message = "onebot events", ?mode);
    Ok(Arc::new(OneBot { transport }))
}

/// Where forward mode connects, and as which bot.
fn target(
    settings: OneBotSettings,
    supervision: Supervision,
    env: &dyn Env,
) -> Result<forward::Target, Error> {
    let setting = |name: &str| format!("{SECTION}.{name}");
    let url = url::Url::parse(&settings.ws_url)
        .ok()
        .filter(|url| matches!(url.scheme(), "ws" | "wss"))
        .ok_or_else(|| Error::config(setting("ws_url"), "must be a ws:// or wss:// URL"))?;
    let self_id = settings.self_id;
    if self_id.is_empty() || !self_id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::config(
            setting("self_id"),
            "must be the bot's QQ number in forward mode",
        ));
    }
    Ok(forward::Target {
        url,
        self_id,
        token: secret_env(env, TOKEN_ENV, 1)?,
        heartbeat_misses: settings.heartbeat_misses,
        supervision,
    })
}

impl InboundPlatform for OneBot {
    fn name(&self) -> &'static str {
        PLATFORM.name
    }

    fn receive(&self, request: &HookRequest) -> Result<Hook, IngestError> {
        let unverified = |reason, detail: &str| IngestError::Unverified {
            platform: PLATFORM.name,
            reason,
            detail: detail.to_string(),
        };
        let Transport::Http { secret } = &self.transport else {
            return Err(unverified(
                "webhook_off",
                "events come over the WebSocket (mode forward or reverse); /hooks/onebot is not used",
            ));
        };
        let signature = request
            .header(SIGNATURE_HEADER)
            .ok_or_else(|| unverified("missing_signature", "no X-Signature header"))?;
        let given = signature
            .strip_prefix("sha1=")
            .and_then(|hex| hex::decode(hex).ok())
            .unwrap_or_default();
        let mut mac = Hmac::<Sha1>::new_from_slice(secret).expect("any key length");
        mac.update(&request.body);
        mac.verify_slice(&given).map_err(|_| {
            unverified(
                "bad_signature",
                &format!("X-Signature does not match {SECRET_ENV}"),
            )
        })?;
        read(request)
    }

    fn start(self: Arc<Self>, inbox: Inbox, health: Health, shutdown: CancellationToken) {
        match &self.transport {
            Transport::Http { .. } => {}
            Transport::Forward(target) => forward::start(target.clone(), inbox, health, shutdown),
            Transport::Reverse(reverse) => reverse.start(inbox, health, shutdown),
        }
    }

    fn socket(self: Arc<Self>, request: &HookRequest) -> Result<SocketService, IngestError> {
        match &self.transport {
            Transport::Reverse(reverse) => reverse.clone().accept(request),
            _ => Err(IngestError::UnknownPlatform(format!(
                "{} in reverse mode",
                PLATFORM.name
            ))),
        }
    }
}

/// An event, as the HTTP path reads it once verified.
fn read(request: &HookRequest) -> Result<Hook, IngestError> {
    let post: Post = parse_json(&request.body)?;
    read_post(post, request.stamp())
}

/// An event that came over a WebSocket (no signature there: the
/// connection was authenticated), read as the HTTP path reads it.
fn read_frame(text: &[u8]) -> Result<Hook, IngestError> {
    let request = HookRequest::new(Method::POST, None, HeaderMap::new(), text.to_vec().into());
    read(&request)
}

// ---- OneBot's events, as far as botline reads them ----

/// A QQ number or message id: a JSON number, or a string of one.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
enum Id {
    Number(i64),
    Text(String),
}

impl Id {
    fn text(&self) -> String {
        match self {
            Id::Number(number) => number.to_string(),
            Id::Text(text) => text.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct Post {
    post_type: String,
    self_id: Id,
    #[serde(default)]
    time: Option<i64>,
    #[serde(default)]
    message_type: Option<String>,
    #[serde(default)]
    message_id: Option<Id>,
    #[serde(default)]
    user_id: Option<Id>,
    #[serde(default)]
    group_id: Option<Id>,
    #[serde(default)]
    message: Option<Content>,
    #[serde(default)]
    sender: Option<PostSender>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Content {
    Segments(Vec<RawSegment>),
    CqCode(String),
}

#[derive(Debug, Deserialize)]
struct RawSegment {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    data: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Default, Deserialize)]
struct PostSender {
    #[serde(default)]
    nickname: Option<String>,
    /// The group card (the name shown in that group).
    #[serde(default)]
    card: Option<String>,
}

/// One message segment, from either format: its type and its data as text.
#[derive(Debug, PartialEq)]
struct Segment {
    kind: String,
    data: BTreeMap<String, String>,
}

impl Segment {
    fn get(&self, name: &str) -> Option<&str> {
        self.data
            .get(name)
            .map(String::as_str)
            .filter(|value| !value.is_empty())
    }
}

impl From<RawSegment> for Segment {
    fn from(raw: RawSegment) -> Self {
        let data = raw
            .data
            .into_iter()
            .filter_map(|(name, value)| {
                let text = match value {
                    serde_json::Value::String(text) => text,
                    serde_json::Value::Number(number) => number.to_string(),
                    serde_json::Value::Bool(flag) => flag.to_string(),
                    _ => return None,
                };
                Some((name, text))
            })
            .collect();
        Segment {
            kind: raw.kind,
            data,
        }
    }
}

/// The segments of a CQ-code string: plain text between the codes becomes
/// `text` segments; an unclosed `[CQ:` is text.
fn parse_cq(message: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    let text = |raw: &str, segments: &mut Vec<Segment>| {
        if !raw.is_empty() {
            segments.push(Segment {
                kind: "text".into(),
                data: BTreeMap::from([("text".into(), unescape(raw))]),
            });
        }
    };
    let mut rest = message;
    while let Some(start) = rest.find("[CQ:") {
        let Some(length) = rest[start..].find(']') else {
            break;
        };
        text(&rest[..start], &mut segments);
        let code = &rest[start + 4..start + length];
        let mut parts = code.split(',');
        let kind = parts.next().unwrap_or_default().to_string();
        let data = parts
            .filter_map(|part| part.split_once('='))
            .map(|(name, value)| (name.to_string(), unescape(value)))
            .collect();
        segments.push(Segment { kind, data });
        rest = &rest[start + length + 1..];
    }
    text(rest, &mut segments);
    segments
}

/// CQ escapes undone in one pass: `&amp;` `&#91;` `&#93;` `&#44;`.
fn unescape(text: &str) -> String {
    const ESCAPES: [(&str, char); 4] = [
        ("&amp;", '&'),
        ("&#91;", '['),
        ("&#93;", ']'),
        ("&#44;", ','),
    ];
    let mut plain = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        plain.push_str(&rest[..at]);
        rest = &rest[at..];
        match ESCAPES.iter().find(|(escape, _)| rest.starts_with(escape)) {
            Some((escape, character)) => {
                plain.push(*character);
                rest = &rest[escape.len()..];
            }
            None => {
                plain.push('&');
                rest = &rest[1..];
            }
        }
    }
    plain.push_str(rest);
    plain
}

/// What a message's segments say, in unified terms.
#[derive(Debug, Default, PartialEq)]
struct Read {
    text: String,
    mentions: Mentions,
    reply_to: Option<String>,
    attachments: Vec<Attachment>,
}

fn read_segments(segments: Vec<Segment>, self_id: &str) -> Read {
    let mut read = Read::default();
    for segment in segments {
        let attachment = |kind| Attachment {
            kind,
            url: segment
                .get("url")
                .or(segment.get("file").filter(|file| file.starts_with("http")))
                .map(str::to_string),
            file_id: segment.get("file").map(str::to_string),
            mime: None,
            size: None,
            name: None,
        };
        match segment.kind.as_str() {
            "text" => read.text.push_str(segment.get("text").unwrap_or_default()),
            "at" => {
                let Some(qq) = segment.get("qq") else {
                    continue;
                };
                read.text.push('@');
                read.text.push_str(qq);
                if qq == self_id {
                    read.mentions.bot = true;
                }
                if qq != "all" && !read.mentions.users.iter().any(|user| user == qq) {
                    read.mentions.users.push(qq.to_string());
                }
            }
            "reply" => read.reply_to = segment.get("id").map(str::to_string),
            "image" => read.attachments.push(attachment(AttachmentKind::Image)),
            "record" => read.attachments.push(attachment(AttachmentKind::Audio)),
            "video" => read.attachments.push(attachment(AttachmentKind::Video)),
            "file" => read.attachments.push(attachment(AttachmentKind::File)),
            _ => {}
        }
    }
    read
}

fn read_post(post: Post, stamp: Stamp) -> Result<Hook, IngestError> {
    let ignored = |kind: &str| {
        Ok(Hook::Ignored {
            kind: kind.into(),
            answer: Answer::ok(),
        })
    };
    match post.post_type.as_str() {
        "message" => {}
        "message_sent" => return ignored("own_message"),
        "notice" | "request" | "meta_event" => return ignored(&post.post_type),
        _ => return ignored("unknown"),
    }
    let self_id = post.self_id.text();
    let missing = |field: &str| IngestError::Malformed(format!("a message event without {field}"));
    let user = post.user_id.ok_or_else(|| missing("user_id"))?.text();
    if user == self_id {
        return ignored("own_message");
    }
    let chat = match post.message_type.as_deref() {
        Some("private") => Chat {
            id: user.clone(),
            kind: ChatKind::Direct,
        },
        Some("group") => Chat {
            id: post.group_id.ok_or_else(|| missing("group_id"))?.text(),
            kind: ChatKind::Group,
        },
        _ => return ignored("unsupported_message"),
    };
    let message_id = post.message_id.ok_or_else(|| missing("message_id"))?.text();
    let segments = match post.message.ok_or_else(|| missing("message"))? {
        Content::Segments(raw) => raw.into_iter().map(Segment::from).collect(),
        Content::CqCode(text) => parse_cq(&text),
    };
    let read = read_segments(segments, &self_id);
    let sender = post.sender.unwrap_or_default();
    let name = [sender.card, sender.nickname]
        .into_iter()
        .flatten()
        .find(|name| !name.trim().is_empty())
        .unwrap_or_else(|| user.clone());
    let sender = Sender {
        id: user,
        name,
        is_bot: false,
    };
    let message = UnifiedMessage {
        mentions: read.mentions,
        attachments: read.attachments,
        reply_to: read.reply_to,
        platform_message_id: Some(message_id.clone()),
        platform_ts_ms: post.time.map(|seconds| seconds.saturating_mul(1000)),
        ..stamp.user_message(PLATFORM.name, self_id.clone(), chat, sender, read.text)
    };
    Ok(Hook::Events {
        events: vec![Event {
            event_id: format!("{self_id}:{message_id}"),
            message,
        }],
        answer: Answer::ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_unescape(escaped: &str, plain: &str) {
        assert_eq!(unescape(escaped), plain, "{escaped:?}");
    }

    // The examples of OneBot 11's message/string.md.
    #[test]
    fn cq_escapes_are_undone_once() {
        check_unescape(
            "- &#91;x&#93; 使用 `&amp;data` 获取地址",
            "- [x] 使用 `&data` 获取地址",
        );
        check_unescape("震惊&#44;小伙睡觉前居然...", "震惊,小伙睡觉前居然...");
        check_unescape("&amp;#91;", "&#91;");
        check_unescape("a & b &c; &#", "a & b &c; &#");
        check_unescape("", "");
    }

    fn check_cq(message: &str, expected: &[(&str, &[(&str, &str)])]) {
        let expected: Vec<Segment> = expected
            .iter()
            .map(|(kind, data)| Segment {
                kind: kind.to_string(),
                data: data
                    .iter()
                    .map(|(name, value)| (name.to_string(), value.to_string()))
                    .collect(),
            })
            .collect();
        assert_eq!(parse_cq(message), expected, "{message:?}");
    }

    #[test]
    fn cq_strings_become_segments() {
        check_cq(
            "[CQ:face,id=178]看看我刚拍的照片[CQ:image,file=123.jpg]",
            &[
                ("face", &[("id", "178")]),
                ("text", &[("text", "看看我刚拍的照片")]),
                ("image", &[("file", "123.jpg")]),
            ],
        );
        check_cq(
            "[CQ:share,title=标题中有=等号,url=http://baidu.com/?a=1&amp;b=2]",
            &[(
                "share",
                &[
                    ("title", "标题中有=等号"),
                    ("url", "http://baidu.com/?a=1&b=2"),
                ],
            )],
        );
        check_cq("[CQ:shake]", &[("shake", &[])]);
        check_cq(
            "plain &#91;text&#93;",
            &[("text", &[("text", "plain [text]")])],
        );
        check_cq(
            "broken [CQ:at,qq=1",
            &[("text", &[("text", "broken [CQ:at,qq=1")])],
        );
        check_cq("", &[]);
    }

    #[test]
    fn segments_become_text_mentions_replies_and_attachments() {
        let read = read_segments(
            parse_cq(
                "[CQ:reply,id=-42][CQ:at,qq=10001000] hi [CQ:at,qq=123][CQ:at,qq=123] [CQ:at,qq=all]\
                 [CQ:image,file=a.image,url=https://x/a.jpg][CQ:record,file=https://x/v.amr]",
            ),
            "10001000",
        );
        assert_eq!(read.text, "@10001000 hi @123@123 @all");
        assert_eq!(read.mentions.users, ["10001000", "123"]);
        assert!(read.mentions.bot);
        assert_eq!(read.reply_to.as_deref(), Some("-42"));
        assert_eq!(read.attachments.len(), 2);
        assert_eq!(read.attachments[0].url.as_deref(), Some("https://x/a.jpg"));
        assert_eq!(read.attachments[0].file_id.as_deref(), Some("a.image"));
        assert_eq!(read.attachments[1].kind, AttachmentKind::Audio);
        assert_eq!(read.attachments[1].url.as_deref(), Some("https://x/v.amr"));

        let someone_else = read_segments(parse_cq("[CQ:at,qq=123] hi"), "10001000");
        assert!(!someone_else.mentions.bot);
    }
}
