//! Back-pressure: how far `classify` is behind on `in`, read every
//! `backlog_poll_ms` into an atomic the request handlers consult for free.
//! The lag of the `classify` group is the measure; when Redis cannot tell
//! (lag unknown) or the group does not exist yet, the stream's length is.

use botline_shared::redis_conn::Pool;
use botline_shared::streams::group;
use botline_shared::telemetry::group_infos;
use botline_shared::Error;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::warn;

/// The last backlog read, shared by every handler.
#[derive(Clone, Default)]
pub struct Backlog {
    entries: Arc<AtomicU64>,
}

impl Backlog {
    pub fn get(&self) -> u64 {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn set(&self, entries: u64) {
        self.entries.store(entries, Ordering::Relaxed);
        metrics::gauge!("botline_ingest_backlog").set(entries as f64);
    }
}

/// Entries of every partition's `in` the `classify` group has not been given yet.
pub async fn read_backlog(pool: &Pool, streams: &[String]) -> Result<u64, Error> {
    let mut total = 0;
    for stream in streams {
        total += read_stream_backlog(pool, stream).await?;
    }
    Ok(total)
}

async fn read_stream_backlog(pool: &Pool, stream: &str) -> Result<u64, Error> {
    let mut connection = pool.get().await?;
    let lag = group_infos(&mut connection, stream)
        .await?
        .into_iter()
        .find(|info| info.name == group::CLASSIFY)
        .and_then(|info| info.lag);
    match lag {
        Some(lag) => Ok(lag),
        None => Ok(redis::cmd("XLEN")
            .arg(stream)
            .query_async(&mut connection)
            .await?),
    }
}

/// Keep `backlog` current until `shutdown`. A failed read keeps the last value.
pub async fn watch_backlog(
    pool: Pool,
    streams: Vec<String>,
    backlog: Backlog,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        match read_backlog(&pool, &streams).await {
            Ok(entries) => backlog.set(entries),
            Err(error) => warn!(message = "could not read the backlog of in", %error),
        }
    }
}
