//! The holder's side of [`botline_shared::relay`]: frames egress wants sent
//! over a connection this replica holds for a bot (OneBot's WebSocket).
//!
//! While this replica holds the bot's lease, [`Carrier::read`] reads the
//! bot's frame stream (`socket:<platform>:<bot>`, group `carrier`; the
//! entries read before and never claimed first, and again whenever the
//! stream is idle: a replica that lost the lease may have read some) and
//! hands each frame to the connection. The connection [`Carrier::claim`]s a frame
//! right before writing it (one script: still the lease holder, not
//! cancelled by egress, not past its deadline, not claimed by another), so
//! a frame is written at most once and never after egress gave up on it;
//! then it [`Carrier::report`]s what came of it. The carrier never decides
//! to send anything itself and never retries: egress does.
//!
//! Counted in `botline_ingest_socket_frames_total{platform, outcome}`:
//! `sent`, `expired`, `skipped` (cancelled by egress, claimed elsewhere, or
//! the lease gone), `answered`, `unanswered`.

use super::connection::{sleep_unless, Backoff, Lease};
use crate::inbox::Inbox;
use botline_shared::redis_conn::{self, Pool, RawEntry};
use botline_shared::relay::{self, field, Claim, Outcome};
use botline_shared::streams::Streams;
use botline_shared::Error;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Entries read at once.
const READ_COUNT: usize = 16;
/// Longest a read blocks (the lease is checked, and renewed, between reads).
const MAX_BLOCK: Duration = Duration::from_secs(1);

/// Reads, claims and reports one bot's frames.
#[derive(Clone)]
pub struct Carrier {
    pool: Pool,
    streams: Streams,
    platform: &'static str,
    /// `socket:<platform>:<bot>`.
    stream: String,
    lease: Lease,
    /// A reader without the lease looks again after this long.
    standby_poll: Duration,
}

/// A frame read and not yet claimed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub entry_id: String,
    pub echo: String,
    pub deadline_ms: i64,
    /// How long the platform has to answer once it is sent.
    pub answer: Duration,
    /// The frame as written to the socket.
    pub text: String,
}

impl Frame {
    fn from_entry(entry: RawEntry) -> Result<Frame, String> {
        let fields = entry.fields.ok_or("its payload was deleted")?;
        let text = |name: &str| {
            fields
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| String::from_utf8_lossy(value).into_owned())
                .ok_or(format!("no field {name}"))
        };
        let number = |name: &str| -> Result<i64, String> {
            text(name)?
                .parse()
                .map_err(|_| format!("field {name} is not a number"))
        };
        Ok(Frame {
            echo: text(field::ECHO)?,
            deadline_ms: number(field::DEADLINE_MS)?,
            answer: Duration::from_millis(number(field::ANSWER_MS)?.max(0) as u64),
            text: text(field::FRAME)?,
            entry_id: entry.id,
        })
    }
}

impl Carrier {
    /// The carrier of `bot`'s frames on `platform` while `lease` is ours.
    pub fn new(
        inbox: &Inbox,
        platform: &'static str,
        bot: &str,
        lease: Lease,
        standby_poll: Duration,
    ) -> Carrier {
        Carrier {
            pool: inbox.pool.clone(),
            streams: inbox.streams.clone(),
            platform,
            stream: inbox.streams.socket_frames(platform, bot),
            lease,
            standby_poll,
        }
    }

    pub fn lease(&self) -> &Lease {
        &self.lease
    }

    /// Hand every frame for the bot to `frames` while this replica holds
    /// the lease (renewing it between reads), until `stop` or until
    /// `frames` is closed.
    pub async fn read(self, frames: mpsc::Sender<Frame>, stop: CancellationToken) {
        let block = (self.lease.ttl() / 3).min(MAX_BLOCK);
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        while !stop.is_cancelled() && !frames.is_closed() {
            let failed = match self.read_until_error(&frames, block, &stop).await {
                Ok(()) => return,
                Err(error) => error,
            };
            let wait = backoff.next_wait();
            warn!(message = "could not read socket frames", stream = %self.stream, error = %failed, retry_in_ms = wait.as_millis() as u64);
            sleep_unless(wait, &stop).await;
        }
    }

    /// One connection's reading: `Ok` when told to stop.
    async fn read_until_error(
        &self,
        frames: &mpsc::Sender<Frame>,
        block: Duration,
        stop: &CancellationToken,
    ) -> Result<(), Error> {
        let mut connection = redis_conn::detached_connection(&self.pool, block).await?;
        let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&self.stream)
            .arg(relay::GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut connection)
            .await;
        if let Err(error) = created {
            if error.code() != Some("BUSYGROUP") {
                return Err(error.into());
            }
        }
        // Entries read before and never claimed first, then new ones.
        let mut after = "0".to_string();
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            if !self.lease.hold().await? {
                after = "0".into();
                sleep_unless(self.standby_poll, stop).await;
                continue;
            }
            let mut command = redis::cmd("XREADGROUP");
            command
                .arg("GROUP")
                .arg(relay::GROUP)
                .arg(relay::GROUP)
                .arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(block.as_millis() as u64)
                .arg("STREAMS")
                .arg(&self.stream)
                .arg(&after);
            let read = tokio::select! {
                read = command.query_async(&mut connection) => read?,
                _ = stop.cancelled() => return Ok(()),
            };
            let entries = redis_conn::parse_read_reply(read)?;
            after = match (after.as_str(), entries.last()) {
                // Pending entries, on from the last one.
                (_, Some(last)) if after != ">" => last.id.clone(),
                (">", _) => match entries.is_empty() {
                    // Idle: look at the pending ones once (read by a
                    // replica that lost the lease before claiming them).
                    true => "0".into(),
                    false => after,
                },
                _ => ">".into(),
            };
            for entry in entries {
                let id = entry.id.clone();
                match Frame::from_entry(entry) {
                    Ok(frame) => {
                        if frames.send(frame).await.is_err() {
                            return Ok(());
                        }
                    }
                    Err(reason) => {
                        warn!(message = "socket frame entry unreadable; acknowledged", stream = %self.stream, id = %id, %reason);
                        let _: i64 = redis::cmd("XACK")
                            .arg(&self.stream)
                            .arg(relay::GROUP)
                            .arg(&id)
                            .query_async(&mut connection)
                            .await?;
                    }
                }
            }
        }
    }

    /// Whether to write `frame` now (see the module): only [`Claim::Send`]
    /// says yes. Counted.
    pub async fn claim(&self, frame: &Frame) -> Result<Claim, Error> {
        let mut connection = self.pool.get().await?;
        let claim = relay::claim(
            &mut connection,
            &self.streams,
            &self.stream,
            &frame.entry_id,
            &frame.echo,
            frame.deadline_ms,
            (self.lease.key(), self.lease.holder()),
        )
        .await?;
        let outcome = match claim {
            Claim::Send => "sent",
            Claim::Expired => "expired",
            Claim::Cancelled | Claim::Taken | Claim::NotHolder => "skipped",
        };
        if claim != Claim::Send {
            debug!(message = "socket frame not sent", echo = %frame.echo, ?claim);
        }
        self.count(outcome);
        Ok(claim)
    }

    /// Say what came of the frame `echo`. A failure is logged: egress then
    /// counts the frame as sent without an answer.
    pub async fn report(&self, echo: &str, outcome: Outcome) {
        self.count(match outcome {
            Outcome::Answered { .. } => "answered",
            Outcome::Expired => "expired",
            Outcome::Unanswered { .. } => "unanswered",
        });
        let reported: Result<(), Error> = async {
            let mut connection = self.pool.get().await?;
            relay::report(&mut connection, &self.streams, echo, &outcome).await
        }
        .await;
        if let Err(error) = reported {
            warn!(message = "could not report a socket frame's outcome", %echo, %error);
        }
    }

    fn count(&self, outcome: &'static str) {
        metrics::counter!("botline_ingest_socket_frames_total", "platform" => self.platform, "outcome" => outcome)
            .increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fields: &[(&str, &str)]) -> RawEntry {
        RawEntry {
            stream: "s".into(),
            id: "1-0".into(),
            fields: Some(
                fields
                    .iter()
                    .map(|(name, value)| (name.to_string(), value.as_bytes().to_vec()))
                    .collect(),
            ),
        }
    }

    #[test]
    fn entries_become_frames_or_say_what_is_wrong() {
        let frame = Frame::from_entry(entry(&[
            ("echo", "r1.x"),
            ("deadline_ms", "1700000000000"),
            ("answer_ms", "10000"),
            ("reply", "r1"),
            ("frame", "{}"),
        ]))
        .unwrap();
        assert_eq!(
            frame,
            Frame {
                entry_id: "1-0".into(),
                echo: "r1.x".into(),
                deadline_ms: 1_700_000_000_000,
                answer: Duration::from_secs(10),
                text: "{}".into(),
            }
        );
        let missing = Frame::from_entry(entry(&[("echo", "e")])).unwrap_err();
        assert_eq!(missing, "no field deadline_ms");
        let garbled = Frame::from_entry(entry(&[
            ("echo", "e"),
            ("deadline_ms", "soon"),
            ("answer_ms", "1"),
            ("frame", "{}"),
        ]))
        .unwrap_err();
        assert_eq!(garbled, "field deadline_ms is not a number");
        let deleted = RawEntry {
            fields: None,
            ..entry(&[])
        };
        assert_eq!(
            Frame::from_entry(deleted).unwrap_err(),
            "its payload was deleted"
        );
    }
}
