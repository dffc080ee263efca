//! WeCom callbacks at /hooks/wecom over real HTTP, against a real
//! redis-server: WeCom's published crypto sample, documented messages
//! encrypted and signed here, and everything that must be refused.

mod common;

use aes::Aes256;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::Engine;
use botline_shared::message::{AttachmentKind, ChatKind};
use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockEncryptMut, KeyIvInit};
use common::*;
use sha1::{Digest, Sha1};

// The published sample's settings.
const TOKEN: &str = "QDG6eK";
const AES_KEY: &str = "jWmYm7qr5nMoAUwZRjGtBxmz3KA1tkAj3ykkR6q2B2C";
const CORP_ID: &str = "wx5823bf96d3bd56c7";
const ENV: [(&str, &str); 2] = [
    ("BOTLINE_WECOM_TOKEN", TOKEN),
    ("BOTLINE_WECOM_ENCODING_AES_KEY", AES_KEY),
];

/// Ingest with WeCom enabled; `max_age_secs` 0 lets the 2014 sample in.
async fn start_wecom(max_age_secs: u64) -> Harness {
    let overlay = format!(
        "[ingest.platforms.wecom]\nenabled = true\ncorp_id = \"{CORP_ID}\"\n\
         max_timestamp_age_secs = {max_age_secs}\n"
    );
    start_configured(&overlay, &ENV).await
}

/// Encrypted the way WeCom does: random 16 bytes, length, message, receive
/// id, PKCS#7 to 32 bytes, AES-256-CBC, Base64.
fn encrypt(message: &str, receive_id: &str) -> String {
    // The sample key's last character has bits past the 32 bytes: ignored.
    let lenient = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
    );
    let key = lenient.decode(format!("{AES_KEY}=")).unwrap();
    let mut plain = b"0123456789abcdef".to_vec();
    plain.extend_from_slice(&(message.len() as u32).to_be_bytes());
    plain.extend_from_slice(message.as_bytes());
    plain.extend_from_slice(receive_id.as_bytes());
    let pad = 32 - plain.len() % 32;
    plain.extend(std::iter::repeat_n(pad as u8, pad));
    let length = plain.len();
    let sealed = cbc::Encryptor::<Aes256>::new(key[..].into(), key[..16].into())
        .encrypt_padded_mut::<NoPadding>(&mut plain, length)
        .unwrap()
        .to_vec();
    STANDARD.encode(sealed)
}

fn signature(timestamp: &str, nonce: &str, encrypted: &str) -> String {
    let mut parts = [TOKEN, timestamp, nonce, encrypted];
    parts.sort_unstable();
    hex::encode(Sha1::digest(parts.concat()))
}

fn query(signature: &str, timestamp: &str, nonce: &str) -> String {
    format!("msg_signature={signature}&timestamp={timestamp}&nonce={nonce}")
}

/// A callback body for `message`, signed at `timestamp`: (query, body).
fn callback(message: &str, timestamp: i64) -> (String, String) {
    let encrypted = encrypt(message, CORP_ID);
    let timestamp = timestamp.to_string();
    let query = query(
        &signature(&timestamp, "1372623149", &encrypted),
        &timestamp,
        "1372623149",
    );
    let body = format!(
        "<xml><ToUserName><![CDATA[{CORP_ID}]]></ToUserName>\
         <Encrypt><![CDATA[{encrypted}]]></Encrypt><AgentID><![CDATA[1]]></AgentID></xml>"
    );
    (query, body)
}

async fn post(harness: &Harness, query: &str, body: impl Into<reqwest::Body>) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(harness.url(&format!("/hooks/wecom?{query}")))
        .header("content-type", "text/xml")
        .body(body)
        .send()
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

async fn get(harness: &Harness, query: &str) -> (u16, String) {
    let response = reqwest::get(harness.url(&format!("/hooks/wecom?{query}")))
        .await
        .unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn the_published_url_check_is_answered_with_its_plaintext() {
    let harness = start_wecom(0).await;
    let published = "msg_signature=5c45ff5e21c57e6ad56bac8758b79b1d9ac89fd3&timestamp=1409659589&nonce=263014780&echostr=P9nAzCzyDtyTWESHep1vC5X9xho%2FqYX3Zpb4yKa9SKld1DsH3Iyt3tP3zNdtp%2B4RPcs8TgAE7OaBO%2BFZXvnaqQ%3D%3D";
    assert_eq!(
        get(&harness, published).await,
        (200, "1616140317555161061".to_string())
    );
    let altered = published.replace("nonce=263014780", "nonce=263014781");
    let (status, body) = get(&harness, &altered).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("msg_signature does not match"), "{body}");
    assert!(harness.inbound().is_empty());
}

#[tokio::test]
async fn the_published_message_lands_in_in_once() {
    let harness = start_wecom(0).await;
    let published = query(
        "477715d11cdb4164915debcba66cb864d751f3e6",
        "1409659813",
        "1372623149",
    );
    let body = fixture("wecom", "official_request.xml");
    assert_eq!(
        post(&harness, &published, body.clone()).await,
        (200, String::new())
    );
    // WeCom's retry of the same callback adds nothing.
    assert_eq!(post(&harness, &published, body).await.0, 200);
    let messages = harness.inbound();
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(message.platform, "wecom");
    assert_eq!(message.bot, "218");
    assert_eq!(message.text, "hello");
    assert_eq!(message.sender.id, "mycreate");
    assert!(!message.sender.is_bot);
    assert_eq!(message.chat.id, "mycreate");
    assert_eq!(message.chat.kind, ChatKind::Direct);
    assert!(message.mentions.bot);
    assert!(message.mentions.users.is_empty());
    assert_eq!(
        message.platform_message_id.as_deref(),
        Some("4561255354251345929")
    );
    assert_eq!(message.platform_ts_ms, Some(1_409_659_813_000));
    assert!(message.attachments.is_empty());
    let raw = message.raw.as_deref().unwrap();
    assert!(raw.contains("<MsgId>4561255354251345929</MsgId>"), "{raw}");
    let dedup: i64 = harness.redis_cmd(redis::cmd("EXISTS").arg(harness.streams.dedup(
        "wecom",
        "mycreate",
        "4561255354251345929",
    )));
    assert_eq!(dedup, 1);
}

#[tokio::test]
async fn documented_messages_become_unified_messages() {
    let harness = start_wecom(3600).await;
    for name in ["text.xml", "image.xml", "voice.xml"] {
        let (query, body) = callback(&fixture("wecom", name), now_secs());
        assert_eq!(
            post(&harness, &query, body).await,
            (200, String::new()),
            "{name}"
        );
    }
    let messages = harness.inbound();
    assert_eq!(messages.len(), 3);
    let (text, image, voice) = (&messages[0], &messages[1], &messages[2]);
    assert_eq!(text.text, "this is a test");
    assert_eq!(text.sender.id, "fromUser");
    assert_eq!(text.bot, "1");
    assert_eq!(
        text.platform_message_id.as_deref(),
        Some("1234567890123458")
    );

    assert_eq!(image.text, "");
    assert_eq!(image.attachments.len(), 1);
    let picture = &image.attachments[0];
    assert_eq!(picture.kind, AttachmentKind::Image);
    assert_eq!(picture.url.as_deref(), Some("this is a url"));
    assert_eq!(picture.file_id.as_deref(), Some("media_id"));

    let audio = &voice.attachments[0];
    assert_eq!(audio.kind, AttachmentKind::Audio);
    assert_eq!(audio.url, None);
    assert_eq!(audio.file_id.as_deref(), Some("media_id"));
    assert_eq!(audio.mime.as_deref(), Some("audio/format"));
}

/// Markup a person wrote is text, and a CreateTime past what milliseconds
/// hold saturates (found by fuzz/: a declaration made the XML deserializer
/// panic, the conversion overflowed).
#[tokio::test]
async fn markup_in_a_text_and_a_far_create_time_are_read() {
    let harness = start_wecom(3600).await;
    let text = fixture("wecom", "text.xml")
        .replace("this is a test", "<!DOCTYPE html><p>hi</p>")
        .replace("1348831860", &i64::MAX.to_string());
    let (query, body) = callback(&text, now_secs());
    assert_eq!(post(&harness, &query, body).await, (200, String::new()));
    let messages = harness.inbound();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0].text, "<!DOCTYPE html><p>hi</p>");
    assert_eq!(messages[0].platform_ts_ms, Some(i64::MAX));
}

#[tokio::test]
async fn events_and_other_message_types_are_acknowledged_and_not_added() {
    let harness = start_wecom(3600).await;
    for name in ["event_enter_agent.xml", "location.xml"] {
        let (query, body) = callback(&fixture("wecom", name), now_secs());
        assert_eq!(
            post(&harness, &query, body).await,
            (200, String::new()),
            "{name}"
        );
    }
    assert!(harness.inbound().is_empty());
}

#[tokio::test]
async fn bad_callbacks_are_refused_and_add_nothing() {
    let harness = start_wecom(3600).await;
    let now = now_secs();
    let text = fixture("wecom", "text.xml");
    let (good_query, good_body) = callback(&text, now);

    let check = |status: u16, needle: &'static str| {
        move |(got, body): (u16, String)| {
            assert_eq!(got, status, "{needle}: {body}");
            assert!(body.contains(needle), "expected {needle:?} in {body}");
        }
    };

    // The signature: absent, wrong, or over another body.
    let unsigned = good_query.replace("msg_signature=", "signature=");
    check(401, "no `msg_signature`")(post(&harness, &unsigned, good_body.clone()).await);
    let wrong = good_query.replace("nonce=1372623149", "nonce=1");
    check(401, "msg_signature does not match")(post(&harness, &wrong, good_body.clone()).await);
    let (_, other_body) = callback(&text.replace("this is a test", "altered"), now);
    check(401, "msg_signature does not match")(post(&harness, &good_query, other_body).await);

    // Signed, but two hours old.
    let (stale_query, stale_body) = callback(&text, now - 7200);
    check(401, "more than 3600 s")(post(&harness, &stale_query, stale_body).await);

    // Signed, but not encrypted with our key, or addressed to another corp.
    let garbage = STANDARD.encode([7u8; 64]);
    let timestamp = now.to_string();
    let broken_query = query(&signature(&timestamp, "n", &garbage), &timestamp, "n");
    let broken_body = format!("<xml><Encrypt><![CDATA[{garbage}]]></Encrypt></xml>");
    check(401, "bad padding")(post(&harness, &broken_query, broken_body).await);
    let elsewhere = encrypt(&text, "ww0000000000000000");
    let elsewhere_query = query(&signature(&timestamp, "n", &elsewhere), &timestamp, "n");
    let elsewhere_body = format!("<xml><Encrypt>{elsewhere}</Encrypt></xml>");
    check(401, "addressed to")(post(&harness, &elsewhere_query, elsewhere_body).await);

    // Not the XML WeCom sends.
    let truncated = &good_body[..good_body.len() / 2];
    check(400, "not a WeCom callback")(post(&harness, &good_query, truncated.to_string()).await);
    check(400, "not a WeCom callback")(post(&harness, &good_query, "{}".to_string()).await);
    let (query_without_id, body_without_id) =
        callback(&text.replace("<MsgId>1234567890123458</MsgId>", ""), now);
    check(400, "without MsgId")(post(&harness, &query_without_id, body_without_id).await);

    // A document type declaration between two runs of text made the XML
    // deserializer panic (found by fuzz/): refused, in the envelope (before
    // any signature is checked) and in a signed message.
    let declared = "<xml><Encrypt>x<!DOCTYPE y>z</Encrypt></xml>";
    check(400, "(<!DOCTYPE) is not accepted")(post(&harness, &good_query, declared).await);
    let (declared_query, declared_body) = callback(
        &text.replace("<![CDATA[this is a test]]>", "x<!DOCTYPE y>z"),
        now,
    );
    check(400, "(<!DOCTYPE) is not accepted")(post(&harness, &declared_query, declared_body).await);

    // Far too big to read.
    check(413, "larger than")(post(&harness, &good_query, vec![b'x'; 2 << 20]).await);

    assert!(harness.inbound().is_empty(), "nothing refused got in");
    // The process is unharmed: the good callback still goes in.
    assert_eq!(post(&harness, &good_query, good_body).await.0, 200);
    assert_eq!(harness.inbound().len(), 1);
}
