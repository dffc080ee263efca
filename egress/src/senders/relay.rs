//! The sender's side of [`botline_shared::relay`]: one attempt's frame for
//! a platform connection some ingest replica holds (OneBot's WebSocket),
//! and what came of it. Egress keeps the decision: the frame waits at most
//! `pickup` for the holder, after which it is cancelled (never sent) unless
//! the holder claimed it first; once claimed, the answer is waited for.
//!
//! A reply's attempts are chained: each first settles the reply's previous
//! frame, whose answer may have come after the attempt that made it gave
//! up (its send budget ran out, egress died): an answered frame is that
//! answer, a claimed one still unanswered is waited for, and only a frame
//! that was never sent lets a new one go. So no reply is written twice by
//! a retry; a frame sent whose answer never comes is [`Sent::Unconfirmed`],
//! for the sender to refuse rather than repeat.

use botline_shared::redis_conn::{self, Pool};
use botline_shared::relay::{self, Enqueue, Given, Outcome};
use botline_shared::streams::Streams;
use botline_shared::Error;
use std::time::Duration;

/// How long after a frame's answer time the holder's report may take.
const REPORT_MARGIN: Duration = Duration::from_secs(2);

/// What came of an attempt's frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sent {
    /// The platform answered this (an earlier attempt's frame, maybe).
    Answered(String),
    /// Never sent, and never will be: no holder took it in time.
    NotTaken,
    /// Sent (or being written), and no answer will come: sending it again
    /// could post it twice.
    Unconfirmed(String),
}

impl Sent {
    fn of(outcome: Outcome) -> Option<Sent> {
        match outcome {
            Outcome::Answered { answer } => Some(Sent::Answered(answer)),
            Outcome::Expired => None,
            Outcome::Unanswered { reason } => Some(Sent::Unconfirmed(reason)),
        }
    }
}

/// Frames for one platform's held connections.
pub struct Relay {
    pool: Pool,
    streams: Streams,
    platform: &'static str,
    /// How long a frame waits for a holder.
    pub pickup: Duration,
    /// How long the platform has to answer a frame sent.
    pub answer: Duration,
}

impl Relay {
    pub fn new(
        pool: Pool,
        streams: Streams,
        platform: &'static str,
        pickup: Duration,
        answer: Duration,
    ) -> Self {
        Relay {
            pool,
            streams,
            platform,
            pickup,
            answer,
        }
    }

    /// One attempt at `reply_id` for `bot`: the previous frame settled
    /// first, then a new one (`frame` makes it from its echo) if need be.
    pub async fn send(
        &self,
        bot: &str,
        reply_id: &str,
        frame: impl FnOnce(&str) -> String,
    ) -> Result<Sent, Error> {
        let block = self.pickup.max(self.answer + REPORT_MARGIN);
        let mut waiting = redis_conn::detached_connection(&self.pool, block).await?;
        let mut connection = self.pool.get().await?;
        if let Some(echo) = relay::last_echo(&mut connection, &self.streams, reply_id).await? {
            if let Some(sent) = self.settle(&mut waiting, &echo).await? {
                return Ok(sent);
            }
        }
        let echo = format!("{reply_id}.{}", hex::encode(rand::random::<[u8; 8]>()));
        let text = frame(&echo);
        let enqueue = Enqueue {
            platform: self.platform,
            bot,
            reply_id,
            echo: &echo,
            frame: &text,
            pickup: self.pickup,
            answer: self.answer,
        };
        relay::enqueue(&mut connection, &self.streams, &enqueue).await?;
        drop(connection);
        let abandon = Abandon {
            pool: self.pool.clone(),
            streams: self.streams.clone(),
            echo: Some(echo.clone()),
        };
        let waited = relay::wait(&mut waiting, &self.streams, &echo, self.pickup).await?;
        let sent = match waited {
            Some(outcome) => Sent::of(outcome),
            None => self.settle(&mut waiting, &echo).await?,
        };
        abandon.disarm();
        Ok(sent.unwrap_or(Sent::NotTaken))
    }

    /// What came of the frame `echo`, once it is sure: `None` when it was
    /// never sent (cancelled now if no holder had claimed it).
    async fn settle(
        &self,
        waiting: &mut botline_shared::redis_conn::Connection,
        echo: &str,
    ) -> Result<Option<Sent>, Error> {
        let mut connection = self.pool.get().await?;
        if let Some(outcome) = relay::peek(&mut connection, &self.streams, echo).await? {
            return Ok(Sent::of(outcome));
        }
        if relay::cancel(&mut connection, &self.streams, echo).await? == Given::NotSent {
            return Ok(None);
        }
        drop(connection);
        let within = self.answer + REPORT_MARGIN;
        Ok(
            match relay::wait(waiting, &self.streams, echo, within).await? {
                Some(outcome) => Sent::of(outcome),
                None => Some(Sent::Unconfirmed(format!(
                    "the holder took it and reported nothing within {} ms",
                    within.as_millis()
                ))),
            },
        )
    }
}

/// Cancels a frame whose attempt was dropped while waiting for it (the
/// send budget ran out), so it does not go out after egress gave up on it.
/// The next attempt at the reply settles it anyway; this only keeps the
/// frame from being sent in between.
struct Abandon {
    pool: Pool,
    streams: Streams,
    echo: Option<String>,
}

impl Abandon {
    fn disarm(mut self) {
        self.echo = None;
    }
}

impl Drop for Abandon {
    fn drop(&mut self) {
        let (Some(echo), Ok(runtime)) = (self.echo.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let (pool, streams) = (self.pool.clone(), self.streams.clone());
        runtime.spawn(async move {
            if let Ok(mut connection) = pool.get().await {
                let _ = relay::cancel(&mut connection, &streams, &echo).await;
            }
        });
    }
}
