//! Bad platform requests against the real ingest binary: each is refused
//! with its status and counted by platform and reason in `/metrics` (a
//! forged signature on each HTTP platform counted as that platform's), a
//! platform's retry of a good event adds nothing, nothing refused reaches
//! `in`, and the configured secrets appear in no log, no metric and no
//! stream entry.

use botline_shared::testing::RedisServer;
use botline_tests::Pipeline;
use hmac::{Hmac, Mac};
use redis::Commands;
use sha2::Sha256;
use std::time::Duration;

const SLACK_SECRET: &str = "refusals-slack-signing-secret-42";
const SLACK_TOKEN: &str = "xoxb-refusals-slack-bot-token-42";
const TELEGRAM_SECRET: &str = "refusals_telegram_webhook_secret_42";
const TELEGRAM_TOKEN: &str = "4242:refusals-telegram-bot-token";
const FEISHU_TOKEN: &str = "refusals-feishu-verification-token";
const FEISHU_KEY: &str = "refusals-feishu-encrypt-key-42";
const DINGTALK_SECRET: &str = "refusals-dingtalk-app-secret-42";
const WECOM_TOKEN: &str = "refusals-wecom-token-42";
/// Any 43 characters of Base64 make an EncodingAESKey (WeCom's sample one).
const WECOM_AES_KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";
const ONEBOT_SECRET: &str = "refusals-onebot-secret-42";

/// A request to each other HTTP platform's hook, signed with a signature
/// that does not match (but present, and in the platform's own headers or
/// query): each is refused `bad_signature`, as Slack's is.
async fn forged_signatures(http: &reqwest::Client, base_url: &str) {
    let now_ms = botline_shared::now_ms();
    let now_secs = (now_ms / 1000).to_string();
    let forged = [
        http.post(format!("{base_url}/hooks/feishu"))
            .header("content-type", "application/json")
            .header("X-Lark-Request-Timestamp", &now_secs)
            .header("X-Lark-Request-Nonce", "13371337")
            .header("X-Lark-Signature", "00".repeat(32))
            .body(r#"{"encrypt":"AAAA"}"#),
        http.post(format!("{base_url}/hooks/dingtalk"))
            .header("content-type", "application/json")
            .header("timestamp", now_ms.to_string())
            .header("sign", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
            .body(r#"{"msgId":"m1","text":{"content":"hi"}}"#),
        http.post(format!(
            "{base_url}/hooks/wecom?msg_signature={}&timestamp={now_secs}&nonce=1372623149",
            "00".repeat(20)
        ))
        .header("content-type", "text/xml")
        .body("<xml><ToUserName><![CDATA[wx5823bf96d3bd56c7]]></ToUserName><Encrypt><![CDATA[AAAA]]></Encrypt></xml>"),
        http.post(format!("{base_url}/hooks/onebot"))
            .header("content-type", "application/json")
            .header("X-Self-ID", "10001")
            .header("X-Signature", format!("sha1={}", "00".repeat(20)))
            .body(r#"{"post_type":"meta_event","meta_event_type":"heartbeat","self_id":10001,"time":1}"#),
    ];
    for request in forged {
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "{}", response.url());
    }
}

fn slack_event(event_id: &str) -> String {
    serde_json::json!({
        "type": "event_callback",
        "team_id": "T061EG9R6",
        "event_id": event_id,
        "event_time": 1515449522,
        "event": {
            "type": "message", "channel_type": "im", "user": "U061F7AUR",
            "text": "hello", "ts": format!("1515449522.{event_id}"), "channel": "D0LAN2Q65"
        }
    })
    .to_string()
}

fn slack_signature(timestamp: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(SLACK_SECRET.as_bytes()).unwrap();
    mac.update(format!("v0:{timestamp}:{body}").as_bytes());
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_platform_requests_are_refused_counted_and_leave_no_trace_of_secrets() {
    let redis = RedisServer::start();
    let overlay = "[runner]\nblock_ms = 200\n\
         [ingest.platforms.slack]\nenabled = true\nbot_user_id = \"U0LAN0Z89\"\n\
         [ingest.platforms.telegram]\nenabled = true\nbot_id = \"4242\"\nbot_username = \"refusals_bot\"\n\
         [ingest.platforms.feishu]\nenabled = true\n\
         [ingest.platforms.dingtalk]\nenabled = true\n\
         [ingest.platforms.wecom]\nenabled = true\ncorp_id = \"wx5823bf96d3bd56c7\"\n\
         [ingest.platforms.onebot]\nenabled = true\n";
    let mut pipeline = Pipeline::start_with_env(
        &redis,
        overlay,
        &[
            ("BOTLINE_SLACK_SIGNING_SECRET", SLACK_SECRET),
            ("BOTLINE_SLACK_BOT_TOKEN", SLACK_TOKEN),
            ("BOTLINE_TELEGRAM_WEBHOOK_SECRET", TELEGRAM_SECRET),
            ("BOTLINE_TELEGRAM_BOT_TOKEN", TELEGRAM_TOKEN),
            ("BOTLINE_FEISHU_VERIFICATION_TOKEN", FEISHU_TOKEN),
            ("BOTLINE_FEISHU_ENCRYPT_KEY", FEISHU_KEY),
            ("BOTLINE_DINGTALK_APP_SECRET", DINGTALK_SECRET),
            ("BOTLINE_WECOM_TOKEN", WECOM_TOKEN),
            ("BOTLINE_WECOM_ENCODING_AES_KEY", WECOM_AES_KEY),
            ("BOTLINE_ONEBOT_SECRET", ONEBOT_SECRET),
        ],
    );
    pipeline.wait_ready(Duration::from_secs(60)).await;
    let http = reqwest::Client::new();
    let slack = format!("{}/hooks/slack", pipeline.base_url());
    let now = (botline_shared::now_ms() / 1000).to_string();
    let post = |timestamp: String, signature: String, body: String| {
        http.post(&slack)
            .header("content-type", "application/json")
            .header("X-Slack-Request-Timestamp", timestamp)
            .header("X-Slack-Signature", signature)
            .body(body)
            .send()
    };

    let good = slack_event("000001");
    let wrong = slack_signature(&now, "another body");
    let status = |response: reqwest::Response| response.status().as_u16();
    assert_eq!(
        status(post(now.clone(), wrong, good.clone()).await.unwrap()),
        401
    );
    let stale = ((botline_shared::now_ms() / 1000) - 600).to_string();
    let stale_signature = slack_signature(&stale, &good);
    assert_eq!(
        status(post(stale, stale_signature, good.clone()).await.unwrap()),
        401
    );
    let truncated = good[..good.len() / 2].to_string();
    let truncated_signature = slack_signature(&now, &truncated);
    assert_eq!(
        status(
            post(now.clone(), truncated_signature, truncated)
                .await
                .unwrap()
        ),
        400
    );
    let huge = format!("{{\"pad\":\"{}\"}}", "x".repeat(2 * 1024 * 1024));
    let huge_signature = slack_signature(&now, &huge);
    // Ingest answers 413 as soon as the length is over the limit and may
    // close before the 2 MB are written: then the client sees a broken
    // pipe instead of the answer. The refusal is counted either way (below).
    // Its own client, so the connection ingest may close mid-body is not
    // pooled for the next request (which would then fail to send).
    let huge_post = reqwest::Client::new()
        .post(&slack)
        .header("content-type", "application/json")
        .header("X-Slack-Request-Timestamp", now.clone())
        .header("X-Slack-Signature", huge_signature)
        .body(huge)
        .send();
    match huge_post.await {
        Ok(response) => assert_eq!(status(response), 413),
        Err(error) => assert!(error.is_request(), "{error}"),
    }
    let telegram = http
        .post(format!("{}/hooks/telegram", pipeline.base_url()))
        .header("content-type", "application/json")
        .header("X-Telegram-Bot-Api-Secret-Token", "not-the-secret")
        .body(r#"{"update_id":1,"message":{"message_id":1,"date":1,"chat":{"id":5,"type":"private"},"from":{"id":5,"is_bot":false,"first_name":"A"},"text":"hi"}}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(status(telegram), 401);
    assert_eq!(
        status(
            http.post(format!("{}/hooks/nowhere", pipeline.base_url()))
                .body("{}")
                .send()
                .await
                .unwrap()
        ),
        404
    );
    forged_signatures(&http, &pipeline.base_url()).await;
    // A good event, then Slack's retry of it.
    for _ in 0..2 {
        let signature = slack_signature(&now, &good);
        assert_eq!(
            status(post(now.clone(), signature, good.clone()).await.unwrap()),
            200
        );
    }

    let mut connection = redis.connection();
    let added = botline_shared::testing::partitioned_len(&mut connection, "in");
    assert_eq!(added, 1, "only the good event, once");

    let ingest = pipeline.stage("ingest");
    let metrics = ingest.metrics().await;
    // Each refusal once, as its platform's: `bad_signature` five times over,
    // but once for each platform.
    for (platform, reason) in [
        ("slack", "bad_signature"),
        ("slack", "stale_timestamp"),
        ("slack", "malformed"),
        ("slack", "too_large"),
        ("telegram", "bad_token"),
        ("unknown", "unknown_platform"),
        ("feishu", "bad_signature"),
        ("dingtalk", "bad_signature"),
        ("wecom", "bad_signature"),
        ("onebot", "bad_signature"),
    ] {
        let series =
            format!("botline_ingest_rejected_total{{platform=\"{platform}\",reason=\"{reason}\"}}");
        assert_eq!(
            botline_tests::metric_value(&metrics, &series),
            Some(1.0),
            "{series}\n{metrics}"
        );
    }
    assert_eq!(
        botline_tests::metric_value(
            &metrics,
            "botline_ingest_duplicates_total{platform=\"slack\"}"
        ),
        Some(1.0)
    );

    // No secret anywhere a person or a scraper can read.
    let mut seen = pipeline.logs();
    for process in &pipeline.processes {
        seen.push_str(&process.metrics().await);
    }
    let keys: Vec<String> = connection.keys("*").unwrap();
    for key in keys {
        if let Ok(entries) = connection.xrange_all::<_, redis::streams::StreamRangeReply>(&key) {
            for entry in entries.ids {
                for value in entry.map.values() {
                    if let redis::Value::BulkString(bytes) = value {
                        seen.push_str(&String::from_utf8_lossy(bytes));
                    }
                }
            }
        }
    }
    for secret in [
        SLACK_SECRET,
        SLACK_TOKEN,
        TELEGRAM_SECRET,
        TELEGRAM_TOKEN,
        FEISHU_TOKEN,
        FEISHU_KEY,
        DINGTALK_SECRET,
        WECOM_TOKEN,
        WECOM_AES_KEY,
        ONEBOT_SECRET,
    ] {
        assert!(!seen.contains(secret), "a secret leaked: {secret}");
    }
}
