//! Wiring only: environment, settings, telemetry, signal, then [`botline_ingest::run`].

use anyhow::Context;
use botline_ingest::config::HttpConfig;
use botline_ingest::Ingest;
use botline_shared::config::{ProcessConfig, ProcessEnv};
use botline_shared::telemetry::{self, Telemetry};
use std::time::Duration;
use tracing::info;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let process = ProcessConfig::from_env(&ProcessEnv, "127.0.0.1:9101")?;
    let http = HttpConfig::from_env(&ProcessEnv)?;
    let telemetry = Telemetry::init(&process)?;
    let settings = process.settings()?;
    let ingest = Ingest::connect(
        &process,
        &settings,
        &ProcessEnv,
        http.jwt_secret.clone(),
        telemetry.health.clone(),
    )?;
    info!(message = "starting ingest", process = %process.redacted(), http = %http.redacted(), settings = ?ingest.settings);
    botline_shared::redis_conn::check_at_start(&ingest.client)
        .await
        .context("ingest: bad environment")?;
    // The previous (single-stream) layout's unfinished entries would never
    // be handled: `botline migrate` first. Redis not answering yet is only
    // logged, as above.
    match botline_shared::ops::refuse_old_layout(&ingest.pool, ingest.streams.prefix()).await {
        Err(error @ botline_shared::Error::Config { .. }) => {
            return Err(error).context("ingest: the previous layout is not migrated")
        }
        Err(error) => tracing::warn!(message = "could not look for the previous layout", %error),
        Ok(()) => {}
    }
    let shutdown = telemetry::shutdown_on_signal();
    let health =
        telemetry::health_router(telemetry.health, ingest.pool.clone(), telemetry.prometheus);
    telemetry::serve(process.metrics_addr, health, shutdown.clone()).await?;
    let every = Duration::from_millis(ingest.stream_settings.metrics_interval_ms);
    let watched = ingest
        .streams
        .all()
        .map(|p| ingest.streams.inbound(p))
        .collect();
    let watcher = telemetry::watch_streams(
        ingest.pool.clone(),
        ingest.streams.clone(),
        watched,
        every,
        shutdown.clone(),
    );
    tokio::spawn(watcher);
    let listener = tokio::net::TcpListener::bind(http.http_addr)
        .await
        .with_context(|| format!("BOTLINE_HTTP_ADDR {}", http.http_addr))?;
    botline_ingest::run(listener, ingest, shutdown)
        .await
        .context("serving")
}
