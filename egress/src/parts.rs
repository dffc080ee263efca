//! A reply that a platform takes as several messages (a long Telegram text
//! in pieces, a WeCom picture and then its text) is sent part by part, and
//! each part the platform accepted is recorded at once in Redis,
//! `sent:<reply id>:part:<n>` (its value the platform's message id), for
//! as long as `sent:` keys live. Every attempt, and every later delivery
//! of the entry by any replica, skips the parts recorded, so a retry after
//! part 2 of 3 failed sends parts 2 and 3 and never part 1 again. Parts
//! after the first in one attempt each take their own slot in the
//! sender's rate limits (the retry loop took the first's). When the reply
//! is out, its part keys are deleted with the acknowledgement.
//!
//! Where this cannot help: a part the platform accepted just before the
//! process died (or Redis became unreachable) is not recorded and is sent
//! again, as a whole reply would be without the parts.

use crate::delivery::count_response;
use crate::limits::{Limit, Limiter, Refusal};
use crate::senders::{Attempt, Verdict};
use botline_shared::message::Reply;
use botline_shared::redis_conn::Pool;
use botline_shared::runner::Write;
use botline_shared::streams::Streams;
use botline_shared::Error;
use futures_util::future::BoxFuture;
use std::time::Duration;
use tokio::time::Instant;

/// Longest a later part waits for a rate-limit slot within one attempt (the
/// retry loop's send budget cuts it shorter when less is left).
const PART_SLOT_WAIT: Duration = Duration::from_secs(60);

/// The per-part progress of replies sent as several messages.
#[derive(Clone)]
pub struct Parts {
    pool: Pool,
    streams: Streams,
    limiter: Limiter,
    /// How long a part's record lives: as long as `sent:` keys.
    ttl: Duration,
}

impl Parts {
    pub fn new(pool: Pool, streams: Streams, ttl: Duration) -> Self {
        Parts {
            limiter: Limiter::new(pool.clone(), streams.clone()),
            pool,
            streams,
            ttl,
        }
    }

    /// One attempt at `reply` as `parts` (the same list on every attempt:
    /// a pure function of the reply), each sent by `send` unless recorded
    /// as sent already. A single part is just sent, with no Redis at all.
    /// Delivered once every part is; the platform message id is the first
    /// part's.
    pub async fn send<'p, P, F>(
        &self,
        platform: &'static str,
        reply: &Reply,
        limits: &[Limit],
        parts: &'p [P],
        send: F,
    ) -> Attempt
    where
        P: Sync,
        F: Fn(&'p P) -> BoxFuture<'p, Attempt>,
    {
        if parts.len() <= 1 {
            return match parts.first() {
                Some(part) => send(part).await,
                None => Attempt::delivered(None, None, Vec::new()),
            };
        }
        let p = self.streams.partition_of(&reply.platform, &reply.chat.id);
        let keys: Vec<String> = (0..parts.len())
            .map(|part| self.streams.sent_part(p, &reply.id, part))
            .collect();
        let mut ids = match self.recorded(&keys).await {
            Ok(ids) => ids,
            Err(error) => return retry(format!("reading the reply's sent parts: {error}")),
        };
        let mut writes = Vec::new();
        let mut sent_now = 0;
        let mut last_response = None;
        for (index, part) in parts.iter().enumerate() {
            if ids[index].is_some() {
                continue;
            }
            if sent_now > 0 {
                if let Err(attempt) = self.take_slot(limits).await {
                    return attempt;
                }
                if let Some(response) = last_response.take() {
                    count_response(platform, response);
                }
            }
            let attempt = send(part).await;
            let Verdict::Delivered {
                platform_message_id,
                writes: part_writes,
            } = attempt.verdict
            else {
                return attempt;
            };
            sent_now += 1;
            last_response = attempt.response;
            writes.extend(part_writes);
            let id = platform_message_id.unwrap_or_default();
            if let Err(error) = self.record(&keys[index], &id).await {
                return Attempt {
                    response: last_response,
                    verdict: Verdict::RetryAfter {
                        wait: None,
                        reason: format!(
                            "part {} of {} was sent, but recording it failed ({error}); a retry sends it again",
                            index + 1,
                            parts.len()
                        ),
                    },
                };
            }
            ids[index] = Some(id);
        }
        writes.extend(keys.into_iter().map(|key| Write::Delete { key }));
        let first = ids.into_iter().next().flatten().filter(|id| !id.is_empty());
        Attempt::delivered(last_response, first, writes)
    }

    async fn recorded(&self, keys: &[String]) -> Result<Vec<Option<String>>, Error> {
        let mut connection = self.pool.get().await?;
        let ids: Vec<Option<String>> = redis::cmd("MGET")
            .arg(keys)
            .query_async(&mut connection)
            .await?;
        Ok(ids)
    }

    async fn record(&self, key: &str, id: &str) -> Result<(), Error> {
        let mut connection = self.pool.get().await?;
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(id)
            .arg("PX")
            .arg(self.ttl.as_millis() as u64)
            .query_async(&mut connection)
            .await?;
        Ok(())
    }

    /// A slot in every limit for the next part, or the attempt to give back.
    async fn take_slot(&self, limits: &[Limit]) -> Result<(), Attempt> {
        if limits.is_empty() {
            return Ok(());
        }
        match self
            .limiter
            .take(limits, Instant::now() + PART_SLOT_WAIT)
            .await
        {
            Ok(_) => Ok(()),
            Err(Refusal::TooLate { wait }) => Err(Attempt {
                response: None,
                verdict: Verdict::RetryAfter {
                    wait: Some(wait),
                    reason: format!("rate limited between the parts of a reply for {wait:?}"),
                },
            }),
            Err(Refusal::Redis(error)) => Err(retry(format!(
                "taking a rate limit slot for the next part failed: {error}"
            ))),
        }
    }
}

/// A `Parts` whose Redis is never there, for unit tests of senders that
/// send one part (which needs no Redis).
#[cfg(test)]
pub fn unconnected() -> Parts {
    let process = botline_shared::config::ProcessConfig::from_env(
        &[("BOTLINE_REDIS_URL", "redis://127.0.0.1:1")],
        "127.0.0.1:0",
    )
    .expect("process settings");
    let pool = botline_shared::redis_conn::pool(&process, 1).expect("a lazy pool");
    Parts::new(pool, Streams::default(), Duration::from_secs(1))
}

fn retry(reason: String) -> Attempt {
    Attempt {
        response: None,
        verdict: Verdict::RetryAfter { wait: None, reason },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use botline_shared::message::ChatKind;
    use botline_shared::testing::RedisServer;
    use std::sync::Mutex;

    /// Sends parts by name; fails those named in `failing` once each.
    struct Platform {
        sent: Mutex<Vec<&'static str>>,
        failing: Mutex<Vec<&'static str>>,
    }

    impl Platform {
        fn send<'p>(&'p self, part: &'p &'static str) -> BoxFuture<'p, Attempt> {
            Box::pin(async move {
                let mut failing = self.failing.lock().unwrap();
                if let Some(at) = failing.iter().position(|name| name == part) {
                    failing.remove(at);
                    return retry(format!("{part} failed"));
                }
                self.sent.lock().unwrap().push(part);
                Attempt::delivered(Some("200".into()), Some(format!("id-{part}")), Vec::new())
            })
        }
    }

    fn outcome(attempt: &Attempt) -> String {
        match &attempt.verdict {
            Verdict::Delivered {
                platform_message_id,
                writes,
            } => format!(
                "delivered {platform_message_id:?} deleting {}",
                writes.len()
            ),
            Verdict::RetryAfter { reason, .. } => format!("retry {reason}"),
            Verdict::Permanent(reason) => format!("permanent {reason}"),
        }
    }

    #[tokio::test]
    async fn a_retry_sends_only_the_parts_not_yet_out() {
        let redis = RedisServer::start();
        let (_, plumbing) = redis.plumbing("");
        let parts = Parts::new(
            plumbing.pool.clone(),
            plumbing.streams.clone(),
            Duration::from_secs(60),
        );
        let reply = crate::senders::http::test_reply("t", "b", "c", ChatKind::Direct, "x");
        let platform = Platform {
            sent: Mutex::default(),
            failing: Mutex::new(vec!["two"]),
        };
        let list = ["one", "two", "three"];
        let send = |part| platform.send(part);
        let first = parts.send("t", &reply, &[], &list, send).await;
        assert_eq!(outcome(&first), "retry two failed");
        assert_eq!(*platform.sent.lock().unwrap(), ["one"]);
        let second = parts.send("t", &reply, &[], &list, send).await;
        assert_eq!(outcome(&second), "delivered Some(\"id-one\") deleting 3");
        assert_eq!(*platform.sent.lock().unwrap(), ["one", "two", "three"]);
        // Another replica sees the same records (they live in Redis).
        let p = plumbing
            .streams
            .partition_of(&reply.platform, &reply.chat.id);
        let recorded = parts
            .recorded(&[
                plumbing.streams.sent_part(p, "r1", 0),
                plumbing.streams.sent_part(p, "r1", 2),
                plumbing.streams.sent_part(p, "r1", 3),
            ])
            .await
            .unwrap();
        assert_eq!(
            recorded,
            [Some("id-one".to_string()), Some("id-three".into()), None]
        );
        // One part needs no records.
        let single = parts.send("t", &reply, &[], &list[..1], send).await;
        assert_eq!(outcome(&single), "delivered Some(\"id-one\") deleting 0");
    }
}
