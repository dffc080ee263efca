//! The one error type of the shared crate. Each variant knows whether the
//! entry that met it is worth another delivery or belongs in `dead`.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// Redis refused or the connection broke: transient, the entry stays
    /// pending and is read again.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No connection could be taken from the pool in time.
    #[error("redis pool: {0}")]
    Pool(String),
    /// An entry's `v` field names a schema this build does not know.
    #[error("unknown schema version {0:?}")]
    UnknownVersion(String),
    /// An entry lacks a field every record carries.
    #[error("entry has no `{0}` field")]
    MissingField(&'static str),
    /// The `body` field is not a MessagePack record of the expected kind.
    #[error("body does not decode: {0}")]
    Garbage(String),
    /// A setting is missing or malformed; the message names it.
    #[error("setting {setting}: {reason}")]
    Config { setting: String, reason: String },
}

impl Error {
    /// Whether reading the same entry again could succeed. Decoding failures
    /// never do, so their entries go straight to `dead`.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Redis(_) | Error::Pool(_))
    }

    pub fn config(setting: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        Error::Config {
            setting: setting.into(),
            reason: reason.to_string(),
        }
    }
}

impl From<deadpool_redis::PoolError> for Error {
    fn from(error: deadpool_redis::PoolError) -> Self {
        Error::Pool(error.to_string())
    }
}
