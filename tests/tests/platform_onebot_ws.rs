//! OneBot v11 over WebSocket end to end, through the real binaries and a
//! stand-in implementation (`botline_tests::onebot`): a private message
//! that arrives over the socket comes back over the same socket as one
//! `send_msg`, answered by its echo, exactly once. Forward: of two ingest
//! replicas only one connects; `kill -9` of it and the other takes over,
//! and messages keep flowing. Reverse: the implementation connects to
//! ingest; a wrong token is refused with 401 and counted.

use botline_shared::testing::{wait_for, RedisServer};
use botline_tests::onebot::{private_message, OneBot, SELF_ID};
use botline_tests::{metric_value, Pipeline};
use std::time::Duration;

const TOKEN: &str = "kSLuTF2GC2Q4q4ugm3";
const WAIT: Duration = Duration::from_secs(60);
const USER: i64 = 12345678;

fn overlay(mode: &str, ws_url: &str) -> String {
    format!(
        "[runner]\nblock_ms = 200\n\
         [ingest.platforms.onebot]\nenabled = true\nmode = \"{mode}\"\nws_url = \"{ws_url}\"\n\
         self_id = \"{SELF_ID}\"\nlease_ttl_ms = 2000\nstandby_poll_ms = 200\n\
         reconnect_base_ms = 50\nreconnect_cap_ms = 500\n\
         [egress.platforms.onebot]\nenabled = true\ntransport = \"ws\"\n"
    )
}

fn start(redis: &RedisServer, overlay: &str) -> Pipeline {
    Pipeline::start_with_env(redis, overlay, &[("BOTLINE_ONEBOT_ACCESS_TOKEN", TOKEN)])
}

fn receipts(redis: &RedisServer) -> usize {
    botline_shared::testing::partitioned_len(&mut redis.connection(), "delivered")
}

/// Send a private message over the implementation's connection; wait for
/// the reply to come back over it, and check it came once.
async fn converse(implementation: &OneBot, redis: &RedisServer, message_id: i64, text: &str) {
    let before = implementation.seen().actions.len();
    implementation.send(private_message(message_id, USER, text));
    wait_for("the receipt of the reply", WAIT, || {
        receipts(redis) > before
    })
    .await;
    let actions = implementation.seen().actions;
    assert_eq!(actions.len(), before + 1, "one send_msg: {actions:?}");
    let action = &actions[before];
    assert_eq!(action["action"], "send_msg");
    assert_eq!(action["params"]["message_type"], "private");
    assert_eq!(action["params"]["user_id"], USER);
    let segments = action["params"]["message"].as_array().unwrap();
    assert_eq!(
        segments[0]["data"]["id"],
        message_id.to_string(),
        "quotes the message answered: {action}"
    );
    let said = segments.last().unwrap()["data"]["text"].as_str();
    assert!(said.is_some_and(|said| !said.trim().is_empty()), "{action}");
    assert!(action["echo"].is_string(), "{action}");
}

async fn connection_up(pipeline: &Pipeline, index: usize) -> Option<f64> {
    let series = format!("botline_ingest_connection_up{{platform=\"onebot\",bot=\"{SELF_ID}\"}}");
    metric_value(&pipeline.processes[index].metrics().await, &series)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_one_replica_connects_and_another_takes_over_after_kill_9() {
    let redis = RedisServer::start();
    let implementation = OneBot::new(Duration::from_millis(500));
    let url = implementation.serve(TOKEN).await;
    let mut pipeline = start(&redis, &overlay("forward", &url));
    let second = pipeline.add("ingest");
    pipeline.wait_ready(WAIT).await;
    wait_for("a connection", WAIT, || {
        implementation.seen().connections == 1
    })
    .await;

    converse(&implementation, &redis, 1, "hello").await;
    let ingests = [0, second];
    let mut holder = None;
    for index in ingests {
        if connection_up(&pipeline, index).await == Some(1.0) {
            holder = Some(index);
        }
    }
    let holder = holder.expect("one ingest reports the connection up");
    let standby = ingests.into_iter().find(|index| *index != holder).unwrap();
    assert_eq!(connection_up(&pipeline, standby).await, Some(0.0));
    assert_eq!(implementation.seen().connections, 1, "the other stands by");

    pipeline.processes[holder].kill9();
    wait_for("the other replica connected", WAIT, || {
        implementation.seen().connections == 2
    })
    .await;
    converse(&implementation, &redis, 2, "hello again").await;
    assert_eq!(connection_up(&pipeline, standby).await, Some(1.0));
    let seen = implementation.seen();
    assert_eq!(seen.most_live, 1, "never two connections at once");
    assert_eq!(seen.refused, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reverse_the_implementation_connects_and_a_wrong_token_is_refused() {
    let redis = RedisServer::start();
    let pipeline = start(&redis, &overlay("reverse", "ws://unused/"));
    pipeline.wait_ready(WAIT).await;
    let url = format!("ws://127.0.0.1:{}/hooks/onebot/ws", pipeline.http_port);
    let implementation = OneBot::new(Duration::from_millis(500));
    let wrong = OneBot::reverse_headers("not-the-token");
    assert_eq!(implementation.connect(&url, &wrong).await, Err(401));
    let series = "botline_ingest_rejected_total{platform=\"onebot\",reason=\"bad_token\"}";
    assert_eq!(
        pipeline.processes[0].metric(series).await,
        Some(1.0),
        "{series}"
    );

    implementation
        .connect(&url, &OneBot::reverse_headers(TOKEN))
        .await
        .unwrap();
    converse(&implementation, &redis, 1, "hello").await;
    converse(&implementation, &redis, 2, "thanks").await;
    assert_eq!(implementation.seen().connections, 1);
}
