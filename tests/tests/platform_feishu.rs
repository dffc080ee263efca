//! Feishu end to end: an encrypted, signed `im.message.receive_v1` POSTed
//! to the real ingest's /hooks/feishu comes out of the real egress as a
//! reply call on a local stand-in of Feishu's Open API.

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockEncryptMut, KeyIvInit};
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use botline_shared::testing::{wait_for, RedisServer};
use botline_tests::Pipeline;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const TOKEN: &str = "rvaYgkND1GOiu5MM0E1rncYC6PLtF7JV";
const ENCRYPT_KEY: &str = "an encrypt key for the test";
const APP_ID: &str = "cli_9f5343c580712544";
const APP_SECRET: &str = "dskLLdkasdjlasdKK";
const BOT: &str = "ou_7d8a6e6df7621556ce0d21922b676706ccs";
const SENDER: &str = "ou_84aad35d084aa403a838cf73ee18467";
const TENANT_TOKEN: &str = "t-caecc734c2e3328a62489fe0648c4b98779515d3";

/// Each request to the stand-in: path, Authorization header, JSON body.
type Calls = Arc<Mutex<Vec<(String, String, Value)>>>;

async fn open_api() -> (Calls, String) {
    let calls = Calls::default();
    let record = |calls: &Calls, path: String, headers: &HeaderMap, body: Value| {
        let authorization = headers
            .get("authorization")
            .and_then(|value| value.to_str().ok())
            .unwrap_or_default()
            .to_string();
        calls.lock().unwrap().push((path, authorization, body));
    };
    let app = Router::new()
        .route(
            "/open-apis/auth/v3/tenant_access_token/internal",
            post(move |State(calls): State<Calls>, headers: HeaderMap, Json(body): Json<Value>| async move {
                record(&calls, "token".into(), &headers, body);
                Json(json!({"code": 0, "msg": "ok", "tenant_access_token": TENANT_TOKEN, "expire": 7200}))
            }),
        )
        .route(
            "/open-apis/im/v1/messages/{message_id}/reply",
            post(move |State(calls): State<Calls>, Path(message_id): Path<String>, headers: HeaderMap, Json(body): Json<Value>| async move {
                record(&calls, format!("reply {message_id}"), &headers, body);
                Json(json!({"code": 0, "msg": "success", "data": {"message_id": "om_answer"}}))
            }),
        )
        .with_state(calls.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (calls, url)
}

/// The event Feishu sends when someone mentions the bot in a group.
fn event() -> String {
    json!({
        "schema": "2.0",
        "header": {
            "event_id": "5e3702a84e847582be8db7fb73283c02",
            "event_type": "im.message.receive_v1",
            "create_time": "1608725989000",
            "token": TOKEN,
            "app_id": APP_ID,
            "tenant_key": "2ca1d211f64f6438"
        },
        "event": {
            "sender": {
                "sender_id": {"open_id": SENDER, "user_id": "e33ggbyz", "union_id": "on_8ed6aa67826108097d9ee143816345"},
                "sender_type": "user",
                "tenant_key": "736588c9260f175e"
            },
            "message": {
                "message_id": "om_5ce6d572455d361153b7cb51da133945",
                "create_time": "1609073151345",
                "chat_id": "oc_5ce6d572455d361153b7xx51da133945",
                "chat_type": "group",
                "message_type": "text",
                "content": "{\"text\":\"@_user_1 hello\"}",
                "mentions": [{"key": "@_user_1", "id": {"open_id": BOT}, "name": "botline", "tenant_key": "736588c9260f175e"}]
            }
        }
    })
    .to_string()
}

/// `{"encrypt": …}` the way Feishu makes it.
fn encrypt(plaintext: &str) -> String {
    let iv = [7u8; 16];
    let key = Sha256::digest(ENCRYPT_KEY.as_bytes());
    let ciphertext = cbc::Encryptor::<aes::Aes256>::new(&key, &iv.into())
        .encrypt_padded_vec_mut::<Pkcs7>(plaintext.as_bytes());
    let data = [iv.as_slice(), &ciphertext].concat();
    json!({ "encrypt": base64::engine::general_purpose::STANDARD.encode(data) }).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_feishu_event_becomes_a_reply_through_the_open_api() {
    let redis = RedisServer::start();
    let (calls, url) = open_api().await;
    let overlay = format!(
        "[runner]\nblock_ms = 200\n\
         [ingest.platforms.feishu]\nenabled = true\nbot_open_id = \"{BOT}\"\n\
         [egress.platforms.feishu]\nenabled = true\napp_id = \"{APP_ID}\"\nbase_url = \"{url}\"\n"
    );
    let pipeline = Pipeline::start_with_env(
        &redis,
        &overlay,
        &[
            ("BOTLINE_FEISHU_VERIFICATION_TOKEN", TOKEN),
            ("BOTLINE_FEISHU_ENCRYPT_KEY", ENCRYPT_KEY),
            ("BOTLINE_FEISHU_APP_SECRET", APP_SECRET),
        ],
    );
    pipeline.wait_ready(Duration::from_secs(60)).await;

    let body = encrypt(&event());
    let timestamp = (botline_shared::now_ms() / 1000).to_string();
    let nonce = "ZTM2ZDYwMTQ3ZDY4";
    let signature = hex::encode(Sha256::digest(
        format!("{timestamp}{nonce}{ENCRYPT_KEY}{body}").as_bytes(),
    ));
    let answer = reqwest::Client::new()
        .post(format!("{}/hooks/feishu", pipeline.base_url()))
        .header("content-type", "application/json")
        .header("x-lark-request-timestamp", timestamp)
        .header("x-lark-request-nonce", nonce)
        .header("x-lark-signature", signature)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);

    wait_for("the reply at the Open API", Duration::from_secs(60), || {
        calls
            .lock()
            .unwrap()
            .iter()
            .any(|(path, ..)| path.starts_with("reply"))
    })
    .await;
    let calls = calls.lock().unwrap().clone();
    let (_, _, credentials) = calls.iter().find(|(path, ..)| path == "token").unwrap();
    assert_eq!(
        *credentials,
        json!({"app_id": APP_ID, "app_secret": APP_SECRET})
    );
    let replies: Vec<_> = calls
        .iter()
        .filter(|(path, ..)| path.starts_with("reply"))
        .collect();
    assert_eq!(replies.len(), 1, "{calls:?}");
    let (path, authorization, reply) = replies[0];
    assert_eq!(path, "reply om_5ce6d572455d361153b7cb51da133945");
    assert_eq!(authorization, &format!("Bearer {TENANT_TOKEN}"));
    assert_eq!(reply["msg_type"], "text");
    assert_eq!(reply["reply_in_thread"], false);
    assert!(reply["uuid"].as_str().is_some_and(|uuid| uuid.len() == 26));
    let content: Value = serde_json::from_str(reply["content"].as_str().unwrap()).unwrap();
    let text = content["text"].as_str().unwrap();
    assert!(
        text.starts_with(&format!("<at user_id=\"{SENDER}\"></at> ")),
        "the sender is mentioned: {text}"
    );
    assert!(text.len() > SENDER.len() + 20, "and answered: {text}");
}
