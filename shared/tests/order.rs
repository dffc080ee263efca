//! Per-chat order across consumers (botline_shared::order) on a real Redis:
//! which members of a batch may go, waiting for one held elsewhere, and
//! skipping one that is lost.
use botline_shared::now_ms;
use botline_shared::order::{ChatOrder, ChatTurn};
use botline_shared::runner::Outcome;
use botline_shared::testing::RedisServer;
use redis::Commands;
use std::time::Duration;

fn order(redis: &RedisServer, overlay: &str) -> ChatOrder {
    let (_, plumbing) = redis.plumbing(overlay);
    ChatOrder::new(plumbing.pool.clone(), "test", &plumbing.runner)
}

fn chat(members: &[&str]) -> ChatTurn {
    ChatTurn {
        key: "order:in:web:c1".into(),
        members: members.iter().map(|m| m.to_string()).collect(),
    }
}

/// Members added as if they arrived `ms` milliseconds ago, in this order.
fn arrived(redis: &RedisServer, members: &[(&str, i64)]) {
    let mut connection = redis.connection();
    for (member, ago_ms) in members {
        let score = ((now_ms() - ago_ms) * 1000) as f64;
        let _: () = connection.zadd("order:in:web:c1", *member, score).unwrap();
    }
}

#[tokio::test]
async fn a_batch_goes_in_arrival_order_up_to_a_member_held_elsewhere() {
    let redis = RedisServer::start();
    let order = order(&redis, "");
    arrived(&redis, &[("m1", 50), ("m2", 40), ("m3", 30), ("m4", 20)]);
    // This batch has m2 and m1 (read out of order) and m4; m3 is elsewhere.
    let turns = order
        .look(&[chat(&["m2", "m4", "m1", "free"])])
        .await
        .unwrap()
        .remove(0);
    assert_eq!(turns.ready, vec![3, 2, 0], "free (in no set), then m1, m2");
    assert_eq!(turns.later, vec![1], "m4 waits for m3");
    assert_eq!(turns.blocker.as_ref().map(|b| b.0.as_str()), Some("m3"));
}

#[tokio::test]
async fn settle_sees_the_earlier_member_finish_or_gives_up_after_the_wait() {
    let redis = RedisServer::start();
    let order = order(&redis, "[runner]\norder_wait_ms = 300\n");
    arrived(&redis, &[("m1", 10), ("m2", 5)]);
    let batch = chat(&["m2"]);
    let first = order
        .look(std::slice::from_ref(&batch))
        .await
        .unwrap()
        .remove(0);
    let unchanged = order.settle(&batch, first.clone()).await.unwrap();
    assert_eq!(unchanged.later, vec![0], "m1 never finished");
    assert!(matches!(order.not_yet(&unchanged), Outcome::Defer(_)));

    let finisher = {
        let client = redis.client();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut connection = client.get_connection().unwrap();
            let _: () = connection.zrem("order:in:web:c1", "m1").unwrap();
        })
    };
    let settled = order.settle(&batch, first).await.unwrap();
    finisher.await.unwrap();
    assert_eq!(settled.ready, vec![0], "m2's turn came when m1 finished");
}

#[tokio::test]
async fn a_member_older_than_order_skip_is_no_longer_waited_for() {
    let redis = RedisServer::start();
    let order = order(
        &redis,
        "[runner]\nclaim_idle_ms = 2000\norder_skip_ms = 5000\norder_wait_ms = 1000\n",
    );
    arrived(&redis, &[("lost", 6000), ("m2", 10)]);
    let batch = chat(&["m2"]);
    let first = order
        .look(std::slice::from_ref(&batch))
        .await
        .unwrap()
        .remove(0);
    assert_eq!(first.later, vec![0]);
    assert!(
        matches!(order.not_yet(&first), Outcome::Defer(_)),
        "put back, never left pending to count deliveries"
    );
    let settled = order.settle(&batch, first).await.unwrap();
    assert_eq!(settled.ready, vec![0]);
    let mut connection = redis.connection();
    let left: Vec<String> = connection.zrange("order:in:web:c1", 0, -1).unwrap();
    assert_eq!(left, vec!["m2"], "the lost member was taken out");
}
