//! What the `botline` operator's CLI does, as functions tests can call:
//! [`Ops::status`] (every stream and group at a glance), [`Ops::peek`]
//! (entries decoded to JSON), [`Ops::replay`] (a range copied back into a
//! stage's input, marked `replay`), the dead-letter commands
//! ([`Ops::dead_list`], [`Ops::dead_requeue`], [`Ops::dead_purge`]) and
//! [`Ops::trim`] (the runner's safe trim on every pipeline stream).
//!
//! None of it touches a consumer group: replays and requeues only `XADD`,
//! so the groups read them like any new entry. `src/bin/botline.rs` only
//! parses arguments and prints.

mod dead;
mod migrate;
mod peek;
mod replay;
mod status;
mod trim;

pub use dead::{dead_table, DeadEntry, RequeueOutcome, RequeueReport};
pub use migrate::{
    migrate_table, old_layout_left, old_tag, refuse_old_layout, MigrateReport, OldStreamReport,
};
pub use peek::{decode_entry, Kind, PeekRange};
pub use replay::{ReplayReport, ReplayRequest};
pub use status::{ConsumerStatus, GroupStatus, Status, StreamStatus};
pub use trim::{trim_table, TrimLine};

use crate::config::ProcessConfig;
use crate::redis_conn::{self, Pool, RawEntry};
use crate::streams::Streams;
use crate::{now_ms, Error};
use std::time::Duration;

/// Why a command failed; [`OpsError::exit_code`] is what the process returns.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Redis refused, or could not be reached.
    #[error("{0}")]
    Redis(#[from] Error),
    /// An argument is malformed or names nothing that exists; the message names it.
    #[error("argument {argument}: {reason}")]
    BadArgument { argument: String, reason: String },
}

impl OpsError {
    pub fn bad(argument: &str, reason: impl std::fmt::Display) -> Self {
        OpsError::BadArgument {
            argument: argument.into(),
            reason: reason.to_string(),
        }
    }

    /// 1 for a Redis error, 2 for a bad argument.
    pub fn exit_code(&self) -> i32 {
        match self {
            OpsError::Redis(_) => 1,
            OpsError::BadArgument { .. } => 2,
        }
    }
}

impl From<redis::RedisError> for OpsError {
    fn from(error: redis::RedisError) -> Self {
        OpsError::Redis(Error::Redis(error))
    }
}

impl From<deadpool_redis::PoolError> for OpsError {
    fn from(error: deadpool_redis::PoolError) -> Self {
        OpsError::Redis(Error::from(error))
    }
}

/// How many entries one `XRANGE` of a scan asks for.
const SCAN_BATCH: usize = 500;

/// The Redis the pipeline uses and its key names.
pub struct Ops {
    pool: Pool,
    streams: Streams,
}

impl Ops {
    /// From `BOTLINE_REDIS_URL` and `BOTLINE_PREFIX`, as the stages read them.
    pub fn connect(process: &ProcessConfig) -> Result<Ops, OpsError> {
        let settings = process.settings()?;
        Ok(Ops::new(
            redis_conn::pool(process, 2)?,
            process.streams(&settings)?,
        ))
    }

    pub fn new(pool: Pool, streams: Streams) -> Ops {
        Ops { pool, streams }
    }

    pub fn streams(&self) -> &Streams {
        &self.streams
    }

    /// The keys a stream name stands for: a full key (`{botline:p3}:in`)
    /// itself; a short name (`in`, `out:slack`) that stream in every partition.
    pub fn resolve(&self, name: &str) -> Vec<String> {
        if name.starts_with('{') {
            vec![name.to_string()]
        } else {
            self.streams
                .all()
                .map(|p| format!("{{{}:p{p}}}:{name}", self.streams.prefix()))
                .collect()
        }
    }

    /// The pipeline's streams in pipeline order, each in every partition:
    /// `in`, `q`, every `out:<platform>` that exists, `delivered`, `dead`.
    pub async fn pipeline_streams(&self) -> Result<Vec<String>, OpsError> {
        let all = || self.streams.all();
        let mut keys: Vec<String> = all().map(|p| self.streams.inbound(p)).collect();
        keys.extend(all().map(|p| self.streams.queue(p)));
        keys.extend(self.outbound_streams().await?);
        keys.extend(all().map(|p| self.streams.delivered(p)));
        keys.extend(all().map(|p| self.streams.dead(p)));
        Ok(keys)
    }

    /// The pipeline's streams in pipeline order (`in`, `q`, every
    /// `out:<platform>` of which any partition's exists, `delivered`,
    /// `dead`), each with every partition's key, in partition order.
    pub async fn logical_streams(&self) -> Result<Vec<(String, Vec<String>)>, OpsError> {
        let mut names = vec!["in".to_string(), "q".to_string()];
        for key in self.outbound_streams().await? {
            let name = self.streams.short(&key).0.to_string();
            if !names.contains(&name) {
                names.push(name);
            }
        }
        names.extend(["delivered".to_string(), "dead".to_string()]);
        Ok(names
            .into_iter()
            .map(|name| {
                let keys = self.resolve(&name);
                (name, keys)
            })
            .collect())
    }

    /// The partition count this deployment's processes recorded
    /// (`{prefix}:partitions`), if one has started.
    pub async fn recorded_partitions(&self) -> Result<Option<u32>, OpsError> {
        let mut connection = self.pool.get().await?;
        Ok(redis::cmd("GET")
            .arg(format!("{{{}}}:partitions", self.streams.prefix()))
            .query_async(&mut connection)
            .await?)
    }

    /// The same Redis with `partitions` partitions.
    pub fn with_partitions(self, partitions: u32) -> Ops {
        let streams = Streams::new(self.streams.prefix(), partitions);
        Ops::new(self.pool, streams)
    }

    /// Every `out:<platform>` stream of every partition, found with `SCAN …
    /// TYPE stream`, by platform, then partition.
    pub async fn outbound_streams(&self) -> Result<Vec<String>, OpsError> {
        let mut connection = self.pool.get().await?;
        let pattern = format!("{{{}:p*}}:out:*", glob_escape(self.streams.prefix()));
        let mut cursor = 0u64;
        let mut keys = Vec::new();
        loop {
            let (next, found): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .arg("TYPE")
                .arg("stream")
                .query_async(&mut connection)
                .await?;
            keys.extend(found);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        // Only this deployment's partitions: `p*` matches more than numbers.
        keys.retain(
            |key| matches!(self.streams.short(key), (_, Some(p)) if p < self.streams.partitions()),
        );
        keys.sort_by_key(|key| {
            let (name, p) = self.streams.short(key);
            (name.to_string(), p)
        });
        keys.dedup();
        Ok(keys)
    }

    /// Entries of `stream` from `start` to `end` (inclusive, `XRANGE`
    /// syntax), at most `count`.
    async fn range(
        &self,
        stream: &str,
        start: &str,
        end: &str,
        count: usize,
    ) -> Result<Vec<RawEntry>, OpsError> {
        let mut connection = self.pool.get().await?;
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(stream)
            .arg(start)
            .arg(end)
            .arg("COUNT")
            .arg(count)
            .query_async(&mut connection)
            .await?;
        Ok(redis_conn::parse_entries(stream, reply)?)
    }

    /// The newest `count` entries of `stream`, oldest first.
    async fn last(&self, stream: &str, count: usize) -> Result<Vec<RawEntry>, OpsError> {
        let mut connection = self.pool.get().await?;
        let reply: redis::Value = redis::cmd("XREVRANGE")
            .arg(stream)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut connection)
            .await?;
        let mut entries = redis_conn::parse_entries(stream, reply)?;
        entries.reverse();
        Ok(entries)
    }

    /// Calls `visit` with every entry of `stream` from `start` to `end`, in
    /// batches; `visit` returns false to stop.
    async fn scan(
        &self,
        stream: &str,
        start: &str,
        end: &str,
        mut visit: impl FnMut(RawEntry) -> bool,
    ) -> Result<(), OpsError> {
        let mut from = start.to_string();
        loop {
            let batch = self.range(stream, &from, end, SCAN_BATCH).await?;
            let full = batch.len() == SCAN_BATCH;
            let mut last_id = None;
            for entry in batch {
                last_id = Some(entry.id.clone());
                if !visit(entry) {
                    return Ok(());
                }
            }
            match last_id {
                Some(id) if full => from = format!("({id}"),
                _ => return Ok(()),
            }
        }
    }
}

/// `*`, `?`, `[`, `]` and `\` in a prefix match themselves in `SCAN MATCH`.
fn glob_escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

/// A duration as operators write it: `90s`, `10m`, `2h`, `7d`, `500ms`.
pub fn parse_duration(argument: &str, text: &str) -> Result<Duration, OpsError> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: u64 = number.parse().map_err(|_| {
        OpsError::bad(
            argument,
            format!("{text:?} is not a duration like 90s, 10m, 2h, 7d"),
        )
    })?;
    let millis = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => {
            return Err(OpsError::bad(
                argument,
                format!("{text:?}: unit must be ms, s, m, h or d"),
            ))
        }
    };
    Ok(Duration::from_millis(number.saturating_mul(millis)))
}

/// Which end of a range a bound is: a time bound starts at the first id of
/// its millisecond and ends at the last.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    Start,
    Stop,
}

/// A range bound as an `XRANGE` id: a stream id (`1700000000000-0`, or its
/// milliseconds alone), `-`, `+`, an RFC 3339 time, `now`, or a time
/// relative to now (`-10m`). Times are resolved against `now_ms`.
pub fn parse_bound(argument: &str, text: &str, end: End, now_ms: i64) -> Result<String, OpsError> {
    let text = text.trim();
    let at = |ms: i64| match end {
        // Before the epoch: the stream's start.
        _ if ms < 0 => "0-0".to_string(),
        End::Start => format!("{ms}-0"),
        End::Stop => format!("{ms}-{}", u64::MAX),
    };
    if text == "-" || text == "+" {
        return Ok(text.to_string());
    }
    if text == "now" {
        return Ok(at(now_ms));
    }
    if let Some(ago) = text.strip_prefix('-') {
        let ago = parse_duration(argument, ago)?;
        return Ok(at(now_ms - ago.as_millis() as i64));
    }
    if is_stream_id(text) {
        // A stop given in milliseconds alone means that millisecond's last entry.
        return Ok(match end {
            End::Stop if !text.contains('-') => format!("{text}-{}", u64::MAX),
            _ => text.to_string(),
        });
    }
    match chrono::DateTime::parse_from_rfc3339(text) {
        Ok(time) => Ok(at(time.timestamp_millis())),
        Err(_) => Err(OpsError::bad(
            argument,
            format!(
                "{text:?} is neither a stream id (1700000000000-0), a time \
                 (2026-11-26T20:00:00Z) nor an age (-10m)"
            ),
        )),
    }
}

fn is_stream_id(text: &str) -> bool {
    let mut parts = text.splitn(2, '-');
    let digits = |part: Option<&str>| {
        part.is_some_and(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
    };
    let millis = parts.next();
    let sequence = parts.next();
    digits(millis) && (sequence.is_none() || digits(sequence))
}

/// Milliseconds since the entry with this id was added, if it is an id.
fn age_ms(id: &str) -> Option<i64> {
    redis_conn::id_millis(id).map(|ms| (now_ms() - ms).max(0))
}

/// `1h02m`, `3m05s`, `12s`, `340ms`: short enough for a table column.
pub fn format_age(ms: i64) -> String {
    let seconds = ms / 1000;
    match seconds {
        _ if ms < 1000 => format!("{ms}ms"),
        0..=59 => format!("{seconds}s"),
        60..=3599 => format!("{}m{:02}s", seconds / 60, seconds % 60),
        3600..=86_399 => format!("{}h{:02}m", seconds / 3600, seconds % 3600 / 60),
        _ => format!("{}d{:02}h", seconds / 86_400, seconds % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_bound(text: &str, end: End, expected: &str) {
        assert_eq!(
            parse_bound("--from", text, end, 1_000_000).unwrap(),
            expected,
            "{text}"
        );
    }

    #[test]
    fn bounds_are_ids_times_or_ages() {
        check_bound("-", End::Start, "-");
        check_bound("+", End::Stop, "+");
        check_bound("1700000000000-3", End::Start, "1700000000000-3");
        check_bound(
            "1700000000000",
            End::Stop,
            "1700000000000-18446744073709551615",
        );
        check_bound("1700000000000", End::Start, "1700000000000");
        check_bound("now", End::Start, "1000000-0");
        check_bound("-10s", End::Start, "990000-0");
        check_bound("-1m", End::Stop, "940000-18446744073709551615");
        check_bound("1970-01-01T00:00:01Z", End::Start, "1000-0");
        check_bound("1970-01-01T08:00:02+08:00", End::Start, "2000-0");
    }

    #[test]
    fn bad_bounds_name_the_argument() {
        for text in ["yesterday", "-10x", "12-ab", "--5m", ""] {
            let error = parse_bound("--to", text, End::Stop, 0).unwrap_err();
            assert_eq!(error.exit_code(), 2);
            assert!(error.to_string().starts_with("argument --to: "), "{error}");
        }
    }

    #[test]
    fn durations_and_ages_read_and_print() {
        let check = |text: &str, ms: u64| {
            assert_eq!(
                parse_duration("--retention", text).unwrap().as_millis() as u64,
                ms
            )
        };
        check("500ms", 500);
        check("90s", 90_000);
        check("10m", 600_000);
        check("2h", 7_200_000);
        check("7d", 604_800_000);
        assert!(parse_duration("--retention", "ten").is_err());
        assert!(parse_duration("--retention", "10").is_err());
        for (ms, shown) in [
            (340, "340ms"),
            (12_000, "12s"),
            (185_000, "3m05s"),
            (3_720_000, "1h02m"),
            (90_000_000, "1d01h"),
        ] {
            assert_eq!(format_age(ms), shown);
        }
    }

    #[test]
    fn prefixes_are_escaped_for_scan() {
        assert_eq!(glob_escape("{botline}:out:"), "{botline}:out:");
        assert_eq!(glob_escape("a*b[1]?"), "a\\*b\\[1\\]\\?");
    }
}
