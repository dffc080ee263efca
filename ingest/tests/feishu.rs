//! `/hooks/feishu` against a real redis-server over real HTTP: Feishu's
//! documented callbacks (tests/fixtures/feishu), encrypted and signed here
//! the way Feishu does it, and everything that must be refused.

mod common;

use aes::cipher::block_padding::Pkcs7;
use aes::cipher::{BlockEncryptMut, KeyIvInit};
use base64::Engine;
use botline_shared::message::{AttachmentKind, ChatKind};
use common::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// The token of Feishu's documented samples, used as our verification token.
const TOKEN: &str = "rvaYgkND1GOiu5MM0E1rncYC6PLtF7JV";
const KEY: &str = "test key";
const BOT: &str = "ou_7d8a6e6df7621556ce0d21922b676706ccs";

fn fixture(name: &str) -> String {
    common::fixture("feishu", name)
}

async fn start_feishu(encrypted: bool) -> Harness {
    let overlay = format!(
        "[ingest.platforms.feishu]\nenabled = true\nencrypted = {encrypted}\nbot_open_id = \"{BOT}\"\n"
    );
    start_configured(
        &overlay,
        &[
            ("BOTLINE_FEISHU_VERIFICATION_TOKEN", TOKEN),
            ("BOTLINE_FEISHU_ENCRYPT_KEY", KEY),
        ],
    )
    .await
}

/// `{"encrypt": …}` as Feishu makes it: AES-256-CBC, key SHA256(`key`), a
/// random IV in front.
fn encrypt(key: &str, plaintext: &str) -> String {
    let iv = ulid::Ulid::new().0.to_le_bytes();
    let key = Sha256::digest(key.as_bytes());
    let ciphertext = cbc::Encryptor::<aes::Aes256>::new(&key, &iv.into())
        .encrypt_padded_vec_mut::<Pkcs7>(plaintext.as_bytes());
    let data = [iv.as_slice(), &ciphertext].concat();
    serde_json::json!({ "encrypt": base64::engine::general_purpose::STANDARD.encode(data) })
        .to_string()
}

/// The headers Feishu signs a request with, `seconds_ago` old.
fn signed(body: &str, seconds_ago: i64) -> Vec<(&'static str, String)> {
    signed_at(body, (now_secs() - seconds_ago).to_string())
}

/// The headers Feishu signs a request with, for this timestamp.
fn signed_at(body: &str, timestamp: String) -> Vec<(&'static str, String)> {
    let nonce = "ZTM2ZDYwMTQ3ZDY4";
    let signature = hex::encode(Sha256::digest(
        format!("{timestamp}{nonce}{KEY}{body}").as_bytes(),
    ));
    vec![
        ("x-lark-request-timestamp", timestamp),
        ("x-lark-request-nonce", nonce.into()),
        ("x-lark-signature", signature),
    ]
}

async fn post(harness: &Harness, body: &str, headers: &[(&str, String)]) -> (u16, Value) {
    post_hook(harness, "feishu", body, headers).await
}

/// `body`, signed now, posted.
async fn post_signed(harness: &Harness, body: &str) -> (u16, Value) {
    post(harness, body, &signed(body, 0)).await
}

/// An encrypted, signed copy of `plaintext`, posted.
async fn post_sealed(harness: &Harness, plaintext: &str) -> (u16, Value) {
    post_signed(harness, &encrypt(KEY, plaintext)).await
}

#[tokio::test]
async fn the_url_check_is_answered_even_encrypted_and_unsigned() {
    let harness = start_feishu(true).await;
    let body = encrypt(KEY, &fixture("url_verification.json"));
    let (status, answer) = post(&harness, &body, &[]).await;
    assert_eq!(status, 200);
    assert_eq!(
        answer,
        serde_json::json!({ "challenge": "ajls384kdjx98XX" })
    );
    let forged = encrypt(
        KEY,
        &fixture("url_verification.json").replace(TOKEN, "guess"),
    );
    assert_refused(
        post(&harness, &forged, &[]).await,
        401,
        "verification token does not match",
    );
    assert!(harness.inbound().is_empty());
}

#[tokio::test]
async fn a_documented_message_event_lands_in_in_once() {
    let harness = start_feishu(true).await;
    let plaintext = fixture("receive_v1_group_text.json");
    let body = encrypt(KEY, &plaintext);
    let headers = signed(&body, 0);
    let (status, answer) = post(&harness, &body, &headers).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["msg"], "success");
    let (status, _) = post(&harness, &body, &headers).await;
    assert_eq!(status, 200, "Feishu's retry is acknowledged");
    let (status, _) = post_sealed(&harness, &plaintext).await;
    assert_eq!(status, 200, "and so is a retry encrypted anew");
    let messages = harness.inbound();
    assert_eq!(messages.len(), 1, "retries add nothing");
    let message = &messages[0];
    assert_eq!(message.platform, "feishu");
    assert_eq!(message.bot, "cli_9f5343c580712544");
    assert_eq!(message.chat.id, "oc_5ce6d572455d361153b7xx51da133945");
    assert_eq!(message.chat.kind, ChatKind::Group);
    assert_eq!(message.sender.id, "ou_84aad35d084aa403a838cf73ee18467");
    assert!(!message.sender.is_bot);
    assert_eq!(message.text, "@ou_84aad35d084aa403a838cf73ee18467 hello");
    assert_eq!(
        message.mentions.users,
        vec!["ou_84aad35d084aa403a838cf73ee18467"]
    );
    assert!(!message.mentions.bot, "the bot is not among the mentions");
    assert_eq!(message.thread.as_deref(), Some("omt_d4be107c616"));
    assert_eq!(
        message.reply_to.as_deref(),
        Some("om_5ce6d572455d361153b7cb5xxfsdfsdfdsf")
    );
    assert_eq!(
        message.platform_message_id.as_deref(),
        Some("om_5ce6d572455d361153b7cb51da133945")
    );
    assert_eq!(message.platform_ts_ms, Some(1_609_073_151_345));
    let raw = message.raw.as_deref().unwrap();
    assert!(raw.contains("om_5ce6d572455d361153b7cb51da133945"), "{raw}");
    assert!(!raw.contains(TOKEN), "the verification token is not kept");
}

#[tokio::test]
async fn mentions_of_the_bot_rich_text_and_images_are_read() {
    let harness = start_feishu(true).await;
    for name in [
        "receive_v1_group_post_mentioning_bot.json",
        "receive_v1_p2p_image.json",
    ] {
        let (status, answer) = post_sealed(&harness, &fixture(name)).await;
        assert_eq!(status, 200, "{name}: {answer}");
    }
    let messages = harness.inbound();
    assert_eq!(messages.len(), 2);
    let post = &messages[0];
    assert_eq!(post.text, format!("紧急\n@{BOT} 服务器宕机了"));
    assert!(post.mentions.bot);
    assert_eq!(post.mentions.users, vec![BOT]);
    assert_eq!(post.attachments.len(), 1);
    assert_eq!(post.attachments[0].kind, AttachmentKind::Image);
    assert_eq!(post.reply_to, None);
    assert_eq!(post.thread, None);
    let image = &messages[1];
    assert_eq!(image.chat.kind, ChatKind::Direct);
    assert!(
        image.mentions.bot,
        "a direct message is addressed to the bot"
    );
    assert_eq!(image.text, "");
    assert_eq!(
        image.attachments[0].file_id.as_deref(),
        Some("img_v2_dd9e2df3-e4a0-4a5e-b1b4-0e4ba9d0b15g")
    );
}

#[tokio::test]
async fn events_that_are_not_messages_are_acknowledged_and_ignored() {
    let harness = start_feishu(true).await;
    let from_an_app = fixture("receive_v1_group_text.json")
        .replace(r#""sender_type": "user""#, r#""sender_type": "app""#);
    let card = fixture("receive_v1_group_text.json").replace(
        r#""message_type": "text""#,
        r#""message_type": "interactive""#,
    );
    for plaintext in [fixture("reaction_created_v1.json"), from_an_app, card] {
        let (status, answer) = post_sealed(&harness, &plaintext).await;
        assert_eq!(status, 200, "{answer}");
        assert_eq!(answer["msg"], "success");
    }
    assert!(harness.inbound().is_empty());
}

#[tokio::test]
async fn forged_stale_broken_and_oversized_requests_are_refused() {
    let harness = start_feishu(true).await;
    let plaintext = fixture("receive_v1_group_text.json");
    let body = encrypt(KEY, &plaintext);

    let mut wrong = signed(&body, 0);
    wrong[2].1 = hex::encode(Sha256::digest(b"something else"));
    assert_refused(
        post(&harness, &body, &wrong).await,
        401,
        "X-Lark-Signature does not match",
    );
    let tampered = encrypt(KEY, &plaintext.replace("hello", "transfer money"));
    assert_refused(
        post(&harness, &tampered, &signed(&body, 0)).await,
        401,
        "X-Lark-Signature does not match",
    );
    assert_refused(
        post(&harness, &body, &signed(&body, 13 * 3600)).await,
        401,
        "outside the accepted window",
    );
    assert_refused(post(&harness, &body, &[]).await, 401, "X-Lark-Signature");
    // Signed timestamps at the ends of i64 (found by fuzz/: the age overflowed).
    for edge in [i64::MIN, i64::MAX] {
        assert_refused(
            post(&harness, &body, &signed_at(&body, edge.to_string())).await,
            401,
            "outside the accepted window",
        );
    }

    let other_key = encrypt("another key", &plaintext);
    assert_refused(
        post_signed(&harness, &other_key).await,
        401,
        "does not decrypt",
    );
    let not_base64 = r#"{"encrypt":"%%%"}"#;
    assert_refused(post_signed(&harness, not_base64).await, 401, "not base64");
    let wrong_token = plaintext.replace(TOKEN, "rvaYgkND1GOiu5MM0E1rncYC6PLtF7JW");
    assert_refused(
        post_sealed(&harness, &wrong_token).await,
        401,
        "verification token does not match",
    );

    let truncated = &body[..body.len() / 2];
    assert_refused(post_signed(&harness, truncated).await, 400, "EOF");
    let truncated_inside = encrypt(KEY, &plaintext[..plaintext.len() - 20]);
    assert_refused(post_signed(&harness, &truncated_inside).await, 400, "EOF");

    let huge = format!(r#"{{"encrypt":"{}"}}"#, "A".repeat(2 << 20));
    let (status, _) = post_signed(&harness, &huge).await;
    assert_eq!(status, 413);

    assert!(harness.inbound().is_empty(), "nothing refused was added");
    let (status, _) = post_signed(&harness, &body).await;
    assert_eq!(status, 200, "the process is unharmed");
    assert_eq!(harness.inbound().len(), 1);
}

#[tokio::test]
async fn without_encryption_the_verification_token_alone_decides() {
    let harness = start_feishu(false).await;
    let (status, answer) = post(&harness, &fixture("url_verification.json"), &[]).await;
    assert_eq!(
        (status, answer["challenge"].as_str()),
        (200, Some("ajls384kdjx98XX"))
    );
    let (status, _) = post(&harness, &fixture("receive_v1_p2p_image.json"), &[]).await;
    assert_eq!(status, 200);
    assert_eq!(harness.inbound().len(), 1);
    let forged = fixture("receive_v1_group_text.json").replace(TOKEN, "");
    assert_refused(
        post(&harness, &forged, &[]).await,
        401,
        "verification token does not match",
    );
    let sealed = encrypt(KEY, &fixture("receive_v1_group_text.json"));
    assert_refused(post(&harness, &sealed, &[]).await, 401, "encrypted");
    assert_eq!(harness.inbound().len(), 1);
}

#[tokio::test]
async fn an_enabled_feishu_without_its_secrets_stops_ingest() {
    let redis = botline_shared::testing::RedisServer::start();
    let overlay = "[ingest.platforms.feishu]\nenabled = true\n";
    let error = configured_ingest(
        &redis.url(),
        Some(overlay),
        &[("BOTLINE_FEISHU_VERIFICATION_TOKEN", TOKEN)],
        None,
    )
    .err()
    .unwrap();
    assert_eq!(
        error.to_string(),
        "setting BOTLINE_FEISHU_ENCRYPT_KEY: is not set"
    );
    let error = configured_ingest(
        &redis.url(),
        Some("[ingest.platforms.feishu]\nenabled = true\nencrypt = false\n"),
        &[],
        None,
    )
    .err()
    .unwrap();
    assert!(
        error
            .to_string()
            .contains("ingest.platforms.feishu.encrypt"),
        "{error}"
    );
}
