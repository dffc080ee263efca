//! What the tests of ingest's long-lived connections (Slack Socket Mode,
//! DingTalk Stream, Discord's Gateway) share: the texts in `in`, and
//! [`StandIn`], a platform that pushes JSON frames over the WebSockets
//! ingest opens to it and wants each answered by its id (Slack's envelopes,
//! DingTalk's frames). A [`StandIn`] keeps what is the same for both
//! (accepting sockets, counting them, the test's [`Command`]s to the newest,
//! sending frames again that a connection left unanswered, checking each
//! answer comes only once its message is in `in`); its [`Protocol`] says
//! what is the platform's own.

use super::{accept_each, read_json, wait_until, ServerSocket};
use botline_shared::message::UnifiedMessage;
use botline_shared::testing::RedisServer;
use futures_util::SinkExt;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::Message as Frame;

/// How long a test waits for what should happen.
pub const WAIT: Duration = Duration::from_secs(30);

/// The texts of the messages in stream `name` (`in`) over every
/// partition, in order.
pub fn texts(redis: &RedisServer, name: &str) -> Vec<String> {
    botline_shared::testing::read_partitioned::<UnifiedMessage>(&mut redis.connection(), name)
        .into_iter()
        .map(|message| message.text)
        .collect()
}

/// Wait until stream `name` (`in`, every partition) holds `expected` (or
/// more), then check it holds exactly that.
pub async fn expect_texts(redis: &RedisServer, name: &str, expected: &[&str]) {
    wait_until(WAIT, &format!("{expected:?} in `in`"), || {
        texts(redis, name).len() >= expected.len()
    })
    .await;
    assert_eq!(
        texts(redis, name),
        expected,
        "nothing lost, nothing doubled"
    );
}

/// How a [`StandIn`] treats the sockets ingest opens from now on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Behaviour {
    /// Speak the platform's protocol.
    #[default]
    Serve,
    /// Drop the TCP connection before the WebSocket handshake.
    Refuse,
    /// Greet (Slack's `hello`), then close the socket at once.
    CloseAtOnce,
    /// Greet, then send the platform's `disconnect` at once, keeping the
    /// socket open until ingest closes it.
    DisconnectAtOnce,
}

/// Reconnect backoff for the tests of a peer that keeps failing: base and
/// cap (ms), and the test settings with them in place of the usual
/// `reconnect_base_ms = 20` and `reconnect_cap_ms = 200`.
pub const STORM_BASE_MS: u64 = 200;
pub const STORM_CAP_MS: u64 = 1000;

pub fn with_storm_backoff(settings: &str) -> String {
    let usual = "reconnect_base_ms = 20\nreconnect_cap_ms = 200\n";
    assert!(settings.contains(usual), "{settings}");
    settings.replace(
        usual,
        &format!("reconnect_base_ms = {STORM_BASE_MS}\nreconnect_cap_ms = {STORM_CAP_MS}\n"),
    )
}

/// Check that the connection attempts made at `attempts`, none of which
/// lasted, were spaced as the storm backoff demands: the n-th wait is at
/// least half of min(cap, base × 2ⁿ), so they span at least the sum of
/// those halves. A loaded machine only spreads them further; without a
/// backoff they come within milliseconds.
pub fn assert_backed_off(attempts: &[Instant]) {
    let waits = attempts.len() - 1;
    let least_ms: u64 = (0..waits)
        .map(|n| (STORM_BASE_MS << n).min(STORM_CAP_MS) / 2)
        .sum();
    let span = *attempts.last().unwrap() - attempts[0];
    assert!(
        span >= Duration::from_millis(least_ms),
        "{} attempts within {span:?}: a backoff spaces them at least {least_ms} ms",
        attempts.len()
    );
}

/// Wait for `count` connection attempts (their times from `attempts`),
/// then check they were spaced as a backoff demands.
pub async fn expect_backed_off(count: usize, mut attempts: impl FnMut() -> Vec<Instant>) {
    wait_until(WAIT, &format!("{count} connection attempts"), || {
        attempts().len() >= count
    })
    .await;
    assert_backed_off(&attempts()[..count]);
}

/// `http://127.0.0.1:…` where every TCP connection is accepted and
/// dropped at once: a platform this replica cannot reach.
pub async fn unreachable_base() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            drop(stream);
        }
    });
    base
}

/// What the test tells the connection of the moment to do.
pub enum Command {
    /// Send this frame.
    Send(Value),
    /// Send the platform's `disconnect` with this reason, then this frame
    /// on the same socket (the platform may still deliver until it closes
    /// it).
    DisconnectThenSend(&'static str, Value),
    /// Drop the TCP connection without a close frame.
    Drop,
    /// Send this frame, then fall silent: the TCP connection stays open but
    /// nothing more is read (so no pong either) or sent on it.
    SendThenSilence(Value),
}

/// A platform's own part of a [`StandIn`]: its HTTP API and its frames.
pub trait Protocol: Sized + 'static {
    /// What its HTTP API keeps (Slack: each opening call's token).
    type Api: Default + Send + 'static;

    /// Its HTTP API, which hands out a URL under [`StandIn::socket_base`].
    fn api() -> axum::Router<StandIn<Self>>;

    /// Whether a socket opened with `query` (its URL's) is let in, or the fault.
    fn admit(_query: &str, _api: &mut Self::Api) -> Result<(), String> {
        Ok(())
    }

    /// What each connection starts with (Slack's `hello`).
    fn greeting() -> Option<Value> {
        None
    }

    /// The frame saying the platform is about to close the socket, for `reason`.
    fn disconnect(reason: &str) -> Value;

    /// The id `frame` is answered by.
    fn frame_id(frame: &Value) -> String;

    /// The id `answer` answers, if it names one.
    fn answer_id(answer: &Value) -> Option<String>;

    /// What is wrong with `answer` to `frame`, if anything.
    fn check_answer(frame: &Value, answer: &Value) -> Option<String>;

    /// The platform's id of the message `frame` carries (`None`: not a
    /// message), which must be in `in` before `frame` is answered.
    fn message_id(frame: &Value) -> Option<String>;

    /// Whether `frame`, left unanswered when its connection ended, is sent
    /// again on the next one; if not, it is not asked again.
    fn sent_again(_frame: &Value) -> bool {
        true
    }
}

/// What a [`StandIn`] saw.
#[derive(Default)]
pub struct State<Api> {
    /// Sockets accepted, open now, most ever open at once, and how many
    /// were accepted while another was still open (a refresh's overlap).
    pub accepted: usize,
    pub live: usize,
    pub most_live: usize,
    pub overlapped: usize,
    /// The newest connection: its number and its commands.
    current: Option<(usize, mpsc::UnboundedSender<Command>)>,
    /// Frames sent and not answered, by id.
    pub unanswered: BTreeMap<String, Value>,
    /// Ids answered, in order.
    pub answers: Vec<String>,
    /// Unanswered frames of a closed connection, for the next one.
    redeliver: Vec<Value>,
    /// Where the messages must be before their frame is answered.
    inbound: Option<(String, String)>,
    /// Whatever a check of the stand-in found wrong.
    pub faults: Vec<String>,
    /// WebSocket pings received from ingest.
    pub pings: usize,
    /// Silent sockets, kept open.
    silent: Vec<ServerSocket>,
    /// What the platform's HTTP API keeps.
    pub api: Api,
    /// How sockets are treated from now on.
    pub behaviour: Behaviour,
    /// When each socket was opened (TCP), whatever came of it.
    pub attempts: Vec<Instant>,
}

/// A platform pushing frames over the sockets ingest opens, speaking `P`.
pub struct StandIn<P: Protocol> {
    /// `http://127.0.0.1:…`: where its HTTP API is served.
    pub api_base: String,
    /// `ws://127.0.0.1:…`: where its sockets are accepted (any path).
    pub socket_base: String,
    state: Arc<Mutex<State<P::Api>>>,
}

impl<P: Protocol> Clone for StandIn<P> {
    fn clone(&self) -> Self {
        StandIn {
            api_base: self.api_base.clone(),
            socket_base: self.socket_base.clone(),
            state: self.state.clone(),
        }
    }
}

impl<P: Protocol> StandIn<P> {
    pub async fn start() -> Self {
        let sockets = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stand_in = StandIn {
            api_base: format!("http://{}", api.local_addr().unwrap()),
            socket_base: format!("ws://{}", sockets.local_addr().unwrap()),
            state: Arc::default(),
        };
        let router = P::api().with_state(stand_in.clone());
        tokio::spawn(async move { axum::serve(api, router).await });
        let serving = stand_in.clone();
        accept_each(sockets, move |stream| serving.clone().connection(stream));
        stand_in
    }

    pub fn state(&self) -> MutexGuard<'_, State<P::Api>> {
        self.state.lock().unwrap()
    }

    /// Check, at each answer, that the message is in stream `name` (`in`,
    /// any partition) on `redis` already.
    pub fn check_inbound(&self, redis: &RedisServer, name: &str) {
        self.state().inbound = Some((redis.url(), name.to_string()));
    }

    /// Tell the connection of the moment.
    pub fn command(&self, command: Command) {
        let (_, current) = self.state().current.clone().expect("a connection");
        assert!(current.send(command).is_ok(), "the connection listens");
    }

    pub async fn wait_accepted(&self, count: usize) {
        wait_until(WAIT, &format!("{count} connections"), || {
            self.state().accepted >= count
        })
        .await;
    }

    /// Wait until every frame sent has been answered, these among them.
    pub async fn wait_all_answered(&self, ids: &[&str]) {
        wait_until(WAIT, &format!("answers to {ids:?}"), || {
            let state = self.state();
            state.unanswered.is_empty()
                && ids
                    .iter()
                    .all(|id| state.answers.iter().any(|answer| answer == id))
        })
        .await;
    }

    async fn connection(self, stream: tokio::net::TcpStream) {
        let behaviour = {
            let mut state = self.state();
            state.attempts.push(Instant::now());
            state.behaviour
        };
        if behaviour == Behaviour::Refuse {
            return;
        }
        let mut query = String::new();
        // tungstenite's handshake callback type: its error is a whole HTTP response.
        #[allow(clippy::result_large_err)]
        let callback = |request: &Request, response: Response| {
            query = request.uri().query().unwrap_or_default().to_string();
            Ok(response)
        };
        let Ok(mut socket) = tokio_tungstenite::accept_hdr_async(stream, callback).await else {
            return;
        };
        {
            let mut state = self.state();
            if let Err(fault) = P::admit(&query, &mut state.api) {
                state.faults.push(fault);
                return;
            }
        }
        if behaviour != Behaviour::Serve {
            return misbehave::<P>(socket, behaviour).await;
        }
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
        let mut mine: BTreeSet<String> = BTreeSet::new();
        let mut ok = match P::greeting() {
            Some(greeting) => socket.send(Frame::text(greeting.to_string())).await.is_ok(),
            None => true,
        };
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
                    Some(Command::DisconnectThenSend(reason, frame)) => {
                        let disconnect = P::disconnect(reason);
                        ok = socket.send(Frame::text(disconnect.to_string())).await.is_ok()
                            && self.send(&mut socket, &mut mine, frame).await;
                    }
                    Some(Command::SendThenSilence(frame)) => {
                        silent = self.send(&mut socket, &mut mine, frame).await;
                        break;
                    }
                    Some(Command::Drop) | None => break,
                },
                answer = read_json(&mut socket, || self.state().pings += 1) => match answer {
                    Some(answer) => self.answered(answer),
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
        // What this connection left unanswered goes out again, if the
        // platform sends it again; the rest is not asked again.
        let left: Vec<Value> = mine
            .iter()
            .filter_map(|id| state.unanswered.get(id).cloned())
            .filter(|frame| P::sent_again(frame))
            .collect();
        state
            .unanswered
            .retain(|id, frame| !mine.contains(id) || P::sent_again(frame));
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
        let id = P::frame_id(&frame);
        mine.insert(id.clone());
        self.state().unanswered.insert(id, frame.clone());
        socket.send(Frame::text(frame.to_string())).await.is_ok()
    }

    fn answered(&self, answer: Value) {
        let mut state = self.state();
        let Some(id) = P::answer_id(&answer) else {
            state.faults.push(format!("not an answer: {answer}"));
            return;
        };
        let Some(frame) = state.unanswered.remove(&id) else {
            state.faults.push(format!(
                "an answer to {id:?}, not sent or answered already: {answer}"
            ));
            return;
        };
        state.answers.push(id.clone());
        if let Some(fault) = P::check_answer(&frame, &answer) {
            state.faults.push(fault);
        }
        if let (Some(message_id), Some((url, key))) = (P::message_id(&frame), state.inbound.clone())
        {
            let mut redis = redis::Client::open(url).unwrap().get_connection().unwrap();
            let messages: Vec<UnifiedMessage> =
                botline_shared::testing::read_partitioned(&mut redis, &key);
            if !messages
                .iter()
                .any(|message| message.platform_message_id.as_deref() == Some(message_id.as_str()))
            {
                state
                    .faults
                    .push(format!("{id} acknowledged before its message was in `in`"));
            }
        }
    }
}

/// Greet on `socket`, then close it at once or ask for a new connection
/// at once, as `behaviour` says.
async fn misbehave<P: Protocol>(mut socket: ServerSocket, behaviour: Behaviour) {
    if let Some(greeting) = P::greeting() {
        if socket
            .send(Frame::text(greeting.to_string()))
            .await
            .is_err()
        {
            return;
        }
    }
    match behaviour {
        Behaviour::DisconnectAtOnce => {
            let disconnect = P::disconnect("refresh_requested");
            if socket
                .send(Frame::text(disconnect.to_string()))
                .await
                .is_ok()
            {
                // Open until ingest closes it; its answers do not matter.
                while read_json(&mut socket, || {}).await.is_some() {}
            }
        }
        _ => {
            let _ = socket.close(None).await;
        }
    }
}
