//! respond through the shared runner against a real redis-server.

use botline_shared::codec;
use botline_shared::message::{
    ChatKind, ClassifiedMessage, Intent, Origin, Priority, Reply, Role, Turn,
};
use botline_shared::runner::Plumbing;
use botline_shared::streams::Streams;
use botline_shared::testing::{
    add_entry, partitioned_len, read_partitioned, read_stream, sample_message, wait_for,
    RedisServer,
};
use redis::Commands;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

fn classified(n: usize, chat: &str, text: &str, intent: &str) -> ClassifiedMessage {
    let mut message = sample_message(n, text);
    message.id = format!("m{n:03}");
    message.chat.id = chat.into();
    message.sender.id = "u0".into();
    ClassifiedMessage {
        message,
        priority: Priority::Normal,
        intent: Intent {
            name: intent.into(),
            confidence: 1.0,
        },
        audit: vec![],
        faq: None,
    }
}

/// The queue of web chat `chat`'s partition.
fn queue_of(streams: &Streams, chat: &str) -> String {
    streams.queue(streams.partition_of("web", chat))
}

const OVERLAY: &str = r#"
[runner]
block_ms = 100
[respond.templates.greeting]
en = "hi {sender_name}; before: [{previous_text}] turns={turns}"
zh = "你好 {sender_name}"
"#;

async fn start(
    redis: &RedisServer,
) -> (
    Plumbing,
    CancellationToken,
    tokio::task::JoinHandle<Result<(), botline_shared::Error>>,
) {
    let (settings, plumbing) = redis.plumbing(OVERLAY);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(respond::run(settings, plumbing.clone(), shutdown.clone()));
    (plumbing, shutdown, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_follow_the_conversation_and_groups_need_a_mention() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    let (plumbing, shutdown, task) = start(&redis).await;
    let streams = plumbing.streams.clone();
    let (a, b, g) = (
        queue_of(&streams, "a"),
        queue_of(&streams, "b"),
        queue_of(&streams, "g"),
    );

    add_entry(
        &mut connection,
        &a,
        &codec::encode(&classified(1, "a", "hello", "greeting")),
    );
    add_entry(
        &mut connection,
        &a,
        &codec::encode(&classified(2, "a", "hello again", "greeting")),
    );
    add_entry(
        &mut connection,
        &b,
        &codec::encode(&classified(3, "b", "你好", "greeting")),
    );
    add_entry(
        &mut connection,
        &b,
        &codec::encode(&classified(4, "b", "blah", "unknown")),
    );
    let mut group = classified(5, "g", "hello all", "greeting");
    group.message.chat.kind = ChatKind::Group;
    add_entry(&mut connection, &g, &codec::encode(&group));
    let mut mentioned = classified(6, "g", "hello bot", "greeting");
    mentioned.message.chat.kind = ChatKind::Group;
    mentioned.message.mentions.bot = true;
    add_entry(&mut connection, &g, &codec::encode(&mentioned));
    let mut from_bot = classified(7, "a", "hello", "greeting");
    from_bot.message.sender.is_bot = true;
    add_entry(&mut connection, &a, &codec::encode(&from_bot));
    let mut announcement = classified(8, "a", "Maintenance at 22:00", "unknown");
    announcement.message.origin = Origin::Scheduled {
        job: "notice".into(),
    };
    announcement.priority = Priority::Batch;
    // One queue for every priority: the batch message keeps its place in
    // its chat's order.
    add_entry(&mut connection, &a, &codec::encode(&announcement));

    wait_for("six replies", Duration::from_secs(20), || {
        partitioned_len(&mut connection, "out:web") == 6
    })
    .await;
    wait_for("all acknowledged", Duration::from_secs(20), || {
        [&a, &b, &g].iter().all(|queue| {
            let pending: redis::streams::StreamPendingReply =
                connection.xpending(*queue, "respond").unwrap();
            pending.count() == 0
        })
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let replies: Vec<Reply> = read_partitioned(&mut connection, "out:web");
    // Each in its chat's partition.
    for reply in &replies {
        let p = streams.partition_of("web", &reply.chat.id);
        let there: Vec<Reply> = read_stream(&mut connection, &streams.outbound(p, "web"));
        assert!(there.iter().any(|r| r.id == reply.id), "{reply:?}");
    }
    let text_for = |id: &str| {
        replies
            .iter()
            .find(|r| r.in_reply_to == id)
            .map(|r| r.text.clone())
    };
    assert_eq!(text_for("m001").unwrap(), "hi Ada; before: [] turns=0");
    assert_eq!(text_for("m002").unwrap(), "hi Ada; before: [hello] turns=2");
    assert_eq!(text_for("m003").unwrap(), "你好 Ada");
    assert!(
        text_for("m004").unwrap().starts_with("Sorry Ada"),
        "fallback"
    );
    assert_eq!(text_for("m005"), None, "group message without a mention");
    let group_reply = replies.iter().find(|r| r.in_reply_to == "m006").unwrap();
    assert_eq!(
        group_reply.mentions,
        vec!["u0".to_string()],
        "a group reply mentions the sender"
    );
    assert_eq!(text_for("m007"), None, "bots are not answered");
    assert_eq!(text_for("m008").unwrap(), "Maintenance at 22:00");

    let context: Vec<Turn> = read_stream(&mut connection, &streams.context("web", "a"));
    let roles: Vec<(Role, &str)> = context.iter().map(|t| (t.role, t.text.as_str())).collect();
    assert_eq!(
        roles,
        vec![
            (Role::User, "hello"),
            (Role::Bot, "hi Ada; before: [] turns=0"),
            (Role::User, "hello again"),
            (Role::Bot, "hi Ada; before: [hello] turns=2"),
            (Role::User, "hello"),
            (Role::Bot, "Maintenance at 22:00"),
        ]
    );
    let group_context: Vec<Turn> = read_stream(&mut connection, &streams.context("web", "g"));
    assert_eq!(
        group_context.len(),
        3,
        "the unmentioned group turn is still context"
    );
    let ttl: i64 = connection.pttl(streams.context("web", "a")).unwrap();
    assert!(ttl > 0 && ttl <= 1_800_000, "context expires: {ttl}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_template_is_named_at_start() {
    let redis = RedisServer::start();
    let refused = |overlay: &str| {
        let (settings, plumbing) = redis.plumbing(overlay);
        async move {
            respond::run(settings, plumbing, CancellationToken::new())
                .await
                .unwrap_err()
                .to_string()
        }
    };
    let error = refused("[respond.templates.thanks]\nen = \"hi {nme}\"\nzh = \"\"\n").await;
    assert!(
        error.starts_with("setting respond.templates.thanks.en: unknown variable {nme}"),
        "{error}"
    );
    // An image that is not an http(s) URL, in a template or an FAQ entry.
    let error =
        refused("[respond.templates.thanks]\nen = \"a\"\nzh = \"b\"\nimage = \"thanks.png\"\n")
            .await;
    assert_eq!(
        error,
        "setting respond.templates.thanks.image: \"thanks.png\" is not an http(s) URL"
    );
    let error = refused(
        "[[classify.faq]]\nquestion = \"q\"\nanswer = \"a\"\nimage = \"ftp://x.test/a.png\"\n",
    )
    .await;
    assert_eq!(
        error,
        "setting classify.faq[0].image: \"ftp://x.test/a.png\" is not an http(s) URL"
    );
}

/// Urgent is served first among what an owner has read ahead (its
/// `window`), and batch is not starved: one partition (so one queue holds
/// the whole backlog, in the order it came: normal, then batch, then
/// urgent), read in batches of 40.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn urgent_is_served_first_and_batch_is_not_starved() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    let (settings, plumbing) = redis.plumbing(
        "[runner]\nbatch_size = 40\nblock_ms = 100\nwindow = 1000\n[streams]\npartitions = 1\n",
    );
    let streams = plumbing.streams.clone();
    assert_eq!(streams.partitions(), 1);
    let queue = streams.queue(0);
    // A backlog of every priority before respond starts.
    for (priority, count) in [
        (Priority::Normal, 300),
        (Priority::Batch, 30),
        (Priority::Urgent, 30),
    ] {
        for n in 0..count {
            let mut message = classified(
                n,
                &format!("{}-{n}", priority.as_str()),
                "hello",
                "greeting",
            );
            message.message.id = format!("{}-{n}", priority.as_str());
            message.priority = priority;
            add_entry(&mut connection, &queue, &codec::encode(&message));
        }
    }
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(respond::run(settings, plumbing, shutdown.clone()));
    let out = streams.outbound(0, "web");
    wait_for("every reply", Duration::from_secs(30), || {
        connection.xlen::<_, usize>(&out).unwrap() == 360
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let order: Vec<String> = read_stream::<Reply>(&mut connection, &out)
        .into_iter()
        .map(|r| r.in_reply_to)
        .collect();
    let positions = |prefix: &str| -> Vec<usize> {
        order
            .iter()
            .enumerate()
            .filter(|(_, id)| id.starts_with(prefix))
            .map(|(i, _)| i)
            .collect()
    };
    let last_urgent = *positions("urgent-").last().unwrap();
    let first_batch = positions("batch-")[0];
    let last_normal = *positions("normal-").last().unwrap();
    // The urgent messages came last, behind 330 others: read within the
    // window, they overtake most of the normal backlog.
    assert!(
        last_urgent < 200,
        "urgent replies overtake the normal backlog, the last at {last_urgent}"
    );
    assert!(
        first_batch < 300,
        "batch gets its share before normal is done, first at {first_batch}"
    );
    assert!(
        last_normal > 300,
        "normal is not served before the others ({last_normal})"
    );
}
