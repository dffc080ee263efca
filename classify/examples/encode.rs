//! The sentence encoder from the command line, for checking and measuring it.
//!
//! `cargo run --release -p botline-classify --example encode -- embed [MODEL_DIR] < lines`
//!   prints each line's embedding as a JSON array, one per line.
//! `cargo run --release -p botline-classify --example encode -- bench [MODEL_DIR]`
//!   prints sentences per second in batches of 4 to 256 and single-sentence latency.

use classify::model::{threads, Embedder, Encoder};
use std::io::BufRead;
use std::path::PathBuf;
use std::time::Instant;

const SENTENCES: [&str; 16] = [
    "hello",
    "where is my order? it has been a week",
    "我忘记密码了，怎么办",
    "I want a refund for the broken headphones I bought last month",
    "the website is down again",
    "谢谢你的帮助",
    "can I talk to a real person please",
    "你们几点开门",
    "how much does the pro plan cost per month?",
    "物流一直没有更新，订单号是 2024110512",
    "this is the worst customer service I have ever had",
    "bye",
    "请问有免费试用吗",
    "my account is locked after too many login attempts",
    "服务器宕机了，所有人都登不上",
    "what can you do?",
];

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().unwrap_or_else(|| "bench".into());
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "models/e5-small".into()));
    let started = Instant::now();
    let encoder = Encoder::load(&dir, None, 128)?;
    eprintln!(
        "loaded {} in {:.2} s, {} threads, prefix {:?}",
        dir.display(),
        started.elapsed().as_secs_f64(),
        threads(),
        encoder.prefix()
    );
    match command.as_str() {
        "embed" => {
            let lines: Vec<String> = std::io::stdin().lock().lines().collect::<Result<_, _>>()?;
            let texts: Vec<&str> = lines.iter().map(String::as_str).collect();
            for embedding in encoder.embed(&texts)? {
                println!("{}", serde_json::to_string(&embedding)?);
            }
        }
        _ => {
            encoder.embed(&SENTENCES)?;
            // Small batches are what the cascade sends on; large ones what
            // `precise` mode and the distillation run.
            for size in [4, 16, 64, 256] {
                let batch: Vec<&str> = SENTENCES.iter().cycle().take(size).copied().collect();
                let rounds = (512 / size).max(2);
                let started = Instant::now();
                for _ in 0..rounds {
                    encoder.embed(&batch)?;
                }
                let seconds = started.elapsed().as_secs_f64();
                println!(
                    "batched: {:.1} sentences/s ({rounds} batches of {size})",
                    (rounds * size) as f64 / seconds,
                );
            }
            let mut latencies: Vec<f64> = Vec::new();
            for _ in 0..5 {
                for sentence in SENTENCES {
                    let started = Instant::now();
                    encoder.embed(&[sentence])?;
                    latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                }
            }
            latencies.sort_by(f64::total_cmp);
            println!(
                "single: p50 {:.1} ms, p90 {:.1} ms, max {:.1} ms over {} sentences",
                latencies[latencies.len() / 2],
                latencies[latencies.len() * 9 / 10],
                latencies[latencies.len() - 1],
                latencies.len()
            );
        }
    }
    Ok(())
}
