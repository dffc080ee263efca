//! Slack Socket Mode against a local stand-in that speaks it as Slack
//! documents it: `apps.connections.open` (the app-level token checked)
//! answers a WebSocket URL; each connection starts with `hello`; envelopes
//! not acknowledged by their `envelope_id` when a connection ends are sent
//! again on the next one; `disconnect` comes before Slack closes a socket.
//! Messages keep flowing through a refresh and a dropped socket, none lost
//! or doubled, every envelope acknowledged — and only once its message is in
//! `in`; across two ingest replicas only one connects, and the other takes
//! over when the holder dies. A socket kept quiet stays up on ingest's pings;
//! one gone silent (open, but nothing read or sent) is found dead within
//! `idle_timeout_ms` and replaced.

mod common;

use axum::extract::State as AxumState;
use axum::http::HeaderMap;
use axum::routing::post;
use axum::Json;
use botline_shared::message::{ChatKind, UnifiedMessage};
use botline_shared::testing::RedisServer;
use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_util::sync::CancellationToken;

const APP_TOKEN: &str = "xapp-1-A0123-456-socket-mode-test";
const BOT: &str = "UBOT";
const WAIT: Duration = Duration::from_secs(30);

/// What the test tells the connection of the moment to do.
enum Command {
    /// Send this envelope.
    Send(Value),
    /// Send `disconnect` with this reason, then this envelope on the same
    /// socket (Slack may still deliver until it closes it).
    DisconnectThenSend(&'static str, Value),
    /// Drop the TCP connection without a close frame.
    Drop,
    /// Send this envelope, then fall silent: the TCP connection stays open
    /// but nothing more is read (so no pong either) or sent on it.
    SendThenSilence(Value),
}

#[derive(Default)]
struct State {
    /// The `Authorization` header of each `apps.connections.open`.
    opens: Vec<String>,
    /// Sockets accepted, open now, most ever open at once, and how many
    /// were accepted while another was still open (a refresh's overlap).
    accepted: usize,
    live: usize,
    most_live: usize,
    overlapped: usize,
    /// The newest connection: its number and its commands.
    current: Option<(usize, mpsc::UnboundedSender<Command>)>,
    /// Envelopes sent and not acknowledged, by id.
    unacked: BTreeMap<String, Value>,
    /// Envelope ids acknowledged, in order.
    acks: Vec<String>,
    /// Unacknowledged envelopes of a closed connection, for the next one.
    redeliver: Vec<Value>,
    /// Where the messages must be before their envelope is acknowledged.
    inbound: Option<(String, String)>,
    faults: Vec<String>,
    /// WebSocket pings received from ingest.
    pings: usize,
    /// Silent sockets, kept open.
    silent: Vec<ServerSocket>,
}

#[derive(Clone)]
struct Slack {
    /// `http://…/api`: the Web API's base.
    api_base: String,
    socket_url: String,
    state: Arc<Mutex<State>>,
}

impl Slack {
    async fn start() -> Slack {
        let sockets = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let slack = Slack {
            api_base: format!("http://{}/api", api.local_addr().unwrap()),
            socket_url: format!("ws://{}/link", sockets.local_addr().unwrap()),
            state: Arc::default(),
        };
        let router = axum::Router::new()
            .route("/api/apps.connections.open", post(open))
            .with_state(slack.clone());
        tokio::spawn(async move { axum::serve(api, router).await });
        let serving = slack.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = sockets.accept().await {
                tokio::spawn(serving.clone().connection(stream));
            }
        });
        slack
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Check, at each ack, that the message is in `key` on `redis` already.
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

    /// Wait until every envelope sent has been acknowledged.
    async fn wait_all_acked(&self, ids: &[&str]) {
        wait_for(WAIT, &format!("acks of {ids:?}"), || {
            let state = self.state();
            let done = state.unacked.is_empty()
                && ids.iter().all(|id| state.acks.iter().any(|ack| ack == id));
            async move { done }
        })
        .await;
    }

    async fn connection(self, stream: tokio::net::TcpStream) {
        let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
            return;
        };
        let (commands, mut orders) = mpsc::unbounded_channel();
        let (number, redeliver) = {
            let mut state = self.state();
            state.accepted += 1;
            if state.live > 0 {
                state.overlapped += 1;
            }
            state.live += 1;
            state.most_live = state.most_live.max(state.live);
            let number = state.accepted;
            state.current = Some((number, commands));
            (number, std::mem::take(&mut state.redeliver))
        };
        let hello = json!({"type": "hello", "num_connections": 1,
            "debug_info": {"host": "applink-test", "approximate_connection_time": 18060},
            "connection_info": {"app_id": "A0123"}});
        let mut mine: BTreeSet<String> = BTreeSet::new();
        let mut ok = socket.send(Frame::text(hello.to_string())).await.is_ok();
        for envelope in redeliver {
            ok = ok && self.send(&mut socket, &mut mine, envelope).await;
        }
        let mut silent = false;
        while ok {
            tokio::select! {
                order = orders.recv() => match order {
                    Some(Command::Send(envelope)) => {
                        ok = self.send(&mut socket, &mut mine, envelope).await;
                    }
                    Some(Command::DisconnectThenSend(reason, envelope)) => {
                        let disconnect = json!({"type": "disconnect", "reason": reason,
                            "debug_info": {"host": "applink-test"}});
                        ok = socket.send(Frame::text(disconnect.to_string())).await.is_ok()
                            && self.send(&mut socket, &mut mine, envelope).await;
                    }
                    Some(Command::SendThenSilence(envelope)) => {
                        silent = self.send(&mut socket, &mut mine, envelope).await;
                        break;
                    }
                    Some(Command::Drop) | None => break,
                },
                frame = read_json(&mut socket, || self.state().pings += 1) => match frame {
                    Some(frame) => self.acknowledged(frame),
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
        // What this connection left unacknowledged goes out again.
        state.live -= 1;
        let left: Vec<Value> = mine
            .iter()
            .filter_map(|id| state.unacked.get(id).cloned())
            .collect();
        match state.current.clone() {
            Some((current, commands)) if current != number => {
                for envelope in left {
                    let _ = commands.send(Command::Send(envelope));
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
        envelope: Value,
    ) -> bool {
        let id = envelope["envelope_id"].as_str().unwrap().to_string();
        mine.insert(id.clone());
        self.state().unacked.insert(id, envelope.clone());
        socket.send(Frame::text(envelope.to_string())).await.is_ok()
    }

    fn acknowledged(&self, frame: Value) {
        let mut state = self.state();
        let Some(id) = frame["envelope_id"].as_str() else {
            state.faults.push(format!("not an ack: {frame}"));
            return;
        };
        if frame.as_object().map(|fields| fields.len()) != Some(1) {
            state
                .faults
                .push(format!("an ack with more than its id: {frame}"));
        }
        let Some(envelope) = state.unacked.remove(id) else {
            state
                .faults
                .push(format!("ack of {id}, not sent or acked already"));
            return;
        };
        state.acks.push(id.to_string());
        if let (Some(ts), Some((url, key))) = (
            envelope["payload"]["event"]["ts"].as_str(),
            state.inbound.clone(),
        ) {
            let mut redis = redis::Client::open(url).unwrap().get_connection().unwrap();
            let messages: Vec<UnifiedMessage> =
                botline_shared::testing::read_stream(&mut redis, &key);
            if !messages
                .iter()
                .any(|message| message.platform_message_id.as_deref() == Some(ts))
            {
                state
                    .faults
                    .push(format!("{id} acknowledged before its message was in `in`"));
            }
        }
    }
}

/// `POST /api/apps.connections.open`.
async fn open(AxumState(slack): AxumState<Slack>, headers: HeaderMap) -> Json<Value> {
    let authorization = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let mut state = slack.state();
    state.opens.push(authorization.clone());
    if authorization != format!("Bearer {APP_TOKEN}") {
        state.faults.push(format!("opened with {authorization:?}"));
        return Json(json!({"ok": false, "error": "invalid_auth"}));
    }
    let n = state.opens.len();
    Json(json!({"ok": true, "url": format!("{}?ticket={n}", slack.socket_url)}))
}

/// An `events_api` envelope carrying a channel message.
fn envelope(id: &str, ts: &str, text: &str) -> Value {
    json!({
        "envelope_id": id, "type": "events_api", "accepts_response_payload": false,
        "retry_attempt": 0, "retry_reason": "",
        "payload": {
            "token": "legacy", "team_id": "T1", "api_app_id": "A0123", "type": "event_callback",
            "event_id": format!("Ev{id}"), "event_time": 1_700_000_000,
            "event": {"type": "message", "channel": "C1", "channel_type": "channel",
                "user": "U42", "text": text, "ts": ts, "event_ts": ts},
        },
    })
}

fn settings(slack: &Slack) -> String {
    format!(
        "[ingest.platforms.slack]\nenabled = true\nmode = \"socket\"\nbot_user_id = \"{BOT}\"\n\
         api_base_url = \"{}\"\nlease_ttl_ms = 1500\nstandby_poll_ms = 100\n\
         connect_timeout_ms = 5000\nreconnect_base_ms = 20\nreconnect_cap_ms = 200\n",
        slack.api_base
    )
}

/// The socket found dead after a second of silence, pinged after 300 ms.
const IDLE: &str = "idle_timeout_ms = 1000\nping_interval_ms = 300\n";

fn texts(redis: &RedisServer, key: &str) -> Vec<String> {
    read_stream::<UnifiedMessage>(redis, key)
        .into_iter()
        .map(|message| message.text)
        .collect()
}

/// Wait until `in` holds `expected` (or more), then check it holds exactly that.
async fn expect_texts(redis: &RedisServer, key: &str, expected: &[&str]) {
    wait_for(WAIT, &format!("{expected:?} in `in`"), || {
        let count = texts(redis, key).len();
        async move { count >= expected.len() }
    })
    .await;
    assert_eq!(texts(redis, key), expected, "nothing lost, nothing doubled");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelopes_flow_are_acknowledged_and_survive_a_refresh_and_a_drop() {
    let slack = Slack::start().await;
    let harness =
        start_configured(&settings(&slack), &[("BOTLINE_SLACK_APP_TOKEN", APP_TOKEN)]).await;
    let key = harness.streams.inbound();
    let redis = &harness.redis;
    slack.check_inbound(redis, &key);

    slack.wait_accepted(1).await;
    slack.command(Command::Send(envelope(
        "e1",
        "1700000001.000100",
        "first <@UBOT>",
    )));
    slack.command(Command::Send(envelope("e2", "1700000002.000200", "second")));
    // Not a message: acknowledged all the same, nothing added.
    slack.command(Command::Send(
        json!({"envelope_id": "slash-1", "type": "slash_commands",
        "accepts_response_payload": true, "payload": {"command": "/weather", "text": "today"}}),
    ));
    expect_texts(redis, &key, &["first @UBOT", "second"]).await;
    slack.wait_all_acked(&["e1", "e2", "slash-1"]).await;
    let first = &read_stream::<UnifiedMessage>(redis, &key)[0];
    assert_eq!(first.platform, "slack");
    assert_eq!(first.bot, BOT);
    assert_eq!(first.chat.id, "C1");
    assert_eq!(first.chat.kind, ChatKind::Group);
    assert!(first.mentions.bot);
    assert_eq!(
        first.platform_message_id.as_deref(),
        Some("1700000001.000100")
    );

    // A refresh: `disconnect`, and one more envelope on the old socket
    // before it closes. The new socket opens while the old one is still
    // up; the old one is closed after.
    slack.command(Command::DisconnectThenSend(
        "refresh_requested",
        envelope("e3", "1700000003.000300", "during refresh"),
    ));
    slack.wait_accepted(2).await;
    slack.command(Command::Send(envelope(
        "e4",
        "1700000004.000400",
        "after refresh",
    )));
    expect_texts(
        redis,
        &key,
        &["first @UBOT", "second", "during refresh", "after refresh"],
    )
    .await;
    slack.wait_all_acked(&["e3", "e4"]).await;
    wait_for(WAIT, "the old socket closed", || {
        let live = slack.state().live;
        async move { live == 1 }
    })
    .await;
    assert_eq!(
        slack.state().overlapped,
        1,
        "the new socket opened before the old one closed"
    );

    // The socket drops: opened again, and what was pending arrives once.
    slack.command(Command::Drop);
    slack.wait_accepted(3).await;
    slack.command(Command::Send(envelope(
        "e5",
        "1700000005.000500",
        "after a drop",
    )));
    // Slack sends an envelope again (say it missed the ack): added once.
    slack.command(Command::Send(envelope(
        "e5-again",
        "1700000005.000500",
        "after a drop",
    )));
    expect_texts(
        redis,
        &key,
        &[
            "first @UBOT",
            "second",
            "during refresh",
            "after refresh",
            "after a drop",
        ],
    )
    .await;
    slack.wait_all_acked(&["e5", "e5-again"]).await;

    let state = slack.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(
        state.opens.len(),
        3,
        "apps.connections.open once per socket"
    );
    assert!(
        state.most_live <= 2,
        "at most the refresh's two sockets at once"
    );
    drop(state);
    assert_eq!(texts(redis, &key).len(), 5);
}

#[tokio::test]
async fn in_socket_mode_the_webhook_is_off_and_the_app_token_is_required() {
    let slack = Slack::start().await;
    let harness =
        start_configured(&settings(&slack), &[("BOTLINE_SLACK_APP_TOKEN", APP_TOKEN)]).await;
    let answer = post_hook(&harness, "slack", "{}", &[]).await;
    assert_refused(answer, 401, "socket mode");

    let redis = RedisServer::start();
    let refused = |env: &[(&str, &str)]| {
        configured_ingest(&redis.url(), Some(&settings(&slack)), env, None)
            .err()
            .map(|error| error.to_string())
            .unwrap_or_default()
    };
    assert!(refused(&[]).contains("BOTLINE_SLACK_APP_TOKEN"));
    assert!(refused(&[("BOTLINE_SLACK_APP_TOKEN", "xoxb-a-bot-token")]).contains("xapp"));
    // The signing secret is not needed in socket mode.
    assert_eq!(refused(&[("BOTLINE_SLACK_APP_TOKEN", APP_TOKEN)]), "");
}

/// An ingest replica on `redis` with Slack in socket mode, served on
/// `runtime`'s threads until `shutdown` (or until the runtime is dropped).
fn start_replica(
    runtime: &tokio::runtime::Handle,
    redis: &RedisServer,
    slack: &Slack,
    shutdown: &CancellationToken,
) -> String {
    let ingest = configured_ingest(
        &redis.url(),
        Some(&settings(slack)),
        &[("BOTLINE_SLACK_APP_TOKEN", APP_TOKEN)],
        None,
    )
    .unwrap();
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
    let slack = Slack::start().await;
    let redis = RedisServer::start();
    // The first replica runs on a runtime of its own, so it can die.
    let doomed = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let never = CancellationToken::new();
    let key = start_replica(doomed.handle(), &redis, &slack, &never);
    slack.wait_accepted(1).await;
    let second_shutdown = CancellationToken::new();
    start_replica(
        &tokio::runtime::Handle::current(),
        &redis,
        &slack,
        &second_shutdown,
    );
    slack.command(Command::Send(envelope("r1", "1700000101.000100", "one")));
    expect_texts(&redis, &key, &["one"]).await;
    slack.wait_all_acked(&["r1"]).await;
    assert_eq!(slack.state().accepted, 1, "the second replica stands by");

    // The holder dies without a word, an envelope unacknowledged: its
    // lease expires, the other replica connects and gets it.
    slack.command(Command::Send(
        json!({"envelope_id": "never-acked", "type": "hello-unknown"}),
    ));
    doomed.shutdown_background();
    slack.wait_accepted(2).await;
    slack.command(Command::Send(envelope("r2", "1700000102.000200", "two")));
    expect_texts(&redis, &key, &["one", "two"]).await;
    slack.wait_all_acked(&["r2"]).await;

    let state = slack.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(state.most_live, 1, "never two connections at once");
    assert_eq!(state.opens.len(), 2);
    drop(state);
    second_shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_socket_is_kept_and_a_silent_one_is_replaced_within_the_idle_time() {
    let slack = Slack::start().await;
    let harness = start_configured(
        &format!("{}{IDLE}", settings(&slack)),
        &[("BOTLINE_SLACK_APP_TOKEN", APP_TOKEN)],
    )
    .await;
    let key = harness.streams.inbound();
    let redis = &harness.redis;
    slack.check_inbound(redis, &key);

    slack.wait_accepted(1).await;
    slack.command(Command::Send(envelope("e1", "1700000201.000100", "one")));
    expect_texts(redis, &key, &["one"]).await;
    slack.wait_all_acked(&["e1"]).await;

    // Quiet, but answering: ingest's pings (every 300 ms) get their pongs,
    // and the socket outlives its idle time several times over.
    wait_for(WAIT, "ten pings", || {
        let pings = slack.state().pings;
        async move { pings >= 10 }
    })
    .await;
    assert_eq!(slack.state().accepted, 1, "a quiet socket is kept");

    // Silent: an envelope, then nothing at all, the TCP connection open.
    // Its ack goes nowhere; the socket is found dead and replaced, and the
    // envelope, sent again on the new one, is added once.
    let silenced = std::time::Instant::now();
    slack.command(Command::SendThenSilence(envelope(
        "e2",
        "1700000202.000200",
        "just before the silence",
    )));
    slack.wait_accepted(2).await;
    assert_replaced_after_idle(silenced, Duration::from_secs(1));
    slack.command(Command::Send(envelope(
        "e3",
        "1700000203.000300",
        "after the silence",
    )));
    expect_texts(
        redis,
        &key,
        &["one", "just before the silence", "after the silence"],
    )
    .await;
    slack.wait_all_acked(&["e2", "e3"]).await;

    let state = slack.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(state.accepted, 2);
    assert_eq!(
        state.opens.len(),
        2,
        "apps.connections.open once per socket"
    );
    drop(state);
    assert_eq!(texts(redis, &key).len(), 3, "nothing doubled");
}

#[tokio::test]
async fn idle_settings_are_checked_at_start() {
    let slack = Slack::start().await;
    let redis = RedisServer::start();
    let refused = |extra: &str| {
        configured_ingest(
            &redis.url(),
            Some(&format!("{}{extra}", settings(&slack))),
            &[("BOTLINE_SLACK_APP_TOKEN", APP_TOKEN)],
            None,
        )
        .err()
        .map(|error| error.to_string())
        .unwrap_or_default()
    };
    assert!(refused("idle_timeout_ms = 0\n").contains("ingest.platforms.slack.idle_timeout_ms"));
    assert!(refused("idle_timeout_ms = 1000\nping_interval_ms = 1000\n")
        .contains("ingest.platforms.slack.ping_interval_ms"));
    assert_eq!(
        refused("idle_timeout_ms = 1000\nping_interval_ms = 0\n"),
        ""
    );
}
