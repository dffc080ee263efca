//! Discord: messages arrive over the Gateway (v10, JSON), a WebSocket one
//! ingest replica keeps open for the bot (or for each shard), chosen by a
//! lease in Redis ([`super::connection`]); `/hooks/discord` is not used
//! (Discord's HTTP interactions, slash commands, are not supported).
//!
//! The session, as Discord documents it: HELLO gives `heartbeat_interval`;
//! the first heartbeat goes after interval × a random fraction, then one per
//! interval carrying the last sequence number; a heartbeat not acknowledged
//! (op 11) before the next is due means a zombie connection: closed (not
//! with 1000/1001, which would end the session) and resumed. IDENTIFY sends
//! the token (`BOTLINE_DISCORD_BOT_TOKEN`) and the intents; READY gives the
//! `session_id`, the `resume_gateway_url` and the bot's user. After a drop,
//! an op 7 (reconnect) or an op 9 with `d: true`, the next connection goes
//! to the resume URL and sends RESUME with the session id and the last
//! sequence number, and Discord replays what was missed; op 9 with
//! `d: false` (or close codes 4007/4009) starts a new session after 1–5 s.
//! Close codes that no reconnect can fix (4004 bad token, 4010–4014 shards,
//! version, intents) are logged as errors and retried at the backoff's cap.
//! A drop waits a reconnect backoff (short once the connection lasted);
//! op 7 and a resumable op 9 reconnect at once, but only after a
//! connection that lasted: a gateway asking again and again right after
//! READY meets the growing backoff ([`super::connection::Ended`]).
//!
//! The session (id, resume URL, last sequence) is also kept in Redis, so
//! the replica that takes the lease over after a holder stops or dies
//! resumes the same session: nothing is lost across a takeover, and what
//! is replayed twice is dropped by the dedup key (the message id). The
//! sequence number moves past a MESSAGE_CREATE only once its message is in
//! `in`; when adding fails the connection is closed and resumed, so Discord
//! sends it again.
//!
//! MESSAGE_CREATE becomes a message: `<@ID>` and `<@!ID>` become `@ID`
//! (role and channel mentions stay as they are); the bot counts as
//! mentioned by such a mention or by a reply to one of its messages; a
//! guild channel is a group chat, a channel without guild a direct chat; a
//! message in a thread (it carries `position`) has the thread, itself a
//! channel, as chat and thread; `message_reference` is the reply-to;
//! attachments by URL. The bot's own messages and system messages (joins,
//! pins, …) are ignored.

use super::connection::{
    close_socket, connect_socket, open_unless, platform_settings, ClientSocket as Socket,
    Connector, Ended, Held, Link, Supervision,
};
use super::{Event, Hook, HookRequest, InboundPlatform, Read, Registration};
use crate::error::IngestError;
use crate::generic::{raw_event, Stamp};
use crate::inbox::Inbox;
use base64::Engine;
use botline_shared::config::{secret_env, Env};
use botline_shared::message::{
    Attachment, AttachmentKind, Chat, ChatKind, Mentions, Origin, Sender, UnifiedMessage,
};
use botline_shared::telemetry::Health;
use botline_shared::Error;
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message as Frame;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub const PLATFORM: Registration = Registration {
    name: "discord",
    build,
};

/// The bot token from the Developer Portal (Bot → Token).
pub const TOKEN_ENV: &str = "BOTLINE_DISCORD_BOT_TOKEN";

/// The intents botline understands by name (Discord's "List of Intents").
const INTENTS: &[(&str, u64)] = &[
    ("GUILDS", 1 << 0),
    ("GUILD_MEMBERS", 1 << 1),
    ("GUILD_MODERATION", 1 << 2),
    ("GUILD_EXPRESSIONS", 1 << 3),
    ("GUILD_INTEGRATIONS", 1 << 4),
    ("GUILD_WEBHOOKS", 1 << 5),
    ("GUILD_INVITES", 1 << 6),
    ("GUILD_VOICE_STATES", 1 << 7),
    ("GUILD_PRESENCES", 1 << 8),
    ("GUILD_MESSAGES", 1 << 9),
    ("GUILD_MESSAGE_REACTIONS", 1 << 10),
    ("GUILD_MESSAGE_TYPING", 1 << 11),
    ("DIRECT_MESSAGES", 1 << 12),
    ("DIRECT_MESSAGE_REACTIONS", 1 << 13),
    ("DIRECT_MESSAGE_TYPING", 1 << 14),
    ("MESSAGE_CONTENT", 1 << 15),
    ("GUILD_SCHEDULED_EVENTS", 1 << 16),
    ("AUTO_MODERATION_CONFIGURATION", 1 << 20),
    ("AUTO_MODERATION_EXECUTION", 1 << 21),
    ("GUILD_MESSAGE_POLLS", 1 << 24),
    ("DIRECT_MESSAGE_POLLS", 1 << 25),
];

/// The close code botline sends when it means to resume: anything but
/// 1000/1001 keeps the session alive (a private-use code says it is ours).
const CLOSE_KEEP_SESSION: u16 = 4900;
/// How long a session kept in Redis is worth trying to resume.
const SESSION_TTL: Duration = Duration::from_secs(10 * 60);
/// Message types that are someone writing: DEFAULT and REPLY.
const USER_MESSAGE_TYPES: &[u8] = &[0, 19];

/// `[ingest.platforms.discord]`, documented in shared/defaults.toml.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DiscordSettings {
    /// Read by `enabled_platforms`; named here so `deny_unknown_fields` accepts it.
    #[serde(rename = "enabled")]
    _enabled: bool,
    gateway_url: String,
    intents: Vec<String>,
    bot_id: String,
    shard_id: u32,
    shard_count: u32,
}

pub struct Discord {
    gateway_url: url::Url,
    token: String,
    intents: u64,
    /// The bot's user id (configured, or read from the token).
    bot_id: String,
    shard: Option<(u32, u32)>,
    supervision: Supervision,
}

fn build(table: &toml::Value, env: &dyn Env) -> Result<Arc<dyn InboundPlatform>, Error> {
    let (settings, supervision): (DiscordSettings, _) =
        platform_settings("ingest.platforms.discord", table)?;
    let setting = |name: &str| format!("ingest.platforms.discord.{name}");
    let token = secret_env(env, TOKEN_ENV, 1)?;
    let gateway_url = url::Url::parse(&settings.gateway_url)
        .ok()
        .filter(|url| matches!(url.scheme(), "ws" | "wss"))
        .ok_or_else(|| Error::config(setting("gateway_url"), "must be a ws:// or wss:// URL"))?;
    let mut intents = 0;
    for name in &settings.intents {
        let bit = INTENTS
            .iter()
            .find(|(known, _)| known.eq_ignore_ascii_case(name))
            .map(|(_, bit)| *bit)
            .ok_or_else(|| Error::config(setting("intents"), format!("unknown intent {name:?}")))?;
        intents |= bit;
    }
    let bot_id = if settings.bot_id.is_empty() {
        bot_id_from_token(&token).ok_or_else(|| {
            Error::config(
                setting("bot_id"),
                "is empty and BOTLINE_DISCORD_BOT_TOKEN does not start with the bot's id; set it to the bot's user id",
            )
        })?
    } else if settings.bot_id.bytes().all(|b| b.is_ascii_digit()) {
        settings.bot_id.clone()
    } else {
        return Err(Error::config(
            setting("bot_id"),
            "must be the bot's numeric user id",
        ));
    };
    if settings.shard_count == 0 || settings.shard_id >= settings.shard_count {
        return Err(Error::config(
            setting("shard_id"),
            "must be below shard_count (at least 1)",
        ));
    }
    info!(message = "discord gateway", bot_id = %bot_id, intents, shard_id = settings.shard_id, shard_count = settings.shard_count);
    Ok(Arc::new(Discord {
        gateway_url,
        token,
        intents,
        bot_id,
        shard: (settings.shard_count > 1).then_some((settings.shard_id, settings.shard_count)),
        supervision,
    }))
}

/// A bot token's first part is its user id in base64.
fn bot_id_from_token(token: &str) -> Option<String> {
    let first = token.split('.').next()?.trim_end_matches('=');
    let engines = [
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    engines.iter().find_map(|engine| {
        let bytes = engine.decode(first).ok()?;
        let id = String::from_utf8(bytes).ok()?;
        (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then_some(id)
    })
}

impl Discord {
    /// The connection's name in metrics, `/readyz` and the lease: the bot,
    /// and its shard when there are several.
    fn connection_name(&self) -> String {
        match self.shard {
            Some((id, _)) => format!("{}:{id}", self.bot_id),
            None => self.bot_id.clone(),
        }
    }
}

impl InboundPlatform for Discord {
    fn name(&self) -> &'static str {
        PLATFORM.name
    }

    fn receive(&self, _request: &HookRequest) -> Result<Hook, IngestError> {
        Err(IngestError::Unverified {
            platform: PLATFORM.name,
            reason: "webhook_off",
            detail: "discord messages come over the Gateway; /hooks/discord is not used \
                     (HTTP interactions are not supported)"
                .into(),
        })
    }

    fn start(self: Arc<Self>, inbox: Inbox, health: Health, shutdown: CancellationToken) {
        let name = self.connection_name();
        let session_key = inbox.streams.consumer_lease("discord-session", &name);
        let supervision = self.supervision.clone();
        let held = Held::new(
            &inbox,
            "discord-gateway",
            PLATFORM.name,
            name,
            health,
            &supervision,
        );
        let gateway = Arc::new(Gateway {
            own_id: Mutex::new(self.bot_id.clone()),
            discord: self,
            inbox,
            session_key,
            session: Mutex::new(None),
        });
        held.supervise(gateway, supervision, shutdown);
    }
}

// ---- the Gateway connection ----

/// What a RESUME needs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Session {
    id: String,
    resume_url: String,
    seq: Option<u64>,
}

struct Gateway {
    discord: Arc<Discord>,
    inbox: Inbox,
    /// Where the session is kept for a replica taking over.
    session_key: String,
    /// The session while this replica holds the lease; `None`: read it
    /// from Redis before the next connection.
    session: Mutex<Option<Session>>,
    /// The bot's user id, as READY says.
    own_id: Mutex<String>,
}

/// One Gateway payload.
#[derive(Debug, Deserialize)]
struct Payload {
    op: u8,
    #[serde(default)]
    d: serde_json::Value,
    #[serde(default)]
    s: Option<u64>,
    #[serde(default)]
    t: Option<String>,
}

/// Why a connection ends.
enum Close {
    /// Close keeping the session (code 4900), then `ended`.
    Keep(Ended),
    /// Close ending the session (1000), then `ended`.
    End(Ended),
    /// The socket is gone already.
    Gone(Ended),
}

impl Connector for Gateway {
    fn connect<'a>(&'a self, link: &'a Link, stop: &'a CancellationToken) -> BoxFuture<'a, Ended> {
        Box::pin(self.run(link, stop))
    }
}

impl Gateway {
    async fn run(&self, link: &Link, stop: &CancellationToken) -> Ended {
        let session = self.current_session().await;
        let resume = session.clone().filter(|session| session.seq.is_some());
        let url = match &resume {
            Some(session) => self.resume_url(&session.resume_url),
            None => self.discord.gateway_url.clone(),
        };
        let (timeout, host) = (self.discord.supervision.connect_timeout, host(&url));
        let connecting = connect_socket(url.as_str(), timeout, &host);
        let mut socket = match open_unless(connecting, stop).await {
            Ok(socket) => socket,
            Err(ended) => return ended,
        };
        let close = self.session(&mut socket, link, stop, resume).await;
        let (code, ended) = match close {
            Close::Keep(ended) => (Some(CLOSE_KEEP_SESSION), ended),
            Close::End(ended) => (Some(1000), ended),
            Close::Gone(ended) => (None, ended),
        };
        if let Some(code) = code {
            let frame = CloseFrame {
                code: CloseCode::from(code),
                reason: "".into(),
            };
            close_socket(&mut socket, Some(frame)).await;
        }
        if ended == Ended::Stopped {
            // Another replica (or this one, later) reads it from Redis.
            self.save_session().await;
            *self.session.lock().expect("session lock") = None;
        }
        ended
    }

    /// The resume URL with the query of the configured gateway URL
    /// (version and encoding must be the same).
    fn resume_url(&self, resume: &str) -> url::Url {
        match url::Url::parse(resume) {
            Ok(mut url) if matches!(url.scheme(), "ws" | "wss") => {
                url.set_query(self.discord.gateway_url.query());
                url
            }
            _ => self.discord.gateway_url.clone(),
        }
    }

    /// One connection, HELLO to its end: how to close it.
    async fn session(
        &self,
        socket: &mut Socket,
        link: &Link,
        stop: &CancellationToken,
        resume: Option<Session>,
    ) -> Close {
        // HELLO first.
        let hello = tokio::select! {
            hello = tokio::time::timeout(self.discord.supervision.connect_timeout, next_payload(socket)) => hello,
            _ = stop.cancelled() => return Close::End(Ended::Stopped),
        };
        let interval = match hello {
            Ok(Ok(Some(payload))) if payload.op == 10 => payload.d["heartbeat_interval"]
                .as_u64()
                .filter(|ms| *ms > 0)
                .map(Duration::from_millis),
            Ok(Ok(Some(payload))) => {
                return Close::Keep(Ended::Failed(format!(
                    "expected HELLO, got op {}",
                    payload.op
                )))
            }
            Ok(Ok(None)) => return Close::Gone(Ended::Failed("closed before HELLO".into())),
            Ok(Err(reason)) => return Close::Gone(Ended::Failed(reason)),
            Err(_) => return Close::Keep(Ended::Failed("no HELLO in time".into())),
        };
        let Some(interval) = interval else {
            return Close::Keep(Ended::Failed("HELLO without heartbeat_interval".into()));
        };
        link.event();
        let mut seq = resume.as_ref().and_then(|session| session.seq);
        let opening = match &resume {
            Some(session) => serde_json::json!({"op": 6, "d": {
                "token": self.discord.token,
                "session_id": session.id,
                "seq": session.seq,
            }}),
            None => {
                let mut identify = serde_json::json!({
                    "token": self.discord.token,
                    "intents": self.discord.intents,
                    "properties": {"os": std::env::consts::OS, "browser": "botline", "device": "botline"},
                });
                if let Some((id, count)) = self.discord.shard {
                    identify["shard"] = serde_json::json!([id, count]);
                }
                serde_json::json!({"op": 2, "d": identify})
            }
        };
        if let Err(reason) = send(socket, &opening).await {
            return Close::Gone(Ended::Failed(reason));
        }
        let jitter: f64 = rand::rng().random_range(0.0..1.0);
        let mut next_beat = Instant::now() + interval.mul_f64(jitter);
        let mut acknowledged = true;
        // A drop is a failure whether or not READY came: the next
        // connection waits a backoff, from its start if this one lasted.
        let broke = Ended::Failed;
        loop {
            let payload = tokio::select! {
                _ = stop.cancelled() => return Close::Keep(Ended::Stopped),
                _ = tokio::time::sleep_until(next_beat) => {
                    if !acknowledged {
                        warn!(message = "discord heartbeat not acknowledged: zombie connection, resuming");
                        return Close::Keep(broke("heartbeat not acknowledged".into()));
                    }
                    if let Err(reason) = send(socket, &serde_json::json!({"op": 1, "d": seq})).await {
                        return Close::Gone(broke(reason));
                    }
                    acknowledged = false;
                    next_beat += interval;
                    continue;
                }
                payload = next_payload(socket) => payload,
            };
            let payload = match payload {
                Ok(Some(payload)) => payload,
                Ok(None) => return Close::Gone(broke("the gateway closed the connection".into())),
                Err(reason) if reason.starts_with("closed ") => {
                    return self.closed_by_gateway(&reason);
                }
                Err(reason) => return Close::Gone(broke(reason)),
            };
            link.event();
            match payload.op {
                0 => {
                    let kind = payload.t.as_deref().unwrap_or_default();
                    match kind {
                        "READY" => {
                            let session = Session {
                                id: payload.d["session_id"].as_str().unwrap_or_default().into(),
                                resume_url: payload.d["resume_gateway_url"]
                                    .as_str()
                                    .unwrap_or_default()
                                    .into(),
                                seq: payload.s,
                            };
                            if let Some(id) = payload.d["user"]["id"].as_str() {
                                let mut own = self.own_id.lock().expect("own id lock");
                                if *own != id {
                                    warn!(message = "discord READY names another bot than configured", configured = %own, ready = id);
                                    *own = id.to_string();
                                }
                            }
                            info!(message = "discord session ready", session_id = %session.id);
                            *self.session.lock().expect("session lock") = Some(session);
                            seq = payload.s;
                            self.save_session().await;
                            link.up();
                        }
                        "RESUMED" => {
                            info!(message = "discord session resumed", seq = ?seq);
                            link.up();
                        }
                        "MESSAGE_CREATE" => {
                            if let Err(error) = self.admit(payload.d).await {
                                error.record("discord_gateway", PLATFORM.name);
                                // Not past this one: resuming replays it.
                                return Close::Keep(Ended::Failed(format!(
                                    "could not add a message: {error}"
                                )));
                            }
                        }
                        _ => {}
                    }
                    if payload.s.is_some() {
                        seq = payload.s;
                        if let Some(session) = self.session.lock().expect("session lock").as_mut() {
                            session.seq = seq;
                        }
                        if kind == "MESSAGE_CREATE" {
                            self.save_session().await;
                        }
                    }
                }
                1 => {
                    if let Err(reason) = send(socket, &serde_json::json!({"op": 1, "d": seq})).await
                    {
                        return Close::Gone(broke(reason));
                    }
                }
                7 => {
                    info!(message = "discord asks to reconnect (op 7)");
                    return Close::Keep(Ended::Again);
                }
                9 => {
                    if payload.d.as_bool() == Some(true) {
                        info!(message = "discord invalid session (op 9), resumable");
                        return Close::Keep(Ended::Again);
                    }
                    info!(message = "discord invalid session (op 9): identifying anew");
                    self.forget_session().await;
                    let wait = Duration::from_millis(rand::rng().random_range(1000..=5000));
                    return Close::End(Ended::After(wait));
                }
                11 => acknowledged = true,
                _ => {}
            }
        }
    }

    /// The gateway closed with `reason` (`closed <code>: <text>`).
    fn closed_by_gateway(&self, reason: &str) -> Close {
        let code: u16 = reason
            .strip_prefix("closed ")
            .and_then(|rest| rest.split(':').next())
            .and_then(|code| code.trim().parse().ok())
            .unwrap_or(0);
        match code {
            4004 | 4010..=4014 => {
                error!(message = "discord refused the session; fix the setting it names", %reason);
                Close::Gone(Ended::Failed(reason.to_string()))
            }
            4007 | 4009 => {
                // The session cannot be resumed: a new one, right away.
                let mut session = self.session.lock().expect("session lock");
                *session = Some(Session::default());
                Close::Gone(Ended::Again)
            }
            _ => Close::Gone(Ended::Failed(reason.to_string())),
        }
    }

    /// The session to resume, if any: this replica's, else the one kept in Redis.
    async fn current_session(&self) -> Option<Session> {
        if let Some(session) = self.session.lock().expect("session lock").clone() {
            return (!session.id.is_empty()).then_some(session);
        }
        let kept: Result<BTreeMap<String, String>, botline_shared::Error> = async {
            let mut connection = self.inbox.pool.get().await?;
            Ok(redis::cmd("HGETALL")
                .arg(&self.session_key)
                .query_async(&mut connection)
                .await?)
        }
        .await;
        let kept = match kept {
            Ok(kept) => kept,
            Err(error) => {
                warn!(message = "could not read the kept discord session", %error);
                BTreeMap::new()
            }
        };
        let session = Session {
            id: kept.get("session_id").cloned().unwrap_or_default(),
            resume_url: kept.get("resume_url").cloned().unwrap_or_default(),
            seq: kept.get("seq").and_then(|seq| seq.parse().ok()),
        };
        *self.session.lock().expect("session lock") = Some(session.clone());
        (!session.id.is_empty()).then_some(session)
    }

    /// Keep the session in Redis for whoever connects next.
    async fn save_session(&self) {
        let Some(session) = self.session.lock().expect("session lock").clone() else {
            return;
        };
        if session.id.is_empty() {
            return;
        }
        let saved: Result<(), botline_shared::Error> = async {
            let mut connection = self.inbox.pool.get().await?;
            let mut pipe = redis::pipe();
            pipe.atomic()
                .cmd("HSET")
                .arg(&self.session_key)
                .arg("session_id")
                .arg(&session.id)
                .arg("resume_url")
                .arg(&session.resume_url)
                .arg("seq")
                .arg(session.seq.map(|seq| seq.to_string()).unwrap_or_default())
                .ignore()
                .cmd("PEXPIRE")
                .arg(&self.session_key)
                .arg(SESSION_TTL.as_millis() as u64)
                .ignore();
            let _: () = pipe.query_async(&mut connection).await?;
            Ok(())
        }
        .await;
        if let Err(error) = saved {
            warn!(message = "could not keep the discord session", %error);
        }
    }

    /// The session is over: the next connection identifies.
    async fn forget_session(&self) {
        *self.session.lock().expect("session lock") = Some(Session::default());
        let forgotten: Result<(), botline_shared::Error> = async {
            let mut connection = self.inbox.pool.get().await?;
            let _: () = redis::cmd("DEL")
                .arg(&self.session_key)
                .query_async(&mut connection)
                .await?;
            Ok(())
        }
        .await;
        if let Err(error) = forgotten {
            warn!(message = "could not forget the discord session", %error);
        }
    }

    /// A MESSAGE_CREATE into `in` (or counted as ignored).
    async fn admit(&self, data: serde_json::Value) -> Result<(), IngestError> {
        let own_id = self.own_id.lock().expect("own id lock").clone();
        let read = match read_dispatch(data, &own_id) {
            Ok(read) => read,
            Err(error) => {
                // Passed over: it would fail the same way when replayed.
                error.record("discord_gateway", PLATFORM.name);
                return Ok(());
            }
        };
        read.admit(&self.inbox, PLATFORM.name).await
    }
}

fn host(url: &url::Url) -> String {
    url.host_str().unwrap_or_default().to_string()
}

/// Send one payload as a text frame.
async fn send(socket: &mut Socket, payload: &serde_json::Value) -> Result<(), String> {
    socket
        .send(Frame::text(payload.to_string()))
        .await
        .map_err(|error| format!("could not send to the gateway: {error}"))
}

/// The next payload; `Ok(None)` when the socket ended without a close
/// frame; `Err("closed <code>: <reason>")` for a close frame.
async fn next_payload(socket: &mut Socket) -> Result<Option<Payload>, String> {
    loop {
        let frame = match socket.next().await {
            None => return Ok(None),
            Some(Err(error)) => return Err(format!("gateway connection broke: {error}")),
            Some(Ok(frame)) => frame,
        };
        let text = match frame {
            Frame::Text(text) => text.to_string(),
            Frame::Binary(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Frame::Close(Some(close)) => {
                return Err(format!(
                    "closed {}: {}",
                    u16::from(close.code),
                    close.reason
                ))
            }
            Frame::Close(None) => return Ok(None),
            _ => continue,
        };
        match serde_json::from_str::<Payload>(&text) {
            Ok(payload) => return Ok(Some(payload)),
            Err(error) => {
                warn!(message = "unreadable gateway payload", %error);
                continue;
            }
        }
    }
}

/// One Gateway text frame, as far as it makes a message: `None` for
/// payloads other than a MESSAGE_CREATE dispatch, else the message or why it
/// is ignored. Pure: the Gateway's parser, reached by the fuzz targets (fuzz/).
#[doc(hidden)]
pub fn read_frame(text: &str, own_id: &str) -> Result<Option<Hook>, IngestError> {
    let payload: Payload =
        serde_json::from_str(text).map_err(|error| IngestError::Malformed(error.to_string()))?;
    if payload.op != 0 || payload.t.as_deref() != Some("MESSAGE_CREATE") {
        return Ok(None);
    }
    Ok(Some(read_dispatch(payload.d, own_id)?.into_hook()))
}

/// A MESSAGE_CREATE's `d`, stamped now: the message, why it is ignored, or
/// why it does not read.
fn read_dispatch(data: serde_json::Value, own_id: &str) -> Result<Read, IngestError> {
    let raw = raw_event(data.to_string().as_bytes());
    let message: DiscordMessage =
        serde_json::from_value(data).map_err(|error| IngestError::Malformed(error.to_string()))?;
    let stamp = Stamp {
        id: ulid::Ulid::new().to_string(),
        received_at_ms: botline_shared::now_ms(),
        trace_id: ulid::Ulid::new().to_string(),
        raw: Some(raw),
    };
    Ok(read_message(message, own_id, stamp))
}

// ---- MESSAGE_CREATE, as far as botline reads it ----

#[derive(Debug, Deserialize)]
struct DiscordMessage {
    id: String,
    channel_id: String,
    #[serde(default)]
    guild_id: Option<String>,
    author: User,
    #[serde(default)]
    member: Option<Member>,
    #[serde(default)]
    content: String,
    #[serde(default)]
    timestamp: Option<String>,
    #[serde(default)]
    mentions: Vec<User>,
    #[serde(default)]
    attachments: Vec<DiscordAttachment>,
    #[serde(default, rename = "type")]
    kind: u8,
    #[serde(default)]
    message_reference: Option<Reference>,
    #[serde(default)]
    referenced_message: Option<Box<Referenced>>,
    /// Present on messages in a thread.
    #[serde(default)]
    position: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct User {
    id: String,
    #[serde(default)]
    username: String,
    #[serde(default)]
    global_name: Option<String>,
    #[serde(default)]
    bot: bool,
}

#[derive(Debug, Deserialize)]
struct Member {
    #[serde(default)]
    nick: Option<String>,
}

#[derive(Debug, Deserialize)]
struct DiscordAttachment {
    url: String,
    #[serde(default)]
    filename: Option<String>,
    #[serde(default)]
    content_type: Option<String>,
    #[serde(default)]
    size: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Reference {
    /// 0 (or absent): a reply; 1: a forward.
    #[serde(default, rename = "type")]
    kind: Option<u8>,
    #[serde(default)]
    message_id: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Referenced {
    #[serde(default)]
    author: Option<User>,
}

fn read_message(message: DiscordMessage, own_id: &str, stamp: Stamp) -> Read {
    if message.author.id == own_id {
        return Read::Ignored("own_message");
    }
    if !USER_MESSAGE_TYPES.contains(&message.kind) {
        return Read::Ignored("service_message");
    }
    let attachments: Vec<Attachment> = message
        .attachments
        .into_iter()
        .map(|attachment| Attachment {
            kind: attachment_kind(attachment.content_type.as_deref()),
            url: Some(attachment.url),
            file_id: None,
            mime: attachment.content_type,
            size: attachment.size,
            name: attachment.filename,
        })
        .collect();
    if message.content.trim().is_empty() && attachments.is_empty() {
        // Without MESSAGE_CONTENT, guild messages not addressed to the bot arrive empty.
        return Read::Ignored("empty_message");
    }
    let (text, mut mentions) = mention_text(&message.content, own_id);
    for user in &message.mentions {
        if !mentions.users.contains(&user.id) && message.content.contains(&user.id) {
            mentions.users.push(user.id.clone());
        }
        mentions.bot |= user.id == own_id;
    }
    let reply_to = message
        .message_reference
        .filter(|reference| reference.kind.unwrap_or(0) == 0)
        .and_then(|reference| reference.message_id);
    if reply_to.is_some()
        && message
            .referenced_message
            .as_ref()
            .and_then(|referenced| referenced.author.as_ref())
            .is_some_and(|author| author.id == own_id)
    {
        mentions.bot = true;
    }
    let name = message
        .member
        .and_then(|member| member.nick)
        .or(message.author.global_name)
        .filter(|name| !name.is_empty())
        .unwrap_or(message.author.username);
    let mut platform_data = BTreeMap::new();
    if let Some(guild) = &message.guild_id {
        platform_data.insert("guild_id".to_string(), guild.clone());
    }
    let kind = if message.guild_id.is_some() {
        ChatKind::Group
    } else {
        ChatKind::Direct
    };
    let platform_ts_ms = message
        .timestamp
        .as_deref()
        .and_then(|timestamp| chrono::DateTime::parse_from_rfc3339(timestamp).ok())
        .map(|timestamp| timestamp.timestamp_millis());
    let unified = UnifiedMessage {
        id: stamp.id,
        platform: PLATFORM.name.into(),
        bot: own_id.to_string(),
        thread: message.position.map(|_| message.channel_id.clone()),
        chat: Chat {
            id: message.channel_id,
            kind,
        },
        sender: Sender {
            id: message.author.id,
            name,
            is_bot: message.author.bot,
        },
        text,
        mentions,
        attachments,
        reply_to,
        platform_message_id: Some(message.id.clone()),
        platform_data,
        platform_ts_ms,
        received_at_ms: stamp.received_at_ms,
        trace_id: stamp.trace_id,
        origin: Origin::User,
        replay: false,
        raw: stamp.raw,
    };
    Read::Message(Box::new(Event {
        event_id: message.id,
        message: unified,
    }))
}

fn attachment_kind(content_type: Option<&str>) -> AttachmentKind {
    match content_type.and_then(|mime| mime.split('/').next()) {
        Some("image") => AttachmentKind::Image,
        Some("audio") => AttachmentKind::Audio,
        Some("video") => AttachmentKind::Video,
        _ => AttachmentKind::File,
    }
}

/// `content` with `<@ID>` and `<@!ID>` as `@ID`, and the users so mentioned.
fn mention_text(content: &str, own_id: &str) -> (String, Mentions) {
    let mut text = String::with_capacity(content.len());
    let mut users: Vec<String> = Vec::new();
    let mut bot = false;
    let mut rest = content;
    while let Some(at) = rest.find("<@") {
        text.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let digits_from = usize::from(after.starts_with('!'));
        let digits: &str = &after[digits_from..];
        let length = digits.bytes().take_while(u8::is_ascii_digit).count();
        if length > 0 && digits[length..].starts_with('>') {
            let id = &digits[..length];
            text.push('@');
            text.push_str(id);
            if !users.iter().any(|user| user == id) {
                users.push(id.to_string());
            }
            bot |= id == own_id;
            rest = &digits[length + 1..];
        } else {
            text.push_str("<@");
            rest = after;
        }
    }
    text.push_str(rest);
    (text, Mentions { users, bot })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_mentions(content: &str, expected: &str, users: &[&str], bot: bool) {
        let (text, mentions) = mention_text(content, "999");
        assert_eq!(text, expected, "{content:?}");
        assert_eq!(mentions.users, users, "{content:?}");
        assert_eq!(mentions.bot, bot, "{content:?}");
    }

    #[test]
    fn user_mentions_become_at_ids_and_others_stay() {
        check_mentions("hello", "hello", &[], false);
        check_mentions("<@999> hi", "@999 hi", &["999"], true);
        check_mentions("<@!999> hi <@42>", "@999 hi @42", &["999", "42"], true);
        check_mentions("<@42><@42>", "@42@42", &["42"], false);
        check_mentions(
            "role <@&77> chan <#88>",
            "role <@&77> chan <#88>",
            &[],
            false,
        );
        check_mentions(
            "broken <@12 and <@> <@!x>",
            "broken <@12 and <@> <@!x>",
            &[],
            false,
        );
        check_mentions("你好 <@42>！", "你好 @42！", &["42"], false);
        check_mentions("@everyone look", "@everyone look", &[], false);
    }

    #[test]
    fn tokens_name_their_bot() {
        // base64("123456789") is MTIzNDU2Nzg5.
        assert_eq!(
            bot_id_from_token("MTIzNDU2Nzg5.GhIjKl.abcdefghijklmnop").as_deref(),
            Some("123456789")
        );
        assert_eq!(bot_id_from_token("not-a-token"), None);
        assert_eq!(bot_id_from_token(""), None);
    }

    fn read(json: serde_json::Value) -> Read {
        let message: DiscordMessage = serde_json::from_value(json).unwrap();
        let stamp = Stamp {
            id: "01J0000000000000000000000A".into(),
            received_at_ms: 5,
            trace_id: "t".into(),
            raw: None,
        };
        read_message(message, "999", stamp)
    }

    fn message(extra: serde_json::Value) -> serde_json::Value {
        let mut base = serde_json::json!({
            "id": "1100", "channel_id": "500", "type": 0, "content": "hi",
            "timestamp": "2024-01-02T03:04:05.678000+00:00",
            "author": {"id": "42", "username": "ann", "global_name": "Ann"},
            "mentions": [], "attachments": [],
        });
        for (key, value) in extra.as_object().unwrap() {
            base[key] = value.clone();
        }
        base
    }

    #[test]
    fn own_system_and_empty_messages_are_ignored() {
        for (extra, kind) in [
            (
                serde_json::json!({"author": {"id": "999", "username": "bot", "bot": true}}),
                "own_message",
            ),
            (serde_json::json!({"type": 7}), "service_message"),
            (serde_json::json!({"content": ""}), "empty_message"),
        ] {
            match read(message(extra.clone())) {
                Read::Ignored(got) => assert_eq!(got, kind, "{extra}"),
                Read::Message(event) => panic!("{extra} became {event:?}"),
            }
        }
    }

    #[test]
    fn a_guild_reply_to_the_bot_in_a_thread_keeps_everything() {
        let Read::Message(event) = read(message(serde_json::json!({
            "guild_id": "7", "type": 19, "position": 3,
            "content": "<@!42> see this",
            "member": {"nick": "Annie"},
            "mentions": [{"id": "42", "username": "ann"}],
            "message_reference": {"type": 0, "message_id": "1099", "channel_id": "500"},
            "referenced_message": {"id": "1099", "author": {"id": "999", "username": "bot", "bot": true}},
            "attachments": [{"id": "1", "filename": "a.png", "size": 10, "content_type": "image/png",
                             "url": "https://cdn.discordapp.com/attachments/500/1/a.png"}],
        }))) else {
            panic!("not a message");
        };
        assert_eq!(event.event_id, "1100");
        let message = event.message;
        assert_eq!(message.chat.id, "500");
        assert_eq!(message.chat.kind, ChatKind::Group);
        assert_eq!(message.thread.as_deref(), Some("500"));
        assert_eq!(message.sender.name, "Annie");
        assert_eq!(message.text, "@42 see this");
        assert_eq!(message.mentions.users, ["42"]);
        assert!(message.mentions.bot, "a reply to the bot addresses it");
        assert_eq!(message.reply_to.as_deref(), Some("1099"));
        assert_eq!(message.platform_ts_ms, Some(1_704_164_645_678));
        assert_eq!(message.platform_data["guild_id"], "7");
        assert_eq!(message.attachments[0].kind, AttachmentKind::Image);
        assert_eq!(
            message.attachments[0].url.as_deref(),
            Some("https://cdn.discordapp.com/attachments/500/1/a.png")
        );
    }

    #[test]
    fn a_direct_message_is_direct_and_a_forward_is_no_reply() {
        let Read::Message(event) = read(message(serde_json::json!({
            "message_reference": {"type": 1, "message_id": "5"},
        }))) else {
            panic!("not a message");
        };
        assert_eq!(event.message.chat.kind, ChatKind::Direct);
        assert_eq!(event.message.thread, None);
        assert_eq!(event.message.reply_to, None);
        assert_eq!(event.message.sender.name, "Ann");
        assert!(!event.message.mentions.bot);
    }
}
