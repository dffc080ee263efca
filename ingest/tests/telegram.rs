//! `/hooks/telegram` and getUpdates polling against a real redis-server over
//! real HTTP: Telegram's documented update shapes (tests/fixtures/telegram),
//! the secret token header, everything that must be refused, and a local
//! stand-in of `getUpdates` with one poller across two ingest replicas,
//! which backs off while getUpdates fails and shows in `/readyz`.

mod common;

use axum::extract::{Path, State};
use axum::routing;
use axum::{Json, Router};
use botline_ingest::Ingest;
use botline_shared::message::{AttachmentKind, ChatKind, UnifiedMessage};
use botline_shared::testing::RedisServer;
use common::*;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "s3cr3t-Token_for-the-webhook";
const TOKEN: &str = "999:AAE-test-token_0123456789";
const BOT_SETTINGS: &str = "enabled = true\nbot_id = \"999\"\nbot_username = \"support_bot\"\n";
const WAIT: Duration = Duration::from_secs(20);

fn fixture(name: &str) -> String {
    common::fixture("telegram", name)
}

async fn start_webhook() -> Harness {
    start_configured(
        &format!("[ingest.platforms.telegram]\n{BOT_SETTINGS}"),
        &[("BOTLINE_TELEGRAM_WEBHOOK_SECRET", SECRET)],
    )
    .await
}

/// POST `body` to `/hooks/telegram` with this secret token header (if any):
/// the status and the body.
async fn post(base: &str, token: Option<&str>, body: impl Into<String>) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .post(format!("{base}/hooks/telegram"))
        .header("content-type", "application/json")
        .body(body.into());
    if let Some(token) = token {
        request = request.header("X-Telegram-Bot-Api-Secret-Token", token);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn documented_updates_become_unified_messages() {
    let harness = start_webhook().await;
    for name in [
        "private_text.json",
        "group_mention.json",
        "topic_reply_photo.json",
    ] {
        assert_eq!(
            post(&harness.url(""), Some(SECRET), fixture(name)).await,
            (200, String::new()),
            "{name}"
        );
    }
    let inbound = harness.inbound();
    assert_eq!(inbound.len(), 3);

    let direct = &inbound[0];
    assert_eq!(direct.platform, "telegram");
    assert_eq!(direct.bot, "999");
    assert_eq!(direct.chat.id, "1111111");
    assert_eq!(direct.chat.kind, ChatKind::Direct);
    assert_eq!(direct.sender.id, "1111111");
    assert_eq!(direct.sender.name, "Test Firstname Test Lastname");
    assert!(!direct.sender.is_bot);
    assert_eq!(direct.text, "/start");
    assert_eq!(direct.platform_message_id.as_deref(), Some("1365"));
    assert_eq!(direct.platform_ts_ms, Some(1_441_645_532_000));
    assert!(direct
        .raw
        .as_deref()
        .unwrap()
        .contains("\"update_id\": 10000"));

    let group = &inbound[1];
    assert_eq!(group.chat.id, "-1001234567890");
    assert_eq!(group.chat.kind, ChatKind::Group);
    assert_eq!(group.text, "@999 🚚 where is order #A-1? cc @2222222");
    assert_eq!(group.mentions.users, ["999", "2222222"]);
    assert!(group.mentions.bot);
    assert_eq!(group.platform_data["name:2222222"], "Zoë");
    assert_eq!(
        group.platform_data["name:1111111"],
        "Test Firstname Test Lastname"
    );
    assert_eq!(group.thread, None);

    let topic = &inbound[2];
    assert_eq!(topic.thread.as_deref(), Some("2290"));
    assert_eq!(topic.reply_to.as_deref(), Some("2300"));
    assert!(topic.mentions.bot, "a reply to the bot addresses it");
    assert_eq!(topic.text, "here it is");
    assert_eq!(topic.attachments.len(), 1);
    let photo = &topic.attachments[0];
    assert_eq!(photo.kind, AttachmentKind::Image);
    assert_eq!(photo.file_id.as_deref(), Some("AgACAgIAAxkBAAIBsmL-large"));
    assert_eq!(photo.url, None);
    assert_eq!(photo.size, Some(68232));
}

#[tokio::test]
async fn a_retried_update_is_added_once() {
    let harness = start_webhook().await;
    for _ in 0..3 {
        assert_eq!(
            post(&harness.url(""), Some(SECRET), fixture("private_text.json"))
                .await
                .0,
            200
        );
    }
    assert_eq!(harness.inbound().len(), 1);
}

#[tokio::test]
async fn updates_that_are_not_messages_are_acknowledged_and_not_added() {
    let harness = start_webhook().await;
    for body in [
        fixture("edited_message.json"),
        fixture("callback_query.json"),
        r#"{"update_id":10005,"something_telegram_adds_later":{"x":1}}"#.to_string(),
    ] {
        assert_eq!(
            post(&harness.url(""), Some(SECRET), body).await,
            (200, String::new())
        );
    }
    assert!(harness.inbound().is_empty());
}

#[tokio::test]
async fn bad_requests_are_refused_with_their_reason_and_add_nothing() {
    let harness = start_webhook().await;
    let update = fixture("private_text.json");
    let cases: Vec<(Option<&str>, String, u16, &str)> = vec![
        (
            None,
            update.clone(),
            401,
            "no x-telegram-bot-api-secret-token header",
        ),
        (
            Some("s3cr3t-Token_for-the-webhooK"),
            update.clone(),
            401,
            "does not match",
        ),
        (Some(""), update.clone(), 401, "does not match"),
        (
            Some(SECRET),
            update[..update.len() / 2].to_string(),
            400,
            "EOF while parsing",
        ),
        (Some(SECRET), "[1,2]".into(), 400, "invalid type"),
        (
            Some(SECRET),
            r#"{"update_id":"ten"}"#.into(),
            400,
            "update_id: invalid type",
        ),
        (
            Some(SECRET),
            format!("{{\"update_id\":1,\"pad\":\"{}\"}}", "x".repeat(2 << 20)),
            413,
            "larger than",
        ),
    ];
    for (token, body, status, error) in cases {
        let (got_status, got_body) = post(&harness.url(""), token, body).await;
        assert_eq!(got_status, status, "{token:?}: {got_body}");
        assert!(got_body.contains(error), "{token:?}: {got_body}");
        assert!(!got_body.contains(SECRET), "{got_body}");
    }
    assert!(harness.inbound().is_empty());
    // Still serving.
    assert_eq!(post(&harness.url(""), Some(SECRET), update).await.0, 200);
    assert_eq!(harness.inbound().len(), 1);
}

#[test]
fn an_enabled_webhook_needs_its_secret_and_the_bot_identity() {
    let redis = RedisServer::start();
    let start = |settings: &str, env: &[(&str, &str)]| {
        configured_ingest(
            &redis.url(),
            Some(&format!("[ingest.platforms.telegram]\n{settings}")),
            env,
            None,
        )
        .err()
        .map(|error| error.to_string())
    };
    assert_eq!(
        start(BOT_SETTINGS, &[]).as_deref(),
        Some("setting BOTLINE_TELEGRAM_WEBHOOK_SECRET: is not set")
    );
    assert!(start(
        BOT_SETTINGS,
        &[("BOTLINE_TELEGRAM_WEBHOOK_SECRET", "has space")]
    )
    .unwrap()
    .starts_with("setting BOTLINE_TELEGRAM_WEBHOOK_SECRET: must be 1-256 characters"));
    assert!(start(
        "enabled = true\nbot_username = \"b\"\n",
        &[("BOTLINE_TELEGRAM_WEBHOOK_SECRET", SECRET)]
    )
    .unwrap()
    .starts_with("setting ingest.platforms.telegram.bot_id:"));
    assert_eq!(
        start(
            &format!("{BOT_SETTINGS}mode = \"polling\"\n"),
            &[("BOTLINE_TELEGRAM_WEBHOOK_SECRET", SECRET)]
        )
        .as_deref(),
        Some("setting BOTLINE_TELEGRAM_BOT_TOKEN: is not set")
    );
    assert!(start(
        &format!("{BOT_SETTINGS}colour = 1\n"),
        &[("BOTLINE_TELEGRAM_WEBHOOK_SECRET", SECRET)]
    )
    .unwrap()
    .contains("unknown field `colour`"));
    assert_eq!(
        start(BOT_SETTINGS, &[("BOTLINE_TELEGRAM_WEBHOOK_SECRET", SECRET)]),
        None
    );
}

// ---- getUpdates polling, against a stand-in of the Bot API ----

/// Updates waiting at the stand-in, and what it saw.
#[derive(Clone, Default)]
struct BotApi {
    updates: Arc<Mutex<Vec<Value>>>,
    added: Arc<Notify>,
    /// The `offset` of each getUpdates, in order.
    offsets: Arc<Mutex<Vec<Option<i64>>>>,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
    /// The first this many requests are answered 429 with retry_after 1.
    flood: Arc<AtomicUsize>,
    /// While set, every request is answered 502 (Telegram's side is down).
    broken: Arc<AtomicBool>,
    /// When each getUpdates came.
    times: Arc<Mutex<Vec<Instant>>>,
}

impl BotApi {
    async fn start() -> (BotApi, String) {
        let api = BotApi::default();
        let app = Router::new()
            .route("/{bot}/getUpdates", routing::post(get_updates))
            .with_state(api.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (api, url)
    }

    fn add(&self, update_id: i64, text: &str) {
        self.updates.lock().unwrap().push(json!({
            "update_id": update_id,
            "message": {
                "message_id": update_id,
                "from": {"id": 1111111, "is_bot": false, "first_name": "Ann"},
                "chat": {"id": 1111111, "type": "private"},
                "date": 1441645532,
                "text": text,
            }
        }));
        self.added.notify_waiters();
    }
}

/// Counts a request in flight until dropped (also when the client goes
/// away mid-request and the handler is dropped with it).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(api: &BotApi) -> Self {
        let now = api.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        api.most_in_flight.fetch_max(now, Ordering::SeqCst);
        InFlight(api.in_flight.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `getUpdates` as Telegram answers it: updates from `offset` on (earlier
/// ones are confirmed and forgotten), waiting a little for some when none
/// are there (a long poll, kept short).
async fn get_updates(
    State(api): State<BotApi>,
    Path(bot): Path<String>,
    Json(request): Json<Value>,
) -> Json<Value> {
    assert_eq!(bot, format!("bot{TOKEN}"));
    assert_eq!(request["allowed_updates"], json!(["message"]));
    assert_eq!(request["timeout"], json!(1));
    let _in_flight = InFlight::enter(&api);
    api.times.lock().unwrap().push(Instant::now());
    if api.broken.load(Ordering::SeqCst) {
        return Json(json!({"ok": false, "error_code": 502, "description": "Bad Gateway"}));
    }
    let offset = request["offset"].as_i64();
    api.offsets.lock().unwrap().push(offset);
    let answer = if api
        .flood
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry after 1",
               "parameters": {"retry_after": 1}})
    } else {
        let pending = || {
            let mut updates = api.updates.lock().unwrap();
            if let Some(offset) = offset {
                updates.retain(|update| update["update_id"].as_i64().unwrap() >= offset);
            }
            updates.clone()
        };
        let mut result = pending();
        if result.is_empty() {
            let added = api.added.notified();
            let _ = tokio::time::timeout(Duration::from_millis(200), added).await;
            result = pending();
        }
        json!({"ok": true, "result": result})
    };
    Json(answer)
}

/// An ingest replica: its address, and what `/readyz` reads.
struct Replica {
    url: String,
    health: botline_shared::telemetry::Health,
    pool: botline_shared::redis_conn::Pool,
}

/// An ingest replica polling `api_url`, on `redis`, until `shutdown`.
async fn start_poller(redis: &RedisServer, api_url: &str, shutdown: &CancellationToken) -> Replica {
    start_poller_every(redis, api_url, shutdown, 50).await
}

/// [`start_poller`], retrying a failed poll after a backoff from `retry_ms`.
async fn start_poller_every(
    redis: &RedisServer,
    api_url: &str,
    shutdown: &CancellationToken,
    retry_ms: u64,
) -> Replica {
    let overlay = format!(
        "[ingest.platforms.telegram]\n{BOT_SETTINGS}mode = \"polling\"\napi_base_url = \"{api_url}\"\n\
         poll_timeout_secs = 1\npoll_retry_ms = {retry_ms}\n"
    );
    let ingest: Ingest = configured_ingest(
        &redis.url(),
        Some(&overlay),
        &[("BOTLINE_TELEGRAM_BOT_TOKEN", TOKEN)],
        None,
    )
    .unwrap();
    let (health, pool) = (ingest.health.clone(), ingest.pool.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(botline_ingest::run(listener, ingest, shutdown.clone()));
    Replica { url, health, pool }
}

fn texts(messages: &[UnifiedMessage]) -> Vec<String> {
    messages
        .iter()
        .map(|message| message.text.clone())
        .collect()
}

async fn wait_for_texts(redis: &RedisServer, expected: &[&str]) {
    wait_for(WAIT, &format!("{expected:?} in `in`"), || {
        let got = texts(&read_inbound(redis));
        async move { got.len() >= expected.len() }
    })
    .await;
    assert_eq!(texts(&read_inbound(redis)), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polling_admits_updates_once_and_confirms_them_after() {
    let (api, api_url) = BotApi::start().await;
    api.flood.store(1, Ordering::SeqCst);
    api.add(500, "first");
    api.add(501, "second");
    let redis = RedisServer::start();
    let shutdown = CancellationToken::new();
    let replica = start_poller(&redis, &api_url, &shutdown).await;
    wait_for_texts(&redis, &["first", "second"]).await;
    api.add(502, "third");
    wait_for_texts(&redis, &["first", "second", "third"]).await;

    let offsets = api.offsets.lock().unwrap().clone();
    assert_eq!(
        offsets[0], None,
        "the first poll starts at Telegram's first unconfirmed update"
    );
    assert!(offsets.contains(&Some(502)), "{offsets:?}");
    assert!(offsets.contains(&Some(503)), "{offsets:?}");
    let message = &read_inbound(&redis)[0];
    assert_eq!(message.chat.kind, ChatKind::Direct);
    assert_eq!(message.platform_message_id.as_deref(), Some("500"));

    // The webhook is off in polling mode.
    let (status, body) = post(&replica.url, Some(SECRET), fixture("private_text.json")).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("polling mode"), "{body}");
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_polls_at_a_time_and_another_takes_over() {
    let (api, api_url) = BotApi::start().await;
    let redis = RedisServer::start();
    let first_shutdown = CancellationToken::new();
    let _first = start_poller(&redis, &api_url, &first_shutdown).await;
    wait_for(WAIT, "the first replica polling", || {
        let polled = !api.offsets.lock().unwrap().is_empty();
        async move { polled }
    })
    .await;
    let second_shutdown = CancellationToken::new();
    let _second = start_poller(&redis, &api_url, &second_shutdown).await;
    for id in 0..5 {
        api.add(700 + id, &format!("m{id}"));
    }
    wait_for_texts(&redis, &["m0", "m1", "m2", "m3", "m4"]).await;

    // The first replica stops and gives the lease up: the second polls.
    first_shutdown.cancel();
    api.add(705, "after");
    wait_for_texts(&redis, &["m0", "m1", "m2", "m3", "m4", "after"]).await;
    assert_eq!(
        api.most_in_flight.load(Ordering::SeqCst),
        1,
        "never two getUpdates at once"
    );
    second_shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_poller_backs_off_and_shows_in_readyz() {
    let (api, api_url) = BotApi::start().await;
    api.broken.store(true, Ordering::SeqCst);
    let redis = RedisServer::start();
    let shutdown = CancellationToken::new();
    let replica = start_poller_every(&redis, &api_url, &shutdown, 200).await;
    let router = botline_shared::telemetry::health_router(
        replica.health.clone(),
        replica.pool.clone(),
        prometheus(),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let readyz = format!("http://{}/readyz", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    let ready_is = |expected: (u16, Option<bool>)| {
        let readyz = readyz.clone();
        async move {
            wait_for(WAIT, &format!("/readyz {expected:?}"), || {
                let readyz = readyz.clone();
                async move {
                    let Ok(response) = reqwest::get(&readyz).await else {
                        return false;
                    };
                    let status = response.status().as_u16();
                    let body: Value = response.json().await.unwrap_or_default();
                    (status, body["checks"]["telegram:999"].as_bool()) == expected
                }
            })
            .await;
        }
    };

    // Telegram fails every getUpdates: the poller is down, and its tries
    // thin out: the n-th wait is at least half of 200 ms × 2ⁿ.
    ready_is((503, Some(false))).await;
    wait_for(WAIT, "5 getUpdates", || {
        let tried = api.times.lock().unwrap().len();
        async move { tried >= 5 }
    })
    .await;
    let times = api.times.lock().unwrap().clone();
    let least = Duration::from_millis(100 + 200 + 400 + 800);
    assert!(
        times[4] - times[0] >= least,
        "5 getUpdates within {:?}: a backoff spaces them at least {least:?}",
        times[4] - times[0]
    );

    // Telegram is back: ready, and updates come in.
    api.broken.store(false, Ordering::SeqCst);
    api.add(900, "back");
    wait_for_texts(&redis, &["back"]).await;
    ready_is((200, Some(true))).await;
    shutdown.cancel();
}
