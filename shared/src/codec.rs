//! A record becomes a stream entry of a few plain fields for people reading
//! with `redis-cli` (`v`, `id`, `platform`, `chat`, `text`, …) and one
//! MessagePack field, `body`, which is the truth. Readers refuse a `v` they
//! do not know; the runner turns that refusal into a dead letter.

use crate::message::{ClassifiedMessage, DeadLetter, Receipt, Reply, Turn, UnifiedMessage};
use crate::Error;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The schema version written in every entry's `v` field.
pub const SCHEMA_VERSION: &str = "1";

/// How many characters of text the plain `text` field shows.
pub const TEXT_PREVIEW_CHARS: usize = 80;

/// A stream entry's fields, in the order they are written.
pub type Fields = Vec<(String, Vec<u8>)>;

/// A record that can live in a stream.
pub trait Record: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The plain fields shown to `redis-cli` readers, besides `v` and `body`.
    fn plain_fields(&self) -> Vec<(&'static str, String)>;
}

/// The entry for `record`: `v`, the plain fields, then `body`.
pub fn encode<R: Record>(record: &R) -> Fields {
    let body = rmp_serde::to_vec_named(record).expect("records serialize to MessagePack");
    let mut fields: Fields = Vec::with_capacity(8);
    fields.push(("v".into(), SCHEMA_VERSION.as_bytes().to_vec()));
    for (name, value) in record.plain_fields() {
        fields.push((name.into(), value.into_bytes()));
    }
    fields.push(("body".into(), body));
    fields
}

/// The record in an entry's fields. Only `v` and `body` are read.
pub fn decode<'a, R: Record>(
    fields: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<R, Error> {
    let mut version = None;
    let mut body = None;
    for (name, value) in fields {
        match name {
            "v" => version = Some(value),
            "body" => body = Some(value),
            _ => {}
        }
    }
    let version = version.ok_or(Error::MissingField("v"))?;
    if version != SCHEMA_VERSION.as_bytes() {
        return Err(Error::UnknownVersion(
            String::from_utf8_lossy(version).into_owned(),
        ));
    }
    let body = body.ok_or(Error::MissingField("body"))?;
    rmp_serde::from_slice(body).map_err(|error| Error::Garbage(error.to_string()))
}

/// The first [`TEXT_PREVIEW_CHARS`] characters of `text` on one line.
pub fn preview(text: &str) -> String {
    let mut shown: String = text
        .chars()
        .take(TEXT_PREVIEW_CHARS)
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.chars().nth(TEXT_PREVIEW_CHARS).is_some() {
        shown.push('…');
    }
    shown
}

impl Record for UnifiedMessage {
    fn plain_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.id.clone()),
            ("platform", self.platform.clone()),
            ("chat", self.chat.id.clone()),
            ("sender", self.sender.id.clone()),
            ("text", preview(&self.text)),
            ("trace", self.trace_id.clone()),
        ]
    }
}

impl Record for ClassifiedMessage {
    fn plain_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = self.message.plain_fields();
        fields.push(("prio", self.priority.as_str().into()));
        fields.push(("intent", self.intent.name.clone()));
        fields
    }
}

impl Record for Reply {
    fn plain_fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("id", self.id.clone()),
            ("platform", self.platform.clone()),
            ("chat", self.chat.id.clone()),
            ("text", preview(&self.text)),
            ("prio", self.priority.as_str().into()),
            ("trace", self.trace_id.clone()),
        ];
        if !self.attachments.is_empty() {
            // How many, not the URLs: `body` has them.
            fields.push(("attachments", self.attachments.len().to_string()));
        }
        fields
    }
}

impl Record for Receipt {
    fn plain_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.reply_id.clone()),
            ("platform", self.platform.clone()),
            ("chat", self.chat.clone()),
            ("latency_ms", self.latency_ms.to_string()),
            ("trace", self.trace_id.clone()),
        ]
    }
}

impl Record for Turn {
    fn plain_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("id", self.message_id.clone()),
            ("sender", self.speaker_name.clone()),
            ("text", preview(&self.text)),
        ]
    }
}

impl Record for DeadLetter {
    fn plain_fields(&self) -> Vec<(&'static str, String)> {
        vec![
            ("stage", self.stage.clone()),
            ("stream", self.stream.clone()),
            ("id", self.entry_id.clone()),
            ("error", self.error.clone()),
            ("deliveries", self.deliveries.to_string()),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::*;

    fn message(text: &str) -> UnifiedMessage {
        UnifiedMessage {
            id: "01J0000000000000000000000A".into(),
            platform: "web".into(),
            bot: "botline".into(),
            chat: Chat {
                id: "c1".into(),
                kind: ChatKind::Group,
            },
            thread: Some("t".into()),
            sender: Sender {
                id: "u1".into(),
                name: "小明 🐼".into(),
                is_bot: false,
            },
            text: text.into(),
            mentions: Mentions {
                users: vec!["u2".into()],
                bot: true,
            },
            attachments: vec![Attachment {
                kind: AttachmentKind::Image,
                url: None,
                file_id: Some("f".into()),
                mime: Some("image/png".into()),
                size: Some(12),
                name: None,
            }],
            reply_to: None,
            platform_message_id: None,
            platform_data: Default::default(),
            platform_ts_ms: Some(1),
            received_at_ms: 2,
            trace_id: "trace".into(),
            origin: Origin::Scheduled {
                job: "daily".into(),
            },
            replay: false,
            raw: Some("{}".into()),
        }
    }

    fn round_trip<R: Record + PartialEq + std::fmt::Debug>(record: R) {
        let fields = encode(&record);
        let decoded: R = decode(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).unwrap();
        assert_eq!(decoded, record);
    }

    #[test]
    fn messages_round_trip_whatever_their_text() {
        for text in [
            "",
            "hello",
            "紧急！服务器宕机了",
            "emoji 🎉👩‍👩‍👧 and mixed 中文 text",
            "line\nbreaks\tand\0nul",
            &"长".repeat(100_000),
        ] {
            round_trip(message(text));
        }
    }

    #[test]
    fn every_record_kind_round_trips() {
        let classified = ClassifiedMessage {
            message: message("hi"),
            priority: Priority::Urgent,
            intent: Intent {
                name: "greeting".into(),
                confidence: 0.5,
            },
            audit: vec!["bad".into()],
            faq: Some(FaqMatch {
                question: "When are you open?".into(),
                answer: "9 to 6".into(),
                score: 0.9,
            }),
        };
        round_trip(classified);
        round_trip(Turn {
            role: Role::Bot,
            speaker_id: "bot".into(),
            speaker_name: "Bot".into(),
            text: "ok".into(),
            message_id: "m".into(),
            at_ms: 3,
            attachments: vec![Attachment::image("https://example.com/a.png", None)],
        });
        round_trip(DeadLetter {
            stage: "classify".into(),
            stream: "{botline}:in".into(),
            entry_id: "1-0".into(),
            error: "garbage".into(),
            deliveries: 4,
            fields: vec![("body".into(), serde_bytes::ByteBuf::from(vec![0xff, 0, 1]))],
            at_ms: 5,
        });
    }

    #[test]
    fn plain_fields_are_readable() {
        let fields = encode(&message(&"x".repeat(200)));
        let plain: Vec<(&str, String)> = fields
            .iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        assert_eq!(plain[0], ("v", "1".into()));
        assert!(plain.contains(&("chat", "c1".into())));
        let text = &plain.iter().find(|(k, _)| *k == "text").unwrap().1;
        assert_eq!(text.chars().count(), TEXT_PREVIEW_CHARS + 1);
        assert_eq!(fields.last().unwrap().0, "body");
    }

    fn check_refused(fields: &[(&str, &[u8])], expected: &str) {
        let error = decode::<UnifiedMessage>(fields.iter().copied()).unwrap_err();
        assert!(!error.is_transient());
        assert_eq!(error.to_string(), expected);
    }

    #[test]
    fn bad_entries_are_refused_with_their_cause() {
        let body = rmp_serde::to_vec_named(&message("hi")).unwrap();
        check_refused(
            &[("v", b"2"), ("body", &body)],
            "unknown schema version \"2\"",
        );
        check_refused(&[("body", &body)], "entry has no `v` field");
        check_refused(&[("v", b"1")], "entry has no `body` field");
        let garbage = check_garbage(&[("v", b"1"), ("body", b"\xc1\xff not msgpack")]);
        assert!(garbage.starts_with("body does not decode"), "{garbage}");
        let wrong_kind = rmp_serde::to_vec_named(&Turn {
            role: Role::User,
            speaker_id: "u".into(),
            speaker_name: "u".into(),
            text: "t".into(),
            message_id: "m".into(),
            at_ms: 1,
            attachments: vec![],
        })
        .unwrap();
        let wrong = check_garbage(&[("v", b"1"), ("body", &wrong_kind)]);
        assert!(wrong.starts_with("body does not decode"), "{wrong}");
    }

    fn check_garbage(fields: &[(&str, &[u8])]) -> String {
        decode::<UnifiedMessage>(fields.iter().copied())
            .unwrap_err()
            .to_string()
    }
}
