//! The WeCom sender against a local stand-in of WeCom's API (gettoken and
//! message/send, checked as WeCom checks them) and a real redis-server.

mod senders;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use botline_shared::message::ChatKind;
use senders::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CORP_ID: &str = "ww0123456789abcdef";
const SECRET: &str = "app-secret-0123456789abcdefghijklmnop";
const AGENT_ID: u64 = 1_000_002;
const ENV: [(&str, &str); 1] = [("BOTLINE_WECOM_SECRET", SECRET)];

/// How the stand-in answers its n-th message/send (0-based).
#[derive(Debug, Clone, Copy)]
enum Answer {
    Sent,
    Errcode(i64),
    /// An HTTP status with an optional Retry-After (seconds).
    Status(u16, Option<&'static str>),
    /// The token stops being valid before this request is checked.
    ExpireToken,
}

struct Sent {
    at: Instant,
    access_token: String,
    body: Value,
}

#[derive(Default)]
struct WeCom {
    /// Tokens handed out; the last one is the valid one.
    tokens: Mutex<Vec<String>>,
    sends: Mutex<Vec<Sent>>,
    script: Mutex<Vec<Answer>>,
}

impl WeCom {
    fn tokens_fetched(&self) -> usize {
        self.tokens.lock().unwrap().len()
    }

    fn sends(&self) -> usize {
        self.sends.lock().unwrap().len()
    }

    fn bodies(&self) -> Vec<Value> {
        let sends = self.sends.lock().unwrap();
        sends.iter().map(|sent| sent.body.clone()).collect()
    }

    fn arrivals(&self) -> Vec<Instant> {
        self.sends
            .lock()
            .unwrap()
            .iter()
            .map(|sent| sent.at)
            .collect()
    }
}

fn errcode(code: i64, message: &str) -> Response {
    Json(json!({ "errcode": code, "errmsg": message })).into_response()
}

/// `GET /cgi-bin/gettoken?corpid&corpsecret`.
async fn gettoken(
    State(wecom): State<Arc<WeCom>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    if query.get("corpid").map(String::as_str) != Some(CORP_ID) {
        return errcode(40013, "invalid corpid");
    }
    if query.get("corpsecret").map(String::as_str) != Some(SECRET) {
        return errcode(40001, "invalid credential");
    }
    let mut tokens = wecom.tokens.lock().unwrap();
    let token = format!("token-{}", tokens.len() + 1);
    tokens.push(token.clone());
    Json(json!({
        "errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": 7200
    }))
    .into_response()
}

/// `POST /cgi-bin/message/send?access_token`: the token must be the one
/// handed out last, the body a text message from the app.
async fn send(
    State(wecom): State<Arc<WeCom>>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    body: String,
) -> Response {
    let access_token = query.get("access_token").cloned().unwrap_or_default();
    let nth = {
        let mut sends = wecom.sends.lock().unwrap();
        sends.push(Sent {
            at: Instant::now(),
            access_token: access_token.clone(),
            body: serde_json::from_str(&body).unwrap_or(Value::Null),
        });
        sends.len() - 1
    };
    let answer = wecom
        .script
        .lock()
        .unwrap()
        .get(nth)
        .copied()
        .unwrap_or(Answer::Sent);
    if let Answer::ExpireToken = answer {
        wecom
            .tokens
            .lock()
            .unwrap()
            .push("expired-by-the-test".into());
    }
    if wecom.tokens.lock().unwrap().last() != Some(&access_token) {
        return errcode(42001, "access_token expired");
    }
    if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json") {
        return errcode(47001, "data format error");
    }
    let json: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    let shape_ok = json["touser"].is_string()
        && json["msgtype"] == "text"
        && json["agentid"] == AGENT_ID
        && json["text"]["content"]
            .as_str()
            .is_some_and(|text| !text.is_empty());
    if !shape_ok {
        return errcode(44004, "empty content or bad shape");
    }
    match answer {
        Answer::Sent | Answer::ExpireToken => Json(json!({
            "errcode": 0, "errmsg": "ok", "invaliduser": "", "msgid": format!("msg-{nth}")
        }))
        .into_response(),
        Answer::Errcode(code) => errcode(code, "refused by the test"),
        Answer::Status(status, retry_after) => {
            let mut response = (StatusCode::from_u16(status).unwrap(), "busy").into_response();
            if let Some(seconds) = retry_after {
                response
                    .headers_mut()
                    .insert("retry-after", seconds.parse().unwrap());
            }
            response
        }
    }
}

/// The stand-in, answering message/send by `script` (then `Sent`), and its base URL.
async fn stand_in(script: Vec<Answer>) -> (Arc<WeCom>, String) {
    let wecom = Arc::new(WeCom {
        script: Mutex::new(script),
        ..WeCom::default()
    });
    let app = Router::new()
        .route("/cgi-bin/gettoken", get(gettoken))
        .route("/cgi-bin/message/send", post(send))
        .with_state(wecom.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (wecom, url)
}

fn settings(url: &str, extra: &str) -> String {
    format!(
        "[egress.platforms.wecom]\nenabled = true\napi_base_url = \"{url}\"\n\
         corp_id = \"{CORP_ID}\"\nagent_id = {AGENT_ID}\nthrottled_retry_ms = 300\n{extra}"
    )
}

fn direct(id: &str, member: &str, text: &str) -> botline_shared::message::Reply {
    reply(id, "wecom", chat(member, ChatKind::Direct), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_sent_once_as_the_app_with_one_fetched_token() {
    let (wecom, url) = stand_in(Vec::new()).await;
    let egress = Egress::start(&settings(&url, ""), &ENV);
    egress.send(&direct("r-1", "zhangsan", "你好，张三"));
    egress.send(&direct("r-2", "lisi", "hello"));
    eventually("two receipts", || async { egress.receipts().len() == 2 }).await;

    assert_eq!(
        wecom.bodies(),
        [
            json!({"touser": "zhangsan", "msgtype": "text", "agentid": AGENT_ID,
                   "text": {"content": "你好，张三"}}),
            json!({"touser": "lisi", "msgtype": "text", "agentid": AGENT_ID,
                   "text": {"content": "hello"}}),
        ]
    );
    assert_eq!(wecom.tokens_fetched(), 1, "the token is cached");
    assert!(wecom
        .sends
        .lock()
        .unwrap()
        .iter()
        .all(|sent| sent.access_token == "token-1"));
    let receipts = egress.receipts();
    assert_eq!(receipts[0].platform, "wecom");
    assert_eq!(receipts[0].chat, "zhangsan");
    assert_eq!(receipts[0].attempts, 1);
    assert_eq!(receipts[0].platform_message_id.as_deref(), Some("msg-0"));
    assert!(egress.dead().is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_fetched_again_and_the_reply_sent() {
    let (wecom, url) = stand_in(vec![Answer::Sent, Answer::ExpireToken]).await;
    let egress = Egress::start(&settings(&url, ""), &ENV);
    egress.send(&direct("r-1", "zhangsan", "one"));
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;
    egress.send(&direct("r-2", "zhangsan", "two"));
    eventually("two receipts", || async { egress.receipts().len() == 2 }).await;

    let tokens: Vec<String> = wecom
        .sends
        .lock()
        .unwrap()
        .iter()
        .map(|sent| sent.access_token.clone())
        .collect();
    assert_eq!(tokens, ["token-1", "token-1", "token-3"]);
    assert_eq!(egress.receipts()[1].attempts, 2);
    assert!(egress.dead().is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequency_limits_429_and_server_errors_are_retried_until_sent() {
    let script = vec![
        Answer::Errcode(45009),
        Answer::Status(429, Some("1")),
        Answer::Status(502, None),
    ];
    let (wecom, url) = stand_in(script).await;
    let egress = Egress::start(&settings(&url, ""), &ENV);
    egress.send(&direct("r-1", "zhangsan", "hi"));
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;

    assert_eq!(wecom.sends(), 4, "sent once it went through, never again");
    assert_eq!(egress.receipts()[0].attempts, 4);
    let at = wecom.arrivals();
    assert!(
        at[1] - at[0] >= Duration::from_millis(300),
        "45009 waits throttled_retry_ms"
    );
    assert!(
        at[2] - at[1] >= Duration::from_secs(1),
        "429 honours Retry-After"
    );
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_members_replies_are_paced_by_the_member_limit() {
    let (wecom, url) = stand_in(Vec::new()).await;
    // 120 a minute: one every 500 ms.
    let limits = "member_per_minute = 120\nmember_per_hour = 100000\n";
    let egress = Egress::start(&settings(&url, limits), &ENV);
    for n in 0..3 {
        egress.send(&direct(
            &format!("r-{n}"),
            "zhangsan",
            &format!("reply {n}"),
        ));
    }
    eventually("three receipts", || async { egress.receipts().len() == 3 }).await;
    assert_paced(&wecom.arrivals(), 3, Duration::from_millis(450));
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_go_to_dead_with_the_errcode() {
    let (wecom, url) = stand_in(vec![Answer::Errcode(81013)]).await;
    let egress = Egress::start(&settings(&url, ""), &ENV);
    egress.send(&direct("r-1", "nobody", "hi"));
    egress.send(&reply(
        "r-2",
        "wecom",
        chat("wrcgroup", ChatKind::Group),
        "hi",
    ));
    eventually("two dead letters", || async { egress.dead().len() == 2 }).await;
    let errors: Vec<String> = egress.dead().into_iter().map(|dead| dead.error).collect();
    for expected in ["errcode 81013", "not a direct chat"] {
        assert!(
            errors.iter().any(|error| error.contains(expected)),
            "{expected:?} in {errors:?}"
        );
    }
    assert_eq!(wecom.sends(), 1, "the group reply is never sent");
    assert!(egress.receipts().is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_reported_without_the_secret() {
    let (wecom, url) = stand_in(Vec::new()).await;
    let wrong = "not-the-app-secret-0123456789";
    let egress = Egress::start(&settings(&url, ""), &[("BOTLINE_WECOM_SECRET", wrong)]);
    egress.send(&direct("r-1", "zhangsan", "hi"));
    eventually("a dead letter", || async { egress.dead().len() == 1 }).await;
    let error = &egress.dead()[0].error;
    assert!(error.contains("gettoken errcode 40001"), "{error}");
    assert!(!error.contains(wrong), "{error}");
    assert_eq!(wecom.sends(), 0);
    egress.stop().await;
}

#[tokio::test]
async fn settings_and_secret_are_checked_at_start() {
    let refused = |overlay: String, env: &[(&str, &str)]| {
        Egress::try_start(&overlay, env).err().unwrap().to_string()
    };
    let error = refused(settings("http://127.0.0.1:1", ""), &[]);
    assert!(error.contains("BOTLINE_WECOM_SECRET"), "{error}");
    let error = refused(
        settings("http://127.0.0.1:1", "").replace("agent_id = 1000002", "agent_id = 0"),
        &ENV,
    );
    assert!(error.contains("egress.platforms.wecom.agent_id"), "{error}");
    let error = refused(settings("http://127.0.0.1:1", "colour = 1\n"), &ENV);
    assert!(error.contains("colour"), "{error}");
}
