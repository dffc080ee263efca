//! The whole pipeline, as users run it: the four real binaries on a real
//! redis-server, messages in through the generic API, replies out at a
//! local webhook sink that checks signatures.

use botline_shared::codec;
use botline_shared::message::DeadLetter;
use botline_shared::streams::Streams;
use botline_shared::testing::{
    add_entry, partitioned, partitioned_len, read_partitioned, sample_message, wait_for,
    RedisServer,
};
use botline_tests::sink::Sink;
use botline_tests::{
    assert_each_answered_once, kill_nine_each_stage, send_all, ApiClient, Pipeline, WEBHOOK_SECRET,
};
use redis::Commands;
use std::collections::HashMap;
use std::time::Duration;

/// Short timeouts so takeovers happen within a test's patience.
const FAST: &str = "[runner]\nblock_ms = 200\nlease_ttl_ms = 3000\n";

fn overlay(sink: &Sink) -> String {
    format!("{FAST}[egress.webhook]\nurl = \"{}\"\n", sink.url)
}

/// A redis-server, a webhook sink, the four stages (ready) and an API client.
async fn setup() -> (RedisServer, Sink, Pipeline, ApiClient) {
    let redis = RedisServer::start();
    let sink = Sink::start(WEBHOOK_SECRET).await;
    let pipeline = Pipeline::start(&redis, &overlay(&sink));
    pipeline.wait_ready(Duration::from_secs(60)).await;
    let client = ApiClient::new(&pipeline.base_url());
    (redis, sink, pipeline, client)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_answered_once_in_order_per_chat() {
    let (redis, sink, mut pipeline, client) = setup().await;

    let sent = send_all(&client, "m", 200, 10, Duration::ZERO).await;
    wait_for("200 replies", Duration::from_secs(60), || {
        sink.replies_per_message().len() == 200
    })
    .await;
    assert_each_answered_once(&sink, 200);
    assert_eq!(sink.repeated_keys(), 0);

    // Replies of one chat arrive in the order its messages were sent. The
    // sink sees message ULIDs, so map them back through the receipts' order.
    let received = sink.received();
    let mut per_chat: HashMap<String, Vec<String>> = HashMap::new();
    for reply in &received {
        per_chat
            .entry(reply.chat.clone())
            .or_default()
            .push(reply.text.clone());
    }
    assert_eq!(per_chat.len(), 10);
    let mut connection = redis.connection();
    let inbound: Vec<botline_shared::message::UnifiedMessage> =
        read_partitioned(&mut connection, "in");
    let event_order: HashMap<String, usize> = sent
        .iter()
        .enumerate()
        .map(|(i, (event, _))| (event.clone(), i))
        .collect();
    let message_order: HashMap<String, usize> = inbound
        .iter()
        .map(|m| {
            (
                m.id.clone(),
                event_order[m.text.trim_start_matches("hello, message ")],
            )
        })
        .collect();
    let mut by_chat: HashMap<String, Vec<usize>> = HashMap::new();
    for reply in &received {
        by_chat
            .entry(reply.chat.clone())
            .or_default()
            .push(message_order[&reply.in_reply_to]);
    }
    for (chat, order) in by_chat {
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "replies of {chat} out of order");
    }

    let delivered = partitioned_len(&mut connection, "delivered");
    assert_eq!(delivered, 200, "a receipt per delivery");
    let metrics = pipeline.stage("egress").metrics().await;
    assert!(
        metrics.contains("botline_egress_end_to_end_seconds_count"),
        "{metrics}"
    );

    // SIGTERM: each stage stops cleanly, nothing left pending.
    for process in &mut pipeline.processes {
        let status = process.terminate(Duration::from_secs(15));
        assert!(status.success(), "{} exited with {status}", process.stage);
    }
    let streams = ["in", "q", "out:webhook"]
        .into_iter()
        .zip(["classify", "respond", "egress"])
        .flat_map(|(name, group)| partitioned(name).into_iter().map(move |key| (key, group)));
    for (stream, group) in streams {
        let pending: redis::streams::StreamPendingReply =
            connection.xpending(&stream, group).unwrap();
        assert_eq!(
            pending.count(),
            0,
            "{stream} has pending entries after a clean stop"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_nine_of_each_stage_loses_nothing_and_doubles_nothing() {
    let (redis, sink, mut pipeline, client) = setup().await;
    const COUNT: usize = 400;

    let sender = tokio::spawn({
        let client = client.clone();
        async move { send_all(&client, "k", COUNT, 8, Duration::from_millis(15)).await }
    });
    kill_nine_each_stage(&mut pipeline, &sink, COUNT).await;
    sender.await.unwrap();
    wait_for("every reply", Duration::from_secs(90), || {
        sink.replies_per_message().len() == COUNT
    })
    .await;
    assert_each_answered_once(&sink, COUNT);
    eprintln!(
        "kill -9 of each stage: {COUNT} sent, {} answered, {} requests repeated an idempotency key",
        sink.replies_per_message().len(),
        sink.repeated_keys()
    );
    let dead = partitioned_len(&mut redis.connection(), "dead");
    assert_eq!(dead, 0, "nothing dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_consumer_s_entries_are_taken_over_and_not_forwarded_twice() {
    let (redis, sink, mut pipeline, client) = setup().await;
    // One message through, so the only classify consumer sits in a blocking read.
    client
        .send("s-0", "s", "hello", Duration::from_secs(10))
        .await
        .unwrap();
    wait_for("the first reply", Duration::from_secs(30), || {
        sink.count() == 1
    })
    .await;

    let stopped = pipeline.stage("classify");
    stopped.stop();
    // The stopped consumer's pending read takes the first of these into its
    // pending list. One chat each: this is about takeover, not about a chat
    // waiting for its first message to be taken over.
    for n in 1..=20 {
        client
            .send(
                &format!("s-{n}"),
                &format!("s{n}"),
                "hello",
                Duration::from_secs(10),
            )
            .await
            .unwrap();
    }
    let mut connection = redis.connection();
    wait_for(
        "entries pending with the stopped consumer",
        Duration::from_secs(10),
        || {
            partitioned("in").iter().any(|key| {
                let pending: redis::streams::StreamPendingReply =
                    connection.xpending(key, "classify").unwrap();
                pending.count() > 0
            })
        },
    )
    .await;
    let second = pipeline.add("classify");
    wait_for(
        "every reply, via the second consumer",
        Duration::from_secs(60),
        || sink.replies_per_message().len() == 21,
    )
    .await;
    const CLAIMED: &str = r#"botline_stage_messages_total{stage="classify",outcome="claimed"}"#;
    const LOST: &str = r#"botline_stage_partitions_lost_total{stage="classify"}"#;
    let claimed = pipeline.processes[second].metric(CLAIMED).await;
    assert!(
        claimed.unwrap_or(0.0) > 0.0,
        "the second consumer took entries over: {claimed:?}"
    );

    // The stopped one wakes up having lost its partitions (their leases ran
    // out): it must not forward what it held.
    pipeline.stage("classify").resume();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while pipeline.stage("classify").metric(LOST).await.unwrap_or(0.0) == 0.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the resumed consumer never noticed it lost its partitions"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give egress time to (wrongly) send anything forwarded twice, then check.
    client
        .send("s-21", "s", "hello", Duration::from_secs(10))
        .await
        .unwrap();
    wait_for("the marker reply", Duration::from_secs(30), || {
        sink.replies_per_message().len() == 22
    })
    .await;
    assert_each_answered_once(&sink, 22);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_entries_go_to_dead_and_every_stage_keeps_going() {
    let (redis, sink, pipeline, client) = setup().await;
    let streams = Streams::default();
    let mut connection = redis.connection();

    let garbage = vec![
        ("v".to_string(), b"1".to_vec()),
        ("body".to_string(), b"\x93\xff garbage".to_vec()),
    ];
    let mut future = codec::encode(&sample_message(1, "from a newer botline"));
    future[0].1 = b"99".to_vec();
    for stream in [
        streams.inbound(0),
        streams.queue(0),
        streams.outbound(0, "webhook"),
    ] {
        add_entry(&mut connection, &stream, &garbage);
        add_entry(&mut connection, &stream, &future);
    }
    for n in 0..3 {
        client
            .send(&format!("p-{n}"), "p", "hello", Duration::from_secs(10))
            .await
            .unwrap();
    }
    wait_for("replies after the poison", Duration::from_secs(30), || {
        sink.replies_per_message().len() == 3
    })
    .await;
    wait_for("six dead letters", Duration::from_secs(30), || {
        connection.xlen::<_, usize>(streams.dead(0)).unwrap() == 6
    })
    .await;
    let dead: Vec<DeadLetter> = read_partitioned(&mut connection, "dead");
    let mut seen: Vec<(String, bool)> = dead
        .iter()
        .map(|d| {
            (
                d.stage.clone(),
                d.error.starts_with("body does not decode")
                    || d.error == "unknown schema version \"99\"",
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        ["classify", "classify", "egress", "egress", "respond", "respond"]
            .map(|s| (s.to_string(), true))
            .to_vec()
    );
    drop(pipeline);
}
