//! classify through the shared runner against a real redis-server: every
//! message lands in its queue once, poison entries go to `dead` with their
//! cause, and the stage keeps going.

use botline_shared::codec;
use botline_shared::message::{ClassifiedMessage, DeadLetter, Priority};
use botline_shared::testing::{
    add_entry as add, read_stream as read_all, sample_message as message, wait_for, RedisServer,
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
    for n in 0..40 {
        add(
            &mut connection,
            &streams.inbound(),
            &codec::encode(&message(n, texts[n % texts.len()])),
        );
    }
    add(
        &mut connection,
        &streams.inbound(),
        &[
            ("v".into(), b"1".to_vec()),
            ("body".into(), b"\xc1garbage".to_vec()),
        ],
    );
    let mut future = codec::encode(&message(99, "from the future"));
    future[0].1 = b"9".to_vec();
    add(&mut connection, &streams.inbound(), &future);

    let shutdown = CancellationToken::new();
    let stage = tokio::spawn(classify::run(settings.clone(), plumbing, shutdown.clone()));
    let queued = |connection: &mut redis::Connection| -> usize {
        Priority::ALL
            .iter()
            .map(|p| connection.xlen::<_, usize>(streams.queue(*p)).unwrap())
            .sum()
    };
    wait_for(
        "40 classified messages and 2 dead letters",
        Duration::from_secs(20),
        || {
            queued(&mut connection) == 40
                && connection.xlen::<_, usize>(streams.dead()).unwrap() == 2
        },
    )
    .await;
    // More after the poison: the stage kept going.
    add(
        &mut connection,
        &streams.inbound(),
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

    let urgent: Vec<ClassifiedMessage> =
        read_all(&mut connection, &streams.queue(Priority::Urgent));
    assert_eq!(urgent.len(), 10);
    assert!(urgent.iter().all(|c| c.intent.name == "outage_report"));
    let mut ids: Vec<String> = Priority::ALL
        .iter()
        .flat_map(|p| read_all::<ClassifiedMessage>(&mut connection, &streams.queue(*p)))
        .map(|c| c.message.id)
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 41, "each message once");

    let dead: Vec<DeadLetter> = read_all(&mut connection, &streams.dead());
    let reasons: Vec<&str> = dead.iter().map(|d| d.error.as_str()).collect();
    assert!(
        reasons[0].starts_with("body does not decode"),
        "{reasons:?}"
    );
    assert_eq!(reasons[1], "unknown schema version \"9\"");
    assert!(dead
        .iter()
        .all(|d| d.stage == "classify" && d.stream == streams.inbound()));
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

    let pending: redis::streams::StreamPendingReply =
        connection.xpending(streams.inbound(), "classify").unwrap();
    assert_eq!(pending.count(), 0, "everything acknowledged");
    let consumers: redis::streams::StreamInfoConsumersReply = connection
        .xinfo_consumers(streams.inbound(), "classify")
        .unwrap();
    assert!(
        consumers.consumers.is_empty(),
        "a clean stop retires the consumer"
    );
}
