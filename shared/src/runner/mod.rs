//! The read-process-acknowledge loop every stage runs. A stage only says how
//! a batch of decoded inputs becomes outcomes ([`Stage::prepare`] for the
//! whole batch, [`Stage::handle_chat`] for each chat's messages); the runner
//! owns every Redis call around it:
//!
//! - [`ownership`]: the stage's consumers divide the partitions among
//!   themselves (each announces itself; each partition has one owner under a
//!   lease; balanced and sticky; a partition moves only after its owner gave
//!   it up, having finished what it had in hand, or its lease ran out);
//! - [`read`]: an owner first takes over the partition's pending entries,
//!   whoever they were delivered to, then reads new ones, in batches,
//!   blocking on a connection of its own, at most `window` ahead of what it
//!   has acknowledged;
//! - [`dispatch`]: many chats at once, one chat's messages one after another
//!   (a chat's next message is handed out only once the one before is
//!   acknowledged with its writes), urgent chats first;
//! - [`ack`]: an entry's outputs and its `XACK` are written by one script
//!   that writes nothing unless this consumer still owns the partition, and
//!   adds the outputs only if the `XACK` acknowledged something; what is
//!   finished while a script is on its way goes in the next one.
//!
//! Entries that do not decode, or were delivered more than `max_deliveries`
//! times, go to the partition's `dead` with the reason; the stage keeps
//! going. On shutdown the messages in hand are finished and acknowledged,
//! and the partitions given up.

mod ack;
mod dispatch;
mod ownership;
mod read;

use crate::codec::{self, Fields, Record};
use crate::config::{RunnerSettings, StreamSettings};
use crate::message::Priority;
use crate::redis_conn::{self, Pool};
use crate::streams::{Partition, Streams};
use crate::telemetry::Health;
use crate::Error;
use std::future::Future;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A decoded input entry.
#[derive(Debug, Clone)]
pub struct Envelope<T> {
    pub partition: Partition,
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
    /// Keep it: it is handed to the stage again after `retry_ms` (its chat's
    /// later messages wait for it), and goes to `dead` after `max_deliveries`.
    Retry(String),
}

/// One write made together with an entry's acknowledgement. Every key
/// written must be in the entry's partition (see [`crate::streams`]).
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
///
/// The runner hands the stage a batch of one partition's entries in which
/// each chat appears with its next messages, in order, and no chat is in
/// two batches at once: a chat's messages are handled one after another,
/// each after the one before it was acknowledged.
pub trait Stage: Send + Sync + 'static {
    type In: Record + Send + Sync + 'static;
    /// What [`Stage::prepare`] finds out for a whole batch (contexts, locks).
    type Prepared: Send + Sync;

    /// The consumer group; also the `stage` label of metrics.
    fn group(&self) -> &'static str;

    /// The streams this stage reads in partition `p`.
    fn inputs(&self, streams: &Streams, p: Partition) -> Vec<String>;

    /// The chat an input belongs to: its messages are handled in order.
    fn chat(&self, record: &Self::In) -> String;

    /// Which chats go first when more are waiting than can be handled.
    fn priority(&self, _record: &Self::In) -> Priority {
        Priority::Normal
    }

    /// The shares of each handing-out given to urgent, normal and batch chats.
    fn weights(&self) -> [usize; 3] {
        [1, 1, 1]
    }

    /// How many of one chat's messages, `head` first, may be in one batch
    /// (handled by [`Stage::handle_chat`] one after another before any is
    /// acknowledged).
    fn max_run(&self, _head: &Self::In) -> usize {
        usize::MAX
    }

    /// How many messages may be in the stage's hands at once, over every
    /// partition this consumer owns.
    fn max_in_flight(&self) -> usize;

    /// Batch-wide work before the chats are handled (one Redis round trip
    /// for every chat's context, a model run over every text). A stage
    /// whose work leaves Redis (egress's sends) checks `fence` first, in the
    /// same script as its locks.
    fn prepare(
        &self,
        fence: &Fence,
        batch: &[Envelope<Self::In>],
    ) -> impl Future<Output = Self::Prepared> + Send;

    /// One outcome per message of one chat, in order; `run` is a slice of
    /// the prepared batch. Once a message is `Retry`, so are the ones after it.
    fn handle_chat(
        &self,
        prepared: &Self::Prepared,
        run: &[Envelope<Self::In>],
    ) -> impl Future<Output = Vec<Outcome>> + Send;
}

/// Who may write for a batch's partition: its owner key must hold `consumer`.
#[derive(Debug, Clone)]
pub struct Fence {
    pub owner_key: String,
    pub consumer: String,
}

/// What a runner needs from outside: connections, names and settings.
#[derive(Clone)]
pub struct Plumbing {
    /// Where the streams live: one server, or a cluster.
    pub client: redis_conn::Redis,
    /// Short commands of the hot path (acks, claims, locks), multiplexed.
    pub commands: redis_conn::Connection,
    /// Everything else.
    pub pool: Pool,
    pub streams: Streams,
    pub runner: RunnerSettings,
    pub stream_settings: StreamSettings,
    /// A fixed consumer name, or `None` to pick one from the host name.
    pub consumer: Option<String>,
    pub health: Health,
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
        let client = redis_conn::Redis::connect(process)?;
        Ok(Plumbing {
            commands: client.commands()?,
            pool: client.pool(16)?,
            client,
            streams: process.streams(settings)?,
            runner,
            stream_settings: settings.section("streams")?,
            consumer: process.consumer.clone(),
            health,
        })
    }
}

/// The `outcome` label values of `botline_stage_messages_total`.
const OUTCOMES: [&str; 6] = ["forwarded", "dead", "retry", "stale", "claimed", "deleted"];

/// Counts outcomes into `botline_stage_messages_total{stage, outcome}`.
fn count(stage: &'static str, outcome: &'static str, n: usize) {
    metrics::counter!("botline_stage_messages_total", "stage" => stage, "outcome" => outcome)
        .increment(n as u64);
}

/// Run `stage` until `shutdown`: the whole loop described at the top of this module.
pub async fn run<S: Stage>(
    stage: S,
    plumbing: Plumbing,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    plumbing.runner.validate()?;
    let group = stage.group();
    // Not ready until the consumer has joined its stage.
    plumbing.health.set(group, false);
    // Every outcome is exported from the start, so the first of each is a rate, not a new series.
    for outcome in OUTCOMES {
        count(group, outcome, 0);
    }
    check_partitions(&plumbing).await?;
    let lease = crate::lease::ConsumerLease::acquire(&plumbing, group).await?;
    let consumer = lease.consumer().to_string();
    let inputs: Vec<String> = plumbing
        .streams
        .all()
        .flat_map(|p| stage.inputs(&plumbing.streams, p))
        .collect();
    read::ensure_groups(&plumbing.pool, group, &inputs).await?;
    tracing::info!(
        message = "stage started",
        stage = group,
        consumer = %consumer,
        partitions = plumbing.streams.partitions()
    );
    let maintenance = tokio::spawn(crate::lease::maintain(
        lease.clone(),
        plumbing.clone(),
        inputs.clone(),
        shutdown.child_token(),
    ));
    dispatch::run(stage, &plumbing, &consumer, &shutdown).await;
    shutdown.cancel();
    let _ = maintenance.await;
    read::retire(&plumbing.pool, group, &consumer, &inputs).await;
    lease.release(&plumbing.pool).await;
    tracing::info!(message = "stage stopped", stage = group, consumer = %consumer);
    Ok(())
}

/// A deployment's partition count is written once (`{prefix}:partitions`)
/// and a process started with another stops, naming the setting: chats
/// would hash elsewhere and lose their order and context.
async fn check_partitions(plumbing: &Plumbing) -> Result<(), Error> {
    // Entries the previous (single-stream) layout still owes would never be handled.
    crate::ops::refuse_old_layout(&plumbing.pool, plumbing.streams.prefix()).await?;
    let key = format!("{{{}}}:partitions", plumbing.streams.prefix());
    let partitions = plumbing.streams.partitions();
    let mut connection = plumbing.pool.get().await?;
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg(partitions)
        .arg("NX")
        .query_async(&mut connection)
        .await?;
    let recorded: Option<u32> = redis::cmd("GET")
        .arg(&key)
        .query_async(&mut connection)
        .await?;
    match recorded {
        Some(recorded) if recorded != partitions => Err(Error::config(
            "streams.partitions",
            format!(
                "is {partitions}, but this deployment's streams have {recorded} partitions ({key}); \
                 set it back, or move to a new count as the README's \"Partitions\" says"
            ),
        )),
        _ => Ok(()),
    }
}
