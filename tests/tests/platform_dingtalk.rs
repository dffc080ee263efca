//! DingTalk end to end: a signed robot callback POSTed to the real ingest's
//! /hooks/dingtalk comes out of the real egress as a POST to the message's
//! session webhook, here a local stand-in of DingTalk.

use axum::extract::{RawQuery, State};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use botline_shared::testing::{wait_for, RedisServer};
use botline_tests::Pipeline;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const APP_SECRET: &str = "GT-lsu-taDAsTsxxxx-app-secret";
const SENDER: &str = "2220111111";

/// Each POST to the session webhook: its query and JSON body.
type Posts = Arc<Mutex<Vec<(String, Value)>>>;

async fn session_webhook() -> (Posts, String) {
    let posts = Posts::default();
    let app =
        Router::new()
            .route(
                "/robot/sendBySession",
                post(
                    |State(posts): State<Posts>,
                     RawQuery(query): RawQuery,
                     Json(body): Json<Value>| async move {
                        posts
                            .lock()
                            .unwrap()
                            .push((query.unwrap_or_default(), body));
                        Json(json!({"errcode": 0, "errmsg": "ok"}))
                    },
                ),
            )
            .with_state(posts.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (posts, url)
}

/// The callback DingTalk makes when someone mentions the robot in a group.
fn callback(webhook_base: &str) -> String {
    json!({
        "conversationId": "cid6KeBBLoveMJOGXoYKF5x7EeiodoA==",
        "atUsers": [{"dingtalkId": "$:LWCP_v1:$Bg6fyAmFXhmSTZWJpGfJk5oA0tg34Luh"}],
        "chatbotCorpId": "dinge8a565xxxx",
        "chatbotUserId": "$:LWCP_v1:$Bg6fyAmFXhmSTZWJpGfJk5oA0tg34Luh",
        "msgId": "msgJgSk2JCaQ2DcNZWmBvF4Zw==",
        "senderNick": "张三",
        "isAdmin": true,
        "senderStaffId": SENDER,
        "sessionWebhookExpiredTime": botline_shared::now_ms() + 5_400_000,
        "createAt": botline_shared::now_ms(),
        "senderCorpId": "dinge8a565xxxx",
        "conversationType": "2",
        "senderId": "$:LWCP_v1:$dwxxxxx==",
        "conversationTitle": "机器人测试-TEST",
        "isInAtList": true,
        "sessionWebhook": format!("{webhook_base}/robot/sendBySession?session=eb18e18e8669b0a3cd7dff1388fe5e6a"),
        "text": {"content": " 你好"},
        "robotCode": "dingxxxxx",
        "msgtype": "text"
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_dingtalk_callback_becomes_a_post_to_its_session_webhook() {
    let redis = RedisServer::start();
    let (posts, url) = session_webhook().await;
    let overlay = format!(
        "[runner]\nblock_ms = 200\n\
         [ingest.platforms.dingtalk]\nenabled = true\n\
         [egress.platforms.dingtalk]\nenabled = true\nsession_webhook_base = \"{url}/robot/\"\n"
    );
    let pipeline = Pipeline::start_with_env(
        &redis,
        &overlay,
        &[("BOTLINE_DINGTALK_APP_SECRET", APP_SECRET)],
    );
    pipeline.wait_ready(Duration::from_secs(60)).await;

    let timestamp = botline_shared::now_ms().to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(APP_SECRET.as_bytes()).unwrap();
    mac.update(format!("{timestamp}\n{APP_SECRET}").as_bytes());
    let sign = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let answer = reqwest::Client::new()
        .post(format!("{}/hooks/dingtalk", pipeline.base_url()))
        .header("content-type", "application/json")
        .header("timestamp", timestamp)
        .header("sign", sign)
        .body(callback(&url))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);

    wait_for(
        "the reply at the session webhook",
        Duration::from_secs(60),
        || !posts.lock().unwrap().is_empty(),
    )
    .await;
    let posts = posts.lock().unwrap().clone();
    assert_eq!(posts.len(), 1, "{posts:?}");
    let (query, body) = &posts[0];
    assert_eq!(query, "session=eb18e18e8669b0a3cd7dff1388fe5e6a");
    assert_eq!(body["msgtype"], "text");
    assert_eq!(body["at"], json!({"atUserIds": [SENDER], "isAtAll": false}));
    let text = body["text"]["content"].as_str().unwrap();
    assert!(
        text.starts_with(&format!("@{SENDER} ")),
        "the sender is mentioned: {text}"
    );
    assert!(text.len() > SENDER.len() + 10, "and answered: {text}");
}
