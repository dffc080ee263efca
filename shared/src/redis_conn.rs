//! The two kinds of Redis connection a stage holds: a pool for short
//! commands, and one dedicated connection for blocking reads, whose response
//! timeout is longer than its `BLOCK` so a slow reply never strands entries.

use crate::config::ProcessConfig;
use crate::Error;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, Value};
use std::collections::HashMap;
use std::time::Duration;

pub type Pool = deadpool_redis::Pool;

/// How long a short command may take before it counts as a failure.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);

pub fn pool(process: &ProcessConfig, size: usize) -> Result<Pool, Error> {
    let mut config = deadpool_redis::Config::from_url(process.redis_url.clone());
    config.pool = Some(deadpool_redis::PoolConfig {
        max_size: size,
        timeouts: deadpool_redis::Timeouts {
            wait: Some(COMMAND_TIMEOUT),
            create: Some(COMMAND_TIMEOUT),
            recycle: Some(COMMAND_TIMEOUT),
        },
        ..Default::default()
    });
    config
        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
        .map_err(|error| Error::config("BOTLINE_REDIS_URL", error))
}

/// One multiplexed connection for the hot path's short commands (acks,
/// claims, locks): commands from many tasks share it and are pipelined,
/// with no checkout round trip; it reconnects by itself.
pub fn commands(client: &Client) -> Result<redis::aio::ConnectionManager, Error> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT))
        .set_number_of_retries(3);
    Ok(redis::aio::ConnectionManager::new_lazy_with_config(
        client.clone(),
        config,
    )?)
}

/// A connection of its own for `XREADGROUP … BLOCK block`.
pub async fn blocking_connection(
    client: &Client,
    block: Duration,
) -> Result<MultiplexedConnection, Error> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(COMMAND_TIMEOUT))
        .set_response_timeout(Some(block + COMMAND_TIMEOUT));
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// One stream entry as read: its id and fields, or `None` when its payload
/// was deleted while it sat in a pending list.
#[derive(Debug, Clone)]
pub struct RawEntry {
    pub stream: String,
    pub id: String,
    pub fields: Option<Vec<(String, Vec<u8>)>>,
}

/// The entries of an `XREADGROUP`/`XREAD` reply (nil when it timed out).
pub fn parse_read_reply(value: Value) -> Result<Vec<RawEntry>, Error> {
    let mut entries = Vec::new();
    let streams = match value {
        Value::Nil => return Ok(entries),
        Value::Array(streams) => streams
            .into_iter()
            .map(|stream| match stream {
                Value::Array(mut pair) if pair.len() == 2 => {
                    let ids = pair.pop().unwrap_or(Value::Nil);
                    let name = pair.pop().unwrap_or(Value::Nil);
                    Ok((name, ids))
                }
                other => Err(unexpected("stream", &other)),
            })
            .collect::<Result<Vec<_>, Error>>()?,
        Value::Map(streams) => streams,
        other => return Err(unexpected("read reply", &other)),
    };
    for (name, ids) in streams {
        let stream = string(name)?;
        entries.extend(parse_entries(&stream, ids)?);
    }
    Ok(entries)
}

/// A list of `[id, [field, value, …]]`, as `XRANGE` and `XAUTOCLAIM` give it.
pub fn parse_entries(stream: &str, value: Value) -> Result<Vec<RawEntry>, Error> {
    let Value::Array(items) = value else {
        return match value {
            Value::Nil => Ok(Vec::new()),
            other => Err(unexpected("entry list", &other)),
        };
    };
    items
        .into_iter()
        .map(|item| {
            let Value::Array(mut pair) = item else {
                return Err(unexpected("entry", &item));
            };
            if pair.len() != 2 {
                return Err(Error::Garbage(format!("entry of {} parts", pair.len())));
            }
            let fields = pair.pop().unwrap_or(Value::Nil);
            let id = string(pair.pop().unwrap_or(Value::Nil))?;
            let fields = match fields {
                Value::Nil => None,
                Value::Array(flat) => Some(
                    flat.chunks(2)
                        .map(|pair| match pair {
                            [name, value] => Ok((string(name.clone())?, bytes(value.clone())?)),
                            _ => Err(Error::Garbage("odd number of field values".into())),
                        })
                        .collect::<Result<Vec<_>, Error>>()?,
                ),
                other => return Err(unexpected("fields", &other)),
            };
            Ok(RawEntry {
                stream: stream.to_string(),
                id,
                fields,
            })
        })
        .collect()
}

/// A reply that is a map (RESP3) or a flat `[key, value, …]` array (RESP2),
/// as `XINFO` gives them, keyed by name; anything else is empty.
pub fn field_map(value: Value) -> HashMap<String, Value> {
    let pairs: Vec<(Value, Value)> = match value {
        Value::Array(flat) => flat
            .chunks(2)
            .filter_map(|pair| match pair {
                [key, value] => Some((key.clone(), value.clone())),
                _ => None,
            })
            .collect(),
        Value::Map(pairs) => pairs,
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(key, value)| string(key).ok().map(|key| (key, value)))
        .collect()
}

pub fn string(value: Value) -> Result<String, Error> {
    String::from_utf8(bytes(value)?).map_err(|error| Error::Garbage(error.to_string()))
}

pub fn bytes(value: Value) -> Result<Vec<u8>, Error> {
    match value {
        Value::BulkString(bytes) => Ok(bytes),
        Value::SimpleString(text) => Ok(text.into_bytes()),
        Value::Int(number) => Ok(number.to_string().into_bytes()),
        other => Err(unexpected("string", &other)),
    }
}

fn unexpected(what: &str, value: &Value) -> Error {
    Error::Garbage(format!("unexpected {what} in reply: {value:?}"))
}

/// The millisecond part of a stream id (`1700000000000-3` → 1700000000000).
pub fn id_millis(id: &str) -> Option<i64> {
    id.split('-').next()?.parse().ok()
}

/// Stream ids order by (milliseconds, sequence).
pub fn id_order(id: &str) -> (i64, u64) {
    let sequence = id
        .split('-')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (id_millis(id).unwrap_or(0), sequence)
}
