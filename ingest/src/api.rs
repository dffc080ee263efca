//! The generic API: `POST /v1/messages` (one message, see
//! [`GenericMessage`]) and `POST /v1/broadcast` (one text to many chats, see
//! [`Broadcast`]), both behind a JWT bearer token.

use crate::error::IngestError;
use crate::generic::{parse_json, raw_event, Broadcast, GenericMessage, Stamp};
use crate::inbox::{Admission, Submission};
use crate::AppState;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use botline_shared::now_ms;
use serde_json::json;

/// How many broadcast copies go to Redis in one script call.
const BROADCAST_CHUNK: usize = 100;

/// A request's token, body size and the backlog, in that order.
fn admit_request(
    state: &AppState,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, IngestError> {
    let auth = state.auth.as_ref().ok_or(IngestError::Disabled)?;
    auth.check(headers)?;
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            IngestError::TooLarge {
                limit: state.settings.max_body_bytes,
            }
        } else {
            IngestError::Malformed(rejection.body_text())
        }
    })
}

/// The trace id the caller sent, or a new one.
pub fn trace_id(headers: &HeaderMap) -> String {
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    crate::generic::caller_trace_id(header("x-trace-id"), header("traceparent"))
        .unwrap_or_else(|| ulid::Ulid::new().to_string())
}

pub async fn post_message(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, IngestError> {
    let body = admit_request(&state, &headers, body)?;
    let message: GenericMessage = parse_json(&body)?;
    let event_id = message.checked_event_id()?.map(str::to_owned);
    let stamp = Stamp {
        id: ulid::Ulid::new().to_string(),
        received_at_ms: now_ms(),
        trace_id: trace_id(&headers),
        raw: Some(raw_event(&body)),
    };
    let message = message.into_unified(stamp, state.settings.max_text_chars)?;
    state.check_backlog()?;
    let (id, trace_id) = (message.id.clone(), message.trace_id.clone());
    let admission = state
        .inbox
        .admit_one(Submission {
            message,
            event_id: event_id.clone(),
            transcript: false,
        })
        .await?;
    Ok(match admission {
        Admission::Added(_) => (
            StatusCode::ACCEPTED,
            Json(json!({ "id": id, "trace_id": trace_id })),
        )
            .into_response(),
        Admission::Duplicate => (
            StatusCode::OK,
            Json(json!({ "duplicate": true, "event_id": event_id })),
        )
            .into_response(),
    })
}

pub async fn post_broadcast(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, IngestError> {
    let body = admit_request(&state, &headers, body)?;
    let broadcast: Broadcast = parse_json(&body)?;
    broadcast.check(
        state.settings.broadcast_max_chats,
        state.settings.max_text_chars,
    )?;
    state.check_backlog()?;
    let broadcast_id = ulid::Ulid::new().to_string();
    let trace_id = trace_id(&headers);
    let raw = raw_event(&body);
    let received_at_ms = now_ms();
    let (mut accepted, mut duplicates) = (0usize, 0usize);
    for chats in broadcast.chats.chunks(BROADCAST_CHUNK) {
        let submissions: Vec<Submission> = chats
            .iter()
            .map(|chat| Submission {
                message: broadcast.message_for(
                    chat,
                    &broadcast_id,
                    Stamp {
                        id: ulid::Ulid::new().to_string(),
                        received_at_ms,
                        trace_id: trace_id.clone(),
                        raw: Some(raw.clone()),
                    },
                ),
                event_id: broadcast.event_id_for(chat),
                transcript: false,
            })
            .collect();
        for admission in state.inbox.admit(&submissions).await? {
            match admission {
                Admission::Added(_) => accepted += 1,
                Admission::Duplicate => duplicates += 1,
            }
        }
    }
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({
            "id": broadcast_id,
            "trace_id": trace_id,
            "accepted": accepted,
            "duplicates": duplicates,
        })),
    )
        .into_response())
}
