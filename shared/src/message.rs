//! The records that travel between stages. Only these types derive
//! `Serialize`: they are the boundary, everything else is internal.
//!
//! Each record is written as a MessagePack map (field names included), so a
//! field added later with `#[serde(default)]` does not break readers of
//! older entries; a change that does break them bumps
//! [`crate::codec::SCHEMA_VERSION`].

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A message from a person (or a scheduler) on some platform, in one shape
/// whatever the platform.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnifiedMessage {
    /// ULID given by ingest; sorts by arrival.
    pub id: String,
    /// Platform name as used in stream names (`web`, `webhook`, `telegram`, …).
    pub platform: String,
    /// The bot account on that platform that received the message.
    pub bot: String,
    pub chat: Chat,
    /// Thread or topic inside the chat, when the platform has them.
    #[serde(default)]
    pub thread: Option<String>,
    pub sender: Sender,
    /// UTF-8 text with platform mention syntax already turned into `@<user id>`.
    pub text: String,
    #[serde(default)]
    pub mentions: Mentions,
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// Platform id of the message this one answers, if any.
    #[serde(default)]
    pub reply_to: Option<String>,
    /// The platform's own id of this message, so a reply can quote it.
    #[serde(default)]
    pub platform_message_id: Option<String>,
    /// What the platform's sender needs to answer and the unified fields do
    /// not carry (DingTalk's `sessionWebhook`, say); respond copies it into
    /// the reply unread.
    #[serde(default)]
    pub platform_data: BTreeMap<String, String>,
    /// When the platform says the message was sent (UTC ms), if it says.
    #[serde(default)]
    pub platform_ts_ms: Option<i64>,
    /// When ingest accepted it (UTC ms); end-to-end latency counts from here.
    pub received_at_ms: i64,
    /// Carried through every stage and every log line about this message.
    pub trace_id: String,
    #[serde(default)]
    pub origin: Origin,
    /// Set on copies made by a replay; egress sends these only when asked.
    #[serde(default)]
    pub replay: bool,
    /// The platform's own event, truncated to [`RAW_EVENT_LIMIT`] bytes, for debugging.
    #[serde(default)]
    pub raw: Option<String>,
}

/// How much of a platform's raw event a message keeps.
pub const RAW_EVENT_LIMIT: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Chat {
    pub id: String,
    pub kind: ChatKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatKind {
    Direct,
    Group,
    Channel,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sender {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub is_bot: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mentions {
    /// Normalized user ids mentioned in the text.
    #[serde(default)]
    pub users: Vec<String>,
    /// Whether the bot itself is among them (or the message is addressed to it).
    #[serde(default)]
    pub bot: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    pub kind: AttachmentKind,
    #[serde(default)]
    pub url: Option<String>,
    /// The platform's own handle for the file when there is no URL.
    #[serde(default)]
    pub file_id: Option<String>,
    #[serde(default)]
    pub mime: Option<String>,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub name: Option<String>,
}

impl Attachment {
    /// A picture at `url`, `name` its alt text.
    pub fn image(url: impl Into<String>, name: Option<String>) -> Self {
        Attachment {
            kind: AttachmentKind::Image,
            url: Some(url.into()),
            file_id: None,
            mime: None,
            size: None,
            name: name.filter(|name| !name.is_empty()),
        }
    }

    /// The URL, when it is an http or https one (the only kind replies
    /// carry out to platforms and browsers).
    pub fn http_url(&self) -> Option<&str> {
        self.url.as_deref().filter(|url| is_http_url(url))
    }
}

/// Whether `url` starts `http://` or `https://` (any case) and has no
/// whitespace or control characters.
pub fn is_http_url(url: &str) -> bool {
    let rest = ["http://", "https://"].iter().find_map(|scheme| {
        let start = url.get(..scheme.len())?;
        start
            .eq_ignore_ascii_case(scheme)
            .then(|| &url[scheme.len()..])
    });
    rest.is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachmentKind {
    Image,
    Audio,
    Video,
    File,
    Sticker,
}

/// Who made a message: a person, the scheduler, or a broadcast call.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Origin {
    #[default]
    User,
    Scheduled {
        job: String,
    },
    Broadcast {
        id: String,
    },
}

impl Origin {
    /// Scheduled and broadcast messages are announcements: the bot says
    /// their text to the chat rather than answering it.
    pub fn is_announcement(&self) -> bool {
        !matches!(self, Origin::User)
    }

    pub fn label(&self) -> &'static str {
        match self {
            Origin::User => "user",
            Origin::Scheduled { .. } => "scheduled",
            Origin::Broadcast { .. } => "broadcast",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Urgent,
    Normal,
    Batch,
}

impl Priority {
    /// In the order respond serves them.
    pub const ALL: [Priority; 3] = [Priority::Urgent, Priority::Normal, Priority::Batch];

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Urgent => "urgent",
            Priority::Normal => "normal",
            Priority::Batch => "batch",
        }
    }
}

/// What classify concluded about a message's purpose.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intent {
    pub name: String,
    /// 0..=1; rules give 1 for a hit.
    pub confidence: f32,
}

/// A message with classify's verdicts attached; read by respond.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassifiedMessage {
    pub message: UnifiedMessage,
    pub priority: Priority,
    pub intent: Intent,
    /// Sensitive words found in the text (as configured, lower-cased).
    #[serde(default)]
    pub audit: Vec<String>,
    /// The configured FAQ entry closest to the text, when close enough.
    #[serde(default)]
    pub faq: Option<FaqMatch>,
}

/// An FAQ entry classify found close to a message, for respond to answer with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaqMatch {
    pub question: String,
    pub answer: String,
    /// Cosine similarity of the message and the question, 0..=1.
    pub score: f32,
}

/// A reply to deliver; read by egress from `out:<platform>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reply {
    /// ULID; also the idempotency key of the delivery.
    pub id: String,
    /// The message this answers (its ULID).
    pub in_reply_to: String,
    pub platform: String,
    pub bot: String,
    pub chat: Chat,
    #[serde(default)]
    pub thread: Option<String>,
    /// Platform id of the inbound message, for platforms that quote replies.
    #[serde(default)]
    pub reply_to: Option<String>,
    pub text: String,
    /// User ids to mention, rendered the platform's way by egress.
    #[serde(default)]
    pub mentions: Vec<String>,
    /// Pictures (and files) to send with the text, by http(s) URL; each
    /// egress sender renders images the platform's way and other kinds as
    /// links in the text.
    #[serde(default)]
    pub attachments: Vec<Attachment>,
    /// The message's `platform_data`, for the sender.
    #[serde(default)]
    pub platform_data: BTreeMap<String, String>,
    pub priority: Priority,
    /// When ingest accepted the message this answers.
    pub received_at_ms: i64,
    pub created_at_ms: i64,
    pub trace_id: String,
    #[serde(default)]
    pub replay: bool,
}

/// Written by egress to `delivered` once a reply is out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Receipt {
    pub reply_id: String,
    pub message_id: String,
    pub platform: String,
    pub chat: String,
    /// From ingest accepting the message to the platform accepting the reply.
    pub latency_ms: i64,
    pub attempts: u32,
    #[serde(default)]
    pub platform_message_id: Option<String>,
    pub delivered_at_ms: i64,
    pub trace_id: String,
}

/// One turn of a conversation, kept by respond in `ctx:<platform>:<chat>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Turn {
    pub role: Role,
    pub speaker_id: String,
    pub speaker_name: String,
    pub text: String,
    pub message_id: String,
    pub at_ms: i64,
    /// What was sent with the text (a reply's images, say).
    #[serde(default)]
    pub attachments: Vec<Attachment>,
}

impl Turn {
    /// The sender's turn of `message`.
    pub fn from_user(message: &UnifiedMessage) -> Turn {
        Turn {
            role: Role::User,
            speaker_id: message.sender.id.clone(),
            speaker_name: message.sender.name.clone(),
            text: message.text.clone(),
            message_id: message.id.clone(),
            at_ms: message.received_at_ms,
            attachments: message.attachments.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    User,
    Bot,
}

/// An entry no stage could handle: the original fields, who gave up on it
/// and why. Written to `dead`; `botline dead requeue` puts it back.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub stage: String,
    /// The stream the entry was read from (full key).
    pub stream: String,
    pub entry_id: String,
    pub error: String,
    pub deliveries: u64,
    /// The entry's fields exactly as read (any bytes, kept as MessagePack
    /// binary), so it can be put back unchanged.
    pub fields: Vec<(String, serde_bytes::ByteBuf)>,
    pub at_ms: i64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_http_and_https_urls_pass() {
        for (url, expected) in [
            ("https://example.com/a.png", true),
            ("http://127.0.0.1:8080/x", true),
            ("HTTPS://EXAMPLE.COM/A.PNG", true),
            ("http://a", true),
            ("https://", false),
            ("https:///path", false),
            ("ftp://example.com/a.png", false),
            ("javascript:alert(1)", false),
            ("data:image/png;base64,AAAA", false),
            ("//example.com/a.png", false),
            ("https://exa mple.com/a.png", false),
            ("https://example.com/\n", false),
            ("https://example.com/\u{7}", false),
            ("", false),
        ] {
            assert_eq!(is_http_url(url), expected, "{url:?}");
        }
        let image = Attachment::image("https://example.com/a.png", Some(String::new()));
        assert_eq!(image.name, None, "an empty alt text is no name");
        assert_eq!(image.http_url(), Some("https://example.com/a.png"));
        let file = Attachment {
            url: Some("file:///etc/passwd".into()),
            ..image
        };
        assert_eq!(file.http_url(), None);
    }
}
