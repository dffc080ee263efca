//! Telegram end to end: an update POSTed with the webhook's secret token to
//! the real ingest's /hooks/telegram comes out of the real egress as a
//! `sendMessage` on a local stand-in of the Bot API, quoting the message
//! and mentioning its sender; answered by a template that names an image,
//! as a `sendPhoto` with the template's text as its caption.

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use botline_shared::testing::{wait_for, RedisServer};
use botline_tests::{one_receipt, Pipeline};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECRET: &str = "e2e-webhook-secret_0123456789";
const TOKEN: &str = "999:AAE-e2e-bot-token_0123456789";

/// Each `/bot<token>/<method>` call: the method and its JSON body.
type Calls = Arc<Mutex<Vec<(String, Value)>>>;

async fn bot_api() -> (Calls, String) {
    let calls = Calls::default();
    let app = Router::new()
        .route(
            "/{bot}/{method}",
            post(
                |State(calls): State<Calls>,
                 Path((bot, method)): Path<(String, String)>,
                 Json(body): Json<Value>| async move {
                    if bot != format!("bot{TOKEN}") {
                        return Json(json!({"ok": false, "error_code": 401, "description": "Unauthorized"}));
                    }
                    calls.lock().unwrap().push((method, body.clone()));
                    Json(json!({"ok": true, "result": {"message_id": 9001, "date": 1441645600,
                        "chat": {"id": body["chat_id"], "type": "supergroup"}, "text": body["text"]}}))
                },
            ),
        )
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (calls, url)
}

/// Someone in a supergroup asks the bot, by its @username.
fn update() -> String {
    json!({
        "update_id": 424242,
        "message": {
            "message_id": 2201,
            "from": {"id": 1111111, "is_bot": false, "first_name": "Ann", "last_name": "Lee"},
            "chat": {"id": -1001234567890_i64, "title": "Support", "type": "supergroup"},
            "date": 1441645600,
            "text": "@support_bot hello",
            "entities": [{"type": "mention", "offset": 0, "length": 12}]
        }
    })
    .to_string()
}

/// The pipeline with Telegram on both sides, egress talking to `api_url`,
/// `extra` laid over the settings.
async fn telegram_pipeline(redis: &RedisServer, api_url: &str, extra: &str) -> Pipeline {
    let overlay = format!(
        "[runner]\nblock_ms = 200\n\
         [ingest.platforms.telegram]\nenabled = true\nbot_id = \"999\"\nbot_username = \"support_bot\"\n\
         [egress.platforms.telegram]\nenabled = true\napi_base_url = \"{api_url}\"\n{extra}"
    );
    let pipeline = Pipeline::start_with_env(
        redis,
        &overlay,
        &[
            ("BOTLINE_TELEGRAM_WEBHOOK_SECRET", SECRET),
            ("BOTLINE_TELEGRAM_BOT_TOKEN", TOKEN),
        ],
    );
    pipeline.wait_ready(Duration::from_secs(60)).await;
    pipeline
}

/// POST the update to ingest's Telegram webhook with `secret`; the status.
async fn post_update(pipeline: &Pipeline, secret: &str) -> u16 {
    reqwest::Client::new()
        .post(format!("{}/hooks/telegram", pipeline.base_url()))
        .header("X-Telegram-Bot-Api-Secret-Token", secret)
        .header("content-type", "application/json")
        .body(update())
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telegram_update_becomes_a_send_message_quoting_it() {
    let (calls, api_url) = bot_api().await;
    let redis = RedisServer::start();
    let pipeline = telegram_pipeline(&redis, &api_url, "").await;

    assert_eq!(post_update(&pipeline, "not-the-secret").await, 401);
    // Telegram retries until it gets a 2xx: the second copy adds nothing.
    for _ in 0..2 {
        assert_eq!(post_update(&pipeline, SECRET).await, 200);
    }

    wait_for("the reply at the Bot API", Duration::from_secs(60), || {
        !calls.lock().unwrap().is_empty()
    })
    .await;
    let (method, body) = calls.lock().unwrap()[0].clone();
    assert_eq!(method, "sendMessage");
    assert_eq!(body["chat_id"], json!(-1001234567890_i64));
    assert_eq!(body["parse_mode"], "HTML");
    assert_eq!(
        body["reply_parameters"],
        json!({"message_id": 2201, "allow_sending_without_reply": true})
    );
    let text = body["text"].as_str().unwrap();
    assert!(
        text.starts_with("<a href=\"tg://user?id=1111111\">Ann Lee</a> "),
        "{text}"
    );
    assert!(body.get("message_thread_id").is_none(), "{body}");

    // Delivered once: the receipt is there and no second call came.
    one_receipt(&redis).await;
    assert_eq!(calls.lock().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_with_an_image_becomes_a_send_photo() {
    const PICTURE: &str = "https://cdn.example.com/welcome.png";
    let (calls, api_url) = bot_api().await;
    let redis = RedisServer::start();
    let template = format!(
        "[respond.templates.greeting]\nen = \"Welcome, {{sender_name}}!\"\n\
         zh = \"欢迎，{{sender_name}}！\"\nimage = \"{PICTURE}\"\n"
    );
    let pipeline = telegram_pipeline(&redis, &api_url, &template).await;
    assert_eq!(post_update(&pipeline, SECRET).await, 200);

    one_receipt(&redis).await;
    assert_eq!(
        calls.lock().unwrap().clone(),
        [(
            "sendPhoto".to_string(),
            json!({
                "chat_id": -1001234567890_i64,
                "photo": PICTURE,
                "caption": "<a href=\"tg://user?id=1111111\">Ann Lee</a> Welcome, Ann Lee!",
                "parse_mode": "HTML",
                "reply_parameters": {"message_id": 2201, "allow_sending_without_reply": true},
            })
        )],
        "one sendPhoto, the template's text as its caption"
    );
}
