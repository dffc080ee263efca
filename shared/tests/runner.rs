//! The runner against a real redis-server, with toy stages: entries that
//! keep failing end in `dead` after `max_deliveries`, and trimming never
//! removes what a group still needs.

use botline_shared::codec;
use botline_shared::lease::trim_stream;
use botline_shared::message::{DeadLetter, Turn, UnifiedMessage};
use botline_shared::runner::{self, Envelope, Input, Outcome, Plumbing, Stage, Write};
use botline_shared::testing::{add_entry, read_stream, sample_message, wait_for, RedisServer};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Fails every entry whose text is "fail"; turns the others into a Turn on `out`.
struct Toy {
    input: String,
    output: String,
    handled: Arc<AtomicUsize>,
}

impl Stage for Toy {
    type In = UnifiedMessage;

    fn group(&self) -> &'static str {
        "toy"
    }

    fn inputs(&self) -> Vec<Input> {
        vec![Input {
            stream: self.input.clone(),
            weight: 1,
        }]
    }

    async fn handle(&self, batch: Vec<Envelope<UnifiedMessage>>) -> Vec<Outcome> {
        self.handled.fetch_add(batch.len(), Ordering::SeqCst);
        batch
            .into_iter()
            .map(|envelope| match envelope.record.text.as_str() {
                "fail" => Outcome::Retry(format!("refused on delivery {}", envelope.deliveries)),
                _ => Outcome::Done(vec![Write::add(
                    &self.output,
                    &Turn::from_user(&envelope.record),
                )]),
            })
            .collect()
    }
}

fn plumbing(redis: &RedisServer, overlay: &str) -> Plumbing {
    redis.plumbing(overlay).1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_keeps_failing_goes_to_dead_after_max_deliveries() {
    let redis = RedisServer::start();
    let plumbing = plumbing(
        &redis,
        "[runner]\nblock_ms = 50\nclaim_idle_ms = 100\nclaim_interval_ms = 50\nmax_deliveries = 3\n",
    );
    let streams = plumbing.streams.clone();
    let mut connection = redis.connection();
    add_entry(
        &mut connection,
        "toy:in",
        &codec::encode(&sample_message(1, "fail")),
    );
    add_entry(
        &mut connection,
        "toy:in",
        &codec::encode(&sample_message(2, "fine")),
    );
    let handled = Arc::new(AtomicUsize::new(0));
    let stage = Toy {
        input: "toy:in".into(),
        output: "toy:out".into(),
        handled: handled.clone(),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(runner::run(stage, plumbing, shutdown.clone()));

    wait_for("the failing entry in dead", Duration::from_secs(20), || {
        !read_stream::<DeadLetter>(&mut connection, &streams.dead()).is_empty()
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    let dead: Vec<DeadLetter> = read_stream(&mut connection, &streams.dead());
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].error,
        "delivered 4 times (max 3) without being acknowledged"
    );
    assert_eq!(dead[0].deliveries, 4);
    let original: UnifiedMessage = codec::decode(
        dead[0]
            .fields
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice())),
    )
    .unwrap();
    assert_eq!(
        original.text, "fail",
        "the dead letter keeps the entry as it was"
    );
    let out: Vec<Turn> = read_stream(&mut connection, "toy:out");
    assert_eq!(out.len(), 1, "the good entry went through once");
    assert_eq!(
        handled.load(Ordering::SeqCst),
        4,
        "three tries of the bad entry, one of the good"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_keeps_what_any_group_still_needs() {
    let redis = RedisServer::start();
    let plumbing = plumbing(&redis, "");
    let mut connection = redis.connection();
    // Enough entries for several stream nodes: `XTRIM MINID ~` removes whole nodes only.
    let ids: Vec<String> = (0..500)
        .map(|n| {
            add_entry(
                &mut connection,
                "trim:in",
                &codec::encode(&sample_message(n, "x")),
            )
        })
        .collect();
    for group in ["fast", "slow"] {
        redis::cmd("XGROUP")
            .arg("CREATE")
            .arg("trim:in")
            .arg(group)
            .arg("0")
            .query::<()>(&mut connection)
            .unwrap();
    }
    let read = |connection: &mut redis::Connection, group: &str, count: usize| {
        redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(group)
            .arg("c")
            .arg("COUNT")
            .arg(count)
            .arg("STREAMS")
            .arg("trim:in")
            .arg(">")
            .query::<redis::Value>(connection)
            .unwrap();
    };
    // fast has read and acknowledged everything; slow has read 350, acknowledged 300.
    read(&mut connection, "fast", 500);
    redis::cmd("XACK")
        .arg("trim:in")
        .arg("fast")
        .arg(&ids)
        .query::<()>(&mut connection)
        .unwrap();
    read(&mut connection, "slow", 350);
    redis::cmd("XACK")
        .arg("trim:in")
        .arg("slow")
        .arg(&ids[..300])
        .query::<()>(&mut connection)
        .unwrap();

    // A long retention window keeps everything.
    assert_eq!(
        trim_stream(&plumbing.pool, "trim:in", 3_600_000)
            .await
            .unwrap(),
        0
    );
    // Without one, only what both groups have acknowledged may go: m0..m299.
    let trimmed = trim_stream(&plumbing.pool, "trim:in", 0).await.unwrap();
    assert!(trimmed > 0, "acknowledged entries are trimmed");
    let left: Vec<UnifiedMessage> = read_stream(&mut connection, "trim:in");
    let first_left: usize = left[0].id.trim_start_matches('m').parse().unwrap();
    assert_eq!(first_left, 500 - left.len());
    assert!(
        first_left <= 300,
        "m300 is pending with slow and must stay; first left: m{first_left}"
    );
    assert_eq!(left.last().unwrap().id, "m499");
}

/// Sends each message to the queue its text names, behind its chat's
/// earlier unfinished messages (`Write::AddToLane`).
struct Lanes;

const QUEUES: [&str; 2] = ["lanes:q:urgent", "lanes:q:normal"];

impl Stage for Lanes {
    type In = UnifiedMessage;

    fn group(&self) -> &'static str {
        "lanes"
    }

    fn inputs(&self) -> Vec<Input> {
        vec![Input {
            stream: "lanes:in".into(),
            weight: 1,
        }]
    }

    async fn handle(&self, batch: Vec<Envelope<UnifiedMessage>>) -> Vec<Outcome> {
        batch
            .into_iter()
            .map(|envelope| {
                let message = envelope.record;
                let chat = &message.chat.id;
                Outcome::Done(vec![Write::AddToLane {
                    stream: format!("lanes:q:{}", message.text),
                    fields: codec::encode(&message),
                    order: format!("lanes:order:{chat}"),
                    member: message.id.clone(),
                    lane: format!("lanes:queue:{chat}"),
                    lane_ttl: Duration::from_secs(60),
                    streams: QUEUES.map(String::from).to_vec(),
                }])
            })
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_s_later_message_goes_to_the_queue_of_its_earlier_unfinished_ones() {
    let redis = RedisServer::start();
    let plumbing = plumbing(&redis, "[runner]\nblock_ms = 50\n");
    let mut connection = redis.connection();
    // Chat c1: m1 and m4 unfinished, in that order. Chat c2: m2 unfinished,
    // and a remembered queue that is not one of the stage's.
    for (chat, member, score) in [("c1", "m1", 1), ("c1", "m4", 4), ("c2", "m2", 2)] {
        let _: () = redis::cmd("ZADD")
            .arg(format!("lanes:order:{chat}"))
            .arg(score)
            .arg(member)
            .query(&mut connection)
            .unwrap();
    }
    let _: () = redis::cmd("ZADD")
        .arg("lanes:order:c2")
        .arg(5)
        .arg("m5")
        .query(&mut connection)
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("lanes:queue:c2")
        .arg("lanes:q:elsewhere")
        .query(&mut connection)
        .unwrap();
    // m1 normal; m4 urgent behind it; m7 (c1, in no set) urgent; m5 urgent.
    for (n, queue) in [(1, "normal"), (4, "urgent"), (7, "urgent"), (5, "urgent")] {
        add_entry(
            &mut connection,
            "lanes:in",
            &codec::encode(&sample_message(n, queue)),
        );
    }
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(runner::run(Lanes, plumbing, shutdown.clone()));
    let ids = |connection: &mut redis::Connection, queue: &str| -> Vec<String> {
        read_stream::<UnifiedMessage>(connection, queue)
            .into_iter()
            .map(|m| m.id)
            .collect()
    };
    wait_for("four messages queued", Duration::from_secs(20), || {
        QUEUES
            .iter()
            .map(|q| ids(&mut connection, q).len())
            .sum::<usize>()
            == 4
    })
    .await;
    shutdown.cancel();
    task.await.unwrap().unwrap();

    assert_eq!(
        ids(&mut connection, "lanes:q:normal"),
        vec!["m1", "m4"],
        "m4 follows m1, which is still unfinished, into its queue"
    );
    assert_eq!(
        ids(&mut connection, "lanes:q:urgent"),
        vec!["m7", "m5"],
        "m7 is in no order set; m5's remembered queue is not one of the stage's"
    );
    let lane: String = redis::cmd("GET")
        .arg("lanes:queue:c1")
        .query(&mut connection)
        .unwrap();
    assert_eq!(
        lane, "lanes:q:urgent",
        "the queue c1's last message went to"
    );
}
