//! `/hooks/dingtalk` against a real redis-server over real HTTP: DingTalk's
//! documented robot callbacks (tests/fixtures/dingtalk), signed here the
//! way DingTalk signs them, and everything that must be refused.

mod common;

use botline_ingest::platforms::dingtalk::{
    self, SESSION_WEBHOOK, SESSION_WEBHOOK_EXPIRES_MS, USER_ID,
};
use botline_shared::message::{AttachmentKind, ChatKind};
use common::*;
use serde_json::Value;

const APP_SECRET: &str = "GT-lsu-taDAsTsxxxx-app-secret";

fn fixture(name: &str) -> String {
    common::fixture("dingtalk", name)
}

async fn start_dingtalk() -> Harness {
    start_configured(
        "[ingest.platforms.dingtalk]\nenabled = true\n",
        &[("BOTLINE_DINGTALK_APP_SECRET", APP_SECRET)],
    )
    .await
}

/// `timestamp` and `sign` as DingTalk sends them, `ms_ago` old.
fn signed(ms_ago: i64) -> Vec<(&'static str, String)> {
    signed_at((botline_shared::now_ms() - ms_ago).to_string())
}

/// `timestamp` and its `sign`.
fn signed_at(timestamp: String) -> Vec<(&'static str, String)> {
    let sign = dingtalk::sign(APP_SECRET, &timestamp);
    vec![("timestamp", timestamp), ("sign", sign)]
}

async fn post(harness: &Harness, body: &str, headers: &[(&str, String)]) -> (u16, Value) {
    post_hook(harness, "dingtalk", body, headers).await
}

#[tokio::test]
async fn a_documented_group_message_lands_in_in_once() {
    let harness = start_dingtalk().await;
    let body = fixture("group_text_at_bot.json");
    let headers = signed(0);
    for _ in 0..2 {
        let (status, _) = post(&harness, &body, &headers).await;
        assert_eq!(status, 200);
    }
    let (status, _) = post(&harness, &body, &signed(5_000)).await;
    assert_eq!(status, 200, "DingTalk's retry, signed anew");
    let messages = harness.inbound();
    assert_eq!(messages.len(), 1, "retries add nothing");
    let message = &messages[0];
    assert_eq!(message.platform, "dingtalk");
    assert_eq!(message.bot, "dingxxxxx");
    assert_eq!(message.chat.id, "cid6KeBBLoveMJOGXoYKF5x7EeiodoA==");
    assert_eq!(message.chat.kind, ChatKind::Group);
    assert_eq!(message.sender.id, "2220111111");
    assert_eq!(message.sender.name, "张三");
    assert_eq!(message.text, "你好 @李四");
    assert!(message.mentions.bot);
    assert_eq!(
        message.mentions.users,
        vec!["0420123556"],
        "the bot is not among them"
    );
    assert_eq!(
        message.platform_message_id.as_deref(),
        Some("msgJgSk2JCaQ2DcNZWmBvF4Zw==")
    );
    assert_eq!(message.platform_ts_ms, Some(1_613_630_252_678));
    assert_eq!(
        message
            .platform_data
            .get(SESSION_WEBHOOK)
            .map(String::as_str),
        Some("https://oapi.dingtalk.com/robot/sendBySession?session=xxxxx")
    );
    assert_eq!(
        message
            .platform_data
            .get(SESSION_WEBHOOK_EXPIRES_MS)
            .map(String::as_str),
        Some("1613635652738")
    );
    assert!(
        !message.platform_data.contains_key(USER_ID),
        "a group has no single user"
    );
}

#[tokio::test]
async fn pictures_direct_chats_and_rich_text_are_read() {
    let harness = start_dingtalk().await;
    for name in ["direct_picture.json", "group_rich_text.json"] {
        let (status, answer) = post(&harness, &fixture(name), &signed(0)).await;
        assert_eq!(status, 200, "{name}: {answer}");
    }
    let messages = harness.inbound();
    assert_eq!(messages.len(), 2);
    let picture = &messages[0];
    assert_eq!(picture.chat.kind, ChatKind::Direct);
    assert!(
        picture.mentions.bot,
        "a direct message is addressed to the bot"
    );
    assert_eq!(picture.attachments[0].kind, AttachmentKind::Image);
    assert_eq!(
        picture.attachments[0].file_id.as_deref(),
        Some("mIofN681YE3f/+m+NntqpT6UAPPAv3fNzNQ...")
    );
    assert_eq!(
        picture.platform_data.get(USER_ID).map(String::as_str),
        Some("2220111111")
    );
    let rich = &messages[1];
    assert_eq!(rich.text, "服务器宕机了\n请看截图");
    assert!(!rich.mentions.bot);
    assert_eq!(rich.attachments.len(), 1);
}

#[tokio::test]
async fn forged_stale_broken_unknown_and_oversized_requests_are_refused() {
    let harness = start_dingtalk().await;
    let body = fixture("group_text_at_bot.json");

    let mut wrong = signed(0);
    wrong[1].1 = dingtalk::sign("another secret", &wrong[0].1);
    assert_refused(
        post(&harness, &body, &wrong).await,
        401,
        "sign header does not match",
    );
    let mut garbled = signed(0);
    garbled[1].1 = "not base64!".into();
    assert_refused(
        post(&harness, &body, &garbled).await,
        401,
        "sign header does not match",
    );
    assert_refused(
        post(&harness, &body, &signed(2 * 3_600_000)).await,
        401,
        "more than an hour",
    );
    assert_refused(
        post(&harness, &body, &signed(-2 * 3_600_000)).await,
        401,
        "more than an hour",
    );
    // Signed timestamps at the ends of i64 (found by fuzz/: the skew overflowed).
    for edge in [i64::MIN, i64::MAX] {
        assert_refused(
            post(&harness, &body, &signed_at(edge.to_string())).await,
            401,
            "more than an hour",
        );
    }
    assert_refused(post(&harness, &body, &[]).await, 401, "missing");

    let truncated = &body[..body.len() - 30];
    assert_refused(post(&harness, truncated, &signed(0)).await, 400, "EOF");
    let nameless = body.replace("\"msgId\"", "\"messageId\"");
    assert_refused(post(&harness, &nameless, &signed(0)).await, 400, "msgId");

    let card = body.replace(r#""msgtype": "text""#, r#""msgtype": "interactiveCard""#);
    let (status, _) = post(&harness, &card, &signed(0)).await;
    assert_eq!(status, 200, "an unknown message type is acknowledged");

    let huge = format!(r#"{{"text":{{"content":"{}"}}}}"#, "a".repeat(2 << 20));
    let (status, _) = post(&harness, &huge, &signed(0)).await;
    assert_eq!(status, 413);

    assert!(harness.inbound().is_empty(), "nothing refused was added");
    let (status, _) = post(&harness, &body, &signed(0)).await;
    assert_eq!(status, 200, "the process is unharmed");
    assert_eq!(harness.inbound().len(), 1);
}

#[tokio::test]
async fn an_enabled_dingtalk_without_its_secret_stops_ingest() {
    let redis = botline_shared::testing::RedisServer::start();
    let error = configured_ingest(
        &redis.url(),
        Some("[ingest.platforms.dingtalk]\nenabled = true\n"),
        &[],
        None,
    )
    .err()
    .unwrap();
    assert_eq!(
        error.to_string(),
        "setting BOTLINE_DINGTALK_APP_SECRET: is not set"
    );
}
