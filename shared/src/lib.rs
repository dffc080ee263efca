//! Everything the four botline stages agree on: the records that travel
//! between them ([`message`]), how a record becomes a stream entry and back
//! ([`codec`]), what the streams are called ([`streams`]), how settings are
//! read ([`config`]), and the read-process-acknowledge loop every stage runs
//! ([`runner`]) with its metrics and health endpoints ([`telemetry`]).
//!
//! Stages never call each other; they meet only in the Redis streams named
//! here, so a change to this crate is a change to the contract between them.

pub mod codec;
pub mod config;
pub mod error;
pub mod keywords;
pub mod lease;
pub mod message;
pub mod ops;
pub mod redis_conn;
pub mod relay;
pub mod runner;
pub mod scripts;
pub mod service;
pub mod streams;
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod testing;

pub use error::Error;

/// Milliseconds since the Unix epoch, the one clock every record uses.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|elapsed| elapsed.as_millis() as i64)
        .unwrap_or_default()
}
