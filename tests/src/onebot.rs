//! A OneBot v11 implementation (NapCat, Lagrange, go-cqhttp) standing in
//! for QQ, speaking the WebSocket side of the spec (`communication/ws.md`,
//! `ws-reverse.md`, `authorization.md`, `event/meta.md`): as the forward
//! WebSocket server ingest connects to (the access token checked at the
//! handshake, 401 otherwise), or as the reverse client that connects to
//! ingest with `X-Self-ID`, `X-Client-Role` and the token.
//!
//! Either way a connection starts with the lifecycle `connect` meta event,
//! sends a heartbeat (with its `interval`) every `heartbeat`, the events a
//! test gives it, and answers each action with the action's `echo` as the
//! test's [`Answering`] says; every action is recorded. A test can drop
//! the connection, or make it fall silent (a half-open connection: nothing
//! sent, nothing answered, nothing closed).

use botline_shared::now_ms;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// The bot's QQ number.
pub const SELF_ID: i64 = 10001000;

/// How the implementation answers actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answering {
    /// `{"status": "ok", "retcode": 0, "data": {"message_id": 1000 + n}}`.
    Ok,
    /// `{"status": "failed", "retcode": <code>, "data": null, …}`.
    Retcode(i64),
    /// Recorded, never answered.
    Never,
    /// Recorded, then the connection dropped before any answer.
    Drop,
    /// `Ok`, after this long.
    After(Duration),
}

/// What the implementation has seen so far.
#[derive(Debug, Clone)]
pub struct Seen {
    /// Connections accepted (forward) or made (reverse).
    pub connections: usize,
    /// Forward handshakes refused for a wrong or missing token.
    pub refused: usize,
    /// Connections open now, and the most ever open at once.
    pub live: usize,
    pub most_live: usize,
    /// Every action received, in order.
    pub actions: Vec<Value>,
}

enum Command {
    Send(Value),
    Drop,
    Silence,
}

struct State {
    seen: Seen,
    /// The newest connection: its number and its commands.
    current: Option<(usize, mpsc::UnboundedSender<Command>)>,
    answering: Answering,
}

/// The stand-in; clones share it.
#[derive(Clone)]
pub struct OneBot {
    state: Arc<Mutex<State>>,
    heartbeat: Duration,
}

impl OneBot {
    /// An implementation sending heartbeats every `heartbeat`.
    pub fn new(heartbeat: Duration) -> OneBot {
        let seen = Seen {
            connections: 0,
            refused: 0,
            live: 0,
            most_live: 0,
            actions: Vec::new(),
        };
        OneBot {
            state: Arc::new(Mutex::new(State {
                seen,
                current: None,
                answering: Answering::Ok,
            })),
            heartbeat,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    pub fn seen(&self) -> Seen {
        self.state().seen.clone()
    }

    pub fn answer_with(&self, answering: Answering) {
        self.state().answering = answering;
    }

    /// Send `event` on the newest connection.
    pub fn send(&self, event: Value) {
        self.command(Command::Send(event));
    }

    /// Drop the newest connection without a close frame.
    pub fn drop_connection(&self) {
        self.command(Command::Drop);
    }

    /// The newest connection sends and answers nothing from now on.
    pub fn fall_silent(&self) {
        self.command(Command::Silence);
    }

    fn command(&self, command: Command) {
        let (_, current) = self.state().current.clone().expect("a connection");
        assert!(current.send(command).is_ok(), "the connection listens");
    }

    /// Serve forward WebSocket connections on a free port of 127.0.0.1,
    /// each authorized by `Authorization: Bearer <token>`; the URL.
    pub async fn serve(&self, token: &str) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("ws://{}/", listener.local_addr().unwrap());
        let expected = format!("Bearer {token}");
        let onebot = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let onebot = onebot.clone();
                let expected = expected.clone();
                tokio::spawn(async move {
                    let check = authorize(expected);
                    match tokio_tungstenite::accept_hdr_async(stream, check).await {
                        Ok(socket) => {
                            let opened = onebot.opened();
                            onebot.converse(socket, opened).await
                        }
                        Err(_) => onebot.state().seen.refused += 1,
                    }
                });
            }
        });
        url
    }

    /// Connect to ingest's reverse WebSocket `url` with `headers`, and
    /// serve the connection in the background; the HTTP status of a refusal.
    pub async fn connect(&self, url: &str, headers: &[(&str, String)]) -> Result<(), u16> {
        let mut request = url.into_client_request().unwrap();
        for (name, value) in headers {
            request.headers_mut().insert(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        match tokio_tungstenite::connect_async(request).await {
            Ok((socket, _)) => {
                let opened = self.opened();
                tokio::spawn(self.clone().converse(socket, opened));
                Ok(())
            }
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(response.status().as_u16())
            }
            Err(error) => panic!("connecting to {url}: {error}"),
        }
    }

    /// The reverse WebSocket headers a Universal client of `SELF_ID` sends.
    pub fn reverse_headers(token: &str) -> Vec<(&'static str, String)> {
        vec![
            ("x-self-id", SELF_ID.to_string()),
            ("x-client-role", "Universal".into()),
            ("authorization", format!("Bearer {token}")),
        ]
    }

    /// A connection just made, counted and the newest: its number and
    /// the test's commands to it.
    fn opened(&self) -> (usize, mpsc::UnboundedReceiver<Command>) {
        let (commands, orders) = mpsc::unbounded_channel();
        let mut state = self.state();
        let seen = &mut state.seen;
        seen.connections += 1;
        seen.live += 1;
        seen.most_live = seen.most_live.max(seen.live);
        let number = seen.connections;
        state.current = Some((number, commands));
        (number, orders)
    }

    /// One connection, from its lifecycle event to its end.
    async fn converse<S>(
        self,
        mut socket: WebSocketStream<S>,
        (number, mut orders): (usize, mpsc::UnboundedReceiver<Command>),
    ) where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut beat = tokio::time::interval(self.heartbeat);
        let mut silent = false;
        let mut open = send(&mut socket, lifecycle()).await;
        while open {
            tokio::select! {
                _ = beat.tick(), if !silent => {
                    open = send(&mut socket, heartbeat(self.heartbeat)).await;
                }
                order = orders.recv() => match order {
                    Some(Command::Send(event)) => open = send(&mut socket, event).await,
                    Some(Command::Silence) => silent = true,
                    Some(Command::Drop) | None => break,
                },
                frame = socket.next() => match frame {
                    Some(Ok(Message::Text(text))) if !silent => {
                        let action: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                        match self.act(action) {
                            Some(answer) => open = send(&mut socket, answer).await,
                            None if self.state().answering == Answering::Drop => break,
                            None => {}
                        }
                    }
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
            }
        }
        drop(socket);
        let mut state = self.state();
        state.seen.live -= 1;
        if matches!(&state.current, Some((current, _)) if *current == number) {
            state.current = None;
        }
    }

    /// Record an action; its answer, if one is to be sent.
    fn act(&self, action: Value) -> Option<Value> {
        let mut state = self.state();
        state.seen.actions.push(action.clone());
        let echo = action["echo"].clone();
        match state.answering {
            Answering::Ok => Some(json!({
                "status": "ok", "retcode": 0,
                "data": {"message_id": 1000 + state.seen.actions.len()}, "echo": echo,
            })),
            Answering::Retcode(retcode) => Some(json!({
                "status": "failed", "retcode": retcode, "data": null,
                "message": "发送失败", "wording": "send failed", "echo": echo,
            })),
            Answering::After(wait) => {
                let onebot = self.clone();
                let answer = json!({"status": "ok", "retcode": 0, "data": null, "echo": echo});
                tokio::spawn(async move {
                    tokio::time::sleep(wait).await;
                    onebot.send(answer);
                });
                None
            }
            Answering::Never | Answering::Drop => None,
        }
    }
}

/// The handshake check: `Authorization` must be `expected`, else 401.
#[allow(
    clippy::result_large_err,
    reason = "the shape tungstenite's handshake callback has"
)]
fn authorize(
    expected: String,
) -> impl FnOnce(&Request, Response) -> Result<Response, ErrorResponse> {
    move |request, response| {
        let given = request.headers().get("authorization");
        if given.and_then(|value| value.to_str().ok()) == Some(&expected) {
            return Ok(response);
        }
        let mut refusal = ErrorResponse::new(Some("token".into()));
        *refusal.status_mut() = StatusCode::UNAUTHORIZED;
        Err(refusal)
    }
}

async fn send<S>(socket: &mut WebSocketStream<S>, value: Value) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    socket.send(Message::text(value.to_string())).await.is_ok()
}

fn now_secs() -> i64 {
    now_ms() / 1000
}

/// The lifecycle meta event a WebSocket connection starts with.
pub fn lifecycle() -> Value {
    json!({"time": now_secs(), "self_id": SELF_ID, "post_type": "meta_event",
           "meta_event_type": "lifecycle", "sub_type": "connect"})
}

/// A heartbeat meta event announcing the next in `interval`.
pub fn heartbeat(interval: Duration) -> Value {
    json!({"time": now_secs(), "self_id": SELF_ID, "post_type": "meta_event",
           "meta_event_type": "heartbeat", "interval": interval.as_millis() as u64,
           "status": {"online": true, "good": true}})
}

/// A private message from `user_id`, as a segment array.
pub fn private_message(message_id: i64, user_id: i64, text: &str) -> Value {
    json!({
        "time": now_secs(), "self_id": SELF_ID, "post_type": "message",
        "message_type": "private", "sub_type": "friend", "message_id": message_id,
        "user_id": user_id, "message": [{"type": "text", "data": {"text": text}}],
        "raw_message": text, "font": 0,
        "sender": {"user_id": user_id, "nickname": "小不点", "sex": "unknown", "age": 0},
    })
}
