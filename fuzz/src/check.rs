//! The properties every target checks of what it got back.

use botline_ingest::error::IngestError;
use botline_ingest::platforms::Hook;
use botline_shared::codec::{self, Record, SCHEMA_VERSION, TEXT_PREVIEW_CHARS};
use botline_shared::message::{UnifiedMessage, RAW_EVENT_LIMIT};
use std::sync::OnceLock;

/// Whether to say what each input became (`BOTLINE_FUZZ_VERBOSE=1`, for
/// `scripts/fuzz replay`).
fn verbose() -> bool {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("BOTLINE_FUZZ_VERBOSE").is_some())
}

/// Say what an input became, when asked to.
pub fn report(outcome: impl FnOnce() -> String) {
    if verbose() {
        eprintln!("  -> {}", outcome());
    }
}

/// A refusal of input: a client error with something to say, never a
/// server error (the targets touch no storage).
pub fn refusal(error: &IngestError) {
    report(|| format!("refused {}: {error}", error.status().as_u16()));
    client_error(error);
}

fn client_error(error: &IngestError) {
    let status = error.status().as_u16();
    assert!(
        matches!(status, 400 | 401 | 404 | 413 | 422),
        "input refused as {status}: {error}"
    );
    assert!(!error.to_string().is_empty(), "a refusal that says nothing");
}

/// A refusal of a request that failed verification: 401.
pub fn unverified<T: std::fmt::Debug>(outcome: Result<T, IngestError>) {
    match outcome {
        Err(error @ IngestError::Unverified { .. }) => client_error(&error),
        other => {
            panic!("a request with a wrong signature was not refused as unverified: {other:?}")
        }
    }
}

/// What a platform made of a request: answered 200, each message
/// `platform`'s and able to travel the streams.
pub fn hook(platform: &str, outcome: Result<Hook, IngestError>) {
    let hook = match outcome {
        Ok(hook) => hook,
        Err(error) => return refusal(&error),
    };
    report(|| match &hook {
        Hook::Answer(answer) => format!("answered {:?}", answer.body),
        Hook::Ignored { kind, .. } => format!("ignored as {kind}"),
        Hook::Events { events, .. } => format!(
            "{} message(s): {:?}",
            events.len(),
            events
                .iter()
                .map(|event| &event.message.text)
                .collect::<Vec<_>>()
        ),
    });
    let answer = match hook {
        Hook::Answer(answer) | Hook::Ignored { answer, .. } => answer,
        Hook::Events { events, answer } => {
            for event in &events {
                assert_eq!(event.message.platform, platform, "{event:?}");
                message(&event.message);
            }
            answer
        }
    };
    assert_eq!(answer.status.as_u16(), 200, "{answer:?}");
}

/// A message ingest made: within its limits, and the same after the codec.
pub fn message(message: &UnifiedMessage) {
    if let Some(raw) = &message.raw {
        assert!(
            raw.len() <= RAW_EVENT_LIMIT,
            "raw event of {} bytes",
            raw.len()
        );
    }
    round_trip(message);
}

/// `decode(encode(record)) == record`, the entry's `v` first and `body`
/// last, and the plain `text` field one short line.
pub fn round_trip<R: Record + PartialEq + std::fmt::Debug>(record: &R) {
    let fields = codec::encode(record);
    assert_eq!(fields[0].0, "v");
    assert_eq!(fields[0].1, SCHEMA_VERSION.as_bytes());
    assert_eq!(fields.last().map(|(name, _)| name.as_str()), Some("body"));
    if let Some((_, text)) = fields.iter().find(|(name, _)| name == "text") {
        let text = std::str::from_utf8(text).expect("the plain text field is UTF-8");
        assert!(text.chars().count() <= TEXT_PREVIEW_CHARS + 1, "{text:?}");
        assert!(!text.chars().any(char::is_control), "{text:?}");
    }
    let decoded: R = codec::decode(
        fields
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_slice())),
    )
    .unwrap_or_else(|error| panic!("an encoded record does not decode: {error}: {record:?}"));
    // A NaN score is not equal to itself; the bytes still must be.
    #[allow(clippy::eq_op)]
    if record == record {
        assert_eq!(&decoded, record);
    }
    assert_eq!(codec::encode(&decoded), fields, "encoding is not stable");
}
