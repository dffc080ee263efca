//! `botline migrate` (`Ops::migrate`) and the stages' start check
//! (`old_layout_left`) against a real redis-server: a previous release's
//! single-stream layout built by hand (entries acknowledged, pending,
//! undelivered, a stream without its group, a pending entry whose payload
//! is gone, garbage, a `sent:` marker and a sent part, a context, a web
//! transcript, order keys), migrated, and checked entry by entry.

use botline_shared::codec::{self, Fields};
use botline_shared::config::ProcessConfig;
use botline_shared::message::*;
use botline_shared::ops::{self, MigrateReport, Ops};
use botline_shared::redis_conn::{self, Pool};
use botline_shared::streams::Streams;
use botline_shared::testing::{add_entry, read_stream, sample_message, RedisServer};
use redis::Connection;
use std::collections::{BTreeMap, HashMap};

const OLD: &str = "{botline}";
const CHATS: usize = 5;

fn process(redis: &RedisServer) -> ProcessConfig {
    ProcessConfig::from_env(
        &[
            ("BOTLINE_REDIS_URL", redis.url().as_str()),
            ("BOTLINE_PREFIX", "botline"),
        ],
        "127.0.0.1:0",
    )
    .unwrap()
}

fn ops(redis: &RedisServer) -> Ops {
    Ops::connect(&process(redis)).unwrap()
}

fn pool(redis: &RedisServer) -> Pool {
    redis_conn::pool(&process(redis), 2).unwrap()
}

fn cmd<T: redis::FromRedisValue>(connection: &mut Connection, args: &[&str]) -> T {
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query(connection).unwrap()
}

fn old(name: &str) -> String {
    format!("{OLD}:{name}")
}

fn group(connection: &mut Connection, stream: &str, name: &str) {
    let _: () = cmd(connection, &["XGROUP", "CREATE", stream, name, "0"]);
}

/// `XREADGROUP … COUNT n … >`: the ids read (now pending).
fn read(connection: &mut Connection, stream: &str, name: &str, n: usize) -> Vec<String> {
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(name)
        .arg("old-consumer")
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

fn ack(connection: &mut Connection, stream: &str, name: &str, ids: &[String]) {
    let _: u64 = redis::cmd("XACK")
        .arg(stream)
        .arg(name)
        .arg(ids)
        .query(connection)
        .unwrap();
}

fn message(n: usize) -> UnifiedMessage {
    let mut message = sample_message(n, &format!("message {n}"));
    message.chat.id = format!("c{}", n % CHATS);
    message
}

fn classified(n: usize, priority: Priority) -> ClassifiedMessage {
    ClassifiedMessage {
        message: message(n),
        priority,
        intent: Intent {
            name: "question".into(),
            confidence: 1.0,
        },
        audit: vec![],
        faq: None,
    }
}

fn reply(n: usize, platform: &str) -> Reply {
    Reply {
        id: format!("r{n}"),
        in_reply_to: format!("m{n}"),
        platform: platform.into(),
        bot: "botline".into(),
        chat: Chat {
            id: format!("c{}", n % CHATS),
            kind: ChatKind::Direct,
        },
        thread: None,
        reply_to: None,
        text: format!("reply {n}"),
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

/// What the old layout owes, by record id, as built.
struct Owed {
    /// Message ids owed from `in`.
    inbound: Vec<String>,
    /// Message ids owed from the queues, in the order classify wrote them.
    queued: Vec<String>,
    /// Reply ids owed from `out:web`.
    replies: Vec<String>,
    /// Acknowledged ids (never to be moved).
    acknowledged: Vec<String>,
    /// The reply with a `sent:` marker, and the one with a sent part.
    sent: String,
    part: String,
    garbage_id: String,
}

/// The old layout, by hand.
fn build_old_layout(connection: &mut Connection) -> Owed {
    let mut acknowledged = Vec::new();
    // `in`: 20 messages over 5 chats, one garbage entry; 6 read, 3 of
    // them acknowledged; the rest undelivered.
    let inbound = old("in");
    let mut inbound_ids = Vec::new();
    let mut garbage_id = String::new();
    for n in 0..20 {
        add_entry(connection, &inbound, &codec::encode(&message(n)));
        if n == 10 {
            let garbage: Fields = vec![
                ("v".into(), b"1".to_vec()),
                ("body".into(), b"\xc1 not msgpack".to_vec()),
            ];
            garbage_id = add_entry(connection, &inbound, &garbage);
        }
    }
    group(connection, &inbound, "classify");
    let read_ids = read(connection, &inbound, "classify", 6);
    ack(connection, &inbound, "classify", &read_ids[..3]);
    for n in 0..20 {
        let id = format!("m{n}");
        if n < 3 {
            acknowledged.push(id);
        } else {
            inbound_ids.push(id);
        }
    }

    // The queues: messages 100.. classified in order into three queues by
    // n % 3. urgent: 2 read and acknowledged, 2 read and pending (one of
    // them deleted since); normal: 3 read, 1 acknowledged; batch: no group.
    let mut queued = Vec::new();
    let mut ids_of: HashMap<&str, Vec<(String, String)>> = HashMap::new();
    for n in 100..130 {
        let (name, priority) = match n % 3 {
            0 => ("q:urgent", Priority::Urgent),
            1 => ("q:normal", Priority::Normal),
            _ => ("q:batch", Priority::Batch),
        };
        let id = add_entry(
            connection,
            &old(name),
            &codec::encode(&classified(n, priority)),
        );
        ids_of.entry(name).or_default().push((id, format!("m{n}")));
        queued.push(format!("m{n}"));
    }
    let urgent = old("q:urgent");
    group(connection, &urgent, "respond");
    let read_ids = read(connection, &urgent, "respond", 4);
    ack(connection, &urgent, "respond", &read_ids[..2]);
    let _: u64 = cmd(connection, &["XDEL", &urgent, &read_ids[3]]);
    let normal = old("q:normal");
    group(connection, &normal, "respond");
    let read_ids = read(connection, &normal, "respond", 3);
    ack(connection, &normal, "respond", &read_ids[..1]);
    let not_owed: Vec<String> = ids_of["q:urgent"][..2]
        .iter()
        .chain(&ids_of["q:urgent"][3..4])
        .chain(&ids_of["q:normal"][..1])
        .map(|(_, message)| message.clone())
        .collect();
    queued.retain(|id| !not_owed.contains(id));
    acknowledged.extend(not_owed);

    // `out:web`: 8 replies, 3 read, 1 acknowledged; the second (read, not
    // acknowledged) was delivered: its `sent:` marker; the third had its
    // first part sent. `out:slack`: everything acknowledged.
    let out = old("out:web");
    for n in 0..8 {
        add_entry(connection, &out, &codec::encode(&reply(n, "web")));
    }
    group(connection, &out, "egress");
    let read_ids = read(connection, &out, "egress", 3);
    ack(connection, &out, "egress", &read_ids[..1]);
    acknowledged.push("r0".into());
    let replies: Vec<String> = (1..8).map(|n| format!("r{n}")).collect();
    let _: () = cmd(connection, &["SET", &old("sent:r1"), "1", "PX", "600000"]);
    let _: () = cmd(
        connection,
        &["SET", &old("sent:r2:part:0"), "pm-1", "PX", "600000"],
    );
    let slack = old("out:slack");
    for n in 50..52 {
        add_entry(connection, &slack, &codec::encode(&reply(n, "slack")));
    }
    group(connection, &slack, "egress");
    let read_ids = read(connection, &slack, "egress", 2);
    ack(connection, &slack, "egress", &read_ids);
    acknowledged.extend(["r50".to_string(), "r51".to_string()]);

    // A context, a web transcript, order keys, old dead letters.
    for n in 0..3 {
        let turn = Turn::from_user(&message(n * CHATS + 1));
        add_entry(connection, &old("ctx:web:c1"), &codec::encode(&turn));
    }
    let _: i64 = cmd(connection, &["PEXPIRE", &old("ctx:web:c1"), "900000"]);
    for n in 0..2 {
        let turn = Turn::from_user(&message(n * CHATS + 2));
        add_entry(connection, &old("web:c2"), &codec::encode(&turn));
    }
    let _: i64 = cmd(connection, &["ZADD", &old("order:in:web:c1"), "1", "x"]);
    let _: i64 = cmd(connection, &["RPUSH", &old("order:queue:web:c1"), "x"]);
    add_entry(connection, &old("dead"), &[("v".into(), b"1".to_vec())]);
    Owed {
        inbound: inbound_ids,
        queued,
        replies,
        acknowledged,
        sent: "r1".into(),
        part: "r2".into(),
        garbage_id,
    }
}

/// Every key with its type and contents, for "changed nothing".
fn snapshot(connection: &mut Connection) -> BTreeMap<String, String> {
    let keys: Vec<String> = cmd(connection, &["KEYS", "*"]);
    keys.into_iter()
        .map(|key| {
            let kind: String = cmd(connection, &["TYPE", &key]);
            let contents = match kind.as_str() {
                "stream" => {
                    let entries: redis::Value = cmd(connection, &["XRANGE", &key, "-", "+"]);
                    let groups: redis::Value = cmd(connection, &["XINFO", "GROUPS", &key]);
                    format!("{entries:?} {groups:?}")
                }
                "string" => cmd::<String>(connection, &["GET", &key]),
                other => other.to_string(),
            };
            (key, format!("{kind} {contents}"))
        })
        .collect()
}

/// Every entry of stream `name` over the partitions: (partition, record).
fn per_partition<R: codec::Record>(connection: &mut Connection, name: &str) -> Vec<(u32, R)> {
    let streams = Streams::default();
    streams
        .all()
        .flat_map(|p| {
            let key = format!("{{botline:p{p}}}:{name}");
            read_stream::<R>(connection, &key)
                .into_iter()
                .map(move |record| (p, record))
                .collect::<Vec<_>>()
        })
        .collect()
}

fn check_report(report: &MigrateReport, owed: &Owed) {
    let moved = |key: &str| {
        report
            .old_streams
            .iter()
            .find(|stream| stream.stream == key)
            .unwrap_or_else(|| panic!("{key} in {report:?}"))
            .clone()
    };
    let inbound = moved(&old("in"));
    assert_eq!(inbound.moved, owed.inbound.len() as u64 + 1, "{report:?}");
    assert_eq!((inbound.pending, inbound.dead), (3, 1));
    let urgent = moved(&old("q:urgent"));
    assert_eq!((urgent.pending, urgent.gone), (2, 1));
    let queues: u64 = ["q:urgent", "q:normal", "q:batch"]
        .iter()
        .map(|name| moved(&old(name)).moved)
        .sum();
    assert_eq!(queues, owed.queued.len() as u64);
    assert_eq!(
        moved(&old("q:batch")).undelivered,
        10,
        "no group: every entry"
    );
    assert_eq!(moved(&old("out:web")).moved, owed.replies.len() as u64);
    assert_eq!(moved(&old("out:slack")).moved, 0);
    assert!(report.old_streams.iter().all(|stream| stream.deleted));
    assert_eq!(
        report.moved(),
        (owed.inbound.len() + 1 + owed.queued.len() + owed.replies.len()) as u64
    );
    let added: u64 = report.new_streams.iter().map(|(_, n)| n).sum();
    assert_eq!(added, report.moved());
    assert_eq!((report.contexts, report.context_turns), (1, 3));
    assert_eq!((report.transcripts, report.transcript_entries), (1, 2));
    assert_eq!(report.sent_markers, 2);
    assert_eq!(report.dead, 1);
    assert_eq!(report.order_keys, 2);
    assert_eq!(report.left_alone, vec![(old("dead"), 1)]);
}

#[tokio::test]
async fn the_old_layout_moves_into_the_partitions_once_in_order() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    let owed = build_old_layout(&mut connection);
    let ops = ops(&redis);
    let pool = pool(&redis);
    let streams = Streams::default();

    // The start check names what is left.
    let left = ops::old_layout_left(&pool, "botline")
        .await
        .unwrap()
        .expect("the old layout holds unfinished entries");
    let total = owed.inbound.len() + 1 + owed.queued.len() + 1 + owed.replies.len();
    assert!(
        left.contains(&format!("still hold {total} unfinished entries")),
        "{left}"
    );
    assert!(left.contains("{botline}:in 18"), "{left}");
    assert!(!left.contains("out:slack"), "{left}");
    let refused = ops::refuse_old_layout(&pool, "botline")
        .await
        .unwrap_err()
        .to_string();
    assert!(refused.starts_with("setting BOTLINE_PREFIX: "), "{refused}");
    assert!(refused.contains("run `botline migrate`"), "{refused}");
    // Another deployment's prefix has no old layout.
    assert_eq!(ops::old_layout_left(&pool, "other").await.unwrap(), None);

    // A dry run counts and changes nothing.
    let before = snapshot(&mut connection);
    let dry = ops.migrate(true, None).await.unwrap();
    assert!(dry.dry_run);
    check_report(&dry, &owed);
    assert_eq!(
        snapshot(&mut connection),
        before,
        "a dry run changes nothing"
    );
    let table = ops::migrate_table(&dry);
    assert!(table.contains("would move"), "{table}");

    let report = ops.migrate(false, None).await.unwrap();
    check_report(&report, &owed);
    assert_eq!(
        report.new_streams, dry.new_streams,
        "the dry run counted right"
    );

    // Every unfinished message once, in its chat's partition, in order.
    let inbound: Vec<(u32, UnifiedMessage)> = per_partition(&mut connection, "in");
    let mut ids: Vec<String> = inbound.iter().map(|(_, m)| m.id.clone()).collect();
    for (p, message) in &inbound {
        assert_eq!(
            *p,
            streams.partition_of("web", &message.chat.id),
            "{}",
            message.id
        );
    }
    ids.sort();
    let mut expected = owed.inbound.clone();
    expected.sort();
    assert_eq!(ids, expected, "each unfinished message of in, once");
    check_chat_order(inbound.iter().map(|(_, m)| m), &owed.inbound);

    let queued: Vec<(u32, ClassifiedMessage)> = per_partition(&mut connection, "q");
    for (p, classified) in &queued {
        let message = &classified.message;
        assert_eq!(*p, streams.partition_of("web", &message.chat.id));
    }
    let mut ids: Vec<String> = queued.iter().map(|(_, c)| c.message.id.clone()).collect();
    ids.sort();
    let mut expected = owed.queued.clone();
    expected.sort();
    assert_eq!(ids, expected, "each unfinished classified message, once");
    check_chat_order(queued.iter().map(|(_, c)| &c.message), &owed.queued);

    let replies: Vec<(u32, Reply)> = per_partition(&mut connection, "out:web");
    let mut ids: Vec<String> = replies.iter().map(|(_, r)| r.id.clone()).collect();
    for (p, reply) in &replies {
        assert_eq!(*p, streams.partition_of("web", &reply.chat.id));
    }
    ids.sort();
    assert_eq!(ids, owed.replies);
    assert!(per_partition::<Reply>(&mut connection, "out:slack").is_empty());
    for acknowledged in &owed.acknowledged {
        assert!(!ids.contains(acknowledged));
    }

    // The sent marker and the sent part, with their TTL.
    let p = streams.partition_of("web", "c1");
    let sent = streams.sent(p, &owed.sent);
    assert_eq!(cmd::<String>(&mut connection, &["GET", &sent]), "1");
    let ttl: i64 = cmd(&mut connection, &["PTTL", &sent]);
    assert!(ttl > 500_000 && ttl <= 600_000, "{ttl}");
    let p = streams.partition_of("web", "c2");
    let part = streams.sent_part(p, &owed.part, 0);
    assert_eq!(cmd::<String>(&mut connection, &["GET", &part]), "pm-1");
    assert!(cmd::<i64>(&mut connection, &["PTTL", &part]) > 500_000);

    // The garbage entry, a dead letter in partition 0, requeueable there.
    let dead: Vec<DeadLetter> = read_stream(&mut connection, &streams.dead(0));
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert_eq!(dead[0].stage, "migrate");
    assert_eq!(dead[0].stream, streams.inbound(0));
    assert_eq!(dead[0].entry_id, owed.garbage_id);
    assert!(
        dead[0].error.contains("does not decode"),
        "{}",
        dead[0].error
    );
    assert!(dead[0].error.contains("{botline}:in"), "{}", dead[0].error);

    // The context and the transcript, with their ids and TTL.
    let old_turns = 3;
    let context = streams.context("web", "c1");
    let turns: Vec<Turn> = read_stream(&mut connection, &context);
    assert_eq!(turns.len(), old_turns);
    assert_eq!(turns[0].message_id, "m1");
    assert!(cmd::<i64>(&mut connection, &["PTTL", &context]) > 800_000);
    let transcript: Vec<Turn> = read_stream(&mut connection, &streams.transcript("c2"));
    assert_eq!(transcript.len(), 2);

    // The old keys are gone but the dead letters, left alone.
    let keys: Vec<String> = cmd(&mut connection, &["KEYS", "{botline}:*"]);
    let mut keys: Vec<String> = keys
        .into_iter()
        .filter(|key| !key.starts_with("{botline}:sent:"))
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            "{botline}:dead".to_string(),
            "{botline}:partitions".to_string()
        ]
    );
    assert_eq!(
        cmd::<String>(&mut connection, &["GET", "{botline}:partitions"]),
        Streams::default().partitions().to_string()
    );

    // The start check passes; a second run moves nothing.
    assert_eq!(ops::old_layout_left(&pool, "botline").await.unwrap(), None);
    ops::refuse_old_layout(&pool, "botline").await.unwrap();
    let before = snapshot(&mut connection);
    let again = ops.migrate(false, None).await.unwrap();
    assert_eq!(again.moved(), 0, "{again:?}");
    assert!(again.old_streams.is_empty(), "{again:?}");
    assert_eq!(
        (again.contexts, again.transcripts, again.sent_markers),
        (0, 0, 0)
    );
    assert_eq!(again.order_keys, 0);
    assert_eq!(
        snapshot(&mut connection),
        before,
        "a second run changes nothing"
    );
}

/// Each chat's messages among `records` come in the order of `written`.
fn check_chat_order<'a>(records: impl Iterator<Item = &'a UnifiedMessage>, written: &[String]) {
    let position: HashMap<&str, usize> = written
        .iter()
        .enumerate()
        .map(|(i, id)| (id.as_str(), i))
        .collect();
    let mut per_chat: HashMap<String, Vec<usize>> = HashMap::new();
    for message in records {
        per_chat
            .entry(message.chat.id.clone())
            .or_default()
            .push(position[message.id.as_str()]);
    }
    assert!(per_chat.len() > 1);
    for (chat, order) in per_chat {
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "chat {chat} out of order");
    }
}

/// A rerun after a partial move (a crash after some batches, simulated by
/// moving part of a stream by hand the way migrate does: new entry added,
/// old one acknowledged and deleted) moves only the rest; entries that
/// arrive after a group's last read are found too.
#[tokio::test]
async fn a_rerun_moves_only_what_is_left() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    let inbound = old("in");
    let ids: Vec<String> = (0..600)
        .map(|n| add_entry(&mut connection, &inbound, &codec::encode(&message(n))))
        .collect();
    group(&mut connection, &inbound, "classify");
    read(&mut connection, &inbound, "classify", 250);
    let ops = ops(&redis);
    // Of 600, 250 pending and 350 undelivered: more than one batch of each.
    let report = ops.migrate(false, None).await.unwrap();
    assert_eq!(report.moved(), 600);
    assert_eq!(report.old_streams[0].pending, 250);
    assert_eq!(report.old_streams[0].undelivered, 350);
    let moved: Vec<(u32, UnifiedMessage)> = per_partition(&mut connection, "in");
    assert_eq!(moved.len(), 600);
    let written: Vec<String> = (0..600).map(|n| format!("m{n}")).collect();
    check_chat_order(moved.iter().map(|(_, m)| m), &written);
    assert_eq!(cmd::<u64>(&mut connection, &["EXISTS", &inbound]), 0);
    drop(ids);

    // An old stream the group has partly finished, half moved already.
    for n in 600..610 {
        add_entry(&mut connection, &inbound, &codec::encode(&message(n)));
    }
    group(&mut connection, &inbound, "classify");
    let read_ids = read(&mut connection, &inbound, "classify", 4);
    let _: u64 = cmd(
        &mut connection,
        &["XACK", &inbound, "classify", &read_ids[0]],
    );
    // Entry 1 "moved" by an interrupted run.
    let _: u64 = cmd(
        &mut connection,
        &["XACK", &inbound, "classify", &read_ids[1]],
    );
    let _: u64 = cmd(&mut connection, &["XDEL", &inbound, &read_ids[1]]);
    let report = ops.migrate(false, None).await.unwrap();
    assert_eq!(report.moved(), 8, "{report:?}");
    assert_eq!(report.old_streams[0].pending, 2);
    assert_eq!(report.old_streams[0].undelivered, 6);
    assert_eq!(
        per_partition::<UnifiedMessage>(&mut connection, "in").len(),
        608
    );
    assert_eq!(
        ops::old_layout_left(&pool(&redis), "botline")
            .await
            .unwrap(),
        None
    );
}

/// The `botline migrate` binary: a dry run, the run, the report printed.
#[tokio::test]
async fn the_cli_migrates_and_reports() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    for n in 0..4 {
        add_entry(&mut connection, &old("in"), &codec::encode(&message(n)));
    }
    let run = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_botline"))
            .args(args)
            .env("BOTLINE_REDIS_URL", redis.url())
            .env_remove("BOTLINE_PREFIX")
            .env_remove("BOTLINE_CONFIG")
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        String::from_utf8(output.stdout).unwrap()
    };
    let dry = run(&["migrate", "--dry-run"]);
    assert!(dry.contains("dry run: nothing changed"), "{dry}");
    assert!(dry.contains("would move 4 unfinished entries"), "{dry}");
    assert_eq!(cmd::<u64>(&mut connection, &["XLEN", &old("in")]), 4);
    let done = run(&["migrate"]);
    assert!(done.contains("moved 4 unfinished entries"), "{done}");
    assert!(
        done.contains(
            "{botline}:in (group classify): 0 pending, 4 undelivered; moved 4; stream deleted"
        ),
        "{done}"
    );
    assert_eq!(cmd::<u64>(&mut connection, &["EXISTS", &old("in")]), 0);
    let again = run(&["migrate"]);
    assert!(again.contains("moved 0 unfinished entries"), "{again}");
}
