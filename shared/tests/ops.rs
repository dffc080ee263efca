//! The operator's CLI (`botline_shared::ops` and the `botline` binary)
//! against a real redis-server: status numbers for a constructed situation,
//! peek on every record kind and on garbage, replay by id and by time,
//! dead-letter requeue (also two at once), purge, and trim.

use botline_shared::codec::{self, Fields};
use botline_shared::config::ProcessConfig;
use botline_shared::message::*;
use botline_shared::ops::{
    GroupStatus, Ops, PeekRange, ReplayReport, ReplayRequest, RequeueOutcome,
};
use botline_shared::redis_conn;
use botline_shared::streams::Streams;
use botline_shared::testing::{add_entry, read_stream, sample_message, RedisServer};
use redis::Connection;
use serde_json::Value as Json;
use std::process::Command;

fn ops(redis: &RedisServer, prefix: &str) -> Ops {
    let process = ProcessConfig::from_env(
        &[
            ("BOTLINE_REDIS_URL", redis.url().as_str()),
            ("BOTLINE_PREFIX", prefix),
        ],
        "127.0.0.1:0",
    )
    .unwrap();
    Ops::connect(&process).unwrap()
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

// ---------------------------------------------------------------- status

#[tokio::test]
async fn status_numbers_match_a_constructed_situation() {
    let redis = RedisServer::start();
    let ops = ops(&redis, "{botline}");
    let streams = Streams::default();
    let mut connection = redis.connection();

    // in: 5 entries; classify's c1 read 3 and acknowledged 1.
    let inbound = streams.inbound();
    let ids = fill(&mut connection, &inbound, 5);
    group(&mut connection, &inbound, "classify");
    read(&mut connection, &inbound, "classify", "c1", 3);
    cmd(&mut connection, &["XACK", &inbound, "classify", &ids[0]]);
    // q:normal: 4 entries, respond read and acknowledged 2, then an unread
    // one was deleted: Redis can no longer count the lag.
    let normal = streams.queue(Priority::Normal);
    let queued: Vec<String> = (0..4)
        .map(|n| add_entry(&mut connection, &normal, &codec::encode(&classified(n))))
        .collect();
    group(&mut connection, &normal, "respond");
    let taken = read(&mut connection, &normal, "respond", "r1", 2);
    cmd(
        &mut connection,
        &["XACK", &normal, "respond", &taken[0], &taken[1]],
    );
    cmd(&mut connection, &["XDEL", &normal, &queued[3]]);
    // out:web: a group no consumer ever read from; out:webhook: no group.
    let web = streams.outbound("web");
    for n in 0..3 {
        add_entry(&mut connection, &web, &codec::encode(&reply(n, "c1")));
    }
    group(&mut connection, &web, "egress");
    add_entry(
        &mut connection,
        &streams.outbound("webhook"),
        &codec::encode(&reply(9, "c1")),
    );
    // Not a stream: SCAN … TYPE stream leaves it out.
    cmd(
        &mut connection,
        &["SET", &streams.outbound("not-a-stream"), "x"],
    );

    let status = ops.status().await.unwrap();
    type Row = (String, bool, u64, Option<(String, Option<u64>, u64, usize)>);
    let rows: Vec<Row> = status
        .streams
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
        .collect();
    let g = |name: &str, lag: Option<u64>, pending: u64, consumers: usize| {
        Some((name.to_string(), lag, pending, consumers))
    };
    let expected = vec![
        ("in".to_string(), true, 5, g("classify", Some(2), 2, 1)),
        ("q:urgent".into(), false, 0, None),
        ("q:normal".into(), true, 3, g("respond", None, 0, 1)),
        ("q:batch".into(), false, 0, None),
        ("out:web".into(), true, 3, g("egress", Some(3), 0, 0)),
        ("out:webhook".into(), true, 1, None),
        ("delivered".into(), false, 0, None),
        ("dead".into(), false, 0, None),
    ];
    assert_eq!(rows, expected);

    let in_group = &status.streams[0].groups[0];
    assert!(in_group.oldest_pending_age_ms.is_some_and(|age| age >= 0));
    assert!(in_group.oldest_undelivered_age_ms.is_some());
    assert_eq!(in_group.consumers[0].name, "c1");
    assert_eq!(in_group.consumers[0].pending, 2);
    let normal_group = &status.streams[2].groups[0];
    assert_eq!(normal_group.oldest_pending_age_ms, None, "nothing pending");
    assert!(
        normal_group.oldest_undelivered_age_ms.is_some(),
        "q:normal's third entry is unread"
    );

    let table = status.table(true);
    assert!(
        table
            .lines()
            .any(|line| line.starts_with("q:normal") && line.contains("unknown")),
        "{table}"
    );
    assert!(table.contains("    c1  pending 2  idle "), "{table}");
    assert!(!table.contains("not-a-stream"), "{table}");
    let json = status.json();
    assert_eq!(json[2]["groups"][0]["lag"], Json::Null);
    assert_eq!(json[2]["groups"][0]["lag_known"], false);
    assert_eq!(json[0]["groups"][0]["lag"], 2);
}

// ---------------------------------------------------------------- peek

#[tokio::test]
async fn peek_decodes_every_kind_and_shows_garbage_as_it_is() {
    let redis = RedisServer::start();
    let ops = ops(&redis, "{botline}");
    let streams = Streams::default();
    let mut connection = redis.connection();
    let message = sample_message(1, "hello");
    add_entry(
        &mut connection,
        &streams.inbound(),
        &codec::encode(&message),
    );
    add_entry(
        &mut connection,
        &streams.queue(Priority::Normal),
        &codec::encode(&classified(2)),
    );
    add_entry(
        &mut connection,
        &streams.outbound("web"),
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
        &streams.delivered(),
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
        &streams.dead(),
        &codec::encode(&letter("classify", &streams.inbound(), original)),
    );
    // Garbage in `in`: a body that is not MessagePack, an unknown version,
    // a dead letter holding garbage.
    let garbage: Fields = vec![
        ("v".into(), b"1".to_vec()),
        ("body".into(), vec![0xc1, 0xff, 0x00]),
    ];
    add_entry(&mut connection, &streams.inbound(), &garbage);
    add_entry(
        &mut connection,
        &streams.inbound(),
        &[("v".into(), b"2".to_vec()), ("text".into(), b"hi".to_vec())],
    );
    add_entry(
        &mut connection,
        &streams.dead(),
        &codec::encode(&letter("egress", &streams.outbound("web"), garbage.clone())),
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
        (
            "q:normal",
            "ClassifiedMessage",
            "/record/intent/name",
            "greeting",
        ),
        ("out:web", "Reply", "/record/id", "r3"),
        ("delivered", "Receipt", "/record/reply_id", "r3"),
        ("ctx:web:c1", "Turn", "/record/text", "hello"),
        ("web:c1", "Turn", "/record/speaker_name", "Ada"),
        ("dead", "DeadLetter", "/original/record/text", "poison"),
        ("{botline}:in", "UnifiedMessage", "/record/id", "m1"),
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

    let last = ops.peek("in", &PeekRange::Last { count: 2 }).await.unwrap();
    assert_eq!(last.len(), 2);
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

// ---------------------------------------------------------------- replay

/// The stream `in` of `prefix`: m0..m5 (chats c0, c1, c2, c0, c1, c2) a
/// minute apart from 2023-11-14T22:13:20Z, then m6, m7 added now; classify
/// has read three and acknowledged one.
fn replay_fixture(connection: &mut Connection, streams: &Streams) -> Vec<String> {
    let inbound = streams.inbound();
    let mut ids: Vec<String> = (0..6)
        .map(|n| {
            let id = format!("{}-0", 1_700_000_000_000u64 + n as u64 * 60_000);
            add_with_id(
                connection,
                &inbound,
                &id,
                &codec::encode(&sample_message(n, "x")),
            )
        })
        .collect();
    for n in 6..8 {
        ids.push(add_entry(
            connection,
            &inbound,
            &codec::encode(&sample_message(n, "x")),
        ));
    }
    group(connection, &inbound, "classify");
    let read_ids = read(connection, &inbound, "classify", "c1", 3);
    cmd(connection, &["XACK", &inbound, "classify", &read_ids[0]]);
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
        let streams = Streams::new(prefix.clone());
        let ids = replay_fixture(&mut connection, &streams);
        let groups_before = groups_of(&mut connection, &streams.inbound());
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
                into: streams.inbound(),
                matched: expected.len() as u64,
                copied: expected.len() as u64,
                undecodable: 0
            },
            "case {index}: {from}..{to} {chat:?}"
        );
        let all: Vec<UnifiedMessage> = read_stream(&mut connection, &streams.inbound());
        let copies = &all[ids.len()..];
        let originals: Vec<&str> = copies
            .iter()
            .map(|copy| copy.trace_id.trim_start_matches('t'))
            .collect();
        let expected_numbers: Vec<&str> = expected
            .iter()
            .map(|id| id.trim_start_matches('m'))
            .collect();
        assert_eq!(originals, expected_numbers, "case {index}: trace ids kept");
        for copy in copies {
            assert!(copy.replay, "case {index}: marked");
            assert!(
                !copy.id.starts_with('m'),
                "case {index}: a new message id, not {}",
                copy.id
            );
        }
        // The plain fields say what each copy copies.
        let raw = redis_conn::parse_entries(
            "",
            redis::cmd("XRANGE")
                .arg(streams.inbound())
                .arg("-")
                .arg("+")
                .query(&mut connection)
                .unwrap(),
        )
        .unwrap();
        for (entry, expected_id) in raw[ids.len()..].iter().zip(expected.iter()) {
            let fields = entry.fields.as_ref().unwrap();
            let field = |name: &str| {
                fields
                    .iter()
                    .find(|(k, _)| k == name)
                    .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
            };
            assert_eq!(field("replay_of").as_deref(), Some(*expected_id));
            let number: usize = expected_id[1..].parse().unwrap();
            assert_eq!(field("replay_entry").as_deref(), Some(ids[number].as_str()));
        }
        assert_eq!(
            groups_of(&mut connection, &streams.inbound()),
            groups_before,
            "case {index}: groups untouched"
        );
    }
}

#[tokio::test]
async fn replay_of_queues_and_replies_into_another_stream() {
    let redis = RedisServer::start();
    let ops = ops(&redis, "{botline}");
    let streams = Streams::default();
    let mut connection = redis.connection();
    let urgent = streams.queue(Priority::Urgent);
    let normal = streams.queue(Priority::Normal);
    for n in 0..3 {
        add_entry(&mut connection, &urgent, &codec::encode(&classified(n)));
        add_entry(
            &mut connection,
            &streams.outbound("web"),
            &codec::encode(&reply(n, &format!("c{n}"))),
        );
    }
    add_entry(
        &mut connection,
        &urgent,
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
    let report = ops
        .replay(&replay("q:urgent", Some("q:normal"), None))
        .await
        .unwrap();
    assert_eq!((report.copied, report.undecodable), (3, 1));
    let copies: Vec<ClassifiedMessage> = read_stream(&mut connection, &normal);
    assert_eq!(copies.len(), 3);
    assert!(copies
        .iter()
        .all(|copy| copy.message.replay && !copy.message.id.starts_with('m')));
    assert_eq!(copies[2].message.trace_id, "t2");

    let report = ops
        .replay(&replay("out:web", None, Some("c1")))
        .await
        .unwrap();
    assert_eq!(report.copied, 1);
    let replies: Vec<Reply> = read_stream(&mut connection, &streams.outbound("web"));
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
    let ops = ops(&redis, "{botline}");
    let streams = Streams::default();
    let mut connection = redis.connection();
    let mut original = codec::encode(&sample_message(1, "again"));
    original.push(("odd".into(), vec![0xff, 0x00, 0xfe]));
    let dead_id = add_entry(
        &mut connection,
        &streams.dead(),
        &codec::encode(&letter("classify", &streams.inbound(), original.clone())),
    );

    let outcome = ops.dead_requeue(&dead_id).await.unwrap();
    let RequeueOutcome::Requeued { stream, new_id } = outcome else {
        panic!("{outcome:?}");
    };
    assert_eq!(stream, streams.inbound());
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
    let dead_len: u64 = redis::cmd("XLEN")
        .arg(streams.dead())
        .query(&mut connection)
        .unwrap();
    assert_eq!(dead_len, 0);
    assert_eq!(
        ops.dead_requeue(&dead_id).await.unwrap(),
        RequeueOutcome::Gone
    );

    // Two operators requeueing the same letters at once: one copy each.
    let other = self::ops(&redis, "{botline}");
    let mut ids = Vec::new();
    for n in 0..20 {
        let fields = codec::encode(&reply(n, "c1"));
        ids.push(add_entry(
            &mut connection,
            &streams.dead(),
            &codec::encode(&letter("egress", &streams.outbound("web"), fields)),
        ));
    }
    let (mine, theirs) = tokio::join!(
        async {
            let mut outcomes = Vec::new();
            for id in &ids {
                outcomes.push(ops.dead_requeue(id).await.unwrap());
            }
            outcomes
        },
        async {
            let mut outcomes = Vec::new();
            for id in &ids {
                outcomes.push(other.dead_requeue(id).await.unwrap());
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
    let replies: Vec<Reply> = read_stream(&mut connection, &streams.outbound("web"));
    let mut reply_ids: Vec<String> = replies.into_iter().map(|reply| reply.id).collect();
    reply_ids.sort_by_key(|id| id[1..].parse::<usize>().unwrap());
    assert_eq!(
        reply_ids,
        (0..20).map(|n| format!("r{n}")).collect::<Vec<_>>()
    );

    // A letter that is not one stays, and says why.
    let junk = add_entry(
        &mut connection,
        &streams.dead(),
        &[("v".into(), b"1".to_vec()), ("body".into(), b"?".to_vec())],
    );
    assert!(matches!(
        ops.dead_requeue(&junk).await.unwrap(),
        RequeueOutcome::Unreadable(_)
    ));
    assert_eq!(ops.dead_list(10, None).await.unwrap().len(), 1);
}

#[tokio::test]
async fn list_and_requeue_all_by_stage() {
    let redis = RedisServer::start();
    let ops = ops(&redis, "{botline}");
    let streams = Streams::default();
    let mut connection = redis.connection();
    for n in 0..4 {
        let message = codec::encode(&sample_message(n, "x"));
        add_entry(
            &mut connection,
            &streams.dead(),
            &codec::encode(&letter("classify", &streams.inbound(), message)),
        );
        let out = codec::encode(&reply(n, "c1"));
        add_entry(
            &mut connection,
            &streams.dead(),
            &codec::encode(&letter("egress", &streams.outbound("web"), out)),
        );
    }
    let listed = ops.dead_list(3, Some("egress")).await.unwrap();
    assert_eq!(listed.len(), 3);
    assert!(listed
        .iter()
        .all(|entry| entry.letter.as_ref().unwrap().stage == "egress"));
    assert!(listed[0].id > listed[1].id, "newest first");
    assert_eq!(ops.dead_list(100, None).await.unwrap().len(), 8);

    let report = ops.dead_requeue_all(Some("egress")).await.unwrap();
    assert_eq!((report.requeued, report.gone, report.unreadable), (4, 0, 0));
    let replies: Vec<Reply> = read_stream(&mut connection, &streams.outbound("web"));
    assert_eq!(replies.len(), 4);
    let left = ops.dead_list(100, None).await.unwrap();
    assert_eq!(left.len(), 4);
    assert!(left
        .iter()
        .all(|entry| entry.letter.as_ref().unwrap().stage == "classify"));
    assert_eq!(ops.dead_requeue_all(None).await.unwrap().requeued, 4);
    let messages: Vec<UnifiedMessage> = read_stream(&mut connection, &streams.inbound());
    assert_eq!(
        messages.iter().map(|m| m.id.as_str()).collect::<Vec<_>>(),
        ["m0", "m1", "m2", "m3"],
        "oldest first"
    );
}

#[tokio::test]
async fn purge_counts_first_then_deletes_by_age() {
    let redis = RedisServer::start();
    let ops = ops(&redis, "{botline}");
    let streams = Streams::default();
    let mut connection = redis.connection();
    let two_hours_ago = botline_shared::now_ms() - 2 * 3_600_000;
    for n in 0..3 {
        let fields = codec::encode(&letter(
            "classify",
            &streams.inbound(),
            codec::encode(&sample_message(n, "x")),
        ));
        add_with_id(
            &mut connection,
            &streams.dead(),
            &format!("{two_hours_ago}-{n}"),
            &fields,
        );
    }
    for n in 3..5 {
        let fields = codec::encode(&letter(
            "classify",
            &streams.inbound(),
            codec::encode(&sample_message(n, "x")),
        ));
        add_entry(&mut connection, &streams.dead(), &fields);
    }
    let hour = Some(std::time::Duration::from_secs(3600));
    let len = |connection: &mut Connection| -> u64 {
        redis::cmd("XLEN")
            .arg(streams.dead())
            .query(connection)
            .unwrap()
    };
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
    let ops = ops(&redis, "{botline}");
    let streams = Streams::default();
    let mut connection = redis.connection();
    let inbound = streams.inbound();
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
    let web = streams.outbound("web");
    for n in 0..300 {
        add_entry(&mut connection, &web, &codec::encode(&reply(n, "c1")));
    }
    group(&mut connection, &web, "egress");
    add_entry(
        &mut connection,
        &streams.delivered(),
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
    let in_line = by_stream(&dry, "in");
    assert_eq!(
        (in_line.below, in_line.keep_from.as_deref(), in_line.removed),
        (Some(300), Some(ids[300].as_str()), 0)
    );
    assert_eq!(by_stream(&dry, "out:web").below, Some(0));
    assert_eq!(
        by_stream(&dry, "delivered").below,
        None,
        "no group: left alone"
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
    let removed = by_stream(&done, "in").removed;
    assert!(removed > 0 && removed <= 300, "removed {removed}");
    let left: Vec<UnifiedMessage> = read_stream(&mut connection, &inbound);
    let first_left: usize = left[0].id.trim_start_matches('m').parse().unwrap();
    assert!(
        first_left <= 300,
        "m300 is pending with slow and must stay; first left: m{first_left}"
    );
    assert_eq!(len(&mut connection, &web), 300);
    assert_eq!(len(&mut connection, &streams.delivered()), 1);
}

// ---------------------------------------------------------------- the binary

fn botline(redis_url: &str, args: &[&str]) -> (i32, String, String) {
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
        &Streams::default().inbound(),
        &codec::encode(&sample_message(1, "hi")),
    );
    let nowhere = format!("redis://127.0.0.1:{}", botline_shared::testing::free_port());
    // (url, arguments, exit code, what stdout or stderr says)
    let cases: &[(&str, &[&str], i32, &str)] = &[
        (&url, &["status"], 0, "STREAM"),
        (&url, &["status", "--json"], 0, "\"stream\":\"in\""),
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
            "in: no group, left alone",
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
