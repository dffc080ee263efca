//! `botline replay`: a range of a stream copied into a stage's input. Each
//! copy is marked `replay`, gets a new message (or reply) id so nothing
//! downstream takes it for the original (egress's `sent:<reply>` keys, the
//! platforms' idempotency keys), keeps the original's trace id, and carries
//! two plain fields saying what it copies: `replay_of` (the record's id) and
//! `replay_entry` (the stream entry's id). Only `XADD`: no group is touched,
//! and the groups read the copies as new entries.

use super::peek::Kind;
use super::{parse_bound, End, Ops, OpsError};
use crate::codec::{self, Fields};
use crate::message::{ClassifiedMessage, Reply, UnifiedMessage};
use crate::redis_conn::{id_order, RawEntry};

#[derive(Debug, Clone, Default)]
pub struct ReplayRequest {
    /// Short or full name of the stream to copy from (`in`, `q`, `out:*`).
    pub stream: String,
    /// Range bounds as given: ids, RFC 3339 times or ages (`-10m`).
    pub from: String,
    pub to: String,
    /// Only entries of this chat.
    pub chat: Option<String>,
    /// Where the copies go; default the stream they come from.
    pub into: Option<String>,
    /// Count what would be copied, copy nothing.
    pub dry_run: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReplayReport {
    /// The stream the copies went (or would go) to: its short name when
    /// every partition's, its full name when one.
    pub into: String,
    /// Entries in the range (of the chat, if one was given).
    pub matched: u64,
    /// Copies added (0 on a dry run).
    pub copied: u64,
    /// Entries in the range that do not decode, left alone.
    pub undecodable: u64,
}

impl Ops {
    /// Copies each partition's range into the same partition's `into`:
    /// a chat stays in its partition. A source named in full (one
    /// partition) goes into that partition's `into`, named short or in
    /// full; a source named short (every partition) needs `into` short.
    pub async fn replay(&self, request: &ReplayRequest) -> Result<ReplayReport, OpsError> {
        let sources = self.resolve(&request.stream);
        let short = |key: &str| self.streams.short(key).0.to_string();
        let kind = replayable(&short(&sources[0]), "<stream>")?;
        let intos = match &request.into {
            None => sources.clone(),
            Some(into) => {
                let mut intos = self.resolve(into);
                if sources.len() == 1 && intos.len() > 1 {
                    // The source's partition of a stream named short.
                    let p = self.streams.short(&sources[0]).1;
                    intos.retain(|key| self.streams.short(key).1 == p);
                }
                intos
            }
        };
        let into_kind = match intos.first() {
            Some(into) => replayable(&short(into), "--into")?,
            None => {
                return Err(OpsError::bad(
                    "--into",
                    format!("{} is no partition's stream", sources[0]),
                ))
            }
        };
        if into_kind != kind {
            return Err(OpsError::bad(
                "--into",
                format!(
                    "{} holds {} records, {} holds {}",
                    short(&intos[0]),
                    into_kind.name(),
                    short(&sources[0]),
                    kind.name()
                ),
            ));
        }
        if sources.len() != intos.len() {
            return Err(OpsError::bad(
                "--into",
                "a stream of every partition (named short) goes into one of every partition: \
                 name --into short too",
            ));
        }
        for (source, into) in sources.iter().zip(&intos) {
            let (from, to) = (self.streams.short(source).1, self.streams.short(into).1);
            if from != to {
                return Err(OpsError::bad(
                    "--into",
                    format!(
                        "{into} is in another partition than {source}: its chats would be \
                         handled out of their partition"
                    ),
                ));
            }
        }
        // Once for every partition, so `-10m` means the same everywhere.
        let now = crate::now_ms();
        let from = parse_bound("--from", &request.from, End::Start, now)?;
        let to = parse_bound("--to", &request.to, End::Stop, now)?;
        let mut report = ReplayReport {
            into: if intos.len() == 1 {
                intos[0].clone()
            } else {
                short(&intos[0])
            },
            ..ReplayReport::default()
        };
        for (source, into) in sources.iter().zip(&intos) {
            self.replay_one(request, kind, (source, &from, &to), into, &mut report)
                .await?;
        }
        Ok(report)
    }

    /// Replays `source` from `from` to `to` into `into`.
    async fn replay_one(
        &self,
        request: &ReplayRequest,
        kind: Kind,
        (source, from, to): (&str, &str, &str),
        into: &str,
        report: &mut ReplayReport,
    ) -> Result<(), OpsError> {
        let mut to = to.to_string();
        // Never past the stream's end as it is now: copies into the same
        // stream land after it and must not be copied again.
        match self.last(source, 1).await?.first() {
            None => return Ok(()),
            Some(last) if to == "+" || id_order(&last.id) < id_order(&to) => to = last.id.clone(),
            Some(_) => {}
        }
        let mut copies: Vec<Fields> = Vec::new();
        self.scan(source, from, &to, |entry| {
            match copy(kind, &entry, request.chat.as_deref()) {
                Ok(Some(fields)) => {
                    report.matched += 1;
                    copies.push(fields);
                }
                Ok(None) => {}
                Err(()) => report.undecodable += 1,
            }
            true
        })
        .await?;
        if request.dry_run || copies.is_empty() {
            return Ok(());
        }
        let mut connection = self.pool.get().await?;
        for chunk in copies.chunks(super::SCAN_BATCH) {
            let mut pipe = redis::pipe();
            for fields in chunk {
                let command = pipe.cmd("XADD").arg(into).arg("*");
                for (name, value) in fields {
                    command.arg(name).arg(value.as_slice());
                }
                command.ignore();
            }
            pipe.query_async::<()>(&mut connection).await?;
            report.copied += chunk.len() as u64;
        }
        Ok(())
    }
}

fn replayable(short: &str, argument: &str) -> Result<Kind, OpsError> {
    match Kind::of(short) {
        Some(kind @ (Kind::Message | Kind::Classified | Kind::Reply)) => Ok(kind),
        _ => Err(OpsError::bad(
            argument,
            format!("{short}: only in, q and out:<platform> can be replayed"),
        )),
    }
}

/// The copy's fields, `None` if it is not of the chat asked for, `Err` if
/// the entry does not decode.
fn copy(kind: Kind, entry: &RawEntry, chat: Option<&str>) -> Result<Option<Fields>, ()> {
    let fields = entry.fields.as_ref().ok_or(())?;
    let borrowed = fields.iter().map(|(k, v)| (k.as_str(), v.as_slice()));
    let new_id = ulid::Ulid::new().to_string();
    let (chat_id, original_id, mut copy) = match kind {
        Kind::Message => {
            let mut message: UnifiedMessage = codec::decode(borrowed).map_err(|_| ())?;
            let original = std::mem::replace(&mut message.id, new_id);
            message.replay = true;
            (message.chat.id.clone(), original, codec::encode(&message))
        }
        Kind::Classified => {
            let mut classified: ClassifiedMessage = codec::decode(borrowed).map_err(|_| ())?;
            let original = std::mem::replace(&mut classified.message.id, new_id);
            classified.message.replay = true;
            (
                classified.message.chat.id.clone(),
                original,
                codec::encode(&classified),
            )
        }
        Kind::Reply => {
            let mut reply: Reply = codec::decode(borrowed).map_err(|_| ())?;
            let original = std::mem::replace(&mut reply.id, new_id);
            reply.replay = true;
            (reply.chat.id.clone(), original, codec::encode(&reply))
        }
        _ => return Err(()),
    };
    if chat.is_some_and(|wanted| wanted != chat_id) {
        return Ok(None);
    }
    // Before `body`, beside the other plain fields.
    let body = copy.pop().expect("encode ends with body");
    copy.push(("replay_of".into(), original_id.into_bytes()));
    copy.push(("replay_entry".into(), entry.id.clone().into_bytes()));
    copy.push(body);
    Ok(Some(copy))
}
