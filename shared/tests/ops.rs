//! The operator's CLI (`botline_shared::ops` and the `botline` binary)
//! against a real redis-server, over partitioned streams: status numbers
//! for a constructed situation (summed over partitions, and each
//! partition's), peek on every record kind and on garbage (merged over
//! partitions), replay by id and by time (each partition into itself),
//! dead-letter requeue (also two at once), purge, and trim.

use botline_shared::codec::{self, Fields};
use botline_shared::config::ProcessConfig;
use botline_shared::message::*;
use botline_shared::ops::{
    GroupStatus, Ops, PeekRange, ReplayReport, ReplayRequest, RequeueOutcome,
};
use botline_shared::redis_conn;
use botline_shared::streams::Streams;
use botline_shared::testing::{
    add_entry, partitioned, partitioned_len, read_partitioned, read_stream, sample_message,
    RedisServer,
};
use redis::Connection;
use serde_json::Value as Json;
use std::process::Command;

/// These tests lay their entries out over 16 partitions (chats c0, c1, c2
/// in partitions 0, 3 and 6), whatever the default.
const PARTITIONS: u32 = 16;

fn streams() -> Streams {
    Streams::new(botline_shared::streams::DEFAULT_PREFIX, PARTITIONS)
}

/// The deployment's recorded partition count, which the CLI follows.
/// (Nothing when no Redis answers there: a test of that.)
fn record_partitions(redis_url: &str, prefix: &str) {
    let Ok(mut connection) = redis::Client::open(redis_url).and_then(|c| c.get_connection()) else {
        return;
    };
    let _: () = redis::cmd("SET")
        .arg(format!("{{{prefix}}}:partitions"))
        .arg(PARTITIONS)
        .arg("NX")
        .query(&mut connection)
        .unwrap();
}

fn ops(redis: &RedisServer, prefix: &str) -> Ops {
    record_partitions(&redis.url(), prefix);
    let process = ProcessConfig::from_env(
        &[
            ("BOTLINE_REDIS_URL", redis.url().as_str()),
            ("BOTLINE_PREFIX", prefix),
        ],
        "127.0.0.1:0",
    )
    .unwrap();
    Ops::new(
        botline_shared::redis_conn::pool(&process, 2).unwrap(),
        Streams::new(prefix, PARTITIONS),
    )
}

fn cmd(connection: &mut Connection, args: &[&str]) -> redis::Value {
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query(connection).unwrap()
}

fn add_with_id(connection: &mut Connection, stream: &str, id: &str, fields: &Fields) -> String {
    let mut command = redis::cmd("XADD");
    command.arg(stream).arg(id);
    for (name, value) in fields {
        command.arg(name).arg(value.as_slice());
    }
    command.query(connection).unwrap()
}

/// `count` sample messages added to `stream`; their ids.
fn fill(connection: &mut Connection, stream: &str, count: usize) -> Vec<String> {
    (0..count)
        .map(|n| add_entry(connection, stream, &codec::encode(&sample_message(n, "x"))))
        .collect()
}

fn group(connection: &mut Connection, stream: &str, name: &str) {
    cmd(
        connection,
        &["XGROUP", "CREATE", stream, name, "0", "MKSTREAM"],
    );
}

/// `XREADGROUP … COUNT n … >` as `consumer`; the ids read.
fn read(
    connection: &mut Connection,
    stream: &str,
    name: &str,
    consumer: &str,
    n: usize,
) -> Vec<String> {
    let reply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(name)
        .arg(consumer)
        .arg("COUNT")
        .arg(n)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query(connection)
        .unwrap();
    redis_conn::parse_read_reply(reply)
        .unwrap()
        .into_iter()
        .map(|entry| entry.id)
        .collect()
}

fn reply(n: usize, chat: &str) -> Reply {
    Reply {
        id: format!("r{n}"),
        in_reply_to: format!("m{n}"),
        platform: "web".into(),
        bot: "botline".into(),
        chat: Chat {
            id: chat.into(),
            kind: ChatKind::Direct,
        },
        thread: None,
        reply_to: None,
        text: "hi".into(),
        mentions: vec![],
        attachments: vec![],
        platform_data: Default::default(),
        priority: Priority::Normal,
        received_at_ms: 1,
        created_at_ms: 2,
        trace_id: format!("t{n}"),
        replay: false,
    }
}

fn classified(n: usize) -> ClassifiedMessage {
    ClassifiedMessage {
        message: sample_message(n, "hello"),
        priority: Priority::Normal,
        intent: Intent {
            name: "greeting".into(),
            confidence: 1.0,
        },
        audit: vec![],
        faq: None,
    }
}

fn letter(stage: &str, stream: &str, fields: Fields) -> DeadLetter {
    DeadLetter {
        stage: stage.into(),
        stream: stream.into(),
        entry_id: "1-0".into(),
        error: "went wrong".into(),
        deliveries: 4,
        fields: fields
            .into_iter()
            .map(|(name, value)| (name, serde_bytes::ByteBuf::from(value)))
            .collect(),
        at_ms: 5,
    }
}

/// A chat's partition (of the default 16).
fn partition(chat: &str) -> u32 {
    streams().partition_of("web", chat)
}

// ---------------------------------------------------------------- status

type Row = (String, bool, u64, Option<(String, Option<u64>, u64, usize)>);

/// Each stream's (or partition's) rows: name, exists, length, and per group
/// (name, lag, pending, consumers).
fn rows(streams: &[botline_shared::ops::StreamStatus]) -> Vec<Row> {
    streams
        .iter()
        .flat_map(|stream| {
            let groups: Vec<Option<&GroupStatus>> = if stream.groups.is_empty() {
                vec![None]
            } else {
                stream.groups.iter().map(Some).collect()
            };
            groups.into_iter().map(move |group| {
                (
                    stream.stream.clone(),
                    stream.exists,
                    stream.length,
                    group.map(|g| (g.name.clone(), g.lag, g.pending, g.consumers.len())),
                )
            })
        })
        .collect()
}

fn g(
    name: &str,
    lag: Option<u64>,
    pending: u64,
    consumers: usize,
) -> Option<(String, Option<u64>, u64, usize)> {
    Some((name.to_string(), lag, pending, consumers))
}

/// in: p0 5 entries (classify's c1 read 3, acknowledged 1), p1 2 entries an
/// hour old (c1 and c2 read one each); q: p3 4 entries (respond read and
/// acknowledged 2, then an unread one was deleted: the lag is unknown), p4
/// one unread; out:web: p5 3 entries, a group no consumer read from;
/// out:webhook: p2 one entry, no group.
fn status_fixture(connection: &mut Connection, streams: &Streams) {
    let in0 = streams.inbound(0);
    let ids = fill(connection, &in0, 5);
    group(connection, &in0, "classify");
    read(connection, &in0, "classify", "c1", 3);
    cmd(connection, &["XACK", &in0, "classify", &ids[0]]);
    let in1 = streams.inbound(1);
    let hour_ago = botline_shared::now_ms() - 3_600_000;
    for n in 0..2 {
        let fields = codec::encode(&sample_message(n, "x"));
        add_with_id(connection, &in1, &format!("{hour_ago}-{n}"), &fields);
    }
    group(connection, &in1, "classify");
    read(connection, &in1, "classify", "c1", 1);
    read(connection, &in1, "classify", "c2", 1);

    let q3 = streams.queue(3);
    let queued: Vec<String> = (0..4)
        .map(|n| add_entry(connection, &q3, &codec::encode(&classified(n))))
        .collect();
    group(connection, &q3, "respond");
    let taken = read(connection, &q3, "respond", "r1", 2);
    cmd(connection, &["XACK", &q3, "respond", &taken[0], &taken[1]]);
    cmd(connection, &["XDEL", &q3, &queued[3]]);
    let q4 = streams.queue(4);
    add_entry(connection, &q4, &codec::encode(&classified(5)));
    group(connection, &q4, "respond");

    let web = streams.outbound(5, "web");
    for n in 0..3 {
        add_entry(connection, &web, &codec::encode(&reply(n, "c1")));
    }
    group(connection, &web, "egress");
    add_entry(
        connection,
        &streams.outbound(2, "webhook"),
        &codec::encode(&reply(9, "c1")),
    );
    // Not a stream: SCAN … TYPE stream leaves it out.
    cmd(
        connection,
        &["SET", &streams.outbound(7, "not-a-stream"), "x"],
    );
}

#[tokio::test]
async fn status_sums_each_stream_over_its_partitions() {
    let redis = RedisServer::start();
    let ops = ops(&redis, "botline");
    let streams = streams();
    let mut connection = redis.connection();
    status_fixture(&mut connection, &streams);

    let status = ops.status().await.unwrap();
    let expected = vec![
        ("in".to_string(), true, 7, g("classify", Some(2), 4, 2)),
        ("q".into(), true, 4, g("respond", None, 0, 1)),
        ("out:web".into(), true, 3, g("egress", Some(3), 0, 0)),
        ("out:webhook".into(), true, 1, None),
        ("delivered".into(), false, 0, None),
        ("dead".into(), false, 0, None),
    ];
    assert_eq!(rows(&status.streams), expected, "one row per stream");

    let in_group = &status.streams[0].groups[0];
    assert!(
        in_group
            .oldest_pending_age_ms
            .is_some_and(|age| age >= 3_600_000),
        "the oldest of the partitions': {in_group:?}"
    );
    assert!(in_group
        .oldest_undelivered_age_ms
        .is_some_and(|age| age < 3_600_000));
    let consumers: Vec<(&str, u64)> = in_group
        .consumers
        .iter()
        .map(|c| (c.name.as_str(), c.pending))
        .collect();
    assert_eq!(
        consumers,
        [("c1", 3), ("c2", 1)],
        "the union, pending summed"
    );
    let q_group = &status.streams[1].groups[0];
    assert_eq!(q_group.oldest_pending_age_ms, None, "nothing pending");
    assert!(
        q_group.oldest_undelivered_age_ms.is_some(),
        "p3's third entry and p4's are unread"
    );

    // Each partition's own numbers, under full key names.
    for stream in &status.streams {
        let keys: Vec<String> = stream.partitions.iter().map(|p| p.stream.clone()).collect();
        let every: Vec<String> = streams
            .all()
            .map(|p| format!("{{botline:p{p}}}:{}", stream.stream))
            .collect();
        assert_eq!(keys, every);
        for (p, partition) in stream.partitions.iter().enumerate() {
            assert_eq!(partition.partition, Some(p as u32));
            assert_eq!(
                partition.stream,
                format!("{{botline:p{p}}}:{}", stream.stream)
            );
            assert!(partition.partitions.is_empty());
        }
    }
    let in_parts = rows(&status.streams[0].partitions[..2]);
    assert_eq!(
        in_parts,
        [
            (
                "{botline:p0}:in".to_string(),
                true,
                5,
                g("classify", Some(2), 2, 1)
            ),
            (
                "{botline:p1}:in".to_string(),
                true,
                2,
                g("classify", Some(0), 2, 2)
            ),
        ]
    );
    let q_parts = rows(&status.streams[1].partitions[3..5]);
    assert_eq!(
        q_parts,
        [
            (
                "{botline:p3}:q".to_string(),
                true,
                3,
                g("respond", None, 0, 1)
            ),
            (
                "{botline:p4}:q".to_string(),
                true,
                1,
                g("respond", Some(1), 0, 0)
            ),
        ]
    );
    assert!(!status.streams[0].partitions[2].exists);

    let table = status.table(true, false);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines.len(),
        1 + 6 + 3,
        "header, streams, consumers: {table}"
    );
    assert!(
        lines
            .iter()
            .any(|line| line.starts_with("q ") && line.contains("unknown")),
        "{table}"
    );
    assert!(table.contains("    c1  pending 3  idle "), "{table}");
    assert!(!table.contains("{botline:p"), "{table}");
    assert!(!table.contains("not-a-stream"), "{table}");
    let table = status.table(false, true);
    assert_eq!(
        table.lines().count(),
        1 + 6 + 6 * 16,
        "every partition's row too: {table}"
    );
    for (start, says) in [
        ("{botline:p0}:in ", "classify"),
        ("{botline:p3}:q ", "unknown"),
        ("{botline:p5}:out:web ", "egress"),
        ("{botline:p9}:dead ", "(none)"),
    ] {
        assert!(
            table
                .lines()
                .any(|line| line.starts_with(start) && line.contains(says)),
            "{start}: {table}"
        );
    }

    let json = status.json(false);
    assert_eq!(json.as_array().unwrap().len(), 6);
    assert_eq!(json[0]["stream"], "in");
    assert_eq!(json[0]["length"], 7);
    assert_eq!(json[0]["groups"][0]["lag"], 2);
    assert_eq!(json[0]["groups"][0]["pending"], 4);
    assert_eq!(json[1]["stream"], "q");
    assert_eq!(json[1]["groups"][0]["lag"], Json::Null);
    assert_eq!(json[1]["groups"][0]["lag_known"], false);
    assert!(json[0].get("partitions").is_none());
    let json = status.json(true);
    assert_eq!(
        json[0]["partitions"].as_array().unwrap().len(),
        PARTITIONS as usize
    );
    assert_eq!(json[0]["partitions"][1]["stream"], "{botline:p1}:in");
    assert_eq!(json[0]["partitions"][1]["partition"], 1);
    assert_eq!(json[0]["partitions"][1]["groups"][0]["pending"], 2);
    assert_eq!(json[1]["partitions"][4]["groups"][0]["lag"], 1);
    assert_eq!(json[1]["partitions"][4]["groups"][0]["lag_known"], true);
}

#[test]
fn the_binary_shows_a_row_per_stream_or_per_partition() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    status_fixture(&mut connection, &streams());
    let url = redis.url();

    let (code, table, stderr) = botline(&url, &["status", "--consumers"]);
    assert_eq!(code, 0, "{table}{stderr}");
    let in_rows: Vec<&str> = table.lines().filter(|l| l.starts_with("in ")).collect();
    assert_eq!(in_rows.len(), 1, "{table}");
    assert!(in_rows[0].contains("classify"), "{table}");
    assert!(!table.contains("{botline:p"), "{table}");
    assert!(table.contains("    c2  pending 1  idle "), "{table}");

    let (code, table, stderr) = botline(&url, &["status", "--partitions"]);
    assert_eq!(code, 0, "{table}{stderr}");
    assert_eq!(table.lines().count(), 1 + 6 + 6 * 16, "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("{botline:p1}:in ") && l.contains("classify")),
        "{table}"
    );

    let (code, json, stderr) = botline(&url, &["status", "--json"]);
    assert_eq!(code, 0, "{json}{stderr}");
    let json: Json = serde_json::from_str(&json).unwrap();
    let names: Vec<&str> = json
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stream"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        ["in", "q", "out:web", "out:webhook", "delivered", "dead"]
    );
    assert!(json[0].get("partitions").is_none());
    let (code, json, stderr) = botline(&url, &["status", "--json", "--partitions"]);
    assert_eq!(code, 0, "{json}{stderr}");
    let json: Json = serde_json::from_str(&json).unwrap();
    assert_eq!(json[0]["length"], 7);
    assert_eq!(json[0]["partitions"][0]["stream"], "{botline:p0}:in");
    assert_eq!(json[0]["partitions"][0]["length"], 5);
    assert_eq!(
        json[5]["partitions"].as_array().unwrap().len(),
        PARTITIONS as usize
    );
}

// ---------------------------------------------------------------- peek

#[tokio::test]
async fn peek_decodes_every_kind_and_shows_garbage_as_it_is() {
    let redis = RedisServer::start();
    let ops = ops(&redis, "botline");
    let streams = streams();
    let mut connection = redis.connection();
    let now = botline_shared::now_ms();
    let (c1, c2) = (partition("c1"), partition("c2"));
    let message = sample_message(1, "hello");
    add_with_id(
        &mut connection,
        &streams.inbound(c1),
        &format!("{}-0", now - 2000),
        &codec::encode(&message),
    );
    add_entry(
        &mut connection,
        &streams.queue(c2),
        &codec::encode(&classified(2)),
    );
    add_entry(
        &mut connection,
        &streams.outbound(c1, "web"),
        &codec::encode(&reply(3, "c1")),
    );
    let receipt = Receipt {
        reply_id: "r3".into(),
        message_id: "m3".into(),
        platform: "web".into(),
        chat: "c1".into(),
        latency_ms: 12,
        attempts: 1,
        platform_message_id: None,
        delivered_at_ms: 9,
        trace_id: "t3".into(),
    };
    add_entry(
        &mut connection,
        &streams.delivered(c1),
        &codec::encode(&receipt),
    );
    let turn = Turn::from_user(&message);
    add_entry(
        &mut connection,
        &streams.context("web", "c1"),
        &codec::encode(&turn),
    );
    add_entry(
        &mut connection,
        &streams.transcript("c1"),
        &codec::encode(&turn),
    );
    let original = codec::encode(&sample_message(4, "poison"));
    add_entry(
        &mut connection,
        &streams.dead(c1),
        &codec::encode(&letter("classify", &streams.inbound(c1), original)),
    );
    // Garbage in `in` (other partitions, newer): a body that is not
    // MessagePack, an unknown version; a dead letter holding garbage.
    let garbage: Fields = vec![
        ("v".into(), b"1".to_vec()),
        ("body".into(), vec![0xc1, 0xff, 0x00]),
    ];
    add_with_id(
        &mut connection,
        &streams.inbound(9),
        &format!("{}-0", now - 1000),
        &garbage,
    );
    add_with_id(
        &mut connection,
        &streams.inbound(12),
        &format!("{}-1", now - 1000),
        &vec![("v".into(), b"2".to_vec()), ("text".into(), b"hi".to_vec())],
    );
    add_entry(
        &mut connection,
        &streams.dead(c2),
        &codec::encode(&letter(
            "egress",
            &streams.outbound(c2, "web"),
            garbage.clone(),
        )),
    );

    let first = |stream: &str| {
        let ops = &ops;
        let stream = stream.to_string();
        async move {
            ops.peek(
                &stream,
                &PeekRange::From {
                    id: "-".into(),
                    count: 1,
                },
            )
            .await
            .unwrap()
            .remove(0)
        }
    };
    for (stream, kind, field, value) in [
        ("in", "UnifiedMessage", "/record/text", "hello"),
        ("q", "ClassifiedMessage", "/record/intent/name", "greeting"),
        ("out:web", "Reply", "/record/id", "r3"),
        ("delivered", "Receipt", "/record/reply_id", "r3"),
        ("ctx:web:c1", "Turn", "/record/text", "hello"),
        ("web:c1", "Turn", "/record/speaker_name", "Ada"),
        ("dead", "DeadLetter", "/original/record/text", "poison"),
        ("{botline:p3}:in", "UnifiedMessage", "/record/id", "m1"),
    ] {
        let entry = first(stream).await;
        assert_eq!(entry["kind"], kind, "{stream}: {entry}");
        assert_eq!(
            entry.pointer(field).and_then(Json::as_str),
            Some(value),
            "{stream}: {entry}"
        );
    }
    assert_eq!(first("dead").await["record"]["stage"], "classify");
    assert_eq!(first("in").await["partition"], c1, "each entry says whose");
    assert_eq!(first("q").await["partition"], c2);

    let last = ops.peek("in", &PeekRange::Last { count: 2 }).await.unwrap();
    assert_eq!(last.len(), 2);
    assert_eq!(
        (&last[0]["partition"], &last[1]["partition"]),
        (&9.into(), &12.into())
    );
    assert!(
        last[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("body does not decode"),
        "{}",
        last[0]
    );
    assert_eq!(last[0]["fields"]["body"], "0xc1ff00");
    assert_eq!(last[1]["error"], "unknown schema version \"2\"");
    assert_eq!(last[1]["fields"]["text"], "hi");
    let dead = ops
        .peek("dead", &PeekRange::Last { count: 1 })
        .await
        .unwrap();
    assert_eq!(dead[0]["record"]["stage"], "egress");
    assert!(dead[0]["original"]["error"]
        .as_str()
        .unwrap()
        .starts_with("body does not decode"));
    let from = ops
        .peek(
            "in",
            &PeekRange::From {
                id: last[0]["id"].as_str().unwrap().into(),
                count: 5,
            },
        )
        .await
        .unwrap();
    assert_eq!(from.len(), 2, "from an id on, inclusive");
    assert!(ops
        .peek("nothing:here", &PeekRange::Last { count: 3 })
        .await
        .unwrap()
        .is_empty());
}

#[tokio::test]
async fn peek_merges_the_partitions_in_entry_id_order() {
    let redis = RedisServer::start();
    let ops = ops(&redis, "botline");
    let streams = streams();
    let mut connection = redis.connection();
    for (p, ms) in [(5, 100), (5, 300), (5, 500), (2, 200), (2, 400), (11, 250)] {
        let fields = codec::encode(&sample_message(ms, "x"));
        add_with_id(
            &mut connection,
            &streams.inbound(p),
            &format!("{ms}-0"),
            &fields,
        );
    }
    let peek = |stream: &str, range: PeekRange| {
        let ops = &ops;
        let stream = stream.to_string();
        async move {
            ops.peek(&stream, &range)
                .await
                .unwrap()
                .iter()
                .map(|entry| {
                    (
                        entry["id"].as_str().unwrap().to_string(),
                        entry["partition"].as_u64().unwrap(),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let ids = |list: &[(&str, u64)]| -> Vec<(String, u64)> {
        list.iter().map(|(id, p)| (id.to_string(), *p)).collect()
    };
    let from = |id: &str, count| PeekRange::From {
        id: id.into(),
        count,
    };
    assert_eq!(
        peek("in", from("-", 4)).await,
        ids(&[("100-0", 5), ("200-0", 2), ("250-0", 11), ("300-0", 5)])
    );
    assert_eq!(
        peek("in", from("250-0", 10)).await,
        ids(&[("250-0", 11), ("300-0", 5), ("400-0", 2), ("500-0", 5)])
    );
    assert_eq!(
        peek("in", PeekRange::Last { count: 3 }).await,
        ids(&[("300-0", 5), ("400-0", 2), ("500-0", 5)])
    );
    assert_eq!(
        peek("{botline:p2}:in", PeekRange::Last { count: 5 }).await,
        ids(&[("200-0", 2), ("400-0", 2)]),
        "one partition's, named in full"
    );
}

// ---------------------------------------------------------------- replay

/// The stream `in` of `streams`: m0..m5 (chats c0, c1, c2, c0, c1, c2,
/// each in its chat's partition) a minute apart from 2023-11-14T22:13:20Z,
/// then m6, m7 added now.
fn replay_fixture(connection: &mut Connection, streams: &Streams) -> Vec<String> {
    let inbound = |n: usize| streams.inbound(streams.partition_of("web", &format!("c{}", n % 3)));
    let mut ids: Vec<String> = (0..6)
        .map(|n| {
            let id = format!("{}-0", 1_700_000_000_000u64 + n as u64 * 60_000);
            add_with_id(
                connection,
                &inbound(n),
                &id,
                &codec::encode(&sample_message(n, "x")),
            )
        })
        .collect();
    for n in 6..8 {
        ids.push(add_entry(
            connection,
            &inbound(n),
            &codec::encode(&sample_message(n, "x")),
        ));
    }
    // In each chat's partition, classify has read two and acknowledged one.
    for n in 0..3 {
        group(connection, &inbound(n), "classify");
        let read_ids = read(connection, &inbound(n), "classify", "c1", 2);
        cmd(connection, &["XACK", &inbound(n), "classify", &read_ids[0]]);
    }
    ids
}

fn groups_of(connection: &mut Connection, stream: &str) -> Vec<(String, String, u64, u64)> {
    // name, last-delivered-id, pending, consumers: what a replay must not change.
    let reply: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query(connection)
        .unwrap();
    reply
        .into_iter()
        .map(|group| {
            let text = |name: &str| redis::from_redis_value::<String>(group[name].clone()).unwrap();
            let number = |name: &str| redis::from_redis_value::<u64>(group[name].clone()).unwrap();
            (
                text("name"),
                text("last-delivered-id"),
                number("pending"),
                number("consumers"),
            )
        })
        .collect()
}

#[tokio::test]
async fn replay_copies_a_range_marked_as_replay_and_leaves_groups_alone() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    // (from, to, chat, the original messages copied)
    let cases: &[(&str, &str, Option<&str>, &[&str])] = &[
        (
            "-",
            "+",
            None,
            &["m0", "m1", "m2", "m3", "m4", "m5", "m6", "m7"],
        ),
        (
            "1700000060000-0",
            "1700000180000-0",
            None,
            &["m1", "m2", "m3"],
        ),
        ("1700000060000", "1700000120000", None, &["m1", "m2"]),
        (
            "2023-11-14T22:14:20Z",
            "2023-11-14T22:16:20Z",
            None,
            &["m1", "m2", "m3"],
        ),
        (
            "2023-11-15T06:14:20+08:00",
            "2023-11-14T22:16:20Z",
            Some("c1"),
            &["m1"],
        ),
        ("-", "+", Some("c2"), &["m2", "m5"]),
        ("-10m", "+", None, &["m6", "m7"]),
        ("-10m", "now", Some("c0"), &["m6"]),
        ("2024-01-01T00:00:00Z", "-10m", None, &[]),
    ];
    for (index, (from, to, chat, expected)) in cases.iter().enumerate() {
        let prefix = format!("case{index}");
        let ops = ops(&redis, &prefix);
        let streams = Streams::new(prefix.clone(), PARTITIONS);
        let ids = replay_fixture(&mut connection, &streams);
        // The chats' partitions (the others stay empty).
        let keys: Vec<String> = (0..3)
            .map(|n| streams.inbound(streams.partition_of("web", &format!("c{n}"))))
            .collect();
        let groups_before: Vec<_> = keys
            .iter()
            .map(|key| groups_of(&mut connection, key))
            .collect();
        let originals_in = |key: &str| {
            (0..8)
                .filter(|n| {
                    streams.inbound(streams.partition_of("web", &format!("c{}", n % 3))) == key
                })
                .count()
        };
        let request = ReplayRequest {
            stream: "in".into(),
            from: from.to_string(),
            to: to.to_string(),
            chat: chat.map(String::from),
            into: None,
            dry_run: true,
        };
        let dry = ops.replay(&request).await.unwrap();
        assert_eq!(
            (dry.matched, dry.copied),
            (expected.len() as u64, 0),
            "dry run of case {index}"
        );
        let report = ops
            .replay(&ReplayRequest {
                dry_run: false,
                ..request
            })
            .await
            .unwrap();
        assert_eq!(
            report,
            ReplayReport {
                into: "in".into(),
                matched: expected.len() as u64,
                copied: expected.len() as u64,
                undecodable: 0
            },
            "case {index}: {from}..{to} {chat:?}"
        );
        // Each partition's copies follow its originals, in their order; the
        // plain fields say what each copy copies.
        let mut copied = Vec::new();
        for key in &keys {
            let raw = redis_conn::parse_entries(
                key,
                redis::cmd("XRANGE")
                    .arg(key)
                    .arg("-")
                    .arg("+")
                    .query(&mut connection)
                    .unwrap(),
            )
            .unwrap();
            let mut here = Vec::new();
            for entry in &raw[originals_in(key)..] {
                let fields = entry.fields.as_ref().unwrap();
                let copy: UnifiedMessage =
                    codec::decode(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).unwrap();
                assert!(copy.replay, "case {index}: marked");
                assert!(
                    !copy.id.starts_with('m'),
                    "case {index}: a new message id, not {}",
                    copy.id
                );
                let field = |name: &str| {
                    fields
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
                };
                let number: usize = copy.trace_id[1..].parse().unwrap();
                assert_eq!(
                    field("replay_of"),
                    Some(format!("m{number}")),
                    "case {index}: trace ids kept"
                );
                assert_eq!(field("replay_entry").as_deref(), Some(ids[number].as_str()));
                assert_eq!(
                    *key,
                    streams.inbound(streams.partition_of("web", &copy.chat.id)),
                    "case {index}: copied into its chat's partition"
                );
                here.push(number);
            }
            assert!(
                here.windows(2).all(|w| w[0] < w[1]),
                "case {index}: {here:?} in order"
            );
            copied.extend(here);
        }
        copied.sort();
        let expected_numbers: Vec<usize> =
            expected.iter().map(|id| id[1..].parse().unwrap()).collect();
        assert_eq!(copied, expected_numbers, "case {index}");
        let groups_after: Vec<_> = keys
            .iter()
            .map(|key| groups_of(&mut connection, key))
            .collect();
        assert_eq!(
            groups_after, groups_before,
            "case {index}: groups untouched"
        );
    }
}

#[tokio::test]
async fn replay_of_queues_and_replies_into_another_stream() {
    let redis = RedisServer::start();
    let ops = ops(&redis, "botline");
    let streams = streams();
    let mut connection = redis.connection();
    let queue = |chat: &str| streams.queue(partition(chat));
    for n in 0..3 {
        let chat = format!("c{n}");
        add_entry(
            &mut connection,
            &queue(&chat),
            &codec::encode(&classified(n)),
        );
        add_entry(
            &mut connection,
            &streams.outbound(partition(&chat), "web"),
            &codec::encode(&reply(n, &chat)),
        );
    }
    let junk = add_entry(
        &mut connection,
        &queue("c2"),
        &[
            ("v".into(), b"1".to_vec()),
            ("body".into(), b"junk".to_vec()),
        ],
    );
    let replay = |stream: &str, into: Option<&str>, chat: Option<&str>| ReplayRequest {
        stream: stream.into(),
        from: "-".into(),
        to: "+".into(),
        chat: chat.map(String::from),
        into: into.map(String::from),
        dry_run: false,
    };
    let report = ops.replay(&replay("q", None, None)).await.unwrap();
    assert_eq!((report.copied, report.undecodable), (3, 1));
    assert_eq!(report.into, "q");
    cmd(&mut connection, &["XDEL", &queue("c2"), &junk]);
    let all: Vec<ClassifiedMessage> = read_partitioned(&mut connection, "q");
    let copies: Vec<&ClassifiedMessage> = all.iter().filter(|c| c.message.replay).collect();
    assert_eq!(copies.len(), 3);
    assert!(copies.iter().all(|copy| !copy.message.id.starts_with('m')));
    for n in 0..3 {
        let chat = format!("c{n}");
        let here: Vec<ClassifiedMessage> = read_stream(&mut connection, &queue(&chat));
        assert_eq!(
            here.len(),
            2,
            "{chat}: the original and its copy, in its partition"
        );
        assert!(here[1].message.replay);
        assert_eq!(here[1].message.trace_id, format!("t{n}"));
    }

    // One partition's, named in full, into that partition's stream named short.
    let p2 = queue("c2");
    let report = ops.replay(&replay(&p2, Some("q"), None)).await.unwrap();
    assert_eq!((report.into.as_str(), report.copied), (p2.as_str(), 2));
    assert_eq!(partitioned_len(&mut connection, "q"), 8);
    for (request, says) in [
        (replay(&p2, Some(&queue("c1")), None), "another partition"),
        (replay("q", Some(&p2), None), "name --into short too"),
    ] {
        let error = ops.replay(&request).await.unwrap_err();
        assert_eq!(error.exit_code(), 2, "{error}");
        assert!(error.to_string().starts_with("argument --into:"), "{error}");
        assert!(error.to_string().contains(says), "{error}");
    }

    let report = ops
        .replay(&replay("out:web", None, Some("c1")))
        .await
        .unwrap();
    assert_eq!(report.copied, 1);
    let replies: Vec<Reply> =
        read_stream(&mut connection, &streams.outbound(partition("c1"), "web"));
    let copy = replies.last().unwrap();
    assert!(copy.replay);
    assert_ne!(
        copy.id, "r1",
        "egress keys delivery on the reply id: a copy needs its own"
    );
    assert_eq!(
        (copy.in_reply_to.as_str(), copy.trace_id.as_str()),
        ("m1", "t1")
    );
    let report = ops
        .replay(&replay("out:web", Some("out:webhook"), Some("c2")))
        .await
        .unwrap();
    assert_eq!((report.into.as_str(), report.copied), ("out:webhook", 1));
    let hooked: Vec<Reply> = read_stream(
        &mut connection,
        &streams.outbound(partition("c2"), "webhook"),
    );
    assert_eq!(hooked.len(), 1);
    assert_eq!(hooked[0].in_reply_to, "m2");

    for (request, argument) in [
        (replay("in", Some("out:web"), None), "--into"),
        (replay("delivered", None, None), "<stream>"),
        (
            ReplayRequest {
                from: "yesterday".into(),
                ..replay("in", None, None)
            },
            "--from",
        ),
        (
            ReplayRequest {
                to: "-5x".into(),
                ..replay("in", None, None)
            },
            "--to",
        ),
    ] {
        let error = ops.replay(&request).await.unwrap_err();
        assert_eq!(error.exit_code(), 2, "{error}");
        assert!(
            error
                .to_string()
                .starts_with(&format!("argument {argument}:")),
            "{error}"
        );
    }
}

// ---------------------------------------------------------------- dead

#[tokio::test]
async fn requeue_puts_back_exactly_the_original_fields_once() {
    let redis = RedisServer::start();
    let ops = ops(&redis, "botline");
    let streams = streams();
    let mut connection = redis.connection();
    let c1 = partition("c1");
    let mut original = codec::encode(&sample_message(1, "again"));
    original.push(("odd".into(), vec![0xff, 0x00, 0xfe]));
    let dead_id = add_entry(
        &mut connection,
        &streams.dead(c1),
        &codec::encode(&letter("classify", &streams.inbound(c1), original.clone())),
    );

    let outcome = ops.dead_requeue(&dead_id, None).await.unwrap();
    let RequeueOutcome::Requeued { stream, new_id } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(stream, streams.inbound(c1), "back into its partition");
    let entries = redis_conn::parse_entries(
        &stream,
        redis::cmd("XRANGE")
            .arg(&stream)
            .arg("-")
            .arg("+")
            .query(&mut connection)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(entries.len(), 1);
    assert_eq!(entries[0].id, new_id);
    assert_eq!(
        entries[0].fields.as_ref().unwrap(),
        &original,
        "the very fields, bytes and order"
    );
    assert_eq!(partitioned_len(&mut connection, "dead"), 0);
    assert_eq!(
        ops.dead_requeue(&dead_id, None).await.unwrap(),
        RequeueOutcome::Gone
    );

    // Two operators requeueing the same letters at once: one copy each.
    let other = self::ops(&redis, "botline");
    // After every id `dead` has had (XDEL leaves a stream's last id).
    let base = botline_shared::now_ms() + 1_000;
    let mut ids = Vec::new();
    for n in 0..20 {
        let chat = format!("c{}", n % 3);
        let p = partition(&chat);
        let fields = codec::encode(&reply(n, &chat));
        // Ids of their own: the same id in two partitions' `dead` is
        // another case (below).
        ids.push(add_with_id(
            &mut connection,
            &streams.dead(p),
            &format!("{}-0", base + n as i64),
            &codec::encode(&letter("egress", &streams.outbound(p, "web"), fields)),
        ));
    }
    let (mine, theirs) = tokio::join!(
        async {
            let mut outcomes = Vec::new();
            for id in &ids {
                outcomes.push(ops.dead_requeue(id, None).await.unwrap());
            }
            outcomes
        },
        async {
            let mut outcomes = Vec::new();
            for id in &ids {
                outcomes.push(other.dead_requeue(id, None).await.unwrap());
            }
            outcomes
        }
    );
    for (a, b) in mine.iter().zip(&theirs) {
        let requeued = [a, b]
            .iter()
            .filter(|o| matches!(o, RequeueOutcome::Requeued { .. }))
            .count();
        let gone = [a, b]
            .iter()
            .filter(|o| **o == &RequeueOutcome::Gone)
            .count();
        assert_eq!((requeued, gone), (1, 1), "{a:?} {b:?}");
    }
    let replies: Vec<Reply> = read_partitioned(&mut connection, "out:web");
    for reply in &replies {
        let back: Vec<Reply> = read_stream(
            &mut connection,
            &streams.outbound(partition(&reply.chat.id), "web"),
        );
        assert!(back.contains(reply), "{} in its chat's partition", reply.id);
    }
    let mut reply_ids: Vec<String> = replies.into_iter().map(|reply| reply.id).collect();
    reply_ids.sort_by_key(|id| id[1..].parse::<usize>().unwrap());
    assert_eq!(
        reply_ids,
        (0..20).map(|n| format!("r{n}")).collect::<Vec<_>>()
    );

    // A letter that is not one stays, and says why.
    let junk = add_entry(
        &mut connection,
        &streams.dead(5),
        &[("v".into(), b"1".to_vec()), ("body".into(), b"?".to_vec())],
    );
    assert!(matches!(
        ops.dead_requeue(&junk, None).await.unwrap(),
        RequeueOutcome::Unreadable(_)
    ));
    assert_eq!(ops.dead_list(10, None).await.unwrap().len(), 1);

    // The same id in two partitions' `dead`: which one is for the operator
    // to say.
    let same = format!("{}-0", base + 100);
    for chat in ["c0", "c2"] {
        let p = partition(chat);
        let fields = codec::encode(&sample_message(if chat == "c0" { 0 } else { 2 }, "x"));
        add_with_id(
            &mut connection,
            &streams.dead(p),
            &same,
            &codec::encode(&letter("classify", &streams.inbound(p), fields)),
        );
    }
    assert_eq!(
        ops.dead_requeue(&same, None).await.unwrap(),
        RequeueOutcome::Ambiguous(vec![partition("c0"), partition("c2")])
    );
    assert_eq!(
        partitioned_len(&mut connection, "dead"),
        3,
        "nothing requeued"
    );
    let outcome = ops
        .dead_requeue(&same, Some(partition("c2")))
        .await
        .unwrap();
    let RequeueOutcome::Requeued { stream, .. } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(stream, streams.inbound(partition("c2")));
    let left: Vec<DeadLetter> = read_stream(&mut connection, &streams.dead(partition("c0")));
    assert_eq!(left.len(), 1, "the other partition's letter stays");
    assert_eq!(
        ops.dead_requeue(&same, Some(99))
            .await
            .unwrap_err()
            .exit_code(),
        2
    );
}

#[tokio::test]
async fn list_and_requeue_all_by_stage() {
    let redis = RedisServer::start();
    let ops = ops(&redis, "botline");
    let streams = streams();
    let mut connection = redis.connection();
    // Over three partitions (the chats'), in time order m0, r0, m1, r1, …
    for n in 0..4 {
        let chat = format!("c{}", n % 3);
        let p = partition(&chat);
        let message = codec::encode(&sample_message(n, "x"));
        add_with_id(
            &mut connection,
            &streams.dead(p),
            &format!("{}-0", 1_000 + 10 * n),
            &codec::encode(&letter("classify", &streams.inbound(p), message)),
        );
        let out = codec::encode(&reply(n, &chat));
        add_with_id(
            &mut connection,
            &streams.dead(p),
            &format!("{}-0", 1_005 + 10 * n),
            &codec::encode(&letter("egress", &streams.outbound(p, "web"), out)),
        );
    }
    let listed = ops.dead_list(3, Some("egress")).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed
        .iter()
        .all(|entry| entry.letter.as_ref().unwrap().stage == "egress"));
    let listed_ids: Vec<(&str, Option<u32>)> = listed
        .iter()
        .map(|entry| (entry.id.as_str(), entry.partition))
        .collect();
    assert_eq!(
        listed_ids,
        [
            ("1035-0", Some(partition("c0"))),
            ("1025-0", Some(partition("c2"))),
            ("1015-0", Some(partition("c1")))
        ],
        "newest first, over the partitions"
    );
    assert_eq!(listed[0].dead, streams.dead(partition("c0")));
    assert_eq!(listed[0].json()["partition"], partition("c0"));
    let table = botline_shared::ops::dead_table(&listed, &streams);
    assert!(
        table
            .lines()
            .nth(1)
            .unwrap()
            .starts_with(&format!("1035-0  {}  ", partition("c0"))),
        "{table}"
    );
    assert_eq!(ops.dead_list(100, None).await.unwrap().len(), 8);

    let report = ops.dead_requeue_all(Some("egress")).await.unwrap();
    assert_eq!((report.requeued, report.gone, report.unreadable), (4, 0, 0));
    let replies: Vec<Reply> = read_partitioned(&mut connection, "out:web");
    assert_eq!(replies.len(), 4);
    let left = ops.dead_list(100, None).await.unwrap();
    assert_eq!(left.len(), 4);
    assert!(left
        .iter()
        .all(|entry| entry.letter.as_ref().unwrap().stage == "classify"));
    assert_eq!(ops.dead_requeue_all(None).await.unwrap().requeued, 4);
    let messages: Vec<UnifiedMessage> = read_partitioned(&mut connection, "in");
    let mut ids: Vec<&str> = messages.iter().map(|m| m.id.as_str()).collect();
    ids.sort();
    assert_eq!(ids, ["m0", "m1", "m2", "m3"]);
    // Requeued oldest first over the partitions: their new entry ids in
    // that order (equal ids of one millisecond in two partitions aside).
    let mut requeued: Vec<(String, (i64, u64))> = Vec::new();
    for key in partitioned("in") {
        let raw = redis_conn::parse_entries(
            &key,
            redis::cmd("XRANGE")
                .arg(&key)
                .arg("-")
                .arg("+")
                .query(&mut connection)
                .unwrap(),
        )
        .unwrap();
        for entry in raw {
            let fields = entry.fields.unwrap();
            let message: UnifiedMessage =
                codec::decode(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).unwrap();
            requeued.push((message.id, redis_conn::id_order(&entry.id)));
        }
    }
    requeued.sort();
    assert!(
        requeued.windows(2).all(|pair| pair[0].1 <= pair[1].1),
        "oldest first, over the partitions: {requeued:?}"
    );
}

#[tokio::test]
async fn purge_counts_first_then_deletes_by_age() {
    let redis = RedisServer::start();
    let ops = ops(&redis, "botline");
    let streams = streams();
    let mut connection = redis.connection();
    let two_hours_ago = botline_shared::now_ms() - 2 * 3_600_000;
    // Each in its chat's partition: three old ones, two new ones.
    let dead_letter = |n: usize| {
        let p = partition(&format!("c{}", n % 3));
        let fields = codec::encode(&letter(
            "classify",
            &streams.inbound(p),
            codec::encode(&sample_message(n, "x")),
        ));
        (streams.dead(p), fields)
    };
    for n in 0..3 {
        let (dead, fields) = dead_letter(n);
        add_with_id(
            &mut connection,
            &dead,
            &format!("{two_hours_ago}-{n}"),
            &fields,
        );
    }
    for n in 3..5 {
        let (dead, fields) = dead_letter(n);
        add_entry(&mut connection, &dead, &fields);
    }
    let hour = Some(std::time::Duration::from_secs(3600));
    let len = |connection: &mut Connection| partitioned_len(connection, "dead");
    assert_eq!(ops.dead_purge(hour, false).await.unwrap(), 3);
    assert_eq!(ops.dead_purge(None, false).await.unwrap(), 5);
    assert_eq!(len(&mut connection), 5, "counting deletes nothing");
    assert_eq!(ops.dead_purge(hour, true).await.unwrap(), 3);
    assert_eq!(len(&mut connection), 2);
    assert_eq!(ops.dead_purge(None, true).await.unwrap(), 2);
    assert_eq!(len(&mut connection), 0);
}

// ---------------------------------------------------------------- trim

#[tokio::test]
async fn trim_keeps_what_groups_need_and_the_retention_window() {
    let redis = RedisServer::start();
    let ops = ops(&redis, "botline");
    let streams = streams();
    let mut connection = redis.connection();
    let inbound = streams.inbound(3);
    // Enough entries for several stream nodes: `XTRIM MINID ~` removes whole nodes only.
    let ids = fill(&mut connection, &inbound, 500);
    group(&mut connection, &inbound, "fast");
    group(&mut connection, &inbound, "slow");
    read(&mut connection, &inbound, "fast", "f", 500);
    let mut ack = redis::cmd("XACK");
    ack.arg(&inbound).arg("fast").arg(&ids);
    ack.query::<()>(&mut connection).unwrap();
    read(&mut connection, &inbound, "slow", "s", 350);
    let mut ack = redis::cmd("XACK");
    ack.arg(&inbound).arg("slow").arg(&ids[..300]);
    ack.query::<()>(&mut connection).unwrap();
    // out:web: a group that has read nothing: nothing may go.
    let web = streams.outbound(5, "web");
    for n in 0..300 {
        add_entry(&mut connection, &web, &codec::encode(&reply(n, "c1")));
    }
    group(&mut connection, &web, "egress");
    add_entry(
        &mut connection,
        &streams.delivered(3),
        &[("v".into(), b"1".to_vec())],
    );

    let hour = 3_600_000;
    let lines = ops.trim(hour, false).await.unwrap();
    assert!(
        lines.iter().all(|line| line.removed == 0),
        "a long retention window keeps everything: {lines:?}"
    );

    let dry = ops.trim(0, true).await.unwrap();
    let by_stream = |lines: &[botline_shared::ops::TrimLine], stream: &str| {
        lines
            .iter()
            .find(|line| line.stream == stream)
            .cloned()
            .unwrap()
    };
    // One line per key, named in full: every partition's `in`, `q`,
    // `delivered`, `dead`, and the `out:web` that exists.
    assert_eq!(dry.len(), 4 * 16 + 1, "{dry:?}");
    assert!(dry.iter().all(|line| line.stream.starts_with("{botline:p")));
    let in_line = by_stream(&dry, &inbound);
    assert_eq!(
        (in_line.below, in_line.keep_from.as_deref(), in_line.removed),
        (Some(300), Some(ids[300].as_str()), 0)
    );
    assert_eq!(by_stream(&dry, &web).below, Some(0));
    assert_eq!(
        by_stream(&dry, &streams.delivered(3)).below,
        None,
        "no group: left alone"
    );
    assert_eq!(by_stream(&dry, &streams.inbound(4)).below, None);
    let table = botline_shared::ops::trim_table(&dry, true);
    assert!(
        table.contains(&format!(
            "{{botline:p3}}:in: would remove up to 300 entries (below {})\n",
            ids[300]
        )),
        "{table}"
    );
    assert!(
        table.contains("{botline:p5}:out:web: would remove up to 0 entries"),
        "{table}"
    );
    assert!(
        table.contains("{botline:p3}:delivered: no group, left alone\n"),
        "{table}"
    );
    let len = |connection: &mut Connection, key: &str| -> u64 {
        redis::cmd("XLEN").arg(key).query(connection).unwrap()
    };
    assert_eq!(
        len(&mut connection, &inbound),
        500,
        "a dry run removes nothing"
    );

    let done = ops.trim(0, false).await.unwrap();
    let removed = by_stream(&done, &inbound).removed;
    assert!(removed > 0 && removed <= 300, "removed {removed}");
    let left: Vec<UnifiedMessage> = read_stream(&mut connection, &inbound);
    let first_left: usize = left[0].id.trim_start_matches('m').parse().unwrap();
    assert!(
        first_left <= 300,
        "m300 is pending with slow and must stay; first left: m{first_left}"
    );
    assert_eq!(len(&mut connection, &web), 300);
    assert_eq!(len(&mut connection, &streams.delivered(3)), 1);
}

// ---------------------------------------------------------------- the binary

fn botline(redis_url: &str, args: &[&str]) -> (i32, String, String) {
    if redis_url.starts_with("redis://") {
        record_partitions(redis_url, "botline");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_botline"))
        .args(args)
        .env("BOTLINE_REDIS_URL", redis_url)
        .env_remove("BOTLINE_PREFIX")
        .env_remove("BOTLINE_CONFIG")
        .output()
        .unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_binary_exits_0_1_or_2_and_names_the_argument() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut connection = redis.connection();
    add_entry(
        &mut connection,
        &streams().inbound(partition("c1")),
        &codec::encode(&sample_message(1, "hi")),
    );
    let nowhere = format!("redis://127.0.0.1:{}", botline_shared::testing::free_port());
    // (url, arguments, exit code, what stdout or stderr says)
    let cases: &[(&str, &[&str], i32, &str)] = &[
        (&url, &["status"], 0, "STREAM"),
        (&url, &["status", "--json"], 0, "\"stream\":\"in\""),
        (&url, &["status", "--partitions"], 0, "{botline:p3}:in "),
        (
            &url,
            &["peek", "{botline:p3}:in", "--last", "1"],
            0,
            "\"partition\": 3",
        ),
        (&url, &["peek", "in", "--last", "1"], 0, "\"text\": \"hi\""),
        (
            &url,
            &["replay", "in", "--from", "-10m", "--to", "+", "--dry-run"],
            0,
            "would copy 1 entries into in",
        ),
        (
            &url,
            &["replay", "in", "--from", "yesterday", "--to", "+"],
            2,
            "argument --from",
        ),
        (&url, &["replay", "in", "--to", "+"], 2, "--from"),
        (&url, &["dead", "requeue"], 2, "<ID>"),
        (
            &url,
            &["dead", "requeue", "--all", "--partition", "3"],
            2,
            "--partition",
        ),
        (
            &url,
            &["dead", "requeue", "1-1"],
            2,
            "argument <id>: 1-1 is not in dead",
        ),
        (
            &url,
            &["dead", "purge", "--older-than", "soon"],
            2,
            "argument --older-than",
        ),
        (&url, &["dead", "purge"], 0, "would purge 0 dead letters"),
        (
            &url,
            &["trim", "--retention", "1h", "--dry-run"],
            0,
            "{botline:p0}:in: no group, left alone",
        ),
        (&url, &["frobnicate"], 2, "frobnicate"),
        (&nowhere, &["status"], 1, "redis"),
        ("not a url", &["status"], 2, "BOTLINE_REDIS_URL"),
    ];
    for (url, args, code, says) in cases {
        let (exit, stdout, stderr) = botline(url, args);
        assert_eq!(exit, *code, "botline {args:?}: {stdout}{stderr}");
        assert!(
            stdout.contains(says) || stderr.contains(says),
            "botline {args:?} should say {says:?}: {stdout}{stderr}"
        );
    }
}

#[test]
fn the_binary_takes_the_partition_count_the_deployment_recorded() {
    let redis = RedisServer::start();
    let url = redis.url();
    let mut connection = redis.connection();
    // A deployment of 4 partitions, and no BOTLINE_CONFIG here (16).
    cmd(&mut connection, &["SET", "{botline}:partitions", "4"]);
    let streams = Streams::new("botline", 4);
    add_entry(
        &mut connection,
        &streams.inbound(streams.partition_of("web", "c1")),
        &codec::encode(&sample_message(1, "hi")),
    );
    let (code, table, stderr) = botline(&url, &["status", "--partitions"]);
    assert_eq!(code, 0, "{table}{stderr}");
    assert!(stderr.contains("4 partitions"), "{stderr}");
    assert!(table.contains("{botline:p3}:in "), "{table}");
    assert!(!table.contains("{botline:p4}:in "), "{table}");
    assert_eq!(table.lines().count(), 1 + 4 + 4 * 4, "{table}");
    let (code, stdout, stderr) = botline(&url, &["peek", "in"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("\"text\": \"hi\""), "{stdout}");
}
