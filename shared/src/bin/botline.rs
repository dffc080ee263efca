//! `botline`: the operator's CLI. Wiring only: arguments in, `ops` does the
//! work, results printed. Exit codes: 0 ok, 1 a Redis error, 2 bad arguments.

use botline_shared::config::{ProcessConfig, ProcessEnv, StreamSettings};
use botline_shared::ops::{self, Ops, OpsError, PeekRange, ReplayRequest, RequeueOutcome};
use botline_shared::redis_conn;
use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::time::Duration;

/// Look at and repair a botline pipeline. Reads BOTLINE_REDIS_URL (and
/// BOTLINE_REDIS_CA_FILE, _CERT_FILE, _KEY_FILE for TLS) and BOTLINE_PREFIX
/// like the stages (and BOTLINE_CONFIG for `trim`'s retention).
#[derive(Parser)]
#[command(name = "botline", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Every stream and group over all partitions: length, lag, pending, ages, consumers.
    Status {
        /// List each group's consumers with their pending count and idle time.
        #[arg(long)]
        consumers: bool,
        /// Each partition's streams too (full key names).
        #[arg(long)]
        partitions: bool,
        /// Redraw every SECS seconds until Ctrl-C.
        #[arg(long, value_name = "SECS")]
        watch: Option<u64>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Entries of a stream decoded to JSON: `in`, `q`, `out:web`, `dead`, … (every
    /// partition's, in entry id order) or one partition's key (`{botline:p3}:in`).
    Peek {
        stream: String,
        /// How many entries.
        #[arg(long, default_value_t = 10)]
        count: usize,
        /// Start at this entry id (default: the oldest).
        #[arg(
            long,
            value_name = "ID",
            conflicts_with = "last",
            allow_hyphen_values = true
        )]
        from: Option<String>,
        /// The newest N entries instead.
        #[arg(long, value_name = "N")]
        last: Option<usize>,
    },
    /// Copy a range of `in`, `q` or `out:*` into a stage's input, marked as a replay.
    /// Each partition's entries go into the same partition's stream.
    Replay {
        stream: String,
        /// First entry: an id, an RFC 3339 time or an age like -10m.
        #[arg(long, value_name = "ID|TIME", allow_hyphen_values = true)]
        from: String,
        /// Last entry: an id, an RFC 3339 time, an age like -1m, or + (the end).
        #[arg(long, value_name = "ID|TIME", allow_hyphen_values = true)]
        to: String,
        /// Only this chat's entries.
        #[arg(long, value_name = "ID")]
        chat: Option<String>,
        /// Where the copies go (default: the stream itself).
        #[arg(long, value_name = "STREAM")]
        into: Option<String>,
        /// Count what would be copied; copy nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Dead letters: list, requeue, purge.
    Dead {
        #[command(subcommand)]
        command: DeadCommand,
    },
    /// Trim every pipeline stream below what its groups still need, keeping the retention window.
    Trim {
        /// Keep at least this much history (default: [streams] retention_ms).
        #[arg(long, value_name = "DUR")]
        retention: Option<String>,
        /// Say what would go; remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Move what the previous release's single-stream layout ({botline}:in, q:*, out:*,
    /// contexts) still owes into the partitions. Stop the old stages first (README "Upgrading").
    Migrate {
        /// Count what would move; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// The old BOTLINE_PREFIX as it was, braces included (default: {BOTLINE_PREFIX}).
        #[arg(long, value_name = "PREFIX")]
        old_prefix: Option<String>,
    },
}

#[derive(Subcommand)]
enum DeadCommand {
    /// The newest dead letters.
    List {
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// Only those this stage gave up on (classify, respond, egress).
        #[arg(long)]
        stage: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back on the stream they came from.
    Requeue {
        /// The dead letter's id in `dead`.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        id: Option<String>,
        /// The partition whose `dead` holds it (needed when several hold that id).
        #[arg(long, value_name = "N", conflicts_with = "all")]
        partition: Option<u32>,
        /// Every dead letter (of --stage).
        #[arg(long)]
        all: bool,
        #[arg(long, requires = "all")]
        stage: Option<String>,
    },
    /// Delete dead letters.
    Purge {
        /// Only those older than this (90s, 10m, 2h, 7d).
        #[arg(long, value_name = "DUR")]
        older_than: Option<String>,
        /// Really delete; without it, only count.
        #[arg(long)]
        yes: bool,
    },
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let process = match ProcessConfig::from_env(&ProcessEnv, "127.0.0.1:0") {
        Ok(process) => process,
        Err(error) => return fail(OpsError::bad("environment", error), ""),
    };
    let where_ = format!(
        " (redis {})",
        botline_shared::config::redact_url(&process.redis_url)
    );
    // A user, password or certificate Redis refuses is named before any command.
    let checked = match redis_conn::client(&process) {
        Ok(client) => redis_conn::check_at_start(&client).await,
        Err(error) => Err(error),
    };
    let result = match checked
        .map_err(OpsError::from)
        .and_then(|()| Ops::connect(&process))
    {
        Ok(ops) => match with_recorded_partitions(ops).await {
            Ok(ops) => run(cli.command, &ops, &process).await,
            Err(error) => Err(error),
        },
        Err(error) => Err(error),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail(error, &where_),
    }
}

/// The deployment's partition count as its processes recorded it: with
/// another (BOTLINE_CONFIG unset or elsewhere), every command would miss or
/// invent partitions.
async fn with_recorded_partitions(ops: Ops) -> Result<Ops, OpsError> {
    let configured = ops.streams().partitions();
    match ops.recorded_partitions().await? {
        Some(recorded) if recorded != configured && recorded > 0 => {
            eprintln!(
                "botline: this deployment has {recorded} partitions ({{{}}}:partitions), \
                 not {configured} as configured here: using {recorded}",
                ops.streams().prefix()
            );
            Ok(ops.with_partitions(recorded))
        }
        _ => Ok(ops),
    }
}

fn fail(error: OpsError, where_: &str) -> ExitCode {
    match &error {
        OpsError::Redis(_) => eprintln!("botline: {error}{where_}"),
        OpsError::BadArgument { .. } => eprintln!("botline: {error}"),
    }
    ExitCode::from(error.exit_code() as u8)
}

async fn run(command: Command, ops: &Ops, process: &ProcessConfig) -> Result<(), OpsError> {
    match command {
        Command::Status {
            consumers,
            partitions,
            watch,
            json,
        } => status(ops, consumers, partitions, watch, json).await,
        Command::Peek {
            stream,
            count,
            from,
            last,
        } => {
            let range = match last {
                Some(count) => PeekRange::Last { count },
                None => PeekRange::From {
                    id: from.unwrap_or_else(|| "-".into()),
                    count,
                },
            };
            for entry in ops.peek(&stream, &range).await? {
                println!("{}", pretty(&entry));
            }
            Ok(())
        }
        Command::Replay {
            stream,
            from,
            to,
            chat,
            into,
            dry_run,
        } => {
            let report = ops
                .replay(&ReplayRequest {
                    stream,
                    from,
                    to,
                    chat,
                    into,
                    dry_run,
                })
                .await?;
            let into = report.into.clone();
            if dry_run {
                println!("would copy {} entries into {into}", report.matched);
            } else {
                println!("copied {} entries into {into}", report.copied);
            }
            if report.undecodable > 0 {
                println!(
                    "{} entries in the range do not decode and were left out (see `botline peek`)",
                    report.undecodable
                );
            }
            Ok(())
        }
        Command::Dead { command } => dead(ops, command).await,
        Command::Trim { retention, dry_run } => {
            let retention_ms = match retention {
                Some(text) => ops::parse_duration("--retention", &text)?.as_millis() as u64,
                None => {
                    let settings = process
                        .settings()
                        .and_then(|settings| settings.section::<StreamSettings>("streams"))
                        .map_err(|error| OpsError::bad("BOTLINE_CONFIG", error))?;
                    settings.retention_ms
                }
            };
            let lines = ops.trim(retention_ms, dry_run).await?;
            print!("{}", ops::trim_table(&lines, dry_run));
            Ok(())
        }
        Command::Migrate {
            dry_run,
            old_prefix,
        } => {
            let report = ops.migrate(dry_run, old_prefix.as_deref()).await?;
            print!("{}", ops::migrate_table(&report));
            Ok(())
        }
    }
}

async fn status(
    ops: &Ops,
    consumers: bool,
    partitions: bool,
    watch: Option<u64>,
    json: bool,
) -> Result<(), OpsError> {
    let show = |status: &ops::Status| {
        if json {
            println!("{}", status.json(partitions));
        } else {
            print!("{}", status.table(consumers, partitions));
        }
    };
    let Some(seconds) = watch else {
        show(&ops.status().await?);
        return Ok(());
    };
    if seconds == 0 {
        return Err(OpsError::bad("--watch", "must be at least 1 second"));
    }
    loop {
        let status = ops.status().await?;
        if !json {
            // Clear the screen and go home, like `watch`.
            print!("\x1b[2J\x1b[H");
            println!("botline status, every {seconds}s (Ctrl-C to stop)\n");
        }
        show(&status);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(seconds)) => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn dead(ops: &Ops, command: DeadCommand) -> Result<(), OpsError> {
    match command {
        DeadCommand::List { count, stage, json } => {
            let entries = ops.dead_list(count, stage.as_deref()).await?;
            if json {
                for entry in &entries {
                    println!("{}", entry.json());
                }
            } else {
                print!("{}", ops::dead_table(&entries, ops.streams()));
            }
            Ok(())
        }
        DeadCommand::Requeue {
            id: Some(id),
            partition,
            ..
        } => match ops.dead_requeue(&id, partition).await? {
            RequeueOutcome::Requeued { stream, new_id } => {
                println!("requeued {id} onto {stream} as {new_id}");
                Ok(())
            }
            RequeueOutcome::Ambiguous(partitions) => Err(OpsError::bad(
                "<id>",
                format!(
                    "{id} is in the dead letters of partitions {}; say which with --partition",
                    partitions
                        .iter()
                        .map(u32::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )),
            RequeueOutcome::Gone => Err(OpsError::bad(
                "<id>",
                format!("{id} is not in dead (already requeued or purged?)"),
            )),
            RequeueOutcome::Unreadable(reason) => Err(OpsError::bad(
                "<id>",
                format!("{id}: {reason}; left in dead"),
            )),
        },
        DeadCommand::Requeue {
            id: None, stage, ..
        } => {
            let report = ops.dead_requeue_all(stage.as_deref()).await?;
            println!(
                "requeued {}; {} gone meanwhile; {} unreadable, left in dead",
                report.requeued, report.gone, report.unreadable
            );
            Ok(())
        }
        DeadCommand::Purge { older_than, yes } => {
            let older_than = older_than
                .map(|text| ops::parse_duration("--older-than", &text))
                .transpose()?;
            let count = ops.dead_purge(older_than, yes).await?;
            if yes {
                println!("purged {count} dead letters");
            } else {
                println!("would purge {count} dead letters; add --yes to delete them");
            }
            Ok(())
        }
    }
}

fn pretty(value: &serde_json::Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}
