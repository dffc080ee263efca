//! The Discord sender against a local stand-in of the REST API that checks
//! each request as Discord would (`POST /channels/<id>/messages`,
//! `Authorization: Bot <token>`, a JSON body with `content`, a `nonce` of
//! at most 25 characters with `enforce_nonce`, `allowed_mentions` that
//! parse nothing), and can answer 429 with `retry_after`, 5xx or a refusal
//! with Discord's error code.

mod senders;

use botline_shared::message::{ChatKind, Reply};
use senders::*;
use serde_json::{json, Value};
use std::time::Duration;

/// A refusal the stand-in answers: status, headers, JSON body.
type Refusal = (u16, Vec<(&'static str, String)>, Value);

const TOKEN: &str = "MTIzNDU2Nzg5.GhIjKl.discord-test-token_0123456789";

/// What the REST API answers a request, checking it first; `refusal`, if
/// any (status, body), is what it answers a good request instead of success.
fn rest_api(nth: usize, received: &Received, refusal: Option<Refusal>) -> Answer {
    let error = |status: u16, code: u32, message: &str| {
        (
            status,
            Vec::new(),
            json!({"code": code, "message": message}).to_string(),
        )
    };
    if received.header("authorization") != Some(&format!("Bot {TOKEN}")) {
        return error(401, 0, "401: Unauthorized");
    }
    let Some(channel) = received
        .uri
        .strip_prefix("/api/v10/channels/")
        .and_then(|rest| rest.strip_suffix("/messages"))
    else {
        return error(404, 0, "404: Not Found");
    };
    if received.method != "POST" || received.header("content-type") != Some("application/json") {
        return error(400, 50035, "Invalid Form Body");
    }
    let Ok(body) = serde_json::from_slice::<Value>(&received.body) else {
        return error(400, 50109, "The request body contains invalid JSON.");
    };
    let nonce_ok = body["nonce"]
        .as_str()
        .is_some_and(|nonce| !nonce.is_empty() && nonce.chars().count() <= 25);
    let content_ok = body["content"]
        .as_str()
        .is_some_and(|content| content.chars().count() <= 2000);
    if !nonce_ok
        || !content_ok
        || body["enforce_nonce"] != true
        || body["allowed_mentions"]["parse"] != json!([])
    {
        return error(400, 50035, "Invalid Form Body");
    }
    if let Some((status, headers, body)) = refusal {
        return (status, headers, body.to_string());
    }
    let created = json!({"id": (1200 + nth).to_string(), "channel_id": channel, "content": body["content"],
        "nonce": body["nonce"], "type": 0});
    (200, Vec::new(), created.to_string())
}

fn start(api: &StandIn, extra: &str) -> Egress {
    Egress::start(
        &format!(
            "[egress.platforms.discord]\nenabled = true\napi_base_url = \"{}/api/v10\"\n{extra}",
            api.url
        ),
        &[("BOTLINE_DISCORD_BOT_TOKEN", TOKEN)],
    )
}

fn discord_reply(id: &str, channel: &str, text: &str) -> Reply {
    reply(id, "discord", senders::chat(channel, ChatKind::Group), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_is_sent_once_quoting_and_mentioning_without_pinging_anyone_else() {
    let api = StandIn::start(|nth, received| rest_api(nth, received, None)).await;
    let egress = start(&api, "");
    let mut sent = discord_reply("r-1", "500", "@42 your order is on its way @everyone");
    sent.reply_to = Some("1100".into());
    sent.mentions = vec!["42".into()];
    egress.send(&sent);
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;

    let received = api.received();
    assert_eq!(received.len(), 1, "sent once");
    assert_eq!(received[0].uri, "/api/v10/channels/500/messages");
    let body = received[0].json();
    assert_eq!(body["content"], "<@42> your order is on its way @everyone");
    assert_eq!(
        body["allowed_mentions"],
        json!({"parse": [], "users": ["42"], "replied_user": false})
    );
    assert_eq!(
        body["message_reference"],
        json!({"message_id": "1100", "fail_if_not_exists": false})
    );
    assert_eq!(body["enforce_nonce"], true);
    assert_eq!(body["nonce"].as_str().unwrap().len(), 25);
    assert_eq!(
        egress.receipts()[0].platform_message_id.as_deref(),
        Some("1200")
    );
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_waits_its_retry_after_and_a_5xx_is_retried_with_the_same_nonce() {
    let api = StandIn::start(|nth, received| {
        let refusal = match nth {
            0 => Some((
                429,
                vec![("retry-after", "1".to_string()), ("x-ratelimit-scope", "user".to_string())],
                json!({"message": "You are being rate limited.", "retry_after": 1.2, "global": false}),
            )),
            1 => Some((502, Vec::new(), json!({"code": 0, "message": "502: Bad Gateway"}))),
            _ => None,
        };
        rest_api(nth, received, refusal)
    })
    .await;
    let egress = start(&api, "");
    egress.send(&discord_reply("r-1", "500", "hi"));
    eventually("a receipt", || async { egress.receipts().len() == 1 }).await;
    let receipts = egress.receipts();
    assert_eq!(receipts[0].attempts, 3);
    let received = api.received();
    assert_eq!(received.len(), 3);
    assert!(
        received[1].at - received[0].at >= Duration::from_millis(1200),
        "retry_after (1.2 s, from the body) was waited"
    );
    let nonces: Vec<Value> = received
        .iter()
        .map(|request| request.json()["nonce"].clone())
        .collect();
    assert!(nonces.iter().all(|nonce| *nonce == nonces[0]), "{nonces:?}");
    assert!(egress.dead().is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_goes_to_dead_naming_discords_error_code() {
    let api = StandIn::start(|nth, received| {
        rest_api(
            nth,
            received,
            Some((
                403,
                Vec::new(),
                json!({"code": 50013, "message": "Missing Permissions"}),
            )),
        )
    })
    .await;
    let egress = start(&api, "");
    egress.send(&discord_reply("r-1", "500", "hi"));
    egress.send(&discord_reply("r-2", "general", "not a channel id"));
    eventually("two dead letters", || async { egress.dead().len() == 2 }).await;
    let mut errors: Vec<String> = egress.dead().into_iter().map(|dead| dead.error).collect();
    errors.sort();
    assert_eq!(
        errors,
        [
            "\"general\" is not a Discord channel id",
            "discord error 50013: Missing Permissions (HTTP 403)",
        ]
    );
    assert_eq!(
        api.count(),
        1,
        "not retried, and nothing sent for a bad channel"
    );
    assert!(errors.iter().all(|error| !error.contains(TOKEN)));
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_channel_gets_no_more_than_its_pace() {
    let api = StandIn::start(|nth, received| rest_api(nth, received, None)).await;
    let egress = start(&api, "channel_count = 2\nchannel_period_ms = 1000\n");
    for n in 0..4 {
        egress.send(&discord_reply(
            &format!("r-{n}"),
            "500",
            &format!("answer {n}"),
        ));
    }
    eventually("four receipts", || async { egress.receipts().len() == 4 }).await;
    let received = api.received();
    let mut times: Vec<_> = received.iter().map(|request| request.at).collect();
    times.sort();
    assert_eq!(times.len(), 4);
    // 2 per second with a burst of 2: the fourth at least a second after the first.
    assert!(
        times[3] - times[0] >= Duration::from_millis(1000),
        "{:?}",
        times[3] - times[0]
    );
    egress.stop().await;
}

#[tokio::test]
async fn a_bad_setting_stops_egress_naming_it() {
    let error = |overlay: &str, env: &[(&str, &str)]| {
        Egress::try_start(
            &format!("[egress.platforms.discord]\nenabled = true\n{overlay}"),
            env,
        )
        .err()
        .map(|error| error.to_string())
    };
    assert_eq!(
        error("", &[]).as_deref(),
        Some("setting BOTLINE_DISCORD_BOT_TOKEN: is not set")
    );
    assert!(error(
        "channel_count = 0\n",
        &[("BOTLINE_DISCORD_BOT_TOKEN", TOKEN)]
    )
    .unwrap()
    .starts_with("setting egress.platforms.discord.channel_count:"));
    assert!(error("", &[("BOTLINE_DISCORD_BOT_TOKEN", "Bot abc")])
        .unwrap()
        .starts_with("setting BOTLINE_DISCORD_BOT_TOKEN:"));
}
