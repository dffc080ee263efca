//! WeCom (WeChat Work): a self-built app's messages, sent with
//! `POST {api_base_url}/cgi-bin/message/send?access_token=…`:
//!
//! ```json
//! {"touser": "<member userid>", "msgtype": "text", "agentid": 1000002,
//!  "text": {"content": "…"},
//!  "enable_duplicate_check": 1, "duplicate_check_interval": 600}   // when duplicate_check_secs > 0
//! ```
//!
//! The access token comes from `GET /cgi-bin/gettoken?corpid=…&corpsecret=…`
//! (`expires_in` 7200 s) through [`TokenCache`], so one replica fetches it
//! for all; when WeCom calls it invalid or expired (errcode 40014, 42001,
//! 40001) it is dropped and the next attempt, right away, fetches another.
//!
//! An app talks to one member at a time: the chat id is the member's userid
//! and only direct chats can be sent to. App messages have no mentions,
//! quotes or threads; the text is cut to WeCom's 2048 bytes. Attachments
//! other than pictures are links on lines of their own.
//!
//! Pictures: of WeCom's app message types that show one, `image` takes a
//! `media_id` and shows the picture itself, in full; `news` takes a
//! `picurl` but is a link card whose text is a title (128 bytes) and a
//! description (512 bytes) and which must link somewhere on tap, so the
//! reply's text would be cut and a made-up link added. So each picture is
//! fetched from its URL (a JPEG or PNG of at most `image_max_bytes`, WeCom
//! taking up to 10 MB), uploaded as temporary media, `POST
//! {api_base_url}/cgi-bin/media/upload?access_token=…&type=image`
//! (multipart, the file in field `media`), and sent as `{"msgtype":
//! "image", "image": {"media_id": …}}`; then the text follows as a text
//! message. A reply of several messages is sent part by part through
//! [`crate::parts`], so a retry sends only the messages not yet out. A
//! picture whose URL answers 4xx, is too big or is not a JPEG or PNG sends
//! the reply to `dead` naming the URL and why.
//!
//! Every answer is HTTP 200 with `errcode`: 0 is delivered (`msgid` kept);
//! the frequency limits (45009, 45011, 45033) and "system busy" (-1) are
//! retried after `throttled_retry_ms`, since WeCom gives no hint; any other
//! errcode, or a member WeCom calls invalid (`invaliduser`), is permanent.
//! Limits, shared by every replica: per member per minute and per hour (WeCom
//! silently drops what is beyond them), and per app.

use super::http::{self, Answered, Http};
use super::media::{self, Fetcher, ImageFormat, Picture};
use super::{Attempt, Kit, Platform, Sender, Verdict};
use crate::limits::Limit;
use crate::parts::Parts;
use crate::tokens::{Fetched, TokenCache, TokenError};
use botline_shared::config::secret_env;
use botline_shared::message::{ChatKind, Reply};
use botline_shared::Error;
use futures_util::future::BoxFuture;
use serde::Deserialize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const PLATFORM: Platform = Platform {
    name: "wecom",
    build,
};

/// The app's Secret (corpsecret).
pub const SECRET_ENV: &str = "BOTLINE_WECOM_SECRET";
/// WeCom's limit on a text message's content, in bytes.
pub const MAX_TEXT_BYTES: usize = 2048;
/// WeCom's errcodes for an access token it no longer takes.
const TOKEN_REFUSED: [i64; 3] = [40014, 42001, 40001];
/// WeCom's errcodes for "too often" and "busy": worth another try later.
const THROTTLED: [i64; 4] = [-1, 45009, 45011, 45033];
/// The kinds of picture WeCom's image media takes.
const IMAGE_FORMATS: &[ImageFormat] = &[ImageFormat::Jpeg, ImageFormat::Png];

/// `[egress.platforms.wecom]`, documented in shared/defaults.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeComSettings {
    #[allow(dead_code)]
    enabled: bool,
    api_base_url: String,
    corp_id: String,
    agent_id: u64,
    timeout_ms: u64,
    member_per_minute: u32,
    member_per_hour: u32,
    app_per_minute: u32,
    throttled_retry_ms: u64,
    duplicate_check_secs: u64,
    image_max_bytes: u64,
    image_private_hosts: bool,
}

pub struct WeComSender {
    http: Http,
    send_url: reqwest::Url,
    /// `cgi-bin/media/upload?type=image`, the access token added per call.
    upload_url: reqwest::Url,
    fetcher: Fetcher,
    parts: Parts,
    token_url: reqwest::Url,
    tokens: TokenCache,
    /// The token's name in the cache, and the prefix of the limits' names:
    /// `wecom:<corp id>:<agent id>`.
    app: String,
    agent_id: u64,
    member_per_minute: u32,
    member_per_hour: u32,
    app_per_minute: u32,
    throttled_retry: Duration,
    duplicate_check_secs: u64,
}

fn build(table: &toml::Value, kit: &Kit) -> Result<Arc<dyn Sender>, Error> {
    let settings = super::settings(PLATFORM.name, table, |settings: &WeComSettings| {
        vec![
            ("member_per_minute", settings.member_per_minute),
            ("member_per_hour", settings.member_per_hour),
            ("app_per_minute", settings.app_per_minute),
        ]
    })?;
    let setting = |name: &str| format!("egress.platforms.wecom.{name}");
    if settings.corp_id.trim().is_empty() {
        return Err(Error::config(
            setting("corp_id"),
            "must be the corp id (企业ID)",
        ));
    }
    if settings.agent_id == 0 {
        return Err(Error::config(
            setting("agent_id"),
            "must be the app's AgentId",
        ));
    }
    if settings.timeout_ms == 0 {
        return Err(Error::config(
            setting("timeout_ms"),
            "must be greater than 0",
        ));
    }
    let secret = secret_env(kit.env, SECRET_ENV, 16)?;
    let base = reqwest::Url::parse(&settings.api_base_url)
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https"))
        .ok_or_else(|| Error::config(setting("api_base_url"), "must be an http(s) URL"))?;
    let endpoint = |path: &str| {
        base.join(path)
            .map_err(|error| Error::config(setting("api_base_url"), error))
    };
    let send_url = endpoint("cgi-bin/message/send")?;
    let mut upload_url = endpoint("cgi-bin/media/upload")?;
    upload_url.query_pairs_mut().append_pair("type", "image");
    if settings.image_max_bytes == 0 {
        return Err(Error::config(
            setting("image_max_bytes"),
            "must be greater than 0",
        ));
    }
    let mut token_url = endpoint("cgi-bin/gettoken")?;
    token_url
        .query_pairs_mut()
        .append_pair("corpid", &settings.corp_id)
        .append_pair("corpsecret", &secret);
    Ok(Arc::new(WeComSender {
        http: Http::new(PLATFORM.name, settings.timeout_ms)?,
        send_url,
        upload_url,
        fetcher: Fetcher::new(
            PLATFORM.name,
            Duration::from_millis(settings.timeout_ms),
            settings.image_max_bytes,
            IMAGE_FORMATS,
            settings.image_private_hosts,
        )?,
        parts: kit.parts.clone(),
        token_url,
        tokens: kit.tokens.clone(),
        app: format!("wecom:{}:{}", settings.corp_id, settings.agent_id),
        agent_id: settings.agent_id,
        member_per_minute: settings.member_per_minute,
        member_per_hour: settings.member_per_hour,
        app_per_minute: settings.app_per_minute,
        throttled_retry: Duration::from_millis(settings.throttled_retry_ms),
        duplicate_check_secs: settings.duplicate_check_secs,
    }))
}

impl Sender for WeComSender {
    fn platform(&self) -> &'static str {
        PLATFORM.name
    }

    /// Paced evenly (no bursts): WeCom counts per minute and per hour, and
    /// a burst followed by the steady pace would pass its count.
    fn limits(&self, reply: &Reply) -> Vec<Limit> {
        let member = &reply.chat.id;
        let minute = Duration::from_secs(60);
        vec![
            Limit::new(format!("{}:app", self.app), self.app_per_minute, minute).with_burst(1),
            Limit::new(
                format!("{}:member:{member}", self.app),
                self.member_per_minute,
                minute,
            )
            .with_burst(1),
            Limit::new(
                format!("{}:member-hour:{member}", self.app),
                self.member_per_hour,
                Duration::from_secs(3600),
            )
            .with_burst(1),
        ]
    }

    fn attempt<'a>(&'a self, reply: &'a Reply) -> BoxFuture<'a, Attempt> {
        Box::pin(self.send(reply))
    }
}

impl WeComSender {
    async fn send(&self, reply: &Reply) -> Attempt {
        if reply.chat.kind != ChatKind::Direct {
            return Attempt {
                response: None,
                verdict: Verdict::Permanent(format!(
                    "wecom: an app sends to one member; chat {} is not a direct chat",
                    reply.chat.id
                )),
            };
        }
        let plan = plan(reply);
        let limits = self.limits(reply);
        self.parts
            .send(PLATFORM.name, reply, &limits, &plan, |part| {
                Box::pin(self.send_part(reply, part))
            })
            .await
    }

    /// One message of a reply: a picture (fetched, uploaded) or the text.
    async fn send_part(&self, reply: &Reply, part: &Part) -> Attempt {
        let token = match self.access_token().await {
            Ok(token) => token,
            Err(attempt) => return attempt,
        };
        let content = match part {
            Part::Text(text) => Content::Text(text),
            Part::Image(url) => {
                let uploaded = match self.fetcher.fetch(url).await {
                    Ok(picture) => self.upload(&token, &picture).await,
                    Err(attempt) => Err(attempt),
                };
                match uploaded {
                    Ok(media_id) => Content::Image(media_id),
                    Err(attempt) => return attempt,
                }
            }
        };
        let body = payload(reply, self.agent_id, self.duplicate_check_secs, &content);
        let mut url = self.send_url.clone();
        url.query_pairs_mut().append_pair("access_token", &token);
        let request = self.http.post(url).json(&body);
        let answered = match self.http.send(request, PLATFORM.name).await {
            Ok(answered) => answered,
            Err(attempt) => return attempt,
        };
        let verdict = match read_answer(&answered, "message/send") {
            Err(verdict) => verdict,
            Ok(answer) if answer.errcode == 0 => delivered(answer),
            Ok(answer) => self.refused(&answer, "message/send").await,
        };
        answered.attempt(verdict)
    }

    /// `picture` uploaded as temporary image media: its `media_id`.
    async fn upload(&self, token: &str, picture: &Picture) -> Result<String, Attempt> {
        let mut url = self.upload_url.clone();
        url.query_pairs_mut().append_pair("access_token", token);
        let form = reqwest::multipart::Form::new().part("media", picture.part());
        let request = self.http.post(url).multipart(form);
        let answered = self.http.send(request, PLATFORM.name).await?;
        let verdict = match read_answer(&answered, "media/upload") {
            Err(verdict) => verdict,
            Ok(answer) if answer.errcode == 0 => {
                match answer.media_id.filter(|id| !id.is_empty()) {
                    Some(media_id) => return Ok(media_id),
                    None => Verdict::RetryAfter {
                        wait: None,
                        reason: "wecom media/upload answered without a media_id".into(),
                    },
                }
            }
            Ok(answer) => self.refused(&answer, "media/upload").await,
        };
        Err(answered.attempt(verdict))
    }

    /// What a refusal of `endpoint` means: a token WeCom no longer takes
    /// is dropped and the attempt retried at once; the rest as [`failed`].
    async fn refused(&self, answer: &WeComAnswer, endpoint: &str) -> Verdict {
        if !TOKEN_REFUSED.contains(&answer.errcode) {
            return failed(answer, endpoint, self.throttled_retry);
        }
        let reason = answer.reason(endpoint);
        match self.tokens.invalidate(&self.app).await {
            Ok(()) => Verdict::RetryAfter {
                wait: Some(Duration::ZERO),
                reason,
            },
            Err(error) => Verdict::RetryAfter {
                wait: None,
                reason: format!("{reason}; dropping the token failed: {error}"),
            },
        }
    }

    /// The app's access token, from the cache or fetched (by this replica
    /// or another); or the attempt that failed to get one.
    async fn access_token(&self) -> Result<String, Attempt> {
        let failure = Mutex::new(None);
        let got = self
            .tokens
            .get(&self.app, || async {
                self.fetch_token().await.map_err(|attempt| {
                    let reason = match &attempt.verdict {
                        Verdict::RetryAfter { reason, .. } | Verdict::Permanent(reason) => {
                            reason.clone()
                        }
                        Verdict::Delivered { .. } => String::new(),
                    };
                    *failure.lock().expect("not poisoned") = Some(attempt);
                    reason
                })
            })
            .await;
        got.map_err(|error| match error {
            TokenError::Fetch(reason) => {
                failure
                    .into_inner()
                    .expect("not poisoned")
                    .unwrap_or(Attempt {
                        response: None,
                        verdict: Verdict::RetryAfter { wait: None, reason },
                    })
            }
            TokenError::Redis(error) => Attempt {
                response: None,
                verdict: Verdict::RetryAfter {
                    wait: None,
                    reason: format!("wecom access token cache: {error}"),
                },
            },
        })
    }

    async fn fetch_token(&self) -> Result<Fetched, Attempt> {
        let request = self.http.get(self.token_url.clone());
        let answered = self.http.send(request, PLATFORM.name).await?;
        let answer =
            read_answer(&answered, "gettoken").map_err(|verdict| answered.attempt(verdict))?;
        match (answer.errcode, &answer.access_token) {
            (0, Some(token)) if !token.is_empty() => Ok(Fetched {
                token: token.clone(),
                expires_in: Duration::from_secs(answer.expires_in.unwrap_or(7200)),
            }),
            (0, _) => Err(answered.attempt(Verdict::RetryAfter {
                wait: None,
                reason: "wecom gettoken answered without an access_token".into(),
            })),
            _ => Err(answered.attempt(failed(&answer, "gettoken", self.throttled_retry))),
        }
    }
}

/// A refusal other than of the token: retried after `throttled_retry` if
/// WeCom is busy or we are too fast, never otherwise.
fn failed(answer: &WeComAnswer, endpoint: &str, throttled_retry: Duration) -> Verdict {
    let reason = answer.reason(endpoint);
    if THROTTLED.contains(&answer.errcode) {
        Verdict::RetryAfter {
            wait: Some(throttled_retry),
            reason,
        }
    } else {
        Verdict::Permanent(reason)
    }
}

/// One message of a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// A picture, by its URL.
    Image(String),
    /// The text, cut to WeCom's length.
    Text(String),
}

/// The messages that send `reply`: its pictures, then its text.
pub fn plan(reply: &Reply) -> Vec<Part> {
    let mut parts: Vec<Part> = media::images(reply)
        .iter()
        .map(|image| Part::Image(image.url.to_string()))
        .collect();
    let text = media::text_with_links(reply, false);
    if parts.is_empty() || !text.is_empty() {
        parts.push(Part::Text(cut(&text, MAX_TEXT_BYTES)));
    }
    parts
}

/// What one `message/send` carries.
pub enum Content<'a> {
    Text(&'a str),
    Image(String),
}

/// The `message/send` body for one message of `reply` (documented at the
/// top of this module).
pub fn payload(
    reply: &Reply,
    agent_id: u64,
    duplicate_check_secs: u64,
    content: &Content,
) -> serde_json::Value {
    let mut body = serde_json::json!({
        "touser": reply.chat.id,
        "agentid": agent_id,
    });
    match content {
        Content::Text(text) => {
            body["msgtype"] = "text".into();
            body["text"] = serde_json::json!({ "content": text });
        }
        Content::Image(media_id) => {
            body["msgtype"] = "image".into();
            body["image"] = serde_json::json!({ "media_id": media_id });
        }
    }
    if duplicate_check_secs > 0 {
        body["enable_duplicate_check"] = 1.into();
        body["duplicate_check_interval"] = duplicate_check_secs.into();
    }
    body
}

/// At most `limit` bytes of `text`, cut on a character boundary with `…`.
fn cut(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_string();
    }
    let mut end = limit - '…'.len_utf8();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A WeCom API answer, as far as botline reads it.
#[derive(Debug, Deserialize)]
struct WeComAnswer {
    errcode: i64,
    #[serde(default)]
    errmsg: String,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
    #[serde(default)]
    msgid: Option<String>,
    #[serde(default)]
    invaliduser: Option<String>,
    /// media/upload's answer.
    #[serde(default)]
    media_id: Option<String>,
}

impl WeComAnswer {
    fn reason(&self, endpoint: &str) -> String {
        format!(
            "wecom {endpoint} errcode {}: {}",
            self.errcode,
            http::quote(&self.errmsg)
        )
    }
}

/// The answer's JSON, or the verdict when the status or the body already decides.
fn read_answer(answered: &Answered, endpoint: &str) -> Result<WeComAnswer, Verdict> {
    if let Some(verdict) = answered.status_verdict(PLATFORM.name) {
        return Err(verdict);
    }
    serde_json::from_str(&answered.body).map_err(|_| Verdict::RetryAfter {
        wait: None,
        reason: format!(
            "wecom {endpoint} answered without its JSON: {}",
            http::quote(&answered.body)
        ),
    })
}

fn delivered(answer: WeComAnswer) -> Verdict {
    match answer.invaliduser.filter(|users| !users.is_empty()) {
        Some(users) => Verdict::Permanent(format!(
            "wecom message/send: the app cannot reach member {} (invaliduser)",
            http::quote(&users)
        )),
        None => Verdict::Delivered {
            platform_message_id: answer.msgid.filter(|id| !id.is_empty()),
            writes: Vec::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_texts_are_cut_to_whole_characters_within_the_limit() {
        assert_eq!(cut("short", 10), "short");
        assert_eq!(cut("0123456789", 10), "0123456789");
        assert_eq!(cut("0123456789a", 10), "0123456…");
        // 3-byte characters: 2 whole ones and the ellipsis fit in 9 bytes.
        assert_eq!(cut("你好世界", 9), "你好…");
        assert_eq!(cut("你好世界", 8), "你…");
        let long = "字".repeat(1000);
        let cut_long = cut(&long, MAX_TEXT_BYTES);
        assert!(cut_long.len() <= MAX_TEXT_BYTES);
        assert!(cut_long.ends_with('…'));
    }

    #[test]
    fn pictures_go_first_then_the_text() {
        let mut reply = http::test_reply("wecom", "1000002", "zhangsan", ChatKind::Direct, "shop");
        assert_eq!(plan(&reply), [Part::Text("shop".into())]);
        reply.attachments = vec![
            botline_shared::message::Attachment::image("https://x.test/a.png", None),
            botline_shared::message::Attachment::image("https://x.test/b.jpg", None),
        ];
        assert_eq!(
            plan(&reply),
            [
                Part::Image("https://x.test/a.png".into()),
                Part::Image("https://x.test/b.jpg".into()),
                Part::Text("shop".into()),
            ]
        );
        reply.text.clear();
        assert_eq!(plan(&reply).len(), 2, "no empty text after the pictures");
        assert_eq!(
            payload(&reply, 1000002, 600, &Content::Image("MEDIA_1".into())),
            serde_json::json!({
                "touser": "zhangsan", "agentid": 1000002, "msgtype": "image",
                "image": {"media_id": "MEDIA_1"},
                "enable_duplicate_check": 1, "duplicate_check_interval": 600,
            })
        );
        assert_eq!(
            payload(&reply, 1000002, 0, &Content::Text("hi")),
            serde_json::json!({
                "touser": "zhangsan", "agentid": 1000002, "msgtype": "text",
                "text": {"content": "hi"},
            })
        );
    }

    fn verdict(errcode: i64, invaliduser: &str) -> String {
        let answer = WeComAnswer {
            errcode,
            errmsg: "msg".into(),
            access_token: None,
            expires_in: None,
            msgid: Some("m1".into()),
            invaliduser: Some(invaliduser.into()),
            media_id: None,
        };
        let sender_verdict = if errcode == 0 {
            delivered(answer)
        } else {
            failed(&answer, "message/send", Duration::from_secs(10))
        };
        match sender_verdict {
            Verdict::Delivered {
                platform_message_id,
                ..
            } => format!("delivered {}", platform_message_id.unwrap_or_default()),
            Verdict::RetryAfter { wait, reason } => format!("retry {wait:?} {reason}"),
            Verdict::Permanent(reason) => format!("permanent {reason}"),
        }
    }

    #[test]
    fn errcodes_decide_the_verdict() {
        assert_eq!(verdict(0, ""), "delivered m1");
        assert_eq!(
            verdict(0, "someone"),
            "permanent wecom message/send: the app cannot reach member someone (invaliduser)"
        );
        assert_eq!(
            verdict(45009, ""),
            "retry Some(10s) wecom message/send errcode 45009: msg"
        );
        assert_eq!(
            verdict(-1, ""),
            "retry Some(10s) wecom message/send errcode -1: msg"
        );
        assert_eq!(
            verdict(81013, ""),
            "permanent wecom message/send errcode 81013: msg"
        );
    }
}
