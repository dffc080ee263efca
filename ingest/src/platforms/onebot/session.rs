//! One OneBot WebSocket, whoever opened it (ingest, forward; the
//! implementation, reverse), from its first frame to its end.
//!
//! What the implementation sends is either an event (`post_type`: read by
//! the HTTP path's own parser, [`super::read_frame`], and added to `in`
//! with the same dedup key, `<self_id>:<message_id>`) or the answer to an
//! action (`echo`). Meta events (heartbeats, lifecycle) add nothing; a
//! heartbeat's `interval` sets how long the connection may stay silent:
//! `heartbeat_misses` intervals without a frame and it is treated as dead.
//! An event that cannot be added because Redis refuses (back-pressure, an
//! outage) is tried again with backoff while the socket waits: OneBot does
//! not send an event twice, so it is not let go.
//!
//! A connection that carries the bot's replies (`Universal` or `API`, and
//! this replica holding the bot's lease) also writes the `send_msg` frames
//! egress relays ([`crate::platforms::relay`]), each claimed right before
//! it is written, and reports the answer that comes back with the frame's
//! `echo`; a frame left without an answer (the socket closed, or its
//! answer time passed) is reported unanswered, never written again.

use crate::error::IngestError;
use crate::inbox::Inbox;
use crate::platforms::connection::{sleep_unless, Backoff, Link, Liveness};
use crate::platforms::relay::{Carrier, Frame};
use crate::platforms::{count_ignored, submissions, Event, Hook};
use botline_shared::relay::{Claim, Outcome};
use futures_util::{Sink, SinkExt, Stream, StreamExt};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt::Display;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often silence and unanswered frames are looked at.
const TICK: Duration = Duration::from_millis(250);
/// How long closing a socket may take.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// How a session ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    /// Told to stop (shutdown, the lease lost, a newer connection).
    Stopped,
    /// The socket closed, broke, or fell silent.
    Ended { reason: String },
}

/// The fields of a frame from the implementation that say what it is.
#[derive(Debug, Deserialize)]
struct Received {
    #[serde(default)]
    post_type: Option<String>,
    #[serde(default)]
    meta_event_type: Option<String>,
    #[serde(default)]
    interval: Option<u64>,
    #[serde(default)]
    echo: Option<serde_json::Value>,
}

/// One connection's reading and writing.
pub struct Session<'a> {
    pub inbox: &'a Inbox,
    pub link: &'a Link,
    /// The bot's frames, when this connection may carry them.
    pub carrier: Option<Carrier>,
    pub heartbeat_misses: u32,
    /// For refusals' `route`: `onebot_forward` or `onebot_reverse`.
    pub route: &'static str,
}

impl Session<'_> {
    /// Serve the connection until it ends or `stop`; `incoming` yields the
    /// text frames (an error once the socket is over), `outgoing` takes them.
    pub async fn run<In, Out>(
        &self,
        mut incoming: In,
        mut outgoing: Out,
        stop: &CancellationToken,
    ) -> Closed
    where
        In: Stream<Item = Result<String, String>> + Unpin,
        Out: Sink<String> + Unpin,
        Out::Error: Display,
    {
        let (frames_in, mut frames) = mpsc::channel(16);
        let reading = stop.child_token();
        let reader = self
            .carrier
            .clone()
            .map(|carrier| tokio::spawn(carrier.read(frames_in, reading.clone())));
        let mut pending: HashMap<String, Instant> = HashMap::new();
        // No limit before the first heartbeat says its interval (or when
        // the implementation sends none).
        let mut liveness = Liveness::new(None, Instant::now());
        let mut tick = tokio::time::interval(TICK);
        let closed = loop {
            tokio::select! {
                _ = stop.cancelled() => break Closed::Stopped,
                text = incoming.next() => {
                    let text = match text {
                        Some(Ok(text)) => text,
                        Some(Err(reason)) => break Closed::Ended { reason },
                        None => break Closed::Ended { reason: "the socket ended".into() },
                    };
                    liveness.heard(Instant::now());
                    self.link.event();
                    self.take(&text, &mut pending, &mut liveness, stop).await;
                }
                Some(frame) = frames.recv() => {
                    if let Err(reason) = self.carry(frame, &mut outgoing, &mut pending).await {
                        break Closed::Ended { reason };
                    }
                }
                _ = tick.tick() => {
                    if let Some(silent) = liveness.silent_too_long(Instant::now()) {
                        break Closed::Ended {
                            reason: format!("no heartbeat for {} ms", silent.as_millis()),
                        };
                    }
                    self.expire(&mut pending).await;
                }
            }
        };
        reading.cancel();
        if let Some(reader) = reader {
            let _ = reader.await;
        }
        if closed == Closed::Stopped {
            // Closing on purpose: the answers to frames already written
            // (and what else comes) are still read, for a moment.
            let draining = async {
                while !pending.is_empty() {
                    let Some(Ok(text)) = incoming.next().await else {
                        break;
                    };
                    self.take(&text, &mut pending, &mut liveness, stop).await;
                }
            };
            let _ = tokio::time::timeout(CLOSE_WAIT, draining).await;
        }
        let _ = tokio::time::timeout(CLOSE_WAIT, outgoing.close()).await;
        let why = match &closed {
            Closed::Stopped => "the connection was closed by ingest".to_string(),
            Closed::Ended { reason, .. } => format!("the connection ended: {reason}"),
        };
        for echo in pending.into_keys() {
            let reason = why.clone();
            self.report(&echo, Outcome::Unanswered { reason }).await;
        }
        closed
    }

    /// A frame from the implementation: an event, or an answer.
    async fn take(
        &self,
        text: &str,
        pending: &mut HashMap<String, Instant>,
        liveness: &mut Liveness,
        stop: &CancellationToken,
    ) {
        let received: Received = match serde_json::from_str(text) {
            Ok(received) => received,
            Err(error) => {
                IngestError::Malformed(format!("a frame that is not JSON: {error}"))
                    .record(self.route, super::PLATFORM.name);
                return;
            }
        };
        if received.post_type.is_some() {
            if received.meta_event_type.as_deref() == Some("heartbeat") {
                // An interval of 0 (or none) keeps the last one.
                if let Some(interval) = received.interval.filter(|ms| *ms > 0) {
                    liveness.allow(Duration::from_millis(interval) * self.heartbeat_misses);
                }
            }
            match super::read_frame(text.as_bytes()) {
                Ok(Hook::Events { events, .. }) => self.admit(events, stop).await,
                Ok(Hook::Ignored { kind, .. }) => count_ignored(super::PLATFORM.name, kind),
                Ok(Hook::Answer(_)) => {}
                Err(error) => error.record(self.route, super::PLATFORM.name),
            }
            // Back-pressure held the socket: do not count that as its silence.
            liveness.heard(Instant::now());
            return;
        }
        let Some(echo) = received.echo else {
            debug!(message = "onebot frame neither event nor answer; ignored");
            return;
        };
        let echo = match echo {
            serde_json::Value::String(echo) => echo,
            other => other.to_string(),
        };
        if pending.remove(&echo).is_some() {
            let answer = text.to_string();
            self.report(&echo, Outcome::Answered { answer }).await;
        } else {
            debug!(message = "onebot answer to no frame waiting here", %echo);
        }
    }

    /// Add `events` to `in`, trying again while Redis refuses, until `stop`.
    async fn admit(&self, events: Vec<Event>, stop: &CancellationToken) {
        let submissions = submissions(events);
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let Err(error) = self.inbox.admit(&submissions).await else {
                return;
            };
            error.record(self.route, super::PLATFORM.name);
            if stop.is_cancelled() {
                warn!(message = "onebot event not added before shutting down", %error);
                return;
            }
            sleep_unless(backoff.next_wait(), stop).await;
        }
    }

    /// Write a relayed frame if its claim says so; `Err` when the socket broke.
    async fn carry<Out>(
        &self,
        frame: Frame,
        outgoing: &mut Out,
        pending: &mut HashMap<String, Instant>,
    ) -> Result<(), String>
    where
        Out: Sink<String> + Unpin,
        Out::Error: Display,
    {
        let Some(carrier) = &self.carrier else {
            return Ok(());
        };
        match carrier.claim(&frame).await {
            Ok(Claim::Send) => {}
            Ok(_) => return Ok(()),
            Err(error) => {
                // Not claimed: egress gives up on it and tries again.
                warn!(message = "could not claim a socket frame", echo = %frame.echo, %error);
                return Ok(());
            }
        }
        if let Err(error) = outgoing.send(frame.text).await {
            let reason = format!("writing it failed: {error}");
            self.report(&frame.echo, Outcome::Unanswered { reason })
                .await;
            return Err(format!("could not write a frame: {error}"));
        }
        pending.insert(frame.echo, Instant::now() + frame.answer);
        Ok(())
    }

    /// Report the frames whose answer time passed.
    async fn expire(&self, pending: &mut HashMap<String, Instant>) {
        let now = Instant::now();
        let late: Vec<String> = pending
            .iter()
            .filter(|(_, due)| **due <= now)
            .map(|(echo, _)| echo.clone())
            .collect();
        for echo in late {
            pending.remove(&echo);
            let reason = "no answer within its time".to_string();
            self.report(&echo, Outcome::Unanswered { reason }).await;
        }
    }

    async fn report(&self, echo: &str, outcome: Outcome) {
        if let Some(carrier) = &self.carrier {
            carrier.report(echo, outcome).await;
        }
    }
}

/// A WebSocket message of either library (the client's, tungstenite; the
/// server's, axum), as a session reads and writes it.
pub trait Message: Sized {
    /// The text it carries; `None` for a control frame, `Err` for a close.
    fn into_text(self) -> Option<Result<String, String>>;
    fn from_text(text: String) -> Self;
}

fn closed_by(close: Option<(u16, &str)>) -> String {
    match close {
        Some((code, reason)) => format!("closed by the implementation ({code}: {reason})"),
        None => "closed by the implementation".into(),
    }
}

impl Message for tokio_tungstenite::tungstenite::Message {
    fn into_text(self) -> Option<Result<String, String>> {
        use tokio_tungstenite::tungstenite::Message as M;
        match self {
            M::Text(text) => Some(Ok(text.to_string())),
            M::Binary(bytes) => Some(Ok(String::from_utf8_lossy(&bytes).into_owned())),
            M::Close(close) => {
                let close = close
                    .as_ref()
                    .map(|c| (u16::from(c.code), c.reason.as_str()));
                Some(Err(closed_by(close)))
            }
            _ => None,
        }
    }

    fn from_text(text: String) -> Self {
        Self::text(text)
    }
}

impl Message for axum::extract::ws::Message {
    fn into_text(self) -> Option<Result<String, String>> {
        use axum::extract::ws::Message as M;
        match self {
            M::Text(text) => Some(Ok(text.to_string())),
            M::Binary(bytes) => Some(Ok(String::from_utf8_lossy(&bytes).into_owned())),
            M::Close(close) => Some(Err(closed_by(
                close.as_ref().map(|c| (c.code, c.reason.as_str())),
            ))),
            _ => None,
        }
    }

    fn from_text(text: String) -> Self {
        Self::Text(text.into())
    }
}

/// A socket's incoming half as the text frames a session reads.
pub fn texts<S, M, E>(incoming: S) -> impl Stream<Item = Result<String, String>> + Unpin
where
    S: Stream<Item = Result<M, E>> + Unpin,
    M: Message,
    E: Display,
{
    incoming.filter_map(|item| {
        std::future::ready(match item {
            Ok(message) => message.into_text(),
            Err(error) => Some(Err(format!("the socket broke: {error}"))),
        })
    })
}

/// A socket's outgoing half as a sink of text frames.
pub fn sends<K, M>(outgoing: K) -> impl Sink<String, Error = K::Error> + Unpin
where
    K: Sink<M> + Unpin,
    M: Message,
{
    outgoing.with(|text: String| std::future::ready(Ok(M::from_text(text))))
}
