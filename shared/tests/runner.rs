//! The runner against a real redis-server, with a toy stage: outputs are
//! written with the acknowledgement; entries that keep failing, do not
//! decode or are refused end in their partition's `dead`; consumers split
//! the partitions, one owner each, and hand them over on stop; a chat's
//! messages are handled one at a time and in order, chats concurrently; a
//! consumer that lost its partition writes nothing; trimming never removes
//! what a group still needs.

use botline_shared::codec;
use botline_shared::lease::trim_stream;
use botline_shared::message::{DeadLetter, UnifiedMessage};
use botline_shared::runner::{self, Envelope, Fence, Outcome, Plumbing, Stage, Write};
use botline_shared::streams::{Partition, Streams};
use botline_shared::testing::{
    add_entry, read_partitioned, read_stream, sample_message, wait_for, RedisServer,
};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const GROUP: &str = "toy";
/// Short leases (and the default 48 partitions: 24/24, 16/16/16).
const FAST: &str = "[runner]\nlease_ttl_ms = 1500\nblock_ms = 200\nretry_ms = 100\n";

/// What the toy stages saw, shared by every consumer of a test.
#[derive(Clone, Default)]
struct Log {
    /// (consumer, message id), in the order handled.
    handled: Arc<Mutex<Vec<(String, String)>>>,
    /// Chats with a consumer right now.
    chats: Arc<Mutex<HashSet<String>>>,
    /// Partitions with a consumer right now: who, and how many runs.
    partitions: Arc<Mutex<HashMap<Partition, (String, usize)>>>,
    /// Most chats handled at once.
    most_at_once: Arc<AtomicUsize>,
    violations: Arc<Mutex<Vec<String>>>,
}

impl Log {
    fn handled(&self) -> Vec<(String, String)> {
        self.handled.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.handled.lock().unwrap().len()
    }

    fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }
}

/// Forwards each message to its partition's `q`; "fail" is left for a
/// retry, "refuse" goes to dead. Each message takes `delay`; while `gate`
/// is shut, messages wait for it.
struct Toy {
    name: String,
    log: Log,
    delay: Duration,
    max_in_flight: usize,
    max_run: usize,
    gate: Arc<AtomicBool>,
}

impl Toy {
    fn new(name: &str, log: &Log) -> Self {
        Toy {
            name: name.into(),
            log: log.clone(),
            delay: Duration::ZERO,
            max_in_flight: 64,
            max_run: usize::MAX,
            gate: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl Stage for Toy {
    type In = UnifiedMessage;
    type Prepared = ();

    fn group(&self) -> &'static str {
        GROUP
    }

    fn inputs(&self, streams: &Streams, p: Partition) -> Vec<String> {
        vec![streams.inbound(p)]
    }

    fn chat(&self, record: &UnifiedMessage) -> String {
        record.chat.id.clone()
    }

    fn max_run(&self, _head: &UnifiedMessage) -> usize {
        self.max_run
    }

    fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    async fn prepare(&self, _fence: &Fence, _batch: &[Envelope<UnifiedMessage>]) {}

    async fn handle_chat(&self, _prepared: &(), run: &[Envelope<UnifiedMessage>]) -> Vec<Outcome> {
        let chat = run[0].record.chat.id.clone();
        let p = run[0].partition;
        {
            let mut chats = self.log.chats.lock().unwrap();
            if !chats.insert(chat.clone()) {
                self.log
                    .violations
                    .lock()
                    .unwrap()
                    .push(format!("chat {chat} handled twice at once"));
            }
            self.log
                .most_at_once
                .fetch_max(chats.len(), Ordering::SeqCst);
            let mut partitions = self.log.partitions.lock().unwrap();
            let (owner, runs) = partitions.entry(p).or_insert((self.name.clone(), 0));
            if *owner != self.name {
                self.log.violations.lock().unwrap().push(format!(
                    "partition {p} handled by {owner} and {} at once",
                    self.name
                ));
            }
            *runs += 1;
        }
        let mut outcomes = Vec::new();
        for envelope in run {
            if envelope.record.chat.id != chat || envelope.partition != p {
                self.log
                    .violations
                    .lock()
                    .unwrap()
                    .push(format!("a run mixes chats: {}", envelope.entry_id));
            }
            while !self.gate.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            self.log
                .handled
                .lock()
                .unwrap()
                .push((self.name.clone(), envelope.record.id.clone()));
            if !self.delay.is_zero() {
                tokio::time::sleep(self.delay).await;
            }
            outcomes.push(match envelope.record.text.as_str() {
                "fail" => Outcome::Retry(format!("refused on delivery {}", envelope.deliveries)),
                "refuse" => Outcome::Dead("refused".into()),
                _ => Outcome::Done(vec![Write::add(
                    Streams::default().queue(envelope.partition),
                    &envelope.record,
                )]),
            });
        }
        self.log.chats.lock().unwrap().remove(&chat);
        let mut partitions = self.log.partitions.lock().unwrap();
        if let Some((_, runs)) = partitions.get_mut(&p) {
            *runs -= 1;
            if *runs == 0 {
                partitions.remove(&p);
            }
        }
        outcomes
    }
}

fn plumbing(redis: &RedisServer, overlay: &str, consumer: &str) -> Plumbing {
    let mut plumbing = redis.plumbing(overlay).1;
    plumbing.consumer = Some(consumer.into());
    plumbing
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), botline_shared::Error>>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

fn start(redis: &RedisServer, overlay: &str, stage: Toy) -> Running {
    botline_shared::telemetry::init_tracing(botline_shared::config::LogFormat::Text);
    let plumbing = plumbing(redis, overlay, &stage.name.clone());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(runner::run(stage, plumbing, shutdown.clone()));
    Running { shutdown, task }
}

/// Each partition's owner for the toy group.
fn owners(connection: &mut redis::Connection) -> Vec<Option<String>> {
    let streams = Streams::default();
    streams
        .all()
        .map(|p| {
            redis::cmd("GET")
                .arg(streams.owner(p, GROUP))
                .query(connection)
                .unwrap()
        })
        .collect()
}

fn owned_by(owners: &[Option<String>], name: &str) -> usize {
    owners.iter().filter(|o| o.as_deref() == Some(name)).count()
}

/// Add message `n` (chat `c{n % 3}`) with `text` to its chat's partition's `in`.
fn add(connection: &mut redis::Connection, n: usize, text: &str) -> String {
    let message = sample_message(n, text);
    let streams = Streams::default();
    let input = streams.inbound(streams.partition_of("web", &message.chat.id));
    add_entry(connection, &input, &codec::encode(&message))
}

fn ids(messages: &[UnifiedMessage]) -> Vec<String> {
    messages.iter().map(|m| m.id.clone()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_are_written_with_the_acknowledgement() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    for n in 0..9 {
        add(&mut connection, n, "fine");
    }
    let log = Log::default();
    let running = start(&redis, FAST, Toy::new("a", &log));
    wait_for("nine outputs", Duration::from_secs(20), || {
        read_partitioned::<UnifiedMessage>(&mut connection, "q").len() == 9
    })
    .await;
    running.stop().await;
    let streams = Streams::default();
    for p in streams.all() {
        let pending: redis::Value = redis::cmd("XPENDING")
            .arg(streams.inbound(p))
            .arg(GROUP)
            .query(&mut connection)
            .unwrap();
        match pending {
            redis::Value::Array(parts) => {
                assert_eq!(parts[0], redis::Value::Int(0), "partition {p}")
            }
            other => panic!("{other:?}"),
        }
    }
    let mut out = ids(&read_partitioned::<UnifiedMessage>(&mut connection, "q"));
    out.sort();
    let mut expected: Vec<String> = (0..9).map(|n| format!("m{n}")).collect();
    expected.sort();
    assert_eq!(out, expected, "each once");
    assert_eq!(log.count(), 9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_that_keeps_failing_goes_to_dead_after_max_deliveries() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    // Chat c1 and c2: the failing one holds only its own chat up.
    add(&mut connection, 1, "fail");
    add(&mut connection, 2, "fine");
    add(&mut connection, 4, "fine");
    let log = Log::default();
    let running = start(
        &redis,
        &format!("{FAST}max_deliveries = 3\n"),
        Toy::new("a", &log),
    );
    let streams = Streams::default();
    let dead_of = streams.dead(streams.partition_of("web", "c1"));
    wait_for("the failing entry in dead", Duration::from_secs(20), || {
        !read_stream::<DeadLetter>(&mut connection, &dead_of).is_empty()
    })
    .await;
    wait_for("m4 after it", Duration::from_secs(20), || {
        read_partitioned::<UnifiedMessage>(&mut connection, "q").len() == 2
    })
    .await;
    running.stop().await;

    let dead: Vec<DeadLetter> = read_stream(&mut connection, &dead_of);
    assert_eq!(dead.len(), 1);
    assert_eq!(
        dead[0].error,
        "delivered 4 times (max 3) without being acknowledged"
    );
    assert_eq!(dead[0].deliveries, 4);
    assert_eq!(dead[0].stage, GROUP);
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
    let handled = log.handled();
    let tries = handled.iter().filter(|(_, id)| id == "m1").count();
    assert_eq!(tries, 3, "three tries of the bad entry");
    let mut out = ids(&read_partitioned::<UnifiedMessage>(&mut connection, "q"));
    out.sort();
    assert_eq!(out, vec!["m2", "m4"], "the good entries went through once");
    // m4 (chat c1) went through only once m1 was done with (the toy stage
    // handles it in m1's runs, but the runner leaves it for m1's retry).
    let m4 = handled.iter().rposition(|(_, id)| id == "m4").unwrap();
    let last_m1 = handled.iter().rposition(|(_, id)| id == "m1").unwrap();
    assert!(m4 > last_m1, "{handled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_and_refused_entries_go_to_their_partition_s_dead() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    let streams = Streams::default();
    let p = streams.partition_of("web", "c1");
    let garbage = add_entry(
        &mut connection,
        &streams.inbound(p),
        &[("nonsense".to_string(), b"\xff\x00".to_vec())],
    );
    add(&mut connection, 1, "refuse");
    add(&mut connection, 4, "fine");
    let log = Log::default();
    let running = start(&redis, FAST, Toy::new("a", &log));
    wait_for("two dead letters", Duration::from_secs(20), || {
        read_stream::<DeadLetter>(&mut connection, &streams.dead(p)).len() == 2
    })
    .await;
    wait_for("the good entry", Duration::from_secs(20), || {
        read_partitioned::<UnifiedMessage>(&mut connection, "q").len() == 1
    })
    .await;
    running.stop().await;
    let dead: Vec<DeadLetter> = read_stream(&mut connection, &streams.dead(p));
    let undecodable = dead
        .iter()
        .find(|d| d.entry_id == garbage)
        .expect("garbage");
    assert_eq!(undecodable.stream, streams.inbound(p));
    assert_eq!(undecodable.fields[0].0, "nonsense");
    let refused = dead.iter().find(|d| d.entry_id != garbage).unwrap();
    assert_eq!(refused.error, "refused");
    assert_eq!(
        ids(&read_partitioned::<UnifiedMessage>(&mut connection, "q")),
        vec!["m4"]
    );
    assert_eq!(
        botline_shared::testing::partitioned_len(&mut connection, "dead"),
        2,
        "no other partition's dead"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn consumers_split_the_partitions_and_a_newcomer_gets_a_share_without_two_owners() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    let log = Log::default();
    let a = start(&redis, FAST, Toy::new("a", &log));
    let b = start(&redis, FAST, Toy::new("b", &log));
    wait_for("a 24/24 split", Duration::from_secs(10), || {
        let owners = owners(&mut connection);
        owned_by(&owners, "a") == 24 && owned_by(&owners, "b") == 24
    })
    .await;
    // Traffic on every chat while a third consumer joins.
    let mut n = 0;
    let c = start(&redis, FAST, Toy::new("c", &log));
    let mut split = false;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while !split {
        assert!(
            std::time::Instant::now() < deadline,
            "no 16/16/16 split: {:?}",
            owners(&mut connection)
        );
        for _ in 0..10 {
            add(&mut connection, n, "fine");
            n += 1;
        }
        let owners = owners(&mut connection);
        split = owned_by(&owners, "a") == 16
            && owned_by(&owners, "b") == 16
            && owned_by(&owners, "c") == 16;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_for("every message handled", Duration::from_secs(20), || {
        read_partitioned::<UnifiedMessage>(&mut connection, "q").len() == n
    })
    .await;
    for running in [a, b, c] {
        running.stop().await;
    }
    assert_eq!(log.violations(), Vec::<String>::new());
    assert_eq!(log.count(), n, "each message handled once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_chat_s_messages_go_in_order_one_at_a_time_and_chats_concurrently() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    for n in 0..30 {
        add(&mut connection, n, "fine");
    }
    let log = Log::default();
    let mut stage = Toy::new("a", &log);
    stage.delay = Duration::from_millis(20);
    let running = start(&redis, FAST, stage);
    wait_for("thirty outputs", Duration::from_secs(20), || {
        read_partitioned::<UnifiedMessage>(&mut connection, "q").len() == 30
    })
    .await;
    running.stop().await;
    assert_eq!(log.violations(), Vec::<String>::new());
    let handled = log.handled();
    for chat in 0..3 {
        let order: Vec<usize> = handled
            .iter()
            .map(|(_, id)| id[1..].parse::<usize>().unwrap())
            .filter(|n| n % 3 == chat)
            .collect();
        let expected: Vec<usize> = (0..30).filter(|n| n % 3 == chat).collect();
        assert_eq!(order, expected, "chat c{chat} in order");
    }
    assert!(
        log.most_at_once.load(Ordering::SeqCst) > 1,
        "chats were handled concurrently"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_consumer_gives_its_partitions_up_and_the_other_handles_its_pending_first() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    // One chat (c1): m1, m4, ..., all in one partition.
    let first: Vec<usize> = (0..10).map(|i| 1 + 3 * i).collect();
    for n in &first {
        add(&mut connection, *n, "fine");
    }
    let log = Log::default();
    let mut slow = Toy::new("a", &log);
    slow.delay = Duration::from_millis(100);
    slow.max_run = 1;
    slow.max_in_flight = 1;
    // On SIGTERM an owner finishes what it read, within the shutdown
    // deadline: a short one leaves the rest pending for the next owner.
    let a = start(&redis, &format!("{FAST}shutdown_deadline_ms = 250\n"), slow);
    wait_for("a handled two", Duration::from_secs(10), || {
        log.count() >= 2
    })
    .await;
    a.stop().await;
    assert_eq!(
        owned_by(&owners(&mut connection), "a"),
        0,
        "a gave its partitions up on stop"
    );
    let streams = Streams::default();
    let p = streams.partition_of("web", "c1");
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(streams.inbound(p))
        .arg(GROUP)
        .arg("-")
        .arg("+")
        .arg(100)
        .query(&mut connection)
        .unwrap();
    let done_by_a = read_partitioned::<UnifiedMessage>(&mut connection, "q").len();
    assert!(done_by_a < 10, "a left some behind");
    assert!(!pending.is_empty(), "a left entries pending");
    // New messages of the chat arrive before b starts.
    let later: Vec<usize> = (10..13).map(|i| 1 + 3 * i).collect();
    for n in &later {
        add(&mut connection, *n, "fine");
    }
    let b = start(&redis, FAST, Toy::new("b", &log));
    wait_for("b took the partitions", Duration::from_secs(10), || {
        owned_by(&owners(&mut connection), "b") == 48
    })
    .await;
    wait_for("every message out", Duration::from_secs(20), || {
        read_partitioned::<UnifiedMessage>(&mut connection, "q").len() == 13
    })
    .await;
    b.stop().await;
    let out = ids(&read_partitioned::<UnifiedMessage>(&mut connection, "q"));
    let expected: Vec<String> = first
        .iter()
        .chain(&later)
        .map(|n| format!("m{n}"))
        .collect();
    assert_eq!(out, expected, "in order, each once");
    let by_b: Vec<String> = log
        .handled()
        .into_iter()
        .filter(|(who, _)| who == "b")
        .map(|(_, id)| id)
        .collect();
    assert_eq!(
        by_b,
        expected[done_by_a..].to_vec(),
        "a's pending first, then the new ones"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_consumer_that_lost_its_partition_writes_nothing() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    let log = Log::default();
    let stage = Toy::new("a", &log);
    let gate = stage.gate.clone();
    gate.store(false, Ordering::SeqCst);
    let a = start(&redis, FAST, stage);
    wait_for("a owns every partition", Duration::from_secs(10), || {
        owned_by(&owners(&mut connection), "a") == 48
    })
    .await;
    add(&mut connection, 1, "fine");
    wait_for("m1 with the stage", Duration::from_secs(10), || {
        !log.chats.lock().unwrap().is_empty()
    })
    .await;
    // Another consumer owns the partition now (as if a's lease had run
    // out), under a lease of its own that runs out in turn.
    let streams = Streams::default();
    let owner = streams.owner(streams.partition_of("web", "c1"), GROUP);
    let _: () = redis::cmd("SET")
        .arg(&owner)
        .arg("intruder")
        .arg("PX")
        .arg(2000)
        .query(&mut connection)
        .unwrap();
    gate.store(true, Ordering::SeqCst);
    // Then a takes the partition again and handles m1 again, which its
    // refused acknowledgement left pending (had it been written, m1 would
    // not be handled again).
    wait_for("m1 handled again", Duration::from_secs(10), || {
        log.count() == 2
    })
    .await;
    wait_for("m1 forwarded", Duration::from_secs(10), || {
        !read_partitioned::<UnifiedMessage>(&mut connection, "q").is_empty()
    })
    .await;
    a.stop().await;
    assert_eq!(
        ids(&read_partitioned::<UnifiedMessage>(&mut connection, "q")),
        vec!["m1"],
        "written once: the stale acknowledgement wrote nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trimming_keeps_what_any_group_still_needs() {
    let redis = RedisServer::start();
    let plumbing = plumbing(&redis, "", "trimmer");
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
