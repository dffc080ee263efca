//! Telegram end to end: an update POSTed with the webhook's secret token to
//! the real ingest's /hooks/telegram comes out of the real egress as a
//! `sendMessage` on a local stand-in of the Bot API, quoting the message
//! and mentioning its sender.

use axum::extract::{Path, State};
use axum::routing::post;
use axum::{Json, Router};
use botline_shared::testing::{wait_for, RedisServer};
use botline_tests::Pipeline;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_telegram_update_becomes_a_send_message_quoting_it() {
    let (calls, api_url) = bot_api().await;
    let redis = RedisServer::start();
    let overlay = format!(
        "[runner]\nblock_ms = 200\n\
         [ingest.platforms.telegram]\nenabled = true\nbot_id = \"999\"\nbot_username = \"support_bot\"\n\
         [egress.platforms.telegram]\nenabled = true\napi_base_url = \"{api_url}\"\n"
    );
    let pipeline = Pipeline::start_with_env(
        &redis,
        &overlay,
        &[
            ("BOTLINE_TELEGRAM_WEBHOOK_SECRET", SECRET),
            ("BOTLINE_TELEGRAM_BOT_TOKEN", TOKEN),
        ],
    );
    pipeline.wait_ready(Duration::from_secs(60)).await;

    let client = reqwest::Client::new();
    let hook = format!("{}/hooks/telegram", pipeline.base_url());
    let forged = client
        .post(&hook)
        .header("X-Telegram-Bot-Api-Secret-Token", "not-the-secret")
        .body(update())
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    // Telegram retries until it gets a 2xx: the second copy adds nothing.
    for _ in 0..2 {
        let answer = client
            .post(&hook)
            .header("X-Telegram-Bot-Api-Secret-Token", SECRET)
            .header("content-type", "application/json")
            .body(update())
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), 200);
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
    let delivered = botline_shared::streams::Streams::default().delivered();
    wait_for("the receipt", Duration::from_secs(30), || {
        redis::cmd("XLEN")
            .arg(&delivered)
            .query::<usize>(&mut redis.connection())
            .unwrap_or(0)
            == 1
    })
    .await;
    assert_eq!(calls.lock().unwrap().len(), 1);
}
