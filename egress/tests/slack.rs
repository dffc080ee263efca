//! The Slack sender against a local stand-in of the Web API that checks each
//! request as Slack would (`POST /api/chat.postMessage`, the bearer token,
//! a JSON body with `channel` and `text`), and can answer 429 with
//! `Retry-After`, 5xx, or an `ok: false` error code.

mod senders;

use botline_shared::message::{Attachment, ChatKind, Reply};
use senders::*;
use serde_json::{json, Value};
use std::time::Duration;

const TOKEN: &str = "xoxb-17653672481-19874698323-pdFZKVeTuE8sk7oOcBrzbqgy";

/// What the Web API answers a request, checking it first; `refusal`, if
/// any, is answered to a good request instead of success.
fn web_api(nth: usize, received: &Received, refusal: Option<Answer>) -> Answer {
    let error = |status: u16, code: &str| {
        (
            status,
            Vec::new(),
            json!({"ok": false, "error": code}).to_string(),
        )
    };
    if received.uri != "/api/chat.postMessage" {
        return error(404, "unknown_method");
    }
    if received.header("authorization") != Some(&format!("Bearer {TOKEN}")) {
        return error(200, "invalid_auth");
    }
    if received.method != "POST"
        || !received
            .header("content-type")
            .is_some_and(|value| value.starts_with("application/json"))
    {
        return error(200, "invalid_form_data");
    }
    let Ok(body) = serde_json::from_slice::<Value>(&received.body) else {
        return error(200, "invalid_json");
    };
    if !body["channel"].is_string() {
        return error(200, "channel_not_found");
    }
    if !body["text"].is_string() {
        return error(200, "no_text");
    }
    if let Some(blocks) = body.get("blocks") {
        if !valid_blocks(blocks) {
            return error(200, "invalid_blocks");
        }
    }
    if let Some(refusal) = refusal {
        return refusal;
    }
    let ts = format!("1503435956.{:06}", nth);
    let posted = json!({"ok": true, "channel": body["channel"], "ts": ts,
        "message": {"text": body["text"], "type": "message", "ts": ts}});
    (200, Vec::new(), posted.to_string())
}

/// Blocks as Slack takes them: at most 50; a section's text an `mrkdwn`
/// object of 1 to 3000 characters; an image block with an `image_url` of
/// at most 3000 characters and an `alt_text` of 1 to 2000.
fn valid_blocks(blocks: &Value) -> bool {
    let Some(blocks) = blocks.as_array() else {
        return false;
    };
    let length = |value: &Value, max: usize| {
        value
            .as_str()
            .is_some_and(|text| (1..=max).contains(&text.chars().count()))
    };
    blocks.len() <= 50
        && blocks.iter().all(|block| match block["type"].as_str() {
            Some("section") => {
                block["text"]["type"] == "mrkdwn" && length(&block["text"]["text"], 3000)
            }
            Some("image") => length(&block["image_url"], 3000) && length(&block["alt_text"], 2000),
            _ => false,
        })
}

fn settings(api: &str, extra: &str) -> String {
    format!("[egress.platforms.slack]\nenabled = true\napi_base_url = \"{api}/api\"\n{extra}")
}

fn start(api: &StandIn, extra: &str) -> Egress {
    Egress::start(
        &settings(&api.url, extra),
        &[("BOTLINE_SLACK_BOT_TOKEN", TOKEN)],
    )
}

fn slack_reply(id: &str, channel: &str, kind: ChatKind, text: &str) -> Reply {
    let mut reply = reply(id, "slack", chat(channel, kind), text);
    reply.bot = "U0LAN0Z89".into();
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_are_posted_once_with_mentions_and_threads() {
    let api = StandIn::start(|nth, received| web_api(nth, received, None)).await;
    let egress = start(&api, "thread_replies = true\n");
    let mut mentioned = slack_reply(
        "r-1",
        "C0LAN2Q65",
        ChatKind::Group,
        "Hi @U061F7AUR, 1 < 2 & done",
    );
    mentioned.mentions = vec!["U061F7AUR".into()];
    mentioned.reply_to = Some("1515449522.000016".into());
    egress.send(&mentioned);
    let mut threaded = slack_reply("r-2", "D024BE91L", ChatKind::Direct, "in the thread");
    threaded.thread = Some("1355517523.000005".into());
    threaded.reply_to = Some("1355517600.000008".into());
    egress.send(&threaded);
    eventually("two receipts", || async { egress.receipts().len() == 2 }).await;

    let mut bodies: Vec<Value> = api.received().iter().map(Received::json).collect();
    bodies.sort_by_key(|body| body["channel"].to_string());
    assert_eq!(
        bodies,
        [
            json!({
                "channel": "C0LAN2Q65",
                "text": "Hi <@U061F7AUR>, 1 &lt; 2 &amp; done",
                "thread_ts": "1515449522.000016",
            }),
            json!({
                "channel": "D024BE91L",
                "text": "in the thread",
                "thread_ts": "1355517523.000005",
            }),
        ],
        "each reply once, as Slack takes it"
    );
    let mut ids: Vec<String> = egress
        .receipts()
        .into_iter()
        .map(|receipt| receipt.platform_message_id.unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["1503435956.000000", "1503435956.000001"]);
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_waits_its_retry_after_and_a_5xx_is_retried() {
    let api = StandIn::start(|nth, received| {
        let refusal = match nth {
            0 => Some((
                429,
                vec![("retry-after", "1".to_string())],
                json!({"ok": false, "error": "ratelimited"}).to_string(),
            )),
            1 => Some((
                503,
                Vec::new(),
                json!({"ok": false, "error": "service_unavailable"}).to_string(),
            )),
            _ => None,
        };
        web_api(nth, received, refusal)
    })
    .await;
    let egress = start(&api, "");
    egress.send(&slack_reply("r-1", "C0LAN2Q65", ChatKind::Group, "hi"));
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;
    assert_eq!(egress.receipts()[0].attempts, 3);
    let received = api.received();
    assert_eq!(received.len(), 3);
    assert!(
        received[1].at - received[0].at >= Duration::from_secs(1),
        "Retry-After was waited"
    );
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_errors_go_to_dead_by_their_code_without_the_token() {
    let api = StandIn::start(|nth, received| {
        let refusal = (
            200,
            Vec::new(),
            json!({"ok": false, "error": "not_in_channel"}).to_string(),
        );
        web_api(nth, received, Some(refusal))
    })
    .await;
    let egress = start(&api, "");
    egress.send(&slack_reply("r-1", "C0LAN2Q65", ChatKind::Group, "hi"));
    eventually("a dead letter", || async { egress.dead().len() == 1 }).await;
    assert_eq!(
        egress.dead()[0].error,
        "slack error not_in_channel (HTTP 200)"
    );
    assert_eq!(api.count(), 1, "not retried");
    egress.stop().await;

    // A revoked token: Slack's invalid_auth, permanent, never quoted.
    let other = "xoxb-revoked-0000";
    let egress = Egress::start(
        &settings(&api.url, ""),
        &[("BOTLINE_SLACK_BOT_TOKEN", other)],
    );
    egress.send(&slack_reply("r-2", "C0LAN2Q65", ChatKind::Group, "hi"));
    eventually("a dead letter", || async { egress.dead().len() == 1 }).await;
    let error = &egress.dead()[0].error;
    assert_eq!(error, "slack error invalid_auth (HTTP 200)");
    assert!(!error.contains(other));
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_channel_gets_no_more_than_its_pace() {
    let api = StandIn::start(|nth, received| web_api(nth, received, None)).await;
    let egress = start(&api, "channel_per_second = 4\n");
    for n in 0..4 {
        egress.send(&slack_reply(
            &format!("r-{n}"),
            "C0LAN2Q65",
            ChatKind::Group,
            &format!("answer {n}"),
        ));
    }
    eventually("four receipts", || async { egress.receipts().len() == 4 }).await;
    // A quarter of a second apart at the least (less a little for clocks).
    assert_paced(&api.received(), 4, Duration::from_millis(200));
    egress.stop().await;
}

#[tokio::test]
async fn an_enabled_slack_needs_a_bot_token() {
    let overlay = settings("http://127.0.0.1:1", "");
    for (token, expected) in [
        (None, "setting BOTLINE_SLACK_BOT_TOKEN: is not set"),
        (
            Some("not-a-token"),
            "setting BOTLINE_SLACK_BOT_TOKEN: is not a Slack token (xoxb-…, the bot user OAuth token)",
        ),
    ] {
        let env: Vec<(&str, &str)> = token
            .map(|token| ("BOTLINE_SLACK_BOT_TOKEN", token))
            .into_iter()
            .collect();
        let Err(error) = Egress::try_start(&overlay, &env) else {
            panic!("{token:?} was accepted");
        };
        assert_eq!(error.to_string(), expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_is_an_image_block_with_the_text_kept_as_the_fallback() {
    let api = StandIn::start(|nth, received| web_api(nth, received, None)).await;
    let egress = start(&api, "");
    let mut sent = slack_reply("r-1", "C0LAN2Q65", ChatKind::Group, "Our shop, @U061F7AUR:");
    sent.mentions = vec!["U061F7AUR".into()];
    sent.thread = Some("1355517523.000005".into());
    sent.attachments = vec![Attachment::image(
        "https://cdn.example.com/shop.jpg",
        Some("the shop <front>".into()),
    )];
    egress.send(&sent);
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;

    let received = api.received();
    assert_eq!(received.len(), 1, "one chat.postMessage");
    assert_eq!(received[0].uri, "/api/chat.postMessage");
    assert_eq!(
        received[0].header("authorization"),
        Some(format!("Bearer {TOKEN}").as_str())
    );
    assert_eq!(
        received[0].json(),
        json!({
            "channel": "C0LAN2Q65",
            "text": "Our shop, <@U061F7AUR>:",
            "thread_ts": "1355517523.000005",
            "blocks": [
                {"type": "section", "text": {"type": "mrkdwn", "text": "Our shop, <@U061F7AUR>:"}},
                {"type": "image", "image_url": "https://cdn.example.com/shop.jpg",
                 "alt_text": "the shop <front>"},
            ],
        })
    );
    assert!(egress.dead().is_empty());
    egress.stop().await;
}
