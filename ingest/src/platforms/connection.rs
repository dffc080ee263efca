//! Long-lived platform connections (a Discord Gateway session, a
//! getUpdates poller): exactly one per bot account (or Discord shard)
//! across every ingest replica, kept up by whichever replica holds its
//! lease in Redis.
//!
//! - [`Lease`]: `SET NX PX`-style ownership of one key, extended only by
//!   its holder (a compare-and-renew script) and given up on a clean
//!   shutdown. A holder that dies stops renewing; the key expires after
//!   `ttl` and a standby replica takes it on its next look.
//! - [`Backoff`]: exponential backoff with full jitter between attempts,
//!   back to the start once a connection got up.
//! - [`Link`]: the connection's state as metrics
//!   (`botline_ingest_connection_up`, `_reconnects_total`,
//!   `_last_event_age_seconds`, labelled `platform` and `bot`) and as a
//!   `/readyz` check named `<platform>:<bot>`.
//! - [`supervise`]: the loop tying them together: take the lease (or stand
//!   by), renew it in the background, run the platform's connection again
//!   and again (with backoff) while the lease is ours, and give the lease
//!   up on shutdown.
//!
//! The platform's side is [`Connector::connect`]: one connection from
//! opening to its end. It is told to stop (lease lost or shutdown) through
//! a token, and calls [`Link::up`], [`Link::down`] and [`Link::event`] as
//! its connection changes.

use botline_shared::redis_conn::Pool;
use botline_shared::telemetry::Health;
use botline_shared::Error;
use futures_util::future::BoxFuture;
use rand::Rng;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::time::Instant;
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

/// Exponential backoff with full jitter: the n-th wait in a row is random
/// in `[0, min(cap, base × 2ⁿ)]`, never below `floor`.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    floor: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            floor: Duration::from_millis(base.as_millis().min(100) as u64 / 2),
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
        let wait = Duration::from_millis(rand::rng().random_range(0..=ceiling_ms));
        wait.max(self.floor.min(ceiling))
    }

    /// A connection got up: the next failure starts from `base` again.
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
    /// Whether the connection now running got up at least once.
    got_up: AtomicBool,
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
            got_up: AtomicBool::new(false),
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
        self.got_up.store(true, Ordering::SeqCst);
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

    fn set_down(&self) {
        if self.up.swap(false, Ordering::SeqCst) {
            info!(message = "connection down", platform = self.platform, bot = %self.bot);
        }
        metrics::gauge!("botline_ingest_connection_up", "platform" => self.platform, "bot" => self.bot.clone())
            .set(0.0);
    }

    /// This replica stands by (another holds the lease): no connection here
    /// and nothing wrong with that, so the check is true and the age 0.
    fn stand_by(&self) {
        self.set_down();
        self.health.set(&self.check, true);
        metrics::gauge!("botline_ingest_connection_last_event_age_seconds", "platform" => self.platform, "bot" => self.bot.clone())
            .set(0.0);
    }

    fn reconnecting(&self) {
        metrics::counter!("botline_ingest_connection_reconnects_total", "platform" => self.platform, "bot" => self.bot.clone())
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

// ---- the loop ----

/// How a connection ended, and so when to open the next one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The platform asked for a new connection (or it broke after being
    /// up): open it now.
    Again,
    /// Open the next one after this long (Discord's invalid session).
    After(Duration),
    /// It failed (could not connect, refused, broke before getting up):
    /// open the next one after a backoff.
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
}

/// The timing settings every long-lived connection has, as written (ms).
pub struct Timings {
    pub lease_ttl_ms: u64,
    pub standby_poll_ms: u64,
    pub connect_timeout_ms: u64,
    pub reconnect_base_ms: u64,
    pub reconnect_cap_ms: u64,
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
        })
    }
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

/// Keep `connector`'s connection up from this replica while it holds
/// `lease`, until `shutdown`; then close it and give the lease up.
pub async fn supervise(
    connector: Arc<dyn Connector>,
    lease: Lease,
    link: Arc<Link>,
    supervision: Supervision,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(supervision.backoff_base, supervision.backoff_cap);
    let mut holding = false;
    let ager = {
        let link = link.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = tick.tick() => if link.is_up() { link.export_age() },
                    _ = shutdown.cancelled() => return,
                }
            }
        })
    };
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
        let mut first = true;
        while !stop.is_cancelled() {
            if !first {
                link.reconnecting();
            }
            first = false;
            link.got_up.store(false, Ordering::SeqCst);
            let ended = connector.connect(&link, &stop).await;
            let got_up = link.got_up.load(Ordering::SeqCst);
            if got_up {
                backoff.reset();
            }
            let wait = match &ended {
                Ended::Stopped => break,
                Ended::Again => Duration::ZERO,
                Ended::After(wait) => *wait,
                Ended::Failed(reason) => {
                    let wait = backoff.next_wait();
                    warn!(message = "connection failed", platform = link.platform(), bot = %link.bot(), %reason, retry_in_ms = wait.as_millis() as u64);
                    wait
                }
            };
            if !stop.is_cancelled() {
                link.down();
            }
            sleep_unless(wait, &stop).await;
        }
        stop.cancel();
        let _ = renewer.await;
        if !shutdown.is_cancelled() {
            // Lost the lease: someone else connects now.
            info!(message = "connection lease lost", platform = link.platform(), bot = %link.bot());
            holding = false;
            link.stand_by();
        }
    }
    ager.abort();
    link.set_down();
    if holding {
        lease.release().await;
    }
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
                    wait >= Duration::from_millis(50),
                    "{wait:?} below the floor"
                );
            }
            backoff.next_wait();
        }
        backoff.reset();
        for _ in 0..50 {
            assert!(backoff.clone().next_wait() <= Duration::from_millis(100));
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
