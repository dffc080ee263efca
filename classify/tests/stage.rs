//! classify through the shared runner against a real redis-server: every
//! message lands in its partition's queue once, with its priority, poison
//! entries go to the partition's `dead` with their cause, and the stage
//! keeps going.

use botline_shared::codec;
use botline_shared::message::{ClassifiedMessage, DeadLetter, Priority};
use botline_shared::testing::{
    add_entry as add, partitioned, partitioned_len, read_partitioned, read_stream as read_all,
    sample_message as message, wait_for, RedisServer,
};
use redis::Commands;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_is_queued_once_and_poison_goes_to_dead() {
    let redis = RedisServer::start();
    let (settings, plumbing) = redis.plumbing(
        "[runner]\nbatch_size = 7\nblock_ms = 100\n[classify]\nintent_model = \"keywords\"\n",
    );
    let streams = plumbing.streams.clone();
    let mut connection = redis.connection();

    let texts = [
        "hello",
        "紧急！服务器宕机了",
        "where is my order",
        "thanks 🎉",
    ];
    let inbound = |n: usize| {
        let message = message(n, "");
        streams.inbound(streams.partition_of(&message.platform, &message.chat.id))
    };
    for n in 0..40 {
        add(
            &mut connection,
            &inbound(n),
            &codec::encode(&message(n, texts[n % texts.len()])),
        );
    }
    // The poison goes in the partition of chat c0.
    let poisoned = inbound(0);
    let dead_key = streams.dead(streams.partition_of("web", "c0"));
    add(
        &mut connection,
        &poisoned,
        &[
            ("v".into(), b"1".to_vec()),
            ("body".into(), b"\xc1garbage".to_vec()),
        ],
    );
    let mut future = codec::encode(&message(99, "from the future"));
    future[0].1 = b"9".to_vec();
    add(&mut connection, &poisoned, &future);

    let shutdown = CancellationToken::new();
    let stage = tokio::spawn(classify::run(settings.clone(), plumbing, shutdown.clone()));
    let queued = |connection: &mut redis::Connection| -> usize { partitioned_len(connection, "q") };
    wait_for(
        "40 classified messages and 2 dead letters",
        Duration::from_secs(20),
        || queued(&mut connection) == 40 && partitioned_len(&mut connection, "dead") == 2,
    )
    .await;
    // More after the poison: the stage kept going.
    add(
        &mut connection,
        &inbound(40),
        &codec::encode(&message(40, "hi again")),
    );
    wait_for(
        "the message after the poison",
        Duration::from_secs(20),
        || queued(&mut connection) == 41,
    )
    .await;
    shutdown.cancel();
    stage.await.unwrap().unwrap();

    let classified: Vec<ClassifiedMessage> = read_partitioned(&mut connection, "q");
    let urgent: Vec<&ClassifiedMessage> = classified
        .iter()
        .filter(|c| c.priority == Priority::Urgent)
        .collect();
    assert_eq!(urgent.len(), 10);
    assert!(urgent.iter().all(|c| c.intent.name == "outage_report"));
    // Each in the queue of its chat's partition.
    for key in partitioned("q") {
        for c in read_all::<ClassifiedMessage>(&mut connection, &key) {
            let p = streams.partition_of(&c.message.platform, &c.message.chat.id);
            assert_eq!(key, streams.queue(p), "{}", c.message.id);
        }
    }
    let mut ids: Vec<String> = classified.into_iter().map(|c| c.message.id).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 41, "each message once");

    assert_eq!(partitioned_len(&mut connection, "dead"), 2);
    let dead: Vec<DeadLetter> = read_all(&mut connection, &dead_key);
    let reasons: Vec<&str> = dead.iter().map(|d| d.error.as_str()).collect();
    assert!(
        reasons[0].starts_with("body does not decode"),
        "{reasons:?}"
    );
    assert_eq!(reasons[1], "unknown schema version \"9\"");
    assert!(dead
        .iter()
        .all(|d| d.stage == "classify" && d.stream == poisoned));
    assert_eq!(
        dead[0]
            .fields
            .iter()
            .find(|(k, _)| k == "body")
            .unwrap()
            .1
            .as_slice(),
        b"\xc1garbage"
    );

    for key in partitioned("in") {
        let exists: bool = connection.exists(&key).unwrap();
        if !exists {
            continue;
        }
        let pending: redis::streams::StreamPendingReply =
            connection.xpending(&key, "classify").unwrap();
        assert_eq!(pending.count(), 0, "everything acknowledged in {key}");
        let consumers: redis::streams::StreamInfoConsumersReply =
            connection.xinfo_consumers(&key, "classify").unwrap();
        assert!(
            consumers.consumers.is_empty(),
            "a clean stop retires the consumer of {key}"
        );
    }
}
