//! Platform `dingtalk`: replies as the robot that received the message.
//!
//! While the message's session webhook (`platform_data`, from ingest) is
//! valid for a few more seconds, the reply is POSTed to it:
//! `{"msgtype": "text", "text": {"content": …}, "at": {"atUserIds": […],
//! "isAtAll": …}}`, each mentioned user also written `@<userId>` in the text
//! (where the text does not have it, in front), which is how DingTalk shows
//! a mention. A reply with pictures is a `markdown` message instead:
//! `{"msgtype": "markdown", "markdown": {"title": …, "text": "…\n\n![alt](https://…)"},
//! "at": …}`, DingTalk fetching each picture's URL itself (the title, shown
//! in the conversation list, is the text's first line). Attachments other
//! than pictures are links on lines of their own.
//! Only URLs under `session_webhook_base` are used, since the
//! callback's signature does not cover its body. `errcode` 130101 (sent
//! too fast: DingTalk then refuses for a while and says not how long) is
//! retried after `throttled_retry_ms`.
//!
//! Once the session webhook has expired (or without one) the robot API is
//! used, when `app_key` is set: `POST {api_base_url}/v1.0/robot/groupMessages/send`
//! for a group, `/v1.0/robot/oToMessages/batchSend` for a direct chat (to
//! the sender's user id from `platform_data`), a `sampleText` message (or
//! `sampleMarkdown`, `{"title", "text"}`, with pictures), header
//! `x-acs-dingtalk-access-token`. The token comes from
//! `/v1.0/oauth2/accessToken` (AppKey and `BOTLINE_DINGTALK_APP_SECRET`),
//! shared by every replica through the token cache; a 401 drops it and the
//! attempt is retried at once with a new one. The robot API cannot mention.
//!
//! Limits (settings): per chat, paced evenly (DingTalk robots: 20 a minute,
//! then throttled), and per app on the robot API. The robot API's throttle
//! answers (`Forbidden.AccessDenied.QpsLimitForAppkeyAndApi`, per app and
//! API, and `…QpsLimitForApi`, every app at once; HTTP 403) are retried
//! after `Retry-After`, else after a second, which DingTalk documents as
//! how long such a limit lasts. 429 and 5xx are retried (with
//! `Retry-After` when given); other refusals are permanent, their reason
//! naming DingTalk's code and message.

use super::http::{self, Answered, Http};
use super::{media, mentions};
use super::{Attempt, Kit, Platform, Sender, Verdict};
use crate::limits::Limit;
use crate::tokens::{Fetched, TokenCache};
use botline_shared::config::secret_env;
use botline_shared::message::{ChatKind, Reply};
use botline_shared::{now_ms, Error};
use futures_util::future::BoxFuture;
use reqwest::{StatusCode, Url};
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const NAME: &str = "dingtalk";
/// The app's AppSecret, for the robot API's access token.
pub const APP_SECRET_ENV: &str = "BOTLINE_DINGTALK_APP_SECRET";
/// The `platform_data` keys ingest fills.
const SESSION_WEBHOOK: &str = "session_webhook";
const SESSION_WEBHOOK_EXPIRES_MS: &str = "session_webhook_expires_ms";
const USER_ID: &str = "user_id";
/// A session webhook expiring sooner than this is not used.
const SESSION_MARGIN_MS: i64 = 5_000;
/// "send too fast": the robot is throttled for a while.
const THROTTLED: i64 = 130101;
/// The robot API's throttle codes: the app's calls to one API, and every
/// app's calls to it, over their rate. Each such limit lasts a second.
const API_THROTTLED: [&str; 2] = [
    "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi",
    "Forbidden.AccessDenied.QpsLimitForApi",
];
const API_THROTTLED_WAIT: Duration = Duration::from_secs(1);
/// How much of the text's first line a markdown message's title keeps.
const MARKDOWN_TITLE_CHARS: usize = 32;

pub const PLATFORM: Platform = Platform { name: NAME, build };

/// `[egress.platforms.dingtalk]`, documented in shared/defaults.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[allow(dead_code, reason = "read by enabled_platforms")]
    enabled: bool,
    session_webhook_base: String,
    app_key: String,
    robot_code: String,
    api_base_url: String,
    timeout_ms: u64,
    throttled_retry_ms: u64,
    per_chat_per_minute: u32,
    per_app_per_second: u32,
}

/// The robot API, when configured.
struct RobotApi {
    base_url: Url,
    app_key: String,
    app_secret: String,
    robot_code: String,
    tokens: TokenCache,
}

fn build(table: &toml::Value, kit: &Kit) -> Result<Arc<dyn Sender>, Error> {
    let settings = super::settings(NAME, table, |settings: &Settings| {
        vec![
            ("per_chat_per_minute", settings.per_chat_per_minute),
            ("per_app_per_second", settings.per_app_per_second),
        ]
    })?;
    let url = |name: &str, value: &str| {
        Url::parse(value)
            .ok()
            .filter(|url| !url.cannot_be_a_base())
            .ok_or_else(|| {
                Error::config(
                    format!("egress.platforms.dingtalk.{name}"),
                    format!("{value:?} is not an http(s) URL"),
                )
            })
    };
    url("session_webhook_base", &settings.session_webhook_base)?;
    let api = if settings.app_key.is_empty() {
        None
    } else {
        Some(RobotApi {
            base_url: url("api_base_url", &settings.api_base_url)?,
            app_secret: secret_env(kit.env, APP_SECRET_ENV, 1)?,
            robot_code: if settings.robot_code.is_empty() {
                settings.app_key.clone()
            } else {
                settings.robot_code.clone()
            },
            app_key: settings.app_key.clone(),
            tokens: kit.tokens.clone(),
        })
    };
    Ok(Arc::new(DingTalkSender {
        http: Http::new(NAME, settings.timeout_ms)?,
        api,
        settings,
    }))
}

pub struct DingTalkSender {
    http: Http,
    api: Option<RobotApi>,
    settings: Settings,
}

impl Sender for DingTalkSender {
    fn platform(&self) -> &'static str {
        NAME
    }

    fn limits(&self, reply: &Reply) -> Vec<Limit> {
        let mut limits = vec![Limit::new(
            format!("{NAME}:chat:{}", reply.chat.id),
            self.settings.per_chat_per_minute,
            Duration::from_secs(60),
        )
        .with_burst(1)];
        if let (Some(api), None) = (&self.api, self.session_webhook(reply)) {
            limits.push(
                Limit::new(
                    format!("{NAME}:app:{}", api.app_key),
                    self.settings.per_app_per_second,
                    Duration::from_secs(1),
                )
                .with_burst(1),
            );
        }
        limits
    }

    fn attempt<'a>(&'a self, reply: &'a Reply) -> BoxFuture<'a, Attempt> {
        Box::pin(async move {
            if let Some(webhook) = self.session_webhook(reply) {
                return self.to_session(webhook, reply).await;
            }
            match &self.api {
                Some(api) => self.to_robot_api(api, reply).await,
                None => Attempt {
                    response: None,
                    verdict: Verdict::Permanent(
                        "no valid session webhook for this reply, and \
                         egress.platforms.dingtalk.app_key is not set for the robot API"
                            .into(),
                    ),
                },
            }
        })
    }
}

impl DingTalkSender {
    /// The reply's session webhook, if it is ours to use and still valid.
    fn session_webhook(&self, reply: &Reply) -> Option<Url> {
        let url = reply.platform_data.get(SESSION_WEBHOOK)?;
        let expires_ms: i64 = reply
            .platform_data
            .get(SESSION_WEBHOOK_EXPIRES_MS)?
            .parse()
            .ok()?;
        let valid = url.starts_with(&self.settings.session_webhook_base)
            && expires_ms > now_ms() + SESSION_MARGIN_MS;
        valid.then(|| Url::parse(url).ok()).flatten()
    }

    async fn to_session(&self, webhook: Url, reply: &Reply) -> Attempt {
        let sent = self.http.post(webhook).json(&session_body(reply));
        match self.http.send(sent, "dingtalk session webhook").await {
            Ok(answered) => {
                let throttled_retry = Duration::from_millis(self.settings.throttled_retry_ms);
                let verdict = judge_session(&answered, throttled_retry);
                answered.attempt(verdict)
            }
            Err(attempt) => attempt,
        }
    }

    async fn to_robot_api(&self, api: &RobotApi, reply: &Reply) -> Attempt {
        let Some((path, body)) = api_request(&api.robot_code, reply) else {
            return Attempt {
                response: None,
                verdict: Verdict::Permanent(
                    "a direct chat's session webhook has expired and its user id is unknown".into(),
                ),
            };
        };
        let refused = AtomicBool::new(false);
        let token_name = format!("{NAME}:{}", api.app_key);
        let token = match api
            .tokens
            .get(&token_name, || self.fetch_token(api, &refused))
            .await
        {
            Ok(token) => token,
            Err(error) => {
                return http::without_token(error.to_string(), refused.load(Ordering::Relaxed))
            }
        };
        let sent = self
            .http
            .post(endpoint(&api.base_url, path))
            .header("x-acs-dingtalk-access-token", token)
            .json(&body);
        let answered = match self.http.send(sent, NAME).await {
            Ok(answered) => answered,
            Err(attempt) => return attempt,
        };
        let verdict = judge_api(&answered);
        if answered.status == StatusCode::UNAUTHORIZED {
            if let Err(error) = api.tokens.invalidate(&token_name).await {
                return answered.attempt(Verdict::RetryAfter {
                    wait: None,
                    reason: format!("dropping the refused access token failed: {error}"),
                });
            }
        }
        answered.attempt(verdict)
    }

    /// A new access token; `refused` is set when DingTalk turned the app's
    /// credentials down.
    async fn fetch_token(&self, api: &RobotApi, refused: &AtomicBool) -> Result<Fetched, String> {
        let request = self
            .http
            .post(endpoint(&api.base_url, "/v1.0/oauth2/accessToken"))
            .json(&serde_json::json!({ "appKey": api.app_key, "appSecret": api.app_secret }));
        let answered = self
            .http
            .send(request, "dingtalk token endpoint")
            .await
            .map_err(http::failure)?;
        let token: ApiAnswer = serde_json::from_str(&answered.body).unwrap_or_default();
        match (answered.status.is_success(), token.access_token) {
            (true, Some(access_token)) if !access_token.is_empty() => Ok(Fetched {
                token: access_token,
                expires_in: Duration::from_secs(token.expire_in),
            }),
            _ => {
                refused.store(!http::is_transient(answered.status), Ordering::Relaxed);
                Err(format!(
                    "dingtalk token endpoint answered {}: code {} {}",
                    answered.status.as_u16(),
                    token.code,
                    http::quote(&token.message)
                ))
            }
        }
    }
}

/// `{base}{path}`, under the base's own path.
fn endpoint(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    url.set_path(&format!("{}{path}", base.path().trim_end_matches('/')));
    url
}

/// The session webhook body: text with each mention as `@<userId>`, and
/// the mentions in `at` (`all` as `isAtAll`); markdown with pictures.
pub fn session_body(reply: &Reply) -> serde_json::Value {
    let (everyone, users): (Vec<String>, Vec<String>) =
        reply.mentions.iter().cloned().partition(|id| id == "all");
    let plain = media::text_with_links(reply, false);
    let text = mentions::place(&plain, &users, |id| format!("@{id}"));
    let mut body = match markdown(&plain, &text, &media::images(reply)) {
        Some((title, markdown)) => serde_json::json!({
            "msgtype": "markdown",
            "markdown": { "title": title, "text": markdown },
        }),
        None => serde_json::json!({ "msgtype": "text", "text": { "content": text } }),
    };
    body["at"] = serde_json::json!({ "atUserIds": users, "isAtAll": !everyone.is_empty() });
    body
}

/// `text` and `images` as DingTalk markdown, with its title (the first
/// line of `plain`, the text without mentions); `None` without pictures
/// (a plain text message then).
fn markdown(plain: &str, text: &str, images: &[media::Image]) -> Option<(String, String)> {
    if images.is_empty() {
        return None;
    }
    let title = plain
        .lines()
        .map(str::trim)
        .find(|line| !line.is_empty())
        .or_else(|| images.iter().find_map(|image| image.alt))
        .unwrap_or("[图片]");
    let title: String = title.chars().take(MARKDOWN_TITLE_CHARS).collect();
    // Two spaces before a line break keep it a break in markdown.
    let mut markdown = text.replace('\n', "  \n");
    for image in images {
        if !markdown.is_empty() {
            markdown.push_str("\n\n");
        }
        let alt: String = image
            .alt
            .unwrap_or_default()
            .chars()
            .filter(|c| !matches!(c, '[' | ']' | '\n' | '\r'))
            .collect();
        // Image URLs have no whitespace (checked); parentheses would end the link.
        let url = image.url.replace('(', "%28").replace(')', "%29");
        markdown.push_str(&format!("![{alt}]({url})"));
    }
    Some((title, markdown))
}

/// The robot API path and body for `reply`, or `None` for a direct chat
/// without the user's id.
pub fn api_request(robot_code: &str, reply: &Reply) -> Option<(&'static str, serde_json::Value)> {
    let text = media::text_with_links(reply, false);
    let (key, message) = match markdown(&text, &text, &media::images(reply)) {
        Some((title, markdown)) => (
            "sampleMarkdown",
            serde_json::json!({ "title": title, "text": markdown }),
        ),
        None => ("sampleText", serde_json::json!({ "content": text })),
    };
    let message = message.to_string();
    if reply.chat.kind == ChatKind::Direct {
        let user = reply.platform_data.get(USER_ID)?;
        return Some((
            "/v1.0/robot/oToMessages/batchSend",
            serde_json::json!({
                "robotCode": robot_code,
                "userIds": [user],
                "msgKey": key,
                "msgParam": message,
            }),
        ));
    }
    Some((
        "/v1.0/robot/groupMessages/send",
        serde_json::json!({
            "robotCode": robot_code,
            "openConversationId": reply.chat.id,
            "msgKey": key,
            "msgParam": message,
        }),
    ))
}

/// The session webhook's answer: `{"errcode": 0, "errmsg": "ok"}` or a refusal.
#[derive(Debug, Default, Deserialize)]
struct SessionAnswer {
    #[serde(default)]
    errcode: Option<i64>,
    #[serde(default)]
    errmsg: String,
}

/// `throttled_retry` is how long to wait after errcode 130101.
fn judge_session(answered: &Answered, throttled_retry: Duration) -> Verdict {
    let answer: SessionAnswer = serde_json::from_str(&answered.body).unwrap_or_default();
    let reason = match answer.errcode {
        Some(errcode) => format!(
            "dingtalk session webhook answered {}: errcode {errcode} {}",
            answered.status.as_u16(),
            http::quote(&answer.errmsg)
        ),
        None => format!(
            "dingtalk session webhook answered {}: {}",
            answered.status.as_u16(),
            http::quote(&answered.body)
        ),
    };
    if answered.status.is_success() && answer.errcode == Some(0) {
        return Verdict::Delivered {
            platform_message_id: None,
            writes: Vec::new(),
        };
    }
    if answer.errcode == Some(THROTTLED) {
        return Verdict::RetryAfter {
            wait: Some(throttled_retry),
            reason,
        };
    }
    if http::is_transient(answered.status) {
        return Verdict::RetryAfter {
            wait: answered.retry_after,
            reason,
        };
    }
    Verdict::Permanent(reason)
}

/// What the robot API and the token endpoint answer.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ApiAnswer {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    process_query_key: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expire_in: u64,
}

fn judge_api(answered: &Answered) -> Verdict {
    let answer: ApiAnswer = serde_json::from_str(&answered.body).unwrap_or_default();
    let reason = format!(
        "dingtalk answered {}: code {} {}",
        answered.status.as_u16(),
        answer.code,
        http::quote(&answer.message)
    );
    if answered.status.is_success() {
        return Verdict::Delivered {
            platform_message_id: answer.process_query_key,
            writes: Vec::new(),
        };
    }
    if answered.status == StatusCode::UNAUTHORIZED {
        return Verdict::RetryAfter {
            wait: Some(Duration::ZERO),
            reason: format!("{reason}; the access token is fetched anew"),
        };
    }
    if API_THROTTLED.contains(&answer.code.as_str()) {
        return Verdict::RetryAfter {
            wait: Some(answered.retry_after.unwrap_or(API_THROTTLED_WAIT)),
            reason,
        };
    }
    if http::is_transient(answered.status) {
        return Verdict::RetryAfter {
            wait: answered.retry_after,
            reason,
        };
    }
    Verdict::Permanent(reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(kind: ChatKind, mentions: &[&str]) -> Reply {
        Reply {
            mentions: mentions.iter().map(|id| id.to_string()).collect(),
            platform_data: [(USER_ID.to_string(), "2220111111".to_string())].into(),
            ..http::test_reply(
                NAME,
                "dingxxxxx",
                "cid6KeBBLoveMJOGXoYKF5x7EeiodoA==",
                kind,
                "hi",
            )
        }
    }

    #[test]
    fn mentions_are_written_in_the_text_and_listed_in_at() {
        let body = session_body(&reply(ChatKind::Group, &["2220111111", "all"]));
        assert_eq!(
            body,
            serde_json::json!({
                "msgtype": "text",
                "text": {"content": "@2220111111 hi"},
                "at": {"atUserIds": ["2220111111"], "isAtAll": true},
            })
        );
        let mut placed = reply(ChatKind::Group, &["u1"]);
        placed.text = "ok @u1, done".into();
        assert_eq!(session_body(&placed)["text"]["content"], "ok @u1, done");
    }

    #[test]
    fn pictures_make_a_markdown_message() {
        let mut sent = reply(ChatKind::Group, &["2220111111"]);
        sent.text = "Our shop\nopen 9-6".into();
        sent.attachments = vec![
            botline_shared::message::Attachment::image(
                "https://x.test/shop(1).jpg",
                Some("the [shop]".into()),
            ),
            botline_shared::message::Attachment::image("https://x.test/map.png", None),
        ];
        assert_eq!(
            session_body(&sent),
            serde_json::json!({
                "msgtype": "markdown",
                "markdown": {
                    "title": "Our shop",
                    "text": "@2220111111 Our shop  \nopen 9-6\n\n![the shop](https://x.test/shop%281%29.jpg)\n\n![](https://x.test/map.png)",
                },
                "at": {"atUserIds": ["2220111111"], "isAtAll": false},
            })
        );
        let (_, body) = api_request("dingxxxxx", &sent).unwrap();
        assert_eq!(body["msgKey"], "sampleMarkdown");
        let param: serde_json::Value =
            serde_json::from_str(body["msgParam"].as_str().unwrap()).unwrap();
        assert_eq!(
            param,
            serde_json::json!({
                "title": "Our shop",
                "text": "Our shop  \nopen 9-6\n\n![the shop](https://x.test/shop%281%29.jpg)\n\n![](https://x.test/map.png)",
            })
        );
        sent.text.clear();
        sent.mentions.clear();
        assert_eq!(session_body(&sent)["markdown"]["title"], "the [shop]");
    }

    #[test]
    fn the_robot_api_sends_to_the_group_or_the_user() {
        let (path, body) = api_request("dingxxxxx", &reply(ChatKind::Group, &[])).unwrap();
        assert_eq!(path, "/v1.0/robot/groupMessages/send");
        assert_eq!(
            body,
            serde_json::json!({
                "robotCode": "dingxxxxx",
                "openConversationId": "cid6KeBBLoveMJOGXoYKF5x7EeiodoA==",
                "msgKey": "sampleText",
                "msgParam": r#"{"content":"hi"}"#,
            })
        );
        let (path, body) = api_request("dingxxxxx", &reply(ChatKind::Direct, &[])).unwrap();
        assert_eq!(path, "/v1.0/robot/oToMessages/batchSend");
        assert_eq!(body["userIds"], serde_json::json!(["2220111111"]));
        let mut unknown = reply(ChatKind::Direct, &[]);
        unknown.platform_data.clear();
        assert!(api_request("dingxxxxx", &unknown).is_none());
    }

    #[test]
    fn session_webhook_answers_are_judged_by_errcode() {
        let check = |status: u16, body: &str, expected: &str| {
            let judge = |answered: &Answered| judge_session(answered, Duration::from_secs(60));
            assert_eq!(http::judged(judge, status, None, body), expected);
        };
        check(200, r#"{"errcode":0,"errmsg":"ok"}"#, "delivered None");
        check(
            200,
            r#"{"errcode":130101,"errmsg":"send too fast, exceed 20 times per minute"}"#,
            "retry Some(60s) dingtalk session webhook answered 200: errcode 130101 send too fast, exceed 20 times per minute",
        );
        check(
            200,
            r#"{"errcode":300001,"errmsg":"session invalid"}"#,
            "permanent dingtalk session webhook answered 200: errcode 300001 session invalid",
        );
        check(
            502,
            "busy",
            "retry None dingtalk session webhook answered 502: busy",
        );
        check(200, "", "permanent dingtalk session webhook answered 200: ");
    }

    #[test]
    fn robot_api_answers_are_judged_by_status() {
        let check = |status: u16, body: &str, expected: &str| {
            assert_eq!(http::judged(judge_api, status, None, body), expected);
        };
        check(
            200,
            r#"{"processQueryKey":"q1"}"#,
            r#"delivered Some("q1")"#,
        );
        check(
            401,
            r#"{"code":"InvalidAuthentication","message":"不合法的access_token"}"#,
            "retry Some(0ns) dingtalk answered 401: code InvalidAuthentication 不合法的access_token; the access token is fetched anew",
        );
        check(
            400,
            r#"{"code":"invalidParameter.robotCode.notExsit","message":"robot 不存在"}"#,
            "permanent dingtalk answered 400: code invalidParameter.robotCode.notExsit robot 不存在",
        );
        check(503, "", "retry None dingtalk answered 503: code  ");
        check(
            403,
            r#"{"code":"Forbidden.AccessDenied.QpsLimitForAppkeyAndApi","message":"当前应用调用该接口的QPS超过限制"}"#,
            "retry Some(1s) dingtalk answered 403: code Forbidden.AccessDenied.QpsLimitForAppkeyAndApi 当前应用调用该接口的QPS超过限制",
        );
        check(
            403,
            r#"{"code":"Forbidden.AccessDenied.QpsLimitForApi","message":"接口QPS超限"}"#,
            "retry Some(1s) dingtalk answered 403: code Forbidden.AccessDenied.QpsLimitForApi 接口QPS超限",
        );
        check(
            403,
            r#"{"code":"Forbidden.AccessDenied.AccessTokenPermissionDenied","message":"没有调用该接口的权限"}"#,
            "permanent dingtalk answered 403: code Forbidden.AccessDenied.AccessTokenPermissionDenied 没有调用该接口的权限",
        );
        let throttled = http::judged(
            judge_api,
            429,
            Some(3),
            r#"{"code":"Throttling","message":"too many"}"#,
        );
        assert_eq!(
            throttled,
            "retry Some(3s) dingtalk answered 429: code Throttling too many"
        );
    }
}
