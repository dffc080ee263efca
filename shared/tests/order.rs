//! Per-chat order across consumers (botline_shared::order) on a real Redis:
//! which members of a batch may go, waiting for one held elsewhere but not
//! for one nobody holds, and skipping one that stays in the way.
use botline_shared::now_ms;
use botline_shared::order::{ChatOrder, ChatTurn, Turns};
use botline_shared::runner::Outcome;
use botline_shared::testing::RedisServer;
use redis::Commands;
use std::time::{Duration, Instant};

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

/// One chat's turns.
async fn look(order: &ChatOrder, batch: &ChatTurn) -> Turns {
    order
        .look(std::slice::from_ref(batch))
        .await
        .unwrap()
        .remove(0)
}

/// The turns of one chat's batch once settled.
async fn settle(order: &ChatOrder, batch: &ChatTurn, turns: Turns) -> Turns {
    order
        .settle(std::slice::from_ref(batch), vec![turns])
        .await
        .unwrap()
        .remove(0)
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
    // This batch has m1, m2 and m4; m3 is elsewhere.
    let turns = look(&order, &chat(&["m1", "m4", "free", "m2"])).await;
    assert_eq!(turns.ready, vec![2, 0, 3], "free (in no set), then m1, m2");
    assert_eq!(turns.later, vec![1], "m4 waits for m3");
    let blocker = turns.blocker.unwrap();
    assert_eq!(blocker.member, "m3");
    assert!(!blocker.held, "no look has let m3 go");

    // Another consumer's look lets m3 go: now it is held.
    let other = look(&order, &chat(&["m3"])).await;
    assert!(other.ready.is_empty(), "m1 and m2 are still unfinished");
    let mut connection = redis.connection();
    let _: () = connection.zrem("order:in:web:c1", &["m1", "m2"]).unwrap();
    let other = look(&order, &chat(&["m3"])).await;
    assert_eq!(other.ready, vec![0]);
    let turns = look(&order, &chat(&["m4"])).await;
    assert!(
        turns.blocker.unwrap().held,
        "m3 is in the other consumer's hands"
    );
}

#[tokio::test]
async fn a_member_read_before_an_earlier_one_of_its_batch_waits_for_a_later_batch() {
    let redis = RedisServer::start();
    // A wait far longer than the test's timeout: settling must not use it.
    let order = order(
        &redis,
        "[runner]\nclaim_idle_ms = 100000\norder_skip_ms = 200000\norder_wait_ms = 60000\n",
    );
    arrived(&redis, &[("m1", 50), ("m2", 40), ("m3", 30)]);
    // m2 was put back earlier and came round before m1 and m3: m1 goes,
    // m2 and m3 (after m2) wait, so acknowledgements stay in arrival order.
    let batch = chat(&["m2", "m1", "m3"]);
    let turns = look(&order, &batch).await;
    assert_eq!(turns.ready, vec![1]);
    assert_eq!(turns.later, vec![0, 2]);
    assert_eq!(
        turns.blocker, None,
        "nothing outside the batch is in the way"
    );
    let settled = tokio::time::timeout(Duration::from_secs(20), settle(&order, &batch, turns))
        .await
        .expect("nothing to wait for");
    assert_eq!(settled.ready, vec![1]);
    assert!(
        matches!(order.not_yet(&settled), Outcome::Defer(reason) if reason.contains("same batch"))
    );
}

#[tokio::test]
async fn settle_sees_a_held_member_finish_or_gives_up_after_the_wait() {
    let redis = RedisServer::start();
    let order = order(&redis, "[runner]\norder_wait_ms = 300\n");
    arrived(&redis, &[("m1", 10), ("m2", 5)]);
    // Another consumer holds m1.
    let held = look(&order, &chat(&["m1"])).await;
    assert_eq!(held.ready, vec![0]);
    let batch = chat(&["m2"]);
    let first = look(&order, &batch).await;
    let started = Instant::now();
    let unchanged = settle(&order, &batch, first.clone()).await;
    assert_eq!(unchanged.later, vec![0], "m1 never finished");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited order_wait_ms for the held member"
    );
    assert!(
        matches!(order.not_yet(&unchanged), Outcome::Defer(reason) if reason.contains("another consumer"))
    );

    let finisher = {
        let client = redis.client();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mut connection = client.get_connection().unwrap();
            let _: () = connection.zrem("order:in:web:c1", "m1").unwrap();
        })
    };
    let settled = settle(&order, &batch, first).await;
    finisher.await.unwrap();
    assert_eq!(settled.ready, vec![0], "m2's turn came when m1 finished");
}

#[tokio::test]
async fn a_member_nobody_holds_is_not_waited_for() {
    let redis = RedisServer::start();
    // A wait far longer than the test's timeout: settling must not use it.
    let order = order(
        &redis,
        "[runner]\nclaim_idle_ms = 100000\norder_skip_ms = 200000\norder_wait_ms = 60000\n",
    );
    arrived(&redis, &[("unread", 10), ("m2", 5)]);
    let batch = chat(&["m2"]);
    let first = look(&order, &batch).await;
    let settled = tokio::time::timeout(Duration::from_secs(20), settle(&order, &batch, first))
        .await
        .expect("settle returns without waiting for a member nobody holds");
    assert_eq!(settled.later, vec![0]);
    assert!(
        matches!(order.not_yet(&settled), Outcome::Defer(reason) if reason.contains("not read yet"))
    );

    // Held by another consumer, but another chat of the batch is ready
    // (x1, in no set): the batch does not wait.
    let held = look(&order, &chat(&["unread"])).await;
    assert_eq!(held.ready, vec![0]);
    let chats = [
        batch,
        ChatTurn {
            key: "order:in:web:c2".into(),
            members: vec!["x1".into()],
        },
    ];
    let looked = order.look(&chats).await.unwrap();
    assert!(looked[0].blocker.as_ref().unwrap().held);
    assert_eq!(looked[1].ready, vec![0]);
    let settled = tokio::time::timeout(Duration::from_secs(20), order.settle(&chats, looked))
        .await
        .expect("a batch with a chat ready does not wait")
        .unwrap();
    assert_eq!(settled[0].later, vec![0]);
}

#[tokio::test]
async fn a_member_in_the_way_longer_than_order_skip_is_no_longer_waited_for() {
    let redis = RedisServer::start();
    let order = order(
        &redis,
        "[runner]\nclaim_idle_ms = 2000\norder_skip_ms = 5000\norder_wait_ms = 1000\n",
    );
    // Arrived ten minutes ago, but only just found in the way: a message
    // queued behind a backlog, not a lost one. It keeps its place.
    arrived(&redis, &[("queued", 600_000), ("m2", 10)]);
    let batch = chat(&["m2"]);
    let first = look(&order, &batch).await;
    assert_eq!(first.later, vec![0]);
    assert!(
        matches!(order.not_yet(&first), Outcome::Defer(_)),
        "put back, never left pending to count deliveries"
    );
    let settled = settle(&order, &batch, first).await;
    assert_eq!(
        settled.later,
        vec![0],
        "not skipped: in the way for moments"
    );

    // Found in the way six seconds ago (as the first look would have
    // recorded it): past order_skip_ms, so it is skipped.
    let mut connection = redis.connection();
    let _: () = connection
        .set(
            "order:in:web:c1:blocked",
            format!("{} queued", now_ms() - 6000),
        )
        .unwrap();
    let again = look(&order, &batch).await;
    assert!(again.blocker.as_ref().unwrap().blocked_for >= Duration::from_secs(5));
    let settled = settle(&order, &batch, again).await;
    assert_eq!(settled.ready, vec![0]);
    let left: Vec<String> = connection.zrange("order:in:web:c1", 0, -1).unwrap();
    assert_eq!(left, vec!["m2"], "the member in the way was taken out");
}
