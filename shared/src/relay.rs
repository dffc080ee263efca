//! Frames egress wants sent over a platform connection that some ingest
//! replica holds (OneBot v11's WebSocket): egress decides, ingest carries.
//!
//! Egress owns the decision to send (limits, retries, idempotency); the
//! replica holding the bot's socket only carries a frame and says what came
//! of it. They meet in Redis, under the usual prefix:
//!
//! - `socket:<platform>:<bot>`, a stream: one entry per frame (`echo`,
//!   `deadline_ms`, `answer_ms`, `reply`, `frame`), added by [`enqueue`],
//!   read by the holder through the group [`GROUP`]. Frames are worthless
//!   past their deadline, so each add trims entries older than a window
//!   (`MINID`): this is not a pipeline stream.
//! - `socket-state:<echo>`: who decided about a frame, set once: `sent`
//!   (the holder [`claim`]ed it and writes it to its socket now), `expired`
//!   (the holder read it after its deadline: never sent), `cancelled`
//!   (egress stopped waiting for it first: never sent). `SET` only where the
//!   key is absent, in one script each, so a frame is sent at most once and
//!   never after egress has given up on it.
//! - `socket-outcome:<echo>`: a list holding the frame's [`Outcome`] (JSON),
//!   pushed by the holder ([`report`]), waited for by egress without
//!   taking it out ([`wait`], `BLMOVE` of the list onto itself), so a later
//!   attempt at the same reply can still read it.
//! - `socket-reply:<reply id>`: the echo of the reply's last frame, so a
//!   new attempt first settles the one before (its answer may have come
//!   after the attempt that sent it gave up).
//!
//! Times come from Redis (`TIME` in the scripts), so the clocks of the
//! egress and ingest hosts never decide whether a frame is late.

use crate::streams::Streams;
use crate::Error;
use serde::{Deserialize, Serialize};
use std::sync::LazyLock;
use std::time::Duration;

/// The consumer group (and consumer) the holder reads frames with. One
/// name for every holder: entries a holder read and did not claim before
/// it died are pending under it, and the next holder reads those first.
pub const GROUP: &str = "carrier";

/// How long a frame's state, its outcome and a reply's last echo are kept:
/// longer than any retry of the reply takes.
pub const KEEP: Duration = Duration::from_secs(3600);

/// How far back a frame stream keeps entries: every frame older than this
/// is long past its deadline.
pub const WINDOW: Duration = Duration::from_secs(600);

/// The fields of a frame entry.
pub mod field {
    pub const ECHO: &str = "echo";
    pub const DEADLINE_MS: &str = "deadline_ms";
    pub const ANSWER_MS: &str = "answer_ms";
    /// The reply the frame is for (for people reading the stream).
    pub const REPLY: &str = "reply";
    pub const FRAME: &str = "frame";
}

/// What came of a frame, as the holder reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Sent, and the platform answered: its answer, as it came.
    Answered { answer: String },
    /// Read after its deadline: not sent.
    Expired,
    /// Sent (or being written when the socket broke), and no answer came.
    Unanswered { reason: String },
}

impl Outcome {
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("outcomes serialize")
    }

    pub fn from_json(text: &str) -> Result<Self, Error> {
        serde_json::from_str(text)
            .map_err(|error| Error::Garbage(format!("frame outcome {text:?}: {error}")))
    }
}

/// The holder's decision about one frame it read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Ours to send now.
    Send,
    /// Past its deadline: reported `expired`, not sent.
    Expired,
    /// Egress gave up on it: not sent.
    Cancelled,
    /// Another holder claimed it already.
    Taken,
    /// This holder no longer holds the bot's lease: left for the one that does.
    NotHolder,
}

/// Egress's decision about a frame it waited for in vain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Given {
    /// Cancelled now, or expired: it was never sent, and never will be.
    NotSent,
    /// A holder claimed it: it went out (or was about to).
    Sent,
}

/// KEYS: frame stream, reply key. ARGV: echo, pickup ms, answer ms, reply
/// id, frame, window ms, keep ms. Returns the deadline (Redis time, ms).
static ENQUEUE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local deadline = string.format('%d', now + tonumber(ARGV[2]))
local oldest = string.format('%d', math.max(0, now - tonumber(ARGV[6])))
redis.call('XADD', KEYS[1], 'MINID', '~', oldest, '*',
  'echo', ARGV[1], 'deadline_ms', deadline, 'answer_ms', ARGV[3],
  'reply', ARGV[4], 'frame', ARGV[5])
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[7])
return deadline
"#,
    )
});

/// KEYS: frame stream, state, outcome, lease. ARGV: group, entry id,
/// deadline ms, holder, keep ms, the `expired` outcome.
static CLAIM: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('GET', KEYS[4]) ~= ARGV[4] then
  return 'not_holder'
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
local state = redis.call('GET', KEYS[2])
if state then
  return state
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now > tonumber(ARGV[3]) then
  redis.call('SET', KEYS[2], 'expired', 'PX', ARGV[5])
  redis.call('LPUSH', KEYS[3], ARGV[6])
  redis.call('PEXPIRE', KEYS[3], ARGV[5])
  return 'expired'
end
redis.call('SET', KEYS[2], 'sent', 'PX', ARGV[5])
return 'send'
"#,
    )
});

/// KEYS: state. ARGV: keep ms. The state, `cancelled` if there was none.
static CANCEL: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local state = redis.call('GET', KEYS[1])
if state then
  return state
end
redis.call('SET', KEYS[1], 'cancelled', 'PX', ARGV[1])
return 'cancelled'
"#,
    )
});

/// KEYS: outcome. ARGV: outcome JSON, keep ms.
static REPORT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
redis.call('LPUSH', KEYS[1], ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
"#,
    )
});

fn millis(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

/// One frame to enqueue for `bot` on `platform`.
pub struct Enqueue<'a> {
    pub platform: &'a str,
    pub bot: &'a str,
    pub reply_id: &'a str,
    /// Unique per attempt; the platform answers with it.
    pub echo: &'a str,
    /// The frame as the socket carries it.
    pub frame: &'a str,
    /// How long it may wait for a holder to claim it.
    pub pickup: Duration,
    /// How long the holder waits for the platform's answer once it is sent.
    pub answer: Duration,
}

/// Add a frame for the holder of `bot`'s socket (egress); its deadline, ms.
pub async fn enqueue(
    connection: &mut impl redis::aio::ConnectionLike,
    streams: &Streams,
    frame: &Enqueue<'_>,
) -> Result<i64, Error> {
    let deadline: String = ENQUEUE
        .key(streams.socket_frames(frame.platform, frame.bot))
        .key(streams.socket_reply(frame.reply_id))
        .arg(frame.echo)
        .arg(millis(frame.pickup))
        .arg(millis(frame.answer))
        .arg(frame.reply_id)
        .arg(frame.frame)
        .arg(millis(WINDOW))
        .arg(millis(KEEP))
        .invoke_async(connection)
        .await?;
    deadline
        .parse()
        .map_err(|_| Error::Garbage(format!("frame deadline {deadline:?}")))
}

/// The echo of the last frame made for `reply_id`, if any (egress).
pub async fn last_echo(
    connection: &mut impl redis::aio::ConnectionLike,
    streams: &Streams,
    reply_id: &str,
) -> Result<Option<String>, Error> {
    Ok(redis::cmd("GET")
        .arg(streams.socket_reply(reply_id))
        .query_async(connection)
        .await?)
}

/// Claim the frame `echo` (entry `entry_id` of `stream`, due by
/// `deadline_ms`) for sending, if `holder` still holds `lease` (ingest).
pub async fn claim(
    connection: &mut impl redis::aio::ConnectionLike,
    streams: &Streams,
    stream: &str,
    entry_id: &str,
    echo: &str,
    deadline_ms: i64,
    lease: (&str, &str),
) -> Result<Claim, Error> {
    let (lease_key, holder) = lease;
    let claimed: String = CLAIM
        .key(stream)
        .key(streams.socket_state(echo))
        .key(streams.socket_outcome(echo))
        .key(lease_key)
        .arg(GROUP)
        .arg(entry_id)
        .arg(deadline_ms)
        .arg(holder)
        .arg(millis(KEEP))
        .arg(Outcome::Expired.to_json())
        .invoke_async(connection)
        .await?;
    Ok(match claimed.as_str() {
        "send" => Claim::Send,
        "expired" => Claim::Expired,
        "cancelled" => Claim::Cancelled,
        "not_holder" => Claim::NotHolder,
        _ => Claim::Taken,
    })
}

/// Say what came of the frame `echo` (ingest).
pub async fn report(
    connection: &mut impl redis::aio::ConnectionLike,
    streams: &Streams,
    echo: &str,
    outcome: &Outcome,
) -> Result<(), Error> {
    let _: i64 = REPORT
        .key(streams.socket_outcome(echo))
        .arg(outcome.to_json())
        .arg(millis(KEEP))
        .invoke_async(connection)
        .await?;
    Ok(())
}

/// Give up on the frame `echo` unless a holder claimed it (egress).
pub async fn cancel(
    connection: &mut impl redis::aio::ConnectionLike,
    streams: &Streams,
    echo: &str,
) -> Result<Given, Error> {
    let state: String = CANCEL
        .key(streams.socket_state(echo))
        .arg(millis(KEEP))
        .invoke_async(connection)
        .await?;
    Ok(if state == "sent" {
        Given::Sent
    } else {
        Given::NotSent
    })
}

/// The outcome of the frame `echo`, if there is one yet (egress).
pub async fn peek(
    connection: &mut impl redis::aio::ConnectionLike,
    streams: &Streams,
    echo: &str,
) -> Result<Option<Outcome>, Error> {
    let text: Option<String> = redis::cmd("LINDEX")
        .arg(streams.socket_outcome(echo))
        .arg(0)
        .query_async(connection)
        .await?;
    text.as_deref().map(Outcome::from_json).transpose()
}

/// Wait up to `within` for the outcome of the frame `echo`, leaving it in
/// place (egress). `connection` must be one of its own, whose response
/// timeout is longer than `within` (a blocking command).
pub async fn wait(
    connection: &mut impl redis::aio::ConnectionLike,
    streams: &Streams,
    echo: &str,
    within: Duration,
) -> Result<Option<Outcome>, Error> {
    let key = streams.socket_outcome(echo);
    // BLMOVE takes seconds with a fraction; 0 would block for ever.
    let seconds = within.as_secs_f64().max(0.001);
    let text: Option<String> = redis::cmd("BLMOVE")
        .arg(&key)
        .arg(&key)
        .arg("RIGHT")
        .arg("LEFT")
        .arg(format!("{seconds:.3}"))
        .query_async(connection)
        .await?;
    text.as_deref().map(Outcome::from_json).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_read_back_as_written() {
        for outcome in [
            Outcome::Answered {
                answer: r#"{"retcode":0,"echo":"e"}"#.into(),
            },
            Outcome::Expired,
            Outcome::Unanswered {
                reason: "the socket closed".into(),
            },
        ] {
            assert_eq!(Outcome::from_json(&outcome.to_json()).unwrap(), outcome);
        }
        assert_eq!(Outcome::Expired.to_json(), r#"{"outcome":"expired"}"#);
        assert!(Outcome::from_json("{").is_err());
    }
}
