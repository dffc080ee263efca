//! The relay's scripts (`botline_shared::relay`) against a real
//! redis-server: who decides about a frame, once — a claim by the lease
//! holder before its deadline sends it, after egress's cancel or its
//! deadline never; a second claim or another holder's gets nothing; the
//! outcome is waited for without being taken, so a later attempt reads it.

use botline_shared::relay::{self, Claim, Enqueue, Given, Outcome};
use botline_shared::streams::Streams;
use botline_shared::testing::RedisServer;
use redis::aio::MultiplexedConnection;
use std::time::Duration;

const BOT: &str = "10001000";
const HOLDER: &str = "holder-1";

struct Relay {
    _redis: RedisServer,
    connection: MultiplexedConnection,
    streams: Streams,
}

impl Relay {
    async fn start() -> Relay {
        let redis = RedisServer::start();
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
        let mut connection = redis
            .client()
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap();
        let streams = Streams::default();
        let stream = streams.socket_frames("onebot", BOT);
        let lease = streams.consumer_lease("onebot-socket", BOT);
        let _: () = redis::pipe()
            .cmd("SET")
            .arg(lease)
            .arg(HOLDER)
            .ignore()
            .cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(relay::GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .ignore()
            .query_async(&mut connection)
            .await
            .unwrap();
        Relay {
            _redis: redis,
            connection,
            streams,
        }
    }

    /// Enqueue a frame for `reply`, due within `pickup`; its echo and entry id.
    async fn enqueue(&mut self, reply: &str, pickup: Duration) -> (String, String, i64) {
        let echo = format!("{reply}.1");
        let frame = format!(r#"{{"action":"send_msg","echo":"{echo}"}}"#);
        let enqueue = Enqueue {
            platform: "onebot",
            bot: BOT,
            reply_id: reply,
            echo: &echo,
            frame: &frame,
            pickup,
            answer: Duration::from_secs(5),
        };
        let deadline = relay::enqueue(&mut self.connection, &self.streams, &enqueue)
            .await
            .unwrap();
        let entries: redis::Value = redis::cmd("XREVRANGE")
            .arg(self.streams.socket_frames("onebot", BOT))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(&mut self.connection)
            .await
            .unwrap();
        let stream = self.streams.socket_frames("onebot", BOT);
        let entry = botline_shared::redis_conn::parse_entries(&stream, entries).unwrap();
        (echo, entry[0].id.clone(), deadline)
    }

    async fn claim(&mut self, entry: &(String, String, i64), holder: &str) -> Claim {
        let (echo, id, deadline) = entry;
        let stream = self.streams.socket_frames("onebot", BOT);
        let lease = self.streams.consumer_lease("onebot-socket", BOT);
        relay::claim(
            &mut self.connection,
            &self.streams,
            &stream,
            id,
            echo,
            *deadline,
            (&lease, holder),
        )
        .await
        .unwrap()
    }

    async fn cancel(&mut self, echo: &str) -> Given {
        relay::cancel(&mut self.connection, &self.streams, echo)
            .await
            .unwrap()
    }

    async fn peek(&mut self, echo: &str) -> Option<Outcome> {
        relay::peek(&mut self.connection, &self.streams, echo)
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn a_frame_is_decided_once() {
    let mut relay = Relay::start().await;
    let soon = Duration::from_secs(30);

    // Claimed by the holder: sent; then nobody else, and egress's cancel
    // learns it was sent.
    let frame = relay.enqueue("r1", soon).await;
    assert_eq!(relay.claim(&frame, "holder-2").await, Claim::NotHolder);
    assert_eq!(relay.claim(&frame, HOLDER).await, Claim::Send);
    assert_eq!(relay.claim(&frame, HOLDER).await, Claim::Taken);
    assert_eq!(relay.cancel(&frame.0).await, Given::Sent);
    let last: Option<String> = relay::last_echo(&mut relay.connection, &relay.streams, "r1")
        .await
        .unwrap();
    assert_eq!(last.as_deref(), Some(frame.0.as_str()));

    // Cancelled by egress first: never sent.
    let frame = relay.enqueue("r2", soon).await;
    assert_eq!(relay.cancel(&frame.0).await, Given::NotSent);
    assert_eq!(relay.cancel(&frame.0).await, Given::NotSent);
    assert_eq!(relay.claim(&frame, HOLDER).await, Claim::Cancelled);
    assert_eq!(relay.peek(&frame.0).await, None);

    // Claimed past its deadline: not sent, reported expired.
    let frame = relay.enqueue("r3", Duration::from_millis(1)).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(relay.claim(&frame, HOLDER).await, Claim::Expired);
    assert_eq!(relay.peek(&frame.0).await, Some(Outcome::Expired));
    assert_eq!(relay.cancel(&frame.0).await, Given::NotSent);

    // Every frame claimed is acknowledged; the one another holder tried
    // stayed pending until the lease holder claimed it.
    let pending: redis::Value = redis::cmd("XPENDING")
        .arg(relay.streams.socket_frames("onebot", BOT))
        .arg(relay::GROUP)
        .query_async(&mut relay.connection)
        .await
        .unwrap();
    let redis::Value::Array(summary) = pending else {
        panic!("{pending:?}")
    };
    assert_eq!(summary[0], redis::Value::Int(0), "{summary:?}");
}

#[tokio::test]
async fn an_outcome_is_waited_for_without_being_taken() {
    let mut relay = Relay::start().await;
    let echo = "r1.1";
    let within = Duration::from_millis(100);
    let nothing = relay::wait(&mut relay.connection, &relay.streams, echo, within)
        .await
        .unwrap();
    assert_eq!(nothing, None, "nothing reported within the wait");
    let answered = Outcome::Answered {
        answer: r#"{"status":"ok","retcode":0,"echo":"r1.1"}"#.into(),
    };
    relay::report(&mut relay.connection, &relay.streams, echo, &answered)
        .await
        .unwrap();
    for _ in 0..2 {
        let waited = relay::wait(&mut relay.connection, &relay.streams, echo, within)
            .await
            .unwrap();
        assert_eq!(waited.as_ref(), Some(&answered));
    }
    assert_eq!(relay.peek(echo).await, Some(answered));
    let ttl: i64 = redis::cmd("PTTL")
        .arg(relay.streams.socket_outcome(echo))
        .query_async(&mut relay.connection)
        .await
        .unwrap();
    assert!(ttl > 0 && ttl <= relay::KEEP.as_millis() as i64, "{ttl}");
}
