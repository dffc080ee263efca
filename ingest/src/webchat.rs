//! The web chat: a page at `/` and its WebSocket at `/ws?chat=<id>`.
//!
//! The conversation lives in Redis, in the chat's transcript stream
//! (`web:<chat>`): the person's turns are added by the same script that adds
//! the message to `in`, the bot's by egress, and both announce the chat id
//! on one pub/sub channel. Ingest holds one subscription to that channel
//! and fans the chat ids out to the sockets; a socket then reads its
//! transcript after the last entry it sent. So a reload shows the
//! conversation so far, and a lost subscription loses nothing: after
//! re-subscribing, every socket reads again from where it was.
//!
//! Protocol, JSON text frames:
//! - client → server: `{"type":"message","id":"<client id>","text":"…","name":"…"}`;
//!   `id` ([A-Za-z0-9_-]{1,64}) is the event id, so a resend after a
//!   reconnect is dropped; `name` defaults to "you".
//! - server → client: `{"type":"turn","entry_id":"…","role":"user"|"bot","name":"…","text":"…","at_ms":…}`
//!   for each transcript entry (history first, then live), with
//!   `"attachments":[{"kind":"image"|"file"|…,"url":"https://…","name":"…"}]`
//!   when the turn has any (only http(s) URLs are passed on; the page shows
//!   images as pictures and other kinds as links), and
//!   `{"type":"error","error":"…"}` for a refused message.

use crate::error::IngestError;
use crate::generic::{check_text, raw_event, Stamp, DEFAULT_BOT};
use crate::inbox::Submission;
use crate::limits::Source;
use crate::AppState;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Extension, Query, State};
use axum::response::{Html, IntoResponse, Response};
use botline_shared::codec;
use botline_shared::message::{
    Attachment, AttachmentKind, Chat, ChatKind, Mentions, Origin, Role, Sender, Turn,
    UnifiedMessage,
};
use botline_shared::redis_conn::{self, COMMAND_TIMEOUT};
use botline_shared::telemetry::Health;
use botline_shared::{now_ms, Error};
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The platform name of web chat messages.
pub const PLATFORM: &str = "web";
/// The name of a person who has not set one.
pub const DEFAULT_NAME: &str = "you";
/// Longest display name kept; longer ones are cut.
pub const MAX_NAME_CHARS: usize = 64;
/// Transcript entries read per `XRANGE`.
const READ_BATCH: usize = 500;

const PAGE: &str = include_str!("../static/chat.html");

/// What the pub/sub listener tells the sockets.
#[derive(Debug, Clone)]
pub enum Notice {
    /// This chat's transcript has new entries.
    Chat(Arc<str>),
    /// The subscription was (re)made: notifications may have been missed.
    Resync,
}

/// `/`: the chat page.
pub async fn page() -> Html<&'static str> {
    Html(PAGE)
}

/// A chat id the page made: [A-Za-z0-9_-]{8,64}.
pub fn is_chat_id(id: &str) -> bool {
    (8..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn is_client_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// `/ws?chat=<id>`.
pub async fn socket(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    source: Option<Extension<Source>>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, IngestError> {
    let chat = query.get("chat").cloned().unwrap_or_default();
    if !is_chat_id(&chat) {
        return Err(IngestError::Malformed(
            "chat must be 8 to 64 characters of A-Z a-z 0-9 _ -".into(),
        ));
    }
    Ok(upgrade
        .max_message_size(state.settings.max_body_bytes)
        .on_upgrade(move |socket| session(socket, state, chat, source.map(|source| source.0)))
        .into_response())
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ClientFrame {
    Message {
        id: String,
        text: String,
        #[serde(default)]
        name: Option<String>,
    },
}

#[derive(Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum ServerFrame<'a> {
    Turn {
        entry_id: &'a str,
        role: Role,
        name: &'a str,
        text: &'a str,
        at_ms: i64,
        #[serde(skip_serializing_if = "Vec::is_empty")]
        attachments: Vec<FrameAttachment<'a>>,
    },
    Error {
        error: String,
    },
}

/// An attachment as the page gets it: only those with an http(s) URL.
#[derive(Debug, Serialize, PartialEq)]
struct FrameAttachment<'a> {
    kind: AttachmentKind,
    url: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
}

/// The attachments of a turn the page may show.
fn frame_attachments(attachments: &[Attachment]) -> Vec<FrameAttachment<'_>> {
    attachments
        .iter()
        .filter_map(|attachment| {
            Some(FrameAttachment {
                kind: attachment.kind,
                url: attachment.http_url()?,
                name: attachment.name.as_deref(),
            })
        })
        .collect()
}

impl ServerFrame<'_> {
    fn message(&self) -> Message {
        Message::Text(
            serde_json::to_string(self)
                .expect("frames serialize")
                .into(),
        )
    }
}

/// One browser tab: history, then live turns, and its messages in; each
/// message is charged to `source`'s per-source limit like a request.
async fn session(socket: WebSocket, state: AppState, chat: String, source: Option<Source>) {
    // Subscribe before reading the history, so no change falls in between.
    let mut notices = state.notices.subscribe();
    let (mut outgoing, mut incoming) = socket.split();
    let mut last_seen: Option<String> = None;
    debug!(message = "web chat connected", chat = %chat);
    if send_new_turns(&state, &chat, &mut last_seen, &mut outgoing)
        .await
        .is_err()
    {
        return;
    }
    loop {
        let catch_up = tokio::select! {
            _ = state.shutdown.cancelled() => {
                let _ = outgoing.send(Message::Close(None)).await;
                return;
            }
            frame = incoming.next() => match frame {
                Some(Ok(Message::Text(text))) => {
                    let taken = match source.map(|source| state.limits.check(source)) {
                        Some(Err(refused)) => Err(refused),
                        _ => take_message(&state, &chat, text.as_str()).await,
                    };
                    if let Err(error) = taken {
                        error.record("ws", PLATFORM);
                        let frame = ServerFrame::Error { error: error.to_string() }.message();
                        if outgoing.send(frame).await.is_err() {
                            return;
                        }
                    }
                    false
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                Some(Ok(_)) => false,
            },
            notice = notices.recv() => match notice {
                Ok(Notice::Chat(changed)) => *changed == *chat,
                Ok(Notice::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if catch_up
            && send_new_turns(&state, &chat, &mut last_seen, &mut outgoing)
                .await
                .is_err()
        {
            return;
        }
    }
}

/// Send every transcript entry after `last_seen` (all of them when `None`).
/// A Redis failure is logged and retried on the next notice; a closed socket ends the session.
async fn send_new_turns(
    state: &AppState,
    chat: &str,
    last_seen: &mut Option<String>,
    outgoing: &mut (impl SinkExt<Message> + Unpin),
) -> Result<(), ()> {
    let key = state.inbox.streams.transcript(chat);
    loop {
        let entries = match read_after(state, &key, last_seen.as_deref()).await {
            Ok(entries) => entries,
            Err(error) => {
                warn!(message = "could not read a web chat transcript", chat, %error);
                return Ok(());
            }
        };
        let batch = entries.len();
        for entry in entries {
            *last_seen = Some(entry.id.clone());
            let Some(fields) = entry.fields else { continue };
            let turn: Turn = match codec::decode(
                fields
                    .iter()
                    .map(|(name, value)| (name.as_str(), value.as_slice())),
            ) {
                Ok(turn) => turn,
                Err(error) => {
                    warn!(message = "transcript entry skipped", chat, entry = %entry.id, %error);
                    continue;
                }
            };
            let frame = ServerFrame::Turn {
                entry_id: &entry.id,
                role: turn.role,
                name: &turn.speaker_name,
                text: &turn.text,
                at_ms: turn.at_ms,
                attachments: frame_attachments(&turn.attachments),
            };
            outgoing.send(frame.message()).await.map_err(|_| ())?;
        }
        if batch < READ_BATCH {
            return Ok(());
        }
    }
}

async fn read_after(
    state: &AppState,
    key: &str,
    last_seen: Option<&str>,
) -> Result<Vec<redis_conn::RawEntry>, Error> {
    let mut connection = state.inbox.pool.get().await?;
    let start = match last_seen {
        Some(id) => format!("({id}"),
        None => "-".into(),
    };
    let reply: redis::Value = redis::cmd("XRANGE")
        .arg(key)
        .arg(start)
        .arg("+")
        .arg("COUNT")
        .arg(READ_BATCH)
        .query_async(&mut connection)
        .await?;
    redis_conn::parse_entries(key, reply)
}

/// A frame from the page: checked, then added to `in` and the transcript.
async fn take_message(state: &AppState, chat: &str, frame: &str) -> Result<(), IngestError> {
    let submission = read_frame(chat, frame, state.settings.max_text_chars)?;
    state.check_backlog()?;
    state.inbox.admit_one(submission).await?;
    Ok(())
}

/// What a frame from the page in `chat` adds, or why it is refused. Pure:
/// the web chat's parser, reached by the fuzz targets (fuzz/) as well.
#[doc(hidden)]
pub fn read_frame(
    chat: &str,
    frame: &str,
    max_text_chars: usize,
) -> Result<Submission, IngestError> {
    let ClientFrame::Message { id, text, name } = crate::generic::parse_json(frame.as_bytes())?;
    if !is_client_id(&id) {
        return Err(IngestError::Invalid(
            "id must be 1 to 64 characters of A-Z a-z 0-9 _ -".into(),
        ));
    }
    if text.trim().is_empty() {
        return Err(IngestError::Invalid("text must not be empty".into()));
    }
    check_text(&text, max_text_chars)?;
    let name = display_name(name.as_deref());
    let message = web_message(
        chat,
        &name,
        text,
        Stamp {
            id: ulid::Ulid::new().to_string(),
            received_at_ms: now_ms(),
            trace_id: ulid::Ulid::new().to_string(),
            raw: Some(raw_event(frame.as_bytes())),
        },
    );
    Ok(Submission {
        message,
        event_id: Some(format!("{chat}:{id}")),
        transcript: true,
    })
}

fn display_name(name: Option<&str>) -> String {
    let name: String = name
        .unwrap_or_default()
        .trim()
        .chars()
        .filter(|c| !c.is_control())
        .take(MAX_NAME_CHARS)
        .collect();
    if name.is_empty() {
        DEFAULT_NAME.into()
    } else {
        name
    }
}

/// A person's web chat message: a direct chat whose id is also the sender's.
pub fn web_message(chat: &str, name: &str, text: String, stamp: Stamp) -> UnifiedMessage {
    UnifiedMessage {
        id: stamp.id,
        platform: PLATFORM.into(),
        bot: DEFAULT_BOT.into(),
        chat: Chat {
            id: chat.into(),
            kind: ChatKind::Direct,
        },
        thread: None,
        sender: Sender {
            id: chat.into(),
            name: name.into(),
            is_bot: false,
        },
        text,
        mentions: Mentions {
            users: Vec::new(),
            bot: true,
        },
        attachments: Vec::new(),
        reply_to: None,
        platform_message_id: None,
        platform_data: Default::default(),
        platform_ts_ms: None,
        received_at_ms: stamp.received_at_ms,
        trace_id: stamp.trace_id,
        origin: Origin::User,
        replay: false,
        raw: stamp.raw,
    }
}

/// Hold the one subscription to the transcript channel until `shutdown`,
/// re-subscribing with backoff when it drops; each (re)subscription tells
/// every socket to read again from where it was.
pub async fn follow_transcripts(
    client: redis::Client,
    channel: String,
    notices: broadcast::Sender<Notice>,
    health: Health,
    shutdown: CancellationToken,
) {
    const CHECK: &str = "transcript_pubsub";
    let mut backoff = Duration::from_millis(100);
    health.set(CHECK, false);
    loop {
        let subscribed = tokio::time::timeout(COMMAND_TIMEOUT, async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            Ok::<_, redis::RedisError>(pubsub)
        })
        .await;
        match subscribed {
            Ok(Ok(pubsub)) => {
                info!(message = "following web chat transcripts", %channel);
                backoff = Duration::from_millis(100);
                health.set(CHECK, true);
                let _ = notices.send(Notice::Resync);
                let mut messages = pubsub.into_on_message();
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        message = messages.next() => match message {
                            Some(message) => {
                                if let Ok(chat) = message.get_payload::<String>() {
                                    let _ = notices.send(Notice::Chat(chat.into()));
                                }
                            }
                            None => break,
                        },
                    }
                }
                health.set(CHECK, false);
                warn!(message = "transcript subscription lost; re-subscribing");
            }
            Ok(Err(error)) => warn!(message = "could not subscribe to transcripts", %error),
            Err(_) => warn!(
                message = "could not subscribe to transcripts",
                error = "timed out"
            ),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_ids_are_checked() {
        for (id, ok) in [
            ("abcdefgh", true),
            ("A1_-A1_-A1", true),
            ("short", false),
            (&"x".repeat(64), true),
            (&"x".repeat(65), false),
            ("has space1", false),
            ("ünïcödé123", false),
        ] {
            assert_eq!(is_chat_id(id), ok, "{id}");
        }
    }

    #[test]
    fn names_default_and_are_cut() {
        for (name, expected) in [
            (None, "you".to_string()),
            (Some("  "), "you".to_string()),
            (Some(" Ann "), "Ann".to_string()),
            (Some("a\u{7}b"), "ab".to_string()),
            (Some(&*"名".repeat(100)), "名".repeat(64)),
        ] {
            assert_eq!(display_name(name), expected);
        }
    }

    #[test]
    fn frames_have_the_documented_shape() {
        let frame = ServerFrame::Turn {
            entry_id: "1-0",
            role: Role::Bot,
            name: "botline",
            text: "hi",
            at_ms: 3,
            attachments: vec![],
        };
        assert_eq!(
            serde_json::to_string(&frame).unwrap(),
            r#"{"type":"turn","entry_id":"1-0","role":"bot","name":"botline","text":"hi","at_ms":3}"#
        );
        let attachments = [
            Attachment::image("https://x.test/a.png", Some("map".into())),
            Attachment::image("javascript:alert(1)", None),
            Attachment {
                kind: AttachmentKind::File,
                url: Some("http://x.test/menu.pdf".into()),
                file_id: None,
                mime: None,
                size: None,
                name: None,
            },
        ];
        let with = ServerFrame::Turn {
            entry_id: "2-0",
            role: Role::Bot,
            name: "botline",
            text: "",
            at_ms: 4,
            attachments: frame_attachments(&attachments),
        };
        assert_eq!(
            serde_json::to_string(&with).unwrap(),
            r#"{"type":"turn","entry_id":"2-0","role":"bot","name":"botline","text":"","at_ms":4,"attachments":[{"kind":"image","url":"https://x.test/a.png","name":"map"},{"kind":"file","url":"http://x.test/menu.pdf"}]}"#,
            "only http(s) URLs reach the page"
        );
        let error = ServerFrame::Error { error: "no".into() };
        assert_eq!(
            serde_json::to_string(&error).unwrap(),
            r#"{"type":"error","error":"no"}"#
        );
    }
}
