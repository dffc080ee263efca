//! Long-lived platform connections (a Discord Gateway session, a
//! getUpdates poller): exactly one per bot account (or Discord shard)
//! across every ingest replica, kept up by whichever replica holds its
//! lease in Redis.
//!
//! - [`Lease`]: `SET NX PX`-style ownership of one key, extended only by
//!   its holder (a compare-and-renew script) and given up on a clean
//!   shutdown. A holder that dies stops renewing; the key expires after
//!   `ttl` and a standby replica takes it on its next look. A connection
//!   the platform opened anew may [`Lease::take_over`] (OneBot's reverse
//!   WebSocket: the newest connection is the one in use).
//! - [`Backoff`]: exponential backoff with equal jitter between attempts,
//!   back to the start only once a connection lasted (`stable_after_ms` up):
//!   a peer that accepts and at once closes (politely or not) meets the
//!   same growing backoff as one that refuses.
//! - [`Link`]: the connection's state as metrics
//!   (`botline_ingest_connection_up`, `_reconnects_total`,
//!   `_last_event_age_seconds`, labelled `platform` and `bot`) and as a
//!   `/readyz` check named `<platform>:<bot>`.
//! - [`Liveness`]: how long a connection has been silent and whether that
//!   is too long (OneBot's heartbeats set the limit); [`Keepalive`] uses it
//!   for a WebSocket we opened that must never be silent long (Slack Socket
//!   Mode, DingTalk Stream): any frame, ping and pong included, counts as
//!   hearing from the peer; quiet for `ping_interval_ms`, we send our own
//!   ping (a live peer answers it with a pong); silent for
//!   `idle_timeout_ms`, the connection is dead (a NAT that dropped it, a
//!   half-open TCP connection that would otherwise wait forever) and ends
//!   as a failure, so [`supervise`] opens the next one after its backoff,
//!   the lease kept. [`Keepalive::next_text`] reads such a socket for its
//!   connector, turning its end into an [`Ended`]; [`connect_socket`] and
//!   [`close_socket`] open and close any socket we open within their time.
//! - [`supervise`]: the loop tying them together: take the lease (or stand
//!   by), renew it in the background, run the platform's connection again
//!   and again (with backoff) while the lease is ours, and give the lease
//!   up on shutdown — or after `handoff_after_ms` without a lasting
//!   connection (this replica cannot reach the platform: bad DNS, a
//!   proxy), then standing aside for a lease ttl so another replica takes
//!   it. [`Held`] makes a connection's lease and link and
//!   starts it; [`platform_settings`] reads the timing settings every such
//!   connection has from the platform's table.
//!
//! The platform's side is [`Connector::connect`]: one connection from
//! opening to its end. It is told to stop (lease lost or shutdown) through
//! a token, and calls [`Link::up`], [`Link::down`] and [`Link::event`] as
//! its connection changes.

use crate::inbox::Inbox;
use botline_shared::config::deserialize_setting;
use botline_shared::redis_conn::Pool;
use botline_shared::telemetry::Health;
use botline_shared::Error;
use futures_util::future::BoxFuture;
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

// ---- the lease ----

/// Takes the lease if it is free or already ours, and extends it.
/// KEYS[1]: the lease; ARGV: holder, ttl ms. 1 when held.
static HOLD: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local current = redis.call('GET', KEYS[1])
if current == false then
  redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
  return 1
end
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"#,
    )
});

/// Gives the lease up, if it is still ours.
static RELEASE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#,
    )
});

/// Ownership of one Redis key by one process (its `holder` id, unique per
/// process start), lasting `ttl` past its last renewal.
#[derive(Clone)]
pub struct Lease {
    pool: Pool,
    key: String,
    holder: String,
    ttl: Duration,
}

impl Lease {
    pub fn new(pool: Pool, key: String, ttl: Duration) -> Self {
        Lease {
            pool,
            key,
            holder: ulid::Ulid::new().to_string(),
            ttl,
        }
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// This process's value in the lease while it holds it.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Take the lease if it is free, or extend it if it is ours: whether we
    /// hold it now.
    pub async fn hold(&self) -> Result<bool, botline_shared::Error> {
        let mut connection = self.pool.get().await?;
        let held: i64 = HOLD
            .key(&self.key)
            .arg(&self.holder)
            .arg(self.ttl.as_millis() as u64)
            .invoke_async(&mut connection)
            .await?;
        Ok(held == 1)
    }

    /// Take the lease even from another holder, who notices at its next
    /// renewal (for a connection the platform opened anew: the newest wins).
    pub async fn take_over(&self) -> Result<(), botline_shared::Error> {
        let mut connection = self.pool.get().await?;
        let _: () = redis::cmd("SET")
            .arg(&self.key)
            .arg(&self.holder)
            .arg("PX")
            .arg(self.ttl.as_millis() as u64)
            .query_async(&mut connection)
            .await?;
        Ok(())
    }

    /// Give the lease up if we still hold it, so another replica need not
    /// wait for it to expire. Failures are logged: the lease expires anyway.
    pub async fn release(&self) {
        let released: Result<i64, botline_shared::Error> = async {
            let mut connection = self.pool.get().await?;
            Ok(RELEASE
                .key(&self.key)
                .arg(&self.holder)
                .invoke_async(&mut connection)
                .await?)
        }
        .await;
        if let Err(error) = released {
            warn!(message = "could not release a connection lease", key = %self.key, %error);
        }
    }
}

// ---- backoff ----

/// Exponential backoff with equal jitter: the n-th wait in a row is random
/// in `[c/2, c]` for the ceiling `c = min(cap, base × 2ⁿ)`. Half of each
/// ceiling is always waited, so a peer that fails every attempt sees them
/// thin out however the dice fall; the other half spreads replicas apart.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            failures: 0,
        }
    }

    /// The wait before the next attempt; each call doubles the ceiling.
    pub fn next_wait(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(2u32.saturating_pow(self.failures.min(20)))
            .min(self.cap);
        self.failures = self.failures.saturating_add(1);
        let ceiling_ms = ceiling.as_millis() as u64;
        Duration::from_millis(rand::rng().random_range(ceiling_ms / 2..=ceiling_ms))
    }

    /// A connection lasted: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

// ---- connection state ----

/// One connection's state, seen by metrics and `/readyz`.
pub struct Link {
    platform: &'static str,
    bot: String,
    health: Health,
    /// `<platform>:<bot>`, the `/readyz` check.
    check: String,
    up: AtomicBool,
    /// When the connection now running first got up, if it did.
    up_since: Mutex<Option<Instant>>,
    /// When the platform last sent anything, UTC ms (0: never).
    last_event_ms: AtomicI64,
}

impl Link {
    pub fn new(platform: &'static str, bot: String, health: Health) -> Self {
        Link {
            check: format!("{platform}:{bot}"),
            platform,
            bot,
            health,
            up: AtomicBool::new(false),
            up_since: Mutex::new(None),
            last_event_ms: AtomicI64::new(0),
        }
    }

    pub fn platform(&self) -> &'static str {
        self.platform
    }

    pub fn bot(&self) -> &str {
        &self.bot
    }

    /// The connection is established (Discord: READY or RESUMED).
    pub fn up(&self) {
        self.event();
        self.up_since
            .lock()
            .expect("up_since lock")
            .get_or_insert_with(Instant::now);
        if !self.up.swap(true, Ordering::SeqCst) {
            info!(message = "connection up", platform = self.platform, bot = %self.bot);
        }
        self.health.set(&self.check, true);
        metrics::gauge!("botline_ingest_connection_up", "platform" => self.platform, "bot" => self.bot.clone())
            .set(1.0);
    }

    /// The connection is gone (this replica still holds the lease and will
    /// connect again): `/readyz` says so.
    pub fn down(&self) {
        self.set_down();
        self.health.set(&self.check, false);
    }

    /// The platform sent something.
    pub fn event(&self) {
        self.last_event_ms
            .store(botline_shared::now_ms(), Ordering::SeqCst);
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Whether the connection now running got up at least `long` ago: it
    /// lasted, so what ends it is no sign of a peer that keeps failing.
    pub fn lasted(&self, long: Duration) -> bool {
        self.up_since
            .lock()
            .expect("up_since lock")
            .is_some_and(|since| since.elapsed() >= long)
    }

    /// Another connection (or, in a handover, another socket of this
    /// one) is being opened: it has to get up and last on its own.
    pub fn opening(&self) {
        *self.up_since.lock().expect("up_since lock") = None;
    }

    fn set_down(&self) {
        if self.up.swap(false, Ordering::SeqCst) {
            info!(message = "connection down", platform = self.platform, bot = %self.bot);
        }
        metrics::gauge!("botline_ingest_connection_up", "platform" => self.platform, "bot" => self.bot.clone())
            .set(0.0);
    }

    /// This replica stands by (another holds the lease, or the platform
    /// connects to another replica): no connection here and nothing wrong
    /// with that, so the check is true and the age 0.
    pub fn stand_by(&self) {
        self.set_down();
        self.health.set(&self.check, true);
        metrics::gauge!("botline_ingest_connection_last_event_age_seconds", "platform" => self.platform, "bot" => self.bot.clone())
            .set(0.0);
    }

    /// Another connection opens after one ended.
    pub fn reconnecting(&self) {
        metrics::counter!("botline_ingest_connection_reconnects_total", "platform" => self.platform, "bot" => self.bot.clone())
            .increment(1);
    }

    /// This replica gives the lease up: it tried for `trying` without a
    /// connection that lasted, and another replica may do better.
    fn handed_off(&self, trying: Duration, pause: Duration) {
        warn!(message = "connection lease handed off: no lasting connection from this replica", platform = self.platform, bot = %self.bot, trying_ms = trying.as_millis() as u64, pause_ms = pause.as_millis() as u64);
        metrics::counter!("botline_ingest_connection_handoffs_total", "platform" => self.platform, "bot" => self.bot.clone())
            .increment(1);
    }

    fn export_age(&self) {
        let last = self.last_event_ms.load(Ordering::SeqCst);
        if last > 0 {
            let age = (botline_shared::now_ms() - last).max(0) as f64 / 1000.0;
            metrics::gauge!("botline_ingest_connection_last_event_age_seconds", "platform" => self.platform, "bot" => self.bot.clone())
                .set(age);
        }
    }
}

/// Export `link`'s last-event age every second while it is up, until `stop`.
pub fn watch_age(link: Arc<Link>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => if link.is_up() { link.export_age() },
                _ = stop.cancelled() => return,
            }
        }
    })
}

// ---- silence ----

/// How long a connection may stay silent, from when it was last heard.
#[derive(Debug)]
pub struct Liveness {
    /// `None`: no limit (yet).
    allowed: Option<Duration>,
    last_heard: Instant,
}

impl Liveness {
    pub fn new(allowed: Option<Duration>, now: Instant) -> Self {
        Liveness {
            allowed,
            last_heard: now,
        }
    }

    /// The peer sent something.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
    }

    /// From now on it may stay silent this long.
    pub fn allow(&mut self, allowed: Duration) {
        self.allowed = Some(allowed);
    }

    /// How long it has been silent at `now`, when that is as long as
    /// allowed or longer.
    pub fn silent_too_long(&self, now: Instant) -> Option<Duration> {
        let silent = now.saturating_duration_since(self.last_heard);
        (silent >= self.allowed?).then_some(silent)
    }
}

/// How a socket that must not stay silent is watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Idle {
    /// Nothing at all from the peer for this long: the connection is dead.
    pub timeout: Duration,
    /// Quiet this long (since the peer was heard, or since our last ping):
    /// send a WebSocket ping. `None`: never.
    pub ping_after: Option<Duration>,
}

impl Idle {
    /// From a platform's `idle_timeout_ms` (at least 1) and
    /// `ping_interval_ms` (0: no pings; else below the timeout); an error
    /// names the setting under `section`.
    pub fn checked(
        section: &str,
        idle_timeout_ms: u64,
        ping_interval_ms: u64,
    ) -> Result<Idle, Error> {
        if idle_timeout_ms == 0 {
            return Err(Error::config(
                format!("{section}.idle_timeout_ms"),
                "must be at least 1",
            ));
        }
        if ping_interval_ms >= idle_timeout_ms {
            return Err(Error::config(
                format!("{section}.ping_interval_ms"),
                "must be below idle_timeout_ms (or 0: no pings)",
            ));
        }
        Ok(Idle {
            timeout: Duration::from_millis(idle_timeout_ms),
            ping_after: (ping_interval_ms > 0).then(|| Duration::from_millis(ping_interval_ms)),
        })
    }
}

/// What silence calls for.
#[derive(Debug, PartialEq, Eq)]
pub enum Quiet {
    /// Send a ping.
    Ping,
    /// The connection is dead: silent this long.
    Dead(Duration),
}

/// What came from a client socket.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming {
    /// A text frame (or a binary one, read as UTF-8).
    Text(String),
    /// A frame with nothing to read (ping, pong): only proof of life.
    Control,
    /// Told to stop; the socket is still open, to be closed.
    Stopped,
    /// Silent too long: the connection is dead, not worth a closing
    /// handshake. Why, in words.
    Silent(String),
    /// The socket closed or broke: why.
    Over(String),
}

/// A WebSocket ingest opened to a platform.
pub type ClientSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// How long a closing socket may take to deliver what it still has.
pub const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// The WebSocket at `url`, opened within `timeout`; an error names `peer`
/// (`the slack socket`, a host).
pub async fn connect_socket(
    url: &str,
    timeout: Duration,
    peer: &str,
) -> Result<ClientSocket, String> {
    match tokio::time::timeout(timeout, tokio_tungstenite::connect_async(url)).await {
        Ok(Ok((socket, _))) => Ok(socket),
        Ok(Err(error)) => Err(format!("could not connect to {peer}: {error}")),
        Err(_) => Err(format!("no connection to {peer} within {timeout:?}")),
    }
}

/// Close `socket` (with `frame`, if any), letting the peer's close frame
/// arrive, within [`CLOSE_WAIT`].
pub async fn close_socket(socket: &mut ClientSocket, frame: Option<CloseFrame>) {
    let closing = async {
        let _ = socket.close(frame).await;
        while let Some(Ok(_)) = socket.next().await {}
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, closing).await;
}

/// What one read from a socket to `peer` (`slack`) came to.
pub fn incoming(frame: Option<Result<Message, tungstenite::Error>>, peer: &str) -> Incoming {
    match frame {
        None => Incoming::Over("the socket ended".into()),
        Some(Err(error)) => Incoming::Over(format!("the socket broke: {error}")),
        Some(Ok(Message::Text(text))) => Incoming::Text(text.to_string()),
        Some(Ok(Message::Binary(bytes))) => {
            Incoming::Text(String::from_utf8_lossy(&bytes).into_owned())
        }
        Some(Ok(Message::Close(close))) => Incoming::Over(format!(
            "closed by {peer}{}",
            close
                .map(|close| format!(" ({}: {})", u16::from(close.code), close.reason))
                .unwrap_or_default()
        )),
        Some(Ok(_)) => Incoming::Control,
    }
}

/// One client socket's silence, watched as [`Idle`] says.
#[derive(Debug)]
pub struct Keepalive {
    idle: Idle,
    /// Who is at the other end, for reasons: `slack`.
    peer: &'static str,
    liveness: Liveness,
    /// When we last pinged, if we did since the peer was last heard.
    pinged: Option<Instant>,
}

impl Keepalive {
    /// A socket to `peer` opened at `now`.
    pub fn new(idle: Idle, peer: &'static str, now: Instant) -> Self {
        Keepalive {
            idle,
            peer,
            liveness: Liveness::new(Some(idle.timeout), now),
            pinged: None,
        }
    }

    /// The peer sent something.
    pub fn heard(&mut self, now: Instant) {
        self.liveness.heard(now);
        self.pinged = None;
    }

    fn dead_at(&self) -> Instant {
        self.liveness.last_heard + self.idle.timeout
    }

    fn ping_at(&self) -> Option<Instant> {
        Some(self.pinged.unwrap_or(self.liveness.last_heard) + self.idle.ping_after?)
    }

    /// When to look at the silence next.
    fn next_look(&self) -> Instant {
        let dead_at = self.dead_at();
        self.ping_at()
            .map_or(dead_at, |ping_at| ping_at.min(dead_at))
    }

    /// What the silence at `now` calls for (a ping is counted as sent).
    pub fn look(&mut self, now: Instant) -> Option<Quiet> {
        if let Some(silent) = self.liveness.silent_too_long(now) {
            return Some(Quiet::Dead(silent));
        }
        if self.ping_at().is_some_and(|ping_at| ping_at <= now) {
            self.pinged = Some(now);
            return Some(Quiet::Ping);
        }
        None
    }

    /// The next thing from `socket`, unless `stop` comes first or it has
    /// been silent too long; pings it while it is quiet.
    pub async fn next(&mut self, socket: &mut ClientSocket, stop: &CancellationToken) -> Incoming {
        loop {
            let look_at = self.next_look();
            tokio::select! {
                _ = stop.cancelled() => return Incoming::Stopped,
                frame = socket.next() => {
                    self.heard(Instant::now());
                    return incoming(frame, self.peer);
                }
                _ = tokio::time::sleep_until(look_at) => match self.look(Instant::now()) {
                    Some(Quiet::Dead(silent)) => {
                        return Incoming::Silent(format!(
                            "nothing from {} for {} ms",
                            self.peer,
                            silent.as_millis()
                        ));
                    }
                    Some(Quiet::Ping) => {
                        // A peer that stopped reading may block the write:
                        // not past the time it counts as dead.
                        let left = self.dead_at().saturating_duration_since(Instant::now());
                        let ping = socket.send(Message::Ping(Default::default()));
                        if let Ok(Err(error)) = tokio::time::timeout(left, ping).await {
                            return Incoming::Over(format!("could not ping {}: {error}", self.peer));
                        }
                    }
                    None => {}
                },
            }
        }
    }

    /// The next text from `socket`, each frame an event on `link`; or how
    /// the connection ended: told to stop (the socket closed), silent too
    /// long (dropped: a peer that cannot be heard cannot answer a close),
    /// or closed by the peer (a failure: [`supervise`] waits a backoff
    /// unless the connection lasted).
    pub async fn next_text(
        &mut self,
        socket: &mut ClientSocket,
        link: &Link,
        stop: &CancellationToken,
    ) -> Result<String, Ended> {
        loop {
            let text = match self.next(socket, stop).await {
                Incoming::Text(text) => Some(text),
                Incoming::Control => None,
                Incoming::Stopped => {
                    close_socket(socket, None).await;
                    return Err(Ended::Stopped);
                }
                Incoming::Silent(reason) | Incoming::Over(reason) => {
                    return Err(Ended::Failed(reason))
                }
            };
            link.event();
            if let Some(text) = text {
                return Ok(text);
            }
        }
    }
}

// ---- the loop ----

/// How a connection ended, and so when to open the next one. Whatever the
/// platform asks, a connection that did not last (up for
/// [`Supervision::stable_after`]) is followed by the next backoff, so a
/// peer that accepts and closes at once is not hammered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The platform asked for a new connection (Discord's op 7, DingTalk's
    /// `disconnect`): open it now, if this one lasted.
    Again,
    /// Open the next one after this long (Discord's invalid session), or
    /// the backoff if that is longer and this one did not last.
    After(Duration),
    /// It failed or dropped (could not connect, refused, closed, broke,
    /// fell silent): open the next one after a backoff, from its start if
    /// this one lasted.
    Failed(String),
    /// Told to stop.
    Stopped,
}

/// A platform's long-lived connection.
pub trait Connector: Send + Sync + 'static {
    /// One connection, from opening to its end. Must return soon after
    /// `stop` is cancelled (the lease is lost, or ingest shuts down),
    /// closing the connection the platform's way.
    fn connect<'a>(&'a self, link: &'a Link, stop: &'a CancellationToken) -> BoxFuture<'a, Ended>;
}

/// How [`supervise`] holds and paces one connection.
#[derive(Debug, Clone)]
pub struct Supervision {
    /// How long the lease lives without a renewal.
    pub lease_ttl: Duration,
    /// Time between a standby replica's looks at the lease (and the
    /// holder's renewals are a third of the lease's ttl).
    pub standby_poll: Duration,
    /// Longest wait for the platform's opening call and for the socket.
    pub connect_timeout: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    /// A holder without a connection that lasted for this long (failing,
    /// or up only briefly) gives the lease up and waits a lease ttl before
    /// it looks again, so a replica that can connect takes over.
    pub handoff_after: Duration,
    /// Up this long, a connection lasted: the backoff starts over, and an
    /// orderly [`Ended::Again`] reconnects at once. Real platform
    /// connections live for hours; one that ends within seconds of getting
    /// up is a peer that keeps failing, however politely it closes.
    pub stable_after: Duration,
}

/// The timing settings every long-lived connection has, as written (ms).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Timings {
    pub lease_ttl_ms: u64,
    pub standby_poll_ms: u64,
    pub connect_timeout_ms: u64,
    pub reconnect_base_ms: u64,
    pub reconnect_cap_ms: u64,
    pub handoff_after_ms: u64,
    pub stable_after_ms: u64,
}

/// The keys of [`Timings`] in a platform's table.
const TIMING_KEYS: [&str; 7] = [
    "lease_ttl_ms",
    "standby_poll_ms",
    "connect_timeout_ms",
    "reconnect_base_ms",
    "reconnect_cap_ms",
    "handoff_after_ms",
    "stable_after_ms",
];

/// A platform's table (`section`, `ingest.platforms.slack`) read as the
/// platform's own settings `S`, which do not name the timing keys, and the
/// [`Supervision`] of its connection, from those keys; an error names the
/// setting.
pub fn platform_settings<S: DeserializeOwned>(
    section: &str,
    table: &toml::Value,
) -> Result<(S, Supervision), Error> {
    let mut own = table.as_table().cloned().unwrap_or_default();
    let timings: toml::Table = TIMING_KEYS
        .iter()
        .filter_map(|key| own.remove(*key).map(|value| (key.to_string(), value)))
        .collect();
    let settings: S = deserialize_setting(section, toml::Value::Table(own))?;
    let timings: Timings = deserialize_setting(section, toml::Value::Table(timings))?;
    Ok((settings, timings.checked(section)?))
}

impl Timings {
    /// Each at least 1 ms; an error names the setting under `section`
    /// (`ingest.platforms.slack`).
    pub fn checked(self, section: &str) -> Result<Supervision, Error> {
        for (name, value) in [
            ("lease_ttl_ms", self.lease_ttl_ms),
            ("standby_poll_ms", self.standby_poll_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("reconnect_base_ms", self.reconnect_base_ms),
            ("reconnect_cap_ms", self.reconnect_cap_ms),
            ("handoff_after_ms", self.handoff_after_ms),
            ("stable_after_ms", self.stable_after_ms),
        ] {
            if value == 0 {
                return Err(Error::config(
                    format!("{section}.{name}"),
                    "must be at least 1",
                ));
            }
        }
        Ok(Supervision {
            lease_ttl: Duration::from_millis(self.lease_ttl_ms),
            standby_poll: Duration::from_millis(self.standby_poll_ms),
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            backoff_base: Duration::from_millis(self.reconnect_base_ms),
            backoff_cap: Duration::from_millis(self.reconnect_cap_ms),
            handoff_after: Duration::from_millis(self.handoff_after_ms),
            stable_after: Duration::from_millis(self.stable_after_ms),
        })
    }
}

/// `path` under the platform's `api_base_url` in `[section]`, which must
/// be an http(s) URL, or the binary stops naming that setting.
pub fn endpoint(section: &str, api_base_url: &str, path: &str) -> Result<url::Url, Error> {
    let base = api_base_url.trim_end_matches('/');
    url::Url::parse(&format!("{base}{path}"))
        .ok()
        .filter(|url| matches!(url.scheme(), "http" | "https"))
        .ok_or_else(|| Error::config(format!("{section}.api_base_url"), "must be an http(s) URL"))
}

impl Supervision {
    /// An HTTP client for the platform's opening call, within `connect_timeout`.
    pub fn http_client(&self, section: &str) -> Result<reqwest::Client, Error> {
        reqwest::Client::builder()
            .timeout(self.connect_timeout)
            .user_agent(concat!("botline-ingest/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|error| Error::config(section, error))
    }
}

/// One long-lived connection's lease (`consumer:<kind>:<name>`) and link
/// (`<platform>:<name>`), made the one way every platform makes them.
pub struct Held {
    pub lease: Lease,
    pub link: Arc<Link>,
}

impl Held {
    pub fn new(
        inbox: &Inbox,
        kind: &str,
        platform: &'static str,
        name: String,
        health: Health,
        supervision: &Supervision,
    ) -> Held {
        Held {
            lease: Lease::new(
                inbox.pool.clone(),
                inbox.streams.consumer_lease(kind, &name),
                supervision.lease_ttl,
            ),
            link: Arc::new(Link::new(platform, name, health)),
        }
    }

    /// [`supervise`] `connector` under this lease, in a task of its own.
    pub fn supervise(
        self,
        connector: Arc<dyn Connector>,
        supervision: Supervision,
        shutdown: CancellationToken,
    ) {
        tokio::spawn(supervise(
            connector,
            self.lease,
            self.link,
            supervision,
            shutdown,
        ));
    }
}

/// Keep `connector`'s connection up from this replica while it holds
/// `lease`, until `shutdown`; then close it and give the lease up. A
/// holder that gets no lasting connection for `handoff_after` gives the
/// lease up early and stands aside for a lease ttl (and some jitter), so
/// that a replica that can reach the platform takes over.
pub async fn supervise(
    connector: Arc<dyn Connector>,
    lease: Lease,
    link: Arc<Link>,
    supervision: Supervision,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(supervision.backoff_base, supervision.backoff_cap);
    let mut holding = false;
    let ager = watch_age(link.clone(), shutdown.clone());
    while !shutdown.is_cancelled() {
        let held = match lease.hold().await {
            Ok(held) => held,
            Err(error) => {
                warn!(message = "could not take a connection lease", key = %lease.key(), %error);
                false
            }
        };
        if held != holding {
            info!(message = "connection lease", platform = link.platform(), bot = %link.bot(), held);
            holding = held;
        }
        if !held {
            link.stand_by();
            sleep_unless(supervision.standby_poll, &shutdown).await;
            continue;
        }
        // Ours: renew in the background; `stop` ends the connection when
        // the lease is lost or on shutdown.
        let stop = shutdown.child_token();
        let renewer = tokio::spawn(renew(lease.clone(), stop.clone()));
        let tenure =
            connect_while_held(&*connector, &link, &supervision, &mut backoff, &stop).await;
        stop.cancel();
        let _ = renewer.await;
        if shutdown.is_cancelled() {
            break;
        }
        holding = false;
        match tenure {
            Tenure::Lost => {
                // Someone else connects now.
                info!(message = "connection lease lost", platform = link.platform(), bot = %link.bot());
                link.stand_by();
            }
            Tenure::HandOff { trying } => {
                // The renewer has stopped: nothing takes the lease back
                // behind the release.
                lease.release().await;
                let ttl = lease.ttl();
                let jitter = rand::rng().random_range(0..=ttl.as_millis() as u64 / 2);
                let pause = ttl + Duration::from_millis(jitter);
                link.handed_off(trying, pause);
                // Still down here: `/readyz` says so until another
                // replica is seen holding the lease.
                sleep_unless(pause, &shutdown).await;
            }
        }
    }
    ager.abort();
    link.set_down();
    if holding {
        lease.release().await;
    }
}

/// How a replica's time holding a lease ended.
enum Tenure {
    /// The lease was lost or taken, or ingest shuts down.
    Lost,
    /// No connection lasted for this long: give the lease up.
    HandOff { trying: Duration },
}

/// Open `connector`'s connection again and again (with backoff) until
/// `stop`, or until it has gone `handoff_after` without one that lasted.
async fn connect_while_held(
    connector: &dyn Connector,
    link: &Link,
    supervision: &Supervision,
    backoff: &mut Backoff,
    stop: &CancellationToken,
) -> Tenure {
    // Since when this replica has been trying without a lasting connection.
    let mut trying_since = Instant::now();
    let mut first = true;
    while !stop.is_cancelled() {
        if !first {
            link.reconnecting();
        }
        first = false;
        link.opening();
        let ended = connector.connect(link, stop).await;
        let lasted = link.lasted(supervision.stable_after);
        if lasted {
            backoff.reset();
            trying_since = Instant::now();
        }
        let (platform, bot) = (link.platform(), link.bot());
        let wait = match &ended {
            Ended::Stopped => break,
            Ended::Again if lasted => Duration::ZERO,
            Ended::After(wait) if lasted => *wait,
            Ended::Again | Ended::After(_) => {
                let asked = match &ended {
                    Ended::After(wait) => *wait,
                    _ => Duration::ZERO,
                };
                let wait = backoff.next_wait().max(asked);
                info!(message = "connection ended before it lasted; reconnecting after a backoff", platform, bot = %bot, retry_in_ms = wait.as_millis() as u64);
                wait
            }
            Ended::Failed(reason) => {
                let wait = backoff.next_wait();
                if lasted {
                    info!(message = "connection ended", platform, bot = %bot, %reason, retry_in_ms = wait.as_millis() as u64);
                } else {
                    warn!(message = "connection failed", platform, bot = %bot, %reason, retry_in_ms = wait.as_millis() as u64);
                }
                wait
            }
        };
        if stop.is_cancelled() {
            break;
        }
        link.down();
        let trying = trying_since.elapsed();
        if trying >= supervision.handoff_after {
            return Tenure::HandOff { trying };
        }
        sleep_unless(wait, stop).await;
    }
    Tenure::Lost
}

/// Renew `lease` every third of its ttl until `stop`; cancel `stop` when it
/// is someone else's, or when it could not be renewed for a whole ttl.
async fn renew(lease: Lease, stop: CancellationToken) {
    let every = lease.ttl() / 3;
    let mut renewed_at = Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.cancelled() => return,
        }
        match lease.hold().await {
            Ok(true) => renewed_at = Instant::now(),
            Ok(false) => {
                warn!(message = "connection lease taken by another replica", key = %lease.key());
                stop.cancel();
                return;
            }
            Err(error) => {
                warn!(message = "could not renew a connection lease", key = %lease.key(), %error);
                if renewed_at.elapsed() >= lease.ttl() {
                    stop.cancel();
                    return;
                }
            }
        }
    }
}

/// `opening` (a connection being opened), unless `stop` comes first: the
/// connection, or how the attempt ended.
pub async fn open_unless<T>(
    opening: impl std::future::Future<Output = Result<T, String>>,
    stop: &CancellationToken,
) -> Result<T, Ended> {
    tokio::select! {
        opened = opening => opened.map_err(Ended::Failed),
        _ = stop.cancelled() => Err(Ended::Stopped),
    }
}

/// Sleep `wait`, or less if `token` is cancelled first.
pub async fn sleep_unless(wait: Duration, token: &CancellationToken) {
    if wait.is_zero() {
        return;
    }
    tokio::select! {
        _ = tokio::time::sleep(wait) => {}
        _ = token.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_is_too_long_only_once_a_limit_is_known() {
        let start = Instant::now();
        let at = |ms: u64| start + Duration::from_millis(ms);
        let mut liveness = Liveness::new(None, start);
        assert_eq!(
            liveness.silent_too_long(at(3_600_000)),
            None,
            "no limit yet"
        );
        liveness.allow(Duration::from_millis(3000));
        liveness.heard(at(10));
        assert_eq!(liveness.silent_too_long(at(3009)), None);
        assert_eq!(
            liveness.silent_too_long(at(3010)),
            Some(Duration::from_millis(3000))
        );
        liveness.heard(at(3110));
        assert_eq!(liveness.silent_too_long(at(3200)), None);
    }

    /// Watch a socket opened at 0 with `idle`: at each time (ms), either
    /// the peer is heard (`"heard"`) or we look, expecting `expected`.
    fn check_keepalive(idle: Idle, steps: &[(u64, &str)]) {
        let start = Instant::now();
        let mut keepalive = Keepalive::new(idle, "peer", start);
        for (ms, expected) in steps {
            let now = start + Duration::from_millis(*ms);
            if *expected == "heard" {
                keepalive.heard(now);
                continue;
            }
            let got = match keepalive.look(now) {
                None => "-".to_string(),
                Some(Quiet::Ping) => "ping".to_string(),
                Some(Quiet::Dead(silent)) => format!("dead {}", silent.as_millis()),
            };
            assert_eq!(got, *expected, "at {ms} ms in {steps:?}");
            if !got.starts_with("dead") {
                assert!(keepalive.next_look() > now, "the next look is later");
            }
        }
    }

    #[test]
    fn a_quiet_socket_is_pinged_and_a_silent_one_is_dead() {
        let pinged = Idle {
            timeout: Duration::from_millis(1000),
            ping_after: Some(Duration::from_millis(300)),
        };
        check_keepalive(
            pinged,
            &[
                (299, "-"),
                (300, "ping"),
                (599, "-"),
                (600, "ping"),
                (650, "heard"),
                (949, "-"),
                (950, "ping"),
                (1250, "ping"),
                (1550, "ping"),
                (1649, "-"),
                (1650, "dead 1000"),
            ],
        );
        let unpinged = Idle {
            timeout: Duration::from_millis(1000),
            ping_after: None,
        };
        check_keepalive(
            unpinged,
            &[(500, "-"), (900, "heard"), (1899, "-"), (1900, "dead 1000")],
        );
    }

    #[test]
    fn idle_settings_are_checked() {
        let check = |timeout, ping, expected: Result<Idle, &str>| {
            let got = Idle::checked("ingest.platforms.slack", timeout, ping)
                .map_err(|error| error.to_string());
            assert_eq!(got, expected.map_err(str::to_string), "{timeout} {ping}");
        };
        let ms = Duration::from_millis;
        check(
            30000,
            10000,
            Ok(Idle {
                timeout: ms(30000),
                ping_after: Some(ms(10000)),
            }),
        );
        check(
            30000,
            0,
            Ok(Idle {
                timeout: ms(30000),
                ping_after: None,
            }),
        );
        check(
            0,
            0,
            Err("setting ingest.platforms.slack.idle_timeout_ms: must be at least 1"),
        );
        check(
            1000,
            1000,
            Err("setting ingest.platforms.slack.ping_interval_ms: must be below idle_timeout_ms (or 0: no pings)"),
        );
    }

    #[test]
    fn frames_are_read_as_text_proof_of_life_or_the_end() {
        use tungstenite::protocol::frame::coding::CloseCode;
        use tungstenite::protocol::CloseFrame;
        let check = |frame, expected: Incoming| assert_eq!(incoming(frame, "slack"), expected);
        check(Some(Ok(Message::text("{}"))), Incoming::Text("{}".into()));
        check(
            Some(Ok(Message::binary(b"{\"a\":1}".to_vec()))),
            Incoming::Text("{\"a\":1}".into()),
        );
        check(
            Some(Ok(Message::Ping(Default::default()))),
            Incoming::Control,
        );
        check(
            Some(Ok(Message::Pong(Default::default()))),
            Incoming::Control,
        );
        check(None, Incoming::Over("the socket ended".into()));
        check(
            Some(Ok(Message::Close(None))),
            Incoming::Over("closed by slack".into()),
        );
        check(
            Some(Ok(Message::Close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: "refresh".into(),
            })))),
            Incoming::Over("closed by slack (1001: refresh)".into()),
        );
        check(
            Some(Err(tungstenite::Error::ConnectionClosed)),
            Incoming::Over("the socket broke: Connection closed normally".into()),
        );
    }

    #[test]
    fn backoff_doubles_its_ceiling_up_to_the_cap_and_starts_over_after_a_reset() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_millis(1000));
        let ceilings = [100, 200, 400, 800, 1000, 1000];
        for ceiling in ceilings {
            for _ in 0..50 {
                let mut probe = backoff.clone();
                let wait = probe.next_wait();
                assert!(
                    wait <= Duration::from_millis(ceiling),
                    "{wait:?} > {ceiling}"
                );
                assert!(
                    wait >= Duration::from_millis(ceiling / 2),
                    "{wait:?} below half of {ceiling}"
                );
            }
            backoff.next_wait();
        }
        backoff.reset();
        for _ in 0..50 {
            let wait = backoff.clone().next_wait();
            assert!(wait <= Duration::from_millis(100) && wait >= Duration::from_millis(50));
        }
    }

    #[test]
    fn backoff_waits_are_spread_not_fixed() {
        let mut backoff = Backoff::new(Duration::from_millis(1000), Duration::from_secs(60));
        for _ in 0..5 {
            backoff.next_wait();
        }
        let waits: std::collections::BTreeSet<Duration> =
            (0..20).map(|_| backoff.clone().next_wait()).collect();
        assert!(waits.len() > 1, "jitter: {waits:?}");
    }
}
