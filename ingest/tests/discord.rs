//! Discord's Gateway against a local stand-in that speaks it as Discord
//! documents it: HELLO, IDENTIFY (token and intents checked), READY,
//! heartbeats acknowledged, MESSAGE_CREATE dispatches with sequence
//! numbers, RESUME (session id and sequence checked, missed events
//! replayed, then RESUMED), op 7, op 9 of both kinds, and a gateway that
//! stops acknowledging heartbeats. Messages keep flowing through all of it,
//! none lost or doubled; across two ingest replicas only one connects, and
//! the other takes over (resuming the same session) when the holder dies or
//! stops. A gateway that drops each connection, or asks for a new one,
//! right after READY meets a growing backoff.

mod common;

use botline_shared::message::ChatKind;
use botline_shared::testing::RedisServer;
use common::connections::{expect_backed_off, expect_texts, with_storm_backoff, WAIT};
use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_util::sync::CancellationToken;

/// base64("123456789") is the token's first part: the bot's id.
const TOKEN: &str = "MTIzNDU2Nzg5.GhIjKl.discord-test-token_0123456789";
const BOT: &str = "123456789";
/// GUILDS | GUILD_MESSAGES | DIRECT_MESSAGES | MESSAGE_CONTENT.
const INTENTS: u64 = 1 | (1 << 9) | (1 << 12) | (1 << 15);
const HEARTBEAT_MS: u64 = 250;

/// What the test tells the connection of the moment to do.
enum Command {
    /// Dispatch MESSAGE_CREATE with this data.
    Dispatch(Value),
    /// Count this MESSAGE_CREATE as sent (it gets a sequence number), but
    /// drop the connection before it goes out.
    DropMissing(Value),
    /// op 7.
    Reconnect,
    /// op 9 with this `d`; `false` also ends the session.
    InvalidSession(bool),
    /// Stop acknowledging heartbeats on this connection.
    StopAcking,
}

#[derive(Default)]
struct State {
    /// The opening payload (IDENTIFY or RESUME) of each connection, in order.
    openings: Vec<Value>,
    /// The current session's id ("" once invalidated), its last sequence
    /// number, and its MESSAGE_CREATEs by sequence number.
    session: String,
    sessions: usize,
    seq: u64,
    history: Vec<(u64, Value)>,
    /// The connection that identified or resumed last.
    current: Option<mpsc::UnboundedSender<Command>>,
    /// Connections open now, and the most ever open at once.
    live: usize,
    most_live: usize,
    /// Connections that have been through READY or RESUMED.
    established: usize,
    /// Heartbeats received, with the `d` each carried.
    heartbeats: Vec<Value>,
    /// Whatever a check of the stand-in found wrong.
    faults: Vec<String>,
    /// What each connection does right after READY or RESUMED.
    at_once: AtOnce,
    /// When each socket was opened (TCP).
    attempts: Vec<Instant>,
}

/// What a connection does right after READY or RESUMED.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum AtOnce {
    /// Carry on.
    #[default]
    Serve,
    /// Drop the socket without a close frame.
    Drop,
    /// Send op 7 (reconnect), and wait for ingest to close the socket.
    Reconnect,
}

#[derive(Clone)]
struct Gateway {
    url: String,
    state: Arc<Mutex<State>>,
}

impl Gateway {
    async fn start() -> Gateway {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway = Gateway {
            url: format!("ws://{}", listener.local_addr().unwrap()),
            state: Arc::default(),
        };
        let serving = gateway.clone();
        accept_each(listener, move |stream| serving.clone().connection(stream));
        gateway
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    fn fault(&self, fault: String) {
        self.state().faults.push(fault);
    }

    /// Tell the connection of the moment.
    fn command(&self, command: Command) {
        let current = self.state().current.clone().expect("a connection");
        assert!(current.send(command).is_ok(), "the connection listens");
    }

    /// Count this MESSAGE_CREATE as sent on the session while no connection
    /// carries it: a RESUME replays it.
    fn miss(&self, message: Value) {
        let mut state = self.state();
        state.seq += 1;
        let seq = state.seq;
        state.history.push((seq, message));
    }

    fn established(&self) -> usize {
        self.state().established
    }

    fn openings(&self) -> Vec<Value> {
        self.state().openings.clone()
    }

    async fn wait_established(&self, count: usize) {
        wait_until(WAIT, &format!("{count} established connections"), || {
            self.established() >= count
        })
        .await;
    }

    /// Tell the connection of the moment `command`, after which connection
    /// `count` resumes session-1 from where it was.
    async fn resumed_after(&self, command: Command, count: usize) {
        let seq = self.state().seq;
        self.command(command);
        self.wait_established(count).await;
        assert_resumed(&self.openings()[count - 1], "session-1", seq);
    }

    async fn connection(self, stream: tokio::net::TcpStream) {
        self.state().attempts.push(Instant::now());
        let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
            return;
        };
        {
            let mut state = self.state();
            state.live += 1;
            state.most_live = state.most_live.max(state.live);
        }
        self.serve(&mut socket).await;
        self.state().live -= 1;
    }

    async fn serve(&self, socket: &mut ServerSocket) {
        let send = |payload: Value| Frame::text(payload.to_string());
        if socket
            .send(send(
                json!({"op": 10, "d": {"heartbeat_interval": HEARTBEAT_MS}}),
            ))
            .await
            .is_err()
        {
            return;
        }
        let Some(opening) = read(socket).await else {
            return;
        };
        let (commands, mut orders) = mpsc::unbounded_channel();
        let mut replies = Vec::new();
        {
            let mut state = self.state();
            state.openings.push(opening.clone());
            match opening["op"].as_u64() {
                Some(2) => {
                    let d = &opening["d"];
                    if d["token"] != TOKEN || d["intents"] != INTENTS {
                        state.faults.push(format!("bad IDENTIFY: {d}"));
                        return;
                    }
                    if d["properties"]["os"].as_str().is_none() {
                        state
                            .faults
                            .push(format!("IDENTIFY without properties: {d}"));
                    }
                    state.sessions += 1;
                    state.session = format!("session-{}", state.sessions);
                    state.seq = 1;
                    state.history.clear();
                    replies.push(json!({"op": 0, "t": "READY", "s": 1, "d": {
                        "v": 10, "session_id": state.session, "resume_gateway_url": self.url,
                        "user": {"id": BOT, "username": "support", "bot": true},
                        "guilds": [], "application": {"id": BOT, "flags": 0},
                    }}));
                }
                Some(6) => {
                    let d = &opening["d"];
                    let seq = d["seq"].as_u64().unwrap_or(0);
                    if d["token"] != TOKEN
                        || state.session.is_empty()
                        || d["session_id"] != state.session.as_str()
                        || seq > state.seq
                    {
                        // Not resumable: as Discord answers it.
                        replies.push(json!({"op": 9, "d": false}));
                    } else {
                        for (number, message) in &state.history {
                            if *number > seq {
                                replies.push(json!({"op": 0, "t": "MESSAGE_CREATE", "s": number, "d": message}));
                            }
                        }
                        state.seq += 1;
                        replies.push(json!({"op": 0, "t": "RESUMED", "s": state.seq, "d": {}}));
                    }
                }
                other => {
                    state.faults.push(format!("opened with op {other:?}"));
                    return;
                }
            }
            let established = replies.last().is_some_and(|reply| reply["op"] == 0);
            if established {
                state.established += 1;
                state.current = Some(commands);
            }
        }
        for reply in replies {
            if socket.send(send(reply)).await.is_err() {
                return;
            }
        }
        let at_once = self.state().at_once;
        match at_once {
            AtOnce::Serve => {}
            AtOnce::Drop => return,
            AtOnce::Reconnect => {
                if socket.send(send(json!({"op": 7, "d": null}))).await.is_ok() {
                    while read(socket).await.is_some() {}
                }
                return;
            }
        }
        let mut acking = true;
        loop {
            tokio::select! {
                frame = read(socket) => {
                    let Some(payload) = frame else { return };
                    match payload["op"].as_u64() {
                        Some(1) => {
                            self.state().heartbeats.push(payload["d"].clone());
                            if acking && socket.send(send(json!({"op": 11}))).await.is_err() {
                                return;
                            }
                        }
                        other => self.fault(format!("unexpected op {other:?} mid-session")),
                    }
                }
                order = orders.recv() => {
                    let Some(order) = order else { return };
                    match order {
                        Command::Dispatch(message) => {
                            let seq = {
                                let mut state = self.state();
                                state.seq += 1;
                                let seq = state.seq;
                                state.history.push((seq, message.clone()));
                                seq
                            };
                            let payload = json!({"op": 0, "t": "MESSAGE_CREATE", "s": seq, "d": message});
                            if socket.send(send(payload)).await.is_err() {
                                return;
                            }
                        }
                        Command::DropMissing(message) => {
                            self.miss(message);
                            return; // the socket drops without a close frame
                        }
                        Command::Reconnect => {
                            if socket.send(send(json!({"op": 7, "d": null}))).await.is_err() {
                                return;
                            }
                        }
                        Command::InvalidSession(resumable) => {
                            if !resumable {
                                self.state().session.clear();
                            }
                            if socket.send(send(json!({"op": 9, "d": resumable}))).await.is_err() {
                                return;
                            }
                        }
                        Command::StopAcking => acking = false,
                    }
                }
            }
        }
    }
}

/// The next JSON payload, or `None` once the connection is over.
async fn read(socket: &mut ServerSocket) -> Option<Value> {
    read_json(socket, || {}).await
}

/// A MESSAGE_CREATE in a guild channel, from someone who is not the bot.
fn message(id: u64, text: &str) -> Value {
    json!({
        "id": id.to_string(), "channel_id": "500", "guild_id": "7", "type": 0,
        "content": text, "timestamp": "2024-01-02T03:04:05.000000+00:00",
        "author": {"id": "42", "username": "ann", "global_name": "Ann"},
        "member": {"nick": null}, "mentions": [], "attachments": [], "tts": false,
        "mention_everyone": false, "mention_roles": [], "pinned": false,
    })
}

fn settings(gateway: &Gateway) -> String {
    format!(
        "[ingest.platforms.discord]\nenabled = true\ngateway_url = \"{}/?v=10&encoding=json\"\n\
         lease_ttl_ms = 1500\nstandby_poll_ms = 100\nconnect_timeout_ms = 5000\n\
         reconnect_base_ms = 20\nreconnect_cap_ms = 200\n",
        gateway.url
    )
}

fn assert_resumed(opening: &Value, session: &str, seq: u64) {
    assert_eq!(opening["op"], 6, "{opening}");
    assert_eq!(opening["d"]["session_id"], session, "{opening}");
    assert_eq!(opening["d"]["seq"], seq, "{opening}");
    assert_eq!(opening["d"]["token"], TOKEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_flow_through_drops_resumes_reconnects_and_a_zombie() {
    let gateway = Gateway::start().await;
    let harness =
        start_configured(&settings(&gateway), &[("BOTLINE_DISCORD_BOT_TOKEN", TOKEN)]).await;
    let key = INBOUND.to_string();
    let redis = &harness.redis;

    // IDENTIFY → READY, then messages.
    gateway.wait_established(1).await;
    assert_eq!(gateway.openings()[0]["op"], 2);
    gateway.command(Command::Dispatch(message(1001, "first <@123456789>")));
    gateway.command(Command::Dispatch(message(1002, "second")));
    // What `in` holds, growing with each step.
    let mut expected = vec!["first @123456789", "second"];
    expect_texts(redis, &key, &expected).await;
    let first = &read_inbound(redis)[0];
    assert_eq!(first.platform, "discord");
    assert_eq!(first.bot, BOT);
    assert_eq!(first.chat.id, "500");
    assert_eq!(first.chat.kind, ChatKind::Group);
    assert!(first.mentions.bot);
    assert_eq!(first.platform_message_id.as_deref(), Some("1001"));

    // Heartbeats carry the last sequence number and are acknowledged.
    wait_until(WAIT, "a heartbeat with seq 3", || {
        gateway.state().heartbeats.contains(&json!(3))
    })
    .await;

    // The connection drops while a message is on its way: RESUME replays it.
    gateway.command(Command::DropMissing(message(1003, "missed")));
    gateway.wait_established(2).await;
    assert_resumed(&gateway.openings()[1], "session-1", 3);
    expected.push("missed");
    expect_texts(redis, &key, &expected).await;

    // A message Discord sends twice (a replay across a resume) is added once.
    gateway.command(Command::Dispatch(message(1003, "missed")));
    gateway.command(Command::Dispatch(message(1004, "after resume")));
    expected.push("after resume");
    expect_texts(redis, &key, &expected).await;

    // op 7: reconnect and resume.
    gateway.resumed_after(Command::Reconnect, 3).await;
    gateway.command(Command::Dispatch(message(1005, "after op 7")));

    // op 9, resumable: resume.
    expected.push("after op 7");
    expect_texts(redis, &key, &expected).await;
    gateway
        .resumed_after(Command::InvalidSession(true), 4)
        .await;

    // A zombie: heartbeats no longer acknowledged; closed and resumed.
    gateway.command(Command::Dispatch(message(1006, "before zombie")));
    expected.push("before zombie");
    expect_texts(redis, &key, &expected).await;
    gateway.resumed_after(Command::StopAcking, 5).await;

    // op 9, not resumable: a new session, identified anew.
    gateway.command(Command::InvalidSession(false));
    gateway.wait_established(6).await;
    let opening = &gateway.openings()[5];
    assert_eq!(opening["op"], 2, "{opening}");
    assert_eq!(gateway.state().session, "session-2");
    gateway.command(Command::Dispatch(message(1007, "new session")));
    expected.push("new session");
    expect_texts(redis, &key, &expected).await;

    let state = gateway.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(state.most_live, 1, "never two connections at once");
    assert_eq!(state.openings.len(), 6, "one connection per step");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bots_own_messages_are_not_added_and_the_webhook_is_off() {
    let gateway = Gateway::start().await;
    let harness =
        start_configured(&settings(&gateway), &[("BOTLINE_DISCORD_BOT_TOKEN", TOKEN)]).await;
    let key = INBOUND.to_string();
    gateway.wait_established(1).await;
    let mut own = message(2001, "my own reply");
    own["author"] = json!({"id": BOT, "username": "support", "bot": true});
    gateway.command(Command::Dispatch(own));
    let mut direct = message(2002, "a direct message");
    direct.as_object_mut().unwrap().remove("guild_id");
    gateway.command(Command::Dispatch(direct));
    expect_texts(&harness.redis, &key, &["a direct message"]).await;
    let direct = &read_inbound(&harness.redis)[0];
    assert_eq!(direct.chat.kind, ChatKind::Direct);

    let answer = post_hook(&harness, "discord", "{}", &[]).await;
    assert_refused(answer, 401, "Gateway");
}

#[test]
fn an_enabled_discord_needs_its_token_and_known_intents() {
    let redis = RedisServer::start();
    let start = |settings: &str, env: &[(&str, &str)]| {
        configured_ingest(
            &redis.url(),
            Some(&format!(
                "[ingest.platforms.discord]\nenabled = true\n{settings}"
            )),
            env,
            None,
        )
        .err()
        .map(|error| error.to_string())
    };
    assert_eq!(
        start("", &[]).as_deref(),
        Some("setting BOTLINE_DISCORD_BOT_TOKEN: is not set")
    );
    let token = [("BOTLINE_DISCORD_BOT_TOKEN", TOKEN)];
    assert!(start("intents = [\"GUILD_MESAGES\"]\n", &token)
        .unwrap()
        .contains("unknown intent \"GUILD_MESAGES\""));
    assert!(start("gateway_url = \"https://x\"\n", &token)
        .unwrap()
        .starts_with("setting ingest.platforms.discord.gateway_url:"));
    assert!(start("", &[("BOTLINE_DISCORD_BOT_TOKEN", "opaque")])
        .unwrap()
        .starts_with("setting ingest.platforms.discord.bot_id:"));
    assert_eq!(start("", &token), None);
}

// ---- one connection across replicas ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_connects_and_another_takes_over_when_it_dies_or_stops() {
    let gateway = Gateway::start().await;
    let redis = RedisServer::start();
    let replicas = Replicas::new(
        &redis,
        settings(&gateway),
        &[("BOTLINE_DISCORD_BOT_TOKEN", TOKEN)],
    );
    // The first replica runs on a runtime of its own, so it can die.
    let (doomed, key) = replicas.start_doomed();
    gateway.wait_established(1).await;
    let second_shutdown = CancellationToken::new();
    replicas.start(&second_shutdown);
    gateway.command(Command::Dispatch(message(3001, "one")));
    expect_texts(&redis, &key, &["one"]).await;
    // Its heartbeat carries seq 2 only once the holder has kept the session
    // past "one" in Redis: dying before that, it would be resumed from 1.
    wait_until(WAIT, "a heartbeat with seq 2", || {
        gateway.state().heartbeats.contains(&json!(2))
    })
    .await;
    assert_eq!(gateway.established(), 1, "the second replica stands by");

    // The holder dies without a word: its lease expires, the other takes
    // over and resumes the same session; what was missed is replayed.
    doomed.shutdown_background();
    gateway.miss(message(3002, "while nobody listened"));
    gateway.wait_established(2).await;
    assert_resumed(&gateway.openings()[1], "session-1", 2);
    expect_texts(&redis, &key, &["one", "while nobody listened"]).await;

    // A third replica stands by; the second stops cleanly, gives the lease
    // up, and the third takes over, resuming.
    let third_shutdown = CancellationToken::new();
    replicas.start(&third_shutdown);
    gateway.command(Command::Dispatch(message(3003, "two")));
    expect_texts(&redis, &key, &["one", "while nobody listened", "two"]).await;
    let seq = gateway.state().seq;
    second_shutdown.cancel();
    gateway.wait_established(3).await;
    assert_resumed(&gateway.openings()[2], "session-1", seq);
    gateway.command(Command::Dispatch(message(3004, "three")));
    expect_texts(
        &redis,
        &key,
        &["one", "while nobody listened", "two", "three"],
    )
    .await;

    let state = gateway.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert_eq!(state.most_live, 1, "never two connections at once");
    assert_eq!(state.sessions, 1, "one session all along");
    drop(state);
    third_shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_drops_or_asks_to_reconnect_right_after_ready_meets_a_growing_backoff() {
    let gateway = Gateway::start().await;
    gateway.state().at_once = AtOnce::Drop;
    let settings = with_storm_backoff(&settings(&gateway));
    let _harness = start_configured(&settings, &[("BOTLINE_DISCORD_BOT_TOKEN", TOKEN)]).await;
    expect_backed_off(6, || gateway.state().attempts.clone()).await;

    // op 7 right after RESUMED, again and again: reconnecting at once is
    // for a connection that lasted.
    {
        let mut state = gateway.state();
        state.at_once = AtOnce::Reconnect;
        state.attempts.clear();
    }
    expect_backed_off(6, || gateway.state().attempts.clone()).await;
    let state = gateway.state();
    assert!(state.faults.is_empty(), "{:?}", state.faults);
    assert!(
        state.established >= 10,
        "each connection got READY or RESUMED first: {}",
        state.established
    );
    assert_eq!(state.sessions, 1, "resumed all along");
}
