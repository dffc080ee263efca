//! Discord end to end: a MESSAGE_CREATE dispatched by a local stand-in of
//! the Gateway to the real ingest (which connected, identified and
//! heartbeats) comes out of the real egress as a Create Message request
//! on a local stand-in of the REST API, quoting the message, mentioning
//! its sender, and pinging no one else.

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use botline_shared::testing::{wait_for, RedisServer};
use botline_tests::{one_receipt, Pipeline};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message as Frame;

/// base64("123456789") is the token's first part: the bot's id.
const TOKEN: &str = "MTIzNDU2Nzg5.GhIjKl.e2e-discord-token_0123456789";
const BOT: &str = "123456789";

/// Each Create Message call: the channel, the Authorization header, the body.
type Calls = Arc<Mutex<Vec<(String, String, Value)>>>;

async fn rest_api() -> (Calls, String) {
    let calls = Calls::default();
    let app = Router::new()
        .route(
            "/api/v10/channels/{channel}/messages",
            post(
                |State(calls): State<Calls>,
                 Path(channel): Path<String>,
                 headers: HeaderMap,
                 Json(body): Json<Value>| async move {
                    let authorization = headers
                        .get("authorization")
                        .and_then(|value| value.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    let id = {
                        let mut calls = calls.lock().unwrap();
                        calls.push((channel.clone(), authorization, body.clone()));
                        9000 + calls.len()
                    };
                    Json(json!({"id": id.to_string(), "channel_id": channel, "content": body["content"], "type": 19}))
                },
            ),
        )
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (calls, url)
}

/// A Gateway that says HELLO, answers IDENTIFY with READY, acknowledges
/// heartbeats and dispatches one MESSAGE_CREATE: someone in a guild
/// channel asks the bot by mentioning it. The IDENTIFYs it saw.
async fn gateway() -> (Arc<Mutex<Vec<Value>>>, String) {
    let identified = Arc::new(Mutex::new(Vec::new()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}", listener.local_addr().unwrap());
    let seen = identified.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let send = |payload: Value| Frame::text(payload.to_string());
                let _ = socket
                    .send(send(json!({"op": 10, "d": {"heartbeat_interval": 1000}})))
                    .await;
                while let Some(Ok(frame)) = socket.next().await {
                    let Frame::Text(text) = frame else { continue };
                    let payload: Value = serde_json::from_str(&text).unwrap();
                    let replies = match payload["op"].as_u64() {
                        Some(2) => {
                            seen.lock().unwrap().push(payload["d"].clone());
                            vec![
                                json!({"op": 0, "t": "READY", "s": 1, "d": {"v": 10, "session_id": "s-1",
                                    "resume_gateway_url": "ws://127.0.0.1:9", "guilds": [],
                                    "user": {"id": BOT, "username": "support", "bot": true}}}),
                                json!({"op": 0, "t": "MESSAGE_CREATE", "s": 2, "d": {
                                    "id": "1100", "channel_id": "500", "guild_id": "7", "type": 0,
                                    "content": format!("<@{BOT}> where is my order?"),
                                    "timestamp": "2024-01-02T03:04:05.000000+00:00",
                                    "author": {"id": "42", "username": "ann", "global_name": "Ann"},
                                    "mentions": [{"id": BOT, "username": "support", "bot": true}],
                                    "attachments": []}}),
                            ]
                        }
                        Some(1) => vec![json!({"op": 11})],
                        _ => Vec::new(),
                    };
                    for reply in replies {
                        if socket.send(send(reply)).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (identified, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_message_becomes_a_create_message_quoting_it() {
    let (calls, api_url) = rest_api().await;
    let (identified, gateway_url) = gateway().await;
    let redis = RedisServer::start();
    let overlay = format!(
        "[runner]\nblock_ms = 200\n\
         [ingest.platforms.discord]\nenabled = true\ngateway_url = \"{gateway_url}/?v=10&encoding=json\"\n\
         [egress.platforms.discord]\nenabled = true\napi_base_url = \"{api_url}/api/v10\"\n"
    );
    let pipeline =
        Pipeline::start_with_env(&redis, &overlay, &[("BOTLINE_DISCORD_BOT_TOKEN", TOKEN)]);
    pipeline.wait_ready(Duration::from_secs(60)).await;

    wait_for("the reply at the REST API", Duration::from_secs(60), || {
        !calls.lock().unwrap().is_empty()
    })
    .await;
    let identify = identified.lock().unwrap()[0].clone();
    assert_eq!(identify["token"], TOKEN);
    assert_eq!(identify["intents"], 1 | (1 << 9) | (1 << 12) | (1 << 15));

    let (channel, authorization, body) = calls.lock().unwrap()[0].clone();
    assert_eq!(channel, "500");
    assert_eq!(authorization, format!("Bot {TOKEN}"));
    assert_eq!(
        body["message_reference"],
        json!({"message_id": "1100", "fail_if_not_exists": false})
    );
    assert_eq!(body["allowed_mentions"]["parse"], json!([]));
    assert_eq!(body["enforce_nonce"], true);
    let content = body["content"].as_str().unwrap();
    assert!(content.starts_with("<@42> "), "{content}");
    assert!(body["allowed_mentions"]["users"] == json!(["42"]), "{body}");

    // Delivered once: the receipt is there and no second call came.
    one_receipt(&redis).await;
    assert_eq!(calls.lock().unwrap().len(), 1);
    assert_eq!(identified.lock().unwrap().len(), 1, "one session");
}
