//! Redis secured as SECURITY.md says, with the real binaries:
//! - the shipped ACL (compose/redis/botline-acl.conf) with the default user
//!   off: the whole pipeline and the `botline` CLI work as that user, and
//!   Redis's ACL LOG shows not one refused command, so the ACL lists every
//!   command botline sends;
//! - TLS only, with a private CA and client certificates (rediss://): a
//!   message goes through all four stages;
//! - a wrong password, a wrong CA, plain redis:// to a TLS port, a missing
//!   CA file: each binary stops at start naming the setting, and the
//!   password is in no output, log or metric.

use botline_shared::message::{Role, Turn};
use botline_shared::streams::Streams;
use botline_shared::testing::{read_stream, wait_for, RedisServer, Security, TestCa};
use botline_tests::sink::Sink;
use botline_tests::{bin_dir, ApiClient, Pipeline, WEBHOOK_SECRET};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const PASSWORD: &str = "botline-acl-password-4f1c9e";
const ADMIN_PASSWORD: &str = "botline-admin-password-77d2";

const FAST: &str = "[runner]\nblock_ms = 200\nlease_ttl_ms = 3000\n";

/// The shipped ACL with the test's password, plus an administrator for the
/// test's own look at the ACL LOG; the tests and binaries log in as `botline`.
fn acl(tls: Option<Arc<TestCa>>) -> Security {
    let shipped = include_str!("../../compose/redis/botline-acl.conf");
    assert!(shipped.contains(">CHANGE-ME"), "the placeholder password");
    let acl = format!(
        "{}\nuser admin on >{ADMIN_PASSWORD} ~* &* +@all\n",
        shipped.replace(">CHANGE-ME", &format!(">{PASSWORD}"))
    );
    Security {
        acl: Some(acl),
        login: Some(("botline".into(), PASSWORD.into())),
        tls,
    }
}

/// The administrator's view of the server: its ACL LOG entries.
fn acl_log(redis: &RedisServer, tls: Option<&TestCa>) -> Vec<redis::Value> {
    let scheme = if tls.is_some() { "rediss" } else { "redis" };
    let url = format!(
        "{scheme}://admin:{ADMIN_PASSWORD}@127.0.0.1:{}",
        redis.port()
    );
    let client = match tls {
        Some(ca) => redis::Client::build_with_tls(url, ca.certificates()).unwrap(),
        None => redis::Client::open(url).unwrap(),
    };
    let mut connection = client.get_connection().unwrap();
    redis::cmd("ACL").arg("LOG").query(&mut connection).unwrap()
}

/// Everything a person or a scraper could read: every stage's log and
/// /metrics.
async fn everything_readable(pipeline: &Pipeline) -> String {
    let mut seen = pipeline.logs();
    for process in &pipeline.processes {
        seen.push_str(&process.metrics().await);
    }
    seen
}

/// `binary` (`botline`, `botline-ingest`, …) with only `env` and free
/// addresses for what it serves.
fn command(binary: &str, env: &[(String, String)]) -> Command {
    let mut command = Command::new(bin_dir().join(binary));
    command
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env("BOTLINE_METRICS_ADDR", "127.0.0.1:0")
        .env("BOTLINE_HTTP_ADDR", "127.0.0.1:0")
        .stdin(Stdio::null());
    command
}

/// Run the `botline` CLI with `env`: exit code, stdout and stderr.
fn cli(env: &[(String, String)], args: &[&str]) -> (i32, String, String) {
    let output = command("botline", env)
        .args(args)
        .output()
        .expect("botline runs");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The four stages on `redis`, replying to a webhook sink, and `count`
/// messages through the generic API (over 4 chats) answered there.
async fn answered_through_the_pipeline(
    redis: &RedisServer,
    name: &str,
    count: usize,
) -> (Sink, Pipeline) {
    let sink = Sink::start(WEBHOOK_SECRET).await;
    let overlay = format!("{FAST}[egress.webhook]\nurl = \"{}\"\n", sink.url);
    let pipeline = Pipeline::start(redis, &overlay);
    pipeline.wait_ready(Duration::from_secs(60)).await;
    let client = ApiClient::new(&pipeline.base_url());
    for n in 0..count {
        let chat = format!("{name}-chat-{}", n % 4);
        client
            .send(
                &format!("{name}-{n}"),
                &chat,
                "hello",
                Duration::from_secs(30),
            )
            .await
            .unwrap();
    }
    wait_for(
        "every reply at the webhook",
        Duration::from_secs(60),
        || sink.replies_per_message().len() == count,
    )
    .await;
    (sink, pipeline)
}

/// The bot's reply in web chat `chat`'s transcript, once there.
async fn web_reply(redis: &RedisServer, chat: &str) -> Turn {
    let key = Streams::default().transcript(chat);
    let mut connection = redis.connection();
    let mut turns: Vec<Turn> = Vec::new();
    wait_for(
        "the bot's turn in the transcript",
        Duration::from_secs(30),
        || {
            turns = read_stream(&mut connection, &key);
            turns.iter().any(|turn| turn.role == Role::Bot)
        },
    )
    .await;
    turns
        .into_iter()
        .find(|turn| turn.role == Role::Bot)
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_and_the_cli_run_as_the_shipped_acl_user_alone() {
    let redis = RedisServer::start_secured(acl(None), &[]);
    // The default user is off: without the login nothing gets in.
    let anonymous = redis::Client::open(format!("redis://127.0.0.1:{}", redis.port())).unwrap();
    let refused = redis::cmd("PING")
        .query::<String>(&mut anonymous.get_connection().unwrap())
        .unwrap_err();
    assert_eq!(refused.code(), Some("NOAUTH"), "{refused}");

    let (_sink, mut pipeline) = answered_through_the_pipeline(&redis, "acl", 20).await;
    // The web chat's way: transcript, pub/sub.
    let http = reqwest::Client::new();
    let answer = http
        .post(format!("{}/v1/messages", pipeline.base_url()))
        .bearer_auth(botline_tests::token())
        .json(&serde_json::json!({"event_id": "acl-web", "platform": "web", "chat": {"id": "acl-web-chat"}, "sender": {"id": "u1"}, "text": "hello"}))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 202);
    assert!(!web_reply(&redis, "acl-web-chat").await.text.is_empty());

    // An undecodable entry: classify dead-letters it, the CLI requeues it.
    let mut connection = redis.connection();
    let _: String = redis::cmd("XADD")
        .arg(Streams::default().inbound(0))
        .arg("*")
        .arg("v")
        .arg("1")
        .arg("body")
        .arg("not msgpack")
        .query(&mut connection)
        .unwrap();
    let dead = Streams::default().dead(0);
    wait_for("the poison entry in dead", Duration::from_secs(30), || {
        redis::cmd("XLEN")
            .arg(&dead)
            .query::<u64>(&mut connection)
            .unwrap()
            == 1
    })
    .await;
    let env = redis.env();
    for args in [
        &["status", "--consumers"][..],
        &["peek", "in", "--last", "3"],
        &["dead", "list"],
        &["replay", "in", "--from", "-10m", "--to", "+", "--dry-run"],
        &["dead", "requeue", "--all"],
        &["dead", "purge", "--older-than", "1h", "--yes"],
        &["trim"],
    ] {
        let (code, stdout, stderr) = cli(&env, args);
        assert_eq!(code, 0, "botline {args:?}: {stdout}{stderr}");
    }
    // Metrics of every stream were read meanwhile (every second by default).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let metrics_and_logs = everything_readable(&pipeline).await;
    // Stopping runs the consumers' retirement scripts too.
    for process in &mut pipeline.processes {
        let status = process.terminate(Duration::from_secs(20));
        assert!(status.success(), "{} exited with {status}", process.stage);
    }

    let refused = acl_log(&redis, None);
    assert!(refused.is_empty(), "commands the ACL refused: {refused:?}");
    let seen = metrics_and_logs + &pipeline.logs();
    assert!(!seen.contains(PASSWORD), "the Redis password leaked");
    assert!(!seen.contains("NOPERM"), "a refusal in the logs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_goes_through_every_stage_over_tls_with_a_private_ca() {
    let ca = Arc::new(TestCa::new());
    let redis = RedisServer::start_secured(acl(Some(ca.clone())), &[]);
    assert!(redis.url().starts_with("rediss://"));
    let (sink, pipeline) = answered_through_the_pipeline(&redis, "tls", 1).await;
    assert!(sink.received()[0].signature_ok);
    let (code, stdout, stderr) = cli(&redis.env(), &["status"]);
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("delivered"), "{stdout}");
    assert!(acl_log(&redis, Some(&ca)).is_empty());
    let seen = everything_readable(&pipeline).await;
    assert!(!seen.contains(PASSWORD), "the Redis password leaked");
    assert!(
        seen.contains("redis=rediss://botline:***@127.0.0.1"),
        "the start line shows the redacted URL"
    );
}

/// Start `stage` with `env` (and nothing else of ours) and wait for it to
/// stop: its exit code and what it printed.
fn run_until_exit(stage: &str, env: &[(String, String)]) -> (Option<i32>, String) {
    let mut child = command(&format!("botline-{stage}"), env)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary runs");
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = child.wait_with_output().unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (code, printed)
}

/// `env` with `name` set to `value` (replaced if there).
fn with(env: &[(String, String)], name: &str, value: &str) -> Vec<(String, String)> {
    let mut env: Vec<_> = env.iter().filter(|(k, _)| k != name).cloned().collect();
    env.push((name.to_string(), value.to_string()));
    env
}

fn assert_stops_naming(stage: &str, env: &[(String, String)], setting: &str, secret: &str) {
    let (code, printed) = run_until_exit(stage, env);
    assert!(
        matches!(code, Some(code) if code != 0),
        "{stage} should stop at start (exit {code:?}): {printed}"
    );
    assert!(
        printed.contains(&format!("setting {setting}")),
        "{stage}'s message should name {setting}: {printed}"
    );
    assert!(
        !printed.contains(secret),
        "{stage} printed the password: {printed}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_redis_settings_stop_each_binary_at_start_naming_them() {
    const WRONG: &str = "not-the-password-5b8e0a";
    let plain = RedisServer::start_secured(acl(None), &[]);
    let wrong_password = with(
        &plain.env(),
        "BOTLINE_REDIS_URL",
        &format!("redis://botline:{WRONG}@127.0.0.1:{}", plain.port()),
    );
    for stage in botline_tests::STAGES {
        assert_stops_naming(stage, &wrong_password, "BOTLINE_REDIS_URL", WRONG);
    }
    let (code, stdout, stderr) = cli(&wrong_password, &["status"]);
    assert_eq!(code, 1, "{stdout}{stderr}");
    assert!(stderr.contains("setting BOTLINE_REDIS_URL"), "{stderr}");
    assert!(!stderr.contains(WRONG) && !stdout.contains(WRONG));

    let ca = Arc::new(TestCa::new());
    let tls = RedisServer::start_secured(acl(Some(ca.clone())), &[]);
    let other_ca = TestCa::new();
    let wrong_ca = with(
        &tls.env(),
        "BOTLINE_REDIS_CA_FILE",
        &other_ca.ca_file().display().to_string(),
    );
    assert_stops_naming("classify", &wrong_ca, "BOTLINE_REDIS_URL", PASSWORD);
    let (_, printed) = run_until_exit("ingest", &wrong_ca);
    assert!(
        printed.contains("BOTLINE_REDIS_CA_FILE"),
        "the hint names the CA file: {printed}"
    );
    let plain_to_tls = with(
        &[],
        "BOTLINE_REDIS_URL",
        &format!("redis://botline:{PASSWORD}@127.0.0.1:{}", tls.port()),
    );
    assert_stops_naming("respond", &plain_to_tls, "BOTLINE_REDIS_URL", PASSWORD);
    let missing_ca = with(&tls.env(), "BOTLINE_REDIS_CA_FILE", "/nonexistent/ca.pem");
    assert_stops_naming("egress", &missing_ca, "BOTLINE_REDIS_CA_FILE", PASSWORD);
    let not_a_ca = with(
        &tls.env(),
        "BOTLINE_REDIS_CA_FILE",
        &ca.client_key().display().to_string(),
    );
    assert_stops_naming("classify", &not_a_ca, "BOTLINE_REDIS_CA_FILE", PASSWORD);
    let ca_without_tls = with(
        &plain.env(),
        "BOTLINE_REDIS_CA_FILE",
        &ca.ca_file().display().to_string(),
    );
    assert_stops_naming("ingest", &ca_without_tls, "BOTLINE_REDIS_CA_FILE", PASSWORD);
    let (code, _, stderr) = cli(&missing_ca, &["status"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("BOTLINE_REDIS_CA_FILE"), "{stderr}");

    // Redis not there yet is no bad setting: ingest waits for it (the
    // other stages stop once their first read fails, to be restarted).
    let nobody = with(
        &[],
        "BOTLINE_REDIS_URL",
        &format!("redis://127.0.0.1:{}", botline_shared::testing::free_port()),
    );
    let (_, printed) = run_until_exit("classify", &nobody);
    assert!(printed.contains("Redis does not answer yet"), "{printed}");
    assert!(!printed.contains("setting BOTLINE_REDIS_URL"), "{printed}");
    let mut waiting = command("botline-ingest", &nobody)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let still_running = waiting.try_wait().unwrap().is_none();
    let _ = waiting.kill();
    let _ = waiting.wait();
    assert!(
        still_running,
        "ingest should wait for an unreachable Redis, not stop"
    );
}
