//! OneBot v11 end to end: a signed group message that mentions the bot,
//! POSTed to the real ingest's /hooks/onebot, comes out of the real egress
//! as one send_msg call on a local stand-in of the OneBot HTTP API, quoting
//! the message and mentioning its sender.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use botline_shared::testing::{wait_for, RedisServer};
use botline_tests::Pipeline;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha1::Sha1;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECRET: &str = "onebot-e2e-secret-0123";
const ACCESS_TOKEN: &str = "kSLuTF2GC2Q4q4ugm3";
/// A group message from 12345678 in group 123456789: a reply to message
/// -2147483000 that mentions the bot (10001000).
const EVENT: &str = include_str!("../../ingest/tests/fixtures/onebot/group_segments.json");

type Calls = Arc<Mutex<Vec<Value>>>;

async fn send_msg(
    State(calls): State<Calls>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let authorization = headers.get("authorization").and_then(|v| v.to_str().ok());
    if authorization != Some(&format!("Bearer {ACCESS_TOKEN}")) {
        return StatusCode::FORBIDDEN.into_response();
    }
    calls.lock().unwrap().push(body);
    Json(json!({"status": "ok", "retcode": 0, "data": {"message_id": 4242}})).into_response()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_onebot_message_becomes_one_send_msg() {
    let redis = RedisServer::start();
    let calls = Calls::default();
    let app = Router::new()
        .route("/send_msg", post(send_msg))
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let overlay = format!(
        "[runner]\nblock_ms = 200\n\
         [ingest.platforms.onebot]\nenabled = true\n\
         [egress.platforms.onebot]\nenabled = true\napi_base_url = \"{url}\"\n"
    );
    let pipeline = Pipeline::start_with_env(
        &redis,
        &overlay,
        &[
            ("BOTLINE_ONEBOT_SECRET", SECRET),
            ("BOTLINE_ONEBOT_ACCESS_TOKEN", ACCESS_TOKEN),
        ],
    );
    pipeline.wait_ready(Duration::from_secs(60)).await;

    let mut mac = Hmac::<Sha1>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(EVENT.as_bytes());
    let signature = format!("sha1={}", hex::encode(mac.finalize().into_bytes()));
    let answer = reqwest::Client::new()
        .post(format!("{}/hooks/onebot", pipeline.base_url()))
        .header("content-type", "application/json")
        .header("x-self-id", "10001000")
        .header("x-signature", signature)
        .body(EVENT)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);

    wait_for("the reply at OneBot", Duration::from_secs(60), || {
        !calls.lock().unwrap().is_empty()
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let body = &calls[0];
    assert_eq!(body["message_type"], "group");
    assert_eq!(body["group_id"], 123456789);
    let segments = body["message"].as_array().unwrap();
    assert_eq!(
        segments[..2],
        [
            json!({"type": "reply", "data": {"id": "-2147483001"}}),
            json!({"type": "at", "data": {"qq": "12345678"}}),
        ],
        "quotes the message and mentions its sender: {body}"
    );
    assert_eq!(segments[2]["type"], "text");
    assert!(
        segments[2]["data"]["text"].as_str().unwrap().trim().len() > 1,
        "and answers: {body}"
    );
}
