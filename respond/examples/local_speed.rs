//! How fast the `local` backend's model answers on this machine: loads
//! `[respond.local] model_path` (scripts/fetch-llm) with the shipped
//! settings, then answers a few questions and prints, per answer, the
//! prompt's and the answer's tokens and speed, and the answer.
//!
//!     cargo run --release -p botline-respond --example local_speed [--quantized] [question …]
//!
//! `--quantized` runs the 4-bit weights as they are (`dequantize = false`).
//! `RAYON_NUM_THREADS` caps the threads candle uses.

use anyhow::Context;
use botline_shared::config::Settings;
use respond::llm::{PromptMessage, PromptRole};
use respond::local::{chatml, LocalModel, Stop};
use respond::RespondSettings;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let respond: RespondSettings = Settings::from_overlay(None)?.section("respond")?;
    let settings = respond.local;
    // Greedy, and never cut short by the budget: the same work every run.
    let generate = respond::local::Generate {
        temperature: 0.0,
        ..settings.generate()
    };
    let mut questions: Vec<String> = std::env::args().skip(1).collect();
    let quantized = questions.first().is_some_and(|arg| arg == "--quantized");
    if quantized {
        questions.remove(0);
    }
    let dequantize = settings.dequantize && !quantized;
    let dir = settings.model_dir();
    let started = Instant::now();
    let mut model = LocalModel::load(&dir, dequantize).context("loading the local model")?;
    println!(
        "loaded {} (dequantize = {}) in {:.2} s, {} threads",
        dir.display(),
        dequantize,
        started.elapsed().as_secs_f64(),
        candle_core::utils::get_num_threads()
    );
    if questions.is_empty() {
        questions = [
            "What is the capital of France?",
            "How do I reset my password?",
            "Write three sentences about the sea.",
        ]
        .map(String::from)
        .to_vec();
    }
    let system = respond
        .llm
        .system_prompt
        .replace("{bot_name}", &respond.bot_name);
    let (mut tokens, mut seconds) = (0, 0.0);
    for question in &questions {
        let messages = [
            PromptMessage {
                role: PromptRole::System,
                content: system.clone(),
            },
            PromptMessage {
                role: PromptRole::User,
                content: question.clone(),
            },
        ];
        let prompt = model.prompt_ids(&chatml(&messages))?;
        let deadline = Instant::now() + Duration::from_secs(600);
        let answer = model.generate(&prompt, &generate, deadline)?;
        println!(
            "\n> {question}\nprompt {} tokens in {:.2} s ({:.0} tokens/s); answer {} tokens in {:.2} s ({:.1} tokens/s), stopped by {}\n{}",
            answer.prompt_tokens,
            answer.prompt_seconds,
            answer.prompt_tokens as f64 / answer.prompt_seconds,
            answer.new_tokens,
            answer.generation_seconds,
            answer.new_tokens as f64 / answer.generation_seconds,
            match answer.stop {
                Stop::EndToken => "the end token",
                Stop::MaxTokens => "max_new_tokens",
                Stop::Deadline => "the deadline",
            },
            answer.text
        );
        tokens += answer.new_tokens;
        seconds += answer.generation_seconds;
    }
    println!(
        "\nanswers: {tokens} tokens in {seconds:.2} s: {:.1} tokens/s",
        tokens as f64 / seconds
    );
    Ok(())
}
