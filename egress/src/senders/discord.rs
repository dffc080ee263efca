//! Discord: each reply is one `POST <api>/channels/<channel>/messages` with
//! `Authorization: Bot <BOTLINE_DISCORD_BOT_TOKEN>`.
//!
//! ```json
//! {
//!   "content": "<@42> your order #A-1 has shipped",
//!   "nonce": "3f1c0e5d9a7b2c4e6f8a0b1c2",   // 25 hex characters of SHA-256(reply id)
//!   "enforce_nonce": true,
//!   "allowed_mentions": {"parse": [], "users": ["42"], "replied_user": false},
//!   "message_reference": {"message_id": "1100", "fail_if_not_exists": false}
//! }
//! ```
//!
//! The channel is the reply's thread when it has one (a thread is a
//! channel), else its chat. Each user to mention becomes `<@ID>` in place of
//! its `@ID` in the text, or else in front of it; `allowed_mentions` lets
//! exactly those users be pinged, so no text (an echoed `@everyone`, a role
//! mention) pings anyone else. Text beyond Discord's 2000 characters is cut
//! with `…`. Attachments other than pictures are links on lines of their
//! own; pictures are embeds showing the image, `"embeds": [{"image":
//! {"url": "https://…"}}]`, at most Discord's 10 (any beyond are links in
//! the content), Discord fetching the URL itself; the content may then be
//! empty. The nonce is the same for every attempt at one reply, and with
//! `enforce_nonce` Discord answers a second request within a few minutes
//! with the message the first one made: a resend after a timeout is not a
//! second message.
//!
//! Answers: 2xx with the message object is delivered (its `id` is the
//! platform message id); 429 waits the body's `retry_after` (seconds, a
//! float), else the `Retry-After` header; 5xx, 408 and timeouts are
//! retried; any other status is permanent, its reason naming Discord's
//! error `code` and `message` (50001 missing access, 50013 missing
//! permissions, 10003 unknown channel, 50035 invalid form body, …).
//!
//! Rate limits: the static limits (the bot's `bot_per_second`, each
//! channel's `channel_count` per `channel_period_ms`) are the floor; on top
//! of them every answer's headers are heeded, as Discord asks, and shared
//! with every replica through Redis ([`Limiter::pause`]). An answer with
//! `X-RateLimit-Remaining: 0` pauses the channel's bucket (Create Message's
//! bucket, per its major parameter, the channel) for its
//! `X-RateLimit-Reset-After` (else until `X-RateLimit-Reset`); a 429 pauses
//! the channel for its `retry_after` too, or, when global
//! (`X-RateLimit-Global`, scope `global`, `"global": true`), every send of
//! the bot. The next attempt for a paused channel waits before its request
//! (within the send budget, else the entry is left pending) instead of
//! earning a 429. 401, 403 and 429s count as invalid requests
//! (`botline_egress_discord_invalid_requests_total`: 10,000 in 10 minutes
//! get the IP banned), except a 429 of scope `shared` (a limit on the
//! resource, not on the bot), which Discord does not count either.

use super::http::{self, Answered, Http};
use super::{media, mentions};
use super::{Attempt, Kit, Platform, Sender, Verdict};
use crate::limits::{Limit, Limiter};
use base64_free::bot_id_from_token;
use botline_shared::config::secret_env;
use botline_shared::message::Reply;
use botline_shared::Error;
use futures_util::future::BoxFuture;
use reqwest::StatusCode;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tracing::{debug, warn};

pub const PLATFORM: Platform = Platform {
    name: "discord",
    build,
};

/// The bot token from the Developer Portal (Bot → Token).
pub const TOKEN_ENV: &str = "BOTLINE_DISCORD_BOT_TOKEN";
/// Discord's longest message content, in characters.
const MAX_TEXT_CHARS: usize = 2000;
/// Discord's longest nonce.
const NONCE_CHARS: usize = 25;
/// Most users `allowed_mentions.users` may name.
const MAX_ALLOWED_USERS: usize = 100;
/// Most embeds one message may carry.
pub const MAX_EMBEDS: usize = 10;
/// The longest pause an answer's headers can impose: a value far off (a
/// garbled header, a clock gone wrong) must not stop a channel for days.
const MAX_PAUSE: Duration = Duration::from_secs(3600);

/// `[egress.platforms.discord]`, documented in shared/defaults.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscordSettings {
    /// Read by `enabled_platforms`; named here so `deny_unknown_fields` accepts it.
    #[serde(rename = "enabled")]
    _enabled: bool,
    api_base_url: String,
    timeout_ms: u64,
    bot_per_second: u32,
    channel_count: u32,
    channel_period_ms: u64,
}

pub struct DiscordSender {
    http: Http,
    /// `<api>`, without a trailing `/`.
    api_base: String,
    /// `Bot <token>`: never logged.
    authorization: String,
    /// Names the bot's limits: its user id, or a digest of its token.
    bot: String,
    bot_per_second: u32,
    channel_count: u32,
    channel_period: Duration,
    /// Records the pauses Discord's answers ask for, for every replica.
    limiter: Limiter,
}

fn build(table: &toml::Value, kit: &Kit) -> Result<Arc<dyn Sender>, Error> {
    let settings = super::settings(PLATFORM.name, table, |settings: &DiscordSettings| {
        vec![
            ("bot_per_second", settings.bot_per_second),
            ("channel_count", settings.channel_count),
        ]
    })?;
    if settings.channel_period_ms == 0 {
        return Err(Error::config(
            "egress.platforms.discord.channel_period_ms",
            "must be at least 1",
        ));
    }
    let token = secret_env(kit.env, TOKEN_ENV, 1)?;
    if token.chars().any(|c| c.is_whitespace() || c.is_control()) || token.starts_with("Bot ") {
        return Err(Error::config(
            TOKEN_ENV,
            "must be the bare bot token (no `Bot ` prefix, no spaces)",
        ));
    }
    let api_base = settings.api_base_url.trim_end_matches('/').to_string();
    reqwest::Url::parse(&format!("{api_base}/channels/1/messages"))
        .map_err(|error| Error::config("egress.platforms.discord.api_base_url", error))?;
    let bot = bot_id_from_token(&token).unwrap_or_else(|| {
        let digest = Sha256::digest(token.as_bytes());
        hex::encode(&digest[..8])
    });
    Ok(Arc::new(DiscordSender {
        http: Http::new(PLATFORM.name, settings.timeout_ms)?,
        api_base,
        authorization: format!("Bot {token}"),
        bot,
        bot_per_second: settings.bot_per_second,
        channel_count: settings.channel_count,
        channel_period: Duration::from_millis(settings.channel_period_ms),
        limiter: Limiter::new(kit.pool.clone(), kit.streams.clone()),
    }))
}

impl Sender for DiscordSender {
    fn platform(&self) -> &'static str {
        PLATFORM.name
    }

    /// The bot's global allowance and the channel's, and the pauses
    /// Discord's answers asked for: the bot's and the channel's bucket's.
    fn limits(&self, reply: &Reply) -> Vec<Limit> {
        vec![
            Limit::new(
                format!("discord:{}", self.bot),
                self.bot_per_second,
                Duration::from_secs(1),
            ),
            Limit::new(
                format!("discord:{}:channel:{}", self.bot, channel(reply)),
                self.channel_count,
                self.channel_period,
            ),
            Limit::pause(self.pause_name(None)),
            Limit::pause(self.pause_name(Some(channel(reply)))),
        ]
    }

    fn attempt<'a>(&'a self, reply: &'a Reply) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            let channel = channel(reply);
            if channel.is_empty() || !channel.bytes().all(|b| b.is_ascii_digit()) {
                return Attempt {
                    response: None,
                    verdict: Verdict::Permanent(format!("{channel:?} is not a Discord channel id")),
                };
            }
            let url = match reqwest::Url::parse(&format!(
                "{}/channels/{channel}/messages",
                self.api_base
            )) {
                Ok(url) => url,
                Err(error) => {
                    return Attempt {
                        response: None,
                        verdict: Verdict::Permanent(format!("no URL for the channel: {error}")),
                    }
                }
            };
            let request = self
                .http
                .post(url)
                .header(reqwest::header::AUTHORIZATION, &self.authorization)
                .json(&payload(reply));
            match self.http.send(request, PLATFORM.name).await {
                Ok(answered) => {
                    self.heed(channel, &answered).await;
                    answered.attempt(judge(&answered))
                }
                Err(attempt) => attempt,
            }
        })
    }
}

impl DiscordSender {
    /// The pause of the bot (`None`) or of a channel's bucket.
    fn pause_name(&self, channel: Option<&str>) -> String {
        match channel {
            None => format!("discord:{}:pause", self.bot),
            Some(channel) => format!("discord:{}:pause:channel:{channel}", self.bot),
        }
    }

    /// Pause what `answered` says has no room left (see [`learn`]), for
    /// every replica, and count it if it is an invalid request. A pause
    /// that cannot be recorded is logged: the static limits still apply.
    async fn heed(&self, channel: &str, answered: &Answered) {
        let learned = learn(answered);
        if counts_as_invalid(answered.status, learned.scope.as_deref()) {
            metrics::counter!("botline_egress_discord_invalid_requests_total").increment(1);
        }
        for (pause, target, length) in [
            ("channel", Some(channel), learned.channel),
            ("global", None, learned.global),
        ] {
            let Some(length) = length else { continue };
            metrics::counter!("botline_egress_rate_limit_pauses_total", "platform" => PLATFORM.name, "pause" => pause)
                .increment(1);
            match self.limiter.pause(&self.pause_name(target), length).await {
                Ok(lasts) => debug!(
                    message = "discord rate limit: pausing",
                    pause,
                    channel,
                    bucket = learned.bucket.as_deref().unwrap_or_default(),
                    lasts_ms = lasts.as_millis() as u64
                ),
                Err(error) => warn!(
                    message = "could not record a discord rate-limit pause",
                    pause,
                    channel,
                    %error
                ),
            }
        }
    }
}

/// Where the reply goes: its thread (a channel), else its chat.
fn channel(reply: &Reply) -> &str {
    reply
        .thread
        .as_deref()
        .filter(|thread| !thread.is_empty())
        .unwrap_or(&reply.chat.id)
}

/// Whether `id` looks like a snowflake.
fn is_snowflake(id: &str) -> bool {
    !id.is_empty() && id.len() <= 20 && id.bytes().all(|b| b.is_ascii_digit())
}

/// The Create Message body for `reply` (documented at the top of this module).
pub fn payload(reply: &Reply) -> serde_json::Value {
    let mut users: Vec<&str> = Vec::new();
    for user in &reply.mentions {
        if is_snowflake(user) && !users.contains(&user.as_str()) {
            users.push(user);
        }
    }
    users.truncate(MAX_ALLOWED_USERS);
    let mut body = serde_json::json!({
        "content": render(reply),
        "nonce": nonce(&reply.id),
        "enforce_nonce": true,
        "allowed_mentions": {"parse": [], "users": users, "replied_user": false},
    });
    if let Some(message) = reply.reply_to.as_deref().filter(|id| is_snowflake(id)) {
        body["message_reference"] = serde_json::json!({
            "message_id": message,
            "fail_if_not_exists": false,
        });
    }
    let embeds: Vec<serde_json::Value> = media::images(reply)
        .iter()
        .take(MAX_EMBEDS)
        .map(|image| serde_json::json!({ "image": { "url": image.url } }))
        .collect();
    if !embeds.is_empty() {
        body["embeds"] = embeds.into();
    }
    body
}

/// The text to send: the reply's, with its other attachments (and the
/// pictures beyond [`MAX_EMBEDS`]) as links.
fn content_text(reply: &Reply) -> String {
    let mut text = media::text_with_links(reply, false);
    let images = media::images(reply);
    media::append_image_links(&mut text, images.get(MAX_EMBEDS..).unwrap_or_default());
    text
}

/// The same for every attempt at one reply, at most 25 characters.
pub fn nonce(reply_id: &str) -> String {
    let digest = Sha256::digest(reply_id.as_bytes());
    let mut nonce = hex::encode(digest);
    nonce.truncate(NONCE_CHARS);
    nonce
}

/// The reply's text with its mentions as `<@ID>`, within Discord's length.
pub fn render(reply: &Reply) -> String {
    let mut users: Vec<String> = Vec::new();
    for user in &reply.mentions {
        if !users.contains(user) {
            users.push(user.clone());
        }
    }
    users.truncate(MAX_ALLOWED_USERS);
    // Room for mentions placed in front: `<@` + 20 digits + `> `.
    let room = MAX_TEXT_CHARS.saturating_sub(users.len() * 24).max(1);
    let text = mentions::place(&cut(&content_text(reply), room), &users, |user| {
        if is_snowflake(user) {
            format!("<@{user}>")
        } else {
            format!("@{user}")
        }
    });
    cut(&text, MAX_TEXT_CHARS)
}

/// At most `limit` characters, the last being `…` when cut.
fn cut(text: &str, limit: usize) -> String {
    if text.chars().count() <= limit {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(limit.saturating_sub(1)).collect();
        cut.push('…');
        cut
    }
}

/// A created message, as far as botline reads it.
#[derive(Debug, Deserialize)]
struct Created {
    id: String,
}

/// An error answer: `{"code": 50035, "message": "Invalid Form Body", …}`,
/// or a rate limit: `{"message": …, "retry_after": 0.5, "global": false}`.
#[derive(Debug, Deserialize)]
struct Refusal {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    retry_after: Option<f64>,
    #[serde(default)]
    global: Option<bool>,
}

/// What Discord's answer means.
fn judge(answered: &Answered) -> Verdict {
    let status = answered.status;
    if status.is_success() {
        return match serde_json::from_str::<Created>(&answered.body) {
            Ok(created) => Verdict::Delivered {
                platform_message_id: Some(created.id),
                writes: Vec::new(),
            },
            // Sent, whatever the body says: never send it again.
            Err(_) => Verdict::Delivered {
                platform_message_id: None,
                writes: Vec::new(),
            },
        };
    }
    let refusal = serde_json::from_str::<Refusal>(&answered.body).ok();
    if status == StatusCode::TOO_MANY_REQUESTS {
        let asked = refusal
            .as_ref()
            .and_then(|refusal| refusal.retry_after)
            .filter(|seconds| seconds.is_finite() && *seconds >= 0.0)
            .map(Duration::from_secs_f64);
        let scope = scope(answered, refusal.as_ref()).unwrap_or("route");
        return Verdict::RetryAfter {
            wait: asked.or(answered.retry_after),
            reason: format!("discord rate limit ({scope}) answered 429"),
        };
    }
    let reason = match &refusal {
        Some(Refusal {
            code: Some(code),
            message,
            ..
        }) => format!(
            "discord error {code}: {} (HTTP {})",
            http::quote(message.as_deref().unwrap_or_default()),
            status.as_u16()
        ),
        _ => format!(
            "discord answered {}: {}",
            status.as_u16(),
            http::quote(&answered.body)
        ),
    };
    if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        Verdict::RetryAfter {
            wait: answered.retry_after,
            reason,
        }
    } else {
        Verdict::Permanent(reason)
    }
}

/// A 429's scope: the `X-RateLimit-Scope` header (`user`, `global`,
/// `shared`), else `global` when the header `X-RateLimit-Global` or the
/// body's `global` says so; `None` when nothing does.
fn scope<'a>(answered: &'a Answered, refusal: Option<&Refusal>) -> Option<&'a str> {
    let global_header = header(answered, "x-ratelimit-global")
        .is_some_and(|value| value.eq_ignore_ascii_case("true"));
    header(answered, "x-ratelimit-scope").or((global_header
        || refusal.and_then(|refusal| refusal.global) == Some(true))
    .then_some("global"))
}

fn header<'a>(answered: &'a Answered, name: &str) -> Option<&'a str> {
    answered
        .headers
        .get(name)
        .and_then(|value| value.to_str().ok())
        .map(str::trim)
}

/// Seconds as Discord writes them (`1.5`), as a wait within [`MAX_PAUSE`].
fn seconds(value: f64) -> Option<Duration> {
    (value.is_finite() && value >= 0.0)
        .then(|| Duration::from_secs_f64(value.min(MAX_PAUSE.as_secs_f64())))
}

/// What an answer's rate-limit headers (and a 429's body) say to wait for.
#[derive(Debug, Default, PartialEq)]
struct Learned {
    /// The channel's bucket has no room for this long.
    channel: Option<Duration>,
    /// None of the bot's requests may go for this long.
    global: Option<Duration>,
    /// A 429's scope (see [`scope`]).
    scope: Option<String>,
    /// `X-RateLimit-Bucket`, for the logs.
    bucket: Option<String>,
}

/// Read an answer as a careful Discord client does: `Remaining: 0` means
/// the bucket is empty until `Reset-After` (or `Reset`); a 429 means waiting
/// its `retry_after` (the body's, else `Retry-After`), the whole bot for a
/// global one, else the channel.
fn learn(answered: &Answered) -> Learned {
    let mut learned = Learned {
        bucket: header(answered, "x-ratelimit-bucket").map(str::to_string),
        ..Learned::default()
    };
    let exhausted = header(answered, "x-ratelimit-remaining")
        .and_then(|value| value.parse::<f64>().ok())
        == Some(0.0);
    if exhausted {
        learned.channel = header(answered, "x-ratelimit-reset-after")
            .and_then(|value| value.parse().ok())
            .and_then(seconds)
            .or_else(|| {
                let reset: f64 = header(answered, "x-ratelimit-reset")?.parse().ok()?;
                let now = SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .ok()?;
                seconds(reset - now.as_secs_f64())
            });
    }
    if answered.status == StatusCode::TOO_MANY_REQUESTS {
        let refusal = serde_json::from_str::<Refusal>(&answered.body).ok();
        let scope = scope(answered, refusal.as_ref());
        let wait = refusal
            .as_ref()
            .and_then(|refusal| refusal.retry_after)
            .and_then(seconds)
            .or(answered.retry_after.map(|wait| wait.min(MAX_PAUSE)));
        if scope == Some("global") {
            learned.global = wait;
        } else {
            learned.channel = learned.channel.max(wait);
        }
        learned.scope = scope.map(str::to_string);
    }
    learned
}

/// Whether Discord counts this answer toward the invalid requests that get
/// an IP banned (401, 403, 429 other than scope `shared`).
fn counts_as_invalid(status: StatusCode, scope: Option<&str>) -> bool {
    match status {
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => true,
        StatusCode::TOO_MANY_REQUESTS => scope != Some("shared"),
        _ => false,
    }
}

/// A bot token's first part is its user id in base64; decoded by hand (the
/// standard alphabet or the URL-safe one, unpadded) to need no crate.
mod base64_free {
    pub fn bot_id_from_token(token: &str) -> Option<String> {
        let first = token.split('.').next()?.trim_end_matches('=');
        let mut bits: u32 = 0;
        let mut count = 0;
        let mut bytes = Vec::new();
        for c in first.bytes() {
            let value = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' | b'-' => 62,
                b'/' | b'_' => 63,
                _ => return None,
            };
            bits = (bits << 6) | u32::from(value);
            count += 6;
            if count >= 8 {
                count -= 8;
                bytes.push((bits >> count) as u8);
                bits &= (1 << count) - 1;
            }
        }
        let id = String::from_utf8(bytes).ok()?;
        (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then_some(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botline_shared::message::ChatKind;

    fn reply(text: &str, mentions: &[&str]) -> Reply {
        let mut reply = http::test_reply("discord", "999", "500", ChatKind::Group, text);
        reply.mentions = mentions.iter().map(|user| user.to_string()).collect();
        reply
    }

    #[test]
    fn mentions_are_rendered_and_only_they_may_ping() {
        let mut sent = reply("thanks @42, and @everyone", &["42", "7", "42", "not-an-id"]);
        sent.reply_to = Some("1100".into());
        let body = payload(&sent);
        assert_eq!(
            body["content"],
            "<@7> @not-an-id thanks <@42>, and @everyone"
        );
        assert_eq!(
            body["allowed_mentions"],
            serde_json::json!({"parse": [], "users": ["42", "7"], "replied_user": false})
        );
        assert_eq!(
            body["message_reference"],
            serde_json::json!({"message_id": "1100", "fail_if_not_exists": false})
        );
        assert_eq!(body["enforce_nonce"], true);
        let nonce = body["nonce"].as_str().unwrap();
        assert_eq!(nonce.len(), 25);
        assert_eq!(nonce, super::nonce("r1"), "stable for one reply");
        assert_ne!(nonce, super::nonce("r2"));
    }

    #[test]
    fn long_text_is_cut_to_2000_characters() {
        let body = payload(&reply(&"é".repeat(2500), &["42"]));
        let content = body["content"].as_str().unwrap();
        assert!(
            content.chars().count() <= 2000,
            "{}",
            content.chars().count()
        );
        assert!(content.starts_with("<@42> é"));
        assert!(content.ends_with('…'));
        assert_eq!(payload(&reply("short", &[]))["content"], "short");
    }

    #[test]
    fn pictures_are_embeds_and_beyond_ten_links() {
        let mut sent = reply("look", &[]);
        sent.attachments = vec![botline_shared::message::Attachment::image(
            "https://x.test/a.png",
            Some("a".into()),
        )];
        let body = payload(&sent);
        assert_eq!(body["content"], "look");
        assert_eq!(
            body["embeds"],
            serde_json::json!([{"image": {"url": "https://x.test/a.png"}}])
        );
        sent.attachments = (0..12)
            .map(|n| {
                botline_shared::message::Attachment::image(format!("https://x.test/{n}.png"), None)
            })
            .collect();
        let body = payload(&sent);
        assert_eq!(body["embeds"].as_array().unwrap().len(), 10);
        assert_eq!(
            body["content"],
            "look\nhttps://x.test/10.png\nhttps://x.test/11.png"
        );
        sent.attachments.clear();
        assert!(payload(&sent).get("embeds").is_none());
    }

    #[test]
    fn a_thread_is_where_the_reply_goes() {
        let mut sent = reply("hi", &[]);
        assert_eq!(channel(&sent), "500");
        sent.thread = Some("600".into());
        assert_eq!(channel(&sent), "600");
    }

    #[test]
    fn answers_are_judged_as_discord_means_them() {
        let check = |status, retry_after, body: &str, expected: &str| {
            assert_eq!(
                http::judged(judge, status, retry_after, body),
                expected,
                "{status} {body}"
            );
        };
        check(
            200,
            None,
            r#"{"id":"1200","channel_id":"500"}"#,
            "delivered Some(\"1200\")",
        );
        check(200, None, "not json", "delivered None");
        check(
            429,
            Some(3),
            r#"{"message":"You are being rate limited.","retry_after":0.25,"global":false}"#,
            "retry Some(250ms) discord rate limit (route) answered 429",
        );
        check(
            429,
            Some(3),
            r#"{"message":"You are being rate limited.","global":true}"#,
            "retry Some(3s) discord rate limit (global) answered 429",
        );
        check(
            502,
            None,
            "<html>bad gateway</html>",
            "retry None discord answered 502: <html>bad gateway</html>",
        );
        check(
            500,
            None,
            r#"{"code":0,"message":"500: Internal Server Error"}"#,
            "retry None discord error 0: 500: Internal Server Error (HTTP 500)",
        );
        check(
            403,
            None,
            r#"{"code":50013,"message":"Missing Permissions"}"#,
            "permanent discord error 50013: Missing Permissions (HTTP 403)",
        );
        check(
            404,
            None,
            r#"{"code":10003,"message":"Unknown Channel"}"#,
            "permanent discord error 10003: Unknown Channel (HTTP 404)",
        );
        check(401, None, "", "permanent discord answered 401: ");
    }

    /// What [`learn`] makes of an answer of `status` with `headers` and `body`.
    fn learned(status: u16, headers: &[(&'static str, &str)], body: &str) -> Learned {
        let mut map = reqwest::header::HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, value.parse().unwrap());
        }
        learn(&Answered {
            status: StatusCode::from_u16(status).unwrap(),
            retry_after: map
                .get("retry-after")
                .and_then(|value| value.to_str().ok()?.parse().ok())
                .map(Duration::from_secs),
            headers: map,
            body: body.into(),
        })
    }

    #[test]
    fn rate_limit_headers_say_what_to_wait_for() {
        let ms = |ms: u64| Some(Duration::from_millis(ms));
        let check = |status, headers: &[(&'static str, &str)], body: &str, expected: Learned| {
            assert_eq!(
                learned(status, headers, body),
                expected,
                "{status} {headers:?} {body}"
            );
        };
        let bucket = |channel, global, scope: Option<&str>| Learned {
            channel,
            global,
            scope: scope.map(str::to_string),
            bucket: Some("abcd1234".into()),
        };
        let exhausted = [
            ("x-ratelimit-limit", "5"),
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset-after", "1.5"),
            ("x-ratelimit-bucket", "abcd1234"),
        ];
        check(200, &exhausted, "{}", bucket(ms(1500), None, None));
        check(
            200,
            &[
                ("x-ratelimit-remaining", "3"),
                ("x-ratelimit-reset-after", "1.5"),
                ("x-ratelimit-bucket", "abcd1234"),
            ],
            "{}",
            bucket(None, None, None),
        );
        check(200, &[], "{}", Learned::default());
        // Without Reset-After, Reset (epoch seconds) says when.
        let soon = (SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            + Duration::from_secs(30))
        .as_secs_f64()
        .to_string();
        let from_reset = learned(
            200,
            &[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", &soon)],
            "{}",
        );
        assert!(
            from_reset.channel.unwrap() > Duration::from_secs(28),
            "{from_reset:?}"
        );
        // A garbled or far-off reset is bounded.
        check(
            200,
            &[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset-after", "-1"),
            ],
            "{}",
            Learned::default(),
        );
        check(
            200,
            &[
                ("x-ratelimit-remaining", "0"),
                ("x-ratelimit-reset-after", "1e12"),
            ],
            "{}",
            Learned {
                channel: Some(MAX_PAUSE),
                ..Learned::default()
            },
        );
        // A user 429: the longer of its retry_after and the bucket's reset.
        let mut user = exhausted.to_vec();
        user.push(("x-ratelimit-scope", "user"));
        check(
            429,
            &user,
            r#"{"retry_after": 2.25, "global": false}"#,
            bucket(ms(2250), None, Some("user")),
        );
        check(
            429,
            &user,
            r#"{"retry_after": 0.5, "global": false}"#,
            bucket(ms(1500), None, Some("user")),
        );
        // Global, by header or by body: the whole bot waits, not the bucket.
        check(
            429,
            &[
                ("retry-after", "65"),
                ("x-ratelimit-global", "true"),
                ("x-ratelimit-scope", "global"),
            ],
            r#"{"retry_after": 64.57, "global": true}"#,
            Learned {
                global: ms(64570),
                scope: Some("global".into()),
                ..Learned::default()
            },
        );
        check(
            429,
            &[("retry-after", "3")],
            r#"{"message": "You are being rate limited.", "global": true}"#,
            Learned {
                global: ms(3000),
                scope: Some("global".into()),
                ..Learned::default()
            },
        );
        // Shared: the resource is limited; that channel waits, the bot does not.
        check(
            429,
            &[
                ("x-ratelimit-remaining", "9"),
                ("x-ratelimit-scope", "shared"),
                ("x-ratelimit-bucket", "abcd1234"),
            ],
            r#"{"retry_after": 1336.57, "global": false}"#,
            bucket(ms(1_336_570), None, Some("shared")),
        );
    }

    #[test]
    fn invalid_requests_are_counted_as_discord_counts_them() {
        let check = |status: u16, scope: Option<&str>, expected: bool| {
            assert_eq!(
                counts_as_invalid(StatusCode::from_u16(status).unwrap(), scope),
                expected,
                "{status} {scope:?}"
            );
        };
        check(200, None, false);
        check(401, None, true);
        check(403, None, true);
        check(404, None, false);
        check(429, Some("user"), true);
        check(429, Some("global"), true);
        check(429, None, true);
        check(429, Some("shared"), false);
    }

    #[test]
    fn tokens_name_their_bot() {
        assert_eq!(
            bot_id_from_token("MTIzNDU2Nzg5.GhIjKl.abcdefghijklmnop").as_deref(),
            Some("123456789")
        );
        assert_eq!(bot_id_from_token("not a token"), None);
    }
}
