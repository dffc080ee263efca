//! Makes the static token vectors of a model directory (`static.safetensors`
//! beside the model) unless they are there already, made from that model:
//! what `scripts/fetch-model` runs, so classify need not do it at start.
//!
//! `cargo run --release -p botline-classify --example distill -- [MODEL_DIR]`

use classify::model::Encoder;
use classify::token_vectors::TokenVectors;
use std::path::PathBuf;

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt().with_target(false).init();
    let dir = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "models/e5-small".into()),
    );
    // The prefix and length classify uses by default (`[classify]`).
    let encoder = Encoder::load(&dir, None, 128)?;
    TokenVectors::load_or_distill(&dir, &encoder)?;
    Ok(())
}
