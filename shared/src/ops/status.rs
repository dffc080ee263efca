//! `botline status`: every pipeline stream and each of its groups, the
//! numbers `XINFO GROUPS`, `XPENDING` and `XINFO CONSUMERS` give, plus the
//! ages Redis does not compute (oldest pending, oldest undelivered).

use super::{age_ms, format_age, Ops, OpsError};
use crate::redis_conn::{self};
use crate::telemetry::{first_undelivered_id, group_infos};
use redis::Value;
use serde_json::{json, Value as Json};

#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub streams: Vec<StreamStatus>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamStatus {
    /// Short name (`in`, `q:normal`, `out:web`).
    pub stream: String,
    pub exists: bool,
    pub length: u64,
    pub groups: Vec<GroupStatus>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct GroupStatus {
    pub name: String,
    /// `None` when `XINFO GROUPS` says nil: entries were deleted or trimmed
    /// ahead of the group, and Redis cannot count what is left to read.
    pub lag: Option<u64>,
    pub pending: u64,
    pub last_delivered_id: String,
    /// Age of the oldest entry read but not acknowledged.
    pub oldest_pending_age_ms: Option<i64>,
    /// Age of the oldest entry not yet read by the group: time-based lag,
    /// known even when `lag` is not.
    pub oldest_undelivered_age_ms: Option<i64>,
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
        for key in self.pipeline_streams().await? {
            streams.push(self.stream_status(&key).await?);
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
            exists,
            length,
            groups,
        })
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
    /// One line per group (a stream without groups gets one line of its
    /// own); with `consumers`, each consumer below its group.
    pub fn table(&self, consumers: bool) -> String {
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
            let length = if stream.exists {
                stream.length.to_string()
            } else {
                "(none)".into()
            };
            if stream.groups.is_empty() {
                rows.push([
                    stream.stream.clone(),
                    length.clone(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                    "-".into(),
                ]);
            }
            for group in &stream.groups {
                rows.push([
                    stream.stream.clone(),
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

    pub fn json(&self) -> Json {
        Json::Array(
            self.streams
                .iter()
                .map(|stream| {
                    json!({
                        "stream": stream.stream,
                        "exists": stream.exists,
                        "length": stream.length,
                        "groups": stream.groups.iter().map(|group| json!({
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
                    })
                })
                .collect(),
        )
    }
}
