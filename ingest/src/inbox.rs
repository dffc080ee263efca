//! The one way a message gets into `in`: a Lua script per message, in its
//! chat's partition (`{botline:pK}:in`, see [`botline_shared::streams`]),
//! that checks the platform event id's dedup key, adds the message (never
//! with `MAXLEN`: `in` is a pipeline stream), sets the dedup key, and for
//! the web chat adds the person's turn to the chat's transcript and
//! announces it. All or nothing per message; a platform retry adds nothing.
//! A chat's messages enter its partition's `in` in the order they are
//! admitted, and every stage keeps that order.

use crate::error::IngestError;
use botline_shared::codec::{self, Fields};
use botline_shared::config::StreamSettings;
use botline_shared::message::{Turn, UnifiedMessage};
use botline_shared::redis_conn::Pool;
use botline_shared::streams::{Partition, Streams};
use redis::Value;
use std::sync::LazyLock;

/// `ingest/lua/accept.lua`: messages of one partition into its `in`.
static ACCEPT: LazyLock<redis::Script> =
    LazyLock::new(|| redis::Script::new(include_str!("../lua/accept.lua")));

/// One message to add.
pub struct Submission {
    pub message: UnifiedMessage,
    /// The platform's event id; `None`: no deduplication is possible.
    pub event_id: Option<String>,
    /// Also write the person's turn to the web chat transcript.
    pub transcript: bool,
}

/// What became of one submission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Added to `in` with this entry id.
    Added(String),
    /// Its event id was seen within `dedup_ttl_ms`: nothing was added.
    Duplicate,
}

/// Where accepted messages go.
#[derive(Clone)]
pub struct Inbox {
    pub pool: Pool,
    pub streams: Streams,
    pub dedup_ttl_ms: u64,
    pub transcript_max_len: usize,
    pub transcript_ttl_ms: u64,
    pub retry_after_secs: u64,
}

impl Inbox {
    pub fn new(
        pool: Pool,
        streams: Streams,
        dedup_ttl_ms: u64,
        stream_settings: &StreamSettings,
        retry_after_secs: u64,
    ) -> Self {
        Inbox {
            pool,
            streams,
            dedup_ttl_ms,
            transcript_max_len: stream_settings.transcript_max_len,
            transcript_ttl_ms: stream_settings.transcript_ttl_ms,
            retry_after_secs,
        }
    }

    /// Add every submission, one script per partition (pipelined); one
    /// admission per submission, in order. Counts
    /// `botline_ingest_accepted_total` and `botline_ingest_duplicates_total`.
    pub async fn admit(&self, submissions: &[Submission]) -> Result<Vec<Admission>, IngestError> {
        // Submissions by partition, each partition's in the order given.
        let mut by_partition: Vec<(Partition, Vec<usize>)> = Vec::new();
        for (index, submission) in submissions.iter().enumerate() {
            let message = &submission.message;
            let p = self
                .streams
                .partition_of(&message.platform, &message.chat.id);
            match by_partition.iter_mut().find(|(q, _)| *q == p) {
                Some((_, indexes)) => indexes.push(index),
                None => by_partition.push((p, vec![index])),
            }
        }
        let redis_error =
            |error: botline_shared::Error| IngestError::from_redis(error, self.retry_after_secs);
        let pooled = self.pool.get().await.map_err(redis_error)?;
        // One multiplexed connection: the partitions' scripts go out at once.
        let connection = pooled.shared();
        let invocations: Vec<_> = by_partition
            .iter()
            .map(|(p, indexes)| self.script(*p, indexes.iter().map(|i| &submissions[*i])))
            .collect();
        let replies: Vec<Vec<Value>> =
            futures_util::future::try_join_all(invocations.iter().map(|invocation| {
                let mut connection = connection.clone();
                async move { invocation.invoke_async(&mut connection).await }
            }))
            .await
            .map_err(|error| redis_error(error.into()))?;
        let mut admissions = vec![Admission::Duplicate; submissions.len()];
        for ((_, indexes), reply) in by_partition.iter().zip(replies) {
            for (index, value) in indexes.iter().zip(reply) {
                if let Ok(id) = botline_shared::redis_conn::string(value) {
                    if !id.is_empty() {
                        admissions[*index] = Admission::Added(id);
                    }
                }
            }
        }
        for (submission, admission) in submissions.iter().zip(&admissions) {
            let platform = submission.message.platform.clone();
            match admission {
                Admission::Added(_) => {
                    metrics::counter!("botline_ingest_accepted_total", "platform" => platform)
                        .increment(1)
                }
                Admission::Duplicate => {
                    metrics::counter!("botline_ingest_duplicates_total", "platform" => platform)
                        .increment(1)
                }
            }
        }
        Ok(admissions)
    }

    /// The accept script's call for submissions of partition `p`.
    fn script<'a>(
        &self,
        p: Partition,
        submissions: impl ExactSizeIterator<Item = &'a Submission>,
    ) -> redis::ScriptInvocation<'static> {
        let mut script = ACCEPT.prepare_invoke();
        script.arg(submissions.len());
        for submission in submissions {
            let message = &submission.message;
            let dedup_key = self.streams.dedup(
                &message.platform,
                &message.chat.id,
                submission.event_id.as_deref().unwrap_or(&message.id),
            );
            script.key(dedup_key).key(self.streams.inbound(p));
            let ttl = if submission.event_id.is_some() {
                self.dedup_ttl_ms
            } else {
                0
            };
            script.arg(ttl);
            push_fields(&mut script, codec::encode(message));
            if submission.transcript {
                script.key(self.streams.transcript(&message.chat.id));
                script
                    .arg(1)
                    .arg(self.transcript_max_len)
                    .arg(self.transcript_ttl_ms)
                    .arg(self.streams.transcript_channel())
                    .arg(&message.chat.id);
                push_fields(&mut script, codec::encode(&Turn::from_user(message)));
            } else {
                script.arg(0);
            }
        }
        script
    }

    /// Add one submission.
    pub async fn admit_one(&self, submission: Submission) -> Result<Admission, IngestError> {
        let mut admissions = self.admit(std::slice::from_ref(&submission)).await?;
        Ok(admissions.pop().unwrap_or(Admission::Duplicate))
    }
}

fn push_fields(script: &mut redis::ScriptInvocation<'_>, fields: Fields) {
    script.arg(fields.len());
    for (name, value) in fields {
        script.arg(name).arg(value);
    }
}
