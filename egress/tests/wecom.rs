//! The WeCom sender against a local stand-in of WeCom's API (gettoken,
//! media/upload and message/send, checked as WeCom checks them) and a real
//! redis-server.

mod senders;

use botline_shared::message::{Attachment, ChatKind};
use senders::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const CORP_ID: &str = "ww0123456789abcdef";
const SECRET: &str = "app-secret-0123456789abcdefghijklmnop";
const AGENT_ID: u64 = 1_000_002;
const ENV: [(&str, &str); 1] = [("BOTLINE_WECOM_SECRET", SECRET)];
const SEND_PATH: &str = "/cgi-bin/message/send";
const UPLOAD_PATH: &str = "/cgi-bin/media/upload";

/// How the stand-in answers its n-th message/send (0-based).
#[derive(Debug, Clone, Copy)]
enum Script {
    Sent,
    Errcode(i64),
    /// An HTTP status with an optional Retry-After (seconds).
    Status(u16, Option<&'static str>),
    /// The token stops being valid before this request is checked.
    ExpireToken,
}

/// What the stand-in keeps between requests.
#[derive(Default)]
struct State {
    /// Tokens handed out; the last one is the valid one.
    tokens: Mutex<Vec<String>>,
    sends: AtomicUsize,
    script: Vec<Script>,
    /// Uploaded image media, by media_id.
    media: Mutex<Vec<(String, FormPart)>>,
}

/// The stand-in of WeCom's API, answering message/send by its script (then `Sent`).
struct WeCom {
    api: StandIn,
    state: Arc<State>,
}

impl WeCom {
    async fn start(script: Vec<Script>) -> WeCom {
        let state = Arc::new(State {
            script,
            ..State::default()
        });
        let shared = state.clone();
        let api = StandIn::start(move |_, received| answer_wecom(&shared, received)).await;
        WeCom { api, state }
    }

    fn tokens_fetched(&self) -> usize {
        self.state.tokens.lock().unwrap().len()
    }

    /// Every message/send request, answered well or not.
    fn sends(&self) -> Vec<Received> {
        let received = self.api.received();
        received
            .into_iter()
            .filter(|request| request.path() == SEND_PATH)
            .collect()
    }

    fn bodies(&self) -> Vec<Value> {
        self.sends().iter().map(Received::json).collect()
    }

    fn access_tokens(&self) -> Vec<String> {
        let sends = self.sends();
        sends
            .iter()
            .map(|sent| sent.query("access_token").unwrap_or_default())
            .collect()
    }
}

fn errcode(code: i64, message: &str) -> Answer {
    answer(200, json!({ "errcode": code, "errmsg": message }))
}

fn answer_wecom(state: &State, received: &Received) -> Answer {
    match (received.method.as_str(), received.path()) {
        ("GET", "/cgi-bin/gettoken") => gettoken(state, received),
        ("POST", SEND_PATH) => send(state, received),
        ("POST", UPLOAD_PATH) => upload(state, received),
        _ => (404, Vec::new(), String::new()),
    }
}

/// `POST /cgi-bin/media/upload?access_token&type=image`, the file in the
/// multipart field `media` (JPG or PNG, at most 10 MB).
fn upload(state: &State, received: &Received) -> Answer {
    if state.tokens.lock().unwrap().last() != received.query("access_token").as_ref() {
        return errcode(42001, "access_token expired");
    }
    if received.query("type").as_deref() != Some("image") {
        return errcode(40004, "invalid media type");
    }
    let Some(parts) = received.multipart() else {
        return errcode(41005, "media data missing");
    };
    let Some(media) = parts
        .iter()
        .find(|part| part.name == "media" && part.file_name.is_some())
    else {
        return errcode(41005, "media data missing");
    };
    let jpg_or_png = media.body.starts_with(b"\x89PNG") || media.body.starts_with(b"\xFF\xD8\xFF");
    if !jpg_or_png || media.body.len() > 10 * 1024 * 1024 || media.body.len() < 5 {
        return errcode(40005, "invalid file type");
    }
    let mut uploaded = state.media.lock().unwrap();
    let media_id = format!("MEDIA_{}", uploaded.len() + 1);
    uploaded.push((media_id.clone(), media.clone()));
    answer(
        200,
        json!({"errcode": 0, "errmsg": "", "type": "image", "media_id": media_id,
               "created_at": "1380000000"}),
    )
}

/// `GET /cgi-bin/gettoken?corpid&corpsecret`.
fn gettoken(state: &State, received: &Received) -> Answer {
    if received.query("corpid").as_deref() != Some(CORP_ID) {
        return errcode(40013, "invalid corpid");
    }
    if received.query("corpsecret").as_deref() != Some(SECRET) {
        return errcode(40001, "invalid credential");
    }
    let mut tokens = state.tokens.lock().unwrap();
    let token = format!("token-{}", tokens.len() + 1);
    tokens.push(token.clone());
    answer(
        200,
        json!({"errcode": 0, "errmsg": "ok", "access_token": token, "expires_in": 7200}),
    )
}

/// `POST /cgi-bin/message/send?access_token`: the token must be the one
/// handed out last, the body a text message from the app.
fn send(state: &State, received: &Received) -> Answer {
    let nth = state.sends.fetch_add(1, Ordering::SeqCst);
    let script = state.script.get(nth).copied().unwrap_or(Script::Sent);
    let mut tokens = state.tokens.lock().unwrap();
    if let Script::ExpireToken = script {
        tokens.push("expired-by-the-test".into());
    }
    if tokens.last() != received.query("access_token").as_ref() {
        return errcode(42001, "access_token expired");
    }
    if received.header("content-type") != Some("application/json") {
        return errcode(47001, "data format error");
    }
    let json: Value = serde_json::from_slice(&received.body).unwrap_or(Value::Null);
    let content_ok = match json["msgtype"].as_str() {
        Some("text") => json["text"]["content"]
            .as_str()
            .is_some_and(|text| !text.is_empty()),
        Some("image") => json["image"]["media_id"].as_str().is_some_and(|id| {
            state
                .media
                .lock()
                .unwrap()
                .iter()
                .any(|(uploaded, _)| uploaded == id)
        }),
        _ => false,
    };
    let shape_ok = json["touser"].is_string() && json["agentid"] == AGENT_ID && content_ok;
    if !shape_ok {
        return errcode(44004, "empty content or bad shape");
    }
    match script {
        Script::Sent | Script::ExpireToken => answer(
            200,
            json!({"errcode": 0, "errmsg": "ok", "invaliduser": "", "msgid": format!("msg-{nth}")}),
        ),
        Script::Errcode(code) => errcode(code, "refused by the test"),
        Script::Status(status, retry_after) => {
            let headers = retry_after
                .map(|seconds| ("retry-after", seconds.to_string()))
                .into_iter()
                .collect();
            (status, headers, "busy".into())
        }
    }
}

fn settings(url: &str, extra: &str) -> String {
    format!(
        "[egress.platforms.wecom]\nenabled = true\napi_base_url = \"{url}\"\n\
         corp_id = \"{CORP_ID}\"\nagent_id = {AGENT_ID}\nthrottled_retry_ms = 300\n\
         image_private_hosts = true\n{extra}"
    )
}

fn direct(id: &str, member: &str, text: &str) -> botline_shared::message::Reply {
    reply(id, "wecom", chat(member, ChatKind::Direct), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_sent_once_as_the_app_with_one_fetched_token() {
    let wecom = WeCom::start(Vec::new()).await;
    let egress = Egress::start(&settings(&wecom.api.url, ""), &ENV);
    egress.send(&direct("r-1", "zhangsan", "你好，张三"));
    egress.send(&direct("r-2", "lisi", "hello"));
    eventually("two receipts", || async { egress.receipts().len() == 2 }).await;

    // The two chats' replies go at once, in either order.
    let bodies = wecom.bodies();
    let mut sorted = bodies.clone();
    sorted.sort_by_key(|body| body["touser"].to_string());
    assert_eq!(
        sorted,
        [
            json!({"touser": "lisi", "msgtype": "text", "agentid": AGENT_ID,
                   "text": {"content": "hello"}}),
            json!({"touser": "zhangsan", "msgtype": "text", "agentid": AGENT_ID,
                   "text": {"content": "你好，张三"}}),
        ]
    );
    assert_eq!(wecom.tokens_fetched(), 1, "the token is cached");
    assert!(wecom.access_tokens().iter().all(|token| token == "token-1"));
    let receipts = egress.receipts();
    let receipt = receipts
        .iter()
        .find(|receipt| receipt.chat == "zhangsan")
        .unwrap();
    let nth = bodies
        .iter()
        .position(|body| body["touser"] == "zhangsan")
        .unwrap();
    assert_eq!(receipt.platform, "wecom");
    assert_eq!(receipt.attempts, 1);
    assert_eq!(
        receipt.platform_message_id.as_deref(),
        Some(format!("msg-{nth}").as_str())
    );
    assert!(egress.dead().is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_token_is_fetched_again_and_the_reply_sent() {
    let wecom = WeCom::start(vec![Script::Sent, Script::ExpireToken]).await;
    let egress = Egress::start(&settings(&wecom.api.url, ""), &ENV);
    egress.send(&direct("r-1", "zhangsan", "one"));
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;
    egress.send(&direct("r-2", "zhangsan", "two"));
    eventually("two receipts", || async { egress.receipts().len() == 2 }).await;

    assert_eq!(wecom.access_tokens(), ["token-1", "token-1", "token-3"]);
    assert_eq!(egress.receipts()[1].attempts, 2);
    assert!(egress.dead().is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frequency_limits_429_and_server_errors_are_retried_until_sent() {
    let script = vec![
        Script::Errcode(45009),
        Script::Status(429, Some("1")),
        Script::Status(502, None),
    ];
    let wecom = WeCom::start(script).await;
    let egress = Egress::start(&settings(&wecom.api.url, ""), &ENV);
    egress.send(&direct("r-1", "zhangsan", "hi"));
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;

    let sends = wecom.sends();
    assert_eq!(sends.len(), 4, "sent once it went through, never again");
    assert_eq!(egress.receipts()[0].attempts, 4);
    assert!(
        sends[1].at - sends[0].at >= Duration::from_millis(300),
        "45009 waits throttled_retry_ms"
    );
    assert!(
        sends[2].at - sends[1].at >= Duration::from_secs(1),
        "429 honours Retry-After"
    );
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_members_replies_are_paced_by_the_member_limit() {
    let wecom = WeCom::start(Vec::new()).await;
    // 120 a minute: one every 500 ms.
    let limits = "member_per_minute = 120\nmember_per_hour = 100000\n";
    let egress = Egress::start(&settings(&wecom.api.url, limits), &ENV);
    for n in 0..3 {
        egress.send(&direct(
            &format!("r-{n}"),
            "zhangsan",
            &format!("reply {n}"),
        ));
    }
    eventually("three receipts", || async { egress.receipts().len() == 3 }).await;
    assert_paced(&wecom.sends(), 3, Duration::from_millis(450));
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_go_to_dead_with_the_errcode() {
    let wecom = WeCom::start(vec![Script::Errcode(81013)]).await;
    let egress = Egress::start(&settings(&wecom.api.url, ""), &ENV);
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
    assert_eq!(wecom.sends().len(), 1, "the group reply is never sent");
    assert!(egress.receipts().is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_reported_without_the_secret() {
    let wecom = WeCom::start(Vec::new()).await;
    let wrong = "not-the-app-secret-0123456789";
    let egress = Egress::start(
        &settings(&wecom.api.url, ""),
        &[("BOTLINE_WECOM_SECRET", wrong)],
    );
    egress.send(&direct("r-1", "zhangsan", "hi"));
    eventually("a dead letter", || async { egress.dead().len() == 1 }).await;
    let error = &egress.dead()[0].error;
    assert!(error.contains("gettoken errcode 40001"), "{error}");
    assert!(!error.contains(wrong), "{error}");
    assert!(wecom.sends().is_empty());
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_is_uploaded_and_sent_as_an_image_message_before_the_text() {
    // The text's first send is throttled: its retry sends the text only,
    // never the picture again.
    let wecom = WeCom::start(vec![Script::Sent, Script::Errcode(45009)]).await;
    let files = Files::start(vec![("/shop.jpg", "image/jpeg", {
        let mut jpeg = b"\xFF\xD8\xFF\xE0\0\x10JFIF".to_vec();
        jpeg.resize(3000, 1);
        jpeg
    })])
    .await;
    let fast = "member_per_minute = 600\n";
    let egress = Egress::start(&settings(&wecom.api.url, fast), &ENV);
    let mut sent = direct("r-1", "zhangsan", "our shop");
    sent.attachments = vec![Attachment::image(format!("{}/shop.jpg", files.url), None)];
    egress.send(&sent);
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;

    let received = wecom.api.received();
    let upload = received
        .iter()
        .find(|request| request.path() == UPLOAD_PATH)
        .unwrap();
    assert_eq!(upload.query("type").as_deref(), Some("image"));
    assert_eq!(upload.query("access_token").as_deref(), Some("token-1"));
    let parts = upload.multipart().unwrap();
    assert_eq!(parts.len(), 1);
    assert_eq!(parts[0].name, "media");
    assert_eq!(parts[0].file_name.as_deref(), Some("image.jpg"));
    assert_eq!(parts[0].content_type.as_deref(), Some("image/jpeg"));
    assert_eq!(parts[0].body.len(), 3000);
    assert_eq!(
        wecom.bodies(),
        [
            json!({"touser": "zhangsan", "agentid": AGENT_ID, "msgtype": "image",
                   "image": {"media_id": "MEDIA_1"}}),
            json!({"touser": "zhangsan", "agentid": AGENT_ID, "msgtype": "text",
                   "text": {"content": "our shop"}}),
            json!({"touser": "zhangsan", "agentid": AGENT_ID, "msgtype": "text",
                   "text": {"content": "our shop"}}),
        ],
        "the picture once, the text again after its refusal"
    );
    assert_eq!(files.hits().len(), 1, "fetched once");
    assert_eq!(wecom.state.media.lock().unwrap().len(), 1, "uploaded once");
    assert_eq!(
        egress.receipts()[0].platform_message_id.as_deref(),
        Some("msg-0")
    );
    assert!(egress.dead().is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_wecom_cannot_take_sends_the_reply_to_dead() {
    let wecom = WeCom::start(Vec::new()).await;
    let files = Files::start(vec![(
        "/anim.gif",
        "image/gif",
        b"GIF89a\x01\0\x01\0".to_vec(),
    )])
    .await;
    let egress = Egress::start(&settings(&wecom.api.url, ""), &ENV);
    let mut sent = direct("r-1", "zhangsan", "look");
    sent.attachments = vec![Attachment::image(format!("{}/anim.gif", files.url), None)];
    egress.send(&sent);
    eventually("a dead letter", || async { egress.dead().len() == 1 }).await;
    assert_eq!(
        egress.dead()[0].error,
        format!(
            "image {}/anim.gif: is not a picture wecom takes (jpg, png)",
            files.url
        )
    );
    assert!(wecom.sends().is_empty(), "nothing sent, not even the text");
    egress.stop().await;
}
