//! `botline migrate`: what the previous release's single-stream layout
//! (every key under the one tag `{botline}`) still owes, moved into the
//! partitioned one, for a deployment whose old stages are stopped.
//!
//! - Contexts (`{botline}:ctx:<platform>:<chat>`) and web transcripts
//!   (`{botline}:web:<chat>`) are copied to their chat's partition with
//!   their entry ids and TTL (a rerun copies only what the new key lacks),
//!   then the old key is deleted.
//! - Of each old pipeline stream (`in`, `q:urgent`, `q:normal`, `q:batch`,
//!   every `out:<platform>`), the entries its group has not acknowledged
//!   (pending, whoever holds them, and not yet delivered; every entry if
//!   the group does not exist) go into their chat's partition stream (`in`,
//!   `q`, `out:<platform>`) with their fields unchanged, in old id order;
//!   the three queues are merged by entry id, so each chat's order is kept.
//!   An entry that does not decode goes to partition 0's `dead` as a dead
//!   letter whose stream is partition 0's (so `botline dead requeue`
//!   works). A reply's `sent:` marker (and the `sent:…:part:N` of a reply
//!   sent in parts) is copied with its TTL before the reply is added.
//! - In batches: a batch's new entries are added, then its old entries are
//!   acknowledged and deleted (`XACK` + `XDEL`), so a rerun skips them. A
//!   crash between the two adds that one batch twice on the rerun (a
//!   doubled reply is still sent once: its `sent:` marker was copied, or
//!   is written by the first delivery).
//! - An old stream with nothing unfinished left is deleted (by a script
//!   that checks it first: an old stage still writing keeps it, and the
//!   report says so), and so are the old order keys (`{botline}:order:*`).
//!
//! [`old_layout_left`] is the stages' cheap start check.

use super::{glob_escape, Ops, OpsError};
use crate::codec::{self, Fields};
use crate::message::{ClassifiedMessage, DeadLetter, Reply, UnifiedMessage};
use crate::redis_conn::{self, field_map, id_order, Pool, Pooled};
use crate::streams::{group, Partition};
use crate::{now_ms, Error};
use redis::Value;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};

/// How many entries one batch moves.
const BATCH: usize = 200;

/// How many parts of one reply sent in parts are looked for at most.
const MAX_PARTS: usize = 64;

/// The `stage` of the dead letters migrate writes.
const STAGE: &str = "migrate";

/// Deletes an old stream only if nothing unfinished is left in it.
/// KEYS[1] the stream; ARGV[1] its group (empty: none); ARGV[2] where its
/// undelivered entries start (`(<last delivered id>`, or `-`).
const DELETE_IF_FINISHED: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 1
end
if ARGV[1] ~= '' then
  local ok, summary = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1])
  if ok and tonumber(summary[1]) > 0 then
    return 0
  end
end
if #redis.call('XRANGE', KEYS[1], ARGV[2], '+', 'COUNT', 1) > 0 then
  return 0
end
redis.call('DEL', KEYS[1])
return 1
"#;

/// What one old pipeline stream held and what became of it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OldStreamReport {
    /// Its key (`{botline}:q:normal`).
    pub stream: String,
    pub group: String,
    /// Entries delivered to its group and not acknowledged.
    pub pending: u64,
    /// Entries its group had not read (every entry without a group).
    pub undelivered: u64,
    /// Entries (that would be) added to a new stream, `dead` included.
    pub moved: u64,
    /// Of those, entries that did not decode, (to be) put in `dead`.
    pub dead: u64,
    /// Pending entries whose payload was already deleted: only acknowledged.
    pub gone: u64,
    /// Whether the old stream was (on a dry run: would be) deleted.
    pub deleted: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MigrateReport {
    pub dry_run: bool,
    /// The old layout's tag (`{botline}`).
    pub old_prefix: String,
    pub old_streams: Vec<OldStreamReport>,
    /// Entries (that would be) added to each new stream, by full key, in
    /// stream then partition order.
    pub new_streams: Vec<(String, u64)>,
    /// Context streams copied, and their turns.
    pub contexts: u64,
    pub context_turns: u64,
    /// Web transcripts copied, and their entries.
    pub transcripts: u64,
    pub transcript_entries: u64,
    /// `sent:` markers (and sent parts) of moved replies copied.
    pub sent_markers: u64,
    /// Entries that did not decode, (to be) put in partition 0's `dead`.
    pub dead: u64,
    /// Old order keys (to be) deleted.
    pub order_keys: u64,
    /// Old streams migrate leaves alone, with their lengths
    /// (`{botline}:dead`, `{botline}:delivered`).
    pub left_alone: Vec<(String, u64)>,
}

impl MigrateReport {
    /// Entries moved (or to move) over every old stream.
    pub fn moved(&self) -> u64 {
        self.old_streams.iter().map(|stream| stream.moved).sum()
    }
}

/// The record kinds of the old pipeline streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Message,
    Classified,
    Reply,
}

/// One old pipeline stream.
#[derive(Debug, Clone)]
struct OldStream {
    key: String,
    group: &'static str,
    kind: Kind,
    /// The platform of an `out:<platform>`.
    platform: String,
}

/// What an old entry is, once decoded.
struct Decoded {
    platform: String,
    chat: String,
    /// The message's (reply's) id: ties of one millisecond across queues.
    record_id: String,
    /// A reply's id, for its `sent:` marker.
    reply_id: Option<String>,
}

fn decode(kind: Kind, fields: &Fields) -> Result<Decoded, Error> {
    let borrowed = fields.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
    Ok(match kind {
        Kind::Message => {
            let message: UnifiedMessage = codec::decode(borrowed)?;
            Decoded {
                platform: message.platform,
                chat: message.chat.id,
                record_id: message.id,
                reply_id: None,
            }
        }
        Kind::Classified => {
            let classified: ClassifiedMessage = codec::decode(borrowed)?;
            let message = classified.message;
            Decoded {
                platform: message.platform,
                chat: message.chat.id,
                record_id: message.id,
                reply_id: None,
            }
        }
        Kind::Reply => {
            let reply: Reply = codec::decode(borrowed)?;
            Decoded {
                platform: reply.platform,
                chat: reply.chat.id,
                record_id: reply.id.clone(),
                reply_id: Some(reply.id),
            }
        }
    })
}

/// One unfinished old entry.
struct Item {
    /// Index of its source.
    source: usize,
    id: String,
    /// `None`: a pending entry whose payload is gone.
    fields: Option<Fields>,
    deliveries: u64,
    decoded: Option<Result<Decoded, Error>>,
}

impl Item {
    /// Merge order: entry id milliseconds, then (the queues' sequence
    /// numbers being each queue's own) the record's ULID, then the sequence.
    fn order(&self) -> (i64, &str, u64) {
        let (ms, sequence) = id_order(&self.id);
        let record = match &self.decoded {
            Some(Ok(decoded)) => decoded.record_id.as_str(),
            _ => "",
        };
        (ms, record, sequence)
    }
}

/// A group's state on an old stream.
struct GroupState {
    exists: bool,
    last_delivered: Option<String>,
    pending: u64,
    /// `None` when Redis does not know (entries were deleted).
    lag: Option<u64>,
}

async fn group_state(connection: &mut Pooled, key: &str, group: &str) -> Result<GroupState, Error> {
    let none = GroupState {
        exists: false,
        last_delivered: None,
        pending: 0,
        lag: None,
    };
    let exists: u64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(connection)
        .await?;
    if exists == 0 {
        return Ok(none);
    }
    let groups: Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(key)
        .query_async(connection)
        .await?;
    let Value::Array(groups) = groups else {
        return Ok(none);
    };
    for info in groups {
        let mut info = field_map(info);
        let name = info.remove("name").and_then(|v| redis_conn::string(v).ok());
        if name.as_deref() != Some(group) {
            continue;
        }
        let number = |value: Option<Value>| match value {
            Some(Value::Int(n)) => Some(n.max(0) as u64),
            Some(other) => redis_conn::string(other).ok()?.parse().ok(),
            None => None,
        };
        return Ok(GroupState {
            exists: true,
            last_delivered: info
                .remove("last-delivered-id")
                .and_then(|v| redis_conn::string(v).ok()),
            pending: number(info.remove("pending")).unwrap_or(0),
            lag: number(info.remove("lag")),
        });
    }
    Ok(none)
}

/// Where the entries a group has not read start: after its last
/// delivered id, or (no group) at the stream's start.
fn undelivered_start(state: &GroupState) -> String {
    match &state.last_delivered {
        Some(id) if state.exists && id_order(id) > (0, 0) => format!("({id}"),
        _ => "-".into(),
    }
}

/// How many entries of `key` its group has not finished, counting at most
/// `limit` not yet delivered when Redis does not know the group's lag.
async fn unfinished(
    connection: &mut Pooled,
    key: &str,
    group: &str,
    limit: usize,
) -> Result<u64, Error> {
    let length: u64 = redis::cmd("XLEN").arg(key).query_async(connection).await?;
    if length == 0 {
        return Ok(0);
    }
    let state = group_state(connection, key, group).await?;
    if !state.exists {
        return Ok(length);
    }
    let lag = match state.lag {
        Some(lag) => lag,
        None => {
            let reply: Value = redis::cmd("XRANGE")
                .arg(key)
                .arg(undelivered_start(&state))
                .arg("+")
                .arg("COUNT")
                .arg(limit)
                .query_async(connection)
                .await?;
            redis_conn::parse_entries(key, reply)?.len() as u64
        }
    };
    Ok(state.pending + lag)
}

/// `SCAN MATCH pattern [TYPE type]` to the end. In a cluster, on the node
/// of the pattern's hash tag (every key of the old layout is in its slot).
async fn scan_keys(
    connection: &mut Pooled,
    pattern: &str,
    kind: Option<&str>,
) -> Result<Vec<String>, Error> {
    let mut cursor = 0u64;
    let mut keys = Vec::new();
    loop {
        let mut command = redis::cmd("SCAN");
        command
            .arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000);
        if let Some(kind) = kind {
            command.arg("TYPE").arg(kind);
        }
        let (next, found): (u64, Vec<String>) = match connection {
            Pooled::Cluster(shared) => {
                use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
                let route = Route::with_key(pattern, SlotAddr::Master);
                let mut cluster = shared
                    .cluster()
                    .await?
                    .ok_or_else(|| Error::Garbage("no cluster connection".into()))?;
                let reply = cluster
                    .route_command(
                        command,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(route)),
                    )
                    .await?;
                parse(reply)?
            }
            Pooled::Node(_) => command.query_async(connection).await?,
        };
        keys.extend(found);
        if next == 0 {
            break;
        }
        cursor = next;
    }
    keys.sort();
    keys.dedup();
    Ok(keys)
}

/// The old layout's tag for a (plain) prefix: `botline` → `{botline}`.
pub fn old_tag(prefix: &str) -> String {
    format!("{{{prefix}}}")
}

/// The old pipeline streams of `old` (`{botline}`) in pipeline order: `in`,
/// the three queues, then every `out:<platform>` that exists.
async fn old_pipeline(connection: &mut Pooled, old: &str) -> Result<Vec<OldStream>, Error> {
    let stream = |name: &str, group, kind| OldStream {
        key: format!("{old}:{name}"),
        group,
        kind,
        platform: String::new(),
    };
    let mut streams = vec![
        stream("in", group::CLASSIFY, Kind::Message),
        stream("q:urgent", group::RESPOND, Kind::Classified),
        stream("q:normal", group::RESPOND, Kind::Classified),
        stream("q:batch", group::RESPOND, Kind::Classified),
    ];
    let out = format!("{old}:out:");
    let pattern = format!("{}*", glob_escape(&out));
    for key in scan_keys(connection, &pattern, Some("stream")).await? {
        let Some(platform) = key.strip_prefix(&out) else {
            continue;
        };
        streams.push(OldStream {
            platform: platform.to_string(),
            key: key.clone(),
            group: group::EGRESS,
            kind: Kind::Reply,
        });
    }
    Ok(streams)
}

/// A description of what the previous (single-stream) layout of `prefix`
/// still holds unfinished, `None` when nothing: a stage starting on a
/// deployment that has not run `botline migrate` would leave those entries
/// unanswered. A few commands: `XLEN`/`XINFO GROUPS` on the fixed keys and
/// one `SCAN` for `out:*`.
pub async fn old_layout_left(pool: &Pool, prefix: &str) -> Result<Option<String>, Error> {
    let old = old_tag(prefix);
    let mut connection = pool.get().await?;
    let mut total = 0;
    let mut found = Vec::new();
    for stream in old_pipeline(&mut connection, &old).await? {
        let n = unfinished(&mut connection, &stream.key, stream.group, 10_000).await?;
        if n > 0 {
            total += n;
            found.push(format!("{} {n}", stream.key));
        }
    }
    Ok((total > 0).then(|| {
        format!(
            "the streams of the previous layout still hold {total} unfinished entries ({})",
            found.join(", ")
        )
    }))
}

/// [`old_layout_left`] as a start check: a config error naming
/// `BOTLINE_PREFIX` and what to do when the old layout holds anything.
pub async fn refuse_old_layout(pool: &Pool, prefix: &str) -> Result<(), Error> {
    match old_layout_left(pool, prefix).await? {
        None => Ok(()),
        Some(left) => Err(Error::config(
            "BOTLINE_PREFIX",
            format!(
                "{left}: stop the old stages and run `botline migrate`, \
                 see README \"Upgrading\""
            ),
        )),
    }
}

/// One old stream's unfinished entries, read in id order a batch at a time.
struct Source {
    stream: OldStream,
    state: GroupState,
    /// Pending ids not read yet, with their delivery counts.
    pending: VecDeque<(String, u64)>,
    /// Every pending id: not taken again among the undelivered (a group
    /// moved back with `XGROUP SETID` can have both).
    pending_ids: HashSet<String>,
    /// Where the next read of undelivered entries starts.
    cursor: String,
    undelivered_done: bool,
    buffer: VecDeque<Item>,
    report: OldStreamReport,
}

impl Source {
    async fn open(connection: &mut Pooled, stream: OldStream) -> Result<Source, Error> {
        let state = group_state(connection, &stream.key, stream.group).await?;
        let mut pending = VecDeque::new();
        if state.exists {
            let mut from = "-".to_string();
            loop {
                let reply: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                    .arg(&stream.key)
                    .arg(stream.group)
                    .arg(&from)
                    .arg("+")
                    .arg(1000)
                    .query_async(connection)
                    .await?;
                let full = reply.len() == 1000;
                for (id, _consumer, _idle, deliveries) in reply {
                    from = format!("({id}");
                    pending.push_back((id, deliveries));
                }
                if !full {
                    break;
                }
            }
        }
        Ok(Source {
            report: OldStreamReport {
                stream: stream.key.clone(),
                group: stream.group.to_string(),
                pending: pending.len() as u64,
                ..OldStreamReport::default()
            },
            cursor: undelivered_start(&state),
            pending_ids: pending.iter().map(|(id, _)| id.clone()).collect(),
            stream,
            state,
            pending,
            undelivered_done: false,
            buffer: VecDeque::new(),
        })
    }

    fn exhausted(&self) -> bool {
        self.buffer.is_empty() && self.pending.is_empty() && self.undelivered_done
    }

    /// Reads the next batch into the buffer if it is empty.
    async fn refill(&mut self, connection: &mut Pooled, index: usize) -> Result<(), Error> {
        if !self.buffer.is_empty() {
            return Ok(());
        }
        let kind = self.stream.kind;
        let item = |id: String, fields: Option<Fields>, deliveries: u64| Item {
            source: index,
            decoded: fields.as_ref().map(|fields| decode(kind, fields)),
            id,
            fields,
            deliveries,
        };
        if !self.pending.is_empty() {
            let take: Vec<(String, u64)> = self
                .pending
                .drain(..self.pending.len().min(BATCH))
                .collect();
            let mut pipe = redis::pipe();
            for (id, _) in &take {
                pipe.cmd("XRANGE")
                    .arg(&self.stream.key)
                    .arg(id)
                    .arg(id)
                    .arg("COUNT")
                    .arg(1);
            }
            let replies: Vec<Value> = pipe.query_async(connection).await?;
            for ((id, deliveries), reply) in take.into_iter().zip(replies) {
                let fields = redis_conn::parse_entries(&self.stream.key, reply)?
                    .into_iter()
                    .find(|entry| entry.id == id)
                    .and_then(|entry| entry.fields);
                self.buffer.push_back(item(id, fields, deliveries));
            }
            return Ok(());
        }
        // Until something is found: a read can hold only pending ids.
        while self.buffer.is_empty() && !self.undelivered_done {
            let reply: Value = redis::cmd("XRANGE")
                .arg(&self.stream.key)
                .arg(&self.cursor)
                .arg("+")
                .arg("COUNT")
                .arg(BATCH)
                .query_async(connection)
                .await?;
            let entries = redis_conn::parse_entries(&self.stream.key, reply)?;
            self.undelivered_done = entries.len() < BATCH;
            if let Some(last) = entries.last() {
                self.cursor = format!("({}", last.id);
            }
            for entry in entries {
                if self.pending_ids.contains(&entry.id) {
                    continue;
                }
                self.report.undelivered += 1;
                self.buffer.push_back(item(entry.id, entry.fields, 0));
            }
        }
        Ok(())
    }
}

/// Adds `fields` to the pipeline's last command (after `XADD key id`).
fn with_fields<'a>(pipe: &'a mut redis::Pipeline, fields: &Fields) -> &'a mut redis::Pipeline {
    for (name, value) in fields {
        pipe.arg(name).arg(value.as_slice());
    }
    pipe
}

fn parse<T: redis::FromRedisValue>(value: Value) -> Result<T, Error> {
    redis::from_redis_value(value).map_err(|error| Error::Garbage(error.to_string()))
}

/// What a batch adds to one partition, in order.
#[derive(Default)]
struct PartitionWrites {
    pipe: redis::Pipeline,
    commands: usize,
}

impl Ops {
    /// Moves what the old layout of this deployment's prefix (`{botline}`,
    /// or `old_prefix` given in full) still owes into the partitioned one;
    /// a dry run only counts. See the module's documentation.
    pub async fn migrate(
        &self,
        dry_run: bool,
        old_prefix: Option<&str>,
    ) -> Result<MigrateReport, OpsError> {
        let old = match old_prefix {
            Some(old) => old.to_string(),
            None => old_tag(self.streams.prefix()),
        };
        let mut report = MigrateReport {
            dry_run,
            old_prefix: old.clone(),
            ..MigrateReport::default()
        };
        let mut connection = self.pool.get().await?;
        if !dry_run {
            // The chats are hashed over this count from now on: the stages
            // must use the same (`check_partitions`).
            let _: () = redis::cmd("SET")
                .arg(format!("{{{}}}:partitions", self.streams.prefix()))
                .arg(self.streams.partitions())
                .arg("NX")
                .query_async(&mut connection)
                .await?;
        }
        // Contexts first: once the pipeline streams are moved the new
        // stages may start, and their turns must be there.
        self.copy_side_streams(&mut connection, &old, &mut report)
            .await?;
        let streams = old_pipeline(&mut connection, &old).await?;
        let (queues, others): (Vec<OldStream>, Vec<OldStream>) = streams
            .into_iter()
            .partition(|stream| stream.kind == Kind::Classified);
        let mut new_streams: HashMap<String, u64> = HashMap::new();
        let mut sets: Vec<Vec<OldStream>> = Vec::new();
        let mut others = others.into_iter();
        // `in`, then the queues merged, then each `out:*`.
        sets.extend(others.next().map(|inbound| vec![inbound]));
        sets.push(queues);
        sets.extend(others.map(|out| vec![out]));
        for set in sets {
            let mut sources = Vec::new();
            for stream in set {
                sources.push(Source::open(&mut connection, stream).await?);
            }
            self.move_set(
                &mut connection,
                (&old, dry_run),
                &mut sources,
                (&mut new_streams, &mut report.sent_markers),
            )
            .await?;
            for source in sources {
                let mut stream_report = source.report;
                let exists: u64 = redis::cmd("EXISTS")
                    .arg(&source.stream.key)
                    .query_async(&mut connection)
                    .await?;
                if exists == 0 && stream_report.moved == 0 && stream_report.gone == 0 {
                    // Never there (or gone by an earlier run): not reported.
                    continue;
                }
                stream_report.deleted = if dry_run {
                    true
                } else {
                    let group = if source.state.exists {
                        source.stream.group
                    } else {
                        ""
                    };
                    let deleted: i64 = redis::Script::new(DELETE_IF_FINISHED)
                        .key(&source.stream.key)
                        .arg(group)
                        .arg(undelivered_start(&source.state))
                        .invoke_async(&mut connection)
                        .await?;
                    deleted == 1
                };
                report.dead += stream_report.dead;
                report.old_streams.push(stream_report);
            }
        }
        let mut new_streams: Vec<(String, u64)> = new_streams.into_iter().collect();
        new_streams.sort_by_key(|(key, _)| {
            let (name, p) = self.streams.short(key);
            (name.to_string(), p)
        });
        report.new_streams = new_streams;
        // The old per-chat order machinery.
        let order = scan_keys(
            &mut connection,
            &format!("{}*", glob_escape(&format!("{old}:order:"))),
            None,
        )
        .await?;
        report.order_keys = order.len() as u64;
        if !dry_run {
            for chunk in order.chunks(BATCH) {
                let mut pipe = redis::pipe();
                for key in chunk {
                    pipe.cmd("DEL").arg(key).ignore();
                }
                pipe.query_async::<()>(&mut connection).await?;
            }
        }
        for name in ["dead", "delivered"] {
            let key = format!("{old}:{name}");
            let length: u64 = redis::cmd("XLEN")
                .arg(&key)
                .query_async(&mut connection)
                .await?;
            if length > 0 {
                report.left_alone.push((key, length));
            }
        }
        Ok(report)
    }

    /// Contexts and web transcripts copied to their chat's partition.
    async fn copy_side_streams(
        &self,
        connection: &mut Pooled,
        old: &str,
        report: &mut MigrateReport,
    ) -> Result<(), OpsError> {
        let ctx = format!("{old}:ctx:");
        for key in scan_keys(
            connection,
            &format!("{}*", glob_escape(&ctx)),
            Some("stream"),
        )
        .await?
        {
            let Some((platform, chat)) =
                key.strip_prefix(&ctx).and_then(|rest| rest.split_once(':'))
            else {
                continue;
            };
            let new = self.streams.context(platform, chat);
            let copied = self
                .copy_stream(connection, &key, &new, report.dry_run)
                .await?;
            report.contexts += 1;
            report.context_turns += copied;
        }
        let web = format!("{old}:web:");
        for key in scan_keys(
            connection,
            &format!("{}*", glob_escape(&web)),
            Some("stream"),
        )
        .await?
        {
            let Some(chat) = key.strip_prefix(&web) else {
                continue;
            };
            let new = self.streams.transcript(chat);
            let copied = self
                .copy_stream(connection, &key, &new, report.dry_run)
                .await?;
            report.transcripts += 1;
            report.transcript_entries += copied;
        }
        Ok(())
    }

    /// Copies `old` into `new` with its entry ids (only those after what
    /// `new` already has, so a rerun adds nothing twice) and its TTL, then
    /// deletes `old`. Returns the entries (to be) copied.
    async fn copy_stream(
        &self,
        connection: &mut Pooled,
        old: &str,
        new: &str,
        dry_run: bool,
    ) -> Result<u64, OpsError> {
        let newest: Value = redis::cmd("XREVRANGE")
            .arg(new)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(connection)
            .await?;
        let mut from = match redis_conn::parse_entries(new, newest)?.pop() {
            Some(last) => format!("({}", last.id),
            None => "-".to_string(),
        };
        let mut copied = 0;
        loop {
            let reply: Value = redis::cmd("XRANGE")
                .arg(old)
                .arg(&from)
                .arg("+")
                .arg("COUNT")
                .arg(BATCH)
                .query_async(connection)
                .await?;
            let entries = redis_conn::parse_entries(old, reply)?;
            let full = entries.len() == BATCH;
            if let Some(last) = entries.last() {
                from = format!("({}", last.id);
            }
            copied += entries.len() as u64;
            if !dry_run && !entries.is_empty() {
                let mut pipe = redis::pipe();
                for entry in &entries {
                    let Some(fields) = &entry.fields else {
                        continue;
                    };
                    with_fields(pipe.cmd("XADD").arg(new).arg(&entry.id), fields).ignore();
                }
                pipe.query_async::<()>(connection).await?;
            }
            if !full {
                break;
            }
        }
        if !dry_run {
            let ttl: i64 = redis::cmd("PTTL").arg(old).query_async(connection).await?;
            if ttl > 0 {
                let _: i64 = redis::cmd("PEXPIRE")
                    .arg(new)
                    .arg(ttl)
                    .query_async(connection)
                    .await?;
            }
            let _: i64 = redis::cmd("DEL").arg(old).query_async(connection).await?;
        }
        Ok(copied)
    }

    /// Moves the unfinished entries of `sources` (one stream, or the three
    /// queues merged by entry id), a batch at a time.
    async fn move_set(
        &self,
        connection: &mut Pooled,
        (old, dry_run): (&str, bool),
        sources: &mut [Source],
        (new_streams, sent_markers): (&mut HashMap<String, u64>, &mut u64),
    ) -> Result<(), OpsError> {
        loop {
            let mut batch: Vec<Item> = Vec::with_capacity(BATCH);
            while batch.len() < BATCH {
                for (index, source) in sources.iter_mut().enumerate() {
                    source.refill(connection, index).await?;
                }
                let next = sources
                    .iter()
                    .enumerate()
                    .filter_map(|(index, source)| source.buffer.front().map(|item| (index, item)))
                    .min_by(|(_, a), (_, b)| a.order().cmp(&b.order()))
                    .map(|(index, _)| index);
                let Some(index) = next else {
                    break;
                };
                batch.extend(sources[index].buffer.pop_front());
            }
            if batch.is_empty() {
                return Ok(());
            }
            self.move_batch(
                connection,
                (old, dry_run),
                sources,
                batch,
                (&mut *new_streams, &mut *sent_markers),
            )
            .await?;
            if sources.iter().all(Source::exhausted) {
                return Ok(());
            }
        }
    }

    /// One batch: sent markers and new entries added, then the old
    /// entries acknowledged and deleted.
    async fn move_batch(
        &self,
        connection: &mut Pooled,
        (old, dry_run): (&str, bool),
        sources: &mut [Source],
        batch: Vec<Item>,
        (new_streams, sent_markers): (&mut HashMap<String, u64>, &mut u64),
    ) -> Result<(), OpsError> {
        let markers = self.sent_markers(connection, old, &batch).await?;
        let mut writes: BTreeMap<Partition, PartitionWrites> = BTreeMap::new();
        let mut done: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for item in batch {
            done.entry(item.source).or_default().push(item.id.clone());
            let source = &mut sources[item.source];
            let Some(fields) = &item.fields else {
                source.report.gone += 1;
                continue;
            };
            source.report.moved += 1;
            let (p, target, fields) = match &item.decoded {
                Some(Ok(decoded)) => {
                    let p = self.streams.partition_of(&decoded.platform, &decoded.chat);
                    (p, self.target(&source.stream, p), fields.clone())
                }
                decoded => {
                    let error = match decoded {
                        Some(Err(error)) => error.to_string(),
                        _ => "no fields".into(),
                    };
                    source.report.dead += 1;
                    let letter = DeadLetter {
                        stage: STAGE.into(),
                        // Partition 0's: a requeue puts it back there.
                        stream: self.target(&source.stream, 0),
                        entry_id: item.id.clone(),
                        error: format!(
                            "does not decode ({error}); botline migrate moved it from {} \
                             (entry {}) of the previous layout",
                            source.stream.key, item.id
                        ),
                        deliveries: item.deliveries,
                        fields: fields
                            .iter()
                            .map(|(k, v)| (k.clone(), serde_bytes::ByteBuf::from(v.clone())))
                            .collect(),
                        at_ms: now_ms(),
                    };
                    (0, self.streams.dead(0), codec::encode(&letter))
                }
            };
            *new_streams.entry(target.clone()).or_default() += 1;
            let writes = writes.entry(p).or_default();
            if let Some(Ok(Decoded {
                reply_id: Some(reply_id),
                ..
            })) = &item.decoded
            {
                for marker in markers.get(reply_id).into_iter().flatten() {
                    let key = match marker.part {
                        None => self.streams.sent(p, reply_id),
                        Some(part) => self.streams.sent_part(p, reply_id, part),
                    };
                    let command = writes.pipe.cmd("SET").arg(key).arg(marker.value.as_slice());
                    if marker.ttl_ms > 0 {
                        command.arg("PX").arg(marker.ttl_ms);
                    }
                    command.ignore();
                    writes.commands += 1;
                    *sent_markers += 1;
                }
            }
            with_fields(writes.pipe.cmd("XADD").arg(&target).arg("*"), &fields).ignore();
            writes.commands += 1;
        }
        if dry_run {
            return Ok(());
        }
        // New entries first, partition by partition (one slot each) ...
        for writes in writes.values() {
            if writes.commands > 0 {
                writes.pipe.query_async::<()>(connection).await?;
            }
        }
        // ... then the old ones marked moved: a rerun skips them.
        let mut pipe = redis::pipe();
        for (index, ids) in done {
            let source = &sources[index];
            if source.state.exists {
                pipe.cmd("XACK")
                    .arg(&source.stream.key)
                    .arg(source.stream.group)
                    .arg(&ids)
                    .ignore();
            }
            pipe.cmd("XDEL").arg(&source.stream.key).arg(&ids).ignore();
        }
        pipe.query_async::<()>(connection).await?;
        Ok(())
    }

    /// The new stream an old stream's entry of partition `p` goes to.
    fn target(&self, stream: &OldStream, p: Partition) -> String {
        match stream.kind {
            Kind::Message => self.streams.inbound(p),
            Kind::Classified => self.streams.queue(p),
            Kind::Reply => self.streams.outbound(p, &stream.platform),
        }
    }

    /// The old `sent:` markers (part `None`) and sent parts of the batch's
    /// replies: by reply id, each with its value and TTL (ms, -1: none).
    async fn sent_markers(
        &self,
        connection: &mut Pooled,
        old: &str,
        batch: &[Item],
    ) -> Result<HashMap<String, Vec<Marker>>, OpsError> {
        let mut found: HashMap<String, Vec<Marker>> = HashMap::new();
        // The marker and part 0 of every reply; then part n + 1 of each
        // reply whose part n was there.
        let mut probes: Vec<(&str, Option<usize>)> = batch
            .iter()
            .filter_map(|item| match &item.decoded {
                Some(Ok(Decoded {
                    reply_id: Some(id), ..
                })) => Some(id.as_str()),
                _ => None,
            })
            .flat_map(|id| [(id, None), (id, Some(0))])
            .collect();
        while !probes.is_empty() {
            let mut pipe = redis::pipe();
            for (id, part) in &probes {
                let key = match part {
                    None => format!("{old}:sent:{id}"),
                    Some(n) => format!("{old}:sent:{id}:part:{n}"),
                };
                pipe.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
            }
            let replies: Vec<Value> = pipe.query_async(connection).await?;
            let mut next = Vec::new();
            for ((id, part), pair) in probes.iter().zip(replies.chunks(2)) {
                let [value, ttl] = pair else {
                    continue;
                };
                let value: Option<Vec<u8>> = parse(value.clone())?;
                let ttl: i64 = parse(ttl.clone())?;
                let Some(value) = value else {
                    continue;
                };
                found.entry(id.to_string()).or_default().push(Marker {
                    part: *part,
                    value,
                    ttl_ms: ttl,
                });
                if let Some(n) = part {
                    if n + 1 < MAX_PARTS {
                        next.push((*id, Some(n + 1)));
                    }
                }
            }
            probes = next;
        }
        Ok(found)
    }
}

/// A `sent:` marker (part `None`) or sent part of an old reply.
struct Marker {
    part: Option<usize>,
    value: Vec<u8>,
    /// Milliseconds; -1 when it does not expire.
    ttl_ms: i64,
}

/// What `migrate` did (or would do), for the operator.
pub fn migrate_table(report: &MigrateReport) -> String {
    let (did, moved, copied, deleted) = if report.dry_run {
        ("would move", "would move", "would copy", "would delete")
    } else {
        ("moved", "moved", "copied", "deleted")
    };
    let mut out = String::new();
    if report.dry_run {
        out.push_str("dry run: nothing changed\n");
    }
    out.push_str(&format!(
        "old layout {}: {} {} unfinished entries\n",
        report.old_prefix,
        did,
        report.moved()
    ));
    for stream in &report.old_streams {
        out.push_str(&format!(
            "  {} (group {}): {} pending, {} undelivered; {moved} {}",
            stream.stream, stream.group, stream.pending, stream.undelivered, stream.moved
        ));
        if stream.dead > 0 {
            out.push_str(&format!(" ({} undecodable, to dead)", stream.dead));
        }
        if stream.gone > 0 {
            out.push_str(&format!(
                "; {} pending without payload acknowledged",
                stream.gone
            ));
        }
        if stream.deleted {
            out.push_str(&format!("; stream {deleted}\n"));
        } else {
            out.push_str(
                "; stream KEPT: entries arrived meanwhile (is an old stage still running?), \
                 run again\n",
            );
        }
    }
    out.push_str("new streams:\n");
    if report.new_streams.is_empty() {
        out.push_str("  (none)\n");
    }
    for (key, count) in &report.new_streams {
        out.push_str(&format!("  {key}: {count}\n"));
    }
    out.push_str(&format!(
        "contexts {copied}: {} ({} turns)\n",
        report.contexts, report.context_turns
    ));
    out.push_str(&format!(
        "web transcripts {copied}: {} ({} entries)\n",
        report.transcripts, report.transcript_entries
    ));
    out.push_str(&format!("sent markers {copied}: {}\n", report.sent_markers));
    out.push_str(&format!(
        "undecodable entries to {{…:p0}}:dead: {}\n",
        report.dead
    ));
    out.push_str(&format!(
        "old order keys {deleted}: {}\n",
        report.order_keys
    ));
    for (key, length) in &report.left_alone {
        out.push_str(&format!(
            "left alone: {key} ({length} entries; read with `botline peek {key}`, \
             delete when done)\n"
        ));
    }
    out
}
