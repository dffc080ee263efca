//! The Feishu sender against a local stand-in of Feishu's Open API that
//! checks each request as Feishu would (path, query, bearer token, JSON
//! shape), keeps Feishu's one-message-per-uuid rule, and can answer 429 with
//! `x-ogw-ratelimit-reset`, 5xx, or an invalid-token code.

mod senders;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use botline_shared::message::{ChatKind, Receipt};
use senders::*;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const APP_ID: &str = "cli_a1b2c3d4e5f60718";
const APP_SECRET: &str = "dskLLdkasdjlasdKK";

/// How the stand-in answers the next send.
#[derive(Debug, Clone, Copy)]
enum Answer {
    RateLimited {
        reset_secs: u64,
    },
    ServerError,
    /// The token stops being valid (as if it expired early).
    RevokeToken,
}

/// A send Feishu accepted: which API, for whom, and when.
#[derive(Debug, Clone)]
struct Sent {
    at: Instant,
    path: String,
    body: Value,
}

#[derive(Default)]
struct Lark {
    /// Every token handed out; only the last is valid.
    tokens: Vec<String>,
    script: VecDeque<Answer>,
    sent: Vec<Sent>,
    /// uuid → message_id: a uuid seen before makes no new message.
    by_uuid: HashMap<String, String>,
    /// Requests Feishu would refuse as malformed, with why.
    malformed: Vec<String>,
    refuse_credentials: bool,
}

type Shared = Arc<Mutex<Lark>>;

async fn start_lark() -> (Shared, String) {
    let lark = Shared::default();
    let app = Router::new()
        .route(
            "/open-apis/auth/v3/tenant_access_token/internal",
            post(token),
        )
        .route("/open-apis/im/v1/messages", post(create))
        .route(
            "/open-apis/im/v1/messages/{message_id}/reply",
            post(reply_to),
        )
        .with_state(lark.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (lark, url)
}

async fn token(State(lark): State<Shared>, Json(body): Json<Value>) -> Json<Value> {
    let mut lark = lark.lock().unwrap();
    if lark.refuse_credentials || body != json!({"app_id": APP_ID, "app_secret": APP_SECRET}) {
        return Json(json!({"code": 10014, "msg": "app secret invalid"}));
    }
    let token = format!(
        "t-g1044ghJRUIJJ5ZPPZMOHKWZISL33E4QSS3ab{}",
        lark.tokens.len()
    );
    lark.tokens.push(token.clone());
    Json(json!({"code": 0, "msg": "ok", "tenant_access_token": token, "expire": 7200}))
}

async fn create(
    State(lark): State<Shared>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut problems = Vec::new();
    if query.get("receive_id_type").map(String::as_str) != Some("chat_id") {
        problems.push(format!("receive_id_type {query:?}"));
    }
    if !body["receive_id"]
        .as_str()
        .is_some_and(|id| id.starts_with("oc_"))
    {
        problems.push(format!("receive_id {}", body["receive_id"]));
    }
    answer(
        &lark,
        "/open-apis/im/v1/messages".into(),
        &headers,
        body,
        problems,
    )
}

async fn reply_to(
    State(lark): State<Shared>,
    Path(message_id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut problems = Vec::new();
    if body.get("receive_id").is_some() {
        problems.push("a reply has no receive_id".into());
    }
    if !body["reply_in_thread"].is_boolean() {
        problems.push(format!("reply_in_thread {}", body["reply_in_thread"]));
    }
    let path = format!("/open-apis/im/v1/messages/{message_id}/reply");
    answer(&lark, path, &headers, body, problems)
}

/// Checks common to both send APIs, then the scripted or the normal answer.
fn answer(
    lark: &Shared,
    path: String,
    headers: &HeaderMap,
    body: Value,
    mut problems: Vec<String>,
) -> Response {
    let mut lark = lark.lock().unwrap();
    let bearer = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if bearer.is_none() || bearer != lark.tokens.last().map(String::as_str) {
        let invalid = json!({"code": 99991663, "msg": "Invalid access token for authorization."});
        return (StatusCode::BAD_REQUEST, Json(invalid)).into_response();
    }
    if body["msg_type"] != "text" {
        problems.push(format!("msg_type {}", body["msg_type"]));
    }
    let content = body["content"]
        .as_str()
        .and_then(|content| serde_json::from_str::<Value>(content).ok());
    if !content.is_some_and(|content| content["text"].is_string()) {
        problems.push(format!("content {}", body["content"]));
    }
    let uuid = body["uuid"].as_str().unwrap_or_default().to_string();
    if uuid.is_empty() || uuid.chars().count() > 50 {
        problems.push(format!("uuid {uuid:?}"));
    }
    if !problems.is_empty() {
        lark.malformed.extend(problems);
        let refused = json!({"code": 230001, "msg": "invalid request parameter"});
        return (StatusCode::BAD_REQUEST, Json(refused)).into_response();
    }
    match lark.script.pop_front() {
        Some(Answer::RateLimited { reset_secs }) => {
            let limited = json!({"code": 99991400, "msg": "request trigger frequency limit"});
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [
                    ("x-ogw-ratelimit-limit", "50".to_string()),
                    ("x-ogw-ratelimit-reset", reset_secs.to_string()),
                ],
                Json(limited),
            )
                .into_response();
        }
        Some(Answer::ServerError) => {
            return (StatusCode::INTERNAL_SERVER_ERROR, "upstream failure").into_response()
        }
        Some(Answer::RevokeToken) => {
            lark.tokens.push("revoked".into());
            let invalid =
                json!({"code": 99991663, "msg": "Invalid access token for authorization."});
            return (StatusCode::BAD_REQUEST, Json(invalid)).into_response();
        }
        None => {}
    }
    let next = format!("om_{}", lark.by_uuid.len() + 1);
    let message_id = lark.by_uuid.entry(uuid).or_insert(next).clone();
    lark.sent.push(Sent {
        at: Instant::now(),
        path,
        body,
    });
    Json(json!({"code": 0, "msg": "success", "data": {"message_id": message_id}})).into_response()
}

fn overlay(url: &str, extra: &str) -> String {
    format!(
        "[egress.platforms.feishu]\nenabled = true\napp_id = \"{APP_ID}\"\nbase_url = \"{url}\"\n{extra}"
    )
}

fn start(url: &str, extra: &str) -> Egress {
    Egress::start(
        &overlay(url, extra),
        &[("BOTLINE_FEISHU_APP_SECRET", APP_SECRET)],
    )
}

fn feishu_reply(id: &str, chat_id: &str) -> botline_shared::message::Reply {
    reply(
        id,
        "feishu",
        chat(chat_id, ChatKind::Group),
        &format!("answer {id}"),
    )
}

/// The receipts once there are `count`.
async fn delivered(egress: &Egress, count: usize) -> Vec<Receipt> {
    eventually(&format!("{count} receipts"), || async {
        egress.receipts().len() >= count
    })
    .await;
    egress.receipts()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_and_chat_messages_arrive_once_as_feishu_expects() {
    let (lark, url) = start_lark().await;
    let egress = start(&url, "");
    let mut quoted = feishu_reply("01JREPLY0000000000000000A1", "oc_group");
    quoted.reply_to = Some("om_dc13264520392913993dd051dba21dcf".into());
    quoted.thread = Some("omt_d4be107c616".into());
    quoted.mentions = vec!["ou_84aad35d084aa403a838cf73ee18467".into()];
    egress.send(&quoted);
    egress.send(&feishu_reply("01JREPLY0000000000000000A2", "oc_group"));
    let receipts = delivered(&egress, 2).await;

    let lark = lark.lock().unwrap();
    assert!(lark.malformed.is_empty(), "{:?}", lark.malformed);
    assert_eq!(lark.tokens.len(), 1, "one token for both");
    assert_eq!(lark.sent.len(), 2, "each once");
    let replied = lark
        .sent
        .iter()
        .find(|sent| sent.path.ends_with("/reply"))
        .unwrap();
    assert_eq!(
        replied.path,
        "/open-apis/im/v1/messages/om_dc13264520392913993dd051dba21dcf/reply"
    );
    assert_eq!(
        replied.body,
        json!({
            "msg_type": "text",
            "content": r#"{"text":"<at user_id=\"ou_84aad35d084aa403a838cf73ee18467\"></at> answer 01JREPLY0000000000000000A1"}"#,
            "reply_in_thread": true,
            "uuid": "01JREPLY0000000000000000A1",
        })
    );
    let created = lark
        .sent
        .iter()
        .find(|sent| sent.path == "/open-apis/im/v1/messages")
        .unwrap();
    assert_eq!(created.body["receive_id"], "oc_group");
    assert_eq!(created.body["uuid"], "01JREPLY0000000000000000A2");
    let mut ids: Vec<_> = receipts
        .iter()
        .map(|receipt| receipt.platform_message_id.clone().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["om_1", "om_2"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_waits_for_its_reset_and_a_5xx_is_retried() {
    let (lark, url) = start_lark().await;
    lark.lock().unwrap().script =
        VecDeque::from([Answer::RateLimited { reset_secs: 1 }, Answer::ServerError]);
    let egress = start(&url, "");
    let refused_at = Instant::now();
    egress.send(&feishu_reply("01JRETRY0000000000000000B1", "oc_a"));
    let receipts = delivered(&egress, 1).await;
    assert_eq!(receipts[0].attempts, 3);
    let lark = lark.lock().unwrap();
    assert_eq!(lark.sent.len(), 1, "delivered once");
    assert!(
        lark.sent[0].at - refused_at >= Duration::from_secs(1),
        "x-ogw-ratelimit-reset was waited"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_feishu_calls_invalid_is_fetched_anew() {
    let (lark, url) = start_lark().await;
    let egress = start(&url, "");
    egress.send(&feishu_reply("01JTOKEN0000000000000000C1", "oc_a"));
    delivered(&egress, 1).await;
    lark.lock().unwrap().script = VecDeque::from([Answer::RevokeToken]);
    egress.send(&feishu_reply("01JTOKEN0000000000000000C2", "oc_a"));
    let receipts = delivered(&egress, 2).await;
    assert_eq!(receipts[1].attempts, 2);
    let lark = lark.lock().unwrap();
    assert_eq!(lark.tokens.len(), 3, "first, revoked, fetched anew");
    assert_eq!(lark.sent.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_credentials_send_the_reply_to_dead_without_the_secret() {
    let (lark, url) = start_lark().await;
    lark.lock().unwrap().refuse_credentials = true;
    let egress = start(&url, "");
    egress.send(&feishu_reply("01JCREDS0000000000000000D1", "oc_a"));
    eventually("a dead letter", || async { !egress.dead().is_empty() }).await;
    let dead = egress.dead();
    assert!(dead[0].error.contains("code 10014"), "{}", dead[0].error);
    assert!(!dead[0].error.contains(APP_SECRET));
    assert!(lark.lock().unwrap().sent.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_chat_gets_no_more_than_its_rate() {
    let (lark, url) = start_lark().await;
    let egress = start(&url, "per_chat_per_second = 2\n");
    for n in 0..6 {
        egress.send(&feishu_reply(
            &format!("01JRATE00000000000000000E{n}"),
            "oc_busy",
        ));
    }
    delivered(&egress, 6).await;
    let lark = lark.lock().unwrap();
    assert_eq!(lark.sent.len(), 6);
    let mut times: Vec<Instant> = lark.sent.iter().map(|sent| sent.at).collect();
    times.sort();
    for window in times.windows(3) {
        assert!(
            window[2] - window[0] >= Duration::from_millis(900),
            "three sends to one chat within {:?}",
            window[2] - window[0]
        );
    }
}

#[tokio::test]
async fn an_enabled_feishu_needs_its_app_id_and_secret() {
    let url = "http://127.0.0.1:1";
    let missing = Egress::try_start(&overlay(url, ""), &[]).err().unwrap();
    assert_eq!(
        missing.to_string(),
        "setting BOTLINE_FEISHU_APP_SECRET: is not set"
    );
    let no_app = Egress::try_start(
        &format!("[egress.platforms.feishu]\nenabled = true\nbase_url = \"{url}\"\n"),
        &[("BOTLINE_FEISHU_APP_SECRET", APP_SECRET)],
    )
    .err()
    .unwrap();
    assert_eq!(
        no_app.to_string(),
        "setting egress.platforms.feishu.app_id: must be set (the app's App ID, cli_…)"
    );
}
