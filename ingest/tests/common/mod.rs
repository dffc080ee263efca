//! A running ingest against its own redis-server, on a free port.
#![allow(dead_code)]

pub mod connections;

use botline_ingest::config::Schedule;
use botline_ingest::Ingest;
use botline_shared::codec;
use botline_shared::config::{ProcessConfig, Settings};
use botline_shared::message::UnifiedMessage;
use botline_shared::streams::Streams;
use botline_shared::telemetry::Health;
use botline_shared::testing::RedisServer;
use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-0123456789abcdef";

/// The name of `in`, which [`read_inbound`] and the helpers of
/// [`connections`] read in every partition.
pub const INBOUND: &str = "in";

pub struct Harness {
    pub redis: RedisServer,
    pub addr: SocketAddr,
    pub streams: Streams,
    pub shutdown: CancellationToken,
    /// What `/readyz` reads, and the pool it pings Redis with.
    pub health: Health,
    pub pool: botline_shared::redis_conn::Pool,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Ingest with its settings, as `main` builds it, for the redis at `url`.
pub fn ingest_for(url: &str, jwt_secret: Option<&str>) -> Ingest {
    configured_ingest(url, None, &[], jwt_secret).unwrap()
}

/// Ingest with the behaviour `overlay` (TOML) and the environment `env`
/// (platform secrets), or the error that would stop it at start.
pub fn configured_ingest(
    url: &str,
    overlay: Option<&str>,
    env: &[(&str, &str)],
    jwt_secret: Option<&str>,
) -> Result<Ingest, botline_shared::Error> {
    let process = ProcessConfig::from_env(&[("BOTLINE_REDIS_URL", url)], "127.0.0.1:0").unwrap();
    let settings = Settings::from_overlay(overlay)?;
    Ingest::connect(
        &process,
        &settings,
        &env.to_vec(),
        jwt_secret.map(str::to_owned),
        Health::default(),
    )
}

/// Start ingest with the generic API enabled; `adjust` may change its settings.
pub async fn start(adjust: impl FnOnce(&mut Ingest)) -> Harness {
    start_with(Some(SECRET), adjust).await
}

pub async fn start_with(secret: Option<&str>, adjust: impl FnOnce(&mut Ingest)) -> Harness {
    let redis = RedisServer::start();
    let mut ingest = ingest_for(&redis.url(), secret);
    ingest.settings.backlog_poll_ms = 20;
    adjust(&mut ingest);
    serve(redis, ingest).await
}

/// Start ingest with the behaviour `overlay` (a platform enabled, say) and
/// the environment `env` (its secrets).
pub async fn start_configured(overlay: &str, env: &[(&str, &str)]) -> Harness {
    start_on(RedisServer::start(), overlay, env).await
}

/// [`start_configured`] on a Redis the test prepared first.
pub async fn start_on(redis: RedisServer, overlay: &str, env: &[(&str, &str)]) -> Harness {
    let ingest = configured_ingest(&redis.url(), Some(overlay), env, None).unwrap();
    serve(redis, ingest).await
}

/// The text of `ingest/tests/fixtures/<platform>/<name>`.
pub fn fixture(platform: &str, name: &str) -> String {
    let path = format!(
        "{}/tests/fixtures/{platform}/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("{path}: {error}"))
}

/// Serve `ingest` on a free port.
async fn serve(redis: RedisServer, ingest: Ingest) -> Harness {
    let streams = ingest.streams.clone();
    let (health, pool) = (ingest.health.clone(), ingest.pool.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(botline_ingest::run(listener, ingest, shutdown.clone()));
    Harness {
        redis,
        addr,
        streams,
        shutdown,
        health,
        pool,
    }
}

/// This test process's metrics recorder, installed by the first caller:
/// tests that read metrics keep to series of their own (a bot id no other
/// test uses), since every test in the process records into it.
pub fn prometheus() -> metrics_exporter_prometheus::PrometheusHandle {
    static PROMETHEUS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    PROMETHEUS
        .get_or_init(|| botline_shared::telemetry::install_metrics().unwrap())
        .clone()
}

/// Ingest replicas on one Redis with the same settings, as a deployment
/// runs them: each serves on a free port, and the one holding a platform
/// connection's lease keeps it up.
pub struct Replicas {
    url: String,
    overlay: String,
    env: Vec<(String, String)>,
}

impl Replicas {
    /// Replicas on `redis` with the behaviour `overlay` and the environment
    /// `env` (the platform's secrets).
    pub fn new(redis: &RedisServer, overlay: String, env: &[(&str, &str)]) -> Replicas {
        Replicas {
            url: redis.url(),
            overlay,
            env: env
                .iter()
                .map(|(name, value)| (name.to_string(), value.to_string()))
                .collect(),
        }
    }

    /// The same replicas, but with the behaviour `overlay` (one that
    /// cannot reach the platform, say).
    pub fn with_overlay(&self, overlay: String) -> Replicas {
        Replicas {
            url: self.url.clone(),
            overlay,
            env: self.env.clone(),
        }
    }

    /// One on the test's runtime, until `shutdown`; the name of `in`.
    pub fn start(&self, shutdown: &CancellationToken) -> String {
        self.start_on(&tokio::runtime::Handle::current(), shutdown)
    }

    /// One on a runtime of its own, which it dies with:
    /// `shutdown_background()` on that runtime is a death without a word
    /// (no lease given up, no socket closed). The runtime, and the name of
    /// `in`.
    pub fn start_doomed(&self) -> (tokio::runtime::Runtime, String) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let key = self.start_on(runtime.handle(), &CancellationToken::new());
        (runtime, key)
    }

    /// One served on `runtime`'s threads until `shutdown` (or until the
    /// runtime is dropped); the name of `in`.
    fn start_on(&self, runtime: &tokio::runtime::Handle, shutdown: &CancellationToken) -> String {
        let env: Vec<(&str, &str)> = self
            .env
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        let ingest = configured_ingest(&self.url, Some(&self.overlay), &env, None).unwrap();
        let key = INBOUND.to_string();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let shutdown = shutdown.clone();
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            botline_ingest::run(listener, ingest, shutdown).await
        });
        key
    }
}

pub fn schedules(toml_entries: &str) -> Vec<Schedule> {
    botline_ingest::config::IngestSettings::from_toml(toml_entries)
        .unwrap()
        .schedules()
        .unwrap()
}

impl Harness {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Serve `/metrics`, `/healthz` and `/readyz` as `main` does, until
    /// the harness drops: their base URL.
    pub async fn serve_health(&self) -> String {
        let router = botline_shared::telemetry::health_router(
            self.health.clone(),
            self.pool.clone(),
            prometheus(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await
        });
        base
    }

    /// Every entry of `in` over every partition, decoded.
    pub fn inbound(&self) -> Vec<UnifiedMessage> {
        read_inbound(&self.redis)
    }

    pub fn redis_cmd<T: redis::FromRedisValue>(&self, cmd: &mut redis::Cmd) -> T {
        cmd.query(&mut self.redis.connection()).unwrap()
    }
}

pub fn read_stream<R: codec::Record>(redis: &RedisServer, key: &str) -> Vec<R> {
    botline_shared::testing::read_stream(&mut redis.connection(), key)
}

/// Every message in `in` over every partition, in arrival order.
pub fn read_inbound(redis: &RedisServer) -> Vec<UnifiedMessage> {
    botline_shared::testing::read_partitioned(&mut redis.connection(), INBOUND)
}

/// A token signed like a real client's: HS256, `exp` in an hour.
pub fn token(claims: serde_json::Value) -> String {
    token_signed(claims, SECRET)
}

pub fn token_signed(claims: serde_json::Value, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

pub fn now_secs() -> i64 {
    botline_shared::now_ms() / 1000
}

pub fn valid_token() -> String {
    token(serde_json::json!({ "sub": "integration", "exp": now_secs() + 3600 }))
}

/// Wait for `condition` to hold, polling, up to `within`.
pub async fn wait_for<F, Fut>(within: Duration, what: &str, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if condition().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

/// Wait for `condition` (a quick look, which must not block) to hold,
/// polling, up to `within`.
pub async fn wait_until(within: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    wait_for(within, what, || {
        let held = condition();
        async move { held }
    })
    .await;
}

/// POST `body` (JSON) to `/hooks/<platform>` with `headers`: the status and
/// the JSON answer (`null` if none).
pub async fn post_hook(
    harness: &Harness,
    platform: &str,
    body: &str,
    headers: &[(&str, String)],
) -> (u16, serde_json::Value) {
    let mut request = reqwest::Client::new()
        .post(harness.url(&format!("/hooks/{platform}")))
        .header("content-type", "application/json")
        .body(body.to_string());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (
        status,
        response.json().await.unwrap_or(serde_json::Value::Null),
    )
}

/// An answer of `status` whose `error` says `error`.
pub fn assert_refused(answer: (u16, serde_json::Value), status: u16, error: &str) {
    assert_eq!(answer.0, status, "{answer:?}");
    let said = answer.1["error"].as_str().unwrap_or_default();
    assert!(said.contains(error), "expected {error:?} in {said:?}");
}

/// A WebSocket a platform's stand-in accepted.
pub type ServerSocket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Accept connections on `listener` (a stand-in's), each served by `serve`
/// in a task of its own.
pub fn accept_each<Serve, Served>(listener: tokio::net::TcpListener, serve: Serve)
where
    Serve: Fn(tokio::net::TcpStream) -> Served + Send + 'static,
    Served: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(serve(stream));
        }
    });
}

/// The next JSON frame the client sent on a stand-in's socket, or `None`
/// once the connection is over; `pinged` is called at each WebSocket ping
/// (tungstenite answers it with a pong).
pub async fn read_json(
    socket: &mut ServerSocket,
    mut pinged: impl FnMut(),
) -> Option<serde_json::Value> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match socket.next().await? {
            Ok(Message::Text(text)) => return serde_json::from_str(&text).ok(),
            Ok(Message::Ping(_)) => pinged(),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => continue,
        }
    }
}

/// A socket silent since `silenced` was replaced after `idle_timeout` (and a
/// reconnect backoff of well under a second), not before, nor much later.
pub fn assert_replaced_after_idle(silenced: Instant, idle_timeout: Duration) {
    let found = silenced.elapsed();
    assert!(
        found >= idle_timeout.mul_f64(0.9) && found < idle_timeout + Duration::from_secs(2),
        "replaced after its idle time ({idle_timeout:?}): {found:?}"
    );
}
