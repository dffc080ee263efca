//! The generic JSON formats of `POST /v1/messages` and `POST /v1/broadcast`,
//! and how they become [`UnifiedMessage`]s. Pure: no I/O here.

use crate::error::IngestError;
use botline_shared::message::{
    Attachment, Chat, ChatKind, Mentions, Origin, Sender, UnifiedMessage, RAW_EVENT_LIMIT,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;

/// The platform of generic API messages that name none.
pub const DEFAULT_PLATFORM: &str = "webhook";
/// The bot account of messages that name none, and of the web chat.
pub const DEFAULT_BOT: &str = "botline";
/// Longest platform name, event id, chat or sender id accepted.
pub const MAX_ID_CHARS: usize = 256;

/// Body of `POST /v1/messages`: one message for a custom integration.
///
/// ```json
/// {
///   "event_id": "evt-123",            // optional; a retry with the same id is dropped
///   "platform": "telegram",           // optional, [a-z0-9_]+, default "webhook"
///   "bot": "support_bot",             // optional, default "botline"
///   "chat": {"id": "c1", "kind": "group"},   // kind: direct (default) | group | channel
///   "thread": "t1",                   // optional
///   "sender": {"id": "u1", "name": "Ann", "is_bot": false},  // name defaults to id
///   "text": "hello @u2",              // at most [ingest] max_text_chars characters
///   "mentions": {"users": ["u2"], "bot": true},              // optional
///   "reply_to": "m0",                 // optional, the platform id of the message answered
///   "attachments": [{"kind": "image", "url": "https://…", "file_id": null,
///                    "mime": "image/png", "size": 1234, "name": "a.png"}],
///   "timestamp_ms": 1700000000000     // optional, when the platform says it was sent
/// }
/// ```
///
/// Unknown fields are refused (400, naming the field). `text` may be empty
/// only when there are attachments. Answers: 202 `{"id", "trace_id"}`,
/// or 200 `{"duplicate": true, "event_id"}` for an event id already seen.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericMessage {
    #[serde(default)]
    pub event_id: Option<String>,
    #[serde(default)]
    pub platform: Option<String>,
    #[serde(default)]
    pub bot: Option<String>,
    pub chat: GenericChat,
    #[serde(default)]
    pub thread: Option<String>,
    pub sender: GenericSender,
    pub text: String,
    #[serde(default)]
    pub mentions: GenericMentions,
    #[serde(default)]
    pub reply_to: Option<String>,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    #[serde(default)]
    pub timestamp_ms: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericChat {
    pub id: String,
    #[serde(default = "direct")]
    pub kind: ChatKind,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericSender {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub is_bot: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenericMentions {
    #[serde(default)]
    pub users: Vec<String>,
    #[serde(default)]
    pub bot: bool,
}

/// Body of `POST /v1/broadcast`: one text to many chats, each becoming its
/// own message with origin `broadcast`.
///
/// ```json
/// {
///   "event_id": "announce-7",        // optional; dedup key per chat: <event_id>:<platform>:<chat>
///   "text": "Maintenance at 22:00",
///   "chats": [{"platform": "web", "chat": "abc", "kind": "direct"},   // kind optional, default direct
///             {"platform": "telegram", "chat": "-100123", "kind": "group"}]
/// }
/// ```
///
/// At most `[ingest] broadcast_max_chats` chats (400 above). Answers 202
/// `{"id": <broadcast id>, "trace_id", "accepted": n, "duplicates": m}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Broadcast {
    #[serde(default)]
    pub event_id: Option<String>,
    pub text: String,
    pub chats: Vec<BroadcastChat>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BroadcastChat {
    pub platform: String,
    pub chat: String,
    #[serde(default = "direct")]
    pub kind: ChatKind,
}

fn direct() -> ChatKind {
    ChatKind::Direct
}

/// What every inbound message gets from ingest itself.
#[derive(Debug, Clone)]
pub struct Stamp {
    pub id: String,
    pub received_at_ms: i64,
    pub trace_id: String,
    pub raw: Option<String>,
}

/// JSON of type `T`, a shape error naming the path of the offending field.
pub fn parse_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, IngestError> {
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut deserializer).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if path == "." || path == "?" {
            IngestError::Malformed(inner.to_string())
        } else {
            IngestError::Malformed(format!("{path}: {inner}"))
        }
    })?;
    deserializer
        .end()
        .map_err(|error| IngestError::Malformed(error.to_string()))?;
    Ok(value)
}

pub fn is_platform_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn check_id(field: &str, value: &str) -> Result<(), IngestError> {
    if value.trim().is_empty() {
        return Err(IngestError::Invalid(format!("{field} must not be empty")));
    }
    if value.chars().count() > MAX_ID_CHARS {
        return Err(IngestError::Invalid(format!(
            "{field} is longer than {MAX_ID_CHARS} characters"
        )));
    }
    Ok(())
}

pub fn check_text(text: &str, max_chars: usize) -> Result<(), IngestError> {
    let chars = text.chars().count();
    if chars > max_chars {
        return Err(IngestError::Invalid(format!(
            "text has {chars} characters, more than the limit of {max_chars}"
        )));
    }
    Ok(())
}

fn check_platform(platform: &str) -> Result<(), IngestError> {
    if is_platform_name(platform) {
        Ok(())
    } else {
        Err(IngestError::Invalid(format!(
            "platform {platform:?} must match [a-z0-9_]+ (at most 32 characters)"
        )))
    }
}

impl GenericMessage {
    /// The event id used for deduplication, checked.
    pub fn checked_event_id(&self) -> Result<Option<&str>, IngestError> {
        if let Some(event_id) = &self.event_id {
            check_id("event_id", event_id)?;
        }
        Ok(self.event_id.as_deref())
    }

    /// The unified message, or why the values are not acceptable.
    pub fn into_unified(
        self,
        stamp: Stamp,
        max_text_chars: usize,
    ) -> Result<UnifiedMessage, IngestError> {
        self.checked_event_id()?;
        let platform = self.platform.unwrap_or_else(|| DEFAULT_PLATFORM.into());
        check_platform(&platform)?;
        let bot = self.bot.unwrap_or_else(|| DEFAULT_BOT.into());
        check_id("bot", &bot)?;
        check_id("chat.id", &self.chat.id)?;
        check_id("sender.id", &self.sender.id)?;
        check_text(&self.text, max_text_chars)?;
        if self.text.trim().is_empty() && self.attachments.is_empty() {
            return Err(IngestError::Invalid(
                "text must not be empty unless there are attachments".into(),
            ));
        }
        Ok(UnifiedMessage {
            id: stamp.id,
            platform,
            bot,
            chat: Chat {
                id: self.chat.id,
                kind: self.chat.kind,
            },
            thread: self.thread,
            sender: Sender {
                name: self.sender.name.unwrap_or_else(|| self.sender.id.clone()),
                id: self.sender.id,
                is_bot: self.sender.is_bot,
            },
            text: self.text,
            mentions: Mentions {
                users: self.mentions.users,
                bot: self.mentions.bot,
            },
            attachments: self.attachments,
            reply_to: self.reply_to,
            platform_message_id: None,
            platform_data: Default::default(),
            platform_ts_ms: self.timestamp_ms,
            received_at_ms: stamp.received_at_ms,
            trace_id: stamp.trace_id,
            origin: Origin::User,
            replay: false,
            raw: stamp.raw,
        })
    }
}

impl Broadcast {
    /// Refuse what no chat could accept: too many chats, bad text, bad names.
    pub fn check(&self, max_chats: usize, max_text_chars: usize) -> Result<(), IngestError> {
        if self.chats.is_empty() {
            return Err(IngestError::Malformed("chats must not be empty".into()));
        }
        if self.chats.len() > max_chats {
            return Err(IngestError::Malformed(format!(
                "{} chats, more than the limit of {max_chats}",
                self.chats.len()
            )));
        }
        if let Some(event_id) = &self.event_id {
            check_id("event_id", event_id)?;
        }
        check_text(&self.text, max_text_chars)?;
        if self.text.trim().is_empty() {
            return Err(IngestError::Invalid("text must not be empty".into()));
        }
        for (index, chat) in self.chats.iter().enumerate() {
            check_platform(&chat.platform)?;
            check_id(&format!("chats[{index}].chat"), &chat.chat)?;
        }
        Ok(())
    }

    /// The message for one chat: the bot announces `text` there.
    pub fn message_for(
        &self,
        chat: &BroadcastChat,
        broadcast_id: &str,
        stamp: Stamp,
    ) -> UnifiedMessage {
        announcement(
            stamp,
            &chat.platform,
            Chat {
                id: chat.chat.clone(),
                kind: chat.kind,
            },
            &self.text,
            Origin::Broadcast {
                id: broadcast_id.to_string(),
            },
            "broadcast",
            None,
        )
    }

    /// The dedup event id of one chat's copy.
    pub fn event_id_for(&self, chat: &BroadcastChat) -> Option<String> {
        self.event_id
            .as_ref()
            .map(|event_id| format!("{event_id}:{}:{}", chat.platform, chat.chat))
    }
}

/// A message the bot is to say rather than answer (scheduled, broadcast).
pub fn announcement(
    stamp: Stamp,
    platform: &str,
    chat: Chat,
    text: &str,
    origin: Origin,
    sender: &str,
    platform_ts_ms: Option<i64>,
) -> UnifiedMessage {
    UnifiedMessage {
        id: stamp.id,
        platform: platform.to_string(),
        bot: DEFAULT_BOT.into(),
        chat,
        thread: None,
        sender: Sender {
            id: sender.into(),
            name: sender.into(),
            is_bot: true,
        },
        text: text.to_string(),
        mentions: Mentions::default(),
        attachments: Vec::new(),
        reply_to: None,
        platform_message_id: None,
        platform_data: Default::default(),
        platform_ts_ms,
        received_at_ms: stamp.received_at_ms,
        trace_id: stamp.trace_id,
        origin,
        replay: false,
        raw: stamp.raw,
    }
}

/// The first [`RAW_EVENT_LIMIT`] bytes of a body, cut on a character boundary.
pub fn raw_event(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut end = text.len().min(RAW_EVENT_LIMIT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_string()
}

/// The trace id a caller sent (`X-Trace-Id`, else the trace id of a W3C
/// `traceparent`), or `None` to make one.
pub fn caller_trace_id(x_trace_id: Option<&str>, traceparent: Option<&str>) -> Option<String> {
    if let Some(id) = x_trace_id.map(str::trim) {
        let usable = !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic());
        if usable {
            return Some(id.to_string());
        }
    }
    let parts: Vec<&str> = traceparent?.trim().split('-').collect();
    match parts.as_slice() {
        [_version, trace, _parent, _flags]
            if trace.len() == 32
                && trace.bytes().all(|b| b.is_ascii_hexdigit())
                && trace.bytes().any(|b| b != b'0') =>
        {
            Some(trace.to_ascii_lowercase())
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp() -> Stamp {
        Stamp {
            id: "01J0000000000000000000000A".into(),
            received_at_ms: 5,
            trace_id: "t".into(),
            raw: None,
        }
    }

    fn convert(json: &str) -> Result<UnifiedMessage, String> {
        parse_json::<GenericMessage>(json.as_bytes())
            .and_then(|message| message.into_unified(stamp(), 10))
            .map_err(|error| format!("{} {error}", error.status().as_u16()))
    }

    fn check_refused(json: &str, expected: &str) {
        assert_eq!(convert(json).unwrap_err(), expected, "{json}");
    }

    #[test]
    fn bad_messages_are_refused_with_the_reason() {
        check_refused("{", "400 EOF while parsing an object at line 1 column 1");
        check_refused(
            r#"{"chat":{"id":"c"},"sender":{"id":"u"},"text":"hi","colour":"red"}"#,
            "400 colour: unknown field `colour`, expected one of `event_id`, `platform`, `bot`, `chat`, `thread`, `sender`, `text`, `mentions`, `reply_to`, `attachments`, `timestamp_ms` at line 1 column 59",
        );
        check_refused(
            r#"{"chat":{"id":"c","room":1},"sender":{"id":"u"},"text":"hi"}"#,
            "400 chat.room: unknown field `room`, expected `id` or `kind` at line 1 column 24",
        );
        check_refused(
            r#"{"chat":{"id":"c"},"sender":{"id":"u"}}"#,
            "400 missing field `text` at line 1 column 39",
        );
        check_refused(
            r#"{"chat":{"id":"c","kind":"room"},"sender":{"id":"u"},"text":"hi"}"#,
            "400 chat.kind: unknown variant `room`, expected one of `direct`, `group`, `channel` at line 1 column 31",
        );
        check_refused(
            r#"{"platform":"Tele gram","chat":{"id":"c"},"sender":{"id":"u"},"text":"hi"}"#,
            "422 platform \"Tele gram\" must match [a-z0-9_]+ (at most 32 characters)",
        );
        check_refused(
            r#"{"chat":{"id":"c"},"sender":{"id":"u"},"text":"01234567890"}"#,
            "422 text has 11 characters, more than the limit of 10",
        );
        check_refused(
            r#"{"chat":{"id":""},"sender":{"id":"u"},"text":"hi"}"#,
            "422 chat.id must not be empty",
        );
        check_refused(
            r#"{"chat":{"id":"c"},"sender":{"id":"u"},"text":" "}"#,
            "422 text must not be empty unless there are attachments",
        );
        check_refused(
            r#"{"chat":{"id":"c"},"sender":{"id":"u"},"text":"hi"} trailing"#,
            "400 trailing characters at line 1 column 53",
        );
    }

    #[test]
    fn a_full_message_keeps_every_field() {
        let message = convert(
            r#"{"event_id":"e","platform":"telegram","bot":"b","chat":{"id":"c","kind":"group"},
                "thread":"t","sender":{"id":"u","name":"小明","is_bot":true},"text":"你好 🎉",
                "mentions":{"users":["u2"],"bot":true},"reply_to":"m0",
                "attachments":[{"kind":"image","url":"https://x/a.png","size":3}],"timestamp_ms":7}"#,
        )
        .unwrap();
        assert_eq!(message.platform, "telegram");
        assert_eq!(message.chat.kind, ChatKind::Group);
        assert_eq!(message.sender.name, "小明");
        assert_eq!(message.text, "你好 🎉");
        assert!(message.mentions.bot);
        assert_eq!(message.attachments[0].size, Some(3));
        assert_eq!(message.platform_ts_ms, Some(7));
        assert_eq!(message.origin, Origin::User);
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let message = convert(r#"{"chat":{"id":"c"},"sender":{"id":"u"},"text":"hi"}"#).unwrap();
        assert_eq!(message.platform, "webhook");
        assert_eq!(message.bot, "botline");
        assert_eq!(message.chat.kind, ChatKind::Direct);
        assert_eq!(message.sender.name, "u");
    }

    #[test]
    fn raw_events_are_cut_on_a_character_boundary() {
        for (body, expected_len) in [
            ("a".repeat(10), 10),
            ("a".repeat(RAW_EVENT_LIMIT + 5), RAW_EVENT_LIMIT),
            (
                format!("a{}", "长".repeat(RAW_EVENT_LIMIT)),
                RAW_EVENT_LIMIT,
            ),
            (
                format!("ab{}", "长".repeat(RAW_EVENT_LIMIT)),
                RAW_EVENT_LIMIT - 2,
            ),
        ] {
            assert_eq!(raw_event(body.as_bytes()).len(), expected_len);
        }
    }

    #[test]
    fn trace_ids_come_from_the_caller_when_usable() {
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        for (x_trace, traceparent, expected) in [
            (Some("abc"), Some(parent), Some("abc")),
            (None, Some(parent), Some("4bf92f3577b34da6a3ce929d0e0e4736")),
            (
                Some(" "),
                Some(parent),
                Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            ),
            (Some("has space"), None, None),
            (None, Some("00-0000-00f067aa0ba902b7-01"), None),
            (
                None,
                Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
                None,
            ),
            (None, None, None),
        ] {
            assert_eq!(
                caller_trace_id(x_trace, traceparent).as_deref(),
                expected,
                "{x_trace:?} {traceparent:?}"
            );
        }
    }

    #[test]
    fn broadcasts_are_checked_and_keyed_per_chat() {
        let broadcast: Broadcast = parse_json(
            br#"{"event_id":"b1","text":"hi","chats":[{"platform":"web","chat":"a"},{"platform":"telegram","chat":"-1","kind":"group"}]}"#,
        )
        .unwrap();
        broadcast.check(2, 10).unwrap();
        assert_eq!(
            broadcast.check(1, 10).unwrap_err().to_string(),
            "2 chats, more than the limit of 1"
        );
        assert_eq!(
            broadcast.event_id_for(&broadcast.chats[1]).as_deref(),
            Some("b1:telegram:-1")
        );
        let message = broadcast.message_for(&broadcast.chats[1], "B", stamp());
        assert_eq!(message.origin, Origin::Broadcast { id: "B".into() });
        assert_eq!(message.chat.kind, ChatKind::Group);
        assert!(message.sender.is_bot);
    }
}
