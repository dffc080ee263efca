//! Properties of the stream codec over generated input: every record comes
//! back as it went in, whatever its text (any Unicode, control characters,
//! empty, long); the plain `text` field is one short line; and no bytes at
//! all, in any field, make `decode` panic — they make an error, which the
//! runner turns into a dead letter.

use botline_shared::codec::{self, TEXT_PREVIEW_CHARS};
use botline_shared::message::{
    Attachment, AttachmentKind, Chat, ChatKind, ClassifiedMessage, Intent, Mentions, Priority,
    Reply, Role, Turn, UnifiedMessage,
};
use botline_shared::testing::sample_message;
use proptest::prelude::*;

fn chat_kind() -> impl Strategy<Value = ChatKind> {
    prop_oneof![
        Just(ChatKind::Direct),
        Just(ChatKind::Group),
        Just(ChatKind::Channel)
    ]
}

fn attachment_kind() -> impl Strategy<Value = AttachmentKind> {
    prop_oneof![
        Just(AttachmentKind::Image),
        Just(AttachmentKind::Audio),
        Just(AttachmentKind::Video),
        Just(AttachmentKind::File),
        Just(AttachmentKind::Sticker),
    ]
}

prop_compose! {
    fn attachment()(
        kind in attachment_kind(),
        url in proptest::option::of(any::<String>()),
        file_id in proptest::option::of(any::<String>()),
        mime in proptest::option::of("[a-z]{1,8}/[a-z0-9.+-]{1,12}"),
        size in proptest::option::of(any::<u64>()),
        name in proptest::option::of(any::<String>()),
    ) -> Attachment {
        Attachment { kind, url, file_id, mime, size, name }
    }
}

prop_compose! {
    fn message()(
        text in any::<String>(),
        chat in "[a-z0-9:_-]{1,40}",
        kind in chat_kind(),
        sender in any::<String>(),
        mentions in proptest::collection::vec(any::<String>(), 0..4),
        thread in proptest::option::of(any::<String>()),
        data in proptest::collection::btree_map(any::<String>(), any::<String>(), 0..3),
        attachments in proptest::collection::vec(attachment(), 0..3),
        received in any::<i64>(),
    ) -> UnifiedMessage {
        let mut message = sample_message(0, &text);
        message.chat = Chat { id: chat, kind };
        message.sender.name = sender;
        message.mentions = Mentions { users: mentions, bot: kind == ChatKind::Direct };
        message.thread = thread;
        message.platform_data = data;
        message.attachments = attachments;
        message.received_at_ms = received;
        message
    }
}

/// A reply to `message` as respond writes it.
fn reply_to(message: &UnifiedMessage, text: String, attachments: Vec<Attachment>) -> Reply {
    Reply {
        id: message.id.clone(),
        in_reply_to: message.id.clone(),
        platform: message.platform.clone(),
        bot: message.bot.clone(),
        chat: message.chat.clone(),
        thread: message.thread.clone(),
        reply_to: message.platform_message_id.clone(),
        text,
        mentions: message.mentions.users.clone(),
        attachments,
        platform_data: message.platform_data.clone(),
        priority: Priority::Normal,
        received_at_ms: message.received_at_ms,
        created_at_ms: message.received_at_ms,
        trace_id: message.trace_id.clone(),
        replay: false,
    }
}

#[test]
fn a_reply_with_attachments_says_how_many_in_plain_sight() {
    let names = |reply: &Reply| -> Vec<String> {
        codec::encode(reply)
            .into_iter()
            .map(|(name, _)| name)
            .collect()
    };
    let message = sample_message(0, "hi");
    let plain = reply_to(&message, "look".into(), vec![]);
    assert_eq!(
        names(&plain),
        ["v", "id", "platform", "chat", "text", "prio", "trace", "body"]
    );
    let pictures = vec![
        Attachment::image("https://example.com/a.png", Some("a".into())),
        Attachment::image("https://example.com/b.png", None),
    ];
    let with = reply_to(&message, "look".into(), pictures);
    let fields = codec::encode(&with);
    let count = fields
        .iter()
        .find(|(name, _)| name == "attachments")
        .unwrap();
    assert_eq!(count.1, b"2");
    round_trip(&with);
}

fn round_trip<R: codec::Record + PartialEq + std::fmt::Debug>(record: &R) {
    let fields = codec::encode(record);
    let decoded: R = codec::decode(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
        .expect("an encoded record decodes");
    assert_eq!(&decoded, record);
}

proptest! {
    #[test]
    fn messages_come_back_as_they_went_in(message in message()) {
        round_trip(&message);
    }

    #[test]
    fn classified_messages_and_replies_come_back_too(
        message in message(),
        confidence in 0.0f32..=1.0,
        reply_text in any::<String>(),
        reply_attachments in proptest::collection::vec(attachment(), 0..4),
    ) {
        round_trip(&ClassifiedMessage {
            intent: Intent { name: "help".into(), confidence },
            priority: Priority::Urgent,
            audit: vec!["x".into()],
            faq: None,
            message: message.clone(),
        });
        round_trip(&reply_to(&message, reply_text, reply_attachments));
        round_trip(&Turn::from_user(&message));
        round_trip(&Turn { role: Role::Bot, ..Turn::from_user(&message) });
    }

    #[test]
    fn replies_written_before_attachments_existed_still_decode(
        message in message(),
        reply_text in any::<String>(),
    ) {
        // A reply entry as the previous version wrote it: no `attachments`.
        #[derive(serde::Serialize)]
        struct OldReply<'a> {
            id: &'a str,
            in_reply_to: &'a str,
            platform: &'a str,
            bot: &'a str,
            chat: &'a Chat,
            thread: &'a Option<String>,
            reply_to: Option<String>,
            text: &'a str,
            mentions: &'a [String],
            platform_data: &'a std::collections::BTreeMap<String, String>,
            priority: Priority,
            received_at_ms: i64,
            created_at_ms: i64,
            trace_id: &'a str,
            replay: bool,
        }
        let old = OldReply {
            id: &message.id,
            in_reply_to: &message.id,
            platform: &message.platform,
            bot: &message.bot,
            chat: &message.chat,
            thread: &message.thread,
            reply_to: None,
            text: &reply_text,
            mentions: &message.mentions.users,
            platform_data: &message.platform_data,
            priority: Priority::Batch,
            received_at_ms: message.received_at_ms,
            created_at_ms: 1,
            trace_id: &message.trace_id,
            replay: true,
        };
        let body = rmp_serde::to_vec_named(&old).unwrap();
        let fields = [("v", b"1".as_slice()), ("body", body.as_slice())];
        let reply: Reply = codec::decode(fields).expect("an old reply decodes");
        prop_assert!(reply.attachments.is_empty());
        prop_assert_eq!(&reply.text, &reply_text);
        prop_assert!(reply.replay);
    }

    #[test]
    fn the_plain_text_field_is_one_short_line(text in any::<String>()) {
        let fields = codec::encode(&sample_message(0, &text));
        let shown = fields.iter().find(|(name, _)| name == "text").map(|(_, value)| value).unwrap();
        let shown = String::from_utf8(shown.clone()).unwrap();
        prop_assert!(!shown.contains('\n') && !shown.contains('\r'));
        prop_assert!(shown.chars().count() <= TEXT_PREVIEW_CHARS + 1);
    }

    #[test]
    fn no_bytes_make_decode_panic(
        fields in proptest::collection::vec(
            (prop_oneof![Just("v".to_string()), Just("body".to_string()), "[a-z]{1,5}"],
             proptest::collection::vec(any::<u8>(), 0..200)),
            0..6,
        )
    ) {
        let decoded = codec::decode::<UnifiedMessage>(
            fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())),
        );
        // Random bytes are (almost) never a valid message; what matters is
        // that they come back as an error rather than a panic.
        if let Ok(message) = decoded {
            round_trip(&message);
        }
    }

    #[test]
    fn a_damaged_body_is_an_error_not_a_panic(
        message in message(),
        cut in any::<prop::sample::Index>(),
        flip in any::<prop::sample::Index>(),
    ) {
        let mut fields = codec::encode(&message);
        let body = &mut fields.last_mut().unwrap().1;
        let at = flip.index(body.len());
        body[at] ^= 0x5a;
        let end = cut.index(body.len());
        body.truncate(end);
        let _ = codec::decode::<UnifiedMessage>(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())));
    }
}
