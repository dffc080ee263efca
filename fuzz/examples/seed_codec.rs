//! Writes the seeds of the `codec` target: one entry body of each record
//! kind, encoded by the codec itself, behind the selector byte that decodes
//! it (see src/codec.rs). `cargo run --example seed_codec -- fuzz/corpus/codec`

use botline_shared::codec::{self, Record};
use botline_shared::message::{
    ClassifiedMessage, DeadLetter, Receipt, Reply, Turn, UnifiedMessage,
};
use serde_json::json;

fn main() {
    let dir = std::env::args().nth(1).expect("usage: seed_codec <dir>");
    std::fs::create_dir_all(&dir).expect("the corpus directory");
    let message = json!({
        "id": "01J0000000000000000000000A", "platform": "telegram", "bot": "999",
        "chat": {"id": "-100123", "kind": "group"}, "thread": "7",
        "sender": {"id": "42", "name": "小明 🐼", "is_bot": false},
        "text": "@999 紧急！服务器宕机了\nline two",
        "mentions": {"users": ["999"], "bot": true},
        "attachments": [{"kind": "image", "url": null, "file_id": "AgAD", "mime": "image/png", "size": 12, "name": null}],
        "reply_to": "41", "platform_message_id": "43", "platform_data": {"name:42": "Ann"},
        "platform_ts_ms": 1700000000000i64, "received_at_ms": 1700000000123i64, "trace_id": "t",
        "origin": {"kind": "user"}, "replay": false, "raw": "{\"update_id\":1}"
    });
    let chat = json!({"id": "-100123", "kind": "group"});
    let write = |name: &str, selector: u8, body: Vec<u8>| {
        let mut data = vec![selector];
        data.extend(body);
        std::fs::write(format!("{dir}/{name}"), data).expect("a seed");
    };
    write("message", 0, body::<UnifiedMessage>(message.clone()));
    write(
        "message_without_v",
        0x08,
        body::<UnifiedMessage>(message.clone()),
    );
    write(
        "message_unknown_v",
        0x10,
        body::<UnifiedMessage>(message.clone()),
    );
    write(
        "message_extra_fields",
        0x40,
        body::<UnifiedMessage>(message.clone()),
    );
    let scheduled = {
        let mut scheduled = message.clone();
        scheduled["origin"] = json!({"kind": "scheduled", "job": "daily"});
        scheduled["attachments"] = json!([]);
        scheduled
    };
    write("message_scheduled", 0, body::<UnifiedMessage>(scheduled));
    write(
        "classified",
        1,
        body::<ClassifiedMessage>(json!({
            "message": message, "priority": "urgent",
            "intent": {"name": "outage", "confidence": 0.75}, "audit": ["bad"],
            "faq": {"question": "When are you open?", "answer": "9 to 6", "score": 0.5}
        })),
    );
    write(
        "reply",
        2,
        body::<Reply>(json!({
            "id": "r1", "in_reply_to": "m1", "platform": "slack", "bot": "B1", "chat": chat,
            "thread": "1.2", "reply_to": null, "text": "On it.", "mentions": ["U1"],
            "attachments": [{"kind": "file", "url": "https://example.com/a.pdf", "file_id": null, "mime": null, "size": null, "name": "a.pdf"}],
            "platform_data": {}, "priority": "normal", "received_at_ms": 1, "created_at_ms": 2,
            "trace_id": "t", "replay": true
        })),
    );
    write(
        "receipt",
        3,
        body::<Receipt>(json!({
            "reply_id": "r1", "message_id": "m1", "platform": "slack", "chat": "C1",
            "latency_ms": 120, "attempts": 2, "platform_message_id": "1.3",
            "delivered_at_ms": 3, "trace_id": "t"
        })),
    );
    write(
        "turn",
        4,
        body::<Turn>(json!({
            "role": "bot", "speaker_id": "bot", "speaker_name": "Bot", "text": "ok",
            "message_id": "m", "at_ms": 3, "attachments": []
        })),
    );
    write(
        "dead_letter",
        5,
        body::<DeadLetter>(json!({
            "stage": "classify", "stream": "{botline}:in", "entry_id": "1-0", "error": "garbage",
            "deliveries": 4, "fields": [["body", [255, 0, 1]]], "at_ms": 5
        })),
    );
    write(
        "built_message",
        6,
        b"text\0name\0chat\0thread\0key\0value\0https://example.com/a".to_vec(),
    );
}

/// The `body` field of the entry of the record `value` describes.
fn body<R: Record>(value: serde_json::Value) -> Vec<u8> {
    let record: R = serde_json::from_value(value).expect("a record");
    let fields = codec::encode(&record);
    fields
        .into_iter()
        .find(|(name, _)| name == "body")
        .expect("a body")
        .1
}
