//! OneBot v11 events at /hooks/onebot over real HTTP, against a real
//! redis-server: documented events signed here as the implementation signs
//! them, in both message formats, and everything that must be refused.

mod common;

use botline_shared::message::{AttachmentKind, ChatKind};
use common::*;
use hmac::{Hmac, Mac};
use sha1::Sha1;

const SECRET: &str = "onebot-secret-0123";

async fn start_onebot() -> Harness {
    start_configured(
        "[ingest.platforms.onebot]\nenabled = true\n",
        &[("BOTLINE_ONEBOT_SECRET", SECRET)],
    )
    .await
}

/// `sha1=<hex HMAC-SHA1(secret, body)>`.
fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha1>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(body);
    format!("sha1={}", hex::encode(mac.finalize().into_bytes()))
}

/// POST `body` with `signature` (none if `None`): the status and the answer.
async fn post_signed(harness: &Harness, body: Vec<u8>, signature: Option<String>) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .post(harness.url("/hooks/onebot"))
        .header("content-type", "application/json")
        .header("x-self-id", "10001000");
    if let Some(signature) = signature {
        request = request.header("x-signature", signature);
    }
    let response = request.body(body).send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn post(harness: &Harness, body: &str) -> (u16, String) {
    let signature = signature(SECRET, body.as_bytes());
    post_signed(harness, body.as_bytes().to_vec(), Some(signature)).await
}

#[tokio::test]
async fn a_private_string_message_lands_in_in_once() {
    let harness = start_onebot().await;
    let body = fixture("onebot", "private_string.json");
    assert_eq!(post(&harness, &body).await, (200, String::new()));
    assert_eq!(
        post(&harness, &body).await.0,
        200,
        "a repeat is acknowledged"
    );
    let messages = harness.inbound();
    assert_eq!(messages.len(), 1, "and adds nothing");
    let message = &messages[0];
    assert_eq!(message.platform, "onebot");
    assert_eq!(message.bot, "10001000");
    assert_eq!(message.chat.id, "12345678");
    assert_eq!(message.chat.kind, ChatKind::Direct);
    assert_eq!(message.sender.id, "12345678");
    assert_eq!(message.sender.name, "小不点");
    assert_eq!(message.text, "你好~");
    assert_eq!(message.platform_message_id.as_deref(), Some("12"));
    assert_eq!(message.platform_ts_ms, Some(1_515_204_254_000));
    assert_eq!(message.raw.as_deref(), Some(body.as_str()));
    let dedup: i64 = harness.redis_cmd(redis::cmd("EXISTS").arg(harness.streams.dedup(
        "onebot",
        "12345678",
        "10001000:12",
    )));
    assert_eq!(dedup, 1);
}

/// A `time` past what milliseconds hold saturates (found by fuzz/: the
/// conversion overflowed).
#[tokio::test]
async fn a_time_past_what_milliseconds_hold_saturates() {
    let harness = start_onebot().await;
    let body =
        fixture("onebot", "private_string.json").replace("1515204254", &i64::MAX.to_string());
    assert_eq!(post(&harness, &body).await, (200, String::new()));
    let messages = harness.inbound();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].platform_ts_ms, Some(i64::MAX));
}

#[tokio::test]
async fn group_messages_in_either_format_become_unified_messages() {
    let harness = start_onebot().await;
    for name in ["group_segments.json", "group_cq.json"] {
        assert_eq!(
            post(&harness, &fixture("onebot", name)).await,
            (200, String::new())
        );
    }
    let messages = harness.inbound();
    assert_eq!(messages.len(), 2);

    let segments = &messages[0];
    assert_eq!(segments.chat.id, "123456789");
    assert_eq!(segments.chat.kind, ChatKind::Group);
    assert_eq!(segments.sender.name, "群名片", "the group card first");
    assert_eq!(segments.text, "@10001000 看看这张图 [x]");
    assert!(segments.mentions.bot);
    assert_eq!(segments.mentions.users, ["10001000"]);
    assert_eq!(segments.reply_to.as_deref(), Some("-2147483000"));
    assert_eq!(segments.platform_message_id.as_deref(), Some("-2147483001"));
    assert_eq!(segments.attachments.len(), 1);
    let image = &segments.attachments[0];
    assert_eq!(image.kind, AttachmentKind::Image);
    assert_eq!(
        image.url.as_deref(),
        Some("https://gchat.qpic.cn/gchatpic_new/0/0-0-8F3A/0")
    );
    assert_eq!(image.file_id.as_deref(), Some("8f3a.image"));

    let cq = &messages[1];
    assert_eq!(
        cq.sender.name, "大不点",
        "an empty card falls back to the nickname"
    );
    assert_eq!(cq.text, "@10001000 - [x] 使用 `&data` 获取地址 @12345678");
    assert!(cq.mentions.bot);
    assert_eq!(cq.mentions.users, ["10001000", "12345678"]);
    assert_eq!(cq.reply_to, None);
}

#[tokio::test]
async fn heartbeats_notices_and_the_bots_own_messages_are_acknowledged_only() {
    let harness = start_onebot().await;
    let unknown = r#"{"time":1,"self_id":10001000,"post_type":"something_new"}"#.to_string();
    for body in [
        fixture("onebot", "heartbeat.json"),
        fixture("onebot", "group_increase.json"),
        fixture("onebot", "message_sent.json"),
        fixture("onebot", "message_sent.json").replace("message_sent", "message"),
        unknown,
    ] {
        assert_eq!(post(&harness, &body).await, (200, String::new()), "{body}");
    }
    assert!(harness.inbound().is_empty());
}

#[tokio::test]
async fn bad_posts_are_refused_and_add_nothing() {
    let harness = start_onebot().await;
    let body = fixture("onebot", "private_string.json");
    let check = |status: u16, needle: &'static str| {
        move |(got, answer): (u16, String)| {
            assert_eq!(got, status, "{needle}: {answer}");
            assert!(answer.contains(needle), "expected {needle:?} in {answer}");
        }
    };
    let bytes = || body.as_bytes().to_vec();

    check(401, "no X-Signature")(post_signed(&harness, bytes(), None).await);
    let wrong_secret = signature("another-secret-0123", body.as_bytes());
    check(401, "does not match")(post_signed(&harness, bytes(), Some(wrong_secret)).await);
    let altered = body.replace("你好~", "你好!");
    let signed_original = signature(SECRET, body.as_bytes());
    check(401, "does not match")(
        post_signed(
            &harness,
            altered.into_bytes(),
            Some(signed_original.clone()),
        )
        .await,
    );
    let without_prefix = signed_original.trim_start_matches("sha1=").to_string();
    check(401, "does not match")(post_signed(&harness, bytes(), Some(without_prefix)).await);

    // Signed, but not a whole event.
    check(400, "EOF")(post(&harness, &body[..body.len() / 2]).await);
    check(400, "self_id")(post(&harness, r#"{"post_type":"message"}"#).await);
    check(400, "without message_id")(
        post(&harness, &body.replace("\"message_id\": 12,", "")).await,
    );

    // Far too big to read.
    let huge = vec![b' '; 2 << 20];
    let huge_signature = signature(SECRET, &huge);
    check(413, "larger than")(post_signed(&harness, huge, Some(huge_signature)).await);

    assert!(harness.inbound().is_empty(), "nothing refused got in");
    assert_eq!(
        post(&harness, &body).await.0,
        200,
        "the process is unharmed"
    );
    assert_eq!(harness.inbound().len(), 1);
}
