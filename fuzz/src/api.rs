//! The generic API (`POST /v1/messages`, `POST /v1/broadcast`, its bearer
//! token and trace headers) and the web chat's client frames.

use crate::check;
use axum::http::{header, HeaderMap, HeaderValue};
use botline_ingest::auth::JwtAuth;
use botline_ingest::config::IngestSettings;
use botline_ingest::generic::{
    caller_trace_id, is_platform_name, parse_json, raw_event, Broadcast, GenericMessage, Stamp,
};
use botline_shared::config::Settings;
use std::sync::OnceLock;

/// `[ingest]` as shipped.
fn settings() -> &'static IngestSettings {
    static SETTINGS: OnceLock<IngestSettings> = OnceLock::new();
    SETTINGS.get_or_init(|| {
        IngestSettings::load(&Settings::from_overlay(None).expect("the defaults load"))
            .expect("the defaults are valid")
    })
}

fn stamp(body: &[u8]) -> Stamp {
    Stamp {
        id: "01J0000000000000000000000A".into(),
        received_at_ms: crate::platforms::NOW_MS,
        trace_id: "fuzz".into(),
        raw: Some(raw_event(body)),
    }
}

/// The input as both bodies, as a bearer token and as trace headers.
pub fn generic(data: &[u8]) {
    let settings = settings();
    let max_text = settings.max_text_chars;
    match parse_json::<GenericMessage>(data).and_then(|message| {
        let event_id = message.checked_event_id()?.map(str::to_owned);
        Ok((event_id, message.into_unified(stamp(data), max_text)?))
    }) {
        Ok((event_id, message)) => {
            check::report(|| format!("message {:?}", message.text));
            assert!(is_platform_name(&message.platform), "{message:?}");
            assert!(message.text.chars().count() <= max_text);
            assert!(event_id.is_none_or(|id| !id.trim().is_empty()));
            check::message(&message);
        }
        Err(error) => check::refusal(&error),
    }
    match parse_json::<Broadcast>(data).and_then(|broadcast| {
        broadcast.check(settings.broadcast_max_chats, max_text)?;
        Ok(broadcast)
    }) {
        Ok(broadcast) => {
            check::report(|| format!("broadcast to {} chats", broadcast.chats.len()));
            assert!(
                !broadcast.chats.is_empty()
                    && broadcast.chats.len() <= settings.broadcast_max_chats
            );
            for chat in &broadcast.chats {
                let message = broadcast.message_for(chat, "broadcast-1", stamp(data));
                assert_eq!(message.platform, chat.platform);
                check::message(&message);
                broadcast.event_id_for(chat);
            }
        }
        Err(error) => check::refusal(&error),
    }
    let text = String::from_utf8_lossy(data);
    for (x_trace_id, traceparent) in [(Some(text.as_ref()), None), (None, Some(text.as_ref()))] {
        if let Some(id) = caller_trace_id(x_trace_id, traceparent) {
            assert!(!id.is_empty() && id.len() <= 128, "{id:?}");
            assert!(id.bytes().all(|b| b.is_ascii_graphic()), "{id:?}");
        }
    }
    bearer(data);
}

/// `Authorization: Bearer <input>`: a token not signed with the secret is
/// refused (the fuzzer cannot sign), as a 401 that says why.
fn bearer(data: &[u8]) {
    static AUTH: OnceLock<JwtAuth> = OnceLock::new();
    let auth = AUTH.get_or_init(|| JwtAuth::new("fuzz-jwt-secret-0123456789", Some("botline")));
    let mut value = b"Bearer ".to_vec();
    value.extend(data);
    let Ok(value) = HeaderValue::from_bytes(&value) else {
        return;
    };
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, value);
    match auth.check(&headers) {
        Ok(()) => panic!("a token the fuzzer made was accepted"),
        Err(error) => {
            assert_eq!(error.status().as_u16(), 401, "{error}");
            check::refusal(&error);
        }
    }
}

/// A frame from the web chat page (WebSocket text frames are UTF-8).
pub fn webchat(data: &[u8]) {
    let Ok(frame) = std::str::from_utf8(data) else {
        return;
    };
    let max_text = settings().max_text_chars;
    match botline_ingest::webchat::read_frame("chat-1", frame, max_text) {
        Ok(submission) => {
            let message = &submission.message;
            check::report(|| format!("message {:?} from {:?}", message.text, message.sender.name));
            assert!(submission.transcript);
            assert!(submission
                .event_id
                .as_deref()
                .is_some_and(|id| id.starts_with("chat-1:") && id.len() > "chat-1:".len()));
            assert_eq!(message.platform, "web");
            assert!(!message.text.trim().is_empty());
            assert!(message.text.chars().count() <= max_text);
            let name = &message.sender.name;
            assert!(
                !name.is_empty() && name.chars().count() <= botline_ingest::webchat::MAX_NAME_CHARS
            );
            assert!(!name.chars().any(char::is_control), "{name:?}");
            check::message(message);
        }
        Err(error) => check::refusal(&error),
    }
}
