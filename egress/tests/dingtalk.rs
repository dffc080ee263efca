//! The DingTalk sender against a local stand-in of DingTalk: a session
//! webhook and the robot API (token, group and one-to-one sends), each
//! request checked as DingTalk checks it (path, token header, JSON shape).
//! Scripted, a send is answered as DingTalk answers when throttled (the
//! session webhook: 200 with errcode 130101; the robot API: 403 with
//! `Forbidden.AccessDenied.QpsLimitForAppkeyAndApi`), with HTTP's 429 and
//! `Retry-After`, with a 5xx, or the token is revoked.

mod senders;

use botline_shared::message::{Attachment, ChatKind, Reply};
use botline_shared::now_ms;
use senders::*;
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const APP_KEY: &str = "dingeqqpkv3xxxx";
const APP_SECRET: &str = "GT-lsu-taDAsTsxxxx-app-secret";
const ROBOT_CODE: &str = "dingue4kfzdxbynxxxxxx";

/// How the stand-in answers the next send (a token request is not one).
#[derive(Debug, Clone, Copy)]
enum Script {
    ServerError,
    /// The robot API's token stops being valid.
    RevokeToken,
    /// DingTalk's own throttle answer: errcode 130101 from a session
    /// webhook, `QpsLimitForAppkeyAndApi` from the robot API.
    Throttled,
    /// HTTP's 429 with `Retry-After` (seconds).
    TooManyRequests {
        retry_after_secs: u64,
    },
}

#[derive(Default)]
struct Ding {
    tokens: Vec<String>,
    script: VecDeque<Script>,
    /// The requests DingTalk accepted.
    sent: Vec<Received>,
    /// The sends answered from the script instead, in order.
    refused: Vec<Received>,
    malformed: Vec<String>,
}

impl Ding {
    /// The accepted request to `path`.
    fn sent_to(&self, path: &str) -> &Received {
        self.sent.iter().find(|sent| sent.path() == path).unwrap()
    }
}

type Shared = Arc<Mutex<Ding>>;

async fn start_ding() -> (Shared, String) {
    let ding = Shared::default();
    let shared = ding.clone();
    let api =
        StandIn::start(move |_, received| answer_ding(&mut shared.lock().unwrap(), received)).await;
    (ding, api.url)
}

fn answer_ding(ding: &mut Ding, received: &Received) -> Answer {
    let json_body = received
        .header("content-type")
        .is_some_and(|value| value.starts_with("application/json"));
    let body = serde_json::from_slice::<Value>(&received.body).ok();
    let (Some(body), true, "POST") = (body, json_body, received.method.as_str()) else {
        ding.malformed
            .push(format!("not a JSON POST: {}", received.uri));
        return answer(
            400,
            json!({"code": "invalidParameter", "message": "参数错误"}),
        );
    };
    match received.path() {
        "/robot/sendBySession" => session(ding, received, body),
        "/v1.0/oauth2/accessToken" => token(ding, &body),
        "/v1.0/robot/groupMessages/send" | "/v1.0/robot/oToMessages/batchSend" => {
            robot_api(ding, received, body)
        }
        _ => (404, Vec::new(), String::new()),
    }
}

/// The answer the script has for this send instead of accepting it, if any.
fn scripted(ding: &mut Ding, received: &Received, throttled: Value) -> Option<Answer> {
    let answer = match ding.script.pop_front()? {
        Script::ServerError => (502, Vec::new(), "upstream".into()),
        Script::RevokeToken => unreachable!("handled where the token is checked"),
        Script::Throttled if received.path() == "/robot/sendBySession" => answer(200, throttled),
        Script::Throttled => answer(403, throttled),
        Script::TooManyRequests { retry_after_secs } => (
            429,
            vec![("retry-after", retry_after_secs.to_string())],
            json!({"code": "Throttling", "message": "Too Many Requests"}).to_string(),
        ),
    };
    ding.refused.push(received.clone());
    Some(answer)
}

fn session(ding: &mut Ding, received: &Received, body: Value) -> Answer {
    let throttled =
        json!({"errcode": 130101, "errmsg": "send too fast, exceed 20 times per minute"});
    if let Some(answer) = scripted(ding, received, throttled) {
        return answer;
    }
    let well_formed = received
        .uri
        .split_once('?')
        .is_some_and(|(_, query)| query.starts_with("session="))
        && match body["msgtype"].as_str() {
            Some("text") => body["text"]["content"].is_string(),
            Some("markdown") => {
                body["markdown"]["title"].is_string() && body["markdown"]["text"].is_string()
            }
            _ => false,
        }
        && body["at"]["atUserIds"].is_array()
        && body["at"]["isAtAll"].is_boolean();
    if !well_formed {
        ding.malformed.push(body.to_string());
        return answer(200, json!({"errcode": 40035, "errmsg": "缺少参数 json"}));
    }
    ding.sent.push(received.clone());
    answer(200, json!({"errcode": 0, "errmsg": "ok"}))
}

fn token(ding: &mut Ding, body: &Value) -> Answer {
    if *body != json!({"appKey": APP_KEY, "appSecret": APP_SECRET}) {
        let refused = json!({"code": "invalidClientSecret", "message": "应用凭证不合法"});
        return answer(400, refused);
    }
    let token = format!("fw8ef8we8f76e6f7s8d{}", ding.tokens.len());
    ding.tokens.push(token.clone());
    answer(200, json!({"accessToken": token, "expireIn": 7200}))
}

fn robot_api(ding: &mut Ding, received: &Received, body: Value) -> Answer {
    let token = received.header("x-acs-dingtalk-access-token");
    let revoked = matches!(ding.script.front(), Some(Script::RevokeToken));
    if revoked || token.is_none() || token != ding.tokens.last().map(String::as_str) {
        if revoked {
            ding.script.pop_front();
            ding.tokens.push("revoked".into());
        }
        let invalid = json!({"code": "InvalidAuthentication", "message": "不合法的access_token"});
        return answer(401, invalid);
    }
    let content = body["msgParam"]
        .as_str()
        .and_then(|param| serde_json::from_str::<Value>(param).ok());
    let target = if received.path().ends_with("batchSend") {
        body["userIds"].is_array()
    } else {
        body["openConversationId"].is_string()
    };
    let message_ok = content.is_some_and(|content| match body["msgKey"].as_str() {
        Some("sampleText") => content["content"].is_string(),
        Some("sampleMarkdown") => content["title"].is_string() && content["text"].is_string(),
        _ => false,
    });
    let well_formed = body["robotCode"] == ROBOT_CODE && message_ok && target;
    if !well_formed {
        ding.malformed.push(body.to_string());
        let refused = json!({"code": "invalidParameter.param.invalid", "message": "参数错误"});
        return answer(400, refused);
    }
    let throttled = json!({
        "code": "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi",
        "message": "当前应用调用该接口的QPS超过限制",
    });
    if let Some(answer) = scripted(ding, received, throttled) {
        return answer;
    }
    ding.sent.push(received.clone());
    answer(
        200,
        json!({"processQueryKey": format!("q{}", ding.sent.len())}),
    )
}

fn start(url: &str, extra: &str) -> Egress {
    Egress::start(
        &format!(
            "[egress.platforms.dingtalk]\nenabled = true\nsession_webhook_base = \"{url}/robot/\"\n\
             api_base_url = \"{url}\"\n{extra}"
        ),
        &[("BOTLINE_DINGTALK_APP_SECRET", APP_SECRET)],
    )
}

fn with_robot_api() -> String {
    format!("app_key = \"{APP_KEY}\"\nrobot_code = \"{ROBOT_CODE}\"\n")
}

/// A reply to a message whose session webhook (at `url`) expires `in_ms` from now.
fn ding_reply(id: &str, kind: ChatKind, url: &str, in_ms: i64) -> Reply {
    let mut reply = reply(
        id,
        "dingtalk",
        chat("cid6KeBBLoveMJOGXoYKF5x7EeiodoA==", kind),
        "你好",
    );
    reply.platform_data = [
        (
            "session_webhook".to_string(),
            format!("{url}/robot/sendBySession?session=eb18e18e8669b0a3cd7dff1388fe5e6a"),
        ),
        (
            "session_webhook_expires_ms".to_string(),
            (now_ms() + in_ms).to_string(),
        ),
        ("user_id".to_string(), "2220111111".to_string()),
    ]
    .into();
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_goes_to_its_session_webhook_with_mentions() {
    let (ding, url) = start_ding().await;
    ding.lock().unwrap().script = VecDeque::from([Script::ServerError]);
    let egress = start(&url, "");
    let mut reply = ding_reply("r1", ChatKind::Group, &url, 3_600_000);
    reply.mentions = vec!["2220111111".into()];
    egress.send(&reply);
    let receipts = egress.delivered(1).await;
    assert_eq!(receipts[0].attempts, 2, "the 502 was retried");
    let ding = ding.lock().unwrap();
    assert!(ding.malformed.is_empty(), "{:?}", ding.malformed);
    assert!(ding.tokens.is_empty(), "no token for a session webhook");
    assert_eq!(ding.sent.len(), 1);
    assert_eq!(ding.sent[0].path(), "/robot/sendBySession");
    assert_eq!(
        ding.sent[0].json(),
        json!({
            "msgtype": "text",
            "text": {"content": "@2220111111 你好"},
            "at": {"atUserIds": ["2220111111"], "isAtAll": false},
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_session_webhook_gives_way_to_the_robot_api() {
    let (ding, url) = start_ding().await;
    let egress = start(&url, &with_robot_api());
    egress.send(&ding_reply("r1", ChatKind::Group, &url, -1_000));
    egress.send(&ding_reply("r2", ChatKind::Direct, &url, 1_000));
    let receipts = egress.delivered(2).await;
    let ding = ding.lock().unwrap();
    assert!(ding.malformed.is_empty(), "{:?}", ding.malformed);
    assert_eq!(ding.tokens.len(), 1, "one token for both");
    let group = ding.sent_to("/v1.0/robot/groupMessages/send");
    assert_eq!(
        group.json(),
        json!({
            "robotCode": ROBOT_CODE,
            "openConversationId": "cid6KeBBLoveMJOGXoYKF5x7EeiodoA==",
            "msgKey": "sampleText",
            "msgParam": r#"{"content":"你好"}"#,
        })
    );
    let direct = ding.sent_to("/v1.0/robot/oToMessages/batchSend");
    assert_eq!(direct.json()["userIds"], json!(["2220111111"]));
    assert!(receipts
        .iter()
        .all(|receipt| receipt.platform_message_id.is_some()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_dingtalk_refuses_is_fetched_anew() {
    let (ding, url) = start_ding().await;
    let egress = start(&url, &with_robot_api());
    egress.send(&ding_reply("r1", ChatKind::Group, &url, 0));
    egress.delivered(1).await;
    ding.lock().unwrap().script = VecDeque::from([Script::RevokeToken]);
    egress.send(&ding_reply("r2", ChatKind::Group, &url, 0));
    let receipts = egress.delivered(2).await;
    assert_eq!(receipts[1].attempts, 2);
    assert_eq!(ding.lock().unwrap().tokens.len(), 3, "first, revoked, anew");
}

/// Room enough in every rate limit that only a wait the platform asked
/// for can space the attempts out.
const NO_PACING: &str = "per_chat_per_minute = 60000\nper_app_per_second = 1000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttled_session_webhook_is_retried_after_throttled_retry_ms_and_a_5xx_too() {
    let (ding, url) = start_ding().await;
    ding.lock().unwrap().script = VecDeque::from([Script::Throttled, Script::ServerError]);
    let egress = start(&url, &format!("throttled_retry_ms = 1000\n{NO_PACING}"));
    egress.send(&ding_reply("r1", ChatKind::Group, &url, 3_600_000));
    let receipts = egress.delivered(1).await;
    assert_eq!(receipts[0].attempts, 3, "130101, then 502, then sent");
    let ding = ding.lock().unwrap();
    assert!(ding.malformed.is_empty(), "{:?}", ding.malformed);
    assert_eq!(ding.sent.len(), 1, "sent once");
    assert_eq!(ding.refused.len(), 2);
    assert!(
        ding.refused[1].at - ding.refused[0].at >= Duration::from_secs(1),
        "throttled_retry_ms was waited after 130101"
    );
    assert!(egress.dead().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_robot_apis_throttle_and_429_are_waited_out_and_a_5xx_is_retried() {
    let (ding, url) = start_ding().await;
    ding.lock().unwrap().script = VecDeque::from([
        Script::Throttled,
        Script::TooManyRequests {
            retry_after_secs: 1,
        },
        Script::ServerError,
    ]);
    let egress = start(&url, &format!("{}{NO_PACING}", with_robot_api()));
    egress.send(&ding_reply("r1", ChatKind::Group, &url, -1_000));
    let receipts = egress.delivered(1).await;
    assert_eq!(receipts[0].attempts, 4, "throttled, 429, 502, then sent");
    let ding = ding.lock().unwrap();
    assert!(ding.malformed.is_empty(), "{:?}", ding.malformed);
    assert_eq!(ding.tokens.len(), 1, "a throttle is not a bad token");
    assert_eq!(ding.sent.len(), 1, "sent once");
    assert_eq!(ding.sent[0].path(), "/v1.0/robot/groupMessages/send");
    let refused = &ding.refused;
    assert_eq!(refused.len(), 3);
    assert!(
        refused[1].at - refused[0].at >= Duration::from_secs(1),
        "a second was waited after QpsLimitForAppkeyAndApi"
    );
    assert!(
        refused[2].at - refused[1].at >= Duration::from_secs(1),
        "Retry-After was waited after the 429"
    );
    assert!(egress.dead().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_or_expired_session_webhook_without_the_robot_api_goes_to_dead() {
    let (ding, url) = start_ding().await;
    let egress = start(&url, "");
    let foreign = ding_reply("r1", ChatKind::Group, "http://127.0.0.1:1", 3_600_000);
    egress.send(&foreign);
    egress.send(&ding_reply("r2", ChatKind::Group, &url, -1));
    eventually("two dead letters", || async { egress.dead().len() == 2 }).await;
    assert!(egress.dead()[0].error.contains("app_key is not set"));
    assert!(
        ding.lock().unwrap().sent.is_empty(),
        "nothing was posted anywhere"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_chat_gets_no_more_than_its_rate() {
    let (ding, url) = start_ding().await;
    let egress = start(&url, "per_chat_per_minute = 120\n");
    for n in 0..4 {
        egress.send(&ding_reply(
            &format!("r{n}"),
            ChatKind::Group,
            &url,
            3_600_000,
        ));
    }
    egress.delivered(4).await;
    // 120 a minute: each once, at least half a second apart (less a little for clocks).
    assert_paced(&ding.lock().unwrap().sent, 4, Duration::from_millis(450));
}

#[tokio::test]
async fn the_robot_api_needs_the_app_secret() {
    let error = Egress::try_start(
        &format!(
            "[egress.platforms.dingtalk]\nenabled = true\n{}",
            with_robot_api()
        ),
        &[],
    )
    .err()
    .unwrap();
    assert_eq!(
        error.to_string(),
        "setting BOTLINE_DINGTALK_APP_SECRET: is not set"
    );
    assert!(
        Egress::try_start("[egress.platforms.dingtalk]\nenabled = true\n", &[]).is_ok(),
        "session webhooks alone need no secret"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_is_markdown_on_the_session_webhook_and_the_robot_api() {
    let (ding, url) = start_ding().await;
    let egress = start(&url, &with_robot_api());
    let picture = || {
        vec![Attachment::image(
            "https://cdn.example.com/shop.jpg",
            Some("店".into()),
        )]
    };
    let mut to_session = ding_reply("r1", ChatKind::Group, &url, 3_600_000);
    to_session.mentions = vec!["2220111111".into()];
    to_session.attachments = picture();
    egress.send(&to_session);
    let mut to_api = ding_reply("r2", ChatKind::Group, &url, -1_000);
    to_api.attachments = picture();
    egress.send(&to_api);
    egress.delivered(2).await;

    let ding = ding.lock().unwrap();
    assert!(ding.malformed.is_empty(), "{:?}", ding.malformed);
    let session = ding.sent_to("/robot/sendBySession");
    assert_eq!(
        session.json(),
        json!({
            "msgtype": "markdown",
            "markdown": {
                "title": "你好",
                "text": "@2220111111 你好\n\n![店](https://cdn.example.com/shop.jpg)",
            },
            "at": {"atUserIds": ["2220111111"], "isAtAll": false},
        })
    );
    let group = ding.sent_to("/v1.0/robot/groupMessages/send");
    assert_eq!(
        group.header("x-acs-dingtalk-access-token"),
        Some("fw8ef8we8f76e6f7s8d0")
    );
    let body = group.json();
    assert_eq!(body["msgKey"], "sampleMarkdown");
    let param: Value = serde_json::from_str(body["msgParam"].as_str().unwrap()).unwrap();
    assert_eq!(
        param,
        json!({"title": "你好", "text": "你好\n\n![店](https://cdn.example.com/shop.jpg)"})
    );
}
