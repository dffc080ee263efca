//! `botline peek`: entries decoded to JSON by the kind of record their
//! stream holds. An entry that does not decode is shown with its raw fields
//! and the error, never dropped and never a crash.

use super::{Ops, OpsError};
use crate::codec::{self, Record};
use crate::message::{ClassifiedMessage, DeadLetter, Receipt, Reply, Turn, UnifiedMessage};
use crate::redis_conn::RawEntry;
use serde_json::{json, Map, Value as Json};

/// The record a stream holds, known from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `in`
    Message,
    /// `q`
    Classified,
    /// `out:*`
    Reply,
    /// `delivered`
    Receipt,
    /// `dead`
    Dead,
    /// `ctx:*`, `web:*`
    Turn,
}

impl Kind {
    /// From the short name (`in`, `q`, …); `None` for keys that are
    /// not streams of records.
    pub fn of(short: &str) -> Option<Kind> {
        let head = short.split(':').next().unwrap_or(short);
        match head {
            "in" if short == "in" => Some(Kind::Message),
            "q" => Some(Kind::Classified),
            "out" => Some(Kind::Reply),
            "delivered" if short == "delivered" => Some(Kind::Receipt),
            "dead" if short == "dead" => Some(Kind::Dead),
            "ctx" | "web" if short != "web:notify" => Some(Kind::Turn),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Message => "UnifiedMessage",
            Kind::Classified => "ClassifiedMessage",
            Kind::Reply => "Reply",
            Kind::Receipt => "Receipt",
            Kind::Dead => "DeadLetter",
            Kind::Turn => "Turn",
        }
    }
}

/// Where `peek` starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeekRange {
    /// `count` entries from this id on (`-`: the oldest).
    From { id: String, count: usize },
    /// The newest `count` entries.
    Last { count: usize },
}

impl Ops {
    /// Entries of `stream` as JSON, oldest first: of one partition's
    /// stream if named in full, else of every partition's, merged in entry
    /// id order (each entry's `partition` says whose).
    pub async fn peek(&self, stream: &str, range: &PeekRange) -> Result<Vec<Json>, OpsError> {
        let mut entries = Vec::new();
        let mut short = String::new();
        for key in self.resolve(stream) {
            short = self.streams.short(&key).0.to_string();
            entries.extend(match range {
                PeekRange::From { id, count } => self.range(&key, id, "+", *count).await?,
                PeekRange::Last { count } => self.last(&key, *count).await?,
            });
        }
        // Every partition's entries, in time order, as many as asked.
        entries.sort_by_key(|entry| crate::redis_conn::id_order(&entry.id));
        match range {
            PeekRange::From { count, .. } => entries.truncate(*count),
            PeekRange::Last { count } => {
                entries.drain(..entries.len().saturating_sub(*count));
            }
        }
        Ok(entries
            .iter()
            .map(|entry| {
                let mut json = decode_entry(&self.streams, &short, entry);
                if let Some(p) = self.streams.short(&entry.stream).1 {
                    json["partition"] = json!(p);
                }
                json
            })
            .collect())
    }
}

/// `{"id", "stream", "kind", "record"}`, or `{"id", "stream", "fields",
/// "error"}` when the entry does not decode. A dead letter also gets its
/// original entry decoded, as `original`.
pub fn decode_entry(streams: &crate::streams::Streams, short: &str, entry: &RawEntry) -> Json {
    let Some(fields) = &entry.fields else {
        return json!({"id": entry.id, "stream": short, "error": "entry deleted"});
    };
    let Some(kind) = Kind::of(short) else {
        return json!({"id": entry.id, "stream": short, "fields": raw_fields(fields),
                      "error": "no record kind is known for this stream"});
    };
    let decoded = match kind {
        Kind::Message => record::<UnifiedMessage>(fields),
        Kind::Classified => record::<ClassifiedMessage>(fields),
        Kind::Reply => record::<Reply>(fields),
        Kind::Receipt => record::<Receipt>(fields),
        Kind::Turn => record::<Turn>(fields),
        Kind::Dead => {
            return match codec::decode::<DeadLetter>(borrowed(fields)) {
                Ok(letter) => dead_letter(streams, &entry.id, short, &letter),
                Err(error) => undecodable(&entry.id, short, fields, &error.to_string()),
            }
        }
    };
    match decoded {
        Ok(record) => {
            json!({"id": entry.id, "stream": short, "kind": kind.name(), "record": record})
        }
        Err(error) => undecodable(&entry.id, short, fields, &error),
    }
}

fn dead_letter(
    streams: &crate::streams::Streams,
    id: &str,
    short: &str,
    letter: &DeadLetter,
) -> Json {
    let original_fields: Vec<(String, Vec<u8>)> = letter
        .fields
        .iter()
        .map(|(name, value)| (name.clone(), value.to_vec()))
        .collect();
    let original = decode_entry(
        streams,
        streams.short(&letter.stream).0,
        &RawEntry {
            stream: letter.stream.clone(),
            id: letter.entry_id.clone(),
            fields: Some(original_fields),
        },
    );
    json!({
        "id": id,
        "stream": short,
        "kind": Kind::Dead.name(),
        "record": super::dead::letter_json(letter),
        "original": original,
    })
}

fn undecodable(id: &str, short: &str, fields: &[(String, Vec<u8>)], error: &str) -> Json {
    json!({"id": id, "stream": short, "fields": raw_fields(fields), "error": error})
}

fn borrowed(fields: &[(String, Vec<u8>)]) -> impl Iterator<Item = (&str, &[u8])> {
    fields
        .iter()
        .map(|(name, value)| (name.as_str(), value.as_slice()))
}

fn record<R: Record>(fields: &[(String, Vec<u8>)]) -> Result<Json, String> {
    let record: R = codec::decode(borrowed(fields)).map_err(|error| error.to_string())?;
    serde_json::to_value(&record).map_err(|error| error.to_string())
}

/// Each field as text when it is UTF-8, else as `0x…` hex.
fn raw_fields(fields: &[(String, Vec<u8>)]) -> Json {
    let mut map = Map::new();
    for (name, value) in fields {
        let shown = match std::str::from_utf8(value) {
            Ok(text) => text.to_string(),
            Err(_) => {
                let mut hex = String::with_capacity(2 + value.len() * 2);
                hex.push_str("0x");
                for byte in value {
                    hex.push_str(&format!("{byte:02x}"));
                }
                hex
            }
        };
        map.insert(name.clone(), Json::String(shown));
    }
    Json::Object(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_follow_stream_names() {
        for (short, kind) in [
            ("in", Some(Kind::Message)),
            ("q", Some(Kind::Classified)),
            ("out:web", Some(Kind::Reply)),
            ("delivered", Some(Kind::Receipt)),
            ("dead", Some(Kind::Dead)),
            ("ctx:web:c1", Some(Kind::Turn)),
            ("web:c1", Some(Kind::Turn)),
            ("web:notify", None),
            ("inbox", None),
            ("dedup:web:e1", None),
        ] {
            assert_eq!(Kind::of(short), kind, "{short}");
        }
    }
}
