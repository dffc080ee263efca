//! Scaling while messages flow: respond and egress go from one consumer to
//! three and back to one (the extra ones stopped with SIGTERM) while chats
//! keep talking, with an LLM stand-in answering after a random delay and
//! echoing the context it was given. Every message is answered once, each
//! chat's replies arrive in order, and each is written with all of the
//! chat's earlier turns: partitions moved between owners without two of
//! them ever handling one chat at once.

use botline_shared::streams::DEFAULT_PARTITIONS;
use botline_shared::testing::{wait_for, RedisServer};
use botline_tests::llm::SlowLlm;
use botline_tests::sink::Sink;
use botline_tests::{assert_echoed_in_order, ApiClient, Pipeline, WEBHOOK_SECRET};
use futures_util::stream::{self, StreamExt};
use std::time::Duration;

const CHATS: usize = 40;
/// Few enough that every earlier turn fits in the context (20 turns).
const PER_CHAT: usize = 8;

/// Between a chat's messages: the chats keep talking for several seconds.
const PAUSE: Duration = Duration::from_millis(800);

fn text(chat: usize, n: usize) -> String {
    format!("chat {chat} message {n}")
}

/// How many partitions `stage`'s consumers own together, as they report it.
async fn owned(pipeline: &Pipeline, stage: &str) -> f64 {
    let mut owned = 0.0;
    for process in pipeline.processes.iter().filter(|p| p.stage == stage) {
        if process.is_running() {
            owned += process
                .metric(&format!(
                    "botline_stage_partitions_owned{{stage=\"{stage}\"}}"
                ))
                .await
                .unwrap_or(0.0);
        }
    }
    owned
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn respond_and_egress_scale_one_three_one_while_chats_keep_their_order() {
    let redis = RedisServer::start();
    let sink = Sink::start(WEBHOOK_SECRET).await;
    let llm = SlowLlm::echoing().await;
    let overlay = format!(
        "[runner]\nbatch_size = 8\nblock_ms = 200\nlease_ttl_ms = 3000\n\
         [egress.webhook]\nurl = \"{}\"\n\
         [respond]\nbackends = [\"llm\"]\n[respond.routes]\n\
         greeting = [\"llm\"]\ngoodbye = [\"llm\"]\nthanks = [\"llm\"]\nhelp = [\"llm\"]\n\
         [respond.llm]\nbase_url = \"{}\"\nbudget_ms = 2000\nmax_in_flight = 16\n",
        sink.url, llm.base_url
    );
    let mut pipeline = Pipeline::start(&redis, &overlay);
    pipeline.wait_ready(Duration::from_secs(60)).await;
    let client = ApiClient::new(&pipeline.base_url());

    let sender = tokio::spawn({
        let client = client.clone();
        async move {
            stream::iter(0..CHATS)
                .for_each_concurrent(None, |chat| {
                    let client = &client;
                    async move {
                        for n in 0..PER_CHAT {
                            client
                                .send(
                                    &format!("s-{chat}-{n}"),
                                    &format!("chat-{chat}"),
                                    &text(chat, n),
                                    Duration::from_secs(60),
                                )
                                .await
                                .unwrap();
                            tokio::time::sleep(PAUSE).await;
                        }
                    }
                })
                .await;
        }
    });
    let expected = CHATS * PER_CHAT;
    wait_for(
        "a first part of the replies",
        Duration::from_secs(60),
        || sink.count() >= expected / 6,
    )
    .await;
    // One to three consumers of each, while messages flow.
    assert!(
        !sender.is_finished(),
        "the messages stopped before the scale-up"
    );
    let mut added = Vec::new();
    for _ in 0..2 {
        added.push(pipeline.add("respond"));
        added.push(pipeline.add("egress"));
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let mut busy = true;
        for index in &added {
            let process = &pipeline.processes[*index];
            let stage = process.stage;
            busy &= process
                .metric(&format!(
                    "botline_stage_partitions_owned{{stage=\"{stage}\"}}"
                ))
                .await
                .unwrap_or(0.0)
                > 0.0;
        }
        if busy {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the added consumers never got partitions\n{}",
            pipeline.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let progress = sink.count();
    wait_for(
        "progress with three of each",
        Duration::from_secs(60),
        || sink.count() >= progress + expected / 6,
    )
    .await;
    // Back to one of each, still while messages flow.
    assert!(
        !sender.is_finished(),
        "the messages stopped before the scale-down: make PAUSE longer"
    );
    for index in added {
        let status = pipeline.processes[index].terminate(Duration::from_secs(20));
        assert!(status.success(), "a stopped consumer exited with {status}");
    }
    sender.await.unwrap();
    assert_echoed_in_order(&sink, CHATS, PER_CHAT, text).await;
    // The one left of each owns every partition again.
    for stage in ["respond", "egress"] {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while owned(&pipeline, stage).await != f64::from(DEFAULT_PARTITIONS) {
            assert!(
                std::time::Instant::now() < deadline,
                "{stage}: the last consumer does not own every partition\n{}",
                pipeline.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
