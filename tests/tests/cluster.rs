//! The whole pipeline on a real three-master Redis Cluster on loopback
//! (`BOTLINE_REDIS_URL=redis+cluster://…`): every message answered once, in
//! order per chat, with `kill -9` of each stage in the middle; the
//! partitions' keys spread over every master, each script in one slot.

use botline_shared::testing::{partitioned, wait_for, RedisCluster};
use botline_tests::sink::Sink;
use botline_tests::{
    assert_each_answered_once, kill_nine_each_stage, send_all, ApiClient, Pipeline, WEBHOOK_SECRET,
};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

const FAST: &str = "[runner]\nblock_ms = 200\nlease_ttl_ms = 3000\n";

/// Each chat's (of those named `chats…`) replies answer its messages in the order they arrived: a
/// chat's messages are sent one after another, milliseconds apart, so their
/// ids (ULIDs, time first) rise.
fn assert_in_order_per_chat(sink: &Sink, chats: &str) {
    let mut per_chat: HashMap<String, Vec<String>> = HashMap::new();
    for reply in sink
        .received()
        .into_iter()
        .filter(|r| r.chat.starts_with(chats))
    {
        per_chat
            .entry(reply.chat)
            .or_default()
            .push(reply.in_reply_to);
    }
    for (chat, answered) in per_chat {
        let mut sorted = answered.clone();
        sorted.sort();
        assert_eq!(answered, sorted, "replies of {chat} out of order");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_cluster_every_message_is_answered_once_in_order_through_kill_nine_of_each_stage() {
    let cluster = RedisCluster::start();
    let sink = Sink::start(WEBHOOK_SECRET).await;
    let overlay = format!("{FAST}[egress.webhook]\nurl = \"{}\"\n", sink.url);
    let mut pipeline = Pipeline::start_on(cluster.env(), &overlay, &[]);
    pipeline.wait_ready(Duration::from_secs(60)).await;
    let client = ApiClient::new(&pipeline.base_url());
    const COUNT: usize = 300;

    let sender = tokio::spawn({
        let client = client.clone();
        async move { send_all(&client, "c", COUNT, 12, Duration::from_millis(15)).await }
    });
    kill_nine_each_stage(&mut pipeline, &sink, COUNT).await;
    sender.await.unwrap();
    wait_for("every reply", Duration::from_secs(90), || {
        sink.replies_per_message().len() == COUNT
    })
    .await;
    assert_each_answered_once(&sink, COUNT);
    assert_in_order_per_chat(&sink, "c-");

    // The partitions' streams are spread over the masters.
    let mut holders = BTreeSet::new();
    for key in partitioned("in") {
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(&key)
            .query(&mut cluster.node(cluster.ports()[0]).connection())
            .unwrap();
        holders.insert(cluster.master_of_slot(slot));
    }
    assert_eq!(holders.len(), 3, "partitions on every master: {holders:?}");
    drop(pipeline);
}

/// A master killed mid-stream, its replica standing by: Redis replicates
/// asynchronously, so what the master acknowledged in its last moments may
/// never have reached the replica. This measures what that costs (printed:
/// messages lost, or answered twice, across the failover) and holds what
/// must hold: the pipeline comes back by itself once the replica is
/// promoted, and every message sent after that is answered once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_failover_mid_stream_is_survived_and_its_cost_measured() {
    let mut cluster = RedisCluster::with_replicas();
    let sink = Sink::start(WEBHOOK_SECRET).await;
    let overlay = format!("{FAST}[egress.webhook]\nurl = \"{}\"\n", sink.url);
    let pipeline = Pipeline::start_on(cluster.env(), &overlay, &[]);
    pipeline.wait_ready(Duration::from_secs(60)).await;
    let client = ApiClient::new(&pipeline.base_url());
    const BEFORE: usize = 300;
    const AFTER: usize = 120;

    let sender = tokio::spawn({
        let client = client.clone();
        async move { send_all(&client, "f", BEFORE, 12, Duration::from_millis(20)).await }
    });
    wait_for("a third of the replies", Duration::from_secs(60), || {
        sink.count() >= BEFORE / 3
    })
    .await;
    // The master of partition 0's slot: it holds streams of every stage.
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(partitioned("in").remove(0))
        .query(&mut cluster.node(cluster.ports()[0]).connection())
        .unwrap();
    let killed = cluster.kill_master_of_slot(slot);
    let failed_over = std::time::Instant::now();
    tokio::task::block_in_place(|| cluster.wait_ok(Duration::from_secs(30)));
    eprintln!(
        "failover: master {killed} killed, a replica serves its slots after {} ms",
        failed_over.elapsed().as_millis()
    );
    sender.await.unwrap();
    // What the failover cost the messages around it, once they settled.
    let settled = std::time::Instant::now() + Duration::from_secs(30);
    while sink.replies_per_message().len() < BEFORE && std::time::Instant::now() < settled {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let answered = sink.replies_per_message();
    let twice = answered.values().filter(|n| **n > 1).count();
    eprintln!(
        "across the failover: {BEFORE} sent, {} answered, {} missing, {twice} answered twice, {} requests repeated an idempotency key",
        answered.len(),
        BEFORE.saturating_sub(answered.len()),
        sink.repeated_keys()
    );

    // After the failover: every message answered once, in order per chat.
    let before: BTreeSet<String> = answered.keys().cloned().collect();
    send_all(&client, "g", AFTER, 6, Duration::from_millis(10)).await;
    wait_for(
        "every reply after the failover",
        Duration::from_secs(60),
        || sink.replies_per_message().len() >= before.len() + AFTER,
    )
    .await;
    let after: Vec<(String, usize)> = sink
        .replies_per_message()
        .into_iter()
        .filter(|(message, _)| !before.contains(message))
        .collect();
    assert_eq!(after.len(), AFTER, "messages after the failover answered");
    assert!(
        after.iter().all(|(_, n)| *n == 1),
        "answered twice after the failover: {after:?}"
    );
    assert_in_order_per_chat(&sink, "g-");
}
