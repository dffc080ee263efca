//! `botline status`: every pipeline stream and each of its groups, the
//! numbers `XINFO GROUPS`, `XPENDING` and `XINFO CONSUMERS` give, plus the
//! ages Redis does not compute (oldest pending, oldest undelivered).
//!
//! A stream (`in`, `q`, `out:web`, …) is one key per partition; the status
//! of the stream sums its partitions' (lengths, lag, pending), takes their
//! oldest ages and the union of their consumers, and keeps each
//! partition's own status in [`StreamStatus::partitions`].

use super::{age_ms, format_age, Ops, OpsError};
use crate::redis_conn::{self, id_order};
use crate::streams::Partition;
use crate::telemetry::{first_undelivered_id, group_infos};
use redis::Value;
use serde_json::{json, Value as Json};

#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    /// One per stream, in pipeline order.
    pub streams: Vec<StreamStatus>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamStatus {
    /// Short name (`in`, `q`, `out:web`) of a stream over its partitions;
    /// the full key (`{botline:p3}:in`) of one partition's.
    pub stream: String,
    /// The partition of one partition's status; `None` for a stream's.
    pub partition: Option<Partition>,
    /// Whether the key (any partition's) exists.
    pub exists: bool,
    pub length: u64,
    pub groups: Vec<GroupStatus>,
    /// Each partition's status, in partition order (empty in those).
    pub partitions: Vec<StreamStatus>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GroupStatus {
    pub name: String,
    /// `None` when `XINFO GROUPS` says nil: entries were deleted or trimmed
    /// ahead of the group, and Redis cannot count what is left to read. Over
    /// partitions: the sum, `None` if any partition's is.
    pub lag: Option<u64>,
    pub pending: u64,
    /// Over partitions: the newest.
    pub last_delivered_id: String,
    /// Age of the oldest entry read but not acknowledged.
    pub oldest_pending_age_ms: Option<i64>,
    /// Age of the oldest entry not yet read by the group: time-based lag,
    /// known even when `lag` is not.
    pub oldest_undelivered_age_ms: Option<i64>,
    /// Over partitions: each consumer once, its pending summed, its idle
    /// time the shortest.
    pub consumers: Vec<ConsumerStatus>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConsumerStatus {
    pub name: String,
    pub pending: u64,
    /// Since the consumer last read (or tried to).
    pub idle_ms: u64,
}

impl Ops {
    pub async fn status(&self) -> Result<Status, OpsError> {
        let mut streams = Vec::new();
        for (short, keys) in self.logical_streams().await? {
            let mut partitions = Vec::new();
            for key in &keys {
                partitions.push(self.stream_status(key).await?);
            }
            streams.push(StreamStatus::over(short, partitions));
        }
        Ok(Status { streams })
    }

    async fn stream_status(&self, key: &str) -> Result<StreamStatus, OpsError> {
        let mut connection = self.pool.get().await?;
        let exists: bool = redis::cmd("EXISTS")
            .arg(key)
            .query_async(&mut connection)
            .await?;
        let length: u64 = redis::cmd("XLEN")
            .arg(key)
            .query_async(&mut connection)
            .await?;
        let mut groups = Vec::new();
        for info in group_infos(&mut connection, key).await? {
            let oldest_undelivered = first_undelivered_id(&mut connection, key, &info)
                .await?
                .as_deref()
                .and_then(age_ms);
            let reply: Value = redis::cmd("XINFO")
                .arg("CONSUMERS")
                .arg(key)
                .arg(&info.name)
                .query_async(&mut connection)
                .await?;
            groups.push(GroupStatus {
                lag: info.lag,
                pending: info.pending,
                oldest_pending_age_ms: info.oldest_pending_id.as_deref().and_then(age_ms),
                oldest_undelivered_age_ms: oldest_undelivered,
                consumers: parse_consumers(reply),
                last_delivered_id: info.last_delivered_id,
                name: info.name,
            });
        }
        Ok(StreamStatus {
            stream: key.to_string(),
            partition: self.streams.short(key).1,
            exists,
            length,
            groups,
            partitions: Vec::new(),
        })
    }
}

impl StreamStatus {
    /// The status of stream `short` from its partitions'.
    fn over(short: String, partitions: Vec<StreamStatus>) -> StreamStatus {
        let mut groups: Vec<GroupStatus> = Vec::new();
        for group in partitions.iter().flat_map(|p| &p.groups) {
            match groups.iter_mut().find(|g| g.name == group.name) {
                Some(sum) => sum.add(group),
                None => groups.push(group.clone()),
            }
        }
        StreamStatus {
            stream: short,
            partition: None,
            exists: partitions.iter().any(|p| p.exists),
            length: partitions.iter().map(|p| p.length).sum(),
            groups,
            partitions,
        }
    }
}

impl GroupStatus {
    /// Adds another partition's numbers of the same group.
    fn add(&mut self, other: &GroupStatus) {
        self.lag = self.lag.zip(other.lag).map(|(a, b)| a + b);
        self.pending += other.pending;
        if id_order(&other.last_delivered_id) > id_order(&self.last_delivered_id) {
            self.last_delivered_id = other.last_delivered_id.clone();
        }
        self.oldest_pending_age_ms =
            oldest(self.oldest_pending_age_ms, other.oldest_pending_age_ms);
        self.oldest_undelivered_age_ms = oldest(
            self.oldest_undelivered_age_ms,
            other.oldest_undelivered_age_ms,
        );
        for consumer in &other.consumers {
            match self.consumers.iter_mut().find(|c| c.name == consumer.name) {
                Some(sum) => {
                    sum.pending += consumer.pending;
                    sum.idle_ms = sum.idle_ms.min(consumer.idle_ms);
                }
                None => self.consumers.push(consumer.clone()),
            }
        }
    }
}

fn oldest(a: Option<i64>, b: Option<i64>) -> Option<i64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// `XINFO CONSUMERS` as a list of maps (RESP3) or flat arrays (RESP2).
fn parse_consumers(reply: Value) -> Vec<ConsumerStatus> {
    let Value::Array(items) = reply else {
        return Vec::new();
    };
    items
        .into_iter()
        .map(|item| {
            let fields = redis_conn::field_map(item);
            let number = |name: &str| match fields.get(name) {
                Some(Value::Int(n)) => (*n).max(0) as u64,
                _ => 0,
            };
            ConsumerStatus {
                name: fields
                    .get("name")
                    .cloned()
                    .and_then(|v| redis_conn::string(v).ok())
                    .unwrap_or_default(),
                pending: number("pending"),
                idle_ms: number("idle"),
            }
        })
        .collect()
}

fn age(ms: Option<i64>) -> String {
    ms.map_or_else(|| "-".into(), format_age)
}

impl Status {
    /// One line per stream and group (a stream without groups gets one
    /// line of its own), over every partition; with `consumers`, each
    /// consumer below its group; with `partitions`, each partition's lines
    /// (full key names) below its stream's.
    pub fn table(&self, consumers: bool, partitions: bool) -> String {
        let mut rows: Vec<[String; 8]> = vec![[
            "STREAM",
            "LENGTH",
            "GROUP",
            "LAG",
            "PENDING",
            "OLDEST PENDING",
            "OLDEST UNREAD",
            "CONSUMERS",
        ]
        .map(String::from)];
        let mut notes: Vec<(usize, Vec<String>)> = Vec::new();
        for stream in &self.streams {
            stream.rows(consumers, &mut rows, &mut notes);
            if partitions {
                for partition in &stream.partitions {
                    partition.rows(consumers, &mut rows, &mut notes);
                }
            }
        }
        let widths: Vec<usize> = (0..8)
            .map(|column| {
                rows.iter()
                    .map(|row| row[column].chars().count())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for (index, row) in rows.iter().enumerate() {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .enumerate()
                .map(|(column, (cell, width))| {
                    if column == 1 || (3..=7).contains(&column) {
                        format!("{cell:>width$}")
                    } else {
                        format!("{cell:<width$}")
                    }
                })
                .collect();
            out.push_str(cells.join("  ").trim_end());
            out.push('\n');
            if let Some((_, lines)) = notes.iter().find(|(row, _)| *row == index) {
                for line in lines {
                    out.push_str(line);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// One object per stream; with `partitions`, each with its partitions'
    /// objects (full key names, and `partition`) as `partitions`.
    pub fn json(&self, partitions: bool) -> Json {
        Json::Array(
            self.streams
                .iter()
                .map(|stream| {
                    let mut json = stream.json();
                    if partitions {
                        json["partitions"] =
                            Json::Array(stream.partitions.iter().map(StreamStatus::json).collect());
                    }
                    json
                })
                .collect(),
        )
    }
}

impl StreamStatus {
    /// This stream's table rows, and its groups' consumers as notes below them.
    fn rows(
        &self,
        consumers: bool,
        rows: &mut Vec<[String; 8]>,
        notes: &mut Vec<(usize, Vec<String>)>,
    ) {
        let length = if self.exists {
            self.length.to_string()
        } else {
            "(none)".into()
        };
        if self.groups.is_empty() {
            rows.push([
                self.stream.clone(),
                length.clone(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
            ]);
        }
        for group in &self.groups {
            rows.push([
                self.stream.clone(),
                length.clone(),
                group.name.clone(),
                group
                    .lag
                    .map_or_else(|| "unknown".into(), |lag| lag.to_string()),
                group.pending.to_string(),
                age(group.oldest_pending_age_ms),
                age(group.oldest_undelivered_age_ms),
                group.consumers.len().to_string(),
            ]);
            if consumers {
                notes.push((
                    rows.len() - 1,
                    group
                        .consumers
                        .iter()
                        .map(|consumer| {
                            format!(
                                "    {}  pending {}  idle {}",
                                consumer.name,
                                consumer.pending,
                                format_age(consumer.idle_ms as i64)
                            )
                        })
                        .collect(),
                ));
            }
        }
    }

    fn json(&self) -> Json {
        let mut json = json!({
            "stream": self.stream,
            "exists": self.exists,
            "length": self.length,
            "groups": self.groups.iter().map(|group| json!({
                "group": group.name,
                "lag": group.lag,
                "lag_known": group.lag.is_some(),
                "pending": group.pending,
                "last_delivered_id": group.last_delivered_id,
                "oldest_pending_age_ms": group.oldest_pending_age_ms,
                "oldest_undelivered_age_ms": group.oldest_undelivered_age_ms,
                "consumers": group.consumers.iter().map(|consumer| json!({
                    "name": consumer.name,
                    "pending": consumer.pending,
                    "idle_ms": consumer.idle_ms,
                })).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        if let Some(partition) = self.partition {
            json["partition"] = json!(partition);
        }
        json
    }
}
