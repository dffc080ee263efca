//! The end-to-end harness: a real `redis-server`, the four real stage
//! binaries as child processes (killable, stoppable, restartable), a local
//! HTTP sink standing in for the generic outbound webhook, and a client for
//! the generic inbound API. The tests in `tests/` and the `bench` binary use it.
//!
//! The binaries are taken from `BOTLINE_BIN_DIR`, else from the workspace's
//! `target/release` (when `BOTLINE_RELEASE` is set) or `target/debug`:
//! `scripts/test` builds them first.

pub mod browser;
pub mod llm;
pub mod onebot;
pub mod prometheus;
pub mod redis_start;
pub mod sink;

use botline_shared::testing::{free_port, wait_for, RedisServer};
use futures_util::stream::StreamExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const JWT_SECRET: &str = "test-secret-for-the-generic-api-0123456789";
pub const WEBHOOK_SECRET: &str = "test-secret-for-the-outbound-webhook-0123";

pub const STAGES: [&str; 4] = ["ingest", "classify", "respond", "egress"];

/// Where the stage binaries are.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("BOTLINE_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let profile = if std::env::var_os("BOTLINE_RELEASE").is_some() {
        "release"
    } else {
        "debug"
    };
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join(profile)
}

/// One stage process, restartable with the same settings.
pub struct StageProcess {
    pub stage: &'static str,
    pub metrics_port: u16,
    /// Ingest's HTTP port.
    pub http_port: Option<u16>,
    env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

impl StageProcess {
    fn spawn(&mut self) {
        let binary = bin_dir().join(format!("botline-{}", self.stage));
        assert!(
            binary.exists(),
            "{} is missing: build the binaries first (scripts/test does: cargo build --bins)",
            binary.display()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("stage log");
        let child = Command::new(&binary)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env(
                "BOTLINE_METRICS_ADDR",
                format!("127.0.0.1:{}", self.metrics_port),
            )
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|error| panic!("starting {}: {error}", binary.display()));
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// `kill -9`, and wait for it to be gone.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        self.signal("TERM");
        let mut child = self.child.take().expect("running");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not stop within {within:?} of SIGTERM",
                self.stage
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn stop(&self) {
        self.signal("STOP");
    }

    /// Whether it was started and has not been killed or terminated since.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    pub fn resume(&self) {
        self.signal("CONT");
    }

    pub fn restart(&mut self) {
        self.kill9();
        self.spawn();
    }

    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "{} is still running", self.stage);
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.metrics_port)
    }

    /// The value of one series (`name{labels}` exactly as exported), if present.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics().await, series)
    }

    /// What `/metrics` says now (empty if it does not answer).
    pub async fn metrics(&self) -> String {
        let response = reqwest::get(format!("{}/metrics", self.metrics_url())).await;
        match response {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        }
    }
}

impl Drop for StageProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
        }
        self.kill9();
    }
}

/// The four stages on one Redis, with a webhook sink.
pub struct Pipeline {
    pub dir: PathBuf,
    pub http_port: u16,
    pub processes: Vec<StageProcess>,
    config: PathBuf,
    /// `BOTLINE_REDIS_URL` (and the TLS files) of the Redis the stages use.
    redis_env: Vec<(String, String)>,
    extra_env: Vec<(String, String)>,
}

/// The settings `file` laid over `base` (both TOML): tables merged key by
/// key, the file's values winning; `--config` of the bench and of chaos.
pub fn laid_over(base: &str, file: &str) -> Result<String, String> {
    fn merge(base: &mut toml::Table, over: toml::Table) {
        for (key, value) in over {
            match (base.get_mut(&key), value) {
                (Some(toml::Value::Table(base)), toml::Value::Table(over)) => merge(base, over),
                (_, value) => {
                    base.insert(key, value);
                }
            }
        }
    }
    let mut merged: toml::Table = base.parse().map_err(|e| format!("{e}"))?;
    merge(&mut merged, file.parse().map_err(|e| format!("{e}"))?);
    Ok(merged.to_string())
}

/// `overlay` with `[classify] intent_model = "keywords"` when it names no
/// intent model.
fn keyword_intents_unless_chosen(overlay: &str) -> String {
    let mut settings: toml::Table = overlay.parse().expect("the test's overlay is TOML");
    let classify = settings
        .entry("classify")
        .or_insert_with(|| toml::Value::Table(toml::Table::new()))
        .as_table_mut()
        .expect("[classify] is a table");
    classify
        .entry("intent_model")
        .or_insert_with(|| "keywords".into());
    settings.to_string()
}

impl Pipeline {
    /// Start every stage with `overlay` laid over the default settings.
    /// `{sink}` in `overlay` becomes the sink's URL. Classify tells intents
    /// by the keyword rules unless `overlay` sets `[classify] intent_model`:
    /// the shipped sentence encoder is for the tests about it (and far too
    /// slow in a debug build for the rest).
    pub fn start(redis: &RedisServer, overlay: &str) -> Self {
        Self::start_with_env(redis, overlay, &[])
    }

    /// [`Pipeline::start`] with more environment variables for every stage
    /// (platform secrets, say).
    pub fn start_with_env(redis: &RedisServer, overlay: &str, extra_env: &[(&str, &str)]) -> Self {
        Self::start_on(redis.env(), overlay, extra_env)
    }

    /// [`Pipeline::start_with_env`] on the Redis that `redis_env` names
    /// (`BOTLINE_REDIS_URL` and its TLS files): a cluster, say.
    pub fn start_on(
        redis_env: Vec<(String, String)>,
        overlay: &str,
        extra_env: &[(&str, &str)],
    ) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "botline-e2e-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("test folder");
        let config = dir.join("botline.toml");
        std::fs::write(&config, keyword_intents_unless_chosen(overlay)).expect("config");
        let mut pipeline = Pipeline {
            dir,
            http_port: free_port(),
            processes: Vec::new(),
            config,
            redis_env,
            extra_env: extra_env
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
        };
        for stage in STAGES {
            pipeline.add(stage);
        }
        pipeline
    }

    /// Start one more replica of `stage`; returns its index in `processes`.
    pub fn add(&mut self, stage: &'static str) -> usize {
        let index = self.processes.len();
        let mut env = self.redis_env.clone();
        env.extend([
            ("BOTLINE_CONFIG".into(), self.config.display().to_string()),
            ("BOTLINE_JWT_SECRET".into(), JWT_SECRET.into()),
            ("BOTLINE_WEBHOOK_SECRET".into(), WEBHOOK_SECRET.into()),
            ("BOTLINE_LOG".into(), "info".into()),
        ]);
        env.extend(self.extra_env.iter().cloned());
        // The first ingest serves at `http_port`, each further replica at
        // a port of its own.
        let http_port = (stage == "ingest").then(|| {
            match self
                .processes
                .iter()
                .any(|process| process.stage == "ingest")
            {
                true => free_port(),
                false => self.http_port,
            }
        });
        if let Some(port) = http_port {
            env.push(("BOTLINE_HTTP_ADDR".into(), format!("127.0.0.1:{port}")));
        }
        let mut process = StageProcess {
            stage,
            metrics_port: free_port(),
            http_port,
            env,
            log: self.dir.join(format!("{stage}-{index}.log")),
            child: None,
        };
        process.spawn();
        self.processes.push(process);
        index
    }

    pub fn stage(&mut self, stage: &str) -> &mut StageProcess {
        self.processes
            .iter_mut()
            .find(|p| p.stage == stage)
            .expect("stage started")
    }

    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    /// Wait until every process answers `/readyz` with 200.
    pub async fn wait_ready(&self, within: Duration) {
        let client = reqwest::Client::new();
        let deadline = Instant::now() + within;
        for process in &self.processes {
            loop {
                let ready = client
                    .get(format!("{}/readyz", process.metrics_url()))
                    .timeout(Duration::from_secs(1))
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false);
                if ready {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{} not ready within {within:?}; log:\n{}",
                    process.stage,
                    process.log()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Every process's log, for a failing test.
    /// Wait until the running consumers of each stage share its
    /// `partitions` (as they report them) evenly, within one of each other:
    /// a scaled stage is balanced.
    pub async fn wait_balanced(&self, partitions: u32, within: Duration) {
        let deadline = Instant::now() + within;
        for stage in ["classify", "respond", "egress"] {
            let series = format!("botline_stage_partitions_owned{{stage=\"{stage}\"}}");
            loop {
                let running: Vec<&StageProcess> = self
                    .processes
                    .iter()
                    .filter(|p| p.stage == stage && p.is_running())
                    .collect();
                let mut owned = Vec::new();
                for process in &running {
                    owned.push(process.metric(&series).await.unwrap_or(0.0));
                }
                let total: f64 = owned.iter().sum();
                // Shares within one of each other (with more consumers than
                // partitions, the extras own none).
                let (least, most) = owned
                    .iter()
                    .fold((f64::MAX, 0.0_f64), |(l, m), n| (l.min(*n), m.max(*n)));
                let even = running.len() > partitions as usize || most - least <= 1.0;
                if total == f64::from(partitions) && even {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{stage}: partitions owned {owned:?}, not balanced over {partitions}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    pub fn logs(&self) -> String {
        self.processes
            .iter()
            .map(|p| {
                format!(
                    "--- {} (metrics {}) ---\n{}",
                    p.stage,
                    p.metrics_port,
                    p.log()
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.processes.clear();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A bearer token for the generic API, valid for an hour.
/// Wait until `delivered` holds one receipt (a reply out, once).
pub async fn one_receipt(redis: &RedisServer) {
    wait_for("the receipt", Duration::from_secs(60), || {
        botline_shared::testing::partitioned_len(&mut redis.connection(), "delivered") == 1
    })
    .await;
}

pub fn token() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({ "sub": "e2e", "iat": now, "exp": now + 3600 });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("token")
}

/// A client of the generic inbound API.
#[derive(Clone)]
pub struct ApiClient {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl ApiClient {
    pub fn new(base_url: &str) -> Self {
        ApiClient {
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(64)
                .build()
                .expect("client"),
            url: format!("{base_url}/v1/messages"),
            token: token(),
        }
    }

    /// POST one message; a connection error or a 429/503 is retried with
    /// the same event id (as a platform would) until `within` runs out.
    pub async fn send(
        &self,
        event_id: &str,
        chat: &str,
        text: &str,
        within: Duration,
    ) -> Result<(), String> {
        let body = serde_json::json!({
            "event_id": event_id,
            "chat": { "id": chat },
            "sender": { "id": format!("user-{chat}"), "name": "Ada" },
            "text": text,
        });
        let deadline = Instant::now() + within;
        loop {
            let sent = self
                .http
                .post(&self.url)
                .bearer_auth(&self.token)
                .json(&body)
                .timeout(Duration::from_secs(5))
                .send()
                .await;
            let retry = match sent {
                Ok(response) if response.status().is_success() => return Ok(()),
                Ok(response) if matches!(response.status().as_u16(), 429 | 503) => {
                    format!("{}", response.status())
                }
                Ok(response) => {
                    return Err(format!(
                        "{}: {}",
                        response.status(),
                        response.text().await.unwrap_or_default()
                    ))
                }
                Err(error) => error.to_string(),
            };
            if Instant::now() > deadline {
                return Err(format!("gave up on {event_id}: {retry}"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The value of `series` (`name{labels}` exactly as exported) in a `/metrics` text.
pub fn metric_value(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// `count` messages over `chats` chats, each chat's in order, chats concurrently.
pub async fn send_all(
    client: &ApiClient,
    prefix: &str,
    count: usize,
    chats: usize,
    pause: Duration,
) -> Vec<(String, String)> {
    let per_chat: Vec<Vec<(String, String)>> = (0..chats)
        .map(|chat| {
            (0..count)
                .filter(|n| n % chats == chat)
                .map(|n| (format!("{prefix}-{n}"), format!("{prefix}-chat-{chat}")))
                .collect()
        })
        .collect();
    futures_util::stream::iter(per_chat.clone())
        .for_each_concurrent(None, |messages| async move {
            for (event_id, chat) in messages {
                client
                    .send(
                        &event_id,
                        &chat,
                        &format!("hello, message {event_id}"),
                        Duration::from_secs(60),
                    )
                    .await
                    .unwrap();
                tokio::time::sleep(pause).await;
            }
        })
        .await;
    per_chat.into_iter().flatten().collect()
}

pub fn assert_each_answered_once(sink: &sink::Sink, expected: usize) {
    let replies = sink.replies_per_message();
    assert_eq!(replies.len(), expected, "messages answered");
    let twice: Vec<_> = replies.iter().filter(|(_, n)| **n != 1).collect();
    assert!(
        twice.is_empty(),
        "messages answered more than once: {twice:?}"
    );
    assert!(
        sink.received().iter().all(|r| r.signature_ok),
        "every request is signed"
    );
}

/// Wait for every reply of `chats` chats (`chat-<n>`) of `per_chat`
/// messages each (message `m` of chat `n` said `text(n, m)`) answered by
/// the LLM stand-in that echoes its context ([`llm::SlowLlm::echoing`]),
/// then check each chat's replies came in order, each written with every
/// earlier turn of its chat in context, and none twice.
pub async fn assert_echoed_in_order(
    sink: &sink::Sink,
    chats: usize,
    per_chat: usize,
    text: fn(usize, usize) -> String,
) {
    let expected = chats * per_chat;
    wait_for("every reply", Duration::from_secs(120), || {
        sink.count() >= expected
    })
    .await;
    // A moment for any reply that should not exist (a double) to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut replies: std::collections::HashMap<String, Vec<String>> = Default::default();
    for reply in sink.received() {
        replies.entry(reply.chat).or_default().push(reply.text);
    }
    assert_eq!(replies.len(), chats);
    for (chat, replies) in &replies {
        let n: usize = chat.trim_start_matches("chat-").parse().unwrap();
        let expected: Vec<String> = (0..per_chat)
            .map(|m| format!("{} | {m}", text(n, m)))
            .collect();
        assert_eq!(
            replies, &expected,
            "{chat}: replies in arrival order, each with every earlier turn in context"
        );
    }
    assert_eq!(sink.count(), expected, "no reply doubled");
}

/// `kill -9` each stage in turn (classify, respond, egress, ingest) while
/// `count` messages are being answered, one after each sixth of the
/// replies, starting it again 300 ms later (messages keep coming meanwhile).
pub async fn kill_nine_each_stage(pipeline: &mut Pipeline, sink: &sink::Sink, count: usize) {
    for (round, stage) in ["classify", "respond", "egress", "ingest"]
        .into_iter()
        .enumerate()
    {
        let progress = (round + 1) * count / 6;
        wait_for(
            "progress before the next kill",
            Duration::from_secs(60),
            || sink.count() >= progress,
        )
        .await;
        let process = pipeline.stage(stage);
        process.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        process.start_again();
    }
}

/// The key layout the stages use with `overlay`: its `[streams] partitions`
/// (the default otherwise) under `BOTLINE_PREFIX` (inherited by the stages).
pub fn streams_of(overlay: &str) -> botline_shared::streams::Streams {
    let partitions = overlay
        .parse::<toml::Table>()
        .ok()
        .and_then(|settings| settings.get("streams")?.get("partitions")?.as_integer())
        .and_then(|p| u32::try_from(p).ok())
        .unwrap_or(botline_shared::streams::DEFAULT_PARTITIONS);
    let prefix = std::env::var("BOTLINE_PREFIX")
        .unwrap_or_else(|_| botline_shared::streams::DEFAULT_PREFIX.into());
    botline_shared::streams::Streams::new(prefix, partitions)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_config_file_is_laid_over_table_by_table() {
        let merged = super::laid_over(
            "[streams]\nretention_ms = 1\ndead_max_len = 2\n[classify]\nintent_model = \"embedding\"\n",
            "[streams]\nretention_ms = 3\n[egress]\nsent_ttl_ms = 4\n",
        )
        .unwrap();
        let merged: toml::Table = merged.parse().unwrap();
        assert_eq!(merged["streams"]["retention_ms"].as_integer(), Some(3));
        assert_eq!(merged["streams"]["dead_max_len"].as_integer(), Some(2));
        assert_eq!(
            merged["classify"]["intent_model"].as_str(),
            Some("embedding")
        );
        assert_eq!(merged["egress"]["sent_ttl_ms"].as_integer(), Some(4));
        assert!(super::laid_over("", "[streams\n").is_err());
    }
}
