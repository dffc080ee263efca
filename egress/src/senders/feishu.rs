//! Platform `feishu`: replies through Feishu's (or Lark's) Open API as the
//! app's bot.
//!
//! A reply to a message (`reply_to`, the inbound `message_id`) is
//! `POST {base_url}/open-apis/im/v1/messages/{message_id}/reply`, in the
//! thread when the message came from one (`reply_in_thread`); any other reply
//! is `POST {base_url}/open-apis/im/v1/messages?receive_id_type=chat_id`. The
//! body is a `text` message whose `content` is the JSON string
//! `{"text": …}`, each mention rendered `<at user_id="ou_…"></at>` (where the
//! text has `@ou_…`, else in front), and `uuid` is the reply's id: Feishu
//! sends at most one message per uuid within an hour, so a resend after a
//! lost answer is not a second message.
//!
//! A reply with pictures is one `post` message instead (the same `uuid`, so
//! still one message however often it is sent): each picture is fetched
//! from its URL (at most `image_max_bytes`, Feishu's limit being 10 MB,
//! and it must be a picture: JPEG, PNG, WEBP, GIF, TIFF, BMP or ICO) and
//! uploaded, `POST {base_url}/open-apis/im/v1/images` (multipart:
//! `image_type=message`, `image=<the file>`, the tenant token), for its
//! `image_key`; then the post's content is the text, a paragraph per line
//! (mentions as `at` elements), and a paragraph per picture:
//!
//! ```json
//! {"zh_cn": {"content": [[{"tag": "at", "user_id": "ou_…"}, {"tag": "text", "text": " hi"}],
//!                         [{"tag": "img", "image_key": "img_v3_…"}]]}}
//! ```
//!
//! A picture whose URL answers 4xx, is too big or is not a picture sends
//! the reply to `dead` naming the URL and why; timeouts and 5xx are retried.
//! Each attempt uploads afresh (an upload makes no message). Attachments
//! other than pictures are links on lines of their own.
//!
//! `Authorization: Bearer <tenant_access_token>`, the token fetched from
//! `/open-apis/auth/v3/tenant_access_token/internal` with the app id and
//! `BOTLINE_FEISHU_APP_SECRET`, shared by every replica through the token
//! cache until shortly before its `expire`. When Feishu says the token is
//! invalid (codes 99991663, 99991664, 99991671, as the official SDKs
//! check) it is dropped and the attempt retried at once with a new one.
//!
//! Limits (settings): per chat (Feishu: 5 QPS per user and per group, shared
//! by the group's bots) and per app (50/s, 1000/min). A 429 (or code
//! 99991400) is retried after `x-ogw-ratelimit-reset` seconds; 5xx and
//! timeouts are retried; any other refusal is permanent, its reason naming
//! Feishu's code and message.

use super::http::{self, Answered, Http};
use super::media::{self, Fetcher, ImageFormat, Picture};
use super::mentions;
use super::{Attempt, Kit, Platform, Sender, Verdict};
use crate::limits::Limit;
use crate::tokens::{Fetched, TokenCache};
use botline_shared::config::secret_env;
use botline_shared::message::Reply;
use botline_shared::Error;
use futures_util::future::BoxFuture;
use reqwest::StatusCode;
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const NAME: &str = "feishu";
/// The app's App Secret.
pub const APP_SECRET_ENV: &str = "BOTLINE_FEISHU_APP_SECRET";
/// Codes saying the access token is not (or no longer) valid.
const TOKEN_INVALID: [i64; 3] = [99991663, 99991664, 99991671];
/// "request trigger frequency limit" (HTTP 429, or 400 on older APIs).
const RATE_LIMITED: i64 = 99991400;

pub const PLATFORM: Platform = Platform { name: NAME, build };

/// `[egress.platforms.feishu]`, documented in shared/defaults.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[allow(dead_code, reason = "read by enabled_platforms")]
    enabled: bool,
    app_id: String,
    base_url: String,
    timeout_ms: u64,
    per_chat_per_second: u32,
    per_app_per_second: u32,
    per_app_per_minute: u32,
    image_max_bytes: u64,
    image_private_hosts: bool,
}

fn build(table: &toml::Value, kit: &Kit) -> Result<Arc<dyn Sender>, Error> {
    let settings = super::settings(NAME, table, |settings: &Settings| {
        vec![
            ("per_chat_per_second", settings.per_chat_per_second),
            ("per_app_per_second", settings.per_app_per_second),
            ("per_app_per_minute", settings.per_app_per_minute),
        ]
    })?;
    if settings.app_id.trim().is_empty() {
        return Err(Error::config(
            "egress.platforms.feishu.app_id",
            "must be set (the app's App ID, cli_…)",
        ));
    }
    let base_url = reqwest::Url::parse(&settings.base_url)
        .ok()
        .filter(|url| !url.cannot_be_a_base())
        .ok_or_else(|| {
            Error::config(
                "egress.platforms.feishu.base_url",
                format!("{:?} is not an http(s) URL", settings.base_url),
            )
        })?;
    if settings.image_max_bytes == 0 {
        return Err(Error::config(
            "egress.platforms.feishu.image_max_bytes",
            "must be greater than 0",
        ));
    }
    Ok(Arc::new(FeishuSender {
        http: Http::new(NAME, settings.timeout_ms)?,
        fetcher: Fetcher::new(
            NAME,
            std::time::Duration::from_millis(settings.timeout_ms),
            settings.image_max_bytes,
            ImageFormat::ALL,
            settings.image_private_hosts,
        )?,
        app_secret: secret_env(kit.env, APP_SECRET_ENV, 1)?,
        token_name: format!("{NAME}:{}", settings.app_id),
        base_url,
        tokens: kit.tokens.clone(),
        settings,
    }))
}

pub struct FeishuSender {
    http: Http,
    /// Fetches a reply's pictures for upload.
    fetcher: Fetcher,
    base_url: reqwest::Url,
    app_secret: String,
    /// The token cache's name for this app's tenant_access_token.
    token_name: String,
    tokens: TokenCache,
    settings: Settings,
}

impl Sender for FeishuSender {
    fn platform(&self) -> &'static str {
        NAME
    }

    /// Paced evenly (a burst of one) per chat and per second, so no one
    /// second holds more than Feishu allows; the minute's allowance may be
    /// spent a second's worth at a time.
    fn limits(&self, reply: &Reply) -> Vec<Limit> {
        let app = format!("{NAME}:app:{}", self.settings.app_id);
        let per_second = self.settings.per_app_per_second;
        vec![
            Limit::new(
                format!("{NAME}:chat:{}", reply.chat.id),
                self.settings.per_chat_per_second,
                Duration::from_secs(1),
            )
            .with_burst(1),
            Limit::new(format!("{app}:second"), per_second, Duration::from_secs(1)).with_burst(1),
            Limit::new(
                format!("{app}:minute"),
                self.settings.per_app_per_minute,
                Duration::from_secs(60),
            )
            .with_burst(per_second.min(self.settings.per_app_per_minute)),
        ]
    }

    fn attempt<'a>(&'a self, reply: &'a Reply) -> BoxFuture<'a, Attempt> {
        Box::pin(self.send(reply))
    }
}

impl FeishuSender {
    async fn send(&self, reply: &Reply) -> Attempt {
        let refused = AtomicBool::new(false);
        let token = self
            .tokens
            .get(&self.token_name, || self.fetch_token(&refused))
            .await;
        let token = match token {
            Ok(token) => token,
            Err(error) => {
                return http::without_token(error.to_string(), refused.load(Ordering::Relaxed))
            }
        };
        let mut image_keys = Vec::new();
        for image in media::images(reply) {
            let uploaded = match self.fetcher.fetch(image.url).await {
                Ok(picture) => self.upload(&token, &picture).await,
                Err(attempt) => Err(attempt),
            };
            match uploaded {
                Ok(key) => image_keys.push(key),
                Err(attempt) => return attempt,
            }
        }
        let (url, body) = request(&self.base_url, reply, &image_keys);
        let sent = self.http.post(url).bearer_auth(&token).json(&body);
        let answered = match self.http.send(sent, NAME).await {
            Ok(answered) => answered,
            Err(attempt) => return attempt,
        };
        if let Some(attempt) = self.drop_refused_token(&answered).await {
            return attempt;
        }
        answered.attempt(judge(&answered))
    }

    /// When Feishu called the token invalid and dropping it failed, the
    /// attempt saying so.
    async fn drop_refused_token(&self, answered: &Answered) -> Option<Attempt> {
        if !ApiAnswer::read(&answered.body).token_invalid() {
            return None;
        }
        let error = self.tokens.invalidate(&self.token_name).await.err()?;
        Some(answered.attempt(Verdict::RetryAfter {
            wait: None,
            reason: format!("dropping the refused tenant_access_token failed: {error}"),
        }))
    }

    /// `picture` uploaded for a message: its `image_key`.
    async fn upload(&self, token: &str, picture: &Picture) -> Result<String, Attempt> {
        let form = reqwest::multipart::Form::new()
            .text("image_type", "message")
            .part("image", picture.part());
        let sent = self
            .http
            .post(endpoint(&self.base_url, &["im", "v1", "images"]))
            .bearer_auth(token)
            .multipart(form);
        let answered = self.http.send(sent, "feishu image upload").await?;
        if let Some(attempt) = self.drop_refused_token(&answered).await {
            return Err(attempt);
        }
        if let Some(verdict) = refusal(&answered, "feishu image upload") {
            return Err(answered.attempt(verdict));
        }
        let key = ApiAnswer::read(&answered.body)
            .data
            .and_then(|data| data.get("image_key")?.as_str().map(str::to_string))
            .filter(|key| !key.is_empty());
        key.ok_or_else(|| {
            answered.attempt(Verdict::RetryAfter {
                wait: None,
                reason: "feishu image upload answered without an image_key".into(),
            })
        })
    }

    /// A new tenant_access_token; `refused` is set when Feishu turned the
    /// app's credentials down (so retrying cannot help).
    async fn fetch_token(&self, refused: &AtomicBool) -> Result<Fetched, String> {
        let request = self
            .http
            .post(endpoint(
                &self.base_url,
                &["auth", "v3", "tenant_access_token", "internal"],
            ))
            .json(&serde_json::json!({
                "app_id": self.settings.app_id,
                "app_secret": self.app_secret,
            }));
        let answered = self
            .http
            .send(request, "feishu token endpoint")
            .await
            .map_err(http::failure)?;
        let token: TokenAnswer = serde_json::from_str(&answered.body).unwrap_or_default();
        if answered.status.is_success() && token.code == 0 && !token.tenant_access_token.is_empty()
        {
            return Ok(Fetched {
                token: token.tenant_access_token,
                expires_in: Duration::from_secs(token.expire),
            });
        }
        if !http::is_transient(answered.status) {
            refused.store(true, Ordering::Relaxed);
        }
        Err(format!(
            "feishu token endpoint answered {}: code {} {}",
            answered.status.as_u16(),
            token.code,
            http::quote(&token.msg)
        ))
    }
}

/// `{base}/open-apis/<segments>`, each segment percent-encoded.
fn endpoint(base: &reqwest::Url, segments: &[&str]) -> reqwest::Url {
    let mut url = base.clone();
    url.path_segments_mut()
        .expect("checked at start: the base URL can be a base")
        .pop_if_empty()
        .push("open-apis")
        .extend(segments);
    url
}

/// The URL and JSON body of the send for `reply`, its pictures uploaded
/// as `image_keys` (a `text` message without any, else a `post`).
pub fn request(
    base: &reqwest::Url,
    reply: &Reply,
    image_keys: &[String],
) -> (reqwest::Url, serde_json::Value) {
    let text = media::text_with_links(reply, false);
    let (msg_type, content) = if image_keys.is_empty() {
        (
            "text",
            serde_json::json!({ "text": render(&text, &reply.mentions) }),
        )
    } else {
        ("post", post(&text, &reply.mentions, image_keys))
    };
    let content = content.to_string();
    match &reply.reply_to {
        Some(message_id) => (
            endpoint(base, &["im", "v1", "messages", message_id, "reply"]),
            serde_json::json!({
                "msg_type": msg_type,
                "content": content,
                "reply_in_thread": reply.thread.is_some(),
                "uuid": reply.id,
            }),
        ),
        None => {
            let mut url = endpoint(base, &["im", "v1", "messages"]);
            url.set_query(Some("receive_id_type=chat_id"));
            let body = serde_json::json!({
                "receive_id": reply.chat.id,
                "msg_type": msg_type,
                "content": content,
                "uuid": reply.id,
            });
            (url, body)
        }
    }
}

/// A `post` message's content: a paragraph per line of `text` (its
/// mentions as `at` elements, those it does not name in front of the
/// first), then a paragraph per picture.
pub fn post(text: &str, mentions: &[String], image_keys: &[String]) -> serde_json::Value {
    let at = |user: &str| serde_json::json!({ "tag": "at", "user_id": user });
    let piece = |text: &str| serde_json::json!({ "tag": "text", "text": text });
    let mut paragraphs: Vec<Vec<serde_json::Value>> = Vec::new();
    let ahead: Vec<&String> = mentions
        .iter()
        .filter(|user| !mentions::names(text, user))
        .collect();
    if !text.is_empty() || !ahead.is_empty() {
        for (index, line) in text.split('\n').enumerate() {
            let mut elements = Vec::new();
            if index == 0 && !ahead.is_empty() {
                elements.extend(ahead.iter().map(|user| at(user)));
                elements.push(piece(" "));
            }
            for part in mentions::pieces(line, mentions) {
                elements.push(match part {
                    mentions::Piece::Text(text) => piece(text),
                    mentions::Piece::Mention(user) => at(user),
                });
            }
            if elements.is_empty() {
                elements.push(piece(""));
            }
            paragraphs.push(elements);
        }
    }
    for key in image_keys {
        paragraphs.push(vec![serde_json::json!({ "tag": "img", "image_key": key })]);
    }
    serde_json::json!({ "zh_cn": { "content": paragraphs } })
}

/// `text` with each of `mentions` as Feishu's `<at>` tag: in place of its
/// unified `@<open_id>` where the text has one, else in front.
pub fn render(text: &str, mentions: &[String]) -> String {
    mentions::place(text, mentions, |id| format!("<at user_id=\"{id}\"></at>"))
}

/// What the body of an Open API answer says.
#[derive(Debug, Default, Deserialize)]
struct ApiAnswer {
    #[serde(default)]
    code: Option<i64>,
    #[serde(default)]
    msg: String,
    /// `message_id` for a send, `image_key` for an upload.
    #[serde(default)]
    data: Option<serde_json::Value>,
}

impl ApiAnswer {
    fn read(body: &str) -> Self {
        serde_json::from_str(body).unwrap_or_default()
    }

    /// Whether Feishu says the access token is not (or no longer) valid.
    fn token_invalid(&self) -> bool {
        self.code.is_some_and(|code| TOKEN_INVALID.contains(&code))
    }
}

#[derive(Debug, Default, Deserialize)]
struct TokenAnswer {
    #[serde(default = "unknown_code")]
    code: i64,
    #[serde(default)]
    msg: String,
    #[serde(default)]
    tenant_access_token: String,
    #[serde(default)]
    expire: u64,
}

fn unknown_code() -> i64 {
    -1
}

/// What Feishu's answer to a send means.
fn judge(answered: &Answered) -> Verdict {
    refusal(answered, NAME).unwrap_or_else(|| Verdict::Delivered {
        platform_message_id: ApiAnswer::read(&answered.body)
            .data
            .and_then(|data| data.get("message_id")?.as_str().map(str::to_string)),
        writes: Vec::new(),
    })
}

/// Why an Open API call (`what`: `feishu`, `feishu image upload`) did not
/// succeed, as a verdict; `None` when it did (2xx, code 0).
fn refusal(answered: &Answered, what: &str) -> Option<Verdict> {
    let answer = ApiAnswer::read(&answered.body);
    let status = answered.status;
    let reason = || match answer.code {
        Some(code) => format!(
            "{what} answered {}: code {code} {}",
            status.as_u16(),
            http::quote(&answer.msg)
        ),
        None => format!(
            "{what} answered {}: {}",
            status.as_u16(),
            http::quote(&answered.body)
        ),
    };
    if status == StatusCode::TOO_MANY_REQUESTS || answer.code == Some(RATE_LIMITED) {
        let reset = answered
            .headers
            .get("x-ogw-ratelimit-reset")
            .and_then(|value| value.to_str().ok())
            .and_then(|value| value.trim().parse().ok())
            .map(Duration::from_secs);
        return Some(Verdict::RetryAfter {
            wait: reset.or(answered.retry_after),
            reason: reason(),
        });
    }
    if answer.token_invalid() {
        return Some(Verdict::RetryAfter {
            wait: Some(Duration::ZERO),
            reason: format!("{}; the tenant_access_token is fetched anew", reason()),
        });
    }
    if status.is_success() && answer.code == Some(0) {
        return None;
    }
    if status.is_server_error() || status == StatusCode::REQUEST_TIMEOUT {
        return Some(Verdict::RetryAfter {
            wait: None,
            reason: reason(),
        });
    }
    Some(Verdict::Permanent(reason()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use botline_shared::message::ChatKind;

    fn reply(reply_to: Option<&str>, thread: Option<&str>, mentions: &[&str]) -> Reply {
        Reply {
            id: "01J00000000000000000000000".into(),
            thread: thread.map(str::to_string),
            reply_to: reply_to.map(str::to_string),
            mentions: mentions.iter().map(|id| id.to_string()).collect(),
            ..http::test_reply(NAME, "cli_1", "oc_1", ChatKind::Group, "hi @ou_b")
        }
    }

    #[test]
    fn mentions_are_rendered_as_at_tags() {
        let check = |text: &str, mentions: &[&str], expected: &str| {
            let mentions: Vec<String> = mentions.iter().map(|id| id.to_string()).collect();
            assert_eq!(render(text, &mentions), expected, "{text:?} {mentions:?}");
        };
        check("hello", &[], "hello");
        check("hello", &["ou_a"], "<at user_id=\"ou_a\"></at> hello");
        check("hi @ou_a!", &["ou_a"], "hi <at user_id=\"ou_a\"></at>!");
        check(
            "x",
            &["ou_a", "all"],
            "<at user_id=\"ou_a\"></at> <at user_id=\"all\"></at> x",
        );
    }

    #[test]
    fn a_reply_quotes_its_message_and_stays_in_its_thread() {
        let base = reqwest::Url::parse("http://127.0.0.1:1/lark/").unwrap();
        let (url, body) = request(&base, &reply(Some("om_1"), Some("omt_1"), &["ou_a"]), &[]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:1/lark/open-apis/im/v1/messages/om_1/reply"
        );
        assert_eq!(
            body,
            serde_json::json!({
                "msg_type": "text",
                "content": r#"{"text":"<at user_id=\"ou_a\"></at> hi @ou_b"}"#,
                "reply_in_thread": true,
                "uuid": "01J00000000000000000000000",
            })
        );
        let (url, body) = request(&base, &reply(None, None, &[]), &[]);
        assert_eq!(
            url.as_str(),
            "http://127.0.0.1:1/lark/open-apis/im/v1/messages?receive_id_type=chat_id"
        );
        assert_eq!(
            body,
            serde_json::json!({
                "receive_id": "oc_1",
                "msg_type": "text",
                "content": r#"{"text":"hi @ou_b"}"#,
                "uuid": "01J00000000000000000000000",
            })
        );
    }

    #[test]
    fn with_pictures_the_reply_is_a_post_of_lines_and_images() {
        let check = |text: &str, mentions: &[&str], expected: serde_json::Value| {
            let mentions: Vec<String> = mentions.iter().map(|id| id.to_string()).collect();
            assert_eq!(
                post(text, &mentions, &["img_1".into()]),
                serde_json::json!({"zh_cn": {"content": expected}}),
                "{text:?}"
            );
        };
        check(
            "hi @ou_a!\n\nbye",
            &["ou_a", "ou_b"],
            serde_json::json!([
                [{"tag": "at", "user_id": "ou_b"}, {"tag": "text", "text": " "},
                 {"tag": "text", "text": "hi "}, {"tag": "at", "user_id": "ou_a"},
                 {"tag": "text", "text": "!"}],
                [{"tag": "text", "text": ""}],
                [{"tag": "text", "text": "bye"}],
                [{"tag": "img", "image_key": "img_1"}],
            ]),
        );
        check(
            "",
            &[],
            serde_json::json!([[{"tag": "img", "image_key": "img_1"}]]),
        );
        let base = reqwest::Url::parse("http://127.0.0.1:1/").unwrap();
        let (_, body) = request(&base, &reply(None, None, &[]), &["img_1".into()]);
        assert_eq!(body["msg_type"], "post");
        assert_eq!(
            body["uuid"], "01J00000000000000000000000",
            "one message, one uuid"
        );
        let content: serde_json::Value =
            serde_json::from_str(body["content"].as_str().unwrap()).unwrap();
        assert_eq!(content["zh_cn"]["content"][1][0]["image_key"], "img_1");
    }

    #[test]
    fn a_rate_limit_waits_for_the_reset_feishu_names() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("x-ogw-ratelimit-reset", "52".parse().unwrap());
        let limited = Answered {
            status: StatusCode::TOO_MANY_REQUESTS,
            retry_after: Some(Duration::from_secs(1)),
            headers,
            body: r#"{"code":99991400,"msg":"request trigger frequency limit"}"#.into(),
        };
        assert!(matches!(
            judge(&limited),
            Verdict::RetryAfter { wait: Some(wait), .. } if wait == Duration::from_secs(52)
        ));
    }

    fn check_judge(status: u16, body: &str, expected: &str) {
        assert_eq!(http::judged(judge, status, None, body), expected);
    }

    #[test]
    fn answers_are_judged_by_status_and_code() {
        check_judge(
            200,
            r#"{"code":0,"msg":"success","data":{"message_id":"om_9"}}"#,
            r#"delivered Some("om_9")"#,
        );
        check_judge(
            429,
            r#"{"code":99991400,"msg":"request trigger frequency limit"}"#,
            "retry None feishu answered 429: code 99991400 request trigger frequency limit",
        );
        check_judge(
            400,
            r#"{"code":99991400,"msg":"request trigger frequency limit"}"#,
            "retry None feishu answered 400: code 99991400 request trigger frequency limit",
        );
        check_judge(
            400,
            r#"{"code":99991663,"msg":"Invalid access token for authorization."}"#,
            "retry Some(0ns) feishu answered 400: code 99991663 Invalid access token for authorization.; the tenant_access_token is fetched anew",
        );
        check_judge(
            502,
            "bad gateway",
            "retry None feishu answered 502: bad gateway",
        );
        check_judge(
            400,
            r#"{"code":230002,"msg":"Bot/User can NOT be out of the chat."}"#,
            "permanent feishu answered 400: code 230002 Bot/User can NOT be out of the chat.",
        );
        check_judge(
            200,
            r#"{"code":230001,"msg":"invalid receive_id"}"#,
            "permanent feishu answered 200: code 230001 invalid receive_id",
        );
    }
}
