//! Upgrading from the single-stream layout, as an operator does it: a
//! backlog left by the previous release in `{botline}:in` and
//! `{botline}:q:normal` (some of it pending with the old consumers, one
//! entry acknowledged), a new stage refusing to start over it, `botline
//! migrate` run as a process, then the new pipeline answering every
//! unfinished message once, each chat's in order.

use botline_shared::codec;
use botline_shared::message::*;
use botline_shared::testing::{add_entry, free_port, wait_for, RedisServer};
use botline_tests::sink::Sink;
use botline_tests::{assert_each_answered_once, bin_dir, Pipeline, WEBHOOK_SECRET};
use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FAST: &str = "[runner]\nblock_ms = 200\nlease_ttl_ms = 3000\n";
const CHATS: usize = 4;
const PER_CHAT: usize = 6;

fn message(n: usize) -> UnifiedMessage {
    UnifiedMessage {
        id: format!("up-{n:03}"),
        platform: "webhook".into(),
        bot: "botline".into(),
        chat: Chat {
            id: format!("up-chat-{}", n % CHATS),
            kind: ChatKind::Direct,
        },
        thread: None,
        sender: Sender {
            id: format!("u{}", n % CHATS),
            name: "Ada".into(),
            is_bot: false,
        },
        text: format!("hello, message {n}"),
        mentions: Mentions::default(),
        attachments: vec![],
        reply_to: None,
        platform_message_id: None,
        platform_data: Default::default(),
        platform_ts_ms: None,
        received_at_ms: botline_shared::now_ms(),
        trace_id: format!("trace-{n}"),
        origin: Origin::User,
        replay: false,
        raw: None,
    }
}

fn redis_cmd<T: redis::FromRedisValue>(connection: &mut redis::Connection, args: &[&str]) -> T {
    let mut command = redis::cmd(args[0]);
    for arg in &args[1..] {
        command.arg(*arg);
    }
    command.query(connection).unwrap()
}

/// `XREADGROUP … COUNT n … >` as an old consumer: the ids read.
fn read(connection: &mut redis::Connection, stream: &str, group: &str, n: usize) -> Vec<String> {
    let reply: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg(group)
        .arg("old-1")
        .arg("COUNT")
        .arg(n)
        .arg("STREAMS")
        .arg(stream)
        .arg(">")
        .query(connection)
        .unwrap();
    botline_shared::redis_conn::parse_read_reply(reply)
        .unwrap()
        .into_iter()
        .map(|entry| entry.id)
        .collect()
}

/// The old backlog: of each chat's messages (in order), the first half
/// classified into `{botline}:q:normal`, the rest still in `{botline}:in`.
/// Returns the message answered by the old release (acknowledged).
fn old_backlog(connection: &mut redis::Connection) -> String {
    let (inbound, queue) = ("{botline}:in", "{botline}:q:normal");
    for n in 0..CHATS * PER_CHAT {
        let classified = n / CHATS < PER_CHAT / 2;
        if classified {
            let record = ClassifiedMessage {
                message: message(n),
                priority: Priority::Normal,
                intent: Intent {
                    name: "unknown".into(),
                    confidence: 1.0,
                },
                audit: vec![],
                faq: None,
            };
            add_entry(connection, queue, &codec::encode(&record));
        } else {
            add_entry(connection, inbound, &codec::encode(&message(n)));
        }
    }
    let _: () = redis_cmd(connection, &["XGROUP", "CREATE", queue, "respond", "0"]);
    let _: () = redis_cmd(connection, &["XGROUP", "CREATE", inbound, "classify", "0"]);
    // The old respond answered the first and died holding the next two;
    // the old classify died holding two.
    let read_ids = read(connection, queue, "respond", 3);
    let _: u64 = redis_cmd(connection, &["XACK", queue, "respond", &read_ids[0]]);
    read(connection, inbound, "classify", 2);
    message(0).id
}

/// Runs `botline-<binary>` (or the CLI) on `redis` until it exits (at
/// most `within`): its exit code and output.
fn run(
    redis: &RedisServer,
    binary: &str,
    args: &[&str],
    extra: &[(&str, String)],
    within: Duration,
) -> (Option<i32>, String) {
    let dir = std::env::temp_dir().join(format!("botline-upgrade-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let log = dir.join("out.log");
    let file = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(bin_dir().join(binary))
        .args(args)
        .envs(redis.env())
        .envs(extra.iter().map(|(k, v)| (*k, v.as_str())))
        .env_remove("BOTLINE_PREFIX")
        .env("BOTLINE_METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap_or_else(|error| panic!("{binary}: {error} (build the binaries first)"));
    let deadline = Instant::now() + within;
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let output = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    (code, output)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_backlog_is_answered_once_in_order_after_migrate() {
    let redis = RedisServer::start();
    let mut connection = redis.connection();
    let answered_before = old_backlog(&mut connection);
    let sink = Sink::start(WEBHOOK_SECRET).await;
    let dir = std::env::temp_dir().join(format!("botline-upgrade-config-{}", free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("botline.toml");
    let overlay = format!("{FAST}[egress.webhook]\nurl = \"{}\"\n", sink.url);
    std::fs::write(&config, &overlay).unwrap();

    // A new stage will not start over the old backlog, and says why.
    let config_env = [("BOTLINE_CONFIG", config.display().to_string())];
    let (code, output) = run(
        &redis,
        "botline-respond",
        &[],
        &config_env,
        Duration::from_secs(30),
    );
    assert!(code.is_some_and(|code| code != 0), "{code:?}: {output}");
    assert!(output.contains("BOTLINE_PREFIX"), "{output}");
    assert!(output.contains("botline migrate"), "{output}");
    let (code, output) = run(
        &redis,
        "botline-ingest",
        &[],
        &[
            ("BOTLINE_HTTP_ADDR", format!("127.0.0.1:{}", free_port())),
            ("BOTLINE_JWT_SECRET", botline_tests::JWT_SECRET.to_string()),
        ],
        Duration::from_secs(30),
    );
    assert!(code.is_some_and(|code| code != 0), "{code:?}: {output}");
    assert!(output.contains("botline migrate"), "{output}");

    // The operator's step.
    let unfinished = CHATS * PER_CHAT - 1;
    let (code, output) = run(
        &redis,
        "botline",
        &["migrate"],
        &config_env,
        Duration::from_secs(60),
    );
    assert_eq!(code, Some(0), "{output}");
    assert!(
        output.contains(&format!("moved {unfinished} unfinished entries")),
        "{output}"
    );
    let _ = std::fs::remove_dir_all(&dir);

    // The new pipeline answers every unfinished message once.
    let pipeline = Pipeline::start(&redis, &overlay);
    pipeline.wait_ready(Duration::from_secs(60)).await;
    wait_for(
        &format!("{unfinished} replies"),
        Duration::from_secs(60),
        || sink.replies_per_message().len() >= unfinished,
    )
    .await;
    // A moment more for a doubled reply to show.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_each_answered_once(&sink, unfinished);
    let received = sink.received();
    assert!(
        received.iter().all(|r| r.in_reply_to != answered_before),
        "the message the old release finished is not answered again"
    );
    // Each chat's replies in the order its messages were written.
    let mut per_chat: HashMap<String, Vec<usize>> = HashMap::new();
    for reply in &received {
        let n: usize = reply.in_reply_to.trim_start_matches("up-").parse().unwrap();
        per_chat.entry(reply.chat.clone()).or_default().push(n);
    }
    assert_eq!(per_chat.len(), CHATS);
    for (chat, order) in per_chat {
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "replies of {chat} out of order");
    }
}
