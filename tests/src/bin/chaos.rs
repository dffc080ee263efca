//! `scripts/chaos` and `scripts/soak`: the whole pipeline on this machine
//! under a steady load of unique messages through the generic API, replies
//! to a local signed-webhook sink that records every send.
//!
//! Chaos (the default): redis-server with AOF (`appendfsync everysec`), two
//! replicas of classify, respond and egress, and one fault after another,
//! each for `--phase-secs`, then `--settle-secs` without it: `kill -9` of
//! random stage processes, SIGTERM of each process, `kill -9` of an owner
//! of respond's and then of egress's partitions while they move to a third
//! replica just added (which then goes again), `kill -9` of Redis and
//! a restart from its AOF, Redis frozen (SIGSTOP) past the blocking read,
//! the sink answering 500, 429 with `Retry-After`, and not at all, a poison
//! entry in each stream, Redis out of memory. Then every accepted message
//! is waited for (delivered or dead-lettered), and a table is printed, one
//! row per fault (messages sent from its start to the next fault's start),
//! and one JSON line with the totals. Exits 1 if a message was lost or
//! answered twice (two distinct replies), or a check failed.
//!
//! Soak (`--soak`): the same pipeline, no faults, `--minutes` at `--rate`;
//! the RSS of every process at the start, every `--window-minutes` and at
//! the end, latency percentiles per window; a table and a JSON line.
//!
//! "Doubled" counts messages given two distinct replies (two idempotency
//! keys): a bug. "Repeated key" counts requests that repeated an
//! idempotency key the sink had already accepted: the one window botline
//! leaves (a send interrupted between the platform's answer and egress's
//! record of it), which a receiver drops by the key.

use botline_shared::codec;
use botline_shared::message::{ClassifiedMessage, DeadLetter, Reply, UnifiedMessage};
use botline_shared::streams::Streams;
use botline_shared::testing::{add_entry, RedisServer};
use botline_tests::sink::{Answer, Received, Sink};
use botline_tests::{metric_value, streams_of, token, Pipeline, StageProcess, WEBHOOK_SECRET};
use rand::Rng;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const USAGE: &str = "usage: scripts/chaos [--rate MSGS_PER_S] [--phase-secs S] [--settle-secs S] [--kills N] [--freeze-secs S] [--chats N] [--drain-secs S]
       scripts/soak [--rate MSGS_PER_S] [--minutes N] [--window-minutes N] [--chats N] [--drain-secs S] [--config FILE.toml]";

struct Options {
    soak: bool,
    /// Messages per second offered to the generic API.
    rate: f64,
    chats: usize,
    /// How long each fault lasts (chaos).
    phase: Duration,
    /// Load without a fault after each one, before the next (chaos).
    settle: Duration,
    /// `kill -9`s in the kill phase.
    kills: usize,
    /// How long Redis stays frozen; longer than the blocking read (1 s).
    freeze: Duration,
    /// How long to wait, after the load, for every accepted message.
    drain: Duration,
    /// Soak: total time, and the window of the memory samples and latency.
    minutes: f64,
    window_minutes: f64,
    /// Settings laid over the pipeline's (`--config FILE`).
    config: Option<String>,
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        soak: false,
        rate: 200.0,
        chats: 200,
        phase: Duration::from_secs(20),
        settle: Duration::from_secs(5),
        kills: 4,
        freeze: Duration::from_secs(4),
        drain: Duration::from_secs(300),
        minutes: 60.0,
        window_minutes: 10.0,
        config: None,
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        let number = |value: String| value.parse::<f64>().map_err(|e| format!("{flag}: {e}"));
        let mut take = || number(value()?);
        match flag.as_str() {
            "--config" => {
                let path = args.next().ok_or("--config needs a value")?;
                options.config = Some(
                    std::fs::read_to_string(&path).map_err(|e| format!("--config {path}: {e}"))?,
                );
            }
            "--soak" => options.soak = true,
            "--rate" => options.rate = take()?,
            "--chats" => options.chats = take()? as usize,
            "--phase-secs" => options.phase = Duration::from_secs_f64(take()?),
            "--settle-secs" => options.settle = Duration::from_secs_f64(take()?),
            "--kills" => options.kills = take()? as usize,
            "--freeze-secs" => options.freeze = Duration::from_secs_f64(take()?),
            "--drain-secs" => options.drain = Duration::from_secs_f64(take()?),
            "--minutes" => options.minutes = take()?,
            "--window-minutes" => options.window_minutes = take()?,
            "--help" | "-h" => return Err(USAGE.into()),
            other => return Err(format!("unknown option {other}\n{USAGE}")),
        }
    }
    if options.rate <= 0.0 || options.chats == 0 || options.window_minutes <= 0.0 {
        return Err("--rate, --chats and --window-minutes must be positive".into());
    }
    Ok(options)
}

// ---------------------------------------------------------------- the load

/// One message offered to the API.
#[derive(Debug, Clone)]
struct Sent {
    event_id: String,
    /// The fault (chaos) or window (soak) it was sent in.
    phase: usize,
    sent_at: Instant,
    /// The message id from a 202 (a 200 "duplicate" carries none).
    message_id: Option<String>,
    accepted: bool,
    /// 429/503 answers before it was accepted.
    pushbacks: u32,
    /// Set when the sender gave up on it.
    refused: Option<String>,
}

struct Load {
    ledger: Arc<Mutex<Vec<Sent>>>,
    phase: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    /// Offer `rate` unique messages a second over `chats` chats until stopped.
    fn start(base_url: &str, rate: f64, chats: usize) -> Load {
        let ledger = Arc::new(Mutex::new(Vec::new()));
        let phase = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let http = reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()
            .expect("client");
        let url = format!("{base_url}/v1/messages");
        let task = tokio::spawn({
            let (ledger, phase, stop) = (ledger.clone(), phase.clone(), stop.clone());
            async move {
                let bearer = token();
                let started = Instant::now();
                let mut sends = tokio::task::JoinSet::new();
                for n in 0.. {
                    let slot = started + Duration::from_secs_f64(n as f64 / rate);
                    tokio::time::sleep_until(slot.into()).await;
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let index = {
                        let mut ledger = ledger.lock().unwrap();
                        ledger.push(Sent {
                            event_id: format!("chaos-{n}"),
                            phase: phase.load(Ordering::SeqCst),
                            sent_at: Instant::now(),
                            message_id: None,
                            accepted: false,
                            pushbacks: 0,
                            refused: None,
                        });
                        ledger.len() - 1
                    };
                    let chat = format!("chat-{}", n % chats);
                    sends.spawn(send(
                        http.clone(),
                        url.clone(),
                        bearer.clone(),
                        ledger.clone(),
                        index,
                        chat,
                    ));
                    while sends.try_join_next().is_some() {}
                }
                while sends.join_next().await.is_some() {}
            }
        });
        Load {
            ledger,
            phase,
            stop,
            task,
        }
    }

    fn set_phase(&self, phase: usize) {
        self.phase.store(phase, Ordering::SeqCst);
    }

    /// Stop offering, and wait for every send in flight to be accepted or given up.
    async fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::SeqCst);
        self.task.await.expect("load task");
        let ledger = self.ledger.lock().unwrap().clone();
        ledger
    }
}

/// POST one message, retrying connection errors, timeouts, 429 and 503
/// with the same event id (as a platform would) for up to ten minutes.
async fn send(
    http: reqwest::Client,
    url: String,
    bearer: String,
    ledger: Arc<Mutex<Vec<Sent>>>,
    index: usize,
    chat: String,
) {
    let event_id = ledger.lock().unwrap()[index].event_id.clone();
    let body = serde_json::json!({
        "event_id": event_id,
        "platform": "webhook",
        "chat": { "id": chat },
        "sender": { "id": format!("user-{chat}"), "name": "Ada" },
        "text": format!("chaos {event_id}"),
    });
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let answer = http
            .post(&url)
            .bearer_auth(&bearer)
            .json(&body)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let mut pushback = false;
        match answer {
            Ok(response) if response.status().is_success() => {
                let json: serde_json::Value = response.json().await.unwrap_or_default();
                let mut ledger = ledger.lock().unwrap();
                ledger[index].accepted = true;
                ledger[index].message_id = json["id"].as_str().map(str::to_string);
                return;
            }
            Ok(response) if matches!(response.status().as_u16(), 429 | 503) => pushback = true,
            Ok(response) => {
                let refused = format!("{}", response.status());
                ledger.lock().unwrap()[index].refused = Some(refused);
                return;
            }
            Err(_) => {}
        }
        if pushback {
            ledger.lock().unwrap()[index].pushbacks += 1;
        }
        if Instant::now() > deadline {
            ledger.lock().unwrap()[index].refused = Some("gave up after 10 minutes".into());
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------- the setup

/// redis-server with AOF, the sink, the four stages and a second classify,
/// respond and egress: the pipeline with `streams_extra` in its
/// `[streams]`, and `config` (the `--config` file) laid over it all; and
/// the key layout the stages use with those settings.
///
/// A message left for a retry (the sink failing) is tried again after
/// 10 s (`retry_ms`); a killed or frozen owner's partitions pass to the
/// other replica after `lease_ttl_ms` (the default, 6 s).
async fn start(
    streams_extra: &str,
    config: Option<&str>,
) -> (RedisServer, Sink, Pipeline, Streams) {
    let redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "everysec"]);
    let sink = Sink::start(WEBHOOK_SECRET).await;
    let overlay = format!(
        "[runner]\nretry_ms = 10000\n\
         [streams]\ndelivered_max_len = 2000000\n{streams_extra}\
         [egress.webhook]\nurl = \"{}\"\ntimeout_ms = 2000\n",
        sink.url
    );
    let overlay = match config {
        Some(config) => botline_tests::laid_over(&overlay, config)
            .unwrap_or_else(|error| panic!("--config: {error}")),
        None => overlay,
    };
    let mut pipeline = Pipeline::start(&redis, &overlay);
    for stage in ["classify", "respond", "egress"] {
        pipeline.add(stage);
    }
    pipeline.wait_ready(Duration::from_secs(120)).await;
    let streams = streams_of(&overlay);
    (redis, sink, pipeline, streams)
}

/// Every entry of `key`, as read.
fn entries_of(
    connection: &mut redis::Connection,
    key: &str,
) -> Vec<botline_shared::redis_conn::RawEntry> {
    let reply: redis::Value = redis::cmd("XRANGE")
        .arg(key)
        .arg("-")
        .arg("+")
        .query(connection)
        .unwrap_or_else(|error| panic!("XRANGE {key}: {error}"));
    botline_shared::redis_conn::parse_entries(key, reply)
        .unwrap_or_else(|error| panic!("entries of {key}: {error}"))
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

fn label(process: &StageProcess, index: usize) -> String {
    format!("{}#{index}", process.stage)
}

/// The group and streams a stage reads, in every partition (none for ingest).
fn reads(stage: &str, streams: &Streams) -> Option<(&'static str, Vec<String>)> {
    match stage {
        "classify" => Some((
            "classify",
            streams.all().map(|p| streams.inbound(p)).collect(),
        )),
        "respond" => Some(("respond", streams.all().map(|p| streams.queue(p)).collect())),
        "egress" => Some((
            "egress",
            streams
                .all()
                .map(|p| streams.outbound(p, "webhook"))
                .collect(),
        )),
        _ => None,
    }
}

/// The consumer name `pid` holds in `group` (from its lease).
fn consumer_of(redis: &RedisServer, streams: &Streams, group: &str, pid: u32) -> Option<String> {
    let mut connection = redis.connection();
    let prefix = streams.consumer_lease(group, "");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut connection)
        .ok()?;
    keys.into_iter().find_map(|key| {
        let holder: String = redis::cmd("GET").arg(&key).query(&mut connection).ok()?;
        holder
            .contains(&format!("|{pid}|"))
            .then(|| key[prefix.len()..].to_string())
    })
}

fn pending_of(redis: &RedisServer, stream: &str, group: &str, consumer: &str) -> usize {
    let entries: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .arg("-")
        .arg("+")
        .arg(1000)
        .arg(consumer)
        .query(&mut redis.connection())
        .unwrap_or(redis::Value::Nil);
    match entries {
        redis::Value::Array(entries) => entries.len(),
        _ => 0,
    }
}

fn used_memory(redis: &RedisServer) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("memory")
        .query(&mut redis.connection())
        .unwrap_or_default();
    info.lines()
        .find_map(|line| line.strip_prefix("used_memory:")?.trim().parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------- the faults

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Baseline,
    KillNine,
    Terminate,
    RebalanceKill,
    RedisKill,
    RedisFreeze,
    Sink500,
    Sink429,
    SinkHang,
    Poison,
    RedisOom,
}

const FAULTS: [Fault; 11] = [
    Fault::Baseline,
    Fault::KillNine,
    Fault::Terminate,
    Fault::RebalanceKill,
    Fault::RedisKill,
    Fault::RedisFreeze,
    Fault::Sink500,
    Fault::Sink429,
    Fault::SinkHang,
    Fault::Poison,
    Fault::RedisOom,
];

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Baseline => "none (baseline)",
            Fault::KillNine => "kill -9 of random stage processes",
            Fault::Terminate => "SIGTERM of each stage process",
            Fault::RebalanceKill => "kill -9 of an owner mid-rebalance (respond, egress)",
            Fault::RedisKill => "kill -9 of Redis, restart from AOF",
            Fault::RedisFreeze => "Redis frozen (SIGSTOP)",
            Fault::Sink500 => "sink answers 500",
            Fault::Sink429 => "sink answers 429 + Retry-After: 1",
            Fault::SinkHang => "sink hangs (past egress timeout)",
            Fault::Poison => "poison entry in in, q, out:webhook",
            Fault::RedisOom => "Redis out of memory",
        }
    }
}

struct Phase {
    fault: Fault,
    started: Instant,
    /// When the fault was lifted (or, for poison, injected).
    fault_end: Instant,
    notes: Vec<String>,
    /// Checks that failed (a SIGTERM exit status, a pending list left).
    failures: Vec<String>,
    /// Entry ids of the poison entries added.
    poison: Vec<String>,
}

struct Chaos<'a> {
    redis: &'a mut RedisServer,
    sink: &'a Sink,
    pipeline: &'a mut Pipeline,
    streams: Streams,
    options: &'a Options,
}

impl Chaos<'_> {
    /// Inject `phase.fault` for the phase's time; returns when it is lifted.
    async fn inject(&mut self, phase: &mut Phase) {
        let length = self.options.phase;
        let until = Instant::now() + length;
        match phase.fault {
            Fault::Baseline => tokio::time::sleep(length).await,
            Fault::KillNine => {
                let kills = self.options.kills.max(1);
                let slot = length / kills as u32;
                for kill in 0..kills {
                    let slot_end = phase.started + slot * (kill as u32 + 1);
                    let (wait, pause, index) = {
                        let mut rng = rand::rng();
                        (
                            slot.mul_f64(rng.random_range(0.0..0.6)),
                            Duration::from_millis(rng.random_range(200..1500)),
                            rng.random_range(0..self.pipeline.processes.len()),
                        )
                    };
                    tokio::time::sleep(wait).await;
                    let process = &mut self.pipeline.processes[index];
                    process.kill9();
                    tokio::time::sleep(pause).await;
                    process.start_again();
                    phase.notes.push(format!(
                        "killed {} for {} ms",
                        label(process, index),
                        pause.as_millis()
                    ));
                    tokio::time::sleep_until(slot_end.into()).await;
                }
            }
            Fault::Terminate => {
                for index in 0..self.pipeline.processes.len() {
                    let (stage, pid) = {
                        let process = &self.pipeline.processes[index];
                        (process.stage, process.pid())
                    };
                    let consumer = reads(stage, &self.streams).and_then(|(group, streams)| {
                        consumer_of(self.redis, &self.streams, group, pid)
                            .map(|consumer| (group, streams, consumer))
                    });
                    let took = Instant::now();
                    let process = &mut self.pipeline.processes[index];
                    let name = label(process, index);
                    let status =
                        tokio::task::block_in_place(|| process.terminate(Duration::from_secs(30)));
                    let took = took.elapsed();
                    let pending: usize = consumer
                        .as_ref()
                        .map(|(group, streams, consumer)| {
                            streams
                                .iter()
                                .map(|stream| pending_of(self.redis, stream, group, consumer))
                                .sum()
                        })
                        .unwrap_or(0);
                    phase.notes.push(format!(
                        "{name}: {status} after {} ms, {pending} pending{}",
                        took.as_millis(),
                        consumer
                            .as_ref()
                            .map(|(_, _, c)| format!(" ({c})"))
                            .unwrap_or_default()
                    ));
                    if !status.success() {
                        phase.failures.push(format!("{name} exited with {status}"));
                    }
                    if pending > 0 {
                        phase
                            .failures
                            .push(format!("{name} left {pending} entries pending"));
                    }
                    if reads(stage, &self.streams).is_some() && consumer.is_none() {
                        phase
                            .notes
                            .push(format!("{name}: its consumer name was not found"));
                    }
                    process.start_again();
                    self.pipeline.wait_ready(Duration::from_secs(60)).await;
                }
                tokio::time::sleep_until(until.into()).await;
            }
            Fault::RebalanceKill => {
                // Respond's owner is killed before it gives anything up,
                // egress's right after it gave some up.
                self.kill_mid_rebalance("respond", false, phase).await;
                self.kill_mid_rebalance("egress", true, phase).await;
                phase.fault_end = Instant::now();
                tokio::time::sleep_until(until.into()).await;
                return;
            }
            Fault::RedisKill => {
                tokio::time::sleep(length / 3).await;
                self.redis.kill9();
                tokio::time::sleep(Duration::from_secs(1)).await;
                let down = Instant::now();
                tokio::task::block_in_place(|| self.redis.start_again());
                phase.notes.push(format!(
                    "Redis down 1 s, AOF loaded in {} ms",
                    down.elapsed().as_millis()
                ));
                phase.fault_end = Instant::now();
                tokio::time::sleep_until(until.into()).await;
                return;
            }
            Fault::RedisFreeze => {
                tokio::time::sleep(length / 4).await;
                signal(self.redis.pid(), "STOP");
                tokio::time::sleep(self.options.freeze).await;
                signal(self.redis.pid(), "CONT");
                phase.notes.push(format!(
                    "frozen {} s (blocking read: 1 s)",
                    self.options.freeze.as_secs_f64()
                ));
                phase.fault_end = Instant::now();
                tokio::time::sleep_until(until.into()).await;
                return;
            }
            Fault::Sink500 | Fault::Sink429 | Fault::SinkHang => {
                self.sink.answer_with(match phase.fault {
                    Fault::Sink500 => Answer::Status(500),
                    Fault::Sink429 => Answer::RetryAfter(1),
                    _ => Answer::Hang,
                });
                tokio::time::sleep(length).await;
                self.sink.answer_with(Answer::Ok);
            }
            Fault::Poison => {
                let mut connection = self.redis.connection();
                let garbage = vec![
                    ("v".to_string(), b"1".to_vec()),
                    ("body".to_string(), b"\x93\xff chaos poison".to_vec()),
                ];
                // Each in a partition of its own choosing: every
                // partition has an owner that must dead-letter it.
                let p = rand::rng().random_range(self.streams.all());
                let partitions = self.streams.partitions();
                for stream in [
                    self.streams.inbound(p),
                    self.streams.queue((p + 1) % partitions),
                    self.streams.outbound((p + 2) % partitions, "webhook"),
                ] {
                    phase
                        .poison
                        .push(add_entry(&mut connection, &stream, &garbage));
                    phase.notes.push(format!("poison entry in {stream}"));
                }
                phase.fault_end = Instant::now();
                tokio::time::sleep(length).await;
                return;
            }
            Fault::RedisOom => {
                let used = used_memory(self.redis);
                let limit = (used / 2).max(1);
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory")
                    .arg(limit)
                    .query(&mut self.redis.connection())
                    .expect("CONFIG SET maxmemory");
                phase
                    .notes
                    .push(format!("maxmemory {limit} bytes (used {used}), noeviction"));
                tokio::time::sleep(length).await;
                let _: () = redis::cmd("CONFIG")
                    .arg("SET")
                    .arg("maxmemory")
                    .arg(0)
                    .query(&mut self.redis.connection())
                    .expect("CONFIG SET maxmemory 0");
            }
        }
        phase.fault_end = Instant::now();
    }
}

impl Chaos<'_> {
    /// One more replica of `stage` (which runs two or more), and while the
    /// partitions move to it, `kill -9` of an old owner: with `kill_giver`
    /// the one that has just given partitions up (it keeps the rest), else
    /// the one that owns the most (the most still to give up); its
    /// partitions pass on when its lease runs out. Then it is started again, and the added
    /// replica is stopped with SIGTERM: the stage ends as it began. What
    /// was killed when, and the shares seen, go in the notes.
    async fn kill_mid_rebalance(
        &mut self,
        stage: &'static str,
        kill_giver: bool,
        phase: &mut Phase,
    ) {
        let partitions = self.streams.partitions();
        let even = |owned: &[u32]| balanced(owned, partitions);
        let old: Vec<usize> = self
            .pipeline
            .processes
            .iter()
            .enumerate()
            .filter(|(_, process)| process.stage == stage && process.is_running())
            .map(|(index, _)| index)
            .collect();
        if old.len() < 2 {
            phase
                .failures
                .push(format!("{stage}: {} replicas running, not two", old.len()));
            return;
        }
        let (before, settled) = self.wait_shares(stage, &old, SHARES_WITHIN, even).await;
        if settled.is_none() {
            phase.failures.push(format!(
                "{stage}: not balanced before the rebalance: {}",
                self.shares_text(&old, &before)
            ));
        }
        let owned_before = owned_of(&before);
        let logs_before: Vec<(usize, usize)> = old
            .iter()
            .map(|index| releases_logged(&self.pipeline.processes[*index]))
            .collect();
        let added_at = Instant::now();
        let added = self.pipeline.add(stage);
        let added_name = label(&self.pipeline.processes[added], added);
        let mut all = old.clone();
        all.push(added);
        // Moving: the new replica owns some, or an old owner has given some
        // up (they may be free for a moment), and the shares are not even.
        let mut seen = None;
        while added_at.elapsed() < SHARES_WITHIN {
            let shares = self.shares(stage, &all).await;
            let owned = owned_of(&shares);
            let moved =
                owned[old.len()] > 0 || owned.iter().zip(&owned_before).any(|(now, was)| now < was);
            if shares[..old.len()].iter().all(Option::is_some) && moved {
                seen = Some((shares, added_at.elapsed()));
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let Some((shares, after)) = seen else {
            phase.failures.push(format!(
                "{stage}: no partition moved within {} s of adding {added_name}",
                SHARES_WITHIN.as_secs()
            ));
            let _ = tokio::task::block_in_place(|| {
                self.pipeline.processes[added].terminate(Duration::from_secs(30))
            });
            self.pipeline.processes.remove(added);
            return;
        };
        let owned = owned_of(&shares);
        let moving = !even(&owned);
        let gave = |i: usize| owned_before[i].saturating_sub(owned[i]);
        // Which of the old owners (its place in `old`).
        let at = match (0..old.len())
            .filter(|i| gave(*i) > 0)
            .max_by_key(|i| gave(*i))
        {
            Some(i) if kill_giver => i,
            _ => (0..old.len())
                .max_by_key(|i| (owned[*i], std::cmp::Reverse(*i)))
                .expect("two old owners"),
        };
        let victim = old[at];
        let victim_name = label(&self.pipeline.processes[victim], victim);
        let (giving, given) = releases_logged(&self.pipeline.processes[victim]);
        let (giving_before, given_before) = logs_before[at];
        self.pipeline.processes[victim].kill9();
        let killed_at = Instant::now();
        phase.notes.push(format!(
            "{stage}: added {added_name}; {} ms later the shares were {}{} → kill -9 of {victim_name}, \
             {} owned ({}; since the add it had logged {} \"giving a partition up\", {} \"partition given up\")",
            after.as_millis(),
            self.shares_text(&all, &shares),
            if moving { "" } else { " (already even: the move was over between two looks)" },
            owned[at],
            match gave(at) {
                0 => "nothing given up yet".to_string(),
                n => format!("{n} just given up"),
            },
            giving - giving_before,
            given - given_before,
        ));
        let survivors: Vec<usize> = all.iter().copied().filter(|i| *i != victim).collect();
        let (shares, took) = self
            .wait_shares(stage, &survivors, TAKEOVER_WITHIN, even)
            .await;
        match took {
            Some(_) => phase.notes.push(format!(
                "{stage}: {} ms after the kill: {}",
                killed_at.elapsed().as_millis(),
                self.shares_text(&survivors, &shares)
            )),
            None => phase.failures.push(format!(
                "{stage}: {victim_name}'s partitions not taken over within {} s of its kill: {}",
                TAKEOVER_WITHIN.as_secs(),
                self.shares_text(&survivors, &shares)
            )),
        }
        self.pipeline.processes[victim].start_again();
        let restarted = Instant::now();
        self.pipeline.wait_ready(Duration::from_secs(60)).await;
        let (shares, took) = self.wait_shares(stage, &all, SHARES_WITHIN, even).await;
        match took {
            Some(_) => phase.notes.push(format!(
                "{stage}: {victim_name} started again {} ms after its kill; {} ms later: {}",
                restarted.duration_since(killed_at).as_millis(),
                restarted.elapsed().as_millis(),
                self.shares_text(&all, &shares)
            )),
            None => phase.failures.push(format!(
                "{stage}: not balanced within {} s of starting {victim_name} again: {}",
                SHARES_WITHIN.as_secs(),
                self.shares_text(&all, &shares)
            )),
        }
        // The added replica goes as the Terminate phase's do: exit 0, and
        // what it read finished (entries whose chat waits for a retry stay
        // pending for the next owner; noted, not checked).
        let pid = self.pipeline.processes[added].pid();
        let consumer = reads(stage, &self.streams).and_then(|(group, streams)| {
            consumer_of(self.redis, &self.streams, group, pid)
                .map(|consumer| (group, streams, consumer))
        });
        let terminated = Instant::now();
        let status = tokio::task::block_in_place(|| {
            self.pipeline.processes[added].terminate(Duration::from_secs(30))
        });
        let took = terminated.elapsed();
        let pending: usize = consumer
            .as_ref()
            .map(|(group, streams, consumer)| {
                streams
                    .iter()
                    .map(|stream| pending_of(self.redis, stream, group, consumer))
                    .sum()
            })
            .unwrap_or(0);
        if !status.success() {
            phase
                .failures
                .push(format!("{added_name} exited with {status}"));
        }
        self.pipeline.processes.remove(added);
        let (shares, balanced) = self.wait_shares(stage, &old, SHARES_WITHIN, even).await;
        phase.notes.push(format!(
            "{stage}: {added_name} SIGTERM: {status} after {} ms, {pending} pending{}; {} ms later: {}",
            took.as_millis(),
            consumer
                .as_ref()
                .map(|(_, _, c)| format!(" ({c})"))
                .unwrap_or_default(),
            terminated.elapsed().as_millis(),
            self.shares_text(&old, &shares)
        ));
        if balanced.is_none() {
            phase.failures.push(format!(
                "{stage}: not balanced within {} s of stopping {added_name}",
                SHARES_WITHIN.as_secs()
            ));
        }
    }

    /// `botline_stage_partitions_owned` and
    /// `botline_stage_partitions_taken_total` of each of `indices` (all of
    /// `stage`), asked at once; `None` for one that does not answer.
    async fn shares(&self, stage: &str, indices: &[usize]) -> Vec<Option<(u32, u64)>> {
        let owned = format!("botline_stage_partitions_owned{{stage=\"{stage}\"}}");
        let taken = format!("botline_stage_partitions_taken_total{{stage=\"{stage}\"}}");
        let texts = futures_util::future::join_all(indices.iter().map(|index| {
            let process = &self.pipeline.processes[*index];
            async move {
                match process.is_running() {
                    true => process.metrics().await,
                    false => String::new(),
                }
            }
        }))
        .await;
        texts
            .iter()
            .map(|text| {
                let owned = metric_value(text, &owned)?;
                let taken = metric_value(text, &taken)?;
                Some((owned as u32, taken as u64))
            })
            .collect()
    }

    /// Look at the shares of `indices` every 20 ms until every one answers
    /// and `done` holds of the partitions they own, or `within` passes:
    /// the last shares seen, and how long it took if `done` held.
    async fn wait_shares(
        &self,
        stage: &str,
        indices: &[usize],
        within: Duration,
        done: impl Fn(&[u32]) -> bool,
    ) -> (Vec<Option<(u32, u64)>>, Option<Duration>) {
        let started = Instant::now();
        loop {
            let shares = self.shares(stage, indices).await;
            if shares.iter().all(Option::is_some) && done(&owned_of(&shares)) {
                return (shares, Some(started.elapsed()));
            }
            if started.elapsed() > within {
                return (shares, None);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// "respond#2 6 owned (10 taken), …": what each of `indices` reported.
    fn shares_text(&self, indices: &[usize], shares: &[Option<(u32, u64)>]) -> String {
        indices
            .iter()
            .zip(shares)
            .map(|(index, share)| {
                let name = label(&self.pipeline.processes[*index], *index);
                match share {
                    Some((owned, taken)) => format!("{name} {owned} owned ({taken} taken)"),
                    None => format!("{name} not answering"),
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// How long a stage's shares may take to even out after a change (a join
/// takes a few ownership ticks, a second apart at most).
const SHARES_WITHIN: Duration = Duration::from_secs(30);

/// How long a killed owner's partitions may take to pass on: its lease
/// (`lease_ttl_ms`, 6 s by default) and member entry run out, then a tick.
const TAKEOVER_WITHIN: Duration = Duration::from_secs(40);

/// The partitions owned, per process (0 for one that did not answer).
fn owned_of(shares: &[Option<(u32, u64)>]) -> Vec<u32> {
    shares
        .iter()
        .map(|share| share.map_or(0, |(owned, _)| owned))
        .collect()
}

/// All `partitions` owned, and no consumer owning two more than another.
fn balanced(owned: &[u32], partitions: u32) -> bool {
    let (Some(min), Some(max)) = (owned.iter().min(), owned.iter().max()) else {
        return false;
    };
    owned.iter().sum::<u32>() == partitions && max - min <= 1
}

/// How many times `process`'s log says "giving a partition up" (a release
/// begun) and "partition given up" (one finished), over all its runs.
fn releases_logged(process: &StageProcess) -> (usize, usize) {
    let log = process.log();
    (
        log.matches("giving a partition up").count(),
        log.matches("partition given up").count(),
    )
}

// ---------------------------------------------------------------- the count

/// What became of the accepted messages, read back from Redis and the sink.
struct Outcome {
    /// Message id → event id, from the 202s and the `in` stream.
    event_of: HashMap<String, String>,
    /// Event id → requests the sink accepted for it, oldest first.
    received: HashMap<String, Vec<Received>>,
    /// Event id → dead-letter reasons.
    dead: HashMap<String, Vec<String>>,
    /// Dead letters whose entry does not decode (the poison), by entry id.
    undecodable: Vec<DeadLetter>,
}

fn read_outcome(redis: &RedisServer, sink: &Sink, ledger: &[Sent], streams: &Streams) -> Outcome {
    let mut connection = redis.connection();
    let mut event_of: HashMap<String, String> = ledger
        .iter()
        .filter_map(|s| Some((s.message_id.clone()?, s.event_id.clone())))
        .collect();
    let inbound = streams
        .all()
        .flat_map(|p| entries_of(&mut connection, &streams.inbound(p)));
    for entry in inbound.collect::<Vec<_>>() {
        let Some(fields) = entry.fields else { continue };
        let Ok(message) =
            codec::decode::<UnifiedMessage>(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
        else {
            continue;
        };
        if let Some(event) = message.text.strip_prefix("chaos ") {
            event_of.insert(message.id, event.to_string());
        }
    }
    let mut received: HashMap<String, Vec<Received>> = HashMap::new();
    for request in sink.received() {
        if let Some(event) = event_of.get(&request.in_reply_to) {
            received.entry(event.clone()).or_default().push(request);
        }
    }
    let mut dead: HashMap<String, Vec<String>> = HashMap::new();
    let mut undecodable = Vec::new();
    let letters = streams
        .all()
        .flat_map(|p| entries_of(&mut connection, &streams.dead(p)))
        .collect::<Vec<_>>();
    for entry in letters {
        let fields = entry.fields.expect("a dead letter has fields");
        let letter: DeadLetter =
            codec::decode(fields.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
                .expect("a dead letter decodes");
        let fields = || {
            letter
                .fields
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_slice()))
        };
        let (stream, _) = streams.short(&letter.stream);
        let message_id = if stream == "in" {
            codec::decode::<UnifiedMessage>(fields()).map(|m| m.id).ok()
        } else if stream == "q" {
            codec::decode::<ClassifiedMessage>(fields())
                .map(|m| m.message.id)
                .ok()
        } else {
            codec::decode::<Reply>(fields()).map(|r| r.in_reply_to).ok()
        };
        match message_id.and_then(|id| event_of.get(&id)) {
            Some(event) => dead.entry(event.clone()).or_default().push(letter.error),
            None => undecodable.push(letter),
        }
    }
    Outcome {
        event_of,
        received,
        dead,
        undecodable,
    }
}

/// Messages accepted and neither delivered nor dead-lettered yet.
fn outstanding(ledger: &[Sent], outcome: &Outcome) -> usize {
    ledger
        .iter()
        .filter(|s| {
            s.accepted
                && !outcome.received.contains_key(&s.event_id)
                && !outcome.dead.contains_key(&s.event_id)
        })
        .count()
}

/// Wait (up to `within`) until every accepted message is delivered or dead.
async fn drain(
    redis: &RedisServer,
    sink: &Sink,
    ledger: &[Sent],
    streams: &Streams,
    within: Duration,
) -> Outcome {
    let deadline = Instant::now() + within;
    let mut last_report = Instant::now();
    loop {
        let outcome = read_outcome(redis, sink, ledger, streams);
        let left = outstanding(ledger, &outcome);
        if left == 0 || Instant::now() > deadline {
            return outcome;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            eprintln!("waiting for {left} messages …");
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

fn percentile(sorted: &[u128], p: f64) -> u128 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

#[derive(Default)]
struct Row {
    sent: usize,
    accepted: usize,
    refused: usize,
    pushbacks: u64,
    delivered: usize,
    dead: usize,
    reasons: BTreeMap<String, usize>,
    lost: usize,
    doubled: usize,
    repeated_keys: usize,
    latencies_ms: Vec<u128>,
}

fn short_reason(reason: &str) -> String {
    let reason: String = reason.chars().take(60).collect();
    reason.replace('|', "/")
}

/// One row per phase (fault or window) from the ledger and the outcome.
fn rows(ledger: &[Sent], outcome: &Outcome, phases: usize) -> Vec<Row> {
    let mut rows: Vec<Row> = (0..phases).map(|_| Row::default()).collect();
    for sent in ledger {
        let row = &mut rows[sent.phase.min(phases - 1)];
        row.sent += 1;
        row.pushbacks += u64::from(sent.pushbacks);
        if !sent.accepted {
            row.refused += 1;
            continue;
        }
        row.accepted += 1;
        if let Some(requests) = outcome.received.get(&sent.event_id) {
            row.delivered += 1;
            let keys: HashSet<&str> = requests
                .iter()
                .map(|r| r.idempotency_key.as_str())
                .collect();
            if keys.len() > 1 {
                row.doubled += 1;
            }
            row.repeated_keys += requests.len() - keys.len();
            let first = requests.iter().map(|r| r.at).min().expect("one");
            row.latencies_ms
                .push(first.saturating_duration_since(sent.sent_at).as_millis());
        } else if let Some(reasons) = outcome.dead.get(&sent.event_id) {
            row.dead += 1;
            for reason in reasons {
                *row.reasons.entry(short_reason(reason)).or_default() += 1;
            }
        } else {
            row.lost += 1;
        }
    }
    for row in &mut rows {
        row.latencies_ms.sort_unstable();
    }
    rows
}

fn ms(duration: Option<Duration>) -> String {
    duration.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64()))
}

// ---------------------------------------------------------------- chaos

async fn chaos(options: Options) -> i32 {
    let (mut redis, sink, mut pipeline, streams) = start("", options.config.as_deref()).await;
    eprintln!(
        "pipeline ready (logs in {}); load {}/s over {} chats; {} faults × ({:?} + {:?} settle)",
        pipeline.dir.display(),
        options.rate,
        options.chats,
        FAULTS.len(),
        options.phase,
        options.settle
    );
    let load = Load::start(&pipeline.base_url(), options.rate, options.chats);
    let mut phases: Vec<Phase> = Vec::new();
    {
        let mut chaos = Chaos {
            redis: &mut redis,
            sink: &sink,
            pipeline: &mut pipeline,
            streams: streams.clone(),
            options: &options,
        };
        for (index, fault) in FAULTS.into_iter().enumerate() {
            load.set_phase(index);
            let now = Instant::now();
            let mut phase = Phase {
                fault,
                started: now,
                fault_end: now,
                notes: Vec::new(),
                failures: Vec::new(),
                poison: Vec::new(),
            };
            eprintln!("[{index}] {} …", fault.name());
            chaos.inject(&mut phase).await;
            tokio::time::sleep(options.settle).await;
            phases.push(phase);
        }
    }
    let offered_for = phases[0].started.elapsed();
    eprintln!(
        "faults done after {:.0} s; finishing the sends in flight …",
        offered_for.as_secs_f64()
    );
    let ledger = load.finish().await;
    eprintln!(
        "{} messages offered; waiting up to {:?} for each to be delivered or dead-lettered …",
        ledger.len(),
        options.drain
    );
    let outcome = drain(&redis, &sink, &ledger, &streams, options.drain).await;
    let rows = rows(&ledger, &outcome, phases.len());

    // Deliveries by time, for recovery: the first after each fault's end,
    // and when the last message sent during the fault was delivered.
    let mut delivered_at: Vec<Instant> = sink.received().iter().map(|r| r.at).collect();
    delivered_at.sort_unstable();
    let first_at: HashMap<&str, Instant> = outcome
        .received
        .iter()
        .map(|(event, requests)| {
            (
                event.as_str(),
                requests.iter().map(|r| r.at).min().expect("one"),
            )
        })
        .collect();

    println!("| fault | sent | delivered | dead-lettered (reason) | lost | doubled | repeated key | pushed back (429/503) | recovery: resumed / caught up (s) | latency p50 / p99 (ms) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut failures: Vec<String> = Vec::new();
    for (index, (phase, row)) in phases.iter().zip(&rows).enumerate() {
        let resumed = delivered_at
            .iter()
            .find(|at| **at >= phase.fault_end)
            .map(|at| at.duration_since(phase.fault_end));
        let during: Vec<&Sent> = ledger
            .iter()
            .filter(|s| s.phase == index && s.sent_at <= phase.fault_end && s.accepted)
            .collect();
        let caught_up = if during.iter().all(|s| {
            first_at.contains_key(s.event_id.as_str()) || outcome.dead.contains_key(&s.event_id)
        }) {
            during
                .iter()
                .filter_map(|s| first_at.get(s.event_id.as_str()))
                .max()
                .map(|at| at.saturating_duration_since(phase.fault_end))
        } else {
            None
        };
        let mut dead = row.dead.to_string();
        if !row.reasons.is_empty() {
            let reasons: Vec<String> = row
                .reasons
                .iter()
                .map(|(reason, n)| format!("{n}× {reason}"))
                .collect();
            dead = format!("{dead} ({})", reasons.join("; "));
        }
        let poison: Vec<&DeadLetter> = outcome
            .undecodable
            .iter()
            .filter(|d| phase.poison.contains(&d.entry_id))
            .collect();
        if !phase.poison.is_empty() {
            let reasons: Vec<String> = poison
                .iter()
                .map(|d| format!("{}: {}", d.stage, short_reason(&d.error)))
                .collect();
            dead = format!(
                "{dead} + {} of {} poison entries ({})",
                poison.len(),
                phase.poison.len(),
                reasons.join("; ")
            );
            if poison.len() != phase.poison.len() {
                failures.push(format!(
                    "only {} of {} poison entries reached dead",
                    poison.len(),
                    phase.poison.len()
                ));
            }
        }
        let refused = if row.refused > 0 {
            format!(" ({} never accepted)", row.refused)
        } else {
            String::new()
        };
        println!(
            "| {} | {}{refused} | {} | {dead} | {} | {} | {} | {} | {} / {} | {} / {} |",
            phase.fault.name(),
            row.sent,
            row.delivered,
            row.lost,
            row.doubled,
            row.repeated_keys,
            row.pushbacks,
            ms(resumed),
            ms(caught_up),
            percentile(&row.latencies_ms, 0.5),
            percentile(&row.latencies_ms, 0.99),
        );
        failures.extend(phase.failures.iter().cloned());
    }
    let total = |f: fn(&Row) -> usize| rows.iter().map(f).sum::<usize>();
    let (sent, accepted, delivered, dead, lost, doubled, repeated, refused) = (
        total(|r| r.sent),
        total(|r| r.accepted),
        total(|r| r.delivered),
        total(|r| r.dead),
        total(|r| r.lost),
        total(|r| r.doubled),
        total(|r| r.repeated_keys),
        total(|r| r.refused),
    );
    let pushbacks: u64 = rows.iter().map(|r| r.pushbacks).sum();
    let unknown_dead = outcome
        .undecodable
        .iter()
        .filter(|d| !phases.iter().any(|p| p.poison.contains(&d.entry_id)))
        .count();
    println!(
        "| **total** | {sent} | {delivered} | {dead} | {lost} | {doubled} | {repeated} | {pushbacks} | | |"
    );
    println!();
    for phase in &phases {
        for note in &phase.notes {
            println!("- {}: {note}", phase.fault.name());
        }
    }
    if unknown_dead > 0 {
        println!("- {unknown_dead} dead letters of no message sent here and no poison entry");
    }
    let unsigned = sink.received().iter().filter(|r| !r.signature_ok).count();
    if unsigned > 0 {
        failures.push(format!("{unsigned} requests with a bad signature"));
    }
    if refused > 0 {
        failures.push(format!("{refused} messages never accepted by the API"));
    }
    for failure in &failures {
        println!("- FAILED: {failure}");
    }
    println!(
        "{}",
        serde_json::json!({
            "mode": "chaos",
            "rate": options.rate,
            "phase_secs": options.phase.as_secs_f64(),
            "faults": phases.len() - 1,
            "sent": sent,
            "accepted": accepted,
            "delivered": delivered,
            "dead_lettered": dead,
            "poison_dead": outcome.undecodable.len() - unknown_dead,
            "lost": lost,
            "doubled": doubled,
            "repeated_key": repeated,
            "pushed_back": pushbacks,
            "never_accepted": refused,
            "failed_checks": failures.len(),
            "messages_mapped": outcome.event_of.len(),
        })
    );
    drop(pipeline);
    drop(redis);
    if lost > 0 || doubled > 0 || !failures.is_empty() {
        1
    } else {
        0
    }
}

// ---------------------------------------------------------------- soak

/// Minutes, with a decimal only when not whole.
fn minutes(duration: Duration) -> String {
    let minutes = duration.as_secs_f64() / 60.0;
    if (minutes - minutes.round()).abs() < 0.05 {
        format!("{minutes:.0}")
    } else {
        format!("{minutes:.1}")
    }
}

/// VmRSS of `pid` in KiB (0 if it is gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status.lines().find_map(|line| {
                line.strip_prefix("VmRSS:")?
                    .trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse()
                    .ok()
            })
        })
        .unwrap_or(0)
}

/// How many keys Redis holds (DBSIZE), and entries in every partition's
/// `delivered` (XLEN).
fn key_count(redis: &RedisServer, streams: &Streams) -> (u64, u64) {
    let mut connection = redis.connection();
    let keys = redis::cmd("DBSIZE").query(&mut connection).unwrap_or(0);
    let receipts = streams
        .all()
        .map(|p| {
            redis::cmd("XLEN")
                .arg(streams.delivered(p))
                .query::<u64>(&mut connection)
                .unwrap_or(0)
        })
        .sum();
    (keys, receipts)
}

fn sample(redis: &RedisServer, pipeline: &Pipeline) -> Vec<(String, u64)> {
    let mut sample = vec![("redis-server".to_string(), rss_kib(redis.pid()))];
    for (index, process) in pipeline.processes.iter().enumerate() {
        sample.push((label(process, index), rss_kib(process.pid())));
    }
    sample
}

async fn soak(options: Options) -> i32 {
    // Streams kept 10 minutes, so Redis's own memory can level off within the hour.
    let (redis, sink, pipeline, streams) =
        start("retention_ms = 600000\n", options.config.as_deref()).await;
    let total = Duration::from_secs_f64(options.minutes * 60.0);
    let window = Duration::from_secs_f64(options.window_minutes * 60.0);
    eprintln!(
        "soak: {}/s for {:?}, a sample every {:?} (logs in {})",
        options.rate,
        total,
        window,
        pipeline.dir.display()
    );
    let started = Instant::now();
    let mut samples: Vec<(Duration, Vec<(String, u64)>)> =
        vec![(Duration::ZERO, sample(&redis, &pipeline))];
    let mut keys = vec![key_count(&redis, &streams)];
    let load = Load::start(&pipeline.base_url(), options.rate, options.chats);
    let mut windows = 1;
    loop {
        let next = (window * windows as u32).min(total);
        tokio::time::sleep_until((started + next).into()).await;
        samples.push((started.elapsed(), sample(&redis, &pipeline)));
        keys.push(key_count(&redis, &streams));
        eprintln!(
            "{:.1} min: {} delivered",
            started.elapsed().as_secs_f64() / 60.0,
            sink.count()
        );
        if next >= total {
            break;
        }
        load.set_phase(windows);
        windows += 1;
    }
    let ledger = load.finish().await;
    let outcome = drain(&redis, &sink, &ledger, &streams, options.drain).await;
    let rows = rows(&ledger, &outcome, windows);

    println!(
        "| window (min) | sent | delivered | lost | doubled | latency p50 / p90 / p99 / max (ms) |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    for (index, row) in rows.iter().enumerate() {
        let from = window.mul_f64(index as f64).min(total);
        let to = window.mul_f64(index as f64 + 1.0).min(total);
        println!(
            "| {}–{} | {} | {} | {} | {} | {} / {} / {} / {} |",
            minutes(from),
            minutes(to),
            row.sent,
            row.delivered,
            row.lost,
            row.doubled,
            percentile(&row.latencies_ms, 0.5),
            percentile(&row.latencies_ms, 0.9),
            percentile(&row.latencies_ms, 0.99),
            row.latencies_ms.last().copied().unwrap_or_default(),
        );
    }
    println!();
    let header: Vec<String> = samples
        .iter()
        .map(|(at, _)| format!("{} min", minutes(*at)))
        .collect();
    println!("| RSS (MiB) | {} |", header.join(" | "));
    println!("| --- |{}", " --- |".repeat(samples.len()));
    let mib = |kib: u64| format!("{:.1}", kib as f64 / 1024.0);
    for (index, (name, _)) in samples[0].1.iter().enumerate() {
        let values: Vec<String> = samples.iter().map(|(_, s)| mib(s[index].1)).collect();
        println!("| {name} | {} |", values.join(" | "));
    }
    let totals: Vec<u64> = samples
        .iter()
        .map(|(_, s)| s.iter().map(|(_, kib)| kib).sum())
        .collect();
    println!(
        "| **all** | {} |",
        totals
            .iter()
            .map(|k| mib(*k))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    // The stage processes levelled off: the last window grew by at most half
    // the first window's growth (or under 2 MiB); it needs at least two
    // windows to tell. Redis is judged apart: besides `retention_ms` of
    // streams it keeps a dedup key (ingest) and a sent key (egress) per
    // message for dedup_ttl_ms and sent_ttl_ms (24 h), so it grows until
    // the first of them expire.
    let stages: Vec<u64> = samples
        .iter()
        .map(|(_, s)| s.iter().skip(1).map(|(_, kib)| kib).sum())
        .collect();
    let growth = |values: &[u64], i: usize| values[i] as i64 - values[i - 1] as i64;
    let (first_growth, last_growth) = (growth(&stages, 1), growth(&stages, stages.len() - 1));
    let levelled = (stages.len() >= 3).then(|| last_growth <= (first_growth / 2).max(2048));
    println!();
    println!(
        "stage processes: first window {:+.1} MiB, last window {:+.1} MiB → {}",
        first_growth as f64 / 1024.0,
        last_growth as f64 / 1024.0,
        match levelled {
            Some(true) => "levelled off",
            Some(false) => "STILL GROWING",
            None => "too few windows to tell",
        }
    );
    let redis_rss: Vec<u64> = samples.iter().map(|(_, s)| s[0].1).collect();
    let redis_growth = growth(&redis_rss, redis_rss.len() - 1);
    let last = keys.len() - 1;
    let key_growth = keys[last].0 as i64 - keys[last - 1].0 as i64;
    let receipt_growth = keys[last].1 as i64 - keys[last - 1].1 as i64;
    println!(
        "redis-server: last window {:+.1} MiB, {key_growth:+} keys (dedup and sent keys live \
         dedup_ttl_ms and sent_ttl_ms, 24 h by default), {receipt_growth:+} entries in `delivered` \
         (kept whole here to count receipts; capped at delivered_max_len otherwise)",
        redis_growth as f64 / 1024.0,
    );
    let all: Vec<u128> = {
        let mut all: Vec<u128> = rows.iter().flat_map(|r| r.latencies_ms.clone()).collect();
        all.sort_unstable();
        all
    };
    let lost: usize = rows.iter().map(|r| r.lost + r.refused).sum();
    let doubled: usize = rows.iter().map(|r| r.doubled).sum();
    println!(
        "{}",
        serde_json::json!({
            "mode": "soak",
            "rate": options.rate,
            "minutes": options.minutes,
            "sent": ledger.len(),
            "delivered": rows.iter().map(|r| r.delivered).sum::<usize>(),
            "lost": lost,
            "doubled": doubled,
            "p50_ms": percentile(&all, 0.5),
            "p99_ms": percentile(&all, 0.99),
            "rss_start_mib": totals[0] as f64 / 1024.0,
            "rss_end_mib": totals[totals.len() - 1] as f64 / 1024.0,
            "stages_first_window_growth_mib": first_growth as f64 / 1024.0,
            "stages_last_window_growth_mib": last_growth as f64 / 1024.0,
            "stages_levelled_off": levelled,
            "redis_last_window_growth_mib": redis_growth as f64 / 1024.0,
            "redis_last_window_keys": key_growth,
            "redis_last_window_receipts": receipt_growth,
        })
    );
    drop(pipeline);
    drop(redis);
    if lost > 0 || doubled > 0 || levelled == Some(false) {
        1
    } else {
        0
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    let options = match options() {
        Ok(options) => options,
        Err(message) => {
            eprintln!("{message}");
            std::process::exit(2);
        }
    };
    let code = if options.soak {
        soak(options).await
    } else {
        chaos(options).await
    };
    std::process::exit(code);
}
