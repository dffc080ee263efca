//! `botline dead list|requeue|purge`. A requeue puts a dead letter's
//! original fields back on the stream they were read from and deletes the
//! dead entry in one script: two operators requeueing the same letter at
//! once make one copy, and a crash leaves either the letter or the copy.

use super::{age_ms, format_age, Ops, OpsError};
use crate::codec;
use crate::message::DeadLetter;
use crate::redis_conn::{id_order, RawEntry};
use crate::streams::Partition;
use serde_json::{json, Value as Json};

/// `XDEL` the dead entry; only if that deleted it, `XADD` the original fields.
const REQUEUE_SCRIPT: &str = r#"
if redis.call('XDEL', KEYS[1], ARGV[1]) == 0 then
  return false
end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 2))
"#;

/// One entry of `dead`, decoded as far as it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadEntry {
    /// The `dead` stream it is in (`{botline:p3}:dead`).
    pub dead: String,
    /// That stream's partition.
    pub partition: Option<Partition>,
    /// The entry's id in `dead` (unique in its partition only).
    pub id: String,
    /// `None` when the entry is not a dead letter this build can read.
    pub letter: Option<DeadLetter>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequeueOutcome {
    /// Put back on `stream` (full key) under `new_id`.
    Requeued { stream: String, new_id: String },
    /// Not in `dead` (any more): never there, purged, or requeued by someone else.
    Gone,
    /// In several partitions' `dead` (ids are unique in a stream only):
    /// these; nothing was requeued.
    Ambiguous(Vec<Partition>),
    /// Left in `dead`: its body is not a dead letter, or it holds no fields.
    Unreadable(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RequeueReport {
    pub requeued: u64,
    pub gone: u64,
    pub unreadable: u64,
}

impl DeadEntry {
    fn from_raw(streams: &crate::streams::Streams, entry: &RawEntry) -> DeadEntry {
        let letter = entry.fields.as_ref().and_then(|fields| {
            codec::decode(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice()))).ok()
        });
        DeadEntry {
            dead: entry.stream.clone(),
            partition: streams.short(&entry.stream).1,
            id: entry.id.clone(),
            letter,
        }
    }

    fn stage(&self) -> Option<&str> {
        self.letter.as_ref().map(|letter| letter.stage.as_str())
    }
}

impl Ops {
    /// The newest `count` dead letters (of `stage`, if given), newest first.
    pub async fn dead_list(
        &self,
        count: usize,
        stage: Option<&str>,
    ) -> Result<Vec<DeadEntry>, OpsError> {
        let mut found = Vec::new();
        for p in self.streams.all() {
            found.extend(
                self.dead_list_of(&self.streams.dead(p), count, stage)
                    .await?,
            );
        }
        found.sort_by_key(|entry| std::cmp::Reverse(id_order(&entry.id)));
        found.truncate(count);
        Ok(found)
    }

    /// [`Ops::dead_list`] of one partition's `dead`.
    async fn dead_list_of(
        &self,
        dead: &str,
        count: usize,
        stage: Option<&str>,
    ) -> Result<Vec<DeadEntry>, OpsError> {
        let mut found = Vec::new();
        let mut before = "+".to_string();
        loop {
            let mut connection = self.pool.get().await?;
            let reply: redis::Value = redis::cmd("XREVRANGE")
                .arg(dead)
                .arg(&before)
                .arg("-")
                .arg("COUNT")
                .arg(super::SCAN_BATCH)
                .query_async(&mut connection)
                .await?;
            let batch = crate::redis_conn::parse_entries(dead, reply)?;
            let full = batch.len() == super::SCAN_BATCH;
            for entry in &batch {
                let entry = DeadEntry::from_raw(&self.streams, entry);
                if stage.is_none() || entry.stage() == stage {
                    found.push(entry);
                    if found.len() == count {
                        return Ok(found);
                    }
                }
            }
            match batch.last() {
                Some(last) if full => before = format!("({}", last.id),
                _ => return Ok(found),
            }
        }
    }

    /// Put dead letter `id` (of `partition`'s `dead`; without it, of
    /// whichever partition's holds that id, if only one does) back where
    /// it came from.
    pub async fn dead_requeue(
        &self,
        id: &str,
        partition: Option<Partition>,
    ) -> Result<RequeueOutcome, OpsError> {
        if partition.is_some_and(|p| p >= self.streams.partitions()) {
            return Err(OpsError::bad(
                "--partition",
                format!(
                    "this deployment has {} partitions",
                    self.streams.partitions()
                ),
            ));
        }
        let mut found = Vec::new();
        for p in self.streams.all() {
            if partition.is_some_and(|wanted| wanted != p) {
                continue;
            }
            let dead = self.streams.dead(p);
            if let Some(entry) = self.range(&dead, id, id, 1).await?.pop() {
                found.push((p, dead, DeadEntry::from_raw(&self.streams, &entry)));
            }
        }
        match found.as_slice() {
            [] => Ok(RequeueOutcome::Gone),
            [(_, dead, entry)] => self.requeue_entry(dead, entry).await,
            _ => Ok(RequeueOutcome::Ambiguous(
                found.iter().map(|(p, _, _)| *p).collect(),
            )),
        }
    }

    /// Put `entry` of the `dead` stream `dead` back (into the same partition).
    async fn requeue_entry(
        &self,
        dead: &str,
        entry: &DeadEntry,
    ) -> Result<RequeueOutcome, OpsError> {
        let Some(letter) = &entry.letter else {
            return Ok(RequeueOutcome::Unreadable(
                "not a dead letter this botline can read".into(),
            ));
        };
        if letter.fields.is_empty() {
            return Ok(RequeueOutcome::Unreadable(
                "the original entry's fields were deleted before it died".into(),
            ));
        }
        // One script touches one partition's keys (one cluster slot), and
        // a chat's entries belong to its partition.
        let partition = self.streams.short(dead).1;
        if partition.is_none() || self.streams.short(&letter.stream).1 != partition {
            return Ok(RequeueOutcome::Unreadable(format!(
                "its stream {} is not of the partition of {dead}",
                letter.stream
            )));
        }
        let script = redis::Script::new(REQUEUE_SCRIPT);
        let mut script = script.prepare_invoke();
        script.key(dead).key(&letter.stream).arg(&entry.id);
        for (name, value) in &letter.fields {
            script.arg(name).arg(value.as_slice());
        }
        let mut connection = self.pool.get().await?;
        let new_id: Option<String> = script.invoke_async(&mut connection).await?;
        Ok(match new_id {
            Some(new_id) => RequeueOutcome::Requeued {
                stream: letter.stream.clone(),
                new_id,
            },
            None => RequeueOutcome::Gone,
        })
    }

    /// Requeue every dead letter (of `stage`, if given), oldest first.
    pub async fn dead_requeue_all(&self, stage: Option<&str>) -> Result<RequeueReport, OpsError> {
        let mut entries = Vec::new();
        for p in self.streams.all() {
            let dead = self.streams.dead(p);
            self.scan(&dead, "-", "+", |entry| {
                let entry = DeadEntry::from_raw(&self.streams, &entry);
                if stage.is_none() || entry.stage() == stage {
                    entries.push((dead.clone(), entry));
                }
                true
            })
            .await?;
        }
        // Oldest first over every partition, as they died.
        entries.sort_by_key(|(_, entry)| id_order(&entry.id));
        let mut report = RequeueReport::default();
        for (dead, entry) in &entries {
            match self.requeue_entry(dead, entry).await? {
                RequeueOutcome::Requeued { .. } => report.requeued += 1,
                RequeueOutcome::Gone => report.gone += 1,
                RequeueOutcome::Unreadable(_) => report.unreadable += 1,
                // One entry of one `dead` stream is never in two.
                RequeueOutcome::Ambiguous(_) => report.gone += 1,
            }
        }
        Ok(report)
    }

    /// Delete dead letters older than `older_than` (all without it). Only
    /// counts them unless `really`. Returns how many (would) go.
    pub async fn dead_purge(
        &self,
        older_than: Option<std::time::Duration>,
        really: bool,
    ) -> Result<u64, OpsError> {
        let mut purged = 0;
        for p in self.streams.all() {
            purged += self
                .dead_purge_of(&self.streams.dead(p), older_than, really)
                .await?;
        }
        Ok(purged)
    }

    /// [`Ops::dead_purge`] of one partition's `dead`.
    async fn dead_purge_of(
        &self,
        dead: &str,
        older_than: Option<std::time::Duration>,
        really: bool,
    ) -> Result<u64, OpsError> {
        let below_ms = older_than.map(|age| crate::now_ms() - age.as_millis() as i64);
        if below_ms.is_some_and(|ms| ms <= 0) {
            return Ok(0);
        }
        let below = below_ms.map(|ms| format!("{ms}-0"));
        let mut connection = self.pool.get().await?;
        if !really {
            drop(connection);
            let mut count = 0;
            let end = below
                .as_ref()
                .map_or("+".to_string(), |below| format!("({below}"));
            self.scan(dead, "-", &end, |_| {
                count += 1;
                true
            })
            .await?;
            return Ok(count);
        }
        let mut trim = redis::cmd("XTRIM");
        trim.arg(dead);
        match &below {
            Some(below) => trim.arg("MINID").arg(below),
            None => trim.arg("MAXLEN").arg(0),
        };
        Ok(trim.query_async(&mut connection).await?)
    }
}

impl DeadEntry {
    pub fn json(&self) -> Json {
        let mut json = match &self.letter {
            Some(letter) => letter_json(letter),
            None => json!({"error": "not a dead letter this botline can read"}),
        };
        json["id"] = json!(self.id);
        json["dead"] = json!(self.dead);
        json["partition"] = json!(self.partition);
        json
    }
}

/// A table of dead letters: id, partition, age, stage, stream, deliveries, error.
pub fn dead_table(entries: &[DeadEntry], streams: &crate::streams::Streams) -> String {
    let mut out = String::from("ID  PARTITION  AGE  STAGE  STREAM  DELIVERIES  ERROR\n");
    for entry in entries {
        let age = age_ms(&entry.id).map_or("-".into(), format_age);
        let partition = entry.partition.map_or("-".into(), |p| p.to_string());
        match &entry.letter {
            Some(letter) => out.push_str(&format!(
                "{}  {}  {}  {}  {}  {}  {}\n",
                entry.id,
                partition,
                age,
                letter.stage,
                streams.short(&letter.stream).0,
                letter.deliveries,
                letter.error.replace('\n', " ")
            )),
            None => out.push_str(&format!(
                "{}  {}  {}  ?  ?  ?  (unreadable entry)\n",
                entry.id, partition, age
            )),
        }
    }
    out
}

/// What a dead letter says, as JSON (its original fields aside).
pub(crate) fn letter_json(letter: &DeadLetter) -> Json {
    json!({
        "stage": letter.stage,
        "stream": letter.stream,
        "entry_id": letter.entry_id,
        "error": letter.error,
        "deliveries": letter.deliveries,
        "at_ms": letter.at_ms,
    })
}
