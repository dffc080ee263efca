//! What every stage binary does before and around its stage, in one place,
//! so each `main.rs` only names its stage: read the environment and the
//! settings (stopping with the bad setting's name), set up logs and
//! metrics, serve `/metrics` `/healthz` `/readyz`, export the watched
//! streams' lag, and on SIGTERM give the batch in hand a deadline.

use crate::config::{ProcessConfig, ProcessEnv, Settings};
use crate::runner::Plumbing;
use crate::streams::Streams;
use crate::telemetry::{self, Telemetry};
use crate::Error;
use anyhow::Context;
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub struct Service {
    pub name: &'static str,
    pub process: ProcessConfig,
    pub settings: Settings,
    pub telemetry: Telemetry,
    pub plumbing: Plumbing,
    pub shutdown: CancellationToken,
}

impl Service {
    /// Everything up to the stage itself. `watched` names the streams whose
    /// length and group lag this binary exports besides `in`, the queues,
    /// `delivered` and `dead`, which every binary exports.
    pub async fn start(
        name: &'static str,
        default_metrics_addr: &str,
        watched: impl FnOnce(&Streams) -> Vec<String>,
    ) -> anyhow::Result<Service> {
        let process = ProcessConfig::from_env(&ProcessEnv, default_metrics_addr)
            .with_context(|| format!("{name}: bad environment"))?;
        let telemetry = Telemetry::init(&process).with_context(|| format!("{name}: metrics"))?;
        info!(message = "starting", stage = name, settings = %process.redacted());
        let settings = process
            .settings()
            .with_context(|| format!("{name}: bad settings"))?;
        let plumbing = Plumbing::connect(&process, &settings, telemetry.health.clone())
            .with_context(|| format!("{name}: bad settings"))?;
        info!(
            message = "redis",
            cluster = plumbing.client.is_cluster(),
            partitions = plumbing.streams.partitions()
        );
        crate::redis_conn::check_at_start(&plumbing.client.node)
            .await
            .with_context(|| format!("{name}: bad environment"))?;
        let shutdown = telemetry::shutdown_on_signal();
        let router = telemetry::health_router(
            telemetry.health.clone(),
            plumbing.pool.clone(),
            telemetry.prometheus.clone(),
        );
        telemetry::serve(process.metrics_addr, router, shutdown.clone()).await?;
        // Every stage exports the shared streams, so a stage that is down
        // (or all of whose replicas are) still has its lag reported by the others.
        let streams = &plumbing.streams;
        let mut keys = Vec::new();
        for p in streams.all() {
            keys.extend([
                streams.inbound(p),
                streams.queue(p),
                streams.delivered(p),
                streams.dead(p),
            ]);
        }
        for key in watched(streams) {
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        tokio::spawn(telemetry::watch_streams(
            plumbing.pool.clone(),
            plumbing.streams.clone(),
            keys,
            Duration::from_millis(plumbing.stream_settings.metrics_interval_ms),
            shutdown.clone(),
        ));
        Ok(Service {
            name,
            process,
            settings,
            telemetry,
            plumbing,
            shutdown,
        })
    }

    /// Run the stage until shutdown; once shutdown is signalled it gets
    /// `runner.shutdown_deadline_ms` more, then whatever it holds stays
    /// pending for the next start.
    pub async fn run<F>(
        self,
        stage: impl FnOnce(Settings, Plumbing, CancellationToken) -> F,
    ) -> anyhow::Result<()>
    where
        F: Future<Output = Result<(), Error>>,
    {
        let deadline = self.plumbing.runner.shutdown_deadline();
        let shutdown = self.shutdown.clone();
        let running = stage(self.settings, self.plumbing, self.shutdown);
        tokio::pin!(running);
        let result = tokio::select! {
            result = &mut running => result,
            _ = shutdown.cancelled() => match tokio::time::timeout(deadline, &mut running).await {
                Ok(result) => result,
                Err(_) => {
                    warn!(message = "shutdown deadline passed; unfinished entries stay pending", stage = self.name, ?deadline);
                    Ok(())
                }
            },
        };
        result.with_context(|| format!("{} stopped", self.name))
    }
}
