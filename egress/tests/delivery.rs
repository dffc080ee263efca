//! egress against a real redis-server and a real HTTP sink standing in for
//! the webhook receiver. Each test has its own Redis; nothing waits on a
//! fixed sleep: every wait is for a condition, with a deadline.

mod senders;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use botline_egress::EgressSettings;
use botline_shared::codec::{self, Record};
use botline_shared::config::{ProcessConfig, Settings};
use botline_shared::message::{
    Attachment, Chat, ChatKind, DeadLetter, Priority, Receipt, Reply, Role, Turn,
};
use botline_shared::runner::Plumbing;
use botline_shared::streams::{Partition, Streams};
use botline_shared::telemetry::Health;
use botline_shared::testing::RedisServer;
use botline_shared::{now_ms, Error};
use futures_util::StreamExt;
use hmac::{Hmac, Mac};
use redis::aio::MultiplexedConnection;
use senders::eventually;
use sha2::Sha256;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "test-secret-0123456789";
const PREFIX: &str = "t";
const WAIT: Duration = Duration::from_secs(20);

// ---- the webhook receiver ----

struct Received {
    at: Instant,
    headers: HeaderMap,
    body: Bytes,
}

/// How the sink answers its n-th request (0-based): status, Retry-After, body.
type Script = dyn Fn(usize) -> (u16, Option<&'static str>, String) + Send + Sync;

#[derive(Clone)]
struct Sink {
    received: Arc<Mutex<Vec<Received>>>,
    script: Arc<Script>,
    /// Each answer is held back a random 0..=max_delay_ms.
    max_delay_ms: u64,
    in_flight: Arc<AtomicUsize>,
    most_in_flight: Arc<AtomicUsize>,
}

impl Sink {
    async fn start(
        script: impl Fn(usize) -> (u16, Option<&'static str>, String) + Send + Sync + 'static,
        max_delay_ms: u64,
    ) -> (Sink, String) {
        let sink = Sink {
            received: Arc::default(),
            script: Arc::new(script),
            max_delay_ms,
            in_flight: Arc::default(),
            most_in_flight: Arc::default(),
        };
        let app = Router::new()
            .route("/hook", post(hook))
            .with_state(sink.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (sink, url)
    }

    fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    fn bodies(&self) -> Vec<serde_json::Value> {
        self.received
            .lock()
            .unwrap()
            .iter()
            .map(|received| serde_json::from_slice(&received.body).unwrap())
            .collect()
    }
}

async fn hook(State(sink): State<Sink>, headers: HeaderMap, body: Bytes) -> Response {
    let now_in_flight = sink.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
    sink.most_in_flight
        .fetch_max(now_in_flight, Ordering::SeqCst);
    let nth = {
        let mut received = sink.received.lock().unwrap();
        received.push(Received {
            at: Instant::now(),
            headers,
            body,
        });
        received.len() - 1
    };
    if sink.max_delay_ms > 0 {
        let delay = rand::random_range(0..=sink.max_delay_ms);
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let (status, retry_after, body) = (sink.script)(nth);
    sink.in_flight.fetch_sub(1, Ordering::SeqCst);
    let mut response = (StatusCode::from_u16(status).unwrap(), body).into_response();
    if let Some(retry_after) = retry_after {
        response
            .headers_mut()
            .insert("retry-after", retry_after.parse().unwrap());
    }
    response
}

fn ok() -> (u16, Option<&'static str>, String) {
    (200, None, String::new())
}

/// A sink script: the first request gets this answer, every later one 200.
fn first_then_ok(
    status: u16,
    retry_after: Option<&'static str>,
    body: &'static str,
) -> impl Fn(usize) -> (u16, Option<&'static str>, String) + Send + Sync + 'static {
    move |nth| {
        if nth == 0 {
            (status, retry_after, body.into())
        } else {
            ok()
        }
    }
}

// ---- egress, running against its own Redis ----

struct Egress {
    redis: RedisServer,
    streams: Streams,
    connection: MultiplexedConnection,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

impl Egress {
    /// Start egress with `[egress]` overlay `egress_toml` (the webhook URL included).
    async fn start(egress_toml: &str) -> Egress {
        let redis = RedisServer::start();
        Self::start_on(redis, egress_toml, |_| async {}).await
    }

    /// Start on `redis` after `before` has run against it (to put entries in first).
    async fn start_on<F, Fut>(redis: RedisServer, egress_toml: &str, before: F) -> Egress
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = ()>,
    {
        let url = redis.url();
        let process = ProcessConfig::from_env(
            &[
                ("BOTLINE_REDIS_URL", url.as_str()),
                ("BOTLINE_PREFIX", PREFIX),
                ("BOTLINE_CONSUMER", "egress-test"),
            ],
            "127.0.0.1:0",
        )
        .unwrap();
        let settings = Settings::from_overlay(Some(
            "[runner]\nblock_ms = 100\nretry_ms = 1000\nlease_ttl_ms = 3000\n",
        ))
        .unwrap();
        let egress = EgressSettings::from_overlay(&format!(
            "[egress]\nbackoff_base_ms = 10\nbackoff_cap_ms = 50\n{egress_toml}"
        ))
        .unwrap();
        let plumbing = Plumbing::connect(&process, &settings, Health::default()).unwrap();
        let connection = redis
            .client()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        before(connection.clone()).await;
        let shutdown = CancellationToken::new();
        let stage = botline_egress::build(
            egress,
            &[("BOTLINE_WEBHOOK_SECRET", SECRET)],
            &plumbing,
            shutdown.clone(),
        )
        .unwrap();
        let task = tokio::spawn(botline_egress::run(stage, plumbing, shutdown.clone()));
        Egress {
            redis,
            streams: process.streams(&settings).unwrap(),
            connection,
            shutdown,
            task,
        }
    }

    async fn stop(self) -> RedisServer {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("egress stops")
            .unwrap()
            .unwrap();
        self.redis
    }

    async fn send(&self, reply: &Reply) -> String {
        add(
            self.connection.clone(),
            &outbound(&self.streams, reply),
            reply,
        )
        .await
    }

    /// The partition of `chat` on `platform`.
    fn partition(&self, platform: &str, chat: &str) -> Partition {
        self.streams.partition_of(platform, chat)
    }

    /// Every record of the stream `key` names, over every partition.
    async fn read_partitioned<R: Record>(&self, key: impl Fn(Partition) -> String) -> Vec<R> {
        let mut records = Vec::new();
        for p in self.streams.all() {
            records.extend(self.read(&key(p)).await);
        }
        records
    }

    async fn read<R: Record>(&self, stream: &str) -> Vec<R> {
        botline_shared::testing::read_stream(&mut self.redis.connection(), stream)
    }

    async fn receipts(&self) -> Vec<Receipt> {
        self.read_partitioned(|p| self.streams.delivered(p)).await
    }

    async fn dead(&self) -> Vec<DeadLetter> {
        self.read_partitioned(|p| self.streams.dead(p)).await
    }

    /// Whether group `egress` has read and acknowledged everything in `stream`.
    async fn all_acknowledged(&self, stream: &str) -> bool {
        let mut connection = self.connection.clone();
        let length: u64 = redis::cmd("XLEN")
            .arg(stream)
            .query_async(&mut connection)
            .await
            .unwrap();
        let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
            .arg(stream)
            .arg("egress")
            .arg("-")
            .arg("+")
            .arg(1000)
            .query_async(&mut connection)
            .await
            .unwrap_or_default();
        let read: u64 = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(stream)
            .query_async::<Vec<std::collections::HashMap<String, redis::Value>>>(&mut connection)
            .await
            .ok()
            .and_then(|groups| groups.into_iter().next())
            .and_then(|group| match group.get("entries-read") {
                Some(redis::Value::Int(n)) => Some(*n as u64),
                _ => None,
            })
            .unwrap_or(0);
        length > 0 && read == length && pending.is_empty()
    }

    async fn exists(&self, key: &str) -> bool {
        redis::cmd("EXISTS")
            .arg(key)
            .query_async::<bool>(&mut self.connection.clone())
            .await
            .unwrap()
    }
}

/// The `out:<platform>` of `reply`'s chat's partition.
fn outbound(streams: &Streams, reply: &Reply) -> String {
    let p = streams.partition_of(&reply.platform, &reply.chat.id);
    streams.outbound(p, &reply.platform)
}

async fn add(mut connection: MultiplexedConnection, stream: &str, reply: &Reply) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (name, value) in codec::encode(reply) {
        cmd.arg(name).arg(value);
    }
    cmd.query_async(&mut connection).await.unwrap()
}

fn reply(id: &str, platform: &str, chat: &str, text: &str) -> Reply {
    Reply {
        id: id.into(),
        in_reply_to: format!("m-{id}"),
        platform: platform.into(),
        bot: "bot-1".into(),
        chat: Chat {
            id: chat.into(),
            kind: ChatKind::Group,
        },
        thread: Some("th".into()),
        reply_to: Some("p-9".into()),
        text: text.into(),
        mentions: vec!["u1".into(), "u2".into()],
        attachments: vec![],
        platform_data: Default::default(),
        priority: Priority::Urgent,
        received_at_ms: now_ms() - 50,
        created_at_ms: now_ms() - 10,
        trace_id: format!("trace-{id}"),
        replay: false,
    }
}

fn webhook(url: &str) -> String {
    format!("[egress.webhook]\nurl = \"{url}\"\n")
}

// ---- the tests ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_reply_is_delivered_once_signed_with_the_documented_json() {
    let (sink, url) = Sink::start(|_| (200, None, r#"{"message_id":"pm-1"}"#.into()), 0).await;
    let egress = Egress::start(&webhook(&url)).await;
    let mut sent = reply("r-1", "webhook", "c1", "你好 👋");
    sent.attachments = vec![Attachment::image(
        "https://cdn.example.com/map.png",
        Some("store map".into()),
    )];
    egress.send(&sent).await;
    eventually("a receipt", || async {
        !egress.receipts().await.is_empty()
    })
    .await;

    assert_eq!(sink.count(), 1);
    let received = sink.received.lock().unwrap().pop().unwrap();
    let header = |name: &str| {
        received
            .headers
            .get(name)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string()
    };
    assert_eq!(header("content-type"), "application/json");
    assert_eq!(header("idempotency-key"), "r-1");
    let timestamp = header("x-botline-timestamp");
    let seconds: i64 = timestamp.parse().unwrap();
    assert!((seconds - now_ms() / 1000).abs() < 60, "{timestamp}");
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{timestamp}.").as_bytes());
    mac.update(&received.body);
    let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
    assert_eq!(header("x-botline-signature"), expected);

    let body: serde_json::Value = serde_json::from_slice(&received.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({
            "id": "r-1",
            "in_reply_to": "m-r-1",
            "platform": "webhook",
            "bot": "bot-1",
            "chat": {"id": "c1", "kind": "group"},
            "thread": "th",
            "reply_to": "p-9",
            "text": "你好 👋",
            "mentions": ["u1", "u2"],
            "attachments": [{
                "kind": "image",
                "url": "https://cdn.example.com/map.png",
                "file_id": null,
                "mime": null,
                "size": null,
                "name": "store map",
            }],
            "priority": "urgent",
            "trace_id": "trace-r-1",
            "created_at_ms": sent.created_at_ms,
        })
    );

    let receipts = egress.receipts().await;
    assert_eq!(receipts.len(), 1);
    let receipt = &receipts[0];
    assert_eq!(receipt.reply_id, "r-1");
    assert_eq!(receipt.message_id, "m-r-1");
    assert_eq!(receipt.platform, "webhook");
    assert_eq!(receipt.chat, "c1");
    assert_eq!(receipt.attempts, 1);
    assert_eq!(receipt.platform_message_id.as_deref(), Some("pm-1"));
    assert_eq!(receipt.trace_id, "trace-r-1");
    assert!(receipt.latency_ms >= 50, "{}", receipt.latency_ms);
    let p = egress.partition("webhook", "c1");
    assert!(egress.exists(&egress.streams.sent(p, "r-1")).await);
    let out = egress.streams.outbound(p, "webhook");
    eventually("the entry acknowledged", || egress.all_acknowledged(&out)).await;
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_already_sent_is_not_sent_again() {
    let (sink, url) = Sink::start(|_| ok(), 0).await;
    // A reply whose sent key is there before egress reads it (sent by an
    // earlier run whose acknowledgement was lost).
    let redis = RedisServer::start();
    let streams = Streams::new(PREFIX, botline_shared::streams::DEFAULT_PARTITIONS);
    let early = reply("r-early", "webhook", "c1", "one");
    let p = streams.partition_of("webhook", "c1");
    let egress = Egress::start_on(redis, &webhook(&url), |mut connection| {
        let (key, early, stream) = (
            streams.sent(p, "r-early"),
            early.clone(),
            streams.outbound(p, "webhook"),
        );
        async move {
            let _: () = redis::cmd("SET")
                .arg(key)
                .arg("1")
                .query_async(&mut connection)
                .await
                .unwrap();
            add(connection, &stream, &early).await;
        }
    })
    .await;
    assert_eq!(egress.streams, streams);
    let out = egress.streams.outbound(p, "webhook");
    eventually("the early entry acknowledged", || {
        egress.all_acknowledged(&out)
    })
    .await;
    assert_eq!(sink.count(), 0);
    assert!(egress.receipts().await.is_empty());

    // The same reply in two entries, the second after the first is out (a
    // requeue, or respond writing it twice): sent once, one receipt.
    let twice = reply("r-twice", "webhook", "c1", "two");
    egress.send(&twice).await;
    eventually("a receipt", || async { egress.receipts().await.len() == 1 }).await;
    egress.send(&twice).await;
    eventually("both entries acknowledged", || {
        egress.all_acknowledged(&out)
    })
    .await;
    assert_eq!(sink.count(), 1);
    assert_eq!(egress.receipts().await.len(), 1);

    // And again across a restart of egress.
    let redis = egress.stop().await;
    let egress = Egress::start_on(redis, &webhook(&url), |connection| {
        let stream = out.clone();
        async move {
            add(connection, &stream, &twice).await;
        }
    })
    .await;
    eventually("the third entry acknowledged", || {
        egress.all_acknowledged(&out)
    })
    .await;
    assert_eq!(sink.count(), 1);
    assert_eq!(egress.receipts().await.len(), 1);
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_error_is_retried_until_delivered() {
    let (sink, url) = Sink::start(first_then_ok(500, None, "oops"), 0).await;
    let egress = Egress::start(&webhook(&url)).await;
    egress.send(&reply("r-1", "webhook", "c1", "hi")).await;
    eventually("a receipt", || async {
        !egress.receipts().await.is_empty()
    })
    .await;
    assert_eq!(sink.count(), 2);
    let receipts = egress.receipts().await;
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0].attempts, 2);
    let keys: Vec<String> = sink
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|received| received.headers["idempotency-key"].to_str().unwrap().into())
        .collect();
    assert_eq!(keys, ["r-1", "r-1"]);
    assert!(egress.dead().await.is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_is_honoured() {
    let (sink, url) = Sink::start(first_then_ok(429, Some("1"), "slow down"), 0).await;
    let egress = Egress::start(&webhook(&url)).await;
    egress.send(&reply("r-1", "webhook", "c1", "hi")).await;
    eventually("a receipt", || async {
        !egress.receipts().await.is_empty()
    })
    .await;
    let arrivals: Vec<Instant> = sink
        .received
        .lock()
        .unwrap()
        .iter()
        .map(|received| received.at)
        .collect();
    assert_eq!(arrivals.len(), 2);
    let gap = arrivals[1] - arrivals[0];
    assert!(
        gap >= Duration::from_secs(1),
        "second request after {gap:?}"
    );
    assert_eq!(egress.receipts().await[0].attempts, 2);
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_request_goes_to_dead_with_the_reason() {
    let (sink, url) = Sink::start(|_| (400, None, "field `text` is required".into()), 0).await;
    let egress = Egress::start(&webhook(&url)).await;
    egress.send(&reply("r-1", "webhook", "c1", "hi")).await;
    eventually("a dead letter", || async {
        !egress.dead().await.is_empty()
    })
    .await;
    let dead = egress.dead().await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].stage, "egress");
    let p = egress.partition("webhook", "c1");
    assert_eq!(dead[0].stream, egress.streams.outbound(p, "webhook"));
    assert_eq!(
        dead[0].error,
        "webhook answered 400: field `text` is required"
    );
    assert_eq!(sink.count(), 1);
    assert!(egress.receipts().await.is_empty());
    assert!(!egress.exists(&egress.streams.sent(p, "r-1")).await);
    assert!(!egress.exists(&egress.streams.sending(p, "r-1")).await);
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_webhook_url_its_replies_go_to_dead_saying_so() {
    let egress = Egress::start("").await;
    egress.send(&reply("r-1", "webhook", "c1", "hi")).await;
    eventually("a dead letter", || async {
        !egress.dead().await.is_empty()
    })
    .await;
    let dead = egress.dead().await;
    assert!(
        dead[0].error.starts_with("egress.webhook.url is not set"),
        "{}",
        dead[0].error
    );
    assert!(egress.receipts().await.is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_chat_keeps_its_order_while_chats_go_at_once() {
    let (sink, url) = Sink::start(|_| ok(), 15).await;
    let redis = RedisServer::start();
    let streams = Streams::new(PREFIX, botline_shared::streams::DEFAULT_PARTITIONS);
    let replies: Vec<Reply> = (0..50)
        .map(|n| {
            reply(
                &format!("r-{n:02}"),
                "webhook",
                &format!("chat-{}", n % 5),
                &n.to_string(),
            )
        })
        .collect();
    // All 50 are in their partitions' streams before egress starts, so
    // each partition's come in one batch.
    let egress = Egress::start_on(redis, &webhook(&url), |connection| {
        let (replies, streams) = (replies.clone(), streams.clone());
        async move {
            for reply in &replies {
                add(connection.clone(), &outbound(&streams, reply), reply).await;
            }
        }
    })
    .await;
    eventually("50 receipts", || async {
        egress.receipts().await.len() == 50
    })
    .await;
    assert_eq!(sink.count(), 50);
    let bodies = sink.bodies();
    for chat in 0..5 {
        let chat_id = format!("chat-{chat}");
        let arrived: Vec<&str> = bodies
            .iter()
            .filter(|body| body["chat"]["id"] == chat_id.as_str())
            .map(|body| body["id"].as_str().unwrap())
            .collect();
        let expected: Vec<String> = (0..50)
            .filter(|n| n % 5 == chat)
            .map(|n| format!("r-{n:02}"))
            .collect();
        assert_eq!(arrived, expected, "order of {chat_id}");
    }
    let most = sink.most_in_flight.load(Ordering::SeqCst);
    assert!((2..=5).contains(&most), "{most} requests at once");
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_web_reply_becomes_a_transcript_turn_and_a_notification() {
    let egress = Egress::start("").await;
    let mut pubsub = egress.redis.client().get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(egress.streams.transcript_channel())
        .await
        .unwrap();
    let mut sent = reply("r-web", "web", "browser-7", "hello from the bot");
    sent.attachments = vec![Attachment::image("https://cdn.example.com/a.png", None)];
    egress.send(&sent).await;

    let message = tokio::time::timeout(WAIT, pubsub.on_message().next())
        .await
        .expect("a notification")
        .unwrap();
    assert_eq!(message.get_payload::<String>().unwrap(), "browser-7");

    let transcript_key = egress.streams.transcript("browser-7");
    let turns: Vec<Turn> = egress.read(&transcript_key).await;
    assert_eq!(turns.len(), 1);
    let turn = &turns[0];
    assert_eq!(turn.role, Role::Bot);
    assert_eq!(turn.speaker_id, "bot-1");
    assert_eq!(turn.speaker_name, "botline");
    assert_eq!(turn.text, "hello from the bot");
    assert_eq!(turn.message_id, "r-web");
    assert_eq!(turn.attachments, sent.attachments, "the page shows them");
    assert!(turn.at_ms >= sent.created_at_ms);
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&transcript_key)
        .query_async(&mut egress.connection.clone())
        .await
        .unwrap();
    assert!(ttl > 0, "transcript expires, ttl {ttl}");

    let receipts = egress.receipts().await;
    assert_eq!(receipts.len(), 1);
    assert_eq!(receipts[0].platform, "web");
    assert_eq!(receipts[0].attempts, 1);
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replayed_replies_are_acknowledged_unsent() {
    let (sink, url) = Sink::start(|_| ok(), 0).await;
    let egress = Egress::start(&webhook(&url)).await;
    let mut replayed = reply("r-1", "webhook", "c1", "again");
    replayed.replay = true;
    egress.send(&replayed).await;
    let out = outbound(&egress.streams, &replayed);
    eventually("the entry acknowledged", || egress.all_acknowledged(&out)).await;
    assert_eq!(sink.count(), 0);
    assert!(egress.receipts().await.is_empty());
    assert!(egress.dead().await.is_empty());
    egress.stop().await;
}
