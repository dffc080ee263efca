//! The Feishu sender against a local stand-in of Feishu's Open API that
//! checks each request as Feishu would (path, query, bearer token, JSON
//! shape), keeps Feishu's one-message-per-uuid rule, and can answer 429 with
//! `x-ogw-ratelimit-reset`, 5xx, or an invalid-token code.

mod senders;

use botline_shared::message::ChatKind;
use senders::*;
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const APP_ID: &str = "cli_a1b2c3d4e5f60718";
const APP_SECRET: &str = "dskLLdkasdjlasdKK";
const MESSAGES: &str = "/open-apis/im/v1/messages";

/// How the stand-in answers the next send.
#[derive(Debug, Clone, Copy)]
enum Script {
    RateLimited {
        reset_secs: u64,
    },
    ServerError,
    /// The token stops being valid (as if it expired early).
    RevokeToken,
}

#[derive(Default)]
struct Lark {
    /// Every token handed out; only the last is valid.
    tokens: Vec<String>,
    script: VecDeque<Script>,
    /// The sends Feishu accepted.
    sent: Vec<Received>,
    /// uuid → message_id: a uuid seen before makes no new message.
    by_uuid: HashMap<String, String>,
    /// Requests Feishu would refuse as malformed, with why.
    malformed: Vec<String>,
    refuse_credentials: bool,
}

type Shared = Arc<Mutex<Lark>>;

async fn start_lark() -> (Shared, String) {
    let lark = Shared::default();
    let shared = lark.clone();
    let api =
        StandIn::start(move |_, received| answer_lark(&mut shared.lock().unwrap(), received)).await;
    (lark, api.url)
}

fn answer_lark(lark: &mut Lark, received: &Received) -> Answer {
    let json_body = received
        .header("content-type")
        .is_some_and(|value| value.starts_with("application/json"));
    let body = serde_json::from_slice::<Value>(&received.body).ok();
    let (Some(body), true, "POST") = (body, json_body, received.method.as_str()) else {
        lark.malformed
            .push(format!("not a JSON POST: {}", received.uri));
        return answer(400, json!({"code": 9499, "msg": "Bad Request"}));
    };
    let path = received.path();
    if path == "/open-apis/auth/v3/tenant_access_token/internal" {
        return token(lark, &body);
    }
    if path == MESSAGES {
        return create(lark, received, body);
    }
    match path
        .strip_prefix("/open-apis/im/v1/messages/")
        .and_then(|rest| rest.strip_suffix("/reply"))
    {
        Some(message_id) if !message_id.contains('/') => reply_to(lark, received, body),
        _ => answer(404, json!({"code": 404, "msg": "404 page not found"})),
    }
}

fn token(lark: &mut Lark, body: &Value) -> Answer {
    if lark.refuse_credentials || *body != json!({"app_id": APP_ID, "app_secret": APP_SECRET}) {
        return answer(200, json!({"code": 10014, "msg": "app secret invalid"}));
    }
    let token = format!(
        "t-g1044ghJRUIJJ5ZPPZMOHKWZISL33E4QSS3ab{}",
        lark.tokens.len()
    );
    lark.tokens.push(token.clone());
    answer(
        200,
        json!({"code": 0, "msg": "ok", "tenant_access_token": token, "expire": 7200}),
    )
}

fn create(lark: &mut Lark, received: &Received, body: Value) -> Answer {
    let mut problems = Vec::new();
    let receive_id_type = received.query("receive_id_type");
    if receive_id_type.as_deref() != Some("chat_id") {
        problems.push(format!("receive_id_type {receive_id_type:?}"));
    }
    if !body["receive_id"]
        .as_str()
        .is_some_and(|id| id.starts_with("oc_"))
    {
        problems.push(format!("receive_id {}", body["receive_id"]));
    }
    send(lark, received, body, problems)
}

fn reply_to(lark: &mut Lark, received: &Received, body: Value) -> Answer {
    let mut problems = Vec::new();
    if body.get("receive_id").is_some() {
        problems.push("a reply has no receive_id".into());
    }
    if !body["reply_in_thread"].is_boolean() {
        problems.push(format!("reply_in_thread {}", body["reply_in_thread"]));
    }
    send(lark, received, body, problems)
}

/// Checks common to both send APIs, then the scripted or the normal answer.
fn send(lark: &mut Lark, received: &Received, body: Value, mut problems: Vec<String>) -> Answer {
    let bearer = received
        .header("authorization")
        .and_then(|value| value.strip_prefix("Bearer "));
    let invalid_token = || {
        answer(
            400,
            json!({"code": 99991663, "msg": "Invalid access token for authorization."}),
        )
    };
    if bearer.is_none() || bearer != lark.tokens.last().map(String::as_str) {
        return invalid_token();
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
        return answer(
            400,
            json!({"code": 230001, "msg": "invalid request parameter"}),
        );
    }
    match lark.script.pop_front() {
        Some(Script::RateLimited { reset_secs }) => {
            let limited = json!({"code": 99991400, "msg": "request trigger frequency limit"});
            return (
                429,
                vec![
                    ("x-ogw-ratelimit-limit", "50".to_string()),
                    ("x-ogw-ratelimit-reset", reset_secs.to_string()),
                ],
                limited.to_string(),
            );
        }
        Some(Script::ServerError) => return (500, Vec::new(), "upstream failure".into()),
        Some(Script::RevokeToken) => {
            lark.tokens.push("revoked".into());
            return invalid_token();
        }
        None => {}
    }
    let next = format!("om_{}", lark.by_uuid.len() + 1);
    let message_id = lark.by_uuid.entry(uuid).or_insert(next).clone();
    lark.sent.push(received.clone());
    answer(
        200,
        json!({"code": 0, "msg": "success", "data": {"message_id": message_id}}),
    )
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
    let receipts = egress.delivered(2).await;

    let lark = lark.lock().unwrap();
    assert!(lark.malformed.is_empty(), "{:?}", lark.malformed);
    assert_eq!(lark.tokens.len(), 1, "one token for both");
    assert_eq!(lark.sent.len(), 2, "each once");
    let replied = lark
        .sent
        .iter()
        .find(|sent| sent.path().ends_with("/reply"))
        .unwrap();
    assert_eq!(
        replied.path(),
        "/open-apis/im/v1/messages/om_dc13264520392913993dd051dba21dcf/reply"
    );
    assert_eq!(
        replied.json(),
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
        .find(|sent| sent.path() == MESSAGES)
        .unwrap();
    assert_eq!(created.json()["receive_id"], "oc_group");
    assert_eq!(created.json()["uuid"], "01JREPLY0000000000000000A2");
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
        VecDeque::from([Script::RateLimited { reset_secs: 1 }, Script::ServerError]);
    let egress = start(&url, "");
    let refused_at = Instant::now();
    egress.send(&feishu_reply("01JRETRY0000000000000000B1", "oc_a"));
    let receipts = egress.delivered(1).await;
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
    egress.delivered(1).await;
    lark.lock().unwrap().script = VecDeque::from([Script::RevokeToken]);
    egress.send(&feishu_reply("01JTOKEN0000000000000000C2", "oc_a"));
    let receipts = egress.delivered(2).await;
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
    egress.delivered(6).await;
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
