//! Slack: each reply is one `POST <api>/chat.postMessage` with
//! `Authorization: Bearer <BOTLINE_SLACK_BOT_TOKEN>`.
//!
//! ```json
//! {
//!   "channel": "C123ABC456",
//!   "text": "<@U0LAN0Z89> your order &lt;A-1&gt; has shipped",
//!   "thread_ts": "1355517523.000005"     // the message's thread, if any
//! }
//! ```
//!
//! The text is escaped (`&`, `<`, `>`); each user to mention becomes
//! `<@U…>` in place of its `@U…` in the text, or else in front of it.
//! Attachments other than pictures are links on lines of their own.
//!
//! A reply with pictures (at most [`MAX_IMAGES`]; any beyond are links in
//! the text) is Block Kit: the text in `section` blocks (`mrkdwn`, at most
//! 3000 characters each, split at a paragraph, line, sentence or space),
//! then one `image` block per picture, Slack fetching the URL itself;
//! `text` stays, as the notification's fallback:
//!
//! ```json
//! {"channel": "C123ABC456", "text": "Our shop:",
//!  "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "Our shop:"}},
//!             {"type": "image", "image_url": "https://…/shop.jpg", "alt_text": "the shop"}]}
//! ```
//!
//! A
//! reply goes into the thread of the message it answers; with
//! `thread_replies`, a channel message outside a thread is answered in a
//! new thread under it (its `ts`).
//!
//! Answers: `{"ok": true, "ts": …}` is delivered (the `ts` is the platform
//! message id); HTTP 429 waits `Retry-After`; 5xx and timeouts are retried;
//! `ok: false` is permanent, its reason naming Slack's `error` code —
//! except `ratelimited` and `service_unavailable`, retried. Errors such as
//! `internal_error` or `fatal_error` are not retried: Slack says the message
//! may have been posted all the same. Slack has no idempotency field;
//! egress's sent keys keep a reply from being sent twice.

use super::http::{self, Answered, Http};
use super::mentions::{self, escape};
use super::{media, split};
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
    name: "slack",
    build,
};

/// The bot token (`xoxb-…`), with the `chat:write` scope.
pub const TOKEN_ENV: &str = "BOTLINE_SLACK_BOT_TOKEN";
/// Slack's `error` codes worth another attempt.
const RETRYABLE_ERRORS: &[&str] = &["ratelimited", "service_unavailable"];
/// Most `image` blocks a reply gets (Slack allows 50 blocks in all).
pub const MAX_IMAGES: usize = 10;
/// Slack's longest `section` text, in characters.
const MAX_SECTION_CHARS: usize = 3000;
/// Slack's longest `alt_text`, and `image_url`, in characters.
const MAX_ALT_CHARS: usize = 2000;
const MAX_IMAGE_URL_CHARS: usize = 3000;

/// `[egress.platforms.slack]`, documented in shared/defaults.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SlackSettings {
    /// Read by `enabled_platforms`; named here so `deny_unknown_fields` accepts it.
    #[serde(rename = "enabled")]
    _enabled: bool,
    api_base_url: String,
    timeout_ms: u64,
    channel_per_second: u32,
    channel_burst: u32,
    bot_per_minute: u32,
    thread_replies: bool,
}

pub struct SlackSender {
    http: Http,
    url: reqwest::Url,
    token: String,
    channel_per_second: u32,
    channel_burst: u32,
    bot_per_minute: u32,
    thread_replies: bool,
}

fn build(table: &toml::Value, kit: &Kit) -> Result<Arc<dyn Sender>, Error> {
    let settings = super::settings(PLATFORM.name, table, |settings: &SlackSettings| {
        vec![
            ("channel_per_second", settings.channel_per_second),
            ("channel_burst", settings.channel_burst),
            ("bot_per_minute", settings.bot_per_minute),
        ]
    })?;
    let token = secret_env(kit.env, TOKEN_ENV, 1)?;
    if !token.starts_with("xox") {
        return Err(Error::config(
            TOKEN_ENV,
            "is not a Slack token (xoxb-…, the bot user OAuth token)",
        ));
    }
    let base = settings.api_base_url.trim_end_matches('/');
    let url = reqwest::Url::parse(&format!("{base}/chat.postMessage"))
        .map_err(|error| Error::config("egress.platforms.slack.api_base_url", error))?;
    Ok(Arc::new(SlackSender {
        http: Http::new(PLATFORM.name, settings.timeout_ms)?,
        url,
        token,
        channel_per_second: settings.channel_per_second,
        channel_burst: settings.channel_burst,
        bot_per_minute: settings.bot_per_minute,
        thread_replies: settings.thread_replies,
    }))
}

impl Sender for SlackSender {
    fn platform(&self) -> &'static str {
        PLATFORM.name
    }

    /// The workspace's allowance (per bot) and the channel's pace.
    fn limits(&self, reply: &Reply) -> Vec<Limit> {
        vec![
            Limit::new(
                format!("slack:{}", reply.bot),
                self.bot_per_minute,
                Duration::from_secs(60),
            )
            .with_burst(1),
            Limit::new(
                format!("slack:{}:channel:{}", reply.bot, reply.chat.id),
                self.channel_per_second,
                Duration::from_secs(1),
            )
            .with_burst(self.channel_burst),
        ]
    }

    fn attempt<'a>(&'a self, reply: &'a Reply) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            let request = self
                .http
                .post(self.url.clone())
                .bearer_auth(&self.token)
                .json(&payload(reply, self.thread_replies));
            self.http.attempt(request, PLATFORM.name, judge).await
        })
    }
}

/// `text` escaped, with `mentions` as `<@U…>`.
fn render(text: &str, mentions: &[String]) -> String {
    mentions::place(&escape(text), mentions, |user| format!("<@{user}>"))
}

/// The `chat.postMessage` body for `reply` (documented at the top of this module).
pub fn payload(reply: &Reply, thread_replies: bool) -> serde_json::Value {
    // Pictures Slack can show; the rest go in the text as links.
    let mut images = Vec::new();
    let mut beyond = Vec::new();
    for image in media::images(reply) {
        if image.url.chars().count() <= MAX_IMAGE_URL_CHARS && images.len() < MAX_IMAGES {
            images.push(image);
        } else {
            beyond.push(image);
        }
    }
    let mut plain = media::text_with_links(reply, false);
    media::append_image_links(&mut plain, &beyond);
    let text = render(&plain, &reply.mentions);
    let mut body = serde_json::json!({ "channel": reply.chat.id, "text": text });
    if !images.is_empty() {
        if plain.is_empty() && reply.mentions.is_empty() {
            // The notification still says something.
            let alts: Vec<&str> = images.iter().filter_map(|image| image.alt).collect();
            body["text"] = if alts.is_empty() {
                "image".into()
            } else {
                escape(&alts.join(", ")).into()
            };
        }
        body["blocks"] = blocks(reply, &plain, &images).into();
    }
    let thread = reply.thread.as_ref().or(reply
        .reply_to
        .as_ref()
        .filter(|_| thread_replies && reply.chat.kind != ChatKind::Direct));
    if let Some(thread) = thread {
        body["thread_ts"] = thread.as_str().into();
    }
    body
}

/// The Block Kit blocks of a reply with pictures: its text in sections,
/// then an image block per picture.
fn blocks(reply: &Reply, plain: &str, images: &[media::Image]) -> Vec<serde_json::Value> {
    let growth = split::length(&render(plain, &reply.mentions), split::chars)
        .saturating_sub(split::length(plain, split::chars));
    let mut blocks: Vec<serde_json::Value> = if plain.is_empty() && reply.mentions.is_empty() {
        Vec::new()
    } else {
        split::render_pieces(
            plain,
            &reply.mentions,
            MAX_SECTION_CHARS,
            split::chars,
            growth,
            render,
        )
        .into_iter()
        .map(
            |text| serde_json::json!({"type": "section", "text": {"type": "mrkdwn", "text": text}}),
        )
        .collect()
    };
    for image in images {
        let alt: String = image
            .alt
            .unwrap_or("image")
            .chars()
            .take(MAX_ALT_CHARS)
            .collect();
        blocks.push(serde_json::json!({"type": "image", "image_url": image.url, "alt_text": alt}));
    }
    blocks
}

/// A Web API answer.
#[derive(Debug, Deserialize)]
struct ApiAnswer {
    ok: bool,
    #[serde(default)]
    ts: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// What Slack's answer means.
fn judge(answered: &Answered) -> Verdict {
    let status = answered.status;
    let retry = |reason: String| Verdict::RetryAfter {
        wait: answered.retry_after,
        reason,
    };
    let answer = serde_json::from_str::<ApiAnswer>(&answered.body).ok();
    if status == StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
        let code = answer.and_then(|answer| answer.error).unwrap_or_default();
        return retry(format!("slack answered {} {code}", status.as_u16()));
    }
    match answer {
        Some(answer) if answer.ok && status.is_success() => Verdict::Delivered {
            platform_message_id: answer.ts,
            writes: Vec::new(),
        },
        Some(answer) => {
            let code = answer.error.unwrap_or_else(|| "unknown_error".into());
            let reason = format!("slack error {code} (HTTP {})", status.as_u16());
            if RETRYABLE_ERRORS.contains(&code.as_str()) {
                retry(reason)
            } else {
                Verdict::Permanent(reason)
            }
        }
        None => Verdict::Permanent(format!(
            "slack answered {} without Web API JSON: {}",
            status.as_u16(),
            http::quote(&answered.body)
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botline_shared::message::Attachment;

    fn reply(kind: ChatKind, text: &str, mentions: &[&str]) -> Reply {
        Reply {
            reply_to: Some("1355517523.000005".into()),
            mentions: mentions.iter().map(|user| user.to_string()).collect(),
            ..http::test_reply("slack", "UBOT", "C123ABC456", kind, text)
        }
    }

    #[test]
    fn payloads_escape_text_mention_users_and_keep_threads() {
        let sent = reply(ChatKind::Group, "thanks @U1, 1 < 2 & <@U2>", &["U1", "U3"]);
        assert_eq!(
            payload(&sent, false),
            serde_json::json!({
                "channel": "C123ABC456",
                "text": "<@U3> thanks <@U1>, 1 &lt; 2 &amp; &lt;@U2&gt;",
            })
        );
        assert_eq!(
            payload(&sent, true)["thread_ts"],
            "1355517523.000005",
            "a new thread under the message"
        );
        let direct = reply(ChatKind::Direct, "hi", &[]);
        assert!(payload(&direct, true).get("thread_ts").is_none());
        let mut threaded = reply(ChatKind::Group, "hi", &[]);
        threaded.thread = Some("1355517000.000001".into());
        assert_eq!(payload(&threaded, false)["thread_ts"], "1355517000.000001");
    }

    #[test]
    fn pictures_are_image_blocks_after_the_text_in_sections() {
        let mut sent = reply(ChatKind::Group, "shop <A> & co", &["U1"]);
        sent.attachments = vec![
            Attachment::image("https://x.test/shop.jpg", Some("the shop".into())),
            Attachment::image("https://x.test/map.png", None),
        ];
        assert_eq!(
            payload(&sent, false),
            serde_json::json!({
                "channel": "C123ABC456",
                "text": "<@U1> shop &lt;A&gt; &amp; co",
                "blocks": [
                    {"type": "section", "text": {"type": "mrkdwn", "text": "<@U1> shop &lt;A&gt; &amp; co"}},
                    {"type": "image", "image_url": "https://x.test/shop.jpg", "alt_text": "the shop"},
                    {"type": "image", "image_url": "https://x.test/map.png", "alt_text": "image"},
                ],
            })
        );
        // No text: no section, and the notification names the picture.
        sent.text.clear();
        sent.mentions.clear();
        sent.attachments.truncate(1);
        assert_eq!(
            payload(&sent, false),
            serde_json::json!({
                "channel": "C123ABC456",
                "text": "the shop",
                "blocks": [{"type": "image", "image_url": "https://x.test/shop.jpg", "alt_text": "the shop"}],
            })
        );
        // A long text is several sections of at most 3000 characters.
        sent.text = format!("{}\n\n{}", "a".repeat(2500), "b".repeat(2500));
        let blocks = payload(&sent, false)["blocks"].as_array().unwrap().clone();
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[0]["text"]["text"], "a".repeat(2500));
        assert_eq!(blocks[1]["text"]["text"], "b".repeat(2500));
        // Beyond ten pictures, the rest are links in the text.
        sent.text = "many".into();
        sent.attachments = (0..12)
            .map(|n| Attachment::image(format!("https://x.test/{n}.png"), None))
            .collect();
        let body = payload(&sent, false);
        assert_eq!(body["blocks"].as_array().unwrap().len(), 11);
        assert_eq!(
            body["text"],
            "many\nhttps://x.test/10.png\nhttps://x.test/11.png"
        );
        // Without pictures, no blocks at all.
        sent.attachments.clear();
        assert!(payload(&sent, false).get("blocks").is_none());
    }

    fn check_judge(status: u16, retry_after: Option<u64>, body: &str, expected: &str) {
        assert_eq!(
            http::judged(judge, status, retry_after, body),
            expected,
            "{status} {body}"
        );
    }

    #[test]
    fn answers_are_judged_by_status_and_error_code() {
        check_judge(
            200,
            None,
            r#"{"ok":true,"channel":"C123ABC456","ts":"1503435956.000247","message":{"text":"hi"}}"#,
            r#"delivered Some("1503435956.000247")"#,
        );
        check_judge(
            429,
            Some(30),
            r#"{"ok":false,"error":"ratelimited"}"#,
            "retry Some(30s) slack answered 429 ratelimited",
        );
        check_judge(
            200,
            None,
            r#"{"ok":false,"error":"ratelimited"}"#,
            "retry None slack error ratelimited (HTTP 200)",
        );
        check_judge(
            200,
            None,
            r#"{"ok":false,"error":"channel_not_found"}"#,
            "permanent slack error channel_not_found (HTTP 200)",
        );
        check_judge(
            200,
            None,
            r#"{"ok":false,"error":"invalid_auth"}"#,
            "permanent slack error invalid_auth (HTTP 200)",
        );
        check_judge(
            200,
            None,
            r#"{"ok":false,"error":"fatal_error"}"#,
            "permanent slack error fatal_error (HTTP 200)",
        );
        check_judge(
            503,
            None,
            r#"{"ok":false,"error":"service_unavailable"}"#,
            "retry None slack answered 503 service_unavailable",
        );
        check_judge(502, None, "<html>", "retry None slack answered 502 ");
        check_judge(
            404,
            None,
            "not found",
            "permanent slack answered 404 without Web API JSON: not found",
        );
    }
}
