//! DingTalk Stream mode (`mode = "stream"`): robot callbacks over a
//! WebSocket ingest opens, for hosts without a public URL.
//!
//! The registration call `POST {api_base_url}/v1.0/gateway/connections/open`
//! with the app's `clientId` (`client_id`, its AppKey) and `clientSecret`
//! (`BOTLINE_DINGTALK_APP_SECRET`) and the subscription to robot messages
//! (`CALLBACK` `/v1.0/im/bot/messages/get`) answers an `endpoint` and a
//! one-time `ticket`; the socket is `endpoint?ticket=…`. Every frame is
//! `{specVersion, type, headers: {messageId, topic, …}, data}`, `data` a
//! JSON string:
//!
//! - `SYSTEM` `ping`: answered with its own headers and data (the pong);
//!   `SYSTEM` `disconnect`: DingTalk is about to close the socket, so a new
//!   connection is opened (what it had not acknowledged, DingTalk sends
//!   again);
//! - `CALLBACK` `/v1.0/im/bot/messages/get`: `data` is the HTTP callback's
//!   body and goes through the same normalization; acknowledged
//!   (`code` 200, its `messageId`) only once the message is in `in`, so a
//!   crash before the ack makes DingTalk send it again (dedup on `msgId`
//!   drops what was already added);
//! - other `CALLBACK`s and `EVENT`s are acknowledged and ignored.
//!
//! A connection that drops is opened again with backoff; one ingest
//! replica holds it, by a lease ([`crate::platforms::connection`]).
//! DingTalk's `ping`s keep a healthy connection talking, and ingest sends
//! WebSocket pings of its own when it has been quiet for
//! `ping_interval_ms` (as DingTalk's SDKs do); a connection from which
//! nothing at all came for `idle_timeout_ms` is dead and is dropped and
//! opened again, what it had not acknowledged coming again on the new one
//! ([`crate::platforms::connection::Keepalive`]).

use super::{Callback, DingTalk, NAME};
use crate::error::IngestError;
use crate::generic::{raw_event, Stamp};
use crate::inbox::{Inbox, Submission};
use crate::platforms::connection::{
    close_socket, connect_socket, open_unless, ClientSocket as Socket, Connector, Ended, Held,
    Idle, Keepalive, Link, Supervision,
};
use botline_shared::telemetry::Health;
use futures_util::future::BoxFuture;
use futures_util::SinkExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The robot message callback's topic.
pub const ROBOT_TOPIC: &str = "/v1.0/im/bot/messages/get";

/// Stream mode's settings, from `[ingest.platforms.dingtalk]` and the environment.
pub(super) struct StreamSettings {
    pub client_id: String,
    /// The AppSecret: never logged.
    pub client_secret: String,
    /// `{api_base_url}/v1.0/gateway/connections/open`.
    pub open_url: url::Url,
    pub client: reqwest::Client,
    pub supervision: Supervision,
    /// When the socket is pinged, and when it counts as dead.
    pub idle: Idle,
}

/// Keep the app's Stream connection up from whichever replica holds its lease.
pub(super) fn start(
    dingtalk: Arc<DingTalk>,
    inbox: Inbox,
    health: Health,
    shutdown: CancellationToken,
) {
    let settings = dingtalk.stream.as_ref().expect("stream mode");
    let (name, supervision) = (settings.client_id.clone(), settings.supervision.clone());
    let held = Held::new(&inbox, "dingtalk-stream", NAME, name, health, &supervision);
    held.supervise(
        Arc::new(StreamMode { dingtalk, inbox }),
        supervision,
        shutdown,
    );
}

struct StreamMode {
    dingtalk: Arc<DingTalk>,
    inbox: Inbox,
}

/// One frame DingTalk sends.
#[derive(Debug, Deserialize)]
struct Frame {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    headers: serde_json::Map<String, Value>,
    #[serde(default)]
    data: String,
}

impl Frame {
    fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(Value::as_str)
            .unwrap_or_default()
    }
}

/// The registration call's answer.
#[derive(Debug, Deserialize)]
struct Registered {
    endpoint: String,
    ticket: String,
}

impl Connector for StreamMode {
    fn connect<'a>(&'a self, link: &'a Link, stop: &'a CancellationToken) -> BoxFuture<'a, Ended> {
        Box::pin(self.run(link, stop))
    }
}

impl StreamMode {
    fn settings(&self) -> &StreamSettings {
        self.dingtalk.stream.as_ref().expect("stream mode")
    }

    async fn run(&self, link: &Link, stop: &CancellationToken) -> Ended {
        let mut socket = match open_unless(self.open(), stop).await {
            Ok(socket) => socket,
            Err(ended) => return ended,
        };
        link.up();
        let mut keepalive = Keepalive::new(self.settings().idle, NAME, Instant::now());
        loop {
            let text = match keepalive.next_text(&mut socket, link, stop).await {
                Ok(text) => text,
                Err(ended) => return ended,
            };
            let frame: Frame = match serde_json::from_str(&text) {
                Ok(frame) => frame,
                Err(error) => {
                    warn!(message = "unreadable dingtalk stream frame", %error);
                    continue;
                }
            };
            let reply = match (frame.kind.as_str(), frame.header("topic")) {
                ("SYSTEM", "ping") => Some(json!({
                    "code": 200,
                    "headers": frame.headers,
                    "message": "OK",
                    "data": frame.data,
                })),
                ("SYSTEM", "disconnect") => {
                    info!(message = "dingtalk asks for a new stream connection");
                    close_socket(&mut socket, None).await;
                    return Ended::Again;
                }
                ("SYSTEM", _) => None,
                ("CALLBACK", ROBOT_TOPIC) => {
                    if let Err(error) = self.admit(&frame.data).await {
                        error.record("dingtalk_stream", NAME);
                        close_socket(&mut socket, None).await;
                        // Not acknowledged: DingTalk sends it again.
                        return Ended::Failed(format!("could not add a message: {error}"));
                    }
                    Some(ack(&frame, json!({ "response": null })))
                }
                ("EVENT", _) => {
                    count_ignored("event");
                    Some(ack(
                        &frame,
                        json!({ "status": "SUCCESS", "message": "success" }),
                    ))
                }
                _ => {
                    count_ignored("other");
                    Some(ack(&frame, json!({ "response": null })))
                }
            };
            if let Some(reply) = reply {
                if let Err(error) = socket.send(WsMessage::text(reply.to_string())).await {
                    return Ended::Failed(format!("could not answer a frame: {error}"));
                }
            }
        }
    }

    /// The registration call, then the WebSocket it names.
    async fn open(&self) -> Result<Socket, String> {
        let settings = self.settings();
        let body = json!({
            "clientId": settings.client_id,
            "clientSecret": settings.client_secret,
            "subscriptions": [{ "type": "CALLBACK", "topic": ROBOT_TOPIC }],
            "ua": concat!("botline-ingest/", env!("CARGO_PKG_VERSION")),
            "localIp": "",
        });
        let answer = settings
            .client
            .post(settings.open_url.clone())
            .header("accept", "application/json")
            .json(&body)
            .send()
            .await
            .map_err(|error| format!("the stream registration failed: {}", error.without_url()))?;
        let status = answer.status();
        if !status.is_success() {
            let said = answer.text().await.unwrap_or_default();
            return Err(format!(
                "the stream registration answered {status}: {}",
                said.chars().take(200).collect::<String>()
            ));
        }
        let registered: Registered = answer
            .json()
            .await
            .map_err(|error| format!("the stream registration answered {status}: {error}"))?;
        let mut url = url::Url::parse(&registered.endpoint)
            .ok()
            .filter(|url| matches!(url.scheme(), "ws" | "wss"))
            .ok_or_else(|| "the stream endpoint is not a ws(s):// URL".to_string())?;
        url.query_pairs_mut()
            .append_pair("ticket", &registered.ticket);
        connect_socket(
            url.as_str(),
            settings.supervision.connect_timeout,
            "the dingtalk stream",
        )
        .await
    }

    /// A robot callback's `data` into `in`, or counted as ignored.
    async fn admit(&self, data: &str) -> Result<(), IngestError> {
        let callback: Callback = match serde_json::from_str(data) {
            Ok(callback) => callback,
            Err(error) => {
                // Acknowledged all the same: it would fail the same way again.
                IngestError::Malformed(error.to_string()).record("dingtalk_stream", NAME);
                return Ok(());
            }
        };
        let event_id = callback.msg_id.clone();
        let stamp = Stamp {
            id: ulid::Ulid::new().to_string(),
            received_at_ms: botline_shared::now_ms(),
            trace_id: ulid::Ulid::new().to_string(),
            raw: Some(raw_event(data.as_bytes())),
        };
        match callback.into_message(stamp) {
            Some(message) => {
                self.inbox
                    .admit(&[Submission {
                        message,
                        event_id: Some(event_id),
                        transcript: false,
                    }])
                    .await?;
            }
            None => count_ignored("unsupported_message"),
        }
        Ok(())
    }
}

/// The acknowledgement of `frame`, answering `data`.
fn ack(frame: &Frame, data: Value) -> Value {
    json!({
        "code": 200,
        "headers": {
            "contentType": "application/json",
            "messageId": frame.header("messageId"),
        },
        "message": "OK",
        "data": data.to_string(),
    })
}

fn count_ignored(kind: &'static str) {
    metrics::counter!("botline_ingest_ignored_total", "platform" => NAME, "kind" => kind)
        .increment(1);
}
