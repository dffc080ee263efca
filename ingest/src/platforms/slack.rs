//! Slack: the Events API. Every request is signed: `X-Slack-Signature` is
//! `v0=` + hex HMAC-SHA256(signing secret, `v0:{X-Slack-Request-Timestamp}:{body}`),
//! and a timestamp more than five minutes from ours is refused (a replay).
//! The URL check (`type: url_verification`) is answered with its
//! `challenge`; events come as `type: event_callback`.
//!
//! `message` and `app_mention` events become messages; any other event,
//! a message with a subtype (edits, deletions, joins, bot posts — all but
//! `file_share` and `thread_broadcast`, which are people writing) and the
//! bot's own messages are acknowledged and ignored. Slack retries an event
//! it got no 2xx for within 3 s (`X-Slack-Retry-Num`); the dedup key is the
//! message's own identity, `<channel>:<ts>`, which a retry shares with its
//! original — and which also folds the `message` and `app_mention` events
//! Slack sends for one message when the app subscribes to both.
//!
//! Text: `<@U123>` (or `<@U123|name>`) becomes `@U123`, `<!here>` `@here`,
//! `<#C123|general>` `#general`, `<https://x|label>` `label (https://x)`,
//! and `&amp;`, `&lt;`, `&gt;` their characters. The bot is mentioned by
//! `<@bot_user_id>`, by an `app_mention` event, and in its direct messages.
//! A message in a thread keeps `thread_ts` as its thread; files become
//! attachments with their `url_private` and file id.
//!
//! With `mode = "socket"` the same events come over Socket Mode instead
//! ([`socket`]): a WebSocket one ingest replica keeps open, no public URL,
//! and `/hooks/slack` is off.

mod socket;

use super::connection::{endpoint, platform_settings, Idle, Supervision};
use super::{Answer, Event, Hook, HookRequest, InboundPlatform, Read, Registration};
use crate::error::IngestError;
use crate::generic::{parse_json, Stamp};
use crate::inbox::Inbox;
use botline_shared::config::{secret_env, Env};
use botline_shared::message::{
    Attachment, AttachmentKind, Chat, ChatKind, Mentions, Sender, UnifiedMessage,
};
use botline_shared::telemetry::Health;
use botline_shared::Error;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::info;

pub const PLATFORM: Registration = Registration {
    name: "slack",
    build,
};

/// The app's signing secret (Basic Information → App Credentials).
pub const SECRET_ENV: &str = "BOTLINE_SLACK_SIGNING_SECRET";
/// The app-level token (`xapp-…`, scope `connections:write`), Socket Mode only.
pub const APP_TOKEN_ENV: &str = "BOTLINE_SLACK_APP_TOKEN";
pub const SIGNATURE_HEADER: &str = "x-slack-signature";
pub const TIMESTAMP_HEADER: &str = "x-slack-request-timestamp";
/// How far a request's timestamp may be from ours.
pub const WINDOW_SECS: i64 = 5 * 60;
/// Inner event types counted by name when ignored; any other is `other`.
const EVENT_KINDS: &[&str] = &[
    "reaction_added",
    "reaction_removed",
    "member_joined_channel",
    "member_left_channel",
    "channel_created",
    "channel_rename",
    "app_home_opened",
    "app_uninstalled",
    "tokens_revoked",
    "team_join",
    "user_change",
    "file_shared",
    "pin_added",
];

/// `[ingest.platforms.slack]`, documented in shared/defaults.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlackSettings {
    /// Read by `enabled_platforms`; named here so `deny_unknown_fields` accepts it.
    #[serde(rename = "enabled")]
    _enabled: bool,
    bot_user_id: String,
    bot_id: String,
    mode: Mode,
    api_base_url: String,
    idle_timeout_ms: u64,
    ping_interval_ms: u64,
}

/// How events reach ingest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    /// The Events API: Slack posts to `/hooks/slack`.
    Webhook,
    /// Socket Mode: ingest opens a WebSocket to Slack.
    Socket,
}

/// Who the bot is, to tell its own messages and its mentions apart.
#[derive(Debug)]
struct Bot {
    /// `U…`: the bot user, as mentions name it.
    user_id: String,
    /// `B…`: the bot, as its posts name it; empty if not configured.
    bot_id: String,
}

pub struct Slack {
    /// The signing secret; `None` in socket mode (the webhook is off).
    secret: Option<Vec<u8>>,
    bot: Bot,
    /// Socket Mode's settings; `None` in webhook mode.
    socket: Option<socket::SocketSettings>,
}

fn build(table: &toml::Value, env: &dyn Env) -> Result<Arc<dyn InboundPlatform>, Error> {
    let (settings, supervision): (SlackSettings, _) =
        platform_settings("ingest.platforms.slack", table)?;
    if settings.bot_user_id.is_empty() {
        return Err(Error::config(
            "ingest.platforms.slack.bot_user_id",
            "must be the bot user's id (U…), as auth.test answers `user_id`",
        ));
    }
    let (secret, socket) = match settings.mode {
        Mode::Webhook => (Some(secret_env(env, SECRET_ENV, 16)?.into_bytes()), None),
        Mode::Socket => (None, Some(socket_settings(&settings, supervision, env)?)),
    };
    info!(message = "slack events", mode = ?settings.mode, bot_user_id = %settings.bot_user_id);
    Ok(Arc::new(Slack {
        secret,
        bot: Bot {
            user_id: settings.bot_user_id,
            bot_id: settings.bot_id,
        },
        socket,
    }))
}

fn socket_settings(
    settings: &SlackSettings,
    supervision: Supervision,
    env: &dyn Env,
) -> Result<socket::SocketSettings, Error> {
    let app_token = secret_env(env, APP_TOKEN_ENV, 6)?;
    if !app_token.starts_with("xapp-") {
        return Err(Error::config(
            APP_TOKEN_ENV,
            "must be an app-level token (xapp-…) with connections:write",
        ));
    }
    let open_url = endpoint(
        "ingest.platforms.slack",
        &settings.api_base_url,
        "/apps.connections.open",
    )?;
    let client = supervision.http_client("ingest.platforms.slack")?;
    let idle = Idle::checked(
        "ingest.platforms.slack",
        settings.idle_timeout_ms,
        settings.ping_interval_ms,
    )?;
    Ok(socket::SocketSettings {
        app_token,
        open_url,
        client,
        supervision,
        idle,
    })
}

impl InboundPlatform for Slack {
    fn name(&self) -> &'static str {
        PLATFORM.name
    }

    fn receive(&self, request: &HookRequest) -> Result<Hook, IngestError> {
        self.verify(request)?;
        let envelope: Envelope = parse_json(&request.body)?;
        Ok(match envelope {
            Envelope::UrlVerification { challenge } => Hook::Answer(Answer::text(challenge)),
            Envelope::EventCallback { event } => {
                read_event(*event, &self.bot, request.stamp()).into_hook()
            }
            Envelope::AppRateLimited => ignored("app_rate_limited"),
            Envelope::Other => ignored("other"),
        })
    }

    fn start(self: Arc<Self>, inbox: Inbox, health: Health, shutdown: CancellationToken) {
        if self.socket.is_some() {
            socket::start(self, inbox, health, shutdown);
        }
    }
}

impl Slack {
    /// The timestamp within the window, then the signature over it and the body.
    fn verify(&self, request: &HookRequest) -> Result<(), IngestError> {
        let Some(secret) = &self.secret else {
            return Err(unverified(
                "webhook_off",
                "slack is in socket mode; its webhook is off".into(),
            ));
        };
        let (Some(signature), Some(timestamp)) = (
            request.header(SIGNATURE_HEADER),
            request.header(TIMESTAMP_HEADER),
        ) else {
            return Err(unverified(
                "missing_signature",
                format!("no {SIGNATURE_HEADER} or {TIMESTAMP_HEADER} header"),
            ));
        };
        let seconds: i64 = timestamp.trim().parse().map_err(|_| {
            unverified(
                "bad_timestamp",
                format!("{TIMESTAMP_HEADER} is not unix seconds"),
            )
        })?;
        let skew = (request.received_at_ms / 1000)
            .saturating_sub(seconds)
            .saturating_abs();
        if skew > WINDOW_SECS {
            return Err(unverified(
                "stale_timestamp",
                format!("{TIMESTAMP_HEADER} is {skew} s from now, more than {WINDOW_SECS} s"),
            ));
        }
        let given = signature
            .strip_prefix("v0=")
            .and_then(|hex_digits| hex::decode(hex_digits).ok())
            .ok_or_else(|| {
                unverified(
                    "bad_signature",
                    format!("{SIGNATURE_HEADER} is not v0=<hex>"),
                )
            })?;
        let mut mac =
            Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes keys of any length");
        mac.update(b"v0:");
        mac.update(timestamp.as_bytes());
        mac.update(b":");
        mac.update(&request.body);
        mac.verify_slice(&given).map_err(|_| {
            unverified(
                "bad_signature",
                format!("{SIGNATURE_HEADER} does not match the body"),
            )
        })
    }
}

fn unverified(reason: &'static str, detail: String) -> IngestError {
    IngestError::Unverified {
        platform: PLATFORM.name,
        reason,
        detail,
    }
}

fn ignored(kind: &str) -> Hook {
    Hook::Ignored {
        kind: kind.into(),
        answer: Answer::ok(),
    }
}

// ---- the Events API's payloads, as far as botline reads them ----

#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Envelope {
    UrlVerification {
        challenge: String,
    },
    EventCallback {
        event: Box<InnerEvent>,
    },
    AppRateLimited,
    #[serde(other)]
    Other,
}

#[derive(Debug, Deserialize)]
struct InnerEvent {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    subtype: Option<String>,
    #[serde(default)]
    channel: Option<String>,
    /// `im`, `mpim`, `group` or `channel`; `app_mention` events leave it out.
    #[serde(default)]
    channel_type: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    bot_id: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    ts: Option<String>,
    #[serde(default)]
    thread_ts: Option<String>,
    #[serde(default)]
    files: Vec<File>,
}

#[derive(Debug, Deserialize)]
struct File {
    id: String,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    mimetype: Option<String>,
    #[serde(default)]
    size: Option<u64>,
    #[serde(default)]
    url_private: Option<String>,
}

// ---- normalization (pure) ----

fn read_event(event: InnerEvent, bot: &Bot, stamp: Stamp) -> Read {
    let mentioned_by_event = match event.kind.as_str() {
        "message" => false,
        "app_mention" => true,
        other => {
            return Read::Ignored(
                EVENT_KINDS
                    .iter()
                    .find(|kind| **kind == other)
                    .copied()
                    .unwrap_or("other"),
            )
        }
    };
    if !matches!(
        event.subtype.as_deref(),
        None | Some("file_share") | Some("thread_broadcast")
    ) {
        return Read::Ignored("message_subtype");
    }
    let own = event.user.as_deref() == Some(bot.user_id.as_str())
        || (!bot.bot_id.is_empty() && event.bot_id.as_deref() == Some(bot.bot_id.as_str()));
    if own {
        return Read::Ignored("own_message");
    }
    let (Some(channel), Some(ts)) = (event.channel, event.ts) else {
        return Read::Ignored("no_channel");
    };
    let attachments: Vec<Attachment> = event.files.into_iter().map(attachment).collect();
    let raw_text = event.text.unwrap_or_default();
    if raw_text.trim().is_empty() && attachments.is_empty() {
        return Read::Ignored("empty_message");
    }
    let kind = match event.channel_type.as_deref() {
        Some("im") => ChatKind::Direct,
        Some(_) => ChatKind::Group,
        // Direct message channel ids start with D.
        None if channel.starts_with('D') => ChatKind::Direct,
        None => ChatKind::Group,
    };
    let (text, users) = unified_text(&raw_text);
    let bot_mentioned = mentioned_by_event || users.contains(&bot.user_id);
    let sender_id = event
        .user
        .or(event.bot_id.clone())
        .unwrap_or_else(|| "unknown".into());
    let platform_ts_ms = slack_ts_ms(&ts);
    let chat = Chat {
        id: channel.clone(),
        kind,
    };
    let sender = Sender {
        name: sender_id.clone(),
        id: sender_id,
        is_bot: event.bot_id.is_some(),
    };
    let message = UnifiedMessage {
        thread: event.thread_ts,
        mentions: Mentions {
            users,
            bot: bot_mentioned,
        },
        attachments,
        platform_message_id: Some(ts.clone()),
        platform_ts_ms,
        ..stamp.user_message(PLATFORM.name, bot.user_id.clone(), chat, sender, text)
    };
    Read::Message(Box::new(Event {
        event_id: format!("{channel}:{ts}"),
        message,
    }))
}

/// `1355517523.000005` (seconds.micro-ish) as ms.
fn slack_ts_ms(ts: &str) -> Option<i64> {
    let (seconds, fraction) = ts.split_once('.').unwrap_or((ts, "0"));
    let millis: String = format!("{fraction:0<3}").chars().take(3).collect();
    seconds
        .parse::<i64>()
        .ok()?
        .checked_mul(1000)?
        .checked_add(millis.parse::<i64>().ok()?)
}

fn attachment(file: File) -> Attachment {
    let mime = file.mimetype.unwrap_or_default();
    let kind = match mime.split('/').next() {
        Some("image") => AttachmentKind::Image,
        Some("audio") => AttachmentKind::Audio,
        Some("video") => AttachmentKind::Video,
        _ => AttachmentKind::File,
    };
    Attachment {
        kind,
        url: file.url_private,
        file_id: Some(file.id),
        mime: (!mime.is_empty()).then_some(mime),
        size: file.size,
        name: file.name,
    }
}

/// Slack's markup as plain text with `@<user id>` mentions, and the users
/// mentioned (in order, once each).
fn unified_text(text: &str) -> (String, Vec<String>) {
    let mut unified = String::with_capacity(text.len());
    let mut users: Vec<String> = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find('<') {
        let Some(close) = rest[open..].find('>') else {
            break;
        };
        unified.push_str(&unescape(&rest[..open]));
        let inner = &rest[open + 1..open + close];
        let (target, label) = match inner.split_once('|') {
            Some((target, label)) => (target, Some(label)),
            None => (inner, None),
        };
        if let Some(user) = target.strip_prefix('@') {
            unified.push('@');
            unified.push_str(user);
            if !users.iter().any(|known| known == user) {
                users.push(user.to_string());
            }
        } else if let Some(special) = target.strip_prefix('!') {
            // <!here>, <!channel>, <!everyone>, <!subteam^S123|@team>.
            match label {
                Some(label) => unified.push_str(&unescape(label)),
                None => {
                    unified.push('@');
                    unified.push_str(special);
                }
            }
        } else if let Some(channel) = target.strip_prefix('#') {
            unified.push('#');
            unified.push_str(&unescape(label.unwrap_or(channel)));
        } else {
            let url = unescape(target);
            match label {
                Some(label) if unescape(label) != url => {
                    unified.push_str(&format!("{} ({url})", unescape(label)))
                }
                _ => unified.push_str(&url),
            }
        }
        rest = &rest[open + close + 1..];
    }
    unified.push_str(&unescape(rest));
    (unified, users)
}

/// Slack's three escapes back to their characters.
fn unescape(text: &str) -> String {
    text.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_text(text: &str, expected: &str, expected_users: &[&str]) {
        let (unified, users) = unified_text(text);
        assert_eq!(unified, expected, "{text:?}");
        assert_eq!(users, expected_users, "{text:?}");
    }

    #[test]
    fn slack_markup_becomes_plain_text_with_unified_mentions() {
        check_text("hello", "hello", &[]);
        check_text(
            "<@U0LAN0Z89> is it everything a river should be?",
            "@U0LAN0Z89 is it everything a river should be?",
            &["U0LAN0Z89"],
        );
        check_text(
            "<@U1|ann> and <@U2> and <@U1>",
            "@U1 and @U2 and @U1",
            &["U1", "U2"],
        );
        check_text("<!here> <!channel> 开会", "@here @channel 开会", &[]);
        check_text("<!subteam^S123|@ops> help", "@ops help", &[]);
        check_text("see <#C024BE7LR|general>", "see #general", &[]);
        check_text(
            "<https://example.com|the site> and <https://a.b/?x=1&amp;y=2>",
            "the site (https://example.com) and https://a.b/?x=1&y=2",
            &[],
        );
        check_text("<mailto:a@b.c|a@b.c>", "a@b.c (mailto:a@b.c)", &[]);
        check_text("1 &lt; 2 &amp;&amp; 3 &gt; 2", "1 < 2 && 3 > 2", &[]);
        check_text("unclosed <@U1", "unclosed <@U1", &[]);
    }

    /// Slack's published example ("Verifying requests from Slack"): a slash
    /// command's form body, signed at 1531420618.
    fn published_request(body: &str, seconds_later: i64) -> HookRequest {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(TIMESTAMP_HEADER, "1531420618".parse().unwrap());
        headers.insert(
            SIGNATURE_HEADER,
            "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503"
                .parse()
                .unwrap(),
        );
        HookRequest {
            method: axum::http::Method::POST,
            query: String::new(),
            headers,
            body: body.to_string().into(),
            received_at_ms: (1_531_420_618 + seconds_later) * 1000,
            trace_id: "t".into(),
        }
    }

    #[test]
    fn the_published_test_vector_verifies() {
        let slack = Slack {
            secret: Some(b"8f742231b10e8888abcd99yyyzzz85a5".to_vec()),
            bot: Bot {
                user_id: "U1".into(),
                bot_id: String::new(),
            },
            socket: None,
        };
        let body = "token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let label = |request: &HookRequest| slack.verify(request).err().map(|error| error.label());
        assert_eq!(label(&published_request(body, 0)), None);
        assert_eq!(label(&published_request(body, -WINDOW_SECS)), None);
        assert_eq!(label(&published_request(body, WINDOW_SECS)), None);
        assert_eq!(
            label(&published_request(body, WINDOW_SECS + 1)),
            Some("stale_timestamp")
        );
        assert_eq!(
            label(&published_request(&body.replace("foobar", "foobaz"), 0)),
            Some("bad_signature")
        );
    }

    #[test]
    fn slack_timestamps_become_milliseconds() {
        assert_eq!(slack_ts_ms("1355517523.000005"), Some(1_355_517_523_000));
        assert_eq!(slack_ts_ms("1355517523.123456"), Some(1_355_517_523_123));
        assert_eq!(slack_ts_ms("1355517523"), Some(1_355_517_523_000));
        assert_eq!(slack_ts_ms("x.1"), None);
    }
}
