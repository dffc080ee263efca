//! The scheduler: `[[ingest.schedule]]` entries become messages for their
//! chats at each tick of their cron pattern, marked `Origin::Scheduled`.
//!
//! Every replica computes every tick; each tick's message carries the event
//! id `sched:<name>:<tick unix ms>` through the same dedup script as any
//! platform retry, so exactly one replica's copy gets into `in`, with no
//! leader election and nothing to hand over when a replica stops.

use crate::config::Schedule;
use crate::error::IngestError;
use crate::generic::{announcement, Stamp};
use crate::inbox::{Admission, Inbox, Submission};
use botline_shared::message::{Chat, Origin};
use botline_shared::now_ms;
use chrono::{DateTime, FixedOffset, TimeZone, Timelike, Utc};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

/// The sender of scheduled messages.
pub const SENDER: &str = "scheduler";

/// Start one task per schedule entry; each stops on `shutdown`.
pub fn start(schedules: Vec<Schedule>, inbox: Inbox, shutdown: CancellationToken) {
    for schedule in schedules {
        tokio::spawn(run_schedule(schedule, inbox.clone(), shutdown.clone()));
    }
}

/// The tick after `after` (exclusive), in the entry's offset.
/// Ticks fall on whole seconds whatever the clock's milliseconds, so every
/// replica computes the same tick (and the same event id).
pub fn next_tick(schedule: &Schedule, after_ms: i64) -> Option<DateTime<FixedOffset>> {
    let whole_second = after_ms.div_euclid(1000) * 1000;
    let after = schedule
        .offset
        .timestamp_millis_opt(whole_second)
        .single()?;
    let tick = schedule.cron.find_next_occurrence(&after, false).ok()?;
    tick.with_nanosecond(0)
}

/// The dedup event id of one tick.
pub fn event_id(schedule: &Schedule, tick_ms: i64) -> String {
    format!("sched:{}:{tick_ms}", schedule.entry.name)
}

/// The message of one tick: the bot is to say the entry's text in its chat.
pub fn tick_message(schedule: &Schedule, tick_ms: i64) -> Submission {
    let entry = &schedule.entry;
    let message = announcement(
        Stamp {
            id: ulid::Ulid::new().to_string(),
            received_at_ms: now_ms(),
            trace_id: ulid::Ulid::new().to_string(),
            raw: None,
        },
        &entry.platform,
        Chat {
            id: entry.chat.clone(),
            kind: entry.chat_kind,
        },
        &entry.text,
        Origin::Scheduled {
            job: entry.name.clone(),
        },
        SENDER,
        Some(tick_ms),
    );
    Submission {
        message,
        event_id: Some(event_id(schedule, tick_ms)),
        transcript: false,
    }
}

/// Offer one tick's message; `Duplicate` when another replica's copy got in first.
pub async fn fire(
    inbox: &Inbox,
    schedule: &Schedule,
    tick_ms: i64,
) -> Result<Admission, IngestError> {
    inbox.admit_one(tick_message(schedule, tick_ms)).await
}

async fn run_schedule(schedule: Schedule, inbox: Inbox, shutdown: CancellationToken) {
    let name = schedule.entry.name.clone();
    let mut after_ms = now_ms();
    loop {
        let Some(tick) = next_tick(&schedule, after_ms) else {
            warn!(message = "schedule has no next tick; stopped", schedule = %name);
            return;
        };
        let tick_ms = tick.timestamp_millis();
        let wait = Duration::from_millis((tick_ms - now_ms()).max(0) as u64);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        // Never drop a tick for a passing Redis failure: retry until it gets
        // in (or another replica's copy did), or until shutdown.
        let mut backoff = Duration::from_millis(200);
        loop {
            match fire(&inbox, &schedule, tick_ms).await {
                Ok(Admission::Added(entry)) => {
                    info!(message = "scheduled message added", schedule = %name, tick = %Utc.timestamp_millis_opt(tick_ms).single().unwrap_or_default(), %entry);
                    break;
                }
                Ok(Admission::Duplicate) => {
                    debug!(message = "tick already added by another replica", schedule = %name, tick_ms);
                    break;
                }
                Err(error) => {
                    warn!(message = "scheduled message not added yet; retrying", schedule = %name, tick_ms, %error);
                    tokio::select! {
                        _ = shutdown.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
        // Ticks missed while retrying are not replayed; the next one is after now.
        after_ms = tick_ms.max(now_ms());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::IngestSettings;

    fn schedule(cron: &str, offset: &str) -> Schedule {
        let text = format!(
            "[ingest]\nmax_body_bytes = 1\nmax_text_chars = 1\ndedup_ttl_ms = 1\nin_max_backlog = 1\nbacklog_poll_ms = 1\nretry_after_secs = 1\nbroadcast_max_chats = 1\njwt_audience = \"\"\n[[ingest.schedule]]\nname = \"daily\"\ncron = \"{cron}\"\nutc_offset = \"{offset}\"\nplatform = \"web\"\nchat = \"c\"\ntext = \"report\"\n"
        );
        IngestSettings::from_toml(&text)
            .unwrap()
            .schedules()
            .unwrap()
            .remove(0)
    }

    fn at(text: &str) -> i64 {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .timestamp_millis()
    }

    #[test]
    fn ticks_follow_the_pattern_in_its_offset() {
        for (cron, offset, after, expected) in [
            (
                "0 9 * * *",
                "+00:00",
                "2024-05-01T08:00:00Z",
                "2024-05-01T09:00:00Z",
            ),
            (
                "0 9 * * *",
                "+08:00",
                "2024-05-01T00:00:00Z",
                "2024-05-01T01:00:00Z",
            ),
            (
                "0 9 * * *",
                "+08:00",
                "2024-05-01T01:00:00Z",
                "2024-05-02T01:00:00Z",
            ),
            (
                "30 9 * * 1-5",
                "-05:00",
                "2024-05-03T15:00:00Z",
                "2024-05-06T14:30:00Z",
            ),
            (
                "*/15 * * * * *",
                "+00:00",
                "2024-05-01T00:00:01Z",
                "2024-05-01T00:00:15Z",
            ),
        ] {
            let tick = next_tick(&schedule(cron, offset), at(after)).unwrap();
            assert_eq!(
                tick.timestamp_millis(),
                at(expected),
                "{cron} {offset} {after}"
            );
        }
    }

    #[test]
    fn a_tick_is_a_scheduled_announcement() {
        let schedule = schedule("0 9 * * *", "+00:00");
        let submission = tick_message(&schedule, 1_700_000_000_000);
        assert_eq!(
            submission.event_id.as_deref(),
            Some("sched:daily:1700000000000")
        );
        let message = submission.message;
        assert_eq!(
            message.origin,
            Origin::Scheduled {
                job: "daily".into()
            }
        );
        assert_eq!(message.sender.id, "scheduler");
        assert!(message.sender.is_bot);
        assert_eq!(message.platform_ts_ms, Some(1_700_000_000_000));
        assert_eq!(message.text, "report");
    }
}
