//! `/hooks/slack` against a real redis-server over real HTTP: Slack's
//! documented Events API payloads (tests/fixtures/slack), signed here the
//! way Slack signs them, and everything that must be refused.

mod common;

use botline_shared::message::{AttachmentKind, ChatKind};
use common::*;
use hmac::{Hmac, Mac};
use sha2::Sha256;

const SECRET: &str = "8f742231b10e8888abcd99yyyzzz85a5";
const BOT_USER: &str = "U0LAN0Z89";

fn fixture(name: &str) -> String {
    common::fixture("slack", name)
}

async fn start_slack() -> Harness {
    start_configured(
        &format!(
            "[ingest.platforms.slack]\nenabled = true\nbot_user_id = \"{BOT_USER}\"\nbot_id = \"B0LAN0Z8A\"\n"
        ),
        &[("BOTLINE_SLACK_SIGNING_SECRET", SECRET)],
    )
    .await
}

/// `v0=` + hex HMAC-SHA256(`secret`, `v0:{timestamp}:{body}`).
fn signature(secret: &str, timestamp: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("v0:{timestamp}:{body}").as_bytes());
    format!("v0={}", hex::encode(mac.finalize().into_bytes()))
}

/// How a request is signed.
enum Signed<'a> {
    /// As Slack signs it, `seconds_ago` old.
    By(&'a str, i64),
    /// With these header values.
    Headers(Option<&'a str>, Option<&'a str>),
}

/// POST `body` to `/hooks/slack`, signed as told, with extra headers:
/// the status, content type and body.
async fn post(
    harness: &Harness,
    signed: Signed<'_>,
    body: &str,
    extra: &[(&str, &str)],
) -> (u16, String, String) {
    let mut request = reqwest::Client::new()
        .post(harness.url("/hooks/slack"))
        .header("content-type", "application/json")
        .body(body.to_string());
    let (signature, timestamp) = match signed {
        Signed::By(secret, seconds_ago) => {
            let timestamp = (now_secs() - seconds_ago).to_string();
            (Some(signature(secret, &timestamp, body)), Some(timestamp))
        }
        Signed::Headers(signature, timestamp) => {
            (signature.map(str::to_owned), timestamp.map(str::to_owned))
        }
    };
    if let Some(signature) = signature {
        request = request.header("X-Slack-Signature", signature);
    }
    if let Some(timestamp) = timestamp {
        request = request.header("X-Slack-Request-Timestamp", timestamp);
    }
    for (name, value) in extra {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|value| value.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, content_type, response.text().await.unwrap())
}

#[tokio::test]
async fn the_url_check_is_answered_with_its_challenge() {
    let harness = start_slack().await;
    let (status, content_type, body) = post(
        &harness,
        Signed::By(SECRET, 0),
        &fixture("url_verification.json"),
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert!(content_type.starts_with("text/plain"), "{content_type}");
    assert_eq!(body, "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P");
    // Unsigned, it is refused like anything else.
    let (status, _, _) = post(
        &harness,
        Signed::Headers(None, None),
        &fixture("url_verification.json"),
        &[],
    )
    .await;
    assert_eq!(status, 401);
    assert!(harness.inbound().is_empty());
}

#[tokio::test]
async fn documented_events_become_unified_messages() {
    let harness = start_slack().await;
    for name in ["app_mention.json", "message_im_thread_file.json"] {
        let (status, _, body) = post(&harness, Signed::By(SECRET, 0), &fixture(name), &[]).await;
        assert_eq!((status, body.as_str()), (200, ""), "{name}");
    }
    let inbound = harness.inbound();
    assert_eq!(inbound.len(), 2);

    let mention = &inbound[0];
    assert_eq!(mention.platform, "slack");
    assert_eq!(mention.bot, BOT_USER);
    assert_eq!(mention.chat.id, "C0LAN2Q65");
    assert_eq!(mention.chat.kind, ChatKind::Group);
    assert_eq!(mention.sender.id, "U061F7AUR");
    assert!(!mention.sender.is_bot);
    assert_eq!(
        mention.text,
        "@U0LAN0Z89 is it everything a river should be?"
    );
    assert_eq!(mention.mentions.users, [BOT_USER]);
    assert!(mention.mentions.bot);
    assert_eq!(
        mention.platform_message_id.as_deref(),
        Some("1515449522.000016")
    );
    assert_eq!(mention.platform_ts_ms, Some(1_515_449_522_000));
    assert_eq!(mention.thread, None);

    let direct = &inbound[1];
    assert_eq!(direct.chat.id, "D024BE91L");
    assert_eq!(direct.chat.kind, ChatKind::Direct);
    assert_eq!(direct.thread.as_deref(), Some("1355517523.000005"));
    assert_eq!(direct.text, "here is the receipt & the label, see #general");
    assert!(!direct.mentions.bot);
    assert_eq!(direct.attachments.len(), 1);
    let file = &direct.attachments[0];
    assert_eq!(file.kind, AttachmentKind::Image);
    assert_eq!(file.file_id.as_deref(), Some("F0S43PZDF"));
    assert_eq!(
        file.url.as_deref(),
        Some("https://files.slack.com/files-pri/T061EG9R6-F0S43PZDF/receipt.png")
    );
    assert_eq!(file.mime.as_deref(), Some("image/png"));
    assert_eq!(file.size, Some(28415));
    assert_eq!(file.name.as_deref(), Some("receipt.png"));
}

/// A `ts` past what milliseconds hold is still the message's id, with no
/// time (found by fuzz/: the conversion overflowed).
#[tokio::test]
async fn a_ts_past_what_milliseconds_hold_is_read_without_a_time() {
    let harness = start_slack().await;
    let event =
        fixture("app_mention.json").replace("1515449522.000016", "99999999999999999.000016");
    let (status, _, body) = post(&harness, Signed::By(SECRET, 0), &event, &[]).await;
    assert_eq!((status, body.as_str()), (200, ""));
    let inbound = harness.inbound();
    assert_eq!(inbound.len(), 1);
    assert_eq!(
        inbound[0].platform_message_id.as_deref(),
        Some("99999999999999999.000016")
    );
    assert_eq!(inbound[0].platform_ts_ms, None);
}

#[tokio::test]
async fn retries_and_the_second_event_of_one_message_add_nothing() {
    let harness = start_slack().await;
    let mention = fixture("app_mention.json");
    assert_eq!(
        post(&harness, Signed::By(SECRET, 0), &mention, &[]).await.0,
        200
    );
    // Slack's retry of the same event, 3 s later.
    let retry = [
        ("X-Slack-Retry-Num", "1"),
        ("X-Slack-Retry-Reason", "http_timeout"),
    ];
    assert_eq!(
        post(&harness, Signed::By(SECRET, 0), &mention, &retry)
            .await
            .0,
        200
    );
    // The `message` event Slack also sends for the same message.
    let message = fixture("message_channels.json");
    assert_eq!(
        post(&harness, Signed::By(SECRET, 0), &message, &[]).await.0,
        200
    );
    assert_eq!(harness.inbound().len(), 1);
}

#[tokio::test]
async fn events_that_are_not_messages_from_people_are_acknowledged_and_not_added() {
    let harness = start_slack().await;
    for body in [
        fixture("message_changed.json"),
        fixture("bot_own_message.json"),
        fixture("reaction_added.json"),
        r#"{"type":"event_callback","event_id":"Ev9","event":{"type":"something_slack_adds_later"}}"#
            .to_string(),
        r#"{"type":"app_rate_limited","team_id":"T123456","minute_rate_limited":1518467820,"api_app_id":"A123456"}"#
            .to_string(),
        r#"{"type":"a_new_envelope"}"#.to_string(),
    ] {
        let (status, _, answer) = post(&harness, Signed::By(SECRET, 0), &body, &[]).await;
        assert_eq!((status, answer.as_str()), (200, ""), "{body}");
    }
    assert!(harness.inbound().is_empty());
}

#[tokio::test]
async fn bad_requests_are_refused_with_their_reason_and_add_nothing() {
    let harness = start_slack().await;
    let event = fixture("app_mention.json");
    let now = now_secs().to_string();
    let good = signature(SECRET, &now, &event);
    let cases: Vec<(Signed, String, u16, &str)> = vec![
        (
            Signed::Headers(None, None),
            event.clone(),
            401,
            "no x-slack-signature",
        ),
        (
            Signed::Headers(Some(good.as_str()), None),
            event.clone(),
            401,
            "no x-slack-signature",
        ),
        (
            Signed::By("a-different-signing-secret", 0),
            event.clone(),
            401,
            "does not match",
        ),
        (
            Signed::Headers(Some("v0=zz"), Some(now.as_str())),
            event.clone(),
            401,
            "is not v0=<hex>",
        ),
        (
            Signed::Headers(Some(good.as_str()), Some(now.as_str())),
            event.replace("river", "creek"),
            401,
            "does not match",
        ),
        (
            Signed::By(SECRET, 301),
            event.clone(),
            401,
            "more than 300 s",
        ),
        (
            Signed::By(SECRET, -301),
            event.clone(),
            401,
            "more than 300 s",
        ),
        (
            Signed::Headers(Some(good.as_str()), Some("yesterday")),
            event.clone(),
            401,
            "not unix seconds",
        ),
        // Found by fuzz/: the skew overflowed, before any signature was checked.
        (
            Signed::Headers(Some(good.as_str()), Some("-9223372036854775808")),
            event.clone(),
            401,
            "more than 300 s",
        ),
        (
            Signed::By(SECRET, 0),
            event[..event.len() / 2].to_string(),
            400,
            "EOF while parsing",
        ),
        (
            Signed::By(SECRET, 0),
            r#"{"type":"event_callback","event":{"user":"U1"}}"#.into(),
            400,
            "missing field `type`",
        ),
        (
            Signed::By(SECRET, 0),
            format!(
                "{{\"type\":\"event_callback\",\"pad\":\"{}\"}}",
                "x".repeat(2 << 20)
            ),
            413,
            "larger than",
        ),
    ];
    for (signed, body, status, error) in cases {
        let (got_status, _, got_body) = post(&harness, signed, &body, &[]).await;
        assert_eq!(got_status, status, "{got_body}");
        assert!(got_body.contains(error), "{error:?} not in {got_body}");
        assert!(!got_body.contains(SECRET));
    }
    assert!(harness.inbound().is_empty());
    assert_eq!(
        post(&harness, Signed::By(SECRET, 0), &event, &[]).await.0,
        200
    );
    assert_eq!(harness.inbound().len(), 1);
}

#[test]
fn an_enabled_slack_needs_its_signing_secret_and_bot_user() {
    let redis = botline_shared::testing::RedisServer::start();
    let start = |settings: &str, env: &[(&str, &str)]| {
        configured_ingest(
            &redis.url(),
            Some(&format!(
                "[ingest.platforms.slack]\nenabled = true\n{settings}"
            )),
            env,
            None,
        )
        .err()
        .map(|error| error.to_string())
    };
    let bot = "bot_user_id = \"U0LAN0Z89\"\n";
    assert_eq!(
        start(bot, &[]).as_deref(),
        Some("setting BOTLINE_SLACK_SIGNING_SECRET: is not set")
    );
    assert!(start("", &[("BOTLINE_SLACK_SIGNING_SECRET", SECRET)])
        .unwrap()
        .starts_with("setting ingest.platforms.slack.bot_user_id:"));
    assert_eq!(
        start(bot, &[("BOTLINE_SLACK_SIGNING_SECRET", SECRET)]),
        None
    );
}
