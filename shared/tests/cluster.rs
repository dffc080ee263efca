//! The test Redis Cluster (`botline_shared::testing::RedisCluster`) is a
//! real one: the redis crate's async cluster client reaches it and keeps
//! streams of two hash tags; a script over keys of two slots is refused
//! with CROSSSLOT; tags spread over the masters; and, with replicas, a
//! killed master's replica takes over and its stream is read again.

use botline_shared::testing::RedisCluster;
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::streams::StreamRangeReply;
use redis::{AsyncCommands, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

async fn connect(cluster: &RedisCluster) -> ClusterConnection {
    ClusterClient::new(cluster.urls())
        .expect("cluster client")
        .get_async_connection()
        .await
        .expect("cluster connection")
}

async fn key_slot(connection: &mut ClusterConnection, key: &str) -> u16 {
    redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg(key)
        .query_async(connection)
        .await
        .expect("CLUSTER KEYSLOT")
}

/// `CLUSTER SLOTS`: each range of slots with the port of its master.
async fn slot_masters(connection: &mut ClusterConnection) -> Vec<(u16, u16, u16)> {
    let reply: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(connection)
        .await
        .expect("CLUSTER SLOTS");
    let number = |value: &Value| match value {
        Value::Int(n) => u16::try_from(*n).expect("a slot or port"),
        other => panic!("not a number in CLUSTER SLOTS: {other:?}"),
    };
    let Value::Array(ranges) = reply else {
        panic!("CLUSTER SLOTS is not an array: {reply:?}");
    };
    ranges
        .iter()
        .map(|range| match range {
            // [first, last, [ip, port, id, …] of the master, replicas…]
            Value::Array(range) => match &range[2] {
                Value::Array(master) => (number(&range[0]), number(&range[1]), number(&master[1])),
                other => panic!("odd master in CLUSTER SLOTS: {other:?}"),
            },
            other => panic!("odd range in CLUSTER SLOTS: {other:?}"),
        })
        .collect()
}

async fn text_of(connection: &mut ClusterConnection, key: &str) -> Vec<String> {
    let reply: StreamRangeReply = connection.xrange_all(key).await.expect("XRANGE");
    reply
        .ids
        .iter()
        .map(|entry| entry.get::<String>("text").expect("a text field"))
        .collect()
}

/// Sums the lengths of two streams, in one script.
const TWO_KEYS: &str = "return redis.call('XLEN', KEYS[1]) + redis.call('XLEN', KEYS[2])";

#[tokio::test]
async fn three_masters_keep_streams_apart_by_hash_tag() {
    let started = Instant::now();
    let cluster = RedisCluster::start();
    eprintln!("3-master cluster up in {:?}", started.elapsed());
    assert_eq!(cluster.ports().len(), 3);
    assert_eq!(cluster.urls().len(), 3, "three masters");
    let mut connection = connect(&cluster).await;

    for (key, text) in [("{botline:p0}:in", "zero"), ("{botline:p1}:in", "one")] {
        let _: String = connection
            .xadd(key, "*", &[("text", text)])
            .await
            .expect("XADD");
        assert_eq!(text_of(&mut connection, key).await, vec![text.to_string()]);
    }

    // A hash tag keeps a chat's keys in one slot; two tags, two slots.
    let p0 = key_slot(&mut connection, "{botline:p0}:in").await;
    assert_eq!(key_slot(&mut connection, "{botline:p0}:out").await, p0);
    let p1 = key_slot(&mut connection, "{botline:p1}:in").await;
    assert_ne!(p0, p1);

    // A script over one slot runs; over two it is refused, by the cluster
    // client and by the node itself.
    let same: i64 = redis::cmd("EVAL")
        .arg(TWO_KEYS)
        .arg(2)
        .arg("{botline:p0}:in")
        .arg("{botline:p0}:out")
        .query_async(&mut connection)
        .await
        .expect("a one-slot script");
    assert_eq!(same, 1);
    let mut cross = redis::cmd("EVAL");
    cross
        .arg(TWO_KEYS)
        .arg(2)
        .arg("{botline:p0}:in")
        .arg("{botline:p1}:in");
    let error = cross
        .query_async::<i64>(&mut connection)
        .await
        .expect_err("a two-slot script");
    assert_eq!(error.code(), Some("CROSSSLOT"), "{error}");
    let mut node = cluster.node(cluster.master_of_slot(p0)).connection();
    let error = cross
        .query::<i64>(&mut node)
        .expect_err("a two-slot script on one node");
    assert_eq!(error.code(), Some("CROSSSLOT"), "{error}");

    // Tags land on every master, as CLUSTER SLOTS and CLUSTER NODES agree.
    let ranges = slot_masters(&mut connection).await;
    assert_eq!(
        ranges
            .iter()
            .map(|&(first, last, _)| u32::from(last - first) + 1)
            .sum::<u32>(),
        16384
    );
    let mut masters = BTreeMap::new();
    for partition in 0..16 {
        let slot = key_slot(&mut connection, &format!("{{botline:p{partition}}}:in")).await;
        let (_, _, port) = ranges
            .iter()
            .copied()
            .find(|&(first, last, _)| first <= slot && slot <= last)
            .expect("every slot served");
        assert_eq!(port, cluster.master_of_slot(slot));
        masters.insert(partition, port);
    }
    let distinct: BTreeSet<u16> = masters.values().copied().collect();
    eprintln!("partitions on masters: {masters:?}");
    assert_eq!(distinct.len(), 3, "16 tags over 3 masters: {masters:?}");
    assert_ne!(masters[&0], masters[&1], "p0 and p1 on different masters");
}

#[tokio::test]
async fn a_replica_takes_over_a_killed_master() {
    let started = Instant::now();
    let mut cluster = RedisCluster::with_replicas();
    eprintln!("3-master, 3-replica cluster up in {:?}", started.elapsed());
    assert_eq!(cluster.ports().len(), 6);
    assert_eq!(cluster.urls().len(), 3, "three masters");
    let mut connection = connect(&cluster).await;

    let key = "{botline:p0}:in";
    let _: String = connection
        .xadd(key, "*", &[("text", "before")])
        .await
        .expect("XADD");
    cluster.wait_replicated(Duration::from_secs(10));

    let slot = key_slot(&mut connection, key).await;
    let killed = cluster.kill_master_of_slot(slot);
    let killed_at = Instant::now();
    cluster.wait_ok(Duration::from_secs(30));
    eprintln!("replica took over in {:?}", killed_at.elapsed());
    let promoted = cluster.master_of_slot(slot);
    assert_ne!(promoted, killed);
    assert_eq!(cluster.urls().len(), 3, "three masters again");
    assert!(!cluster.urls().contains(&cluster.node(killed).url()));

    // The client finds the new master on its own.
    let deadline = Instant::now() + Duration::from_secs(30);
    let read = loop {
        match connection.xrange_all::<_, StreamRangeReply>(key).await {
            Ok(reply) => break reply,
            Err(error) => {
                assert!(
                    Instant::now() < deadline,
                    "no read after the failover: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    eprintln!("read again {:?} after the kill", killed_at.elapsed());
    assert_eq!(read.ids.len(), 1, "the entry survived the failover");
    let _: String = connection
        .xadd(key, "*", &[("text", "after")])
        .await
        .expect("XADD after the failover");
    assert_eq!(
        text_of(&mut connection, key).await,
        vec!["before".to_string(), "after".to_string()]
    );
}
