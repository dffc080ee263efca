//! Order per chat with several consumers: three respond and three egress
//! processes, an LLM stand-in answering each request after a random delay
//! (so a later message is often answered before an earlier one is), and
//! every chat's replies still reach the platform in the order its messages
//! arrived, each answered with all of the chat's earlier turns in context.
//! Each chat's third message is urgent: it is in its partition's one queue
//! behind the chat's earlier ones, so it is answered after them. Each
//! partition has exactly one owner per stage.

use botline_shared::streams::DEFAULT_PARTITIONS;
use botline_shared::testing::RedisServer;
use botline_tests::llm::SlowLlm;
use botline_tests::sink::Sink;
use botline_tests::{assert_echoed_in_order, ApiClient, Pipeline, WEBHOOK_SECRET};
use futures_util::stream::{self, StreamExt};
use std::time::Duration;

const CHATS: usize = 24;
const PER_CHAT: usize = 5;

/// The text of a chat's `n`th message; the third has an urgent keyword.
fn text(chat: usize, n: usize) -> String {
    let urgent = if n == 2 { " urgent" } else { "" };
    format!("chat {chat} message {n}{urgent}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_keep_each_chat_s_order_with_three_respond_and_three_egress_consumers() {
    let redis = RedisServer::start();
    let sink = Sink::start(WEBHOOK_SECRET).await;
    let llm = SlowLlm::echoing().await;
    // Small batches spread each chat's messages over the consumers.
    let overlay = format!(
        "[runner]\nbatch_size = 4\nblock_ms = 200\nlease_ttl_ms = 3000\n\
         [egress.webhook]\nurl = \"{}\"\n\
         [respond]\nbackends = [\"llm\"]\n[respond.routes]\n\
         greeting = [\"llm\"]\ngoodbye = [\"llm\"]\nthanks = [\"llm\"]\nhelp = [\"llm\"]\n\
         [respond.llm]\nbase_url = \"{}\"\nbudget_ms = 2000\nmax_in_flight = 32\n",
        sink.url, llm.base_url
    );
    let mut pipeline = Pipeline::start(&redis, &overlay);
    for _ in 0..2 {
        pipeline.add("respond");
        pipeline.add("egress");
    }
    pipeline.wait_ready(Duration::from_secs(60)).await;
    // The consumers share the partitions before the messages come.
    pipeline
        .wait_balanced(DEFAULT_PARTITIONS, Duration::from_secs(30))
        .await;
    let client = ApiClient::new(&pipeline.base_url());

    // Each chat's messages one after another, the chats all at once.
    stream::iter(0..CHATS)
        .for_each_concurrent(None, |chat| {
            let client = &client;
            async move {
                for n in 0..PER_CHAT {
                    client
                        .send(
                            &format!("o-{chat}-{n}"),
                            &format!("chat-{chat}"),
                            &text(chat, n),
                            Duration::from_secs(60),
                        )
                        .await
                        .unwrap();
                }
            }
        })
        .await;
    assert_echoed_in_order(&sink, CHATS, PER_CHAT, text).await;

    // The consumers did share the work (the test would prove nothing with one).
    let logs = pipeline.logs();
    for stage in ["respond", "egress"] {
        let mut busy = 0;
        for process in pipeline.processes.iter().filter(|p| p.stage == stage) {
            let handled = process
                .metric(&format!(
                    "botline_stage_messages_total{{stage=\"{stage}\",outcome=\"forwarded\"}}"
                ))
                .await
                .unwrap_or(0.0);
            if handled > 0.0 {
                busy += 1;
            }
        }
        assert!(
            busy >= 2,
            "{stage}: work went to {busy} consumer(s)\n{logs}"
        );
        // Once the consumers have settled, each partition has one owner.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let mut owned = 0.0;
            for process in pipeline.processes.iter().filter(|p| p.stage == stage) {
                owned += process
                    .metric(&format!(
                        "botline_stage_partitions_owned{{stage=\"{stage}\"}}"
                    ))
                    .await
                    .unwrap_or(0.0);
            }
            if owned == f64::from(DEFAULT_PARTITIONS) {
                break;
            }
            assert!(
                owned < f64::from(DEFAULT_PARTITIONS) && std::time::Instant::now() < deadline,
                "{stage}: {owned} partitions owned, not one owner each\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
