//! Consumer names and the upkeep a runner does beside its read loop.
//!
//! A replica's consumer name is `<stage>-<host>-<n>`, `n` the lowest number
//! whose lease in Redis is free on this host. The lease holds the host and
//! process id, so a process restarted on the same host (same container, or
//! after `kill -9` here) takes its old name back and resumes its own pending
//! entries; `--scale classify=3` needs no configuration.
//!
//! The upkeep renews the lease and trims input streams below what every
//! group has been delivered and acknowledged, keeping `retention_ms` for replay.

use crate::redis_conn::{id_order, Pool};
use crate::runner::Plumbing;
use crate::{now_ms, Error};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Replaces the lease only if it still holds what the caller saw.
const TAKE_OVER_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
end
return false
"#;

#[derive(Debug, Clone)]
pub struct ConsumerLease {
    key: Option<String>,
    holder: String,
    consumer: String,
    ttl: Duration,
}

fn host_name() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|name| !name.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
        .map(|name| name.trim().to_string())
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl ConsumerLease {
    pub async fn acquire(plumbing: &Plumbing, group: &str) -> Result<Self, Error> {
        let ttl = plumbing.runner.lease_ttl();
        if let Some(consumer) = &plumbing.consumer {
            return Ok(ConsumerLease {
                key: None,
                holder: String::new(),
                consumer: consumer.clone(),
                ttl,
            });
        }
        let host = host_name();
        let pid = std::process::id();
        let holder = format!("{host}|{pid}|{}", ulid::Ulid::new());
        let mut connection = plumbing.pool.get().await?;
        for number in 0.. {
            let consumer = format!("{group}-{host}-{number}");
            let key = plumbing.streams.consumer_lease(group, &consumer);
            let taken: Option<String> = redis::cmd("SET")
                .arg(&key)
                .arg(&holder)
                .arg("NX")
                .arg("PX")
                .arg(ttl.as_millis() as u64)
                .query_async(&mut connection)
                .await?;
            let ours = if taken.is_some() {
                true
            } else {
                let current: Option<String> = redis::cmd("GET")
                    .arg(&key)
                    .query_async(&mut connection)
                    .await?;
                match current {
                    Some(current) if holder_is_gone(&current, &host, pid) => {
                        let replaced: Option<String> = redis::Script::new(TAKE_OVER_SCRIPT)
                            .key(&key)
                            .arg(&current)
                            .arg(&holder)
                            .arg(ttl.as_millis() as u64)
                            .invoke_async(&mut connection)
                            .await?;
                        replaced.is_some()
                    }
                    _ => false,
                }
            };
            if ours {
                return Ok(ConsumerLease {
                    key: Some(key),
                    holder,
                    consumer,
                    ttl,
                });
            }
        }
        unreachable!("the numbers never run out")
    }

    pub fn consumer(&self) -> &str {
        &self.consumer
    }

    async fn renew(&self, pool: &Pool, ttl_ms: u64) -> Result<bool, Error> {
        let Some(key) = &self.key else {
            return Ok(true);
        };
        let mut connection = pool.get().await?;
        let renewed: i64 = crate::scripts::LEASE
            .key(key)
            .arg(&self.holder)
            .arg(ttl_ms)
            .invoke_async(&mut connection)
            .await?;
        Ok(renewed == 1)
    }

    pub async fn release(&self, pool: &Pool) {
        if let Err(error) = self.renew(pool, 0).await {
            warn!(message = "could not release consumer lease", %error);
        }
    }
}

/// A lease left by a process on this host that no longer runs (or by this
/// very process id: a container restarted keeps its host name and pid 1).
fn holder_is_gone(current: &str, host: &str, pid: u32) -> bool {
    let mut parts = current.split('|');
    let (Some(their_host), Some(their_pid)) = (parts.next(), parts.next()) else {
        return false;
    };
    let Ok(their_pid) = their_pid.parse::<u32>() else {
        return false;
    };
    their_host == host && (their_pid == pid || !process_alive(their_pid))
}

/// Renew the lease and trim the inputs until `shutdown`.
pub async fn maintain(
    lease: ConsumerLease,
    plumbing: Plumbing,
    inputs: Vec<String>,
    shutdown: CancellationToken,
) {
    let renew_every = lease.ttl / 3;
    let trim_every = Duration::from_millis(plumbing.stream_settings.trim_interval_ms.max(1));
    let mut renew = tokio::time::interval(renew_every);
    let mut trim = tokio::time::interval(trim_every);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = renew.tick() => {
                match lease.renew(&plumbing.pool, lease.ttl.as_millis() as u64).await {
                    Ok(true) => {}
                    Ok(false) => warn!(message = "consumer lease lost; another process may share this name", consumer = %lease.consumer),
                    Err(error) => warn!(message = "could not renew consumer lease", %error),
                }
            }
            _ = trim.tick() => {
                for stream in &inputs {
                    if let Err(error) = trim_stream(&plumbing.pool, stream, plumbing.stream_settings.retention_ms).await {
                        warn!(message = "trim failed", stream = %stream, %error);
                    }
                }
            }
        }
    }
}

/// `XTRIM MINID` below the oldest entry any group still needs, and never
/// within the retention window. Returns how many entries went.
pub async fn trim_stream(pool: &Pool, stream: &str, retention_ms: u64) -> Result<u64, Error> {
    let Some(keep_from) = keep_from(pool, stream, retention_ms).await? else {
        return Ok(0);
    };
    let mut connection = pool.get().await?;
    let trimmed: u64 = redis::cmd("XTRIM")
        .arg(stream)
        .arg("MINID")
        .arg("~")
        .arg(&keep_from)
        .query_async(&mut connection)
        .await?;
    if trimmed > 0 {
        info!(message = "trimmed stream", stream = %stream, entries = trimmed, below = %keep_from);
    }
    Ok(trimmed)
}

/// The first id of `stream` that must stay: the lowest of the retention
/// window's start, each group's last delivered id and each group's oldest
/// pending id. `None` when the stream has no group (nothing is known).
pub async fn keep_from(
    pool: &Pool,
    stream: &str,
    retention_ms: u64,
) -> Result<Option<String>, Error> {
    let mut connection = pool.get().await?;
    let groups = crate::telemetry::group_infos(&mut connection, stream).await?;
    if groups.is_empty() {
        return Ok(None);
    }
    let mut keep_from = format!("{}-0", now_ms() - retention_ms as i64);
    for group in &groups {
        if id_lower(&group.last_delivered_id, &keep_from) {
            keep_from = group.last_delivered_id.clone();
        }
        if let Some(oldest) = &group.oldest_pending_id {
            if id_lower(oldest, &keep_from) {
                keep_from = oldest.clone();
            }
        }
    }
    Ok(Some(keep_from))
}

fn id_lower(a: &str, b: &str) -> bool {
    id_order(a) < id_order(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_taken_back_only_from_a_dead_process_on_this_host() {
        let me = std::process::id();
        assert!(holder_is_gone(&format!("h|{me}|x"), "h", me));
        assert!(!holder_is_gone(&format!("other|{me}|x"), "h", me));
        assert!(holder_is_gone("h|4000000000|x", "h", me));
        assert!(!holder_is_gone("h|1|x", "h", me), "pid 1 is alive here");
        assert!(!holder_is_gone("garbage", "h", me));
    }

    #[test]
    fn ids_order_by_time_then_sequence() {
        assert!(id_lower("1-5", "2-0"));
        assert!(id_lower("2-1", "2-10"));
        assert!(!id_lower("3-0", "2-99"));
    }
}
