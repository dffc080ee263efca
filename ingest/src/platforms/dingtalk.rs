//! DingTalk robot HTTP callbacks (an enterprise app's robot, "HTTP mode")
//! at `/hooks/dingtalk`.
//!
//! Every callback carries the headers `timestamp` (ms) and `sign`, the
//! Base64 of HMAC-SHA256 keyed with the app secret over `timestamp`, a line
//! feed and the app secret; a timestamp more than an hour from our clock is
//! refused, as DingTalk's documentation says. (The signature does not cover
//! the body: within that hour a captured pair of headers could carry another
//! body. Dedup on `msgId` stops the same message twice; egress only posts to
//! session webhooks under its configured base.) There is no URL handshake.
//!
//! The body becomes a message: `msgId` is the dedup key (DingTalk retries a
//! callback left unanswered), `conversationType` "1" is a direct chat and
//! "2" a group, `senderStaffId` the sender (their user id in the org, what
//! `atUserIds` takes), `isInAtList` whether the bot was mentioned (always
//! in a direct chat), `atUsers[].staffId` the other mentioned users. Text,
//! rich text, pictures, files, audio (with its recognized text) and video
//! are read; pictures and files by their `downloadCode`. The message's
//! `sessionWebhook` and its expiry go into `platform_data` for egress (with
//! the sender's staff id in a direct chat, for the robot API when the
//! session webhook has expired).
//!
//! With `mode = "stream"` the same callbacks come over DingTalk's Stream
//! mode instead ([`stream`]): a WebSocket one ingest replica keeps open, no
//! public URL needed.

mod stream;

use super::connection::{endpoint, platform_settings, Idle, Supervision};
use super::{Answer, Event, Hook, HookRequest, InboundPlatform, Registration};
use crate::error::IngestError;
use crate::generic::{parse_json, Stamp};
use crate::inbox::Inbox;
use base64::Engine;
use botline_shared::config::{secret_env, Env};
use botline_shared::message::{
    Attachment, AttachmentKind, Chat, ChatKind, Mentions, Sender, UnifiedMessage,
};
use botline_shared::telemetry::Health;
use botline_shared::Error;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub const NAME: &str = "dingtalk";
/// The app's AppSecret: the callback signing key (and egress's credential).
pub const APP_SECRET_ENV: &str = "BOTLINE_DINGTALK_APP_SECRET";
/// DingTalk refuses to call it valid further than this from now.
const SIGNATURE_WINDOW_MS: i64 = 3_600_000;

/// The `platform_data` keys egress reads.
pub const SESSION_WEBHOOK: &str = "session_webhook";
pub const SESSION_WEBHOOK_EXPIRES_MS: &str = "session_webhook_expires_ms";
pub const USER_ID: &str = "user_id";

pub const PLATFORM: Registration = Registration { name: NAME, build };

/// `[ingest.platforms.dingtalk]`, documented in shared/defaults.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[allow(dead_code, reason = "read by enabled_platforms")]
    enabled: bool,
    mode: Mode,
    client_id: String,
    api_base_url: String,
    idle_timeout_ms: u64,
    ping_interval_ms: u64,
}

/// How callbacks reach ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// DingTalk posts to `/hooks/dingtalk`.
    Http,
    /// Ingest opens a Stream mode WebSocket to DingTalk.
    Stream,
}

fn build(table: &toml::Value, env: &dyn Env) -> Result<Arc<dyn InboundPlatform>, Error> {
    let (settings, supervision): (Settings, _) =
        platform_settings("ingest.platforms.dingtalk", table)?;
    let app_secret = secret_env(env, APP_SECRET_ENV, 1)?;
    let stream = match settings.mode {
        Mode::Http => None,
        Mode::Stream => Some(stream_settings(&settings, supervision, &app_secret)?),
    };
    info!(message = "dingtalk callbacks", mode = ?settings.mode);
    Ok(Arc::new(DingTalk { app_secret, stream }))
}

fn stream_settings(
    settings: &Settings,
    supervision: Supervision,
    app_secret: &str,
) -> Result<stream::StreamSettings, Error> {
    let setting = |name: &str| format!("ingest.platforms.dingtalk.{name}");
    if settings.client_id.is_empty() {
        return Err(Error::config(
            setting("client_id"),
            "must be the app's ClientID (AppKey) in stream mode",
        ));
    }
    let open_url = endpoint(
        "ingest.platforms.dingtalk",
        &settings.api_base_url,
        "/v1.0/gateway/connections/open",
    )?;
    let client = supervision.http_client("ingest.platforms.dingtalk")?;
    let idle = Idle::checked(
        "ingest.platforms.dingtalk",
        settings.idle_timeout_ms,
        settings.ping_interval_ms,
    )?;
    Ok(stream::StreamSettings {
        client_id: settings.client_id.clone(),
        client_secret: app_secret.to_string(),
        open_url,
        client,
        supervision,
        idle,
    })
}

pub struct DingTalk {
    app_secret: String,
    /// Stream mode's settings; `None` in HTTP mode.
    stream: Option<stream::StreamSettings>,
}

impl InboundPlatform for DingTalk {
    fn name(&self) -> &'static str {
        NAME
    }

    fn receive(&self, request: &HookRequest) -> Result<Hook, IngestError> {
        self.verify(request)?;
        let callback: Callback = parse_json(&request.body)?;
        let event_id = callback.msg_id.clone();
        match callback.into_message(request.stamp()) {
            Some(message) => Ok(Hook::Events {
                events: vec![Event { event_id, message }],
                answer: Answer::ok(),
            }),
            None => Ok(Hook::Ignored {
                kind: "unsupported_message".into(),
                answer: Answer::ok(),
            }),
        }
    }

    fn start(self: Arc<Self>, inbox: Inbox, health: Health, shutdown: CancellationToken) {
        if self.stream.is_some() {
            stream::start(self, inbox, health, shutdown);
        }
    }
}

impl DingTalk {
    fn verify(&self, request: &HookRequest) -> Result<(), IngestError> {
        let refuse = |reason: &'static str, detail: &str| IngestError::Unverified {
            platform: NAME,
            reason,
            detail: detail.into(),
        };
        let (Some(timestamp), Some(sign)) = (request.header("timestamp"), request.header("sign"))
        else {
            return Err(refuse(
                "missing_signature",
                "the timestamp or sign header is missing",
            ));
        };
        let given = base64::engine::general_purpose::STANDARD
            .decode(sign.trim())
            .unwrap_or_default();
        if sign_mac(&self.app_secret, timestamp)
            .verify_slice(&given)
            .is_err()
        {
            return Err(refuse("bad_signature", "the sign header does not match"));
        }
        let in_window = timestamp.trim().parse::<i64>().is_ok_and(|ms| {
            request.received_at_ms.saturating_sub(ms).saturating_abs() <= SIGNATURE_WINDOW_MS
        });
        if !in_window {
            return Err(refuse(
                "stale_timestamp",
                "the timestamp header is more than an hour from now",
            ));
        }
        Ok(())
    }
}

/// HMAC-SHA256(app secret, timestamp + "\n" + app secret), not yet finalized.
fn sign_mac(app_secret: &str, timestamp: &str) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(app_secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b"\n");
    mac.update(app_secret.as_bytes());
    mac
}

/// The `sign` header DingTalk sends with `timestamp`.
pub fn sign(app_secret: &str, timestamp: &str) -> String {
    base64::engine::general_purpose::STANDARD
        .encode(sign_mac(app_secret, timestamp).finalize().into_bytes())
}

/// A robot callback's body (the fields botline reads).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Callback {
    msg_id: String,
    msgtype: String,
    conversation_id: String,
    conversation_type: String,
    #[serde(default)]
    sender_id: Option<String>,
    #[serde(default)]
    sender_staff_id: Option<String>,
    #[serde(default)]
    sender_nick: Option<String>,
    #[serde(default)]
    chatbot_user_id: Option<String>,
    #[serde(default)]
    robot_code: Option<String>,
    #[serde(default)]
    is_in_at_list: bool,
    #[serde(default)]
    at_users: Vec<AtUser>,
    #[serde(default)]
    create_at: Option<i64>,
    #[serde(default)]
    session_webhook: Option<String>,
    #[serde(default)]
    session_webhook_expired_time: Option<i64>,
    #[serde(default)]
    text: Option<Text>,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct AtUser {
    #[serde(default)]
    dingtalk_id: Option<String>,
    #[serde(default)]
    staff_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Text {
    #[serde(default)]
    content: String,
}

/// `content` of the non-text message types.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Content {
    #[serde(default)]
    download_code: Option<String>,
    #[serde(default)]
    file_name: Option<String>,
    /// Audio: what DingTalk heard.
    #[serde(default)]
    recognition: Option<String>,
    #[serde(default)]
    rich_text: Vec<RichTextPart>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RichTextPart {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    download_code: Option<String>,
}

impl Callback {
    /// The message, or `None` for a type botline does not read.
    fn into_message(self, stamp: Stamp) -> Option<UnifiedMessage> {
        let content = self.content.unwrap_or_default();
        let download = |kind, code: Option<String>, name: Option<String>| {
            code.map(|code| Attachment {
                kind,
                url: None,
                file_id: Some(code),
                mime: None,
                size: None,
                name,
            })
        };
        let (text, attachments): (String, Vec<Attachment>) = match self.msgtype.as_str() {
            "text" => (
                self.text.map(|text| text.content).unwrap_or_default(),
                Vec::new(),
            ),
            "richText" => {
                let mut text = String::new();
                let mut pictures = Vec::new();
                for part in content.rich_text {
                    text.push_str(&part.text.unwrap_or_default());
                    pictures.extend(download(AttachmentKind::Image, part.download_code, None));
                }
                (text, pictures)
            }
            "picture" => (
                String::new(),
                download(AttachmentKind::Image, content.download_code, None)
                    .into_iter()
                    .collect(),
            ),
            "file" => (
                String::new(),
                download(
                    AttachmentKind::File,
                    content.download_code,
                    content.file_name,
                )
                .into_iter()
                .collect(),
            ),
            "audio" => (
                content.recognition.unwrap_or_default(),
                download(AttachmentKind::Audio, content.download_code, None)
                    .into_iter()
                    .collect(),
            ),
            "video" => (
                String::new(),
                download(AttachmentKind::Video, content.download_code, None)
                    .into_iter()
                    .collect(),
            ),
            _ => return None,
        };
        let kind = if self.conversation_type == "1" {
            ChatKind::Direct
        } else {
            ChatKind::Group
        };
        let sender_id = self
            .sender_staff_id
            .clone()
            .filter(|id| !id.is_empty())
            .or(self.sender_id)
            .unwrap_or_default();
        let chatbot = self.chatbot_user_id.unwrap_or_default();
        let users = self
            .at_users
            .into_iter()
            .filter(|user| user.dingtalk_id.as_deref() != Some(chatbot.as_str()))
            .filter_map(|user| user.staff_id)
            .collect();
        let mut platform_data = BTreeMap::new();
        if let Some(webhook) = self.session_webhook.filter(|url| !url.is_empty()) {
            platform_data.insert(SESSION_WEBHOOK.to_string(), webhook);
            if let Some(expires) = self.session_webhook_expired_time {
                platform_data.insert(SESSION_WEBHOOK_EXPIRES_MS.to_string(), expires.to_string());
            }
        }
        if let (ChatKind::Direct, Some(staff_id)) = (kind, self.sender_staff_id) {
            platform_data.insert(USER_ID.to_string(), staff_id);
        }
        let bot = self.robot_code.unwrap_or_else(|| NAME.into());
        let chat = Chat {
            id: self.conversation_id,
            kind,
        };
        let sender = Sender {
            name: self.sender_nick.unwrap_or_else(|| sender_id.clone()),
            id: sender_id,
            is_bot: false,
        };
        Some(UnifiedMessage {
            mentions: Mentions {
                users,
                bot: self.is_in_at_list || kind == ChatKind::Direct,
            },
            attachments,
            platform_message_id: Some(self.msg_id),
            platform_data,
            platform_ts_ms: self.create_at,
            ..stamp.user_message(NAME, bot, chat, sender, text.trim().to_string())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Expected: `printf '%s\n%s' 1700000000000 secret | openssl dgst -sha256 -hmac secret -binary | base64`.
    #[test]
    fn the_sign_is_base64_hmac_of_timestamp_and_secret() {
        assert_eq!(
            sign("secret", "1700000000000"),
            "OuzzJR5+xZ4/EYwqtNt6sMYZQMTa/HEGvc9miJe7XzY="
        );
        assert_eq!(
            sign("SECxyz-app-secret", "1613630252678"),
            "hHG2sleBOdQQg0UD+5SEt+irOFTQTCGikn9CIBVz268="
        );
    }
}
