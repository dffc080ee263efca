//! The one way a message gets into `in`: a Lua script that, per message,
//! checks the platform event id's dedup key, adds the message (never with
//! `MAXLEN`: `in` is a pipeline stream) and its place in its chat's order
//! (see [`botline_shared::order`]), sets the dedup key, and for the web
//! chat adds the person's turn to the chat's transcript and announces it.
//! All or nothing per message; a platform retry adds nothing.

use crate::error::IngestError;
use botline_shared::codec::{self, Fields};
use botline_shared::config::StreamSettings;
use botline_shared::message::{Turn, UnifiedMessage};
use botline_shared::redis_conn::Pool;
use botline_shared::streams::Streams;
use redis::Value;
use std::sync::LazyLock;

static ACCEPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(&ACCEPT_SCRIPT.replace("{score}", botline_shared::order::SCORE_LUA))
});

/// KEYS per message: dedup key, `in`, the chat's order set, then the
/// transcript when it has one. ARGV[1]: order ttl ms; ARGV[2]: message
/// count; per message: dedup ttl ms (0: no dedup), message id, field count,
/// fields…, transcript flag (0/1), and with a transcript: cap, ttl ms,
/// channel, chat id, field count, fields….
/// Returns per message the new entry id of `in`, or "" for a duplicate.
const ACCEPT_SCRIPT: &str = r#"
local order_ttl = ARGV[1]
local p = 3
local k = 1
local results = {}
for i = 1, tonumber(ARGV[2]) do
  local dedup = KEYS[k]
  local stream = KEYS[k + 1]
  local order = KEYS[k + 2]
  local ttl = tonumber(ARGV[p])
  local message_id = ARGV[p + 1]
  local count = tonumber(ARGV[p + 2])
  p = p + 3
  local fields = {}
  for j = 0, count * 2 - 1 do fields[#fields + 1] = ARGV[p + j] end
  p = p + count * 2
  local has_transcript = ARGV[p] == '1'
  p = p + 1
  local transcript, cap, transcript_ttl, channel, chat
  local turn = {}
  if has_transcript then
    transcript = KEYS[k + 3]
    k = k + 4
    cap = ARGV[p]
    transcript_ttl = ARGV[p + 1]
    channel = ARGV[p + 2]
    chat = ARGV[p + 3]
    local turn_count = tonumber(ARGV[p + 4])
    p = p + 5
    for j = 0, turn_count * 2 - 1 do turn[#turn + 1] = ARGV[p + j] end
    p = p + turn_count * 2
  else
    k = k + 3
  end
  if ttl > 0 and redis.call('EXISTS', dedup) == 1 then
    results[i] = ''
  else
    local id = redis.call('XADD', stream, '*', unpack(fields))
    results[i] = id
    local ms, seq = string.match(id, '(%d+)-(%d+)')
    redis.call('ZADD', order, {score}, message_id)
    redis.call('PEXPIRE', order, order_ttl)
    if ttl > 0 then
      redis.call('SET', dedup, '1', 'PX', ttl)
    end
    if has_transcript then
      redis.call('XADD', transcript, 'MAXLEN', '~', cap, '*', unpack(turn))
      redis.call('PEXPIRE', transcript, transcript_ttl)
      redis.call('PUBLISH', channel, chat)
    end
  end
end
return results
"#;

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

    /// Add every submission in one script; one admission per submission, in order.
    /// Counts `botline_ingest_accepted_total` and `botline_ingest_duplicates_total`.
    pub async fn admit(&self, submissions: &[Submission]) -> Result<Vec<Admission>, IngestError> {
        let mut script = ACCEPT.prepare_invoke();
        script
            .arg(botline_shared::order::ORDER_TTL.as_millis() as u64)
            .arg(submissions.len());
        for submission in submissions {
            let message = &submission.message;
            let dedup_key = self.streams.dedup(
                &message.platform,
                submission.event_id.as_deref().unwrap_or(&message.id),
            );
            script
                .key(dedup_key)
                .key(self.streams.inbound())
                .key(self.streams.chat_order(
                    botline_shared::order::LANE_IN,
                    &message.platform,
                    &message.chat.id,
                ));
            let ttl = if submission.event_id.is_some() {
                self.dedup_ttl_ms
            } else {
                0
            };
            script.arg(ttl).arg(&message.id);
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
        let redis_error =
            |error: botline_shared::Error| IngestError::from_redis(error, self.retry_after_secs);
        let mut connection = self
            .pool
            .get()
            .await
            .map_err(|error| redis_error(error.into()))?;
        let reply: Vec<Value> = script
            .invoke_async(&mut connection)
            .await
            .map_err(|error| redis_error(error.into()))?;
        let admissions: Vec<Admission> = reply
            .into_iter()
            .map(|value| match botline_shared::redis_conn::string(value) {
                Ok(id) if !id.is_empty() => Admission::Added(id),
                _ => Admission::Duplicate,
            })
            .collect();
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
