//! egress reads replies from `out:<platform>` (group `egress`) and delivers
//! them: `web` replies become turns in the chat's transcript (`web:<chat>`)
//! announced on `web:notify`; `webhook` replies are POSTed, signed, to one
//! URL. It writes a receipt to `delivered` per reply out, and owns the
//! idempotency keys `sent:<id>` (a reply redelivered is not sent again) and
//! `sending:<id>` (held while one consumer sends it).
//!
//! [`senders`] make one attempt each at one platform; [`delivery`] is the
//! only retry loop; [`stage::EgressStage`] adds ordering per chat,
//! concurrency across chats, idempotency and receipts; the shared runner
//! does every read and acknowledgement.

pub mod backoff;
pub mod config;
pub mod delivery;
pub mod limits;
pub mod parts;
pub mod senders;
pub mod stage;
pub mod tokens;

pub use config::EgressSettings;
pub use stage::EgressStage;

use botline_shared::config::Env;
use botline_shared::runner::{self, Plumbing};
use botline_shared::Error;
use tokio_util::sync::CancellationToken;

/// The stage with the senders `settings` enable; secrets come from `env`.
pub fn build(
    settings: EgressSettings,
    env: &impl Env,
    plumbing: &Plumbing,
    shutdown: CancellationToken,
) -> Result<EgressStage, Error> {
    let senders = senders::build(
        &settings,
        env,
        &plumbing.streams,
        &plumbing.stream_settings,
        &plumbing.pool,
    )?;
    EgressStage::new(settings, senders, plumbing, shutdown)
}

/// Deliver replies until `shutdown`; the batch in hand is finished first.
pub async fn run(
    stage: EgressStage,
    plumbing: Plumbing,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    runner::run(stage, plumbing, shutdown).await
}
