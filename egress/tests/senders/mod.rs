//! What the platform sender tests share: egress with one platform enabled,
//! running against its own redis-server, replies put into `out:<platform>`,
//! receipts and dead letters read back, and waits for a condition with a
//! deadline (never a fixed sleep).
#![allow(dead_code)]

use botline_egress::EgressSettings;
use botline_shared::message::{Chat, ChatKind, DeadLetter, Priority, Receipt, Reply};
use botline_shared::streams::Streams;
use botline_shared::testing::{add_entry, read_stream, RedisServer};
use botline_shared::{codec, now_ms, Error};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(20);

/// Wait until `check` holds, or fail naming `what`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `count` requests arrived, each at least `gap` after the one before.
pub fn assert_paced(arrivals: &[Instant], count: usize, gap: Duration) {
    assert_eq!(arrivals.len(), count, "requests");
    for pair in arrivals.windows(2) {
        let between = pair[1] - pair[0];
        assert!(between >= gap, "paced at least {gap:?} apart: {between:?}");
    }
}

pub struct Egress {
    pub redis: RedisServer,
    pub streams: Streams,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), Error>>,
}

impl Egress {
    /// Egress with the settings `overlay` (TOML: the platform's table) and
    /// the environment `env` (its secrets); fast backoff and claims.
    pub fn start(overlay: &str, env: &[(&str, &str)]) -> Egress {
        Self::try_start(overlay, env).unwrap()
    }

    /// Like [`Egress::start`], or the error that would stop egress at start.
    pub fn try_start(overlay: &str, env: &[(&str, &str)]) -> Result<Egress, Error> {
        let redis = RedisServer::start();
        let (settings, plumbing) = redis.plumbing(&format!(
            "[runner]\nblock_ms = 100\nclaim_idle_ms = 1000\nclaim_interval_ms = 200\n\
             [egress]\nbackoff_base_ms = 10\nbackoff_cap_ms = 50\n{overlay}"
        ));
        let egress = EgressSettings::from_settings(&settings)?;
        let shutdown = CancellationToken::new();
        let stage = botline_egress::build(egress, &env.to_vec(), &plumbing, shutdown.clone())?;
        let streams = plumbing.streams.clone();
        let task = tokio::spawn(botline_egress::run(stage, plumbing, shutdown.clone()));
        Ok(Egress {
            redis,
            streams,
            shutdown,
            task,
        })
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("egress stops")
            .unwrap()
            .unwrap();
    }

    /// Put `reply` into `out:<its platform>`.
    pub fn send(&self, reply: &Reply) {
        add_entry(
            &mut self.redis.connection(),
            &self.streams.outbound(&reply.platform),
            &codec::encode(reply),
        );
    }

    pub fn receipts(&self) -> Vec<Receipt> {
        read_stream(&mut self.redis.connection(), &self.streams.delivered())
    }

    pub fn dead(&self) -> Vec<DeadLetter> {
        read_stream(&mut self.redis.connection(), &self.streams.dead())
    }
}

/// A reply as respond writes it, to `chat` on `platform`.
pub fn reply(id: &str, platform: &str, chat: Chat, text: &str) -> Reply {
    Reply {
        id: id.into(),
        in_reply_to: format!("m-{id}"),
        platform: platform.into(),
        bot: "bot".into(),
        chat,
        thread: None,
        reply_to: None,
        text: text.into(),
        mentions: Vec::new(),
        platform_data: Default::default(),
        priority: Priority::Normal,
        received_at_ms: now_ms() - 50,
        created_at_ms: now_ms() - 10,
        trace_id: format!("trace-{id}"),
        replay: false,
    }
}

pub fn chat(id: &str, kind: ChatKind) -> Chat {
    Chat {
        id: id.into(),
        kind,
    }
}
