//! The Discord sender against a local stand-in of the REST API that checks
//! each request as Discord would (`POST /channels/<id>/messages`,
//! `Authorization: Bot <token>`, a JSON body with `content`, a `nonce` of
//! at most 25 characters with `enforce_nonce`, `allowed_mentions` that
//! parse nothing), and can answer 429 with `retry_after`, 5xx or a refusal
//! with Discord's error code. Its rate-limit headers (`X-RateLimit-*`) are
//! heeded across replicas: an exhausted bucket is waited out, a global 429
//! holds every channel back, a shared one only its own.

mod senders;

use botline_shared::message::{Attachment, ChatKind, Reply};
use senders::*;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    // Embeds: at most 10, each image an object with a URL.
    let embeds_ok = match body.get("embeds") {
        None => true,
        Some(embeds) => embeds.as_array().is_some_and(|embeds| {
            embeds.len() <= 10
                && embeds.iter().all(|embed| {
                    embed["image"]["url"]
                        .as_str()
                        .is_some_and(|url| !url.is_empty())
                })
        }),
    };
    let has_something =
        body["content"].as_str().is_some_and(|c| !c.is_empty()) || body.get("embeds").is_some();
    if !nonce_ok
        || !content_ok
        || !embeds_ok
        || !has_something
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
        &settings(api, extra),
        &[("BOTLINE_DISCORD_BOT_TOKEN", TOKEN)],
    )
}

/// The Discord sender's table, pointed at `api`, with `extra` settings.
fn settings(api: &StandIn, extra: &str) -> String {
    format!(
        "[egress.platforms.discord]\nenabled = true\napi_base_url = \"{}/api/v10\"\n{extra}",
        api.url
    )
}

/// Another egress replica beside `egress`, sending to `api` too.
fn replica(egress: &Egress, api: &StandIn, extra: &str) -> Replica {
    egress.replica(
        &settings(api, extra),
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
    // 2 per second with a burst of 2: the fourth a second after the first
    // (as Redis's clock paces them; this stand-in's clock may differ by a
    // few milliseconds).
    assert!(
        times[3] - times[0] >= Duration::from_millis(995),
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pictures_are_image_embeds_beside_the_content() {
    let api = StandIn::start(|nth, received| rest_api(nth, received, None)).await;
    let egress = start(&api, "");
    let mut sent = discord_reply("r-1", "1100000000000000001", "Our shop:");
    sent.attachments = vec![
        Attachment::image("https://cdn.example.com/shop.jpg", Some("the shop".into())),
        Attachment::image("https://cdn.example.com/map.png", None),
    ];
    egress.send(&sent);
    let mut only_picture = discord_reply("r-2", "1100000000000000002", "");
    only_picture.attachments = vec![Attachment::image("https://cdn.example.com/a.gif", None)];
    egress.send(&only_picture);
    eventually("two receipts", || async { egress.receipts().len() == 2 }).await;

    let mut received = api.received();
    received.sort_by_key(|request| request.uri.clone());
    assert_eq!(
        received[0].uri,
        "/api/v10/channels/1100000000000000001/messages"
    );
    let body = received[0].json();
    assert_eq!(body["content"], "Our shop:");
    assert_eq!(
        body["embeds"],
        json!([
            {"image": {"url": "https://cdn.example.com/shop.jpg"}},
            {"image": {"url": "https://cdn.example.com/map.png"}},
        ])
    );
    assert_eq!(received[1].json()["content"], "");
    assert_eq!(
        received[1].json()["embeds"],
        json!([{"image": {"url": "https://cdn.example.com/a.gif"}}])
    );
    assert!(egress.dead().is_empty(), "Discord took both");
    egress.stop().await;
}

/// Static limits far above what these tests send, so that only the pauses
/// Discord's headers ask for hold anything back.
const ROOMY: &str = "bot_per_second = 50\nchannel_count = 50\nchannel_period_ms = 1000\n";

/// The channel a request is for.
fn channel_of(received: &Received) -> String {
    received
        .uri
        .trim_start_matches("/api/v10/channels/")
        .trim_end_matches("/messages")
        .to_string()
}

/// The rate-limit headers of a bucket with `remaining` requests left,
/// reset after `reset_after` seconds.
fn bucket_headers(remaining: u32, reset_after: f64) -> Vec<(&'static str, String)> {
    vec![
        ("x-ratelimit-limit", "1".into()),
        ("x-ratelimit-remaining", remaining.to_string()),
        ("x-ratelimit-reset-after", reset_after.to_string()),
        (
            "x-ratelimit-bucket",
            "80c17d2f203122d936070c88c8d10f33".into(),
        ),
    ]
}

/// Discord's 429 of `scope` (`user`, `global`, `shared`), to retry after
/// `retry_after` seconds, with the bucket's `headers` (none for a global one).
fn too_many(
    scope: &'static str,
    retry_after: f64,
    mut headers: Vec<(&'static str, String)>,
) -> Refusal {
    let global = scope == "global";
    headers.push(("retry-after", (retry_after.ceil() as u64).to_string()));
    headers.push(("x-ratelimit-scope", scope.to_string()));
    if global {
        headers.push(("x-ratelimit-global", "true".to_string()));
    }
    let message = if scope == "shared" {
        "The resource is being rate limited."
    } else {
        "You are being rate limited."
    };
    let body = json!({"message": message, "retry_after": retry_after, "global": global});
    (429, headers, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_bucket_is_waited_out_by_every_replica_and_other_channels_go_on() {
    // Channel 500's bucket holds one message per 1.5 s: each answer there
    // says `Remaining: 0, Reset-After: 1.5`, and a request before the reset
    // gets Discord's 429 (noted as early). Other channels have room.
    let resets: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let early: Arc<Mutex<Vec<String>>> = Arc::default();
    let api = {
        let (resets, early) = (resets.clone(), early.clone());
        StandIn::start(move |nth, received| {
            let channel = channel_of(received);
            if channel != "500" {
                let (status, mut headers, body) = rest_api(nth, received, None);
                headers.extend(bucket_headers(4, 1.5));
                return (status, headers, body);
            }
            let now = Instant::now();
            let mut resets = resets.lock().unwrap();
            if let Some(left) = resets
                .get(&channel)
                .map(|reset| reset.saturating_duration_since(now))
            {
                if !left.is_zero() {
                    early
                        .lock()
                        .unwrap()
                        .push(format!("{channel} {left:?} early"));
                    let headers = bucket_headers(0, left.as_secs_f64());
                    let refusal = too_many("user", left.as_secs_f64(), headers);
                    return rest_api(nth, received, Some(refusal));
                }
            }
            let (status, mut headers, body) = rest_api(nth, received, None);
            if status == 200 {
                resets.insert(channel, now + Duration::from_millis(1500));
                headers.extend(bucket_headers(0, 1.5));
            }
            (status, headers, body)
        })
        .await
    };
    // This one holds Redis and reads only `out:web`: the two replicas
    // below share it and do the sending.
    let egress = Egress::start("", &[]);
    let first = replica(&egress, &api, ROOMY);
    egress.send(&discord_reply("r-1", "500", "one"));
    egress.delivered(1).await;
    first.stop().await;

    // The other replica sends the rest (all read in one batch, each chat
    // on its own): channel 500's next message waits for the bucket the
    // first replica learned was empty, the other channels do not.
    egress.send(&discord_reply("r-2", "500", "two"));
    egress.send(&discord_reply("r-3", "500", "three"));
    for (n, channel) in ["600", "700", "800"].iter().enumerate() {
        egress.send(&discord_reply(&format!("q-{n}"), channel, "elsewhere"));
    }
    let second = replica(&egress, &api, ROOMY);
    let receipts = egress.delivered(6).await;
    second.stop().await;

    assert_eq!(
        *early.lock().unwrap(),
        Vec::<String>::new(),
        "no request before its bucket's reset"
    );
    let received = api.received();
    assert_eq!(
        received.len(),
        6,
        "one request per reply: nothing retried, nothing lost"
    );
    let mut ids: Vec<&str> = receipts
        .iter()
        .map(|receipt| receipt.reply_id.as_str())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        ["q-0", "q-1", "q-2", "r-1", "r-2", "r-3"],
        "each delivered once"
    );
    let mut nonces: Vec<Value> = received
        .iter()
        .map(|request| request.json()["nonce"].clone())
        .collect();
    nonces.sort_by_key(|nonce| nonce.to_string());
    nonces.dedup();
    assert_eq!(nonces.len(), 6, "six messages");
    let mut paced: Vec<Instant> = received
        .iter()
        .filter(|request| channel_of(request) == "500")
        .map(|request| request.at)
        .collect();
    paced.sort();
    for pair in paced.windows(2) {
        assert!(
            pair[1] - pair[0] >= Duration::from_millis(1500),
            "channel 500 waited for its reset: {:?}",
            pair[1] - pair[0]
        );
    }
    let elsewhere = received
        .iter()
        .filter(|request| channel_of(request) != "500");
    for request in elsewhere {
        assert!(
            request.at < paced[1],
            "channel {} did not wait for channel 500's bucket",
            channel_of(request)
        );
    }
    assert!(egress.dead().is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_global_429_holds_every_channel_back_on_every_replica() {
    let api = StandIn::start(|nth, received| {
        let refusal = (nth == 0).then(|| too_many("global", 1.0, Vec::new()));
        rest_api(nth, received, refusal)
    })
    .await;
    // Two replicas: while one waits to retry the refused reply, the other
    // is free to read the next ones.
    let egress = start(&api, ROOMY);
    let other = replica(&egress, &api, ROOMY);
    egress.send(&discord_reply("r-1", "500", "one"));
    eventually("the global 429", || async { api.count() >= 1 }).await;
    egress.send(&discord_reply("r-2", "600", "two"));
    egress.send(&discord_reply("r-3", "700", "three"));
    let receipts = egress.delivered(3).await;
    other.stop().await;

    let mut received = api.received();
    received.sort_by_key(|request| request.at);
    assert_eq!(received.len(), 4, "the refused one again, the others once");
    let refused = received[0].at;
    for request in &received[1..] {
        assert!(
            request.at - refused >= Duration::from_millis(1000),
            "channel {} waited out the global limit: {:?}",
            channel_of(request),
            request.at - refused
        );
    }
    assert_eq!(
        received[0].json()["nonce"],
        received
            .iter()
            .filter(|request| channel_of(request) == "500")
            .last()
            .unwrap()
            .json()["nonce"]
    );
    assert_eq!(receipts.len(), 3);
    assert!(egress.dead().is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_429_holds_back_only_its_channel() {
    let api = StandIn::start(|nth, received| {
        let refusal = (nth == 0).then(|| too_many("shared", 1.0, bucket_headers(9, 1.0)));
        rest_api(nth, received, refusal)
    })
    .await;
    let egress = start(&api, ROOMY);
    let other = replica(&egress, &api, ROOMY);
    egress.send(&discord_reply("r-1", "500", "one"));
    eventually("the shared 429", || async { api.count() >= 1 }).await;
    egress.send(&discord_reply("r-2", "600", "two"));
    egress.delivered(2).await;
    other.stop().await;

    let mut received = api.received();
    received.sort_by_key(|request| request.at);
    let channels: Vec<String> = received.iter().map(channel_of).collect();
    assert_eq!(channels, ["500", "600", "500"], "600 went while 500 waited");
    assert!(received[1].at - received[0].at < Duration::from_millis(1000));
    assert!(received[2].at - received[0].at >= Duration::from_millis(1000));
    assert!(egress.dead().is_empty());
    egress.stop().await;
}
