//! OneBot v11 over WebSocket against a local implementation stand-in
//! (`botline_tests::onebot`, speaking the spec's forward and reverse
//! WebSocket) and a real redis-server: events are normalized as the HTTP
//! path normalizes them and deduplicated by the same key; `send_msg` frames
//! relayed as egress relays them are written once, answered by `echo`, and
//! what came of them is reported; expired and cancelled frames are never
//! written; a dropped or silent connection is opened again, losing and
//! doubling nothing, and one the implementation closes at once each time
//! is opened again after a growing backoff; reverse connections are
//! verified (401, counted).

mod common;

use botline_shared::message::{ChatKind, UnifiedMessage};
use botline_shared::relay::{self, Enqueue, Outcome};
use botline_shared::streams::Streams;
use botline_shared::testing::RedisServer;
use botline_tests::onebot::{private_message, Answering, OneBot, SELF_ID};
use common::connections::{expect_backed_off, with_storm_backoff};
use common::*;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const TOKEN: &str = "kSLuTF2GC2Q4q4ugm3";
const WAIT: Duration = Duration::from_secs(20);
const HEARTBEAT: Duration = Duration::from_millis(200);

fn settings(mode: &str, url: &str) -> String {
    format!(
        "[ingest.platforms.onebot]\nenabled = true\nmode = \"{mode}\"\nws_url = \"{url}\"\n\
         self_id = \"{SELF_ID}\"\nheartbeat_misses = 3\nlease_ttl_ms = 1500\nstandby_poll_ms = 100\n\
         connect_timeout_ms = 5000\nreconnect_base_ms = 20\nreconnect_cap_ms = 200\n"
    )
}

/// Ingest connecting forward to a fresh stand-in, on `redis`.
async fn forward(redis: RedisServer) -> (OneBot, Harness) {
    let implementation = OneBot::new(HEARTBEAT);
    let url = implementation.serve(TOKEN).await;
    let env = [("BOTLINE_ONEBOT_ACCESS_TOKEN", TOKEN)];
    let harness = start_on(redis, &settings("forward", &url), &env).await;
    (implementation, harness)
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    botline_shared::testing::wait_for(what, WAIT, &mut done).await;
}

fn texts(harness: &Harness) -> Vec<String> {
    harness
        .inbound()
        .into_iter()
        .map(|message: UnifiedMessage| message.text)
        .collect()
}

/// Wait until `in` holds `expected` (or more), then check it holds exactly that.
async fn expect_texts(harness: &Harness, expected: &[&str]) {
    wait_until(&format!("{expected:?} in `in`"), || {
        texts(harness).len() >= expected.len()
    })
    .await;
    assert_eq!(texts(harness), expected, "nothing lost, nothing doubled");
}

/// A `send_msg` frame for `reply_id` as egress enqueues it; its echo.
async fn enqueue(redis: &RedisServer, reply_id: &str, pickup: Duration) -> String {
    let echo = format!("{reply_id}.e");
    let frame = json!({"action": "send_msg", "echo": echo,
        "params": {"message_type": "private", "user_id": 12345678,
                   "message": [{"type": "text", "data": {"text": reply_id}}]}});
    let mut connection = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let frame = frame.to_string();
    let enqueue = Enqueue {
        platform: "onebot",
        bot: &SELF_ID.to_string(),
        reply_id,
        echo: &echo,
        frame: &frame,
        pickup,
        answer: Duration::from_secs(5),
    };
    relay::enqueue(&mut connection, &Streams::default(), &enqueue)
        .await
        .unwrap();
    echo
}

async fn outcome(redis: &RedisServer, echo: &str) -> Option<Outcome> {
    let mut connection = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    relay::peek(&mut connection, &Streams::default(), echo)
        .await
        .unwrap()
}

async fn expect_outcome(redis: &RedisServer, echo: &str) -> Outcome {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if let Some(outcome) = outcome(redis, echo).await {
            return outcome;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no outcome for {echo}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `send_msg` actions the implementation received, by echo.
fn echoes(implementation: &OneBot) -> Vec<String> {
    implementation
        .seen()
        .actions
        .iter()
        .map(|action| action["echo"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn answered(outcome: Outcome) -> Value {
    match outcome {
        Outcome::Answered { answer } => serde_json::from_str(&answer).unwrap(),
        other => panic!("not answered: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_events_and_replies_flow_and_a_dropped_connection_loses_and_doubles_nothing() {
    let (implementation, harness) = forward(RedisServer::start()).await;
    wait_until("a connection", || implementation.seen().connections == 1).await;
    // Not an event: counted as malformed, the connection goes on.
    implementation.send(json!(["not", "an", "event"]));
    for n in 1..=3 {
        implementation.send(private_message(n, 12345678, &format!("message {n}")));
    }
    expect_texts(&harness, &["message 1", "message 2", "message 3"]).await;
    let first = &harness.inbound()[0];
    assert_eq!(first.platform, "onebot");
    assert_eq!(first.bot, SELF_ID.to_string());
    assert_eq!(first.chat.id, "12345678");
    assert_eq!(first.chat.kind, ChatKind::Direct);
    assert_eq!(first.sender.name, "小不点");
    assert_eq!(first.platform_message_id.as_deref(), Some("1"));
    let dedup_key = harness
        .streams
        .dedup("onebot", "12345678", &format!("{SELF_ID}:1"));
    assert_eq!(
        harness.redis_cmd::<i64>(redis::cmd("EXISTS").arg(dedup_key)),
        1
    );

    // A reply relayed as egress relays it: written once, answered by echo.
    let echo = enqueue(&harness.redis, "r1", Duration::from_secs(5)).await;
    let answer = answered(expect_outcome(&harness.redis, &echo).await);
    assert_eq!(answer["retcode"], 0);
    assert_eq!(answer["echo"], echo.as_str());
    let action = &implementation.seen().actions[0];
    assert_eq!(action["action"], "send_msg");
    assert_eq!(action["params"]["user_id"], 12345678);

    // Mid-stream, the connection drops: ingest connects again; the
    // implementation sends the last event again on the new connection
    // (deduplicated) and goes on.
    assert_eq!(implementation.seen().connections, 1, "still the first");
    implementation.drop_connection();
    wait_until("a second connection", || {
        implementation.seen().connections == 2
    })
    .await;
    implementation.send(private_message(3, 12345678, "message 3"));
    implementation.send(private_message(4, 12345678, "message 4"));
    expect_texts(
        &harness,
        &["message 1", "message 2", "message 3", "message 4"],
    )
    .await;
    let echo = enqueue(&harness.redis, "r2", Duration::from_secs(5)).await;
    answered(expect_outcome(&harness.redis, &echo).await);
    assert_eq!(echoes(&implementation), ["r1.e", "r2.e"], "each frame once");
    let seen = implementation.seen();
    assert_eq!(seen.most_live, 1, "one connection at a time");
    assert_eq!(seen.refused, 0, "the token was right");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_whose_heartbeats_stop_is_opened_again() {
    let (implementation, harness) = forward(RedisServer::start()).await;
    wait_until("a connection", || implementation.seen().connections == 1).await;
    implementation.send(private_message(1, 42, "before"));
    expect_texts(&harness, &["before"]).await;
    // Half-open: nothing comes any more, nothing is closed.
    implementation.fall_silent();
    let silent_since = std::time::Instant::now();
    wait_until("a new connection", || {
        implementation.seen().connections == 2
    })
    .await;
    assert!(
        silent_since.elapsed() >= HEARTBEAT * 2,
        "not before the heartbeats were missed"
    );
    wait_until("the silent one closed by ingest", || {
        implementation.seen().live == 1
    })
    .await;
    implementation.send(private_message(2, 42, "after"));
    expect_texts(&harness, &["before", "after"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_implementation_that_closes_each_connection_at_once_meets_a_growing_backoff() {
    // Accepts each WebSocket, then closes it at once.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("ws://{}/", listener.local_addr().unwrap());
    let attempts: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let seen = attempts.clone();
    accept_each(listener, move |stream| {
        seen.lock().unwrap().push(Instant::now());
        async move {
            if let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await {
                let _ = socket.close(None).await;
            }
        }
    });
    let env = [("BOTLINE_ONEBOT_ACCESS_TOKEN", TOKEN)];
    let overlay = with_storm_backoff(&settings("forward", &url));
    let _harness = start_configured(&overlay, &env).await;
    expect_backed_off(6, || attempts.lock().unwrap().clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_past_their_deadline_or_given_up_are_never_written_and_unanswered_ones_are_reported()
{
    // Before ingest connects: one frame already past its pickup deadline,
    // one egress gave up on (cancelled).
    let redis = RedisServer::start();
    let expired = enqueue(&redis, "late", Duration::from_millis(1)).await;
    let cancelled = enqueue(&redis, "given-up", Duration::from_secs(30)).await;
    let mut connection = redis
        .client()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let given = relay::cancel(&mut connection, &Streams::default(), &cancelled)
        .await
        .unwrap();
    assert_eq!(given, relay::Given::NotSent);
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (implementation, harness) = forward(redis).await;

    let on_time = enqueue(&harness.redis, "on-time", Duration::from_secs(5)).await;
    answered(expect_outcome(&harness.redis, &on_time).await);
    assert_eq!(
        expect_outcome(&harness.redis, &expired).await,
        Outcome::Expired
    );
    assert_eq!(outcome(&harness.redis, &cancelled).await, None);
    assert_eq!(
        echoes(&implementation),
        ["on-time.e"],
        "only the frame on time"
    );

    // Sent, and the connection drops before the answer: reported
    // unanswered (egress will not send it again), never written twice.
    implementation.answer_with(Answering::Drop);
    let lost = enqueue(&harness.redis, "lost", Duration::from_secs(5)).await;
    let Outcome::Unanswered { reason } = expect_outcome(&harness.redis, &lost).await else {
        panic!("not reported unanswered");
    };
    assert!(reason.contains("connection ended"), "{reason}");
    implementation.answer_with(Answering::Retcode(100));
    wait_until("a second connection", || {
        implementation.seen().connections == 2
    })
    .await;
    let refused = enqueue(&harness.redis, "refused", Duration::from_secs(5)).await;
    let answer = answered(expect_outcome(&harness.redis, &refused).await);
    assert_eq!(answer["retcode"], 100);
    assert_eq!(
        echoes(&implementation),
        ["on-time.e", "lost.e", "refused.e"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_shutdown_the_answers_to_frames_already_written_are_still_read() {
    let (implementation, harness) = forward(RedisServer::start()).await;
    implementation.answer_with(Answering::After(Duration::from_millis(300)));
    let echo = enqueue(&harness.redis, "r1", Duration::from_secs(5)).await;
    wait_until("the frame written", || {
        !implementation.seen().actions.is_empty()
    })
    .await;
    harness.shutdown.cancel();
    let answer = answered(expect_outcome(&harness.redis, &echo).await);
    assert_eq!(answer["echo"], echo.as_str());
}

async fn reverse() -> Harness {
    let env = [("BOTLINE_ONEBOT_ACCESS_TOKEN", TOKEN)];
    start_configured(&settings("reverse", ""), &env).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_connections_are_verified_and_the_newest_carries_the_replies() {
    let prometheus = botline_shared::telemetry::install_metrics().unwrap();
    let harness = reverse().await;
    let url = format!("ws://{}/hooks/onebot/ws", harness.addr);
    let first = OneBot::new(HEARTBEAT);

    let mut headers = OneBot::reverse_headers("not-the-token");
    assert_eq!(first.connect(&url, &headers).await, Err(401));
    headers.retain(|(name, _)| *name != "authorization");
    assert_eq!(first.connect(&url, &headers).await, Err(401));
    headers.retain(|(name, _)| *name != "x-self-id");
    headers.push(("authorization", format!("Bearer {TOKEN}")));
    assert_eq!(first.connect(&url, &headers).await, Err(400));
    let metrics = prometheus.render();
    for reason in ["bad_token", "missing_token"] {
        let series =
            format!("botline_ingest_rejected_total{{platform=\"onebot\",reason=\"{reason}\"}} 1");
        assert!(metrics.contains(&series), "{series} in\n{metrics}");
    }
    assert!(harness.inbound().is_empty());

    first
        .connect(&url, &OneBot::reverse_headers(TOKEN))
        .await
        .unwrap();
    first.send(private_message(7, 12345678, "over reverse"));
    expect_texts(&harness, &["over reverse"]).await;
    let echo = enqueue(&harness.redis, "r1", Duration::from_secs(5)).await;
    answered(expect_outcome(&harness.redis, &echo).await);
    assert_eq!(echoes(&first), ["r1.e"]);

    // The implementation connects again (the first one may be half-open):
    // the newest connection carries the replies; the older one stays open
    // and its events still count (deduplicated).
    let second = OneBot::new(HEARTBEAT);
    second
        .connect(&url, &OneBot::reverse_headers(TOKEN))
        .await
        .unwrap();
    first.send(private_message(7, 12345678, "over reverse"));
    second.send(private_message(8, 12345678, "over the second"));
    expect_texts(&harness, &["over reverse", "over the second"]).await;
    let echo = enqueue(&harness.redis, "r2", Duration::from_secs(5)).await;
    answered(expect_outcome(&harness.redis, &echo).await);
    assert_eq!(echoes(&second), ["r2.e"]);

    // The newest goes away: the older one carries them again, once ingest
    // saw the newest close (it gives the lease up).
    let lease_key = harness
        .streams
        .consumer_lease("onebot-socket", &SELF_ID.to_string());
    let holder = |harness: &Harness| -> Option<String> {
        harness.redis_cmd(redis::cmd("GET").arg(&lease_key))
    };
    let newest = holder(&harness);
    second.drop_connection();
    wait_until("the older connection holding the lease", || {
        let now = holder(&harness);
        now.is_some() && now != newest
    })
    .await;
    let echo = enqueue(&harness.redis, "r3", Duration::from_secs(5)).await;
    answered(expect_outcome(&harness.redis, &echo).await);
    assert_eq!(echoes(&first), ["r1.e", "r3.e"]);
    assert_eq!(echoes(&second), ["r2.e"]);
}

#[tokio::test]
async fn each_mode_uses_its_own_door_and_settings_are_checked_at_start() {
    let harness = reverse().await;
    let answer = post_hook(&harness, "onebot", "{}", &[]).await;
    assert_refused(answer, 401, "WebSocket");

    let http = start_configured(
        "[ingest.platforms.onebot]\nenabled = true\n",
        &[("BOTLINE_ONEBOT_SECRET", "onebot-secret-0123")],
    )
    .await;
    let implementation = OneBot::new(HEARTBEAT);
    let url = format!("ws://{}/hooks/onebot/ws", http.addr);
    let refused = implementation
        .connect(&url, &OneBot::reverse_headers(TOKEN))
        .await;
    assert_eq!(refused, Err(404));

    let redis = RedisServer::start();
    let refused = |overlay: String, env: &[(&str, &str)]| {
        configured_ingest(&redis.url(), Some(&overlay), env, None)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default()
    };
    let token = [("BOTLINE_ONEBOT_ACCESS_TOKEN", TOKEN)];
    let forward = settings("forward", "ws://127.0.0.1:6700/");
    assert_eq!(refused(forward.clone(), &token), "");
    assert!(refused(forward.clone(), &[]).contains("BOTLINE_ONEBOT_ACCESS_TOKEN"));
    let no_bot = forward.replace(&format!("self_id = \"{SELF_ID}\""), "self_id = \"\"");
    assert!(refused(no_bot, &token).contains("ingest.platforms.onebot.self_id"));
    let http_url = settings("forward", "http://127.0.0.1:6700/");
    assert!(refused(http_url, &token).contains("ingest.platforms.onebot.ws_url"));
    let deaf = forward.replace("heartbeat_misses = 3", "heartbeat_misses = 0");
    assert!(refused(deaf, &token).contains("ingest.platforms.onebot.heartbeat_misses"));
    let short = [("BOTLINE_ONEBOT_ACCESS_TOKEN", "short")];
    assert!(refused(settings("reverse", ""), &short).contains("at least 8"));
    let unknown = settings("sideways", "");
    assert!(refused(unknown, &token).contains("ingest.platforms.onebot.mode"));
}
