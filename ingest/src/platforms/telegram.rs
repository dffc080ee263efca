//! Telegram: updates arrive by webhook (`setWebhook` with a `secret_token`,
//! which Telegram sends back in `X-Telegram-Bot-Api-Secret-Token`), or, for
//! hosts without a public URL, by `getUpdates` long polling (`mode =
//! "polling"`): one poller across every ingest replica, chosen by a lease in
//! Redis, so no two replicas ever ask Telegram at once (it answers the
//! second with 409). The poller is watched as the other long-lived
//! connections are (`botline_ingest_connection_*{platform="telegram"}`,
//! the `/readyz` check `telegram:<bot id>`, false while getUpdates fails
//! on the replica holding the lease), and a failing getUpdates is retried
//! after a growing backoff with jitter from `poll_retry_ms` (at most
//! [`POLL_RETRY_CAP`]), or after Telegram's `retry_after` if that is longer.
//!
//! Telegram signs nothing and has no timestamp window: the secret token is
//! the whole verification. It retries a webhook until it gets a 2xx, so
//! every verified update is answered 200 — messages once they are in `in`,
//! anything else as ignored — and deduplicated by `update_id`.
//!
//! Only `message` updates become messages. Entities are counted in UTF-16
//! code units: a `text_mention` (which carries its user) becomes `@<user id>`,
//! a `mention` of the bot's own `@username` becomes `@<bot id>`; other
//! `@username` mentions stay as they are (Telegram gives no id for them).
//! The bot counts as mentioned by either, by a `/command@bot_username`, or
//! by a reply to one of its messages. A topic message of a forum keeps its
//! `message_thread_id` as the thread; media become attachments by file id;
//! the names of the sender and of the users mentioned go into
//! `platform_data` (`name:<user id>`), so egress can link mentions by name.

use super::connection::{watch_age, Backoff, Lease, Link};
use super::{Event, Hook, HookRequest, InboundPlatform, Read, Registration};
use crate::error::IngestError;
use crate::generic::{parse_json, raw_event, Stamp};
use crate::inbox::{Inbox, Submission};
use botline_shared::config::{deserialize_setting, secret_env, Env};
use botline_shared::message::{
    Attachment, AttachmentKind, Chat, ChatKind, Mentions, Sender, UnifiedMessage,
};
use botline_shared::telemetry::Health;
use botline_shared::Error;
use serde::de::IgnoredAny;
use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub const PLATFORM: Registration = Registration {
    name: "telegram",
    build,
};

/// The `secret_token` given to `setWebhook` (webhook mode).
pub const SECRET_ENV: &str = "BOTLINE_TELEGRAM_WEBHOOK_SECRET";
/// The bot token from @BotFather (polling mode).
pub const TOKEN_ENV: &str = "BOTLINE_TELEGRAM_BOT_TOKEN";
/// Where Telegram puts the secret token.
pub const SECRET_HEADER: &str = "x-telegram-bot-api-secret-token";
/// The update types whose absence of handling is counted by name; any
/// other is counted as `other`.
const UPDATE_KINDS: &[&str] = &[
    "edited_message",
    "channel_post",
    "edited_channel_post",
    "business_connection",
    "business_message",
    "edited_business_message",
    "deleted_business_messages",
    "message_reaction",
    "message_reaction_count",
    "inline_query",
    "chosen_inline_result",
    "callback_query",
    "shipping_query",
    "pre_checkout_query",
    "purchased_paid_media",
    "poll",
    "poll_answer",
    "my_chat_member",
    "chat_member",
    "chat_join_request",
    "chat_boost",
    "removed_chat_boost",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Mode {
    Webhook,
    Polling,
}

/// `[ingest.platforms.telegram]`, documented in shared/defaults.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TelegramSettings {
    /// Read by `enabled_platforms`; named here so `deny_unknown_fields` accepts it.
    #[serde(rename = "enabled")]
    _enabled: bool,
    mode: Mode,
    bot_id: String,
    bot_username: String,
    api_base_url: String,
    poll_timeout_secs: u64,
    poll_retry_ms: u64,
}

/// Who the bot is, to tell its own messages and its mentions apart.
#[derive(Debug, Clone)]
struct Bot {
    id: i64,
    /// Lower-cased, without the `@`.
    username: String,
}

pub struct Telegram {
    bot: Bot,
    /// The webhook's secret token; `None` in polling mode (the webhook is off).
    secret: Option<String>,
    poller: Option<Poller>,
}

fn build(table: &toml::Value, env: &dyn Env) -> Result<Arc<dyn InboundPlatform>, Error> {
    let settings: TelegramSettings =
        deserialize_setting("ingest.platforms.telegram", table.clone())?;
    let setting = |name: &str| format!("ingest.platforms.telegram.{name}");
    let id = settings
        .bot_id
        .parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| {
            Error::config(
                setting("bot_id"),
                "must be the bot's numeric user id (the digits before `:` in its token)",
            )
        })?;
    let username = settings.bot_username.trim_start_matches('@').to_lowercase();
    if username.is_empty() {
        return Err(Error::config(
            setting("bot_username"),
            "must be the bot's @username",
        ));
    }
    let bot = Bot { id, username };
    let (secret, poller) = match settings.mode {
        Mode::Webhook => {
            let secret = secret_env(env, SECRET_ENV, 1)?;
            let allowed = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'-';
            if secret.len() > 256 || !secret.bytes().all(allowed) {
                return Err(Error::config(
                    SECRET_ENV,
                    "must be 1-256 characters of A-Z, a-z, 0-9, _ and - (what setWebhook accepts)",
                ));
            }
            (Some(secret), None)
        }
        Mode::Polling => {
            let token = secret_env(env, TOKEN_ENV, 1)?;
            (None, Some(Poller::new(&settings, &token, &bot)?))
        }
    };
    info!(
        message = "telegram updates",
        mode = ?settings.mode,
        bot_id = bot.id,
        bot_username = %bot.username
    );
    Ok(Arc::new(Telegram {
        bot,
        secret,
        poller,
    }))
}

impl InboundPlatform for Telegram {
    fn name(&self) -> &'static str {
        PLATFORM.name
    }

    fn receive(&self, request: &HookRequest) -> Result<Hook, IngestError> {
        let Some(secret) = &self.secret else {
            return Err(unverified(
                "webhook_off",
                "telegram is in polling mode; its webhook is off".into(),
            ));
        };
        let given = request
            .header(SECRET_HEADER)
            .ok_or_else(|| unverified("missing_token", format!("no {SECRET_HEADER} header")))?;
        if !bool::from(given.as_bytes().ct_eq(secret.as_bytes())) {
            return Err(unverified(
                "bad_token",
                format!("{SECRET_HEADER} does not match {SECRET_ENV}"),
            ));
        }
        let update: Update = parse_json(&request.body)?;
        Ok(read_update(update, &self.bot, request.stamp()).into_hook())
    }

    fn start(self: Arc<Self>, inbox: Inbox, health: Health, shutdown: CancellationToken) {
        if self.poller.is_some() {
            tokio::spawn(async move {
                let poller = self.poller.as_ref().expect("checked above");
                poller.run(&self.bot, inbox, health, shutdown).await;
            });
        }
    }
}

fn unverified(reason: &'static str, detail: String) -> IngestError {
    IngestError::Unverified {
        platform: PLATFORM.name,
        reason,
        detail,
    }
}

// ---- the Bot API's objects, as far as botline reads them ----

/// An `Update`: its id and at most one of the optional fields.
#[derive(Debug, Deserialize)]
struct Update {
    update_id: i64,
    #[serde(default)]
    message: Option<Message>,
    /// Whatever else it carries: named in the `ignored` count.
    #[serde(flatten)]
    other: BTreeMap<String, IgnoredAny>,
}

#[derive(Debug, Deserialize)]
struct Message {
    message_id: i64,
    #[serde(default)]
    message_thread_id: Option<i64>,
    #[serde(default)]
    is_topic_message: bool,
    #[serde(default)]
    from: Option<User>,
    /// Who sent it on behalf of a chat (anonymous group admins, channels).
    #[serde(default)]
    sender_chat: Option<TelegramChat>,
    date: i64,
    chat: TelegramChat,
    #[serde(default)]
    reply_to_message: Option<RepliedTo>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    entities: Vec<Entity>,
    #[serde(default)]
    caption: Option<String>,
    #[serde(default)]
    caption_entities: Vec<Entity>,
    #[serde(default)]
    photo: Vec<File>,
    #[serde(default)]
    animation: Option<File>,
    #[serde(default)]
    audio: Option<File>,
    #[serde(default)]
    document: Option<File>,
    #[serde(default)]
    sticker: Option<File>,
    #[serde(default)]
    video: Option<File>,
    #[serde(default)]
    video_note: Option<File>,
    #[serde(default)]
    voice: Option<File>,
}

#[derive(Debug, Deserialize)]
struct RepliedTo {
    message_id: i64,
    #[serde(default)]
    from: Option<User>,
}

#[derive(Debug, Deserialize)]
struct User {
    id: i64,
    #[serde(default)]
    is_bot: bool,
    first_name: String,
    #[serde(default)]
    last_name: Option<String>,
}

impl User {
    fn name(&self) -> String {
        match &self.last_name {
            Some(last) if !last.is_empty() => format!("{} {last}", self.first_name),
            _ => self.first_name.clone(),
        }
    }
}

#[derive(Debug, Deserialize)]
struct TelegramChat {
    id: i64,
    /// `private`, `group`, `supergroup` or `channel`.
    #[serde(default, rename = "type")]
    kind: Option<String>,
    #[serde(default)]
    title: Option<String>,
}

impl TelegramChat {
    fn kind(&self) -> ChatKind {
        match self.kind.as_deref() {
            Some("private") => ChatKind::Direct,
            Some("channel") => ChatKind::Channel,
            Some(_) => ChatKind::Group,
            // Old samples leave `type` out: private chats have the user's
            // (positive) id, groups negative ones.
            None if self.id > 0 => ChatKind::Direct,
            None => ChatKind::Group,
        }
    }
}

#[derive(Debug, Deserialize)]
struct Entity {
    #[serde(rename = "type")]
    kind: String,
    /// In UTF-16 code units.
    offset: usize,
    length: usize,
    #[serde(default)]
    user: Option<User>,
}

/// A `PhotoSize`, `Document`, `Audio`, `Voice`, `Video`, `Sticker`, …: the
/// fields they share.
#[derive(Debug, Deserialize)]
struct File {
    file_id: String,
    #[serde(default)]
    file_size: Option<u64>,
    #[serde(default)]
    mime_type: Option<String>,
    #[serde(default)]
    file_name: Option<String>,
}

// ---- normalization (pure) ----

fn read_update(update: Update, bot: &Bot, stamp: Stamp) -> Read {
    let Some(message) = update.message else {
        let kind = update
            .other
            .keys()
            .find_map(|key| UPDATE_KINDS.iter().find(|kind| **kind == key.as_str()))
            .copied()
            .unwrap_or("other");
        return Read::Ignored(kind);
    };
    if message.from.as_ref().is_some_and(|from| from.id == bot.id) {
        return Read::Ignored("own_message");
    }
    let (text, entities) = match message.text {
        Some(text) => (text, message.entities),
        None => (
            message.caption.unwrap_or_default(),
            message.caption_entities,
        ),
    };
    let attachments = attachments(
        message.photo,
        [
            (AttachmentKind::Video, message.animation),
            (AttachmentKind::Audio, message.audio),
            (AttachmentKind::File, message.document),
            (AttachmentKind::Sticker, message.sticker),
            (AttachmentKind::Video, message.video),
            (AttachmentKind::Video, message.video_note),
            (AttachmentKind::Audio, message.voice),
        ],
    );
    if text.trim().is_empty() && attachments.is_empty() {
        // Members joining, pinned messages, polls, locations, …
        return Read::Ignored("service_message");
    }
    let mut platform_data = BTreeMap::new();
    let (text, mut mentions) = mention_text(&text, &entities, bot, &mut platform_data);
    if message
        .reply_to_message
        .as_ref()
        .and_then(|replied| replied.from.as_ref())
        .is_some_and(|from| from.id == bot.id)
    {
        mentions.bot = true;
    }
    let sender = match &message.from {
        Some(from) => {
            platform_data.insert(format!("name:{}", from.id), from.name());
            Sender {
                id: from.id.to_string(),
                name: from.name(),
                is_bot: from.is_bot,
            }
        }
        None => {
            let chat = message.sender_chat.as_ref().unwrap_or(&message.chat);
            Sender {
                id: chat.id.to_string(),
                name: chat.title.clone().unwrap_or_else(|| chat.id.to_string()),
                is_bot: false,
            }
        }
    };
    let chat = Chat {
        id: message.chat.id.to_string(),
        kind: message.chat.kind(),
    };
    let message = UnifiedMessage {
        thread: message
            .message_thread_id
            .filter(|_| message.is_topic_message)
            .map(|thread| thread.to_string()),
        mentions,
        attachments,
        reply_to: message
            .reply_to_message
            .map(|replied| replied.message_id.to_string()),
        platform_message_id: Some(message.message_id.to_string()),
        platform_data,
        platform_ts_ms: Some(message.date.saturating_mul(1000)),
        ..stamp.user_message(PLATFORM.name, bot.id.to_string(), chat, sender, text)
    };
    Read::Message(Box::new(Event {
        event_id: format!("{}:{}", bot.id, update.update_id),
        message,
    }))
}

/// `text` with mentions in the unified form (`@<user id>`), and who was
/// mentioned. Entities that do not fit the text are left alone.
fn mention_text(
    text: &str,
    entities: &[Entity],
    bot: &Bot,
    platform_data: &mut BTreeMap<String, String>,
) -> (String, Mentions) {
    let units: Vec<u16> = text.encode_utf16().collect();
    let mut entities: Vec<&Entity> = entities.iter().collect();
    entities.sort_by_key(|entity| entity.offset);
    let mut unified = String::with_capacity(text.len());
    let mut cursor = 0;
    let mut users = Vec::new();
    let mut bot_mentioned = false;
    for entity in entities {
        let end = entity.offset.saturating_add(entity.length);
        if entity.offset < cursor || end > units.len() {
            continue;
        }
        let span = String::from_utf16_lossy(&units[entity.offset..end]);
        let is_bot = |name: &str| name.eq_ignore_ascii_case(&bot.username);
        let user_id = match (entity.kind.as_str(), &entity.user) {
            ("text_mention", Some(user)) => {
                platform_data.insert(format!("name:{}", user.id), user.name());
                user.id
            }
            ("mention", _) if is_bot(span.trim_start_matches('@')) => bot.id,
            ("bot_command", _) => {
                bot_mentioned |= span.split_once('@').is_some_and(|(_, to)| is_bot(to));
                continue;
            }
            _ => continue,
        };
        unified.push_str(&String::from_utf16_lossy(&units[cursor..entity.offset]));
        unified.push_str(&format!("@{user_id}"));
        cursor = end;
        bot_mentioned |= user_id == bot.id;
        let user_id = user_id.to_string();
        if !users.contains(&user_id) {
            users.push(user_id);
        }
    }
    unified.push_str(&String::from_utf16_lossy(&units[cursor..]));
    (
        unified,
        Mentions {
            users,
            bot: bot_mentioned,
        },
    )
}

/// A message's media as attachments by file id (a file's URL would carry
/// the bot token). Of a photo's sizes, the largest (the last).
fn attachments(
    photo: Vec<File>,
    media: impl IntoIterator<Item = (AttachmentKind, Option<File>)>,
) -> Vec<Attachment> {
    let photo = photo
        .into_iter()
        .last()
        .map(|file| (AttachmentKind::Image, file));
    let mut seen = BTreeSet::new();
    photo
        .into_iter()
        .chain(
            media
                .into_iter()
                .filter_map(|(kind, file)| file.map(|file| (kind, file))),
        )
        // An animation is also sent as its document: keep one.
        .filter(|(_, file)| seen.insert(file.file_id.clone()))
        .map(|(kind, file)| Attachment {
            kind,
            url: None,
            file_id: Some(file.file_id),
            mime: file.mime_type,
            size: file.file_size,
            name: file.file_name,
        })
        .collect()
}

// ---- getUpdates long polling ----

/// The longest wait between failing getUpdates calls (unless Telegram asks
/// for longer).
pub const POLL_RETRY_CAP: Duration = Duration::from_secs(60);

/// Polls `getUpdates` while this replica holds the poller lease.
struct Poller {
    client: reqwest::Client,
    /// `<api>/bot<token>/getUpdates`: holds the token, so never logged.
    url: reqwest::Url,
    timeout_secs: u64,
    /// Where the backoff after a failed poll starts, and the pause between
    /// looks at a lease held elsewhere.
    retry: Duration,
}

/// A Bot API answer: `result` when `ok`, else why not.
#[derive(Debug, Deserialize)]
struct ApiAnswer {
    ok: bool,
    #[serde(default)]
    result: Vec<serde_json::Value>,
    #[serde(default)]
    error_code: Option<i64>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<ResponseParameters>,
}

#[derive(Debug, Deserialize)]
struct ResponseParameters {
    #[serde(default)]
    retry_after: Option<u64>,
}

impl Poller {
    fn new(settings: &TelegramSettings, token: &str, bot: &Bot) -> Result<Self, Error> {
        let base = settings.api_base_url.trim_end_matches('/');
        let url = reqwest::Url::parse(&format!("{base}/bot{token}/getUpdates")).map_err(|_| {
            Error::config(
                "ingest.platforms.telegram.api_base_url",
                "with the bot token, does not make a URL",
            )
        })?;
        if !token.starts_with(&format!("{}:", bot.id)) {
            return Err(Error::config(
                TOKEN_ENV,
                "does not start with ingest.platforms.telegram.bot_id and `:`",
            ));
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(settings.poll_timeout_secs + 10))
            .user_agent(concat!("botline-ingest/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| Error::config("ingest.platforms.telegram", error))?;
        Ok(Poller {
            client,
            url,
            timeout_secs: settings.poll_timeout_secs,
            retry: Duration::from_millis(settings.poll_retry_ms),
        })
    }

    /// How long the lease lasts unrenewed: one long poll and the admission
    /// of its updates, with room to spare. A replica that dies holding it
    /// is replaced after this long.
    fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.timeout_secs + 30)
    }

    async fn run(&self, bot: &Bot, inbox: Inbox, health: Health, shutdown: CancellationToken) {
        let lease = Lease::new(
            inbox.pool.clone(),
            inbox
                .streams
                .consumer_lease("telegram-poller", &bot.id.to_string()),
            self.lease_ttl(),
        );
        let link = Arc::new(Link::new(PLATFORM.name, bot.id.to_string(), health));
        let ager = watch_age(link.clone(), shutdown.clone());
        let mut backoff = Backoff::new(self.retry, POLL_RETRY_CAP.max(self.retry));
        let mut offset: Option<i64> = None;
        let mut polling = false;
        // Whether the last poll here failed: the next is a reconnect.
        let mut failing = false;
        while !shutdown.is_cancelled() {
            let held = lease.hold().await.unwrap_or_else(|error| {
                warn!(message = "could not take the telegram poller lease", %error);
                false
            });
            if held != polling {
                info!(message = "telegram getUpdates poller", held);
                polling = held;
            }
            let pause = if held {
                if failing {
                    link.reconnecting();
                }
                match self.poll(bot, &inbox, &mut offset, &shutdown).await {
                    Ok(()) => {
                        failing = false;
                        backoff.reset();
                        link.up();
                        None
                    }
                    Err(asked) => {
                        failing = true;
                        link.down();
                        Some(backoff.next_wait().max(asked.unwrap_or_default()))
                    }
                }
            } else {
                // Another replica polls; it confirms what it reads, so
                // start from Telegram's first unconfirmed update when our turn comes.
                offset = None;
                failing = false;
                link.stand_by();
                Some(self.retry)
            };
            if let Some(pause) = pause {
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shutdown.cancelled() => {}
                }
            }
        }
        ager.abort();
        link.stand_by();
        lease.release().await;
    }

    /// One `getUpdates` and the admission of what it brought; on failure,
    /// how long Telegram asked to wait, if it did. The offset moves past updates only once they are
    /// in `in`, so a crash in between has Telegram send them again (and
    /// the dedup key drops those already added).
    async fn poll(
        &self,
        bot: &Bot,
        inbox: &Inbox,
        offset: &mut Option<i64>,
        shutdown: &CancellationToken,
    ) -> Result<(), Option<Duration>> {
        let request = serde_json::json!({
            "offset": offset,
            "timeout": self.timeout_secs,
            "allowed_updates": ["message"],
        });
        let sent = tokio::select! {
            sent = self.client.post(self.url.clone()).json(&request).send() => sent,
            _ = shutdown.cancelled() => return Ok(()),
        };
        let answer = match sent {
            Ok(response) => response.json::<ApiAnswer>().await,
            Err(error) => Err(error),
        };
        let answer = answer.map_err(|error| {
            warn!(message = "telegram getUpdates failed", error = %error.without_url());
            None
        })?;
        if !answer.ok {
            warn!(
                message = "telegram getUpdates refused",
                error_code = answer.error_code,
                description = answer.description.as_deref().unwrap_or_default()
            );
            let asked = answer
                .parameters
                .and_then(|parameters| parameters.retry_after);
            return Err(asked.map(Duration::from_secs));
        }
        let received_at_ms = botline_shared::now_ms();
        let mut next = *offset;
        let mut submissions = Vec::new();
        for value in answer.result {
            let raw = raw_event(value.to_string().as_bytes());
            if let Some(update_id) = value.get("update_id").and_then(serde_json::Value::as_i64) {
                next = next.max(Some(update_id + 1));
            }
            let update = match serde_json::from_value::<Update>(value) {
                Ok(update) => update,
                Err(error) => {
                    // Passed over (and so confirmed): Telegram would send it again forever.
                    IngestError::Malformed(error.to_string())
                        .record("telegram_polling", PLATFORM.name);
                    continue;
                }
            };
            let stamp = Stamp {
                id: ulid::Ulid::new().to_string(),
                received_at_ms,
                trace_id: ulid::Ulid::new().to_string(),
                raw: Some(raw),
            };
            match read_update(update, bot, stamp) {
                Read::Message(event) => submissions.push(Submission {
                    message: event.message,
                    event_id: Some(event.event_id),
                    transcript: false,
                }),
                Read::Ignored(kind) => {
                    metrics::counter!("botline_ingest_ignored_total", "platform" => PLATFORM.name, "kind" => kind)
                        .increment(1);
                }
            }
        }
        if !submissions.is_empty() {
            inbox.admit(&submissions).await.map_err(|error| {
                error.record("telegram_polling", PLATFORM.name);
                None
            })?;
        }
        *offset = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bot() -> Bot {
        Bot {
            id: 999,
            username: "support_bot".into(),
        }
    }

    /// `entities` as `(type, offset, length, user id)`.
    fn check_mentions(
        text: &str,
        entities: &[(&str, usize, usize, Option<i64>)],
        expected_text: &str,
        expected_users: &[&str],
        expected_bot: bool,
    ) {
        let entities: Vec<Entity> = entities
            .iter()
            .map(|(kind, offset, length, user)| Entity {
                kind: kind.to_string(),
                offset: *offset,
                length: *length,
                user: user.map(|id| User {
                    id,
                    is_bot: false,
                    first_name: format!("U{id}"),
                    last_name: None,
                }),
            })
            .collect();
        let mut names = BTreeMap::new();
        let (unified, mentions) = mention_text(text, &entities, &bot(), &mut names);
        assert_eq!(unified, expected_text, "{text:?}");
        assert_eq!(mentions.users, expected_users, "{text:?}");
        assert_eq!(mentions.bot, expected_bot, "{text:?}");
    }

    #[test]
    fn mentions_become_user_ids_counting_utf16_units() {
        check_mentions("hello", &[], "hello", &[], false);
        check_mentions(
            "@support_bot hi",
            &[("mention", 0, 12, None)],
            "@999 hi",
            &["999"],
            true,
        );
        check_mentions(
            "hi @Support_Bot!",
            &[("mention", 3, 12, None)],
            "hi @999!",
            &["999"],
            true,
        );
        check_mentions(
            "ask @someone",
            &[("mention", 4, 8, None)],
            "ask @someone",
            &[],
            false,
        );
        // 🎉 is two UTF-16 units, 你好 two: the offsets count them so.
        check_mentions(
            "🎉你好 Ann and Bob",
            &[
                ("text_mention", 5, 3, Some(7)),
                ("text_mention", 13, 3, Some(8)),
            ],
            "🎉你好 @7 and @8",
            &["7", "8"],
            false,
        );
        check_mentions(
            "/help@support_bot now",
            &[("bot_command", 0, 17, None)],
            "/help@support_bot now",
            &[],
            true,
        );
        check_mentions(
            "/help@other_bot",
            &[("bot_command", 0, 15, None)],
            "/help@other_bot",
            &[],
            false,
        );
        check_mentions(
            "@support_bot @support_bot",
            &[("mention", 13, 12, None), ("mention", 0, 12, None)],
            "@999 @999",
            &["999"],
            true,
        );
        // Entities past the end, or overlapping one already replaced, are left alone.
        check_mentions("short", &[("mention", 2, 40, None)], "short", &[], false);
        check_mentions(
            "@support_bot",
            &[("mention", 0, 12, None), ("text_mention", 1, 3, Some(5))],
            "@999",
            &["999"],
            true,
        );
        check_mentions(
            "bold text",
            &[("bold", 0, 4, None)],
            "bold text",
            &[],
            false,
        );
    }

    fn read(json: &str) -> Read {
        let update: Update = parse_json(json.as_bytes()).unwrap();
        let stamp = Stamp {
            id: "01J0000000000000000000000A".into(),
            received_at_ms: 5,
            trace_id: "t".into(),
            raw: None,
        };
        read_update(update, &bot(), stamp)
    }

    fn check_ignored(json: &str, expected: &str) {
        match read(json) {
            Read::Ignored(kind) => assert_eq!(kind, expected, "{json}"),
            Read::Message(event) => panic!("{json} became {event:?}"),
        }
    }

    #[test]
    fn updates_that_are_not_messages_are_ignored_by_kind() {
        check_ignored(
            r#"{"update_id":1,"edited_message":{"message_id":1}}"#,
            "edited_message",
        );
        check_ignored(
            r#"{"update_id":1,"callback_query":{"id":"4382bfdwdsb323b2d9"}}"#,
            "callback_query",
        );
        check_ignored(r#"{"update_id":1,"something_new":{}}"#, "other");
        check_ignored(r#"{"update_id":1}"#, "other");
        check_ignored(
            r#"{"update_id":1,"message":{"message_id":2,"date":1,"chat":{"id":-5,"type":"group"},
                "from":{"id":999,"is_bot":true,"first_name":"Bot"},"text":"mine"}}"#,
            "own_message",
        );
        check_ignored(
            r#"{"update_id":1,"message":{"message_id":2,"date":1,"chat":{"id":-5,"type":"group"},
                "from":{"id":1,"is_bot":false,"first_name":"A"},"new_chat_members":[{"id":3,"is_bot":false,"first_name":"B"}]}}"#,
            "service_message",
        );
    }

    #[test]
    fn a_photo_with_a_caption_in_a_forum_topic_keeps_everything() {
        let Read::Message(event) = read(
            r#"{"update_id":77,"message":{"message_id":12,"message_thread_id":4,"is_topic_message":true,
                "date":1700000000,"chat":{"id":-1001234,"type":"supergroup","title":"Team","is_forum":true},
                "from":{"id":42,"is_bot":false,"first_name":"Ann","last_name":"Lee"},
                "photo":[{"file_id":"small","file_unique_id":"s","width":90,"height":90,"file_size":100},
                         {"file_id":"big","file_unique_id":"b","width":800,"height":800,"file_size":9000}],
                "caption":"look @support_bot","caption_entities":[{"type":"mention","offset":5,"length":12}],
                "reply_to_message":{"message_id":11,"date":1699999999,"chat":{"id":-1001234,"type":"supergroup"},
                    "from":{"id":999,"is_bot":true,"first_name":"Bot"},"text":"earlier"}}}"#,
        ) else {
            panic!("not a message");
        };
        assert_eq!(event.event_id, "999:77");
        let message = event.message;
        assert_eq!(message.chat.id, "-1001234");
        assert_eq!(message.chat.kind, ChatKind::Group);
        assert_eq!(message.thread.as_deref(), Some("4"));
        assert_eq!(message.sender.id, "42");
        assert_eq!(message.sender.name, "Ann Lee");
        assert_eq!(message.text, "look @999");
        assert!(message.mentions.bot);
        assert_eq!(message.reply_to.as_deref(), Some("11"));
        assert_eq!(message.platform_message_id.as_deref(), Some("12"));
        assert_eq!(message.platform_ts_ms, Some(1_700_000_000_000));
        assert_eq!(message.platform_data["name:42"], "Ann Lee");
        assert_eq!(message.attachments.len(), 1);
        assert_eq!(message.attachments[0].file_id.as_deref(), Some("big"));
        assert_eq!(message.attachments[0].kind, AttachmentKind::Image);
        assert_eq!(message.attachments[0].size, Some(9000));
    }

    #[test]
    fn an_animation_is_one_attachment_and_replies_in_plain_groups_have_no_thread() {
        let Read::Message(event) = read(
            r#"{"update_id":78,"message":{"message_id":13,"message_thread_id":11,"date":1,
                "chat":{"id":-77,"type":"group","title":"Team"},"from":{"id":42,"is_bot":false,"first_name":"Ann"},
                "animation":{"file_id":"gif","file_unique_id":"g","width":1,"height":1,"duration":1,"mime_type":"video/mp4"},
                "document":{"file_id":"gif","file_unique_id":"g","mime_type":"video/mp4","file_name":"a.mp4"}}}"#,
        ) else {
            panic!("not a message");
        };
        assert_eq!(event.message.thread, None);
        assert_eq!(event.message.attachments.len(), 1);
        assert_eq!(event.message.attachments[0].kind, AttachmentKind::Video);
        assert!(!event.message.mentions.bot);
    }
}
