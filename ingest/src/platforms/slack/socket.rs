//! Slack Socket Mode (`mode = "socket"`): the Events API's events over a
//! WebSocket ingest opens, for hosts without a public URL.
//!
//! `POST {api_base_url}/apps.connections.open` with the app-level token
//! (`BOTLINE_SLACK_APP_TOKEN`, `xapp-…`) answers a WebSocket URL. Slack
//! sends `hello` once connected, then envelopes
//! (`{envelope_id, type, payload, …}`); each is acknowledged by sending
//! `{"envelope_id": …}` back — for `events_api` only once its message is in
//! `in`, so a crash before the ack makes Slack send it again (the dedup key
//! drops what was already added). `events_api` payloads are the webhook's
//! `event_callback` bodies and go through the same normalization; other
//! envelopes (slash commands, interactivity) are acknowledged and ignored.
//!
//! Slack refreshes connections: a `disconnect` message (`refresh_requested`,
//! `warning`, `link_disabled`) precedes the socket closing, so a new
//! connection is opened first and the old one closed after it; what the old
//! one still delivers while closing is added to `in` too (and, its ack no
//! longer possible, sent again by Slack on the new one, where dedup drops
//! it). A `disconnect` on a socket not yet up for `stable_after_ms` (each
//! socket of a handover counts on its own) closes it and the next opens
//! after a backoff instead, so a Slack asking again and again is not
//! hammered. A connection that drops is opened again with backoff; one
//! ingest replica holds it, by a lease ([`crate::platforms::connection`]).
//!
//! Slack pings the socket (tungstenite answers with pongs) and expects it
//! to stay answered; ingest pings it too when it has been quiet for
//! `ping_interval_ms`, and a socket from which nothing at all (no frame,
//! ping or pong) came for `idle_timeout_ms` is dead — a NAT that dropped
//! it, a half-open TCP connection — and is dropped and opened again, what
//! it had not acknowledged coming again on the new one
//! ([`crate::platforms::connection::Keepalive`]).

use super::{read_event, Envelope, Slack, PLATFORM};
use crate::error::IngestError;
use crate::generic::{raw_event, Stamp};
use crate::inbox::Inbox;
use crate::platforms::connection::{
    close_socket, connect_socket, incoming, open_unless, ClientSocket as Socket, Connector, Ended,
    Held, Idle, Incoming, Keepalive, Link, Supervision, CLOSE_WAIT,
};
use botline_shared::telemetry::Health;
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use serde::Deserialize;
use std::sync::Arc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Socket Mode's settings, from `[ingest.platforms.slack]` and the environment.
pub(super) struct SocketSettings {
    /// The app-level token: never logged.
    pub app_token: String,
    /// `{api_base_url}/apps.connections.open`.
    pub open_url: url::Url,
    pub client: reqwest::Client,
    pub supervision: Supervision,
    /// When the socket is pinged, and when it counts as dead.
    pub idle: Idle,
}

/// Keep the app's Socket Mode connection up from whichever replica holds
/// its lease.
pub(super) fn start(slack: Arc<Slack>, inbox: Inbox, health: Health, shutdown: CancellationToken) {
    let supervision = slack
        .socket
        .as_ref()
        .expect("socket mode")
        .supervision
        .clone();
    let name = slack.bot.user_id.clone();
    let held = Held::new(
        &inbox,
        "slack-socket",
        PLATFORM.name,
        name,
        health,
        &supervision,
    );
    held.supervise(Arc::new(SocketMode { slack, inbox }), supervision, shutdown);
}

struct SocketMode {
    slack: Arc<Slack>,
    inbox: Inbox,
}

/// One message from Slack over the socket (the fields botline reads).
#[derive(Debug, Deserialize)]
struct SocketMessage {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    envelope_id: Option<String>,
    #[serde(default)]
    payload: Option<serde_json::Value>,
    /// `disconnect`: why.
    #[serde(default)]
    reason: Option<String>,
}

/// `apps.connections.open`'s answer.
#[derive(Debug, Deserialize)]
struct Opened {
    ok: bool,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    error: Option<String>,
}

/// What a message asks of the connection.
enum Next {
    Continue,
    /// Slack will close this socket: open the next one now.
    Disconnect,
    /// Stop this connection (a message could not be added: not acknowledged).
    Fail(String),
}

impl Connector for SocketMode {
    fn connect<'a>(&'a self, link: &'a Link, stop: &'a CancellationToken) -> BoxFuture<'a, Ended> {
        Box::pin(self.run(link, stop))
    }
}

impl SocketMode {
    fn settings(&self) -> &SocketSettings {
        self.slack.socket.as_ref().expect("socket mode")
    }

    async fn run(&self, link: &Link, stop: &CancellationToken) -> Ended {
        let mut socket = match open_unless(self.open(), stop).await {
            Ok(socket) => socket,
            Err(ended) => return ended,
        };
        let idle = self.settings().idle;
        let mut keepalive = Keepalive::new(idle, PLATFORM.name, Instant::now());
        loop {
            // Up once Slack said `hello`.
            let text = match keepalive.next_text(&mut socket, link, stop).await {
                Ok(text) => text,
                Err(ended) => return ended,
            };
            let Some(message) = read_message(&text) else {
                continue;
            };
            match self.handle(&mut socket, message, link, true).await {
                Next::Continue => {}
                Next::Fail(reason) => {
                    close_socket(&mut socket, None).await;
                    return Ended::Failed(reason);
                }
                Next::Disconnect if !link.lasted(self.settings().supervision.stable_after) => {
                    // A refresh asked for right after connecting, again and
                    // again, is a storm: the next connection after a backoff.
                    close_socket(&mut socket, None).await;
                    return Ended::Again;
                }
                Next::Disconnect => {
                    // The new connection first, then the old one closed.
                    let next = tokio::select! {
                        opened = self.open() => opened,
                        _ = stop.cancelled() => {
                            close_socket(&mut socket, None).await;
                            return Ended::Stopped;
                        }
                    };
                    match next {
                        Ok(next) => {
                            let old = std::mem::replace(&mut socket, next);
                            // The new socket must last on its own, or a
                            // Slack refreshing each one at once would get
                            // handovers without end.
                            link.opening();
                            self.retire(old, link).await;
                            keepalive = Keepalive::new(idle, PLATFORM.name, Instant::now());
                        }
                        Err(reason) => {
                            warn!(message = "could not open the next slack socket", %reason);
                            close_socket(&mut socket, None).await;
                            return Ended::Again;
                        }
                    }
                }
            }
        }
    }

    /// `apps.connections.open`, then the WebSocket it names.
    async fn open(&self) -> Result<Socket, String> {
        let settings = self.settings();
        let answer = settings
            .client
            .post(settings.open_url.clone())
            .bearer_auth(&settings.app_token)
            .header("content-type", "application/x-www-form-urlencoded")
            .send()
            .await
            .map_err(|error| format!("apps.connections.open failed: {}", error.without_url()))?;
        let status = answer.status();
        let opened: Opened = answer
            .json()
            .await
            .map_err(|error| format!("apps.connections.open answered {status}: {error}"))?;
        let url = match opened {
            Opened {
                ok: true,
                url: Some(url),
                ..
            } => url,
            Opened { error, .. } => {
                return Err(format!(
                    "apps.connections.open refused: {}",
                    error.unwrap_or_else(|| status.to_string())
                ))
            }
        };
        connect_socket(
            &url,
            settings.supervision.connect_timeout,
            "the slack socket",
        )
        .await
    }

    /// Close `old` (Slack asked for a new connection, which is open now),
    /// adding what it still delivers to `in`; it cannot be acknowledged
    /// any more, so Slack sends it again on the new connection.
    async fn retire(&self, mut old: Socket, link: &Link) {
        let _ = old.close(None).await;
        let draining = async {
            loop {
                let message = match incoming(old.next().await, PLATFORM.name) {
                    Incoming::Text(text) => read_message(&text),
                    Incoming::Control => None,
                    _ => break,
                };
                let Some(message) = message else { continue };
                if let Next::Fail(reason) = self.handle(&mut old, message, link, false).await {
                    warn!(message = "slack event not added from a closing socket", %reason);
                }
            }
        };
        let _ = tokio::time::timeout(CLOSE_WAIT, draining).await;
    }

    /// One message from Slack; `ack`: whether the socket can still answer.
    async fn handle(
        &self,
        socket: &mut Socket,
        message: SocketMessage,
        link: &Link,
        ack: bool,
    ) -> Next {
        match message.kind.as_str() {
            "hello" => {
                link.up();
                return Next::Continue;
            }
            "disconnect" => {
                let reason = message.reason.unwrap_or_default();
                info!(message = "slack asks for a new socket", %reason);
                return Next::Disconnect;
            }
            _ => {}
        }
        let Some(envelope_id) = message.envelope_id else {
            return Next::Continue;
        };
        if message.kind == "events_api" {
            if let Err(error) = self.admit(message.payload.unwrap_or_default()).await {
                error.record("slack_socket", PLATFORM.name);
                return Next::Fail(format!("could not add an event: {error}"));
            }
        } else {
            count_ignored(&message.kind);
        }
        if ack {
            let reply = serde_json::json!({ "envelope_id": envelope_id });
            if let Err(error) = socket.send(Frame::text(reply.to_string())).await {
                return Next::Fail(format!("could not acknowledge an envelope: {error}"));
            }
        }
        Next::Continue
    }

    /// An `events_api` payload (an `event_callback` body) into `in`, or
    /// counted as ignored.
    async fn admit(&self, payload: serde_json::Value) -> Result<(), IngestError> {
        let raw = raw_event(payload.to_string().as_bytes());
        let envelope: Envelope = match serde_json::from_value(payload) {
            Ok(envelope) => envelope,
            Err(error) => {
                // Acknowledged all the same: it would fail the same way again.
                IngestError::Malformed(error.to_string()).record("slack_socket", PLATFORM.name);
                return Ok(());
            }
        };
        let Envelope::EventCallback { event } = envelope else {
            count_ignored("other");
            return Ok(());
        };
        let stamp = Stamp {
            id: ulid::Ulid::new().to_string(),
            received_at_ms: botline_shared::now_ms(),
            trace_id: ulid::Ulid::new().to_string(),
            raw: Some(raw),
        };
        read_event(*event, &self.slack.bot, stamp)
            .admit(&self.inbox, PLATFORM.name)
            .await?;
        Ok(())
    }
}

fn count_ignored(kind: &str) {
    metrics::counter!("botline_ingest_ignored_total", "platform" => PLATFORM.name, "kind" => kind.to_string())
        .increment(1);
}

/// A message Slack sent, or `None` (logged) when it cannot be read.
fn read_message(text: &str) -> Option<SocketMessage> {
    serde_json::from_str(text)
        .map_err(|error| warn!(message = "unreadable slack socket message", %error))
        .ok()
}
