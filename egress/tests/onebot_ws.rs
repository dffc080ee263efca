//! The OneBot sender with `transport = "ws"` against a real redis-server
//! and a stand-in of the ingest replica holding the bot's WebSocket: it
//! reads the bot's frames as ingest does (group `carrier`), claims each
//! with the same script (under the bot's lease), and reports the
//! implementation's answer, as the test's script says per frame. What
//! egress makes of each outcome: delivered, refused (dead), retried with a
//! new frame when none was sent (no holder, or past its deadline), and a
//! frame sent whose answer was lost is never sent again.

mod senders;

use botline_shared::message::{ChatKind, Reply};
use botline_shared::redis_conn::{self, RawEntry};
use botline_shared::relay::{self, Claim, Outcome};
use botline_shared::streams::Streams;
use senders::*;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BOT: &str = "10001000";
const HOLDER: &str = "holder-under-test";

/// What the holder does with the n-th frame it reads (0-based).
#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Claims it; the implementation answers with this retcode at once.
    Answer(i64),
    /// Claims it only after this long (past its deadline).
    ClaimAfter(Duration),
    /// Claims it, the implementation answers after this long.
    AnswerAfter(Duration),
    /// Claims it and never reports (the connection died with it).
    Swallow,
}

/// The holder's record: each frame's echo and its claim, and the frames it
/// wrote to the implementation.
#[derive(Default)]
struct Record {
    claims: Vec<(String, Claim)>,
    written: Vec<Value>,
}

#[derive(Clone)]
struct Holder {
    client: redis::Client,
    streams: Streams,
    record: Arc<Mutex<Record>>,
}

impl Holder {
    /// Hold bot `BOT`'s lease and serve its frames with `script` (until
    /// egress's Redis stops, at the end of the test).
    async fn start(egress: &Egress, script: fn(usize) -> Behaviour) -> Holder {
        let holder = Holder {
            client: egress.redis.client(),
            streams: egress.streams.clone(),
            record: Arc::default(),
        };
        let lease = holder.streams.consumer_lease("onebot-socket", BOT);
        let mut connection = holder.connection().await;
        let _: () = redis::cmd("SET")
            .arg(lease)
            .arg(HOLDER)
            .query_async(&mut connection)
            .await
            .unwrap();
        let serving = holder.clone();
        tokio::spawn(async move { serving.serve(script).await });
        holder
    }

    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        let config =
            redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .unwrap()
    }

    async fn serve(self, script: fn(usize) -> Behaviour) {
        let stream = self.streams.socket_frames("onebot", BOT);
        let mut connection = self.connection().await;
        let _: Result<(), redis::RedisError> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&stream)
            .arg(relay::GROUP)
            .arg("0")
            .arg("MKSTREAM")
            .query_async(&mut connection)
            .await;
        let mut nth = 0;
        loop {
            let read: Result<redis::Value, _> = redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(relay::GROUP)
                .arg(relay::GROUP)
                .arg("BLOCK")
                .arg(100)
                .arg("STREAMS")
                .arg(&stream)
                .arg(">")
                .query_async(&mut connection)
                .await;
            // Redis stops at the end of the test.
            let Ok(read) = read else { return };
            for entry in redis_conn::parse_read_reply(read).unwrap() {
                let frame = self.clone();
                let behaviour = script(nth);
                nth += 1;
                let stream = stream.clone();
                tokio::spawn(async move { frame.frame(&stream, entry, behaviour).await });
            }
        }
    }

    async fn frame(self, stream: &str, entry: RawEntry, behaviour: Behaviour) {
        let fields = entry.fields.unwrap();
        let field = |name: &str| {
            let (_, value) = fields.iter().find(|(key, _)| key == name).unwrap();
            String::from_utf8(value.clone()).unwrap()
        };
        let echo = field(relay::field::ECHO);
        if let Behaviour::ClaimAfter(wait) = behaviour {
            tokio::time::sleep(wait).await;
        }
        let mut connection = self.connection().await;
        let lease = self.streams.consumer_lease("onebot-socket", BOT);
        let claim = relay::claim(
            &mut connection,
            &self.streams,
            stream,
            &entry.id,
            &echo,
            field(relay::field::DEADLINE_MS).parse().unwrap(),
            (&lease, HOLDER),
        )
        .await
        .unwrap();
        self.record
            .lock()
            .unwrap()
            .claims
            .push((echo.clone(), claim));
        if claim != Claim::Send {
            return;
        }
        let action: Value = serde_json::from_str(&field(relay::field::FRAME)).unwrap();
        self.record.lock().unwrap().written.push(action.clone());
        let retcode = match behaviour {
            Behaviour::Answer(retcode) => retcode,
            Behaviour::AnswerAfter(wait) => {
                tokio::time::sleep(wait).await;
                0
            }
            Behaviour::ClaimAfter(_) => 0,
            Behaviour::Swallow => return,
        };
        let answer = match retcode {
            0 => json!({"status": "ok", "retcode": 0, "data": {"message_id": 4242}, "echo": echo}),
            _ => json!({"status": "failed", "retcode": retcode, "data": null,
                        "message": "群不存在", "wording": "group not found", "echo": echo}),
        };
        let outcome = Outcome::Answered {
            answer: answer.to_string(),
        };
        relay::report(&mut connection, &self.streams, &echo, &outcome)
            .await
            .unwrap();
    }

    fn claims(&self) -> Vec<Claim> {
        let record = self.record.lock().unwrap();
        record.claims.iter().map(|(_, claim)| *claim).collect()
    }

    fn written(&self) -> Vec<Value> {
        self.record.lock().unwrap().written.clone()
    }
}

/// Egress with the OneBot sender over the socket; `before` goes in `[egress]`.
fn egress(before: &str, extra: &str) -> Egress {
    Egress::start(
        &format!(
            "{before}\n[egress.platforms.onebot]\nenabled = true\ntransport = \"ws\"\n\
             pickup_timeout_ms = 300\n{extra}"
        ),
        &[],
    )
}

fn group_reply(id: &str) -> Reply {
    let mut reply = reply(
        id,
        "onebot",
        chat("123456789", ChatKind::Group),
        "hi @12345678",
    );
    reply.bot = BOT.into();
    reply.mentions = vec!["12345678".into()];
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_frame_is_delivered_and_a_failed_one_refused() {
    let egress = egress("", "");
    let holder = Holder::start(&egress, |nth| {
        Behaviour::Answer(if nth == 0 { 0 } else { 100 })
    })
    .await;
    egress.send(&group_reply("r-1"));
    let receipts = egress.delivered(1).await;
    assert_eq!(receipts[0].attempts, 1);
    assert_eq!(receipts[0].platform_message_id.as_deref(), Some("4242"));
    let written = holder.written();
    assert_eq!(written.len(), 1);
    assert_eq!(written[0]["action"], "send_msg");
    assert!(written[0]["echo"].as_str().unwrap().starts_with("r-1."));
    assert_eq!(
        written[0]["params"],
        json!({"message_type": "group", "group_id": 123456789, "message": [
            {"type": "text", "data": {"text": "hi "}},
            {"type": "at", "data": {"qq": "12345678"}}]}),
        "the HTTP path's send_msg parameters"
    );

    egress.send(&group_reply("r-2"));
    eventually("a dead letter", || async { egress.dead().len() == 1 }).await;
    let error = &egress.dead()[0].error;
    assert!(
        error.contains("retcode 100 (failed): group not found"),
        "{error}"
    );
    assert_eq!(holder.written().len(), 2, "a refusal is not sent again");
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_holder_the_frame_is_never_sent_and_the_attempt_is_retried() {
    let egress = egress("", "");
    egress.send(&group_reply("r-1"));
    // Nobody holds the bot's connection for a while: attempts time out,
    // each frame cancelled.
    let stream = egress.streams.socket_frames("onebot", BOT);
    eventually("two frames waiting in vain", || async {
        let length: usize = redis::cmd("XLEN")
            .arg(&stream)
            .query(&mut egress.redis.connection())
            .unwrap();
        length >= 2
    })
    .await;
    assert!(egress.receipts().is_empty());
    let holder = Holder::start(&egress, |_| Behaviour::Answer(0)).await;
    let receipts = egress.delivered(1).await;
    assert!(receipts[0].attempts >= 2, "{:?}", receipts[0]);
    assert_eq!(holder.written().len(), 1, "sent once");
    let claims = holder.claims();
    let sent = claims.iter().filter(|claim| **claim == Claim::Send).count();
    let cancelled = claims.iter().filter(|claim| **claim == Claim::Cancelled);
    assert_eq!(
        (sent, cancelled.count()),
        (1, claims.len() - 1),
        "the frames given up on are not sent: {claims:?}"
    );
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_taken_past_its_deadline_is_not_sent_and_a_new_one_is() {
    let egress = egress("", "");
    let holder = Holder::start(&egress, |nth| match nth {
        0 => Behaviour::ClaimAfter(Duration::from_millis(600)),
        _ => Behaviour::Answer(0),
    })
    .await;
    egress.send(&group_reply("r-1"));
    let receipts = egress.delivered(1).await;
    assert_eq!(receipts[0].attempts, 2);
    eventually("the late claim", || async { holder.claims().len() == 2 }).await;
    let claims = holder.claims();
    assert!(
        matches!(claims[1], Claim::Expired | Claim::Cancelled),
        "the late frame was not sent: {claims:?}"
    );
    assert_eq!(claims[0], Claim::Send);
    assert_eq!(holder.written().len(), 1);
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_sent_whose_answer_is_lost_is_not_sent_again() {
    let egress = egress("", "timeout_ms = 300\n");
    let holder = Holder::start(&egress, |_| Behaviour::Swallow).await;
    egress.send(&group_reply("r-1"));
    eventually("a dead letter", || async { egress.dead().len() == 1 }).await;
    let error = &egress.dead()[0].error;
    assert!(error.contains("answer was lost"), "{error}");
    assert!(error.contains("requeue it if it did not arrive"), "{error}");
    assert_eq!(holder.written().len(), 1, "never sent twice");
    assert_eq!(holder.claims(), [Claim::Send]);
    assert!(egress.receipts().is_empty());
    egress.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_that_comes_after_its_attempt_gave_up_is_not_sent_again() {
    // The send budget runs out while the frame waits for its answer; the
    // entry is delivered again, and that attempt finds the answer.
    let egress = egress("send_budget_ms = 800", "timeout_ms = 5000\n");
    let holder = Holder::start(&egress, |_| {
        Behaviour::AnswerAfter(Duration::from_millis(1500))
    })
    .await;
    egress.send(&group_reply("r-1"));
    let receipts = egress.delivered(1).await;
    assert_eq!(receipts[0].platform_message_id.as_deref(), Some("4242"));
    assert_eq!(holder.written().len(), 1, "sent once");
    assert_eq!(holder.claims(), [Claim::Send]);
    let frames: usize = redis::cmd("XLEN")
        .arg(egress.streams.socket_frames("onebot", BOT))
        .query(&mut egress.redis.connection())
        .unwrap();
    assert_eq!(frames, 1, "no second frame was made");
    egress.stop().await;
}

#[tokio::test]
async fn over_the_socket_no_access_token_is_needed_and_the_pickup_time_is_checked() {
    let _ = egress("", "").stop().await;
    let error = Egress::try_start(
        "[egress.platforms.onebot]\nenabled = true\ntransport = \"ws\"\npickup_timeout_ms = 0\n",
        &[],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        error.contains("egress.platforms.onebot.pickup_timeout_ms"),
        "{error}"
    );
    let error = Egress::try_start(
        "[egress.platforms.onebot]\nenabled = true\ntransport = \"pigeon\"\n",
        &[],
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        error.contains("egress.platforms.onebot.transport"),
        "{error}"
    );
}
