//! Platform rate limits shared by every egress replica. Each limit is a
//! GCRA cell in Redis (the algorithm of `redis-cell` and `governor`; neither
//! works here: the module is not in stock Redis and `governor` keeps its
//! state in one process): one key holding the theoretical arrival time.
//! One script checks all of a reply's limits (per bot, per chat, …) and
//! takes a slot in each only when every one has room, so a reply that must
//! wait for its chat does not use up its bot's allowance meanwhile.
//!
//! Besides these paces, a platform may say when it has no room left (a
//! Discord bucket at `Remaining: 0`, a global 429): [`Limiter::pause`]
//! records that in Redis as a time before which [`Limit::pause`] has no
//! room, so every replica's next attempt waits for it instead of being
//! refused. Times come from Redis's clock, the same for every replica.

use botline_shared::redis_conn::Pool;
use botline_shared::streams::Streams;
use botline_shared::Error;
use std::sync::LazyLock;
use std::time::Duration;
use tokio::time::Instant;

/// One rate limit: at most `count` sends per `period`, `burst` of them at
/// once; or, made by [`Limit::pause`], no room while a pause lasts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    /// Whose limit, unique across platforms: `telegram:chat:42`.
    pub name: String,
    pub count: u32,
    pub period: Duration,
    /// Sends allowed back to back before the pace applies (at least 1).
    pub burst: u32,
    /// A pause ([`Limiter::pause`]), not a pace: it takes no slot, and
    /// `count`, `period` and `burst` do not apply.
    pub pause: bool,
}

impl Limit {
    /// `count` per `period`, all of them allowed at once.
    pub fn new(name: impl Into<String>, count: u32, period: Duration) -> Self {
        Limit {
            name: name.into(),
            count,
            period,
            burst: count,
            pause: false,
        }
    }

    /// No room while the pause `name` lasts (see [`Limiter::pause`]); room
    /// at any time otherwise, and nothing taken.
    pub fn pause(name: impl Into<String>) -> Self {
        Limit {
            pause: true,
            ..Limit::new(name, 1, Duration::from_secs(1))
        }
    }

    /// The same pace with a smaller burst.
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = burst;
        self
    }

    /// Time between sends at the steady pace, in µs.
    fn interval_us(&self) -> u64 {
        (self.period.as_micros() as u64 / u64::from(self.count.max(1))).max(1)
    }
}

/// A platform's rate settings, each at least 1, or an error naming the
/// first that is not (`<table>.<name>`). For the senders' `build`.
pub fn check_rates(table: &str, rates: &[(&str, u32)]) -> Result<(), Error> {
    match rates.iter().find(|(_, value)| *value == 0) {
        Some((name, _)) => Err(Error::config(
            format!("{table}.{name}"),
            "must be at least 1",
        )),
        None => Ok(()),
    }
}

/// KEYS: one per limit. ARGV: per limit, interval µs and burst tolerance µs;
/// an interval of 0 marks a pause, whose key holds the µs time it ends.
/// Returns 0 when a slot was taken in every limit, else the µs to wait
/// before all of them have room (nothing taken).
static TAKE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local wait = 0
local arrivals = {}
for i, key in ipairs(KEYS) do
  local interval = tonumber(ARGV[i * 2 - 1])
  local tolerance = tonumber(ARGV[i * 2])
  local tat = tonumber(redis.call('GET', key) or '0')
  if interval == 0 then
    if tat - now > wait then wait = tat - now end
  else
    if tat < now then tat = now end
    local allowed_at = tat - tolerance
    if allowed_at > now and allowed_at - now > wait then wait = allowed_at - now end
    arrivals[i] = tat + interval
  end
end
if wait > 0 then return wait end
for i, key in ipairs(KEYS) do
  if arrivals[i] then
    local ttl = math.ceil((arrivals[i] - now) / 1000) + 1000
    redis.call('SET', key, string.format('%d', arrivals[i]), 'PX', ttl)
  end
end
return 0
"#,
    )
});

/// KEYS[1]: a pause. ARGV[1]: how long from now it lasts, µs. Extends the
/// pause to now + that, never shortens it. Returns the µs it lasts from now.
static PAUSE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r#"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local ends = now + tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if current >= ends then return current - now end
redis.call('SET', KEYS[1], string.format('%d', ends), 'PX', math.ceil(tonumber(ARGV[1]) / 1000) + 1000)
return ends - now
"#,
    )
});

/// Takes slots in Redis-backed limits, waiting for room.
#[derive(Clone)]
pub struct Limiter {
    pool: Pool,
    streams: Streams,
}

/// Why no slot was taken.
#[derive(Debug)]
pub enum Refusal {
    /// Room comes only after `deadline`.
    TooLate {
        wait: Duration,
    },
    Redis(Error),
}

impl Limiter {
    pub fn new(pool: Pool, streams: Streams) -> Self {
        Limiter { pool, streams }
    }

    /// One try: `Duration::ZERO` when a slot was taken in every limit, else
    /// how long until there is room in all of them.
    pub async fn try_take(&self, limits: &[Limit]) -> Result<Duration, Error> {
        if limits.is_empty() {
            return Ok(Duration::ZERO);
        }
        let mut invocation = TAKE.prepare_invoke();
        for limit in limits {
            let (interval, tolerance) = if limit.pause {
                (0, 0)
            } else {
                let interval = limit.interval_us();
                (interval, interval * u64::from(limit.burst.max(1) - 1))
            };
            invocation
                .key(self.streams.rate_limit(&limit.name))
                .arg(interval)
                .arg(tolerance);
        }
        let mut connection = self.pool.get().await?;
        let wait_us: u64 = invocation.invoke_async(&mut connection).await?;
        Ok(Duration::from_micros(wait_us))
    }

    /// Give the pause `name` ([`Limit::pause`]) no room for `length` from
    /// now, for every replica; a longer pause already there stays. Returns
    /// how long it lasts from now.
    pub async fn pause(&self, name: &str, length: Duration) -> Result<Duration, Error> {
        let mut connection = self.pool.get().await?;
        let lasts_us: u64 = PAUSE
            .key(self.streams.rate_limit(name))
            .arg(length.as_micros().max(1) as u64)
            .invoke_async(&mut connection)
            .await?;
        Ok(Duration::from_micros(lasts_us))
    }

    /// Wait until a slot is taken in every limit, but not past `deadline`.
    /// Returns how long it waited.
    pub async fn take(&self, limits: &[Limit], deadline: Instant) -> Result<Duration, Refusal> {
        let started = Instant::now();
        loop {
            let wait = self.try_take(limits).await.map_err(Refusal::Redis)?;
            if wait.is_zero() {
                return Ok(started.elapsed());
            }
            if Instant::now() + wait > deadline {
                return Err(Refusal::TooLate { wait });
            }
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botline_shared::testing::RedisServer;

    fn limiter(redis: &RedisServer) -> Limiter {
        let (_, plumbing) = redis.plumbing("");
        Limiter::new(plumbing.pool.clone(), plumbing.streams.clone())
    }

    #[tokio::test]
    async fn a_burst_is_allowed_then_the_pace_applies() {
        let redis = RedisServer::start();
        let limiter = limiter(&redis);
        let limit = Limit::new("t:chat:1", 3, Duration::from_secs(60));
        for _ in 0..3 {
            assert_eq!(
                limiter
                    .try_take(std::slice::from_ref(&limit))
                    .await
                    .unwrap(),
                Duration::ZERO
            );
        }
        let wait = limiter.try_take(&[limit]).await.unwrap();
        assert!(
            wait > Duration::from_secs(15) && wait <= Duration::from_secs(20),
            "the fourth send waits for a third of the minute, not {wait:?}"
        );
    }

    #[tokio::test]
    async fn a_refused_reply_takes_no_slot_from_its_other_limits() {
        let redis = RedisServer::start();
        let limiter = limiter(&redis);
        let bot = Limit::new("t:bot", 2, Duration::from_secs(60));
        let busy_chat = Limit::new("t:chat:busy", 1, Duration::from_secs(60));
        let other_chat = Limit::new("t:chat:other", 1, Duration::from_secs(60));
        assert!(limiter
            .try_take(&[bot.clone(), busy_chat.clone()])
            .await
            .unwrap()
            .is_zero());
        for _ in 0..5 {
            assert!(!limiter
                .try_take(&[bot.clone(), busy_chat.clone()])
                .await
                .unwrap()
                .is_zero());
        }
        assert!(
            limiter
                .try_take(&[bot, other_chat])
                .await
                .unwrap()
                .is_zero(),
            "the bot's second slot is still free"
        );
    }

    #[tokio::test]
    async fn limits_are_shared_by_every_limiter_on_the_same_redis() {
        let redis = RedisServer::start();
        let first = limiter(&redis);
        let second = limiter(&redis);
        let limit = Limit::new("t:bot", 1, Duration::from_secs(60));
        assert!(first
            .try_take(std::slice::from_ref(&limit))
            .await
            .unwrap()
            .is_zero());
        assert!(!second.try_take(&[limit]).await.unwrap().is_zero());
    }

    #[tokio::test]
    async fn take_waits_for_room_but_not_past_the_deadline() {
        let redis = RedisServer::start();
        let limiter = limiter(&redis);
        let limit = Limit::new("t:chat:1", 10, Duration::from_secs(1)).with_burst(1);
        let far = Instant::now() + Duration::from_secs(5);
        limiter
            .take(std::slice::from_ref(&limit), far)
            .await
            .unwrap();
        let waited = limiter
            .take(std::slice::from_ref(&limit), far)
            .await
            .unwrap();
        assert!(
            waited >= Duration::from_millis(50),
            "paced, waited {waited:?}"
        );
        let near = Instant::now() + Duration::from_millis(1);
        assert!(matches!(
            limiter.take(&[limit], near).await,
            Err(Refusal::TooLate { .. })
        ));
    }

    #[tokio::test]
    async fn a_pause_holds_every_limiter_back_until_it_ends_and_takes_nothing() {
        let redis = RedisServer::start();
        let first = limiter(&redis);
        let second = limiter(&redis);
        let bot = Limit::new("t:bot", 3, Duration::from_secs(60));
        let paused = [bot.clone(), Limit::pause("t:pause:chat:1")];
        assert!(
            second.try_take(&paused).await.unwrap().is_zero(),
            "no pause yet: room"
        );
        let lasts = first
            .pause("t:pause:chat:1", Duration::from_millis(600))
            .await
            .unwrap();
        assert!(lasts <= Duration::from_millis(600), "{lasts:?}");
        let wait = second.try_take(&paused).await.unwrap();
        assert!(
            wait > Duration::from_millis(400) && wait <= Duration::from_millis(600),
            "the other replica waits for the pause: {wait:?}"
        );
        // A shorter pause does not cut the longer one short.
        first
            .pause("t:pause:chat:1", Duration::from_millis(1))
            .await
            .unwrap();
        assert!(second.try_take(&paused).await.unwrap() > Duration::from_millis(300));
        assert!(
            second
                .try_take(std::slice::from_ref(&bot))
                .await
                .unwrap()
                .is_zero(),
            "waiting for the pause took none of the bot's slots"
        );
        let far = Instant::now() + Duration::from_secs(5);
        let waited = second.take(&paused, far).await.unwrap();
        assert!(
            waited > Duration::from_millis(300),
            "taken once the pause ended: {waited:?}"
        );
        assert!(
            !second.try_take(&[bot]).await.unwrap().is_zero(),
            "the bot's three slots are taken"
        );
    }
}
