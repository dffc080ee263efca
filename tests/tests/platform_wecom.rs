//! WeCom end to end: WeCom's published encrypted, signed callback POSTed to
//! the real ingest's /hooks/wecom (twice, as WeCom retries) comes out of the
//! real egress as one message/send call on a local stand-in of WeCom's API.

use axum::extract::{Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use botline_shared::testing::{wait_for, RedisServer};
use botline_tests::Pipeline;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

// WeCom's published crypto sample ("加解密方案说明"): its settings, and the
// callback of a text message "hello" from member `mycreate` to app 218.
const TOKEN: &str = "QDG6eK";
const AES_KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";
const CORP_ID: &str = "wx5823bf96d3bd56c7";
const QUERY: &str =
    "msg_signature=477715d11cdb4164915debcba66cb864d751f3e6&timestamp=1409659813&nonce=1372623149";
const BODY: &str = include_str!("../../ingest/tests/fixtures/wecom/official_request.xml");
const SECRET: &str = "app-secret-0123456789abcdefghijklmnop";
const ACCESS_TOKEN: &str = "accesstoken000001";

/// Each message/send: its access_token and JSON body.
type Sends = Arc<Mutex<Vec<(String, Value)>>>;

async fn wecom_api() -> (Sends, String) {
    let sends = Sends::default();
    let app = Router::new()
        .route(
            "/cgi-bin/gettoken",
            get(|Query(query): Query<HashMap<String, String>>| async move {
                let known = query.get("corpid").map(String::as_str) == Some(CORP_ID)
                    && query.get("corpsecret").map(String::as_str) == Some(SECRET);
                Json(if known {
                    json!({"errcode": 0, "errmsg": "ok", "access_token": ACCESS_TOKEN, "expires_in": 7200})
                } else {
                    json!({"errcode": 40001, "errmsg": "invalid credential"})
                })
            }),
        )
        .route(
            "/cgi-bin/message/send",
            post(
                |State(sends): State<Sends>,
                 Query(query): Query<HashMap<String, String>>,
                 Json(body): Json<Value>| async move {
                    let token = query.get("access_token").cloned().unwrap_or_default();
                    sends.lock().unwrap().push((token, body));
                    Json(json!({"errcode": 0, "errmsg": "ok", "invaliduser": "", "msgid": "msg-1"}))
                },
            ),
        )
        .with_state(sends.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (sends, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_published_wecom_callback_becomes_one_message_send() {
    let redis = RedisServer::start();
    let (sends, url) = wecom_api().await;
    // The sample is from 2014: its timestamp is let through.
    let overlay = format!(
        "[runner]\nblock_ms = 200\n\
         [ingest.platforms.wecom]\nenabled = true\ncorp_id = \"{CORP_ID}\"\nmax_timestamp_age_secs = 0\n\
         [egress.platforms.wecom]\nenabled = true\napi_base_url = \"{url}\"\n\
         corp_id = \"{CORP_ID}\"\nagent_id = 218\n"
    );
    let pipeline = Pipeline::start_with_env(
        &redis,
        &overlay,
        &[
            ("BOTLINE_WECOM_TOKEN", TOKEN),
            ("BOTLINE_WECOM_ENCODING_AES_KEY", AES_KEY),
            ("BOTLINE_WECOM_SECRET", SECRET),
        ],
    );
    pipeline.wait_ready(Duration::from_secs(60)).await;

    let client = reqwest::Client::new();
    let hook = format!("{}/hooks/wecom?{QUERY}", pipeline.base_url());
    for _ in 0..2 {
        let answer = client.post(&hook).body(BODY).send().await.unwrap();
        assert_eq!(answer.status().as_u16(), 200);
        assert_eq!(answer.text().await.unwrap(), "");
    }

    wait_for("the reply at WeCom", Duration::from_secs(60), || {
        !sends.lock().unwrap().is_empty()
    })
    .await;
    // WeCom's retry of the callback added nothing to `in`.
    let inbound = botline_shared::testing::partitioned_len(&mut redis.connection(), "in");
    assert_eq!(inbound, 1);
    let sends = sends.lock().unwrap().clone();
    assert_eq!(sends.len(), 1, "{sends:?}");
    let (token, body) = &sends[0];
    assert_eq!(token, ACCESS_TOKEN);
    assert_eq!(body["touser"], "mycreate");
    assert_eq!(body["msgtype"], "text");
    assert_eq!(body["agentid"], 218);
    let text = body["text"]["content"].as_str().unwrap();
    assert!(!text.is_empty(), "answered: {body}");
}
