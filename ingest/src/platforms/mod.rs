//! Platform webhooks: `GET|POST /hooks/<platform>`. One module per platform
//! behind [`InboundPlatform`]; adding one is a module here with a
//! `PLATFORM` [`Registration`] and a line in [`PLATFORMS`]. Its settings are
//! its own `[ingest.platforms.<name>]` table, its secrets environment
//! variables it names.
//!
//! A request goes: the platform enabled (else 404), the body within
//! `max_body_bytes` (else 413), the backlog (429, so the platform retries
//! later), then [`InboundPlatform::receive`] — which verifies first (401
//! and a counted reason) and parses (400) — and the events are added to `in`
//! with the platform's event id as the dedup key, so the platform's own
//! retries add nothing. The answer goes out as soon as Redis has the
//! events: nothing slower happens in the request.
//!
//! A platform that connects to ingest over a WebSocket of its own (OneBot's
//! reverse WebSocket) does so at `GET /hooks/<platform>/ws`
//! ([`InboundPlatform::socket`]): the opening request is verified the same
//! way (401 and a counted reason) before the upgrade.

pub mod connection;
pub mod dingtalk;
pub mod discord;
pub mod feishu;
pub mod onebot;
pub mod relay;
pub mod slack;
pub mod telegram;
pub mod wecom;

use crate::error::IngestError;
use crate::generic::{raw_event, Stamp};
use crate::inbox::{Inbox, Submission};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::ws::rejection::WebSocketUpgradeRejection;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use botline_shared::config::{enabled_platforms, Env};
use botline_shared::message::{Chat, Mentions, Origin, Sender, UnifiedMessage};
use botline_shared::telemetry::Health;
use botline_shared::Error;
use futures_util::future::BoxFuture;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use tracing::info;

/// One platform's inbound side.
pub trait InboundPlatform: Send + Sync + 'static {
    /// The platform name: `/hooks/<name>`, `UnifiedMessage::platform`, `out:<name>`.
    fn name(&self) -> &'static str;

    /// Verify one request the platform's way, then read it. Pure: no I/O.
    fn receive(&self, request: &HookRequest) -> Result<Hook, IngestError>;

    /// Work besides the webhook (long polling for hosts without a public
    /// URL, a gateway connection), started once with the server; `health`
    /// is what `/readyz` reports, for the connections it keeps.
    fn start(self: Arc<Self>, _inbox: Inbox, _health: Health, _shutdown: CancellationToken) {}

    /// A WebSocket the platform opens to ingest at `GET /hooks/<name>/ws`
    /// (OneBot's reverse WebSocket): the opening request verified the
    /// platform's way first (401 and a counted reason, as a webhook), then
    /// what serves the socket. Platforms without one answer 404.
    fn socket(self: Arc<Self>, _request: &HookRequest) -> Result<SocketService, IngestError> {
        Err(IngestError::UnknownPlatform(format!("{}/ws", self.name())))
    }
}

/// Serves one WebSocket a platform opened, until it ends.
pub type SocketService = Box<dyn FnOnce(WebSocket) -> BoxFuture<'static, ()> + Send>;

/// Largest frame a platform's socket may send (OneBot events with long
/// forwarded messages are bigger than a webhook body usually is).
pub const SOCKET_MAX_FRAME_BYTES: usize = 4 * 1024 * 1024;

/// One platform's inbound side, built from its `[ingest.platforms.<name>]`
/// table (already known to be enabled) and the environment.
pub struct Registration {
    pub name: &'static str,
    pub build: BuildPlatform,
}

/// Makes a platform's inbound side from its settings table and the environment.
pub type BuildPlatform = fn(&toml::Value, &dyn Env) -> Result<Arc<dyn InboundPlatform>, Error>;

/// Every platform ingest can receive from, besides the generic API and the web chat.
pub const PLATFORMS: &[&Registration] = &[
    &dingtalk::PLATFORM,
    &feishu::PLATFORM,
    &slack::PLATFORM,
    &telegram::PLATFORM,
    &wecom::PLATFORM,
    &onebot::PLATFORM,
    &discord::PLATFORM,
];

/// The platforms `[ingest.platforms]` enables.
pub fn build(
    platforms: &toml::Table,
    env: &dyn Env,
) -> Result<Vec<Arc<dyn InboundPlatform>>, Error> {
    let known: Vec<&str> = PLATFORMS
        .iter()
        .map(|registration| registration.name)
        .collect();
    let mut built = Vec::new();
    for (name, table) in enabled_platforms("ingest", platforms, &known)? {
        let registration = PLATFORMS
            .iter()
            .find(|registration| registration.name == name)
            .expect("enabled_platforms returns known names");
        built.push((registration.build)(table, env)?);
        info!(message = "platform webhook enabled", platform = name, path = %format!("/hooks/{name}"));
    }
    Ok(built)
}

/// A request to `/hooks/<platform>`, as the platform module sees it.
#[derive(Debug)]
pub struct HookRequest {
    pub method: Method,
    /// The raw query string (undecoded), empty if none.
    pub query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// When ingest received it (UTC ms); timestamp windows are checked against it.
    pub received_at_ms: i64,
    /// The trace id the caller sent, or one made for this request.
    pub trace_id: String,
}

impl HookRequest {
    /// A request received now, traced by the caller's trace id or a new one.
    pub fn new(method: Method, query: Option<String>, headers: HeaderMap, body: Bytes) -> Self {
        HookRequest {
            method,
            query: query.unwrap_or_default(),
            trace_id: crate::api::trace_id(&headers),
            headers,
            body,
            received_at_ms: botline_shared::now_ms(),
        }
    }

    /// A header's value, if present and text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// A query parameter, percent-decoded.
    pub fn query_param(&self, name: &str) -> Option<String> {
        url::form_urlencoded::parse(self.query.as_bytes())
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.into_owned())
    }

    /// What ingest gives each message made from this request.
    pub fn stamp(&self) -> Stamp {
        Stamp {
            id: ulid::Ulid::new().to_string(),
            received_at_ms: self.received_at_ms,
            trace_id: self.trace_id.clone(),
            raw: Some(raw_event(&self.body)),
        }
    }
}

impl Stamp {
    /// A user's message on `platform` as ingest stamps it; in no thread,
    /// mentioning no one, without attachments, quote, platform ids or
    /// platform data, which a platform module sets where it has them
    /// (`UnifiedMessage { thread, ..stamp.user_message(…) }`).
    pub fn user_message(
        self,
        platform: &str,
        bot: String,
        chat: Chat,
        sender: Sender,
        text: String,
    ) -> UnifiedMessage {
        UnifiedMessage {
            id: self.id,
            platform: platform.into(),
            bot,
            chat,
            thread: None,
            sender,
            text,
            mentions: Mentions::default(),
            attachments: Vec::new(),
            reply_to: None,
            platform_message_id: None,
            platform_data: Default::default(),
            platform_ts_ms: None,
            received_at_ms: self.received_at_ms,
            trace_id: self.trace_id,
            origin: Origin::User,
            replay: false,
            raw: self.raw,
        }
    }
}

/// A message made from a platform event.
#[derive(Debug, Clone)]
pub struct Event {
    /// The platform's id of the event: the dedup key of its retries.
    pub event_id: String,
    pub message: UnifiedMessage,
}

/// What a platform made of a request.
#[derive(Debug)]
pub enum Hook {
    /// A handshake (URL verification, challenge, echo): answered, nothing added.
    Answer(Answer),
    /// Messages to add to `in`; `answer` once they are there.
    Events { events: Vec<Event>, answer: Answer },
    /// A verified event botline does not turn into a message (a reaction,
    /// a member joining, the bot's own message): acknowledged so the
    /// platform does not retry it, and counted by `kind`.
    Ignored { kind: String, answer: Answer },
}

/// What one platform event reads as: a message, or why it is not one.
pub(crate) enum Read {
    Message(Box<Event>),
    Ignored(&'static str),
}

impl Read {
    /// For a connection's events: a message into `inbox` (a duplicate is
    /// dropped there), an ignored event counted as `platform`'s.
    pub(crate) async fn admit(
        self,
        inbox: &Inbox,
        platform: &'static str,
    ) -> Result<(), IngestError> {
        match self {
            Read::Message(event) => {
                inbox
                    .admit(&[Submission {
                        message: event.message,
                        event_id: Some(event.event_id),
                        transcript: false,
                    }])
                    .await?;
            }
            Read::Ignored(kind) => {
                metrics::counter!("botline_ingest_ignored_total", "platform" => platform, "kind" => kind)
                    .increment(1);
            }
        }
        Ok(())
    }

    /// The hook for it, acknowledged with a plain 200 either way.
    pub(crate) fn into_hook(self) -> Hook {
        match self {
            Read::Message(event) => Hook::Events {
                events: vec![*event],
                answer: Answer::ok(),
            },
            Read::Ignored(kind) => Hook::Ignored {
                kind: kind.into(),
                answer: Answer::ok(),
            },
        }
    }
}

/// The HTTP answer a platform expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: StatusCode,
    pub content_type: &'static str,
    pub body: String,
}

impl Answer {
    /// 200 with an empty body.
    pub fn ok() -> Self {
        Answer::text(String::new())
    }

    /// 200 with this JSON.
    pub fn json(value: serde_json::Value) -> Self {
        Answer {
            status: StatusCode::OK,
            content_type: "application/json",
            body: value.to_string(),
        }
    }

    /// 200 with this plain text.
    pub fn text(body: String) -> Self {
        Answer {
            status: StatusCode::OK,
            content_type: "text/plain; charset=utf-8",
            body,
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        (
            self.status,
            [(header::CONTENT_TYPE, self.content_type)],
            self.body,
        )
            .into_response()
    }
}

/// `GET|POST /hooks/{platform}`.
pub async fn hook(
    State(state): State<AppState>,
    Path(name): Path<String>,
    method: Method,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, IngestError> {
    let platform = enabled(&state, name)?;
    let body = body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            IngestError::TooLarge {
                limit: state.settings.max_body_bytes,
            }
        } else {
            IngestError::Malformed(rejection.body_text())
        }
    })?;
    state.check_backlog()?;
    let request = HookRequest::new(method, query, headers, body);
    let platform_name = platform.name();
    match platform.receive(&request)? {
        Hook::Answer(answer) => Ok(answer.into_response()),
        Hook::Ignored { kind, answer } => {
            count_ignored(platform_name, kind);
            Ok(answer.into_response())
        }
        Hook::Events { events, answer } => {
            state.inbox.admit(&submissions(events)).await?;
            Ok(answer.into_response())
        }
    }
}

/// `GET /hooks/{platform}/ws`: a WebSocket the platform opens to ingest.
pub async fn socket(
    State(state): State<AppState>,
    Path(name): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, IngestError> {
    let platform = enabled(&state, name)?.clone();
    let request = HookRequest::new(Method::GET, query, headers, Bytes::new());
    let serve = platform.socket(&request)?;
    let upgrade = upgrade.map_err(|rejection| IngestError::Malformed(rejection.body_text()))?;
    Ok(upgrade
        .max_message_size(SOCKET_MAX_FRAME_BYTES)
        .on_upgrade(serve)
        .into_response())
}

/// The enabled platform called `name` (else 404).
fn enabled(state: &AppState, name: String) -> Result<&Arc<dyn InboundPlatform>, IngestError> {
    state
        .platforms
        .iter()
        .find(|platform| platform.name() == name)
        .ok_or(IngestError::UnknownPlatform(name))
}

/// Count a verified event that made no message, by kind.
pub fn count_ignored(platform: &'static str, kind: String) {
    metrics::counter!("botline_ingest_ignored_total", "platform" => platform, "kind" => kind)
        .increment(1);
}

/// What to add to `in` for `events`, each deduplicated by its event id.
pub fn submissions(events: Vec<Event>) -> Vec<Submission> {
    events
        .into_iter()
        .map(|event| Submission {
            message: event.message,
            event_id: Some(event.event_id),
            transcript: false,
        })
        .collect()
}
