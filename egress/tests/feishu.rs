//! The Feishu sender against a local stand-in of Feishu's Open API that
//! checks each request as Feishu would (path, query, bearer token, JSON
//! shape; image uploads as multipart with `image_type` and `image`), keeps
//! Feishu's one-message-per-uuid rule, and can answer 429 with
//! `x-ogw-ratelimit-reset`, 5xx, or an invalid-token code.

mod senders;

use botline_shared::message::{Attachment, ChatKind};
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
    /// Every picture uploaded, by its image_key.
    uploads: Vec<(String, FormPart)>,
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
    if received.path() == "/open-apis/im/v1/images" {
        return upload(lark, received);
    }
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

/// `POST /open-apis/im/v1/images`: multipart with `image_type=message` and
/// the `image` file (a picture of at most 10 MB, not empty).
fn upload(lark: &mut Lark, received: &Received) -> Answer {
    let bearer = received
        .header("authorization")
        .and_then(|value| value.strip_prefix("Bearer "));
    if received.method != "POST"
        || bearer.is_none()
        || bearer != lark.tokens.last().map(String::as_str)
    {
        return answer(
            400,
            json!({"code": 99991663, "msg": "Invalid access token for authorization."}),
        );
    }
    let Some(parts) = received.multipart() else {
        lark.malformed
            .push("an upload that is not multipart/form-data".into());
        return answer(
            400,
            json!({"code": 234001, "msg": "Invalid request param."}),
        );
    };
    let field = |name: &str| parts.iter().find(|part| part.name == name);
    let image_type = field("image_type").map(|part| part.body.as_slice());
    let Some(image) = field("image").filter(|image| image.file_name.is_some()) else {
        lark.malformed
            .push("an upload without its image file".into());
        return answer(
            400,
            json!({"code": 234001, "msg": "Invalid request param."}),
        );
    };
    if image_type != Some(b"message".as_slice()) || parts.len() != 2 {
        lark.malformed.push(format!("upload fields {parts:?}"));
        return answer(
            400,
            json!({"code": 234001, "msg": "Invalid request param."}),
        );
    }
    if image.body.is_empty() {
        return answer(
            400,
            json!({"code": 234010, "msg": "File's size can't be 0."}),
        );
    }
    if image.body.len() > 10 * 1024 * 1024 {
        return answer(
            400,
            json!({"code": 234006, "msg": "The file size exceed the max value."}),
        );
    }
    let key = format!("img_v3_{}", lark.uploads.len() + 1);
    lark.uploads.push((key.clone(), image.clone()));
    answer(
        200,
        json!({"code": 0, "msg": "success", "data": {"image_key": key}}),
    )
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
    let content = body["content"]
        .as_str()
        .and_then(|content| serde_json::from_str::<Value>(content).ok());
    let content_ok = match (body["msg_type"].as_str(), content) {
        (Some("text"), Some(content)) => content["text"].is_string(),
        (Some("post"), Some(content)) => post_ok(lark, &content),
        _ => false,
    };
    if !content_ok {
        problems.push(format!("{} content {}", body["msg_type"], body["content"]));
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

/// A post's content: `{"zh_cn": {"content": [[element, …], …]}}`, each
/// element a text, an at or an img whose image_key was uploaded.
fn post_ok(lark: &Lark, content: &Value) -> bool {
    let Some(paragraphs) = content["zh_cn"]["content"].as_array() else {
        return false;
    };
    paragraphs.iter().all(|paragraph| {
        paragraph.as_array().is_some_and(|elements| {
            elements
                .iter()
                .all(|element| match element["tag"].as_str() {
                    Some("text") => element["text"].is_string(),
                    Some("at") => element["user_id"].is_string(),
                    Some("img") => element["image_key"].as_str().is_some_and(|key| {
                        lark.uploads.iter().any(|(uploaded, _)| uploaded == key)
                    }),
                    _ => false,
                })
        })
    })
}

/// The pictures are served on loopback, hence `image_private_hosts`.
fn overlay(url: &str, extra: &str) -> String {
    format!(
        "[egress.platforms.feishu]\nenabled = true\napp_id = \"{APP_ID}\"\nbase_url = \"{url}\"\n\
         image_private_hosts = true\n{extra}"
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

fn pictures() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    vec![
        ("/files/shop.png", "image/png", png(5000)),
        ("/files/huge.png", "image/png", png(2000)),
        (
            "/files/page.html",
            "text/html",
            b"<html>not a picture</html>".to_vec(),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_is_uploaded_then_sent_in_a_post_once_per_uuid() {
    let (lark, url) = start_lark().await;
    // The first send fails after the upload: the retry uploads again, and
    // the message is still made once (its uuid is the reply's id).
    lark.lock().unwrap().script = VecDeque::from([Script::ServerError]);
    let files = Files::start(pictures()).await;
    let egress = start(&url, "");
    let mut sent = feishu_reply("01JIMAGE0000000000000000F1", "oc_group");
    sent.text = "our shop @ou_84a\nopen 9-6".into();
    sent.mentions = vec!["ou_84a".into()];
    sent.attachments = vec![Attachment::image(
        format!("{}/files/shop.png", files.url),
        Some("the shop".into()),
    )];
    egress.send(&sent);
    let receipts = egress.delivered(1).await;
    assert_eq!(receipts[0].attempts, 2, "the 500 was retried");
    assert_eq!(receipts[0].platform_message_id.as_deref(), Some("om_1"));

    let lark = lark.lock().unwrap();
    assert!(lark.malformed.is_empty(), "{:?}", lark.malformed);
    assert_eq!(
        files.hits(),
        ["/files/shop.png", "/files/shop.png"],
        "fetched per attempt"
    );
    assert_eq!(lark.uploads.len(), 2, "uploaded per attempt");
    let (_, uploaded) = &lark.uploads[0];
    assert_eq!(
        uploaded,
        &FormPart {
            name: "image".into(),
            file_name: Some("image.png".into()),
            content_type: Some("image/png".into()),
            body: png(5000),
        }
    );
    assert_eq!(lark.sent.len(), 1);
    let body = lark.sent[0].json();
    assert_eq!(body["msg_type"], "post");
    assert_eq!(body["uuid"], "01JIMAGE0000000000000000F1");
    assert_eq!(body["receive_id"], "oc_group");
    let content: Value = serde_json::from_str(body["content"].as_str().unwrap()).unwrap();
    assert_eq!(
        content,
        json!({"zh_cn": {"content": [
            [{"tag": "text", "text": "our shop "}, {"tag": "at", "user_id": "ou_84a"}],
            [{"tag": "text", "text": "open 9-6"}],
            [{"tag": "img", "image_key": "img_v3_2"}],
        ]}})
    );
    // Both attempts carried the same uuid: Feishu made one message.
    assert_eq!(lark.by_uuid.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_that_cannot_be_had_sends_the_reply_to_dead_saying_why() {
    let (lark, url) = start_lark().await;
    let files = Files::start(pictures()).await;
    let egress = start(&url, "image_max_bytes = 1000\n");
    let cases = [
        (
            "01JBADIMG000000000000000G1",
            "/files/missing.png?sig=secret",
            "could not be fetched: HTTP 404",
        ),
        (
            "01JBADIMG000000000000000G2",
            "/files/huge.png",
            "is 2000 bytes, over feishu's limit of 1000 bytes",
        ),
        (
            "01JBADIMG000000000000000G3",
            "/files/page.html",
            "is not a picture feishu takes (jpg, png, gif, webp, bmp, tiff, ico)",
        ),
    ];
    for (id, path, _) in cases {
        let mut sent = feishu_reply(id, "oc_group");
        sent.attachments = vec![Attachment::image(format!("{}{path}", files.url), None)];
        egress.send(&sent);
    }
    eventually("three dead letters", || async { egress.dead().len() == 3 }).await;
    let mut errors: Vec<String> = egress.dead().into_iter().map(|dead| dead.error).collect();
    errors.sort();
    let mut expected: Vec<String> = cases
        .iter()
        .map(|(_, path, why)| {
            let shown = path.split('?').next().unwrap();
            format!("image {}{shown}: {why}", files.url)
        })
        .collect();
    expected.sort();
    assert_eq!(
        errors, expected,
        "each names its URL (without the query) and why"
    );
    let lark = lark.lock().unwrap();
    assert!(lark.uploads.is_empty(), "nothing uploaded");
    assert!(lark.sent.is_empty(), "nothing sent");
}
