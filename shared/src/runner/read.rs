//! Reading one owned partition: its pending entries first (whoever they were
//! delivered to: the partition's previous owner may have died with them),
//! then new ones, blocking on a connection of its own, never more than the
//! window ahead of what the owner has acknowledged.

use crate::redis_conn::{self, id_order, Pool, RawEntry};
use crate::scripts;
use crate::streams::Partition;
use crate::Error;
use redis::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// What a partition's reader hands the dispatcher.
pub struct Read {
    pub partition: Partition,
    pub entries: Vec<RawEntry>,
    /// Delivery counts of entries taken over (new entries: 1).
    pub deliveries: HashMap<String, u64>,
    /// Entries taken over from a pending list (counted `claimed`).
    pub claimed: bool,
}

/// Where and how a reader reads.
pub struct Reader {
    pub partition: Partition,
    pub inputs: Vec<String>,
    pub group: &'static str,
    pub consumer: String,
    pub client: redis_conn::Redis,
    pub commands: redis_conn::Connection,
    pub batch_size: usize,
    pub block: Duration,
    /// One permit per entry the owner may hold unacknowledged.
    pub window: Arc<Semaphore>,
    pub to_dispatcher: mpsc::UnboundedSender<Read>,
    pub stop: CancellationToken,
}

impl Reader {
    /// Read until stopped; after an error, take over the pending entries
    /// again (the dispatcher drops what it already has).
    pub async fn run(self) {
        let mut backoff = Duration::from_millis(100);
        while !self.stop.is_cancelled() {
            match self.read_until_stopped().await {
                Ok(()) => return,
                Err(error) => {
                    warn!(message = "reading a partition failed; taking its pending entries again", stage = self.group, partition = self.partition, %error);
                    metrics::counter!("botline_stage_errors_total", "stage" => self.group)
                        .increment(1);
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn read_until_stopped(&self) -> Result<(), Error> {
        let mut connection = self.client.blocking(self.block).await?;
        for input in &self.inputs {
            self.take_pending(input).await?;
        }
        loop {
            let permits = tokio::select! {
                permits = self.window.acquire() => {
                    permits.expect("the window is never closed").forget();
                    1 + self.take_more_permits()
                }
                _ = self.stop.cancelled() => return Ok(()),
            };
            let entries = tokio::select! {
                entries = self.read_new(&mut connection, permits) => entries?,
                _ = self.stop.cancelled() => {
                    self.window.add_permits(permits);
                    return Ok(());
                }
            };
            self.window
                .add_permits(permits - entries.len().min(permits));
            if !entries.is_empty() && !self.hand_over(entries, HashMap::new(), false) {
                return Ok(());
            }
        }
    }

    /// The rest of the window's free permits, taken now: a read takes as
    /// much as the window has room for, so what waits at the end of a
    /// backlog (an urgent message) is in hand early, and a backlog is read
    /// in few commands.
    fn take_more_permits(&self) -> usize {
        let more = self.window.available_permits();
        if more > 0 {
            if let Ok(permits) = self.window.try_acquire_many(more as u32) {
                permits.forget();
                return more;
            }
        }
        0
    }

    fn hand_over(
        &self,
        entries: Vec<RawEntry>,
        deliveries: HashMap<String, u64>,
        claimed: bool,
    ) -> bool {
        self.to_dispatcher
            .send(Read {
                partition: self.partition,
                entries,
                deliveries,
                claimed,
            })
            .is_ok()
    }

    /// New entries of every input, blocking until one has some.
    async fn read_new(
        &self,
        connection: &mut redis_conn::Connection,
        count: usize,
    ) -> Result<Vec<RawEntry>, Error> {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count)
            .arg("BLOCK")
            .arg(self.block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.inputs);
        for _ in &self.inputs {
            cmd.arg(">");
        }
        let reply: Value = cmd.query_async(connection).await?;
        let mut entries = redis_conn::parse_read_reply(reply)?;
        // A read of several streams returns them in any order; a chat is in one.
        entries.sort_by_key(|entry| self.inputs.iter().position(|s| *s == entry.stream));
        Ok(entries)
    }

    /// Take every pending entry of `input` over (`XAUTOCLAIM` with no idle
    /// time, from the start: in stream order), with its delivery count.
    /// Entries whose payload was deleted are acknowledged and counted.
    async fn take_pending(&self, input: &str) -> Result<(), Error> {
        let mut cursor = "0-0".to_string();
        let mut connection = self.commands.clone();
        loop {
            let reply: Value = redis::cmd("XAUTOCLAIM")
                .arg(input)
                .arg(self.group)
                .arg(&self.consumer)
                .arg(0)
                .arg(&cursor)
                .arg("COUNT")
                .arg(self.batch_size)
                .query_async(&mut connection)
                .await?;
            let Value::Array(mut parts) = reply else {
                return Err(Error::Garbage("XAUTOCLAIM reply is not an array".into()));
            };
            if parts.len() < 2 {
                return Err(Error::Garbage("XAUTOCLAIM reply too short".into()));
            }
            let deleted = if parts.len() > 2 { parts.pop() } else { None };
            let claimed = redis_conn::parse_entries(input, parts.pop().unwrap_or(Value::Nil))?;
            cursor = redis_conn::string(parts.pop().unwrap_or(Value::Nil))?;
            if let Some(Value::Array(deleted)) = deleted {
                if !deleted.is_empty() {
                    let ids = deleted
                        .into_iter()
                        .map(redis_conn::string)
                        .collect::<Result<Vec<_>, _>>()?;
                    let _: i64 = redis::cmd("XACK")
                        .arg(input)
                        .arg(self.group)
                        .arg(&ids)
                        .query_async(&mut connection)
                        .await?;
                    warn!(
                        message = "pending entries had been deleted from the stream",
                        stage = self.group,
                        count = ids.len()
                    );
                    super::count(self.group, "deleted", ids.len());
                }
            }
            if !claimed.is_empty() {
                let window = self.window.clone();
                // Pending entries count against the window like new ones.
                let permits = claimed.len();
                tokio::select! {
                    permits = window.acquire_many(permits as u32) => permits.expect("the window is never closed").forget(),
                    _ = self.stop.cancelled() => return Ok(()),
                }
                let deliveries =
                    delivery_counts(&mut connection, input, self.group, &self.consumer, &claimed)
                        .await?;
                info!(message = "took over pending entries", stage = self.group, stream = %input, count = claimed.len());
                if !self.hand_over(claimed, deliveries, true) {
                    return Ok(());
                }
            }
            if cursor == "0-0" {
                return Ok(());
            }
        }
    }
}

/// How many times each of `entries` (of one stream, in stream order) has
/// been delivered to `consumer` (`XPENDING … IDLE` gives it).
async fn delivery_counts(
    connection: &mut redis_conn::Connection,
    stream: &str,
    group: &str,
    consumer: &str,
    entries: &[RawEntry],
) -> Result<HashMap<String, u64>, Error> {
    let (first, last) = (&entries[0].id, &entries[entries.len() - 1].id);
    let (low, high) = if id_order(first) <= id_order(last) {
        (first, last)
    } else {
        (last, first)
    };
    let reply: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg(low)
        .arg(high)
        .arg(entries.len().max(1) * 2)
        .arg(consumer)
        .query_async(connection)
        .await?;
    Ok(reply
        .into_iter()
        .map(|(id, _, _, deliveries)| (id, deliveries))
        .collect())
}

/// `XGROUP CREATE … 0 MKSTREAM` for each input (a new group misses nothing).
pub async fn ensure_groups(pool: &Pool, group: &str, inputs: &[String]) -> Result<(), Error> {
    let mut connection = pool.get().await?;
    for input in inputs {
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(input)
            .arg(group)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut connection)
            .await;
        match created {
            Ok(()) => info!(message = "group created", stream = %input, group),
            Err(error) if error.code() == Some("BUSYGROUP") => {}
            Err(error) => return Err(error.into()),
        }
    }
    Ok(())
}

/// On a clean stop, remove this consumer from its groups where it has
/// nothing pending, so scaling down leaves no ghosts in `XINFO CONSUMERS`.
pub async fn retire(pool: &Pool, group: &str, consumer: &str, inputs: &[String]) {
    let Ok(mut connection) = pool.get().await else {
        return;
    };
    let mut kept = 0;
    for input in inputs {
        let retired: Result<i64, _> = scripts::RETIRE
            .key(input)
            .arg(group)
            .arg(consumer)
            .invoke_async(&mut connection)
            .await;
        if let Ok(-1) = retired {
            kept += 1;
        }
    }
    if kept > 0 {
        info!(message = "consumer keeps pending entries for the partitions' next owners", consumer = %consumer, streams = kept);
    }
}
