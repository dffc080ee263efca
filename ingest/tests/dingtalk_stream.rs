//! DingTalk Stream mode against a local stand-in that speaks it as
//! DingTalk documents it (and its dingtalk-stream SDKs implement it): the
//! registration call (clientId, clientSecret and the robot subscription
//! checked) answers an endpoint and a one-time ticket; frames carry
//! `specVersion`, `type`, `headers` (`messageId`, `topic`) and `data`;
//! CALLBACK frames not acknowledged by their `messageId` when a connection
//! ends are sent again on the next one; `ping` wants its pong; `disconnect`
//! comes before DingTalk closes a socket. Messages keep flowing through a
//! disconnect and a dropped socket, none lost or doubled, every frame
//! answered — acknowledgements only once the message is in `in`; across two
//! ingest replicas only one connects, and the other takes over when the
//! holder dies. A quiet socket stays up on ingest's pings; one gone silent
//! (open, but nothing read or sent) is found dead within `idle_timeout_ms`
//! and replaced.

mod common;

use axum::extract::State as AxumState;
use axum::routing::post;
use axum::Json;
use botline_ingest::platforms::dingtalk::SESSION_WEBHOOK;
use botline_shared::message::{ChatKind, UnifiedMessage};
use botline_shared::testing::RedisServer;
use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_util::sync::CancellationToken;

const CLIENT_ID: &str = "dingclientid0123";
const APP_SECRET: &str = "GT-lsu-taDAsTsxxxx-app-secret";
const ROBOT_TOPIC: &str = "/v1.0/im/bot/messages/get";
const WAIT: Duration = Duration::from_secs(30);

/// What the test tells the connection of the moment to do.
enum Command {
    /// Send this frame.
    Send(Value),
    /// Send a SYSTEM `disconnect`, then this frame on the same socket.
    DisconnectThenSend(Value),
    /// Drop the TCP connection without a close frame.
    Drop,
    /// Send this frame, then fall silent: the TCP connection stays open but
    /// nothing more is read (so no pong either) or sent on it.
    SendThenSilence(Value),
}

#[derive(Default)]
struct State {
    /// Registration bodies, in order; tickets issued and not yet used.
    registrations: Vec<Value>,
    tickets: BTreeSet<String>,
    /// Sockets accepted, open now, most ever open at once.
    accepted: usize,
    live: usize,
    most_live: usize,
    current: Option<(usize, mpsc::UnboundedSender<Command>)>,
    /// Frames sent and not answered, by messageId.
    unanswered: BTreeMap<String, Value>,
    /// messageIds answered, in order.
    answers: Vec<String>,
    /// Unanswered CALLBACK frames of a closed connection, for the next one.
    redeliver: Vec<Value>,
    /// Where the messages must be before their frame is acknowledged.
    inbound: Option<(String, String)>,
    faults: Vec<String>,
    /// WebSocket pings received from ingest.
    pings: usize,
    /// Silent sockets, kept open.
    silent: Vec<ServerSocket>,
}

#[derive(Clone)]
struct DingTalk {
    api_base: String,
    endpoint: String,
    state: Arc<Mutex<State>>,
}

impl DingTalk {
    async fn start() -> DingTalk {
        let sockets = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dingtalk = DingTalk {
            api_base: format!("http://{}", api.local_addr().unwrap()),
            endpoint: format!("ws://{}/connect", sockets.local_addr().unwrap()),
            state: Arc::default(),
        };
        let router = axum::Router::new()
            .route("/v1.0/gateway/connections/open", post(register))
            .with_state(dingtalk.clone());
        tokio::spawn(async move { axum::serve(api, router).await });
        let serving = dingtalk.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = sockets.accept().await {
                tokio::spawn(serving.clone().connection(stream));
            }
        });
        dingtalk
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn check_inbound(&self, redis: &RedisServer, key: &str) {
        self.state().inbound = Some((redis.url(), key.to_string()));
    }

    fn command(&self, command: Command) {
        let (_, current) = self.state().current.clone().expect("a connection");
        assert!(current.send(command).is_ok(), "the connection listens");
    }

    async fn wait_accepted(&self, count: usize) {
        wait_for(WAIT, &format!("{count} connections"), || {
            let accepted = self.state().accepted;
            async move { accepted >= count }
        })
        .await;
    }

    /// Wait until every frame sent has been answered, these among them.
    async fn wait_all_answered(&self, ids: &[&str]) {
        wait_for(WAIT, &format!("answers to {ids:?}"), || {
            let state = self.state();
            let done = state.unanswered.is_empty()
                && ids
                    .iter()
                    .all(|id| state.answers.iter().any(|answer| answer == id));
            async move { done }
        })
        .await;
    }

    async fn connection(self, stream: tokio::net::TcpStream) {
        let mut ticket = String::new();
        // tungstenite's handshake callback type: its error is a whole HTTP response.
        #[allow(clippy::result_large_err)]
        let callback = |request: &Request, response: Response| {
            ticket =
                url::form_urlencoded::parse(request.uri().query().unwrap_or_default().as_bytes())
                    .find(|(name, _)| name == "ticket")
                    .map(|(_, value)| value.into_owned())
                    .unwrap_or_default();
            Ok(response)
        };
        let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
            return;
        };
        let (commands, mut orders) = mpsc::unbounded_channel();
        let (number, redeliver) = {
            let mut state = self.state();
            if !state.tickets.remove(&ticket) {
                state
                    .faults
                    .push(format!("connected with ticket {ticket:?}"));
                return;
            }
            state.accepted += 1;
            state.live += 1;
            state.most_live = state.most_live.max(state.live);
            let number = state.accepted;
            state.current = Some((number, commands));
            (number, std::mem::take(&mut state.redeliver))
        };
        let mut mine: BTreeSet<String> = BTreeSet::new();
        let mut ok = true;
        for frame in redeliver {
            ok = ok && self.send(&mut socket, &mut mine, frame).await;
        }
        let mut silent = false;
        while ok {
            tokio::select! {
                order = orders.recv() => match order {
                    Some(Command::Send(frame)) => {
                        ok = self.send(&mut socket, &mut mine, frame).await;
                    }
                    Some(Command::DisconnectThenSend(frame)) => {
                        let disconnect = system("disconnect", "sys-disconnect", json!({"reason": "server is restarting"}));
                        ok = socket.send(Frame::text(disconnect.to_string())).await.is_ok()
                            && self.send(&mut socket, &mut mine, frame).await;
                    }
                    Some(Command::SendThenSilence(frame)) => {
                        silent = self.send(&mut socket, &mut mine, frame).await;
                        break;
                    }
                    Some(Command::Drop) | None => break,
                },
                frame = read_json(&mut socket, || self.state().pings += 1) => match frame {
                    Some(frame) => self.answered(frame),
                    None => break,
                },
            }
        }
        let mut state = self.state();
        if silent {
            state.silent.push(socket);
        } else {
            drop(socket);
        }
        state.live -= 1;
        let left: Vec<Value> = mine
            .iter()
            .filter_map(|id| state.unanswered.get(id).cloned())
            .filter(|frame| frame["type"] == "CALLBACK")
            .collect();
        for frame in &left {
            let id = frame["headers"]["messageId"].as_str().unwrap().to_string();
            state.unanswered.remove(&id);
        }
        // A ping of a closed connection is not asked again.
        for id in &mine {
            state.unanswered.remove(id);
        }
        match state.current.clone() {
            Some((current, commands)) if current != number => {
                for frame in left {
                    let _ = commands.send(Command::Send(frame));
                }
            }
            _ => {
                state.current = None;
                state.redeliver.extend(left);
            }
        }
    }

    async fn send(
        &self,
        socket: &mut ServerSocket,
        mine: &mut BTreeSet<String>,
        frame: Value,
    ) -> bool {
        let id = frame["headers"]["messageId"].as_str().unwrap().to_string();
        mine.insert(id.clone());
        self.state().unanswered.insert(id, frame.clone());
        socket.send(Frame::text(frame.to_string())).await.is_ok()
    }

    fn answered(&self, answer: Value) {
        let mut state = self.state();
        let id = answer["headers"]["messageId"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let Some(frame) = state.unanswered.remove(&id) else {
            state.faults.push(format!(
                "an answer to {id:?}, not sent or answered already: {answer}"
            ));
            return;
        };
        state.answers.push(id.clone());
        let expected = if frame["type"] == "SYSTEM" {
            // The pong: the ping's own headers and data.
            json!({"code": 200, "headers": frame["headers"], "message": "OK", "data": frame["data"]})
        } else if frame["type"] == "EVENT" {
            json!({"code": 200, "headers": {"contentType": "application/json", "messageId": id},
                "message": "OK", "data": "{\"message\":\"success\",\"status\":\"SUCCESS\"}"})
        } else {
            json!({"code": 200, "headers": {"contentType": "application/json", "messageId": id},
                "message": "OK", "data": "{\"response\":null}"})
        };
        if answer != expected {
            state
                .faults
                .push(format!("answered {answer}, expected {expected}"));
        }
        if frame["type"] != "CALLBACK" {
            return;
        }
        let msg_id = serde_json::from_str::<Value>(frame["data"].as_str().unwrap()).unwrap()
            ["msgId"]
            .as_str()
            .unwrap()
            .to_string();
        if let Some((url, key)) = state.inbound.clone() {
            let mut redis = redis::Client::open(url).unwrap().get_connection().unwrap();
            let messages: Vec<UnifiedMessage> =
                botline_shared::testing::read_stream(&mut redis, &key);
            if !messages
                .iter()
                .any(|message| message.platform_message_id.as_deref() == Some(msg_id.as_str()))
            {
                state
                    .faults
                    .push(format!("{id} acknowledged before its message was in `in`"));
            }
        }
    }
}

/// `POST /v1.0/gateway/connections/open`.
async fn register(
    AxumState(dingtalk): AxumState<DingTalk>,
    Json(body): Json<Value>,
) -> Json<Value> {
    let mut state = dingtalk.state();
    state.registrations.push(body.clone());
    let subscribed = body["subscriptions"]
        .as_array()
        .is_some_and(|subscriptions| {
            subscriptions.contains(&json!({"type": "CALLBACK", "topic": ROBOT_TOPIC}))
        });
    if body["clientId"] != CLIENT_ID || body["clientSecret"] != APP_SECRET || !subscribed {
        state.faults.push(format!("registered with {body}"));
    }
    let ticket = format!("ticket-{}", state.registrations.len());
    state.tickets.insert(ticket.clone());
    Json(json!({"endpoint": dingtalk.endpoint, "ticket": ticket}))
}

fn system(topic: &str, message_id: &str, data: Value) -> Value {
    json!({"specVersion": "1.0", "type": "SYSTEM",
        "headers": {"contentType": "application/json", "messageId": message_id,
            "time": "1700000000000", "topic": topic},
        "data": data.to_string()})
}

/// A CALLBACK frame carrying a group text message mentioning the bot.
fn callback(message_id: &str, msg_id: &str, text: &str) -> Value {
    let data = json!({
        "conversationId": "cidGroup==", "atUsers": [{"dingtalkId": "$:LWCP_v1:$bot"}],
        "chatbotCorpId": "dingcorp", "chatbotUserId": "$:LWCP_v1:$bot", "msgId": msg_id,
        "senderNick": "张三", "isAdmin": false, "senderStaffId": "2220111111",
        "sessionWebhookExpiredTime": 1_700_005_400_000_i64, "createAt": 1_700_000_000_000_i64,
        "senderCorpId": "dingcorp", "conversationType": "2", "senderId": "$:LWCP_v1:$sender",
        "conversationTitle": "group", "isInAtList": true,
        "sessionWebhook": "https://oapi.dingtalk.com/robot/sendBySession?session=abc",
        "text": {"content": text}, "robotCode": "dingrobot", "msgtype": "text",
    });
    json!({"specVersion": "1.0", "type": "CALLBACK",
        "headers": {"appId": "app-1", "connectionId": "conn-1", "contentType": "application/json",
            "messageId": message_id, "time": "1700000000000", "topic": ROBOT_TOPIC},
        "data": data.to_string()})
}

fn settings(dingtalk: &DingTalk) -> String {
    format!(
        "[ingest.platforms.dingtalk]\nenabled = true\nmode = \"stream\"\nclient_id = \"{CLIENT_ID}\"\n\
         api_base_url = \"{}\"\nlease_ttl_ms = 1500\nstandby_poll_ms = 100\n\
         connect_timeout_ms = 5000\nreconnect_base_ms = 20\nreconnect_cap_ms = 200\n",
        dingtalk.api_base
    )
}

fn texts(redis: &RedisServer, key: &str) -> Vec<String> {
    read_stream::<UnifiedMessage>(redis, key)
        .into_iter()
        .map(|message| message.text)
        .collect()
}

async fn expect_texts(redis: &RedisServer, key: &str, expected: &[&str]) {
    wait_for(WAIT, &format!("{expected:?} in `in`"), || {
        let count = texts(redis, key).len();
        async move { count >= expected.len() }
    })
    .await;
    assert_eq!(texts(redis, key), expected, "nothing lost, nothing doubled");
}

const SECRET_ENV: (&str, &str) = ("BOTLINE_DINGTALK_APP_SECRET", APP_SECRET);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_flow_are_acknowledged_and_survive_a_disconnect_and_a_drop() {
    let dingtalk = DingTalk::start().await;
    let harness = start_configured(&settings(&dingtalk), &[SECRET_ENV]).await;
    let key = harness.streams.inbound();
    let redis = &harness.redis;
    dingtalk.check_inbound(redis, &key);

    dingtalk.wait_accepted(1).await;
    dingtalk.command(Command::Send(callback("m1", "msg1", " 你好 ")));
    dingtalk.command(Command::Send(system(
        "ping",
        "p1",
        json!({"opaque": "4b4e-ab"}),
    )));
    dingtalk.command(Command::Send(callback("m2", "msg2", "second")));
    expect_texts(redis, &key, &["你好", "second"]).await;
    dingtalk.wait_all_answered(&["m1", "p1", "m2"]).await;
    let first = &read_stream::<UnifiedMessage>(redis, &key)[0];
    assert_eq!(first.platform, "dingtalk");
    assert_eq!(first.bot, "dingrobot");
    assert_eq!(first.chat.id, "cidGroup==");
    assert_eq!(first.chat.kind, ChatKind::Group);
    assert!(first.mentions.bot);
    assert_eq!(first.platform_message_id.as_deref(), Some("msg1"));
    assert_eq!(
        first.platform_data.get(SESSION_WEBHOOK).map(String::as_str),
        Some("https://oapi.dingtalk.com/robot/sendBySession?session=abc")
    );

    // `disconnect`, then a callback on the socket about to close: a new
    // connection, and the callback arrives (again, unanswered) on it, once.
    dingtalk.command(Command::DisconnectThenSend(callback(
        "m3",
        "msg3",
        "around a disconnect",
    )));
    dingtalk.wait_accepted(2).await;
    dingtalk.command(Command::Send(callback(
        "m4",
        "msg4",
        "after the disconnect",
    )));
    expect_texts(
        redis,
        &key,
        &[
            "你好",
            "second",
            "around a disconnect",
            "after the disconnect",
        ],
    )
    .await;
    dingtalk.wait_all_answered(&["m3", "m4"]).await;

    // The socket drops: registered and opened again.
    dingtalk.command(Command::Drop);
    dingtalk.wait_accepted(3).await;
    dingtalk.command(Command::Send(callback("m5", "msg5", "after a drop")));
    // DingTalk sends a callback again (a lost ack): added once.
    dingtalk.command(Command::Send(callback("m5-again", "msg5", "after a drop")));
    dingtalk.command(Command::Send(json!({"specVersion": "1.0", "type": "EVENT",
        "headers": {"messageId": "ev1", "topic": "*", "eventType": "chat_update", "contentType": "application/json"},
        "data": "{}"})));
    expect_texts(
        redis,
        &key,
        &[
            "你好",
            "second",
            "around a disconnect",
            "after the disconnect",
            "after a drop",
        ],
    )
    .await;
    dingtalk.wait_all_answered(&["m5", "m5-again", "ev1"]).await;

    let state = dingtalk.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(state.registrations.len(), 3, "one registration per socket");
    assert!(state.tickets.is_empty(), "every ticket used");
    drop(state);
    assert_eq!(texts(redis, &key).len(), 5);
}

#[tokio::test]
async fn stream_mode_needs_the_client_id_and_the_secret() {
    let dingtalk = DingTalk::start().await;
    let redis = RedisServer::start();
    let refused = |overlay: &str, env: &[(&str, &str)]| {
        configured_ingest(&redis.url(), Some(overlay), env, None)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default()
    };
    let overlay = settings(&dingtalk);
    assert!(refused(&overlay, &[]).contains("BOTLINE_DINGTALK_APP_SECRET"));
    let without_id = overlay.replace(&format!("client_id = \"{CLIENT_ID}\""), "client_id = \"\"");
    assert!(refused(&without_id, &[SECRET_ENV]).contains("client_id"));
    assert_eq!(refused(&overlay, &[SECRET_ENV]), "");
}

/// An ingest replica on `redis` with DingTalk in stream mode, served on
/// `runtime`'s threads until `shutdown` (or until the runtime is dropped).
fn start_replica(
    runtime: &tokio::runtime::Handle,
    redis: &RedisServer,
    dingtalk: &DingTalk,
    shutdown: &CancellationToken,
) -> String {
    let ingest =
        configured_ingest(&redis.url(), Some(&settings(dingtalk)), &[SECRET_ENV], None).unwrap();
    let key = ingest.streams.inbound();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let shutdown = shutdown.clone();
    runtime.spawn(async move {
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        botline_ingest::run(listener, ingest, shutdown).await
    });
    key
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_open_one_connection_and_the_other_takes_over() {
    let dingtalk = DingTalk::start().await;
    let redis = RedisServer::start();
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let never = CancellationToken::new();
    let key = start_replica(doomed.handle(), &redis, &dingtalk, &never);
    dingtalk.wait_accepted(1).await;
    let second_shutdown = CancellationToken::new();
    start_replica(
        &tokio::runtime::Handle::current(),
        &redis,
        &dingtalk,
        &second_shutdown,
    );
    dingtalk.command(Command::Send(callback("r1", "rmsg1", "one")));
    expect_texts(&redis, &key, &["one"]).await;
    dingtalk.wait_all_answered(&["r1"]).await;
    assert_eq!(dingtalk.state().accepted, 1, "the second replica stands by");

    // The holder dies without a word: its lease expires, the other
    // replica registers and connects.
    doomed.shutdown_background();
    dingtalk.wait_accepted(2).await;
    dingtalk.command(Command::Send(callback("r2", "rmsg2", "two")));
    expect_texts(&redis, &key, &["one", "two"]).await;
    dingtalk.wait_all_answered(&["r2"]).await;

    let state = dingtalk.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(state.most_live, 1, "never two connections at once");
    assert_eq!(state.registrations.len(), 2);
    drop(state);
    second_shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_stream_is_kept_and_a_silent_one_is_replaced_within_the_idle_time() {
    let dingtalk = DingTalk::start().await;
    let overlay = format!(
        "{}idle_timeout_ms = 1000\nping_interval_ms = 300\n",
        settings(&dingtalk)
    );
    let harness = start_configured(&overlay, &[SECRET_ENV]).await;
    let key = harness.streams.inbound();
    let redis = &harness.redis;
    dingtalk.check_inbound(redis, &key);

    dingtalk.wait_accepted(1).await;
    dingtalk.command(Command::Send(system(
        "ping",
        "p1",
        json!({"opaque": "o-1"}),
    )));
    dingtalk.command(Command::Send(callback("m1", "msg1", "one")));
    expect_texts(redis, &key, &["one"]).await;
    dingtalk.wait_all_answered(&["p1", "m1"]).await;

    // Quiet, but answering: ingest's WebSocket pings (every 300 ms) get
    // their pongs, and the socket outlives its idle time several times over.
    wait_for(WAIT, "ten pings", || {
        let pings = dingtalk.state().pings;
        async move { pings >= 10 }
    })
    .await;
    assert_eq!(dingtalk.state().accepted, 1, "a quiet socket is kept");

    // Silent: a callback, then nothing at all, the TCP connection open.
    // Its ack goes nowhere; the socket is found dead and replaced, and the
    // callback, sent again on the new one, is added once.
    let silenced = std::time::Instant::now();
    dingtalk.command(Command::SendThenSilence(callback(
        "m2",
        "msg2",
        "just before the silence",
    )));
    dingtalk.wait_accepted(2).await;
    assert_replaced_after_idle(silenced, Duration::from_secs(1));
    dingtalk.command(Command::Send(callback("m3", "msg3", "after the silence")));
    expect_texts(
        redis,
        &key,
        &["one", "just before the silence", "after the silence"],
    )
    .await;
    dingtalk.wait_all_answered(&["m2", "m3"]).await;

    let state = dingtalk.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(state.accepted, 2);
    assert_eq!(state.registrations.len(), 2, "one registration per socket");
    drop(state);
    assert_eq!(texts(redis, &key).len(), 3, "nothing doubled");
}

#[tokio::test]
async fn idle_settings_are_checked_at_start() {
    let dingtalk = DingTalk::start().await;
    let redis = RedisServer::start();
    let refused = |extra: &str| {
        configured_ingest(
            &redis.url(),
            Some(&format!("{}{extra}", settings(&dingtalk))),
            &[SECRET_ENV],
            None,
        )
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default()
    };
    assert!(refused("idle_timeout_ms = 0\n").contains("ingest.platforms.dingtalk.idle_timeout_ms"));
    assert!(refused("ping_interval_ms = 60000\n")
        .contains("ingest.platforms.dingtalk.ping_interval_ms"));
    assert_eq!(refused("ping_interval_ms = 0\n"), "");
}
