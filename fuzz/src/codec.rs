//! The stream entry codec. The input's first byte chooses what is decoded
//! and which fields the entry has; the rest is the `body` field.
//!
//! Selector bits: 0-2 the record kind ([`KINDS`]; 6 and 7 build a message
//! from the bytes instead and round-trip it), 3 leaves `v` out, 4 writes an
//! unknown `v`, 5 leaves `body` out, 6 adds plain fields a reader ignores.

use crate::check;
use botline_shared::codec::{self, Record};
use botline_shared::message::{
    Attachment, AttachmentKind, Chat, ChatKind, ClassifiedMessage, DeadLetter, Mentions, Origin,
    Receipt, Reply, Sender, Turn, UnifiedMessage,
};

/// The records that live in streams, by selector.
pub const KINDS: [&str; 6] = [
    "message",
    "classified",
    "reply",
    "receipt",
    "turn",
    "dead_letter",
];

pub fn run(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let kind = selector & 0x07;
    if kind >= 6 {
        return check::round_trip(&message_from(body));
    }
    let with_v = selector & 0x08 == 0;
    let known_v = selector & 0x10 == 0;
    let with_body = selector & 0x20 == 0;
    let mut fields: Vec<(&str, &[u8])> = Vec::new();
    if selector & 0x40 != 0 {
        fields.extend([("id", b"m1".as_slice()), ("text", body)]);
    }
    if with_v {
        fields.push(("v", if known_v { b"1" } else { b"2" }));
    }
    if with_body {
        fields.push(("body", body));
    }
    let decodable = with_v && known_v && with_body;
    match kind {
        0 => decoded::<UnifiedMessage>(&fields, decodable),
        1 => decoded::<ClassifiedMessage>(&fields, decodable),
        2 => decoded::<Reply>(&fields, decodable),
        3 => decoded::<Receipt>(&fields, decodable),
        4 => decoded::<Turn>(&fields, decodable),
        _ => decoded::<DeadLetter>(&fields, decodable),
    }
}

/// Decode `fields` as an `R`: an entry without `v = 1` and `body` is refused
/// (not transiently: the runner dead-letters it); one that decodes comes back
/// the same through the codec.
fn decoded<R: Record + PartialEq + std::fmt::Debug>(fields: &[(&str, &[u8])], decodable: bool) {
    match codec::decode::<R>(fields.iter().copied()) {
        Ok(record) => {
            check::report(|| format!("decoded a {}", std::any::type_name::<R>()));
            assert!(
                decodable,
                "decoded an entry without v = 1 and a body: {record:?}"
            );
            check::round_trip(&record);
        }
        Err(error) => {
            check::report(|| format!("refused: {error}"));
            assert!(!error.is_transient(), "{error}");
            assert!(!error.to_string().is_empty());
        }
    }
}

/// A message whose strings come from `bytes`, split at NUL bytes.
pub fn message_from(bytes: &[u8]) -> UnifiedMessage {
    let text = String::from_utf8_lossy(bytes);
    let mut parts = text.split('\0').map(str::to_owned);
    let mut next = || parts.next().unwrap_or_default();
    let (body, name, chat, thread, key, value, url) =
        (next(), next(), next(), next(), next(), next(), next());
    let size = bytes.len() as u64;
    UnifiedMessage {
        id: "01J0000000000000000000000A".into(),
        platform: "web".into(),
        bot: "botline".into(),
        chat: Chat {
            id: chat,
            kind: [ChatKind::Direct, ChatKind::Group, ChatKind::Channel][bytes.len() % 3],
        },
        thread: Some(thread).filter(|thread| !thread.is_empty()),
        sender: Sender {
            id: name.chars().rev().collect(),
            name,
            is_bot: !size.is_multiple_of(2),
        },
        text: body,
        mentions: Mentions {
            users: vec![key.clone()],
            bot: size.is_multiple_of(5),
        },
        attachments: vec![Attachment {
            kind: AttachmentKind::File,
            url: Some(url),
            file_id: None,
            mime: None,
            size: Some(size.wrapping_mul(0x9E37_79B9_7F4A_7C15)),
            name: Some(value.clone()),
        }],
        reply_to: None,
        platform_message_id: Some(value.clone()),
        platform_data: [(key, value)].into_iter().collect(),
        platform_ts_ms: Some(-(size as i64)),
        received_at_ms: i64::MAX - size as i64,
        trace_id: "trace".into(),
        origin: Origin::Scheduled {
            job: text.len().to_string(),
        },
        replay: size.is_multiple_of(3),
        raw: Some(text.into_owned()),
    }
}
