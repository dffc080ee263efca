//! Feishu / Lark event callbacks (schema 2.0) at `/hooks/feishu`.
//!
//! Feishu POSTs JSON; with an Encrypt Key the body is `{"encrypt": "<base64>"}`:
//! AES-256-CBC with key SHA256(encrypt key), the first 16 bytes of the
//! decoded data as IV, PKCS#7 padding. Every encrypted request but the URL
//! check is signed: `X-Lark-Signature` is the hex SHA256 of
//! `X-Lark-Request-Timestamp`, `X-Lark-Request-Nonce`, the encrypt key and the
//! raw body, one after the other; it is checked before the body is read, and a timestamp further than `max_request_age_secs` from
//! our clock is refused. The verification token (`header.token`, or `token`
//! in the URL check) must match in every mode; the URL check
//! (`type: url_verification`) is answered `{"challenge": …}`.
//!
//! `im.message.receive_v1` becomes a message: text (and `post` rich text)
//! with the `@_user_N` placeholders turned into `@<open_id>` from
//! `mentions[]`, images, files, audio, video and stickers as attachments by
//! their Feishu key; `parent_id` is what it replies to, `thread_id` its
//! thread, `p2p` chats are direct. The bot is mentioned when a mention's
//! open_id is `bot_open_id` (and in every direct chat). Other events, other
//! message types and messages sent by apps are acknowledged and ignored.
//! The dedup key is `header.event_id`, so Feishu's retries add nothing.

use super::{Answer, Event, Hook, HookRequest, InboundPlatform, Registration};
use crate::error::IngestError;
use crate::generic::raw_event;
use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockDecryptMut, KeyIvInit};
use base64::Engine;
use botline_shared::config::{deserialize_setting, secret_env, Env};
use botline_shared::message::{
    Attachment, AttachmentKind, Chat, ChatKind, Mentions, Sender, UnifiedMessage,
};
use botline_shared::Error;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use subtle::ConstantTimeEq;

pub const NAME: &str = "feishu";
/// The Verification Token of the app's event subscription.
pub const VERIFICATION_TOKEN_ENV: &str = "BOTLINE_FEISHU_VERIFICATION_TOKEN";
/// The Encrypt Key of the app's event subscription (when `encrypted`).
pub const ENCRYPT_KEY_ENV: &str = "BOTLINE_FEISHU_ENCRYPT_KEY";

pub const PLATFORM: Registration = Registration { name: NAME, build };

/// `[ingest.platforms.feishu]`, documented in shared/defaults.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[allow(dead_code, reason = "read by enabled_platforms")]
    enabled: bool,
    encrypted: bool,
    bot_open_id: String,
    max_request_age_secs: u64,
}

fn build(table: &toml::Value, env: &dyn Env) -> Result<Arc<dyn InboundPlatform>, Error> {
    let settings: Settings = deserialize_setting("ingest.platforms.feishu", table.clone())?;
    let verification_token = secret_env(env, VERIFICATION_TOKEN_ENV, 1)?;
    let encrypt_key = if settings.encrypted {
        Some(secret_env(env, ENCRYPT_KEY_ENV, 1)?)
    } else {
        None
    };
    Ok(Arc::new(Feishu {
        verification_token,
        encrypt_key,
        bot_open_id: settings.bot_open_id,
        max_request_age_ms: settings.max_request_age_secs.saturating_mul(1000) as i64,
    }))
}

pub struct Feishu {
    verification_token: String,
    /// `None`: events arrive in plain JSON, unsigned.
    encrypt_key: Option<String>,
    bot_open_id: String,
    max_request_age_ms: i64,
}

impl InboundPlatform for Feishu {
    fn name(&self) -> &'static str {
        NAME
    }

    fn receive(&self, request: &HookRequest) -> Result<Hook, IngestError> {
        let signed = match &self.encrypt_key {
            Some(key) => self.check_signature(request, key)?,
            None => false,
        };
        let mut callback = self.open(&request.body)?;
        // Taken out, so the copy of the event kept for debugging lacks it.
        let token = match callback.pointer_mut("/header/token") {
            Some(token) => Some(token.take()),
            None => callback.get_mut("token").map(serde_json::Value::take),
        };
        let token_matches = token
            .as_ref()
            .and_then(serde_json::Value::as_str)
            .is_some_and(|token| {
                bool::from(token.as_bytes().ct_eq(self.verification_token.as_bytes()))
            });
        if !token_matches {
            return Err(unverified(
                "bad_token",
                "the verification token does not match",
            ));
        }
        let envelope: Envelope = from_value(&callback)?;
        if envelope.kind.as_deref() == Some("url_verification") {
            return Ok(Hook::Answer(Answer::json(
                serde_json::json!({ "challenge": envelope.challenge.unwrap_or_default() }),
            )));
        }
        if self.encrypt_key.is_some() && !signed {
            return Err(unverified(
                "missing_signature",
                "X-Lark-Signature, X-Lark-Request-Timestamp or X-Lark-Request-Nonce is missing",
            ));
        }
        let Some(header) = envelope
            .header
            .filter(|_| envelope.schema.as_deref() == Some("2.0"))
        else {
            return Ok(ignored("schema_1"));
        };
        if header.event_type != "im.message.receive_v1" {
            return Ok(ignored("other_event"));
        }
        let received: MessageReceived = from_value(&callback["event"])?;
        let mut stamp = request.stamp();
        stamp.raw = Some(raw_event(callback.to_string().as_bytes()));
        match self.message(received, header.app_id, stamp)? {
            Ok(message) => Ok(Hook::Events {
                events: vec![Event {
                    event_id: header.event_id,
                    message,
                }],
                answer: success(),
            }),
            Err(kind) => Ok(ignored(kind)),
        }
    }
}

impl Feishu {
    /// Whether the request is signed (and, if so, rightly and recently).
    fn check_signature(&self, request: &HookRequest, key: &str) -> Result<bool, IngestError> {
        let (Some(timestamp), Some(nonce), Some(signature)) = (
            request.header("x-lark-request-timestamp"),
            request.header("x-lark-request-nonce"),
            request.header("x-lark-signature"),
        ) else {
            return Ok(false);
        };
        let expected = signature_bytes(timestamp, nonce, key, &request.body);
        let given = hex::decode(signature.trim()).unwrap_or_default();
        if !bool::from(given.ct_eq(&expected)) {
            return Err(unverified(
                "bad_signature",
                "X-Lark-Signature does not match",
            ));
        }
        let age_ms = timestamp
            .trim()
            .parse::<i64>()
            .map(|seconds| {
                request
                    .received_at_ms
                    .saturating_sub(seconds.saturating_mul(1000))
                    .saturating_abs()
            })
            .unwrap_or(i64::MAX);
        if age_ms > self.max_request_age_ms {
            return Err(unverified(
                "stale_timestamp",
                format!("X-Lark-Request-Timestamp {timestamp:?} is outside the accepted window"),
            ));
        }
        Ok(true)
    }

    /// The callback as JSON, decrypted when it came encrypted.
    fn open(&self, body: &[u8]) -> Result<serde_json::Value, IngestError> {
        let outer: serde_json::Value = from_slice(body)?;
        let Some(encrypted) = outer.get("encrypt") else {
            return Ok(outer);
        };
        let Some(key) = &self.encrypt_key else {
            return Err(unverified(
                "bad_encryption",
                format!(
                    "an encrypted callback, but `encrypted` is false and {ENCRYPT_KEY_ENV} unused"
                ),
            ));
        };
        let plaintext = encrypted
            .as_str()
            .ok_or_else(|| "`encrypt` is not a string".to_string())
            .and_then(|encrypted| decrypt(key, encrypted))
            .map_err(|detail| unverified("bad_encryption", detail))?;
        from_slice(&plaintext)
    }

    /// The message `received` makes, or why it is ignored.
    fn message(
        &self,
        received: MessageReceived,
        app_id: Option<String>,
        stamp: crate::generic::Stamp,
    ) -> Result<Result<UnifiedMessage, &'static str>, IngestError> {
        let MessageReceived { sender, message } = received;
        let sender_id = sender.sender_id.id().ok_or_else(|| {
            IngestError::Malformed("event.sender.sender_id: no open_id, user_id or union_id".into())
        })?;
        if sender.sender_type != "user" || sender_id == self.bot_open_id {
            return Ok(Err("bot_message"));
        }
        let Some(content) = Content::read(&message.message_type, &message.content)? else {
            return Ok(Err("unsupported_message"));
        };
        let mentions = message.mentions.unwrap_or_default();
        let text = with_mentions(&content.text, &mentions);
        let users: Vec<String> = mentions.iter().filter_map(|m| m.id.id()).collect();
        let kind = if message.chat_type == "p2p" {
            ChatKind::Direct
        } else {
            ChatKind::Group
        };
        let addressed = kind == ChatKind::Direct
            || (!self.bot_open_id.is_empty() && users.contains(&self.bot_open_id));
        if text.trim().is_empty() && content.attachments.is_empty() {
            return Ok(Err("empty_message"));
        }
        let bot = app_id.unwrap_or_else(|| NAME.into());
        let chat = Chat {
            id: message.chat_id,
            kind,
        };
        let sender = Sender {
            name: sender_id.clone(),
            id: sender_id,
            is_bot: false,
        };
        Ok(Ok(UnifiedMessage {
            thread: non_empty(message.thread_id),
            mentions: Mentions {
                users,
                bot: addressed,
            },
            attachments: content.attachments,
            reply_to: non_empty(message.parent_id),
            platform_message_id: Some(message.message_id),
            platform_ts_ms: message.create_time.and_then(|ms| ms.parse().ok()),
            ..stamp.user_message(NAME, bot, chat, sender, text)
        }))
    }
}

/// SHA256(timestamp + nonce + encrypt key + body): what `X-Lark-Signature` is the hex of.
pub fn signature_bytes(timestamp: &str, nonce: &str, encrypt_key: &str, body: &[u8]) -> Vec<u8> {
    let mut hasher = Sha256::new();
    hasher.update(timestamp.as_bytes());
    hasher.update(nonce.as_bytes());
    hasher.update(encrypt_key.as_bytes());
    hasher.update(body);
    hasher.finalize().to_vec()
}

/// An `encrypt` value opened with `encrypt_key`.
pub fn decrypt(encrypt_key: &str, encrypted: &str) -> Result<Vec<u8>, String> {
    let data = base64::engine::general_purpose::STANDARD
        .decode(encrypted.trim())
        .map_err(|error| format!("`encrypt` is not base64: {error}"))?;
    if data.len() < 32 || data.len() % 16 != 0 {
        return Err(format!(
            "`encrypt` holds {} bytes, not an IV and whole AES blocks",
            data.len()
        ));
    }
    let (iv, ciphertext) = data.split_at(16);
    let key = Sha256::digest(encrypt_key.as_bytes());
    let plaintext = cbc::Decryptor::<aes::Aes256>::new(&key, iv.into())
        .decrypt_padded_vec_mut::<Pkcs7>(ciphertext)
        .map_err(|_| "`encrypt` does not decrypt with the encrypt key (bad padding)".to_string())?;
    // A wrong key still yields valid padding about once in 256 tries; what
    // it yields then is noise, almost never UTF-8. JSON is always UTF-8.
    if std::str::from_utf8(&plaintext).is_err() {
        return Err("`encrypt` does not decrypt with the encrypt key (not UTF-8)".into());
    }
    Ok(plaintext)
}

/// `text` with each mention's placeholder (`@_user_1`) as `@<open_id>`;
/// `@_all` becomes `@all`, a mention without an id `@<name>`.
fn with_mentions(text: &str, mentions: &[Mention]) -> String {
    let mut keys: Vec<&Mention> = mentions.iter().collect();
    // Longest first, so `@_user_1` does not eat the start of `@_user_10`.
    keys.sort_by_key(|mention| std::cmp::Reverse(mention.key.len()));
    let mut text = text.replace("@_all", "@all");
    for mention in keys {
        let unified = match mention.id.id() {
            Some(id) => format!("@{id}"),
            None => format!("@{}", mention.name),
        };
        text = text.replace(&mention.key, &unified);
    }
    text
}

fn unverified(reason: &'static str, detail: impl Into<String>) -> IngestError {
    IngestError::Unverified {
        platform: NAME,
        reason,
        detail: detail.into(),
    }
}

fn ignored(kind: &str) -> Hook {
    Hook::Ignored {
        kind: kind.into(),
        answer: success(),
    }
}

/// What the official SDKs answer an event they took.
fn success() -> Answer {
    Answer::json(serde_json::json!({ "msg": "success" }))
}

fn non_empty(value: Option<String>) -> Option<String> {
    value.filter(|value| !value.is_empty())
}

fn from_slice(body: &[u8]) -> Result<serde_json::Value, IngestError> {
    serde_json::from_slice(body).map_err(|error| IngestError::Malformed(error.to_string()))
}

/// `value` as a `T`, a shape error naming the offending field.
fn from_value<T: DeserializeOwned>(value: &serde_json::Value) -> Result<T, IngestError> {
    serde_path_to_error::deserialize(value)
        .map_err(|error| IngestError::Malformed(format!("{}: {}", error.path(), error.inner())))
}

/// What every callback has: the URL check's fields or the 2.0 header.
#[derive(Debug, Deserialize)]
struct Envelope {
    #[serde(default)]
    schema: Option<String>,
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    challenge: Option<String>,
    #[serde(default)]
    header: Option<EventHeader>,
}

#[derive(Debug, Deserialize)]
struct EventHeader {
    event_id: String,
    event_type: String,
    #[serde(default)]
    app_id: Option<String>,
}

/// `event` of `im.message.receive_v1`.
#[derive(Debug, Deserialize)]
struct MessageReceived {
    sender: EventSender,
    message: EventMessage,
}

#[derive(Debug, Deserialize)]
struct EventSender {
    sender_id: UserIds,
    sender_type: String,
}

#[derive(Debug, Default, Deserialize)]
struct UserIds {
    #[serde(default)]
    open_id: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    union_id: Option<String>,
}

impl UserIds {
    /// The open_id, the id botline uses for Feishu users (the others only
    /// when it is missing).
    fn id(&self) -> Option<String> {
        [&self.open_id, &self.user_id, &self.union_id]
            .into_iter()
            .flatten()
            .find(|id| !id.is_empty())
            .cloned()
    }
}

#[derive(Debug, Deserialize)]
struct EventMessage {
    message_id: String,
    #[serde(default)]
    parent_id: Option<String>,
    #[serde(default)]
    thread_id: Option<String>,
    #[serde(default)]
    create_time: Option<String>,
    chat_id: String,
    chat_type: String,
    message_type: String,
    content: String,
    #[serde(default)]
    mentions: Option<Vec<Mention>>,
}

#[derive(Debug, Deserialize)]
struct Mention {
    key: String,
    #[serde(default)]
    id: UserIds,
    #[serde(default)]
    name: String,
}

/// A message's `content` (a JSON string), read per `message_type`.
#[derive(Debug, Default, PartialEq)]
struct Content {
    /// With the mention placeholders still in.
    text: String,
    attachments: Vec<Attachment>,
}

#[derive(Debug, Deserialize)]
struct KeyedContent {
    #[serde(default)]
    text: String,
    #[serde(default)]
    image_key: Option<String>,
    #[serde(default)]
    file_key: Option<String>,
    #[serde(default)]
    file_name: Option<String>,
    #[serde(default)]
    title: String,
    #[serde(default)]
    content: Vec<Vec<PostElement>>,
}

/// One element of a `post` paragraph.
#[derive(Debug, Deserialize)]
struct PostElement {
    tag: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    user_id: Option<String>,
    #[serde(default)]
    image_key: Option<String>,
    #[serde(default)]
    file_key: Option<String>,
}

impl Content {
    /// `None` for message types botline does not read (cards, shared
    /// chats, merged forwards, …).
    fn read(message_type: &str, content: &str) -> Result<Option<Content>, IngestError> {
        let keyed: KeyedContent = serde_json::from_str(content)
            .map_err(|error| IngestError::Malformed(format!("event.message.content: {error}")))?;
        let file = |kind: AttachmentKind, key: Option<String>, name: Option<String>| {
            key.map(|key| file_attachment(kind, key, name))
                .into_iter()
                .collect()
        };
        let content = match message_type {
            "text" => Content {
                text: keyed.text,
                attachments: Vec::new(),
            },
            "post" => post(keyed.title, keyed.content),
            "image" => Content {
                text: String::new(),
                attachments: file(AttachmentKind::Image, keyed.image_key, None),
            },
            "file" => Content {
                text: String::new(),
                attachments: file(AttachmentKind::File, keyed.file_key, keyed.file_name),
            },
            "audio" => Content {
                text: String::new(),
                attachments: file(AttachmentKind::Audio, keyed.file_key, None),
            },
            "media" => Content {
                text: String::new(),
                attachments: file(AttachmentKind::Video, keyed.file_key, keyed.file_name),
            },
            "sticker" => Content {
                text: String::new(),
                attachments: file(AttachmentKind::Sticker, keyed.file_key, None),
            },
            _ => return Ok(None),
        };
        Ok(Some(content))
    }
}

/// Rich text as plain text: the title, then each paragraph on its own
/// line; `at` elements keep their placeholder, images and videos become
/// attachments.
fn post(title: String, paragraphs: Vec<Vec<PostElement>>) -> Content {
    let mut lines = Vec::new();
    if !title.is_empty() {
        lines.push(title);
    }
    let mut attachments = Vec::new();
    for paragraph in paragraphs {
        let mut line = String::new();
        for element in paragraph {
            match element.tag.as_str() {
                "at" => line.push_str(&element.user_id.unwrap_or_default()),
                "img" => attachments.extend(
                    element
                        .image_key
                        .map(|key| file_attachment(AttachmentKind::Image, key, None)),
                ),
                "media" => attachments.extend(
                    element
                        .file_key
                        .map(|key| file_attachment(AttachmentKind::Video, key, None)),
                ),
                _ => line.push_str(&element.text.unwrap_or_default()),
            }
        }
        lines.push(line);
    }
    Content {
        text: lines.join("\n").trim().to_string(),
        attachments,
    }
}

fn file_attachment(kind: AttachmentKind, key: String, name: Option<String>) -> Attachment {
    Attachment {
        kind,
        url: None,
        file_id: Some(key),
        mime: None,
        size: None,
        name,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The decryption sample of Feishu's event subscription guide (also
    /// in the official SDKs' tests).
    #[test]
    fn the_published_sample_decrypts() {
        let plain = decrypt("test key", "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=").unwrap();
        assert_eq!(plain, b"hello world");
        assert!(decrypt("other key", "P37w+VZImNgPEO1RBhJ6RtKl7n6zymIbEG1pReEzghk=").is_err());
        assert!(decrypt("test key", "AAAA").is_err());
        assert!(decrypt("test key", "not base64!").is_err());
    }

    // Expected: `printf '%s' '1700000000nonce-1key{}' | sha256sum`.
    #[test]
    fn the_signature_is_sha256_of_timestamp_nonce_key_and_body() {
        assert_eq!(
            hex::encode(signature_bytes("1700000000", "nonce-1", "key", b"{}")),
            "cebd2aaf8b96012d75414392212ff6e6eb27fb8a2ee4bd698f39f201d48026d4"
        );
    }

    fn mention(key: &str, open_id: &str, name: &str) -> Mention {
        Mention {
            key: key.into(),
            id: UserIds {
                open_id: (!open_id.is_empty()).then(|| open_id.into()),
                ..UserIds::default()
            },
            name: name.into(),
        }
    }

    fn check_mentions(text: &str, mentions: &[Mention], expected: &str) {
        assert_eq!(with_mentions(text, mentions), expected, "{text:?}");
    }

    #[test]
    fn placeholders_become_unified_mentions() {
        let tom = mention("@_user_1", "ou_tom", "Tom");
        let ten = mention("@_user_10", "ou_ten", "Ten");
        check_mentions(
            "@_user_1 hello",
            &[mention("@_user_1", "ou_tom", "Tom")],
            "@ou_tom hello",
        );
        check_mentions(
            "hi @_user_1 and @_user_10",
            &[tom, ten],
            "hi @ou_tom and @ou_ten",
        );
        check_mentions("@_all meeting", &[], "@all meeting");
        check_mentions("@_user_2 x", &[mention("@_user_2", "", "Ann")], "@Ann x");
        check_mentions("no mentions", &[], "no mentions");
        check_mentions("@_user_9 unknown", &[], "@_user_9 unknown");
    }

    fn check_content(
        message_type: &str,
        content: &str,
        expected: Option<(&str, Vec<(AttachmentKind, &str)>)>,
    ) {
        let got = Content::read(message_type, content)
            .unwrap()
            .map(|content| {
                let files = content
                    .attachments
                    .iter()
                    .map(|a| (a.kind, a.file_id.clone().unwrap()))
                    .collect::<Vec<_>>();
                (content.text, files)
            });
        let expected = expected.map(|(text, files)| {
            (
                text.to_string(),
                files
                    .into_iter()
                    .map(|(kind, key)| (kind, key.to_string()))
                    .collect::<Vec<_>>(),
            )
        });
        assert_eq!(got, expected, "{message_type} {content}");
    }

    #[test]
    fn contents_are_read_per_message_type() {
        check_content(
            "text",
            r#"{"text":"@_user_1 hello"}"#,
            Some(("@_user_1 hello", vec![])),
        );
        check_content(
            "image",
            r#"{"image_key":"img_v2_1"}"#,
            Some(("", vec![(AttachmentKind::Image, "img_v2_1")])),
        );
        check_content(
            "file",
            r#"{"file_key":"file_v2_1","file_name":"a.pdf"}"#,
            Some(("", vec![(AttachmentKind::File, "file_v2_1")])),
        );
        check_content(
            "audio",
            r#"{"file_key":"file_v2_2","duration":2000}"#,
            Some(("", vec![(AttachmentKind::Audio, "file_v2_2")])),
        );
        check_content(
            "media",
            r#"{"file_key":"file_v2_3","image_key":"img_v2_3","file_name":"v.mp4","duration":2000}"#,
            Some(("", vec![(AttachmentKind::Video, "file_v2_3")])),
        );
        check_content(
            "post",
            r#"{"title":"Report","content":[[{"tag":"at","user_id":"@_user_1","user_name":"Tom"},{"tag":"text","text":" see "},{"tag":"a","href":"https://x","text":"link"}],[{"tag":"img","image_key":"img_v2_4"}]]}"#,
            Some((
                "Report\n@_user_1 see link",
                vec![(AttachmentKind::Image, "img_v2_4")],
            )),
        );
        check_content("interactive", r#"{"title":"card"}"#, None);
        check_content("share_chat", r#"{"chat_id":"oc_1"}"#, None);
        assert!(Content::read("text", "{not json").is_err());
    }
}
