//! Slack end to end: an `app_mention` event signed with the signing secret
//! and POSTed to the real ingest's /hooks/slack comes out of the real
//! egress as a `chat.postMessage` on a local stand-in of Slack's Web API,
//! mentioning its sender.

use axum::extract::State;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use botline_shared::testing::{wait_for, RedisServer};
use botline_tests::Pipeline;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SIGNING_SECRET: &str = "e2e-slack-signing-secret-0123456789";
const TOKEN: &str = "xoxb-e2e-0000-slack-bot-token";

/// Each chat.postMessage: its Authorization header and JSON body.
type Posts = Arc<Mutex<Vec<(String, Value)>>>;

async fn web_api() -> (Posts, String) {
    let posts = Posts::default();
    let app = Router::new()
        .route(
            "/api/chat.postMessage",
            post(
                |State(posts): State<Posts>, headers: HeaderMap, Json(body): Json<Value>| async move {
                    let authorization = headers
                        .get("authorization")
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    posts.lock().unwrap().push((authorization, body.clone()));
                    Json(json!({"ok": true, "channel": body["channel"], "ts": "1515449600.000100"}))
                },
            ),
        )
        .with_state(posts.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (posts, url)
}

/// Slack's documented `app_mention` event, the bot being U0LAN0Z89.
fn event() -> String {
    json!({
        "token": "ZZZZZZWSxiZZZ2yIvs3peJ",
        "team_id": "T061EG9R6",
        "api_app_id": "A0MDYCDME",
        "event": {
            "type": "app_mention",
            "user": "U061F7AUR",
            "text": "<@U0LAN0Z89> hello",
            "ts": "1515449522.000016",
            "channel": "C0LAN2Q65",
            "event_ts": "1515449522.000016"
        },
        "type": "event_callback",
        "event_id": "Ev0LAN670R",
        "event_time": 1515449522
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_mention_becomes_a_post_in_its_channel() {
    let (posts, api_url) = web_api().await;
    let redis = RedisServer::start();
    let overlay = format!(
        "[runner]\nblock_ms = 200\n\
         [ingest.platforms.slack]\nenabled = true\nbot_user_id = \"U0LAN0Z89\"\n\
         [egress.platforms.slack]\nenabled = true\napi_base_url = \"{api_url}/api\"\nthread_replies = true\n"
    );
    let pipeline = Pipeline::start_with_env(
        &redis,
        &overlay,
        &[
            ("BOTLINE_SLACK_SIGNING_SECRET", SIGNING_SECRET),
            ("BOTLINE_SLACK_BOT_TOKEN", TOKEN),
        ],
    );
    pipeline.wait_ready(Duration::from_secs(60)).await;

    let body = event();
    let timestamp = (botline_shared::now_ms() / 1000).to_string();
    let mut mac = Hmac::<Sha256>::new_from_slice(SIGNING_SECRET.as_bytes()).unwrap();
    mac.update(format!("v0:{timestamp}:{body}").as_bytes());
    let signature = format!("v0={}", hex::encode(mac.finalize().into_bytes()));
    let answer = reqwest::Client::new()
        .post(format!("{}/hooks/slack", pipeline.base_url()))
        .header("content-type", "application/json")
        .header("X-Slack-Request-Timestamp", &timestamp)
        .header("X-Slack-Signature", &signature)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);

    wait_for("the post at the Web API", Duration::from_secs(60), || {
        !posts.lock().unwrap().is_empty()
    })
    .await;
    let (authorization, post) = posts.lock().unwrap()[0].clone();
    assert_eq!(authorization, format!("Bearer {TOKEN}"));
    assert_eq!(post["channel"], "C0LAN2Q65");
    assert_eq!(post["thread_ts"], "1515449522.000016");
    let text = post["text"].as_str().unwrap();
    assert!(text.starts_with("<@U061F7AUR> "), "{text}");
}
