//! The read-process-acknowledge loop every stage runs. A stage only says how
//! a batch of decoded inputs becomes outcomes ([`Stage::handle`]); the
//! runner owns every Redis call around it:
//!
//! - the group is created at `0` with `MKSTREAM`, so a new group misses nothing;
//! - a consumer first re-reads its own pending entries (`0`), then new ones
//!   (`>`), in batches, blocking on a connection of its own;
//! - an entry's outputs and its `XACK` are written by one script that adds
//!   the outputs only if the `XACK` acknowledged something, so a crash leaves
//!   both or neither and an entry taken over from a slow consumer is not
//!   forwarded twice;
//! - entries idle in any consumer's pending list longer than
//!   `claim_idle_ms` are taken over with `XAUTOCLAIM`; one delivered more
//!   than `max_deliveries` times goes to `dead` with the reason;
//! - entries that do not decode go to `dead` at once, the stage keeps going;
//! - on shutdown the batch in hand is finished and acknowledged.

use crate::codec::{self, Fields, Record};
use crate::config::{RunnerSettings, StreamSettings};
use crate::message::DeadLetter;
use crate::redis_conn::{self, id_order, Pool, RawEntry};
use crate::streams::Streams;
use crate::telemetry::Health;
use crate::{now_ms, Error};
use redis::aio::MultiplexedConnection;
use redis::Value;
use std::collections::HashMap;
use std::future::Future;
use std::sync::LazyLock;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// A stream a stage reads, with its share of each batch when it reads several.
#[derive(Debug, Clone)]
pub struct Input {
    pub stream: String,
    pub weight: usize,
}

/// A decoded input entry.
#[derive(Debug, Clone)]
pub struct Envelope<T> {
    pub stream: String,
    pub entry_id: String,
    /// How many times this entry has been delivered, this time included.
    pub deliveries: u64,
    pub record: T,
}

/// What became of one input entry.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// Acknowledge it and make these writes, atomically.
    Done(Vec<Write>),
    /// Acknowledge it and put it in `dead` with this reason.
    Dead(String),
    /// Leave it pending: it is delivered again after `claim_idle_ms`, and
    /// goes to `dead` after `max_deliveries`.
    Retry(String),
    /// Not its turn yet (an earlier message of its chat is still with
    /// another consumer): acknowledge it and add the same fields again at
    /// the end of its stream, atomically, to be read again later. Unlike
    /// `Retry` this neither waits for `claim_idle_ms` nor counts a delivery.
    Defer(String),
}

/// One write made together with an entry's acknowledgement.
#[derive(Debug, Clone)]
pub enum Write {
    /// `XADD stream * fields`, optionally capped (`MAXLEN ~`) and expiring.
    /// Never cap a pipeline stream: trimming ignores pending lists.
    Add {
        stream: String,
        fields: Fields,
        cap: Option<usize>,
        expire: Option<Duration>,
    },
    /// `SET key value PX expire`.
    Set {
        key: String,
        value: String,
        expire: Duration,
    },
    /// `PUBLISH channel message`, once per batch however many entries ask.
    Publish { channel: String, message: String },
    /// `DEL key`, in order with the entry's other writes.
    Delete { key: String },
    /// `XADD stream * fields`, and the new entry's place in a chat's order:
    /// `member` added to the sorted set `order` scored by the new entry id
    /// (see [`crate::order`]), which expires `order_ttl` after its last add.
    AddOrdered {
        stream: String,
        fields: Fields,
        order: String,
        member: String,
        order_ttl: Duration,
    },
    /// `ZREM order member`: this entry's turn in its chat is over.
    Unorder { order: String, member: String },
    /// `XADD` into `stream`, unless `member` has earlier unfinished members
    /// in its chat's `order` set: then into the stream the chat's last
    /// message went to (remembered under `lane` for `lane_ttl`), if that is
    /// one of `streams`. So a chat's messages are read in arrival order even
    /// when their priorities differ: a later one never waits, unread, ahead
    /// of an earlier one in another queue.
    AddToLane {
        stream: String,
        fields: Fields,
        order: String,
        member: String,
        lane: String,
        lane_ttl: Duration,
        streams: Vec<String>,
    },
}

impl Write {
    pub fn add<R: Record>(stream: impl Into<String>, record: &R) -> Write {
        Write::Add {
            stream: stream.into(),
            fields: codec::encode(record),
            cap: None,
            expire: None,
        }
    }

    /// A capped, expiring side stream (context, transcript): never a pipeline stream.
    pub fn add_capped<R: Record>(
        stream: impl Into<String>,
        record: &R,
        cap: usize,
        expire: Duration,
    ) -> Write {
        Write::Add {
            stream: stream.into(),
            fields: codec::encode(record),
            cap: Some(cap),
            expire: Some(expire),
        }
    }
}

/// A stage of the pipeline: how a batch of inputs becomes outcomes.
pub trait Stage: Send + Sync + 'static {
    type In: Record;

    /// The consumer group; also the `stage` label of metrics.
    fn group(&self) -> &'static str;

    /// The streams to read, most important first.
    fn inputs(&self) -> Vec<Input>;

    /// Whether the next batch may be handled while the previous batch's
    /// acknowledgement is still on its way to Redis. Acknowledgements stay in
    /// order either way; a stage that reads what its own previous batch
    /// wrote (respond's context) must answer `false`.
    fn overlap_batches(&self) -> bool {
        true
    }

    /// One outcome per envelope, in the same order.
    fn handle(&self, batch: Vec<Envelope<Self::In>>) -> impl Future<Output = Vec<Outcome>> + Send;

    /// Writes made when `record`'s entry goes to `dead` (leaving its place
    /// in a chat's order, say), so a dead letter does not hold anything up.
    fn release(&self, _record: &Self::In) -> Vec<Write> {
        Vec::new()
    }
}

/// What a runner needs from outside: connections, names and settings.
#[derive(Clone)]
pub struct Plumbing {
    pub client: redis::Client,
    /// Short commands of the hot path (acks, claims, locks), multiplexed.
    pub commands: redis::aio::ConnectionManager,
    /// Everything else.
    pub pool: Pool,
    pub streams: Streams,
    pub runner: RunnerSettings,
    pub stream_settings: StreamSettings,
    /// A fixed consumer name, or `None` to pick one from the host name.
    pub consumer: Option<String>,
    pub health: Health,
}

static ACK_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&ACK_SCRIPT_CODE.replace("{score}", crate::order::SCORE_LUA))
});

const ACK_SCRIPT_CODE: &str = r#"
-- KEYS: every key written. ARGV: group, entry count, then per entry:
-- input key index, entry id, write count, then per write one of
--   add <key index> <cap> <expire ms> <field count> <field> <value> ...
--   set <key index> <value> <expire ms>
--   pub <channel> <message>
--   del <key index>
--   addo <key index> <order key index> <member> <order ttl ms> <field count> <field> <value> ...
--   zrem <key index> <member>
--   addl <key index> <order key index> <member> <lane key index> <lane ttl ms>
--        <stream count> <stream key index> ... <field count> <field> <value> ...
-- Writes happen only if XACK acknowledged the entry; a stream's expiry is
-- set, and each distinct message published, once, after the batch.
-- Returns 1/0 per entry.
local group = ARGV[1]
local count = tonumber(ARGV[2])
local p = 3
local acked = {}
local expires = {}
local publish = {}
for i = 1, count do
  local stream = KEYS[tonumber(ARGV[p])]
  local ok = redis.call('XACK', stream, group, ARGV[p + 1])
  local writes = tonumber(ARGV[p + 2])
  p = p + 3
  acked[i] = ok
  for _ = 1, writes do
    local op = ARGV[p]
    if op == 'add' then
      local key = KEYS[tonumber(ARGV[p + 1])]
      -- cap and expire stay strings: Redis would print numbers back to text.
      local cap = ARGV[p + 2]
      local expire = ARGV[p + 3]
      local last = p + 4 + tonumber(ARGV[p + 4]) * 2
      if ok == 1 then
        if cap ~= '0' then
          redis.call('XADD', key, 'MAXLEN', '~', cap, '*', unpack(ARGV, p + 5, last))
        else
          redis.call('XADD', key, '*', unpack(ARGV, p + 5, last))
        end
        if expire ~= '0' then
          expires[key] = expire
        end
      end
      p = last + 1
    elseif op == 'set' then
      if ok == 1 then
        redis.call('SET', KEYS[tonumber(ARGV[p + 1])], ARGV[p + 2], 'PX', ARGV[p + 3])
      end
      p = p + 4
    elseif op == 'del' then
      if ok == 1 then
        redis.call('DEL', KEYS[tonumber(ARGV[p + 1])])
      end
      p = p + 2
    elseif op == 'addo' then
      local last = p + 5 + tonumber(ARGV[p + 5]) * 2
      if ok == 1 then
        local id = redis.call('XADD', KEYS[tonumber(ARGV[p + 1])], '*', unpack(ARGV, p + 6, last))
        local order = KEYS[tonumber(ARGV[p + 2])]
        local ms, seq = string.match(id, '(%d+)-(%d+)')
        redis.call('ZADD', order, {score}, ARGV[p + 3])
        redis.call('PEXPIRE', order, ARGV[p + 4])
      end
      p = last + 1
    elseif op == 'addl' then
      local streams = tonumber(ARGV[p + 6])
      local fields = p + 7 + streams
      local last = fields + tonumber(ARGV[fields]) * 2
      if ok == 1 then
        local target = KEYS[tonumber(ARGV[p + 1])]
        local lane = KEYS[tonumber(ARGV[p + 4])]
        if (redis.call('ZRANK', KEYS[tonumber(ARGV[p + 2])], ARGV[p + 3]) or 0) > 0 then
          local current = redis.call('GET', lane)
          for s = p + 7, p + 6 + streams do
            if KEYS[tonumber(ARGV[s])] == current then target = current end
          end
        end
        redis.call('XADD', target, '*', unpack(ARGV, fields + 1, last))
        redis.call('SET', lane, target, 'PX', ARGV[p + 5])
      end
      p = last + 1
    elseif op == 'zrem' then
      if ok == 1 then
        redis.call('ZREM', KEYS[tonumber(ARGV[p + 1])], ARGV[p + 2])
      end
      p = p + 3
    elseif op == 'pub' then
      if ok == 1 then
        publish[ARGV[p + 1] .. '\n' .. ARGV[p + 2]] = {ARGV[p + 1], ARGV[p + 2]}
      end
      p = p + 3
    else
      return redis.error_reply('unknown write ' .. tostring(op))
    end
  end
end
for key, expire in pairs(expires) do
  redis.call('PEXPIRE', key, expire)
end
for _, message in pairs(publish) do
  redis.call('PUBLISH', message[1], message[2])
end
return acked
"#;

/// Deletes a consumer only if it has nothing pending (DELCONSUMER would drop it).
const RETIRE_CONSUMER_SCRIPT: &str = r#"
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2])
if #pending == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"#;

/// The script arguments for one batch of outcomes.
struct AckCall {
    keys: Vec<String>,
    key_index: HashMap<String, usize>,
    args: Vec<Vec<u8>>,
    entries: usize,
}

impl AckCall {
    fn new(group: &str) -> Self {
        AckCall {
            keys: Vec::new(),
            key_index: HashMap::new(),
            args: vec![group.as_bytes().to_vec(), Vec::new()],
            entries: 0,
        }
    }

    fn key(&mut self, key: &str) -> Vec<u8> {
        let next = self.keys.len() + 1;
        let index = *self.key_index.entry(key.to_string()).or_insert_with(|| {
            self.keys.push(key.to_string());
            next
        });
        index.to_string().into_bytes()
    }

    fn push_key(&mut self, key: &str) {
        let index = self.key(key);
        self.push(index);
    }

    fn push(&mut self, arg: impl Into<Vec<u8>>) {
        self.args.push(arg.into());
    }

    fn push_fields(&mut self, fields: &Fields) {
        self.push(fields.len().to_string());
        for (name, value) in fields {
            self.push(name.as_bytes());
            self.push(value.as_slice());
        }
    }

    fn entry(&mut self, stream: &str, id: &str, writes: &[Write]) {
        self.entries += 1;
        self.push_key(stream);
        self.push(id);
        self.push(writes.len().to_string());
        for write in writes {
            match write {
                Write::Add {
                    stream,
                    fields,
                    cap,
                    expire,
                } => {
                    self.push("add");
                    self.push_key(stream);
                    self.push(cap.unwrap_or(0).to_string());
                    self.push(expire.map_or(0, |d| d.as_millis()).to_string());
                    self.push_fields(fields);
                }
                Write::Set { key, value, expire } => {
                    self.push("set");
                    self.push_key(key);
                    self.push(value.as_bytes());
                    self.push(expire.as_millis().to_string());
                }
                Write::Delete { key } => {
                    self.push("del");
                    self.push_key(key);
                }
                Write::AddOrdered {
                    stream,
                    fields,
                    order,
                    member,
                    order_ttl,
                } => {
                    self.push("addo");
                    self.push_key(stream);
                    self.push_key(order);
                    self.push(member.as_bytes());
                    self.push(order_ttl.as_millis().to_string());
                    self.push_fields(fields);
                }
                Write::AddToLane {
                    stream,
                    fields,
                    order,
                    member,
                    lane,
                    lane_ttl,
                    streams,
                } => {
                    self.push("addl");
                    self.push_key(stream);
                    self.push_key(order);
                    self.push(member.as_bytes());
                    self.push_key(lane);
                    self.push(lane_ttl.as_millis().to_string());
                    self.push(streams.len().to_string());
                    for stream in streams {
                        self.push_key(stream);
                    }
                    self.push_fields(fields);
                }
                Write::Unorder { order, member } => {
                    self.push("zrem");
                    self.push_key(order);
                    self.push(member.as_bytes());
                }
                Write::Publish { channel, message } => {
                    self.push("pub");
                    self.push(channel.as_bytes());
                    self.push(message.as_bytes());
                }
            }
        }
    }

    async fn run(mut self, connection: &redis::aio::ConnectionManager) -> Result<Vec<bool>, Error> {
        if self.entries == 0 {
            return Ok(Vec::new());
        }
        self.args[1] = self.entries.to_string().into_bytes();
        let mut invocation = ACK_SCRIPT.prepare_invoke();
        for key in &self.keys {
            invocation.key(key);
        }
        for arg in &self.args {
            invocation.arg(arg.as_slice());
        }
        let acked: Vec<i64> = invocation.invoke_async(&mut connection.clone()).await?;
        Ok(acked.into_iter().map(|ack| ack == 1).collect())
    }
}

/// A batch handled, its acknowledgement not yet sent.
struct Prepared {
    call: AckCall,
    /// Per acknowledged entry, the outcome counted if the ack takes.
    kinds: Vec<&'static str>,
    retried: usize,
    batch_size: usize,
    started: Instant,
}

/// A batch whose acknowledgement is on its way.
struct InFlight {
    acked: tokio::task::JoinHandle<Result<Vec<bool>, Error>>,
    kinds: Vec<&'static str>,
    retried: usize,
    batch_size: usize,
    started: Instant,
}

/// The `outcome` label values of `botline_stage_messages_total`.
const OUTCOMES: [&str; 7] = [
    "forwarded",
    "dead",
    "retry",
    "deferred",
    "stale",
    "claimed",
    "deleted",
];

/// Counts outcomes into `botline_stage_messages_total{stage, outcome}`.
fn count(stage: &'static str, outcome: &'static str, n: usize) {
    metrics::counter!("botline_stage_messages_total", "stage" => stage, "outcome" => outcome)
        .increment(n as u64);
}

pub struct Runner<S: Stage> {
    stage: S,
    group: &'static str,
    inputs: Vec<Input>,
    plumbing: Plumbing,
    consumer: String,
}

/// Run `stage` until `shutdown`: the whole loop described at the top of this module.
pub async fn run<S: Stage>(
    stage: S,
    plumbing: Plumbing,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    plumbing.runner.validate()?;
    let group = stage.group();
    // Not ready until the loop has read once.
    plumbing.health.set(group, false);
    // Every outcome is exported from the start, so the first of each is a rate, not a new series.
    for outcome in OUTCOMES {
        count(group, outcome, 0);
    }
    let inputs = stage.inputs();
    let lease = crate::lease::ConsumerLease::acquire(&plumbing, group).await?;
    let runner = Runner {
        consumer: lease.consumer().to_string(),
        stage,
        group,
        inputs,
        plumbing,
    };
    runner.ensure_groups().await?;
    info!(
        message = "stage started",
        stage = group,
        consumer = %runner.consumer,
        inputs = ?runner.inputs.iter().map(|i| i.stream.as_str()).collect::<Vec<_>>()
    );
    let maintenance = tokio::spawn(crate::lease::maintain(
        lease.clone(),
        runner.plumbing.clone(),
        runner.inputs.iter().map(|i| i.stream.clone()).collect(),
        shutdown.child_token(),
    ));
    runner.read_loop(&shutdown).await;
    shutdown.cancel();
    let _ = maintenance.await;
    runner.retire().await;
    lease.release(&runner.plumbing.pool).await;
    info!(message = "stage stopped", stage = group, consumer = %runner.consumer);
    Ok(())
}

impl<S: Stage> Runner<S> {
    async fn ensure_groups(&self) -> Result<(), Error> {
        let mut connection = self.plumbing.pool.get().await?;
        for input in &self.inputs {
            let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(&input.stream)
                .arg(self.group)
                .arg("0")
                .arg("MKSTREAM")
                .query_async(&mut connection)
                .await;
            match created {
                Ok(()) => {
                    info!(message = "group created", stream = %input.stream, group = self.group)
                }
                Err(error) if error.code() == Some("BUSYGROUP") => {}
                Err(error) => return Err(error.into()),
            }
        }
        Ok(())
    }

    async fn read_loop(&self, shutdown: &CancellationToken) {
        let mut connection: Option<MultiplexedConnection> = None;
        let mut own_pending_first = true;
        let mut next_claim = Instant::now();
        let mut backoff = Duration::from_millis(100);
        // The previous batch's acknowledgement, while the next batch is read and handled.
        let mut in_flight: Option<InFlight> = None;
        while !shutdown.is_cancelled() {
            let step = async {
                let conn = match connection.as_mut() {
                    Some(conn) => conn,
                    None => connection.insert(
                        redis_conn::blocking_connection(
                            &self.plumbing.client,
                            self.plumbing.runner.block(),
                        )
                        .await?,
                    ),
                };
                if own_pending_first || Instant::now() >= next_claim {
                    if let Some(previous) = in_flight.take() {
                        self.settle(previous).await?;
                    }
                }
                if own_pending_first {
                    self.drain_own_pending(conn).await?;
                    own_pending_first = false;
                }
                if Instant::now() >= next_claim {
                    self.claim_idle().await?;
                    next_claim = Instant::now() + self.plumbing.runner.claim_interval();
                }
                let entries = tokio::select! {
                    entries = self.read_new(conn) => entries?,
                    _ = shutdown.cancelled() => return Ok(()),
                };
                self.plumbing.health.set(self.group, true);
                let prepared = self.prepare(entries, true).await?;
                // Acknowledgements go out in order: the previous one first.
                if let Some(previous) = in_flight.take() {
                    self.settle(previous).await?;
                }
                if let Some(prepared) = prepared {
                    let started = self.start(prepared);
                    if self.stage.overlap_batches() {
                        in_flight = Some(started);
                    } else {
                        self.settle(started).await?;
                    }
                }
                Ok::<(), Error>(())
            };
            let result = step.await;
            if result.is_err() {
                self.settle_last(in_flight.take()).await;
            }
            match result {
                Ok(()) => backoff = Duration::from_millis(100),
                Err(error) => {
                    warn!(message = "stage step failed; re-reading own pending entries", stage = self.group, %error);
                    metrics::counter!("botline_stage_errors_total", "stage" => self.group)
                        .increment(1);
                    self.plumbing.health.set(self.group, false);
                    connection = None;
                    own_pending_first = true;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        self.settle_last(in_flight.take()).await;
    }

    /// Settle an acknowledgement on the way out of the loop: a failure only leaves
    /// the batch pending for the next read of own pending entries.
    async fn settle_last(&self, in_flight: Option<InFlight>) {
        if let Some(in_flight) = in_flight {
            if let Err(error) = self.settle(in_flight).await {
                warn!(message = "acknowledgement failed; the batch stays pending", stage = self.group, %error);
            }
        }
    }

    /// Re-read this consumer's own pending entries, from the start, until none are left.
    async fn drain_own_pending(&self, conn: &mut MultiplexedConnection) -> Result<(), Error> {
        for input in &self.inputs {
            let mut after = "0".to_string();
            loop {
                let reply: Value = redis::cmd("XREADGROUP")
                    .arg("GROUP")
                    .arg(self.group)
                    .arg(&self.consumer)
                    .arg("COUNT")
                    .arg(self.plumbing.runner.batch_size)
                    .arg("STREAMS")
                    .arg(&input.stream)
                    .arg(&after)
                    .query_async(conn)
                    .await?;
                let entries = redis_conn::parse_read_reply(reply)?;
                let Some(last) = entries.last() else { break };
                after = last.id.clone();
                debug!(
                    message = "re-reading own pending entries",
                    stage = self.group,
                    count = entries.len()
                );
                self.process(entries, false).await?;
            }
        }
        Ok(())
    }

    /// Take over entries idle too long in any consumer's pending list.
    async fn claim_idle(&self) -> Result<(), Error> {
        const PAGES_PER_CLAIM: usize = 10;
        for input in &self.inputs {
            let mut cursor = "0-0".to_string();
            for _ in 0..PAGES_PER_CLAIM {
                let mut connection = self.plumbing.commands.clone();
                let reply: Value = redis::cmd("XAUTOCLAIM")
                    .arg(&input.stream)
                    .arg(self.group)
                    .arg(&self.consumer)
                    .arg(self.plumbing.runner.claim_idle_ms)
                    .arg(&cursor)
                    .arg("COUNT")
                    .arg(self.plumbing.runner.batch_size)
                    .query_async(&mut connection)
                    .await?;
                let Value::Array(mut parts) = reply else {
                    return Err(Error::Garbage("XAUTOCLAIM reply is not an array".into()));
                };
                if parts.len() < 2 {
                    return Err(Error::Garbage("XAUTOCLAIM reply too short".into()));
                }
                let deleted = if parts.len() > 2 { parts.pop() } else { None };
                let claimed =
                    redis_conn::parse_entries(&input.stream, parts.pop().unwrap_or(Value::Nil))?;
                cursor = redis_conn::string(parts.pop().unwrap_or(Value::Nil))?;
                if let Some(Value::Array(deleted)) = deleted {
                    if !deleted.is_empty() {
                        let ids = deleted
                            .into_iter()
                            .map(redis_conn::string)
                            .collect::<Result<Vec<_>, _>>()?;
                        let _: i64 = redis::cmd("XACK")
                            .arg(&input.stream)
                            .arg(self.group)
                            .arg(&ids)
                            .query_async(&mut connection)
                            .await?;
                        warn!(
                            message = "pending entries had been deleted from the stream",
                            stage = self.group,
                            count = ids.len()
                        );
                        count(self.group, "deleted", ids.len());
                    }
                }
                if !claimed.is_empty() {
                    info!(message = "took over idle entries", stage = self.group, stream = %input.stream, count = claimed.len());
                    count(self.group, "claimed", claimed.len());
                    self.process(claimed, false).await?;
                }
                if cursor == "0-0" {
                    break;
                }
            }
        }
        Ok(())
    }

    /// New entries, most important input first; blocks only when all are empty.
    ///
    /// With several inputs, one pipelined round of non-blocking reads takes
    /// each input's weighted share of the batch; if that leaves room and some
    /// inputs filled their share, a second round splits the room among them.
    /// Every input is read every time, so none starves.
    async fn read_new(&self, conn: &mut MultiplexedConnection) -> Result<Vec<RawEntry>, Error> {
        let batch_size = self.plumbing.runner.batch_size;
        if self.inputs.len() > 1 {
            let everyone: Vec<usize> = (0..self.inputs.len()).collect();
            let mut read = self.read_shares(conn, &everyone, batch_size).await?;
            let total: usize = read.iter().map(|(_, entries)| entries.len()).sum();
            // Inputs that gave all they were asked for may hold more.
            let full: Vec<usize> = read
                .iter()
                .enumerate()
                .filter(|(_, (share, entries))| entries.len() == *share)
                .map(|(index, _)| index)
                .collect();
            if total < batch_size && !full.is_empty() {
                for (index, (_, more)) in full
                    .iter()
                    .zip(self.read_shares(conn, &full, batch_size - total).await?)
                {
                    read[*index].1.extend(more);
                }
            }
            let entries: Vec<RawEntry> =
                read.into_iter().flat_map(|(_, entries)| entries).collect();
            if !entries.is_empty() {
                return Ok(entries);
            }
        }
        let streams: Vec<&str> = self.inputs.iter().map(|i| i.stream.as_str()).collect();
        let reply: Value = self
            .xreadgroup(batch_size, Some(self.plumbing.runner.block_ms), &streams)
            .query_async(conn)
            .await?;
        let mut entries = redis_conn::parse_read_reply(reply)?;
        // A blocking read over several streams returns them in any order.
        entries.sort_by_key(|entry| streams.iter().position(|s| *s == entry.stream));
        Ok(entries)
    }

    /// One pipelined round of non-blocking reads of `inputs`, splitting
    /// `room` by weight; each input's share and what it gave.
    async fn read_shares(
        &self,
        conn: &mut MultiplexedConnection,
        inputs: &[usize],
        room: usize,
    ) -> Result<Vec<(usize, Vec<RawEntry>)>, Error> {
        let weights: Vec<usize> = inputs.iter().map(|i| self.inputs[*i].weight).collect();
        let counts = shares(room, &weights);
        let mut pipe = redis::pipe();
        for (index, count) in inputs.iter().zip(&counts) {
            pipe.add_command(self.xreadgroup(*count, None, &[self.inputs[*index].stream.as_str()]));
        }
        let replies: Vec<Value> = pipe.query_async(conn).await?;
        counts
            .into_iter()
            .zip(replies)
            .map(|(count, reply)| Ok((count, redis_conn::parse_read_reply(reply)?)))
            .collect()
    }

    fn xreadgroup(&self, count: usize, block_ms: Option<u64>, streams: &[&str]) -> redis::Cmd {
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(self.group)
            .arg(&self.consumer)
            .arg("COUNT")
            .arg(count);
        if let Some(block_ms) = block_ms {
            cmd.arg("BLOCK").arg(block_ms);
        }
        cmd.arg("STREAMS").arg(streams);
        for _ in streams {
            cmd.arg(">");
        }
        cmd
    }

    /// How many times each of `entries` has been delivered (`XPENDING … IDLE` gives it).
    async fn delivery_counts(&self, entries: &[RawEntry]) -> Result<HashMap<String, u64>, Error> {
        let mut counts = HashMap::new();
        let mut connection = self.plumbing.commands.clone();
        let mut by_stream: HashMap<&str, Vec<&RawEntry>> = HashMap::new();
        for entry in entries {
            by_stream
                .entry(entry.stream.as_str())
                .or_default()
                .push(entry);
        }
        for (stream, entries) in by_stream {
            let (first, last) = (&entries[0].id, &entries[entries.len() - 1].id);
            let (low, high) = if id_order(first) <= id_order(last) {
                (first, last)
            } else {
                (last, first)
            };
            let reply: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
                .arg(stream)
                .arg(self.group)
                .arg(low)
                .arg(high)
                .arg(entries.len().max(1) * 2)
                .arg(&self.consumer)
                .query_async(&mut connection)
                .await?;
            counts.extend(
                reply
                    .into_iter()
                    .map(|(id, _, _, deliveries)| (id, deliveries)),
            );
        }
        Ok(counts)
    }

    /// Decode, hand to the stage, and acknowledge with the outputs in one script.
    async fn process(&self, entries: Vec<RawEntry>, fresh: bool) -> Result<(), Error> {
        match self.prepare(entries, fresh).await? {
            Some(prepared) => self.settle(self.start(prepared)).await,
            None => Ok(()),
        }
    }

    /// Decode and hand to the stage: the acknowledgement to make.
    async fn prepare(
        &self,
        entries: Vec<RawEntry>,
        fresh: bool,
    ) -> Result<Option<Prepared>, Error> {
        if entries.is_empty() {
            return Ok(None);
        }
        let started = Instant::now();
        let deliveries = if fresh {
            HashMap::new()
        } else {
            self.delivery_counts(&entries).await?
        };
        let max_deliveries = self.plumbing.runner.max_deliveries;
        // Per entry: its outcome, decided here or by the stage.
        let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(entries.len());
        let mut envelopes = Vec::new();
        let mut handed = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            let delivered = deliveries.get(&entry.id).copied().unwrap_or(1);
            let Some(fields) = &entry.fields else {
                count(self.group, "deleted", 1);
                outcomes.push(Some(Outcome::Done(Vec::new())));
                continue;
            };
            if delivered > max_deliveries {
                outcomes.push(Some(Outcome::Dead(format!(
                    "delivered {delivered} times (max {max_deliveries}) without being acknowledged"
                ))));
                continue;
            }
            match codec::decode::<S::In>(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice()))) {
                Ok(record) => {
                    envelopes.push(Envelope {
                        stream: entry.stream.clone(),
                        entry_id: entry.id.clone(),
                        deliveries: delivered,
                        record,
                    });
                    handed.push(index);
                    outcomes.push(None);
                }
                Err(error) => outcomes.push(Some(Outcome::Dead(error.to_string()))),
            }
        }
        let batch_size = envelopes.len();
        if !envelopes.is_empty() {
            let decided = self.stage.handle(envelopes).await;
            assert_eq!(
                decided.len(),
                handed.len(),
                "a stage returns one outcome per envelope"
            );
            for (index, outcome) in handed.into_iter().zip(decided) {
                outcomes[index] = Some(outcome);
            }
        }
        let mut call = AckCall::new(self.group);
        let mut acked_kinds = Vec::new();
        let mut retried = 0;
        for (entry, outcome) in entries.iter().zip(outcomes) {
            match outcome.expect("every entry has an outcome") {
                Outcome::Done(writes) => {
                    call.entry(&entry.stream, &entry.id, &writes);
                    acked_kinds.push("forwarded");
                }
                Outcome::Dead(reason) => {
                    let delivered = deliveries.get(&entry.id).copied().unwrap_or(1);
                    warn!(message = "entry sent to dead", stage = self.group, stream = %entry.stream, id = %entry.id, reason = %reason, deliveries = delivered);
                    let letter = DeadLetter {
                        stage: self.group.to_string(),
                        stream: entry.stream.clone(),
                        entry_id: entry.id.clone(),
                        error: reason,
                        deliveries: delivered,
                        fields: entry
                            .fields
                            .iter()
                            .flatten()
                            .map(|(k, v)| (k.clone(), serde_bytes::ByteBuf::from(v.clone())))
                            .collect(),
                        at_ms: now_ms(),
                    };
                    let mut write = Write::add(self.plumbing.streams.dead(), &letter);
                    if let Write::Add { cap, .. } = &mut write {
                        *cap = Some(self.plumbing.stream_settings.dead_max_len);
                    }
                    // Decoded again: dead letters are rare, a copy of every record is not.
                    let mut writes = entry
                        .fields
                        .as_ref()
                        .and_then(|fields| {
                            codec::decode::<S::In>(
                                fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
                            )
                            .ok()
                        })
                        .map(|record| self.stage.release(&record))
                        .unwrap_or_default();
                    writes.push(write);
                    call.entry(&entry.stream, &entry.id, &writes);
                    acked_kinds.push("dead");
                }
                Outcome::Defer(reason) => {
                    debug!(message = "entry put back at the end of its stream", stage = self.group, id = %entry.id, reason = %reason);
                    let again = Write::Add {
                        stream: entry.stream.clone(),
                        fields: entry.fields.clone().unwrap_or_default(),
                        cap: None,
                        expire: None,
                    };
                    call.entry(&entry.stream, &entry.id, &[again]);
                    acked_kinds.push("deferred");
                }
                Outcome::Retry(reason) => {
                    debug!(message = "entry left pending for a retry", stage = self.group, id = %entry.id, reason = %reason);
                    retried += 1;
                }
            }
        }
        Ok(Some(Prepared {
            call,
            kinds: acked_kinds,
            retried,
            batch_size,
            started,
        }))
    }

    /// Send the acknowledgement script; it runs while the caller goes on.
    fn start(&self, prepared: Prepared) -> InFlight {
        let connection = self.plumbing.commands.clone();
        let Prepared {
            call,
            kinds,
            retried,
            batch_size,
            started,
        } = prepared;
        InFlight {
            acked: tokio::spawn(async move { call.run(&connection).await }),
            kinds,
            retried,
            batch_size,
            started,
        }
    }

    /// Wait for an acknowledgement and count what it did.
    async fn settle(&self, in_flight: InFlight) -> Result<(), Error> {
        let acked = in_flight
            .acked
            .await
            .map_err(|error| Error::Garbage(format!("acknowledgement task failed: {error}")))??;
        let mut tally: HashMap<&'static str, usize> = HashMap::new();
        for (kind, acked) in in_flight.kinds.into_iter().zip(acked) {
            *tally.entry(if acked { kind } else { "stale" }).or_default() += 1;
        }
        tally.insert("retry", in_flight.retried);
        for (kind, n) in tally {
            count(self.group, kind, n);
        }
        metrics::histogram!("botline_stage_batch_size", "stage" => self.group)
            .record(in_flight.batch_size as f64);
        metrics::histogram!("botline_stage_duration_seconds", "stage" => self.group)
            .record(in_flight.started.elapsed().as_secs_f64());
        Ok(())
    }

    /// On a clean stop, remove this consumer from its groups if it has nothing pending,
    /// so scaling down leaves no ghosts in `XINFO CONSUMERS`.
    async fn retire(&self) {
        let Ok(mut connection) = self.plumbing.pool.get().await else {
            return;
        };
        for input in &self.inputs {
            let retired: Result<i64, _> = redis::Script::new(RETIRE_CONSUMER_SCRIPT)
                .key(&input.stream)
                .arg(self.group)
                .arg(&self.consumer)
                .invoke_async(&mut connection)
                .await;
            if let Ok(-1) = retired {
                info!(message = "consumer keeps pending entries for its next start", stream = %input.stream, consumer = %self.consumer);
            }
        }
    }
}

impl Plumbing {
    /// Connections and settings for a binary, from its process config and settings.
    pub fn connect(
        process: &crate::config::ProcessConfig,
        settings: &crate::config::Settings,
        health: Health,
    ) -> Result<Self, Error> {
        let runner: RunnerSettings = settings.section("runner")?;
        runner.validate()?;
        let client = redis_conn::client(process)?;
        Ok(Plumbing {
            commands: redis_conn::commands(&client)?,
            client,
            pool: redis_conn::pool(process, 16)?,
            streams: process.streams(),
            runner,
            stream_settings: settings.section("streams")?,
            consumer: process.consumer.clone(),
            health,
        })
    }
}

/// `room` split in proportion to `weights` (a weight of 0 counts as 1),
/// every share at least 1, the shares adding up to at least `room`.
fn shares(room: usize, weights: &[usize]) -> Vec<usize> {
    let total: usize = weights.iter().map(|w| (*w).max(1)).sum();
    weights
        .iter()
        .map(|w| (room * (*w).max(1)).div_ceil(total).max(1))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_follow_weights() {
        let check = |room: usize, weights: &[usize], expected: &[usize]| {
            assert_eq!(shares(room, weights), expected, "{room} over {weights:?}");
        };
        check(200, &[8, 3, 1], &[134, 50, 17]);
        check(200, &[1, 1], &[100, 100]);
        check(1, &[8, 3, 1], &[1, 1, 1]);
        check(10, &[0, 1], &[5, 5]);
        check(150, &[3], &[150]);
    }
}
