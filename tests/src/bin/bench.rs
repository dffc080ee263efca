//! `scripts/bench`: the whole pipeline on this machine. Starts a
//! redis-server and the four release binaries, pushes N unique messages
//! (straight into each chat's partition's `in` as ingest adds them, or through the HTTP
//! API; as fast as it can, or paced with `--rate`), waits for every delivery receipt, and prints a
//! table, then one JSON line:
//! `{"messages":N,"lost":L,"duplicated":D,"throughput_msgs_per_s":T,"p50_ms":…,"p99_ms":…,"via":"stream|http"}`.
//!
//! Classify runs the shipped intent model (the sentence encoder in cascade
//! mode; `--keywords` for the keyword rules) on texts from
//! classify/eval/messages.tsv, each made unique. `--scale classify=2`
//! starts that many replicas of a stage (one of each by default).
//!
//! Receipts are read from every partition's `delivered`; lost, duplicated
//! and out-of-order replies are counted per chat (a chat lives in one
//! partition, so its receipts keep their order there).
//!
//! Replies go to the web chat platform (delivered inside Redis), so what is
//! measured is botline, not an HTTP receiver; `--platform webhook` sends
//! them to a local signed-webhook sink instead.

use botline_ingest::inbox::{Inbox, Submission};
use botline_shared::codec;
use botline_shared::message::Receipt;
use botline_shared::streams::Streams;
use botline_shared::testing::{sample_message, RedisServer};
use botline_tests::llm::SlowLlm;
use botline_tests::sink::Sink;
use botline_tests::{streams_of, token, Pipeline, WEBHOOK_SECRET};
use futures_util::stream::{self, StreamExt};
use std::collections::HashMap;
use std::time::{Duration, Instant};

struct Options {
    messages: usize,
    via: String,
    rate: Option<f64>,
    chats: usize,
    platform: String,
    timeout: Duration,
    redis_stats: bool,
    config: Option<String>,
    llm_delay: Option<Duration>,
    llm_in_flight: usize,
    keywords: bool,
    /// Replicas per stage beyond the first (`--scale classify=2`).
    scale: Vec<(&'static str, usize)>,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        messages: 20_000,
        via: "stream".into(),
        rate: None,
        chats: 200,
        platform: "web".into(),
        timeout: Duration::from_secs(300),
        redis_stats: false,
        config: None,
        llm_delay: None,
        llm_in_flight: 16,
        keywords: false,
        scale: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--messages" | "-n" => options.messages = value()?.parse().map_err(|e| format!("--messages: {e}"))?,
            "--via" => options.via = value()?,
            "--rate" => options.rate = Some(value()?.parse().map_err(|e| format!("--rate: {e}"))?),
            "--chats" => options.chats = value()?.parse().map_err(|e| format!("--chats: {e}"))?,
            "--platform" => options.platform = value()?,
            "--timeout-secs" => options.timeout = Duration::from_secs(value()?.parse().map_err(|e| format!("--timeout-secs: {e}"))?),
            "--redis-stats" => options.redis_stats = true,
            "--keywords" => options.keywords = true,
            "--scale" => {
                let scale = value()?;
                let (stage, count) = scale.split_once('=').ok_or_else(|| format!("--scale {scale}: not STAGE=N"))?;
                let stage = botline_tests::STAGES
                    .iter()
                    .find(|known| **known == stage)
                    .ok_or_else(|| format!("--scale {scale}: the stages are {}", botline_tests::STAGES.join(", ")))?;
                let count: usize = count.parse().map_err(|e| format!("--scale {scale}: {e}"))?;
                if count == 0 {
                    return Err(format!("--scale {scale}: at least 1"));
                }
                options.scale.push((stage, count));
            }
            "--llm-delay-ms" => {
                options.llm_delay = Some(Duration::from_millis(value()?.parse().map_err(|e| format!("--llm-delay-ms: {e}"))?))
            }
            "--llm-in-flight" => options.llm_in_flight = value()?.parse().map_err(|e| format!("--llm-in-flight: {e}"))?,
            "--config" => {
                let path = value()?;
                options.config = Some(std::fs::read_to_string(&path).map_err(|e| format!("--config {path}: {e}"))?);
            }
            "--help" | "-h" => {
                return Err("usage: scripts/bench [--messages N] [--via stream|http] [--rate MSGS_PER_S] [--chats N] [--platform web|webhook] [--timeout-secs S] [--redis-stats] [--keywords] [--scale STAGE=N]… [--config FILE.toml] [--llm-delay-ms MS [--llm-in-flight N]]".into())
            }
            other => return Err(format!("unknown option {other}; see --help")),
        }
    }
    if !matches!(options.via.as_str(), "stream" | "http") {
        return Err("--via is `stream` or `http`".into());
    }
    if !matches!(options.platform.as_str(), "web" | "webhook") {
        return Err("--platform is `web` or `webhook`".into());
    }
    Ok(options)
}

/// What people write (classify's labeled messages, English, Chinese and
/// mixed), each made unique by its number so that classify's exact-text
/// cache never answers: the model sees every message, the worst case.
fn text(n: usize) -> String {
    static TEXTS: std::sync::OnceLock<Vec<&'static str>> = std::sync::OnceLock::new();
    let texts = TEXTS.get_or_init(|| {
        include_str!("../../../classify/eval/messages.tsv")
            .lines()
            .filter(|line| !line.starts_with('#') && !line.trim().is_empty())
            .filter_map(|line| line.split('\t').next())
            .collect()
    });
    format!("{} {n}", texts[n % texts.len()])
}

/// Sleep so that item `index` goes out no earlier than its slot at `rate`.
async fn pace(started: Instant, index: usize, rate: Option<f64>) {
    if let Some(rate) = rate {
        let slot = started + Duration::from_secs_f64(index as f64 / rate);
        tokio::time::sleep_until(slot.into()).await;
    }
}

/// Every receipt in every partition's `delivered`, in entry id order per
/// partition (so each chat's in the order delivered).
fn read_receipts(connection: &mut redis::Connection, streams: &Streams) -> Vec<Receipt> {
    let mut receipts = Vec::new();
    for p in streams.all() {
        let key = streams.delivered(p);
        let reply: redis::Value = redis::cmd("XRANGE")
            .arg(&key)
            .arg("-")
            .arg("+")
            .query(connection)
            .expect("XRANGE delivered");
        for entry in botline_shared::redis_conn::parse_entries(&key, reply).expect("entries") {
            let fields = entry.fields.expect("a receipt has fields");
            receipts.push(
                codec::decode(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                    .expect("a receipt decodes"),
            );
        }
    }
    receipts
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[tokio::main]
async fn main() {
    let options = match options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let redis = RedisServer::start();
    let sink = Sink::start(WEBHOOK_SECRET).await;
    // The shipped intent model (the sentence encoder in cascade mode) unless
    // --keywords; no per-address request limit, as every request comes
    // from this one address.
    let mut overlay = format!(
        "[streams]\ndelivered_max_len = {}\n[egress.webhook]\nurl = \"{}\"\n[classify]\nintent_model = \"{}\"\n[ingest]\nper_source_per_second = 0\n",
        options.messages * 2 + 1000,
        sink.url,
        if options.keywords { "keywords" } else { "embedding" },
    );
    // Replies from a local LLM stand-in that answers after a fixed delay.
    let llm = match options.llm_delay {
        Some(delay) => Some(SlowLlm::start(delay).await),
        None => None,
    };
    if let Some(llm) = &llm {
        overlay.push_str(&format!(
            "[respond]\nbackends = [\"llm\"]\n[respond.routes]\npricing = [\"llm\"]\n[respond.llm]\nbase_url = \"{}\"\nmax_in_flight = {}\n",
            llm.base_url, options.llm_in_flight
        ));
    }
    if let Some(config) = &options.config {
        overlay = match botline_tests::laid_over(&overlay, config) {
            Ok(overlay) => overlay,
            Err(error) => {
                eprintln!("--config: {error}");
                std::process::exit(2);
            }
        };
    }
    let mut pipeline = Pipeline::start(&redis, &overlay);
    for (stage, count) in &options.scale {
        for _ in 1..*count {
            pipeline.add(stage);
        }
    }
    pipeline.wait_ready(Duration::from_secs(60)).await;
    let streams = streams_of(&overlay);
    // Scaled stages share their partitions before the clock starts.
    pipeline
        .wait_balanced(streams.partitions(), Duration::from_secs(60))
        .await;
    let client = redis.client();

    eprintln!(
        "pushing {} messages via {} to {} chats …",
        options.messages, options.via, options.chats
    );
    let started = Instant::now();
    match options.via.as_str() {
        "stream" => {
            // Added as ingest adds them (its script, one call per
            // partition: each message to its chat's partition's `in`),
            // without HTTP in front.
            let inbox = Inbox {
                pool: botline_shared::redis_conn::Pool::Node(
                    deadpool_redis::Config::from_url(redis.url())
                        .create_pool(Some(deadpool_redis::Runtime::Tokio1))
                        .expect("redis pool"),
                ),
                streams: streams.clone(),
                dedup_ttl_ms: 0,
                transcript_max_len: 0,
                transcript_ttl_ms: 0,
                retry_after_secs: 1,
            };
            let chunk = if options.rate.is_some() { 1 } else { 500 };
            for first in (0..options.messages).step_by(chunk) {
                pace(started, first, options.rate).await;
                let submissions: Vec<Submission> = (first..(first + chunk).min(options.messages))
                    .map(|n| {
                        let mut message = sample_message(n, &text(n));
                        message.id = format!("bench-{n}");
                        message.platform = options.platform.clone();
                        message.chat.id = format!("chat-{}", n % options.chats);
                        message.received_at_ms = botline_shared::now_ms();
                        Submission {
                            message,
                            event_id: None,
                            transcript: false,
                        }
                    })
                    .collect();
                inbox.admit(&submissions).await.expect("add to in");
            }
        }
        _ => {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(128)
                .build()
                .expect("client");
            let url = format!("{}/v1/messages", pipeline.base_url());
            let bearer = token();
            let platform = options.platform.clone();
            let chats = options.chats;
            let rate = options.rate;
            stream::iter(0..options.messages)
                .for_each_concurrent(64, |n| {
                    let (http, url, bearer, platform) =
                        (http.clone(), url.clone(), bearer.clone(), platform.clone());
                    async move {
                        pace(started, n, rate).await;
                        let body = serde_json::json!({
                            "event_id": format!("bench-{n}"),
                            "platform": platform,
                            "chat": { "id": format!("chat-{}", n % chats) },
                            "sender": { "id": format!("user-{}", n % chats), "name": "Ada" },
                            "text": text(n),
                        });
                        loop {
                            match http
                                .post(&url)
                                .bearer_auth(&bearer)
                                .json(&body)
                                .send()
                                .await
                            {
                                Ok(response) if response.status().is_success() => break,
                                Ok(response) if response.status().as_u16() == 429 => {
                                    tokio::time::sleep(Duration::from_millis(50)).await
                                }
                                Ok(response) => {
                                    panic!("the API refused a message: {}", response.status())
                                }
                                Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                            }
                        }
                    }
                })
                .await;
        }
    }
    let pushed = started.elapsed();
    eprintln!(
        "pushed in {:.2}s; waiting for the receipts …",
        pushed.as_secs_f64()
    );

    let mut connection = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let deadline = Instant::now() + options.timeout;
    // XLENs the bench itself sends, left out of `--redis-stats`.
    let mut own_xlen: u64 = 0;
    loop {
        let mut count = redis::pipe();
        for p in streams.all() {
            count.cmd("XLEN").arg(streams.delivered(p));
        }
        let lengths: Vec<usize> = count.query_async(&mut connection).await.expect("XLEN");
        own_xlen += lengths.len() as u64;
        let delivered: usize = lengths.iter().sum();
        if delivered >= options.messages || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Taken before the bench reads the receipts back.
    let redis_stats = options
        .redis_stats
        .then(|| command_stats(&mut redis.connection(), own_xlen));
    let receipts = read_receipts(&mut redis.connection(), &streams);
    let elapsed_ms = receipts
        .iter()
        .map(|r| r.delivered_at_ms)
        .max()
        .unwrap_or_default()
        - receipts
            .iter()
            .map(|r| r.delivered_at_ms - r.latency_ms)
            .min()
            .unwrap_or_default();
    let mut per_message: HashMap<&str, usize> = HashMap::new();
    for receipt in &receipts {
        *per_message.entry(receipt.message_id.as_str()).or_default() += 1;
    }
    let lost = options.messages.saturating_sub(per_message.len());
    let duplicated: usize =
        per_message.values().map(|n| n - 1).sum::<usize>() + sink.repeated_keys();
    // Per chat, replies delivered after a reply to a later message.
    let mut latest_per_chat: HashMap<&str, usize> = HashMap::new();
    let mut out_of_order = 0;
    for receipt in &receipts {
        let Some(n) = receipt
            .message_id
            .strip_prefix("bench-")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let latest = latest_per_chat.entry(receipt.chat.as_str()).or_insert(n);
        if n < *latest {
            out_of_order += 1;
        }
        *latest = (*latest).max(n);
    }
    let mut latencies: Vec<i64> = receipts.iter().map(|r| r.latency_ms).collect();
    latencies.sort_unstable();
    let throughput = per_message.len() as f64 / (elapsed_ms.max(1) as f64 / 1000.0);
    let (p50, p90, p99, max) = (
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
    );

    println!("| what | value |");
    println!("| --- | --- |");
    println!(
        "| messages pushed | {} via {} ({} chats, rate {}) |",
        options.messages,
        options.via,
        options.chats,
        options.rate.map_or("max".into(), |r| format!("{r}/s"))
    );
    println!("| replies delivered to | {} |", options.platform);
    println!("| delivered (unique) | {} |", per_message.len());
    println!("| lost | {lost} |");
    println!("| duplicated | {duplicated} |");
    println!("| push time | {:.2} s |", pushed.as_secs_f64());
    println!(
        "| first accepted → last delivered | {:.2} s |",
        elapsed_ms as f64 / 1000.0
    );
    println!("| throughput | {throughput:.0} msgs/s |");
    println!("| latency p50 / p90 / p99 / max | {p50} / {p90} / {p99} / {max} ms |");
    println!("| replies out of order in their chat | {out_of_order} (counted for --via stream) |");
    if let Some(llm) = &llm {
        println!(
            "| LLM stand-in | {:?} per answer, in-flight cap {}, peak in flight {} |",
            options.llm_delay.unwrap_or_default(),
            options.llm_in_flight,
            llm.peak_in_flight.load(std::sync::atomic::Ordering::SeqCst)
        );
    }
    println!(
        "{}",
        serde_json::json!({
            "messages": options.messages,
            "lost": lost,
            "duplicated": duplicated,
            "throughput_msgs_per_s": throughput.round(),
            "p50_ms": p50,
            "p99_ms": p99,
            "via": options.via,
            "out_of_order": out_of_order,
        })
    );
    if let Some(rows) = &redis_stats {
        print_redis_stats(rows, options.messages);
    }
    drop(pipeline);
    if lost > 0 || duplicated > 0 {
        std::process::exit(1);
    }
}

/// Redis's calls and time by command (from `INFO commandstats`), busiest
/// first, without the `own_xlen` XLENs the bench sent to wait for the
/// receipts (their time taken out at the command's mean).
fn command_stats(connection: &mut redis::Connection, own_xlen: u64) -> Vec<(String, u64, u64)> {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(connection)
        .expect("INFO");
    let mut rows: Vec<(String, u64, u64)> = info
        .lines()
        .filter_map(|line| {
            let (name, stats) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let field = |key: &str| {
                stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
            };
            let (mut calls, mut usec) = (field("calls")?, field("usec")?);
            if name == "xlen" && calls > 0 {
                let own = own_xlen.min(calls);
                usec -= usec * own / calls;
                calls -= own;
            }
            Some((name.to_string(), calls, usec))
        })
        .filter(|(_, calls, _)| *calls > 0)
        .collect();
    rows.sort_by_key(|(_, _, usec)| std::cmp::Reverse(*usec));
    rows
}

/// Where Redis spent its time, by command, to the standard error, busiest
/// first, with calls per message pushed.
fn print_redis_stats(rows: &[(String, u64, u64)], messages: usize) {
    let messages = messages.max(1) as f64;
    eprintln!("| redis command | calls | per message | total ms | µs per call |");
    eprintln!("| --- | --- | --- | --- | --- |");
    for (name, calls, usec) in rows.iter().take(15) {
        eprintln!(
            "| {name} | {calls} | {:.2} | {} | {:.1} |",
            *calls as f64 / messages,
            usec / 1000,
            *usec as f64 / (*calls).max(1) as f64
        );
    }
    let calls: u64 = rows.iter().map(|(_, calls, _)| calls).sum();
    let usec: u64 = rows.iter().map(|(_, _, usec)| usec).sum();
    eprintln!(
        "| **all** | {calls} | {:.2} | {} | {:.1} |",
        calls as f64 / messages,
        usec / 1000,
        usec as f64 / calls.max(1) as f64
    );
}
