//! The Telegram sender against a local stand-in of the Bot API that checks
//! each request as Telegram would (method, `/bot<token>/sendMessage`, JSON
//! body with `chat_id` and `text`), and can answer 429 with
//! `parameters.retry_after`, 5xx, or a refusal.

mod senders;

use botline_shared::message::{ChatKind, Reply};
use senders::*;
use serde_json::{json, Value};
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
    if method != "sendMessage" {
        return error(404, "Not Found: method not found");
    }
    if received.method != "POST" || received.header("content-type") != Some("application/json") {
        return error(400, "Bad Request: expected a JSON POST");
    }
    let Ok(body) = serde_json::from_slice::<Value>(&received.body) else {
        return error(400, "Bad Request: can't parse JSON");
    };
    let chat_ok = body["chat_id"].is_i64() || body["chat_id"].is_string();
    if !chat_ok || !body["text"].is_string() {
        return error(400, "Bad Request: chat_id and text are required");
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
