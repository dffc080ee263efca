//! The scheduler against a real redis-server: several replicas, one message per tick.

mod common;

use botline_ingest::inbox::{Admission, Inbox};
use botline_ingest::scheduler;
use botline_shared::message::{ChatKind, Origin};
use botline_shared::testing::RedisServer;
use common::*;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const EVERY_SECOND: &str = r#"
[[ingest.schedule]]
name = "pulse"
cron = "* * * * * *"
platform = "telegram"
chat = "-100"
chat_kind = "group"
text = "still here"
"#;

/// One replica's inbox: its own pool on the shared redis.
fn replica(redis: &RedisServer) -> Inbox {
    let ingest = ingest_for(&redis.url(), None);
    Inbox::new(
        ingest.pool,
        ingest.streams,
        ingest.settings.dedup_ttl_ms,
        &ingest.stream_settings,
        ingest.settings.retry_after_secs,
    )
}

#[tokio::test]
async fn replicas_firing_the_same_tick_add_one_message() {
    let redis = RedisServer::start();
    let schedule = &schedules(EVERY_SECOND)[0];
    let replicas: Vec<Inbox> = (0..4).map(|_| replica(&redis)).collect();
    let tick_ms = 1_700_000_000_000;
    let admissions = futures_util::future::join_all(
        replicas
            .iter()
            .map(|inbox| scheduler::fire(inbox, schedule, tick_ms)),
    )
    .await;
    let added = admissions
        .iter()
        .filter(|admission| matches!(admission, Ok(Admission::Added(_))))
        .count();
    assert_eq!(added, 1, "{admissions:?}");
    let messages = read_inbound(&redis);
    assert_eq!(messages.len(), 1);
    let message = &messages[0];
    assert_eq!(
        message.origin,
        Origin::Scheduled {
            job: "pulse".into()
        }
    );
    assert_eq!(
        (
            message.platform.as_str(),
            message.chat.id.as_str(),
            message.chat.kind
        ),
        ("telegram", "-100", ChatKind::Group)
    );
    assert_eq!(
        (
            message.sender.id.as_str(),
            message.sender.name.as_str(),
            message.sender.is_bot
        ),
        ("scheduler", "scheduler", true)
    );
    assert_eq!(message.text, "still here");
    assert_eq!(message.platform_ts_ms, Some(tick_ms));
    // The next tick is another message.
    assert!(matches!(
        scheduler::fire(&replicas[1], schedule, tick_ms + 1000).await,
        Ok(Admission::Added(_))
    ));
}

#[tokio::test]
async fn two_running_schedulers_add_one_message_per_tick() {
    let redis = RedisServer::start();
    let shutdown = CancellationToken::new();
    let first = replica(&redis);
    scheduler::start(schedules(EVERY_SECOND), first, shutdown.clone());
    scheduler::start(schedules(EVERY_SECOND), replica(&redis), shutdown.clone());
    let length = |redis: &RedisServer| -> usize {
        botline_shared::testing::partitioned_len(&mut redis.connection(), INBOUND)
    };
    wait_for(Duration::from_secs(10), "three ticks", || {
        let ready = length(&redis) >= 3;
        async move { ready }
    })
    .await;
    shutdown.cancel();
    let messages = read_inbound(&redis);
    let ticks: BTreeSet<i64> = messages.iter().filter_map(|m| m.platform_ts_ms).collect();
    assert_eq!(
        ticks.len(),
        messages.len(),
        "one message per tick: {ticks:?}"
    );
    assert!(ticks.iter().all(|tick| tick % 1000 == 0), "{ticks:?}");
}
