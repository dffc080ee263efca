//! Access tokens that expire (Feishu's tenant_access_token, WeCom's and
//! DingTalk's access_token), fetched once for every egress replica and kept
//! in Redis until shortly before they expire. One replica fetches while the
//! others wait for its result (a lock key with a TTL, so a replica that dies
//! while fetching does not block the rest for long); a token the platform
//! refuses is dropped so the next send fetches a new one.

use botline_shared::redis_conn::Pool;
use botline_shared::streams::Streams;
use botline_shared::Error;
use redis::AsyncCommands;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// A token is dropped this long before the platform says it expires.
const EXPIRY_MARGIN: Duration = Duration::from_secs(300);
/// How long one replica may take to fetch before another tries.
const FETCH_LOCK: Duration = Duration::from_secs(10);
/// How often a waiting replica looks for the fetched token.
const POLL: Duration = Duration::from_millis(50);

/// A token as the platform handed it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    pub token: String,
    pub expires_in: Duration,
}

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The platform's token endpoint failed or refused; the text says how.
    #[error("fetching the access token failed: {0}")]
    Fetch(String),
    #[error("{0}")]
    Redis(#[from] Error),
}

impl From<redis::RedisError> for TokenError {
    fn from(error: redis::RedisError) -> Self {
        TokenError::Redis(error.into())
    }
}

#[derive(Clone)]
pub struct TokenCache {
    pool: Pool,
    streams: Streams,
}

impl TokenCache {
    pub fn new(pool: Pool, streams: Streams) -> Self {
        TokenCache { pool, streams }
    }

    /// The cached token `name`, or one `fetch`ed (by this replica or another).
    pub async fn get<F, Fut>(&self, name: &str, fetch: F) -> Result<String, TokenError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Fetched, String>>,
    {
        let key = self.streams.token(name);
        let lock = format!("{key}:lock");
        let mut connection = self.pool.get().await?;
        let give_up = Instant::now() + FETCH_LOCK;
        loop {
            if let Some(token) = connection.get::<_, Option<String>>(&key).await? {
                return Ok(token);
            }
            let locked: bool = redis::cmd("SET")
                .arg(&lock)
                .arg(1)
                .arg("NX")
                .arg("PX")
                .arg(FETCH_LOCK.as_millis() as u64)
                .query_async::<Option<String>>(&mut connection)
                .await?
                .is_some();
            if locked {
                // Another replica may have stored the token and let the lock
                // go between this one's GET and its SET NX: look once more.
                if let Some(token) = connection.get::<_, Option<String>>(&key).await? {
                    let _: () = connection.del(&lock).await?;
                    return Ok(token);
                }
                break;
            }
            if Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        let fetched = fetch().await;
        let outcome = match fetched {
            Ok(fetched) => {
                let keep = fetched
                    .expires_in
                    .saturating_sub(EXPIRY_MARGIN)
                    .max(fetched.expires_in / 2);
                if !keep.is_zero() {
                    let _: () = connection
                        .pset_ex(&key, &fetched.token, keep.as_millis() as u64)
                        .await?;
                }
                Ok(fetched.token)
            }
            Err(reason) => Err(TokenError::Fetch(reason)),
        };
        let _: () = connection.del(&lock).await?;
        outcome
    }

    /// Forget the token `name` (the platform said it is no longer valid).
    pub async fn invalidate(&self, name: &str) -> Result<(), Error> {
        let mut connection = self.pool.get().await?;
        let _: () = connection.del(self.streams.token(name)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botline_shared::testing::RedisServer;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn cache(redis: &RedisServer) -> TokenCache {
        let (_, plumbing) = redis.plumbing("");
        TokenCache::new(plumbing.pool.clone(), plumbing.streams.clone())
    }

    #[tokio::test]
    async fn many_replicas_asking_at_once_fetch_one_token() {
        let redis = RedisServer::start();
        let fetches = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let cache = cache(&redis);
            let fetches = fetches.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get("feishu:app", || async move {
                        let n = fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        Ok(Fetched {
                            token: format!("t-{n}"),
                            expires_in: Duration::from_secs(7200),
                        })
                    })
                    .await
                    .unwrap()
            }));
        }
        let mut tokens = Vec::new();
        for task in tasks {
            tokens.push(task.await.unwrap());
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        assert!(tokens.iter().all(|token| token == "t-0"), "{tokens:?}");
    }

    #[tokio::test]
    async fn a_token_is_kept_until_shortly_before_it_expires_and_can_be_dropped() {
        let redis = RedisServer::start();
        let cache = cache(&redis);
        let fetch = |token: &'static str| {
            move || async move {
                Ok(Fetched {
                    token: token.to_string(),
                    expires_in: Duration::from_secs(7200),
                })
            }
        };
        assert_eq!(cache.get("wecom:corp", fetch("a")).await.unwrap(), "a");
        assert_eq!(cache.get("wecom:corp", fetch("b")).await.unwrap(), "a");
        let mut connection = redis.connection();
        let ttl: i64 = redis::cmd("PTTL")
            .arg(cache.streams.token("wecom:corp"))
            .query(&mut connection)
            .unwrap();
        assert!(
            ttl > 6_800_000 && ttl <= 6_900_000,
            "kept 2 h minus the 5 min margin, not {ttl} ms"
        );
        cache.invalidate("wecom:corp").await.unwrap();
        assert_eq!(cache.get("wecom:corp", fetch("c")).await.unwrap(), "c");
    }

    #[tokio::test]
    async fn a_failed_fetch_is_reported_and_not_cached() {
        let redis = RedisServer::start();
        let cache = cache(&redis);
        let refused = cache
            .get("dingtalk:app", || async {
                Err("errcode 40001".to_string())
            })
            .await
            .unwrap_err();
        assert!(refused.to_string().contains("errcode 40001"), "{refused}");
        let token = cache
            .get("dingtalk:app", || async {
                Ok(Fetched {
                    token: "fresh".into(),
                    expires_in: Duration::from_secs(7200),
                })
            })
            .await
            .unwrap();
        assert_eq!(token, "fresh", "the failure left no lock behind");
    }
}
