use anyhow::Context;
use botline_egress::EgressSettings;
use botline_shared::config::{ProcessConfig, ProcessEnv};
use botline_shared::runner::{Plumbing, Stage};
use botline_shared::telemetry::{self, Telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let process =
        ProcessConfig::from_env(&ProcessEnv, "127.0.0.1:9104").context("process settings")?;
    let telemetry = Telemetry::init(&process).context("telemetry")?;
    let settings = process.settings().context("settings")?;
    let egress = EgressSettings::from_settings(&settings).context("settings")?;
    tracing::info!(message = "egress starting", process = %process.redacted(), egress = %egress.summary());
    let shutdown = telemetry::shutdown_on_signal();
    let plumbing =
        Plumbing::connect(&process, &settings, telemetry.health.clone()).context("redis")?;
    let router = telemetry::health_router(
        telemetry.health.clone(),
        plumbing.pool.clone(),
        telemetry.prometheus.clone(),
    );
    telemetry::serve(process.metrics_addr, router, shutdown.clone())
        .await
        .context("health server")?;
    let stage = botline_egress::build(egress, &ProcessEnv, &plumbing, shutdown.clone())
        .context("senders")?;
    let mut watched: Vec<String> = stage
        .inputs()
        .into_iter()
        .map(|input| input.stream)
        .collect();
    watched.extend([plumbing.streams.delivered(), plumbing.streams.dead()]);
    let interval = std::time::Duration::from_millis(plumbing.stream_settings.metrics_interval_ms);
    tokio::spawn(telemetry::watch_streams(
        plumbing.pool.clone(),
        plumbing.streams.clone(),
        watched,
        interval,
        shutdown.clone(),
    ));
    let deadline = plumbing.runner.shutdown_deadline();
    let run = botline_egress::run(stage, plumbing, shutdown.clone());
    tokio::pin!(run);
    tokio::select! {
        result = &mut run => result.context("egress")?,
        _ = shutdown.cancelled() => tokio::time::timeout(deadline, run)
            .await
            .with_context(|| format!("the batch in hand was not finished within {deadline:?}"))?
            .context("egress")?,
    }
    Ok(())
}
