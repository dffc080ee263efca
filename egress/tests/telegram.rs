//! The Telegram sender against a local stand-in of the Bot API that checks
//! each request as Telegram would (method, `/bot<token>/sendMessage` with
//! `chat_id` and `text`, `/bot<token>/sendPhoto` with `chat_id` and
//! `photo`, JSON bodies, Telegram's length limits), and can answer 429 with
//! `parameters.retry_after`, 5xx, or a refusal.

mod senders;

use botline_shared::message::{Attachment, ChatKind, Reply};
use senders::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const TOKEN: &str = "123456:ABC-DEF1234ghIkl-zyx57W2v1u123ew11";

/// What the Bot API answers a request, checking it first; `refusal`, if
/// any, is what it answers a good request instead of success.
fn bot_api(nth: usize, received: &Received, refusal: Option<Value>) -> Answer {
    let error = |code: u16, description: &str| {
        (
            code,
            Vec::new(),
            json!({"ok": false, "error_code": code, "description": description}).to_string(),
        )
    };
    let Some(method) = received.uri.strip_prefix(&format!("/bot{TOKEN}/")) else {
        return error(401, "Unauthorized");
    };
    if method != "sendMessage" && method != "sendPhoto" {
        return error(404, "Not Found: method not found");
    }
    if received.method != "POST" || received.header("content-type") != Some("application/json") {
        return error(400, "Bad Request: expected a JSON POST");
    }
    let Ok(body) = serde_json::from_slice::<Value>(&received.body) else {
        return error(400, "Bad Request: can't parse JSON");
    };
    let chat_ok = body["chat_id"].is_i64() || body["chat_id"].is_string();
    let units = |field: &str| body[field].as_str().map(|text| text.encode_utf16().count());
    if method == "sendMessage" {
        if !chat_ok || !body["text"].is_string() {
            return error(400, "Bad Request: chat_id and text are required");
        }
        if units("text") > Some(4096) {
            return error(400, "Bad Request: message is too long");
        }
    } else {
        if !chat_ok || !body["photo"].is_string() {
            return error(400, "Bad Request: chat_id and photo are required");
        }
        if units("caption") > Some(1024) {
            return error(400, "Bad Request: message caption is too long");
        }
    }
    if let Some(refusal) = refusal {
        let code = refusal["error_code"].as_u64().unwrap() as u16;
        return (code, Vec::new(), refusal.to_string());
    }
    let sent = json!({"ok": true, "result": {
        "message_id": 500 + nth,
        "date": 1441645532,
        "chat": {"id": body["chat_id"], "type": "supergroup"},
        "text": body["text"],
    }});
    (200, Vec::new(), sent.to_string())
}

fn settings(api: &str, extra: &str) -> String {
    format!("[egress.platforms.telegram]\nenabled = true\napi_base_url = \"{api}\"\n{extra}")
}

fn start(api: &StandIn, extra: &str) -> Egress {
    Egress::start(
        &settings(&api.url, extra),
        &[("BOTLINE_TELEGRAM_BOT_TOKEN", TOKEN)],
    )
}

fn telegram_reply(id: &str, chat: &str, kind: ChatKind, text: &str) -> Reply {
    reply(id, "telegram", senders::chat(chat, kind), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_is_sent_once_with_its_mention_thread_and_quote() {
    let api = StandIn::start(|nth, received| bot_api(nth, received, None)).await;
    let egress = start(&api, "");
    let mut sent = telegram_reply(
        "r-1",
        "-1001234567890",
        ChatKind::Group,
        "Order <A-1> & co: shipped",
    );
    sent.thread = Some("2290".into());
    sent.reply_to = Some("2305".into());
    sent.mentions = vec!["1111111".into()];
    sent.platform_data = [("name:1111111".to_string(), "Test Firstname".to_string())].into();
    egress.send(&sent);
    egress.send(&telegram_reply("r-2", "1111111", ChatKind::Direct, "hi"));
    eventually("two receipts", || async { egress.receipts().len() == 2 }).await;

    let received = api.received();
    assert_eq!(received.len(), 2, "each reply once");
    let group = received
        .iter()
        .find(|request| request.json()["chat_id"] == json!(-1001234567890_i64))
        .unwrap();
    assert_eq!(
        group.json(),
        json!({
            "chat_id": -1001234567890_i64,
            "text": "<a href=\"tg://user?id=1111111\">Test Firstname</a> Order &lt;A-1&gt; &amp; co: shipped",
            "parse_mode": "HTML",
            "message_thread_id": 2290,
            "reply_parameters": {"message_id": 2305, "allow_sending_without_reply": true},
        })
    );
    let direct = received
        .iter()
        .find(|request| request.json()["chat_id"] == json!(1111111))
        .unwrap();
    assert_eq!(
        direct.json(),
        json!({"chat_id": 1111111, "text": "hi", "parse_mode": "HTML"})
    );
    let mut ids: Vec<String> = egress
        .receipts()
        .into_iter()
        .map(|receipt| receipt.platform_message_id.unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, ["500", "501"]);
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_waits_its_retry_after_and_a_5xx_is_retried() {
    let api = StandIn::start(|nth, received| {
        let refusal = match nth {
            0 => Some(json!({"ok": false, "error_code": 429,
                "description": "Too Many Requests: retry after 1", "parameters": {"retry_after": 1}})),
            1 => Some(json!({"ok": false, "error_code": 502, "description": "Bad Gateway"})),
            _ => None,
        };
        bot_api(nth, received, refusal)
    })
    .await;
    let egress = start(&api, "");
    egress.send(&telegram_reply("r-1", "1111111", ChatKind::Direct, "hi"));
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;
    let receipts = egress.receipts();
    assert_eq!(receipts[0].attempts, 3);
    assert_eq!(receipts[0].platform_message_id.as_deref(), Some("502"));
    let received = api.received();
    assert_eq!(received.len(), 3);
    assert!(
        received[1].at - received[0].at >= Duration::from_secs(1),
        "retry_after was waited"
    );
    assert!(egress.dead().is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_goes_to_dead_naming_telegrams_error_without_the_token() {
    let api = StandIn::start(|nth, received| {
        let blocked = json!({"ok": false, "error_code": 403,
            "description": "Forbidden: bot was blocked by the user"});
        bot_api(nth, received, Some(blocked))
    })
    .await;
    let egress = start(&api, "");
    egress.send(&telegram_reply("r-1", "1111111", ChatKind::Direct, "hi"));
    eventually("a dead letter", || async { egress.dead().len() == 1 }).await;
    let dead = &egress.dead()[0];
    assert_eq!(
        dead.error,
        "telegram error 403: Forbidden: bot was blocked by the user"
    );
    assert_eq!(api.count(), 1, "not retried");
    assert!(egress.receipts().is_empty());
    egress.stop().await;

    // A wrong token is Telegram's 401, permanent, and never quoted.
    let egress = Egress::start(
        &settings(&api.url, ""),
        &[("BOTLINE_TELEGRAM_BOT_TOKEN", "123456:wrong-token")],
    );
    egress.send(&telegram_reply("r-2", "1111111", ChatKind::Direct, "hi"));
    eventually("a dead letter", || async { egress.dead().len() == 1 }).await;
    let error = &egress.dead()[0].error;
    assert_eq!(error, "telegram error 401: Unauthorized");
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_chat_gets_no_more_than_its_pace() {
    let api = StandIn::start(|nth, received| bot_api(nth, received, None)).await;
    let egress = start(&api, "chat_per_second = 4\n");
    for n in 0..4 {
        egress.send(&telegram_reply(
            &format!("r-{n}"),
            "1111111",
            ChatKind::Direct,
            &format!("answer {n}"),
        ));
    }
    egress.send(&telegram_reply(
        "r-other",
        "2222222",
        ChatKind::Direct,
        "other",
    ));
    eventually("five receipts", || async { egress.receipts().len() == 5 }).await;
    // A quarter of a second apart at the least (less a little for clocks).
    let one_chat: Vec<Received> = api
        .received()
        .into_iter()
        .filter(|request| request.json()["chat_id"] == json!(1111111))
        .collect();
    assert_paced(&one_chat, 4, Duration::from_millis(200));
    egress.stop().await;
}

#[tokio::test]
async fn an_enabled_telegram_needs_a_bot_token() {
    let overlay = settings("http://127.0.0.1:1", "");
    let error = |env: &[(&str, &str)]| {
        Egress::try_start(&overlay, env)
            .err()
            .map(|error| error.to_string())
    };
    assert_eq!(
        error(&[]).as_deref(),
        Some("setting BOTLINE_TELEGRAM_BOT_TOKEN: is not set")
    );
    let bad = error(&[("BOTLINE_TELEGRAM_BOT_TOKEN", "no-colon-secret")]).unwrap();
    assert!(
        bad.starts_with("setting BOTLINE_TELEGRAM_BOT_TOKEN: is not a bot token"),
        "{bad}"
    );
    assert!(!bad.contains("no-colon-secret"));
    let zero = Egress::try_start(
        &settings("http://127.0.0.1:1", "group_per_minute = 0\n"),
        &[("BOTLINE_TELEGRAM_BOT_TOKEN", TOKEN)],
    )
    .err()
    .unwrap()
    .to_string();
    assert_eq!(
        zero,
        "setting egress.platforms.telegram.group_per_minute: must be at least 1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_picture_is_a_send_photo_with_the_text_as_caption_in_the_thread() {
    let api = StandIn::start(|nth, received| bot_api(nth, received, None)).await;
    let egress = start(&api, "");
    let mut sent = telegram_reply("r-1", "-1001234567890", ChatKind::Group, "Our <shop>:");
    sent.thread = Some("2290".into());
    sent.reply_to = Some("2305".into());
    sent.attachments = vec![
        Attachment::image("https://cdn.example.com/shop.jpg", Some("the shop".into())),
        Attachment::image("https://cdn.example.com/map.png", None),
    ];
    egress.send(&sent);
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;

    let received = api.received();
    let calls: Vec<(&str, Value)> = received
        .iter()
        .map(|request| (request.path(), request.json()))
        .collect();
    let path = |method: &str| format!("/bot{TOKEN}/{method}");
    assert_eq!(
        calls,
        [
            (
                path("sendPhoto").as_str(),
                json!({
                    "chat_id": -1001234567890_i64,
                    "photo": "https://cdn.example.com/shop.jpg",
                    "caption": "Our &lt;shop&gt;:",
                    "parse_mode": "HTML",
                    "message_thread_id": 2290,
                    "reply_parameters": {"message_id": 2305, "allow_sending_without_reply": true},
                })
            ),
            (
                path("sendPhoto").as_str(),
                json!({
                    "chat_id": -1001234567890_i64,
                    "photo": "https://cdn.example.com/map.png",
                    "message_thread_id": 2290,
                })
            ),
        ]
    );
    for request in &received {
        assert_eq!(request.header("content-type"), Some("application/json"));
    }
    let receipts = egress.receipts();
    assert_eq!(receipts[0].platform_message_id.as_deref(), Some("500"));
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_too_long_for_a_caption_follows_its_picture() {
    let api = StandIn::start(|nth, received| bot_api(nth, received, None)).await;
    let egress = start(&api, "chat_burst = 2\n");
    let text = "word ".repeat(300);
    let mut sent = telegram_reply("r-1", "1111111", ChatKind::Direct, text.trim_end());
    sent.attachments = vec![Attachment::image("https://cdn.example.com/a.png", None)];
    egress.send(&sent);
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;
    let received = api.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].path(), format!("/bot{TOKEN}/sendPhoto"));
    assert_eq!(
        received[0].json(),
        json!({"chat_id": 1111111, "photo": "https://cdn.example.com/a.png"})
    );
    assert_eq!(received[1].path(), format!("/bot{TOKEN}/sendMessage"));
    assert_eq!(
        received[1].json(),
        json!({"chat_id": 1111111, "text": text.trim_end(), "parse_mode": "HTML"})
    );
    egress.stop().await;
}

/// Three paragraphs of 3000 characters: three messages.
fn three_parts() -> (String, [String; 3]) {
    let parts = ["A", "B", "C"].map(|letter| format!("{letter}{}", "x".repeat(2999)));
    (parts.join("\n\n"), parts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_part_two_failed_never_sends_part_one_again() {
    let failed = Arc::new(AtomicBool::new(false));
    let failing = failed.clone();
    let api = StandIn::start(move |nth, received| {
        let part_two = received.json()["text"]
            .as_str()
            .is_some_and(|text| text.starts_with('B'));
        let refusal = (part_two && !failing.swap(true, Ordering::SeqCst))
            .then(|| json!({"ok": false, "error_code": 502, "description": "Bad Gateway"}));
        bot_api(nth, received, refusal)
    })
    .await;
    // One attempt per delivery: the retry comes from the entry delivered
    // again (taken over once idle), so the parts already out are known
    // only from what Redis recorded.
    let egress = Egress::start(
        &format!(
            "max_attempts = 1\n{}",
            settings(&api.url, "chat_burst = 3\n")
        ),
        &[("BOTLINE_TELEGRAM_BOT_TOKEN", TOKEN)],
    );
    let (text, parts) = three_parts();
    egress.send(&telegram_reply(
        "r-long",
        "1111111",
        ChatKind::Direct,
        &text,
    ));
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;

    assert!(failed.load(Ordering::SeqCst), "part two failed once");
    let texts: Vec<String> = api
        .received()
        .iter()
        .map(|request| request.json()["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        texts,
        [&parts[0], &parts[1], &parts[1], &parts[2]].map(String::clone),
        "part one once, part two again after its failure, then part three"
    );
    let receipt = &egress.receipts()[0];
    assert_eq!(
        receipt.platform_message_id.as_deref(),
        Some("500"),
        "the first part's id"
    );
    // The part records went with the acknowledgement.
    let mut connection = egress.redis.connection();
    let p = egress.streams.partition_of("telegram", "1111111");
    for part in 0..3 {
        let key = egress.streams.sent_part(p, "r-long", part);
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query(&mut connection)
            .unwrap();
        assert!(!exists, "{key} deleted once the reply is out");
    }
    assert!(egress.dead().is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_text_is_several_messages_each_within_telegrams_limit() {
    let api = StandIn::start(|nth, received| bot_api(nth, received, None)).await;
    let egress = start(&api, "chat_burst = 3\n");
    let (text, parts) = three_parts();
    let mut sent = telegram_reply("r-long", "-100777", ChatKind::Group, &text);
    sent.reply_to = Some("9".into());
    egress.send(&sent);
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;
    let received = api.received();
    let send_message = format!("/bot{TOKEN}/sendMessage");
    let paths: Vec<&str> = received.iter().map(|r| r.path()).collect();
    assert_eq!(paths, [send_message.as_str(); 3]);
    let bodies: Vec<Value> = received.iter().map(|request| request.json()).collect();
    assert_eq!(bodies[0]["text"], parts[0].as_str());
    assert_eq!(
        bodies[0]["reply_parameters"]["message_id"], 9,
        "the first part quotes"
    );
    for (body, part) in bodies[1..].iter().zip(&parts[1..]) {
        assert_eq!(
            body,
            &json!({"chat_id": -100777, "text": part, "parse_mode": "HTML"}),
            "later parts do not quote"
        );
    }
    assert!(egress.dead().is_empty(), "Telegram took every part");
    egress.stop().await;
}
