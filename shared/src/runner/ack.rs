//! One acknowledgement script call for entries of one partition, each with
//! its writes (`shared/lua/ack.lua`).

use super::Write;
use crate::codec::Fields;
use crate::scripts;
use crate::Error;
use redis::Value;
use std::collections::HashMap;

/// What the script said.
#[derive(Debug, PartialEq, Eq)]
pub enum Acked {
    /// Per entry, whether its `XACK` acknowledged it (and its writes were made).
    Entries(Vec<bool>),
    /// This consumer no longer owns the partition: nothing was written.
    Lost,
}

/// The script arguments for a batch of outcomes.
pub struct AckCall {
    keys: Vec<String>,
    key_index: HashMap<String, usize>,
    args: Vec<Vec<u8>>,
    entries: usize,
}

impl AckCall {
    /// A call fenced by `owner` (the partition's owner key) naming `consumer`.
    pub fn new(owner: &str, group: &str, consumer: &str) -> Self {
        let mut call = AckCall {
            keys: Vec::new(),
            key_index: HashMap::new(),
            args: vec![
                group.as_bytes().to_vec(),
                consumer.as_bytes().to_vec(),
                Vec::new(),
            ],
            entries: 0,
        };
        call.key(owner);
        call
    }

    fn key(&mut self, key: &str) -> Vec<u8> {
        let next = self.keys.len() + 1;
        let index = *self.key_index.entry(key.to_string()).or_insert_with(|| {
            self.keys.push(key.to_string());
            next
        });
        index.to_string().into_bytes()
    }

    fn push_key(&mut self, key: &str) {
        let index = self.key(key);
        self.push(index);
    }

    fn push(&mut self, arg: impl Into<Vec<u8>>) {
        self.args.push(arg.into());
    }

    fn push_fields(&mut self, fields: &Fields) {
        self.push(fields.len().to_string());
        for (name, value) in fields {
            self.push(name.as_bytes());
            self.push(value.as_slice());
        }
    }

    /// Acknowledge `id` of `stream`, and only then make `writes`.
    pub fn entry(&mut self, stream: &str, id: &str, writes: &[Write]) {
        self.entries += 1;
        self.push_key(stream);
        self.push(id);
        self.push(writes.len().to_string());
        for write in writes {
            match write {
                Write::Add {
                    stream,
                    fields,
                    cap,
                    expire,
                } => {
                    self.push("add");
                    self.push_key(stream);
                    self.push(cap.unwrap_or(0).to_string());
                    self.push(expire.map_or(0, |d| d.as_millis()).to_string());
                    self.push_fields(fields);
                }
                Write::Set { key, value, expire } => {
                    self.push("set");
                    self.push_key(key);
                    self.push(value.as_bytes());
                    self.push(expire.as_millis().to_string());
                }
                Write::Delete { key } => {
                    self.push("del");
                    self.push_key(key);
                }
                Write::Publish { channel, message } => {
                    self.push("pub");
                    self.push(channel.as_bytes());
                    self.push(message.as_bytes());
                }
            }
        }
    }

    pub async fn run(
        mut self,
        connection: &mut crate::redis_conn::Connection,
    ) -> Result<Acked, Error> {
        self.args[2] = self.entries.to_string().into_bytes();
        let mut invocation = scripts::ACK.prepare_invoke();
        for key in &self.keys {
            invocation.key(key);
        }
        for arg in &self.args {
            invocation.arg(arg.as_slice());
        }
        let reply: Value = invocation.invoke_async(connection).await?;
        match reply {
            Value::Array(acked) => Ok(Acked::Entries(
                acked
                    .into_iter()
                    .map(|ack| matches!(ack, Value::Int(1)))
                    .collect(),
            )),
            Value::BulkString(lost) if lost == b"lost" => Ok(Acked::Lost),
            Value::SimpleString(lost) if lost == "lost" => Ok(Acked::Lost),
            other => Err(Error::Garbage(format!(
                "the acknowledgement script answered {other:?}"
            ))),
        }
    }
}
