//! Logs, metrics and health, the same in every binary: `tracing` (text or
//! JSON), a Prometheus recorder, and a small HTTP server for `/metrics`,
//! `/healthz` (the process runs) and `/readyz` (Redis answers and every
//! named check passes). A watcher exports each stream's length and each
//! group's lag, pending count and ages, read from Redis itself.

use crate::config::{LogFormat, ProcessConfig};
use crate::redis_conn::{self, id_millis, Pool};
use crate::streams::Streams;
use crate::{now_ms, Error};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use redis::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

const SECONDS_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
const COUNT_BUCKETS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0];

/// `tracing` to stderr, filtered by `BOTLINE_LOG` (default `info`).
pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BOTLINE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

/// Install the Prometheus recorder for this process and keep its histograms drained.
pub fn install_metrics() -> Result<PrometheusHandle, Error> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full("botline_stage_batch_size".into()),
                COUNT_BUCKETS,
            )
        })
        .and_then(|b| b.install_recorder())
        .map_err(|error| Error::config("metrics", error))?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Named readiness checks (a stage's read loop, a listener, …).
#[derive(Clone, Default)]
pub struct Health {
    checks: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Health {
    pub fn set(&self, name: &str, ok: bool) {
        let mut checks = self.checks.lock().expect("health lock");
        if checks.get(name) != Some(&ok) {
            checks.insert(name.to_string(), ok);
        }
    }

    fn snapshot(&self) -> BTreeMap<String, bool> {
        self.checks.lock().expect("health lock").clone()
    }
}

#[derive(Clone)]
struct HealthState {
    health: Health,
    pool: Pool,
    prometheus: PrometheusHandle,
}

/// `/metrics`, `/healthz`, `/readyz`.
pub fn health_router(health: Health, pool: Pool, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(state): State<HealthState>| async move { state.prometheus.render() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(HealthState {
            health,
            pool,
            prometheus,
        })
}

async fn ready(State(state): State<HealthState>) -> impl IntoResponse {
    let redis_ok = tokio::time::timeout(Duration::from_secs(2), async {
        let mut connection = state.pool.get().await.ok()?;
        redis::cmd("PING")
            .query_async::<String>(&mut connection)
            .await
            .ok()
    })
    .await
    .ok()
    .flatten()
    .is_some();
    let mut checks = state.health.snapshot();
    checks.insert("redis".into(), redis_ok);
    let ready = checks.values().all(|ok| *ok);
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({ "ready": ready, "checks": checks })),
    )
}

/// Serve `router` on `addr` until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    router: Router,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|error| Error::config("BOTLINE_METRICS_ADDR", format!("{addr}: {error}")))?;
    info!(message = "health and metrics listening", addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default());
    tokio::spawn(async move {
        let served = axum::serve(listener, router)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await;
        if let Err(error) = served {
            warn!(message = "health server stopped", %error);
        }
    });
    Ok(())
}

/// A token cancelled on SIGTERM or Ctrl-C.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        info!(message = "shutting down");
        cancel.cancel();
    });
    token
}

/// What `XINFO GROUPS` and `XPENDING` say about one group.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupInfo {
    pub name: String,
    pub consumers: u64,
    pub pending: u64,
    pub last_delivered_id: String,
    /// `None` when Redis cannot tell (after deletions or trimming): unknown, not 0.
    pub lag: Option<u64>,
    pub oldest_pending_id: Option<String>,
}

/// The groups of `stream` (none if it does not exist), with their oldest pending entry.
pub async fn group_infos(
    connection: &mut crate::redis_conn::Pooled,
    stream: &str,
) -> Result<Vec<GroupInfo>, Error> {
    let reply: Result<Value, redis::RedisError> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(connection)
        .await;
    let reply = match reply {
        Ok(reply) => reply,
        Err(error) if error.to_string().contains("no such key") => return Ok(Vec::new()),
        Err(error) => return Err(error.into()),
    };
    let mut groups = parse_groups(reply)?;
    for group in &mut groups {
        if group.pending > 0 {
            let summary: Value = redis::cmd("XPENDING")
                .arg(stream)
                .arg(&group.name)
                .query_async(connection)
                .await?;
            if let Value::Array(mut parts) = summary {
                if parts.len() >= 2 {
                    group.oldest_pending_id = redis_conn::string(parts.swap_remove(1)).ok();
                }
            }
        }
    }
    Ok(groups)
}

fn parse_groups(reply: Value) -> Result<Vec<GroupInfo>, Error> {
    let Value::Array(groups) = reply else {
        return Err(Error::Garbage("XINFO GROUPS reply is not an array".into()));
    };
    groups
        .into_iter()
        .map(|group| {
            if !matches!(group, Value::Array(_) | Value::Map(_)) {
                return Err(Error::Garbage(format!("XINFO GROUPS entry: {group:?}")));
            }
            let fields = redis_conn::field_map(group);
            let number = |name: &str| match fields.get(name) {
                Some(Value::Int(n)) => Some(*n as u64),
                _ => None,
            };
            let text = |name: &str| {
                fields
                    .get(name)
                    .cloned()
                    .and_then(|v| redis_conn::string(v).ok())
            };
            Ok(GroupInfo {
                name: text("name").unwrap_or_default(),
                consumers: number("consumers").unwrap_or(0),
                pending: number("pending").unwrap_or(0),
                last_delivered_id: text("last-delivered-id").unwrap_or_else(|| "0-0".into()),
                lag: number("lag"),
                oldest_pending_id: None,
            })
        })
        .collect()
}

/// The id of the oldest entry of `stream` that `group` has not been given
/// yet (time-based lag), if there is one.
pub async fn first_undelivered_id(
    connection: &mut crate::redis_conn::Pooled,
    stream: &str,
    group: &GroupInfo,
) -> Result<Option<String>, Error> {
    let next: Value = redis::cmd("XRANGE")
        .arg(stream)
        .arg(format!("({}", group.last_delivered_id))
        .arg("+")
        .arg("COUNT")
        .arg(1)
        .query_async(connection)
        .await?;
    Ok(redis_conn::parse_entries(stream, next)?
        .into_iter()
        .next()
        .map(|entry| entry.id))
}

/// Export length, lag, pending and ages of `keys` every `interval` until `shutdown`.
pub async fn watch_streams(
    pool: Pool,
    streams: Streams,
    keys: Vec<String>,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        for key in &keys {
            if let Err(error) = export_stream(&pool, &streams, key).await {
                warn!(message = "could not read stream metrics", stream = %key, %error);
            }
        }
    }
}

async fn export_stream(pool: &Pool, streams: &Streams, key: &str) -> Result<(), Error> {
    let mut connection = pool.get().await?;
    let (stream, partition) = streams.short(key);
    let (stream, partition) = (
        stream.to_string(),
        partition.map_or(String::new(), |p| p.to_string()),
    );
    let length: u64 = redis::cmd("XLEN")
        .arg(key)
        .query_async(&mut connection)
        .await?;
    metrics::gauge!("botline_stream_length", "stream" => stream.clone(), "partition" => partition.clone())
        .set(length as f64);
    let now = now_ms();
    for group in group_infos(&mut connection, key).await? {
        let labels = [
            ("stream", stream.clone()),
            ("partition", partition.clone()),
            ("group", group.name.clone()),
        ];
        metrics::gauge!("botline_group_consumers", &labels).set(group.consumers as f64);
        metrics::gauge!("botline_group_pending", &labels).set(group.pending as f64);
        metrics::gauge!("botline_group_lag", &labels)
            .set(group.lag.map_or(f64::NAN, |lag| lag as f64));
        metrics::gauge!("botline_group_lag_unknown", &labels).set(if group.lag.is_none() {
            1.0
        } else {
            0.0
        });
        let pending_age = group
            .oldest_pending_id
            .as_deref()
            .and_then(id_millis)
            .map_or(0.0, |ms| (now - ms).max(0) as f64 / 1000.0);
        metrics::gauge!("botline_group_oldest_pending_age_seconds", &labels).set(pending_age);
        let undelivered_age = first_undelivered_id(&mut connection, key, &group)
            .await?
            .as_deref()
            .and_then(id_millis)
            .map_or(0.0, |ms| (now - ms).max(0) as f64 / 1000.0);
        metrics::gauge!("botline_group_oldest_undelivered_age_seconds", &labels)
            .set(undelivered_age);
    }
    Ok(())
}

/// Everything a binary sets up before its stage runs.
pub struct Telemetry {
    pub prometheus: PrometheusHandle,
    pub health: Health,
}

impl Telemetry {
    pub fn init(process: &ProcessConfig) -> Result<Self, Error> {
        init_tracing(process.log_format);
        Ok(Telemetry {
            prometheus: install_metrics()?,
            health: Health::default(),
        })
    }
}
